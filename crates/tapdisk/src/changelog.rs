//! The changed-block-tracking (CBT) log layer of a VBD: tapdisk's `log` driver, which sits
//! above the leaf image (`tap-ctl open -C LOG`, `tap-ctl unpause -c LOG`) and records in the
//! log's bitmap every 64 KiB block that a write, discard or zeroing touches. The file format
//! is the `cbt` crate's; the storage manager reads the log with `cbt-util`.
//!
//! # When a block counts as changed
//!
//! A request's blocks are marked **before the request is issued** to the image, and the
//! request fails (with the error of the log's write) if they cannot be: a write that reaches
//! the disk always has its mark in the log, while a write that fails after its mark leaves a
//! spurious one (allowed: a backup then copies a block that did not change).
//!
//! # Durability
//!
//! The bitmap is held in memory as well as in the file. A block already marked costs one
//! atomic load and no system call, which is the common case (a guest rewrites the blocks it
//! wrote before). The first write to a block writes the changed bitmap bytes into the file
//! (`pwrite`, into the page cache) before the data write is issued, so the mark survives any
//! crash of tapdisk, `kill -9` included, as the C driver's mapped bitmap does. Marks reach
//! stable storage (`fdatasync` of the log) with every flush of the VBD, so after a flush the
//! marks of every write completed before it are as durable as the data; and at pause and
//! close. A power loss can lose marks of writes the guest never flushed: the storage
//! manager covers that case with the log's `consistent` flag, which it clears before the
//! open and sets after the close, and a log found inconsistent is dropped (CBT is reset).
//!
//! # The header
//!
//! As the C driver, this layer never reads more of the header than the disk size (checked
//! against the disk) and never writes it: the `consistent` flag and the chain links belong
//! to the storage manager.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::driver::{open_image_file, SECTOR_SIZE};
use crate::error::failure;
use crate::image::ImageCounters;

/// The open log of a VBD.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    file: Arc<File>,
    /// Disk size in bytes (the header's, checked against the disk's).
    size: u64,
    /// The bitmap; a bit is set here only once it is in the file.
    bits: Vec<AtomicU8>,
    /// Serialises writes of bitmap bytes to the file, so each writes the latest bits.
    writing: Mutex<()>,
    /// Bits were written to the file since its last `fdatasync`.
    unsynced: AtomicBool,
    /// Serialises `fdatasync`s, so a flush never returns while an earlier one is running.
    syncing: tokio::sync::Mutex<()>,
    /// Requests that went through this layer (`tap-ctl stats` shows the log as an image).
    counters: ImageCounters,
}

/// A bad log, named.
fn bad_log(path: &Path, what: impl std::fmt::Display) -> io::Error {
    failure(libc::EINVAL, format!("CBT log {}: {what}", path.display()))
}

impl ChangeLog {
    /// Opens the log at `path` for a disk of `sectors` sectors: the file (a regular file or
    /// a block device, e.g. an LV) must be a log of a disk of that size with its whole
    /// bitmap present. Errors name the file and the problem: the open's errno, or `EINVAL`
    /// for a FIFO or other non-file, a short file or another disk's log.
    pub fn open(path: &Path, sectors: u64) -> io::Result<Self> {
        // As an image file: a FIFO or a device waiting for a peer is refused, never waited on.
        let file = open_image_file(path, true, false).map_err(|e| {
            crate::error::with_context(e, format!("cannot open the CBT log {}", path.display()))
        })?;
        let mut header = [0u8; cbt::HEADER_LEN];
        let got = read_at_most(&file, &mut header, 0)
            .map_err(|e| bad_log(path, format!("reading the header: {e}")))?;
        let header =
            cbt::LogHeader::parse(&header[..got]).map_err(|e| bad_log(path, e.to_string()))?;
        let disk_bytes = sectors.saturating_mul(SECTOR_SIZE);
        if header.size.div_ceil(SECTOR_SIZE) != sectors {
            return Err(bad_log(
                path,
                format!(
                    "it tracks a disk of {} bytes, this disk has {disk_bytes}",
                    header.size
                ),
            ));
        }
        let len = cbt::bitmap_buffer_len(header.size).map_err(|e| bad_log(path, e))?;
        let mut bitmap = vec![0u8; len];
        let got = read_at_most(&file, &mut bitmap, cbt::HEADER_LEN as u64)
            .map_err(|e| bad_log(path, format!("reading the bitmap: {e}")))?;
        header
            .check_len((cbt::HEADER_LEN + got) as u64)
            .map_err(|e| bad_log(path, e))?;
        tracing::debug!(
            log = %path.display(),
            consistent = header.consistent,
            size = header.size,
            "CBT log opened"
        );
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            size: header.size,
            bits: bitmap.into_iter().map(AtomicU8::new).collect(),
            writing: Mutex::new(()),
            unsynced: AtomicBool::new(false),
            syncing: tokio::sync::Mutex::new(()),
            counters: ImageCounters::default(),
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sector counters, as an image's: sectors marked (writes, discards, zeroing) and read
    /// through the log (counted by the chain).
    pub fn counters(&self) -> &ImageCounters {
        &self.counters
    }

    /// Marks the blocks of `count` sectors at `sector` changed, in the file, before the
    /// request that changes them is issued. Already marked blocks cost no system call.
    pub fn mark(&self, sector: u64, count: u64) -> io::Result<()> {
        let blocks = cbt::blocks_of(
            sector.saturating_mul(SECTOR_SIZE),
            count.saturating_mul(SECTOR_SIZE),
        );
        if self.all_set(blocks.clone()) {
            return Ok(());
        }
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let masks: Vec<(usize, u8)> = cbt::byte_masks(blocks)
            .map(|(byte, mask)| {
                usize::try_from(byte)
                    .ok()
                    .filter(|index| *index < self.bits.len())
                    .map(|index| (index, mask))
                    .ok_or_else(|| {
                        failure(
                            libc::EINVAL,
                            format!(
                                "CBT log {}: sectors {sector}+{count} are past its disk of {} bytes",
                                self.path.display(),
                                self.size
                            ),
                        )
                    })
            })
            .collect::<io::Result<_>>()?;
        let Some(&(first, _)) = masks.first() else {
            return Ok(());
        };
        let bytes: Vec<u8> = masks
            .iter()
            .map(|&(index, mask)| self.bits[index].load(Ordering::Relaxed) | mask)
            .collect();
        let offset = (cbt::HEADER_LEN + first) as u64;
        self.file.write_all_at(&bytes, offset).map_err(|e| {
            crate::error::with_context(
                e,
                format!(
                    "marking changed blocks in the CBT log {}",
                    self.path.display()
                ),
            )
        })?;
        for (index, mask) in masks {
            self.bits[index].fetch_or(mask, Ordering::Release);
        }
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether every block of `blocks` is marked (in the file) already.
    fn all_set(&self, blocks: std::ops::Range<u64>) -> bool {
        cbt::byte_masks(blocks).all(|(byte, mask)| {
            usize::try_from(byte)
                .ok()
                .and_then(|index| self.bits.get(index))
                .is_some_and(|bits| bits.load(Ordering::Acquire) & mask == mask)
        })
    }

    /// Makes every mark written so far durable (`fdatasync` of the log, when anything was
    /// marked since the last one).
    pub async fn sync(&self) -> io::Result<()> {
        let _syncing = self.syncing.lock().await;
        if !self.unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let file = Arc::clone(&self.file);
        let synced = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|join_error| Err(io::Error::other(join_error)));
        if let Err(e) = synced {
            self.unsynced.store(true, Ordering::Release);
            return Err(crate::error::with_context(
                e,
                format!("syncing the CBT log {}", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Whether marks were written since the last sync.
    #[cfg(test)]
    pub(crate) fn has_unsynced_marks(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    /// The changed and unchanged extents of bytes `[offset, offset + len)` of the disk.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<cbt::Extent> {
        cbt::extents(self.size, offset, len, |byte| {
            usize::try_from(byte)
                .ok()
                .and_then(|index| self.bits.get(index))
                .map_or(0, |bits| bits.load(Ordering::Acquire))
        })
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the bytes read.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{errno_of, message_of};

    /// A log of a disk of `blocks` 64 KiB blocks, with `set` blocks marked.
    fn log_file(dir: &tempfile::TempDir, blocks: u64, set: &[u64]) -> PathBuf {
        let mut log = cbt::LogFile::new(blocks * cbt::BLOCK_SIZE).unwrap();
        for block in set {
            log.bitmap.set_blocks(*block..*block + 1);
        }
        let path = dir.path().join("disk.cbtlog");
        std::fs::write(&path, log.to_bytes()).unwrap();
        path
    }

    const SECTORS_PER_BLOCK: u64 = cbt::BLOCK_SIZE / SECTOR_SIZE;

    #[tokio::test]
    async fn marks_reach_the_file_before_mark_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_file(&dir, 20, &[3]);
        let log = ChangeLog::open(&path, 20 * SECTORS_PER_BLOCK).unwrap();
        // One sector in block 1, a range across blocks 7..=9.
        log.mark(SECTORS_PER_BLOCK + 5, 1).unwrap();
        log.mark(8 * SECTORS_PER_BLOCK - 1, SECTORS_PER_BLOCK + 2)
            .unwrap();
        let on_disk = cbt::LogFile::parse(&std::fs::read(&path).unwrap()).unwrap();
        let marked: Vec<u64> = (0..20).filter(|b| on_disk.bitmap.is_set(*b)).collect();
        assert_eq!(marked, [1, 3, 7, 8, 9]);
        // The header is never written.
        assert_eq!(on_disk.header, cbt::LogHeader::new(20 * cbt::BLOCK_SIZE));
        // Extents come from the same bits.
        let changed: Vec<(u64, u64)> = log
            .extents(0, u64::MAX)
            .into_iter()
            .filter(|extent| extent.changed)
            .map(|extent| {
                (
                    extent.offset / cbt::BLOCK_SIZE,
                    extent.length / cbt::BLOCK_SIZE,
                )
            })
            .collect();
        assert_eq!(changed, [(1, 1), (3, 1), (7, 3)]);
        log.sync().await.unwrap();
        assert!(!log.has_unsynced_marks());
    }

    #[tokio::test]
    async fn marked_blocks_cost_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_file(&dir, 8, &[2]);
        let log = ChangeLog::open(&path, 8 * SECTORS_PER_BLOCK).unwrap();
        // Replace the file: a write to it would show, a skipped one would not.
        std::fs::write(&path, [0xaau8; 49]).unwrap();
        log.mark(2 * SECTORS_PER_BLOCK, 8).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [0xaau8; 49]);
        assert!(!log.has_unsynced_marks());
        // Nothing to sync, so no fdatasync either.
        log.sync().await.unwrap();
    }

    #[test]
    fn bad_logs_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.cbtlog");
        let error = ChangeLog::open(&missing, 128).unwrap_err();
        assert_eq!(errno_of(&error), libc::ENOENT);
        assert_eq!(
            message_of(&error),
            format!("cannot open the CBT log {}", missing.display())
        );

        let path = log_file(&dir, 4, &[]);
        // Another disk's log.
        let error = ChangeLog::open(&path, 5 * SECTORS_PER_BLOCK).unwrap_err();
        assert_eq!(errno_of(&error), libc::EINVAL);
        assert_eq!(
            message_of(&error),
            format!(
                "CBT log {}: it tracks a disk of 262144 bytes, this disk has 327680",
                path.display()
            )
        );
        // A truncated header, a truncated bitmap.
        std::fs::write(&path, [0u8; 30]).unwrap();
        let error = ChangeLog::open(&path, 4 * SECTORS_PER_BLOCK).unwrap_err();
        assert!(message_of(&error).contains("shorter than the 48-byte CBT log header"));
        let mut header = cbt::LogHeader::new(40 * cbt::BLOCK_SIZE).encode().to_vec();
        std::fs::write(&path, &header).unwrap();
        let error = ChangeLog::open(&path, 40 * SECTORS_PER_BLOCK).unwrap_err();
        assert_eq!(errno_of(&error), libc::EINVAL);
        assert!(
            message_of(&error)
                .contains("48 bytes are shorter than a CBT log of a 2621440-byte disk"),
            "{}",
            message_of(&error)
        );
        // A disk that ends inside a block: the header's size rounds up to the sectors.
        header[40..48].copy_from_slice(&(3 * cbt::BLOCK_SIZE + 100).to_le_bytes());
        header.push(0);
        std::fs::write(&path, &header).unwrap();
        assert!(ChangeLog::open(&path, 3 * SECTORS_PER_BLOCK + 1).is_ok());
    }
}
