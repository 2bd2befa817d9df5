//! `vhd-util scan`: one line per image,
//! `vhd=NAME capacity=BYTES size=BYTES hidden=N parent=NAME|none`
//! (`-M` adds `marker=N keyhash=HEX|none` before `parent=`), or
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
//! resolving locators. `-l VG` scans the logical volumes of a volume group
//! (listed with `lvs` from lvm2, opened as `/dev/VG/LV`, so they must be
//! active; `VHD_UTIL_LVM_DEV_DIR` replaces `/dev` for tests); the filter
//! and operands are then patterns over the volume names.

use std::path::Path;

use vhd::chain::resolve_parent;
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{BlockFile, Opener, StdOpener};
use vhd::locator::PlatformCode;

use crate::getopt::getopt;

const EINVAL: i32 = 22;

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
    /// Path as given (or found).
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
            img.keyhash.as_deref().unwrap_or("none")
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

/// Prints the pretty tree of the images scanned without error.
fn print_tree(mut images: Vec<Image>, flags: Flags) {
    images.sort_by(|a, b| a.name.cmp(&b.name));
    images.dedup_by(|a, b| a.name == b.name);
    let key = |s: &str| {
        std::fs::canonicalize(s)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| s.to_string())
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

/// Logical volumes of `vg` as `(name, device path)`, listed with `lvs`.
fn lvm_targets(vg: &str) -> Result<Vec<(String, String)>, i32> {
    let out = std::process::Command::new("lvs")
        .args(["--noheadings", "-o", "lv_name", vg])
        .output()
        .map_err(|e| e.raw_os_error().unwrap_or(38))?;
    if !out.status.success() {
        return Err(EINVAL);
    }
    let dev_dir = std::env::var("VHD_UTIL_LVM_DEV_DIR").unwrap_or_else(|_| "/dev".into());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|lv| (lv.to_string(), format!("{dev_dir}/{vg}/{lv}")))
        .collect())
}

/// The `scan` command.
pub fn scan(args: &[String]) -> i32 {
    let p = match getopt(args, "m:fcl:pavMh") {
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
    if let Some(vg) = p.value('l') {
        // Volume names: those matching the filter, then each operand.
        let lvs = match lvm_targets(vg) {
            Ok(l) => l,
            Err(e) => {
                println!("scan failed: -{e}");
                return e;
            }
        };
        let mut used = vec![false; lvs.len()];
        for pat in filter
            .into_iter()
            .chain(p.operands.iter().map(String::as_str))
        {
            for (i, (name, dev)) in lvs.iter().enumerate() {
                if !used[i] && fnmatch(pat.as_bytes(), name.as_bytes()) {
                    used[i] = true;
                    targets.push(Target {
                        name: dev.clone(),
                        raw: false,
                    });
                }
            }
        }
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
    let mut err = 0;
    let mut pretty_images = Vec::new();
    let mut i = 0;
    while i < targets.len() {
        let target = targets[i].clone();
        i += 1;
        let img = scan_target(&target, flags);
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
                    if std::fs::metadata(parent).is_ok() {
                        targets.push(Target {
                            name: parent.clone(),
                            raw: img.parent_is_raw,
                        });
                    } else {
                        error_line(parent, -2);
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
        print_tree(pretty_images, flags);
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
}
