//! The crash-test harness shared by the drivers' kill -9 tests: a minimal blocking NBD client
//! that streams random writes and discards with a flush after every batch until tapdisk is
//! killed, a model of what every sector may hold afterwards (the last write covered by a
//! completed flush, or any write issued since), and the test's loop ([`kill_during_writes`]):
//! each driver only says how to make a child image, check an image and read the disk back.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{process_alive, wait_for, Env, Lcg};
use nbd::proto;

pub const MIB: u64 = 1 << 20;
pub const DISK: u64 = 32 * MIB;
/// Sectors of the disk (`DISK / 512`).
pub const SECTORS: usize = 65536;

/// Sector `sector` as written by write `id`: id, sector, then a fill byte. Id 0 is zeros.
pub fn sector_data(id: u64, sector: u64) -> [u8; 512] {
    let mut data = [0u8; 512];
    if id != 0 {
        data[..8].copy_from_slice(&id.to_le_bytes());
        data[8..16].copy_from_slice(&sector.to_le_bytes());
        data[16..].fill(u8::try_from((id * 31 + sector) % 251).unwrap() | 1);
    }
    data
}

/// A minimal blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO`, simple replies.
pub struct Client {
    stream: UnixStream,
    next_handle: u64,
}

impl Client {
    fn connect(socket: &Path) -> std::io::Result<Self> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello)?;
        assert_eq!(&hello[..8], &proto::NBDMAGIC.to_be_bytes());
        stream.write_all(
            &(proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES).to_be_bytes(),
        )?;
        let mut option = Vec::new();
        option.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        option.extend_from_slice(&6u32.to_be_bytes());
        option.extend_from_slice(&0u32.to_be_bytes()); // empty export name
        option.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        stream.write_all(&option)?;
        loop {
            let mut reply = [0u8; 20];
            stream.read_exact(&mut reply)?;
            let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(reply[16..20].try_into().unwrap());
            let mut payload = vec![0u8; usize::try_from(len).unwrap()];
            stream.read_exact(&mut payload)?;
            match kind {
                proto::REP_ACK => break,
                proto::REP_INFO => {}
                other => panic!("NBD_OPT_GO refused: {other:#x}"),
            }
        }
        Ok(Self {
            stream,
            next_handle: 1,
        })
    }

    fn send(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> std::io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut request = Vec::with_capacity(28 + data.len());
        request.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&command.to_be_bytes());
        request.extend_from_slice(&handle.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        request.extend_from_slice(data);
        self.stream.write_all(&request)?;
        Ok(handle)
    }

    /// Reads one simple reply: (handle, error).
    fn reply(&mut self) -> std::io::Result<(u64, u32)> {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        assert_eq!(&reply[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        Ok((
            u64::from_be_bytes(reply[8..16].try_into().unwrap()),
            u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        ))
    }
}

/// What each sector must hold: the id of the last write covered by a completed flush, plus the
/// ids written since (any of which may have landed).
pub struct Model {
    pub durable: Vec<u64>,
    pub since: Vec<Vec<u64>>,
    pub next_id: u64,
}

impl Model {
    fn issue(&mut self, first: usize, count: usize, id: u64) {
        for s in first..first + count {
            self.since[s].push(id);
        }
    }

    fn flushed(&mut self) {
        for (durable, since) in self.durable.iter_mut().zip(&mut self.since) {
            if let Some(last) = since.last() {
                *durable = *last;
            }
            since.clear();
        }
    }
}

/// Streams batches of writes (and some discards), each followed by a flush, until the
/// connection dies. Returns the number of completed flushes.
pub fn stream_until_killed(socket: &Path, model: &mut Model, rng: &mut Lcg) -> usize {
    let Ok(mut client) = Client::connect(socket) else {
        return 0;
    };
    let mut flushes = 0;
    loop {
        let batch = 1 + rng.next(8);
        let mut sent = 0;
        // Requests in flight together never overlap: their order would be undefined.
        let mut in_flight: Vec<(u64, u64)> = Vec::new();
        for _ in 0..batch {
            let (first, count) = if rng.next(8) == 0 {
                let block = rng.next(DISK / (2 * MIB));
                (block * 4096, 4096)
            } else {
                let count = 1 + rng.next(256);
                (rng.next(DISK / 512 - count), count)
            };
            if in_flight
                .iter()
                .any(|(f, c)| first < f + c && *f < first + count)
            {
                continue;
            }
            in_flight.push((first, count));
            let id = model.next_id;
            model.next_id += 1;
            let (first_index, len) = (
                usize::try_from(first).unwrap(),
                usize::try_from(count).unwrap(),
            );
            let result = if rng.next(6) == 0 {
                model.issue(first_index, len, 0);
                client.send(
                    proto::CMD_TRIM,
                    first * 512,
                    u32::try_from(count * 512).unwrap(),
                    &[],
                )
            } else {
                let mut data = Vec::with_capacity(len * 512);
                for s in first..first + count {
                    data.extend_from_slice(&sector_data(id, s));
                }
                model.issue(first_index, len, id);
                client.send(
                    proto::CMD_WRITE,
                    first * 512,
                    u32::try_from(count * 512).unwrap(),
                    &data,
                )
            };
            if result.is_err() {
                return flushes;
            }
            sent += 1;
        }
        for _ in 0..sent {
            match client.reply() {
                Ok((_, 0)) => {}
                Ok((handle, error)) => panic!("request {handle} failed with {error}"),
                Err(_) => return flushes,
            }
        }
        if client.send(proto::CMD_FLUSH, 0, 0, &[]).is_err() {
            return flushes;
        }
        match client.reply() {
            Ok((_, 0)) => {
                model.flushed();
                flushes += 1;
            }
            Ok((handle, error)) => panic!("flush {handle} failed with {error}"),
            Err(_) => return flushes,
        }
    }
}

impl Model {
    /// A model of a disk of `SECTORS` sectors that was never written.
    pub fn new() -> Self {
        Self {
            durable: vec![0; SECTORS],
            since: vec![Vec::new(); SECTORS],
            next_id: 1,
        }
    }

    /// Checks that every sector of `disk` (as read after a crash) holds an allowed write,
    /// then makes what was found the new durable state.
    pub fn verify(&mut self, disk: &[u8], iteration: usize) {
        for (s, data) in disk.chunks(512).enumerate() {
            let id = u64::from_le_bytes(data[..8].try_into().unwrap());
            let allowed = id == self.durable[s] || self.since[s].contains(&id);
            assert!(
                allowed && data == sector_data(id, u64::try_from(s).unwrap()),
                "iteration {iteration}: sector {s} holds write {id} (as written to sector {}), \
                 expected {} or one of {:?}",
                u64::from_le_bytes(data[8..16].try_into().unwrap()),
                self.durable[s],
                self.since[s]
            );
            self.durable[s] = id;
            self.since[s].clear();
        }
    }
}

/// What the kill -9 test needs to know about one image format.
pub struct Format<'a> {
    /// The image type tapdisk opens (`vhd`, `qcow2`).
    pub disk_type: &'a str,
    /// Makes `child` a differencing image of `base`.
    pub make_child: &'a dyn Fn(&Path, &Path),
    /// Fails the test unless the image is consistent (after kill `iteration`).
    pub check: &'a dyn Fn(&Path, usize),
    /// The whole virtual disk of the chain whose leaf is given, as read by a peer.
    pub read_disk: &'a dyn Fn(&Path) -> Vec<u8>,
}

/// The number of kills: `$var` if set, else `default`.
pub fn iterations(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kills tapdisk `iterations` times while [`stream_until_killed`] writes to `base` (the first
/// half) and then to a child of it made at `child`, checking after every kill that the image
/// is consistent and that every sector holds what the model allows; at the end, that enough
/// flushes completed and that `base` is still consistent.
pub fn kill_during_writes(
    format: &Format<'_>,
    base: &Path,
    child: &Path,
    iterations: usize,
    seed: u64,
) {
    let mut model = Model::new();
    let mut rng = Lcg(seed);
    let mut total_flushes = 0;
    let mut leaf: PathBuf = base.to_path_buf();
    for iteration in 0..iterations {
        if iteration == iterations / 2 {
            (format.make_child)(base, child);
            leaf = child.to_path_buf();
        }
        let env = Env::new();
        let (pid, minor) = env.create_params(
            &format!("{}:{}", format.disk_type, leaf.display()),
            &["-b", "none"],
        );
        let socket = env.nbd_socket(pid, minor);
        let delay = Duration::from_millis(20 + rng.next(150));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        });
        total_flushes += stream_until_killed(&socket, &mut model, &mut rng);
        killer.join().unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || !process_alive(pid)),
            "tapdisk {pid} survived SIGKILL"
        );
        (format.check)(&leaf, iteration);
        let disk = (format.read_disk)(&leaf);
        assert_eq!(disk.len() as u64, DISK);
        model.verify(&disk, iteration);
    }
    assert!(
        total_flushes > iterations,
        "only {total_flushes} flushes completed"
    );
    (format.check)(base, iterations);
}
