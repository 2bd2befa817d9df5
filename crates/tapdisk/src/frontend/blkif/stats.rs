//! Statistics of one guest ring, published as the C tapdisk publishes them.
//!
//! * Counters for `tap-ctl stats` ("xenbus": pool, domid, devid, `reqs [in, out]`, `kicks
//!   [in, out]`, `errors {msg, map, vbd, img}`).
//! * `<shm>/td3-<pid>/vbd-<domid>-<devid>`: `struct stats`, 96 bytes little-endian (version 1,
//!   pad, oo_reqs, read submitted/completed/sectors/total µs, the same four for writes,
//!   io_errors, flags), the record xcp-rrdd's iostat plugin maps (it finds the pid in
//!   XenStore's `kthread-pid`).
//! * `<shm>/vbd3-<domid>-<devid>/statistics`: `struct blkback_stats`, 14 little-endian u64
//!   (discards, flushes, oo, then read req/cnt/sect/sum µs/max µs, write the same, flags);
//!   the directory's appearance is what the plugin watches for with inotify.
//! * `<shm>/vbd3-<domid>-<devid>/io_ring`: the ring indices as text, behind an 8-byte crc32
//!   of that text, rewritten (as `io_ring~`, then renamed) at most every 5 seconds.
//!
//! The files are created exclusively (a stale one makes the connect fail with `EEXIST`, as
//! in C) and removed on disconnect. Counts are kept in atomics and written to the files
//! with one `pwrite` each, at most once a second, instead of through a shared mapping.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blkif::ring::RingState;

use super::path_error;
use crate::stats::{XenbusErrors, XenbusStats};

/// Every counter of one ring.
#[derive(Debug, Default)]
pub struct RingCounters {
    /// Requests taken from the ring.
    pub reqs_in: AtomicU64,
    /// Requests completed (also after a disconnect).
    pub reqs_out: AtomicU64,
    /// Event-channel notifications received.
    pub kicks_in: AtomicU64,
    /// Batches of responses published.
    pub kicks_out: AtomicU64,
    /// Requests refused at intake (bad fields, grant copy failures).
    pub errors_map: AtomicU64,
    /// Requests the VBD refused (closed, read-only, out of range).
    pub errors_vbd: AtomicU64,
    /// Requests the image chain failed.
    pub errors_img: AtomicU64,
    /// Reads taken, completed, their sectors, total and largest latency (µs).
    pub read: DirectionCounters,
    /// The same for writes.
    pub write: DirectionCounters,
    /// Discards taken.
    pub discards: AtomicU64,
    /// Flushes taken (without data).
    pub flushes: AtomicU64,
}

/// Counters of reads or of writes.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    /// Requests taken.
    pub submitted: AtomicU64,
    /// Requests completed.
    pub completed: AtomicU64,
    /// Sectors of the requests taken.
    pub sectors: AtomicU64,
    /// Microseconds from intake to completion, summed.
    pub total_us: AtomicU64,
    /// Largest latency in microseconds.
    pub max_us: AtomicU64,
}

impl DirectionCounters {
    /// Counts a request taken.
    pub fn taken(&self, sectors: u64) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
        self.sectors.fetch_add(sectors, Ordering::Relaxed);
    }

    /// Counts a request completed after `micros`.
    pub fn completed(&self, micros: u64) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.total_us.fetch_add(micros, Ordering::Relaxed);
        self.max_us.fetch_max(micros, Ordering::Relaxed);
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl RingCounters {
    /// The `"xenbus"` member of `tap-ctl stats` for ring `(domid, devid)`.
    pub fn xenbus(&self, domid: u32, devid: u32) -> XenbusStats {
        XenbusStats {
            pool: "td-xenio-default",
            domid,
            devid,
            reqs: [get(&self.reqs_in), get(&self.reqs_out)],
            kicks: [get(&self.kicks_in), get(&self.kicks_out)],
            errors: XenbusErrors {
                msg: 0,
                map: get(&self.errors_map),
                vbd: get(&self.errors_vbd),
                img: get(&self.errors_img),
            },
        }
    }

    /// `struct stats` (96 bytes).
    pub fn td3_record(&self) -> [u8; 96] {
        let words = [
            1, // version (u32) and pad (u32), little-endian
            0, // oo_reqs
            get(&self.read.submitted),
            get(&self.read.completed),
            get(&self.read.sectors),
            get(&self.read.total_us),
            get(&self.write.submitted),
            get(&self.write.completed),
            get(&self.write.sectors),
            get(&self.write.total_us),
            get(&self.errors_img),
            0, // flags
        ];
        let mut out = [0u8; 96];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// `struct blkback_stats` (112 bytes).
    pub fn blkback_record(&self) -> [u8; 112] {
        let words = [
            get(&self.discards),
            get(&self.flushes),
            0, // oo
            get(&self.read.submitted),
            get(&self.read.completed),
            get(&self.read.sectors),
            get(&self.read.total_us),
            get(&self.read.max_us),
            get(&self.write.submitted),
            get(&self.write.completed),
            get(&self.write.sectors),
            get(&self.write.total_us),
            get(&self.write.max_us),
            0, // flags
        ];
        let mut out = [0u8; 112];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }
}

/// zlib's crc32 (reflected, polynomial 0xEDB88320), for the `io_ring` file.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The `io_ring` file's bytes: crc32 as a little-endian u64, then the text.
pub fn io_ring_bytes(state: &RingState) -> Vec<u8> {
    let mut text = String::new();
    let _ = write!(
        text,
        "nr_ents {}\nreq prod {} cons {} event {}\nrsp prod {} pvt {} event {}\n",
        state.size,
        state.req_prod,
        // printed with %d in C
        i32::from_ne_bytes(state.req_cons.to_ne_bytes()),
        state.req_event,
        state.rsp_prod,
        i32::from_ne_bytes(state.rsp_prod_pvt.to_ne_bytes()),
        state.rsp_event
    );
    let mut out = u64::from(crc32(text.as_bytes())).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// Where a tapdisk publishes ring statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsLocation {
    /// The shared-memory directory (`/dev/shm`).
    pub shm: PathBuf,
    /// This tapdisk's pid (`td3-<pid>`).
    pub pid: u32,
}

impl StatsLocation {
    /// `<shm>/td3-<pid>`.
    pub fn process_dir(&self) -> PathBuf {
        self.shm.join(format!("td3-{}", self.pid))
    }
}

/// A ring's statistics files, written by its task and removed by a disconnect.
pub type SharedFiles = std::sync::Arc<std::sync::Mutex<Option<StatsFiles>>>;

/// The statistics files of one connected ring.
#[derive(Debug)]
pub struct StatsFiles {
    td3: (PathBuf, File),
    vbd3_dir: PathBuf,
    statistics: File,
}

fn create_exclusive(path: &Path, len: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| path_error(e, path.display()))?;
    file.set_len(len)?;
    Ok(file)
}

impl StatsFiles {
    /// Creates the files of ring `(domid, devid)`.
    pub fn create(location: &StatsLocation, domid: u32, devid: u32) -> io::Result<Self> {
        let dir = location.process_dir();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .map_err(|e| path_error(e, dir.display()))?;
        let td3_path = dir.join(format!("vbd-{domid}-{devid}"));
        let td3 = create_exclusive(&td3_path, 4096)?;
        let vbd3_dir = location.shm.join(format!("vbd3-{domid}-{devid}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&vbd3_dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&td3_path);
                return Err(path_error(e, vbd3_dir.display()));
            }
            _ => {}
        }
        let statistics = match create_exclusive(&vbd3_dir.join("statistics"), 4096) {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(&td3_path);
                return Err(e);
            }
        };
        Ok(Self {
            td3: (td3_path, td3),
            vbd3_dir,
            statistics,
        })
    }

    /// Writes the counters into both records.
    pub fn write(&self, counters: &RingCounters) -> io::Result<()> {
        self.td3.1.write_all_at(&counters.td3_record(), 0)?;
        self.statistics.write_all_at(&counters.blkback_record(), 0)
    }

    /// Rewrites `io_ring` (through `io_ring~` and a rename).
    pub fn write_io_ring(&self, state: &RingState) -> io::Result<()> {
        let tmp = self.vbd3_dir.join("io_ring~");
        std::fs::write(&tmp, io_ring_bytes(state))?;
        std::fs::rename(&tmp, self.vbd3_dir.join("io_ring"))
    }

    /// Removes the files (and the `vbd3-<domid>-<devid>` directory).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.td3.0);
        for name in ["statistics", "io_ring", "io_ring~"] {
            let _ = std::fs::remove_file(self.vbd3_dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.vbd3_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn records_are_laid_out_as_in_c() {
        let counters = RingCounters::default();
        counters.read.taken(8);
        counters.read.completed(250);
        counters.write.taken(16);
        counters.errors_img.fetch_add(1, Ordering::Relaxed);
        let td3 = counters.td3_record();
        assert_eq!(td3[0..4], 1u32.to_le_bytes());
        assert_eq!(td3[16..24], 1u64.to_le_bytes()); // read_reqs_submitted
        assert_eq!(td3[24..32], 1u64.to_le_bytes()); // read_reqs_completed
        assert_eq!(td3[32..40], 8u64.to_le_bytes()); // read_sectors
        assert_eq!(td3[40..48], 250u64.to_le_bytes()); // read_total_ticks
        assert_eq!(td3[48..56], 1u64.to_le_bytes()); // write_reqs_submitted
        assert_eq!(td3[64..72], 16u64.to_le_bytes()); // write_sectors
        assert_eq!(td3[80..88], 1u64.to_le_bytes()); // io_errors
        let blkback = counters.blkback_record();
        assert_eq!(blkback[24..32], 1u64.to_le_bytes()); // st_rd_req
        assert_eq!(blkback[56..64], 250u64.to_le_bytes()); // st_rd_max_usecs
        assert_eq!(blkback[80..88], 16u64.to_le_bytes()); // st_wr_sect
    }

    #[test]
    fn io_ring_text_and_checksum() {
        let state = RingState {
            size: 32,
            req_prod: 7,
            req_cons: 7,
            req_event: 8,
            rsp_prod: 7,
            rsp_prod_pvt: 7,
            rsp_event: 8,
        };
        let bytes = io_ring_bytes(&state);
        let text = "nr_ents 32\nreq prod 7 cons 7 event 8\nrsp prod 7 pvt 7 event 8\n";
        assert_eq!(&bytes[8..], text.as_bytes());
        assert_eq!(bytes[..8], u64::from(crc32(text.as_bytes())).to_le_bytes());
    }

    #[test]
    fn files_are_created_exclusively_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let location = StatsLocation {
            shm: dir.path().to_path_buf(),
            pid: 42,
        };
        let files = StatsFiles::create(&location, 3, 51712).unwrap();
        let again = StatsFiles::create(&location, 3, 51712).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        let counters = RingCounters::default();
        counters.write.taken(8);
        files.write(&counters).unwrap();
        let record = std::fs::read(dir.path().join("td3-42/vbd-3-51712")).unwrap();
        assert_eq!(record.len(), 4096);
        assert_eq!(record[48..56], 1u64.to_le_bytes());
        files.remove();
        assert!(!dir.path().join("td3-42/vbd-3-51712").exists());
        assert!(!dir.path().join("vbd3-3-51712").exists());
    }
}
