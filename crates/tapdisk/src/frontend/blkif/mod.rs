//! The Xen blkif frontend: guests' shared rings served as a block back-end (`vbd3`).
//!
//! tapback (ours or the C one) sends `XENBLKIF_CONNECT` with a guest's ring grant
//! references, ring order, ABI and event channel; the server starts a [`BlkifRing`] (a
//! [`Frontend`] of that VBD, in the VBD's list with its NBD export and block device), which
//! maps the ring, binds the channel, creates the statistics files and starts the ring's task
//! ([`engine::RingTask`]), whose requests go through the VBD like every other frontend's.
//! `XENBLKIF_DISCONNECT` ([`BlkifRing::disconnect`]) lets go of the guest at once; the ring
//! stays in the VBD's list until its requests in flight have completed (silently), and CLOSE
//! ([`Frontend::stop`]) waits for that (FORCE_SHUTDOWN does not). Errors are the C tapdisk's:
//! `ENODEV` (no such VBD / ring), `EINVAL` (order above 3, VBD not open), `EALREADY` (that
//! domid/devid is connected; checked by the server, which sees every VBD),
//! `EPROTONOSUPPORT` (ABI not 1..=3), or the errno of mapping, binding or creating the
//! statistics files.
//!
//! * [`platform`]: the grant/event-channel trait and the real devices (`xen.rs`, the only
//!   `unsafe` here); [`sim`]: a simulated guest's side, for tests off Xen;
//! * [`stats`]: counters, the shared-memory statistics files and `tap-ctl stats`' "xenbus".

pub mod engine;
pub mod platform;
pub mod sim;
pub mod stats;
mod xen;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use blkif::abi::Abi;
use blkif::request::Limits;
use blkif::ring::BackRing;
use tapdisk_proto::Blkif;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::engine::RingTask;
use self::platform::Platform;
use self::stats::{RingCounters, SharedFiles, StatsFiles, StatsLocation};
use super::{Frontend, FrontendContext, FrontendStats, StartFrontend};
use crate::engine::uring::SubmitBatch;
use crate::engine::IoFuture;
use crate::error::{errno_of, failure};
use crate::vbd::Vbd;

pub use self::platform::XenPlatform;

/// Segments offered per indirect request (`feature-max-indirect-segments`, 1 MiB).
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;

/// `error` with `what` (a path) in front of its text, keeping its errno.
fn path_error(error: io::Error, what: impl fmt::Display) -> io::Error {
    let text = format!("{what}: {error}");
    crate::error::with_context(error, text)
}

/// Starts ring tasks on some [`Platform`] (kept behind a trait object so that [`XenBackend`]
/// has no type parameter).
trait Connector: Send + Sync + fmt::Debug {
    fn start(
        &self,
        vbd: Arc<Vbd>,
        blkif: &Blkif,
        abi: Abi,
        stats: &StatsLocation,
    ) -> io::Result<BlkifRing>;
}

#[derive(Debug)]
struct PlatformConnector<P>(P);

impl<P: Platform> Connector for PlatformConnector<P> {
    fn start(
        &self,
        vbd: Arc<Vbd>,
        blkif: &Blkif,
        abi: Abi,
        stats: &StatsLocation,
    ) -> io::Result<BlkifRing> {
        let (domid, devid) = (blkif.domid, blkif.devid);
        let name = format!("xenvbd-{domid}-{devid}");
        let info = vbd.disk_info().ok_or_else(|| {
            failure(
                libc::EINVAL,
                format!("{name}: VBD {} is not open", vbd.minor()),
            )
        })?;
        let pages = 1usize << blkif.order;
        let memory = self.0.map_ring(domid, &blkif.gref[..pages]).map_err(|e| {
            failure(
                errno_of(&e),
                format!(
                    "{name}: mapping ring grants {:?}: {e}",
                    &blkif.gref[..pages]
                ),
            )
        })?;
        let ring = BackRing::attach(memory, abi)
            .map_err(|e| failure(libc::EINVAL, format!("{name}: {e}")))?;
        let copier = self.0.copier(domid)?;
        let channel = self.0.bind(domid, blkif.port).map_err(|e| {
            failure(
                errno_of(&e),
                format!("{name}: binding event channel {}: {e}", blkif.port),
            )
        })?;
        let files = Arc::new(Mutex::new(Some(StatsFiles::create(stats, domid, devid)?)));
        let counters = Arc::new(RingCounters::default());
        let (stop, stopped) = watch::channel(false);
        let task = RingTask::<P> {
            ring,
            copier,
            channel: Some(channel),
            vbd: Arc::clone(&vbd),
            limits: Limits {
                disk_sectors: info.sectors,
                max_indirect_segments: MAX_INDIRECT_SEGMENTS,
                // Offered only where the chain deallocates; otherwise EOPNOTSUPP, after
                // which xen-blkfront stops sending them.
                discard: vbd.capabilities().discard,
            },
            counters: Arc::clone(&counters),
            files: Arc::clone(&files),
            name,
        };
        // Every poll of the ring's task is a turn: the requests it takes off the ring
        // together reach the engine's rings with one `io_uring_enter` each.
        let handle = tokio::spawn(SubmitBatch::each_poll(task.run(stopped)));
        Ok(BlkifRing {
            domid,
            devid,
            counters,
            files,
            stop,
            task: Some(handle),
        })
    }
}

/// The Xen devices rings are served on and where their statistics go: one per tapdisk
/// process, shared by its rings (cloning is cheap).
#[derive(Debug, Clone)]
pub struct XenBackend {
    connector: Arc<dyn Connector>,
    stats: StatsLocation,
}

impl XenBackend {
    /// Rings on `platform`, publishing statistics at `stats`.
    pub fn new<P: Platform>(platform: P, stats: StatsLocation) -> Self {
        Self {
            connector: Arc::new(PlatformConnector(platform)),
            stats,
        }
    }

    /// Xen's real devices, statistics in `/dev/shm` as the C tapdisk of process `pid`
    /// publishes them (where xcp-rrdd looks).
    pub fn real(pid: u32) -> Self {
        let stats = StatsLocation {
            shm: PathBuf::from("/dev/shm"),
            pid,
        };
        Self::new(XenPlatform::default(), stats)
    }

    /// Removes this process's statistics directory (`td3-<pid>`), once its rings are gone.
    pub fn remove_stats_dir(&self) {
        let _ = std::fs::remove_dir(self.stats.process_dir());
    }
}

/// What a [`BlkifRing`] is started with: `XENBLKIF_CONNECT`'s body and the devices.
#[derive(Debug, Clone)]
pub struct BlkifStart {
    /// The process's Xen devices.
    pub xen: XenBackend,
    /// The guest's ring: domain, device, grant references, order, ABI, event channel.
    pub blkif: Blkif,
}

/// One guest ring of a VBD: connected, or disconnected and still completing the requests it
/// took.
#[derive(Debug)]
pub struct BlkifRing {
    domid: u32,
    devid: u32,
    counters: Arc<RingCounters>,
    files: SharedFiles,
    /// Sending `true` disconnects.
    stop: watch::Sender<bool>,
    /// The ring's task, until [`Frontend::stop`] has waited for it.
    task: Option<JoinHandle<()>>,
}

impl BlkifRing {
    /// The guest's `(domid, devid)`.
    pub fn guest_device(&self) -> (u32, u32) {
        (self.domid, self.devid)
    }

    /// True until [`BlkifRing::disconnect`] (or the task ended on its own).
    pub fn is_connected(&self) -> bool {
        !*self.stop.borrow() && !self.is_released()
    }

    /// True once the task has ended: the guest's ring is unmapped and nothing is in flight.
    pub fn is_released(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// `XENBLKIF_DISCONNECT`: removes the statistics files and tells the task to let go of
    /// the guest (event channel unbound at once; requests in flight complete silently, then
    /// the ring is unmapped).
    pub fn disconnect(&self) {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(files) = files {
            files.remove();
        }
        if !self.stop.send_replace(true) {
            tracing::info!(
                "disconnected ring of domain {} device {}",
                self.domid,
                self.devid
            );
        }
    }
}

impl Frontend for BlkifRing {
    fn kind(&self) -> &'static str {
        "blkif"
    }

    /// Disconnects; unless `force`, then waits until the requests in flight completed (a
    /// ring is never "held": CLOSE disconnects guests as the C tapdisk does).
    fn stop(&mut self, force: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.disconnect();
            if let Some(task) = self.task.take() {
                if force {
                    task.abort();
                }
                let _ = task.await;
            }
            Ok(())
        })
    }

    fn stats(&self) -> FrontendStats {
        FrontendStats {
            xenbus: self
                .is_connected()
                .then(|| self.counters.xenbus(self.domid, self.devid)),
            ..FrontendStats::default()
        }
    }
}

impl StartFrontend for BlkifRing {
    type Settings = BlkifStart;

    async fn start(context: &FrontendContext, settings: BlkifStart) -> io::Result<Self> {
        let BlkifStart { xen, blkif } = settings;
        if blkif.order > blkif::abi::MAX_RING_ORDER {
            return Err(failure(
                libc::EINVAL,
                format!("ring order {} (at most 3)", blkif.order),
            ));
        }
        let abi = Abi::from_proto(blkif.proto).ok_or_else(|| {
            failure(
                libc::EPROTONOSUPPORT,
                format!(
                    "ring protocol {} (1 native, 2 x86_32, 3 x86_64)",
                    blkif.proto
                ),
            )
        })?;
        let ring = xen
            .connector
            .start(Arc::clone(&context.vbd), &blkif, abi, &xen.stats)?;
        tracing::info!(
            minor = context.minor,
            "connected ring of domain {} device {} (order {}, {abi:?}, port {})",
            blkif.domid,
            blkif.devid,
            blkif.order,
            blkif.port
        );
        Ok(ring)
    }
}
