//! Weight buffers backed by transparent huge pages.
//!
//! Streaming a matrix out of DRAM touches a new 4 KiB page every 64 cache lines; each one
//! costs a TLB miss (a two-level walk under virtualisation) and stops the hardware
//! prefetchers, which do not cross 4 KiB pages. On 2 MiB pages the same kernels read
//! measurably faster, so large weight buffers ask for them: an anonymous mapping aligned
//! to 2 MiB with `madvise(MADV_HUGEPAGE)` (honoured when
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`; otherwise the
//! buffer is simply made of ordinary pages). Small buffers, and platforms without `mmap`,
//! use the global allocator. `HETMOE_HUGE_PAGES=0` leaves out the `madvise`, to measure
//! the difference.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use half::{bf16, f16};

use crate::quant::{BlockQ4, BlockQ8};

/// Element types for which all-zero bytes are a valid value (fresh anonymous pages are
/// zero) and that own no resources.
///
/// # Safety
/// An all-zero bit pattern must be a valid `Self`, and `Self` must not implement `Drop`.
pub unsafe trait ZeroValid: Copy + Send + Sync + 'static {}
// SAFETY: plain numbers: zero bits are 0.
unsafe impl ZeroValid for u8 {}
// SAFETY: as above.
unsafe impl ZeroValid for u16 {}
// SAFETY: as above.
unsafe impl ZeroValid for f32 {}
// SAFETY: zero bits are +0.0.
unsafe impl ZeroValid for bf16 {}
// SAFETY: zero bits are +0.0.
unsafe impl ZeroValid for f16 {}
// SAFETY: repr(C) of an f16 and bytes: zero scale, zero values.
unsafe impl ZeroValid for BlockQ8 {}
// SAFETY: repr(C) of an f16 and bytes.
unsafe impl ZeroValid for BlockQ4 {}

/// Whether to ask for huge pages: yes unless `HETMOE_HUGE_PAGES=0` (read once), which
/// keeps the same buffers on ordinary 4 KiB pages, for comparisons.
#[cfg(unix)]
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var_os("HETMOE_HUGE_PAGES").is_none_or(|v| v != "0"))
}

/// Size of a transparent huge page on x86-64 and most arm64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;
/// Buffers smaller than this come from the global allocator: they would waste most of a
/// huge page and are read too briefly for page walks to matter.
const MIN_HUGE_BYTES: usize = HUGE_PAGE / 2;

/// A fixed-length, zero-initialised buffer of `T` on transparent huge pages where possible.
/// Dereferences to `[T]`.
pub struct HugeBuf<T: ZeroValid> {
    ptr: NonNull<T>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// From `Vec<T>` with capacity `len` (nothing to free when `len == 0`).
    Heap,
    /// An anonymous mapping of `len` bytes at `base`, of which `ptr` is a 2 MiB-aligned
    /// part.
    #[cfg(unix)]
    Mapped { base: *mut libc::c_void, len: usize },
}

// SAFETY: HugeBuf owns its memory exclusively, like a Box<[T]>; T is Send + Sync.
unsafe impl<T: ZeroValid> Send for HugeBuf<T> {}
// SAFETY: shared access only hands out &[T]; T is Sync.
unsafe impl<T: ZeroValid> Sync for HugeBuf<T> {}

impl<T: ZeroValid> HugeBuf<T> {
    /// `len` zeroed elements.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("HugeBuf size overflows usize");
        #[cfg(unix)]
        if bytes >= MIN_HUGE_BYTES && std::mem::align_of::<T>() <= HUGE_PAGE {
            if let Some(b) = Self::mapped(len, bytes) {
                return b;
            }
        }
        Self::heap(len)
    }

    /// A copy of `src`.
    pub fn from_slice(src: &[T]) -> Self {
        let mut b = Self::zeroed(src.len());
        b.copy_from_slice(src);
        b
    }

    /// Whether the buffer asked the kernel for huge pages (the kernel may still decline).
    pub fn is_huge_page_backed(&self) -> bool {
        !matches!(self.backing, Backing::Heap)
    }

    fn heap(len: usize) -> Self {
        // SAFETY: T is ZeroValid, so zeroed memory holds `len` valid values. Zero-filling
        // through alloc_zeroed is what vec![0; n] does for integers.
        let v: Vec<T> = unsafe {
            let layout = std::alloc::Layout::array::<T>(len).expect("HugeBuf layout");
            if layout.size() == 0 {
                Vec::new()
            } else {
                let p = std::alloc::alloc_zeroed(layout) as *mut T;
                if p.is_null() {
                    std::alloc::handle_alloc_error(layout);
                }
                Vec::from_raw_parts(p, len, len)
            }
        };
        let mut v = std::mem::ManuallyDrop::new(v);
        let ptr = NonNull::new(v.as_mut_ptr()).unwrap_or(NonNull::dangling());
        HugeBuf { ptr, len, backing: Backing::Heap }
    }

    #[cfg(unix)]
    fn mapped(len: usize, bytes: usize) -> Option<Self> {
        // Map one huge page more than needed so a 2 MiB-aligned start fits inside.
        let map_len = bytes.checked_add(HUGE_PAGE)?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
        // existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let offset = (base as usize).next_multiple_of(HUGE_PAGE) - base as usize;
        // SAFETY: offset < HUGE_PAGE, so [base + offset, + bytes) lies inside the mapping.
        let start = unsafe { (base as *mut u8).add(offset) };
        if huge_pages_wanted() {
            // SAFETY: the range is part of our mapping. Failure (THP compiled out or
            // disabled) only means ordinary pages, so the result is ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
        }
        let ptr = NonNull::new(start as *mut T)?;
        Some(HugeBuf { ptr, len, backing: Backing::Mapped { base, len: map_len } })
    }
}

impl<T: ZeroValid> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr points to len initialised (zeroed or written) T owned by self; for
        // len == 0 it is dangling but aligned, which from_raw_parts allows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: ZeroValid> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: ZeroValid> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: ptr/len came from a Vec<T> with capacity len that we never freed.
            Backing::Heap => unsafe { drop(Vec::from_raw_parts(self.ptr.as_ptr(), self.len, self.len)) },
            #[cfg(unix)]
            Backing::Mapped { base, len } => {
                // SAFETY: base/len is the mapping made in `mapped`, unmapped only here.
                unsafe { libc::munmap(base, len) };
            }
        }
    }
}

impl<T: ZeroValid> Clone for HugeBuf<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: ZeroValid + std::fmt::Debug> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeBuf").field("len", &self.len).field("huge", &self.is_huge_page_backed()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_copy_and_clone() {
        for len in [0usize, 1, 1000, (3 << 20) / 4 + 3] {
            let mut b = HugeBuf::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            b.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            let c = b.clone();
            assert_eq!(&*c, &*b);
            if len * 4 >= MIN_HUGE_BYTES && cfg!(unix) {
                assert!(b.is_huge_page_backed());
                assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
        let q = HugeBuf::<BlockQ8>::zeroed(100_000);
        assert!(q.iter().all(|b| b.d == f16::ZERO && b.qs == [0; 32]));
        assert_eq!(q.as_ptr() as usize % std::mem::align_of::<BlockQ8>(), 0);
    }
}
