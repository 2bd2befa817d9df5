//! Test fakes shared by tapdisk's unit tests and integration tests (cargo feature `testing`,
//! which the crate's own tests turn on): an in-memory image driver whose failures, waits and
//! capabilities a test chooses, and VBDs built on it.
//!
//! ```ignore
//! let image = FakeImage::new(8);
//! let faults = image.faults();            // keep a handle: the image moves into the VBD
//! faults.fail_reads(2, libc::EAGAIN);     // the next two reads fail, then reads succeed
//! let vbd = fake_vbd(image, DEFAULT_REQUEST_TIMEOUT);
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::driver::{
    Allocation, Capabilities, DiskInfo, DiskType, DriverDetail, DriverStats, ImageDriver,
    OpenOptions, ReadOutcome, StatusRun, ZeroFlags, SECTOR_SIZE, VDISK_READONLY,
};
use crate::engine::IoFuture;
use crate::image::ImageChain;
use crate::iobuf::IoBuf;
use crate::vbd::{OpenRequest, Vbd};

/// The engine name a fake image reports in stats.
pub const FAKE_ENGINE: &str = "fake";

/// Injected failures of one kind of request: the next `remaining` fail with `errno`.
#[derive(Debug, Default)]
struct Failures {
    remaining: AtomicU32,
    errno: AtomicI32,
}

impl Failures {
    fn set(&self, count: u32, errno: i32) {
        self.errno.store(errno, Ordering::Relaxed);
        self.remaining.store(count, Ordering::Relaxed);
    }

    /// Uses up one failure, if any is left.
    fn take(&self) -> io::Result<()> {
        match self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        {
            Ok(_) => Err(io::Error::from_raw_os_error(
                self.errno.load(Ordering::Relaxed),
            )),
            Err(_) => Ok(()),
        }
    }
}

/// What a test makes a [`FakeImage`] do, changeable after the image moved into a VBD.
#[derive(Debug, Default)]
pub struct Faults {
    reads: Failures,
    writes: Failures,
    flushes: Failures,
    /// When set, every read first waits for (and uses up) one permit.
    read_gate: Mutex<Option<Arc<Semaphore>>>,
}

impl Faults {
    /// The next `count` reads fail with `errno`.
    pub fn fail_reads(&self, count: u32, errno: i32) {
        self.reads.set(count, errno);
    }

    /// The next `count` writes (including discards and zeroing) fail with `errno`.
    pub fn fail_writes(&self, count: u32, errno: i32) {
        self.writes.set(count, errno);
    }

    /// The next `count` flushes fail with `errno`.
    pub fn fail_flushes(&self, count: u32, errno: i32) {
        self.flushes.set(count, errno);
    }

    /// From now on every read waits for a permit of the returned semaphore (none yet).
    pub fn gate_reads(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *lock(&self.read_gate) = Some(Arc::clone(&gate));
        gate
    }

    fn gate(&self) -> Option<Arc<Semaphore>> {
        lock(&self.read_gate).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An image held in memory, zero-filled at first, that serves requests (and injected faults)
/// at once. It offers what its [`Capabilities`] say: discard and fast zeroing make ranges read
/// as zeros; without them those requests fail with `EOPNOTSUPP`, as from a real driver.
#[derive(Debug)]
pub struct FakeImage {
    path: PathBuf,
    info: DiskInfo,
    capabilities: Capabilities,
    data: Mutex<Vec<u8>>,
    /// For a sparse image ([`FakeImage::sparse`]), which sectors were written.
    written: Option<Mutex<Vec<bool>>>,
    faults: Arc<Faults>,
}

impl FakeImage {
    /// A writable image of `sectors` sectors at `/fake`, with no optional operation.
    pub fn new(sectors: u64) -> Self {
        let bytes = usize::try_from(sectors * SECTOR_SIZE).expect("a fake image fits memory");
        Self {
            path: PathBuf::from("/fake"),
            info: DiskInfo {
                sectors,
                sector_size: 512,
                info: 0,
            },
            capabilities: Capabilities::default(),
            data: Mutex::new(vec![0; bytes]),
            written: None,
            faults: Arc::default(),
        }
    }

    /// The same image as the leaf of a chain sees a sparse one: sectors never written are
    /// absent (reads leave them to the images below; block status says `Absent`).
    pub fn sparse(mut self) -> Self {
        let sectors = usize::try_from(self.info.sectors).expect("a fake image fits memory");
        self.written = Some(Mutex::new(vec![false; sectors]));
        self
    }

    /// Marks `count` sectors at `sector` written (sparse images).
    fn mark_written(&self, sector: u64, count: u64) {
        if let Some(written) = &self.written {
            let index = |s: u64| usize::try_from(s).expect("checked against the size");
            lock(written)[index(sector)..index(sector + count)].fill(true);
        }
    }

    /// Runs of `count` sectors at `sector` (relative to it), written or not: all written for
    /// an image that is not sparse.
    fn runs(&self, sector: u64, count: u64) -> Vec<(std::ops::Range<u64>, bool)> {
        let Some(written) = &self.written else {
            return vec![(0..count, true)];
        };
        let written = lock(written);
        let mut runs: Vec<(std::ops::Range<u64>, bool)> = Vec::new();
        for offset in 0..count {
            let index = usize::try_from(sector + offset).expect("checked against the size");
            let here = written[index];
            match runs.last_mut() {
                Some((range, state)) if *state == here => range.end = offset + 1,
                _ => runs.push((offset..offset + 1, here)),
            }
        }
        runs
    }

    /// The same image at `path` (its name in stats).
    pub fn at(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// The same image offering `capabilities`.
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// The same image, read-only (`VDISK_READONLY`).
    pub fn read_only(mut self) -> Self {
        self.info.info |= VDISK_READONLY;
        self
    }

    /// The same image holding `bytes` from its start.
    pub fn holding(self, bytes: &[u8]) -> Self {
        lock(&self.data)[..bytes.len()].copy_from_slice(bytes);
        self
    }

    /// The handle to this image's faults.
    pub fn faults(&self) -> Arc<Faults> {
        Arc::clone(&self.faults)
    }

    /// The byte range of `count` sectors at `sector`; `EINVAL` past the end.
    fn range(&self, sector: u64, count: u64) -> io::Result<std::ops::Range<usize>> {
        let end = sector
            .checked_add(count)
            .filter(|end| *end <= self.info.sectors)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let byte = |s: u64| usize::try_from(s * SECTOR_SIZE).expect("checked above");
        Ok(byte(sector)..byte(end))
    }

    fn zero(&self, sector: u64, count: u64, offered: bool) -> io::Result<()> {
        if !offered {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.faults.writes.take()?;
        let range = self.range(sector, count)?;
        lock(&self.data)[range].fill(0);
        self.mark_written(sector, count);
        Ok(())
    }
}

impl ImageDriver for FakeImage {
    fn disk_type(&self) -> DiskType {
        DiskType::Aio
    }

    fn info(&self) -> DiskInfo {
        self.info
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self, sector: u64, mut buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        Box::pin(async move {
            if let Some(gate) = self.faults.gate() {
                gate.acquire().await.map_err(io::Error::other)?.forget();
            }
            self.faults.reads.take()?;
            let count = buf.len() as u64 / SECTOR_SIZE;
            let range = self.range(sector, count)?;
            buf.as_mut_slice().copy_from_slice(&lock(&self.data)[range]);
            let absent = self
                .runs(sector, count)
                .into_iter()
                .filter(|(_, written)| !written)
                .map(|(range, _)| range)
                .collect();
            Ok(ReadOutcome { buf, absent })
        })
    }

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.faults.writes.take()?;
            let count = buf.len() as u64 / SECTOR_SIZE;
            let range = self.range(sector, count)?;
            lock(&self.data)[range].copy_from_slice(buf.as_slice());
            self.mark_written(sector, count);
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { self.faults.flushes.take() })
    }

    fn discard(&self, sector: u64, count: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.zero(sector, count, self.capabilities.discard) })
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn write_zeroes(&self, sector: u64, count: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move { self.zero(sector, count, self.capabilities.write_zeroes) })
    }

    fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        Box::pin(async move {
            self.range(sector, count)?;
            Ok(self
                .runs(sector, count)
                .into_iter()
                .map(|(range, written)| StatusRun {
                    sectors: range.end - range.start,
                    state: if written {
                        Allocation::Data
                    } else {
                        Allocation::Absent
                    },
                })
                .collect())
        })
    }

    fn stats(&self) -> Option<DriverStats> {
        Some(DriverStats {
            pending: 0,
            engine: FAKE_ENGINE,
            detail: DriverDetail::Raw { mapped: false },
        })
    }
}

/// A VBD (minor 9) open on `image` alone, with request timeout `timeout`.
pub fn fake_vbd(image: FakeImage, timeout: Duration) -> Vbd {
    let params = format!("aio:{}", image.path.display());
    let read_only = image.info.info & VDISK_READONLY != 0;
    let chain = ImageChain::from_drivers(vec![Box::new(image)]).expect("one image");
    let vbd = Vbd::new(9);
    let request = OpenRequest {
        params,
        options: OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
        timeout,
        log: None,
        secondary: None,
        intellicache: crate::lcache::IntelliCache::default(),
    };
    vbd.install(chain, request).expect("a new VBD is closed");
    vbd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_images_keep_data_and_inject_faults() {
        let image = FakeImage::new(8).holding(&[7; 512]);
        let faults = image.faults();
        let out = image.read(0, IoBuf::zeroed(1024)).await.unwrap();
        assert!(out.buf.as_slice()[..512].iter().all(|b| *b == 7));
        assert!(out.buf.as_slice()[512..].iter().all(|b| *b == 0));
        faults.fail_writes(1, libc::EIO);
        let data = Arc::new(IoBuf::copy_from(&[1; 512]));
        let error = image.write(1, Arc::clone(&data)).await.unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EIO));
        image.write(1, data).await.unwrap();
        assert_eq!(lock(&image.data)[512], 1);
        // No capabilities: discard is refused as a real driver refuses it.
        let error = image.discard(0, 1).await.unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EOPNOTSUPP));
        let image = image.with_capabilities(Capabilities {
            discard: true,
            ..Capabilities::default()
        });
        image.discard(0, 2).await.unwrap();
        assert!(lock(&image.data)[..1024].iter().all(|b| *b == 0));
        assert!(image.read(7, IoBuf::zeroed(1024)).await.is_err());
    }
}
