//! Reads the kernel copies straight out of an image's memory: a read-only shared mapping of a
//! file whose data lives in memory (tmpfs, ramfs).
//!
//! For such a file the page cache *is* the storage. A frontend that hands read data to the
//! kernel with a system call (ublk user copy: a `pwrite` of `/dev/ublkcN`) can name the mapped
//! pages as the source: one copy, made by the kernel from the file's pages into the request,
//! instead of a `pread` into a buffer of ours and a second copy out of it, and one system call
//! instead of two.
//!
//! Our code never dereferences the mapping; only the kernel reads it, inside a system call.
//! So a file truncated behind our back makes that call fail with `EFAULT` instead of raising
//! `SIGBUS`, and no Rust reference ever points at memory that other writers change.
//!
//! When images are mapped ([`worth_mapping`]):
//! * only on tmpfs and ramfs: touching a page of another filesystem may wait for storage,
//!   which would stall the caller (a ublk queue thread serves every tag of its queue);
//! * only when the file is fully allocated: a fault on a tmpfs hole allocates a page, where
//!   `pread` answers zeros for free. Drivers stop using the mapping once they punch holes;
//! * not when tapdisk's configuration turns them off (`tuning.mapped_reads = false`,
//!   [`super::IoSettings::mapped_reads`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// True when reads of `file` are worth serving from a mapping: a regular, non-empty file on
/// a memory filesystem with every byte allocated (see the module documentation).
pub fn worth_mapping(file: &File) -> bool {
    let Ok(metadata) = file.metadata() else {
        return false;
    };
    let allocated = metadata.blocks().saturating_mul(512);
    metadata.is_file()
        && metadata.len() > 0
        && allocated >= metadata.len()
        && super::in_memory_filesystem(file)
}

/// A read-only shared mapping of the first `len` bytes of a file.
#[derive(Debug)]
pub struct FileMapping {
    /// Start of the mapping (an address, never dereferenced by us).
    address: usize,
    len: usize,
}

impl FileMapping {
    /// Maps the first `len` bytes of `file` (opened for reading). `EINVAL` for an empty range.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh mapping at an address the kernel picks cannot overlap memory Rust
        // owns; the descriptor is valid for the call; the mapping is only ever passed to
        // system calls as a source address (never read through a Rust reference), and
        // `Drop` unmaps it exactly once.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            address: address as usize,
            len,
        })
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: `address` and `len` describe the mapping `new` made, unmapped only here;
        // callers that gave its address to a system call hold an `Arc` on it until the call
        // returned, so nothing uses it any more.
        let result = unsafe { libc::munmap(self.address as *mut libc::c_void, self.len) };
        if result != 0 {
            tracing::warn!(
                "munmap of an image mapping failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// A range of a [`FileMapping`], kept mapped while this value lives.
#[derive(Debug, Clone)]
pub struct MappedBytes {
    mapping: Arc<FileMapping>,
    offset: usize,
    len: usize,
}

impl MappedBytes {
    /// `len` bytes at `offset` of `mapping`; `None` unless all of them are mapped.
    pub fn new(mapping: &Arc<FileMapping>, offset: u64, len: usize) -> Option<Self> {
        let offset = usize::try_from(offset).ok()?;
        let end = offset.checked_add(len)?;
        (end <= mapping.len).then(|| Self {
            mapping: Arc::clone(mapping),
            offset,
            len,
        })
    }

    /// Bytes in the range.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the range to `fd` at `position` (`pwrite`, repeated after short writes and
    /// interruptions). `EFAULT` when the file shrank below the range since it was mapped;
    /// `EIO` when `fd` takes no more bytes.
    pub fn write_all_at(&self, fd: BorrowedFd<'_>, position: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < self.len {
            let at = position
                .checked_add(done as u64)
                .and_then(|at| libc::off_t::try_from(at).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let source = self.mapping.address + self.offset + done;
            // SAFETY: `source .. source + len - done` lies inside the mapping (checked in
            // `new`), which `self.mapping` keeps alive for the call. The kernel reads it as
            // the source of the write; a page it cannot read (file truncated) fails the call
            // with EFAULT instead of faulting this process.
            let written = unsafe {
                libc::pwrite(
                    fd.as_raw_fd(),
                    source as *const libc::c_void,
                    self.len - done,
                    at,
                )
            };
            match usize::try_from(written) {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                Ok(moved) => done += moved,
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    /// A file on tmpfs filled with a pattern, or `None` where `/dev/shm` is missing.
    fn memory_file(len: usize) -> Option<(tempfile::NamedTempFile, Vec<u8>)> {
        let file = tempfile::NamedTempFile::new_in("/dev/shm").ok()?;
        let pattern: Vec<u8> = (0..len).map(|i| u8::try_from(i % 253).unwrap()).collect();
        file.as_file().write_all_at(&pattern, 0).unwrap();
        Some((file, pattern))
    }

    #[test]
    fn ranges_are_written_from_the_mapped_file() {
        let Some((file, pattern)) = memory_file(64 * 1024) else {
            return;
        };
        let mapping = Arc::new(FileMapping::new(file.as_file(), 64 * 1024).unwrap());
        let range = MappedBytes::new(&mapping, 8192, 16384).unwrap();
        assert_eq!(range.len(), 16384);
        let target = tempfile::tempfile().unwrap();
        range.write_all_at(target.as_fd(), 512).unwrap();
        let mut back = vec![0u8; 16384];
        target.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(back, pattern[8192..8192 + 16384]);
        // Writes through the file show through the mapping (both are the page cache).
        file.as_file().write_all_at(&[0xee; 4096], 8192).unwrap();
        range.write_all_at(target.as_fd(), 0).unwrap();
        target.read_exact_at(&mut back[..4096], 0).unwrap();
        assert_eq!(back[..4096], [0xee; 4096]);
    }

    #[test]
    fn ranges_outside_the_mapping_are_refused() {
        let Some((file, _)) = memory_file(8192) else {
            return;
        };
        let mapping = Arc::new(FileMapping::new(file.as_file(), 8192).unwrap());
        assert!(MappedBytes::new(&mapping, 4096, 4096).is_some());
        assert!(MappedBytes::new(&mapping, 4096, 4097).is_none());
        assert!(MappedBytes::new(&mapping, u64::MAX, 1).is_none());
        assert!(FileMapping::new(file.as_file(), 0).is_err());
    }

    #[test]
    fn a_file_truncated_under_the_mapping_fails_with_efault() {
        let Some((file, _)) = memory_file(64 * 1024) else {
            return;
        };
        let mapping = Arc::new(FileMapping::new(file.as_file(), 64 * 1024).unwrap());
        let range = MappedBytes::new(&mapping, 32 * 1024, 4096).unwrap();
        file.as_file().set_len(4096).unwrap();
        let target = tempfile::tempfile().unwrap();
        let error = range.write_all_at(target.as_fd(), 0).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn only_fully_allocated_memory_files_are_worth_mapping() {
        let Some((file, _)) = memory_file(64 * 1024) else {
            return;
        };
        assert!(worth_mapping(file.as_file()));
        // A hole on tmpfs: mapping it would allocate the hole's pages on read.
        file.as_file().set_len(1 << 20).unwrap();
        assert!(!worth_mapping(file.as_file()));
        // Files on storage never are (a fault may wait for the disk); the checkout is on
        // storage unless it lives in memory itself.
        let on_disk = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        on_disk.as_file().write_all_at(&[1; 8192], 0).unwrap();
        if !super::super::in_memory_filesystem(on_disk.as_file()) {
            assert!(!worth_mapping(on_disk.as_file()));
        }
        // Nor are empty files.
        let empty = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        assert!(!worth_mapping(empty.as_file()));
    }
}
