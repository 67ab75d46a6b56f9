//! The control RPC between JobManager, TaskManagers and clients.
//!
//! One TCP connection per peer carries length-prefixed JSON messages
//! (`u32` big-endian length, then a serde_json [`Message`]) in both
//! directions. We chose this over gRPC: the control plane sends a few
//! messages a second, JSON frames are readable in a packet capture, and it
//! needs neither `protoc` nor a code generator on the build machine. The data
//! plane has its own binary protocol ([`crate::network::frame`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::TaskSnapshot;
use crate::network::Partitioner;

/// Largest control frame accepted (job files travel in `SubmitJob`).
pub const FRAME_MAX_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {length} bytes exceeds the limit of {FRAME_MAX_BYTES}")]
    TooLarge { length: usize },
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlotStatus {
    pub index: usize,
    pub state: SlotState,
    pub job: Option<u64>,
    pub profile: ResourceProfile,
}

/// Where one channel's other end lives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChannelLocation {
    pub subtask: u32,
    pub taskmanager: String,
    pub data_addr: SocketAddr,
    /// For an input channel: the producer's subpartition index. For an
    /// output target: the consumer gate's channel index.
    pub index: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputGateDeployment {
    pub edge: u32,
    pub channels: Vec<ChannelLocation>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputDeployment {
    pub edge: u32,
    pub partitioner: Partitioner,
    pub targets: Vec<ChannelLocation>,
}

/// What a TaskManager needs to run one subtask.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskDeploymentDescriptor {
    pub vertex: usize,
    pub subtask: u32,
    pub parallelism: u32,
    pub slot: usize,
    pub attempt: u32,
    pub inputs: Vec<InputGateDeployment>,
    pub outputs: Vec<OutputDeployment>,
    /// The vertex's operators that placement put on the GPU.
    #[serde(default)]
    pub gpu_operators: Vec<usize>,
}

/// How the tasks of one deployment take part in checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointDeployment {
    /// The job's checkpoint directory (`execution.checkpointing.dir`/<job>),
    /// which JobManager and TaskManagers must all reach.
    pub job_dir: std::path::PathBuf,
    /// The completed checkpoint to restore from; `None` starts from the
    /// beginning.
    pub restore: Option<RestoreDeployment>,
}

/// A completed checkpoint's state files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreDeployment {
    pub checkpoint: u64,
    pub dir: std::path::PathBuf,
    pub handles: Vec<crate::checkpoint::storage::StateHandle>,
    /// Tasks that had finished before the checkpoint: they start finished.
    #[serde(default)]
    pub finished: Vec<(usize, u32)>,
}

/// Per-vertex lines of a job summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VertexSummary {
    pub name: String,
    pub parallelism: u32,
    pub placement: Vec<String>,
    pub input_partitioner: Option<String>,
    pub tier: String,
    pub operators: Vec<OperatorSummary>,
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
    pub taskmanager: String,
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
    #[serde(with = "hex_id")]
    pub job: u64,
    pub name: String,
    pub state: JobState,
    pub reason: Option<String>,
    pub wall_ms: u64,
    pub rows_in: u64,
    pub rows_out: u64,
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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    // TaskManager → JobManager
    RegisterTaskManager {
        name: Option<String>,
        data_addr: SocketAddr,
        slots: Vec<SlotStatus>,
        /// The IOManager's backend line (io_uring or the fallback and why).
        io: String,
        /// The data-plane transport and why it was chosen.
        #[serde(default)]
        transport: String,
        /// The GPUs found, or why there are none.
        #[serde(default)]
        gpu: String,
    },
    Heartbeat {
        slots: Vec<SlotStatus>,
    },
    TaskStatus {
        job: u64,
        vertex: usize,
        subtask: u32,
        state: ExecutionState,
        error: Option<String>,
        metrics: Option<TaskSnapshot>,
    },
    /// A task stored its state for `checkpoint`.
    AcknowledgeCheckpoint {
        job: u64,
        vertex: usize,
        subtask: u32,
        checkpoint: u64,
        handle: crate::checkpoint::storage::StateHandle,
        alignment_ms: u64,
    },
    /// A task could not take `checkpoint`.
    DeclineCheckpoint {
        job: u64,
        vertex: usize,
        subtask: u32,
        checkpoint: u64,
        reason: String,
    },
    /// A task's input ended and its output waits for the job's final
    /// commit.
    FinalCommitPending {
        job: u64,
        vertex: usize,
        subtask: u32,
    },
    // JobManager → TaskManager
    Registered {
        taskmanager: String,
    },
    DeployTasks {
        job: u64,
        job_text: String,
        job_path: String,
        default_parallelism: u32,
        tasks: Vec<TaskDeploymentDescriptor>,
        /// Present when checkpointing is on.
        #[serde(default)]
        checkpointing: Option<CheckpointDeployment>,
    },
    /// Source tasks of `job` inject barrier `checkpoint`.
    TriggerCheckpoint {
        job: u64,
        checkpoint: u64,
    },
    /// `checkpoint` completed (`u64::MAX`: the job finished): commit.
    CheckpointComplete {
        job: u64,
        checkpoint: u64,
    },
    /// Checkpoints up to `checkpoint` were aborted.
    AbortCheckpoint {
        job: u64,
        checkpoint: u64,
    },
    CancelJob {
        job: u64,
        reason: String,
    },
    HeartbeatAck,
    /// The job ended everywhere: drop its partitions and gates.
    ReleaseJob {
        job: u64,
    },
    // Client → JobManager
    SubmitJob {
        job_text: String,
        job_path: String,
    },
    // JobManager → client
    JobAccepted {
        job: u64,
        name: String,
    },
    JobRejected {
        reason: String,
    },
    JobProgress {
        job: u64,
        rows_in: u64,
        rows_expected: u64,
        tasks_running: usize,
        tasks_total: usize,
    },
    JobFinished {
        summary: Box<JobSummary>,
    },
}

/// Job ids as 16 hex digits in JSON.
mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{id:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), RpcError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > FRAME_MAX_BYTES {
        return Err(RpcError::TooLarge { length: body.len() });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, RpcError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(RpcError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = u32::from_be_bytes(len) as usize;
    if length > FRAME_MAX_BYTES {
        return Err(RpcError::TooLarge { length });
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ExecutionState::*;

    #[test]
    fn only_legal_task_transitions_are_allowed() {
        assert!(Created.can_become(Deploying));
        assert!(Running.can_become(Finished));
        assert!(Running.can_become(Failed));
        assert!(!Created.can_become(Running));
        assert!(!Finished.can_become(Running));
        assert!(!Failed.can_become(Canceled));
    }

    #[tokio::test]
    async fn messages_round_trip_and_oversize_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_message(
            &mut a,
            &Message::CancelJob {
                job: 7,
                reason: "x".into(),
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            read_message(&mut b).await.unwrap(),
            Message::CancelJob { job: 7, .. }
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = a.write_all(&u32::MAX.to_be_bytes()).await;
        });
        assert!(matches!(
            read_message(&mut b).await,
            Err(RpcError::TooLarge { .. })
        ));
    }
}
