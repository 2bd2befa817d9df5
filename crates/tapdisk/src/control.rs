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
//! beyond that closes the oldest of them that has had half a second to send its 544 bytes
//! and has not. A request, once received, is served to the end (see
//! [`ClientWatch`] for what happens when its client gives up meanwhile).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tapdisk_proto::{
    Body, Message, MessageType, OpenFlags, LOG_PATH_PAYLOAD_LEN, MESSAGE_SIZE,
    OPEN_OPTIONS_PAYLOAD_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;
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

/// How long a new connection has to send its request before it may be closed to make room.
const GRACE: Duration = Duration::from_millis(500);

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
            // Straight into locked memory: no other copy of the key is made.
            let mut key = secret::Key::zeroed(size)?;
            let got = read_full(stream, key.as_mut_bytes()).await?;
            if got < size {
                return Err(RequestError::Malformed(format!(
                    "encryption key truncated at {got} of {size} bytes"
                )));
            }
            trailer.key = Some(Arc::new(key));
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

/// A connection still sending its request: its task, and a duplicate of its socket to see
/// how much of the request has arrived.
#[derive(Debug)]
struct Pending {
    id: u64,
    task: AbortHandle,
    socket: Option<OwnedFd>,
    accepted: Instant,
}

impl Pending {
    /// True when the connection may be closed to make room: it has had [`GRACE`] to send
    /// its request, and the request has not fully arrived.
    fn evictable(&self) -> bool {
        self.accepted.elapsed() >= GRACE && !self.has_request()
    }

    /// True when a whole request waits in the socket (its task just has not run yet).
    fn has_request(&self) -> bool {
        self.socket.as_ref().is_some_and(|socket| {
            rustix::io::ioctl_fionread(socket).is_ok_and(|queued| queued >= MESSAGE_SIZE as u64)
        })
    }
}

/// Connections still sending their request, oldest first.
#[derive(Debug, Default)]
struct Receiving {
    connections: Mutex<VecDeque<Pending>>,
}

impl Receiving {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the oldest connections beyond [`MAX_RECEIVING`] that are [`Pending::evictable`]
    /// (called with the lock held, right after registering a new one). A connection younger
    /// than [`GRACE`], or whose request waits in its socket, is spared: a client sends its
    /// request right after connecting, however many others are there.
    fn trim(connections: &mut VecDeque<Pending>) {
        while connections.len() > MAX_RECEIVING {
            let Some(index) = connections.iter().position(Pending::evictable) else {
                return;
            };
            if let Some(oldest) = connections.remove(index) {
                tracing::debug!("control connection still silent among many: closed");
                oldest.task.abort();
            }
        }
    }

    /// Unregisters connection `id`; false when it was closed for a newer one meanwhile
    /// (its task is being aborted and must not go on).
    fn finish(&self, id: u64) -> bool {
        let mut connections = self.lock();
        match connections.iter().position(|pending| pending.id == id) {
            Some(index) => {
                connections.remove(index);
                true
            }
            None => false,
        }
    }
}

/// Accepts control connections on a thread of its own.
///
/// The data plane runs on the main runtime, where thousands of NBD connections may be
/// handshaking; a control request queued behind their tasks would wait its turn among them.
/// So the control socket has its own thread (a single-threaded runtime): accepting,
/// reading requests and answering those that only read state (PID, LIST, STATS, DISK_INFO)
/// or only signal a commit job (QUERY_COMMIT_JOB, CANCEL_COMMIT_JOB) never wait for the data
/// plane. Requests that change state are handed to the main
/// runtime, where the VBDs and their frontends live.
#[derive(Debug)]
pub struct ControlServer {
    receiving: Arc<Receiving>,
    handled: Arc<Semaphore>,
    next_id: AtomicU64,
    /// The main runtime, for state-changing requests.
    main: Handle,
}

impl ControlServer {
    /// A server with no connections yet; state changes will run on `main`.
    pub fn new(main: Handle) -> Self {
        Self {
            receiving: Arc::new(Receiving::default()),
            handled: Arc::new(Semaphore::new(MAX_HANDLED as usize)),
            next_id: AtomicU64::new(0),
            main,
        }
    }

    /// Starts the control thread serving `listener` (a non-blocking listening socket) for
    /// the life of the process.
    pub fn start(
        self: &Arc<Self>,
        listener: std::os::unix::net::UnixListener,
        tapdisk: Arc<Tapdisk>,
    ) -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let server = Arc::clone(self);
        std::thread::Builder::new()
            .name("tapdisk-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match UnixListener::from_std(listener) {
                        Ok(listener) => server.run(listener, tapdisk).await,
                        Err(e) => tracing::error!("control socket: {e}"),
                    }
                });
            })?;
        Ok(())
    }

    /// Accept loop: each connection gets its own task.
    async fn run(&self, listener: UnixListener, tapdisk: Arc<Tapdisk>) {
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
        let main = self.main.clone();
        let socket = stream.as_fd().try_clone_to_owned().ok();
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
            let Ok(permit) = handled.try_acquire_owned() else {
                return;
            };
            let cookie = u16::from_le_bytes([raw[2], raw[3]]);
            let changes_state = request
                .as_ref()
                .is_ok_and(|(message, _)| !Tapdisk::is_reentrant(message.msg_type));
            if !changes_state {
                answer(stream, request, cookie, &tapdisk).await;
                return;
            }
            // Moved to the main runtime's reactor with the request.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => return tracing::warn!("control connection lost: {e}"),
            };
            main.spawn(async move {
                match UnixStream::from_std(stream) {
                    Ok(stream) => answer(stream, request, cookie, &tapdisk).await,
                    Err(e) => tracing::warn!("control connection lost: {e}"),
                }
                drop(permit);
            });
        });
        registry.push_back(Pending {
            id,
            task: task.abort_handle(),
            socket,
            accepted: Instant::now(),
        });
        Receiving::trim(&mut registry);
    }

    /// Waits (at most `limit`) until no control request is being handled.
    pub async fn drain(&self, limit: Duration) {
        let all = self.handled.acquire_many(MAX_HANDLED);
        let _ = timeout(limit, all).await;
    }
}
