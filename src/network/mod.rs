//! The shuffle environment: result partitions, input gates and the data
//! plane between TaskManagers, with Flink's credit-based flow control.
//!
//! A producer task writes through a [`partition::RecordWriter`] per outgoing
//! edge. Each target subtask is reached either by a local channel (an
//! in-process queue straight into the consumer's [`gate::InputGate`]) or by a
//! [`partition::Subpartition`]: a bounded queue of Arrow IPC buffers that the
//! TaskManager's data server ([`tcp`]) sends to the consumer's TaskManager
//! only while the consumer has granted credit.
//!
//! Transports between TaskManagers ([`transport`] chooses and says why):
//! TCP frames on the data connection ([`tcp`]), or RDMA writes into credited
//! registered segments ([`rdma`]) over a verbs-shaped interface ([`verbs`])
//! that a NIC (feature `rdma`) or the user-space emulation implements. The
//! data connection stays the control channel in both. [`sim`] replaces the
//! wire with a seeded simulation for tests; [`debloat`] sizes buffers from
//! the measured throughput.
//!
//! Credit: a receiving remote channel owns `buffers-per-channel` exclusive
//! segments and may borrow from its gate's `floating-buffers-per-gate` (a
//! gate without remote channels takes none: a job whose subtasks share one
//! TaskManager needs no network segments for its gates, whatever its
//! parallelism; [`gate::GateDemand`] counts what a deployment takes and
//! says which keys to raise, and by how much, when the pool is short); every free
//! segment it holds is one credit announced to the sender. The sender reports
//! its backlog with each buffer so the receiver can borrow floating segments.
//! A segment is returned (and the credit re-announced) once the consuming
//! task has decoded the buffer. Events (watermarks, end of partition) consume
//! credit like data: it keeps the receiver's memory bounded by its segments.
//!
//! Scale: per-channel state is what a channel needs: a local channel costs a
//! few bytes in its gate (no decoder, no credit state); watermarks are
//! merged in O(1) amortized per event; a writer groups a hashed batch's rows
//! with one counting sort, not a vector per target.
//!
//! Limits: queued buffers per subpartition ≤ `max-buffers-per-channel`;
//! queued events per local channel ≤ the same; received buffers per gate ≤
//! its exclusive + floating segments; frames ≤ one segment of payload.

pub mod align;
pub mod debloat;
pub mod frame;
pub mod gate;
pub mod ipc;
pub mod partition;
pub mod reader;
// Registers network memory with the verbs device (raw addresses).
#[allow(unsafe_code)]
pub mod rdma;
pub mod sim;
pub mod taskread;
pub mod tcp;
pub mod transport;
// Registered memory: raw addresses handed to the NIC or to the emulation.
#[allow(unsafe_code)]
pub mod verbs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use serde::{Deserialize, Serialize};

pub use gate::{GateDemand, InputGate, InputReader, SegmentShortfall};
pub use partition::{Partitioner, RecordWriter, ResultPartition, Subpartition};

/// Bytes a producer leaves free at the start of every network segment: the
/// verbs transport writes the routing header there, in front of the payload,
/// so an encoded buffer carries at most `segment size - PAYLOAD_HEADROOM`
/// bytes whatever the transport.
pub const PAYLOAD_HEADROOM: usize = 64;

/// What flows through a channel, in order.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Batch(RecordBatch),
    Watermark(i64),
    /// Checkpoint barrier `n`: everything before it belongs to checkpoint
    /// `n`, everything after to later ones.
    Barrier(u64),
    EndOfPartition,
}

/// A producer subtask's output on one edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionId {
    pub job: u64,
    pub edge: u32,
    pub source_subtask: u32,
}

/// A consumer subtask's input on one edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GateId {
    pub job: u64,
    pub edge: u32,
    pub target_subtask: u32,
}

/// Errors of the data plane. Cloneable: one failure fails every channel of a
/// gate that depends on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetworkError {
    #[error("peer lost: connection to TaskManager {peer} failed: {reason}")]
    PeerLost { peer: String, reason: String },
    #[error("protocol error from TaskManager {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("partition {partition:?} not found at TaskManager {peer}: {detail}")]
    PartitionNotFound {
        partition: PartitionId,
        peer: String,
        detail: String,
    },
    #[error("channel {channel} of gate {gate:?} failed: {detail}")]
    Channel {
        gate: GateId,
        channel: usize,
        detail: String,
    },
    #[error("the consumer of the channel is gone")]
    ConsumerGone,
    #[error("task canceled")]
    Canceled,
    #[error("{0}")]
    Memory(String),
    /// Boxed: the shortfall's numbers would make every `Result` larger.
    #[error("{0}")]
    InsufficientSegments(Box<gate::SegmentShortfall>),
    #[error("encoding a batch for the wire: {0}")]
    Encode(String),
    #[error("cannot connect to TaskManager {peer}: {reason}")]
    Connect { peer: String, reason: String },
}

/// The TaskManager's table of live partitions and gates, looked up by the
/// data server (remote consumers) and by local producers.
#[derive(Default)]
pub struct NetworkRegistry {
    partitions: Mutex<HashMap<PartitionId, Arc<ResultPartition>>>,
    gates: Mutex<HashMap<GateId, Arc<InputGate>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NetworkRegistry {
    pub fn register_partition(&self, partition: Arc<ResultPartition>) {
        lock(&self.partitions).insert(partition.id, partition);
    }
    pub fn register_gate(&self, gate: Arc<InputGate>) {
        lock(&self.gates).insert(gate.id, gate);
    }
    pub fn partition(&self, id: &PartitionId) -> Option<Arc<ResultPartition>> {
        lock(&self.partitions).get(id).cloned()
    }
    pub fn gate(&self, id: &GateId) -> Option<Arc<InputGate>> {
        lock(&self.gates).get(id).cloned()
    }
    /// Drops a job's partitions and gates, failing anything still waiting on
    /// them so no thread stays blocked.
    pub fn release_job(&self, job: u64, reason: &str) {
        let parts: Vec<_> = {
            let mut map = lock(&self.partitions);
            let ids: Vec<_> = map.keys().filter(|p| p.job == job).copied().collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for p in parts {
            p.release(reason);
        }
        let gates: Vec<_> = {
            let mut map = lock(&self.gates);
            let ids: Vec<_> = map.keys().filter(|g| g.job == job).copied().collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for g in gates {
            g.close();
        }
    }
    pub fn partition_count(&self) -> usize {
        lock(&self.partitions).len()
    }
}
