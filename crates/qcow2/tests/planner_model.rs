//! Property tests of the planner, through the synchronous executor, against a model: a flat
//! byte array of the virtual disk. Every combination of cluster size, version, extended L2
//! entries, refcount width and backing file is exercised with random writes, zeroing and
//! discards. After every operation the image reads like the model; after every single
//! storage write (a crash at any point) the image is consistent (no refcount below its
//! references), and an image whose last operation completed reads like the model at that
//! point; once closed it has no leaked cluster either.

use proptest::prelude::*;
use qcow2::check::check;
use qcow2::entry::Entry;
use qcow2::image::{create, CreateOptions, Image, Storage};
use qcow2::meta::{L2Update, Run, RunKind};
use qcow2::{Metadata, Need, Plan};

const SIZE: u64 = 512 << 10;

/// What the backing file holds at guest byte `offset`.
fn backing_byte(offset: u64) -> u8 {
    u8::try_from((offset / 512 * 7 + offset % 13) % 251).unwrap() | 0x80
}

/// Storage that records every write, so a crash after any of them can be replayed.
#[derive(Debug, Default)]
struct Recording {
    bytes: Vec<u8>,
    log: Vec<(u64, Vec<u8>, Option<u64>)>,
}

impl Storage for Recording {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.bytes.read_at(buf, offset)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.log.push((offset, data.to_vec(), None));
        self.bytes.write_at(data, offset)
    }
    fn file_len(&mut self) -> std::io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.log.push((0, Vec::new(), Some(len)));
        Storage::set_len(&mut self.bytes, len)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Zero {
        sector: u64,
        sectors: u64,
        deallocate: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE / 512).prop_flat_map(|s| (Just(s), 1..=(SIZE / 512 - s).min(300)));
    prop_oneof![
        3 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => (range, any::<bool>()).prop_map(|((sector, sectors), deallocate)| Op::Zero { sector, sectors, deallocate }),
    ]
}

#[derive(Debug, Clone)]
struct Shape {
    cluster_bits: u32,
    version: u32,
    extended_l2: bool,
    refcount_order: u32,
    backing: bool,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop::sample::select(vec![9u32, 10, 12, 14, 16]),
        2u32..=3,
        any::<bool>(),
        0u32..=6,
        any::<bool>(),
    )
        .prop_map(|(cluster_bits, version, extended, order, backing)| Shape {
            cluster_bits,
            version,
            extended_l2: extended && version == 3 && cluster_bits >= 14,
            refcount_order: if version == 2 { 4 } else { order },
            backing,
        })
}

fn open(bytes: Vec<u8>, backing: bool) -> Image<Recording> {
    let mut image = Image::open(
        Recording {
            bytes,
            log: Vec::new(),
        },
        true,
    )
    .unwrap();
    if backing {
        image.set_below(Box::new(|offset, buf| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = backing_byte(offset + i as u64);
            }
            Ok(())
        }));
    }
    image
}

fn apply(image: &mut Image<Recording>, model: &mut [u8], op: &Op) {
    match *op {
        Op::Write {
            sector,
            sectors,
            seed,
        } => {
            let data: Vec<u8> = (0..sectors * 512)
                .map(|i| u8::try_from((i / 512 + u64::from(seed)) % 251).unwrap() ^ seed)
                .collect();
            image.write(sector * 512, &data).unwrap();
            let at = usize::try_from(sector * 512).unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
        }
        Op::Zero {
            sector,
            sectors,
            deallocate,
        } => {
            image.zero(sector * 512, sectors * 512, deallocate).unwrap();
            let at = usize::try_from(sector * 512).unwrap();
            model[at..at + usize::try_from(sectors * 512).unwrap()].fill(0);
        }
    }
}

/// Checks the read fast path ([`Metadata::data_in_cluster`]) against [`Metadata::map`] on the
/// image `bytes`: for pieces of one and of eight sectors at every sector, the fast path gives
/// a host offset exactly when the piece lies in one cluster and `map` (with its L2 table
/// loaded) reads all of it from that offset, and never when the table is not loaded.
fn fast_path_agrees_with_map(bytes: &[u8]) {
    let header = qcow2::Header::parse(bytes).unwrap();
    let part = |offset: u64, len: u64| {
        let at = usize::try_from(offset).unwrap();
        &bytes[at..at + usize::try_from(len).unwrap()]
    };
    let l1 = part(header.l1_table_offset, u64::from(header.l1_size) * 8);
    let cs = header.cluster_size();
    let table = part(
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters) * cs,
    );
    let mut meta = Metadata::open(&header, l1, table, bytes.len() as u64).unwrap();
    for sector in 0..SIZE / 512 {
        for sectors in [1, 8] {
            let (offset, len) = (sector * 512, sectors * 512);
            if offset + len > SIZE {
                continue;
            }
            let runs = loop {
                match meta.map(offset, len).unwrap() {
                    Plan::Ready(runs) => break runs,
                    Plan::Load(Need::L2 { l1_index, offset }) => {
                        assert_eq!(meta.data_in_cluster(sector * 512, len), None, "not loaded");
                        meta.insert_l2(l1_index, offset, part(offset, cs)).unwrap();
                    }
                    Plan::Load(other) => panic!("a read needs {other:?}"),
                }
            };
            let in_one_cluster = offset / cs == (offset + len - 1) / cs;
            let expected = match runs.as_slice() {
                [Run {
                    kind: RunKind::Data { host },
                    ..
                }] if in_one_cluster => Some(*host),
                _ => None,
            };
            assert_eq!(
                meta.data_in_cluster(offset, len),
                expected,
                "{len} bytes at {offset}: {runs:?}"
            );
        }
    }
}

fn read_all(image: &mut Image<Recording>) -> Vec<u8> {
    let mut all = vec![0u8; usize::try_from(SIZE).unwrap()];
    image.read(0, &mut all).unwrap();
    all
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn reads_match_the_model_and_every_crash_point_is_consistent(
        shape in shape(),
        ops in prop::collection::vec(op(), 1..12),
    ) {
        let options = CreateOptions {
            size: SIZE,
            cluster_bits: shape.cluster_bits,
            version: shape.version,
            extended_l2: shape.extended_l2,
            refcount_order: shape.refcount_order,
            backing: shape.backing.then(|| ("base.raw".to_owned(), "raw".to_owned())),
        };
        let initial = create(&options).unwrap();
        let mut model: Vec<u8> = if shape.backing {
            (0..SIZE).map(backing_byte).collect()
        } else {
            vec![0u8; usize::try_from(SIZE).unwrap()]
        };
        let mut image = open(initial.clone(), shape.backing);
        // (number of storage writes when the op completed, model after it)
        let mut completed = Vec::new();
        for op in &ops {
            apply(&mut image, &mut model, op);
            prop_assert_eq!(read_all(&mut image) == model, true, "after {:?}", op);
            completed.push((image.storage().log.len(), model.clone()));
        }
        fast_path_agrees_with_map(&image.storage().bytes);
        let mut storage = image.close().unwrap();
        let report = check(&mut storage).unwrap();
        prop_assert!(report.is_consistent(), "{:?}", report);
        prop_assert_eq!(report.leaks, 0, "leaks after close");
        // Replay every prefix of the writes: a crash at any point.
        let log = std::mem::take(&mut storage.log);
        let mut crashed = initial.clone();
        for (i, (offset, data, len)) in log.iter().enumerate() {
            match len {
                Some(len) => Storage::set_len(&mut crashed, *len).unwrap(),
                None => crashed.write_at(data, *offset).unwrap(),
            }
            if i % 4 == 0 || i + 1 == log.len() {
                let mut copy = crashed.clone();
                let report = check(&mut copy).unwrap();
                prop_assert!(report.is_consistent(), "crash after write {}: {:?}", i, report);
            }
            // A crash right after an operation completed keeps all of it.
            if let Some((_, expected)) = completed.iter().find(|(n, _)| *n == i + 1) {
                let mut reopened = open(crashed.clone(), shape.backing);
                prop_assert_eq!(&read_all(&mut reopened) == expected, true, "crash after op ending at write {}", i);
            }
        }
        prop_assert_eq!(crashed, storage.bytes);
    }
}

/// Small clusters outgrow the refcount table: the table moves (header rewritten, old table
/// freed) and the image stays consistent.
#[test]
fn refcount_table_growth() {
    for order in [0u32, 4, 6] {
        let options = CreateOptions {
            size: 16 << 20,
            cluster_bits: 9,
            refcount_order: order,
            ..CreateOptions::new(16 << 20)
        };
        let mut image = Image::open(create(&options).unwrap(), true).unwrap();
        let table_before = image.header().refcount_table_offset;
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i / 512 % 251) as u8 | 1)
            .collect();
        for i in 0..16u64 {
            image.write(i << 20, &chunk).unwrap();
        }
        let mut back = vec![0u8; 1 << 20];
        image.read(15 << 20, &mut back).unwrap();
        assert_eq!(back, chunk);
        let mut bytes = image.close().unwrap();
        let header = qcow2::image::read_header(&mut bytes).unwrap();
        if order >= 4 {
            assert_ne!(header.refcount_table_offset, table_before, "order {order}");
        }
        let report = check(&mut bytes).unwrap();
        assert!(report.is_consistent(), "order {order}: {report:?}");
        assert_eq!(report.leaks, 0, "order {order}");
        let mut reopened = Image::open(bytes, false).unwrap();
        reopened.read(15 << 20, &mut back).unwrap();
        assert_eq!(back, chunk);
    }
}

/// A damaged header whose refcount table lies far beyond the image (here at 1 PiB) makes the
/// first allocating write fail with an error at once: the table it would need is sized
/// before anything is counted or allocated over the range.
#[test]
fn a_refcount_table_far_away_fails_the_first_allocation() {
    let options = CreateOptions {
        cluster_bits: 9,
        refcount_order: 0,
        ..CreateOptions::new(1 << 20)
    };
    let mut bytes = create(&options).unwrap();
    bytes[48..56].copy_from_slice(&(1u64 << 50).to_be_bytes());
    let mut image = Image::open(bytes, true).unwrap();
    let err = image.write(0, &[1u8; 512]).unwrap_err();
    assert!(err.to_string().contains("past 8 MiB"), "{err}");
}

/// A batch of L2 updates renders as one write per span of nearby units (here 2 MiB clusters:
/// a 2 MiB table of 4 KiB units): units 0 and 1 together, unit 20 (beyond 64 KiB) apart;
/// every other entry as published, and the last update of an entry wins. Updates of two
/// tables in one batch are refused.
#[test]
fn a_batch_of_l2_updates_is_written_in_spans() {
    let cs = 2u64 << 20;
    let options = CreateOptions {
        cluster_bits: 21,
        ..CreateOptions::new(32 << 30)
    };
    let mut image = Image::open(create(&options).unwrap(), true).unwrap();
    image.write(0, &[7u8; 512]).unwrap();
    let bytes = image.close().unwrap();
    let header = qcow2::Header::parse(&bytes).unwrap();
    let part = |offset: u64, len: u64| {
        let at = usize::try_from(offset).unwrap();
        &bytes[at..at + usize::try_from(len).unwrap()]
    };
    let mut meta = Metadata::open(
        &header,
        part(header.l1_table_offset, u64::from(header.l1_size) * 8),
        part(
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs,
        ),
        bytes.len() as u64,
    )
    .unwrap();
    let entry = |host: u64| Entry::Standard {
        host: Some(host * cs),
        copied: true,
        alloc: 1,
        zero: 0,
    };
    let update = |l1_index: u64, l2_index: u64, host: u64| L2Update {
        l1_index,
        l2_index,
        entry: entry(host),
    };
    let updates = [
        update(0, 3, 40),
        update(0, 600, 41),
        update(0, 20 * 512 + 5, 42),
        update(0, 3, 43),
    ];
    let writes = loop {
        match meta.render_l2(&updates).unwrap() {
            Plan::Ready(writes) => break writes,
            Plan::Load(Need::L2 { l1_index, offset }) => {
                meta.insert_l2(l1_index, offset, part(offset, cs)).unwrap()
            }
            Plan::Load(other) => panic!("rendering needs {other:?}"),
        }
    };
    let l1 = u64::from_be_bytes(part(header.l1_table_offset, 8).try_into().unwrap());
    let table = l1 & qcow2::entry::OFFSET_MASK;
    let ranges: Vec<(u64, usize)> = writes.iter().map(|w| (w.offset, w.bytes.len())).collect();
    assert_eq!(ranges, [(table, 8192), (table + 20 * 4096, 4096)]);
    let word = |bytes: &[u8], index: usize| {
        u64::from_be_bytes(bytes[index * 8..index * 8 + 8].try_into().unwrap())
    };
    let layout = *meta.layout();
    let encoded = |host: u64| entry(host).encode(&layout)[0];
    // Cluster 0, written above, keeps its published entry.
    assert_eq!(word(&writes[0].bytes, 0), word(part(table, 8), 0));
    assert_ne!(word(&writes[0].bytes, 0), 0);
    assert_eq!(word(&writes[0].bytes, 3), encoded(43));
    assert_eq!(word(&writes[0].bytes, 600), encoded(41));
    assert_eq!(word(&writes[1].bytes, 5), encoded(42));
    let untouched = writes[0]
        .bytes
        .chunks(8)
        .enumerate()
        .filter(|(i, w)| ![0, 3, 600].contains(i) && w.iter().any(|b| *b != 0))
        .count();
    assert_eq!(untouched, 0);
    let mixed = [update(0, 1, 50), update(1, 1, 51)];
    let err = meta.render_l2(&mixed).unwrap_err();
    assert!(err.to_string().contains("tables 0 and 1"), "{err}");
}
