//! `vhd-util scan`: one line per image,
//! `vhd=NAME capacity=BYTES size=BYTES hidden=N parent=NAME|none`
//! (`-M` adds `marker=N keyhash=HEX` before `parent=`, the hash empty
//! when there is none, as the C tool prints it), or
//! `vhd=NAME scan-error=-ERRNO error-message='WHAT'`.
//!
//! Targets are the paths the `-m` pattern matches on the file system
//! (sorted unless `-f`), followed by the operands in the order given; `-a`
//! appends each parent not yet scanned (compared by file name). Without
//! `-c` the first failure stops the scan and its errno is the exit status;
//! with `-c` the exit status is 0. `-p` prints the images as a tree sorted
//! by path (children indented by three spaces; hidden roots before the
//! other roots, hidden children after their visible siblings, as the C tool
//! orders them), `-v` prints
//! full paths, `-f` takes parent names from the header instead of
//! resolving locators.
//!
//! `-l VG` scans the logical volumes of a volume group instead: the filter
//! and operands are patterns over the volume names, and each volume is read
//! from its physical volumes ([`crate::lvm`]), active or not. As the C tool
//! does for volumes, only the start of each is read (the footer copy at
//! offset 0, the header, the parent locator, with `-M` the batmap header),
//! `size` is the volume's size, and a parent is named by its volume: the
//! device-mapper name a locator records (`/dev/mapper/VG-VHD--uuid`) gives
//! `VHD-uuid`, which `-a` then looks up among the group's volumes.

use std::path::Path;

use vhd::batmap::{BatmapHeader, BATMAP_COOKIE, BATMAP_HEADER_SIZE};
use vhd::chain::resolve_parent;
use vhd::footer::{Footer, FOOTER_SIZE};
use vhd::header::{DynamicHeader, HEADER_SIZE};
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{BlockFile, Opener, StdOpener};
use vhd::locator::{decode_payload, ParentLocator, PlatformCode};

use crate::getopt::getopt;
use crate::lvm::{self, Volume, VolumeFile};

const EINVAL: i32 = 22;
const ENOENT: i32 = 2;

const USAGE: &str = "usage: [OPTIONS] FILES\noptions: [-m match filter] [-f fast] [-c continue on failure] [-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] [-h help] [-M show markers]";

/// Options that change how images are scanned and printed.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    fast: bool,
    pretty: bool,
    nofail: bool,
    verbose: bool,
    parents: bool,
    markers: bool,
}

/// Something to scan.
#[derive(Debug, Clone)]
struct Target {
    /// Path as given (or found), or the volume name with `-l`.
    name: String,
    /// A raw parent: not opened as a VHD; reported hidden.
    raw: bool,
}

/// The result of scanning one target.
#[derive(Debug, Clone, Default)]
struct Image {
    name: String,
    parent: Option<String>,
    capacity: u64,
    size: u64,
    hidden: u8,
    marker: u8,
    keyhash: Option<String>,
    /// `(negative errno, what failed)`.
    error: Option<(i32, &'static str)>,
    /// Whether a parent was found in the scan (pretty mode).
    parent_found: bool,
    parent_is_raw: bool,
}

fn basename(s: &str) -> &str {
    s.trim_end_matches('/').rsplit('/').next().unwrap_or(s)
}

fn line(img: &Image, flags: Flags, indent: usize) -> String {
    let pad = " ".repeat(indent);
    if let Some((errno, what)) = img.error {
        return format!(
            "{pad}vhd={} scan-error={errno} error-message='{what}'",
            img.name
        );
    }
    let (name, parent) = if flags.verbose {
        (img.name.as_str(), img.parent.as_deref())
    } else {
        (basename(&img.name), img.parent.as_deref().map(basename))
    };
    let not_found = if flags.pretty && img.parent.is_some() && !img.parent_found {
        " (not found in scan)"
    } else {
        ""
    };
    let mut s = format!(
        "{pad}vhd={name} capacity={} size={} hidden={}",
        img.capacity, img.size, img.hidden
    );
    if flags.markers {
        s.push_str(&format!(
            " marker={} keyhash={}",
            img.marker,
            img.keyhash.as_deref().unwrap_or_default()
        ));
    }
    s.push_str(&format!(" parent={}{not_found}", parent.unwrap_or("none")));
    s
}

/// `fnmatch` with `*`, `?` and bracket classes (`[abc]`, `[a-z]`, `[!x]`).
pub fn fnmatch(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| fnmatch(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && fnmatch(rest, &s[1..]),
        Some((b'[', rest)) => {
            let Some((&c, tail)) = s.split_first() else {
                return false;
            };
            let (negate, body) = match rest.first() {
                Some(b'!' | b'^') => (true, &rest[1..]),
                _ => (false, rest),
            };
            // The class ends at the first ']' after its first character.
            let Some(end) = body.iter().skip(1).position(|&b| b == b']').map(|p| p + 1) else {
                return s.first() == Some(&b'[') && fnmatch(rest, tail);
            };
            let class = &body[..end];
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= (class[i]..=class[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && fnmatch(&body[end + 1..], tail)
        }
        Some((c, rest)) => s.first() == Some(c) && fnmatch(rest, &s[1..]),
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Paths matching `pattern` (wildcards allowed in any component; hidden
/// names only when the pattern component starts with '.').
fn glob(pattern: &str, sort: bool) -> Vec<String> {
    let absolute = pattern.starts_with('/');
    let mut current: Vec<String> = vec![if absolute { "/".into() } else { String::new() }];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for base in &current {
            let join = |name: &str| -> String {
                if base.is_empty() {
                    name.to_string()
                } else if base.ends_with('/') {
                    format!("{base}{name}")
                } else {
                    format!("{base}/{name}")
                }
            };
            if !has_wildcard(comp) {
                let p = join(comp);
                if Path::new(&p).symlink_metadata().is_ok() {
                    next.push(p);
                }
                continue;
            }
            let dir = if base.is_empty() { "." } else { base.as_str() };
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') || comp.starts_with('.'))
                .filter(|n| fnmatch(comp.as_bytes(), n.as_bytes()))
                .collect();
            if sort {
                names.sort();
            }
            next.extend(names.iter().map(|n| join(n)));
        }
        current = next;
    }
    if sort {
        current.sort();
    }
    current
}

/// Size of a file or block device in bytes.
fn target_size(path: &str) -> std::io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(meta.len())
    } else {
        StdOpener.open(Path::new(path), false)?.len()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The parent path recorded in a locator, preferring MACX, then W2RU, then
/// any other (what the C tool falls back to when the parent is missing).
fn recorded_parent<F: BlockFile>(img: &VhdImage<F>) -> Option<String> {
    let paths = img.parent_locator_paths();
    let pick = |code: PlatformCode| {
        paths
            .iter()
            .find(|(_, l, p)| l.code == code.code() && p.is_ok())
            .and_then(|(_, _, p)| p.as_ref().ok().cloned())
    };
    pick(PlatformCode::Macx)
        .or_else(|| pick(PlatformCode::W2ru))
        .or_else(|| paths.iter().find_map(|(_, _, p)| p.as_ref().ok().cloned()))
}

fn scan_target(target: &Target, flags: Flags) -> Image {
    let mut img = Image {
        name: target.name.clone(),
        ..Image::default()
    };
    if flags.pretty {
        match std::fs::canonicalize(&target.name) {
            Ok(p) => img.name = p.display().to_string(),
            Err(e) => {
                img.error = Some((-e.raw_os_error().unwrap_or(5), "resolving name"));
                return img;
            }
        }
    }
    match target_size(&target.name) {
        Ok(s) => img.size = s,
        Err(e) => {
            img.error = Some((-e.raw_os_error().unwrap_or(5), "opening file"));
            return img;
        }
    }
    if target.raw {
        img.capacity = img.size;
        img.hidden = 1;
        return img;
    }
    let opened = StdOpener
        .open(Path::new(&target.name), false)
        .map_err(|e| vhd::VhdError::io(format!("{}: open", target.name), e))
        .and_then(|f| VhdImage::open(f, &target.name, OpenOptions::inspect()));
    let vhd = match opened {
        Ok(v) => v,
        Err(e) => {
            img.error = Some((-e.errno(), "opening file"));
            return img;
        }
    };
    img.capacity = vhd.virtual_size();
    img.hidden = vhd.footer().hidden;
    if flags.markers {
        if vhd.footer().expects_batmap() && vhd.batmap_problem().is_some() {
            img.error = Some((-EINVAL, "checking marker"));
            return img;
        }
        img.marker = vhd.marker();
        img.keyhash = vhd
            .keyhash()
            .filter(|k| k.cookie != 0)
            .map(|k| hex(&k.hash));
    }
    if vhd.has_parent() {
        img.parent_is_raw = vhd.parent_is_raw();
        let from_header = || vhd.header().and_then(|h| h.parent_name().ok());
        let parent = if flags.fast {
            from_header().or_else(|| recorded_parent(&vhd))
        } else {
            resolve_parent(&vhd, Path::new(&target.name))
                .ok()
                .map(|p| p.display().to_string())
                .or_else(|| recorded_parent(&vhd))
        };
        match parent {
            Some(p) => img.parent = Some(p),
            None => {
                img.error = Some((-EINVAL, "getting parent"));
                return img;
            }
        }
    }
    img
}

/// The volume a parent locator or header name designates: the last
/// component of a device-mapper name `VG-LV` (single dashes separate, double
/// dashes stand for one), e.g. `/dev/mapper/VG_XenStorage--1-VHD--2` ->
/// `VHD-2`. A name without a separating dash is taken as it is.
pub fn volume_name(recorded: &str) -> String {
    let base = basename(recorded);
    let mut decoded = String::with_capacity(base.len());
    let mut chars = base.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                chars.next();
                decoded.push('-');
            }
            '-' => decoded.push('/'),
            c => decoded.push(c),
        }
    }
    match decoded.rsplit_once('/') {
        Some((_, lv)) => lv.to_string(),
        None => decoded,
    }
}

/// The locator the C scan reads for a volume's parent: the MACX one, else
/// the last W2RU one, else the first in use.
fn scan_locator(header: &DynamicHeader) -> Option<&ParentLocator> {
    let mut pick = None;
    for l in header.locators.iter().filter(|l| l.is_used()) {
        match l.platform() {
            Some(PlatformCode::Macx) => return Some(l),
            Some(PlatformCode::W2ru) => pick = Some(l),
            _ if pick.is_none() => pick = Some(l),
            _ => {}
        }
    }
    pick
}

fn read_at<F: BlockFile>(file: &F, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    file.read_at(&mut b, offset)?;
    Ok(b)
}

/// Scans a logical volume from the start of its data (see the module docs).
fn scan_volume(volume: &Volume, target: &Target, flags: Flags) -> Image {
    let mut img = Image {
        name: target.name.clone(),
        size: volume.size,
        ..Image::default()
    };
    let errno = |e: &std::io::Error| -e.raw_os_error().unwrap_or(5);
    if target.raw {
        img.capacity = img.size;
        img.hidden = 1;
        return img;
    }
    let file = match VolumeFile::open(volume) {
        Ok(f) => f,
        Err(e) => {
            img.error = Some((errno(&e), "opening device"));
            return img;
        }
    };
    if volume.segments.first().is_none_or(|s| s.len < 4096) {
        img.error = Some((-EINVAL, "device too small"));
        return img;
    }
    let head = match read_at(&file, 0, FOOTER_SIZE + HEADER_SIZE) {
        Ok(b) => b,
        Err(e) => {
            img.error = Some((errno(&e), "reading headers"));
            return img;
        }
    };
    let Ok(footer) = Footer::parse(&head[..FOOTER_SIZE], 0) else {
        img.error = Some((-EINVAL, "invalid footer"));
        return img;
    };
    img.capacity = footer.current_size;
    img.hidden = footer.hidden;
    if !footer.kind().is_some_and(vhd::DiskType::is_sparse) {
        return img;
    }
    let header = if footer.data_offset == FOOTER_SIZE as u64 {
        DynamicHeader::parse(&head[FOOTER_SIZE..], footer.data_offset).ok()
    } else {
        read_at(&file, footer.data_offset, HEADER_SIZE)
            .ok()
            .and_then(|b| DynamicHeader::parse(&b, footer.data_offset).ok())
    };
    let Some(header) = header else {
        img.error = Some((-EINVAL, "reading header"));
        return img;
    };
    if flags.markers && footer.expects_batmap() {
        let at = header.table_offset + header.bat_bytes();
        let batmap = read_at(&file, at, BATMAP_HEADER_SIZE)
            .ok()
            .filter(|b| b[..8] == BATMAP_COOKIE)
            .and_then(|b| BatmapHeader::parse(&b, at).ok());
        let Some(batmap) = batmap else {
            img.error = Some((-EINVAL, "checking markers"));
            return img;
        };
        img.marker = batmap.marker;
        img.keyhash = Some(batmap.keyhash)
            .filter(|k| k.cookie != 0)
            .map(|k| hex(&k.hash));
    }
    if footer.kind() == Some(vhd::DiskType::Differencing) {
        img.parent_is_raw = header.parent_uuid_is_null();
        let from_header = || header.parent_name().ok().filter(|n| !n.is_empty());
        let from_locator = || {
            let l = scan_locator(&header)?;
            let data = read_at(&file, l.data_offset, usize::try_from(l.data_len).ok()?).ok()?;
            decode_payload(l.platform()?, &data).ok()
        };
        let recorded = if flags.fast {
            from_header().or_else(from_locator)
        } else {
            from_locator()
        };
        match recorded {
            Some(p) => img.parent = Some(volume_name(&p)),
            None => {
                img.error = Some((-EINVAL, "getting parent"));
                return img;
            }
        }
    }
    img
}

/// Prints the pretty tree of the images scanned without error. Parents
/// are matched to images by canonical path when `files`, else by name.
fn print_tree(mut images: Vec<Image>, flags: Flags, files: bool) {
    images.sort_by(|a, b| a.name.cmp(&b.name));
    images.dedup_by(|a, b| a.name == b.name);
    let key = |s: &str| {
        std::fs::canonicalize(s)
            .ok()
            .filter(|_| files)
            .map_or_else(|| s.to_string(), |p| p.display().to_string())
    };
    let parent_of: Vec<Option<usize>> = images
        .iter()
        .map(|img| {
            let p = key(img.parent.as_deref()?);
            images.iter().position(|i| i.name == p)
        })
        .collect();
    for (img, p) in images.iter_mut().zip(&parent_of) {
        img.parent_found = p.is_some();
    }
    let mut printed = vec![false; images.len()];
    fn walk(
        i: usize,
        depth: usize,
        images: &[Image],
        parent_of: &[Option<usize>],
        printed: &mut [bool],
        flags: Flags,
    ) {
        if printed[i] {
            return;
        }
        printed[i] = true;
        println!("{}", line(&images[i], flags, depth * 3));
        for hidden in [false, true] {
            for c in 0..images.len() {
                if parent_of[c] == Some(i) && (images[c].hidden != 0) == hidden {
                    walk(c, depth + 1, images, parent_of, printed, flags);
                }
            }
        }
    }
    // Hidden roots, then the other roots, then whatever a loop left over.
    for hidden_pass in [true, false] {
        for i in 0..images.len() {
            if parent_of[i].is_none() && (images[i].hidden != 0) == hidden_pass {
                walk(i, 0, &images, &parent_of, &mut printed, flags);
            }
        }
    }
    for i in 0..images.len() {
        walk(i, 0, &images, &parent_of, &mut printed, flags);
    }
}

/// The `scan` command.
pub fn scan(args: &[String]) -> i32 {
    let p = match getopt(args, crate::option_spec("scan")) {
        Ok(p) if p.has('h') => {
            println!("{USAGE}");
            return 0;
        }
        Ok(p) => p,
        Err(_) => {
            println!("{USAGE}");
            return EINVAL;
        }
    };
    let filter = p.value('m');
    if filter.is_none() && p.operands.is_empty() {
        println!("{USAGE}");
        return EINVAL;
    }
    let mut flags = Flags {
        fast: p.has('f'),
        pretty: p.has('p'),
        nofail: p.has('c'),
        verbose: p.has('v'),
        parents: p.has('a'),
        markers: p.has('M'),
    };
    if flags.pretty {
        flags.fast = false;
    }
    let mut targets: Vec<Target> = Vec::new();
    let error_line = |name: &str, errno: i32| {
        let img = Image {
            name: name.to_string(),
            error: Some((errno, "failure scanning target")),
            ..Image::default()
        };
        println!("{}", line(&img, flags, 0));
    };
    // With -l, the group's volumes; targets are then volume names.
    let mut volumes: Option<Vec<Volume>> = None;
    if let Some(vg) = p.value('l') {
        let vols = match lvm::list_volumes(vg) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("lvm_scan_vg failed -{EINVAL}: {e}");
                eprintln!("scan failed: -{EINVAL}. Check syslog for details");
                return EINVAL;
            }
        };
        // Volume names: those matching the filter, then each operand.
        let mut used = vec![false; vols.len()];
        for pat in filter
            .into_iter()
            .chain(p.operands.iter().map(String::as_str))
        {
            for (i, v) in vols.iter().enumerate() {
                if !used[i] && fnmatch(pat.as_bytes(), v.name.as_bytes()) {
                    used[i] = true;
                    targets.push(Target {
                        name: v.name.clone(),
                        raw: false,
                    });
                }
            }
        }
        volumes = Some(vols);
    } else {
        if let Some(f) = filter {
            targets.extend(
                glob(f, !flags.fast)
                    .into_iter()
                    .map(|name| Target { name, raw: false }),
            );
        }
        for name in &p.operands {
            if let Err(e) = std::fs::metadata(name) {
                let errno = -e.raw_os_error().unwrap_or(5);
                error_line(name, errno);
                if !flags.nofail {
                    println!("scan failed: {errno}");
                    return -errno;
                }
                continue;
            }
            targets.push(Target {
                name: name.clone(),
                raw: false,
            });
        }
    }
    let volume = |name: &str| {
        volumes
            .as_ref()
            .and_then(|v| v.iter().find(|v| v.name == name))
    };
    let mut err = 0;
    let mut pretty_images = Vec::new();
    let mut i = 0;
    while i < targets.len() {
        let target = targets[i].clone();
        i += 1;
        let img = match (&volumes, volume(&target.name)) {
            (None, _) => scan_target(&target, flags),
            (Some(_), Some(v)) => scan_volume(v, &target, flags),
            (Some(_), None) => Image {
                name: target.name.clone(),
                error: Some((-ENOENT, "failure scanning target")),
                ..Image::default()
            },
        };
        if img.error.is_none() && flags.pretty {
            pretty_images.push(img.clone());
        } else {
            println!("{}", line(&img, flags, 0));
        }
        if flags.parents {
            if let Some(parent) = &img.parent {
                let known = targets
                    .iter()
                    .any(|t| basename(&t.name) == basename(parent));
                if !known {
                    let exists = match &volumes {
                        Some(_) => volume(parent).is_some(),
                        None => std::fs::metadata(parent).is_ok(),
                    };
                    if exists {
                        targets.push(Target {
                            name: parent.clone(),
                            raw: img.parent_is_raw,
                        });
                    } else {
                        error_line(parent, -ENOENT);
                    }
                }
            }
        }
        if let Some((errno, _)) = img.error {
            err = -errno;
            if !flags.nofail {
                break;
            }
        }
    }
    if flags.pretty {
        print_tree(pretty_images, flags, volumes.is_none());
    }
    if flags.nofail {
        0
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_classes() {
        assert!(fnmatch(b"*.vhd", b"a.vhd"));
        assert!(!fnmatch(b"*.vhd", b"a.raw"));
        assert!(fnmatch(b"VHD-[0-9a-f]*", b"VHD-3abc"));
        assert!(!fnmatch(b"VHD-[!0-9]*", b"VHD-3abc"));
        assert!(fnmatch(b"a?c", b"abc"));
    }

    #[test]
    fn parents_are_named_by_their_volume() {
        let id = "8c2f6a04-1b3e-4c5d-9e7f-0a1b2c3d4e5f";
        let vg = "VG_XenStorage--41d3c3a4--7a2b--4c1d--8e9f--102030405060";
        let lv = format!("VHD--{}", id.replace('-', "--"));
        let want = format!("VHD-{id}");
        assert_eq!(volume_name(&format!("/dev/mapper/{vg}-{lv}")), want);
        assert_eq!(volume_name(&format!("./{vg}-{lv}")), want);
        assert_eq!(volume_name(&format!("{vg}-{lv}")), want);
        assert_eq!(volume_name("parent.vhd"), "parent.vhd");
    }
}
