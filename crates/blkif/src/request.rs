//! Checking one request copied out of the ring, and what it asks for.
//!
//! Everything in a request is guest input. [`parse`] turns a copied entry into a
//! [`Request`] only when every field is sound, and otherwise into a [`Rejection`] holding the
//! response the guest gets (`EOPNOTSUPP` for operations this back end does not offer,
//! `ERROR` for malformed or out-of-range ones) and why, for the logs and counters:
//!
//! * READ and WRITE carry 1..=11 segments; FLUSH_DISKCACHE and WRITE_BARRIER 0..=11 (with
//!   segments they are writes that must be durable before their response);
//! * a segment uses sectors `first_sect..=last_sect` of its page: `first <= last <= 7`;
//! * the sectors must lie inside the disk (no overflow);
//! * INDIRECT: `indirect_op` READ or WRITE, 1..=`max_indirect_segments` segments in
//!   `ceil(n / 512)` indirect pages, which are fetched by grant copy (into local memory, so
//!   the guest cannot change them after the check) and whose segments are checked like direct
//!   ones; the response names `indirect_op`, as Linux front ends expect;
//! * DISCARD only when the disk can discard (`feature-discard`), never "secure".

use crate::abi::{
    Abi, RawRequest, Response, Segment, DISCARD_SECURE, MAX_DIRECT_SEGMENTS, MAX_INDIRECT_PAGES,
    OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_EOPNOTSUPP, RSP_ERROR,
    SEGMENTS_PER_INDIRECT_PAGE, SEGMENT_SIZE,
};
use crate::grant::{FromGuest, GrantCopy, GNTST_OKAY};
use crate::{PAGE_SIZE, SECTORS_PER_PAGE};

/// Largest `feature-max-indirect-segments` a back end may offer (8 indirect pages).
pub const MAX_INDIRECT_SEGMENTS: u16 = 4096;

/// What the disk and the back end allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub disk_sectors: u64,
    /// Segments an indirect request may carry (0: indirect requests are refused).
    pub max_indirect_segments: u16,
    /// Whether DISCARD is offered.
    pub discard: bool,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read the sectors into the segments' pages.
    Read { sector: u64, segments: Vec<Segment> },
    /// Write the segments' pages to the sectors; with `flush`, make them durable before
    /// answering.
    Write {
        sector: u64,
        segments: Vec<Segment>,
        flush: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard `sectors` sectors.
    Discard { sector: u64, sectors: u64 },
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The guest's id, echoed in the response.
    pub id: u64,
    /// The operation the response names.
    pub operation: u8,
    /// WRITE_BARRIER: every earlier request completes before it starts, and no later one
    /// starts before it completes.
    pub barrier: bool,
    /// What to do.
    pub action: Action,
}

impl Request {
    /// The response reporting `status` for this request.
    pub fn response(&self, status: i16) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status,
        }
    }

    /// Sectors the request reads or writes (0 for flushes and discards).
    pub fn data_sectors(&self) -> u64 {
        match &self.action {
            Action::Read { segments, .. } | Action::Write { segments, .. } => {
                segment_sectors(segments)
            }
            Action::Flush | Action::Discard { .. } => 0,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("operation {0} is not supported")]
    UnsupportedOperation(u8),
    #[error("indirect operation {0} is not READ or WRITE")]
    BadIndirectOperation(u8),
    #[error("{count} segments for operation {operation}, allowed {min}..={max}")]
    SegmentCount {
        operation: u8,
        count: u32,
        min: u32,
        max: u32,
    },
    #[error("segment {index}: sectors {first}..={last} of a page (allowed first <= last <= 7)")]
    BadSegment { index: usize, first: u8, last: u8 },
    #[error("sectors {sector}+{count} are outside the disk of {disk} sectors")]
    OutOfRange { sector: u64, count: u64, disk: u64 },
    #[error("discard is not offered")]
    DiscardUnsupported,
    #[error("secure discard is not offered")]
    SecureDiscard,
    #[error("indirect page {index} (grant {gref}) could not be copied: status {status}")]
    IndirectPage {
        index: usize,
        gref: u32,
        status: i16,
    },
    #[error("copying the indirect pages failed: {0}")]
    IndirectCopy(String),
}

/// A refused request: the response to send and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The response (status `ERROR` or `EOPNOTSUPP`).
    pub response: Response,
    /// Why.
    pub reason: Reason,
}

fn reject(id: u64, operation: u8, status: i16, reason: Reason) -> Rejection {
    Rejection {
        response: Response {
            id,
            operation,
            status,
        },
        reason,
    }
}

/// Sectors covered by (checked) segments.
pub fn segment_sectors(segments: &[Segment]) -> u64 {
    segments
        .iter()
        .map(|s| u64::from(s.last_sect) + 1 - u64::from(s.first_sect))
        .sum()
}

fn check_segments(segments: &[Segment]) -> Result<(), Reason> {
    for (index, segment) in segments.iter().enumerate() {
        if segment.first_sect > segment.last_sect || segment.last_sect >= SECTORS_PER_PAGE {
            return Err(Reason::BadSegment {
                index,
                first: segment.first_sect,
                last: segment.last_sect,
            });
        }
    }
    Ok(())
}

fn check_range(sector: u64, count: u64, disk: u64) -> Result<(), Reason> {
    match sector.checked_add(count) {
        Some(end) if end <= disk => Ok(()),
        _ => Err(Reason::OutOfRange {
            sector,
            count,
            disk,
        }),
    }
}

/// Fetches the segment descriptors of an indirect request into local memory.
fn fetch_indirect(
    copier: &mut impl GrantCopy,
    grefs: &[u32],
    count: usize,
) -> Result<Vec<Segment>, Reason> {
    let mut pages = vec![0u8; grefs.len() * PAGE_SIZE];
    let mut copies: Vec<FromGuest<'_>> = Vec::with_capacity(grefs.len());
    let mut remaining = count * SEGMENT_SIZE;
    for (gref, page) in grefs.iter().zip(pages.chunks_exact_mut(PAGE_SIZE)) {
        let len = remaining.min(PAGE_SIZE);
        remaining -= len;
        copies.push(FromGuest {
            gref: *gref,
            offset: 0,
            dest: &mut page[..len],
            status: GNTST_OKAY,
        });
    }
    copier
        .copy_from_guest(&mut copies)
        .map_err(|e| Reason::IndirectCopy(e.to_string()))?;
    if let Some((index, copy)) = copies
        .iter()
        .enumerate()
        .find(|(_, copy)| copy.status != GNTST_OKAY)
    {
        return Err(Reason::IndirectPage {
            index,
            gref: copy.gref,
            status: copy.status,
        });
    }
    drop(copies);
    Ok(pages
        .chunks_exact(SEGMENT_SIZE)
        .take(count)
        .map(Segment::decode)
        .collect())
}

/// Checks the request in `entry` (a copy of a ring slot of `abi`); indirect pages are
/// fetched through `copier`.
pub fn parse(
    abi: Abi,
    entry: &[u8],
    limits: &Limits,
    copier: &mut impl GrantCopy,
) -> Result<Request, Rejection> {
    match RawRequest::decode(abi, entry) {
        RawRequest::ReadWrite {
            operation,
            nr_segments,
            id,
            sector,
            segments,
            ..
        } => {
            let min = u32::from(matches!(operation, OP_READ | OP_WRITE));
            let max = u32::try_from(MAX_DIRECT_SEGMENTS).unwrap_or(u32::MAX);
            let count = u32::from(nr_segments);
            if count < min || count > max {
                let reason = Reason::SegmentCount {
                    operation,
                    count,
                    min,
                    max,
                };
                return Err(reject(id, operation, RSP_ERROR, reason));
            }
            let fail = |reason| reject(id, operation, RSP_ERROR, reason);
            check_segments(&segments).map_err(fail)?;
            check_range(sector, segment_sectors(&segments), limits.disk_sectors).map_err(fail)?;
            let flush = matches!(operation, OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER);
            let action = match operation {
                OP_READ => Action::Read { sector, segments },
                _ if segments.is_empty() => Action::Flush,
                _ => Action::Write {
                    sector,
                    segments,
                    flush,
                },
            };
            Ok(Request {
                id,
                operation,
                barrier: operation == OP_WRITE_BARRIER,
                action,
            })
        }
        RawRequest::Indirect {
            indirect_op,
            nr_segments,
            id,
            sector,
            indirect_grefs,
            ..
        } => {
            let fail = |reason| reject(id, indirect_op, RSP_ERROR, reason);
            if !matches!(indirect_op, OP_READ | OP_WRITE) {
                return Err(fail(Reason::BadIndirectOperation(indirect_op)));
            }
            let max = limits.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
            if nr_segments == 0 || nr_segments > max {
                return Err(fail(Reason::SegmentCount {
                    operation: indirect_op,
                    count: u32::from(nr_segments),
                    min: 1,
                    max: u32::from(max),
                }));
            }
            let count = usize::from(nr_segments);
            let pages = count.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            debug_assert!(pages <= MAX_INDIRECT_PAGES);
            let segments = fetch_indirect(copier, &indirect_grefs[..pages], count).map_err(fail)?;
            check_segments(&segments).map_err(fail)?;
            check_range(sector, segment_sectors(&segments), limits.disk_sectors).map_err(fail)?;
            let action = if indirect_op == OP_READ {
                Action::Read { sector, segments }
            } else {
                Action::Write {
                    sector,
                    segments,
                    flush: false,
                }
            };
            Ok(Request {
                id,
                operation: indirect_op,
                barrier: false,
                action,
            })
        }
        RawRequest::Discard {
            flag,
            id,
            sector,
            nr_sectors,
            ..
        } => {
            if !limits.discard {
                return Err(reject(
                    id,
                    OP_DISCARD,
                    RSP_EOPNOTSUPP,
                    Reason::DiscardUnsupported,
                ));
            }
            if flag & DISCARD_SECURE != 0 {
                return Err(reject(
                    id,
                    OP_DISCARD,
                    RSP_EOPNOTSUPP,
                    Reason::SecureDiscard,
                ));
            }
            check_range(sector, nr_sectors, limits.disk_sectors)
                .map_err(|reason| reject(id, OP_DISCARD, RSP_ERROR, reason))?;
            Ok(Request {
                id,
                operation: OP_DISCARD,
                barrier: false,
                action: Action::Discard {
                    sector,
                    sectors: nr_sectors,
                },
            })
        }
        RawRequest::Other { operation, id } => Err(reject(
            id,
            operation,
            RSP_EOPNOTSUPP,
            Reason::UnsupportedOperation(operation),
        )),
    }
}
