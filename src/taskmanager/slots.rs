//! The slot table: N static slots with a resource profile each, and their
//! states free → allocated → active → releasing → free.
//!
//! On a node with GPUs every slot is also a GPU slot: slot `i` gets GPU
//! `i mod gpu_count` and an equal share of that GPU's memory (less a reserve
//! for the CUDA context and the kernels), which becomes its device memory
//! budget ([`gpu_slot_profiles`]). A node without a GPU offers CPU slots
//! only.

use crate::protocol::{ResourceProfile, SlotState, SlotStatus};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot {index} does not exist (this TaskManager has {count} slots)")]
    NoSuchSlot { index: usize, count: usize },
    #[error("slot {index} is occupied by job {job:016x}")]
    Occupied { index: usize, job: u64 },
}

/// Device memory kept out of the slots' budgets on each GPU, for the CUDA
/// context, the loaded kernels and the driver's own allocations.
pub const GPU_MEMORY_RESERVE_FRACTION: f64 = 0.1;

/// The profile of each of `slot_count` slots: `base` for all, plus GPU id
/// and device-memory budget spread round-robin over `gpus`.
pub fn gpu_slot_profiles(
    base: &ResourceProfile,
    slot_count: usize,
    gpus: &[crate::kernels::gpu::GpuDevice],
) -> Vec<ResourceProfile> {
    (0..slot_count)
        .map(|slot_index| {
            let mut profile = base.clone();
            if !gpus.is_empty() {
                let gpu = &gpus[slot_index % gpus.len()];
                let sharing = (0..slot_count)
                    .filter(|s| s % gpus.len() == slot_index % gpus.len())
                    .count();
                let usable = gpu.memory_bytes as f64 * (1.0 - GPU_MEMORY_RESERVE_FRACTION);
                profile.gpu = Some((gpu.ordinal, (usable / sharing as f64) as u64));
            }
            profile
        })
        .collect()
}

struct Slot {
    state: SlotState,
    job: Option<u64>,
    running_tasks: usize,
}

pub struct SlotTable {
    slots: Vec<Slot>,
    profiles: Vec<ResourceProfile>,
}

impl SlotTable {
    pub fn new(count: usize, profile: ResourceProfile) -> Self {
        Self::with_profiles(vec![profile; count])
    }

    /// One slot per profile (GPU slots differ in their GPU).
    pub fn with_profiles(profiles: Vec<ResourceProfile>) -> Self {
        Self {
            slots: (0..profiles.len())
                .map(|_| Slot {
                    state: SlotState::Free,
                    job: None,
                    running_tasks: 0,
                })
                .collect(),
            profiles,
        }
    }

    fn slot(&mut self, index: usize) -> Result<&mut Slot, SlotError> {
        let count = self.slots.len();
        self.slots
            .get_mut(index)
            .ok_or(SlotError::NoSuchSlot { index, count })
    }

    /// Allocates a slot to a job; allocating it again to the same job is a
    /// no-op (idempotent, as Flink's duplicate allocation ids).
    pub fn allocate(&mut self, index: usize, job: u64) -> Result<(), SlotError> {
        let slot = self.slot(index)?;
        match (slot.state, slot.job) {
            (SlotState::Free, _) => {
                slot.state = SlotState::Allocated;
                slot.job = Some(job);
                Ok(())
            }
            (_, Some(j)) if j == job => Ok(()),
            (_, j) => Err(SlotError::Occupied {
                index,
                job: j.unwrap_or(0),
            }),
        }
    }

    /// A task of the slot's job starts.
    pub fn task_started(&mut self, index: usize) -> Result<(), SlotError> {
        let slot = self.slot(index)?;
        assert!(matches!(
            slot.state,
            SlotState::Allocated | SlotState::Active
        ));
        slot.state = SlotState::Active;
        slot.running_tasks += 1;
        Ok(())
    }

    /// A task ended; the slot frees itself with its last task.
    pub fn task_ended(&mut self, index: usize) -> Result<(), SlotError> {
        let slot = self.slot(index)?;
        assert!(
            slot.running_tasks > 0,
            "slot {index}: task ended but none running"
        );
        slot.running_tasks -= 1;
        if slot.running_tasks == 0 {
            slot.state = SlotState::Releasing;
            slot.state = SlotState::Free;
            slot.job = None;
        }
        Ok(())
    }

    pub fn report(&self) -> Vec<SlotStatus> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| SlotStatus {
                index,
                state: s.state,
                execution: s.job.map(crate::protocol::ExecutionId),
                profile: self.profiles[index].clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SlotTable {
        SlotTable::new(
            2,
            ResourceProfile {
                cpu_cores: 1.0,
                managed_memory_bytes: 1,
                network_memory_bytes: 1,
                gpu: None,
            },
        )
    }

    #[test]
    fn slot_lifecycle_free_allocated_active_free() {
        let mut t = table();
        t.allocate(0, 7).unwrap();
        assert_eq!(t.report()[0].state, SlotState::Allocated);
        t.task_started(0).unwrap();
        t.task_started(0).unwrap();
        assert_eq!(t.report()[0].state, SlotState::Active);
        t.task_ended(0).unwrap();
        assert_eq!(t.report()[0].state, SlotState::Active);
        t.task_ended(0).unwrap();
        assert_eq!(t.report()[0].state, SlotState::Free);
    }

    #[test]
    fn gpu_slots_spread_over_the_gpus_and_share_their_memory() {
        let base = table().report()[0].profile.clone();
        let gpu = |ordinal| crate::kernels::gpu::GpuDevice {
            ordinal,
            name: "sim".into(),
            memory_bytes: 10 << 30,
            compute_capability: (9, 0),
            simulated: false,
        };
        let profiles = gpu_slot_profiles(&base, 3, &[gpu(0), gpu(1)]);
        let gpus: Vec<_> = profiles.iter().map(|p| p.gpu).collect();
        let nine_tenths = (10u64 << 30) as f64 * 0.9;
        assert_eq!(
            gpus,
            vec![
                Some((0, (nine_tenths / 2.0) as u64)),
                Some((1, nine_tenths as u64)),
                Some((0, (nine_tenths / 2.0) as u64)),
            ]
        );
        let cpu_only = gpu_slot_profiles(&base, 2, &[]);
        assert!(cpu_only.iter().all(|p| p.gpu.is_none()));
        let table = SlotTable::with_profiles(profiles);
        assert_eq!(table.report()[1].profile.gpu.map(|g| g.0), Some(1));
    }

    #[test]
    fn occupied_slot_refuses_another_job_but_not_the_same() {
        let mut t = table();
        t.allocate(1, 7).unwrap();
        t.allocate(1, 7).unwrap();
        assert!(matches!(t.allocate(1, 8), Err(SlotError::Occupied { .. })));
        assert!(matches!(
            t.allocate(5, 8),
            Err(SlotError::NoSuchSlot { .. })
        ));
    }
}
