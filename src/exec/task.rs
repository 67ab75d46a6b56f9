//! A task's thread: the loop that moves batches from a source or input
//! gates through the operator chain into the record writers.
//!
//! With checkpointing on, the loop also takes part in checkpoints (see
//! [`crate::checkpoint`]): between batches it reads its control channel —
//! a source task injects a barrier when asked, every task commits on a
//! completed checkpoint — and an aligned barrier from the inputs makes it
//! snapshot its chain and forward the barrier. The state is handed to
//! [`CheckpointContext::on_snapshot`], which writes and acknowledges it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

use super::ExecError;
use super::operators::{FINAL_CHECKPOINT, Operator, Output};
use super::source::{Source, WatermarkGenerator};
use crate::checkpoint::state::TaskState;
use crate::metrics::{OperatorMetrics, TaskMetrics};
use crate::network::gate::InputEvent;
use crate::network::{InputReader, RecordWriter};

/// How long the task waits on its inputs before checking for cancellation.
const POLL: Duration = Duration::from_millis(100);

/// The operators of a task after its head, and where their output goes.
pub struct Chain {
    pub operators: Vec<Box<dyn Operator>>,
    pub metrics: Vec<Arc<OperatorMetrics>>,
    pub writers: Vec<RecordWriter>,
    /// Counts the rows that enter the chain's first operator from its head
    /// (the source's output, for source tasks).
    pub head: Option<Arc<OperatorMetrics>>,
    /// Each operator's index in the job file (the key of its state in a
    /// checkpoint).
    pub operator_ids: Vec<usize>,
}

struct Link<'a> {
    operators: &'a mut [Box<dyn Operator>],
    metrics: &'a [Arc<OperatorMetrics>],
    writers: &'a mut [RecordWriter],
    upstream: Option<&'a OperatorMetrics>,
}

impl Output for Link<'_> {
    fn emit(&mut self, batch: RecordBatch) -> Result<(), ExecError> {
        let rows = batch.num_rows() as u64;
        if let Some(u) = self.upstream {
            u.rows_out.fetch_add(rows, Ordering::Relaxed);
        }
        match (self.operators.split_first_mut(), self.metrics.split_first()) {
            (Some((op, rest)), Some((m, mrest))) => {
                m.rows_in.fetch_add(rows, Ordering::Relaxed);
                op.process(
                    batch,
                    &mut Link {
                        operators: rest,
                        metrics: mrest,
                        writers: &mut *self.writers,
                        upstream: Some(m),
                    },
                )
            }
            _ => {
                if let Some((last, others)) = self.writers.split_last_mut() {
                    for w in others {
                        w.emit(batch.clone())?;
                    }
                    last.emit(batch)?;
                }
                Ok(())
            }
        }
    }

    fn emit_routed(&mut self, batch: RecordBatch, targets: &[u32]) -> Result<(), ExecError> {
        if !self.operators.is_empty() || self.writers.len() != 1 {
            return self.emit(batch);
        }
        let rows = batch.num_rows() as u64;
        if let Some(u) = self.upstream {
            u.rows_out.fetch_add(rows, Ordering::Relaxed);
        }
        self.writers[0].emit_routed(batch, targets)?;
        Ok(())
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), ExecError> {
        match (self.operators.split_first_mut(), self.metrics.split_first()) {
            (Some((op, rest)), Some((m, mrest))) => op.watermark(
                watermark,
                &mut Link {
                    operators: rest,
                    metrics: mrest,
                    writers: &mut *self.writers,
                    upstream: Some(m),
                },
            ),
            _ => {
                for w in self.writers.iter_mut() {
                    w.watermark(watermark)?;
                }
                Ok(())
            }
        }
    }
}

impl Chain {
    fn link(&mut self) -> Link<'_> {
        Link {
            operators: &mut self.operators,
            metrics: &self.metrics,
            writers: &mut self.writers,
            upstream: self.head.as_deref(),
        }
    }

    pub fn push(&mut self, batch: RecordBatch) -> Result<(), ExecError> {
        self.link().emit(batch)
    }

    pub fn watermark(&mut self, watermark: i64) -> Result<(), ExecError> {
        self.link().watermark(watermark)
    }

    /// Checkpoint barrier `checkpoint`: the operators flush what they batch
    /// up, then each snapshots its state, in chain order, then every edge
    /// gets the barrier.
    pub fn snapshot(&mut self, checkpoint: u64) -> Result<Vec<(usize, Vec<u8>)>, ExecError> {
        self.flush()?;
        let mut states = Vec::new();
        for (op, &id) in self.operators.iter_mut().zip(&self.operator_ids) {
            if let Some(state) = op.snapshot_state(checkpoint)? {
                states.push((id, state));
            }
        }
        Ok(states)
    }

    /// Forwards barrier `checkpoint` on every edge.
    pub fn barrier(&mut self, checkpoint: u64) -> Result<(), ExecError> {
        for w in &mut self.writers {
            w.barrier(checkpoint)?;
        }
        Ok(())
    }

    /// Restores every operator from `state` (`None`: from the beginning).
    pub fn restore(&mut self, state: Option<&TaskState>) -> Result<(), ExecError> {
        for (op, &id) in self.operators.iter_mut().zip(&self.operator_ids) {
            op.restore_state(state.and_then(|s| s.operator(id)))?;
        }
        Ok(())
    }

    pub fn notify_checkpoint_complete(&mut self, checkpoint: u64) -> Result<(), ExecError> {
        for op in &mut self.operators {
            op.notify_checkpoint_complete(checkpoint)?;
        }
        Ok(())
    }

    /// After `finish`: whether some operator staged output that only the
    /// job's final commit ([`FINAL_CHECKPOINT`]) commits.
    pub(crate) fn has_pending_commit(&self) -> bool {
        self.operators.iter().any(|op| op.has_pending_commit())
    }

    /// Each operator emits what it batches up ([`Operator::flush`]) into
    /// the rest of the chain, in order.
    pub fn flush(&mut self) -> Result<(), ExecError> {
        for i in 0..self.operators.len() {
            let (done, rest) = self.operators.split_at_mut(i + 1);
            let mut link = Link {
                operators: rest,
                metrics: &self.metrics[i + 1..],
                writers: &mut self.writers,
                upstream: Some(&self.metrics[i]),
            };
            done[i].flush(&mut link)?;
        }
        Ok(())
    }

    /// End of input: each operator flushes into the rest of the chain, in
    /// order; then every edge gets its end-of-partition.
    pub fn finish(&mut self) -> Result<(), ExecError> {
        for i in 0..self.operators.len() {
            let (done, rest) = self.operators.split_at_mut(i + 1);
            let op = &mut done[i];
            let mut link = Link {
                operators: rest,
                metrics: &self.metrics[i + 1..],
                writers: &mut self.writers,
                upstream: Some(&self.metrics[i]),
            };
            op.finish(&mut link)?;
        }
        for w in &mut self.writers {
            w.finish()?;
        }
        Ok(())
    }
}

/// Where a task's input comes from. One per task: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum TaskInput {
    Source {
        source: Box<dyn Source>,
        watermarks: Option<WatermarkGenerator>,
        rows_per_second: Option<f64>,
    },
    Gates(InputReader),
}

/// What the TaskManager tells a running task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskControl {
    /// Source tasks: snapshot and inject barrier `n`.
    TriggerCheckpoint(u64),
    /// Checkpoint `n` completed on every task (or [`FINAL_CHECKPOINT`]:
    /// the whole job finished): commit.
    CheckpointComplete(u64),
    /// Checkpoints up to `n` were aborted: stop aligning them.
    AbortCheckpoint(u64),
}

/// A snapshot the task took, for the TaskManager to store and acknowledge.
pub struct Snapshot {
    pub checkpoint: u64,
    pub state: TaskState,
    /// How long the task's inputs were aligned for this barrier.
    pub alignment: Duration,
}

/// How a task takes part in checkpoints (present when checkpointing is on).
pub struct CheckpointContext {
    /// Bounded by the TaskManager: triggers, completions and aborts.
    pub control: Receiver<TaskControl>,
    /// The state restored from, or `None` when starting from the beginning.
    pub restore: Option<TaskState>,
    /// The task had finished before the checkpoint restored from: it ends
    /// its outputs at once and replays nothing.
    pub finished_on_restore: bool,
    /// The source's operator index (source tasks).
    pub source_id: Option<usize>,
    /// Stores the snapshot and acknowledges it; an error declines the
    /// checkpoint (the task goes on).
    pub on_snapshot: Box<dyn FnMut(Snapshot) -> Result<(), String> + Send>,
    /// Called when input ended and the task's output waits for the job's
    /// final commit.
    pub on_final_commit_pending: Box<dyn FnMut() + Send>,
}

/// Everything a task thread needs.
pub struct Task {
    pub name: String,
    pub input: TaskInput,
    pub chain: Chain,
    pub canceled: Arc<AtomicBool>,
    pub metrics: Arc<TaskMetrics>,
    pub checkpoints: Option<CheckpointContext>,
}

/// A source's entry in a checkpoint: its offset and its watermark
/// generator's position.
#[derive(serde::Serialize, serde::Deserialize)]
struct SourceCheckpoint {
    offset: Vec<u8>,
    watermark_max_seen: Option<i64>,
}

impl Task {
    /// Runs the task to its end. Gates are closed on every exit path so no
    /// producer stays blocked on a dead consumer.
    pub fn run(mut self) -> Result<(), ExecError> {
        let mut checkpoints = self.checkpoints.take();
        if let Some(cp) = &checkpoints {
            if cp.finished_on_restore {
                // A task that waited for the final commit: its sinks commit
                // what the final checkpoint staged.
                if let Some(state) = cp.restore.as_ref().filter(|s| !s.operators.is_empty()) {
                    self.chain.restore(Some(state))?;
                    self.chain.notify_checkpoint_complete(FINAL_CHECKPOINT)?;
                }
                return finish_restored(&mut self.input, &mut self.chain, &self.canceled);
            }
            let source = match &mut self.input {
                TaskInput::Source {
                    source, watermarks, ..
                } => Some((source.as_mut(), watermarks.as_mut())),
                TaskInput::Gates(_) => None,
            };
            restore(source, &mut self.chain, cp)?;
        }
        let result = match &mut self.input {
            TaskInput::Source {
                source,
                watermarks,
                rows_per_second,
            } => run_source(
                source.as_mut(),
                watermarks.as_mut(),
                *rows_per_second,
                &mut self.chain,
                &self.canceled,
                &self.metrics,
                checkpoints.as_mut(),
            ),
            TaskInput::Gates(reader) => {
                let r = run_gates(
                    reader,
                    &mut self.chain,
                    &self.canceled,
                    &self.metrics,
                    checkpoints.as_mut(),
                );
                reader.close();
                r
            }
        };
        result.and_then(|()| self.chain.finish())?;
        match checkpoints {
            Some(cp) if self.chain.has_pending_commit() => {
                await_final_commit(&self.input, &mut self.chain, cp, &self.canceled)
            }
            _ => Ok(()),
        }
    }
}

/// A task that had finished before the checkpoint: its producers have
/// finished too and send only their ends; it passes its own end on.
fn finish_restored(
    input: &mut TaskInput,
    chain: &mut Chain,
    canceled: &AtomicBool,
) -> Result<(), ExecError> {
    if let TaskInput::Gates(reader) = input {
        loop {
            check_canceled(canceled)?;
            match reader.next(POLL)? {
                Some(InputEvent::End) => break,
                Some(InputEvent::Batch(b)) => {
                    return Err(ExecError::State {
                        operator: "task".into(),
                        detail: format!(
                            "restored as finished, but an input sent {} rows",
                            b.num_rows()
                        ),
                    });
                }
                _ => {}
            }
        }
        reader.close();
    }
    for w in &mut chain.writers {
        w.finish()?;
    }
    Ok(())
}

/// Restores the source offset (source tasks: `source` is the source and
/// its watermark generator) and the operators before any input. The
/// checkpoint simulator (`checkpoint/sim.rs`) restores its tasks
/// through this too.
pub(crate) fn restore(
    source: Option<(&mut (dyn Source + '_), Option<&mut WatermarkGenerator>)>,
    chain: &mut Chain,
    cp: &CheckpointContext,
) -> Result<(), ExecError> {
    let state = cp.restore.as_ref();
    if let (Some((source, watermarks)), Some((_, bytes))) =
        (source, state.and_then(|s| s.source.as_ref()))
    {
        let entry: SourceCheckpoint =
            serde_json::from_slice(bytes).map_err(|e| ExecError::State {
                operator: "source".into(),
                detail: format!("source state in the checkpoint is unreadable: {e}"),
            })?;
        source.restore_offset(&entry.offset)?;
        if let (Some(g), Some(m)) = (watermarks, entry.watermark_max_seen) {
            g.restore(m);
        }
    }
    chain.restore(state)
}

/// Snapshots the task at barrier `checkpoint`, hands the state over and
/// forwards the barrier. Shared with the checkpoint simulator.
pub(crate) fn take_checkpoint(
    checkpoint: u64,
    source: Option<(&dyn Source, Option<&WatermarkGenerator>)>,
    chain: &mut Chain,
    cp: &mut CheckpointContext,
    alignment: Duration,
) -> Result<(), ExecError> {
    snapshot_task(checkpoint, source, chain, cp, alignment)?;
    chain.barrier(checkpoint)
}

/// Snapshots the task and hands the state over (a decline is logged: the
/// task goes on).
pub(crate) fn snapshot_task(
    checkpoint: u64,
    source: Option<(&dyn Source, Option<&WatermarkGenerator>)>,
    chain: &mut Chain,
    cp: &mut CheckpointContext,
    alignment: Duration,
) -> Result<(), ExecError> {
    let mut state = TaskState::default();
    if let (Some((source, watermarks)), Some(id)) = (source, cp.source_id) {
        let entry = SourceCheckpoint {
            offset: source.snapshot_offset()?,
            watermark_max_seen: watermarks.map(WatermarkGenerator::max_seen),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|e| ExecError::State {
            operator: "source".into(),
            detail: e.to_string(),
        })?;
        state.source = Some((id, bytes));
    }
    state.operators = chain.snapshot(checkpoint)?;
    if let Err(reason) = (cp.on_snapshot)(Snapshot {
        checkpoint,
        state,
        alignment,
    }) {
        tracing::warn!("checkpoint {checkpoint} declined: {reason}");
    }
    Ok(())
}

/// Handles the control messages waiting for the task. Returns the
/// checkpoints a source task must trigger, in order.
fn drain_control(
    cp: &mut CheckpointContext,
    chain: &mut Chain,
    mut reader: Option<&mut InputReader>,
) -> Result<Vec<u64>, ExecError> {
    let mut triggers = Vec::new();
    loop {
        match cp.control.try_recv() {
            Ok(TaskControl::TriggerCheckpoint(n)) => triggers.push(n),
            Ok(TaskControl::CheckpointComplete(n)) => chain.notify_checkpoint_complete(n)?,
            Ok(TaskControl::AbortCheckpoint(n)) => {
                if let Some(r) = reader.as_deref_mut() {
                    r.abort_checkpoint(n);
                }
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return Ok(triggers),
        }
    }
}

/// Input ended and output is staged: wait until the JobManager says the
/// whole job finished, then commit.
///
/// The JobManager takes a final checkpoint of the waiting tasks first (the
/// others have finished): its completion is the commit, and a restart after
/// it restores the staged output instead of producing it again, so a
/// committed part never changes.
fn await_final_commit(
    input: &TaskInput,
    chain: &mut Chain,
    mut cp: CheckpointContext,
    canceled: &AtomicBool,
) -> Result<(), ExecError> {
    (cp.on_final_commit_pending)();
    let mut final_checkpoint = None;
    loop {
        check_canceled(canceled)?;
        match cp.control.recv_timeout(POLL) {
            Ok(TaskControl::TriggerCheckpoint(n)) => {
                let source = match input {
                    TaskInput::Source {
                        source, watermarks, ..
                    } => Some((source.as_ref(), watermarks.as_ref())),
                    TaskInput::Gates(_) => None,
                };
                snapshot_task(n, source, chain, &mut cp, Duration::ZERO)?;
                final_checkpoint = Some(n);
            }
            Ok(TaskControl::CheckpointComplete(n)) => {
                if n == FINAL_CHECKPOINT || final_checkpoint.is_some_and(|f| n >= f) {
                    return chain.notify_checkpoint_complete(FINAL_CHECKPOINT);
                }
                chain.notify_checkpoint_complete(n)?;
            }
            Ok(TaskControl::AbortCheckpoint(_)) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ExecError::Canceled);
            }
        }
    }
}

fn check_canceled(canceled: &AtomicBool) -> Result<(), ExecError> {
    if canceled.load(Ordering::Relaxed) {
        Err(ExecError::Canceled)
    } else {
        Ok(())
    }
}

fn run_source(
    source: &mut dyn Source,
    mut watermarks: Option<&mut WatermarkGenerator>,
    rows_per_second: Option<f64>,
    chain: &mut Chain,
    canceled: &AtomicBool,
    metrics: &TaskMetrics,
    mut checkpoints: Option<&mut CheckpointContext>,
) -> Result<(), ExecError> {
    let started = Instant::now();
    let mut produced = 0u64;
    loop {
        if let Some(cp) = checkpoints.as_deref_mut() {
            for n in drain_control(cp, chain, None)? {
                let generator = watermarks.as_deref();
                take_checkpoint(n, Some((&*source, generator)), chain, cp, Duration::ZERO)?;
            }
        }
        let Some(batch) = source.next_batch()? else {
            break;
        };
        check_canceled(canceled)?;
        if produced == 0 && batch.num_rows() > 0 {
            metrics
                .first_row_unix_us
                .store(unix_micros(std::time::SystemTime::now()), Ordering::Relaxed);
        }
        produced += batch.num_rows() as u64;
        let watermark = match watermarks.as_deref_mut() {
            Some(g) => g.observe(&batch)?,
            None => None,
        };
        chain.push(batch)?;
        if let Some(w) = watermark {
            chain.watermark(w)?;
        }
        if let Some(rate) = rows_per_second {
            throttle(started, produced, rate, canceled)?;
        }
    }
    Ok(())
}

/// Microseconds since the Unix epoch (0 for a clock before it).
pub fn unix_micros(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Sleeps until `produced` rows are due at `rate` rows/s.
fn throttle(
    started: Instant,
    produced: u64,
    rate: f64,
    canceled: &AtomicBool,
) -> Result<(), ExecError> {
    let due = Duration::from_secs_f64(produced as f64 / rate.max(1.0));
    while started.elapsed() < due {
        check_canceled(canceled)?;
        // The clock moves between the check and here: saturate.
        std::thread::sleep(due.saturating_sub(started.elapsed()).min(POLL));
    }
    Ok(())
}

fn run_gates(
    reader: &mut InputReader,
    chain: &mut Chain,
    canceled: &AtomicBool,
    metrics: &TaskMetrics,
    mut checkpoints: Option<&mut CheckpointContext>,
) -> Result<(), ExecError> {
    loop {
        check_canceled(canceled)?;
        if let Some(cp) = checkpoints.as_deref_mut() {
            drain_control(cp, chain, Some(&mut *reader))?;
        }
        let event = reader.next(POLL)?;
        metrics
            .remote_bytes_in
            .store(reader.remote_bytes(), Ordering::Relaxed);
        match event {
            Some(InputEvent::Batch(batch)) => chain.push(batch)?,
            Some(InputEvent::Watermark(w)) => chain.watermark(w)?,
            Some(InputEvent::Barrier(n)) => match checkpoints.as_deref_mut() {
                Some(cp) => take_checkpoint(n, None, chain, cp, reader.last_alignment)?,
                // Checkpointing is off here: pass the barrier on.
                None => chain.barrier(n)?,
            },
            Some(InputEvent::End) => return Ok(()),
            // Idle for a poll interval: nothing waits in a coalescing buffer.
            None => chain.flush()?,
        }
    }
}
