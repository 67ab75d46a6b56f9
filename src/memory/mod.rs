//! Memory: managed memory pages with per-slot budgets, and the network
//! buffer pool.
//!
//! Both pools are fixed in size: their totals are hard limits set at
//! start-up. By default a page or segment is allocated the first time it is
//! handed out and reused from the pool's free list after that, so a job that
//! uses 4 MiB of a 600 MiB budget commits 4 MiB; `taskmanager.memory.pre-allocate`
//! allocates and touches everything at start-up instead (a first-touch page
//! fault costs ~20× a warm access on this kind of VM).
//!
//! Invariants:
//! - a slot never holds more managed bytes than its budget; a reservation that
//!   does not fit fails with [`MemoryError::BudgetExceeded`] and changes nothing;
//! - every page or segment handed out comes back to the pool it came from
//!   (on drop), so the pools' free counts return to their totals when idle.

mod netpool;
mod pages;

pub use netpool::{NetworkBufferPool, Segment};
pub use pages::{Commit, MemoryManager, Page, PagePool};

/// Errors of the memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "slot {slot}: managed memory budget exceeded: requested {requested_bytes} bytes, \
         {free_bytes} of {budget_bytes} bytes free; raise taskmanager.memory.managed.fraction \
         or taskmanager.memory.process.size, or lower taskmanager.numberOfTaskSlots"
    )]
    BudgetExceeded {
        slot: usize,
        requested_bytes: u64,
        free_bytes: u64,
        budget_bytes: u64,
    },
    #[error(
        "insufficient number of network buffers: required {required}, but only {available} \
         available; raise taskmanager.memory.network.fraction or taskmanager.memory.network.min"
    )]
    InsufficientNetworkBuffers { required: usize, available: usize },
}
