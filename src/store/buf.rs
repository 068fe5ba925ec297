//! Block buffers aligned for O_DIRECT, recycled through a small pool.
//!
//! A block received from quinn arrives in packet-sized pieces; it has to be made
//! contiguous once anyway, so it is gathered into a 4 KiB-aligned buffer. That buffer
//! then goes to the disk with O_DIRECT: the kernel moves it by DMA instead of copying
//! it into the page cache, which was the receiver's largest single CPU cost. Buffers
//! come back to the pool when the last `Bytes` pointing at them is dropped. A shorter
//! block (the 256 KiB file, the tail of a large one) uses the front of a pooled buffer:
//! a fresh allocation of that size is fresh pages from the kernel, zeroed and faulted
//! in for every block.

use bytes::Bytes;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::{Arc, Mutex};

/// Alignment O_DIRECT needs for address, length and offset.
pub const ALIGN: usize = 4096;

/// Smallest write worth O_DIRECT: below this a buffered write plus one sync at commit
/// costs less than a device write per block.
pub const DIRECT_MIN: usize = 64 << 10;

/// Buffers kept for reuse at most (each `len` bytes).
const POOL_MAX: usize = 32;

/// An owned, aligned, fixed-size byte buffer.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// Bytes allocated (`len` or more).
    cap: usize,
    pool: Option<Arc<Pool>>,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only through AsRef.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(ALIGN), ALIGN).expect("valid layout")
    }

    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> AlignedBuf {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(Self::layout(len)) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout(len));
        }
        AlignedBuf {
            ptr,
            len,
            cap: len,
            pool: None,
        }
    }

    /// The buffer's bytes, to fill.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Freezes the buffer into `Bytes` without copying.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let mut free = pool.free.lock().expect("buffer pool");
            if free.len() < POOL_MAX && self.cap == pool.len {
                free.push(AlignedBuf {
                    ptr: self.ptr,
                    len: self.cap,
                    cap: self.cap,
                    pool: None,
                });
                return;
            }
        }
        // SAFETY: allocated with this layout (`new` or `Pool::take`), freed once.
        unsafe { dealloc(self.ptr, Self::layout(self.cap)) };
    }
}

/// A pool of same-size aligned buffers.
pub struct Pool {
    len: usize,
    free: Mutex<Vec<AlignedBuf>>,
}

impl Pool {
    /// An empty pool of buffers of `len` bytes each.
    pub fn new(len: usize) -> Arc<Pool> {
        Arc::new(Pool {
            len,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer from the pool (contents unspecified) or a new one.
    pub fn take(self: &Arc<Pool>) -> AlignedBuf {
        let mut buf = self.free.lock().expect("buffer pool").pop().unwrap_or_else(|| {
            // Zeroed once when made, so no slice over it is ever uninitialised.
            // SAFETY: non-zero size; checked for null below.
            let ptr = unsafe { alloc_zeroed(AlignedBuf::layout(self.len)) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(AlignedBuf::layout(self.len));
            }
            AlignedBuf {
                ptr,
                len: self.len,
                cap: self.len,
                pool: None,
            }
        });
        buf.pool = Some(self.clone());
        buf
    }
}

/// Whether `data` at `offset` can (and should) be written with O_DIRECT.
pub fn direct_ok(data: &[u8], offset: u64) -> bool {
    (data.as_ptr() as usize) % ALIGN == 0 && wants_direct(data.len()) && offset % ALIGN as u64 == 0
}

/// Whether a block of `len` bytes should be received into an aligned buffer.
pub fn wants_direct(len: usize) -> bool {
    len >= DIRECT_MIN && len % ALIGN == 0
}

/// An aligned buffer of `len` bytes (contents unspecified): the front of a pooled one
/// if it fits, else a new one.
pub fn aligned(pool: &Arc<Pool>, len: usize) -> AlignedBuf {
    if len <= pool.len {
        let mut buf = pool.take();
        buf.len = len;
        buf
    } else {
        AlignedBuf::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_aligned_and_come_back() {
        let pool = Pool::new(1 << 20);
        let mut a = pool.take();
        a.as_mut_slice()[0] = 7;
        let ptr = a.as_ref().as_ptr();
        let bytes = a.freeze();
        assert!(direct_ok(&bytes, 0));
        assert_eq!(bytes[0], 7);
        let second_ref = bytes.slice(0..10);
        drop(bytes);
        assert_eq!(pool.free.lock().unwrap().len(), 0, "still referenced");
        drop(second_ref);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        assert_eq!(pool.take().as_ref().as_ptr(), ptr, "reused");
        assert!(!direct_ok(&AlignedBuf::new(100).freeze(), 0), "odd length");
        assert!(
            !direct_ok(&AlignedBuf::new(4096).freeze(), 0),
            "too small to be worth it"
        );
        assert!(direct_ok(&aligned(&pool, 256 << 10).freeze(), 4096));
        assert!(!direct_ok(&aligned(&pool, 256 << 10).freeze(), 100), "unaligned offset");
        let short = aligned(&pool, 256 << 10);
        assert_eq!(short.as_ref().len(), 256 << 10);
        assert_eq!(short.as_ref().as_ptr(), ptr, "a shorter block uses a pooled buffer");
        drop(short);
        assert_eq!(pool.take().as_ref().len(), 1 << 20, "and it goes back whole");
    }
}
