//! Failover: a failed task or a lost TaskManager fails the job's current
//! execution; the restart strategy decides whether and when a new one
//! starts.
//!
//! A restart starts when both hold: the strategy's delay has passed, and
//! every task of the failed execution has ended (its TaskManager reported
//! the end) or its TaskManager was declared lost — only then are their
//! slots free. Nothing waits for a timeout when the TaskManagers answer:
//! ends arrive as task statuses, and a dead TaskManager's connection closes.
//! A TaskManager that neither answers nor closes is declared lost by the
//! heartbeat monitor, which ends the wait too.

use super::JobManagerCore;
use crate::checkpoint::coordinator::Action;
use crate::cluster::restart::RestartDecision;
use crate::protocol::{JobId, JobState, Message, TaskManagerId};

impl JobManagerCore {
    /// A task failed or its TaskManager was lost: restart the job under its
    /// restart strategy, or fail it when the strategy gives up.
    pub(crate) fn fail_or_restart(&mut self, job: JobId, reason: String) {
        let now = self.now;
        let random = self.rng.next_f64();
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        if entry.restart_at.is_some() || entry.state != JobState::Running {
            return;
        }
        let elapsed = entry.elapsed(now);
        let delay = match entry.restart.on_failure(elapsed, random) {
            RestartDecision::GiveUp { reason: why } => {
                let reason = format!("{reason} ({why})");
                self.end_job(job, JobState::Failed, Some(reason));
                return;
            }
            RestartDecision::Restart { delay, attempt } => {
                tracing::warn!(
                    "job {} ({job}) failed: {reason}; restarting in {delay:?} (restart {attempt}, {})",
                    entry.name,
                    entry.restart.describe()
                );
                delay
            }
        };
        entry.restarts += 1;
        entry.last_failure = Some(reason.clone());
        entry.restart_at = Some(now + delay);
        let live: Vec<(TaskManagerId, _)> = entry
            .tasks
            .iter()
            .filter(|(_, t)| !t.state.is_terminal())
            .map(|(&key, t)| (t.taskmanager, key))
            .collect();
        entry.draining = live
            .into_iter()
            .filter(|(tm, _)| self.rm.contains(*tm))
            .collect();
        entry.draining_execution = Some(entry.execution);
        entry.final_pending.clear();
        if let Some(cp) = entry.checkpointing.as_mut()
            && let Some(Action::Abort { checkpoint, .. }) =
                cp.coordinator.start_attempt([], None, elapsed)
        {
            cp.store.abort(checkpoint);
        }
        let execution = entry.execution;
        let mut tms: Vec<TaskManagerId> = entry.tasks.values().map(|t| t.taskmanager).collect();
        tms.sort_unstable();
        tms.dedup();
        for tm in tms {
            if let Some(conn) = self.rm.get(tm).map(|t| t.conn) {
                self.send(
                    conn,
                    Message::CancelJob {
                        execution,
                        reason: format!("restarting after: {reason}"),
                    },
                );
            }
        }
        self.rm.free_job(job);
        // The restart itself happens on the next tick or task end (never
        // from here: a restart that cannot deploy fails over again).
    }
}

/// `tm` was declared lost: its tasks of draining executions end with it,
/// and every job running a task there fails over.
pub fn on_taskmanager_lost(core: &mut JobManagerCore, tm: TaskManagerId, reason: &str) {
    for entry in core.jobs.values_mut() {
        entry.draining.retain(|(t, _)| *t != tm);
    }
    let mut affected: Vec<JobId> = core
        .jobs
        .values()
        .filter(|j| j.restart_at.is_none() && j.tasks.values().any(|t| t.taskmanager == tm))
        .map(|j| j.id)
        .collect();
    affected.sort_unstable();
    for job in affected {
        core.fail_or_restart(job, reason.to_owned());
    }
}

/// Every tick: restarts the jobs whose restart is due.
pub fn restart_due_jobs(core: &mut JobManagerCore) {
    let mut waiting: Vec<JobId> = core
        .jobs
        .values()
        .filter(|j| j.restart_at.is_some())
        .map(|j| j.id)
        .collect();
    waiting.sort_unstable();
    for job in waiting {
        restart_if_due(core, job);
    }
}

pub fn restart_if_due(core: &mut JobManagerCore, job: JobId) {
    let now = core.now;
    let Some(entry) = core.jobs.get_mut(&job) else {
        return;
    };
    if entry.restart_at.is_none_or(|t| now < t) || !entry.draining.is_empty() {
        return;
    }
    // Slots the TaskManagers still report held (their tasks' ends and the
    // slot reports travel separately) are waited for, up to
    // heartbeat.timeout after the restart was due.
    let needed = entry.graph.slots_needed() as usize;
    let due = entry.restart_at.unwrap_or(now);
    let free = core.rm.free_slots().len();
    if free < needed
        && free + core.rm.releasing_slots() >= needed
        && now < due + core.cfg.heartbeat_timeout
    {
        return;
    }
    let Some(entry) = core.jobs.get_mut(&job) else {
        return;
    };
    entry.restart_at = None;
    entry.draining_execution = None;
    entry.attempt += 1;
    entry.execution = crate::protocol::ExecutionId(core.rng.next_u64());
    let restore = entry.checkpointing.as_ref().and_then(|c| c.store.latest());
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
    if let Err(e) = core.deploy_attempt(job, restore) {
        core.fail_or_restart(job, format!("restart: {e}"));
    }
}
