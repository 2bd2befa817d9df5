//! Refcount block entries of every width qcow2 allows (1 to 64 bits). Entries narrower than
//! a byte are packed from the least significant bit; wider ones are big-endian.

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    let bit = index * bits;
    let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
    if bits < 8 {
        let shift = bit % 8;
        let mask = (1u64 << bits) - 1;
        block
            .get(byte)
            .map_or(0, |b| (u64::from(*b) >> shift) & mask)
    } else {
        let width = usize::try_from(bits / 8).unwrap_or(8);
        block.get(byte..byte + width).map_or(0, |bytes| {
            bytes
                .iter()
                .fold(0u64, |value, b| (value << 8) | u64::from(*b))
        })
    }
}

/// Writes entry `index` of a refcount block with `1 << order`-bit entries; `value` must fit.
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    let bit = index * bits;
    let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
    if bits < 8 {
        let shift = bit % 8;
        let mask = ((1u64 << bits) - 1) << shift;
        if let Some(b) = block.get_mut(byte) {
            let merged = (u64::from(*b) & !mask) | ((value << shift) & mask);
            *b = u8::try_from(merged & 0xff).unwrap_or(0);
        }
    } else {
        let width = usize::try_from(bits / 8).unwrap_or(8);
        if let Some(bytes) = block.get_mut(byte..byte + width) {
            let be = value.to_be_bytes();
            bytes.copy_from_slice(&be[8 - width..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 64];
            let entries = 64 * 8 / bits;
            for i in 0..entries {
                set(&mut block, i, order, (i * 7 + 1) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, i, order),
                    (i * 7 + 1) & max,
                    "order {order} entry {i}"
                );
            }
            set(&mut block, 3, order, max);
            assert_eq!(get(&block, 3, order), max);
            assert_eq!(get(&block, 2, order), 15 & max);
            assert_eq!(get(&block, 4, order), 29 & max);
        }
        // 1-bit refcounts: entry 0 is the least significant bit of byte 0.
        let mut block = vec![0u8; 2];
        set(&mut block, 0, 0, 1);
        set(&mut block, 9, 0, 1);
        assert_eq!(block, vec![0x01, 0x02]);
        // 16-bit refcounts are big-endian.
        let mut block = vec![0u8; 4];
        set(&mut block, 1, 4, 0x0102);
        assert_eq!(block, vec![0, 0, 1, 2]);
    }
}
