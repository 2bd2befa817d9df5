//! Crash test of the `vhd` driver: tapdisk is killed with SIGKILL while a client streams random
//! writes and discards with periodic flushes over NBD. After every kill `vhd-util check` must
//! accept the image and every write acknowledged before a completed flush must read back
//! (sectors written after the last completed flush may hold any of the values written since).
//! The first half of the iterations runs on a dynamic VHD, the second half on a differencing
//! child of it. `VHD_CRASH_ITERATIONS` overrides the number of iterations (default 50).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{process_alive, vhd_util_ok, wait_for, Env, Lcg};
use nbd::proto;

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
/// Sectors of the disk (`DISK / 512`).
const SECTORS: usize = 65536;

/// Sector `sector` as written by write `id`: id, sector, then a fill byte. Id 0 is zeros.
fn sector_data(id: u64, sector: u64) -> [u8; 512] {
    let mut data = [0u8; 512];
    if id != 0 {
        data[..8].copy_from_slice(&id.to_le_bytes());
        data[8..16].copy_from_slice(&sector.to_le_bytes());
        data[16..].fill(u8::try_from((id * 31 + sector) % 251).unwrap() | 1);
    }
    data
}

/// A minimal blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO`, simple replies.
struct Client {
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
struct Model {
    durable: Vec<u64>,
    since: Vec<Vec<u64>>,
    next_id: u64,
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
fn stream_until_killed(socket: &Path, model: &mut Model, rng: &mut Lcg) -> usize {
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

/// Reads the whole chain at `leaf` with the `vhd` library and checks it against the model;
/// then makes what was found the new durable state.
fn verify(leaf: &Path, model: &mut Model, iteration: usize) {
    let chain = vhd::Chain::open(leaf, false).unwrap();
    let mut disk = vec![0u8; usize::try_from(DISK).unwrap()];
    chain.read(0, &mut disk).unwrap();
    for (s, data) in disk.chunks(512).enumerate() {
        let id = u64::from_le_bytes(data[..8].try_into().unwrap());
        let allowed = id == model.durable[s] || model.since[s].contains(&id);
        assert!(
            allowed && data == sector_data(id, u64::try_from(s).unwrap()),
            "iteration {iteration}: sector {s} holds write {id}, expected {} or one of {:?}",
            model.durable[s],
            model.since[s]
        );
        model.durable[s] = id;
        model.since[s].clear();
    }
}

fn check_vhd(path: &Path) {
    let out = Command::new(common::vhd_util_bin())
        .args(["check", "-n", &path.display().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("is valid"),
        "{}: {stdout}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_during_writes_keeps_flushed_data_and_a_valid_image() {
    let iterations: usize = std::env::var("VHD_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.vhd");
    let child = images.path().join("child.vhd");
    vhd_util_ok(&["create", "-n", &base.display().to_string(), "-s", "32"]);
    let mut model = Model {
        durable: vec![0; SECTORS],
        since: vec![Vec::new(); SECTORS],
        next_id: 1,
    };
    let mut rng = Lcg(2024);
    let mut total_flushes = 0;
    let mut leaf = base.clone();
    for iteration in 0..iterations {
        if iteration == iterations / 2 {
            vhd_util_ok(&[
                "snapshot",
                "-n",
                &child.display().to_string(),
                "-p",
                &base.display().to_string(),
            ]);
            leaf = child.clone();
        }
        let env = Env::new();
        let (pid, minor) = env.create_params(&format!("vhd:{}", leaf.display()), &["-b", "none"]);
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
        check_vhd(&leaf);
        verify(&leaf, &mut model, iteration);
    }
    assert!(
        total_flushes > iterations,
        "only {total_flushes} flushes completed"
    );
    check_vhd(&base);
}
