//! Every control message between JobManager, TaskManagers and clients.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::deployment::{CheckpointDeployment, SubtaskLocation};
use super::ids::{CheckpointId, ExecutionId, JobId, TaskManagerId};
use super::snapshot::JobSummary;
use super::states::{ExecutionState, SlotStatus};
use crate::checkpoint::storage::StateHandle;
use crate::metrics::TaskSnapshot;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    // TaskManager → JobManager
    RegisterTaskManager {
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
        /// Where the TaskManager serves its `flight_sink` partitions.
        #[serde(default)]
        flight_addr: Option<SocketAddr>,
    },
    Heartbeat {
        slots: Vec<SlotStatus>,
        /// Memory in use (periodic heartbeats; absent from those a slot
        /// change sends, and from older TaskManagers: the JobManager keeps
        /// the last one it got).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<super::snapshot::ResourceUsage>,
    },
    TaskStatus {
        execution: ExecutionId,
        vertex: usize,
        subtask: u32,
        state: ExecutionState,
        error: Option<String>,
        metrics: Option<TaskSnapshot>,
    },
    /// A task stored its state for `checkpoint`.
    AcknowledgeCheckpoint {
        execution: ExecutionId,
        vertex: usize,
        subtask: u32,
        checkpoint: CheckpointId,
        handle: StateHandle,
        alignment_ms: u64,
    },
    /// A task could not take `checkpoint`.
    DeclineCheckpoint {
        execution: ExecutionId,
        vertex: usize,
        subtask: u32,
        checkpoint: CheckpointId,
        reason: String,
    },
    /// A task's input ended and its output waits for the job's final
    /// commit.
    FinalCommitPending {
        execution: ExecutionId,
        vertex: usize,
        subtask: u32,
    },
    // JobManager → TaskManager
    Registered {
        taskmanager: TaskManagerId,
    },
    /// Run `tasks` of `execution` (attempt `attempt` of `job`).
    DeployTasks {
        job: JobId,
        execution: ExecutionId,
        attempt: u32,
        job_text: String,
        job_path: String,
        default_parallelism: u32,
        /// Where each subtask index runs (slot sharing: subtask `i` of
        /// every vertex runs in `placement[i]`).
        placement: Vec<SubtaskLocation>,
        /// This TaskManager's tasks, `(vertex, subtask)`.
        tasks: Vec<(usize, u32)>,
        /// Per vertex, its operators that placement put on the GPU.
        gpu_operators: Vec<Vec<usize>>,
        /// Present when checkpointing is on.
        #[serde(default)]
        checkpointing: Option<CheckpointDeployment>,
    },
    /// Source tasks of `execution` inject barrier `checkpoint`.
    TriggerCheckpoint {
        execution: ExecutionId,
        checkpoint: CheckpointId,
    },
    /// `checkpoint` completed (`FINAL_COMMIT`: the job finished): commit.
    CheckpointComplete {
        execution: ExecutionId,
        checkpoint: CheckpointId,
    },
    /// Checkpoints up to `checkpoint` were aborted.
    AbortCheckpoint {
        execution: ExecutionId,
        checkpoint: CheckpointId,
    },
    CancelJob {
        execution: ExecutionId,
        reason: String,
    },
    HeartbeatAck,
    /// The execution ended everywhere: drop its partitions and gates.
    ReleaseJob {
        execution: ExecutionId,
    },
    /// The JobManager declared this TaskManager instance lost (or refuses
    /// it): cancel every task, and register again as a new instance. The
    /// JobManager closes the connection after sending it.
    Disconnect {
        reason: String,
    },
    // Client → JobManager
    SubmitJob {
        job_text: String,
        job_path: String,
    },
    // JobManager → client
    JobAccepted {
        job: JobId,
        name: String,
    },
    JobRejected {
        reason: String,
    },
    JobProgress {
        job: JobId,
        rows_in: u64,
        rows_expected: u64,
        tasks_running: usize,
        tasks_total: usize,
    },
    JobFinished {
        summary: Box<JobSummary>,
    },
}

impl Message {
    /// The variant's name, for logs that must not echo a message's contents
    /// (job texts, file names).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::RegisterTaskManager { .. } => "RegisterTaskManager",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::TaskStatus { .. } => "TaskStatus",
            Message::AcknowledgeCheckpoint { .. } => "AcknowledgeCheckpoint",
            Message::DeclineCheckpoint { .. } => "DeclineCheckpoint",
            Message::FinalCommitPending { .. } => "FinalCommitPending",
            Message::Registered { .. } => "Registered",
            Message::DeployTasks { .. } => "DeployTasks",
            Message::TriggerCheckpoint { .. } => "TriggerCheckpoint",
            Message::CheckpointComplete { .. } => "CheckpointComplete",
            Message::AbortCheckpoint { .. } => "AbortCheckpoint",
            Message::CancelJob { .. } => "CancelJob",
            Message::HeartbeatAck => "HeartbeatAck",
            Message::ReleaseJob { .. } => "ReleaseJob",
            Message::Disconnect { .. } => "Disconnect",
            Message::SubmitJob { .. } => "SubmitJob",
            Message::JobAccepted { .. } => "JobAccepted",
            Message::JobRejected { .. } => "JobRejected",
            Message::JobProgress { .. } => "JobProgress",
            Message::JobFinished { .. } => "JobFinished",
        }
    }
}
