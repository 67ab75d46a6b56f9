//! Placement: which tier (CPU or GPU) each operator runs on, and why.
//!
//! Placement decides per chain, not per operator. A GPU chain is a maximal
//! run of consecutive GPU-capable filters and projections with no exchange
//! between them ([`gpu_chains`]); the executor compiles it into one fused
//! kernel program. Sources, sinks and exchanges (`key_by`) are pinned to
//! the CPU; aggregates and windows are priced on the CPU only (their
//! operators keep state in managed memory). Every operator carries a reason
//! string that `strata explain` prints and the run summary repeats.
//!
//! # The cost model
//!
//! On the CPU a chain costs Σ rows in ÷ the family's per-subtask rate ÷
//! parallelism, over its operators.
//!
//! On the GPU it is priced per call, from the calibration's measurements
//! ([`cost::gpu_chain_cost`]). The chain's input is coalesced on the host
//! into device batches of `coalesce_bytes` input column bytes (default
//! [`cost::COALESCE_BYTES_DEFAULT`]), so there are ⌈input bytes ÷
//! coalesce bytes⌉ batches whatever the source's batch size and whatever
//! the chain's filters drop. Per batch of R rows:
//!
//! * h2d = the referenced input columns (8 bytes a value plus R/8 validity
//!   bytes a column) ÷ host copy bandwidth (into the pinned staging ring)
//!   \+ the same ÷ pinned H2D bandwidth;
//! * compute = the batch's input bytes ÷ the fused chain's measured rate at
//!   that size (interpolated between measured sizes), or, when none was
//!   measured, Σ R ÷ each operator's family rate;
//! * d2h = the device-resident output columns of the selected rows (each
//!   filter keeps [`cost::FILTER_SELECTIVITY`]) ÷ pinned D2H bandwidth \+
//!   the same ÷ host copy bandwidth;
//! * fixed = 3 launches (evaluate and flag, block scan, ordered compaction
//!   scatter; 5 when the following `key_by` hashes on the GPU) × launch
//!   latency \+ one stream synchronisation.
//!
//! With two or three streams the copies of one batch overlap the compute
//! of the next, so the chain costs batches × (max(h2d, compute, d2h) +
//! fixed) + one batch's h2d + d2h to fill the pipeline. The GPU is one
//! device that the chain's subtasks share: its cost is not divided by the
//! parallelism. The chain goes to the GPU as a whole when that beats its
//! CPU cost.
//!
//! `placement.mode = cpu` puts everything on the CPU; `gpu` puts every
//! chain on the GPU regardless of cost, and is an error
//! ([`PlacementError::NoGpu`]) when the node has no GPU tier: asking for the
//! GPU explicitly and silently getting the CPU would hide a broken driver
//! install.
//!
//! At run time the JobManager places each job on the tiers its TaskManagers
//! offer, logs every decision, sends the GPU operators in the deployment
//! descriptors and reports the placement in the run summary.

pub mod calibration;
pub mod cost;
pub mod explain;

use crate::config::PlacementMode;
use crate::job::LogicalPlan;
use crate::job::graph::JobGraph;
use crate::kernels::backend::Tier;

use calibration::{Calibration, GpuCalibration};
use cost::{Capability, ChainCostBreakdown, ComputeRateSource, KernelFamily, RowEstimate};

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
    /// Seconds on the GPU: this operator's equal share of its chain's
    /// cost (the chain runs as one fused program, so the column sums to
    /// the chain's cost); `None` where there is no GPU kernel or no GPU.
    pub gpu_cost_s: Option<f64>,
    /// Index into [`Placement::chains`] of the GPU chain this operator
    /// belongs to.
    #[serde(default)]
    pub chain: Option<usize>,
}

/// One GPU chain's decision and what it was priced at.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChainPlacement {
    pub operators: Vec<usize>,
    /// The operators' names joined by arrows, as the reasons print them.
    pub names: String,
    pub tier: Tier,
    pub cpu_cost_s: f64,
    /// The GPU price part by part; `None` without a GPU tier.
    pub gpu: Option<ChainCostBreakdown>,
}

/// The decisions for a whole job.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub mode: String,
    pub calibration_origin: String,
    /// The GPU tier as the calibration describes it, or why there is none.
    pub gpu_tier: String,
    pub operators: Vec<OperatorPlacement>,
    /// Input column bytes per coalesced device batch the GPU was priced at.
    #[serde(default)]
    pub coalesce_bytes: u64,
    #[serde(default)]
    pub chains: Vec<ChainPlacement>,
}

/// What placement decides from.
pub struct PlacementInput<'a> {
    pub plan: &'a LogicalPlan,
    pub graph: &'a JobGraph,
    pub calibration: &'a Calibration,
    pub mode: PlacementMode,
    /// Why the node has no GPU, when the calibration has none either.
    pub gpu_absent_reason: &'a str,
    /// `taskmanager.gpu.coalesce-bytes`: input column bytes per device
    /// batch ([`cost::COALESCE_BYTES_DEFAULT`] unless configured).
    pub coalesce_bytes: u64,
    /// Whether a `key_by` after a GPU chain hashes and partitions on the
    /// GPU (two more launches per batch). Off until that path runs.
    pub gpu_key_by_hash: bool,
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
        coalesce_bytes,
        gpu_key_by_hash: _,
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
                chain: None,
            }
        })
        .collect();
    let chains: Vec<ChainPlacement> = gpu_chains(plan, graph, &capabilities)
        .into_iter()
        .enumerate()
        .map(|(index, chain)| {
            let placed = place_chain(&chain, &rows, &capabilities, input, gpu, &operators);
            for &i in &chain {
                let op = &mut operators[i];
                op.chain = Some(index);
                op.tier = placed.chain.tier;
                op.reason = placed.reason.clone();
                op.gpu_cost_s = placed
                    .chain
                    .gpu
                    .as_ref()
                    .map(|g| g.total_s / chain.len() as f64);
            }
            placed.chain
        })
        .collect();
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
            Some(g) => gpu_tier_line(g, coalesce_bytes),
            None => format!("none ({gpu_absent_reason})"),
        },
        operators,
        coalesce_bytes,
        chains,
    })
}

/// The calibration's per-call figures, as `explain` and the run summary
/// show the GPU tier.
fn gpu_tier_line(gpu: &GpuCalibration, coalesce_bytes: u64) -> String {
    let chain_rates = match (
        gpu.chain_rates.iter().min_by_key(|r| r.coalesced_bytes),
        gpu.chain_rates.iter().max_by_key(|r| r.coalesced_bytes),
    ) {
        (Some(low), Some(high)) => format!(
            "fused chain {:.0}–{:.0} GB/s at {}–{}",
            low.input_bytes_per_s / 1e9,
            high.input_bytes_per_s / 1e9,
            bytes(low.coalesced_bytes as f64),
            bytes(high.coalesced_bytes as f64)
        ),
        _ => "fused chain rate not measured (per-family kernel rates)".to_owned(),
    };
    format!(
        "{} ({} MiB); launch {}, sync {}; H2D pinned {:.1} / pageable {:.1} GB/s, \
         D2H pinned {:.1} / pageable {:.1} GB/s, host copy {:.1} GB/s; {chain_rates}; \
         coalesced batches of {}",
        gpu.device,
        gpu.memory_bytes >> 20,
        seconds(gpu.launch_latency_s),
        seconds(gpu.sync_latency_s),
        gpu.h2d_pinned_bytes_per_s / 1e9,
        gpu.h2d_pageable_bytes_per_s / 1e9,
        gpu.d2h_pinned_bytes_per_s / 1e9,
        gpu.d2h_pageable_bytes_per_s / 1e9,
        gpu.host_copy_bytes_per_s / 1e9,
        bytes(coalesce_bytes as f64)
    )
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

/// A chain's decision and the reason its operators print.
struct PlacedChain {
    chain: ChainPlacement,
    reason: String,
}

fn place_chain(
    chain: &[usize],
    rows: &[RowEstimate],
    capabilities: &[Capability],
    input: &PlacementInput<'_>,
    gpu: Option<&GpuCalibration>,
    operators: &[OperatorPlacement],
) -> PlacedChain {
    let names = chain
        .iter()
        .map(|&i| operators[i].name.as_str())
        .collect::<Vec<_>>()
        .join(" → ");
    let cpu_total: f64 = chain.iter().filter_map(|&i| operators[i].cpu_cost_s).sum();
    let Some(gpu) = gpu else {
        return PlacedChain {
            reason: format!("CPU: no GPU tier ({})", input.gpu_absent_reason),
            chain: ChainPlacement {
                operators: chain.to_vec(),
                names,
                tier: Tier::Cpu,
                cpu_cost_s: cpu_total,
                gpu: None,
            },
        };
    };
    let families: Vec<KernelFamily> = chain
        .iter()
        .map(|&i| {
            capabilities[i]
                .family()
                .expect("capable operators have a family")
        })
        .collect();
    let gpu_key_hash = input.gpu_key_by_hash && followed_by_key_by(input.plan, chain);
    let shape = cost::chain_shape(input.plan, chain, rows, families, gpu_key_hash);
    let breakdown = cost::gpu_chain_cost(&shape, gpu, input.coalesce_bytes);
    let gpu_total = breakdown.total_s;
    let parts = breakdown_summary(&breakdown);
    let (tier, reason) = match input.mode {
        PlacementMode::Cpu => (Tier::Cpu, "CPU: placement.mode = cpu".to_owned()),
        PlacementMode::Gpu => (
            Tier::Gpu,
            format!(
                "GPU: placement.mode = gpu (chain {names}: {} on GPU, {} on CPU; {parts})",
                seconds(gpu_total),
                seconds(cpu_total)
            ),
        ),
        PlacementMode::Auto if gpu_total < cpu_total => (
            Tier::Gpu,
            format!(
                "GPU: chain {names} costs {} on GPU vs {} on CPU ({parts})",
                seconds(gpu_total),
                seconds(cpu_total)
            ),
        ),
        PlacementMode::Auto => (
            Tier::Cpu,
            format!(
                "CPU: chain {names} costs {} on CPU vs {} on GPU ({parts})",
                seconds(cpu_total),
                seconds(gpu_total)
            ),
        ),
    };
    PlacedChain {
        reason,
        chain: ChainPlacement {
            operators: chain.to_vec(),
            names,
            tier,
            cpu_cost_s: cpu_total,
            gpu: Some(breakdown),
        },
    }
}

/// Whether the chain's last operator feeds a `key_by`.
fn followed_by_key_by(plan: &LogicalPlan, chain: &[usize]) -> bool {
    let tail = chain[chain.len() - 1];
    plan.spec.operators.iter().any(|op| {
        op.input == Some(tail) && matches!(op.kind, crate::job::OperatorKind::KeyBy { .. })
    })
}

/// The GPU price part by part, as one line: what a reason says after its
/// totals.
pub fn breakdown_summary(b: &ChainCostBreakdown) -> String {
    let rate = match b.compute_rate_source {
        ComputeRateSource::MeasuredChain => "measured chain rate",
        ComputeRateSource::FamilyRates => "per-family rates",
    };
    format!(
        "{} coalesced batches of {:.0} rows; H2D {} {}, compute {} ({:.0} GB/s, {rate}), \
         D2H {} {}, overlapped; {} launches + {} syncs {}; pipeline fill {}",
        b.batches,
        b.rows_per_batch,
        bytes(b.h2d_bytes),
        seconds(b.h2d_s),
        seconds(b.compute_s),
        b.compute_bytes_per_s / 1e9,
        bytes(b.d2h_bytes),
        seconds(b.d2h_s),
        b.launches,
        b.syncs,
        seconds(b.fixed_s),
        seconds(b.fill_s)
    )
}

/// Bytes with a binary unit.
pub fn bytes(b: f64) -> String {
    const KIB: f64 = 1024.0;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{b:.0} B")
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
        coalesce_bytes: config.gpu_coalesce_bytes.max(1),
        gpu_key_by_hash: false,
    })
}
