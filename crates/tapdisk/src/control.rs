//! The control socket `<ctl dir>/ctl<pid>`: one request per connection.
//!
//! A client writes one 544-byte `tapdisk_message_t` (plus, for OPEN/RESUME, the trailing log
//! path, key and open options its flags announce), reads the reply and closes. Each connection is served by
//! its own task with deadlines on reading and writing, so a slow or stuck client never blocks
//! other clients or disk I/O. Anything malformed (truncated message, unknown type, unterminated
//! string, unexpected extra bytes, bad key size) is answered with an `ERROR` reply carrying
//! `EINVAL`, and the daemon carries on.
//!
//! Idle clients cannot hold the door shut: connections are accepted at once, whatever the
//! others do; at most [`MAX_RECEIVING`] may still be sending their request, and a new one
//! beyond that closes the oldest of them (which has had the longest to send 544 bytes). A
//! request, once received, is served to the end (see [`ClientWatch`] for what happens when
//! its client gives up meanwhile).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tapdisk_proto::{
    Body, Message, MessageType, OpenFlags, LOG_PATH_PAYLOAD_LEN, MESSAGE_SIZE,
    OPEN_OPTIONS_PAYLOAD_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio::time::timeout;

use crate::server::{Reply, Tapdisk, Trailer};

/// How long a client may take to send its whole request.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client may take to read its reply.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that may still be sending their request; one more closes the oldest.
pub const MAX_RECEIVING: usize = 64;

/// Requests handled at once is not limited (state changes queue per minor); this is only the
/// count [`ControlServer::drain`] waits for.
const MAX_HANDLED: u32 = 1 << 16;

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

/// Tells whether the client of a request is still there, so that a request whose client
/// gave up (a `tap-ctl` past its timeout closes its socket) is not carried out afterwards.
///
/// A client that has sent its request only waits for the reply, so the socket hanging up
/// (`POLLHUP`: the peer closed it; a mere `shutdown(SHUT_WR)` is not a hang-up) means the
/// client has gone. The check is a `poll` with no timeout, cheap enough to make before every
/// step that commits a change.
#[derive(Debug, Clone, Copy)]
pub struct ClientWatch<'a> {
    socket: Option<BorrowedFd<'a>>,
}

/// How often [`ClientWatch::gone`] looks.
const HANGUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

impl<'a> ClientWatch<'a> {
    /// Watches the client at the other end of `socket`.
    pub fn new(socket: &'a impl AsFd) -> Self {
        Self {
            socket: Some(socket.as_fd()),
        }
    }

    /// A client that never goes away (requests made inside the daemon, tests).
    pub fn detached() -> ClientWatch<'static> {
        ClientWatch { socket: None }
    }

    /// True once the client has closed its end.
    pub fn is_gone(&self) -> bool {
        let Some(socket) = self.socket else {
            return false;
        };
        let mut fds = [rustix::event::PollFd::new(
            &socket,
            rustix::event::PollFlags::empty(),
        )];
        match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(0) => false,
            Ok(_) => fds[0]
                .revents()
                .intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR),
            Err(_) => false,
        }
    }

    /// Resolves once the client has gone (never for [`ClientWatch::detached`]).
    pub async fn gone(&self) {
        if self.socket.is_none() {
            return std::future::pending().await;
        }
        while !self.is_gone() {
            tokio::time::sleep(HANGUP_POLL_INTERVAL).await;
        }
    }
}

/// Serves one control connection whose request has been read.
async fn answer(
    mut stream: UnixStream,
    request: Result<(Message, Trailer), RequestError>,
    cookie: u16,
    tapdisk: &Tapdisk,
) {
    let reply = match request {
        Ok((message, trailer)) => {
            tracing::debug!(
                minor = message.cookie,
                "received {}",
                message.msg_type.name()
            );
            tapdisk
                .handle(&message, &trailer, ClientWatch::new(&stream))
                .await
        }
        Err(RequestError::Empty) => return,
        Err(e) => {
            tracing::warn!("control request refused: {e}");
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

/// Connections still sending their request, oldest first.
#[derive(Debug, Default)]
struct Receiving {
    connections: Mutex<VecDeque<(u64, AbortHandle)>>,
}

impl Receiving {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, AbortHandle)>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the oldest connections beyond [`MAX_RECEIVING`] (called with the lock held,
    /// right after registering a new one).
    fn trim(connections: &mut VecDeque<(u64, AbortHandle)>) {
        while connections.len() > MAX_RECEIVING {
            if let Some((_, oldest)) = connections.pop_front() {
                tracing::debug!("control connection still silent among many: closed");
                oldest.abort();
            }
        }
    }

    /// Unregisters connection `id`; false when it was closed for a newer one meanwhile
    /// (its task is being aborted and must not go on).
    fn finish(&self, id: u64) -> bool {
        let mut connections = self.lock();
        match connections.iter().position(|(known, _)| *known == id) {
            Some(index) => {
                connections.remove(index);
                true
            }
            None => false,
        }
    }
}

/// Accepts control connections until the task is dropped.
#[derive(Debug)]
pub struct ControlServer {
    receiving: Arc<Receiving>,
    handled: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl ControlServer {
    /// A server with no connections yet.
    pub fn new() -> Self {
        Self {
            receiving: Arc::new(Receiving::default()),
            handled: Arc::new(Semaphore::new(MAX_HANDLED as usize)),
            next_id: AtomicU64::new(0),
        }
    }

    /// Accept loop: each connection gets its own task.
    pub async fn run(&self, listener: UnixListener, tapdisk: Arc<Tapdisk>) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => self.serve(stream, Arc::clone(&tapdisk)),
                Err(e) => {
                    tracing::error!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Starts the task of one connection: receive (evictable), then handle and answer.
    fn serve(&self, mut stream: UnixStream, tapdisk: Arc<Tapdisk>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let receiving = Arc::clone(&self.receiving);
        let handled = Arc::clone(&self.handled);
        // Register before the task can run, so that it finds itself when it is done reading.
        let mut registry = self.receiving.lock();
        let task = tokio::spawn(async move {
            let mut raw = [0u8; MESSAGE_SIZE];
            let request = match timeout(RECEIVE_TIMEOUT, read_request(&mut stream, &mut raw)).await
            {
                Ok(result) => result,
                Err(_) => Err(RequestError::Timeout),
            };
            if !receiving.finish(id) {
                return;
            }
            let Ok(_permit) = handled.try_acquire() else {
                return;
            };
            let cookie = u16::from_le_bytes([raw[2], raw[3]]);
            answer(stream, request, cookie, &tapdisk).await;
        });
        registry.push_back((id, task.abort_handle()));
        Receiving::trim(&mut registry);
    }

    /// Waits (at most `limit`) until no control request is being handled.
    pub async fn drain(&self, limit: Duration) {
        let all = self.handled.acquire_many(MAX_HANDLED);
        let _ = timeout(limit, all).await;
    }
}

impl Default for ControlServer {
    fn default() -> Self {
        Self::new()
    }
}
