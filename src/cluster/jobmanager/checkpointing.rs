//! The JobManager's side of checkpoints and failover: it drives each job's
//! [`Coordinator`] with the wall clock, carries out its actions (storage,
//! messages to the TaskManagers), commits the final output when the job has
//! finished, and restarts a failed job from its latest checkpoint under the
//! restart strategy.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{JobState, State, deploy_attempt, end_job};
use crate::checkpoint::CheckpointError;
use crate::checkpoint::coordinator::{Action, Coordinator, TaskKey};
use crate::checkpoint::storage::{CheckpointStorage, StateHandle};
use crate::cluster::restart::RestartDecision;
use crate::cluster::rpc::{CheckpointDeployment, ExecutionState, Message, RestoreDeployment};
use crate::config::Config;

/// A job's coordinator and checkpoint storage.
pub(super) struct JobCheckpointing {
    pub coordinator: Coordinator<StateHandle>,
    pub storage: CheckpointStorage,
}

impl JobCheckpointing {
    /// `None` when checkpointing is off.
    pub fn new(config: &Config, name: &str, job: u64) -> Result<Option<Self>, CheckpointError> {
        let Some(interval) = config.checkpoint_interval else {
            return Ok(None);
        };
        let storage = CheckpointStorage::new(
            &config.checkpoint_dir,
            &format!("{name}-{job:016x}"),
            config.checkpoints_retained as usize,
        )?;
        tracing::info!(
            "job {name} ({job:016x}): checkpoints every {interval:?} (timeout {:?}) in {}",
            config.checkpoint_timeout,
            storage.job_dir().display()
        );
        Ok(Some(Self {
            coordinator: Coordinator::new(interval, config.checkpoint_timeout),
            storage,
        }))
    }

    /// A new attempt with `tasks` starts: what its tasks need to know.
    pub fn start_attempt(
        &mut self,
        tasks: impl IntoIterator<Item = TaskKey>,
        restore: Option<RestoreDeployment>,
        now: Duration,
    ) -> CheckpointDeployment {
        let restored = restore.as_ref().map(|r| r.checkpoint);
        if let Some(Action::Abort { checkpoint, .. }) =
            self.coordinator.start_attempt(tasks, restored, now)
        {
            self.storage.abort(checkpoint);
        }
        CheckpointDeployment {
            job_dir: self.storage.job_dir().to_owned(),
            restore,
        }
    }

    /// The newest checkpoint that verifies, as a restore for the tasks.
    fn latest(&self) -> Option<RestoreDeployment> {
        match self.storage.latest_valid() {
            Ok(Some(c)) => Some(RestoreDeployment {
                checkpoint: c.id,
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

    /// The job ended: a finished job's checkpoints are no longer needed
    /// (Flink's default retention); a failed or canceled job keeps them.
    pub fn job_ended(&self, state: JobState) {
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

fn since_start(s: &State, job: u64) -> Duration {
    s.jobs[&job].started.elapsed()
}

/// Carries out a coordinator action for `job`.
fn apply(s: &mut State, job: u64, action: Action<StateHandle>) {
    let Some(entry) = s.jobs.get_mut(&job) else {
        return;
    };
    let exec = entry.exec;
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    let message = match action {
        Action::Trigger { checkpoint } => match cp.storage.begin(checkpoint) {
            // The final checkpoint goes to the tasks waiting for the final
            // commit; the others reach them through the sources' barriers.
            Ok(_) => Some((
                Message::TriggerCheckpoint {
                    job: exec,
                    checkpoint,
                },
                !cp.coordinator.pending_is_final(),
            )),
            Err(e) => {
                let now = entry.started.elapsed();
                let reason = format!("cannot create its directory: {e}");
                tracing::warn!(
                    "checkpoint {checkpoint} of job {} failed: {reason}",
                    entry.name
                );
                if let Some(Action::Abort { .. }) =
                    cp.coordinator
                        .on_decline(checkpoint, (usize::MAX, 0), &reason, now)
                {
                    cp.storage.abort(checkpoint);
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
        } => match cp
            .storage
            .complete_with_finished(checkpoint, handles, finished, duration)
        {
            Ok(done) => {
                let size = done.manifest.total_bytes;
                cp.coordinator
                    .record_completed(checkpoint, duration, alignment, size);
                tracing::info!(
                    "job {}: checkpoint {checkpoint} completed: {size} bytes in {} ms (alignment {} ms)",
                    entry.name,
                    duration.as_millis(),
                    alignment.as_millis()
                );
                Some((
                    Message::CheckpointComplete {
                        job: exec,
                        checkpoint,
                    },
                    false,
                ))
            }
            Err(e) => {
                tracing::warn!("job {}: checkpoint {checkpoint} failed: {e}", entry.name);
                cp.coordinator
                    .record_failed(checkpoint, duration, e.to_string());
                cp.storage.abort(checkpoint);
                Some((
                    Message::AbortCheckpoint {
                        job: exec,
                        checkpoint,
                    },
                    false,
                ))
            }
        },
        Action::Abort { checkpoint, reason } => {
            tracing::warn!(
                "job {}: checkpoint {checkpoint} aborted: {reason}",
                entry.name
            );
            cp.storage.abort(checkpoint);
            Some((
                Message::AbortCheckpoint {
                    job: exec,
                    checkpoint,
                },
                false,
            ))
        }
    };
    if let Some((message, sources_only)) = message {
        send_to_tasks(s, job, &message, sources_only);
    }
}

/// Sends `message` to every TaskManager running a task of the job's
/// current attempt (`sources_only`: a source task).
fn send_to_tasks(s: &State, job: u64, message: &Message, sources_only: bool) {
    let entry = &s.jobs[&job];
    let mut names: Vec<&str> = entry
        .tasks
        .iter()
        .filter(|((vertex, _), _)| !sources_only || is_source(entry, *vertex))
        .map(|(_, t)| t.taskmanager.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    for tm in s
        .taskmanagers
        .iter()
        .filter(|t| names.contains(&t.name.as_str()))
    {
        let _ = tm.tx.send(message.clone());
    }
}

fn is_source(entry: &super::JobEntry, vertex: usize) -> bool {
    let head = entry.graph.vertices[vertex].operators[0];
    entry.plan.spec.operators[head].input.is_none()
}

/// Runs `f` on the coordinator of the job whose current attempt is `exec`
/// and carries out the action it returns.
fn with_coordinator(
    s: &mut State,
    exec: u64,
    f: impl FnOnce(&mut Coordinator<StateHandle>, Duration) -> Option<Action<StateHandle>>,
) {
    let Some(job) = current_job(s, exec) else {
        return;
    };
    let now = since_start(s, job);
    let entry = s.jobs.get_mut(&job).expect("job");
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    if let Some(action) = f(&mut cp.coordinator, now) {
        apply(s, job, action);
    }
}

pub(super) fn on_ack(
    s: &mut State,
    exec: u64,
    task: TaskKey,
    checkpoint: u64,
    handle: StateHandle,
    alignment: Duration,
) {
    with_coordinator(s, exec, |c, now| {
        c.on_ack(checkpoint, task, handle, alignment, now)
    });
}

pub(super) fn on_decline(s: &mut State, exec: u64, task: TaskKey, checkpoint: u64, reason: &str) {
    with_coordinator(s, exec, |c, now| {
        c.on_decline(checkpoint, task, reason, now)
    });
}

pub(super) fn on_task_finished(s: &mut State, job: u64, task: TaskKey) {
    let now = since_start(s, job);
    let entry = s.jobs.get_mut(&job).expect("job");
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    if let Some(action) = cp.coordinator.on_task_finished(task, now) {
        apply(s, job, action);
    }
}

pub(super) fn on_final_commit_pending(s: &mut State, exec: u64, task: TaskKey) {
    let Some(job) = current_job(s, exec) else {
        return;
    };
    let entry = s.jobs.get_mut(&job).expect("job");
    entry.final_pending.insert(task);
    commit_final_if_ready(s, job);
}

/// When every task has finished or waits for the final commit, triggers
/// the final checkpoint: the waiting tasks acknowledge their staged output,
/// and its completion tells them to commit. A restart after it restores
/// the staged output instead of producing it again.
pub(super) fn commit_final_if_ready(s: &mut State, job: u64) {
    let entry = &s.jobs[&job];
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
    let now = entry.started.elapsed();
    let name = entry.name.clone();
    let entry = s.jobs.get_mut(&job).expect("job");
    // Without checkpointing no sink stages its output, so none waits.
    let Some(cp) = entry.checkpointing.as_mut() else {
        return;
    };
    let actions = cp.coordinator.trigger_final(now);
    if !actions.is_empty() {
        tracing::info!(
            "job {name}: input complete; taking the final checkpoint to commit the output"
        );
    }
    for action in actions {
        apply(s, job, action);
    }
}

/// The job whose current attempt is `exec`.
fn current_job(s: &State, exec: u64) -> Option<u64> {
    s.jobs
        .iter()
        .find(|(_, e)| e.exec == exec && e.restart_at.is_none())
        .map(|(&job, _)| job)
}

/// A task failed or its TaskManager was lost: restart the job under its
/// restart strategy, or fail it when the strategy gives up.
pub(super) fn fail_or_restart(s: &mut State, job: u64, reason: String) {
    let Some(entry) = s.jobs.get_mut(&job) else {
        return;
    };
    if entry.restart_at.is_some() || entry.state != JobState::Running {
        return;
    }
    let now = entry.started.elapsed();
    let random = (crate::kernels::cpu::hash::fmix64(job ^ now.as_nanos() as u64) >> 11) as f64
        / (1u64 << 53) as f64;
    let delay = match entry.restart.on_failure(now, random) {
        RestartDecision::GiveUp { reason: why } => {
            let reason = format!("{reason} ({why})");
            end_job(s, job, JobState::Failed, Some(reason));
            return;
        }
        RestartDecision::Restart { delay, attempt } => {
            tracing::warn!(
                "job {} ({job:016x}) failed: {reason}; restarting in {delay:?} (restart {attempt}, {})",
                entry.name,
                entry.restart.describe()
            );
            delay
        }
    };
    entry.restarts += 1;
    entry.last_failure = Some(reason.clone());
    entry.restart_at = Some(Instant::now() + delay);
    entry.draining = entry
        .tasks
        .iter()
        .filter(|(_, t)| !t.state.is_terminal())
        .map(|(&(v, st), t)| (t.taskmanager.clone(), v, st))
        .collect();
    entry.draining_exec = Some(entry.exec);
    entry.draining_since = Instant::now();
    entry.final_pending.clear();
    if let Some(cp) = entry.checkpointing.as_mut()
        && let Some(Action::Abort { checkpoint, .. }) = cp.coordinator.start_attempt([], None, now)
    {
        cp.storage.abort(checkpoint);
    }
    let exec = entry.exec;
    for tm in &mut s.taskmanagers {
        let _ = tm.tx.send(Message::CancelJob {
            job: exec,
            reason: format!("restarting after: {reason}"),
        });
        for a in &mut tm.allocated {
            if *a == Some(job) {
                *a = None;
            }
        }
    }
}

/// Every monitor tick: triggers and times out checkpoints, and restarts
/// jobs whose restart is due and whose failed tasks have ended.
pub(super) fn tick(s: &mut State, config: &Config) {
    let jobs: Vec<u64> = s.jobs.keys().copied().collect();
    for job in jobs {
        let entry = &s.jobs[&job];
        if entry.restart_at.is_some() {
            restart_if_due(s, job, config);
            continue;
        }
        // Some source can still inject a barrier, and no task waits for the
        // final commit (its staged output must not be skipped by a
        // checkpoint that completes without it).
        let sources_running = entry.final_pending.is_empty()
            && entry
                .tasks
                .iter()
                .filter(|((vertex, _), _)| is_source(entry, *vertex))
                .any(|(_, t)| t.state == ExecutionState::Running);
        let now = entry.started.elapsed();
        let entry = s.jobs.get_mut(&job).expect("job");
        let Some(cp) = entry.checkpointing.as_mut() else {
            continue;
        };
        if let Some(action) = cp.coordinator.tick(now, sources_running) {
            apply(s, job, action);
        }
        // A final checkpoint that was aborted (timeout, decline) is taken
        // again.
        let entry = &s.jobs[&job];
        if entry
            .checkpointing
            .as_ref()
            .is_some_and(|c| c.coordinator.pending().is_none())
        {
            commit_final_if_ready(s, job);
        }
    }
}

fn restart_if_due(s: &mut State, job: u64, config: &Config) {
    let live: Vec<String> = s.taskmanagers.iter().map(|t| t.name.clone()).collect();
    let entry = s.jobs.get_mut(&job).expect("job");
    if entry.restart_at.is_some_and(|t| Instant::now() < t) {
        return;
    }
    entry.draining.retain(|(tm, _, _)| live.contains(tm));
    if !entry.draining.is_empty() {
        if entry.draining_since.elapsed() < config.heartbeat_timeout {
            return;
        }
        tracing::warn!(
            "job {}: {} task(s) of the failed attempt did not end within heartbeat.timeout; restarting without them",
            entry.name,
            entry.draining.len()
        );
        entry.draining.clear();
    }
    entry.restart_at = None;
    entry.attempt += 1;
    entry.exec = if entry.attempt == 0 {
        job
    } else {
        crate::kernels::cpu::hash::fmix64(job ^ u64::from(entry.attempt).rotate_left(32))
    };
    let restore = entry
        .checkpointing
        .as_ref()
        .and_then(JobCheckpointing::latest);
    match &restore {
        Some(r) => tracing::info!(
            "job {}: restoring attempt {} from checkpoint {} ({})",
            entry.name,
            entry.attempt,
            r.checkpoint,
            r.dir.display()
        ),
        None if entry.checkpointing.is_some() => tracing::warn!(
            "job {}: no completed checkpoint to restore; attempt {} starts from the beginning",
            entry.name,
            entry.attempt
        ),
        None => {}
    }
    if let Err(e) = deploy_attempt(s, job, restore) {
        fail_or_restart(s, job, format!("restart: {e}"));
    }
}
