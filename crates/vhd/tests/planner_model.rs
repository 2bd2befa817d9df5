//! The VHD core's plans against a model: random sequences of writes, discards, write-zeroes
//! and reads on a dynamic image, a differencing image over a parent with data, a dynamic
//! image on a block device (footer fixed at the end, the volume's old bytes in between) and a
//! fixed image. The model is the virtual disk's contents.
//!
//! * A long-lived image ([`VhdImage`], the synchronous executor) runs every operation; it
//!   must read like the model and pass `check` after each.
//! * Every operation is also run from the same starting bytes by a small executor here that
//!   stops after each possible number of writes (a crash after any prefix of the plan's
//!   ordered writes), once with the steps of each stage in plan order and once reversed
//!   (an asynchronous executor runs a stage's steps concurrently). After every such crash
//!   the image must open for writing, pass `check`, and every sector must read either its
//!   old or its new content: never unwritten, stale or foreign data.

// Test images are a few MiB: sizes and offsets always fit in usize.
#![allow(clippy::cast_possible_truncation)]

use proptest::prelude::*;
use vhd::check::{check, CheckOptions};
use vhd::create::{create_file, snapshot, CreateOptions, SnapshotOptions};
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{BlockFile, MemFile};
use vhd::metadata::Metadata;
use vhd::plan::{DataWrite, Io, LoadedBitmap, Op, Prepare, ZeroRange};
use vhd::Chain;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const SECTORS: u64 = SIZE / 512;
/// The block device of the device flavour: larger than a fully allocated image needs.
const DEVICE: usize = 10 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Dynamic,
    Differencing,
    Device,
    Fixed,
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        sector: u64,
        count: u64,
        seed: u8,
    },
    Zero {
        sector: u64,
        count: u64,
        deallocate: bool,
    },
    Read {
        sector: u64,
        count: u64,
    },
}

/// `count` sectors of data: every byte of sector i is derived from `seed` and i, never zero.
fn pattern(seed: u8, sector: u64, count: u64) -> Vec<u8> {
    let mut out = vec![0u8; (count * 512) as usize];
    for (i, chunk) in out.chunks_mut(512).enumerate() {
        chunk.fill(seed.wrapping_add(((sector + i as u64) % 251) as u8) | 1);
    }
    out
}

/// Starting bytes of the image and of its parent (differencing only), and the disk contents.
struct Start {
    image: Vec<u8>,
    parent: Option<Vec<u8>>,
    model: Vec<u8>,
}

fn start(flavour: Flavour) -> Start {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let opts = if flavour == Flavour::Fixed {
        CreateOptions::fixed(SIZE)
    } else {
        CreateOptions::dynamic(SIZE)
    };
    let mut img = create_file(&base, &opts).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    if flavour == Flavour::Differencing {
        // The parent holds data in blocks 0 and 2 (partly).
        for (sector, count, seed) in [(0, 4096, 1u8), (8192 + 100, 700, 2)] {
            let d = pattern(seed, sector, count);
            img.write_sectors(sector, &d).unwrap();
            model[(sector * 512) as usize..][..d.len()].copy_from_slice(&d);
        }
        drop(img);
        let child = dir.path().join("child.vhd");
        drop(snapshot(&child, &base, &SnapshotOptions::default()).unwrap());
        return Start {
            image: std::fs::read(&child).unwrap(),
            parent: Some(std::fs::read(&base).unwrap()),
            model,
        };
    }
    drop(img);
    let mut image = std::fs::read(&base).unwrap();
    if flavour == Flavour::Device {
        // As on an LVM volume: the footer at the device's end, old bytes in between.
        let footer = image.split_off(image.len() - 512);
        image.resize(DEVICE - 512, 0xee);
        image.extend_from_slice(&footer);
    }
    Start {
        image,
        parent: None,
        model,
    }
}

fn file(flavour: Flavour, bytes: Vec<u8>) -> MemFile {
    if flavour == Flavour::Device {
        MemFile::device(bytes)
    } else {
        MemFile::new(bytes)
    }
}

/// Reads the whole virtual disk of `bytes` (over `parent`), opening it as a writer would.
fn read_disk(flavour: Flavour, bytes: &[u8], parent: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let img = VhdImage::open(
        file(flavour, bytes.to_vec()),
        "image",
        OpenOptions::read_write(),
    )
    .map_err(|e| format!("does not open: {e}"))?;
    let mut images = vec![img];
    if let Some(p) = parent {
        images.push(
            VhdImage::open(MemFile::new(p.to_vec()), "parent", OpenOptions::read_only()).unwrap(),
        );
    }
    let chain = Chain::from_parts(images, None);
    let mut out = vec![0u8; SIZE as usize];
    chain.read(0, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn checks(flavour: Flavour, bytes: &[u8]) -> Result<(), String> {
    let opts = CheckOptions {
        check_bitmaps: true,
        ..CheckOptions::default()
    };
    check(file(flavour, bytes.to_vec()), "image", None, &opts)
        .map(|_| ())
        .map_err(|e| e.message)
}

/// A crashing executor of the core's plans over an in-memory file: it stops (returns
/// `false`) instead of doing the `budget`-th write.
struct CrashingExecutor {
    file: MemFile,
    meta: Metadata,
    budget: usize,
    reverse_stages: bool,
}

impl CrashingExecutor {
    fn write(&mut self, offset: u64, bytes: &[u8]) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        self.file.write_at(bytes, offset).unwrap();
        true
    }

    /// Runs `op`; `false` when the crash came first.
    fn run(&mut self, op: Op, sector: u64, count: u64, data: &[u8]) -> bool {
        for piece in self.meta.pieces(sector, count) {
            let plan = self.meta.plan_locked(op, &piece).unwrap();
            for stage in plan.stages() {
                let mut steps: Vec<_> = stage.iter().collect();
                if self.reverse_stages {
                    steps.reverse();
                }
                for step in steps {
                    let mut loaded = None;
                    let prepared = loop {
                        match self.meta.prepare(step, loaded.as_ref()).unwrap() {
                            Prepare::Ready(p) => break p,
                            Prepare::NeedBitmap(load) => {
                                let mut b = vec![0u8; load.len];
                                self.file.read_at(&mut b, load.offset).unwrap();
                                loaded = Some(LoadedBitmap::new(load, b));
                            }
                            Prepare::Restart => panic!("restart without concurrency"),
                        }
                    };
                    let done = match &prepared.io {
                        Io::Nothing => true,
                        Io::Write(writes) => writes.iter().all(|(o, b)| self.write(*o, b)),
                        Io::Data(DataWrite { offset, at, len }) => {
                            self.write(*offset, &data[*at..*at + *len])
                        }
                        // A punch reads back as zeros.
                        Io::Zero(ZeroRange { offset, len, .. }) | Io::Release { offset, len } => {
                            self.write(*offset, &vec![0u8; *len as usize])
                        }
                    };
                    if !done {
                        return false;
                    }
                    self.meta.complete(prepared);
                }
            }
        }
        true
    }
}

fn as_op(step: &Step) -> Option<(Op, u64, u64, Vec<u8>)> {
    match *step {
        Step::Write {
            sector,
            count,
            seed,
        } => Some((Op::Write, sector, count, pattern(seed, sector, count))),
        Step::Zero {
            sector,
            count,
            deallocate,
        } => Some((Op::Zero { deallocate }, sector, count, Vec::new())),
        Step::Read { .. } => None,
    }
}

/// Crashes `op` after every possible number of writes, from `before`, and checks the image.
fn crash_everywhere(
    flavour: Flavour,
    before: &[u8],
    parent: Option<&[u8]>,
    old: &[u8],
    new: &[u8],
    (op, sector, count, data): &(Op, u64, u64, Vec<u8>),
) -> usize {
    let mut points = 0;
    for reverse_stages in [false, true] {
        for budget in 0.. {
            let img = VhdImage::open(
                file(flavour, before.to_vec()),
                "image",
                OpenOptions::read_write(),
            )
            .unwrap();
            let (file, meta) = img.into_parts();
            let mut exec = CrashingExecutor {
                file,
                meta,
                budget,
                reverse_stages,
            };
            let completed = exec.run(*op, *sector, *count, data);
            let bytes = exec.file.contents();
            let what = format!("{op:?} at {sector}+{count}, crash after {budget} writes");
            checks(flavour, &bytes).unwrap_or_else(|m| panic!("{what}: check: {m}"));
            let disk = read_disk(flavour, &bytes, parent).unwrap_or_else(|m| panic!("{what}: {m}"));
            if completed {
                assert!(disk == new, "{what}: completed run differs from the model");
                break;
            }
            points += 1;
            for (i, got) in disk.chunks(512).enumerate() {
                let range = i * 512..(i + 1) * 512;
                assert!(
                    got == &old[range.clone()] || got == &new[range],
                    "{what}: sector {i} reads neither its old nor its new content"
                );
            }
        }
    }
    points
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(5000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((sector, count), seed)| Step::Write { sector, count, seed }),
        2 => (range.clone(), any::<bool>()).prop_map(|((sector, count), deallocate)| Step::Zero { sector, count, deallocate }),
        1 => range.prop_map(|(sector, count)| Step::Read { sector, count }),
    ]
}

fn flavour_strategy() -> impl Strategy<Value = Flavour> {
    prop_oneof![
        3 => Just(Flavour::Dynamic),
        3 => Just(Flavour::Differencing),
        3 => Just(Flavour::Device),
        1 => Just(Flavour::Fixed),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn plans_match_the_model_and_survive_a_crash_at_every_write(
        flavour in flavour_strategy(),
        steps in proptest::collection::vec(step_strategy(), 1..8),
    ) {
        let Start { image, parent, mut model } = start(flavour);
        let mut live = VhdImage::open(file(flavour, image), "live", OpenOptions::read_write()).unwrap();
        let mut crash_points = 0;
        for step in &steps {
            let before = live.file().contents();
            let old = model.clone();
            if let Some((op, sector, count, data)) = as_op(step) {
                let at = (sector * 512) as usize;
                let len = (count * 512) as usize;
                match op {
                    Op::Write => {
                        model[at..at + len].copy_from_slice(&data);
                        live.write_sectors(sector, &data).unwrap();
                    }
                    Op::Zero { deallocate } => {
                        model[at..at + len].fill(0);
                        live.zero_sectors(sector, count, deallocate).unwrap();
                    }
                }
                crash_points += crash_everywhere(
                    flavour,
                    &before,
                    parent.as_deref(),
                    &old,
                    &model,
                    &(op, sector, count, data),
                );
            }
            let bytes = live.file().contents();
            checks(flavour, &bytes).map_err(TestCaseError::fail)?;
            let disk = read_disk(flavour, &bytes, parent.as_deref()).map_err(TestCaseError::fail)?;
            if let Step::Read { sector, count } = *step {
                let range = (sector * 512) as usize..((sector + count) * 512) as usize;
                prop_assert!(disk[range.clone()] == model[range], "read {sector}+{count} differs");
            }
            prop_assert!(disk == model, "{flavour:?}: disk differs from the model after {step:?}");
        }
        // Every write writes something, so it has crash points (a discard of unallocated
        // space may have none).
        if steps.iter().any(|s| matches!(s, Step::Write { .. })) {
            prop_assert!(crash_points > 0);
        }
    }
}
