//! A simulated TaskManager: the real [`SlotTable`] and a model of its
//! session, deployments and task threads (tasks take simulated time; no
//! operator runs).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{Bug, CANCEL_MAX, ExecutionRecord, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT};
use crate::cluster::jobmanager::core::Rng;
use crate::protocol::{
    ExecutionId, ExecutionState, Message, ResourceProfile, SlotStatus, TaskManagerId,
};
use crate::taskmanager::slots::{SlotTable, TaskKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    Heartbeat,
    Start {
        execution: ExecutionId,
        task: TaskKey,
    },
    End {
        execution: ExecutionId,
        task: TaskKey,
    },
    /// A deployment that cannot reach a producer fails its unstarted tasks.
    DeployFails {
        execution: ExecutionId,
    },
    Reconnect,
    Resume,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Pending,
    Running,
}

struct SimTask {
    slot: usize,
    phase: Phase,
    /// How it ends when its `End` timer fires.
    end_state: ExecutionState,
    /// An empty source: ends as soon as it runs.
    instant: bool,
}

/// What the TaskManager does after an event.
#[derive(Default)]
pub struct Actions {
    pub send: Vec<Message>,
    pub timers: Vec<(Duration, Timer)>,
    pub close: Option<u64>,
    pub reconnect: bool,
}

pub struct SimTm {
    pub index: usize,
    pub incarnation: u64,
    pub alive: bool,
    pub paused_from: Option<Duration>,
    pub paused_until: Option<Duration>,
    pub conn: Option<u64>,
    pub registered: Option<TaskManagerId>,
    pub slots: SlotTable,
    tasks: BTreeMap<(ExecutionId, TaskKey), SimTask>,
    /// Waiting for its tasks to end before it registers again.
    pub fencing: bool,
    /// When the TaskManager was told to cancel or release each execution.
    pub told: HashMap<ExecutionId, Duration>,
    /// Its slot report and since when it has not changed.
    pub report: Vec<SlotStatus>,
    pub report_since: Duration,
    bug: Option<Bug>,
}

fn profile() -> ResourceProfile {
    ResourceProfile {
        cpu_cores: 1.0,
        managed_memory_bytes: 1 << 20,
        network_memory_bytes: 1 << 20,
        gpu: None,
    }
}

impl SimTm {
    pub fn new(index: usize, slots: usize, bug: Option<Bug>) -> Self {
        let mut table = SlotTable::new(slots, profile());
        if bug == Some(Bug::FreeOnFirstEnd) {
            table.inject(crate::taskmanager::slots::Fault::FreeOnFirstEnd);
        }
        let report = table.report();
        Self {
            index,
            incarnation: 1,
            alive: true,
            paused_from: None,
            paused_until: None,
            conn: None,
            registered: None,
            slots: table,
            tasks: BTreeMap::new(),
            fencing: false,
            told: HashMap::new(),
            report,
            report_since: Duration::ZERO,
            bug,
        }
    }

    /// A new process on the same machine.
    pub fn restarted(old: &SimTm, slots: usize, bug: Option<Bug>) -> Self {
        let mut tm = Self::new(old.index, slots, bug);
        tm.incarnation = old.incarnation + 1;
        tm
    }

    pub fn crash(&mut self) {
        self.alive = false;
        self.conn = None;
        self.registered = None;
        self.tasks.clear();
    }

    /// Live tasks (started or not) of each execution on each slot.
    pub fn live(&self) -> impl Iterator<Item = (ExecutionId, TaskKey, usize)> + '_ {
        self.tasks.iter().map(|(&(e, k), t)| (e, k, t.slot))
    }

    pub fn has_live_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    fn refresh_report(&mut self, now: Duration, actions: &mut Actions) {
        let report = self.slots.report();
        if report != self.report {
            self.report = report.clone();
            self.report_since = now;
        }
        // Sent on every change, before any task end it follows from.
        actions.send.push(Message::Heartbeat {
            slots: report,
            usage: None,
        });
    }

    pub fn on_connected(
        &mut self,
        conn: u64,
        now: Duration,
        violations: &mut Vec<String>,
    ) -> Message {
        if self.has_live_tasks() {
            violations.push(format!(
                "invariant 5: TaskManager {} registers again with {} task(s) of its last session running",
                self.index,
                self.tasks.len()
            ));
        }
        self.conn = Some(conn);
        self.registered = None;
        let _ = now;
        Message::RegisterTaskManager {
            data_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + self.index as u16)),
            slots: self.slots.report(),
            io: "sim".into(),
            transport: "sim".into(),
            gpu: "sim".into(),
            flight_addr: None,
        }
    }

    pub fn on_message(
        &mut self,
        message: Message,
        empty: bool,
        now: Duration,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        match message {
            Message::Registered { taskmanager } => {
                self.registered = Some(taskmanager);
                actions
                    .timers
                    .push((now + HEARTBEAT_INTERVAL, Timer::Heartbeat));
            }
            Message::DeployTasks {
                execution,
                placement,
                tasks,
                ..
            } => self.deploy(execution, &placement, &tasks, empty, now, rng, actions),
            Message::CancelJob { execution, .. } => self.cancel(execution, now, rng, actions),
            Message::ReleaseJob { execution } => {
                self.told.entry(execution).or_insert(now);
                self.slots.release(execution.0);
                self.refresh_report(now, actions);
            }
            Message::Disconnect { .. } => self.fence("disconnected", now, rng, actions),
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn deploy(
        &mut self,
        execution: ExecutionId,
        placement: &[crate::protocol::SubtaskLocation],
        tasks: &[(usize, u32)],
        empty: bool,
        now: Duration,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let placements: Vec<(usize, TaskKey)> = tasks
            .iter()
            .map(|&(vertex, subtask)| {
                (
                    placement[subtask as usize].slot,
                    TaskKey { vertex, subtask },
                )
            })
            .collect();
        let status = |task: &TaskKey, state, error: Option<String>| Message::TaskStatus {
            execution,
            vertex: task.vertex,
            subtask: task.subtask,
            state,
            error,
            metrics: None,
        };
        if self.tasks.keys().any(|(e, _)| *e == execution) {
            // A duplicated deployment: already running.
            return;
        }
        if let Err(e) = self.slots.allocate(execution.0, &placements) {
            for (_, task) in &placements {
                actions
                    .send
                    .push(status(task, ExecutionState::Failed, Some(e.to_string())));
            }
            return;
        }
        for &(slot, task) in &placements {
            actions
                .send
                .push(status(&task, ExecutionState::Deploying, None));
            let end_state = if rng.next_u64() % 100 < 3 {
                ExecutionState::Failed
            } else {
                ExecutionState::Finished
            };
            self.tasks.insert(
                (execution, task),
                SimTask {
                    slot,
                    phase: Phase::Pending,
                    end_state,
                    instant: empty,
                },
            );
            // Slow starts now and then.
            let start = if rng.next_u64().is_multiple_of(10) {
                Duration::from_millis(rng.next_u64() % 2000)
            } else {
                Duration::from_millis(rng.next_u64() % 20)
            };
            actions
                .timers
                .push((now + start, Timer::Start { execution, task }));
        }
        if rng.next_u64() % 100 < 4 {
            let at = now + Duration::from_millis(rng.next_u64() % 30);
            actions.timers.push((at, Timer::DeployFails { execution }));
        }
        self.refresh_report(now, actions);
    }

    fn cancel(
        &mut self,
        execution: ExecutionId,
        now: Duration,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        self.told.entry(execution).or_insert(now);
        let keys: Vec<TaskKey> = self
            .tasks
            .keys()
            .filter(|(e, _)| *e == execution)
            .map(|&(_, k)| k)
            .collect();
        for task in keys {
            let phase = self.tasks[&(execution, task)].phase;
            match phase {
                Phase::Pending => {
                    // Never started: the deployment rolls it back.
                    self.tasks.remove(&(execution, task));
                    actions.send.push(Message::TaskStatus {
                        execution,
                        vertex: task.vertex,
                        subtask: task.subtask,
                        state: ExecutionState::Canceled,
                        error: None,
                        metrics: None,
                    });
                }
                Phase::Running => {
                    if let Some(t) = self.tasks.get_mut(&(execution, task)) {
                        t.end_state = ExecutionState::Canceled;
                    }
                    let at =
                        now + Duration::from_millis(rng.next_u64() % CANCEL_MAX.as_millis() as u64);
                    actions.timers.push((at, Timer::End { execution, task }));
                }
            }
        }
        self.slots.release(execution.0);
        self.refresh_report(now, actions);
    }

    /// The session is gone: cancel everything, and register again once no
    /// task runs.
    pub fn fence(&mut self, _why: &str, now: Duration, rng: &mut Rng, actions: &mut Actions) {
        if let Some(conn) = self.conn.take() {
            actions.close = Some(conn);
        }
        self.registered = None;
        self.fencing = true;
        let executions: Vec<ExecutionId> = {
            let mut e: Vec<_> = self.tasks.keys().map(|(e, _)| *e).collect();
            e.extend(self.slots.jobs().into_iter().map(ExecutionId));
            e.sort_unstable();
            e.dedup();
            e
        };
        for execution in executions {
            self.cancel(execution, now, rng, actions);
        }
        // No connection: nothing is sent while fencing.
        actions.send.clear();
        self.finish_fence_if_done(actions);
    }

    fn finish_fence_if_done(&mut self, actions: &mut Actions) {
        if self.fencing && !self.has_live_tasks() {
            self.fencing = false;
            actions.reconnect = true;
        }
    }

    pub fn on_timer(
        &mut self,
        timer: Timer,
        now: Duration,
        rng: &mut Rng,
        actions: &mut Actions,
        executions: &mut HashMap<ExecutionId, ExecutionRecord>,
    ) {
        match timer {
            Timer::Heartbeat => {
                if self.registered.is_some() {
                    self.refresh_report(now, actions);
                    actions
                        .timers
                        .push((now + HEARTBEAT_INTERVAL, Timer::Heartbeat));
                }
            }
            Timer::Resume => {
                let from = self.paused_from.take().unwrap_or(now);
                self.paused_until = None;
                // Its tasks stood still too: what it was told is due later.
                let paused = now.saturating_sub(from);
                for told in self.told.values_mut() {
                    *told += paused;
                }
                // The TaskManager notices a pause near heartbeat.timeout
                // and fences itself.
                if now.saturating_sub(from) + HEARTBEAT_INTERVAL >= HEARTBEAT_TIMEOUT {
                    self.fence("paused", now, rng, actions);
                }
            }
            Timer::Start { execution, task } => {
                let Some(t) = self.tasks.get_mut(&(execution, task)) else {
                    return;
                };
                if t.phase != Phase::Pending {
                    return;
                }
                if self.slots.task_started(execution.0, t.slot, task).is_err() {
                    return;
                }
                t.phase = Phase::Running;
                let instant = t.instant;
                for state in [ExecutionState::Initializing, ExecutionState::Running] {
                    actions.send.push(Message::TaskStatus {
                        execution,
                        vertex: task.vertex,
                        subtask: task.subtask,
                        state,
                        error: None,
                        metrics: None,
                    });
                }
                let run = if instant || rng.next_u64().is_multiple_of(3) {
                    Duration::ZERO
                } else {
                    Duration::from_millis(rng.next_u64() % 3000)
                };
                actions
                    .timers
                    .push((now + run, Timer::End { execution, task }));
            }
            Timer::End { execution, task } => {
                let Some(t) = self.tasks.remove(&(execution, task)) else {
                    return;
                };
                let _ = self.slots.task_ended(execution.0, t.slot, task);
                self.refresh_report(now, actions);
                if t.end_state == ExecutionState::Finished
                    && let Some(record) = executions.get_mut(&execution)
                {
                    record.finished.insert((task.vertex, task.subtask));
                }
                actions.send.push(Message::TaskStatus {
                    execution,
                    vertex: task.vertex,
                    subtask: task.subtask,
                    state: t.end_state,
                    error: (t.end_state == ExecutionState::Failed)
                        .then(|| format!("simulated failure of task {task}")),
                    metrics: None,
                });
                self.finish_fence_if_done(actions);
                if self.fencing {
                    actions.send.clear();
                }
            }
            Timer::DeployFails { execution } => {
                let pending: Vec<TaskKey> = self
                    .tasks
                    .iter()
                    .filter(|((e, _), t)| *e == execution && t.phase == Phase::Pending)
                    .map(|(&(_, k), _)| k)
                    .collect();
                if pending.is_empty() {
                    return;
                }
                for task in &pending {
                    self.tasks.remove(&(execution, *task));
                }
                if self.bug != Some(Bug::SlotLeakOnFailedDeploy) {
                    self.slots.release(execution.0);
                }
                self.refresh_report(now, actions);
                for task in pending {
                    actions.send.push(Message::TaskStatus {
                        execution,
                        vertex: task.vertex,
                        subtask: task.subtask,
                        state: ExecutionState::Failed,
                        error: Some("simulated: cannot connect to a producer".into()),
                        metrics: None,
                    });
                }
            }
            Timer::Reconnect => {}
        }
    }
}
