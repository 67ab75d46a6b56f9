//! The simulator's invariants (see the module doc of `super`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{CANCEL_MAX, HEARTBEAT_INTERVAL, Outcome, Sim, TICK};
use crate::protocol::{ExecutionId, JobState, JobSummary};

/// Slack for messages in flight (the slow-network fault included).
const NET_SLACK: Duration = Duration::from_millis(1000);

pub fn after_step(sim: &mut Sim) {
    slots_hold_live_tasks(sim);
    told_slots_free_in_time(sim);
    one_execution_per_slot(sim);
    views_agree(sim);
    restarts_are_timely(sim);
    lost_taskmanagers_learn_it(sim);
}

/// 5 (second half): a TaskManager instance the JobManager no longer knows
/// (declared lost) learns it at once — it is told and its connection
/// closed — instead of running on as a zombie whose heartbeats are answered.
fn lost_taskmanagers_learn_it(sim: &mut Sim) {
    let now = sim.now;
    let Some(jm) = &sim.jm else {
        sim.zombie_since.clear();
        return;
    };
    let mut found = Vec::new();
    for tm in &sim.tms {
        let known = match (tm.registered, tm.alive, tm.paused_until, tm.conn) {
            (Some(id), true, None, Some(conn)) => {
                jm.rm.get(id).is_some_and(|entry| entry.conn.0 == conn)
            }
            _ => true,
        };
        if known {
            sim.zombie_since.remove(&tm.index);
            continue;
        }
        let since = *sim.zombie_since.entry(tm.index).or_insert(now);
        if now > since + NET_SLACK + TICK {
            found.push(format!(
                "invariant 5: TaskManager {} still believes it is registered {:?} after the JobManager declared it lost",
                tm.index,
                now - since
            ));
        }
    }
    sim.violations.extend(found);
}

/// 2 (first half): a held slot has a live task of its execution, or the
/// execution was never told to end and a task is pending.
fn slots_hold_live_tasks(sim: &mut Sim) {
    for tm in sim.tms.iter().filter(|t| t.alive) {
        let live: HashSet<(u64, usize)> = tm.live().map(|(e, _, slot)| (e.0, slot)).collect();
        for occupied in tm.slots.occupied() {
            if !live.contains(&(occupied.job, occupied.index)) {
                sim.violations.push(format!(
                    "invariant 2: TaskManager {} slot {} is held by execution {:016x}, which has no live task there (a leaked slot)",
                    tm.index, occupied.index, occupied.job
                ));
            }
        }
    }
}

/// 2 (second half): once told, an execution's slots free within the time
/// its tasks take to stop.
fn told_slots_free_in_time(sim: &mut Sim) {
    let now = sim.now;
    for tm in sim
        .tms
        .iter()
        .filter(|t| t.alive && t.paused_until.is_none())
    {
        for occupied in tm.slots.occupied() {
            let execution = ExecutionId(occupied.job);
            if let Some(&told) = tm.told.get(&execution)
                && now > told + CANCEL_MAX + TICK
            {
                sim.violations.push(format!(
                    "invariant 2: TaskManager {} slot {} still held by execution {execution} {:?} after it was told to end it",
                    tm.index,
                    occupied.index,
                    now - told
                ));
            }
        }
    }
}

/// 3: no slot hosts live tasks of two executions.
fn one_execution_per_slot(sim: &mut Sim) {
    for tm in sim.tms.iter().filter(|t| t.alive) {
        let mut by_slot: HashMap<usize, HashSet<ExecutionId>> = HashMap::new();
        for (execution, _, slot) in tm.live() {
            by_slot.entry(slot).or_default().insert(execution);
        }
        for (slot, executions) in by_slot {
            if executions.len() > 1 {
                sim.violations.push(format!(
                    "invariant 3: TaskManager {} slot {slot} hosts live tasks of {} executions",
                    tm.index,
                    executions.len()
                ));
            }
        }
    }
}

/// 4: the JobManager's view of a TaskManager's slots equals its own once
/// stable for a heartbeat round.
fn views_agree(sim: &mut Sim) {
    let Some(jm) = &sim.jm else {
        return;
    };
    let now = sim.now;
    let mut found = Vec::new();
    for tm in &sim.tms {
        let (Some(id), true, None) = (tm.registered, tm.alive, tm.paused_until) else {
            continue;
        };
        let Some(entry) = jm.rm.get(id) else {
            continue;
        };
        if now < tm.report_since + HEARTBEAT_INTERVAL + NET_SLACK {
            continue;
        }
        if entry.reported != tm.report {
            found.push(format!(
                "invariant 4: the JobManager's view of {id} (TaskManager {}) differs from its own report, stable since {:?}",
                tm.index, tm.report_since
            ));
        }
    }
    sim.violations.extend(found);
}

/// 6: a restart starts within its delay once the failed execution drained:
/// within two ticks of the moment its delay has passed, its failed tasks
/// have ended (or their TaskManager was declared lost), and the slots it
/// needs are free or cannot become free (then it fails over again).
fn restarts_are_timely(sim: &mut Sim) {
    let Some(jm) = &sim.jm else {
        sim.restart_watch.clear();
        return;
    };
    let now = sim.now;
    let free = jm.rm.free_slots().len();
    let releasing = jm.rm.releasing_slots();
    let mut waiting = HashSet::new();
    let mut late = Vec::new();
    for job in jm.jobs.values() {
        let Some(restart_at) = job.restart_at else {
            continue;
        };
        let needed = job.graph.slots_needed() as usize;
        let slots_settled = free >= needed || free + releasing < needed;
        if now < restart_at || !job.draining.is_empty() || !slots_settled {
            continue;
        }
        waiting.insert(job.id);
        let (watched_at, ready) = *sim
            .restart_watch
            .entry(job.id)
            .and_modify(|w| {
                if w.0 != restart_at {
                    *w = (restart_at, now);
                }
            })
            .or_insert((restart_at, now));
        debug_assert_eq!(watched_at, restart_at);
        if now > ready + TICK * 2 {
            late.push(format!(
                "invariant 6: job {} was ready to restart at {ready:?} (delay until {restart_at:?}), and has not by {now:?}",
                job.id
            ));
        }
    }
    sim.restart_watch.retain(|job, _| waiting.contains(job));
    sim.violations.extend(late);
}

/// 7: a FINISHED job had every task of one of its executions finish.
pub fn on_job_finished(sim: &mut Sim, summary: &JobSummary) {
    if summary.state == JobState::Finished {
        let done = sim
            .executions
            .values()
            .any(|r| r.job == summary.job && r.task_count > 0 && r.finished.len() == r.task_count);
        if !done {
            sim.violations.push(format!(
                "invariant 7: job {} reported FINISHED, but no execution of it finished all its tasks",
                summary.job
            ));
        }
    }
    if summary.state == JobState::Failed && summary.reason.as_deref().is_none_or(str::is_empty) {
        sim.violations.push(format!(
            "invariant 1: job {} failed without a cause",
            summary.job
        ));
    }
}

/// 1: every submitted job ended.
pub fn at_end(sim: &mut Sim) {
    for (i, client) in sim.clients.iter().enumerate() {
        match &client.outcome {
            None => sim.violations.push(format!(
                "invariant 1: the job of client {i} ({:?}) never ended",
                client.job
            )),
            Some(Outcome::Ended { .. } | Outcome::Rejected(_) | Outcome::JobManagerLost) => {}
        }
    }
}
