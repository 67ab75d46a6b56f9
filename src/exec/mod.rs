//! The task runtime: operator chains over record batches.
//!
//! A task is one subtask of a job vertex: a source or the input gates feed a
//! chain of operators; the chain's tail writes to the vertex's outgoing
//! edges. Each task runs on its own thread and owns all its state; it talks
//! to the rest of the TaskManager only through its gates, writers, memory
//! manager, cancel flag and metrics.
//!
//! Stateful operators (`aggregate`, `window`, `sort`) keep their state in the
//! slot's managed memory and answer a budget refusal by spilling through the
//! task's [`spill::SpillContext`] (the TaskManager's IOManager); their spill
//! files go when the operators are dropped, so when the task ends, fails or
//! is canceled. Their checkpoint snapshots copy spilled rows out of those
//! files, so a snapshot is self-contained ([`snapshot`] is the framing).

pub mod aggregate;
pub mod build;
pub mod features;
pub mod gpu_aggregate;
pub mod gpu_chain;
pub mod gpu_filter;
pub mod hashtable;
pub mod keycodec;
pub mod operators;
pub mod sink;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;
pub mod sort;
pub mod source;
pub mod spill;
#[cfg(test)]
mod spill_tests;
pub mod task;

use std::path::PathBuf;

use crate::kernels::cpu::hash::HashError;
use crate::network::NetworkError;

/// Errors of a running task. Each names the operator or file involved.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("operator '{operator}': {detail}")]
    State { operator: String, detail: String },
    #[error("operator '{operator}': integer overflow computing '{column}'")]
    Overflow { operator: String, column: String },
    #[error("operator '{operator}': {detail}")]
    Expression { operator: String, detail: String },
    #[error("operator '{operator}': {detail}")]
    Unsupported { operator: String, detail: String },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("writing {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    /// A page of a Parquet file failed its checksum or could not be decoded:
    /// the file is damaged, and no value of that column chunk is returned.
    #[error(
        "reading {path}: row group {row_group}, column {column_index} ('{column}'): corrupt page: {detail}"
    )]
    CorruptPage {
        path: PathBuf,
        row_group: usize,
        column_index: usize,
        column: String,
        detail: String,
    },
    /// A `one_hot` with `unknown = "error"` met a value that is none of
    /// its categories.
    #[error(
        "operator '{operator}': value {value} of column '{column}' is not one of the \
         categories (unknown = \"error\")"
    )]
    UnknownCategory {
        operator: String,
        column: String,
        value: String,
    },
    /// A `join`'s dimension table (its columns and key index) does not fit
    /// the slot's managed memory.
    #[error(
        "operator '{operator}': dimension table {} does not fit the slot's managed memory \
         ({held_bytes} bytes held when {requested_bytes} more were refused, budget \
         {budget_bytes} bytes); select fewer `columns`, join a smaller table, or give each \
         slot more managed memory (taskmanager.memory.managed.fraction)",
        .table.display()
    )]
    DimensionTableTooLarge {
        operator: String,
        table: PathBuf,
        held_bytes: u64,
        requested_bytes: u64,
        budget_bytes: u64,
    },
    /// A `join`'s dimension table holds a key twice.
    #[error(
        "operator '{operator}': dimension table {} holds key {key} more than once; a \
         dimension table has one row per key",
        .table.display()
    )]
    DuplicateDimensionKey {
        operator: String,
        table: PathBuf,
        key: String,
    },
    #[error("operator '{operator}': spilling failed: {source}")]
    Spill {
        operator: String,
        #[source]
        source: crate::io::IoError,
    },
    #[error("task canceled")]
    Canceled,
}
