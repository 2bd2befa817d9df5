//! Image locators end to end: `tap-ctl` makes relative *file* paths absolute (as the C tool
//! does; SM relies on it) and hands every other locator to tapdisk verbatim, and tapdisk's
//! answer names the locator it was given.

mod common;

use std::time::Duration;

use common::{wait_for, Env};

#[test]
fn non_file_locators_reach_tapdisk_verbatim() {
    let env = Env::new();
    let in_dir = |args: &[&str]| {
        env.tap_ctl_cmd(args)
            .current_dir(env.dir.path())
            .output()
            .unwrap()
    };
    // What SM passes for a storage-migration mirror, to a socket that does not exist: the
    // nbd driver's ENOENT, and the message carries the locator as given (not made into a
    // path under the cwd).
    let mirror = "nbd:unix:/run/sm/nbd/mirror.sock:exportname=vdi-1";
    let out = in_dir(&["create", "-a", mirror]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(libc::ENOENT), "{stderr}");
    // Named twice: in what tap-ctl sent, and in tapdisk's explanation.
    assert_eq!(
        stderr.matches(mirror).count(),
        2,
        "named verbatim: {stderr}"
    );
    // A type tapdisk has no driver for: ENOSYS, as the C tapdisk (was ENOENT, changed for
    // issue 23), the argument named verbatim.
    let out = in_dir(&["create", "-a", "rbd:pool/image"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(libc::ENOSYS), "{stderr}");
    assert!(stderr.contains("'rbd:pool/image'"), "{stderr}");
    assert!(
        wait_for(Duration::from_secs(5), || env.tapdisk_pids().is_empty()),
        "a tapdisk was left running"
    );
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn relative_file_paths_are_made_absolute() {
    let env = Env::new();
    env.raw_image("disk.img", 1 << 20, 0);
    let out = env
        .tap_ctl_cmd(&["create", "-a", "aio:disk.img"])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = env.list();
    let [row] = rows.as_slice() else {
        panic!("one VBD expected: {rows:?}");
    };
    // Printed back as tapdisk was given it: the path under tap-ctl's working directory.
    let cwd = std::fs::canonicalize(env.dir.path()).unwrap();
    let expected = format!("aio:{}", cwd.join("disk.img").display());
    assert_eq!(row.args.as_deref(), Some(expected.as_str()));
    env.destroy(row.pid.unwrap(), row.minor.unwrap());
}
