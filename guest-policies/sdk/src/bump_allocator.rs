//! The guest's global allocator: a bump allocator over a static arena, growing linear memory
//! only once the arena is used up.
//!
//! Why: every check runs in a fresh instance that is dropped afterwards, so freeing memory is
//! wasted work, and an allocator that starts with `memory.grow` costs two `mprotect` calls per
//! request in the host. The arena lives in the module's zero-initialised data, so a normal
//! request never grows memory; the host's memory cap still bounds a policy that allocates
//! without end (growth fails, the allocation fails, the instance traps, the check is denied).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

const ARENA_SIZE: usize = 256 * 1024;
const PAGE_SIZE: usize = 64 * 1024;

struct Bump {
    /// `(next free address, end of the current region)`; `(0, 0)` before the first use.
    state: UnsafeCell<(usize, usize)>,
}

#[repr(C, align(16))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: this component has exactly one thread.
unsafe impl Sync for Bump {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));

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
            let start = ARENA.0.get() as usize;
            *state = (start, start + ARENA_SIZE);
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
