//! The checkpoint coordinator of one job (Flink's `CheckpointCoordinator`
//! with `execution.checkpointing.max-concurrent-checkpoints = 1`), as a pure
//! state machine: the caller passes the time (since the job started) and
//! carries out the [`Action`]s, so the JobManager and the simulator drive
//! the same logic.
//!
//! A checkpoint is triggered `interval` after the previous one ended (or
//! after the job started); it completes when every task acknowledged and is
//! aborted when a task declines, a task finishes without acknowledging, or
//! `timeout` passes first. Ids only grow, across restarts too, so a late
//! message of an old checkpoint can never be taken for a new one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// A task: (vertex, subtask).
pub type TaskKey = (usize, u32);

/// Completed and failed checkpoints kept for the REST API and summary.
pub const HISTORY_MAX: usize = 32;

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<H> {
    /// Ask every source task to inject barrier `checkpoint`.
    Trigger { checkpoint: u64 },
    /// Every task acknowledged: finalize the checkpoint in storage, then
    /// notify the tasks (or record a failure if finalizing fails).
    Complete {
        checkpoint: u64,
        handles: Vec<H>,
        /// Trigger to last acknowledgement.
        duration: Duration,
        /// Longest barrier alignment over the tasks.
        alignment: Duration,
        /// Tasks that had finished without acknowledging: a restore starts
        /// them finished.
        finished: Vec<TaskKey>,
    },
    /// Drop the checkpoint and tell the tasks.
    Abort { checkpoint: u64, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CheckpointStatus {
    Completed,
    Failed,
}

/// One checkpoint as reported in summaries and metrics.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointStats {
    pub id: u64,
    pub status: CheckpointStatus,
    /// Trigger to completion or failure.
    pub duration_ms: u64,
    /// Bytes of state written (completed checkpoints).
    pub size_bytes: u64,
    /// Longest barrier alignment over the tasks.
    pub alignment_ms: u64,
    /// Why it failed.
    pub reason: Option<String>,
}

/// Counters and recent history of a job's checkpoints.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointSummary {
    pub completed: u64,
    pub failed: u64,
    /// Newest last, at most [`HISTORY_MAX`].
    pub history: Vec<CheckpointStats>,
    /// The checkpoint the latest restart restored from.
    pub restored_from: Option<u64>,
}

impl CheckpointSummary {
    pub fn last_completed(&self) -> Option<&CheckpointStats> {
        self.history
            .iter()
            .rev()
            .find(|c| c.status == CheckpointStatus::Completed)
    }
}

struct Pending<H> {
    checkpoint: u64,
    /// The final checkpoint: every other task has finished, the ones
    /// acknowledging wait for the final commit.
    is_final: bool,
    triggered_at: Duration,
    acks: BTreeMap<TaskKey, H>,
    alignment: Duration,
}

pub struct Coordinator<H> {
    interval: Duration,
    timeout: Duration,
    tasks: BTreeSet<TaskKey>,
    /// Tasks of this attempt that finished (Flink's FLIP-147: checkpoints
    /// go on without them).
    finished: BTreeSet<TaskKey>,
    /// The final checkpoint of this attempt completed (was recorded):
    /// nothing more to take.
    final_completed: bool,
    /// The last `Complete` action was the final checkpoint's.
    completing_final: bool,
    next_id: u64,
    pending: Option<Pending<H>>,
    /// When the last checkpoint ended (or the attempt started).
    last_end: Duration,
    history: VecDeque<CheckpointStats>,
    completed: u64,
    failed: u64,
    restored_from: Option<u64>,
}

impl<H: Clone> Coordinator<H> {
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        assert!(!interval.is_zero() && !timeout.is_zero());
        Self {
            interval,
            timeout,
            tasks: BTreeSet::new(),
            finished: BTreeSet::new(),
            final_completed: false,
            completing_final: false,
            next_id: 1,
            pending: None,
            last_end: Duration::ZERO,
            history: VecDeque::new(),
            completed: 0,
            failed: 0,
            restored_from: None,
        }
    }

    /// A new execution attempt with these tasks starts at `now`, restored
    /// from `restored` (if any). A pending checkpoint of the previous
    /// attempt is aborted.
    pub fn start_attempt(
        &mut self,
        tasks: impl IntoIterator<Item = TaskKey>,
        restored: Option<u64>,
        now: Duration,
    ) -> Option<Action<H>> {
        let abort = self.abort_pending("the job restarted".into(), now);
        self.tasks = tasks.into_iter().collect();
        self.finished.clear();
        self.final_completed = false;
        if let Some(id) = restored {
            self.next_id = self.next_id.max(id + 1);
            self.restored_from = Some(id);
        }
        self.last_end = now;
        abort
    }

    /// The checkpoint in flight.
    pub fn pending(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.checkpoint)
    }

    /// Time passed: triggers when due (and `sources_running`: some source
    /// task can still inject a barrier), aborts on timeout.
    pub fn tick(&mut self, now: Duration, sources_running: bool) -> Option<Action<H>> {
        if let Some(p) = &self.pending {
            if now.saturating_sub(p.triggered_at) >= self.timeout {
                let reason = format!(
                    "checkpoint expired before completing (execution.checkpointing.timeout = {:?})",
                    self.timeout
                );
                return self.abort_pending(reason, now);
            }
            return None;
        }
        if !sources_running || now.saturating_sub(self.last_end) < self.interval {
            return None;
        }
        let checkpoint = self.next_id;
        self.next_id += 1;
        self.pending = Some(Pending {
            checkpoint,
            is_final: false,
            triggered_at: now,
            acks: BTreeMap::new(),
            alignment: Duration::ZERO,
        });
        Some(Action::Trigger { checkpoint })
    }

    /// Every task has finished or waits for the final commit: triggers the
    /// final checkpoint now (aborting one in flight), unless it is pending.
    pub fn trigger_final(&mut self, now: Duration) -> Vec<Action<H>> {
        if self.final_completed || self.pending.as_ref().is_some_and(|p| p.is_final) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        actions.extend(self.abort_pending("the final checkpoint supersedes it".into(), now));
        let checkpoint = self.next_id;
        self.next_id += 1;
        self.pending = Some(Pending {
            checkpoint,
            is_final: true,
            triggered_at: now,
            acks: BTreeMap::new(),
            alignment: Duration::ZERO,
        });
        actions.push(Action::Trigger { checkpoint });
        actions
    }

    /// Whether the checkpoint in flight is the final one.
    pub fn pending_is_final(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.is_final)
    }

    /// Task `task` acknowledged `checkpoint` with `handle`.
    pub fn on_ack(
        &mut self,
        checkpoint: u64,
        task: TaskKey,
        handle: H,
        alignment: Duration,
        now: Duration,
    ) -> Option<Action<H>> {
        let p = self.pending.as_mut()?;
        if p.checkpoint != checkpoint || !self.tasks.contains(&task) {
            return None;
        }
        p.acks.insert(task, handle);
        p.alignment = p.alignment.max(alignment);
        self.complete_if_acknowledged(now)
    }

    /// Completes the pending checkpoint once every task that has not
    /// finished acknowledged it.
    fn complete_if_acknowledged(&mut self, now: Duration) -> Option<Action<H>> {
        let p = self.pending.as_ref()?;
        let done = self
            .tasks
            .iter()
            .all(|t| p.acks.contains_key(t) || self.finished.contains(t));
        if !done {
            return None;
        }
        let p = self.pending.take().expect("pending checkpoint");
        self.last_end = now;
        self.completing_final = p.is_final;
        // After the final checkpoint every task counts as finished: a
        // restore commits the staged output and replays nothing.
        let finished = self
            .finished
            .iter()
            .filter(|t| p.is_final || !p.acks.contains_key(t))
            .copied()
            .chain(
                p.is_final
                    .then(|| p.acks.keys().copied())
                    .into_iter()
                    .flatten(),
            )
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Some(Action::Complete {
            checkpoint: p.checkpoint,
            handles: p.acks.into_values().collect(),
            duration: now.saturating_sub(p.triggered_at),
            alignment: p.alignment,
            finished,
        })
    }

    /// Task `task` could not take `checkpoint`.
    pub fn on_decline(
        &mut self,
        checkpoint: u64,
        task: TaskKey,
        reason: &str,
        now: Duration,
    ) -> Option<Action<H>> {
        if self.pending() != Some(checkpoint) {
            return None;
        }
        let reason = format!("task {}/{} declined: {reason}", task.0, task.1);
        self.abort_pending(reason, now)
    }

    /// Task `task` finished. A task finishes only after every input ended,
    /// so a barrier it has not acknowledged never reached it: everything it
    /// produced is already in its consumers' state. Checkpoints go on
    /// without it and record it as finished (Flink's FLIP-147).
    pub fn on_task_finished(&mut self, task: TaskKey, now: Duration) -> Option<Action<H>> {
        if !self.tasks.contains(&task) || !self.finished.insert(task) {
            return None;
        }
        self.complete_if_acknowledged(now)
    }

    /// The caller finalized a `Complete` action: record it.
    pub fn record_completed(
        &mut self,
        checkpoint: u64,
        duration: Duration,
        alignment: Duration,
        size_bytes: u64,
    ) {
        self.completed += 1;
        self.final_completed |= std::mem::take(&mut self.completing_final);
        self.push(CheckpointStats {
            id: checkpoint,
            status: CheckpointStatus::Completed,
            duration_ms: duration.as_millis() as u64,
            size_bytes,
            alignment_ms: alignment.as_millis() as u64,
            reason: None,
        });
    }

    /// The caller could not finalize a `Complete` action.
    pub fn record_failed(&mut self, checkpoint: u64, duration: Duration, reason: String) {
        self.failed += 1;
        // A final checkpoint that could not be stored is taken again.
        self.completing_final = false;
        self.push(CheckpointStats {
            id: checkpoint,
            status: CheckpointStatus::Failed,
            duration_ms: duration.as_millis() as u64,
            size_bytes: 0,
            alignment_ms: 0,
            reason: Some(reason),
        });
    }

    pub fn summary(&self) -> CheckpointSummary {
        CheckpointSummary {
            completed: self.completed,
            failed: self.failed,
            history: self.history.iter().cloned().collect(),
            restored_from: self.restored_from,
        }
    }

    fn abort_pending(&mut self, reason: String, now: Duration) -> Option<Action<H>> {
        let p = self.pending.take()?;
        self.last_end = now;
        self.failed += 1;
        self.push(CheckpointStats {
            id: p.checkpoint,
            status: CheckpointStatus::Failed,
            duration_ms: now.saturating_sub(p.triggered_at).as_millis() as u64,
            size_bytes: 0,
            alignment_ms: p.alignment.as_millis() as u64,
            reason: Some(reason.clone()),
        });
        Some(Action::Abort {
            checkpoint: p.checkpoint,
            reason,
        })
    }

    fn push(&mut self, stats: CheckpointStats) {
        if self.history.len() == HISTORY_MAX {
            self.history.pop_front();
        }
        self.history.push_back(stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn coordinator() -> Coordinator<&'static str> {
        let mut c = Coordinator::new(S, 10 * S);
        assert_eq!(
            c.start_attempt([(0, 0), (1, 0)], None, Duration::ZERO),
            None
        );
        c
    }

    #[test]
    fn triggers_after_the_interval_and_completes_when_every_task_acknowledged() {
        let mut c = coordinator();
        assert_eq!(c.tick(S / 2, true), None);
        assert_eq!(c.tick(S, true), Some(Action::Trigger { checkpoint: 1 }));
        assert_eq!(c.tick(2 * S, true), None, "one checkpoint at a time");
        assert_eq!(c.on_ack(1, (0, 0), "a", Duration::ZERO, 2 * S), None);
        assert_eq!(c.on_ack(1, (0, 0), "a", Duration::ZERO, 2 * S), None);
        let done = c.on_ack(1, (1, 0), "b", Duration::ZERO, 3 * S);
        assert_eq!(
            done,
            Some(Action::Complete {
                checkpoint: 1,
                handles: vec!["a", "b"],
                duration: 2 * S,
                alignment: Duration::ZERO,
                finished: vec![],
            })
        );
        // The next one is due an interval after this one ended.
        assert_eq!(c.tick(3 * S + S / 2, true), None);
        assert_eq!(c.tick(4 * S, true), Some(Action::Trigger { checkpoint: 2 }));
    }

    #[test]
    fn a_checkpoint_that_outlives_the_timeout_is_aborted() {
        let mut c = coordinator();
        c.tick(S, true);
        assert_eq!(c.tick(10 * S, true), None);
        let Some(Action::Abort { checkpoint, reason }) = c.tick(11 * S, true) else {
            panic!("not aborted");
        };
        assert_eq!(checkpoint, 1);
        assert!(
            reason.contains("execution.checkpointing.timeout"),
            "{reason}"
        );
        // A late acknowledgement of it is ignored.
        assert_eq!(c.on_ack(1, (0, 0), "a", Duration::ZERO, 11 * S), None);
        assert_eq!(c.summary().failed, 1);
    }

    #[test]
    fn a_decline_aborts_and_stale_messages_are_ignored() {
        let mut c = coordinator();
        c.tick(S, true);
        assert!(matches!(
            c.on_decline(1, (1, 0), "disk full", S),
            Some(Action::Abort { .. })
        ));
        c.tick(2 * S, true);
        assert_eq!(c.on_decline(1, (1, 0), "late", 2 * S), None);
    }

    #[test]
    fn checkpoints_go_on_without_finished_tasks_and_record_them() {
        let mut c = coordinator();
        c.tick(S, true);
        c.on_ack(1, (0, 0), "a", Duration::ZERO, S);
        // Finishing after acknowledging: its state is in the checkpoint.
        assert_eq!(c.on_task_finished((0, 0), S), None);
        let Some(Action::Complete {
            handles, finished, ..
        }) = c.on_task_finished((1, 0), S)
        else {
            panic!("not completed");
        };
        assert_eq!((handles, finished), (vec!["a"], vec![(1, 0)]));
        // The next one expects neither.
        c.tick(2 * S, true);
        assert_eq!(c.on_task_finished((1, 0), 2 * S), None);
    }

    #[test]
    fn the_final_checkpoint_records_every_task_as_finished() {
        let mut c = coordinator();
        c.tick(S, true);
        assert_eq!(c.on_task_finished((0, 0), S), None);
        let actions = c.trigger_final(2 * S);
        assert!(matches!(actions[0], Action::Abort { checkpoint: 1, .. }));
        assert_eq!(actions[1], Action::Trigger { checkpoint: 2 });
        assert!(c.pending_is_final());
        assert!(c.trigger_final(2 * S).is_empty(), "already pending");
        let Some(Action::Complete {
            handles, finished, ..
        }) = c.on_ack(2, (1, 0), "sink", Duration::ZERO, 3 * S)
        else {
            panic!("not completed");
        };
        assert_eq!((handles, finished), (vec!["sink"], vec![(0, 0), (1, 0)]));
        c.record_failed(2, S, "disk full".into());
        assert_eq!(
            c.trigger_final(4 * S),
            vec![Action::Trigger { checkpoint: 3 }]
        );
        c.on_ack(3, (1, 0), "sink", Duration::ZERO, 4 * S);
        c.record_completed(3, S, Duration::ZERO, 1);
        assert!(c.trigger_final(5 * S).is_empty(), "taken once per attempt");
    }

    #[test]
    fn no_trigger_while_a_source_cannot_inject_a_barrier() {
        let mut c = coordinator();
        assert_eq!(c.tick(5 * S, false), None);
        assert_eq!(c.tick(5 * S, true), Some(Action::Trigger { checkpoint: 1 }));
    }

    #[test]
    fn ids_keep_growing_across_restarts_and_the_pending_one_is_aborted() {
        let mut c = coordinator();
        c.tick(S, true);
        let abort = c.start_attempt([(0, 0)], Some(7), 2 * S);
        assert!(matches!(abort, Some(Action::Abort { checkpoint: 1, .. })));
        assert_eq!(c.tick(3 * S, true), Some(Action::Trigger { checkpoint: 8 }));
        assert_eq!(c.summary().restored_from, Some(7));
    }
}
