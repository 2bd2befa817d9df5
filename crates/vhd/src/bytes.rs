//! Big-endian field access over byte slices and the VHD one's-complement
//! checksum. All accessors are bounds-checked by the callers (they parse
//! fixed-size buffers whose length was verified first).

/// Reads a big-endian `u32` at `at`. The caller guarantees `at + 4 <= b.len()`.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

/// Reads a big-endian `u64` at `at`. The caller guarantees `at + 8 <= b.len()`.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// Writes a big-endian `u32` at `at`.
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian `u64` at `at`.
pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Copies `N` bytes starting at `at`.
pub(crate) fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut v = [0u8; N];
    v.copy_from_slice(&b[at..at + N]);
    v
}

/// One's complement of the byte sum of `bytes`, skipping the four checksum
/// bytes at `checksum_at` (they count as zero).
pub fn ones_complement_checksum(bytes: &[u8], checksum_at: Option<usize>) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(c) = checksum_at {
            if (c..c + 4).contains(&i) {
                continue;
            }
        }
        sum = sum.wrapping_add(u32::from(b));
    }
    !sum
}

/// True when every byte is zero.
pub(crate) fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Rounds `v` up to a multiple of `to` (a power of two or any non-zero value).
pub(crate) fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_skips_field() {
        let mut b = [1u8; 16];
        b[4..8].copy_from_slice(&[0xff; 4]);
        assert_eq!(ones_complement_checksum(&b, Some(4)), !12u32);
        assert_eq!(ones_complement_checksum(&[], None), u32::MAX);
    }

    #[test]
    fn be_round_trip() {
        let mut b = [0u8; 12];
        put32(&mut b, 0, 0x0102_0304);
        put64(&mut b, 4, 0x0506_0708_090a_0b0c);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(be32(&b, 0), 0x0102_0304);
        assert_eq!(be64(&b, 4), 0x0506_0708_090a_0b0c);
    }
}
