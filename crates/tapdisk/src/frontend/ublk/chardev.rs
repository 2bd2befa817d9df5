//! The ublk frontend's only `unsafe` code: borrowing the file descriptor of `/dev/ublkcN`
//! that libublk opened, so a queue thread can move request data with plain `pread`/`pwrite`
//! (`UBLK_F_USER_COPY`).
//!
//! The character device can be opened once only (the driver refuses a second opener with
//! `EBUSY`), and libublk keeps its descriptor in the device object without handing out a
//! borrowed one, only the raw number in the target's registered-file table.

use std::os::fd::BorrowedFd;

use libublk::io::UblkDev;

/// The descriptor of `dev`'s character device, valid for as long as `dev` is borrowed;
/// `None` when libublk recorded none.
pub fn borrow_char_device(dev: &UblkDev) -> Option<BorrowedFd<'_>> {
    let raw = dev.tgt.fds[0];
    if raw < 0 || dev.tgt.nr_fds < 1 {
        return None;
    }
    // SAFETY: libublk opens `/dev/ublkcN` when it builds the `UblkDev`, keeps the `File` in the
    // same object (closed only when the object drops) and records its raw number in
    // `tgt.fds[0]` (the ring's fixed file 0). The returned descriptor borrows `dev`, so it
    // cannot outlive the `File` that owns the number.
    Some(unsafe { BorrowedFd::borrow_raw(raw) })
}
