//! The cluster: control RPC, the JobManager, the job client and the
//! embedded mini-cluster.
//!
//! The JobManager owns the resource view (registered TaskManagers and their
//! slots, kept alive by heartbeats), schedules a job's subtasks onto slots
//! with slot sharing (slot i runs subtask i of every vertex), deploys them,
//! tracks every task's execution state, and fails a job with a reason when a
//! task fails or a TaskManager is lost. The restart strategies ([`restart`])
//! decide whether, and after how long, a failed job restarts. The
//! mini-cluster runs one JobManager and N TaskManagers in one process over
//! real loopback sockets.

pub mod client;
pub mod jobmanager;
pub mod minicluster;
pub mod restart;
pub mod rpc;
pub mod summary;

use crate::taskmanager::TaskManagerError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach the JobManager at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the JobManager rejected the job: {reason}")]
    Rejected { reason: String },
    #[error("lost the JobManager at {address} while the job was running: {reason}")]
    Lost { address: String, reason: String },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    TaskManager(#[from] TaskManagerError),
    #[error("the mini-cluster did not come up: {reason}")]
    Startup { reason: String },
}
