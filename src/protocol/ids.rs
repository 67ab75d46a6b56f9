//! Id newtypes: a job, one execution attempt of it, a TaskManager
//! registration, a slot and a checkpoint are never confused with each other
//! or with a bare number.
//!
//! On the wire each id is its number (`serde(transparent)`); job and
//! execution ids print as 16 hex digits (JSON numbers lose 64-bit ids in
//! browsers, so the REST snapshot writes them as strings, see
//! [`hex`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A submitted job, for its whole life (all its attempts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

/// One execution attempt of a job. TaskManagers know a job's tasks, gates
/// and partitions only by the execution id, so a message or a buffer of an
/// earlier attempt can never reach a later one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(pub u64);

/// One registration of a TaskManager process. A TaskManager that lost its
/// JobManager (or was declared lost) registers again under a new id, so
/// nothing addressed to its old instance applies to the new one.
/// Written `tm-<n>` on the wire and in the REST API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskManagerId(pub u64);

impl Serialize for TaskManagerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskManagerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.strip_prefix("tm-")
            .and_then(|n| n.parse().ok())
            .map(TaskManagerId)
            .ok_or_else(|| serde::de::Error::custom(format!("not a TaskManager id: {text:?}")))
    }
}

/// A slot: its TaskManager instance and its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlotId {
    pub taskmanager: TaskManagerId,
    pub index: usize,
}

/// A checkpoint of one job (1, 2, …; `FINAL_COMMIT` is the job's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    /// `CheckpointComplete` with this id tells sinks the job finished.
    pub const FINAL_COMMIT: CheckpointId = CheckpointId(u64::MAX);
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::LowerHex for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Display for TaskManagerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tm-{}", self.0)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/slot{}", self.taskmanager, self.index)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Ids as 16 hex digits in JSON (the REST API's job ids).
pub mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::JobId;

    pub fn serialize<S: Serializer>(id: &JobId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:016x}", id.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<JobId, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16)
            .map(JobId)
            .map_err(serde::de::Error::custom)
    }
}
