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

/// The GPU tier of a node: its kernel rates and the link to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuCalibration {
    pub device: String,
    pub memory_bytes: u64,
    pub rates: KernelRates,
    /// Host→device and device→host copy bandwidth (PCIe or NVLink-C2C).
    pub link_bytes_per_s: f64,
    /// Fixed cost of one launch including its synchronisation.
    pub launch_overhead_s: f64,
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
        field: &'static str,
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

/// PCIe 4.0 x16 in practice.
pub const LINK_DEFAULT_BYTES_PER_S: f64 = 20e9;
pub const LAUNCH_DEFAULT_OVERHEAD_S: f64 = 20e-6;

impl Calibration {
    /// Built-in rates, with a GPU section when `gpu` is a detected device.
    pub fn defaults(gpu: Option<&crate::kernels::gpu::GpuDevice>) -> Self {
        Calibration {
            origin: "built-in defaults (run `strata bench --calibrate` to measure)".into(),
            cpu: CPU_DEFAULT_RATES,
            gpu: gpu.map(|device| GpuCalibration {
                device: device.name.clone(),
                memory_bytes: device.memory_bytes,
                rates: GPU_DEFAULT_RATES,
                link_bytes_per_s: LINK_DEFAULT_BYTES_PER_S,
                launch_overhead_s: LAUNCH_DEFAULT_OVERHEAD_S,
            }),
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

    /// Every rate is positive and finite: the cost model divides by them.
    fn check(&self, path: &Path) -> Result<(), CalibrationError> {
        let mut fields = rate_fields("cpu", &self.cpu);
        if let Some(gpu) = &self.gpu {
            fields.extend(rate_fields("gpu", &gpu.rates));
            fields.push(("gpu.link_bytes_per_s", gpu.link_bytes_per_s));
        }
        let mut nonnegative = vec![];
        if let Some(gpu) = &self.gpu {
            nonnegative.push(("gpu.launch_overhead_s", gpu.launch_overhead_s));
        }
        let bad = fields
            .into_iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
            .or_else(|| {
                nonnegative
                    .into_iter()
                    .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
            });
        match bad {
            Some((field, value)) => Err(CalibrationError::NotPositive {
                path: path.to_owned(),
                field,
                value,
            }),
            None => Ok(()),
        }
    }
}

fn rate_fields(tier: &'static str, rates: &KernelRates) -> Vec<(&'static str, f64)> {
    let names: [&'static str; 4] = if tier == "cpu" {
        [
            "cpu.filter_rows_per_s",
            "cpu.project_rows_per_s",
            "cpu.hash_rows_per_s",
            "cpu.aggregate_rows_per_s",
        ]
    } else {
        [
            "gpu.rates.filter_rows_per_s",
            "gpu.rates.project_rows_per_s",
            "gpu.rates.hash_rows_per_s",
            "gpu.rates.aggregate_rows_per_s",
        ]
    };
    names
        .into_iter()
        .zip([
            rates.filter_rows_per_s,
            rates.project_rows_per_s,
            rates.hash_rows_per_s,
            rates.aggregate_rows_per_s,
        ])
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
        calibration.gpu = Some(GpuCalibration {
            device: "sim".into(),
            memory_bytes: 1 << 30,
            rates: GPU_DEFAULT_RATES,
            link_bytes_per_s: 25e9,
            launch_overhead_s: 1e-5,
        });
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

    #[test]
    fn configured_file_that_is_missing_is_an_error_not_the_defaults() {
        let error = load(None, "/nonexistent/calibration.json", None).unwrap_err();
        assert!(matches!(error, CalibrationError::Read { .. }));
    }
}
