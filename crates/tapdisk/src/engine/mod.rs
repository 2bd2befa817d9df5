//! I/O engines: how an image driver's file reads and writes reach the kernel.
//!
//! Drivers never call `pread`/`pwrite` themselves; they hand owned, aligned buffers to an
//! [`IoEngine`] and await the result. Two engines:
//! * [`uring::UringEngine`]: io_uring, the default where the kernel allows it;
//! * [`sync::PreadEngine`]: `pread`/`pwrite` on tokio's blocking pool (buffered reads that hit
//!   the page cache are tried inline first), the fallback and the reference in tests.
//!
//! [`open_engine`] picks one at run time: `TAPDISK_IO_ENGINE=io_uring|pread|auto` (default
//! `auto`: io_uring when a probe ring supports read, write and fsync).

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

/// Writes all of `data` at `offset` with `pwrite`.
pub(crate) fn pwrite_all(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

/// The engine `TAPDISK_IO_ENGINE` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when available, else pread.
    Auto,
    /// io_uring, falling back to pread (with a warning) when unavailable.
    Uring,
    /// pread/pwrite on the blocking pool.
    Pread,
}

impl EngineChoice {
    /// Reads `TAPDISK_IO_ENGINE` (unset or unknown: `Auto`).
    pub fn from_env() -> Self {
        match std::env::var("TAPDISK_IO_ENGINE").as_deref() {
            Ok("io_uring") | Ok("uring") => Self::Uring,
            Ok("pread") | Ok("sync") => Self::Pread,
            _ => Self::Auto,
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
        match uring::UringEngine::new(Arc::clone(&file)).map(|e| e.with_inline_writes(buffered)) {
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
