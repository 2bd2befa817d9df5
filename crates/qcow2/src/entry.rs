//! L1 and L2 table entries: decoding with validation, and encoding.
//!
//! A standard L2 entry is modelled as a host cluster plus per-subcluster "allocated" and
//! "reads as zeros" bits. Without extended L2 entries a cluster is one subcluster: bit 0 of
//! `alloc` means the cluster holds data, bit 0 of `zero` is the zero flag. With extended L2
//! entries the 32 bits of each come from the entry's second word. Compressed clusters have no
//! subclusters.

use crate::error::{Qcow2Error, Result};
use crate::layout::Layout;

/// Host offset bits of L1 entries and standard L2 entries (9-55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one" (bit 63).
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster (bit 62).
pub const COMPRESSED: u64 = 1 << 62;
/// Standard descriptor: reads as zeros (bit 0, v3 without extended L2 entries).
pub const ZERO_FLAG: u64 = 1;
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Decodes an L1 entry read at file offset `at`: the L2 table's offset (`None` when
/// unallocated) and whether its refcount is exactly one.
pub fn decode_l1(word: u64, layout: &Layout, at: u64) -> Result<Option<(u64, bool)>> {
    if word & L1_RESERVED != 0 {
        return Err(Qcow2Error::field(
            "L1 table",
            "entry",
            at,
            format!("{word:#018x} has reserved bits set"),
        ));
    }
    let offset = word & OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if offset % layout.cluster_size() != 0 {
        return Err(Qcow2Error::field(
            "L1 table",
            "entry",
            at,
            format!("L2 table offset {offset:#x} is not cluster aligned"),
        ));
    }
    Ok(Some((offset, word & COPIED != 0)))
}

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A standard descriptor.
    Standard {
        /// The host cluster (allocated data or preallocated zeros), if any.
        host: Option<u64>,
        /// Refcount of the host cluster is exactly one.
        copied: bool,
        /// Subclusters holding data (bit 0 alone without extended L2 entries).
        alloc: u32,
        /// Subclusters reading as zeros.
        zero: u32,
    },
    /// A compressed cluster.
    Compressed {
        /// Byte offset of the compressed data.
        host: u64,
        /// Bytes to read there (whole 512-byte sectors from the one holding `host`).
        len: u64,
    },
}

impl Entry {
    /// An unallocated cluster.
    pub const UNALLOCATED: Self = Self::Standard {
        host: None,
        copied: false,
        alloc: 0,
        zero: 0,
    };

    /// Mask of every subcluster of a cluster of `layout`.
    pub fn all_subclusters(layout: &Layout) -> u32 {
        if layout.extended_l2 {
            u32::MAX
        } else {
            1
        }
    }

    /// Decodes the L2 entry `words` (the second word is the subcluster bitmap with extended
    /// L2 entries, else ignored) found at file offset `at`.
    pub fn decode(words: [u64; 2], layout: &Layout, at: u64) -> Result<Self> {
        let word = words[0];
        let invalid = |reason: String| Qcow2Error::field("L2 table", "entry", at, reason);
        if word & COMPRESSED != 0 {
            let x = 62 - (layout.cluster_bits - 8);
            let host = word & ((1 << x) - 1);
            let sectors = (word & !(COPIED | COMPRESSED)) >> x;
            if host >= 1 << 56 {
                return Err(invalid(format!(
                    "compressed cluster offset {host:#x} lies past 2^56"
                )));
            }
            if word & COPIED != 0 {
                return Err(invalid(format!(
                    "{word:#018x}: a compressed cluster cannot have its refcount-one bit set"
                )));
            }
            let len = (sectors + 1) * 512 - (host & 511);
            return Ok(Self::Compressed { host, len });
        }
        if word & L2_RESERVED != 0 {
            return Err(invalid(format!("{word:#018x} has reserved bits set")));
        }
        let offset = word & OFFSET_MASK;
        let copied = word & COPIED != 0;
        if offset % layout.cluster_size() != 0 {
            return Err(invalid(format!(
                "host offset {offset:#x} is not cluster aligned"
            )));
        }
        if offset == 0 && copied {
            return Err(invalid(format!(
                "{word:#018x}: refcount-one bit set on an unallocated cluster"
            )));
        }
        let host = (offset != 0).then_some(offset);
        let zero_flag = word & ZERO_FLAG != 0;
        if layout.extended_l2 {
            if zero_flag {
                return Err(invalid(format!(
                    "{word:#018x}: bit 0 must be clear with extended L2 entries"
                )));
            }
            let bitmap = words[1];
            #[allow(
                clippy::cast_possible_truncation,
                reason = "the two halves of the bitmap"
            )]
            let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
            if alloc & zero != 0 {
                return Err(invalid(format!(
                    "subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero"
                )));
            }
            if alloc != 0 && host.is_none() {
                return Err(invalid(format!(
                    "subcluster bitmap {bitmap:#018x} marks subclusters allocated without a host cluster"
                )));
            }
            return Ok(Self::Standard {
                host,
                copied,
                alloc,
                zero,
            });
        }
        if zero_flag && !layout.v3 {
            return Err(invalid(format!(
                "{word:#018x}: zero clusters do not exist in version 2 images"
            )));
        }
        Ok(Self::Standard {
            host,
            copied,
            alloc: u32::from(host.is_some() && !zero_flag),
            zero: u32::from(zero_flag),
        })
    }

    /// The entry's words (the second one is only stored with extended L2 entries).
    pub fn encode(&self, layout: &Layout) -> [u64; 2] {
        match *self {
            Self::Standard {
                host,
                copied,
                alloc,
                zero,
            } => {
                let mut word = host.unwrap_or(0);
                if copied {
                    word |= COPIED;
                }
                if layout.extended_l2 {
                    [word, u64::from(alloc) | (u64::from(zero) << 32)]
                } else {
                    if zero & 1 != 0 {
                        word |= ZERO_FLAG;
                    }
                    [word, 0]
                }
            }
            Self::Compressed { host, len } => {
                let x = 62 - (layout.cluster_bits - 8);
                let sectors = ((host & 511) + len).div_ceil(512) - 1;
                [COMPRESSED | (sectors << x) | host, 0]
            }
        }
    }

    /// True when no subcluster holds data, reads as zeros or is compressed: the cluster
    /// reads from the backing file.
    pub fn is_unallocated(&self) -> bool {
        matches!(
            self,
            Self::Standard {
                alloc: 0,
                zero: 0,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(cluster_bits: u32, extended_l2: bool) -> Layout {
        Layout {
            cluster_bits,
            extended_l2,
            refcount_order: 4,
            size: 1 << 30,
            l1_size: 16,
            l1_table_offset: 1 << cluster_bits,
            v3: true,
            has_backing: false,
        }
    }

    #[test]
    fn standard_entries_decode_and_encode() {
        let l = layout(16, false);
        let data = Entry::decode([COPIED | 0x50000, 0], &l, 0).unwrap();
        assert_eq!(
            data,
            Entry::Standard {
                host: Some(0x50000),
                copied: true,
                alloc: 1,
                zero: 0
            }
        );
        assert_eq!(data.encode(&l), [COPIED | 0x50000, 0]);
        let zero = Entry::decode([ZERO_FLAG, 0], &l, 0).unwrap();
        assert_eq!(zero.encode(&l), [ZERO_FLAG, 0]);
        assert!(!zero.is_unallocated());
        assert!(Entry::decode([0, 0], &l, 0).unwrap().is_unallocated());
        // Unaligned, reserved bits, refcount-one on nothing.
        for word in [0x50200, 0x50000 | 0x100, COPIED] {
            assert!(Entry::decode([word, 0], &l, 8).is_err(), "{word:#x}");
        }
        let v2 = Layout { v3: false, ..l };
        let err = Entry::decode([ZERO_FLAG, 0], &v2, 8).unwrap_err();
        assert!(err.to_string().contains("version 2"));
    }

    #[test]
    fn compressed_descriptors_follow_the_cluster_size() {
        for bits in 9..=21 {
            let l = layout(bits, false);
            let host = 0x1234_5677u64;
            // Compressed data is never longer than a cluster.
            let want = 1000.min(1 << (bits - 1));
            let entry = Entry::Compressed { host, len: want };
            let words = entry.encode(&l);
            match Entry::decode(words, &l, 0).unwrap() {
                Entry::Compressed { host: h, len } => {
                    assert_eq!(h, host);
                    // Whole sectors from the one holding the offset.
                    assert!(len >= want && (h + len) % 512 == 0, "{bits}: {len}");
                }
                other => panic!("{other:?}"),
            }
        }
        // 64 KiB clusters: offset in bits 0-53, extra sectors in bits 54-61.
        let l = layout(16, false);
        let word = COMPRESSED | (3 << 54) | 0x10_0100;
        assert_eq!(
            Entry::decode([word, 0], &l, 0).unwrap(),
            Entry::Compressed {
                host: 0x10_0100,
                len: 4 * 512 - 256
            }
        );
    }

    #[test]
    fn extended_entries_carry_subcluster_bits() {
        let l = layout(16, true);
        let entry = Entry::decode([COPIED | 0x70000, 0x0000_0003_0000_000c], &l, 0).unwrap();
        assert_eq!(
            entry,
            Entry::Standard {
                host: Some(0x70000),
                copied: true,
                alloc: 0xc,
                zero: 0x3
            }
        );
        assert_eq!(entry.encode(&l), [COPIED | 0x70000, 0x0000_0003_0000_000c]);
        assert!(Entry::decode([COPIED | 0x70000, 0x0000_0001_0000_0001], &l, 0).is_err());
        assert!(Entry::decode([0, 1], &l, 0).is_err());
        assert!(Entry::decode([ZERO_FLAG, 0], &l, 0).is_err());
    }

    #[test]
    fn l1_entries() {
        let l = layout(16, false);
        assert_eq!(decode_l1(0, &l, 0).unwrap(), None);
        assert_eq!(
            decode_l1(COPIED | 0x40000, &l, 0).unwrap(),
            Some((0x40000, true))
        );
        assert!(decode_l1(0x40001, &l, 0).is_err());
        assert!(decode_l1(0x40200, &l, 0).is_err());
    }
}
