//! I/O engines: how an image driver's file reads and writes reach the kernel.
//!
//! Drivers never call `pread`/`pwrite` themselves; they hand owned, aligned buffers to an
//! [`IoEngine`] and await the result. Two engines:
//! * [`uring::UringEngine`]: io_uring, the default where the kernel allows it;
//! * [`sync::PreadEngine`]: `pread`/`pwrite` on tokio's blocking pool (buffered reads that hit
//!   the page cache are tried inline first), the fallback and the reference in tests.
//!
//! Beside them, [`mapped`] lets the kernel copy read data straight out of an image file that
//! lives in memory.
//!
//! [`open_engine`] picks one at run time as [`IoSettings::engine`] says (`io.engine` in
//! tapdisk's configuration: `io_uring`, `pread` or `auto`, the default: io_uring when a probe
//! ring supports read, write and fsync).

pub mod mapped;
pub mod sync;
pub mod uring;

use std::fs::File;
use std::sync::OnceLock;

use std::future::Future;
use std::io;
use std::pin::Pin;

use std::sync::Arc;

use crate::iobuf::IoBuf;

/// A boxed, sendable future yielding an `io::Result`.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Positioned I/O on one open file or block device.
pub trait IoEngine: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from byte `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf>;
    /// Writes all of `buf` at byte `offset`. The buffer is shared so that a failed write can
    /// be retried without copying its data.
    fn write_at(&self, buf: Arc<IoBuf>, offset: u64) -> IoFuture<'_, ()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> IoFuture<'_, ()>;
    /// Deallocates `[offset, offset + len)` so it reads back as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Makes `[offset, offset + len)` read back as zeros while keeping it allocated
    /// (`FALLOC_FL_ZERO_RANGE`); `EOPNOTSUPP` where the filesystem cannot.
    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Requests currently submitted and not yet completed.
    fn pending(&self) -> usize;
    /// The engine's name (`io_uring`, `pread`), for stats and logs.
    fn name(&self) -> &'static str;
}

/// Lets at most one thread at a time run a blocking buffered write inline (on the calling
/// runtime worker) instead of handing it to another thread.
///
/// A buffered write is a copy into the page cache: CPU work in the kernel, serialised per
/// file by the filesystem, which io_uring (on filesystems without non-blocking buffered
/// writes, such as ext4) and the blocking pool can only move to another thread at the
/// price of two context switches. Bounding inline writers to one keeps every other runtime
/// worker free if a write does block (dirty-page throttling, slow storage).
#[derive(Debug, Default)]
pub struct InlineWriteGate {
    busy: std::sync::atomic::AtomicBool,
}

impl InlineWriteGate {
    /// Runs `write` inline unless another thread is inside; `None` when busy.
    pub fn try_run<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        use std::sync::atomic::Ordering;
        if self.busy.swap(true, Ordering::Acquire) {
            return None;
        }
        let result = write();
        self.busy.store(false, Ordering::Release);
        Some(result)
    }
}

/// How reads of one file may run on the calling thread instead of through the engine.
///
/// A buffered read that the page cache can serve is a memory copy: handing it to another
/// thread (the blocking pool, io_uring's workers) costs more than the copy itself.
/// * files of filesystems that live in memory (tmpfs, ramfs), which refuse `RWF_NOWAIT` and
///   which io_uring therefore hands to its worker threads, are read with plain `pread`,
///   opened with `O_DIRECT` or not: their reads never wait for a device (up to 128 KiB;
///   larger copies go to the engine's threads, in parallel with the caller);
/// * other files opened with `O_DIRECT` never read inline (such a read waits for storage);
/// * other buffered files try `preadv2(RWF_NOWAIT)`, which the kernel completes only when no
///   storage I/O is needed.
#[derive(Debug)]
pub struct InlineReads {
    mode: std::sync::atomic::AtomicU8,
}

/// [`InlineReads`] modes.
const INLINE_OFF: u8 = 0;
const INLINE_NOWAIT: u8 = 1;
const INLINE_MEMORY: u8 = 2;

/// Largest read of a memory filesystem run inline.
const MAX_INLINE_MEMORY_READ: usize = 128 * 1024;

/// `statfs` magic numbers of filesystems whose file data lives in memory.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// True when `file` is on a filesystem that keeps file data in memory.
pub(crate) fn in_memory_filesystem(file: &File) -> bool {
    rustix::fs::fstatfs(file).is_ok_and(|stat| {
        // `f_type` is a signed or unsigned word depending on the platform: compare bits.
        #[allow(
            clippy::cast_sign_loss,
            clippy::cast_lossless,
            clippy::unnecessary_cast,
            reason = "f_type holds a 32-bit magic number; only its bits are compared"
        )]
        let magic = (stat.f_type as u64) & 0xffff_ffff;
        magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
    })
}

impl InlineReads {
    /// The inline read mode for `file`, `buffered` when opened without `O_DIRECT`.
    pub fn for_file(file: &File, buffered: bool) -> Self {
        let mode = if in_memory_filesystem(file) {
            INLINE_MEMORY
        } else if buffered {
            INLINE_NOWAIT
        } else {
            INLINE_OFF
        };
        Self {
            mode: std::sync::atomic::AtomicU8::new(mode),
        }
    }

    /// Inline reads off.
    pub fn off() -> Self {
        Self {
            mode: std::sync::atomic::AtomicU8::new(INLINE_OFF),
        }
    }

    /// True when reads may be tried inline.
    pub fn enabled(&self) -> bool {
        self.mode.load(std::sync::atomic::Ordering::Relaxed) != INLINE_OFF
    }

    /// Fills `buf` from `offset` now if that cannot wait for a device: `Some(result)` when
    /// the read ran (bytes past the end of the file read as zeros), `None` when it must go
    /// through the engine.
    pub fn try_read(&self, file: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        use std::sync::atomic::Ordering;
        match self.mode.load(Ordering::Relaxed) {
            // A large copy is left to the engine, whose worker threads then copy in
            // parallel with the connection sending earlier replies.
            INLINE_MEMORY if buf.len() <= MAX_INLINE_MEMORY_READ => {
                Some(read_full_at(file, buf, offset))
            }
            INLINE_NOWAIT => {
                let len = buf.len();
                let flags = rustix::io::ReadWriteFlags::NOWAIT;
                match rustix::io::preadv2(file, &mut [io::IoSliceMut::new(buf)], offset, flags) {
                    Ok(n) if n == len => Some(Ok(())),
                    Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                        self.mode.store(INLINE_OFF, Ordering::Relaxed);
                        None
                    }
                    // Partly cached, at the end of the file, or would block.
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Reads until `buf` is full, zero-filling whatever lies past the end of the file.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `data` at `offset` with `pwrite`.
pub(crate) fn pwrite_all(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

/// The engine images are opened with (`io.engine` in tapdisk's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum EngineChoice {
    /// io_uring when available, else pread.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// io_uring, falling back to pread (with a warning) when unavailable.
    #[serde(rename = "io_uring", alias = "uring")]
    Uring,
    /// pread/pwrite on the blocking pool.
    #[serde(rename = "pread", alias = "sync")]
    Pread,
}

/// How drivers do their file I/O: tapdisk-wide, from its configuration, handed to every
/// image open through [`crate::driver::OpenOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSettings {
    /// The I/O engine.
    pub engine: EngineChoice,
    /// Map fully allocated raw images on memory filesystems for reads the kernel copies
    /// straight from their pages ([`mapped`]; `tuning.mapped_reads`).
    pub mapped_reads: bool,
}

impl Default for IoSettings {
    fn default() -> Self {
        Self {
            engine: EngineChoice::Auto,
            mapped_reads: true,
        }
    }
}

fn uring_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(uring::supported)
}

/// Opens the engine chosen by `choice` over `file`; `buffered` files (no `O_DIRECT`) get
/// inline page-cache reads and writes where the engine supports them.
pub fn open_engine(file: Arc<File>, buffered: bool, choice: EngineChoice) -> Box<dyn IoEngine> {
    if choice != EngineChoice::Pread && uring_supported() {
        match uring::UringEngine::new(Arc::clone(&file))
            .map(|e| e.with_inline_writes(buffered).with_inline_reads(buffered))
        {
            Ok(engine) => return Box::new(engine),
            Err(error) => tracing::warn!(%error, "io_uring engine unavailable; using pread"),
        }
    } else if choice == EngineChoice::Uring {
        tracing::warn!("io_uring not supported here; using pread");
    }
    Box::new(
        sync::PreadEngine::shared(file)
            .with_inline_reads(buffered)
            .with_inline_writes(buffered),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    fn file_with(dir: &Path, bytes: &[u8]) -> File {
        let path = dir.join("inline.img");
        std::fs::write(&path, bytes).unwrap();
        File::options().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn direct_files_on_storage_never_read_inline() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(dir.path(), &[1; 8192]);
        if in_memory_filesystem(&file) {
            eprintln!("skipped: the temporary directory is in memory");
            return;
        }
        let inline = InlineReads::for_file(&file, false);
        assert!(!inline.enabled());
        assert!(inline.try_read(&file, &mut [0; 4096], 0).is_none());
    }

    #[test]
    fn cached_reads_complete_inline_with_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..8192u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let file = file_with(dir.path(), &data);
        // Just written, so in the page cache.
        let inline = InlineReads::for_file(&file, true);
        let mut buf = vec![0u8; 4096];
        match inline.try_read(&file, &mut buf, 4096) {
            Some(result) => {
                result.unwrap();
                assert_eq!(buf, data[4096..]);
            }
            // A filesystem without RWF_NOWAIT: the engine path serves it.
            None => assert!(!inline.enabled()),
        }
    }

    #[test]
    fn memory_filesystems_read_inline_and_zero_fill_past_the_end() {
        let shm = Path::new("/dev/shm");
        let Ok(dir) = tempfile::tempdir_in(shm) else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let file = file_with(dir.path(), &[7; 6144]);
        if !in_memory_filesystem(&file) {
            eprintln!("skipped: /dev/shm is not tmpfs");
            return;
        }
        // Opened with O_DIRECT or not, a read of memory never waits for a device.
        for buffered in [true, false] {
            let inline = InlineReads::for_file(&file, buffered);
            let mut buf = vec![0xffu8; 4096];
            inline.try_read(&file, &mut buf, 4096).unwrap().unwrap();
            assert!(buf[..2048].iter().all(|b| *b == 7));
            assert!(buf[2048..].iter().all(|b| *b == 0));
        }
        // The file is unchanged.
        let mut back = [0u8; 2];
        file.read_exact_at(&mut back, 6142).unwrap();
        assert_eq!(back, [7, 7]);
    }
}
