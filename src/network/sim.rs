//! A deterministic network simulator for the shuffle's credit-based flow
//! control, in the manner of TigerBeetle's VOPR: one seed decides everything.
//!
//! What it owns: the wire. Producers are real [`RecordWriter`]s over real
//! [`Subpartition`]s; consumers are real [`InputGate`]s read through real
//! [`InputReader`]s, which decode buffers and re-announce credit on their
//! credit links. The simulator stands in for `tcp.rs` only: per
//! connection (producer TaskManager → consumer TaskManager) it keeps a FIFO
//! of buffers one way and a FIFO of control messages the other way, each
//! message delayed by a seeded number of ticks. Messages on one connection
//! stay in order (as on a TCP stream or an RC queue pair); messages on
//! different connections overtake each other freely. The sender takes
//! buffers only through [`Subpartition::poll_next`], which enforces credit,
//! and applies `AddCredit` through [`Subpartition::add_credit`]. A sender
//! with buffers queued and no credit announces its backlog in the data
//! direction (`BacklogAnnouncement`), which the gate answers with floating
//! credit ([`InputGate::announce_backlog`]).
//!
//! Each consumer reads from every producer, or (`sparse`) from a seeded
//! subset. A producer task writes batch `seq` to its target `seq % targets`
//! (round-robin, as `Rebalance`) through one single-target writer per
//! target, so a consumer that is gone fails only its own channel; it blocks,
//! as the real one would, while that target's queue is full. Slow receivers
//! read rarely. With `loss`, one connection is cut after a seeded number of
//! delivered buffers: what was on it is lost, the gates of its channels fail
//! with `PeerLost` and the producer side releases its subpartitions, as
//! `tcp.rs` does on a broken socket. A failed consumer closes its reader,
//! which cancels its partitions on the other connections. A buffer that
//! then arrives for a failed gate is dropped, as `tcp.rs` does
//! ([`ReceivePolicy::DropBuffer`]); the old behaviour, ending the whole
//! connection, stays available to show the regression it caused.
//!
//! There are no threads, no sleeps and no wall clock: time is a tick
//! counter, randomness a SplitMix64 seeded from the config, and every
//! scheduling choice comes from it, so a seed replays the same run.
//!
//! Invariants, checked after every action:
//! 1. Credit balance per channel: free segments the gate holds for it ==
//!    the sender's credit + buffers on the wire + `AddCredit` on the wire.
//! 2. Segment balance per gate: free + floating + queued segments ==
//!    exclusive × channels + floating, and none went back to the pool.
//! 3. Exactly once and in order: each consumer sees every batch of every
//!    producer meant for it once, in sequence; a failed consumer saw a prefix.
//! 4. No deadlock: when no actor can make progress and the run is not over,
//!    the run fails; a consumer cut off must end with the `PeerLost` error.
//!
//! A failure names its seed. Replay one with
//! `STRATA_SIM_SEED=<n> cargo nextest run --lib sim`. `setup.rs` wires a
//! run; `tests.rs` runs many seeds, connection loss and the faults the
//! checker must catch.
//!
//! Limits: every channel is remote; partition requests are resolved at
//! start-up rather than sent over the wire; a producer applies credit to a
//! subpartition even after its end of partition (`tcp.rs` forgets it then),
//! so the balance holds to the end.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use tokio::sync::mpsc::UnboundedReceiver;

use super::NetworkError;
use super::frame::{BufferKind, ControlMessage};
use super::gate::{GateItem, InputEvent, InputGate, InputReader};
use super::partition::{OutBuffer, RecordWriter, Subpartition};
use crate::memory::{NetworkBufferPool, Segment};

const SEGMENT_SIZE_BYTES: usize = 4096;
/// Small batches encode to well under a segment, so each emit is one buffer.
const PAYLOAD_MAX_BYTES: usize = SEGMENT_SIZE_BYTES / 2;
const ROWS_PER_BATCH_MAX: usize = 4;
/// A run that has not ended by then is reported, not waited for.
const TICK_MAX: u64 = 2_000_000;
const MAX_PARALLELISM: u32 = 128;

/// One simulated shuffle: the topology, the buffer sizes and the faults.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub producers: usize,
    pub consumers: usize,
    /// TaskManagers on each side; task `i` runs on TaskManager `i % n`.
    pub task_managers: usize,
    pub batches_per_producer: usize,
    /// Exclusive segments per channel (`buffers-per-channel`).
    pub exclusive: usize,
    /// Floating segments per gate.
    pub floating: usize,
    /// Queued buffers per subpartition.
    pub max_per_channel: usize,
    /// Longest ordinary delay of one message on the wire.
    pub delay_max_ticks: u64,
    /// Some consumers read with low probability.
    pub slow_receivers: bool,
    /// Each consumer reads from a seeded subset of the producers rather
    /// than from all of them.
    pub sparse: bool,
    /// Cut one connection mid-transfer.
    pub loss: bool,
    /// What a buffer for an already-failed gate does to its connection.
    pub receive: ReceivePolicy,
    /// A deliberate defect, to show that the checker catches it.
    pub fault: Fault,
}

/// What the receive path does with a buffer for a gate that has already
/// failed (its channel's other connection broke).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceivePolicy {
    /// What `tcp.rs` `receive_one` did before this simulator found seed 19:
    /// `take_segment`'s error ends the whole connection and fails every
    /// gate bound to it (kept to show the regression).
    EndConnection,
    /// What `receive_one` does: drop the buffer of a failed gate; the gate's
    /// reader reports its own failure.
    DropBuffer,
}

/// Deliberate defects for tests of the checker itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The first `AddCredit` a consumer sends is lost on the wire.
    DropCreditMessage,
    /// Consumer 0 never reads.
    StalledConsumer,
}

impl SimConfig {
    /// A topology and sizing drawn from `seed`: 1-4 producers and consumers,
    /// 1-3 exclusive and 0-4 floating segments, slow receivers or not.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SplitMix64(seed ^ 0x5EED_C0DE);
        let producers = rng.range(1, 4);
        let consumers = rng.range(1, 4);
        Self {
            seed,
            producers,
            consumers,
            task_managers: rng.range(1, producers.max(consumers)),
            batches_per_producer: rng.range(4, 48),
            exclusive: rng.range(1, 3),
            floating: rng.range(0, 4),
            max_per_channel: rng.range(1, 4),
            delay_max_ticks: rng.range(0, 12) as u64,
            slow_receivers: rng.chance(1, 3),
            sparse: rng.chance(1, 2),
            loss: false,
            receive: ReceivePolicy::DropBuffer,
            fault: Fault::None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub ticks: u64,
    pub buffers_delivered: u64,
    pub credit_messages_delivered: u64,
    /// `BacklogAnnouncement`s delivered.
    pub backlog_announcements: u64,
    pub batches_received: u64,
    /// The most credit one channel held: above `exclusive` when it
    /// borrowed floating segments.
    pub channel_credit_max: usize,
    /// The connection cut, as (producer TaskManager, consumer TaskManager).
    pub cut: Option<(usize, usize)>,
    /// Consumers that ended with the connection-loss error.
    pub consumers_failed: Vec<usize>,
}

/// Which invariant a run broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invariant {
    Setup,
    CreditBalance,
    SegmentBalance,
    ExactlyOnceInOrder,
    ErrorSurfaced,
    ProducerPool,
    Protocol,
    Deadlock,
    Termination,
}

/// A broken invariant, with the seed that replays it.
#[derive(Debug, thiserror::Error)]
#[error(
    "seed={seed} tick={tick}: {invariant:?} violated: {detail} (replay: STRATA_SIM_SEED={seed} cargo nextest run --lib sim)"
)]
pub struct SimFailure {
    pub seed: u64,
    pub tick: u64,
    pub invariant: Invariant,
    pub detail: String,
}

/// Runs one simulation to its end, checking the invariants at every step.
pub fn run(config: SimConfig) -> Result<SimReport, SimFailure> {
    Sim::new(config)?.run()
}

/// SplitMix64: the whole run's randomness, from one seed. Shared with the
/// checkpoint simulator, so both replay a seed the same way.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n == 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
    pub(crate) fn range(&mut self, low: usize, high_inclusive: usize) -> usize {
        low + self.below((high_inclusive - low + 1) as u64) as usize
    }
    pub(crate) fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }
}

struct InFlight<T> {
    deliver_at: u64,
    message: T,
}

/// A data-direction message: a buffer with its backlog, or (no buffer) a
/// `BacklogAnnouncement` for a channel with buffers queued and no credit.
struct WireBuffer {
    channel_index: usize,
    buffer: Option<OutBuffer>,
    backlog: u32,
}

/// One direction pair between a producer and a consumer TaskManager.
struct Connection {
    source_tm: usize,
    target_tm: usize,
    channel_indices: Vec<usize>,
    data: VecDeque<InFlight<WireBuffer>>,
    control: VecDeque<InFlight<ControlMessage>>,
    /// Where the consumers' gates announce credit for this connection.
    control_rx: UnboundedReceiver<ControlMessage>,
    data_last_at: u64,
    control_last_at: u64,
    next_send: usize,
    cut: bool,
}

/// A producer → consumer channel; its index is its `channel_id` on the wire.
struct Channel {
    producer: usize,
    consumer: usize,
    /// Its index among the consumer's gate channels.
    gate_channel: usize,
    connection: usize,
    sub: Arc<Subpartition>,
    /// The next batch sequence number the consumer expects, and the step to
    /// the one after (the producer's target count).
    next_seq: usize,
    seq_step: usize,
    /// The backlog last announced while the channel had no credit; 0 once
    /// a buffer went out (as `tcp.rs` tracks it).
    announced_backlog: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Open,
    Finished,
    /// The consumer canceled or the connection broke.
    Gone,
}

struct Producer {
    /// Per target: its channel, a single-target writer and its state.
    channel_indices: Vec<usize>,
    writers: Vec<RecordWriter>,
    writer_states: Vec<WriterState>,
    pool: Arc<NetworkBufferPool>,
    next_seq: usize,
}

struct Consumer {
    gate: Arc<InputGate>,
    reader: InputReader,
    /// Holds exactly the gate's segments, so a lost one shows up here.
    pool: Arc<NetworkBufferPool>,
    slow: bool,
    outcome: Option<Result<(), NetworkError>>,
    /// A channel of its gate was on the cut connection before it ended.
    cut_off: bool,
    gate_failed: bool,
    closed: bool,
}

#[derive(Clone, Copy)]
enum Actor {
    Produce(usize),
    Send(usize),
    Deliver(usize),
    Consume(usize),
}

struct Sim {
    config: SimConfig,
    rng: SplitMix64,
    now: u64,
    channels: Vec<Channel>,
    /// `producer * consumers + consumer` → channel index, where linked.
    channel_of: Vec<Option<usize>>,
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    connections: Vec<Connection>,
    cut_after_buffers: Option<u64>,
    credit_dropped: bool,
    report: SimReport,
}

/// The gate item for a received buffer; the one place that builds it.
fn remote_item(kind: BufferKind, segment: Segment, len: usize, floating: bool) -> GateItem {
    GateItem::Remote {
        kind,
        segment,
        body: None,
        offset: 0,
        len,
        floating,
    }
}

fn pop_due<T>(queue: &mut VecDeque<InFlight<T>>, now: u64) -> Option<T> {
    if queue.front()?.deliver_at > now {
        return None;
    }
    queue.pop_front().map(|m| m.message)
}

/// The rows of batch `seq` of `producer`: (producer, seq, row) packed in one
/// value, so a consumer can tell where each row came from and in what order.
fn batch_values(producer: usize, seq: usize) -> Vec<i64> {
    let rows = 1 + (producer + seq) % ROWS_PER_BATCH_MAX;
    (0..rows)
        .map(|row| ((producer as i64) << 40) | ((seq as i64) << 8) | row as i64)
        .collect()
}

impl Sim {
    fn failure(&self, invariant: Invariant, detail: String) -> SimFailure {
        SimFailure {
            seed: self.config.seed,
            tick: self.now,
            invariant,
            detail,
        }
    }

    fn run(mut self) -> Result<SimReport, SimFailure> {
        self.check()?;
        while !self.is_over() {
            if self.now >= TICK_MAX {
                let state = self.describe();
                return Err(self.failure(Invariant::Termination, state));
            }
            self.now += 1;
            // Nothing moved and nothing is on the wire: give every actor a
            // turn; if still nothing moves, nothing ever will.
            if !self.tick(false)? && self.wire_is_empty() && !self.is_over() && !self.tick(true)? {
                let state = self.describe();
                return Err(self.failure(Invariant::Deadlock, state));
            }
        }
        self.check_outcomes()?;
        self.report.ticks = self.now;
        Ok(self.report)
    }

    /// One tick: each actor, in a seeded order, acts with its probability
    /// (always when `forced`). Returns whether anything changed.
    fn tick(&mut self, forced: bool) -> Result<bool, SimFailure> {
        let mut actors: Vec<Actor> = (0..self.producers.len())
            .map(Actor::Produce)
            .chain((0..self.connections.len()).map(Actor::Send))
            .chain((0..self.connections.len()).map(Actor::Deliver))
            .chain((0..self.consumers.len()).map(Actor::Consume))
            .collect();
        for i in (1..actors.len()).rev() {
            actors.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        let mut progressed = false;
        for actor in actors {
            let (numerator, denominator) = match actor {
                Actor::Consume(c) if self.consumers[c].slow => (1, 12),
                Actor::Deliver(_) => (1, 1),
                _ => (3, 4),
            };
            if !forced && !self.rng.chance(numerator, denominator) {
                continue;
            }
            progressed |= match actor {
                Actor::Produce(p) => self.produce(p)?,
                Actor::Send(k) => self.send(k),
                Actor::Deliver(k) => self.deliver(k)?,
                Actor::Consume(c) => self.consume(c)?,
            };
            self.drain_control();
            self.maybe_cut();
            let held = self.check()?;
            self.report.channel_credit_max = self.report.channel_credit_max.max(held);
        }
        Ok(progressed)
    }

    fn is_over(&self) -> bool {
        self.consumers.iter().all(|c| c.outcome.is_some())
            && self.producers.iter().all(|p| {
                p.next_seq >= self.config.batches_per_producer
                    && !p.writer_states.contains(&WriterState::Open)
            })
            && self.wire_is_empty()
    }

    fn wire_is_empty(&self) -> bool {
        self.connections
            .iter()
            .all(|k| k.data.is_empty() && k.control.is_empty())
    }

    /// A seeded delay, now and then a long one; never before the message
    /// ahead of it on the same connection.
    fn deliver_at(&mut self, last_at: u64) -> u64 {
        let mut delay = self.rng.below(self.config.delay_max_ticks + 1);
        if self.rng.chance(1, 64) {
            delay += 8 * (self.config.delay_max_ticks + 1);
        }
        (self.now + delay).max(last_at)
    }

    /// The producer task: emits its next batch, or finishes its channels.
    fn produce(&mut self, p: usize) -> Result<bool, SimFailure> {
        let producer = &self.producers[p];
        let seq = producer.next_seq;
        let emitting = seq < self.config.batches_per_producer;
        let slot = if emitting {
            seq % producer.writers.len()
        } else {
            // `finish` reaches the targets in order, as the writer's broadcast.
            let open = producer
                .writer_states
                .iter()
                .position(|s| *s == WriterState::Open);
            let Some(slot) = open else {
                return Ok(false);
            };
            slot
        };
        if producer.writer_states[slot] == WriterState::Gone {
            self.producers[p].next_seq += 1;
            return Ok(true);
        }
        // `emit` and `finish` would wait for room; the sim tries later.
        let sub = &self.channels[producer.channel_indices[slot]].sub;
        if sub.queued() >= self.config.max_per_channel {
            return Ok(false);
        }
        if !emitting {
            let result = self.producers[p].writers[slot].finish();
            return self.on_write(p, slot, result, WriterState::Finished);
        }
        if producer.pool.available_count() == 0 {
            let detail = format!("producer {p} has no free segment: emit would block");
            return Err(self.failure(Invariant::ProducerPool, detail));
        }
        let values = Int64Array::from(batch_values(p, seq));
        let batch = RecordBatch::try_from_iter([("v", Arc::new(values) as ArrayRef)])
            .map_err(|e| self.failure(Invariant::Setup, e.to_string()))?;
        let result = self.producers[p].writers[slot].emit(batch);
        self.producers[p].next_seq += 1;
        self.on_write(p, slot, result, WriterState::Open)
    }

    fn on_write(
        &mut self,
        p: usize,
        slot: usize,
        result: Result<(), NetworkError>,
        next: WriterState,
    ) -> Result<bool, SimFailure> {
        let state = match result {
            Ok(()) => next,
            Err(NetworkError::ConsumerGone) => WriterState::Gone,
            Err(e) => {
                let detail = format!("producer {p} writing to its target #{slot}: {e}");
                return Err(self.failure(Invariant::Protocol, detail));
            }
        };
        self.producers[p].writer_states[slot] = state;
        Ok(true)
    }

    /// The producer TaskManager's data server: sends the next buffer that
    /// has credit, round-robin over the connection's channels.
    fn send(&mut self, k: usize) -> bool {
        let connection = &self.connections[k];
        if connection.cut {
            return false;
        }
        let n = connection.channel_indices.len();
        for i in 0..n {
            let slot = (connection.next_send + i) % n;
            let channel_index = connection.channel_indices[slot];
            let Some((buffer, backlog)) = self.channels[channel_index].sub.poll_next() else {
                continue;
            };
            self.channels[channel_index].announced_backlog = 0;
            let deliver_at = self.deliver_at(self.connections[k].data_last_at);
            let connection = &mut self.connections[k];
            connection.next_send = slot + 1;
            connection.data_last_at = deliver_at;
            connection.data.push_back(InFlight {
                deliver_at,
                message: WireBuffer {
                    channel_index,
                    buffer: Some(buffer),
                    backlog,
                },
            });
            return true;
        }
        // Nothing to send: announce the backlog of a channel that has
        // buffers but no credit, as `tcp.rs` `starved_backlogs` does.
        for slot in 0..n {
            let channel_index = self.connections[k].channel_indices[slot];
            let channel = &mut self.channels[channel_index];
            let Some(backlog) = channel.sub.starved_backlog() else {
                continue;
            };
            if backlog <= channel.announced_backlog {
                continue;
            }
            channel.announced_backlog = backlog;
            let deliver_at = self.deliver_at(self.connections[k].data_last_at);
            let connection = &mut self.connections[k];
            connection.data_last_at = deliver_at;
            connection.data.push_back(InFlight {
                deliver_at,
                message: WireBuffer {
                    channel_index,
                    buffer: None,
                    backlog,
                },
            });
            return true;
        }
        false
    }

    /// Delivers the due message at the head of each direction.
    fn deliver(&mut self, k: usize) -> Result<bool, SimFailure> {
        let data = pop_due(&mut self.connections[k].data, self.now);
        let control = pop_due(&mut self.connections[k].control, self.now);
        let progressed = data.is_some() || control.is_some();
        if let Some(buffer) = data {
            self.receive_buffer(k, buffer)?;
        }
        // A receive error may have cut the connection: the message is lost.
        if let Some(message) = control.filter(|_| !self.connections[k].cut) {
            self.receive_control(message)?;
        }
        Ok(progressed)
    }

    /// The consumer TaskManager's receive path, as `tcp.rs` `receive_one`.
    fn receive_buffer(&mut self, k: usize, wire: WireBuffer) -> Result<(), SimFailure> {
        let channel = &self.channels[wire.channel_index];
        let gate_channel = channel.gate_channel;
        let gate = Arc::clone(&self.consumers[channel.consumer].gate);
        let Some(buffer) = wire.buffer else {
            gate.announce_backlog(gate_channel, wire.backlog);
            self.report.backlog_announcements += 1;
            return Ok(());
        };
        let len = buffer.payload.len();
        match gate.take_segment(gate_channel) {
            Ok((mut segment, floating)) => {
                if len > segment.capacity() {
                    let detail =
                        format!("a {len}-byte buffer for a {SEGMENT_SIZE_BYTES}-byte segment");
                    return Err(self.failure(Invariant::Protocol, detail));
                }
                let mut at = 0;
                for slice in buffer.payload.slices() {
                    segment.as_mut_slice()[at..at + slice.len()].copy_from_slice(slice);
                    at += slice.len();
                }
                let item = remote_item(buffer.kind, segment, len, floating);
                gate.push_remote(gate_channel, item, len, wire.backlog);
                self.report.buffers_delivered += 1;
                Ok(())
            }
            Err(error) => {
                if self.config.receive == ReceivePolicy::EndConnection {
                    self.cut(k, error, false);
                }
                Ok(())
            }
        }
    }

    /// The producer TaskManager's control path, as `tcp.rs` `serve_connection`.
    fn receive_control(&mut self, message: ControlMessage) -> Result<(), SimFailure> {
        match message {
            ControlMessage::AddCredit { channel_id, credit } => {
                self.channels[channel_id as usize].sub.add_credit(credit);
                self.report.credit_messages_delivered += 1;
            }
            ControlMessage::CancelPartition { channel_id } => {
                self.channels[channel_id as usize]
                    .sub
                    .release("consumer canceled the partition");
            }
            other => {
                let detail = format!("unexpected control message {other:?}");
                return Err(self.failure(Invariant::Protocol, detail));
            }
        }
        Ok(())
    }

    /// The consumer task: reads one event.
    fn consume(&mut self, c: usize) -> Result<bool, SimFailure> {
        let stalled = self.config.fault == Fault::StalledConsumer && c == 0;
        let consumer = &mut self.consumers[c];
        if consumer.outcome.is_some() || stalled {
            return Ok(false);
        }
        let queued = consumer.gate.queued_remote_count();
        match consumer.reader.next(Duration::ZERO) {
            Ok(Some(InputEvent::Batch(batch))) => {
                self.report.batches_received += 1;
                self.check_batch(c, &batch)?;
                Ok(true)
            }
            Ok(Some(InputEvent::End)) => {
                consumer.outcome = Some(Ok(()));
                Ok(true)
            }
            Ok(Some(InputEvent::Watermark(_) | InputEvent::Barrier(_))) => Ok(true),
            // An end of partition that did not end the gate.
            Ok(None) => Ok(queued > 0),
            Err(error) => {
                // A failed task closes its inputs: that cancels its partitions.
                consumer.reader.close();
                consumer.closed = true;
                consumer.outcome = Some(Err(error));
                Ok(true)
            }
        }
    }

    fn check_batch(&mut self, c: usize, batch: &RecordBatch) -> Result<(), SimFailure> {
        let values: Vec<i64> = match batch.column(0).as_primitive_opt::<Int64Type>() {
            Some(array) => array.values().to_vec(),
            None => Vec::new(),
        };
        let producer = values.first().map_or(usize::MAX, |v| (v >> 40) as usize);
        let index = (producer < self.config.producers)
            .then(|| self.channel_of[producer * self.config.consumers + c])
            .flatten();
        let Some(index) = index else {
            let detail = format!("consumer {c} read a batch of no producer of its: {values:?}");
            return Err(self.failure(Invariant::ExactlyOnceInOrder, detail));
        };
        let channel = &mut self.channels[index];
        let seq = channel.next_seq;
        if seq >= self.config.batches_per_producer || values != batch_values(producer, seq) {
            let detail = format!(
                "consumer {c} expected batch #{seq} of producer {producer}, read {values:?}"
            );
            return Err(self.failure(Invariant::ExactlyOnceInOrder, detail));
        }
        channel.next_seq += channel.seq_step;
        Ok(())
    }

    /// Moves credit announcements from the gates onto the wire.
    fn drain_control(&mut self) {
        for k in 0..self.connections.len() {
            while let Ok(message) = self.connections[k].control_rx.try_recv() {
                let is_credit = matches!(message, ControlMessage::AddCredit { .. });
                if is_credit
                    && self.config.fault == Fault::DropCreditMessage
                    && !self.credit_dropped
                {
                    self.credit_dropped = true;
                    continue;
                }
                if self.connections[k].cut {
                    continue;
                }
                let deliver_at = self.deliver_at(self.connections[k].control_last_at);
                let connection = &mut self.connections[k];
                connection.control_last_at = deliver_at;
                connection.control.push_back(InFlight {
                    deliver_at,
                    message,
                });
            }
        }
    }

    fn maybe_cut(&mut self) {
        let Some(after) = self.cut_after_buffers else {
            return;
        };
        if self.report.cut.is_some() || self.report.buffers_delivered < after {
            return;
        }
        let k = self.rng.below(self.connections.len() as u64) as usize;
        let connection = &self.connections[k];
        self.report.cut = Some((connection.source_tm, connection.target_tm));
        let error = NetworkError::PeerLost {
            peer: format!("tm-{}", connection.source_tm),
            reason: format!("simulated connection loss at tick {}", self.now),
        };
        self.cut(k, error, true);
    }

    /// The connection breaks: what was on it is lost, the gates of its
    /// channels fail and the producer side releases its subpartitions.
    /// `cut_off` marks the consumers that must end with the error.
    fn cut(&mut self, k: usize, error: NetworkError, cut_off: bool) {
        let connection = &mut self.connections[k];
        if std::mem::replace(&mut connection.cut, true) {
            return;
        }
        connection.data.clear();
        connection.control.clear();
        for &index in &connection.channel_indices {
            let channel = &self.channels[index];
            channel.sub.release("consumer connection closed");
            let consumer = &mut self.consumers[channel.consumer];
            consumer.gate.fail(error.clone());
            consumer.gate_failed = true;
            consumer.cut_off |= cut_off && consumer.outcome.is_none();
        }
    }

    /// Invariants 1 and 2, on every channel and gate still in service;
    /// returns the most credit one channel holds.
    fn check(&self) -> Result<usize, SimFailure> {
        let mut held_max = 0;
        for (index, channel) in self.channels.iter().enumerate() {
            let consumer = &self.consumers[channel.consumer];
            let connection = &self.connections[channel.connection];
            if connection.cut || consumer.gate_failed {
                continue;
            }
            let held = consumer.gate.channel_credit(channel.gate_channel);
            held_max = held_max.max(held);
            let sender = channel.sub.credit() as usize;
            let buffers = connection
                .data
                .iter()
                .filter(|m| m.message.channel_index == index && m.message.buffer.is_some())
                .count();
            let credit: usize = connection
                .control
                .iter()
                .map(|m| match m.message {
                    ControlMessage::AddCredit { channel_id, credit }
                        if channel_id as usize == index =>
                    {
                        credit as usize
                    }
                    _ => 0,
                })
                .sum();
            if held != sender + buffers + credit {
                let detail = format!(
                    "channel {} → {}: the gate holds {held} credit but the sender has {sender}, {buffers} buffers and {credit} credit are on the wire",
                    channel.producer, channel.consumer
                );
                return Err(self.failure(Invariant::CreditBalance, detail));
            }
        }
        for (c, consumer) in self.consumers.iter().enumerate() {
            if consumer.closed {
                continue;
            }
            let total =
                consumer.gate.channel_count() * self.config.exclusive + self.config.floating;
            let free = consumer.gate.free_segment_count();
            let queued = consumer.gate.queued_remote_count();
            let dropped = consumer.pool.available_count();
            if free + queued != total || dropped != 0 {
                let detail = format!(
                    "gate {c}: {free} free + {queued} queued != {total} segments ({dropped} went back to the pool)"
                );
                return Err(self.failure(Invariant::SegmentBalance, detail));
            }
        }
        Ok(held_max)
    }

    /// At the end: every consumer cut off saw `PeerLost`; every other one
    /// ended normally with every batch meant for it.
    fn check_outcomes(&mut self) -> Result<(), SimFailure> {
        for (c, consumer) in self.consumers.iter().enumerate() {
            match (&consumer.outcome, consumer.cut_off) {
                (Some(Err(NetworkError::PeerLost { .. })), true) => {
                    self.report.consumers_failed.push(c);
                }
                (Some(Ok(())), false) => {
                    let short = self.channels.iter().find(|ch| {
                        ch.consumer == c && ch.next_seq < self.config.batches_per_producer
                    });
                    if let Some(ch) = short {
                        let detail = format!(
                            "consumer {c} ended without batch #{} of producer {}",
                            ch.next_seq, ch.producer
                        );
                        return Err(self.failure(Invariant::ExactlyOnceInOrder, detail));
                    }
                }
                (outcome, cut_off) => {
                    let detail = format!(
                        "consumer {c} (cut off: {cut_off}) ended with {:?}",
                        outcome
                            .as_ref()
                            .map(|r| r.as_ref().map_err(ToString::to_string))
                    );
                    return Err(self.failure(Invariant::ErrorSurfaced, detail));
                }
            }
        }
        Ok(())
    }

    /// The state of every channel, for a deadlock report.
    fn describe(&self) -> String {
        let mut out = String::new();
        for ch in &self.channels {
            let consumer = &self.consumers[ch.consumer];
            let _ = write!(
                out,
                "[{}→{} queued={} sender_credit={} gate_credit={} gate_queued={} ended={}] ",
                ch.producer,
                ch.consumer,
                ch.sub.queued(),
                ch.sub.credit(),
                consumer.gate.channel_credit(ch.gate_channel),
                consumer.gate.queued_remote_count(),
                consumer.outcome.is_some(),
            );
        }
        out
    }
}

mod setup;
#[cfg(test)]
mod tests;
