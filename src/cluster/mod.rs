//! The cluster: the JobManager and the job client. The messages they
//! exchange are in [`crate::protocol`]; the embedded mini-cluster, which
//! runs a JobManager beside TaskManagers, is [`crate::minicluster`].
//!
//! The JobManager owns the resource view (registered TaskManagers and their
//! slots, kept alive by heartbeats), schedules a job's subtasks onto slots
//! with slot sharing (slot i runs subtask i of every vertex), deploys them,
//! tracks every task's execution state, and fails a job with a reason when a
//! task fails or a TaskManager is lost. The restart strategies ([`restart`])
//! decide whether, and after how long, a failed job restarts.

pub mod client;
pub mod jobmanager;
pub mod phases;
pub mod restart;
#[cfg(test)]
pub mod sim;
pub mod summary;

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
    #[error("a TaskManager of the mini-cluster could not start: {0}")]
    TaskManager(String),
    #[error(transparent)]
    Security(crate::security::SecurityError),
    #[error("the mini-cluster did not come up: {reason}")]
    Startup { reason: String },
}
