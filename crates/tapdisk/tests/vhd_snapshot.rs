//! Snapshot and coalesce under a live disk, as a toolstack does it, while fio writes through
//! the NBD export: pause; `vhd-util snapshot` a new leaf on top of the current one; unpause
//! onto the new leaf (writes continue there while the old leaf is a read-only parent); later
//! pause, `vhd-util coalesce` the leaf into its parent, unpause onto the coalesced image. fio
//! verifies every block it wrote, and again from a fresh tapdisk on the coalesced file.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, run_ok, vhd_util_ok, ChildGuard, Env};

/// fio options shared by the writing run and the later verify-only run (same offsets).
fn fio_job(uri: &str) -> Vec<String> {
    [
        "--name=live",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=16k",
        "--iodepth=8",
        "--size=48M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--output-format=json",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

fn assert_fio_clean(out: &str) {
    let json = &out[out.find('{').expect("fio JSON output")..];
    assert!(json.contains("\"error\" : 0"), "{json}");
    assert!(!json.contains("verify: bad"), "{json}");
}

fn allocated_blocks(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    let image = vhd::VhdImage::open(
        file,
        &path.display().to_string(),
        vhd::OpenOptions::read_only(),
    )
    .unwrap();
    image.bat().allocated_count()
}

#[test]
fn snapshot_and_coalesce_under_fio_load() {
    require("fio");
    let env = Env::new();
    let base = env.dir.path().join("base.vhd");
    let snap = env.dir.path().join("snap.vhd");
    let (base_s, snap_s) = (base.display().to_string(), snap.display().to_string());
    vhd_util_ok(&["create", "-n", &base_s, "-s", "64"]);
    let (pid, minor) = env.create_params(&format!("vhd:{base_s}"), &["-b", "none"]);
    let (p, m) = (pid.to_string(), minor.to_string());
    let uri = env.nbd_uri(pid, minor);

    let mut args = fio_job(&uri);
    args.extend(["--do_verify=1".to_string(), "--rate_iops=800".to_string()]);
    let fio = Command::new("fio")
        .current_dir(env.dir.path())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut fio = ChildGuard(Some(fio));
    let started = Instant::now();
    let still_running = |fio: &mut ChildGuard| {
        fio.0
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    };

    // Snapshot: the running disk moves onto a new leaf over the old one.
    std::thread::sleep(Duration::from_millis(700));
    assert!(still_running(&mut fio), "fio finished before the snapshot");
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    vhd_util_ok(&["snapshot", "-n", &snap_s, "-p", &base_s]);
    let base_before = std::fs::read(&base).unwrap();
    env.tap_ctl_ok(&[
        "unpause",
        "-p",
        &p,
        "-m",
        &m,
        "-a",
        &format!("vhd:{snap_s}"),
    ]);
    let row = env.list().into_iter().next().unwrap();
    assert_eq!(row.args.as_deref(), Some(format!("vhd:{snap_s}").as_str()));

    // Writes continue into the new leaf; the old one is a read-only parent.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(still_running(&mut fio), "fio finished before the coalesce");
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    assert!(allocated_blocks(&snap) > 0, "no write reached the new leaf");
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the read-only parent changed while it was a parent"
    );
    // Coalesce the leaf into its parent and move the disk onto the coalesced image.
    let out = vhd_util_ok(&["coalesce", "-n", &snap_s]);
    assert!(out.contains("Coalesced"), "{out}");
    env.tap_ctl_ok(&[
        "unpause",
        "-p",
        &p,
        "-m",
        &m,
        "-a",
        &format!("vhd:{base_s}"),
    ]);

    let out = fio.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_fio_clean(&stdout);
    assert!(started.elapsed() > Duration::from_secs(2));
    env.destroy(pid, minor);

    let check = vhd_util_ok(&["check", "-n", &base_s]);
    assert!(check.contains("is valid"), "{check}");
    // A fresh tapdisk on the coalesced image reads back everything fio wrote.
    let (pid, minor) = env.create_params(&format!("vhd:{base_s}"), &["-b", "none"]);
    let mut args = fio_job(&env.nbd_uri(pid, minor));
    args.push("--verify_only".to_string());
    let out = run_ok(Command::new("fio").current_dir(env.dir.path()).args(&args));
    assert_fio_clean(&out);
    env.destroy(pid, minor);
}
