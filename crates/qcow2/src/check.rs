//! Refcount consistency, as `qemu-img check` sees it: every cluster's stored refcount is
//! compared with the references found by walking the header, the L1 and L2 tables and the
//! refcount structures. A refcount below its references (or a refcount-one flag that does
//! not match) is a corruption; one above is a leak. [`rebuild_refcounts`] writes refcounts
//! from the same walk, for images whose dirty bit says the stored ones may be stale.

use std::collections::BTreeMap;
use std::io;

use crate::entry::{decode_l1, Entry, COPIED};
use crate::error::Qcow2Error;
use crate::header::{incompatible, offsets, Header};
use crate::image::{read_header, to_io, Storage};
use crate::layout::Layout;
use crate::refcount;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions, each described.
    pub corruptions: Vec<String>,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
}

impl CheckReport {
    /// No corruption (leaks allowed).
    pub fn is_consistent(&self) -> bool {
        self.corruptions.is_empty()
    }
}

fn be64(bytes: &[u8], index: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
    u64::from_be_bytes(word)
}

fn to_index(value: u64) -> io::Result<usize> {
    usize::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// What the walk of an image's mapping finds.
enum Found {
    /// Bytes `[start, start + len)` of the file are in use (one reference to each cluster
    /// they touch).
    Used { start: u64, len: u64 },
    /// A table entry pointing at `cluster` carries the refcount-one flag `copied`; `l1` is
    /// the L1 index for an L2 table, else `at` is where the L2 entry lies.
    Flag {
        cluster: u64,
        copied: bool,
        l1: Option<usize>,
        at: u64,
    },
    /// An L2 entry that cannot be decoded.
    Bad(Qcow2Error),
}

/// Walks the header cluster, the active L1 table, the L2 tables and the data clusters they
/// map, telling `found` about each.
fn walk_mapping<S: Storage>(
    storage: &mut S,
    header: &Header,
    layout: &Layout,
    found: &mut dyn FnMut(Found) -> io::Result<()>,
) -> io::Result<()> {
    let cs = layout.cluster_size();
    found(Found::Used { start: 0, len: cs })?;
    found(Found::Used {
        start: header.l1_table_offset,
        len: u64::from(header.l1_size) * 8,
    })?;
    let mut l1 = vec![0u8; to_index(u64::from(header.l1_size) * 8)?];
    storage.read_at(&mut l1, header.l1_table_offset)?;
    let mut l2 = vec![0u8; to_index(cs)?];
    for i in 0..l1.len() / 8 {
        let at = header.l1_table_offset + i as u64 * 8;
        let word = be64(&l1, i);
        let Some((offset, _)) = decode_l1(word, layout, at).map_err(to_io)? else {
            continue;
        };
        found(Found::Used {
            start: offset,
            len: cs,
        })?;
        found(Found::Flag {
            cluster: offset / cs,
            copied: word & COPIED != 0,
            l1: Some(i),
            at,
        })?;
        storage.read_at(&mut l2, offset)?;
        let n = to_index(layout.l2_entry_words())?;
        for j in 0..to_index(layout.l2_entries())? {
            let words = [
                be64(&l2, j * n),
                if n == 2 { be64(&l2, j * n + 1) } else { 0 },
            ];
            let at = offset + (j * n * 8) as u64;
            match Entry::decode(words, layout, at) {
                Err(e) => found(Found::Bad(e))?,
                Ok(Entry::Standard {
                    host: Some(host),
                    copied,
                    ..
                }) => {
                    found(Found::Used {
                        start: host,
                        len: cs,
                    })?;
                    found(Found::Flag {
                        cluster: host / cs,
                        copied,
                        l1: None,
                        at,
                    })?;
                }
                Ok(Entry::Compressed { host, len }) => found(Found::Used { start: host, len })?,
                Ok(Entry::Standard { host: None, .. }) => {}
            }
        }
    }
    Ok(())
}

/// The clusters bytes `[start, start + len)` touch.
fn clusters(start: u64, len: u64, cs: u64) -> std::ops::RangeInclusive<u64> {
    start / cs..=(start + len.max(1) - 1) / cs
}

/// Checks the image in `storage` (images with internal snapshots are not supported).
pub fn check<S: Storage>(storage: &mut S) -> io::Result<CheckReport> {
    let header = read_header(storage)?;
    let layout = Layout::of(&header);
    let cs = layout.cluster_size();
    let mut report = CheckReport::default();
    if header.nb_snapshots > 0 {
        report
            .corruptions
            .push("internal snapshots are not checked".to_owned());
        return Ok(report);
    }
    let mut refs: BTreeMap<u64, u64> = BTreeMap::new();
    let reference = |refs: &mut BTreeMap<u64, u64>, start: u64, len: u64| {
        for cluster in clusters(start, len, cs) {
            *refs.entry(cluster).or_default() += 1;
        }
    };
    // (cluster, refcount-one flag, where) to verify once refcounts are known.
    let mut flagged: Vec<(u64, bool, String)> = Vec::new();
    walk_mapping(storage, &header, &layout, &mut |found| {
        match found {
            Found::Used { start, len } => reference(&mut refs, start, len),
            Found::Flag {
                cluster,
                copied,
                l1,
                at,
            } => flagged.push((
                cluster,
                copied,
                match l1 {
                    Some(i) => format!("L1 entry {i}"),
                    None => format!("L2 entry at {at:#x}"),
                },
            )),
            Found::Bad(e) => report.corruptions.push(e.to_string()),
        }
        Ok(())
    })?;
    let table_len = u64::from(header.refcount_table_clusters) * cs;
    reference(&mut refs, header.refcount_table_offset, table_len);
    let mut table = vec![0u8; to_index(table_len)?];
    storage.read_at(&mut table, header.refcount_table_offset)?;
    let blocks: Vec<u64> = (0..table.len() / 8).map(|i| be64(&table, i)).collect();
    for block in blocks.iter().filter(|b| **b != 0) {
        reference(&mut refs, *block, cs);
    }
    let rbe = layout.refblock_entries();
    let mut block = vec![0u8; to_index(cs)?];
    let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
    for (rt, offset) in blocks.iter().enumerate() {
        if *offset == 0 {
            continue;
        }
        storage.read_at(&mut block, *offset)?;
        // Eight bytes at a time: most of a block is usually zero.
        let per_word = 64 >> header.refcount_order;
        for (word, bytes) in block.chunks_exact(8).enumerate() {
            if bytes.iter().all(|b| *b == 0) {
                continue;
            }
            for index in word as u64 * per_word..(word as u64 + 1) * per_word {
                let count = refcount::get(&block, index, header.refcount_order);
                if count != 0 {
                    stored.insert(rt as u64 * rbe + index, count);
                }
            }
        }
    }
    for (cluster, count) in &stored {
        let expected = refs.get(cluster).copied().unwrap_or(0);
        if *count < expected {
            report.corruptions.push(format!(
                "cluster {cluster}: refcount {count}, referenced {expected} times"
            ));
        } else if *count > expected {
            report.leaks += 1;
        }
    }
    for (cluster, expected) in &refs {
        if !stored.contains_key(cluster) {
            report.corruptions.push(format!(
                "cluster {cluster}: refcount 0, referenced {expected} times"
            ));
        }
    }
    for (cluster, copied, what) in flagged {
        let count = stored.get(&cluster).copied().unwrap_or(0);
        if copied != (count == 1) {
            report.corruptions.push(format!(
                "{what}: refcount-one flag {copied} but cluster {cluster} has refcount {count}"
            ));
        }
    }
    Ok(report)
}

/// Rebuilds the refcounts of an image whose dirty bit is set (its stored refcounts may be
/// stale, as after a crash with lazy refcounts), as the specification requires before the
/// image is written: counts the references of the header, L1 and L2 tables and data
/// clusters, writes a new refcount table and blocks after everything else in the file,
/// then points the header at them and clears the dirty bit, syncing between the steps. A
/// crash at any point leaves either the old dirty image or the rebuilt one (a later open
/// rebuilds again while the bit is set). The old refcount structures become free space.
/// Returns the new header. Refuses images with internal snapshots, what
/// [`Header::check_open`] refuses for reading, and references a refcount cannot hold.
pub fn rebuild_refcounts<S: Storage>(storage: &mut S) -> io::Result<Header> {
    let header = read_header(storage)?;
    header.check_open(false).map_err(to_io)?;
    if header.nb_snapshots > 0 {
        return Err(to_io(Qcow2Error::unsupported(format!(
            "rebuilding the refcounts of an image with {} internal snapshots",
            header.nb_snapshots
        ))));
    }
    let layout = Layout::of(&header);
    let cs = layout.cluster_size();
    let order = layout.refcount_order;
    let max = layout.refcount_max();
    let file_clusters = storage.file_len()?.div_ceil(cs);
    // The new refcounts, packed as the blocks hold them: the blocks are slices of this.
    let bytes_for = |clusters: u64| to_index((clusters << order).div_ceil(8));
    let mut counts = vec![0u8; bytes_for(file_clusters)?];
    walk_mapping(storage, &header, &layout, &mut |found| match found {
        Found::Used { start, len } => {
            for cluster in clusters(start, len, cs) {
                if cluster >= file_clusters {
                    return Err(to_io(Qcow2Error::field(
                        "mapping",
                        "host offset",
                        start,
                        format!(
                            "cluster {cluster} lies beyond the end of the file \
                             ({file_clusters} clusters): cannot rebuild the refcounts \
                             (`qemu-img check -r all` repairs this)"
                        ),
                    )));
                }
                let count = refcount::get(&counts, cluster, order);
                if count == max {
                    return Err(to_io(Qcow2Error::field(
                        "refcount",
                        "width",
                        offsets::REFCOUNT_ORDER as u64,
                        format!(
                            "cluster {cluster} is referenced more often than {}-bit refcounts hold",
                            layout.refcount_bits()
                        ),
                    )));
                }
                refcount::set(&mut counts, cluster, order, count + 1);
            }
            Ok(())
        }
        Found::Flag { .. } => Ok(()),
        Found::Bad(e) => Err(to_io(e)),
    })?;
    // The new blocks and table go after the end of the file, and count themselves.
    let rbe = layout.refblock_entries();
    let (mut blocks, mut table_clusters) = (0u64, 0u64);
    loop {
        let end = file_clusters + blocks + table_clusters;
        let need_blocks = end.div_ceil(rbe);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if (need_blocks, need_table) == (blocks, table_clusters) {
            break;
        }
        (blocks, table_clusters) = (need_blocks, need_table);
    }
    let table_clusters_u32 = u32::try_from(table_clusters).map_err(|_| {
        to_io(Qcow2Error::field(
            "header",
            "refcount_table_clusters",
            offsets::REFCOUNT_TABLE_CLUSTERS as u64,
            format!("{table_clusters} clusters do not fit"),
        ))
    })?;
    counts.resize(bytes_for(blocks * rbe)?, 0);
    for cluster in file_clusters..file_clusters + blocks + table_clusters {
        refcount::set(&mut counts, cluster, order, 1);
    }
    let mut table = vec![0u8; to_index(table_clusters * cs)?];
    for (index, block) in counts.chunks(to_index(cs)?).enumerate() {
        let offset = (file_clusters + index as u64) * cs;
        storage.write_at(block, offset)?;
        table[index * 8..index * 8 + 8].copy_from_slice(&offset.to_be_bytes());
    }
    let table_offset = (file_clusters + blocks) * cs;
    storage.write_at(&table, table_offset)?;
    storage.sync()?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_offset.to_be_bytes());
    fields[8..].copy_from_slice(&table_clusters_u32.to_be_bytes());
    storage.write_at(&fields, offsets::REFCOUNT_TABLE_OFFSET as u64)?;
    storage.sync()?;
    let features = header.incompatible_features & !incompatible::DIRTY;
    storage.write_at(
        &features.to_be_bytes(),
        offsets::INCOMPATIBLE_FEATURES as u64,
    )?;
    storage.sync()?;
    read_header(storage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{create, CreateOptions, Image};

    #[test]
    fn stale_refcounts_of_a_dirty_image_are_rebuilt() {
        for (cluster_bits, refcount_order) in [(16, 4), (9, 0), (12, 6)] {
            let options = CreateOptions {
                cluster_bits,
                refcount_order,
                ..CreateOptions::new(4 << 20)
            };
            let mut image = Image::open(create(&options).unwrap(), true).unwrap();
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            image.write(1 << 20, &data).unwrap();
            image.write(3 << 20, &data[..5000]).unwrap();
            let mut bytes = image.close().unwrap();
            // Stale refcounts, as lazy refcounts leave them after a crash: the first block
            // is blank, and the dirty bit says so.
            let header = read_header(&mut bytes).unwrap();
            let block = be64(&bytes[to_index(header.refcount_table_offset).unwrap()..], 0);
            let cs = header.cluster_size();
            bytes[to_index(block).unwrap()..to_index(block + cs).unwrap()].fill(0);
            bytes[79] |= 1;
            assert!(!check(&mut bytes).unwrap().is_consistent());
            assert!(
                Image::open(bytes.clone(), true).is_err(),
                "dirty images are refused"
            );

            let rebuilt = rebuild_refcounts(&mut bytes).unwrap();
            assert_eq!(rebuilt.incompatible_features & incompatible::DIRTY, 0);
            let report = check(&mut bytes).unwrap();
            assert_eq!(report, CheckReport::default(), "order {refcount_order}");
            let mut image = Image::open(bytes, true).unwrap();
            let mut back = vec![0u8; data.len()];
            image.read(1 << 20, &mut back).unwrap();
            assert!(back == data);
            // Writes after the rebuild allocate from the new refcounts.
            image.write(2 << 20, &data[..70_000]).unwrap();
            let mut bytes = image.close().unwrap();
            assert_eq!(check(&mut bytes).unwrap(), CheckReport::default());
            // A mapping beyond the end of the file is refused, the image left as it was.
            bytes[79] |= 1;
            bytes.truncate(bytes.len() / 2);
            let before = bytes.clone();
            let err = rebuild_refcounts(&mut bytes).unwrap_err();
            assert!(
                err.to_string().contains("beyond the end of the file"),
                "{err}"
            );
            assert!(bytes == before);
        }
    }
}
