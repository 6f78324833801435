//! The guest's global allocator: a bump allocator over the heap the linker reserves in the
//! initial memory, growing linear memory only once that is used up.
//!
//! Why: every check runs in a fresh instance that is dropped afterwards, so freeing memory is
//! wasted work, and an allocator that starts with `memory.grow` costs two `mprotect` calls per
//! request in the host. `sandgate build` links the policy with a 256 KiB initial heap
//! (`--initial-heap`), past all static data, so a normal request never grows memory; the
//! host's memory cap still bounds a policy that allocates without end (growth fails, the
//! allocation fails, the instance traps, the check is denied).
//!
//! Why past all static data: what `prepare` allocates becomes part of the memory image every
//! check starts from, and the image spans from the lowest to the highest byte that is not zero.
//! With the heap above every static, it ends just past what `prepare` built. (A heap in a
//! static arena has other statics after it, which stretched the image over the whole arena and
//! made every prepared check twice as slow: docs/BENCHMARKS.md.) A policy linked without an
//! initial heap (built without `sandgate build`) has only the rest of its last static page
//! before it grows memory.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

const PAGE_SIZE: usize = 64 * 1024;

unsafe extern "C" {
    /// Where the linker's heap starts: past all static data (wasm-ld).
    static __heap_base: u8;
    /// Where the initial memory ends (wasm-ld).
    static __heap_end: u8;
}

/// The first region to allocate from: the linker's initial heap.
fn first_region() -> (usize, usize) {
    // Only the symbols' addresses are taken: no read, so no `unsafe`.
    (&raw const __heap_base as usize, &raw const __heap_end as usize)
}

struct Bump {
    /// `(next free address, end of the current region)`; `(0, 0)` before the first use.
    state: UnsafeCell<(usize, usize)>,
}

// SAFETY: this component has exactly one thread.
unsafe impl Sync for Bump {}

#[global_allocator]
static ALLOCATOR: Bump = Bump { state: UnsafeCell::new((0, 0)) };

impl Bump {
    /// Give the allocator a fresh region of at least `size` bytes from `memory.grow`.
    fn grow(state: &mut (usize, usize), size: usize) -> bool {
        let pages = size.div_ceil(PAGE_SIZE);
        let previous = core::arch::wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return false;
        }
        *state = (previous * PAGE_SIZE, (previous + pages) * PAGE_SIZE);
        true
    }
}

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded, and no reference to the state outlives this call.
        let state = unsafe { &mut *self.state.get() };
        if state.1 == 0 {
            *state = first_region();
        }
        let fits = |s: &(usize, usize)| {
            let start = s.0.checked_next_multiple_of(layout.align())?;
            let end = start.checked_add(layout.size())?;
            (end <= s.1).then_some((start, end))
        };
        let (start, end) = match fits(state) {
            Some(found) => found,
            None => {
                if !Self::grow(state, layout.size() + layout.align()) {
                    return core::ptr::null_mut();
                }
                match fits(state) {
                    Some(found) => found,
                    None => return core::ptr::null_mut(),
                }
            }
        };
        state.0 = end;
        start as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Only the most recent allocation can be given back; the instance dies soon anyway.
        // SAFETY: single-threaded.
        let state = unsafe { &mut *self.state.get() };
        if ptr as usize + layout.size() == state.0 {
            state.0 = ptr as usize;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: single-threaded.
        let state = unsafe { &mut *self.state.get() };
        // The most recent allocation grows or shrinks in place when the region has room.
        if ptr as usize + layout.size() == state.0 && ptr as usize + new_size <= state.1 {
            state.0 = ptr as usize + new_size;
            return ptr;
        }
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = self.alloc(new_layout);
            if !new.is_null() {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            }
            new
        }
    }
}
