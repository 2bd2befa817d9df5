//! Crash test of the `vhd` driver: tapdisk is killed with SIGKILL while a client streams random
//! writes and discards with periodic flushes over NBD. After every kill `vhd-util check` must
//! accept the image and every write acknowledged before a completed flush must read back
//! (sectors written after the last completed flush may hold any of the values written since).
//! The first half of the iterations runs on a dynamic VHD, the second half on a differencing
//! child of it. `VHD_CRASH_ITERATIONS` overrides the number of iterations (default 50).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::crash::{stream_until_killed, Model, DISK};
use common::{process_alive, vhd_util_ok, wait_for, Env, Lcg};

/// Reads the whole chain at `leaf` with the `vhd` library and checks it against the model.
fn verify(leaf: &Path, model: &mut Model, iteration: usize) {
    let chain = vhd::Chain::open(leaf, false).unwrap();
    let mut disk = vec![0u8; usize::try_from(DISK).unwrap()];
    chain.read(0, &mut disk).unwrap();
    model.verify(&disk, iteration);
}

fn check_vhd(path: &Path) {
    let out = Command::new(common::vhd_util_bin())
        .args(["check", "-n", &path.display().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("is valid"),
        "{}: {stdout}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_during_writes_keeps_flushed_data_and_a_valid_image() {
    let iterations: usize = std::env::var("VHD_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.vhd");
    let child = images.path().join("child.vhd");
    vhd_util_ok(&["create", "-n", &base.display().to_string(), "-s", "32"]);
    let mut model = Model::new();
    let mut rng = Lcg(2024);
    let mut total_flushes = 0;
    let mut leaf = base.clone();
    for iteration in 0..iterations {
        if iteration == iterations / 2 {
            vhd_util_ok(&[
                "snapshot",
                "-n",
                &child.display().to_string(),
                "-p",
                &base.display().to_string(),
            ]);
            leaf = child.clone();
        }
        let env = Env::new();
        let (pid, minor) = env.create_params(&format!("vhd:{}", leaf.display()), &["-b", "none"]);
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
        check_vhd(&leaf);
        verify(&leaf, &mut model, iteration);
    }
    assert!(
        total_flushes > iterations,
        "only {total_flushes} flushes completed"
    );
    check_vhd(&base);
}
