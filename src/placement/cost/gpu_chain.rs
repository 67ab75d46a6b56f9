//! A GPU chain's price per call: what one fused program costs per
//! coalesced batch, from the calibration's measurements (the model is
//! described in the placement module's documentation).

use std::collections::{BTreeMap, BTreeSet};

use crate::job::{Expr, LogicalPlan, OperatorKind};
use crate::kernels::chain::Download;
use crate::placement::calibration::{ChainRate, GpuCalibration};

use super::{KernelFamily, RowEstimate, value_bytes};

/// Default of `taskmanager.gpu.coalesce-bytes`: input column bytes per
/// device batch. Big enough that a batch's launches and synchronisation are
/// small beside its copies, small enough that two or three batches in
/// flight fit beside the operators' state on any GPU of the last decade.
pub const COALESCE_BYTES_DEFAULT: u64 = 32 << 20;
/// Kernels of one coalesced batch of a fused chain that filters: count the
/// survivors, scan the block counts, write them in order
/// (`kernels::chain::cuda_src`); a chain without a filter runs the write
/// alone. Memsets are launches too: the fault word, each device output's
/// validity words, and the filters' row counters (see
/// `kernels::chain::DeviceTraffic`, the executor's own plan).
pub const CHAIN_KERNELS: u64 = 3;
/// The key hash and the partition scatter, when the `key_by` after the
/// chain hashes and partitions on the GPU.
pub const GPU_KEY_HASH_KERNELS: u64 = 2;
/// One validity bit per value.
const VALIDITY_BYTES_PER_VALUE: f64 = 1.0 / 8.0;

/// What a GPU chain moves and computes, from the job file: the inputs of
/// [`gpu_chain_cost`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainShape {
    /// Rows into the chain's first operator.
    pub rows_in: f64,
    /// Rows out of its last (after every filter's selectivity).
    pub rows_out: f64,
    /// Value bytes per row of the input columns the chain references: the
    /// only ones copied to the device.
    pub input_value_bytes: u64,
    pub input_column_count: u32,
    /// Value bytes per selected row of the output columns that live on the
    /// device (computed, or referenced input columns compacted there).
    pub output_value_bytes: u64,
    pub output_column_count: u32,
    /// Value bytes per selected row of the output columns that never went
    /// to the device: the host gathers them with the selection bitmap,
    /// which then comes back too.
    pub output_host_value_bytes: u64,
    pub output_host_column_count: u32,
    /// The chain's operators' kernel families, for the fallback rate.
    pub families: Vec<KernelFamily>,
    /// The `key_by` after the chain hashes and partitions on the GPU.
    pub gpu_key_hash: bool,
}

impl ChainShape {
    fn input_row_bytes(&self) -> f64 {
        self.input_value_bytes as f64
            + f64::from(self.input_column_count) * VALIDITY_BYTES_PER_VALUE
    }

    fn output_row_bytes(&self) -> f64 {
        self.output_value_bytes as f64
            + f64::from(self.output_column_count) * VALIDITY_BYTES_PER_VALUE
    }

    fn output_host_row_bytes(&self) -> f64 {
        self.output_host_value_bytes as f64
            + f64::from(self.output_host_column_count) * VALIDITY_BYTES_PER_VALUE
    }
}

/// Where the chain's fused program got its compute rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeRateSource {
    /// The calibration's chain rates, interpolated at the batch's size.
    #[default]
    MeasuredChain,
    /// No chain rate measured: each operator's family rate, one after the
    /// other (a fused program is no slower than its parts run apart).
    FamilyRates,
}

/// A GPU chain's estimated seconds, part by part; totals over the job.
///
/// Copies of one batch overlap the compute of the next (two or three
/// streams), so the steady state of a batch is its slowest stage plus the
/// launches and the synchronisation, which the host pays in series. The
/// first batch also fills the pipeline: its copy in and copy out are not
/// hidden behind anything. `total_s = batches × (max(h2d, compute, d2h)
/// per batch + fixed per batch) + fill_s`, which is at most one stage
/// above the exact pipeline time: it errs towards the CPU.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChainCostBreakdown {
    /// Coalesced device batches: ⌈input bytes ÷ coalesce bytes⌉.
    pub batches: u64,
    /// Rows of one batch (all batches taken as equal).
    pub rows_per_batch: f64,
    /// Bytes copied to the device, all batches.
    pub h2d_bytes: f64,
    /// Bytes copied back, all batches.
    pub d2h_bytes: f64,
    pub launches: u64,
    pub syncs: u64,
    /// Host copy into the pinned staging ring plus the pinned DMA, all
    /// batches.
    pub h2d_s: f64,
    pub compute_s: f64,
    /// Pinned DMA back, the host copy out of staging and the host gather
    /// of output columns that never went to the device, all batches.
    pub d2h_s: f64,
    /// Launch and synchronisation latencies, all batches.
    pub fixed_s: f64,
    /// The first batch's copy in and copy out, which nothing hides.
    pub fill_s: f64,
    pub total_s: f64,
    /// Input bytes per second the compute was priced at.
    pub compute_bytes_per_s: f64,
    pub compute_rate_source: ComputeRateSource,
}

/// Prices one GPU chain per coalesced batch (see [`ChainCostBreakdown`]).
pub fn gpu_chain_cost(
    shape: &ChainShape,
    gpu: &GpuCalibration,
    coalesce_bytes: u64,
) -> ChainCostBreakdown {
    if shape.rows_in <= 0.0 {
        return ChainCostBreakdown::default();
    }
    let input_bytes = shape.rows_in * shape.input_row_bytes();
    // Batches follow the chain's input, not its output: the chain
    // coalesces what it is fed, whatever its filters later drop.
    let batches = (input_bytes / coalesce_bytes.max(1) as f64).ceil().max(1.0);
    let rows_per_batch = shape.rows_in / batches;
    let h2d_batch_bytes = rows_per_batch * shape.input_row_bytes();
    let selected_rows_per_batch = shape.rows_out / batches;
    let filters = shape.families.contains(&KernelFamily::Filter);
    // Host columns are gathered by the survivors' 32-bit row numbers.
    let id_bytes = if shape.output_host_column_count > 0 {
        4.0
    } else {
        0.0
    };
    let download_row_bytes = shape.output_row_bytes() + id_bytes;
    // The executor's choice (`kernels::chain::download_plan`): the rows it
    // expects to keep, with a margin, behind the kernels and one wait; or,
    // when that margin costs more than a wait, the count first and exactly
    // the survivors after a second wait.
    // Without a filter every row comes back (an aggregation table: its
    // groups), with one wait.
    let (downloaded_rows_per_batch, syncs_per_batch) = if filters && rows_per_batch > 0.0 {
        match crate::kernels::chain::download_plan(
            rows_per_batch.ceil() as u64,
            Some(selected_rows_per_batch / rows_per_batch),
            download_row_bytes,
            filters,
        ) {
            Download::Predicted(rows) => ((rows as f64).min(rows_per_batch), 1),
            Download::Counted => (selected_rows_per_batch, 2),
        }
    } else {
        (selected_rows_per_batch, 1)
    };
    let d2h_batch_bytes = downloaded_rows_per_batch * download_row_bytes;
    let gather_batch_bytes = selected_rows_per_batch * shape.output_host_row_bytes();
    let h2d_batch_s =
        h2d_batch_bytes / gpu.host_copy_bytes_per_s + h2d_batch_bytes / gpu.h2d_pinned_bytes_per_s;
    let d2h_batch_s = d2h_batch_bytes / gpu.d2h_pinned_bytes_per_s
        + (d2h_batch_bytes + gather_batch_bytes) / gpu.host_copy_bytes_per_s;
    let aggregates = shape.families.contains(&KernelFamily::Aggregate);
    // The measured chain rates are the fused filter/project program's; a
    // device aggregation table is priced by its own kernel's rate.
    let chain_rate = if aggregates {
        None
    } else {
        chain_rate_at(&gpu.chain_rates, h2d_batch_bytes)
    };
    let (chain_s, compute_rate_source) = match chain_rate {
        Some(rate) => (h2d_batch_bytes / rate, ComputeRateSource::MeasuredChain),
        None => (
            shape
                .families
                .iter()
                .map(|family| rows_per_batch / family.rate(&gpu.rates))
                .sum(),
            ComputeRateSource::FamilyRates,
        ),
    };
    let hash_s = if shape.gpu_key_hash {
        rows_per_batch / KernelFamily::Hash.rate(&gpu.rates)
    } else {
        0.0
    };
    let compute_batch_s = chain_s + hash_s;
    // An aggregation table batch is one upsert kernel and one wait (for the
    // group count); a chain batch its kernels and memsets.
    let kernels = if filters { CHAIN_KERNELS } else { 1 };
    let memsets = if aggregates {
        0
    } else {
        1 + u64::from(shape.output_column_count) + u64::from(filters)
    };
    let hash_kernels = if shape.gpu_key_hash {
        GPU_KEY_HASH_KERNELS
    } else {
        0
    };
    let launches_per_batch = kernels + memsets + hash_kernels;
    let fixed_batch_s = launches_per_batch as f64 * gpu.launch_latency_s
        + syncs_per_batch as f64 * gpu.sync_latency_s;
    let steady_batch_s = h2d_batch_s.max(compute_batch_s).max(d2h_batch_s) + fixed_batch_s;
    let fill_s = h2d_batch_s + d2h_batch_s;
    let batch_count = batches as u64;
    ChainCostBreakdown {
        batches: batch_count,
        rows_per_batch,
        h2d_bytes: h2d_batch_bytes * batches,
        d2h_bytes: d2h_batch_bytes * batches,
        launches: launches_per_batch * batch_count,
        syncs: syncs_per_batch * batch_count,
        h2d_s: h2d_batch_s * batches,
        compute_s: compute_batch_s * batches,
        d2h_s: d2h_batch_s * batches,
        fixed_s: fixed_batch_s * batches,
        fill_s,
        total_s: steady_batch_s * batches + fill_s,
        compute_bytes_per_s: if compute_batch_s > 0.0 {
            h2d_batch_bytes / compute_batch_s
        } else {
            0.0
        },
        compute_rate_source,
    }
}

/// The measured chain rate at `bytes` per batch: linear in log₂ of the
/// size between the two nearest measured sizes, the nearest one's rate
/// outside them; `None` when nothing was measured.
pub fn chain_rate_at(rates: &[ChainRate], bytes: f64) -> Option<f64> {
    let below = rates
        .iter()
        .filter(|r| r.coalesced_bytes as f64 <= bytes)
        .max_by_key(|r| r.coalesced_bytes);
    let above = rates
        .iter()
        .filter(|r| r.coalesced_bytes as f64 >= bytes)
        .min_by_key(|r| r.coalesced_bytes);
    match (below, above) {
        (Some(low), Some(high)) if low.coalesced_bytes < high.coalesced_bytes => {
            let (low_log, high_log) = (
                (low.coalesced_bytes as f64).log2(),
                (high.coalesced_bytes as f64).log2(),
            );
            let t = (bytes.log2() - low_log) / (high_log - low_log);
            Some(low.input_bytes_per_s + t * (high.input_bytes_per_s - low.input_bytes_per_s))
        }
        (Some(one), _) | (None, Some(one)) => Some(one.input_bytes_per_s),
        (None, None) => None,
    }
}

/// Where a column of the chain's current schema lives.
#[derive(Clone, Debug)]
enum Residence {
    /// On the host as input column `input_column`, not copied (yet).
    Host {
        input_column: String,
    },
    Device,
}

/// A reference to `name` by a kernel: its input column is copied to the
/// device, once.
fn reference(
    name: &str,
    residence: &mut BTreeMap<String, Residence>,
    uploaded: &mut BTreeSet<String>,
) {
    if let Some(Residence::Host { input_column }) = residence.get(name) {
        uploaded.insert(input_column.clone());
        residence.insert(name.to_owned(), Residence::Device);
    }
}

/// The shape of the GPU chain `chain` (consecutive operators of `plan`):
/// which input columns it copies in, which output columns it copies back.
pub fn chain_shape(
    plan: &LogicalPlan,
    chain: &[usize],
    rows: &[RowEstimate],
    families: Vec<KernelFamily>,
    gpu_key_hash: bool,
) -> ChainShape {
    let ops = &plan.spec.operators;
    let (head, tail) = (chain[0], chain[chain.len() - 1]);
    let head_input = ops[head]
        .input
        .expect("GPU-capable operators have an input");
    let input_schema = &plan.schemas[head_input];
    let mut residence: BTreeMap<String, Residence> = input_schema
        .fields()
        .iter()
        .map(|f| {
            let input_column = f.name().clone();
            (input_column.clone(), Residence::Host { input_column })
        })
        .collect();
    let mut uploaded: BTreeSet<String> = BTreeSet::new();
    for &index in chain {
        match &ops[index].kind {
            OperatorKind::Filter { predicate } => {
                for name in predicate.columns() {
                    reference(name, &mut residence, &mut uploaded);
                }
            }
            OperatorKind::Aggregate { aggs } => {
                // The key and the aggregated columns go up; the groups come
                // back when the device table drains.
                let input = ops[index].input.expect("aggregates have an input");
                let key_names: Vec<String> = plan.keyed[input]
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .map(|&k| plan.schemas[input].field(k).name().clone())
                    .collect();
                for name in key_names
                    .iter()
                    .chain(aggs.iter().filter_map(|a| a.column.as_ref()))
                {
                    reference(name, &mut residence, &mut uploaded);
                }
            }
            OperatorKind::Project { columns } => {
                // A bare column is renamed where it lives; an expression
                // is computed on the device from its operands there.
                for column in columns
                    .iter()
                    .filter(|c| !matches!(c.expr, Expr::Column(_)))
                {
                    for name in column.expr.columns() {
                        reference(name, &mut residence, &mut uploaded);
                    }
                }
                residence = columns
                    .iter()
                    .map(|column| {
                        let lives = match &column.expr {
                            Expr::Column(name) => {
                                residence.get(name).cloned().unwrap_or(Residence::Device)
                            }
                            _ => Residence::Device,
                        };
                        (column.name.clone(), lives)
                    })
                    .collect();
            }
            _ => {}
        }
    }
    let uploaded_fields = input_schema
        .fields()
        .iter()
        .filter(|f| uploaded.contains(f.name()));
    let (mut output_value_bytes, mut output_column_count) = (0, 0);
    let (mut output_host_value_bytes, mut output_host_column_count) = (0, 0);
    for field in plan.schemas[tail].fields() {
        match residence.get(field.name()) {
            Some(Residence::Host { .. }) => {
                output_host_value_bytes += value_bytes(field.data_type());
                output_host_column_count += 1;
            }
            _ => {
                output_value_bytes += value_bytes(field.data_type());
                output_column_count += 1;
            }
        }
    }
    ChainShape {
        rows_in: rows[head].rows_in,
        rows_out: rows[tail].rows_out,
        input_value_bytes: uploaded_fields
            .clone()
            .map(|f| value_bytes(f.data_type()))
            .sum(),
        input_column_count: uploaded_fields.count() as u32,
        output_value_bytes,
        output_column_count,
        output_host_value_bytes,
        output_host_column_count,
        families,
        gpu_key_hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::calibration::KernelRates;
    use crate::placement::cost::{FILTER_SELECTIVITY, estimate_rows};

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{actual} != {expected}"
        );
    }

    /// Round figures: a batch of 1,040,000 bytes takes 0.5 ms to copy on
    /// the host and 1 ms (H2D) or 0.5 ms (D2H) of DMA.
    fn gpu() -> GpuCalibration {
        GpuCalibration {
            device: "test".into(),
            memory_bytes: 1 << 30,
            rates: KernelRates {
                filter_rows_per_s: 2.56e9,
                project_rows_per_s: 1.28e9,
                hash_rows_per_s: 1.28e9,
                aggregate_rows_per_s: 1e9,
            },
            launch_latency_s: 2e-6,
            sync_latency_s: 4e-6,
            h2d_pinned_bytes_per_s: 1.04e9,
            h2d_pageable_bytes_per_s: 0.5e9,
            d2h_pinned_bytes_per_s: 2.08e9,
            d2h_pageable_bytes_per_s: 0.5e9,
            host_copy_bytes_per_s: 2.08e9,
            chain_rates: vec![
                ChainRate {
                    coalesced_bytes: 2_080_000,
                    input_bytes_per_s: 12e8,
                },
                ChainRate {
                    coalesced_bytes: 520_000,
                    input_bytes_per_s: 4e8,
                },
            ],
        }
    }

    /// 896,000 rows of one Int64 column (8.125 bytes a row with its
    /// validity bit) = 7,280,000 bytes: 7 batches of 1,100,000 bytes at
    /// most, so 128,000 rows and 1,040,000 bytes each; half the rows come
    /// back with two columns, 1,040,000 bytes a batch as well.
    fn shape() -> ChainShape {
        ChainShape {
            rows_in: 896_000.0,
            rows_out: 448_000.0,
            input_value_bytes: 8,
            input_column_count: 1,
            output_value_bytes: 16,
            output_column_count: 2,
            output_host_value_bytes: 0,
            output_host_column_count: 0,
            families: vec![KernelFamily::Filter],
            gpu_key_hash: false,
        }
    }

    const COALESCE_BYTES: u64 = 1_100_000;

    #[test]
    fn a_chain_is_priced_per_coalesced_batch_with_copies_overlapping_compute() {
        let cost = gpu_chain_cost(&shape(), &gpu(), COALESCE_BYTES);
        assert_eq!(cost.batches, 7);
        assert_close(cost.rows_per_batch, 128_000.0);
        assert_close(cost.h2d_bytes, 7_280_000.0);
        assert_close(cost.d2h_bytes, 7_280_000.0);
        // A batch: 3 kernels and 4 memsets (fault word, two validity
        // bitmaps, the filter's row counter); two waits: the count, then
        // exactly the survivors (a predicted download's margin, 17,024 rows
        // of 16.25 bytes, would cost more than the second wait).
        assert_eq!((cost.launches, cost.syncs), (49, 14));
        // Per batch: h2d 0.5 ms host copy + 1 ms DMA; d2h 0.5 + 0.5 ms;
        // compute 1,040,000 B at 8e8 B/s (halfway, in log₂ of the size,
        // between 520,000 B at 4e8 and 2,080,000 B at 12e8) = 1.3 ms.
        assert_close(cost.h2d_s, 7.0 * 1.5e-3);
        assert_close(cost.d2h_s, 7.0 * 1.0e-3);
        assert_close(cost.compute_s, 7.0 * 1.3e-3);
        assert_close(cost.compute_bytes_per_s, 8e8);
        assert_eq!(cost.compute_rate_source, ComputeRateSource::MeasuredChain);
        // 7 launches × 2 µs + two 4 µs waits a batch.
        assert_close(cost.fixed_s, 7.0 * 22e-6);
        assert_close(cost.fill_s, 2.5e-3);
        // 7 × (max(1.5, 1.3, 1.0) ms + 22 µs) + 2.5 ms fill.
        assert_close(cost.total_s, 7.0 * 1.522e-3 + 2.5e-3);
    }

    #[test]
    fn without_a_chain_rate_compute_is_the_families_in_series_and_a_gpu_key_hash_adds_two_launches()
    {
        let mut gpu = gpu();
        gpu.chain_rates.clear();
        let shape = ChainShape {
            families: vec![KernelFamily::Project, KernelFamily::Filter],
            gpu_key_hash: true,
            ..shape()
        };
        let cost = gpu_chain_cost(&shape, &gpu, COALESCE_BYTES);
        // 128,000 rows ÷ 1.28e9 (project) + ÷ 2.56e9 (filter) + ÷ 1.28e9
        // (hash) = 0.25 ms a batch.
        assert_close(cost.compute_s, 7.0 * 0.25e-3);
        assert_eq!(cost.compute_rate_source, ComputeRateSource::FamilyRates);
        // 9 launches a batch: two more kernels than `shape()`'s 7.
        assert_eq!(cost.launches, 63);
        assert_close(cost.fixed_s, 7.0 * 26e-6);
        assert_close(cost.total_s, 7.0 * (1.5e-3 + 26e-6) + 2.5e-3);
    }

    #[test]
    fn batches_follow_the_chain_input_not_what_its_filters_keep() {
        let kept_all = gpu_chain_cost(&shape(), &gpu(), COALESCE_BYTES);
        let kept_few = gpu_chain_cost(
            &ChainShape {
                rows_out: 4_480.0,
                ..shape()
            },
            &gpu(),
            COALESCE_BYTES,
        );
        assert_eq!(kept_few.batches, kept_all.batches);
        assert_eq!(kept_few.launches, kept_all.launches);
        assert_close(kept_few.h2d_s, kept_all.h2d_s);
        // 640 rows kept a batch: 1.25 × 640 + 1,024 = 1,824 rows come down
        // behind the kernels with one wait (a margin of 19 KB).
        assert_close(kept_few.d2h_bytes, 7.0 * 1_824.0 * 16.25);
        assert_eq!((kept_few.syncs, kept_all.syncs), (7, 14));
    }

    #[test]
    fn a_download_is_predicted_while_its_margin_costs_less_than_a_wait() {
        use crate::kernels::chain::{Download, download_plan};
        // No filter: every row, one wait.
        assert_eq!(
            download_plan(1000, Some(0.1), 100.0, false),
            Download::Predicted(1000)
        );
        // Every row kept so far: every row, no margin.
        assert_eq!(
            download_plan(1_000_000, Some(1.0), 32.5, true),
            Download::Predicted(1_000_000)
        );
        // 1% of 1M rows of 32.5 B: 13,524 rows for 10,000 expected, 115 KB.
        assert_eq!(
            download_plan(1_000_000, Some(0.01), 32.5, true),
            Download::Predicted(13_524)
        );
        // Half of 1M rows: a margin of 126,024 rows (4 MB) — count first.
        assert_eq!(
            download_plan(1_000_000, Some(0.5), 32.5, true),
            Download::Counted
        );
        // Nothing known yet: a small batch comes back whole, a large one
        // is counted first.
        assert_eq!(
            download_plan(8_000, None, 32.5, true),
            Download::Predicted(8_000)
        );
        assert_eq!(
            download_plan(1_000_000, None, 32.5, true),
            Download::Counted
        );
    }

    #[test]
    fn host_resident_output_columns_bring_the_row_numbers_back_and_are_gathered_on_the_host() {
        let shape = ChainShape {
            output_value_bytes: 8,
            output_column_count: 1,
            output_host_value_bytes: 8,
            output_host_column_count: 1,
            ..shape()
        };
        let cost = gpu_chain_cost(&shape, &gpu(), COALESCE_BYTES);
        // Per batch: the predicted 81,024 rows × 8.125 B and their 4-byte
        // row numbers come back (a margin of 17,024 × 12.125 B = 206 KB,
        // cheaper than a second wait); the 64,000 selected rows × 8.125 B
        // more are gathered on the host.
        let back = 81_024.0 * 8.125 + 81_024.0 * 4.0;
        assert_close(cost.d2h_bytes, 7.0 * back);
        let gathered = 64_000.0 * 8.125;
        assert_close(
            cost.d2h_s,
            7.0 * (back / 2.08e9 + (back + gathered) / 2.08e9),
        );
    }

    #[test]
    fn chain_rates_clamp_outside_the_measured_sizes() {
        let rates = gpu().chain_rates;
        assert_eq!(chain_rate_at(&rates, 1.0), Some(4e8));
        assert_eq!(chain_rate_at(&rates, 520_000.0), Some(4e8));
        assert_eq!(chain_rate_at(&rates, 1e12), Some(12e8));
        assert_eq!(chain_rate_at(&[], 1e6), None);
    }

    #[test]
    fn an_empty_chain_input_costs_nothing() {
        let shape = ChainShape {
            rows_in: 0.0,
            rows_out: 0.0,
            ..shape()
        };
        let cost = gpu_chain_cost(&shape, &gpu(), COALESCE_BYTES);
        assert_eq!(cost, ChainCostBreakdown::default());
    }

    fn plan(text: &str) -> LogicalPlan {
        crate::job::parse_job(text, std::path::Path::new("test.toml"))
            .and_then(crate::job::plan)
            .unwrap()
    }

    #[test]
    fn a_chain_copies_in_the_columns_it_references_and_back_what_lives_on_the_device() {
        let plan = plan(
            r#"[job]
name = "t"
[[operator]]
name = "events"
type = "datagen"
rows = 1000
columns = ["key", "value", "price"]
[[operator]]
name = "scaled"
type = "project"
columns = ["key", "price", "value * 3 as tripled"]
[[operator]]
name = "large"
type = "filter"
predicate = "tripled > 300 and key != 0"
[[operator]]
name = "out"
type = "blackhole"
"#,
        );
        let rows = estimate_rows(&plan);
        let shape = chain_shape(&plan, &[1, 2], &rows, vec![], false);
        // `value` (the expression) and `key` (the filter) go to the
        // device; `price` is passed through on the host and gathered.
        assert_eq!((shape.input_column_count, shape.input_value_bytes), (2, 16));
        assert_eq!(
            (shape.output_column_count, shape.output_value_bytes),
            (2, 16)
        );
        assert_eq!(
            (
                shape.output_host_column_count,
                shape.output_host_value_bytes
            ),
            (1, 8)
        );
        assert_eq!(shape.rows_in, 1000.0);
        assert_eq!(shape.rows_out, 1000.0 * FILTER_SELECTIVITY);
    }
}
