//! The `aio` driver: a raw image file or block device, byte for byte.
//!
//! Opened with `O_DIRECT` unless asked not to; where the filesystem refuses `O_DIRECT` (tmpfs,
//! some FUSE filesystems) the file is reopened through the page cache and a notice is logged.
//! The size is taken from the file (or the block device) at open time.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    DiskInfo, DiskType, ImageDriver, OpenOptions, ReadOutcome, StatusRun, SECTOR_SIZE,
    VDISK_READONLY,
};
use crate::engine::sync::PreadEngine;
use crate::engine::{IoEngine, IoFuture};
use crate::iobuf::IoBuf;

/// A raw image.
#[derive(Debug)]
pub struct AioImage {
    path: PathBuf,
    info: DiskInfo,
    engine: PreadEngine,
    read_only: bool,
    direct: bool,
    block_device: bool,
}

/// Opens `path` with or without `O_DIRECT`.
fn open_file(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let mut options = FsOpenOptions::new();
    options.read(true).write(!read_only);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

impl AioImage {
    /// Opens a raw image.
    pub fn open(path: &Path, options: OpenOptions) -> io::Result<Self> {
        let read_only = options.read_only;
        let mut direct = !options.no_o_direct;
        let mut file = match open_file(path, read_only, direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "O_DIRECT refused by the filesystem; using buffered I/O");
                direct = false;
                open_file(path, read_only, false)?
            }
            other => other?,
        };
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
        let info = DiskInfo {
            sectors: bytes / SECTOR_SIZE,
            sector_size,
            info: if read_only { VDISK_READONLY } else { 0 },
        };
        Ok(Self {
            path: path.to_path_buf(),
            info,
            engine: PreadEngine::new(file),
            read_only,
            direct,
            block_device,
        })
    }

    /// True when the image is accessed with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

fn byte_offset(sector: u64) -> io::Result<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
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

    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            self.engine.write_at(buf, byte_offset(sector)?).await
        })
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
            self.engine
                .punch_hole(byte_offset(sector)?, byte_offset(count)?)
                .await
        })
    }

    fn block_status(&self, _sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        Box::pin(async move {
            Ok(vec![StatusRun {
                sectors: count,
                state: super::Allocation::Data,
            }])
        })
    }

    fn stats_json(&self) -> Option<String> {
        Some(format!(
            "{{ \"reqs\": {{ \"max\": {}, \"pending\": {} }} }}",
            crate::vbd::MAX_REQUESTS,
            self.engine.pending()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn missing_file_is_enoent() {
        let err =
            AioImage::open(Path::new("/nonexistent/disk.img"), OpenOptions::default()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }
}
