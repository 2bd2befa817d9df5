//! The image chain of a VBD: a leaf image above zero or more read-only parents.
//!
//! A chain is opened from a `type:/path` parameter string (tapdisk's `params`): the leaf is
//! opened, then each image names its parent until one has none. Reads start at the leaf; any
//! sectors an image reports absent are read from the next image down, and sectors absent from
//! the last image (or past a smaller parent's end) read as zeros. Writes, flushes and discards
//! go to the leaf only.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::driver::{
    open_image, Allocation, Capabilities, DiskInfo, DiskType, ImageDriver, OpenOptions, StatusRun,
    ZeroFlags, SECTOR_SIZE,
};
use crate::engine::IoFuture;
use crate::iobuf::IoBuf;

/// Longest chain we follow before assuming a parent loop.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Longest image type name accepted in a `type:path` string (as tapdisk).
const MAX_TYPE_NAME: usize = 31;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Splits a `type:/path` string at its first colon.
///
/// Unknown type names give `ENOENT` (as tapdisk); an empty, relative or missing path gives
/// `EINVAL` (the daemon runs in `/`, so a relative path would silently mean something else).
pub fn parse_params(params: &str) -> io::Result<(DiskType, PathBuf)> {
    let (type_name, path) = params.split_once(':').ok_or_else(einval)?;
    if type_name.is_empty() || type_name.len() > MAX_TYPE_NAME {
        return Err(einval());
    }
    let disk_type = DiskType::from_name(type_name)?;
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(einval());
    }
    Ok((disk_type, path.to_path_buf()))
}

/// Read and write counters of one image (`hits` and `fail` in stats).
#[derive(Debug, Default)]
pub struct ImageCounters {
    /// Requests served: `[reads, writes]`.
    pub hits: [AtomicU64; 2],
    /// Requests failed: `[reads, writes]`.
    pub fail: [AtomicU64; 2],
}

const READ: usize = 0;
const WRITE: usize = 1;

impl ImageCounters {
    fn count<T>(&self, direction: usize, result: &io::Result<T>) {
        let counter = if result.is_ok() {
            &self.hits
        } else {
            &self.fail
        };
        counter[direction].fetch_add(1, Ordering::Relaxed);
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

/// The open images of one VBD, leaf first.
#[derive(Debug)]
pub struct ImageChain {
    images: Vec<Image>,
}

impl ImageChain {
    /// Opens the chain described by `params` (`type:/path`).
    pub fn open(params: &str, options: OpenOptions) -> io::Result<Self> {
        let (disk_type, path) = parse_params(params)?;
        let leaf = open_image(disk_type, &path, options)?;
        let mut images = vec![Image {
            driver: leaf,
            counters: ImageCounters::default(),
        }];
        while let Some(link) = images.last().and_then(|image| image.driver.parent()) {
            if images.len() >= MAX_CHAIN_DEPTH {
                tracing::error!(params, "image chain deeper than {MAX_CHAIN_DEPTH}");
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let parent_options = OpenOptions {
                read_only: true,
                shareable: true,
                ..options
            };
            let parent =
                open_image(link.disk_type, &link.path, parent_options).inspect_err(|e| {
                    tracing::error!(parent = %link.path.display(), "cannot open parent image: {e}");
                })?;
            if let Some(child) = images.last() {
                child.driver.validate_parent(parent.as_ref())?;
            }
            images.push(Image {
                driver: parent,
                counters: ImageCounters::default(),
            });
        }
        Ok(Self { images })
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
        Ok(Self { images })
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

    /// Reads `buf.len()` bytes from `sector` through the chain.
    pub fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.read_at_level(0, sector, buf)
    }

    fn read_at_level(&self, level: usize, sector: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let Some(image) = self.images.get(level) else {
                buf.as_mut_slice().fill(0);
                return Ok(buf);
            };
            let total = buf.len() as u64 / SECTOR_SIZE;
            let size = image.driver.info().sectors;
            // Sectors past a (smaller) parent's end read as zeros.
            let inside = size.saturating_sub(sector).min(total);
            if inside < total {
                let keep = usize::try_from(inside * SECTOR_SIZE).map_err(|_| einval())?;
                if inside == 0 {
                    buf.as_mut_slice().fill(0);
                    return Ok(buf);
                }
                let mut head = IoBuf::zeroed(keep);
                head = self.read_at_level(level, sector, head).await?;
                buf.as_mut_slice()[..keep].copy_from_slice(head.as_slice());
                let len = buf.len();
                buf.zero_range(keep..len);
                return Ok(buf);
            }
            let result = image.driver.read(sector, buf).await;
            image.counters.count(READ, &result);
            let outcome = result?;
            let mut buf = outcome.buf;
            for range in outcome.absent {
                let start = usize::try_from(range.start * SECTOR_SIZE).map_err(|_| einval())?;
                let end = usize::try_from(range.end * SECTOR_SIZE).map_err(|_| einval())?;
                if start >= end || end > buf.len() {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                let part = IoBuf::zeroed(end - start);
                let part = self
                    .read_at_level(level + 1, sector + range.start, part)
                    .await?;
                buf.as_mut_slice()[start..end].copy_from_slice(part.as_slice());
            }
            Ok(buf)
        })
    }

    /// Writes `buf` at `sector` into the leaf.
    pub async fn write(&self, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let leaf = self.leaf();
        let result = leaf.driver.write(sector, buf).await;
        leaf.counters.count(WRITE, &result);
        result
    }

    /// Flushes the leaf (parents are read-only).
    pub async fn flush(&self) -> io::Result<()> {
        self.leaf().driver.flush().await
    }

    /// Discards sectors of the leaf.
    pub async fn discard(&self, sector: u64, count: u64) -> io::Result<()> {
        self.leaf().driver.discard(sector, count).await
    }

    /// Optional operations of the chain: the leaf's, except that zeroing without writing
    /// data needs a single-image chain (a deallocated leaf sector would show the parent).
    pub fn capabilities(&self) -> Capabilities {
        let mut capabilities = self.leaf().driver.capabilities();
        if self.images.len() > 1 {
            capabilities.write_zeroes = false;
        }
        capabilities
    }

    /// Zeroes sectors of the leaf without writing data; `EOPNOTSUPP` when the chain or the
    /// leaf driver cannot.
    pub async fn write_zeroes(&self, sector: u64, count: u64, flags: ZeroFlags) -> io::Result<()> {
        if self.images.len() > 1 {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.leaf().driver.write_zeroes(sector, count, flags).await
    }

    /// Allocation of `count` sectors at `sector`, resolved through the chain: every run is
    /// `Data` or `Zero` (sectors absent everywhere are zero).
    pub fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
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
                    match resolved.last_mut() {
                        Some(last) if last.state == piece.state => last.sectors += piece.sectors,
                        _ => resolved.push(piece),
                    }
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
    fn parses_params_strings() {
        let (t, p) = parse_params("aio:/tmp/disk.img").unwrap();
        assert_eq!(t, DiskType::Aio);
        assert_eq!(p, Path::new("/tmp/disk.img"));
        let (_, p) = parse_params("aio:/a:b").unwrap();
        assert_eq!(p, Path::new("/a:b"));
        let errno = |s: &str| parse_params(s).unwrap_err().raw_os_error();
        assert_eq!(errno("bogus:/x"), Some(libc::ENOENT));
        assert_eq!(errno("aio:relative.img"), Some(libc::EINVAL));
        assert_eq!(errno("aio:"), Some(libc::EINVAL));
        assert_eq!(errno("/no/type"), Some(libc::EINVAL));
        assert_eq!(errno(":/x"), Some(libc::EINVAL));
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
        let hits = &chain.images()[0].counters.hits;
        assert_eq!(hits[READ].load(Ordering::Relaxed), 1);
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
