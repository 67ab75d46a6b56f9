//! The control protocol: every message between JobManager, TaskManagers
//! and clients, the id newtypes, task/job/slot states, deployments, and the
//! snapshots the REST API serves.
//!
//! This module sits below `cluster` (the JobManager and client),
//! `taskmanager` and `web`, which all speak it and none of which depends on
//! another. It holds data and pure functions only (the frame codec is
//! generic over any async reader and writer); no state machine and no
//! socket lives here.

pub mod codec;
pub mod deployment;
pub mod ids;
pub mod messages;
pub mod snapshot;
pub mod states;

pub use codec::{FRAME_MAX_BYTES, FrameBudget, RpcError, read_message, write_message};
pub use deployment::{
    ChannelLocation, CheckpointDeployment, InputGateDeployment, OutputDeployment,
    RestoreDeployment, SubtaskLocation, TaskDeploymentDescriptor,
};
pub use ids::{CheckpointId, ExecutionId, JobId, SlotId, TaskManagerId};
pub use messages::Message;
pub use snapshot::{
    ClusterSnapshot, EdgeSummary, JobSummary, OperatorSummary, ResourceUsage, TaskManagerInfo,
    TaskNetworkMetrics, VertexMetrics, VertexSummary,
};
pub use states::{ExecutionState, JobState, ResourceProfile, SlotState, SlotStatus};
