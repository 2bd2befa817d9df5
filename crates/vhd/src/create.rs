//! Creating images the way tapdisk lays them out: fixed disks (data then
//! footer) and dynamic/differencing disks with creator "tap" 1.3, a footer
//! copy at 0, the header at 512, the BAT at 1536, the batmap right after
//! the BAT, parent locators after the batmap and the footer after that.

use std::path::{Component, Path, PathBuf};

use crate::bat::Bat;
use crate::batmap::{batmap_checksum, BatmapHeader, KeyHash};
use crate::bytes::round_up;
use crate::error::{Result, VhdError};
use crate::footer::{unix_to_vhd_time, vhd_now, DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, DEFAULT_BLOCK_SIZE};
use crate::image::{OpenOptions, SparseLayout, VhdImage, MAX_PHYSICAL_BYTES, SECTOR};
use crate::io::{BlockFile, Opener, StdOpener};
use crate::locator::{encode_payload, ParentLocator, PlatformCode};

/// Parameters of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (multiple of 512).
    pub size: u64,
    /// Fixed or dynamic.
    pub disk_type: DiskType,
    /// Size the BAT and batmap for this virtual size (≥ `size`), so that a
    /// later fast resize can grow up to it (`-S`).
    pub max_size: Option<u64>,
    /// Block size (2 MiB by default).
    pub block_size: u32,
    /// UUID (random if `None`).
    pub uuid: Option<[u8; 16]>,
    /// Creation time in VHD seconds (now if `None`).
    pub timestamp: Option<u32>,
}

impl CreateOptions {
    /// A dynamic disk of `size` bytes.
    pub fn dynamic(size: u64) -> Self {
        Self {
            size,
            disk_type: DiskType::Dynamic,
            max_size: None,
            block_size: DEFAULT_BLOCK_SIZE,
            uuid: None,
            timestamp: None,
        }
    }

    /// A fixed disk of `size` bytes.
    pub fn fixed(size: u64) -> Self {
        Self {
            disk_type: DiskType::Fixed,
            ..Self::dynamic(size)
        }
    }
}

/// Parent description for a differencing disk.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    /// Parent UUID (all zero for a raw parent).
    pub uuid: [u8; 16],
    /// Parent modification time (VHD seconds).
    pub timestamp: u32,
    /// File name of the parent (stored UTF-16 in the header).
    pub name: String,
    /// Locator paths: `(code, path as recorded)`.
    pub locators: Vec<(PlatformCode, String)>,
    /// Keyhash to copy into the child's batmap.
    pub keyhash: Option<KeyHash>,
}

/// A random UUID (version 4) from the system's random source.
pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut u))
        .is_ok();
    if !ok {
        // Fall back to time and address entropy; uniqueness, not secrecy.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        u.copy_from_slice(&t.to_le_bytes());
        u[0] ^= std::process::id().to_le_bytes()[0];
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Formats a UUID in the usual 8-4-4-4-12 form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

fn validate(opts: &CreateOptions) -> Result<()> {
    if opts.size == 0 || opts.size % SECTOR != 0 {
        return Err(VhdError::InvalidArgument(format!(
            "size {} is not a positive multiple of 512",
            opts.size
        )));
    }
    if !opts.block_size.is_power_of_two() || opts.block_size < 4096 {
        return Err(VhdError::InvalidArgument(format!(
            "block size {} is not a power of two ≥ 4096",
            opts.block_size
        )));
    }
    if opts.max_size.is_some_and(|m| m < opts.size) {
        return Err(VhdError::InvalidArgument(
            "maximum size is smaller than the size".into(),
        ));
    }
    Ok(())
}

/// Creates an image in `file` and opens it read-write. `file` is either
/// empty (a new file, which grows to the image's size) or pre-sized (a
/// block device such as an LVM volume): then the image is written in place
/// and its primary footer goes in the last sector, as the C tools lay out
/// VHDs on volumes.
pub fn create<F: BlockFile>(
    file: F,
    name: &str,
    opts: &CreateOptions,
    parent: Option<&ParentSpec>,
) -> Result<VhdImage<F>> {
    validate(opts)?;
    let uuid = opts.uuid.unwrap_or_else(random_uuid);
    let timestamp = opts.timestamp.unwrap_or_else(vhd_now);
    let disk_type = if parent.is_some() {
        DiskType::Differencing
    } else {
        opts.disk_type
    };
    let mut footer = Footer::new(disk_type, opts.size, uuid, timestamp);
    let w = |f: &F, off: u64, b: &[u8]| {
        f.write_at(b, off)
            .map_err(|e| VhdError::io(format!("{name}: write at offset {off}"), e))
    };
    let presized = file
        .len()
        .map_err(|e| VhdError::io(format!("{name}: size"), e))?
        / SECTOR
        * SECTOR;
    // Where the primary footer goes when the image needs `end` bytes before it.
    let footer_at = |end: u64| -> Result<u64> {
        if presized == 0 {
            return Ok(end);
        }
        if end + FOOTER_SIZE as u64 > presized {
            return Err(VhdError::NoSpace(format!(
                "{name}: {presized} bytes cannot hold {end} bytes of image and a footer"
            )));
        }
        Ok(presized - FOOTER_SIZE as u64)
    };
    if disk_type == DiskType::Fixed {
        let at = footer_at(opts.size)?;
        if presized == 0 {
            file.set_len(opts.size)
                .map_err(|e| VhdError::io(format!("{name}: extend to {}", opts.size), e))?;
        } else {
            // A volume holds someone's old data: the disk must read as zeros.
            zero_range(&file, name, opts.size)?;
        }
        w(&file, at, &footer.to_bytes_checked())?;
        return VhdImage::open(file, name, OpenOptions::read_write());
    }
    let block = u64::from(opts.block_size);
    let max = opts.max_size.unwrap_or(opts.size);
    let entries = u32::try_from(max.div_ceil(block))
        .ok()
        .filter(|&e| e < u32::MAX)
        .ok_or_else(|| VhdError::TooLarge {
            what: format!("{name}: BAT for virtual size {max}"),
            bytes: max,
        })?;
    let layout = SparseLayout::new(entries);
    // Worst case physical size when every block of the virtual size is
    // allocated. A preallocation for a larger size (`max_size`, `-S`) only
    // sizes the BAT: a fast resize checks the limit again when it grows.
    let bm = crate::bitmap::bitmap_bytes(block / SECTOR);
    let per_block = round_up(bm + block, crate::image::DATA_ALIGNMENT);
    let full = layout.end + 65536 + opts.size.div_ceil(block) * per_block + 512;
    if full > MAX_PHYSICAL_BYTES {
        return Err(VhdError::TooLarge {
            what: format!(
                "{name}: a fully allocated {}-byte dynamic disk needs {full} physical bytes",
                opts.size
            ),
            bytes: full,
        });
    }
    let mut header = DynamicHeader::new(layout.table_offset, entries, opts.block_size);
    let mut end = layout.end;
    let mut payloads: Vec<(u64, Vec<u8>)> = Vec::new();
    if let Some(p) = parent {
        header.parent_uuid = p.uuid;
        header.parent_timestamp = p.timestamp;
        header.set_parent_name(&p.name)?;
        if p.locators.len() > header.locators.len() {
            return Err(VhdError::InvalidArgument("too many parent locators".into()));
        }
        for (slot, (code, path)) in p.locators.iter().enumerate() {
            let data = encode_payload(*code, path).ok_or_else(|| {
                VhdError::InvalidArgument(format!("cannot encode a {code:?} locator"))
            })?;
            let space = round_up(data.len() as u64, SECTOR).max(SECTOR);
            header.locators[slot] = ParentLocator {
                code: code.code(),
                data_space: u32::try_from(space / SECTOR).unwrap_or(u32::MAX),
                data_len: u32::try_from(data.len())
                    .map_err(|_| VhdError::InvalidArgument("parent path too long".into()))?,
                reserved: 0,
                data_offset: end,
            };
            payloads.push((end, data));
            end += space;
        }
    }
    header.update_checksum();
    let footer_bytes = footer.to_bytes_checked();
    w(&file, 0, &footer_bytes)?;
    w(&file, footer.data_offset, &header.to_bytes())?;
    w(
        &file,
        layout.table_offset,
        &Bat::unallocated(entries as usize).to_bytes(),
    )?;
    let mut bh = BatmapHeader::new(layout.batmap_offset, layout.batmap_sectors);
    if let Some(k) = parent.and_then(|p| p.keyhash) {
        bh.keyhash = k;
    }
    let map = vec![0u8; usize::try_from(layout.batmap_sectors).unwrap_or(1) * 512];
    bh.checksum = batmap_checksum(&map, bh.batmap_version);
    w(&file, layout.batmap_header_offset, &bh.to_bytes())?;
    w(&file, layout.batmap_offset, &map)?;
    for (off, data) in &payloads {
        let mut padded = data.clone();
        padded.resize(
            usize::try_from(round_up(data.len() as u64, SECTOR).max(SECTOR)).unwrap_or(512),
            0,
        );
        w(&file, *off, &padded)?;
    }
    w(&file, footer_at(end)?, &footer_bytes)?;
    file.sync()
        .map_err(|e| VhdError::io(format!("{name}: sync"), e))?;
    VhdImage::open(file, name, OpenOptions::read_write())
}

/// Writes zeros over `[0, len)` of `file`.
fn zero_range<F: BlockFile>(file: &F, name: &str, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; usize::try_from(CHUNK).unwrap_or(4096)];
    let mut at = 0;
    while at < len {
        let n = usize::try_from((len - at).min(CHUNK)).unwrap_or(zeros.len());
        file.write_at(&zeros[..n], at)
            .map_err(|e| VhdError::io(format!("{name}: zero at offset {at}"), e))?;
        at += n as u64;
    }
    Ok(())
}

/// Creates a new image file at `path` (fails if it exists), or writes one
/// onto the block device `path` names.
pub fn create_file(path: &Path, opts: &CreateOptions) -> Result<VhdImage<std::fs::File>> {
    create_with(&StdOpener, path, opts, None)
}

/// Creates a new image through an [`Opener`], removing it on failure. A
/// block device (e.g. an LVM volume made for the image) is written in
/// place, with the primary footer in its last sector; an existing regular
/// file is refused with `EEXIST`.
pub fn create_with<O: Opener>(
    opener: &O,
    path: &Path,
    opts: &CreateOptions,
    parent: Option<&ParentSpec>,
) -> Result<VhdImage<O::File>> {
    let name = path.display().to_string();
    if crate::io::is_block_device(path) {
        let file = opener
            .open(path, true)
            .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
        return create(file, &name, opts, parent);
    }
    let file = opener.create(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            VhdError::Exists(name.clone())
        } else {
            VhdError::io(format!("{name}: create"), e)
        }
    })?;
    let r = create(file, &name, opts, parent);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Options of [`snapshot`].
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// The parent is a raw file (null parent UUID).
    pub parent_raw: bool,
    /// Size BAT/batmap for this virtual size (`-S`).
    pub max_size: Option<u64>,
    /// Record only absolute locators (default: relative MACX and W2RU plus
    /// absolute W2KU, as tapdisk does).
    pub absolute_locators: bool,
    /// Fail with `NoSpace` if the new chain would be deeper than this.
    pub depth_limit: Option<u32>,
    /// UUID (random if `None`).
    pub uuid: Option<[u8; 16]>,
    /// Virtual size of the child (the parent's if `None`). `vhd-util
    /// snapshot` sets it to the size of the parent it was given when empty
    /// parents were skipped and the chain's sizes differ.
    pub virtual_size: Option<u64>,
}

/// Canonical absolute form of `p` (the file must exist), as the C tools'
/// `canonpath` makes it: an LVM volume `/dev/VG/LV` becomes its stable
/// device-mapper name `/dev/mapper/VG-LV` (dashes inside either name
/// doubled) when that node exists, a `/dev/mapper/NAME` path stays as it
/// is, and anything else is the real path (symbolic links resolved). So
/// parent locators never record a `/dev/dm-N` node, whose number changes
/// each time a volume is activated.
pub fn canonical(p: &Path) -> Result<PathBuf> {
    let resolve_err = |e| VhdError::io(format!("{}: resolve path", p.display()), e);
    let lexical = crate::chain::normalize(&std::path::absolute(p).map_err(resolve_err)?);
    if let Some(mapper) = device_mapper_path(&lexical).filter(|m| m.exists()) {
        return Ok(mapper);
    }
    std::fs::canonicalize(p).map_err(resolve_err)
}

/// The device-mapper node of `/dev/mapper/NAME` or an LVM path `/dev/VG/LV`
/// (absolute and normalized), whether or not it exists.
pub fn device_mapper_path(p: &Path) -> Option<PathBuf> {
    let rest = p.strip_prefix("/dev").ok()?;
    let parts: Vec<&str> = rest.iter().map(|c| c.to_str()).collect::<Option<_>>()?;
    match parts.as_slice() {
        ["mapper", _] => Some(p.to_path_buf()),
        [vg, lv] => Some(PathBuf::from(format!(
            "/dev/mapper/{}-{}",
            vg.replace('-', "--"),
            lv.replace('-', "--")
        ))),
        _ => None,
    }
}

/// Absolute form of a path whose file may not exist yet (its directory must).
pub fn absolute_new(p: &Path) -> Result<PathBuf> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => canonical(d)?,
        _ => canonical(Path::new("."))?,
    };
    let file = p
        .file_name()
        .ok_or_else(|| VhdError::InvalidArgument(format!("{} has no file name", p.display())))?;
    Ok(dir.join(file))
}

/// The path of `target` relative to directory `from_dir` (both absolute),
/// always starting with `./` or `../`.
pub fn relative_path(from_dir: &Path, target: &Path) -> String {
    let a: Vec<Component<'_>> = from_dir.components().collect();
    let b: Vec<Component<'_>> = target.components().collect();
    let common = a.iter().zip(b.iter()).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    let joined = parts.join("/");
    if joined.starts_with("..") {
        joined
    } else {
        format!("./{joined}")
    }
}

fn mtime_vhd(p: &Path) -> u32 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| unix_to_vhd_time(d.as_secs()))
}

/// Builds the parent description for a child at `child` over `parent`.
pub fn parent_spec(
    child: &Path,
    parent: &Path,
    parent_uuid: [u8; 16],
    keyhash: Option<KeyHash>,
    absolute_only: bool,
) -> Result<ParentSpec> {
    let parent_abs = canonical(parent)?;
    let child_abs = if child.exists() {
        canonical(child)?
    } else {
        absolute_new(child)?
    };
    let child_dir = child_abs.parent().unwrap_or(Path::new("/"));
    let rel = relative_path(child_dir, &parent_abs);
    let abs = parent_abs.to_string_lossy().into_owned();
    let name = parent_abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let locators = if absolute_only {
        vec![(PlatformCode::Macx, abs.clone()), (PlatformCode::W2ku, abs)]
    } else {
        vec![
            (PlatformCode::Macx, rel.clone()),
            (PlatformCode::W2ku, abs),
            (PlatformCode::W2ru, rel),
        ]
    };
    Ok(ParentSpec {
        uuid: parent_uuid,
        timestamp: mtime_vhd(&parent_abs),
        name,
        locators,
        keyhash,
    })
}

/// Creates differencing disk `child` over `parent` (a VHD, or a raw file
/// with `parent_raw`). Virtual size and block size follow the parent.
pub fn snapshot(
    child: &Path,
    parent: &Path,
    opts: &SnapshotOptions,
) -> Result<VhdImage<std::fs::File>> {
    snapshot_with(&StdOpener, child, parent, opts)
}

/// [`snapshot`] through an [`Opener`].
pub fn snapshot_with<O: Opener>(
    opener: &O,
    child: &Path,
    parent: &Path,
    opts: &SnapshotOptions,
) -> Result<VhdImage<O::File>> {
    let (size, uuid, block_size, keyhash) = if opts.parent_raw {
        let f = StdOpener
            .open(parent, false)
            .map_err(|e| VhdError::io(format!("{}: open raw parent", parent.display()), e))?;
        let len = f
            .len()
            .map_err(|e| VhdError::io(format!("{}: size", parent.display()), e))?;
        (round_up(len, SECTOR), [0u8; 16], DEFAULT_BLOCK_SIZE, None)
    } else {
        if let Some(limit) = opts.depth_limit.filter(|&l| l > 0) {
            let depth = crate::chain::chain_depth(parent)?;
            if depth + 1 > limit {
                return Err(VhdError::NoSpace(format!(
                    "snapshot depth exceeded: current depth: {depth}, limit: {limit}"
                )));
            }
        }
        let f = StdOpener
            .open(parent, false)
            .map_err(|e| VhdError::io(format!("{}: open parent", parent.display()), e))?;
        let p = VhdImage::open(f, &parent.display().to_string(), OpenOptions::read_only())?;
        let bs = p.header().map_or(DEFAULT_BLOCK_SIZE, |h| h.block_size);
        (p.virtual_size(), p.footer().uuid, bs, p.keyhash())
    };
    let spec = parent_spec(child, parent, uuid, keyhash, opts.absolute_locators)?;
    let size = opts.virtual_size.unwrap_or(size);
    let copts = CreateOptions {
        size,
        disk_type: DiskType::Differencing,
        max_size: opts.max_size.map(|m| m.max(size)),
        block_size,
        uuid: opts.uuid,
        timestamp: None,
    };
    create_with(opener, child, &copts, Some(&spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFile;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            "./p.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            "../c/p.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/p.vhd")),
            "../../p.vhd"
        );
    }

    #[test]
    fn uuid_format() {
        let u = random_uuid();
        assert_eq!(u[6] >> 4, 4);
        let s = format_uuid(&[0x12; 16]);
        assert_eq!(s, "12121212-1212-1212-1212-121212121212");
    }

    #[test]
    fn dynamic_layout_bytes() {
        let mut o = CreateOptions::dynamic(100 << 20);
        o.uuid = Some([7; 16]);
        o.timestamp = Some(1);
        let img = create(MemFile::default(), "m", &o, None).unwrap();
        let f = img.file().contents();
        // footer copy, header, BAT, batmap header, batmap (1 sector), footer
        assert_eq!(f.len(), 512 + 1024 + 512 + 512 + 512 + 512);
        assert_eq!(&f[..8], b"conectix");
        assert_eq!(&f[512..520], b"cxsparse");
        assert_eq!(&f[1536..1540], &[0xff; 4]);
        assert_eq!(&f[2048..2056], b"tdbatmap");
        assert_eq!(&f[f.len() - 512..], &f[..512]);
        assert_eq!(&f[28..32], b"tap\0");
        assert_eq!(&f[32..36], &[0, 1, 0, 3]);
        assert_eq!(img.header().unwrap().max_table_entries, 50);
        assert!(img.batmap().is_some());
    }

    #[test]
    fn fixed_layout() {
        let img = create(
            MemFile::default(),
            "m",
            &CreateOptions::fixed(1 << 20),
            None,
        )
        .unwrap();
        let f = img.file().contents();
        assert_eq!(f.len(), (1 << 20) + 512);
        assert_eq!(&f[1 << 20..(1 << 20) + 8], b"conectix");
    }

    #[test]
    fn presized_targets_get_the_footer_in_their_last_sector() {
        // A 64 MiB dynamic disk with its BAT sized for 2 TiB, on a "volume"
        // of 12 MiB + 100 bytes holding old data.
        let dev = MemFile::new(vec![0xa5; (12 << 20) + 100]);
        let mut o = CreateOptions::dynamic(64 << 20);
        o.max_size = Some(2 << 40);
        let img = create(dev.clone(), "lv", &o, None).unwrap();
        assert_eq!(img.footer_offset(), (12 << 20) - 512);
        assert_eq!(img.header().unwrap().max_table_entries, 1 << 20);
        let f = dev.contents();
        assert_eq!(f.len(), (12 << 20) + 100);
        assert_eq!(&f[(12 << 20) - 512..(12 << 20) - 504], b"conectix");
        assert_eq!(&f[..512], &f[(12 << 20) - 512..12 << 20]);
        // Too small for the metadata and a footer: ENOSPC.
        let e = create(MemFile::new(vec![0; 8192]), "tiny", &o, None).unwrap_err();
        assert_eq!(e.errno(), 28, "{e}");
        // A fixed disk on a volume: its data reads as zeros.
        let dev = MemFile::new(vec![0xa5; 3 << 20]);
        let img = create(dev.clone(), "lv", &CreateOptions::fixed(2 << 20), None).unwrap();
        assert_eq!(img.footer_offset(), (3 << 20) - 512);
        assert!(dev.contents()[..2 << 20].iter().all(|&b| b == 0));
    }

    #[test]
    fn writable_open_falls_back_to_the_backup_footer() {
        // As after LVHD grows a volume and zeroes its last sector.
        let dev = MemFile::new(vec![0; 8 << 20]);
        create(dev.clone(), "lv", &CreateOptions::dynamic(16 << 20), None).unwrap();
        let grown = MemFile::new([dev.contents(), vec![0; 4 << 20]].concat());
        let mut img = VhdImage::open(grown.clone(), "lv", OpenOptions::read_write()).unwrap();
        assert!(img.used_backup_footer());
        assert_eq!(img.footer_offset(), (12 << 20) - 512);
        img.relocate_footer((12 << 20) - 512).unwrap();
        let img = VhdImage::open(grown, "lv", OpenOptions::read_write()).unwrap();
        assert!(!img.used_backup_footer());
    }

    #[test]
    fn volume_paths_map_to_device_mapper_names() {
        let m = |p: &str| device_mapper_path(Path::new(p)).map(|p| p.display().to_string());
        assert_eq!(
            m("/dev/VG_XenStorage-1-2/VHD-ab-cd").as_deref(),
            Some("/dev/mapper/VG_XenStorage--1--2-VHD--ab--cd")
        );
        assert_eq!(m("/dev/mapper/vg-lv").as_deref(), Some("/dev/mapper/vg-lv"));
        assert_eq!(m("/dev/loop0"), None);
        assert_eq!(m("/dev/disk/by-id/x"), None);
        assert_eq!(m("/srv/vg/lv"), None);
        // Without such a node, the real path.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.vhd"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("a.vhd"), d.path().join("l")).unwrap();
        assert_eq!(
            canonical(&d.path().join("l")).unwrap(),
            std::fs::canonicalize(d.path().join("a.vhd")).unwrap()
        );
    }

    #[test]
    fn two_tib_limit() {
        let e = create(
            MemFile::default(),
            "m",
            &CreateOptions::dynamic(2048 << 30),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, VhdError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("2 TiB"));
        assert!(create(
            MemFile::default(),
            "m",
            &CreateOptions::dynamic(2040 << 30),
            None
        )
        .is_ok());
        // Preallocating the BAT for 2 TiB (what LVHD always asks for) sizes
        // metadata only: allowed.
        let mut o = CreateOptions::dynamic(64 << 20);
        o.max_size = Some(2 << 40);
        let img = create(MemFile::default(), "m", &o, None).unwrap();
        assert_eq!(img.header().unwrap().max_table_entries, 1 << 20);
    }
}
