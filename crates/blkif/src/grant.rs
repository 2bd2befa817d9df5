//! Grant copies: moving bytes between a guest's granted pages and local memory.
//!
//! A back-end never maps a guest's data pages here; it asks the hypervisor to copy (Linux:
//! `IOCTL_GNTDEV_GRANT_COPY`). One call takes a batch of copies, each within one granted
//! page, and reports a status per copy. [`GrantCopy`] is that call; the real one lives with
//! tapdisk's Xen device code, a simulated one in [`crate::sim`].

use crate::abi::Segment;
use crate::{PAGE_SIZE, SECTOR_SIZE};

/// `GNTST_okay`.
pub const GNTST_OKAY: i16 = 0;
/// `GNTST_general_error`.
pub const GNTST_GENERAL_ERROR: i16 = -1;
/// `GNTST_bad_gntref`: no such grant.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// `GNTST_permission_denied`: e.g. writing into a read-only grant.
pub const GNTST_PERMISSION_DENIED: i16 = -8;
/// `GNTST_bad_copy_arg`: a copy crossing the end of the page.
pub const GNTST_BAD_COPY_ARG: i16 = -10;

/// One copy out of a guest page into local memory.
#[derive(Debug)]
pub struct FromGuest<'a> {
    /// Grant reference of the guest page.
    pub gref: u32,
    /// Byte offset in the guest page.
    pub offset: u16,
    /// Where the bytes go (its length is the copy's length).
    pub dest: &'a mut [u8],
    /// Set by the copy: [`GNTST_OKAY`] or a negative `GNTST_*`.
    pub status: i16,
}

/// One copy from local memory into a guest page.
#[derive(Debug)]
pub struct ToGuest<'a> {
    /// Grant reference of the guest page.
    pub gref: u32,
    /// Byte offset in the guest page.
    pub offset: u16,
    /// The bytes to copy (its length is the copy's length).
    pub src: &'a [u8],
    /// Set by the copy: [`GNTST_OKAY`] or a negative `GNTST_*`.
    pub status: i16,
}

/// Copies to and from the pages one guest granted.
///
/// Each copy stays within one page (`offset + len <= 4096`); callers guarantee it. A
/// failed copy sets its `status`; `Err` means the whole batch could not be attempted (then
/// no status can be trusted).
pub trait GrantCopy {
    /// Copies guest pages into local memory.
    fn copy_from_guest(&mut self, copies: &mut [FromGuest<'_>]) -> std::io::Result<()>;
    /// Copies local memory into guest pages.
    fn copy_to_guest(&mut self, copies: &mut [ToGuest<'_>]) -> std::io::Result<()>;
}

/// Where the sectors of one segment live: a byte range of the guest page and the matching
/// range of the request's contiguous local buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    /// Grant reference of the guest page.
    pub gref: u32,
    /// Byte offset in the guest page (`first_sect * 512`).
    pub page_offset: u16,
    /// Byte offset in the local buffer.
    pub buffer_offset: usize,
    /// Bytes.
    pub len: usize,
}

/// Lays `segments` (already checked: `first_sect <= last_sect <= 7`) out back to back in one
/// local buffer, in order: the request's sectors are contiguous on the disk.
pub fn spans(segments: &[Segment]) -> impl Iterator<Item = SegmentSpan> + '_ {
    let sector = usize::try_from(SECTOR_SIZE).unwrap_or(512);
    segments.iter().scan(0usize, move |offset, segment| {
        let first = usize::from(segment.first_sect);
        let len = (usize::from(segment.last_sect) + 1 - first) * sector;
        let span = SegmentSpan {
            gref: segment.gref,
            page_offset: u16::try_from(first * sector).unwrap_or(u16::MAX),
            buffer_offset: *offset,
            len,
        };
        debug_assert!(first * sector + len <= PAGE_SIZE);
        *offset += len;
        Some(span)
    })
}

/// Total bytes of `segments` (checked ones, as for [`spans`]).
pub fn total_bytes(segments: &[Segment]) -> usize {
    spans(segments).map(|span| span.len).sum()
}

/// Copies every segment of a request from the guest into `buffer` (laid out by [`spans`])
/// with one batched call. `Ok(false)` when any copy failed.
pub fn gather(
    copier: &mut impl GrantCopy,
    segments: &[Segment],
    buffer: &mut [u8],
) -> std::io::Result<bool> {
    let mut copies = Vec::with_capacity(segments.len());
    let mut rest = buffer;
    for span in spans(segments) {
        let (dest, tail) = rest.split_at_mut(span.len);
        rest = tail;
        copies.push(FromGuest {
            gref: span.gref,
            offset: span.page_offset,
            dest,
            status: GNTST_OKAY,
        });
    }
    copier.copy_from_guest(&mut copies)?;
    Ok(copies.iter().all(|copy| copy.status == GNTST_OKAY))
}

/// Copies `buffer` (laid out by [`spans`]) into the request's guest pages with one batched
/// call. `Ok(false)` when any copy failed.
pub fn scatter(
    copier: &mut impl GrantCopy,
    segments: &[Segment],
    buffer: &[u8],
) -> std::io::Result<bool> {
    let mut copies: Vec<ToGuest<'_>> = spans(segments)
        .map(|span| ToGuest {
            gref: span.gref,
            offset: span.page_offset,
            src: &buffer[span.buffer_offset..span.buffer_offset + span.len],
            status: GNTST_OKAY,
        })
        .collect();
    copier.copy_to_guest(&mut copies)?;
    Ok(copies.iter().all(|copy| copy.status == GNTST_OKAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_back_to_back() {
        let segments = [
            Segment {
                gref: 1,
                first_sect: 2,
                last_sect: 7,
            },
            Segment {
                gref: 2,
                first_sect: 0,
                last_sect: 0,
            },
        ];
        let got: Vec<SegmentSpan> = spans(&segments).collect();
        assert_eq!(
            got,
            [
                SegmentSpan {
                    gref: 1,
                    page_offset: 1024,
                    buffer_offset: 0,
                    len: 3072
                },
                SegmentSpan {
                    gref: 2,
                    page_offset: 0,
                    buffer_offset: 3072,
                    len: 512
                },
            ]
        );
        assert_eq!(total_bytes(&segments), 3584);
    }
}
