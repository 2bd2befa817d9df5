//! The `vhd` driver: fixed, dynamic and differencing VHD images (tapdisk's `block-vhd.c`).
//!
//! Metadata is parsed and validated with the `vhd` crate at open time (footer, dynamic header,
//! BAT, tapdisk batmap, parent locators); from then on the driver keeps the BAT, the batmap
//! and a bounded cache of sector bitmaps in memory and does all file I/O through an
//! [`IoEngine`] on aligned buffers, with `O_DIRECT` unless asked not to (and the same buffered
//! fallback as `aio` where the filesystem refuses it).
//!
//! # Reads
//! Fixed disks are read in place. For sparse disks every block touched is looked up in the
//! BAT: unallocated blocks are *absent* (the image chain reads them from the parent, or zeros
//! at the bottom); blocks the batmap (or what we learned since open) marks full are read
//! without consulting their bitmap; otherwise the cached sector bitmap splits the range into
//! present runs (read from the file) and absent runs.
//!
//! # Writes and crash safety
//! A write into an allocated block writes the data, then (only if some of its sectors were not
//! yet marked) the block's sector bitmap, then the batmap if the block became full. A write
//! into an unallocated block allocates it at the end of the file, page aligned:
//!
//! 1. a copy of the footer is written at the block's end, the file's new end, so the file
//!    always ends in a valid footer (only footer writes ever extend the file);
//! 2. the data and the block's bitmap are written (the block is not referenced yet);
//! 3. the BAT sector holding the block's entry is written: only now is the block part of the
//!    image;
//! 4. the batmap, if the block is full.
//!
//! A request is acknowledged only after every step completed, and a flush is `fdatasync`, so a
//! crash (even `kill -9` in the middle of an allocation) leaves a valid image in which every
//! write acknowledged before a completed flush is present, and no sector is marked present
//! before its data is on disk, so no stale or foreign data is ever exposed. Space reserved by an
//! allocation that did not finish is unreferenced and harmless.
//!
//! Metadata updates that share an on-disk sector are serialised (one lock for BAT writes, one
//! for batmap writes, one striped lock per block for bitmap updates and allocation), and every
//! update writes the current in-memory state, so out-of-order completion can never lose a bit.
//! Two writes into the same unallocated block allocate it once: the second waits on the block's
//! lock and then finds it allocated.
//!
//! # Discard
//! The C stack has none. Here a discarded range always reads back as zeros afterwards:
//! - in an image without a parent, a whole allocated block is freed (batmap bit cleared, BAT
//!   entry set back to unallocated, then its space punched out of the file); part of a block
//!   has its data punched to zeros and its bitmap bits cleared;
//! - in a differencing image the parent's data must stay hidden, so the range is made present
//!   and zero: allocated blocks get their data punched to zeros and their bits set; unallocated
//!   blocks are allocated with the bits set and no data written (a new block lies past the old
//!   end of file, so its data area is a hole that reads as zeros).
//!
//! # Limits
//! BAT entries are 32-bit sector offsets, so no block may end past 2 TiB in the file: an
//! allocation that would is refused with `EFBIG` (and logged).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use vhd::bat::BAT_UNUSED;
use vhd::batmap::BatmapHeader;
use vhd::bitmap::{self, SectorBitmap};
use vhd::create::format_uuid;

use super::{
    Allocation, Capabilities, DiskInfo, DiskType, DriverDetail, DriverStats, ImageDriver,
    ImageLocator, OpenOptions, ParentLink, ReadOutcome, StatusRun, ZeroFlags, SECTOR_SIZE,
    VDISK_READONLY,
};
use crate::engine::{open_engine, IoEngine, IoFuture};
use crate::iobuf::IoBuf;

/// New blocks' data areas start on this boundary (a page, as tapdisk does).
const DATA_ALIGNMENT: u64 = 4096;
/// Largest file offset a 32-bit sector BAT entry can reach: 2 TiB.
const MAX_PHYSICAL_BYTES: u64 = (1u64 << 32) * SECTOR_SIZE;
/// Footer size.
const FOOTER_BYTES: u64 = 512;
/// Sector bitmaps kept in memory (512 bytes each for 2 MiB blocks).
const BITMAP_CACHE_CAPACITY: usize = 8192;
/// Stripes of the per-block mutation lock.
const BLOCK_LOCK_STRIPES: usize = 256;
/// Largest run of zeros written at once where punching holes is not supported.
const ZERO_CHUNK: u64 = 1 << 20;

/// Why a VHD could not be opened (or a parent was refused). Each message names the file and
/// the problem; [`VhdDriverError::errno`] is what the control protocol reports.
#[derive(Debug, thiserror::Error)]
pub enum VhdDriverError {
    /// The file could not be opened or read.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The metadata is corrupt or unsupported (the `vhd` crate names field and offset).
    #[error("{path}: refusing to open: {source}")]
    Metadata {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: vhd::VhdError,
    },
    /// A differencing image's parent cannot be found.
    #[error("{path}: parent image missing: {reason}")]
    MissingParent {
        /// The child image.
        path: PathBuf,
        /// Which files were looked for.
        reason: String,
    },
    /// The image opened below a differencing image is not its parent.
    #[error("{child}: parent {parent} has UUID {found}, but the child was made from {expected}")]
    ParentMismatch {
        /// The child image.
        child: PathBuf,
        /// The image offered as parent.
        parent: PathBuf,
        /// The parent's UUID.
        found: String,
        /// The UUID recorded in the child.
        expected: String,
    },
    /// A raw-parent differencing image was given a VHD parent (or the reverse).
    #[error("{child}: parent {parent} is a {found} image, expected {expected}")]
    ParentType {
        /// The child image.
        child: PathBuf,
        /// The image offered as parent.
        parent: PathBuf,
        /// Its type.
        found: &'static str,
        /// The type the child needs.
        expected: &'static str,
    },
}

impl VhdDriverError {
    /// The errno reported for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Io { source, .. } => crate::error::errno_of(source),
            Self::Metadata { source, .. } => source.errno(),
            Self::MissingParent { .. } => libc::ENOENT,
            Self::ParentMismatch { .. } | Self::ParentType { .. } => libc::EINVAL,
        }
    }

    /// Logs the error and converts it to an errno-carrying `io::Error` (what the control
    /// protocol can transport), keeping it as the cause.
    pub fn into_logged_io(self) -> io::Error {
        tracing::error!("{self}");
        crate::error::Error::with_source(self.errno(), "", self).into()
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Converts a computed byte length into a buffer length.
fn to_len(bytes: u64) -> io::Result<usize> {
    usize::try_from(bytes).map_err(|_| errno(libc::EINVAL))
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// A future being joined and, once done, its result.
type JoinSlot<'a, T> = (Option<IoFuture<'a, T>>, Option<io::Result<T>>);

/// Polls several futures concurrently and returns their results in order.
async fn join_all<'a, T>(futures: Vec<IoFuture<'a, T>>) -> Vec<io::Result<T>> {
    let mut slots: Vec<JoinSlot<'a, T>> = futures.into_iter().map(|f| (Some(f), None)).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, result) in &mut slots {
            if let Some(f) = future {
                match f.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        *result = Some(r);
                        *future = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    slots
        .into_iter()
        .map(|(_, r)| r.unwrap_or_else(|| Err(errno(libc::EIO))))
        .collect()
}

/// First error of a set of results, if any.
fn first_error<T>(results: Vec<io::Result<T>>) -> io::Result<Vec<T>> {
    results.into_iter().collect()
}

/// Identity of a file at open time, to tell whether a shared parent is still the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of_path(path: &Path) -> io::Result<Self> {
        Ok(Self::of_metadata(&std::fs::metadata(path)?))
    }

    fn of_metadata(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        }
    }
}

/// One cached sector bitmap, valid for the BAT entry it was loaded from.
#[derive(Debug)]
struct CachedBitmap {
    /// BAT entry (bitmap sector) the bits belong to.
    entry: u32,
    /// The bits as on disk; `None` until loaded.
    bits: Mutex<Option<SectorBitmap>>,
}

impl CachedBitmap {
    fn lock(&self) -> MutexGuard<'_, Option<SectorBitmap>> {
        self.bits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Mutable state of a sparse image, behind one short-held lock (never held across I/O).
#[derive(Debug)]
struct SparseState {
    /// The BAT as on disk.
    bat: Vec<u32>,
    /// Blocks known to be fully allocated (the batmap's bits; also learned from bitmaps).
    full: Vec<u8>,
    /// Where the next block's bitmap may start (bytes); grows with every allocation.
    next_free: u64,
    /// Sector bitmap cache.
    bitmaps: HashMap<u64, Arc<CachedBitmap>>,
}

/// The on-disk batmap: header template and where it lives.
#[derive(Debug)]
struct BatmapDisk {
    header: BatmapHeader,
    header_offset: u64,
}

/// Layout and state of a dynamic or differencing image.
#[derive(Debug)]
struct Sparse {
    sectors_per_block: u64,
    bitmap_bytes: u64,
    block_bytes: u64,
    table_offset: u64,
    footer: [u8; 512],
    batmap: Option<BatmapDisk>,
    has_parent: bool,
    state: Mutex<SparseState>,
    /// Serialises BAT sector writes.
    bat_write: tokio::sync::Mutex<()>,
    /// Serialises batmap writes.
    batmap_write: tokio::sync::Mutex<()>,
    /// Striped per-block lock: allocation and bitmap updates of a block.
    block_locks: Vec<tokio::sync::Mutex<()>>,
}

impl Sparse {
    fn lock(&self) -> MutexGuard<'_, SparseState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn block_lock(&self, block: u64) -> &tokio::sync::Mutex<()> {
        let stripes = self.block_locks.len() as u64;
        let index = usize::try_from(block % stripes).unwrap_or(0);
        &self.block_locks[index]
    }

    fn entry(state: &SparseState, block: u64) -> u32 {
        usize::try_from(block)
            .ok()
            .and_then(|i| state.bat.get(i))
            .copied()
            .unwrap_or(BAT_UNUSED)
    }

    /// Byte offset of the data of sector `first` of the block whose bitmap is at `entry`.
    fn data_offset(&self, entry: u32, first: u64) -> u64 {
        u64::from(entry) * SECTOR_SIZE + self.bitmap_bytes + first * SECTOR_SIZE
    }
}

/// A VHD image's part of `tap-ctl stats` (the driver status's `"vhd"` object).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VhdStats {
    /// `fixed`, `dynamic` or `differencing`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Blocks with a BAT entry.
    pub allocated_blocks: u64,
    /// Blocks allocated since the image was opened.
    pub allocations: u64,
    /// Sector bitmaps written.
    pub bitmap_writes: u64,
    /// Sector bitmaps read.
    pub bitmap_loads: u64,
    /// Sector bitmaps in the cache.
    pub cached_bitmaps: usize,
}

/// Counters shown in stats.
#[derive(Debug, Default)]
struct VhdCounters {
    allocations: AtomicU64,
    bitmap_writes: AtomicU64,
    bitmap_loads: AtomicU64,
}

/// An open VHD image.
pub struct VhdDriver {
    path: PathBuf,
    info: DiskInfo,
    engine: Box<dyn IoEngine>,
    read_only: bool,
    direct: bool,
    kind: vhd::DiskType,
    uuid: [u8; 16],
    parent: Option<ParentLink>,
    parent_uuid: [u8; 16],
    stamp: FileStamp,
    sparse: Option<Sparse>,
    counters: VhdCounters,
}

impl fmt::Debug for VhdDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhdDriver")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("info", &self.info)
            .field("direct", &self.direct)
            .field("engine", &self.engine.name())
            .field("parent", &self.parent)
            .finish_non_exhaustive()
    }
}

impl VhdDriver {
    /// Opens a VHD image, validating its metadata and locating its parent.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Self, VhdDriverError> {
        let read_only = options.read_only;
        let io_error = |context: &'static str| {
            let path = path.to_path_buf();
            move |source| VhdDriverError::Io {
                path,
                context,
                source,
            }
        };
        let metadata_error = |source| VhdDriverError::Metadata {
            path: path.to_path_buf(),
            source,
        };
        // Metadata is read through a buffered descriptor (any alignment), I/O through the
        // engine's descriptor opened below.
        let probe = super::open_image_file(path, false, false).map_err(io_error("cannot open"))?;
        let stamp = FileStamp::of_metadata(&probe.metadata().map_err(io_error("cannot stat"))?);
        let file_len = vhd::BlockFile::len(&probe).map_err(io_error("cannot size"))?;
        let name = path.display().to_string();
        let image = vhd::VhdImage::open(
            probe,
            &name,
            vhd::OpenOptions {
                writable: !read_only,
                ..vhd::OpenOptions::default()
            },
        )
        .map_err(metadata_error)?;
        if image.used_backup_footer() {
            tracing::warn!(path = %path.display(), "primary footer invalid; using the backup footer (read-only)");
        }
        if let Some(problem) = image.batmap_problem() {
            tracing::warn!(path = %path.display(), "batmap unusable ({problem}); ignoring it for this read-only open");
        }
        let kind = image.disk_type();
        let footer = image.footer().clone();
        let parent_uuid = image.header().map_or([0; 16], |h| h.parent_uuid);
        let parent = if image.has_parent() {
            let parent_path = vhd::chain::resolve_parent(&image, path).map_err(|e| match e {
                vhd::VhdError::ParentNotFound { reason, .. } => VhdDriverError::MissingParent {
                    path: path.to_path_buf(),
                    reason,
                },
                other => metadata_error(other),
            })?;
            Some(ParentLink {
                disk_type: if image.parent_is_raw() {
                    DiskType::Aio
                } else {
                    DiskType::Vhd
                },
                locator: ImageLocator::File(parent_path),
            })
        } else {
            None
        };
        let sparse = if kind.is_sparse() {
            Some(Self::sparse_state(&image, file_len, footer.clone()))
        } else {
            None
        };
        drop(image);

        let mut direct = !options.no_o_direct;
        let file = match super::open_image_file(path, !read_only, direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "O_DIRECT refused by the filesystem; using buffered I/O");
                direct = false;
                super::open_image_file(path, !read_only, false)
            }
            other => other,
        }
        .map_err(io_error("cannot open for I/O"))?;
        let info = DiskInfo {
            sectors: footer.current_size / SECTOR_SIZE,
            sector_size: 512,
            info: if read_only { VDISK_READONLY } else { 0 },
        };
        Ok(Self {
            path: path.to_path_buf(),
            info,
            engine: open_engine(Arc::new(file), !direct, options.io.engine),
            read_only,
            direct,
            kind,
            uuid: footer.uuid,
            parent,
            parent_uuid,
            stamp,
            sparse,
            counters: VhdCounters::default(),
        })
    }

    fn sparse_state(image: &vhd::VhdImage<File>, file_len: u64, mut footer: vhd::Footer) -> Sparse {
        let bat = image.bat().entries.clone();
        let batmap = image.batmap().map(|b| BatmapDisk {
            header: b.header.clone(),
            header_offset: image.batmap_header_offset().unwrap_or(0),
        });
        let full_len = batmap.as_ref().map_or(bat.len().div_ceil(8), |b| {
            usize::try_from(b.header.map_bytes()).unwrap_or(0)
        });
        let mut full = vec![0u8; full_len.max(bat.len().div_ceil(8))];
        if let Some(map) = image.batmap() {
            let n = map.map.len().min(full.len());
            full[..n].copy_from_slice(&map.map[..n]);
            // A batmap bit for an unallocated block would be a lie; don't trust it.
            for (block, entry) in bat.iter().enumerate() {
                if *entry == BAT_UNUSED {
                    bitmap::clear_bit(&mut full, block as u64);
                }
            }
        }
        let next_free = image
            .footer_offset()
            .max(image.end_of_data())
            .max(image.end_of_metadata())
            .max(round_up(file_len, SECTOR_SIZE));
        Sparse {
            sectors_per_block: image.sectors_per_block(),
            bitmap_bytes: image.bitmap_bytes(),
            block_bytes: image.block_size(),
            table_offset: image.header().map_or(0, |h| h.table_offset),
            footer: footer.to_bytes_checked(),
            batmap,
            has_parent: image.has_parent(),
            state: Mutex::new(SparseState {
                bat,
                full,
                next_free,
                bitmaps: HashMap::new(),
            }),
            bat_write: tokio::sync::Mutex::new(()),
            batmap_write: tokio::sync::Mutex::new(()),
            block_locks: (0..BLOCK_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// True when the image is accessed with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The VHD disk type (fixed, dynamic, differencing).
    pub fn vhd_type(&self) -> vhd::DiskType {
        self.kind
    }

    /// The file's identity when it was opened.
    pub fn stamp(&self) -> FileStamp {
        self.stamp
    }

    /// Number of allocated blocks (0 for fixed images).
    pub fn allocated_blocks(&self) -> u64 {
        self.sparse.as_ref().map_or(0, |s| {
            s.lock().bat.iter().filter(|e| **e != BAT_UNUSED).count() as u64
        })
    }

    /// Checks that `parent` may sit below this image, with a message naming both files.
    pub fn check_parent(&self, parent: &dyn ImageDriver) -> Result<(), VhdDriverError> {
        let Some(link) = &self.parent else {
            return Ok(());
        };
        let found_type = parent.disk_type();
        if found_type != link.disk_type {
            return Err(VhdDriverError::ParentType {
                child: self.path.clone(),
                parent: parent.path().to_path_buf(),
                found: found_type.name(),
                expected: link.disk_type.name(),
            });
        }
        if link.disk_type == DiskType::Vhd {
            let found = parent.uuid().unwrap_or([0; 16]);
            if found != self.parent_uuid {
                return Err(VhdDriverError::ParentMismatch {
                    child: self.path.clone(),
                    parent: parent.path().to_path_buf(),
                    found: format_uuid(&found),
                    expected: format_uuid(&self.parent_uuid),
                });
            }
        }
        Ok(())
    }

    fn byte_offset(sector: u64) -> io::Result<u64> {
        sector
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| errno(libc::EINVAL))
    }

    fn check_range(&self, sector: u64, sectors: u64) -> io::Result<()> {
        match sector.checked_add(sectors) {
            Some(end) if end <= self.info.sectors => Ok(()),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// Splits `[sector, sector + count)` into per-block pieces `(block, first, n)`.
    fn pieces(sparse: &Sparse, sector: u64, count: u64) -> Vec<(u64, u64, u64)> {
        let spb = sparse.sectors_per_block;
        let mut out = Vec::new();
        let mut cur = sector;
        let end = sector + count;
        while cur < end {
            let block = cur / spb;
            let first = cur % spb;
            let n = (spb - first).min(end - cur);
            out.push((block, first, n));
            cur += n;
        }
        out
    }

    /// The loaded bitmap of `block` whose BAT entry is `entry`.
    async fn bitmap(
        &self,
        sparse: &Sparse,
        block: u64,
        entry: u32,
    ) -> io::Result<Arc<CachedBitmap>> {
        let slot = {
            let mut state = sparse.lock();
            match state.bitmaps.get(&block) {
                Some(slot) if slot.entry == entry => Arc::clone(slot),
                _ => {
                    if state.bitmaps.len() >= BITMAP_CACHE_CAPACITY {
                        // Drop bitmaps nobody is using until a quarter is free.
                        let target = BITMAP_CACHE_CAPACITY * 3 / 4;
                        let mut excess = state.bitmaps.len() - target;
                        state.bitmaps.retain(|_, slot| {
                            if excess > 0 && Arc::strong_count(slot) == 1 {
                                excess -= 1;
                                false
                            } else {
                                true
                            }
                        });
                    }
                    let slot = Arc::new(CachedBitmap {
                        entry,
                        bits: Mutex::new(None),
                    });
                    state.bitmaps.insert(block, Arc::clone(&slot));
                    slot
                }
            }
        };
        if slot.lock().is_none() {
            let buf = IoBuf::zeroed(to_len(sparse.bitmap_bytes)?);
            let buf = self
                .engine
                .read_at(buf, u64::from(entry) * SECTOR_SIZE)
                .await?;
            self.counters.bitmap_loads.fetch_add(1, Ordering::Relaxed);
            let loaded = SectorBitmap::from_bytes(buf.as_slice().to_vec());
            let full = loaded.all_set(sparse.sectors_per_block);
            let mut bits = slot.lock();
            if bits.is_none() {
                *bits = Some(loaded);
            }
            drop(bits);
            if full {
                let mut state = sparse.lock();
                if Sparse::entry(&state, block) == entry {
                    bitmap::set_bit(&mut state.full, block);
                }
            }
        }
        Ok(slot)
    }

    /// Where the sectors `[first, first + n)` of `block` live: runs relative to `first`, each
    /// `Some(file offset)` when present in this file or `None` when absent.
    async fn locate(
        &self,
        sparse: &Sparse,
        block: u64,
        first: u64,
        n: u64,
    ) -> io::Result<Vec<(u64, u64, Option<u64>)>> {
        let (entry, full) = {
            let state = sparse.lock();
            (
                Sparse::entry(&state, block),
                bitmap::test_bit(&state.full, block),
            )
        };
        if entry == BAT_UNUSED {
            return Ok(vec![(0, n, None)]);
        }
        if full {
            return Ok(vec![(0, n, Some(sparse.data_offset(entry, first)))]);
        }
        let slot = self.bitmap(sparse, block, entry).await?;
        let guard = slot.lock();
        let Some(bits) = guard.as_ref() else {
            return Err(errno(libc::EIO));
        };
        Ok(bits
            .runs(first, n)
            .into_iter()
            .map(|(start, len, set)| {
                (
                    start - first,
                    len,
                    set.then(|| sparse.data_offset(entry, start)),
                )
            })
            .collect())
    }

    async fn read_sparse(
        &self,
        sparse: &Sparse,
        sector: u64,
        mut buf: IoBuf,
    ) -> io::Result<ReadOutcome> {
        let count = buf.len() as u64 / SECTOR_SIZE;
        // (relative sector, count, file offset or absent), merged.
        let mut plan: Vec<(u64, u64, Option<u64>)> = Vec::new();
        for (block, first, n) in Self::pieces(sparse, sector, count) {
            let base = block * sparse.sectors_per_block + first - sector;
            for (rel, len, offset) in self.locate(sparse, block, first, n).await? {
                let rel = base + rel;
                match (plan.last_mut(), offset) {
                    (Some((start, run, Some(prev))), Some(off))
                        if *start + *run == rel && *prev + *run * SECTOR_SIZE == off =>
                    {
                        *run += len;
                    }
                    (Some((start, run, None)), None) if *start + *run == rel => *run += len,
                    _ => plan.push((rel, len, offset)),
                }
            }
        }
        if let [(0, n, Some(offset))] = plan.as_slice() {
            if *n == count {
                let buf = self.engine.read_at(buf, *offset).await?;
                return Ok(ReadOutcome {
                    buf,
                    absent: Vec::new(),
                });
            }
        }
        let mut absent: Vec<Range<u64>> = Vec::new();
        let mut reads = Vec::new();
        let mut targets = Vec::new();
        for (rel, len, offset) in plan {
            match offset {
                None => absent.push(rel..rel + len),
                Some(offset) => {
                    let part = IoBuf::zeroed(to_len(len * SECTOR_SIZE)?);
                    reads.push(self.engine.read_at(part, offset));
                    targets.push(to_len(rel * SECTOR_SIZE)?);
                }
            }
        }
        let parts = first_error(join_all(reads).await)?;
        for (part, at) in parts.into_iter().zip(targets) {
            buf.as_mut_slice()[at..at + part.len()].copy_from_slice(part.as_slice());
        }
        Ok(ReadOutcome { buf, absent })
    }

    /// Writes the BAT entry of `block` (the whole 512-byte BAT sector holding it) and publishes
    /// it in memory once it is on disk.
    async fn write_bat_entry(&self, sparse: &Sparse, block: u64, entry: u32) -> io::Result<()> {
        let _serial = sparse.bat_write.lock().await;
        let first = block / 128 * 128;
        let mut sector = IoBuf::zeroed(512);
        {
            let state = sparse.lock();
            let bytes = sector.as_mut_slice();
            for i in 0..128u64 {
                let b = first + i;
                let value = if b == block {
                    entry
                } else {
                    Sparse::entry(&state, b)
                };
                let at = to_len(i * 4)?;
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
        }
        self.engine
            .write_at(Arc::new(sector), sparse.table_offset + first * 4)
            .await?;
        let mut state = sparse.lock();
        if let Some(slot) = usize::try_from(block)
            .ok()
            .and_then(|i| state.bat.get_mut(i))
        {
            *slot = entry;
        }
        Ok(())
    }

    /// Writes the batmap (header with a fresh checksum, and map) from the in-memory bits.
    async fn write_batmap(&self, sparse: &Sparse) -> io::Result<()> {
        let Some(disk) = &sparse.batmap else {
            return Ok(());
        };
        let _serial = sparse.batmap_write.lock().await;
        let map_len = to_len(disk.header.map_bytes())?;
        let mut map = {
            let state = sparse.lock();
            state.full.clone()
        };
        map.resize(map_len, 0);
        let mut header = disk.header.clone();
        header.checksum = vhd::batmap::batmap_checksum(&map, header.batmap_version);
        let header_bytes = header.to_bytes();
        if header.batmap_offset == disk.header_offset + 512 {
            let mut all = IoBuf::zeroed(512 + map_len);
            all.as_mut_slice()[..512].copy_from_slice(&header_bytes);
            all.as_mut_slice()[512..].copy_from_slice(&map);
            self.engine
                .write_at(Arc::new(all), disk.header_offset)
                .await
        } else {
            self.engine
                .write_at(Arc::new(IoBuf::copy_from(&map)), header.batmap_offset)
                .await?;
            self.engine
                .write_at(
                    Arc::new(IoBuf::copy_from(&header_bytes)),
                    disk.header_offset,
                )
                .await
        }
    }

    /// Marks `block` full (or not) in memory and on disk (the batmap) if that changes it.
    async fn set_full(&self, sparse: &Sparse, block: u64, full: bool) -> io::Result<()> {
        let changed = {
            let mut state = sparse.lock();
            let was = bitmap::test_bit(&state.full, block);
            if full {
                bitmap::set_bit(&mut state.full, block);
            } else {
                bitmap::clear_bit(&mut state.full, block);
            }
            was != full
        };
        if changed {
            self.write_batmap(sparse).await?;
        }
        Ok(())
    }

    /// Allocates `block` at the end of the file with `bits` as its bitmap and optionally
    /// initial data `(first sector in block, bytes)`. The caller holds the block's lock.
    async fn allocate(
        &self,
        sparse: &Sparse,
        block: u64,
        data: Option<(u64, Arc<IoBuf>)>,
        bits: SectorBitmap,
    ) -> io::Result<()> {
        let bitmap_at = {
            let mut state = sparse.lock();
            let base = state.next_free;
            let bitmap_at =
                round_up(base + sparse.bitmap_bytes, DATA_ALIGNMENT) - sparse.bitmap_bytes;
            let footer_at = bitmap_at + sparse.bitmap_bytes + sparse.block_bytes;
            if footer_at + FOOTER_BYTES > MAX_PHYSICAL_BYTES {
                tracing::error!(
                    path = %self.path.display(),
                    block,
                    "cannot allocate block: it would end at byte {}, past the VHD limit of 2 TiB",
                    footer_at
                );
                return Err(errno(libc::EFBIG));
            }
            state.next_free = footer_at;
            bitmap_at
        };
        let entry = u32::try_from(bitmap_at / SECTOR_SIZE).map_err(|_| errno(libc::EFBIG))?;
        let footer_at = bitmap_at + sparse.bitmap_bytes + sparse.block_bytes;
        // 1. The file's new end is a valid footer before anything else lands past the old end.
        self.engine
            .write_at(Arc::new(IoBuf::copy_from(&sparse.footer)), footer_at)
            .await?;
        // 2. Data and bitmap, still unreferenced.
        let bitmap_buf = Arc::new(IoBuf::copy_from(bits.as_bytes()));
        let mut writes = vec![self.engine.write_at(bitmap_buf, bitmap_at)];
        if let Some((first, buf)) = data {
            writes.push(self.engine.write_at(buf, sparse.data_offset(entry, first)));
        }
        first_error(join_all(writes).await)?;
        self.counters.allocations.fetch_add(1, Ordering::Relaxed);
        // 3. The BAT entry makes the block part of the image.
        let full = bits.all_set(sparse.sectors_per_block);
        {
            let mut state = sparse.lock();
            state.bitmaps.insert(
                block,
                Arc::new(CachedBitmap {
                    entry,
                    bits: Mutex::new(Some(bits)),
                }),
            );
        }
        self.write_bat_entry(sparse, block, entry).await?;
        // 4. The batmap, when the block is complete.
        if full {
            self.set_full(sparse, block, true).await?;
        }
        Ok(())
    }

    /// Sets (or clears) bits `[first, first + n)` of allocated `block` on disk. The caller holds
    /// the block's lock and has checked that `entry` is still the block's BAT entry.
    async fn update_bits(
        &self,
        sparse: &Sparse,
        block: u64,
        entry: u32,
        first: u64,
        n: u64,
        value: bool,
    ) -> io::Result<()> {
        let slot = self.bitmap(sparse, block, entry).await?;
        let updated = {
            let guard = slot.lock();
            let Some(bits) = guard.as_ref() else {
                return Err(errno(libc::EIO));
            };
            if (first..first + n).all(|i| bits.get(i) == value) {
                return Ok(());
            }
            let mut updated = bits.clone();
            updated.set_range(first, n, value);
            updated
        };
        let full = updated.all_set(sparse.sectors_per_block);
        if !value {
            // The batmap must never claim a block full whose bitmap is not.
            self.set_full(sparse, block, false).await?;
        }
        self.engine
            .write_at(
                Arc::new(IoBuf::copy_from(updated.as_bytes())),
                u64::from(entry) * SECTOR_SIZE,
            )
            .await?;
        self.counters.bitmap_writes.fetch_add(1, Ordering::Relaxed);
        *slot.lock() = Some(updated);
        if full {
            self.set_full(sparse, block, true).await?;
        }
        Ok(())
    }

    /// Writes `buf` at sectors `[first, first + n)` of `block`.
    async fn write_in_block(
        &self,
        sparse: &Sparse,
        block: u64,
        first: u64,
        buf: Arc<IoBuf>,
    ) -> io::Result<()> {
        let n = buf.len() as u64 / SECTOR_SIZE;
        loop {
            let (entry, full) = {
                let state = sparse.lock();
                (
                    Sparse::entry(&state, block),
                    bitmap::test_bit(&state.full, block),
                )
            };
            if entry == BAT_UNUSED {
                let _block = sparse.block_lock(block).lock().await;
                if Sparse::entry(&sparse.lock(), block) != BAT_UNUSED {
                    continue; // allocated meanwhile by another request
                }
                let mut bits = SectorBitmap::zeroed(to_len(sparse.bitmap_bytes)?);
                bits.set_range(first, n, true);
                return self
                    .allocate(sparse, block, Some((first, Arc::clone(&buf))), bits)
                    .await;
            }
            self.engine
                .write_at(Arc::clone(&buf), sparse.data_offset(entry, first))
                .await?;
            if full {
                return Ok(());
            }
            let _block = sparse.block_lock(block).lock().await;
            if Sparse::entry(&sparse.lock(), block) != entry {
                continue; // discarded or moved meanwhile: write again where it lives now
            }
            return self.update_bits(sparse, block, entry, first, n, true).await;
        }
    }

    async fn write_sparse(&self, sparse: &Sparse, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let count = buf.len() as u64 / SECTOR_SIZE;
        let pieces = Self::pieces(sparse, sector, count);
        if let [(block, first, _)] = pieces.as_slice() {
            return self.write_in_block(sparse, *block, *first, buf).await;
        }
        let mut writes: Vec<IoFuture<'_, ()>> = Vec::with_capacity(pieces.len());
        for (block, first, n) in pieces {
            let at = to_len((block * sparse.sectors_per_block + first - sector) * SECTOR_SIZE)?;
            let len = to_len(n * SECTOR_SIZE)?;
            let part = Arc::new(IoBuf::copy_from(&buf.as_slice()[at..at + len]));
            writes.push(Box::pin(self.write_in_block(sparse, block, first, part)));
        }
        first_error(join_all(writes).await).map(|_| ())
    }

    /// Makes `[offset, offset + len)` of the file read as zeros: punched out when
    /// `deallocate`, else zeroed in place; where the filesystem can do neither, zeros are
    /// written.
    async fn zero_file_range(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        let fast = if deallocate {
            self.engine.punch_hole(offset, len).await
        } else {
            self.engine.zero_range(offset, len).await
        };
        match fast {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZERO_CHUNK);
                    self.engine
                        .write_at(Arc::new(IoBuf::zeroed(to_len(n)?)), offset + done)
                        .await?;
                    done += n;
                }
                Ok(())
            }
            other => other,
        }
    }

    /// Makes `[first, first + n)` of `block` read as zeros (see the module documentation).
    /// With `deallocate` and no parent, sectors become absent (whole blocks are freed);
    /// otherwise they become present zeros.
    async fn zero_in_block(
        &self,
        sparse: &Sparse,
        block: u64,
        first: u64,
        n: u64,
        deallocate: bool,
    ) -> io::Result<()> {
        let _block = sparse.block_lock(block).lock().await;
        let entry = Sparse::entry(&sparse.lock(), block);
        let whole = first == 0 && n == sparse.sectors_per_block;
        if sparse.has_parent || !deallocate {
            // Present zeros: hides a parent's data.
            if entry == BAT_UNUSED {
                // A new block lies past the old end of file: its data area is a hole.
                let mut bits = SectorBitmap::zeroed(to_len(sparse.bitmap_bytes)?);
                bits.set_range(first, n, true);
                return self.allocate(sparse, block, None, bits).await;
            }
            self.zero_file_range(
                sparse.data_offset(entry, first),
                n * SECTOR_SIZE,
                deallocate,
            )
            .await?;
            return self.update_bits(sparse, block, entry, first, n, true).await;
        }
        if entry == BAT_UNUSED {
            return Ok(());
        }
        if whole {
            // Free the block: batmap bit, then BAT entry, then give the space back.
            self.set_full(sparse, block, false).await?;
            self.write_bat_entry(sparse, block, BAT_UNUSED).await?;
            sparse.lock().bitmaps.remove(&block);
            let start = u64::from(entry) * SECTOR_SIZE;
            if let Err(e) = self
                .engine
                .punch_hole(start, sparse.bitmap_bytes + sparse.block_bytes)
                .await
            {
                tracing::debug!(path = %self.path.display(), block, "cannot punch freed block: {e}");
            }
            return Ok(());
        }
        self.zero_file_range(sparse.data_offset(entry, first), n * SECTOR_SIZE, true)
            .await?;
        self.update_bits(sparse, block, entry, first, n, false)
            .await
    }

    /// Zeroes `count` sectors at `sector` (the common part of discard and write-zeroes).
    async fn zero(&self, sector: u64, count: u64, deallocate: bool) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EPERM));
        }
        self.check_range(sector, count)?;
        match &self.sparse {
            None => {
                self.zero_file_range(
                    Self::byte_offset(sector)?,
                    Self::byte_offset(count)?,
                    deallocate,
                )
                .await
            }
            Some(sparse) => {
                for (block, first, n) in Self::pieces(sparse, sector, count) {
                    self.zero_in_block(sparse, block, first, n, deallocate)
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn block_status_sparse(
        &self,
        sparse: &Sparse,
        sector: u64,
        count: u64,
    ) -> io::Result<Vec<StatusRun>> {
        let mut runs: Vec<StatusRun> = Vec::new();
        for (block, first, n) in Self::pieces(sparse, sector, count) {
            for (_, len, offset) in self.locate(sparse, block, first, n).await? {
                let state = if offset.is_some() {
                    Allocation::Data
                } else {
                    Allocation::Absent
                };
                match runs.last_mut() {
                    Some(last) if last.state == state => last.sectors += len,
                    _ => runs.push(StatusRun {
                        sectors: len,
                        state,
                    }),
                }
            }
        }
        Ok(runs)
    }
}

impl ImageDriver for VhdDriver {
    fn disk_type(&self) -> DiskType {
        DiskType::Vhd
    }

    fn info(&self) -> DiskInfo {
        self.info
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn parent(&self) -> Option<ParentLink> {
        self.parent.clone()
    }

    fn uuid(&self) -> Option<[u8; 16]> {
        Some(self.uuid)
    }

    fn validate_parent(&self, parent: &dyn ImageDriver) -> io::Result<()> {
        self.check_parent(parent)
            .map_err(VhdDriverError::into_logged_io)
    }

    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        Box::pin(async move {
            if buf.len() as u64 % SECTOR_SIZE != 0 {
                return Err(errno(libc::EINVAL));
            }
            self.check_range(sector, buf.len() as u64 / SECTOR_SIZE)?;
            match &self.sparse {
                None => {
                    let buf = self.engine.read_at(buf, Self::byte_offset(sector)?).await?;
                    Ok(ReadOutcome {
                        buf,
                        absent: Vec::new(),
                    })
                }
                Some(sparse) => self.read_sparse(sparse, sector, buf).await,
            }
        })
    }

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(errno(libc::EPERM));
            }
            if buf.len() as u64 % SECTOR_SIZE != 0 {
                return Err(errno(libc::EINVAL));
            }
            self.check_range(sector, buf.len() as u64 / SECTOR_SIZE)?;
            match &self.sparse {
                None => self.engine.write_at(buf, Self::byte_offset(sector)?).await,
                Some(sparse) => self.write_sparse(sparse, sector, buf).await,
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.engine.sync_data()
    }

    fn discard(&self, sector: u64, count: u64) -> IoFuture<'_, ()> {
        Box::pin(self.zero(sector, count, true))
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            discard: writable,
            write_zeroes: writable,
            block_status: self.sparse.is_some(),
        }
    }

    fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.zero(sector, count, flags.may_deallocate))
    }

    fn zeroes_hide_parent(&self) -> bool {
        true
    }

    fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        Box::pin(async move {
            self.check_range(sector, count)?;
            match &self.sparse {
                None => Ok(vec![StatusRun {
                    sectors: count,
                    state: Allocation::Data,
                }]),
                Some(sparse) => self.block_status_sparse(sparse, sector, count).await,
            }
        })
    }

    fn stats(&self) -> Option<DriverStats> {
        let kind = match self.kind {
            vhd::DiskType::Fixed => "fixed",
            vhd::DiskType::Dynamic => "dynamic",
            vhd::DiskType::Differencing => "differencing",
        };
        Some(DriverStats {
            pending: self.engine.pending(),
            engine: self.engine.name(),
            detail: DriverDetail::Vhd {
                vhd: VhdStats {
                    kind,
                    allocated_blocks: self.allocated_blocks(),
                    allocations: self.counters.allocations.load(Ordering::Relaxed),
                    bitmap_writes: self.counters.bitmap_writes.load(Ordering::Relaxed),
                    bitmap_loads: self.counters.bitmap_loads.load(Ordering::Relaxed),
                    cached_bitmaps: self.sparse.as_ref().map_or(0, |s| s.lock().bitmaps.len()),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageChain;
    use vhd::create::{create_file, snapshot, CreateOptions, SnapshotOptions};

    const MIB: u64 = 1 << 20;
    /// Sectors per 2 MiB block.
    const SPB: u64 = 4096;

    fn rw() -> OpenOptions {
        OpenOptions::default()
    }

    fn ro() -> OpenOptions {
        OpenOptions {
            read_only: true,
            shareable: true,
            ..OpenOptions::default()
        }
    }

    fn dynamic(dir: &Path, name: &str, size: u64) -> PathBuf {
        let path = dir.join(name);
        create_file(&path, &CreateOptions::dynamic(size)).unwrap();
        path
    }

    fn child_of(dir: &Path, name: &str, parent: &Path) -> PathBuf {
        let path = dir.join(name);
        snapshot(&path, parent, &SnapshotOptions::default()).unwrap();
        path
    }

    /// `sectors` sectors where every byte of sector i is `(i + seed) as u8` (never zero).
    fn pattern(first: u64, sectors: u64, seed: u8) -> IoBuf {
        let mut buf = IoBuf::zeroed(to_len(sectors * SECTOR_SIZE).unwrap());
        for (i, chunk) in buf.as_mut_slice().chunks_mut(512).enumerate() {
            let v = ((first + i as u64) % 251) as u8;
            chunk.fill(v.wrapping_add(seed) | 1);
        }
        buf
    }

    async fn read(driver: &VhdDriver, sector: u64, sectors: u64) -> ReadOutcome {
        driver
            .read(
                sector,
                IoBuf::zeroed(to_len(sectors * SECTOR_SIZE).unwrap()),
            )
            .await
            .unwrap()
    }

    fn check_valid(path: &Path) {
        let opts = vhd::check::CheckOptions {
            check_bitmaps: true,
            ..vhd::check::CheckOptions::default()
        };
        if let Err(e) = vhd::check::check_path(path, &opts) {
            panic!("{} fails check: {e}", path.display());
        }
    }

    /// Reads the whole virtual disk through the `vhd` crate's own chain reader.
    fn library_read(path: &Path, sector: u64, sectors: u64) -> Vec<u8> {
        let chain = vhd::Chain::open(path, false).unwrap();
        let mut buf = vec![0u8; to_len(sectors * SECTOR_SIZE).unwrap()];
        chain.read(sector, &mut buf).unwrap();
        buf
    }

    #[tokio::test]
    async fn dynamic_image_reads_writes_and_reports_absent_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dynamic(dir.path(), "d.vhd", 16 * MIB);
        let driver = VhdDriver::open(&path, rw()).unwrap();
        assert_eq!(driver.info().sectors, 16 * MIB / 512);
        assert_eq!(driver.info().sector_size, 512);
        assert_eq!(driver.vhd_type(), vhd::DiskType::Dynamic);
        assert!(driver.parent().is_none());
        let out = read(&driver, 0, 16).await;
        assert_eq!(out.absent, vec![0..16]);

        // Within one block, across a block boundary, and a whole block.
        driver.write(8, Arc::new(pattern(8, 8, 1))).await.unwrap();
        driver
            .write(SPB - 4, Arc::new(pattern(SPB - 4, 8, 2)))
            .await
            .unwrap();
        driver
            .write(2 * SPB, Arc::new(pattern(2 * SPB, SPB, 3)))
            .await
            .unwrap();
        assert_eq!(driver.allocated_blocks(), 3);
        let out = read(&driver, 0, 24).await;
        assert_eq!(out.absent, vec![0..8, 16..24]);
        assert_eq!(&out.buf.as_slice()[4096..8192], pattern(8, 8, 1).as_slice());
        let out = read(&driver, SPB - 8, 16).await;
        assert_eq!(out.absent, vec![0..4, 12..16]);
        assert_eq!(
            &out.buf.as_slice()[2048..6144],
            pattern(SPB - 4, 8, 2).as_slice()
        );
        let out = read(&driver, 2 * SPB, SPB).await;
        assert!(out.absent.is_empty());
        assert_eq!(out.buf.as_slice(), pattern(2 * SPB, SPB, 3).as_slice());
        let status = driver.block_status(0, 3 * SPB).await.unwrap();
        let expect = [
            (8, Allocation::Absent),
            (8, Allocation::Data),
            (SPB - 4 - 16, Allocation::Absent),
            (8, Allocation::Data),
            (SPB - 4, Allocation::Absent),
            (SPB, Allocation::Data),
        ];
        let expect: Vec<StatusRun> = expect
            .iter()
            .map(|(sectors, state)| StatusRun {
                sectors: *sectors,
                state: *state,
            })
            .collect();
        assert_eq!(status, expect);
        driver.flush().await.unwrap();
        drop(driver);

        // What the library reads and checks agrees.
        check_valid(&path);
        let image = vhd::VhdImage::open(
            File::open(&path).unwrap(),
            "d.vhd",
            vhd::OpenOptions::read_only(),
        )
        .unwrap();
        assert!(image.batmap().unwrap().is_full(2));
        assert!(!image.batmap().unwrap().is_full(0));
        assert_eq!(
            library_read(&path, 8, 8),
            pattern(8, 8, 1).as_slice().to_vec()
        );
        assert_eq!(library_read(&path, 0, 8), vec![0u8; 4096]);
        // Reopened, the batmap shortcut serves the full block.
        let driver = VhdDriver::open(&path, ro()).unwrap();
        let out = read(&driver, 2 * SPB + 5, 3).await;
        assert!(out.absent.is_empty());
        assert_eq!(out.buf.as_slice(), pattern(2 * SPB + 5, 3, 3).as_slice());
        assert_eq!(driver.counters.bitmap_loads.load(Ordering::Relaxed), 0);
        let err = driver
            .write(0, Arc::new(IoBuf::zeroed(512)))
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[tokio::test]
    async fn rewrites_set_bits_and_fill_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dynamic(dir.path(), "d.vhd", 8 * MIB);
        let driver = VhdDriver::open(&path, rw()).unwrap();
        // Fill block 1 piecewise: it becomes full and the batmap says so.
        for i in 0..8 {
            let first = SPB + i * 512;
            driver
                .write(first, Arc::new(pattern(first, 512, 4)))
                .await
                .unwrap();
        }
        assert_eq!(driver.allocated_blocks(), 1);
        drop(driver);
        check_valid(&path);
        let image = vhd::VhdImage::open(
            File::open(&path).unwrap(),
            "d.vhd",
            vhd::OpenOptions::read_only(),
        )
        .unwrap();
        assert!(image.batmap().unwrap().is_full(1));
        assert_eq!(
            library_read(&path, SPB, SPB),
            pattern(SPB, SPB, 4).as_slice().to_vec()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_allocate_a_block_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dynamic(dir.path(), "d.vhd", 8 * MIB);
        let driver = Arc::new(VhdDriver::open(&path, rw()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let driver = Arc::clone(&driver);
            // Two blocks, 64 distinct 8-sector extents, all racing.
            let first = (i % 2) * SPB + (i / 2) * 8;
            tasks.push(tokio::spawn(async move {
                driver
                    .write(first, Arc::new(pattern(first, 8, 5)))
                    .await
                    .unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(driver.allocated_blocks(), 2);
        assert_eq!(driver.counters.allocations.load(Ordering::Relaxed), 2);
        for i in 0..64u64 {
            let first = (i % 2) * SPB + (i / 2) * 8;
            let out = read(&driver, first, 8).await;
            assert!(out.absent.is_empty(), "extent {i}");
            assert_eq!(out.buf.as_slice(), pattern(first, 8, 5).as_slice());
        }
        drop(driver);
        check_valid(&path);
        let mut expected = Vec::new();
        for i in 0..32u64 {
            expected.extend_from_slice(pattern(i * 8, 8, 5).as_slice());
        }
        assert_eq!(library_read(&path, 0, 256), expected);
    }

    #[tokio::test]
    async fn differencing_chain_forwards_absent_sectors_to_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let base = dynamic(dir.path(), "base.vhd", 8 * MIB);
        {
            let driver = VhdDriver::open(&base, rw()).unwrap();
            driver.write(0, Arc::new(pattern(0, 64, 6))).await.unwrap();
        }
        let child = child_of(dir.path(), "child.vhd", &base);
        let driver = VhdDriver::open(&child, rw()).unwrap();
        let link = driver.parent().unwrap();
        assert_eq!(link.disk_type, DiskType::Vhd);
        let canonical = std::fs::canonicalize(&base).unwrap();
        assert_eq!(link.locator, ImageLocator::File(canonical));
        driver.write(16, Arc::new(pattern(16, 8, 7))).await.unwrap();
        drop(driver);

        let chain = ImageChain::open(&format!("vhd:{}", child.display()), rw()).unwrap();
        assert_eq!(chain.images().len(), 2);
        let buf = chain.read(0, IoBuf::zeroed(64 * 512)).await.unwrap();
        let mut expected = pattern(0, 64, 6).as_slice().to_vec();
        expected[16 * 512..24 * 512].copy_from_slice(pattern(16, 8, 7).as_slice());
        assert_eq!(buf.as_slice(), expected.as_slice());
        let status = chain.block_status(0, 2 * SPB).await.unwrap();
        assert_eq!(
            status,
            vec![
                StatusRun {
                    sectors: 64,
                    state: Allocation::Data
                },
                StatusRun {
                    sectors: 2 * SPB - 64,
                    state: Allocation::Zero
                }
            ]
        );
        drop(chain);
        check_valid(&child);
        assert_eq!(library_read(&child, 0, 64), expected);
    }

    #[tokio::test]
    async fn raw_parent_is_opened_with_aio() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![0x5au8; to_len(4 * MIB).unwrap()]).unwrap();
        let child = dir.path().join("child.vhd");
        let opts = SnapshotOptions {
            parent_raw: true,
            ..SnapshotOptions::default()
        };
        snapshot(&child, &raw, &opts).unwrap();
        let driver = VhdDriver::open(&child, rw()).unwrap();
        assert_eq!(driver.parent().unwrap().disk_type, DiskType::Aio);
        drop(driver);
        let chain = ImageChain::open(&format!("vhd:{}", child.display()), rw()).unwrap();
        chain
            .write(1, Arc::new(IoBuf::copy_from(&[1u8; 512])))
            .await
            .unwrap();
        let buf = chain.read(0, IoBuf::zeroed(1536)).await.unwrap();
        assert!(buf.as_slice()[..512].iter().all(|b| *b == 0x5a));
        assert!(buf.as_slice()[512..1024].iter().all(|b| *b == 1));
        assert!(buf.as_slice()[1024..].iter().all(|b| *b == 0x5a));
    }

    #[tokio::test]
    async fn parent_uuid_mismatch_and_missing_parent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dynamic(dir.path(), "base.vhd", 4 * MIB);
        let other = dynamic(dir.path(), "other.vhd", 4 * MIB);
        let child = child_of(dir.path(), "child.vhd", &base);
        let driver = VhdDriver::open(&child, rw()).unwrap();
        let wrong = VhdDriver::open(&other, ro()).unwrap();
        let err = driver.check_parent(&wrong).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("other.vhd") && text.contains("child.vhd"),
            "{text}"
        );
        assert_eq!(err.errno(), libc::EINVAL);
        let right = VhdDriver::open(&base, ro()).unwrap();
        driver.check_parent(&right).unwrap();
        drop((driver, wrong, right));

        std::fs::remove_file(&base).unwrap();
        let err = VhdDriver::open(&child, rw()).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        let text = err.to_string();
        assert!(text.contains("base.vhd"), "{text}");
        assert!(text.contains("child.vhd"), "{text}");
        let err = ImageChain::open(&format!("vhd:{}", child.display()), rw()).unwrap_err();
        assert_eq!(crate::error::errno_of(&err), libc::ENOENT);
        assert!(crate::error::message_of(&err).contains("base.vhd"));
    }

    #[tokio::test]
    async fn corrupt_images_are_refused_with_the_problem_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dynamic(dir.path(), "good.vhd", 4 * MIB);
        let bytes = std::fs::read(&good).unwrap();
        let len = bytes.len();
        let corrupt = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
            let mut copy = bytes.clone();
            edit(&mut copy);
            let path = dir.path().join(name);
            std::fs::write(&path, copy).unwrap();
            path
        };
        // Primary footer checksum (the backup would be used for reading only).
        let path = corrupt("footer.vhd", &|b| b[len - 512 + 64] ^= 0xff);
        let err = VhdDriver::open(&path, rw()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
        // Dynamic header cookie.
        let path = corrupt("header.vhd", &|b| b[512] = b'X');
        let err = VhdDriver::open(&path, ro()).unwrap_err();
        assert!(err.to_string().contains("cookie"), "{err}");
        // Truncated file.
        let path = corrupt("short.vhd", &|b| b.truncate(100));
        let err = VhdDriver::open(&path, ro()).unwrap_err();
        assert!(err.to_string().contains("short.vhd"), "{err}");
        // Batmap overwritten (what qemu does when it puts a block there): refused for writing,
        // still readable.
        let image = vhd::VhdImage::open(
            File::open(&good).unwrap(),
            "good",
            vhd::OpenOptions::read_only(),
        )
        .unwrap();
        let batmap_at = to_len(image.batmap_header_offset().unwrap()).unwrap();
        let path = corrupt("batmap.vhd", &|b| b[batmap_at..batmap_at + 8].fill(0xee));
        let err = VhdDriver::open(&path, rw()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("batmap") && text.contains("refusing"),
            "{text}"
        );
        VhdDriver::open(&path, ro()).unwrap();
    }

    #[tokio::test]
    async fn fixed_images_are_read_and_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.vhd");
        create_file(&path, &CreateOptions::fixed(4 * MIB)).unwrap();
        let driver = VhdDriver::open(&path, rw()).unwrap();
        assert_eq!(driver.vhd_type(), vhd::DiskType::Fixed);
        assert_eq!(driver.info().sectors, 8192);
        driver.write(10, Arc::new(pattern(10, 4, 8))).await.unwrap();
        let out = read(&driver, 10, 4).await;
        assert!(out.absent.is_empty());
        assert_eq!(out.buf.as_slice(), pattern(10, 4, 8).as_slice());
        driver.discard(11, 2).await.unwrap();
        let out = read(&driver, 10, 4).await;
        assert_eq!(&out.buf.as_slice()[..512], pattern(10, 1, 8).as_slice());
        assert!(out.buf.as_slice()[512..1536].iter().all(|b| *b == 0));
        let err = driver
            .write(8192, Arc::new(IoBuf::zeroed(512)))
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        drop(driver);
        check_valid(&path);
    }

    #[tokio::test]
    async fn discard_frees_blocks_of_an_image_without_parent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dynamic(dir.path(), "d.vhd", 8 * MIB);
        let driver = VhdDriver::open(&path, rw()).unwrap();
        driver
            .write(0, Arc::new(pattern(0, 2 * SPB, 9)))
            .await
            .unwrap();
        assert_eq!(driver.allocated_blocks(), 2);
        // Whole block 0: freed. Part of block 1: zeroed and absent.
        driver.discard(0, SPB + 8).await.unwrap();
        assert_eq!(driver.allocated_blocks(), 1);
        let out = read(&driver, 0, SPB + 16).await;
        assert_eq!(out.absent, vec![0..SPB + 8]);
        assert_eq!(
            &out.buf.as_slice()[to_len((SPB + 8) * 512).unwrap()..],
            pattern(SPB + 8, 8, 9).as_slice()
        );
        // The freed block can be written again.
        driver.write(4, Arc::new(pattern(4, 4, 10))).await.unwrap();
        drop(driver);
        check_valid(&path);
        let mut expected = vec![0u8; to_len(2 * SPB * 512).unwrap()];
        expected[2048..4096].copy_from_slice(pattern(4, 4, 10).as_slice());
        let tail = to_len((SPB + 8) * 512).unwrap();
        expected[tail..].copy_from_slice(pattern(SPB + 8, SPB - 8, 9).as_slice());
        assert_eq!(library_read(&path, 0, 2 * SPB), expected);
        let image = vhd::VhdImage::open(
            File::open(&path).unwrap(),
            "d.vhd",
            vhd::OpenOptions::read_only(),
        )
        .unwrap();
        assert!(!image.batmap().unwrap().is_full(1));
    }

    #[tokio::test]
    async fn discard_in_a_differencing_image_hides_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let base = dynamic(dir.path(), "base.vhd", 8 * MIB);
        {
            let driver = VhdDriver::open(&base, rw()).unwrap();
            driver
                .write(0, Arc::new(pattern(0, 2 * SPB, 11)))
                .await
                .unwrap();
        }
        let child = child_of(dir.path(), "child.vhd", &base);
        let chain = ImageChain::open(&format!("vhd:{}", child.display()), rw()).unwrap();
        // Block 0 unallocated in the child: discarded whole. Block 1: written, then partly
        // discarded.
        chain
            .write(SPB, Arc::new(pattern(SPB, 16, 12)))
            .await
            .unwrap();
        chain.discard(0, SPB).await.unwrap();
        chain.discard(SPB + 4, 8).await.unwrap();
        chain.discard(SPB + 100, 8).await.unwrap();
        let buf = chain
            .read(0, IoBuf::zeroed(to_len(2 * SPB * 512).unwrap()))
            .await
            .unwrap();
        let mut expected = pattern(0, 2 * SPB, 11).as_slice().to_vec();
        let at = |s: u64| to_len(s * 512).unwrap();
        expected[..at(SPB)].fill(0);
        expected[at(SPB)..at(SPB + 16)].copy_from_slice(pattern(SPB, 16, 12).as_slice());
        expected[at(SPB + 4)..at(SPB + 12)].fill(0);
        expected[at(SPB + 100)..at(SPB + 108)].fill(0);
        assert_eq!(buf.as_slice(), expected.as_slice());
        drop(chain);
        check_valid(&child);
        assert_eq!(library_read(&child, 0, 2 * SPB), expected);
    }

    #[tokio::test]
    async fn write_zeroes_without_deallocation_keeps_sectors_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dynamic(dir.path(), "d.vhd", 8 * MIB);
        let driver = VhdDriver::open(&path, rw()).unwrap();
        assert_eq!(
            driver.capabilities(),
            Capabilities {
                discard: true,
                write_zeroes: true,
                block_status: true
            }
        );
        driver.write(0, Arc::new(pattern(0, 64, 13))).await.unwrap();
        let keep = ZeroFlags {
            may_deallocate: false,
        };
        driver.write_zeroes(8, 8, keep).await.unwrap();
        driver.write_zeroes(SPB, 16, keep).await.unwrap();
        let out = read(&driver, 0, 16).await;
        assert!(out.absent.is_empty());
        assert!(out.buf.as_slice()[4096..].iter().all(|b| *b == 0));
        let status = driver.block_status(SPB, 32).await.unwrap();
        assert_eq!(status[0].state, Allocation::Data);
        assert_eq!(status[0].sectors, 16);
        drop(driver);
        check_valid(&path);
    }

    #[tokio::test]
    async fn allocation_past_two_tebibytes_is_efbig() {
        let dir = tempfile::tempdir().unwrap();
        let path = dynamic(dir.path(), "d.vhd", 8 * MIB);
        let driver = VhdDriver::open(&path, rw()).unwrap();
        if let Some(sparse) = &driver.sparse {
            sparse.lock().next_free = MAX_PHYSICAL_BYTES - MIB;
        }
        let err = driver
            .write(0, Arc::new(IoBuf::zeroed(512)))
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFBIG));
        assert_eq!(driver.allocated_blocks(), 0);
    }

    /// A small deterministic generator for the model test.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % below
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn random_concurrent_operations_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let base = dynamic(dir.path(), "base.vhd", 16 * MIB);
        let total = 16 * MIB / 512;
        let mut model = vec![0u8; to_len(16 * MIB).unwrap()];
        let mut rng = Lcg(42);
        {
            let driver = VhdDriver::open(&base, rw()).unwrap();
            for round in 0..20u8 {
                let first = rng.next(total - 64);
                let n = 1 + rng.next(64);
                let buf = pattern(first, n, round);
                let at = to_len(first * 512).unwrap();
                model[at..at + buf.len()].copy_from_slice(buf.as_slice());
                driver.write(first, Arc::new(buf)).await.unwrap();
            }
        }
        let child = child_of(dir.path(), "child.vhd", &base);
        let chain = Arc::new(ImageChain::open(&format!("vhd:{}", child.display()), rw()).unwrap());
        for batch in 0..8u8 {
            // A batch of non-overlapping operations in flight together.
            let mut used: Vec<(u64, u64)> = Vec::new();
            let mut tasks = Vec::new();
            for op in 0..16u8 {
                let first = rng.next(total - 300);
                let n = 1 + rng.next(300);
                if used.iter().any(|(s, m)| first < s + m && *s < first + n) {
                    continue;
                }
                used.push((first, n));
                let at = to_len(first * 512).unwrap();
                let len = to_len(n * 512).unwrap();
                let chain = Arc::clone(&chain);
                if rng.next(4) == 0 {
                    model[at..at + len].fill(0);
                    tasks.push(tokio::spawn(async move { chain.discard(first, n).await }));
                } else {
                    let buf = pattern(first, n, batch.wrapping_mul(16).wrapping_add(op));
                    model[at..at + len].copy_from_slice(buf.as_slice());
                    tasks.push(tokio::spawn(async move {
                        chain.write(first, Arc::new(buf)).await
                    }));
                }
            }
            for task in tasks {
                task.await.unwrap().unwrap();
            }
            let buf = chain.read(0, IoBuf::zeroed(model.len())).await.unwrap();
            assert!(buf.as_slice() == model.as_slice(), "batch {batch} differs");
        }
        drop(chain);
        check_valid(&child);
        assert!(library_read(&child, 0, total) == model);
    }
}
