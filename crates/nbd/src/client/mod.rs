//! An NBD client on tokio: negotiates with a server over a connected socket, then keeps
//! many requests in flight on it. tapdisk's `nbd` image driver (storage-migration mirrors,
//! remote disks) is built on it.
//!
//! **Handshake.** Old style (the greeting carries size and flags, as tapdisk's
//! `nbdserver<pid>.<minor>` fd receivers speak it) and newstyle. On a fixed newstyle server
//! the client asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`), then for the export
//! with `NBD_OPT_GO` (asking for the block size limits), and falls back to
//! `NBD_OPT_EXPORT_NAME` when the server does not know `GO`; a plain newstyle server only
//! gets `EXPORT_NAME`. With [`ClientConfig::tls`] the client first upgrades with
//! `NBD_OPT_STARTTLS` and refuses to go on in plaintext; without it, a server that insists
//! on TLS is reported as such ([`ClientError::TlsRequired`]). The whole handshake has a
//! deadline ([`ClientConfig::handshake_timeout`]).
//!
//! **Transmission.** One task per connection does its I/O. A request registers its cookie
//! and queues its header and payload (a write's payload by reference, [`Client::write_shared`],
//! or copied, [`Client::write`]); the first one queued on an empty queue wakes the task, which
//! takes the whole queue and sends it with as few vectored writes as it fits (the `outgoing`
//! module): requests made together (a guest's queue of writes) leave in one message, so the
//! server wakes once for all of them, and nobody holds a lock across a write. The same task
//! reads replies and completes requests by cookie, reading read data straight into the
//! caller's buffer. At most
//! [`ClientConfig::max_in_flight`] requests are on the wire; up to
//! [`ClientConfig::max_queued`] more wait for a slot, and beyond that a request fails at once
//! with [`ClientError::Busy`] (`EBUSY`) instead of queueing without bound. Requests larger
//! than the server's maximum are split.
//!
//! **Failures.** Every request has a deadline ([`ClientConfig::request_timeout`]) covering
//! its wait for a slot, its sending and its reply: a hung server is detected. Replies are
//! held to it by one watchdog task per connection, asleep until the earliest deadline of
//! the requests in flight, so a request costs no timer of its own. A timed-out
//! request, a failed read or write on the socket, or anything the server sends that the
//! protocol does not allow breaks the connection: every request in flight fails, later ones
//! fail at once ([`ClientError::Disconnected`]), and the socket is shut down. The client
//! never reconnects by itself: whether that is possible (an address can be dialled again, a
//! handed-over socket cannot) is for the owner to decide.

pub mod codec;
mod outgoing;

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, watch, Notify, Semaphore};
use tokio::time::Instant;

use self::codec::{
    ChunkContext, ChunkMeaning, ClientProtoError, ExportFacts, GreetingStyle, InfoItem, ReplyKind,
    ServerFlags,
};
use self::outgoing::{Outgoing, Payload};
use crate::handover::ReceivedStream;
use crate::proto::{
    self, CMD_DISC, CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, DEFAULT_MAX_BLOCK, OPT_GO, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_TLS_REQD, REP_ERR_UNSUP, REP_INFO, SIMPLE_REPLY_LEN, STRUCTURED_HEADER_LEN,
    TFLAG_READ_ONLY, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM,
    TFLAG_SEND_WRITE_ZEROES,
};
use crate::tls::ClientTls;
use crate::ExportBuffer;

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The export asked for (`""`: the server's default export).
    pub export_name: String,
    /// Upgrade to TLS, checking the server's certificate for this name (a DNS name or an IP
    /// address). Only for newstyle servers: an old-style greeting then fails the handshake.
    pub tls: Option<(ClientTls, String)>,
    /// Deadline of the whole handshake.
    pub handshake_timeout: Duration,
    /// Deadline of each request, from its submission to its reply.
    pub request_timeout: Duration,
    /// Requests on the wire at once.
    pub max_in_flight: usize,
    /// Requests waiting for a slot at once; more fail with `EBUSY`.
    pub max_queued: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_in_flight: 256,
            max_queued: 1024,
        }
    }
}

/// Which handshake the server took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStyle {
    /// Old-style greeting.
    Oldstyle,
    /// Newstyle, export chosen with `NBD_OPT_EXPORT_NAME`.
    ExportName,
    /// Fixed newstyle, export chosen with `NBD_OPT_GO`.
    Go,
}

impl HandshakeStyle {
    /// Lower-case name, for logs and stats.
    pub fn name(self) -> &'static str {
        match self {
            Self::Oldstyle => "oldstyle",
            Self::ExportName => "export_name",
            Self::Go => "go",
        }
    }
}

/// What negotiation settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// The handshake taken.
    pub style: HandshakeStyle,
    /// Structured replies are on.
    pub structured: bool,
    /// The connection runs over TLS.
    pub tls: bool,
    /// Smallest request size the server accepts (1 unless it said otherwise).
    pub min_block: u32,
    /// Largest request payload; larger requests are split.
    pub max_request: u32,
}

impl Negotiated {
    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// The server implements `NBD_CMD_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }

    /// The server implements `NBD_CMD_TRIM`.
    pub fn can_trim(&self) -> bool {
        self.flags & TFLAG_SEND_TRIM != 0
    }

    /// The server implements `NBD_CMD_WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }

    /// The server implements the fast-zero flag.
    pub fn can_fast_zero(&self) -> bool {
        self.flags & TFLAG_SEND_FAST_ZERO != 0
    }
}

/// Why negotiation or a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Reading or writing the socket failed during the handshake.
    #[error("{what}: {message}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system's explanation.
        message: String,
        /// Its errno, if any.
        errno: Option<i32>,
    },
    /// The server broke the protocol during the handshake.
    #[error("{0}")]
    Protocol(#[from] ClientProtoError),
    /// The server refused the export.
    #[error("the server refused {option}: {message}")]
    Refused {
        /// The option refused.
        option: &'static str,
        /// The server's message and error.
        message: String,
    },
    /// The server accepts TLS connections only and no TLS was configured.
    #[error("the server requires TLS and none is configured for this connection")]
    TlsRequired,
    /// TLS was asked for but could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// The handshake did not finish in time.
    #[error("the handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// The server answered a request with an error.
    #[error("the server answered error {errno}{message}")]
    Server {
        /// The errno of the NBD error.
        errno: i32,
        /// The server's message (with a leading `": "`), or empty.
        message: String,
    },
    /// The connection is broken; this and every later request fails.
    #[error("the connection is closed: {0}")]
    Disconnected(String),
    /// The request got no reply in time (the connection is broken since).
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    /// Too many requests wait for a slot already.
    #[error("too many requests queued")]
    Busy,
    /// The request cannot be expressed on this connection.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The errno a caller reports for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Io { errno, .. } => errno.unwrap_or(libc::EIO),
            Self::Protocol(_) => libc::EPROTO,
            Self::Refused { .. } => libc::ENXIO,
            Self::TlsRequired | Self::Tls(_) => libc::EACCES,
            Self::HandshakeTimeout(_) | Self::TimedOut(_) => libc::ETIMEDOUT,
            Self::Server { errno, .. } => *errno,
            Self::Disconnected(_) => libc::ENOTCONN,
            Self::Busy => libc::EBUSY,
            Self::Invalid(_) => libc::EINVAL,
        }
    }

    /// True when the connection can no longer carry requests (as opposed to one request
    /// being refused by the server or the queue).
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            Self::Disconnected(_) | Self::TimedOut(_) | Self::Io { .. } | Self::Protocol(_)
        )
    }

    fn io(what: &'static str, error: &io::Error) -> Self {
        Self::Io {
            what,
            message: error.to_string(),
            errno: error.raw_os_error(),
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(error: ClientError) -> Self {
        io::Error::from_raw_os_error(error.errno())
    }
}

type BoxedReader = Box<dyn AsyncRead + Send + Unpin>;
type BoxedWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// A request waiting for its reply.
enum Waiter<B> {
    /// A read: data goes to `buf[base + ...]`.
    Read {
        buf: B,
        base: usize,
        context: ChunkContext,
        /// Buffer ranges filled so far (structured replies), sorted, never overlapping.
        covered: Vec<Range<usize>>,
        /// The first error a reply chunk reported (boxed: rare, and it keeps every waiter,
        /// which each request moves around, small).
        error: Option<Box<ClientError>>,
        done: oneshot::Sender<Result<B, ClientError>>,
    },
    /// Any other request.
    Command {
        context: ChunkContext,
        /// As for reads.
        error: Option<Box<ClientError>>,
        done: oneshot::Sender<Result<(), ClientError>>,
    },
}

impl<B> Waiter<B> {
    fn context(&self) -> ChunkContext {
        match self {
            Self::Read { context, .. } | Self::Command { context, .. } => *context,
        }
    }

    fn fail(self, error: ClientError) {
        match self {
            Self::Read { done, .. } => {
                let _ = done.send(Err(error));
            }
            Self::Command { done, .. } => {
                let _ = done.send(Err(error));
            }
        }
    }

    /// Completes the request: with the first error recorded, else success.
    fn finish(self) -> Result<(), ClientProtoError> {
        match self {
            Self::Read {
                buf,
                context,
                covered,
                error,
                done,
                ..
            } => {
                let result = match error {
                    Some(error) => Err(*error),
                    None => {
                        let whole = usize::try_from(context.length).unwrap_or(usize::MAX);
                        let complete =
                            whole == 0 || (covered.len() == 1 && covered[0] == (0..whole));
                        if !complete {
                            let error = ClientProtoError::Invalid {
                                what: format!(
                                    "the reply to a read of {whole} bytes at {} covers {covered:?}",
                                    context.offset
                                ),
                            };
                            let _ = done.send(Err(ClientError::Protocol(error.clone())));
                            return Err(error);
                        }
                        Ok(buf)
                    }
                };
                let _ = done.send(result);
            }
            Self::Command { error, done, .. } => {
                let _ = done.send(error.map_or(Ok(()), |error| Err(*error)));
            }
        }
        Ok(())
    }
}

/// Records that `range` of a read buffer was filled; overlapping chunks are a violation.
fn cover(covered: &mut Vec<Range<usize>>, range: Range<usize>) -> Result<(), ClientProtoError> {
    let at = covered.partition_point(|r| r.end <= range.start);
    if covered.get(at).is_some_and(|r| r.start < range.end) {
        return Err(ClientProtoError::Invalid {
            what: format!("reply chunks overlap at bytes {range:?}"),
        });
    }
    covered.insert(at, range);
    // Merge neighbours, so a complete read is one range.
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(covered.len());
    for r in covered.drain(..) {
        match merged.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => merged.push(r),
        }
    }
    *covered = merged;
    Ok(())
}

/// Hashes the client's own cookies: sequential numbers, so a multiplication spreads them
/// well enough, and far cheaper than the default SipHash. A server can only look cookies
/// up, never insert them, so there is nothing to flood.
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, cookie: u64) {
        self.0 = cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A request waiting for its reply, with the deadline the connection's watchdog holds it to.
struct Pending<B> {
    deadline: Instant,
    waiter: Waiter<B>,
}

struct State<B> {
    next_cookie: u64,
    pending: HashMap<u64, Pending<B>, BuildHasherDefault<CookieHasher>>,
    /// Why the connection is broken, once it is.
    broken: Option<String>,
    /// Requests registered and not yet taken by the I/O task, in cookie order.
    outgoing: Outgoing<B>,
}

struct Shared<B> {
    negotiated: Negotiated,
    request_timeout: Duration,
    max_queued: usize,
    state: Mutex<State<B>>,
    /// Wakes the I/O task when requests are queued on an empty queue.
    send_ready: Notify,
    /// Set with `state.broken`: checked without the lock on every request.
    is_broken: AtomicBool,
    slots: Semaphore,
    queued: AtomicUsize,
    /// Set once the connection is broken or closed: the reader stops.
    stop: watch::Sender<bool>,
    timeouts: AtomicU64,
}

impl<B: ExportBuffer> Shared<B> {
    fn state(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn broken(&self) -> Option<String> {
        if !self.is_broken.load(Ordering::Acquire) {
            return None;
        }
        self.state().broken.clone()
    }

    /// Breaks the connection: every request in flight fails with `reason`, later ones fail
    /// at once, the reader stops and the socket is shut down.
    fn break_connection(self: &Arc<Self>, reason: String) {
        let waiters = {
            let mut state = self.state();
            if state.broken.is_some() {
                return;
            }
            self.mark_broken(&mut state, &reason)
        };
        self.finish_break(&reason, waiters);
    }

    /// Records that the connection is broken and takes every request in flight; requests
    /// still queued are never sent, and the buffers they share are let go.
    fn mark_broken(&self, state: &mut State<B>, reason: &str) -> Vec<Waiter<B>> {
        tracing::warn!("NBD connection broken: {reason}");
        state.broken = Some(reason.to_owned());
        self.is_broken.store(true, Ordering::Release);
        state.outgoing.clear();
        state.pending.drain().map(|(_, p)| p.waiter).collect()
    }

    /// Fails `waiters` (taken by [`Self::mark_broken`]), stops the reader and shuts the
    /// socket down.
    fn finish_break(self: &Arc<Self>, reason: &str, waiters: Vec<Waiter<B>>) {
        for waiter in waiters {
            waiter.fail(ClientError::Disconnected(reason.to_owned()));
        }
        // The I/O task shuts the socket down, telling the server we are gone.
        self.stop.send_replace(true);
    }

    /// Registers a waiter that must have its reply by `deadline` and queues its request
    /// (`header` gets the cookie) for the I/O task.
    fn enqueue(
        &self,
        waiter: Waiter<B>,
        deadline: Instant,
        mut header: [u8; proto::REQUEST_HEADER_LEN],
        payload: Payload<'_, B>,
    ) -> Result<(), ClientError> {
        let was_idle = {
            let mut state = self.state();
            if let Some(reason) = &state.broken {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            let cookie = state.next_cookie;
            state.next_cookie = state.next_cookie.wrapping_add(1);
            state.pending.insert(cookie, Pending { deadline, waiter });
            header[8..16].copy_from_slice(&cookie.to_be_bytes());
            let was_idle = state.outgoing.is_empty();
            state.outgoing.push(&header, payload);
            was_idle
        };
        // Requests queued behind others ride with them: the writer takes the whole queue.
        if was_idle {
            self.send_ready.notify_one();
        }
        Ok(())
    }

    /// The watchdog's look at the requests in flight: breaks the connection if a deadline
    /// has passed, else returns the earliest one ahead (`None`: the connection is broken).
    fn expire_due(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut next = now + self.request_timeout;
        let expired: Vec<u64> = {
            let state = self.state();
            if state.broken.is_some() {
                return None;
            }
            let mut expired = Vec::new();
            for (cookie, pending) in &state.pending {
                if pending.deadline <= now {
                    expired.push(*cookie);
                } else {
                    next = next.min(pending.deadline);
                }
            }
            expired
        };
        if expired.is_empty() {
            return Some(next);
        }
        self.time_out(&expired);
        None
    }

    /// Breaks the connection because a request timed out: those of `cookies` still in
    /// flight fail with [`ClientError::TimedOut`], the others with
    /// [`ClientError::Disconnected`].
    fn time_out(self: &Arc<Self>, cookies: &[u64]) {
        let timeout = self.request_timeout;
        let reason = format!("a request got no reply within {timeout:?}");
        let (expired, waiters) = {
            let mut state = self.state();
            if state.broken.is_some() {
                return;
            }
            let expired: Vec<Waiter<B>> = cookies
                .iter()
                .filter_map(|cookie| state.pending.remove(cookie))
                .map(|pending| pending.waiter)
                .collect();
            (expired, self.mark_broken(&mut state, &reason))
        };
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        for waiter in expired {
            waiter.fail(ClientError::TimedOut(timeout));
        }
        self.finish_break(&reason, waiters);
    }
}

/// A connected, negotiated NBD client. Dropping it stops its I/O task; [`Client::close`]
/// says goodbye to the server first.
pub struct Client<B: ExportBuffer> {
    shared: Arc<Shared<B>>,
    io: tokio::task::JoinHandle<()>,
    watchdog: tokio::task::AbortHandle,
}

impl<B: ExportBuffer> std::fmt::Debug for Client<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("negotiated", &self.shared.negotiated)
            .field("broken", &self.shared.broken())
            .finish_non_exhaustive()
    }
}

impl<B: ExportBuffer> Drop for Client<B> {
    fn drop(&mut self) {
        self.io.abort();
        self.watchdog.abort();
    }
}

/// A socket type a client runs on, split into halves that need no lock between them.
trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    fn into_halves(self) -> (BoxedReader, BoxedWriter);
}

impl Transport for tokio::net::UnixStream {
    fn into_halves(self) -> (BoxedReader, BoxedWriter) {
        let (read, write) = self.into_split();
        (Box::new(read), Box::new(write))
    }
}

impl Transport for tokio::net::TcpStream {
    fn into_halves(self) -> (BoxedReader, BoxedWriter) {
        let (read, write) = self.into_split();
        (Box::new(read), Box::new(write))
    }
}

impl<B: ExportBuffer> Client<B> {
    /// Negotiates on `stream` (connected to the server) as `config` says, within its
    /// handshake deadline. Must be called within a tokio runtime; the I/O task is spawned
    /// on it.
    pub async fn connect(
        stream: ReceivedStream,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let deadline = config.handshake_timeout;
        tokio::time::timeout(deadline, Self::negotiate(stream, config))
            .await
            .map_err(|_| ClientError::HandshakeTimeout(deadline))?
    }

    async fn negotiate(stream: ReceivedStream, config: &ClientConfig) -> Result<Self, ClientError> {
        match stream {
            ReceivedStream::Unix(stream) => Self::negotiate_on(stream, config).await,
            ReceivedStream::Tcp(stream) => {
                let _ = stream.set_nodelay(true);
                Self::negotiate_on(stream, config).await
            }
        }
    }

    async fn negotiate_on<S: Transport>(
        mut stream: S,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let negotiated = match greet(&mut stream).await? {
            Greeting::Oldstyle(_) if config.tls.is_some() => {
                return Err(ClientError::Tls(
                    "the server greeted old-style, which cannot carry TLS".into(),
                ))
            }
            Greeting::Oldstyle(facts) => oldstyle(facts),
            Greeting::Newstyle(flags) => match &config.tls {
                Some((tls, name)) => {
                    let mut stream = upgrade(stream, flags, tls, name).await?;
                    let negotiated = options(&mut stream, config, flags, true).await?;
                    let (read, write) = tokio::io::split(stream);
                    return Ok(Self::start(
                        (Box::new(read), Box::new(write)),
                        negotiated,
                        config,
                    ));
                }
                None => options(&mut stream, config, flags, false).await?,
            },
        };
        Ok(Self::start(stream.into_halves(), negotiated, config))
    }

    fn start(
        (read, write): (BoxedReader, BoxedWriter),
        negotiated: Negotiated,
        config: &ClientConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            negotiated,
            request_timeout: config.request_timeout,
            max_queued: config.max_queued,
            state: Mutex::new(State {
                next_cookie: 1,
                pending: HashMap::default(),
                broken: None,
                outgoing: Outgoing::default(),
            }),
            send_ready: Notify::new(),
            is_broken: AtomicBool::new(false),
            slots: Semaphore::new(config.max_in_flight.max(1)),
            queued: AtomicUsize::new(0),
            stop: watch::channel(false).0,
            timeouts: AtomicU64::new(0),
        });
        let io = tokio::spawn(run_connection(
            Arc::clone(&shared),
            BufReader::with_capacity(64 * 1024, read),
            write,
        ));
        let watchdog = tokio::spawn(watch_deadlines(Arc::clone(&shared))).abort_handle();
        Self {
            shared,
            io,
            watchdog,
        }
    }

    /// What negotiation settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.shared.negotiated
    }

    /// Why the connection is broken, once it is.
    pub fn broken(&self) -> Option<String> {
        self.shared.broken()
    }

    /// Requests waiting for their reply.
    pub fn in_flight(&self) -> usize {
        self.shared.state().pending.len()
    }

    /// Requests that timed out (each broke the connection it was on).
    pub fn timeouts(&self) -> u64 {
        self.shared.timeouts.load(Ordering::Relaxed)
    }

    /// Runs one request (its payload at most the server's maximum) within the request
    /// deadline.
    async fn call<T>(
        &self,
        header: [u8; proto::REQUEST_HEADER_LEN],
        payload: Payload<'_, B>,
        waiter: Waiter<B>,
        reply: oneshot::Receiver<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let shared = &self.shared;
        let deadline = Instant::now() + shared.request_timeout;
        if let Some(reason) = shared.broken() {
            return Err(ClientError::Disconnected(reason));
        }
        let permit = match shared.slots.try_acquire() {
            Ok(permit) => permit,
            // Boxed: the wait (and its timer) is rare, and would make every request's
            // future larger.
            Err(_) => Box::pin(self.wait_for_slot(deadline)).await?,
        };
        // Sent by the I/O task; the connection's watchdog fails the reply at the
        // deadline, also when the server does not even read the request.
        shared.enqueue(waiter, deadline, header, payload)?;
        let result = reply
            .await
            .unwrap_or_else(|_| Err(ClientError::Disconnected("reader stopped".into())));
        drop(permit);
        result
    }

    /// Waits for a slot on the wire, within `deadline`, unless too many wait already.
    async fn wait_for_slot(
        &self,
        deadline: Instant,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, ClientError> {
        let shared = &self.shared;
        if shared.queued.fetch_add(1, Ordering::Relaxed) >= shared.max_queued {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ClientError::Busy);
        }
        let acquired = tokio::time::timeout_at(deadline, shared.slots.acquire()).await;
        shared.queued.fetch_sub(1, Ordering::Relaxed);
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ClientError::Disconnected("closed".into())),
            Err(_) => Err(self.timed_out(&[])),
        }
    }

    /// Breaks the connection for a request that timed out before it was sent (`cookies`:
    /// its cookie, once registered).
    fn timed_out(&self, cookies: &[u64]) -> ClientError {
        self.shared.time_out(cookies);
        ClientError::TimedOut(self.shared.request_timeout)
    }

    /// `len` bytes at `offset` cut into requests of at most the server's maximum: each
    /// request's offset and its range of the caller's buffer.
    fn chunks(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<impl Iterator<Item = (u64, Range<usize>)>, ClientError> {
        let max = usize::try_from(self.shared.negotiated.max_request).unwrap_or(usize::MAX);
        let size = self.shared.negotiated.size;
        let inside = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len))
            .is_some_and(|end| end <= size);
        if !inside {
            return Err(ClientError::Invalid(format!(
                "{len} bytes at offset {offset} are beyond the export's {size} bytes"
            )));
        }
        Ok((0..len)
            .step_by(max.max(1))
            .map(move |start| (offset + start as u64, start..len.min(start + max))))
    }

    /// Reads `buf.bytes().len()` bytes at `offset` into `buf`.
    pub async fn read(&self, offset: u64, mut buf: B) -> Result<B, ClientError> {
        let len = buf.bytes().len();
        for (at, range) in self.chunks(offset, len)? {
            let length = u32::try_from(range.len()).unwrap_or(u32::MAX);
            let (done, reply) = oneshot::channel();
            let waiter = Waiter::Read {
                buf,
                base: range.start,
                context: ChunkContext {
                    read: true,
                    offset: at,
                    length,
                },
                covered: Vec::new(),
                error: None,
                done,
            };
            let header = codec::encode_request(CMD_READ, 0, 0, at, length);
            buf = self.call(header, Payload::None, waiter, reply).await?;
        }
        Ok(buf)
    }

    /// A request without read data. Not an `async fn`: the future is [`Self::call`]'s own,
    /// so the waiter is not held twice in every request's future.
    fn command<'a>(
        &'a self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Payload<'a, B>,
    ) -> impl Future<Output = Result<(), ClientError>> + 'a {
        let (done, reply) = oneshot::channel();
        let waiter = Waiter::Command {
            context: ChunkContext {
                read: false,
                offset,
                length,
            },
            error: None,
            done,
        };
        let header = codec::encode_request(command, flags, 0, offset, length);
        self.call(header, payload, waiter, reply)
    }

    /// Writes `data` at `offset` (copied into the send queue).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        for (at, range) in self.chunks(offset, data.len())? {
            let length = u32::try_from(range.len()).unwrap_or(u32::MAX);
            let payload = Payload::Borrowed(&data[range]);
            self.command(CMD_WRITE, 0, at, length, payload).await?;
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`, sent straight from `data`: the send queue holds
    /// a reference until it is on the wire, so nothing is copied.
    pub async fn write_shared(&self, offset: u64, data: Arc<B>) -> Result<(), ClientError> {
        for (at, range) in self.chunks(offset, data.bytes().len())? {
            let length = u32::try_from(range.len()).unwrap_or(u32::MAX);
            let payload = Payload::Shared(&data, range);
            self.command(CMD_WRITE, 0, at, length, payload).await?;
        }
        Ok(())
    }

    /// Makes completed writes durable (nothing to do when the server has no flush).
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.shared.negotiated.can_flush() {
            return Ok(());
        }
        self.command(CMD_FLUSH, 0, 0, 0, Payload::None).await
    }

    /// Zeroes `len` bytes at `offset` with `NBD_CMD_WRITE_ZEROES`; `may_trim` lets the
    /// server deallocate them, `fast` asks it to refuse (`ENOTSUP`) rather than write.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<(), ClientError> {
        let negotiated = &self.shared.negotiated;
        if !negotiated.can_write_zeroes() || (fast && !negotiated.can_fast_zero()) {
            return Err(ClientError::Server {
                errno: libc::EOPNOTSUPP,
                message: String::new(),
            });
        }
        let mut flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        if fast {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len).await
    }

    /// Discards `len` bytes at `offset` with `NBD_CMD_TRIM` (what they read afterwards is up
    /// to the server).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.shared.negotiated.can_trim() {
            return Err(ClientError::Server {
                errno: libc::EOPNOTSUPP,
                message: String::new(),
            });
        }
        self.ranged(CMD_TRIM, 0, offset, len).await
    }

    /// A command without payload over `len` bytes, split at the server's maximum.
    async fn ranged(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let len =
            usize::try_from(len).map_err(|_| ClientError::Invalid("range too long".into()))?;
        for (at, range) in self.chunks(offset, len)? {
            let length = u32::try_from(range.len()).unwrap_or(u32::MAX);
            self.command(command, flags, at, length, Payload::None)
                .await?;
        }
        Ok(())
    }

    /// Says goodbye (`NBD_CMD_DISC`, which has no reply) once nothing is in flight, and
    /// stops the connection.
    pub async fn close(mut self) {
        let queued = {
            let mut state = self.shared.state();
            let queued = state.broken.is_none();
            if queued {
                let header = codec::encode_request(CMD_DISC, 0, 0, 0, 0);
                state.outgoing.push(&header, Payload::None);
                state.outgoing.closing = true;
            }
            queued
        };
        if queued {
            self.shared.send_ready.notify_one();
            // The I/O task ends once it has sent it and shut the socket down.
            let sent = tokio::time::timeout(Duration::from_secs(1), &mut self.io).await;
            if sent.is_err() {
                tracing::debug!("NBD disconnect not sent within 1 s");
            }
        }
        self.shared.break_connection("closed".into());
    }
}

fn oldstyle(facts: ExportFacts) -> Negotiated {
    Negotiated {
        size: facts.size,
        flags: facts.flags,
        style: HandshakeStyle::Oldstyle,
        structured: false,
        tls: false,
        min_block: 1,
        max_request: DEFAULT_MAX_BLOCK,
    }
}

enum Greeting {
    Oldstyle(ExportFacts),
    Newstyle(ServerFlags),
}

async fn read_exact<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ClientError> {
    stream
        .read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| ClientError::io(what, &e))
}

async fn write_all<S: AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), ClientError> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| ClientError::io(what, &e))?;
    stream.flush().await.map_err(|e| ClientError::io(what, &e))
}

/// Reads the greeting; for a newstyle server, sends the client flags.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<Greeting, ClientError> {
    let mut start = [0u8; codec::GREETING_START_LEN];
    read_exact(stream, &mut start, "reading the greeting").await?;
    match codec::parse_greeting_start(&start)? {
        GreetingStyle::Oldstyle => {
            let mut rest = [0u8; codec::OLDSTYLE_REST_LEN];
            read_exact(stream, &mut rest, "reading the old-style greeting").await?;
            Ok(Greeting::Oldstyle(codec::parse_oldstyle_rest(&rest)))
        }
        GreetingStyle::Newstyle => {
            let mut flags = [0u8; 2];
            read_exact(stream, &mut flags, "reading the handshake flags").await?;
            let flags = codec::parse_server_flags(flags);
            write_all(
                stream,
                &codec::client_flags(flags),
                "sending the client flags",
            )
            .await?;
            Ok(Greeting::Newstyle(flags))
        }
    }
}

/// One option reply: its type and payload.
async fn option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    option: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    let mut header = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    read_exact(stream, &mut header, "reading an option reply").await?;
    let header = codec::parse_option_reply_header(&header, option)?;
    let mut data = vec![0u8; usize::try_from(header.length).unwrap_or_default()];
    read_exact(stream, &mut data, "reading an option reply").await?;
    Ok((header.reply_type, data))
}

/// Sends `option` and reads its single reply.
async fn simple_option<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    let mut out = Vec::new();
    codec::encode_option(&mut out, option, &[]);
    write_all(stream, &out, "sending an option").await?;
    option_reply(stream, option).await
}

/// Upgrades a newstyle connection to TLS with `NBD_OPT_STARTTLS`.
async fn upgrade<S>(
    mut stream: S,
    flags: ServerFlags,
    tls: &ClientTls,
    name: &str,
) -> Result<tokio_rustls::client::TlsStream<S>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !flags.fixed_newstyle {
        return Err(ClientError::Tls(
            "the server is not fixed newstyle, so it cannot start TLS".into(),
        ));
    }
    let (reply, data) = simple_option(&mut stream, OPT_STARTTLS).await?;
    if reply != REP_ACK {
        return Err(ClientError::Tls(format!(
            "the server refused STARTTLS (reply {reply:#x}: {})",
            codec::error_text(&data)
        )));
    }
    let server_name = tokio_rustls::rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| ClientError::Tls(format!("server name {name:?}: {e}")))?;
    tls.connector
        .connect(server_name, stream)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))
}

/// The option phase after the greeting: structured replies, then `GO` (with `EXPORT_NAME`
/// as the fallback).
async fn options<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    config: &ClientConfig,
    flags: ServerFlags,
    tls: bool,
) -> Result<Negotiated, ClientError> {
    let mut structured = false;
    if flags.fixed_newstyle {
        let (reply, _) = simple_option(stream, OPT_STRUCTURED_REPLY).await?;
        match reply {
            REP_ACK => structured = true,
            REP_ERR_TLS_REQD => return Err(ClientError::TlsRequired),
            _ => {}
        }
        let mut out = Vec::new();
        codec::encode_go(&mut out, true, &config.export_name);
        write_all(stream, &out, "sending NBD_OPT_GO").await?;
        let mut facts = None;
        let mut sizes = None;
        loop {
            let (reply, data) = option_reply(stream, OPT_GO).await?;
            match reply {
                REP_INFO => match codec::parse_info(&data)? {
                    InfoItem::Export(export) => facts = Some(export),
                    InfoItem::BlockSize { min, max, .. } => sizes = Some((min, max)),
                    InfoItem::Other(_) => {}
                },
                REP_ACK => {
                    let facts = facts.ok_or_else(|| ClientProtoError::Invalid {
                        what: "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                    })?;
                    let (min, max) = sizes.unwrap_or((1, DEFAULT_MAX_BLOCK));
                    return Ok(Negotiated {
                        size: facts.size,
                        flags: facts.flags,
                        style: HandshakeStyle::Go,
                        structured,
                        tls,
                        min_block: min.max(1),
                        max_request: if max >= min.max(512) {
                            max.min(DEFAULT_MAX_BLOCK)
                        } else {
                            DEFAULT_MAX_BLOCK
                        },
                    });
                }
                REP_ERR_UNSUP => break,
                REP_ERR_TLS_REQD => return Err(ClientError::TlsRequired),
                error if error & (1 << 31) != 0 => {
                    return Err(ClientError::Refused {
                        option: "NBD_OPT_GO",
                        message: format!("{} (reply {error:#x})", codec::error_text(&data)),
                    })
                }
                // Replies a client may ignore.
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    codec::encode_export_name(&mut out, &config.export_name);
    write_all(stream, &out, "sending NBD_OPT_EXPORT_NAME").await?;
    let mut answer = [0u8; codec::EXPORT_NAME_REPLY_LEN];
    read_exact(stream, &mut answer, "reading the export").await?;
    let facts = codec::parse_export_name_reply(&answer);
    if !flags.no_zeroes {
        let mut zeros = [0u8; codec::EXPORT_NAME_PADDING];
        read_exact(stream, &mut zeros, "reading the export").await?;
    }
    Ok(Negotiated {
        size: facts.size,
        flags: facts.flags,
        style: HandshakeStyle::ExportName,
        structured,
        tls,
        min_block: 1,
        max_request: DEFAULT_MAX_BLOCK,
    })
}

/// Holds the requests in flight to their deadlines: one timer for the connection, set to
/// the earliest deadline, instead of one per request. A request past its deadline breaks
/// the connection (a hung server). Ends when the connection is broken or closed.
async fn watch_deadlines<B: ExportBuffer>(shared: Arc<Shared<B>>) {
    let mut stop = shared.stop.subscribe();
    let mut next = Instant::now() + shared.request_timeout;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep_until(next) => {}
        }
        match shared.expire_due() {
            Some(at) => next = at,
            None => return,
        }
    }
}

/// The connection's one I/O task: sends what requests queue, a batch at a time, and reads
/// replies, until the connection breaks, is stopped or closes; then shuts the socket down.
/// Both directions on one task: a batch is written (and its shared payloads let go) before
/// any reply to it can be read, and a server that does not read is the watchdog's to catch
/// while replies keep being read.
async fn run_connection<B: ExportBuffer>(
    shared: Arc<Shared<B>>,
    mut reader: BufReader<BoxedReader>,
    mut writer: BoxedWriter,
) {
    let mut stop = shared.stop.subscribe();
    let stopped = stop.wait_for(|stopped| *stopped);
    tokio::pin!(stopped);
    let replies = read_replies(&shared, &mut reader);
    tokio::pin!(replies);
    let mut batch = Outgoing::default();
    let broken = loop {
        let sending = !batch.is_empty();
        tokio::select! {
            biased;
            _ = &mut stopped => break None,
            reason = &mut replies => break Some(reason),
            sent = batch.send(&mut writer), if sending => match sent {
                Ok(()) => {
                    let closing = batch.closing;
                    batch.clear();
                    if closing {
                        break None;
                    }
                }
                Err(e) => break Some(ClientError::io("sending requests", &e).to_string()),
            },
            // Requests queued behind the first ride with it: the whole queue is taken.
            () = shared.send_ready.notified(), if !sending => {
                std::mem::swap(&mut shared.state().outgoing, &mut batch);
            }
        }
    };
    if let Some(reason) = broken {
        shared.break_connection(reason);
    }
    let _ = writer.shutdown().await;
}

/// Reads replies and completes their requests; returns why it stopped.
async fn read_replies<B: ExportBuffer>(
    shared: &Arc<Shared<B>>,
    reader: &mut BufReader<BoxedReader>,
) -> String {
    let structured = shared.negotiated.structured;
    loop {
        // Without structured replies every reply starts with a whole simple reply header:
        // read it at once. Otherwise the magic says what follows.
        let mut bytes = [0u8; SIMPLE_REPLY_LEN];
        let start = if structured {
            &mut bytes[..4]
        } else {
            &mut bytes[..]
        };
        match reader.read_exact(start).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return "the server closed the connection".into()
            }
            Err(e) => return format!("reading a reply: {e}"),
        }
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        let outcome = match codec::parse_reply_magic(magic, structured) {
            Ok(ReplyKind::Simple) => simple_reply(shared, reader, bytes, structured).await,
            Ok(ReplyKind::Chunk) => chunk(shared, reader, magic).await,
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = outcome {
            return reason;
        }
    }
}

fn take_waiter<B: ExportBuffer>(shared: &Shared<B>, cookie: u64) -> Result<Pending<B>, String> {
    shared
        .state()
        .pending
        .remove(&cookie)
        .ok_or_else(|| format!("the server replied to unknown cookie {cookie}"))
}

/// Reads `range` of `buf` (offset by `base`) from the socket.
async fn read_into<B: ExportBuffer>(
    reader: &mut BufReader<BoxedReader>,
    buf: &mut B,
    range: Range<usize>,
) -> Result<(), String> {
    let target = buf
        .bytes_mut()
        .get_mut(range)
        .ok_or_else(|| "read data does not fit the buffer".to_owned())?;
    reader
        .read_exact(target)
        .await
        .map(|_| ())
        .map_err(|e| format!("reading read data: {e}"))
}

/// A simple reply in `bytes`: all of it, or (`partial`) its first 4 bytes.
async fn simple_reply<B: ExportBuffer>(
    shared: &Arc<Shared<B>>,
    reader: &mut BufReader<BoxedReader>,
    mut bytes: [u8; SIMPLE_REPLY_LEN],
    partial: bool,
) -> Result<(), String> {
    if partial {
        reader
            .read_exact(&mut bytes[4..])
            .await
            .map_err(|e| format!("reading a reply: {e}"))?;
    }
    let reply = codec::parse_simple_reply(&bytes);
    let waiter = take_waiter(shared, reply.cookie)?.waiter;
    if reply.error != 0 {
        waiter.fail(ClientError::Server {
            errno: codec::errno_of_nbd_error(reply.error),
            message: String::new(),
        });
        return Ok(());
    }
    match waiter {
        Waiter::Read {
            mut buf,
            base,
            context,
            done,
            ..
        } => {
            let len = usize::try_from(context.length).unwrap_or(usize::MAX);
            read_into(reader, &mut buf, base..base + len).await?;
            let _ = done.send(Ok(buf));
        }
        Waiter::Command { done, .. } => {
            let _ = done.send(Ok(()));
        }
    }
    Ok(())
}

async fn chunk<B: ExportBuffer>(
    shared: &Arc<Shared<B>>,
    reader: &mut BufReader<BoxedReader>,
    magic: [u8; 4],
) -> Result<(), String> {
    let mut bytes = [0u8; STRUCTURED_HEADER_LEN];
    bytes[..4].copy_from_slice(&magic);
    reader
        .read_exact(&mut bytes[4..])
        .await
        .map_err(|e| format!("reading a reply chunk: {e}"))?;
    let header = codec::parse_chunk_header(&bytes);
    let Pending {
        deadline,
        mut waiter,
    } = take_waiter(shared, header.cookie)?;
    let context = waiter.context();
    let prefix_len = codec::chunk_prefix_len(&header, context).map_err(|e| e.to_string())?;
    let mut prefix = vec![0u8; prefix_len];
    reader
        .read_exact(&mut prefix)
        .await
        .map_err(|e| format!("reading a reply chunk: {e}"))?;
    let meaning = codec::parse_chunk(&header, &prefix, context).map_err(|e| e.to_string())?;
    match (&mut waiter, meaning) {
        (
            Waiter::Read {
                buf, base, covered, ..
            },
            ChunkMeaning::Data { range },
        ) => {
            cover(covered, range.clone()).map_err(|e| e.to_string())?;
            let base = *base;
            read_into(reader, buf, base + range.start..base + range.end).await?;
        }
        (
            Waiter::Read {
                buf, base, covered, ..
            },
            ChunkMeaning::Hole { range },
        ) => {
            cover(covered, range.clone()).map_err(|e| e.to_string())?;
            let base = *base;
            if let Some(zeros) = buf
                .bytes_mut()
                .get_mut(base + range.start..base + range.end)
            {
                zeros.fill(0);
            }
        }
        (
            Waiter::Read { error, .. } | Waiter::Command { error, .. },
            ChunkMeaning::Error {
                error: code,
                message,
            },
        ) => {
            if error.is_none() {
                *error = Some(Box::new(ClientError::Server {
                    errno: codec::errno_of_nbd_error(code),
                    message: if message.is_empty() {
                        message
                    } else {
                        format!(": {message}")
                    },
                }));
            }
        }
        (_, ChunkMeaning::Nothing) => {}
        // chunk_prefix_len refuses data and hole chunks for anything but reads.
        (Waiter::Command { .. }, ChunkMeaning::Data { .. } | ChunkMeaning::Hole { .. }) => {
            return Err("a data chunk answered a request that is not a read".into())
        }
    }
    if header.done {
        waiter.finish().map_err(|e| e.to_string())?;
    } else {
        shared
            .state()
            .pending
            .insert(header.cookie, Pending { deadline, waiter });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_refuses_overlaps() {
        let mut covered = Vec::new();
        cover(&mut covered, 4..8).unwrap();
        cover(&mut covered, 0..2).unwrap();
        assert_eq!(covered, [0..2, 4..8]);
        cover(&mut covered, 2..4).unwrap();
        assert_eq!(covered, vec![0..8]);
        assert!(cover(&mut covered, 7..9).is_err());
        assert!(cover(&mut covered, 0..1).is_err());
        cover(&mut covered, 8..9).unwrap();
        assert_eq!(covered, vec![0..9]);
    }
}
