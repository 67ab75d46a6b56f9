//! A deterministic simulation of a checkpointed job that crashes, in the
//! manner of the network simulator ([`crate::network::sim`]): one seed
//! decides everything, and a failing seed replays.
//!
//! What is real code: the job ([`config`]) is a job file — datagen (1 to
//! 3 subtasks) → key_by → an `aggregate` or a tumbling `window` → a CSV
//! sink, chained to the keyed operator or, at another parallelism, a task
//! of its own — parsed with [`parse_job`], planned with [`plan`] and
//! chained by [`JobGraph::build`]. Each task's source and operators come
//! from the real builders ([`crate::exec::build`]) with checkpointing on,
//! so the sink is the exactly-once two-phase CSV sink writing into a real
//! directory. A task's operators run in a real
//! [`Chain`](crate::exec::task::Chain) whose real
//! [`RecordWriter`](crate::network::RecordWriter)s route rows by key
//! group; snapshots and restores go through the task loop's own
//! `take_checkpoint` and `restore`, state files through
//! [`CheckpointStorage`] (written, completed, verified, retained and read
//! back on the real file system). The JobManager's side is the real
//! [`Coordinator`] and [`RestartStrategy`], driven the way
//! `cluster/jobmanager/checkpointing.rs` drives them: checkpoints go on
//! after tasks finish and record them, a restore starts those tasks
//! finished (they only pass their ends on), and the final commit comes
//! once every task has finished or waits for it. Consumers align barriers
//! with the real [`BarrierAligner`].
//!
//! What is simulated: the threads and the wire ([`attempt`] builds a
//! run's tasks, [`task`] is one task's step, [`channels`] the wire). Time
//! is a step counter (one step is one millisecond of the coordinator's
//! clock). Each step the JobManager ticks its coordinator and handles the
//! task messages that arrived; then every task, in a seeded order and with
//! a seeded chance, drains the control messages that reached it (as the
//! task loop does between batches) and handles one unit of input: a source
//! reads one batch, a consumer one event from a seeded choice among its
//! channels that hold one and are not blocked by alignment. Every
//! (producer subtask → consumer subtask) pair is a FIFO channel of
//! batches, watermarks, barriers and ends of partition; a producer whose
//! channels hold `channel_batches_max` batches waits (back-pressure).
//! Control messages (JobManager → task) and task messages (acknowledgements,
//! declines, "finished", "final commit pending": task → JobManager) are
//! delayed by a seeded number of steps, in order per task.
//!
//! Crashes come at seeded points ([`CrashPoint`]): any task step, right
//! after a snapshot (its acknowledgement still on the wire), right after a
//! checkpoint completed in storage (before any task heard of it), and
//! between the first sink's final commit and the others'. A crash is a
//! global failover, as the JobManager does: every task object and every
//! channel and message is dropped, the restart strategy decides the delay,
//! and after it every task is rebuilt and restored from
//! [`CheckpointStorage::latest_valid`] (or from the beginning). With
//! `corrupt`, a restart may first flip a byte in a state file of the newest
//! completed checkpoint ([`files`]), so the fallback to an older one is
//! exercised.
//!
//! Invariants:
//! 1. Exactly once: when the job finishes, the committed output (every
//!    visible part file, rows sorted) equals a reference computed directly
//!    from the datagen rows ([`files`]), and no `.pending` or `.inprogress`
//!    file is left.
//! 2. Checkpoint ids strictly increase, across restarts; a checkpoint that
//!    completes is the one a restore would use, and every restore uses the
//!    newest retained checkpoint that was not corrupted.
//! 3. Commits are durable: a file seen committed at a crash keeps its rows
//!    to the end, a crash during the final commit included (the final
//!    checkpoint covers it: a restore after it commits the staged parts and
//!    replays nothing). One case is exempt by design: a restore that fell
//!    back past a corrupt checkpoint, where the sink deletes what the newer
//!    one committed and the replay writes it again.
//! 4. No task fails, the restart strategy never gives up, and the job
//!    finishes within [`STEP_MAX`] steps.
//!
//! A failure names its seed and carries the JobManager's last events
//! (triggers, completions, task ends, crashes, restores). Replay one with
//! `STRATA_SIM_SEED=<n> cargo nextest run --lib checkpoint::sim`; `tests.rs`
//! runs many seeds of both jobs, a soak, and the defects the checker must
//! catch.
//!
//! Limits: one JobManager and no TaskManager boundaries (every failure is a
//! global failover, which is what ours does); channels lose nothing (a lost
//! message is a crash); the file system does not fail; back-pressure counts
//! batches only (watermarks, barriers and ends of partition always fit).

mod attempt;
mod channels;
mod config;
mod files;
mod task;
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use attempt::{Attempt, DeployContext};
pub use config::{CrashPoint, Fault, JobKind, SimConfig};
use files::OutputFiles;
use task::{StepContext, TaskMessage};

use super::coordinator::{Action, Coordinator, TaskKey};
use super::storage::{CheckpointStorage, CompletedCheckpoint, StateHandle};
use crate::cluster::restart::{RestartDecision, RestartStrategy};
use crate::config::Config;
use crate::exec::task::TaskControl;
use crate::job::graph::JobGraph;
use crate::job::{LogicalPlan, OperatorKind, parse_job, plan};
use crate::memory::PagePool;
use crate::network::sim::SplitMix64;

/// One step of simulated time.
const STEP: Duration = Duration::from_millis(1);
/// Events a failure reports.
const HISTORY_MAX: usize = 64;
/// A run that has not finished by then is reported, not waited for.
pub const STEP_MAX: u64 = 200_000;
/// `execution.checkpointing.num-retained`: enough that a corrupt newest
/// checkpoint has an older one to fall back to.
const CHECKPOINTS_RETAINED: usize = 3;
const RESTART_DELAY_MS: u64 = 5;
const JOB_NAME: &str = "cksim";
/// Managed memory of the whole run, split among the tasks.
const MEMORY_BYTES: u64 = 2 << 20;
const PAGE_SIZE_BYTES: usize = 4096;

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    /// The crash points that fired, in order.
    pub crashes: Vec<CrashPoint>,
    /// What each restart restored from (`None`: the beginning).
    pub restored_from: Vec<Option<u64>>,
    pub checkpoints_completed: u64,
    pub checkpoints_aborted: u64,
    /// Newest checkpoints corrupted before a restore.
    pub corruptions: u64,
    /// Restores that used an older checkpoint than the newest retained.
    pub fallbacks: u64,
    /// Crashes after the final commit had started.
    pub final_commit_crashes: u64,
    /// Channels blocked by barrier alignment.
    pub channels_blocked: u64,
    /// Tasks a restore started finished (they had finished before the
    /// checkpoint).
    pub tasks_restored_finished: u64,
    pub rows_committed: usize,
}

/// Which invariant a run broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invariant {
    Setup,
    /// A task failed: its source, an operator or its state returned an error.
    TaskFailed,
    /// A checkpoint id did not grow.
    CheckpointIds,
    /// Storage refused a checkpoint, or a completed one did not verify.
    CheckpointStorage,
    /// A restore did not use the newest retained checkpoint that verifies.
    Fallback,
    /// The committed output is not the reference output.
    ExactlyOnce,
    /// A staged or in-progress part file was left behind.
    LeftoverFiles,
    /// A file seen committed changed or went away.
    CommitRetracted,
    RestartGaveUp,
    Termination,
}

/// A broken invariant, with the seed that replays it.
#[derive(Debug, thiserror::Error)]
#[error(
    "seed={seed} step={step}: {invariant:?} violated: {detail} (replay: STRATA_SIM_SEED={seed} cargo nextest run --lib checkpoint::sim)"
)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub invariant: Invariant,
    pub detail: String,
    /// The JobManager's last events (checkpoints, task ends, crashes,
    /// restores), oldest first, to read a replay by.
    pub history: Vec<String>,
}

/// A broken invariant, before the simulator adds the seed and step.
#[derive(Debug)]
struct Broken {
    pub invariant: Invariant,
    pub detail: String,
}

impl Broken {
    fn task(key: TaskKey, error: impl std::fmt::Display) -> Self {
        Broken {
            invariant: Invariant::TaskFailed,
            detail: format!("task {}/{}: {error}", key.0, key.1),
        }
    }
}

/// Runs one simulated job to its end in `dir` (which should be empty),
/// checking the invariants on the way and at the end.
pub fn run(config: &SimConfig, dir: &Path) -> Result<SimReport, SimFailure> {
    Sim::new(config.clone(), dir)?.run()
}

/// Which event just happened, for the armed crash point.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Step,
    Snapshot,
    Complete,
    FinalCommit,
}

struct Sim {
    config: SimConfig,
    rng: SplitMix64,
    step: u64,
    now: Duration,
    plan: LogicalPlan,
    graph: JobGraph,
    max_parallelism: u32,
    out_dir: PathBuf,
    storage: CheckpointStorage,
    coordinator: Coordinator<StateHandle>,
    restart: RestartStrategy,
    memory: Arc<PagePool>,
    attempt: Option<Attempt>,
    restart_at: Option<Duration>,
    /// Planned crashes not yet fired; the front one is armed.
    crashes: VecDeque<CrashPoint>,
    last_triggered: u64,
    /// Completed checkpoint ids, in order.
    completed: Vec<u64>,
    corrupted: BTreeSet<u64>,
    /// Committed files seen at crashes, with their sorted rows.
    committed_seen: BTreeMap<String, Vec<String>>,
    history: VecDeque<String>,
    report: SimReport,
}

impl Sim {
    fn new(config: SimConfig, dir: &Path) -> Result<Self, SimFailure> {
        let setup = |detail: String| SimFailure {
            seed: config.seed,
            step: 0,
            invariant: Invariant::Setup,
            detail,
            history: Vec::new(),
        };
        let out_dir = dir.join("out");
        let text = config.job_file(&out_dir);
        let spec = parse_job(&text, Path::new("cksim.toml")).map_err(|e| setup(e.to_string()))?;
        let plan = plan(spec).map_err(|e| setup(e.to_string()))?;
        let graph = JobGraph::build(&plan, 1);
        let overrides = [
            format!(
                "execution.checkpointing.interval={} ms",
                config.interval.as_millis()
            ),
            format!(
                "execution.checkpointing.timeout={} ms",
                config.timeout.as_millis()
            ),
            format!("execution.checkpointing.num-retained={CHECKPOINTS_RETAINED}"),
            "restart-strategy.type=fixed-delay".to_owned(),
            format!(
                "restart-strategy.fixed-delay.attempts={}",
                config.crashes.len()
            ),
            format!("restart-strategy.fixed-delay.delay={RESTART_DELAY_MS} ms"),
        ];
        let job_config = Config::from_overrides(&overrides).map_err(|e| setup(e.to_string()))?;
        let interval = job_config.checkpoint_interval.expect("interval is set");
        let storage = CheckpointStorage::new(
            &dir.join("checkpoints"),
            JOB_NAME,
            job_config.checkpoints_retained as usize,
        )
        .map_err(|e| setup(e.to_string()))?;
        Ok(Self {
            rng: SplitMix64(config.seed ^ config.job.salt().rotate_left(17)),
            step: 0,
            now: Duration::ZERO,
            max_parallelism: job_config.max_parallelism,
            out_dir,
            storage,
            coordinator: Coordinator::new(interval, job_config.checkpoint_timeout),
            restart: RestartStrategy::from_config(&job_config),
            memory: PagePool::new(MEMORY_BYTES, PAGE_SIZE_BYTES),
            attempt: None,
            restart_at: None,
            crashes: config.crashes.iter().copied().collect(),
            last_triggered: 0,
            completed: Vec::new(),
            corrupted: BTreeSet::new(),
            committed_seen: BTreeMap::new(),
            history: VecDeque::new(),
            report: SimReport {
                seed: config.seed,
                ..SimReport::default()
            },
            plan,
            graph,
            config,
        })
    }

    fn failure(&self, invariant: Invariant, detail: String) -> SimFailure {
        SimFailure {
            seed: self.config.seed,
            step: self.step,
            invariant,
            detail,
            history: self.history.iter().cloned().collect(),
        }
    }

    /// Records a JobManager event for a failure's history.
    fn note(&mut self, event: String) {
        if self.history.len() == HISTORY_MAX {
            self.history.pop_front();
        }
        self.history
            .push_back(format!("step {}: {event}", self.step));
    }

    fn broken(&self, broken: Broken) -> SimFailure {
        self.failure(broken.invariant, broken.detail)
    }

    fn run(mut self) -> Result<SimReport, SimFailure> {
        self.deploy(None)?;
        while !self.is_over() {
            if self.step >= STEP_MAX {
                let detail = format!("the job did not finish in {STEP_MAX} steps");
                return Err(self.failure(Invariant::Termination, detail));
            }
            self.step += 1;
            self.now += STEP;
            self.tick()?;
        }
        self.check_output()?;
        self.report.steps = self.step;
        Ok(self.report)
    }

    fn is_over(&self) -> bool {
        self.attempt
            .as_ref()
            .is_some_and(|a| a.finished.len() == a.tasks.len())
    }

    fn attempt_mut(&mut self) -> &mut Attempt {
        self.attempt.as_mut().expect("a running attempt")
    }

    /// One step: the JobManager, then the tasks in a seeded order.
    fn tick(&mut self) -> Result<(), SimFailure> {
        if let Some(at) = self.restart_at {
            if self.now >= at {
                self.restart()?;
            }
            return Ok(());
        }
        let sources_running = self.attempt_mut().sources_running();
        if let Some(action) = self.coordinator.tick(self.now, sources_running) {
            self.apply(action)?;
        }
        // An aborted final checkpoint is taken again.
        if self.coordinator.pending().is_none() {
            self.commit_final_if_ready()?;
        }
        self.deliver_task_messages()?;
        let task_count = match &self.attempt {
            Some(attempt) => attempt.tasks.len(),
            None => return Ok(()),
        };
        let mut order: Vec<usize> = (0..task_count).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        for t in order {
            if !self.rng.chance(3, 4) {
                continue;
            }
            if self.crash_if_due(Hook::Step, 1)? {
                return Ok(());
            }
            let cx = StepContext {
                step: self.step,
                now: self.now,
                delay_max_steps: self.config.delay_max_steps,
                channel_batches_max: self.config.channel_batches_max,
                fault: self.config.fault,
            };
            let Sim { attempt, rng, .. } = self;
            let attempt = attempt.as_mut().expect("a running attempt");
            let stepped = attempt.step_task(t, rng, &cx);
            let stepped = stepped.map_err(|b| self.broken(b))?;
            self.report.channels_blocked += stepped.channels_blocked;
            if self.crash_if_due(Hook::Snapshot, stepped.snapshots)? {
                return Ok(());
            }
            if stepped.final_committed && self.crash_if_due(Hook::FinalCommit, 1)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The JobManager handles what the tasks sent that has arrived.
    fn deliver_task_messages(&mut self) -> Result<(), SimFailure> {
        let task_count = self.attempt_mut().tasks.len();
        for t in 0..task_count {
            loop {
                let step = self.step;
                let Some(attempt) = self.attempt.as_mut() else {
                    return Ok(());
                };
                let task = &mut attempt.tasks[t];
                let key = task.key;
                let Some(message) = task.messages.receive(step) else {
                    break;
                };
                self.on_task_message(key, message)?;
            }
        }
        Ok(())
    }

    fn on_task_message(&mut self, key: TaskKey, message: TaskMessage) -> Result<(), SimFailure> {
        let now = self.now;
        let action = match message {
            TaskMessage::Ack {
                checkpoint,
                handle,
                alignment,
            } => self
                .coordinator
                .on_ack(checkpoint, key, handle, alignment, now),
            TaskMessage::Decline { checkpoint, reason } => {
                self.note(format!("task {key:?} declined {checkpoint}: {reason}"));
                self.coordinator.on_decline(checkpoint, key, &reason, now)
            }
            TaskMessage::FinalCommitPending => {
                self.note(format!("task {key:?} waits for the final commit"));
                self.attempt_mut().final_pending.insert(key);
                None
            }
            TaskMessage::Finished => {
                self.note(format!("task {key:?} finished"));
                self.attempt_mut().finished.insert(key);
                self.coordinator.on_task_finished(key, now)
            }
        };
        if let Some(action) = action {
            self.apply(action)?;
        }
        if self.attempt.is_some() {
            self.commit_final_if_ready()?;
        }
        Ok(())
    }

    /// Carries out a coordinator action as the JobManager's `apply` does.
    fn apply(&mut self, action: Action<StateHandle>) -> Result<(), SimFailure> {
        match action {
            Action::Trigger { checkpoint } => {
                if checkpoint <= self.last_triggered {
                    let detail = format!(
                        "checkpoint {checkpoint} triggered after checkpoint {}",
                        self.last_triggered
                    );
                    return Err(self.failure(Invariant::CheckpointIds, detail));
                }
                self.last_triggered = checkpoint;
                self.note(format!("trigger {checkpoint}"));
                if let Err(e) = self.storage.begin(checkpoint) {
                    return Err(self.failure(Invariant::CheckpointStorage, e.to_string()));
                }
                // The final checkpoint goes to the tasks that wait for the
                // final commit, as the JobManager sends it.
                let sources_only = !self.coordinator.pending_is_final();
                self.send_control(TaskControl::TriggerCheckpoint(checkpoint), sources_only);
                Ok(())
            }
            Action::Complete {
                checkpoint,
                handles,
                duration,
                alignment,
                finished,
            } => {
                self.note(format!(
                    "complete {checkpoint} (finished tasks {finished:?})"
                ));
                let done = self
                    .storage
                    .complete_with_finished(checkpoint, handles, finished, duration);
                let done =
                    done.map_err(|e| self.failure(Invariant::CheckpointStorage, e.to_string()))?;
                let size = done.manifest.total_bytes;
                self.coordinator
                    .record_completed(checkpoint, duration, alignment, size);
                self.on_completed(checkpoint)?;
                self.send_control(TaskControl::CheckpointComplete(checkpoint), false);
                self.crash_if_due(Hook::Complete, 1)?;
                Ok(())
            }
            Action::Abort { checkpoint, reason } => {
                self.note(format!("abort {checkpoint}: {reason}"));
                self.storage.abort(checkpoint);
                self.report.checkpoints_aborted += 1;
                self.send_control(TaskControl::AbortCheckpoint(checkpoint), false);
                Ok(())
            }
        }
    }

    /// Checkpoint `id` completed: ids grow, and a restore now would use it.
    fn on_completed(&mut self, id: u64) -> Result<(), SimFailure> {
        if let Some(&last) = self.completed.last()
            && last >= id
        {
            let detail = format!("checkpoint {id} completed after checkpoint {last}");
            return Err(self.failure(Invariant::CheckpointIds, detail));
        }
        self.completed.push(id);
        self.report.checkpoints_completed += 1;
        let latest = self.latest_valid()?;
        if latest.as_ref().map(|c| c.id) != Some(id) {
            let detail = format!(
                "checkpoint {id} completed but the newest that verifies is {:?}",
                latest.map(|c| c.id)
            );
            return Err(self.failure(Invariant::CheckpointStorage, detail));
        }
        Ok(())
    }

    fn latest_valid(&self) -> Result<Option<CompletedCheckpoint>, SimFailure> {
        self.storage
            .latest_valid()
            .map_err(|e| self.failure(Invariant::CheckpointStorage, e.to_string()))
    }

    /// Sends `control` to every task (`sources_only`: every source task)
    /// of the running attempt, each copy with its own delay.
    fn send_control(&mut self, control: TaskControl, sources_only: bool) {
        let Sim {
            attempt,
            rng,
            step,
            config,
            ..
        } = self;
        if let Some(attempt) = attempt {
            let tasks = attempt.tasks.iter_mut();
            for task in tasks.filter(|t| !sources_only || t.is_source) {
                let delay = rng.below(config.delay_max_steps + 1);
                task.control.send(control, *step, delay);
            }
        }
    }

    /// As `commit_final_if_ready`: once every task has finished or waits
    /// for the final commit, the final checkpoint is triggered; its
    /// completion is the commit.
    fn commit_final_if_ready(&mut self) -> Result<(), SimFailure> {
        let attempt = self.attempt_mut();
        if attempt.final_pending.is_empty() {
            return Ok(());
        }
        let ready = attempt
            .tasks
            .iter()
            .all(|t| attempt.finished.contains(&t.key) || attempt.final_pending.contains(&t.key));
        if !ready {
            return Ok(());
        }
        attempt.final_commit_sent = true;
        let actions = self.coordinator.trigger_final(self.now);
        if !actions.is_empty() {
            self.note("final checkpoint".to_owned());
        }
        for action in actions {
            self.apply(action)?;
        }
        Ok(())
    }

    /// Fires the armed crash if `count` events of kind `hook` reach it.
    /// Returns whether the job crashed.
    fn crash_if_due(&mut self, hook: Hook, count: u64) -> Result<bool, SimFailure> {
        if count == 0 || self.attempt.is_none() {
            return Ok(false);
        }
        let Some(armed) = self.crashes.front_mut() else {
            return Ok(false);
        };
        let fires = match (armed, hook) {
            (CrashPoint::Step(n), Hook::Step)
            | (CrashPoint::AfterSnapshot(n), Hook::Snapshot)
            | (CrashPoint::AfterComplete(n), Hook::Complete) => {
                *n = n.saturating_sub(count);
                *n == 0
            }
            (CrashPoint::DuringFinalCommit, Hook::FinalCommit) => true,
            _ => false,
        };
        if !fires {
            return Ok(false);
        }
        let point = self.crashes.pop_front().expect("the armed crash");
        self.crash(point)?;
        Ok(true)
    }

    /// A global failover, as `fail_or_restart` does.
    fn crash(&mut self, point: CrashPoint) -> Result<(), SimFailure> {
        let attempt = self.attempt.take().expect("a running attempt crashes");
        // Dropping the tasks commits nothing: their files stay for the restore.
        let final_commit_sent = attempt.final_commit_sent;
        drop(attempt);
        if final_commit_sent {
            self.report.final_commit_crashes += 1;
        }
        if !final_commit_sent || self.config.final_commit_durable {
            self.observe_committed()?;
        }
        self.note(format!("crash at {point:?}"));
        self.report.crashes.push(point);
        if let Some(Action::Abort { checkpoint, .. }) =
            self.coordinator.start_attempt([], None, self.now)
        {
            self.storage.abort(checkpoint);
            self.report.checkpoints_aborted += 1;
        }
        let random = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        match self.restart.on_failure(self.now, random) {
            RestartDecision::Restart { delay, .. } => {
                self.restart_at = Some(self.now + delay);
                Ok(())
            }
            RestartDecision::GiveUp { reason } => {
                Err(self.failure(Invariant::RestartGaveUp, reason))
            }
        }
    }

    /// The restart is due: maybe corrupt the newest checkpoint, restore
    /// from the newest that verifies and deploy every task.
    fn restart(&mut self) -> Result<(), SimFailure> {
        self.restart_at = None;
        if self.config.corrupt && self.rng.chance(1, 2) {
            self.corrupt_newest()?;
        }
        let found = self.latest_valid()?;
        let retained = &self.completed[self.completed.len().saturating_sub(CHECKPOINTS_RETAINED)..];
        let expected = retained
            .iter()
            .rev()
            .find(|id| !self.corrupted.contains(id))
            .copied();
        let found_id = found.as_ref().map(|c| c.id);
        if found_id != expected {
            let detail = format!(
                "restore found {found_id:?}; the newest of the retained {retained:?} that is not corrupt ({:?}) is {expected:?}",
                self.corrupted
            );
            return Err(self.failure(Invariant::Fallback, detail));
        }
        if found_id != retained.last().copied() {
            self.report.fallbacks += 1;
            // The sinks delete what the skipped checkpoints committed.
            self.committed_seen.clear();
        }
        self.note(format!("restore from {found_id:?}"));
        self.report.restored_from.push(found_id);
        self.deploy(found)
    }

    /// Flips one byte of one state file of the newest completed checkpoint.
    fn corrupt_newest(&mut self) -> Result<(), SimFailure> {
        let Some(&id) = self.completed.last() else {
            return Ok(());
        };
        if self.corrupted.contains(&id) {
            return Ok(());
        }
        let dir = CheckpointStorage::completed_dir(self.storage.job_dir(), id);
        match files::flip_a_state_byte(&dir, &mut self.rng) {
            Ok(true) => {
                self.corrupted.insert(id);
                self.report.corruptions += 1;
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                let detail = format!("corrupting {}: {e}", dir.display());
                Err(self.failure(Invariant::Setup, detail))
            }
        }
    }

    /// Builds and restores every task of a new attempt.
    fn deploy(&mut self, restore: Option<CompletedCheckpoint>) -> Result<(), SimFailure> {
        let keys: Vec<TaskKey> = self
            .graph
            .vertices
            .iter()
            .flat_map(|v| (0..v.parallelism).map(move |s| (v.id, s)))
            .collect();
        let restored = restore.as_ref().map(|c| c.id);
        if let Some(Action::Abort { checkpoint, .. }) =
            self.coordinator.start_attempt(keys, restored, self.now)
        {
            self.storage.abort(checkpoint);
            self.report.checkpoints_aborted += 1;
        }
        let cx = DeployContext {
            plan: &self.plan,
            graph: &self.graph,
            job_dir: self.storage.job_dir(),
            restore: restore.as_ref(),
            memory: &self.memory,
            max_parallelism: self.max_parallelism,
            fault: self.config.fault,
        };
        let attempt = Attempt::deploy(&cx).map_err(|b| self.broken(b))?;
        self.report.tasks_restored_finished += attempt.restored_finished_count();
        self.attempt = Some(attempt);
        Ok(())
    }

    /// Records the committed files at a crash; one seen before must not
    /// have changed.
    fn observe_committed(&mut self) -> Result<(), SimFailure> {
        let files = self.read_output()?;
        for (name, rows) in files.committed {
            if let Some(seen) = self.committed_seen.get(&name)
                && *seen != rows
            {
                let detail = format!(
                    "{name} was committed with {} rows and now has {}",
                    seen.len(),
                    rows.len()
                );
                return Err(self.failure(Invariant::CommitRetracted, detail));
            }
            self.committed_seen.insert(name, rows);
        }
        Ok(())
    }

    /// The end: the committed output is the reference, nothing is left
    /// staged, and every commit seen at a crash survived.
    fn check_output(&mut self) -> Result<(), SimFailure> {
        let files = self.read_output()?;
        if !files.hidden.is_empty() {
            let detail = format!("left behind: {:?}", files.hidden);
            return Err(self.failure(Invariant::LeftoverFiles, detail));
        }
        for (name, rows) in &self.committed_seen {
            if files.committed.get(name) != Some(rows) {
                let now = files.committed.get(name).map(Vec::len);
                let detail = format!(
                    "{name} was committed with {} rows; at the end it has {now:?}",
                    rows.len()
                );
                return Err(self.failure(Invariant::CommitRetracted, detail));
            }
        }
        let mut rows: Vec<String> = files.committed.into_values().flatten().collect();
        rows.sort_unstable();
        self.report.rows_committed = rows.len();
        let expected = self.reference_rows();
        if rows != expected {
            let detail = files::describe_difference(&expected, &rows);
            return Err(self.failure(Invariant::ExactlyOnce, detail));
        }
        Ok(())
    }

    fn read_output(&self) -> Result<OutputFiles, SimFailure> {
        files::read_output(&self.out_dir).map_err(|e| {
            let detail = format!("{}: {e}", self.out_dir.display());
            self.failure(Invariant::Setup, detail)
        })
    }

    /// The job's output computed directly from the datagen rows, as the
    /// sink's CSV lines, sorted.
    fn reference_rows(&self) -> Vec<String> {
        let OperatorKind::Datagen(spec) = &self.plan.spec.operators[0].kind else {
            unreachable!("the simulated job starts with datagen");
        };
        let mut rows = match self.config.job {
            JobKind::Aggregate => files::reference_aggregate(spec),
            JobKind::Window => files::reference_window(spec, self.config.window_size_ms),
        };
        rows.sort_unstable();
        rows
    }
}
