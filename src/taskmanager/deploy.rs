//! Deploying a job's tasks on this TaskManager: gates and partitions first
//! (so local producers find their consumers), then remote partition
//! requests, then one thread per task.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::mpsc::UnboundedSender;

use super::slots::SlotError;
pub(super) use super::slots::TaskKey;
use super::{JobTasks, Services, lock};
use std::sync::mpsc::Receiver;

use crate::checkpoint::state::TaskState;
use crate::checkpoint::storage::CheckpointStorage;
use crate::exec::ExecError;
use crate::exec::build::{BuildContext, GpuContext, build_source};
use crate::exec::task::{Chain, Task, TaskInput};
use crate::exec::task::{CheckpointContext, Snapshot, TaskControl};
use crate::job::graph::JobGraph;
use crate::job::{LogicalPlan, parse_job, plan};
use crate::kernels::backend::TieredKernels;
use crate::metrics::{OperatorMetrics, TaskMetrics};
use crate::network::gate::{ChannelKind, GateBuffers, GateDemand};
use crate::network::ipc::ChannelEncoder;
use crate::network::partition::{Target, WriterMetrics};
use crate::network::taskread::{self, GateLink, TaskReadInput};
use crate::network::{
    GateId, InputGate, InputReader, NetworkError, PAYLOAD_HEADROOM, PartitionId, RecordWriter,
    ResultPartition, Subpartition,
};
use crate::protocol::deployment::descriptor;
use crate::protocol::{
    CheckpointDeployment, CheckpointId, ExecutionId, ExecutionState, Message, SubtaskLocation,
    TaskDeploymentDescriptor,
};

struct Prepared {
    tdd: TaskDeploymentDescriptor,
    gates: Vec<Arc<InputGate>>,
    writers: Vec<RecordWriter>,
    writer_metrics: Vec<Arc<WriterMetrics>>,
    /// The remote queues of the task's outputs (outPoolUsage).
    subpartitions: Vec<Arc<Subpartition>>,
}

fn status(
    out: &UnboundedSender<Message>,
    job: u64,
    task: TaskKey,
    state: ExecutionState,
    error: Option<String>,
    metrics: Option<&TaskMetrics>,
) {
    let _ = out.send(Message::TaskStatus {
        execution: ExecutionId(job),
        vertex: task.vertex,
        subtask: task.subtask,
        state,
        error,
        metrics: metrics.map(TaskMetrics::snapshot),
    });
}

fn fail_all(out: &UnboundedSender<Message>, job: u64, tasks: &[TaskKey], error: &str) {
    for &task in tasks {
        status(
            out,
            job,
            task,
            ExecutionState::Failed,
            Some(error.to_owned()),
            None,
        );
    }
}

/// What a `DeployTasks` message says about the job as a whole.
pub(super) struct Deployment {
    /// The execution id, by which this TaskManager knows the job.
    pub job: u64,
    pub attempt: u32,
    pub job_text: String,
    pub job_path: String,
    pub default_parallelism: u32,
    /// Where each subtask index runs.
    pub placement: Vec<SubtaskLocation>,
    /// Per vertex, its operators on the GPU.
    pub gpu_operators: Vec<Vec<usize>>,
    pub checkpointing: Option<CheckpointDeployment>,
}

fn task_key(tdd: &TaskDeploymentDescriptor) -> TaskKey {
    TaskKey {
        vertex: tdd.vertex,
        subtask: tdd.subtask,
    }
}

/// Why a deployment stopped before all its tasks ran.
#[derive(Debug, thiserror::Error)]
enum DeployError {
    #[error("job {job:016x} is already deployed on this TaskManager")]
    Duplicate { job: u64 },
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("{0}")]
    Job(#[from] crate::job::JobError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("cannot start the thread of task {task}: {source}")]
    Spawn {
        task: String,
        #[source]
        source: std::io::Error,
    },
    #[error("canceled while deploying")]
    Canceled,
    #[error("the deployment does not fit the job: {detail}")]
    Descriptor { detail: String },
}

/// This TaskManager's task descriptors, expanded from the compact
/// deployment; a deployment that does not fit the job graph is refused.
fn expand(
    graph: &JobGraph,
    keys: &[TaskKey],
    attempt: u32,
    placement: &[SubtaskLocation],
    gpu_operators: &[Vec<usize>],
) -> Result<Vec<TaskDeploymentDescriptor>, String> {
    let slots_needed = graph.slots_needed() as usize;
    if placement.len() < slots_needed {
        return Err(format!(
            "it places {} subtask indices, the job graph needs {slots_needed}",
            placement.len()
        ));
    }
    keys.iter()
        .map(|&TaskKey { vertex, subtask }| {
            let v = graph
                .vertices
                .get(vertex)
                .ok_or_else(|| format!("it names vertex {vertex}, which the job graph lacks"))?;
            if subtask >= v.parallelism {
                return Err(format!(
                    "it names subtask {subtask} of vertex {vertex}, whose parallelism is {}",
                    v.parallelism
                ));
            }
            let mut tdd = descriptor(graph, vertex, subtask, attempt, placement);
            tdd.gpu_operators = gpu_operators.get(vertex).cloned().unwrap_or_default();
            Ok(tdd)
        })
        .collect()
}

/// The first, synchronous step of a deployment, taken by the session in the
/// order of the JobManager's messages (so a `CancelJob` that follows finds
/// it): reports the tasks deploying, allocates their slots all or nothing,
/// and registers the execution with its cancel flag. Returns the flag, or
/// `None` when the tasks were refused (and reported failed).
pub(super) fn begin(
    services: &Services,
    job: u64,
    tasks: &[TaskKey],
    placement: &[SubtaskLocation],
    out: &UnboundedSender<Message>,
) -> Option<Arc<AtomicBool>> {
    for &task in tasks {
        status(out, job, task, ExecutionState::Deploying, None, None);
    }
    let Some(placements) = tasks
        .iter()
        .map(|t| Some((placement.get(t.subtask as usize)?.slot, *t)))
        .collect::<Option<Vec<(usize, TaskKey)>>>()
    else {
        let e = format!(
            "the deployment places {} subtask indices, fewer than its tasks need",
            placement.len()
        );
        fail_all(out, job, tasks, &e);
        return None;
    };
    let canceled = Arc::new(AtomicBool::new(false));
    // The only place that holds both locks, always jobs before slots: the
    // duplicate check and the allocation are one step.
    let refused = {
        let mut jobs = lock(&services.jobs);
        match jobs.entry(job) {
            std::collections::hash_map::Entry::Occupied(_) => Some(DeployError::Duplicate { job }),
            std::collections::hash_map::Entry::Vacant(vacant) => {
                match lock(&services.slots).allocate(job, &placements) {
                    Ok(()) => {
                        vacant.insert(JobTasks {
                            canceled: Arc::clone(&canceled),
                            running: 0,
                            deploying: true,
                            tasks: Vec::new(),
                            controls: Vec::new(),
                        });
                        None
                    }
                    Err(e) => Some(DeployError::Slot(e)),
                }
            }
        }
    };
    match refused {
        None => Some(canceled),
        Some(e) => {
            tracing::warn!("refusing to deploy job {job:016x}: {e}");
            fail_all(out, job, tasks, &e.to_string());
            None
        }
    }
}

/// The rest of a deployment that [`begin`] accepted: parses the job,
/// prepares gates and partitions, and starts one thread per task. It is a
/// transaction: whatever fails (or a cancel that comes meanwhile) releases
/// every slot it took, unregisters its gates and partitions, and reports its
/// tasks that did not start, with the cause.
pub(super) async fn deploy(
    services: Arc<Services>,
    deployment: Deployment,
    tasks: Vec<TaskKey>,
    canceled: Arc<AtomicBool>,
    out: UnboundedSender<Message>,
) {
    let job = deployment.job;
    let mut unstarted = tasks;
    if let Err(e) = run_deployment(&services, deployment, &mut unstarted, &canceled, &out).await {
        let state = match e {
            DeployError::Canceled => ExecutionState::Canceled,
            _ => ExecutionState::Failed,
        };
        abort(&services, job, &unstarted, &e.to_string(), state, &out);
    }
}

/// Rolls a deployment back: cancels the tasks it started, unregisters its
/// gates and partitions, releases its slots (those of started tasks free
/// themselves when the tasks end) and reports `tasks` in `state`.
pub(super) fn abort(
    services: &Services,
    job: u64,
    tasks: &[TaskKey],
    cause: &str,
    state: ExecutionState,
    out: &UnboundedSender<Message>,
) {
    if state == ExecutionState::Failed {
        tracing::warn!("deployment of job {job:016x} failed: {cause}");
    } else {
        tracing::info!("deployment of job {job:016x} stopped: {cause}");
    }
    {
        let mut jobs = lock(&services.jobs);
        if let Some(t) = jobs.get_mut(&job) {
            t.canceled.store(true, Ordering::Relaxed);
            t.deploying = false;
            if t.running == 0 {
                jobs.remove(&job);
            }
        }
    }
    services.registry.release_job(job, cause);
    {
        let mut slots = lock(&services.slots);
        let released = slots.release(job);
        tracing::debug!("job {job:016x}: {released:?}");
        let _ = out.send(Message::Heartbeat {
            slots: slots.report(),
            usage: None,
        });
    }
    for &task in tasks {
        let error = (state == ExecutionState::Failed).then(|| cause.to_owned());
        status(out, job, task, state, error, None);
    }
    services.task_ended.notify_waiters();
}

/// Parses, prepares and starts the tasks; `unstarted` keeps those that
/// have not started, for the rollback.
async fn run_deployment(
    services: &Arc<Services>,
    deployment: Deployment,
    unstarted: &mut Vec<TaskKey>,
    canceled: &Arc<AtomicBool>,
    out: &UnboundedSender<Message>,
) -> Result<(), DeployError> {
    let Deployment {
        job,
        attempt,
        job_text,
        job_path,
        default_parallelism,
        placement,
        gpu_operators,
        checkpointing,
    } = deployment;
    let checkpointing = checkpointing.map(Arc::new);
    let plan = Arc::new(parse_job(&job_text, Path::new(&job_path)).and_then(plan)?);
    let graph = Arc::new(JobGraph::build(&plan, default_parallelism));
    let tasks = expand(&graph, unstarted, attempt, &placement, &gpu_operators)
        .map_err(|detail| DeployError::Descriptor { detail })?;
    let max_parallelism =
        crate::protocol::deployment::max_parallelism(services.config.max_parallelism, &graph);
    let prepared = prepare(services, job, tasks, canceled, max_parallelism).await?;
    // A cancel or a fence that came while preparing released the slots and
    // the registrations made so far; those made after it are released by
    // the rollback.
    if canceled.load(Ordering::Relaxed) {
        return Err(DeployError::Canceled);
    }
    let mut receivers = Vec::new();
    {
        let mut jobs = lock(&services.jobs);
        let entry = jobs.get_mut(&job).ok_or(DeployError::Canceled)?;
        for p in &prepared {
            if checkpointing.is_some() {
                let (sender, receiver) = std::sync::mpsc::sync_channel(super::TASK_CONTROL_MAX);
                entry.controls.push(super::TaskControlHandle {
                    vertex: p.tdd.vertex,
                    subtask: p.tdd.subtask,
                    sender,
                });
                receivers.push(Some(receiver));
            } else {
                receivers.push(None);
            }
        }
    }
    let printed = Arc::new(AtomicU64::new(0));
    for (p, control) in prepared.into_iter().zip(receivers) {
        let name = format!(
            "{} ({}/{})",
            graph.vertex_name(&plan, p.tdd.vertex),
            p.tdd.subtask + 1,
            p.tdd.parallelism
        );
        // The slot table hears of the start before the thread exists, so a
        // thread that ends at once finds its task there. A task whose
        // execution was released meanwhile (cancel, fence) does not start.
        let key = task_key(&p.tdd);
        if lock(&services.slots)
            .task_started(job, p.tdd.slot, key)
            .is_err()
        {
            return Err(DeployError::Canceled);
        }
        if let Some(t) = lock(&services.jobs).get_mut(&job) {
            t.running += 1;
        }
        let task = TaskThread {
            services: Arc::clone(services),
            job,
            plan: Arc::clone(&plan),
            graph: Arc::clone(&graph),
            name: name.clone(),
            canceled: Arc::clone(canceled),
            printed: Arc::clone(&printed),
            out: out.clone(),
            checkpoints: control.zip(checkpointing.clone()),
        };
        let slot = p.tdd.slot;
        let spawned = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || task.run(p));
        if let Err(source) = spawned {
            // The closure, and with it the task, was dropped unrun.
            if let Some(t) = lock(&services.jobs).get_mut(&job) {
                t.running -= 1;
            }
            if let Err(e) = lock(&services.slots).task_ended(job, slot, key) {
                tracing::debug!("job {job:016x}: {e}");
            }
            return Err(DeployError::Spawn { task: name, source });
        }
        unstarted.retain(|t| *t != key);
    }
    let mut jobs = lock(&services.jobs);
    if let Some(t) = jobs.get_mut(&job) {
        t.deploying = false;
        if t.running == 0 {
            jobs.remove(&job);
        }
    }
    tracing::info!("job {job:016x}: every task deployed here started");
    Ok(())
}

/// Creates and registers gates and partitions, builds writers, and
/// requests remote partitions.
async fn prepare(
    services: &Arc<Services>,
    job: u64,
    tasks: Vec<TaskDeploymentDescriptor>,
    canceled: &Arc<AtomicBool>,
    max_parallelism: u32,
) -> Result<Vec<Prepared>, NetworkError> {
    let config = &services.config;
    let me = services.name();
    let segment = config.segment_size_bytes as usize;
    let buffers = GateBuffers::from(config);
    // The whole deployment's segments are checked before any gate takes its
    // own, so that a shortfall names the total to raise the memory to.
    let demand = tasks
        .iter()
        .flat_map(|tdd| &tdd.inputs)
        .map(|input| {
            let kinds: Vec<ChannelKind> = input
                .channels
                .iter()
                .map(|c| match c.taskmanager == me {
                    true => ChannelKind::Local,
                    false => ChannelKind::Remote,
                })
                .collect();
            GateDemand::of(&kinds, buffers)
        })
        .fold(GateDemand::default(), GateDemand::plus);
    demand.check_fits(
        format!("job {job:016x} on TaskManager {me}"),
        buffers,
        &services.netpool,
    )?;
    let mut all_gates = Vec::new();
    for tdd in &tasks {
        let mut gates = Vec::new();
        for input in &tdd.inputs {
            let kinds: Vec<ChannelKind> = input
                .channels
                .iter()
                .map(|c| {
                    if c.taskmanager == me {
                        ChannelKind::Local
                    } else {
                        ChannelKind::Remote
                    }
                })
                .collect();
            let id = GateId {
                job,
                edge: input.edge,
                target_subtask: tdd.subtask,
            };
            let gate = InputGate::new(id, &kinds, buffers, &services.netpool)?;
            services.registry.register_gate(Arc::clone(&gate));
            gates.push(gate);
        }
        all_gates.push(gates);
    }
    let mut partitions = Vec::new();
    for tdd in &tasks {
        let mut parts = Vec::new();
        for output in &tdd.outputs {
            let subpartitions = output
                .targets
                .iter()
                .map(|t| {
                    (t.taskmanager != me).then(|| {
                        let sub = Subpartition::new(buffers.max_per_channel);
                        sub.set_checksum(config.network_checksum);
                        sub
                    })
                })
                .collect();
            let partition = Arc::new(ResultPartition {
                id: PartitionId {
                    job,
                    edge: output.edge,
                    source_subtask: tdd.subtask,
                },
                subpartitions,
            });
            services.registry.register_partition(Arc::clone(&partition));
            parts.push(partition);
        }
        partitions.push(parts);
    }
    let cancel_flag = Arc::clone(canceled);
    let is_canceled: Arc<dyn Fn() -> bool + Send + Sync> =
        Arc::new(move || cancel_flag.load(Ordering::Relaxed));
    let mut prepared = Vec::new();
    for ((tdd, gates), parts) in tasks.into_iter().zip(all_gates).zip(partitions) {
        let mut writers = Vec::new();
        let mut writer_metrics = Vec::new();
        for (output, partition) in tdd.outputs.iter().zip(&parts) {
            let targets =
                output
                    .targets
                    .iter()
                    .zip(&partition.subpartitions)
                    .map(|(t, sub)| match sub {
                        Some(sub) => {
                            let mut encoder = ChannelEncoder::new(segment - PAYLOAD_HEADROOM);
                            if config.compression_enabled {
                                encoder
                                    .enable_lz4()
                                    .map_err(|e| NetworkError::Encode(e.to_string()))?;
                            }
                            Ok(Target::Remote {
                                sub: Arc::clone(sub),
                                encoder: Box::new(encoder),
                            })
                        }
                        None => {
                            let id = GateId {
                                job,
                                edge: output.edge,
                                target_subtask: t.subtask,
                            };
                            let gate = services.registry.gate(&id).ok_or_else(|| {
                                NetworkError::Channel {
                                    gate: id,
                                    channel: t.index as usize,
                                    detail:
                                        "local consumer gate is not deployed on this TaskManager"
                                            .into(),
                                }
                            })?;
                            Ok(Target::Local {
                                gate,
                                channel: t.index as usize,
                            })
                        }
                    })
                    .collect::<Result<Vec<_>, NetworkError>>()?;
            let metrics = Arc::new(WriterMetrics::default());
            writers.push(RecordWriter::new(
                output.partitioner.clone(),
                targets,
                max_parallelism,
                Arc::clone(&services.netpool),
                Arc::clone(&is_canceled),
                Arc::clone(&metrics),
            ));
            writer_metrics.push(metrics);
        }
        // Task-read input: each gate its own connection per producer
        // TaskManager, read by the task's thread (TCP only: verbs buffers
        // arrive through the shared connection's queue pair).
        let task_reads = config.tcp_task_reads && !services.connections.uses_verbs();
        for (input, gate) in tdd.inputs.iter().zip(&gates) {
            let mut links: Vec<(std::net::SocketAddr, Arc<GateLink>)> = Vec::new();
            for (channel, c) in input.channels.iter().enumerate() {
                if c.taskmanager == me {
                    continue;
                }
                let partition = PartitionId {
                    job,
                    edge: input.edge,
                    source_subtask: c.subtask,
                };
                if !task_reads {
                    let conn = services
                        .connections
                        .connect(c.data_addr, &c.taskmanager.to_string(), segment)
                        .await?;
                    conn.request_partition(gate, channel, partition, c.index)?;
                    continue;
                }
                let link = match links.iter().find(|(addr, _)| *addr == c.data_addr) {
                    Some((_, link)) => Arc::clone(link),
                    None => {
                        let link = taskread::connect(
                            c.data_addr,
                            &c.taskmanager.to_string(),
                            services.connections.auth(),
                        )
                        .await?;
                        links.push((c.data_addr, Arc::clone(&link)));
                        link
                    }
                };
                link.request_partition(gate, channel, partition, c.index)?;
            }
            if !links.is_empty() {
                let links = links.into_iter().map(|(_, link)| link).collect();
                let input =
                    TaskReadInput::new(links, segment).map_err(|e| NetworkError::Channel {
                        gate: gate.id,
                        channel: 0,
                        detail: format!("cannot poll the gate's connections: {e}"),
                    })?;
                gate.set_driver(input);
            }
        }
        let subpartitions = parts
            .iter()
            .flat_map(|p| p.subpartitions.iter().flatten().cloned())
            .collect();
        prepared.push(Prepared {
            tdd,
            gates,
            writers,
            writer_metrics,
            subpartitions,
        });
    }
    Ok(prepared)
}

/// Everything a task's thread needs besides its prepared gates and writers.
struct TaskThread {
    services: Arc<Services>,
    job: u64,
    plan: Arc<LogicalPlan>,
    graph: Arc<JobGraph>,
    name: String,
    canceled: Arc<AtomicBool>,
    printed: Arc<AtomicU64>,
    out: UnboundedSender<Message>,
    checkpoints: Option<(Receiver<TaskControl>, Arc<CheckpointDeployment>)>,
}

impl TaskThread {
    fn run(self, p: Prepared) {
        let TaskThread {
            services,
            job,
            plan,
            graph,
            name,
            canceled,
            printed,
            out,
            checkpoints,
        } = self;
        run_task(
            &services,
            job,
            &plan,
            &graph,
            p,
            name,
            canceled,
            printed,
            out,
            checkpoints,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn run_task(
    services: &Arc<Services>,
    job: u64,
    plan: &LogicalPlan,
    graph: &JobGraph,
    p: Prepared,
    name: String,
    canceled: Arc<AtomicBool>,
    printed: Arc<AtomicU64>,
    out: UnboundedSender<Message>,
    checkpoints: Option<(Receiver<TaskControl>, Arc<CheckpointDeployment>)>,
) {
    let tdd = p.tdd.clone();
    status(
        &out,
        job,
        task_key(&tdd),
        ExecutionState::Initializing,
        None,
        None,
    );
    let vertex = &graph.vertices[tdd.vertex];
    let operator_metrics: Vec<(usize, Arc<OperatorMetrics>)> = vertex
        .operators
        .iter()
        .map(|&op| (op, Arc::new(OperatorMetrics::default())))
        .collect();
    let metrics = Arc::new(TaskMetrics {
        operators: operator_metrics.clone(),
        writers: p.writer_metrics.clone(),
        gates: p.gates.clone(),
        subpartitions: p.subpartitions.clone(),
        ..TaskMetrics::default()
    });
    let memory = services.slot_memory[tdd.slot].clone();
    // A panic is a bug, but it must fail the task, not leave the job hanging.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        build_and_run(
            plan,
            vertex,
            &tdd,
            p,
            &name,
            memory.clone(),
            &canceled,
            printed,
            &metrics,
            &operator_metrics,
            services,
            job,
            &out,
            checkpoints,
        )
    }))
    .unwrap_or_else(|panic| {
        Err(ExecError::State {
            operator: name.clone(),
            detail: format!("internal error (panic): {}", super::panic_message(&*panic)),
        })
    });
    metrics
        .managed_peak_bytes
        .store(memory.peak_bytes(), Ordering::Relaxed);
    let (state, error) = match result {
        Ok(()) => (ExecutionState::Finished, None),
        Err(ExecError::Canceled) | Err(ExecError::Network(NetworkError::Canceled)) => {
            (ExecutionState::Canceled, None)
        }
        Err(ExecError::Network(NetworkError::ConsumerGone)) => (ExecutionState::Canceled, None),
        Err(e) if canceled.load(Ordering::Relaxed) => {
            tracing::debug!("task {name} ended after cancel: {e}");
            (ExecutionState::Canceled, None)
        }
        Err(e) => {
            tracing::warn!("task {name} failed: {e}");
            (
                ExecutionState::Failed,
                Some(format!("task {name} on {} failed: {e}", services.name())),
            )
        }
    };
    // Free the slot before reporting the end: the JobManager may redeploy
    // onto it as soon as it hears of it (a restart after a failure). The
    // slot stays held while other tasks deployed on it have not ended.
    {
        // The slot report goes out before the task's end, under the slot
        // table's lock (reports leave in the order the table changed): the
        // JobManager schedules onto a slot only once its TaskManager reports
        // it free, and a restart waits for the failed tasks' ends.
        let mut slots = lock(&services.slots);
        match slots.task_ended(job, tdd.slot, task_key(&tdd)) {
            // Reported only when the slot changed: at parallelism 1000 a
            // report per task end would be quadratic.
            Ok(true) => {
                let _ = out.send(Message::Heartbeat {
                    slots: slots.report(),
                    usage: None,
                });
            }
            Ok(false) => {}
            // The execution was released and its slot fenced meanwhile.
            Err(e) => tracing::debug!("task {name} ended: {e}"),
        }
    }
    status(&out, job, task_key(&tdd), state, error, Some(&metrics));
    {
        let mut jobs = lock(&services.jobs);
        let done = jobs.get_mut(&job).is_some_and(|t| {
            t.tasks
                .retain(|(v, s, _)| !(*v == tdd.vertex && *s == tdd.subtask));
            t.running -= 1;
            t.running == 0 && !t.deploying
        });
        if done {
            // The job's result partitions stay registered: remote consumers
            // may still be draining them. The JobManager releases them when
            // the job ends cluster-wide (ReleaseJob or CancelJob).
            jobs.remove(&job);
        }
    }
    services.task_ended.notify_waiters();
}

#[allow(clippy::too_many_arguments)]
fn build_and_run(
    plan: &LogicalPlan,
    vertex: &crate::job::graph::JobVertex,
    tdd: &TaskDeploymentDescriptor,
    p: Prepared,
    name: &str,
    memory: crate::memory::MemoryManager,
    canceled: &Arc<AtomicBool>,
    printed: Arc<AtomicU64>,
    metrics: &Arc<TaskMetrics>,
    operator_metrics: &[(usize, Arc<OperatorMetrics>)],
    services: &Arc<Services>,
    job: u64,
    out: &UnboundedSender<Message>,
    checkpoints: Option<(Receiver<TaskControl>, Arc<CheckpointDeployment>)>,
) -> Result<(), ExecError> {
    let gpu = match services.gpu_kernels.get(tdd.slot) {
        Some(Some(slot)) if !tdd.gpu_operators.is_empty() => Some(GpuContext {
            kernels: Arc::new(TieredKernels::on_slot(
                Arc::clone(slot),
                Arc::clone(&metrics.gpu),
            )),
            operators: tdd.gpu_operators.clone(),
            coalesce: crate::exec::gpu_chain::CoalescePolicy::from_config(&services.config),
            route: match p.writers.as_slice() {
                [writer] => writer
                    .hash_route()
                    .and_then(|(key_columns, max_parallelism, n)| {
                        (n > 1).then_some(crate::kernels::chain::Route {
                            key_columns,
                            max_parallelism,
                            parallelism: n as u32,
                        })
                    }),
                _ => None,
            },
        }),
        _ if !tdd.gpu_operators.is_empty() => {
            tracing::warn!(
                "{name}: placed on the GPU but slot {} has no GPU backend; running on the CPU",
                tdd.slot
            );
            None
        }
        _ => None,
    };
    let ctx = BuildContext {
        plan,
        subtask: tdd.subtask,
        parallelism: tdd.parallelism,
        memory,
        spill: Some(crate::exec::spill::SpillContext::new(
            Arc::clone(&services.io),
            Arc::clone(&metrics.spill),
        )),
        printed,
        gpu,
        checkpointing: checkpoints.is_some(),
        gpu_placed: tdd.gpu_operators.clone(),
        flight: Some(crate::exec::sink::flight::FlightTaskContext {
            streams: Arc::clone(&services.flight),
            execution: job,
            canceled: Arc::clone(canceled),
        }),
    };
    let head = vertex.operators[0];
    let is_source = plan.spec.operators[head].input.is_none();
    let (input, chained, head_metrics) = if is_source {
        let (input, expected) = build_source(&ctx, head)?;
        metrics
            .source_rows_expected
            .store(expected.unwrap_or(0), Ordering::Relaxed);
        (
            input,
            &vertex.operators[1..],
            Some(Arc::clone(&operator_metrics[0].1)),
        )
    } else {
        (
            TaskInput::Gates(debloated(InputReader::new(p.gates), &services.config)),
            &vertex.operators[..],
            None,
        )
    };
    let skip = usize::from(is_source);
    let chained_metrics: Vec<Arc<OperatorMetrics>> = operator_metrics[skip..]
        .iter()
        .map(|(_, m)| Arc::clone(m))
        .collect();
    let operators = crate::exec::build::build_operators(&ctx, chained, &chained_metrics)?;
    let chain = Chain {
        operators,
        metrics: operator_metrics[skip..]
            .iter()
            .map(|(_, m)| Arc::clone(m))
            .collect(),
        writers: p.writers,
        head: head_metrics,
        operator_ids: chained.to_vec(),
    };
    if let Some(t) = lock(&services.jobs).get_mut(&job) {
        t.tasks.push((tdd.vertex, tdd.subtask, Arc::clone(metrics)));
    }
    status(out, job, task_key(tdd), ExecutionState::Running, None, None);
    let task = Task {
        name: name.to_owned(),
        input,
        chain,
        canceled: Arc::clone(canceled),
        metrics: Arc::clone(metrics),
        checkpoints: match checkpoints {
            Some((control, deployment)) => Some(checkpoint_context(
                control,
                &deployment,
                tdd,
                is_source.then_some(head),
                job,
                out,
            )?),
            None => None,
        },
    };
    task.run()
}

/// Wires a task into checkpoints: reads the state it restores from, and
/// stores and acknowledges its snapshots.
fn checkpoint_context(
    control: Receiver<TaskControl>,
    deployment: &CheckpointDeployment,
    tdd: &TaskDeploymentDescriptor,
    source_id: Option<usize>,
    job: u64,
    out: &UnboundedSender<Message>,
) -> Result<CheckpointContext, ExecError> {
    let (vertex, subtask) = (tdd.vertex, tdd.subtask);
    let restore = match &deployment.restore {
        Some(r) => {
            let handle = r
                .handles
                .iter()
                .find(|h| h.vertex == vertex && h.subtask == subtask);
            match handle {
                Some(h) => {
                    let state_error = |e: crate::checkpoint::CheckpointError| ExecError::State {
                        operator: format!("task {vertex}/{subtask}"),
                        detail: format!("restoring checkpoint {}: {e}", r.checkpoint),
                    };
                    let bytes =
                        CheckpointStorage::read_state_file(&r.dir, h).map_err(state_error)?;
                    let path = r.dir.join(&h.file);
                    Some(TaskState::decode(&bytes, &path).map_err(state_error)?)
                }
                // A checkpoint without this task holds no state for it.
                None => Some(TaskState::default()),
            }
        }
        None => None,
    };
    let job_dir = deployment.job_dir.clone();
    let acks = out.clone();
    let on_snapshot = Box::new(move |snapshot: Snapshot| {
        let dir = CheckpointStorage::inprogress_dir(&job_dir, snapshot.checkpoint);
        let bytes = snapshot.state.encode();
        match CheckpointStorage::write_state_file(&dir, vertex, subtask, &bytes) {
            Ok(handle) => {
                let _ = acks.send(Message::AcknowledgeCheckpoint {
                    execution: ExecutionId(job),
                    vertex,
                    subtask,
                    checkpoint: CheckpointId(snapshot.checkpoint),
                    handle,
                    alignment_ms: snapshot.alignment.as_millis() as u64,
                });
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                let _ = acks.send(Message::DeclineCheckpoint {
                    execution: ExecutionId(job),
                    vertex,
                    subtask,
                    checkpoint: CheckpointId(snapshot.checkpoint),
                    reason: reason.clone(),
                });
                Err(reason)
            }
        }
    });
    let pending = out.clone();
    let on_final_commit_pending = Box::new(move || {
        let _ = pending.send(Message::FinalCommitPending {
            execution: ExecutionId(job),
            vertex,
            subtask,
        });
    });
    let finished_on_restore = deployment
        .restore
        .as_ref()
        .is_some_and(|r| r.finished.contains(&(vertex, subtask)));
    Ok(CheckpointContext {
        control,
        restore,
        finished_on_restore,
        source_id,
        on_snapshot,
        on_final_commit_pending,
    })
}

/// Turns buffer debloating on for a task's inputs when configured.
fn debloated(reader: InputReader, config: &crate::config::Config) -> InputReader {
    if !config.debloat_enabled {
        return reader;
    }
    reader.with_debloating(crate::network::debloat::DebloatConfig {
        target: config.debloat_target,
        period: config.debloat_period,
        min_buffer_bytes: config.debloat_min_buffer_bytes as usize,
        max_buffer_bytes: config.segment_size_bytes as usize - PAYLOAD_HEADROOM,
    })
}
