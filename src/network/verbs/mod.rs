//! A small verbs-shaped interface: the part of the InfiniBand verbs API that
//! the shuffle protocol ([`super::rdma`]) needs, and nothing more.
//!
//! Two implementations stand behind it and the protocol does not know which
//! one it runs on:
//!
//! - [`emu`]: emulated verbs in user space. Registered regions with keys
//!   checked on every access, reliable-connected queue pairs with ordered
//!   delivery, completion queues. Two queue pairs in one process talk
//!   directly; queue pairs in different processes talk over a TCP link
//!   between the two emulated devices. It is the CI twin of the hardware.
//! - `hw` (feature `rdma`): libibverbs through the `strata-verbs` FFI crate.
//!
//! # The model
//!
//! A [`VerbsDevice`] registers memory ([`MemoryRegion`]: address, length,
//! local key, remote key), creates completion queues and reliable-connected
//! queue pairs. A queue pair is connected by exchanging [`QpEndpoint`]s out
//! of band (the TaskManagers' TCP data connection carries them). Work is
//! posted as [`SendRequest`]s (SEND, RDMA WRITE WITH IMMEDIATE) and
//! [`RecvRequest`]s; each finishes with a [`WorkCompletion`] on the queue
//! pair's completion queue.
//!
//! # Ownership
//!
//! Posting takes raw addresses, as the NIC does: the caller keeps the memory
//! behind every scatter/gather entry alive and untouched until that work
//! request's completion is polled. The protocol layer upholds this by moving
//! the buffer into an in-flight table keyed by `wr_id` and taking it back
//! only from the completion ("rent" model).
//!
//! # Limits
//!
//! Every queue has a maximum given at creation: send and receive queue depth
//! per queue pair ([`QpCaps`]), completion queue depth. Posting past a queue's
//! depth is [`VerbsError::QueueFull`]; a completion queue that overflows puts
//! its queue pairs in the error state, as on hardware.

pub mod emu;
#[cfg(feature = "rdma")]
pub mod hw;
pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which implementation a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// A real RDMA NIC through libibverbs.
    Hardware,
    /// The user-space emulation.
    Emulated,
}

/// Access rights of a memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub local_write: bool,
    pub remote_write: bool,
    pub remote_read: bool,
}

impl Access {
    /// A buffer that peers write into (receive segments).
    pub const REMOTE_WRITE: Access = Access {
        local_write: true,
        remote_write: true,
        remote_read: false,
    };
    /// A buffer that is only sent from.
    pub const LOCAL: Access = Access {
        local_write: true,
        remote_write: false,
        remote_read: false,
    };
}

/// A registered memory region. Deregistered when dropped.
pub trait MemoryRegion: Send + Sync {
    fn addr(&self) -> u64;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn lkey(&self) -> u32;
    fn rkey(&self) -> u32;
}

/// What one side of a reliable connection tells the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// Port LID (InfiniBand); 0 on RoCE and in the emulation.
    pub lid: u16,
    /// Port GID (RoCE, or global routing on InfiniBand); all zero in the emulation.
    pub gid: [u8; 16],
    /// The emulation's device address (`host:port` of its link listener, plus
    /// its instance id); empty for hardware.
    pub device: String,
}

/// Queue sizes of a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    pub send_depth: u32,
    pub recv_depth: u32,
    /// Scatter/gather entries per send work request.
    pub send_sge_max: u32,
}

/// One scatter/gather entry: `len` bytes at `addr` inside the region of `lkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// At most this many scatter/gather entries per send; the protocol uses two
/// (header, payload).
pub const SGE_MAX: usize = 2;

/// The gather list of a send work request, kept inline (no allocation per post).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgeList {
    entries: [Sge; SGE_MAX],
    count: usize,
}

impl SgeList {
    pub fn one(a: Sge) -> Self {
        Self {
            entries: [a, a],
            count: 1,
        }
    }
    pub fn two(a: Sge, b: Sge) -> Self {
        Self {
            entries: [a, b],
            count: 2,
        }
    }
    pub fn as_slice(&self) -> &[Sge] {
        &self.entries[..self.count]
    }
    pub fn total_len(&self) -> usize {
        self.as_slice().iter().map(|s| s.len as usize).sum()
    }
}

/// What a send work request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// Consumes one posted receive at the peer and lands there.
    Send { imm: Option<u32> },
    /// Writes into the peer's registered memory (`remote_addr` inside the
    /// region of `rkey`), then consumes one posted receive at the peer whose
    /// completion carries `imm`.
    WriteWithImm {
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendRequest {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: SgeList,
}

/// A posted receive. `sge` is where a SEND lands; a WRITE WITH IMMEDIATE only
/// consumes the receive and needs none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvRequest {
    pub wr_id: u64,
    pub sge: Option<Sge>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    Recv,
    RecvRdmaWithImm,
}

/// Completion status, after `ibv_wc_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcStatus {
    Success,
    /// A local scatter/gather entry was outside its region or had a bad lkey.
    LocalProtection,
    /// The peer refused the access: bad rkey, out of bounds, or no write right.
    RemoteAccess,
    /// The peer had no receive posted (receiver not ready) and retries ran out.
    RnrRetryExceeded,
    /// The queue pair went to the error state before this request ran.
    Flushed,
    /// The connection to the peer broke (transport retries exceeded).
    RetryExceeded,
    /// A posted receive was too short for the incoming SEND.
    LocalLength,
    /// Any other status, with the provider's code.
    Other(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (receive completions).
    pub byte_len: u32,
    pub imm: Option<u32>,
    pub qpn: u32,
}

/// A completion queue. Polling never blocks; `wait` blocks until a completion
/// is there or the timeout passes.
pub trait CompletionQueue: Send + Sync {
    /// Moves up to `max` completions into `out`; returns how many.
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> usize;
    /// Waits until at least one completion is queued (or `timeout` passes).
    fn wait(&self, timeout: Duration);
}

/// A reliable-connected queue pair.
pub trait QueuePair: Send + Sync {
    fn qpn(&self) -> u32;
    /// This side's endpoint, for the peer's `connect`.
    fn endpoint(&self) -> QpEndpoint;
    /// Moves the queue pair to ready-to-send against `remote`
    /// (INIT → RTR → RTS on hardware).
    fn connect(&self, remote: &QpEndpoint) -> Result<(), VerbsError>;
    /// Posts a send work request. The memory behind `req.sges` must stay
    /// valid until its completion is polled.
    fn post_send(&self, req: SendRequest) -> Result<(), VerbsError>;
    /// Posts a receive. The memory behind `req.sge` must stay valid until its
    /// completion is polled.
    fn post_recv(&self, req: RecvRequest) -> Result<(), VerbsError>;
}

/// An RDMA device (one port), opened with one protection domain.
pub trait VerbsDevice: Send + Sync {
    fn kind(&self) -> DeviceKind;
    /// Human-readable: `mlx5_0 port 1 (RoCE v2)`, `emulated verbs at 127.0.0.1:41234`.
    fn describe(&self) -> String;
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    ///
    /// The memory must stay allocated until the returned region is dropped,
    /// and while a peer may write into it (a remote key has been handed out
    /// and not taken back) no Rust reference to it may be read or written.
    #[allow(unsafe_code)]
    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, VerbsError>;
    /// A completion queue of `depth` entries.
    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CompletionQueue>, VerbsError>;
    /// A reliable-connected queue pair whose sends and receives complete on `cq`.
    fn create_qp(
        &self,
        cq: &Arc<dyn CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QueuePair>, VerbsError>;
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerbsError {
    #[error("no RDMA device: {reason}")]
    NoDevice { reason: String },
    #[error("{call} failed: {reason}")]
    Call { call: &'static str, reason: String },
    #[error("{queue} queue of queue pair {qpn} is full ({depth} entries)")]
    QueueFull {
        qpn: u32,
        queue: &'static str,
        depth: u32,
    },
    #[error("queue pair {qpn} is not connected")]
    NotConnected { qpn: u32 },
    #[error("queue pair {qpn} is in the error state: {reason}")]
    QpError { qpn: u32, reason: String },
    #[error("cannot reach emulated verbs device {device}: {reason}")]
    Link { device: String, reason: String },
    #[error("{count} scatter/gather entries exceed the queue pair's maximum of {max}")]
    TooManySges { count: usize, max: u32 },
}
