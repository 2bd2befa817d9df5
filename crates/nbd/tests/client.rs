//! The NBD client against real servers: this crate's server (newstyle with structured
//! replies, old style, EXPORT_NAME only), qemu-nbd and nbdkit; and against a server that
//! stops answering (the request deadline breaks the connection) or is slow (the bounded
//! queue refuses with EBUSY).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{have_tool, Harness, MemExport};
use nbd::client::{Client, ClientConfig, ClientError, HandshakeStyle};
use nbd::handover::ReceivedStream;
use nbd::{Handshake, ServerConfig};

const SIZE: usize = 4 << 20;

async fn connect(socket: &Path, config: &ClientConfig) -> Result<Client<Vec<u8>>, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    Client::connect(ReceivedStream::Unix(stream), config).await
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 251)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

/// Writes, reads back (also across the server's request limit), zeroes and flushes.
async fn exercise(client: &Client<Vec<u8>>) {
    let data = pattern(64 * 1024, 7);
    client.write(4096, &data).await.unwrap();
    let back = client.read(4096, vec![0; data.len()]).await.unwrap();
    assert_eq!(back, data);
    // Many in flight at once.
    let writes = (0..64u64).map(|i| {
        let data = pattern(4096, u8::try_from(i).unwrap());
        async move {
            client.write((1 << 20) + i * 4096, &data).await.unwrap();
            data
        }
    });
    let written = futures_util::future::join_all(writes).await;
    for (i, data) in written.iter().enumerate() {
        let back = client
            .read((1 << 20) + i as u64 * 4096, vec![0; 4096])
            .await
            .unwrap();
        assert_eq!(&back, data);
    }
    client.flush().await.unwrap();
    let beyond = client.read(SIZE as u64, vec![0; 512]).await.unwrap_err();
    assert_eq!(beyond.errno(), libc::EINVAL);
}

#[test]
fn newstyle_with_structured_replies_and_go() {
    let export = Arc::new(MemExport::new(SIZE).with_info(|info| info.max_block = 16 * 1024));
    let harness = Harness::start(Arc::clone(&export), ServerConfig::default());
    harness.runtime.block_on(async {
        let client = connect(&harness.socket, &ClientConfig::default())
            .await
            .unwrap();
        let negotiated = *client.negotiated();
        assert_eq!(negotiated.style, HandshakeStyle::Go);
        assert!(negotiated.structured);
        assert_eq!(negotiated.size, SIZE as u64);
        assert_eq!(negotiated.max_request, 16 * 1024);
        assert!(negotiated.can_flush() && negotiated.can_write_zeroes());
        exercise(&client).await;
        // Zeroed ranges read back as zeros: the server answers with hole chunks.
        client.write_zeroes(4096, 8192, true, false).await.unwrap();
        let back = client.read(0, vec![0xff; 16384]).await.unwrap();
        assert!(back[4096..12288].iter().all(|b| *b == 0));
        assert_eq!(&back[12288..], &pattern(64 * 1024, 7)[8192..12288]);
        client.trim(0, 4096).await.unwrap();
        client.close().await;
    });
    assert!(export.flushes.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    harness.stop();
}

#[test]
fn old_style_servers() {
    let export = Arc::new(MemExport::new(SIZE));
    let config = ServerConfig {
        handshake: Handshake::Oldstyle,
        ..ServerConfig::default()
    };
    let harness = Harness::start(export, config);
    harness.runtime.block_on(async {
        let client = connect(&harness.socket, &ClientConfig::default())
            .await
            .unwrap();
        assert_eq!(client.negotiated().style, HandshakeStyle::Oldstyle);
        assert!(!client.negotiated().structured);
        exercise(&client).await;
        // TLS cannot be had from an old-style server: refused rather than plaintext.
        let tls_dir = tempfile::tempdir().unwrap();
        std::fs::write(tls_dir.path().join("ca-cert.pem"), "").unwrap();
        assert!(nbd::tls::ClientTls::from_dir(tls_dir.path()).is_err());
    });
    harness.stop();
}

/// A server that greets (fixed newstyle), refuses every option but `EXPORT_NAME`, then
/// answers requests from `answer` (or never, when it returns `None`).
async fn scripted_server(
    listener: tokio::net::UnixListener,
    answer: impl Fn(&nbd::proto::RequestHeader) -> Option<Vec<u8>> + Send + 'static,
) {
    use nbd::proto::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut stream, _) = listener.accept().await.unwrap();
    stream.write_all(&server_greeting()).await.unwrap();
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await.unwrap();
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut header).await.unwrap();
        let header = OptionHeader::parse(&header).unwrap();
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data).await.unwrap();
        if header.option == OPT_EXPORT_NAME {
            let mut reply = (SIZE as u64).to_be_bytes().to_vec();
            reply.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
            stream.write_all(&reply).await.unwrap();
            break;
        }
        let mut reply = Vec::new();
        encode_option_error(&mut reply, header.option, REP_ERR_UNSUP, "");
        stream.write_all(&reply).await.unwrap();
    }
    loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let request = RequestHeader::parse(&header).unwrap();
        if request.command == CMD_WRITE {
            let mut payload = vec![0u8; request.length as usize];
            stream.read_exact(&mut payload).await.unwrap();
        }
        if let Some(reply) = answer(&request) {
            stream.write_all(&reply).await.unwrap();
        }
    }
}

#[tokio::test]
async fn export_name_fallback_and_server_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(scripted_server(listener, |request| {
        if request.command == nbd::proto::CMD_WRITE {
            return Some(nbd::proto::simple_reply(request.cookie, nbd::proto::ENOSPC).to_vec());
        }
        let mut reply = nbd::proto::simple_reply(request.cookie, 0).to_vec();
        reply.resize(reply.len() + request.length as usize, 0xab);
        Some(reply)
    }));
    let client = connect(&socket, &ClientConfig::default()).await.unwrap();
    assert_eq!(client.negotiated().style, HandshakeStyle::ExportName);
    assert!(!client.negotiated().structured);
    let full = client.write(0, &[1; 512]).await.unwrap_err();
    assert_eq!(full.errno(), libc::ENOSPC);
    assert!(!full.is_connection_failure());
    // A server error leaves the connection usable.
    let data = client.read(512, vec![0; 1024]).await.unwrap();
    assert!(data.iter().all(|b| *b == 0xab));
    assert!(client.broken().is_none());
    // No flush offered: nothing to do.
    client.flush().await.unwrap();
    drop(client);
    server.abort();
}

#[tokio::test]
async fn a_silent_server_times_out_and_breaks_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(scripted_server(listener, |_| None));
    let config = ClientConfig {
        request_timeout: Duration::from_millis(300),
        max_in_flight: 1,
        max_queued: 1,
        ..ClientConfig::default()
    };
    let client = Arc::new(connect(&socket, &config).await.unwrap());
    let first = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.write(0, &[1; 512]).await })
    };
    let second = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.write(512, &[1; 512]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // One on the wire, one queued: a third is refused at once.
    let third = client.write(1024, &[1; 512]).await.unwrap_err();
    assert!(matches!(third, ClientError::Busy));
    assert_eq!(third.errno(), libc::EBUSY);
    let started = std::time::Instant::now();
    let first = first.await.unwrap().unwrap_err();
    assert!(matches!(first, ClientError::TimedOut(_)), "{first:?}");
    assert_eq!(first.errno(), libc::ETIMEDOUT);
    let second = second.await.unwrap().unwrap_err();
    assert!(second.is_connection_failure(), "{second:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(client.broken().is_some());
    assert_eq!(client.timeouts(), 1);
    let later = client.read(0, vec![0; 512]).await.unwrap_err();
    assert!(matches!(later, ClientError::Disconnected(_)));
    server.abort();
}

#[tokio::test]
async fn a_server_that_lies_breaks_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    // Replies to another cookie than asked.
    let server = tokio::spawn(scripted_server(listener, |request| {
        Some(nbd::proto::simple_reply(request.cookie + 100, 0).to_vec())
    }));
    let client = connect(&socket, &ClientConfig::default()).await.unwrap();
    let error = client.write(0, &[1; 512]).await.unwrap_err();
    assert!(error.is_connection_failure(), "{error:?}");
    assert!(client.broken().unwrap().contains("unknown cookie"));
    server.abort();
}

#[tokio::test]
async fn handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    // Accepts and says nothing.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let config = ClientConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    let error = connect(&socket, &config).await.unwrap_err();
    assert!(matches!(error, ClientError::HandshakeTimeout(_)));
}

/// Runs `server` (a command serving a UNIX socket given as its last argument), waits for
/// the socket, and exercises the client against it.
fn against_external(program: &str, args: &[&str]) {
    if !have_tool(program) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; SIZE]).unwrap();
    let socket = dir.path().join("s");
    let mut command = std::process::Command::new(program);
    for arg in args {
        command.arg(
            arg.replace("@SOCKET@", socket.to_str().unwrap())
                .replace("@IMAGE@", image.to_str().unwrap()),
        );
    }
    let mut child = command.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{program} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = connect(&socket, &ClientConfig::default()).await.unwrap();
        assert_eq!(client.negotiated().style, HandshakeStyle::Go);
        assert!(client.negotiated().structured);
        exercise(&client).await;
        client.close().await;
    });
    let _ = child.kill();
    let _ = child.wait();
    // What the client wrote is in the image.
    let data = std::fs::read(&image).unwrap();
    assert_eq!(&data[4096..4096 + 65536], &pattern(64 * 1024, 7)[..]);
}

#[test]
fn qemu_nbd() {
    against_external(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-t",
            "--cache=writeback",
            "-k",
            "@SOCKET@",
            "@IMAGE@",
        ],
    );
}

#[test]
fn nbdkit() {
    against_external("nbdkit", &["-f", "-U", "@SOCKET@", "file", "@IMAGE@"]);
}
