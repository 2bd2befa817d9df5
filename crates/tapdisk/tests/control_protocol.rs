//! The control socket under malformed and unusual requests: every one is answered with an
//! `ERROR` reply (never a crash or a hang), and the daemon keeps serving.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{process_alive, tapdisk_bin, wait_for, Env};
use tapdisk_proto::{Body, Message, MessageType, OpenFlags, Params, MESSAGE_SIZE};

/// Starts a daemonised tapdisk in `env`; returns (pid, control socket path).
fn start_tapdisk(env: &Env) -> (u32, PathBuf) {
    let mut child = Command::new(tapdisk_bin())
        .env("BLKTAP_CONTROL_DIR", &env.ctl_dir)
        .env("TAPDISK_CONFIG", &env.config_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let path = PathBuf::from(line.trim());
    let pid = path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_prefix("ctl")
        .unwrap()
        .parse()
        .unwrap();
    (pid, path)
}

/// Sends raw bytes as one request; returns every byte of the reply.
fn exchange(socket: &Path, request: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    reply
}

fn decode_one(reply: &[u8]) -> Message {
    assert_eq!(reply.len(), MESSAGE_SIZE, "expected exactly one message");
    Message::decode(reply).unwrap()
}

fn assert_error(reply: &[u8], errno: i32) {
    let message = decode_one(reply);
    assert_eq!(message.msg_type, MessageType::Error, "{message:?}");
    match message.body {
        Body::Response { error, .. } => assert_eq!(error, errno),
        other => panic!("unexpected body {other:?}"),
    }
}

fn request(msg_type: MessageType, cookie: u16, body: Body) -> Vec<u8> {
    Message::new(msg_type, cookie, body)
        .encode()
        .unwrap()
        .to_vec()
}

fn assert_pid(socket: &Path, pid: u32) {
    let reply = decode_one(&exchange(
        socket,
        &request(MessageType::Pid, 0, Body::Empty),
    ));
    assert_eq!(reply.body, Body::Pid(i32::try_from(pid).unwrap()));
}

#[test]
fn malformed_requests_get_einval_and_the_daemon_keeps_serving() {
    let env = Env::new();
    let (pid, socket) = start_tapdisk(&env);
    assert_pid(&socket, pid);

    // Unknown type.
    let mut bad_type = request(MessageType::Pid, 3, Body::Empty);
    bad_type[0..2].copy_from_slice(&99u16.to_le_bytes());
    let reply = exchange(&socket, &bad_type);
    assert_error(&reply, libc::EINVAL);
    assert_eq!(decode_one(&reply).cookie, 3, "the cookie is echoed");

    // OPEN whose params.path has no NUL.
    let mut unterminated = request(
        MessageType::Open,
        0,
        Body::Params(Params {
            path: "aio:/x".into(),
            ..Params::default()
        }),
    );
    unterminated[20..20 + 256].fill(b'a');
    assert_error(&exchange(&socket, &unterminated), libc::EINVAL);

    // Truncated message (the client closes its side early).
    assert_error(
        &exchange(&socket, &request(MessageType::Pid, 0, Body::Empty)[..100]),
        libc::EINVAL,
    );

    // Oversize: a message followed by junk.
    let mut oversize = request(MessageType::Pid, 0, Body::Empty);
    oversize.extend_from_slice(&[0xee; 1000]);
    assert_error(&exchange(&socket, &oversize), libc::EINVAL);

    // OPEN announcing an encryption key of an impossible size.
    let params = Params {
        flags: OpenFlags::OPEN_ENCRYPTED,
        path: "aio:/x".into(),
        ..Params::default()
    };
    let mut bad_key = request(MessageType::Open, 0, Body::Params(params.clone()));
    bad_key.push(200);
    assert_error(&exchange(&socket, &bad_key), libc::EINVAL);
    // ... and one whose key stops short of the size it announced.
    let mut short_key = request(MessageType::Open, 0, Body::Params(params));
    short_key.push(64);
    short_key.extend_from_slice(&[0x42; 10]);
    assert_error(&exchange(&socket, &short_key), libc::EINVAL);

    // A reply type sent as a request, and requests with no handler.
    assert_error(
        &exchange(&socket, &request(MessageType::PidRsp, 0, Body::Pid(1))),
        libc::EINVAL,
    );
    assert_error(
        &exchange(&socket, &request(MessageType::Exit, 0, Body::Empty)),
        libc::EINVAL,
    );
    // Xen ring requests for a VBD or ring that does not exist: ENODEV, as the C tapdisk
    // answers (the VBD is looked up before the order or ABI is judged).
    for blkif in [
        tapdisk_proto::Blkif {
            proto: 1,
            ..Default::default()
        },
        tapdisk_proto::Blkif {
            proto: 9,
            order: 7,
            ..Default::default()
        },
    ] {
        assert_error(
            &exchange(
                &socket,
                &request(MessageType::XenblkifConnect, 0, Body::Blkif(blkif.clone())),
            ),
            libc::ENODEV,
        );
        assert_error(
            &exchange(
                &socket,
                &request(MessageType::XenblkifDisconnect, 0, Body::Blkif(blkif)),
            ),
            libc::ENODEV,
        );
    }
    // Requests for a VBD that does not exist.
    assert_error(
        &exchange(&socket, &request(MessageType::Pause, 5, Body::Empty)),
        libc::ENODEV,
    );
    assert_error(
        &exchange(&socket, &request(MessageType::Stats, 5, Body::Empty)),
        libc::ENODEV,
    );
    assert_error(
        &exchange(&socket, &request(MessageType::DiskInfo, 5, Body::Empty)),
        libc::ENODEV,
    );

    // Random garbage of exactly one message's size.
    let garbage: Vec<u8> = (0..MESSAGE_SIZE)
        .map(|i| (i * 131 % 251).to_le_bytes()[0])
        .collect();
    let reply = exchange(&socket, &garbage);
    assert_eq!(reply.len(), MESSAGE_SIZE);

    assert_pid(&socket, pid);
    let list = exchange(
        &socket,
        &request(MessageType::List, tapdisk_proto::COOKIE_ALL, Body::Empty),
    );
    let end = decode_one(&list);
    assert!(
        matches!(end.body, Body::List(ref entry) if entry.count == 0 && entry.minor == -1),
        "{end:?}"
    );

    Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
    assert!(!socket.exists(), "the control socket is removed on SIGTERM");
}

#[test]
fn a_stalled_client_does_not_block_others() {
    let env = Env::new();
    let (pid, socket) = start_tapdisk(&env);
    // Half a message, then silence: the daemon must keep serving and answer it after its
    // receive deadline.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled
        .write_all(&request(MessageType::Pid, 0, Body::Empty)[..10])
        .unwrap();
    let started = Instant::now();
    for _ in 0..20 {
        assert_pid(&socket, pid);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "other clients were delayed"
    );
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = vec![0u8; MESSAGE_SIZE];
    stalled.read_exact(&mut reply).unwrap();
    assert_error(&reply, libc::EINVAL);
    Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
}

#[test]
fn a_read_only_open_reports_info_zero_as_the_c_tapdisk() {
    let env = Env::new();
    let (pid, socket) = start_tapdisk(&env);
    let image = env.raw_image("ro.img", 1 << 20, 3);
    let marker = env.tap_ctl_ok(&["allocate"]);
    let minor: u16 = marker.trim().rsplit('-').next().unwrap().parse().unwrap();
    let attach = decode_one(&exchange(
        &socket,
        &request(MessageType::Attach, minor, Body::Empty),
    ));
    assert_eq!(attach.msg_type, MessageType::AttachRsp, "{attach:?}");
    let params = Params {
        flags: OpenFlags::RDONLY | OpenFlags::BLOCKDEV_NONE,
        devnum: u32::from(minor),
        path: format!("aio:{}", image.display()),
        ..Params::default()
    };
    for msg_type in [MessageType::Open, MessageType::DiskInfo] {
        let body = match msg_type {
            MessageType::Open => Body::Params(params.clone()),
            _ => Body::Empty,
        };
        let reply = decode_one(&exchange(&socket, &request(msg_type, minor, body)));
        let Body::Image(info) = reply.body else {
            panic!("{msg_type:?}: {reply:?}");
        };
        assert_eq!((info.sectors, info.sector_size, info.info), (2048, 512, 0));
    }
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
    env.tap_ctl_ok(&["free", "-m", &m]);
}
