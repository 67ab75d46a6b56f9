//! One execution attempt of the simulated job: its tasks, built from the
//! plan by the real builders and restored through the task loop's own
//! `restore`, the channels between them, and the JobManager's view of the
//! tasks.
//!
//! A task's writers are real [`RecordWriter`]s whose targets are local
//! channels of a staging [`InputGate`] per output edge; after each step the
//! simulator moves what the writers queued there onto its FIFO channels.
//! That keeps the real routing (hash by key group), barrier broadcast and
//! end of partition, with no thread: a push never waits, because a step
//! queues far fewer events than the staging gate holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::channels::{Channel, InputChannels};
use super::task::{Input, SimTask, Staging, StepContext, Stepped, TaskMessage, TaskParts, lock};
use super::{Broken, Fault, Invariant};
use crate::checkpoint::coordinator::TaskKey;
use crate::checkpoint::state::TaskState;
use crate::checkpoint::storage::{CheckpointStorage, CompletedCheckpoint};
use crate::exec::build::{BuildContext, build_operators, build_source};
use crate::exec::task::{Chain, CheckpointContext, Snapshot, TaskInput};
use crate::job::LogicalPlan;
use crate::job::graph::JobGraph;
use crate::memory::{NetworkBufferPool, PagePool};
use crate::metrics::OperatorMetrics;
use crate::network::GateId;
use crate::network::gate::{ChannelKind, GateBuffers, InputGate};
use crate::network::partition::{RecordWriter, Target, WriterMetrics};
use crate::network::sim::SplitMix64;

/// Events a staging gate holds per channel. One step queues at most a
/// batch's piece, a watermark, the barriers of the triggers it drained and
/// an end of partition per target, so a writer never waits on it.
const STAGED_EVENTS_MAX: usize = 1 << 12;
/// Managed memory of one task (its slot's budget).
const TASK_MEMORY_BYTES: u64 = 1 << 20;

/// Everything a new attempt is built from.
pub(super) struct DeployContext<'a> {
    pub plan: &'a LogicalPlan,
    pub graph: &'a JobGraph,
    pub job_dir: &'a Path,
    pub restore: Option<&'a CompletedCheckpoint>,
    pub memory: &'a Arc<PagePool>,
    pub max_parallelism: u32,
    pub fault: Fault,
}

pub(super) struct Attempt {
    pub tasks: Vec<SimTask>,
    channels: Vec<Channel>,
    /// The JobManager's view of the tasks.
    pub final_pending: BTreeSet<TaskKey>,
    pub finished: BTreeSet<TaskKey>,
    /// The final commit was sent: a crash now rolls back committed output.
    pub final_commit_sent: bool,
}

impl Attempt {
    /// Builds every task of the job graph and restores it from `cx.restore`.
    pub fn deploy(cx: &DeployContext<'_>) -> Result<Self, Broken> {
        let wiring = Wiring::new(cx.graph);
        // Writers take segments only for remote targets; these are local.
        let network = NetworkBufferPool::new(0, 4096);
        let mut tasks = Vec::new();
        for vertex in &cx.graph.vertices {
            for subtask in 0..vertex.parallelism {
                let slot = tasks.len();
                let key = (vertex.id, subtask);
                tasks.push(build_task(cx, &wiring, &network, key, slot)?);
            }
        }
        Ok(Self {
            tasks,
            channels: (0..wiring.channel_count)
                .map(|_| Channel::default())
                .collect(),
            final_pending: BTreeSet::new(),
            finished: BTreeSet::new(),
            final_commit_sent: false,
        })
    }

    /// Tasks that start finished: they had finished before the checkpoint.
    pub fn restored_finished_count(&self) -> u64 {
        let finished = self.tasks.iter().filter(|t| t.finished_on_restore());
        finished.count() as u64
    }

    /// Whether a checkpoint may be triggered, as the JobManager's `tick`
    /// decides it: some source task can still inject a barrier, and no
    /// task waits for the final commit (a checkpoint completing without
    /// its staged output would skip it).
    pub fn sources_running(&self) -> bool {
        self.final_pending.is_empty()
            && self
                .tasks
                .iter()
                .filter(|t| t.is_source)
                .any(|t| !self.finished.contains(&t.key))
    }

    /// Task `t`'s step, with the channels it reads and writes.
    pub fn step_task(
        &mut self,
        t: usize,
        rng: &mut SplitMix64,
        cx: &StepContext,
    ) -> Result<Stepped, Broken> {
        self.tasks[t].step(&mut self.channels, rng, cx)
    }
}

/// Which simulator channel each writer target and gate channel is.
struct Wiring {
    channel_count: usize,
    /// (task, output edge) → the channel of each writer target.
    outputs: BTreeMap<(TaskKey, usize), Vec<usize>>,
    /// Consumer task → the channel of each gate channel.
    inputs: BTreeMap<TaskKey, Vec<usize>>,
}

impl Wiring {
    fn new(graph: &JobGraph) -> Self {
        let mut wiring = Wiring {
            channel_count: 0,
            outputs: BTreeMap::new(),
            inputs: BTreeMap::new(),
        };
        for edge in &graph.edges {
            let source_parallelism = graph.vertices[edge.source].parallelism;
            let target_parallelism = graph.vertices[edge.target].parallelism;
            for s in 0..source_parallelism {
                let mut targets = Vec::new();
                for t in edge.targets_of(s, target_parallelism) {
                    let channel = wiring.channel_count;
                    wiring.channel_count += 1;
                    targets.push(channel);
                    let sources = edge.sources_of(t, source_parallelism);
                    let g = sources
                        .iter()
                        .position(|&x| x == s)
                        .expect("a target reads from its sources");
                    let gate = wiring
                        .inputs
                        .entry((edge.target, t))
                        .or_insert_with(|| vec![usize::MAX; sources.len()]);
                    gate[g] = channel;
                }
                wiring.outputs.insert(((edge.source, s), edge.id), targets);
            }
        }
        wiring
    }
}

fn build_task(
    cx: &DeployContext<'_>,
    wiring: &Wiring,
    network: &Arc<NetworkBufferPool>,
    key: TaskKey,
    slot: usize,
) -> Result<SimTask, Broken> {
    let failed = |e: crate::exec::ExecError| Broken::task(key, e);
    let vertex = &cx.graph.vertices[key.0];
    let ctx = BuildContext {
        plan: cx.plan,
        subtask: key.1,
        parallelism: vertex.parallelism,
        memory: cx.memory.slot_manager(slot, TASK_MEMORY_BYTES),
        spill: None,
        printed: Arc::new(AtomicU64::new(0)),
        gpu: None,
        checkpointing: true,
        gpu_placed: Vec::new(),
        flight: None,
    };
    let head = vertex.operators[0];
    let is_source = cx.plan.spec.operators[head].input.is_none();
    let (input, chained) = if is_source {
        let (
            TaskInput::Source {
                source, watermarks, ..
            },
            _,
        ) = build_source(&ctx, head).map_err(failed)?
        else {
            unreachable!("build_source builds a source");
        };
        (Input::Source { source, watermarks }, &vertex.operators[1..])
    } else {
        let channels = wiring.inputs[&key].clone();
        (
            Input::Channels(InputChannels::new(channels)),
            &vertex.operators[..],
        )
    };
    let operators = build_operators(&ctx, chained, &[]).map_err(failed)?;
    let mut staging = Vec::new();
    let mut writers = Vec::new();
    for &edge in &vertex.outputs {
        let channels = wiring.outputs[&(key, edge)].clone();
        let (gate, writer) = staged_writer(cx, network, key, edge, channels.len())?;
        staging.push(Staging { gate, channels });
        writers.push(writer);
    }
    let chain = Chain {
        metrics: operators
            .iter()
            .map(|_| Arc::new(OperatorMetrics::default()))
            .collect(),
        operators,
        writers,
        head: None,
        operator_ids: chained.to_vec(),
    };
    let mut restore = restore_state(cx.restore, key)?;
    if cx.fault == Fault::DropOperatorState
        && let Some(state) = &mut restore
    {
        state.operators.clear();
    }
    let outbox = Arc::new(Mutex::new(Vec::new()));
    let finished_on_restore = cx
        .restore
        .is_some_and(|c| c.manifest.finished.contains(&key));
    let cp = CheckpointContext {
        control: std::sync::mpsc::channel().1,
        restore,
        finished_on_restore,
        source_id: is_source.then_some(head),
        on_snapshot: snapshot_handler(cx.job_dir.to_owned(), key, Arc::clone(&outbox)),
        on_final_commit_pending: {
            let outbox = Arc::clone(&outbox);
            Box::new(move || lock(&outbox).push(TaskMessage::FinalCommitPending))
        },
    };
    SimTask::start(TaskParts {
        key,
        is_source,
        input,
        chain,
        cp,
        staging,
        outbox,
    })
}

/// A writer for output edge `edge` whose targets are the local channels of
/// a fresh staging gate.
fn staged_writer(
    cx: &DeployContext<'_>,
    network: &Arc<NetworkBufferPool>,
    key: TaskKey,
    edge: usize,
    target_count: usize,
) -> Result<(Arc<InputGate>, RecordWriter), Broken> {
    let id = GateId {
        job: 0,
        edge: edge as u32,
        target_subtask: key.1,
    };
    let buffers = GateBuffers {
        exclusive_per_channel: 0,
        floating_per_gate: 0,
        max_per_channel: STAGED_EVENTS_MAX,
    };
    let kinds = vec![ChannelKind::Local; target_count];
    let gate = InputGate::new(id, &kinds, buffers, network).map_err(|e| Broken {
        invariant: Invariant::Setup,
        detail: e.to_string(),
    })?;
    let targets = (0..target_count)
        .map(|channel| Target::Local {
            gate: Arc::clone(&gate),
            channel,
        })
        .collect();
    let writer = RecordWriter::new(
        cx.graph.edges[edge].partitioner.clone(),
        targets,
        cx.max_parallelism,
        Arc::clone(network),
        Arc::new(|| false),
        Arc::new(WriterMetrics::default()),
    );
    Ok((gate, writer))
}

/// The state task `key` restores, as the TaskManager reads it
/// (`checkpoint_context` in `taskmanager/deploy.rs`): `None` without a
/// checkpoint, empty state when the checkpoint holds none for the task.
fn restore_state(
    restore: Option<&CompletedCheckpoint>,
    key: TaskKey,
) -> Result<Option<TaskState>, Broken> {
    let Some(checkpoint) = restore else {
        return Ok(None);
    };
    let files = &checkpoint.manifest.files;
    let Some(handle) = files.iter().find(|h| (h.vertex, h.subtask) == key) else {
        return Ok(Some(TaskState::default()));
    };
    let bytes = CheckpointStorage::read_state_file(&checkpoint.dir, handle)
        .map_err(|e| Broken::task(key, e))?;
    let path = checkpoint.dir.join(&handle.file);
    let state = TaskState::decode(&bytes, &path).map_err(|e| Broken::task(key, e))?;
    Ok(Some(state))
}

/// Stores a snapshot in the in-progress checkpoint and queues the
/// acknowledgement (or the decline), as the TaskManager's `on_snapshot`.
fn snapshot_handler(
    job_dir: PathBuf,
    key: TaskKey,
    outbox: Arc<Mutex<Vec<TaskMessage>>>,
) -> Box<dyn FnMut(Snapshot) -> Result<(), String> + Send> {
    Box::new(move |snapshot: Snapshot| {
        let checkpoint = snapshot.checkpoint;
        let dir = CheckpointStorage::inprogress_dir(&job_dir, checkpoint);
        let bytes = snapshot.state.encode();
        let written = CheckpointStorage::write_state_file(&dir, key.0, key.1, &bytes);
        let (message, result) = match written {
            Ok(handle) => {
                let alignment = snapshot.alignment;
                let ack = TaskMessage::Ack {
                    checkpoint,
                    handle,
                    alignment,
                };
                (ack, Ok(()))
            }
            Err(e) => {
                let reason = e.to_string();
                let decline = TaskMessage::Decline {
                    checkpoint,
                    reason: reason.clone(),
                };
                (decline, Err(reason))
            }
        };
        lock(&outbox).push(message);
        result
    })
}
