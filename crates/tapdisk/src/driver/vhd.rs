//! The `vhd` driver: fixed, dynamic and differencing VHD images (tapdisk's `block-vhd.c`).
//!
//! The format logic lives in the `vhd` crate's core ([`vhd::metadata::Metadata`]): this
//! driver is its asynchronous executor. At open the image's metadata is read and validated
//! through [`vhd::VhdImage`] (footer, dynamic header, BAT, tapdisk batmap, parent locators; a
//! BAT entry pointing anywhere but the data area refuses the image with `EINVAL`), then kept
//! in memory as the core's model, behind a short-held lock never held across I/O. All file
//! I/O goes through an [`IoEngine`] on aligned buffers, with `O_DIRECT` unless asked not to
//! (and the same buffered fallback as `aio` where the filesystem refuses it).
//!
//! * **Reads** ask the core to map the range (loading and caching the block bitmaps it asks
//!   for, up to [`vhd::metadata::BITMAP_CACHE_CAPACITY`]), read the present runs and report
//!   the absent ones to the image chain (which reads them from the parent, or zeros).
//! * **Writes, discards and write-zeroes** are split into per-block pieces; for each the core
//!   hands out a plan ([`vhd::plan`]) that this driver executes stage by stage. The order of
//!   the stages is the crash-ordering contract: a new block's footer move (regular files),
//!   its data and bitmap, the BAT sector that makes it part of the image, the batmap. A
//!   request is acknowledged only after its plans completed and a flush is `fdatasync`, so a
//!   crash (even `kill -9`) leaves a valid image in which every write acknowledged before a
//!   completed flush is present and no unwritten or foreign data is exposed.
//! * **Locks** are the executor's: a striped per-block lock for allocation, zeroing and bitmap
//!   updates (two writes into one unallocated block allocate it once: the second waits and
//!   then finds it allocated), one lock serialising BAT sector writes and one for batmap
//!   writes; the core renders those writes from the current in-memory state when they run, so
//!   out-of-order completion never loses a bit.
//! * **Discard** (the C stack has none) frees whole blocks of an image without parent and makes
//!   a range of a differencing image read as present zeros, so a parent's data never shows.
//! * **Block devices** (VHD written straight onto an LVM volume): the footer stays at the
//!   device's end and new blocks go after the data, before it; a block that does not fit is
//!   `ENOSPC` (the volume must be grown first). Nothing may end past 2 TiB (`EFBIG`).

use std::fmt;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhd::create::format_uuid;
use vhd::metadata::Metadata;
use vhd::plan::{
    BitmapLoad, DataWrite, Extent, Io, LoadedBitmap, Mapping, Op, Piece, Plan, Planned, Prepare,
    Step, Table, ZeroRange,
};

use super::{
    errno, push_status, run_all, to_len, Allocation, Capabilities, DiskInfo, DiskType,
    DriverDetail, DriverStats, ImageDriver, ImageLocator, OpenOptions, ParentLink, ReadOutcome,
    StatusRun, ZeroFlags, SECTOR_SIZE,
};
use crate::engine::{open_engine, IoEngine, IoFuture};
use crate::iobuf::IoBuf;

/// Stripes of the per-block lock.
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

/// Identity of a file at open time, to tell whether a shared parent is still the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// The executor's locks (see the module documentation).
#[derive(Debug)]
struct Locks {
    bat: tokio::sync::Mutex<()>,
    batmap: tokio::sync::Mutex<()>,
    blocks: Vec<tokio::sync::Mutex<()>>,
}

impl Locks {
    fn new() -> Self {
        Self {
            bat: tokio::sync::Mutex::new(()),
            batmap: tokio::sync::Mutex::new(()),
            blocks: (0..BLOCK_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn block(&self, block: u64) -> &tokio::sync::Mutex<()> {
        let index = usize::try_from(block % BLOCK_LOCK_STRIPES as u64).unwrap_or(0);
        &self.blocks[index]
    }

    fn table(&self, table: Table) -> &tokio::sync::Mutex<()> {
        match table {
            Table::Bat => &self.bat,
            Table::Batmap => &self.batmap,
        }
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
    keyhash: Option<vhd::batmap::KeyHash>,
    stamp: FileStamp,
    meta: Mutex<Metadata>,
    locks: Locks,
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
        let (_, meta) = image.into_parts();

        let (file, direct) =
            super::open_for_io(path, &options).map_err(io_error("cannot open for I/O"))?;
        let engine = open_engine(Arc::new(file), !direct, options.io.engine);
        let mut driver = Self::assemble(path, meta, engine, read_only);
        driver.direct = direct;
        driver.parent = parent;
        driver.stamp = stamp;
        Ok(driver)
    }

    /// Serves an image whose metadata was read through `image` with `engine` doing the I/O
    /// (an in-memory engine in tests and fuzzing). No parent is looked for: absent sectors of
    /// a differencing image read as zeros unless the caller stacks a parent.
    pub fn from_image<F: vhd::BlockFile>(
        path: &Path,
        image: vhd::VhdImage<F>,
        engine: Box<dyn IoEngine>,
        read_only: bool,
    ) -> Self {
        Self::assemble(path, image.into_parts().1, engine, read_only)
    }

    fn assemble(path: &Path, meta: Metadata, engine: Box<dyn IoEngine>, read_only: bool) -> Self {
        let footer = meta.footer();
        Self {
            path: path.to_path_buf(),
            info: DiskInfo::new(footer.current_size, 512, read_only),
            engine,
            read_only,
            direct: false,
            kind: meta.disk_type(),
            uuid: footer.uuid,
            parent: None,
            parent_uuid: meta.header().map_or([0; 16], |h| h.parent_uuid),
            keyhash: meta
                .batmap()
                .map(|b| b.header.keyhash)
                .filter(|k| k.cookie != 0),
            stamp: FileStamp::default(),
            meta: Mutex::new(meta),
            locks: Locks::new(),
            counters: VhdCounters::default(),
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
        self.meta().allocated_blocks()
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

    fn meta(&self) -> MutexGuard<'_, Metadata> {
        self.meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs an error of the core (it names the image, block and offsets) and returns its
    /// errno.
    fn core_error(&self, error: &vhd::VhdError) -> io::Error {
        tracing::error!(path = %self.path.display(), "{error}");
        errno(error.errno())
    }

    /// Reads the bitmap the core asked for.
    async fn load_bitmap(&self, load: BitmapLoad) -> io::Result<LoadedBitmap> {
        let buf = self
            .engine
            .read_at(IoBuf::zeroed(load.len), load.offset)
            .await?;
        self.counters.bitmap_loads.fetch_add(1, Ordering::Relaxed);
        Ok(LoadedBitmap::new(load, buf.as_slice().to_vec()))
    }

    /// Where `count` sectors at `sector` are: present runs with their file offsets, or absent.
    async fn map(&self, sector: u64, count: u64) -> io::Result<Vec<Extent>> {
        let mut loaded: Vec<LoadedBitmap> = Vec::new();
        loop {
            let answer = self
                .meta()
                .map(sector, count, &loaded)
                .map_err(|e| self.core_error(&e))?;
            let loads = match answer {
                Mapping::Done(runs) => return Ok(runs),
                Mapping::NeedBitmaps(loads) => loads,
            };
            let reads: Vec<IoFuture<'_, LoadedBitmap>> = loads
                .into_iter()
                .map(|load| -> IoFuture<'_, LoadedBitmap> { Box::pin(self.load_bitmap(load)) })
                .collect();
            for bitmap in run_all(reads).await? {
                self.meta().remember(&bitmap);
                loaded.push(bitmap);
            }
        }
    }

    async fn read_mapped(&self, sector: u64, mut buf: IoBuf) -> io::Result<ReadOutcome> {
        let count = buf.len() as u64 / SECTOR_SIZE;
        let runs = self.map(sector, count).await?;
        if let [Extent::Present {
            count: n,
            file_offset,
            ..
        }] = runs.as_slice()
        {
            if *n == count {
                let buf = self.engine.read_at(buf, *file_offset).await?;
                return Ok(ReadOutcome {
                    buf,
                    absent: Vec::new(),
                });
            }
        }
        let mut absent: Vec<Range<u64>> = Vec::new();
        let mut reads = Vec::new();
        let mut targets = Vec::new();
        for run in runs {
            let rel = run.sector() - sector;
            match run {
                Extent::Absent { count, .. } => absent.push(rel..rel + count),
                Extent::Present {
                    count, file_offset, ..
                } => {
                    let part = IoBuf::zeroed(to_len(count * SECTOR_SIZE)?);
                    reads.push(self.engine.read_at(part, file_offset));
                    targets.push(to_len(rel * SECTOR_SIZE)?);
                }
            }
        }
        let parts = run_all(reads).await?;
        for (part, at) in parts.into_iter().zip(targets) {
            buf.as_mut_slice()[at..at + part.len()].copy_from_slice(part.as_slice());
        }
        Ok(ReadOutcome { buf, absent })
    }

    /// Applies `op` to `count` sectors at `sector` (`data`: the bytes of a write), one plan per
    /// block, the blocks concurrently.
    async fn apply(
        &self,
        op: Op,
        sector: u64,
        count: u64,
        data: Option<Arc<IoBuf>>,
    ) -> io::Result<()> {
        let pieces = self.meta().pieces(sector, count);
        let runs: Vec<IoFuture<'_, ()>> = pieces
            .into_iter()
            .map(|piece| -> IoFuture<'_, ()> { Box::pin(self.run(op, piece, data.as_ref())) })
            .collect();
        run_all(runs).await.map(|_| ())
    }

    /// Plans and executes `op` on `piece` until it completes.
    async fn run(&self, op: Op, piece: Piece, data: Option<&Arc<IoBuf>>) -> io::Result<()> {
        loop {
            let planned = self
                .meta()
                .plan(op, &piece)
                .map_err(|e| self.core_error(&e))?;
            let (plan, guard) = match planned {
                Planned::Ready(plan) => (plan, None),
                Planned::NeedsLock(block) => {
                    let guard = self.locks.block(block).lock().await;
                    let plan = self
                        .meta()
                        .plan_locked(op, &piece)
                        .map_err(|e| self.core_error(&e))?;
                    (plan, Some(guard))
                }
            };
            if self.execute(&plan, data, guard.is_some()).await? {
                return Ok(());
            }
        }
    }

    /// Runs `plan` stage by stage; `false` when the operation must be planned again.
    async fn execute(
        &self,
        plan: &Plan,
        data: Option<&Arc<IoBuf>>,
        block_locked: bool,
    ) -> io::Result<bool> {
        for stage in plan.stages() {
            let steps: Vec<IoFuture<'_, bool>> = stage
                .iter()
                .map(|step| -> IoFuture<'_, bool> { Box::pin(self.step(step, data, block_locked)) })
                .collect();
            if run_all(steps).await?.contains(&false) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs one step under the locks it names; `false` when the operation must start over.
    async fn step(
        &self,
        step: &Step,
        data: Option<&Arc<IoBuf>>,
        block_locked: bool,
    ) -> io::Result<bool> {
        let serial = step.serial();
        let _block = match serial.block {
            Some(block) if !block_locked => Some(self.locks.block(block).lock().await),
            _ => None,
        };
        let _table = match serial.table {
            Some(table) => Some(self.locks.table(table).lock().await),
            None => None,
        };
        let mut loaded = None;
        let prepared = loop {
            let answer = self
                .meta()
                .prepare(step, loaded.as_ref())
                .map_err(|e| self.core_error(&e))?;
            match answer {
                Prepare::Ready(prepared) => break prepared,
                Prepare::Restart => return Ok(false),
                Prepare::NeedBitmap(load) => loaded = Some(self.load_bitmap(load).await?),
            }
        };
        self.perform(&prepared.io, data).await?;
        match (step, &prepared.io) {
            (Step::NewBitmap { .. }, _) => {
                self.counters.allocations.fetch_add(1, Ordering::Relaxed);
            }
            (Step::SetBits { .. }, Io::Write(_)) => {
                self.counters.bitmap_writes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.meta().complete(prepared);
        Ok(true)
    }

    /// Does the I/O of a prepared step.
    async fn perform(&self, io: &Io, data: Option<&Arc<IoBuf>>) -> io::Result<()> {
        match *io {
            Io::Nothing => Ok(()),
            Io::Write(ref writes) => {
                for (offset, bytes) in writes {
                    self.engine
                        .write_at(Arc::new(IoBuf::copy_from(bytes)), *offset)
                        .await?;
                }
                Ok(())
            }
            Io::Data(DataWrite { offset, at, len }) => {
                let data = data.ok_or_else(|| errno(libc::EINVAL))?;
                let part = if at == 0 && len == data.len() {
                    Arc::clone(data)
                } else {
                    let bytes = at
                        .checked_add(len)
                        .and_then(|end| data.as_slice().get(at..end))
                        .ok_or_else(|| errno(libc::EINVAL))?;
                    Arc::new(IoBuf::copy_from(bytes))
                };
                self.engine.write_at(part, offset).await
            }
            Io::Zero(ZeroRange {
                offset,
                len,
                deallocate,
            }) => self.zero_file_range(offset, len, deallocate).await,
            Io::Release { offset, len } => {
                if let Err(e) = self.engine.punch_hole(offset, len).await {
                    tracing::debug!(path = %self.path.display(), offset, "cannot punch freed block: {e}");
                }
                Ok(())
            }
        }
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

    /// Zeroes `count` sectors at `sector` (the common part of discard and write-zeroes).
    async fn zero(&self, sector: u64, count: u64, deallocate: bool) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EPERM));
        }
        self.info.check_range(sector, count)?;
        self.apply(Op::Zero { deallocate }, sector, count, None)
            .await
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

    fn keyhash(&self) -> Option<vhd::batmap::KeyHash> {
        self.keyhash
    }

    fn validate_parent(&self, parent: &dyn ImageDriver) -> io::Result<()> {
        self.check_parent(parent)
            .map_err(VhdDriverError::into_logged_io)
    }

    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        Box::pin(async move {
            self.info.request_sectors(sector, buf.len())?;
            self.read_mapped(sector, buf).await
        })
    }

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(errno(libc::EPERM));
            }
            let count = self.info.request_sectors(sector, buf.len())?;
            self.apply(Op::Write, sector, count, Some(buf)).await
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
            block_status: self.kind.is_sparse(),
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
            self.info.check_range(sector, count)?;
            let mut runs: Vec<StatusRun> = Vec::new();
            for run in self.map(sector, count).await? {
                let state = match run {
                    Extent::Present { .. } => Allocation::Data,
                    Extent::Absent { .. } => Allocation::Absent,
                };
                push_status(
                    &mut runs,
                    StatusRun {
                        sectors: run.count(),
                        state,
                    },
                );
            }
            Ok(runs)
        })
    }

    fn stats(&self) -> Option<DriverStats> {
        let kind = match self.kind {
            vhd::DiskType::Fixed => "fixed",
            vhd::DiskType::Dynamic => "dynamic",
            vhd::DiskType::Differencing => "differencing",
        };
        let (allocated_blocks, cached_bitmaps) = {
            let meta = self.meta();
            (meta.allocated_blocks(), meta.cached_bitmaps())
        };
        Some(DriverStats::of_engine(
            &*self.engine,
            DriverDetail::Vhd {
                vhd: VhdStats {
                    kind,
                    allocated_blocks,
                    allocations: self.counters.allocations.load(Ordering::Relaxed),
                    bitmap_writes: self.counters.bitmap_writes.load(Ordering::Relaxed),
                    bitmap_loads: self.counters.bitmap_loads.load(Ordering::Relaxed),
                    cached_bitmaps,
                },
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageChain;
    use std::fs::File;
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
        // A bad primary footer: the backup copy at offset 0 is used, for writing too, as
        // the C tapdisk does (LVHD relies on it after growing a volume).
        let path = corrupt("footer.vhd", &|b| b[len - 512 + 64] ^= 0xff);
        VhdDriver::open(&path, rw()).unwrap();
        // Both copies bad: refused, naming the primary footer's problem.
        let path = corrupt("footers.vhd", &|b| {
            b[len - 512 + 64] ^= 0xff;
            b[64] ^= 0xff;
        });
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
        // The footer 1 MiB short of 2 TiB (a sparse file): the next block would end past it.
        let modify = vhd::ops::ModifyOptions {
            physical_size: Some(vhd::image::MAX_PHYSICAL_BYTES - MIB),
            ..vhd::ops::ModifyOptions::default()
        };
        vhd::ops::modify(&vhd::io::StdOpener, &path, &modify).unwrap();
        let driver = VhdDriver::open(&path, rw()).unwrap();
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
