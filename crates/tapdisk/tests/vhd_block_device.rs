//! The `vhd` driver on a block device, as XenServer's LVM-backed SRs use it (issue 13, item 2):
//! the VHD is written straight onto the volume with its footer at the device's end, and new
//! blocks must go after the data, before that footer, which never moves. Without LVM: the
//! image is made in a file of the device's size (the space between the metadata and the
//! footer holds the volume's old bytes) and bound to a loop device. Guest writes through
//! tapdisk fill new blocks until the space before the footer runs out (then `ENOSPC`);
//! `vhd-util check` accepts the device after each step and the data reads back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require, run_ok, vhd_util_ok, Env};

const MIB: u64 = 1 << 20;

/// A loop device over a file, detached when dropped.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file));
        Self {
            path: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A dynamic VHD of `virtual_mib` in a file of `device_bytes`, its footer at the end and the
/// old contents of the "volume" (0xee) between its metadata and that footer.
fn volume_image(path: &Path, virtual_mib: u64, device_bytes: u64) {
    drop(
        vhd::create::create_file(
            path,
            &vhd::create::CreateOptions::dynamic(virtual_mib * MIB),
        )
        .unwrap(),
    );
    let mut bytes = std::fs::read(path).unwrap();
    let footer = bytes.split_off(bytes.len() - 512);
    bytes.resize(usize::try_from(device_bytes).unwrap() - 512, 0xee);
    bytes.extend_from_slice(&footer);
    std::fs::write(path, bytes).unwrap();
}

/// Runs qemu-io commands against an NBD export (`-r` for a read-only one); returns stdout
/// and stderr.
fn qemu_io(uri: &str, read_only: bool, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    if read_only {
        cmd.arg("-r");
    }
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts every one of `n` qemu-io commands completed.
fn all_done(out: &str, n: usize) {
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("bytes at offset").count(), n, "{out}");
}

fn check_valid(device: &Path) {
    let out = vhd_util_ok(&["check", "-n", &device.display().to_string()]);
    assert!(out.contains("is valid"), "{out}");
}

#[test]
fn blocks_are_allocated_before_a_footer_at_the_end_of_the_device() {
    require("qemu-io");
    require("losetup");
    let env = Env::new();
    // 32 MiB virtual on a 9 MiB volume: room for four 2 MiB blocks before the footer.
    let backing = env.dir.path().join("volume.img");
    volume_image(&backing, 32, 9 * MIB);
    let device = LoopDevice::attach(&backing);
    let params = format!("vhd:{}", device.path.display());
    check_valid(&device.path);

    let (pid, minor) = env.create_params(&params, &["-b", "none"]);
    let uri = env.nbd_uri(pid, minor);
    let out = qemu_io(
        &uri,
        false,
        &[
            "write -P 1 0 1M",
            "write -P 2 6M 2M",
            "write -P 3 12M 4k",
            "write -z 20M 64k",
        ],
    );
    all_done(&out, 4);
    // A fifth block does not fit before the footer.
    let out = qemu_io(&uri, false, &["write -P 4 30M 4k"]);
    assert!(out.contains("No space left on device"), "{out}");
    env.destroy(pid, minor);
    check_valid(&device.path);
    let len = std::fs::metadata(&backing).unwrap().len();
    assert_eq!(len, 9 * MIB, "the volume's size is unchanged");

    // Reopened: everything written reads back, nothing of the volume's old bytes shows.
    let (pid, minor) = env.create_params(&params, &["-b", "none", "-R"]);
    let out = qemu_io(
        &env.nbd_uri(pid, minor),
        true,
        &[
            "read -P 1 0 1M",
            "read -P 0 1M 1M",
            "read -P 2 6M 2M",
            "read -P 3 12M 4k",
            "read -P 0 12292k 60k",
            "read -P 0 20M 64k",
            "read -P 0 30M 4k",
        ],
    );
    all_done(&out, 7);
    env.destroy(pid, minor);

    // The library reads the same through the device.
    let chain = vhd::Chain::open(&device.path, false).unwrap();
    let mut sector = [0u8; 512];
    chain.read(6 * MIB / 512, &mut sector).unwrap();
    assert!(sector.iter().all(|b| *b == 2));
    assert_eq!(chain.leaf().bat().allocated_count(), 4);
    assert_eq!(chain.leaf().footer_offset(), 9 * MIB - 512);
}
