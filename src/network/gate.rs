//! Input gates: the consumer side of an edge.
//!
//! A gate has one channel per producer subtask it reads from. A local
//! channel's producer pushes events straight into the gate's queue (bounded
//! per channel); a remote channel's buffers are read from the socket into
//! segments the channel holds as credit. The consuming task pops items in
//! arrival order (so each channel stays in order) through an [`InputReader`],
//! which decodes remote buffers, recycles their segments (re-announcing the
//! credit) and merges watermarks and end-of-partition across channels.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use tokio::sync::mpsc::UnboundedSender;

use super::align::{AlignStep, BarrierAligner};
use super::debloat::{DebloatConfig, Debloater};
use super::frame::{BufferKind, ControlMessage};
use super::ipc::ChannelDecoder;
use super::taskread::GateLink;
use super::{GateId, NetworkError, StreamEvent};
use crate::memory::{NetworkBufferPool, Segment};

/// An item in the gate's queue.
pub enum GateItem {
    Local(StreamEvent),
    Remote {
        kind: BufferKind,
        /// The credit the sender spent on this buffer.
        segment: Segment,
        /// The payload, when it was read into memory of its own (TCP reads
        /// an IPC payload so, and the batch decoded from it shares it);
        /// otherwise it is `segment[offset..offset + len]` (verbs writes a
        /// header in front of it).
        body: Option<Buffer>,
        offset: usize,
        len: usize,
        floating: bool,
    },
}

/// Where a remote channel announces credit: the connection's control sender
/// and the channel id the connection assigned.
#[derive(Clone)]
pub struct CreditLink {
    control: ControlPath,
    pub channel_id: u32,
}

#[derive(Clone)]
enum ControlPath {
    /// The shared connection's control task writes it.
    Runtime(UnboundedSender<ControlMessage>),
    /// Written at once by the thread that announces it (task-read input).
    Direct(Arc<GateLink>),
}

impl CreditLink {
    pub fn new(control: UnboundedSender<ControlMessage>, channel_id: u32) -> Self {
        Self {
            control: ControlPath::Runtime(control),
            channel_id,
        }
    }

    pub fn direct(channel_id: u32, link: Arc<GateLink>) -> Self {
        Self {
            control: ControlPath::Direct(link),
            channel_id,
        }
    }

    /// Sends a message to the channel's producer. The connection may already
    /// be gone; its reader then fails the gate.
    fn send(&self, msg: ControlMessage) {
        match &self.control {
            ControlPath::Runtime(control) => {
                let _ = control.send(msg);
            }
            ControlPath::Direct(link) => {
                let _ = link.send(&msg);
            }
        }
    }
}

/// What reads a gate's connections on its task's thread (task-read input):
/// `pop` drives it instead of waiting for the network runtime.
pub trait GateDriver: Send + Sync {
    /// Receives what has arrived into `gate`, waiting up to `timeout` when
    /// nothing has; a broken connection fails the gate.
    fn drive(&self, gate: &InputGate, timeout: Duration);
    /// Ends a `drive` that waits (a local push, a failure, a close).
    fn wake(&self);
}

struct RemoteCredit {
    /// Segments granted to the sender as credit and not yet filled.
    free: Vec<(Segment, bool)>,
    /// Granted segments lent out to the verbs transport (their address and
    /// key are with the sender); they count as credit like `free`.
    lent: usize,
    exclusive_total: usize,
    backlog: u32,
    link: Option<CreditLink>,
    /// Verbs: the channel ended, so no more segments are lent to it (a late
    /// credit would lend one that nobody writes or returns).
    lending_closed: bool,
    /// The channel is in the gate's `floating_waiters` (a flag, not a scan
    /// of the queue: a gate may have a thousand waiting channels).
    waiting_for_floating: bool,
}

struct GateState {
    queue: VecDeque<(usize, GateItem)>,
    local_queued: Vec<usize>,
    /// Credit state of the remote channels, boxed: a local channel's `None`
    /// is 8 bytes where an inline one would be 72.
    remote: Vec<Option<Box<RemoteCredit>>>,
    floating: Vec<Segment>,
    floating_waiters: VecDeque<usize>,
    failure: Option<NetworkError>,
    closed: bool,
    /// Channels held back while the task aligns a checkpoint barrier: `pop`
    /// skips their items, which keep their segments (so their senders run
    /// out of credit) and their local slots (so local producers block).
    blocked: Vec<bool>,
    blocked_count: usize,
    /// Threads blocked in `pop` and in `push_local`: the condition variables
    /// are signalled only when someone waits (each signal is a futex call).
    readers_waiting: u32,
    /// A waiting reader was notified and has not run yet: further items
    /// need no second notify (each is a system call).
    reader_notified: bool,
    local_writers_waiting: u32,
    /// The task is in its driver's `drive` (which a push must wake).
    driving: bool,
}

pub struct InputGate {
    pub id: GateId,
    channel_count: usize,
    local_capacity: usize,
    state: Mutex<GateState>,
    readable: Condvar,
    writable: Condvar,
    /// Bytes received over the network by this gate.
    pub remote_bytes: AtomicU64,
    /// Exclusive and floating segments taken for the remote channels.
    remote_buffer_total: usize,
    /// Task-read input: reads the gate's connections when it is empty.
    driver: std::sync::OnceLock<Arc<dyn GateDriver>>,
}

/// How a gate's channels are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Local,
    Remote,
}

/// Sizes of a gate's buffers, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct GateBuffers {
    pub exclusive_per_channel: usize,
    pub floating_per_gate: usize,
    pub max_per_channel: usize,
}

impl From<&crate::config::Config> for GateBuffers {
    /// `taskmanager.network.memory.{buffers-per-channel,
    /// floating-buffers-per-gate, max-buffers-per-channel}`.
    fn from(config: &crate::config::Config) -> Self {
        Self {
            exclusive_per_channel: config.buffers_per_channel as usize,
            floating_per_gate: config.floating_buffers_per_gate as usize,
            max_per_channel: config.max_buffers_per_channel as usize,
        }
    }
}

/// The network segments input gates take from the TaskManager's pool when
/// they are created: exclusive segments for each REMOTE channel, plus the
/// floating segments of every gate that has a remote channel. Local
/// channels take none (their producer pushes into the gate's queue, which
/// `max-buffers-per-channel` bounds), so a job whose subtasks all share one
/// TaskManager needs no network segments for its gates at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateDemand {
    pub gate_count: usize,
    /// Gates with at least one remote channel (they take floating segments).
    pub remote_gate_count: usize,
    pub remote_channel_count: usize,
    pub segment_count: usize,
}

impl GateDemand {
    /// What one gate over `channels` takes.
    pub fn of(channels: &[ChannelKind], buffers: GateBuffers) -> Self {
        let remote_channel_count = channels
            .iter()
            .filter(|c| **c == ChannelKind::Remote)
            .count();
        let remote_gate_count = usize::from(remote_channel_count > 0);
        Self {
            gate_count: 1,
            remote_gate_count,
            remote_channel_count,
            segment_count: remote_channel_count * buffers.exclusive_per_channel
                + remote_gate_count * buffers.floating_per_gate,
        }
    }

    /// The demand of this gate (or these gates) and `other` together.
    pub fn plus(self, other: Self) -> Self {
        Self {
            gate_count: self.gate_count + other.gate_count,
            remote_gate_count: self.remote_gate_count + other.remote_gate_count,
            remote_channel_count: self.remote_channel_count + other.remote_channel_count,
            segment_count: self.segment_count + other.segment_count,
        }
    }

    fn floating_segment_count(&self, buffers: GateBuffers) -> usize {
        self.remote_gate_count * buffers.floating_per_gate
    }

    /// Checks that the pool has the segments for these gates free now, so
    /// that a deployment fails before it creates any gate, with the total
    /// it needs rather than the need of whichever gate came last.
    pub fn check_fits(
        &self,
        what: String,
        buffers: GateBuffers,
        pool: &NetworkBufferPool,
    ) -> Result<(), NetworkError> {
        if pool.available_count() >= self.segment_count {
            return Ok(());
        }
        Err(NetworkError::InsufficientSegments(Box::new(
            SegmentShortfall::new(what, *self, buffers, pool),
        )))
    }
}

/// Input gates need more network segments than the TaskManager's pool has
/// free: what they need, what there is, and which keys change either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentShortfall {
    /// The gate or deployment that asked, in words.
    pub what: String,
    pub demand: GateDemand,
    pub exclusive_per_channel: usize,
    pub floating_per_gate: usize,
    pub free_segment_count: usize,
    pub total_segment_count: usize,
    pub segment_size_bytes: usize,
}

impl SegmentShortfall {
    fn new(
        what: String,
        demand: GateDemand,
        buffers: GateBuffers,
        pool: &NetworkBufferPool,
    ) -> Self {
        Self {
            what,
            demand,
            exclusive_per_channel: buffers.exclusive_per_channel,
            floating_per_gate: buffers.floating_per_gate,
            free_segment_count: pool.available_count(),
            total_segment_count: pool.segment_count(),
            segment_size_bytes: pool.segment_size_bytes(),
        }
    }

    /// The smallest network memory, in whole MiB, whose pool would have had
    /// these segments free besides those in use now.
    pub fn network_bytes_needed(&self) -> u64 {
        let in_use = self.total_segment_count - self.free_segment_count;
        let segments = (in_use + self.demand.segment_count) as u64;
        (segments * self.segment_size_bytes as u64).div_ceil(MIB) * MIB
    }
}

const MIB: u64 = 1 << 20;

impl std::fmt::Display for SegmentShortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.demand;
        let segment_kib = self.segment_size_bytes / 1024;
        write!(
            f,
            "insufficient network memory: {} needs {} network segments of {segment_kib} KiB \
             ({} input gate(s) with {} remote channel(s) × \
             taskmanager.network.memory.buffers-per-channel = {} exclusive, plus \
             taskmanager.network.memory.floating-buffers-per-gate = {} for each of the {} \
             gate(s) with a remote channel; local channels need none), but the \
             TaskManager has {} of its {} segments ({} MiB) free. Raise \
             taskmanager.memory.network.min and taskmanager.memory.network.max to at \
             least {}m (what the gates take; producers' outgoing buffers need some on top, \
             and taskmanager.memory.process.size grows with it), or lower \
             taskmanager.network.memory.buffers-per-channel or \
             taskmanager.memory.segment-size",
            self.what,
            d.segment_count,
            d.gate_count,
            d.remote_channel_count,
            self.exclusive_per_channel,
            self.floating_per_gate,
            d.remote_gate_count,
            self.free_segment_count,
            self.total_segment_count,
            (self.total_segment_count * self.segment_size_bytes) as u64 / MIB,
            self.network_bytes_needed() / MIB,
        )
    }
}

impl InputGate {
    /// Creates a gate, taking its exclusive and floating segments from the
    /// pool up front (Flink fails the deployment when they are not there).
    pub fn new(
        id: GateId,
        channels: &[ChannelKind],
        buffers: GateBuffers,
        pool: &Arc<NetworkBufferPool>,
    ) -> Result<Arc<Self>, NetworkError> {
        let demand = GateDemand::of(channels, buffers);
        let floating_count = demand.floating_segment_count(buffers);
        let mut segments = pool.request_many(demand.segment_count).map_err(|_| {
            NetworkError::InsufficientSegments(Box::new(SegmentShortfall::new(
                format!(
                    "the input gate of subtask {} on edge {} (this gate alone; \
                     the deployment's other gates need theirs too)",
                    id.target_subtask, id.edge
                ),
                demand,
                buffers,
                pool,
            )))
        })?;
        let floating = segments.split_off(segments.len() - floating_count);
        let mut exclusive = segments.into_iter();
        let remote = channels
            .iter()
            .map(|kind| {
                (*kind == ChannelKind::Remote).then(|| {
                    Box::new(RemoteCredit {
                        free: exclusive
                            .by_ref()
                            .take(buffers.exclusive_per_channel)
                            .map(|s| (s, false))
                            .collect(),
                        lent: 0,
                        exclusive_total: buffers.exclusive_per_channel,
                        lending_closed: false,
                        waiting_for_floating: false,
                        backlog: 0,
                        link: None,
                    })
                })
            })
            .collect();
        Ok(Arc::new(Self {
            id,
            channel_count: channels.len(),
            local_capacity: buffers.max_per_channel.max(1),
            state: Mutex::new(GateState {
                queue: VecDeque::new(),
                local_queued: vec![0; channels.len()],
                remote,
                floating,
                floating_waiters: VecDeque::new(),
                failure: None,
                closed: false,
                blocked: vec![false; channels.len()],
                blocked_count: 0,
                readers_waiting: 0,
                reader_notified: false,
                local_writers_waiting: 0,
                driving: false,
            }),
            readable: Condvar::new(),
            writable: Condvar::new(),
            remote_bytes: AtomicU64::new(0),
            remote_buffer_total: demand.segment_count,
            driver: std::sync::OnceLock::new(),
        }))
    }

    pub fn channel_count(&self) -> usize {
        self.channel_count
    }

    /// Makes `pop` read the gate's connections itself (task-read input).
    pub fn set_driver(&self, driver: Arc<dyn GateDriver>) {
        let _ = self.driver.set(driver);
    }

    /// Wakes a task waiting in `pop` (its condition variable, or its
    /// driver's poll), once until it runs.
    fn wake_reader(&self, mut state: std::sync::MutexGuard<'_, GateState>) {
        let driving = state.driving;
        let wake = state.readers_waiting > 0 && !state.reader_notified;
        state.reader_notified |= wake;
        drop(state);
        if wake {
            self.readable.notify_one();
        }
        if driving && let Some(d) = self.driver.get() {
            d.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pushes an event from a local producer, waiting while the channel is
    /// full. Returns the time spent blocked (back-pressure).
    pub fn push_local(
        &self,
        channel: usize,
        event: StreamEvent,
        canceled: &dyn Fn() -> bool,
    ) -> Result<Duration, NetworkError> {
        let mut state = self.lock();
        let mut blocked_since = None;
        while state.local_queued[channel] >= self.local_capacity && !state.closed {
            if canceled() {
                return Err(NetworkError::Canceled);
            }
            blocked_since.get_or_insert_with(Instant::now);
            state.local_writers_waiting += 1;
            state = self
                .writable
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            state.local_writers_waiting -= 1;
        }
        if state.closed {
            return Err(NetworkError::ConsumerGone);
        }
        state.local_queued[channel] += 1;
        state.queue.push_back((channel, GateItem::Local(event)));
        self.wake_reader(state);
        Ok(blocked_since.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    /// Binds a remote channel to its connection; returns the initial credit.
    pub fn bind_remote(&self, channel: usize, link: CreditLink) -> u32 {
        let mut state = self.lock();
        let credit = state.remote[channel]
            .as_mut()
            .expect("bind_remote on a local channel");
        credit.link = Some(link);
        credit.free.len() as u32
    }

    /// Whether the gate has failed (its consumer will see the error).
    pub fn has_failed(&self) -> bool {
        self.lock().failure.is_some()
    }

    /// Takes the segment that the sender's credit stands for. No free segment
    /// means the sender sent without credit: a protocol error.
    pub fn take_segment(&self, channel: usize) -> Result<(Segment, bool), NetworkError> {
        let mut state = self.lock();
        if let Some(failure) = &state.failure {
            return Err(failure.clone());
        }
        let credit = state.remote.get_mut(channel).and_then(Option::as_mut);
        credit
            .and_then(|c| c.free.pop())
            .ok_or_else(|| NetworkError::Channel {
                gate: self.id,
                channel,
                detail: "sender sent a buffer without credit".into(),
            })
    }

    /// Lends a credited segment to the verbs transport, whose peer writes
    /// into it; it comes back through [`Self::push_lent`] (filled) or
    /// [`Self::return_lent`] (unused). `None` when the channel holds no
    /// unlent credit, or the gate has failed or closed.
    pub fn lend_segment(&self, channel: usize) -> Option<(Segment, bool)> {
        let mut state = self.lock();
        if state.failure.is_some() || state.closed {
            return None;
        }
        let c = state.remote.get_mut(channel).and_then(Option::as_mut)?;
        if c.lending_closed {
            return None;
        }
        let lent = c.free.pop()?;
        c.lent += 1;
        Some(lent)
    }

    /// The channel's sender ended: lend it nothing more (verbs).
    pub fn close_lending(&self, channel: usize) {
        if let Some(c) = self.lock().remote.get_mut(channel).and_then(Option::as_mut) {
            c.lending_closed = true;
        }
    }

    /// A lent segment came back filled: queue it like a received buffer.
    pub fn push_lent(&self, channel: usize, item: GateItem, len: usize, backlog: u32) {
        if let Some(c) = self.lock().remote.get_mut(channel).and_then(Option::as_mut) {
            c.lent -= 1;
        }
        self.push_remote(channel, item, len, backlog);
    }

    /// A lent segment came back unused (its channel ended): it is credit
    /// again, without a new announcement.
    pub fn return_lent(&self, channel: usize, segment: Segment, floating: bool) {
        {
            let mut state = self.lock();
            let Some(c) = state.remote.get_mut(channel).and_then(Option::as_mut) else {
                return;
            };
            c.lent -= 1;
            if !floating {
                c.free.push((segment, false));
                return;
            }
        }
        // A floating segment goes back to the gate's pool, to a waiter first.
        self.recycle(channel, segment, true);
    }

    /// Credit a channel holds: free plus lent segments (tests of the balance).
    pub fn channel_credit(&self, channel: usize) -> usize {
        let state = self.lock();
        state
            .remote
            .get(channel)
            .and_then(Option::as_ref)
            .map_or(0, |c| c.free.len() + c.lent)
    }

    /// Queues a received buffer and borrows floating segments for the
    /// sender's backlog.
    pub fn push_remote(&self, channel: usize, item: GateItem, len: usize, backlog: u32) {
        self.remote_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let mut state = self.lock();
        if state.closed {
            return;
        }
        state.queue.push_back((channel, item));
        if let Some(c) = state.remote[channel].as_mut() {
            c.backlog = backlog;
        }
        grant_floating(&mut state, channel);
        // A driver's own push needs no wake of the driver: only the
        // condition variable of a task waiting on the network runtime.
        let wake = state.readers_waiting > 0 && !state.reader_notified;
        state.reader_notified |= wake;
        drop(state);
        if wake {
            self.readable.notify_one();
        }
    }

    /// The sender announced `backlog` buffers queued and no credit to send
    /// them with: lends it floating buffers for them, as a data buffer's
    /// backlog would.
    pub fn announce_backlog(&self, channel: usize, backlog: u32) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        match state.remote.get_mut(channel).and_then(Option::as_mut) {
            Some(c) => c.backlog = backlog,
            None => return,
        }
        grant_floating(&mut state, channel);
    }

    /// Returns a consumed segment to its channel or to the floating pool,
    /// re-announcing it as credit.
    fn recycle(&self, channel: usize, segment: Segment, floating: bool) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        if !floating {
            let c = state.remote[channel]
                .as_mut()
                .expect("exclusive segment of a local channel");
            c.free.push((segment, false));
            announce(c, 1);
            return;
        }
        state.floating.push(segment);
        while let Some(waiter) = state.floating_waiters.pop_front() {
            if let Some(c) = state.remote[waiter].as_mut() {
                c.waiting_for_floating = false;
            }
            if grant_floating(&mut state, waiter) || state.floating.is_empty() {
                break;
            }
        }
    }

    /// Pops the next item, waiting up to `timeout`.
    pub fn pop(&self, timeout: Duration) -> Result<Option<(usize, GateItem)>, NetworkError> {
        let mut state = self.lock();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(failure) = &state.failure {
                return Err(failure.clone());
            }
            let next = if state.blocked_count == 0 {
                state.queue.pop_front()
            } else {
                let blocked = &state.blocked;
                let i = state.queue.iter().position(|(c, _)| !blocked[*c]);
                i.and_then(|i| state.queue.remove(i))
            };
            if let Some((channel, item)) = next {
                if matches!(item, GateItem::Local(_)) {
                    state.local_queued[channel] -= 1;
                    let wake = state.local_writers_waiting > 0;
                    drop(state);
                    if wake {
                        self.writable.notify_all();
                    }
                }
                return Ok(Some((channel, item)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if let Some(driver) = self.driver.get() {
                // Task-read input: read the connections instead of waiting.
                state.driving = true;
                drop(state);
                driver.drive(self, deadline - now);
                state = self.lock();
                state.driving = false;
                continue;
            }
            state.readers_waiting += 1;
            state = self
                .readable
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            state.readers_waiting -= 1;
            state.reader_notified = false;
        }
    }

    /// Holds back `channel` until [`Self::unblock_all`] (barrier alignment).
    pub fn block_channel(&self, channel: usize) {
        let mut state = self.lock();
        if !std::mem::replace(&mut state.blocked[channel], true) {
            state.blocked_count += 1;
        }
    }

    /// Releases every blocked channel.
    pub fn unblock_all(&self) {
        let mut state = self.lock();
        if state.blocked_count == 0 {
            return;
        }
        state.blocked.iter_mut().for_each(|b| *b = false);
        state.blocked_count = 0;
        self.wake_reader(state);
    }

    /// Fails the gate: the consumer sees `error` at its next pop.
    pub fn fail(&self, error: NetworkError) {
        let mut state = self.lock();
        if state.failure.is_none() {
            state.failure = Some(error);
        }
        let driving = state.driving;
        drop(state);
        self.readable.notify_all();
        self.writable.notify_all();
        if driving && let Some(d) = self.driver.get() {
            d.wake();
        }
    }

    /// The consumer is done (or gone): drop queued data and release every
    /// producer waiting on a local channel.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.queue.clear();
        for c in state.remote.iter_mut().flatten() {
            if let Some(link) = &c.link {
                link.send(ControlMessage::CancelPartition {
                    channel_id: link.channel_id,
                });
            }
        }
        let driving = state.driving;
        drop(state);
        self.writable.notify_all();
        self.readable.notify_all();
        if driving && let Some(d) = self.driver.get() {
            d.wake();
        }
    }

    /// Exclusive plus floating buffers of the remote channels (what buffer
    /// debloating divides the in-flight budget by).
    pub fn remote_buffer_count(&self) -> usize {
        self.remote_buffer_total
    }

    /// Tells every remote channel's producer to cut buffers to `bytes`.
    pub fn announce_buffer_size(&self, bytes: usize) {
        let state = self.lock();
        for c in state.remote.iter().flatten() {
            if let Some(link) = &c.link {
                link.send(ControlMessage::BufferSize {
                    channel_id: link.channel_id,
                    size: bytes as u32,
                });
            }
        }
    }

    /// Segments held as credit or floating: for tests of the credit balance.
    pub fn free_segment_count(&self) -> usize {
        let state = self.lock();
        state.floating.len()
            + state
                .remote
                .iter()
                .flatten()
                .map(|c| c.free.len())
                .sum::<usize>()
    }

    /// Received buffers queued and not yet read, one segment each (for the
    /// simulator's segment balance).
    pub fn queued_remote_count(&self) -> usize {
        let state = self.lock();
        state
            .queue
            .iter()
            .filter(|(_, item)| matches!(item, GateItem::Remote { .. }))
            .count()
    }
}

/// Borrows floating segments until the channel holds enough for the
/// sender's backlog; returns whether its need is met.
fn grant_floating(state: &mut GateState, channel: usize) -> bool {
    let Some(c) = state.remote[channel].as_mut() else {
        return true;
    };
    let need = c.backlog as usize + c.exclusive_total;
    let mut granted = 0;
    while c.free.len() + c.lent < need {
        let Some(segment) = state.floating.pop() else {
            break;
        };
        c.free.push((segment, true));
        granted += 1;
    }
    announce(c, granted);
    let met = c.free.len() + c.lent >= need;
    if !met && !std::mem::replace(&mut c.waiting_for_floating, true) {
        state.floating_waiters.push_back(channel);
    }
    met
}

fn announce(c: &RemoteCredit, credit: u32) {
    if credit == 0 {
        return;
    }
    if let Some(link) = &c.link {
        link.send(ControlMessage::AddCredit {
            channel_id: link.channel_id,
            credit,
        });
    }
}

/// How long a reader of several gates waits on one before it looks at the
/// others again (a gate wakes only its own waiter).
const MULTI_GATE_WAIT: Duration = Duration::from_millis(1);

/// A remote buffer's event: decoded at once, or (IPC) copied out of its
/// segment to be decoded after the segment is recycled.
enum Decoded {
    Now(Result<StreamEvent, NetworkError>),
    Later(Buffer),
}

/// What a task reads from its inputs.
#[derive(Debug)]
pub enum InputEvent {
    Batch(RecordBatch),
    /// The minimum watermark over all channels advanced to this value.
    Watermark(i64),
    /// Every open channel delivered barrier `n` (aligned): snapshot now.
    Barrier(u64),
    /// Every channel of every gate has ended.
    End,
}

/// The task-side reader over one or more gates (one per input edge).
pub struct InputReader {
    gates: Vec<Arc<InputGate>>,
    /// IPC decoders of the channels that have delivered a remote buffer,
    /// made on the first: local channels (all of them when producers share
    /// the TaskManager) never need one, and a decoder is 128 bytes where a
    /// missing one is 8 (a thousand gates of a thousand channels each).
    decoders: Vec<Vec<Option<Box<ChannelDecoder>>>>,
    watermarks: Vec<Vec<i64>>,
    /// The minimum of `watermarks`, and how many channels hold it: a channel
    /// that leaves the minimum only decrements the count, and the minimum is
    /// recomputed when the count reaches zero. Each watermark or end of
    /// partition costs O(1) amortized instead of a scan of every channel,
    /// which with a thousand channels per gate made ending a gate O(n²).
    watermark_min: i64,
    at_watermark_min: usize,
    ended: Vec<Vec<bool>>,
    open_channels: usize,
    current_watermark: i64,
    next_gate: usize,
    /// Buffer debloating per gate, when enabled.
    debloaters: Vec<Option<Debloater>>,
    started: Instant,
    aligner: BarrierAligner,
    /// When the current alignment started, and how long the last one took
    /// (Flink's `checkpointAlignmentTime`).
    alignment_started: Option<Instant>,
    pub last_alignment: Duration,
    /// Events decided but not yet returned (an end of partition that also
    /// completes an alignment yields the barrier first).
    ready: VecDeque<InputEvent>,
}

impl InputReader {
    pub fn new(gates: Vec<Arc<InputGate>>) -> Self {
        let decoders = gates
            .iter()
            .map(|g| (0..g.channel_count()).map(|_| None).collect())
            .collect();
        let watermarks = gates
            .iter()
            .map(|g| vec![i64::MIN; g.channel_count()])
            .collect();
        let ended = gates
            .iter()
            .map(|g| vec![false; g.channel_count()])
            .collect();
        let open_channels = gates.iter().map(|g| g.channel_count()).sum();
        let counts: Vec<usize> = gates.iter().map(|g| g.channel_count()).collect();
        Self {
            aligner: BarrierAligner::new(&counts),
            alignment_started: None,
            last_alignment: Duration::ZERO,
            ready: VecDeque::new(),
            gates,
            decoders,
            watermarks,
            watermark_min: i64::MIN,
            at_watermark_min: open_channels,
            ended,
            open_channels,
            current_watermark: i64::MIN,
            next_gate: 0,
            debloaters: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Enables buffer debloating on every gate with remote channels.
    pub fn with_debloating(mut self, config: DebloatConfig) -> Self {
        self.debloaters = self
            .gates
            .iter()
            .map(|g| {
                let buffers = g.remote_buffer_count();
                (buffers > 0).then(|| Debloater::new(config, buffers))
            })
            .collect();
        self
    }

    /// Next event, or `None` after `timeout` with nothing to read.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<InputEvent>, NetworkError> {
        if let Some(event) = self.ready.pop_front() {
            return Ok(Some(event));
        }
        if self.open_channels == 0 {
            return Ok(Some(InputEvent::End));
        }
        let gate_count = self.gates.len();
        let deadline = Instant::now() + timeout;
        loop {
            // Poll gates round-robin; wait on the last one tried. With
            // several gates that wait is short: an item on another gate
            // must not sit until the whole timeout has passed.
            for attempt in 0..gate_count {
                let g = (self.next_gate + attempt) % gate_count;
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = match (attempt + 1 == gate_count, gate_count) {
                    (false, _) => Duration::ZERO,
                    (true, 1) => left,
                    (true, _) => left.min(MULTI_GATE_WAIT),
                };
                if let Some((channel, item)) = self.gates[g].pop(wait)? {
                    self.next_gate = (g + 1) % gate_count;
                    return self.on_item(g, channel, item);
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    fn on_item(
        &mut self,
        g: usize,
        channel: usize,
        item: GateItem,
    ) -> Result<Option<InputEvent>, NetworkError> {
        let event = match item {
            GateItem::Local(event) => event,
            GateItem::Remote {
                kind,
                segment,
                body,
                offset,
                len,
                floating,
            } => {
                // The segment is recycled before an IPC batch is decoded:
                // its credit goes back to the sender one decode earlier. A
                // payload still in its segment is copied out for that; one
                // read into memory of its own is decoded where it is.
                let decoded = match (kind, body) {
                    (BufferKind::Ipc, Some(body)) => Decoded::Later(body),
                    (BufferKind::Ipc, None) => {
                        Decoded::Later(Buffer::from(&segment.as_slice()[offset..offset + len]))
                    }
                    (_, Some(body)) => Decoded::Now(self.decode(g, channel, kind, &body)),
                    (_, None) => Decoded::Now(self.decode(
                        g,
                        channel,
                        kind,
                        &segment.as_slice()[offset..offset + len],
                    )),
                };
                if let Some(Some(d)) = self.debloaters.get_mut(g)
                    && let Some(size) = d.on_consumed(len, self.started.elapsed())
                {
                    tracing::debug!(
                        "gate {:?}: debloated buffer size {size} B",
                        self.gates[g].id
                    );
                    self.gates[g].announce_buffer_size(size);
                }
                self.gates[g].recycle(channel, segment, floating);
                match decoded {
                    Decoded::Now(event) => event?,
                    Decoded::Later(bytes) => {
                        let gate = self.gates[g].id;
                        self.decoder(g, channel)
                            .decode_buffer(bytes)
                            .map(StreamEvent::Batch)
                            .map_err(|e| NetworkError::Channel {
                                gate,
                                channel,
                                detail: e.to_string(),
                            })?
                    }
                }
            }
        };
        Ok(match event {
            StreamEvent::Batch(batch) => Some(InputEvent::Batch(batch)),
            StreamEvent::Watermark(wm) => {
                self.raise_channel_watermark(g, channel, wm);
                self.advance_watermark()
            }
            StreamEvent::Barrier(checkpoint) => {
                let step = self
                    .aligner
                    .on_barrier(g, channel, checkpoint)
                    .map_err(|e| NetworkError::Channel {
                        gate: self.gates[g].id,
                        channel,
                        detail: e.to_string(),
                    })?;
                if self.alignment_started.is_none() || step.subsumed.is_some() {
                    self.alignment_started = Some(Instant::now());
                }
                self.apply(step, Some((g, channel)))
            }
            StreamEvent::EndOfPartition => {
                if !std::mem::replace(&mut self.ended[g][channel], true) {
                    self.open_channels -= 1;
                    self.raise_channel_watermark(g, channel, i64::MAX);
                }
                let step = self.aligner.on_end(g, channel);
                let barrier = self.apply(step, None);
                let next = if self.open_channels == 0 {
                    Some(InputEvent::End)
                } else {
                    self.advance_watermark()
                };
                match (barrier, next) {
                    (Some(b), Some(n)) => {
                        self.ready.push_back(n);
                        Some(b)
                    }
                    (b, n) => b.or(n),
                }
            }
        })
    }

    /// Applies an alignment step to the gates; returns the barrier event
    /// when the alignment completed.
    fn apply(&mut self, step: AlignStep, from: Option<(usize, usize)>) -> Option<InputEvent> {
        if step.unblock_all {
            for gate in &self.gates {
                gate.unblock_all();
            }
        }
        if step.block
            && let Some((g, channel)) = from
        {
            self.gates[g].block_channel(channel);
        }
        let checkpoint = step.complete?;
        if let Some(t) = self.alignment_started.take() {
            self.last_alignment = t.elapsed();
        }
        Some(InputEvent::Barrier(checkpoint))
    }

    /// The coordinator aborted checkpoints up to `checkpoint`: stop
    /// aligning them and release the blocked channels.
    pub fn abort_checkpoint(&mut self, checkpoint: u64) {
        let step = self.aligner.abort(checkpoint);
        if step.unblock_all {
            self.alignment_started = None;
        }
        self.apply(step, None);
    }

    /// Raises one channel's watermark (watermarks never go back) and keeps
    /// the minimum over all channels current.
    fn raise_channel_watermark(&mut self, g: usize, channel: usize, wm: i64) {
        let slot = &mut self.watermarks[g][channel];
        let old = *slot;
        if wm <= old {
            return;
        }
        *slot = wm;
        if old != self.watermark_min {
            return;
        }
        self.at_watermark_min -= 1;
        if self.at_watermark_min == 0 {
            let all = self.watermarks.iter().flatten().copied();
            self.watermark_min = all.clone().min().unwrap_or(i64::MIN);
            self.at_watermark_min = all.filter(|w| *w == self.watermark_min).count();
        }
    }

    fn advance_watermark(&mut self) -> Option<InputEvent> {
        let min = self.watermark_min;
        (min > self.current_watermark && min != i64::MAX).then(|| {
            self.current_watermark = min;
            InputEvent::Watermark(min)
        })
    }

    fn decoder(&mut self, g: usize, channel: usize) -> &mut ChannelDecoder {
        self.decoders[g][channel].get_or_insert_with(Box::default)
    }

    fn decode(
        &mut self,
        g: usize,
        channel: usize,
        kind: BufferKind,
        payload: &[u8],
    ) -> Result<StreamEvent, NetworkError> {
        let gate = self.gates[g].id;
        let bad = |detail: String| NetworkError::Channel {
            gate,
            channel,
            detail,
        };
        match kind {
            BufferKind::Ipc => self
                .decoder(g, channel)
                .decode(payload)
                .map(StreamEvent::Batch)
                .map_err(|e| bad(e.to_string())),
            BufferKind::Watermark => {
                let bytes: [u8; 8] = payload
                    .try_into()
                    .map_err(|_| bad(format!("watermark of {} bytes", payload.len())))?;
                Ok(StreamEvent::Watermark(i64::from_be_bytes(bytes)))
            }
            BufferKind::Barrier => {
                let bytes: [u8; 8] = payload
                    .try_into()
                    .map_err(|_| bad(format!("barrier of {} bytes", payload.len())))?;
                Ok(StreamEvent::Barrier(u64::from_be_bytes(bytes)))
            }
            BufferKind::EndOfPartition => Ok(StreamEvent::EndOfPartition),
        }
    }

    /// Closes every gate (the task is done or failed).
    pub fn close(&self) {
        for g in &self.gates {
            g.close();
        }
    }

    pub fn remote_bytes(&self) -> u64 {
        self.gates
            .iter()
            .map(|g| g.remote_bytes.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, RecordBatch};

    fn batch(v: i64) -> StreamEvent {
        let column = Int64Array::from(vec![v]);
        StreamEvent::Batch(RecordBatch::try_from_iter([("v", Arc::new(column) as _)]).unwrap())
    }

    fn value(event: Option<InputEvent>) -> String {
        match event {
            Some(InputEvent::Batch(b)) => {
                use arrow_array::cast::AsArray;
                let v = b.column(0).as_primitive::<arrow_array::types::Int64Type>();
                format!("b{}", v.value(0))
            }
            Some(InputEvent::Barrier(n)) => format!("barrier{n}"),
            Some(InputEvent::Watermark(w)) => format!("wm{w}"),
            Some(InputEvent::End) => "end".into(),
            None => "none".into(),
        }
    }

    /// A gate of 4 KiB segments with 2 exclusive buffers per channel and
    /// `floating` per gate.
    fn gate(channels: &[ChannelKind], floating: usize) -> Arc<InputGate> {
        let pool = NetworkBufferPool::new(16, 4096);
        let id = GateId {
            job: 1,
            edge: 0,
            target_subtask: 0,
        };
        let buffers = GateBuffers {
            exclusive_per_channel: 2,
            floating_per_gate: floating,
            max_per_channel: 10,
        };
        InputGate::new(id, channels, buffers, &pool).unwrap()
    }

    fn two_local_channels() -> Arc<InputGate> {
        gate(&[ChannelKind::Local, ChannelKind::Local], 2)
    }

    /// A reader of two gates sees an item that arrives on the first gate
    /// while it waits on the second, long before its timeout.
    #[test]
    fn an_item_on_another_gate_ends_the_wait_of_a_two_gate_reader() {
        let (first, second) = (two_local_channels(), two_local_channels());
        let mut reader = InputReader::new(vec![Arc::clone(&first), Arc::clone(&second)]);
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            first.push_local(0, batch(7), &|| false).unwrap();
        });
        let started = Instant::now();
        let got = reader.next(Duration::from_secs(20)).unwrap();
        pusher.join().unwrap();
        assert_eq!(value(got), "b7");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "woke only at the timeout"
        );
    }

    #[test]
    fn local_channels_take_no_segments_and_remote_ones_are_counted() {
        let buffers = GateBuffers {
            exclusive_per_channel: 2,
            floating_per_gate: 8,
            max_per_channel: 10,
        };
        let local = vec![ChannelKind::Local; 1000];
        assert_eq!(GateDemand::of(&local, buffers).segment_count, 0);
        let mut mixed = vec![ChannelKind::Local; 500];
        mixed.extend([ChannelKind::Remote; 500]);
        let one = GateDemand::of(&mixed, buffers);
        assert_eq!(one.segment_count, 500 * 2 + 8);
        let two = one.plus(GateDemand::of(&local, buffers));
        assert_eq!((two.gate_count, two.remote_gate_count), (2, 1));
        assert_eq!(two.segment_count, 1008);
        // A thousand all-local gates fit in a pool of one segment.
        let pool = NetworkBufferPool::new(1, 4096);
        for subtask in 0..1000 {
            let id = GateId {
                job: 1,
                edge: 0,
                target_subtask: subtask,
            };
            InputGate::new(id, &local, buffers, &pool).unwrap();
        }
        assert_eq!(pool.available_count(), 1);
    }

    #[test]
    fn a_gate_short_of_segments_names_the_keys_and_the_memory_that_fits() {
        let pool = NetworkBufferPool::new(16, 64 << 10);
        let _held = pool.request_many(6).unwrap();
        let buffers = GateBuffers {
            exclusive_per_channel: 2,
            floating_per_gate: 8,
            max_per_channel: 10,
        };
        let id = GateId {
            job: 1,
            edge: 3,
            target_subtask: 7,
        };
        let channels = [ChannelKind::Remote; 500];
        let Err(error) = InputGate::new(id, &channels, buffers, &pool) else {
            panic!("a gate of 1008 segments fit in a pool of 16");
        };
        let NetworkError::InsufficientSegments(shortfall) = &error else {
            panic!("unexpected error {error}");
        };
        assert_eq!(shortfall.demand.segment_count, 1008);
        assert_eq!(shortfall.free_segment_count, 10);
        // 6 segments in use plus 1008 of 64 KiB: 63.375 MiB, rounded up.
        assert_eq!(shortfall.network_bytes_needed(), 64 << 20);
        let message = error.to_string();
        for needle in [
            "needs 1008 network segments of 64 KiB",
            "500 remote channel(s)",
            "buffers-per-channel = 2",
            "floating-buffers-per-gate = 8",
            "10 of its 16 segments (1 MiB) free",
            "taskmanager.memory.network.max to at least 64m",
            "subtask 7 on edge 3",
        ] {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
        // Nothing was taken: the failed gate left the pool as it was.
        assert_eq!(pool.available_count(), 10);
        let demand = GateDemand::of(&channels, buffers);
        assert!(demand.check_fits("job x".into(), buffers, &pool).is_err());
        assert!(
            GateDemand::default()
                .check_fits("job x".into(), buffers, &pool)
                .is_ok()
        );
    }

    #[test]
    fn the_watermark_is_the_minimum_over_channels_and_ended_channels_leave_it() {
        let gate = gate(&[ChannelKind::Local; 3], 0);
        let never = || false;
        for (channel, wm) in [(0, 5), (1, 7), (2, 3), (2, 9), (0, 8)] {
            gate.push_local(channel, StreamEvent::Watermark(wm), &never)
                .unwrap();
        }
        gate.push_local(1, StreamEvent::EndOfPartition, &never)
            .unwrap();
        gate.push_local(0, StreamEvent::Watermark(4), &never)
            .unwrap();
        gate.push_local(0, StreamEvent::EndOfPartition, &never)
            .unwrap();
        gate.push_local(2, StreamEvent::EndOfPartition, &never)
            .unwrap();
        let mut reader = InputReader::new(vec![Arc::clone(&gate)]);
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("end") {
            let event = value(reader.next(Duration::ZERO).unwrap());
            if event != "none" {
                seen.push(event);
            }
        }
        // Channel 2 holds the minimum until it rises to 9, then channel 0
        // (5, then 8) and channel 1 (7) do; channel 0's late 4 is below its
        // own 8 and changes nothing; once channels 1 and 0 end, channel 2's
        // 9 is the minimum; an all-ended gate emits no watermark of its own.
        assert_eq!(seen, ["wm3", "wm5", "wm7", "wm8", "wm9", "end"]);
    }

    #[test]
    fn an_announced_backlog_lends_floating_credit_up_to_the_pool() {
        let gate = gate(&[ChannelKind::Remote], 4);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let link = CreditLink::new(tx, 7);
        assert_eq!(gate.bind_remote(0, link), 2);
        gate.announce_backlog(0, 3);
        assert_eq!(gate.channel_credit(0), 5);
        assert_eq!(
            rx.try_recv().unwrap(),
            ControlMessage::AddCredit {
                channel_id: 7,
                credit: 3
            }
        );
        // The same backlog again lends nothing more; a larger one lends
        // what the gate's floating pool has left.
        gate.announce_backlog(0, 3);
        assert!(rx.try_recv().is_err());
        gate.announce_backlog(0, 9);
        assert_eq!(gate.channel_credit(0), 6);
        assert_eq!(
            rx.try_recv().unwrap(),
            ControlMessage::AddCredit {
                channel_id: 7,
                credit: 1
            }
        );
    }

    #[test]
    fn a_channel_that_delivered_the_barrier_waits_until_the_others_align() {
        let gate = two_local_channels();
        let never = || false;
        gate.push_local(0, batch(1), &never).unwrap();
        gate.push_local(0, StreamEvent::Barrier(1), &never).unwrap();
        gate.push_local(0, batch(2), &never).unwrap();
        gate.push_local(1, batch(10), &never).unwrap();
        gate.push_local(1, StreamEvent::Barrier(1), &never).unwrap();
        gate.push_local(1, batch(11), &never).unwrap();
        gate.push_local(0, StreamEvent::EndOfPartition, &never)
            .unwrap();
        gate.push_local(1, StreamEvent::EndOfPartition, &never)
            .unwrap();
        let mut reader = InputReader::new(vec![Arc::clone(&gate)]);
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("end") {
            let event = value(reader.next(Duration::ZERO).unwrap());
            if event != "none" {
                seen.push(event);
            }
        }
        // b2 (after channel 0's barrier) waits until channel 1 delivered
        // its barrier: everything before the aligned barrier is pre-barrier
        // data of both channels.
        assert_eq!(seen, ["b1", "b10", "barrier1", "b2", "b11", "end"]);
    }

    #[test]
    fn an_aborted_alignment_releases_the_blocked_channel() {
        let gate = two_local_channels();
        let never = || false;
        gate.push_local(0, StreamEvent::Barrier(3), &never).unwrap();
        gate.push_local(0, batch(5), &never).unwrap();
        let mut reader = InputReader::new(vec![Arc::clone(&gate)]);
        assert_eq!(value(reader.next(Duration::ZERO).unwrap()), "none");
        reader.abort_checkpoint(3);
        assert_eq!(value(reader.next(Duration::ZERO).unwrap()), "b5");
    }
}
