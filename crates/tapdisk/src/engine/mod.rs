//! I/O engines: how an image driver's file reads and writes reach the kernel.
//!
//! Drivers never call `pread`/`pwrite` themselves; they hand owned, aligned buffers to an
//! [`IoEngine`] and await the result. Today there is one engine, [`sync::PreadEngine`], which
//! runs positioned reads and writes on tokio's blocking thread pool; an io_uring engine can be
//! added beside it without touching the drivers.

pub mod sync;

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
}
