//! The image chain of a VBD: a leaf image above zero or more read-only parents.
//!
//! A chain is opened from a `TYPE:LOCATOR` parameter string (tapdisk's `params`, parsed into
//! an [`ImageLocator`]: a local path for file-backed types, verbatim text for the others): the
//! leaf is opened, then each image names its parent until one has none (or an `x-chain:` file
//! lists the images, leaf first, and the parents of the last one listed are followed). Parents are
//! opened read-only and shared between chains of the same process. Reads start at the leaf; any
//! sectors an image reports absent are read from the next image down, and sectors absent from
//! the last image (or past a smaller parent's end) read as zeros. Writes, flushes and discards
//! go to the leaf only. A chain may carry a changed-block-tracking log above its leaf
//! ([`ChangeLog`], the C stack's `log` image): writes, discards and zeroing mark their blocks
//! in it before they go to the leaf, and a flush syncs it with the leaf. With IntelliCache
//! ([`crate::lcache`]) the parent may be another VBD's NBD export (`-e`), and what the images
//! below serve may be kept in the leaf (`-r`, the local cache).

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use crate::changelog::ChangeLog;
use crate::crypt::ChainCipher;
use crate::driver::vhd::FileStamp;
use crate::driver::{
    open_image, push_status, Allocation, Capabilities, DiskInfo, DiskType, DriverStats,
    ImageDriver, OpenOptions, StatusRun, ZeroFlags, SECTOR_SIZE,
};
use crate::engine::mapped::MappedBytes;
use crate::engine::IoFuture;
use crate::error::failure;
use crate::iobuf::IoBuf;
use crate::lcache::{still_absent, LocalCache};
use crate::secondary::Secondary;
use tapdisk_proto::image::{ImageLocator, ImageSpec, X_CHAIN};

/// Longest chain we follow before assuming a parent loop.
pub const MAX_CHAIN_DEPTH: usize = 64;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Parses a `TYPE:LOCATOR` string ([`ImageSpec`], split at its first colon).
///
/// Type names without a driver give `ENOSYS` (as tapdisk); a missing type gives `EINVAL`, and so does
/// an empty or relative path of a file-backed type (the daemon runs in `/`, so a relative
/// path would silently mean something else) or an empty locator of another type.
pub fn parse_params(params: &str) -> io::Result<(DiskType, ImageLocator)> {
    let invalid = |why: &str| failure(libc::EINVAL, format!("'{params}': {why}"));
    let spec = ImageSpec::parse(params).map_err(|e| failure(libc::EINVAL, e.to_string()))?;
    let type_name = &spec.type_name;
    let disk_type = DiskType::from_name(type_name).map_err(|e| {
        crate::error::with_context(
            e,
            format!("'{params}': no driver for image type '{type_name}'"),
        )
    })?;
    match &spec.locator {
        ImageLocator::File(path) if !path.is_absolute() => {
            Err(invalid("the image path must be absolute"))
        }
        ImageLocator::Remote(text) if text.is_empty() => Err(invalid("the locator is empty")),
        _ => Ok((disk_type, spec.locator)),
    }
}

/// One image of an `x-chain:` file: its type, locator and whether it is listed `ro`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLine {
    /// Image type.
    pub disk_type: DiskType,
    /// Where the image lives (file locators are absolute).
    pub locator: ImageLocator,
    /// Listed with the `ro` option.
    pub read_only: bool,
}

/// Parses a chain description file (tapdisk's `x-chain:`): one image per line,
/// `TYPE:LOCATOR [options]`, leaf first, where options is a comma-separated list (`ro`).
/// Blank lines and `#` comments are skipped. Errors (`EINVAL`, or `ENOSYS` for a type
/// without a driver) are logged with the line number.
pub fn parse_x_chain(text: &str, file: &Path) -> io::Result<Vec<ChainLine>> {
    let mut lines = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| {
            tracing::error!(file = %file.display(), line = number + 1, "chain file: {what}: {line:?}");
        };
        let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
        let image = fields.next().unwrap_or_default();
        let (disk_type, locator) = parse_params(image).inspect_err(|_| bad("bad image"))?;
        let mut read_only = false;
        if let Some(options) = fields.next() {
            for option in options.split(',') {
                match option {
                    "ro" => read_only = true,
                    _ => {
                        bad("unknown option");
                        return Err(einval());
                    }
                }
            }
        }
        if fields.next().is_some() {
            bad("trailing text");
            return Err(einval());
        }
        lines.push(ChainLine {
            disk_type,
            locator,
            read_only,
        });
    }
    if lines.is_empty() {
        tracing::error!(file = %file.display(), "chain file lists no image");
        return Err(einval());
    }
    Ok(lines)
}

/// The images `params` names explicitly, leaf first, with their open options.
fn listed_images(
    params: &str,
    options: &OpenOptions,
) -> io::Result<Vec<(DiskType, ImageLocator, OpenOptions)>> {
    let chain_file = params
        .strip_prefix(X_CHAIN)
        .and_then(|rest| rest.strip_prefix(':'));
    let Some(file) = chain_file else {
        let (disk_type, locator) = parse_params(params)?;
        return Ok(vec![(disk_type, locator, options.clone())]);
    };
    let file = Path::new(file);
    if !file.is_absolute() {
        return Err(einval());
    }
    let text = crate::driver::open_image_file(file, false, false)
        .and_then(|mut opened| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut opened, &mut text).map(|_| text)
        })
        .map_err(|e| crate::error::with_context(e, file.display()))
        .inspect_err(|e| {
            tracing::error!(file = %file.display(), "cannot read chain file: {e}");
        })?;
    Ok(parse_x_chain(&text, file)?
        .into_iter()
        .map(|line| {
            let options = OpenOptions {
                read_only: options.read_only || line.read_only,
                ..options.clone()
            };
            (line.disk_type, line.locator, options)
        })
        .collect())
}

/// How parents are opened: read-only and shareable.
fn parent_options(options: &OpenOptions) -> OpenOptions {
    OpenOptions {
        read_only: true,
        shareable: true,
        ..options.clone()
    }
}

/// Appends `driver` below the last image, which must accept it as its parent.
fn push_validated(images: &mut Vec<Image>, driver: Box<dyn ImageDriver>) -> io::Result<()> {
    if let Some(child) = images.last() {
        child.driver.validate_parent(driver.as_ref())?;
    }
    images.push(Image {
        driver,
        counters: ImageCounters::default(),
    });
    Ok(())
}

/// A shareable image already open in this process.
#[derive(Debug)]
struct SharedEntry {
    driver: Weak<dyn ImageDriver>,
    /// The file as it was when opened: a file changed since (coalesced into, replaced) is
    /// opened afresh rather than served from stale metadata.
    stamp: FileStamp,
}

/// Shareable (read-only) images open in this process, by type name and canonical path.
fn shared_images() -> &'static Mutex<HashMap<(&'static str, PathBuf), SharedEntry>> {
    static SHARED: OnceLock<Mutex<HashMap<(&'static str, PathBuf), SharedEntry>>> = OnceLock::new();
    SHARED.get_or_init(|| Mutex::new(HashMap::new()))
}

/// How many chains currently hold the shared image of `disk_type` at `path` (0 when it is
/// not open as a shared image).
pub fn shared_handles(disk_type: DiskType, path: &Path) -> usize {
    let Ok(canonical) = std::fs::canonicalize(path) else {
        return 0;
    };
    shared_images()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&(disk_type.name(), canonical))
        .map_or(0, |entry| entry.driver.strong_count())
}

/// Opens an image; a read-only shareable local file is reused if this process already has
/// it open with the same type and canonical path and the file has not changed since
/// (`td_load`). Images that are not local files are opened as they are named.
fn open_maybe_shared(
    disk_type: DiskType,
    locator: &ImageLocator,
    options: OpenOptions,
) -> io::Result<Box<dyn ImageDriver>> {
    let path = match locator {
        ImageLocator::File(path) if options.read_only && options.shareable => path,
        _ => return open_image(disk_type, locator, options),
    };
    let canonical = std::fs::canonicalize(path)?;
    let stamp = FileStamp::of_path(&canonical)?;
    let key = (disk_type.name(), canonical);
    {
        let mut shared = shared_images()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = shared.get(&key) {
            if entry.stamp == stamp {
                if let Some(driver) = entry.driver.upgrade() {
                    tracing::debug!(image = %key.1.display(), "sharing an open image");
                    return Ok(Box::new(SharedImage(driver)));
                }
            }
        }
        shared.retain(|_, entry| entry.driver.strong_count() > 0);
    }
    let canonical = ImageLocator::File(key.1.clone());
    let driver: Arc<dyn ImageDriver> = Arc::from(open_image(disk_type, &canonical, options)?);
    shared_images()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            key,
            SharedEntry {
                driver: Arc::downgrade(&driver),
                stamp,
            },
        );
    Ok(Box::new(SharedImage(driver)))
}

/// One chain's handle on a shared image: forwards everything to the open driver.
#[derive(Debug)]
struct SharedImage(Arc<dyn ImageDriver>);

impl ImageDriver for SharedImage {
    fn disk_type(&self) -> DiskType {
        self.0.disk_type()
    }
    fn info(&self) -> DiskInfo {
        self.0.info()
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn parent(&self) -> Option<crate::driver::ParentLink> {
        self.0.parent()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.0.uuid()
    }
    fn keyhash(&self) -> Option<vhd::batmap::KeyHash> {
        self.0.keyhash()
    }
    fn validate_parent(&self, parent: &dyn ImageDriver) -> io::Result<()> {
        self.0.validate_parent(parent)
    }
    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, crate::driver::ReadOutcome> {
        self.0.read(sector, buf)
    }
    fn mapped(&self, sector: u64, len: usize) -> Option<MappedBytes> {
        self.0.mapped(sector, len)
    }
    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        self.0.write(sector, buf)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.0.flush()
    }
    fn discard(&self, sector: u64, count: u64) -> IoFuture<'_, ()> {
        self.0.discard(sector, count)
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.0.write_zeroes(sector, count, flags)
    }
    fn zeroes_hide_parent(&self) -> bool {
        self.0.zeroes_hide_parent()
    }
    fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        self.0.block_status(sector, count)
    }
    fn stats(&self) -> Option<DriverStats> {
        self.0.stats()
    }
    fn release(&self) {
        // Shared images are local files: nothing outlives them.
    }
}

/// Read and write counters of one image (`hits` and `fail` in stats), in sectors as the C
/// tapdisk counts them: `hits` every sector of a request the image completed, failed or not
/// (except `EBUSY`, which is retried), `fail` those of failed requests.
#[derive(Debug, Default)]
pub struct ImageCounters {
    /// Sectors completed: `[reads, writes]`.
    pub hits: [AtomicU64; 2],
    /// Sectors of failed requests: `[reads, writes]`.
    pub fail: [AtomicU64; 2],
}

const READ: usize = 0;
const WRITE: usize = 1;

impl ImageCounters {
    /// Counts a read of `sectors` that ended with `result`.
    pub fn count_read<T>(&self, sectors: u64, result: &io::Result<T>) {
        self.count(READ, sectors, result);
    }

    /// Counts a write of `sectors` that ended with `result`.
    pub fn count_write<T>(&self, sectors: u64, result: &io::Result<T>) {
        self.count(WRITE, sectors, result);
    }

    /// Counts `sectors` read without a driver request (a mapped read, a read passing
    /// through the changed-block log).
    pub fn count_read_passed(&self, sectors: u64) {
        self.hits[READ].fetch_add(sectors, Ordering::Relaxed);
    }

    fn count<T>(&self, direction: usize, sectors: u64, result: &io::Result<T>) {
        if let Err(e) = result {
            if crate::error::errno_of(e) == libc::EBUSY {
                return;
            }
            self.fail[direction].fetch_add(sectors, Ordering::Relaxed);
        }
        self.hits[direction].fetch_add(sectors, Ordering::Relaxed);
    }
}

/// One open image of a chain.
#[derive(Debug)]
pub struct Image {
    /// The format driver.
    pub driver: Box<dyn ImageDriver>,
    /// Request counters.
    pub counters: ImageCounters,
}

/// Told of every change to the leaf once it completed: `(first sector, sectors)`.
pub type WriteObserver = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The open images of one VBD, leaf first, its changed-block log and its secondary, if any.
pub struct ImageChain {
    images: Arc<Vec<Image>>,
    log: Option<ChangeLog>,
    /// Set while an observer is installed, so writes without one skip the lock.
    observed: AtomicBool,
    observer: RwLock<Option<WriteObserver>>,
    secondary: Option<Secondary>,
    /// IntelliCache's local cache of the images below the leaf (`-r`), if any.
    local_cache: Option<LocalCache>,
}

impl std::fmt::Debug for ImageChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageChain")
            .field("images", &self.images)
            .field("log", &self.log)
            .field("observed", &self.observed)
            .field("secondary", &self.secondary)
            .field("local_cache", &self.local_cache)
            .finish_non_exhaustive()
    }
}

/// The images below one image of a chain, for its copy-on-write reads
/// ([`ImageDriver::attach_below`]). It holds the chain weakly (the leaf that holds it is part
/// of the chain); once the chain is dropped reads fail with `ESHUTDOWN`.
#[derive(Debug, Clone)]
pub struct Below {
    images: Weak<Vec<Image>>,
    level: usize,
}

impl Below {
    /// Reads `buf.len()` bytes at `sector` as the images below see them (zeros where none
    /// holds data).
    pub async fn read(&self, sector: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let images = self
            .images
            .upgrade()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
        read_level(&images, self.level, sector, buf).await
    }
}

fn read_at_level(images: &[Image], level: usize, sector: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
    Box::pin(read_level(images, level, sector, buf))
}

/// Reads through `images` from `level` down: sectors a level reports absent come from the
/// next one, zeros below the last one or past a smaller image's end.
///
/// The common case (the level holds every sector asked for) awaits only the driver's
/// future; the other two run in boxed futures of their own, so that this future, which the
/// frontends allocate with every request, stays small.
async fn read_level(
    images: &[Image],
    level: usize,
    sector: u64,
    mut buf: IoBuf,
) -> io::Result<IoBuf> {
    let Some(image) = images.get(level) else {
        buf.as_mut_slice().fill(0);
        return Ok(buf);
    };
    let total = buf.len() as u64 / SECTOR_SIZE;
    let size = image.driver.info().sectors;
    // Sectors past a (smaller) parent's end read as zeros.
    let inside = size.saturating_sub(sector).min(total);
    if inside < total {
        return Box::pin(read_past_end(images, level, sector, buf, inside)).await;
    }
    let result = image.driver.read(sector, buf).await;
    image.counters.count_read(served(total, &result), &result);
    let mut outcome = result?;
    if outcome.absent.is_empty() {
        return Ok(outcome.buf);
    }
    if level + 1 == images.len() {
        // Nothing below: what is absent reads as zeros (no recursion, no other buffer).
        for range in &outcome.absent {
            let bytes = absent_bytes(range, outcome.buf.len())?;
            outcome.buf.as_mut_slice()[bytes].fill(0);
        }
        return Ok(outcome.buf);
    }
    let (buf, _) = Box::pin(read_absent(images, level + 1, sector, outcome, false)).await?;
    Ok(buf)
}

/// The bytes of a read buffer of `len` bytes that the absent sectors `range` cover.
fn absent_bytes(range: &Range<u64>, len: usize) -> io::Result<Range<usize>> {
    let start = usize::try_from(range.start * SECTOR_SIZE).map_err(|_| einval())?;
    let end = usize::try_from(range.end * SECTOR_SIZE).map_err(|_| einval())?;
    if start >= end || end > len {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(start..end)
}

/// [`read_level`] of a read reaching past the end of the image at `level`, which holds the
/// first `inside` sectors.
async fn read_past_end(
    images: &[Image],
    level: usize,
    sector: u64,
    mut buf: IoBuf,
    inside: u64,
) -> io::Result<IoBuf> {
    let keep = usize::try_from(inside * SECTOR_SIZE).map_err(|_| einval())?;
    if inside == 0 {
        buf.as_mut_slice().fill(0);
        return Ok(buf);
    }
    let mut head = IoBuf::zeroed(keep);
    head = read_at_level(images, level, sector, head).await?;
    buf.as_mut_slice()[..keep].copy_from_slice(head.as_slice());
    let len = buf.len();
    buf.zero_range(keep..len);
    Ok(buf)
}

/// How many of a read's `total` sectors the image served itself: its absent ones are read,
/// and counted, below.
fn served(total: u64, result: &io::Result<crate::driver::ReadOutcome>) -> u64 {
    let absent: u64 = result.as_ref().map_or(0, |outcome| {
        outcome
            .absent
            .iter()
            .map(|range| range.end.saturating_sub(range.start))
            .sum()
    });
    total.saturating_sub(absent)
}

/// What was read from below for one absent range: its sectors and their bytes.
type Fetched = (Range<u64>, IoBuf);

/// Completes `outcome` (a read at `sector` of the level above `level`) with its absent
/// ranges read from `level` down; with `keep`, also returns each range's bytes.
async fn read_absent(
    images: &[Image],
    level: usize,
    sector: u64,
    outcome: crate::driver::ReadOutcome,
    keep: bool,
) -> io::Result<(IoBuf, Vec<Fetched>)> {
    let mut buf = outcome.buf;
    let mut fetched = Vec::new();
    for range in outcome.absent {
        let Range { start, end } = absent_bytes(&range, buf.len())?;
        let part = IoBuf::zeroed(end - start);
        let part = read_at_level(images, level, sector + range.start, part).await?;
        buf.as_mut_slice()[start..end].copy_from_slice(part.as_slice());
        if keep {
            fetched.push((sector + range.start..sector + range.end, part));
        }
    }
    Ok((buf, fetched))
}

impl ImageChain {
    /// Opens the chain described by `params`: `type:/path`, or `x-chain:/file` naming a chain
    /// description file (see [`parse_x_chain`]). Images listed (or the leaf) are opened first;
    /// then the parents of the last one are followed through [`ImageDriver::parent`]. Parents
    /// are opened read-only and shareable: one already open in this process is reused.
    /// With a key in `options` ([`OpenOptions::key`]), every encrypted image gets the crypto
    /// layer ([`ChainCipher::layer`]); an encrypted image without a key, or with another key,
    /// fails the open.
    pub fn open(params: &str, options: OpenOptions) -> io::Result<Self> {
        Self::open_above(params, options, None)
    }

    /// [`ImageChain::open`], except that with `parent_export` the images listed are not
    /// followed: their parent is the NBD export at that socket (another VBD's chain, `-e`),
    /// opened read-only and taken as it is (no format can check a parent it reaches by NBD;
    /// its data comes decrypted by the VBD that exports it, so no crypto layer goes above it).
    pub fn open_above(
        params: &str,
        options: OpenOptions,
        parent_export: Option<&Path>,
    ) -> io::Result<Self> {
        let cipher = options.key.clone().map(ChainCipher::new).transpose()?;
        let listed = listed_images(params, &options)?;
        let mut images: Vec<Image> = Vec::with_capacity(listed.len());
        for (index, (disk_type, locator, image_options)) in listed.into_iter().enumerate() {
            let options = if index == 0 {
                image_options
            } else {
                parent_options(&image_options)
            };
            let driver = open_maybe_shared(disk_type, &locator, options)
                .and_then(|driver| ChainCipher::layer(cipher.as_ref(), driver))
                .inspect_err(|e| {
                    tracing::error!(params, image = %locator, "cannot open image: {e}");
                })?;
            push_validated(&mut images, driver)?;
        }
        if let Some(socket) = parent_export {
            let locator = ImageLocator::Remote(socket.display().to_string());
            let parent = open_image(DiskType::Nbd, &locator, parent_options(&options))
                .map_err(|e| {
                    crate::error::with_context(e, format!("parent export {}", socket.display()))
                })
                .inspect_err(|e| tracing::error!(params, "cannot open the parent export: {e}"))?;
            images.push(Image {
                driver: parent,
                counters: ImageCounters::default(),
            });
            return Ok(Self::assemble(images));
        }
        while let Some(link) = images.last().and_then(|image| image.driver.parent()) {
            if images.len() >= MAX_CHAIN_DEPTH {
                tracing::error!(params, "image chain deeper than {MAX_CHAIN_DEPTH}");
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let parent = open_maybe_shared(link.disk_type, &link.locator, parent_options(&options))
                .and_then(|driver| ChainCipher::layer(cipher.as_ref(), driver))
                .inspect_err(|e| {
                    tracing::error!(parent = %link.locator, "cannot open parent image: {e}");
                })?;
            push_validated(&mut images, parent)?;
        }
        Ok(Self::assemble(images))
    }

    /// The chain of `images`, whose leaf is handed the images below it.
    fn assemble(images: Vec<Image>) -> Self {
        let images = Arc::new(images);
        if let Some(leaf) = images.first() {
            leaf.driver.attach_below(Below {
                images: Arc::downgrade(&images),
                level: 1,
            });
        }
        Self {
            images,
            log: None,
            observed: AtomicBool::new(false),
            observer: RwLock::new(None),
            secondary: None,
            local_cache: None,
        }
    }

    /// Keeps what the images below the leaf serve in the leaf ([`crate::lcache`], `-r`).
    /// A chain of one image has nothing below to cache and stays as it is (as in the C
    /// stack).
    pub fn with_local_cache(mut self) -> Self {
        if self.images.len() > 1 {
            self.local_cache = Some(LocalCache::new(self.leaf().driver.path()));
        }
        self
    }

    /// The local cache, if the chain has one.
    pub fn local_cache(&self) -> Option<&LocalCache> {
        self.local_cache.as_ref()
    }

    /// Holds off fills of the local cache while the leaf changes (`None` without a cache).
    async fn fence_fills(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        match &self.local_cache {
            Some(cache) => Some(cache.fence().read().await),
            None => None,
        }
    }

    /// Adds the changed-block-tracking log at `path` above the leaf (`-C`); it must be a log
    /// of a disk of this chain's size ([`ChangeLog::open`]).
    pub fn with_log(mut self, path: &Path) -> io::Result<Self> {
        self.log = Some(ChangeLog::open(path, self.info().sectors)?);
        Ok(self)
    }

    /// The changed-block-tracking log, if the chain has one.
    pub fn log(&self) -> Option<&ChangeLog> {
        self.log.as_ref()
    }

    /// Marks `count` sectors at `sector` changed in the log (if any) before they are written.
    fn mark(&self, sector: u64, count: u64) -> io::Result<()> {
        match &self.log {
            Some(log) => {
                let result = log.mark(sector, count);
                log.counters().count_write(count, &result);
                result
            }
            None => Ok(()),
        }
    }

    /// Installs (or with `None` removes) the observer told of every write, discard and
    /// write-zeroes of the leaf after it completed (successfully or not), e.g. a live
    /// commit tracking what it must copy again. A change in flight when the observer is
    /// installed is reported when it completes.
    pub fn observe_writes(&self, observer: Option<WriteObserver>) {
        let on = observer.is_some();
        *self
            .observer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = observer;
        self.observed.store(on, Ordering::SeqCst);
    }

    fn written(&self, sector: u64, count: u64) {
        if !self.observed.load(Ordering::SeqCst) {
            return;
        }
        let observer = self
            .observer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(observer) = observer {
            observer(sector, count);
        }
    }

    /// A chain of already opened drivers, leaf first (for drivers opened by other means,
    /// and for tests). `EINVAL` when empty.
    pub fn from_drivers(drivers: Vec<Box<dyn ImageDriver>>) -> io::Result<Self> {
        if drivers.is_empty() {
            return Err(einval());
        }
        let images = drivers
            .into_iter()
            .map(|driver| Image {
                driver,
                counters: ImageCounters::default(),
            })
            .collect();
        Ok(Self::assemble(images))
    }

    /// Gives back what the images hold beyond this chain ([`ImageDriver::release`]); the VBD
    /// calls it at pause and close, once requests have drained.
    pub fn release(&self) {
        for image in self.images.iter() {
            image.driver.release();
        }
        if let Some(secondary) = &self.secondary {
            secondary.release();
        }
    }

    /// Makes `secondary` this chain's mirror or standby ([`crate::secondary`]).
    pub fn set_secondary(&mut self, secondary: Secondary) {
        self.secondary = Some(secondary);
    }

    /// The secondary, if any.
    pub fn secondary(&self) -> Option<&Secondary> {
        self.secondary.as_ref()
    }

    /// The images, leaf first.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    fn leaf(&self) -> &Image {
        // A chain always has its leaf: `open` pushes it first and nothing removes images.
        &self.images[0]
    }

    /// The leaf's disk information, which is the VBD's.
    pub fn info(&self) -> DiskInfo {
        self.leaf().driver.info()
    }

    /// Reads `buf.len()` bytes from `sector` through the chain (and from the secondary,
    /// for sectors written there only).
    pub async fn read(&self, sector: u64, buf: IoBuf) -> io::Result<IoBuf> {
        if let Some(log) = &self.log {
            log.counters()
                .count_read_passed(buf.len() as u64 / SECTOR_SIZE);
        }
        match &self.secondary {
            // Boxed: this rare path's larger state would otherwise enlarge every read's
            // future (allocated per request by the frontends).
            Some(secondary) if secondary.holds_data() => {
                Box::pin(secondary.read(self, sector, buf)).await
            }
            _ => self.read_chain(sector, buf).await,
        }
    }

    /// Reads through the images, leaf first, ignoring the secondary.
    pub(crate) async fn read_chain(&self, sector: u64, buf: IoBuf) -> io::Result<IoBuf> {
        match &self.local_cache {
            // Boxed, so that its state does not enlarge the future of every other read.
            Some(cache) => Box::pin(self.read_through_cache(cache, sector, buf)).await,
            // The leaf level runs in the caller's future; only parents need a boxed future.
            None => read_level(&self.images, 0, sector, buf).await,
        }
    }

    /// A read with a local cache: what the leaf lacks comes from the images below and is
    /// then written into the leaf, unless the cache stopped filling. A failed fill never
    /// fails the read.
    async fn read_through_cache(
        &self,
        cache: &LocalCache,
        sector: u64,
        buf: IoBuf,
    ) -> io::Result<IoBuf> {
        let leaf = self.leaf();
        let total = buf.len() as u64 / SECTOR_SIZE;
        if sector.saturating_add(total) > leaf.driver.info().sectors {
            return read_level(&self.images, 0, sector, buf).await;
        }
        let result = leaf.driver.read(sector, buf).await;
        leaf.counters.count_read(served(total, &result), &result);
        let outcome = result?;
        let (buf, fetched) = read_absent(&self.images, 1, sector, outcome, true).await?;
        let shared: u64 = fetched
            .iter()
            .map(|(range, _)| range.end - range.start)
            .sum();
        cache.count_read(total - shared, shared);
        if !fetched.is_empty() && cache.may_fill() {
            if let Err(e) = self.fill(cache, &fetched).await {
                cache.fill_failed(&e);
            }
        }
        Ok(buf)
    }

    /// Writes what was `fetched` from below into the leaf where the leaf still lacks it,
    /// with the leaf's writes held off.
    async fn fill(&self, cache: &LocalCache, fetched: &[Fetched]) -> io::Result<()> {
        let _fence = cache.fence().write().await;
        let mut written = 0;
        let result = self.fill_pieces(fetched, &mut written).await;
        cache.filled(written);
        result
    }

    /// The writes of [`ImageChain::fill`], counting the sectors written in `written`.
    async fn fill_pieces(&self, fetched: &[Fetched], written: &mut u64) -> io::Result<()> {
        let leaf = self.leaf();
        for (range, data) in fetched {
            let runs = leaf
                .driver
                .block_status(range.start, range.end - range.start)
                .await?;
            for piece in still_absent(range, &runs) {
                let from = usize::try_from((piece.start - range.start) * SECTOR_SIZE)
                    .map_err(|_| einval())?;
                let to = usize::try_from((piece.end - range.start) * SECTOR_SIZE)
                    .map_err(|_| einval())?;
                let bytes = data.as_slice().get(from..to).ok_or_else(einval)?;
                leaf.driver
                    .write(piece.start, Arc::new(IoBuf::copy_from(bytes)))
                    .await?;
                *written += piece.end - piece.start;
            }
        }
        Ok(())
    }

    /// True when this chain can serve mapped reads at all ([`ImageChain::mapped`]).
    pub fn is_mapped(&self) -> bool {
        // A zero-length range is mapped exactly when the image is.
        self.secondary.is_none()
            && matches!(self.images.as_slice(), [image] if image.driver.mapped(0, 0).is_some())
    }

    /// The `len` bytes at `sector` as mapped memory the kernel can copy from, when a
    /// single-image chain has them so ([`ImageDriver::mapped`]); `None` means: read them.
    pub fn mapped(&self, sector: u64, len: usize) -> Option<MappedBytes> {
        let [image] = self.images.as_slice() else {
            return None;
        };
        if self.secondary.is_some() {
            return None;
        }
        let range = image.driver.mapped(sector, len)?;
        image.counters.count_read_passed(len as u64 / SECTOR_SIZE);
        Some(range)
    }

    /// Writes `buf` at `sector` into the leaf (and the secondary, as it says), after marking
    /// its blocks in the log.
    pub async fn write(&self, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let count = buf.len() as u64 / SECTOR_SIZE;
        self.mark(sector, count)?;
        let leaf = self.leaf();
        let fence = self.fence_fills().await;
        let result = match &self.secondary {
            Some(secondary) => secondary.write(leaf, sector, buf).await,
            None => {
                let result = leaf.driver.write(sector, buf).await;
                leaf.counters.count_write(count, &result);
                result
            }
        };
        drop(fence);
        self.written(sector, count);
        result
    }

    /// Flushes the leaf (parents are read-only) and the secondary it writes, and syncs the
    /// log.
    pub async fn flush(&self) -> io::Result<()> {
        let leaf = self.leaf().driver.flush();
        let data = async {
            match &self.secondary {
                Some(secondary) => secondary.flush(leaf).await,
                None => leaf.await,
            }
        };
        match &self.log {
            Some(log) => {
                let (data, log) = tokio::join!(data, log.sync());
                data.and(log)
            }
            None => data.await,
        }
    }

    /// Discards sectors of the leaf (zeroes them on the secondary it writes), after marking
    /// them in the log.
    pub async fn discard(&self, sector: u64, count: u64) -> io::Result<()> {
        self.zero_leaf(sector, count, |leaf| leaf.discard(sector, count))
            .await
    }

    /// Optional operations of the chain: the leaf's, except that zeroing without writing
    /// data needs a single-image chain (a deallocated leaf sector would show the parent).
    pub fn capabilities(&self) -> Capabilities {
        let mut capabilities = self.leaf().driver.capabilities();
        if self.images.len() > 1 && !self.leaf().driver.zeroes_hide_parent() {
            capabilities.write_zeroes = false;
        }
        capabilities
    }

    /// Zeroes sectors of the leaf without writing data; `EOPNOTSUPP` when the chain or the
    /// leaf driver cannot.
    pub async fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> io::Result<()> {
        if self.images.len() > 1 && !self.leaf().driver.zeroes_hide_parent() {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.zero_leaf(sector, count, |leaf| {
            leaf.write_zeroes(sector, count, flags)
        })
        .await
    }

    /// A discard or write-zeroes of `count` sectors at `sector`, which `zero` starts on the
    /// leaf's driver: marked in the log first, run under the fill fence, given to the
    /// secondary (which mirrors or redirects it) if there is one.
    async fn zero_leaf<'a>(
        &'a self,
        sector: u64,
        count: u64,
        zero: impl FnOnce(&'a dyn ImageDriver) -> IoFuture<'a, ()>,
    ) -> io::Result<()> {
        self.mark(sector, count)?;
        let fence = self.fence_fills().await;
        let leaf = zero(&*self.leaf().driver);
        let result = match &self.secondary {
            Some(secondary) => secondary.zero(sector, count, leaf).await,
            None => leaf.await,
        };
        drop(fence);
        self.written(sector, count);
        result
    }

    /// Allocation of `count` sectors at `sector`, resolved through the chain: every run is
    /// `Data` or `Zero` (sectors absent everywhere are zero).
    pub fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        match &self.secondary {
            Some(secondary) if secondary.holds_data() => {
                Box::pin(secondary.block_status(self, sector, count))
            }
            _ => self.block_status_of_chain(sector, count),
        }
    }

    /// Block status through the images, ignoring the secondary.
    pub(crate) fn block_status_of_chain(
        &self,
        sector: u64,
        count: u64,
    ) -> IoFuture<'_, Vec<StatusRun>> {
        self.block_status_at_level(0, sector, count)
    }

    fn block_status_at_level(
        &self,
        level: usize,
        sector: u64,
        count: u64,
    ) -> IoFuture<'_, Vec<StatusRun>> {
        Box::pin(async move {
            let Some(image) = self.images.get(level) else {
                return Ok(vec![StatusRun {
                    sectors: count,
                    state: Allocation::Zero,
                }]);
            };
            let runs = image.driver.block_status(sector, count).await?;
            let mut resolved: Vec<StatusRun> = Vec::with_capacity(runs.len());
            let mut at = sector;
            for run in runs {
                if run.sectors == 0 {
                    continue;
                }
                let pieces = if run.state == Allocation::Absent {
                    self.block_status_at_level(level + 1, at, run.sectors)
                        .await?
                } else {
                    vec![run.clone()]
                };
                for piece in pieces {
                    push_status(&mut resolved, piece);
                }
                at += run.sectors;
            }
            if resolved.is_empty() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(resolved)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_image_chains_serve_mapped_reads() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let open = |name: &str| -> Box<dyn ImageDriver> {
            let path = dir.path().join(name);
            std::fs::write(&path, [3u8; 8192]).unwrap();
            let image = crate::driver::aio::AioImage::open(&path, OpenOptions::default());
            Box::new(image.unwrap())
        };
        let single = ImageChain::from_drivers(vec![open("leaf.img")]).unwrap();
        assert!(single.is_mapped());
        assert_eq!(single.mapped(2, 1024).unwrap().len(), 1024);
        assert_eq!(
            single.images()[0].counters.hits[READ].load(Ordering::Relaxed),
            2
        );
        // Above a parent, unwritten leaf sectors would have to come from the parent.
        let layered = ImageChain::from_drivers(vec![open("top.img"), open("base.img")]).unwrap();
        assert!(!layered.is_mapped());
        assert!(layered.mapped(2, 1024).is_none());
    }

    #[test]
    fn parses_params_strings() {
        let (t, p) = parse_params("aio:/tmp/disk.img").unwrap();
        assert_eq!(t, DiskType::Aio);
        assert_eq!(p, ImageLocator::File("/tmp/disk.img".into()));
        let (_, p) = parse_params("aio:/a:b").unwrap();
        assert_eq!(p, ImageLocator::File("/a:b".into()));
        // Not a file: the locator is kept as given (relative-looking or not).
        let (t, p) = parse_params("nbd:unix:/run/x.sock:exportname=vdi").unwrap();
        assert_eq!(t, DiskType::Nbd);
        assert_eq!(
            p,
            ImageLocator::Remote("unix:/run/x.sock:exportname=vdi".into())
        );
        let (_, p) = parse_params("nbd:fd-id").unwrap();
        assert_eq!(p, ImageLocator::Remote("fd-id".into()));
        let errno = |s: &str| Some(crate::error::errno_of(&parse_params(s).unwrap_err()));
        // No driver for the type: ENOSYS, as the C tapdisk (issue 23; was ENOENT).
        assert_eq!(errno("bogus:/x"), Some(libc::ENOSYS));
        assert_eq!(errno("aio:relative.img"), Some(libc::EINVAL));
        assert_eq!(errno("aio:"), Some(libc::EINVAL));
        assert_eq!(errno("/no/type"), Some(libc::EINVAL));
        assert_eq!(errno(":/x"), Some(libc::EINVAL));
        assert_eq!(errno("nbd:"), Some(libc::EINVAL));
        assert_eq!(errno("bogus:"), Some(libc::ENOSYS));
        assert_eq!(errno("rbd:pool/image"), Some(libc::ENOSYS));
        let message = crate::error::message_of(&parse_params("rbd:pool/image").unwrap_err());
        assert!(message.contains("'rbd:pool/image'"), "{message}");
    }

    #[test]
    fn parses_chain_files() {
        let file = Path::new("/chains/x");
        let text = "vhd:/a/leaf.vhd\n\n# comment\n  vhd:/a/mid.vhd\tro\naio:/a/base.img ro,ro\n";
        let lines = parse_x_chain(text, file).unwrap();
        assert_eq!(
            lines,
            vec![
                ChainLine {
                    disk_type: DiskType::Vhd,
                    locator: ImageLocator::File("/a/leaf.vhd".into()),
                    read_only: false
                },
                ChainLine {
                    disk_type: DiskType::Vhd,
                    locator: ImageLocator::File("/a/mid.vhd".into()),
                    read_only: true
                },
                ChainLine {
                    disk_type: DiskType::Aio,
                    locator: ImageLocator::File("/a/base.img".into()),
                    read_only: true
                },
            ]
        );
        let errno = |text: &str| {
            Some(crate::error::errno_of(
                &parse_x_chain(text, file).unwrap_err(),
            ))
        };
        assert_eq!(errno(""), Some(libc::EINVAL));
        assert_eq!(errno("vhd:/a rw"), Some(libc::EINVAL));
        assert_eq!(errno("vhd:/a ro extra"), Some(libc::EINVAL));
        assert_eq!(errno("vhd:relative"), Some(libc::EINVAL));
        assert_eq!(errno("qcow9:/a"), Some(libc::ENOSYS));
    }

    fn vhd_chain(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = Vec::new();
        for name in names {
            let path = dir.join(name);
            match paths.last() {
                None => {
                    vhd::create::create_file(&path, &vhd::create::CreateOptions::dynamic(4 << 20))
                        .unwrap();
                }
                Some(parent) => {
                    vhd::create::snapshot(&path, parent, &Default::default()).unwrap();
                }
            }
            paths.push(path);
        }
        paths
    }

    #[tokio::test]
    async fn x_chain_files_list_images_and_parents_follow() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vhd_chain(dir.path(), &["base.vhd", "mid.vhd", "leaf.vhd"]);
        let file = dir.path().join("chain");
        std::fs::write(
            &file,
            format!(
                "vhd:{}\nvhd:{} ro\n",
                paths[2].display(),
                paths[1].display()
            ),
        )
        .unwrap();
        let chain = ImageChain::open(
            &format!("x-chain:{}", file.display()),
            OpenOptions::default(),
        )
        .unwrap();
        let opened: Vec<PathBuf> = chain
            .images()
            .iter()
            .map(|image| std::fs::canonicalize(image.driver.path()).unwrap())
            .collect();
        let expected: Vec<PathBuf> = [2, 1, 0]
            .iter()
            .map(|i| std::fs::canonicalize(&paths[*i]).unwrap())
            .collect();
        assert_eq!(opened, expected);
        chain
            .write(0, Arc::new(IoBuf::copy_from(&[3u8; 512])))
            .await
            .unwrap();
        // Listing a wrong parent is refused by the child's validation.
        let other = vhd_chain(dir.path(), &["other.vhd"]);
        std::fs::write(
            &file,
            format!("vhd:{}\nvhd:{}\n", paths[2].display(), other[0].display()),
        )
        .unwrap();
        let err = ImageChain::open(
            &format!("x-chain:{}", file.display()),
            OpenOptions::default(),
        )
        .unwrap_err();
        assert_eq!(crate::error::errno_of(&err), libc::EINVAL);
        let err =
            ImageChain::open("x-chain:/nonexistent/chain", OpenOptions::default()).unwrap_err();
        assert_eq!(crate::error::errno_of(&err), libc::ENOENT);
    }

    #[tokio::test]
    async fn parents_are_shared_between_chains_until_changed() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vhd_chain(dir.path(), &["base.vhd", "a.vhd"]);
        let b = dir.path().join("b.vhd");
        vhd::create::snapshot(&b, &paths[0], &Default::default()).unwrap();
        let open = |leaf: &Path| {
            ImageChain::open(&format!("vhd:{}", leaf.display()), OpenOptions::default()).unwrap()
        };
        let first = open(&paths[1]);
        assert_eq!(shared_handles(DiskType::Vhd, &paths[0]), 1);
        let second = open(&b);
        assert_eq!(shared_handles(DiskType::Vhd, &paths[0]), 2);
        // Leaves are not shared.
        assert_eq!(shared_handles(DiskType::Vhd, &paths[1]), 0);
        drop(first);
        assert_eq!(shared_handles(DiskType::Vhd, &paths[0]), 1);
        // A parent file changed behind our back is opened afresh, not served stale.
        let before = std::fs::metadata(&paths[0]).unwrap().len();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&paths[0])
            .unwrap()
            .set_len(before)
            .unwrap();
        let touched = filetime_bump(&paths[0]);
        let third = open(&paths[1]);
        if touched {
            assert_eq!(shared_handles(DiskType::Vhd, &paths[0]), 1);
        }
        drop((second, third));
        assert_eq!(shared_handles(DiskType::Vhd, &paths[0]), 0);
    }

    /// Moves a file's modification time one second forward; false if that failed.
    fn filetime_bump(path: &Path) -> bool {
        let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) else {
            return false;
        };
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(modified + std::time::Duration::from_secs(1)))
            .is_ok()
    }

    #[tokio::test]
    async fn writes_are_marked_in_the_log_and_flushes_sync_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4 * 65536]).unwrap();
        let log = dir.path().join("disk.cbtlog");
        std::fs::write(&log, cbt::LogFile::new(4 * 65536).unwrap().to_bytes()).unwrap();
        let chain = ImageChain::open(&format!("aio:{}", path.display()), OpenOptions::default())
            .unwrap()
            .with_log(&log)
            .unwrap();
        chain
            .write(256, Arc::new(IoBuf::copy_from(&[1u8; 512])))
            .await
            .unwrap();
        chain.discard(384, 8).await.unwrap();
        let on_disk = cbt::LogFile::parse(&std::fs::read(&log).unwrap()).unwrap();
        assert_eq!(on_disk.bitmap.as_bytes(), [0b1100]);
        let marks = chain.log().unwrap();
        assert!(marks.has_unsynced_marks());
        chain.flush().await.unwrap();
        assert!(!marks.has_unsynced_marks());
        // Reads pass through the log without marking anything. Counted in sectors: 1 read;
        // 1 written and 8 discarded.
        chain.read(0, IoBuf::zeroed(512)).await.unwrap();
        assert_eq!(marks.counters().hits[READ].load(Ordering::Relaxed), 1);
        assert_eq!(marks.counters().hits[WRITE].load(Ordering::Relaxed), 9);
        assert!(!marks.has_unsynced_marks());
    }

    #[tokio::test]
    async fn chain_reads_and_writes_the_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![1u8; 65536]).unwrap();
        let chain =
            ImageChain::open(&format!("aio:{}", path.display()), OpenOptions::default()).unwrap();
        assert_eq!(chain.info().sectors, 128);
        chain
            .write(0, Arc::new(IoBuf::copy_from(&[9u8; 512])))
            .await
            .unwrap();
        let buf = chain.read(0, IoBuf::zeroed(1024)).await.unwrap();
        assert!(buf.as_slice()[..512].iter().all(|b| *b == 9));
        assert!(buf.as_slice()[512..].iter().all(|b| *b == 1));
        // Sectors: 2 read, 1 written.
        let hits = &chain.images()[0].counters.hits;
        assert_eq!(hits[READ].load(Ordering::Relaxed), 2);
        assert_eq!(hits[WRITE].load(Ordering::Relaxed), 1);
        let status = chain.block_status(0, 128).await.unwrap();
        assert_eq!(
            status,
            vec![StatusRun {
                sectors: 128,
                state: Allocation::Data
            }]
        );
    }
}
