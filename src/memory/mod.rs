//! Memory: managed memory pages with per-slot budgets, and the network
//! buffer pool.
//!
//! Both pools are allocated and pre-touched when the TaskManager starts (a
//! first-touch page fault costs ~20× a warm access on this kind of VM), and
//! both are fixed in size: nothing grows them after start-up.
//!
//! Invariants:
//! - a slot never holds more managed bytes than its budget; a reservation that
//!   does not fit fails with [`MemoryError::BudgetExceeded`] and changes nothing;
//! - every page or segment handed out comes back to the pool it came from
//!   (on drop), so the pools' free counts return to their totals when idle.

mod netpool;
mod pages;

pub use netpool::{NetworkBufferPool, Segment};
pub use pages::{MemoryManager, Page, PagePool};

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
