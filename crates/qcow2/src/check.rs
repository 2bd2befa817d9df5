//! Refcount consistency, as `qemu-img check` sees it: every cluster's stored refcount is
//! compared with the references found by walking the header, the L1 and L2 tables and the
//! refcount structures. A refcount below its references (or a refcount-one flag that does
//! not match) is a corruption; one above is a leak.

use std::collections::BTreeMap;
use std::io;

use crate::entry::{decode_l1, Entry, COPIED};
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
        for cluster in start / cs..=(start + len.max(1) - 1) / cs {
            *refs.entry(cluster).or_default() += 1;
        }
    };
    reference(&mut refs, 0, cs);
    reference(
        &mut refs,
        header.l1_table_offset,
        u64::from(header.l1_size) * 8,
    );
    let table_len = u64::from(header.refcount_table_clusters) * cs;
    reference(&mut refs, header.refcount_table_offset, table_len);
    let mut table = vec![0u8; to_index(table_len)?];
    storage.read_at(&mut table, header.refcount_table_offset)?;
    let blocks: Vec<u64> = (0..table.len() / 8).map(|i| be64(&table, i)).collect();
    for block in blocks.iter().filter(|b| **b != 0) {
        reference(&mut refs, *block, cs);
    }
    let mut l1 = vec![0u8; to_index(u64::from(header.l1_size) * 8)?];
    storage.read_at(&mut l1, header.l1_table_offset)?;
    // (cluster, refcount-one flag, where) to verify once refcounts are known.
    let mut flagged: Vec<(u64, bool, String)> = Vec::new();
    let mut l2 = vec![0u8; to_index(cs)?];
    for i in 0..l1.len() / 8 {
        let at = header.l1_table_offset + i as u64 * 8;
        let word = be64(&l1, i);
        let Some((offset, _)) = decode_l1(word, &layout, at).map_err(to_io)? else {
            continue;
        };
        reference(&mut refs, offset, cs);
        flagged.push((offset / cs, word & COPIED != 0, format!("L1 entry {i}")));
        storage.read_at(&mut l2, offset)?;
        let n = to_index(layout.l2_entry_words())?;
        for j in 0..to_index(layout.l2_entries())? {
            let words = [
                be64(&l2, j * n),
                if n == 2 { be64(&l2, j * n + 1) } else { 0 },
            ];
            let at = offset + (j * n * 8) as u64;
            match Entry::decode(words, &layout, at) {
                Err(e) => report.corruptions.push(e.to_string()),
                Ok(Entry::Standard {
                    host: Some(host),
                    copied,
                    ..
                }) => {
                    reference(&mut refs, host, cs);
                    flagged.push((host / cs, copied, format!("L2 entry at {at:#x}")));
                }
                Ok(Entry::Compressed { host, len }) => reference(&mut refs, host, len),
                Ok(Entry::Standard { host: None, .. }) => {}
            }
        }
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
