//! A global allocator that zeroes every heap block before it is freed.
//!
//! DEK seeds and key bytes pass through buffers the plugin does not own: prost's decoded
//! messages, tonic's encode and decode buffers, h2's frames, the `:authority` rewriter's
//! buffers, the AWS SDK's and PKCS#11 bindings' copies. Clearing each would take a patch per
//! layer; zeroing in `dealloc` clears all of them as soon as the buffer is dropped, so freed
//! memory never holds a seed or key. Reallocation goes through the trait's default
//! (allocate, copy, `dealloc` the old block), so a moved buffer's old copy is zeroed too.
//! What stays is memory still in use: see the README's security section.

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`] with every block zeroed before it is handed back.
pub struct ZeroizingAlloc;

#[allow(unsafe_code)] // a GlobalAlloc implementation, see SAFETY
// SAFETY: allocation is delegated to `System` unchanged; `dealloc` only writes to the block
// it is given, which the caller owns and no longer uses, before freeing it with `System`.
unsafe impl GlobalAlloc for ZeroizingAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes from this allocator.
        unsafe {
            wipe(ptr, layout.size());
            System.dealloc(ptr, layout);
        }
    }
}

/// Zeroes `len` bytes at `ptr` in a way the compiler cannot drop as a dead store.
#[allow(unsafe_code)]
#[inline]
unsafe fn wipe(ptr: *mut u8, len: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees `len` writable bytes at `ptr`. explicit_bzero is
    // memset that is never optimised away.
    unsafe {
        libc::explicit_bzero(ptr.cast(), len);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    // SAFETY: as above; `zeroize` writes with volatile stores.
    unsafe {
        zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(ptr, len));
    }
}
