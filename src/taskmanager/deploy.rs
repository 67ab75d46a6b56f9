//! Deploying a job's tasks on this TaskManager: gates and partitions first
//! (so local producers find their consumers), then remote partition
//! requests, then one thread per task.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::mpsc::UnboundedSender;

use super::{JobTasks, Services, lock};
use std::sync::mpsc::Receiver;

use crate::checkpoint::state::TaskState;
use crate::checkpoint::storage::CheckpointStorage;
use crate::cluster::rpc::{
    CheckpointDeployment, ExecutionState, Message, TaskDeploymentDescriptor,
};
use crate::exec::ExecError;
use crate::exec::build::{BuildContext, GpuContext, build_operator, build_source};
use crate::exec::task::{Chain, Task, TaskInput};
use crate::exec::task::{CheckpointContext, Snapshot, TaskControl};
use crate::job::graph::JobGraph;
use crate::job::{LogicalPlan, parse_job, plan};
use crate::kernels::backend::TieredKernels;
use crate::metrics::{OperatorMetrics, TaskMetrics};
use crate::network::gate::{ChannelKind, GateBuffers};
use crate::network::ipc::ChannelEncoder;
use crate::network::partition::{Target, WriterMetrics};
use crate::network::taskread::{self, GateLink, TaskReadInput};
use crate::network::{
    GateId, InputGate, InputReader, NetworkError, PAYLOAD_HEADROOM, PartitionId, RecordWriter,
    ResultPartition, Subpartition,
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
    tdd: &TaskDeploymentDescriptor,
    state: ExecutionState,
    error: Option<String>,
    metrics: Option<&TaskMetrics>,
) {
    let _ = out.send(Message::TaskStatus {
        job,
        vertex: tdd.vertex,
        subtask: tdd.subtask,
        state,
        error,
        metrics: metrics.map(TaskMetrics::snapshot),
    });
}

fn fail_all(
    out: &UnboundedSender<Message>,
    job: u64,
    tasks: &[TaskDeploymentDescriptor],
    error: &str,
) {
    for tdd in tasks {
        status(
            out,
            job,
            tdd,
            ExecutionState::Failed,
            Some(error.to_owned()),
            None,
        );
    }
}

/// What a `DeployTasks` message says about the job as a whole.
pub(super) struct Deployment<'a> {
    pub job: u64,
    pub job_text: &'a str,
    pub job_path: &'a str,
    pub default_parallelism: u32,
    pub checkpointing: Option<CheckpointDeployment>,
}

pub(super) async fn deploy(
    services: &Arc<Services>,
    deployment: Deployment<'_>,
    tasks: Vec<TaskDeploymentDescriptor>,
    out: UnboundedSender<Message>,
) {
    let Deployment {
        job,
        job_text,
        job_path,
        default_parallelism,
        checkpointing,
    } = deployment;
    let checkpointing = checkpointing.map(Arc::new);
    let canceled = Arc::new(AtomicBool::new(false));
    for tdd in &tasks {
        status(&out, job, tdd, ExecutionState::Deploying, None, None);
    }
    let planned = parse_job(job_text, Path::new(job_path)).and_then(plan);
    let plan = match planned {
        Ok(p) => Arc::new(p),
        Err(e) => {
            fail_all(&out, job, &tasks, &e.to_string());
            return;
        }
    };
    let graph = Arc::new(JobGraph::build(&plan, default_parallelism));
    {
        let mut slots = lock(&services.slots);
        for tdd in &tasks {
            if let Err(e) = slots.allocate(tdd.slot, job) {
                drop(slots);
                fail_all(&out, job, &tasks, &e.to_string());
                return;
            }
        }
    }
    let prepared = match prepare(services, job, tasks.clone(), &canceled).await {
        Ok(p) => p,
        Err(e) => {
            services.registry.release_job(job, "deployment failed");
            fail_all(&out, job, &tasks, &e.to_string());
            return;
        }
    };
    let mut controls = Vec::new();
    let mut receivers = Vec::new();
    for p in &prepared {
        if checkpointing.is_some() {
            let (sender, receiver) = std::sync::mpsc::sync_channel(super::TASK_CONTROL_MAX);
            controls.push(super::TaskControlHandle {
                vertex: p.tdd.vertex,
                subtask: p.tdd.subtask,
                sender,
            });
            receivers.push(Some(receiver));
        } else {
            receivers.push(None);
        }
    }
    lock(&services.jobs).insert(
        job,
        JobTasks {
            canceled: Arc::clone(&canceled),
            running: prepared.len(),
            tasks: Vec::new(),
            controls,
        },
    );
    let printed = Arc::new(AtomicU64::new(0));
    for (p, control) in prepared.into_iter().zip(receivers) {
        let services = Arc::clone(services);
        let checkpoints = control.zip(checkpointing.clone());
        let (plan, graph, out, canceled, printed) = (
            Arc::clone(&plan),
            Arc::clone(&graph),
            out.clone(),
            Arc::clone(&canceled),
            Arc::clone(&printed),
        );
        let name = format!(
            "{} ({}/{})",
            graph.vertex_name(&plan, p.tdd.vertex),
            p.tdd.subtask + 1,
            p.tdd.parallelism
        );
        lock(&services.slots).task_started(p.tdd.slot).ok();
        let spawned = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
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
                )
            });
        if let Err(e) = spawned {
            tracing::error!("cannot spawn a task thread: {e}");
        }
    }
}

/// Creates and registers gates and partitions, builds writers, and
/// requests remote partitions.
async fn prepare(
    services: &Arc<Services>,
    job: u64,
    tasks: Vec<TaskDeploymentDescriptor>,
    canceled: &Arc<AtomicBool>,
) -> Result<Vec<Prepared>, NetworkError> {
    let config = &services.config;
    let me = services.name();
    let segment = config.segment_size_bytes as usize;
    let buffers = GateBuffers::from(config);
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
                config.max_parallelism,
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
                        .connect(c.data_addr, &c.taskmanager, segment)
                        .await?;
                    conn.request_partition(gate, channel, partition, c.index)?;
                    continue;
                }
                let link = match links.iter().find(|(addr, _)| *addr == c.data_addr) {
                    Some((_, link)) => Arc::clone(link),
                    None => {
                        let link = taskread::connect(
                            c.data_addr,
                            &c.taskmanager,
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
    status(&out, job, &tdd, ExecutionState::Initializing, None, None);
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
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(ExecError::State {
            operator: name.clone(),
            detail: format!("internal error (panic): {what}"),
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
    // onto it as soon as it hears of it (a restart after a failure).
    lock(&services.slots).task_ended(tdd.slot).ok();
    status(&out, job, &tdd, state, error, Some(&metrics));
    let mut jobs = lock(&services.jobs);
    let done = jobs.get_mut(&job).is_some_and(|t| {
        t.tasks
            .retain(|(v, s, _)| !(*v == tdd.vertex && *s == tdd.subtask));
        t.running -= 1;
        t.running == 0
    });
    if done {
        // The job's result partitions stay registered: remote consumers may
        // still be draining them. The JobManager releases them when the job
        // ends cluster-wide (ReleaseJob or CancelJob).
        jobs.remove(&job);
    }
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
        Some(Some(backend)) if !tdd.gpu_operators.is_empty() => Some(GpuContext {
            kernels: Arc::new(TieredKernels::new(
                Arc::clone(backend),
                Arc::clone(&metrics.gpu),
            )),
            operators: tdd.gpu_operators.clone(),
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
    let operators = chained
        .iter()
        .map(|&op| build_operator(&ctx, op))
        .collect::<Result<Vec<_>, _>>()?;
    let skip = usize::from(is_source);
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
    status(out, job, tdd, ExecutionState::Running, None, None);
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
                    job,
                    vertex,
                    subtask,
                    checkpoint: snapshot.checkpoint,
                    handle,
                    alignment_ms: snapshot.alignment.as_millis() as u64,
                });
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                let _ = acks.send(Message::DeclineCheckpoint {
                    job,
                    vertex,
                    subtask,
                    checkpoint: snapshot.checkpoint,
                    reason: reason.clone(),
                });
                Err(reason)
            }
        }
    });
    let pending = out.clone();
    let on_final_commit_pending = Box::new(move || {
        let _ = pending.send(Message::FinalCommitPending {
            job,
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
