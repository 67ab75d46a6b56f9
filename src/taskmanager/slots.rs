//! The slot table: N static slots with a resource profile each, and their
//! states free → allocated → active → releasing → free.

use crate::cluster::rpc::{ResourceProfile, SlotState, SlotStatus};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot {index} does not exist (this TaskManager has {count} slots)")]
    NoSuchSlot { index: usize, count: usize },
    #[error("slot {index} is occupied by job {job:016x}")]
    Occupied { index: usize, job: u64 },
}

struct Slot {
    state: SlotState,
    job: Option<u64>,
    running_tasks: usize,
}

pub struct SlotTable {
    slots: Vec<Slot>,
    profile: ResourceProfile,
}

impl SlotTable {
    pub fn new(count: usize, profile: ResourceProfile) -> Self {
        Self {
            slots: (0..count)
                .map(|_| Slot {
                    state: SlotState::Free,
                    job: None,
                    running_tasks: 0,
                })
                .collect(),
            profile,
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
                job: s.job,
                profile: self.profile.clone(),
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
