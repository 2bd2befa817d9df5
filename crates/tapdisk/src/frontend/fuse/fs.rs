//! The FUSE filesystem: one regular file, the disk, mounted on a file (its root inode is the
//! file itself, as `nbdfuse` does).
//!
//! Metadata requests (`getattr`, `open`, ...) are answered on the FUSE session thread. Data
//! requests (`read`, `write`, `fsync`, `fallocate`) are handed to the tokio runtime as tasks
//! that reply when the VBD completes them, so a session thread never waits for I/O and never
//! blocks a runtime worker; the kernel may keep many requests in flight (asynchronous direct
//! I/O is negotiated). A write's payload is copied out of the session's receive buffer before
//! the task starts: that buffer is reused for the next request.
//!
//! Files are opened with `FOPEN_DIRECT_IO` (no page cache in the FUSE layer, so what NBD
//! clients write is what the file shows) and `FOPEN_PARALLEL_DIRECT_WRITES`.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use super::disk::ByteDisk;
use crate::driver::Capabilities;
use crate::iobuf::IoBuf;

/// How long the kernel may cache the file's attributes (its size never changes).
const ATTR_TTL: Duration = Duration::from_secs(3600);

/// Largest read or write the kernel sends in one request.
const MAX_REQUEST_BYTES: u32 = 1 << 20;

/// Asynchronous requests (direct I/O, readahead) the kernel keeps in flight.
const MAX_BACKGROUND: u16 = 128;

fn errno_of(error: &std::io::Error) -> Errno {
    Errno::from_i32(error.raw_os_error().unwrap_or(libc::EIO))
}

/// The disk as a FUSE filesystem of one file.
#[derive(Debug)]
pub struct VbdFile {
    disk: Arc<ByteDisk>,
    runtime: Handle,
    read_only: bool,
    /// Zeroing requests (`fallocate` punch hole / zero range) become VBD discards: only where
    /// the image chain deallocates to zeros.
    can_discard: bool,
    minor: u16,
    uid: u32,
    gid: u32,
    created: SystemTime,
    /// Open file handles (the loop device holds one).
    opens: Arc<AtomicUsize>,
}

impl VbdFile {
    /// A filesystem serving `disk` with tasks on `runtime`, offering what `capabilities`
    /// (the VBD's) allow.
    pub fn new(
        disk: Arc<ByteDisk>,
        runtime: Handle,
        read_only: bool,
        capabilities: Capabilities,
        minor: u16,
    ) -> Self {
        Self {
            disk,
            runtime,
            read_only,
            can_discard: capabilities.discard,
            minor,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            created: SystemTime::now(),
            opens: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Counter of open handles, readable after the filesystem moved into its session.
    pub fn open_handles(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.opens)
    }

    fn attr(&self) -> FileAttr {
        let size = self.disk.size();
        FileAttr {
            ino: INodeNo::ROOT,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for VbdFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(
                minor = self.minor,
                "FUSE: kernel lacks {missing:?}; direct I/O requests run one at a time"
            );
        }
        // Both setters only fail for out-of-range values, which these are not.
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        let _ = config.set_max_write(MAX_REQUEST_BYTES);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOTDIR);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&ATTR_TTL, &self.attr());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
        } else if size.is_some_and(|size| size != self.disk.size()) {
            // The disk's size is fixed; ownership and times are accepted and ignored.
            reply.error(Errno::EPERM);
        } else {
            reply.attr(&ATTR_TTL, &self.attr());
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
            return;
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        self.opens.fetch_add(1, Ordering::Relaxed);
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let disk = Arc::clone(&self.disk);
        self.runtime.spawn(async move {
            match disk.read(offset, u64::from(size)).await {
                Ok((buf, range)) => reply.data(&buf.as_slice()[range]),
                Err(e) => reply.error(errno_of(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        // Copy now: `data` lives in the session's receive buffer, reused once we return.
        let payload = IoBuf::copy_from(data);
        let sync = flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0;
        let disk = Arc::clone(&self.disk);
        self.runtime.spawn(async move {
            let result = match disk.write(offset, payload).await {
                Ok(written) if sync => disk.flush().await.map(|()| written),
                other => other,
            };
            match result.and_then(|written| {
                u32::try_from(written).map_err(|_| std::io::Error::from_raw_os_error(libc::EIO))
            }) {
                Ok(written) => reply.written(written),
                Err(e) => reply.error(errno_of(&e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called on every close(); nothing is cached here, and fsync makes writes durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _ = self
            .opens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let disk = Arc::clone(&self.disk);
        self.runtime.spawn(async move {
            match disk.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno_of(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let size = self.disk.size();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        if offset.saturating_add(length) > size && !keep_size {
            // The file would have to grow; a disk cannot.
            reply.error(Errno::EFBIG);
            return;
        }
        if !zeroing {
            // Preallocation inside a fixed-size disk: nothing to do.
            reply.ok();
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        if !self.can_discard {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        // Punching a hole and zeroing a range both leave zeros behind; the image is asked to
        // discard the whole sectors (its discard reads back as zeros), so a zeroed range may
        // end up deallocated.
        let disk = Arc::clone(&self.disk);
        self.runtime.spawn(async move {
            match disk.zero(offset, length).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno_of(&e)),
            }
        });
    }
}
