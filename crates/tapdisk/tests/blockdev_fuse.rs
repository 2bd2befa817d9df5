//! End-to-end tests of the FUSE + loop block device: `tap-ctl create -b fuse` gives
//! `/dev/loopN`, which carries an ext4 filesystem across destroy/create, passes fio's verify,
//! refuses destroy while mounted or open, and leaves no mount, loop device or process behind.
//!
//! Needs root, `/dev/fuse` and `/dev/loop-control`; without them each test prints why and
//! returns. Every test cleans up its mounts and loop devices even when it fails ([`Guard`]).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{needs_met, process_alive, require, run_ok, wait_for, Env};

const MIB: usize = 1 << 20;

/// True when this machine can run the tests; prints why not otherwise.
fn fuse_possible(test: &str) -> bool {
    needs_met(
        test,
        &[
            (rustix::process::geteuid().is_root(), "root"),
            (Path::new("/dev/fuse").exists(), "/dev/fuse"),
            (Path::new("/dev/loop-control").exists(), "/dev/loop-control"),
        ],
    )
}

/// Mount points (from `/proc/self/mountinfo`) under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|mount| mount.starts_with(dir))
        .collect()
}

/// Loop devices (from `losetup -a`) whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&*dir.to_string_lossy()))
        .map(|line| line.split(':').next().unwrap_or_default().to_owned())
        .collect()
}

/// Unmounts what a test mounted and removes loop devices and FUSE mounts left in its
/// directory, whatever the test's outcome. Runs before `Env` kills the tapdisks.
struct Guard {
    root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for mount in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
        for device in loops_under(&self.root) {
            let _ = Command::new("losetup").arg("-d").arg(&device).status();
        }
        for mount in mounts_under(&self.root).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

/// A test environment whose VBDs get FUSE block devices.
struct FuseEnv {
    // Dropped first: unmount and detach while the tapdisks still run.
    guard: Guard,
    env: Env,
}

/// A VBD with a block device.
#[derive(Debug, Clone)]
struct Disk {
    pid: u32,
    minor: u32,
    device: PathBuf,
}

impl FuseEnv {
    fn new() -> Self {
        require("mkfs.ext4");
        require("losetup");
        require("fio");
        let env = Env::new();
        let root = env.dir.path().canonicalize().unwrap();
        Self {
            guard: Guard {
                root,
                mounts: Vec::new(),
            },
            env,
        }
    }

    fn root(&self) -> &Path {
        &self.guard.root
    }

    /// `tap-ctl create -a <params> <extra>` with block device `fuse`; returns the VBD.
    fn create(&self, params: &str, extra: &[&str]) -> Disk {
        let mut args = vec!["create", "-a", params];
        args.extend_from_slice(extra);
        let out = self
            .env
            .tap_ctl_cmd(&args)
            .env("BLKTAP_BLOCK_DEVICE", "fuse")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tap-ctl create {params} failed with {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let device = PathBuf::from(printed.trim());
        let index = device
            .to_str()
            .and_then(|d| d.strip_prefix("/dev/loop"))
            .expect("create prints /dev/loopN");
        assert!(index.parse::<u32>().is_ok(), "{printed}");
        let row = self
            .env
            .list()
            .into_iter()
            .find(|row| row.args.as_deref() == Some(params))
            .expect("created VBD is listed");
        Disk {
            pid: row.pid.expect("listed with a pid"),
            minor: row.minor.expect("listed with a minor"),
            device,
        }
    }

    fn create_raw(&self, image: &Path) -> Disk {
        self.create(&format!("aio:{}", image.display()), &[])
    }

    /// `tap-ctl destroy`; on failure the panic message shows who held the device.
    fn destroy(&self, disk: &Disk) {
        let (pid, minor) = (disk.pid.to_string(), disk.minor.to_string());
        let out = self
            .env
            .tap_ctl_cmd(&["destroy", "-p", &pid, "-m", &minor])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tap-ctl destroy of {} failed with {:?}: {}\nopen by: {:?}\nlosetup -a: {}",
            disk.device.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            openers(&disk.device),
            String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout),
        );
    }

    /// `tap-ctl destroy` expecting `EBUSY`.
    fn destroy_busy(&self, disk: &Disk) {
        let stderr = self.env.tap_ctl_err(
            &[
                "destroy",
                "-p",
                &disk.pid.to_string(),
                "-m",
                &disk.minor.to_string(),
            ],
            libc::EBUSY,
        );
        assert!(stderr.contains("busy"), "{stderr}");
    }

    /// Mounts `device` on a new directory `name`; the guard unmounts it if the test fails.
    fn mount(&mut self, device: &Path, name: &str) -> PathBuf {
        let dir = self.env.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok(Command::new("mount").arg(device).arg(&dir));
        self.guard.mounts.push(dir.clone());
        dir
    }

    fn unmount(&mut self, dir: &Path) {
        run_ok(Command::new("umount").arg(dir));
        self.guard.mounts.retain(|m| m != dir);
    }

    /// Asserts that the VBD left nothing behind: no process, mount, loop device or file.
    fn assert_gone(&self, disk: &Disk) {
        assert!(
            wait_for(Duration::from_secs(10), || !process_alive(disk.pid)),
            "tapdisk {} still running",
            disk.pid
        );
        assert_eq!(mounts_under(self.root()), Vec::<PathBuf>::new());
        assert_eq!(loops_under(self.root()), Vec::<String>::new());
        let backing = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/backing_file",
            disk.device.file_name().unwrap().to_string_lossy()
        ))
        .unwrap_or_default();
        assert!(
            !backing.contains(&*self.root().to_string_lossy()),
            "{} still bound to {backing}",
            disk.device.display()
        );
        assert_eq!(self.env.leftovers(), Vec::<String>::new());
    }
}

/// Processes with `device` open, as `pid (comm)`.
fn openers(device: &Path) -> Vec<String> {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter(|process| {
            std::fs::read_dir(process.path().join("fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == device))
            })
        })
        .map(|process| {
            let comm = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
            format!(
                "{} ({})",
                process.file_name().to_string_lossy(),
                comm.trim()
            )
        })
        .collect()
}

/// Size in bytes of a block device.
fn device_size(device: &Path) -> u64 {
    run_ok(Command::new("blockdev").arg("--getsize64").arg(device))
        .trim()
        .parse()
        .unwrap()
}

/// `len` bytes of a reproducible pseudo-random stream.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// The files the filesystem tests write.
fn test_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("small.txt".into(), b"hello from tapdisk\n".to_vec()),
        ("noise.bin".into(), noise(3 * MIB + 123, 1)),
        ("dir/nested.bin".into(), noise(200 * 1024, 2)),
    ]
}

/// mkfs, mount, write files, sync, unmount, destroy, create again, files intact.
fn filesystem_survives_recreate(fuse: &mut FuseEnv, params: &str, size: u64) {
    let disk = fuse.create(params, &[]);
    assert_eq!(device_size(&disk.device), size);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&disk.device),
    );
    let dir = fuse.mount(&disk.device, "mnt");
    for (name, data) in test_files() {
        let path = dir.join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
    }
    run_ok(&mut Command::new("sync"));
    fuse.unmount(&dir);
    fuse.destroy(&disk);
    fuse.assert_gone(&disk);

    let again = fuse.create(params, &[]);
    let dir = fuse.mount(&again.device, "mnt");
    for (name, data) in test_files() {
        assert_eq!(std::fs::read(dir.join(&name)).unwrap(), data, "{name}");
    }
    fuse.unmount(&dir);
    run_ok(Command::new("fsck.ext4").arg("-fn").arg(&again.device));
    fuse.destroy(&again);
    fuse.assert_gone(&again);
}

#[test]
fn raw_image_filesystem_survives_destroy_and_create() {
    if !fuse_possible("raw_image_filesystem_survives_destroy_and_create") {
        return;
    }
    let mut fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 64 * MIB, 0);
    let params = format!("aio:{}", image.display());
    filesystem_survives_recreate(&mut fuse, &params, 64 * MIB as u64);
}

#[test]
fn vhd_image_filesystem_survives_destroy_and_create() {
    if !fuse_possible("vhd_image_filesystem_survives_destroy_and_create") {
        return;
    }
    let mut fuse = FuseEnv::new();
    let image = fuse.env.dir.path().join("disk.vhd");
    let vhd_util = common::tapdisk_bin().with_file_name("vhd-util");
    assert!(vhd_util.exists(), "build every binary first");
    run_ok(
        Command::new(&vhd_util)
            .args(["create", "-n"])
            .arg(&image)
            .args(["-s", "64"]),
    );
    let params = format!("vhd:{}", image.display());
    let probe = fuse
        .env
        .tap_ctl_cmd(&["create", "-a", &params])
        .output()
        .unwrap();
    if probe.status.code() == Some(libc::ENOSYS) {
        eprintln!("vhd_image_filesystem_survives_destroy_and_create: skipped, no vhd driver yet");
        return;
    }
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let row = fuse.env.list().into_iter().next().unwrap();
    fuse.env.destroy(row.pid.unwrap(), row.minor.unwrap());
    filesystem_survives_recreate(&mut fuse, &params, 64 * MIB as u64);
}

/// Runs fio on `device` from `dir`; fails the test on any error or verify mismatch.
fn fio(dir: &Path, device: &Path, args: &[&str]) {
    let out = run_ok(
        Command::new("fio")
            .current_dir(dir)
            .arg("--name=verify")
            .arg(format!("--filename={}", device.display()))
            .args(["--direct=1", "--output-format=json", "--verify=crc32c"])
            .args(["--do_verify=1", "--verify_fatal=1", "--verify_dump=0"])
            .args(args),
    );
    let errors: Vec<&str> = out
        .lines()
        .filter(|line| line.trim_start().starts_with("\"error\""))
        .collect();
    assert!(!errors.is_empty(), "fio reported no status: {out}");
    assert!(
        errors
            .iter()
            .all(|line| line.trim().trim_end_matches(',').ends_with(" 0")),
        "fio errors: {errors:?}"
    );
}

#[test]
fn fio_verify_on_the_loop_device() {
    if !fuse_possible("fio_verify_on_the_loop_device") {
        return;
    }
    let fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 64 * MIB, 3);
    let disk = fuse.create_raw(&image);
    let index = disk.device.to_string_lossy().replace("/dev/loop", "");
    let dio = std::fs::read_to_string(format!("/sys/block/loop{index}/loop/dio")).unwrap();
    assert_eq!(dio.trim(), "1", "the loop device should use direct I/O");
    let work = fuse.env.dir.path();
    fio(
        work,
        &disk.device,
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--ioengine=libaio",
            "--size=48M",
        ],
    );
    // Mixed sizes from one sector up, deeper queue, another engine, across the whole disk.
    fio(
        work,
        &disk.device,
        &[
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--iodepth=32",
            "--ioengine=io_uring",
            "--size=64M",
            "--offset=0",
        ],
    );
    // What the device shows is what the image holds.
    run_ok(Command::new("cmp").arg(&disk.device).arg(&image));
    fuse.destroy(&disk);
    fuse.assert_gone(&disk);
}

#[test]
fn destroy_is_refused_while_mounted_or_open() {
    if !fuse_possible("destroy_is_refused_while_mounted_or_open") {
        return;
    }
    let mut fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 32 * MIB, 0);
    let disk = fuse.create_raw(&image);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&disk.device),
    );
    let dir = fuse.mount(&disk.device, "mnt");

    // Mounted: EBUSY, and the filesystem keeps working.
    fuse.destroy_busy(&disk);
    std::fs::write(dir.join("after-refusal"), noise(MIB, 9)).unwrap();
    run_ok(&mut Command::new("sync"));
    assert_eq!(
        std::fs::read(dir.join("after-refusal")).unwrap(),
        noise(MIB, 9)
    );
    fuse.unmount(&dir);
    assert!(process_alive(disk.pid));

    // Held open by a process (this one): EBUSY, the device keeps serving.
    let mut held = File::open(&disk.device).unwrap();
    fuse.destroy_busy(&disk);
    let mut head = vec![0u8; 4096];
    held.read_exact(&mut head).unwrap();
    let listed = fuse.env.tap_ctl_ok(&["list"]);
    assert!(
        listed.contains(&format!("minor={}", disk.minor)),
        "{listed}"
    );
    let stats = fuse.env.tap_ctl_ok(&[
        "stats",
        "-p",
        &disk.pid.to_string(),
        "-m",
        &disk.minor.to_string(),
    ]);
    assert!(
        stats.contains(&format!("\"blockdev\": \"{}\"", disk.device.display())),
        "{stats}"
    );
    drop(held);

    fuse.destroy(&disk);
    fuse.assert_gone(&disk);
}

#[test]
fn unaligned_io_through_the_fuse_file() {
    if !fuse_possible("unaligned_io_through_the_fuse_file") {
        return;
    }
    let fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 4 * MIB, 5);
    let disk = fuse.create_raw(&image);
    let file_path = fuse
        .root()
        .join("ctl")
        .join(format!("fuse{}.{}", disk.pid, disk.minor));
    let mut model = std::fs::read(&image).unwrap();
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file_path)
            .unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4 * MIB as u64);
        for (offset, len, seed) in [
            (1usize, 1usize, 1u64),
            (511, 2, 2),
            (1000, 70_000, 3),
            (4 * MIB - 7, 7, 4),
        ] {
            let data = noise(len, seed);
            file.write_all_at(&data, offset as u64).unwrap();
            model[offset..offset + len].copy_from_slice(&data);
        }
        // Past the end: nothing written.
        let past = file.write_at(b"x", 4 * MIB as u64);
        assert!(past.is_err() || past.unwrap() == 0);
        file.sync_all().unwrap();
        let mut back = vec![0u8; 70_003];
        file.read_exact_at(&mut back, 999).unwrap();
        assert_eq!(back, model[999..999 + 70_003]);
        // Through the loop device too (direct I/O, whole sectors).
        let mut via_loop = vec![0u8; 4096];
        File::open(&disk.device)
            .unwrap()
            .read_exact_at(&mut via_loop, 0)
            .unwrap();
        assert_eq!(via_loop, model[..4096]);
    }
    fuse.destroy(&disk);
    fuse.assert_gone(&disk);
    assert_eq!(std::fs::read(&image).unwrap(), model);
}

#[test]
fn leftovers_of_a_killed_tapdisk_are_cleaned_by_the_next_start() {
    if !fuse_possible("leftovers_of_a_killed_tapdisk_are_cleaned_by_the_next_start") {
        return;
    }
    let fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 8 * MIB, 0);
    let dead = fuse.create_raw(&image);
    run_ok(Command::new("kill").arg("-9").arg(dead.pid.to_string()));
    assert!(wait_for(Duration::from_secs(5), || !process_alive(
        dead.pid
    )));
    assert_eq!(mounts_under(fuse.root()).len(), 1, "the FUSE mount stays");
    assert_eq!(loops_under(fuse.root()).len(), 1, "the loop device stays");
    fuse.env
        .tap_ctl_ok(&["free", "-m", &dead.minor.to_string()]);

    let other = fuse.env.raw_image("other.img", 8 * MIB, 1);
    let live = fuse.create_raw(&other);
    let mounts = mounts_under(fuse.root());
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(mounts[0].ends_with(format!("fuse{}.{}", live.pid, live.minor)));
    let loops = loops_under(fuse.root());
    assert_eq!(loops, vec![live.device.display().to_string()]);
    fuse.destroy(&live);
    // The dead tapdisk's control socket and NBD socket are not the block device's business.
    assert_eq!(mounts_under(fuse.root()), Vec::<PathBuf>::new());
    assert_eq!(loops_under(fuse.root()), Vec::<String>::new());
}

#[test]
fn auto_gives_a_loop_device_where_ublk_is_missing() {
    if !fuse_possible("auto_gives_a_loop_device_where_ublk_is_missing") {
        return;
    }
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("auto_gives_a_loop_device_where_ublk_is_missing: skipped, this kernel has ublk");
        return;
    }
    let fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 4 * MIB, 0);
    let params = format!("aio:{}", image.display());
    let out = fuse
        .env
        .tap_ctl_ok(&["create", "-b", "auto", "-a", &params]);
    assert!(out.trim().starts_with("/dev/loop"), "{out}");
    let row = fuse.env.list().into_iter().next().unwrap();
    let disk = Disk {
        pid: row.pid.unwrap(),
        minor: row.minor.unwrap(),
        device: PathBuf::from(out.trim()),
    };
    let mut sector = vec![0u8; 512];
    File::open(&disk.device)
        .unwrap()
        .read_exact(&mut sector)
        .unwrap();
    assert_eq!(sector, vec![0u8; 512]);
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.device)
        .unwrap();
    writer.write_all(&[0x5a; 4096]).unwrap();
    writer.sync_all().unwrap();
    drop(writer);
    fuse.destroy(&disk);
    fuse.assert_gone(&disk);
    assert_eq!(std::fs::read(&image).unwrap()[..4096], [0x5a; 4096]);
}

#[test]
fn sigterm_while_mounted_forces_removal_and_the_loop_goes_with_its_last_user() {
    let test = "sigterm_while_mounted_forces_removal_and_the_loop_goes_with_its_last_user";
    if !fuse_possible(test) {
        return;
    }
    let mut fuse = FuseEnv::new();
    let image = fuse.env.raw_image("disk.img", 16 * MIB, 0);
    let disk = fuse.create_raw(&image);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&disk.device),
    );
    let dir = fuse.mount(&disk.device, "mnt");
    run_ok(Command::new("kill").arg("-TERM").arg(disk.pid.to_string()));
    assert!(
        wait_for(Duration::from_secs(10), || !process_alive(disk.pid)),
        "tapdisk {} ignored SIGTERM with its device mounted",
        disk.pid
    );
    // The device is unbound at its last close: the unmount.
    let _ = Command::new("umount").arg("-l").arg(&dir).status();
    fuse.guard.mounts.clear();
    assert!(
        wait_for(Duration::from_secs(10), || loops_under(fuse.root())
            .is_empty()
            && mounts_under(fuse.root()).is_empty()),
        "left behind: {:?} {:?}",
        loops_under(fuse.root()),
        mounts_under(fuse.root())
    );
}

/// The VBD's `"blockdev"` in `tap-ctl stats`, if it has one.
fn stats_blockdev(env: &Env, pid: u32, minor: u32) -> Option<String> {
    let stats = env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    let (_, rest) = stats.split_once("\"blockdev\": \"")?;
    Some(rest.split_once('"')?.0.to_owned())
}

/// Runs `tap-ctl ARGS` without `BLKTAP_BLOCK_DEVICE` (so only `-b` or the site configuration
/// chooses a block device), asserting success; returns its output.
fn tap_ctl_site_default(env: &Env, args: &[&str]) -> String {
    let out = env
        .tap_ctl_cmd(args)
        .env_remove("BLKTAP_BLOCK_DEVICE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `tap-ctl create -a PARAMS EXTRA` without `BLKTAP_BLOCK_DEVICE`: (what it printed, pid,
/// minor).
fn create_plain(env: &Env, params: &str, extra: &[&str]) -> (String, u32, u32) {
    let mut args = vec!["create", "-a", params];
    args.extend_from_slice(extra);
    let printed = tap_ctl_site_default(env, &args);
    let row = env
        .list()
        .into_iter()
        .find(|row| row.args.as_deref() == Some(params))
        .expect("created VBD is listed");
    (
        printed.trim().to_owned(),
        row.pid.unwrap(),
        row.minor.unwrap(),
    )
}

/// The steps a toolstack (SM, libxl) takes, `tap-ctl open` without `-b` nor
/// `BLKTAP_BLOCK_DEVICE` (the OPEN carries no block-device bit, as from a C client):
/// returns (pid, minor).
fn open_in_steps(env: &Env, params: &str, extra: &[&str]) -> (u32, u32) {
    let marker = env.tap_ctl_ok(&["allocate"]);
    let minor = marker.trim().rsplit_once("tapdisk-").unwrap().1.to_owned();
    let pid = env.tap_ctl_ok(&["spawn"]).trim().to_owned();
    env.tap_ctl_ok(&["attach", "-p", &pid, "-m", &minor]);
    let mut args = vec!["open", "-p", &pid, "-m", &minor, "-a", params];
    args.extend_from_slice(extra);
    tap_ctl_site_default(env, &args);
    (pid.parse().unwrap(), minor.parse().unwrap())
}

#[test]
fn block_device_defaults_no_device_for_opens_a_device_for_create_site_overrides_both() {
    if !fuse_possible("block_device_defaults") {
        return;
    }
    let fuse = FuseEnv::new();
    let env = &fuse.env;
    let image = env.raw_image("disk.img", 4 * MIB, 3);
    let params = format!("aio:{}", image.display());
    // This host has no ublk: auto means FUSE + loop.
    let is_device =
        |printed: &str| printed.starts_with("/dev/loop") || printed.starts_with("/dev/ublkb");

    // Built in: create prints a device...
    let (printed, pid, minor) = create_plain(env, &params, &[]);
    assert!(is_device(&printed), "{printed}");
    assert_eq!(
        stats_blockdev(env, pid, minor).as_deref(),
        Some(printed.as_str())
    );
    env.destroy(pid, minor);
    // ...and an open in steps (what SM and C clients do) gets none, as the C stack.
    let (pid, minor) = open_in_steps(env, &params, &[]);
    assert_eq!(stats_blockdev(env, pid, minor), None);
    assert_eq!(loops_under(fuse.root()), Vec::<String>::new());
    env.destroy(pid, minor);
    // An explicit -b is honoured either way.
    let (pid, minor) = open_in_steps(env, &params, &["-b", "auto"]);
    assert!(stats_blockdev(env, pid, minor).is_some_and(|d| is_device(&d)));
    env.destroy(pid, minor);
    let (printed, pid, minor) = create_plain(env, &params, &["-b", "none"]);
    assert!(printed.ends_with(&format!("tapdisk-{minor}")), "{printed}");
    env.destroy(pid, minor);

    // The site configuration overrides each default (read by each tapdisk at start).
    env.site_config("[block_device]\nopen = \"fuse\"\ncreate = \"none\"\n");
    let (pid, minor) = open_in_steps(env, &params, &[]);
    let device = stats_blockdev(env, pid, minor).expect("the site's open default: fuse");
    assert!(device.starts_with("/dev/loop"), "{device}");
    env.destroy(pid, minor);
    let (printed, pid, minor) = create_plain(env, &params, &[]);
    assert!(printed.ends_with(&format!("tapdisk-{minor}")), "{printed}");
    assert_eq!(stats_blockdev(env, pid, minor), None);
    env.destroy(pid, minor);
    // -b still wins over the site.
    let (printed, pid, minor) = create_plain(env, &params, &["-b", "fuse"]);
    assert!(printed.starts_with("/dev/loop"), "{printed}");
    env.destroy(pid, minor);
    assert!(wait_for(Duration::from_secs(10), || env
        .tapdisk_pids()
        .is_empty()));
    assert_eq!(loops_under(fuse.root()), Vec::<String>::new());
    assert_eq!(mounts_under(fuse.root()), Vec::<PathBuf>::new());
}
