//! `td-util COMMAND TYPE [OPTIONS]`: the tapdisk utility XenServer's storage
//! manager runs on file SRs to create, snapshot and query VDIs.
//!
//! * `create vhd [-r] SIZE_MB NAME` and `snapshot vhd [-m] [-l LIMIT] NAME
//!   PARENT` run `vhd-util create` / `snapshot` with the matching options
//!   (same output and exit status); `create aio -r SIZE_MB NAME` writes a
//!   zero-filled raw file.
//! * `query vhd|aio [-v] [-p] [-f] [-d] [-b] NAME` prints, one per line in
//!   this order: the virtual size in MiB, the parent (`NAME has no
//!   parent`, or its canonical absolute path), `hidden: N` and `chain
//!   depth: N`; `-b` reads the backup footer.
//! * `set vhd NAME hidden VALUE` runs `vhd-util set -f hidden`.
//!
//! Usage errors go to stderr. A missing or unknown command or type exits
//! with 255, as the C tool's `exit(-1)`; everything else exits with the
//! errno of the failure.

use std::io::Write;
use std::path::Path;

use crate::commands;
use crate::getopt::getopt;
use crate::Settings;

const EINVAL: i32 = 22;
const EIO: i32 = 5;
/// The C tool's `exit(-1)`.
const EXIT_USAGE: i32 = 255;

const COMMANDS: &[&str] = &["create", "snapshot", "query", "set"];

/// Each command's getopt spec (the same for both types): the options it accepts, which
/// td-util(8) documents (a unit test compares the two).
pub const OPTION_SPECS: [(&str, &str); 4] = [
    ("create", "hrb"),
    ("snapshot", "hbml:"),
    ("query", "hvpfdb"),
    ("set", "h"),
];

/// The getopt spec of `command` (one of [`OPTION_SPECS`]).
fn option_spec(command: &str) -> &'static str {
    OPTION_SPECS
        .iter()
        .find(|(name, _)| *name == command)
        .map_or("", |(_, spec)| spec)
}
const TYPES: &[&str] = &["vhd", "aio"];

fn print_types() {
    eprintln!("TYPE := {{ {} }}", TYPES.join(" | "));
}

fn help() -> i32 {
    eprintln!("Tapdisk Utilities: v1.0.0");
    eprintln!("usage: td-util COMMAND [TYPE] [OPTIONS]");
    eprintln!("COMMAND := {{ {} }}", COMMANDS.join(" | "));
    print_types();
    EXIT_USAGE
}

/// The image types td-util knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskType {
    Vhd,
    Aio,
}

impl DiskType {
    fn name(self) -> &'static str {
        match self {
            Self::Vhd => "vhd",
            Self::Aio => "aio",
        }
    }
}

/// `atoi`: the leading decimal digits of `s` (0 when there are none).
fn atoi(s: &str) -> u64 {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// Runs `td-util` with `args` (without the program name).
pub fn td_util(settings: &Settings, args: &[String]) -> i32 {
    let Some(cmd) = args.first() else {
        return help();
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        eprintln!("invalid COMMAND {cmd}");
        return help();
    }
    let Some(type_name) = args.get(1) else {
        eprintln!("td-util {cmd} requires a TYPE");
        print_types();
        return EXIT_USAGE;
    };
    let kind = match type_name.as_str() {
        "vhd" => DiskType::Vhd,
        "aio" => DiskType::Aio,
        _ => {
            eprintln!("invalid TYPE '{type_name}'.");
            print_types();
            return EXIT_USAGE;
        }
    };
    let rest = &args[2..];
    match cmd.as_str() {
        "create" => create(kind, rest),
        "snapshot" => snapshot(kind, rest),
        "query" => query(kind, rest),
        _ => set(settings, kind, rest),
    }
}

fn create(kind: DiskType, args: &[String]) -> i32 {
    let usage = || {
        eprintln!(
            "usage: td-util create {} [-h help] [-r reserve] [-b file_is_fixed_size] <SIZE(MB)> <FILENAME>",
            kind.name()
        );
        EINVAL
    };
    let Ok(p) = getopt(args, option_spec("create")) else {
        return usage();
    };
    let [size, name] = p.operands.as_slice() else {
        return usage();
    };
    if p.has('h') {
        return usage();
    }
    let mb = atoi(size);
    if kind == DiskType::Vhd {
        let mut argv = strings(&["-n", name, "-s", &mb.to_string()]);
        if p.has('r') {
            argv.push("-r".into());
        }
        if p.has('b') {
            argv.push("-b".into());
        }
        return commands::create(&argv);
    }
    if !p.has('r') {
        eprintln!("Cannot create sparse {} image", kind.name());
        return EINVAL;
    }
    match write_zeros(Path::new(name), mb) {
        Ok(()) => 0,
        Err(e) => {
            let _ = std::fs::remove_file(name);
            e.raw_os_error().unwrap_or(EIO)
        }
    }
}

/// Creates (or truncates) `path` holding `mb` MiB of zeros.
fn write_zeros(path: &Path, mb: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mb {
        f.write_all(&zeros)?;
    }
    f.sync_all()
}

fn snapshot(kind: DiskType, args: &[String]) -> i32 {
    let usage = |code| {
        eprintln!(
            "usage: td-util snapshot {} [-h help] [-m parent_raw] [-b file_is_fixed_size] [-l snapshot depth limit] <FILENAME> <BACKING_FILENAME>",
            kind.name()
        );
        code
    };
    if kind != DiskType::Vhd {
        eprintln!("Cannot create snapshot of {} image type", kind.name());
        return EINVAL;
    }
    let p = match getopt(args, option_spec("snapshot")) {
        Ok(p) if p.has('h') => return usage(0),
        Ok(p) => p,
        Err(_) => return usage(EINVAL),
    };
    let [name, backing] = p.operands.as_slice() else {
        return usage(EINVAL);
    };
    if let Err(e) = std::fs::metadata(backing) {
        eprintln!("File {backing} not found");
        return e.raw_os_error().unwrap_or(EIO);
    }
    let mut argv = strings(&["-n", name, "-p", backing]);
    for (flag, opt) in [('b', "-b"), ('m', "-m")] {
        if p.has(flag) {
            argv.push(opt.into());
        }
    }
    if let Some(limit) = p.value('l') {
        argv.extend(strings(&["-l", limit]));
    }
    commands::snapshot(&argv)
}

fn query(kind: DiskType, args: &[String]) -> i32 {
    let usage = |code| {
        eprintln!(
            "usage: td-util query {} [-h help] [-v virtsize] [-p parent] [-f fields] [-b don't trust the footer, use the back-up one instead] <FILENAME>",
            kind.name()
        );
        code
    };
    let p = match getopt(args, option_spec("query")) {
        Ok(p) if p.has('h') => return usage(0),
        Ok(p) => p,
        Err(_) => return usage(EINVAL),
    };
    let [name] = p.operands.as_slice() else {
        return usage(EINVAL);
    };
    match kind {
        DiskType::Vhd => query_vhd(name, &p),
        DiskType::Aio => query_aio(name, &p),
    }
}

fn query_vhd(name: &str, p: &crate::getopt::Parsed) -> i32 {
    let img = match commands::open_ro(name, p.has('b')) {
        Ok(img) => img,
        Err(e) => {
            println!("failed opening {name}: -{}", e.errno());
            return e.errno();
        }
    };
    let mut err = 0;
    if p.has('v') {
        println!("{}", img.virtual_size() >> 20);
    }
    if p.has('p') {
        if img.has_parent() {
            match commands::parent_path(&img, name) {
                Ok(parent) => println!("{parent}"),
                Err(e) => {
                    println!("failed getting parent: -{}", e.errno());
                    err = e.errno();
                }
            }
        } else {
            println!("{name} has no parent");
        }
    }
    if p.has('f') {
        println!("hidden: {}", img.footer().hidden);
    }
    if p.has('d') {
        match vhd::chain::chain_depth(Path::new(name)) {
            Ok(depth) => println!("chain depth: {depth}"),
            Err(e) => {
                println!("error checking chain depth: -{}", e.errno());
                err = e.errno();
            }
        }
    }
    err
}

fn query_aio(name: &str, p: &crate::getopt::Parsed) -> i32 {
    if p.has('v') {
        let size = std::fs::File::open(name).and_then(|f| vhd::BlockFile::len(&f));
        match size {
            Ok(bytes) => println!("{}", bytes >> 20),
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(EIO);
                println!("failed opening {name}: {errno}");
                return errno;
            }
        }
    }
    if p.has('p') {
        println!("{name} has no parent");
    }
    if p.has('f') {
        println!("hidden: 0");
    }
    0
}

fn set(settings: &Settings, kind: DiskType, args: &[String]) -> i32 {
    let usage = || {
        eprintln!(
            "usage: td-util set {} [-h help] <FILENAME> <FIELD> <VALUE>",
            kind.name()
        );
        eprintln!("FIELD := {{ hidden }}");
        EINVAL
    };
    if kind != DiskType::Vhd {
        eprintln!("Cannot set fields of {} images", kind.name());
        return EINVAL;
    }
    let Ok(p) = getopt(args, option_spec("set")) else {
        return usage();
    };
    let [name, field, value] = p.operands.as_slice() else {
        return usage();
    };
    if p.has('h') {
        return usage();
    }
    if field != "hidden" {
        eprintln!("Invalid field {field}");
        return usage();
    }
    commands::set(
        settings,
        &strings(&["-n", name, "-f", "hidden", "-v", value]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atoi_takes_leading_digits() {
        assert_eq!(atoi("64"), 64);
        assert_eq!(atoi("12MB"), 12);
        assert_eq!(atoi("x"), 0);
    }
}
