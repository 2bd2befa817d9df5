//! The Block Allocation Table: big-endian `u32` sector offsets of each
//! block's bitmap, `0xFFFFFFFF` for an unallocated block.

use crate::bytes::be32;
use crate::error::FormatError;

/// BAT value of an unallocated block.
pub const BAT_UNUSED: u32 = u32::MAX;

/// In-memory BAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bat {
    /// One entry per block.
    pub entries: Vec<u32>,
}

impl Bat {
    /// A BAT of `n` unallocated entries.
    pub fn unallocated(n: usize) -> Self {
        Self {
            entries: vec![BAT_UNUSED; n],
        }
    }

    /// Decodes `n` entries. `base` is the absolute offset for errors.
    pub fn parse(b: &[u8], n: usize, base: u64) -> Result<Self, FormatError> {
        let needed = n.checked_mul(4).ok_or_else(|| {
            FormatError::field("BAT", "max_table_entries", base, "entry count overflows")
        })?;
        if b.len() < needed {
            return Err(FormatError::Truncated {
                structure: "BAT",
                offset: base,
                needed,
                available: b.len(),
            });
        }
        Ok(Self {
            entries: (0..n).map(|i| be32(b, 4 * i)).collect(),
        })
    }

    /// Encodes, padded with `0xFF` bytes to a whole sector as tapdisk does.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = crate::bytes::round_up(self.entries.len() as u64 * 4, 512).max(512);
        let mut b = vec![0xff; usize::try_from(len).unwrap_or(0)];
        for (i, e) in self.entries.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&e.to_be_bytes());
        }
        b
    }

    /// Entry `block`, or `None` past the table.
    pub fn get(&self, block: u64) -> Option<u32> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
    }

    /// Whether `block` is allocated.
    pub fn is_allocated(&self, block: u64) -> bool {
        self.get(block).is_some_and(|e| e != BAT_UNUSED)
    }

    /// Number of allocated entries.
    pub fn allocated_count(&self) -> u64 {
        self.entries.iter().filter(|&&e| e != BAT_UNUSED).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_exact() {
        let mut b = vec![0xffu8; 512];
        b[..4].copy_from_slice(&[0, 0, 0, 0x10]);
        b[8..12].copy_from_slice(&[0, 1, 0, 0]);
        let bat = Bat::parse(&b, 3, 1536).unwrap();
        assert_eq!(bat.entries, vec![16, BAT_UNUSED, 0x10000]);
        assert_eq!(bat.to_bytes(), b);
        assert_eq!(bat.allocated_count(), 2);
        assert!(bat.is_allocated(0) && !bat.is_allocated(1) && !bat.is_allocated(7));
        let e = Bat::parse(&b[..8], 3, 1536).unwrap_err().to_string();
        assert!(e.contains("1536"), "{e}");
    }
}
