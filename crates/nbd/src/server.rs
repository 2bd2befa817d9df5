//! Async NBD server on tokio: accepts UNIX socket connections (or takes already-connected
//! streams), runs the fixed newstyle handshake, then serves many requests in flight per
//! connection against an [`Export`].
//!
//! Per connection, after the handshake, one task parses requests from large buffered
//! reads, validates them with [`proto::classify_request`], runs every admitted request as a
//! future it polls itself, and writes replies in completion order with batched vectored
//! writes (see the `transmission` module). Requests in flight are bounded by
//! `max_requests_in_flight`, payload memory by a per-connection byte budget.
//!
//! A slow export call only delays its own reply: other requests on the same connection
//! and other connections keep going.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::Instrument;

use crate::backlog::PeerBacklog;
use crate::export::Export;
use crate::limit::{ConnectionLimit, Refusal};
use crate::proto::{
    self, Negotiation, OptionHeader, OptionOutcome, ProtoError, Session, TlsPolicy,
};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name shown by `NBD_OPT_LIST`; any name is accepted by GO / EXPORT_NAME.
    pub export_name: String,
    /// A handshake not finished within this time is dropped.
    pub handshake_timeout: Duration,
    /// Requests served concurrently per connection; when reached, reading pauses.
    pub max_requests_in_flight: usize,
    /// The handshake connections start with.
    pub handshake: Handshake,
    /// Require TLS (new-style only): clients must `NBD_OPT_STARTTLS` before anything else.
    pub tls: Option<crate::tls::Tls>,
    /// On UNIX sockets, hold small read replies back while the client still has plenty
    /// unread and send them together (see the `transmission` module).
    pub gather_replies: bool,
    /// The cap on live connections this server counts in (shared with other servers as
    /// the caller chooses); connections beyond it are refused (see the `limit` module).
    /// `None`: no cap.
    pub connection_limit: Option<Arc<ConnectionLimit>>,
}

/// How a connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handshake {
    /// Fixed newstyle negotiation (options, structured replies, metadata contexts).
    #[default]
    Newstyle,
    /// The old-style greeting (size and flags), then transmission with simple replies.
    Oldstyle,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            handshake_timeout: Duration::from_secs(10),
            max_requests_in_flight: 64,
            handshake: Handshake::Newstyle,
            tls: None,
            gather_replies: true,
            connection_limit: None,
        }
    }
}

/// Anything a connection can run over.
trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

type BoxedStream = Box<dyn ByteStream>;
type ConnectionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type ServeFn = dyn Fn(BoxedStream, Option<PeerBacklog>, watch::Receiver<bool>) -> ConnectionFuture
    + Send
    + Sync;

struct Shared {
    runtime: Handle,
    serve: Box<ServeFn>,
    shutdown: watch::Sender<bool>,
    connections: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    connection_ended: Notify,
    /// [`ServerConfig::gather_replies`].
    gather_replies: bool,
    /// [`ServerConfig::connection_limit`].
    limit: Option<Arc<ConnectionLimit>>,
    /// [`ServerConfig::handshake`], for refusals.
    handshake: Handshake,
}

impl Shared {
    fn lock_connections(&self) -> MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A backlog probe for a UNIX-socket connection, when replies are gathered.
    fn backlog_probe(&self, socket: &impl std::os::fd::AsFd) -> Option<PeerBacklog> {
        if !self.gather_replies {
            return None;
        }
        PeerBacklog::of(socket)
            .inspect_err(|error| tracing::debug!(%error, "no backlog probe: replies not gathered"))
            .ok()
    }

    /// Serves `stream`; `backlog` probes it when it is a UNIX socket.
    fn spawn_connection(self: &Arc<Self>, stream: BoxedStream, backlog: Option<PeerBacklog>) {
        if *self.shutdown.borrow() {
            tracing::debug!("NBD server shutting down: dropping new connection");
            return;
        }
        let place = match self.limit.as_ref().map(ConnectionLimit::admit) {
            None => None,
            Some(Ok(place)) => Some(place),
            Some(Err(refusal)) => {
                drop(backlog);
                self.refuse(stream, refusal);
                return;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let future = (self.serve)(stream, backlog, self.shutdown.subscribe());
        let shared = Arc::clone(self);
        // Hold the lock across spawn so the task's own removal happens after the insert.
        let mut connections = self.lock_connections();
        let span = tracing::debug_span!("nbd_connection", id);
        let handle = self.runtime.spawn(
            async move {
                let _guard = ConnectionGuard { shared, id };
                let _place = place;
                future.await;
            }
            .instrument(span),
        );
        connections.insert(id, handle.abort_handle());
    }

    /// Turns away a connection beyond the cap: newstyle clients are told why, old-style
    /// ones (and any beyond the cap on refusals) are closed at once.
    fn refuse(&self, stream: BoxedStream, refusal: Option<Refusal>) {
        let Some(refusal) = refusal.filter(|_| self.handshake == Handshake::Newstyle) else {
            tracing::debug!("NBD connection over the cap: closed");
            return;
        };
        tracing::info!("NBD connection refused: {}", refusal.message);
        self.runtime.spawn(async move {
            crate::limit::refuse_newstyle(stream, &refusal).await;
        });
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
                        Ok((stream, _)) => {
                            let backlog = shared.backlog_probe(&stream);
                            shared.spawn_connection(Box::new(stream), backlog);
                        }
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

    /// Start accepting TCP connections (Nagle off) on an already-bound listener. Give the
    /// config [`ServerConfig::tls`] unless plaintext over the network is really wanted.
    pub fn start_tcp<E: Export>(
        listener: tokio::net::TcpListener,
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
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            tracing::debug!(%peer, "NBD TCP connection");
                            shared.spawn_connection(Box::new(stream), None);
                        }
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

    /// Start accepting hand-over connections on `listener`: each helper passes one
    /// connected client socket over `SCM_RIGHTS` (see [`crate::handover`]) and is closed;
    /// the client socket is then served like an accepted connection. A helper that sends
    /// nothing within the handshake timeout is dropped.
    pub fn start_fd_receiver<E: Export>(
        listener: UnixListener,
        export: Arc<E>,
        config: ServerConfig,
    ) -> NbdServer {
        let timeout = config.handshake_timeout;
        let mut server = Self::new(export, config);
        let shared = Arc::clone(&server.shared);
        let mut shutdown = shared.shutdown.subscribe();
        server.accept = Some(server.shared.runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    accepted = listener.accept() => match accepted {
                        Ok((helper, _)) => {
                            let shared = Arc::clone(&shared);
                            tokio::spawn(async move {
                                let received = tokio::time::timeout(
                                    timeout,
                                    crate::handover::receive_stream(&helper),
                                )
                                .await;
                                drop(helper);
                                match received {
                                    Ok(Ok((id, stream))) => {
                                        tracing::info!(%id, "NBD client socket handed over");
                                        match stream {
                                            crate::handover::ReceivedStream::Unix(s) => {
                                                let backlog = shared.backlog_probe(&s);
                                                shared.spawn_connection(Box::new(s), backlog);
                                            }
                                            crate::handover::ReceivedStream::Tcp(s) => {
                                                shared.spawn_connection(Box::new(s), None);
                                            }
                                        }
                                    }
                                    Ok(Err(error)) => {
                                        tracing::warn!(%error, "NBD socket hand-over failed");
                                    }
                                    Err(_) => tracing::warn!("NBD socket hand-over timed out"),
                                }
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%error, "NBD hand-over accept failed; retrying");
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
        let gather_replies = config.gather_replies;
        let limit = config.connection_limit.clone();
        let handshake = config.handshake;
        let config = Arc::new(config);
        let serve = move |stream: BoxedStream,
                          backlog: Option<PeerBacklog>,
                          shutdown: watch::Receiver<bool>| {
            let export = Arc::clone(&export);
            let config = Arc::clone(&config);
            Box::pin(serve_connection(export, config, stream, backlog, shutdown))
                as ConnectionFuture
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
                gather_replies,
                limit,
                handshake,
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
        self.shared.spawn_connection(Box::new(stream), None);
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

/// Fixed newstyle negotiation. With `tls`, TLS is required ([`TlsPolicy::Required`]: the
/// negotiation state machine refuses everything else until `NBD_OPT_STARTTLS`, then this
/// runs the TLS handshake and negotiation continues inside TLS). Returns the stream to use
/// for transmission (the TLS stream when upgraded).
async fn handshake<E: Export>(
    mut stream: BoxedStream,
    export: &E,
    export_name: &str,
    tls: Option<&crate::tls::Tls>,
) -> Result<(BoxedStream, Session, bool), HandshakeError> {
    stream.write_all(&proto::server_greeting()).await?;
    stream.flush().await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(flags)?;
    let policy = if tls.is_some() {
        TlsPolicy::Required
    } else {
        TlsPolicy::Plaintext
    };
    let mut negotiation = Negotiation::new(export_name, export.info(), client, policy);
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
            OptionOutcome::StartTls => {
                // Only a negotiation under TlsPolicy::Required asks for it, so `tls` is set.
                let settings = tls.ok_or_else(|| io::Error::other("STARTTLS without TLS"))?;
                stream = Box::new(settings.acceptor.accept(stream).await?);
            }
            OptionOutcome::Close => return Err(HandshakeError::Aborted),
            OptionOutcome::Transmission(session) => {
                return Ok((stream, session, negotiation.extended_headers()))
            }
        }
    }
}

async fn oldstyle_handshake<E: Export>(
    mut stream: BoxedStream,
    export: &E,
) -> Result<(BoxedStream, Session, bool), HandshakeError> {
    let info = export.info();
    stream.write_all(&proto::oldstyle_greeting(&info)).await?;
    stream.flush().await?;
    Ok((stream, proto::oldstyle_session(&info), false))
}

async fn serve_connection<E: Export>(
    export: Arc<E>,
    config: Arc<ServerConfig>,
    stream: BoxedStream,
    backlog: Option<PeerBacklog>,
    mut shutdown: watch::Receiver<bool>,
) {
    let negotiated = tokio::select! {
        _ = stopped(&mut shutdown) => return,
        result = tokio::time::timeout(
            config.handshake_timeout,
            async {
                match config.handshake {
                    Handshake::Newstyle => {
                        handshake(stream, export.as_ref(), &config.export_name, config.tls.as_ref())
                            .await
                    }
                    Handshake::Oldstyle => oldstyle_handshake(stream, export.as_ref()).await,
                }
            },
        ) => result,
    };
    let (stream, session, extended) = match negotiated {
        Ok(Ok(negotiated)) => negotiated,
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
    crate::transmission::serve(
        export,
        session,
        extended,
        config.max_requests_in_flight,
        backlog,
        stream,
        &mut shutdown,
    )
    .await;
}
