//! Ring ABIs and the byte layouts of blkif requests and responses.
//!
//! A 64-bit back-end serves guests of either word size, so the layout of a ring entry
//! depends on what the guest announced (`protocol` in XenStore, `proto` in the control
//! message): `x86_64-abi` (and native, identical on x86_64) aligns 64-bit fields to 8 bytes;
//! `x86_32-abi` packs them at 4. Offsets (bytes):
//!
//! | entry | x86_64 / native | x86_32 |
//! |---|---|---|
//! | read/write: op, nr_segments, handle, id, sector, seg\[11\] | 0, 1, 2, 8, 16, 24 (112 B) | 0, 1, 2, 4, 12, 20 (108 B) |
//! | discard: op, flag, handle, id, sector, nr_sectors | 0, 1, 2, 8, 16, 24 | 0, 1, 2, 4, 12, 20 |
//! | indirect: op, indirect_op, nr_segments (u16), id, sector, handle, indirect_grefs\[8\] | 0, 1, 2, 8, 16, 24, 28 | 0, 1, 2, 4, 12, 20, 24 |
//! | response: id, operation, status (i16) | 0, 8, 10 (16 B) | 0, 8, 10 (12 B) |
//!
//! A segment (8 bytes, in the request or in an indirect page) is `u32 gref, u8 first_sect,
//! u8 last_sect`. Everything is little-endian.

use crate::PAGE_SIZE;

/// `BLKIF_OP_READ`.
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_DISCARD`.
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`.
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`.
pub const RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`.
pub const RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`.
pub const RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_DISCARD_SECURE` in a discard request's `flag`.
pub const DISCARD_SECURE: u8 = 0x1;

/// Segments a read/write request carries in the ring (`BLKIF_MAX_SEGMENTS_PER_REQUEST`).
pub const MAX_DIRECT_SEGMENTS: usize = 11;
/// Indirect pages one request may name (`BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`).
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Bytes of one segment descriptor.
pub const SEGMENT_SIZE: usize = 8;
/// Segment descriptors in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / SEGMENT_SIZE;

/// Bytes of the shared page header (`req_prod`, `req_event`, `rsp_prod`, `rsp_event`,
/// private bytes, padding) before the first entry.
pub const RING_HEADER: usize = 64;
/// Largest ring order (8 pages).
pub const MAX_RING_ORDER: u32 = 3;

/// A ring ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// The back-end's own layout (x86_64 here; `proto` 1).
    Native,
    /// 32-bit x86 guests (`proto` 2, XenStore `x86_32-abi`).
    X86_32,
    /// 64-bit x86 guests (`proto` 3, XenStore `x86_64-abi`).
    X86_64,
}

/// Field offsets of one ABI.
#[derive(Debug, Clone, Copy)]
struct Offsets {
    id: usize,
    sector: usize,
    /// Read/write segments; discard `nr_sectors`; indirect `handle`.
    tail: usize,
    indirect_grefs: usize,
    entry: usize,
    response: usize,
}

const WIDE: Offsets = Offsets {
    id: 8,
    sector: 16,
    tail: 24,
    indirect_grefs: 28,
    entry: 112,
    response: 16,
};

const PACKED: Offsets = Offsets {
    id: 4,
    sector: 12,
    tail: 20,
    indirect_grefs: 24,
    entry: 108,
    response: 12,
};

/// The largest entry of any ABI.
pub const MAX_ENTRY_SIZE: usize = 112;

impl Abi {
    /// The ABI of control-message `proto` value (1 native, 2 x86_32, 3 x86_64).
    pub fn from_proto(proto: u32) -> Option<Self> {
        match proto {
            1 => Some(Self::Native),
            2 => Some(Self::X86_32),
            3 => Some(Self::X86_64),
            _ => None,
        }
    }

    /// The ABI a front-end's XenStore `protocol` names (absent: native, as `io/blkif.h`
    /// says).
    pub fn from_xenstore(protocol: Option<&str>) -> Option<Self> {
        match protocol {
            None => Some(Self::Native),
            Some("x86_32-abi") => Some(Self::X86_32),
            Some("x86_64-abi") => Some(Self::X86_64),
            Some(_) => None,
        }
    }

    /// The control-message `proto` value.
    pub fn proto(self) -> u32 {
        match self {
            Self::Native => 1,
            Self::X86_32 => 2,
            Self::X86_64 => 3,
        }
    }

    fn offsets(self) -> Offsets {
        match self {
            Self::Native | Self::X86_64 => WIDE,
            Self::X86_32 => PACKED,
        }
    }

    /// Bytes of one ring entry (the union of request and response).
    pub fn entry_size(self) -> usize {
        self.offsets().entry
    }

    /// Bytes of a response.
    pub fn response_size(self) -> usize {
        self.offsets().response
    }

    /// Entries in a ring of `pages` pages: the largest power of two that fits after the
    /// header (`__RING_SIZE`).
    pub fn ring_size(self, pages: usize) -> u32 {
        let fit = (pages * PAGE_SIZE).saturating_sub(RING_HEADER) / self.entry_size();
        if fit == 0 {
            return 0;
        }
        let size = 1usize << fit.ilog2();
        u32::try_from(size).unwrap_or(u32::MAX)
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// One segment: a granted page and the sectors of it the request uses (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Grant reference of the page.
    pub gref: u32,
    /// First sector of the page used (0..=7).
    pub first_sect: u8,
    /// Last sector of the page used, inclusive (first_sect..=7).
    pub last_sect: u8,
}

impl Segment {
    /// Decodes an 8-byte segment descriptor.
    pub fn decode(bytes: &[u8]) -> Self {
        Self {
            gref: u32_at(bytes, 0),
            first_sect: bytes[4],
            last_sect: bytes[5],
        }
    }

    /// Encodes into an 8-byte descriptor (padding zero).
    pub fn encode(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.gref.to_le_bytes());
        out[4] = self.first_sect;
        out[5] = self.last_sect;
        out[6] = 0;
        out[7] = 0;
    }
}

/// A request as it sits in the ring, decoded but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawRequest {
    /// READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE. `nr_segments` is what the guest
    /// wrote; `segments` holds the first `min(nr_segments, 11)` descriptors.
    ReadWrite {
        operation: u8,
        nr_segments: u8,
        handle: u16,
        id: u64,
        sector: u64,
        segments: Vec<Segment>,
    },
    /// DISCARD.
    Discard {
        flag: u8,
        handle: u16,
        id: u64,
        sector: u64,
        nr_sectors: u64,
    },
    /// INDIRECT: the segments are in guest pages named by `indirect_grefs`.
    Indirect {
        indirect_op: u8,
        nr_segments: u16,
        id: u64,
        sector: u64,
        handle: u16,
        indirect_grefs: [u32; MAX_INDIRECT_PAGES],
    },
    /// Any other operation (only `id` is meaningful, to answer it).
    Other { operation: u8, id: u64 },
}

impl RawRequest {
    /// Decodes a request entry (at least [`Abi::entry_size`] bytes) of `abi`.
    pub fn decode(abi: Abi, entry: &[u8]) -> Self {
        let at = abi.offsets();
        let operation = entry[0];
        let id = u64_at(entry, at.id);
        match operation {
            OP_READ | OP_WRITE | OP_WRITE_BARRIER | OP_FLUSH_DISKCACHE => {
                let nr_segments = entry[1];
                let count = usize::from(nr_segments).min(MAX_DIRECT_SEGMENTS);
                let segments = (0..count)
                    .map(|i| Segment::decode(&entry[at.tail + i * SEGMENT_SIZE..]))
                    .collect();
                Self::ReadWrite {
                    operation,
                    nr_segments,
                    handle: u16_at(entry, 2),
                    id,
                    sector: u64_at(entry, at.sector),
                    segments,
                }
            }
            OP_DISCARD => Self::Discard {
                flag: entry[1],
                handle: u16_at(entry, 2),
                id,
                sector: u64_at(entry, at.sector),
                nr_sectors: u64_at(entry, at.tail),
            },
            OP_INDIRECT => {
                let mut indirect_grefs = [0; MAX_INDIRECT_PAGES];
                for (i, gref) in indirect_grefs.iter_mut().enumerate() {
                    *gref = u32_at(entry, at.indirect_grefs + 4 * i);
                }
                Self::Indirect {
                    indirect_op: entry[1],
                    nr_segments: u16_at(entry, 2),
                    id,
                    sector: u64_at(entry, at.sector),
                    handle: u16_at(entry, at.tail),
                    indirect_grefs,
                }
            }
            _ => Self::Other { operation, id },
        }
    }

    /// Encodes into `entry` (at least [`Abi::entry_size`] bytes; the rest of the entry is
    /// zeroed). What a front-end does; used by the simulated guest.
    pub fn encode(&self, abi: Abi, entry: &mut [u8]) {
        let at = abi.offsets();
        entry[..at.entry].fill(0);
        let put_id_sector = |entry: &mut [u8], id: u64, sector: u64| {
            entry[at.id..at.id + 8].copy_from_slice(&id.to_le_bytes());
            entry[at.sector..at.sector + 8].copy_from_slice(&sector.to_le_bytes());
        };
        match self {
            Self::ReadWrite {
                operation,
                nr_segments,
                handle,
                id,
                sector,
                segments,
            } => {
                entry[0] = *operation;
                entry[1] = *nr_segments;
                entry[2..4].copy_from_slice(&handle.to_le_bytes());
                put_id_sector(entry, *id, *sector);
                for (i, segment) in segments.iter().take(MAX_DIRECT_SEGMENTS).enumerate() {
                    segment.encode(&mut entry[at.tail + i * SEGMENT_SIZE..]);
                }
            }
            Self::Discard {
                flag,
                handle,
                id,
                sector,
                nr_sectors,
            } => {
                entry[0] = OP_DISCARD;
                entry[1] = *flag;
                entry[2..4].copy_from_slice(&handle.to_le_bytes());
                put_id_sector(entry, *id, *sector);
                entry[at.tail..at.tail + 8].copy_from_slice(&nr_sectors.to_le_bytes());
            }
            Self::Indirect {
                indirect_op,
                nr_segments,
                id,
                sector,
                handle,
                indirect_grefs,
            } => {
                entry[0] = OP_INDIRECT;
                entry[1] = *indirect_op;
                entry[2..4].copy_from_slice(&nr_segments.to_le_bytes());
                put_id_sector(entry, *id, *sector);
                entry[at.tail..at.tail + 2].copy_from_slice(&handle.to_le_bytes());
                for (i, gref) in indirect_grefs.iter().enumerate() {
                    let off = at.indirect_grefs + 4 * i;
                    entry[off..off + 4].copy_from_slice(&gref.to_le_bytes());
                }
            }
            Self::Other { operation, id } => {
                entry[0] = *operation;
                put_id_sector(entry, *id, 0);
            }
        }
    }
}

/// A response: the request's `id`, the operation it answers, and a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request's id, echoed.
    pub id: u64,
    /// The operation answered (an indirect request is answered with its `indirect_op`).
    pub operation: u8,
    /// [`RSP_OKAY`], [`RSP_ERROR`] or [`RSP_EOPNOTSUPP`].
    pub status: i16,
}

impl Response {
    /// Encodes into `out` ([`Abi::response_size`] bytes; padding zero).
    pub fn encode(&self, abi: Abi, out: &mut [u8]) {
        out[..abi.response_size()].fill(0);
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8] = self.operation;
        out[10..12].copy_from_slice(&self.status.to_le_bytes());
    }

    /// Decodes a response (what a front-end does).
    pub fn decode(bytes: &[u8]) -> Self {
        Self {
            id: u64_at(bytes, 0),
            operation: bytes[8],
            status: i16::from_le_bytes([bytes[10], bytes[11]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_match_the_headers() {
        for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
            let sizes: Vec<u32> = [1, 2, 4, 8].iter().map(|&p| abi.ring_size(p)).collect();
            assert_eq!(sizes, [32, 64, 128, 256], "{abi:?}");
        }
        assert_eq!(Abi::Native.entry_size(), 112);
        assert_eq!(Abi::X86_32.entry_size(), 108);
        assert_eq!(Abi::X86_32.response_size(), 12);
        assert_eq!(Abi::X86_64.response_size(), 16);
    }

    #[test]
    fn x86_64_read_request_fixture() {
        let mut entry = [0u8; 112];
        entry[0] = OP_READ;
        entry[1] = 2;
        entry[2..4].copy_from_slice(&0x0300u16.to_le_bytes());
        entry[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        entry[16..24].copy_from_slice(&4096u64.to_le_bytes());
        entry[24..28].copy_from_slice(&17u32.to_le_bytes());
        entry[28] = 0;
        entry[29] = 7;
        entry[32..36].copy_from_slice(&18u32.to_le_bytes());
        entry[36] = 2;
        entry[37] = 3;
        let raw = RawRequest::decode(Abi::X86_64, &entry);
        let want = RawRequest::ReadWrite {
            operation: OP_READ,
            nr_segments: 2,
            handle: 0x300,
            id: 0x1122_3344_5566_7788,
            sector: 4096,
            segments: vec![
                Segment {
                    gref: 17,
                    first_sect: 0,
                    last_sect: 7,
                },
                Segment {
                    gref: 18,
                    first_sect: 2,
                    last_sect: 3,
                },
            ],
        };
        assert_eq!(raw, want);
        let mut again = [0xffu8; 112];
        want.encode(Abi::X86_64, &mut again);
        assert_eq!(again, entry);
    }

    #[test]
    fn x86_32_layouts_are_packed_at_four() {
        let mut entry = [0u8; 108];
        entry[0] = OP_WRITE;
        entry[1] = 1;
        entry[4..12].copy_from_slice(&9u64.to_le_bytes());
        entry[12..20].copy_from_slice(&100u64.to_le_bytes());
        entry[20..24].copy_from_slice(&5u32.to_le_bytes());
        entry[24] = 1;
        entry[25] = 6;
        assert_eq!(
            RawRequest::decode(Abi::X86_32, &entry),
            RawRequest::ReadWrite {
                operation: OP_WRITE,
                nr_segments: 1,
                handle: 0,
                id: 9,
                sector: 100,
                segments: vec![Segment {
                    gref: 5,
                    first_sect: 1,
                    last_sect: 6
                }],
            }
        );
        let mut discard = [0u8; 108];
        discard[0] = OP_DISCARD;
        discard[1] = DISCARD_SECURE;
        discard[4..12].copy_from_slice(&3u64.to_le_bytes());
        discard[12..20].copy_from_slice(&64u64.to_le_bytes());
        discard[20..28].copy_from_slice(&128u64.to_le_bytes());
        assert_eq!(
            RawRequest::decode(Abi::X86_32, &discard),
            RawRequest::Discard {
                flag: DISCARD_SECURE,
                handle: 0,
                id: 3,
                sector: 64,
                nr_sectors: 128
            }
        );
        let mut indirect = [0u8; 108];
        indirect[0] = OP_INDIRECT;
        indirect[1] = OP_READ;
        indirect[2..4].copy_from_slice(&600u16.to_le_bytes());
        indirect[4..12].copy_from_slice(&77u64.to_le_bytes());
        indirect[12..20].copy_from_slice(&8u64.to_le_bytes());
        indirect[20..22].copy_from_slice(&0x51u16.to_le_bytes());
        indirect[24..28].copy_from_slice(&40u32.to_le_bytes());
        indirect[28..32].copy_from_slice(&41u32.to_le_bytes());
        let raw = RawRequest::decode(Abi::X86_32, &indirect);
        assert_eq!(
            raw,
            RawRequest::Indirect {
                indirect_op: OP_READ,
                nr_segments: 600,
                id: 77,
                sector: 8,
                handle: 0x51,
                indirect_grefs: [40, 41, 0, 0, 0, 0, 0, 0],
            }
        );
        let mut again = [0u8; 108];
        raw.encode(Abi::X86_32, &mut again);
        assert_eq!(again, indirect);
    }

    #[test]
    fn x86_64_indirect_and_discard_offsets() {
        let raw = RawRequest::Indirect {
            indirect_op: OP_WRITE,
            nr_segments: 32,
            id: 0xabcd,
            sector: 0x10,
            handle: 7,
            indirect_grefs: [90, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut entry = [0u8; 112];
        raw.encode(Abi::X86_64, &mut entry);
        assert_eq!(entry[0..4], [OP_INDIRECT, OP_WRITE, 32, 0]);
        assert_eq!(entry[8..10], [0xcd, 0xab]);
        assert_eq!(entry[16], 0x10);
        assert_eq!(entry[24..26], [7, 0]);
        assert_eq!(entry[28..32], 90u32.to_le_bytes());
        let discard = RawRequest::Discard {
            flag: 0,
            handle: 1,
            id: 2,
            sector: 3,
            nr_sectors: 4,
        };
        discard.encode(Abi::Native, &mut entry);
        assert_eq!(entry[24..32], 4u64.to_le_bytes());
        assert_eq!(RawRequest::decode(Abi::Native, &entry), discard);
    }

    #[test]
    fn responses_of_both_sizes() {
        let rsp = Response {
            id: 0x0102_0304_0506_0708,
            operation: OP_WRITE,
            status: RSP_EOPNOTSUPP,
        };
        let mut wide = [0xaau8; 16];
        rsp.encode(Abi::X86_64, &mut wide);
        assert_eq!(
            wide,
            [8, 7, 6, 5, 4, 3, 2, 1, OP_WRITE, 0, 0xfe, 0xff, 0, 0, 0, 0]
        );
        let mut packed = [0xaau8; 13];
        rsp.encode(Abi::X86_32, &mut packed);
        assert_eq!(packed[12], 0xaa, "a 12-byte response writes 12 bytes");
        assert_eq!(Response::decode(&packed), rsp);
    }

    #[test]
    fn unknown_operations_keep_their_id() {
        let mut entry = [0u8; 112];
        entry[0] = 4;
        entry[8] = 42;
        assert_eq!(
            RawRequest::decode(Abi::Native, &entry),
            RawRequest::Other {
                operation: 4,
                id: 42
            }
        );
    }
}
