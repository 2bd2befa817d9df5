//! Raw-socket tests: a hand-written client speaks bytes to the server to check the
//! handshake, every bad-input rule, concurrency and shutdown behaviour exactly.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::MemExport;
use nbd::proto::{self, RequestHeader};
use nbd::{NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const WAIT: Duration = Duration::from_secs(5);

struct Server {
    server: NbdServer,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Server {
    fn start(export: Arc<MemExport>, config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = NbdServer::start(listener, export, config);
        Self {
            server,
            _dir: dir,
            socket,
        }
    }

    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).await.unwrap()
    }

    async fn stop(self) {
        tokio::time::timeout(WAIT, self.server.shutdown())
            .await
            .expect("shutdown completes");
    }
}

fn config() -> ServerConfig {
    ServerConfig {
        export_name: "disk".into(),
        handshake_timeout: Duration::from_secs(10),
        max_requests_in_flight: 16,
        ..ServerConfig::default()
    }
}

async fn read_n(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .expect("reply in time")
        .expect("read reply");
    buf
}

/// Wait for the server to close the stream; returns the bytes it sent first.
async fn expect_closed(stream: &mut UnixStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => rest,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionReset => rest,
        Ok(Err(error)) => panic!("unexpected read error {error}"),
        Err(_) => panic!("server did not close the connection"),
    }
}

/// Greeting + client flags; returns the stream ready for options.
async fn greet(stream: &mut UnixStream, client_flags: u32) {
    let greeting = read_n(stream, 18).await;
    assert_eq!(greeting, proto::server_greeting());
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(&greeting[16..], &[0, 3]);
    stream.write_all(&client_flags.to_be_bytes()).await.unwrap();
}

async fn send_option(stream: &mut UnixStream, option: u32, data: &[u8]) {
    let header = proto::OptionHeader {
        option,
        length: u32::try_from(data.len()).unwrap(),
    };
    stream.write_all(&header.encode()).await.unwrap();
    stream.write_all(data).await.unwrap();
}

/// Read one option reply: (option, type, data).
async fn read_option_reply(stream: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let head = read_n(stream, 20).await;
    assert_eq!(
        u64::from_be_bytes(head[0..8].try_into().unwrap()),
        proto::OPTION_REPLY_MAGIC
    );
    let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let data = read_n(stream, len).await;
    (option, kind, data)
}

fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
async fn negotiate(stream: &mut UnixStream, structured: bool, base_allocation: bool) -> (u64, u16) {
    greet(stream, 3).await;
    if structured {
        send_option(stream, proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_option_reply(stream).await.1, proto::REP_ACK);
    }
    if base_allocation {
        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&15u32.to_be_bytes());
        data.extend_from_slice(b"base:allocation");
        send_option(stream, proto::OPT_SET_META_CONTEXT, &data).await;
        let (_, kind, data) = read_option_reply(stream).await;
        assert_eq!(kind, proto::REP_META_CONTEXT);
        assert_eq!(&data[4..], b"base:allocation");
        assert_eq!(read_option_reply(stream).await.1, proto::REP_ACK);
    }
    send_option(stream, proto::OPT_GO, &go_data("", &[])).await;
    let mut size_flags = None;
    loop {
        let (option, kind, data) = read_option_reply(stream).await;
        assert_eq!(option, proto::OPT_GO);
        if kind == proto::REP_ACK {
            break;
        }
        assert_eq!(kind, proto::REP_INFO);
        if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT {
            size_flags = Some((
                u64::from_be_bytes(data[2..10].try_into().unwrap()),
                u16::from_be_bytes([data[10], data[11]]),
            ));
        }
    }
    size_flags.expect("NBD_INFO_EXPORT sent")
}

async fn send_request(
    stream: &mut UnixStream,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) {
    let header = RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    };
    stream.write_all(&header.encode()).await.unwrap();
}

/// Read a simple reply header: (error, cookie).
async fn read_simple(stream: &mut UnixStream) -> (u32, u64) {
    let reply = read_n(stream, 16).await;
    assert_eq!(
        u32::from_be_bytes(reply[0..4].try_into().unwrap()),
        proto::SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        u64::from_be_bytes(reply[8..16].try_into().unwrap()),
    )
}

/// Read a structured chunk: (flags, type, cookie, payload).
async fn read_chunk(stream: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let head = read_n(stream, 20).await;
    assert_eq!(
        u32::from_be_bytes(head[0..4].try_into().unwrap()),
        proto::STRUCTURED_REPLY_MAGIC
    );
    let flags = u16::from_be_bytes([head[4], head[5]]);
    let kind = u16::from_be_bytes([head[6], head[7]]);
    let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    (flags, kind, cookie, read_n(stream, len).await)
}

async fn disconnect_and_expect_nothing_more(stream: &mut UnixStream) {
    send_request(stream, proto::CMD_DISC, 0, 0, 0, 0).await;
    let rest = expect_closed(stream).await;
    assert!(
        rest.is_empty(),
        "unexpected bytes after the last reply: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_then_read_write_flush() {
    let export = Arc::new(MemExport::new(1 << 20));
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    let (size, flags) = negotiate(&mut stream, false, false).await;
    assert_eq!(size, 1 << 20);
    let expected = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES
        | proto::TFLAG_SEND_FAST_ZERO
        | proto::TFLAG_SEND_CACHE
        | proto::TFLAG_CAN_MULTI_CONN;
    assert_eq!(flags, expected);

    send_request(
        &mut stream,
        proto::CMD_WRITE,
        proto::CMD_FLAG_FUA,
        7,
        4096,
        5,
    )
    .await;
    stream.write_all(b"hello").await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (0, 7));
    send_request(&mut stream, proto::CMD_READ, 0, 8, 4094, 9).await;
    assert_eq!(read_simple(&mut stream).await, (0, 8));
    assert_eq!(read_n(&mut stream, 9).await, b"\0\0hello\0\0");
    send_request(&mut stream, proto::CMD_FLUSH, 0, 9, 0, 0).await;
    assert_eq!(read_simple(&mut stream).await, (0, 9));
    // Zero-length read and write are fine and carry no payload.
    send_request(&mut stream, proto::CMD_READ, 0, 10, 0, 0).await;
    assert_eq!(read_simple(&mut stream).await, (0, 10));
    send_request(&mut stream, proto::CMD_WRITE, 0, 11, 100, 0).await;
    assert_eq!(read_simple(&mut stream).await, (0, 11));
    disconnect_and_expect_nothing_more(&mut stream).await;
    assert_eq!(&export.snapshot()[4096..4101], b"hello");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_connection() {
    let server = Server::start(Arc::new(MemExport::new(1 << 20)), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    let mut header = RequestHeader {
        flags: 0,
        command: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    header[0] ^= 0xff;
    stream.write_all(&header).await.unwrap();
    let rest = expect_closed(&mut stream).await;
    assert!(rest.is_empty(), "no reply to a request with a bad magic");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_read_gets_exactly_one_error_reply() {
    let server = Server::start(Arc::new(MemExport::new(1 << 20)), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(
        &mut stream,
        proto::CMD_READ,
        0,
        0xfeed,
        (1 << 20) - 512,
        1024,
    )
    .await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 0xfeed));
    // Offset overflow.
    send_request(&mut stream, proto::CMD_READ, 0, 2, u64::MAX - 10, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 2));
    // Read larger than max_block (32 MiB) is EINVAL, no payload.
    send_request(&mut stream, proto::CMD_READ, 0, 3, 0, 64 << 20).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 3));
    disconnect_and_expect_nothing_more(&mut stream).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_writes_consume_their_payload() {
    let export = Arc::new(MemExport::new(1 << 20));
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    // Past the end: ENOSPC, payload skipped.
    send_request(&mut stream, proto::CMD_WRITE, 0, 1, (1 << 20) - 100, 4096).await;
    stream.write_all(&[0x55; 4096]).await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (proto::ENOSPC, 1));
    // Unknown flag on a write: EINVAL, payload skipped.
    send_request(&mut stream, proto::CMD_WRITE, 0x8000, 2, 0, 100).await;
    stream.write_all(&[0x66; 100]).await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 2));
    // The stream is still in sync.
    send_request(&mut stream, proto::CMD_WRITE, 0, 3, 0, 4).await;
    stream.write_all(b"sync").await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (0, 3));
    disconnect_and_expect_nothing_more(&mut stream).await;
    let data = export.snapshot();
    assert_eq!(&data[..4], b"sync");
    assert!(
        data[4..].iter().all(|&b| b == 0),
        "rejected payloads must not be written"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_above_advertised_max_block_get_einval() {
    let export = Arc::new(MemExport::new(8 << 20).with_info(|info| info.max_block = 64 * 1024));
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(&mut stream, proto::CMD_WRITE, 0, 1, 0, 1 << 20).await;
    stream.write_all(&vec![0x77; 1 << 20]).await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 1));
    send_request(&mut stream, proto::CMD_READ, 0, 2, 0, 128 * 1024).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 2));
    send_request(&mut stream, proto::CMD_READ, 0, 3, 0, 64 * 1024).await;
    assert_eq!(read_simple(&mut stream).await, (0, 3));
    assert_eq!(read_n(&mut stream, 64 * 1024).await, vec![0; 64 * 1024]);
    disconnect_and_expect_nothing_more(&mut stream).await;
    assert!(export.snapshot().iter().all(|&b| b == 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let export = Arc::new(MemExport::new(1 << 20).with_info(|info| info.read_only = true));
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    let (_, flags) = negotiate(&mut stream, false, false).await;
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES),
        0
    );
    send_request(&mut stream, proto::CMD_WRITE, 0, 1, 0, 512).await;
    stream.write_all(&[1; 512]).await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (proto::EPERM, 1));
    send_request(&mut stream, proto::CMD_TRIM, 0, 2, 0, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EPERM, 2));
    send_request(&mut stream, proto::CMD_READ, 0, 3, 0, 4).await;
    assert_eq!(read_simple(&mut stream).await, (0, 3));
    assert_eq!(read_n(&mut stream, 4).await, vec![0; 4]);
    disconnect_and_expect_nothing_more(&mut stream).await;
    assert!(export.snapshot().iter().all(|&b| b == 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnegotiated_flags_and_unknown_commands_get_einval() {
    let export = Arc::new(MemExport::new(1 << 20).with_info(|info| {
        info.can_flush = false;
        info.can_trim = false;
        info.can_cache = false;
    }));
    let server = Server::start(export, config());
    let mut stream = server.connect().await;
    let (_, flags) = negotiate(&mut stream, false, false).await;
    assert_eq!(flags & (proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_FLUSH), 0);
    // FUA without SEND_FUA.
    send_request(&mut stream, proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 0, 8).await;
    stream.write_all(&[9; 8]).await.unwrap();
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 1));
    send_request(&mut stream, proto::CMD_FLUSH, 0, 2, 0, 0).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 2));
    send_request(&mut stream, proto::CMD_TRIM, 0, 3, 0, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 3));
    send_request(&mut stream, proto::CMD_CACHE, 0, 4, 0, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 4));
    send_request(&mut stream, 42, 0, 5, 0, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 5));
    // DF needs structured replies.
    send_request(&mut stream, proto::CMD_READ, proto::CMD_FLAG_DF, 6, 0, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 6));
    // BLOCK_STATUS without a metadata context.
    send_request(&mut stream, proto::CMD_BLOCK_STATUS, 0, 7, 0, 512).await;
    assert_eq!(read_simple(&mut stream).await, (proto::EINVAL, 7));
    disconnect_and_expect_nothing_more(&mut stream).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_disconnects() {
    let server = Server::start(Arc::new(MemExport::new(64 << 20)), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(&mut stream, proto::CMD_WRITE, 0, 1, 0, (32 << 20) + 1).await;
    let rest = expect_closed(&mut stream).await;
    assert!(
        rest.is_empty(),
        "no reply to a write that cannot be skipped"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_garbage_closes() {
    let server = Server::start(Arc::new(MemExport::new(1 << 20)), config());
    // Unknown client flags.
    let mut stream = server.connect().await;
    greet(&mut stream, 0x8000_0003).await;
    assert!(expect_closed(&mut stream).await.is_empty());
    // Garbage instead of an option header.
    let mut stream = server.connect().await;
    greet(&mut stream, 3).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(expect_closed(&mut stream).await.is_empty());
    // Oversized option length.
    let mut stream = server.connect().await;
    greet(&mut stream, 3).await;
    let header = proto::OptionHeader {
        option: proto::OPT_GO,
        length: 1 << 20,
    };
    stream.write_all(&header.encode()).await.unwrap();
    assert!(expect_closed(&mut stream).await.is_empty());
    // Export name that is not a valid string: EXPORT_NAME cannot error, so it closes.
    let mut stream = server.connect().await;
    greet(&mut stream, 3).await;
    send_option(&mut stream, proto::OPT_EXPORT_NAME, b"a\0b").await;
    assert!(expect_closed(&mut stream).await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_stall_is_dropped_after_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..config()
    };
    let server = Server::start(Arc::new(MemExport::new(1 << 20)), config);
    let mut stream = server.connect().await;
    let start = Instant::now();
    greet(&mut stream, 3).await;
    // Half an option header, then nothing.
    stream
        .write_all(&proto::IHAVEOPT.to_be_bytes())
        .await
        .unwrap();
    assert!(expect_closed(&mut stream).await.is_empty());
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250),
        "dropped too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "dropped too late: {elapsed:?}"
    );
    // A silent client (no flags at all) is dropped too.
    let mut stream = server.connect().await;
    read_n(&mut stream, 18).await;
    assert!(expect_closed(&mut stream).await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_phase_replies() {
    let server = Server::start(Arc::new(MemExport::new(123_456)), config());
    let mut stream = server.connect().await;
    greet(&mut stream, 3).await;
    // Unknown option: ERR_UNSUP, negotiation continues.
    send_option(&mut stream, 4242, b"whatever").await;
    assert_eq!(
        read_option_reply(&mut stream).await,
        (4242, proto::REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    send_option(&mut stream, proto::OPT_STARTTLS, &[]).await;
    assert_eq!(read_option_reply(&mut stream).await.1, proto::REP_ERR_UNSUP);
    // LIST: one SERVER reply then ACK.
    send_option(&mut stream, proto::OPT_LIST, &[]).await;
    let (_, kind, data) = read_option_reply(&mut stream).await;
    assert_eq!(kind, proto::REP_SERVER);
    assert_eq!(data, b"\0\0\0\x04disk");
    assert_eq!(
        read_option_reply(&mut stream).await,
        (proto::OPT_LIST, proto::REP_ACK, vec![])
    );
    // LIST with data is invalid.
    send_option(&mut stream, proto::OPT_LIST, b"x").await;
    assert_eq!(
        read_option_reply(&mut stream).await.1,
        proto::REP_ERR_INVALID
    );
    // Meta context before structured replies: invalid.
    send_option(
        &mut stream,
        proto::OPT_LIST_META_CONTEXT,
        &[0, 0, 0, 0, 0, 0, 0, 0],
    )
    .await;
    assert_eq!(
        read_option_reply(&mut stream).await.1,
        proto::REP_ERR_INVALID
    );
    // INFO with name and description requested.
    send_option(
        &mut stream,
        proto::OPT_INFO,
        &go_data(
            "x",
            &[
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_BLOCK_SIZE,
            ],
        ),
    )
    .await;
    let mut kinds = Vec::new();
    loop {
        let (option, kind, data) = read_option_reply(&mut stream).await;
        assert_eq!(option, proto::OPT_INFO);
        if kind == proto::REP_ACK {
            break;
        }
        let info = u16::from_be_bytes([data[0], data[1]]);
        match info {
            proto::INFO_EXPORT => assert_eq!(&data[2..10], &123_456u64.to_be_bytes()),
            proto::INFO_NAME => assert_eq!(&data[2..], b"x"),
            proto::INFO_DESCRIPTION => assert_eq!(&data[2..], b"in-memory test disk"),
            proto::INFO_BLOCK_SIZE => {
                assert_eq!(&data[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0])
            }
            other => panic!("unexpected info {other}"),
        }
        kinds.push(info);
    }
    assert_eq!(kinds, vec![0, 1, 2, 3]);
    // Malformed INFO: invalid, continue.
    send_option(&mut stream, proto::OPT_INFO, &[0, 0, 0, 9, b'a']).await;
    assert_eq!(
        read_option_reply(&mut stream).await.1,
        proto::REP_ERR_INVALID
    );
    // ABORT: ACK then close.
    send_option(&mut stream, proto::OPT_ABORT, &[]).await;
    assert_eq!(
        read_option_reply(&mut stream).await,
        (proto::OPT_ABORT, proto::REP_ACK, vec![])
    );
    assert!(expect_closed(&mut stream).await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_zeroes() {
    let server = Server::start(Arc::new(MemExport::new(4096)), config());
    for (client_flags, expected_len) in [(3u32, 10usize), (1, 134), (0, 134)] {
        let mut stream = server.connect().await;
        greet(&mut stream, client_flags).await;
        send_option(&mut stream, proto::OPT_EXPORT_NAME, b"anything").await;
        let reply = read_n(&mut stream, expected_len).await;
        assert_eq!(&reply[..8], &4096u64.to_be_bytes());
        assert!(reply[10..].iter().all(|&b| b == 0));
        send_request(&mut stream, proto::CMD_READ, 0, 5, 0, 16).await;
        assert_eq!(read_simple(&mut stream).await, (0, 5));
        read_n(&mut stream, 16).await;
        disconnect_and_expect_nothing_more(&mut stream).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_write_does_not_delay_other_connections() {
    let export = Arc::new(MemExport::new(4 << 20));
    let server = Server::start(Arc::clone(&export), config());
    let mut slow = server.connect().await;
    negotiate(&mut slow, false, false).await;
    send_request(&mut slow, proto::CMD_WRITE, 0, 1, 0, 1 << 20).await;
    slow.write_all(&[0xaa; 4096]).await.unwrap();

    let start = Instant::now();
    let mut fast = server.connect().await;
    negotiate(&mut fast, false, false).await;
    for cookie in 0..50u64 {
        send_request(&mut fast, proto::CMD_WRITE, 0, cookie, cookie * 512, 512).await;
        fast.write_all(&[0x11; 512]).await.unwrap();
        assert_eq!(read_simple(&mut fast).await, (0, cookie));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "second connection was delayed"
    );
    assert_eq!(server.server.connections(), 2);
    disconnect_and_expect_nothing_more(&mut fast).await;
    // The slow client vanishes mid-payload: nothing is written, nothing breaks.
    drop(slow);
    let deadline = Instant::now() + WAIT;
    while server.server.connections() > 0 {
        assert!(Instant::now() < deadline, "connections did not go away");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let data = export.snapshot();
    assert!(data[..50 * 512].iter().all(|&b| b == 0x11));
    assert!(
        data[50 * 512..].iter().all(|&b| b == 0),
        "partial write must not land"
    );
    server.stop().await;
}

fn stalling_export() -> Arc<MemExport> {
    let mut export = MemExport::new(1 << 20);
    export.stall_read_at = Some(65536);
    Arc::new(export)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_in_completion_order() {
    let export = stalling_export();
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(&mut stream, proto::CMD_READ, 0, 100, 65536, 512).await;
    for cookie in 1..=20u64 {
        send_request(&mut stream, proto::CMD_READ, 0, cookie, 0, 512).await;
    }
    // The quick reads finish (in any order) while the first one is stuck.
    let mut cookies = Vec::new();
    for _ in 1..=20u64 {
        let (error, cookie) = read_simple(&mut stream).await;
        assert_eq!(error, 0);
        read_n(&mut stream, 512).await;
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (1..=20).collect::<Vec<u64>>());
    export.release.notify_one();
    assert_eq!(read_simple(&mut stream).await, (0, 100));
    read_n(&mut stream, 512).await;
    disconnect_and_expect_nothing_more(&mut stream).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_waits_for_in_flight_requests() {
    let export = stalling_export();
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(&mut stream, proto::CMD_READ, 0, 77, 65536, 1000).await;
    send_request(&mut stream, proto::CMD_DISC, 0, 0, 0, 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    export.release.notify_one();
    let rest = expect_closed(&mut stream).await;
    assert_eq!(
        rest.len(),
        16 + 1000,
        "the in-flight read is answered before closing"
    );
    assert_eq!(&rest[8..16], &77u64.to_be_bytes());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_abandons_in_flight_requests() {
    let export = stalling_export();
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(&mut stream, proto::CMD_READ, 0, 1, 65536, 512).await;
    // A second connection still in the handshake.
    let mut idle = server.connect().await;
    read_n(&mut idle, 18).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.server.connections(), 2);
    server.stop().await;
    assert!(expect_closed(&mut stream).await.is_empty());
    assert!(expect_closed(&mut idle).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_limits_reading() {
    let export = stalling_export();
    let config = ServerConfig {
        max_requests_in_flight: 2,
        ..config()
    };
    let server = Server::start(Arc::clone(&export), config);
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    // Two stalled reads fill the connection; the third is not read until one finishes.
    send_request(&mut stream, proto::CMD_READ, 0, 1, 65536, 512).await;
    send_request(&mut stream, proto::CMD_READ, 0, 2, 65536, 512).await;
    send_request(&mut stream, proto::CMD_READ, 0, 3, 0, 512).await;
    let mut probe = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut probe)).await;
    assert!(early.is_err(), "third request must wait for a free slot");
    export.release.notify_waiters();
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (error, cookie) = read_simple(&mut stream).await;
        assert_eq!(error, 0);
        read_n(&mut stream, 512).await;
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, vec![1, 2, 3]);
    disconnect_and_expect_nothing_more(&mut stream).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_holes_errors_and_block_status() {
    let export = Arc::new(MemExport::new(1 << 20));
    export.data.lock().unwrap()[8192..12288].fill(0x5a);
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    let (_, flags) = negotiate(&mut stream, true, true).await;
    assert_ne!(flags & proto::TFLAG_SEND_DF, 0);

    // Read 0..16 KiB: hole 0..8K, data 8K..12K, hole 12K..16K.
    send_request(&mut stream, proto::CMD_READ, 0, 1, 0, 16384).await;
    let (f, kind, cookie, payload) = read_chunk(&mut stream).await;
    assert_eq!((f, kind, cookie), (0, proto::REPLY_TYPE_OFFSET_HOLE, 1));
    assert_eq!(
        payload,
        [0u64.to_be_bytes().as_slice(), &8192u32.to_be_bytes()].concat()
    );
    let (f, kind, _, payload) = read_chunk(&mut stream).await;
    assert_eq!((f, kind), (0, proto::REPLY_TYPE_OFFSET_DATA));
    assert_eq!(&payload[..8], &8192u64.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0x5a) && payload.len() == 8 + 4096);
    let (f, kind, _, payload) = read_chunk(&mut stream).await;
    assert_eq!(
        (f, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE)
    );
    assert_eq!(
        payload,
        [12288u64.to_be_bytes().as_slice(), &4096u32.to_be_bytes()].concat()
    );

    // DF: one data chunk.
    send_request(
        &mut stream,
        proto::CMD_READ,
        proto::CMD_FLAG_DF,
        2,
        0,
        16384,
    )
    .await;
    let (f, kind, _, payload) = read_chunk(&mut stream).await;
    assert_eq!(
        (f, kind, payload.len()),
        (
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            8 + 16384
        )
    );

    // Zero-length read: a NONE chunk.
    send_request(&mut stream, proto::CMD_READ, 0, 3, 0, 0).await;
    let (f, kind, _, payload) = read_chunk(&mut stream).await;
    assert_eq!(
        (f, kind, payload.len()),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0)
    );

    // Out of range read: an ERROR chunk, nothing else.
    send_request(&mut stream, proto::CMD_READ, 0, 4, 1 << 20, 512).await;
    let (f, kind, cookie, payload) = read_chunk(&mut stream).await;
    assert_eq!(
        (f, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 4)
    );
    assert_eq!(&payload[..4], &proto::EINVAL.to_be_bytes());
    let message_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert_eq!(payload.len(), 6 + message_len);

    // Block status: data 0..64K (written), hole after.
    send_request(&mut stream, proto::CMD_BLOCK_STATUS, 0, 5, 0, 1 << 20).await;
    let (f, kind, _, payload) = read_chunk(&mut stream).await;
    assert_eq!(
        (f, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS)
    );
    let mut expected = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (len, state) in [(65536u32, 0u32), ((1 << 20) - 65536, 3)] {
        expected.extend_from_slice(&len.to_be_bytes());
        expected.extend_from_slice(&state.to_be_bytes());
    }
    assert_eq!(payload, expected);
    // REQ_ONE: one descriptor.
    send_request(
        &mut stream,
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        6,
        0,
        1 << 20,
    )
    .await;
    let (_, _, _, payload) = read_chunk(&mut stream).await;
    assert_eq!(payload.len(), 4 + 8);

    // Non-read success stays a simple reply.
    send_request(
        &mut stream,
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_NO_HOLE,
        7,
        8192,
        4096,
    )
    .await;
    assert_eq!(read_simple(&mut stream).await, (0, 7));
    send_request(&mut stream, proto::CMD_CACHE, 0, 8, 0, 4096).await;
    assert_eq!(read_simple(&mut stream).await, (0, 8));
    disconnect_and_expect_nothing_more(&mut stream).await;
    assert!(export.snapshot().iter().all(|&b| b == 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stream_over_a_socket_pair() {
    let export = Arc::new(MemExport::new(8192));
    let server = NbdServer::without_listener(Arc::clone(&export), config());
    let (mut client, served) = UnixStream::pair().unwrap();
    server.serve_stream(served);
    negotiate(&mut client, false, false).await;
    send_request(&mut client, proto::CMD_WRITE, 0, 1, 0, 3).await;
    client.write_all(b"abc").await.unwrap();
    assert_eq!(read_simple(&mut client).await, (0, 1));
    disconnect_and_expect_nothing_more(&mut client).await;
    assert_eq!(&export.snapshot()[..3], b"abc");
    tokio::time::timeout(WAIT, server.shutdown()).await.unwrap();
}

/// Replies held back while the client still has unread ones (gathering, on by default for
/// UNIX sockets) all arrive, even when the client stops asking and reads slowly, and they
/// are the same replies as without gathering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_replies_reach_a_slow_client_unchanged() {
    const REQUESTS: u64 = 48;
    let mut answers = Vec::new();
    for gather_replies in [true, false] {
        let export = Arc::new(MemExport::new(1 << 20));
        for (i, byte) in export.data.lock().unwrap().iter_mut().enumerate() {
            *byte = u8::try_from(i % 251).unwrap() + 1;
        }
        let config = ServerConfig {
            gather_replies,
            max_requests_in_flight: 64,
            ..config()
        };
        let server = Server::start(Arc::clone(&export), config);
        let mut stream = server.connect().await;
        negotiate(&mut stream, true, false).await;
        // One burst of reads with a few flushes among them, then nothing more until every
        // reply is in: a held reply can only go out because the client read the others.
        let mut burst = Vec::new();
        for cookie in 0..REQUESTS {
            let header = if cookie % 8 == 7 {
                RequestHeader {
                    flags: 0,
                    command: proto::CMD_FLUSH,
                    cookie,
                    offset: 0,
                    length: 0,
                }
            } else {
                RequestHeader {
                    flags: 0,
                    command: proto::CMD_READ,
                    cookie,
                    offset: cookie * 8192,
                    length: 4096,
                }
            };
            burst.extend_from_slice(&header.encode());
        }
        stream.write_all(&burst).await.unwrap();
        // Flushes are answered with simple replies, reads with one data chunk each.
        let mut replies = Vec::new();
        for index in 0..REQUESTS {
            if index % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let magic = read_n(&mut stream, 4).await;
            if magic == proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
                let rest = read_n(&mut stream, 12).await;
                assert_eq!(rest[..4], [0; 4], "flush succeeded");
                let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                replies.push((cookie, None));
            } else {
                assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
                let head = read_n(&mut stream, 16).await;
                assert_eq!(
                    u16::from_be_bytes([head[0], head[1]]),
                    proto::REPLY_FLAG_DONE
                );
                assert_eq!(
                    u16::from_be_bytes([head[2], head[3]]),
                    proto::REPLY_TYPE_OFFSET_DATA
                );
                let cookie = u64::from_be_bytes(head[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
                let payload = read_n(&mut stream, usize::try_from(len).unwrap()).await;
                replies.push((cookie, Some(payload)));
            }
        }
        disconnect_and_expect_nothing_more(&mut stream).await;
        server.stop().await;
        replies.sort_by_key(|reply| reply.0);
        let data = export.snapshot();
        for (cookie, payload) in &replies {
            match payload {
                None => assert_eq!(cookie % 8, 7, "cookie {cookie} is a flush"),
                Some(payload) => {
                    let offset = cookie * 8192;
                    assert_eq!(payload[..8], offset.to_be_bytes());
                    let start = usize::try_from(offset).unwrap();
                    assert!(payload[8..] == data[start..start + 4096], "cookie {cookie}");
                }
            }
        }
        let cookies: Vec<u64> = replies.iter().map(|reply| reply.0).collect();
        assert_eq!(cookies, (0..REQUESTS).collect::<Vec<_>>());
        answers.push(replies);
    }
    assert_eq!(answers[0], answers[1]);
}

/// A reply held back because the client still had replies unread goes out as soon as the
/// client reads them, although it sends nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_reply_goes_out_when_the_client_reads() {
    let export = stalling_export();
    let server = Server::start(Arc::clone(&export), config());
    let mut stream = server.connect().await;
    negotiate(&mut stream, false, false).await;
    send_request(&mut stream, proto::CMD_READ, 0, 100, 65536, 4096).await;
    // Two bursts of quick reads, answered as two messages the client leaves unread: more
    // than the last message, so when the stuck read finishes its reply waits for company,
    // and only the client's reading can release it.
    for burst in 0..2u64 {
        for cookie in 1..=8u64 {
            send_request(&mut stream, proto::CMD_READ, 0, burst * 8 + cookie, 0, 4096).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    export.release.notify_one();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 1..=16u64 {
        assert_eq!(read_simple(&mut stream).await.0, 0);
        read_n(&mut stream, 4096).await;
    }
    assert_eq!(read_simple(&mut stream).await, (0, 100));
    read_n(&mut stream, 4096).await;
    disconnect_and_expect_nothing_more(&mut stream).await;
    server.stop().await;
}
