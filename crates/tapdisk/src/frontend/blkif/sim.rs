//! A simulated Xen for tests off Xen: guests' memory and grant tables are
//! `blkif::sim::SimGuest`s registered by domain id, and an event channel is a pair of
//! [`tokio::sync::Notify`] (a notification while nobody waits is kept, like a pending bit).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blkif::sim::{SimCopier, SimGuest, SimRing};
use tokio::sync::Notify;

use super::platform::{EventChannel, Platform};

/// Both ends of one simulated event channel.
#[derive(Debug, Default)]
struct Link {
    to_backend: Notify,
    to_guest: Notify,
    bound: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    guests: HashMap<u32, Arc<SimGuest>>,
    links: HashMap<(u32, u32), Arc<Link>>,
}

/// Simulated grant and event-channel devices (clones share their guests).
#[derive(Debug, Default, Clone)]
pub struct SimPlatform {
    state: Arc<Mutex<State>>,
}

impl SimPlatform {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `guest` domain `domid`.
    pub fn add_guest(&self, domid: u32, guest: Arc<SimGuest>) {
        self.state().guests.insert(domid, guest);
    }

    /// The guest's end of its event channel `port` (created on first use).
    pub fn guest_port(&self, domid: u32, port: u32) -> GuestPort {
        let link = Arc::clone(self.state().links.entry((domid, port)).or_default());
        GuestPort { link }
    }

    fn guest(&self, domid: u32) -> io::Result<Arc<SimGuest>> {
        self.state()
            .guests
            .get(&domid)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
    }
}

/// A guest's end of a simulated event channel.
#[derive(Debug, Clone)]
pub struct GuestPort {
    link: Arc<Link>,
}

impl GuestPort {
    /// Signals the back end.
    pub fn notify(&self) {
        self.link.to_backend.notify_one();
    }

    /// Waits for the back end's next signal.
    pub async fn wait(&self) {
        self.link.to_guest.notified().await;
    }

    /// Whether a back end is bound to this channel.
    pub fn is_bound(&self) -> bool {
        self.link.bound.load(Ordering::SeqCst)
    }
}

/// The back end's end of a simulated event channel; dropping it unbinds.
#[derive(Debug)]
pub struct SimChannel {
    link: Arc<Link>,
}

impl Drop for SimChannel {
    fn drop(&mut self) {
        self.link.bound.store(false, Ordering::SeqCst);
    }
}

impl EventChannel for SimChannel {
    fn notify(&self) -> io::Result<()> {
        self.link.to_guest.notify_one();
        Ok(())
    }

    async fn wait(&mut self) -> io::Result<()> {
        self.link.to_backend.notified().await;
        Ok(())
    }
}

impl Platform for SimPlatform {
    type Memory = SimRing;
    type Copier = SimCopier;
    type Channel = SimChannel;

    fn map_ring(&self, domid: u32, grefs: &[u32]) -> io::Result<SimRing> {
        self.guest(domid)?
            .map_ring(grefs)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn copier(&self, domid: u32) -> io::Result<SimCopier> {
        Ok(self.guest(domid)?.copier())
    }

    fn bind(&self, domid: u32, port: u32) -> io::Result<SimChannel> {
        let link = self
            .state()
            .links
            .get(&(domid, port))
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if link.bound.swap(true, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(SimChannel { link })
    }
}
