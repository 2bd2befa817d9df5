//! Async NBD server on tokio: accepts UNIX socket connections (or takes already-connected
//! streams), runs the fixed newstyle handshake, then serves many requests in flight per
//! connection against an [`Export`].
//!
//! Per connection, after the handshake:
//! * the connection task reads request headers (and write payloads), validates them with
//!   [`proto::classify_request`] and spawns one task per request, holding a semaphore
//!   permit each; when `max_requests_in_flight` permits are taken it stops reading (a
//!   permit is held until the reply has been written, and data-carrying requests also
//!   draw from a per-connection byte budget, so memory per connection stays bounded);
//! * a writer task takes finished replies from a channel and writes them in completion
//!   order, batching whatever is queued into one flush.
//!
//! A slow export call only delays its own reply: other requests on the same connection
//! and other connections keep going.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::UnixListener;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tracing::Instrument;

use crate::proto::{
    self, Command, Negotiation, OptionHeader, OptionOutcome, ProtoError, ReadChunk, RequestAction,
    RequestHeader, Session,
};
pub use crate::proto::{ExportInfo, Extent, WriteZeroesFlags};

/// `ENOTSUP`, the answer of the optional [`Export`] methods by default.
const ENOTSUP_RAW: i32 = 95;

/// The disk behind an export. Errors are `io::Error`; the server maps `raw_os_error()` to
/// NBD errors (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN; anything
/// else becomes EIO). Calls may take a long time (the disk may be paused): the server keeps
/// serving other connections and other requests of the same connection meanwhile.
pub trait Export: Send + Sync + 'static {
    /// Current facts about the export; read once per connection at negotiation.
    fn info(&self) -> ExportInfo;

    /// Read `buf.len()` bytes at `offset` into `buf` and give it back.
    fn read(&self, offset: u64, buf: Vec<u8>) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// Write `data` at `offset`; with `fua` the data is durable before this returns.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Discard `[offset, offset + len)`. Default: `ENOTSUP`.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Err(io::Error::from_raw_os_error(ENOTSUP_RAW)) }
    }

    /// Zero `[offset, offset + len)`. Default: `ENOTSUP`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: WriteZeroesFlags,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, flags);
        async { Err(io::Error::from_raw_os_error(ENOTSUP_RAW)) }
    }

    /// Prefetch `[offset, offset + len)`. Default: nothing to do.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len);
        async { Ok(()) }
    }

    /// Allocation status of `[offset, offset + len)`: extents in order, may cover less
    /// than `len` (at least one extent). Default: one allocated extent.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        let _ = offset;
        async move {
            Ok(vec![Extent {
                length: len,
                flags: 0,
            }])
        }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name shown by `NBD_OPT_LIST`; any name is accepted by GO / EXPORT_NAME.
    pub export_name: String,
    /// A handshake not finished within this time is dropped.
    pub handshake_timeout: Duration,
    /// Requests served concurrently per connection; when reached, reading pauses.
    pub max_requests_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            handshake_timeout: Duration::from_secs(10),
            max_requests_in_flight: 64,
        }
    }
}

/// Anything a connection can run over.
trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

type BoxedStream = Box<dyn ByteStream>;
type ConnectionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type ServeFn = dyn Fn(BoxedStream, watch::Receiver<bool>) -> ConnectionFuture + Send + Sync;

struct Shared {
    runtime: Handle,
    serve: Box<ServeFn>,
    shutdown: watch::Sender<bool>,
    connections: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    connection_ended: Notify,
}

impl Shared {
    fn lock_connections(&self) -> MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn_connection(self: &Arc<Self>, stream: BoxedStream) {
        if *self.shutdown.borrow() {
            tracing::debug!("NBD server shutting down: dropping new connection");
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let future = (self.serve)(stream, self.shutdown.subscribe());
        let shared = Arc::clone(self);
        // Hold the lock across spawn so the task's own removal happens after the insert.
        let mut connections = self.lock_connections();
        let span = tracing::debug_span!("nbd_connection", id);
        let handle = self.runtime.spawn(
            async move {
                let _guard = ConnectionGuard { shared, id };
                future.await;
            }
            .instrument(span),
        );
        connections.insert(id, handle.abort_handle());
    }

    /// Live connections, forgetting tasks that ended without running their guard.
    fn live_connections(&self) -> usize {
        let mut connections = self.lock_connections();
        connections.retain(|_, handle| !handle.is_finished());
        connections.len()
    }
}

/// Removes a connection from the table when its task ends (or is aborted).
struct ConnectionGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.lock_connections().remove(&self.id);
        self.shared.connection_ended.notify_waiters();
    }
}

/// A running NBD server: an optional accept loop plus its connections.
pub struct NbdServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("connections", &self.connections())
            .field("accepting", &self.accept.is_some())
            .finish()
    }
}

impl NbdServer {
    /// Start accepting on an already-bound listener; each connection is served by tasks on
    /// the current tokio runtime. `export` is shared by all connections.
    ///
    /// Must be called from within a tokio runtime (panics otherwise, like `tokio::spawn`).
    pub fn start<E: Export>(
        listener: UnixListener,
        export: Arc<E>,
        config: ServerConfig,
    ) -> NbdServer {
        let mut server = Self::new(export, config);
        let shared = Arc::clone(&server.shared);
        let mut shutdown = shared.shutdown.subscribe();
        server.accept = Some(server.shared.runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => shared.spawn_connection(Box::new(stream)),
                        Err(error) => {
                            tracing::warn!(%error, "NBD accept failed; retrying");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }));
        server
    }

    /// A server without a listener: connections come only from [`NbdServer::serve_stream`].
    /// Must be called from within a tokio runtime.
    pub fn without_listener<E: Export>(export: Arc<E>, config: ServerConfig) -> NbdServer {
        Self::new(export, config)
    }

    fn new<E: Export>(export: Arc<E>, config: ServerConfig) -> NbdServer {
        let config = Arc::new(config);
        let serve = move |stream: BoxedStream, shutdown: watch::Receiver<bool>| {
            let export = Arc::clone(&export);
            let config = Arc::clone(&config);
            Box::pin(serve_connection(export, config, stream, shutdown)) as ConnectionFuture
        };
        let (shutdown, _) = watch::channel(false);
        NbdServer {
            shared: Arc::new(Shared {
                runtime: Handle::current(),
                serve: Box::new(serve),
                shutdown,
                connections: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                connection_ended: Notify::new(),
            }),
            accept: None,
        }
    }

    /// Serve one already-connected stream (fd hand-over, tests). The export is the one the
    /// server was created with.
    pub fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.shared.spawn_connection(Box::new(stream));
    }

    /// Number of live connections (handshaking or transmitting).
    pub fn connections(&self) -> usize {
        self.shared.live_connections()
    }

    /// Stop accepting, close every connection (in-flight requests are abandoned: their
    /// tasks are aborted and their replies dropped), and wait until every connection task
    /// has ended.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        loop {
            let ended = self.shared.connection_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.shared.live_connections() == 0 {
                break;
            }
            // Connections notice the shutdown signal and wind down; the timeout only
            // guards against a task that ended without running its guard.
            let _ = tokio::time::timeout(Duration::from_millis(100), ended).await;
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // Dropped without shutdown(): signal every connection and stop accepting; the
        // tasks end on their own.
        self.shared.shutdown.send_replace(true);
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

/// Resolves once shutdown has been signalled (or the server is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// Why the handshake did not reach transmission.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("I/O error during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation during handshake: {0}")]
    Protocol(#[from] ProtoError),
    #[error("client aborted the negotiation")]
    Aborted,
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin, E: Export>(
    stream: &mut S,
    export: &E,
    export_name: &str,
) -> Result<Session, HandshakeError> {
    stream.write_all(&proto::server_greeting()).await?;
    stream.flush().await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(flags)?;
    let mut negotiation = Negotiation::new(export_name, export.info(), client);
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(256);
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let header = OptionHeader::parse(&header)?;
        // parse() bounds the length by MAX_OPTION_LEN (64 KiB).
        let length = usize::try_from(header.length).unwrap_or(usize::MAX);
        data.clear();
        data.resize(length, 0);
        stream.read_exact(&mut data).await?;
        out.clear();
        let outcome = negotiation.handle_option(header, &data, &mut out)?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Close => return Err(HandshakeError::Aborted),
            OptionOutcome::Transmission(session) => return Ok(session),
        }
    }
}

async fn serve_connection<E: Export>(
    export: Arc<E>,
    config: Arc<ServerConfig>,
    mut stream: BoxedStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let negotiated = tokio::select! {
        _ = stopped(&mut shutdown) => return,
        result = tokio::time::timeout(
            config.handshake_timeout,
            handshake(&mut stream, export.as_ref(), &config.export_name),
        ) => result,
    };
    let session = match negotiated {
        Ok(Ok(session)) => session,
        Ok(Err(error)) => {
            tracing::debug!(%error, "NBD handshake ended");
            return;
        }
        Err(_) => {
            tracing::info!(
                timeout = ?config.handshake_timeout,
                "NBD handshake timed out; dropping connection"
            );
            return;
        }
    };
    transmission(export, &config, stream, shutdown, session).await;
}

/// One reply (or one structured chunk sequence) ready for the wire.
enum Reply {
    /// A simple reply header without payload.
    Simple([u8; proto::SIMPLE_REPLY_LEN]),
    /// A successful simple read reply: header, then the data.
    SimpleData([u8; proto::SIMPLE_REPLY_LEN], Vec<u8>),
    /// Pre-encoded bytes (structured chunks without data).
    Bytes(Vec<u8>),
    /// Protocol bytes interleaved with ranges of a data buffer: for each piece, write
    /// `meta[piece.0]` then `data[piece.1]`.
    WithData {
        meta: Vec<u8>,
        data: Vec<u8>,
        pieces: Vec<(Range<usize>, Range<usize>)>,
    },
}

async fn write_reply<W: AsyncWrite + Unpin>(out: &mut W, reply: &Reply) -> io::Result<()> {
    match reply {
        Reply::Simple(header) => out.write_all(header).await,
        Reply::SimpleData(header, data) => {
            out.write_all(header).await?;
            out.write_all(data).await
        }
        Reply::Bytes(bytes) => out.write_all(bytes).await,
        Reply::WithData { meta, data, pieces } => {
            for (meta_range, data_range) in pieces {
                if let Some(bytes) = meta.get(meta_range.clone()) {
                    out.write_all(bytes).await?;
                }
                if let Some(bytes) = data.get(data_range.clone()) {
                    out.write_all(bytes).await?;
                }
            }
            Ok(())
        }
    }
}

/// Bytes of request and reply data one connection may hold in memory at once (write
/// payloads being read or executed, read buffers until their reply is written).
const BYTES_IN_FLIGHT: usize = 128 * 1024 * 1024;
/// Granularity of the byte budget.
const BUDGET_UNIT: usize = 4096;
const BUDGET_UNITS: usize = BYTES_IN_FLIGHT / BUDGET_UNIT;

/// A reply queued for the writer, with the permits it holds until it has been written:
/// one request slot and its share of the byte budget.
struct Outgoing {
    reply: Reply,
    _slot: OwnedSemaphorePermit,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Budget units for `length` data bytes (a request larger than the whole budget takes all
/// of it, so it still runs, alone).
fn budget_units(length: u32) -> u32 {
    let units = usize::try_from(length)
        .unwrap_or(usize::MAX)
        .div_ceil(BUDGET_UNIT)
        .min(BUDGET_UNITS);
    u32::try_from(units).unwrap_or(u32::MAX)
}

async fn writer_loop<W: AsyncWrite + Unpin>(writer: W, mut replies: mpsc::Receiver<Outgoing>) {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    let result: io::Result<()> = async {
        while let Some(outgoing) = replies.recv().await {
            write_reply(&mut out, &outgoing.reply).await?;
            drop(outgoing);
            // Batch everything already queued into one flush.
            while let Ok(outgoing) = replies.try_recv() {
                write_reply(&mut out, &outgoing.reply).await?;
            }
            out.flush().await?;
        }
        out.shutdown().await
    }
    .await;
    if let Err(error) = result {
        tracing::debug!(%error, "NBD reply writer stopped");
    }
}

/// Per-connection limits: request slots and the data byte budget.
struct Permits {
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
}

/// How the request-reading loop ended.
enum ReadEnd {
    /// `NBD_CMD_DISC`: finish in-flight requests, then close.
    Disconnect,
    /// End of stream at a request boundary: finish in-flight requests, then close.
    Eof,
    /// Protocol violation or I/O error: abandon everything and close.
    Broken(String),
}

async fn transmission<E: Export>(
    export: Arc<E>,
    config: &ServerConfig,
    stream: BoxedStream,
    mut shutdown: watch::Receiver<bool>,
    session: Session,
) {
    let in_flight = config.max_requests_in_flight.max(1);
    let (mut reader, writer) = tokio::io::split(stream);
    let (replies, reply_queue) = mpsc::channel::<Outgoing>(in_flight);
    let mut writer_task = tokio::spawn(writer_loop(writer, reply_queue));
    let permits = Permits {
        slots: Arc::new(Semaphore::new(in_flight)),
        budget: Arc::new(Semaphore::new(BUDGET_UNITS)),
    };
    let mut tasks: JoinSet<()> = JoinSet::new();
    let session = Arc::new(session);

    let end = tokio::select! {
        _ = stopped(&mut shutdown) => None,
        end = read_requests(&mut reader, &export, &session, &replies, &permits, &mut tasks) => Some(end),
    };
    let graceful = match end {
        Some(ReadEnd::Disconnect) | Some(ReadEnd::Eof) => true,
        Some(ReadEnd::Broken(reason)) => {
            tracing::debug!(%reason, "NBD connection closed");
            false
        }
        None => false,
    };
    drop(replies);
    if graceful {
        let drained = tokio::select! {
            _ = stopped(&mut shutdown) => false,
            _ = async {
                while let Some(result) = tasks.join_next().await {
                    log_task_end(result);
                }
                let _ = (&mut writer_task).await;
            } => true,
        };
        if drained {
            return;
        }
    }
    tasks.shutdown().await;
    writer_task.abort();
    let _ = writer_task.await;
}

fn log_task_end(result: Result<(), tokio::task::JoinError>) {
    if let Err(error) = result {
        if error.is_panic() {
            tracing::error!(%error, "NBD request task panicked");
        }
    }
}

/// Read `buf.len()` bytes; `Ok(false)` when the stream ended before the first byte.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended after {filled} of {} header bytes", buf.len()),
            ));
        }
        filled += n;
    }
    Ok(true)
}

/// Read and drop `count` payload bytes.
async fn discard<R: AsyncRead + Unpin>(
    reader: &mut R,
    count: u32,
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    let mut left = usize::try_from(count).unwrap_or(usize::MAX);
    scratch.resize(64 * 1024, 0);
    while left > 0 {
        let take = left.min(scratch.len());
        reader.read_exact(&mut scratch[..take]).await?;
        left -= take;
    }
    Ok(())
}

async fn read_requests<R: AsyncRead + Unpin, E: Export>(
    reader: &mut R,
    export: &Arc<E>,
    session: &Arc<Session>,
    replies: &mpsc::Sender<Outgoing>,
    permits: &Permits,
    tasks: &mut JoinSet<()>,
) -> ReadEnd {
    let mut scratch = Vec::new();
    loop {
        while let Some(result) = tasks.try_join_next() {
            log_task_end(result);
        }
        let Ok(slot) = Arc::clone(&permits.slots).acquire_owned().await else {
            return ReadEnd::Broken("request semaphore closed".into());
        };
        let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
        match read_exact_or_eof(reader, &mut raw).await {
            Ok(true) => {}
            Ok(false) => return ReadEnd::Eof,
            Err(error) => return ReadEnd::Broken(format!("reading request header: {error}")),
        }
        let header = match RequestHeader::parse(&raw) {
            Ok(header) => header,
            Err(error) => return ReadEnd::Broken(error.to_string()),
        };
        let action = match proto::classify_request(session, &header) {
            Ok(action) => action,
            Err(error) => return ReadEnd::Broken(error.to_string()),
        };
        match action {
            RequestAction::Disconnect => return ReadEnd::Disconnect,
            RequestAction::Reject {
                error,
                discard: payload,
                reason,
            } => {
                tracing::debug!(
                    command = header.command,
                    offset = header.offset,
                    length = header.length,
                    error,
                    reason,
                    "NBD request rejected"
                );
                if payload > 0 {
                    if let Err(io_error) = discard(reader, payload, &mut scratch).await {
                        return ReadEnd::Broken(format!(
                            "reading {payload}-byte payload of a rejected write: {io_error}"
                        ));
                    }
                }
                let outgoing = Outgoing {
                    reply: error_reply(session.structured, header.cookie, error, reason),
                    _slot: slot,
                    _budget: None,
                };
                if replies.send(outgoing).await.is_err() {
                    return ReadEnd::Broken("reply writer is gone".into());
                }
            }
            RequestAction::Execute(command) => {
                let data_len = match command {
                    Command::Read { length, .. } | Command::Write { length, .. } => length,
                    _ => 0,
                };
                let budget = if data_len > 0 {
                    let units = budget_units(data_len);
                    match Arc::clone(&permits.budget).acquire_many_owned(units).await {
                        Ok(permit) => Some(permit),
                        Err(_) => return ReadEnd::Broken("byte budget semaphore closed".into()),
                    }
                } else {
                    None
                };
                let payload = match command {
                    Command::Write { length, .. } => {
                        let mut payload = vec![0u8; usize::try_from(length).unwrap_or(0)];
                        if let Err(io_error) = reader.read_exact(&mut payload).await {
                            return ReadEnd::Broken(format!(
                                "reading {length}-byte write payload: {io_error}"
                            ));
                        }
                        payload
                    }
                    _ => Vec::new(),
                };
                tasks.spawn(run_command(
                    Arc::clone(export),
                    session.structured,
                    header.cookie,
                    command,
                    payload,
                    replies.clone(),
                    (slot, budget),
                ));
            }
        }
    }
}

fn error_reply(structured: bool, cookie: u64, error: u32, message: &str) -> Reply {
    if structured {
        let mut bytes = Vec::with_capacity(proto::STRUCTURED_HEADER_LEN + 6 + message.len());
        proto::encode_error_chunk(&mut bytes, cookie, error, message);
        Reply::Bytes(bytes)
    } else {
        Reply::Simple(proto::simple_reply(cookie, error))
    }
}

fn io_error_reply(structured: bool, cookie: u64, error: &io::Error) -> Reply {
    error_reply(
        structured,
        cookie,
        proto::nbd_error_from_io(error),
        &error.to_string(),
    )
}

fn status_reply(structured: bool, cookie: u64, result: io::Result<()>) -> Reply {
    match result {
        Ok(()) => Reply::Simple(proto::simple_reply(cookie, 0)),
        Err(error) => io_error_reply(structured, cookie, &error),
    }
}

fn read_reply(
    structured: bool,
    cookie: u64,
    offset: u64,
    data: Vec<u8>,
    no_fragment: bool,
) -> Reply {
    if !structured {
        return Reply::SimpleData(proto::simple_reply(cookie, 0), data);
    }
    if data.is_empty() {
        let mut bytes = Vec::with_capacity(proto::STRUCTURED_HEADER_LEN);
        proto::encode_none_chunk(&mut bytes, cookie);
        return Reply::Bytes(bytes);
    }
    let chunks = if no_fragment {
        vec![ReadChunk::Data {
            offset,
            range: 0..data.len(),
        }]
    } else {
        proto::split_read(offset, &data)
    };
    let mut meta = Vec::with_capacity(chunks.len() * 32);
    let mut pieces = Vec::with_capacity(chunks.len());
    let last = chunks.len().saturating_sub(1);
    for (index, chunk) in chunks.into_iter().enumerate() {
        let start = meta.len();
        let done = index == last;
        match chunk {
            ReadChunk::Data { offset, range } => {
                let length = u32::try_from(range.len()).unwrap_or(u32::MAX);
                proto::encode_offset_data_header(&mut meta, cookie, offset, length, done);
                pieces.push((start..meta.len(), range));
            }
            ReadChunk::Hole { offset, length } => {
                proto::encode_offset_hole(&mut meta, cookie, offset, length, done);
                pieces.push((start..meta.len(), 0..0));
            }
        }
    }
    Reply::WithData { meta, data, pieces }
}

async fn run_command<E: Export>(
    export: Arc<E>,
    structured: bool,
    cookie: u64,
    command: Command,
    payload: Vec<u8>,
    replies: mpsc::Sender<Outgoing>,
    (slot, budget): (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) {
    let reply = match command {
        Command::Read {
            offset,
            length,
            no_fragment,
        } => {
            let wanted = usize::try_from(length).unwrap_or(0);
            match export.read(offset, vec![0u8; wanted]).await {
                Ok(data) if data.len() == wanted => {
                    read_reply(structured, cookie, offset, data, no_fragment)
                }
                Ok(data) => error_reply(
                    structured,
                    cookie,
                    proto::EIO,
                    &format!(
                        "export returned {} bytes for a {wanted}-byte read at offset {offset}",
                        data.len()
                    ),
                ),
                Err(error) => io_error_reply(structured, cookie, &error),
            }
        }
        Command::Write { offset, fua, .. } => {
            status_reply(structured, cookie, export.write(offset, payload, fua).await)
        }
        Command::Flush => status_reply(structured, cookie, export.flush().await),
        Command::Trim {
            offset,
            length,
            fua,
        } => status_reply(
            structured,
            cookie,
            export.trim(offset, u64::from(length), fua).await,
        ),
        Command::WriteZeroes {
            offset,
            length,
            flags,
        } => status_reply(
            structured,
            cookie,
            export.write_zeroes(offset, u64::from(length), flags).await,
        ),
        Command::Cache { offset, length } => status_reply(
            structured,
            cookie,
            export.cache(offset, u64::from(length)).await,
        ),
        Command::BlockStatus {
            offset,
            length,
            req_one,
            context,
        } => match export.block_status(offset, u64::from(length)).await {
            Ok(extents) => {
                let limit = if req_one {
                    1
                } else {
                    proto::MAX_EXTENTS_PER_REPLY
                };
                let descriptors = proto::clamp_extents(&extents, length, limit);
                if descriptors.is_empty() {
                    error_reply(
                        structured,
                        cookie,
                        proto::EIO,
                        &format!("export gave no extents for offset {offset} length {length}"),
                    )
                } else {
                    let mut bytes = Vec::with_capacity(24 + descriptors.len() * 8);
                    proto::encode_block_status_chunk(&mut bytes, cookie, context, &descriptors);
                    Reply::Bytes(bytes)
                }
            }
            Err(error) => io_error_reply(structured, cookie, &error),
        },
    };
    // The writer may be gone (client vanished); the reply is then dropped.
    let _ = replies
        .send(Outgoing {
            reply,
            _slot: slot,
            _budget: budget,
        })
        .await;
}
