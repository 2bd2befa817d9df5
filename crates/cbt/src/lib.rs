//! The changed-block-tracking (CBT) log of blktap: one file per disk that records which
//! 64 KiB blocks were written since the log was created. Pure code over bytes, no I/O:
//! `cbt-util` and tapdisk's log layer read and write the files themselves.
//!
//! # File format
//!
//! A 48-byte header ([`LogHeader`]), little-endian, then the bitmap:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 16 | `parent`: raw UUID of the previous log in the chain, zero = none |
//! | 16 | 16 | `child`: raw UUID of the next log, zero = none |
//! | 32 | 4 | `consistent`: `i32`, 1 = not in use by a running tapdisk |
//! | 36 | 4 | padding (kept as read) |
//! | 40 | 8 | `size`: `u64` disk size in bytes |
//! | 48 | N | bitmap: bit `n` (byte `n / 8`, bit `n % 8` counted from the least significant) stands for bytes `[n * 65536, (n + 1) * 65536)` of the disk |
//!
//! N is [`bitmap_len`]`(size)`: one bit per started 64 KiB block, rounded up to whole bytes.
//! There is no magic number, version or checksum, so the only checks a reader can make are
//! lengths: a file is a log of a `size`-byte disk when it holds at least `48 + N` bytes
//! (longer files are allowed: on LVM the log is a fixed 4 MiB volume). The bits past the
//! last block in the last byte carry no meaning.

#![forbid(unsafe_code)]

use std::ops::Range;

/// Bytes of the header before the bitmap.
pub const HEADER_LEN: usize = 48;
/// Bytes of disk one bit of the bitmap stands for.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// A raw UUID as the header stores it (bytes in textual order).
pub type Uuid = [u8; 16];

/// Offsets of the header fields.
mod offset {
    pub const PARENT: usize = 0;
    pub const CHILD: usize = 16;
    pub const CONSISTENT: usize = 32;
    pub const PADDING: usize = 36;
    pub const SIZE: usize = 40;
}

/// Why bytes are not a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the header.
    #[error("{len} bytes are shorter than the 48-byte CBT log header")]
    ShortHeader {
        /// Bytes available.
        len: u64,
    },
    /// The bitmap the header's size calls for is not all there.
    #[error(
        "{len} bytes are shorter than a CBT log of a {size}-byte disk, which needs {needed} \
         (the 48-byte header and {} bytes of bitmap)",
        needed - HEADER_LEN as u64
    )]
    ShortBitmap {
        /// Bytes available.
        len: u64,
        /// The disk size the header records.
        size: u64,
        /// Bytes a log of that size needs.
        needed: u64,
    },
    /// The bitmap of a disk of this size cannot be held in memory on this machine.
    #[error("the bitmap of a {size}-byte disk does not fit in memory")]
    TooLarge {
        /// The disk size.
        size: u64,
    },
    /// Coalescing a longer bitmap into a shorter one.
    #[error("a bitmap of {older} bytes cannot be merged into one of {newer} bytes")]
    LongerBitmap {
        /// Bytes of the bitmap merged in.
        older: usize,
        /// Bytes of the bitmap merged into.
        newer: usize,
    },
}

/// Blocks of a `size`-byte disk: one per started 64 KiB.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Bytes of the bitmap of a `size`-byte disk.
pub fn bitmap_len(size: u64) -> u64 {
    block_count(size).div_ceil(8)
}

/// Bytes of the whole log of a `size`-byte disk (header and bitmap).
pub fn log_len(size: u64) -> u64 {
    // bitmap_len is at most 2^45, so this cannot overflow.
    HEADER_LEN as u64 + bitmap_len(size)
}

/// [`bitmap_len`] as a buffer length, `TooLarge` where it cannot be one.
pub fn bitmap_buffer_len(size: u64) -> Result<usize, FormatError> {
    usize::try_from(bitmap_len(size)).map_err(|_| FormatError::TooLarge { size })
}

/// The blocks that bytes `[offset, offset + len)` touch (empty for `len == 0`).
pub fn blocks_of(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    let last = offset.saturating_add(len - 1);
    offset / BLOCK_SIZE..last / BLOCK_SIZE + 1
}

/// The bitmap bytes that hold `blocks`, each with the mask of the bits of those blocks, in
/// order. What setting a range of blocks changes, for owned bitmaps and shared ones alike.
pub fn byte_masks(blocks: Range<u64>) -> impl Iterator<Item = (u64, u8)> {
    let (start, end) = (blocks.start, blocks.end.max(blocks.start));
    let first_byte = start / 8;
    let end_byte = end.div_ceil(8);
    (first_byte..end_byte).map(move |byte| {
        let lo = (byte * 8).max(start) - byte * 8;
        let hi = ((byte + 1) * 8).min(end) - byte * 8;
        // lo < hi <= 8: the bits lo..hi of this byte.
        let mask = (0xffu16 << lo) & !(0xffu16 << hi);
        (byte, mask.to_le_bytes()[0])
    })
}

/// The 48-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogHeader {
    /// The previous log in the chain (zero: none).
    pub parent: Uuid,
    /// The next log in the chain (zero: none).
    pub child: Uuid,
    /// 1 when no running tapdisk uses the log (the storage manager sets it).
    pub consistent: i32,
    /// The four padding bytes, kept so a header rewritten keeps them.
    pub padding: [u8; 4],
    /// Disk size in bytes.
    pub size: u64,
}

impl LogHeader {
    /// The header `cbt-util create` writes: no parent, no child, not consistent.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            ..Self::default()
        }
    }

    /// Reads the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|head| head.try_into().ok())
            .ok_or(FormatError::ShortHeader {
                len: bytes.len() as u64,
            })?;
        let field = |at: usize, len: usize| &header[at..at + len];
        let mut parent = Uuid::default();
        parent.copy_from_slice(field(offset::PARENT, 16));
        let mut child = Uuid::default();
        child.copy_from_slice(field(offset::CHILD, 16));
        let mut consistent = [0u8; 4];
        consistent.copy_from_slice(field(offset::CONSISTENT, 4));
        let mut padding = [0u8; 4];
        padding.copy_from_slice(field(offset::PADDING, 4));
        let mut size = [0u8; 8];
        size.copy_from_slice(field(offset::SIZE, 8));
        Ok(Self {
            parent,
            child,
            consistent: i32::from_le_bytes(consistent),
            padding,
            size: u64::from_le_bytes(size),
        })
    }

    /// The 48 bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[offset::PARENT..offset::PARENT + 16].copy_from_slice(&self.parent);
        out[offset::CHILD..offset::CHILD + 16].copy_from_slice(&self.child);
        out[offset::CONSISTENT..offset::CONSISTENT + 4]
            .copy_from_slice(&self.consistent.to_le_bytes());
        out[offset::PADDING..offset::PADDING + 4].copy_from_slice(&self.padding);
        out[offset::SIZE..offset::SIZE + 8].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    /// Checks that a file of `file_len` bytes holds this header's whole bitmap.
    pub fn check_len(&self, file_len: u64) -> Result<(), FormatError> {
        let needed = log_len(self.size);
        if file_len < needed {
            return Err(FormatError::ShortBitmap {
                len: file_len,
                size: self.size,
                needed,
            });
        }
        Ok(())
    }
}

/// A bitmap held in memory: [`bitmap_len`] bytes for a disk of some size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bytes: Vec<u8>,
    blocks: u64,
}

impl Bitmap {
    /// An empty bitmap (nothing changed) of a `size`-byte disk.
    pub fn zeroed(size: u64) -> Result<Self, FormatError> {
        Ok(Self {
            bytes: vec![0; bitmap_buffer_len(size)?],
            blocks: block_count(size),
        })
    }

    /// The bitmap of a `size`-byte disk from `bytes`, which must hold at least
    /// [`bitmap_len`]`(size)` bytes (any more are ignored).
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Result<Self, FormatError> {
        let len = bitmap_buffer_len(size)?;
        let bytes = bytes.get(..len).ok_or(FormatError::ShortBitmap {
            len: (HEADER_LEN + bytes.len()) as u64,
            size,
            needed: log_len(size),
        })?;
        Ok(Self {
            bytes: bytes.to_vec(),
            blocks: block_count(size),
        })
    }

    /// The bytes as they are stored after the header.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether `block` is marked changed (false past the end).
    pub fn is_set(&self, block: u64) -> bool {
        usize::try_from(block / 8)
            .ok()
            .filter(|_| block < self.blocks)
            .and_then(|index| self.bytes.get(index))
            .is_some_and(|byte| byte & (1 << (block % 8)) != 0)
    }

    /// Marks `blocks` changed; blocks past the end are ignored.
    pub fn set_blocks(&mut self, blocks: Range<u64>) {
        let end = blocks.end.min(self.blocks);
        for (byte, mask) in byte_masks(blocks.start..end) {
            if let Some(slot) = usize::try_from(byte)
                .ok()
                .and_then(|i| self.bytes.get_mut(i))
            {
                *slot |= mask;
            }
        }
    }

    /// Marks the blocks that bytes `[offset, offset + len)` touch.
    pub fn set_bytes(&mut self, offset: u64, len: u64) {
        self.set_blocks(blocks_of(offset, len));
    }

    /// Number of blocks marked.
    pub fn count(&self) -> u64 {
        (0..self.blocks).filter(|block| self.is_set(*block)).count() as u64
    }

    /// Extends the bitmap to a disk of `size` bytes; new blocks are unchanged. A smaller
    /// size is ignored (bitmaps never shrink).
    pub fn grow(&mut self, size: u64) -> Result<(), FormatError> {
        let len = bitmap_buffer_len(size)?;
        if len > self.bytes.len() {
            self.bytes.resize(len, 0);
        }
        self.blocks = self.blocks.max(block_count(size));
        Ok(())
    }

    /// Merges an older log's bitmap into this one (`cbt-util coalesce`): every byte of
    /// `older` is ORed in. `LongerBitmap` when `older` has more bytes than this one.
    pub fn absorb(&mut self, older: &Bitmap) -> Result<(), FormatError> {
        if older.bytes.len() > self.bytes.len() {
            return Err(FormatError::LongerBitmap {
                older: older.bytes.len(),
                newer: self.bytes.len(),
            });
        }
        for (mine, theirs) in self.bytes.iter_mut().zip(&older.bytes) {
            *mine |= theirs;
        }
        Ok(())
    }

    /// The extents of the whole `size`-byte disk ([`extents`]).
    pub fn extents(&self, size: u64) -> Vec<Extent> {
        extents(size, 0, size, |index| {
            usize::try_from(index)
                .ok()
                .and_then(|i| self.bytes.get(i))
                .copied()
                .unwrap_or(0)
        })
    }
}

/// A run of blocks that are all changed or all unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the blocks were written since the log was created.
    pub changed: bool,
}

/// The extents of bytes `[start, start + len)` of a `size`-byte disk (clipped to the disk),
/// alternating changed and unchanged, from a bitmap read byte by byte through `byte_at`
/// (byte index -> bitmap byte). Extents start and end on block boundaries, except the first
/// start and the last end, which are the range's.
pub fn extents(size: u64, start: u64, len: u64, byte_at: impl Fn(u64) -> u8) -> Vec<Extent> {
    let end = start.saturating_add(len).min(size);
    let mut out: Vec<Extent> = Vec::new();
    let mut at = start;
    while at < end {
        let block = at / BLOCK_SIZE;
        let byte = byte_at(block / 8);
        // A whole byte of equal bits is eight blocks of one kind.
        let (changed, blocks) = if block % 8 == 0 && (byte == 0 || byte == 0xff) {
            (byte == 0xff, 8)
        } else {
            (byte & (1 << (block % 8)) != 0, 1)
        };
        let next = (block + blocks).saturating_mul(BLOCK_SIZE).min(end);
        match out.last_mut() {
            Some(last) if last.changed == changed => last.length += next - at,
            _ => out.push(Extent {
                offset: at,
                length: next - at,
                changed,
            }),
        }
        at = next;
    }
    out
}

/// A whole log: header and bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// The header.
    pub header: LogHeader,
    /// The bitmap of `header.size` bytes of disk.
    pub bitmap: Bitmap,
}

impl LogFile {
    /// A new log as `cbt-util create` writes it.
    pub fn new(size: u64) -> Result<Self, FormatError> {
        Ok(Self {
            header: LogHeader::new(size),
            bitmap: Bitmap::zeroed(size)?,
        })
    }

    /// Parses a whole log file; bytes after the bitmap are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let header = LogHeader::parse(bytes)?;
        header.check_len(bytes.len() as u64)?;
        let bitmap = Bitmap::from_bytes(header.size, &bytes[HEADER_LEN..])?;
        Ok(Self { header, bitmap })
    }

    /// The file's bytes: header, then bitmap.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.bitmap.bytes.len());
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.bitmap.bytes);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// A log of a 1 MiB disk (16 blocks, 2 bitmap bytes), spelled out from the format table:
    /// parent 00112233-4455-6677-8899-aabbccddeeff, child all 0xee, consistent 1, padding
    /// 0xde 0xad 0xbe 0xef, size 0x100000, blocks 1, 8 and 15 changed.
    const FIXTURE: [u8; 50] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, // parent
        0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, //
        0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, // child
        0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, //
        0x01, 0x00, 0x00, 0x00, // consistent = 1
        0xde, 0xad, 0xbe, 0xef, // padding
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 1 MiB
        0x02, 0x81, // bitmap: block 1; blocks 8 and 15
    ];

    #[test]
    fn fixture_parses_field_by_field_and_encodes_back() {
        let log = LogFile::parse(&FIXTURE).unwrap();
        assert_eq!(
            log.header.parent,
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(log.header.child, [0xee; 16]);
        assert_eq!(log.header.consistent, 1);
        assert_eq!(log.header.padding, [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(log.header.size, 1 << 20);
        let set: Vec<u64> = (0..16).filter(|b| log.bitmap.is_set(*b)).collect();
        assert_eq!(set, [1, 8, 15]);
        assert_eq!(log.to_bytes(), FIXTURE);
        assert_eq!(log.bitmap.count(), 3);
    }

    #[test]
    fn sizes_from_the_format_facts() {
        // cbt.md's example: a 64 GiB disk has a 131072-byte bitmap, a 131120-byte file.
        assert_eq!(bitmap_len(68_719_476_736), 131_072);
        assert_eq!(log_len(68_719_476_736), 131_120);
        // One started block still needs a bit, and a byte.
        assert_eq!(bitmap_len(1), 1);
        assert_eq!(bitmap_len(8 * BLOCK_SIZE), 1);
        assert_eq!(bitmap_len(8 * BLOCK_SIZE + 1), 2);
        assert_eq!(bitmap_len(0), 0);
        assert_eq!(bitmap_len(u64::MAX), 1 << 45);
    }

    #[test]
    fn new_log_matches_what_create_writes() {
        let log = LogFile::new(3 * BLOCK_SIZE).unwrap();
        let mut expected = vec![0u8; 49];
        expected[40] = 0x00;
        expected[41] = 0x00;
        expected[42] = 0x03;
        assert_eq!(log.to_bytes(), expected);
    }

    #[test]
    fn a_write_at_64k_sets_bit_one() {
        // cbt.md: a 4 KiB write at byte 65536 sets bit 1, so bitmap byte 0 is 0x02.
        let mut bitmap = Bitmap::zeroed(1 << 30).unwrap();
        bitmap.set_bytes(65536, 4096);
        assert_eq!(bitmap.as_bytes()[0], 0x02);
        // A write across a block boundary marks both blocks.
        bitmap.set_bytes(2 * BLOCK_SIZE - 512, 1024);
        assert_eq!(bitmap.as_bytes()[0], 0x06);
    }

    #[test]
    fn short_files_are_named_problems() {
        assert_eq!(
            LogFile::parse(&FIXTURE[..47]),
            Err(FormatError::ShortHeader { len: 47 })
        );
        let error = LogFile::parse(&FIXTURE[..49]).unwrap_err();
        assert_eq!(
            error,
            FormatError::ShortBitmap {
                len: 49,
                size: 1 << 20,
                needed: 50
            }
        );
        assert_eq!(
            error.to_string(),
            "49 bytes are shorter than a CBT log of a 1048576-byte disk, which needs 50 \
             (the 48-byte header and 2 bytes of bitmap)"
        );
        // A header claiming an enormous disk is caught by the length, never allocated.
        let mut huge = FIXTURE;
        huge[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            LogFile::parse(&huge),
            Err(FormatError::ShortBitmap { .. })
        ));
        // Longer files (a 4 MiB LVM volume) are fine: the rest is ignored.
        let mut long = FIXTURE.to_vec();
        long.extend_from_slice(&[0xaa; 100]);
        assert_eq!(LogFile::parse(&long).unwrap().to_bytes(), FIXTURE);
    }

    #[test]
    fn grow_and_absorb_follow_set_and_coalesce() {
        let mut older = Bitmap::zeroed(16 * BLOCK_SIZE).unwrap();
        older.set_blocks(3..5);
        let mut newer = Bitmap::zeroed(16 * BLOCK_SIZE).unwrap();
        newer.set_blocks(10..11);
        newer.grow(40 * BLOCK_SIZE).unwrap();
        assert_eq!(newer.as_bytes(), [0x00, 0x04, 0x00, 0x00, 0x00]);
        newer.absorb(&older).unwrap();
        assert_eq!(newer.as_bytes(), [0x18, 0x04, 0x00, 0x00, 0x00]);
        assert_eq!(
            older.absorb(&newer),
            Err(FormatError::LongerBitmap { older: 5, newer: 2 })
        );
        // Growing to a smaller size changes nothing.
        newer.grow(BLOCK_SIZE).unwrap();
        assert_eq!(newer.as_bytes().len(), 5);
        assert_eq!(newer.blocks(), 40);
    }

    #[test]
    fn extents_cover_the_range_with_alternating_runs() {
        let log = LogFile::parse(&FIXTURE).unwrap();
        let b = BLOCK_SIZE;
        let run = |offset: u64, length: u64, changed: bool| Extent {
            offset,
            length,
            changed,
        };
        assert_eq!(
            log.bitmap.extents(1 << 20),
            [
                run(0, b, false),
                run(b, b, true),
                run(2 * b, 6 * b, false),
                run(8 * b, b, true),
                run(9 * b, 6 * b, false),
                run(15 * b, b, true),
            ]
        );
        // A range starting and ending inside blocks is clipped to itself and to the disk.
        let byte = |i: u64| log.bitmap.as_bytes()[usize::try_from(i).unwrap()];
        assert_eq!(
            extents(1 << 20, b + 100, b, byte),
            [run(b + 100, b - 100, true), run(2 * b, 100, false)]
        );
        assert_eq!(
            extents(1 << 20, 15 * b + 10, 10 * b, byte),
            [run(15 * b + 10, b - 10, true)]
        );
        assert!(extents(1 << 20, 1 << 20, 512, |_| 0xff).is_empty());
        // A disk whose size is not a whole number of blocks ends with a short extent.
        assert_eq!(
            extents(b + 512, 0, u64::MAX, |_| 0x02),
            [run(0, b, false), run(b, 512, true)]
        );
    }

    #[test]
    fn byte_masks_cover_exactly_the_blocks() {
        assert_eq!(byte_masks(0..0).collect::<Vec<_>>(), []);
        assert_eq!(byte_masks(1..2).collect::<Vec<_>>(), [(0, 0x02)]);
        assert_eq!(byte_masks(0..8).collect::<Vec<_>>(), [(0, 0xff)]);
        assert_eq!(
            byte_masks(6..18).collect::<Vec<_>>(),
            [(0, 0xc0), (1, 0xff), (2, 0x03)]
        );
        assert_eq!(blocks_of(0, 0), 0..0);
        assert_eq!(blocks_of(BLOCK_SIZE - 1, 2), 0..2);
        assert_eq!(blocks_of(BLOCK_SIZE, BLOCK_SIZE), 1..2);
        assert_eq!(
            blocks_of(u64::MAX - 10, 100),
            (u64::MAX / BLOCK_SIZE)..(u64::MAX / BLOCK_SIZE + 1)
        );
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_set_of_blocks(
            blocks in 1u64..300,
            writes in proptest::collection::vec((0u64..300 * BLOCK_SIZE, 0u64..4 * BLOCK_SIZE), 0..40),
        ) {
            let size = blocks * BLOCK_SIZE - 512;
            let mut bitmap = Bitmap::zeroed(size).unwrap();
            let mut model = BTreeSet::new();
            for (offset, len) in writes {
                bitmap.set_bytes(offset, len);
                for block in blocks_of(offset, len) {
                    if block < block_count(size) {
                        model.insert(block);
                    }
                }
            }
            for block in 0..block_count(size) + 10 {
                prop_assert_eq!(bitmap.is_set(block), model.contains(&block));
            }
            prop_assert_eq!(bitmap.count(), model.len() as u64);
            // Extents tile the disk and agree with the model.
            let mut at = 0;
            for extent in bitmap.extents(size) {
                prop_assert_eq!(extent.offset, at);
                prop_assert!(extent.length > 0);
                for block in blocks_of(extent.offset, extent.length) {
                    prop_assert_eq!(model.contains(&block), extent.changed);
                }
                at += extent.length;
            }
            prop_assert_eq!(at, size);
            // The file round trips.
            let log = LogFile { header: LogHeader::new(size), bitmap };
            prop_assert_eq!(LogFile::parse(&log.to_bytes()).unwrap(), log);
        }

        #[test]
        fn headers_round_trip(bytes in proptest::collection::vec(any::<u8>(), 48..60)) {
            let header = LogHeader::parse(&bytes).unwrap();
            prop_assert_eq!(&header.encode()[..], &bytes[..48]);
        }
    }
}
