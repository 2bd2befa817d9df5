//! Crash injection (a simulated kill after every possible number of writes
//! during every metadata-moving operation: journaled and fast resize, set
//! hidden/marker, modify, repair, coalesce) and corruption injection (each
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

/// Runs `op` on `image` with a simulated crash after every possible number
/// of writes (0, 1, 2, ... until it completes). After each crash the image
/// must be byte-identical to the old image, byte-identical to the image an
/// uncrashed run produces, or (usually failing `check`) come with a journal
/// from which `revert` restores the old bytes exactly. While a journal exists,
/// reverting it always yields the old or the new image. Returns the number
/// of crash points and how many of them needed a revert.
fn crash_matrix(
    what: &str,
    image: &Path,
    journal: &Path,
    op: &dyn Fn(&FaultOpener) -> vhd::Result<()>,
) -> (u32, u32) {
    let old = std::fs::read(image).unwrap();
    let _ = std::fs::remove_file(journal);
    op(&FaultOpener {
        budget: CrashBudget::new(i64::MAX),
    })
    .unwrap();
    assert!(
        !journal.exists(),
        "journal left after a completed operation"
    );
    let new = std::fs::read(image).unwrap();
    assert_ne!(old, new, "operation changed nothing");
    valid(image).unwrap_or_else(|m| panic!("{what}: after the operation: {m}"));
    let mut reverts = 0;
    for budget in 0..2000 {
        std::fs::write(image, &old).unwrap();
        let _ = std::fs::remove_file(journal);
        let r = op(&FaultOpener {
            budget: CrashBudget::new(budget),
        });
        let now = std::fs::read(image).unwrap();
        if r.is_ok() {
            assert!(now == new, "{what}: budget {budget}: completed run differs");
            assert!(!journal.exists());
            return (u32::try_from(budget).unwrap(), reverts);
        }
        if now != old && now != new {
            let state = valid(image).err().unwrap_or_else(|| "passes check".into());
            assert!(
                journal.exists(),
                "{what}: budget {budget}: image is neither old nor new ({state}) and no journal"
            );
        }
        if journal.exists() {
            ops::revert_path(image, journal)
                .unwrap_or_else(|e| panic!("{what}: budget {budget}: revert: {e}"));
            let after = std::fs::read(image).unwrap();
            if now != old && now != new {
                assert!(
                    after == old,
                    "{what}: budget {budget}: revert did not restore the old image"
                );
                reverts += 1;
            } else {
                assert!(
                    after == old || after == new,
                    "{what}: budget {budget}: revert made a third image"
                );
            }
        }
    }
    panic!("{what}: never completed");
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    d
}

#[test]
fn every_metadata_operation_is_crash_safe() {
    let root = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    // Operations whose image change is a single write never leave a
    // half-changed image; all others must have needed the journal.
    let single_write = [
        "set hidden (fixed)",
        "set marker",
        "modify -s (grow)",
        "modify -s (shrink)",
    ];
    let mut run = |what: &str, image: &Path, op: &dyn Fn(&FaultOpener) -> vhd::Result<()>| {
        let journal = ops::default_journal_path(image);
        let (points, reverts) = crash_matrix(what, image, &journal, op);
        assert!(points >= 3, "{what}: only {points} crash points");
        assert!(
            reverts >= 1 || single_write.contains(&what),
            "{what}: no crash point needed the journal"
        );
        report.push(format!("{what}: {points} crash points, {reverts} reverts"));
    };

    // Journaled resize growing the BAT (data blocks move).
    let d = fresh_dir(root.path(), "resize");
    let (_, child, _) = pair(&d);
    let j = ops::default_journal_path(&child);
    run("resize -j (BAT grows)", &child, &|o| {
        ops::resize_journaled(o, &child, 300 << 20, &j)
    });
    // Journaled resize within the BAT, and of a fixed disk.
    let d = fresh_dir(root.path(), "resize-small");
    let img = d.join("pre.vhd");
    let mut opts = CreateOptions::dynamic(SIZE);
    opts.max_size = Some(64 << 20);
    create_file(&img, &opts)
        .unwrap()
        .write_sectors(0, &pattern(4, 4096))
        .unwrap();
    let j = ops::default_journal_path(&img);
    run("resize -j (within BAT)", &img, &|o| {
        ops::resize_journaled(o, &img, 32 << 20, &j)
    });
    let d = fresh_dir(root.path(), "resize-fixed");
    let fixed = d.join("fixed.vhd");
    create_file(&fixed, &CreateOptions::fixed(4 << 20))
        .unwrap()
        .write_sectors(0, &pattern(5, 4096))
        .unwrap();
    let j = ops::default_journal_path(&fixed);
    run("resize -j (fixed)", &fixed, &|o| {
        ops::resize_journaled(o, &fixed, 6 << 20, &j)
    });
    // Fast resize within the -S preallocation.
    run("resize -f", &img, &|o| ops::resize_fast(o, &img, 48 << 20));
    // set hidden (dynamic and fixed), set marker.
    let j = ops::default_journal_path(&img);
    run("set hidden", &img, &|o| {
        ops::set_field(o, &img, ops::SetField::Hidden, 1, &j)
    });
    let j = ops::default_journal_path(&fixed);
    run("set hidden (fixed)", &fixed, &|o| {
        ops::set_field(o, &fixed, ops::SetField::Hidden, 1, &j)
    });
    let j = ops::default_journal_path(&img);
    run("set marker", &img, &|o| {
        ops::set_field(o, &img, ops::SetField::Marker, 1, &j)
    });
    // modify: reparent, zero the BAT, physical size up and down.
    let d = fresh_dir(root.path(), "modify");
    let (base, child, _) = pair(&d);
    let other = d.join("other-parent-with-a-longer-name.vhd");
    std::fs::copy(&base, &other).unwrap();
    let reparent = ops::ModifyOptions {
        parent: Some((other.clone(), false)),
        ..Default::default()
    };
    run("modify -p", &child, &|o| ops::modify(o, &child, &reparent));
    let zero = ops::ModifyOptions {
        zero_bat: true,
        ..Default::default()
    };
    run("modify -z", &child, &|o| ops::modify(o, &child, &zero));
    let len = std::fs::metadata(&child).unwrap().len();
    let grow = ops::ModifyOptions {
        physical_size: Some(len + (1 << 20)),
        ..Default::default()
    };
    run("modify -s (grow)", &child, &|o| {
        ops::modify(o, &child, &grow)
    });
    ops::modify(&StdOpener, &child, &grow).unwrap();
    let shrink = ops::ModifyOptions {
        physical_size: Some(len),
        ..Default::default()
    };
    run("modify -s (shrink)", &child, &|o| {
        ops::modify(o, &child, &shrink)
    });
    // repair -b of a destroyed primary footer, and repair of a footer
    // left far past the data.
    let d = fresh_dir(root.path(), "repair");
    let (base, _, _) = pair(&d);
    let len = std::fs::metadata(&base).unwrap().len();
    patch(&base, len - 512, &[0u8; 512]);
    // A crashed extension left space after it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(len + (1 << 20))
        .unwrap();
    run("repair -b", &base, &|o| ops::repair(o, &base, true));
    ops::repair(&StdOpener, &base, true).unwrap();
    ops::modify(
        &StdOpener,
        &base,
        &ops::ModifyOptions {
            physical_size: Some(len + (3 << 20)),
            ..Default::default()
        },
    )
    .unwrap();
    patch(&base, len - 512, &[0u8; 512]);
    run("repair", &base, &|o| ops::repair(o, &base, false));
    eprintln!("{}", report.join("\n"));
}

#[test]
fn crash_during_coalesce_then_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, before) = pair(dir.path());
    let base_template = std::fs::read(&base).unwrap();
    let child_template = std::fs::read(&child).unwrap();
    let mut budget = 0;
    loop {
        std::fs::write(&base, &base_template).unwrap();
        let crashed = ops::coalesce(
            &FaultOpener {
                budget: CrashBudget::new(budget),
            },
            &child,
            false,
            None,
        )
        .is_err();
        assert_eq!(
            std::fs::read(&child).unwrap(),
            child_template,
            "child changed"
        );
        valid(&base).unwrap_or_else(|m| panic!("budget {budget}: parent: {m}"));
        assert_eq!(read_all(&child), before, "budget {budget}");
        // Running it again finishes the merge.
        ops::coalesce(&StdOpener, &child, false, None).unwrap();
        valid(&base).unwrap();
        assert_eq!(read_all(&base), before, "budget {budget}: rerun");
        if !crashed {
            break;
        }
        budget += 1;
    }
    assert!(budget > 5);
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

    // Null UUID (the C check's rule).
    let (b, _) = fresh("m");
    let mut img = open_rw(&b);
    img.footer_mut().uuid = [0; 16];
    img.write_footer().unwrap();
    drop(img);
    expect_failure(&b, "primary footer invalid: invalid (NULL) uuid");

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
