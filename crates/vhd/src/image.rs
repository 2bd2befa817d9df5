//! One VHD file (fixed, dynamic or differencing) over a [`BlockFile`]: the synchronous
//! executor of the VHD core ([`crate::metadata`]).
//!
//! [`VhdImage::open`] reads the footer, dynamic header, BAT and batmap and hands them to
//! [`Metadata::new`], which validates the layout. Reads map sectors through the core and read
//! the present runs; writes, discards and write-zeroes run the core's plans step by step (the
//! crash-ordering contract lives in the plans: see [`crate::plan`]). Maintenance operations
//! (resize, modify, repair, set) rewrite footers, header, BAT and batmap directly through the
//! methods at the end, under their own journal.

use crate::bat::Bat;
use crate::batmap::{batmap_checksum, batmap_sectors, BatmapHeader, KeyHash, BATMAP_HEADER_SIZE};
use crate::bitmap::SectorBitmap;
use crate::bytes::round_up;
use crate::error::{FormatError, Result, VhdError};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE};
use crate::io::BlockFile;
use crate::locator::{decode_payload, ParentLocator};
pub use crate::metadata::{
    Batmap, Metadata, DATA_ALIGNMENT, MAX_BAT_ENTRIES, MAX_PHYSICAL_BYTES, SECTOR,
};
use crate::metadata::{Loaded, LoadedSparse, Placement};
pub use crate::plan::Extent;
use crate::plan::{DataWrite, Io, LoadedBitmap, Mapping, Op, Piece, Plan, Prepare, ZeroRange};

/// Zeros written at once where a range must be zeroed by writing.
const ZERO_CHUNK: u64 = 2 << 20;

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Allow writes.
    pub writable: bool,
    /// Open even if the footer is poisoned by a journaled operation.
    pub ignore_disabled: bool,
    /// Read the footer from the backup copy at offset 0.
    pub use_backup_footer: bool,
    /// Read-only inspection (`check`, `query`, `read`, `scan`, `repair`): skip the layout
    /// validation of [`Metadata::new`], so damaged images can still be examined. Writable
    /// opens are always validated.
    pub inspect: bool,
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
    /// Read-only inspection of a possibly damaged image (see [`OpenOptions::inspect`]).
    pub fn inspect() -> Self {
        Self {
            ignore_disabled: true,
            inspect: true,
            ..Self::default()
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
    writable: bool,
    meta: Metadata,
}

fn io_ctx(name: &str, what: &str, offset: u64) -> impl FnOnce(std::io::Error) -> VhdError {
    let context = format!("{name}: {what} at offset {offset}");
    move |e| VhdError::io(context, e)
}

fn to_len(bytes: u64) -> Result<usize> {
    usize::try_from(bytes)
        .map_err(|_| VhdError::InvalidArgument(format!("{bytes} bytes do not fit in memory")))
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
                    // Fall back to the backup copy, in every mode as the C
                    // tools do (LVHD zeroes the last sector of a volume it
                    // grew, then moves the footer there with `modify -s`).
                    file.read_at(&mut buf, 0)
                        .map_err(io_ctx(name, "read backup footer", 0))?;
                    match Footer::parse(&buf, 0) {
                        Ok(f) if f.kind().is_some_and(DiskType::is_sparse) => (f, true),
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
        if kind == DiskType::Fixed && footer.current_size > footer_offset {
            return Err(FormatError::field(
                "footer",
                "current_size",
                footer_offset + 48,
                format!(
                    "fixed disk of {} bytes but only {footer_offset} bytes of data in the file",
                    footer.current_size
                ),
            )
            .into());
        }
        let sparse = if kind == DiskType::Fixed {
            None
        } else {
            Some(load_sparse(&file, name, &footer, footer_offset, len)?)
        };
        if opts.writable {
            if let Some(Some(Err(reason))) = sparse.as_ref().map(|s| &s.batmap) {
                return Err(VhdError::BadBatmap {
                    path: name.to_string(),
                    reason: reason.clone(),
                });
            }
        }
        let placement = if file.is_block_device() {
            Placement::Device
        } else {
            Placement::File
        };
        let loaded = Loaded {
            footer,
            footer_offset,
            file_len: len,
            placement,
            used_backup_footer,
            sparse,
        };
        let mut meta = Metadata::new(name, loaded, opts.writable || !opts.inspect)?;
        if used_backup_footer && meta.footer_offset() < meta.end_of_data() {
            // A footer rewritten later never lands on data of a file cut short.
            meta.set_footer_offset(meta.end_of_data());
        }
        Ok(Self {
            file,
            writable: opts.writable,
            meta,
        })
    }

    /// The image name given at open.
    pub fn name(&self) -> &str {
        self.meta.name()
    }
    /// The underlying file.
    pub fn file(&self) -> &F {
        &self.file
    }
    /// Consumes the image, returning the file.
    pub fn into_file(self) -> F {
        self.file
    }
    /// The core model of the image's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }
    /// Consumes the image, returning the file and the metadata model (an executor that
    /// does its own I/O keeps the model and drops or reopens the file).
    pub fn into_parts(self) -> (F, Metadata) {
        (self.file, self.meta)
    }
    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        self.meta.footer()
    }
    /// Byte offset of the primary footer.
    pub fn footer_offset(&self) -> u64 {
        self.meta.footer_offset()
    }
    /// Whether the footer came from the backup copy.
    pub fn used_backup_footer(&self) -> bool {
        self.meta.used_backup_footer()
    }
    /// The dynamic header (sparse images).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.meta.header()
    }
    /// The BAT (empty for fixed images).
    pub fn bat(&self) -> &Bat {
        self.meta.bat()
    }
    /// The batmap, when present and valid.
    pub fn batmap(&self) -> Option<&Batmap> {
        self.meta.batmap()
    }
    /// Why the expected batmap is unusable, if it is.
    pub fn batmap_problem(&self) -> Option<&str> {
        self.meta.batmap_problem()
    }
    /// Offset where a tapdisk batmap header lives: right after the padded BAT.
    pub fn batmap_header_offset(&self) -> Option<u64> {
        self.meta.batmap_header_offset()
    }
    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Disk type.
    pub fn disk_type(&self) -> DiskType {
        self.meta.disk_type()
    }
    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.meta.footer().current_size
    }
    /// Virtual size in sectors.
    pub fn total_sectors(&self) -> u64 {
        self.meta.total_sectors()
    }
    /// Whether this is a differencing disk.
    pub fn has_parent(&self) -> bool {
        self.meta.has_parent()
    }
    /// Whether this differencing disk's parent is a raw file (null UUID).
    pub fn parent_is_raw(&self) -> bool {
        self.has_parent()
            && self
                .header()
                .is_some_and(DynamicHeader::parent_uuid_is_null)
    }
    /// Sectors per block (sparse images).
    pub fn sectors_per_block(&self) -> u64 {
        self.meta.sectors_per_block()
    }
    /// Block size in bytes (sparse images).
    pub fn block_size(&self) -> u64 {
        self.meta.block_size()
    }
    /// Bytes of each block's bitmap.
    pub fn bitmap_bytes(&self) -> u64 {
        self.meta.bitmap_bytes()
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
        self.batmap().map_or(0, |b| b.header.marker)
    }
    /// Keyhash from the batmap.
    pub fn keyhash(&self) -> Option<KeyHash> {
        self.batmap().map(|b| b.header.keyhash)
    }
    /// The physical size as `vhd-util query -s` reports it: end of the
    /// primary footer.
    pub fn physical_size(&self) -> u64 {
        self.footer_offset() + FOOTER_SIZE as u64
    }
    /// End of all metadata (header, BAT, batmap, parent locators), bytes.
    pub fn end_of_metadata(&self) -> u64 {
        self.meta.end_of_metadata()
    }
    /// End of the last allocated block (bytes), or the end of metadata.
    pub fn end_of_data(&self) -> u64 {
        self.meta.end_of_data()
    }

    /// Reads `len` bytes at `offset` of the file.
    pub fn read_raw(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.file
            .read_at(&mut b, offset)
            .map_err(io_ctx(self.name(), "read", offset))?;
        Ok(b)
    }

    fn write_raw(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(VhdError::ReadOnly(self.name().to_string()));
        }
        self.file
            .write_at(data, offset)
            .map_err(io_ctx(self.name(), "write", offset))
    }

    /// Flushes to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| VhdError::io(format!("{}: sync", self.name()), e))
    }

    /// The state of block `block` (reads its bitmap from disk).
    pub fn block_state(&self, block: u64) -> Result<BlockState> {
        let Some((bitmap_offset, full)) = self.meta.block(block) else {
            return Ok(BlockState::Unallocated);
        };
        let bitmap = if full {
            let mut m = SectorBitmap::zeroed(to_len(self.bitmap_bytes())?);
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
        let n = to_len(self.bitmap_bytes())?;
        Ok(SectorBitmap::from_bytes(self.read_raw(bitmap_offset, n)?))
    }

    /// Maps `count` sectors from `sector` to runs present in this file (with
    /// their byte offsets) or absent from it. Adjacent runs are merged.
    pub fn map(&self, sector: u64, count: u64) -> Result<Vec<Extent>> {
        let mut loaded = Vec::new();
        loop {
            match self.meta.map(sector, count, &loaded)? {
                Mapping::Done(runs) => return Ok(runs),
                Mapping::NeedBitmaps(loads) => {
                    for load in loads {
                        let bytes = self.read_raw(load.offset, load.len)?;
                        loaded.push(LoadedBitmap::new(load, bytes));
                    }
                }
            }
        }
    }

    /// Reads sectors held by this file; absent sectors read as zeros.
    pub fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let count = buf.len() as u64 / SECTOR;
        for e in self.map(sector, count)? {
            let at = to_len((e.sector() - sector) * SECTOR)?;
            let len = to_len(e.count() * SECTOR)?;
            let dst = &mut buf[at..at + len];
            match e {
                Extent::Present { file_offset, .. } => self
                    .file
                    .read_at(dst, file_offset)
                    .map_err(io_ctx(self.name(), "read data", file_offset))?,
                Extent::Absent { .. } => dst.fill(0),
            }
        }
        Ok(())
    }

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(VhdError::ReadOnly(self.name().to_string()))
        }
    }

    /// Writes whole sectors at `sector` (`data.len()` must be a multiple of
    /// 512), allocating blocks as needed.
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        self.require_writable()?;
        if data.len() as u64 % SECTOR != 0 {
            return Err(VhdError::InvalidArgument(format!(
                "write of {} bytes is not a whole number of sectors",
                data.len()
            )));
        }
        let count = data.len() as u64 / SECTOR;
        self.meta.check_range(sector, count)?;
        for piece in self.meta.pieces(sector, count) {
            self.run(Op::Write, &piece, data)?;
        }
        Ok(())
    }

    /// Makes `count` sectors at `sector` read as zeros. With `deallocate` (discard) an image
    /// without parent frees whole blocks and clears the bits of partial ones; otherwise, and
    /// always in a differencing image, the sectors become present zeros.
    pub fn zero_sectors(&mut self, sector: u64, count: u64, deallocate: bool) -> Result<()> {
        self.require_writable()?;
        self.meta.check_range(sector, count)?;
        for piece in self.meta.pieces(sector, count) {
            self.run(Op::Zero { deallocate }, &piece, &[])?;
        }
        Ok(())
    }

    /// Allocates unallocated `block` with `bitmap` and no data written (`fill -b`): set
    /// sectors read as zeros.
    pub fn allocate_block(&mut self, block: u64, bitmap: &SectorBitmap) -> Result<()> {
        self.require_writable()?;
        let plan = self.meta.plan_new_block(block, bitmap.clone())?;
        self.execute(&plan, &[]).map(|_| ())
    }

    /// Plans and executes `op` on `piece` until it completes.
    fn run(&mut self, op: Op, piece: &Piece, data: &[u8]) -> Result<()> {
        loop {
            // With exclusive access every plan may be made as if under the block's lock.
            let plan = self.meta.plan_locked(op, piece)?;
            if self.execute(&plan, data)? {
                return Ok(());
            }
        }
    }

    /// Runs `plan`'s steps in order; `false` when the operation must be planned again.
    fn execute(&mut self, plan: &Plan, data: &[u8]) -> Result<bool> {
        for step in plan.steps() {
            let mut loaded = None;
            let prepared = loop {
                match self.meta.prepare(step, loaded.as_ref())? {
                    Prepare::Ready(p) => break p,
                    Prepare::Restart => return Ok(false),
                    Prepare::NeedBitmap(load) => {
                        let bytes = self.read_raw(load.offset, load.len)?;
                        loaded = Some(LoadedBitmap::new(load, bytes));
                    }
                }
            };
            self.perform(&prepared.io, data)?;
            self.meta.complete(prepared);
        }
        Ok(true)
    }

    fn perform(&self, io: &Io, data: &[u8]) -> Result<()> {
        match *io {
            // A plain file cannot give space back; the freed block is simply unreferenced.
            Io::Nothing | Io::Release { .. } => Ok(()),
            Io::Write(ref writes) => writes
                .iter()
                .try_for_each(|(offset, bytes)| self.write_raw(*offset, bytes)),
            Io::Data(DataWrite { offset, at, len }) => {
                let bytes = at
                    .checked_add(len)
                    .and_then(|end| data.get(at..end))
                    .ok_or_else(|| {
                        VhdError::InvalidArgument(format!(
                            "{}: data {at}+{len} outside a {}-byte request",
                            self.name(),
                            data.len()
                        ))
                    })?;
                self.write_raw(offset, bytes)
            }
            Io::Zero(ZeroRange { offset, len, .. }) => {
                let zeros = vec![0u8; to_len(len.min(ZERO_CHUNK))?];
                let mut done = 0;
                while done < len {
                    let n = to_len((len - done).min(ZERO_CHUNK))?;
                    self.write_raw(offset + done, &zeros[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Rewrites the whole BAT.
    pub fn write_bat(&self) -> Result<()> {
        let Some(h) = self.header() else {
            return Ok(());
        };
        self.write_raw(h.table_offset, &self.bat().to_bytes())
    }

    /// Replaces the in-memory BAT (for repair/modify), not written.
    pub fn set_bat(&mut self, bat: Bat) {
        self.meta.set_bat(bat);
    }

    /// Writes the batmap header (with a fresh checksum) and map. When the
    /// map directly follows the header both go out in one write.
    pub fn write_batmap(&mut self) -> Result<()> {
        let (Some(off), Some(b)) = (self.batmap_header_offset(), self.meta.batmap()) else {
            return Ok(());
        };
        let mut header = b.header.clone();
        header.checksum = batmap_checksum(&b.map, header.batmap_version);
        let hb = header.to_bytes();
        let map = b.map.clone();
        if let Some(h) = self.meta.batmap_header_mut() {
            h.checksum = header.checksum;
        }
        if header.batmap_offset == off + BATMAP_HEADER_SIZE as u64 {
            let mut all = hb.to_vec();
            all.extend_from_slice(&map);
            return self.write_raw(off, &all);
        }
        self.write_raw(header.batmap_offset, &map)?;
        self.write_raw(off, &hb)
    }

    /// Replaces the batmap (used by create, resize and repair).
    pub fn set_batmap(&mut self, batmap: Option<Batmap>) {
        self.meta.set_batmap(batmap);
    }

    /// Writes the dynamic header (checksum refreshed).
    pub fn write_header(&mut self) -> Result<()> {
        let off = self.footer().data_offset;
        let Some(h) = self.meta.header_mut() else {
            return Ok(());
        };
        h.update_checksum();
        let b = h.to_bytes();
        self.meta.header_changed();
        self.write_raw(off, &b)
    }

    /// Mutable access to the header (write it with [`Self::write_header`]).
    pub fn header_mut(&mut self) -> Option<&mut DynamicHeader> {
        self.meta.header_mut()
    }

    /// Mutable access to the footer (write it with [`Self::write_footer`]).
    pub fn footer_mut(&mut self) -> &mut Footer {
        self.meta.footer_mut()
    }

    /// Writes the primary footer and, for sparse disks, the backup copy.
    pub fn write_footer(&mut self) -> Result<()> {
        let b = self.meta.footer_mut().to_bytes_checked();
        self.write_raw(self.footer_offset(), &b)?;
        if self.disk_type().is_sparse() {
            self.write_raw(0, &b)?;
        }
        Ok(())
    }

    /// Moves the primary footer to `offset` and truncates the file after it.
    pub fn relocate_footer(&mut self, offset: u64) -> Result<()> {
        self.meta.set_footer_offset(offset);
        self.write_footer()?;
        self.file
            .set_len(offset + FOOTER_SIZE as u64)
            .map_err(io_ctx(self.meta.name(), "truncate", offset))
    }

    /// Sets the hidden byte (footer offset 85) and writes both footers.
    pub fn set_hidden(&mut self, v: u8) -> Result<()> {
        self.footer_mut().hidden = v;
        self.write_footer()
    }

    /// Sets the SM marker in the batmap header.
    pub fn set_marker(&mut self, v: u8) -> Result<()> {
        match self.meta.batmap_header_mut() {
            Some(h) => {
                h.marker = v;
                self.write_batmap()
            }
            None => Err(VhdError::Unsupported(format!(
                "{}: no batmap to hold the marker",
                self.name()
            ))),
        }
    }

    /// Stores the keyhash in the batmap header.
    pub fn set_keyhash(&mut self, k: KeyHash) -> Result<()> {
        match self.meta.batmap_header_mut() {
            Some(h) => {
                h.keyhash = k;
                self.write_batmap()
            }
            None => Err(VhdError::Unsupported(format!(
                "{}: no batmap to hold the keyhash",
                self.name()
            ))),
        }
    }

    /// Reads and decodes parent locators that carry a path, in slot order:
    /// `(slot, locator, decoded path or decode error)`.
    pub fn parent_locator_paths(&self) -> Vec<(usize, ParentLocator, Result<String, String>)> {
        let Some(h) = self.header() else {
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

/// Reads the dynamic header, BAT and batmap of a sparse image whose footer is `footer`.
fn load_sparse<F: BlockFile>(
    file: &F,
    name: &str,
    footer: &Footer,
    footer_offset: u64,
    len: u64,
) -> Result<LoadedSparse> {
    let hoff = footer.data_offset;
    if hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
        return Err(FormatError::field(
            "footer",
            "data_offset",
            footer_offset + 16,
            format!("dynamic header at {hoff} lies past end of file {len}"),
        )
        .into());
    }
    let mut hb = vec![0u8; HEADER_SIZE];
    file.read_at(&mut hb, hoff)
        .map_err(io_ctx(name, "read dynamic header", hoff))?;
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
    if needed < footer.current_size {
        return Err(FormatError::field(
            "dynamic header",
            "max_table_entries",
            hoff + 28,
            format!(
                "{entries} blocks of {} bytes cannot hold the virtual size {}",
                header.block_size, footer.current_size
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
    let mut bb = vec![0u8; to_len(bat_bytes)?];
    file.read_at(&mut bb, header.table_offset).map_err(io_ctx(
        name,
        "read BAT",
        header.table_offset,
    ))?;
    let bat = Bat::parse(&bb, bb.len() / 4, header.table_offset)?;
    let batmap = footer
        .expects_batmap()
        .then(|| read_batmap(file, &header, bat.entries.len(), footer_offset, len));
    Ok(LoadedSparse {
        header,
        bat,
        batmap,
    })
}

/// Reads the tapdisk batmap that follows the padded BAT; `Err` says why it is unusable.
fn read_batmap<F: BlockFile>(
    file: &F,
    header: &DynamicHeader,
    blocks: usize,
    footer_offset: u64,
    len: u64,
) -> Result<Batmap, String> {
    let off = header.table_offset + header.bat_bytes();
    if off + BATMAP_HEADER_SIZE as u64 > len {
        return Err("invalid cookie".into());
    }
    let mut hb = vec![0u8; BATMAP_HEADER_SIZE];
    file.read_at(&mut hb, off)
        .map_err(|e| format!("error reading batmap header: {e}"))?;
    if hb[..8] != crate::batmap::BATMAP_COOKIE {
        return Err("invalid cookie".into());
    }
    let header = BatmapHeader::parse(&hb, off).map_err(|e| e.to_string())?;
    if u64::from(header.batmap_size) * 512 * 8 < blocks as u64 {
        return Err("batmap-BAT size mismatch".into());
    }
    let end = header
        .batmap_offset
        .checked_add(header.map_bytes())
        .ok_or("invalid batmap size")?;
    if end > footer_offset || header.map_bytes() > (64 << 20) {
        return Err("invalid batmap size".into());
    }
    let mut map = vec![0u8; usize::try_from(header.map_bytes()).map_err(|e| e.to_string())?];
    file.read_at(&mut map, header.batmap_offset)
        .map_err(|e| format!("error reading batmap: {e}"))?;
    if batmap_checksum(&map, header.batmap_version) != header.checksum {
        return Err("invalid checksum".into());
    }
    Ok(Batmap { header, map })
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
