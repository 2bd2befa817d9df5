//! Chains of images: a leaf, its differencing ancestors and optionally a
//! raw parent at the bottom. Parents are found through the parent locators
//! (relative paths resolve against the child's directory) and verified by
//! UUID. Reads fall through to the parent for sectors a level does not
//! hold; writes and discards go to the leaf.

use std::path::{Path, PathBuf};

use crate::error::{Result, VhdError};
use crate::image::{Extent, OpenOptions, VhdImage, SECTOR};
use crate::io::{BlockFile, Opener, StdOpener};
use crate::locator::PlatformCode;

/// Longest chain followed before assuming a loop.
pub const MAX_CHAIN_DEPTH: usize = 1024;

/// Candidate parent paths recorded in `child`'s locators, most preferred
/// first (MACX, W2RU, W2KU, then legacy), resolved against `child_dir`.
pub fn parent_candidates<F: BlockFile>(child: &VhdImage<F>, child_dir: &Path) -> Vec<PathBuf> {
    let rank = |c: Option<PlatformCode>| match c {
        Some(PlatformCode::Macx) => 0,
        Some(PlatformCode::W2ru) => 1,
        Some(PlatformCode::W2ku) => 2,
        Some(PlatformCode::Wi2r) => 3,
        Some(PlatformCode::Wi2k) => 4,
        _ => 5,
    };
    let mut locs = child.parent_locator_paths();
    locs.sort_by_key(|(slot, l, _)| (rank(l.platform()), *slot));
    locs.into_iter()
        .filter_map(|(_, _, p)| p.ok())
        .map(|p| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                normalize(&child_dir.join(p))
            }
        })
        .collect()
}

/// Removes `.` components and folds `dir/..` lexically.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The directory of `path` ("." when it has none).
pub fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The directory relative parent locators are resolved against: that of
/// the child's canonical path, as the C tools do (so an LVM volume named
/// `/dev/VG/LV` resolves `./VG-PARENT` in `/dev/mapper`, where the locators
/// of volumes point); the directory of `child_path` as given when it does
/// not resolve.
pub fn locator_base_dir(child_path: &Path) -> PathBuf {
    crate::create::canonical(child_path).map_or_else(|_| dir_of(child_path), |c| dir_of(&c))
}

/// Resolves the parent path of differencing image `child` at `child_path`:
/// the first locator whose file exists.
pub fn resolve_parent<F: BlockFile>(child: &VhdImage<F>, child_path: &Path) -> Result<PathBuf> {
    let cands = parent_candidates(child, &locator_base_dir(child_path));
    if cands.is_empty() {
        return Err(VhdError::ParentNotFound {
            child: child.name().to_string(),
            reason: "no usable parent locator".into(),
        });
    }
    cands
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| VhdError::ParentNotFound {
            child: child.name().to_string(),
            reason: format!("none of {cands:?} exists"),
        })
}

/// What makes two paths the same image: device and inode of the file they name (after
/// symlinks), or for a block device its device number, which every node of one disk shares
/// (`/dev/VG/LV` and `/dev/mapper/VG-LV`). `None` when the path cannot be looked at.
pub fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() {
        Some((u64::MAX, meta.rdev()))
    } else {
        Some((meta.dev(), meta.ino()))
    }
}

/// Refuses to make `new_parent` the parent of `image` (whose footer UUID is `image_uuid`)
/// when that would close a loop: `new_parent` is the image itself or one of its
/// descendants, i.e. walking up from `new_parent` reaches the image, recognised by file
/// identity ([`file_identity`]) or by UUID. The walk stops where a parent cannot be found
/// or opened (no loop can pass there) and gives up past [`MAX_CHAIN_DEPTH`] levels, which
/// means the new parent's own chain loops already.
pub fn refuse_parent_loop(image: &Path, image_uuid: [u8; 16], new_parent: &Path) -> Result<()> {
    let image_id = file_identity(image);
    let mut cur = new_parent.to_path_buf();
    for _ in 0..MAX_CHAIN_DEPTH {
        let same_file = image_id.is_some() && file_identity(&cur) == image_id;
        let name = cur.display().to_string();
        let opened = StdOpener
            .open(&cur, false)
            .map_err(|e| VhdError::io(format!("{name}: open"), e))
            .and_then(|f| VhdImage::open(f, &name, OpenOptions::read_only()));
        let same_uuid = opened
            .as_ref()
            .is_ok_and(|img| img.footer().uuid == image_uuid);
        if same_file || same_uuid {
            let how = if same_file { "is" } else { "has the UUID of" };
            return Err(VhdError::ParentLoop(format!(
                "{} cannot have parent {}: {name} {how} {} or one of its descendants",
                image.display(),
                new_parent.display(),
                image.display()
            )));
        }
        let Ok(img) = opened else { return Ok(()) };
        if !img.has_parent() || img.parent_is_raw() {
            return Ok(());
        }
        match resolve_parent(&img, &cur) {
            Ok(next) => cur = next,
            Err(_) => return Ok(()),
        }
    }
    Err(VhdError::ParentLoop(format!(
        "the chain of {} is deeper than {MAX_CHAIN_DEPTH} images",
        new_parent.display()
    )))
}

/// A raw file at the bottom of a chain.
#[derive(Debug)]
pub struct RawParent<F> {
    /// The file.
    pub file: F,
    /// Its path or name.
    pub name: String,
}

/// An open chain, leaf first.
#[derive(Debug)]
pub struct Chain<F: BlockFile> {
    images: Vec<VhdImage<F>>,
    paths: Vec<PathBuf>,
    raw: Option<RawParent<F>>,
    raw_path: Option<PathBuf>,
}

impl Chain<std::fs::File> {
    /// Opens the chain at `path` with std files.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        Self::open_with(&StdOpener, path, writable)
    }
}

impl<F: BlockFile> Chain<F> {
    /// Builds a chain from opened parts (leaf first).
    pub fn from_parts(images: Vec<VhdImage<F>>, raw: Option<RawParent<F>>) -> Self {
        let paths = images.iter().map(|i| PathBuf::from(i.name())).collect();
        let raw_path = raw.as_ref().map(|r| PathBuf::from(&r.name));
        Self {
            images,
            paths,
            raw,
            raw_path,
        }
    }

    /// Opens the chain at `path`; only the leaf is writable.
    pub fn open_with<O: Opener<File = F>>(opener: &O, path: &Path, writable: bool) -> Result<Self> {
        let opts = OpenOptions {
            writable,
            ..OpenOptions::default()
        };
        Self::open_levels(opener, path, opts)
    }

    /// Opens every level with `opts` (only the leaf writable).
    fn open_levels<O: Opener<File = F>>(
        opener: &O,
        path: &Path,
        mut opts: OpenOptions,
    ) -> Result<Self> {
        let mut images = Vec::new();
        let mut paths = Vec::new();
        let mut raw = None;
        let mut raw_path = None;
        let mut cur = path.to_path_buf();
        loop {
            if images.len() >= MAX_CHAIN_DEPTH {
                return Err(VhdError::ParentLoop(format!(
                    "{}: chain deeper than {MAX_CHAIN_DEPTH} images",
                    path.display()
                )));
            }
            let name = cur.display().to_string();
            let f = opener
                .open(&cur, opts.writable)
                .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
            let img = VhdImage::open(f, &name, opts)?;
            opts.writable = false;
            let next = if img.has_parent() {
                Some(resolve_parent(&img, &cur)?)
            } else {
                None
            };
            let is_raw = img.parent_is_raw();
            let expected_uuid = img.header().map(|h| h.parent_uuid);
            images.push(img);
            paths.push(cur.clone());
            let Some(next) = next else { break };
            if is_raw {
                let name = next.display().to_string();
                let f = opener
                    .open(&next, false)
                    .map_err(|e| VhdError::io(format!("{name}: open raw parent"), e))?;
                raw = Some(RawParent { file: f, name });
                raw_path = Some(next);
                break;
            }
            // Verify the parent's identity before descending.
            let name = next.display().to_string();
            let f = opener
                .open(&next, false)
                .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
            let p = VhdImage::open(f, &name, opts)?;
            if Some(p.footer().uuid) != expected_uuid {
                return Err(VhdError::ParentUuidMismatch {
                    child: cur.display().to_string(),
                    parent: next,
                });
            }
            cur = next;
        }
        Ok(Self {
            images,
            paths,
            raw,
            raw_path,
        })
    }

    /// The leaf image.
    pub fn leaf(&self) -> &VhdImage<F> {
        &self.images[0]
    }
    /// The leaf image, mutable.
    pub fn leaf_mut(&mut self) -> &mut VhdImage<F> {
        &mut self.images[0]
    }
    /// All VHD images, leaf first.
    pub fn images(&self) -> &[VhdImage<F>] {
        &self.images
    }
    /// Mutable access to the images.
    pub fn images_mut(&mut self) -> &mut [VhdImage<F>] {
        &mut self.images
    }
    /// Paths of the images, leaf first.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
    /// The raw parent, if any.
    pub fn raw_parent(&self) -> Option<&RawParent<F>> {
        self.raw.as_ref()
    }
    /// Path of the raw parent.
    pub fn raw_path(&self) -> Option<&Path> {
        self.raw_path.as_deref()
    }
    /// Number of VHD images in the chain (the C tool's "chain depth").
    pub fn depth(&self) -> usize {
        self.images.len()
    }
    /// Takes the chain apart.
    pub fn into_parts(self) -> (Vec<VhdImage<F>>, Option<RawParent<F>>) {
        (self.images, self.raw)
    }
    /// Virtual size in sectors (the leaf's).
    pub fn total_sectors(&self) -> u64 {
        self.leaf().total_sectors()
    }

    /// Reads `buf.len() / 512` sectors at `sector` through the chain.
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let count = buf.len() as u64 / SECTOR;
        let total = self.total_sectors();
        if sector.checked_add(count).is_none_or(|e| e > total) {
            return Err(VhdError::OutOfRange {
                sector,
                end: sector.saturating_add(count),
                total,
            });
        }
        self.read_level(0, sector, buf)
    }

    fn read_level(&self, level: usize, sector: u64, buf: &mut [u8]) -> Result<()> {
        let count = buf.len() as u64 / SECTOR;
        let Some(img) = self.images.get(level) else {
            return self.read_raw_parent(sector, buf);
        };
        // A parent may be smaller than its child (child grown by resize).
        let avail = img.total_sectors().saturating_sub(sector).min(count);
        let split = usize::try_from(avail * SECTOR).unwrap_or(0);
        buf[split..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        for e in img.map(sector, avail)? {
            let at = usize::try_from((e.sector() - sector) * SECTOR).unwrap_or(0);
            let len = usize::try_from(e.count() * SECTOR).unwrap_or(0);
            let dst = &mut buf[at..at + len];
            match e {
                Extent::Present { file_offset, .. } => {
                    img.file().read_at(dst, file_offset).map_err(|err| {
                        VhdError::io(format!("{}: read data at {file_offset}", img.name()), err)
                    })?
                }
                Extent::Absent { sector: s, .. } => {
                    if img.has_parent() {
                        self.read_level(level + 1, s, dst)?;
                    } else {
                        dst.fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    fn read_raw_parent(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let Some(raw) = &self.raw else {
            buf.fill(0);
            return Ok(());
        };
        let len = raw
            .file
            .len()
            .map_err(|e| VhdError::io(format!("{}: size", raw.name), e))?;
        let off = sector * SECTOR;
        let have = usize::try_from(len.saturating_sub(off).min(buf.len() as u64)).unwrap_or(0);
        if have > 0 {
            raw.file
                .read_at(&mut buf[..have], off)
                .map_err(|e| VhdError::io(format!("{}: read at {off}", raw.name), e))?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    /// Writes sectors into the leaf.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        self.images[0].write_sectors(sector, data)
    }

    /// Discards sectors: afterwards they read as zeros. A leaf without a
    /// parent frees whole blocks and clears the bits of partial ones; a
    /// differencing leaf makes them present zeros so the parent's data stays
    /// hidden ([`VhdImage::zero_sectors`]).
    pub fn discard(&mut self, sector: u64, count: u64) -> Result<()> {
        self.images[0].zero_sectors(sector, count, true)
    }

    /// Flushes the leaf.
    pub fn sync(&self) -> Result<()> {
        self.images[0].sync()
    }
}

/// Chain depth (number of VHDs) starting at `path`, following locators.
/// Metadata only: the images are opened for inspection (see
/// [`OpenOptions::inspect`]).
pub fn chain_depth(path: &Path) -> Result<u32> {
    let opts = OpenOptions {
        inspect: true,
        ..OpenOptions::read_only()
    };
    let chain = Chain::open_levels(&StdOpener, path, opts)?;
    Ok(u32::try_from(chain.depth()).unwrap_or(u32::MAX))
}
