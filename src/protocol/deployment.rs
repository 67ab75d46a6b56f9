//! What a TaskManager needs to run its part of an execution.
//!
//! The JobManager sends a compact [`super::Message::DeployTasks`]: where each
//! subtask index runs (slot sharing puts subtask `i` of every vertex in the
//! same slot) and which tasks are this TaskManager's. Both sides build the
//! same job graph from the job text, so the TaskManager expands the channel
//! lists itself ([`descriptors`]). A deployment therefore grows with the
//! parallelism, not with its square: at parallelism 1000 with `key_by` the
//! full channel lists would be about 80 MB per TaskManager, over the control
//! frame limit; the placement table is about 60 KB.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ids::{CheckpointId, TaskManagerId};
use crate::job::graph::{JobEdge, JobGraph};
use crate::network::Partitioner;

/// Where one subtask index runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubtaskLocation {
    pub taskmanager: TaskManagerId,
    pub data_addr: SocketAddr,
    pub slot: usize,
}

/// Where one channel's other end lives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChannelLocation {
    pub subtask: u32,
    pub taskmanager: TaskManagerId,
    pub data_addr: SocketAddr,
    /// For an input channel: the producer's subpartition index. For an
    /// output target: the consumer gate's channel index.
    pub index: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputGateDeployment {
    pub edge: u32,
    pub channels: Vec<ChannelLocation>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputDeployment {
    pub edge: u32,
    pub partitioner: Partitioner,
    pub targets: Vec<ChannelLocation>,
}

/// What a TaskManager needs to run one subtask.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskDeploymentDescriptor {
    pub vertex: usize,
    pub subtask: u32,
    pub parallelism: u32,
    pub slot: usize,
    pub attempt: u32,
    pub inputs: Vec<InputGateDeployment>,
    pub outputs: Vec<OutputDeployment>,
    /// The vertex's operators that placement put on the GPU.
    #[serde(default)]
    pub gpu_operators: Vec<usize>,
}

/// How the tasks of one deployment take part in checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointDeployment {
    /// The job's checkpoint directory (`execution.checkpointing.dir`/<job>),
    /// which JobManager and TaskManagers must all reach.
    pub job_dir: std::path::PathBuf,
    /// The completed checkpoint to restore from; `None` starts from the
    /// beginning.
    pub restore: Option<RestoreDeployment>,
}

/// A completed checkpoint's state files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreDeployment {
    pub checkpoint: CheckpointId,
    pub dir: std::path::PathBuf,
    pub handles: Vec<crate::checkpoint::storage::StateHandle>,
    /// Tasks that had finished before the checkpoint: they start finished.
    #[serde(default)]
    pub finished: Vec<(usize, u32)>,
}

/// The number of key groups a job routes keys through: the configured
/// `pipeline.max-parallelism` when it covers every operator's parallelism,
/// else Flink's default for the job (`1.5 ×` its largest parallelism
/// rounded up to a power of two, at least 128, at most 2^15). Routing a
/// job of parallelism 1000 through 128 key groups would leave 872 of its
/// subtasks without keys. Both sides compute it from the same job graph.
pub fn max_parallelism(configured: u32, graph: &JobGraph) -> u32 {
    let largest = graph.slots_needed().max(1);
    if configured >= largest {
        return configured;
    }
    let flink_default = (largest + largest / 2).next_power_of_two().max(128);
    flink_default.min(1 << 15).max(largest)
}

/// Position of `subtask` in `edge.targets_of(source_subtask, _)`: the
/// producer's subpartition index for that consumer. O(1), where searching
/// the target list would make a deployment cubic in the parallelism.
fn subpartition_index(edge: &JobEdge, target_subtask: u32) -> u32 {
    match edge.partitioner {
        Partitioner::Forward | Partitioner::Global => 0,
        Partitioner::Hash { .. } | Partitioner::Rebalance => target_subtask,
    }
}

/// Position of `source_subtask` in `edge.sources_of(target_subtask, _)`:
/// the consumer gate's channel index for that producer.
fn channel_index(edge: &JobEdge, source_subtask: u32) -> u32 {
    match edge.partitioner {
        Partitioner::Forward => 0,
        Partitioner::Global | Partitioner::Hash { .. } | Partitioner::Rebalance => source_subtask,
    }
}

/// The full descriptor of task `(vertex, subtask)` of an execution whose
/// subtask indices run at `placement`.
pub fn descriptor(
    graph: &JobGraph,
    vertex: usize,
    subtask: u32,
    attempt: u32,
    placement: &[SubtaskLocation],
) -> TaskDeploymentDescriptor {
    let v = &graph.vertices[vertex];
    let location = |subtask: u32, index: u32| {
        let at = &placement[subtask as usize];
        ChannelLocation {
            subtask,
            taskmanager: at.taskmanager,
            data_addr: at.data_addr,
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
                .map(|p| location(p, subpartition_index(edge, subtask)))
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
                .map(|c| location(c, channel_index(edge, subtask)))
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
        slot: placement[subtask as usize].slot,
        attempt,
        inputs,
        outputs,
        gpu_operators: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{parse_job, plan};

    /// The O(1) index helpers agree with searching the edge's lists, for
    /// every partitioner the planner produces.
    #[test]
    fn channel_indices_match_the_edge_lists() {
        let text = r#"
            [job]
            name = "t"
            parallelism = 3
            [[operator]]
            name = "src"
            type = "datagen"
            rows = 10
            keys = 5
            [[operator]]
            name = "positive"
            type = "filter"
            predicate = "value >= 0"
            parallelism = 2
            [[operator]]
            name = "by-key"
            type = "key_by"
            keys = ["key"]
            [[operator]]
            name = "agg"
            type = "aggregate"
            aggs = ["count(*) as n"]
            parallelism = 2
            [[operator]]
            name = "out"
            type = "blackhole"
            parallelism = 1
        "#;
        let planned = parse_job(text, std::path::Path::new("t.toml"))
            .and_then(plan)
            .expect("the test job plans");
        let graph = JobGraph::build(&planned, 3);
        for edge in &graph.edges {
            let sp = graph.vertices[edge.source].parallelism;
            let tp = graph.vertices[edge.target].parallelism;
            for c in 0..tp {
                for p in edge.sources_of(c, sp) {
                    let targets = edge.targets_of(p, tp);
                    let pos = targets.iter().position(|&t| t == c).unwrap_or(0) as u32;
                    assert_eq!(subpartition_index(edge, c), pos);
                    let sources = edge.sources_of(c, sp);
                    let pos = sources.iter().position(|&s| s == p).unwrap_or(0) as u32;
                    assert_eq!(channel_index(edge, p), pos);
                }
            }
        }
    }
}
