//! A fake tapdisk control server for the integration tests: listens on `ctl<pid>` in a
//! temporary control directory and answers a fixed number of connections with a closure.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;

use blktapctl::ControlDir;
use tapdisk_proto::{Body, ListEntry, Message, MessageType, MESSAGE_SIZE};

/// A pid above the kernel's maximum (`pid_max` <= 2^22), so killing it can never hit a process.
pub const IMPOSSIBLE_PID: u32 = 4_194_400;

/// A temporary control directory (removed on drop).
pub fn temp_dir() -> (tempfile::TempDir, ControlDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = ControlDir::new(tmp.path().join("ctl"));
    std::fs::create_dir_all(dir.root()).expect("mkdir control dir");
    (tmp, dir)
}

/// Serves `connections` connections on `ctl<pid>`: reads one request, then calls `handler`
/// with it and the stream (to read trailers and write replies). Returns the requests seen.
pub fn serve<F>(
    dir: &ControlDir,
    pid: u32,
    connections: usize,
    mut handler: F,
) -> JoinHandle<Vec<Message>>
where
    F: FnMut(&Message, &mut UnixStream) + Send + 'static,
{
    let listener = UnixListener::bind(dir.ctl_socket_path(pid)).expect("bind fake tapdisk");
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut buf = [0u8; MESSAGE_SIZE];
            stream.read_exact(&mut buf).expect("read request");
            let request = Message::decode(&buf).expect("decode request");
            handler(&request, &mut stream);
            seen.push(request);
        }
        seen
    })
}

/// Writes one message.
pub fn send(stream: &mut UnixStream, message: &Message) {
    stream
        .write_all(&message.encode().expect("encode reply"))
        .expect("write reply");
}

/// The plain success reply to `request` (PID gets `pid`).
pub fn success(request: &Message, pid: u32) -> Message {
    let reply_type = request.msg_type.success_reply().expect("a request");
    let body = match reply_type {
        MessageType::PidRsp => Body::Pid(i32::try_from(pid).expect("pid fits")),
        MessageType::DetachRsp => Body::Response {
            error: 0,
            message: String::new(),
        },
        MessageType::OpenRsp | MessageType::DiskInfoRsp => Body::Image(tapdisk_proto::ImageInfo {
            sectors: 2048,
            sector_size: 512,
            info: 0,
        }),
        _ => Body::Empty,
    };
    Message::new(reply_type, request.cookie, body)
}

/// A handler answering every request with [`success`].
pub fn always_ok(pid: u32) -> impl FnMut(&Message, &mut UnixStream) + Send + 'static {
    move |request, stream| send(stream, &success(request, pid))
}

/// Writes a LIST reply stream: one LIST_RSP per `(minor, state, path)`, counting down, then
/// the `count == 0` terminator.
pub fn list_reply(stream: &mut std::os::unix::net::UnixStream, entries: &[(i32, i32, &str)]) {
    let total = i32::try_from(entries.len()).expect("few");
    for (sent, (minor, state, path)) in (0..).zip(entries) {
        let entry = ListEntry {
            count: total - sent,
            minor: *minor,
            state: *state,
            path: (*path).to_owned(),
        };
        send(
            stream,
            &Message::new(MessageType::ListRsp, 0xFFFF, Body::List(entry)),
        );
    }
    let end = ListEntry {
        count: 0,
        minor: -1,
        state: 0,
        path: String::new(),
    };
    send(
        stream,
        &Message::new(MessageType::ListRsp, 0xFFFF, Body::List(end)),
    );
}
