//! The device memory pool: per-slot budgets over one GPU's memory.
//!
//! Every launch reserves the device bytes it will allocate (inputs, outputs,
//! scratch) before it allocates them, and gives them back when its
//! [`DeviceReservation`] drops, which is after the results are copied back
//! to the host. The pool is accounting, not a sub-allocator: the CUDA
//! driver's allocator stays the one that hands out the memory, and the pool
//! is what keeps one slot from taking another slot's share. The pool's
//! maximum is the device's memory minus a reserve for the context and the
//! modules; each slot's maximum is its budget. A reservation that does not
//! fit is a [`PoolError::OutOfMemory`] that the dispatcher answers by
//! splitting the batch (see [`crate::kernels::backend::TieredKernels`]).

use std::sync::{Arc, Mutex, MutexGuard};

/// Errors of the device memory pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "GPU slot {slot_index}: {requested_bytes} bytes requested, {free_bytes} of the slot's {budget_bytes}-byte budget free"
    )]
    OutOfMemory {
        slot_index: usize,
        requested_bytes: u64,
        free_bytes: u64,
        budget_bytes: u64,
    },
    /// The driver itself refused an allocation inside the slot's budget
    /// (another process holds device memory, or fragmentation).
    #[error("GPU slot {slot_index}: the device refused {requested_bytes} bytes")]
    DeviceRefused {
        slot_index: usize,
        requested_bytes: u64,
    },
    #[error(
        "GPU slot budgets ({slot_count} × {slot_budget_bytes} bytes) exceed the pool's {pool_bytes_max} bytes"
    )]
    Oversubscribed {
        slot_count: usize,
        slot_budget_bytes: u64,
        pool_bytes_max: u64,
    },
}

/// How a pool is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes the pool may hand out over all slots.
    pub pool_bytes_max: u64,
    pub slot_count: usize,
    /// Bytes one slot may hold at once.
    pub slot_budget_bytes: u64,
}

impl PoolConfig {
    /// Splits `pool_bytes_max` evenly over `slot_count` slots.
    pub fn even(pool_bytes_max: u64, slot_count: usize) -> Self {
        PoolConfig {
            pool_bytes_max,
            slot_count,
            slot_budget_bytes: pool_bytes_max / slot_count.max(1) as u64,
        }
    }
}

#[derive(Debug)]
struct PoolState {
    in_use_bytes: Vec<u64>,
    peak_bytes: Vec<u64>,
}

/// One GPU's memory, split into per-slot budgets.
#[derive(Debug, Clone)]
pub struct DevicePool {
    config: PoolConfig,
    state: Arc<Mutex<PoolState>>,
}

impl DevicePool {
    pub fn new(config: PoolConfig) -> Result<Self, PoolError> {
        let budgets = config
            .slot_budget_bytes
            .checked_mul(config.slot_count as u64);
        if budgets.is_none_or(|total| total > config.pool_bytes_max) {
            return Err(PoolError::Oversubscribed {
                slot_count: config.slot_count,
                slot_budget_bytes: config.slot_budget_bytes,
                pool_bytes_max: config.pool_bytes_max,
            });
        }
        Ok(DevicePool {
            config,
            state: Arc::new(Mutex::new(PoolState {
                in_use_bytes: vec![0; config.slot_count],
                peak_bytes: vec![0; config.slot_count],
            })),
        })
    }

    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// The handle a slot's operators reserve through.
    ///
    /// # Panics
    /// If the slot does not exist.
    pub fn slot(&self, slot_index: usize) -> SlotPool {
        assert!(
            slot_index < self.config.slot_count,
            "GPU slot {slot_index} of {}",
            self.config.slot_count
        );
        SlotPool {
            pool: self.clone(),
            slot_index,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One slot's share of a [`DevicePool`].
#[derive(Debug, Clone)]
pub struct SlotPool {
    pool: DevicePool,
    slot_index: usize,
}

impl SlotPool {
    pub fn slot_index(&self) -> usize {
        self.slot_index
    }

    pub fn budget_bytes(&self) -> u64 {
        self.pool.config.slot_budget_bytes
    }

    /// The budget of every slot of the device together: what the device's
    /// one stream-ordered memory pool may have to keep for them.
    pub fn device_budget_bytes(&self) -> u64 {
        self.pool.config.pool_bytes_max
    }

    pub fn in_use_bytes(&self) -> u64 {
        self.pool.lock().in_use_bytes[self.slot_index]
    }

    pub fn peak_bytes(&self) -> u64 {
        self.pool.lock().peak_bytes[self.slot_index]
    }

    /// Reserves `bytes` of the slot's budget until the reservation drops.
    pub fn reserve(&self, bytes: u64) -> Result<DeviceReservation, PoolError> {
        let budget_bytes = self.budget_bytes();
        let mut state = self.pool.lock();
        let in_use = state.in_use_bytes[self.slot_index];
        let free_bytes = budget_bytes - in_use;
        if bytes > free_bytes {
            return Err(PoolError::OutOfMemory {
                slot_index: self.slot_index,
                requested_bytes: bytes,
                free_bytes,
                budget_bytes,
            });
        }
        state.in_use_bytes[self.slot_index] = in_use + bytes;
        let peak = &mut state.peak_bytes[self.slot_index];
        *peak = (*peak).max(in_use + bytes);
        Ok(DeviceReservation {
            slot: self.clone(),
            bytes,
        })
    }
}

/// Bytes of a slot's budget held by one launch; released on drop.
#[derive(Debug)]
pub struct DeviceReservation {
    slot: SlotPool,
    bytes: u64,
}

impl DeviceReservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for DeviceReservation {
    fn drop(&mut self) {
        let mut state = self.slot.pool.lock();
        let in_use = &mut state.in_use_bytes[self.slot.slot_index];
        assert!(
            *in_use >= self.bytes,
            "GPU pool released more than reserved"
        );
        *in_use -= self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_beyond_the_slot_budget_is_out_of_memory() {
        let pool = DevicePool::new(PoolConfig::even(1000, 2)).unwrap();
        let slot = pool.slot(1);
        let held = slot.reserve(400).unwrap();
        let refused = slot.reserve(200).unwrap_err();
        assert_eq!(
            refused,
            PoolError::OutOfMemory {
                slot_index: 1,
                requested_bytes: 200,
                free_bytes: 100,
                budget_bytes: 500
            }
        );
        drop(held);
        assert_eq!(slot.in_use_bytes(), 0);
        assert_eq!(slot.peak_bytes(), 400);
        assert!(slot.reserve(500).is_ok());
    }

    #[test]
    fn slots_do_not_share_budgets() {
        let pool = DevicePool::new(PoolConfig::even(1000, 2)).unwrap();
        let _first = pool.slot(0).reserve(500).unwrap();
        assert!(pool.slot(1).reserve(500).is_ok());
        assert!(pool.slot(0).reserve(1).is_err());
    }

    #[test]
    fn budgets_beyond_the_pool_are_refused() {
        let config = PoolConfig {
            pool_bytes_max: 100,
            slot_count: 3,
            slot_budget_bytes: 40,
        };
        assert!(matches!(
            DevicePool::new(config),
            Err(PoolError::Oversubscribed { .. })
        ));
    }
}
