//! The work behind each exported function, in safe Rust over the `blktapctl` crate. The
//! arguments arrive here already converted from C (strings, signed ids, timeouts); the
//! C-specific rules of each call (which flags bring which trailer, what a NULL means) are
//! applied here, once.

use std::os::fd::{AsFd as _, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blktapctl::list::{split_params, ListRow};
use blktapctl::{Blkif, Error, OpenFlags, OpenRequest, Result, ResumeRequest};
use tapdisk_proto::{encode_key, encode_log_path, ImageInfo, MESSAGE_SIZE};

use crate::rawio::{read_full, write_full};
use crate::settings::{control_dir, tapdisk};

/// The longest UNIX socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Byte offset of `u.params.flags` in `tapdisk_message_t` (the union starts 8-aligned).
const PARAMS_FLAGS_OFFSET: usize = 8;

/// `value`, which flag `flag` of a C call requires (`EINVAL` naming both when missing).
fn required<T>(value: Option<T>, flag: &str, what: &str) -> Result<T> {
    value.ok_or_else(|| {
        Error::new(
            libc::EINVAL,
            format!("TAPDISK_MESSAGE_FLAG_{flag} without {what}"),
        )
    })
}

/// A tapdisk id or pid from C: non-negative.
pub fn pid_of(value: i32) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::new(libc::EINVAL, format!("invalid pid {value}")))
}

/// A minor from C: non-negative (its upper bound is checked by `blktapctl`).
pub fn minor_of(value: i32) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::new(libc::EINVAL, format!("invalid minor {value}")))
}

/// Allocates a minor: its number and marker file.
pub fn allocate() -> Result<(u32, PathBuf)> {
    blktapctl::allocate(&control_dir())
}

/// Frees a minor no tapdisk holds.
pub fn free(minor: u32) -> Result<()> {
    blktapctl::free(&control_dir(), minor)
}

/// Starts a tapdisk and returns its pid.
pub fn spawn() -> Result<u32> {
    blktapctl::spawn_with(&control_dir(), &tapdisk()?)
}

/// The pid of the tapdisk listening on `ctl<id>`.
pub fn get_pid(id: u32) -> Result<u32> {
    blktapctl::get_pid(&control_dir(), id)
}

pub fn attach(pid: u32, minor: u32) -> Result<()> {
    blktapctl::attach(&control_dir(), pid, minor)
}

pub fn detach(pid: u32, minor: u32) -> Result<()> {
    blktapctl::detach(&control_dir(), pid, minor)
}

pub fn close(pid: u32, minor: u32, force: bool, timeout: Option<Duration>) -> Result<()> {
    blktapctl::close(&control_dir(), pid, minor, force, timeout)
}

pub fn pause(pid: u32, minor: u32, timeout: Option<Duration>) -> Result<()> {
    blktapctl::pause(&control_dir(), pid, minor, timeout)
}

/// close + detach + free.
pub fn destroy(pid: u32, minor: u32, timeout: Option<Duration>) -> Result<()> {
    blktapctl::destroy(&control_dir(), pid, minor, timeout)
}

pub fn info(pid: u32, minor: u32) -> Result<ImageInfo> {
    blktapctl::info(&control_dir(), pid, minor)
}

/// Connects a guest's ring to VBD `minor` of tapdisk `pid` (XENBLKIF_CONNECT, as tapback).
pub fn connect_xenblkif(pid: u32, minor: u32, blkif: &Blkif) -> Result<()> {
    blktapctl::connect_xenblkif(&control_dir(), pid, minor, blkif)
}

/// Disconnects device `devid` of guest `domid` from tapdisk `pid` (XENBLKIF_DISCONNECT).
pub fn disconnect_xenblkif(pid: u32, domid: u32, devid: u32) -> Result<()> {
    blktapctl::disconnect_xenblkif(&control_dir(), pid, domid, devid)
}

/// The statistics text of VBD `minor` (negative: every VBD) of tapdisk `pid`.
pub fn stats(pid: u32, minor: i32) -> Result<String> {
    let minor = u32::try_from(minor).ok();
    blktapctl::stats(&control_dir(), pid, minor)
}

/// The rows of `tap-ctl list`.
pub fn list() -> Result<Vec<ListRow>> {
    blktapctl::list(&control_dir())
}

/// The rows of tapdisk `pid` (`tap-ctl list -p`).
pub fn list_pid(pid: u32) -> Result<Vec<ListRow>> {
    blktapctl::list_pid(&control_dir(), pid)
}

/// The minor on which `driver:path` is open.
pub fn find_minor(driver: Option<&str>, path: Option<&str>) -> Result<u32> {
    blktapctl::find_minor(&control_dir(), driver, path)
}

/// `"type:/path"` split at its first colon.
pub fn parse_params(params: &str) -> Result<(String, String)> {
    match split_params(params) {
        (Some(driver), Some(path)) => Ok((driver, path)),
        _ => Err(Error::new(
            libc::EINVAL,
            format!("{params:?} is not TYPE:PATH"),
        )),
    }
}

/// What an OPEN asks, from the C arguments: the log path travels only with `ADD_LOG`, the
/// key only with `OPEN_ENCRYPTED`, the secondary only with `SECONDARY` (an empty one when
/// none is given) and the parent minor only with `REUSE_PRT`, as the C library sends them.
pub struct OpenArgs<'a> {
    pub params: &'a str,
    pub flags: u32,
    pub prt_minor: i32,
    pub secondary: Option<&'a str>,
    pub timeout: i32,
    pub logpath: Option<&'a str>,
    pub key: Option<secret::Key>,
}

impl std::fmt::Debug for OpenArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenArgs")
            .field("params", &self.params)
            .field("flags", &self.flags)
            .field("prt_minor", &self.prt_minor)
            .field("secondary", &self.secondary)
            .field("timeout", &self.timeout)
            .field("logpath", &self.logpath)
            .field("key", &self.key.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

impl OpenArgs<'_> {
    fn into_request(self) -> Result<OpenRequest> {
        let mut flags = OpenFlags(self.flags);
        let mut request = OpenRequest::new(self.params);
        if flags.contains(OpenFlags::REUSE_PRT) {
            request.parent_minor = Some(minor_of(self.prt_minor)?);
        }
        if flags.contains(OpenFlags::SECONDARY) {
            request.secondary = Some(self.secondary.unwrap_or_default().to_owned());
        }
        if flags.contains(OpenFlags::ADD_LOG) {
            let log = required(self.logpath, "ADD_LOG", "a log path")?;
            request.log_path = Some(log.to_owned());
        }
        if flags.contains(OpenFlags::OPEN_ENCRYPTED) {
            let key = required(self.key, "OPEN_ENCRYPTED", "a key")?;
            request.encryption_key = Some(std::sync::Arc::new(key));
        }
        request.request_timeout = u16::try_from(self.timeout).map_err(|_| {
            Error::new(
                libc::EINVAL,
                format!("request timeout {} is outside 0..=65535 s", self.timeout),
            )
        })?;
        // The request sets these itself from the fields above; an OPEN_OPTIONS bit without
        // its text (no C caller has one) would leave tapdisk waiting for it.
        for implied in [
            OpenFlags::REUSE_PRT,
            OpenFlags::SECONDARY,
            OpenFlags::ADD_LOG,
            OpenFlags::OPEN_ENCRYPTED,
            OpenFlags::OPEN_OPTIONS,
        ] {
            flags.remove(implied);
        }
        request.flags = flags;
        Ok(request)
    }
}

/// Opens an image on VBD `minor` of tapdisk `pid`.
pub fn open(pid: u32, minor: u32, args: OpenArgs<'_>) -> Result<()> {
    let request = args.into_request()?;
    blktapctl::open(&control_dir(), pid, minor, &request).map(drop)
}

/// allocate + spawn + attach + open; returns the block device, else the marker file. Without
/// a block-device choice in the flags, tapdisk's site default for creates applies, as for
/// `tap-ctl create`.
pub fn create(args: OpenArgs<'_>) -> Result<PathBuf> {
    let mut request = args.into_request()?;
    if request.flags.bits() & OpenFlags::BLOCKDEV_CHOICE.bits() == 0 {
        request.flags |= OpenFlags::BLOCKDEV_CREATE_DEFAULT;
    }
    let created = blktapctl::create_with(&control_dir(), &tapdisk()?, &request)?;
    Ok(created.device.unwrap_or(created.marker))
}

/// Resumes a paused VBD, on `params` if given. Flags other than `ADD_LOG` and `SECONDARY`
/// mean nothing to a RESUME and are not sent.
pub fn unpause(
    pid: u32,
    minor: u32,
    params: Option<&str>,
    flags: u32,
    secondary: Option<&str>,
    logpath: Option<&str>,
) -> Result<()> {
    let flags = OpenFlags(flags);
    let mut request = ResumeRequest {
        params: params.map(str::to_owned),
        ..ResumeRequest::default()
    };
    if flags.contains(OpenFlags::SECONDARY) {
        request.secondary = Some(secondary.unwrap_or_default().to_owned());
    }
    if flags.contains(OpenFlags::ADD_LOG) {
        let log = required(logpath, "ADD_LOG", "a log path")?;
        request.log_path = Some(log.to_owned());
    }
    blktapctl::unpause(&control_dir(), pid, minor, &request)
}

/// `<control dir>/ctl<id>`.
pub fn socket_name(id: u32) -> PathBuf {
    control_dir().ctl_socket_path(id)
}

/// A connected stream to the UNIX socket `path`.
pub fn connect(path: &std::path::Path) -> Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt as _;
    if path.as_os_str().as_bytes().len() > MAX_SOCKET_PATH {
        return Err(Error::new(
            libc::ENAMETOOLONG,
            format!("socket path {} is too long", path.display()),
        ));
    }
    UnixStream::connect(path)
        .map_err(|e| Error::from_io(&e, format!("connecting to {}", path.display())))
}

/// What follows `message` on the wire: the log path with `ADD_LOG`, the key with
/// `OPEN_ENCRYPTED` (read from `u.params.flags`, as the C library does).
pub fn trailer(
    message: &[u8; MESSAGE_SIZE],
    logpath: Option<&str>,
    key: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&message[PARAMS_FLAGS_OFFSET..PARAMS_FLAGS_OFFSET + 4]);
    let flags = OpenFlags(u32::from_ne_bytes(raw));
    let mut trailer = Vec::new();
    if flags.contains(OpenFlags::ADD_LOG) {
        let log = required(logpath, "ADD_LOG", "a log path")?;
        let payload = encode_log_path(log)
            .map_err(|e| Error::new(libc::ENAMETOOLONG, format!("log path {log:?}: {e}")))?;
        trailer.extend_from_slice(&payload);
    }
    if flags.contains(OpenFlags::OPEN_ENCRYPTED) {
        let key = required(key, "OPEN_ENCRYPTED", "a key")?;
        let payload = encode_key(key)
            .map_err(|e| Error::new(libc::EINVAL, format!("encryption key: {e}")))?;
        trailer.extend_from_slice(&payload);
    }
    Ok(trailer)
}

/// Sends `message` and `trailer` on `fd` and reads the reply into `message`, by `deadline`.
pub fn send_and_receive(
    fd: BorrowedFd<'_>,
    message: &mut [u8; MESSAGE_SIZE],
    trailer: &[u8],
    deadline: Option<Instant>,
) -> Result<()> {
    let sent = [message.as_slice(), trailer].concat();
    write_full(fd, &sent, deadline).map_err(|e| e.within("sending a message"))?;
    read_full(fd, message, deadline).map_err(|e| e.within("reading the reply"))
}

/// [`send_and_receive`] on a new connection to `ctl<id>`.
pub fn exchange(
    id: u32,
    message: &mut [u8; MESSAGE_SIZE],
    trailer: &[u8],
    deadline: Option<Instant>,
) -> Result<()> {
    let stream = connect(&socket_name(id))?;
    send_and_receive(stream.as_fd(), message, trailer, deadline)
        .map_err(|e| e.within(format!("tapdisk {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: OpenFlags) -> OpenArgs<'static> {
        OpenArgs {
            params: "vhd:/a.vhd",
            flags: flags.bits(),
            prt_minor: -1,
            secondary: None,
            timeout: 0,
            logpath: None,
            key: None,
        }
    }

    #[test]
    fn open_arguments_travel_with_their_flags_only() {
        let mut plain = args(OpenFlags::RDONLY);
        plain.secondary = Some("aio:/m");
        plain.logpath = Some("/log");
        plain.key = Some(secret::Key::from_slice(&[1; 32]).unwrap());
        let request = plain.into_request().unwrap();
        assert_eq!(request.flags, OpenFlags::RDONLY);
        assert_eq!(request.secondary, None);
        assert_eq!(request.log_path, None);
        assert_eq!(request.encryption_key, None);
        assert_eq!(request.parent_minor, None);

        let mut all = args(
            OpenFlags::SECONDARY | OpenFlags::ADD_LOG | OpenFlags::REUSE_PRT | OpenFlags::STANDBY,
        );
        all.prt_minor = 3;
        all.logpath = Some("/log");
        all.timeout = 30;
        let request = all.into_request().unwrap();
        assert_eq!(request.secondary.as_deref(), Some(""));
        assert_eq!(request.log_path.as_deref(), Some("/log"));
        assert_eq!(request.parent_minor, Some(3));
        assert_eq!(request.request_timeout, 30);
        assert_eq!(request.flags, OpenFlags::STANDBY);

        let no_log = args(OpenFlags::ADD_LOG).into_request().unwrap_err();
        assert_eq!(no_log.errno(), libc::EINVAL);
        let mut negative = args(OpenFlags::empty());
        negative.timeout = -1;
        assert_eq!(negative.into_request().unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn trailer_follows_the_message_flags() {
        let mut message = [0u8; MESSAGE_SIZE];
        assert!(trailer(&message, Some("/log"), None).unwrap().is_empty());
        let flags = OpenFlags::ADD_LOG | OpenFlags::OPEN_ENCRYPTED;
        message[8..12].copy_from_slice(&flags.bits().to_ne_bytes());
        let bytes = trailer(&message, Some("/log"), Some(&[7; 32])).unwrap();
        assert_eq!(bytes.len(), 256 + 1 + 32);
        assert_eq!(&bytes[..5], b"/log\0");
        assert_eq!(bytes[256], 32);
        assert_eq!(
            trailer(&message, None, Some(&[7; 32])).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn params_split_at_the_first_colon() {
        assert_eq!(
            parse_params("nbd:unix:/s").unwrap(),
            ("nbd".to_owned(), "unix:/s".to_owned())
        );
        assert_eq!(parse_params("/no/type").unwrap_err().errno(), libc::EINVAL);
    }
}
