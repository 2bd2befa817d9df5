//! Per-block sector bitmaps: one bit per sector, most significant bit
//! first, padded to a whole 512-byte sector on disk.

/// Bytes of a sector bitmap for `sectors_per_block` sectors, sector padded.
pub fn bitmap_bytes(sectors_per_block: u64) -> u64 {
    crate::bytes::round_up(sectors_per_block.div_ceil(8), 512).max(512)
}

/// A sector bitmap held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectorBitmap {
    bits: Vec<u8>,
}

impl SectorBitmap {
    /// An all-clear bitmap of `bytes` bytes.
    pub fn zeroed(bytes: usize) -> Self {
        Self {
            bits: vec![0; bytes],
        }
    }

    /// Wraps raw on-disk bytes.
    pub fn from_bytes(bits: Vec<u8>) -> Self {
        Self { bits }
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Whether sector `i` is set; bits past the buffer read as clear.
    pub fn get(&self, i: u64) -> bool {
        test_bit(&self.bits, i)
    }

    /// Sets sector `i` (ignored past the buffer).
    pub fn set(&mut self, i: u64) {
        set_bit(&mut self.bits, i);
    }

    /// Clears sector `i` (ignored past the buffer).
    pub fn clear(&mut self, i: u64) {
        clear_bit(&mut self.bits, i);
    }

    /// Sets or clears `count` sectors from `first`.
    pub fn set_range(&mut self, first: u64, count: u64, value: bool) {
        for i in first..first.saturating_add(count) {
            if value {
                self.set(i);
            } else {
                self.clear(i);
            }
        }
    }

    /// Whether the first `n` sectors are all set.
    pub fn all_set(&self, n: u64) -> bool {
        let full = usize::try_from(n / 8).unwrap_or(usize::MAX);
        if full > self.bits.len() {
            return false;
        }
        self.bits[..full].iter().all(|&b| b == 0xff) && (full as u64 * 8..n).all(|i| self.get(i))
    }

    /// Whether the first `n` sectors are all clear.
    pub fn none_set(&self, n: u64) -> bool {
        let full = usize::try_from(n / 8)
            .unwrap_or(usize::MAX)
            .min(self.bits.len());
        self.bits[..full].iter().all(|&b| b == 0) && (full as u64 * 8..n).all(|i| !self.get(i))
    }

    /// Number of set bits among the first `n` sectors.
    pub fn count(&self, n: u64) -> u64 {
        (0..n).filter(|&i| self.get(i)).count() as u64
    }

    /// Runs of equal bits within `[first, first+count)`: `(start, len, set)`.
    pub fn runs(&self, first: u64, count: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for i in first..first + count {
            let v = self.get(i);
            match out.last_mut() {
                Some((_, len, set)) if *set == v => *len += 1,
                _ => out.push((i, 1, v)),
            }
        }
        out
    }
}

/// Tests bit `i` (MSB first) of `bits`; out of range reads as clear.
pub fn test_bit(bits: &[u8], i: u64) -> bool {
    usize::try_from(i / 8)
        .ok()
        .and_then(|at| bits.get(at))
        .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

/// Sets bit `i` (MSB first); out of range is ignored.
pub fn set_bit(bits: &mut [u8], i: u64) {
    if let Some(b) = usize::try_from(i / 8).ok().and_then(|at| bits.get_mut(at)) {
        *b |= 0x80 >> (i % 8);
    }
}

/// Clears bit `i` (MSB first); out of range is ignored.
pub fn clear_bit(bits: &mut [u8], i: u64) {
    if let Some(b) = usize::try_from(i / 8).ok().and_then(|at| bits.get_mut(at)) {
        *b &= !(0x80 >> (i % 8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first() {
        let mut m = SectorBitmap::zeroed(512);
        m.set(0);
        m.set(9);
        assert_eq!(&m.as_bytes()[..2], &[0x80, 0x40]);
        assert!(m.get(0) && m.get(9) && !m.get(1));
        m.clear(0);
        assert_eq!(m.as_bytes()[0], 0);
        assert!(!m.get(1 << 40));
        m.set(1 << 40); // ignored
    }

    #[test]
    fn ranges_and_runs() {
        let mut m = SectorBitmap::zeroed(512);
        m.set_range(3, 10, true);
        assert_eq!(m.count(4096), 10);
        assert_eq!(
            m.runs(0, 16),
            vec![(0, 3, false), (3, 10, true), (13, 3, false)]
        );
        assert!(!m.all_set(4096));
        m.set_range(0, 4096, true);
        assert!(m.all_set(4096));
        assert_eq!(m.as_bytes(), &[0xff; 512][..]);
        m.set_range(0, 4096, false);
        assert!(m.none_set(4096));
    }

    #[test]
    fn sizes() {
        assert_eq!(bitmap_bytes(4096), 512);
        assert_eq!(bitmap_bytes(8), 512);
        assert_eq!(bitmap_bytes(8192), 1024);
    }
}
