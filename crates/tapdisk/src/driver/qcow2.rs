//! The `qcow2` driver (XCP-ng's type 6): qcow2 images, versions 2 and 3, executing the `qcow2`
//! crate's plans through an [`IoEngine`].
//!
//! The header, the L1 table and the refcount table are read at open ([`qcow2::Header`] refuses
//! what is not implemented by name: encryption, external data files, unknown incompatible
//! features; writable opens also refuse images marked corrupt or holding internal snapshots,
//! and rebuild the refcounts of an image whose dirty bit is set before anything else is
//! written, as qemu does; read-only opens read such images as they are). L2 tables are loaded on first use and cached (up to 64 MiB), so a request to an
//! allocated cluster costs no metadata read; refcount blocks are only read when clusters are
//! reserved or freed. A read inside one cluster that holds its data, whose L2 table is cached
//! (the common case), is one lookup and then the engine's read, as on a raw image; every
//! other read is mapped into runs first.
//!
//! # Chains
//! The backing file named in the header (relative to the image's directory) is the image's
//! parent: `qcow2` or `raw` (the backing format extension, else the file's magic). The image
//! chain reads absent ranges from it, and gives the driver a [`Below`] handle through which a
//! partial write into an unallocated cluster copies the rest of the cluster from below.
//!
//! # Writes and crash safety
//! Writes into allocated clusters go straight to their place. Others follow the order the
//! planner documents ([`::qcow2::meta`]): clusters come from a pool whose refcounts were written
//! ahead (refcount blocks, then the refcount table or a new table and then the header); the
//! data (with its copy-on-write fill) is written; then the L2 entry; then a replaced cluster
//! is dereferenced. A missing L2 table is written (zeroed) before the L1 entry that points to
//! it. Each step is awaited before the next starts, so `kill -9` at any moment leaves at most
//! leaked clusters, and a flush (`fdatasync`) makes every acknowledged write durable. Unused
//! reserved clusters are given back when the image is closed.
//!
//! Concurrency: one lock per guest cluster (striped) serialises allocations of a cluster; one
//! per L2 table (striped) serialises rendering, writing and publishing that table's entries and
//! loading it; one for table creation and L1 writes; one for every refcount change. A write to
//! an allocated cluster takes none of them. L2 entry updates that wait for their table's
//! lock are batched: whoever gets the lock first writes every update of the table waiting by
//! then in one write (the units holding them, [`::qcow2::meta::Metadata::render_l2`]), and
//! each waiting write is acknowledged once that write is done.
//!
//! # Zeroing and discard
//! Whole clusters are unmapped (no backing file) or given the zero flag (version 3; with a
//! backing file, so the parent's data stays hidden); partial clusters, and version 2 images
//! with a backing file, get zeros written. Freed clusters are punched out of the file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use ::qcow2::header::{incompatible, offsets, Header};
use ::qcow2::layout::Layout;
use ::qcow2::meta::{
    Allocation, Fill, L2Update, MetaWrite, Need, Plan, Release, RunKind, ZeroPlan,
};
use ::qcow2::{Metadata, Qcow2Error};

use super::{
    errno, push_status, run_all, to_len, Allocation as Status, Capabilities, DiskInfo, DiskType,
    DriverDetail, DriverStats, ImageDriver, ImageLocator, OpenOptions, ParentLink, ReadOutcome,
    StatusRun, ZeroFlags, SECTOR_SIZE,
};
use crate::engine::{open_engine, IoEngine, IoFuture};
use crate::image::Below;
use crate::iobuf::IoBuf;

/// Stripes of the per-cluster allocation lock.
const CLUSTER_LOCK_STRIPES: usize = 256;
/// Stripes of the per-L2-table lock.
const TABLE_LOCK_STRIPES: usize = 64;
/// Pieces of one large request run at once.
const BATCH: usize = 32;

/// A qcow2 image's part of `tap-ctl stats` (the driver status's `"qcow2"` object).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Qcow2Stats {
    /// 2 or 3.
    pub version: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
    /// Clusters written anew (allocated or given data) since the image was opened.
    pub allocations: u64,
    /// L2 tables read.
    pub l2_loads: u64,
    /// Writes of L2 table entries (each carries every entry update of its table that was
    /// waiting for it).
    pub l2_writes: u64,
    /// L2 tables in the cache.
    pub cached_l2_tables: usize,
    /// Chunks of clusters reserved.
    pub reservations: u64,
    /// Reserved clusters not used yet.
    pub reserved_clusters: u64,
    /// Compressed clusters decompressed.
    pub decompressions: u64,
}

/// Counters shown in stats.
#[derive(Debug, Default)]
struct Qcow2Counters {
    allocations: AtomicU64,
    l2_loads: AtomicU64,
    l2_writes: AtomicU64,
    reservations: AtomicU64,
    decompressions: AtomicU64,
}

/// How the write of a batch of L2 updates ended, and the wake-up of those waiting for it.
#[derive(Debug, Default)]
struct BatchDone {
    /// `Err((errno, message))` when the write failed; set by whoever wrote the batch.
    outcome: OnceLock<Result<(), (i32, String)>>,
    /// Woken once `outcome` is set.
    notify: tokio::sync::Notify,
}

/// L2 entry updates of one table waiting for its next write.
#[derive(Debug, Default)]
struct L2Batch {
    updates: Vec<L2Update>,
    done: Arc<BatchDone>,
}

/// An open qcow2 image.
pub struct Qcow2Driver {
    path: PathBuf,
    info: DiskInfo,
    engine: Box<dyn IoEngine>,
    /// A buffered descriptor for the rare synchronous steps: growing the file, marking the
    /// image corrupt, giving back reserved clusters at close.
    file: File,
    read_only: bool,
    direct: bool,
    header: Header,
    layout: Layout,
    parent: Option<ParentLink>,
    meta: Mutex<Metadata>,
    below: OnceLock<Below>,
    cluster_locks: Vec<tokio::sync::Mutex<()>>,
    table_locks: Vec<tokio::sync::Mutex<()>>,
    /// The open batch of L2 updates of each table (by L1 index) with updates waiting.
    pending_l2: Mutex<HashMap<u64, L2Batch>>,
    /// L2 table creation and L1 writes.
    l1_lock: tokio::sync::Mutex<()>,
    /// Every refcount change, and header rewrites.
    refcount_lock: tokio::sync::Mutex<()>,
    /// The last decompressed cluster: (host offset of its data, bytes).
    last_decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    marked_corrupt: AtomicBool,
    counters: Qcow2Counters,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("cluster_size", &self.layout.cluster_size())
            .field("info", &self.info)
            .field("direct", &self.direct)
            .field("engine", &self.engine.name())
            .field("parent", &self.parent)
            .finish_non_exhaustive()
    }
}

/// Why an image could not be opened: the file and the problem.
fn open_error(path: &Path, what: impl std::fmt::Display, code: i32) -> io::Error {
    let message = format!("{}: {what}", path.display());
    tracing::error!("{message}");
    crate::error::failure(code, message)
}

fn format_error(path: &Path, error: &Qcow2Error) -> io::Error {
    open_error(path, error, error.errno())
}

/// Where the backing file named `name` in image `path` is, and its type.
fn backing_link(path: &Path, header: &Header) -> io::Result<Option<ParentLink>> {
    let Some(name) = &header.backing_file else {
        return Ok(None);
    };
    let name = String::from_utf8(name.clone())
        .map_err(|_| open_error(path, "the backing file name is not UTF-8", libc::EINVAL))?;
    if name.starts_with("json:") || name.split_once(':').is_some_and(|(p, _)| !p.contains('/')) {
        return Err(open_error(
            path,
            format!("backing file '{name}' is not a local file (protocols are not supported)"),
            libc::EOPNOTSUPP,
        ));
    }
    let backing = Path::new(&name);
    let backing = if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new("/")).join(backing)
    };
    let disk_type = match header.backing_format() {
        Some(b"qcow2") => DiskType::Qcow2,
        Some(b"raw") | Some(b"file") | Some(b"host_device") => DiskType::Aio,
        Some(other) => {
            return Err(open_error(
                path,
                format!(
                    "backing file format '{}' is not supported (qcow2 or raw)",
                    String::from_utf8_lossy(other)
                ),
                libc::EOPNOTSUPP,
            ))
        }
        None => {
            // No format recorded: the file's magic decides, as qemu probes.
            let mut magic = [0u8; 4];
            let file = super::open_image_file(&backing, false, false).map_err(|e| {
                open_error(
                    path,
                    format!("backing file {}: {e}", backing.display()),
                    e.raw_os_error().unwrap_or(libc::EIO),
                )
            })?;
            let _ = file.read_at(&mut magic, 0);
            if u32::from_be_bytes(magic) == ::qcow2::header::MAGIC {
                DiskType::Qcow2
            } else {
                DiskType::Aio
            }
        }
    };
    Ok(Some(ParentLink {
        disk_type,
        locator: ImageLocator::File(backing),
    }))
}

impl Qcow2Driver {
    /// Opens a qcow2 image.
    pub fn open(path: &Path, options: OpenOptions) -> io::Result<Self> {
        let read_only = options.read_only;
        let io_error = |what: &str| {
            let path = path.to_path_buf();
            let what = what.to_owned();
            move |e: io::Error| {
                open_error(
                    &path,
                    format!("{what}: {e}"),
                    e.raw_os_error().unwrap_or(libc::EIO),
                )
            }
        };
        // Metadata is read through a buffered descriptor (any alignment), I/O through the
        // engine's descriptor opened below.
        let mut file =
            super::open_image_file(path, !read_only, false).map_err(io_error("cannot open"))?;
        let io_or_format_error = |what: &'static str| {
            move |e: io::Error| match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<Qcow2Error>())
            {
                Some(format) => format_error(path, format),
                None => io_error(what)(e),
            }
        };
        let mut header = ::qcow2::image::read_header(&mut file)
            .map_err(io_or_format_error("cannot read the header"))?;
        if !read_only {
            // Refuse first (nothing is changed in an image we refuse), as if it were clean.
            let mut clean = header.clone();
            clean.incompatible_features &= !incompatible::DIRTY;
            clean.check_open(true).map_err(|e| format_error(path, &e))?;
            if header.version >= 3 && header.autoclear_features != 0 {
                // Autoclear features we do not maintain (persistent bitmaps) stop being
                // valid the moment we write: clear them first, as the specification requires.
                file.write_all_at(&[0u8; 8], offsets::AUTOCLEAR_FEATURES as u64)
                    .map_err(io_error("cannot clear the autoclear features"))?;
                tracing::info!(path = %path.display(), bits = header.autoclear_features, "cleared autoclear feature bits");
            }
            if header.incompatible_features & incompatible::DIRTY != 0 {
                // Stale refcounts (lazy refcounts and a crash): rebuilt before any write.
                tracing::warn!(path = %path.display(), "dirty bit set: rebuilding the refcounts");
                header = ::qcow2::check::rebuild_refcounts(&mut file)
                    .map_err(io_or_format_error("cannot rebuild the refcounts"))?;
            }
        }
        header
            .check_open(!read_only)
            .map_err(|e| format_error(path, &e))?;
        let parent = backing_link(path, &header)?;
        let cs = header.cluster_size();
        let mut l1 = vec![0u8; to_len(u64::from(header.l1_size) * 8)?];
        ::qcow2::image::Storage::read_at(&mut file, &mut l1, header.l1_table_offset)
            .map_err(io_error("cannot read the L1 table"))?;
        let mut table = vec![0u8; to_len(u64::from(header.refcount_table_clusters) * cs)?];
        ::qcow2::image::Storage::read_at(&mut file, &mut table, header.refcount_table_offset)
            .map_err(io_error("cannot read the refcount table"))?;
        let file_len = file.metadata().map_err(io_error("cannot stat"))?.len();
        let meta =
            Metadata::open(&header, &l1, &table, file_len).map_err(|e| format_error(path, &e))?;
        let (io_file, direct) =
            super::open_for_io(path, &options).map_err(io_error("cannot open for I/O"))?;
        let layout = Layout::of(&header);
        Ok(Self {
            path: path.to_path_buf(),
            info: DiskInfo::new(header.size, 512, read_only),
            engine: open_engine(Arc::new(io_file), !direct, options.io.engine),
            file,
            read_only,
            direct,
            header,
            layout,
            parent,
            meta: Mutex::new(meta),
            below: OnceLock::new(),
            cluster_locks: (0..CLUSTER_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            table_locks: (0..TABLE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            pending_l2: Mutex::new(HashMap::new()),
            l1_lock: tokio::sync::Mutex::new(()),
            refcount_lock: tokio::sync::Mutex::new(()),
            last_decompressed: Mutex::new(None),
            marked_corrupt: AtomicBool::new(false),
            counters: Qcow2Counters::default(),
        })
    }

    /// The header as opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// True when the image is accessed with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn meta(&self) -> MutexGuard<'_, Metadata> {
        self.meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cluster_lock(&self, cluster: u64) -> &tokio::sync::Mutex<()> {
        let index = usize::try_from(cluster % CLUSTER_LOCK_STRIPES as u64).unwrap_or(0);
        &self.cluster_locks[index]
    }

    fn table_lock(&self, l1_index: u64) -> &tokio::sync::Mutex<()> {
        let index = usize::try_from(l1_index % TABLE_LOCK_STRIPES as u64).unwrap_or(0);
        &self.table_locks[index]
    }

    /// A metadata error met while serving I/O: logged, the image marked corrupt (version 3,
    /// writable), and `EIO` for the request.
    fn metadata_error(&self, error: Qcow2Error) -> io::Error {
        if matches!(error, Qcow2Error::Unsupported { .. }) {
            tracing::error!(path = %self.path.display(), "{error}");
            return crate::error::failure(
                error.errno(),
                format!("{}: {error}", self.path.display()),
            );
        }
        tracing::error!(path = %self.path.display(), "corrupt metadata: {error}");
        if !self.read_only
            && self.header.version >= 3
            && !self.marked_corrupt.swap(true, Ordering::Relaxed)
        {
            let bits = self.header.incompatible_features | incompatible::CORRUPT;
            match self
                .file
                .write_all_at(&bits.to_be_bytes(), offsets::INCOMPATIBLE_FEATURES as u64)
            {
                Ok(()) => {
                    tracing::error!(path = %self.path.display(), "image marked corrupt: no more writes until repaired")
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), "cannot mark the image corrupt: {e}")
                }
            }
        }
        crate::error::failure(libc::EIO, format!("{}: {error}", self.path.display()))
    }

    fn refuse_if_corrupt(&self) -> io::Result<()> {
        if self.marked_corrupt.load(Ordering::Relaxed) {
            return Err(crate::error::failure(
                libc::EIO,
                format!(
                    "{}: marked corrupt; repair with `qemu-img check -r all`",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Runs `plan` until it is ready, loading and preparing what it needs. `table_held` names
    /// the L2 table whose lock the caller holds (its loads then happen without taking it).
    async fn resolve<T>(
        &self,
        table_held: Option<u64>,
        mut plan: impl FnMut(&mut Metadata) -> ::qcow2::Result<Plan<T>> + Send,
    ) -> io::Result<T> {
        loop {
            let step = plan(&mut self.meta()).map_err(|e| self.metadata_error(e))?;
            match step {
                Plan::Ready(value) => return Ok(value),
                Plan::Load(need) => self.satisfy(need, table_held).await?,
            }
        }
    }

    /// Like [`Qcow2Driver::resolve`] for refcount plans, whose caller holds the refcount lock.
    async fn resolve_refcounts<T>(
        &self,
        mut plan: impl FnMut(&mut Metadata) -> ::qcow2::Result<Plan<T>> + Send,
    ) -> io::Result<T> {
        loop {
            let step = plan(&mut self.meta()).map_err(|e| self.metadata_error(e))?;
            match step {
                Plan::Ready(value) => return Ok(value),
                Plan::Load(Need::RefBlock { rt_index, offset }) => {
                    let buf = self.read_cluster(offset).await?;
                    self.meta().insert_refblock(rt_index, buf.as_slice());
                }
                Plan::Load(other) => {
                    tracing::error!(path = %self.path.display(), "refcount plan needs {other:?}");
                    return Err(errno(libc::EIO));
                }
            }
        }
    }

    /// Grows the image from `from` to `to` bytes for clusters just reserved, allocating the
    /// new range rather than leaving a hole: a full filesystem answers here, at reservation,
    /// instead of in a guest's write later, and `O_DIRECT` writes into the reserved clusters
    /// land in allocated space (on ext4, asynchronous direct writes into the hole that
    /// `ftruncate` leaves made the flush after them fail with EIO now and then). Filesystems
    /// without `fallocate` get the hole.
    fn grow_file(&self, from: u64, to: u64) -> io::Result<()> {
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::empty(),
            from,
            to - from,
        ) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.file.set_len(to),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    async fn read_cluster(&self, offset: u64) -> io::Result<IoBuf> {
        let buf = IoBuf::zeroed(to_len(self.layout.cluster_size())?);
        self.engine.read_at(buf, offset).await
    }

    fn satisfy<'a>(&'a self, need: Need, table_held: Option<u64>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            match need {
                Need::L2 { l1_index, offset } => {
                    let _table = if table_held == Some(l1_index) {
                        None
                    } else {
                        Some(self.table_lock(l1_index).lock().await)
                    };
                    let buf = self.read_cluster(offset).await?;
                    self.counters.l2_loads.fetch_add(1, Ordering::Relaxed);
                    self.meta()
                        .insert_l2(l1_index, offset, buf.as_slice())
                        .map_err(|e| self.metadata_error(e))
                }
                Need::RefBlock { .. } => {
                    // Only refcount plans load refcount blocks, under the refcount lock.
                    tracing::error!(path = %self.path.display(), "unexpected {need:?}");
                    Err(errno(libc::EIO))
                }
                Need::Reserve => self.reserve().await,
                Need::NewL2 { l1_index } => self.create_l2(l1_index).await,
            }
        })
    }

    async fn write_meta(&self, write: &MetaWrite) -> io::Result<()> {
        self.engine
            .write_at(Arc::new(IoBuf::copy_from(&write.bytes)), write.offset)
            .await
    }

    async fn write_phase(&self, writes: &[MetaWrite]) -> io::Result<()> {
        let futures: Vec<IoFuture<'_, ()>> = writes
            .iter()
            .map(|w| Box::pin(self.write_meta(w)) as IoFuture<'_, ()>)
            .collect();
        run_all(futures).await.map(|_| ())
    }

    /// Reserves clusters ahead (see [`::qcow2::meta::Metadata::plan_reserve`]).
    async fn reserve(&self) -> io::Result<()> {
        let _refcounts = self.refcount_lock.lock().await;
        if self.meta().pool_len() > 0 {
            return Ok(());
        }
        let plan = self.resolve_refcounts(|m| m.plan_reserve(1)).await?;
        let len = self.file.metadata()?.len();
        if len < plan.extend_to {
            self.grow_file(len, plan.extend_to)?;
        }
        for phase in &plan.phases {
            self.write_phase(phase).await?;
        }
        if let Some((offset, clusters)) = plan.new_table {
            // Read the header unit afresh (someone such as SM's hidden flag writer may have
            // changed other bytes of it) and change only the two fields.
            let unit = to_len(self.layout.meta_unit())?;
            let mut head = self.engine.read_at(IoBuf::zeroed(unit), 0).await?;
            let at = offsets::REFCOUNT_TABLE_OFFSET;
            head.as_mut_slice()[at..at + 8].copy_from_slice(&offset.to_be_bytes());
            let at = offsets::REFCOUNT_TABLE_CLUSTERS;
            head.as_mut_slice()[at..at + 4].copy_from_slice(&clusters.to_be_bytes());
            self.engine.write_at(Arc::new(head), 0).await?;
        }
        self.counters.reservations.fetch_add(1, Ordering::Relaxed);
        let old = self.meta().commit_reserve(plan);
        if let Some(old) = old {
            self.release_locked(&[old]).await?;
        }
        Ok(())
    }

    /// Dereferences `releases`; the caller holds the refcount lock.
    async fn release_locked(&self, releases: &[Release]) -> io::Result<Vec<u64>> {
        if releases.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.resolve_refcounts(|m| m.plan_release(releases)).await?;
        self.write_phase(&plan.writes).await?;
        Ok(plan.freed)
    }

    /// Dereferences `releases` and punches out the clusters that became free.
    async fn release(&self, releases: &[Release]) -> io::Result<()> {
        if releases.is_empty() {
            return Ok(());
        }
        let freed = {
            let _refcounts = self.refcount_lock.lock().await;
            self.release_locked(releases).await?
        };
        for host in freed {
            if let Err(e) = self
                .engine
                .punch_hole(host, self.layout.cluster_size())
                .await
            {
                tracing::debug!(path = %self.path.display(), host, "cannot punch a freed cluster: {e}");
            }
        }
        Ok(())
    }

    /// Creates the L2 table of `l1_index`: the zeroed table, then the L1 entry.
    async fn create_l2(&self, l1_index: u64) -> io::Result<()> {
        let _l1 = self.l1_lock.lock().await;
        let Some(new) = self.resolve(None, |m| m.plan_new_l2(l1_index)).await? else {
            return Ok(());
        };
        self.write_meta(&new.table).await?;
        let l1 = self.meta().render_l1(new.l1_index, new.l1_word);
        self.write_meta(&l1).await?;
        self.meta().publish_new_l2(&new);
        Ok(())
    }

    /// Writes an L2 entry, in one write with every other update of its table that waits
    /// meanwhile: the update joins its table's open batch, then waits for the table's lock
    /// or for its batch to be written, whichever comes first. The first of a batch to get
    /// the lock takes the batch (later updates open the next one), renders, writes and
    /// publishes all of it, then wakes the others. So while one write of a table is in
    /// flight, the updates that arrive meanwhile gather for the next, and each returns only
    /// once its entry is on disk (its data was written before it joined).
    async fn update_l2(&self, update: &L2Update) -> io::Result<()> {
        let l1_index = update.l1_index;
        let done = {
            let mut pending = self.pending_l2();
            let batch = pending.entry(l1_index).or_default();
            batch.updates.push(*update);
            Arc::clone(&batch.done)
        };
        let written = done.notify.notified();
        tokio::pin!(written);
        // Registered before the outcome is looked at: the writer sets it, then wakes.
        written.as_mut().enable();
        let table = match done.outcome.get() {
            Some(_) => None,
            None => tokio::select! {
                () = &mut written => None,
                table = self.table_lock(l1_index).lock() => Some(table),
            },
        };
        if let Some(outcome) = done.outcome.get() {
            return outcome
                .clone()
                .map_err(|(code, message)| crate::error::failure(code, message));
        }
        let Some(_table) = table else {
            tracing::error!(path = %self.path.display(), l1_index, "woken before the L2 write of its batch ended");
            return Err(errno(libc::EIO));
        };
        let batch = {
            let mut pending = self.pending_l2();
            match pending.get(&l1_index) {
                Some(open) if Arc::ptr_eq(&open.done, &done) => pending.remove(&l1_index),
                _ => None,
            }
        };
        let Some(batch) = batch else {
            // The batch was taken by a write that was dropped before it finished: this
            // entry may not be on disk, so it is written on its own.
            return self.write_l2(std::slice::from_ref(update)).await;
        };
        let result = self.write_l2(&batch.updates).await;
        let outcome = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err((e.raw_os_error().unwrap_or(libc::EIO), e.to_string())),
        };
        let _ = done.outcome.set(outcome);
        done.notify.notify_waiters();
        result
    }

    /// Renders, writes and publishes `updates` (entries of one L2 table, whose lock the
    /// caller holds).
    async fn write_l2(&self, updates: &[L2Update]) -> io::Result<()> {
        let Some(first) = updates.first() else {
            return Ok(());
        };
        let writes = self
            .resolve(Some(first.l1_index), |m| m.render_l2(updates))
            .await?;
        self.counters
            .l2_writes
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        self.write_phase(&writes).await?;
        let mut meta = self.meta();
        for update in updates {
            meta.publish_l2(update);
        }
        Ok(())
    }

    fn pending_l2(&self) -> MutexGuard<'_, HashMap<u64, L2Batch>> {
        self.pending_l2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The decompressed cluster whose data is at `host` (`len` bytes).
    async fn decompressed(&self, host: u64, len: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some((cached, data)) = self
            .last_decompressed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            if *cached == host {
                return Ok(Arc::clone(data));
            }
        }
        // Read whole sectors (O_DIRECT), from the one holding the first byte.
        let start = host & !(SECTOR_SIZE - 1);
        let buf = IoBuf::zeroed(to_len(len + (host - start))?);
        let buf = self.engine.read_at(buf, start).await?;
        let skip = to_len(host - start)?;
        let mut cluster = vec![0u8; to_len(self.layout.cluster_size())?];
        ::qcow2::compress::decompress(
            self.header.compression_type(),
            &buf.as_slice()[skip..],
            &mut cluster,
            host,
        )
        .map_err(|e| self.metadata_error(e))?;
        self.counters.decompressions.fetch_add(1, Ordering::Relaxed);
        let cluster = Arc::new(cluster);
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((host, Arc::clone(&cluster)));
        Ok(cluster)
    }

    async fn map(&self, offset: u64, len: u64) -> io::Result<Vec<::qcow2::meta::Run>> {
        self.resolve(None, |m| m.map(offset, len)).await
    }

    /// Where a read of `len` bytes at `sector` is read from when it is valid and lies in one
    /// cluster that holds its data, with that cluster's L2 table cached (no I/O, no plan);
    /// `None` sends it to [`Qcow2Driver::read_runs`], which answers every other case.
    fn data_in_cluster(&self, sector: u64, len: usize) -> Option<u64> {
        let sectors = self.info.request_sectors(sector, len).ok()?;
        self.meta()
            .data_in_cluster(sector * SECTOR_SIZE, sectors * SECTOR_SIZE)
    }

    async fn read_runs(&self, sector: u64, mut buf: IoBuf) -> io::Result<ReadOutcome> {
        let offset = sector * SECTOR_SIZE;
        let runs = self.map(offset, buf.len() as u64).await?;
        if let [run] = runs.as_slice() {
            match run.kind {
                RunKind::Data { host } => {
                    let buf = self.engine.read_at(buf, host).await?;
                    return Ok(ReadOutcome {
                        buf,
                        absent: Vec::new(),
                    });
                }
                RunKind::Absent => {
                    let sectors = buf.len() as u64 / SECTOR_SIZE;
                    return Ok(ReadOutcome {
                        absent: std::iter::once(0..sectors).collect(),
                        buf,
                    });
                }
                RunKind::Zero => {
                    buf.as_mut_slice().fill(0);
                    return Ok(ReadOutcome {
                        buf,
                        absent: Vec::new(),
                    });
                }
                RunKind::Compressed { .. } => {}
            }
        }
        let mut absent = Vec::new();
        let mut reads: Vec<IoFuture<'_, IoBuf>> = Vec::new();
        let mut targets = Vec::new();
        for run in &runs {
            let (at, len) = (to_len(run.offset)?, to_len(run.len)?);
            match run.kind {
                RunKind::Data { host } => {
                    reads.push(self.engine.read_at(IoBuf::zeroed(len), host));
                    targets.push(at);
                }
                RunKind::Zero => buf.zero_range(at..at + len),
                RunKind::Absent => {
                    absent.push(run.offset / SECTOR_SIZE..(run.offset + run.len) / SECTOR_SIZE);
                }
                RunKind::Compressed {
                    host,
                    len: stored,
                    within,
                } => {
                    let cluster = self.decompressed(host, stored).await?;
                    let from = to_len(within)?;
                    buf.as_mut_slice()[at..at + len].copy_from_slice(&cluster[from..from + len]);
                }
            }
        }
        let mut reads = reads.into_iter();
        let mut targets = targets.into_iter();
        loop {
            let batch: Vec<IoFuture<'_, IoBuf>> = reads.by_ref().take(BATCH).collect();
            if batch.is_empty() {
                break;
            }
            for part in run_all(batch).await? {
                let at = targets.next().ok_or_else(|| errno(libc::EIO))?;
                buf.as_mut_slice()[at..at + part.len()].copy_from_slice(part.as_slice());
            }
        }
        Ok(ReadOutcome { buf, absent })
    }

    /// Fills `out` with bytes `range` of guest cluster `cluster` as `fill` says.
    async fn fill(
        &self,
        cluster: u64,
        range: &std::ops::Range<u64>,
        fill: Fill,
        out: &mut [u8],
    ) -> io::Result<()> {
        let cs = self.layout.cluster_size();
        match fill {
            Fill::Zeros => out.fill(0),
            Fill::Below => {
                let below = self.below.get().ok_or_else(|| {
                    tracing::error!(path = %self.path.display(), "copy-on-write needs the backing chain, which is not attached");
                    errno(libc::EIO)
                })?;
                let guest = cluster * cs + range.start;
                let data = below
                    .read(guest / SECTOR_SIZE, IoBuf::zeroed(out.len()))
                    .await?;
                out.copy_from_slice(data.as_slice());
            }
            Fill::Own { host } => {
                let data = self
                    .engine
                    .read_at(IoBuf::zeroed(out.len()), host + range.start)
                    .await?;
                out.copy_from_slice(data.as_slice());
            }
            Fill::Compressed { host, len } => {
                let data = self.decompressed(host, len).await?;
                out.copy_from_slice(&data[to_len(range.start)?..to_len(range.end)?]);
            }
        }
        Ok(())
    }

    /// Carries out an allocation plan for request bytes `data` at `start` of the cluster.
    async fn allocate(&self, plan: &Allocation, start: u64, data: Arc<IoBuf>) -> io::Result<()> {
        if plan.head.is_none() && plan.tail.is_none() {
            self.engine.write_at(data, plan.host + start).await?;
        } else {
            let base = plan.write.start;
            let mut buf = IoBuf::zeroed(to_len(plan.write.end - base)?);
            for (range, fill) in [&plan.head, &plan.tail].into_iter().flatten() {
                let out =
                    &mut buf.as_mut_slice()[to_len(range.start - base)?..to_len(range.end - base)?];
                self.fill(plan.cluster, range, *fill, out).await?;
            }
            let at = to_len(start - base)?;
            buf.as_mut_slice()[at..at + data.len()].copy_from_slice(data.as_slice());
            self.engine
                .write_at(Arc::new(buf), plan.host + base)
                .await?;
        }
        self.counters.allocations.fetch_add(1, Ordering::Relaxed);
        if let Some(update) = &plan.entry {
            self.update_l2(update).await?;
        }
        self.release(&plan.release).await
    }

    /// Writes `data` at bytes `[start, start + len)` of guest cluster `cluster`.
    async fn write_in_cluster(&self, cluster: u64, start: u64, data: Arc<IoBuf>) -> io::Result<()> {
        let len = data.len() as u64;
        if let Some(host) = self
            .resolve(None, |m| m.in_place(cluster, start, len))
            .await?
        {
            return self.engine.write_at(data, host).await;
        }
        let _cluster = self.cluster_lock(cluster).lock().await;
        if let Some(host) = self
            .resolve(None, |m| m.in_place(cluster, start, len))
            .await?
        {
            return self.engine.write_at(data, host).await;
        }
        let plan = self
            .resolve(None, |m| m.plan_allocation(cluster, start, len))
            .await?;
        self.allocate(&plan, start, data).await
    }

    async fn write_bytes(&self, offset: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let cs = self.layout.cluster_size();
        let (cluster, start) = (offset / cs, offset % cs);
        let total = buf.len() as u64;
        if start + total <= cs {
            return self.write_in_cluster(cluster, start, buf).await;
        }
        // Pieces in allocated clusters whose host bytes follow each other are merged into
        // one write; the others are allocated, a batch at a time.
        let piece = |from: u64, len: u64| -> io::Result<Arc<IoBuf>> {
            if from == 0 && len == total {
                return Ok(Arc::clone(&buf));
            }
            let range = to_len(from)?..to_len(from + len)?;
            Ok(Arc::new(IoBuf::copy_from(&buf.as_slice()[range])))
        };
        let mut batch: Vec<IoFuture<'_, ()>> = Vec::new();
        // (request offset, host offset, length) of the in-place run being gathered.
        let mut run: Option<(u64, u64, u64)> = None;
        let mut done = 0u64;
        while done < total {
            let at = offset + done;
            let (cluster, start) = (at / cs, at % cs);
            let len = (cs - start).min(total - done);
            match self
                .resolve(None, |m| m.in_place(cluster, start, len))
                .await?
            {
                // A run grows only while both the request's bytes and the host's follow on
                // (a piece to allocate in between ends it).
                Some(host) => match &mut run {
                    Some((run_from, run_host, run_len))
                        if *run_from + *run_len == done && *run_host + *run_len == host =>
                    {
                        *run_len += len
                    }
                    _ => {
                        if let Some((from, host, len)) = run.take() {
                            batch.push(self.engine.write_at(piece(from, len)?, host));
                        }
                        run = Some((done, host, len));
                    }
                },
                None => {
                    let data = piece(done, len)?;
                    batch.push(Box::pin(self.write_in_cluster(cluster, start, data)));
                }
            }
            if batch.len() >= BATCH {
                run_all(std::mem::take(&mut batch)).await?;
            }
            done += len;
        }
        if let Some((from, host, len)) = run {
            batch.push(self.engine.write_at(piece(from, len)?, host));
        }
        run_all(batch).await.map(|_| ())
    }

    /// Zeroes (with `deallocate`, discards) `count` sectors at `sector`.
    async fn zero(&self, sector: u64, count: u64, deallocate: bool) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EPERM));
        }
        self.refuse_if_corrupt()?;
        self.info.check_range(sector, count)?;
        let cs = self.layout.cluster_size();
        let (offset, end) = (sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
        let mut at = offset;
        while at < end {
            let (cluster, start) = (at / cs, at % cs);
            let piece = (cs - start).min(end - at);
            // The last cluster of a disk whose size is not a multiple of the cluster size
            // is whole when the range reaches the end.
            let whole = start == 0 && (piece == cs || at + piece >= self.layout.size);
            let plan = if whole {
                let _cluster = self.cluster_lock(cluster).lock().await;
                let plan = self
                    .resolve(None, |m| m.plan_zero(cluster, deallocate))
                    .await?;
                if let ZeroPlan::Update { update, release } = &plan {
                    self.update_l2(update).await?;
                    self.release(release).await?;
                }
                plan
            } else {
                ZeroPlan::WriteZeros
            };
            if plan == ZeroPlan::WriteZeros {
                let zeros = Arc::new(IoBuf::zeroed(to_len(piece)?));
                self.write_in_cluster(cluster, start, zeros).await?;
            }
            at += piece;
        }
        Ok(())
    }

    /// Gives back the reserved clusters nobody used (at close), synchronously.
    fn release_pool(&self) -> io::Result<()> {
        let mut meta = self.meta();
        loop {
            let plan = meta
                .plan_release_pool()
                .map_err(|e| io::Error::other(e.to_string()))?;
            match plan {
                Plan::Ready((writes, truncate)) => {
                    for write in &writes {
                        self.file.write_all_at(&write.bytes, write.offset)?;
                    }
                    if let Some(len) = truncate {
                        self.file.set_len(len)?;
                    }
                    return Ok(());
                }
                Plan::Load(Need::RefBlock { rt_index, offset }) => {
                    let mut buf = vec![0u8; to_len(self.layout.cluster_size())?];
                    self.file.read_exact_at(&mut buf, offset)?;
                    meta.insert_refblock(rt_index, &buf);
                }
                Plan::Load(other) => {
                    return Err(io::Error::other(format!(
                        "releasing the pool needs {other:?}"
                    )))
                }
            }
        }
    }

    /// Number of reserved, unused clusters (statistics and tests).
    pub fn reserved_clusters(&self) -> u64 {
        self.meta().pool_len()
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        if self.read_only || self.marked_corrupt.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.release_pool() {
            tracing::warn!(path = %self.path.display(), "cannot give back reserved clusters (they stay leaked): {e}");
        }
    }
}

impl ImageDriver for Qcow2Driver {
    fn disk_type(&self) -> DiskType {
        DiskType::Qcow2
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

    fn validate_parent(&self, parent: &dyn ImageDriver) -> io::Result<()> {
        match &self.parent {
            Some(link) if link.disk_type != parent.disk_type() => Err(crate::error::failure(
                libc::EINVAL,
                format!(
                    "{}: backing file {} is a {} image, the header says {}",
                    self.path.display(),
                    parent.path().display(),
                    parent.disk_type().name(),
                    link.disk_type.name()
                ),
            )),
            _ => Ok(()),
        }
    }

    fn attach_below(&self, below: Below) {
        let _ = self.below.set(below);
    }

    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        if let Some(host) = self.data_in_cluster(sector, buf.len()) {
            // The common case, as cheap as a raw image's read: one lookup, then the engine.
            return Box::pin(async move {
                let buf = self.engine.read_at(buf, host).await?;
                Ok(ReadOutcome {
                    buf,
                    absent: Vec::new(),
                })
            });
        }
        Box::pin(async move {
            self.info.request_sectors(sector, buf.len())?;
            self.read_runs(sector, buf).await
        })
    }

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(errno(libc::EPERM));
            }
            self.refuse_if_corrupt()?;
            self.info.request_sectors(sector, buf.len())?;
            self.write_bytes(sector * SECTOR_SIZE, buf).await
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
            block_status: true,
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
            let runs = self.map(sector * SECTOR_SIZE, count * SECTOR_SIZE).await?;
            let mut out: Vec<StatusRun> = Vec::with_capacity(runs.len());
            for run in runs {
                let state = match run.kind {
                    RunKind::Data { .. } | RunKind::Compressed { .. } => Status::Data,
                    RunKind::Zero => Status::Zero,
                    RunKind::Absent => Status::Absent,
                };
                let sectors = run.len / SECTOR_SIZE;
                push_status(&mut out, StatusRun { sectors, state });
            }
            Ok(out)
        })
    }

    fn stats(&self) -> Option<DriverStats> {
        let (cached_l2_tables, reserved_clusters) = {
            let meta = self.meta();
            (meta.cached_l2_tables(), meta.pool_len())
        };
        Some(DriverStats::of_engine(
            &*self.engine,
            DriverDetail::Qcow2 {
                qcow2: Qcow2Stats {
                    version: self.header.version,
                    cluster_size: self.layout.cluster_size(),
                    extended_l2: self.layout.extended_l2,
                    allocations: self.counters.allocations.load(Ordering::Relaxed),
                    l2_loads: self.counters.l2_loads.load(Ordering::Relaxed),
                    l2_writes: self.counters.l2_writes.load(Ordering::Relaxed),
                    cached_l2_tables,
                    reservations: self.counters.reservations.load(Ordering::Relaxed),
                    reserved_clusters,
                    decompressions: self.counters.decompressions.load(Ordering::Relaxed),
                },
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::qcow2::image::{create, CreateOptions};

    const MIB: u64 = 1 << 20;

    fn new_image(dir: &Path, name: &str, options: &CreateOptions) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, create(options).unwrap()).unwrap();
        path
    }

    fn pattern(len: u64, seed: u8) -> IoBuf {
        let mut buf = IoBuf::zeroed(to_len(len).unwrap());
        for (i, chunk) in buf.as_mut_slice().chunks_mut(512).enumerate() {
            chunk.fill(u8::try_from(i % 251).unwrap().wrapping_add(seed) | 1);
        }
        buf
    }

    fn consistent(path: &Path) {
        let mut file = File::open(path).unwrap();
        let report = ::qcow2::check::check(&mut file).unwrap();
        assert!(report.is_consistent(), "{}: {report:?}", path.display());
        assert_eq!(report.leaks, 0, "{}", path.display());
    }

    #[tokio::test]
    async fn small_clusters_grow_the_refcount_table() {
        let dir = tempfile::tempdir().unwrap();
        let options = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(10 * MIB)
        };
        let path = new_image(dir.path(), "small.qcow2", &options);
        let driver = Qcow2Driver::open(&path, OpenOptions::default()).unwrap();
        // One request over the whole disk: every cluster allocated concurrently.
        let data = Arc::new(pattern(10 * MIB, 3));
        driver.write(0, Arc::clone(&data)).await.unwrap();
        let out = driver
            .read(0, IoBuf::zeroed(to_len(10 * MIB).unwrap()))
            .await
            .unwrap();
        assert!(out.absent.is_empty());
        assert!(out.buf.as_slice() == data.as_slice());
        drop(driver);
        consistent(&path);
    }

    #[tokio::test]
    async fn a_long_write_over_allocated_and_fresh_clusters_puts_each_piece_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), "m.qcow2", &CreateOptions::new(8 * MIB));
        let driver = Qcow2Driver::open(&path, OpenOptions::default()).unwrap();
        let cs = 65536;
        // Clusters 0 and 3 allocated one after the other in the file, 1 and 2 not: their
        // host bytes follow each other, the request's bytes between them do not.
        driver.write(0, Arc::new(pattern(cs, 1))).await.unwrap();
        driver
            .write(3 * cs / 512, Arc::new(pattern(cs, 2)))
            .await
            .unwrap();
        let data = Arc::new(pattern(4 * cs, 7));
        driver.write(0, Arc::clone(&data)).await.unwrap();
        let out = driver
            .read(0, IoBuf::zeroed(to_len(4 * cs).unwrap()))
            .await
            .unwrap();
        for cluster in 0..4 {
            let range = to_len(cluster * cs).unwrap()..to_len((cluster + 1) * cs).unwrap();
            assert!(
                out.buf.as_slice()[range.clone()] == data.as_slice()[range],
                "cluster {cluster}"
            );
        }
        drop(driver);
        consistent(&path);
    }

    #[tokio::test]
    async fn concurrent_writes_to_fresh_clusters_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), "c.qcow2", &CreateOptions::new(64 * MIB));
        let driver = Qcow2Driver::open(&path, OpenOptions::default()).unwrap();
        let writes: Vec<IoFuture<'_, ()>> = (0..64u64)
            .map(|i| {
                driver.write(
                    i * 8 * 17 % (64 * MIB / 512),
                    Arc::new(pattern(4096, u8::try_from(i).unwrap())),
                )
            })
            .collect();
        run_all(writes).await.unwrap();
        for i in 0..64u64 {
            let out = driver
                .read(i * 8 * 17 % (64 * MIB / 512), IoBuf::zeroed(4096))
                .await
                .unwrap();
            assert_eq!(
                out.buf.as_slice(),
                pattern(4096, u8::try_from(i).unwrap()).as_slice(),
                "write {i}"
            );
        }
        drop(driver);
        consistent(&path);
    }

    /// Storage in memory for [`ShuffledEngine`]: the file's bytes and every write in the
    /// order it landed.
    #[derive(Debug, Default)]
    struct Landed {
        bytes: Vec<u8>,
        log: Vec<(u64, Vec<u8>)>,
        rng: u64,
    }

    /// An engine over a copy of the image in memory whose operations each yield a random
    /// number of times before taking effect, so that concurrent requests complete in a
    /// random order (one per seed).
    #[derive(Debug)]
    struct ShuffledEngine(Arc<Mutex<Landed>>);

    impl ShuffledEngine {
        async fn delay(&self) {
            let turns = {
                let mut landed = self.0.lock().unwrap();
                landed.rng ^= landed.rng << 13;
                landed.rng ^= landed.rng >> 7;
                landed.rng ^= landed.rng << 17;
                landed.rng % 5
            };
            for _ in 0..turns {
                tokio::task::yield_now().await;
            }
        }

        async fn land(&self, bytes: Vec<u8>, offset: u64) -> io::Result<()> {
            self.delay().await;
            let mut landed = self.0.lock().unwrap();
            let end = to_len(offset)? + bytes.len();
            if landed.bytes.len() < end {
                landed.bytes.resize(end, 0);
            }
            landed.bytes[to_len(offset)?..end].copy_from_slice(&bytes);
            landed.log.push((offset, bytes));
            Ok(())
        }
    }

    impl IoEngine for ShuffledEngine {
        fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
            Box::pin(async move {
                self.delay().await;
                let landed = self.0.lock().unwrap();
                let out = buf.as_mut_slice();
                out.fill(0);
                let from = to_len(offset)?.min(landed.bytes.len());
                let to = (from + out.len()).min(landed.bytes.len());
                out[..to - from].copy_from_slice(&landed.bytes[from..to]);
                Ok(buf)
            })
        }
        fn write_at(&self, buf: Arc<IoBuf>, offset: u64) -> IoFuture<'_, ()> {
            Box::pin(self.land(buf.as_slice().to_vec(), offset))
        }
        fn sync_data(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
            Box::pin(async move { self.land(vec![0; to_len(len)?], offset).await })
        }
        fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
            self.punch_hole(offset, len)
        }
        fn pending(&self) -> usize {
            0
        }
        fn name(&self) -> &'static str {
            "shuffled"
        }
    }

    /// Concurrent allocating writes whose I/Os complete in random orders (their L2 entries
    /// batched per table as they wait) leave the disk a sequential run of the same writes
    /// leaves; after every single write that landed (a crash there) the image is consistent,
    /// and every guest write acknowledged by then reads back.
    #[tokio::test]
    async fn allocating_writes_in_any_order_keep_the_crash_order() {
        let mut entries_per_write = Vec::new();
        for (seed, cluster_bits) in (1..=6u64).zip([9u32, 12].into_iter().cycle()) {
            let dir = tempfile::tempdir().unwrap();
            let size = MIB;
            let options = CreateOptions {
                cluster_bits,
                ..CreateOptions::new(size)
            };
            let path = new_image(dir.path(), "o.qcow2", &options);
            let initial = std::fs::read(&path).unwrap();
            let mut driver = Qcow2Driver::open(&path, OpenOptions::default()).unwrap();
            let landed = Arc::new(Mutex::new(Landed {
                bytes: initial.clone(),
                log: Vec::new(),
                rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            }));
            driver.engine = Box::new(ShuffledEngine(Arc::clone(&landed)));
            // Writes in distinct 2 KiB slots (so their order does not matter), each a random
            // run of sectors inside its slot; two may share a cluster.
            let mut rng = seed;
            let mut next = |below: u64| {
                rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (rng >> 33) % below
            };
            let slots = size / 2048;
            let mut chosen: Vec<u64> = (0..slots).collect();
            let writes: Vec<(u64, Arc<IoBuf>)> = (0..96u8)
                .map(|i| {
                    let slot = chosen.swap_remove(to_len(next(chosen.len() as u64)).unwrap());
                    let first = next(4);
                    let sectors = 1 + next(4 - first);
                    (slot * 4 + first, Arc::new(pattern(sectors * 512, i)))
                })
                .collect();
            let mut model = vec![0u8; to_len(size).unwrap()];
            for (sector, data) in &writes {
                let at = to_len(sector * 512).unwrap();
                model[at..at + data.len()].copy_from_slice(data.as_slice());
            }
            // (write, log length when it was acknowledged)
            let acks = Mutex::new(Vec::new());
            let futures: Vec<IoFuture<'_, ()>> = writes
                .iter()
                .enumerate()
                .map(|(i, (sector, data))| {
                    let (driver, acks, landed) = (&driver, &acks, &landed);
                    Box::pin(async move {
                        driver.write(*sector, Arc::clone(data)).await?;
                        let at = landed.lock().unwrap().log.len();
                        acks.lock().unwrap().push((i, at));
                        Ok(())
                    }) as IoFuture<'_, ()>
                })
                .collect();
            run_all(futures).await.unwrap();
            let stats = driver.counters.l2_writes.load(Ordering::Relaxed);
            let allocations = driver.counters.allocations.load(Ordering::Relaxed);
            entries_per_write.push((allocations, stats));
            drop(driver);
            let acks = acks.into_inner().unwrap();
            let log = std::mem::take(&mut landed.lock().unwrap().log);
            let mut crashed = initial;
            for (n, (offset, bytes)) in log.iter().enumerate() {
                let at = to_len(*offset).unwrap();
                if crashed.len() < at + bytes.len() {
                    crashed.resize(at + bytes.len(), 0);
                }
                crashed[at..at + bytes.len()].copy_from_slice(bytes);
                let report = ::qcow2::check::check(&mut crashed).unwrap();
                assert!(
                    report.is_consistent(),
                    "seed {seed}: crash after write {n}: {report:?}"
                );
                let acked: Vec<usize> = acks
                    .iter()
                    .filter(|(_, at)| *at == n + 1)
                    .map(|(i, _)| *i)
                    .collect();
                if acked.is_empty() {
                    continue;
                }
                let mut image = ::qcow2::image::Image::open(crashed.clone(), false).unwrap();
                // Every write acknowledged so far, not only the latest ones.
                for (i, _) in acks.iter().filter(|(_, at)| *at <= n + 1) {
                    let (sector, data) = &writes[*i];
                    let mut back = vec![0u8; data.len()];
                    image.read(sector * 512, &mut back).unwrap();
                    assert!(
                        back == data.as_slice(),
                        "seed {seed}: write {i} acknowledged at {n} is missing"
                    );
                }
            }
            let mut image = ::qcow2::image::Image::open(crashed, false).unwrap();
            let mut disk = vec![0u8; to_len(size).unwrap()];
            image.read(0, &mut disk).unwrap();
            assert!(
                disk == model,
                "seed {seed}: the disk differs from the model"
            );
        }
        // The L2 entries of writes waiting on the same table went out together.
        let (allocations, l2_writes) = entries_per_write
            .iter()
            .fold((0, 0), |(a, w), (x, y)| (a + x, w + y));
        assert!(
            l2_writes < allocations,
            "{l2_writes} L2 writes for {allocations} allocations: {entries_per_write:?}"
        );
    }
}
