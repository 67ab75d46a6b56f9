//! Managed memory: a TaskManager-wide pool of fixed-size pages, pre-touched at
//! start-up, and a [`MemoryManager`] per slot that hands pages out against the
//! slot's budget (Flink's per-slot `MemoryManager`).

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

/// The TaskManager's managed memory, as pre-touched pages.
pub struct PagePool {
    page_size_bytes: usize,
    page_count: usize,
    free: Mutex<Vec<Box<[u8]>>>,
}

impl PagePool {
    /// Allocates and touches `total_bytes / page_size_bytes` pages.
    pub fn new(total_bytes: u64, page_size_bytes: usize) -> Arc<Self> {
        assert!(page_size_bytes.is_power_of_two() && page_size_bytes >= 4096);
        let page_count = (total_bytes / page_size_bytes as u64) as usize;
        let free = (0..page_count)
            .map(|_| pre_touched(page_size_bytes))
            .collect();
        Arc::new(Self {
            page_size_bytes,
            page_count,
            free: Mutex::new(free),
        })
    }

    pub fn page_size_bytes(&self) -> usize {
        self.page_size_bytes
    }
    pub fn page_count(&self) -> usize {
        self.page_count
    }
    pub fn free_page_count(&self) -> usize {
        lock(&self.free).len()
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
        lock(&self.pool.free).push(bytes);
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
        let taken: Vec<Box<[u8]>> = {
            let mut free = lock(&inner.pool.free);
            if free.len() < count {
                None
            } else {
                let at = free.len() - count;
                Some(free.split_off(at))
            }
        }
        .ok_or_else(|| {
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
    fn error_names_the_keys_to_raise() {
        let pool = PagePool::new(4096, 4096);
        let err = pool.slot_manager(3, 0).allocate_pages(1).err().unwrap();
        let text = err.to_string();
        assert!(text.contains("slot 3") && text.contains("taskmanager.memory.managed.fraction"));
    }
}
