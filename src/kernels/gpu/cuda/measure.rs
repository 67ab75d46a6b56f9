//! The per-call costs of one GPU, measured for the placement cost model
//! (`strata bench --calibrate`): launch and synchronisation latency,
//! pinned and pageable copy bandwidth both ways, and the host copy into a
//! pinned staging buffer.
//!
//! Everything runs on a context and stream of its own, so no slot's budget
//! or stream is involved; the buffers are allocated once at the largest
//! size and freed when the measurement returns. Bandwidths are the best of
//! [`REPETITIONS`] timed copies (interference only ever makes a copy
//! slower); the launch latency is the mean over a burst of launches, which
//! is how a chain's launches arrive.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::{GpuDevice, GpuError, driver};

/// Sizes the copies are timed at.
pub const TRANSFER_SIZES_BYTES: [usize; 4] = [1 << 20, 8 << 20, 32 << 20, 128 << 20];
/// Timed copies per size and direction; the fastest counts.
const REPETITIONS: u32 = 3;
/// Launches per timed burst.
const LAUNCH_BURST: u32 = 1000;
/// Synchronisations timed; the median counts.
const SYNC_SAMPLES: usize = 101;

/// An empty kernel in PTX, which the driver JIT-compiles for any device
/// since sm_50: no NVRTC needed, so the latencies can be measured even
/// where the kernels' compiler is missing.
const EMPTY_KERNEL_PTX: &str = "\
.version 7.0
.target sm_50
.address_size 64

.visible .entry strata_empty()
{
    ret;
}
";

/// The copy bandwidths at one size, bytes per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransferPoint {
    pub bytes: usize,
    pub h2d_pinned_bytes_per_s: f64,
    pub h2d_pageable_bytes_per_s: f64,
    pub d2h_pinned_bytes_per_s: f64,
    pub d2h_pageable_bytes_per_s: f64,
    /// `memcpy` from a pageable buffer into pinned memory.
    pub host_copy_bytes_per_s: f64,
}

/// What [`measure_call_costs`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct CallCosts {
    pub launch_latency_s: f64,
    pub sync_latency_s: f64,
    /// One point per [`TRANSFER_SIZES_BYTES`] entry, in that order.
    pub transfers: Vec<TransferPoint>,
}

/// Measures `device`'s per-call costs. Never panics: a driver panic is
/// reported as [`GpuError::NoGpu`], as when a backend opens.
pub fn measure_call_costs(device: &GpuDevice) -> Result<CallCosts, GpuError> {
    catch_unwind(AssertUnwindSafe(|| measure(device))).map_err(|_| GpuError::NoGpu {
        reason: format!(
            "measuring GPU {} panicked in the CUDA driver",
            device.ordinal
        ),
    })?
}

/// Device-to-device copy bandwidth at each of [`TRANSFER_SIZES_BYTES`]
/// (`strata bench`'s GPU section): (bytes, bytes per second), the best of
/// [`REPETITIONS`] copies each. Never panics, as [`measure_call_costs`].
pub fn measure_device_copy(device: &GpuDevice) -> Result<Vec<(usize, f64)>, GpuError> {
    catch_unwind(AssertUnwindSafe(|| device_copy(device))).map_err(|_| GpuError::NoGpu {
        reason: format!(
            "measuring GPU {} device copies panicked in the CUDA driver",
            device.ordinal
        ),
    })?
}

fn device_copy(device: &GpuDevice) -> Result<Vec<(usize, f64)>, GpuError> {
    let context = CudaContext::new(device.ordinal as usize).map_err(driver("cuCtxCreate"))?;
    let stream = context.new_stream().map_err(driver("cuStreamCreate"))?;
    let largest = TRANSFER_SIZES_BYTES[TRANSFER_SIZES_BYTES.len() - 1];
    let source = stream
        .alloc_zeros::<u8>(largest)
        .map_err(driver("cuMemAlloc"))?;
    let mut target = stream
        .alloc_zeros::<u8>(largest)
        .map_err(driver("cuMemAlloc"))?;
    TRANSFER_SIZES_BYTES
        .iter()
        .map(|&bytes| {
            let source_view = source.slice(..bytes);
            let mut target_view = target.slice_mut(..bytes);
            let rate = best_rate(bytes, || {
                stream
                    .memcpy_dtod(&source_view, &mut target_view)
                    .map_err(driver("cuMemcpyDtoDAsync"))?;
                synchronize(&stream)
            })?;
            Ok((bytes, rate))
        })
        .collect()
}

fn measure(device: &GpuDevice) -> Result<CallCosts, GpuError> {
    let context = CudaContext::new(device.ordinal as usize).map_err(driver("cuCtxCreate"))?;
    let stream = context.new_stream().map_err(driver("cuStreamCreate"))?;
    let module = context
        .load_module(Ptx::from_src(EMPTY_KERNEL_PTX))
        .map_err(driver("cuModuleLoadData"))?;
    let empty = module
        .load_function("strata_empty")
        .map_err(driver("cuModuleGetFunction"))?;
    let launch_latency_s = launch_latency_s(&stream, &empty)?;
    let sync_latency_s = sync_latency_s(&stream, &empty)?;
    let transfers = transfers(&context, &stream)?;
    Ok(CallCosts {
        launch_latency_s,
        sync_latency_s,
        transfers,
    })
}

fn launch_empty(stream: &Arc<CudaStream>, empty: &CudaFunction) -> Result<(), GpuError> {
    let mut launch = stream.launch_builder(empty);
    // SAFETY: `strata_empty` takes no parameters and none are pushed; it
    // touches no memory, so nothing has to outlive the launch.
    unsafe { launch.launch(LaunchConfig::for_num_elems(1)) }.map_err(driver("cuLaunchKernel"))?;
    Ok(())
}

fn synchronize(stream: &CudaStream) -> Result<(), GpuError> {
    stream.synchronize().map_err(driver("cuStreamSynchronize"))
}

/// Seconds per launch of a burst of empty kernels, including the one
/// synchronisation that ends the burst; best of [`REPETITIONS`] bursts.
fn launch_latency_s(stream: &Arc<CudaStream>, empty: &CudaFunction) -> Result<f64, GpuError> {
    launch_empty(stream, empty)?;
    synchronize(stream)?;
    let mut best_s = f64::INFINITY;
    for _ in 0..REPETITIONS {
        let started = Instant::now();
        for _ in 0..LAUNCH_BURST {
            launch_empty(stream, empty)?;
        }
        synchronize(stream)?;
        best_s = best_s.min(started.elapsed().as_secs_f64() / f64::from(LAUNCH_BURST));
    }
    Ok(best_s)
}

/// The median time `cuStreamSynchronize` takes right after one empty
/// launch: the completion wait and wake-up a batch pays. The median, not
/// the best: the best catches the kernel already done, which a batch whose
/// sync follows real work never does.
fn sync_latency_s(stream: &Arc<CudaStream>, empty: &CudaFunction) -> Result<f64, GpuError> {
    let mut samples_s = Vec::with_capacity(SYNC_SAMPLES);
    for _ in 0..SYNC_SAMPLES {
        launch_empty(stream, empty)?;
        let started = Instant::now();
        synchronize(stream)?;
        samples_s.push(started.elapsed().as_secs_f64());
    }
    samples_s.sort_by(f64::total_cmp);
    Ok(samples_s[samples_s.len() / 2])
}

/// Bytes per second of the fastest of [`REPETITIONS`] runs of `copy`.
fn best_rate(
    bytes: usize,
    mut copy: impl FnMut() -> Result<(), GpuError>,
) -> Result<f64, GpuError> {
    let mut best_s = f64::INFINITY;
    for _ in 0..REPETITIONS {
        let started = Instant::now();
        copy()?;
        best_s = best_s.min(started.elapsed().as_secs_f64());
    }
    Ok(bytes as f64 / best_s.max(1e-12))
}

fn transfers(
    context: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
) -> Result<Vec<TransferPoint>, GpuError> {
    let largest = TRANSFER_SIZES_BYTES[TRANSFER_SIZES_BYTES.len() - 1];
    let mut pageable = vec![1u8; largest];
    // Plain page-locked memory, not write-combined (`alloc_pinned`'s
    // default): the staging ring is read by the host after D2H copies,
    // which write-combined memory makes slow.
    // SAFETY: `u8` has no invalid bit patterns and the buffer is filled
    // below before anything reads it.
    let mut pinned = unsafe { context.alloc_pinned_with_flags::<u8>(largest, 0) }
        .map_err(driver("cuMemHostAlloc"))?;
    pinned
        .as_mut_slice()
        .map_err(driver("cuEventSynchronize"))?
        .fill(1);
    let mut device = stream
        .alloc_zeros::<u8>(largest)
        .map_err(driver("cuMemAlloc"))?;
    TRANSFER_SIZES_BYTES
        .iter()
        .map(|&bytes| {
            let mut device_view = device.slice_mut(..bytes);
            let h2d_pinned_bytes_per_s = best_rate(bytes, || {
                let source = pinned.as_slice().map_err(driver("cuEventSynchronize"))?;
                stream
                    .memcpy_htod(&source[..bytes], &mut device_view)
                    .map_err(driver("cuMemcpyHtoDAsync"))?;
                synchronize(stream)
            })?;
            let h2d_pageable_bytes_per_s = best_rate(bytes, || {
                stream
                    .memcpy_htod(&pageable[..bytes], &mut device_view)
                    .map_err(driver("cuMemcpyHtoDAsync"))?;
                synchronize(stream)
            })?;
            let d2h_pinned_bytes_per_s = best_rate(bytes, || {
                let target = pinned
                    .as_mut_slice()
                    .map_err(driver("cuEventSynchronize"))?;
                stream
                    .memcpy_dtoh(&device_view, &mut target[..bytes])
                    .map_err(driver("cuMemcpyDtoHAsync"))?;
                synchronize(stream)
            })?;
            let d2h_pageable_bytes_per_s = best_rate(bytes, || {
                stream
                    .memcpy_dtoh(&device_view, &mut pageable[..bytes])
                    .map_err(driver("cuMemcpyDtoHAsync"))?;
                synchronize(stream)
            })?;
            let host_copy_bytes_per_s = best_rate(bytes, || {
                let target = pinned
                    .as_mut_slice()
                    .map_err(driver("cuEventSynchronize"))?;
                target[..bytes].copy_from_slice(std::hint::black_box(&pageable[..bytes]));
                Ok(())
            })?;
            Ok(TransferPoint {
                bytes,
                h2d_pinned_bytes_per_s,
                h2d_pageable_bytes_per_s,
                d2h_pinned_bytes_per_s,
                d2h_pageable_bytes_per_s,
                host_copy_bytes_per_s,
            })
        })
        .collect()
}
