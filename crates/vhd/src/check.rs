//! Consistency checking as `vhd-util check` does it: footers (primary vs
//! backup), header, differencing fields, BAT overlaps and bounds, the
//! tapdisk batmap, and parent locators / parent UUID. The first problem
//! found is reported with the C tool's message text. With
//! [`CheckOptions::check_data`] (`-b`) every allocated block's data is
//! compared with its bitmap; [`allocation_stats`] computes the `-s`
//! statistics of an image or a chain.

use std::path::Path;

use crate::bat::BAT_UNUSED;
use crate::bytes::all_zero;
use crate::chain::locator_base_dir;
use crate::error::FormatError;
use crate::footer::{vhd_now, DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE};
use crate::image::{OpenOptions, VhdImage, SECTOR};
use crate::io::{BlockFile, Opener, StdOpener};
use crate::locator::PlatformCode;

/// Options of [`check`].
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Accept a missing/poisoned primary footer when the backup is good (`-i`).
    pub ignore_primary: bool,
    /// Also read the bitmap of every allocated block (`-b`), not only of
    /// blocks the batmap flags as full.
    pub check_bitmaps: bool,
    /// "Now" in VHD seconds for timestamp checks.
    pub now: u32,
    /// Compare every allocated block's data with its bitmap (`-b`): a
    /// sector holding non-zero data while its bitmap bit is clear is
    /// reported (`sector 0x.. of block 0x.. has data where bitmap is clear`).
    pub check_data: bool,
    /// Do not compare the parent's UUID with the one recorded (`-I`).
    pub ignore_parent_uuid: bool,
    /// Do not reject timestamps in the future (`-t`).
    pub ignore_timestamps: bool,
    /// Skip the BAT overlap check (`-B`).
    pub skip_overlap_check: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            ignore_primary: false,
            check_bitmaps: false,
            now: vhd_now(),
            check_data: false,
            ignore_parent_uuid: false,
            ignore_timestamps: false,
            skip_overlap_check: false,
        }
    }
}

impl CheckOptions {
    /// "Now" as the timestamp checks see it (far future with `-t`).
    fn effective_now(&self) -> u32 {
        if self.ignore_timestamps {
            u32::MAX - 1800
        } else {
            self.now
        }
    }
}

/// The first problem found, as the C tool would print it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CheckFailure {
    /// The message line.
    pub message: String,
    /// errno-style code (22 for corruption).
    pub errno: i32,
}

fn fail<T>(message: impl Into<String>) -> Result<T, CheckFailure> {
    Err(CheckFailure {
        message: message.into(),
        errno: 22,
    })
}

/// Summary of a successful check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSummary {
    /// Disk type.
    pub disk_type: DiskType,
    /// Allocated blocks.
    pub allocated_blocks: u64,
    /// Blocks in the BAT.
    pub total_blocks: u64,
}

/// Maps a parse error of a footer to the C tool's wording.
fn footer_message(e: &FormatError) -> String {
    match e {
        FormatError::Field { field, .. } => match *field {
            "cookie" => "invalid cookie".into(),
            "checksum" => "invalid checksum".into(),
            "type" => "invalid type".into(),
            "data_offset" => "invalid data offset".into(),
            other => format!("invalid {other}"),
        },
        FormatError::Truncated { .. } => "truncated".into(),
    }
}

/// The footer rules of the C check, including its null-UUID rule.
fn validate_footer(f: &Footer, now: u32) -> Result<(), String> {
    f.validate(now).map_err(str::to_string)?;
    if f.uuid == [0; 16] {
        return Err("invalid (NULL) uuid".into());
    }
    Ok(())
}

fn read<F: BlockFile>(f: &F, off: u64, len: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; len];
    f.read_at(&mut b, off).ok().map(|()| b)
}

/// Checks one image. `path` enables parent resolution (locator files must
/// exist and the parent UUID must match); without it only the locator
/// entries and payloads are validated.
pub fn check<F: BlockFile>(
    file: F,
    name: &str,
    path: Option<&Path>,
    opts: &CheckOptions,
) -> Result<CheckSummary, CheckFailure> {
    let len = match file.len() {
        Ok(l) => l,
        Err(e) => return fail(format!("error calculating end of file: {e}")),
    };
    if len % SECTOR != 0 && len % SECTOR != 511 {
        return fail(format!("invalid file size: {len:#x}"));
    }
    if len < FOOTER_SIZE as u64 {
        return fail("error reading primary footer: file too small");
    }
    let eof = len.div_ceil(SECTOR) * SECTOR;
    let primary_off = eof - SECTOR;
    let Some(pbytes) = read(
        &file,
        primary_off.min(len - FOOTER_SIZE as u64),
        FOOTER_SIZE,
    ) else {
        return fail("error reading primary footer");
    };
    let now = opts.effective_now();
    let primary = Footer::parse(&pbytes, primary_off)
        .map_err(|e| footer_message(&e))
        .and_then(|f| validate_footer(&f, now).map(|()| f));
    let mut use_backup = false;
    let footer = match primary {
        Ok(f) => Some(f),
        Err(msg) => {
            if !opts.ignore_primary {
                return fail(format!("primary footer invalid: {msg}"));
            }
            use_backup = true;
            None
        }
    };
    if footer
        .as_ref()
        .is_some_and(|f| f.kind() == Some(DiskType::Fixed))
    {
        let f = footer.as_ref().map_or(0, |f| f.current_size);
        if f > primary_off {
            return fail(format!(
                "fixed disk size {f} exceeds the {primary_off} data bytes in the file"
            ));
        }
        return Ok(CheckSummary {
            disk_type: DiskType::Fixed,
            allocated_blocks: 0,
            total_blocks: 0,
        });
    }
    let Some(bbytes) = read(&file, 0, FOOTER_SIZE) else {
        return fail("error reading backup footer");
    };
    let backup = match Footer::parse(&bbytes, 0)
        .map_err(|e| footer_message(&e))
        .and_then(|f| validate_footer(&f, now).map(|()| f))
    {
        Ok(b) => b,
        Err(msg) => return fail(format!("backup footer invalid: {msg}")),
    };
    let footer = match footer {
        Some(p) => {
            if p != backup {
                let legacy_ok = backup.hidden != 0
                    && backup.created_by_tap()
                    && matches!(backup.creator_version, 0x0000_0001 | 0x0001_0001)
                    && Footer {
                        hidden: 0,
                        checksum: p.checksum,
                        ..backup.clone()
                    } == Footer {
                        hidden: 0,
                        ..p.clone()
                    };
                if !legacy_ok {
                    return fail("primary and backup footers do not match");
                }
            }
            p
        }
        None => backup,
    };
    let kind = footer.kind().unwrap_or(DiskType::Dynamic);
    if kind == DiskType::Fixed {
        return fail("backup footer invalid: invalid type");
    }
    // Header.
    let hoff = footer.data_offset;
    let Some(hbytes) = read(&file, hoff, HEADER_SIZE) else {
        return fail("error reading header");
    };
    let header = match DynamicHeader::parse(&hbytes, hoff) {
        Ok(h) => h,
        Err(FormatError::Field { field, .. }) => {
            let msg = match field {
                "cookie" => "invalid cookie",
                "checksum" => "invalid checksum",
                "block_size" => "invalid block size",
                "table_offset" => "invalid table offset",
                _ => "invalid field",
            };
            return fail(format!("header is invalid: {msg}"));
        }
        Err(FormatError::Truncated { .. }) => return fail("error reading header"),
    };
    if let Err(msg) = header.validate() {
        return fail(format!("header is invalid: {msg}"));
    }
    if header.table_offset + u64::from(header.max_table_entries) * 4 > eof - SECTOR {
        return fail("header is invalid: invalid table offset");
    }
    // Open through the library for the rest.
    let img = match VhdImage::open(
        file,
        name,
        OpenOptions {
            writable: false,
            ignore_disabled: true,
            use_backup_footer: use_backup,
            inspect: true,
        },
    ) {
        Ok(i) => i,
        Err(e) => return fail(format!("error opening {name}: {e}")),
    };
    check_differencing_header(&img, opts)?;
    check_bat(&img, eof, opts, use_backup)?;
    check_batmap(&img, opts)?;
    if img.has_parent() {
        check_parent_locators(&img, path, eof, opts)?;
    }
    Ok(CheckSummary {
        disk_type: img.disk_type(),
        allocated_blocks: img.bat().allocated_count(),
        total_blocks: img.bat().entries.len() as u64,
    })
}

/// Opens `path` and checks it.
pub fn check_path(path: &Path, opts: &CheckOptions) -> Result<CheckSummary, CheckFailure> {
    let name = path.display().to_string();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Err(CheckFailure {
                message: format!("cannot stat {name}: {}", e.raw_os_error().unwrap_or(5)),
                errno: e.raw_os_error().unwrap_or(5),
            })
        }
    };
    {
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return fail(format!("{name} is not a regular file or block device"));
        }
    }
    let f = match StdOpener.open(path, false) {
        Ok(f) => f,
        Err(e) => {
            return Err(CheckFailure {
                message: format!("error opening {name}"),
                errno: e.raw_os_error().unwrap_or(5),
            })
        }
    };
    check(f, &name, Some(path), opts)
}

fn check_differencing_header<F: BlockFile>(
    img: &VhdImage<F>,
    opts: &CheckOptions,
) -> Result<(), CheckFailure> {
    let Some(h) = img.header() else {
        return Ok(());
    };
    let msg = if img.has_parent() {
        if u64::from(h.parent_timestamp) > u64::from(opts.effective_now()) + 1800 {
            Some("parent creation time in future")
        } else if h.parent_name().is_err() {
            Some("invalid parent name")
        } else {
            None
        }
    } else if !all_zero(&h.parent_name) {
        Some("invalid non-null parent name")
    } else if h.locators.iter().any(|l| *l != Default::default()) {
        Some("invalid non-null parent locators")
    } else if !h.parent_uuid_is_null() {
        Some("invalid non-null parent uuid")
    } else if h.parent_timestamp != 0 {
        Some("invalid non-zero parent timestamp")
    } else {
        None
    };
    match msg {
        Some(m) => fail(format!("differencing header is invalid: {m}")),
        None => Ok(()),
    }
}

fn check_bat<F: BlockFile>(
    img: &VhdImage<F>,
    eof: u64,
    opts: &CheckOptions,
    primary_missing: bool,
) -> Result<(), CheckFailure> {
    let Some(h) = img.header() else {
        return Ok(());
    };
    let blocks = img.virtual_size() / u64::from(h.block_size);
    if blocks > u64::from(h.max_table_entries) {
        return fail(format!(
            "VHD size ({blocks} blocks) exceeds BAT size ({})",
            h.max_table_entries
        ));
    }
    let eoh = img.end_of_metadata() / SECTOR;
    let end = (eof - SECTOR) / SECTOR;
    let per = (img.bitmap_bytes() + img.block_size()) / SECTOR;
    let mut used: Vec<(u64, usize)> = Vec::new();
    for (i, &e) in img.bat().entries.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let off = u64::from(e);
        if off < eoh {
            return fail(format!("block {i} (offset {e:#x}) clobbers headers"));
        }
        // With -i, a file whose primary footer was never written may end
        // right after its last block.
        let footerless_tail = primary_missing && opts.ignore_primary && off + per == end + 1;
        if off + per > end && !footerless_tail {
            return fail(format!("block {i} (offset {e:#x}) clobbers footer"));
        }
        used.push((off, i));
    }
    if !opts.skip_overlap_check {
        used.sort_unstable();
        for w in used.windows(2) {
            let (a, ai) = w[0];
            let (b, bi) = w[1];
            if b < a + per {
                let (first, second) = if ai < bi {
                    ((ai, a), (bi, b))
                } else {
                    ((bi, b), (ai, a))
                };
                return fail(format!(
                    "block {} (offset {:#x}) clobbers block {} (offset {:#x})",
                    first.0, first.1, second.0, second.1
                ));
            }
        }
    }
    if opts.check_data {
        let mut data = vec![0u8; usize::try_from(img.block_size()).unwrap_or(0)];
        for (i, &e) in img.bat().entries.iter().enumerate() {
            if e != BAT_UNUSED {
                check_block_data(img, i as u64, u64::from(e) * SECTOR, &mut data)?;
            }
        }
    }
    Ok(())
}

/// `-b`: every sector of an allocated block that holds non-zero data must
/// have its bitmap bit set. All such sectors of the first bad block are
/// reported, one line each.
fn check_block_data<F: BlockFile>(
    img: &VhdImage<F>,
    block: u64,
    bitmap_offset: u64,
    data: &mut [u8],
) -> Result<(), CheckFailure> {
    let bitmap = match img.read_bitmap_at(bitmap_offset) {
        Ok(b) => b,
        Err(_) => return fail(format!("error reading bitmap {block:#x}")),
    };
    if img
        .file()
        .read_at(data, bitmap_offset + img.bitmap_bytes())
        .is_err()
    {
        return fail(format!("error reading data block {block:#x}"));
    }
    let lines: Vec<String> = data
        .chunks(512)
        .enumerate()
        .filter(|(i, sector)| !bitmap.get(*i as u64) && !all_zero(sector))
        .map(|(i, _)| format!("sector {i:#x} of block {block:#x} has data where bitmap is clear"))
        .collect();
    if lines.is_empty() {
        Ok(())
    } else {
        fail(lines.join("\n"))
    }
}

fn check_batmap<F: BlockFile>(img: &VhdImage<F>, opts: &CheckOptions) -> Result<(), CheckFailure> {
    if !img.footer().expects_batmap() {
        return Ok(());
    }
    if let Some(problem) = img.batmap_problem() {
        return fail(format!("batmap is invalid: {problem}"));
    }
    let Some(bm) = img.batmap() else {
        return Ok(());
    };
    let spb = img.sectors_per_block();
    for block in 0..img.bat().entries.len() as u64 {
        let full = bm.is_full(block);
        if !full && !opts.check_bitmaps {
            continue;
        }
        if full && !img.bat().is_allocated(block) {
            return fail(format!("batmap shows unallocated block {block} full"));
        }
        if !img.bat().is_allocated(block) {
            continue;
        }
        let off = u64::from(img.bat().entries[usize::try_from(block).unwrap_or(0)]) * SECTOR;
        let bitmap = match img.read_bitmap_at(off) {
            Ok(b) => b,
            Err(e) => return fail(format!("error reading bitmap of block {block}: {e}")),
        };
        if full && !bitmap.all_set(spb) {
            return fail(format!(
                "batmap shows partially allocated block {block} full"
            ));
        }
    }
    Ok(())
}

fn check_parent_locators<F: BlockFile>(
    img: &VhdImage<F>,
    path: Option<&Path>,
    eof: u64,
    opts: &CheckOptions,
) -> Result<(), CheckFailure> {
    let Some(h) = img.header() else {
        return Ok(());
    };
    let pname = match h.parent_name() {
        Ok(n) => n,
        Err(e) => return fail(format!("error decoding parent name: {e}")),
    };
    let mut seen: Vec<u32> = Vec::new();
    let mut found = 0;
    for (i, loc) in h.locators.iter().enumerate() {
        let Some(code) = loc.platform() else {
            return fail(format!("invalid parent locator {i}: invalid platform code"));
        };
        if code == PlatformCode::None {
            if *loc != Default::default() {
                return fail(format!("invalid parent locator {i}: non-zero locator"));
            }
            continue;
        }
        let msg = if loc.data_offset == 0 {
            Some("invalid data offset")
        } else if loc.data_space == 0 {
            Some("invalid data space")
        } else if loc.data_len == 0 {
            Some("invalid data length")
        } else if loc.data_offset.saturating_add(loc.space_bytes()) > eof - SECTOR
            || u64::from(loc.data_len) > loc.space_bytes()
        {
            Some("invalid size")
        } else if loc.reserved != 0 {
            Some("invalid reserved bits")
        } else {
            None
        };
        if let Some(m) = msg {
            return fail(format!("invalid parent locator {i}: {m}"));
        }
        if seen.contains(&loc.code) {
            return fail(format!(
                "duplicate platform code in locator {i}: {:#x}",
                loc.code
            ));
        }
        seen.push(loc.code);
        if !matches!(
            code,
            PlatformCode::Macx | PlatformCode::W2ru | PlatformCode::W2ku
        ) {
            continue;
        }
        let decoded = img
            .parent_locator_paths()
            .into_iter()
            .find(|(slot, _, _)| *slot == i)
            .map(|(_, _, d)| d);
        let ppath = match decoded {
            Some(Ok(p)) => p,
            Some(Err(e)) => return fail(format!("error reading parent locator {i}: {e}")),
            None => return fail(format!("error reading parent locator {i}: missing")),
        };
        let file = ppath.rsplit('/').next().unwrap_or(&ppath);
        if file != pname {
            return fail(format!(
                "parent locator {i} name ({file}) does not match header name ({pname})"
            ));
        }
        let Some(child_path) = path else {
            found += 1;
            continue;
        };
        let p = std::path::PathBuf::from(&ppath);
        let location = if p.is_absolute() {
            p
        } else {
            crate::chain::normalize(&locator_base_dir(child_path).join(p))
        };
        if !location.exists() {
            if code == PlatformCode::Macx {
                return fail(format!(
                    "parent locator {i} points to missing file {ppath} (resolved to {})",
                    location.display()
                ));
            }
            continue;
        }
        if !img.parent_is_raw() && !opts.ignore_parent_uuid {
            let ok = StdOpener.open(&location, false).ok().and_then(|f| {
                VhdImage::open(f, &location.display().to_string(), OpenOptions::inspect()).ok()
            });
            match ok {
                None => {
                    return fail(format!(
                        "invalid parent {}: error opening parent",
                        location.display()
                    ))
                }
                Some(parent) if parent.footer().uuid != h.parent_uuid => {
                    return fail(format!(
                        "invalid parent {}: invalid parent uuid",
                        location.display()
                    ))
                }
                Some(_) => {}
            }
        }
        found += 1;
    }
    if found == 0 {
        return fail(format!("could not find parent {pname}"));
    }
    Ok(())
}

/// Allocation statistics of one sparse image (`vhd-util check -s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationStats {
    /// The image name (as opened).
    pub name: String,
    /// Sectors the BAT could address (`sectors per block × BAT entries`).
    pub secs_total: u64,
    /// Sectors of allocated blocks within the virtual size.
    pub secs_allocated: u64,
    /// Sectors whose bitmap bit is set.
    pub secs_written: u64,
    /// Written sectors the parent (the previous image) does not hold;
    /// `None` for the first image.
    pub not_in_parent: Option<u64>,
    /// Written sectors no earlier image holds; `None` for the first image.
    pub not_in_ancestors: Option<u64>,
}

impl AllocationStats {
    /// The line `vhd-util check -s` prints: sector counts in hex and
    /// percentages (of allocated, then of written sectors) with two decimals.
    pub fn line(&self) -> String {
        let base = self.name.rsplit('/').next().unwrap_or(&self.name);
        let mut s = format!(
            "{base}: secs allocated: {:#x} secs written: {:#x} ({:.2}%)",
            self.secs_allocated,
            self.secs_written,
            percent(self.secs_written, self.secs_allocated)
        );
        if let (Some(up), Some(uc)) = (self.not_in_parent, self.not_in_ancestors) {
            s.push_str(&format!(
                " secs not in parent: {up:#x} ({:.2}%) secs not in ancestors: {uc:#x} ({:.2}%)",
                percent(up, self.secs_written),
                percent(uc, self.secs_written)
            ));
        }
        s
    }
}

/// `num / den` in percent, computed in single precision like the C tool.
#[allow(clippy::cast_precision_loss)] // a percentage printed with 2 decimals
fn percent(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        f64::from((num as f32 / den as f32) * 100.0)
    }
}

/// Allocation statistics of `images`, ordered from the chain's root towards
/// the leaf (the order `check -s -p` prints them). Fixed images are
/// skipped. For each image after the first, the sectors not present in the
/// image before it and in none of the images before it are counted too.
pub fn allocation_stats<F: BlockFile>(
    images: &[&VhdImage<F>],
) -> crate::error::Result<Vec<AllocationStats>> {
    let sparse: Vec<&VhdImage<F>> = images
        .iter()
        .copied()
        .filter(|i| i.disk_type().is_sparse())
        .collect();
    let mut out: Vec<AllocationStats> = sparse
        .iter()
        .enumerate()
        .map(|(n, img)| AllocationStats {
            name: img.name().to_string(),
            secs_total: img.sectors_per_block()
                * img.header().map_or(0, |h| u64::from(h.max_table_entries)),
            secs_allocated: 0,
            secs_written: 0,
            not_in_parent: (n > 0).then_some(0),
            not_in_ancestors: (n > 0).then_some(0),
        })
        .collect();
    // Walk the disk in chunks of the largest block size; every image's
    // block size (a power of two) divides it.
    let chunk = sparse
        .iter()
        .map(|i| i.sectors_per_block())
        .max()
        .unwrap_or(0);
    let total = sparse.iter().map(|i| i.total_sectors()).max().unwrap_or(0);
    if chunk == 0 {
        return Ok(out);
    }
    let chunk_bytes = usize::try_from(crate::bitmap::bitmap_bytes(chunk)).unwrap_or(512);
    let mut start = 0;
    while start < total {
        // Present sectors of this chunk, per image.
        let mut maps: Vec<crate::bitmap::SectorBitmap> = Vec::with_capacity(sparse.len());
        let mut any = false;
        for (n, img) in sparse.iter().enumerate() {
            let mut m = crate::bitmap::SectorBitmap::zeroed(chunk_bytes);
            let spb = img.sectors_per_block();
            let mut s = start;
            while s < (start + chunk).min(img.total_sectors()) {
                let block = s / spb;
                if let Some(e) = img.bat().get(block).filter(|&e| e != BAT_UNUSED) {
                    out[n].secs_allocated += spb;
                    any = true;
                    let bitmap = img.read_bitmap_at(u64::from(e) * SECTOR)?;
                    for i in 0..spb {
                        if bitmap.get(i) {
                            m.set(s - start + i);
                        }
                    }
                }
                s += spb;
            }
            maps.push(m);
        }
        if !any {
            start += chunk;
            continue;
        }
        let mut union = crate::bitmap::SectorBitmap::zeroed(chunk_bytes);
        for (n, m) in maps.iter().enumerate() {
            for i in 0..chunk {
                if !m.get(i) {
                    continue;
                }
                out[n].secs_written += 1;
                if n > 0 {
                    if !maps[n - 1].get(i) {
                        out[n].not_in_parent = out[n].not_in_parent.map(|v| v + 1);
                    }
                    if !union.get(i) {
                        out[n].not_in_ancestors = out[n].not_in_ancestors.map(|v| v + 1);
                    }
                }
            }
            for i in 0..chunk {
                if m.get(i) {
                    union.set(i);
                }
            }
        }
        start += chunk;
    }
    Ok(out)
}
