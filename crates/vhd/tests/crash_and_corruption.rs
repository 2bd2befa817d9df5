//! Crash injection (a simulated kill after every possible number of writes
//! during journaled resize and coalesce) and corruption injection (each
//! damage `check` must name), plus "parsing never panics" properties.

// Test images are a few MiB: sizes and offsets always fit in usize/u8.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vhd::bat::Bat;
use vhd::batmap::BatmapHeader;
use vhd::bitmap;
use vhd::check::{check, check_path, CheckOptions};
use vhd::create::{create_file, snapshot, CreateOptions, SnapshotOptions};
use vhd::footer::Footer;
use vhd::header::DynamicHeader;
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{BlockFile, CrashBudget, FaultOpener, MemFile, StdOpener};
use vhd::{ops, Chain};

const SIZE: u64 = 8 << 20;

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| seed.wrapping_add((i % 253) as u8)).collect()
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; chain.leaf().virtual_size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

fn valid(p: &Path) -> Result<(), String> {
    check_path(p, &CheckOptions::default())
        .map(|_| ())
        .map_err(|e| e.message)
}

fn open_rw(p: &Path) -> VhdImage<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    VhdImage::open(f, &p.display().to_string(), OpenOptions::read_write()).unwrap()
}

/// base (data) <- child (data), returns (base, child, chain data).
fn pair(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.vhd");
    let child = dir.join("child.vhd");
    let mut img = create_file(&base, &CreateOptions::dynamic(SIZE)).unwrap();
    img.write_sectors(0, &pattern(1, 3 << 20)).unwrap();
    drop(img);
    snapshot(&child, &base, &SnapshotOptions::default()).unwrap();
    let mut c = Chain::open(&child, true).unwrap();
    c.write(2048, &pattern(2, 4 << 20)).unwrap();
    c.write(15000, &pattern(3, 7 * 512)).unwrap();
    drop(c);
    let data = read_all(&child);
    (base, child, data)
}

#[test]
fn crash_during_journaled_resize_is_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, child, before) = pair(dir.path());
    let template = std::fs::read(&child).unwrap();
    let journal = dir.path().join("child.journal");
    let mut completed = false;
    let mut reverted = 0;
    for budget in 0..500 {
        std::fs::write(&child, &template).unwrap();
        let _ = std::fs::remove_file(&journal);
        let opener = FaultOpener {
            budget: CrashBudget::new(budget),
        };
        let r = ops::resize_journaled(&opener, &child, 300 << 20, &journal);
        if r.is_ok() {
            completed = true;
        }
        match valid(&child) {
            Ok(()) => {
                let after = read_all(&child);
                assert_eq!(&after[..SIZE as usize], &before[..], "budget {budget}");
            }
            Err(msg) => {
                assert!(
                    journal.exists(),
                    "budget {budget}: invalid ({msg}) and no journal"
                );
                ops::revert_path(&child, &journal).unwrap();
                reverted += 1;
                valid(&child).unwrap_or_else(|m| panic!("budget {budget}: after revert: {m}"));
                assert_eq!(read_all(&child), before, "budget {budget}");
            }
        }
        if completed {
            break;
        }
    }
    assert!(completed, "resize never completed");
    assert!(reverted > 3, "crash points never hit the journaled window");
}

#[test]
fn crash_during_coalesce_keeps_both_images_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, before) = pair(dir.path());
    let base_template = std::fs::read(&base).unwrap();
    let mut completed = false;
    for budget in 0..500 {
        std::fs::write(&base, &base_template).unwrap();
        let opener = FaultOpener {
            budget: CrashBudget::new(budget),
        };
        completed = ops::coalesce(&opener, &child, false, None).is_ok();
        valid(&base).unwrap_or_else(|m| panic!("budget {budget}: parent: {m}"));
        valid(&child).unwrap_or_else(|m| panic!("budget {budget}: child: {m}"));
        assert_eq!(read_all(&child), before, "budget {budget}");
        if completed {
            assert_eq!(read_all(&base), before);
            break;
        }
    }
    assert!(completed);
}

fn expect_failure(p: &Path, needle: &str) {
    match valid(p) {
        Ok(()) => panic!("{} passed check, expected '{needle}'", p.display()),
        Err(m) => assert!(m.contains(needle), "expected '{needle}', got '{m}'"),
    }
}

fn patch(p: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    BlockFile::write_at(&f, bytes, offset).unwrap();
}

#[test]
fn check_catches_injected_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = |name: &str| -> (PathBuf, PathBuf) {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let (b, c, _) = pair(&d);
        valid(&c).unwrap();
        (b, c)
    };

    // Bad footer checksum.
    let (_, c) = fresh("a");
    let len = std::fs::metadata(&c).unwrap().len();
    patch(&c, len - 512 + 64, &[0, 0, 0, 0]);
    expect_failure(&c, "primary footer invalid: invalid checksum");

    // Footer / backup mismatch.
    let (_, c) = fresh("b");
    let mut f = Footer::parse(&std::fs::read(&c).unwrap()[..512], 0).unwrap();
    f.timestamp -= 10;
    patch(&c, 0, &f.to_bytes_checked());
    expect_failure(&c, "primary and backup footers do not match");

    // BAT entry overlapping metadata.
    let (_, c) = fresh("c");
    let mut img = open_rw(&c);
    let mut bat: Bat = img.bat().clone();
    bat.entries[1] = 3;
    img.set_bat(bat);
    img.write_bat().unwrap();
    drop(img);
    expect_failure(&c, "block 1 (offset 0x3) clobbers headers");

    // BAT entry past the end.
    let (_, c) = fresh("d");
    let mut img = open_rw(&c);
    let mut bat = img.bat().clone();
    bat.entries[2] = 0x00ff_0000;
    img.set_bat(bat);
    img.write_bat().unwrap();
    drop(img);
    expect_failure(&c, "block 2 (offset 0xff0000) clobbers footer");

    // Two blocks at the same place.
    let (_, c) = fresh("e");
    let mut img = open_rw(&c);
    let mut bat = img.bat().clone();
    bat.entries[3] = bat.entries[1];
    img.set_bat(bat);
    img.write_bat().unwrap();
    drop(img);
    expect_failure(&c, "clobbers block");

    // Batmap claiming a partially written block full (block 3 has 7 sectors).
    let (_, c) = fresh("f");
    let mut img = open_rw(&c);
    let mut bm = img.batmap().cloned().unwrap();
    bitmap::set_bit(&mut bm.map, 3);
    img.set_batmap(Some(bm));
    img.write_batmap().unwrap();
    drop(img);
    expect_failure(&c, "batmap shows partially allocated block 3 full");

    // Batmap claiming an unallocated block full.
    let (b, _) = fresh("g");
    let mut img = open_rw(&b);
    let mut bm = img.batmap().cloned().unwrap();
    bitmap::set_bit(&mut bm.map, 3);
    img.set_batmap(Some(bm));
    img.write_batmap().unwrap();
    drop(img);
    expect_failure(&b, "batmap shows unallocated block 3 full");

    // Batmap header destroyed (what a qemu write does to tapdisk images).
    let (b, _) = fresh("h");
    let img = open_rw(&b);
    let off = img.batmap_header_offset().unwrap();
    drop(img);
    patch(&b, off, &[0xff; 512]);
    expect_failure(&b, "batmap is invalid: invalid cookie");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&b)
        .unwrap();
    let e = VhdImage::open(f, "b", OpenOptions::read_write()).unwrap_err();
    assert!(e.to_string().contains("batmap"), "{e}");

    // Bad parent locator: payload offset past the end of file.
    let (_, c) = fresh("i");
    let mut img = open_rw(&c);
    img.header_mut().unwrap().locators[0].data_offset = 1 << 40;
    img.write_header().unwrap();
    drop(img);
    expect_failure(&c, "invalid parent locator 0: invalid size");

    // Locator pointing at a missing file.
    let (b, c) = fresh("j");
    std::fs::rename(&b, b.with_extension("moved")).unwrap();
    expect_failure(&c, "points to missing file");

    // Parent UUID mismatch.
    let (b, c) = fresh("k");
    let mut img = open_rw(&b);
    img.footer_mut().uuid = [9; 16];
    img.write_footer().unwrap();
    drop(img);
    expect_failure(&c, "invalid parent uuid");
    assert!(matches!(
        Chain::open(&c, false).unwrap_err(),
        vhd::VhdError::ParentUuidMismatch { .. }
    ));

    // Non-tap header with bad header checksum.
    let (b, _) = fresh("l");
    patch(&b, 512 + 36, &[1, 2, 3, 4]);
    expect_failure(&b, "header is invalid: invalid checksum");
}

#[test]
fn repair_restores_primary_footer_from_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _, _) = pair(dir.path());
    let before = read_all(&b);
    let len = std::fs::metadata(&b).unwrap().len();
    patch(&b, len - 512, &[0u8; 512]);
    assert!(valid(&b).is_err());
    ops::repair(&StdOpener, &b, true).unwrap();
    valid(&b).unwrap();
    assert_eq!(read_all(&b), before);
}

fn valid_image_bytes() -> Vec<u8> {
    let f = MemFile::default();
    let mut img = vhd::create::create(f, "m", &CreateOptions::dynamic(4 << 20), None).unwrap();
    img.write_sectors(5, &pattern(1, 4096)).unwrap();
    img.file().contents()
}

proptest! {
    #[test]
    fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..1100), base in any::<u64>()) {
        let _ = Footer::parse(&b, base);
        let _ = DynamicHeader::parse(&b, base);
        let _ = BatmapHeader::parse(&b, base);
        let _ = Bat::parse(&b, b.len() / 4, base);
        let _ = vhd::journal::JournalHeader::parse(&b);
    }

    #[test]
    fn check_and_open_never_panic_on_mutated_images(
        edits in proptest::collection::vec((0usize..6000, any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..6000),
    ) {
        let mut bytes = valid_image_bytes();
        let n = bytes.len();
        for (at, v) in edits {
            bytes[at % n] = v;
        }
        if let Some(c) = cut {
            bytes.truncate(c);
        }
        let _ = check(MemFile::new(bytes.clone()), "m", None, &CheckOptions::default());
        if let Ok(img) = VhdImage::open(MemFile::new(bytes), "m", OpenOptions::read_only()) {
            let total = img.total_sectors().min(20_000);
            let mut buf = vec![0u8; 512 * 16];
            let _ = img.read_sectors(0, &mut buf[..(total.min(16) * 512) as usize]);
            let _ = img.map(0, total);
        }
    }

    #[test]
    fn footer_and_header_round_trip(size in 1u64..(1 << 40), hidden in 0u8..2, uuid in any::<[u8; 16]>(), entries in 1u32..100_000) {
        let mut f = Footer::new(vhd::DiskType::Dynamic, size * 512, uuid, 1234);
        f.hidden = hidden;
        let b = f.to_bytes_checked();
        prop_assert_eq!(Footer::parse(&b, 0).unwrap(), f);
        let mut h = DynamicHeader::new(1536, entries, 2 << 20);
        h.parent_uuid = uuid;
        h.update_checksum();
        let hb = h.to_bytes();
        prop_assert_eq!(DynamicHeader::parse(&hb, 512).unwrap(), h);
    }
}
