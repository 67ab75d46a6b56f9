//! Aligned I/O buffers from a bounded, pre-touched pool.
//!
//! The pool is one allocation of `buf_count_max × buf_size_bytes` bytes,
//! 4096-aligned, written once at start-up so that no first-touch page fault
//! (≈20× a warm access on this kind of VM) lands on the spill path. Being one
//! region, it is also what the io_uring backend registers as fixed buffers:
//! buffer `i` is registered buffer index `i` in every ring.
//!
//! An [`AlignedBuf`] is the exclusive owner of its slice of the region. It is
//! moved into a storage operation and comes back with the completion (the
//! "rent" model), and it returns to the pool when dropped.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use super::{DIRECT_IO_ALIGN, IoError};

/// A 4096-aligned buffer whose capacity and length are multiples of 4096.
pub struct AlignedBuf {
    pool: Arc<PoolInner>,
    buf_index: u32,
    len: usize,
}

impl AlignedBuf {
    /// The valid bytes (the I/O range of an operation).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `buf_index` was handed out by the pool's free list exactly once,
        // so this buffer is the only owner of `capacity()` bytes at `base_ptr()`;
        // the region lives as long as the `Arc<PoolInner>` this buffer holds, and
        // `len <= capacity` is kept by `set_len`.
        unsafe { std::slice::from_raw_parts(self.base_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.pool.buf_size_bytes
    }

    /// Sets the valid length; the new bytes keep whatever the buffer held.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "len {len} > capacity");
        assert_eq!(len % DIRECT_IO_ALIGN, 0, "len must be a multiple of 4096");
        self.len = len;
    }

    /// Index of this buffer in the pool, which is also its registered-buffer
    /// index in every io_uring ring.
    pub fn buf_index(&self) -> u32 {
        self.buf_index
    }

    /// Pointer handed to the kernel. Only storage backends call this, and only
    /// while the buffer is owned by an in-flight operation.
    pub(super) fn base_ptr(&self) -> *mut u8 {
        let offset = self.buf_index as usize * self.pool.buf_size_bytes;
        // SAFETY: `buf_index < buf_count`, so the offset is inside the region.
        unsafe { self.pool.base.as_ptr().add(offset) }
    }

    /// True if the buffer came from `pool` (registered buffers are per pool).
    pub(super) fn is_from(&self, pool: &BufPool) -> bool {
        Arc::ptr_eq(&self.pool, &pool.inner)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().expect("buffer pool lock");
        debug_assert!(!free.contains(&self.buf_index), "buffer returned twice");
        free.push(self.buf_index);
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("buf_index", &self.buf_index)
            .field("len", &self.len)
            .finish()
    }
}

struct PoolInner {
    base: NonNull<u8>,
    layout: Layout,
    buf_size_bytes: usize,
    buf_count: usize,
    free: Mutex<Vec<u32>>,
}

// SAFETY: the region is plain memory; every byte of it is reachable only
// through the one `AlignedBuf` that owns its index (the free list hands each
// index out once), so sharing the pool between threads shares no bytes.
unsafe impl Send for PoolInner {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for PoolInner {}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // SAFETY: allocated in `BufPool::new` with this layout; every buffer and
        // every ring that registered the region holds an `Arc`, so none is left.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// A fixed set of aligned buffers, sized at start-up.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    /// Allocates and pre-touches `buf_count_max` buffers of `buf_size_bytes`.
    pub fn new(buf_size_bytes: usize, buf_count_max: usize) -> Self {
        assert!(buf_size_bytes > 0 && buf_size_bytes.is_multiple_of(DIRECT_IO_ALIGN));
        assert!(
            buf_size_bytes <= u32::MAX as usize,
            "one op moves at most 4 GiB"
        );
        assert!(buf_count_max > 0 && buf_count_max <= u16::MAX as usize);
        let total = buf_size_bytes
            .checked_mul(buf_count_max)
            .expect("pool size");
        let layout = Layout::from_size_align(total, DIRECT_IO_ALIGN).expect("pool layout");
        // SAFETY: `layout` has a non-zero size (both factors are > 0).
        let ptr = unsafe { std::alloc::alloc(layout) };
        let base = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // Pre-touch: write every page now, not on the first spill.
        // SAFETY: `base` points to `total` freshly allocated bytes.
        unsafe { std::ptr::write_bytes(base.as_ptr(), 0, total) };
        let free = (0..buf_count_max as u32).rev().collect();
        let inner = PoolInner {
            base,
            layout,
            buf_size_bytes,
            buf_count: buf_count_max,
            free: Mutex::new(free),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn buf_size_bytes(&self) -> usize {
        self.inner.buf_size_bytes
    }

    pub fn buf_count(&self) -> usize {
        self.inner.buf_count
    }

    pub fn free_count(&self) -> usize {
        self.inner.free.lock().expect("buffer pool lock").len()
    }

    /// Takes `count` buffers or none: a consumer reserves its whole working set
    /// at once, so two consumers can never deadlock each holding half of it.
    pub fn try_acquire(&self, count: usize) -> Result<Vec<AlignedBuf>, IoError> {
        let mut free = self.inner.free.lock().expect("buffer pool lock");
        if count > free.len() {
            return Err(IoError::BuffersExhausted {
                requested: count,
                free: free.len(),
                buf_count_max: self.inner.buf_count,
            });
        }
        let at = free.len() - count;
        let taken: Vec<u32> = free.drain(at..).collect();
        drop(free);
        let bufs = taken
            .into_iter()
            .map(|buf_index| AlignedBuf {
                pool: self.inner.clone(),
                buf_index,
                len: 0,
            })
            .collect();
        Ok(bufs)
    }

    /// One iovec per buffer, in buffer-index order, for `register_buffers`.
    /// The caller must keep a clone of this pool alive while they are registered.
    pub(super) fn iovecs(&self) -> Vec<libc::iovec> {
        let size = self.inner.buf_size_bytes;
        (0..self.inner.buf_count)
            .map(|i| libc::iovec {
                // SAFETY: `i < buf_count`, so the offset is inside the region.
                iov_base: unsafe { self.inner.base.as_ptr().add(i * size) }.cast(),
                iov_len: size,
            })
            .collect()
    }

    /// Total bytes of the region (what registration pins).
    pub fn total_bytes(&self) -> usize {
        self.inner.layout.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_exclusive_and_return_to_the_pool() {
        let pool = BufPool::new(8192, 4);
        let mut bufs = pool.try_acquire(3).unwrap();
        assert_eq!(pool.free_count(), 1);
        for buf in &mut bufs {
            assert_eq!(buf.base_ptr() as usize % DIRECT_IO_ALIGN, 0);
            buf.set_len(8192);
            let fill = buf.buf_index() as u8 + 1;
            buf.as_mut_slice().fill(fill);
        }
        for buf in &bufs {
            assert!(
                buf.as_slice()
                    .iter()
                    .all(|&b| b == buf.buf_index() as u8 + 1)
            );
        }
        let err = pool.try_acquire(2).unwrap_err();
        assert!(matches!(
            err,
            IoError::BuffersExhausted {
                requested: 2,
                free: 1,
                ..
            }
        ));
        drop(bufs);
        assert_eq!(pool.free_count(), 4);
    }

    #[test]
    #[should_panic(expected = "multiple of 4096")]
    fn unaligned_len_is_refused() {
        let pool = BufPool::new(8192, 1);
        pool.try_acquire(1).unwrap()[0].set_len(100);
    }
}
