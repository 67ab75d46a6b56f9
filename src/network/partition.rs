//! Result partitions: the producer side of an edge.
//!
//! A [`RecordWriter`] routes each batch to target subtasks (forward, hash by
//! key group, rebalance, global) and hands the pieces to local channels or
//! to [`Subpartition`]s, whose buffers the data server sends under credit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, RecordBatch, UInt32Array};
use arrow_buffer::Buffer;
use arrow_select::take::take_record_batch;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::frame::BufferKind;
use super::gate::InputGate;
use super::ipc::{ChannelEncoder, Piece};
use super::{NetworkError, PartitionId, StreamEvent};
use crate::kernels::cpu::hash::{hash_columns, subtask_for_hash};
use crate::memory::{NetworkBufferPool, Segment};

/// How an edge routes rows to the consumer's subtasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Partitioner {
    /// Producer subtask i feeds consumer subtask i (equal parallelism).
    Forward,
    /// By key group of the stable hash of the key columns.
    Hash { key_columns: Vec<usize> },
    /// Whole batches round-robin over consumers.
    Rebalance,
    /// Everything to consumer subtask 0.
    Global,
}

impl Partitioner {
    pub fn name(&self) -> &'static str {
        match self {
            Partitioner::Forward => "FORWARD",
            Partitioner::Hash { .. } => "HASH",
            Partitioner::Rebalance => "REBALANCE",
            Partitioner::Global => "GLOBAL",
        }
    }
}

/// A buffer waiting in a subpartition.
pub struct OutBuffer {
    pub kind: BufferKind,
    pub payload: Payload,
}

pub enum Payload {
    Segment {
        segment: Segment,
        len: usize,
    },
    Inline {
        bytes: [u8; 8],
        len: usize,
    },
    /// An IPC message left in Arrow buffers ([`Piece::Parts`]): TCP sends it
    /// from them; the segment is its budget, and where verbs copies it.
    Parts {
        segment: Segment,
        parts: Vec<Buffer>,
        len: usize,
    },
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Segment { len, .. }
            | Payload::Inline { len, .. }
            | Payload::Parts { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload's bytes, in order, in one or more slices.
    pub fn slices(&self) -> Slices<'_> {
        let (one, parts): (Option<&[u8]>, &[Buffer]) = match self {
            Payload::Segment { segment, len } => (Some(&segment.as_slice()[..*len]), &[]),
            Payload::Inline { bytes, len } => (Some(&bytes[..*len]), &[]),
            Payload::Parts { parts, .. } => (None, parts),
        };
        Slices {
            one,
            parts: parts.iter(),
        }
    }

    /// CRC-32C of the payload.
    pub fn crc32c(&self) -> u32 {
        self.slices().fold(0, crc32c::crc32c_append)
    }

    /// The payload in one slice: Arrow parts are first copied into their
    /// segment (verbs writes from registered memory only).
    pub fn into_contiguous(self) -> Self {
        match self {
            Payload::Parts {
                mut segment,
                parts,
                len,
            } => {
                let room = segment.as_mut_slice();
                let mut at = 0;
                for part in &parts {
                    room[at..at + part.len()].copy_from_slice(part);
                    at += part.len();
                }
                Payload::Segment { segment, len }
            }
            other => other,
        }
    }

    /// The bytes of a contiguous payload; `None` for Arrow parts (see
    /// [`Payload::into_contiguous`]).
    pub fn as_slice(&self) -> Option<&[u8]> {
        match self {
            Payload::Segment { segment, len } => Some(&segment.as_slice()[..*len]),
            Payload::Inline { bytes, len } => Some(&bytes[..*len]),
            Payload::Parts { .. } => None,
        }
    }
}

/// A payload's slices (a named type: a sender holds it across awaits).
pub struct Slices<'a> {
    one: Option<&'a [u8]>,
    parts: std::slice::Iter<'a, Buffer>,
}

impl<'a> Iterator for Slices<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self.one.take() {
            Some(one) => Some(one),
            None => self.parts.next().map(Buffer::as_slice),
        }
    }
}

struct SubState {
    queue: VecDeque<OutBuffer>,
    credit: u32,
    waker: Option<Arc<Notify>>,
    released: Option<String>,
    /// Producers blocked on a full queue: only then does taking a buffer
    /// signal the condition variable (a futex call per buffer otherwise).
    producers_waiting: u32,
    /// A waiting producer was notified and has not run yet.
    producer_notified: bool,
}

/// One target's queue of encoded buffers, drained by the data server.
pub struct Subpartition {
    capacity: usize,
    /// Buffer debloating: the most payload bytes per buffer the consumer
    /// asked for; 0 until it asks (whole segments).
    buffer_size: AtomicUsize,
    /// Whether sent buffers carry a CRC-32C of their payload
    /// (`taskmanager.network.checksum.enabled`).
    checksum: AtomicBool,
    state: Mutex<SubState>,
    space: Condvar,
}

impl Subpartition {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            buffer_size: AtomicUsize::new(0),
            checksum: AtomicBool::new(false),
            state: Mutex::new(SubState {
                queue: VecDeque::new(),
                credit: 0,
                waker: None,
                released: None,
                producers_waiting: 0,
                producer_notified: false,
            }),
            space: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a buffer, waiting while the queue is full.
    fn push(
        &self,
        buffer: OutBuffer,
        canceled: &dyn Fn() -> bool,
    ) -> Result<Duration, NetworkError> {
        let mut state = self.lock();
        let mut blocked_since = None;
        while state.queue.len() >= self.capacity && state.released.is_none() {
            if canceled() {
                return Err(NetworkError::Canceled);
            }
            blocked_since.get_or_insert_with(Instant::now);
            state.producers_waiting += 1;
            state = self
                .space
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            state.producers_waiting -= 1;
            state.producer_notified = false;
        }
        if state.released.is_some() {
            return Err(NetworkError::ConsumerGone);
        }
        state.queue.push_back(buffer);
        // The sender needs waking only when it may send this buffer, or
        // must announce a backlog (the first buffer queued without credit);
        // otherwise a credit wakes it.
        let queued = state.queue.len();
        let sendable = state.credit as usize >= queued || (state.credit == 0 && queued == 1);
        let waker = state.waker.clone().filter(|_| sendable);
        drop(state);
        if let Some(w) = waker {
            w.notify_one();
        }
        Ok(blocked_since.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    /// The consumer's connection attached: credit starts at its initial value.
    pub fn attach(&self, waker: Arc<Notify>, initial_credit: u32) {
        let mut state = self.lock();
        state.credit = initial_credit;
        state.waker = Some(Arc::clone(&waker));
        drop(state);
        waker.notify_one();
    }

    pub fn add_credit(&self, credit: u32) {
        let mut state = self.lock();
        state.credit = state.credit.saturating_add(credit);
        // With nothing queued the sender has nothing to send: the next push
        // wakes it.
        let waker = state.waker.clone().filter(|_| !state.queue.is_empty());
        drop(state);
        if let Some(w) = waker {
            w.notify_one();
        }
    }

    /// Takes the next buffer if the consumer has credit for it; returns it
    /// with the backlog left behind it.
    pub fn poll_next(&self) -> Option<(OutBuffer, u32)> {
        let mut state = self.lock();
        if state.credit == 0 {
            return None;
        }
        let buffer = state.queue.pop_front()?;
        state.credit -= 1;
        let backlog = state.queue.len() as u32;
        // A blocked producer wakes when half the queue is free, not on every
        // buffer: it then fills the queue in one burst.
        let wake = state.producers_waiting > 0
            && !state.producer_notified
            && state.queue.len() <= self.capacity / 2;
        state.producer_notified |= wake;
        drop(state);
        if wake {
            self.space.notify_one();
        }
        Some((buffer, backlog))
    }

    /// The queued buffers when there are some but no credit to send them
    /// with (what a `BacklogAnnouncement` tells the consumer).
    pub fn starved_backlog(&self) -> Option<u32> {
        let state = self.lock();
        (state.credit == 0 && !state.queue.is_empty()).then_some(state.queue.len() as u32)
    }

    /// The consumer is gone: drop queued data and fail later pushes.
    pub fn release(&self, reason: &str) {
        let mut state = self.lock();
        state.queue.clear();
        state.released.get_or_insert_with(|| reason.to_owned());
        drop(state);
        self.space.notify_all();
    }

    /// The consumer's debloated buffer size (payload bytes per buffer).
    pub fn set_buffer_size(&self, bytes: usize) {
        self.buffer_size.store(bytes, Ordering::Relaxed);
    }

    pub fn buffer_size(&self) -> Option<usize> {
        match self.buffer_size.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Makes every buffer sent from now on carry a CRC-32C of its payload,
    /// which the consumer verifies.
    pub fn set_checksum(&self, enabled: bool) {
        self.checksum.store(enabled, Ordering::Relaxed);
    }

    pub fn checksum(&self) -> bool {
        self.checksum.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn credit(&self) -> u32 {
        self.lock().credit
    }
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

/// A producer subtask's remote subpartitions on one edge, by target index
/// (`None` where the target is local).
pub struct ResultPartition {
    pub id: PartitionId,
    pub subpartitions: Vec<Option<Arc<Subpartition>>>,
}

impl ResultPartition {
    pub fn release(&self, reason: &str) {
        for s in self.subpartitions.iter().flatten() {
            s.release(reason);
        }
    }
}

/// Where one target subtask is reached.
pub enum Target {
    Local {
        gate: Arc<InputGate>,
        channel: usize,
    },
    Remote {
        sub: Arc<Subpartition>,
        encoder: Box<ChannelEncoder>,
    },
}

/// Exchange counters of one writer, shared with the task's metrics.
#[derive(Default, Debug)]
pub struct WriterMetrics {
    pub remote_bytes: AtomicU64,
    pub remote_buffers: AtomicU64,
    pub local_rows: AtomicU64,
    pub backpressure_nanos: AtomicU64,
}

/// Writes a task's output on one edge.
pub struct RecordWriter {
    partitioner: Partitioner,
    targets: Vec<Target>,
    max_parallelism: u32,
    pool: Arc<NetworkBufferPool>,
    canceled: Arc<dyn Fn() -> bool + Send + Sync>,
    metrics: Arc<WriterMetrics>,
    splitter: HashSplitter,
    next_target: usize,
}

/// Splits batches by the hash of their key columns into one piece per
/// target subtask (Flink's key groups): the rows are hashed a column at a
/// time, grouped by target with a counting sort, and each target's rows
/// gathered with one `take`.
#[derive(Default)]
pub struct HashSplitter {
    /// The key columns' indices in the batches split.
    key_columns: Vec<usize>,
    hashes: Vec<u64>,
    /// A hashed batch's row indices grouped by target, and where each
    /// target's group starts: O(rows + targets) memory per writer, where a
    /// vector per target would hold a thousand allocations in each of a
    /// thousand writers at parallelism 1000.
    grouped_rows: Vec<u32>,
    group_starts: Vec<u32>,
}

impl HashSplitter {
    /// A splitter by the columns `key_columns` of its batches.
    pub fn new(key_columns: Vec<usize>) -> Self {
        HashSplitter {
            key_columns,
            ..Default::default()
        }
    }

    /// Calls `send(target, piece)` for each target that gets rows of
    /// `batch`, in target order; rows keep their order within a piece.
    pub fn split(
        &mut self,
        batch: &RecordBatch,
        max_parallelism: u32,
        parallelism: usize,
        send: impl FnMut(usize, RecordBatch) -> Result<(), NetworkError>,
    ) -> Result<(), NetworkError> {
        let keys: Vec<ArrayRef> = self
            .key_columns
            .iter()
            .map(|&i| Arc::clone(batch.column(i)))
            .collect();
        hash_columns(&keys, &mut self.hashes).map_err(|e| NetworkError::Encode(e.to_string()))?;
        group_rows_by_target(
            &self.hashes,
            |h| subtask_for_hash(h, max_parallelism, parallelism as u32),
            parallelism,
            &mut self.grouped_rows,
            &mut self.group_starts,
        );
        self.send_groups(batch, parallelism, send)
    }

    /// As [`HashSplitter::split`] for rows whose target subtasks were
    /// computed already (a GPU chain's device hash, `targets[row] <
    /// parallelism`): grouped by target without hashing.
    pub fn split_routed(
        &mut self,
        batch: &RecordBatch,
        targets: &[u32],
        parallelism: usize,
        send: impl FnMut(usize, RecordBatch) -> Result<(), NetworkError>,
    ) -> Result<(), NetworkError> {
        assert_eq!(targets.len(), batch.num_rows(), "one target per row");
        group_rows_by_target(
            targets,
            |t| t,
            parallelism,
            &mut self.grouped_rows,
            &mut self.group_starts,
        );
        self.send_groups(batch, parallelism, send)
    }

    /// Sends each target's group of rows, in target order.
    fn send_groups(
        &mut self,
        batch: &RecordBatch,
        parallelism: usize,
        mut send: impl FnMut(usize, RecordBatch) -> Result<(), NetworkError>,
    ) -> Result<(), NetworkError> {
        for t in 0..parallelism {
            let (start, end) = (self.group_starts[t], self.group_starts[t + 1]);
            if start == end {
                continue;
            }
            let rows = &self.grouped_rows[start as usize..end as usize];
            let piece = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                let indices = UInt32Array::from(rows.to_vec());
                take_record_batch(batch, &indices)
                    .map_err(|e| NetworkError::Encode(e.to_string()))?
            };
            send(t, piece)?;
        }
        Ok(())
    }
}

impl RecordWriter {
    pub fn new(
        partitioner: Partitioner,
        targets: Vec<Target>,
        max_parallelism: u32,
        pool: Arc<NetworkBufferPool>,
        canceled: Arc<dyn Fn() -> bool + Send + Sync>,
        metrics: Arc<WriterMetrics>,
    ) -> Self {
        assert!(!targets.is_empty());
        let splitter = match &partitioner {
            Partitioner::Hash { key_columns } => HashSplitter::new(key_columns.clone()),
            _ => HashSplitter::default(),
        };
        Self {
            partitioner,
            targets,
            max_parallelism,
            pool,
            canceled,
            metrics,
            splitter,
            next_target: 0,
        }
    }

    pub fn emit(&mut self, batch: RecordBatch) -> Result<(), NetworkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match &self.partitioner {
            Partitioner::Forward | Partitioner::Global => self.send(0, batch),
            Partitioner::Rebalance => {
                let t = self.next_target;
                self.next_target = (t + 1) % self.targets.len();
                self.send(t, batch)
            }
            Partitioner::Hash { .. } => {
                if self.targets.len() == 1 {
                    return self.send(0, batch);
                }
                let parallelism = self.targets.len();
                // Taken out while `send` borrows the writer.
                let mut splitter = std::mem::take(&mut self.splitter);
                let result =
                    splitter.split(&batch, self.max_parallelism, parallelism, |t, piece| {
                        self.send(t, piece)
                    });
                self.splitter = splitter;
                result
            }
        }
    }

    /// The hash exchange this writer routes by: its key columns, max
    /// parallelism and target count (`None` for other partitioners).
    pub fn hash_route(&self) -> Option<(Vec<usize>, u32, usize)> {
        match &self.partitioner {
            Partitioner::Hash { key_columns } => Some((
                key_columns.clone(),
                self.max_parallelism,
                self.targets.len(),
            )),
            _ => None,
        }
    }

    /// `batch` with each row's target subtask computed already (by a GPU
    /// chain, with the stable hash of this exchange's keys): rows are
    /// grouped by target without hashing. Targets that do not fit this
    /// writer (another partitioner, a count that differs, one out of
    /// range) are ignored and the batch is hashed as usual.
    pub fn emit_routed(&mut self, batch: RecordBatch, targets: &[u32]) -> Result<(), NetworkError> {
        let parallelism = self.targets.len();
        let usable = matches!(self.partitioner, Partitioner::Hash { .. })
            && parallelism > 1
            && targets.len() == batch.num_rows()
            && targets.iter().all(|&t| (t as usize) < parallelism);
        if !usable || batch.num_rows() == 0 {
            return self.emit(batch);
        }
        let mut splitter = std::mem::take(&mut self.splitter);
        let result =
            splitter.split_routed(&batch, targets, parallelism, |t, piece| self.send(t, piece));
        self.splitter = splitter;
        result
    }

    fn send(&mut self, t: usize, batch: RecordBatch) -> Result<(), NetworkError> {
        let canceled = Arc::clone(&self.canceled);
        match &mut self.targets[t] {
            Target::Local { gate, channel } => {
                self.metrics
                    .local_rows
                    .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                let blocked = gate.push_local(*channel, StreamEvent::Batch(batch), &*canceled)?;
                self.record_blocked(blocked);
                Ok(())
            }
            Target::Remote { sub, encoder } => {
                encoder.set_buffer_size(sub.buffer_size());
                let pool = &self.pool;
                let metrics = &self.metrics;
                // Segment waits and pushes fail with a network error; the
                // encoder only sees that the piece could not go out.
                let failure = std::cell::RefCell::new(None);
                let failed = |e: NetworkError| {
                    *failure.borrow_mut() = Some(e);
                    super::ipc::IpcError::NoBatch
                };
                let blocked_cell = std::cell::Cell::new(Duration::ZERO);
                let result = encoder.encode_out(
                    &batch,
                    &mut || match acquire_segment(pool, &*canceled) {
                        Ok((segment, waited)) => {
                            blocked_cell.set(blocked_cell.get() + waited);
                            Ok(segment)
                        }
                        Err(e) => Err(failed(e)),
                    },
                    &mut |piece| {
                        let payload = match piece {
                            Piece::Contiguous { segment, len } => Payload::Segment { segment, len },
                            Piece::Parts {
                                segment,
                                parts,
                                len,
                            } => Payload::Parts {
                                segment,
                                parts,
                                len,
                            },
                        };
                        let len = payload.len();
                        let buffer = OutBuffer {
                            kind: BufferKind::Ipc,
                            payload,
                        };
                        match sub.push(buffer, &*canceled) {
                            Ok(b) => {
                                blocked_cell.set(blocked_cell.get() + b);
                                metrics
                                    .remote_bytes
                                    .fetch_add(len as u64, Ordering::Relaxed);
                                metrics.remote_buffers.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            }
                            Err(e) => Err(failed(e)),
                        }
                    },
                );
                let blocked = blocked_cell.get();
                let failure = failure.into_inner();
                self.record_blocked(blocked);
                match (result, failure) {
                    (_, Some(e)) => Err(e),
                    (Err(e), None) => Err(NetworkError::Encode(e.to_string())),
                    (Ok(()), None) => Ok(()),
                }
            }
        }
    }

    fn record_blocked(&self, blocked: Duration) {
        if !blocked.is_zero() {
            self.metrics
                .backpressure_nanos
                .fetch_add(blocked.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Sends an event to every target.
    fn broadcast_event(&mut self, event: StreamEvent) -> Result<(), NetworkError> {
        for t in 0..self.targets.len() {
            let blocked = match &self.targets[t] {
                Target::Local { gate, channel } => {
                    gate.push_local(*channel, event.clone(), &*self.canceled)?
                }
                Target::Remote { sub, .. } => {
                    let (kind, bytes, len) = match event {
                        StreamEvent::Watermark(wm) => (BufferKind::Watermark, wm.to_be_bytes(), 8),
                        StreamEvent::Barrier(id) => (BufferKind::Barrier, id.to_be_bytes(), 8),
                        StreamEvent::EndOfPartition => (BufferKind::EndOfPartition, [0; 8], 0),
                        StreamEvent::Batch(_) => unreachable!("batches are not broadcast"),
                    };
                    let payload = Payload::Inline { bytes, len };
                    sub.push(OutBuffer { kind, payload }, &*self.canceled)?
                }
            };
            self.record_blocked(blocked);
        }
        Ok(())
    }

    pub fn watermark(&mut self, watermark: i64) -> Result<(), NetworkError> {
        self.broadcast_event(StreamEvent::Watermark(watermark))
    }

    /// Sends checkpoint barrier `checkpoint` to every target, after all the
    /// data emitted so far.
    pub fn barrier(&mut self, checkpoint: u64) -> Result<(), NetworkError> {
        self.broadcast_event(StreamEvent::Barrier(checkpoint))
    }

    pub fn finish(&mut self) -> Result<(), NetworkError> {
        self.broadcast_event(StreamEvent::EndOfPartition)
    }
}

/// Groups row indices by the target `target_of` gives each row's hash, in
/// row order within a target: afterwards target `t`'s rows are
/// `grouped[starts[t]..starts[t + 1]]`.
fn group_rows_by_target<K: Copy>(
    hashes: &[K],
    target_of: impl Fn(K) -> u32,
    target_count: usize,
    grouped: &mut Vec<u32>,
    starts: &mut Vec<u32>,
) {
    starts.clear();
    starts.resize(target_count + 1, 0);
    grouped.clear();
    grouped.resize(hashes.len(), 0);
    // Count each target's rows one place to the right, so that the prefix
    // sum leaves each target's end at `starts[t + 1]`.
    for &h in hashes {
        starts[target_of(h) as usize + 1] += 1;
    }
    for t in 1..=target_count {
        starts[t] += starts[t - 1];
    }
    // Rows placed from the back of their group, last row first: each group
    // stays in row order and `starts[t + 1]` moves down to the start of
    // target `t`'s group, which is where `starts[t]` must be.
    for (row, &h) in hashes.iter().enumerate().rev() {
        let end = &mut starts[target_of(h) as usize + 1];
        *end -= 1;
        grouped[*end as usize] = row as u32;
    }
    // Now `starts[t + 1]` is the start of group `t`: shift down by one.
    starts.copy_within(1.., 0);
    starts[target_count] = hashes.len() as u32;
}

fn acquire_segment(
    pool: &Arc<NetworkBufferPool>,
    canceled: &dyn Fn() -> bool,
) -> Result<(Segment, Duration), NetworkError> {
    if let Some(s) = pool.try_request() {
        return Ok((s, Duration::ZERO));
    }
    let start = Instant::now();
    loop {
        if canceled() {
            return Err(NetworkError::Canceled);
        }
        if let Some(s) = pool.request_timeout(Duration::from_millis(50)) {
            return Ok((s, start.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_grouped_by_target_in_row_order() {
        // The "hash" is the target itself.
        let hashes = [2, 0, 2, 3, 0, 2];
        let (mut grouped, mut starts) = (Vec::new(), Vec::new());
        group_rows_by_target(&hashes, |h| h as u32, 5, &mut grouped, &mut starts);
        assert_eq!(starts, [0, 2, 2, 5, 6, 6]);
        assert_eq!(grouped, [1, 4, 0, 2, 5, 3]);
        // Reused for a smaller batch, nothing of the first is left.
        group_rows_by_target(&[4], |h| h as u32, 5, &mut grouped, &mut starts);
        assert_eq!(
            (starts.as_slice(), grouped.as_slice()),
            (&[0, 0, 0, 0, 0, 1][..], &[0][..])
        );
        group_rows_by_target(&[], |h: u64| h as u32, 3, &mut grouped, &mut starts);
        assert_eq!((starts.as_slice(), grouped.len()), (&[0, 0, 0, 0][..], 0));
    }
}
