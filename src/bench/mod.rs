//! `strata bench`: measures the whole node, each figure beside a physical
//! reference measured in the same run, and `strata bench --calibrate`, the
//! kernel rates the placement cost model divides by.
//!
//! # What it owns
//!
//! - One module per section, each a list of measurements that push
//!   [`Figure`]s (a value, its unit, and the reference it is a ratio to) or
//!   [`Skipped`] lines (why a figure could not be measured here):
//!   [`memory`] (copy bandwidth, first touch, managed pages), [`cpu`] (the
//!   kernels and the operators against a memcpy of the same bytes), [`gpu`]
//!   (copies, launch latency, kernels and the fused chain, when a GPU is
//!   present), [`network`] (strata's shuffle against a raw TCP stream to
//!   the same endpoint, emulated and hardware verbs) and [`storage`] (spill
//!   files through io_uring and the thread pool against raw O_DIRECT and
//!   fio).
//! - [`serve`]: the far end of `--peer`, `strata bench --serve`; the
//!   loopback run drives an in-process server through the same protocol.
//! - [`report`] (the table, JSON and the HTML report), [`plot`] (SVG plots
//!   of throughput against batch or message size) and [`compare`] (two
//!   JSON reports side by side).
//! - [`calibrate`]: `--calibrate`, unchanged: the rates and GPU per-call
//!   costs written to the calibration file.
//!
//! # Invariants and limits
//!
//! - Every figure that has a physical reference was measured in the same
//!   run, on the same data size, right beside it: a ratio never mixes two
//!   runs.
//! - Sizes come from one [`Plan`] (quick or full, times `--size-scale`), and
//!   every buffer, file and transfer is bounded by it; the serve side
//!   refuses requests past [`serve::TRANSFER_BYTES_MAX`].
//! - Timings are the best of the plan's repetitions (interference only
//!   makes a run slower). Nothing here asserts a speed: the tests check
//!   behaviour only.

pub mod calibrate;
pub mod compare;
pub mod cpu;
pub mod gpu;
pub mod machine;
pub mod memory;
pub mod network;
pub mod plot;
pub mod report;
pub mod serve;
pub mod storage;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

pub use calibrate::{CalibrateOptions, calibrate, render};
pub use report::{Figure, Reference, Report, Size, Skipped, Unit};

use crate::kernels::gpu as kernels_gpu;
use crate::security::PeerAuth;

/// Errors of the benchmark, each naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kernel(#[from] crate::kernels::backend::KernelError),
    #[error("aggregation kernel: {0}")]
    Aggregate(#[from] crate::kernels::cpu::aggregate::AggregateError),
    #[error(transparent)]
    Gpu(#[from] kernels_gpu::GpuError),
    #[error(transparent)]
    Pool(#[from] kernels_gpu::pool::PoolError),
    #[error("the calibration chain does not fuse: {reason}")]
    Chain { reason: String },
    #[error("operator {operator}: {source}")]
    Operator {
        operator: &'static str,
        source: crate::exec::ExecError,
    },
    #[error("spill benchmark in {dir}: {source}")]
    Spill {
        dir: PathBuf,
        source: crate::io::IoError,
    },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer {peer}: {what}: {source}")]
    Peer {
        peer: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("peer {peer}: {detail}")]
    PeerProtocol { peer: String, detail: String },
    #[error("shuffle with {peer}: {detail}")]
    Shuffle { peer: String, detail: String },
    #[error("bench server on {address}: {source}")]
    Serve {
        address: String,
        source: std::io::Error,
    },
    #[error("report {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "report {path}: schema version {found}, this strata reads version {expected}; \
         rerun `strata bench --json` with this version"
    )]
    SchemaVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("plot {plot}: {detail}")]
    Plot { plot: String, detail: String },
    #[error("unknown section '{name}': expected one of memory, cpu, gpu, network, storage")]
    UnknownSection { name: String },
}

/// The parts of the node `--only` can pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Memory,
    Cpu,
    Gpu,
    Network,
    Storage,
}

impl Section {
    pub const ALL: [Section; 5] = [
        Section::Memory,
        Section::Cpu,
        Section::Gpu,
        Section::Network,
        Section::Storage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::Memory => "memory",
            Section::Cpu => "cpu",
            Section::Gpu => "gpu",
            Section::Network => "network",
            Section::Storage => "storage",
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Section {
    type Err = BenchError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Section::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| BenchError::UnknownSection {
                name: text.to_owned(),
            })
    }
}

/// What `strata bench` measures and where.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub sections: Vec<Section>,
    /// Smaller sizes and fewer repetitions (under a minute on two cores).
    pub quick: bool,
    /// Multiplies every data size (a test knob; 1.0 normally).
    pub size_scale: f64,
    /// Where the storage section writes its files.
    pub dir: PathBuf,
    /// A `strata bench --serve` on another machine; loopback when `None`.
    pub peer: Option<String>,
    /// How the shuffle authenticates to the peer's data server.
    pub auth: PeerAuth,
}

/// Sizes and repetitions of one run, from `--quick` and `--size-scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub quick: bool,
    pub size_scale: f64,
    pub repetitions: u32,
    /// Memory: the buffers copied and the region first touched.
    pub memory_bytes: usize,
    /// CPU: rows per measurement, and the batch sizes (rows) it is cut into.
    pub cpu_rows: usize,
    pub batch_rows: Vec<usize>,
    /// Network: bytes per transfer, and the message sizes.
    pub network_bytes: u64,
    pub message_bytes: Vec<usize>,
    /// Storage: bytes per file, and the block sizes.
    pub storage_bytes: u64,
    pub block_bytes: Vec<usize>,
}

impl Plan {
    pub fn new(quick: bool, size_scale: f64) -> Self {
        let scale = if size_scale.is_finite() && size_scale > 0.0 {
            size_scale.min(16.0)
        } else {
            1.0
        };
        let scaled = |n: u64, floor: u64| ((n as f64 * scale) as u64).max(floor);
        let (memory, rows, network, storage) = if quick {
            (64u64 << 20, 1u64 << 20, 128u64 << 20, 128u64 << 20)
        } else {
            (256 << 20, 4 << 20, 1 << 30, 1 << 30)
        };
        // Round data sizes to whole 1 MiB blocks so O_DIRECT files and
        // copies stay aligned at any scale.
        let mib = |n: u64| n.div_ceil(1 << 20) << 20;
        Plan {
            quick,
            size_scale: scale,
            repetitions: if quick { 2 } else { 4 },
            memory_bytes: mib(scaled(memory, 1 << 20)) as usize,
            cpu_rows: scaled(rows, 4096) as usize,
            batch_rows: if quick {
                vec![1024, 8192, 65536]
            } else {
                vec![256, 1024, 4096, 8192, 32768, 131072]
            },
            network_bytes: mib(scaled(network, 1 << 20)),
            message_bytes: if quick {
                vec![4 << 10, 64 << 10, 1 << 20]
            } else {
                vec![1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
            },
            storage_bytes: mib(scaled(storage, 1 << 20)),
            block_bytes: if quick {
                vec![128 << 10, 1 << 20]
            } else {
                vec![64 << 10, 256 << 10, 1 << 20, 4 << 20]
            },
        }
    }
}

/// What the sections write into while they run.
pub struct Recorder<'a> {
    pub plan: &'a Plan,
    progress: &'a ProgressBar,
    figures: Vec<Figure>,
    skipped: Vec<Skipped>,
}

impl<'a> Recorder<'a> {
    pub fn new(plan: &'a Plan, progress: &'a ProgressBar) -> Self {
        Self {
            plan,
            progress,
            figures: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Says what runs now, on the progress bar.
    pub fn step(&self, what: &str) {
        self.progress.set_message(what.to_owned());
        self.progress.tick();
    }

    pub fn figure(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    pub fn skip(&mut self, section: Section, name: &str, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            section,
            name: name.to_owned(),
            reason: reason.into(),
        });
    }

    pub fn into_parts(self) -> (Vec<Figure>, Vec<Skipped>) {
        (self.figures, self.skipped)
    }
}

/// Runs the chosen sections and returns their figures. A section that fails
/// becomes a skipped line with its error; the other sections still run.
pub fn run(options: &BenchOptions, progress: &ProgressBar) -> Report {
    let started = Instant::now();
    let plan = Plan::new(options.quick, options.size_scale);
    let mut sections = options.sections.clone();
    sections.sort();
    sections.dedup();
    progress.set_length(sections.len() as u64);
    let mut recorder = Recorder::new(&plan, progress);
    for &section in &sections {
        progress.set_prefix(section.name());
        let outcome = match section {
            Section::Memory => memory::run(&mut recorder),
            Section::Cpu => cpu::run(&mut recorder),
            Section::Gpu => gpu::run(&mut recorder),
            Section::Network => network::run(&mut recorder, options),
            Section::Storage => storage::run(&mut recorder, &options.dir),
        };
        if let Err(e) = outcome {
            recorder.skip(section, "section", format!("failed: {e}"));
        }
        progress.inc(1);
    }
    let (figures, skipped) = recorder.into_parts();
    Report::new(report::RunInfo {
        quick: options.quick,
        size_scale: plan.size_scale,
        sections,
        peer: options.peer.clone(),
        dir: options.dir.clone(),
        elapsed_s: started.elapsed().as_secs_f64(),
        figures,
        skipped,
    })
}

/// Best wall time of `repetitions` runs of `work`, in seconds.
pub(crate) fn best_of<E>(
    repetitions: u32,
    mut work: impl FnMut() -> Result<(), E>,
) -> Result<f64, E> {
    let mut best_s = f64::INFINITY;
    for _ in 0..repetitions.max(1) {
        let started = Instant::now();
        work()?;
        best_s = best_s.min(started.elapsed().as_secs_f64());
    }
    Ok(best_s.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse_by_name_and_unknown_ones_are_named_in_the_error() {
        assert_eq!("CPU".parse::<Section>().unwrap(), Section::Cpu);
        assert_eq!(" storage".parse::<Section>().unwrap(), Section::Storage);
        let error = "disk".parse::<Section>().unwrap_err().to_string();
        assert!(error.contains("'disk'"), "{error}");
    }

    #[test]
    fn plan_scales_sizes_but_keeps_them_whole_mebibytes() {
        let plan = Plan::new(true, 0.01);
        assert_eq!(plan.storage_bytes % (1 << 20), 0);
        assert_eq!(plan.network_bytes, 2 << 20);
        assert!(plan.cpu_rows >= 4096);
        let full = Plan::new(false, 1.0);
        assert!(full.batch_rows.len() > plan.batch_rows.len());
        assert_eq!(Plan::new(true, f64::NAN).size_scale, 1.0);
    }
}
