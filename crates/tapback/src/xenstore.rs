//! The xenstored wire protocol and a small synchronous client.
//!
//! A message is a 16-byte little-endian header (`u32 type, u32 req_id, u32 tx_id, u32 len`)
//! and `len` bytes of payload (at most 4096): NUL-separated strings. A reply carries the
//! request's type and id, or type `ERROR` with an errno name (`"ENOENT\0"`). Watch events
//! (`WATCH_EVENT`: `path\0token\0`) arrive on the same connection at any time; the client
//! queues those that come while it waits for a reply.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// Message types used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    Directory = 1,
    Read = 2,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Write = 11,
    Rm = 13,
    WatchEvent = 15,
    Error = 16,
}

/// Header bytes.
pub const HEADER_LEN: usize = 16;
/// Largest payload xenstored accepts.
pub const MAX_PAYLOAD: usize = 4096;

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Message type (an [`Op`] or another xenstored type).
    pub kind: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id (0: none).
    pub tx_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Packet {
    /// Encodes header and payload; `E2BIG` if the payload is too long.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let len = u32::try_from(self.payload.len()).unwrap_or(0);
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        for word in [self.kind, self.req_id, self.tx_id, len] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Decodes a header: (kind, req_id, tx_id, payload length); `EPROTO` for a length above
    /// the limit.
    pub fn decode_header(header: &[u8; HEADER_LEN]) -> io::Result<(u32, u32, u32, usize)> {
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let len = usize::try_from(word(12)).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("xenstore message of {len} bytes (at most {MAX_PAYLOAD})"),
            ));
        }
        Ok((word(0), word(4), word(8), len))
    }
}

/// NUL-terminated strings joined (`a\0b\0`).
pub fn strings(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(part.as_bytes());
        out.push(0);
    }
    out
}

/// The strings of a payload (split at NULs, a trailing NUL ignored).
pub fn split(payload: &[u8]) -> Vec<String> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|b| *b == 0)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// The errno an `ERROR` reply names.
pub fn errno_of(name: &str) -> i32 {
    match name {
        "EINVAL" => libc::EINVAL,
        "EACCES" => libc::EACCES,
        "EEXIST" => libc::EEXIST,
        "EISDIR" => libc::EISDIR,
        "ENOENT" => libc::ENOENT,
        "ENOMEM" => libc::ENOMEM,
        "ENOSPC" => libc::ENOSPC,
        "EIO" => libc::EIO,
        "ENOTEMPTY" => libc::ENOTEMPTY,
        "ENOSYS" => libc::ENOSYS,
        "EROFS" => libc::EROFS,
        "EBUSY" => libc::EBUSY,
        "EAGAIN" => libc::EAGAIN,
        "EISCONN" => libc::EISCONN,
        "E2BIG" => libc::E2BIG,
        "EPERM" => libc::EPERM,
        _ => libc::EIO,
    }
}

/// A byte stream to xenstored.
pub trait Transport: Read + Write + Send {}
impl<T: Read + Write + Send> Transport for T {}

/// A connection to xenstored.
pub struct Client {
    stream: Box<dyn Transport>,
    next_id: u32,
    events: VecDeque<(String, String)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("next_id", &self.next_id)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

/// Where xenstored listens, in the order tried.
pub const SOCKETS: [&str; 2] = ["/run/xenstored/socket", "/var/run/xenstored/socket"];
/// The kernel's XenStore device (the same protocol).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";

impl Client {
    /// Connects to `path` if given, else to xenstored's socket, else `/dev/xen/xenbus`.
    pub fn open(path: Option<&str>) -> io::Result<Self> {
        if let Some(path) = path {
            return Self::open_path(path);
        }
        let mut last = io::Error::from_raw_os_error(libc::ENOENT);
        for candidate in SOCKETS.iter().chain(&[XENBUS_DEVICE]) {
            match Self::open_path(candidate) {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn open_path(path: &str) -> io::Result<Self> {
        let stream: Box<dyn Transport> = if path.starts_with("/dev/") {
            Box::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)?,
            )
        } else {
            Box::new(UnixStream::connect(path)?)
        };
        Ok(Self::over(stream))
    }

    /// A client over an already connected stream.
    pub fn over(stream: Box<dyn Transport>) -> Self {
        Self {
            stream,
            next_id: 1,
            events: VecDeque::new(),
        }
    }

    fn receive(&mut self) -> io::Result<Packet> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        let (kind, req_id, tx_id, len) = Packet::decode_header(&header)?;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        Ok(Packet {
            kind,
            req_id,
            tx_id,
            payload,
        })
    }

    fn queue_event(&mut self, packet: &Packet) {
        let mut parts = split(&packet.payload).into_iter();
        if let (Some(path), Some(token)) = (parts.next(), parts.next()) {
            self.events.push_back((path, token));
        }
    }

    /// Sends one request and waits for its reply's payload.
    pub fn call(&mut self, op: Op, tx_id: u32, payload: Vec<u8>) -> io::Result<Vec<u8>> {
        let req_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let packet = Packet {
            kind: op as u32,
            req_id,
            tx_id,
            payload,
        };
        self.stream.write_all(&packet.encode()?)?;
        loop {
            let reply = self.receive()?;
            if reply.kind == Op::WatchEvent as u32 {
                self.queue_event(&reply);
                continue;
            }
            if reply.req_id != req_id {
                continue;
            }
            if reply.kind == Op::Error as u32 {
                let name = split(&reply.payload).into_iter().next().unwrap_or_default();
                return Err(io::Error::from_raw_os_error(errno_of(&name)));
            }
            return Ok(reply.payload);
        }
    }

    /// The next watch event `(path, token)`, waiting for one.
    pub fn next_event(&mut self) -> io::Result<(String, String)> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let packet = self.receive()?;
            if packet.kind == Op::WatchEvent as u32 {
                self.queue_event(&packet);
            }
        }
    }
}

impl crate::backend::Store for Client {
    fn read(&mut self, path: &str) -> io::Result<Option<String>> {
        match self.call(Op::Read, 0, strings(&[path])) {
            Ok(value) => Ok(Some(String::from_utf8_lossy(&value).into_owned())),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn directory(&mut self, path: &str) -> io::Result<Vec<String>> {
        match self.call(Op::Directory, 0, strings(&[path])) {
            Ok(children) => Ok(split(&children)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, pairs: &[(String, String)]) -> io::Result<()> {
        loop {
            let id = self.call(Op::TransactionStart, 0, vec![0])?;
            let tx_id: u32 = split(&id)
                .first()
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))?;
            for (path, value) in pairs {
                let mut payload = strings(&[path]);
                payload.extend_from_slice(value.as_bytes());
                if let Err(e) = self.call(Op::Write, tx_id, payload) {
                    let _ = self.call(Op::TransactionEnd, tx_id, strings(&["F"]));
                    return Err(e);
                }
            }
            match self.call(Op::TransactionEnd, tx_id, strings(&["T"])) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                other => return other.map(drop),
            }
        }
    }

    fn remove(&mut self, path: &str) -> io::Result<()> {
        match self.call(Op::Rm, 0, strings(&[path])) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }

    fn watch(&mut self, path: &str, token: &str) -> io::Result<()> {
        self.call(Op::Watch, 0, strings(&[path, token])).map(drop)
    }

    fn unwatch(&mut self, path: &str, token: &str) -> io::Result<()> {
        self.call(Op::Unwatch, 0, strings(&[path, token])).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fixture() {
        let packet = Packet {
            kind: Op::Write as u32,
            req_id: 7,
            tx_id: 3,
            payload: strings(&["a/b"]).into_iter().chain(*b"xy").collect(),
        };
        assert_eq!(
            packet.encode().unwrap(),
            [11, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 6, 0, 0, 0, b'a', b'/', b'b', 0, b'x', b'y']
        );
        let mut header = [0u8; 16];
        header.copy_from_slice(&packet.encode().unwrap()[..16]);
        assert_eq!(Packet::decode_header(&header).unwrap(), (11, 7, 3, 6));
        header[12..16].copy_from_slice(&4097u32.to_le_bytes());
        assert!(Packet::decode_header(&header).is_err());
    }

    #[test]
    fn payload_strings() {
        assert_eq!(split(b"x\0y\0"), ["x", "y"]);
        assert_eq!(split(b"value"), ["value"]);
        assert!(split(b"\0").is_empty());
        assert_eq!(errno_of("ENOENT"), libc::ENOENT);
        assert_eq!(errno_of("EWHAT"), libc::EIO);
    }

    /// A fake xenstored on the other end of a socket pair: answers a READ with an event
    /// first, then the reply.
    #[test]
    fn events_are_queued_while_waiting_for_a_reply() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut header = [0u8; 16];
            theirs.read_exact(&mut header).unwrap();
            let (kind, req_id, _, len) = Packet::decode_header(&header).unwrap();
            let mut payload = vec![0u8; len];
            theirs.read_exact(&mut payload).unwrap();
            assert_eq!((kind, payload.as_slice()), (Op::Read as u32, &b"k\0"[..]));
            let event = Packet {
                kind: Op::WatchEvent as u32,
                req_id: 0,
                tx_id: 0,
                payload: strings(&["w/path", "tok"]),
            };
            let reply = Packet {
                kind: Op::Read as u32,
                req_id,
                tx_id: 0,
                payload: b"v".to_vec(),
            };
            let missing = Packet {
                kind: Op::Error as u32,
                req_id: req_id + 1,
                tx_id: 0,
                payload: strings(&["ENOENT"]),
            };
            theirs.write_all(&event.encode().unwrap()).unwrap();
            theirs.write_all(&reply.encode().unwrap()).unwrap();
            theirs.read_exact(&mut header).unwrap();
            let (_, _, _, len) = Packet::decode_header(&header).unwrap();
            let mut payload = vec![0u8; len];
            theirs.read_exact(&mut payload).unwrap();
            theirs.write_all(&missing.encode().unwrap()).unwrap();
        });
        let mut client = Client::over(Box::new(ours));
        assert_eq!(client.call(Op::Read, 0, strings(&["k"])).unwrap(), b"v");
        let err = client.call(Op::Read, 0, strings(&["gone"])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            client.next_event().unwrap(),
            ("w/path".to_owned(), "tok".to_owned())
        );
        server.join().unwrap();
    }
}
