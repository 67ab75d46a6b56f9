//! Checkpoints: task state snapshots, checkpoint storage and restore.
//!
//! How a checkpoint flows (Flink's aligned checkpoints):
//!
//! 1. The JobManager's coordinator ([`coordinator`]) triggers checkpoint `n`
//!    at `execution.checkpointing.interval` by asking every source task for
//!    it.
//! 2. A source task snapshots its offset and its chain's operator state,
//!    writes them as one state file into `chk-<n>.inprogress/`, acknowledges,
//!    and sends a barrier `n` down every output channel, in order with the
//!    data.
//! 3. A task with several input channels aligns: a channel that delivered
//!    barrier `n` is blocked (its buffers wait in the gate, within the
//!    network budget) until every open channel has delivered it; then the
//!    task snapshots and acknowledges as the source did and forwards the
//!    barrier.
//! 4. When every task has acknowledged, the coordinator writes the manifest
//!    and renames the directory to `chk-<n>/` ([`storage`]); the checkpoint
//!    is complete and transactional sinks commit what they staged for it.
//!    A checkpoint that does not complete within
//!    `execution.checkpointing.timeout` is aborted.
//! 5. On failure the job restarts from the newest complete checkpoint that
//!    verifies; a corrupt one is skipped with a log line naming it.
//!
//! Tasks that finished are left out of later checkpoints and recorded in
//! their manifests; a restore starts them finished (Flink's FLIP-147). When
//! every task has finished or waits with staged output, a final checkpoint
//! of the waiting tasks (no barrier) makes their output part of a completed
//! checkpoint; its completion is the final commit, so a failure while
//! committing restores and commits the staged output instead of producing
//! it again.
//!
//! A task's state file ([`state::TaskState`]) holds the source offset and
//! each stateful operator's bytes keyed by the operator's index in the job
//! file, so a restore does not depend on how operators were chained.
//!
//! `sim` (tests only) runs a whole checkpointed job with crashes through
//! this code, seeded and replayable, and checks that its committed output
//! is exactly once.

pub mod coordinator;
#[cfg(test)]
mod sim;
pub mod state;
pub mod storage;

use std::path::PathBuf;

/// Errors of checkpoint storage and state files. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt checkpoint state: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A checkpoint id that already completed was begun or completed again.
    #[error("{path}: checkpoint already exists")]
    Exists { path: PathBuf },
}
