//! The cluster as the JobManager sees it (`strata_jobmanager_*`) and each
//! registered TaskManager (`strata_taskmanager_*` {`tm_id`}).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::{GaugeF64, GaugeU64, family, register};
use crate::protocol::{ClusterSnapshot, JobState, SlotState, TaskManagerInfo};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskManagerLabels {
    tm_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskManagerInfoLabels {
    tm_id: String,
    /// The data-plane transport and why it was chosen.
    transport: String,
    /// The GPUs found, or why the TaskManager offers CPU slots only.
    tier: String,
    /// The IOManager's backend, fallback reason included.
    io: String,
}

pub(super) fn register_cluster(r: &mut Registry, s: &ClusterSnapshot) {
    let slots: Vec<_> = s.taskmanagers.iter().flat_map(|tm| &tm.allocated).collect();
    let free = slots.iter().filter(|a| a.is_none()).count() as u64;
    for (name, help, value) in [
        (
            "strata_jobmanager_numRegisteredTaskManagers",
            "Registered TaskManagers",
            s.taskmanagers.len() as u64,
        ),
        (
            "strata_jobmanager_taskSlotsTotal",
            "Task slots of the registered TaskManagers",
            slots.len() as u64,
        ),
        (
            "strata_jobmanager_taskSlotsAvailable",
            "Task slots the JobManager has not allocated to a job",
            free,
        ),
        (
            "strata_jobmanager_numRunningJobs",
            "Jobs running now",
            s.running.len() as u64,
        ),
    ] {
        register(r, name, help, None, GaugeU64::default()).set(value);
    }
    let ended: Family<StateLabels, GaugeU64> = family(
        r,
        "strata_jobmanager_numEndedJobs",
        "Ended jobs the JobManager keeps (the last 100), by final state",
        None,
    );
    for (state, label) in [
        (JobState::Finished, "finished"),
        (JobState::Failed, "failed"),
        (JobState::Canceled, "canceled"),
    ] {
        let n = s.completed.iter().filter(|j| j.state == state).count();
        ended
            .get_or_create(&StateLabels {
                state: label.to_owned(),
            })
            .set(n as u64);
    }
}

pub(super) fn register_taskmanagers(r: &mut Registry, tms: &[TaskManagerInfo]) {
    let active: Family<TaskManagerLabels, GaugeU64> = family(
        r,
        "strata_taskmanager_taskSlotsActive",
        "Slots running tasks, as the TaskManager last reported",
        None,
    );
    let gpu: Family<TaskManagerLabels, GaugeU64> = family(
        r,
        "strata_taskmanager_taskSlotsWithGpu",
        "Slots with a GPU (0 on a TaskManager without one: CPU slots only)",
        None,
    );
    let info: Family<TaskManagerInfoLabels, GaugeU64> = family(
        r,
        "strata_taskmanager_info",
        "Always 1; the labels name the tiers each TaskManager chose, with the reason for every fallback",
        None,
    );
    let heartbeat: Family<TaskManagerLabels, GaugeF64> = family(
        r,
        "strata_taskmanager_timeSinceLastHeartbeat",
        "Time since the TaskManager's last heartbeat reached the JobManager",
        Some(Unit::Seconds),
    );
    for tm in tms {
        let labels = TaskManagerLabels {
            tm_id: tm.id.to_string(),
        };
        let slots_in = |state: SlotState| tm.slots.iter().filter(|x| x.state == state).count();
        active
            .get_or_create(&labels)
            .set(slots_in(SlotState::Active) as u64);
        let gpu_slots = tm.slots.iter().filter(|x| x.profile.gpu.is_some()).count();
        gpu.get_or_create(&labels).set(gpu_slots as u64);
        info.get_or_create(&TaskManagerInfoLabels {
            tm_id: labels.tm_id.clone(),
            transport: tm.transport.clone(),
            tier: tm.gpu.clone(),
            io: tm.io.clone(),
        })
        .set(1);
        heartbeat
            .get_or_create(&labels)
            .set(tm.last_heartbeat_ms as f64 / 1000.0);
    }
}
