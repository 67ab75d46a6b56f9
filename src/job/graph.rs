//! Logical plan → job graph: operators chained into vertices, joined by
//! exchange edges.
//!
//! Chaining follows Flink's rule: an operator joins its input's vertex when
//! it is that operator's only consumer, runs at the same parallelism, and
//! no repartitioning (a `key_by`) lies between them. A `key_by` is not a
//! task: it becomes a hash edge into its consumer. A global aggregate runs
//! with parallelism 1 behind a global edge.

use crate::network::Partitioner;

use super::{LogicalPlan, OperatorKind};

#[derive(Clone, Debug)]
pub struct JobVertex {
    pub id: usize,
    /// Logical operator indices, head first.
    pub operators: Vec<usize>,
    pub parallelism: u32,
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct JobEdge {
    pub id: usize,
    pub source: usize,
    pub target: usize,
    pub partitioner: Partitioner,
}

#[derive(Clone, Debug)]
pub struct JobGraph {
    pub vertices: Vec<JobVertex>,
    pub edges: Vec<JobEdge>,
    /// Parallelism of every logical operator (key_by: its consumer's).
    pub parallelism: Vec<u32>,
}

impl JobGraph {
    /// Chains `plan` into a job graph; `default_parallelism` applies where
    /// neither the operator nor the job sets one.
    pub fn build(plan: &LogicalPlan, default_parallelism: u32) -> Self {
        let ops = &plan.spec.operators;
        let job_default = plan
            .spec
            .default_parallelism
            .unwrap_or(default_parallelism)
            .max(1);
        let consumers = |i: usize| ops.iter().filter(|o| o.input == Some(i)).count();
        let is_global_agg = |i: usize| {
            matches!(ops[i].kind, OperatorKind::StandardizeFit { .. })
                || matches!(ops[i].kind, OperatorKind::Aggregate { .. })
                    && ops[i]
                        .input
                        .is_none_or(|inp| !matches!(ops[inp].kind, OperatorKind::KeyBy { .. }))
        };
        let mut parallelism: Vec<u32> = ops
            .iter()
            .map(|o| o.parallelism.unwrap_or(job_default).max(1))
            .collect();
        for (i, _) in ops.iter().enumerate() {
            if is_global_agg(i) {
                parallelism[i] = 1;
            }
        }
        let mut graph = JobGraph {
            vertices: Vec::new(),
            edges: Vec::new(),
            parallelism: parallelism.clone(),
        };
        let mut vertex_of: Vec<Option<usize>> = vec![None; ops.len()];
        for (i, op) in ops.iter().enumerate() {
            if matches!(op.kind, OperatorKind::KeyBy { .. }) {
                continue;
            }
            let Some(input) = op.input else {
                vertex_of[i] = Some(graph.add_vertex(i, parallelism[i]));
                continue;
            };
            if let OperatorKind::KeyBy { .. } = ops[input].kind {
                let upstream = ops[input].input.expect("key_by has an input");
                graph.parallelism[input] = parallelism[i];
                let key_columns = plan.keyed[input].clone().unwrap_or_default();
                let v = graph.add_vertex(i, parallelism[i]);
                vertex_of[i] = Some(v);
                let source = vertex_of[upstream].expect("inputs precede consumers");
                graph.add_edge(source, v, Partitioner::Hash { key_columns });
                continue;
            }
            let source = vertex_of[input].expect("inputs precede consumers");
            if consumers(input) == 1 && parallelism[input] == parallelism[i] {
                graph.vertices[source].operators.push(i);
                vertex_of[i] = Some(source);
                continue;
            }
            let v = graph.add_vertex(i, parallelism[i]);
            vertex_of[i] = Some(v);
            let partitioner = if parallelism[i] == 1 && is_global_agg(i) {
                Partitioner::Global
            } else if parallelism[input] == parallelism[i] {
                Partitioner::Forward
            } else {
                Partitioner::Rebalance
            };
            graph.add_edge(source, v, partitioner);
        }
        graph
    }

    fn add_vertex(&mut self, head: usize, parallelism: u32) -> usize {
        let id = self.vertices.len();
        self.vertices.push(JobVertex {
            id,
            operators: vec![head],
            parallelism,
            inputs: Vec::new(),
            outputs: Vec::new(),
        });
        id
    }

    fn add_edge(&mut self, source: usize, target: usize, partitioner: Partitioner) {
        let id = self.edges.len();
        self.edges.push(JobEdge {
            id,
            source,
            target,
            partitioner,
        });
        self.vertices[source].outputs.push(id);
        self.vertices[target].inputs.push(id);
    }

    /// Slots needed with slot sharing: the largest vertex parallelism.
    pub fn slots_needed(&self) -> u32 {
        self.vertices
            .iter()
            .map(|v| v.parallelism)
            .max()
            .unwrap_or(0)
    }

    /// A vertex's display name: its operators' names joined by arrows.
    pub fn vertex_name(&self, plan: &LogicalPlan, vertex: usize) -> String {
        self.vertices[vertex]
            .operators
            .iter()
            .map(|&i| plan.spec.operators[i].name.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

impl JobEdge {
    /// Target subtasks that producer subtask `source_subtask` writes to, in
    /// the order of the writer's targets (its subpartition indices).
    pub fn targets_of(&self, source_subtask: u32, target_parallelism: u32) -> Vec<u32> {
        match self.partitioner {
            Partitioner::Forward => vec![source_subtask],
            Partitioner::Global => vec![0],
            Partitioner::Hash { .. } | Partitioner::Rebalance => (0..target_parallelism).collect(),
        }
    }

    /// Producer subtasks that consumer subtask `target_subtask` reads from,
    /// in the order of its gate's channels.
    pub fn sources_of(&self, target_subtask: u32, source_parallelism: u32) -> Vec<u32> {
        match self.partitioner {
            Partitioner::Forward => vec![target_subtask],
            _ => (0..source_parallelism).collect(),
        }
    }
}
