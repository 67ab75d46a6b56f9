//! Each task (`strata_taskmanager_job_task_*`) and operator
//! (`strata_taskmanager_job_task_operator_*`) of a running job, as Flink's
//! TaskManagers report them; ended jobs keep only their job-level counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::jobs::{JobLabels, transport_name};
use super::{Count, CountF64, GaugeF64, GaugeU64, family, ratio, seconds};
use crate::protocol::JobSummary;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    #[prometheus(flatten)]
    job: JobLabels,
    task_name: String,
    subtask_index: u32,
    tm_id: String,
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperatorLabels {
    #[prometheus(flatten)]
    job: JobLabels,
    task_name: String,
    operator_name: String,
}

/// Each task of a running job, as its last report had it (Flink's
/// task-level shuffle metrics).
pub(super) fn register_tasks(r: &mut Registry, running: &[JobSummary]) {
    let in_pool: Family<TaskLabels, GaugeF64> = family(
        r,
        "strata_taskmanager_job_task_buffers_inPoolUsage",
        "Share of the task's input network buffers holding data",
        None,
    );
    let out_pool: Family<TaskLabels, GaugeF64> = family(
        r,
        "strata_taskmanager_job_task_buffers_outPoolUsage",
        "Share of the task's remote output queues in use",
        None,
    );
    let backpressured_rate: Family<TaskLabels, GaugeU64> = family(
        r,
        "strata_taskmanager_job_task_backPressuredTimeMsPerSecond",
        "Milliseconds per second the task waited for credit or buffers",
        None,
    );
    let backpressured: Family<TaskLabels, CountF64> = family(
        r,
        "strata_taskmanager_job_task_accumulatedBackPressuredTime",
        "Time the task waited for credit or buffers",
        Some(Unit::Seconds),
    );
    let bytes_out: Family<TaskLabels, Count> = family(
        r,
        "strata_taskmanager_job_task_numBytesOutRemote",
        "Bytes the task sent to other TaskManagers",
        None,
    );
    let buffers_out: Family<TaskLabels, Count> = family(
        r,
        "strata_taskmanager_job_task_numBuffersOutRemote",
        "Buffers the task sent to other TaskManagers",
        None,
    );
    let bytes_in: Family<TaskLabels, Count> = family(
        r,
        "strata_taskmanager_job_task_numBytesInRemote",
        "Bytes the task received from other TaskManagers",
        None,
    );
    for j in running {
        let job = JobLabels::of(j);
        let transport = transport_name(j);
        for t in &j.tasks {
            let labels = TaskLabels {
                job: job.clone(),
                task_name: task_name(j, t.vertex),
                subtask_index: t.subtask,
                tm_id: t.taskmanager.to_string(),
                transport: transport.clone(),
            };
            in_pool
                .get_or_create(&labels)
                .set(ratio(t.in_pool_usage_permille));
            out_pool
                .get_or_create(&labels)
                .set(ratio(t.out_pool_usage_permille));
            backpressured_rate
                .get_or_create(&labels)
                .set(t.backpressured_ms_per_second);
            backpressured
                .get_or_create(&labels)
                .inc_by(seconds(t.backpressure_ms));
            bytes_out.get_or_create(&labels).inc_by(t.remote_bytes_out);
            buffers_out
                .get_or_create(&labels)
                .inc_by(t.remote_buffers_out);
            bytes_in.get_or_create(&labels).inc_by(t.remote_bytes_in);
        }
    }
}

/// Each operator of a running job, summed over its subtasks.
pub(super) fn register_operators(r: &mut Registry, running: &[JobSummary]) {
    let rows_in: Family<OperatorLabels, Count> = family(
        r,
        "strata_taskmanager_job_task_operator_numRecordsIn",
        "Rows into the operator, over all its subtasks",
        None,
    );
    let rows_out: Family<OperatorLabels, Count> = family(
        r,
        "strata_taskmanager_job_task_operator_numRecordsOut",
        "Rows out of the operator, over all its subtasks",
        None,
    );
    for j in running {
        let job = JobLabels::of(j);
        for v in &j.vertices {
            for o in &v.operators {
                let labels = OperatorLabels {
                    job: job.clone(),
                    task_name: v.name.clone(),
                    operator_name: o.name.clone(),
                };
                rows_in.get_or_create(&labels).inc_by(o.rows_in);
                rows_out.get_or_create(&labels).inc_by(o.rows_out);
            }
        }
    }
}

/// The vertex's name ("events -> filter-1"), as Flink names a task by its
/// chain; its index if the summary has no such vertex.
fn task_name(j: &JobSummary, vertex: usize) -> String {
    j.vertices
        .get(vertex)
        .map_or_else(|| vertex.to_string(), |v| v.name.clone())
}
