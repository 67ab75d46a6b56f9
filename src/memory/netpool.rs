//! The network buffer pool: a fixed set of equal-size segments (Flink's
//! `NetworkBufferPool`), allocated on first use or pre-touched at start-up
//! (see [`Commit`]). Input gates split it
//! into exclusive buffers per channel and floating buffers per gate; result
//! partitions take one segment per buffer in flight.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::MemoryError;
use super::pages::{BufferStore, Commit};

/// A network segment. It returns to its pool when dropped.
pub struct Segment {
    bytes: Box<[u8]>,
    pool: Arc<NetworkBufferPool>,
}

impl Segment {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
    pub fn capacity(&self) -> usize {
        self.bytes.len()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        if !bytes.is_empty() {
            self.pool.recycle(bytes);
        }
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segment({} bytes)", self.bytes.len())
    }
}

pub struct NetworkBufferPool {
    segment_size_bytes: usize,
    segment_count: usize,
    free: Mutex<FreeList>,
    available: Condvar,
}

struct FreeList {
    segments: BufferStore,
    /// Threads waiting in `request_timeout`: a recycle wakes one only then
    /// (a condvar's notify is a system call even with nobody waiting, and
    /// every sent buffer recycles a segment).
    waiters: usize,
}

impl NetworkBufferPool {
    /// A pool of `segment_count` segments, allocated on first use.
    pub fn new(segment_count: usize, segment_size_bytes: usize) -> Arc<Self> {
        Self::with_commit(segment_count, segment_size_bytes, Commit::OnFirstUse)
    }

    pub fn with_commit(
        segment_count: usize,
        segment_size_bytes: usize,
        commit: Commit,
    ) -> Arc<Self> {
        Arc::new(Self {
            segment_size_bytes,
            segment_count,
            free: Mutex::new(FreeList {
                segments: BufferStore::new(segment_count, segment_size_bytes, commit),
                waiters: 0,
            }),
            available: Condvar::new(),
        })
    }

    pub fn segment_size_bytes(&self) -> usize {
        self.segment_size_bytes
    }
    pub fn segment_count(&self) -> usize {
        self.segment_count
    }
    /// Segments that can be handed out now (free or not allocated yet).
    pub fn available_count(&self) -> usize {
        self.lock().segments.available()
    }

    /// Segments allocated so far.
    pub fn allocated_count(&self) -> usize {
        self.lock().segments.allocated()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeList> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn recycle(&self, bytes: Box<[u8]>) {
        let mut free = self.lock();
        free.segments.give_back(bytes);
        let wake = free.waiters > 0;
        drop(free);
        if wake {
            self.available.notify_one();
        }
    }

    /// Base address and length of every segment now in the pool, for
    /// registering them with an RDMA device at start-up (before any is
    /// handed out, so the list covers the whole pool). Allocates the
    /// segments not allocated yet: registered memory is pinned anyway.
    pub fn free_segment_ptrs(&self) -> Vec<(*mut u8, usize)> {
        let mut free = self.lock();
        free.segments.allocate_all();
        free.segments
            .free_list_mut()
            .iter_mut()
            .map(|s| (s.as_mut_ptr(), s.len()))
            .collect()
    }

    pub fn try_request(self: &Arc<Self>) -> Option<Segment> {
        let bytes = self.lock().segments.take()?;
        Some(Segment {
            bytes,
            pool: Arc::clone(self),
        })
    }

    /// Takes `count` segments at once (exclusive buffers of a gate), or fails
    /// with Flink's "insufficient number of network buffers".
    pub fn request_many(self: &Arc<Self>, count: usize) -> Result<Vec<Segment>, MemoryError> {
        let mut free = self.lock();
        let available = free.segments.available();
        let taken =
            free.segments
                .take_many(count)
                .ok_or(MemoryError::InsufficientNetworkBuffers {
                    required: count,
                    available,
                })?;
        Ok(taken
            .into_iter()
            .map(|bytes| Segment {
                bytes,
                pool: Arc::clone(self),
            })
            .collect())
    }

    /// Waits up to `timeout` for a segment; `None` when none came back.
    pub fn request_timeout(self: &Arc<Self>, timeout: Duration) -> Option<Segment> {
        let mut free = self.lock();
        free.waiters += 1;
        let (mut free, _) = self
            .available
            .wait_timeout_while(free, timeout, |f| f.segments.available() == 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        free.waiters -= 1;
        let bytes = free.segments.take()?;
        Some(Segment {
            bytes,
            pool: Arc::clone(self),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_return_to_the_pool_on_drop() {
        let pool = NetworkBufferPool::new(4, 4096);
        let many = pool.request_many(3).unwrap();
        assert_eq!(pool.available_count(), 1);
        assert!(pool.request_many(2).is_err());
        drop(many);
        assert_eq!(pool.available_count(), 4);
    }

    #[test]
    fn segments_are_allocated_on_first_use() {
        let pool = NetworkBufferPool::new(8, 4096);
        assert_eq!((pool.allocated_count(), pool.available_count()), (0, 8));
        let one = pool.try_request().unwrap();
        drop(one);
        let two = pool.request_many(2).unwrap();
        assert_eq!(pool.allocated_count(), 2, "the freed segment is reused");
        drop(two);
        assert_eq!(
            pool.free_segment_ptrs().len(),
            8,
            "registration allocates all"
        );
        assert_eq!(pool.allocated_count(), 8);
    }

    #[test]
    fn insufficient_buffers_message_matches_flink() {
        let pool = NetworkBufferPool::new(1, 4096);
        let err = pool.request_many(2).err().unwrap().to_string();
        assert!(err.contains("required 2, but only 1 available"), "{err}");
    }

    #[test]
    fn request_timeout_wakes_on_recycle() {
        let pool = NetworkBufferPool::new(1, 4096);
        let held = pool.try_request().unwrap();
        let p2 = Arc::clone(&pool);
        let t = std::thread::spawn(move || p2.request_timeout(Duration::from_secs(5)).is_some());
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert!(t.join().unwrap());
    }
}
