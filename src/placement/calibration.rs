//! Calibrated rates: what the cost model divides by.
//!
//! `strata bench --calibrate` measures them on the machine and writes them
//! as JSON ([`Calibration::write`]); placement reads the file named by
//! `placement.calibration-file` (default [`default_path`]), or uses
//! [`Calibration::defaults`] when there is none. A calibration with a `gpu`
//! section lets placement consider the GPU tier even on a machine without
//! one, which is how `strata explain --calibration` shows what a GPU node
//! would do; `strata run` additionally needs a detected GPU.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Rows per second of each operator family on one tier, per subtask.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelRates {
    pub filter_rows_per_s: f64,
    pub project_rows_per_s: f64,
    pub hash_rows_per_s: f64,
    pub aggregate_rows_per_s: f64,
}

/// The fused chain program's device rate at one coalesced batch size:
/// bytes of input columns per second, kernels only (copies, launches and
/// synchronisation are priced separately from their own measurements).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainRate {
    pub coalesced_bytes: u64,
    pub input_bytes_per_s: f64,
}

/// The GPU tier of a node: what each part of one call costs.
///
/// The cost model ([`super::cost::gpu_chain_cost`]) prices a chain per
/// coalesced batch from these: copies through the pinned staging ring
/// (host copy plus DMA), the chain's launches, one stream synchronisation
/// and the fused program's rate at that batch size. The pageable
/// bandwidths are not used by the model (the executor always stages
/// through pinned memory); they are measured and shown so that the choice
/// of staging can be checked against them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "GpuCalibrationFile")]
pub struct GpuCalibration {
    pub device: String,
    pub memory_bytes: u64,
    /// Rows per second of each family's own kernel, the fallback for a
    /// chain whose fused rate was not measured.
    pub rates: KernelRates,
    /// Host-side cost of one kernel launch (the call returning, not the
    /// kernel finishing).
    pub launch_latency_s: f64,
    /// One `cuStreamSynchronize` on a stream whose work is done or about
    /// to be: the wake-up the host pays once per batch.
    pub sync_latency_s: f64,
    pub h2d_pinned_bytes_per_s: f64,
    pub h2d_pageable_bytes_per_s: f64,
    pub d2h_pinned_bytes_per_s: f64,
    pub d2h_pageable_bytes_per_s: f64,
    /// Host memcpy between Arrow buffers and the pinned staging ring.
    pub host_copy_bytes_per_s: f64,
    /// The fused chain's measured rates, by coalesced size; empty when
    /// not measured.
    pub chain_rates: Vec<ChainRate>,
}

/// A `gpu` section as files spell it: every measured field may be absent
/// (files written before it existed), and the two fields of the first cost
/// model (`link_bytes_per_s`, `launch_overhead_s`) are still read.
#[derive(Deserialize)]
struct GpuCalibrationFile {
    device: String,
    memory_bytes: u64,
    rates: KernelRates,
    launch_latency_s: Option<f64>,
    sync_latency_s: Option<f64>,
    h2d_pinned_bytes_per_s: Option<f64>,
    h2d_pageable_bytes_per_s: Option<f64>,
    d2h_pinned_bytes_per_s: Option<f64>,
    d2h_pageable_bytes_per_s: Option<f64>,
    host_copy_bytes_per_s: Option<f64>,
    #[serde(default)]
    chain_rates: Vec<ChainRate>,
    /// Old files: one round trip of a pageable `Vec` (`clone_htod` then
    /// `clone_dtoh`). It is the only link figure such a file has, so it
    /// stands for every direction and memory kind it does not name.
    link_bytes_per_s: Option<f64>,
    /// Old files: a whole 1024-row filter call (allocations, copies,
    /// launch, synchronisation). Read as the launch latency: it
    /// over-prices launches, which errs towards the CPU.
    launch_overhead_s: Option<f64>,
}

impl From<GpuCalibrationFile> for GpuCalibration {
    fn from(file: GpuCalibrationFile) -> Self {
        let link = file.link_bytes_per_s;
        let bandwidth = |measured: Option<f64>, default: f64| measured.or(link).unwrap_or(default);
        GpuCalibration {
            device: file.device,
            memory_bytes: file.memory_bytes,
            rates: file.rates,
            launch_latency_s: file
                .launch_latency_s
                .or(file.launch_overhead_s)
                .unwrap_or(LAUNCH_LATENCY_DEFAULT_S),
            sync_latency_s: file.sync_latency_s.unwrap_or(SYNC_LATENCY_DEFAULT_S),
            h2d_pinned_bytes_per_s: bandwidth(
                file.h2d_pinned_bytes_per_s,
                PINNED_DEFAULT_BYTES_PER_S,
            ),
            h2d_pageable_bytes_per_s: bandwidth(
                file.h2d_pageable_bytes_per_s,
                PAGEABLE_DEFAULT_BYTES_PER_S,
            ),
            d2h_pinned_bytes_per_s: bandwidth(
                file.d2h_pinned_bytes_per_s,
                PINNED_DEFAULT_BYTES_PER_S,
            ),
            d2h_pageable_bytes_per_s: bandwidth(
                file.d2h_pageable_bytes_per_s,
                PAGEABLE_DEFAULT_BYTES_PER_S,
            ),
            host_copy_bytes_per_s: file
                .host_copy_bytes_per_s
                .unwrap_or(HOST_COPY_DEFAULT_BYTES_PER_S),
            chain_rates: file.chain_rates,
        }
    }
}

impl GpuCalibration {
    /// A detected GPU that was not measured: the default figures below.
    pub fn unmeasured(device: &crate::kernels::gpu::GpuDevice) -> Self {
        GpuCalibration {
            device: device.name.clone(),
            memory_bytes: device.memory_bytes,
            rates: GPU_DEFAULT_RATES,
            launch_latency_s: LAUNCH_LATENCY_DEFAULT_S,
            sync_latency_s: SYNC_LATENCY_DEFAULT_S,
            h2d_pinned_bytes_per_s: PINNED_DEFAULT_BYTES_PER_S,
            h2d_pageable_bytes_per_s: PAGEABLE_DEFAULT_BYTES_PER_S,
            d2h_pinned_bytes_per_s: PINNED_DEFAULT_BYTES_PER_S,
            d2h_pageable_bytes_per_s: PAGEABLE_DEFAULT_BYTES_PER_S,
            host_copy_bytes_per_s: HOST_COPY_DEFAULT_BYTES_PER_S,
            chain_rates: Vec::new(),
        }
    }
}

/// A node's calibration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Where the numbers come from, for `explain` and the summary.
    pub origin: String,
    pub cpu: KernelRates,
    /// `None`: the node has no GPU tier.
    pub gpu: Option<GpuCalibration>,
}

/// Errors of reading and writing calibration files.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot read calibration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("calibration file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("calibration file {path}: {field} must be a positive number, found {value}")]
    NotPositive {
        path: PathBuf,
        field: String,
        value: f64,
    },
    #[error("calibration file {path}: {field} must be a number of seconds ≥ 0, found {value}")]
    Negative {
        path: PathBuf,
        field: String,
        value: f64,
    },
    #[error("cannot write calibration file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// CPU rates when nothing was measured: conservative single-core figures
/// of the twins on a 2020s server core (this repository's 2-core VM
/// measures 2–4× these; see README).
pub const CPU_DEFAULT_RATES: KernelRates = KernelRates {
    filter_rows_per_s: 300e6,
    project_rows_per_s: 200e6,
    hash_rows_per_s: 300e6,
    aggregate_rows_per_s: 30e6,
};

/// GPU rates when a GPU is detected but not measured: an H100-class device
/// is bound by memory bandwidth (~3 TB/s), which is 100+ G rows/s of an
/// 8-byte column; these assume a tenth of that.
pub const GPU_DEFAULT_RATES: KernelRates = KernelRates {
    filter_rows_per_s: 20e9,
    project_rows_per_s: 15e9,
    hash_rows_per_s: 20e9,
    aggregate_rows_per_s: 2e9,
};

// Per-call figures for a GPU that was detected but not measured. They are
// deliberately those of a modest H100 PCIe node (a PCIe Gen4 host, one
// thread copying), so that an unmeasured GPU is not flattered; `strata
// bench --calibrate` replaces every one of them on a real device.

/// Host-side cost of `cuLaunchKernel`: NVIDIA quotes 2–4 µs on Hopper with
/// CUDA 12 (CUDA Graphs blog, "launch overhead"); 5 µs leaves headroom for
/// a busy driver thread.
pub const LAUNCH_LATENCY_DEFAULT_S: f64 = 5e-6;
/// `cuStreamSynchronize` once the work is done: the driver's completion
/// poll and the thread's wake-up, 5–10 µs in the CUDA samples'
/// measurements; the upper end.
pub const SYNC_LATENCY_DEFAULT_S: f64 = 10e-6;
/// Pinned DMA over PCIe Gen4 x16: 32 GB/s raw, 25–26 GB/s in
/// `bandwidthTest --memory=pinned`.
pub const PINNED_DEFAULT_BYTES_PER_S: f64 = 25e9;
/// Pageable copies, which the driver stages through its own pinned buffer
/// chunk by chunk: 6–12 GB/s in `bandwidthTest --memory=pageable`.
pub const PAGEABLE_DEFAULT_BYTES_PER_S: f64 = 8e9;
/// One thread's `memcpy` of buffers far larger than the caches on a
/// 2020s server core (single-thread STREAM copy): about 10 GB/s.
pub const HOST_COPY_DEFAULT_BYTES_PER_S: f64 = 10e9;

impl Calibration {
    /// Built-in rates, with a GPU section when `gpu` is a detected device.
    pub fn defaults(gpu: Option<&crate::kernels::gpu::GpuDevice>) -> Self {
        Calibration {
            origin: "built-in defaults (run `strata bench --calibrate` to measure)".into(),
            cpu: CPU_DEFAULT_RATES,
            gpu: gpu.map(GpuCalibration::unmeasured),
        }
    }

    pub fn read(path: &Path) -> Result<Self, CalibrationError> {
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Read {
            path: path.to_owned(),
            source,
        })?;
        let calibration: Calibration =
            serde_json::from_str(&text).map_err(|source| CalibrationError::Parse {
                path: path.to_owned(),
                source,
            })?;
        calibration.check(path)?;
        Ok(calibration)
    }

    pub fn write(&self, path: &Path) -> Result<(), CalibrationError> {
        let write_error = |source| CalibrationError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        let text = serde_json::to_string_pretty(self).expect("calibrations serialize");
        std::fs::write(path, text + "\n").map_err(write_error)
    }

    /// Every rate and bandwidth is positive and finite (the cost model
    /// divides by them); every latency is finite and not negative.
    fn check(&self, path: &Path) -> Result<(), CalibrationError> {
        let mut positive = rate_fields("cpu", &self.cpu);
        let mut nonnegative: Vec<(String, f64)> = Vec::new();
        if let Some(gpu) = &self.gpu {
            positive.extend(rate_fields("gpu.rates", &gpu.rates));
            positive.extend(
                [
                    ("gpu.h2d_pinned_bytes_per_s", gpu.h2d_pinned_bytes_per_s),
                    ("gpu.h2d_pageable_bytes_per_s", gpu.h2d_pageable_bytes_per_s),
                    ("gpu.d2h_pinned_bytes_per_s", gpu.d2h_pinned_bytes_per_s),
                    ("gpu.d2h_pageable_bytes_per_s", gpu.d2h_pageable_bytes_per_s),
                    ("gpu.host_copy_bytes_per_s", gpu.host_copy_bytes_per_s),
                ]
                .map(|(name, value)| (name.to_owned(), value)),
            );
            for (index, rate) in gpu.chain_rates.iter().enumerate() {
                positive.push((
                    format!("gpu.chain_rates[{index}].coalesced_bytes"),
                    rate.coalesced_bytes as f64,
                ));
                positive.push((
                    format!("gpu.chain_rates[{index}].input_bytes_per_s"),
                    rate.input_bytes_per_s,
                ));
            }
            nonnegative.push(("gpu.launch_latency_s".to_owned(), gpu.launch_latency_s));
            nonnegative.push(("gpu.sync_latency_s".to_owned(), gpu.sync_latency_s));
        }
        if let Some((field, value)) = positive
            .into_iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
        {
            return Err(CalibrationError::NotPositive {
                path: path.to_owned(),
                field,
                value,
            });
        }
        if let Some((field, value)) = nonnegative
            .into_iter()
            .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
        {
            return Err(CalibrationError::Negative {
                path: path.to_owned(),
                field,
                value,
            });
        }
        Ok(())
    }
}

fn rate_fields(prefix: &str, rates: &KernelRates) -> Vec<(String, f64)> {
    [
        ("filter_rows_per_s", rates.filter_rows_per_s),
        ("project_rows_per_s", rates.project_rows_per_s),
        ("hash_rows_per_s", rates.hash_rows_per_s),
        ("aggregate_rows_per_s", rates.aggregate_rows_per_s),
    ]
    .into_iter()
    .map(|(name, value)| (format!("{prefix}.{name}"), value))
    .collect()
}

/// `$STRATA_CALIBRATION`, else `$XDG_CONFIG_HOME/strata/calibration.json`,
/// else `~/.config/strata/calibration.json`.
pub fn default_path() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_CALIBRATION") {
        return PathBuf::from(path);
    }
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(std::env::temp_dir);
    config_home.join("strata").join("calibration.json")
}

/// The calibration placement uses: `explicit` (a CLI flag) or the
/// configured file, which must then exist; else the default location if a
/// file is there; else the defaults (with the detected GPU, if any).
pub fn load(
    explicit: Option<&Path>,
    configured: &str,
    detected_gpu: Option<&crate::kernels::gpu::GpuDevice>,
) -> Result<Calibration, CalibrationError> {
    let named = explicit
        .map(Path::to_owned)
        .or_else(|| (!configured.is_empty()).then(|| PathBuf::from(configured)));
    if let Some(path) = named {
        return Calibration::read(&path).map(|c| with_origin(c, &path));
    }
    let path = default_path();
    if path.exists() {
        return Calibration::read(&path).map(|c| with_origin(c, &path));
    }
    Ok(Calibration::defaults(detected_gpu))
}

fn with_origin(mut calibration: Calibration, path: &Path) -> Calibration {
    calibration.origin = format!("{} ({})", path.display(), calibration.origin);
    calibration
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/calibration.json");
        let mut calibration = Calibration::defaults(None);
        let mut gpu = GpuCalibration::unmeasured(&sim_device());
        gpu.h2d_pinned_bytes_per_s = 51e9;
        gpu.chain_rates = vec![ChainRate {
            coalesced_bytes: 1 << 20,
            input_bytes_per_s: 4e11,
        }];
        calibration.gpu = Some(gpu);
        calibration.write(&path).unwrap();
        assert_eq!(Calibration::read(&path).unwrap(), calibration);
    }

    #[test]
    fn zero_rate_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        let mut calibration = Calibration::defaults(None);
        calibration.cpu.project_rows_per_s = 0.0;
        calibration.write(&path).unwrap();
        let message = Calibration::read(&path).unwrap_err().to_string();
        assert!(message.contains("cpu.project_rows_per_s"), "{message}");
    }

    fn sim_device() -> crate::kernels::gpu::GpuDevice {
        crate::kernels::gpu::GpuDevice {
            ordinal: 0,
            name: "sim".into(),
            memory_bytes: 1 << 30,
            compute_capability: (9, 0),
            simulated: true,
        }
    }

    #[test]
    fn old_files_with_one_link_figure_still_load_and_map_it_to_every_direction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.json");
        std::fs::write(
            &path,
            r#"{"origin": "old", "cpu": {"filter_rows_per_s": 3e8, "project_rows_per_s": 2e8,
                 "hash_rows_per_s": 3e8, "aggregate_rows_per_s": 3e7},
               "gpu": {"device": "old GPU", "memory_bytes": 1073741824,
                 "rates": {"filter_rows_per_s": 2e10, "project_rows_per_s": 1.5e10,
                           "hash_rows_per_s": 2e10, "aggregate_rows_per_s": 2e9},
                 "link_bytes_per_s": 2e10, "launch_overhead_s": 2e-5}}"#,
        )
        .unwrap();
        let gpu = Calibration::read(&path).unwrap().gpu.unwrap();
        assert_eq!(gpu.h2d_pinned_bytes_per_s, 2e10);
        assert_eq!(gpu.d2h_pageable_bytes_per_s, 2e10);
        assert_eq!(gpu.launch_latency_s, 2e-5);
        assert_eq!(gpu.sync_latency_s, SYNC_LATENCY_DEFAULT_S);
        assert_eq!(gpu.host_copy_bytes_per_s, HOST_COPY_DEFAULT_BYTES_PER_S);
        assert!(gpu.chain_rates.is_empty());
    }

    #[test]
    fn bad_gpu_fields_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        let mut calibration = Calibration::defaults(Some(&sim_device()));
        let gpu = calibration.gpu.as_mut().unwrap();
        gpu.chain_rates = vec![ChainRate {
            coalesced_bytes: 1 << 20,
            input_bytes_per_s: -1.0,
        }];
        calibration.write(&path).unwrap();
        let message = Calibration::read(&path).unwrap_err().to_string();
        assert!(
            message.contains("gpu.chain_rates[0].input_bytes_per_s"),
            "{message}"
        );
        let gpu = calibration.gpu.as_mut().unwrap();
        gpu.chain_rates.clear();
        gpu.sync_latency_s = -1e-6;
        calibration.write(&path).unwrap();
        let message = Calibration::read(&path).unwrap_err().to_string();
        assert!(message.contains("gpu.sync_latency_s"), "{message}");
    }

    #[test]
    fn configured_file_that_is_missing_is_an_error_not_the_defaults() {
        let error = load(None, "/nonexistent/calibration.json", None).unwrap_err();
        assert!(matches!(error, CalibrationError::Read { .. }));
    }
}
