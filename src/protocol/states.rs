//! Task, job and slot states, and a slot's resources.

use serde::{Deserialize, Serialize};

use super::ids::ExecutionId;

/// Task execution states, as Flink's `ExecutionState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExecutionState {
    Created,
    Deploying,
    Initializing,
    Running,
    Finished,
    Canceled,
    Failed,
}

impl ExecutionState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Canceled | Self::Failed)
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: Self) -> bool {
        use ExecutionState::*;
        match (self, next) {
            (a, b) if a.is_terminal() => a == b,
            (_, Failed | Canceled) => true,
            (Created, Deploying) | (Deploying, Initializing) | (Initializing, Running) => true,
            (Running, Finished) => true,
            (a, b) => a == b,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Created,
    Running,
    Finished,
    Failed,
    Canceled,
}

/// Slot states, as Flink's `TaskSlotState` plus free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    Free,
    Allocated,
    Active,
    Releasing,
}

/// A slot's resources.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceProfile {
    pub cpu_cores: f64,
    pub managed_memory_bytes: u64,
    pub network_memory_bytes: u64,
    /// GPU id and this slot's device memory budget; `None` for a CPU slot.
    pub gpu: Option<(u32, u64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub index: usize,
    pub state: SlotState,
    /// The execution whose tasks hold the slot.
    pub execution: Option<ExecutionId>,
    pub profile: ResourceProfile,
}
