//! Hostile clients and leftovers (issue 19): every binary with its output pipe closed, `tap-ctl
//! list` with a tapdisk that does not answer, markers and sockets left by `kill -9`, image
//! opens that would block, idle control and NBD connections, and a soak test that keeps
//! control requests fast while hundreds of NBD and control clients misbehave.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::*;

/// Runs `cmd` with its stdout a pipe whose reading end is already closed; returns its exit
/// status and stderr.
fn run_into_closed_pipe(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let out = cmd
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_output_pipe_ends_every_binary_quietly() {
    let env = Env::new();
    let image = env.dir.path().join("x.vhd");
    vhd_util_ok(&["create", "-n", image.to_str().unwrap(), "-s", "16"]);
    let image = image.to_str().unwrap();

    // vhd-util dies of SIGPIPE without a word, as the C tool does.
    for args in [
        vec!["check", "-n", image],
        vec![],
        vec!["read", "-p", "-n", image],
    ] {
        let (status, stderr) = run_into_closed_pipe(Command::new(vhd_util_bin()).args(&args));
        assert_eq!(
            status.signal(),
            Some(libc::SIGPIPE),
            "vhd-util {args:?}: {status:?} {stderr}"
        );
        assert!(stderr.is_empty(), "vhd-util {args:?}: {stderr}");
    }
    // tap-ctl and tapdisk keep SIGPIPE ignored (their sockets need EPIPE, not a signal) and
    // shrug off the failed write.
    for args in [vec![], vec!["list"], vec!["allocate"]] {
        let (status, stderr) = run_into_closed_pipe(&mut env.tap_ctl_cmd(&args));
        assert_eq!(status.code(), Some(0), "tap-ctl {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "tap-ctl {args:?}: {stderr}");
    }
    let (status, stderr) = run_into_closed_pipe(Command::new(tapdisk_bin()).arg("-h"));
    assert_eq!(status.code(), Some(0), "tapdisk -h: {stderr}");
    assert!(stderr.is_empty(), "tapdisk -h: {stderr}");
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: &str) {
    run_ok(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]));
}

#[test]
fn list_names_a_stopped_tapdisk_keeps_its_rows_and_fails() {
    let env = Env::new();
    let (stopped, stopped_minor) = env.create(&env.raw_image("a.img", 1 << 20, 1), &[]);
    let (healthy, healthy_minor) = env.create(&env.raw_image("b.img", 1 << 20, 2), &[]);
    signal(stopped, "STOP");
    let start = std::time::Instant::now();
    let out = env.tap_ctl(&["list"]);
    let took = start.elapsed();
    signal(stopped, "CONT");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "list with a stopped tapdisk: {took:.2?}, exit {:?}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(libc::ETIMEDOUT), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("tapdisk {stopped} did not answer")),
        "{stderr}"
    );
    let rows: Vec<ListRow> = stdout.lines().map(parse_list_line).collect();
    // The stopped tapdisk's minor is not shown as free: its row names the pid.
    assert!(
        rows.contains(&ListRow {
            pid: Some(stopped),
            minor: Some(stopped_minor),
            ..ListRow::default()
        }),
        "{stdout}"
    );
    assert!(
        !rows
            .iter()
            .any(|r| r.minor == Some(stopped_minor) && r.pid.is_none()),
        "{stdout}"
    );
    // The healthy one is listed in full.
    assert!(
        rows.iter()
            .any(|r| r.pid == Some(healthy) && r.minor == Some(healthy_minor) && r.args.is_some()),
        "{stdout}"
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");

    // Questions that the stopped tapdisk cannot affect still succeed.
    signal(stopped, "STOP");
    let by_pid = env.tap_ctl(&["list", "-p", &healthy.to_string()]);
    let by_minor = env.tap_ctl(&["list", "-m", &healthy_minor.to_string()]);
    signal(stopped, "CONT");
    assert_eq!(by_pid.status.code(), Some(0));
    assert_eq!(
        by_minor.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&by_minor.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&by_minor.stdout).lines().count(), 1);
    env.destroy(stopped, stopped_minor);
    env.destroy(healthy, healthy_minor);
}

#[test]
fn kill_9_leftovers_are_shown_stale_and_reclaimed() {
    let env = Env::new();
    // An allocated minor nobody attached yet is not stale and is never reclaimed.
    let allocated = env.tap_ctl_ok(&["allocate"]);
    let killed: Vec<(u32, u32)> = (0..5u8)
        .map(|round| {
            env.create(
                &env.raw_image(&format!("k{round}.img"), 1 << 20, round),
                &[],
            )
        })
        .collect();
    for (pid, _) in &killed {
        signal(*pid, "KILL");
        assert!(wait_for(std::time::Duration::from_secs(10), || {
            !process_alive(*pid)
        }));
    }
    let before = env.leftovers();
    println!("after 5 kill -9: {} files: {before:?}", before.len());
    assert_eq!(before.len(), 1 + 5 * 6, "{before:?}");

    let out = env.tap_ctl(&["list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for (pid, minor) in &killed {
        assert!(
            stderr.contains(&format!("minor {minor} is stale: tapdisk {pid} died")),
            "{stderr}"
        );
    }
    // Rows stay what SM parses: an allocated minor without a tapdisk.
    let rows: Vec<ListRow> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(parse_list_line)
        .collect();
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(rows.iter().all(|r| r.pid.is_none()));

    // The next create reclaims every stale marker and socket and reuses the lowest minor.
    let (pid, minor) = env.create(&env.raw_image("new.img", 1 << 20, 9), &[]);
    assert_eq!(minor, killed[0].1);
    let after = env.leftovers();
    println!("after the next create: {} files: {after:?}", after.len());
    let mut expected = vec![
        format!("ctl{pid}"),
        format!("nbd{pid}.{minor}"),
        format!("nbd-old{pid}.{minor}"),
        format!("nbdserver{pid}.{minor}"),
        format!("nbdserver-new{pid}.{minor}"),
        format!("tapdisk-{minor}"),
        allocated.trim().rsplit('/').next().unwrap().to_owned(),
    ];
    expected.sort();
    assert_eq!(after, expected);
    env.destroy(pid, minor);
}
