//! `list` (the join over real files and fake tapdisk sockets), `create` with its undo paths and
//! `destroy`, against fake in-test tapdisks and a shell script standing in for the binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use blktapctl::{ControlDir, OpenRequest};
use common::{list_reply, send, serve, success, temp_dir, IMPOSSIBLE_PID};
use tapdisk_proto::{Message, MessageType};

/// A fake tapdisk answering PID then LIST with `entries`.
fn fake_listing(dir: &ControlDir, pid: u32, entries: Vec<(i32, i32, &'static str)>) {
    let _ = serve(dir, pid, 2, move |request, stream| match request.msg_type {
        MessageType::Pid => send(stream, &success(request, pid)),
        MessageType::List => list_reply(stream, &entries),
        other => panic!("unexpected {other:?}"),
    });
}

#[test]
fn list_joins_markers_sockets_and_vbds() {
    let (_tmp, dir) = temp_dir();
    for _ in 0..4 {
        blktapctl::allocate(&dir).expect("allocate");
    }
    fake_listing(
        &dir,
        500,
        vec![(0, 0, "vhd:/srv/a.vhd"), (2, 0x2a, "aio:/dev/b")],
    );
    fake_listing(&dir, 600, vec![]);
    // A stale socket whose tapdisk died: present on disk, refusing connections.
    drop(UnixListener::bind(dir.ctl_socket_path(700)).expect("bind"));
    // Unrelated files are ignored.
    std::fs::write(dir.root().join("ctlx"), b"").expect("write");

    let rows = blktapctl::list(&dir).expect("list");
    let dicts: Vec<String> = rows.iter().map(blktapctl::ListRow::format_dict).collect();
    assert_eq!(
        dicts,
        [
            "pid=500 minor=0 state=0 args=vhd:/srv/a.vhd",
            "pid=500 minor=2 state=0x2a args=aio:/dev/b",
            "pid=600",
            "minor=1",
            "minor=3",
        ]
    );
}

#[test]
fn list_of_empty_or_missing_directory_is_empty() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = ControlDir::new(tmp.path().join("absent"));
    assert!(blktapctl::list(&dir).expect("list").is_empty());
}

#[test]
fn list_pid_and_find_helpers() {
    let (_tmp, dir) = temp_dir();
    blktapctl::allocate(&dir).expect("allocate");
    fake_listing(&dir, 800, vec![(0, 0, "vhd:/srv/a.vhd")]);
    let rows = blktapctl::list_pid(&dir, 800).expect("list -p");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].minor, Some(0));
    assert!(blktapctl::list_pid(&dir, 801).expect("nobody").is_empty());

    fake_listing(&dir, 900, vec![(3, 0, "aio:/dev/c")]);
    assert_eq!(
        blktapctl::find_minor(&dir, Some("aio"), Some("/dev/c")).expect("found"),
        3
    );
    fake_listing(&dir, 901, vec![(4, 0, "aio:/dev/d")]);
    // 900 served its two connections already; its socket now refuses and is skipped.
    assert_eq!(blktapctl::find_pid(&dir, 4).expect("pid"), 901);
}

/// A stand-in tapdisk binary: reports `ctl<pid>` on the pipe from a background process.
fn fake_binary(tmp: &Path, pid: u32) -> PathBuf {
    let path = tmp.join("tapdisk");
    std::fs::write(
        &path,
        format!("#!/bin/sh\n( echo \"$BLKTAP_CONTROL_DIR/ctl{pid}\" ) &\nexit 0\n"),
    )
    .expect("write script");
    let mut perms = std::fs::metadata(&path).expect("stat").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(&path, perms).expect("chmod");
    path
}

#[test]
fn create_runs_allocate_spawn_attach_open() {
    let (tmp, dir) = temp_dir();
    let pid = 4242;
    let server = serve(&dir, pid, 2, common::always_ok(pid));
    let binary = fake_binary(tmp.path(), pid);
    let mut req = OpenRequest::new("vhd:/srv/a.vhd");
    req.flags = blktapctl::OpenFlags::RDONLY;
    let created = blktapctl::create_with(&dir, &binary, &req).expect("create");
    assert_eq!((created.minor, created.pid), (0, pid));
    assert_eq!(created.marker, dir.marker_path(0));
    assert!(created.marker.exists());
    let seen = server.join().expect("server");
    assert_eq!(
        seen.iter().map(|m| m.msg_type).collect::<Vec<_>>(),
        [MessageType::Attach, MessageType::Open]
    );
}

#[test]
fn create_undoes_attach_and_allocation_when_open_fails() {
    let (tmp, dir) = temp_dir();
    let pid = IMPOSSIBLE_PID;
    let server = serve(&dir, pid, 3, move |request, stream| {
        if request.msg_type == MessageType::Open {
            send(stream, &Message::error(request.cookie, libc::ENOENT));
        } else {
            send(stream, &success(request, pid));
        }
    });
    let binary = fake_binary(tmp.path(), pid);
    let err = blktapctl::create_with(&dir, &binary, &OpenRequest::new("vhd:/missing.vhd"))
        .expect_err("open fails");
    assert_eq!(err.errno(), libc::ENOENT);
    assert!(err.context().contains("/missing.vhd"), "{err}");
    let seen = server.join().expect("server");
    assert_eq!(
        seen.iter().map(|m| m.msg_type).collect::<Vec<_>>(),
        [MessageType::Attach, MessageType::Open, MessageType::Detach]
    );
    assert!(blktapctl::allocated_minors(&dir)
        .expect("minors")
        .is_empty());
}

#[test]
fn create_frees_the_minor_when_attach_fails() {
    let (tmp, dir) = temp_dir();
    let pid = IMPOSSIBLE_PID;
    let server = serve(&dir, pid, 1, |request, stream| {
        send(stream, &Message::error(request.cookie, libc::EBUSY));
    });
    let binary = fake_binary(tmp.path(), pid);
    let err = blktapctl::create_with(&dir, &binary, &OpenRequest::new("vhd:/a.vhd"))
        .expect_err("attach fails");
    assert_eq!(err.errno(), libc::EBUSY);
    server.join().expect("server");
    assert!(blktapctl::allocated_minors(&dir)
        .expect("minors")
        .is_empty());
}

#[test]
fn create_frees_the_minor_when_spawn_fails() {
    let (tmp, dir) = temp_dir();
    let binary = tmp.path().join("tapdisk");
    std::fs::write(&binary, "#!/bin/sh\necho 'tapdisk: nope'\nexit 5\n").expect("write");
    let mut perms = std::fs::metadata(&binary).expect("stat").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(&binary, perms).expect("chmod");
    let err = blktapctl::create_with(&dir, &binary, &OpenRequest::new("vhd:/a.vhd"))
        .expect_err("spawn fails");
    assert_eq!(err.errno(), 5);
    assert!(blktapctl::allocated_minors(&dir)
        .expect("minors")
        .is_empty());
}

#[test]
fn destroy_closes_detaches_and_frees() {
    let (_tmp, dir) = temp_dir();
    let (minor, _) = blktapctl::allocate(&dir).expect("allocate");
    let server = serve(&dir, 55, 2, common::always_ok(55));
    blktapctl::destroy(&dir, 55, minor, Some(std::time::Duration::from_secs(5))).expect("destroy");
    let seen = server.join().expect("server");
    assert_eq!(
        seen.iter().map(|m| m.msg_type).collect::<Vec<_>>(),
        [MessageType::Close, MessageType::Detach]
    );
    assert!(blktapctl::allocated_minors(&dir)
        .expect("minors")
        .is_empty());
}
