//! Jobs: submission, the scheduler, task states, job ends and summaries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::checkpointing::{self, JobCheckpointing};
use super::resources::ResourceManager;
use super::{COMPLETED_JOBS_MAX, ConnId, JobManagerCore, PlannedJob};
use crate::checkpoint::coordinator::TaskKey;
use crate::cluster::restart::RestartStrategy;
use crate::job::LogicalPlan;
use crate::job::graph::JobGraph;
use crate::metrics::TaskSnapshot;
use crate::protocol::{
    EdgeSummary, ExecutionId, ExecutionState, JobId, JobState, JobSummary, Message,
    OperatorSummary, RestoreDeployment, SubtaskLocation, TaskManagerId, TaskNetworkMetrics,
    VertexMetrics, VertexSummary,
};

pub struct TaskEntry {
    pub taskmanager: TaskManagerId,
    pub slot: usize,
    pub state: ExecutionState,
    pub metrics: TaskSnapshot,
}

pub struct JobEntry {
    pub id: JobId,
    pub name: String,
    pub placement: crate::placement::Placement,
    pub plan: Arc<LogicalPlan>,
    pub graph: Arc<JobGraph>,
    pub state: JobState,
    pub reason: Option<String>,
    pub client: ConnId,
    pub submitted_at: Duration,
    pub text: String,
    pub path: String,
    pub default_parallelism: u32,
    /// Execution attempt: 0, then one more per restart.
    pub attempt: u32,
    /// The id TaskManagers know the current attempt by.
    pub execution: ExecutionId,
    /// The current attempt's tasks.
    pub tasks: BTreeMap<TaskKey, TaskEntry>,
    /// When the current attempt's tasks were deployed (unacknowledged
    /// tasks fail the job after `deploy_timeout`).
    pub deployed_at: Duration,
    pub checkpointing: Option<JobCheckpointing>,
    pub restart: RestartStrategy,
    pub restarts: u32,
    pub last_failure: Option<String>,
    /// Set while the job waits to restart: the earliest restart time.
    pub restart_at: Option<Duration>,
    /// Tasks of the failed attempt that have not ended yet: the restart
    /// waits for them (their slots), or for their TaskManager's loss.
    pub draining: HashSet<(TaskManagerId, TaskKey)>,
    pub draining_execution: Option<ExecutionId>,
    /// Tasks whose output waits for the job's final commit.
    pub final_pending: HashSet<TaskKey>,
}

impl JobEntry {
    pub fn elapsed(&self, now: Duration) -> Duration {
        now.saturating_sub(self.submitted_at)
    }
}

/// A TaskManager's report about one task.
pub struct StatusReport {
    pub execution: ExecutionId,
    pub task: TaskKey,
    pub state: ExecutionState,
    pub error: Option<String>,
    pub metrics: Option<TaskSnapshot>,
}

/// Whether some job runs or drains `execution`.
pub fn execution_is_live(core: &JobManagerCore, execution: ExecutionId) -> bool {
    core.jobs.values().any(|j| {
        (j.execution == execution && j.restart_at.is_none())
            || j.draining_execution == Some(execution)
    })
}

pub fn not_enough_slots(needed: usize, free: usize, total: usize, tms: usize) -> String {
    format!(
        "not enough free task slots: the job needs {needed} (its largest operator parallelism), \
         the cluster has {free} free of {total} on {tms} TaskManager(s); lower the parallelism or add \
         TaskManagers or taskmanager.numberOfTaskSlots"
    )
}

impl JobManagerCore {
    pub(crate) fn submit(&mut self, conn: ConnId, planned: Result<Box<PlannedJob>, String>) {
        self.rm.set_client(conn);
        let planned = match planned {
            Ok(p) => p,
            Err(reason) => {
                self.send(conn, Message::JobRejected { reason });
                return;
            }
        };
        let needed = planned.graph.slots_needed() as usize;
        let free = self.rm.free_slots().len();
        if free < needed {
            let reason = not_enough_slots(needed, free, self.rm.total_slots(), self.rm.len());
            self.send(conn, Message::JobRejected { reason });
            return;
        }
        let id = JobId(self.rng.next_u64());
        let checkpointing = match JobCheckpointing::open(self, &planned.name, id) {
            Ok(c) => c,
            Err(reason) => {
                self.send(conn, Message::JobRejected { reason });
                return;
            }
        };
        self.send(
            conn,
            Message::JobAccepted {
                job: id,
                name: planned.name.clone(),
            },
        );
        let PlannedJob {
            name,
            plan,
            graph,
            placement,
            text,
            path,
            default_parallelism,
        } = *planned;
        let execution = ExecutionId(self.rng.next_u64());
        self.jobs.insert(
            id,
            JobEntry {
                id,
                name,
                placement,
                plan,
                graph,
                state: JobState::Running,
                reason: None,
                client: conn,
                submitted_at: self.now,
                text,
                path,
                default_parallelism,
                attempt: 0,
                execution,
                tasks: BTreeMap::new(),
                deployed_at: self.now,
                checkpointing,
                restart: RestartStrategy::from_config(&self.cfg.config),
                restarts: 0,
                last_failure: None,
                restart_at: None,
                draining: HashSet::new(),
                draining_execution: None,
                final_pending: HashSet::new(),
            },
        );
        if let Err(e) = self.deploy_attempt(id, None) {
            self.end_job(id, JobState::Failed, Some(e));
        }
    }

    /// Deploys the job's current execution on free slots, restoring
    /// `restore`. Returns why it could not (nothing was allocated then).
    pub(crate) fn deploy_attempt(
        &mut self,
        job: JobId,
        restore: Option<RestoreDeployment>,
    ) -> Result<(), String> {
        let free = self.rm.free_slots();
        let (total, tm_count) = (self.rm.total_slots(), self.rm.len());
        let Some(entry) = self.jobs.get_mut(&job) else {
            return Ok(());
        };
        let graph = Arc::clone(&entry.graph);
        let needed = graph.slots_needed() as usize;
        if free.len() < needed {
            return Err(not_enough_slots(needed, free.len(), total, tm_count));
        }
        let chosen = &free[..needed];
        let placement: Vec<SubtaskLocation> = chosen
            .iter()
            .map(|&(tm, slot)| SubtaskLocation {
                taskmanager: tm,
                data_addr: self
                    .rm
                    .get(tm)
                    .map(|t| t.data_addr)
                    .unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
                slot,
            })
            .collect();
        let mut per_tm: BTreeMap<TaskManagerId, Vec<(usize, u32)>> = BTreeMap::new();
        let mut tasks = BTreeMap::new();
        for v in &graph.vertices {
            for subtask in 0..v.parallelism {
                let at = &placement[subtask as usize];
                tasks.insert(
                    (v.id, subtask),
                    TaskEntry {
                        taskmanager: at.taskmanager,
                        slot: at.slot,
                        state: ExecutionState::Created,
                        metrics: TaskSnapshot::default(),
                    },
                );
                per_tm
                    .entry(at.taskmanager)
                    .or_default()
                    .push((v.id, subtask));
            }
        }
        let gpu_operators: Vec<Vec<usize>> = graph
            .vertices
            .iter()
            .map(|v| {
                v.operators
                    .iter()
                    .copied()
                    .filter(|&op| {
                        entry.placement.operators[op].tier == crate::kernels::backend::Tier::Gpu
                    })
                    .collect()
            })
            .collect();
        let elapsed = entry.elapsed(self.now);
        let checkpoint_deployment = entry
            .checkpointing
            .as_mut()
            .map(|c| c.start_attempt(tasks.keys().copied(), restore, elapsed));
        // Encode every deployment before sending any: one over the frame
        // limit fails the job now, with the cause, instead of a dropped
        // connection and a heartbeat timeout later.
        let mut messages = Vec::new();
        for (tm, tm_tasks) in per_tm {
            let message = Message::DeployTasks {
                job,
                execution: entry.execution,
                attempt: entry.attempt,
                job_text: entry.text.clone(),
                job_path: entry.path.clone(),
                default_parallelism: entry.default_parallelism,
                placement: placement.clone(),
                tasks: tm_tasks,
                gpu_operators: gpu_operators.clone(),
                checkpointing: checkpoint_deployment.clone(),
            };
            if let Err(e) = crate::protocol::codec::encode(&message) {
                return Err(format!(
                    "the deployment to {tm} cannot be sent: {e} (job text {} bytes, parallelism {needed})",
                    entry.text.len()
                ));
            }
            messages.push((tm, message));
        }
        entry.tasks = tasks;
        entry.deployed_at = self.now;
        let execution = entry.execution;
        let attempt = entry.attempt;
        let name = entry.name.clone();
        let task_count = entry.tasks.len();
        for &(tm, slot) in chosen {
            self.rm.allocate(tm, slot, job, execution);
        }
        for (tm, message) in messages {
            if let Some(conn) = self.rm.get(tm).map(|t| t.conn) {
                self.send(conn, message);
            }
        }
        tracing::info!(
            "job {name} ({job}) deployed{}: {task_count} tasks on {needed} slots",
            match attempt {
                0 => String::new(),
                n => format!(" (attempt {n}, execution {execution})"),
            },
        );
        Ok(())
    }

    pub(crate) fn on_task_status(&mut self, tm: TaskManagerId, report: StatusReport) {
        let StatusReport {
            execution,
            task,
            state: next,
            error,
            metrics,
        } = report;
        let Some((&job, entry)) = self
            .jobs
            .iter_mut()
            .find(|(_, j)| j.execution == execution || j.draining_execution == Some(execution))
        else {
            return;
        };
        if entry.execution != execution || entry.restart_at.is_some() {
            // A task of the failed attempt: the restart waits for it.
            if next.is_terminal() && entry.draining_execution == Some(execution) {
                // Record the end in the failed attempt's task table too: a
                // restart that cannot deploy fails over again from that
                // table, and must not wait for ends already reported (it
                // would wait forever; see the core test
                // `a_restart_that_finds_too_few_slots_…`).
                if entry.draining.remove(&(tm, task))
                    && entry.execution == execution
                    && let Some(t) = entry.tasks.get_mut(&task)
                {
                    t.state = next;
                }
                if entry.draining.is_empty() {
                    super::failover::restart_if_due(self, job);
                }
            }
            return;
        }
        let Some(t) = entry.tasks.get_mut(&task) else {
            tracing::warn!(
                "{tm} reported task {}/{} of execution {execution}, which has no such task: ignored",
                task.0,
                task.1
            );
            return;
        };
        if t.taskmanager != tm {
            tracing::warn!(
                "{tm} reported task {}/{} of execution {execution}, which runs on {}: refused",
                task.0,
                task.1,
                t.taskmanager
            );
            return;
        }
        // A periodic report snapshotted before the task ended can arrive
        // after its final report: the final metrics stand (else a summary
        // under load counts fewer rows than the job moved).
        if let Some(m) = metrics
            && (!t.state.is_terminal() || next.is_terminal())
        {
            t.metrics = m;
        }
        if t.state == next || !t.state.can_become(next) {
            // Periodic metric reports repeat RUNNING, and may trail the end.
            return;
        }
        t.state = next;
        if entry.state != JobState::Running {
            return;
        }
        match next {
            ExecutionState::Failed => {
                let reason = error.unwrap_or_else(|| format!("task {}/{} failed", task.0, task.1));
                self.fail_or_restart(job, reason);
            }
            ExecutionState::Finished => {
                checkpointing::on_task_finished(self, job, task);
                let all_finished = self.jobs[&job]
                    .tasks
                    .values()
                    .all(|t| t.state == ExecutionState::Finished);
                if all_finished {
                    self.end_job(job, JobState::Finished, None);
                } else {
                    checkpointing::commit_final_if_ready(self, job);
                }
            }
            _ => {}
        }
    }

    /// Ends a job: cancels what still runs, frees its allocations and
    /// reports to the client.
    pub(crate) fn end_job(&mut self, job: JobId, final_state: JobState, reason: Option<String>) {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        if entry.state != JobState::Running {
            return;
        }
        entry.state = final_state;
        entry.reason = reason.clone();
        let execution = entry.execution;
        let mut tms: Vec<TaskManagerId> = entry.tasks.values().map(|t| t.taskmanager).collect();
        tms.sort_unstable();
        tms.dedup();
        let message = if final_state == JobState::Finished {
            tracing::info!("job {} ({job}) finished", entry.name);
            Message::ReleaseJob { execution }
        } else {
            let why = reason.clone().unwrap_or_default();
            tracing::warn!("job {} ({job}) {final_state:?}: {why}", entry.name);
            Message::CancelJob {
                execution,
                reason: why,
            }
        };
        if let Some(c) = &mut entry.checkpointing {
            c.store.job_ended(final_state);
        }
        for tm in tms {
            if let Some(conn) = self.rm.get(tm).map(|t| t.conn) {
                self.send(conn, message.clone());
            }
        }
        self.rm.free_job(job);
        if let Some(entry) = self.jobs.remove(&job) {
            let summary = summarize(&entry, &self.rm, self.now);
            if self.completed.len() == COMPLETED_JOBS_MAX {
                self.completed.pop_front();
            }
            self.completed.push_back(summary.clone());
            self.send(
                entry.client,
                Message::JobFinished {
                    summary: Box::new(summary),
                },
            );
        }
    }
}

/// Fails jobs whose deployed tasks were not acknowledged in time: their
/// TaskManager lost the deployment (a crash inside it, a dropped message).
pub fn check_deploy_deadlines(core: &mut JobManagerCore) {
    let timeout = core.cfg.deploy_timeout;
    let now = core.now;
    let late: Vec<(JobId, String)> = core
        .jobs
        .values()
        .filter(|j| j.state == JobState::Running && j.restart_at.is_none())
        .filter(|j| now.saturating_sub(j.deployed_at) > timeout)
        .filter_map(|j| {
            let (key, t) = j
                .tasks
                .iter()
                .find(|(_, t)| t.state == ExecutionState::Created)?;
            Some((
                j.id,
                format!(
                    "task {}/{} deployed to {} was not acknowledged within {:.1} s \
                     (heartbeat.timeout): its TaskManager lost the deployment",
                    key.0,
                    key.1,
                    t.taskmanager,
                    timeout.as_secs_f64()
                ),
            ))
        })
        .collect();
    for (job, reason) in late {
        core.fail_or_restart(job, reason);
    }
}

/// Sends each job's client a progress report.
pub fn send_progress(core: &mut JobManagerCore) {
    let mut out = Vec::new();
    for (&job, entry) in &core.jobs {
        let mut rows_in = 0;
        let mut expected = 0;
        for t in entry.tasks.values() {
            expected += t.metrics.source_rows_expected;
            for o in &t.metrics.operators {
                if entry
                    .plan
                    .spec
                    .operators
                    .get(o.operator)
                    .is_some_and(|op| op.input.is_none())
                {
                    rows_in += o.rows_out;
                }
            }
        }
        out.push((
            entry.client,
            Message::JobProgress {
                job,
                rows_in,
                rows_expected: expected,
                tasks_running: entry
                    .tasks
                    .values()
                    .filter(|t| t.state == ExecutionState::Running)
                    .count(),
                tasks_total: entry.tasks.len(),
            },
        ));
    }
    for (conn, message) in out {
        core.send(conn, message);
    }
}

pub fn summarize(entry: &JobEntry, rm: &ResourceManager, now: Duration) -> JobSummary {
    let used: HashSet<TaskManagerId> = entry.tasks.values().map(|t| t.taskmanager).collect();
    let distinct = |f: &dyn Fn(&super::resources::TaskManagerEntry) -> String, all: bool| {
        let mut v: Vec<String> = rm
            .iter()
            .filter(|t| all || used.contains(&t.id))
            .map(f)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let io = distinct(&|t| t.io.clone(), false);
    let transports = distinct(&|t| t.transport.clone(), false);
    let gpu = distinct(&|t| t.gpu.clone(), true);
    let plan = &entry.plan;
    let graph = &entry.graph;
    let ops = &plan.spec.operators;
    let mut rows_in_by_op = vec![0u64; ops.len()];
    let mut rows_out_by_op = vec![0u64; ops.len()];
    let mut summary = JobSummary {
        job: entry.id,
        name: entry.name.clone(),
        state: entry.state,
        reason: entry.reason.clone(),
        wall_ms: entry.elapsed(now).as_millis() as u64,
        rows_in: 0,
        rows_out: 0,
        first_row_unix_us: None,
        vertices: Vec::new(),
        remote_bytes: 0,
        remote_buffers: 0,
        in_pool_usage_permille: 0,
        out_pool_usage_permille: 0,
        local_rows: 0,
        backpressure_ms: 0,
        late_rows: 0,
        managed_peak_bytes: 0,
        spill_bytes_written: 0,
        spill_bytes_read: 0,
        spill_file_count: 0,
        transport: format!(
            "{} between TaskManagers, local channels within one",
            transports.join("; ")
        ),
        io,
        taskmanagers: rm.len(),
        slots: rm.total_slots(),
        tasks: Vec::new(),
        placement: Some(entry.placement.clone()),
        gpu_offload: Default::default(),
        checkpoints: entry
            .checkpointing
            .as_ref()
            .map(|c| c.coordinator.summary())
            .unwrap_or_default(),
        checkpointing: entry.checkpointing.is_some(),
        restarts: entry.restarts,
        last_failure: entry.last_failure.clone(),
        gpu,
    };
    summary.tasks = entry
        .tasks
        .iter()
        .map(|(&(vertex, subtask), t)| TaskNetworkMetrics {
            vertex,
            subtask,
            taskmanager: t.taskmanager,
            in_pool_usage_permille: t.metrics.in_pool_usage_permille,
            out_pool_usage_permille: t.metrics.out_pool_usage_permille,
            backpressured_ms_per_second: t.metrics.backpressured_ms_per_second,
            backpressure_ms: t.metrics.backpressure_ms,
            remote_bytes_out: t.metrics.remote_bytes_out,
            remote_buffers_out: t.metrics.remote_buffers_out,
            remote_bytes_in: t.metrics.remote_bytes_in,
        })
        .collect();
    for t in entry.tasks.values() {
        let m = &t.metrics;
        for o in &m.operators {
            if o.operator < ops.len() {
                rows_in_by_op[o.operator] += o.rows_in;
                rows_out_by_op[o.operator] += o.rows_out;
            }
        }
        summary.remote_bytes += m.remote_bytes_out;
        summary.remote_buffers += m.remote_buffers_out;
        summary.in_pool_usage_permille =
            summary.in_pool_usage_permille.max(m.in_pool_usage_permille);
        summary.out_pool_usage_permille = summary
            .out_pool_usage_permille
            .max(m.out_pool_usage_permille);
        summary.local_rows += m.local_rows_out;
        summary.backpressure_ms += m.backpressure_ms;
        summary.late_rows += m.late_rows;
        summary.managed_peak_bytes = summary.managed_peak_bytes.max(m.managed_peak_bytes);
        summary.gpu_offload.add(&m.gpu);
        summary.spill_bytes_written += m.spill_bytes_written;
        summary.spill_bytes_read += m.spill_bytes_read;
        summary.spill_file_count += m.spill_file_count;
        if m.first_row_unix_us > 0 {
            let first = summary.first_row_unix_us.get_or_insert(m.first_row_unix_us);
            *first = (*first).min(m.first_row_unix_us);
        }
    }
    for (i, op) in ops.iter().enumerate() {
        if op.input.is_none() {
            summary.rows_in += rows_out_by_op[i];
        }
        if op.kind.is_sink() {
            summary.rows_out += rows_in_by_op[i];
        }
    }
    let mut placement_by_vertex: HashMap<usize, Vec<(u32, String)>> = HashMap::new();
    for (&(vertex, subtask), t) in &entry.tasks {
        placement_by_vertex
            .entry(vertex)
            .or_default()
            .push((subtask, format!("{}/slot{}", t.taskmanager, t.slot)));
    }
    let vertex_metrics = vertex_metrics(entry, &rows_in_by_op, &rows_out_by_op);
    for v in &graph.vertices {
        let mut placement = placement_by_vertex.remove(&v.id).unwrap_or_default();
        placement.sort();
        summary.vertices.push(VertexSummary {
            name: graph.vertex_name(plan, v.id),
            parallelism: v.parallelism,
            placement: placement.into_iter().map(|(_, p)| p).collect(),
            input_partitioner: v
                .inputs
                .first()
                .map(|&e| graph.edges[e].partitioner.name().to_owned()),
            inputs: v
                .inputs
                .iter()
                .map(|&e| {
                    let edge = &graph.edges[e];
                    EdgeSummary {
                        source: edge.source,
                        exchange: edge.partitioner.name().to_ascii_lowercase(),
                        transport: edge_transport(entry, rm, (edge.source, edge.target)),
                    }
                })
                .collect(),
            metrics: vertex_metrics[v.id].clone(),
            tier: entry.placement.vertex_tier(graph, v.id),
            operators: v
                .operators
                .iter()
                .map(|&i| OperatorSummary {
                    name: ops[i].name.clone(),
                    kind: ops[i].kind.type_name().into(),
                    rows_in: rows_in_by_op[i],
                    rows_out: rows_out_by_op[i],
                })
                .collect(),
        });
    }
    summary
}

/// Each vertex's tasks' metrics, aggregated: rows through the vertex (its
/// head operator's input, a source's output; its last operator's output),
/// running subtasks, and the worst back-pressure and pool usage.
fn vertex_metrics(
    entry: &JobEntry,
    rows_in_by_op: &[u64],
    rows_out_by_op: &[u64],
) -> Vec<VertexMetrics> {
    let ops = &entry.plan.spec.operators;
    let mut out: Vec<VertexMetrics> = entry
        .graph
        .vertices
        .iter()
        .map(|v| {
            let head = v.operators[0];
            let last = *v.operators.last().expect("a vertex has an operator");
            let rows_in = if ops[head].input.is_none() {
                rows_out_by_op[head]
            } else {
                rows_in_by_op[head]
            };
            VertexMetrics {
                rows_in,
                rows_out: rows_out_by_op[last],
                ..VertexMetrics::default()
            }
        })
        .collect();
    for (&(vertex, _), t) in &entry.tasks {
        let Some(m) = out.get_mut(vertex) else {
            continue;
        };
        if t.state == ExecutionState::Running {
            m.subtasks_running += 1;
        }
        let n = &t.metrics;
        m.backpressured_ms_per_second_max = m
            .backpressured_ms_per_second_max
            .max(n.backpressured_ms_per_second);
        m.in_pool_usage_permille_max = m.in_pool_usage_permille_max.max(n.in_pool_usage_permille);
        m.out_pool_usage_permille_max =
            m.out_pool_usage_permille_max.max(n.out_pool_usage_permille);
    }
    out
}

/// A transport line's name: `tcp` of "tcp, task reads (…)".
fn transport_name(line: &str) -> &str {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .next()
        .filter(|name| !name.is_empty())
        .unwrap_or("?")
}

/// How rows cross the edge `(source, target)`: `local` when every subtask
/// of both vertices runs on one TaskManager, else the transports of the
/// TaskManagers involved (their first word: `tcp`, `verbs`, …).
fn edge_transport(
    entry: &JobEntry,
    rm: &ResourceManager,
    (source, target): (usize, usize),
) -> String {
    let mut tms: Vec<TaskManagerId> = entry
        .tasks
        .iter()
        .filter(|((v, _), _)| *v == source || *v == target)
        .map(|(_, t)| t.taskmanager)
        .collect();
    tms.sort_unstable();
    tms.dedup();
    if tms.len() <= 1 {
        return "local".to_owned();
    }
    let mut names: Vec<String> = tms
        .iter()
        .filter_map(|&tm| rm.get(tm))
        .map(|t| transport_name(&t.transport).to_owned())
        .collect();
    names.sort();
    names.dedup();
    names.join("/")
}
