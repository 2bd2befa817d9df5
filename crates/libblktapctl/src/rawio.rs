//! Whole buffers over a descriptor the caller owns, within an optional deadline: the
//! transport under `tap_ctl_read_raw`, `tap_ctl_read_message` and `tap_ctl_write_message`
//! (the C library's callers build and read the 544-byte messages themselves).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use blktapctl::{Error, Result};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

/// Waits until `fd` is ready for `flags`, at most until `deadline`.
fn wait(fd: BorrowedFd<'_>, flags: PollFlags, deadline: Option<Instant>) -> Result<()> {
    loop {
        let left = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::new(libc::ETIMEDOUT, "no data in time"));
                }
                Some(Timespec::try_from(left).unwrap_or(Timespec {
                    tv_sec: 3600,
                    tv_nsec: 0,
                }))
            }
        };
        let mut fds = [PollFd::from_borrowed_fd(fd, flags)];
        match poll(&mut fds, left.as_ref()) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(Error::from_errno(e, "waiting on the descriptor")),
        }
    }
}

/// The deadline `timeout` from now sets (`None`: none).
pub fn deadline_in(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

/// Fills `buf` from `fd` by `deadline` (`None`: no limit). An early end of file is `EIO`.
pub fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8], deadline: Option<Instant>) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        wait(fd, PollFlags::IN, deadline)?;
        match rustix::io::read(fd, &mut buf[filled..]) {
            Ok(0) => {
                return Err(Error::new(
                    libc::EIO,
                    format!("end of file after {filled} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => filled += n,
            Err(Errno::INTR | Errno::AGAIN) => {}
            Err(e) => return Err(Error::from_errno(e, format!("reading {} bytes", buf.len()))),
        }
    }
    Ok(())
}

/// Writes all of `bytes` to `fd` by `deadline` (`None`: no limit).
pub fn write_full(fd: BorrowedFd<'_>, mut bytes: &[u8], deadline: Option<Instant>) -> Result<()> {
    while !bytes.is_empty() {
        wait(fd, PollFlags::OUT, deadline)?;
        match rustix::io::write(fd, bytes) {
            Ok(0) => return Err(Error::new(libc::EIO, "the descriptor took no bytes")),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::INTR | Errno::AGAIN) => {}
            Err(e) => return Err(Error::from_errno(e, "writing")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn whole_buffers_cross_and_silence_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        let soon = deadline_in(Some(Duration::from_secs(5)));
        write_full(a.as_fd(), b"hello", soon).unwrap();
        let mut buf = [0u8; 5];
        read_full(b.as_fd(), &mut buf, None).unwrap();
        assert_eq!(&buf, b"hello");
        let late = read_full(
            b.as_fd(),
            &mut buf,
            deadline_in(Some(Duration::from_millis(50))),
        )
        .unwrap_err();
        assert_eq!(late.errno(), libc::ETIMEDOUT);
        drop(a);
        let eof = read_full(b.as_fd(), &mut buf, None).unwrap_err();
        assert_eq!(eof.errno(), libc::EIO);
    }
}
