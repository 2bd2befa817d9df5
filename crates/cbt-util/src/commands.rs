//! The commands of `cbt-util`: `create`, `get`, `set` and `coalesce` as the C tool has them
//! (options, silent success, the same messages on stderr and the same exit statuses), and
//! `extents`, which the C tool lacks.
//!
//! Each command returns its exit status: 0, or a positive errno (`EINVAL` after printing its
//! usage on stdout, the `fopen` errno when a file cannot be opened, `EIO` when a read or a
//! write comes up short). Files are read no further than they go, so a header that claims
//! a huge disk costs a short read, never a huge allocation.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};

use cbt::{bitmap_len, LogHeader, HEADER_LEN};
use getopt::{Getopt, GetoptError};

use crate::args::{c_atoi, c_strtoull, parse_uuid};

const EINVAL: i32 = 22;
const EIO: i32 = 5;

/// Where a command writes.
pub struct Io<'a> {
    /// Standard output: results and usage texts.
    pub out: &'a mut dyn Write,
    /// Standard error: what went wrong.
    pub err: &'a mut dyn Write,
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io").finish_non_exhaustive()
    }
}

/// A command's failure: its exit status (the message is already printed).
type Status = i32;

/// Prints a command's usage and gives `EINVAL`, as every usage error (and `-h`) does.
fn usage(io: &mut Io<'_>, text: &str) -> Status {
    let _ = io.out.write_all(text.as_bytes());
    EINVAL
}

/// Each command's getopt spec: the options it accepts, which cbt-util(8) documents (a unit
/// test compares the two).
pub const OPTION_SPECS: [(&str, &str); 5] = [
    ("create", "n:s:h"),
    ("get", "n:pcfsbh"),
    ("set", "n:p:c:f:s:h"),
    ("coalesce", "p:c:h"),
    ("extents", "n:h"),
];

/// Runs getopt over `args` (the arguments of command `name`) with the command's spec; a bad
/// option is reported on stderr as getopt does, with the command's name in front.
fn options(
    name: &str,
    args: &[String],
    io: &mut Io<'_>,
) -> Result<Vec<(char, Option<String>)>, ()> {
    let spec = OPTION_SPECS
        .iter()
        .find(|(command, _)| *command == name)
        .map_or("", |(_, spec)| spec);
    let mut found = Vec::new();
    for item in Getopt::new(args, spec) {
        match item {
            Ok((letter, value)) if letter != 'h' => found.push((letter, value)),
            Ok(_) => return Err(()),
            Err(error @ (GetoptError::Unknown(_) | GetoptError::MissingValue(_))) => {
                let _ = writeln!(io.err, "{name}: {error}");
                return Err(());
            }
        }
    }
    Ok(found)
}

/// `fopen(name, mode)` for the modes the C tool uses: `r`, `r+`, `w+`.
fn open(name: &str, mode: &str, io: &mut Io<'_>) -> Result<File, Status> {
    let mut options = OpenOptions::new();
    match mode {
        "r" => options.read(true),
        "r+" => options.read(true).write(true),
        _ => options.read(true).write(true).create(true).truncate(true),
    };
    options.open(name).map_err(|error| {
        let errno = error.raw_os_error().unwrap_or(EIO);
        let _ = writeln!(
            io.err,
            "Failed to open log file {name}. {}",
            blktapctl::strerror(errno)
        );
        errno
    })
}

/// Reads the 48-byte header at the file's current position.
fn read_header(file: &mut File, name: &str, io: &mut Io<'_>) -> Result<LogHeader, Status> {
    let mut bytes = [0u8; HEADER_LEN];
    match file.read_exact(&mut bytes) {
        Ok(()) => LogHeader::parse(&bytes).map_err(|_| EIO),
        Err(_) => {
            let _ = writeln!(io.err, "Failed to read CBT metadata from file {name}");
            Err(EIO)
        }
    }
}

/// Reads the bitmap of a `size`-byte disk at the file's current position; `what` is the
/// message for a short read (as in C, a bitmap of no bytes counts as one).
fn read_bitmap(file: &mut File, size: u64, what: &str, io: &mut Io<'_>) -> Result<Vec<u8>, Status> {
    let len = bitmap_len(size);
    let mut bytes = Vec::new();
    let complete = file.take(len).read_to_end(&mut bytes).is_ok() && bytes.len() as u64 == len;
    if !complete || len == 0 {
        let _ = writeln!(io.err, "{what}");
        return Err(EIO);
    }
    Ok(bytes)
}

/// Writes `bytes` at `offset`; `what` is the message for a failure.
fn write_at(
    file: &mut File,
    offset: u64,
    bytes: &[u8],
    what: &str,
    io: &mut Io<'_>,
) -> Result<(), Status> {
    let written = file
        .seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(bytes));
    written.map_err(|_| {
        let _ = writeln!(io.err, "{what}");
        EIO
    })
}

const CREATE_USAGE: &str = "cbt-util create: make a new changed-block-tracking log \
(nothing changed yet)\n\n\
Options:\n\
\t-n Log file name (an existing file is overwritten)\n\
\t-s Size of the disk in bytes\n\
\t[-h help]\n";

/// `create -n FILE -s BYTES`: a new log, no parent or child, not consistent, nothing changed.
pub fn create(args: &[String], io: &mut Io<'_>) -> Status {
    let Ok(found) = options("create", args, io) else {
        return usage(io, CREATE_USAGE);
    };
    let mut name = None;
    let mut size = 0;
    for (letter, value) in found {
        let value = value.unwrap_or_default();
        match letter {
            'n' => name = Some(value),
            _ => size = c_strtoull(&value),
        }
    }
    let Some(name) = name.filter(|_| size != 0) else {
        return usage(io, CREATE_USAGE);
    };
    let mut file = match open(&name, "w+", io) {
        Ok(file) => file,
        Err(status) => return status,
    };
    let header = LogHeader::new(size).encode();
    if let Err(status) = write_at(
        &mut file,
        0,
        &header,
        &format!("Failed to write metadata to log file {name}"),
        io,
    ) {
        return status;
    }
    match write_zeros(&mut file, bitmap_len(size)) {
        Ok(()) => 0,
        Err(_) => {
            let _ = writeln!(io.err, "Failed to write bitmap to log file {name}");
            EIO
        }
    }
}

/// Writes `len` zero bytes at the file's position, a chunk at a time (a file or a volume).
fn write_zeros(file: &mut File, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
    let mut left = len;
    while left > 0 {
        let step = left.min(CHUNK);
        file.write_all(&zeros[..usize::try_from(step).unwrap_or(zeros.len())])?;
        left -= step;
    }
    file.flush()
}

const GET_USAGE: &str = "cbt-util get: print one field of a log\n\n\
Options:\n\
 -n name\tLog file name\n\
[-p]\t\tThe parent log's UUID\n\
[-c]\t\tThe child log's UUID\n\
[-f]\t\tThe consistency flag\n\
[-s]\t\tThe disk size in bytes\n\
[-b]\t\tThe bitmap, raw bytes\n\
[-h]\t\thelp\n";

/// `get -n FILE` and exactly one of `-p -c -f -s -b`.
pub fn get(args: &[String], io: &mut Io<'_>) -> Status {
    let Ok(found) = options("get", args, io) else {
        return usage(io, GET_USAGE);
    };
    let mut name = None;
    let mut fields = std::collections::BTreeSet::new();
    for (letter, value) in found {
        match letter {
            'n' => name = value,
            field => {
                fields.insert(field);
            }
        }
    }
    let (Some(name), 1) = (name, fields.len()) else {
        return usage(io, GET_USAGE);
    };
    let mut file = match open(&name, "r", io) {
        Ok(file) => file,
        Err(status) => return status,
    };
    let header = match read_header(&mut file, &name, io) {
        Ok(header) => header,
        Err(status) => return status,
    };
    let _ = match fields.first() {
        Some('p') => writeln!(io.out, "{}", vhd::create::format_uuid(&header.parent)),
        Some('c') => writeln!(io.out, "{}", vhd::create::format_uuid(&header.child)),
        Some('f') => writeln!(io.out, "{}", header.consistent),
        Some('s') => writeln!(io.out, "{}", header.size),
        _ => {
            let what = format!("Failed to read bitmap from file {name}");
            match read_bitmap(&mut file, header.size, &what, io) {
                Ok(bitmap) => io.out.write_all(&bitmap),
                Err(status) => return status,
            }
        }
    };
    0
}

const SET_USAGE: &str = "cbt-util set: change fields of a log\n\n\
Options:\n\
 -n name\tLog file name\n\
[-p parent]\tThe parent log's UUID\n\
[-c child]\tThe child log's UUID\n\
[-f 0|1]\tThe consistency flag\n\
[-s size]\tThe disk size in bytes (no smaller than now; the bitmap grows)\n\
[-h]\t\thelp\n";

/// `set -n FILE` with any of `-p UUID -c UUID -f FLAG -s BYTES`. A UUID that does not parse
/// leaves its field as it was; `-s 0` counts as absent.
pub fn set(args: &[String], io: &mut Io<'_>) -> Status {
    let Ok(found) = options("set", args, io) else {
        return usage(io, SET_USAGE);
    };
    let (mut name, mut parent, mut child, mut flag, mut size) = (None, None, None, None, 0);
    for (letter, value) in found {
        let value = value.unwrap_or_default();
        match letter {
            'n' => name = Some(value),
            'p' => parent = Some(value),
            'c' => child = Some(value),
            'f' => flag = Some(c_atoi(&value)),
            _ => size = c_strtoull(&value),
        }
    }
    let asked = parent.is_some() || child.is_some() || flag.is_some() || size != 0;
    let (Some(name), true) = (name, asked) else {
        return usage(io, SET_USAGE);
    };
    let mut file = match open(&name, "r+", io) {
        Ok(file) => file,
        Err(status) => return status,
    };
    let mut header = match read_header(&mut file, &name, io) {
        Ok(header) => header,
        Err(status) => return status,
    };
    if let Some(uuid) = parent.as_deref().and_then(parse_uuid) {
        header.parent = uuid;
    }
    if let Some(uuid) = child.as_deref().and_then(parse_uuid) {
        header.child = uuid;
    }
    if let Some(flag) = flag {
        header.consistent = flag;
    }
    if size != 0 {
        if size < header.size {
            let _ = writeln!(
                io.err,
                "Size smaller than current file size ({})",
                header.size
            );
            return EINVAL;
        }
        let what = format!("Failed to read bitmap from file {name}");
        let mut bitmap = match read_bitmap(&mut file, header.size, &what, io) {
            Ok(bitmap) => bitmap,
            Err(status) => return status,
        };
        let Ok(len) = usize::try_from(bitmap_len(size)) else {
            return EIO;
        };
        bitmap.resize(len, 0);
        let what = format!("Failed to write CBT bitmap to file {name}");
        if let Err(status) = write_at(&mut file, HEADER_LEN as u64, &bitmap, &what, io) {
            return status;
        }
        header.size = size;
    }
    let what = format!("Failed to write CBT metadata to file {name}");
    match write_at(&mut file, 0, &header.encode(), &what, io) {
        Ok(()) => 0,
        Err(status) => status,
    }
}

const COALESCE_USAGE: &str = "cbt-util coalesce: merge a parent log's bitmap into its child's\n\n\
Options:\n\
\t-p Parent log file name (read only)\n\
\t-c Child log file name (its bitmap gains the parent's bits)\n\
\t[-h help]\n";

/// `coalesce -p PARENT -c CHILD`: the child's bitmap becomes child OR parent; headers stay.
pub fn coalesce(args: &[String], io: &mut Io<'_>) -> Status {
    let Ok(found) = options("coalesce", args, io) else {
        return usage(io, COALESCE_USAGE);
    };
    let (mut parent, mut child) = (None, None);
    for (letter, value) in found {
        match letter {
            'p' => parent = value,
            _ => child = value,
        }
    }
    let (Some(parent), Some(child)) = (parent, child) else {
        return usage(io, COALESCE_USAGE);
    };
    let result = (|| {
        let mut parent_file = open(&parent, "r", io)?;
        let parent_header = read_header(&mut parent_file, &parent, io)?;
        let mut child_file = open(&child, "r+", io)?;
        let child_header = read_header(&mut child_file, &child, io)?;
        if bitmap_len(parent_header.size) > bitmap_len(child_header.size) {
            // The C tool prints this without a newline.
            let _ = write!(
                io.err,
                "Parent bitmap larger than child bitmap,can't coalesce"
            );
            return Err(EINVAL);
        }
        let older = read_bitmap(
            &mut parent_file,
            parent_header.size,
            "Failed to read bitmap",
            io,
        )?;
        let mut newer = read_bitmap(
            &mut child_file,
            child_header.size,
            "Failed to read bitmap",
            io,
        )?;
        for (mine, theirs) in newer.iter_mut().zip(&older) {
            *mine |= theirs;
        }
        let what = format!("Failed to write bitmap to log file {child}");
        write_at(&mut child_file, HEADER_LEN as u64, &newer, &what, io)
    })();
    result.err().unwrap_or(0)
}

const EXTENTS_USAGE: &str = "cbt-util extents: print which parts of the disk changed, as JSON\n\n\
The output has the shape of `nbdinfo --map --json` on the qemu:dirty-bitmap:cbt context of a\n\
running disk: [{ \"offset\": BYTES, \"length\": BYTES, \"type\": 1, \"description\": \"dirty\" },\n\
...] covering the whole disk, type 1 (dirty) for changed 64 KiB blocks, 0 (clean) for the rest.\n\n\
Options:\n\
 -n name\tLog file name\n\
[-h]\t\thelp\n";

/// `extents -n FILE` (not in the C tool): the log's extents as JSON.
pub fn extents(args: &[String], io: &mut Io<'_>) -> Status {
    let Ok(found) = options("extents", args, io) else {
        return usage(io, EXTENTS_USAGE);
    };
    let Some(name) = found.into_iter().find_map(|(_, value)| value) else {
        return usage(io, EXTENTS_USAGE);
    };
    let result = (|| {
        let mut file = open(&name, "r", io)?;
        let header = read_header(&mut file, &name, io)?;
        let what = format!("Failed to read bitmap from file {name}");
        let bytes = read_bitmap(&mut file, header.size, &what, io)?;
        let bitmap = cbt::Bitmap::from_bytes(header.size, &bytes).map_err(|_| EIO)?;
        Ok(bitmap.extents(header.size))
    })();
    match result {
        Ok(extents) => {
            let _ = io.out.write_all(extents_json(&extents).as_bytes());
            0
        }
        Err(status) => status,
    }
}

/// Extents as `nbdinfo --map --json` prints a `qemu:dirty-bitmap:` context, one per line.
fn extents_json(extents: &[cbt::Extent]) -> String {
    let items: Vec<String> = extents
        .iter()
        .map(|extent| {
            let (kind, description) = if extent.changed {
                (1, "dirty")
            } else {
                (0, "clean")
            };
            format!(
                "{{ \"offset\": {}, \"length\": {}, \"type\": {kind}, \"description\": \"{description}\" }}",
                extent.offset, extent.length
            )
        })
        .collect();
    if items.is_empty() {
        return "[]\n".to_owned();
    }
    format!("[\n{}\n]\n", items.join(",\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_page_documents_exactly_the_accepted_options() {
        let page = include_str!("../../../docs/man/cbt-util.8");
        if let Err(problems) = getopt::manual::check_page(page, &OPTION_SPECS, &['h']) {
            panic!("docs/man/cbt-util.8 and the code disagree:\n{problems}");
        }
    }
}
