//! Many clients and bad input through the tapdisk export: connections see each other's
//! writes and are all held by pause; every bad-input case from the NBD issue gets the right
//! answer (or a disconnect) without desynchronising the stream, leaking data or stalling
//! anyone else.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::Env;
use nbd::proto;

const MIB: usize = 1 << 20;

/// The bytes `Env::raw_image(.., seed)` holds at `[offset, offset + len)`.
fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) / 512).to_le_bytes()[0].wrapping_add(seed))
        .collect()
}

/// A raw NBD client on a blocking UNIX socket.
struct Client {
    stream: UnixStream,
    structured: bool,
    size: u64,
}

impl Client {
    /// Fixed newstyle: optionally structured replies, then `NBD_OPT_GO`.
    fn connect(socket: &Path, structured: bool) -> Self {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut greeting = [0u8; proto::GREETING_LEN];
        stream.read_exact(&mut greeting).unwrap();
        let flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
        stream.write_all(&flags.to_be_bytes()).unwrap();
        let mut client = Self {
            stream,
            structured,
            size: 0,
        };
        if structured {
            client.option(proto::OPT_STRUCTURED_REPLY, &[]);
            let (_, reply_type, _) = client.option_reply();
            assert_eq!(reply_type, proto::REP_ACK);
        }
        // GO with an empty name and no info requests.
        client.option(proto::OPT_GO, &[0, 0, 0, 0, 0, 0]);
        loop {
            let (_, reply_type, data) = client.option_reply();
            match reply_type {
                proto::REP_INFO if data[0..2] == proto::INFO_EXPORT.to_be_bytes() => {
                    client.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                }
                proto::REP_INFO => {}
                proto::REP_ACK => break,
                other => panic!("unexpected option reply {other:#x}"),
            }
        }
        client
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let header = proto::OptionHeader {
            option,
            length: u32::try_from(data.len()).unwrap(),
        };
        self.stream.write_all(&header.encode()).unwrap();
        self.stream.write_all(data).unwrap();
    }

    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let head = self.read(20);
        assert_eq!(head[0..8], proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        (option, reply_type, self.read(len as usize))
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn send(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let header = proto::RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&header.encode()).unwrap();
    }

    /// Reads one complete reply: (cookie, error, data). Structured replies are gathered
    /// chunk by chunk until `DONE`; holes read as zeros.
    fn reply(&mut self) -> (u64, u32, Vec<u8>) {
        let magic = self.read(4);
        if magic == proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            let rest = self.read(12);
            let error = u32::from_be_bytes(rest[0..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
            return (cookie, error, Vec::new());
        }
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let mut data = Vec::new();
        let mut error = 0;
        let mut first = Some(magic);
        loop {
            if first.take().is_none() {
                let magic = self.read(4);
                assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
            }
            let head = self.read(16);
            let flags = u16::from_be_bytes(head[0..2].try_into().unwrap());
            let kind = u16::from_be_bytes(head[2..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(head[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize;
            let payload = self.read(len);
            match kind {
                proto::REPLY_TYPE_OFFSET_DATA => data.extend_from_slice(&payload[8..]),
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let hole = u32::from_be_bytes(payload[8..12].try_into().unwrap());
                    data.resize(data.len() + hole as usize, 0);
                }
                proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                    error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                }
                _ => {}
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                return (cookie, error, data);
            }
        }
    }

    /// A read whose simple reply carries `len` bytes of data on success.
    fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.send(proto::CMD_READ, 0, cookie, offset, len);
        let (got, error, mut data) = self.reply();
        assert_eq!(got, cookie);
        if !self.structured && error == 0 {
            data = self.read(len as usize);
        }
        (error, data)
    }

    fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(
            proto::CMD_WRITE,
            0,
            cookie,
            offset,
            u32::try_from(data.len()).unwrap(),
        );
        self.stream.write_all(data).unwrap();
        let (got, error, _) = self.reply();
        assert_eq!(got, cookie);
        error
    }

    /// True when the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
            || matches!(self.stream.read(&mut byte), Err(e) if e.kind() == ErrorKind::ConnectionReset)
    }
}

#[test]
fn connections_share_the_vbd_and_pause_holds_them_all() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 8 * MIB, 0);
    let (pid, minor) = env.create(&image, &[]);
    let socket = env.nbd_socket(pid, minor);
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::connect(&socket, i % 2 == 0))
        .collect();
    // Each writes its own block; every other one reads them all back.
    for (i, client) in clients.iter_mut().enumerate() {
        let fill = [u8::try_from(i).unwrap() + 0x40; 4096];
        assert_eq!(client.write_at(1, i as u64 * 4096, &fill), 0);
    }
    for client in &mut clients {
        for i in 0..4u64 {
            let (error, data) = client.read_at(2, i * 4096, 4096);
            assert_eq!(error, 0);
            assert!(data.iter().all(|b| u64::from(*b) == i + 0x40));
        }
    }
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    for (i, client) in clients.iter_mut().enumerate() {
        client.send(proto::CMD_READ, 0, 100 + i as u64, 0, 4096);
        client
            .stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        // Nothing arrives (a byte read here would be a reply while paused: a failure).
        let held = client.stream.read(&mut byte);
        assert!(
            matches!(&held, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "client {i} got a reply while paused: {held:?}"
        );
        client
            .stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
    }
    // The control socket is not held by the waiting requests.
    assert_eq!(env.list().len(), 1);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m]);
    for (i, client) in clients.iter_mut().enumerate() {
        let (cookie, error, mut data) = client.reply();
        assert_eq!((cookie, error), (100 + i as u64, 0));
        if !client.structured {
            data = client.read(4096);
        }
        assert!(data.iter().all(|b| *b == 0x40));
    }
    env.destroy(pid, minor);
}

#[test]
fn bad_requests_get_errors_and_the_stream_stays_in_sync() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 1);
    let (pid, minor) = env.create(&image, &[]);
    let socket = env.nbd_socket(pid, minor);
    for structured in [false, true] {
        let mut client = Client::connect(&socket, structured);
        let size = client.size;
        assert_eq!(size, 4 * MIB as u64);
        // A good read first, so a leak of its data would show below.
        let (error, data) = client.read_at(1, 0, 4096);
        assert_eq!(error, 0);
        assert_eq!(data, pattern(0, 4096, 1));
        // Out of range: one error reply, no payload, no previous data.
        let (error, data) = client.read_at(2, size - 512, 1024);
        assert_eq!(error, proto::EINVAL);
        assert!(data.is_empty(), "payload with an error reply");
        // Above the advertised maximum, and a 1 GiB read: EINVAL without streaming.
        let (error, _) = client.read_at(3, 0, 33 << 20);
        assert_eq!(error, proto::EINVAL);
        let (error, _) = client.read_at(4, 0, 1 << 30);
        assert_eq!(error, proto::EINVAL);
        // Unknown command.
        client.send(42, 0, 5, 0, 0);
        assert_eq!(client.reply().1, proto::EINVAL);
        // A write past the end consumes its payload.
        assert_eq!(client.write_at(6, size, &[7u8; 4096]), proto::ENOSPC);
        // Still in sync.
        let (error, data) = client.read_at(7, 512, 512);
        assert_eq!(error, 0);
        assert_eq!(data, pattern(512, 512, 1));
        client.send(proto::CMD_DISC, 0, 8, 0, 0);
        assert!(client.closed());
    }
    env.destroy(pid, minor);
}

#[test]
fn read_only_export_refuses_writes_with_eperm_and_lives_on() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 3);
    let (pid, minor) = env.create(&image, &["-R"]);
    let mut client = Client::connect(&env.nbd_socket(pid, minor), true);
    assert_eq!(client.write_at(1, 0, &[9u8; 4096]), proto::EPERM);
    client.send(proto::CMD_WRITE_ZEROES, 0, 2, 0, 4096);
    assert_eq!(client.reply().1, proto::EPERM);
    client.send(proto::CMD_TRIM, 0, 3, 0, 4096);
    assert_eq!(client.reply().1, proto::EPERM);
    let (error, data) = client.read_at(4, 0, 512);
    assert_eq!(error, 0);
    assert_eq!(data, pattern(0, 512, 3));
    env.destroy(pid, minor);
    assert_eq!(std::fs::read(&image).unwrap()[..4096], pattern(0, 4096, 3));
}

#[test]
fn garbage_stalls_and_oversized_options_harm_no_one_else() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 4);
    let (pid, minor) = env.create(&image, &[]);
    let socket = env.nbd_socket(pid, minor);

    // Random bytes in the handshake: closed, not livelocked.
    let mut garbage = UnixStream::connect(&socket).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    garbage.read_exact(&mut greeting).unwrap();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let _ = garbage.write_all(&noise);
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);

    // Option data above the limit: disconnect.
    let mut big = UnixStream::connect(&socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    big.read_exact(&mut greeting).unwrap();
    big.write_all(&proto::CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    let header = proto::OptionHeader {
        option: proto::OPT_GO,
        length: 16 << 20,
    };
    big.write_all(&header.encode()).unwrap();
    let mut rest = Vec::new();
    let _ = big.read_to_end(&mut rest);

    // A client that announces a 1 MiB write, sends 4 KiB and waits; another that stalls in
    // the handshake.
    let mut staller = Client::connect(&socket, false);
    staller.send(proto::CMD_WRITE, 0, 1, 0, 1 << 20);
    staller.stream.write_all(&[0x55u8; 4096]).unwrap();
    let mut handshake_staller = UnixStream::connect(&socket).unwrap();

    // Everyone else is served (a stalled server would hit the clients' read timeouts), and
    // so is the control socket.
    let mut other = Client::connect(&socket, true);
    for i in 0..50 {
        let (error, data) = other.read_at(i, 0, 4096);
        assert_eq!(error, 0);
        assert_eq!(data, pattern(0, 4096, 4));
    }
    assert_eq!(env.list().len(), 1);

    // The stalled writer vanishes mid-write: nothing of it reaches the disk.
    drop(staller);
    let (error, data) = other.read_at(99, 0, 4096);
    assert_eq!(error, 0);
    assert_eq!(data, pattern(0, 4096, 4), "a half-sent write was applied");

    // The handshake staller is dropped after the handshake timeout (10 s).
    handshake_staller
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut greeting_and_rest = Vec::new();
    let _ = handshake_staller.read_to_end(&mut greeting_and_rest);
    assert_eq!(greeting_and_rest.len(), proto::GREETING_LEN);
    env.destroy(pid, minor);
}
