//! The `vhd-util` commands. Each returns the process exit status (a
//! positive errno, 0 on success) and prints the C tool's lines on stdout.

use std::path::{Path, PathBuf};

use vhd::chain::{file_identity, resolve_parent, MAX_CHAIN_DEPTH};
use vhd::check::{check_path, CheckOptions};
use vhd::create::{create_file, CreateOptions, SnapshotOptions};
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{Opener, StdOpener};
use vhd::ops;
use vhd::{DiskType, VhdError};

use crate::getopt::{getopt, Parsed};
use crate::progress::Bar;
use crate::Settings;

const EINVAL: i32 = 22;
const ENOSYS: i32 = 38;
const ELOOP: i32 = 40;

/// Runs `f` with the opener of every mutating command: plain files.
#[cfg(not(feature = "crash-injection"))]
fn with_opener<T>(_settings: &Settings, f: impl FnOnce(&StdOpener) -> T) -> T {
    f(&StdOpener)
}

#[cfg(feature = "crash-injection")]
use crash::with_opener;

/// Crash injection for the tests (cargo feature `crash-injection`; the shipped binary has
/// none of it): with [`Settings::crash_after_writes`] set to N, every mutating I/O call
/// after the first N fails, and the process then aborts as if it had been killed there.
#[cfg(feature = "crash-injection")]
mod crash {
    use vhd::io::{CrashBudget, FaultOpener};

    use crate::Settings;

    /// Runs `f` with an opener that fails every write after the budget, then aborts if the
    /// simulated crash happened.
    pub(super) fn with_opener<T>(settings: &Settings, f: impl FnOnce(&FaultOpener) -> T) -> T {
        let opener = FaultOpener {
            budget: CrashBudget::new(settings.crash_after_writes.unwrap_or(i64::MAX)),
        };
        let result = f(&opener);
        if opener.budget.crashed() {
            // Dies without cleanup or further output.
            std::process::abort();
        }
        result
    }
}

fn parse(args: &[String], spec: &str, usage: &str) -> Result<Parsed, i32> {
    match getopt(args, spec) {
        Ok(p) if p.has('h') => {
            println!("{usage}");
            Err(0)
        }
        Ok(p) => Ok(p),
        Err(_) => {
            println!("{usage}");
            Err(EINVAL)
        }
    }
}

fn neg(e: &VhdError) -> i32 {
    -e.errno()
}

fn mb(v: &str) -> Option<u64> {
    v.parse::<u64>().ok().and_then(|m| m.checked_mul(1 << 20))
}

pub(crate) fn open_ro(name: &str, backup: bool) -> vhd::Result<VhdImage<std::fs::File>> {
    let f = StdOpener
        .open(Path::new(name), false)
        .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
    VhdImage::open(
        f,
        name,
        OpenOptions {
            use_backup_footer: backup,
            ..OpenOptions::inspect()
        },
    )
}

pub fn create(args: &[String]) -> i32 {
    const U: &str = "options: <-n name> <-s size (MB)> [-r reserve] [-S size (MB) for metadata preallocation (see vhd-util resize)] [-h help]";
    let p = match parse(args, crate::option_spec("create"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let (Some(name), Some(size)) = (p.value('n'), p.value('s').and_then(mb)) else {
        println!("{U}");
        return EINVAL;
    };
    if !p.operands.is_empty() {
        println!("{U}");
        return EINVAL;
    }
    let mut opts = if p.has('r') {
        CreateOptions::fixed(size)
    } else {
        CreateOptions::dynamic(size)
    };
    if let Some(s) = p.value('S') {
        match mb(s) {
            Some(m) if m >= size => opts.max_size = Some(m),
            _ => {
                println!("{U}");
                return EINVAL;
            }
        }
    }
    match create_file(Path::new(name), &opts) {
        Ok(_) => 0,
        Err(e) => {
            println!("error creating {name}: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn snapshot(args: &[String]) -> i32 {
    const U: &str = "options: <-n name> <-p parent> [-l limit] [-m parent_is_raw] [-S size (MB) for metadata preallocation (see vhd-util resize)] [-e link to supplied parent name even if it might be empty] [-h help]";
    let p = match parse(args, crate::option_spec("snapshot"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let (Some(name), Some(parent)) = (p.value('n'), p.value('p')) else {
        println!("{U}");
        return EINVAL;
    };
    let raw = p.has('m');
    let mut opts = SnapshotOptions {
        parent_raw: raw,
        ..SnapshotOptions::default()
    };
    if let Some(l) = p.value('l') {
        match l.parse::<u32>() {
            Ok(v) => opts.depth_limit = Some(v),
            Err(_) => {
                println!("{U}");
                return EINVAL;
            }
        }
    }
    if let Some(s) = p.value('S') {
        match mb(s) {
            Some(m) => opts.max_size = Some(m),
            None => {
                println!("{U}");
                return EINVAL;
            }
        }
    }
    // Like the C tool: the parent by its real path; a missing parent fails
    // silently with its errno.
    let ppath = match std::fs::canonicalize(parent) {
        Ok(pp) => pp,
        Err(e) => return e.raw_os_error().unwrap_or(EINVAL),
    };
    let target = if raw || p.has('e') {
        ppath
    } else {
        match ops::find_snapshot_target(&ppath) {
            Ok((t, target_raw)) => {
                if t != ppath {
                    // Skipped empty parents: keep the size of the one given.
                    match open_ro(&ppath.display().to_string(), false) {
                        Ok(img) => opts.virtual_size = Some(img.virtual_size()),
                        Err(e) => return e.errno(),
                    }
                }
                opts.parent_raw |= target_raw;
                t
            }
            Err(e) => {
                println!("error opening {parent}: {}", neg(&e));
                return e.errno();
            }
        }
    };
    match vhd::create::snapshot(Path::new(name), &target, &opts) {
        Ok(_) => 0,
        Err(e @ VhdError::NoSpace(_)) => {
            println!("{e}");
            e.errno()
        }
        Err(e) => {
            println!("snapshot failed: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

/// The parent of differencing image `img` (opened as `name`) as the C
/// tools print it: the file its locators lead to, canonical and absolute
/// (an LVM volume by its `/dev/mapper` name), whatever the cwd.
pub(crate) fn parent_path(img: &VhdImage<std::fs::File>, name: &str) -> vhd::Result<String> {
    let found = resolve_parent(img, Path::new(name))?;
    Ok(vhd::create::canonical(&found)?.display().to_string())
}

/// Parent path as recorded (unresolved), for `query -p -u`.
fn recorded_parent(img: &VhdImage<std::fs::File>) -> Option<String> {
    img.parent_locator_paths()
        .into_iter()
        .find_map(|(_, _, p)| p.ok())
}

pub fn query(args: &[String]) -> i32 {
    const U: &str = "options: <-n name> [-v print virtual size (in MB)] [-s print physical utilization (bytes)] [-p print parent] [-f print fields] [-m print marker] [-d print chain depth] [-S print max virtual size (MB) for fast resize] [-a print allocated block count] [-u don't resolve parent path] [-b use backup footer] [-h help]";
    let p = match parse(args, crate::option_spec("query"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    if !p.operands.is_empty() {
        println!("{U}");
        return EINVAL;
    }
    let img = match open_ro(name, p.has('b')) {
        Ok(i) => i,
        Err(e) => {
            println!("error opening {name}: {}", neg(&e));
            return e.errno();
        }
    };
    let mut err = 0;
    if p.has('v') {
        println!("{}", img.virtual_size() >> 20);
    }
    if p.has('s') {
        // End of the data plus the footer, as the C tool computes it (not
        // the file size: a footer can sit past unused space).
        let size = if img.disk_type().is_sparse() {
            img.end_of_data() + 512
        } else {
            img.physical_size()
        };
        println!("{size}");
    }
    if p.has('p') {
        if img.disk_type() != DiskType::Differencing {
            println!("{name} has no parent");
        } else {
            let r = if p.has('u') {
                recorded_parent(&img).ok_or(EINVAL)
            } else {
                parent_path(&img, name).map_err(|e| e.errno())
            };
            match r {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    println!("query failed");
                    err = e;
                }
            }
        }
    }
    if p.has('f') {
        println!("hidden: {}", img.footer().hidden);
    }
    if p.has('m') {
        println!("marker: {}", img.marker());
    }
    if p.has('d') {
        match vhd::chain::chain_depth(Path::new(name)) {
            Ok(depth) => println!("chain depth: {depth}"),
            Err(e) => {
                println!("error checking chain depth: {}", neg(&e));
                if err == 0 {
                    err = e.errno();
                }
            }
        }
    }
    if p.has('S') {
        // Fixed disks have no BAT to grow into: 0, like the C tool.
        let max = img.header().map_or(0, |h| {
            u64::from(h.max_table_entries) * u64::from(h.block_size)
        });
        println!("{}", max >> 20);
    }
    if p.has('a') {
        println!("{}", img.bat().allocated_count());
    }
    err
}

pub fn set(settings: &Settings, args: &[String]) -> i32 {
    const U: &str = "options: <-n name> <-f field> <-v value> [-h help]";
    let p = match parse(args, crate::option_spec("set"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let (Some(name), Some(field), Some(value)) = (p.value('n'), p.value('f'), p.value('v')) else {
        println!("{U}");
        return EINVAL;
    };
    let Ok(v) = value.parse::<u8>() else {
        println!("invalid value {value}");
        return EINVAL;
    };
    if field != "hidden" && field != "marker" {
        println!("invalid field {field}");
        return EINVAL;
    }
    let field = if field == "hidden" {
        ops::SetField::Hidden
    } else {
        ops::SetField::Marker
    };
    let path = Path::new(name);
    if let Err(e) = open_ro(name, false) {
        println!("error opening {name}: {}", neg(&e));
        return e.errno();
    }
    let r = with_opener(settings, |o| {
        ops::set_field(o, path, field, v, &ops::default_journal_path(path))
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            let what = if field == ops::SetField::Hidden {
                "hidden"
            } else {
                "marker"
            };
            println!("error setting {what}: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn repair(settings: &Settings, args: &[String]) -> i32 {
    const U: &str = "options: <-n name> [-b use the back-up footer] [-h help]";
    let p = match parse(args, crate::option_spec("repair"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    match with_opener(settings, |o| ops::repair(o, Path::new(name), p.has('b'))) {
        Ok(()) => 0,
        Err(e) => {
            println!("error repairing {name}: {}", neg(&e));
            e.errno()
        }
    }
}

pub fn resize(settings: &Settings, args: &[String]) -> i32 {
    const U: &str = "options: <-n name> <-s size (MB)> <-j journal|-f fast> [-h help]";
    let p = match parse(args, crate::option_spec("resize"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let (Some(name), Some(size)) = (p.value('n'), p.value('s').and_then(mb)) else {
        println!("{U}");
        return EINVAL;
    };
    let journal = p.value('j');
    if journal.is_none() && !p.has('f') {
        println!("{U}");
        return EINVAL;
    }
    let r = with_opener(settings, |o| match (journal, p.has('f')) {
        (Some(j), false) => ops::resize_journaled(o, Path::new(name), size, Path::new(j)),
        (Some(j), true) => ops::resize_fast_with_journal(o, Path::new(name), size, Path::new(j)),
        (None, _) => ops::resize_fast(o, Path::new(name), size),
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            println!("resize failed: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn fill(args: &[String]) -> i32 {
    const U: &str = "options: <-n name> [-b initialise BAT and bitmaps only] [-f from sector] [-t to sector] [-B allow beyond 2 TiB] [-h help]";
    let p = match parse(args, crate::option_spec("fill"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    let from = p.value('f').map(str::parse::<u64>);
    let to = p.value('t').map(str::parse::<u64>);
    let range = match (from, to) {
        (None, None) => None,
        (Some(Ok(f)), None) => Some((f, u64::MAX)),
        (None, Some(Ok(t))) => Some((0, t)),
        (Some(Ok(f)), Some(Ok(t))) => Some((f, t)),
        _ => {
            println!("{U}");
            return EINVAL;
        }
    };
    let mut bar = Bar::new("fill");
    let mut cb = |d, t| bar.update(d, t);
    match ops::fill(
        &StdOpener,
        Path::new(name),
        p.has('b'),
        range,
        Some(&mut cb),
    ) {
        Ok(()) => 0,
        Err(e) => {
            println!("error filling {name}: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn coalesce(settings: &Settings, args: &[String]) -> i32 {
    const U: &str = "options: <-n name> [-a ancestor] [-o output] [-s sparse] [-p progress] [-x custom parent] [-h help]";
    let p = match getopt(args, crate::option_spec("coalesce")) {
        Ok(p) if !p.has('h') => p,
        _ => {
            println!("{U}");
            return EINVAL;
        }
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    if !p.operands.is_empty() || (p.has('o') && p.has('a')) {
        println!("{U}");
        return EINVAL;
    }
    let mut bar = Bar::new("coalesce");
    let r = if let Some(out) = p.value('o') {
        let mut cb = |d, t| bar.update(d, t);
        ops::copy(
            &StdOpener,
            Path::new(name),
            Path::new(out),
            None,
            Some(&mut cb),
        )
    } else {
        if let Some(a) = p.value('a') {
            let parent = open_ro(name, false).and_then(|img| resolve_parent(&img, Path::new(name)));
            let same = match (parent, std::fs::canonicalize(a)) {
                (Ok(pp), Ok(aa)) => std::fs::canonicalize(pp).ok() == Some(aa),
                _ => false,
            };
            if !same {
                println!("error coalescing: -{ENOSYS}");
                println!("  (coalescing into an ancestor other than the parent is not supported)");
                return ENOSYS;
            }
        }
        with_opener(settings, |o| {
            let mut cb = |d, t| bar.update(d, t);
            ops::coalesce(o, Path::new(name), p.has('s'), Some(&mut cb))
        })
    };
    match r {
        Ok(n) => {
            print!("Coalesced {n} sectors");
            0
        }
        Err(e) => {
            println!("error coalescing: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn modify(settings: &Settings, args: &[String]) -> i32 {
    const U: &str = "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size] [-z zero (kill data)] [-h help]";
    let p = match parse(args, crate::option_spec("modify"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    let physical_size = match p.value('s').map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            println!("{U}");
            return EINVAL;
        }
    };
    let opts = ops::ModifyOptions {
        parent: p.value('p').map(|x| (PathBuf::from(x), p.has('m'))),
        physical_size,
        zero_bat: p.has('z'),
    };
    match with_opener(settings, |o| ops::modify(o, Path::new(name), &opts)) {
        Ok(()) => 0,
        Err(e) => {
            println!("error modifying {name}: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn scan(args: &[String]) -> i32 {
    crate::scan::scan(args)
}

pub fn check(args: &[String]) -> i32 {
    const U: &str = "options: -n <file> [-i ignore missing primary footers] [-I ignore parent uuids] [-t ignore timestamps] [-B do not check BAT for overlapping (precludes -s, -b)] [-p check parents] [-b check bitmaps] [-s stats] [-h help]";
    let p = match parse(args, crate::option_spec("check"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    let stats = p.has('s');
    if !p.operands.is_empty() || ((stats || p.has('b')) && p.has('B')) {
        println!("{U}");
        return EINVAL;
    }
    let opts = CheckOptions {
        ignore_primary: p.has('i'),
        check_bitmaps: p.has('b'),
        check_data: p.has('b'),
        ignore_parent_uuid: p.has('I'),
        ignore_timestamps: p.has('t'),
        skip_overlap_check: p.has('B'),
        ..CheckOptions::default()
    };
    // Images that passed, leaf first (for -s).
    let mut checked = vec![PathBuf::from(name)];
    let r = check_one(name, &opts, stats);
    if r != 0 {
        return r;
    }
    let r = if p.has('p') {
        check_parents(name, &opts, stats, &mut checked)
    } else {
        0
    };
    if stats {
        print_stats(&checked);
    }
    r
}

/// `check -p`: checks every ancestor of `name`, appending each one that
/// passes to `checked`.
/// The walk is bounded: it stops with `ELOOP` at an image already checked (by file identity)
/// or past [`MAX_CHAIN_DEPTH`] images.
fn check_parents(name: &str, opts: &CheckOptions, stats: bool, checked: &mut Vec<PathBuf>) -> i32 {
    let mut cur = PathBuf::from(name);
    let mut seen: Vec<(u64, u64)> = file_identity(&cur).into_iter().collect();
    loop {
        if checked.len() > MAX_CHAIN_DEPTH {
            println!("error checking parents: -{ELOOP}");
            println!("  (the chain of {name} is deeper than {MAX_CHAIN_DEPTH} images)");
            return ELOOP;
        }
        let img = match open_ro(&cur.display().to_string(), false) {
            Ok(i) => i,
            Err(e) => {
                println!("error checking parents: {}", neg(&e));
                return e.errno();
            }
        };
        if !img.has_parent() || img.parent_is_raw() {
            return 0;
        }
        let next = match resolve_parent(&img, &cur) {
            Ok(n) => n,
            Err(e) => {
                println!("error getting parent: {}", neg(&e));
                println!("error checking parents: {}", neg(&e));
                return e.errno();
            }
        };
        if let Some(id) = file_identity(&next) {
            if seen.contains(&id) {
                println!("error checking parents: -{ELOOP}");
                println!(
                    "  (parent loop: {} comes back to {}, already checked)",
                    cur.display(),
                    next.display()
                );
                return ELOOP;
            }
            seen.push(id);
        }
        let r = check_one(&next.display().to_string(), opts, stats);
        if r != 0 {
            println!("error checking parents: -{r}");
            return r;
        }
        checked.push(next.clone());
        cur = next;
    }
}

/// Prints the `-s` lines, root first.
fn print_stats(checked: &[PathBuf]) {
    let mut images = Vec::new();
    for path in checked.iter().rev() {
        match open_ro(&path.display().to_string(), false) {
            Ok(i) => images.push(i),
            Err(e) => {
                println!("error opening {}: {}", path.display(), neg(&e));
                return;
            }
        }
    }
    let refs: Vec<&VhdImage<std::fs::File>> = images.iter().collect();
    match vhd::check::allocation_stats(&refs) {
        Ok(all) => {
            for s in all {
                println!("{}", s.line());
            }
        }
        Err(e) => println!("error collecting stats: {}", neg(&e)),
    }
}

fn check_one(name: &str, opts: &CheckOptions, stats: bool) -> i32 {
    match check_path(Path::new(name), opts) {
        Ok(_) => {
            // Like the C tool, statistics replace the "is valid" line.
            if !stats {
                println!("{name} is valid");
            }
            0
        }
        Err(f) => {
            println!("{}", f.message);
            println!("{name} appears invalid; dumping metadata");
            crate::dump::dump_headers(name, false);
            f.errno
        }
    }
}

pub fn revert(args: &[String]) -> i32 {
    const U: &str = "options: <-n name> [-j journal (default: NAME.journal)] [-h help]";
    let p = match parse(args, crate::option_spec("revert"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let Some(name) = p.value('n') else {
        println!("{U}");
        return EINVAL;
    };
    let journal = p
        .value('j')
        .map_or_else(|| ops::default_journal_path(Path::new(name)), PathBuf::from);
    match ops::revert_path(Path::new(name), &journal) {
        Ok(_) => 0,
        Err(e) => {
            println!("revert failed: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn copy(args: &[String]) -> i32 {
    const U: &str = "options: -n SRC -N DST [-k KEY_FILE | -E] [-h help]";
    let p = match parse(args, crate::option_spec("copy"), U) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let (Some(src), Some(dst)) = (p.value('n'), p.value('N')) else {
        println!("{U}");
        return EINVAL;
    };
    let key = match (p.value('k'), p.has('E')) {
        (Some(_), true) => {
            eprintln!("Only supply -E or -k once");
            return 1;
        }
        (Some(path), false) => match crate::key::read_key_file(path) {
            Ok(key) => Some(key),
            Err(status) => return status,
        },
        (None, true) => {
            match crate::key::read_xts_key(&mut secret::Unbuffered(std::io::stdin()), "stdin") {
                Ok(key) => Some(key),
                Err(status) => return status,
            }
        }
        (None, false) => None,
    };
    let mut bar = Bar::new("copy");
    let mut cb = |d, t| bar.update(d, t);
    let key = key.as_ref().map(secret::Key::as_bytes);
    match ops::copy(
        &StdOpener,
        Path::new(src),
        Path::new(dst),
        key,
        Some(&mut cb),
    ) {
        Ok(_) => 0,
        Err(e) => {
            println!("error copying {src} to {dst}: {}", neg(&e));
            println!("  ({e})");
            e.errno()
        }
    }
}

pub fn key(args: &[String]) -> i32 {
    crate::key::run(args)
}

pub fn read(args: &[String]) -> i32 {
    crate::dump::read(args)
}
