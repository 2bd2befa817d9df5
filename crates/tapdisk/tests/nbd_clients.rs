//! The tapdisk NBD export against real NBD clients: nbdinfo (flags, map, content, list),
//! qemu-io (write -z, discard, aio_write, flush), qemu-img (map, compare, convert), nbdcopy
//! with several connections, fio with verification, and a kernel block device made from the
//! export with nbdfuse and a loop device, formatted and mounted.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fio_nbd_verify, require, run_ok, wait_for, Env};

const MIB: u64 = 1 << 20;

/// A sparse raw image of `len` bytes with `fill`-valued data at each `(offset, len)`.
fn sparse_image(env: &Env, name: &str, len: u64, data: &[(u64, usize, u8)]) -> PathBuf {
    let path = env.dir.path().join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(len).unwrap();
    for &(offset, bytes, fill) in data {
        file.write_all_at(&vec![fill; bytes], offset).unwrap();
    }
    path
}

/// `nbdinfo --can WHAT` (or `--is WHAT`): true on exit 0, false on exit 2.
fn nbdinfo_flag(uri: &str, mode: &str, what: &str) -> bool {
    let status = Command::new("nbdinfo")
        .args([mode, what, uri])
        .status()
        .unwrap();
    match status.code() {
        Some(0) => true,
        Some(2) => false,
        other => panic!("nbdinfo {mode} {what} exited {other:?}"),
    }
}

#[test]
fn nbdinfo_sees_truthful_flags_map_and_list() {
    require("nbdinfo");
    let env = Env::new();
    let image = sparse_image(&env, "disk.img", 8 * MIB, &[(MIB, 64 * 1024, 0x5a)]);
    let (pid, minor) = env.create(&image, &[]);
    let uri = env.nbd_uri(pid, minor);
    for what in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
    ] {
        assert!(nbdinfo_flag(&uri, "--can", what), "--can {what}");
    }
    assert!(!nbdinfo_flag(&uri, "--is", "read-only"));

    let map = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect();
    // offset length type description
    assert_eq!(rows.len(), 3, "{map}");
    assert_eq!(rows[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "65536", "0"], "{map}");
    assert_eq!(rows[2][..3], ["1114112", "7274496", "3"], "{map}");
    let totals = run_ok(Command::new("nbdinfo").args(["--map", "--totals", &uri]));
    assert!(totals.contains("65536"), "{totals}");

    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    assert!(list.contains(&image.display().to_string()), "{list}");
    assert!(list.contains("\"block_size_maximum\": 33554432"), "{list}");
    let info = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(info.contains("\"export-size\": 8388608"), "{info}");
    assert!(info.contains("\"can_multi_conn\": true"), "{info}");
    assert!(info.contains("\"base:allocation\""), "{info}");
    env.destroy(pid, minor);
}

#[test]
fn nbdinfo_content_and_read_only_flags() {
    require("nbdinfo");
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 << 20, 3);
    let (pid, minor) = env.create(&image, &["-R"]);
    let uri = env.nbd_uri(pid, minor);
    assert!(nbdinfo_flag(&uri, "--is", "read-only"));
    for what in ["trim", "zero", "fast-zero"] {
        assert!(
            !nbdinfo_flag(&uri, "--can", what),
            "--can {what} on a read-only disk"
        );
    }
    assert!(nbdinfo_flag(&uri, "--can", "cache"));
    // --content runs file(1) over the first sectors; it only has to succeed.
    let out = Command::new("nbdinfo")
        .args(["--content", &uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A writable open is refused (the export says read-only).
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write 0 4k",
            "-c",
            "read -P 3 0 512",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Permission denied") || text.contains("read-only"),
        "{text}"
    );
    env.destroy(pid, minor);
}

#[test]
fn qemu_io_write_zeroes_discard_aio_write_flush() {
    require("qemu-io");
    let env = Env::new();
    let image = env.raw_image("disk.img", 8 << 20, 1);
    let (pid, minor) = env.create(&image, &[]);
    let uri = env.nbd_uri(pid, minor);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 0 256k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write -z -u 128k 64k",
        "-c",
        "discard 1M 1M",
        "-c",
        "aio_write -P 0xcd 4M 64k",
        "-c",
        "aio_write -P 0xce 5M 64k",
        "-c",
        "aio_flush",
        "-c",
        "write -f -P 0xef 6M 4k",
        "-c",
        "flush",
        "-c",
        "read -P 0 64k 128k",
        "-c",
        "read -P 0xab 192k 64k",
    ]));
    let data = std::fs::read(&image).unwrap();
    let range = |from: u64, len: u64| {
        &data[usize::try_from(from).unwrap()..usize::try_from(from + len).unwrap()]
    };
    assert!(range(0, 64 * 1024).iter().all(|b| *b == 0xab));
    assert!(range(64 * 1024, 128 * 1024).iter().all(|b| *b == 0));
    assert!(
        range(MIB, MIB).iter().all(|b| *b == 0),
        "discard reads as zeros"
    );
    assert!(range(4 * MIB, 64 * 1024).iter().all(|b| *b == 0xcd));
    assert!(range(5 * MIB, 64 * 1024).iter().all(|b| *b == 0xce));
    assert!(range(6 * MIB, 4096).iter().all(|b| *b == 0xef));
    // The discarded megabyte and the unmapped zeroes are holes now.
    let map = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    assert!(
        map.contains("\"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": false, \"zero\": true")
            || map.contains("\"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true"),
        "{map}"
    );
    env.destroy(pid, minor);
}

#[test]
fn qemu_img_map_compare_and_convert_both_ways() {
    require("qemu-img");
    let env = Env::new();
    let image = sparse_image(
        &env,
        "disk.img",
        16 * MIB,
        &[(0, 4096, 1), (3 * MIB, 512 * 1024, 2), (15 * MIB, 4096, 3)],
    );
    let (pid, minor) = env.create(&image, &[]);
    let uri = env.nbd_uri(pid, minor);
    let map = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    assert!(map.contains("\"start\": 0, \"length\": 4096"), "{map}");
    assert!(
        map.contains("\"start\": 3145728, \"length\": 524288"),
        "{map}"
    );

    // NBD -> file.
    let copy = env.dir.path().join("copy.qcow2");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &uri,
        copy.to_str().unwrap(),
    ]));
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &uri,
        copy.to_str().unwrap(),
    ]));
    // The holes stayed holes in the copy.
    let info =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", copy.to_str().unwrap()]));
    assert!(info.contains("\"data\": false"), "{info}");

    // file -> NBD over a second disk.
    let target = sparse_image(&env, "target.img", 16 * MIB, &[(0, 16 * 1024 * 1024, 0x77)]);
    let (pid2, minor2) = env.create(&target, &[]);
    let target_uri = env.nbd_uri(pid2, minor2);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "raw",
        copy.to_str().unwrap(),
        &target_uri,
    ]));
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        image.to_str().unwrap(),
        &target_uri,
    ]));
    env.destroy(pid, minor);
    env.destroy(pid2, minor2);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(&target).unwrap()
    );
}

#[test]
fn nbdcopy_in_and_out_with_four_connections() {
    require("nbdcopy");
    let env = Env::new();
    let source = env.raw_image("source.img", 32 << 20, 9);
    let (pid, minor) = env.create(&source, &[]);
    let uri = env.nbd_uri(pid, minor);
    let out = env.dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").args(["-C", "4", "--requests=16", &uri, out.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(&out).unwrap()
    );

    let incoming = env.raw_image("incoming.img", 32 << 20, 200);
    let target = sparse_image(&env, "target.img", 32 * MIB, &[]);
    let (pid2, minor2) = env.create(&target, &[]);
    let target_uri = env.nbd_uri(pid2, minor2);
    run_ok(Command::new("nbdcopy").args([
        "-C",
        "4",
        "--flush",
        incoming.to_str().unwrap(),
        &target_uri,
    ]));
    env.destroy(pid, minor);
    env.destroy(pid2, minor2);
    assert_eq!(
        std::fs::read(&incoming).unwrap(),
        std::fs::read(&target).unwrap()
    );
}

#[test]
fn fio_randrw_qd32_verifies_with_io_uring_and_pread_engines() {
    require("fio");
    // Each engine with O_DIRECT and through the page cache (-D: inline reads and writes).
    for (engine, flags) in [
        ("io_uring", &[][..]),
        ("pread", &[][..]),
        ("io_uring", &["-D"][..]),
        ("pread", &["-D"][..]),
    ] {
        let env = Env::new();
        let image = env.raw_image("disk.img", 32 << 20, 0);
        let params = format!("aio:{}", image.display());
        let mut args = vec!["create", "-a", &params];
        args.extend_from_slice(flags);
        env.site_config(&format!("[io]\nengine = \"{engine}\"\n"));
        let out = env.tap_ctl_cmd(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row = env.list().into_iter().next().unwrap();
        let (pid, minor) = (row.pid.unwrap(), row.minor.unwrap());
        eprintln!("fio verify with the {engine} engine, flags {flags:?}");
        let job = ["--rw=randrw", "--bs=4k", "--iodepth=32", "--size=32M"];
        fio_nbd_verify(env.dir.path(), &env.nbd_uri(pid, minor), &job);
        let stats = env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
        assert!(
            stats.contains(&format!("\"engine\": \"{engine}\"")),
            "{stats}"
        );
        env.destroy(pid, minor);
    }
}

/// Undoes a kernel block device built from the export, in reverse order, even when the test
/// fails half way.
struct KernelDevice {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mount: Option<PathBuf>,
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            let _ = Command::new("umount").arg(&mount).status();
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.nbdfuse.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn can_make_loop_devices() -> bool {
    Path::new("/dev/fuse").exists()
        && Command::new("losetup")
            .arg("-f")
            .output()
            .is_ok_and(|o| o.status.success())
}

#[test]
fn kernel_block_device_through_nbdfuse_and_loop_holds_an_ext4_filesystem() {
    require("nbdfuse");
    require("mkfs.ext4");
    if !can_make_loop_devices() {
        eprintln!("skipped: no /dev/fuse or no free loop device");
        return;
    }
    let env = Env::new();
    let image = sparse_image(&env, "disk.img", 64 * MIB, &[]);
    let (pid, minor) = env.create(&image, &[]);
    let fuse_dir = env.dir.path().join("fuse");
    std::fs::create_dir(&fuse_dir).unwrap();
    let mut device = KernelDevice {
        fuse_dir: fuse_dir.clone(),
        nbdfuse: None,
        loop_dev: None,
        mount: None,
    };
    device.nbdfuse = Some(
        Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg("--unix")
            .arg(env.nbd_socket(pid, minor))
            .spawn()
            .unwrap(),
    );
    let disk_file = fuse_dir.join("nbd");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::metadata(&disk_file)
            .is_ok_and(|m| m.len() == 64 * MIB)),
        "nbdfuse did not show the disk"
    );
    let dev = run_ok(
        Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&disk_file),
    )
    .trim()
    .to_owned();
    device.loop_dev = Some(dev.clone());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
    let mnt = env.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").arg(&dev).arg(&mnt));
    device.mount = Some(mnt.clone());
    let payload: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i % 251).to_le_bytes()[0])
        .collect();
    std::fs::write(mnt.join("file.bin"), &payload).unwrap();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/small.txt"), b"hello tapdisk").unwrap();
    run_ok(&mut Command::new("sync"));
    // Remount so the reads come from the device, not the page cache.
    run_ok(Command::new("umount").arg(&mnt));
    device.mount = None;
    run_ok(Command::new("mount").arg(&dev).arg(&mnt));
    device.mount = Some(mnt.clone());
    assert_eq!(std::fs::read(mnt.join("file.bin")).unwrap(), payload);
    assert_eq!(
        std::fs::read(mnt.join("dir/small.txt")).unwrap(),
        b"hello tapdisk"
    );
    drop(device);
    // The filesystem is in the image file itself.
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    env.destroy(pid, minor);
}
