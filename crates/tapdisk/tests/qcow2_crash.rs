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

use common::crash::{iterations, kill_during_writes, Format};
use common::{require, run_ok};

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

/// Reads the whole disk at `leaf` through qemu.
fn read_disk(leaf: &Path) -> Vec<u8> {
    let raw = leaf.with_extension("raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(leaf)
            .arg(&raw),
    );
    let disk = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    disk
}

/// Small clusters in the child: partial writes copy from the parent's bigger ones.
fn make_child(base: &Path, child: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
            .arg("-b")
            .arg(base.file_name().unwrap())
            .args(["-F", "qcow2"])
            .arg(child),
    );
}

#[test]
fn kill_during_writes_keeps_flushed_data_and_a_consistent_image() {
    require("qemu-img");
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&base)
            .arg(common::crash::DISK.to_string()),
    );
    let format = Format {
        disk_type: "qcow2",
        make_child: &make_child,
        check: &check_qcow2,
        read_disk: &read_disk,
    };
    kill_during_writes(
        &format,
        &base,
        &images.path().join("child.qcow2"),
        iterations("QCOW2_CRASH_ITERATIONS", 20),
        2026,
    );
}
