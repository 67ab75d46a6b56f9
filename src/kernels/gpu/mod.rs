//! The GPU tier: detection, the device memory pool, the kernel sources and
//! their PTX cache, and the CUDA dispatcher.
//!
//! Nothing here needs CUDA to build or to run: `cudarc` loads `libcuda`, and
//! `cuda::nvrtc` loads `libnvrtc` (12 or 13), with `dlopen` on first use.
//! Detection asks
//! `is_culib_present` first, because `cudarc` panics rather than failing
//! when the driver library is missing, and it also runs under
//! `catch_unwind`, so a broken installation is a "no GPU" with a reason,
//! never a crash. A machine without a GPU gets [`GpuDetection::Absent`] and
//! offers CPU slots only.
//!
//! - [`pool`]: per-slot budgets of device memory (pure accounting, tested
//!   without a GPU).
//! - [`contexts`]: the device contexts the slots of a GPU share, and the
//!   reset of one a sticky error broke (a state machine, tested without a
//!   GPU).
//! - [`source`]: the embedded `kernels/*.cu` and the on-disk PTX cache.
//! - [`cuda`]: the `KernelBackend` that copies Arrow buffers to the device,
//!   launches, and copies the results back, and its NVRTC loader (the only
//!   `unsafe` of the tier).
//! - [`sim`]: a GPU backend that keeps the pool's books like the CUDA one
//!   but computes with the CPU twins, so out-of-memory handling is tested on
//!   any machine.

pub mod contexts;
pub mod cuda;
pub mod pool;
pub mod sim;
pub mod source;

use serde::{Deserialize, Serialize};

/// Errors of the GPU tier other than running out of device memory.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU: {reason}")]
    NoGpu { reason: String },
    #[error("NVRTC unavailable: {reason}")]
    NvrtcUnavailable { reason: String },
    #[error("CUDA driver call {call} failed: {reason}")]
    Driver { call: &'static str, reason: String },
    #[error("NVRTC could not compile kernels/{stem}.cu for {arch}: {log}")]
    Compile {
        stem: &'static str,
        arch: String,
        log: String,
    },
    #[error("kernel {name} is not in the compiled modules")]
    MissingKernel { name: &'static str },
    #[error(transparent)]
    Source(#[from] source::SourceError),
}

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub ordinal: u32,
    pub name: String,
    pub memory_bytes: u64,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: (u32, u32),
    /// A device of the simulator (`STRATA_SIMULATE_GPU_BYTES`): its kernels
    /// are the CPU twins behind the same device-memory budgets.
    #[serde(default)]
    pub simulated: bool,
}

impl GpuDevice {
    /// NVRTC's virtual architecture for this device, e.g. `compute_90`.
    pub fn nvrtc_arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("compute_{major}{minor}")
    }
}

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GpuDetection {
    Present(Vec<GpuDevice>),
    Absent { reason: String },
}

impl GpuDetection {
    pub fn devices(&self) -> &[GpuDevice] {
        match self {
            GpuDetection::Present(devices) => devices,
            GpuDetection::Absent { .. } => &[],
        }
    }

    /// One line for logs, the summary and the REST API.
    pub fn describe(&self) -> String {
        match self {
            GpuDetection::Present(devices) => devices
                .iter()
                .map(|d| {
                    if d.simulated {
                        return format!(
                            "GPU {} {} ({} KiB)",
                            d.ordinal,
                            d.name,
                            d.memory_bytes >> 10
                        );
                    }
                    format!(
                        "GPU {} {} ({} MiB, sm_{}{})",
                        d.ordinal,
                        d.name,
                        d.memory_bytes >> 20,
                        d.compute_capability.0,
                        d.compute_capability.1
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            GpuDetection::Absent { reason } => format!("no GPU ({reason}): CPU slots only"),
        }
    }
}

/// Probes the machine once per process; never panics.
pub fn detect() -> &'static GpuDetection {
    static DETECTION: std::sync::OnceLock<GpuDetection> = std::sync::OnceLock::new();
    DETECTION.get_or_init(|| {
        if let Some(memory_bytes) = std::env::var("STRATA_SIMULATE_GPU_BYTES")
            .ok()
            .and_then(|bytes| bytes.trim().parse::<u64>().ok())
        {
            return GpuDetection::Present(vec![GpuDevice {
                ordinal: 0,
                name: "simulated GPU (CPU twins, STRATA_SIMULATE_GPU_BYTES)".into(),
                memory_bytes,
                compute_capability: (0, 0),
                simulated: true,
            }]);
        }
        if std::env::var_os("STRATA_DISABLE_GPU").is_some() {
            return GpuDetection::Absent {
                reason: "disabled by STRATA_DISABLE_GPU".into(),
            };
        }
        cuda::probe()
    })
}

/// The kernel backend of one GPU slot: the CUDA kernels, or the simulator's
/// CPU twins behind the same budget for a simulated device.
pub fn open_backend(
    device: &GpuDevice,
    pool: pool::SlotPool,
) -> Result<std::sync::Arc<dyn crate::kernels::backend::KernelBackend>, GpuError> {
    if device.simulated {
        return Ok(std::sync::Arc::new(sim::SimulatedGpuBackend::new(pool)));
    }
    let cache = source::PtxCache::new(source::PtxCache::default_dir());
    Ok(std::sync::Arc::new(cuda::CudaBackend::new(
        device, pool, &cache,
    )?))
}

/// Device bytes a launch over `row_count` rows allocates: the input columns
/// (values and validity of each), the outputs and scratch. The CUDA backend
/// reserves exactly this much before it allocates; the simulated backend
/// reserves the same so that its out-of-memory behaviour matches.
#[derive(Clone, Copy, Debug)]
pub struct LaunchBytes {
    pub row_count: usize,
}

/// Open-addressing slots of the aggregation table for a batch: a power of
/// two at least twice the row count (and so the group count), so that the
/// table is never full.
pub fn aggregate_capacity(row_count: usize) -> u64 {
    (row_count as u64 * 2).next_power_of_two().max(16)
}

impl LaunchBytes {
    /// Values, and the validity bytes [`validity_window`] uploads (a
    /// sliced array's window starts mid-byte: one byte more).
    fn column(self, value_bytes: usize) -> u64 {
        (self.row_count * value_bytes + self.row_count.div_ceil(8) + 1) as u64
    }

    fn bitmap_words(self) -> u64 {
        (self.row_count.div_ceil(32) * 4) as u64
    }

    /// Values and validity in, a selection bitmap and a counter out.
    pub fn filter(self) -> u64 {
        self.column(8) + self.bitmap_words() + 8
    }

    /// Up to two columns in, values, validity and the overflow row out.
    pub fn project(self) -> u64 {
        2 * self.column(8) + (self.row_count * 8) as u64 + self.bitmap_words() + 8
    }

    /// One column in, one hash per row out.
    pub fn hash(self) -> u64 {
        self.column(8) + (self.row_count * 8) as u64
    }

    /// Hashes in; partition ids and row indices out; counts, offsets and
    /// cursors per partition.
    pub fn partition(self, parallelism: u32) -> u64 {
        (self.row_count * (8 + 4 + 4)) as u64 + (parallelism as u64 * 3 + 1) * 4
    }

    /// One column in; two levels of (sum, sum of squares, count) partials
    /// alive at once; mean and std out.
    pub fn standardize_fit(self) -> u64 {
        let partials = crate::kernels::cpu::standardize::chunk_count(self.row_count) as u64;
        self.column(8) + 2 * partials * 24 + 16
    }

    /// Keys and values in; the device table of `capacity + 2` slots (key,
    /// count, 128-bit sum, min, max), its flags; one output group per row
    /// at most (key, validity, count, sum, overflow, min, max) and a counter.
    pub fn aggregate(self, capacity: u64) -> u64 {
        2 * self.column(8) + (capacity + 2) * 48 + 8 + 4 + (self.row_count * 42) as u64 + 8
    }

    /// One column and its statistics in, one value per row out.
    pub fn standardize_apply(self) -> u64 {
        self.column(8) + (self.row_count * 8) as u64 + 16
    }
}

/// The bytes of a validity bitmap that cover its rows, and the bit offset
/// of row 0 within the first of them: a sliced array's bitmap shares its
/// parent's buffer, and only the slice's window is uploaded (at most
/// `len.div_ceil(8) + 1` bytes, what [`LaunchBytes`] reserves).
pub fn validity_window(bits: &arrow_buffer::BooleanBuffer) -> (&[u8], u64) {
    let (offset, len) = (bits.offset(), bits.len());
    let all = bits.values();
    let first = (offset / 8).min(all.len());
    let last = (offset + len).div_ceil(8).clamp(first, all.len());
    (&all[first..last], (offset % 8) as u64)
}

#[cfg(test)]
mod validity_tests {
    use super::*;
    use arrow_array::{Array, Int64Array};

    #[test]
    fn a_slice_uploads_only_its_window_of_the_bitmap() {
        let parent: Int64Array = (0..10_000i64).map(|v| (v % 3 != 0).then_some(v)).collect();
        for (offset, len) in [
            (0, 10_000),
            (1, 7),
            (8, 16),
            (4_093, 1_000),
            (9_999, 1),
            (5, 0),
        ] {
            let slice = parent.slice(offset, len);
            let nulls = slice.nulls().expect("has nulls").inner().clone();
            let (window, bit) = validity_window(&nulls);
            assert!(
                window.len() <= len.div_ceil(8) + 1,
                "{offset}+{len}: {} bytes",
                window.len()
            );
            assert!(
                (window.len() as u64) <= LaunchBytes { row_count: len }.column(0),
                "accounted"
            );
            for row in 0..len {
                let at = bit as usize + row;
                let valid = window[at / 8] >> (at % 8) & 1 == 1;
                assert_eq!(valid, slice.is_valid(row), "{offset}+{len}, row {row}");
            }
        }
    }
}
