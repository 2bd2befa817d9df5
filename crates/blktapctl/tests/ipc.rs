//! The control-socket client against fake in-test tapdisk servers: reply parsing, ERROR
//! replies, the LIST stream, the STATS payload, trailing payloads and timeouts.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use blktapctl::{OpenFlags, OpenRequest, ResumeRequest};
use common::{list_reply, send, serve, success, temp_dir};
use tapdisk_proto::{decode_log_path, Body, Message, MessageType, StatInfo, LOG_PATH_PAYLOAD_LEN};

#[test]
fn pid_request_returns_the_reported_pid() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 77, 1, common::always_ok(4321));
    assert_eq!(blktapctl::get_pid(&dir, 77).expect("pid"), 4321);
    let seen = server.join().expect("server");
    assert_eq!(seen[0].msg_type, MessageType::Pid);
}

#[test]
fn attach_and_detach_send_the_minor_as_cookie() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 10, 2, common::always_ok(10));
    blktapctl::attach(&dir, 10, 3).expect("attach");
    blktapctl::detach(&dir, 10, 3).expect("detach");
    let seen = server.join().expect("server");
    assert_eq!(
        seen.iter()
            .map(|m| (m.msg_type, m.cookie))
            .collect::<Vec<_>>(),
        [(MessageType::Attach, 3), (MessageType::Detach, 3)]
    );
}

#[test]
fn error_reply_becomes_its_errno() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 11, 1, |request, stream| {
        send(stream, &Message::error(request.cookie, libc::EEXIST));
    });
    let err = blktapctl::attach(&dir, 11, 4).expect_err("refused");
    assert_eq!(err.errno(), libc::EEXIST);
    assert!(err.context().contains("ATTACH"), "{err}");
    server.join().expect("server");
}

#[test]
fn error_reply_message_is_kept_in_the_context() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 13, 1, |request, stream| {
        let reply = Message::new(
            MessageType::Error,
            request.cookie,
            Body::Response {
                error: libc::EMEDIUMTYPE,
                message: "b.img has 16 sectors, the disk has 8".into(),
            },
        );
        send(stream, &reply);
    });
    let err = blktapctl::pause(&dir, 13, 2, None).expect_err("refused");
    assert_eq!(err.errno(), libc::EMEDIUMTYPE);
    assert!(
        err.context()
            .ends_with(": b.img has 16 sectors, the disk has 8"),
        "{err}"
    );
    server.join().expect("server");
}

#[test]
fn detach_rsp_with_nonzero_error_is_an_error() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 12, 1, |request, stream| {
        let reply = Message::new(
            MessageType::DetachRsp,
            request.cookie,
            Body::Response {
                error: libc::EBUSY,
                message: String::new(),
            },
        );
        send(stream, &reply);
    });
    assert_eq!(
        blktapctl::detach(&dir, 12, 0).expect_err("busy").errno(),
        libc::EBUSY
    );
    server.join().expect("server");
}

#[test]
fn unexpected_reply_type_is_eproto() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 13, 1, |request, stream| {
        send(
            stream,
            &Message::new(MessageType::PauseRsp, request.cookie, Body::Empty),
        );
    });
    assert_eq!(
        blktapctl::attach(&dir, 13, 0)
            .expect_err("wrong type")
            .errno(),
        libc::EPROTO
    );
    server.join().expect("server");
}

#[test]
fn reply_cut_short_is_econnreset() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 14, 1, |_, stream| {
        use std::io::Write;
        stream.write_all(&[0u8; 100]).expect("write");
    });
    assert_eq!(
        blktapctl::attach(&dir, 14, 0).expect_err("short").errno(),
        libc::ECONNRESET
    );
    server.join().expect("server");
}

#[test]
fn missing_socket_is_enoent() {
    let (_tmp, dir) = temp_dir();
    assert_eq!(
        blktapctl::attach(&dir, 15, 0).expect_err("nobody").errno(),
        libc::ENOENT
    );
}

#[test]
fn open_sends_params_and_returns_the_image() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 20, 1, common::always_ok(20));
    let mut req = OpenRequest::new("vhd:/srv/disk.vhd");
    req.flags = OpenFlags::RDONLY | OpenFlags::NO_O_DIRECT;
    req.request_timeout = 30;
    let image = blktapctl::open(&dir, 20, 6, &req).expect("open");
    assert_eq!((image.sectors, image.sector_size), (2048, 512));
    let seen = server.join().expect("server");
    assert_eq!(seen[0].msg_type, MessageType::Open);
    assert_eq!(seen[0].cookie, 6);
    let Body::Params(params) = &seen[0].body else {
        panic!("OPEN without params: {:?}", seen[0]);
    };
    assert_eq!(params.flags, OpenFlags::RDONLY | OpenFlags::NO_O_DIRECT);
    assert_eq!(params.devnum, 6);
    assert_eq!(params.path, "vhd:/srv/disk.vhd");
    assert_eq!(params.prt_devnum, u32::MAX);
    assert_eq!(params.req_timeout, 30);
    assert_eq!(params.secondary, "");
}

#[test]
fn open_with_log_and_key_sends_trailing_payloads() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 21, 1, |request, stream| {
        let mut log = [0u8; LOG_PATH_PAYLOAD_LEN];
        stream.read_exact(&mut log).expect("log path payload");
        assert_eq!(decode_log_path(&log).expect("log path"), "/var/log/cbt.log");
        let mut size = [0u8; 1];
        stream.read_exact(&mut size).expect("key size");
        let mut key = vec![0u8; usize::from(size[0])];
        stream.read_exact(&mut key).expect("key");
        assert_eq!(key, vec![0xab; 32]);
        send(stream, &success(request, 21));
    });
    let mut req = OpenRequest::new("vhd:/x.vhd");
    req.log_path = Some("/var/log/cbt.log".to_owned());
    req.encryption_key = Some(std::sync::Arc::new(
        secret::Key::from_slice(&[0xab; 32]).expect("key"),
    ));
    req.parent_minor = Some(2);
    req.secondary = Some("vhd:/mirror.vhd".to_owned());
    blktapctl::open(&dir, 21, 1, &req).expect("open");
    let seen = server.join().expect("server");
    let Body::Params(params) = &seen[0].body else {
        panic!("OPEN without params");
    };
    assert_eq!(
        params.flags,
        OpenFlags::ADD_LOG
            | OpenFlags::OPEN_ENCRYPTED
            | OpenFlags::REUSE_PRT
            | OpenFlags::SECONDARY
    );
    assert_eq!(params.prt_devnum, 2);
    assert_eq!(params.secondary, "vhd:/mirror.vhd");
}

#[test]
fn close_force_sends_force_shutdown_and_unpause_sends_resume() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 22, 4, common::always_ok(22));
    blktapctl::close(&dir, 22, 1, false, None).expect("close");
    blktapctl::close(&dir, 22, 1, true, Some(Duration::from_secs(5))).expect("force close");
    blktapctl::pause(&dir, 22, 1, None).expect("pause");
    let resume = ResumeRequest {
        params: Some("aio:/new.img".to_owned()),
        ..ResumeRequest::default()
    };
    blktapctl::unpause(&dir, 22, 1, &resume).expect("unpause");
    let seen = server.join().expect("server");
    let types: Vec<MessageType> = seen.iter().map(|m| m.msg_type).collect();
    assert_eq!(
        types,
        [
            MessageType::Close,
            MessageType::ForceShutdown,
            MessageType::Pause,
            MessageType::Resume
        ]
    );
    let Body::Params(params) = &seen[3].body else {
        panic!("RESUME without params");
    };
    assert_eq!(params.path, "aio:/new.img");
    // As the C tap-ctl sends it (a zeroed message): no parent devnum.
    assert_eq!(params.prt_devnum, 0);
}

#[test]
fn info_returns_disk_info() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 23, 1, common::always_ok(23));
    let image = blktapctl::info(&dir, 23, 9).expect("info");
    assert_eq!(image.sectors, 2048);
    assert_eq!(
        server.join().expect("server")[0].msg_type,
        MessageType::DiskInfo
    );
}

#[test]
fn list_stream_is_read_until_count_zero() {
    let (_tmp, dir) = temp_dir();
    let server = serve(&dir, 30, 1, |_, stream| {
        list_reply(stream, &[(0, 0, "vhd:/a.vhd"), (1, 0x2a, "")]);
    });
    let vbds = blktapctl::list_vbds(&dir, 30).expect("list");
    assert_eq!(vbds.len(), 2);
    assert_eq!((vbds[0].minor, vbds[0].params.as_str()), (0, "vhd:/a.vhd"));
    assert_eq!((vbds[1].minor, vbds[1].state), (1, 0x2a));
    assert_eq!(server.join().expect("server")[0].cookie, 0xFFFF);
}

#[test]
fn stats_reads_the_announced_text() {
    let (_tmp, dir) = temp_dir();
    let text = r#"{ "name": "vhd:/a.vhd", "secs": [ 0, 0 ] }"#;
    let server = serve(&dir, 31, 1, move |request, stream| {
        use std::io::Write;
        let header = StatInfo {
            msg_type: MessageType::StatsRsp.as_u16(),
            cookie: request.cookie,
            length: u64::try_from(text.len()).expect("fits"),
        };
        send(
            stream,
            &Message::new(MessageType::StatsRsp, request.cookie, Body::Stat(header)),
        );
        stream.write_all(text.as_bytes()).expect("write text");
    });
    assert_eq!(blktapctl::stats(&dir, 31, Some(2)).expect("stats"), text);
    assert_eq!(server.join().expect("server")[0].cookie, 2);
}

#[test]
fn silent_tapdisk_times_out() {
    let (_tmp, dir) = temp_dir();
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let server = serve(&dir, 40, 1, move |_, _| {
        // Hold the connection open without answering until the client gave up.
        let _ = wait.recv_timeout(Duration::from_secs(10));
    });
    let started = Instant::now();
    let err = blktapctl::pause(&dir, 40, 0, Some(Duration::from_millis(300))).expect_err("timeout");
    assert_eq!(err.errno(), libc::ETIMEDOUT);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    release.send(()).expect("release server");
    server.join().expect("server");
}

#[test]
fn out_of_range_minor_is_einval_without_contacting_anyone() {
    let (_tmp, dir) = temp_dir();
    assert_eq!(
        blktapctl::attach(&dir, 1, 16384)
            .expect_err("range")
            .errno(),
        libc::EINVAL
    );
}

#[test]
fn connect_to_a_saturated_listener_times_out() {
    use rustix::net::{bind, listen, socket, AddressFamily, SocketAddrUnix, SocketType};
    let (_tmp, dir) = temp_dir();
    let path = dir.ctl_socket_path(41);
    // A listener with the smallest backlog that never accepts.
    let listener = socket(AddressFamily::UNIX, SocketType::STREAM, None).expect("socket");
    bind(&listener, &SocketAddrUnix::new(&path).expect("addr")).expect("bind");
    listen(&listener, 0).expect("listen");
    // Fill the backlog; further connects would block forever without a bounded connect.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .expect("socket");
        if rustix::net::connect(&fd, &SocketAddrUnix::new(&path).expect("addr")).is_ok() {
            fillers.push(fd);
        }
    }
    assert!(!fillers.is_empty(), "backlog never accepted a connection");
    let started = Instant::now();
    let err = blktapctl::pause(&dir, 41, 0, Some(Duration::from_millis(300))).expect_err("timeout");
    assert_eq!(err.errno(), libc::ETIMEDOUT, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
