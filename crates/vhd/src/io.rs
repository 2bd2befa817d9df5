//! The small positional I/O interface the image code runs on
//! ([`BlockFile`]), its implementation for `std::fs::File`, an in-memory
//! file for tests and fuzzing, a fault-injecting wrapper that simulates a
//! crash after a number of writes, and [`Opener`] to open parents by path.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Positional I/O on an image file. `read_at` and `write_at` transfer the
/// whole buffer or fail; reads past the end fail with `UnexpectedEof`.
pub trait BlockFile {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn sync(&self) -> io::Result<()>;
    /// Whether this is a block device: its size is fixed, so a VHD's footer stays at its
    /// end and new blocks go before it.
    fn is_block_device(&self) -> bool {
        false
    }
}

impl BlockFile for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        // Block devices report size 0 in metadata; seek to the end instead.
        let meta = self.metadata()?;
        if meta.is_file() {
            Ok(meta.len())
        } else {
            use std::io::Seek;
            let mut f = self;
            f.seek(io::SeekFrom::End(0))
        }
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.metadata()?.is_file() {
            return std::fs::File::set_len(self, len);
        }
        // A block device keeps its size: "truncating" it leaves the bytes
        // past `len` unused, as the C tools do; it cannot grow (ENOSPC).
        const ENOSPC: i32 = 28;
        if len > BlockFile::len(self)? {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn is_block_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
    }
}

/// Whether `path` names a block device (an LVM volume, a disk): such a
/// target is written in place, never created, truncated or removed.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// A growable in-memory file, or an in-memory block device of fixed size.
#[derive(Debug, Default, Clone)]
pub struct MemFile {
    data: Arc<Mutex<Vec<u8>>>,
    device: bool,
}

impl MemFile {
    /// A file holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data: Arc::new(Mutex::new(data)),
            device: false,
        }
    }

    /// A block device holding `data`: writes past its end fail with `ENOSPC`, and it cannot
    /// be resized.
    pub fn device(data: Vec<u8>) -> Self {
        Self {
            data: Arc::new(Mutex::new(data)),
            device: true,
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn to_index(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl BlockFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        let start = to_index(offset)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        if end > d.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read {start}..{end} past end {}", d.len()),
            ));
        }
        buf.copy_from_slice(&d[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        let start = to_index(offset)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        if end > (1usize << 36) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory file limit",
            ));
        }
        if self.device && end > d.len() {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        if end > d.len() {
            d.resize(end, 0);
        }
        d[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.device {
            return Err(io::Error::from_raw_os_error(22)); // EINVAL: a device's size is fixed
        }
        let len = to_index(len)?;
        if len > (1usize << 36) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory file limit",
            ));
        }
        self.lock().resize(len, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_block_device(&self) -> bool {
        self.device
    }
}

/// Shared write budget of a set of [`FaultFile`]s: once it reaches zero
/// every further write, truncate and sync fails, as if the process had died.
#[derive(Debug, Clone)]
pub struct CrashBudget(Arc<AtomicI64>);

impl CrashBudget {
    /// Allows `writes` successful mutating calls in total.
    pub fn new(writes: i64) -> Self {
        Self(Arc::new(AtomicI64::new(writes)))
    }

    /// Whether the simulated crash has happened.
    pub fn crashed(&self) -> bool {
        self.0.load(Ordering::SeqCst) <= 0
    }

    fn take(&self) -> io::Result<()> {
        if self.0.fetch_sub(1, Ordering::SeqCst) <= 0 {
            Err(io::Error::other("simulated crash"))
        } else {
            Ok(())
        }
    }
}

/// A [`BlockFile`] that fails every mutation once its [`CrashBudget`] is spent.
#[derive(Debug)]
pub struct FaultFile<F> {
    inner: F,
    budget: CrashBudget,
}

impl<F> FaultFile<F> {
    /// Wraps `inner`.
    pub fn new(inner: F, budget: CrashBudget) -> Self {
        Self { inner, budget }
    }
}

impl<F: BlockFile> BlockFile for FaultFile<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.budget.take()?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.budget.take()?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        if self.budget.crashed() {
            return Err(io::Error::other("simulated crash"));
        }
        self.inner.sync()
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
}

/// Opens image files by path (parents, journals, new images).
pub trait Opener {
    /// The file type produced.
    type File: BlockFile;
    /// Opens an existing file.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Self::File>;
    /// Creates a new file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
}

/// Opens `std::fs::File`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdOpener;

impl Opener for StdOpener {
    type File = std::fs::File;
    fn open(&self, path: &Path, writable: bool) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
    }
    fn create(&self, path: &Path) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }
}

/// Opens `FaultFile<std::fs::File>`s sharing one crash budget.
#[derive(Debug, Clone)]
pub struct FaultOpener {
    /// The shared budget.
    pub budget: CrashBudget,
}

impl Opener for FaultOpener {
    type File = FaultFile<std::fs::File>;
    fn open(&self, path: &Path, writable: bool) -> io::Result<Self::File> {
        Ok(FaultFile::new(
            StdOpener.open(path, writable)?,
            self.budget.clone(),
        ))
    }
    fn create(&self, path: &Path) -> io::Result<Self::File> {
        self.budget.take()?;
        Ok(FaultFile::new(StdOpener.create(path)?, self.budget.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfile_semantics() {
        let f = MemFile::default();
        f.write_at(b"abc", 4).unwrap();
        assert_eq!(f.len().unwrap(), 7);
        let mut b = [0u8; 3];
        f.read_at(&mut b, 4).unwrap();
        assert_eq!(&b, b"abc");
        assert!(f.read_at(&mut b, 6).is_err());
        f.set_len(2).unwrap();
        assert_eq!(f.contents(), vec![0, 0]);
    }

    #[test]
    fn fault_file_stops_writing() {
        let budget = CrashBudget::new(1);
        let f = FaultFile::new(MemFile::default(), budget.clone());
        f.write_at(b"a", 0).unwrap();
        assert!(f.write_at(b"b", 1).is_err());
        assert!(budget.crashed());
        assert!(f.sync().is_err());
        assert_eq!(f.len().unwrap(), 1);
    }
}
