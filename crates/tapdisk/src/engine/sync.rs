//! The `pread`/`pwrite` engine: blocking positioned I/O on tokio's blocking thread pool.
//!
//! Simple and portable; also the reference the faster engines are tested against.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{pwrite_all, read_full_at, InlineReads, InlineWriteGate, IoEngine, IoFuture};
use crate::iobuf::IoBuf;

/// Runs each request as a blocking `pread`/`pwrite` on a worker thread.
#[derive(Debug)]
pub struct PreadEngine {
    file: Arc<File>,
    pending: Arc<AtomicUsize>,
    /// Reads tried on the calling thread first (buffered files only: a read served from
    /// the page cache then costs no thread hand-off).
    inline_reads: InlineReads,
    /// Run buffered writes on the calling thread, one at a time (see [`InlineWriteGate`]).
    inline_writes: Option<InlineWriteGate>,
}

impl PreadEngine {
    /// An engine over an already opened file.
    pub fn new(file: File) -> Self {
        Self::shared(Arc::new(file))
    }

    /// An engine over a file that others (the driver) also hold.
    pub fn shared(file: Arc<File>) -> Self {
        Self {
            file,
            pending: Arc::new(AtomicUsize::new(0)),
            inline_reads: InlineReads::off(),
            inline_writes: None,
        }
    }

    /// Enables inline buffered writes (only for files opened without `O_DIRECT`).
    pub fn with_inline_writes(mut self, enabled: bool) -> Self {
        self.inline_writes = enabled.then(InlineWriteGate::default);
        self
    }

    /// Runs reads inline where they cannot wait for a device (see [`InlineReads`]);
    /// `buffered` when the file was opened without `O_DIRECT`.
    pub fn with_inline_reads(mut self, buffered: bool) -> Self {
        self.inline_reads = InlineReads::for_file(&self.file, buffered);
        self
    }

    /// Runs `op` on the blocking pool, counting it as pending meanwhile.
    fn run<T, F>(&self, op: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        let pending = Arc::clone(&self.pending);
        pending.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let result = tokio::task::spawn_blocking(move || {
                let result = op(&file);
                pending.fetch_sub(1, Ordering::Relaxed);
                result
            })
            .await;
            result.unwrap_or_else(|join_error| Err(io::Error::other(join_error)))
        })
    }
}

impl IoEngine for PreadEngine {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        if let Some(result) = self
            .inline_reads
            .try_read(&self.file, buf.as_mut_slice(), offset)
        {
            return Box::pin(std::future::ready(result.map(|()| buf)));
        }
        self.run(move |file| {
            read_full_at(file, buf.as_mut_slice(), offset)?;
            Ok(buf)
        })
    }

    fn write_at(&self, buf: Arc<IoBuf>, offset: u64) -> IoFuture<'_, ()> {
        if let Some(gate) = &self.inline_writes {
            if let Some(result) = gate.try_run(|| pwrite_all(&self.file, buf.as_slice(), offset)) {
                return Box::pin(std::future::ready(result));
            }
        }
        self.run(move |file| file.write_all_at(buf.as_slice(), offset))
    }

    fn sync_data(&self) -> IoFuture<'_, ()> {
        self.run(|file| file.sync_data())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run(move |file| {
            let mode =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            rustix::fs::fallocate(file, mode, offset, len).map_err(io::Error::from)
        })
    }

    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run(move |file| {
            let mode =
                rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
            rustix::fs::fallocate(file, mode, offset, len).map_err(io::Error::from)
        })
    }

    fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        "pread"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_then_reads_back_and_zero_fills_past_eof() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let engine = PreadEngine::new(file);
        let data = Arc::new(IoBuf::copy_from(&[0x5a; 4096]));
        engine.write_at(data, 4096).await.unwrap();
        engine.sync_data().await.unwrap();
        let buf = engine.read_at(IoBuf::zeroed(8192), 4096).await.unwrap();
        assert!(buf.as_slice()[..4096].iter().all(|b| *b == 0x5a));
        assert!(buf.as_slice()[4096..].iter().all(|b| *b == 0));
        assert_eq!(engine.pending(), 0);
    }
}
