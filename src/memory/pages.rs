//! Managed memory: a TaskManager-wide pool of fixed-size pages and a
//! [`MemoryManager`] per slot that hands pages out against the slot's budget
//! (Flink's per-slot `MemoryManager`).
//!
//! The pool's size is a hard limit, but its pages are allocated when first
//! asked for ([`Commit::OnFirstUse`], the default) and come back to the
//! pool's free list when dropped, so a job pays for the memory it uses, and
//! a page is allocated at most once. [`Commit::PreTouched`]
//! (`taskmanager.memory.pre-allocate`) allocates and touches every page at
//! start-up instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::MemoryError;

/// One managed memory page. It returns to its pool and its slot's budget when
/// dropped.
pub struct Page {
    bytes: Box<[u8]>,
    owner: Arc<BudgetInner>,
}

impl Page {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        self.owner.release(bytes);
    }
}

/// When a pool's memory is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Each page or segment is allocated the first time it is handed out
    /// and reused from the free list after that.
    OnFirstUse,
    /// Everything is allocated and written once at start-up, so that no
    /// first use pays a page fault (`taskmanager.memory.pre-allocate`).
    PreTouched,
}

/// A fixed number of equal buffers, allocated up front or on first use, and
/// a free list of those handed back. Shared by the managed-memory pool and
/// the network buffer pool.
pub(crate) struct BufferStore {
    buffer_bytes: usize,
    total: usize,
    /// Buffers allocated so far (`total` when pre-touched).
    allocated: usize,
    free: Vec<Box<[u8]>>,
}

impl BufferStore {
    pub(crate) fn new(total: usize, buffer_bytes: usize, commit: Commit) -> Self {
        let free: Vec<Box<[u8]>> = match commit {
            Commit::PreTouched => (0..total).map(|_| pre_touched(buffer_bytes)).collect(),
            Commit::OnFirstUse => Vec::new(),
        };
        Self {
            buffer_bytes,
            total,
            allocated: free.len(),
            free,
        }
    }

    /// Buffers that can still be handed out: free ones and never-allocated ones.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + (self.total - self.allocated)
    }

    /// Buffers allocated so far (committed memory is at most this many).
    pub(crate) fn allocated(&self) -> usize {
        self.allocated
    }

    /// One buffer, from the free list or freshly allocated; `None` when all
    /// `total` are handed out.
    pub(crate) fn take(&mut self) -> Option<Box<[u8]>> {
        if let Some(bytes) = self.free.pop() {
            return Some(bytes);
        }
        (self.allocated < self.total).then(|| {
            self.allocated += 1;
            vec![0u8; self.buffer_bytes].into_boxed_slice()
        })
    }

    /// `count` buffers, or none when fewer are available.
    pub(crate) fn take_many(&mut self, count: usize) -> Option<Vec<Box<[u8]>>> {
        if self.available() < count {
            return None;
        }
        let from_free = count.min(self.free.len());
        let mut taken = self.free.split_off(self.free.len() - from_free);
        taken.extend((from_free..count).map(|_| {
            self.allocated += 1;
            vec![0u8; self.buffer_bytes].into_boxed_slice()
        }));
        Some(taken)
    }

    pub(crate) fn give_back(&mut self, bytes: Box<[u8]>) {
        debug_assert_eq!(bytes.len(), self.buffer_bytes);
        self.free.push(bytes);
    }

    /// Allocates every buffer not allocated yet, so that the free list holds
    /// all that are not handed out (RDMA registers them all at start-up).
    pub(crate) fn allocate_all(&mut self) {
        while self.allocated < self.total {
            self.allocated += 1;
            self.free.push(pre_touched(self.buffer_bytes));
        }
    }

    pub(crate) fn free_list_mut(&mut self) -> &mut Vec<Box<[u8]>> {
        &mut self.free
    }
}

/// The TaskManager's managed memory: a fixed number of pages.
pub struct PagePool {
    page_size_bytes: usize,
    page_count: usize,
    free: Mutex<BufferStore>,
}

impl PagePool {
    /// A pool of `total_bytes / page_size_bytes` pages, committed on first
    /// use.
    pub fn new(total_bytes: u64, page_size_bytes: usize) -> Arc<Self> {
        Self::with_commit(total_bytes, page_size_bytes, Commit::OnFirstUse)
    }

    pub fn with_commit(total_bytes: u64, page_size_bytes: usize, commit: Commit) -> Arc<Self> {
        assert!(page_size_bytes.is_power_of_two() && page_size_bytes >= 4096);
        let page_count = (total_bytes / page_size_bytes as u64) as usize;
        Arc::new(Self {
            page_size_bytes,
            page_count,
            free: Mutex::new(BufferStore::new(page_count, page_size_bytes, commit)),
        })
    }

    /// Pages allocated so far: the pool's committed memory is at most this
    /// times the page size.
    pub fn allocated_page_count(&self) -> usize {
        lock(&self.free).allocated()
    }

    pub fn page_size_bytes(&self) -> usize {
        self.page_size_bytes
    }
    pub fn page_count(&self) -> usize {
        self.page_count
    }
    /// Pages that can be handed out now (free or not allocated yet).
    pub fn free_page_count(&self) -> usize {
        lock(&self.free).available()
    }

    /// A memory manager for one slot with the given budget.
    pub fn slot_manager(self: &Arc<Self>, slot: usize, budget_bytes: u64) -> MemoryManager {
        MemoryManager {
            inner: Arc::new(BudgetInner {
                pool: Arc::clone(self),
                slot,
                budget_bytes,
                used_bytes: AtomicU64::new(0),
                peak_bytes: AtomicU64::new(0),
            }),
        }
    }
}

/// Allocates a buffer and writes every OS page once, so that the first real
/// use does not pay for the page fault.
pub(crate) fn pre_touched(size_bytes: usize) -> Box<[u8]> {
    let mut bytes = vec![0u8; size_bytes].into_boxed_slice();
    // A zero store into calloc'ed memory may be optimised away; write a
    // non-zero byte and hide it from the optimiser.
    for offset in (0..size_bytes).step_by(4096) {
        bytes[offset] = 1;
    }
    std::hint::black_box(&mut bytes);
    bytes
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct BudgetInner {
    pool: Arc<PagePool>,
    slot: usize,
    budget_bytes: u64,
    used_bytes: AtomicU64,
    peak_bytes: AtomicU64,
}

impl BudgetInner {
    fn release(&self, bytes: Box<[u8]>) {
        let len = bytes.len() as u64;
        if len == 0 {
            return;
        }
        lock(&self.pool.free).give_back(bytes);
        let before = self.used_bytes.fetch_sub(len, Ordering::AcqRel);
        assert!(
            before >= len,
            "slot {}: released more managed memory than reserved",
            self.slot
        );
    }
}

/// A slot's view of managed memory: pages against a budget.
#[derive(Clone)]
pub struct MemoryManager {
    inner: Arc<BudgetInner>,
}

impl MemoryManager {
    pub fn slot(&self) -> usize {
        self.inner.slot
    }
    pub fn page_size_bytes(&self) -> usize {
        self.inner.pool.page_size_bytes
    }
    pub fn budget_bytes(&self) -> u64 {
        self.inner.budget_bytes
    }
    pub fn used_bytes(&self) -> u64 {
        self.inner.used_bytes.load(Ordering::Acquire)
    }
    pub fn peak_bytes(&self) -> u64 {
        self.inner.peak_bytes.load(Ordering::Acquire)
    }

    /// Takes `count` pages, or none at all when they do not fit the budget or
    /// the pool.
    pub fn allocate_pages(&self, count: usize) -> Result<Vec<Page>, MemoryError> {
        let inner = &self.inner;
        let requested = (count * inner.pool.page_size_bytes) as u64;
        let reserved = inner
            .used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + requested <= inner.budget_bytes).then_some(used + requested)
            });
        let used_before = reserved.map_err(|used| self.exceeded(requested, used))?;
        let taken = lock(&inner.pool.free).take_many(count).ok_or_else(|| {
            inner.used_bytes.fetch_sub(requested, Ordering::AcqRel);
            self.exceeded(requested, used_before)
        })?;
        inner
            .peak_bytes
            .fetch_max(used_before + requested, Ordering::AcqRel);
        Ok(taken
            .into_iter()
            .map(|bytes| Page {
                bytes,
                owner: Arc::clone(inner),
            })
            .collect())
    }

    fn exceeded(&self, requested_bytes: u64, used: u64) -> MemoryError {
        MemoryError::BudgetExceeded {
            slot: self.inner.slot,
            requested_bytes,
            free_bytes: self.inner.budget_bytes.saturating_sub(used),
            budget_bytes: self.inner.budget_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_beyond_budget_fails_and_changes_nothing() {
        let pool = PagePool::new(16 * 4096, 4096);
        let slot = pool.slot_manager(0, 4 * 4096);
        let pages = slot.allocate_pages(3).unwrap();
        let err = slot.allocate_pages(2).err().unwrap();
        assert!(matches!(
            err,
            MemoryError::BudgetExceeded {
                free_bytes: 4096,
                ..
            }
        ));
        assert_eq!(slot.used_bytes(), 3 * 4096);
        drop(pages);
        assert_eq!(slot.used_bytes(), 0);
        assert_eq!(pool.free_page_count(), 16);
        assert_eq!(slot.peak_bytes(), 3 * 4096);
    }

    #[test]
    fn slots_share_the_pool_but_not_budgets() {
        let pool = PagePool::new(4 * 4096, 4096);
        let a = pool.slot_manager(0, 4 * 4096);
        let b = pool.slot_manager(1, 4 * 4096);
        let held = a.allocate_pages(3).unwrap();
        assert!(b.allocate_pages(2).is_err(), "pool has only one page left");
        assert_eq!(b.used_bytes(), 0);
        drop(held);
        assert_eq!(b.allocate_pages(4).unwrap().len(), 4);
    }

    #[test]
    fn pages_are_allocated_on_first_use_and_reused() {
        let pool = PagePool::new(16 * 4096, 4096);
        assert_eq!(pool.allocated_page_count(), 0);
        let slot = pool.slot_manager(0, 16 * 4096);
        let pages = slot.allocate_pages(3).unwrap();
        assert_eq!(pool.allocated_page_count(), 3);
        drop(pages);
        let again = slot.allocate_pages(2).unwrap();
        assert_eq!(pool.allocated_page_count(), 3, "freed pages are reused");
        assert_eq!(pool.free_page_count(), 14);
        drop(again);
        let all = slot.allocate_pages(16).unwrap();
        assert_eq!(pool.allocated_page_count(), 16);
        assert!(slot.allocate_pages(1).is_err());
        drop(all);
    }

    #[test]
    fn pre_touched_pool_allocates_everything_up_front() {
        let pool = PagePool::with_commit(8 * 4096, 4096, Commit::PreTouched);
        assert_eq!(pool.allocated_page_count(), 8);
        assert_eq!(pool.free_page_count(), 8);
        let slot = pool.slot_manager(0, 8 * 4096);
        assert_eq!(slot.allocate_pages(8).unwrap().len(), 8);
    }

    #[test]
    fn error_names_the_keys_to_raise() {
        let pool = PagePool::new(4096, 4096);
        let err = pool.slot_manager(3, 0).allocate_pages(1).err().unwrap();
        let text = err.to_string();
        assert!(text.contains("slot 3") && text.contains("taskmanager.memory.managed.fraction"));
    }
}
