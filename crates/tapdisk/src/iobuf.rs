//! Page-aligned I/O buffers.
//!
//! Images are opened with `O_DIRECT` by default, which requires the memory of every transfer to
//! be aligned to the device's logical block size. [`IoBuf`] is an owned byte buffer whose start
//! is aligned to 4096 bytes (enough for 512-byte and 4K-sector devices). It is built from whole
//! aligned pages, so no `unsafe` is needed: `zerocopy` proves the page type is plain bytes.

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Alignment (and allocation granule) of an [`IoBuf`].
pub const IO_ALIGN: usize = 4096;

/// One aligned page of plain bytes.
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; IO_ALIGN]);

/// An owned, zero-initialised, 4096-byte-aligned buffer of `len` bytes.
#[derive(Clone)]
pub struct IoBuf {
    pages: Vec<Page>,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let pages = Page::new_vec_zeroed(len.div_ceil(IO_ALIGN)).unwrap_or_else(|_| {
            // Allocation failure aborts like any other Vec allocation would.
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<Page>())
        });
        Self { pages, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.pages.as_mut_bytes()[..len]
    }

    /// Bytes the buffer can hold without reallocating (whole pages).
    pub fn capacity(&self) -> usize {
        self.pages.len() * IO_ALIGN
    }

    /// Makes the buffer `len` bytes long within its capacity, keeping the allocation (and so
    /// its address): bytes that become visible hold whatever was last written there (zero
    /// if never). `None` (and the buffer unchanged) when `len` exceeds the capacity.
    pub fn resize_within(&mut self, len: usize) -> Option<()> {
        (len <= self.capacity()).then(|| self.len = len)
    }

    /// Sets every byte in `range` to zero.
    pub fn zero_range(&mut self, range: std::ops::Range<usize>) {
        self.as_mut_slice()[range].fill(0);
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        for len in [0, 1, 511, 512, 4096, 4097, 65536] {
            let buf = IoBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % IO_ALIGN, 0);
            assert!(buf.as_slice().iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn copy_and_zero_range() {
        let mut buf = IoBuf::copy_from(&[7u8; 1000]);
        buf.zero_range(10..20);
        assert_eq!(buf.as_slice()[9], 7);
        assert!(buf.as_slice()[10..20].iter().all(|b| *b == 0));
        assert_eq!(buf.as_slice()[20], 7);
    }

    #[test]
    fn resizing_within_the_capacity_keeps_the_memory() {
        let mut buf = IoBuf::copy_from(&[3u8; 5000]);
        assert_eq!(buf.capacity(), 2 * IO_ALIGN);
        let address = buf.as_slice().as_ptr();
        buf.resize_within(512).unwrap();
        assert_eq!(buf.as_slice(), &[3u8; 512]);
        buf.resize_within(2 * IO_ALIGN).unwrap();
        assert_eq!(buf.as_slice().as_ptr(), address);
        assert_eq!(&buf.as_slice()[..5000], &[3u8; 5000]);
        assert!(buf.as_slice()[5000..].iter().all(|b| *b == 0));
        assert!(buf.resize_within(2 * IO_ALIGN + 1).is_none());
        assert_eq!(buf.len(), 2 * IO_ALIGN);
    }
}
