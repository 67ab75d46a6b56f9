//! `strata bench --calibrate`: measures the kernel rates the placement cost
//! model divides by, on this machine.
//!
//! The CPU twins run on generated Int64 columns of [`CalibrateOptions::rows`]
//! rows in batches of 8192 (the job files' batch size), single-threaded, and
//! the best of [`CalibrateOptions::repetitions`] runs counts. When a GPU is
//! detected, the CUDA kernels run on the same input through
//! [`crate::kernels::gpu::cuda::CudaBackend`] (copies included in the kernel
//! time), and [`crate::kernels::gpu::cuda::measure`] times the per-call
//! costs the placement model prices: launch and synchronisation latency,
//! pinned and pageable copies both ways, the host copy into pinned memory.
//! Without a GPU the calibration has no GPU section, and says why.

use std::time::Instant;

use arrow_array::Int64Array;

use crate::kernels::backend::{CpuBackend, KernelBackend, KernelError};
use crate::kernels::cpu::aggregate::KeyedArrays;
use crate::kernels::cpu::filter::CmpOp;
use crate::kernels::cpu::key_hash::HashMode;
use crate::kernels::cpu::project::{ArithOp, ArrayOperand, Operands};
use crate::kernels::gpu::{self, GpuDetection};
use crate::placement::calibration::{Calibration, GpuCalibration, KernelRates};
use crate::placement::cost::COALESCE_BYTES_DEFAULT;

use super::BenchError;

/// Rows per batch, as the sources make them.
pub(super) const BATCH_ROWS: usize = 8192;
/// Distinct keys of the aggregation input.
const AGGREGATE_KEYS: i64 = 100_000;

#[derive(Clone, Copy, Debug)]
pub struct CalibrateOptions {
    pub rows: usize,
    pub repetitions: u32,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        CalibrateOptions {
            rows: 4 << 20,
            repetitions: 3,
        }
    }
}

/// Deterministic input: values spread over ±2^40, keys over
/// [`AGGREGATE_KEYS`] (a multiplicative hash of the row, no RNG needed).
pub(super) fn input_batches(rows: usize, batch_rows: usize) -> Vec<(Int64Array, Int64Array)> {
    (0..rows)
        .step_by(batch_rows.max(1))
        .map(|start| {
            let end = (start + batch_rows.max(1)).min(rows);
            let mix = |row: usize| (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let values = (start..end).map(|r| (mix(r) >> 24) as i64 - (1 << 39));
            let keys = (start..end).map(|r| (mix(r) >> 40) as i64 % AGGREGATE_KEYS);
            (
                Int64Array::from_iter_values(keys),
                Int64Array::from_iter_values(values),
            )
        })
        .collect()
}

/// Rows per second of `run` over every batch, best of `repetitions`.
fn rate(
    options: CalibrateOptions,
    batches: &[(Int64Array, Int64Array)],
    mut run: impl FnMut(&Int64Array, &Int64Array) -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    let mut best_s = f64::INFINITY;
    for _ in 0..options.repetitions.max(1) {
        let started = Instant::now();
        for (keys, values) in batches {
            run(keys, values)?;
        }
        best_s = best_s.min(started.elapsed().as_secs_f64());
    }
    Ok(options.rows as f64 / best_s.max(1e-9))
}

/// The four kernel families' rates on `backend`.
pub(super) fn backend_rates(
    backend: &dyn KernelBackend,
    options: CalibrateOptions,
    batches: &[(Int64Array, Int64Array)],
) -> Result<KernelRates, BenchError> {
    let filter_rows_per_s = rate(options, batches, |_, values| {
        std::hint::black_box(backend.filter_i64(values, CmpOp::Ge, 0)?);
        Ok(())
    })?;
    let project_rows_per_s = rate(options, batches, |keys, values| {
        let operands = Operands {
            left: ArrayOperand::Array(values),
            right: ArrayOperand::Array(keys),
        };
        std::hint::black_box(backend.project_i64(ArithOp::Add, operands)?);
        Ok(())
    })?;
    let batch_rows_max = batches.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut hashes = vec![0u64; batch_rows_max];
    let hash_rows_per_s = rate(options, batches, |keys, _| {
        backend.hash_i64(keys, HashMode::Replace, &mut hashes[..keys.len()])?;
        std::hint::black_box(&hashes);
        Ok(())
    })?;
    // On the backend itself: the GPU's rate is its aggregation kernel's,
    // not the CPU twin's scaled by another kernel's speed-up.
    let aggregate_rows_per_s = rate(options, batches, |keys, values| {
        std::hint::black_box(backend.aggregate_i64(KeyedArrays { keys, values })?);
        Ok(())
    })?;
    Ok(KernelRates {
        filter_rows_per_s,
        project_rows_per_s,
        hash_rows_per_s,
        aggregate_rows_per_s,
    })
}

/// Measures this machine.
pub fn calibrate(options: CalibrateOptions) -> Result<Calibration, BenchError> {
    let batches = input_batches(options.rows, BATCH_ROWS);
    let cpu = backend_rates(&CpuBackend, options, &batches)?;
    let detection = gpu::detect();
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "this machine".into());
    let (gpu, gpu_note) = match &detection {
        // The simulator's device runs the CPU twins: there is no device to
        // time, so it keeps the defaults a detected GPU gets, and says so.
        GpuDetection::Present(devices) if devices[0].simulated => (
            Some(GpuCalibration::unmeasured(&devices[0])),
            "simulated GPU: its rates and per-call costs are the defaults, not measured".to_owned(),
        ),
        GpuDetection::Present(devices) => {
            let (gpu, note) = measure_gpu(&devices[0], options, &batches)?;
            (Some(gpu), note)
        }
        GpuDetection::Absent { .. } => (None, "GPU per-call costs not measured".to_owned()),
    };
    Ok(Calibration {
        origin: format!(
            "measured by `strata bench --calibrate` on {host}, {} rows, best of {}; {}; {gpu_note}",
            options.rows,
            options.repetitions,
            detection.describe()
        ),
        cpu,
        gpu,
    })
}

/// The CUDA kernels' rates and the per-call costs of the first GPU, with a
/// note for the origin saying whether the per-call costs were measured.
fn measure_gpu(
    device: &gpu::GpuDevice,
    options: CalibrateOptions,
    batches: &[(Int64Array, Int64Array)],
) -> Result<(GpuCalibration, String), BenchError> {
    use crate::kernels::gpu::cuda::CudaBackend;
    use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
    use crate::kernels::gpu::source::PtxCache;
    let pool = DevicePool::new(PoolConfig::even(device.memory_bytes / 2, 1))?;
    let backend = CudaBackend::new(
        device,
        pool.slot(0),
        &PtxCache::new(PtxCache::default_dir()),
    )?;
    let mut calibration = GpuCalibration::unmeasured(device);
    calibration.rates = backend_rates(&backend, options, batches)?;
    drop(backend);
    let note = match gpu::cuda::measure::measure_call_costs(device) {
        Ok(costs) => {
            apply_call_costs(&mut calibration, &costs);
            "GPU per-call costs measured (copies at the coalesced size)".to_owned()
        }
        Err(e) => {
            tracing::warn!("GPU per-call costs not measured, defaults kept: {e}");
            format!("GPU per-call costs not measured ({e}): defaults")
        }
    };
    calibration.chain_rates = match measure_chain_rates(device, options) {
        Ok(rates) => rates,
        Err(e) => {
            tracing::warn!("fused chain rates not measured, per-family rates kept: {e}");
            Vec::new()
        }
    };
    Ok((calibration, note))
}

/// Coalesced sizes the fused chain is timed at.
pub(super) const CHAIN_SIZES_BYTES: [u64; 4] = [1 << 20, 8 << 20, 32 << 20, 128 << 20];

/// The fused chain of `examples/gpu_pipeline.toml` (project `value * 3`,
/// `value + key`; filter on both), run by the CUDA backend's chain
/// executor on one coalesced batch of each size: its kernels' device time
/// (events around the launches; the copies are left out, since the cost
/// model prices them from the measured bandwidths), best of the
/// repetitions after a warm-up.
pub(super) fn measure_chain_rates(
    device: &gpu::GpuDevice,
    options: CalibrateOptions,
) -> Result<Vec<crate::placement::calibration::ChainRate>, BenchError> {
    use std::sync::Arc;

    use arrow_array::RecordBatch;
    use arrow_schema::{DataType, Field, Schema};

    use crate::job::{Expr, NamedExpr};
    use crate::kernels::chain::{ChainProgram, ChainStep};
    use crate::kernels::gpu::cuda::CudaBackend;
    use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
    use crate::kernels::gpu::source::PtxCache;

    let parse = |text: &str| Expr::parse(text).expect("the calibration chain parses");
    let input = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("value", DataType::Int64, false),
    ]));
    let named = |name: &str, text: &str| NamedExpr {
        name: name.to_owned(),
        expr: parse(text),
    };
    let columns = vec![
        named("key", "key"),
        named("tripled", "value * 3"),
        named("shifted", "value + key"),
    ];
    let output = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("tripled", DataType::Int64, false),
        Field::new("shifted", DataType::Int64, false),
    ]));
    let predicate = parse("tripled > 300 and shifted != 0");
    let steps = [
        ChainStep::Project {
            name: "scaled",
            columns: &columns,
        },
        ChainStep::Filter {
            name: "large",
            predicate: &predicate,
        },
    ];
    let program = ChainProgram::compile(&input, &steps, &output)
        .map_err(|reason| BenchError::Chain { reason })?;
    let pool = DevicePool::new(PoolConfig::even(device.memory_bytes / 2, 1))?;
    let cache = PtxCache::new(PtxCache::default_dir());
    let backend = CudaBackend::new(device, pool.slot(0), &cache)?;
    backend.profile_chains(true);
    let mut rates = Vec::new();
    for bytes in CHAIN_SIZES_BYTES {
        let rows = (bytes / 16) as i64;
        let key = Int64Array::from_iter_values((0..rows).map(|i| i % 1000));
        let value = Int64Array::from_iter_values((0..rows).map(|i| i % 2000 - 500));
        let batch = RecordBatch::try_new(Arc::clone(&input), vec![Arc::new(key), Arc::new(value)])
            .map_err(KernelError::from)?;
        let mut best = f64::INFINITY;
        for _ in 0..=options.repetitions.max(1) {
            backend.run_chain(&program, std::slice::from_ref(&batch))?;
            best = best.min(backend.last_chain_kernel_seconds());
        }
        let rate = bytes as f64 / best.max(1e-9);
        tracing::info!(
            "fused chain at {bytes} B: {:.1} GB/s of input on the device",
            rate / 1e9
        );
        rates.push(crate::placement::calibration::ChainRate {
            coalesced_bytes: bytes,
            input_bytes_per_s: rate,
        });
    }
    Ok(rates)
}

/// Takes the latencies, and the bandwidths at the size closest to the
/// default coalesced batch (the size the executor copies at); the other
/// sizes are logged.
fn apply_call_costs(calibration: &mut GpuCalibration, costs: &gpu::cuda::measure::CallCosts) {
    calibration.launch_latency_s = costs.launch_latency_s;
    calibration.sync_latency_s = costs.sync_latency_s;
    for point in &costs.transfers {
        tracing::info!(
            "GPU copies at {} B: H2D pinned {:.1} / pageable {:.1} GB/s, D2H pinned {:.1} / pageable {:.1} GB/s, host copy {:.1} GB/s",
            point.bytes,
            point.h2d_pinned_bytes_per_s / 1e9,
            point.h2d_pageable_bytes_per_s / 1e9,
            point.d2h_pinned_bytes_per_s / 1e9,
            point.d2h_pageable_bytes_per_s / 1e9,
            point.host_copy_bytes_per_s / 1e9
        );
    }
    let coalesced = costs
        .transfers
        .iter()
        .min_by_key(|p| (p.bytes as u64).abs_diff(COALESCE_BYTES_DEFAULT));
    if let Some(point) = coalesced {
        calibration.h2d_pinned_bytes_per_s = point.h2d_pinned_bytes_per_s;
        calibration.h2d_pageable_bytes_per_s = point.h2d_pageable_bytes_per_s;
        calibration.d2h_pinned_bytes_per_s = point.d2h_pinned_bytes_per_s;
        calibration.d2h_pageable_bytes_per_s = point.d2h_pageable_bytes_per_s;
        calibration.host_copy_bytes_per_s = point.host_copy_bytes_per_s;
    }
}

/// The rates as a table.
pub fn render(calibration: &Calibration) -> String {
    let row = |name: &str, rates: &KernelRates| {
        format!(
            "  {name:<4} filter {:>8.1}  project {:>8.1}  hash {:>8.1}  aggregate {:>8.1}  (M rows/s)\n",
            rates.filter_rows_per_s / 1e6,
            rates.project_rows_per_s / 1e6,
            rates.hash_rows_per_s / 1e6,
            rates.aggregate_rows_per_s / 1e6
        )
    };
    let mut out = format!("{}\n", calibration.origin);
    out.push_str(&row("CPU", &calibration.cpu));
    match &calibration.gpu {
        Some(gpu) => {
            out.push_str(&row("GPU", &gpu.rates));
            out.push_str(&format!(
                "  launch {:.1} µs, sync {:.1} µs; H2D pinned {:.1} / pageable {:.1} GB/s, \
                 D2H pinned {:.1} / pageable {:.1} GB/s, host copy {:.1} GB/s ({})\n",
                gpu.launch_latency_s * 1e6,
                gpu.sync_latency_s * 1e6,
                gpu.h2d_pinned_bytes_per_s / 1e9,
                gpu.h2d_pageable_bytes_per_s / 1e9,
                gpu.d2h_pinned_bytes_per_s / 1e9,
                gpu.d2h_pageable_bytes_per_s / 1e9,
                gpu.host_copy_bytes_per_s / 1e9,
                gpu.device
            ));
        }
        None => out.push_str("  GPU  none\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_of_the_cpu_twins_gives_positive_rates() {
        let calibration = calibrate(CalibrateOptions {
            rows: 20_000,
            repetitions: 1,
        })
        .unwrap();
        let cpu = calibration.cpu;
        for rate in [
            cpu.filter_rows_per_s,
            cpu.project_rows_per_s,
            cpu.hash_rows_per_s,
            cpu.aggregate_rows_per_s,
        ] {
            assert!(rate.is_finite() && rate > 0.0, "{cpu:?}");
        }
    }
}
