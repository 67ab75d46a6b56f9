//! GPU (when one is detected): host↔device copies, pinned and pageable,
//! against the host's own copy into pinned memory at the same size; the
//! device's own copy bandwidth; launch and synchronisation latency; each
//! kernel family at several batch sizes against its CPU twin on the same
//! batches; the fused chain at several coalesced sizes against the pinned
//! H2D copy of the same bytes (whether the kernels keep up with the link).
//!
//! Without a GPU this is one skipped line that says why. The CUDA driver
//! is loaded at run time (`cudarc`'s dynamic loading), so this compiles and
//! runs everywhere.

use super::calibrate::{CHAIN_SIZES_BYTES, backend_rates, input_batches, measure_chain_rates};
use super::report::{Figure, Size, Unit};
use super::{BenchError, CalibrateOptions, Recorder, Section};
use crate::kernels::backend::CpuBackend;
use crate::kernels::gpu::cuda::measure::{TransferPoint, measure_call_costs, measure_device_copy};
use crate::kernels::gpu::{self, GpuDetection, GpuDevice};
use crate::placement::calibration::KernelRates;

pub fn run(recorder: &mut Recorder<'_>) -> Result<(), BenchError> {
    recorder.step("gpu: detecting");
    let device = match gpu::detect() {
        GpuDetection::Absent { reason } => {
            recorder.skip(Section::Gpu, "gpu", format!("no GPU ({reason})"));
            return Ok(());
        }
        GpuDetection::Present(devices) if devices[0].simulated => {
            recorder.skip(
                Section::Gpu,
                "gpu",
                "simulated GPU (STRATA_SIMULATE_GPU_BYTES): it runs the CPU twins, nothing to time",
            );
            return Ok(());
        }
        GpuDetection::Present(devices) => devices[0].clone(),
    };
    recorder.step("gpu: copies and latencies");
    let transfers = match measure_call_costs(&device) {
        Ok(costs) => {
            recorder.figure(Figure::new(
                Section::Gpu,
                "launch latency",
                costs.launch_latency_s,
                Unit::Seconds,
            ));
            recorder.figure(Figure::new(
                Section::Gpu,
                "sync latency",
                costs.sync_latency_s,
                Unit::Seconds,
            ));
            for point in &costs.transfers {
                record_transfer(recorder, point);
            }
            costs.transfers
        }
        Err(e) => {
            recorder.skip(Section::Gpu, "copies and latencies", e.to_string());
            Vec::new()
        }
    };
    recorder.step("gpu: device copies");
    match measure_device_copy(&device) {
        Ok(points) => {
            for (bytes, rate) in points {
                let mut figure = Figure::new(Section::Gpu, "device copy", rate, Unit::BytesPerS)
                    .at(Size::Bytes(bytes as u64))
                    .plotted("gpu-copies");
                if let Some(host) = transfers.iter().find(|p| p.bytes == bytes) {
                    figure = figure.against(
                        "host copy into pinned",
                        host.host_copy_bytes_per_s,
                        Unit::BytesPerS,
                    );
                }
                recorder.figure(figure);
            }
        }
        Err(e) => recorder.skip(Section::Gpu, "device copy", e.to_string()),
    }
    kernels(recorder, &device)?;
    recorder.step("gpu: fused chain");
    let options = CalibrateOptions {
        rows: recorder.plan.cpu_rows,
        repetitions: recorder.plan.repetitions,
    };
    match measure_chain_rates(&device, options) {
        Ok(rates) => {
            for rate in rates {
                let mut figure = Figure::new(
                    Section::Gpu,
                    "fused chain (input)",
                    rate.input_bytes_per_s,
                    Unit::BytesPerS,
                )
                .at(Size::Bytes(rate.coalesced_bytes))
                .plotted("gpu-chain");
                let nearest = transfers
                    .iter()
                    .min_by_key(|p| (p.bytes as u64).abs_diff(rate.coalesced_bytes));
                if let Some(point) = nearest {
                    figure = figure.against(
                        format!("H2D pinned at {}", Size::Bytes(point.bytes as u64)),
                        point.h2d_pinned_bytes_per_s,
                        Unit::BytesPerS,
                    );
                }
                recorder.figure(figure);
            }
        }
        Err(e) => recorder.skip(
            Section::Gpu,
            "fused chain",
            format!("{e} (sizes {CHAIN_SIZES_BYTES:?})"),
        ),
    }
    Ok(())
}

fn record_transfer(recorder: &mut Recorder<'_>, point: &TransferPoint) {
    let size = Size::Bytes(point.bytes as u64);
    for (name, rate) in [
        ("H2D pinned", point.h2d_pinned_bytes_per_s),
        ("H2D pageable", point.h2d_pageable_bytes_per_s),
        ("D2H pinned", point.d2h_pinned_bytes_per_s),
        ("D2H pageable", point.d2h_pageable_bytes_per_s),
    ] {
        recorder.figure(
            Figure::new(Section::Gpu, name, rate, Unit::BytesPerS)
                .at(size)
                .plotted("gpu-copies")
                .against(
                    "host copy into pinned",
                    point.host_copy_bytes_per_s,
                    Unit::BytesPerS,
                ),
        );
    }
}

/// Each kernel family on the device (copies included, as the executor
/// pays them) against its CPU twin, at each batch size.
fn kernels(recorder: &mut Recorder<'_>, device: &GpuDevice) -> Result<(), BenchError> {
    use crate::kernels::gpu::cuda::CudaBackend;
    use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
    use crate::kernels::gpu::source::PtxCache;

    let plan = recorder.plan;
    let options = CalibrateOptions {
        rows: plan.cpu_rows,
        repetitions: plan.repetitions,
    };
    let pool = DevicePool::new(PoolConfig::even(device.memory_bytes / 2, 1))?;
    let backend = match CudaBackend::new(
        device,
        pool.slot(0),
        &PtxCache::new(PtxCache::default_dir()),
    ) {
        Ok(backend) => backend,
        Err(e) => {
            recorder.skip(Section::Gpu, "kernels", e.to_string());
            return Ok(());
        }
    };
    for &batch_rows in &plan.batch_rows {
        recorder.step(&format!("gpu: kernels, batches of {batch_rows} rows"));
        let pairs = input_batches(plan.cpu_rows, batch_rows);
        let cpu = backend_rates(&CpuBackend, options, &pairs)?;
        let device_rates = backend_rates(&backend, options, &pairs)?;
        let families = |r: &KernelRates| {
            [
                ("kernel filter", r.filter_rows_per_s),
                ("kernel project", r.project_rows_per_s),
                ("kernel hash", r.hash_rows_per_s),
                ("kernel aggregate", r.aggregate_rows_per_s),
            ]
        };
        for ((name, rate), (_, twin)) in families(&device_rates).into_iter().zip(families(&cpu)) {
            recorder.figure(
                Figure::new(Section::Gpu, name, rate, Unit::RowsPerS)
                    .at(Size::Rows(batch_rows as u64))
                    .plotted("gpu-kernels")
                    .against("CPU twin, same batches", twin, Unit::RowsPerS),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Plan;

    #[test]
    fn without_a_gpu_the_section_is_one_skipped_line_saying_why() {
        if !matches!(gpu::detect(), GpuDetection::Absent { .. }) {
            return; // a machine with a GPU measures it instead
        }
        let plan = Plan::new(true, 1.0 / 64.0);
        let progress = indicatif::ProgressBar::hidden();
        let mut recorder = Recorder::new(&plan, &progress);
        run(&mut recorder).unwrap();
        let (figures, skipped) = recorder.into_parts();
        assert!(figures.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.starts_with("no GPU ("), "{skipped:?}");
    }
}
