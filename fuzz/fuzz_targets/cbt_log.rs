//! Fuzz target: CBT log files. Parsing arbitrary bytes as a log never panics and never
//! allocates more than the input holds; a log that parses encodes back to the bytes it was
//! read from, and its extents tile the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cbt::LogHeader::parse(data);
    let Ok(log) = cbt::LogFile::parse(data) else {
        return;
    };
    let bytes = log.to_bytes();
    assert_eq!(bytes[..], data[..bytes.len()]);
    let size = log.header.size;
    // Extents cost one step per block at worst: keep the disks small enough to walk.
    if cbt::block_count(size) > 1 << 20 {
        return;
    }
    let mut at = 0;
    for extent in log.bitmap.extents(size) {
        assert_eq!(extent.offset, at);
        assert!(extent.length > 0);
        at += extent.length;
    }
    assert_eq!(at, size);
    let mut grown = log.bitmap.clone();
    let _ = grown.grow(size.saturating_add(1 << 20));
    assert!(grown.absorb(&log.bitmap).is_ok());
});
