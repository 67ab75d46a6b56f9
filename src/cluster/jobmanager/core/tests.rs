//! Unit tests of the I/O-free JobManager core, driven event by event.
//!
//! A [`Harness`] plays the shell: it numbers connections, registers
//! TaskManagers, plans and submits small jobs, reports task states and moves
//! the clock (every advance ticks). Checkpoints go to an in-memory store whose
//! log the tests read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::*;
use crate::checkpoint::coordinator::TaskKey;
use crate::checkpoint::storage::StateHandle;
use crate::config::RestartStrategyKind;
use crate::protocol::{
    CheckpointId, ExecutionId, ExecutionState, JobState, ResourceProfile, RestoreDeployment,
    SlotState, SlotStatus, SubtaskLocation, TaskManagerId,
};

// ---------------------------------------------------------------- jobs

/// datagen → key_by aggregate → print, at `parallelism`; the source runs
/// at `source_parallelism`.
fn job_text(parallelism: u32, source_parallelism: u32) -> String {
    format!(
        r#"[job]
name = "core-test"
parallelism = {parallelism}

[[operator]]
name = "gen"
type = "datagen"
rows = 100
keys = 10
parallelism = {source_parallelism}

[[operator]]
name = "by-key"
type = "key_by"
keys = ["key"]

[[operator]]
name = "totals"
type = "aggregate"
aggs = ["count(*) as cnt"]

[[operator]]
name = "out"
type = "print"
"#
    )
}

/// Plans `text` as the shell's `plan_job` does, with the built-in
/// calibration (no calibration file is read) and no GPU.
fn planned(text: &str) -> Box<PlannedJob> {
    Box::new(crate::cluster::sim::plan_text(text))
}

// ---------------------------------------------------------------- checkpoint store

/// What the in-memory stores were asked to do, for every job.
#[derive(Default, Debug)]
struct StoreLog {
    begun: Vec<u64>,
    completed: Vec<(u64, usize)>,
    aborted: Vec<u64>,
    ended: Vec<JobState>,
}

type SharedLog = Arc<Mutex<StoreLog>>;

fn log_of(log: &SharedLog) -> std::sync::MutexGuard<'_, StoreLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

struct MemoryStores {
    on: bool,
    log: SharedLog,
}

impl CheckpointStoreFactory for MemoryStores {
    fn open(&self, _name: &str, _job: JobId) -> Result<Option<Box<dyn CheckpointStore>>, String> {
        Ok(self.on.then(|| {
            Box::new(MemoryStore {
                dir: PathBuf::from("/memory/core-test"),
                latest: None,
                log: Arc::clone(&self.log),
            }) as Box<dyn CheckpointStore>
        }))
    }
}

struct MemoryStore {
    dir: PathBuf,
    latest: Option<RestoreDeployment>,
    log: SharedLog,
}

impl CheckpointStore for MemoryStore {
    fn job_dir(&self) -> &Path {
        &self.dir
    }

    fn begin(&mut self, id: u64) -> Result<(), String> {
        log_of(&self.log).begun.push(id);
        Ok(())
    }

    fn complete(
        &mut self,
        id: u64,
        handles: Vec<StateHandle>,
        finished: Vec<TaskKey>,
        _duration: Duration,
    ) -> Result<u64, String> {
        log_of(&self.log).completed.push((id, handles.len()));
        let size = handles.iter().map(|h| h.size_bytes).sum();
        self.latest = Some(RestoreDeployment {
            checkpoint: CheckpointId(id),
            dir: self.dir.join(format!("chk-{id}")),
            handles,
            finished,
        });
        Ok(size)
    }

    fn abort(&mut self, id: u64) {
        log_of(&self.log).aborted.push(id);
    }

    fn latest(&self) -> Option<RestoreDeployment> {
        self.latest.clone()
    }

    fn job_ended(&mut self, state: JobState) {
        log_of(&self.log).ended.push(state);
    }
}

// ---------------------------------------------------------------- harness

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
const RESTART_DELAY: Duration = Duration::from_secs(1);
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// Heartbeats every second, declared lost after 5 s of silence;
/// fixed-delay restarts (`attempts`, 1 s apart).
fn config(attempts: u32) -> Config {
    let mut config = Config::default();
    config.heartbeat_interval = Duration::from_secs(1);
    config.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    config.restart_strategy = Some(RestartStrategyKind::FixedDelay);
    config.restart_fixed_delay_attempts = attempts;
    config.restart_fixed_delay_delay = RESTART_DELAY;
    config
}

fn slot(index: usize, execution: Option<ExecutionId>) -> SlotStatus {
    SlotStatus {
        index,
        state: if execution.is_some() {
            SlotState::Active
        } else {
            SlotState::Free
        },
        execution,
        profile: ResourceProfile {
            cpu_cores: 1.0,
            managed_memory_bytes: 0,
            network_memory_bytes: 0,
            gpu: None,
        },
    }
}

fn free_slots(count: usize) -> Vec<SlotStatus> {
    (0..count).map(|i| slot(i, None)).collect()
}

/// A registered TaskManager as the harness knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tm {
    conn: ConnId,
    id: TaskManagerId,
}

/// One `DeployTasks`, as sent.
#[derive(Clone, Debug)]
struct Deploy {
    conn: ConnId,
    job: JobId,
    execution: ExecutionId,
    attempt: u32,
    tasks: Vec<(usize, u32)>,
    placement: Vec<SubtaskLocation>,
    checkpointing: Option<crate::protocol::CheckpointDeployment>,
}

struct Harness {
    core: JobManagerCore,
    now: Duration,
    next_conn: u64,
    log: SharedLog,
}

impl Harness {
    fn new(config: Config) -> Self {
        Self::build(config, false)
    }

    /// Checkpoints every [`CHECKPOINT_INTERVAL`] into the in-memory store.
    fn with_checkpoints(mut config: Config) -> Self {
        config.checkpoint_interval = Some(CHECKPOINT_INTERVAL);
        Self::build(config, true)
    }

    fn build(config: Config, checkpoints: bool) -> Self {
        let log = SharedLog::default();
        let stores = MemoryStores {
            on: checkpoints,
            log: Arc::clone(&log),
        };
        Self {
            core: JobManagerCore::new(CoreConfig::new(config), 7, Box::new(stores)),
            now: Duration::ZERO,
            next_conn: 0,
            log,
        }
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        ConnId(self.next_conn)
    }

    fn send(&mut self, conn: ConnId, message: Message) -> Vec<Command> {
        self.core.handle(self.now, Event::Message { conn, message })
    }

    fn register_on(&mut self, conn: ConnId, slots: Vec<SlotStatus>) -> Vec<Command> {
        let port = 9000 + conn.0 as u16;
        self.send(
            conn,
            Message::RegisterTaskManager {
                data_addr: SocketAddr::from(([127, 0, 0, 1], port)),
                slots,
                io: "thread pool (unit test)".into(),
                transport: "local (unit test)".into(),
                gpu: "no GPU (unit test)".into(),
                flight_addr: None,
            },
        )
    }

    fn register_tm(&mut self, slot_count: usize) -> Tm {
        let conn = self.conn();
        let out = self.register_on(conn, free_slots(slot_count));
        let id = sent_to(&out, conn)
            .find_map(|m| match m {
                Message::Registered { taskmanager } => Some(*taskmanager),
                _ => None,
            })
            .expect("Registered");
        Tm { conn, id }
    }

    fn submit_planned(&mut self, job: Box<PlannedJob>) -> (ConnId, Vec<Command>) {
        let conn = self.conn();
        let out = self
            .core
            .handle(self.now, Event::Submit { conn, job: Ok(job) });
        (conn, out)
    }

    fn submit(&mut self, text: &str) -> (ConnId, Vec<Command>) {
        self.submit_planned(planned(text))
    }

    /// Submits a job that must be accepted; returns its client, id and
    /// deployments.
    fn submit_ok(&mut self, text: &str) -> (ConnId, JobId, Vec<Deploy>) {
        let (client, out) = self.submit(text);
        let job = accepted(&out, client).expect("JobAccepted");
        let deploys = deployments(&out);
        assert!(!deploys.is_empty(), "no DeployTasks in {out:?}");
        (client, job, deploys)
    }

    fn report(
        &mut self,
        tm_conn: ConnId,
        execution: ExecutionId,
        task: TaskKey,
        state: ExecutionState,
    ) -> Vec<Command> {
        let error = (state == ExecutionState::Failed).then(|| "boom: the task failed".to_owned());
        self.send(
            tm_conn,
            Message::TaskStatus {
                execution,
                vertex: task.0,
                subtask: task.1,
                state,
                error,
                metrics: None,
            },
        )
    }

    /// Every deployed task reports `states` in order; returns all commands.
    fn report_all(&mut self, deploys: &[Deploy], states: &[ExecutionState]) -> Vec<Command> {
        let mut out = Vec::new();
        for d in deploys {
            for &task in &d.tasks {
                for &state in states {
                    out.extend(self.report(d.conn, d.execution, task, state));
                }
            }
        }
        out
    }

    fn run_all(&mut self, deploys: &[Deploy]) -> Vec<Command> {
        use ExecutionState::*;
        self.report_all(deploys, &[Deploying, Initializing, Running])
    }

    fn heartbeat(&mut self, tm: Tm, slots: Vec<SlotStatus>) -> Vec<Command> {
        self.send(tm.conn, Message::Heartbeat { slots, usage: None })
    }

    /// Moves the clock by `ms` and ticks.
    fn advance(&mut self, ms: u64) -> Vec<Command> {
        self.now += Duration::from_millis(ms);
        self.core.handle(self.now, Event::Tick)
    }

    /// Moves the clock by `ms` in 1 s steps; each of `alive` heartbeats
    /// with `slots` free slots before each tick.
    fn advance_alive(&mut self, ms: u64, alive: &[(Tm, usize)]) -> Vec<Command> {
        let mut out = Vec::new();
        let mut left = ms;
        while left > 0 {
            let step = left.min(1000);
            for &(tm, count) in alive {
                out.extend(self.heartbeat(tm, free_slots(count)));
            }
            out.extend(self.advance(step));
            left -= step;
        }
        out
    }

    fn close(&mut self, conn: ConnId) -> Vec<Command> {
        self.core.handle(
            self.now,
            Event::Closed {
                conn,
                reason: "peer closed".into(),
            },
        )
    }
}

// ---------------------------------------------------------------- command readers

fn sent_to(out: &[Command], to: ConnId) -> impl Iterator<Item = &Message> {
    out.iter().filter_map(move |c| match c {
        Command::Send { conn, message } if *conn == to => Some(message),
        _ => None,
    })
}

fn kinds_to(out: &[Command], to: ConnId) -> Vec<&'static str> {
    sent_to(out, to).map(Message::kind).collect()
}

fn closed(out: &[Command], to: ConnId) -> bool {
    out.iter()
        .any(|c| matches!(c, Command::Close { conn, .. } if *conn == to))
}

fn accepted(out: &[Command], client: ConnId) -> Option<JobId> {
    sent_to(out, client).find_map(|m| match m {
        Message::JobAccepted { job, .. } => Some(*job),
        _ => None,
    })
}

fn rejected(out: &[Command], client: ConnId) -> Option<String> {
    sent_to(out, client).find_map(|m| match m {
        Message::JobRejected { reason } => Some(reason.clone()),
        _ => None,
    })
}

fn finished(out: &[Command], client: ConnId) -> Option<JobSummary> {
    sent_to(out, client).find_map(|m| match m {
        Message::JobFinished { summary } => Some((**summary).clone()),
        _ => None,
    })
}

fn deployments(out: &[Command]) -> Vec<Deploy> {
    out.iter()
        .filter_map(|c| match c {
            Command::Send {
                conn,
                message:
                    Message::DeployTasks {
                        job,
                        execution,
                        attempt,
                        tasks,
                        placement,
                        checkpointing,
                        ..
                    },
            } => Some(Deploy {
                conn: *conn,
                job: *job,
                execution: *execution,
                attempt: *attempt,
                tasks: tasks.clone(),
                placement: placement.clone(),
                checkpointing: checkpointing.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Executions canceled on `to`.
fn cancels_to(out: &[Command], to: ConnId) -> Vec<ExecutionId> {
    sent_to(out, to)
        .filter_map(|m| match m {
            Message::CancelJob { execution, .. } => Some(*execution),
            _ => None,
        })
        .collect()
}

fn handle(task: TaskKey) -> StateHandle {
    StateHandle {
        vertex: task.0,
        subtask: task.1,
        file: format!("{}-{}.state", task.0, task.1),
        size_bytes: 10,
        crc32c: 0,
    }
}

fn ack(execution: ExecutionId, task: TaskKey, checkpoint: CheckpointId) -> Message {
    Message::AcknowledgeCheckpoint {
        execution,
        vertex: task.0,
        subtask: task.1,
        checkpoint,
        handle: handle(task),
        alignment_ms: 0,
    }
}

fn triggered(out: &[Command]) -> Vec<(ConnId, CheckpointId)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Send {
                conn,
                message: Message::TriggerCheckpoint { checkpoint, .. },
            } => Some((*conn, *checkpoint)),
            _ => None,
        })
        .collect()
}

/// A cluster of `tms` TaskManagers with `slots` each, running one job of
/// parallelism `parallelism` whose tasks all reported RUNNING.
fn running_job(
    h: &mut Harness,
    tms: usize,
    slots: usize,
    parallelism: u32,
) -> (Vec<Tm>, ConnId, JobId, Vec<Deploy>) {
    let tms: Vec<Tm> = (0..tms).map(|_| h.register_tm(slots)).collect();
    let (client, job, deploys) = h.submit_ok(&job_text(parallelism, parallelism));
    h.run_all(&deploys);
    (tms, client, job, deploys)
}

fn deploy_on(deploys: &[Deploy], tm: Tm) -> &Deploy {
    deploys
        .iter()
        .find(|d| d.conn == tm.conn)
        .expect("a deployment to the TaskManager")
}

// ================================================================ registration

#[test]
fn each_registration_gets_a_fresh_taskmanager_id() {
    let mut h = Harness::new(config(1));
    let first = h.register_tm(2);
    let second = h.register_tm(2);
    assert_ne!(first.id, second.id);
    // The first process loses its connection and registers again: a new
    // instance, never its old id.
    h.close(first.conn);
    let again = h.register_tm(2);
    assert_ne!(again.id, first.id);
    assert_ne!(again.id, second.id);
    assert_eq!(h.core.taskmanager_count(), 2);
}

#[test]
fn a_second_registration_on_one_connection_is_ignored() {
    let mut h = Harness::new(config(1));
    let tm = h.register_tm(2);
    let out = h.register_on(tm.conn, free_slots(4));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.core.taskmanager_count(), 1);
    assert_eq!(h.core.snapshot(h.now).taskmanagers[0].slots.len(), 2);
}

#[test]
fn an_unregistered_connection_that_does_not_register_is_refused() {
    let mut h = Harness::new(config(1));
    let conn = h.conn();
    let out = h.send(
        conn,
        Message::Heartbeat {
            slots: vec![],
            usage: None,
        },
    );
    let reason = sent_to(&out, conn)
        .find_map(|m| match m {
            Message::Disconnect { reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("Disconnect");
    assert!(reason.contains("Heartbeat before registering"), "{reason}");
    assert!(closed(&out, conn));
    // The connection is fenced: registering on it afterwards is not read.
    assert!(h.register_on(conn, free_slots(1)).is_empty());
    assert_eq!(h.core.taskmanager_count(), 0);
}

#[test]
fn a_heartbeat_is_acknowledged() {
    let mut h = Harness::new(config(1));
    let tm = h.register_tm(1);
    let out = h.heartbeat(tm, free_slots(1));
    assert_eq!(kinds_to(&out, tm.conn), ["HeartbeatAck"]);
}

// ================================================================ submission

#[test]
fn a_job_needing_more_slots_than_are_free_is_rejected_with_the_numbers() {
    let mut h = Harness::new(config(1));
    h.register_tm(1);
    let (client, out) = h.submit(&job_text(3, 3));
    let reason = rejected(&out, client).expect("JobRejected");
    assert!(reason.contains("needs 3"), "{reason}");
    assert!(
        reason.contains("1 free of 1 on 1 TaskManager(s)"),
        "{reason}"
    );
    assert!(deployments(&out).is_empty());
    assert!(h.core.snapshot(h.now).running.is_empty());
}

#[test]
fn a_job_the_shell_could_not_plan_is_rejected_with_its_reason() {
    let mut h = Harness::new(config(1));
    h.register_tm(1);
    let client = h.conn();
    let out = h.core.handle(
        h.now,
        Event::Submit {
            conn: client,
            job: Err("core-test.toml:3: unknown operator type 'nope'".into()),
        },
    );
    let reason = rejected(&out, client).expect("JobRejected");
    assert!(reason.contains("unknown operator type 'nope'"), "{reason}");
}

#[test]
fn an_accepted_job_gets_one_compact_deployment_per_taskmanager_covering_every_task_once() {
    let mut h = Harness::new(config(1));
    let tms: Vec<Tm> = (0..2).map(|_| h.register_tm(2)).collect();
    let job_planned = planned(&job_text(4, 2));
    let graph = Arc::clone(&job_planned.graph);
    let (client, out) = h.submit_planned(job_planned);
    let job = accepted(&out, client).expect("JobAccepted");
    let deploys = deployments(&out);
    let mut targets: Vec<ConnId> = deploys.iter().map(|d| d.conn).collect();
    targets.sort_unstable();
    assert_eq!(
        targets,
        [tms[0].conn, tms[1].conn],
        "one DeployTasks per TM"
    );
    let mut covered: Vec<(usize, u32)> = Vec::new();
    for d in &deploys {
        assert_eq!((d.job, d.attempt), (job, 0));
        assert_eq!(d.execution, deploys[0].execution);
        assert_eq!(d.placement, deploys[0].placement, "one placement table");
        let tm = tms.iter().find(|t| t.conn == d.conn).expect("known TM");
        for &(_, subtask) in &d.tasks {
            assert_eq!(d.placement[subtask as usize].taskmanager, tm.id);
        }
        covered.extend(&d.tasks);
    }
    covered.sort_unstable();
    let mut expected: Vec<(usize, u32)> = graph
        .vertices
        .iter()
        .flat_map(|v| (0..v.parallelism).map(move |s| (v.id, s)))
        .collect();
    expected.sort_unstable();
    assert_eq!(covered, expected, "every (vertex, subtask) exactly once");
}

#[test]
fn a_job_is_spread_across_taskmanagers_before_filling_one() {
    let mut h = Harness::new(config(1));
    let tms: Vec<Tm> = (0..3).map(|_| h.register_tm(4)).collect();
    let (_, _, deploys) = h.submit_ok(&job_text(3, 3));
    let mut used: Vec<TaskManagerId> = deploys[0].placement.iter().map(|l| l.taskmanager).collect();
    used.sort_unstable();
    assert_eq!(used, tms.iter().map(|t| t.id).collect::<Vec<_>>());
}

#[test]
fn running_jobs_send_progress_to_their_client() {
    let mut h = Harness::new(config(1));
    let (tms, client, job, _) = running_job(&mut h, 1, 2, 2);
    let out = h.advance_alive(1000, &[(tms[0], 2)]);
    let progress = sent_to(&out, client)
        .find_map(|m| match m {
            Message::JobProgress {
                job: j,
                tasks_running,
                tasks_total,
                ..
            } => Some((*j, *tasks_running, *tasks_total)),
            _ => None,
        })
        .expect("JobProgress");
    assert_eq!(progress.0, job);
    assert_eq!(progress.1, progress.2, "every task runs");
}

// ================================================================ job ends

#[test]
fn a_job_finishes_only_when_every_task_reported_finished() {
    let mut h = Harness::new(config(1));
    let (tms, client, job, deploys) = running_job(&mut h, 2, 1, 2);
    let all: Vec<(ConnId, TaskKey)> = deploys
        .iter()
        .flat_map(|d| d.tasks.iter().map(move |&t| (d.conn, t)))
        .collect();
    let execution = deploys[0].execution;
    let (last, rest) = all.split_last().expect("tasks");
    for &(conn, task) in rest {
        let out = h.report(conn, execution, task, ExecutionState::Finished);
        assert!(finished(&out, client).is_none(), "finished early");
    }
    let out = h.report(last.0, execution, last.1, ExecutionState::Finished);
    let summary = finished(&out, client).expect("JobFinished");
    assert_eq!((summary.job, summary.state), (job, JobState::Finished));
    for tm in &tms {
        assert!(
            sent_to(&out, tm.conn)
                .any(|m| matches!(m, Message::ReleaseJob { execution: e } if *e == execution)),
            "ReleaseJob to {}",
            tm.id
        );
    }
    let snapshot = h.core.snapshot(h.now);
    assert!(snapshot.running.is_empty());
    assert!(snapshot.taskmanagers.iter().all(|t| t.allocated == [None]));
}

#[test]
fn a_periodic_report_that_trails_a_tasks_end_does_not_replace_its_final_metrics() {
    let mut h = Harness::new(config(1));
    let (_tms, client, _, deploys) = running_job(&mut h, 2, 1, 2);
    let execution = deploys[0].execution;
    let all: Vec<(ConnId, TaskKey)> = deploys
        .iter()
        .flat_map(|d| d.tasks.iter().map(move |&t| (d.conn, t)))
        .collect();
    let status = |task: TaskKey, state, late_rows| Message::TaskStatus {
        execution,
        vertex: task.0,
        subtask: task.1,
        state,
        error: None,
        metrics: Some(crate::metrics::TaskSnapshot {
            late_rows,
            ..Default::default()
        }),
    };
    let (first, rest) = all.split_first().expect("tasks");
    h.send(first.0, status(first.1, ExecutionState::Finished, 10));
    // Snapshotted before the end, sent after it.
    h.send(first.0, status(first.1, ExecutionState::Running, 3));
    let mut out = Vec::new();
    for &(conn, task) in rest {
        out = h.send(conn, status(task, ExecutionState::Finished, 10));
    }
    let summary = finished(&out, client).expect("JobFinished");
    assert_eq!(summary.late_rows, 10 * all.len() as u64);
}

#[test]
fn a_freed_slot_is_scheduled_again_only_after_its_taskmanager_reports_it_free() {
    let mut h = Harness::new(config(1));
    let (tms, client, _, deploys) = running_job(&mut h, 1, 2, 2);
    let execution = deploys[0].execution;
    let held = vec![slot(0, Some(execution)), slot(1, Some(execution))];
    h.heartbeat(tms[0], held.clone());
    let out = h.report_all(&deploys, &[ExecutionState::Finished]);
    assert!(finished(&out, client).is_some());
    // The JobManager freed its allocations, but the TaskManager still holds
    // the slots: nothing is schedulable.
    let (second, out) = h.submit(&job_text(2, 2));
    let reason = rejected(&out, second).expect("JobRejected");
    assert!(reason.contains("0 free of 2"), "{reason}");
    // The TaskManager's report frees them.
    h.heartbeat(tms[0], free_slots(2));
    let (third, out) = h.submit(&job_text(2, 2));
    assert!(accepted(&out, third).is_some(), "{out:?}");
}

// ================================================================ authorization

#[test]
fn a_task_status_about_a_task_on_another_taskmanager_is_ignored() {
    let mut h = Harness::new(config(1));
    let (tms, client, _, deploys) = running_job(&mut h, 2, 1, 2);
    let execution = deploys[0].execution;
    let theirs = deploy_on(&deploys, tms[0]).tasks.clone();
    let mine = deploy_on(&deploys, tms[1]).tasks.clone();
    // tms[1] claims every task finished, its own and those of tms[0].
    let mut out = Vec::new();
    for &task in theirs.iter().chain(&mine) {
        out.extend(h.report(tms[1].conn, execution, task, ExecutionState::Finished));
    }
    assert!(
        finished(&out, client).is_none(),
        "finished on forged statuses"
    );
    // A forged failure does not fail the job either.
    let out = h.report(tms[1].conn, execution, theirs[0], ExecutionState::Failed);
    assert!(out.is_empty(), "{out:?}");
    let mut out = Vec::new();
    for &task in &theirs {
        out.extend(h.report(tms[0].conn, execution, task, ExecutionState::Finished));
    }
    assert_eq!(
        finished(&out, client).map(|s| s.state),
        Some(JobState::Finished)
    );
}

#[test]
fn a_status_for_an_unknown_execution_is_ignored() {
    let mut h = Harness::new(config(1));
    let (tms, client, _, deploys) = running_job(&mut h, 1, 2, 2);
    let task = deploys[0].tasks[0];
    let out = h.report(tms[0].conn, ExecutionId(42), task, ExecutionState::Failed);
    assert!(out.is_empty(), "{out:?}");
    let out = h.report_all(&deploys, &[ExecutionState::Finished]);
    assert_eq!(
        finished(&out, client).map(|s| s.restarts),
        Some(0),
        "no restart"
    );
}

#[test]
fn a_status_about_a_task_the_execution_does_not_have_is_ignored() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 1, 2, 2);
    let out = h.report(
        tms[0].conn,
        deploys[0].execution,
        (99, 0),
        ExecutionState::Failed,
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.core.snapshot(h.now).running[0].restarts, 0);
}

#[test]
fn nothing_a_fenced_taskmanager_sends_is_read() {
    let mut h = Harness::new(config(2));
    // Two TaskManagers with two slots each; the job runs on slot 0 of each.
    let (tms, client, _, deploys) = running_job(&mut h, 2, 2, 2);
    // tms[0] falls silent and is declared lost (fenced, not yet closed);
    // the job restarts on tms[1]'s two slots once its old tasks ended.
    let timeout = HEARTBEAT_TIMEOUT.as_millis() as u64;
    let out = h.advance_alive(timeout + 1000, &[(tms[1], 2)]);
    assert!(closed(&out, tms[0].conn));
    let survivor = deploy_on(&deploys, tms[1]).clone();
    let mut out = h.report_all(&[survivor], &[ExecutionState::Canceled]);
    out.extend(h.advance_alive(RESTART_DELAY.as_millis() as u64, &[(tms[1], 2)]));
    let redeploy = deployments(&out);
    assert_eq!(redeploy.len(), 1);
    assert_eq!(redeploy[0].conn, tms[1].conn);
    // The fenced connection's heartbeats, registrations and statuses about
    // the new execution go unanswered and change nothing.
    assert!(h.heartbeat(tms[0], free_slots(2)).is_empty());
    assert!(h.register_on(tms[0].conn, free_slots(2)).is_empty());
    let mut forged = redeploy[0].clone();
    forged.conn = tms[0].conn;
    let out = h.report_all(
        std::slice::from_ref(&forged),
        &[
            ExecutionState::Deploying,
            ExecutionState::Initializing,
            ExecutionState::Running,
            ExecutionState::Finished,
        ],
    );
    assert!(out.is_empty(), "{out:?}");
    assert!(finished(&out, client).is_none());
    assert_eq!(h.core.taskmanager_count(), 1);
}

// ================================================================ failover

/// Fails the first task deployed to `tm`; returns the commands.
fn fail_one(h: &mut Harness, deploys: &[Deploy], tm: Tm) -> Vec<Command> {
    let d = deploy_on(deploys, tm);
    h.report(tm.conn, d.execution, d.tasks[0], ExecutionState::Failed)
}

/// The tasks of `deploys` that are still running after `failed` failed
/// report CANCELED.
fn cancel_rest(h: &mut Harness, deploys: &[Deploy], failed: (ConnId, TaskKey)) -> Vec<Command> {
    let mut out = Vec::new();
    for d in deploys {
        for &task in &d.tasks {
            if (d.conn, task) != failed {
                out.extend(h.report(d.conn, d.execution, task, ExecutionState::Canceled));
            }
        }
    }
    out
}

#[test]
fn a_failed_task_cancels_the_execution_on_every_taskmanager() {
    let mut h = Harness::new(config(1));
    let (tms, client, _, deploys) = running_job(&mut h, 2, 1, 2);
    let out = fail_one(&mut h, &deploys, tms[0]);
    for tm in &tms {
        assert_eq!(cancels_to(&out, tm.conn), [deploys[0].execution]);
    }
    assert!(deployments(&out).is_empty(), "no restart before the delay");
    assert!(finished(&out, client).is_none());
    let snapshot = h.core.snapshot(h.now);
    assert_eq!(snapshot.running[0].restarts, 1);
    assert!(
        snapshot.running[0]
            .last_failure
            .as_deref()
            .is_some_and(|f| f.contains("boom")),
        "{:?}",
        snapshot.running[0].last_failure
    );
}

#[test]
fn a_restart_waits_for_the_delay_then_deploys_a_new_execution_with_the_next_attempt() {
    let mut h = Harness::new(config(1));
    let (tms, _, job, deploys) = running_job(&mut h, 2, 1, 2);
    fail_one(&mut h, &deploys, tms[0]);
    let failed = (tms[0].conn, deploy_on(&deploys, tms[0]).tasks[0]);
    let out = cancel_rest(&mut h, &deploys, failed);
    assert!(deployments(&out).is_empty(), "restarted before the delay");
    let out = h.advance(RESTART_DELAY.as_millis() as u64 - 1);
    assert!(deployments(&out).is_empty(), "restarted before the delay");
    let out = h.advance(1);
    let redeploy = deployments(&out);
    assert_eq!(redeploy.len(), 2, "{out:?}");
    for d in &redeploy {
        assert_eq!((d.job, d.attempt), (job, 1));
        assert_ne!(d.execution, deploys[0].execution, "a new execution id");
    }
}

#[test]
fn a_restart_waits_for_the_failed_tasks_to_end_but_not_for_the_heartbeat_timeout() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 2, 2, 2);
    let execution = deploys[0].execution;
    // The TaskManagers report their slots held by the execution.
    for tm in &tms {
        h.heartbeat(*tm, vec![slot(0, Some(execution)), slot(1, None)]);
    }
    fail_one(&mut h, &deploys, tms[0]);
    let out = h.advance(RESTART_DELAY.as_millis() as u64 + 100);
    assert!(
        deployments(&out).is_empty(),
        "restarted while tasks still run"
    );
    // As a TaskManager does, each reports its slot free before the ends.
    let mut out = Vec::new();
    for tm in &tms {
        out.extend(h.heartbeat(*tm, free_slots(2)));
    }
    let failed = (tms[0].conn, deploy_on(&deploys, tms[0]).tasks[0]);
    out.extend(cancel_rest(&mut h, &deploys, failed));
    assert_eq!(
        deployments(&out).len(),
        2,
        "restart right after the last end"
    );
    assert!(h.now < HEARTBEAT_TIMEOUT);
}

#[test]
fn a_restart_waits_for_a_silent_taskmanager_until_it_is_declared_lost() {
    let mut h = Harness::new(config(1));
    // Slot 0 of each runs the job; the spare slots take the restart.
    let (tms, _, _, deploys) = running_job(&mut h, 2, 2, 2);
    fail_one(&mut h, &deploys, tms[0]);
    let rest = deploy_on(&deploys, tms[0]).clone();
    let failed = (tms[0].conn, rest.tasks[0]);
    cancel_rest(&mut h, &[rest], failed);
    // tms[1] neither answers nor closes: the restart waits for it.
    let out = h.advance_alive(RESTART_DELAY.as_millis() as u64 + 1000, &[(tms[0], 2)]);
    assert!(deployments(&out).is_empty(), "{out:?}");
    assert!(h.core.snapshot(h.now).running[0].last_failure.is_some());
    // tms[1]'s connection closes: it is lost at once and the restart goes
    // ahead on tms[0]'s slots.
    let out = h.close(tms[1].conn);
    assert!(closed(&out, tms[1].conn));
    let out = h.advance(0);
    let redeploy = deployments(&out);
    assert_eq!(redeploy.len(), 1, "{out:?}");
    assert_eq!(redeploy[0].conn, tms[0].conn);
    assert_eq!(redeploy[0].attempt, 1);
}

#[test]
fn an_end_reported_by_another_taskmanager_does_not_release_a_draining_task() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 2, 1, 2);
    fail_one(&mut h, &deploys, tms[0]);
    h.advance(RESTART_DELAY.as_millis() as u64);
    // tms[0] reports the ends of tms[1]'s tasks: the restart still waits.
    let theirs = Deploy {
        conn: tms[0].conn,
        ..deploy_on(&deploys, tms[1]).clone()
    };
    let out = h.report_all(&[theirs], &[ExecutionState::Canceled]);
    assert!(deployments(&out).is_empty(), "{out:?}");
    let failed = (tms[0].conn, deploy_on(&deploys, tms[0]).tasks[0]);
    let out = cancel_rest(&mut h, &deploys, failed);
    assert_eq!(deployments(&out).len(), 2, "{out:?}");
}

#[test]
fn a_restart_waits_for_slots_still_reported_held_then_deploys_on_the_report() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 1, 2, 2);
    let execution = deploys[0].execution;
    let held = vec![slot(0, Some(execution)), slot(1, Some(execution))];
    h.heartbeat(tms[0], held.clone());
    fail_one(&mut h, &deploys, tms[0]);
    let failed = (tms[0].conn, deploys[0].tasks[0]);
    cancel_rest(&mut h, &deploys, failed);
    // The ends arrived, but the slot report saying so has not.
    let mut out = Vec::new();
    for _ in 0..2 {
        out.extend(h.heartbeat(tms[0], held.clone()));
        out.extend(h.advance(RESTART_DELAY.as_millis() as u64));
    }
    assert!(deployments(&out).is_empty(), "deployed onto held slots");
    h.heartbeat(tms[0], free_slots(2));
    let redeploy = deployments(&h.advance(0));
    assert_eq!(redeploy.len(), 1);
    assert_eq!(redeploy[0].attempt, 1);
}

#[test]
fn a_slot_report_with_the_wrong_slot_count_is_ignored() {
    let mut h = Harness::new(config(1));
    let tm = h.register_tm(2);
    let stale = ExecutionId(0xbad);
    let out = h.heartbeat(tm, vec![slot(0, Some(stale))]);
    assert_eq!(kinds_to(&out, tm.conn), ["HeartbeatAck"]);
    let info = &h.core.snapshot(h.now).taskmanagers[0];
    assert!(info.slots.iter().all(|s| s.execution.is_none()));
    assert_eq!(info.slots.len(), 2);
}

#[test]
fn a_late_status_of_the_old_execution_does_not_touch_the_new_one() {
    let mut h = Harness::new(config(2));
    let (tms, client, _, deploys) = running_job(&mut h, 2, 1, 2);
    fail_one(&mut h, &deploys, tms[0]);
    let failed = (tms[0].conn, deploy_on(&deploys, tms[0]).tasks[0]);
    cancel_rest(&mut h, &deploys, failed);
    let redeploy = deployments(&h.advance(RESTART_DELAY.as_millis() as u64));
    assert_eq!(redeploy.len(), 2);
    h.run_all(&redeploy);
    // The old execution's tasks report again, finishing and failing: the
    // new execution neither finishes nor restarts.
    let mut out = h.report_all(&deploys, &[ExecutionState::Finished]);
    out.extend(h.report_all(&deploys, &[ExecutionState::Failed]));
    assert!(finished(&out, client).is_none(), "{out:?}");
    for tm in &tms {
        assert!(!cancels_to(&out, tm.conn).contains(&redeploy[0].execution));
    }
    assert_eq!(h.core.snapshot(h.now).running[0].restarts, 1);
    let out = h.report_all(&redeploy, &[ExecutionState::Finished]);
    let summary = finished(&out, client).expect("JobFinished");
    assert_eq!((summary.state, summary.restarts), (JobState::Finished, 1));
}

#[test]
fn when_the_restart_strategy_gives_up_the_job_fails_naming_the_cause_and_the_strategy() {
    let mut h = Harness::new(config(0));
    let (tms, client, _, deploys) = running_job(&mut h, 2, 1, 2);
    let out = fail_one(&mut h, &deploys, tms[0]);
    let summary = finished(&out, client).expect("JobFinished");
    assert_eq!(summary.state, JobState::Failed);
    let reason = summary.reason.unwrap_or_default();
    assert!(reason.contains("boom: the task failed"), "{reason}");
    assert!(reason.contains("fixed-delay gave up"), "{reason}");
    assert!(
        reason.contains("restart-strategy.fixed-delay.attempts = 0"),
        "{reason}"
    );
    for tm in &tms {
        assert_eq!(cancels_to(&out, tm.conn), [deploys[0].execution]);
    }
    assert_eq!(h.core.snapshot(h.now).completed.len(), 1);
}

#[test]
fn a_restart_that_finds_too_few_slots_fails_over_again_until_the_strategy_gives_up() {
    let mut h = Harness::new(config(2));
    let (tms, client, _, deploys) = running_job(&mut h, 2, 1, 2);
    // tms[1] dies: one slot is left for a job that needs two.
    h.close(tms[1].conn);
    let rest = deploy_on(&deploys, tms[0]).clone();
    h.report_all(&[rest], &[ExecutionState::Canceled]);
    let mut out = Vec::new();
    for _ in 0..4 {
        out.extend(h.advance_alive(RESTART_DELAY.as_millis() as u64, &[(tms[0], 1)]));
    }
    let summary = finished(&out, client).expect("the job fails instead of waiting forever");
    assert_eq!(summary.state, JobState::Failed);
    let reason = summary.reason.unwrap_or_default();
    assert!(reason.contains("not enough free task slots"), "{reason}");
    assert!(reason.contains("gave up after 2 attempts"), "{reason}");
}

// ================================================================ lost TaskManagers

#[test]
fn a_silent_taskmanager_is_declared_lost_told_so_and_closed() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 2, 1, 2);
    let timeout = HEARTBEAT_TIMEOUT.as_millis() as u64;
    // tms[0] keeps heartbeating, tms[1] falls silent.
    let out = h.advance_alive(timeout, &[(tms[0], 1)]);
    assert!(!closed(&out, tms[1].conn), "lost before heartbeat.timeout");
    let out = h.advance_alive(1000, &[(tms[0], 1)]);
    let reason = sent_to(&out, tms[1].conn)
        .find_map(|m| match m {
            Message::Disconnect { reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("Disconnect");
    assert!(reason.contains("no heartbeat"), "{reason}");
    assert!(reason.contains(&tms[1].id.to_string()), "{reason}");
    assert!(closed(&out, tms[1].conn));
    assert!(!closed(&out, tms[0].conn));
    assert_eq!(h.core.taskmanager_count(), 1);
    // Its job fails over: the survivor cancels the execution.
    assert_eq!(cancels_to(&out, tms[0].conn), [deploys[0].execution]);
}

#[test]
fn a_closed_control_connection_loses_its_taskmanager_at_once() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 2, 1, 2);
    let out = h.close(tms[1].conn);
    assert_eq!(h.now, Duration::ZERO);
    assert_eq!(h.core.taskmanager_count(), 1);
    assert_eq!(cancels_to(&out, tms[0].conn), [deploys[0].execution]);
    let last_failure = h.core.snapshot(h.now).running[0].last_failure.clone();
    assert!(
        last_failure
            .as_deref()
            .is_some_and(|f| f.contains("control connection closed")),
        "{last_failure:?}"
    );
}

#[test]
fn a_deployment_never_acknowledged_fails_the_job_naming_the_task_and_taskmanager() {
    let mut no_restart = config(0);
    no_restart.restart_strategy = Some(RestartStrategyKind::None);
    let mut h = Harness::new(no_restart);
    let tm = h.register_tm(1);
    let (client, _, _) = h.submit_ok(&job_text(1, 1));
    let timeout = HEARTBEAT_TIMEOUT.as_millis() as u64;
    let out = h.advance_alive(timeout, &[(tm, 1)]);
    assert!(
        finished(&out, client).is_none(),
        "failed before the timeout"
    );
    let out = h.advance_alive(1000, &[(tm, 1)]);
    let summary = finished(&out, client).expect("JobFinished");
    assert_eq!(summary.state, JobState::Failed);
    let reason = summary.reason.unwrap_or_default();
    assert!(reason.contains("task 0/0"), "{reason}");
    assert!(
        reason.contains(&format!("deployed to {}", tm.id)),
        "{reason}"
    );
    assert!(reason.contains("was not acknowledged"), "{reason}");
    assert_eq!(h.core.taskmanager_count(), 1, "the TaskManager stays");
}

#[test]
fn an_acknowledged_deployment_outlives_the_deploy_timeout() {
    let mut h = Harness::new(config(0));
    let tm = h.register_tm(1);
    let (client, _, deploys) = h.submit_ok(&job_text(1, 1));
    h.report_all(&deploys, &[ExecutionState::Deploying]);
    let out = h.advance_alive(3 * HEARTBEAT_TIMEOUT.as_millis() as u64, &[(tm, 1)]);
    assert!(finished(&out, client).is_none(), "{out:?}");
}

#[test]
fn an_execution_a_taskmanager_holds_that_no_job_runs_is_canceled() {
    let mut h = Harness::new(config(1));
    let tm = h.register_tm(2);
    let stale = ExecutionId(0xdead);
    let out = h.heartbeat(tm, vec![slot(0, Some(stale)), slot(1, Some(stale))]);
    assert_eq!(cancels_to(&out, tm.conn), [stale], "one CancelJob");
    // A TaskManager that registers with a stale execution hears it at once.
    let conn = h.conn();
    let out = h.register_on(conn, vec![slot(0, Some(stale))]);
    assert_eq!(cancels_to(&out, conn), [stale]);
}

#[test]
fn a_running_execution_in_a_slot_report_is_left_alone() {
    let mut h = Harness::new(config(1));
    let (tms, _, _, deploys) = running_job(&mut h, 1, 2, 2);
    let execution = deploys[0].execution;
    let out = h.heartbeat(
        tms[0],
        vec![slot(0, Some(execution)), slot(1, Some(execution))],
    );
    assert!(cancels_to(&out, tms[0].conn).is_empty(), "{out:?}");
}

#[test]
fn a_deployment_over_the_frame_limit_fails_the_job_naming_its_size() {
    let mut h = Harness::new(config(1));
    let tm = h.register_tm(1);
    let mut job = planned(&job_text(1, 1));
    // A job text past the 16 MiB control frame limit (as a TOML comment).
    job.text.push('#');
    job.text
        .push_str(&"x".repeat(crate::protocol::FRAME_MAX_BYTES + 1));
    job.text.push('\n');
    let (client, out) = h.submit_planned(job);
    assert!(accepted(&out, client).is_some());
    assert!(deployments(&out).is_empty(), "an oversized frame was sent");
    let summary = finished(&out, client).expect("JobFinished at once");
    assert_eq!(summary.state, JobState::Failed);
    let reason = summary.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("deployment to {}", tm.id)),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "limit of {} bytes",
            crate::protocol::FRAME_MAX_BYTES
        )),
        "{reason}"
    );
    assert!(reason.contains("job text"), "{reason}");
    // Nothing stays allocated: a normal job is accepted right after.
    let (next, out) = h.submit(&job_text(1, 1));
    assert!(accepted(&out, next).is_some(), "{out:?}");
}

// ================================================================ checkpoints

/// A checkpointed job of parallelism 2 on two TaskManagers whose only
/// source subtask runs on the first; returns after the first trigger.
fn checkpointed_job(h: &mut Harness) -> (Vec<Tm>, ConnId, Vec<Deploy>, CheckpointId) {
    let tms: Vec<Tm> = (0..2).map(|_| h.register_tm(1)).collect();
    let (client, _, deploys) = h.submit_ok(&job_text(2, 1));
    h.run_all(&deploys);
    let alive: Vec<(Tm, usize)> = tms.iter().map(|&t| (t, 1)).collect();
    let before = h.advance_alive(CHECKPOINT_INTERVAL.as_millis() as u64 - 1000, &alive);
    assert!(
        triggered(&before).is_empty(),
        "triggered before the interval"
    );
    let out = h.advance_alive(1000, &alive);
    let sent = triggered(&out);
    assert_eq!(sent.len(), 1, "{out:?}");
    (tms, client, deploys, sent[0].1)
}

#[test]
fn a_checkpoint_is_triggered_after_the_interval_on_the_source_taskmanagers_only() {
    let mut h = Harness::with_checkpoints(config(1));
    let (tms, _, deploys, checkpoint) = checkpointed_job(&mut h);
    let source_tm = deploys[0].placement[0].taskmanager;
    assert_eq!(source_tm, tms[0].id);
    assert_eq!(checkpoint, CheckpointId(1));
    assert_eq!(log_of(&h.log).begun, [1]);
    assert!(deploys.iter().all(|d| d.checkpointing.is_some()));
}

#[test]
fn a_checkpoint_every_task_acknowledged_is_stored_and_completed_everywhere() {
    let mut h = Harness::with_checkpoints(config(1));
    let (tms, _, deploys, checkpoint) = checkpointed_job(&mut h);
    let execution = deploys[0].execution;
    let all: Vec<(ConnId, TaskKey)> = deploys
        .iter()
        .flat_map(|d| d.tasks.iter().map(move |&t| (d.conn, t)))
        .collect();
    let (last, rest) = all.split_last().expect("tasks");
    for &(conn, task) in rest {
        let out = h.send(conn, ack(execution, task, checkpoint));
        assert!(out.is_empty(), "{out:?}");
    }
    let out = h.send(last.0, ack(execution, last.1, checkpoint));
    assert_eq!(log_of(&h.log).completed, [(checkpoint.0, all.len())]);
    for tm in &tms {
        assert_eq!(kinds_to(&out, tm.conn), ["CheckpointComplete"]);
    }
    let summary = &h.core.snapshot(h.now).running[0];
    assert_eq!(summary.checkpoints.completed, 1);
}

#[test]
fn an_acknowledgement_about_a_task_on_another_taskmanager_is_ignored() {
    let mut h = Harness::with_checkpoints(config(1));
    let (tms, _, deploys, checkpoint) = checkpointed_job(&mut h);
    let execution = deploys[0].execution;
    // tms[1] acknowledges every task, tms[0]'s included.
    for d in &deploys {
        for &task in &d.tasks {
            h.send(tms[1].conn, ack(execution, task, checkpoint));
        }
    }
    assert!(
        log_of(&h.log).completed.is_empty(),
        "completed on forged acks"
    );
    let mut out = Vec::new();
    for &task in &deploy_on(&deploys, tms[0]).tasks {
        out.extend(h.send(tms[0].conn, ack(execution, task, checkpoint)));
    }
    assert_eq!(log_of(&h.log).completed.len(), 1, "{out:?}");
}

#[test]
fn a_declined_checkpoint_is_aborted_everywhere() {
    let mut h = Harness::with_checkpoints(config(1));
    let (tms, _, deploys, checkpoint) = checkpointed_job(&mut h);
    let d = deploy_on(&deploys, tms[1]);
    let out = h.send(
        tms[1].conn,
        Message::DeclineCheckpoint {
            execution: d.execution,
            vertex: d.tasks[0].0,
            subtask: d.tasks[0].1,
            checkpoint,
            reason: "disk full".into(),
        },
    );
    for tm in &tms {
        assert_eq!(kinds_to(&out, tm.conn), ["AbortCheckpoint"]);
    }
    assert_eq!(log_of(&h.log).aborted, [checkpoint.0]);
    let summary = &h.core.snapshot(h.now).running[0];
    assert_eq!(summary.checkpoints.completed, 0);
}

#[test]
fn a_restart_restores_the_latest_completed_checkpoint() {
    let mut h = Harness::with_checkpoints(config(1));
    let (tms, _, deploys, checkpoint) = checkpointed_job(&mut h);
    let execution = deploys[0].execution;
    for d in &deploys {
        for &task in &d.tasks {
            h.send(d.conn, ack(execution, task, checkpoint));
        }
    }
    fail_one(&mut h, &deploys, tms[0]);
    let failed = (tms[0].conn, deploy_on(&deploys, tms[0]).tasks[0]);
    cancel_rest(&mut h, &deploys, failed);
    let alive: Vec<(Tm, usize)> = tms.iter().map(|&t| (t, 1)).collect();
    let redeploy = deployments(&h.advance_alive(RESTART_DELAY.as_millis() as u64, &alive));
    assert_eq!(redeploy.len(), 2);
    for d in &redeploy {
        let restore = d
            .checkpointing
            .as_ref()
            .and_then(|c| c.restore.as_ref())
            .expect("a restore");
        assert_eq!(restore.checkpoint, checkpoint);
        assert_eq!(
            restore.handles.len(),
            deploys.iter().map(|d| d.tasks.len()).sum::<usize>()
        );
    }
}

#[test]
fn final_commit_pending_about_a_task_on_another_taskmanager_is_ignored() {
    let mut h = Harness::with_checkpoints(config(1));
    let tms: Vec<Tm> = (0..2).map(|_| h.register_tm(1)).collect();
    let (_, _, deploys) = h.submit_ok(&job_text(2, 2));
    h.run_all(&deploys);
    let execution = deploys[0].execution;
    let pending = |task: TaskKey| Message::FinalCommitPending {
        execution,
        vertex: task.0,
        subtask: task.1,
    };
    // tms[1] says every task, its own and tms[0]'s, waits for the commit.
    let mut out = Vec::new();
    for d in &deploys {
        for &task in &d.tasks {
            out.extend(h.send(tms[1].conn, pending(task)));
        }
    }
    assert!(
        triggered(&out).is_empty(),
        "final checkpoint on forged input"
    );
    for &task in &deploy_on(&deploys, tms[0]).tasks {
        out.extend(h.send(tms[0].conn, pending(task)));
    }
    assert_eq!(triggered(&out).len(), 2, "the final checkpoint, to both");
}

#[test]
fn a_finished_checkpointed_job_tells_its_store() {
    let mut h = Harness::with_checkpoints(config(1));
    let (_, client, _, deploys) = running_job(&mut h, 1, 2, 2);
    let out = h.report_all(&deploys, &[ExecutionState::Finished]);
    assert!(finished(&out, client).is_some());
    assert_eq!(log_of(&h.log).ended, [JobState::Finished]);
}

// ================================================================ snapshot

#[test]
fn the_snapshot_shows_jobs_and_both_views_of_each_slot() {
    let mut h = Harness::new(config(1));
    let (tms, client, job, deploys) = running_job(&mut h, 1, 3, 2);
    let execution = deploys[0].execution;
    // The TaskManager reports slot 0 held, slot 1 not yet, slot 2 free.
    h.heartbeat(
        tms[0],
        vec![slot(0, Some(execution)), slot(1, None), slot(2, None)],
    );
    let snapshot = h.core.snapshot(h.now);
    assert_eq!(snapshot.running.len(), 1);
    assert_eq!(
        (snapshot.running[0].job, snapshot.running[0].state),
        (job, JobState::Running)
    );
    let info = &snapshot.taskmanagers[0];
    assert_eq!(info.id, tms[0].id);
    assert_eq!(info.allocated, [Some(job), Some(job), None]);
    let reported: Vec<Option<ExecutionId>> = info.slots.iter().map(|s| s.execution).collect();
    assert_eq!(reported, [Some(execution), None, None]);
    assert!(snapshot.completed.is_empty());
    let out = h.report_all(&deploys, &[ExecutionState::Finished]);
    assert!(finished(&out, client).is_some());
    let snapshot = h.core.snapshot(h.now);
    assert!(snapshot.running.is_empty());
    assert_eq!(snapshot.completed.len(), 1);
    assert_eq!(snapshot.completed[0].state, JobState::Finished);
    assert_eq!(snapshot.taskmanagers[0].allocated, [None, None, None]);
}

// ================================================================ user cancel

#[test]
fn a_job_canceled_by_a_user_ends_canceled_and_cancels_its_tasks_everywhere() {
    let mut h = Harness::new(config(1));
    let (tms, client, job, deploys) = running_job(&mut h, 2, 1, 2);
    let reason = "canceled over the REST API".to_owned();
    let out = h.core.handle(h.now, Event::Cancel { job, reason });
    for tm in &tms {
        assert_eq!(cancels_to(&out, tm.conn), [deploys[0].execution]);
    }
    let summary = finished(&out, client).expect("the client hears the end");
    assert_eq!(summary.state, JobState::Canceled);
    assert_eq!(
        summary.reason.as_deref(),
        Some("canceled over the REST API")
    );
    assert!(!h.core.job_is_running(job));
    // A second cancel, or one of an unknown job, changes nothing.
    let again = Event::Cancel {
        job,
        reason: "again".into(),
    };
    assert!(h.core.handle(h.now, again).is_empty());
    let unknown = Event::Cancel {
        job: JobId(job.0 ^ 1),
        reason: "unknown".into(),
    };
    assert!(h.core.handle(h.now, unknown).is_empty());
    let snapshot = h.core.snapshot(h.now);
    assert!(snapshot.running.is_empty());
    assert_eq!(snapshot.completed.len(), 1);
}

#[test]
fn a_heartbeat_s_usage_is_kept_until_a_newer_one_replaces_it() {
    let mut h = Harness::new(config(1));
    let tm = h.register_tm(2);
    let usage = crate::protocol::ResourceUsage {
        managed_used_bytes: vec![4096, 0],
        network_segments_used: 3,
        network_segment_count: 64,
        network_segment_size_bytes: 65536,
        gpu_used_bytes: vec![0, 0],
    };
    let with = Message::Heartbeat {
        slots: free_slots(2),
        usage: Some(usage.clone()),
    };
    h.send(tm.conn, with);
    // A slot-change report carries no usage: the last one stays.
    h.heartbeat(tm, free_slots(2));
    let info = &h.core.snapshot(h.now).taskmanagers[0];
    assert_eq!(info.usage.as_ref(), Some(&usage));
}
