//! What the REST API, `/metrics`, the web UI and the job client read: the
//! end-of-job summary and the cluster snapshot.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ids::{JobId, TaskManagerId};
use super::states::{JobState, SlotStatus};

/// Per-vertex lines of a job summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VertexSummary {
    pub name: String,
    pub parallelism: u32,
    pub placement: Vec<String>,
    pub input_partitioner: Option<String>,
    pub tier: String,
    pub operators: Vec<OperatorSummary>,
    /// The edges into this vertex, in input order (the job graph's edge
    /// list, for the web UI's graph).
    #[serde(default)]
    pub inputs: Vec<EdgeSummary>,
    /// The vertex's tasks' metrics, aggregated (running jobs: the last
    /// reports).
    #[serde(default)]
    pub metrics: VertexMetrics,
}

/// One edge of the job graph: where it comes from and how rows are
/// exchanged over it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EdgeSummary {
    /// The index of the producing vertex in [`JobSummary::vertices`].
    pub source: usize,
    /// `forward`, `hash`, `rebalance`, `broadcast` or `global`.
    pub exchange: String,
    /// `local` when both ends run on one TaskManager, else the data-plane
    /// transport between TaskManagers (`tcp`, `verbs`, …).
    pub transport: String,
}

/// A vertex's tasks' metrics, summed or maxed over its subtasks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VertexMetrics {
    /// Rows into the vertex: its head operator's input, or for a source
    /// what the source produced.
    pub rows_in: u64,
    /// Rows out of the vertex's last operator.
    pub rows_out: u64,
    /// Subtasks in the RUNNING state.
    pub subtasks_running: u32,
    /// The most back-pressured subtask: ms per second its output waited
    /// for buffers or credit (1000 = always).
    pub backpressured_ms_per_second_max: u64,
    /// Highest input and output buffer-pool usage over the subtasks, ‰.
    pub in_pool_usage_permille_max: u64,
    pub out_pool_usage_permille_max: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OperatorSummary {
    pub name: String,
    pub kind: String,
    pub rows_in: u64,
    pub rows_out: u64,
}

/// One task's shuffle metrics, as the REST API and `/metrics` show them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaskNetworkMetrics {
    pub vertex: usize,
    pub subtask: u32,
    pub taskmanager: TaskManagerId,
    pub in_pool_usage_permille: u64,
    pub out_pool_usage_permille: u64,
    pub backpressured_ms_per_second: u64,
    pub backpressure_ms: u64,
    pub remote_bytes_out: u64,
    pub remote_buffers_out: u64,
    pub remote_bytes_in: u64,
}

/// The end-of-job report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSummary {
    /// Serialized as 16 hex digits: JSON numbers lose 64-bit ids in browsers.
    #[serde(with = "super::ids::hex")]
    pub job: JobId,
    pub name: String,
    pub state: JobState,
    pub reason: Option<String>,
    pub wall_ms: u64,
    pub rows_in: u64,
    pub rows_out: u64,
    /// When the job's first row was produced (the earliest first batch of
    /// its source tasks), µs since the Unix epoch; `None` when no source
    /// produced a row.
    #[serde(default)]
    pub first_row_unix_us: Option<u64>,
    pub vertices: Vec<VertexSummary>,
    pub remote_bytes: u64,
    pub remote_buffers: u64,
    /// Highest inPoolUsage / outPoolUsage over the job's tasks, ‰ (running
    /// jobs: the last reports).
    #[serde(default)]
    pub in_pool_usage_permille: u64,
    #[serde(default)]
    pub out_pool_usage_permille: u64,
    pub local_rows: u64,
    pub backpressure_ms: u64,
    pub late_rows: u64,
    pub managed_peak_bytes: u64,
    /// Spill block bytes written by all tasks (headers and padding included).
    #[serde(default)]
    pub spill_bytes_written: u64,
    /// Spilled payload bytes read back by all tasks.
    #[serde(default)]
    pub spill_bytes_read: u64,
    /// Spill files created by all tasks.
    #[serde(default)]
    pub spill_file_count: u64,
    pub transport: String,
    /// Each distinct IOManager backend line of the job's TaskManagers.
    pub io: Vec<String>,
    pub taskmanagers: usize,
    pub slots: usize,
    /// Network metrics of each task (Flink's per-task shuffle metrics).
    #[serde(default)]
    pub tasks: Vec<TaskNetworkMetrics>,
    /// Where each operator ran and why (`placement.mode` and the cost model).
    #[serde(default)]
    pub placement: Option<crate::placement::Placement>,
    /// Each distinct GPU line of the job's TaskManagers ("no GPU (…)").
    #[serde(default)]
    pub gpu: Vec<String>,
    /// GPU launches, out-of-memory splits and CPU-twin fallbacks, summed
    /// over the job's tasks.
    #[serde(default)]
    pub gpu_offload: crate::kernels::backend::OffloadSnapshot,
    /// Checkpoints taken (empty when checkpointing is off).
    #[serde(default)]
    pub checkpoints: crate::checkpoint::coordinator::CheckpointSummary,
    /// Whether `execution.checkpointing.interval` is set.
    #[serde(default)]
    pub checkpointing: bool,
    /// Restarts after failures, and the failure behind the latest one.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub last_failure: Option<String>,
}

/// A TaskManager's memory use at one instant, sent with its periodic
/// heartbeats. Budgets are in the slot profiles ([`SlotStatus::profile`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// Managed memory held by each slot's tasks, by slot index.
    pub managed_used_bytes: Vec<u64>,
    /// Network buffer segments handed out, of `network_segment_count`.
    pub network_segments_used: u64,
    pub network_segment_count: u64,
    pub network_segment_size_bytes: u64,
    /// Device memory reserved by each slot's GPU kernels, by slot index
    /// (0 for a CPU slot).
    pub gpu_used_bytes: Vec<u64>,
}

/// A TaskManager as the REST API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TaskManagerInfo {
    pub id: TaskManagerId,
    pub data_addr: SocketAddr,
    /// The TaskManager's own report (last heartbeat).
    pub slots: Vec<SlotStatus>,
    /// The job each slot is allocated to, as the JobManager sees it.
    #[serde(serialize_with = "hex_jobs")]
    pub allocated: Vec<Option<JobId>>,
    pub last_heartbeat_ms: u64,
    /// The IOManager's backend line, fallback reason included.
    pub io: String,
    /// The data-plane transport and why it was chosen.
    pub transport: String,
    /// The GPUs the TaskManager found, or why it offers CPU slots only.
    pub gpu: String,
    /// Memory in use, from the latest heartbeat that carried it (`None`
    /// until one did, or from a TaskManager that does not report it).
    pub usage: Option<ResourceUsage>,
    /// Spill bytes written by the tasks of running jobs on this
    /// TaskManager.
    pub spill_bytes_written: u64,
}

fn hex_jobs<S: serde::Serializer>(jobs: &[Option<JobId>], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(jobs.len()))?;
    for job in jobs {
        seq.serialize_element(&job.map(|j| format!("{:016x}", j.0)))?;
    }
    seq.end()
}

/// Everything the REST API and `/metrics` read, copied at one instant.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterSnapshot {
    pub taskmanagers: Vec<TaskManagerInfo>,
    pub running: Vec<JobSummary>,
    pub completed: Vec<JobSummary>,
}
