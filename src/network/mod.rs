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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use serde::{Deserialize, Serialize};

pub use gate::{GateDemand, InputGate, InputReader, SegmentShortfall};
pub use partition::{HashSplitter, Partitioner, RecordWriter, ResultPartition, Subpartition};

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

/// Released executions remembered, so that a late request for one is refused
/// at once (older ones are refused after the partition wait instead).
const RELEASED_REMEMBERED_MAX: usize = 4096;

/// The TaskManager's table of live partitions and gates, looked up by the
/// data server (remote consumers) and by local producers.
///
/// It also says who may read what: a channel (a partition's subpartition)
/// has at most one remote consumer at a time ([`NetworkRegistry::claim_channel`]),
/// and a channel read to its end is not served again. `PartitionId::job` and
/// `GateId::job` are execution ids: a restarted job registers new ones.
#[derive(Default)]
pub struct NetworkRegistry {
    partitions: Mutex<HashMap<PartitionId, Arc<ResultPartition>>>,
    gates: Mutex<HashMap<GateId, Arc<InputGate>>>,
    /// Channels with a consumer, or read to their end. Bounded by the
    /// registered partitions' subpartitions: `release_job` drops a job's.
    claims: Mutex<HashMap<(PartitionId, u32), ClaimState>>,
    released: Mutex<Released>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClaimState {
    Held,
    Consumed,
}

/// The most recently released executions, oldest first.
#[derive(Default)]
struct Released {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl Released {
    fn insert(&mut self, execution: u64) {
        if !self.set.insert(execution) {
            return;
        }
        self.order.push_back(execution);
        if self.order.len() > RELEASED_REMEMBERED_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
    }

    fn remove(&mut self, execution: u64) {
        if self.set.remove(&execution) {
            self.order.retain(|e| *e != execution);
        }
    }
}

/// Why a channel was not handed to a consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefused {
    #[error("partition {partition:?} subpartition {subpartition} already has a consumer")]
    Held {
        partition: PartitionId,
        subpartition: u32,
    },
    #[error("partition {partition:?} subpartition {subpartition} was already read to its end")]
    Consumed {
        partition: PartitionId,
        subpartition: u32,
    },
}

/// One consumer's hold on a channel; dropping it frees the channel, unless
/// [`ChannelClaim::set_consumed`] said the channel was read to its end.
pub struct ChannelClaim {
    registry: Arc<NetworkRegistry>,
    key: (PartitionId, u32),
    consumed: bool,
}

impl ChannelClaim {
    /// The channel's end went out: nobody may request it again.
    pub fn set_consumed(&mut self) {
        self.consumed = true;
    }
}

impl Drop for ChannelClaim {
    fn drop(&mut self) {
        let mut claims = lock(&self.registry.claims);
        // A claim of a released job is gone already and stays gone.
        if self.consumed {
            if let Some(state) = claims.get_mut(&self.key) {
                *state = ClaimState::Consumed;
            }
        } else if claims.get(&self.key) == Some(&ClaimState::Held) {
            claims.remove(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NetworkRegistry {
    pub fn register_partition(&self, partition: Arc<ResultPartition>) {
        lock(&self.released).remove(partition.id.job);
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
        lock(&self.claims).retain(|(partition, _), _| partition.job != job);
        lock(&self.released).insert(job);
    }

    /// Whether `execution` was released here (among the last
    /// [`RELEASED_REMEMBERED_MAX`] released).
    pub fn is_released(&self, execution: u64) -> bool {
        lock(&self.released).set.contains(&execution)
    }

    /// Whether any partition or gate of `execution` is registered here.
    pub fn knows_execution(&self, execution: u64) -> bool {
        lock(&self.partitions).keys().any(|p| p.job == execution)
            || lock(&self.gates).keys().any(|g| g.job == execution)
    }

    /// Hands channel `(partition, subpartition)` to one consumer: refused
    /// while another holds it, or once it was read to its end.
    pub fn claim_channel(
        self: &Arc<Self>,
        partition: PartitionId,
        subpartition: u32,
    ) -> Result<ChannelClaim, ClaimRefused> {
        let key = (partition, subpartition);
        let mut claims = lock(&self.claims);
        match claims.get(&key) {
            Some(ClaimState::Held) => Err(ClaimRefused::Held {
                partition,
                subpartition,
            }),
            Some(ClaimState::Consumed) => Err(ClaimRefused::Consumed {
                partition,
                subpartition,
            }),
            None => {
                claims.insert(key, ClaimState::Held);
                Ok(ChannelClaim {
                    registry: Arc::clone(self),
                    key,
                    consumed: false,
                })
            }
        }
    }
    pub fn partition_count(&self) -> usize {
        lock(&self.partitions).len()
    }
}
