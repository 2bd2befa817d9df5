//! Byte-addressed access to a VBD, as a FUSE file needs it.
//!
//! The VBD works in whole 512-byte sectors; a FUSE file may be read or written at any byte.
//! [`ByteDisk`] clamps requests to the disk's end (like a block device: a read past the end
//! is short, a write starting past it fails with `ENOSPC`), reads the covering sectors for an
//! unaligned read, and does read-modify-write of the partial first and last sectors of an
//! unaligned write.
//!
//! Serialisation: a read-modify-write takes an exclusive lock, every other write (and every
//! discard) takes it shared. So a read-modify-write never interleaves with another write that
//! could touch the sectors it is rewriting, while aligned writes (the loop device only sends
//! those) still run concurrently with each other. Reads take no lock: a sector is rewritten
//! whole with either its old or its new bytes.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use crate::driver::SECTOR_SIZE;
use crate::iobuf::IoBuf;
use crate::vbd::Vbd;

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Rounds `offset` down to a sector boundary.
fn floor_sector(offset: u64) -> u64 {
    offset - offset % SECTOR_SIZE
}

/// Rounds `offset` up to a sector boundary (saturating at the largest boundary).
fn ceil_sector(offset: u64) -> u64 {
    match offset % SECTOR_SIZE {
        0 => offset,
        rest => offset
            .checked_add(SECTOR_SIZE - rest)
            .unwrap_or_else(|| floor_sector(u64::MAX)),
    }
}

/// Converts a byte count that fits a request buffer to `usize`.
fn buffer_len(bytes: u64) -> io::Result<usize> {
    usize::try_from(bytes).map_err(|_| errno(libc::EINVAL))
}

/// The parts of a byte range `[start, end)`: the whole sectors inside it and the partial
/// sectors at its edges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Bytes before the first sector boundary inside the range (empty when aligned).
    pub head: Range<u64>,
    /// Whole sectors, as a byte range (may be empty).
    pub inner: Range<u64>,
    /// Bytes after the last sector boundary inside the range (empty when aligned).
    pub tail: Range<u64>,
}

/// Splits `[start, end)` into partial head, whole sectors and partial tail.
pub fn split(start: u64, end: u64) -> Split {
    let inner_start = ceil_sector(start).min(end);
    let inner_end = floor_sector(end).max(inner_start);
    Split {
        head: start..inner_start,
        inner: inner_start..inner_end,
        tail: inner_end..end,
    }
}

/// A VBD seen as a file of `size` bytes.
#[derive(Debug)]
pub struct ByteDisk {
    vbd: Arc<Vbd>,
    size: u64,
    /// Shared by plain writes and discards, exclusive for read-modify-write.
    rmw: tokio::sync::RwLock<()>,
}

impl ByteDisk {
    /// Wraps `vbd`, whose disk is `size` bytes (a multiple of 512).
    pub fn new(vbd: Arc<Vbd>, size: u64) -> Self {
        Self {
            vbd,
            size,
            rmw: tokio::sync::RwLock::new(()),
        }
    }

    /// The disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The VBD.
    pub fn vbd(&self) -> &Arc<Vbd> {
        &self.vbd
    }

    /// Reads up to `len` bytes at `offset`. Returns the buffer read and the range of it that
    /// holds the requested bytes (shorter at the end of the disk, empty past it).
    pub async fn read(&self, offset: u64, len: u64) -> io::Result<(IoBuf, Range<usize>)> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok((IoBuf::zeroed(0), 0..0));
        }
        let first = floor_sector(offset);
        let last = ceil_sector(end);
        let buf = IoBuf::zeroed(buffer_len(last - first)?);
        let buf = self.vbd.read(first / SECTOR_SIZE, buf).await?;
        let start = buffer_len(offset - first)?;
        Ok((buf, start..start + buffer_len(end - offset)?))
    }

    /// Writes `data` at `offset`; returns the bytes written (fewer at the end of the disk).
    pub async fn write(&self, offset: u64, data: IoBuf) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= self.size {
            return Err(errno(libc::ENOSPC));
        }
        let end = offset.saturating_add(data.len() as u64).min(self.size);
        let written = buffer_len(end - offset)?;
        if offset % SECTOR_SIZE == 0 && end % SECTOR_SIZE == 0 {
            let _shared = self.rmw.read().await;
            let data = if written == data.len() {
                data
            } else {
                IoBuf::copy_from(&data.as_slice()[..written])
            };
            self.vbd.write(offset / SECTOR_SIZE, data).await?;
        } else {
            self.read_modify_write(offset, &data.as_slice()[..written])
                .await?;
        }
        Ok(written)
    }

    /// Writes `data` at the unaligned `offset` through the sectors covering it.
    async fn read_modify_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let first = floor_sector(offset);
        let last = ceil_sector(end);
        let _exclusive = self.rmw.write().await;
        let mut buf = IoBuf::zeroed(buffer_len(last - first)?);
        let sector_len = buffer_len(SECTOR_SIZE)?;
        let head_partial = offset % SECTOR_SIZE != 0;
        let tail_partial = end % SECTOR_SIZE != 0;
        let tail_sector = floor_sector(end);
        if head_partial {
            let head = self
                .vbd
                .read(first / SECTOR_SIZE, IoBuf::zeroed(sector_len))
                .await?;
            buf.as_mut_slice()[..sector_len].copy_from_slice(head.as_slice());
        }
        if tail_partial && !(head_partial && tail_sector == first) {
            let tail = self
                .vbd
                .read(tail_sector / SECTOR_SIZE, IoBuf::zeroed(sector_len))
                .await?;
            let at = buffer_len(tail_sector - first)?;
            buf.as_mut_slice()[at..at + sector_len].copy_from_slice(tail.as_slice());
        }
        let at = buffer_len(offset - first)?;
        buf.as_mut_slice()[at..at + data.len()].copy_from_slice(data);
        self.vbd.write(first / SECTOR_SIZE, buf).await
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.vbd.flush().await
    }

    /// Makes `[offset, offset + len)` read as zeros (clamped to the disk): whole sectors are
    /// discarded, partial edge sectors rewritten with zeros. Fails with `EOPNOTSUPP` when the
    /// image cannot discard.
    pub async fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let parts = split(offset, end);
        if !parts.inner.is_empty() {
            let _shared = self.rmw.read().await;
            self.vbd
                .discard(
                    parts.inner.start / SECTOR_SIZE,
                    (parts.inner.end - parts.inner.start) / SECTOR_SIZE,
                )
                .await?;
        }
        for edge in [parts.head, parts.tail] {
            if !edge.is_empty() {
                let zeros = IoBuf::zeroed(buffer_len(edge.end - edge.start)?);
                self.write(edge.start, zeros).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::OpenOptions;
    use crate::vbd::{OpenRequest, DEFAULT_REQUEST_TIMEOUT};

    const SIZE: usize = 64 * 1024;

    /// A disk over a raw image whose byte i is `i % 251`; returns the disk and the image.
    async fn disk(dir: &tempfile::TempDir) -> (ByteDisk, std::path::PathBuf) {
        let path = dir.path().join("disk.img");
        let pattern = pattern(0..SIZE);
        std::fs::write(&path, pattern).unwrap();
        let vbd = Arc::new(Vbd::new(0));
        vbd.open(OpenRequest {
            params: format!("aio:{}", path.display()),
            options: OpenOptions::default(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            log: None,
            secondary: None,
            intellicache: crate::lcache::IntelliCache::default(),
        })
        .await
        .unwrap();
        (ByteDisk::new(vbd, SIZE as u64), path)
    }

    fn pattern(range: Range<usize>) -> Vec<u8> {
        range.map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    #[test]
    fn split_finds_partial_edges() {
        assert_eq!(
            split(0, 1024),
            Split {
                head: 0..0,
                inner: 0..1024,
                tail: 1024..1024
            }
        );
        assert_eq!(
            split(100, 1500),
            Split {
                head: 100..512,
                inner: 512..1024,
                tail: 1024..1500
            }
        );
        // Inside one sector: all head.
        assert_eq!(
            split(100, 200),
            Split {
                head: 100..200,
                inner: 200..200,
                tail: 200..200
            }
        );
        // Across one boundary, no whole sector.
        assert_eq!(
            split(100, 700),
            Split {
                head: 100..512,
                inner: 512..512,
                tail: 512..700
            }
        );
        assert_eq!(ceil_sector(u64::MAX), floor_sector(u64::MAX));
    }

    #[tokio::test]
    async fn unaligned_reads_return_exact_bytes_and_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = disk(&dir).await;
        for (offset, len) in [(0u64, 512u64), (1, 1), (511, 2), (100, 5000), (4095, 4097)] {
            let (buf, range) = disk.read(offset, len).await.unwrap();
            let start = usize::try_from(offset).unwrap();
            let len = usize::try_from(len).unwrap();
            assert_eq!(
                &buf.as_slice()[range],
                pattern(start..start + len).as_slice()
            );
        }
        let (buf, range) = disk.read(SIZE as u64 - 10, 100).await.unwrap();
        assert_eq!(&buf.as_slice()[range], pattern(SIZE - 10..SIZE).as_slice());
        let (_, range) = disk.read(SIZE as u64, 100).await.unwrap();
        assert!(range.is_empty());
        let (_, range) = disk.read(u64::MAX - 1, 100).await.unwrap();
        assert!(range.is_empty());
    }

    #[tokio::test]
    async fn unaligned_writes_keep_neighbouring_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = disk(&dir).await;
        let mut model = pattern(0..SIZE);
        for (offset, len, fill) in [
            (1usize, 1usize, 0xa1u8),
            (511, 2, 0xa2),
            (700, 3000, 0xa3),
            (4096, 512, 0xa4),
            (5000, 100, 0xa5),
            (SIZE - 3, 3, 0xa6),
        ] {
            let written = disk
                .write(offset as u64, IoBuf::copy_from(&vec![fill; len]))
                .await
                .unwrap();
            assert_eq!(written, len);
            model[offset..offset + len].fill(fill);
        }
        disk.flush().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), model);
    }

    #[tokio::test]
    async fn writes_past_the_end_are_short_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = disk(&dir).await;
        let written = disk
            .write(SIZE as u64 - 100, IoBuf::copy_from(&[7; 300]))
            .await
            .unwrap();
        assert_eq!(written, 100);
        let error = disk
            .write(SIZE as u64, IoBuf::copy_from(&[7; 1]))
            .await
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(disk.write(SIZE as u64, IoBuf::zeroed(0)).await.unwrap(), 0);
        let image = std::fs::read(&path).unwrap();
        assert_eq!(image.len(), SIZE);
        assert!(image[SIZE - 100..].iter().all(|&b| b == 7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_partial_writes_to_one_sector_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = disk(&dir).await;
        let disk = Arc::new(disk);
        // 64 writers each own 8 bytes of sector 2; aligned writers hammer sector 3 meanwhile.
        let mut tasks = Vec::new();
        for writer in 0..64u8 {
            let disk = Arc::clone(&disk);
            tasks.push(tokio::spawn(async move {
                let offset = 1024 + u64::from(writer) * 8;
                disk.write(offset, IoBuf::copy_from(&[writer; 8]))
                    .await
                    .unwrap();
                disk.write(1536, IoBuf::copy_from(&[0xee; 512]))
                    .await
                    .unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let image = std::fs::read(&path).unwrap();
        for writer in 0..64usize {
            let at = 1024 + writer * 8;
            assert_eq!(image[at..at + 8], [u8::try_from(writer).unwrap(); 8]);
        }
        assert!(image[1536..2048].iter().all(|&b| b == 0xee));
        assert_eq!(image[..1024], pattern(0..1024));
        assert_eq!(image[2048..], pattern(2048..SIZE));
    }

    #[tokio::test]
    async fn zero_discards_whole_sectors_and_rewrites_edges() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = disk(&dir).await;
        let mut model = pattern(0..SIZE);
        for (offset, len) in [
            (100usize, 5000usize),
            (8192, 4096),
            (20_000, 10),
            (SIZE - 50, 500),
        ] {
            disk.zero(offset as u64, len as u64).await.unwrap();
            let end = (offset + len).min(SIZE);
            model[offset..end].fill(0);
        }
        disk.flush().await.unwrap();
        let image = std::fs::read(&path).unwrap();
        assert_eq!(image.len(), SIZE);
        assert_eq!(image, model);
        let (buf, range) = disk.read(0, SIZE as u64).await.unwrap();
        assert_eq!(&buf.as_slice()[range], model.as_slice());
    }
}
