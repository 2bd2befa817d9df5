//! The client side of the tapdisk control socket.
//!
//! One request per connection: connect to `<ctl dir>/ctl<pid>`, write one 544-byte message
//! (plus any trailing payload), read the reply (a stream of replies for LIST, a reply plus text
//! for STATS) and close. Every step honours an optional deadline; running past it fails with
//! `ETIMEDOUT`. An `ERROR` reply becomes an [`Error`] carrying the daemon's errno.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::io::{ioctl_fionbio, Errno};
use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::time::{Duration, Instant};

use tapdisk_proto::{Body, Message, MessageType, MESSAGE_SIZE};

use crate::error::{io_errno, Error, Result};
use crate::paths::ControlDir;

/// Client-side timeout of LIST and STATS requests (the others wait indefinitely by default).
pub const LIST_STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// An open connection to one tapdisk's control socket.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    pid: u32,
    socket: PathBuf,
    deadline: Option<Instant>,
}

impl Connection {
    /// Connects to tapdisk `pid`; every later read and write must finish within `timeout`
    /// (counted from now), if given.
    pub fn connect(dir: &ControlDir, pid: u32, timeout: Option<Duration>) -> Result<Self> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let socket = dir.ctl_socket_path(pid);
        let stream = connect_socket(&socket, deadline).map_err(|e| {
            Error::from_errno(
                e,
                format!("connecting to tapdisk {pid} at {}", socket.display()),
            )
        })?;
        Ok(Self {
            stream,
            pid,
            socket,
            deadline,
        })
    }

    /// The pid this connection talks to.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Time left before the deadline; `ETIMEDOUT` once it passed.
    fn remaining(&self, doing: &str) -> Result<Option<Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(self.timed_out(doing))
                } else {
                    Ok(Some(left))
                }
            }
        }
    }

    fn timed_out(&self, doing: &str) -> Error {
        Error::new(
            libc::ETIMEDOUT,
            format!(
                "{doing} tapdisk {pid} ({socket}): no answer in time",
                pid = self.pid,
                socket = self.socket.display()
            ),
        )
    }

    fn io_error(&self, err: &std::io::Error, doing: &str) -> Error {
        if io_errno(err) == libc::ETIMEDOUT {
            return self.timed_out(doing);
        }
        Error::from_io(
            err,
            format!(
                "{doing} tapdisk {pid} ({socket})",
                pid = self.pid,
                socket = self.socket.display()
            ),
        )
    }

    /// Writes all of `bytes`, failing with `ETIMEDOUT` at the deadline.
    fn write_all(&mut self, mut bytes: &[u8], doing: &str) -> Result<()> {
        while !bytes.is_empty() {
            let left = self.remaining(doing)?;
            self.stream
                .set_write_timeout(left)
                .map_err(|e| self.io_error(&e, doing))?;
            match self.stream.write(bytes) {
                Ok(0) => {
                    return Err(Error::new(
                        libc::EPIPE,
                        format!("{doing} tapdisk {}: connection closed", self.pid),
                    ))
                }
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(&e, doing)),
            }
        }
        Ok(())
    }

    /// Fills `buf`, failing with `ETIMEDOUT` at the deadline and `ECONNRESET` on early EOF.
    fn read_exact(&mut self, buf: &mut [u8], doing: &str) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = self.remaining(doing)?;
            self.stream
                .set_read_timeout(left)
                .map_err(|e| self.io_error(&e, doing))?;
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(Error::new(
                        libc::ECONNRESET,
                        format!(
                            "{doing} tapdisk {}: connection closed after {filled} of {} bytes",
                            self.pid,
                            buf.len()
                        ),
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(&e, doing)),
            }
        }
        Ok(())
    }

    /// Sends `message` followed by `trailer` (log path / key payloads, usually empty).
    pub fn send(&mut self, message: &Message, trailer: &[u8]) -> Result<()> {
        let doing = format!("sending {} to", message.msg_type.name());
        let bytes = message.encode().map_err(|e| {
            Error::new(
                libc::EINVAL,
                format!(
                    "encoding {} for tapdisk {}: {e}",
                    message.msg_type.name(),
                    self.pid
                ),
            )
        })?;
        self.write_all(&bytes, &doing)?;
        if !trailer.is_empty() {
            self.write_all(trailer, &doing)?;
        }
        Ok(())
    }

    /// Reads and decodes one reply message (ERROR replies are returned as messages).
    pub fn receive(&mut self) -> Result<Message> {
        let mut buf = [0u8; MESSAGE_SIZE];
        self.read_exact(&mut buf, "reading a reply from")?;
        Message::decode(&buf).map_err(|e| {
            Error::new(
                libc::EPROTO,
                format!("malformed reply from tapdisk {}: {e}", self.pid),
            )
        })
    }

    /// Reads `len` bytes of payload following a reply (STATS text).
    pub fn receive_payload(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, "reading the payload from")?;
        Ok(buf)
    }

    /// Reads one reply and checks it is `expected`; `ERROR` becomes an error with its errno.
    pub fn receive_expected(
        &mut self,
        request: MessageType,
        expected: MessageType,
    ) -> Result<Message> {
        let reply = self.receive()?;
        check_reply(self.pid, request, expected, reply)
    }
}

/// Connects to `socket`. With a deadline the connect itself is bounded too: a non-blocking
/// connect is retried while the listener's backlog is full (`EAGAIN`), up to the deadline.
fn connect_socket(
    socket: &Path,
    deadline: Option<Instant>,
) -> std::result::Result<UnixStream, Errno> {
    let Some(deadline) = deadline else {
        return UnixStream::connect(socket)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO));
    };
    let addr = SocketAddrUnix::new(socket)?;
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    loop {
        match connect(&fd, &addr) {
            Ok(()) => break,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Errno::AGAIN) => return Err(Errno::TIMEDOUT),
            Err(e) => return Err(e),
        }
    }
    ioctl_fionbio(&fd, false)?;
    Ok(UnixStream::from(fd))
}

/// Maps a reply to `Ok(reply)` when it has type `expected` (and, when it carries a response
/// code, that code is 0) or to an error otherwise.
pub fn check_reply(
    pid: u32,
    request: MessageType,
    expected: MessageType,
    reply: Message,
) -> Result<Message> {
    let minor = reply.cookie;
    if reply.msg_type == MessageType::Error {
        let (errno, detail) = match &reply.body {
            // The C tapdisk never fills `message`; ours explains the failure there.
            Body::Response { error, message } if !message.is_empty() => {
                (*error, format!(": {message}"))
            }
            Body::Response { error, .. } => (*error, String::new()),
            _ => (libc::EIO, String::new()),
        };
        return Err(Error::new(
            errno,
            format!(
                "tapdisk {pid} failed {} for minor {minor}{detail}",
                request.name()
            ),
        ));
    }
    if reply.msg_type != expected {
        return Err(Error::new(
            libc::EPROTO,
            format!(
                "tapdisk {pid} answered {} with {} (expected {})",
                request.name(),
                reply.msg_type.name(),
                expected.name()
            ),
        ));
    }
    if let Body::Response { error, .. } = &reply.body {
        if *error != 0 {
            return Err(Error::new(
                *error,
                format!("tapdisk {pid} failed {} for minor {minor}", request.name()),
            ));
        }
    }
    Ok(reply)
}

/// One request, one reply: connects to tapdisk `pid`, sends `message` (+ `trailer`) and returns
/// the checked reply of the type the request expects.
pub fn request(
    dir: &ControlDir,
    pid: u32,
    message: &Message,
    trailer: &[u8],
    timeout: Option<Duration>,
) -> Result<Message> {
    let expected = message.msg_type.success_reply().ok_or_else(|| {
        Error::new(
            libc::EINVAL,
            format!("{} is not a request", message.msg_type.name()),
        )
    })?;
    let mut conn = Connection::connect(dir, pid, timeout)?;
    conn.send(message, trailer)?;
    conn.receive_expected(message.msg_type, expected)
}
