//! Owned, zeroed, 4096-byte-aligned byte buffers: destinations for `O_DIRECT` reads.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`], of extent offsets and of extent sizes in the store.
pub const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`] (`None` on overflow).
pub fn round_up(n: usize) -> Option<usize> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// An owned, zero-initialised byte buffer whose start is aligned to [`ALIGN`] bytes and
/// whose capacity is a multiple of it, so that whole-extent `O_DIRECT` reads can target it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); no interior
// mutability or thread-local state, so moving or sharing it across threads is fine.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, as `Box<[u8]>` does.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes, rounded up to a multiple of [`ALIGN`]
    /// (an empty request gives one page). Aborts on allocation failure, like `Vec`.
    pub fn zeroed(len: usize) -> Self {
        let size = round_up(len.max(1)).expect("AlignedBuf: size overflows usize");
        let layout = Layout::from_size_align(size, ALIGN).expect("AlignedBuf: size overflows isize");
        // SAFETY: `layout` has a non-zero size (at least ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len: size }
    }

    /// Length in bytes (a multiple of [`ALIGN`]).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn layout(&self) -> Layout {
        // Cannot fail: the same values built a valid layout in `zeroed`.
        Layout::from_size_align(self.len, ALIGN).unwrap_or(Layout::new::<u8>())
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this layout (`len` and
        // ALIGN never change after construction) and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout()) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes owned by
        // self; the borrow of self keeps them alive and unaliased by `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_rounded() {
        for n in [0, 1, 4095, 4096, 4097, 3 << 20] {
            let mut b = AlignedBuf::zeroed(n);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.len() >= n && b.len() % ALIGN == 0);
            assert!(b.iter().all(|&v| v == 0));
            b[0] = 7;
            assert_eq!(b[0], 7);
        }
    }
}
