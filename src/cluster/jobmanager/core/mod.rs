//! The JobManager as an I/O-free state machine.
//!
//! [`JobManagerCore::handle`] takes one [`Event`] — a message from a
//! connection, a connection's end, a planned submission or a timer tick —
//! with the time `now` (since the JobManager started) and returns the
//! [`Command`]s the shell must carry out: send a message on a connection,
//! or close one. The core never reads the clock, draws randomness other
//! than from its seeded [`Rng`], or touches a socket; checkpoint storage is
//! behind [`CheckpointStore`]. The tokio shell (`super`) and the cluster
//! simulator (`crate::cluster::sim`) drive the same code.
//!
//! It is split by concern:
//! - [`resources`]: the resource manager — registered TaskManager
//!   instances, their connections, the slot pool (the JobManager's
//!   allocations beside each TaskManager's own report) and the heartbeat
//!   monitor that declares instances lost and fences them;
//! - [`jobs`]: job entries, the scheduler (deploying an execution onto free
//!   slots), task states, job ends and summaries;
//! - [`failover`]: failure handling and restarts under the restart
//!   strategy;
//! - [`checkpointing`]: each job's checkpoint coordinator and its store.
//!
//! Invariants (checked by the simulator after every step):
//! - a slot is schedulable only when the JobManager has not allocated it and
//!   its TaskManager's latest report says it holds no execution;
//! - messages about a task are accepted only from the TaskManager instance
//!   the task was deployed to, and only for the job's current execution
//!   (or, for ends, the one draining before a restart);
//! - a TaskManager instance declared lost is told so and its connection
//!   closed; nothing it sends afterwards is read.

pub mod checkpointing;
pub mod failover;
pub mod jobs;
pub mod resources;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::job::LogicalPlan;
use crate::job::graph::JobGraph;
use crate::protocol::{ClusterSnapshot, JobId, JobSummary, Message};

pub use checkpointing::{CheckpointStore, CheckpointStoreFactory};
use jobs::JobEntry;
use resources::ResourceManager;

/// A connection, as the shell numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection {}", self.0)
    }
}

/// Ended jobs kept for the REST API and the web UI.
pub const COMPLETED_JOBS_MAX: usize = 100;

/// A job the shell parsed, planned and placed.
pub struct PlannedJob {
    pub name: String,
    pub plan: Arc<LogicalPlan>,
    pub graph: Arc<JobGraph>,
    pub placement: crate::placement::Placement,
    pub text: String,
    pub path: String,
    pub default_parallelism: u32,
}

// Events and commands are moved once, never stored in bulk: boxing the
// message would only add an allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A message read from a connection (after its handshake).
    Message { conn: ConnId, message: Message },
    /// A client's `SubmitJob`, planned by the shell (or why it could not
    /// be).
    Submit {
        conn: ConnId,
        job: Result<Box<PlannedJob>, String>,
    },
    /// The connection ended: the peer closed it, a read failed, or it was
    /// fenced.
    Closed { conn: ConnId, reason: String },
    /// Timers: heartbeats, deployment and restart deadlines, checkpoints,
    /// progress reports.
    Tick,
    /// A user asked to cancel `job` (the REST API's `POST
    /// /jobs/{id}/cancel`, authenticated by the shell).
    Cancel { job: JobId, reason: String },
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    Send {
        conn: ConnId,
        message: Message,
    },
    /// Close the connection once what was sent to it is written.
    Close {
        conn: ConnId,
        reason: String,
    },
}

/// A small seeded generator (SplitMix64) for ids and restart jitter.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::kernels::cpu::hash::fmix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the core was configured with (from [`Config`]).
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// How long a deployed task may stay unacknowledged (no `DEPLOYING`
    /// from its TaskManager) before the job fails.
    pub deploy_timeout: Duration,
    pub config: Config,
}

impl CoreConfig {
    pub fn new(config: Config) -> Self {
        Self {
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            deploy_timeout: config.heartbeat_timeout,
            config,
        }
    }
}

/// The JobManager's whole state.
pub struct JobManagerCore {
    pub(crate) cfg: CoreConfig,
    pub(crate) rm: ResourceManager,
    /// Ordered, so that every run of the same events gives the same
    /// commands in the same order (the simulator replays seeds exactly).
    pub(crate) jobs: BTreeMap<JobId, JobEntry>,
    pub(crate) completed: VecDeque<JobSummary>,
    pub(crate) rng: Rng,
    pub(crate) stores: Box<dyn CheckpointStoreFactory>,
    pub(crate) out: Vec<Command>,
    pub(crate) now: Duration,
}

/// How the JobManager learned that a TaskManager is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loss {
    /// Its control connection closed: the process stopped or died.
    Closed,
    /// It went silent for longer than `heartbeat.timeout`.
    Silent,
}

impl JobManagerCore {
    pub fn new(cfg: CoreConfig, seed: u64, stores: Box<dyn CheckpointStoreFactory>) -> Self {
        Self {
            cfg,
            rm: ResourceManager::default(),
            jobs: BTreeMap::new(),
            completed: VecDeque::new(),
            rng: Rng::new(seed),
            stores,
            out: Vec::new(),
            now: Duration::ZERO,
        }
    }

    /// Handles one event at `now` and returns what to do.
    pub fn handle(&mut self, now: Duration, event: Event) -> Vec<Command> {
        debug_assert!(now >= self.now, "time went backwards");
        self.now = now.max(self.now);
        match event {
            Event::Message { conn, message } => self.on_message(conn, message),
            Event::Submit { conn, job } => self.submit(conn, job),
            Event::Closed { conn, reason } => self.on_closed(conn, &reason),
            Event::Tick => self.on_tick(),
            Event::Cancel { job, reason } => self.cancel(job, reason),
        }
        std::mem::take(&mut self.out)
    }

    pub(crate) fn send(&mut self, conn: ConnId, message: Message) {
        self.out.push(Command::Send { conn, message });
    }

    fn on_message(&mut self, conn: ConnId, message: Message) {
        use resources::Peer;
        match self.rm.peer(conn) {
            Peer::Fenced => {
                tracing::debug!("{conn}: {} after fencing, ignored", message.kind());
            }
            Peer::New => match message {
                Message::RegisterTaskManager {
                    data_addr,
                    slots,
                    io,
                    transport,
                    gpu,
                    flight_addr,
                } => {
                    let registration = resources::Registration {
                        data_addr,
                        slots,
                        io,
                        transport,
                        gpu,
                        flight_addr,
                    };
                    let id = self.rm.register(conn, registration, self.now);
                    self.send(conn, Message::Registered { taskmanager: id });
                    self.cancel_stale_executions(id);
                }
                // A submission is planned by the shell, which sends
                // `Event::Submit` instead.
                other => self.refuse(conn, &format!("{} before registering", other.kind())),
            },
            Peer::Client => {
                tracing::warn!(
                    "{conn}: a client sent {} after its submission; ignored",
                    message.kind()
                );
            }
            Peer::TaskManager(tm) => self.on_taskmanager_message(conn, tm, message),
        }
    }

    fn on_taskmanager_message(
        &mut self,
        conn: ConnId,
        tm: crate::protocol::TaskManagerId,
        message: Message,
    ) {
        match message {
            Message::Heartbeat { slots, usage } => {
                self.rm.heartbeat(tm, slots, usage, self.now);
                self.send(conn, Message::HeartbeatAck);
                self.cancel_stale_executions(tm);
            }
            Message::TaskStatus {
                execution,
                vertex,
                subtask,
                state,
                error,
                metrics,
            } => self.on_task_status(
                tm,
                jobs::StatusReport {
                    execution,
                    task: (vertex, subtask),
                    state,
                    error,
                    metrics,
                },
            ),
            Message::AcknowledgeCheckpoint {
                execution,
                vertex,
                subtask,
                checkpoint,
                handle,
                alignment_ms,
            } => {
                if let Some(job) = self.authorized_task(tm, execution, (vertex, subtask)) {
                    checkpointing::on_ack(
                        self,
                        job,
                        (vertex, subtask),
                        checkpoint.0,
                        handle,
                        Duration::from_millis(alignment_ms),
                    );
                }
            }
            Message::DeclineCheckpoint {
                execution,
                vertex,
                subtask,
                checkpoint,
                reason,
            } => {
                if let Some(job) = self.authorized_task(tm, execution, (vertex, subtask)) {
                    checkpointing::on_decline(self, job, (vertex, subtask), checkpoint.0, &reason);
                }
            }
            Message::FinalCommitPending {
                execution,
                vertex,
                subtask,
            } => {
                if let Some(job) = self.authorized_task(tm, execution, (vertex, subtask)) {
                    checkpointing::on_final_commit_pending(self, job, (vertex, subtask));
                }
            }
            Message::RegisterTaskManager { .. } => {
                tracing::warn!("{tm} registered twice on one connection; ignored");
            }
            other => tracing::warn!("{tm} sent {}, which only a JobManager sends", other.kind()),
        }
    }

    /// Refuses a connection that broke the protocol: tells it why and closes it.
    fn refuse(&mut self, conn: ConnId, why: &str) {
        tracing::warn!("{conn}: refused: {why}");
        self.rm.fence_conn(conn);
        self.send(
            conn,
            Message::Disconnect {
                reason: why.to_owned(),
            },
        );
        self.out.push(Command::Close {
            conn,
            reason: why.to_owned(),
        });
    }

    fn on_closed(&mut self, conn: ConnId, reason: &str) {
        match self.rm.peer(conn) {
            resources::Peer::TaskManager(tm) => {
                // A closed control connection ends the instance at once: its
                // process died or fenced itself, and it registers anew.
                let why = format!("its control connection closed ({reason})");
                self.taskmanager_lost(tm, &why, Loss::Closed);
            }
            resources::Peer::Client => {
                tracing::debug!("{conn}: client left ({reason}); its job keeps running");
            }
            _ => {}
        }
        self.rm.forget_conn(conn);
    }

    fn on_tick(&mut self) {
        let timeout = self.cfg.heartbeat_timeout;
        for (tm, silent) in self.rm.silent_longer_than(timeout, self.now) {
            let why = format!(
                "no heartbeat for {:.1} s (heartbeat.timeout = {:.1} s)",
                silent.as_secs_f64(),
                timeout.as_secs_f64()
            );
            self.taskmanager_lost(tm, &why, Loss::Silent);
        }
        jobs::check_deploy_deadlines(self);
        failover::restart_due_jobs(self);
        checkpointing::tick(self);
        jobs::send_progress(self);
    }

    /// Declares `tm` lost: fences it (tells it, closes its connection),
    /// removes its slots, and fails or restarts every job with a task there.
    pub(crate) fn taskmanager_lost(
        &mut self,
        tm: crate::protocol::TaskManagerId,
        why: &str,
        loss: Loss,
    ) {
        let Some(entry) = self.rm.remove(tm) else {
            return;
        };
        let reason = format!(
            "TaskManager {tm} (data port {}) lost: {why}",
            entry.data_addr
        );
        let ran_tasks = self
            .jobs
            .values()
            .any(|j| j.tasks.values().any(|t| t.taskmanager == tm));
        if ran_tasks || loss == Loss::Silent {
            tracing::warn!("{reason}");
        } else {
            // An idle TaskManager that closed its connection (stopped, as
            // at the end of every `strata run`) failed nothing.
            tracing::info!("{reason}; it ran no tasks");
        }
        self.send(
            entry.conn,
            Message::Disconnect {
                reason: reason.clone(),
            },
        );
        self.out.push(Command::Close {
            conn: entry.conn,
            reason: reason.clone(),
        });
        failover::on_taskmanager_lost(self, tm, &reason);
    }

    /// Cancels executions that `tm` reports holding slots for but that no
    /// job runs or drains any more (a leak, or a message lost in a race):
    /// the TaskManager frees those slots when the tasks end.
    fn cancel_stale_executions(&mut self, tm: crate::protocol::TaskManagerId) {
        let Some(entry) = self.rm.get(tm) else {
            return;
        };
        let conn = entry.conn;
        let mut stale: Vec<_> = entry
            .reported
            .iter()
            .filter_map(|s| s.execution)
            .filter(|&e| !jobs::execution_is_live(self, e))
            .collect();
        stale.sort_unstable();
        stale.dedup();
        for execution in stale {
            tracing::info!("{tm} holds slots for ended execution {execution}: canceling it");
            self.send(
                conn,
                Message::CancelJob {
                    execution,
                    reason: "the execution ended".into(),
                },
            );
        }
    }

    /// The job of task `task` of `execution`, when `tm` runs it; logs and
    /// returns `None` for a message from any other TaskManager.
    pub(crate) fn authorized_task(
        &self,
        tm: crate::protocol::TaskManagerId,
        execution: crate::protocol::ExecutionId,
        task: crate::checkpoint::coordinator::TaskKey,
    ) -> Option<JobId> {
        let (job, entry) = self
            .jobs
            .iter()
            .find(|(_, j)| j.execution == execution && j.restart_at.is_none())?;
        match entry.tasks.get(&task) {
            Some(t) if t.taskmanager == tm => Some(*job),
            Some(t) => {
                tracing::warn!(
                    "{tm} sent a message about task {}/{} of execution {execution}, which runs on {}: refused",
                    task.0,
                    task.1,
                    t.taskmanager
                );
                None
            }
            None => None,
        }
    }

    /// Ends a running job as CANCELED: its tasks are canceled where they
    /// run (or it stops waiting to restart) and its client hears the end,
    /// as for a job that failed.
    fn cancel(&mut self, job: JobId, reason: String) {
        match self.jobs.get(&job) {
            Some(entry) if entry.state == crate::protocol::JobState::Running => {
                tracing::info!("job {} ({job}): {reason}", entry.name);
                self.end_job(job, crate::protocol::JobState::Canceled, Some(reason));
            }
            _ => tracing::debug!("cancel of {job}, which does not run: ignored"),
        }
    }

    /// Whether `job` is running (or waiting to restart) now.
    pub fn job_is_running(&self, job: JobId) -> bool {
        self.jobs.contains_key(&job)
    }

    /// TaskManagers registered now.
    pub fn taskmanager_count(&self) -> usize {
        self.rm.len()
    }

    /// A consistent copy of the cluster's state at `now`.
    /// Every `flight_sink` of the jobs in progress, and where its
    /// partitions are served now (or why they cannot be read now).
    pub fn flights(&self) -> Vec<crate::flight::FlightEntry> {
        use crate::job::OperatorKind;
        use crate::protocol::{ExecutionState, JobState};
        let mut entries = Vec::new();
        for job in self.jobs.values() {
            let spec = &job.plan.spec;
            for (op, operator) in spec.operators.iter().enumerate() {
                if !matches!(operator.kind, OperatorKind::FlightSink { .. }) {
                    continue;
                }
                let Some(vertex) = job
                    .graph
                    .vertices
                    .iter()
                    .find(|v| v.operators.contains(&op))
                else {
                    continue;
                };
                let schema = operator.input.map_or_else(
                    || job.plan.schemas[op].clone(),
                    |i| job.plan.schemas[i].clone(),
                );
                let waiting = |why: String| {
                    Err(format!(
                        "job '{}' (attempt {}): {why}; retry GetFlightInfo",
                        job.name, job.attempt
                    ))
                };
                let partitions = if job.restart_at.is_some() || !job.draining.is_empty() {
                    waiting(format!(
                        "restarting after a failure ({})",
                        job.last_failure.as_deref().unwrap_or("unknown cause")
                    ))
                } else if job.state != JobState::Running {
                    waiting(format!("the job is {:?}", job.state).to_lowercase())
                } else {
                    let mut partitions = Vec::with_capacity(vertex.parallelism as usize);
                    let mut missing = None;
                    for subtask in 0..vertex.parallelism {
                        let task = job.tasks.get(&(vertex.id, subtask));
                        let addr = task
                            .filter(|t| t.state == ExecutionState::Running)
                            .and_then(|t| self.rm.get(t.taskmanager))
                            .and_then(|tm| tm.flight_addr);
                        match addr {
                            Some(addr) => partitions.push((
                                crate::flight::StreamKey {
                                    execution: job.execution.0,
                                    operator: op as u32,
                                    subtask,
                                },
                                addr,
                            )),
                            None => {
                                let state = task.map_or("not deployed".to_owned(), |t| {
                                    format!("{:?}", t.state).to_lowercase()
                                });
                                missing = Some(format!("partition {subtask} is {state}"));
                                break;
                            }
                        }
                    }
                    match missing {
                        Some(why) => waiting(why),
                        None => Ok(partitions),
                    }
                };
                entries.push(crate::flight::FlightEntry {
                    job_name: job.name.clone(),
                    sink: operator.name.clone(),
                    job: job.id.0,
                    attempt: job.attempt,
                    schema,
                    partitions,
                });
            }
        }
        entries
    }

    pub fn snapshot(&self, now: Duration) -> ClusterSnapshot {
        let mut running: Vec<JobSummary> = self
            .jobs
            .values()
            .map(|entry| jobs::summarize(entry, &self.rm, now))
            .collect();
        running.sort_by_key(|j| j.job);
        let mut taskmanagers = self.rm.infos(now);
        for task in self.jobs.values().flat_map(|j| j.tasks.values()) {
            if let Some(info) = taskmanagers.iter_mut().find(|i| i.id == task.taskmanager) {
                info.spill_bytes_written += task.metrics.spill_bytes_written;
            }
        }
        ClusterSnapshot {
            taskmanagers,
            running,
            completed: self.completed.iter().cloned().collect(),
        }
    }

    /// The first GPU slot any TaskManager offers, for placement: its
    /// TaskManager's GPU line and name, the GPU id and its budget.
    pub fn gpu_slot(&self) -> Option<(String, u32, u64)> {
        self.rm.gpu_slot()
    }
}

#[cfg(test)]
mod tests;
