//! Aligned transfer buffers.
//!
//! This module owns [`AlignedBuf`], the only buffer type the backends need to accept
//! without copying: O_DIRECT and NVMe DMA both require the memory of a transfer to be
//! aligned to the block size, which `Vec<u8>` does not promise.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::BLOCK_SIZE;

/// A zero-initialised heap buffer whose start is aligned to [`BLOCK_SIZE`] and whose
/// length is a whole number of blocks.
pub struct AlignedBuf {
    /// Start of the allocation, or a dangling but aligned pointer when `len == 0`
    /// (the allocator must not be asked for zero bytes).
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated; `len` may be set lower (in whole blocks) so that a pooled
    /// buffer can carry a shorter transfer without a new allocation.
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>; nothing else
// holds the pointer, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]` (through Deref), and mutation needs
// `&mut self`, so the usual borrow rules keep concurrent access free of data races.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes rounded up to a multiple of [`BLOCK_SIZE`], all zero.
    ///
    /// Zeroed rather than uninitialised so that a buffer can be handed out as `&[u8]`
    /// (and so that a short read never exposes old heap contents).
    ///
    /// # Panics
    /// If the rounded length overflows `isize`, as `Vec` does on capacity overflow.
    /// Aborts through [`alloc::handle_alloc_error`] if the allocator fails.
    pub fn new(len: usize) -> AlignedBuf {
        let len = len
            .checked_next_multiple_of(BLOCK_SIZE)
            .expect("AlignedBuf length overflows usize");
        if len == 0 {
            return AlignedBuf {
                ptr: Self::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (len > 0 was checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, cap: len }
    }

    /// Bytes allocated: the most [`AlignedBuf::set_len`] can restore.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length to `len` rounded up to whole blocks, at most the capacity
    /// (clamped). Bytes past a shortened length keep their contents.
    pub fn set_len(&mut self, len: usize) {
        let len = len.div_ceil(BLOCK_SIZE).saturating_mul(BLOCK_SIZE);
        self.len = len.min(self.cap);
    }

    /// Length in bytes, always a multiple of [`BLOCK_SIZE`].
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, BLOCK_SIZE).expect("AlignedBuf length overflows isize")
    }

    /// An aligned, non-null pointer for the empty buffer: a zero-length slice needs a
    /// pointer that is non-null and aligned, and keeping the alignment promise even
    /// for the empty buffer means `check_transfer` treats it like any other.
    fn dangling() -> NonNull<u8> {
        NonNull::new(std::ptr::without_provenance_mut(BLOCK_SIZE)).expect("BLOCK_SIZE is non-zero")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout (the
        // allocated length `cap`, same alignment) and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for reads of `len` initialised (zeroed at allocation)
        // bytes for as long as `self` lives, and is non-null and aligned even when
        // `len == 0`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees this is the only live
        // reference into the allocation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        let mut copy = AlignedBuf::new(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    /// Prints the length only: dumping megabytes of payload into a log helps no one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_to_block_size() {
        for len in [1, 4096, 4097, 3 * 4096, 1 << 20] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.as_ptr() as usize % BLOCK_SIZE, 0, "len {len}");
        }
    }

    #[test]
    fn zeroed() {
        let buf = AlignedBuf::new(64 * 1024);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn length_rounds_up_to_blocks() {
        assert_eq!(AlignedBuf::new(1).len(), BLOCK_SIZE);
        assert_eq!(AlignedBuf::new(BLOCK_SIZE).len(), BLOCK_SIZE);
        assert_eq!(AlignedBuf::new(BLOCK_SIZE + 1).len(), 2 * BLOCK_SIZE);
        assert_eq!(AlignedBuf::new(10_000).len(), 3 * BLOCK_SIZE);
    }

    #[test]
    fn empty_buffer_is_aligned_and_empty() {
        let buf = AlignedBuf::new(0);
        assert!(buf.is_empty());
        assert_eq!(buf.len(), 0);
        assert_eq!(buf.as_ptr() as usize % BLOCK_SIZE, 0);
        assert!(crate::check_transfer(0, &buf, 0).is_ok());
    }

    #[test]
    fn writes_stick_and_clone_copies() {
        let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);
        buf[0] = 1;
        buf[2 * BLOCK_SIZE - 1] = 2;
        let copy = buf.clone();
        buf[0] = 3;
        assert_eq!(copy[0], 1);
        assert_eq!(copy[2 * BLOCK_SIZE - 1], 2);
        assert_eq!(copy.as_ptr() as usize % BLOCK_SIZE, 0);
    }

    #[test]
    fn set_len_shortens_and_restores_within_capacity() {
        let mut buf = AlignedBuf::new(4 * BLOCK_SIZE);
        buf[3 * BLOCK_SIZE] = 9;
        buf.set_len(1);
        assert_eq!(buf.len(), BLOCK_SIZE);
        assert_eq!(buf.capacity(), 4 * BLOCK_SIZE);
        buf.set_len(usize::MAX / 2);
        assert_eq!(buf.len(), 4 * BLOCK_SIZE);
        assert_eq!(buf[3 * BLOCK_SIZE], 9);
    }

    #[test]
    fn debug_prints_length_only() {
        let buf = AlignedBuf::new(BLOCK_SIZE);
        assert_eq!(format!("{buf:?}"), "AlignedBuf { len: 4096 }");
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AlignedBuf>();
    }
}
