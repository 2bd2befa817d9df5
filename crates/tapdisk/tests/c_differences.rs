//! Side by side with the C tools (issue 23): what the C `tap-ctl` and tapdisk (blktap v4.0.8)
//! show an operator or a toolstack, written into each test as the C observable, and what
//! ours shows: where they agree now, and where ours differs on purpose (README: "Differences
//! from the C tools").
//!
//! The test of an OPEN without a device facility needs root, `unshare` and `/dev/fuse`: it
//! runs `tap-ctl` in a private mount namespace where `/dev/fuse` (and `/dev/ublk-control`,
//! if the kernel has it) are `/dev/null` bind mounts, so the tapdisk spawned there can make
//! no block device while the rest of the machine (and every other test) keeps them.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{needs_met, process_alive, require, wait_for, Env};

/// `tap-ctl ARGS` with no block-device choice of its own (as SM and the C `tap-ctl` run it:
/// no `-b`, no `$BLKTAP_BLOCK_DEVICE`), inside a mount namespace without FUSE or ublk.
fn tap_ctl_without_devices(env: &Env, args: &[&str]) -> Output {
    let mask = "for node in /dev/fuse /dev/ublk-control; do \
                  if [ -e \"$node\" ]; then mount --bind /dev/null \"$node\" || exit 99; fi; \
                done; exec \"$@\"";
    let tap_ctl = env.tap_ctl_cmd(args);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mask,
        "sh",
    ])
    .arg(tap_ctl.get_program())
    .args(args);
    for (key, value) in tap_ctl.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    cmd.env_remove("BLKTAP_BLOCK_DEVICE");
    cmd.output().unwrap()
}

/// True when the namespace test can run here; prints why not otherwise.
fn masking_possible(test: &str) -> bool {
    needs_met(
        test,
        &[
            (rustix::process::geteuid().is_root(), "root"),
            (Path::new("/dev/fuse").exists(), "/dev/fuse"),
            (common::have("unshare"), "unshare"),
        ],
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The minor in a marker path `tap-ctl allocate`/`create` printed.
fn minor_of(marker: &str) -> u32 {
    marker
        .trim()
        .rsplit_once("tapdisk-")
        .unwrap()
        .1
        .parse()
        .unwrap()
}

/// `qemu-img compare` of the image file and the VBD's NBD export: the disk is served.
fn assert_served(env: &Env, image: &Path, pid: u32, minor: u32) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(image)
        .arg(env.nbd_uri(pid, minor))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Item 1. C: with neither ublk nor FUSE the C tapdisk still opens and serves the disk over
/// NBD (a v4 VBD has no kernel device of its own). Ours: an OPEN that did not choose a device
/// itself (`tap-ctl create` without `-b`, the site default `block_device.open = "auto"` for
/// the C `tap-ctl`'s and SM's opens) is served over NBD, and says why there is no device
/// (`"blockdev_error"` in stats; the log); an explicit `-b` or `$BLKTAP_BLOCK_DEVICE` fails.
#[test]
fn an_open_without_a_device_facility_serves_nbd() {
    if !masking_possible("an_open_without_a_device_facility_serves_nbd") {
        return;
    }
    require("qemu-img");
    let env = Env::new();
    let image = env.raw_image("disk.img", 1 << 20, 5);
    let params = format!("aio:{}", image.display());

    // tap-ctl create without -b: the site's create default (auto) finds no device.
    let out = tap_ctl_without_devices(&env, &["create", "-a", &params]);
    assert!(out.status.success(), "create failed: {}", text(&out.stderr));
    let marker = text(&out.stdout);
    assert!(
        marker.contains("/tapdisk/tapdisk-"),
        "prints the marker: {marker}"
    );
    let minor = minor_of(&marker);
    let row = env
        .list()
        .into_iter()
        .find(|row| row.minor == Some(minor))
        .unwrap();
    let pid = row.pid.unwrap();
    assert_eq!(row.state, Some(0));
    let shown = env.stats_json(pid, minor);
    assert!(shown.get("blockdev").is_none(), "{shown}");
    let why = shown["blockdev_error"].as_str().unwrap_or_default();
    assert!(why.contains("block device"), "{shown}");
    assert_served(&env, &image, pid, minor);
    env.destroy(pid, minor);
    assert!(wait_for(std::time::Duration::from_secs(5), || {
        !process_alive(pid)
    }));

    // The C tap-ctl's (and SM's) steps, with a site that asks for devices on every open:
    // allocate, spawn, attach, open without a choice.
    env.site_config("[block_device]\nopen = \"auto\"\n");
    let minor = minor_of(&env.tap_ctl_ok(&["allocate"]));
    let out = tap_ctl_without_devices(&env, &["spawn"]);
    assert!(out.status.success(), "spawn failed: {}", text(&out.stderr));
    let pid: u32 = text(&out.stdout).trim().parse().unwrap();
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["attach", "-p", &p, "-m", &m]);
    let mut open = env.tap_ctl_cmd(&["open", "-p", &p, "-m", &m, "-a", &params]);
    let out = open.env_remove("BLKTAP_BLOCK_DEVICE").output().unwrap();
    assert!(out.status.success(), "open failed: {}", text(&out.stderr));
    assert!(env.stats_json(pid, minor)["blockdev_error"].is_string());
    assert_served(&env, &image, pid, minor);
    // A close forgets the reason with the device choice.
    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m]);
    assert!(env.stats_json(pid, minor).get("blockdev_error").is_none());
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["free", "-m", &m]);

    // Explicitly requested: -b auto, -b fuse, $BLKTAP_BLOCK_DEVICE. These fail, and leave
    // nothing behind.
    for args in [
        vec!["create", "-b", "auto", "-a", &params],
        vec!["create", "-b", "fuse", "-a", &params],
    ] {
        let out = tap_ctl_without_devices(&env, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            text(&out.stderr).contains("block device"),
            "{}",
            text(&out.stderr)
        );
    }
    let mut from_env = Command::new("unshare");
    from_env
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind /dev/null /dev/fuse && exec \"$@\"")
        .arg("sh")
        .arg(common::tap_ctl_bin())
        .args(["create", "-a", &params])
        .env("BLKTAP_CONTROL_DIR", &env.ctl_dir)
        .env("BLKTAP_TAPDISK", common::tapdisk_bin())
        .env("TAPDISK_CONFIG", &env.config_file)
        .env("BLKTAP_BLOCK_DEVICE", "fuse");
    let out = from_env.output().unwrap();
    assert!(!out.status.success(), "BLKTAP_BLOCK_DEVICE=fuse succeeded");
    assert!(
        wait_for(std::time::Duration::from_secs(5), || env
            .tapdisk_pids()
            .is_empty()),
        "a tapdisk was left running"
    );
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

/// Item 2. C: per-image `hits` and `fail` are sectors: `[ 256, 256 ]` after 128 KiB read and
/// written; `tap-ctl stats` ends the text with an empty line (`{ ... }\n\n`). Ours: the same.
#[test]
fn stats_count_sectors_and_end_with_an_empty_line() {
    require("qemu-io");
    let env = Env::new();
    let image = env.raw_image("disk.img", 1 << 20, 1);
    let (pid, minor) = env.create(&image, &["-b", "none"]);
    env.qemu_io(pid, minor, "write -P 0x5a 0 128k");
    env.qemu_io(pid, minor, "read -P 0x5a 0 128k");
    let out = env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    assert!(out.ends_with(" }\n\n"), "{out:?}");
    assert_eq!(out.lines().count(), 2, "{out:?}");
    let shown = env.stats_json(pid, minor);
    assert_eq!(
        shown["images"][0]["hits"],
        serde_json::json!([256, 256]),
        "{shown}"
    );
    assert_eq!(
        shown["images"][0]["fail"],
        serde_json::json!([0, 0]),
        "{shown}"
    );
    assert_eq!(shown["secs"], serde_json::json!([256, 256]), "{shown}");
    env.destroy(pid, minor);
}

/// Item 3. C: an attached, not yet opened minor lists as `state=0`; after a close, `0x2`.
/// Ours: the same.
#[test]
fn an_attached_minor_lists_as_state_0() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 1 << 20, 0);
    let minor = minor_of(&env.tap_ctl_ok(&["allocate"]));
    let pid: u32 = env.tap_ctl_ok(&["spawn"]).trim().parse().unwrap();
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["attach", "-p", &p, "-m", &m]);
    let listed = env.tap_ctl_ok(&["list", "-m", &m]);
    assert_eq!(listed, format!("pid={pid} minor={minor} state=0\n"));
    let params = format!("aio:{}", image.display());
    env.tap_ctl_ok(&["open", "-p", &p, "-m", &m, "-a", &params]);
    let listed = env.tap_ctl_ok(&["list", "-m", &m]);
    assert_eq!(
        listed,
        format!("pid={pid} minor={minor} state=0 args={params}\n")
    );
    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m]);
    let listed = env.tap_ctl_ok(&["list", "-m", &m]);
    assert_eq!(listed, format!("pid={pid} minor={minor} state=0x2\n"));
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["free", "-m", &m]);
}

/// Item 4. C: an image type without a driver is answered ENOSYS (`tap-ctl` exits 38), a
/// missing file ENOENT (2). Ours: the same, so a toolstack tells the two apart.
#[test]
fn an_unknown_image_type_is_enosys() {
    let env = Env::new();
    env.tap_ctl_err(&["create", "-a", "bogus:/srv/disk.img"], libc::ENOSYS);
    let missing = env.dir.path().join("missing.img");
    env.tap_ctl_err(
        &["create", "-a", &format!("aio:{}", missing.display())],
        libc::ENOENT,
    );
    // The C tap-ctl's steps: the OPEN itself answers ENOSYS.
    let minor = minor_of(&env.tap_ctl_ok(&["allocate"]));
    let pid = env.tap_ctl_ok(&["spawn"]).trim().to_owned();
    let m = minor.to_string();
    env.tap_ctl_ok(&["attach", "-p", &pid, "-m", &m]);
    let stderr = env.tap_ctl_err(
        &["open", "-p", &pid, "-m", &m, "-a", "rbd:pool/disk"],
        libc::ENOSYS,
    );
    assert!(stderr.contains("'rbd:pool/disk'"), "{stderr}");
    env.tap_ctl_ok(&["detach", "-p", &pid, "-m", &m]);
    env.tap_ctl_ok(&["free", "-m", &m]);
}

/// Item 5 (kept, a deliberate difference). C: a `-R` VBD's export does not say read-only; a
/// client opening it read-write works until it writes (EINVAL). Ours: the export carries
/// NBD's `READ_ONLY` flag, so a read-write open (qemu without `-r`) is refused at once and a
/// read-only one works.
#[test]
fn a_read_only_vbd_exports_read_only() {
    require("qemu-io");
    let env = Env::new();
    let image = env.raw_image("disk.img", 1 << 20, 7);
    let (pid, minor) = env.create(&image, &["-b", "none", "-R"]);
    let uri = env.nbd_uri(pid, minor);
    let read_write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 7 0 512", &uri])
        .output()
        .unwrap();
    assert!(
        !read_write.status.success(),
        "a read-write open was accepted"
    );
    let read_only = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 7 0 512", &uri])
        .output()
        .unwrap();
    assert!(read_only.status.success(), "{}", text(&read_only.stderr));
    env.destroy(pid, minor);
}

/// Item 6 (kept, deliberate differences). C: a failure prints the bare `strerror` text; `tap-ctl
/// major` (removed in v4) prints the usage and exits 0. Ours: one line that says what failed
/// and ends with the C text (so a script matching C's text still finds it); `major` exits 38
/// (ENOSYS) with a reason and prints nothing on stdout, so no script takes it for a major.
#[test]
fn cli_errors_carry_context_and_major_is_enosys() {
    let env = Env::new();
    let missing = env.dir.path().join("missing.img");
    let stderr = env.tap_ctl_err(
        &["create", "-a", &format!("aio:{}", missing.display())],
        libc::ENOENT,
    );
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "{stderr}");
    assert!(line.starts_with("tap-ctl: create: "), "{stderr}");
    assert!(line.contains(&*missing.to_string_lossy()), "{stderr}");
    assert!(line.ends_with(": No such file or directory"), "{stderr}");

    let out = env.tap_ctl(&["major"]);
    assert_eq!(out.status.code(), Some(libc::ENOSYS));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("tap-ctl: major: "), "{stderr}");
    assert!(
        stderr.trim_end().ends_with(": Function not implemented"),
        "{stderr}"
    );
}
