//! Chains against an in-memory model: snapshot, writes and discards through
//! a 3-deep chain, reads compared with the model, coalesce, and resize with
//! and without preallocated metadata.

// Test images are a few MiB: sizes and offsets always fit in usize/u8.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vhd::check::{check_path, CheckOptions};
use vhd::create::{create_file, snapshot, CreateOptions, SnapshotOptions};
use vhd::io::StdOpener;
use vhd::{ops, Chain};

const SIZE: u64 = 8 << 20; // four 2 MiB blocks
const SECTORS: u64 = SIZE / 512;

fn pattern(seed: u8, sector: u64, n: u64) -> Vec<u8> {
    (0..n * 512)
        .map(|i| seed.wrapping_add(((sector * 512 + i) % 251) as u8))
        .collect()
}

fn write_model(model: &mut [u8], sector: u64, data: &[u8]) {
    let at = (sector * 512) as usize;
    model[at..at + data.len()].copy_from_slice(data);
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; chain.leaf().virtual_size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

fn assert_valid(p: &Path) {
    if let Err(e) = check_path(p, &CheckOptions::default()) {
        panic!("{} invalid: {e}", p.display());
    }
}

/// base (written) <- mid (written) <- leaf
fn three_deep(dir: &Path, model: &mut [u8]) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.vhd");
    let leaf = dir.join("leaf.vhd");
    let mut img = create_file(&base, &CreateOptions::dynamic(SIZE)).unwrap();
    let d = pattern(1, 100, 3000);
    img.write_sectors(100, &d).unwrap();
    write_model(model, 100, &d);
    drop(img);
    snapshot(&mid, &base, &SnapshotOptions::default()).unwrap();
    let mut c = Chain::open(&mid, true).unwrap();
    let d = pattern(2, 4000, 500);
    c.write(4000, &d).unwrap();
    write_model(model, 4000, &d);
    drop(c);
    snapshot(&leaf, &mid, &SnapshotOptions::default()).unwrap();
    (base, mid, leaf)
}

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, count: u64, seed: u8 },
    Discard { sector: u64, count: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(9000)));
    prop_oneof![
        3 => (range.clone(), any::<u8>()).prop_map(|((sector, count), seed)| Op::Write { sector, count, seed }),
        1 => range.prop_map(|(sector, count)| Op::Discard { sector, count }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn random_ops_over_three_deep_chain(ops_list in proptest::collection::vec(op(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let (_base, mid, leaf) = three_deep(dir.path(), &mut model);
        {
            let mut chain = Chain::open(&leaf, true).unwrap();
            prop_assert_eq!(chain.depth(), 3);
            for o in &ops_list {
                match *o {
                    Op::Write { sector, count, seed } => {
                        let d = pattern(seed, sector, count);
                        chain.write(sector, &d).unwrap();
                        write_model(&mut model, sector, &d);
                    }
                    Op::Discard { sector, count } => {
                        chain.discard(sector, count).unwrap();
                        let at = (sector * 512) as usize;
                        model[at..at + (count * 512) as usize].fill(0);
                    }
                }
            }
        }
        prop_assert!(read_all(&leaf) == model, "chain read differs from model");
        assert_valid(&leaf);
        // Coalesce the leaf into mid: mid's chain now reads what the leaf did.
        ops::coalesce(&StdOpener, &leaf, false, None).unwrap();
        prop_assert!(read_all(&mid) == model, "after coalesce, parent differs from model");
        assert_valid(&mid);
    }
}

#[test]
fn dynamic_disk_discard_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    let mut img = create_file(&p, &CreateOptions::dynamic(SIZE)).unwrap();
    img.write_sectors(0, &pattern(9, 0, 4096)).unwrap();
    assert!(img.batmap().unwrap().is_full(0));
    img.zero_sectors(10, 20, true).unwrap();
    assert!(!img.batmap().unwrap().is_full(0));
    let mut b = vec![0u8; 30 * 512];
    img.read_sectors(0, &mut b).unwrap();
    assert_eq!(&b[..10 * 512], &pattern(9, 0, 10)[..]);
    assert!(b[10 * 512..].iter().all(|&x| x == 0));
    drop(img);
    assert_valid(&p);
}

#[test]
fn raw_parent_chain() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let mut data = pattern(5, 0, SECTORS);
    std::fs::write(&raw, &data).unwrap();
    let child = dir.path().join("c.vhd");
    let opts = SnapshotOptions {
        parent_raw: true,
        ..SnapshotOptions::default()
    };
    let img = snapshot(&child, &raw, &opts).unwrap();
    assert!(img.parent_is_raw());
    drop(img);
    let mut c = Chain::open(&child, true).unwrap();
    let d = pattern(7, 50, 10);
    c.write(50, &d).unwrap();
    write_model(&mut data, 50, &d);
    drop(c);
    assert_eq!(read_all(&child), data);
    assert_valid(&child);
    ops::coalesce(&StdOpener, &child, false, None).unwrap();
    assert_eq!(std::fs::read(&raw).unwrap(), data);
}

#[test]
fn resize_fast_and_journaled_keep_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let (_b, _m, leaf) = three_deep(dir.path(), &mut model);
    let mut c = Chain::open(&leaf, true).unwrap();
    let d = pattern(3, 0, SECTORS);
    c.write(0, &d).unwrap();
    drop(c);
    // Journaled: BAT must grow (4 -> 200 entries) and blocks move.
    let j = dir.path().join("leaf.journal");
    ops::resize_journaled(&StdOpener, &leaf, 400 << 20, &j).unwrap();
    assert!(!j.exists());
    assert_valid(&leaf);
    let all = read_all(&leaf);
    assert_eq!(all.len(), 400 << 20);
    assert_eq!(&all[..SIZE as usize], &d[..]);
    assert!(all[SIZE as usize..].iter().all(|&x| x == 0));
    // Fast: needs -S preallocation.
    let p = dir.path().join("fast.vhd");
    let mut o = CreateOptions::dynamic(SIZE);
    o.max_size = Some(64 << 20);
    let mut img = create_file(&p, &o).unwrap();
    img.write_sectors(8, &pattern(4, 8, 100)).unwrap();
    drop(img);
    ops::resize_fast(&StdOpener, &p, 64 << 20).unwrap();
    assert!(ops::resize_fast(&StdOpener, &p, 66 << 20).is_err());
    assert_valid(&p);
    let all = read_all(&p);
    assert_eq!(all.len(), 64 << 20);
    assert_eq!(&all[8 * 512..108 * 512], &pattern(4, 8, 100)[..]);
}

#[test]
fn fixed_disk_resize_and_io() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhd");
    let mut img = create_file(&p, &CreateOptions::fixed(SIZE)).unwrap();
    img.write_sectors(SECTORS - 2, &pattern(1, 0, 2)).unwrap();
    drop(img);
    ops::resize_journaled(&StdOpener, &p, 2 * SIZE, &dir.path().join("j")).unwrap();
    assert_valid(&p);
    let all = read_all(&p);
    assert_eq!(
        &all[(SIZE - 1024) as usize..SIZE as usize],
        &pattern(1, 0, 2)[..]
    );
    assert!(all[SIZE as usize..].iter().all(|&x| x == 0));
}

#[test]
fn copy_flattens_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let (_b, _m, leaf) = three_deep(dir.path(), &mut model);
    let out = dir.path().join("flat.vhd");
    ops::copy(&StdOpener, &leaf, &out, None, None).unwrap();
    assert_eq!(read_all(&out), model);
    assert_valid(&out);
}

#[test]
fn snapshot_depth_limit_and_empty_parent_skip() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let (_b, mid, leaf) = three_deep(dir.path(), &mut model);
    // leaf is empty: a snapshot of it links to mid.
    assert_eq!(ops::snapshot_target(&leaf).unwrap(), mid);
    let opts = SnapshotOptions {
        depth_limit: Some(3),
        ..SnapshotOptions::default()
    };
    let e = snapshot(&dir.path().join("x.vhd"), &leaf, &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "snapshot depth exceeded: current depth: 3, limit: 3"
    );
    assert_eq!(e.errno(), 28);
}
