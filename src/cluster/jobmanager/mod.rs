//! The JobManager: dispatcher, resource manager, scheduler and heartbeat
//! monitor in one process.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use super::ClusterError;
use super::rpc::{
    ChannelLocation, ExecutionState, InputGateDeployment, JobState, JobSummary, Message,
    OperatorSummary, OutputDeployment, SlotStatus, TaskDeploymentDescriptor, TaskNetworkMetrics,
    VertexSummary, read_message, write_message,
};
use crate::config::Config;
use crate::exec::sink::output::{check_sink_outputs, prepare_sink_outputs};
use crate::job::graph::JobGraph;
use crate::job::{LogicalPlan, parse_job, plan};
use crate::metrics::TaskSnapshot;

mod checkpointing;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct TmEntry {
    name: String,
    io: String,
    transport: String,
    /// The TaskManager's GPU line (its GPUs, or why it has none).
    gpu: String,
    data_addr: SocketAddr,
    slots: Vec<SlotStatus>,
    /// The job each slot is allocated to, as the JobManager sees it.
    allocated: Vec<Option<u64>>,
    last_heartbeat: Instant,
    tx: UnboundedSender<Message>,
}

struct TaskEntry {
    taskmanager: String,
    slot: usize,
    state: ExecutionState,
    metrics: TaskSnapshot,
}

struct JobEntry {
    name: String,
    placement: crate::placement::Placement,
    plan: Arc<LogicalPlan>,
    graph: Arc<JobGraph>,
    state: JobState,
    reason: Option<String>,
    /// The current attempt's tasks.
    tasks: HashMap<(usize, u32), TaskEntry>,
    client: UnboundedSender<Message>,
    started: Instant,
    /// The job file, to deploy restarts.
    text: String,
    path: String,
    default_parallelism: u32,
    /// Execution attempt: 0, then one more per restart.
    attempt: u32,
    /// The id TaskManagers know the current attempt by (the job id for
    /// attempt 0): messages of an earlier attempt can never reach this one.
    exec: u64,
    /// Coordinator and storage, when checkpointing is on.
    checkpointing: Option<checkpointing::JobCheckpointing>,
    restart: crate::cluster::restart::RestartStrategy,
    restarts: u32,
    last_failure: Option<String>,
    /// Set while the job waits to restart.
    restart_at: Option<Instant>,
    /// Tasks of the failed attempt that have not ended yet (taskmanager,
    /// vertex, subtask): the restart waits for their slots.
    draining: Vec<(String, usize, u32)>,
    draining_exec: Option<u64>,
    draining_since: Instant,
    /// Tasks whose output waits for the job's final commit.
    final_pending: HashSet<(usize, u32)>,
}

#[derive(Default)]
struct State {
    taskmanagers: Vec<TmEntry>,
    jobs: HashMap<u64, JobEntry>,
    /// The most recent ended jobs, newest last (at most `COMPLETED_JOBS_MAX`).
    completed: std::collections::VecDeque<JobSummary>,
    next_tm: u32,
    next_job: u64,
}

/// Ended jobs kept for the REST API and the web UI.
const COMPLETED_JOBS_MAX: usize = 100;

/// A TaskManager as the REST API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskManagerInfo {
    pub id: String,
    pub data_addr: SocketAddr,
    pub slots: Vec<SlotStatus>,
    pub allocated: Vec<Option<u64>>,
    pub last_heartbeat_ms: u64,
    /// The IOManager's backend line, fallback reason included.
    pub io: String,
    /// The data-plane transport and why it was chosen.
    pub transport: String,
    /// The GPUs the TaskManager found, or why it offers CPU slots only.
    pub gpu: String,
}

/// Everything the REST API and `/metrics` read, copied under one lock.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterSnapshot {
    pub taskmanagers: Vec<TaskManagerInfo>,
    pub running: Vec<JobSummary>,
    pub completed: Vec<JobSummary>,
}

/// A running JobManager.
pub struct JobManager {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl JobManager {
    pub async fn start(config: Config, bind: &str) -> Result<Self, ClusterError> {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| ClusterError::Bind {
                address: bind.to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ClusterError::Bind {
            address: bind.to_owned(),
            source,
        })?;
        let state = Arc::new(Mutex::new(State {
            next_job: job_id_seed(),
            ..State::default()
        }));
        let config = Arc::new(config);
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&state),
            Arc::clone(&config),
        ));
        tokio::spawn(monitor_loop(Arc::clone(&state), Arc::clone(&config)));
        tracing::info!("JobManager listening on {addr}");
        Ok(Self { addr, state })
    }

    /// TaskManagers currently registered.
    pub fn taskmanager_count(&self) -> usize {
        lock(&self.state).taskmanagers.len()
    }

    /// A consistent copy of the cluster's state for the REST API.
    pub fn snapshot(&self) -> ClusterSnapshot {
        snapshot(&lock(&self.state))
    }

    /// Serves the REST API, `/metrics` and the web UI on `address`.
    pub async fn serve_rest(&self, address: &str) -> Result<SocketAddr, crate::web::WebError> {
        let bound = crate::web::serve(address, self.snapshot_source()).await?;
        tracing::info!("web UI and REST API at http://{bound}/ (Prometheus: /metrics)");
        Ok(bound)
    }

    /// A handle the REST server polls.
    pub fn snapshot_source(&self) -> impl Fn() -> ClusterSnapshot + Send + Sync + 'static {
        let state = Arc::clone(&self.state);
        move || snapshot(&lock(&state))
    }
}

fn job_id_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::kernels::cpu::hash::fmix64(nanos ^ u64::from(std::process::id()))
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, config: Arc<Config>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, peer, Arc::clone(&state), Arc::clone(&config)));
            }
            Err(e) => {
                tracing::warn!("JobManager accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, state: Arc<Mutex<State>>, config: Arc<Config>) {
    let (mut reader, mut writer) = stream.into_split();
    let first = match read_message(&mut reader).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!("connection from {peer} closed before saying anything: {e}");
            return;
        }
    };
    let (tx, mut rx) = unbounded_channel::<Message>();
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_message(&mut writer, &msg).await.is_err() {
                break;
            }
        }
    });
    match first {
        Message::RegisterTaskManager {
            data_addr,
            slots,
            io,
            transport,
            gpu,
            ..
        } => {
            let name = {
                let mut s = lock(&state);
                s.next_tm += 1;
                let name = format!("tm-{}", s.next_tm);
                let allocated = vec![None; slots.len()];
                s.taskmanagers.push(TmEntry {
                    name: name.clone(),
                    io,
                    transport,
                    gpu,
                    data_addr,
                    slots,
                    allocated,
                    last_heartbeat: Instant::now(),
                    tx: tx.clone(),
                });
                name
            };
            tracing::info!("TaskManager {name} registered from {peer} (data port {data_addr})");
            let _ = tx.send(Message::Registered {
                taskmanager: name.clone(),
            });
            loop {
                match read_message(&mut reader).await {
                    Ok(Message::Heartbeat { slots }) => {
                        let mut s = lock(&state);
                        if let Some(tm) = s.taskmanagers.iter_mut().find(|t| t.name == name) {
                            tm.last_heartbeat = Instant::now();
                            tm.slots = slots;
                        }
                        let _ = tx.send(Message::HeartbeatAck);
                    }
                    Ok(Message::TaskStatus {
                        job,
                        vertex,
                        subtask,
                        state: task_state,
                        error,
                        metrics,
                    }) => on_task_status(&state, job, vertex, subtask, task_state, error, metrics),
                    Ok(Message::AcknowledgeCheckpoint {
                        job,
                        vertex,
                        subtask,
                        checkpoint,
                        handle,
                        alignment_ms,
                    }) => checkpointing::on_ack(
                        &mut lock(&state),
                        job,
                        (vertex, subtask),
                        checkpoint,
                        handle,
                        Duration::from_millis(alignment_ms),
                    ),
                    Ok(Message::DeclineCheckpoint {
                        job,
                        vertex,
                        subtask,
                        checkpoint,
                        reason,
                    }) => checkpointing::on_decline(
                        &mut lock(&state),
                        job,
                        (vertex, subtask),
                        checkpoint,
                        &reason,
                    ),
                    Ok(Message::FinalCommitPending {
                        job,
                        vertex,
                        subtask,
                    }) => checkpointing::on_final_commit_pending(
                        &mut lock(&state),
                        job,
                        (vertex, subtask),
                    ),
                    Ok(other) => tracing::warn!("unexpected message from {name}: {other:?}"),
                    Err(e) => {
                        // Loss is declared by the heartbeat monitor, as in Flink.
                        tracing::warn!("control connection to {name} closed: {e}");
                        break;
                    }
                }
            }
        }
        Message::SubmitJob { job_text, job_path } => {
            submit(&state, &config, &job_text, &job_path, tx.clone());
            // Keep the client's connection open until the job has finished.
            while read_message(&mut reader).await.is_ok() {}
        }
        other => tracing::warn!("unexpected first message from {peer}: {other:?}"),
    }
    drop(tx);
    let _ = writer_task.await;
}

fn submit(
    state: &Arc<Mutex<State>>,
    config: &Config,
    text: &str,
    path: &str,
    client: UnboundedSender<Message>,
) {
    let planned = parse_job(text, Path::new(path)).and_then(plan);
    let plan = match planned {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let _ = client.send(Message::JobRejected {
                reason: e.to_string(),
            });
            return;
        }
    };
    // Sink output directories are checked once per job, here, and not per
    // attempt: a restart must not be refused by its own earlier output.
    if let Err(e) = check_sink_outputs(&plan.spec) {
        let _ = client.send(Message::JobRejected {
            reason: e.to_string(),
        });
        return;
    }
    let graph = Arc::new(JobGraph::build(&plan, config.default_parallelism));
    let mut s = lock(state);
    let tiers = match place_on_cluster(&plan, &graph, config, &s.taskmanagers) {
        Ok(tiers) => tiers,
        Err(e) => {
            let _ = client.send(Message::JobRejected {
                reason: e.to_string(),
            });
            return;
        }
    };
    let needed = graph.slots_needed() as usize;
    let free = free_slots(&s.taskmanagers);
    let total: usize = s.taskmanagers.iter().map(|t| t.slots.len()).sum();
    if free.len() < needed {
        let _ = client.send(Message::JobRejected {
            reason: not_enough_slots(needed, free.len(), total, s.taskmanagers.len()),
        });
        return;
    }
    s.next_job = s.next_job.wrapping_add(1);
    let job = s.next_job;
    let name = plan.spec.name.clone();
    let checkpointing = match checkpointing::JobCheckpointing::new(config, &name, job) {
        Ok(c) => c,
        Err(e) => {
            let _ = client.send(Message::JobRejected {
                reason: e.to_string(),
            });
            return;
        }
    };
    // Once per job, before any task is deployed (see exec::sink::output).
    match prepare_sink_outputs(&plan.spec) {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(
                "job '{name}': removed {} part files of an earlier run",
                removed.len()
            );
        }
        Ok(_) => {}
        Err(e) => {
            let _ = client.send(Message::JobRejected {
                reason: e.to_string(),
            });
            return;
        }
    }
    let _ = client.send(Message::JobAccepted {
        job,
        name: name.clone(),
    });
    s.jobs.insert(
        job,
        JobEntry {
            name,
            placement: tiers,
            plan,
            graph,
            state: JobState::Running,
            reason: None,
            tasks: HashMap::new(),
            client,
            started: Instant::now(),
            text: text.to_owned(),
            path: path.to_owned(),
            default_parallelism: config.default_parallelism,
            attempt: 0,
            exec: job,
            checkpointing,
            restart: crate::cluster::restart::RestartStrategy::from_config(config),
            restarts: 0,
            last_failure: None,
            restart_at: None,
            draining: Vec::new(),
            draining_exec: None,
            draining_since: Instant::now(),
            final_pending: HashSet::new(),
        },
    );
    if let Err(e) = deploy_attempt(&mut s, job, None) {
        end_job(&mut s, job, JobState::Failed, Some(e));
    }
}

fn not_enough_slots(needed: usize, free: usize, total: usize, tms: usize) -> String {
    format!(
        "not enough free task slots: the job needs {needed} (its largest operator parallelism), \
         the cluster has {free} free of {total} on {tms} TaskManager(s); lower the parallelism or add \
         TaskManagers or taskmanager.numberOfTaskSlots"
    )
}

/// Deploys the job's current attempt on free slots, restoring `restore`.
/// Returns why it could not.
fn deploy_attempt(
    s: &mut State,
    job: u64,
    restore: Option<crate::cluster::rpc::RestoreDeployment>,
) -> Result<(), String> {
    let free = free_slots(&s.taskmanagers);
    let total: usize = s.taskmanagers.iter().map(|t| t.slots.len()).sum();
    let tm_count = s.taskmanagers.len();
    let Some(entry) = s.jobs.get_mut(&job) else {
        return Ok(());
    };
    let graph = Arc::clone(&entry.graph);
    let needed = graph.slots_needed() as usize;
    if free.len() < needed {
        return Err(not_enough_slots(needed, free.len(), total, tm_count));
    }
    let exec = entry.exec;
    let chosen = &free[..needed];
    let placement: Vec<(String, SocketAddr, usize)> = chosen
        .iter()
        .map(|&(tm, slot)| {
            (
                s.taskmanagers[tm].name.clone(),
                s.taskmanagers[tm].data_addr,
                slot,
            )
        })
        .collect();
    let mut per_tm: HashMap<String, Vec<TaskDeploymentDescriptor>> = HashMap::new();
    let mut tasks = HashMap::new();
    for v in &graph.vertices {
        for subtask in 0..v.parallelism {
            let mut tdd = descriptor(&graph, v.id, subtask, &placement);
            tdd.attempt = entry.attempt;
            tdd.gpu_operators = v
                .operators
                .iter()
                .copied()
                .filter(|&op| {
                    entry.placement.operators[op].tier == crate::kernels::backend::Tier::Gpu
                })
                .collect();
            let (tm, _, slot) = &placement[subtask as usize];
            tasks.insert(
                (v.id, subtask),
                TaskEntry {
                    taskmanager: tm.clone(),
                    slot: *slot,
                    state: ExecutionState::Created,
                    metrics: TaskSnapshot::default(),
                },
            );
            per_tm.entry(tm.clone()).or_default().push(tdd);
        }
    }
    let checkpoint_deployment = entry
        .checkpointing
        .as_mut()
        .map(|c| c.start_attempt(tasks.keys().copied(), restore, entry.started.elapsed()));
    entry.tasks = tasks;
    for &(tm, slot) in chosen {
        s.taskmanagers[tm].allocated[slot] = Some(job);
    }
    let entry = &s.jobs[&job];
    for (tm, tdds) in per_tm {
        if let Some(t) = s.taskmanagers.iter().find(|t| t.name == tm) {
            let _ = t.tx.send(Message::DeployTasks {
                job: exec,
                job_text: entry.text.clone(),
                job_path: entry.path.clone(),
                default_parallelism: entry.default_parallelism,
                tasks: tdds,
                checkpointing: checkpoint_deployment.clone(),
            });
        }
    }
    tracing::info!(
        "job {} ({job:016x}) deployed{}: {} tasks on {needed} slots",
        entry.name,
        match entry.attempt {
            0 => String::new(),
            n => format!(" (attempt {n})"),
        },
        entry.tasks.len()
    );
    Ok(())
}

/// Places the job's operators on the tiers the cluster offers: the GPU tier
/// exists when some TaskManager reported a GPU slot (priced with the
/// configured calibration, else the defaults). Placement is logged.
fn place_on_cluster(
    plan: &LogicalPlan,
    graph: &JobGraph,
    config: &Config,
    tms: &[TmEntry],
) -> Result<crate::placement::Placement, crate::placement::PlacementError> {
    use crate::placement::{PlacementInput, calibration, place};
    let gpu_slot = tms
        .iter()
        .flat_map(|t| t.slots.iter().map(move |slot| (t, slot)))
        .find_map(|(t, slot)| slot.profile.gpu.map(|(id, bytes)| (t, id, bytes)));
    let device = gpu_slot.map(|(t, id, bytes)| crate::kernels::gpu::GpuDevice {
        ordinal: id,
        name: format!("{} on {}", t.gpu, t.name),
        memory_bytes: bytes,
        compute_capability: (0, 0),
        simulated: false,
    });
    let mut calibration = calibration::load(None, &config.calibration_file, device.as_ref())?;
    if device.is_none() {
        // A calibration measured on a GPU node does not make these
        // TaskManagers GPU nodes.
        calibration.gpu = None;
    }
    let absent = "no TaskManager offers a GPU slot";
    let placement = place(&PlacementInput {
        plan,
        graph,
        calibration: &calibration,
        mode: config.placement_mode,
        gpu_absent_reason: absent,
    })?;
    for op in &placement.operators {
        tracing::info!(
            "placement: {} ({}) on {}: {}",
            op.name,
            op.kind,
            op.tier,
            op.reason
        );
    }
    Ok(placement)
}

/// Free slots, interleaved across TaskManagers so a job spreads evenly
/// (Flink's `taskmanager.load-balance.mode: SLOTS`).
fn free_slots(tms: &[TmEntry]) -> Vec<(usize, usize)> {
    let max = tms.iter().map(|t| t.allocated.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for slot in 0..max {
        for (tm, t) in tms.iter().enumerate() {
            if t.allocated.get(slot) == Some(&None) {
                out.push((tm, slot));
            }
        }
    }
    out
}

fn descriptor(
    graph: &JobGraph,
    vertex: usize,
    subtask: u32,
    placement: &[(String, SocketAddr, usize)],
) -> TaskDeploymentDescriptor {
    let v = &graph.vertices[vertex];
    let location = |subtask: u32, index: u32| {
        let (tm, addr, _) = &placement[subtask as usize];
        ChannelLocation {
            subtask,
            taskmanager: tm.clone(),
            data_addr: *addr,
            index,
        }
    };
    let inputs = v
        .inputs
        .iter()
        .map(|&e| {
            let edge = &graph.edges[e];
            let source_par = graph.vertices[edge.source].parallelism;
            let channels = edge
                .sources_of(subtask, source_par)
                .into_iter()
                .map(|p| {
                    let sub = edge
                        .targets_of(p, v.parallelism)
                        .iter()
                        .position(|&t| t == subtask)
                        .unwrap_or(0) as u32;
                    location(p, sub)
                })
                .collect();
            InputGateDeployment {
                edge: e as u32,
                channels,
            }
        })
        .collect();
    let outputs = v
        .outputs
        .iter()
        .map(|&e| {
            let edge = &graph.edges[e];
            let target_par = graph.vertices[edge.target].parallelism;
            let targets = edge
                .targets_of(subtask, target_par)
                .into_iter()
                .map(|c| {
                    let channel = edge
                        .sources_of(c, v.parallelism)
                        .iter()
                        .position(|&s| s == subtask)
                        .unwrap_or(0) as u32;
                    location(c, channel)
                })
                .collect();
            OutputDeployment {
                edge: e as u32,
                partitioner: edge.partitioner.clone(),
                targets,
            }
        })
        .collect();
    TaskDeploymentDescriptor {
        vertex,
        subtask,
        parallelism: v.parallelism,
        slot: placement[subtask as usize].2,
        attempt: 0,
        inputs,
        outputs,
        gpu_operators: Vec::new(),
    }
}

fn on_task_status(
    state: &Arc<Mutex<State>>,
    exec: u64,
    vertex: usize,
    subtask: u32,
    next: ExecutionState,
    error: Option<String>,
    metrics: Option<TaskSnapshot>,
) {
    let mut s = lock(state);
    let Some(job) = job_of_exec(&s, exec) else {
        return;
    };
    let entry = s.jobs.get_mut(&job).expect("job of exec");
    if entry.exec != exec {
        // A task of a failed attempt: the restart waits for it to end.
        if next.is_terminal() {
            entry
                .draining
                .retain(|(_, v, st)| (*v, *st) != (vertex, subtask));
        }
        return;
    }
    let Some(task) = entry.tasks.get_mut(&(vertex, subtask)) else {
        return;
    };
    if let Some(m) = metrics {
        task.metrics = m;
    }
    if task.state == next || !task.state.can_become(next) {
        // Periodic metric reports repeat RUNNING, and may trail the end.
        return;
    }
    task.state = next;
    if entry.state != JobState::Running || entry.restart_at.is_some() {
        return;
    }
    match next {
        ExecutionState::Failed => {
            let reason = error.unwrap_or_else(|| format!("task {vertex}/{subtask} failed"));
            checkpointing::fail_or_restart(&mut s, job, reason);
        }
        ExecutionState::Finished => {
            checkpointing::on_task_finished(&mut s, job, (vertex, subtask));
            let entry = &s.jobs[&job];
            if entry
                .tasks
                .values()
                .all(|t| t.state == ExecutionState::Finished)
            {
                end_job(&mut s, job, JobState::Finished, None);
            } else {
                checkpointing::commit_final_if_ready(&mut s, job);
            }
        }
        _ => {}
    }
}

/// The job whose current or draining attempt is `exec`.
fn job_of_exec(s: &State, exec: u64) -> Option<u64> {
    s.jobs
        .iter()
        .find(|(_, e)| e.exec == exec || e.draining_exec == Some(exec))
        .map(|(&job, _)| job)
}

/// Ends a job: cancels what still runs, frees its slots and reports to the
/// client.
fn end_job(s: &mut State, job: u64, final_state: JobState, reason: Option<String>) {
    let Some(entry) = s.jobs.get_mut(&job) else {
        return;
    };
    if entry.state != JobState::Running {
        return;
    }
    entry.state = final_state;
    entry.reason = reason.clone();
    let exec = entry.exec;
    if final_state != JobState::Finished {
        let why = reason.clone().unwrap_or_default();
        tracing::warn!("job {} ({job:016x}) {final_state:?}: {why}", entry.name);
        for tm in &s.taskmanagers {
            let _ = tm.tx.send(Message::CancelJob {
                job: exec,
                reason: why.clone(),
            });
        }
    } else {
        tracing::info!("job {} ({job:016x}) finished", entry.name);
        for tm in &s.taskmanagers {
            let _ = tm.tx.send(Message::ReleaseJob { job: exec });
        }
    }
    if let Some(c) = &entry.checkpointing {
        c.job_ended(final_state);
    }
    for tm in &mut s.taskmanagers {
        for a in &mut tm.allocated {
            if *a == Some(job) {
                *a = None;
            }
        }
    }
    if let Some(entry) = s.jobs.remove(&job) {
        let summary = summarize(job, &entry, &s.taskmanagers);
        if s.completed.len() == COMPLETED_JOBS_MAX {
            s.completed.pop_front();
        }
        s.completed.push_back(summary.clone());
        let _ = entry.client.send(Message::JobFinished {
            summary: Box::new(summary),
        });
    }
}

fn snapshot(s: &State) -> ClusterSnapshot {
    let mut running: Vec<JobSummary> = s
        .jobs
        .iter()
        .map(|(&job, entry)| summarize(job, entry, &s.taskmanagers))
        .collect();
    running.sort_by_key(|j| j.job);
    ClusterSnapshot {
        taskmanagers: s
            .taskmanagers
            .iter()
            .map(|t| TaskManagerInfo {
                id: t.name.clone(),
                data_addr: t.data_addr,
                slots: t.slots.clone(),
                allocated: t.allocated.clone(),
                last_heartbeat_ms: t.last_heartbeat.elapsed().as_millis() as u64,
                io: t.io.clone(),
                transport: t.transport.clone(),
                gpu: t.gpu.clone(),
            })
            .collect(),
        running,
        completed: s.completed.iter().cloned().collect(),
    }
}

fn summarize(job: u64, entry: &JobEntry, tms: &[TmEntry]) -> JobSummary {
    let taskmanagers = tms.len();
    let slots = tms.iter().map(|t| t.slots.len()).sum();
    let mut io: Vec<String> = tms
        .iter()
        .filter(|t| entry.tasks.values().any(|task| task.taskmanager == t.name))
        .map(|t| t.io.clone())
        .collect();
    io.sort();
    io.dedup();
    let mut transports: Vec<String> = tms
        .iter()
        .filter(|t| entry.tasks.values().any(|task| task.taskmanager == t.name))
        .map(|t| t.transport.clone())
        .collect();
    transports.sort();
    transports.dedup();
    let plan = &entry.plan;
    let graph = &entry.graph;
    let ops = &plan.spec.operators;
    let mut rows_in_by_op = vec![0u64; ops.len()];
    let mut rows_out_by_op = vec![0u64; ops.len()];
    let mut summary = JobSummary {
        job,
        name: entry.name.clone(),
        state: entry.state,
        reason: entry.reason.clone(),
        wall_ms: entry.started.elapsed().as_millis() as u64,
        rows_in: 0,
        rows_out: 0,
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
        taskmanagers,
        slots,
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
        gpu: {
            let mut gpu: Vec<String> = tms.iter().map(|t| t.gpu.clone()).collect();
            gpu.sort();
            gpu.dedup();
            gpu
        },
    };
    let mut task_keys: Vec<_> = entry.tasks.keys().copied().collect();
    task_keys.sort_unstable();
    summary.tasks = task_keys
        .iter()
        .filter_map(|key| entry.tasks.get(key).map(|t| (key, t)))
        .map(|(&(vertex, subtask), t)| TaskNetworkMetrics {
            vertex,
            subtask,
            taskmanager: t.taskmanager.clone(),
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
            rows_in_by_op[o.operator] += o.rows_in;
            rows_out_by_op[o.operator] += o.rows_out;
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
        let offload = &mut summary.gpu_offload;
        offload.gpu_batches += m.gpu.gpu_batches;
        offload.oom_splits += m.gpu.oom_splits;
        offload.cpu_fallback_batches += m.gpu.cpu_fallback_batches;
        offload.cpu_fallback_rows += m.gpu.cpu_fallback_rows;
        summary.spill_bytes_written += m.spill_bytes_written;
        summary.spill_bytes_read += m.spill_bytes_read;
        summary.spill_file_count += m.spill_file_count;
    }
    for (i, op) in ops.iter().enumerate() {
        if op.input.is_none() {
            summary.rows_in += rows_out_by_op[i];
        }
        if op.kind.is_sink() {
            summary.rows_out += rows_in_by_op[i];
        }
    }
    for v in &graph.vertices {
        let mut placement: Vec<(u32, String)> = entry
            .tasks
            .iter()
            .filter(|((vertex, _), _)| *vertex == v.id)
            .map(|((_, s), t)| (*s, format!("{}/slot{}", t.taskmanager, t.slot)))
            .collect();
        placement.sort();
        summary.vertices.push(VertexSummary {
            name: graph.vertex_name(plan, v.id),
            parallelism: v.parallelism,
            placement: placement.into_iter().map(|(_, p)| p).collect(),
            input_partitioner: v
                .inputs
                .first()
                .map(|&e| graph.edges[e].partitioner.name().to_owned()),
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

/// Declares TaskManagers lost after `heartbeat.timeout` and sends progress.
async fn monitor_loop(state: Arc<Mutex<State>>, config: Arc<Config>) {
    let tick = Duration::from_millis(250);
    loop {
        tokio::time::sleep(tick).await;
        let mut s = lock(&state);
        let timeout = config.heartbeat_timeout;
        let lost: Vec<(String, SocketAddr, Duration)> = s
            .taskmanagers
            .iter()
            .filter(|t| t.last_heartbeat.elapsed() > timeout)
            .map(|t| (t.name.clone(), t.data_addr, t.last_heartbeat.elapsed()))
            .collect();
        for (name, addr, silent) in lost {
            s.taskmanagers.retain(|t| t.name != name);
            let reason = format!(
                "TaskManager {name} (data port {addr}) lost: no heartbeat for {:.1} s (heartbeat.timeout = {:.1} s)",
                silent.as_secs_f64(),
                timeout.as_secs_f64()
            );
            tracing::warn!("{reason}");
            let affected: Vec<u64> = s
                .jobs
                .iter()
                .filter(|(_, j)| j.tasks.values().any(|t| t.taskmanager == name))
                .map(|(id, _)| *id)
                .collect();
            for job in affected {
                checkpointing::fail_or_restart(&mut s, job, reason.clone());
            }
            // Tasks of failed attempts on the lost TaskManager end with it.
            for entry in s.jobs.values_mut() {
                entry.draining.retain(|(tm, _, _)| *tm != name);
            }
        }
        checkpointing::tick(&mut s, &config);
        for (&job, entry) in &s.jobs {
            let mut rows_in = 0;
            let mut expected = 0;
            for t in entry.tasks.values() {
                expected += t.metrics.source_rows_expected;
                for o in &t.metrics.operators {
                    if entry.plan.spec.operators[o.operator].input.is_none() {
                        rows_in += o.rows_out;
                    }
                }
            }
            let _ = entry.client.send(Message::JobProgress {
                job,
                rows_in,
                rows_expected: expected,
                tasks_running: entry
                    .tasks
                    .values()
                    .filter(|t| t.state == ExecutionState::Running)
                    .count(),
                tasks_total: entry.tasks.len(),
            });
        }
    }
}
