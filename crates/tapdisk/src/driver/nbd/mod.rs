//! The `nbd` image driver (the C stack's type 15): an image served by an NBD server, as
//! the leaf or a parent of a chain (`tap-ctl create -a nbd:...` serves a remote export as a
//! local VBD) or as a VBD's secondary (the storage-migration mirror, see
//! [`crate::secondary`]).
//!
//! The locator ([`locator`]) names a UNIX socket, a TCP address, or a socket handed over
//! to this process ([`passed`]). The protocol is the `nbd` crate's client: old-style and
//! newstyle servers (tapdisk's own, the C tapdisk, qemu-nbd, nbdkit), structured replies,
//! TLS for TCP targets when `nbd_client.tls_certificates` names the authorities (then always:
//! no plaintext fallback), many requests in flight, a deadline per request
//! (`nbd_client.request_timeout`, 30 s: a hung server is detected, which the C driver never
//! did) and a bounded queue (`EBUSY` beyond it, which the VBD retries).
//!
//! **Reconnecting.** A request whose connection breaks (the server closed it, a request timed
//! out, the server broke the protocol) fails; later requests to an image opened from an
//! address connect again (one attempt at a time; the export must keep its size), and the
//! failure is reported as `EAGAIN`, so the VBD retries the request every second until its own
//! timeout (120 s by default): a server restarting within that time costs the guest nothing
//! but the wait. A socket handed over by xapi cannot be dialled again, so there a broken
//! connection fails requests with `EIO` for good (and, as a mirror, stops the mirror).
//!
//! **Closing.** On pause or close ([`ImageDriver::release`]), a handed-over connection that
//! still works goes back to the passed sockets under its id, negotiated, so the next open
//! (the unpause after a snapshot) uses it at once; a dialled one says goodbye
//! (`NBD_CMD_DISC`) and closes.
//!
//! Geometry: the export's size in 512-byte sectors (a tail shorter than a sector is not
//! used), sector size 512; read-only when opened so or when the server says so. Discards and
//! write-zeroes become `NBD_CMD_WRITE_ZEROES` where the server offers it (a discarded range
//! then reads as zeros, which `NBD_CMD_TRIM` would not promise); flushes are sent where the
//! server offers them.

pub mod locator;
pub mod passed;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nbd::client::{Client, ClientConfig, ClientError, Negotiated};
use nbd::handover::ReceivedStream;

use self::locator::NbdTarget;
use self::passed::{PassedSocket, PassedSockets};
use super::{
    Capabilities, DiskInfo, DiskType, DriverDetail, DriverStats, ImageDriver, OpenOptions,
    ReadOutcome, ZeroFlags, SECTOR_SIZE,
};
use crate::engine::IoFuture;
use crate::error::failure;
use crate::iobuf::IoBuf;

/// The NBD client's settings (`[nbd_client]` of the site file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClientSettings {
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of connecting and negotiating.
    pub handshake_timeout: Duration,
    /// Requests on the wire per connection (as many more may wait for a slot).
    pub max_in_flight: u16,
    /// Certificate authorities (`ca-cert.pem`, optionally `client-cert.pem` and
    /// `client-key.pem`) for TLS to TCP targets; none: plaintext.
    pub tls_certificates: Option<PathBuf>,
}

impl Default for NbdClientSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_in_flight: 256,
            tls_certificates: None,
        }
    }
}

/// What opening an `nbd:` image needs besides its locator: the client settings and the
/// sockets handed to this process.
#[derive(Debug, Clone, Default)]
pub struct NbdClientContext {
    /// The client settings.
    pub settings: NbdClientSettings,
    /// Sockets received on `nbdclient<pid>`.
    pub sockets: Arc<PassedSockets>,
}

impl PartialEq for NbdClientContext {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && Arc::ptr_eq(&self.sockets, &other.sockets)
    }
}

impl Eq for NbdClientContext {}

/// `nbd:` status in `tap-ctl stats` (the `"nbd"` object).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NbdStats {
    /// The connection works.
    pub connected: bool,
    /// The handshake the server took (`oldstyle`, `export_name`, `go`).
    pub handshake: &'static str,
    /// Structured replies are on.
    pub structured: bool,
    /// The connection runs over TLS.
    pub tls: bool,
    /// Connections made again after one broke.
    pub reconnects: u64,
    /// Requests that timed out.
    pub timeouts: u64,
}

/// One `nbd:` image.
#[derive(Debug)]
pub struct NbdImage {
    /// The locator as given (also the image's name in stats).
    name: PathBuf,
    target: NbdTarget,
    context: NbdClientContext,
    negotiated: Negotiated,
    read_only: bool,
    connection: Mutex<Option<Arc<Client<IoBuf>>>>,
    /// One reconnection attempt at a time.
    reconnecting: tokio::sync::Mutex<()>,
    reconnects: AtomicU64,
    /// Timeouts of connections replaced since.
    past_timeouts: AtomicU64,
}

/// The client configuration for `target`.
fn client_config(target: &NbdTarget, settings: &NbdClientSettings) -> io::Result<ClientConfig> {
    let (export_name, tls) = match target {
        NbdTarget::Unix { export, .. } => (export.clone(), None),
        NbdTarget::Tcp { host, export, .. } => {
            let tls = match &settings.tls_certificates {
                Some(dir) => {
                    let tls = nbd::tls::ClientTls::from_dir(dir).map_err(|e| {
                        failure(libc::EACCES, format!("nbd_client.tls_certificates: {e}"))
                    })?;
                    Some((tls, host.clone()))
                }
                None => None,
            };
            (export.clone(), tls)
        }
        NbdTarget::Passed { .. } => (String::new(), None),
    };
    let slots = usize::from(settings.max_in_flight);
    Ok(ClientConfig {
        export_name,
        tls,
        handshake_timeout: settings.handshake_timeout,
        request_timeout: settings.request_timeout,
        max_in_flight: slots,
        max_queued: slots,
    })
}

/// Connects to `target` (or takes its passed socket) and negotiates.
async fn connect(target: &NbdTarget, context: &NbdClientContext) -> io::Result<Client<IoBuf>> {
    let config = client_config(target, &context.settings)?;
    let deadline = context.settings.handshake_timeout;
    let timed_out = || {
        failure(
            libc::ETIMEDOUT,
            format!("no connection within {deadline:?}"),
        )
    };
    let stream = match target {
        NbdTarget::Unix { socket, .. } => {
            let stream = tokio::time::timeout(deadline, tokio::net::UnixStream::connect(socket))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| {
                    crate::error::with_context(e, format!("connecting to {}", socket.display()))
                })?;
            ReceivedStream::Unix(stream)
        }
        NbdTarget::Tcp { host, port, .. } => {
            let stream = tokio::time::timeout(
                deadline,
                tokio::net::TcpStream::connect((host.as_str(), *port)),
            )
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                crate::error::with_context(e, format!("connecting to {host} port {port}"))
            })?;
            ReceivedStream::Tcp(stream)
        }
        NbdTarget::Passed { id } => match context.sockets.take(id) {
            None => {
                return Err(failure(
                    libc::ENOENT,
                    format!(
                        "not a UNIX socket, not HOST:PORT, and no socket was passed under the \
                         id '{id}'"
                    ),
                ))
            }
            Some(PassedSocket::Live(client)) => match client.broken() {
                None => return Ok(client),
                Some(reason) => {
                    return Err(failure(
                        libc::ENOTCONN,
                        format!("the connection passed under '{id}' is closed: {reason}"),
                    ))
                }
            },
            // As the C driver: a passed socket that fails to negotiate is gone.
            Some(PassedSocket::Fresh(stream)) => stream,
        },
    };
    Client::connect(stream, &config)
        .await
        .map_err(|e| failure(e.errno(), e.to_string()))
}

impl NbdImage {
    /// Opens the image at `locator` (the text after `nbd:`). Connecting is asynchronous:
    /// call this from a blocking thread of the tokio runtime (image chains are opened on
    /// `spawn_blocking`), where the connection's reader task is spawned.
    pub fn open(locator: &str, options: &OpenOptions) -> io::Result<Self> {
        let context = |e: io::Error| crate::error::with_context(e, format!("nbd:{locator}"));
        let target = locator::parse(locator, locator::is_unix_socket)
            .map_err(|why| failure(libc::EINVAL, format!("nbd:{locator}: {why}")))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            failure(
                libc::EINVAL,
                format!("nbd:{locator}: opened outside the daemon's runtime"),
            )
        })?;
        let client = runtime
            .block_on(connect(&target, &options.nbd))
            .map_err(context)?;
        let negotiated = *client.negotiated();
        let image = Self {
            name: PathBuf::from(locator),
            target,
            context: options.nbd.clone(),
            negotiated,
            read_only: options.read_only || negotiated.read_only(),
            connection: Mutex::new(Some(Arc::new(client))),
            reconnecting: tokio::sync::Mutex::new(()),
            reconnects: AtomicU64::new(0),
            past_timeouts: AtomicU64::new(0),
        };
        if u64::from(negotiated.min_block) > SECTOR_SIZE {
            return Err(failure(
                libc::EINVAL,
                format!(
                    "nbd:{locator}: the server needs requests of at least {} bytes, tapdisk \
                     sends 512",
                    negotiated.min_block
                ),
            ));
        }
        tracing::info!(
            image = locator,
            size = negotiated.size,
            handshake = negotiated.style.name(),
            structured = negotiated.structured,
            tls = negotiated.tls,
            "NBD image connected"
        );
        Ok(image)
    }

    fn connection(&self) -> MutexGuard<'_, Option<Arc<Client<IoBuf>>>> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The working connection, connecting again (to an address) if the last one broke.
    async fn client(&self) -> io::Result<Arc<Client<IoBuf>>> {
        if let Some(client) = self.connection().as_ref().filter(|c| c.broken().is_none()) {
            return Ok(Arc::clone(client));
        }
        // Boxed: a connection's handshake (TLS included) is a large future, and every
        // request's future would otherwise be as large, too large for the allocator's
        // per-thread cache and copied whole into its box.
        Box::pin(self.reconnect()).await
    }

    /// [`Self::client`] when the last connection broke.
    async fn reconnect(&self) -> io::Result<Arc<Client<IoBuf>>> {
        if !self.target.can_reconnect() {
            return Err(failure(
                libc::EIO,
                format!(
                    "nbd:{}: the handed-over connection is closed; there is nothing to \
                     reconnect to",
                    self.name.display()
                ),
            ));
        }
        let _turn = self.reconnecting.lock().await;
        if let Some(client) = self.connection().as_ref().filter(|c| c.broken().is_none()) {
            return Ok(Arc::clone(client));
        }
        let retry = |why: String| {
            failure(
                libc::EAGAIN,
                format!("nbd:{}: reconnecting: {why}", self.name.display()),
            )
        };
        let client = connect(&self.target, &self.context)
            .await
            .map_err(|e| retry(crate::error::message_of(&e)))?;
        if client.negotiated().size != self.negotiated.size {
            return Err(retry(format!(
                "the export is now {} bytes, it was {}",
                client.negotiated().size,
                self.negotiated.size
            )));
        }
        let client = Arc::new(client);
        let old = self.connection().replace(Arc::clone(&client));
        if let Some(old) = old {
            self.past_timeouts
                .fetch_add(old.timeouts(), Ordering::Relaxed);
        }
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(image = %self.name.display(), "NBD image reconnected");
        Ok(client)
    }

    /// The error a failed request reports.
    fn request_error(&self, error: &ClientError) -> io::Error {
        let name = self.name.display();
        if error.is_connection_failure() {
            let errno = if self.target.can_reconnect() {
                libc::EAGAIN
            } else {
                libc::EIO
            };
            return failure(errno, format!("nbd:{name}: {error}"));
        }
        failure(error.errno(), format!("nbd:{name}: {error}"))
    }

    fn offset(sector: u64) -> io::Result<u64> {
        sector
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn refuse_writes(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    async fn zero(&self, sector: u64, count: u64, may_trim: bool) -> io::Result<()> {
        self.refuse_writes()?;
        if !self.negotiated.can_write_zeroes() {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let len = count
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let client = self.client().await?;
        client
            .write_zeroes(Self::offset(sector)?, len, may_trim, false)
            .await
            .map_err(|e| self.request_error(&e))
    }
}

impl ImageDriver for NbdImage {
    fn disk_type(&self) -> DiskType {
        DiskType::Nbd
    }

    fn info(&self) -> DiskInfo {
        DiskInfo::new(self.negotiated.size, 512, self.read_only)
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        Box::pin(async move {
            let client = self.client().await?;
            let buf = client
                .read(Self::offset(sector)?, buf)
                .await
                .map_err(|e| self.request_error(&e))?;
            Ok(ReadOutcome {
                buf,
                absent: Vec::new(),
            })
        })
    }

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.refuse_writes()?;
            let client = self.client().await?;
            client
                .write_shared(Self::offset(sector)?, buf)
                .await
                .map_err(|e| self.request_error(&e))
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            client.flush().await.map_err(|e| self.request_error(&e))
        })
    }

    fn discard(&self, sector: u64, count: u64) -> IoFuture<'_, ()> {
        Box::pin(self.zero(sector, count, true))
    }

    fn capabilities(&self) -> Capabilities {
        let zeroes = self.negotiated.can_write_zeroes() && !self.read_only;
        Capabilities {
            discard: zeroes,
            write_zeroes: zeroes,
            block_status: false,
        }
    }

    fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.zero(sector, count, flags.may_deallocate))
    }

    fn stats(&self) -> Option<DriverStats> {
        let connection = self.connection().clone();
        let (pending, connected, timeouts) = match &connection {
            Some(client) => (
                client.in_flight(),
                client.broken().is_none(),
                client.timeouts(),
            ),
            None => (0, false, 0),
        };
        Some(DriverStats {
            pending,
            engine: "nbd",
            detail: DriverDetail::Nbd {
                nbd: NbdStats {
                    connected,
                    handshake: self.negotiated.style.name(),
                    structured: self.negotiated.structured,
                    tls: self.negotiated.tls,
                    reconnects: self.reconnects.load(Ordering::Relaxed),
                    timeouts: self.past_timeouts.load(Ordering::Relaxed) + timeouts,
                },
            },
        })
    }

    fn release(&self) {
        let Some(client) = self.connection().take() else {
            return;
        };
        // Requests have drained by now, so ours is the only handle.
        let Ok(client) = Arc::try_unwrap(client) else {
            return;
        };
        match &self.target {
            NbdTarget::Passed { id } if client.broken().is_none() => {
                tracing::info!(
                    id,
                    "NBD image closed: its connection is kept for the next open"
                );
                self.context.sockets.keep(id, PassedSocket::Live(client));
            }
            _ => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(client.close());
                }
            }
        }
    }
}

impl Drop for NbdImage {
    fn drop(&mut self) {
        self.release();
    }
}
