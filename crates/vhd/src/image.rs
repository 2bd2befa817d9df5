//! One VHD file (fixed, dynamic or differencing) over a [`BlockFile`]:
//! metadata loading with validation, sector mapping (which sectors are
//! present in this file and where), reads and writes of this file's own
//! sectors, block allocation at the end of the file, and metadata updates
//! (footer fields, hidden, marker, keyhash, BAT, batmap).
//!
//! Block allocation keeps the image valid after a crash at any point: the
//! footer is first written at the new end of file (so a valid primary
//! footer is always at EOF), then the data, then the sector bitmap, then the
//! BAT entry. Until the BAT entry lands the new block is unreferenced space.

use crate::bat::{Bat, BAT_UNUSED};
use crate::batmap::{batmap_checksum, batmap_sectors, BatmapHeader, KeyHash, BATMAP_HEADER_SIZE};
use crate::bitmap::{self, SectorBitmap};
use crate::bytes::round_up;
use crate::error::{FormatError, Result, VhdError};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE};
use crate::io::BlockFile;
use crate::locator::{decode_payload, ParentLocator};

/// Sector size.
pub const SECTOR: u64 = 512;
/// Largest physical offset a BAT entry can express: 2^32 sectors (2 TiB).
pub const MAX_PHYSICAL_BYTES: u64 = (1u64 << 32) * SECTOR;
/// New data blocks start on this boundary (page aligned, as tapdisk does).
pub const DATA_ALIGNMENT: u64 = 4096;
/// Largest BAT this library accepts (2^28 entries; 512 TiB of 2 MiB blocks).
pub const MAX_BAT_ENTRIES: u32 = 1 << 28;

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Allow writes.
    pub writable: bool,
    /// Open even if the footer is poisoned by a journaled operation.
    pub ignore_disabled: bool,
    /// Read the footer from the backup copy at offset 0.
    pub use_backup_footer: bool,
}

impl OpenOptions {
    /// Read-only options.
    pub fn read_only() -> Self {
        Self::default()
    }
    /// Read-write options.
    pub fn read_write() -> Self {
        Self {
            writable: true,
            ..Self::default()
        }
    }
}

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

/// A run of sectors of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Sectors stored in this file, starting at byte `file_offset`.
    Present {
        /// First virtual sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Byte offset of the first sector in the file.
        file_offset: u64,
    },
    /// Sectors this file does not hold (read from the parent, or zero).
    Absent {
        /// First virtual sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
    },
}

impl Extent {
    /// First sector.
    pub fn sector(&self) -> u64 {
        match *self {
            Self::Present { sector, .. } | Self::Absent { sector, .. } => sector,
        }
    }
    /// Sector count.
    pub fn count(&self) -> u64 {
        match *self {
            Self::Present { count, .. } | Self::Absent { count, .. } => count,
        }
    }
}

/// Allocation state of one block of a sparse image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockState {
    /// No BAT entry.
    Unallocated,
    /// Allocated; the bitmap (read from disk unless the batmap says full)
    /// says which sectors are present. `bitmap_offset` is in bytes.
    Allocated {
        /// Byte offset of the block's sector bitmap.
        bitmap_offset: u64,
        /// The sector bitmap.
        bitmap: SectorBitmap,
    },
}

/// An open VHD file.
#[derive(Debug)]
pub struct VhdImage<F: BlockFile> {
    file: F,
    name: String,
    writable: bool,
    footer: Footer,
    footer_offset: u64,
    header: Option<DynamicHeader>,
    bat: Bat,
    batmap: Option<Batmap>,
    batmap_problem: Option<String>,
    used_backup_footer: bool,
    data_end: u64,
}

fn io_ctx(name: &str, what: &str, offset: u64) -> impl FnOnce(std::io::Error) -> VhdError {
    let context = format!("{name}: {what} at offset {offset}");
    move |e| VhdError::io(context, e)
}

impl<F: BlockFile> VhdImage<F> {
    /// Opens an image. `name` is used in messages (usually the path).
    pub fn open(file: F, name: &str, opts: OpenOptions) -> Result<Self> {
        let len = file
            .len()
            .map_err(|e| VhdError::io(format!("{name}: size"), e))?;
        if len < FOOTER_SIZE as u64 {
            return Err(FormatError::Truncated {
                structure: "footer",
                offset: 0,
                needed: FOOTER_SIZE,
                available: usize::try_from(len).unwrap_or(0),
            }
            .into());
        }
        let footer_offset = (len / SECTOR) * SECTOR - SECTOR;
        let mut buf = [0u8; FOOTER_SIZE];
        let (footer, used_backup_footer) = if opts.use_backup_footer {
            file.read_at(&mut buf, 0)
                .map_err(io_ctx(name, "read backup footer", 0))?;
            (Footer::parse(&buf, 0)?, true)
        } else {
            file.read_at(&mut buf, footer_offset).map_err(io_ctx(
                name,
                "read footer",
                footer_offset,
            ))?;
            match Footer::parse(&buf, footer_offset) {
                Ok(f) => (f, false),
                Err(primary_err) => {
                    // Fall back to the backup copy for reading only.
                    file.read_at(&mut buf, 0)
                        .map_err(io_ctx(name, "read backup footer", 0))?;
                    match Footer::parse(&buf, 0) {
                        Ok(f) if f.kind().is_some_and(DiskType::is_sparse) && !opts.writable => {
                            (f, true)
                        }
                        _ => return Err(primary_err.into()),
                    }
                }
            }
        };
        if footer.poisoned && !opts.ignore_disabled {
            return Err(VhdError::Disabled {
                path: name.to_string(),
            });
        }
        let kind = footer.kind().ok_or_else(|| {
            FormatError::field("footer", "type", footer_offset + 60, "unknown disk type")
        })?;
        let mut img = Self {
            file,
            name: name.to_string(),
            writable: opts.writable,
            footer,
            footer_offset,
            header: None,
            bat: Bat::unallocated(0),
            batmap: None,
            batmap_problem: None,
            used_backup_footer,
            data_end: 0,
        };
        if kind == DiskType::Fixed {
            if img.footer.current_size > footer_offset {
                return Err(FormatError::field(
                    "footer",
                    "current_size",
                    footer_offset + 48,
                    format!(
                        "fixed disk of {} bytes but only {footer_offset} bytes of data in the file",
                        img.footer.current_size
                    ),
                )
                .into());
            }
            return Ok(img);
        }
        img.load_sparse_metadata(len)?;
        if opts.writable {
            if let Some(reason) = &img.batmap_problem {
                return Err(VhdError::BadBatmap {
                    path: name.to_string(),
                    reason: reason.clone(),
                });
            }
        }
        Ok(img)
    }

    fn load_sparse_metadata(&mut self, len: u64) -> Result<()> {
        let hoff = self.footer.data_offset;
        if hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
            return Err(FormatError::field(
                "footer",
                "data_offset",
                self.footer_offset + 16,
                format!("dynamic header at {hoff} lies past end of file {len}"),
            )
            .into());
        }
        let mut hb = vec![0u8; HEADER_SIZE];
        self.file.read_at(&mut hb, hoff).map_err(io_ctx(
            &self.name,
            "read dynamic header",
            hoff,
        ))?;
        let header = DynamicHeader::parse(&hb, hoff)?;
        let entries = header.max_table_entries;
        if entries > MAX_BAT_ENTRIES {
            return Err(FormatError::field(
                "dynamic header",
                "max_table_entries",
                hoff + 28,
                format!("{entries} entries exceed the supported {MAX_BAT_ENTRIES}"),
            )
            .into());
        }
        let needed = u64::from(entries) * u64::from(header.block_size);
        if needed < self.footer.current_size {
            return Err(FormatError::field(
                "dynamic header",
                "max_table_entries",
                hoff + 28,
                format!(
                    "{entries} blocks of {} bytes cannot hold the virtual size {}",
                    header.block_size, self.footer.current_size
                ),
            )
            .into());
        }
        let bat_bytes = u64::from(entries) * 4;
        if header.table_offset.saturating_add(bat_bytes) > len {
            return Err(FormatError::field(
                "dynamic header",
                "table_offset",
                hoff + 16,
                format!(
                    "BAT at {} of {bat_bytes} bytes lies past end of file {len}",
                    header.table_offset
                ),
            )
            .into());
        }
        let mut bb = vec![0u8; usize::try_from(bat_bytes).unwrap_or(0)];
        self.file
            .read_at(&mut bb, header.table_offset)
            .map_err(io_ctx(&self.name, "read BAT", header.table_offset))?;
        self.bat = Bat::parse(&bb, bb.len() / 4, header.table_offset)?;
        self.header = Some(header);
        if self.footer.expects_batmap() {
            match self.read_batmap(len) {
                Ok(b) => self.batmap = Some(b),
                Err(reason) => self.batmap_problem = Some(reason),
            }
        }
        self.data_end = self.end_of_data();
        Ok(())
    }

    /// Offset where a tapdisk batmap header lives: right after the padded BAT.
    pub fn batmap_header_offset(&self) -> Option<u64> {
        self.header.as_ref().map(|h| h.table_offset + h.bat_bytes())
    }

    fn read_batmap(&self, len: u64) -> Result<Batmap, String> {
        let off = self.batmap_header_offset().ok_or("no dynamic header")?;
        if off + BATMAP_HEADER_SIZE as u64 > len {
            return Err("invalid cookie".into());
        }
        let mut hb = vec![0u8; BATMAP_HEADER_SIZE];
        self.file
            .read_at(&mut hb, off)
            .map_err(|e| format!("error reading batmap header: {e}"))?;
        if hb[..8] != crate::batmap::BATMAP_COOKIE {
            return Err("invalid cookie".into());
        }
        let header = BatmapHeader::parse(&hb, off).map_err(|e| e.to_string())?;
        if u64::from(header.batmap_size) * 512 * 8 < self.bat.entries.len() as u64 {
            return Err("batmap-BAT size mismatch".into());
        }
        let end = header
            .batmap_offset
            .checked_add(header.map_bytes())
            .ok_or("invalid batmap size")?;
        if end > self.footer_offset || header.map_bytes() > (64 << 20) {
            return Err("invalid batmap size".into());
        }
        let mut map = vec![0u8; usize::try_from(header.map_bytes()).map_err(|e| e.to_string())?];
        self.file
            .read_at(&mut map, header.batmap_offset)
            .map_err(|e| format!("error reading batmap: {e}"))?;
        if batmap_checksum(&map, header.batmap_version) != header.checksum {
            return Err("invalid checksum".into());
        }
        Ok(Batmap { header, map })
    }

    /// The image name given at open.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The underlying file.
    pub fn file(&self) -> &F {
        &self.file
    }
    /// Consumes the image, returning the file.
    pub fn into_file(self) -> F {
        self.file
    }
    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    /// Byte offset of the primary footer.
    pub fn footer_offset(&self) -> u64 {
        self.footer_offset
    }
    /// Whether the footer came from the backup copy.
    pub fn used_backup_footer(&self) -> bool {
        self.used_backup_footer
    }
    /// The dynamic header (sparse images).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }
    /// The BAT (empty for fixed images).
    pub fn bat(&self) -> &Bat {
        &self.bat
    }
    /// The batmap, when present and valid.
    pub fn batmap(&self) -> Option<&Batmap> {
        self.batmap.as_ref()
    }
    /// Why the expected batmap is unusable, if it is.
    pub fn batmap_problem(&self) -> Option<&str> {
        self.batmap_problem.as_deref()
    }
    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Disk type.
    pub fn disk_type(&self) -> DiskType {
        self.footer.kind().unwrap_or(DiskType::Fixed)
    }
    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }
    /// Virtual size in sectors.
    pub fn total_sectors(&self) -> u64 {
        self.footer.current_size / SECTOR
    }
    /// Whether this is a differencing disk.
    pub fn has_parent(&self) -> bool {
        self.disk_type() == DiskType::Differencing
    }
    /// Whether this differencing disk's parent is a raw file (null UUID).
    pub fn parent_is_raw(&self) -> bool {
        self.has_parent()
            && self
                .header
                .as_ref()
                .is_some_and(DynamicHeader::parent_uuid_is_null)
    }
    /// Sectors per block (sparse images).
    pub fn sectors_per_block(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(0, DynamicHeader::sectors_per_block)
    }
    /// Block size in bytes (sparse images).
    pub fn block_size(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| u64::from(h.block_size))
    }
    /// Bytes of each block's bitmap.
    pub fn bitmap_bytes(&self) -> u64 {
        self.header.as_ref().map_or(0, DynamicHeader::bitmap_bytes)
    }
    /// Number of blocks covering the virtual size.
    pub fn block_count(&self) -> u64 {
        let spb = self.sectors_per_block();
        if spb == 0 {
            0
        } else {
            self.total_sectors().div_ceil(spb)
        }
    }
    /// SM marker byte from the batmap (0 without a batmap).
    pub fn marker(&self) -> u8 {
        self.batmap.as_ref().map_or(0, |b| b.header.marker)
    }
    /// Keyhash from the batmap.
    pub fn keyhash(&self) -> Option<KeyHash> {
        self.batmap.as_ref().map(|b| b.header.keyhash)
    }
    /// The physical size as `vhd-util query -s` reports it: end of the
    /// primary footer.
    pub fn physical_size(&self) -> u64 {
        self.footer_offset + FOOTER_SIZE as u64
    }

    /// Reads `len` bytes at `offset` of the file.
    pub fn read_raw(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.file
            .read_at(&mut b, offset)
            .map_err(io_ctx(&self.name, "read", offset))?;
        Ok(b)
    }

    fn write_raw(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(VhdError::ReadOnly(self.name.clone()));
        }
        self.file
            .write_at(data, offset)
            .map_err(io_ctx(&self.name, "write", offset))
    }

    /// Flushes to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| VhdError::io(format!("{}: sync", self.name), e))
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
        // Locators pointing past the footer are invalid (check reports
        // them); they do not extend the metadata region.
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
        let per = self.bitmap_bytes() + self.block_size();
        self.bat
            .entries
            .iter()
            .filter(|&&e| e != BAT_UNUSED)
            .map(|&e| u64::from(e) * SECTOR + per)
            .fold(self.end_of_metadata(), u64::max)
    }

    /// The state of block `block` (reads its bitmap from disk).
    pub fn block_state(&self, block: u64) -> Result<BlockState> {
        let Some(entry) = self.bat.get(block).filter(|&e| e != BAT_UNUSED) else {
            return Ok(BlockState::Unallocated);
        };
        let bitmap_offset = u64::from(entry) * SECTOR;
        let bm_bytes = self.bitmap_bytes();
        let bitmap = if self.batmap.as_ref().is_some_and(|b| b.is_full(block)) {
            let mut m = SectorBitmap::zeroed(usize::try_from(bm_bytes).unwrap_or(512));
            m.set_range(0, self.sectors_per_block(), true);
            m
        } else {
            self.read_bitmap_at(bitmap_offset)?
        };
        Ok(BlockState::Allocated {
            bitmap_offset,
            bitmap,
        })
    }

    /// Reads a block bitmap at a byte offset.
    pub fn read_bitmap_at(&self, bitmap_offset: u64) -> Result<SectorBitmap> {
        let n = usize::try_from(self.bitmap_bytes()).unwrap_or(512);
        Ok(SectorBitmap::from_bytes(self.read_raw(bitmap_offset, n)?))
    }

    fn check_range(&self, sector: u64, count: u64) -> Result<()> {
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

    /// Maps `count` sectors from `sector` to runs present in this file (with
    /// their byte offsets) or absent from it. Adjacent runs are merged.
    pub fn map(&self, sector: u64, count: u64) -> Result<Vec<Extent>> {
        self.check_range(sector, count)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| {
            if let Some(last) = out.last_mut() {
                match (last, e) {
                    (
                        Extent::Present {
                            count: c,
                            sector: s0,
                            file_offset: f0,
                        },
                        Extent::Present {
                            sector: s1,
                            count: c1,
                            file_offset: f1,
                        },
                    ) if *s0 + *c == s1 && *f0 + *c * SECTOR == f1 => {
                        *c += c1;
                        return;
                    }
                    (Extent::Absent { count: c, .. }, Extent::Absent { count: c1, .. }) => {
                        *c += c1;
                        return;
                    }
                    _ => {}
                }
            }
            out.push(e);
        };
        if self.disk_type() == DiskType::Fixed {
            if count > 0 {
                push(Extent::Present {
                    sector,
                    count,
                    file_offset: sector * SECTOR,
                });
            }
            return Ok(out);
        }
        let spb = self.sectors_per_block();
        let mut cur = sector;
        let end = sector + count;
        while cur < end {
            let block = cur / spb;
            let first = cur % spb;
            let n = (spb - first).min(end - cur);
            match self.block_state(block)? {
                BlockState::Unallocated => push(Extent::Absent {
                    sector: cur,
                    count: n,
                }),
                BlockState::Allocated {
                    bitmap_offset,
                    bitmap,
                } => {
                    let data = bitmap_offset + self.bitmap_bytes();
                    for (s, len, set) in bitmap.runs(first, n) {
                        let vs = block * spb + s;
                        if set {
                            push(Extent::Present {
                                sector: vs,
                                count: len,
                                file_offset: data + s * SECTOR,
                            });
                        } else {
                            push(Extent::Absent {
                                sector: vs,
                                count: len,
                            });
                        }
                    }
                }
            }
            cur += n;
        }
        Ok(out)
    }

    /// Reads sectors held by this file; absent sectors read as zeros.
    pub fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let count = buf.len() as u64 / SECTOR;
        for e in self.map(sector, count)? {
            let at = usize::try_from((e.sector() - sector) * SECTOR).unwrap_or(0);
            let len = usize::try_from(e.count() * SECTOR).unwrap_or(0);
            let dst = &mut buf[at..at + len];
            match e {
                Extent::Present { file_offset, .. } => self
                    .file
                    .read_at(dst, file_offset)
                    .map_err(io_ctx(&self.name, "read data", file_offset))?,
                Extent::Absent { .. } => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Writes whole sectors at `sector` (`data.len()` must be a multiple of
    /// 512), allocating blocks as needed.
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(VhdError::ReadOnly(self.name.clone()));
        }
        if data.len() as u64 % SECTOR != 0 {
            return Err(VhdError::InvalidArgument(format!(
                "write of {} bytes is not a whole number of sectors",
                data.len()
            )));
        }
        let count = data.len() as u64 / SECTOR;
        self.check_range(sector, count)?;
        if self.disk_type() == DiskType::Fixed {
            return self.write_raw(sector * SECTOR, data);
        }
        let spb = self.sectors_per_block();
        let mut cur = sector;
        let end = sector + count;
        while cur < end {
            let block = cur / spb;
            let first = cur % spb;
            let n = (spb - first).min(end - cur);
            let at = usize::try_from((cur - sector) * SECTOR).unwrap_or(0);
            let len = usize::try_from(n * SECTOR).unwrap_or(0);
            self.write_in_block(block, first, &data[at..at + len])?;
            cur += n;
        }
        Ok(())
    }

    /// Writes sectors `[first, first + data/512)` of `block`.
    fn write_in_block(&mut self, block: u64, first: u64, data: &[u8]) -> Result<()> {
        let n = data.len() as u64 / SECTOR;
        let bm_bytes = self.bitmap_bytes();
        match self.block_state(block)? {
            BlockState::Unallocated => {
                let mut bitmap = SectorBitmap::zeroed(usize::try_from(bm_bytes).unwrap_or(512));
                bitmap.set_range(first, n, true);
                self.allocate_block(block, Some((first, data)), &bitmap)
            }
            BlockState::Allocated {
                bitmap_offset,
                mut bitmap,
            } => {
                let data_off = bitmap_offset + bm_bytes + first * SECTOR;
                self.write_raw(data_off, data)?;
                let spb = self.sectors_per_block();
                if (first..first + n).any(|i| !bitmap.get(i)) {
                    bitmap.set_range(first, n, true);
                    self.write_raw(bitmap_offset, bitmap.as_bytes())?;
                    if bitmap.all_set(spb) {
                        self.set_batmap_bit(block, true)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Where the next block's bitmap goes (bytes): past the footer and all
    /// data, with the data sector page aligned.
    fn next_block_offset(&self) -> Result<u64> {
        let base = self
            .footer_offset
            .max(self.data_end)
            .max(self.end_of_metadata());
        let bm = self.bitmap_bytes();
        let pos = round_up(base + bm, DATA_ALIGNMENT) - bm;
        let end = pos + bm + self.block_size() + FOOTER_SIZE as u64;
        if end > MAX_PHYSICAL_BYTES {
            return Err(VhdError::TooLarge {
                what: format!("{}: allocating a block at offset {pos}", self.name),
                bytes: end,
            });
        }
        Ok(pos)
    }

    /// Allocates `block` at the end of the file with the given bitmap and
    /// optional initial data `(first_sector_in_block, bytes)`.
    /// Order: footer at the new EOF, data, bitmap, BAT entry.
    pub fn allocate_block(
        &mut self,
        block: u64,
        data: Option<(u64, &[u8])>,
        bitmap: &SectorBitmap,
    ) -> Result<()> {
        if !self.writable {
            return Err(VhdError::ReadOnly(self.name.clone()));
        }
        let idx = usize::try_from(block)
            .ok()
            .filter(|&i| i < self.bat.entries.len())
            .ok_or_else(|| VhdError::InvalidArgument(format!("block {block} is past the BAT")))?;
        let pos = self.next_block_offset()?;
        let bm = self.bitmap_bytes();
        let new_footer_offset = pos + bm + self.block_size();
        let footer = self.footer.clone().to_bytes_checked();
        self.write_raw(new_footer_offset, &footer)?;
        self.footer_offset = new_footer_offset;
        if let Some((first, bytes)) = data {
            self.write_raw(pos + bm + first * SECTOR, bytes)?;
        }
        self.write_raw(pos, bitmap.as_bytes())?;
        let entry = u32::try_from(pos / SECTOR).map_err(|_| VhdError::TooLarge {
            what: format!("{}: block {block} offset", self.name),
            bytes: pos,
        })?;
        self.bat.entries[idx] = entry;
        self.data_end = self.data_end.max(new_footer_offset);
        self.write_bat_entry(block)?;
        if bitmap.all_set(self.sectors_per_block()) {
            self.set_batmap_bit(block, true)?;
        }
        Ok(())
    }

    /// Writes the BAT sector holding `block`'s entry.
    fn write_bat_entry(&self, block: u64) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let first = usize::try_from(block / 128 * 128).unwrap_or(0);
        let mut sector = [0xffu8; 512];
        for (i, e) in self.bat.entries.iter().skip(first).take(128).enumerate() {
            sector[4 * i..4 * i + 4].copy_from_slice(&e.to_be_bytes());
        }
        self.write_raw(h.table_offset + first as u64 * 4, &sector)
    }

    /// Rewrites the whole BAT.
    pub fn write_bat(&self) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        self.write_raw(h.table_offset, &self.bat.to_bytes())
    }

    /// Replaces the in-memory BAT (for repair/modify), not written.
    pub fn set_bat(&mut self, bat: Bat) {
        self.bat = bat;
        self.data_end = self.end_of_data();
    }

    fn set_batmap_bit(&mut self, block: u64, full: bool) -> Result<()> {
        let Some(b) = self.batmap.as_mut() else {
            return Ok(());
        };
        if b.is_full(block) == full {
            return Ok(());
        }
        if full {
            bitmap::set_bit(&mut b.map, block);
        } else {
            bitmap::clear_bit(&mut b.map, block);
        }
        self.write_batmap()
    }

    /// Writes the batmap header (with a fresh checksum) and map. When the
    /// map directly follows the header both go out in one write.
    pub fn write_batmap(&mut self) -> Result<()> {
        let Some(off) = self.batmap_header_offset() else {
            return Ok(());
        };
        let Some(b) = self.batmap.as_mut() else {
            return Ok(());
        };
        b.header.checksum = batmap_checksum(&b.map, b.header.batmap_version);
        let hb = b.header.to_bytes();
        if b.header.batmap_offset == off + BATMAP_HEADER_SIZE as u64 {
            let mut all = hb.to_vec();
            all.extend_from_slice(&b.map);
            let b_off = off;
            return self.write_raw(b_off, &all);
        }
        let map = b.map.clone();
        let map_off = b.header.batmap_offset;
        self.write_raw(map_off, &map)?;
        self.write_raw(off, &hb)
    }

    /// Replaces the batmap (used by create, resize and repair).
    pub fn set_batmap(&mut self, batmap: Option<Batmap>) {
        self.batmap = batmap;
        self.batmap_problem = None;
    }

    /// Writes the dynamic header (checksum refreshed).
    pub fn write_header(&mut self) -> Result<()> {
        let off = self.footer.data_offset;
        let Some(h) = self.header.as_mut() else {
            return Ok(());
        };
        h.update_checksum();
        let b = h.to_bytes();
        self.write_raw(off, &b)
    }

    /// Mutable access to the header (write it with [`Self::write_header`]).
    pub fn header_mut(&mut self) -> Option<&mut DynamicHeader> {
        self.header.as_mut()
    }

    /// Mutable access to the footer (write it with [`Self::write_footer`]).
    pub fn footer_mut(&mut self) -> &mut Footer {
        &mut self.footer
    }

    /// Writes the primary footer and, for sparse disks, the backup copy.
    pub fn write_footer(&mut self) -> Result<()> {
        let b = self.footer.to_bytes_checked();
        self.write_raw(self.footer_offset, &b)?;
        if self.disk_type().is_sparse() {
            self.write_raw(0, &b)?;
        }
        Ok(())
    }

    /// Moves the primary footer to `offset` and truncates the file after it.
    pub fn relocate_footer(&mut self, offset: u64) -> Result<()> {
        self.footer_offset = offset;
        self.write_footer()?;
        self.file
            .set_len(offset + FOOTER_SIZE as u64)
            .map_err(io_ctx(&self.name, "truncate", offset))
    }

    /// Sets the hidden byte (footer offset 85) and writes both footers.
    pub fn set_hidden(&mut self, v: u8) -> Result<()> {
        self.footer.hidden = v;
        self.write_footer()
    }

    /// Sets the SM marker in the batmap header.
    pub fn set_marker(&mut self, v: u8) -> Result<()> {
        match self.batmap.as_mut() {
            Some(b) => {
                b.header.marker = v;
                self.write_batmap()
            }
            None => Err(VhdError::Unsupported(format!(
                "{}: no batmap to hold the marker",
                self.name
            ))),
        }
    }

    /// Stores the keyhash in the batmap header.
    pub fn set_keyhash(&mut self, k: KeyHash) -> Result<()> {
        match self.batmap.as_mut() {
            Some(b) => {
                b.header.keyhash = k;
                self.write_batmap()
            }
            None => Err(VhdError::Unsupported(format!(
                "{}: no batmap to hold the keyhash",
                self.name
            ))),
        }
    }

    /// Clears sectors of this file so they read as absent (zero when the
    /// image has no parent): data is zeroed and bitmap bits cleared, so that
    /// readers that ignore bitmaps (qemu) also see zeros. Blocks stay
    /// allocated.
    pub fn deallocate_sectors(&mut self, sector: u64, count: u64) -> Result<()> {
        if !self.writable {
            return Err(VhdError::ReadOnly(self.name.clone()));
        }
        self.check_range(sector, count)?;
        if self.disk_type() == DiskType::Fixed {
            let zeros = vec![0u8; usize::try_from(count.min(4096) * SECTOR).unwrap_or(0)];
            let mut cur = sector;
            while cur < sector + count {
                let n = (sector + count - cur).min(4096);
                self.write_raw(
                    cur * SECTOR,
                    &zeros[..usize::try_from(n * SECTOR).unwrap_or(0)],
                )?;
                cur += n;
            }
            return Ok(());
        }
        let spb = self.sectors_per_block();
        let bm_bytes = self.bitmap_bytes();
        let mut cur = sector;
        let end = sector + count;
        while cur < end {
            let block = cur / spb;
            let first = cur % spb;
            let n = (spb - first).min(end - cur);
            if let BlockState::Allocated {
                bitmap_offset,
                mut bitmap,
            } = self.block_state(block)?
            {
                if (first..first + n).any(|i| bitmap.get(i)) {
                    let zeros = vec![0u8; usize::try_from(n * SECTOR).unwrap_or(0)];
                    self.write_raw(bitmap_offset + bm_bytes + first * SECTOR, &zeros)?;
                    self.set_batmap_bit(block, false)?;
                    bitmap.set_range(first, n, false);
                    self.write_raw(bitmap_offset, bitmap.as_bytes())?;
                }
            }
            cur += n;
        }
        Ok(())
    }

    /// Reads and decodes parent locators that carry a path, in slot order:
    /// `(slot, locator, decoded path or decode error)`.
    pub fn parent_locator_paths(&self) -> Vec<(usize, ParentLocator, Result<String, String>)> {
        let Some(h) = &self.header else {
            return Vec::new();
        };
        let len = self.file.len().unwrap_or(0);
        h.locators
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_used())
            .map(|(i, l)| {
                let decoded = (|| {
                    let code = l.platform().ok_or("invalid platform code")?;
                    let n = u64::from(l.data_len);
                    if n == 0 || n > 65536 || l.data_offset.saturating_add(n) > len {
                        return Err(format!(
                            "locator {i} data ({n} bytes at {}) out of bounds",
                            l.data_offset
                        ));
                    }
                    let data = self
                        .read_raw(l.data_offset, usize::try_from(n).unwrap_or(0))
                        .map_err(|e| e.to_string())?;
                    decode_payload(code, &data)
                })();
                (i, *l, decoded)
            })
            .collect()
    }
}

/// Layout numbers for a fresh tapdisk-style sparse image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseLayout {
    /// BAT entries.
    pub bat_entries: u32,
    /// BAT offset (1536).
    pub table_offset: u64,
    /// Padded BAT bytes.
    pub bat_bytes: u64,
    /// Batmap header offset.
    pub batmap_header_offset: u64,
    /// Batmap map offset.
    pub batmap_offset: u64,
    /// Batmap sectors.
    pub batmap_sectors: u32,
    /// First byte after the batmap (parent locators go here).
    pub end: u64,
}

impl SparseLayout {
    /// Computes the layout for `bat_entries` entries.
    pub fn new(bat_entries: u32) -> Self {
        let table_offset = 1536;
        let bat_bytes = round_up(u64::from(bat_entries) * 4, SECTOR).max(SECTOR);
        let batmap_header_offset = table_offset + bat_bytes;
        let batmap_offset = batmap_header_offset + BATMAP_HEADER_SIZE as u64;
        let batmap_sectors = batmap_sectors(bat_entries);
        Self {
            bat_entries,
            table_offset,
            bat_bytes,
            batmap_header_offset,
            batmap_offset,
            batmap_sectors,
            end: batmap_offset + u64::from(batmap_sectors) * SECTOR,
        }
    }
}
