//! The shuffle over verbs: credit-based flow control where a credit is a
//! registered buffer.
//!
//! Written once against the verbs-shaped interface ([`super::verbs`]), so the
//! same code runs on a NIC and on the emulation.
//!
//! - Start-up: every segment of the TaskManager's network buffer pool is
//!   registered once ([`VerbsEnv`]); nothing is registered per message.
//! - Connection set-up: the consumer opens the usual TCP data connection and
//!   sends `VerbsConnect` with its queue pair's endpoint; the producer
//!   answers with its own. Both queue pairs are then connected. The TCP
//!   connection stays as the control channel (partition requests, credit,
//!   cancel, errors) and as the liveness signal: its loss is a lost peer.
//! - Credit: where TCP announces a number, verbs announces buffers. For each
//!   credit the consumer lends one of the channel's free segments to the
//!   transport ([`super::gate::InputGate::lend_segment`]), records it in a
//!   slot table and sends `VerbsCredit { slot, addr, rkey, len }`.
//! - Data: the producer writes `routing header (padded to`
//!   [`super::PAYLOAD_HEADROOM`]`) + payload` into a credited buffer with one
//!   RDMA WRITE WITH IMMEDIATE, gathering a registered header buffer and the
//!   payload's segment; the immediate is the slot.
//! - Completions: the consumer's receive completion names the slot; the
//!   segment is checked (channel, sequence number, CRC, size) and queued in
//!   the gate, which re-announces the credit once the task has decoded it.
//!   The producer's send completion returns the payload segment to the pool
//!   and the header buffer to its free list.
//!
//! Ownership: a buffer handed to the NIC (a lent segment, a payload segment
//! and header buffer being written) sits in a table owned by the connection
//! until its completion comes back, and the queue pair is destroyed before
//! those tables are dropped.
//!
//! Limits: writes in flight per connection ≤ [`SEND_DEPTH`]; receives posted
//! and slots lent per connection ≤ [`VerbsEnv::recv_depth`] (the pool's
//! segment count, capped at [`RECV_DEPTH_MAX`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::frame::{
    BUFFER_HEADER_LEN, BufferHeader, BufferKind, ControlMessage, decode_routing_header,
    encode_routing_header,
};
use super::gate::{GateItem, InputGate};
use super::partition::{OutBuffer, Payload};
use super::verbs::{
    Access, CompletionQueue, MemoryRegion, QpCaps, QpEndpoint, QueuePair, RecvRequest, SendOp,
    SendRequest, Sge, SgeList, VerbsDevice, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};
use super::{NetworkError, PAYLOAD_HEADROOM};
use crate::memory::{NetworkBufferPool, Segment};

/// RDMA writes in flight per connection (send queue depth).
pub const SEND_DEPTH: u32 = 128;
/// Most receives one connection posts.
pub const RECV_DEPTH_MAX: u32 = 16 * 1024;
/// Completions taken per poll.
const POLL_BATCH: usize = 64;
/// How long a completion thread sleeps on an idle queue before it looks at
/// its stop flag again.
const IDLE_WAIT: Duration = Duration::from_millis(50);

const _: () = assert!(BUFFER_HEADER_LEN <= PAYLOAD_HEADROOM);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A TaskManager's verbs device and its registered network memory.
pub struct VerbsEnv {
    pub device: Arc<dyn VerbsDevice>,
    /// One region per segment, by the segment's base address.
    regions: HashMap<usize, Box<dyn MemoryRegion>>,
    /// Keeps the segments' memory alive at least as long as their regions.
    _pool: Arc<NetworkBufferPool>,
    recv_depth: u32,
}

impl VerbsEnv {
    /// Registers every segment of `pool` with `device`. Call at start-up,
    /// while every segment is in the pool.
    pub fn new(
        device: Arc<dyn VerbsDevice>,
        pool: &Arc<NetworkBufferPool>,
    ) -> Result<Arc<Self>, VerbsError> {
        let segments = pool.free_segment_ptrs();
        assert_eq!(
            segments.len(),
            pool.segment_count(),
            "network segments must be registered before any is handed out"
        );
        let mut regions = HashMap::with_capacity(segments.len());
        for (ptr, len) in segments {
            // SAFETY: the segment's memory is owned by `pool`, which frees it
            // only when dropped; `_pool` keeps it alive past these regions.
            // Remote keys are handed out only for segments lent to the
            // transport (taken out of every Rust owner's reach until their
            // completion), per the protocol above.
            let region = unsafe { device.register(ptr, len, Access::REMOTE_WRITE) }?;
            regions.insert(ptr as usize, region);
        }
        let recv_depth = (pool.segment_count() as u32).clamp(1, RECV_DEPTH_MAX);
        Ok(Arc::new(Self {
            device,
            regions,
            _pool: Arc::clone(pool),
            recv_depth,
        }))
    }

    fn region_of(&self, segment: &Segment) -> Result<&dyn MemoryRegion, NetworkError> {
        self.regions
            .get(&(segment.as_slice().as_ptr() as usize))
            .map(|r| &**r)
            .ok_or_else(|| NetworkError::Memory("segment not registered with the device".into()))
    }

    pub fn recv_depth(&self) -> u32 {
        self.recv_depth
    }

    pub fn describe(&self) -> String {
        self.device.describe()
    }

    fn queue_pair(&self, send_depth: u32, recv_depth: u32) -> Result<QueuePairWithCq, VerbsError> {
        let cq = self.device.create_cq(send_depth + recv_depth)?;
        let qp = self.device.create_qp(
            &cq,
            QpCaps {
                send_depth,
                recv_depth,
                send_sge_max: 2,
            },
        )?;
        Ok((qp, cq))
    }
}

type QueuePairWithCq = (Arc<dyn QueuePair>, Arc<dyn CompletionQueue>);

/// A buffer the consumer lent for one write: where, and the slot to name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteBuffer {
    pub slot: u32,
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

impl RemoteBuffer {
    pub fn from_credit(msg: &ControlMessage) -> Option<(u32, Self)> {
        match *msg {
            ControlMessage::VerbsCredit {
                channel_id,
                slot,
                addr,
                rkey,
                len,
            } => Some((
                channel_id,
                Self {
                    slot,
                    addr,
                    rkey,
                    len,
                },
            )),
            _ => None,
        }
    }
}

fn verbs_failure(peer: &str, e: impl std::fmt::Display) -> NetworkError {
    NetworkError::PeerLost {
        peer: peer.to_owned(),
        reason: format!("verbs: {e}"),
    }
}

/// Spawns a thread that waits on `cq` and hands each batch of completions to
/// `handle` until it returns `false` or `stop` is set.
fn spawn_completion_thread(
    name: &str,
    cq: Arc<dyn CompletionQueue>,
    stop: Arc<AtomicBool>,
    mut handle: impl FnMut(&[WorkCompletion]) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(POLL_BATCH);
            while !stop.load(Ordering::Acquire) {
                batch.clear();
                if cq.poll(&mut batch, POLL_BATCH) == 0 {
                    cq.wait(IDLE_WAIT);
                    continue;
                }
                if !handle(&batch) {
                    return;
                }
            }
        })
        .map(|_| ())
}

// ---------------------------------------------------------------------------
// Producer side

/// A registered header buffer: the routing header in front of a payload.
struct HeaderBuf {
    bytes: Box<[u8]>,
    lkey: u32,
}

struct InFlight {
    /// By `wr_id`: the buffers the NIC may still read.
    entries: Vec<Option<(OutBuffer, HeaderBuf)>>,
    free: Vec<(usize, HeaderBuf)>,
}

/// The producer's end of a verbs connection: writes buffers into credited
/// remote segments.
pub struct VerbsSender {
    // Field order is drop order: the queue pair goes first, so the NIC is
    // done with every buffer before the tables below are freed.
    qp: Arc<dyn QueuePair>,
    in_flight: Mutex<InFlight>,
    _header_regions: Vec<Box<dyn MemoryRegion>>,
    cq: Arc<dyn CompletionQueue>,
    env: Arc<VerbsEnv>,
    failure: Mutex<Option<String>>,
    stop: Arc<AtomicBool>,
    peer: String,
}

impl VerbsSender {
    pub fn new(env: &Arc<VerbsEnv>, peer: &str) -> Result<Arc<Self>, VerbsError> {
        // The producer posts no receives: it only writes.
        let (qp, cq) = env.queue_pair(SEND_DEPTH, 1)?;
        let mut free = Vec::with_capacity(SEND_DEPTH as usize);
        let mut regions = Vec::with_capacity(SEND_DEPTH as usize);
        for i in 0..SEND_DEPTH as usize {
            let mut bytes = vec![0u8; PAYLOAD_HEADROOM].into_boxed_slice();
            // SAFETY: the box is kept with its region in this sender (moved
            // into `in_flight` while a write reads it, never touched then);
            // its heap memory does not move. Regions are dropped before the
            // boxes (field order).
            let region = unsafe {
                env.device
                    .register(bytes.as_mut_ptr(), bytes.len(), Access::LOCAL)
            }?;
            free.push((
                i,
                HeaderBuf {
                    bytes,
                    lkey: region.lkey(),
                },
            ));
            regions.push(region);
        }
        Ok(Arc::new(Self {
            qp,
            in_flight: Mutex::new(InFlight {
                entries: (0..SEND_DEPTH).map(|_| None).collect(),
                free,
            }),
            _header_regions: regions,
            cq,
            env: Arc::clone(env),
            failure: Mutex::new(None),
            stop: Arc::new(AtomicBool::new(false)),
            peer: peer.to_owned(),
        }))
    }

    pub fn endpoint(&self) -> QpEndpoint {
        self.qp.endpoint()
    }

    pub fn connect(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        self.qp.connect(remote)
    }

    /// Starts the completion thread; `wake` is notified whenever a write
    /// completes (room in the send queue) or the connection fails.
    pub fn start(self: &Arc<Self>, wake: Arc<Notify>) -> std::io::Result<()> {
        let me = Arc::clone(self);
        spawn_completion_thread(
            "verbs-send-cq",
            Arc::clone(&self.cq),
            Arc::clone(&self.stop),
            move |batch| {
                let ok = me.on_completions(batch);
                wake.notify_one();
                ok
            },
        )
    }

    fn on_completions(&self, batch: &[WorkCompletion]) -> bool {
        let mut done = Vec::with_capacity(batch.len());
        {
            let mut table = lock(&self.in_flight);
            for wc in batch {
                let slot = wc.wr_id as usize;
                if let Some((buffer, header)) = table.entries.get_mut(slot).and_then(Option::take) {
                    table.free.push((slot, header));
                    done.push(buffer);
                }
            }
        }
        // Payload segments go back to the pool outside the lock.
        drop(done);
        match batch.iter().find(|wc| wc.status != WcStatus::Success) {
            Some(wc) => {
                let reason = format!("RDMA write {} completed with {:?}", wc.wr_id, wc.status);
                lock(&self.failure).get_or_insert(reason);
                false
            }
            None => true,
        }
    }

    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Whether another write can be posted now.
    pub fn has_room(&self) -> bool {
        !lock(&self.in_flight).free.is_empty()
    }

    /// Writes `buffer` behind its routing header into `remote`.
    pub fn send(
        &self,
        header: &BufferHeader,
        buffer: OutBuffer,
        remote: RemoteBuffer,
    ) -> Result<(), NetworkError> {
        let total = PAYLOAD_HEADROOM + header.size as usize;
        if total > remote.len as usize {
            return Err(NetworkError::Protocol {
                peer: self.peer.clone(),
                detail: format!(
                    "credited buffer of {} bytes is too small for {total} bytes",
                    remote.len
                ),
            });
        }
        let (slot, mut head) = lock(&self.in_flight)
            .free
            .pop()
            .ok_or_else(|| NetworkError::Memory("no free verbs send slot".into()))?;
        let mut routing = [0u8; BUFFER_HEADER_LEN];
        encode_routing_header(header, &mut routing);
        head.bytes[..BUFFER_HEADER_LEN].copy_from_slice(&routing);
        let header_sge = Sge {
            addr: head.bytes.as_ptr() as u64,
            len: PAYLOAD_HEADROOM as u32,
            lkey: head.lkey,
        };
        // RDMA writes from registered memory: Arrow parts are copied into
        // their (registered) segment first.
        let buffer = OutBuffer {
            kind: buffer.kind,
            payload: buffer.payload.into_contiguous(),
        };
        let sges = match &buffer.payload {
            // `into_contiguous` left no parts: both arms are a filled segment.
            Payload::Segment { segment, len } | Payload::Parts { segment, len, .. } => {
                let region = self.env.region_of(segment)?;
                SgeList::two(
                    header_sge,
                    Sge {
                        addr: segment.as_slice().as_ptr() as u64,
                        len: *len as u32,
                        lkey: region.lkey(),
                    },
                )
            }
            Payload::Inline { bytes, len } => {
                // Events are small: they ride in the header buffer, right
                // behind the routing header.
                head.bytes[BUFFER_HEADER_LEN..BUFFER_HEADER_LEN + len]
                    .copy_from_slice(&bytes[..*len]);
                SgeList::one(header_sge)
            }
        };
        let request = SendRequest {
            wr_id: slot as u64,
            op: SendOp::WriteWithImm {
                remote_addr: remote.addr,
                rkey: remote.rkey,
                imm: remote.slot,
            },
            sges,
        };
        // In the table before posting: the completion may come at once.
        lock(&self.in_flight).entries[slot] = Some((buffer, head));
        if let Err(e) = self.qp.post_send(request) {
            let mut table = lock(&self.in_flight);
            if let Some((_, head)) = table.entries[slot].take() {
                table.free.push((slot, head));
            }
            return Err(verbs_failure(&self.peer, e));
        }
        Ok(())
    }
}

impl Drop for VerbsSender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Stops a sender's completion thread when the connection ends.
pub fn stop_sender(sender: &VerbsSender) {
    sender.stop.store(true, Ordering::Release);
}

// ---------------------------------------------------------------------------
// Consumer side

struct Lent {
    channel_id: u32,
    segment: Segment,
    floating: bool,
}

struct SlotTable {
    slots: Vec<Option<Lent>>,
    free: Vec<u32>,
}

/// What the consumer's completion thread needs to route a buffer: the gate
/// channel behind a connection channel id, and its expected sequence number.
pub trait ChannelRouter: Send + Sync {
    /// Checks `header` against the channel's binding (known channel, next
    /// sequence number) and returns the gate and channel it feeds; forgets
    /// the binding at end of partition.
    fn route(&self, header: &BufferHeader) -> Result<(Arc<InputGate>, usize), NetworkError>;
    /// The gate and channel of a bound channel id, if still bound.
    fn lookup(&self, channel_id: u32) -> Option<(Arc<InputGate>, usize)>;
    /// Fails every bound gate (the connection is broken).
    fn fail_all(&self, error: NetworkError);
}

/// The consumer's end of a verbs connection: lends segments as credit and
/// queues what the producer wrote into them.
pub struct VerbsReceiver {
    qp: Arc<dyn QueuePair>,
    slots: Mutex<SlotTable>,
    cq: Arc<dyn CompletionQueue>,
    env: Arc<VerbsEnv>,
    stop: Arc<AtomicBool>,
    peer: String,
}

impl VerbsReceiver {
    pub fn new(env: &Arc<VerbsEnv>, peer: &str) -> Result<Arc<Self>, VerbsError> {
        let depth = env.recv_depth();
        let (qp, cq) = env.queue_pair(1, depth)?;
        for wr_id in 0..depth as u64 {
            qp.post_recv(RecvRequest { wr_id, sge: None })?;
        }
        Ok(Arc::new(Self {
            qp,
            slots: Mutex::new(SlotTable {
                slots: (0..depth).map(|_| None).collect(),
                free: (0..depth).rev().collect(),
            }),
            cq,
            env: Arc::clone(env),
            stop: Arc::new(AtomicBool::new(false)),
            peer: peer.to_owned(),
        }))
    }

    pub fn endpoint(&self) -> QpEndpoint {
        self.qp.endpoint()
    }

    pub fn connect(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        self.qp.connect(remote)
    }

    pub fn start(self: &Arc<Self>, router: Arc<dyn ChannelRouter>) -> std::io::Result<()> {
        let me = Arc::clone(self);
        spawn_completion_thread(
            "verbs-recv-cq",
            Arc::clone(&self.cq),
            Arc::clone(&self.stop),
            move |batch| match me.on_completions(batch, &*router) {
                Ok(()) => true,
                Err(e) => {
                    router.fail_all(e);
                    false
                }
            },
        )
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Turns `credit` announced credits of `channel_id` into buffer grants:
    /// one lent segment each.
    pub fn grant(
        &self,
        router: &dyn ChannelRouter,
        channel_id: u32,
        credit: u32,
        out: &mut Vec<ControlMessage>,
    ) -> Result<(), NetworkError> {
        let Some((gate, channel)) = router.lookup(channel_id) else {
            // The channel ended or was canceled: its credit is moot.
            return Ok(());
        };
        for _ in 0..credit {
            // Lent and entered in the slot table under the table's lock, so
            // that `reclaim` (which closes lending under it) never misses a
            // segment lent as the channel ends.
            let mut table = lock(&self.slots);
            let Some((segment, floating)) = gate.lend_segment(channel) else {
                return Ok(());
            };
            let region = match self.env.region_of(&segment) {
                Ok(region) => region,
                Err(e) => {
                    drop(table);
                    gate.return_lent(channel, segment, floating);
                    return Err(e);
                }
            };
            let addr = segment.as_slice().as_ptr() as u64;
            let len = segment.capacity() as u32;
            let rkey = region.rkey();
            let Some(slot) = table.free.pop() else {
                drop(table);
                gate.return_lent(channel, segment, floating);
                return Err(NetworkError::Memory(format!(
                    "more than {} buffers lent on the verbs connection to {}",
                    self.env.recv_depth(),
                    self.peer
                )));
            };
            table.slots[slot as usize] = Some(Lent {
                channel_id,
                segment,
                floating,
            });
            out.push(ControlMessage::VerbsCredit {
                channel_id,
                slot,
                addr,
                rkey,
                len,
            });
        }
        Ok(())
    }

    fn on_completions(
        &self,
        batch: &[WorkCompletion],
        router: &dyn ChannelRouter,
    ) -> Result<(), NetworkError> {
        for wc in batch {
            if wc.status != WcStatus::Success {
                return Err(verbs_failure(
                    &self.peer,
                    format!("receive completion {:?}", wc.status),
                ));
            }
            if wc.opcode != WcOpcode::RecvRdmaWithImm {
                return Err(self.protocol(format!("unexpected completion {:?}", wc.opcode)));
            }
            let slot = wc.imm.unwrap_or(u32::MAX);
            let lent = {
                let mut table = lock(&self.slots);
                let lent = table
                    .slots
                    .get_mut(slot as usize)
                    .and_then(Option::take)
                    .ok_or_else(|| self.protocol(format!("write into unlent slot {slot}")))?;
                table.free.push(slot);
                lent
            };
            self.deliver(lent, wc.byte_len as usize, router)?;
            self.qp
                .post_recv(RecvRequest {
                    wr_id: wc.wr_id,
                    sge: None,
                })
                .map_err(|e| verbs_failure(&self.peer, e))?;
        }
        Ok(())
    }

    fn protocol(&self, detail: String) -> NetworkError {
        NetworkError::Protocol {
            peer: self.peer.clone(),
            detail,
        }
    }

    /// Checks a filled segment and queues it in its gate.
    fn deliver(
        &self,
        lent: Lent,
        byte_len: usize,
        router: &dyn ChannelRouter,
    ) -> Result<(), NetworkError> {
        let bytes = lent.segment.as_slice();
        let h = decode_routing_header(bytes).map_err(|e| self.protocol(e.to_string()))?;
        let size = h.size as usize;
        if h.channel_id != lent.channel_id {
            return Err(self.protocol(format!(
                "buffer for channel {} written into a buffer lent to channel {}",
                h.channel_id, lent.channel_id
            )));
        }
        // Data follows the header room; events ride inside it.
        let (offset, len, expected_len) = match h.kind {
            BufferKind::Ipc => (PAYLOAD_HEADROOM, size, PAYLOAD_HEADROOM + size),
            _ => (BUFFER_HEADER_LEN, size, PAYLOAD_HEADROOM),
        };
        if byte_len != expected_len || offset + len > bytes.len().min(byte_len) {
            return Err(self.protocol(format!(
                "write of {byte_len} bytes for a {:?} buffer of {size} bytes",
                h.kind
            )));
        }
        let payload = &bytes[offset..offset + len];
        if let Some(expected) = h.crc {
            let crc = crc32c::crc32c(payload);
            if crc != expected {
                return Err(self.protocol(format!(
                    "CRC mismatch on channel {} buffer #{}: header {expected:#010x}, payload {crc:#010x}",
                    h.channel_id, h.seq
                )));
            }
        }
        let (gate, channel) = router.route(&h)?;
        let item = GateItem::Remote {
            kind: h.kind,
            segment: lent.segment,
            body: None,
            offset,
            len,
            floating: lent.floating,
        };
        if h.kind == BufferKind::EndOfPartition {
            // Before the end is visible: a consumer that saw it may count
            // its credit at once.
            self.reclaim(h.channel_id, &gate, channel);
        }
        gate.push_lent(channel, item, len, h.backlog);
        Ok(())
    }

    /// The channel ended: the producer writes no more into its buffers, so
    /// the ones still lent go back to the gate.
    fn reclaim(&self, channel_id: u32, gate: &InputGate, channel: usize) {
        let unused: Vec<Lent> = {
            let mut table = lock(&self.slots);
            gate.close_lending(channel);
            let SlotTable { slots, free } = &mut *table;
            let mut unused = Vec::new();
            for (i, s) in slots.iter_mut().enumerate() {
                if s.as_ref().is_some_and(|l| l.channel_id == channel_id) {
                    unused.extend(s.take());
                    free.push(i as u32);
                }
            }
            unused
        };
        for l in unused {
            gate.return_lent(channel, l.segment, l.floating);
        }
    }
}

impl Drop for VerbsReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
