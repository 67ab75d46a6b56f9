//! The JobManager core's side of checkpoints: it drives each job's
//! [`Coordinator`] with the job's time, carries out its actions through the
//! job's [`CheckpointStore`] and messages to the TaskManagers, and commits
//! the final output when the job has finished.
//!
//! Storage is a seam: the shell uses [`FsCheckpointStores`] (the real
//! [`CheckpointStorage`] directories), the cluster simulator keeps
//! checkpoints in memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::JobManagerCore;
use crate::checkpoint::coordinator::{Action, Coordinator, TaskKey};
use crate::checkpoint::storage::{CheckpointStorage, StateHandle};
use crate::config::Config;
use crate::protocol::{
    CheckpointDeployment, CheckpointId, ExecutionState, JobId, JobState, Message, RestoreDeployment,
};

/// One job's checkpoint storage.
pub trait CheckpointStore: Send {
    /// Where the tasks write their state files.
    fn job_dir(&self) -> &Path;
    /// Checkpoint `id` was triggered: make room for it.
    fn begin(&mut self, id: u64) -> Result<(), String>;
    /// Every task acknowledged `id`: make it durable. Returns its size in
    /// bytes.
    fn complete(
        &mut self,
        id: u64,
        handles: Vec<StateHandle>,
        finished: Vec<TaskKey>,
        duration: Duration,
    ) -> Result<u64, String>;
    fn abort(&mut self, id: u64);
    /// The newest complete checkpoint that verifies.
    fn latest(&self) -> Option<RestoreDeployment>;
    /// The job ended in `state`.
    fn job_ended(&mut self, state: JobState);
}

/// Opens each job's store when checkpointing is on.
pub trait CheckpointStoreFactory: Send {
    /// `None` when checkpointing is off; `Err` says why the job cannot
    /// start.
    fn open(&self, name: &str, job: JobId) -> Result<Option<Box<dyn CheckpointStore>>, String>;
}

/// Checkpoints in `execution.checkpointing.dir`.
pub struct FsCheckpointStores {
    pub config: Config,
}

impl CheckpointStoreFactory for FsCheckpointStores {
    fn open(&self, name: &str, job: JobId) -> Result<Option<Box<dyn CheckpointStore>>, String> {
        let config = &self.config;
        if config.checkpoint_interval.is_none() {
            return Ok(None);
        }
        let storage = CheckpointStorage::new(
            &config.checkpoint_dir,
            &format!("{name}-{job}"),
            config.checkpoints_retained as usize,
        )
        .map_err(|e| e.to_string())?;
        tracing::info!(
            "job {name} ({job}): checkpoints every {:?} (timeout {:?}) in {}",
            config.checkpoint_interval,
            config.checkpoint_timeout,
            storage.job_dir().display()
        );
        Ok(Some(Box::new(FsCheckpointStore { storage })))
    }
}

struct FsCheckpointStore {
    storage: CheckpointStorage,
}

impl CheckpointStore for FsCheckpointStore {
    fn job_dir(&self) -> &Path {
        self.storage.job_dir()
    }

    fn begin(&mut self, id: u64) -> Result<(), String> {
        self.storage
            .begin(id)
            .map(|_| ())
            .map_err(|e| format!("cannot create its directory: {e}"))
    }

    fn complete(
        &mut self,
        id: u64,
        handles: Vec<StateHandle>,
        finished: Vec<TaskKey>,
        duration: Duration,
    ) -> Result<u64, String> {
        self.storage
            .complete_with_finished(id, handles, finished, duration)
            .map(|done| done.manifest.total_bytes)
            .map_err(|e| e.to_string())
    }

    fn abort(&mut self, id: u64) {
        self.storage.abort(id);
    }

    fn latest(&self) -> Option<RestoreDeployment> {
        match self.storage.latest_valid() {
            Ok(Some(c)) => Some(RestoreDeployment {
                checkpoint: CheckpointId(c.id),
                dir: c.dir,
                handles: c.manifest.files,
                finished: c.manifest.finished,
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("cannot list checkpoints: {e}; restarting from the beginning");
                None
            }
        }
    }

    /// A finished job's checkpoints are no longer needed (Flink's default
    /// retention); a failed or canceled job keeps them.
    fn job_ended(&mut self, state: JobState) {
        let dir: PathBuf = self.storage.job_dir().to_owned();
        if state == JobState::Finished {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::debug!("removing {}: {e}", dir.display());
            }
        } else {
            tracing::info!("checkpoints of the job are kept in {}", dir.display());
        }
    }
}

/// A job's coordinator and checkpoint store.
pub struct JobCheckpointing {
    pub coordinator: Coordinator<StateHandle>,
    pub store: Box<dyn CheckpointStore>,
}

impl JobCheckpointing {
    /// `None` when checkpointing is off.
    pub fn open(core: &JobManagerCore, name: &str, job: JobId) -> Result<Option<Self>, String> {
        let Some(store) = core.stores.open(name, job)? else {
            return Ok(None);
        };
        let config = &core.cfg.config;
        let interval = config
            .checkpoint_interval
            .unwrap_or(Duration::from_secs(60));
        Ok(Some(Self {
            coordinator: Coordinator::new(interval, config.checkpoint_timeout),
            store,
        }))
    }

    /// A new attempt with `tasks` starts: what its tasks need to know.
    pub fn start_attempt(
        &mut self,
        tasks: impl IntoIterator<Item = TaskKey>,
        restore: Option<RestoreDeployment>,
        now: Duration,
    ) -> CheckpointDeployment {
        let restored = restore.as_ref().map(|r| r.checkpoint.0);
        if let Some(Action::Abort { checkpoint, .. }) =
            self.coordinator.start_attempt(tasks, restored, now)
        {
            self.store.abort(checkpoint);
        }
        CheckpointDeployment {
            job_dir: self.store.job_dir().to_owned(),
            restore,
        }
    }
}

/// Carries out a coordinator action for `job`.
fn apply(core: &mut JobManagerCore, job: JobId, action: Action<StateHandle>) {
    let now = core.now;
    let Some(entry) = core.jobs.get_mut(&job) else {
        return;
    };
    let execution = entry.execution;
    let elapsed = entry.elapsed(now);
    let name = entry.name.clone();
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    let message = match action {
        Action::Trigger { checkpoint } => match cp.store.begin(checkpoint) {
            // The final checkpoint goes to the tasks waiting for the final
            // commit; the others reach them through the sources' barriers.
            Ok(()) => Some((
                Message::TriggerCheckpoint {
                    execution,
                    checkpoint: CheckpointId(checkpoint),
                },
                !cp.coordinator.pending_is_final(),
            )),
            Err(reason) => {
                tracing::warn!("checkpoint {checkpoint} of job {name} failed: {reason}");
                if let Some(Action::Abort { .. }) =
                    cp.coordinator
                        .on_decline(checkpoint, (usize::MAX, 0), &reason, elapsed)
                {
                    cp.store.abort(checkpoint);
                }
                None
            }
        },
        Action::Complete {
            checkpoint,
            handles,
            duration,
            alignment,
            finished,
        } => match cp.store.complete(checkpoint, handles, finished, duration) {
            Ok(size) => {
                cp.coordinator
                    .record_completed(checkpoint, duration, alignment, size);
                tracing::info!(
                    "job {name}: checkpoint {checkpoint} completed: {size} bytes in {} ms (alignment {} ms)",
                    duration.as_millis(),
                    alignment.as_millis()
                );
                Some((
                    Message::CheckpointComplete {
                        execution,
                        checkpoint: CheckpointId(checkpoint),
                    },
                    false,
                ))
            }
            Err(e) => {
                tracing::warn!("job {name}: checkpoint {checkpoint} failed: {e}");
                cp.coordinator.record_failed(checkpoint, duration, e);
                cp.store.abort(checkpoint);
                Some((
                    Message::AbortCheckpoint {
                        execution,
                        checkpoint: CheckpointId(checkpoint),
                    },
                    false,
                ))
            }
        },
        Action::Abort { checkpoint, reason } => {
            tracing::warn!("job {name}: checkpoint {checkpoint} aborted: {reason}");
            cp.store.abort(checkpoint);
            Some((
                Message::AbortCheckpoint {
                    execution,
                    checkpoint: CheckpointId(checkpoint),
                },
                false,
            ))
        }
    };
    if let Some((message, sources_only)) = message {
        send_to_tasks(core, job, &message, sources_only);
    }
}

/// Sends `message` to every TaskManager running a task of the job's
/// current attempt (`sources_only`: a source task).
fn send_to_tasks(core: &mut JobManagerCore, job: JobId, message: &Message, sources_only: bool) {
    let entry = &core.jobs[&job];
    let mut tms: Vec<_> = entry
        .tasks
        .iter()
        .filter(|((vertex, _), _)| !sources_only || is_source(entry, *vertex))
        .map(|(_, t)| t.taskmanager)
        .collect();
    tms.sort_unstable();
    tms.dedup();
    for tm in tms {
        if let Some(conn) = core.rm.get(tm).map(|t| t.conn) {
            core.send(conn, message.clone());
        }
    }
}

fn is_source(entry: &super::jobs::JobEntry, vertex: usize) -> bool {
    let head = entry.graph.vertices[vertex].operators[0];
    entry.plan.spec.operators[head].input.is_none()
}

/// Runs `f` on the job's coordinator and carries out the action it returns.
fn with_coordinator(
    core: &mut JobManagerCore,
    job: JobId,
    f: impl FnOnce(&mut Coordinator<StateHandle>, Duration) -> Option<Action<StateHandle>>,
) {
    let now = core.now;
    let Some(entry) = core.jobs.get_mut(&job) else {
        return;
    };
    let elapsed = entry.elapsed(now);
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    if let Some(action) = f(&mut cp.coordinator, elapsed) {
        apply(core, job, action);
    }
}

pub fn on_ack(
    core: &mut JobManagerCore,
    job: JobId,
    task: TaskKey,
    checkpoint: u64,
    handle: StateHandle,
    alignment: Duration,
) {
    with_coordinator(core, job, |c, now| {
        c.on_ack(checkpoint, task, handle, alignment, now)
    });
}

pub fn on_decline(
    core: &mut JobManagerCore,
    job: JobId,
    task: TaskKey,
    checkpoint: u64,
    reason: &str,
) {
    with_coordinator(core, job, |c, now| {
        c.on_decline(checkpoint, task, reason, now)
    });
}

pub fn on_task_finished(core: &mut JobManagerCore, job: JobId, task: TaskKey) {
    with_coordinator(core, job, |c, now| c.on_task_finished(task, now));
}

pub fn on_final_commit_pending(core: &mut JobManagerCore, job: JobId, task: TaskKey) {
    let Some(entry) = core.jobs.get_mut(&job) else {
        return;
    };
    entry.final_pending.insert(task);
    commit_final_if_ready(core, job);
}

/// When every task has finished or waits for the final commit, triggers
/// the final checkpoint: the waiting tasks acknowledge their staged output,
/// and its completion tells them to commit. A restart after it restores
/// the staged output instead of producing it again.
pub fn commit_final_if_ready(core: &mut JobManagerCore, job: JobId) {
    let now = core.now;
    let Some(entry) = core.jobs.get_mut(&job) else {
        return;
    };
    if entry.final_pending.is_empty() || entry.restart_at.is_some() {
        return;
    }
    let ready = entry
        .tasks
        .iter()
        .all(|(key, t)| t.state == ExecutionState::Finished || entry.final_pending.contains(key));
    if !ready {
        return;
    }
    let elapsed = entry.elapsed(now);
    let name = entry.name.clone();
    // Without checkpointing no sink stages its output, so none waits.
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    let actions = cp.coordinator.trigger_final(elapsed);
    if !actions.is_empty() {
        tracing::info!(
            "job {name}: input complete; taking the final checkpoint to commit the output"
        );
    }
    for action in actions {
        apply(core, job, action);
    }
}

/// Every tick: triggers and times out checkpoints.
pub fn tick(core: &mut JobManagerCore) {
    let mut jobs: Vec<JobId> = core
        .jobs
        .values()
        .filter(|j| j.restart_at.is_none() && j.checkpointing.is_some())
        .map(|j| j.id)
        .collect();
    jobs.sort_unstable();
    let now = core.now;
    for job in jobs {
        let entry = &core.jobs[&job];
        // Some source can still inject a barrier, and no task waits for the
        // final commit (its staged output must not be skipped by a
        // checkpoint that completes without it).
        let sources_running = entry.final_pending.is_empty()
            && entry
                .tasks
                .iter()
                .filter(|((vertex, _), _)| is_source(entry, *vertex))
                .any(|(_, t)| t.state == ExecutionState::Running);
        let elapsed = entry.elapsed(now);
        let Some(cp) = core
            .jobs
            .get_mut(&job)
            .and_then(|e| e.checkpointing.as_mut())
        else {
            continue;
        };
        if let Some(action) = cp.coordinator.tick(elapsed, sources_running) {
            apply(core, job, action);
        }
        // A final checkpoint that was aborted (timeout, decline) is taken
        // again.
        let pending_none = core
            .jobs
            .get(&job)
            .and_then(|e| e.checkpointing.as_ref())
            .is_some_and(|c| c.coordinator.pending().is_none());
        if pending_none {
            commit_final_if_ready(core, job);
        }
    }
}
