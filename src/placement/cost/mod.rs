//! The cost model's inputs: which operators have a GPU kernel, how many
//! rows each operator sees, and what a row weighs.
//!
//! Row counts are estimates from the job file alone (no statistics yet): a
//! `datagen` source says how many rows it makes; file sources are assumed
//! to hold [`FILE_SOURCE_ROWS_ASSUMED`] rows; a filter keeps
//! [`FILTER_SELECTIVITY`] of its input; a keyed aggregate emits one row per
//! key (the generator's key count when known).

use arrow_schema::DataType;

use crate::job::{LogicalPlan, OperatorKind};
use crate::kernels::chain::{ChainProgram, ChainStep};

use super::calibration::KernelRates;

mod gpu_chain;

pub use gpu_chain::{
    CHAIN_KERNELS, COALESCE_BYTES_DEFAULT, ChainCostBreakdown, ChainShape, ComputeRateSource,
    GPU_KEY_HASH_KERNELS, chain_rate_at, chain_shape, gpu_chain_cost,
};

pub const FILE_SOURCE_ROWS_ASSUMED: u64 = 1_000_000;
pub const FILTER_SELECTIVITY: f64 = 0.5;
/// Bytes assumed per string value (offsets and data).
const UTF8_VALUE_BYTES: u64 = 24;

/// The kernel family an operator runs, which picks its calibrated rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFamily {
    Filter,
    Project,
    Hash,
    Aggregate,
}

impl KernelFamily {
    pub fn rate(self, rates: &KernelRates) -> f64 {
        match self {
            KernelFamily::Filter => rates.filter_rows_per_s,
            KernelFamily::Project => rates.project_rows_per_s,
            KernelFamily::Hash => rates.hash_rows_per_s,
            KernelFamily::Aggregate => rates.aggregate_rows_per_s,
        }
    }
}

/// How an operator may be placed.
#[derive(Clone, Debug, PartialEq)]
pub enum Capability {
    /// Runs on the host whatever the rates: the reason says why.
    Pinned { reason: String },
    /// Priced on the CPU only: it has no GPU kernel (the reason says which
    /// part of it lacks one).
    CpuOnly {
        family: KernelFamily,
        reason: String,
    },
    /// Has kernels on both tiers.
    Both { family: KernelFamily },
}

impl Capability {
    pub fn family(&self) -> Option<KernelFamily> {
        match self {
            Capability::Pinned { .. } => None,
            Capability::CpuOnly { family, .. } | Capability::Both { family } => Some(*family),
        }
    }
}

/// What operator `index` of `plan` can run on.
pub fn capability(plan: &LogicalPlan, index: usize) -> Capability {
    let op = &plan.spec.operators[index];
    let input_schema = op.input.map(|input| plan.schemas[input].as_ref());
    let gpu_or = |family, check: Result<(), String>| match check {
        Ok(()) => Capability::Both { family },
        Err(reason) => Capability::CpuOnly { family, reason },
    };
    match (&op.kind, input_schema) {
        (kind, _) if kind.is_source() => Capability::Pinned {
            reason: "pinned to CPU: sources read files or generate rows on the host".into(),
        },
        (kind, _) if kind.is_sink() => Capability::Pinned {
            reason: "pinned to CPU: sinks write from the host".into(),
        },
        (OperatorKind::KeyBy { .. }, _) => Capability::Pinned {
            reason: "pinned to CPU: key_by is an exchange (hash routing into network buffers)"
                .into(),
        },
        (OperatorKind::Filter { predicate }, Some(_)) => gpu_or(
            KernelFamily::Filter,
            fuses(
                plan,
                index,
                ChainStep::Filter {
                    name: &op.name,
                    predicate,
                },
            ),
        ),
        (OperatorKind::Project { columns }, Some(_)) => gpu_or(
            KernelFamily::Project,
            fuses(
                plan,
                index,
                ChainStep::Project {
                    name: &op.name,
                    columns,
                },
            ),
        ),
        (OperatorKind::Aggregate { aggs }, Some(schema)) => {
            let keys = op
                .input
                .and_then(|input| plan.keyed[input].clone())
                .unwrap_or_default();
            gpu_or(
                KernelFamily::Aggregate,
                crate::kernels::aggtable::AggProgram::compile(schema, &keys, aggs).map(|_| ()),
            )
        }
        (
            OperatorKind::Sample { .. }
            | OperatorKind::FillNull { .. }
            | OperatorKind::Batch { .. }
            | OperatorKind::Shuffle { .. }
            | OperatorKind::SplitSide { .. }
            | OperatorKind::Cast { .. }
            | OperatorKind::Bucketize(_)
            | OperatorKind::OneHot(_)
            | OperatorKind::Join(_),
            _,
        ) => Capability::Pinned {
            reason: format!("CPU: no GPU kernel for {} yet", op.kind.type_name()),
        },
        (OperatorKind::Standardize { .. }, _) => Capability::CpuOnly {
            family: KernelFamily::Project,
            reason: "standardize_apply has a GPU kernel, but alone it costs a PCIe round trip per batch for two flops per value; it stays on the CPU until it fuses into a device-resident chain".into(),
        },
        (OperatorKind::Window { .. }, _) => Capability::CpuOnly {
            family: KernelFamily::Aggregate,
            reason: "no GPU kernel for event-time windows".into(),
        },
        _ => Capability::Pinned {
            reason: "pinned to CPU".into(),
        },
    }
}

/// Whether operator `index` compiles into a fused GPU program
/// (`kernels::chain`): the GPU tier runs filters and projections only that
/// way, so this is the test of their GPU capability.
fn fuses(plan: &LogicalPlan, index: usize, step: ChainStep<'_>) -> Result<(), String> {
    let input = plan.spec.operators[index]
        .input
        .expect("filters and projections have an input");
    ChainProgram::compile(&plan.schemas[input], &[step], &plan.schemas[index]).map(|_| ())
}

/// Estimated rows into each operator and out of it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowEstimate {
    pub rows_in: f64,
    pub rows_out: f64,
    /// Whether a source's size was assumed rather than known.
    pub assumed: bool,
}

/// Walks the plan in file order (inputs first).
pub fn estimate_rows(plan: &LogicalPlan) -> Vec<RowEstimate> {
    let ops = &plan.spec.operators;
    let mut estimates: Vec<RowEstimate> = Vec::with_capacity(ops.len());
    let mut keys_of_source: Vec<Option<u64>> = Vec::with_capacity(ops.len());
    for op in ops {
        let upstream = op.input.map(|input| estimates[input]);
        let keys = op.input.and_then(|input| keys_of_source[input]);
        let rows_in = upstream.map_or(0.0, |u| u.rows_out);
        let assumed = upstream.is_some_and(|u| u.assumed);
        let (rows_out, keys, assumed) = match &op.kind {
            OperatorKind::Datagen(d) => (d.rows as f64, Some(d.keys), false),
            OperatorKind::CsvSource(_)
            | OperatorKind::ParquetSource(_)
            | OperatorKind::ArrowIpcSource(_) => (FILE_SOURCE_ROWS_ASSUMED as f64, None, true),
            OperatorKind::Filter { .. } => (rows_in * FILTER_SELECTIVITY, keys, assumed),
            OperatorKind::Aggregate { .. } | OperatorKind::Window { .. } => {
                let groups = keys.map_or(rows_in / 10.0, |k| k as f64);
                (rows_in.min(groups.max(1.0)), keys, assumed)
            }
            kind if kind.is_sink() => (0.0, keys, assumed),
            _ => (rows_in, keys, assumed),
        };
        estimates.push(RowEstimate {
            rows_in,
            rows_out,
            assumed,
        });
        keys_of_source.push(keys);
    }
    estimates
}

/// Bytes of one value of `data_type` (validity not included).
fn value_bytes(data_type: &DataType) -> u64 {
    match data_type {
        DataType::Boolean | DataType::Int8 | DataType::UInt8 => 1,
        DataType::Int16 | DataType::UInt16 => 2,
        DataType::Int32 | DataType::UInt32 | DataType::Float32 | DataType::Date32 => 4,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary => UTF8_VALUE_BYTES,
        _ => 8,
    }
}
