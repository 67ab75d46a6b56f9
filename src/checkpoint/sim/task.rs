//! What one simulated task does when it gets a step: the task loop
//! (`exec/task.rs`) unrolled, one control message or one unit of input at
//! a time, around a real [`Chain`] and the loop's own checkpoint code.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::channels::{Channel, InputChannels, Wire};
use super::{Broken, Fault};
use crate::checkpoint::coordinator::TaskKey;
use crate::checkpoint::storage::StateHandle;
use crate::exec::operators::FINAL_CHECKPOINT;
use crate::exec::source::{Source, WatermarkGenerator};
use crate::exec::task::{self, Chain, CheckpointContext, TaskControl};
use crate::network::gate::{GateItem, InputEvent, InputGate};
use crate::network::sim::SplitMix64;

/// What a task tells the JobManager.
pub(super) enum TaskMessage {
    Ack {
        checkpoint: u64,
        handle: StateHandle,
        alignment: Duration,
    },
    Decline {
        checkpoint: u64,
        reason: String,
    },
    /// Input ended; output waits for the final commit.
    FinalCommitPending,
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    FinalCommitPending,
    Finished,
}

/// Where a task's input comes from.
pub(super) enum Input {
    Source {
        source: Box<dyn Source>,
        watermarks: Option<WatermarkGenerator>,
    },
    Channels(InputChannels),
}

/// One output edge: the staging gate its writer pushes to, and the
/// simulator's channel for each of the writer's targets.
pub(super) struct Staging {
    pub gate: Arc<InputGate>,
    pub channels: Vec<usize>,
}

/// What a task is built from.
pub(super) struct TaskParts {
    pub key: TaskKey,
    pub is_source: bool,
    pub input: Input,
    pub chain: Chain,
    pub cp: CheckpointContext,
    pub staging: Vec<Staging>,
    /// Shared with `cp`'s callbacks.
    pub outbox: Arc<Mutex<Vec<TaskMessage>>>,
}

pub(super) struct SimTask {
    pub key: TaskKey,
    pub is_source: bool,
    input: Input,
    chain: Chain,
    cp: CheckpointContext,
    staging: Vec<Staging>,
    /// Filled by the task's checkpoint callbacks and its own reports; moved
    /// onto `messages` after each step.
    outbox: Arc<Mutex<Vec<TaskMessage>>>,
    /// From the JobManager.
    pub control: Wire<TaskControl>,
    /// To the JobManager.
    pub messages: Wire<TaskMessage>,
    pub phase: Phase,
    /// The final checkpoint this task acknowledged while waiting for the
    /// final commit.
    final_checkpoint: Option<u64>,
}

/// The simulator's clock and knobs for one task step.
pub(super) struct StepContext {
    pub step: u64,
    pub now: Duration,
    pub delay_max_steps: u64,
    pub channel_batches_max: usize,
    pub fault: Fault,
}

/// What happened in one task step that a crash point may wait for.
#[derive(Default)]
pub(super) struct Stepped {
    pub snapshots: u64,
    pub final_committed: bool,
    pub channels_blocked: u64,
}

impl SimTask {
    /// A task built from its parts, restored from `cp.restore` unless it
    /// starts finished.
    pub fn start(parts: TaskParts) -> Result<Self, Broken> {
        let TaskParts {
            key,
            is_source,
            input,
            chain,
            cp,
            staging,
            outbox,
        } = parts;
        let mut task = SimTask {
            key,
            is_source,
            input,
            chain,
            cp,
            staging,
            outbox,
            control: Wire::default(),
            messages: Wire::default(),
            phase: Phase::Running,
            final_checkpoint: None,
        };
        if task.finished_on_restore() {
            // As `Task::run`: a task that waited for the final commit
            // commits what the final checkpoint staged.
            if let Some(state) = task.cp.restore.as_ref().filter(|s| !s.operators.is_empty()) {
                let restored = task.chain.restore(Some(state)).and_then(|()| {
                    task.chain
                        .notify_checkpoint_complete(crate::exec::operators::FINAL_CHECKPOINT)
                });
                restored.map_err(|e| Broken::task(key, e))?;
            }
            return Ok(task);
        }
        let source = match &mut task.input {
            Input::Source { source, watermarks } => Some((source.as_mut(), watermarks.as_mut())),
            Input::Channels(_) => None,
        };
        let restored = task::restore(source, &mut task.chain, &task.cp);
        restored.map_err(|e| Broken::task(key, e))?;
        Ok(task)
    }

    /// It had finished before the checkpoint it restarts from.
    pub fn finished_on_restore(&self) -> bool {
        self.cp.finished_on_restore
    }

    /// One step: the control messages that reached the task, then one
    /// unit of input unless its output is back-pressured; what it wrote
    /// goes onto `channels` and the JobManager's wire.
    pub fn step(
        &mut self,
        channels: &mut [Channel],
        rng: &mut SplitMix64,
        cx: &StepContext,
    ) -> Result<Stepped, Broken> {
        let mut stepped = Stepped::default();
        while let Some(control) = self.control.receive(cx.step) {
            self.on_control(control, cx, &mut stepped)?;
        }
        if self.phase == Phase::Running && !self.backpressured(channels, cx) {
            match (&self.input, self.finished_on_restore()) {
                (Input::Source { .. }, true) => self.finish_restored()?,
                (Input::Source { .. }, false) => self.produce()?,
                (Input::Channels(_), _) => self.consume(channels, rng, cx, &mut stepped)?,
            }
        }
        self.flush(channels, rng, cx);
        Ok(stepped)
    }

    fn backpressured(&self, channels: &[Channel], cx: &StepContext) -> bool {
        self.staging
            .iter()
            .flat_map(|s| &s.channels)
            .any(|&c| channels[c].batch_count() >= cx.channel_batches_max)
    }

    /// A consumer reads one event from a seeded choice among its channels
    /// that hold one and are not blocked.
    fn consume(
        &mut self,
        channels: &mut [Channel],
        rng: &mut SplitMix64,
        cx: &StepContext,
        stepped: &mut Stepped,
    ) -> Result<(), Broken> {
        let Input::Channels(inputs) = &mut self.input else {
            unreachable!("a consumer reads channels");
        };
        let readable = inputs.readable(channels);
        if readable.is_empty() {
            return Ok(());
        }
        let g = readable[rng.below(readable.len() as u64) as usize];
        let event = inputs.pop(g, channels);
        let events = inputs
            .on_event(g, event, cx.now)
            .map_err(|detail| Broken::task(self.key, detail))?;
        stepped.channels_blocked += u64::from(inputs.is_blocked(g));
        for event in events {
            if self.finished_on_restore() {
                self.on_input_restored_finished(event)?;
            } else {
                self.on_input(event, cx, stepped)?;
            }
        }
        Ok(())
    }

    /// Moves what the task's writers queued onto the channels, and its
    /// messages onto the wire to the JobManager.
    fn flush(&mut self, channels: &mut [Channel], rng: &mut SplitMix64, cx: &StepContext) {
        for staging in &self.staging {
            while let Some((i, item)) = staging
                .gate
                .pop(Duration::ZERO)
                .expect("a staging gate never fails")
            {
                let GateItem::Local(event) = item else {
                    unreachable!("staging gates have local channels only");
                };
                channels[staging.channels[i]].push(event);
            }
        }
        let messages = std::mem::take(&mut *lock(&self.outbox));
        for message in messages {
            let delay = rng.below(cx.delay_max_steps + 1);
            self.messages.send(message, cx.step, delay);
        }
    }

    fn report(&self, message: TaskMessage) {
        lock(&self.outbox).push(message);
    }

    /// A control message, as `drain_control` and `await_final_commit`
    /// handle it. A task whose thread ended, or that only passes its end
    /// on, drops it.
    fn on_control(
        &mut self,
        control: TaskControl,
        cx: &StepContext,
        stepped: &mut Stepped,
    ) -> Result<(), Broken> {
        let key = self.key;
        if self.finished_on_restore() {
            // `finish_restored` reads no control message: the task only
            // passes its end on.
            return Ok(());
        }
        match (control, self.phase) {
            (_, Phase::Finished) => {}
            (TaskControl::TriggerCheckpoint(n), Phase::Running) => {
                if let Input::Source { source, watermarks } = &self.input {
                    let source = Some((source.as_ref(), watermarks.as_ref()));
                    let taken = task::take_checkpoint(
                        n,
                        source,
                        &mut self.chain,
                        &mut self.cp,
                        Duration::ZERO,
                    );
                    taken.map_err(|e| Broken::task(key, e))?;
                    self.after_snapshot(n, cx, stepped)?;
                }
            }
            (TaskControl::TriggerCheckpoint(n), Phase::FinalCommitPending) => {
                // The final checkpoint, as `await_final_commit` takes it.
                let source = match &self.input {
                    Input::Source { source, watermarks } => {
                        Some((source.as_ref(), watermarks.as_ref()))
                    }
                    Input::Channels(_) => None,
                };
                let taken =
                    task::snapshot_task(n, source, &mut self.chain, &mut self.cp, Duration::ZERO);
                taken.map_err(|e| Broken::task(key, e))?;
                self.final_checkpoint = Some(n);
                self.after_snapshot(n, cx, stepped)?;
            }
            (TaskControl::CheckpointComplete(n), phase) => {
                let is_final = phase == Phase::FinalCommitPending
                    && (n == FINAL_CHECKPOINT || self.final_checkpoint.is_some_and(|f| n >= f));
                let n = if is_final { FINAL_CHECKPOINT } else { n };
                let notified = self.chain.notify_checkpoint_complete(n);
                notified.map_err(|e| Broken::task(key, e))?;
                if is_final {
                    self.phase = Phase::Finished;
                    self.report(TaskMessage::Finished);
                    stepped.final_committed = true;
                }
            }
            (TaskControl::AbortCheckpoint(n), Phase::Running) => {
                if let Input::Channels(inputs) = &mut self.input {
                    inputs.abort(n, cx.now);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn after_snapshot(
        &mut self,
        checkpoint: u64,
        cx: &StepContext,
        stepped: &mut Stepped,
    ) -> Result<(), Broken> {
        stepped.snapshots += 1;
        if cx.fault == Fault::CommitOnSnapshot {
            let notified = self.chain.notify_checkpoint_complete(checkpoint);
            notified.map_err(|e| Broken::task(self.key, e))?;
        }
        Ok(())
    }

    /// A source task reads one batch, as `run_source` does.
    fn produce(&mut self) -> Result<(), Broken> {
        let key = self.key;
        let Input::Source { source, watermarks } = &mut self.input else {
            unreachable!("only a source task produces");
        };
        let batch = source.next_batch().map_err(|e| Broken::task(key, e))?;
        let Some(batch) = batch else {
            return self.finish();
        };
        let watermark = match watermarks.as_mut() {
            Some(g) => g.observe(&batch).map_err(|e| Broken::task(key, e))?,
            None => None,
        };
        self.chain.push(batch).map_err(|e| Broken::task(key, e))?;
        if let Some(w) = watermark {
            self.chain.watermark(w).map_err(|e| Broken::task(key, e))?;
        }
        Ok(())
    }

    /// One input event, as `run_gates` handles what `InputReader` returns.
    fn on_input(
        &mut self,
        event: InputEvent,
        cx: &StepContext,
        stepped: &mut Stepped,
    ) -> Result<(), Broken> {
        let key = self.key;
        match event {
            InputEvent::Batch(batch) => self.chain.push(batch).map_err(|e| Broken::task(key, e)),
            InputEvent::Watermark(w) => self.chain.watermark(w).map_err(|e| Broken::task(key, e)),
            InputEvent::Barrier(n) => {
                let Input::Channels(inputs) = &self.input else {
                    unreachable!("a source task reads no barrier");
                };
                let alignment = inputs.last_alignment;
                let taken =
                    task::take_checkpoint(n, None, &mut self.chain, &mut self.cp, alignment);
                taken.map_err(|e| Broken::task(key, e))?;
                self.after_snapshot(n, cx, stepped)
            }
            InputEvent::End => self.finish(),
        }
    }

    /// An input event of a task restored as finished, as `finish_restored`
    /// reads it: its producers have finished too, so only their ends (and
    /// barriers, which it ignores) may arrive.
    fn on_input_restored_finished(&mut self, event: InputEvent) -> Result<(), Broken> {
        match event {
            InputEvent::Batch(batch) => {
                let rows = batch.num_rows();
                let detail = format!("restored as finished, but an input sent {rows} rows");
                Err(Broken::task(self.key, detail))
            }
            InputEvent::End => self.finish_restored(),
            InputEvent::Watermark(_) | InputEvent::Barrier(_) => Ok(()),
        }
    }

    /// A task that had finished before the checkpoint restored from passes
    /// its end on and finishes, as `finish_restored` does.
    fn finish_restored(&mut self) -> Result<(), Broken> {
        for writer in &mut self.chain.writers {
            writer.finish().map_err(|e| Broken::task(self.key, e))?;
        }
        self.phase = Phase::Finished;
        self.report(TaskMessage::Finished);
        Ok(())
    }

    /// End of input, as `Task::run` ends: flush the chain, then either wait
    /// for the final commit or finish.
    fn finish(&mut self) -> Result<(), Broken> {
        self.chain.finish().map_err(|e| Broken::task(self.key, e))?;
        if self.chain.has_pending_commit() {
            self.phase = Phase::FinalCommitPending;
            (self.cp.on_final_commit_pending)();
        } else {
            self.phase = Phase::Finished;
            self.report(TaskMessage::Finished);
        }
        Ok(())
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
