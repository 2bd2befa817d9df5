//! The C stack's NBD sockets, through tapdisk: the old-style export `nbd-old<pid>.<minor>`
//! and the fd receivers `nbdserver-new<pid>.<minor>` / `nbdserver<pid>.<minor>` that serve a
//! client socket handed over with `SCM_RIGHTS`. All four exist while the VBD is open and are
//! gone after close.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{require, run_ok, Env};
use nbd::handover::send_stream;
use nbd::proto;

const MIB: usize = 1 << 20;

fn socket(env: &Env, prefix: &str, pid: u32, minor: u32) -> PathBuf {
    env.ctl_dir.join(format!("{prefix}{pid}.{minor}"))
}

/// Hands `client` to the fd receiver at `receiver`.
fn hand_over(receiver: &PathBuf, client: &impl AsFd) {
    let helper = UnixStream::connect(receiver).unwrap();
    send_stream(&helper, "test-datapath", client.as_fd()).unwrap();
}

/// A connected client stream (UNIX or TCP).
trait Stream: Read + Write {
    fn set_timeout(&self, timeout: Duration);
}

impl Stream for UnixStream {
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).unwrap();
    }
}

impl Stream for std::net::TcpStream {
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).unwrap();
    }
}

fn read_exact(stream: &mut impl Stream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Sends one request header.
fn request(stream: &mut impl Stream, command: u16, cookie: u64, offset: u64, length: u32) {
    let header = proto::RequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    stream.write_all(&header.encode()).unwrap();
}

/// Reads a simple reply header: (error, cookie).
fn simple_reply(stream: &mut impl Stream) -> (u32, u64) {
    let reply = read_exact(stream, proto::SIMPLE_REPLY_LEN);
    assert_eq!(reply[0..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
    (error, cookie)
}

/// Reads sector 2 of a `raw_image(.., seed)` and checks the pattern, then an out-of-range
/// read (EINVAL, no payload), then disconnects.
fn check_transmission(stream: &mut impl Stream, size: u64, seed: u8) {
    request(stream, proto::CMD_READ, 7, 1024, 512);
    assert_eq!(simple_reply(stream), (0, 7));
    assert!(read_exact(stream, 512).iter().all(|b| *b == 2 + seed));
    request(stream, proto::CMD_READ, 8, size, 512);
    assert_eq!(simple_reply(stream), (proto::EINVAL, 8));
    // The stream is still in sync: a good read after the error.
    request(stream, proto::CMD_READ, 9, 0, 512);
    assert_eq!(simple_reply(stream), (0, 9));
    assert!(read_exact(stream, 512).iter().all(|b| *b == seed));
    request(stream, proto::CMD_DISC, 10, 0, 0);
    let mut rest = Vec::new();
    stream.set_timeout(Duration::from_secs(5));
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after DISC: {rest:?}");
}

/// Old-style client: greeting with size and flags, then transmission.
fn oldstyle_client(stream: &mut impl Stream, size: u64, seed: u8) {
    let greeting = read_exact(stream, proto::OLDSTYLE_GREETING_LEN);
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    assert_eq!(greeting[8..16], proto::OLDSTYLE_MAGIC.to_be_bytes());
    assert_eq!(greeting[16..24], size.to_be_bytes());
    let flags = u32::from_be_bytes(greeting[24..28].try_into().unwrap());
    assert_ne!(flags & u32::from(proto::TFLAG_HAS_FLAGS), 0);
    assert_ne!(flags & u32::from(proto::TFLAG_SEND_FLUSH), 0);
    assert!(greeting[28..].iter().all(|b| *b == 0));
    check_transmission(stream, size, seed);
}

/// Fixed-newstyle client using `NBD_OPT_EXPORT_NAME` with `NO_ZEROES`.
fn newstyle_client(stream: &mut impl Stream, size: u64, seed: u8) {
    let greeting = read_exact(stream, proto::GREETING_LEN);
    assert_eq!(greeting, proto::server_greeting());
    let client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
    stream.write_all(&client_flags.to_be_bytes()).unwrap();
    let option = proto::OptionHeader {
        option: proto::OPT_EXPORT_NAME,
        length: 0,
    };
    stream.write_all(&option.encode()).unwrap();
    let reply = read_exact(stream, 10);
    assert_eq!(reply[0..8], size.to_be_bytes());
    check_transmission(stream, size, seed);
}

#[test]
fn all_four_sockets_exist_while_open_and_go_away_on_close() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 0);
    let (pid, minor) = env.create(&image, &[]);
    for prefix in ["nbd", "nbd-old", "nbdserver", "nbdserver-new"] {
        assert!(socket(&env, prefix, pid, minor).exists(), "{prefix} socket");
    }
    env.tap_ctl_ok(&["close", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    for prefix in ["nbd", "nbd-old", "nbdserver", "nbdserver-new"] {
        assert!(
            !socket(&env, prefix, pid, minor).exists(),
            "{prefix} socket left"
        );
    }
    env.tap_ctl_ok(&["detach", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    env.tap_ctl_ok(&["free", "-m", &minor.to_string()]);
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn old_style_socket_speaks_old_style() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 5);
    let (pid, minor) = env.create(&image, &[]);
    let mut stream = UnixStream::connect(socket(&env, "nbd-old", pid, minor)).unwrap();
    oldstyle_client(&mut stream, 4 * MIB as u64, 5);
    env.destroy(pid, minor);
}

#[test]
fn fd_receivers_serve_a_handed_over_socketpair_end() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 9);
    let (pid, minor) = env.create(&image, &[]);
    for (prefix, oldstyle) in [("nbdserver-new", false), ("nbdserver", true)] {
        let (ours, theirs) = UnixStream::pair().unwrap();
        hand_over(&socket(&env, prefix, pid, minor), &theirs);
        drop(theirs);
        let mut client = ours;
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        if oldstyle {
            oldstyle_client(&mut client, 4 * MIB as u64, 9);
        } else {
            newstyle_client(&mut client, 4 * MIB as u64, 9);
        }
    }
    // A helper that sends no descriptor is dropped; the receiver keeps working.
    let mut helper = UnixStream::connect(socket(&env, "nbdserver-new", pid, minor)).unwrap();
    helper.write_all(b"no fd here").unwrap();
    let mut rest = Vec::new();
    helper
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    helper.read_to_end(&mut rest).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    hand_over(&socket(&env, "nbdserver-new", pid, minor), &theirs);
    drop(theirs);
    let mut client = ours;
    newstyle_client(&mut client, 4 * MIB as u64, 9);
    env.destroy(pid, minor);
}

#[test]
fn fd_receiver_serves_a_handed_over_tcp_connection() {
    // Storage migration hands over the TCP connection of an HTTP request.
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 11);
    let (pid, minor) = env.create(&image, &[]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    hand_over(&socket(&env, "nbdserver-new", pid, minor), &accepted);
    drop(accepted);
    client.set_timeout(Duration::from_secs(10));
    newstyle_client(&mut client, 4 * MIB as u64, 11);
    env.destroy(pid, minor);
}

#[test]
fn qemu_io_through_handed_over_connections() {
    require("qemu-io");
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 0);
    let (pid, minor) = env.create(&image, &[]);
    for (prefix, uri_of) in [
        (
            "nbdserver-new",
            (|p: &str| format!("nbd+unix:///?socket={p}")) as fn(&str) -> String,
        ),
        ("nbdserver", |p: &str| format!("nbd:unix:{p}")),
    ] {
        // A listener standing in for xapi's HTTP handler: it accepts qemu's connection and
        // hands the accepted socket to tapdisk.
        let proxy = env.dir.path().join(format!("{prefix}-proxy.sock"));
        let listener = UnixListener::bind(&proxy).unwrap();
        let receiver = socket(&env, prefix, pid, minor);
        let handler = std::thread::spawn(move || {
            let (accepted, _) = listener.accept().unwrap();
            hand_over(&receiver, &accepted);
        });
        let uri = uri_of(proxy.to_str().unwrap());
        run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x61 64k 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x61 64k 64k",
        ]));
        handler.join().unwrap();
        let data = std::fs::read(&image).unwrap();
        assert!(data[64 * 1024..128 * 1024].iter().all(|b| *b == 0x61));
    }
    // qemu-io straight on the old-style socket.
    let old = socket(&env, "nbd-old", pid, minor);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &format!("nbd:unix:{}", old.display()),
        "-c",
        "write -P 0x62 0 4k",
        "-c",
        "read -P 0x62 0 4k",
    ]));
    env.destroy(pid, minor);
}
