//! The virtual block device (VBD): one minor's request queue in front of its image chain.
//!
//! Every frontend (the NBD export today; ublk and FUSE later) submits requests through
//! [`Vbd`], which
//! - holds requests at its gate while the VBD is pausing or paused, and lets them through on
//!   resume;
//! - checks bounds (past the end: `EINVAL` for reads, `ENOSPC` for writes) and refuses writes to
//!   a read-only disk (`EPERM`);
//! - retries requests that fail with `EAGAIN`, `EBUSY` or `EINTR` (every second, `EBUSY` at
//!   once) until the request timeout (120 s by default) runs out;
//! - counts sectors, requests and retries for `tap-ctl stats`.
//!
//! Pausing stops intake, waits for in-flight requests to drain, then closes the image chain so
//! that no file descriptor of it stays open (the toolstack may now snapshot or coalesce the
//! images). Resuming reopens the chain, optionally from a new path, and refuses a chain whose
//! size, sector size or information bits differ (`EMEDIUMTYPE`).
//!
//! Any number of frontend queues may submit concurrently: the state lock is held only for
//! bookkeeping, never across I/O.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use crate::driver::{Capabilities, DiskInfo, OpenOptions, StatusRun, ZeroFlags, SECTOR_SIZE};
use crate::engine::mapped::MappedBytes;
use crate::image::ImageChain;
use crate::iobuf::IoBuf;
use crate::lcache::IntelliCache;
use crate::secondary::{self, SecondaryConfig, SecondaryMode, SecondaryState};

/// VBD state bits, as shown by `tap-ctl list` (tapdisk's `TD_VBD_*`).
pub mod state {
    /// The VBD is dead (queue killed).
    pub const DEAD: u32 = 0x1;
    /// The image chain was closed (set by a close; a VBD never opened shows 0).
    pub const CLOSED: u32 = 0x2;
    /// Intake stopped, waiting for in-flight requests.
    pub const QUIESCE_REQUESTED: u32 = 0x4;
    /// Intake stopped and nothing in flight.
    pub const QUIESCED: u32 = 0x8;
    /// A pause is in progress.
    pub const PAUSE_REQUESTED: u32 = 0x10;
    /// Paused: images closed until resume.
    pub const PAUSED: u32 = 0x20;
    /// A close is in progress.
    pub const SHUTDOWN_REQUESTED: u32 = 0x40;
    /// The last resume failed; the VBD stays paused.
    pub const RESUME_FAILED: u32 = 0x200;
}

/// Default request timeout (`-t` overrides it per VBD).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Pause between retries of a request that failed with `EAGAIN` or `EINTR`.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Largest write [`Vbd::fill_zeroes`] issues.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// How often a resume retries reopening images that fail with a transient error.
const RESUME_OPEN_ATTEMPTS: u32 = 10;

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Errors worth retrying, as tapdisk: `EAGAIN`, `EBUSY`, `EINTR` (bare or with context).
fn is_retryable(error: &io::Error) -> bool {
    matches!(
        crate::error::errno_of(error),
        libc::EAGAIN | libc::EBUSY | libc::EINTR
    )
}

/// Direction of a request, for bounds checks and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    /// Flush and other requests that touch no sectors.
    None,
}

/// Per-VBD counters.
#[derive(Debug, Default)]
pub struct VbdCounters {
    /// Sectors read and written: `[read, write]`.
    pub secs: [AtomicU64; 2],
    /// Requests received.
    pub received: AtomicU64,
    /// Requests completed (successfully or not).
    pub returned: AtomicU64,
    /// Requests completed with an error.
    pub errors: AtomicU64,
    /// Retries of failed requests.
    pub retries: AtomicU64,
}

/// What a VBD is opened with.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// `type:/path` of the leaf image.
    pub params: String,
    /// Driver open options.
    pub options: OpenOptions,
    /// Request timeout.
    pub timeout: Duration,
    /// The changed-block-tracking log to keep above the leaf (`-C`), if any.
    pub log: Option<PathBuf>,
    /// The secondary image (`-2`), if any.
    pub secondary: Option<SecondaryConfig>,
    /// IntelliCache: a local cache of the parent chain (`-r`), another VBD's export as the
    /// parent (`-e`); kept for every resume.
    pub intellicache: IntelliCache,
}

/// What a resume does to the VBD's secondary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryChange {
    /// Re-open the one it has, if any (a RESUME without `SECONDARY`).
    Keep,
    /// Remove it (`-2 null`).
    Remove,
    /// Use this `TYPE:LOCATOR` from now on (`-2 TYPE:LOCATOR`).
    Set(String),
}

#[derive(Debug)]
struct Inner {
    state: u32,
    /// `type:/path` while the VBD is open (including while paused).
    params: Option<String>,
    options: OpenOptions,
    timeout: Duration,
    chain: Option<Arc<ImageChain>>,
    /// Disk information from the last successful open (kept while paused).
    info: Option<DiskInfo>,
    in_flight: usize,
    /// The secondary, kept while paused and re-opened on every resume.
    secondary: Option<SecondaryConfig>,
    /// The VBD was opened with a standby secondary: later ones are standbys too.
    standby: bool,
    /// IntelliCache's settings from the open, applied again by every resume.
    intellicache: IntelliCache,
}

/// A chain reopened for a paused VBD, not installed yet ([`Vbd::reopen`]).
#[derive(Debug)]
pub struct Reopened {
    chain: ImageChain,
    params: String,
    secondary: Option<SecondaryConfig>,
}

/// One virtual block device.
#[derive(Debug)]
pub struct Vbd {
    minor: u16,
    inner: Mutex<Inner>,
    /// Bumped on every state change; waiters subscribe, then re-check the state.
    changes: watch::Sender<u64>,
    counters: VbdCounters,
    /// Whether the last chain installed could serve mapped reads at all: a hint that spares
    /// [`Vbd::read_mapped`] an admission per read for the (usual) images that cannot.
    mapped_hint: AtomicBool,
}

/// Marks one request as in flight until dropped.
struct InFlight<'a> {
    vbd: &'a Vbd,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut inner = self.vbd.lock();
        inner.in_flight -= 1;
        // Only a pause or a close waits for the queue to drain (both set their flag under
        // this lock before checking `in_flight`), so a running VBD wakes nobody.
        let drained = inner.in_flight == 0
            && inner.state & (state::QUIESCE_REQUESTED | state::SHUTDOWN_REQUESTED) != 0;
        drop(inner);
        if drained {
            self.vbd.notify();
        }
    }
}

/// An admitted request: the chain to run it on, the VBD's request timeout, and its
/// in-flight mark.
struct Admitted<'a> {
    chain: Arc<ImageChain>,
    timeout: Duration,
    in_flight: InFlight<'a>,
}

/// Opens a chain, its log and its secondary if asked for, for VBD `minor`; the files are
/// opened on the blocking pool (opening a file may block on slow storage). Dropping the future
/// leaves the open running there; the chain it makes is then closed.
pub async fn open_chain(request: &OpenRequest, minor: u16) -> io::Result<ImageChain> {
    let params = request.params.clone();
    let options = request.options.clone();
    let log = request.log.clone();
    let intellicache = request.intellicache.clone();
    let mut chain = tokio::task::spawn_blocking(move || {
        let chain =
            ImageChain::open_above(&params, options, intellicache.parent_export.as_deref())?;
        let chain = if intellicache.local_cache {
            chain.with_local_cache()
        } else {
            chain
        };
        match log {
            Some(log) => chain.with_log(&log),
            None => Ok(chain),
        }
    })
    .await
    .unwrap_or_else(|join_error| Err(io::Error::other(join_error)))?;
    if let Some(secondary) = &request.secondary {
        let local_leaf = request.intellicache.parent_export.is_some();
        let attached =
            secondary::attach(&mut chain, secondary, &request.options, minor, local_leaf).await;
        if let Err(e) = attached {
            chain.release();
            return Err(e);
        }
    }
    Ok(chain)
}

impl Vbd {
    /// A new VBD for `minor`, attached and not opened yet: state 0, as the C tapdisk lists
    /// it (`CLOSED` is set by a close, not before the first open).
    pub fn new(minor: u16) -> Self {
        Self {
            minor,
            inner: Mutex::new(Inner {
                state: 0,
                params: None,
                options: OpenOptions::default(),
                timeout: DEFAULT_REQUEST_TIMEOUT,
                chain: None,
                info: None,
                in_flight: 0,
                secondary: None,
                standby: false,
                intellicache: IntelliCache::default(),
            }),
            changes: watch::channel(0).0,
            counters: VbdCounters::default(),
            mapped_hint: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock is a bug elsewhere; the state itself stays usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changes
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// The minor number (VBD id).
    pub fn minor(&self) -> u16 {
        self.minor
    }

    /// Current state bits.
    pub fn state(&self) -> u32 {
        self.lock().state
    }

    /// `type:/path` while open (also while paused).
    pub fn params(&self) -> Option<String> {
        self.lock().params.clone()
    }

    /// True while an image chain is logically open (including while paused).
    pub fn is_open(&self) -> bool {
        self.lock().params.is_some()
    }

    /// The options the image chain was opened with.
    pub fn open_options(&self) -> OpenOptions {
        self.lock().options.clone()
    }

    /// Disk information of the open (or paused) disk.
    pub fn disk_info(&self) -> Option<DiskInfo> {
        self.lock().info
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Counters.
    pub fn counters(&self) -> &VbdCounters {
        &self.counters
    }

    /// The state of the secondary, if the VBD has one (also while paused).
    pub fn secondary_state(&self) -> Option<Arc<SecondaryState>> {
        self.lock()
            .secondary
            .as_ref()
            .map(|secondary| Arc::clone(&secondary.state))
    }

    /// The open chain, if any (not while paused).
    pub fn chain(&self) -> Option<Arc<ImageChain>> {
        self.lock().chain.clone()
    }

    /// Opens the image chain. `EALREADY` if already open.
    pub async fn open(&self, request: OpenRequest) -> io::Result<DiskInfo> {
        if self.is_open() {
            return Err(errno(libc::EALREADY));
        }
        let chain = open_chain(&request, self.minor).await?;
        self.install(chain, request)
    }

    /// Makes an opened chain the VBD's image.
    pub fn install(&self, chain: ImageChain, request: OpenRequest) -> io::Result<DiskInfo> {
        let info = chain.info();
        let mut inner = self.lock();
        if inner.params.is_some() {
            return Err(errno(libc::EALREADY));
        }
        inner.params = Some(request.params);
        inner.options = request.options;
        inner.timeout = request.timeout;
        inner.standby = request
            .secondary
            .as_ref()
            .is_some_and(|secondary| secondary.mode == SecondaryMode::Standby);
        inner.secondary = request.secondary;
        inner.intellicache = request.intellicache;
        self.mapped_hint.store(chain.is_mapped(), Ordering::Relaxed);
        inner.chain = Some(Arc::new(chain));
        inner.info = Some(info);
        inner.state = 0;
        drop(inner);
        self.notify();
        Ok(info)
    }

    /// Waits until `done` holds for the state.
    async fn wait_until(&self, mut done: impl FnMut(&Inner) -> bool) {
        loop {
            let mut changes = self.changes.subscribe();
            if done(&self.lock()) {
                return;
            }
            // The sender lives as long as `self`, so this only returns on a change.
            let _ = changes.changed().await;
        }
    }

    /// Pauses: stops intake, drains in-flight requests, closes the chain.
    pub async fn pause(&self) -> io::Result<()> {
        self.pause_unless(std::future::pending()).await
    }

    /// [`Vbd::pause`], abandoned if `give_up` completes while requests are still draining:
    /// intake then resumes as if the pause had never been asked for, and the call fails with
    /// `ECANCELED`. Once drained, the pause completes.
    pub async fn pause_unless(&self, give_up: impl Future<Output = ()>) -> io::Result<()> {
        {
            let mut inner = self.lock();
            if inner.params.is_none() {
                return Err(errno(libc::EINVAL));
            }
            if inner.state & state::PAUSED != 0 {
                return Ok(());
            }
            inner.state |= state::PAUSE_REQUESTED | state::QUIESCE_REQUESTED;
        }
        self.notify();
        tokio::select! {
            () = self.wait_until(|inner| inner.in_flight == 0) => {}
            () = give_up => {
                self.lock().state &= !(state::PAUSE_REQUESTED | state::QUIESCE_REQUESTED);
                self.notify();
                tracing::info!(minor = self.minor, "pause abandoned while draining");
                return Err(errno(libc::ECANCELED));
            }
        }
        let chain = {
            let mut inner = self.lock();
            inner.state &= !(state::PAUSE_REQUESTED | state::QUIESCE_REQUESTED);
            inner.state |= state::QUIESCED | state::CLOSED | state::PAUSED;
            inner.chain.take()
        };
        self.retire(chain).await;
        self.notify();
        tracing::info!(minor = self.minor, "paused");
        Ok(())
    }

    /// Resumes a paused VBD, reopening its chain (from `new_params` if given) with the
    /// changed-block log `log` (a resume without one stops tracking, as in the C stack) and
    /// its secondary.
    pub async fn resume(&self, new_params: Option<String>, log: Option<PathBuf>) -> io::Result<()> {
        self.resume_with(new_params, log, SecondaryChange::Keep)
            .await
    }

    /// [`Vbd::resume`] with the secondary changed as `change` says.
    pub async fn resume_with(
        &self,
        new_params: Option<String>,
        log: Option<PathBuf>,
        change: SecondaryChange,
    ) -> io::Result<()> {
        let reopened = self.reopen(new_params, log, change).await?;
        self.finish_resume(reopened);
        Ok(())
    }

    /// The secondary a resume opens after `change`.
    fn secondary_after(&self, inner: &Inner, change: SecondaryChange) -> Option<SecondaryConfig> {
        let current = inner.secondary.clone();
        match change {
            SecondaryChange::Keep => current,
            SecondaryChange::Remove => match current {
                Some(secondary) if secondary.state.failed_over() => {
                    tracing::error!(
                        minor = self.minor,
                        "keeping the secondary {}: writes made since the leaf filled up live \
                         there only",
                        secondary.params
                    );
                    Some(secondary)
                }
                _ => None,
            },
            SecondaryChange::Set(params) => {
                let mode = match (&current, inner.standby) {
                    (Some(secondary), _) => secondary.mode,
                    (None, true) => SecondaryMode::Standby,
                    (None, false) => SecondaryMode::Mirror,
                };
                Some(SecondaryConfig::new(params, mode))
            }
        }
    }

    /// The first half of a resume: reopens the chain of a paused VBD (from `new_params` if
    /// given, with the changed-block log `log`) with its secondary changed as `change` says,
    /// and checks its geometry, changing nothing yet; [`Vbd::finish_resume`] installs it.
    pub async fn reopen(
        &self,
        new_params: Option<String>,
        log: Option<PathBuf>,
        change: SecondaryChange,
    ) -> io::Result<Reopened> {
        let (request, old_info) = {
            let inner = self.lock();
            if inner.state & state::PAUSED == 0 {
                return Err(errno(libc::EINVAL));
            }
            let params = new_params
                .or_else(|| inner.params.clone())
                .ok_or_else(|| errno(libc::EINVAL))?;
            let request = OpenRequest {
                params,
                options: inner.options.clone(),
                timeout: inner.timeout,
                log,
                secondary: self.secondary_after(&inner, change),
                intellicache: inner.intellicache.clone(),
            };
            (request, inner.info)
        };
        let mut attempt = 1;
        let chain = loop {
            match open_chain(&request, self.minor).await {
                Ok(chain) => break chain,
                Err(e)
                    if attempt < RESUME_OPEN_ATTEMPTS
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EAGAIN | libc::EBUSY)
                        ) =>
                {
                    tracing::warn!(
                        minor = self.minor,
                        "resume: reopening {} failed ({e}), retrying",
                        request.params
                    );
                    attempt += 1;
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                Err(e) => {
                    self.lock().state |= state::RESUME_FAILED;
                    tracing::error!(
                        minor = self.minor,
                        "resume: cannot open {}: {e}",
                        request.params
                    );
                    return Err(e);
                }
            }
        };
        let info = chain.info();
        if let Some(old) = old_info {
            if old != info {
                self.lock().state |= state::RESUME_FAILED;
                let what = format!(
                    "{} has {} sectors of {} bytes (info {:#x}), the disk has {} of {} (info {:#x})",
                    request.params, info.sectors, info.sector_size, info.info,
                    old.sectors, old.sector_size, old.info
                );
                tracing::error!(minor = self.minor, "resume: {what}");
                return Err(crate::error::failure(libc::EMEDIUMTYPE, what));
            }
        }
        Ok(Reopened {
            chain,
            params: request.params,
            secondary: request.secondary,
        })
    }

    /// The second half of a resume: runs the VBD on the chain [`Vbd::reopen`] opened.
    pub fn finish_resume(&self, reopened: Reopened) {
        let Reopened {
            chain,
            params,
            secondary,
        } = reopened;
        {
            let mut inner = self.lock();
            inner.params = Some(params);
            inner.secondary = secondary;
            self.mapped_hint.store(chain.is_mapped(), Ordering::Relaxed);
            inner.info = Some(chain.info());
            inner.chain = Some(Arc::new(chain));
            inner.state &=
                !(state::PAUSED | state::QUIESCED | state::CLOSED | state::RESUME_FAILED);
        }
        self.notify();
        tracing::info!(minor = self.minor, "resumed");
    }

    /// Stops intake and waits until no request is in flight, keeping the chain open (a live
    /// commit switches chains this way); returns the chain. `EINVAL` unless running.
    /// Requests arriving meanwhile wait at the gate until [`Vbd::unquiesce`].
    pub async fn quiesce(&self) -> io::Result<Arc<ImageChain>> {
        {
            let mut inner = self.lock();
            if inner.params.is_none() || inner.chain.is_none() || inner.state != 0 {
                return Err(errno(libc::EINVAL));
            }
            inner.state |= state::QUIESCE_REQUESTED;
        }
        self.notify();
        self.wait_until(|inner| inner.in_flight == 0).await;
        let chain = {
            let mut inner = self.lock();
            inner.state &= !state::QUIESCE_REQUESTED;
            inner.state |= state::QUIESCED;
            inner.chain.clone()
        };
        chain.ok_or_else(|| errno(libc::EINVAL))
    }

    /// Lets requests in again after [`Vbd::quiesce`], on `replacement` (a chain of the same
    /// geometry and its `type:/path`) when given. A replacement of another geometry is
    /// refused with `EMEDIUMTYPE` and the old chain kept.
    pub fn unquiesce(&self, replacement: Option<(ImageChain, String)>) -> io::Result<()> {
        let mut result = Ok(());
        {
            let mut inner = self.lock();
            if let Some((chain, params)) = replacement {
                if Some(chain.info()) == inner.info {
                    self.mapped_hint.store(chain.is_mapped(), Ordering::Relaxed);
                    inner.chain = Some(Arc::new(chain));
                    inner.params = Some(params);
                } else {
                    result = Err(errno(libc::EMEDIUMTYPE));
                }
            }
            inner.state &= !state::QUIESCED;
        }
        self.notify();
        result
    }

    /// Closes the chain. Unless `force`, waits for in-flight requests first; requests waiting at
    /// the gate (e.g. while paused) fail with `ESHUTDOWN`.
    pub async fn close(&self, force: bool) {
        self.lock().state |= state::SHUTDOWN_REQUESTED;
        self.notify();
        if !force {
            self.wait_until(|inner| inner.in_flight == 0).await;
        }
        let chain = {
            let mut inner = self.lock();
            inner.params = None;
            inner.secondary = None;
            inner.state = state::CLOSED;
            inner.chain.take()
        };
        self.retire(chain).await;
        self.notify();
    }

    /// Lets go of a chain taken out of service: its changed-block log is synced first, so the
    /// toolstack may read (or move) the log once the pause or close is acknowledged, and what
    /// its images hold beyond it is given back ([`ImageChain::release`]).
    async fn retire(&self, chain: Option<Arc<ImageChain>>) {
        if let Some(chain) = chain.as_deref() {
            if let Some(log) = chain.log() {
                if let Err(e) = log.sync().await {
                    tracing::error!(minor = self.minor, "{e}");
                }
            }
            chain.release();
        }
        drop(chain);
    }

    /// Admits one request: waits while paused, then checks state and bounds.
    async fn enter(&self, access: Access, sector: u64, sectors: u64) -> io::Result<Admitted<'_>> {
        // Running VBDs admit at once; only a request that must wait subscribes to state
        // changes (and checks again after subscribing, so no change is missed).
        let mut changes: Option<watch::Receiver<u64>> = None;
        loop {
            if let Some(admitted) = self.try_enter(access, sector, sectors)? {
                return Ok(admitted);
            }
            match changes.as_mut() {
                Some(receiver) => {
                    // The sender lives as long as `self`, so this only returns on a change.
                    let _ = receiver.changed().await;
                }
                None => changes = Some(self.changes.subscribe()),
            }
        }
    }

    /// Admits one request if the VBD is running; `None` while it must wait.
    fn try_enter(
        &self,
        access: Access,
        sector: u64,
        sectors: u64,
    ) -> io::Result<Option<Admitted<'_>>> {
        let mut inner = self.lock();
        if inner.state & (state::DEAD | state::SHUTDOWN_REQUESTED) != 0 || inner.params.is_none() {
            return Err(errno(libc::ESHUTDOWN));
        }
        let Some(chain) = inner.chain.as_ref() else {
            return Ok(None);
        };
        if inner.state & (state::QUIESCE_REQUESTED | state::QUIESCED) != 0 {
            return Ok(None);
        }
        let end = sector.checked_add(sectors);
        if end.is_none_or(|end| end > chain.info().sectors) {
            return Err(errno(if access == Access::Write {
                libc::ENOSPC
            } else {
                libc::EINVAL
            }));
        }
        if access == Access::Write && inner.options.read_only {
            return Err(errno(libc::EPERM));
        }
        let chain = Arc::clone(chain);
        inner.in_flight += 1;
        Ok(Some(Admitted {
            chain,
            timeout: inner.timeout,
            in_flight: InFlight { vbd: self },
        }))
    }

    /// Runs one request with admission, retry and accounting.
    async fn submit<T, F, Fut>(
        &self,
        access: Access,
        sector: u64,
        sectors: u64,
        mut attempt: F,
    ) -> io::Result<T>
    where
        F: FnMut(Arc<ImageChain>) -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut retries = 0u32;
        let result = loop {
            let Admitted {
                chain,
                timeout,
                in_flight,
            } = match self.enter(access, sector, sectors).await {
                Ok(admitted) => admitted,
                Err(e) => break Err(e),
            };
            let result = attempt(chain).await;
            drop(in_flight);
            match result {
                Err(e) if is_retryable(&e) => {
                    if started.elapsed() >= timeout {
                        tracing::error!(
                            minor = self.minor,
                            sector,
                            "request timed out, retried {retries} times: {e}"
                        );
                        break Err(e);
                    }
                    retries += 1;
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let pause = if crate::error::errno_of(&e) == libc::EBUSY {
                        Duration::from_millis(10)
                    } else {
                        RETRY_INTERVAL
                    };
                    tokio::time::sleep(pause).await;
                }
                other => break other,
            }
        };
        self.count_returned(access, sectors, result.is_ok());
        result
    }

    /// Counts a finished request.
    fn count_returned(&self, access: Access, sectors: u64, succeeded: bool) {
        self.counters.returned.fetch_add(1, Ordering::Relaxed);
        if !succeeded {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match access {
            Access::Read => self.counters.secs[0].fetch_add(sectors, Ordering::Relaxed),
            Access::Write => self.counters.secs[1].fetch_add(sectors, Ordering::Relaxed),
            Access::None => 0,
        };
    }

    /// Serves a read of `len` bytes at `sector` without reading it: when the image chain
    /// holds the bytes in mapped memory ([`ImageChain::mapped`]), `deliver` gets them to hand
    /// to the kernel, which copies them where they must go. Runs on the caller's thread.
    ///
    /// `None` when this read cannot be served so right now (paused, closed, out of bounds,
    /// a chain with parents, an image that is not mapped): the caller then reads as usual,
    /// which also waits, fails or retries as reads do. Errors of `deliver` are the read's.
    pub fn read_mapped(
        &self,
        sector: u64,
        len: usize,
        deliver: impl FnOnce(&MappedBytes) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        if !self.mapped_hint.load(Ordering::Relaxed) {
            return None;
        }
        let sectors = sectors_of(len).ok()?;
        let admitted = self.try_enter(Access::Read, sector, sectors).ok()??;
        let bytes = admitted.chain.mapped(sector, len)?;
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let result = deliver(&bytes);
        drop(admitted);
        self.count_returned(Access::Read, sectors, result.is_ok());
        Some(result)
    }

    /// Reads `buf.len()` bytes (a multiple of 512) at `sector`.
    pub async fn read(&self, sector: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len();
        let sectors = sectors_of(len)?;
        let mut first = Some(buf);
        self.submit(Access::Read, sector, sectors, move |chain| {
            let buf = first.take().unwrap_or_else(|| IoBuf::zeroed(len));
            async move { chain.read(sector, buf).await }
        })
        .await
    }

    /// Writes `buf` (a multiple of 512 bytes) at `sector`.
    pub async fn write(&self, sector: u64, buf: IoBuf) -> io::Result<()> {
        self.write_shared(sector, Arc::new(buf)).await
    }

    /// Writes `buf` (a multiple of 512 bytes) at `sector`; the caller may take the buffer
    /// back (`Arc::try_unwrap`) once this returns.
    pub async fn write_shared(&self, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let sectors = sectors_of(buf.len())?;
        self.submit(Access::Write, sector, sectors, move |chain| {
            let buf = Arc::clone(&buf);
            async move { chain.write(sector, buf).await }
        })
        .await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.submit(
            Access::None,
            0,
            0,
            |chain| async move { chain.flush().await },
        )
        .await
    }

    /// Discards `count` sectors at `sector`.
    pub async fn discard(&self, sector: u64, count: u64) -> io::Result<()> {
        self.submit(Access::Write, sector, count, move |chain| async move {
            chain.discard(sector, count).await
        })
        .await
    }

    /// Zeroes `count` sectors at `sector` without writing data (`EOPNOTSUPP` when the image
    /// chain cannot; the caller then writes zeros).
    pub async fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> io::Result<()> {
        self.submit(Access::Write, sector, count, move |chain| async move {
            chain.write_zeroes(sector, count, flags).await
        })
        .await
    }

    /// Zeroes `count` sectors at `sector` by writing zero-filled buffers (what a frontend
    /// does where [`Vbd::write_zeroes`] answers `EOPNOTSUPP`).
    pub async fn fill_zeroes(&self, sector: u64, count: u64) -> io::Result<()> {
        let chunk_sectors = ZERO_CHUNK_BYTES / SECTOR_SIZE;
        let zeros = IoBuf::zeroed(byte_len(count.min(chunk_sectors))?);
        let end = sector
            .checked_add(count)
            .ok_or_else(|| errno(libc::EINVAL))?;
        let mut at = sector;
        while at < end {
            let step = (end - at).min(chunk_sectors);
            let buf = if byte_len(step)? == zeros.len() {
                zeros.clone()
            } else {
                IoBuf::zeroed(byte_len(step)?)
            };
            self.write(at, buf).await?;
            at += step;
        }
        Ok(())
    }

    /// Optional operations of the open image chain (none while closed or paused).
    pub fn capabilities(&self) -> Capabilities {
        self.chain()
            .map(|chain| chain.capabilities())
            .unwrap_or_default()
    }

    /// Which 64 KiB blocks of bytes `[offset, offset + len)` the changed-block log has
    /// marked (`EINVAL` while the VBD tracks no changes). Waits while paused, as reads do.
    pub async fn changed_extents(&self, offset: u64, len: u64) -> io::Result<Vec<cbt::Extent>> {
        let first = offset / SECTOR_SIZE;
        let end = offset.saturating_add(len).div_ceil(SECTOR_SIZE);
        self.submit(Access::Read, first, end - first, move |chain| async move {
            let log = chain.log().ok_or_else(|| {
                crate::error::failure(libc::EINVAL, "the disk has no changed-block log now")
            })?;
            Ok(log.extents(offset, len))
        })
        .await
    }

    /// Allocation status of `count` sectors at `sector`.
    pub async fn block_status(&self, sector: u64, count: u64) -> io::Result<Vec<StatusRun>> {
        self.submit(Access::Read, sector, count, move |chain| async move {
            chain.block_status(sector, count).await
        })
        .await
    }
}

/// Bytes of `sectors` sectors as a buffer length.
fn byte_len(sectors: u64) -> io::Result<usize> {
    sectors
        .checked_mul(SECTOR_SIZE)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| errno(libc::EINVAL))
}

/// Sectors in a byte length; `EINVAL` unless it is a whole number of sectors.
fn sectors_of(len: usize) -> io::Result<u64> {
    let len = len as u64;
    if len % SECTOR_SIZE != 0 {
        return Err(errno(libc::EINVAL));
    }
    Ok(len / SECTOR_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secondary::{SecondaryConfig, SecondaryMode};
    use crate::testing::{fake_vbd, FakeImage};

    fn raw_image(dir: &tempfile::TempDir, name: &str, bytes: usize, fill: u8) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![fill; bytes]).unwrap();
        format!("aio:{}", path.display())
    }

    fn request(params: String) -> OpenRequest {
        OpenRequest {
            params,
            options: OpenOptions::default(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            log: None,
            secondary: None,
            intellicache: IntelliCache::default(),
        }
    }

    #[tokio::test]
    async fn mapped_reads_are_admitted_and_counted_like_reads() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let vbd = Vbd::new(4);
        let deliver_len = |expected: usize| {
            move |bytes: &MappedBytes| {
                assert_eq!(bytes.len(), expected);
                Ok(())
            }
        };
        // Closed: nothing to map.
        assert!(vbd.read_mapped(0, 4096, deliver_len(4096)).is_none());
        vbd.open(request(raw_image(&dir, "m.img", 65536, 9)))
            .await
            .unwrap();
        let outcome = vbd.read_mapped(8, 4096, deliver_len(4096));
        assert!(matches!(outcome, Some(Ok(()))));
        assert_eq!(vbd.counters().secs[0].load(Ordering::Relaxed), 8);
        assert_eq!(vbd.counters().received.load(Ordering::Relaxed), 1);
        assert_eq!(vbd.counters().returned.load(Ordering::Relaxed), 1);
        assert_eq!(vbd.in_flight(), 0);
        // The deliverer's error is the read's, and counted as one.
        let failed = vbd.read_mapped(0, 512, |_| Err(errno(libc::EFAULT)));
        assert_eq!(
            failed.unwrap().unwrap_err().raw_os_error(),
            Some(libc::EFAULT)
        );
        assert_eq!(vbd.counters().errors.load(Ordering::Relaxed), 1);
        // Out of bounds or not whole sectors: left to the read path, which reports it.
        assert!(vbd.read_mapped(127, 1024, deliver_len(1024)).is_none());
        assert!(vbd.read_mapped(0, 100, deliver_len(100)).is_none());
        // Paused: left to the read path, which waits at the gate.
        vbd.pause().await.unwrap();
        assert!(vbd.read_mapped(0, 512, deliver_len(512)).is_none());
        vbd.resume(None, None).await.unwrap();
        assert!(vbd.read_mapped(0, 512, deliver_len(512)).is_some());
        assert_eq!(vbd.counters().received.load(Ordering::Relaxed), 3);
        // An image that is not mapped (on storage): left to the read path, nothing counted.
        let on_disk = tempfile::tempdir().unwrap();
        let unmapped = Vbd::new(5);
        unmapped
            .open(request(raw_image(&on_disk, "d.img", 65536, 9)))
            .await
            .unwrap();
        assert!(unmapped.read_mapped(0, 512, deliver_len(512)).is_none());
        assert_eq!(unmapped.counters().received.load(Ordering::Relaxed), 0);
        assert_eq!(unmapped.in_flight(), 0);
    }

    #[tokio::test]
    async fn open_read_write_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let vbd = Vbd::new(3);
        assert_eq!(vbd.state(), 0);
        let info = vbd
            .open(request(raw_image(&dir, "a.img", 65536, 0)))
            .await
            .unwrap();
        assert_eq!(info.sectors, 128);
        assert_eq!(vbd.state(), 0);
        vbd.write(1, IoBuf::copy_from(&[7; 1024])).await.unwrap();
        let buf = vbd.read(0, IoBuf::zeroed(2048)).await.unwrap();
        assert!(buf.as_slice()[512..1536].iter().all(|b| *b == 7));
        let past_end = vbd.read(127, IoBuf::zeroed(1024)).await.unwrap_err();
        assert_eq!(past_end.raw_os_error(), Some(libc::EINVAL));
        let write_past_end = vbd.write(128, IoBuf::zeroed(512)).await.unwrap_err();
        assert_eq!(write_past_end.raw_os_error(), Some(libc::ENOSPC));
        let overflow = vbd.read(u64::MAX, IoBuf::zeroed(512)).await.unwrap_err();
        assert_eq!(overflow.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(vbd.counters().secs[1].load(Ordering::Relaxed), 2);
        let again = vbd
            .open(request(raw_image(&dir, "b.img", 512, 0)))
            .await
            .unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EALREADY));
        vbd.close(false).await;
        assert_eq!(vbd.state(), state::CLOSED);
        assert!(vbd.read(0, IoBuf::zeroed(512)).await.is_err());
    }

    /// The blocks marked in the CBT log at `path`.
    fn marked_blocks(path: &std::path::Path) -> Vec<u64> {
        let log = cbt::LogFile::parse(&std::fs::read(path).unwrap()).unwrap();
        (0..log.bitmap.blocks())
            .filter(|block| log.bitmap.is_set(*block))
            .collect()
    }

    #[tokio::test]
    async fn the_log_follows_pause_and_resume_as_the_toolstack_moves_it() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * cbt::BLOCK_SIZE;
        let new_log = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, cbt::LogFile::new(size).unwrap().to_bytes()).unwrap();
            path
        };
        let (first, second) = (new_log("a.cbtlog"), new_log("b.cbtlog"));
        let block = |n: u64| n * cbt::BLOCK_SIZE / SECTOR_SIZE;
        let vbd = Vbd::new(1);
        let mut open = request(raw_image(&dir, "a.img", 4 * 65536, 0));
        open.log = Some(first.clone());
        vbd.open(open).await.unwrap();
        vbd.write(block(1), IoBuf::zeroed(4096)).await.unwrap();
        vbd.discard(block(3), 8).await.unwrap();
        assert_eq!(marked_blocks(&first), [1, 3]);
        // The snapshot: the old log keeps what came before, the new one what comes after.
        vbd.pause().await.unwrap();
        vbd.resume(None, Some(second.clone())).await.unwrap();
        vbd.write(block(2), IoBuf::zeroed(512)).await.unwrap();
        assert_eq!(marked_blocks(&first), [1, 3]);
        assert_eq!(marked_blocks(&second), [2]);
        // A resume without a log stops tracking, as in the C stack.
        vbd.pause().await.unwrap();
        vbd.resume(None, None).await.unwrap();
        vbd.write(block(0), IoBuf::zeroed(512)).await.unwrap();
        assert_eq!(marked_blocks(&second), [2]);
        // Another disk's log: the resume fails and the VBD stays paused.
        vbd.pause().await.unwrap();
        let other = dir.path().join("other.cbtlog");
        std::fs::write(&other, cbt::LogFile::new(2 * size).unwrap().to_bytes()).unwrap();
        let error = vbd.resume(None, Some(other)).await.unwrap_err();
        assert_eq!(crate::error::errno_of(&error), libc::EINVAL);
        assert_ne!(vbd.state() & state::PAUSED, 0);
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let vbd = Vbd::new(0);
        let mut req = request(raw_image(&dir, "a.img", 4096, 0));
        req.options.read_only = true;
        vbd.open(req).await.unwrap();
        let err = vbd.write(0, IoBuf::zeroed(512)).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[tokio::test]
    async fn pause_holds_requests_and_resume_switches_images() {
        let dir = tempfile::tempdir().unwrap();
        let vbd = Arc::new(Vbd::new(1));
        vbd.open(request(raw_image(&dir, "a.img", 8192, 0xaa)))
            .await
            .unwrap();
        vbd.pause().await.unwrap();
        assert_eq!(vbd.state(), 0x2a);
        assert!(vbd.chain().is_none());
        let reader = {
            let vbd = Arc::clone(&vbd);
            tokio::spawn(async move { vbd.read(0, IoBuf::zeroed(512)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        // Another file of a different size is refused and the VBD stays paused.
        let bigger = raw_image(&dir, "big.img", 16384, 0);
        let err = vbd.resume(Some(bigger), None).await.unwrap_err();
        assert_eq!(crate::error::errno_of(&err), libc::EMEDIUMTYPE);
        assert!(crate::error::message_of(&err).contains("the disk has 16 of 512"));
        assert_ne!(vbd.state() & state::PAUSED, 0);
        // A file of the same size is accepted and served.
        let other = raw_image(&dir, "b.img", 8192, 0xbb);
        vbd.resume(Some(other.clone()), None).await.unwrap();
        assert_eq!(vbd.state(), 0);
        assert_eq!(vbd.params(), Some(other));
        let buf = reader.await.unwrap().unwrap();
        assert!(buf.as_slice().iter().all(|b| *b == 0xbb));
    }

    /// A VBD over a fake image whose next `failures` reads fail with `errno`.
    fn flaky_vbd(failures: u32, errno: i32, timeout: Duration) -> Vbd {
        let image = FakeImage::new(8);
        image.faults().fail_reads(failures, errno);
        fake_vbd(image, timeout)
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_every_second() {
        let vbd = flaky_vbd(2, libc::EAGAIN, DEFAULT_REQUEST_TIMEOUT);
        let started = tokio::time::Instant::now();
        vbd.read(0, IoBuf::zeroed(512)).await.unwrap();
        assert!(started.elapsed() >= 2 * RETRY_INTERVAL);
        assert_eq!(vbd.counters().retries.load(Ordering::Relaxed), 2);
        assert_eq!(vbd.counters().errors.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_request_timeout() {
        let vbd = flaky_vbd(u32::MAX, libc::EINTR, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let err = vbd.read(0, IoBuf::zeroed(512)).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(7));
        assert_eq!(vbd.counters().errors.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hard_errors_are_not_retried() {
        let vbd = flaky_vbd(1, libc::EIO, DEFAULT_REQUEST_TIMEOUT);
        let err = vbd.read(0, IoBuf::zeroed(512)).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(vbd.counters().retries.load(Ordering::Relaxed), 0);
        // The next read succeeds: one failure does not kill the VBD.
        vbd.read(0, IoBuf::zeroed(512)).await.unwrap();
    }

    #[tokio::test]
    async fn pause_waits_for_requests_in_flight() {
        // Each read waits for (and uses up) a permit of `gate`.
        let image = FakeImage::new(8);
        let gate = image.faults().gate_reads();
        let vbd = Arc::new(fake_vbd(image, DEFAULT_REQUEST_TIMEOUT));
        // Requests that complete while running wake nobody and leave nothing in flight.
        gate.add_permits(3);
        for _ in 0..3 {
            vbd.read(0, IoBuf::zeroed(512)).await.unwrap();
        }
        assert_eq!(vbd.in_flight(), 0);
        let reader = {
            let vbd = Arc::clone(&vbd);
            tokio::spawn(async move { vbd.read(0, IoBuf::zeroed(512)).await })
        };
        while vbd.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let pause = {
            let vbd = Arc::clone(&vbd);
            tokio::spawn(async move { vbd.pause().await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            !pause.is_finished(),
            "pause must wait for the read in flight"
        );
        assert_ne!(vbd.state() & state::QUIESCE_REQUESTED, 0);
        gate.add_permits(1);
        reader.await.unwrap().unwrap();
        pause.await.unwrap().unwrap();
        assert_ne!(vbd.state() & state::PAUSED, 0);
        assert_eq!(vbd.counters().received.load(Ordering::Relaxed), 4);
        assert_eq!(vbd.counters().returned.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn zeroing_falls_back_to_writing_zeros() {
        let vbd = fake_vbd(
            FakeImage::new(8).holding(&[0xff; 4096]),
            DEFAULT_REQUEST_TIMEOUT,
        );
        // The image cannot zero fast: write_zeroes says so, fill_zeroes writes zeros.
        let error = vbd
            .write_zeroes(1, 3, ZeroFlags::default())
            .await
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EOPNOTSUPP));
        vbd.fill_zeroes(1, 3).await.unwrap();
        let buf = vbd.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(buf.as_slice()[..512].iter().all(|b| *b == 0xff));
        assert!(buf.as_slice()[512..2048].iter().all(|b| *b == 0));
        assert!(buf.as_slice()[2048..].iter().all(|b| *b == 0xff));
        assert_eq!(vbd.counters().secs[1].load(Ordering::Relaxed), 3);
        // Out of bounds: refused like a write.
        let past = vbd.fill_zeroes(7, 2).await.unwrap_err();
        assert_eq!(past.raw_os_error(), Some(libc::ENOSPC));
    }

    #[tokio::test]
    async fn secondaries_survive_resumes_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = raw_image(&dir, "leaf.img", 65536, 0);
        let spare = raw_image(&dir, "spare.img", 65536, 0);
        let other = raw_image(&dir, "other.img", 65536, 0);
        let file = |params: &str| std::fs::read(params.strip_prefix("aio:").unwrap()).unwrap();
        let vbd = Vbd::new(2);
        let mut open = request(leaf.clone());
        open.secondary = Some(SecondaryConfig::new(spare.clone(), SecondaryMode::Mirror));
        vbd.open(open).await.unwrap();
        vbd.write(0, IoBuf::copy_from(&[1; 512])).await.unwrap();
        assert_eq!(file(&spare)[0], 1);
        // A resume without a change re-opens the mirror.
        vbd.pause().await.unwrap();
        assert!(vbd.secondary_state().is_some(), "kept while paused");
        vbd.resume(None, None).await.unwrap();
        vbd.write(1, IoBuf::copy_from(&[2; 512])).await.unwrap();
        assert_eq!(file(&spare)[512], 2);
        // -2 null removes it.
        vbd.pause().await.unwrap();
        vbd.resume_with(None, None, SecondaryChange::Remove)
            .await
            .unwrap();
        assert!(vbd.secondary_state().is_none());
        vbd.write(2, IoBuf::copy_from(&[3; 512])).await.unwrap();
        assert_eq!(file(&spare)[1024], 0);
        assert_eq!(file(&leaf)[1024], 3);
        // A new one, with a fresh state.
        vbd.pause().await.unwrap();
        vbd.resume_with(None, None, SecondaryChange::Set(other.clone()))
            .await
            .unwrap();
        vbd.write(3, IoBuf::copy_from(&[4; 512])).await.unwrap();
        assert_eq!(file(&other)[1536], 4);
        assert!(!vbd.secondary_state().unwrap().mirror_failed());
        // Refused: a secondary of another size, or one that cannot be opened.
        let small = raw_image(&dir, "small.img", 4096, 0);
        for (params, errno) in [
            (small, libc::EINVAL),
            (
                format!("aio:{}", dir.path().join("missing").display()),
                libc::ENOENT,
            ),
        ] {
            vbd.pause().await.unwrap();
            let error = vbd
                .resume_with(None, None, SecondaryChange::Set(params.clone()))
                .await
                .unwrap_err();
            assert_eq!(crate::error::errno_of(&error), errno, "{params}");
            assert_ne!(vbd.state() & state::RESUME_FAILED, 0);
            vbd.resume(None, None).await.unwrap();
        }
        // An NBD mirror that cannot be opened is let go: the resume succeeds and says so.
        vbd.pause().await.unwrap();
        vbd.resume_with(None, None, SecondaryChange::Set("nbd:vbd/7/xvda".into()))
            .await
            .unwrap();
        assert!(vbd.secondary_state().unwrap().mirror_failed());
        assert!(vbd.chain().unwrap().secondary().is_none());
        vbd.write(4, IoBuf::copy_from(&[5; 512])).await.unwrap();
        // ... and is not tried again on the next resume.
        vbd.pause().await.unwrap();
        vbd.resume(None, None).await.unwrap();
        assert!(vbd.secondary_state().unwrap().mirror_failed());
        vbd.close(false).await;
        assert!(vbd.secondary_state().is_none());
    }

    #[tokio::test]
    async fn resume_requires_pause() {
        let dir = tempfile::tempdir().unwrap();
        let vbd = Vbd::new(1);
        vbd.open(request(raw_image(&dir, "a.img", 4096, 0)))
            .await
            .unwrap();
        assert_eq!(
            vbd.resume(None, None).await.unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[tokio::test]
    async fn close_fails_requests_waiting_at_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let vbd = Arc::new(Vbd::new(1));
        vbd.open(request(raw_image(&dir, "a.img", 4096, 0)))
            .await
            .unwrap();
        vbd.pause().await.unwrap();
        let waiter = {
            let vbd = Arc::clone(&vbd);
            tokio::spawn(async move { vbd.read(0, IoBuf::zeroed(512)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        vbd.close(false).await;
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESHUTDOWN));
    }
}
