//! The `aio` driver: a raw image file or block device, byte for byte.
//!
//! Opened with `O_DIRECT` unless asked not to; where the filesystem refuses `O_DIRECT` (tmpfs,
//! some FUSE filesystems) the file is reopened through the page cache and a notice is logged.
//! The size is taken from the file (or the block device) at open time.
//!
//! A fully allocated image on tmpfs or ramfs is also mapped into memory, so that frontends
//! can let the kernel copy read data straight from its pages ([`crate::engine::mapped`]).
//! The first discard or zeroing (which may punch holes) ends that for the image's lifetime.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{
    push_status, Allocation, Capabilities, DiskInfo, DiskType, DriverDetail, DriverStats,
    ImageDriver, OpenOptions, ReadOutcome, StatusRun, ZeroFlags, SECTOR_SIZE,
};
use crate::engine::mapped::{self, FileMapping, MappedBytes};
use crate::engine::{open_engine, IoEngine, IoFuture};
use crate::iobuf::IoBuf;

/// A raw image.
#[derive(Debug)]
pub struct AioImage {
    path: PathBuf,
    info: DiskInfo,
    /// The open file, shared with the engine (allocation queries use it directly).
    file: Arc<File>,
    engine: Box<dyn IoEngine>,
    /// The file mapped into memory, for [`ImageDriver::mapped`] (memory filesystems only).
    mapping: Option<Arc<FileMapping>>,
    /// Cleared when this image may have holes the mapping would fill (after a discard).
    mapping_usable: AtomicBool,
    read_only: bool,
    direct: bool,
    block_device: bool,
}

impl AioImage {
    /// Opens a raw image.
    pub fn open(path: &Path, options: OpenOptions) -> io::Result<Self> {
        Self::open_file(path, options).map_err(|e| crate::error::with_context(e, path.display()))
    }

    fn open_file(path: &Path, options: OpenOptions) -> io::Result<Self> {
        let read_only = options.read_only;
        let (mut file, direct) = super::open_for_io(path, &options)?;
        let metadata = file.metadata()?;
        let block_device = metadata.file_type().is_block_device();
        let (bytes, sector_size) = if block_device {
            let size = file.seek(SeekFrom::End(0))?;
            (
                size,
                rustix::fs::ioctl_blksszget(&file).map_err(io::Error::from)?,
            )
        } else if metadata.is_file() {
            (metadata.len(), 512)
        } else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let info = DiskInfo::new(bytes, sector_size, read_only);
        let mapping = if !block_device && options.io.mapped_reads && mapped::worth_mapping(&file) {
            match FileMapping::new(&file, bytes) {
                Ok(mapping) => Some(Arc::new(mapping)),
                Err(e) => {
                    tracing::info!(path = %path.display(), "image not mapped, reads copy twice: {e}");
                    None
                }
            }
        } else {
            None
        };
        let file = Arc::new(file);
        Ok(Self {
            path: path.to_path_buf(),
            info,
            engine: open_engine(Arc::clone(&file), !direct, options.io.engine),
            mapping_usable: AtomicBool::new(mapping.is_some()),
            mapping,
            file,
            read_only,
            direct,
            block_device,
        })
    }

    /// True when the image is accessed with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True while reads may be served from the image's memory mapping.
    pub fn is_mapped(&self) -> bool {
        self.mapping_usable.load(Ordering::Relaxed)
    }

    /// Stops mapped reads before holes may appear (a read fault would fill them again).
    fn stop_mapped_reads(&self) {
        if self.mapping_usable.swap(false, Ordering::Relaxed) {
            tracing::debug!(path = %self.path.display(), "mapped reads off: the image may get holes");
        }
    }
}

fn byte_offset(sector: u64) -> io::Result<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Errors meaning "this file or filesystem cannot do that operation".
fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY)
    )
}

/// Allocation of the bytes `[start, end)` of a regular file from `SEEK_DATA`/`SEEK_HOLE`, as
/// runs of whole sectors relative to `start` (which is sector aligned). A sector that holds
/// any data counts as data. Filesystems without hole support report everything as data.
fn allocation_runs(file: &File, start: u64, end: u64) -> io::Result<Vec<StatusRun>> {
    use rustix::fs::{seek, SeekFrom};
    let base = start / SECTOR_SIZE;
    let mut runs: Vec<StatusRun> = Vec::new();
    let mut covered = base;
    let mut push = |runs: &mut Vec<StatusRun>, from: u64, to: u64, state: Allocation| {
        // Data boundaries round outwards, hole boundaries inwards.
        let (first, last) = match state {
            Allocation::Data => (from / SECTOR_SIZE, to.div_ceil(SECTOR_SIZE)),
            _ => (from.div_ceil(SECTOR_SIZE), to / SECTOR_SIZE),
        };
        let first = first.max(covered);
        if last <= first {
            return;
        }
        covered = last;
        push_status(
            runs,
            StatusRun {
                sectors: last - first,
                state,
            },
        );
    };
    let mut at = start;
    while at < end {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(data) => data.min(end),
            // No data at or after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) if is_unsupported(&io::Error::from(e)) || e == rustix::io::Errno::INVAL => {
                push(&mut runs, at, end, Allocation::Data);
                break;
            }
            Err(e) => return Err(io::Error::from(e)),
        };
        if data > at {
            push(&mut runs, at, data, Allocation::Zero);
        }
        if data >= end {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(hole) => hole.min(end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(io::Error::from(e)),
        };
        push(&mut runs, data, hole.max(data + 1), Allocation::Data);
        at = hole.max(data + 1);
    }
    // Sectors past the file's end (none for a raw image) or lost to rounding: fill so the
    // runs always cover the whole query.
    let wanted = (end - start) / SECTOR_SIZE;
    let have = runs.iter().map(|run| run.sectors).sum::<u64>();
    if have < wanted {
        push_status(
            &mut runs,
            StatusRun {
                sectors: wanted - have,
                state: Allocation::Zero,
            },
        );
    }
    Ok(runs)
}

impl ImageDriver for AioImage {
    fn disk_type(&self) -> DiskType {
        DiskType::Aio
    }

    fn info(&self) -> DiskInfo {
        self.info
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        Box::pin(async move {
            let buf = self.engine.read_at(buf, byte_offset(sector)?).await?;
            Ok(ReadOutcome {
                buf,
                absent: Vec::new(),
            })
        })
    }

    fn mapped(&self, sector: u64, len: usize) -> Option<MappedBytes> {
        if !self.is_mapped() {
            return None;
        }
        MappedBytes::new(self.mapping.as_ref()?, byte_offset(sector).ok()?, len)
    }

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        // The engine's future is the write's own: no second future around it.
        if self.read_only {
            return Box::pin(std::future::ready(Err(io::Error::from_raw_os_error(
                libc::EPERM,
            ))));
        }
        match byte_offset(sector) {
            Ok(offset) => self.engine.write_at(buf, offset),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.engine.sync_data()
    }

    fn discard(&self, sector: u64, count: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            if self.block_device {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            self.stop_mapped_reads();
            self.engine
                .punch_hole(byte_offset(sector)?, byte_offset(count)?)
                .await
        })
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            discard: writable,
            write_zeroes: writable,
            block_status: !self.block_device,
        }
    }

    fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let (offset, len) = (byte_offset(sector)?, byte_offset(count)?);
            if flags.may_deallocate && !self.block_device {
                self.stop_mapped_reads();
                // A punched hole reads as zeros and frees the space: the cheapest zeroing.
                match self.engine.punch_hole(offset, len).await {
                    Err(e) if is_unsupported(&e) => {}
                    other => return other,
                }
            }
            match self.engine.zero_range(offset, len).await {
                Err(e) if is_unsupported(&e) => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
                other => other,
            }
        })
    }

    fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        Box::pin(async move {
            if self.block_device {
                return Ok(vec![StatusRun {
                    sectors: count,
                    state: Allocation::Data,
                }]);
            }
            let file = Arc::clone(&self.file);
            let start = byte_offset(sector)?;
            let end = byte_offset(sector.saturating_add(count))?;
            tokio::task::spawn_blocking(move || allocation_runs(&file, start, end))
                .await
                .unwrap_or_else(|join_error| Err(io::Error::other(join_error)))
        })
    }

    fn stats(&self) -> Option<DriverStats> {
        Some(DriverStats::of_engine(
            &*self.engine,
            DriverDetail::Raw {
                mapped: self.is_mapped(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::VDISK_READONLY;

    #[tokio::test]
    async fn reads_and_writes_a_raw_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let image = AioImage::open(&path, OpenOptions::default()).unwrap();
        assert_eq!(image.info().sectors, 2048);
        assert_eq!(image.info().sector_size, 512);
        image
            .write(8, Arc::new(IoBuf::copy_from(&[0xab; 4096])))
            .await
            .unwrap();
        image.flush().await.unwrap();
        let out = image.read(8, IoBuf::zeroed(4096)).await.unwrap();
        assert!(out.absent.is_empty());
        assert!(out.buf.as_slice().iter().all(|b| *b == 0xab));
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[4096..8192].iter().all(|b| *b == 0xab));
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 65536]).unwrap();
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let image = AioImage::open(&path, options).unwrap();
        assert_eq!(image.info().info, VDISK_READONLY);
        let err = image
            .write(0, Arc::new(IoBuf::zeroed(512)))
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    /// A sparse 1 MiB file with data only in `[64 KiB, 128 KiB)`.
    fn sparse_image(dir: &tempfile::TempDir) -> std::path::PathBuf {
        use std::os::unix::fs::FileExt;
        let path = dir.path().join("sparse.img");
        let file = File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[0x11; 65536], 65536).unwrap();
        path
    }

    #[tokio::test]
    async fn block_status_follows_holes() {
        let dir = tempfile::tempdir().unwrap();
        let image = AioImage::open(&sparse_image(&dir), OpenOptions::default()).unwrap();
        assert!(image.capabilities().block_status);
        let runs = image.block_status(0, 2048).await.unwrap();
        let expect = |sectors, state| StatusRun { sectors, state };
        assert_eq!(
            runs,
            vec![
                expect(128, Allocation::Zero),
                expect(128, Allocation::Data),
                expect(1792, Allocation::Zero),
            ]
        );
        // A query starting inside the data run, ending inside the hole after it.
        let runs = image.block_status(200, 100).await.unwrap();
        assert_eq!(
            runs,
            vec![expect(56, Allocation::Data), expect(44, Allocation::Zero)]
        );
    }

    #[tokio::test]
    async fn write_zeroes_punches_or_keeps_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_image(&dir);
        let image = AioImage::open(&path, OpenOptions::default()).unwrap();
        let punch = ZeroFlags {
            may_deallocate: true,
        };
        image.write_zeroes(128, 64, punch).await.unwrap();
        let runs = image.block_status(128, 128).await.unwrap();
        assert_eq!(runs[0].state, Allocation::Zero);
        assert_eq!(runs[0].sectors, 64);
        image
            .write_zeroes(192, 64, ZeroFlags::default())
            .await
            .unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk.iter().all(|b| *b == 0));
        image.discard(0, 2048).await.unwrap();
        let runs = image.block_status(0, 2048).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
    }

    /// Where the kernel copies mapped bytes to in these tests.
    fn copied_out(range: &MappedBytes) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let target = tempfile::tempfile().unwrap();
        range
            .write_all_at(std::os::fd::AsFd::as_fd(&target), 0)
            .unwrap();
        let mut data = vec![0u8; range.len()];
        target.read_exact_at(&mut data, 0).unwrap();
        data
    }

    #[tokio::test]
    async fn allocated_memory_images_are_mapped_until_a_discard() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for read_only in [true, false] {
            let options = OpenOptions {
                read_only,
                ..OpenOptions::default()
            };
            let image = AioImage::open(&path, options).unwrap();
            assert!(image.is_mapped(), "read_only {read_only}");
            assert_eq!(
                image.stats().unwrap().detail,
                DriverDetail::Raw { mapped: true }
            );
            let range = image.mapped(16, 8192).unwrap();
            assert_eq!(copied_out(&range), data[8192..16384]);
            // Past the end: not mapped, the read path reports the error.
            assert!(image.mapped(127, 1024).is_none());
        }
        // Writes are seen by mapped reads (both go through the same pages).
        let image = AioImage::open(&path, OpenOptions::default()).unwrap();
        image
            .write(0, Arc::new(IoBuf::copy_from(&[0x5a; 4096])))
            .await
            .unwrap();
        assert_eq!(copied_out(&image.mapped(0, 4096).unwrap()), [0x5a; 4096]);
        // A discard punches a hole that a mapped read would fill again: no more mapping.
        image.discard(64, 8).await.unwrap();
        assert!(!image.is_mapped());
        assert!(image.mapped(0, 4096).is_none());
        assert_eq!(
            image.stats().unwrap().detail,
            DriverDetail::Raw { mapped: false }
        );
        // Opened again with the hole: not mapped.
        let image = AioImage::open(&path, OpenOptions::default()).unwrap();
        assert!(!image.is_mapped());
    }

    #[tokio::test]
    async fn images_on_storage_or_with_holes_are_not_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let image = AioImage::open(&sparse_image(&dir), OpenOptions::default()).unwrap();
        assert!(!image.is_mapped());
        assert!(image.mapped(0, 512).is_none());
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            let image = AioImage::open(&sparse_image(&dir), OpenOptions::default()).unwrap();
            assert!(!image.is_mapped());
        }
    }

    #[test]
    fn missing_file_is_enoent() {
        let err =
            AioImage::open(Path::new("/nonexistent/disk.img"), OpenOptions::default()).unwrap_err();
        assert_eq!(crate::error::errno_of(&err), libc::ENOENT);
        assert_eq!(crate::error::message_of(&err), "/nonexistent/disk.img");
    }
}
