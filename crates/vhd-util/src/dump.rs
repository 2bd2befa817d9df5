//! `vhd-util read`: the metadata dumper. Header summaries (`-p`, also what
//! `check` prints for an invalid image), sector translation (`-t`), BAT
//! entries (`-b`) and the BAT as a bitmap (`-B`), block bitmaps (`-m`),
//! bitmap tests (`-i`), allocated extents (`-e`), the batmap (`-a`, `-j`),
//! block data (`-d`) and data through the chain by sector (`-r`) or byte
//! (`-R`); `-c` counts units, `-x` prints numbers in hex. Binary dumps
//! (`-B`, `-m`, `-a`, `-d`, `-r`, `-R`) go to stdout unformatted, as the C
//! tool writes them.

use std::io::Write;
use std::path::Path;

use vhd::bat::BAT_UNUSED;
use vhd::chain::Chain;
use vhd::footer::{Footer, FOOTER_SIZE, VHD_EPOCH_OFFSET};
use vhd::header::DynamicHeader;
use vhd::image::{OpenOptions, VhdImage, SECTOR};
use vhd::io::{BlockFile, Opener, StdOpener};
use vhd::locator::PlatformCode;
use vhd::VhdError;

use crate::getopt::getopt;

const EINVAL: i32 = 22;
const ERANGE: i32 = 34;

const USAGE: &str = "options:\n\
-h          help\n\
-n          name\n\
-p          print VHD headers\n\
-t sec      translate logical sector to VHD location\n\
-b blk      print bat entry\n\
-B          print entire bat as a bitmap\n\
-m blk      print bitmap\n\
-i sec      test bitmap for logical sector\n\
-e sec      output extent list of allocated logical sectors\n\
-a          print batmap\n\
-j blk      test batmap for block\n\
-d blk      print data\n\
-c num      num units\n\
-r sec      read num sectors at sec\n\
-R byte     read num bytes at byte\n\
-x          print in hex";

/// A number as the C tool prints it: decimal, or `%#x` with `-x` (which
/// prints zero as plain `0`).
fn conv(hex: bool, v: u64) -> String {
    if hex && v != 0 {
        format!("{v:#x}")
    } else {
        v.to_string()
    }
}

/// `ctime`-style text (UTC) of a VHD timestamp (seconds since 2000-01-01).
pub fn vhd_time_string(ts: u32) -> String {
    let unix = VHD_EPOCH_OFFSET + u64::from(ts);
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let weekday = WEEKDAYS[usize::try_from(days % 7).unwrap_or(0)];
    let month_name = MONTHS[usize::try_from(month - 1).unwrap_or(0)];
    format!(
        "{weekday} {month_name} {day:>2} {:02}:{:02}:{:02} {year}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn format_uuid(u: &[u8; 16]) -> String {
    vhd::create::format_uuid(u)
}

fn good(stored: u32, computed: u32) -> String {
    format!(
        "{stored:#x}|{computed:#x} ({})",
        if stored == computed { "Good!" } else { "Bad!" }
    )
}

fn print_footer(f: &Footer, hex: bool) {
    println!("VHD Footer Summary:\n-------------------");
    let cookie = if f.poisoned { "v_poison" } else { "conectix" };
    println!("Cookie              : {cookie}");
    println!(
        "Features            : (0x{:08x}) {}{}",
        f.features,
        if f.features & 1 != 0 { "<TEMP>" } else { "" },
        if f.features & 2 != 0 { "<RESV>" } else { "" }
    );
    println!(
        "File format version : Major: {}, Minor: {}",
        f.file_format_version >> 16,
        f.file_format_version & 0xffff
    );
    println!("Data offset         : {}", conv(hex, f.data_offset));
    println!("Timestamp           : {}", vhd_time_string(f.timestamp));
    let creator: String = f
        .creator_app
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| char::from(b))
        .collect();
    println!("Creator Application : '{creator}'");
    println!(
        "Creator version     : Major: {}, Minor: {}",
        f.creator_version >> 16,
        f.creator_version & 0xffff
    );
    let os = match f.creator_os {
        0x5769_326b => "Windows",
        0x4d61_6320 => "Macintosh",
        _ => "Unknown!",
    };
    println!("Creator OS          : {os}");
    println!(
        "Original disk size  : {} MB ({} Bytes)",
        conv(hex, f.original_size >> 20),
        conv(hex, f.original_size)
    );
    println!(
        "Current disk size   : {} MB ({} Bytes)",
        conv(hex, f.current_size >> 20),
        conv(hex, f.current_size)
    );
    let g = f.geometry;
    let (c, h, s) = (
        u64::from(g.cylinders),
        u64::from(g.heads),
        u64::from(g.sectors_per_track),
    );
    println!(
        "Geometry            : Cyl: {}, Hds: {}, Sctrs: {}",
        conv(hex, c),
        conv(hex, h),
        conv(hex, s)
    );
    println!(
        "                    : = {} MB ({} Bytes)",
        conv(hex, (c * h * s) >> 11),
        conv(hex, (c * h * s) << 9)
    );
    let kind = match f.disk_type {
        0 => "None",
        2 => "Fixed hard disk",
        3 => "Dynamic hard disk",
        4 => "Differencing hard disk",
        1 | 5 | 6 => "Reserved (deprecated)",
        _ => "Unknown type!\n",
    };
    println!("Disk type           : {kind}");
    println!(
        "Checksum            : {}",
        good(f.checksum, f.compute_checksum())
    );
    println!("UUID                : {}", format_uuid(&f.uuid));
    println!(
        "Saved state         : {}",
        if f.saved_state == 0 { "No" } else { "Yes" }
    );
    println!("Hidden              : {}", f.hidden);
    println!();
}

fn print_header(h: &DynamicHeader, hex: bool) {
    println!("VHD Header Summary:\n-------------------");
    println!("Cookie              : cxsparse");
    println!("Data offset (unusd) : {}", conv(hex, h.data_offset));
    println!("Table offset        : {}", conv(hex, h.table_offset));
    println!("Header version      : 0x{:08x}", h.header_version);
    println!(
        "Max BAT size        : {}",
        conv(hex, u64::from(h.max_table_entries))
    );
    println!(
        "Block size          : {} ({} MB)",
        conv(hex, u64::from(h.block_size)),
        conv(hex, u64::from(h.block_size >> 20))
    );
    println!(
        "Parent name         : {}",
        h.parent_name()
            .unwrap_or_else(|_| "failed to read name".into())
    );
    println!("Parent UUID         : {}", format_uuid(&h.parent_uuid));
    println!(
        "Parent timestamp    : {}",
        vhd_time_string(h.parent_timestamp)
    );
    let mut fresh = h.clone();
    fresh.update_checksum();
    println!("Checksum            : {}", good(h.checksum, fresh.checksum));
    println!();
}

fn code_name(code: u32) -> &'static str {
    match PlatformCode::from_code(code) {
        Some(PlatformCode::None) => "PLAT_CODE_NONE",
        Some(PlatformCode::Wi2r) => "PLAT_CODE_WI2R",
        Some(PlatformCode::Wi2k) => "PLAT_CODE_WI2K",
        Some(PlatformCode::W2ru) => "PLAT_CODE_W2RU",
        Some(PlatformCode::W2ku) => "PLAT_CODE_W2KU",
        Some(PlatformCode::Mac) => "PLAT_CODE_MAC",
        Some(PlatformCode::Macx) => "PLAT_CODE_MACX",
        None => "UNKOWN",
    }
}

/// Prints the footer, header, parent locators and batmap summaries
/// (`read -p`).
pub fn print_headers<F: BlockFile>(img: &VhdImage<F>, hex: bool) {
    print_footer(img.footer(), hex);
    let Some(h) = img.header() else {
        return;
    };
    print_header(h, hex);
    if img.has_parent() {
        println!("VHD Parent Locators:\n--------------------");
        let decoded = img.parent_locator_paths();
        for (i, loc) in h.locators.iter().enumerate() {
            if loc.code == 0 {
                continue;
            }
            println!("locator:            : {i}");
            println!("       code         : {}", code_name(loc.code));
            println!(
                "       data_space   : {}",
                conv(hex, u64::from(loc.data_space))
            );
            println!(
                "       data_length  : {}",
                conv(hex, u64::from(loc.data_len))
            );
            println!("       data_offset  : {}", conv(hex, loc.data_offset));
            match decoded.iter().find(|(slot, _, _)| *slot == i) {
                Some((_, _, Ok(p))) => println!("       decoded name : {p}"),
                _ => println!("failed to read parent name"),
            }
            println!();
        }
    }
    if img.footer().expects_batmap() {
        match img.batmap() {
            Some(b) => {
                println!("VHD Batmap Summary:\n-------------------");
                println!(
                    "Batmap offset       : {}",
                    conv(hex, b.header.batmap_offset)
                );
                println!(
                    "Batmap size (secs)  : {}",
                    conv(hex, u64::from(b.header.batmap_size))
                );
                println!("Batmap version      : 0x{:08x}", b.header.batmap_version);
                let sum = vhd::batmap::batmap_checksum(&b.map, b.header.batmap_version);
                println!("Checksum            : {}", good(b.header.checksum, sum));
                println!();
            }
            None => println!("failed to get batmap header"),
        }
    }
}

fn open(name: &str) -> vhd::Result<VhdImage<std::fs::File>> {
    let f = StdOpener
        .open(Path::new(name), false)
        .map_err(|e| VhdError::io(format!("{name}: open"), e))?;
    VhdImage::open(f, name, OpenOptions::inspect())
}

/// What `read -p -n NAME` prints; also used by `check` for invalid images.
/// When the image cannot be opened, whatever footer and header parse are
/// dumped.
pub fn dump_headers(name: &str, hex: bool) -> i32 {
    match open(name) {
        Ok(img) => {
            print_headers(&img, hex);
            0
        }
        Err(e) => {
            println!("Failed to open {name}: {}", -e.errno());
            dump_raw_headers(name, hex);
            e.errno()
        }
    }
}

/// Best-effort dump of a damaged image: primary footer (else the backup
/// copy) and the header it points at, without validation.
fn dump_raw_headers(name: &str, hex: bool) {
    println!("\n{name} appears invalid; dumping headers\n");
    let Ok(f) = StdOpener.open(Path::new(name), false) else {
        return;
    };
    let len = f.len().unwrap_or(0);
    let mut b = [0u8; FOOTER_SIZE];
    let footer = [len.saturating_sub(FOOTER_SIZE as u64), 0]
        .into_iter()
        .find_map(|off| {
            f.read_at(&mut b, off).ok()?;
            Footer::parse(&b, off).ok()
        });
    let Some(footer) = footer else {
        return;
    };
    print_footer(&footer, hex);
    let mut hb = vec![0u8; vhd::header::HEADER_SIZE];
    if f.read_at(&mut hb, footer.data_offset).is_ok() {
        if let Ok(h) = DynamicHeader::parse(&hb, footer.data_offset) {
            print_header(&h, hex);
        }
    }
}

fn out(bytes: &[u8]) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(bytes);
    let _ = o.flush();
}

/// The `read` command.
#[allow(clippy::too_many_lines)] // one branch per option, in the C order
pub fn read(args: &[String]) -> i32 {
    let p = match getopt(args, crate::option_spec("read")) {
        Ok(p) if !p.has('h') => p,
        _ => {
            println!("{USAGE}");
            return EINVAL;
        }
    };
    let Some(name) = p.value('n') else {
        println!("{USAGE}");
        return EINVAL;
    };
    if !p.operands.is_empty() {
        println!("{USAGE}");
        return EINVAL;
    }
    let mut nums = std::collections::HashMap::new();
    for c in ['t', 'b', 'm', 'i', 'e', 'j', 'd', 'r', 'R', 'c'] {
        if let Some(v) = p.value(c) {
            match v.parse::<u64>() {
                Ok(n) => {
                    nums.insert(c, n);
                }
                Err(_) => {
                    println!("{USAGE}");
                    return EINVAL;
                }
            }
        }
    }
    let hex = p.has('x');
    let count = nums.get(&'c').copied().unwrap_or(1);
    let img = match open(name) {
        Ok(i) => i,
        Err(e) => {
            println!("Failed to open {name}: {}", -e.errno());
            dump_raw_headers(name, hex);
            return e.errno();
        }
    };
    if p.has('p') {
        print_headers(&img, hex);
    }
    let spb = img.sectors_per_block().max(1);
    let total = img.total_sectors();
    let max_bat = img.header().map_or(0, |h| u64::from(h.max_table_entries));
    let entry = |b: u64| img.bat().get(b).filter(|&e| e != BAT_UNUSED);
    let block_range = |b: u64| -> Result<(), i32> {
        if b.saturating_add(count) > max_bat {
            eprintln!("block {} past end of file", conv(hex, b + count));
            Err(ERANGE)
        } else {
            Ok(())
        }
    };
    let sector_range = |s: u64| s.checked_add(count).is_some_and(|e| e <= total);
    // Present bit of a sector of this file (bitmap bit of an allocated block).
    let present = |sector: u64| -> vhd::Result<bool> {
        match entry(sector / spb) {
            None => Ok(false),
            Some(e) => Ok(img.read_bitmap_at(u64::from(e) * SECTOR)?.get(sector % spb)),
        }
    };
    if let Some(&sec) = nums.get(&'t') {
        if !sector_range(sec) {
            eprintln!("sector {} past end of file", conv(hex, sec + count));
            return ERANGE;
        }
        for cur in sec..sec + count {
            let (blk, lsec) = (cur / spb, cur % spb);
            let off = entry(blk).map_or_else(
                || "not allocated".to_string(),
                |e| {
                    conv(
                        hex,
                        u64::from(e) * SECTOR + img.bitmap_bytes() + lsec * SECTOR,
                    )
                },
            );
            println!(
                "logical sector {}: block number: {}, sector offset: {}, file offset: {off}",
                conv(hex, cur),
                conv(hex, blk),
                conv(hex, lsec)
            );
        }
    }
    if let Some(&b) = nums.get(&'b') {
        if let Err(e) = block_range(b) {
            return e;
        }
        for cur in b..b + count {
            let off = entry(cur).map_or_else(
                || "not allocated".to_string(),
                |e| conv(hex, u64::from(e) * SECTOR),
            );
            println!("block: {}: offset: {off}", conv(hex, cur));
        }
    }
    if p.has('B') {
        if !img.disk_type().is_sparse() {
            // A fixed disk has no BAT (the C tool's line and status).
            println!("Failed to get bat for {name}: -{EINVAL}");
            return EINVAL;
        }
        let blocks = img.virtual_size() / img.block_size().max(1);
        let mut map = vec![0u8; usize::try_from(blocks.div_ceil(8)).unwrap_or(0)];
        for b in 0..blocks {
            if entry(b).is_some() {
                vhd::bitmap::set_bit(&mut map, b);
            }
        }
        out(&map);
    }
    if let Some(&b) = nums.get(&'m') {
        if let Err(e) = block_range(b) {
            return e;
        }
        for cur in b..b + count {
            match entry(cur) {
                None => println!("block {} not allocated", conv(hex, cur)),
                Some(e) => match img.read_bitmap_at(u64::from(e) * SECTOR) {
                    Ok(bm) => out(bm.as_bytes()),
                    Err(err) => return err.errno(),
                },
            }
        }
    }
    if let Some(&sec) = nums.get(&'i') {
        if !sector_range(sec) {
            println!("sector {} past end of file", conv(hex, sec));
            return ERANGE;
        }
        for cur in sec..sec + count {
            let bit = match present(cur) {
                Ok(b) => u8::from(b),
                Err(e) => return e.errno(),
            };
            println!(
                "block {}: sec: {}: {bit}",
                conv(hex, cur / spb),
                conv(hex, cur % spb)
            );
        }
    }
    if let Some(&sec) = nums.get(&'e') {
        if !sector_range(sec) {
            println!("sector {} past end of file", conv(hex, sec));
            return ERANGE;
        }
        let mut run: Option<(u64, u64)> = None;
        for cur in sec..sec + count {
            let bit = match present(cur) {
                Ok(b) => b,
                Err(e) => return e.errno(),
            };
            run = match (run, bit) {
                (Some((s, n)), true) => Some((s, n + 1)),
                (None, true) => Some((cur, 1)),
                (Some((s, n)), false) => {
                    println!("{} {}", conv(hex, s), conv(hex, n));
                    None
                }
                (None, false) => None,
            };
        }
        if let Some((s, n)) = run {
            println!("{} {}", conv(hex, s), conv(hex, n));
        }
    }
    if p.has('a') {
        match img.batmap() {
            Some(b) => out(&b.map),
            None => {
                println!("failed to read batmap: -{EINVAL}");
                return EINVAL;
            }
        }
    }
    if let Some(&b) = nums.get(&'j') {
        if let Err(e) = block_range(b) {
            return e;
        }
        let Some(map) = img.batmap() else {
            eprintln!("failed to get batmap");
            return EINVAL;
        };
        for cur in b..b + count {
            eprintln!(
                "batmap for block {}: {}",
                conv(hex, cur),
                u8::from(map.is_full(cur))
            );
        }
    }
    if let Some(&b) = nums.get(&'d') {
        if let Err(e) = block_range(b) {
            return e;
        }
        let mut buf = vec![0u8; usize::try_from(img.block_size()).unwrap_or(0)];
        for cur in b..b + count {
            match entry(cur) {
                None => println!("block {} not allocated", conv(hex, cur)),
                Some(e) => {
                    let at = u64::from(e) * SECTOR + img.bitmap_bytes();
                    if let Err(err) = img.file().read_at(&mut buf, at) {
                        return err.raw_os_error().unwrap_or(5);
                    }
                    out(&buf);
                }
            }
        }
    }
    let sector_read = nums.get(&'r').map(|&s| (s * SECTOR, count * SECTOR));
    let byte_read = nums.get(&'R').map(|&b| (b, count));
    for (start, len) in [sector_read, byte_read].into_iter().flatten() {
        if start
            .checked_add(len)
            .is_none_or(|e| e > img.virtual_size())
        {
            return ERANGE;
        }
        let chain = match Chain::open(Path::new(name), false) {
            Ok(c) => c,
            Err(e) => return e.errno(),
        };
        if let Err(e) = read_bytes(&chain, start, len) {
            return e.errno();
        }
    }
    0
}

/// Writes `len` bytes at byte offset `start` of the chain's virtual disk to
/// stdout, a block at a time.
fn read_bytes(chain: &Chain<std::fs::File>, start: u64, len: u64) -> vhd::Result<()> {
    const STEP: u64 = 2 << 20;
    let mut buf = Vec::new();
    let mut at = start;
    let end = start + len;
    while at < end {
        let first = at / SECTOR;
        let last = (end.min(at + STEP)).div_ceil(SECTOR);
        buf.resize(usize::try_from((last - first) * SECTOR).unwrap_or(0), 0);
        chain.read(first, &mut buf)?;
        let skip = usize::try_from(at - first * SECTOR).unwrap_or(0);
        let take = usize::try_from(end.min(last * SECTOR) - at).unwrap_or(0);
        out(&buf[skip..skip + take]);
        at += take as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctime_format() {
        assert_eq!(vhd_time_string(0), "Sat Jan  1 00:00:00 2000");
        // 2024-02-29 12:34:56 UTC.
        let unix = 1_709_210_096u64;
        let ts = u32::try_from(unix - VHD_EPOCH_OFFSET).unwrap();
        assert_eq!(vhd_time_string(ts), "Thu Feb 29 12:34:56 2024");
    }

    #[test]
    fn conv_matches_printf() {
        assert_eq!(conv(true, 0), "0");
        assert_eq!(conv(true, 255), "0xff");
        assert_eq!(conv(false, 255), "255");
    }
}
