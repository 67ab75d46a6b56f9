//! Placement: which tier (CPU or GPU) each operator runs on, and why.
//!
//! The cost model prices every operator on every tier it has a kernel for:
//! compute is estimated rows ÷ the calibrated rate (per subtask on the CPU;
//! the GPU is one device that the subtasks share), and a GPU operator also
//! pays a fixed launch cost per batch. Moving rows between the tiers costs
//! bytes ÷ link bandwidth plus a launch per batch, once into a chain of GPU
//! operators and once out of it, so placement decides per chain, not per
//! operator: a run of consecutive GPU-capable operators (no exchange
//! between them) goes to the GPU as a whole when the chain's GPU cost,
//! transitions included, beats its CPU cost. Sources, sinks and exchanges
//! (`key_by`) are pinned to the CPU. Every operator carries a reason string
//! that `strata explain` prints and the run summary repeats.
//!
//! `placement.mode = cpu` puts everything on the CPU; `gpu` puts every
//! operator that has a GPU kernel on the GPU regardless of cost, and is an
//! error ([`PlacementError::NoGpu`]) when the node has no GPU tier: asking
//! for the GPU explicitly and silently getting the CPU would hide a broken
//! driver install.
//!
//! At run time the JobManager places each job on the tiers its TaskManagers
//! offer, logs every decision, sends the GPU operators in the deployment
//! descriptors and reports the placement in the run summary. Of the GPU
//! operators, filters and projections execute on the kernel backend today;
//! aggregates stay on the CPU with that reason until their kernel is
//! dispatched.

pub mod calibration;
pub mod cost;
pub mod explain;

use crate::config::PlacementMode;
use crate::job::LogicalPlan;
use crate::job::graph::JobGraph;
use crate::kernels::backend::Tier;

use calibration::{Calibration, GpuCalibration};
use cost::{Capability, KernelFamily, RowEstimate};

/// Errors of placement.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "placement.mode = gpu, but this node has no GPU tier ({reason}); use placement.mode = auto or cpu, or name a calibration with a GPU"
    )]
    NoGpu { reason: String },
    #[error(transparent)]
    Calibration(#[from] calibration::CalibrationError),
}

/// One operator's decision.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OperatorPlacement {
    pub operator: usize,
    pub name: String,
    pub kind: String,
    pub parallelism: u32,
    pub tier: Tier,
    pub reason: String,
    pub rows_in_estimate: f64,
    /// Seconds on the CPU; `None` for pinned operators (not priced).
    pub cpu_cost_s: Option<f64>,
    /// Seconds on the GPU including this operator's share of the
    /// transitions; `None` where there is no GPU kernel or no GPU.
    pub gpu_cost_s: Option<f64>,
}

/// The decisions for a whole job.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub mode: String,
    pub calibration_origin: String,
    /// The GPU tier as the calibration describes it, or why there is none.
    pub gpu_tier: String,
    pub operators: Vec<OperatorPlacement>,
}

/// What placement decides from.
pub struct PlacementInput<'a> {
    pub plan: &'a LogicalPlan,
    pub graph: &'a JobGraph,
    pub calibration: &'a Calibration,
    pub mode: PlacementMode,
    /// Why the node has no GPU, when the calibration has none either.
    pub gpu_absent_reason: &'a str,
}

impl Placement {
    /// The tier line of a job-graph vertex for the run summary.
    pub fn vertex_tier(&self, graph: &JobGraph, vertex: usize) -> String {
        let on_gpu: Vec<&str> = graph.vertices[vertex]
            .operators
            .iter()
            .filter_map(|&i| self.operators.get(i))
            .filter(|p| p.tier == Tier::Gpu)
            .map(|p| p.name.as_str())
            .collect();
        if on_gpu.is_empty() {
            "CPU".into()
        } else {
            format!("GPU for {}", on_gpu.join(", "))
        }
    }

    pub fn gpu_operator_count(&self) -> usize {
        self.operators
            .iter()
            .filter(|p| p.tier == Tier::Gpu)
            .count()
    }
}

/// Prices each operator and places each chain.
pub fn place(input: &PlacementInput<'_>) -> Result<Placement, PlacementError> {
    let PlacementInput {
        plan,
        graph,
        calibration,
        mode,
        gpu_absent_reason,
    } = *input;
    let gpu = calibration.gpu.as_ref();
    if mode == PlacementMode::Gpu && gpu.is_none() {
        return Err(PlacementError::NoGpu {
            reason: gpu_absent_reason.to_owned(),
        });
    }
    let rows = cost::estimate_rows(plan);
    let ops = &plan.spec.operators;
    let capabilities: Vec<Capability> = (0..ops.len()).map(|i| cost::capability(plan, i)).collect();
    let mut operators: Vec<OperatorPlacement> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let family = capabilities[i].family();
            let parallelism = graph.parallelism[i].max(1);
            OperatorPlacement {
                operator: i,
                name: op.name.clone(),
                kind: op.kind.type_name().into(),
                parallelism,
                tier: Tier::Cpu,
                reason: String::new(),
                rows_in_estimate: rows[i].rows_in,
                cpu_cost_s: family
                    .map(|f| rows[i].rows_in / f.rate(&calibration.cpu) / f64::from(parallelism)),
                gpu_cost_s: None,
            }
        })
        .collect();
    for chain in gpu_chains(plan, graph, &capabilities) {
        place_chain(&chain, &mut operators, &rows, &capabilities, input, gpu);
    }
    for (i, capability) in capabilities.iter().enumerate() {
        match capability {
            Capability::Pinned { reason } => operators[i].reason = reason.clone(),
            Capability::CpuOnly { reason, .. } => {
                operators[i].reason = format!("CPU: {reason}");
            }
            Capability::Both { .. } => {}
        }
    }
    Ok(Placement {
        mode: mode.to_string(),
        calibration_origin: calibration.origin.clone(),
        gpu_tier: match gpu {
            Some(g) => format!(
                "{} ({} MiB), link {:.1} GB/s, launch {:.0} µs",
                g.device,
                g.memory_bytes >> 20,
                g.link_bytes_per_s / 1e9,
                g.launch_overhead_s * 1e6
            ),
            None => format!("none ({gpu_absent_reason})"),
        },
        operators,
    })
}

/// Maximal runs of GPU-capable operators, each feeding the next as its only
/// consumer at the same parallelism (so no exchange lies between them).
fn gpu_chains(
    plan: &LogicalPlan,
    graph: &JobGraph,
    capabilities: &[Capability],
) -> Vec<Vec<usize>> {
    let ops = &plan.spec.operators;
    let consumers = |i: usize| ops.iter().filter(|o| o.input == Some(i)).count();
    let capable = |i: usize| matches!(capabilities[i], Capability::Both { .. });
    let mut chains: Vec<Vec<usize>> = Vec::new();
    let mut chain_of: Vec<Option<usize>> = vec![None; ops.len()];
    for (i, op) in ops.iter().enumerate() {
        if !capable(i) {
            continue;
        }
        let extends = op.input.and_then(|input| {
            chain_of[input].filter(|_| {
                consumers(input) == 1 && graph.parallelism[input] == graph.parallelism[i]
            })
        });
        let chain = match extends {
            Some(chain) => chain,
            None => {
                chains.push(Vec::new());
                chains.len() - 1
            }
        };
        chains[chain].push(i);
        chain_of[i] = Some(chain);
    }
    chains
}

/// Rows per batch when no generator says (the job files' default).
const BATCH_ROWS_ASSUMED: usize = 8192;

/// Batches a stream of `rows` rows arrives in.
fn batch_count(plan: &LogicalPlan, rows: f64) -> f64 {
    let batch_rows = plan
        .spec
        .operators
        .iter()
        .find_map(|op| match &op.kind {
            crate::job::OperatorKind::Datagen(d) => Some(d.batch_size),
            _ => None,
        })
        .unwrap_or(BATCH_ROWS_ASSUMED)
        .max(1);
    (rows / batch_rows as f64).ceil()
}

/// Seconds to move `rows` rows of `row_bytes` bytes over the link.
fn transition_s(plan: &LogicalPlan, gpu: &GpuCalibration, rows: f64, row_bytes: u64) -> f64 {
    rows * row_bytes as f64 / gpu.link_bytes_per_s + batch_count(plan, rows) * gpu.launch_overhead_s
}

fn place_chain(
    chain: &[usize],
    operators: &mut [OperatorPlacement],
    rows: &[RowEstimate],
    capabilities: &[Capability],
    input: &PlacementInput<'_>,
    gpu: Option<&GpuCalibration>,
) {
    let plan = input.plan;
    let names = chain
        .iter()
        .map(|&i| operators[i].name.as_str())
        .collect::<Vec<_>>()
        .join(" → ");
    let cpu_total: f64 = chain.iter().filter_map(|&i| operators[i].cpu_cost_s).sum();
    let Some(gpu) = gpu else {
        for &i in chain {
            operators[i].reason = format!("CPU: no GPU tier ({})", input.gpu_absent_reason);
        }
        return;
    };
    let (head, tail) = (chain[0], chain[chain.len() - 1]);
    let head_input = plan.spec.operators[head]
        .input
        .expect("GPU-capable operators have an input");
    let transfer_in = transition_s(
        plan,
        gpu,
        rows[head].rows_in,
        cost::row_bytes(&plan.schemas[head_input]),
    );
    let transfer_out = transition_s(
        plan,
        gpu,
        rows[tail].rows_out,
        cost::row_bytes(&plan.schemas[tail]),
    );
    for &i in chain {
        let family: KernelFamily = capabilities[i]
            .family()
            .expect("capable operators have a family");
        let compute = rows[i].rows_in / family.rate(&gpu.rates)
            + batch_count(plan, rows[i].rows_in) * gpu.launch_overhead_s;
        let transitions =
            if i == head { transfer_in } else { 0.0 } + if i == tail { transfer_out } else { 0.0 };
        operators[i].gpu_cost_s = Some(compute + transitions);
    }
    let gpu_total: f64 = chain.iter().filter_map(|&i| operators[i].gpu_cost_s).sum();
    let transfers = transfer_in + transfer_out;
    let (tier, reason) = match input.mode {
        PlacementMode::Cpu => (Tier::Cpu, "CPU: placement.mode = cpu".to_owned()),
        PlacementMode::Gpu => (
            Tier::Gpu,
            format!(
                "GPU: placement.mode = gpu (chain {names}: {} on GPU, {} on CPU)",
                seconds(gpu_total),
                seconds(cpu_total)
            ),
        ),
        PlacementMode::Auto if gpu_total < cpu_total => (
            Tier::Gpu,
            format!(
                "GPU: chain {names} costs {} on GPU ({} of it transfers) vs {} on CPU",
                seconds(gpu_total),
                seconds(transfers),
                seconds(cpu_total)
            ),
        ),
        PlacementMode::Auto => (
            Tier::Cpu,
            format!(
                "CPU: chain {names} costs {} on CPU vs {} on GPU ({} of it transfers)",
                seconds(cpu_total),
                seconds(gpu_total),
                seconds(transfers)
            ),
        ),
    };
    for &i in chain {
        operators[i].tier = tier;
        operators[i].reason = reason.clone();
    }
}

/// Seconds with a unit that reads well.
pub fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

/// Places a job on this node as configured: the calibration from
/// `explicit_calibration` (a CLI flag) or `placement.calibration-file` or
/// the defaults, the GPU as detected, `placement.mode` as set.
pub fn place_on_this_node(
    plan: &LogicalPlan,
    graph: &JobGraph,
    config: &crate::config::Config,
    explicit_calibration: Option<&std::path::Path>,
) -> Result<Placement, PlacementError> {
    let detection = crate::kernels::gpu::detect();
    let calibration = calibration::load(
        explicit_calibration,
        &config.calibration_file,
        detection.devices().first(),
    )?;
    let gpu_absent_reason = match detection {
        crate::kernels::gpu::GpuDetection::Absent { reason } => reason.clone(),
        crate::kernels::gpu::GpuDetection::Present(_) => {
            "the calibration file has no gpu section".to_owned()
        }
    };
    place(&PlacementInput {
        plan,
        graph,
        calibration: &calibration,
        mode: config.placement_mode,
        gpu_absent_reason: &gpu_absent_reason,
    })
}
