//! Fuzz target: VHD metadata parsing and `check` over an in-memory image.
//! The input is used raw (structure parsers) and as a whole image file
//! (check, open for inspection, which skips the layout validation, sector mapping and a
//! small read), none of which may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::bat::Bat;
use vhd::batmap::BatmapHeader;
use vhd::check::{check, CheckOptions};
use vhd::footer::Footer;
use vhd::header::DynamicHeader;
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::MemFile;

fuzz_target!(|data: &[u8]| {
    let _ = Footer::parse(data, 0);
    let _ = DynamicHeader::parse(data, 0);
    let _ = BatmapHeader::parse(data, 0);
    let _ = Bat::parse(data, data.len() / 4, 0);
    let _ = vhd::journal::JournalHeader::parse(data);
    if data.len() > (8 << 20) {
        return;
    }
    let opts = CheckOptions {
        check_bitmaps: true,
        ..CheckOptions::default()
    };
    let _ = check(MemFile::new(data.to_vec()), "fuzz", None, &opts);
    if let Ok(img) = VhdImage::open(MemFile::new(data.to_vec()), "fuzz", OpenOptions::inspect()) {
        let n = img.total_sectors().min(1 << 16);
        let _ = img.map(0, n);
        let mut buf = vec![0u8; 4096];
        if n >= 8 {
            let _ = img.read_sectors(0, &mut buf);
        }
        let _ = img.parent_locator_paths();
    }
});
