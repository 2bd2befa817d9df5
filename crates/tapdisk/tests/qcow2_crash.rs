//! Crash test of the `qcow2` driver: tapdisk is killed with SIGKILL while a client streams
//! random writes and discards with periodic flushes over NBD. After every kill `qemu-img
//! check` must find no corruption (leaked clusters are allowed, as qemu allows them) and every
//! write acknowledged before a completed flush must read back through qemu. The first half
//! of the iterations runs on a fresh image (the allocation path), the second half on a child
//! of it (copy-on-write from the backing file). `QCOW2_CRASH_ITERATIONS` overrides the number
//! of iterations (default 20).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::crash::{stream_until_killed, Model, DISK};
use common::{process_alive, require, run_ok, wait_for, Env, Lcg};

/// `qemu-img check`: 0 clean, 3 leaks only; anything else fails.
fn check_qcow2(path: &Path, iteration: usize) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 3)),
        "iteration {iteration}: qemu-img check {} exited {code:?}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads the whole disk at `leaf` through qemu and checks it against the model.
fn verify(leaf: &Path, model: &mut Model, iteration: usize) {
    let raw = leaf.with_extension("raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(leaf)
            .arg(&raw),
    );
    let disk = std::fs::read(&raw).unwrap();
    assert_eq!(disk.len() as u64, DISK);
    model.verify(&disk, iteration);
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn kill_during_writes_keeps_flushed_data_and_a_consistent_image() {
    require("qemu-img");
    let iterations: usize = std::env::var("QCOW2_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.qcow2");
    let child = images.path().join("child.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&base)
            .arg(DISK.to_string()),
    );
    let mut model = Model::new();
    let mut rng = Lcg(2026);
    let mut total_flushes = 0;
    let mut leaf = base.clone();
    for iteration in 0..iterations {
        if iteration == iterations / 2 {
            // Small clusters in the child: partial writes copy from the parent's bigger ones.
            run_ok(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
                    .args(["-b", "base.qcow2", "-F", "qcow2"])
                    .arg(&child),
            );
            leaf = child.clone();
        }
        let env = Env::new();
        let (pid, minor) = env.create_params(&format!("qcow2:{}", leaf.display()), &["-b", "none"]);
        let socket = env.nbd_socket(pid, minor);
        let delay = Duration::from_millis(20 + rng.next(150));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        });
        total_flushes += stream_until_killed(&socket, &mut model, &mut rng);
        killer.join().unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || !process_alive(pid)),
            "tapdisk {pid} survived SIGKILL"
        );
        check_qcow2(&leaf, iteration);
        verify(&leaf, &mut model, iteration);
    }
    assert!(
        total_flushes > iterations,
        "only {total_flushes} flushes completed"
    );
    check_qcow2(&base, iterations);
}
