//! The `tap-ctl` binary as toolstacks run it: exit statuses, stdout/stderr split and output
//! formats, with `BLKTAP_CONTROL_DIR` pointing into a per-test temporary directory and a shell
//! script standing in for `tapdisk`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn tap_ctl(ctl_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .env("BLKTAP_CONTROL_DIR", ctl_dir)
        .env_remove("BLKTAP_TAPDISK")
        .output()
        .expect("run tap-ctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exit_statuses_follow_the_c_tool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ctl = tmp.path().join("ctl");

    let help = tap_ctl(&ctl, &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help.stdout).starts_with("usage: tap-ctl COMMAND [OPTIONS]"));

    // The C tool exits 0 here; a misspelt command must not pass for success.
    let unknown = tap_ctl(&ctl, &["bogus"]);
    assert_eq!(unknown.status.code(), Some(22));
    assert!(unknown.stdout.is_empty());
    assert!(text(&unknown.stderr).contains("COMMAND := {"));

    let missing = tap_ctl(&ctl, &["attach", "-p", "1"]);
    assert_eq!(missing.status.code(), Some(22));
    assert!(missing.stdout.is_empty());
    assert!(text(&missing.stderr).starts_with("usage: attach"));

    let unsupported = tap_ctl(&ctl, &["create", "-a", "vhd:/x.vhd", "-d", "tapdev3"]);
    assert_eq!(unsupported.status.code(), Some(95));
    assert!(text(&unsupported.stderr).contains("not supported yet"));
    // Refused before doing anything: no minor was allocated.
    assert!(!ctl.join("tapdisk").exists());

    let nobody = tap_ctl(&ctl, &["pause", "-p", "999", "-m", "0", "-t", "1"]);
    assert_eq!(nobody.status.code(), Some(libc::ENOENT));
    assert!(text(&nobody.stderr).starts_with("tap-ctl: pause: "));
}

#[test]
fn allocate_list_free_through_the_binary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ctl = tmp.path().join("ctl");
    let first = tap_ctl(&ctl, &["allocate"]);
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(
        text(&first.stdout),
        format!("{}\n", ctl.join("tapdisk").join("tapdisk-0").display())
    );
    tap_ctl(&ctl, &["allocate"]);
    // stdout is a pipe here: the key=value format.
    let list = tap_ctl(&ctl, &["list", "--debug"]);
    assert_eq!(list.status.code(), Some(0));
    assert_eq!(text(&list.stdout), "minor=0\nminor=1\n");
    assert_eq!(tap_ctl(&ctl, &["free", "-m0"]).status.code(), Some(0));
    let again = tap_ctl(&ctl, &["free", "-m", "0"]);
    assert_eq!(again.status.code(), Some(libc::ENOENT));
    assert_eq!(text(&tap_ctl(&ctl, &["list"]).stdout), "minor=1\n");
}

#[test]
fn spawn_prints_the_bare_pid_when_not_on_a_terminal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ctl = tmp.path().join("ctl");
    let script = tmp.path().join("fake-tapdisk");
    std::fs::write(
        &script,
        "#!/bin/sh\n( echo \"$BLKTAP_CONTROL_DIR/ctl4321\" ) &\nexit 0\n",
    )
    .expect("write script");
    let mut perms = std::fs::metadata(&script).expect("stat").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(&script, perms).expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .arg("spawn")
        .env("BLKTAP_CONTROL_DIR", &ctl)
        .env("BLKTAP_TAPDISK", &script)
        .output()
        .expect("run tap-ctl");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "4321\n");
}

#[test]
fn spawn_failure_exits_with_the_tapdisk_status() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let script = tmp.path().join("fake-tapdisk");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'tapdisk: no control dir'\nexit 13\n",
    )
    .expect("write script");
    let mut perms = std::fs::metadata(&script).expect("stat").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(&script, perms).expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .arg("spawn")
        .env("BLKTAP_CONTROL_DIR", tmp.path().join("ctl"))
        .env("BLKTAP_TAPDISK", &script)
        .output()
        .expect("run tap-ctl");
    assert_eq!(out.status.code(), Some(13));
    let err = text(&out.stderr);
    assert!(err.starts_with("tap-ctl: spawn: "), "{err}");
    assert!(err.contains("no control dir"), "{err}");
    assert!(err.ends_with(": Permission denied\n"), "{err}");
}
