//! Crash test of the `vhd` driver: tapdisk is killed with SIGKILL while a client streams random
//! writes and discards with periodic flushes over NBD. After every kill `vhd-util check` must
//! accept the image and every write acknowledged before a completed flush must read back
//! (sectors written after the last completed flush may hold any of the values written since).
//! The first half of the iterations runs on a dynamic VHD, the second half on a differencing
//! child of it. `VHD_CRASH_ITERATIONS` overrides the number of iterations (default 50).

mod common;

use std::path::Path;
use std::process::Command;

use common::crash::{iterations, kill_during_writes, Format, DISK};
use common::vhd_util_ok;

/// Reads the whole chain at `leaf` with the `vhd` library.
fn read_disk(leaf: &Path) -> Vec<u8> {
    let chain = vhd::Chain::open(leaf, false).unwrap();
    let mut disk = vec![0u8; usize::try_from(DISK).unwrap()];
    chain.read(0, &mut disk).unwrap();
    disk
}

fn check_vhd(path: &Path, _iteration: usize) {
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

fn make_child(base: &Path, child: &Path) {
    vhd_util_ok(&[
        "snapshot",
        "-n",
        &child.display().to_string(),
        "-p",
        &base.display().to_string(),
    ]);
}

#[test]
fn kill_during_writes_keeps_flushed_data_and_a_valid_image() {
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.vhd");
    vhd_util_ok(&["create", "-n", &base.display().to_string(), "-s", "32"]);
    let format = Format {
        disk_type: "vhd",
        make_child: &make_child,
        check: &check_vhd,
        read_disk: &read_disk,
    };
    kill_during_writes(
        &format,
        &base,
        &images.path().join("child.vhd"),
        iterations("VHD_CRASH_ITERATIONS", 50),
        2024,
    );
}
