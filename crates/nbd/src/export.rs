//! The disk behind an NBD export, as the server sees it: the [`Export`] trait (facts, reads,
//! writes, flushes and the optional commands) and the [`ExportBuffer`]s reads and writes
//! travel in. The handshake (`server`) asks an export for its [`ExportInfo`]; the
//! transmission phase (`transmission`) runs requests against it. Both depend on this module,
//! never on each other.

use std::future::Future;
use std::io;

use crate::proto::{ExportInfo, Extent, WriteZeroesFlags};

/// `ENOTSUP`, the answer of the optional [`Export`] methods by default.
const ENOTSUP_RAW: i32 = 95;

/// A buffer the server hands to an export: reads fill it, writes carry their data in it.
/// Exports choose the type (e.g. memory aligned for `O_DIRECT`), so no copy is needed
/// between the protocol and the disk.
pub trait ExportBuffer: Send + Sync + 'static {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, mutably.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl ExportBuffer for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// The disk behind an export. Errors are `io::Error`; the server maps `raw_os_error()` to
/// NBD errors (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN; anything
/// else becomes EIO). Calls may take a long time (the disk may be paused): the server keeps
/// serving other connections and other requests of the same connection meanwhile.
pub trait Export: Send + Sync + 'static {
    /// The buffer type of reads and writes.
    type Buffer: ExportBuffer;

    /// Current facts about the export; read once per connection at negotiation.
    fn info(&self) -> ExportInfo;

    /// A buffer of exactly `len` bytes for a read or a write payload (its contents are
    /// overwritten before use). Called on the connection's task: keep it cheap.
    fn buffer(&self, len: usize) -> Self::Buffer;

    /// Takes back a buffer the server is done with (a read whose reply has been sent), for
    /// reuse by [`Export::buffer`]. Default: drop it.
    fn recycle(&self, buf: Self::Buffer) {
        drop(buf);
    }

    /// Read `buf.bytes().len()` bytes at `offset` into `buf` and give it back.
    fn read(
        &self,
        offset: u64,
        buf: Self::Buffer,
    ) -> impl Future<Output = io::Result<Self::Buffer>> + Send;

    /// Write `data` at `offset`; with `fua` the data is durable before this returns.
    fn write(
        &self,
        offset: u64,
        data: Self::Buffer,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Discard `[offset, offset + len)`. Default: `ENOTSUP`.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Err(io::Error::from_raw_os_error(ENOTSUP_RAW)) }
    }

    /// Zero `[offset, offset + len)`. Default: `ENOTSUP`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: WriteZeroesFlags,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, flags);
        async { Err(io::Error::from_raw_os_error(ENOTSUP_RAW)) }
    }

    /// Prefetch `[offset, offset + len)`. Default: nothing to do.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len);
        async { Ok(()) }
    }

    /// Status of `[offset, offset + len)` in the export's own metadata context `context`
    /// (an index into [`ExportInfo::meta_contexts`]): extents in order with that context's
    /// flags, as [`Export::block_status`]. Default: `ENOTSUP`.
    fn context_status(
        &self,
        context: usize,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        let _ = (context, offset, len);
        async { Err(io::Error::from_raw_os_error(ENOTSUP_RAW)) }
    }

    /// Allocation status of `[offset, offset + len)`: extents in order, may cover less
    /// than `len` (at least one extent). Default: one allocated extent.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        let _ = offset;
        async move {
            Ok(vec![Extent {
                length: len,
                flags: 0,
            }])
        }
    }

    /// Runs one turn of a connection's loop (everything the connection task does between
    /// two waits: parsing requests and starting them, finishing replies). An export whose
    /// I/O can be queued now and handed to the kernel later does so here: `turn` starts the
    /// turn's requests, and what they queued goes out together when it returns. Default:
    /// just `turn`.
    fn turn<R>(&self, turn: impl FnOnce() -> R) -> R {
        turn()
    }
}
