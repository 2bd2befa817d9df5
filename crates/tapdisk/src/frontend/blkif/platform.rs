//! What the blkif frontend needs from Xen, as a trait: map a guest's ring pages, copy
//! to and from its granted pages, and an event channel to it. [`XenPlatform`] is the real
//! thing (`/dev/xen/gntdev`, `/dev/xen/evtchn`); `super::sim` simulates it for tests.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::OnceLock;

use blkif::grant::GrantCopy;
use blkif::ring::RingMemory;

use super::xen::{EvtChn, GntCopier, GntDev, MappedRing};

/// An event channel to a guest.
pub trait EventChannel: Send + 'static {
    /// Signals the guest.
    fn notify(&self) -> io::Result<()>;
    /// Waits for the guest's next signal (and re-arms the channel).
    fn wait(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// Access to guests' rings, grants and event channels.
pub trait Platform: Send + Sync + fmt::Debug + 'static {
    /// A mapped ring.
    type Memory: RingMemory + Send + Sync + 'static;
    /// Grant copies to one guest.
    type Copier: GrantCopy + Send + 'static;
    /// An event channel.
    type Channel: EventChannel;

    /// Maps the ring pages `grefs` of guest `domid`.
    fn map_ring(&self, domid: u32, grefs: &[u32]) -> io::Result<Self::Memory>;
    /// Grant copies to and from guest `domid`.
    fn copier(&self, domid: u32) -> io::Result<Self::Copier>;
    /// Binds to port `port` of guest `domid` (inside a tokio runtime).
    fn bind(&self, domid: u32, port: u32) -> io::Result<Self::Channel>;
}

/// The real Xen devices; `/dev/xen/gntdev` is opened on first use.
#[derive(Debug, Default)]
pub struct XenPlatform {
    gntdev: OnceLock<GntDev>,
}

impl XenPlatform {
    fn gntdev(&self) -> io::Result<&GntDev> {
        if let Some(device) = self.gntdev.get() {
            return Ok(device);
        }
        let device = GntDev::open()?;
        Ok(self.gntdev.get_or_init(|| device))
    }
}

impl EventChannel for EvtChn {
    fn notify(&self) -> io::Result<()> {
        EvtChn::notify(self)
    }

    fn wait(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        EvtChn::wait(self)
    }
}

impl Platform for XenPlatform {
    type Memory = MappedRing;
    type Copier = GntCopier;
    type Channel = EvtChn;

    fn map_ring(&self, domid: u32, grefs: &[u32]) -> io::Result<MappedRing> {
        self.gntdev()?.map_ring(domid, grefs)
    }

    fn copier(&self, domid: u32) -> io::Result<GntCopier> {
        self.gntdev()?.copier(domid)
    }

    fn bind(&self, domid: u32, port: u32) -> io::Result<EvtChn> {
        EvtChn::bind(domid, port)
    }
}
