//! Maintenance operations of `vhd-util`: coalesce (child into parent),
//! resize (fast, within the `-S` preallocation, or journaled), fill,
//! repair, modify (reparent, physical size, zero BAT), copy (flatten a
//! chain into a new dynamic VHD), setting the hidden byte or marker, and
//! snapshot-target selection.
//!
//! Crash safety: every operation that rewrites metadata in place (resize,
//! fast resize, set hidden/marker, modify, repair) runs as a journaled
//! [`Transaction`]: the old bytes of each region it will change are saved
//! to a journal file and synced before the image is touched, and the
//! journal is removed once the image is synced. A crash therefore leaves
//! the old image, the new one, or an image `vhd-util revert` restores from
//! the journal. Operations that take no journal path use
//! [`default_journal_path`]. Coalesce is crash-safe without a journal: it
//! only writes sectors the child still overlays and allocates parent blocks
//! in the crash-safe order of [`VhdImage::allocate_block`], so after a crash
//! both images are valid, the chain reads as before, and running coalesce
//! again completes the merge.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::bat::{Bat, BAT_UNUSED};
use crate::batmap::{batmap_checksum, BatmapHeader, KeyHash};
use crate::bitmap::SectorBitmap;
use crate::bytes::round_up;
use crate::chain::{resolve_parent, Chain};
use crate::create::{create_with, random_uuid, CreateOptions, ParentSpec};
use crate::error::{Result, VhdError};
use crate::footer::{DiskType, FOOTER_SIZE};
use crate::geometry::Geometry;
use crate::image::{Batmap, BlockState, OpenOptions, SparseLayout, VhdImage, SECTOR};
use crate::io::{BlockFile, Opener, StdOpener};
use crate::journal::{EntryKind, Region, Transaction};
use crate::locator::{encode_payload, ParentLocator};

/// Progress callback: `(done, total)` units.
pub type Progress<'a> = Option<&'a mut dyn FnMut(u64, u64)>;

fn report(p: &mut Progress<'_>, done: u64, total: u64) {
    if let Some(f) = p.as_mut() {
        f(done, total);
    }
}

fn open_image<O: Opener>(opener: &O, path: &Path, opts: OpenOptions) -> Result<VhdImage<O::File>> {
    let name = path.display().to_string();
    let f = opener
        .open(path, opts.writable)
        .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
    VhdImage::open(f, &name, opts)
}

/// The parent a coalesce writes into.
enum Target<F: BlockFile> {
    Vhd(Box<VhdImage<F>>),
    Raw(F, String),
}

/// Merges differencing disk `child` into its parent (VHD or raw). Returns
/// the number of sectors copied. With `sparse`, all-zero runs are not
/// written into unallocated parent blocks of a parent without a parent.
pub fn coalesce<O: Opener>(
    opener: &O,
    child_path: &Path,
    sparse: bool,
    mut progress: Progress<'_>,
) -> Result<u64> {
    let child = open_image(opener, child_path, OpenOptions::read_only())?;
    if !child.has_parent() {
        return Err(VhdError::InvalidArgument(format!(
            "{}: not a differencing disk",
            child_path.display()
        )));
    }
    let parent_path = resolve_parent(&child, child_path)?;
    let mut target = if child.parent_is_raw() {
        let f = opener
            .open(&parent_path, true)
            .map_err(|e| VhdError::io(format!("{}: open", parent_path.display()), e))?;
        Target::Raw(f, parent_path.display().to_string())
    } else {
        let p = open_image(opener, &parent_path, OpenOptions::read_write())?;
        if child.header().map(|h| h.parent_uuid) != Some(p.footer().uuid) {
            return Err(VhdError::ParentUuidMismatch {
                child: child_path.display().to_string(),
                parent: parent_path,
            });
        }
        if p.disk_type().is_sparse() && p.block_size() != child.block_size() {
            return Err(VhdError::Unsupported(
                "coalesce across different block sizes".into(),
            ));
        }
        if p.total_sectors() < child.total_sectors() {
            return Err(VhdError::Unsupported(format!(
                "parent {} is smaller than the child; resize it first",
                parent_path.display()
            )));
        }
        Target::Vhd(Box::new(p))
    };
    let spb = child.sectors_per_block();
    let total_blocks = child.block_count();
    let mut copied = 0u64;
    let mut buf = Vec::new();
    for block in 0..total_blocks {
        report(&mut progress, block, total_blocks);
        let BlockState::Allocated {
            bitmap_offset,
            bitmap,
        } = child.block_state(block)?
        else {
            continue;
        };
        let data_off = bitmap_offset + child.bitmap_bytes();
        let in_disk = (child.total_sectors() - block * spb).min(spb);
        for (first, n, set) in bitmap.runs(0, in_disk) {
            if !set {
                continue;
            }
            buf.resize(usize::try_from(n * SECTOR).unwrap_or(0), 0);
            child
                .file()
                .read_at(&mut buf, data_off + first * SECTOR)
                .map_err(|e| VhdError::io(format!("{}: read block {block}", child.name()), e))?;
            let sector = block * spb + first;
            match &mut target {
                Target::Raw(f, name) => {
                    f.write_at(&buf, sector * SECTOR).map_err(|e| {
                        VhdError::io(format!("{name}: write at sector {sector}"), e)
                    })?;
                }
                Target::Vhd(p) => {
                    let skip = sparse
                        && !p.has_parent()
                        && buf.iter().all(|&b| b == 0)
                        && matches!(p.block_state(sector / spb)?, BlockState::Unallocated);
                    if !skip {
                        p.write_sectors(sector, &buf)?;
                    }
                }
            }
            copied += n;
        }
    }
    match &target {
        Target::Raw(f, name) => f
            .sync()
            .map_err(|e| VhdError::io(format!("{name}: sync"), e))?,
        Target::Vhd(p) => p.sync()?,
    }
    report(&mut progress, total_blocks, total_blocks);
    Ok(copied)
}

fn require_tap_sparse<F: BlockFile>(img: &VhdImage<F>) -> Result<()> {
    if !img.disk_type().is_sparse() {
        return Err(VhdError::Unsupported(format!(
            "{}: not a dynamic disk",
            img.name()
        )));
    }
    if !img.footer().created_by_tap() {
        return Err(VhdError::Unsupported(format!(
            "{}: resize supports only tapdisk-created VHDs",
            img.name()
        )));
    }
    Ok(())
}

/// Where journals of block devices go (created when first needed).
pub const DEVICE_JOURNAL_DIR: &str = "/var/lib/vhd-util";

/// The journal used by operations that are not given one: `<image>.journal`
/// next to a regular file; for a block device (whose directory may not
/// persist), `/var/lib/vhd-util/<path with '/' replaced by '_'>.journal`.
pub fn default_journal_path(image: &Path) -> PathBuf {
    let is_device = std::fs::metadata(image).is_ok_and(|m| !m.is_file());
    if is_device {
        let flat: String = image
            .display()
            .to_string()
            .chars()
            .map(|c| if c == '/' { '_' } else { c })
            .collect();
        return Path::new(DEVICE_JOURNAL_DIR).join(format!("{flat}.journal"));
    }
    let mut s = image.as_os_str().to_os_string();
    s.push(".journal");
    PathBuf::from(s)
}

/// The footer regions of `img`: the primary and, for sparse images, the
/// backup copy at offset 0.
fn footer_regions<F: BlockFile>(img: &VhdImage<F>) -> Vec<Region> {
    let mut r = vec![(EntryKind::Footer, img.footer_offset(), FOOTER_SIZE as u64)];
    if img.disk_type().is_sparse() {
        r.push((EntryKind::FooterCopy, 0, FOOTER_SIZE as u64));
    }
    r
}

fn begin<O: Opener, F: BlockFile>(
    opener: &O,
    journal_path: &Path,
    img: &VhdImage<F>,
    regions: &[Region],
) -> Result<Transaction<O::File>> {
    if journal_path.parent() == Some(Path::new(DEVICE_JOURNAL_DIR)) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(DEVICE_JOURNAL_DIR)
            .map_err(|e| {
                VhdError::io(format!("{DEVICE_JOURNAL_DIR}: create journal directory"), e)
            })?;
    }
    Transaction::begin(opener, journal_path, img.file(), img.footer().uuid, regions)
}

/// Grows a sparse image in place up to the size its BAT was preallocated
/// for (`-S`): only the footers change, under a journal at
/// [`default_journal_path`].
pub fn resize_fast<O: Opener>(opener: &O, path: &Path, new_size: u64) -> Result<()> {
    resize_fast_with_journal(opener, path, new_size, &default_journal_path(path))
}

/// [`resize_fast`] with an explicit journal path.
pub fn resize_fast_with_journal<O: Opener>(
    opener: &O,
    path: &Path,
    new_size: u64,
    journal_path: &Path,
) -> Result<()> {
    let mut img = open_image(opener, path, OpenOptions::read_write())?;
    require_tap_sparse(&img)?;
    check_new_size(&img, new_size)?;
    let max = img.header().map_or(0, |h| {
        u64::from(h.max_table_entries) * u64::from(h.block_size)
    });
    if new_size > max {
        return Err(VhdError::NoSpace(format!(
            "{}: {new_size} bytes exceeds the {max} bytes preallocated for fast resize",
            path.display()
        )));
    }
    let txn = begin(opener, journal_path, &img, &footer_regions(&img))?;
    let f = img.footer_mut();
    f.current_size = new_size;
    f.geometry = Geometry::for_size(new_size);
    img.write_footer()?;
    img.sync()?;
    txn.finish()
}

/// Footer or batmap fields `vhd-util set` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetField {
    /// The hidden byte (footer offset 85), written to both footers.
    Hidden,
    /// The SM marker in the batmap header.
    Marker,
}

/// Sets the hidden byte or the marker of the image at `path`, journaled at
/// `journal_path` (see [`default_journal_path`]).
pub fn set_field<O: Opener>(
    opener: &O,
    path: &Path,
    field: SetField,
    value: u8,
    journal_path: &Path,
) -> Result<()> {
    let mut img = open_image(opener, path, OpenOptions::read_write())?;
    let regions = match field {
        SetField::Hidden => footer_regions(&img),
        SetField::Marker => {
            let (Some(hdr), Some(b)) = (img.batmap_header_offset(), img.batmap()) else {
                return Err(VhdError::Unsupported(format!(
                    "{}: no batmap to hold the marker",
                    path.display()
                )));
            };
            vec![
                (EntryKind::BatmapHeader, hdr, 512),
                (
                    EntryKind::BatmapMap,
                    b.header.batmap_offset,
                    b.header.map_bytes(),
                ),
            ]
        }
    };
    let txn = begin(opener, journal_path, &img, &regions)?;
    match field {
        SetField::Hidden => img.set_hidden(value)?,
        SetField::Marker => img.set_marker(value)?,
    }
    img.sync()?;
    txn.finish()
}

fn check_new_size<F: BlockFile>(img: &VhdImage<F>, new_size: u64) -> Result<()> {
    if new_size % SECTOR != 0 || new_size == 0 {
        return Err(VhdError::InvalidArgument(format!(
            "size {new_size} is not a multiple of 512"
        )));
    }
    if new_size < img.virtual_size() {
        return Err(VhdError::InvalidArgument(format!(
            "{}: shrinking from {} to {new_size} bytes is not supported",
            img.name(),
            img.virtual_size()
        )));
    }
    Ok(())
}

/// Grows an image offline under a journal at `journal_path`. Sparse images
/// get a larger BAT and batmap; data blocks in the way are moved to the end
/// of the file. Fixed images get more data and a moved footer. After a crash
/// the image is disabled (poisoned footers) until [`revert_path`] runs, or
/// already complete.
pub fn resize_journaled<O: Opener>(
    opener: &O,
    path: &Path,
    new_size: u64,
    journal_path: &Path,
) -> Result<()> {
    let mut img = open_image(opener, path, OpenOptions::read_write())?;
    check_new_size(&img, new_size)?;
    if img.disk_type().is_sparse() {
        require_tap_sparse(&img)?;
    }
    let mut txn = begin(opener, journal_path, &img, &footer_regions(&img))?;
    let old_footer_offset = img.footer_offset();
    if img.disk_type() == DiskType::Fixed {
        poison(&mut img)?;
        // The old footer becomes data and must read as zeros.
        img.file()
            .write_at(&[0u8; FOOTER_SIZE], old_footer_offset)
            .map_err(|e| VhdError::io(format!("{}: clear old footer", path.display()), e))?;
        let f = img.footer_mut();
        f.current_size = new_size;
        f.geometry = Geometry::for_size(new_size);
        img.footer_mut().poisoned = false;
        img.relocate_footer(new_size)?;
        img.sync()?;
    } else {
        let on_device = crate::io::is_block_device(path);
        resize_sparse(&mut img, &mut txn, new_size, on_device)?;
    }
    txn.finish()
}

fn poison<F: BlockFile>(img: &mut VhdImage<F>) -> Result<()> {
    img.footer_mut().poisoned = true;
    img.write_footer()?;
    img.sync()
}

/// Grows a sparse image's BAT (moving blocks in the way) or only its size.
/// On a block device (`on_device`) moved blocks go after the data, not
/// after the footer in the device's last sector, and the footer stays there.
fn resize_sparse<F: BlockFile, J: BlockFile>(
    img: &mut VhdImage<F>,
    journal: &mut Transaction<J>,
    new_size: u64,
    on_device: bool,
) -> Result<()> {
    let header = img
        .header()
        .cloned()
        .ok_or_else(|| VhdError::Unsupported("no header".into()))?;
    let block = u64::from(header.block_size);
    let new_entries = u32::try_from(new_size.div_ceil(block))
        .ok()
        .filter(|&n| n <= crate::image::MAX_BAT_ENTRIES)
        .ok_or_else(|| VhdError::TooLarge {
            what: format!("{}: BAT for {new_size} bytes", img.name()),
            bytes: new_size,
        })?;
    if new_entries <= header.max_table_entries {
        poison(img)?;
        let f = img.footer_mut();
        f.current_size = new_size;
        f.geometry = Geometry::for_size(new_size);
        f.poisoned = false;
        write_final_footer(img)?;
        return Ok(());
    }
    // New metadata layout from the BAT on.
    let layout = SparseLayout::new(new_entries);
    let table_offset = header.table_offset;
    let batmap_hdr = table_offset + (layout.batmap_header_offset - layout.table_offset);
    let batmap_off = batmap_hdr + 512;
    let mut meta_end = batmap_off + u64::from(layout.batmap_sectors) * SECTOR;
    // Parent locator payloads move after the new batmap.
    let mut new_locs: Vec<(usize, ParentLocator, Vec<u8>)> = Vec::new();
    for (slot, l) in header
        .locators
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_used())
    {
        let len = usize::try_from(l.space_bytes().min(1 << 20)).unwrap_or(0);
        let data = img.read_raw(l.data_offset, len)?;
        let mut nl = *l;
        nl.data_offset = meta_end;
        meta_end += l.space_bytes();
        new_locs.push((slot, nl, data));
    }
    let meta_end = round_up(meta_end, SECTOR);
    // Blocks whose bitmap/data intersect the new metadata region move to
    // the end of the data; where each goes is planned before anything is
    // touched (a volume too small for them fails here, unchanged).
    let per = img.bitmap_bytes() + block;
    let mut bat = img.bat().clone();
    let mut batmap_bits = img.batmap().map(|b| b.map.clone());
    let device_footer = on_device.then(|| img.footer_offset());
    let mut next = img.end_of_data().max(meta_end);
    if device_footer.is_none() {
        next = next.max(img.footer_offset());
    }
    let bm = img.bitmap_bytes();
    let mut moves = Vec::new();
    for (i, &e) in bat.entries.iter().enumerate() {
        if e == BAT_UNUSED || u64::from(e) * SECTOR >= meta_end {
            continue;
        }
        let dst = round_up(next + bm, crate::image::DATA_ALIGNMENT) - bm;
        if device_footer.is_some_and(|f| dst + per > f) {
            return Err(VhdError::NoSpace(format!(
                "{}: no room before the footer to move block {i}; grow the volume first",
                img.name()
            )));
        }
        moves.push((i, u64::from(e) * SECTOR, dst));
        next = dst + per;
    }
    // Save every old byte in [0, meta_end) that will be overwritten, plus
    // the BAT, batmap and locators (all inside that range or moved).
    let old_len = img.file().len().map_err(|e| VhdError::io("size", e))?;
    let region = meta_end.min(old_len);
    journal.save(img.file(), EntryKind::Header, 0, table_offset.min(region))?;
    if region > table_offset {
        journal.save(
            img.file(),
            EntryKind::Data,
            table_offset,
            region - table_offset,
        )?;
    }
    poison(img)?;
    let mut buf = vec![0u8; usize::try_from(per).unwrap_or(0)];
    for (i, src, dst) in moves {
        img.file()
            .read_at(&mut buf, src)
            .map_err(|e| VhdError::io(format!("{}: read block {i}", img.name()), e))?;
        img.file()
            .write_at(&buf, dst)
            .map_err(|e| VhdError::io(format!("{}: write block {i} at {dst}", img.name()), e))?;
        bat.entries[i] = u32::try_from(dst / SECTOR).map_err(|_| VhdError::TooLarge {
            what: format!("{}: moved block {i}", img.name()),
            bytes: dst,
        })?;
    }
    // New BAT, batmap and locators.
    let mut new_bat = Bat::unallocated(new_entries as usize);
    new_bat.entries[..bat.entries.len()].copy_from_slice(&bat.entries);
    let mut bh = img
        .batmap()
        .map(|b| b.header.clone())
        .unwrap_or_else(|| BatmapHeader::new(batmap_off, layout.batmap_sectors));
    bh.batmap_offset = batmap_off;
    bh.batmap_size = layout.batmap_sectors;
    let mut map = vec![0u8; usize::try_from(layout.batmap_sectors).unwrap_or(1) * 512];
    if let Some(old) = batmap_bits.take() {
        let n = old.len().min(map.len());
        map[..n].copy_from_slice(&old[..n]);
    }
    bh.checksum = batmap_checksum(&map, bh.batmap_version);
    let hdr = img
        .header_mut()
        .ok_or_else(|| VhdError::Unsupported("no header".into()))?;
    hdr.max_table_entries = new_entries;
    for (slot, nl, _) in &new_locs {
        hdr.locators[*slot] = *nl;
    }
    img.set_bat(new_bat);
    img.write_bat()?;
    // Zero the gap between BAT and batmap header, then the batmap.
    img.set_batmap(Some(Batmap { header: bh, map }));
    if img.footer().expects_batmap() {
        img.write_batmap()?;
    }
    for (_, nl, data) in &new_locs {
        img.file()
            .write_at(data, nl.data_offset)
            .map_err(|e| VhdError::io(format!("{}: write locator", img.name()), e))?;
    }
    img.write_header()?;
    let f = img.footer_mut();
    f.current_size = new_size;
    f.geometry = Geometry::for_size(new_size);
    f.poisoned = false;
    let end = next.max(img.end_of_data()).max(meta_end);
    // Footer: backup first, then primary at the new end; truncate after.
    let b = img.footer_mut().to_bytes_checked();
    img.file()
        .write_at(&b, 0)
        .map_err(|e| VhdError::io(format!("{}: write backup footer", img.name()), e))?;
    img.relocate_footer(device_footer.unwrap_or(end))?;
    img.sync()
}

fn write_final_footer<F: BlockFile>(img: &mut VhdImage<F>) -> Result<()> {
    img.write_footer()?;
    img.sync()
}

/// Reverts an interrupted journaled operation on `path` and removes the
/// journal. Returns the number of regions restored.
pub fn revert_path(path: &Path, journal_path: &Path) -> Result<usize> {
    let vhd = StdOpener
        .open(path, true)
        .map_err(|e| VhdError::io(format!("{}: open", path.display()), e))?;
    let device = crate::io::is_block_device(journal_path);
    let j = StdOpener
        .open(journal_path, device)
        .map_err(|e| VhdError::io(format!("{}: open journal", journal_path.display()), e))?;
    let n = crate::journal::revert(&vhd, &j)?;
    if device && n > 0 {
        crate::journal::mark_committed(&j)?;
    }
    crate::journal::remove_journal(journal_path)?;
    Ok(n)
}

/// Allocates every block of the leaf. Without `metadata_only` each block is
/// read through the chain and written back (full allocation); with it, only
/// BAT entries and bitmaps are created (blocks of images without a parent
/// are marked present and read as zeros; differencing images keep empty
/// bitmaps). `range` limits the work to a sector range.
pub fn fill<O: Opener>(
    opener: &O,
    path: &Path,
    metadata_only: bool,
    range: Option<(u64, u64)>,
    mut progress: Progress<'_>,
) -> Result<()> {
    let mut chain = Chain::open_with(opener, path, true)?;
    let leaf = chain.leaf();
    if !leaf.disk_type().is_sparse() {
        return Ok(());
    }
    let spb = leaf.sectors_per_block();
    let total = leaf.total_sectors();
    let (from, to) = range.unwrap_or((0, total));
    let to = to.min(total);
    let first_block = from / spb;
    let last_block = to.div_ceil(spb);
    let mut buf = vec![0u8; usize::try_from(spb * SECTOR).unwrap_or(0)];
    for block in first_block..last_block {
        report(&mut progress, block - first_block, last_block - first_block);
        let start = block * spb;
        let n = spb.min(total - start);
        let len = usize::try_from(n * SECTOR).unwrap_or(0);
        if metadata_only {
            let leaf = chain.leaf_mut();
            if leaf.bat().is_allocated(block) {
                continue;
            }
            let mut bitmap =
                SectorBitmap::zeroed(usize::try_from(leaf.bitmap_bytes()).unwrap_or(512));
            if !leaf.has_parent() {
                bitmap.set_range(0, spb, true);
            }
            leaf.allocate_block(block, &bitmap)?;
        } else {
            chain.read(start, &mut buf[..len])?;
            chain.write(start, &buf[..len])?;
        }
    }
    report(
        &mut progress,
        last_block - first_block,
        last_block - first_block,
    );
    chain.sync()
}

/// Rewrites the primary footer at the end of the data (from the backup copy
/// with `use_backup`), creating a UUID if it is null, and truncates after
/// it. Journaled at [`default_journal_path`].
pub fn repair<O: Opener>(opener: &O, path: &Path, use_backup: bool) -> Result<()> {
    repair_with_journal(opener, path, use_backup, &default_journal_path(path))
}

/// [`repair`] with an explicit journal path.
pub fn repair_with_journal<O: Opener>(
    opener: &O,
    path: &Path,
    use_backup: bool,
    journal_path: &Path,
) -> Result<()> {
    let name = path.display().to_string();
    let f = opener
        .open(path, true)
        .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
    let img = VhdImage::open(
        f,
        &name,
        OpenOptions {
            writable: false,
            ignore_disabled: true,
            use_backup_footer: use_backup,
            inspect: true,
        },
    )?;
    // A block device keeps its footer in its last sector, as the C tool.
    let end = if crate::io::is_block_device(path) {
        img.footer_offset()
    } else if img.disk_type().is_sparse() {
        img.end_of_data()
    } else {
        img.virtual_size()
    };
    let mut footer = img.footer().clone();
    footer.poisoned = false;
    if footer.uuid == [0; 16] {
        footer.uuid = random_uuid();
    }
    let sparse = img.disk_type().is_sparse();
    let old_len = img
        .file()
        .len()
        .map_err(|e| VhdError::io(format!("{name}: size"), e))?;
    // Everything from the new footer on may be overwritten or cut off.
    let mut regions = vec![(EntryKind::Footer, end, old_len.saturating_sub(end))];
    if sparse {
        regions.push((EntryKind::FooterCopy, 0, FOOTER_SIZE as u64));
    }
    let txn = begin(opener, journal_path, &img, &regions)?;
    let file = img.into_file();
    let b = footer.to_bytes_checked();
    file.write_at(&b, end)
        .map_err(|e| VhdError::io(format!("{name}: write footer at {end}"), e))?;
    if sparse {
        file.write_at(&b, 0)
            .map_err(|e| VhdError::io(format!("{name}: write backup footer"), e))?;
    }
    file.set_len(end + FOOTER_SIZE as u64)
        .map_err(|e| VhdError::io(format!("{name}: truncate"), e))?;
    file.sync()
        .map_err(|e| VhdError::io(format!("{name}: sync"), e))?;
    txn.finish()
}

/// What `modify` changes.
#[derive(Debug, Clone, Default)]
pub struct ModifyOptions {
    /// New parent path and whether it is raw.
    pub parent: Option<(PathBuf, bool)>,
    /// New physical size (footer moved to `size - 512`).
    pub physical_size: Option<u64>,
    /// Mark every block unallocated.
    pub zero_bat: bool,
}

/// "Dangerous" metadata edits: reparent, move the footer, zero the BAT.
/// Journaled at [`default_journal_path`].
pub fn modify<O: Opener>(opener: &O, path: &Path, opts: &ModifyOptions) -> Result<()> {
    modify_with_journal(opener, path, opts, &default_journal_path(path))
}

/// [`modify`] with an explicit journal path. Every argument is validated
/// before the journal is created, so a refused edit leaves no journal.
pub fn modify_with_journal<O: Opener>(
    opener: &O,
    path: &Path,
    opts: &ModifyOptions,
    journal_path: &Path,
) -> Result<()> {
    let mut img = open_image(opener, path, OpenOptions::read_write())?;
    let mut regions: Vec<Region> = Vec::new();
    let plan = match &opts.parent {
        Some((parent, raw)) => {
            let plan = plan_reparent(&img, path, parent, *raw)?;
            regions.push((EntryKind::Header, img.footer().data_offset, 1024));
            for &(off, space) in &plan.areas {
                regions.push((EntryKind::Locator, off, space));
            }
            Some(plan)
        }
        None => None,
    };
    if opts.zero_bat {
        if let Some(h) = img.header() {
            regions.push((EntryKind::Bat, h.table_offset, h.bat_bytes()));
        }
        if let (Some(hdr), Some(b)) = (img.batmap_header_offset(), img.batmap()) {
            regions.push((EntryKind::BatmapHeader, hdr, 512));
            regions.push((
                EntryKind::BatmapMap,
                b.header.batmap_offset,
                b.header.map_bytes(),
            ));
        }
    }
    if let Some(size) = opts.physical_size {
        let min = if img.disk_type().is_sparse() {
            img.end_of_data()
        } else {
            img.virtual_size()
        } + FOOTER_SIZE as u64;
        if size < min || size % SECTOR != 0 {
            return Err(VhdError::InvalidArgument(format!(
                "physical size {size} must be a multiple of 512 and at least {min}"
            )));
        }
        // The sector the footer moves to and the old footer; whatever a
        // shrinking file loses in between is unreferenced space.
        regions.push((
            EntryKind::Footer,
            size - FOOTER_SIZE as u64,
            FOOTER_SIZE as u64,
        ));
        if img.footer_offset() != size - FOOTER_SIZE as u64 {
            regions.push((EntryKind::Footer, img.footer_offset(), FOOTER_SIZE as u64));
        }
        if img.disk_type().is_sparse() {
            regions.push((EntryKind::FooterCopy, 0, FOOTER_SIZE as u64));
        }
    }
    if regions.is_empty() {
        return Ok(());
    }
    let txn = begin(opener, journal_path, &img, &regions)?;
    if let Some(plan) = plan {
        apply_reparent(&mut img, path, plan)?;
    }
    if opts.zero_bat {
        // Batmap first: a batmap with fewer "full" bits than the BAT
        // allows is still consistent.
        if let Some(mut b) = img.batmap().cloned() {
            b.map.fill(0);
            img.set_batmap(Some(b));
            img.write_batmap()?;
        }
        let n = img.bat().entries.len();
        img.set_bat(Bat::unallocated(n));
        img.write_bat()?;
    }
    if let Some(size) = opts.physical_size {
        img.relocate_footer(size - FOOTER_SIZE as u64)?;
    }
    img.sync()?;
    txn.finish()
}

/// New parent fields and where each new locator payload goes.
struct ReparentPlan {
    spec: ParentSpec,
    /// `(code, offset, space bytes, payload)`.
    payloads: Vec<(crate::locator::PlatformCode, u64, u64, Vec<u8>)>,
    /// The existing locator areas `(offset, bytes)` the payloads reuse.
    areas: Vec<(u64, u64)>,
}

/// Validates a reparent and places the new locator payloads inside the
/// areas the current locators occupy (never elsewhere in the file).
fn plan_reparent<F: BlockFile>(
    img: &VhdImage<F>,
    path: &Path,
    parent: &Path,
    raw: bool,
) -> Result<ReparentPlan> {
    if !img.has_parent() {
        return Err(VhdError::InvalidArgument(format!(
            "{}: not a differencing disk",
            path.display()
        )));
    }
    let uuid = if raw {
        [0; 16]
    } else {
        let p = open_image(&StdOpener, parent, OpenOptions::read_only())?;
        crate::chain::refuse_parent_loop(path, img.footer().uuid, parent)?;
        p.footer().uuid
    };
    let spec: ParentSpec = crate::create::parent_spec(path, parent, uuid, None, false)?;
    let header = img
        .header()
        .ok_or_else(|| VhdError::Unsupported("no header".into()))?;
    let file_end = img.footer_offset();
    let mut areas: Vec<(u64, u64)> = header
        .locators
        .iter()
        .filter(|l| l.is_used() && l.data_offset > 0)
        .map(|l| (l.data_offset, l.space_bytes()))
        .filter(|&(off, space)| off.checked_add(space).is_some_and(|e| e <= file_end))
        .collect();
    areas.sort_unstable();
    // Cursor into each area: bytes already handed out.
    let mut used = vec![0u64; areas.len()];
    let mut payloads = Vec::new();
    for (code, p) in &spec.locators {
        let data = encode_payload(*code, p).ok_or_else(|| {
            VhdError::InvalidArgument(format!("cannot encode parent locator {p}"))
        })?;
        let sz = round_up(data.len() as u64, SECTOR).max(SECTOR);
        let slot = (0..areas.len()).find(|&i| areas[i].1 - used[i] >= sz);
        let Some(i) = slot else {
            let space: u64 = areas.iter().map(|a| a.1).sum();
            return Err(VhdError::NoSpace(format!(
                "{}: {space} bytes of parent locator space cannot hold the new locators",
                path.display()
            )));
        };
        payloads.push((*code, areas[i].0 + used[i], sz, data));
        used[i] += sz;
    }
    Ok(ReparentPlan {
        spec,
        payloads,
        areas,
    })
}

/// Writes the planned locator payloads, then the header that points at
/// them (the journal holds the old bytes of both).
fn apply_reparent<F: BlockFile>(
    img: &mut VhdImage<F>,
    path: &Path,
    plan: ReparentPlan,
) -> Result<()> {
    let ReparentPlan { spec, payloads, .. } = plan;
    for (_, off, sz, data) in &payloads {
        let mut padded = data.clone();
        padded.resize(usize::try_from(*sz).unwrap_or(512), 0);
        img.file()
            .write_at(&padded, *off)
            .map_err(|e| VhdError::io(format!("{}: write locator at {off}", path.display()), e))?;
    }
    let h = img
        .header_mut()
        .ok_or_else(|| VhdError::Unsupported("no header".into()))?;
    h.parent_uuid = spec.uuid;
    h.parent_timestamp = spec.timestamp;
    h.set_parent_name(&spec.name)?;
    h.locators = Default::default();
    for (slot, (code, off, sz, data)) in payloads.iter().enumerate() {
        h.locators[slot] = ParentLocator {
            code: code.code(),
            data_space: u32::try_from(sz / SECTOR).unwrap_or(1),
            data_len: u32::try_from(data.len()).unwrap_or(0),
            reserved: 0,
            data_offset: *off,
        };
    }
    img.write_header()
}

/// Writes the data of the chain at `src` into a new dynamic VHD `dst`
/// (same virtual size); all-zero blocks stay unallocated.
///
/// Encryption (`vhd-util copy -k/-E`): a chain whose leaf records a keyhash
/// is encrypted; its data is copied as it is stored (valid under the same key
/// at the same virtual sectors) and `dst` gets the same keyhash; a `key`
/// given with it must match that keyhash. A plain chain copied with a `key`
/// is encrypted on the way ([`crate::crypt`]): `dst` records the key's hash
/// (zero nonce, as the C tool) and every block written is encrypted whole, so
/// the sectors a block's bitmap leaves clear decrypt to zeros too.
pub fn copy<O: Opener>(
    opener: &O,
    src: &Path,
    dst: &Path,
    key: Option<&[u8]>,
    mut progress: Progress<'_>,
) -> Result<u64> {
    let chain = Chain::open_with(opener, src, false)?;
    let key_error = |path: &Path, source| VhdError::Key {
        path: path.display().to_string(),
        source,
    };
    let stored = chain.leaf().keyhash().filter(|k| k.cookie != 0);
    let (keyhash, cipher) = match (stored, key) {
        (Some(stored), Some(key)) => {
            crate::crypt::check_key(Some(&stored), key).map_err(|e| key_error(src, e))?;
            (Some(stored), None)
        }
        (Some(stored), None) => (Some(stored), None),
        (None, Some(key)) => {
            let cipher = crate::crypt::SectorCipher::new(key).map_err(|e| key_error(dst, e))?;
            let nonce = [0u8; 32];
            let hash = crate::crypt::keyhash(&nonce, key);
            (
                Some(KeyHash {
                    cookie: 1,
                    nonce,
                    hash,
                }),
                Some(cipher),
            )
        }
        (None, None) => (None, None),
    };
    let size = chain.leaf().virtual_size();
    let mut out = create_with(opener, dst, &CreateOptions::dynamic(size), None)?;
    if let Some(keyhash) = keyhash {
        out.set_keyhash(keyhash)?;
    }
    let spb = out.sectors_per_block();
    let blocks = out.block_count();
    let total = chain.total_sectors();
    let mut buf = vec![0u8; usize::try_from(spb * SECTOR).unwrap_or(0)];
    let mut written = 0;
    let present = |block: u64| -> Result<bool> {
        for img in chain.images() {
            if !img.disk_type().is_sparse() || img.bat().is_allocated(block) {
                return Ok(true);
            }
        }
        Ok(chain.raw_parent().is_some())
    };
    for block in 0..blocks {
        report(&mut progress, block, blocks);
        if !present(block)? {
            continue;
        }
        let start = block * spb;
        let n = spb.min(total - start);
        let len = usize::try_from(n * SECTOR).unwrap_or(0);
        chain.read(start, &mut buf[..len])?;
        if buf[..len].iter().all(|&b| b == 0) {
            continue;
        }
        if let Some(cipher) = &cipher {
            cipher.encrypt_sectors(start, &mut buf[..len]);
        }
        out.write_sectors(start, &buf[..len])?;
        written += n;
    }
    buf.fill(0);
    out.sync()?;
    report(&mut progress, blocks, blocks);
    Ok(written)
}

/// The parent a new snapshot should link to: starting at `parent`, empty
/// differencing disks (no allocated block) are skipped.
pub fn snapshot_target(parent: &Path) -> Result<PathBuf> {
    find_snapshot_target(parent).map(|(p, _)| p)
}

/// Like [`snapshot_target`], also saying whether the target is the raw
/// parent of an empty differencing disk (the snapshot then gets a raw
/// parent).
pub fn find_snapshot_target(parent: &Path) -> Result<(PathBuf, bool)> {
    let mut cur = parent.to_path_buf();
    for _ in 0..crate::chain::MAX_CHAIN_DEPTH {
        let img = open_image(&StdOpener, &cur, OpenOptions::read_only())?;
        if !img.has_parent() || img.bat().allocated_count() > 0 {
            return Ok((cur, false));
        }
        let next = resolve_parent(&img, &cur)?;
        if img.parent_is_raw() {
            return Ok((next, true));
        }
        cur = next;
    }
    Err(VhdError::ParentLoop(format!(
        "the chain of {} is deeper than {} images",
        parent.display(),
        crate::chain::MAX_CHAIN_DEPTH
    )))
}
