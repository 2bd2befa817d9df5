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
