//! `Locked<T>`: a value placed in pages of its own, mapped anonymously, locked in RAM where
//! `RLIMIT_MEMLOCK` allows it, left out of core dumps, wiped in a forked child, and zeroed
//! before the pages are unmapped. The only `unsafe` of this crate.

use std::ffi::c_void;
use std::io;
use std::mem::{align_of, size_of};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use rustix::mm::{self, Advice, MapFlags, ProtFlags};
use zeroize::Zeroize;

/// A value of `T` in private, locked, undumped pages (see the module docs).
pub struct Locked<T> {
    value: NonNull<T>,
    len: usize,
    locked: bool,
}

// SAFETY: `Locked<T>` owns its `T` exclusively (like a `Box<T>`), so it may move to or be
// shared between threads exactly when `T` may.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: as above: `&Locked<T>` only hands out `&T`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// Moves `value` into fresh pages. Locking them (`mlock`) is best effort: where the
    /// memory-lock limit forbids it the value still lives in its own pages, excluded from
    /// core dumps; [`Locked::is_locked`] tells which. Fails only when no pages can be mapped.
    pub fn new(value: T) -> io::Result<Self> {
        let page = rustix::param::page_size();
        assert!(align_of::<T>() <= page, "Locked: alignment beyond a page");
        let len = size_of::<T>().max(1).div_ceil(page) * page;
        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing
        // touches no existing memory.
        let base = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )?
        };
        // SAFETY: `base..base + len` is the mapping made above, owned by this function.
        let locked = unsafe { mm::mlock(base, len) }.is_ok();
        for advice in [Advice::LinuxDontDump, Advice::LinuxWipeOnFork] {
            // SAFETY: as above; advice only changes how the kernel treats these pages
            // (older kernels refuse WIPEONFORK, which is harmless).
            let _ = unsafe { mm::madvise(base, len, advice) };
        }
        let ptr =
            NonNull::new(base.cast::<T>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        // SAFETY: the mapping is page-aligned (so aligned for `T`, checked above), at least
        // `size_of::<T>()` bytes, writable, and holds no value yet.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self {
            value: ptr,
            len,
            locked,
        })
    }

    /// True when the pages are locked in RAM (never written to swap).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<T> std::fmt::Debug for Locked<T> {
    /// Shows where the value lives, never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Locked({} bytes, locked: {})", self.len, self.locked)
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `value` points at the initialised `T` this struct owns until it is dropped.
        unsafe { self.value.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { self.value.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let base = self.value.as_ptr().cast::<c_void>();
        // SAFETY: the `T` is initialised and dropped exactly once, here.
        unsafe { self.value.as_ptr().drop_in_place() };
        // SAFETY: the whole mapping is ours and holds no live value any more.
        let bytes = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), self.len) };
        bytes.zeroize();
        if self.locked {
            // SAFETY: the range locked in `new`.
            let _ = unsafe { mm::munlock(base, self.len) };
        }
        // SAFETY: the mapping made in `new`; nothing refers to it after this.
        let _ = unsafe { mm::munmap(base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping starting at `addr`, from `/proc/self/smaps`.
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_mapping = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, _)) = range.split_once('-') {
                    if let Ok(start) = usize::from_str_radix(start, 16) {
                        in_mapping = start == addr;
                        continue;
                    }
                }
            }
            if in_mapping {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(str::to_owned).collect();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn pages_are_left_out_of_core_dumps_and_locked_when_allowed() {
        let secret = Locked::new([0x5au8; 64]).unwrap();
        let flags = vm_flags(secret.value.as_ptr() as usize);
        assert!(flags.iter().any(|f| f == "dd"), "{flags:?}");
        assert_eq!(
            flags.iter().any(|f| f == "lo"),
            secret.is_locked(),
            "{flags:?}"
        );
        assert_eq!(secret[63], 0x5a);
    }
}
