//! The control socket `<ctl dir>/ctl<pid>`: one request per connection.
//!
//! A client writes one 544-byte `tapdisk_message_t` (plus, for OPEN/RESUME, the trailing log
//! path, key and open options its flags announce), reads the reply and closes. Each connection is served by
//! its own task with deadlines on reading and writing, so a slow or stuck client never blocks
//! other clients or disk I/O. Anything malformed (truncated message, unknown type, unterminated
//! string, unexpected extra bytes, bad key size) is answered with an `ERROR` reply carrying
//! `EINVAL`, and the daemon carries on.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tapdisk_proto::{
    Body, Message, MessageType, OpenFlags, LOG_PATH_PAYLOAD_LEN, MESSAGE_SIZE,
    OPEN_OPTIONS_PAYLOAD_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use crate::server::{Reply, Tapdisk, Trailer};

/// How long a client may take to send its whole request.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client may take to read its reply.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Control connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: u32 = 32;

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("connection closed before a request arrived")]
    Empty,
    #[error("request incomplete after {0} bytes")]
    Truncated(usize),
    #[error("request not received within {RECEIVE_TIMEOUT:?}")]
    Timeout,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
}

/// Reads until `buf` is full; returns how many bytes arrived before EOF.
async fn read_full(stream: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]).await? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

async fn read_exact_payload(stream: &mut UnixStream, len: usize) -> Result<Vec<u8>, RequestError> {
    let mut payload = vec![0u8; len];
    let got = read_full(stream, &mut payload).await?;
    if got < len {
        return Err(RequestError::Malformed(format!(
            "trailing payload truncated at {got} of {len} bytes"
        )));
    }
    Ok(payload)
}

/// Reads one request and the payloads its flags announce.
async fn read_request(
    stream: &mut UnixStream,
    raw: &mut [u8; MESSAGE_SIZE],
) -> Result<(Message, Trailer), RequestError> {
    let got = read_full(stream, raw).await?;
    match got {
        0 => return Err(RequestError::Empty),
        n if n < MESSAGE_SIZE => return Err(RequestError::Truncated(n)),
        _ => {}
    }
    let message = Message::decode(raw).map_err(|e| RequestError::Malformed(e.to_string()))?;
    let mut trailer = Trailer::default();
    if let (MessageType::Open | MessageType::Resume, Body::Params(params)) =
        (message.msg_type, &message.body)
    {
        if params.flags.contains(OpenFlags::ADD_LOG) {
            let payload = read_exact_payload(stream, LOG_PATH_PAYLOAD_LEN).await?;
            let path = tapdisk_proto::decode_log_path(&payload)
                .map_err(|e| RequestError::Malformed(e.to_string()))?;
            trailer.log_path = Some(path);
        }
        if message.msg_type == MessageType::Open && params.flags.contains(OpenFlags::OPEN_ENCRYPTED)
        {
            let size = read_exact_payload(stream, 1).await?;
            let size = tapdisk_proto::decode_key_size(size[0])
                .map_err(|e| RequestError::Malformed(e.to_string()))?;
            trailer.key = Some(read_exact_payload(stream, size).await?);
        }
        if message.msg_type == MessageType::Open && params.flags.contains(OpenFlags::OPEN_OPTIONS) {
            let payload = read_exact_payload(stream, OPEN_OPTIONS_PAYLOAD_LEN).await?;
            let text = tapdisk_proto::decode_open_options(&payload)
                .map_err(|e| RequestError::Malformed(e.to_string()))?;
            trailer.options = Some(text);
        }
    }
    // One request per connection: anything more is a client bug (or an oversize payload).
    let mut extra = [0u8; 1];
    match stream.try_read(&mut extra) {
        Ok(n) if n > 0 => {
            return Err(RequestError::Malformed(
                "unexpected bytes after the request".into(),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e.into()),
    }
    Ok((message, trailer))
}

/// The wire bytes of a reply.
fn encode_reply(reply: &Reply) -> io::Result<Vec<u8>> {
    let encode = |message: &Message| {
        message
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    };
    Ok(match reply {
        Reply::Message(message) => encode(message)?.to_vec(),
        Reply::List(messages) => {
            let mut bytes = Vec::with_capacity(messages.len() * MESSAGE_SIZE);
            for message in messages {
                bytes.extend_from_slice(&encode(message)?);
            }
            bytes
        }
        Reply::Stats(message, text) => {
            let mut bytes = encode(message)?.to_vec();
            bytes.extend_from_slice(text.as_bytes());
            bytes
        }
    })
}

/// Reads and drops whatever the client sent beyond its request (bounded in time and size):
/// closing a UNIX socket with unread input makes the client's read of the reply fail with
/// `ECONNRESET`.
async fn discard_unread_input(stream: &mut UnixStream) {
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0usize;
        while total < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = timeout(Duration::from_millis(500), drain).await;
}

/// Serves one control connection.
async fn serve_connection(mut stream: UnixStream, tapdisk: Arc<Tapdisk>) {
    let mut raw = [0u8; MESSAGE_SIZE];
    let request = match timeout(RECEIVE_TIMEOUT, read_request(&mut stream, &mut raw)).await {
        Ok(result) => result,
        Err(_) => Err(RequestError::Timeout),
    };
    let reply = match request {
        Ok((message, trailer)) => {
            tracing::debug!(
                minor = message.cookie,
                "received {}",
                message.msg_type.name()
            );
            tapdisk.handle(&message, &trailer).await
        }
        Err(RequestError::Empty) => return,
        Err(e) => {
            tracing::warn!("control request refused: {e}");
            let cookie = u16::from_le_bytes([raw[2], raw[3]]);
            Reply::Message(Message::error(cookie, libc::EINVAL))
        }
    };
    let bytes = match encode_reply(&reply) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!("cannot encode the reply: {e}");
            return;
        }
    };
    match timeout(SEND_TIMEOUT, stream.write_all(&bytes)).await {
        Ok(Ok(())) => {
            let _ = stream.shutdown().await;
            discard_unread_input(&mut stream).await;
        }
        Ok(Err(e)) => tracing::warn!("control reply not delivered: {e}"),
        Err(_) => tracing::warn!("control client did not read its reply within {SEND_TIMEOUT:?}"),
    }
}

/// Accepts control connections until the task is dropped.
#[derive(Debug)]
pub struct ControlServer {
    connections: Arc<Semaphore>,
}

impl ControlServer {
    /// A server with no connections yet.
    pub fn new() -> Self {
        Self {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS as usize)),
        }
    }

    /// Accept loop: each connection gets its own task.
    pub async fn run(&self, listener: UnixListener, tapdisk: Arc<Tapdisk>) {
        loop {
            let Ok(permit) = Arc::clone(&self.connections).acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let tapdisk = Arc::clone(&tapdisk);
                    tokio::spawn(async move {
                        serve_connection(stream, tapdisk).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::error!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Waits (at most `limit`) until no control connection is being served.
    pub async fn drain(&self, limit: Duration) {
        let all = self.connections.acquire_many(MAX_CONNECTIONS);
        let _ = timeout(limit, all).await;
    }
}

impl Default for ControlServer {
    fn default() -> Self {
        Self::new()
    }
}
