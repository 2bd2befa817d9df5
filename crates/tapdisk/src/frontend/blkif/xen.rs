//! Xen's grant and event-channel devices, `/dev/xen/gntdev` and `/dev/xen/evtchn` (the
//! `unsafe` part of the blkif frontend: ioctls, `mmap`, and the shared ring's memory).
//!
//! * [`GntDev::map_ring`]: `IOCTL_GNTDEV_MAP_GRANT_REF` (0x184700) reserves the guest's ring
//!   pages in the device, `mmap` maps them; dropping the mapping unmaps and releases them
//!   (`IOCTL_GNTDEV_UNMAP_GRANT_REF`, 0x104701).
//! * [`GntCopier`]: `IOCTL_GNTDEV_GRANT_COPY` (0x104708), one call per batch of segments
//!   (24-byte entries: source and destination as a virtual address or `{ref, offset,
//!   domid}`, `u16 len`, `u16 flags`, `i16 status`).
//! * [`EvtChn`]: one `/dev/xen/evtchn` handle per ring, bound to the guest's port with
//!   `IOCTL_EVTCHN_BIND_INTERDOMAIN` (0x84501, returns the local port); `NOTIFY` (0x44504)
//!   signals the guest; a `read` of the handle returns pending ports, a `write` of a port
//!   unmasks it. Closing the handle unbinds.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use blkif::grant::{FromGuest, GrantCopy, ToGuest};
use blkif::ring::RingMemory;
use blkif::PAGE_SIZE;
use tokio::io::unix::AsyncFd;

use super::path_error;

const GNTDEV: &str = "/dev/xen/gntdev";
const EVTCHN: &str = "/dev/xen/evtchn";

const IOCTL_GNTDEV_MAP_GRANT_REF: libc::c_ulong = 0x0018_4700;
const IOCTL_GNTDEV_UNMAP_GRANT_REF: libc::c_ulong = 0x0010_4701;
const IOCTL_GNTDEV_GRANT_COPY: libc::c_ulong = 0x0010_4708;
const IOCTL_EVTCHN_BIND_INTERDOMAIN: libc::c_ulong = 0x0008_4501;
const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = 0x0004_4504;

const GNTCOPY_SOURCE_GREF: u16 = 1;
const GNTCOPY_DEST_GREF: u16 = 2;

fn open_device(path: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| path_error(e, path))
}

fn domid16(domid: u32) -> io::Result<u16> {
    u16::try_from(domid).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("domain id {domid} is out of range"),
        )
    })
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
struct UnmapGrantRef {
    index: u64,
    count: u32,
    pad: u32,
}

/// A grant-device handle.
#[derive(Debug, Clone)]
pub struct GntDev {
    file: Arc<File>,
}

impl GntDev {
    /// Opens `/dev/xen/gntdev`.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            file: Arc::new(open_device(GNTDEV)?),
        })
    }

    /// Maps the pages `grefs` of guest `domid`, read-write, contiguously.
    pub fn map_ring(&self, domid: u32, grefs: &[u32]) -> io::Result<MappedRing> {
        let count = grefs.len();
        if count == 0 || count > 8 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // struct ioctl_gntdev_map_grant_ref: u32 count, u32 pad, u64 index, then
        // {u32 domid, u32 ref} per page; as u64 words so that it is 8-byte aligned.
        let mut words = vec![0u64; 2 + count];
        words[0] = u64::try_from(count).unwrap_or(0);
        for (i, gref) in grefs.iter().enumerate() {
            words[2 + i] = u64::from(domid) | (u64::from(*gref) << 32);
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: `words` is a valid, writable `ioctl_gntdev_map_grant_ref` with `count`
        // references that outlives the call; the kernel writes only `index` inside it.
        let rc = unsafe { libc::ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, words.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let index = words[1];
        let len = count * PAGE_SIZE;
        let unmap = |file: &File| {
            let mut request = UnmapGrantRef {
                index,
                count: u32::try_from(count).unwrap_or(0),
                pad: 0,
            };
            // SAFETY: `request` is a valid `ioctl_gntdev_unmap_grant_ref` for the call's
            // duration.
            unsafe {
                libc::ioctl(file.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut request);
            }
        };
        let Ok(offset) = libc::off_t::try_from(index) else {
            unmap(&self.file);
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        // SAFETY: a fresh shared mapping of the pages the device just reserved at `index`;
        // no existing memory is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if address == libc::MAP_FAILED {
            let error = io::Error::last_os_error();
            unmap(&self.file);
            return Err(error);
        }
        Ok(MappedRing {
            address: address.cast(),
            len,
            index,
            count: u32::try_from(count).unwrap_or(0),
            device: Arc::clone(&self.file),
        })
    }

    /// A grant copier for guest `domid` on this handle.
    pub fn copier(&self, domid: u32) -> io::Result<GntCopier> {
        Ok(GntCopier {
            file: Arc::clone(&self.file),
            domid: domid16(domid)?,
            segments: Vec::new(),
        })
    }
}

/// Ring pages of a guest mapped into our memory.
#[derive(Debug)]
pub struct MappedRing {
    address: *mut u8,
    len: usize,
    index: u64,
    count: u32,
    device: Arc<File>,
}

// SAFETY: the mapping is plain shared memory, touched only through atomic word accesses
// ([`RingMemory`]); nothing in it is tied to the thread that mapped it.
unsafe impl Send for MappedRing {}
// SAFETY: as above: all access goes through atomics.
unsafe impl Sync for MappedRing {}

impl MappedRing {
    fn word(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "ring word {offset} outside the {}-byte mapping",
            self.len
        );
        // SAFETY: `offset` is aligned and inside the mapping (checked above), which lives
        // as long as `self`; the guest changes this memory concurrently, which atomic
        // accesses tolerate.
        unsafe { AtomicU32::from_ptr(self.address.add(offset).cast()) }
    }
}

impl RingMemory for MappedRing {
    fn bytes(&self) -> usize {
        self.len
    }

    fn load(&self, offset: usize) -> u32 {
        self.word(offset).load(Ordering::Relaxed)
    }

    fn store(&self, offset: usize, value: u32) {
        self.word(offset).store(value, Ordering::Relaxed);
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map_ring` with this address and length, and no
        // reference into it outlives `self`.
        unsafe {
            libc::munmap(self.address.cast(), self.len);
        }
        let mut request = UnmapGrantRef {
            index: self.index,
            count: self.count,
            pad: 0,
        };
        // SAFETY: `request` is a valid `ioctl_gntdev_unmap_grant_ref` for the call.
        unsafe {
            libc::ioctl(
                self.device.as_raw_fd(),
                IOCTL_GNTDEV_UNMAP_GRANT_REF,
                &mut request,
            );
        }
    }
}

/// `struct gntdev_grant_copy_segment`: each side is a virtual address or a foreign
/// `{ref, offset, domid}` packed into 8 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CopySegment {
    source: u64,
    dest: u64,
    len: u16,
    flags: u16,
    status: i16,
    pad: u16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
struct GrantCopyRequest {
    count: u32,
    segments: *mut CopySegment,
}

fn foreign(gref: u32, offset: u16, domid: u16) -> u64 {
    u64::from(gref) | (u64::from(offset) << 32) | (u64::from(domid) << 48)
}

/// Which way a batch of grant copies goes.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// From the guest's pages into local memory.
    FromGuest,
    /// From local memory into the guest's pages.
    ToGuest,
}

/// Grant copies to and from one guest.
#[derive(Debug)]
pub struct GntCopier {
    file: Arc<File>,
    domid: u16,
    segments: Vec<CopySegment>,
}

impl GntCopier {
    /// Runs the batch in `self.segments`; statuses are left in it.
    fn run(&mut self) -> io::Result<()> {
        if self.segments.is_empty() {
            return Ok(());
        }
        let mut request = GrantCopyRequest {
            count: u32::try_from(self.segments.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
            segments: self.segments.as_mut_ptr(),
        };
        // SAFETY: `request` points at `count` valid segments that live across the call;
        // every local address in them names memory the caller borrowed (mutably for copies
        // into it) for at least as long.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut request) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies between the guest's pages and local memory going `direction`, all of `copies`
    /// in one batch: `piece` tells where a copy's bytes are (grant reference, offset in the
    /// guest page, local address, length; the address taken from a borrow that lasts across
    /// the call, mutable for copies into local memory), `set_status` records how it went.
    fn copy<C>(
        &mut self,
        direction: Direction,
        copies: &mut [C],
        piece: impl Fn(&mut C) -> (u32, u16, u64, usize),
        set_status: impl Fn(&mut C, i16),
    ) -> io::Result<()> {
        self.segments.clear();
        for copy in copies.iter_mut() {
            let (gref, offset, local, len) = piece(copy);
            let guest = foreign(gref, offset, self.domid);
            let (source, dest, flags) = match direction {
                Direction::FromGuest => (guest, local, GNTCOPY_SOURCE_GREF),
                Direction::ToGuest => (local, guest, GNTCOPY_DEST_GREF),
            };
            self.segments.push(CopySegment {
                source,
                dest,
                len: u16::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
                flags,
                status: 0,
                pad: 0,
            });
        }
        self.run()?;
        for (copy, segment) in copies.iter_mut().zip(&self.segments) {
            set_status(copy, segment.status);
        }
        Ok(())
    }
}

impl GrantCopy for GntCopier {
    fn copy_from_guest(&mut self, copies: &mut [FromGuest<'_>]) -> io::Result<()> {
        let piece =
            |c: &mut FromGuest<'_>| (c.gref, c.offset, c.dest.as_mut_ptr() as u64, c.dest.len());
        self.copy(Direction::FromGuest, copies, piece, |c, status| {
            c.status = status
        })
    }

    fn copy_to_guest(&mut self, copies: &mut [ToGuest<'_>]) -> io::Result<()> {
        let piece = |c: &mut ToGuest<'_>| (c.gref, c.offset, c.src.as_ptr() as u64, c.src.len());
        self.copy(Direction::ToGuest, copies, piece, |c, status| {
            c.status = status
        })
    }
}

/// One event channel to a guest, on its own `/dev/xen/evtchn` handle.
#[derive(Debug)]
pub struct EvtChn {
    fd: AsyncFd<OwnedFd>,
    port: u32,
}

impl EvtChn {
    /// Binds to port `remote_port` of guest `domid` (needs a tokio runtime).
    pub fn bind(domid: u32, remote_port: u32) -> io::Result<Self> {
        let file = open_device(EVTCHN)?;
        let mut request = [domid, remote_port];
        // SAFETY: `request` is a valid `ioctl_evtchn_bind_interdomain` for the call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                request.as_mut_ptr(),
            )
        };
        let port = u32::try_from(rc).map_err(|_| io::Error::last_os_error())?;
        // SAFETY: the `OwnedFd` keeps the descriptor open and unchanged until dropped, and
        // the `AsyncFd` owns it, so the descriptor outlives the registration.
        let fd = unsafe { AsyncFd::register(OwnedFd::from(file)) }?;
        Ok(Self { fd, port })
    }

    /// Signals the guest.
    pub fn notify(&self) -> io::Result<()> {
        let mut port = self.port;
        // SAFETY: `port` is a valid `ioctl_evtchn_notify` for the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.get_ref().as_raw_fd(),
                IOCTL_EVTCHN_NOTIFY,
                &mut port,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the guest signalled, then unmasks the port.
    pub async fn wait(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut pending = [0u32; 8];
            let fd = self.fd.get_ref().as_raw_fd();
            // SAFETY: reads at most `size_of_val(&pending)` bytes into `pending`.
            let n = unsafe {
                libc::read(
                    fd,
                    pending.as_mut_ptr().cast(),
                    std::mem::size_of_val(&pending),
                )
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(error);
            }
            let ports = usize::try_from(n).unwrap_or(0) / 4;
            if ports == 0 {
                guard.clear_ready();
                continue;
            }
            // Unmask (write the port back), as every event channel user must before the
            // next event can be delivered.
            let port = self.port;
            // SAFETY: writes the 4 bytes of `port`.
            let rc = unsafe { libc::write(fd, (&raw const port).cast(), 4) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
    }
}
