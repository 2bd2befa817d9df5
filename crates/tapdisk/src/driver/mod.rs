//! Image drivers: the formats a VBD's image chain is built from.
//!
//! The interface follows tapdisk's `struct tap_disk`: a driver is opened from a path with
//! [`OpenOptions`], reports its [`DiskInfo`], names its parent (if any) so the chain can be
//! opened below it, validates that parent, and serves reads, writes, flushes, discards and
//! block-status queries. Reads may leave sector ranges *absent* ([`ReadOutcome::absent`]): the
//! image chain forwards those to the parent image (or fills them with zeros at the bottom).
//!
//! Every request method takes `&self` and returns a future, so a driver serves requests from
//! several queues at once and completes them asynchronously.
//!
//! What the drivers share lives here too: opening a file for I/O ([`open_for_io`]: `O_DIRECT`
//! with a buffered fallback), request checks ([`DiskInfo::check_range`],
//! [`DiskInfo::request_sectors`]), merging block-status runs ([`push_status`]), the common part
//! of their stats ([`DriverStats::of_engine`]) and running I/O futures together (`run_all`).

pub mod aio;
pub mod nbd;
pub mod qcow2;
pub mod vhd;

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;

pub use tapdisk_proto::image::ImageLocator;

use crate::engine::mapped::MappedBytes;
use crate::engine::{IoEngine, IoFuture, IoSettings};
use crate::error::failure;
use crate::image::Below;
use crate::iobuf::IoBuf;

/// Opens a file a VBD is built from (an image, or an `x-chain:` description) without ever
/// blocking on what is not a disk: the file is opened with `O_NONBLOCK` (so a FIFO or a
/// device waiting for a peer returns at once), anything but a regular file or a block device
/// is refused with `EINVAL` naming what it is (callers add the path), and `O_NONBLOCK` is
/// cleared again for the I/O.
/// `O_DIRECT` is asked for with `direct`; writing with `writable`.
pub fn open_image_file(path: &Path, writable: bool, direct: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let mut flags = libc::O_NONBLOCK;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a file"
        };
        return Err(crate::error::failure(
            libc::EINVAL,
            format!("{what}, not a regular file or block device"),
        ));
    }
    let status = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, status - rustix::fs::OFlags::NONBLOCK)?;
    Ok(file)
}

/// Opens an image file for its I/O engine: with `O_DIRECT` unless `options` say not to, and
/// through the page cache where the filesystem refuses `O_DIRECT` (tmpfs, some FUSE
/// filesystems), with a notice. Returns the file and whether it is open with `O_DIRECT`.
pub fn open_for_io(path: &Path, options: &OpenOptions) -> io::Result<(std::fs::File, bool)> {
    let writable = !options.read_only;
    let direct = !options.no_o_direct;
    match open_image_file(path, writable, direct) {
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(path = %path.display(), "O_DIRECT refused by the filesystem; using buffered I/O");
            Ok((open_image_file(path, writable, false)?, false))
        }
        other => Ok((other?, direct)),
    }
}

/// An error carrying just `code`.
pub(crate) fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Converts a computed byte length into a buffer length (`EINVAL` if it does not fit).
pub(crate) fn to_len(bytes: u64) -> io::Result<usize> {
    usize::try_from(bytes).map_err(|_| errno(libc::EINVAL))
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

/// Runs `futures` concurrently (one is simply awaited) and returns their results, or the
/// first error.
pub(crate) async fn run_all<'a, T>(mut futures: Vec<IoFuture<'a, T>>) -> io::Result<Vec<T>> {
    if futures.len() == 1 {
        if let Some(only) = futures.pop() {
            return Ok(vec![only.await?]);
        }
    }
    join_all(futures).await.into_iter().collect()
}

/// Bytes per sector used for VBD addressing (the C stack's `SECTOR_SIZE`).
pub const SECTOR_SIZE: u64 = 512;

/// What a driver reports about its disk (tapdisk's `td_disk_info_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// `VDISK_*` information bits (e.g. `VDISK_READONLY` 0x4).
    pub info: u32,
}

impl DiskInfo {
    /// A disk of `bytes` bytes (counted in whole 512-byte sectors) with logical sectors of
    /// `sector_size` bytes; `read_only` sets `VDISK_READONLY`.
    pub fn new(bytes: u64, sector_size: u32, read_only: bool) -> Self {
        Self {
            sectors: bytes / SECTOR_SIZE,
            sector_size,
            info: if read_only { VDISK_READONLY } else { 0 },
        }
    }

    /// `EINVAL` unless the `count` sectors at `sector` lie inside the disk.
    pub fn check_range(&self, sector: u64, count: u64) -> io::Result<()> {
        match sector.checked_add(count) {
            Some(end) if end <= self.sectors => Ok(()),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// The sectors a request of `bytes` bytes at `sector` covers; `EINVAL` unless they are
    /// whole sectors inside the disk.
    pub fn request_sectors(&self, sector: u64, bytes: usize) -> io::Result<u64> {
        let bytes = bytes as u64;
        if bytes % SECTOR_SIZE != 0 {
            return Err(errno(libc::EINVAL));
        }
        let count = bytes / SECTOR_SIZE;
        self.check_range(sector, count)?;
        Ok(count)
    }
}

/// The `VDISK_READONLY` information bit.
pub const VDISK_READONLY: u32 = 0x4;

/// How an image is opened (the subset of tapdisk's `TD_OPEN_*` flags a driver sees, and
/// tapdisk's I/O settings).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Open read-only; writes fail with `EPERM`.
    pub read_only: bool,
    /// Don't use `O_DIRECT` (go through the page cache).
    pub no_o_direct: bool,
    /// The image may be shared with other VBDs in this process (read-only parents).
    pub shareable: bool,
    /// Engine and mapped reads, from tapdisk's configuration.
    pub io: IoSettings,
    /// The NBD client's settings and the sockets handed to this process (`nbd:` images).
    pub nbd: self::nbd::NbdClientContext,
    /// The XTS-AES key of an encrypted chain (`tap-ctl open -E`): the image chain checks it
    /// against every image's keyhash and puts the crypto layer ([`crate::crypt`]) above the
    /// images that have one.
    pub key: Option<Arc<secret::Key>>,
}

/// The registered image types, with the C stack's `DISK_TYPE_*` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Raw file or block device.
    Aio,
    /// Virtual Hard Disk (fixed, dynamic, differencing).
    Vhd,
    /// QEMU copy-on-write disk, versions 2 and 3 (XCP-ng's `qcow2`).
    Qcow2,
    /// Whole image held in memory.
    Ram,
    /// NBD client.
    Nbd,
}

impl DiskType {
    /// Looks up a type by its `type:` prefix name. `Err(ENOSYS)` for any name this tapdisk
    /// has no driver for, as the C tapdisk answers an OPEN of an unknown type (so "no such
    /// driver" is never mistaken for "no such file", `ENOENT`).
    pub fn from_name(name: &str) -> Result<Self, io::Error> {
        match name {
            "aio" => Ok(Self::Aio),
            "vhd" => Ok(Self::Vhd),
            "qcow2" => Ok(Self::Qcow2),
            "ram" => Ok(Self::Ram),
            "nbd" => Ok(Self::Nbd),
            _ => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        }
    }

    /// The `type:` prefix name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Aio => "aio",
            Self::Vhd => "vhd",
            Self::Qcow2 => "qcow2",
            Self::Ram => "ram",
            Self::Nbd => "nbd",
        }
    }

    /// The C stack's `DISK_TYPE_*` number (shown in stats).
    pub fn number(self) -> u32 {
        match self {
            Self::Aio => 0,
            Self::Vhd => 4,
            Self::Qcow2 => 6,
            Self::Ram => 5,
            Self::Nbd => 15,
        }
    }
}

/// Where an image's parent lives (tapdisk's `td_disk_id_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's type.
    pub disk_type: DiskType,
    /// The parent's file, or (for a format whose backing image may be remote) its locator.
    pub locator: ImageLocator,
}

/// Allocation state of a sector range, for NBD block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Holds data in this image.
    Data,
    /// Known to read as zeros (a hole).
    Zero,
    /// Not present in this image: ask the parent.
    Absent,
}

/// One run of a block-status answer, in sectors relative to the query start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRun {
    /// Number of sectors in the run.
    pub sectors: u64,
    /// Their state.
    pub state: Allocation,
}

/// Appends `run` to a block-status answer, growing the last run when it has the same state.
pub fn push_status(runs: &mut Vec<StatusRun>, run: StatusRun) {
    match runs.last_mut() {
        Some(last) if last.state == run.state => last.sectors += run.sectors,
        _ => runs.push(run),
    }
}

/// Optional operations a driver really implements, so frontends can advertise them truthfully
/// (NBD export flags). The default is none of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// [`ImageDriver::discard`] deallocates sectors, which then read back as zeros.
    pub discard: bool,
    /// [`ImageDriver::write_zeroes`] zeroes without writing data (fast).
    pub write_zeroes: bool,
    /// [`ImageDriver::block_status`] reports real allocation, not just "all data".
    pub block_status: bool,
}

/// How [`ImageDriver::write_zeroes`] may zero a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) instead of allocated zeros.
    pub may_deallocate: bool,
}

/// Result of a driver read.
#[derive(Debug)]
pub struct ReadOutcome {
    /// The buffer, filled wherever the image holds data.
    pub buf: IoBuf,
    /// Sector ranges (relative to the request's first sector) this image does not hold; the
    /// chain reads them from the parent.
    pub absent: Vec<Range<u64>>,
}

/// A disk image format driver (tapdisk's `struct tap_disk`).
pub trait ImageDriver: Send + Sync + fmt::Debug {
    /// The driver's type.
    fn disk_type(&self) -> DiskType;
    /// Size, sector size and info bits.
    fn info(&self) -> DiskInfo;
    /// The image's own path.
    fn path(&self) -> &Path;
    /// The parent image to open below this one, if any (`td_get_parent_id`).
    fn parent(&self) -> Option<ParentLink> {
        None
    }
    /// The image's UUID, for formats that have one (a child records its parent's UUID).
    fn uuid(&self) -> Option<[u8; 16]> {
        None
    }
    /// The keyhash of the key the image's data is encrypted with, for formats that record
    /// one (tapdisk's VHD batmap); `None` for a plain image.
    fn keyhash(&self) -> Option<::vhd::batmap::KeyHash> {
        None
    }
    /// Checks that `parent` really is this image's parent (`td_validate_parent`).
    fn validate_parent(&self, _parent: &dyn ImageDriver) -> io::Result<()> {
        Ok(())
    }
    /// Hands a copy-on-write driver the images below it in its chain (called on the leaf
    /// once the chain is open), from which it copies the parts of a cluster a write does not
    /// cover. The default ignores it.
    fn attach_below(&self, _below: Below) {}
    /// Reads `buf.len()` bytes starting at `sector`.
    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome>;
    /// The `len` bytes at `sector` as a range of a memory mapping the kernel can copy from
    /// ([`crate::engine::mapped`]), when this image holds them as plain data in memory;
    /// `None` (the default) means: read them.
    fn mapped(&self, _sector: u64, _len: usize) -> Option<MappedBytes> {
        None
    }
    /// Writes `buf` starting at `sector`.
    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()>;
    /// Makes completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Discards `count` sectors at `sector` (they then read as zeros).
    fn discard(&self, _sector: u64, _count: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)) })
    }
    /// Optional operations this driver implements (default: none).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    /// Makes `count` sectors at `sector` read as zeros without writing data; `EOPNOTSUPP`
    /// when that cannot be done fast (callers then write zeros themselves).
    fn write_zeroes(&self, _sector: u64, _count: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)) })
    }
    /// True when [`ImageDriver::write_zeroes`] and [`ImageDriver::discard`] leave the range
    /// reading as zeros even in an image with a parent (the driver masks the parent's data
    /// itself, as the `vhd` driver does), so the chain may offer fast zeroing above parents.
    fn zeroes_hide_parent(&self) -> bool {
        false
    }
    /// Allocation state of `count` sectors at `sector`.
    fn block_status(&self, _sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        Box::pin(async move {
            Ok(vec![StatusRun {
                sectors: count,
                state: Allocation::Data,
            }])
        })
    }
    /// The driver's status for `tap-ctl stats` (`None` shows as `null`).
    fn stats(&self) -> Option<DriverStats> {
        None
    }
    /// Gives back, at pause or close once requests have drained, what the image holds that
    /// outlives it (an `nbd:` image's handed-over connection goes back to the process's
    /// passed sockets). Default: nothing; files close when the driver is dropped.
    fn release(&self) {}
}

/// A driver's status in `tap-ctl stats` (the `"status"` object of an image). The VBD adds the
/// request limit (`"reqs": { "max": ... }`), which is its business, not the driver's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverStats {
    /// Requests submitted to the I/O engine and not completed yet.
    pub pending: usize,
    /// The I/O engine's name.
    pub engine: &'static str,
    /// What only this kind of driver reports.
    pub detail: DriverDetail,
}

impl DriverStats {
    /// The stats of a driver doing its I/O through `engine`.
    pub fn of_engine(engine: &dyn IoEngine, detail: DriverDetail) -> Self {
        Self {
            pending: engine.pending(),
            engine: engine.name(),
            detail,
        }
    }
}

/// Driver-specific fields of [`DriverStats`], shown beside `reqs` and `engine`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum DriverDetail {
    /// Raw images: whether reads are served from a mapping of the image (`"mapped"`).
    Raw {
        /// Mapped reads are on.
        mapped: bool,
    },
    /// VHD images: the `"vhd"` object.
    Vhd {
        /// Format type and block counters.
        vhd: self::vhd::VhdStats,
    },
    /// qcow2 images: the `"qcow2"` object.
    Qcow2 {
        /// Geometry and allocation counters.
        qcow2: self::qcow2::Qcow2Stats,
    },
    /// NBD images: the `"nbd"` object.
    Nbd {
        /// Connection state and counters.
        nbd: self::nbd::NbdStats,
    },
}

/// Opens an image of `disk_type` at `locator` (`td_open`).
pub fn open_image(
    disk_type: DiskType,
    locator: &ImageLocator,
    options: OpenOptions,
) -> io::Result<Box<dyn ImageDriver>> {
    let name = disk_type.name();
    let local_file = || {
        locator.as_path().ok_or_else(|| {
            failure(
                libc::EINVAL,
                format!("{name}:{locator}: the {name} driver opens local files only"),
            )
        })
    };
    match disk_type {
        DiskType::Aio => Ok(Box::new(aio::AioImage::open(local_file()?, options)?)),
        DiskType::Qcow2 => Ok(Box::new(self::qcow2::Qcow2Driver::open(
            local_file()?,
            options,
        )?)),
        DiskType::Vhd => Ok(Box::new(
            self::vhd::VhdDriver::open(local_file()?, options)
                .map_err(self::vhd::VhdDriverError::into_logged_io)?,
        )),
        DiskType::Nbd => Ok(Box::new(self::nbd::NbdImage::open(
            &locator.to_string(),
            &options,
        )?)),
        // Known names whose drivers are not built yet: ENOSYS, as tapdisk does.
        DiskType::Ram => Err(failure(
            libc::ENOSYS,
            format!("{name}:{locator}: this tapdisk has no {name} driver yet"),
        )),
    }
}
