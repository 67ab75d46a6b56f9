//! The cluster simulator: one real [`JobManagerCore`] and several
//! simulated TaskManagers, each with the real [`SlotTable`], over simulated
//! connections, driven by a seeded event queue.
//!
//! Faults it injects: TaskManager crash (its process — the connection
//! closes — or its machine — the connection goes silent), pause and resume
//! (SIGSTOP/SIGCONT), JobManager crash and restart, message delay,
//! reordering across connections (each connection stays FIFO, as TCP),
//! duplicated messages, a message lost with its connection closed, slow
//! task starts, tasks that finish at once (empty sources), deployments that
//! fail (a producer out of reach), task failures, and forged messages from
//! unregistered peers and from a rogue registered TaskManager that reports
//! other TaskManagers' tasks.
//!
//! Invariants, checked after every step ([`checks`]):
//! 1. every submitted job ends (finished, failed with a cause, refused, or
//!    its client saw the JobManager go) once faults stop;
//! 2. a slot is never held by an execution whose tasks there have all
//!    ended, nor, once the TaskManager was told to cancel or release it,
//!    for longer than its tasks take to stop;
//! 3. no slot hosts live tasks of two executions;
//! 4. the JobManager's view of each TaskManager's slots equals the
//!    TaskManager's own within one heartbeat round, once it is stable;
//! 5. a TaskManager registers only with no task of an earlier session
//!    running;
//! 6. a restart starts within its delay (plus one tick) once the failed
//!    execution's tasks have ended or their TaskManager was declared lost;
//! 7. a job reported FINISHED had every task of one execution finish on
//!    the TaskManager it was deployed to (forged reports do not count).
//!
//! A failure prints `seed=<n>`; `STRATA_SIM_SEED=<n> cargo test
//! cluster::sim` replays it.

mod checks;
mod tm;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::jobmanager::core::{
    CheckpointStoreFactory, Command, ConnId, CoreConfig, Event, JobManagerCore, PlannedJob, Rng,
};
use crate::protocol::{ExecutionId, JobId, JobState, Message};
use tm::SimTm;

/// Bugs the self-tests re-introduce to show the checker catches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// A failed deployment keeps the slots it took (the "slot 0 is
    /// occupied" leak).
    SlotLeakOnFailedDeploy,
    /// The slot-lifecycle race: a slot frees itself when no task runs,
    /// though tasks deployed on it have not started yet.
    FreeOnFirstEnd,
    /// The JobManager keeps a lost TaskManager's connection (the zombie):
    /// the simulated TaskManager never hears it was fenced.
    NoFencing,
}

/// What a run exercises.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub taskmanagers: usize,
    pub slots: usize,
    pub jobs: usize,
    /// Faults happen before this time; jobs are submitted before it too.
    pub fault_horizon: Duration,
    /// The run stops here; every job must have ended by then.
    pub end: Duration,
    pub faults: bool,
    pub bug: Option<Bug>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            taskmanagers: 3,
            slots: 2,
            jobs: 6,
            fault_horizon: Duration::from_secs(30),
            end: Duration::from_secs(150),
            faults: true,
            bug: None,
        }
    }
}

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1000);
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(5000);
pub const RESTART_DELAY: Duration = Duration::from_millis(500);
pub const TICK: Duration = Duration::from_millis(100);
/// The longest a canceled task takes to stop.
pub const CANCEL_MAX: Duration = Duration::from_millis(300);
/// Longest ordinary network delay, and with the delay fault.
const NET_DELAY_MAX: Duration = Duration::from_millis(5);
const NET_DELAY_FAULT_MAX: Duration = Duration::from_millis(800);

/// Who is at one end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Jm,
    Tm(usize),
    Client(usize),
    Rogue,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per queued event; boxing adds nothing
enum SimEvent {
    Deliver {
        conn: u64,
        to: Endpoint,
        message: Message,
    },
    Closed {
        conn: u64,
        to: Endpoint,
    },
    JmTick,
    Tm {
        tm: usize,
        incarnation: u64,
        timer: tm::Timer,
    },
    Submit {
        client: usize,
    },
    Fault(FaultKind),
    JmRestart,
}

#[derive(Clone, Copy, Debug)]
enum FaultKind {
    CrashTm { tm: usize, silent: bool },
    RestartTm { tm: usize },
    PauseTm { tm: usize, pause: Duration },
    CrashJm,
    LoseAndClose,
    Forge,
    RogueTaskManager,
}

struct Conn {
    a: Endpoint,
    b: Endpoint,
    open: bool,
    /// Delivery time of the last message each way (FIFO per direction).
    last_to_a: Duration,
    last_to_b: Duration,
}

/// How a client's job ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Rejected(String),
    Ended {
        job: JobId,
        state: JobState,
        reason: Option<String>,
    },
    JobManagerLost,
}

pub struct Client {
    pub conn: Option<u64>,
    pub text: usize,
    pub job: Option<JobId>,
    pub outcome: Option<Outcome>,
}

pub struct Sim {
    pub seed: u64,
    pub cfg: SimConfig,
    pub now: Duration,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    events: HashMap<usize, SimEvent>,
    next_event: usize,
    seq: u64,
    pub jm: Option<JobManagerCore>,
    jm_epoch: u64,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    pub tms: Vec<SimTm>,
    pub clients: Vec<Client>,
    jobs: Vec<Arc<PlannedTemplate>>,
    /// Delay fault on: messages take up to `NET_DELAY_FAULT_MAX`.
    slow_net_until: Duration,
    /// Per execution: the job, and the tasks each TaskManager instance
    /// finished (for invariant 7).
    pub executions: HashMap<ExecutionId, ExecutionRecord>,
    /// Per job waiting to restart: its restart time, and when it was
    /// first seen ready to restart.
    pub restart_watch: HashMap<JobId, (Duration, Duration)>,
    pub rogue_conn: Option<u64>,
    /// Per TaskManager: since when it believes in a registration the
    /// JobManager has dropped.
    pub zombie_since: HashMap<usize, Duration>,
    pub violations: Vec<String>,
    /// `STRATA_SIM_TRACE=1`: print every event to standard error.
    trace: bool,
}

/// One line about an event, without job texts.
fn describe(event: &SimEvent) -> String {
    match event {
        SimEvent::Deliver { conn, to, message } => {
            let detail = match message {
                Message::DeployTasks {
                    execution, tasks, ..
                } => format!("DeployTasks {execution} {tasks:?}"),
                Message::TaskStatus {
                    execution,
                    vertex,
                    subtask,
                    state,
                    ..
                } => format!("TaskStatus {execution} {vertex}/{subtask} {state:?}"),
                Message::CancelJob { execution, .. } => format!("CancelJob {execution}"),
                Message::ReleaseJob { execution } => format!("ReleaseJob {execution}"),
                Message::Heartbeat { slots, .. } => format!(
                    "Heartbeat {:?}",
                    slots
                        .iter()
                        .map(|s| s.execution.map(|e| e.to_string()))
                        .collect::<Vec<_>>()
                ),
                other => other.kind().to_owned(),
            };
            format!("deliver conn {conn} to {to:?}: {detail}")
        }
        other => format!("{other:?}"),
    }
}

pub struct ExecutionRecord {
    pub job: JobId,
    pub task_count: usize,
    pub finished: HashSet<(usize, u32)>,
}

/// A job text and what it plans to.
pub struct PlannedTemplate {
    pub text: String,
    pub make: Box<dyn Fn() -> PlannedJob + Send + Sync>,
    pub task_count: usize,
    /// Tasks of this job finish at once (empty sources).
    pub empty: bool,
}

struct NoCheckpoints;

impl CheckpointStoreFactory for NoCheckpoints {
    fn open(
        &self,
        _: &str,
        _: JobId,
    ) -> Result<Option<Box<dyn super::jobmanager::core::CheckpointStore>>, String> {
        Ok(None)
    }
}

fn core_config() -> CoreConfig {
    let mut config = crate::config::Config::default();
    config.heartbeat_interval = HEARTBEAT_INTERVAL;
    config.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    config.restart_strategy = Some(crate::config::RestartStrategyKind::FixedDelay);
    config.restart_fixed_delay_attempts = 1000;
    config.restart_fixed_delay_delay = RESTART_DELAY;
    CoreConfig::new(config)
}

/// Plans `text` the way the JobManager's shell does, with the default
/// calibration and no GPU.
pub fn plan_text(text: &str) -> PlannedJob {
    use crate::job::graph::JobGraph;
    use crate::placement::{PlacementInput, calibration, place};
    let plan = crate::job::parse_job(text, std::path::Path::new("sim.toml"))
        .and_then(crate::job::plan)
        .expect("the simulator's job texts plan");
    let plan = Arc::new(plan);
    let graph = Arc::new(JobGraph::build(&plan, 1));
    let calibration = calibration::Calibration::defaults(None);
    let placement = place(&PlacementInput {
        plan: &plan,
        graph: &graph,
        calibration: &calibration,
        mode: crate::config::PlacementMode::default(),
        gpu_absent_reason: "simulated cluster",
        coalesce_bytes: crate::placement::cost::COALESCE_BYTES_DEFAULT,
        gpu_key_by_hash: false,
    })
    .expect("placement");
    PlannedJob {
        name: plan.spec.name.clone(),
        plan,
        graph,
        placement,
        text: text.to_owned(),
        path: "sim.toml".into(),
        default_parallelism: 1,
    }
}

fn job_text(parallelism: u32, rows: u64) -> String {
    format!(
        r#"
[job]
name = "sim-p{parallelism}-r{rows}"
parallelism = {parallelism}

[[operator]]
name = "source"
type = "datagen"
rows = {rows}
keys = 10

[[operator]]
name = "by-key"
type = "key_by"
keys = ["key"]

[[operator]]
name = "agg"
type = "aggregate"
aggs = ["count(*) as n"]

[[operator]]
name = "sink"
type = "blackhole"
"#
    )
}

fn templates() -> Vec<Arc<PlannedTemplate>> {
    [
        (2, 100, false),
        (4, 0, true),
        (3, 1000, false),
        (1, 2, true),
    ]
    .into_iter()
    .map(|(p, rows, empty)| {
        let text = job_text(p, rows);
        let probe = plan_text(&text);
        let task_count = probe
            .graph
            .vertices
            .iter()
            .map(|v| v.parallelism as usize)
            .sum();
        let t = text.clone();
        Arc::new(PlannedTemplate {
            text,
            make: Box::new(move || plan_text(&t)),
            task_count,
            empty,
        })
    })
    .collect()
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let mut sim = Self {
            seed,
            now: Duration::ZERO,
            rng: Rng::new(seed),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            seq: 0,
            jm: None,
            jm_epoch: 0,
            conns: BTreeMap::new(),
            next_conn: 0,
            tms: Vec::new(),
            clients: Vec::new(),
            jobs: templates(),
            slow_net_until: Duration::ZERO,
            executions: HashMap::new(),
            restart_watch: HashMap::new(),
            rogue_conn: None,
            zombie_since: HashMap::new(),
            violations: Vec::new(),
            trace: std::env::var("STRATA_SIM_TRACE").is_ok(),
            cfg,
        };
        sim.start_jm();
        for i in 0..sim.cfg.taskmanagers {
            sim.tms.push(SimTm::new(i, sim.cfg.slots, sim.cfg.bug));
            sim.tm_connect(i);
        }
        for client in 0..sim.cfg.jobs {
            let text = (sim.rng.next_u64() % sim.jobs.len() as u64) as usize;
            sim.clients.push(Client {
                conn: None,
                text,
                job: None,
                outcome: None,
            });
            let at = sim.random_duration(sim.cfg.fault_horizon);
            sim.schedule(at, SimEvent::Submit { client });
        }
        if sim.cfg.faults {
            sim.plan_faults();
        }
        sim
    }

    fn start_jm(&mut self) {
        self.jm_epoch += 1;
        let seed = self.seed ^ self.jm_epoch.rotate_left(17);
        self.jm = Some(JobManagerCore::new(
            core_config(),
            seed,
            Box::new(NoCheckpoints),
        ));
        let now = self.now;
        self.schedule(now + TICK, SimEvent::JmTick);
    }

    fn plan_faults(&mut self) {
        let horizon = self.cfg.fault_horizon;
        let count = 3 + self.rng.next_u64() % 6;
        for _ in 0..count {
            let at = self.random_duration(horizon);
            let tm = (self.rng.next_u64() % self.cfg.taskmanagers as u64) as usize;
            let kind = match self.rng.next_u64() % 10 {
                0 | 1 => {
                    let silent = self.rng.next_u64().is_multiple_of(2);
                    let back = at + Duration::from_millis(500 + self.rng.next_u64() % 8000);
                    self.schedule(back, SimEvent::Fault(FaultKind::RestartTm { tm }));
                    FaultKind::CrashTm { tm, silent }
                }
                2 | 3 => FaultKind::PauseTm {
                    tm,
                    pause: Duration::from_millis(500 + self.rng.next_u64() % 9000),
                },
                4 => FaultKind::CrashJm,
                5 | 6 => FaultKind::LoseAndClose,
                7 => FaultKind::Forge,
                8 => FaultKind::RogueTaskManager,
                _ => {
                    // Slow network for a while: delays and reordering.
                    self.slow_net_until = self
                        .slow_net_until
                        .max(at + Duration::from_millis(self.rng.next_u64() % 5000));
                    continue;
                }
            };
            self.schedule(at, SimEvent::Fault(kind));
        }
    }

    pub fn random_duration(&mut self, max: Duration) -> Duration {
        let ms = max.as_millis().max(1) as u64;
        Duration::from_millis(self.rng.next_u64() % ms)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.rng.next_u64() % 100 < percent
    }

    fn schedule(&mut self, at: Duration, event: SimEvent) {
        self.seq += 1;
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse((at, self.seq, id)));
    }

    /// Opens a connection from `from` to the JobManager.
    fn connect(&mut self, from: Endpoint) -> Option<u64> {
        self.jm.as_ref()?;
        self.next_conn += 1;
        let id = self.next_conn;
        self.conns.insert(
            id,
            Conn {
                a: from,
                b: Endpoint::Jm,
                open: true,
                last_to_a: self.now,
                last_to_b: self.now,
            },
        );
        Some(id)
    }

    /// Sends `message` on `conn` from `from`; FIFO per direction.
    fn send(&mut self, conn: u64, from: Endpoint, message: Message) {
        let slow = self.now < self.slow_net_until;
        let max = if slow {
            NET_DELAY_FAULT_MAX
        } else {
            NET_DELAY_MAX
        };
        let delay = self.random_duration(max);
        let duplicate = self.cfg.faults && self.now < self.cfg.fault_horizon && self.chance(1);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.open {
            return;
        }
        let to = if c.a == from { c.b } else { c.a };
        let last = if to == c.a {
            &mut c.last_to_a
        } else {
            &mut c.last_to_b
        };
        let at = (self.now + delay).max(*last);
        *last = at;
        if duplicate && !matches!(message, Message::SubmitJob { .. }) {
            let copy = message.clone();
            self.schedule(
                at,
                SimEvent::Deliver {
                    conn,
                    to,
                    message: copy,
                },
            );
        }
        self.schedule(at, SimEvent::Deliver { conn, to, message });
    }

    /// Closes `conn` from `from`'s side: the other side hears it after what
    /// was already sent to it.
    fn close(&mut self, conn: u64, from: Endpoint) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.open {
            return;
        }
        c.open = false;
        let to = if c.a == from { c.b } else { c.a };
        let at = if to == c.a { c.last_to_a } else { c.last_to_b }.max(self.now);
        self.schedule(at, SimEvent::Closed { conn, to });
        // The closing side is done with it at once.
        let me = from;
        self.schedule(self.now, SimEvent::Closed { conn, to: me });
    }

    fn jm_handle(&mut self, event: Event) {
        let now = self.now;
        let Some(jm) = self.jm.as_mut() else {
            return;
        };
        let commands = jm.handle(now, event);
        for command in commands {
            match command {
                Command::Send { conn, message } => {
                    if self.cfg.bug == Some(Bug::NoFencing)
                        && matches!(message, Message::Disconnect { .. })
                    {
                        continue;
                    }
                    self.observe_jm_message(&message);
                    self.send(conn.0, Endpoint::Jm, message);
                }
                Command::Close { conn, .. } => {
                    if self.cfg.bug == Some(Bug::NoFencing) {
                        continue;
                    }
                    self.close(conn.0, Endpoint::Jm);
                }
            }
        }
    }

    fn observe_jm_message(&mut self, message: &Message) {
        if let Message::DeployTasks { job, execution, .. } = message {
            let task_count = self
                .jm
                .as_ref()
                .and_then(|jm| jm.jobs.get(job))
                .map(|j| {
                    j.graph
                        .vertices
                        .iter()
                        .map(|v| v.parallelism as usize)
                        .sum()
                })
                .unwrap_or(0);
            self.executions
                .entry(*execution)
                .or_insert_with(|| ExecutionRecord {
                    job: *job,
                    task_count,
                    finished: HashSet::new(),
                });
        }
    }

    fn tm_connect(&mut self, tm: usize) {
        let Some(conn) = self.connect(Endpoint::Tm(tm)) else {
            // No JobManager: try again soon.
            let incarnation = self.tms[tm].incarnation;
            self.schedule(
                self.now + Duration::from_millis(200),
                SimEvent::Tm {
                    tm,
                    incarnation,
                    timer: tm::Timer::Reconnect,
                },
            );
            return;
        };
        let message = self.tms[tm].on_connected(conn, self.now, &mut self.violations);
        self.send(conn, Endpoint::Tm(tm), message);
    }

    /// Runs until the end time. Returns the violations found.
    pub fn run(&mut self) -> Result<(), String> {
        while let Some(Reverse((at, _, id))) = self.queue.pop() {
            if at > self.cfg.end {
                break;
            }
            self.now = at;
            let Some(event) = self.events.remove(&id) else {
                continue;
            };
            if self.trace {
                eprintln!("{:?} {}", self.now, describe(&event));
            }
            self.step(event);
            checks::after_step(self);
            if let Some(first) = self.violations.first() {
                return Err(format!(
                    "seed={}: at {:?}: {first} (replay: STRATA_SIM_SEED={} cargo test cluster::sim)",
                    self.seed, self.now, self.seed
                ));
            }
        }
        self.now = self.cfg.end;
        checks::at_end(self);
        match self.violations.first() {
            Some(first) => Err(format!(
                "seed={}: at the end: {first} (replay: STRATA_SIM_SEED={} cargo test cluster::sim)",
                self.seed, self.seed
            )),
            None => Ok(()),
        }
    }

    fn step(&mut self, event: SimEvent) {
        match event {
            SimEvent::JmTick => {
                if self.jm.is_some() {
                    self.jm_handle(Event::Tick);
                    self.schedule(self.now + TICK, SimEvent::JmTick);
                }
            }
            SimEvent::JmRestart => self.start_jm(),
            SimEvent::Submit { client } => self.submit(client),
            SimEvent::Deliver { conn, to, message } => self.deliver(conn, to, message),
            SimEvent::Closed { conn, to } => self.on_closed(conn, to),
            SimEvent::Tm {
                tm,
                incarnation,
                timer,
            } => {
                if self.tms[tm].incarnation != incarnation || !self.tms[tm].alive {
                    return;
                }
                if let Some(until) = self.tms[tm].paused_until
                    && until > self.now
                {
                    self.schedule(
                        until,
                        SimEvent::Tm {
                            tm,
                            incarnation,
                            timer,
                        },
                    );
                    return;
                }
                if timer == tm::Timer::Reconnect {
                    if self.tms[tm].conn.is_none() && !self.tms[tm].fencing {
                        self.tm_connect(tm);
                    }
                    return;
                }
                self.tm_timer(tm, timer);
            }
            SimEvent::Fault(kind) => self.fault(kind),
        }
    }

    fn submit(&mut self, client: usize) {
        let Some(conn) = self.connect(Endpoint::Client(client)) else {
            self.clients[client].outcome = Some(Outcome::JobManagerLost);
            return;
        };
        self.clients[client].conn = Some(conn);
        let template = Arc::clone(&self.jobs[self.clients[client].text]);
        let planned = (template.make)();
        self.jm_handle(Event::Submit {
            conn: ConnId(conn),
            job: Ok(Box::new(planned)),
        });
    }

    fn deliver(&mut self, conn: u64, to: Endpoint, message: Message) {
        match to {
            Endpoint::Jm => {
                if self.conns.get(&conn).is_some_and(|c| c.open) {
                    self.jm_handle(Event::Message {
                        conn: ConnId(conn),
                        message,
                    });
                }
            }
            Endpoint::Tm(tm) => self.tm_message(tm, conn, message),
            Endpoint::Client(client) => self.client_message(client, message),
            Endpoint::Rogue => {}
        }
    }

    fn client_message(&mut self, client: usize, message: Message) {
        let c = &mut self.clients[client];
        match message {
            Message::JobAccepted { job, .. } => c.job = Some(job),
            Message::JobRejected { reason } => c.outcome = Some(Outcome::Rejected(reason)),
            Message::JobFinished { summary } => {
                let outcome = Outcome::Ended {
                    job: summary.job,
                    state: summary.state,
                    reason: summary.reason.clone(),
                };
                if c.outcome.is_none() {
                    c.outcome = Some(outcome);
                    checks::on_job_finished(self, &summary);
                }
            }
            _ => {}
        }
    }

    fn on_closed(&mut self, conn: u64, to: Endpoint) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.open = false;
        }
        match to {
            Endpoint::Jm => self.jm_handle(Event::Closed {
                conn: ConnId(conn),
                reason: "simulated close".into(),
            }),
            Endpoint::Tm(tm) => {
                if let Some(until) = self.tms[tm].paused_until
                    && until > self.now
                {
                    // Frozen: it sees the close when it continues.
                    self.schedule(until, SimEvent::Closed { conn, to });
                    return;
                }
                if self.tms[tm].conn == Some(conn) && self.tms[tm].alive {
                    self.tm_fence(tm, "control connection closed");
                }
            }
            Endpoint::Client(client) => {
                let c = &mut self.clients[client];
                if c.conn == Some(conn) && c.outcome.is_none() {
                    c.outcome = Some(Outcome::JobManagerLost);
                }
            }
            Endpoint::Rogue => {}
        }
    }

    fn fault(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::CrashTm { tm, silent } => {
                if !self.tms[tm].alive {
                    return;
                }
                let conn = self.tms[tm].conn;
                self.tms[tm].crash();
                if let Some(conn) = conn {
                    if silent {
                        // The machine is gone: nothing closes the
                        // connection; the heartbeat monitor must notice.
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.open = false;
                        }
                    } else {
                        self.close(conn, Endpoint::Tm(tm));
                    }
                }
            }
            FaultKind::RestartTm { tm } => {
                if self.tms[tm].alive {
                    return;
                }
                self.tms[tm] = SimTm::restarted(&self.tms[tm], self.cfg.slots, self.cfg.bug);
                self.tm_connect(tm);
            }
            FaultKind::PauseTm { tm, pause } => {
                if self.tms[tm].alive {
                    self.tms[tm].paused_from = Some(self.now);
                    self.tms[tm].paused_until = Some(self.now + pause);
                    let incarnation = self.tms[tm].incarnation;
                    self.schedule(
                        self.now + pause,
                        SimEvent::Tm {
                            tm,
                            incarnation,
                            timer: tm::Timer::Resume,
                        },
                    );
                }
            }
            FaultKind::CrashJm => {
                if self.jm.is_none() {
                    return;
                }
                self.jm = None;
                let open: Vec<(u64, Endpoint)> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.open && (c.b == Endpoint::Jm))
                    .map(|(&id, c)| (id, c.a))
                    .collect();
                for (conn, _) in open {
                    self.close(conn, Endpoint::Jm);
                }
                let back = self.now + Duration::from_millis(200 + self.rng.next_u64() % 3000);
                self.schedule(back, SimEvent::JmRestart);
            }
            FaultKind::LoseAndClose => {
                // A message lost with its connection: a TaskManager's
                // connection drops.
                let tm = (self.rng.next_u64() % self.tms.len() as u64) as usize;
                if let Some(conn) = self.tms[tm].conn {
                    self.close(conn, Endpoint::Tm(tm));
                }
            }
            FaultKind::Forge => self.forge_unregistered(),
            FaultKind::RogueTaskManager => self.rogue_taskmanager(),
        }
    }

    /// Live executions and their tasks, as the JobManager deployed them.
    fn live_tasks(&self) -> Vec<(ExecutionId, (usize, u32))> {
        let Some(jm) = &self.jm else {
            return Vec::new();
        };
        let mut out: Vec<_> = jm
            .jobs
            .values()
            .flat_map(|j| j.tasks.keys().map(move |&k| (j.execution, k)))
            .collect();
        out.sort_unstable();
        out
    }

    /// An unregistered peer reports every live task finished.
    fn forge_unregistered(&mut self) {
        if let Some(conn) = self.connect(Endpoint::Rogue) {
            self.report_all_finished(conn);
        }
    }

    /// A registered TaskManager (with no slots) reports every live task of
    /// others finished.
    fn rogue_taskmanager(&mut self) {
        let conn = match self.rogue_conn {
            Some(c) if self.conns.get(&c).is_some_and(|c| c.open) => c,
            _ => {
                let Some(conn) = self.connect(Endpoint::Rogue) else {
                    return;
                };
                self.rogue_conn = Some(conn);
                self.send(
                    conn,
                    Endpoint::Rogue,
                    Message::RegisterTaskManager {
                        data_addr: std::net::SocketAddr::from(([127, 0, 0, 66], 1)),
                        slots: Vec::new(),
                        io: "rogue".into(),
                        transport: "rogue".into(),
                        gpu: "rogue".into(),
                        flight_addr: None,
                    },
                );
                conn
            }
        };
        self.report_all_finished(conn);
    }

    /// Forged: every live task FINISHED, sent on `conn`.
    fn report_all_finished(&mut self, conn: u64) {
        for (execution, (vertex, subtask)) in self.live_tasks() {
            self.send(
                conn,
                Endpoint::Rogue,
                Message::TaskStatus {
                    execution,
                    vertex,
                    subtask,
                    state: crate::protocol::ExecutionState::Finished,
                    error: None,
                    metrics: None,
                },
            );
        }
    }

    fn tm_message(&mut self, tm: usize, conn: u64, message: Message) {
        if !self.tms[tm].alive || self.tms[tm].conn != Some(conn) {
            return;
        }
        if let Some(until) = self.tms[tm].paused_until
            && until > self.now
        {
            // Frozen: it reads the socket when it continues.
            self.schedule(
                until,
                SimEvent::Deliver {
                    conn,
                    to: Endpoint::Tm(tm),
                    message,
                },
            );
            return;
        }
        let empty = match &message {
            Message::DeployTasks { job_text, .. } => {
                self.jobs.iter().any(|t| t.empty && &t.text == job_text)
            }
            _ => false,
        };
        let mut actions = tm::Actions::default();
        self.tms[tm].on_message(message, empty, self.now, &mut self.rng, &mut actions);
        self.apply_tm_actions(tm, actions);
    }

    fn tm_timer(&mut self, tm: usize, timer: tm::Timer) {
        let mut actions = tm::Actions::default();
        self.tms[tm].on_timer(
            timer,
            self.now,
            &mut self.rng,
            &mut actions,
            &mut self.executions,
        );
        self.apply_tm_actions(tm, actions);
    }

    fn tm_fence(&mut self, tm: usize, why: &str) {
        let mut actions = tm::Actions::default();
        self.tms[tm].fence(why, self.now, &mut self.rng, &mut actions);
        self.apply_tm_actions(tm, actions);
    }

    fn apply_tm_actions(&mut self, tm: usize, actions: tm::Actions) {
        let incarnation = self.tms[tm].incarnation;
        for message in actions.send {
            if let Some(conn) = self.tms[tm].conn {
                self.send(conn, Endpoint::Tm(tm), message);
            }
        }
        for (at, timer) in actions.timers {
            self.schedule(
                at,
                SimEvent::Tm {
                    tm,
                    incarnation,
                    timer,
                },
            );
        }
        if let Some(conn) = actions.close {
            self.close(conn, Endpoint::Tm(tm));
        }
        if actions.reconnect {
            self.tm_connect(tm);
        }
    }
}

/// The seeds a test runs: `STRATA_SIM_SEED` alone when set, else `count`
/// seeds from `base`.
pub fn seeds(base: u64, count: u64) -> Vec<u64> {
    match std::env::var("STRATA_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (base..base + count).collect(),
    }
}
