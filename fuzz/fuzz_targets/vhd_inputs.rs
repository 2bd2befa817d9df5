//! Shared by the VHD planner and driver fuzz targets: images built from fuzz input (a valid
//! base image whose metadata the input patches, with checksums optionally fixed up so the
//! patches get past parsing, or the raw input as the whole image), operation sequences, a
//! model of the disk's contents, and the guard that every write lands in the data area.
//!
//! Input layout: a mode byte (low two bits pick the base image: fresh dynamic, dynamic with
//! allocated blocks, differencing, dynamic on a block device; mode 0xff: the rest is the
//! image itself), a patch count, 4-byte patches, a flags byte (bit 0: fix checksums), then
//! 6-byte operations.

use std::sync::OnceLock;

use vhd::create::{create, CreateOptions, ParentSpec};
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{BlockFile, MemFile};
use vhd::locator::PlatformCode;
use vhd::metadata::{Area, Metadata, Placement, Region};

/// Virtual size of the base images: sixteen blocks.
const SIZE: u64 = 1 << 20;
/// Block size of the base images (small, so each run is cheap; the logic is the same).
const BLOCK: u32 = 64 << 10;
/// Size of the block device of the device base image: room for fifteen blocks.
const DEVICE: usize = (1 << 20) + (64 << 10);
/// Largest disk whose contents are modelled.
const MODEL_LIMIT: u64 = 64 << 20;

/// One operation on the virtual disk.
#[derive(Debug, Clone, Copy)]
pub enum FuzzOp {
    /// Write `count` sectors of a pattern derived from `seed`.
    Write { sector: u64, count: u64, seed: u8 },
    /// Discard (`deallocate`) or write-zeroes keeping the space.
    Zero {
        sector: u64,
        count: u64,
        deallocate: bool,
    },
    /// Read and compare with the model.
    Read { sector: u64, count: u64 },
}

impl FuzzOp {
    /// The sector range it touches.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Self::Write { sector, count, .. }
            | Self::Zero { sector, count, .. }
            | Self::Read { sector, count } => (sector, count),
        }
    }
}

/// The data a write of `count` sectors at `sector` with `seed` carries.
pub fn pattern(seed: u8, sector: u64, count: u64) -> Vec<u8> {
    let mut out = vec![0u8; usize::try_from(count * 512).unwrap_or(0)];
    for (i, chunk) in out.chunks_mut(512).enumerate() {
        chunk.fill(seed.wrapping_add(((sector + i as u64) % 251) as u8) | 1);
    }
    out
}

fn base_images() -> &'static [Vec<u8>; 4] {
    static BASES: OnceLock<[Vec<u8>; 4]> = OnceLock::new();
    BASES.get_or_init(|| {
        let options = CreateOptions {
            block_size: BLOCK,
            ..CreateOptions::dynamic(SIZE)
        };
        let fresh = || {
            create(MemFile::default(), "base", &options, None)
                .expect("create")
                .into_file()
                .contents()
        };
        let mut allocated =
            VhdImage::open(MemFile::new(fresh()), "base", OpenOptions::read_write()).expect("open");
        allocated
            .write_sectors(8, &pattern(1, 8, 8))
            .expect("write");
        allocated
            .write_sectors(256, &pattern(2, 256, 128))
            .expect("write");
        let spec = ParentSpec {
            uuid: [7; 16],
            timestamp: 1,
            name: "parent.vhd".into(),
            locators: vec![(PlatformCode::Macx, "./parent.vhd".into())],
            keyhash: None,
        };
        let mut child =
            create(MemFile::default(), "child", &options, Some(&spec)).expect("create child");
        child
            .write_sectors(128 + 17, &pattern(3, 145, 30))
            .expect("write");
        let mut device = fresh();
        let footer = device.split_off(device.len() - 512);
        device.resize(DEVICE - 512, 0xee);
        device.extend_from_slice(&footer);
        [
            fresh(),
            allocated.into_file().contents(),
            child.into_file().contents(),
            device,
        ]
    })
}

/// Reads a big-endian u32 / u64 at `at`, zero past the end.
fn be(bytes: &[u8], at: usize, n: usize) -> u64 {
    bytes
        .get(at..at.saturating_add(n))
        .map_or(0, |b| b.iter().fold(0u64, |v, x| (v << 8) | u64::from(*x)))
}

fn put32(bytes: &mut [u8], at: usize, v: u32) {
    if let Some(b) = bytes.get_mut(at..at.saturating_add(4)) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// Recomputes the checksums of both footers, the dynamic header and the batmap.
fn fix_checksums(bytes: &mut [u8]) {
    let len = bytes.len();
    if len < 1024 {
        return;
    }
    for at in [0, len / 512 * 512 - 512] {
        let sum = vhd::ones_complement_checksum(&bytes[at..at + 512], Some(64));
        put32(bytes, at + 64, sum);
    }
    let Ok(header) = usize::try_from(be(bytes, len / 512 * 512 - 512 + 16, 8)) else {
        return;
    };
    if header.saturating_add(1024) > len {
        return;
    }
    let sum = vhd::ones_complement_checksum(&bytes[header..header + 1024], Some(36));
    put32(bytes, header + 36, sum);
    let table = be(bytes, header + 16, 8);
    let entries = be(bytes, header + 28, 4);
    let Ok(batmap) = usize::try_from(table + (entries * 4).div_ceil(512).max(1) * 512) else {
        return;
    };
    let map_at = usize::try_from(be(bytes, batmap + 8, 8)).unwrap_or(usize::MAX);
    let map_len = usize::try_from(be(bytes, batmap + 16, 4) * 512).unwrap_or(usize::MAX);
    let version = u32::try_from(be(bytes, batmap + 20, 4)).unwrap_or(0);
    if let Some(map) = bytes.get(map_at..map_at.saturating_add(map_len)) {
        let sum = vhd::batmap::batmap_checksum(map, version);
        put32(bytes, batmap + 24, sum);
    }
}

/// An image and the operations to run on it, from fuzz input.
pub struct Case {
    /// The image's bytes.
    pub bytes: Vec<u8>,
    /// Whether it lives on a block device.
    pub device: bool,
    /// The operations.
    pub ops: Vec<FuzzOp>,
}

impl Case {
    /// Decodes `data` (see the module documentation).
    pub fn decode(data: &[u8]) -> Option<Self> {
        let (&mode, rest) = data.split_first()?;
        if mode == 0xff {
            if rest.len() > (4 << 20) {
                return None;
            }
            let fixed_ops = [
                FuzzOp::Read {
                    sector: 0,
                    count: 64,
                },
                FuzzOp::Write {
                    sector: 3,
                    count: 9,
                    seed: 1,
                },
                FuzzOp::Zero {
                    sector: 0,
                    count: 4096,
                    deallocate: true,
                },
                FuzzOp::Write {
                    sector: 130,
                    count: 1,
                    seed: 2,
                },
            ];
            return Some(Self {
                bytes: rest.to_vec(),
                device: false,
                ops: fixed_ops.to_vec(),
            });
        }
        let base = usize::from(mode & 3);
        let mut bytes = base_images()[base].clone();
        let len = bytes.len();
        let (&patches, mut rest) = rest.split_first()?;
        for _ in 0..patches % 24 {
            let Some((p, tail)) = rest.split_first_chunk::<4>() else {
                break;
            };
            rest = tail;
            let at16 = usize::from(u16::from_le_bytes([p[1], p[2]]));
            match p[0] % 4 {
                // Any byte of the first 64 KiB (footer copy, header, BAT, batmap, locators).
                0 => {
                    let at = at16 % len;
                    bytes[at] ^= p[3];
                }
                // A BAT entry set to a small sector (into the metadata or the first blocks).
                1 => {
                    let entry = 1536 + 4 * (usize::from(p[1]) % 4);
                    put32(
                        &mut bytes,
                        entry,
                        u32::from(u16::from_le_bytes([p[2], p[3]])) % 64,
                    );
                }
                // A BAT entry set near the primary footer.
                2 => {
                    let footer = u32::try_from(len / 512 - 1).unwrap_or(0);
                    let entry = 1536 + 4 * (usize::from(p[1]) % 16);
                    put32(&mut bytes, entry, footer.saturating_sub(u32::from(p[3])));
                }
                // A byte of the primary footer.
                _ => {
                    let at = len - 512 + at16 % 512;
                    bytes[at] ^= p[3];
                }
            }
        }
        let (&flags, mut rest) = rest.split_first().unwrap_or((&1, &[]));
        if flags & 1 != 0 {
            fix_checksums(&mut bytes);
        }
        let mut ops = Vec::new();
        while let Some((o, tail)) = rest.split_first_chunk::<6>() {
            rest = tail;
            let sector = u64::from(u32::from_le_bytes([o[1], o[2], o[3], o[4]]));
            let count = 1 + (u64::from(o[5]) * 37) % 512;
            ops.push(match o[0] % 5 {
                0 | 1 => FuzzOp::Write {
                    sector,
                    count,
                    seed: o[0],
                },
                2 => FuzzOp::Zero {
                    sector,
                    count,
                    deallocate: true,
                },
                3 => FuzzOp::Zero {
                    sector,
                    count,
                    deallocate: false,
                },
                _ => FuzzOp::Read { sector, count },
            });
            if ops.len() >= 16 {
                break;
            }
        }
        Some(Self {
            bytes,
            device: base == 3,
            ops,
        })
    }

    /// The image as a file.
    pub fn file(&self) -> MemFile {
        if self.device {
            MemFile::device(self.bytes.clone())
        } else {
            MemFile::new(self.bytes.clone())
        }
    }
}

/// Clamps an operation into a disk of `total` sectors (`None` for an empty disk).
pub fn clamp(op: FuzzOp, total: u64) -> Option<FuzzOp> {
    if total == 0 {
        return None;
    }
    let (sector, count) = op.range();
    let sector = sector % total;
    let count = count.min(total - sector);
    Some(match op {
        FuzzOp::Write { seed, .. } => FuzzOp::Write {
            sector,
            count,
            seed,
        },
        FuzzOp::Zero { deallocate, .. } => FuzzOp::Zero {
            sector,
            count,
            deallocate,
        },
        FuzzOp::Read { .. } => FuzzOp::Read { sector, count },
    })
}

/// Checks that writes land only in the data area: nothing overlaps the header, the parent
/// locators or the backup footer; the BAT and batmap are written only as whole structures of
/// theirs; on a block device nothing goes at or past the footer.
#[derive(Debug, Clone)]
pub struct Guard {
    regions: Vec<Region>,
    placement: Placement,
    footer_offset: u64,
    sparse: bool,
}

impl Guard {
    /// The guard of an image opened with `meta`.
    pub fn new(meta: &Metadata) -> Self {
        Self {
            regions: meta.regions().to_vec(),
            placement: meta.placement(),
            footer_offset: meta.footer_offset(),
            sparse: meta.header().is_some(),
        }
    }

    /// Panics if a write of `len` bytes at `offset` leaves the data area.
    pub fn check_write(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if !self.sparse {
            // Fixed: data only, never the footer.
            assert!(
                end <= self.footer_offset,
                "write {offset}+{len} reaches the footer at {}",
                self.footer_offset
            );
            return;
        }
        if self.placement == Placement::Device {
            assert!(
                end <= self.footer_offset,
                "write {offset}+{len} reaches the device's footer at {}",
                self.footer_offset
            );
        }
        let batmap: Vec<&Region> = self
            .regions
            .iter()
            .filter(|r| matches!(r.area, Area::BatmapHeader | Area::Batmap))
            .collect();
        for r in &self.regions {
            if !(r.start < end && offset < r.end) {
                continue;
            }
            match r.area {
                Area::Bat => assert!(
                    offset >= r.start
                        && end <= r.end
                        && len == 512
                        && (offset - r.start).is_multiple_of(512),
                    "write {offset}+{len} is not a BAT sector of the BAT at {}..{}",
                    r.start,
                    r.end
                ),
                Area::BatmapHeader | Area::Batmap => {
                    let covered = (offset..end)
                        .step_by(512)
                        .all(|at| batmap.iter().any(|b| at >= b.start && at < b.end));
                    assert!(covered, "write {offset}+{len} strays out of the batmap");
                }
                // A new block may overwrite a file's old footer (after the new one is written).
                Area::Footer if self.placement == Placement::File => {}
                _ => panic!(
                    "write {offset}+{len} overlaps the {} at {}..{}",
                    r.area, r.start, r.end
                ),
            }
        }
    }
}

/// The disk's expected contents, and which sectors are known (an operation that failed
/// part-way leaves its range unknown).
pub struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    /// A model of `total` sectors read with `read` (`None` when too large to model).
    pub fn new(total: u64, read: impl FnOnce(&mut [u8]) -> bool) -> Option<Self> {
        if total * 512 > MODEL_LIMIT {
            return None;
        }
        let mut data = vec![0u8; usize::try_from(total * 512).ok()?];
        let known = read(&mut data);
        Some(Self {
            data,
            known: vec![known; usize::try_from(total).ok()?],
        })
    }

    fn set(&mut self, sector: u64, bytes: Option<&[u8]>) {
        let Ok(i) = usize::try_from(sector) else {
            return;
        };
        if i >= self.known.len() {
            return;
        }
        self.known[i] = bytes.is_some();
        if let Some(b) = bytes {
            self.data[i * 512..(i + 1) * 512].copy_from_slice(b);
        }
    }

    /// Records the outcome of `op` (`ok`: it completed).
    pub fn apply(&mut self, op: &FuzzOp, ok: bool) {
        let (sector, count) = op.range();
        match *op {
            FuzzOp::Read { .. } => {}
            FuzzOp::Write { seed, .. } => {
                let data = pattern(seed, sector, count);
                for (i, s) in data.chunks(512).enumerate() {
                    self.set(sector + i as u64, ok.then_some(s));
                }
            }
            FuzzOp::Zero { .. } => {
                for i in 0..count {
                    self.set(sector + i, ok.then_some(&[0u8; 512][..]));
                }
            }
        }
    }

    /// Compares what a read of sectors from `sector` returned.
    pub fn verify(&self, sector: u64, data: &[u8]) {
        for (i, got) in data.chunks(512).enumerate() {
            let Ok(at) = usize::try_from(sector + i as u64) else {
                continue;
            };
            if self.known.get(at) == Some(&true) {
                assert!(
                    got == &self.data[at * 512..(at + 1) * 512],
                    "sector {at} differs from the model"
                );
            }
        }
    }
}

/// Opens the case's image as a writer would; `None` when it is refused.
pub fn open_case(case: &Case) -> Option<VhdImage<MemFile>> {
    VhdImage::open(case.file(), "fuzz.vhd", OpenOptions::read_write()).ok()
}

/// Checks that `bytes`, what became of the case's image, still opens as a writer would and
/// reads like the model.
pub fn reopen_and_verify(case: &Case, bytes: Vec<u8>, model: Option<&Model>) {
    let file = if case.device {
        MemFile::device(bytes)
    } else {
        MemFile::new(bytes)
    };
    let reopened = VhdImage::open(file, "fuzz.vhd", OpenOptions::read_write())
        .unwrap_or_else(|e| panic!("the image no longer opens: {e}"));
    if let Some(model) = model {
        let total = reopened.total_sectors();
        let mut buf = vec![0u8; usize::try_from(total * 512).unwrap_or(0)];
        if read_all(&reopened, &mut buf) {
            model.verify(0, &buf);
        }
    }
}

/// Reads all of `image` into `buf`; false on any error.
pub fn read_all<F: BlockFile>(image: &VhdImage<F>, buf: &mut [u8]) -> bool {
    image.read_sectors(0, buf).is_ok()
}
