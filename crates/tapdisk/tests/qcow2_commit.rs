//! Live commit of a qcow2 VBD's active layer into its base, driven by the command lines
//! XCP-ng's storage manager builds (`tap-ctl commit -p PID -m MINOR -a PATH`, `tap-ctl query`
//! polled until `concluded`, `tap-ctl cancel -w`): with the disk idle (the result compared
//! with qemu's view of the chain before the commit), under fio writes with verification
//! (no write lost across the switch), and cancelled; refused for other image types and for
//! a VBD with a CBT log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fio_nbd_verify, require, run_ok, Env};

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

fn qemu_io(target: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for command in commands {
        cmd.args(["-c", command]);
    }
    cmd.arg(target);
    run_ok(&mut cmd);
}

/// A base with data and a leaf over it holding other data, in `dir`.
fn chain(dir: &Path, size: &str) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let leaf = dir.join("leaf.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &base.display().to_string(),
        size,
    ]);
    qemu_io(&base, &["write -P 0x11 0 4M", "write -P 0x12 20M 3M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &leaf.display().to_string(),
    ]);
    qemu_io(
        &leaf,
        &[
            "write -P 0x21 1M 2M",
            "write -P 0x22 21M 64k",
            "write -z 2M 512k",
            "write -P 0x23 30M 1M",
        ],
    );
    (base, leaf)
}

/// Parses `Commit status '<status>' (<current>/<total>)` as SM's regex does.
fn parse_query(line: &str) -> (String, u64, u64) {
    let rest = line
        .trim_end()
        .strip_prefix("Commit status '")
        .unwrap_or_else(|| panic!("query printed {line:?}"));
    let (status, rest) = rest.split_once("' (").unwrap();
    let (current, total) = rest.strip_suffix(')').unwrap().split_once('/').unwrap();
    (
        status.to_owned(),
        current.parse().unwrap(),
        total.parse().unwrap(),
    )
}

/// Polls `tap-ctl query` every 100 ms (SM polls every second) until `concluded`, checking
/// the progress (never more copied than the total, all of it once concluded); returns the
/// statuses seen.
fn poll_until_concluded(env: &Env, pid: &str, minor: &str) -> Vec<String> {
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let (status, current, total) =
            parse_query(&env.tap_ctl_ok(&["query", "-p", pid, "-m", minor]));
        assert!(
            current <= total || status == "undefined",
            "{current}/{total}"
        );
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "concluded" {
            assert_eq!(current, total, "a concluded job copied all its work");
            return seen;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "commit never concluded: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn commit_of_an_idle_disk_leaves_a_chain_qemu_accepts() {
    require("qemu-img");
    let env = Env::new();
    let (base, leaf) = chain(env.dir.path(), "64M");
    // qemu's view of the chain before the commit.
    let before = env.dir.path().join("before");
    std::fs::create_dir(&before).unwrap();
    std::fs::copy(&base, before.join("base.qcow2")).unwrap();
    std::fs::copy(&leaf, before.join("leaf.qcow2")).unwrap();
    let (pid, minor) = env.create_params(&format!("qcow2:{}", leaf.display()), &[]);
    let (pid, minor) = (pid.to_string(), minor.to_string());
    // No job yet: SM's "undefined" case, and cancel is a no-op.
    assert_eq!(
        env.tap_ctl_ok(&["query", "-p", &pid, "-m", &minor]),
        "Commit status 'undefined' (0/0)\n"
    );
    assert_eq!(
        env.tap_ctl_ok(&["cancel", "-p", &pid, "-m", &minor, "-w"]),
        ""
    );
    // Only the active layer, only images of the chain.
    env.tap_ctl_err(
        &[
            "commit",
            "-p",
            &pid,
            "-m",
            &minor,
            "-a",
            &base.display().to_string(),
        ],
        95,
    );
    env.tap_ctl_err(
        &[
            "commit",
            "-p",
            &pid,
            "-m",
            &minor,
            "-a",
            "/nonexistent.qcow2",
        ],
        22,
    );
    assert_eq!(
        env.tap_ctl_ok(&[
            "commit",
            "-p",
            &pid,
            "-m",
            &minor,
            "-a",
            &leaf.display().to_string()
        ]),
        ""
    );
    let seen = poll_until_concluded(&env, &pid, &minor);
    assert!(
        seen.contains(&"ready".to_owned()) || seen.len() >= 2,
        "{seen:?}"
    );
    // A concluded job is dismissed.
    assert_eq!(
        env.tap_ctl_ok(&["query", "-p", &pid, "-m", &minor]),
        "Commit status 'undefined' (0/0)\n"
    );
    // The disk now runs on the base.
    let row = env
        .list()
        .into_iter()
        .find(|r| r.minor == Some(minor.parse().unwrap()))
        .unwrap();
    assert_eq!(
        row.args.as_deref(),
        Some(format!("qcow2:{}", base.display()).as_str())
    );
    let uri = env.nbd_uri(pid.parse().unwrap(), minor.parse().unwrap());
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(before.join("leaf.qcow2"))
        .arg(&uri)
        .status()
        .unwrap();
    assert!(same.success(), "the disk changed across the commit");
    env.destroy(pid.parse().unwrap(), minor.parse().unwrap());
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    for image in [&leaf, &base] {
        let same = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(before.join("leaf.qcow2"))
            .arg(image)
            .status()
            .unwrap();
        assert!(
            same.success(),
            "{} differs from the chain before",
            image.display()
        );
    }
}

#[test]
fn commit_under_fio_verify_loses_no_write() {
    require("qemu-img");
    require("fio");
    let env = Env::new();
    let (base, leaf) = chain(env.dir.path(), "128M");
    let (pid, minor) = env.create_params(&format!("qcow2:{}", leaf.display()), &[]);
    let uri = env.nbd_uri(pid, minor);
    let fio_dir = env.dir.path().to_path_buf();
    let fio_uri = uri.clone();
    let fio = std::thread::spawn(move || {
        fio_nbd_verify(
            &fio_dir,
            &fio_uri,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--size=96M",
                "--offset=16M",
                "--verify_fatal=1",
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&[
        "commit",
        "-p",
        &p,
        "-m",
        &m,
        "-a",
        &leaf.display().to_string(),
    ]);
    let seen = poll_until_concluded(&env, &p, &m);
    eprintln!("commit statuses: {seen:?}");
    let json = fio.join().expect("fio thread");
    assert!(json.contains("\"error\" : 0"));
    // Everything the guest wrote, before and after the switch, reads back from the base.
    let row = env
        .list()
        .into_iter()
        .find(|r| r.minor == Some(minor))
        .unwrap();
    assert_eq!(
        row.args.as_deref(),
        Some(format!("qcow2:{}", base.display()).as_str())
    );
    let export = env.dir.path().join("export.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&export),
    );
    env.destroy(pid, minor);
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&base)
        .arg(&export)
        .status()
        .unwrap();
    assert!(same.success());
}

#[test]
fn cancelled_commit_keeps_the_leaf_and_says_so() {
    require("qemu-img");
    let env = Env::new();
    let (_base, leaf) = chain(env.dir.path(), "64M");
    let (pid, minor) = env.create_params(&format!("qcow2:{}", leaf.display()), &[]);
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&[
        "commit",
        "-p",
        &p,
        "-m",
        &m,
        "-a",
        &leaf.display().to_string(),
    ]);
    // A second commit while one exists is refused, as qemu refuses a second job.
    env.tap_ctl_err(
        &[
            "commit",
            "-p",
            &p,
            "-m",
            &m,
            "-a",
            &leaf.display().to_string(),
        ],
        22,
    );
    assert_eq!(env.tap_ctl_ok(&["cancel", "-p", &p, "-m", &m, "-w"]), "");
    // The cancelled job is reported as a failure (ECANCELED), never as a finished commit,
    // then dismissed.
    env.tap_ctl_err(&["query", "-p", &p, "-m", &m], 125);
    assert_eq!(
        env.tap_ctl_ok(&["query", "-p", &p, "-m", &m]),
        "Commit status 'undefined' (0/0)\n"
    );
    let row = env
        .list()
        .into_iter()
        .find(|r| r.minor == Some(minor))
        .unwrap();
    assert_eq!(
        row.args.as_deref(),
        Some(format!("qcow2:{}", leaf.display()).as_str())
    );
    env.destroy(pid, minor);
}

#[test]
fn commit_is_refused_while_changed_blocks_are_tracked() {
    require("qemu-img");
    let env = Env::new();
    let (_base, leaf) = chain(env.dir.path(), "64M");
    let log = env.dir.path().join("leaf.cbtlog");
    run_ok(Command::new(common::sibling_bin("cbt-util")).args([
        "create",
        "-n",
        log.to_str().unwrap(),
        "-s",
        &(64u64 << 20).to_string(),
    ]));
    let (pid, minor) = env.create_params(
        &format!("qcow2:{}", leaf.display()),
        &["-C", log.to_str().unwrap()],
    );
    let (p, m) = (pid.to_string(), minor.to_string());
    let err = env.tap_ctl_err(
        &["commit", "-p", &p, "-m", &m, "-a", leaf.to_str().unwrap()],
        95,
    );
    assert!(err.contains("CBT log"), "{err}");
    env.destroy(pid, minor);
}

#[test]
fn commit_is_refused_for_other_image_types() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 1 << 20, 1);
    let (pid, minor) = env.create(&image, &[]);
    let (p, m) = (pid.to_string(), minor.to_string());
    let err = env.tap_ctl_err(
        &[
            "commit",
            "-p",
            &p,
            "-m",
            &m,
            "-a",
            &image.display().to_string(),
        ],
        95,
    );
    assert!(err.contains("only qcow2"), "{err}");
    env.destroy(pid, minor);
}
