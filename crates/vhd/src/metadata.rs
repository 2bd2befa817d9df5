//! The VHD core: an in-memory model of one image's metadata that plans I/O and does none.
//!
//! [`Metadata`] holds what an open image needs to serve I/O: the footer and where it lives,
//! the dynamic header, the BAT, the tapdisk batmap (as on disk, and the working set of blocks
//! known to be full), the metadata regions, the allocation cursor and a bounded cache of
//! block bitmaps. It is built from the structures an executor read at open
//! ([`Metadata::new`], which validates the layout: every BAT entry must point into the data
//! area), and from then on it answers:
//!
//! * [`Metadata::map`]: where sectors are (present with their file offsets, or absent);
//! * [`Metadata::plan`] / [`Metadata::plan_locked`]: the ordered steps of a write, discard or
//!   write-zeroes of one [`Piece`] (see [`crate::plan`] for the contract);
//! * [`Metadata::prepare`] / [`Metadata::complete`]: the bytes of a step rendered from the
//!   current state, and its effect once done.
//!
//! Executors do the I/O: [`crate::image::VhdImage`] synchronously over a
//! [`crate::io::BlockFile`] (vhd-util), tapdisk's `vhd` driver asynchronously over its I/O
//! engine. Locks are theirs too: the core names the lock a step needs
//! ([`crate::plan::Step::serial`]); an executor with exclusive access needs none.
//!
//! Semantics every executor gets from here:
//! * a new block goes after all data and metadata, its data page aligned; in a regular file
//!   the footer first moves to the block's end, on a block device (the footer fixed at the
//!   device's end) the block must fit before the footer or the write fails with `ENOSPC`;
//!   nothing past 2 TiB (`EFBIG`); the spot is re-checked against every metadata region;
//! * a write into an allocated block writes the data, then sets its bitmap bits (under the
//!   block's lock, from the bits as they are then), then marks the block full in the batmap;
//! * discard frees whole blocks of an image without parent (batmap bit, then BAT entry, then
//!   the space) and clears the bits of partial ones (after zeroing their data); in a
//!   differencing image, and for write-zeroes that must keep space, sectors become present
//!   zeros so a parent's data never shows through.

use std::collections::HashMap;
use std::fmt;

use crate::bat::{Bat, BAT_UNUSED};
use crate::batmap::{batmap_checksum, BatmapHeader, BATMAP_HEADER_SIZE};
use crate::bitmap::{self, SectorBitmap};
use crate::bytes::round_up;
use crate::error::{FormatError, Result, VhdError};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE};
use crate::plan::{
    BitmapLoad, DataWrite, Effect, Extent, Io, LoadedBitmap, Mapping, Op, Piece, Plan, Planned,
    Prepare, Prepared, Step, ZeroRange,
};

/// Sector size.
pub const SECTOR: u64 = 512;
/// Largest physical offset a BAT entry can express: 2^32 sectors (2 TiB).
pub const MAX_PHYSICAL_BYTES: u64 = (1u64 << 32) * SECTOR;
/// New data blocks start on this boundary (page aligned, as tapdisk does).
pub const DATA_ALIGNMENT: u64 = 4096;
/// Largest BAT this library accepts (2^28 entries; 512 TiB of 2 MiB blocks).
pub const MAX_BAT_ENTRIES: u32 = 1 << 28;
/// Block bitmaps kept in memory (512 bytes each for 2 MiB blocks).
pub const BITMAP_CACHE_CAPACITY: usize = 8192;

/// The in-memory batmap (header and map).
#[derive(Debug, Clone)]
pub struct Batmap {
    /// Header.
    pub header: BatmapHeader,
    /// Map bits, `header.batmap_size` sectors.
    pub map: Vec<u8>,
}

impl Batmap {
    /// Whether block `b` is flagged fully allocated.
    pub fn is_full(&self, b: u64) -> bool {
        bitmap::test_bit(&self.map, b)
    }
}

/// Where the primary footer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A regular file: the footer ends the file and moves to the end of every new block.
    File,
    /// A block device (an LVM volume): the footer sits at the device's end and never moves;
    /// new blocks go after the data, before it.
    Device,
}

/// What an executor read from an image at open, before validation.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The footer in use.
    pub footer: Footer,
    /// Byte offset of the primary footer.
    pub footer_offset: u64,
    /// Length of the file or device in bytes.
    pub file_len: u64,
    /// File or block device.
    pub placement: Placement,
    /// Whether the footer came from the backup copy at offset 0.
    pub used_backup_footer: bool,
    /// Dynamic header, BAT and batmap of a sparse image.
    pub sparse: Option<LoadedSparse>,
}

/// The sparse part of [`Loaded`].
#[derive(Debug, Clone)]
pub struct LoadedSparse {
    /// The dynamic header.
    pub header: DynamicHeader,
    /// The BAT.
    pub bat: Bat,
    /// The batmap: `None` when the image has none, `Err(why)` when the one it should have is
    /// unusable.
    pub batmap: Option<Result<Batmap, String>>,
}

/// A metadata structure occupying bytes of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// The footer copy at offset 0.
    BackupFooter,
    /// The dynamic header.
    Header,
    /// The BAT (padded to a sector).
    Bat,
    /// The batmap header.
    BatmapHeader,
    /// The batmap bits.
    Batmap,
    /// Parent locator data of slot N.
    Locator(usize),
    /// The primary footer.
    Footer,
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BackupFooter => f.write_str("backup footer"),
            Self::Header => f.write_str("dynamic header"),
            Self::Bat => f.write_str("BAT"),
            Self::BatmapHeader => f.write_str("batmap header"),
            Self::Batmap => f.write_str("batmap"),
            Self::Locator(i) => write!(f, "parent locator {i}"),
            Self::Footer => f.write_str("footer"),
        }
    }
}

/// Bytes `[start, end)` of the file held by `area`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What lives there.
    pub area: Area,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Region {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// Bounded cache of block bitmaps, each valid for the BAT entry it was read or written at.
///
/// Bitmaps written by a plan are authoritative. A bitmap read without the block's lock may be
/// older than a concurrent update, so it is cached only if no update of that block can have
/// been stored (and evicted) since the read was asked for.
#[derive(Debug, Default)]
struct BitmapCache {
    entries: HashMap<u64, Cached>,
    /// Bumped by every stored bitmap.
    generation: u64,
    /// Highest generation of a stored bitmap that was evicted.
    evicted: u64,
}

#[derive(Debug)]
struct Cached {
    entry: u32,
    bits: SectorBitmap,
    generation: u64,
}

impl BitmapCache {
    fn get(&self, block: u64, entry: u32) -> Option<&SectorBitmap> {
        self.entries
            .get(&block)
            .filter(|c| c.entry == entry)
            .map(|c| &c.bits)
    }

    fn make_room(&mut self) {
        if self.entries.len() < BITMAP_CACHE_CAPACITY {
            return;
        }
        let mut excess = self.entries.len() - BITMAP_CACHE_CAPACITY * 3 / 4;
        let mut evicted = self.evicted;
        self.entries.retain(|_, c| {
            if excess > 0 {
                excess -= 1;
                evicted = evicted.max(c.generation);
                false
            } else {
                true
            }
        });
        self.evicted = evicted;
    }

    fn store(&mut self, block: u64, entry: u32, bits: SectorBitmap) {
        self.make_room();
        self.generation += 1;
        let generation = self.generation;
        self.entries.insert(
            block,
            Cached {
                entry,
                bits,
                generation,
            },
        );
    }

    /// Caches a bitmap read for `load` unless something newer may exist.
    fn offer(&mut self, loaded: &LoadedBitmap) {
        let load = &loaded.load;
        if let Some(c) = self.entries.get(&load.block) {
            if c.entry == load.entry {
                return; // at least as fresh as this read
            }
        } else if self.evicted > load.ticket {
            return; // an update made after the read was asked for may have been evicted
        }
        self.make_room();
        self.entries.insert(
            load.block,
            Cached {
                entry: load.entry,
                bits: loaded.bits.clone(),
                generation: load.ticket,
            },
        );
    }

    fn remove(&mut self, block: u64) {
        self.entries.remove(&block);
    }
}

/// One open image's metadata (see the module documentation).
#[derive(Debug)]
pub struct Metadata {
    name: String,
    footer: Footer,
    footer_offset: u64,
    placement: Placement,
    file_len: u64,
    used_backup_footer: bool,
    header: Option<DynamicHeader>,
    bat: Bat,
    batmap: Option<Batmap>,
    batmap_problem: Option<String>,
    /// Blocks known to be full: the batmap's bits, and what plans marked since.
    full: Vec<u8>,
    regions: Vec<Region>,
    /// End of the last allocated block or of the metadata, bytes.
    data_end: u64,
    /// Where the next block's search for space starts, bytes.
    next_free: u64,
    bitmaps: BitmapCache,
}

fn corrupt(structure: &'static str, field: &'static str, offset: u64, why: String) -> VhdError {
    FormatError::field(structure, field, offset, why).into()
}

impl Metadata {
    /// Builds the model of an image called `name` from what was read at open. With
    /// `validate`, the layout is checked: the BAT and batmap must not overlap other metadata,
    /// and every allocated block (bitmap and data) must lie inside the data area (before the
    /// footer, clear of the header, BAT, batmap, parent locators and backup footer) and must
    /// not overlap another block. Images that fail are refused with an error naming the BAT
    /// entry and offset (errno `EINVAL`). Inspection tools (`check`, `query`, `read`) skip it.
    pub fn new(name: &str, loaded: Loaded, validate: bool) -> Result<Self> {
        let (header, bat, batmap, batmap_problem) = match loaded.sparse {
            Some(s) => {
                let (batmap, problem) = match s.batmap {
                    None => (None, None),
                    Some(Ok(b)) => (Some(b), None),
                    Some(Err(why)) => (None, Some(why)),
                };
                (Some(s.header), s.bat, batmap, problem)
            }
            None => (None, Bat::unallocated(0), None, None),
        };
        let mut meta = Self {
            name: name.to_string(),
            footer: loaded.footer,
            footer_offset: loaded.footer_offset,
            placement: loaded.placement,
            file_len: round_up(loaded.file_len, SECTOR),
            used_backup_footer: loaded.used_backup_footer,
            header,
            bat,
            batmap,
            batmap_problem,
            full: Vec::new(),
            regions: Vec::new(),
            data_end: 0,
            next_free: 0,
            bitmaps: BitmapCache::default(),
        };
        meta.refresh();
        if validate && meta.header.is_some() {
            meta.validate_layout()?;
        }
        Ok(meta)
    }

    /// Recomputes what derives from the header, BAT and batmap (after they were replaced).
    fn refresh(&mut self) {
        self.regions = self.compute_regions();
        let blocks = self.bat.entries.len();
        let map_len = self
            .batmap
            .as_ref()
            .map_or(0, |b| usize::try_from(b.header.map_bytes()).unwrap_or(0));
        let mut full = vec![0u8; map_len.max(blocks.div_ceil(8))];
        if let Some(b) = &self.batmap {
            let n = b.map.len().min(full.len());
            full[..n].copy_from_slice(&b.map[..n]);
            // A batmap bit for an unallocated block would be a lie; don't trust it.
            for (block, entry) in self.bat.entries.iter().enumerate() {
                if *entry == BAT_UNUSED {
                    bitmap::clear_bit(&mut full, block as u64);
                }
            }
        }
        self.full = full;
        self.data_end = self.end_of_data();
        self.next_free = match self.placement {
            Placement::File => self
                .footer_offset
                .max(self.data_end)
                .max(self.end_of_metadata())
                .max(self.file_len),
            Placement::Device => self.data_end.max(self.end_of_metadata()),
        };
        self.bitmaps = BitmapCache::default();
    }

    fn compute_regions(&self) -> Vec<Region> {
        let Some(h) = &self.header else {
            return Vec::new();
        };
        let mut r = vec![
            Region {
                area: Area::BackupFooter,
                start: 0,
                end: FOOTER_SIZE as u64,
            },
            Region {
                area: Area::Header,
                start: self.footer.data_offset,
                end: self.footer.data_offset.saturating_add(HEADER_SIZE as u64),
            },
            Region {
                area: Area::Bat,
                start: h.table_offset,
                end: h.table_offset.saturating_add(h.bat_bytes()),
            },
        ];
        if let (Some(b), Some(at)) = (&self.batmap, self.batmap_header_offset()) {
            r.push(Region {
                area: Area::BatmapHeader,
                start: at,
                end: at + BATMAP_HEADER_SIZE as u64,
            });
            r.push(Region {
                area: Area::Batmap,
                start: b.header.batmap_offset,
                end: b.header.batmap_offset.saturating_add(b.header.map_bytes()),
            });
        }
        for (i, l) in h.locators.iter().enumerate() {
            let end = l.data_offset.saturating_add(l.space_bytes());
            // Locators pointing past the footer are invalid (check reports them); they hold
            // no bytes of this file.
            if l.is_used() && l.data_offset > 0 && end <= self.footer_offset {
                r.push(Region {
                    area: Area::Locator(i),
                    start: l.data_offset,
                    end,
                });
            }
        }
        r.push(Region {
            area: Area::Footer,
            start: self.footer_offset,
            end: self.footer_offset + FOOTER_SIZE as u64,
        });
        r
    }

    fn validate_layout(&self) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        // The structures the I/O path writes must not overlap anything else.
        for (i, a) in self.regions.iter().enumerate() {
            if !matches!(a.area, Area::Bat | Area::BatmapHeader | Area::Batmap) {
                continue;
            }
            if let Some(b) = self
                .regions
                .iter()
                .enumerate()
                .find(|(j, b)| *j != i && b.overlaps(a.start, a.end))
                .map(|(_, b)| b)
            {
                return Err(corrupt(
                    "dynamic header",
                    "table_offset",
                    self.footer.data_offset + 16,
                    format!(
                        "the {} at bytes {}..{} overlaps the {} at bytes {}..{}",
                        a.area, a.start, a.end, b.area, b.start, b.end
                    ),
                ));
            }
        }
        let per = self.block_span();
        let (limit, limit_what) = if self.used_backup_footer {
            (self.file_len, "end of the file")
        } else {
            (self.footer_offset, "footer")
        };
        let mut blocks: Vec<(u64, usize)> = Vec::with_capacity(self.bat.entries.len());
        for (i, &e) in self.bat.entries.iter().enumerate() {
            if e == BAT_UNUSED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            let end = start + per;
            let at = h.table_offset + 4 * i as u64;
            let entry = |why: String| {
                corrupt(
                    "BAT",
                    "entry",
                    at,
                    format!("block {i} (sector {e:#x}, byte {start}) {why}"),
                )
            };
            if end > limit {
                return Err(entry(format!(
                    "ends at byte {end}, past the {limit_what} at byte {limit}"
                )));
            }
            // Read through the backup footer, the file may end without a primary footer.
            let overlapped = self.regions.iter().find(|r| {
                r.overlaps(start, end) && !(self.used_backup_footer && r.area == Area::Footer)
            });
            if let Some(r) = overlapped {
                return Err(entry(format!(
                    "overlaps the {} at bytes {}..{}",
                    r.area, r.start, r.end
                )));
            }
            blocks.push((start, i));
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            let ((a, ai), (b, bi)) = (w[0], w[1]);
            if b < a + per {
                let i = ai.max(bi);
                return Err(corrupt(
                    "BAT",
                    "entry",
                    h.table_offset + 4 * i as u64,
                    format!(
                        "block {bi} (byte {b}) overlaps block {ai} (bytes {a}..{})",
                        a + per
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The image name given at open.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    /// Mutable access to the footer (maintenance operations).
    pub fn footer_mut(&mut self) -> &mut Footer {
        &mut self.footer
    }
    /// Byte offset of the primary footer.
    pub fn footer_offset(&self) -> u64 {
        self.footer_offset
    }
    /// Moves the primary footer (maintenance operations that wrote it there).
    pub fn set_footer_offset(&mut self, offset: u64) {
        self.footer_offset = offset;
        if self.placement == Placement::File {
            self.file_len = offset + FOOTER_SIZE as u64;
        }
        self.refresh();
    }
    /// File or block device.
    pub fn placement(&self) -> Placement {
        self.placement
    }
    /// Whether the footer came from the backup copy.
    pub fn used_backup_footer(&self) -> bool {
        self.used_backup_footer
    }
    /// The dynamic header (sparse images).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }
    /// Mutable access to the header; call [`Metadata::header_changed`] after changing it.
    pub fn header_mut(&mut self) -> Option<&mut DynamicHeader> {
        self.header.as_mut()
    }
    /// Recomputes the layout after a header change.
    pub fn header_changed(&mut self) {
        self.refresh();
    }
    /// The BAT (empty for fixed images).
    pub fn bat(&self) -> &Bat {
        &self.bat
    }
    /// Replaces the BAT (maintenance operations that write it themselves).
    pub fn set_bat(&mut self, bat: Bat) {
        self.bat = bat;
        self.refresh();
    }
    /// The batmap, when present and valid.
    pub fn batmap(&self) -> Option<&Batmap> {
        self.batmap.as_ref()
    }
    /// Replaces the batmap (create, resize, repair).
    pub fn set_batmap(&mut self, batmap: Option<Batmap>) {
        self.batmap = batmap;
        self.batmap_problem = None;
        self.refresh();
    }
    /// Mutable access to the batmap header (marker, keyhash); the map is left alone.
    pub fn batmap_header_mut(&mut self) -> Option<&mut BatmapHeader> {
        self.batmap.as_mut().map(|b| &mut b.header)
    }
    /// Why the expected batmap is unusable, if it is.
    pub fn batmap_problem(&self) -> Option<&str> {
        self.batmap_problem.as_deref()
    }
    /// The metadata regions of a sparse image (validated at open).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }
    /// Disk type.
    pub fn disk_type(&self) -> DiskType {
        self.footer.kind().unwrap_or(DiskType::Fixed)
    }
    /// Whether this is a differencing disk.
    pub fn has_parent(&self) -> bool {
        self.disk_type() == DiskType::Differencing
    }
    /// Virtual size in sectors.
    pub fn total_sectors(&self) -> u64 {
        self.footer.current_size / SECTOR
    }
    /// Sectors per block (0 for fixed images).
    pub fn sectors_per_block(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(0, DynamicHeader::sectors_per_block)
    }
    /// Block size in bytes (0 for fixed images).
    pub fn block_size(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| u64::from(h.block_size))
    }
    /// Bytes of each block's bitmap.
    pub fn bitmap_bytes(&self) -> u64 {
        self.header.as_ref().map_or(0, DynamicHeader::bitmap_bytes)
    }
    /// Bitmap and data of one block, bytes.
    fn block_span(&self) -> u64 {
        self.bitmap_bytes() + self.block_size()
    }
    /// Offset where a tapdisk batmap header lives: right after the padded BAT.
    pub fn batmap_header_offset(&self) -> Option<u64> {
        self.header.as_ref().map(|h| h.table_offset + h.bat_bytes())
    }
    /// Whether `block` is flagged full (batmap, or marked since).
    pub fn is_full(&self, block: u64) -> bool {
        bitmap::test_bit(&self.full, block)
    }
    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> u64 {
        self.bat.allocated_count()
    }
    /// Bitmaps currently cached.
    pub fn cached_bitmaps(&self) -> usize {
        self.bitmaps.entries.len()
    }

    /// End of all metadata (header, BAT, batmap, parent locators), bytes.
    pub fn end_of_metadata(&self) -> u64 {
        let Some(h) = &self.header else {
            return 0;
        };
        let mut end = self.footer.data_offset + HEADER_SIZE as u64;
        end = end.max(h.table_offset + h.bat_bytes());
        if let Some(b) = &self.batmap {
            end = end.max(b.header.batmap_offset + b.header.map_bytes());
            end = end.max(h.table_offset + h.bat_bytes() + BATMAP_HEADER_SIZE as u64);
        }
        // Locators pointing past the footer are invalid (check reports them); they do not
        // extend the metadata region.
        for l in h.locators.iter().filter(|l| l.is_used()) {
            let l_end = l.data_offset.saturating_add(l.space_bytes());
            if l_end <= self.footer_offset {
                end = end.max(l_end);
            }
        }
        round_up(end, SECTOR)
    }

    /// End of the last allocated block (bytes), or the end of metadata.
    pub fn end_of_data(&self) -> u64 {
        let per = self.block_span();
        self.bat
            .entries
            .iter()
            .filter(|&&e| e != BAT_UNUSED)
            .map(|&e| u64::from(e) * SECTOR + per)
            .fold(self.end_of_metadata(), u64::max)
    }

    /// Fails unless `[sector, sector + count)` lies inside the virtual disk.
    pub fn check_range(&self, sector: u64, count: u64) -> Result<()> {
        let total = self.total_sectors();
        match sector.checked_add(count) {
            Some(end) if end <= total => Ok(()),
            _ => Err(VhdError::OutOfRange {
                sector,
                end: sector.saturating_add(count),
                total,
            }),
        }
    }

    /// Splits `[sector, sector + count)` into pieces that each lie inside one block (one
    /// piece for a fixed image). `at` is the byte offset of each piece in the request.
    pub fn pieces(&self, sector: u64, count: u64) -> Vec<Piece> {
        let spb = self.sectors_per_block();
        if spb == 0 {
            return vec![Piece {
                sector,
                count,
                at: 0,
            }];
        }
        let mut out = Vec::new();
        let mut cur = sector;
        let end = sector + count;
        while cur < end {
            let n = (spb - cur % spb).min(end - cur);
            out.push(Piece {
                sector: cur,
                count: n,
                at: usize::try_from((cur - sector) * SECTOR).unwrap_or(usize::MAX),
            });
            cur += n;
        }
        out
    }

    fn entry(&self, block: u64) -> u32 {
        self.bat.get(block).unwrap_or(BAT_UNUSED)
    }

    /// Byte offset of sector `first` of the block whose bitmap is at sector `entry`.
    fn data_offset(&self, entry: u32, first: u64) -> u64 {
        u64::from(entry) * SECTOR + self.bitmap_bytes() + first * SECTOR
    }

    fn bitmap_load(&self, block: u64, entry: u32) -> BitmapLoad {
        BitmapLoad {
            block,
            entry,
            offset: u64::from(entry) * SECTOR,
            len: usize::try_from(self.bitmap_bytes()).unwrap_or(512),
            ticket: self.bitmaps.generation,
        }
    }

    /// The bits of allocated `block` at `entry`: cached, or from `loaded`.
    fn known_bits<'a>(
        &'a self,
        block: u64,
        entry: u32,
        loaded: &'a [LoadedBitmap],
    ) -> Option<&'a SectorBitmap> {
        self.bitmaps.get(block, entry).or_else(|| {
            loaded
                .iter()
                .find(|l| l.load.block == block && l.load.entry == entry)
                .map(|l| &l.bits)
        })
    }

    /// Maps `count` sectors at `sector` to runs present in the file (with byte offsets) or
    /// absent from it, adjacent runs merged. Bitmaps not cached are asked for; pass them back
    /// in `loaded`.
    pub fn map(&self, sector: u64, count: u64, loaded: &[LoadedBitmap]) -> Result<Mapping> {
        self.check_range(sector, count)?;
        let mut out: Vec<Extent> = Vec::new();
        if self.header.is_none() {
            push_extent(
                &mut out,
                Extent::Present {
                    sector,
                    count,
                    file_offset: sector * SECTOR,
                },
            );
            return Ok(Mapping::Done(out));
        }
        let spb = self.sectors_per_block();
        let mut need = Vec::new();
        for piece in self.pieces(sector, count) {
            let block = piece.sector / spb;
            let first = piece.sector % spb;
            let entry = self.entry(block);
            if entry == BAT_UNUSED {
                push_extent(
                    &mut out,
                    Extent::Absent {
                        sector: piece.sector,
                        count: piece.count,
                    },
                );
            } else if self.is_full(block) {
                push_extent(
                    &mut out,
                    Extent::Present {
                        sector: piece.sector,
                        count: piece.count,
                        file_offset: self.data_offset(entry, first),
                    },
                );
            } else if let Some(bits) = self.known_bits(block, entry, loaded) {
                for (s, n, set) in bits.runs(first, piece.count) {
                    let sector = block * spb + s;
                    push_extent(
                        &mut out,
                        if set {
                            Extent::Present {
                                sector,
                                count: n,
                                file_offset: self.data_offset(entry, s),
                            }
                        } else {
                            Extent::Absent { sector, count: n }
                        },
                    );
                }
            } else {
                need.push(self.bitmap_load(block, entry));
            }
        }
        Ok(if need.is_empty() {
            Mapping::Done(out)
        } else {
            Mapping::NeedBitmaps(need)
        })
    }

    /// The state of `block`: `None` when unallocated, else its bitmap's offset and whether
    /// it is flagged full (then its bitmap need not be read).
    pub fn block(&self, block: u64) -> Option<(u64, bool)> {
        let entry = self.entry(block);
        (entry != BAT_UNUSED).then(|| (u64::from(entry) * SECTOR, self.is_full(block)))
    }

    /// Keeps a bitmap read for a mapping in the cache (when it cannot be stale).
    pub fn remember(&mut self, loaded: &LoadedBitmap) {
        if self.entry(loaded.load.block) == loaded.load.entry {
            self.bitmaps.offer(loaded);
        }
    }

    /// Plans `op` on `piece` without the block's lock where that is safe, else names the
    /// lock to take (then call [`Metadata::plan_locked`] while holding it).
    pub fn plan(&self, op: Op, piece: &Piece) -> Result<Planned> {
        self.check_range(piece.sector, piece.count)?;
        if self.header.is_none() {
            return Ok(Planned::Ready(self.plan_fixed(op, piece)));
        }
        let block = piece.sector / self.sectors_per_block();
        match op {
            Op::Write if self.entry(block) != BAT_UNUSED => {
                Ok(Planned::Ready(self.plan_overwrite(block, piece)))
            }
            Op::Write | Op::Zero { .. } => Ok(Planned::NeedsLock(block)),
        }
    }

    /// Plans `op` on `piece`; the caller holds the block's lock (or has exclusive access).
    /// A new block's space is reserved here.
    pub fn plan_locked(&mut self, op: Op, piece: &Piece) -> Result<Plan> {
        self.check_range(piece.sector, piece.count)?;
        if self.header.is_none() {
            return Ok(self.plan_fixed(op, piece));
        }
        let spb = self.sectors_per_block();
        let block = piece.sector / spb;
        let first = piece.sector % spb;
        let entry = self.entry(block);
        let mut range = SectorBitmap::zeroed(to_len(self.bitmap_bytes()));
        range.set_range(first, piece.count, true);
        match op {
            Op::Write if entry == BAT_UNUSED => self.plan_allocation(block, range, Some(piece)),
            Op::Write => Ok(self.plan_overwrite(block, piece)),
            Op::Zero { deallocate } if self.has_parent() || !deallocate => {
                if entry == BAT_UNUSED {
                    return self.plan_allocation(block, range, None);
                }
                let zero = Step::Zero(ZeroRange {
                    offset: self.data_offset(entry, first),
                    len: piece.count * SECTOR,
                    deallocate,
                });
                Ok(then_set_bits(zero, block, entry, first, piece.count))
            }
            Op::Zero { .. } if entry == BAT_UNUSED => Ok(Plan::default()),
            Op::Zero { .. } if first == 0 && piece.count == spb => Ok(Plan::new(vec![
                vec![Step::ClearFull { block }],
                vec![Step::BatEntry {
                    block,
                    entry: BAT_UNUSED,
                }],
                vec![Step::Release {
                    offset: u64::from(entry) * SECTOR,
                    len: self.block_span(),
                }],
            ])),
            Op::Zero { .. } => Ok(Plan::new(vec![
                vec![Step::Zero(ZeroRange {
                    offset: self.data_offset(entry, first),
                    len: piece.count * SECTOR,
                    deallocate: true,
                })],
                vec![Step::ClearFull { block }],
                vec![Step::SetBits {
                    block,
                    entry,
                    first,
                    count: piece.count,
                    value: false,
                }],
            ])),
        }
    }

    /// Plans the allocation of unallocated `block` with `bits` and no data (`fill -b`): set
    /// sectors read as zeros. The caller holds the block's lock.
    pub fn plan_new_block(&mut self, block: u64, bits: SectorBitmap) -> Result<Plan> {
        if self.header.is_none() || self.entry(block) != BAT_UNUSED {
            return Err(VhdError::InvalidArgument(format!(
                "{}: block {block} is not an unallocated block",
                self.name
            )));
        }
        self.plan_allocation(block, bits, None)
    }

    fn plan_fixed(&self, op: Op, piece: &Piece) -> Plan {
        let offset = piece.sector * SECTOR;
        let step = match op {
            Op::Write => Step::Data(data_write(offset, piece)),
            Op::Zero { deallocate } => Step::Zero(ZeroRange {
                offset,
                len: piece.count * SECTOR,
                deallocate,
            }),
        };
        Plan::new(vec![vec![step]])
    }

    /// A write into allocated `block`: data, then bits, then the batmap.
    fn plan_overwrite(&self, block: u64, piece: &Piece) -> Plan {
        let spb = self.sectors_per_block();
        let first = piece.sector % spb;
        let entry = self.entry(block);
        let data = Step::Data(data_write(self.data_offset(entry, first), piece));
        let covered = self.is_full(block)
            || self
                .bitmaps
                .get(block, entry)
                .is_some_and(|bits| (first..first + piece.count).all(|i| bits.get(i)));
        if covered {
            return Plan::new(vec![vec![data]]);
        }
        then_set_bits(data, block, entry, first, piece.count)
    }

    /// Reserves space for `block` and plans its allocation with `bits` as its bitmap and the
    /// data of `piece` (if any): footer move (files), data and bitmap (and on a device, zeros
    /// for set sectors no data is written to), BAT entry, batmap.
    fn plan_allocation(
        &mut self,
        block: u64,
        bits: SectorBitmap,
        piece: Option<&Piece>,
    ) -> Result<Plan> {
        if block >= self.bat.entries.len() as u64 {
            return Err(VhdError::InvalidArgument(format!(
                "{}: block {block} is past the BAT",
                self.name
            )));
        }
        let (offset, entry) = self.reserve(block)?;
        let spb = self.sectors_per_block();
        let mut stages = Vec::new();
        if self.placement == Placement::File {
            stages.push(vec![Step::Footer {
                offset: offset + self.block_span(),
            }]);
        }
        let mut unreferenced = Vec::new();
        let written = piece.map(|p| {
            let first = p.sector % spb;
            unreferenced.push(Step::Data(data_write(self.data_offset(entry, first), p)));
            first..first + p.count
        });
        if self.placement == Placement::Device {
            // A device's space is not a fresh hole: sectors marked present without data
            // written to them must be zeroed.
            for (s, n, set) in bits.runs(0, spb) {
                let outside = written
                    .as_ref()
                    .is_none_or(|w| s >= w.end || s + n <= w.start);
                if set && outside {
                    unreferenced.push(Step::Zero(ZeroRange {
                        offset: self.data_offset(entry, s),
                        len: n * SECTOR,
                        deallocate: false,
                    }));
                }
            }
        }
        let full = bits.all_set(spb);
        unreferenced.push(Step::NewBitmap { block, entry, bits });
        stages.push(unreferenced);
        stages.push(vec![Step::BatEntry { block, entry }]);
        if full {
            stages.push(vec![Step::MarkFull { block }]);
        }
        Ok(Plan::new(stages))
    }

    /// Finds and reserves the space of a new block: `(bitmap byte offset, BAT entry)`.
    fn reserve(&mut self, block: u64) -> Result<(u64, u32)> {
        let bm = self.bitmap_bytes();
        let span = self.block_span();
        let base = match self.placement {
            Placement::File => self.next_free.max(self.footer_offset),
            Placement::Device => self.next_free,
        };
        let start = round_up(base + bm, DATA_ALIGNMENT) - bm;
        let end = start + span;
        let limit = match self.placement {
            Placement::File => end + FOOTER_SIZE as u64,
            Placement::Device => end,
        };
        if limit > MAX_PHYSICAL_BYTES {
            return Err(VhdError::TooLarge {
                what: format!(
                    "{}: allocating block {block} at byte {start}, ending at byte {limit}",
                    self.name
                ),
                bytes: limit,
            });
        }
        if self.placement == Placement::Device && end > self.footer_offset {
            return Err(VhdError::NoSpace(format!(
                "{}: no room for block {block}: it would end at byte {end}, past the footer at \
                 byte {} at the end of the device (the volume must be grown first)",
                self.name, self.footer_offset
            )));
        }
        self.ensure_free(block, start, end)?;
        let entry = u32::try_from(start / SECTOR).map_err(|_| VhdError::TooLarge {
            what: format!("{}: block {block} offset", self.name),
            bytes: start,
        })?;
        // In a file the block's footer follows it; the next block must not overwrite that
        // footer while it may still be the file's last.
        self.next_free = match self.placement {
            Placement::File => end + FOOTER_SIZE as u64,
            Placement::Device => end,
        };
        Ok((start, entry))
    }

    /// Re-checks that a new block's bytes are free: past every allocated block and clear of
    /// every metadata region.
    fn ensure_free(&self, block: u64, start: u64, end: u64) -> Result<()> {
        let clash = if start < self.data_end {
            Some(format!("the data ending at byte {}", self.data_end))
        } else {
            self.regions
                .iter()
                .filter(|r| r.area != Area::Footer || self.placement == Placement::Device)
                .find(|r| r.overlaps(start, end))
                .map(|r| format!("the {} at bytes {}..{}", r.area, r.start, r.end))
        };
        match clash {
            None => Ok(()),
            Some(what) => Err(corrupt(
                "BAT",
                "entry",
                self.header
                    .as_ref()
                    .map_or(0, |h| h.table_offset + 4 * block),
                format!("new block {block} at bytes {start}..{end} would overlap {what}"),
            )),
        }
    }

    /// Renders `step` from the current state (see [`crate::plan`]). `loaded` is a bitmap
    /// read for an earlier [`Prepare::NeedBitmap`] of this step.
    pub fn prepare(&mut self, step: &Step, loaded: Option<&LoadedBitmap>) -> Result<Prepare> {
        let ready = |io, effect| Ok(Prepare::Ready(Prepared { io, effect }));
        match step {
            Step::Footer { offset } => {
                let bytes = self.footer.clone().to_bytes_checked().to_vec();
                ready(Io::Write(vec![(*offset, bytes)]), Effect::FooterAt(*offset))
            }
            Step::Data(write) => ready(Io::Data(*write), Effect::None),
            Step::Zero(range) => ready(Io::Zero(*range), Effect::None),
            Step::Release { offset, len } => ready(
                Io::Release {
                    offset: *offset,
                    len: *len,
                },
                Effect::None,
            ),
            Step::NewBitmap { block, entry, bits } => ready(
                Io::Write(vec![(u64::from(*entry) * SECTOR, bits.as_bytes().to_vec())]),
                Effect::Bitmap {
                    block: *block,
                    entry: *entry,
                    bits: bits.clone(),
                },
            ),
            Step::SetBits {
                block,
                entry,
                first,
                count,
                value,
            } => {
                if self.entry(*block) != *entry {
                    return Ok(Prepare::Restart);
                }
                if *value && self.is_full(*block) {
                    return ready(Io::Nothing, Effect::None); // every bit is set already
                }
                if let Some(l) = loaded {
                    self.remember(l);
                }
                let loaded = loaded.map(std::slice::from_ref).unwrap_or_default();
                let Some(bits) = self.known_bits(*block, *entry, loaded) else {
                    return Ok(Prepare::NeedBitmap(self.bitmap_load(*block, *entry)));
                };
                if (*first..first + count).all(|i| bits.get(i) == *value) {
                    return ready(Io::Nothing, Effect::None);
                }
                let mut bits = bits.clone();
                bits.set_range(*first, *count, *value);
                ready(
                    Io::Write(vec![(u64::from(*entry) * SECTOR, bits.as_bytes().to_vec())]),
                    Effect::Bitmap {
                        block: *block,
                        entry: *entry,
                        bits,
                    },
                )
            }
            Step::BatEntry { block, entry } => {
                let Some(h) = &self.header else {
                    return ready(Io::Nothing, Effect::None);
                };
                let first = block / 128 * 128;
                let mut sector = vec![0xffu8; 512];
                for (i, chunk) in sector.chunks_mut(4).enumerate() {
                    let b = first + i as u64;
                    let value = if b == *block { *entry } else { self.entry(b) };
                    chunk.copy_from_slice(&value.to_be_bytes());
                }
                ready(
                    Io::Write(vec![(h.table_offset + first * 4, sector)]),
                    Effect::Entry {
                        block: *block,
                        entry: *entry,
                    },
                )
            }
            Step::MarkFull { block } => {
                let entry = self.entry(*block);
                let complete = entry != BAT_UNUSED
                    && !self.is_full(*block)
                    && self
                        .bitmaps
                        .get(*block, entry)
                        .is_some_and(|bits| bits.all_set(self.sectors_per_block()));
                if !complete {
                    return ready(Io::Nothing, Effect::None);
                }
                bitmap::set_bit(&mut self.full, *block);
                Ok(Prepare::Ready(self.render_batmap()))
            }
            Step::ClearFull { block } => {
                if !self.is_full(*block) {
                    return ready(Io::Nothing, Effect::None);
                }
                bitmap::clear_bit(&mut self.full, *block);
                // The batmap said every sector is present; the bits the next steps clear
                // start from that, not from a bitmap that may disagree on disk.
                let entry = self.entry(*block);
                if entry != BAT_UNUSED {
                    let mut bits = SectorBitmap::zeroed(to_len(self.bitmap_bytes()));
                    bits.set_range(0, self.sectors_per_block(), true);
                    self.bitmaps.store(*block, entry, bits);
                }
                Ok(Prepare::Ready(self.render_batmap()))
            }
        }
    }

    /// The batmap writes for the current full bits (nothing for images without a batmap).
    fn render_batmap(&self) -> Prepared {
        let (Some(b), Some(header_at)) = (&self.batmap, self.batmap_header_offset()) else {
            return Prepared {
                io: Io::Nothing,
                effect: Effect::None,
            };
        };
        let mut map = self.full.clone();
        map.resize(usize::try_from(b.header.map_bytes()).unwrap_or(0), 0);
        let mut header = b.header.clone();
        header.checksum = batmap_checksum(&map, header.batmap_version);
        let header_bytes = header.to_bytes().to_vec();
        let writes = if header.batmap_offset == header_at + BATMAP_HEADER_SIZE as u64 {
            let mut all = header_bytes;
            all.extend_from_slice(&map);
            vec![(header_at, all)]
        } else {
            vec![
                (header.batmap_offset, map.clone()),
                (header_at, header_bytes),
            ]
        };
        Prepared {
            io: Io::Write(writes),
            effect: Effect::BatmapMap(map),
        }
    }

    /// Publishes the effect of a step whose I/O completed.
    pub fn complete(&mut self, done: Prepared) {
        match done.effect {
            Effect::None => {}
            Effect::FooterAt(offset) => {
                // Concurrent allocations may complete their footer writes out of order; the
                // file ends at the furthest.
                if offset > self.footer_offset {
                    self.footer_offset = offset;
                    self.file_len = self.file_len.max(offset + FOOTER_SIZE as u64);
                    if let Some(r) = self.regions.iter_mut().find(|r| r.area == Area::Footer) {
                        r.start = offset;
                        r.end = offset + FOOTER_SIZE as u64;
                    }
                }
            }
            Effect::Bitmap { block, entry, bits } => self.bitmaps.store(block, entry, bits),
            Effect::Entry { block, entry } => {
                if let Some(slot) = usize::try_from(block)
                    .ok()
                    .and_then(|i| self.bat.entries.get_mut(i))
                {
                    *slot = entry;
                }
                if entry == BAT_UNUSED {
                    self.bitmaps.remove(block);
                } else {
                    let end = u64::from(entry) * SECTOR + self.block_span();
                    self.data_end = self.data_end.max(end);
                }
            }
            Effect::BatmapMap(map) => {
                if let Some(b) = self.batmap.as_mut() {
                    b.map = map;
                    b.header.checksum = batmap_checksum(&b.map, b.header.batmap_version);
                }
            }
        }
    }
}

/// A byte count as a buffer length (bitmaps are at most a few KiB).
fn to_len(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// The request bytes of `piece` written at file byte `offset`.
fn data_write(offset: u64, piece: &Piece) -> DataWrite {
    DataWrite {
        offset,
        at: piece.at,
        len: usize::try_from(piece.count * SECTOR).unwrap_or(usize::MAX),
    }
}

/// `first_step`, then bits `[first, first + count)` of allocated `block` set, then the
/// batmap: a write or present-zeroing in an allocated block.
fn then_set_bits(first_step: Step, block: u64, entry: u32, first: u64, count: u64) -> Plan {
    Plan::new(vec![
        vec![first_step],
        vec![Step::SetBits {
            block,
            entry,
            first,
            count,
            value: true,
        }],
        vec![Step::MarkFull { block }],
    ])
}

/// Appends `e` to `out`, merging it with the last run when contiguous.
fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.count() == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        match (last, e) {
            (
                Extent::Present {
                    sector: s0,
                    count: c0,
                    file_offset: f0,
                },
                Extent::Present {
                    sector: s1,
                    count: c1,
                    file_offset: f1,
                },
            ) if *s0 + *c0 == s1 && *f0 + *c0 * SECTOR == f1 => {
                *c0 += c1;
                return;
            }
            (Extent::Absent { count: c0, .. }, Extent::Absent { count: c1, .. }) => {
                *c0 += c1;
                return;
            }
            _ => {}
        }
    }
    out.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create, CreateOptions, ParentSpec};
    use crate::image::{OpenOptions, VhdImage};
    use crate::io::MemFile;
    use crate::locator::PlatformCode;
    use crate::plan::Serial;

    const MIB: u64 = 1 << 20;
    /// Sectors per 2 MiB block.
    const SPB: u64 = 4096;

    /// A fresh 8 MiB dynamic image (differencing with `parent`), as bytes.
    fn image_bytes(parent: bool) -> Vec<u8> {
        let spec = ParentSpec {
            uuid: [7; 16],
            timestamp: 1,
            name: "p.vhd".into(),
            locators: vec![(PlatformCode::Macx, "./p.vhd".into())],
            keyhash: None,
        };
        let img = create(
            MemFile::default(),
            "t",
            &CreateOptions::dynamic(8 * MIB),
            parent.then_some(&spec),
        )
        .unwrap();
        img.into_file().contents()
    }

    fn open(bytes: Vec<u8>, device: bool, opts: OpenOptions) -> crate::Result<VhdImage<MemFile>> {
        let file = if device {
            MemFile::device(bytes)
        } else {
            MemFile::new(bytes)
        };
        VhdImage::open(file, "t", opts)
    }

    fn set_entry(bytes: &mut [u8], block: usize, entry: u32) {
        let at = 1536 + 4 * block;
        bytes[at..at + 4].copy_from_slice(&entry.to_be_bytes());
    }

    /// The image with blocks 0 and 1 allocated.
    fn with_block0(parent: bool) -> Vec<u8> {
        let mut img = open(image_bytes(parent), false, OpenOptions::read_write()).unwrap();
        img.write_sectors(0, &[1u8; 512]).unwrap();
        img.write_sectors(SPB, &[2u8; 512]).unwrap();
        img.into_file().contents()
    }

    /// `check` (bitmaps included) accepts the image.
    fn assert_valid(file: MemFile) {
        let opts = crate::check::CheckOptions {
            check_bitmaps: true,
            ..Default::default()
        };
        crate::check::check(file, "t", None, &opts).unwrap();
    }

    fn refused(bytes: Vec<u8>, needle: &str) {
        for writable in [false, true] {
            let opts = OpenOptions {
                writable,
                ..OpenOptions::default()
            };
            let e = open(bytes.clone(), false, opts).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(needle), "expected '{needle}' in '{text}'");
            assert_eq!(e.errno(), 22, "{text}");
        }
        // Inspection still opens it (check reports the damage in its own words).
        open(bytes, false, OpenOptions::inspect()).unwrap();
    }

    #[test]
    fn bat_entries_into_metadata_are_refused_naming_the_entry() {
        let base = with_block0(true);
        let footer_sector = u32::try_from(base.len() / 512 - 1).unwrap();
        let first = u32::from_be_bytes(base[1536..1540].try_into().unwrap());
        let cases: [(u32, &str); 7] = [
            (footer_sector, "past the footer"),
            (0, "overlaps the backup footer"),
            (1, "overlaps the dynamic header"),
            (3, "overlaps the BAT"),
            (4, "overlaps the batmap header"),
            (5, "overlaps the batmap"),
            (first + 1, "block 2 (byte"),
        ];
        for (entry, needle) in cases {
            let mut bytes = base.clone();
            set_entry(&mut bytes, 2, entry);
            refused(bytes, needle);
        }
        // The message names the entry: index, its offset in the file, the sector it holds.
        let mut bytes = base.clone();
        set_entry(&mut bytes, 2, footer_sector);
        let text = open(bytes, false, OpenOptions::read_only())
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("BAT field `entry` at offset 1544")
                && text.contains(&format!("block 2 (sector {footer_sector:#x}")),
            "{text}"
        );
        // A locator's payload.
        let img = open(base.clone(), false, OpenOptions::inspect()).unwrap();
        let locator = img.header().unwrap().locators[0].data_offset;
        let mut bytes = base.clone();
        set_entry(&mut bytes, 2, u32::try_from(locator / 512).unwrap());
        refused(bytes, "overlaps the parent locator 0");
    }

    #[test]
    fn a_bat_overlapping_the_header_is_refused() {
        let mut bytes = image_bytes(false);
        // Point the header's table offset at the header itself (checksum fixed up).
        let mut h = DynamicHeader::parse(&bytes[512..1536], 512).unwrap();
        h.table_offset = 512;
        h.update_checksum();
        bytes[512..1536].copy_from_slice(&h.to_bytes());
        let e = open(bytes, false, OpenOptions::read_only()).unwrap_err();
        assert!(e.to_string().contains("overlaps the"), "{e}");
    }

    #[test]
    fn allocation_goes_after_the_data_and_moves_the_footer_first() {
        let mut img = open(image_bytes(false), false, OpenOptions::read_write()).unwrap();
        let old_footer = img.footer_offset();
        let (_, mut meta) = std::mem::replace(
            &mut img,
            open(image_bytes(false), false, OpenOptions::read_write()).unwrap(),
        )
        .into_parts();
        let piece = Piece {
            sector: SPB + 8,
            count: 8,
            at: 0,
        };
        assert_eq!(meta.plan(Op::Write, &piece).unwrap(), Planned::NeedsLock(1));
        let plan = meta.plan_locked(Op::Write, &piece).unwrap();
        let stages = plan.stages();
        let Step::Footer { offset: footer_at } = stages[0][0] else {
            panic!("footer first: {plan:?}");
        };
        let Step::NewBitmap { entry, .. } = stages[1][1] else {
            panic!("{plan:?}");
        };
        let bitmap_at = u64::from(entry) * 512;
        assert!(bitmap_at >= old_footer);
        assert_eq!((bitmap_at + 512) % DATA_ALIGNMENT, 0, "data page aligned");
        assert_eq!(footer_at, bitmap_at + 512 + 2 * MIB);
        assert_eq!(
            stages[1][0],
            Step::Data(DataWrite {
                offset: bitmap_at + 512 + 8 * 512,
                at: 0,
                len: 4096
            })
        );
        assert_eq!(stages[2], vec![Step::BatEntry { block: 1, entry }]);
        assert_eq!(stages.len(), 3, "a partial block is not marked full");
        assert_eq!(
            stages[2][0].serial(),
            Serial {
                block: Some(1),
                table: Some(crate::plan::Table::Bat)
            }
        );
        // A second block goes past the first one's footer.
        let plan = meta
            .plan_locked(
                Op::Write,
                &Piece {
                    sector: 0,
                    count: SPB,
                    at: 0,
                },
            )
            .unwrap();
        let Step::NewBitmap { entry: second, .. } = plan.stages()[1][1] else {
            panic!("{plan:?}");
        };
        assert!(u64::from(second) * 512 > footer_at);
        assert_eq!(plan.stages()[3], vec![Step::MarkFull { block: 0 }]);
    }

    /// The image with its footer moved to the end of a 16 MiB device.
    fn device_bytes(dev: usize) -> Vec<u8> {
        let mut bytes = image_bytes(false);
        let footer = bytes.split_off(bytes.len() - 512);
        bytes.resize(dev - 512, 0xee); // old data of the volume
        bytes.extend_from_slice(&footer);
        bytes
    }

    #[test]
    fn on_a_device_blocks_fill_the_space_before_the_fixed_footer() {
        let dev = usize::try_from(7 * MIB).unwrap();
        let img = open(device_bytes(dev), true, OpenOptions::read_write()).unwrap();
        let (file, mut meta) = img.into_parts();
        assert_eq!(meta.placement(), Placement::Device);
        let footer = meta.footer_offset();
        assert_eq!(footer, 7 * MIB - 512);
        let data_end = meta.end_of_metadata();
        let mut img = VhdImage::open(file, "t", OpenOptions::read_write()).unwrap();
        // Present zeros on a device: the volume's old bytes must be zeroed.
        let plan = meta
            .plan_locked(
                Op::Zero { deallocate: false },
                &Piece {
                    sector: 16,
                    count: 8,
                    at: 0,
                },
            )
            .unwrap();
        assert!(plan.steps().all(|s| !matches!(s, Step::Footer { .. })));
        let Some(Step::Zero(ZeroRange { offset, len, .. })) =
            plan.steps().find(|s| matches!(s, Step::Zero(_))).cloned()
        else {
            panic!("no zeroing: {plan:?}");
        };
        assert_eq!(len, 4096);
        assert!(offset >= data_end && offset < footer);
        // Through the executor: three 2 MiB blocks fit in 7 MiB, the fourth does not.
        img.zero_sectors(16, 8, false).unwrap();
        img.write_sectors(SPB, &vec![2u8; 512]).unwrap();
        img.write_sectors(2 * SPB, &vec![3u8; 512]).unwrap();
        let e = img.write_sectors(3 * SPB, &[4u8; 512]).unwrap_err();
        assert_eq!(e.errno(), 28, "{e}");
        assert!(e.to_string().contains("past the footer"), "{e}");
        assert_eq!(img.footer_offset(), footer, "the footer never moves");
        let mut back = vec![0xffu8; 16 * 512];
        img.read_sectors(8, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0), "no old volume data shows");
        let bytes = img.into_file().contents();
        assert_eq!(bytes.len(), dev);
        assert_valid(MemFile::device(bytes));
    }

    #[test]
    fn allocation_rechecks_that_the_space_is_free() {
        let dev = usize::try_from(7 * MIB).unwrap();
        let mut img = open(device_bytes(dev), true, OpenOptions::read_write()).unwrap();
        img.write_sectors(0, &[1u8; 512]).unwrap();
        let (_, mut meta) = img.into_parts();
        // A cursor gone wrong would put the next block over block 0 or the metadata.
        meta.next_free = 0;
        let e = meta
            .plan_locked(
                Op::Write,
                &Piece {
                    sector: 2 * SPB,
                    count: 1,
                    at: 0,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("new block 2"), "{e}");
        assert!(e.to_string().contains("would overlap"), "{e}");
    }

    #[test]
    fn discard_frees_whole_blocks_and_clears_partial_ones() {
        let img = open(with_block0(false), false, OpenOptions::read_write()).unwrap();
        let (file, mut meta) = img.into_parts();
        let whole = Piece {
            sector: 0,
            count: SPB,
            at: 0,
        };
        let plan = meta
            .plan_locked(Op::Zero { deallocate: true }, &whole)
            .unwrap();
        let steps: Vec<&Step> = plan.steps().collect();
        assert!(matches!(steps[0], Step::ClearFull { block: 0 }));
        assert!(matches!(
            steps[1],
            Step::BatEntry {
                block: 0,
                entry: BAT_UNUSED
            }
        ));
        assert!(matches!(steps[2], Step::Release { .. }));
        let part = Piece {
            sector: 0,
            count: 1,
            at: 0,
        };
        let plan = meta
            .plan_locked(Op::Zero { deallocate: true }, &part)
            .unwrap();
        let steps: Vec<&Step> = plan.steps().collect();
        assert!(matches!(steps[0], Step::Zero(_)));
        assert!(matches!(steps[2], Step::SetBits { value: false, .. }));
        // Without deallocation the sectors stay present (zeroed, bits set).
        let plan = meta
            .plan_locked(Op::Zero { deallocate: false }, &part)
            .unwrap();
        assert!(plan
            .steps()
            .any(|s| matches!(s, Step::SetBits { value: true, .. })));
        drop(file);
    }

    #[test]
    fn clearing_part_of_a_block_the_batmap_calls_full_keeps_the_rest_as_it_read() {
        // Block 0 holds sector 0 only, but its batmap bit says full (a damaged batmap that
        // still checksums), and its data area holds stray bytes at sector 5.
        let mut bytes = with_block0(false);
        let img = open(bytes.clone(), false, OpenOptions::inspect()).unwrap();
        let map_at = usize::try_from(img.batmap().unwrap().header.batmap_offset).unwrap();
        let header_at = usize::try_from(img.batmap_header_offset().unwrap()).unwrap();
        let data_at = usize::try_from(u64::from(img.bat().entries[0]) * 512 + 512).unwrap();
        drop(img);
        bytes[map_at] |= 0x80;
        let sum = crate::batmap::batmap_checksum(&bytes[map_at..map_at + 512], 0x0001_0002);
        bytes[header_at + 24..header_at + 28].copy_from_slice(&sum.to_be_bytes());
        bytes[data_at + 5 * 512..data_at + 6 * 512].fill(0x5a);
        let mut img = open(bytes, false, OpenOptions::read_write()).unwrap();
        assert!(img.batmap().unwrap().is_full(0));
        let mut before = vec![0u8; 16 * 512];
        img.read_sectors(0, &mut before).unwrap();
        assert!(before[5 * 512..6 * 512].iter().all(|b| *b == 0x5a));
        img.zero_sectors(100, 10, true).unwrap();
        let mut after = vec![0u8; 16 * 512];
        img.read_sectors(0, &mut after).unwrap();
        assert!(
            before == after,
            "sectors outside the discarded range changed"
        );
        let mut gone = vec![0xffu8; 10 * 512];
        img.read_sectors(100, &mut gone).unwrap();
        assert!(gone.iter().all(|b| *b == 0));
        // Bitmap and batmap now agree.
        assert_valid(img.into_file());
    }

    #[test]
    fn bat_and_batmap_writes_carry_the_current_state() {
        let img = open(with_block0(false), false, OpenOptions::read_write()).unwrap();
        let (_, mut meta) = img.into_parts();
        let entry0 = meta.bat().entries[0];
        // Two allocations planned before either completes: each BAT sector write keeps the
        // other's entry once it is published.
        let a = meta
            .plan_locked(
                Op::Write,
                &Piece {
                    sector: 2 * SPB,
                    count: 1,
                    at: 0,
                },
            )
            .unwrap();
        let b = meta
            .plan_locked(
                Op::Write,
                &Piece {
                    sector: 3 * SPB,
                    count: 1,
                    at: 0,
                },
            )
            .unwrap();
        let bat_step = |p: &Plan| {
            p.steps()
                .find(|s| matches!(s, Step::BatEntry { .. }))
                .cloned()
        };
        let (Some(sa), Some(sb)) = (bat_step(&a), bat_step(&b)) else {
            panic!("no BAT steps");
        };
        let Prepare::Ready(pa) = meta.prepare(&sa, None).unwrap() else {
            panic!()
        };
        meta.complete(pa);
        let Prepare::Ready(pb) = meta.prepare(&sb, None).unwrap() else {
            panic!()
        };
        let Io::Write(writes) = &pb.io else { panic!() };
        let sector = &writes[0].1;
        let at = |i: usize| u32::from_be_bytes(sector[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(at(0), entry0);
        assert_eq!(at(2), meta.bat().entries[2]);
        assert_ne!(at(2), BAT_UNUSED);
        assert_ne!(at(3), BAT_UNUSED);
        assert_eq!(at(4), BAT_UNUSED);
    }
}
