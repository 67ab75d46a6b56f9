//! TaskManager configuration: Flink's option names and defaults, read from a
//! file, the `STRATA_PROPERTIES` variable and `-D key=value` arguments, plus the
//! memory layout that follows from them.
//!
//! This module owns the set of known keys (`keys.rs`), their value syntax
//! (`units.rs`: `1728m`, `10 s`), the sources (`source.rs`: TOML, Flink's
//! YAML, flat or nested, properties, overrides) and the memory model
//! (`layout.rs`).
//!
//! Invariants of a [`Config`] returned by [`Config::load`]:
//! - every key is a known Flink key, and later sources win: defaults < file <
//!   `STRATA_PROPERTIES` < `-D`; each key remembers which source set it;
//! - each value passed its own check (fractions in [0, 1], page and segment
//!   sizes powers of two in 4 KiB..16 MiB, slot count ≥ 1, ...) and the keys
//!   agree with each other (heartbeat timeout > interval, max parallelism ≥
//!   default parallelism, registration back-off initial ≤ max, exponential
//!   restart back-off initial ≤ max);
//! - [`Config::memory_layout`] was derived from these fields and is feasible.
//!
//! Limits: the fields are public for reading; assigning to one afterwards does
//! not re-derive the layout or re-run the checks, so build a new `Config` with
//! [`Config::from_overrides`] instead. YAML is the subset Flink's files use
//! (blocks, scalars, lists; no anchors or block scalars). Unknown keys are
//! errors (Flink only logs them), because a typo in a memory key silently
//! changes the layout; the Flink settings that mean nothing to strata (JVM
//! options, bind hosts, ...) are ignored with a warning, so that a Flink
//! `config.yaml` loads.

mod error;
mod keys;
mod layout;
mod source;
mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use layout::MemoryLayout;
pub use source::{ConfigSource, Origin};
pub use units::{format_duration, parse_memory_size};

use source::Entry;

const MIB: u64 = 1 << 20;

/// The data-plane transport between TaskManagers (`taskmanager.network.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Auto,
    Tcp,
    Rdma,
    /// The verbs protocol over the user-space emulation (no NIC needed).
    RdmaEmulated,
}

/// `placement.mode`: where operators may run. `Auto` lets the cost model
/// choose per operator; `Cpu` keeps everything on the CPU; `Gpu` puts every
/// operator that has a GPU kernel on the GPU and is an error on a machine
/// (or calibration) without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementMode {
    #[default]
    Auto,
    Cpu,
    Gpu,
}

impl fmt::Display for PlacementMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlacementMode::Auto => "auto",
            PlacementMode::Cpu => "cpu",
            PlacementMode::Gpu => "gpu",
        })
    }
}

/// `io.backend`: how spill files are read and written. `Auto` uses io_uring
/// and falls back to the thread pool (with the reason logged) when refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    #[default]
    Auto,
    Uring,
    ThreadPool,
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "io_uring",
            IoBackend::ThreadPool => "threadpool",
        })
    }
}

/// `restart-strategy.type`: what the JobManager does when a job fails
/// (Flink's restart back-off time strategies; `failure-rate` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartStrategyKind {
    /// Fail the job on its first failure.
    None,
    /// `restart-strategy.fixed-delay.*`: a fixed number of restarts, each
    /// after the same delay.
    FixedDelay,
    /// `restart-strategy.exponential-delay.*`: a growing back-off with
    /// jitter that starts over after the job ran long enough.
    ExponentialDelay,
}

impl fmt::Display for RestartStrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartStrategyKind::None => "none",
            RestartStrategyKind::FixedDelay => "fixed-delay",
            RestartStrategyKind::ExponentialDelay => "exponential-delay",
        })
    }
}

/// A secret configuration value. `Debug` and `Display` print `<redacted>`, so
/// neither a log line nor `{:?}` of a [`Config`] can leak it; [`SecretText::expose`]
/// is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(String);

impl SecretText {
    pub(crate) fn new(text: String) -> SecretText {
        SecretText(text)
    }

    /// The secret itself, for whoever turns it into key material.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(keys::REDACTED)
    }
}

impl fmt::Display for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(keys::REDACTED)
    }
}

/// The effective TaskManager configuration. Each field names the Flink key it
/// comes from; defaults are Flink's, but for `segment_size_bytes` (64 KiB).
#[derive(Debug, Clone)]
pub struct Config {
    /// `taskmanager.numberOfTaskSlots`, at least 1.
    pub slot_count: u32,
    /// `taskmanager.memory.process.size`; everything else in the layout follows from it.
    pub process_size_bytes: u64,
    /// `taskmanager.memory.managed.fraction` of total Flink memory.
    pub managed_fraction: f64,
    /// `taskmanager.memory.network.fraction` of total Flink memory.
    pub network_fraction: f64,
    /// `taskmanager.memory.network.min`.
    pub network_min_bytes: u64,
    /// `taskmanager.memory.network.max`; `u64::MAX` is unlimited.
    pub network_max_bytes: u64,
    /// `taskmanager.memory.framework.heap.size`.
    pub framework_heap_bytes: u64,
    /// `taskmanager.memory.framework.off-heap.size`.
    pub framework_off_heap_bytes: u64,
    /// `taskmanager.memory.task.off-heap.size`.
    pub task_off_heap_bytes: u64,
    /// `taskmanager.memory.jvm-metaspace.size`: reserved for code, thread stacks
    /// and allocator metadata; the key keeps Flink's name.
    pub jvm_metaspace_bytes: u64,
    /// `taskmanager.memory.jvm-overhead.fraction` of the process size.
    pub jvm_overhead_fraction: f64,
    /// `taskmanager.memory.jvm-overhead.min`.
    pub jvm_overhead_min_bytes: u64,
    /// `taskmanager.memory.jvm-overhead.max`.
    pub jvm_overhead_max_bytes: u64,
    /// `taskmanager.memory.segment-size`: one network buffer. 64 KiB by
    /// default, twice Flink's 32 KiB: a buffer is a whole Arrow IPC record
    /// batch, and one channel's credit window (2 exclusive + 8 floating
    /// buffers, Flink's counts) is then 640 KiB, which covers a fast link's
    /// bandwidth-delay product (see `scripts/bench_shuffle.sh`).
    pub segment_size_bytes: u64,
    /// `taskmanager.memory.page-size`: one managed-memory page.
    pub page_size_bytes: u64,
    /// `taskmanager.memory.pre-allocate`: allocate and touch all managed and
    /// network memory at start-up. Off by default: pages and segments are
    /// allocated on first use (the budgets stay hard limits either way).
    /// Pre-touching costs start-up time and commits the whole budget, and
    /// saves each first use its page faults. Measured on the 2-core CI VM:
    /// 640 MiB (4 slots' managed and network memory) took ~1.8 s, delaying
    /// the main job's first row from ~50 ms to ~1.9 s (~2.8 s per GiB).
    pub pre_allocate: bool,
    /// `taskmanager.network.memory.buffers-per-channel` (exclusive credits).
    pub buffers_per_channel: u32,
    /// `taskmanager.network.memory.floating-buffers-per-gate`.
    pub floating_buffers_per_gate: u32,
    /// `taskmanager.network.memory.max-buffers-per-channel`.
    pub max_buffers_per_channel: u32,
    /// `taskmanager.network.transport`.
    pub transport: Transport,
    /// `taskmanager.network.compression.enabled`: LZ4 on shuffle buffers
    /// between TaskManagers (Arrow IPC body compression).
    pub compression_enabled: bool,
    /// `taskmanager.network.compression.codec` (Flink's key; LZ4 only).
    pub compression_codec: String,
    /// `taskmanager.network.checksum.enabled`: a CRC-32C on every shuffle
    /// buffer between TaskManagers, verified by the consumer. Off by default,
    /// as in Flink: TCP checksums the wire, and the CRC costs a pass over
    /// every byte on each side.
    pub network_checksum: bool,
    /// `taskmanager.network.tcp.task-reads`: over TCP, each input gate has
    /// its own connection to each producer TaskManager, read by its task's
    /// thread (no network-thread hand-off on the consumer's side). `false`:
    /// one connection per peer TaskManager, shared by all gates and read by
    /// the network runtime, as in Flink.
    pub tcp_task_reads: bool,
    /// `taskmanager.network.memory.buffer-debloat.enabled`.
    pub debloat_enabled: bool,
    /// `taskmanager.network.memory.buffer-debloat.target`: the time the
    /// buffered data of a gate should take to consume.
    pub debloat_target: Duration,
    /// `taskmanager.network.memory.buffer-debloat.period`.
    pub debloat_period: Duration,
    /// `taskmanager.network.memory.buffer-debloat.min-buffer-size`.
    pub debloat_min_buffer_bytes: u64,
    /// `taskmanager.host`.
    pub host: String,
    /// `taskmanager.data.port`; 0 binds any free port.
    pub data_port: u16,
    /// `taskmanager.rpc.port`; 0 binds any free port.
    pub rpc_port: u16,
    /// `taskmanager.registration.timeout`: give up registering after this long.
    pub registration_timeout: Duration,
    /// `cluster.registration.initial-timeout`: first registration back-off.
    pub registration_initial_timeout: Duration,
    /// `cluster.registration.max-timeout`: the back-off doubles up to this.
    pub registration_max_timeout: Duration,
    /// `jobmanager.rpc.address`.
    pub jobmanager_address: String,
    /// `jobmanager.rpc.port`.
    pub jobmanager_port: u16,
    /// `heartbeat.interval`.
    pub heartbeat_interval: Duration,
    /// `heartbeat.timeout`, longer than the interval.
    pub heartbeat_timeout: Duration,
    /// `execution.checkpointing.interval`; `None` (the default) turns
    /// checkpointing off.
    pub checkpoint_interval: Option<Duration>,
    /// `execution.checkpointing.timeout`: a checkpoint that has not
    /// completed after this long is aborted.
    pub checkpoint_timeout: Duration,
    /// `execution.checkpointing.dir` (older name `state.checkpoints.dir`):
    /// completed checkpoints live under `<dir>/<job>/chk-<n>/`.
    pub checkpoint_dir: PathBuf,
    /// `execution.checkpointing.num-retained`: completed checkpoints kept, at least 1.
    pub checkpoints_retained: u32,
    /// `restart-strategy.type`; `None` (unset, printed `default`) is Flink's
    /// default: exponential-delay when checkpointing is on, none otherwise.
    /// [`Config::effective_restart_strategy`] resolves it.
    pub restart_strategy: Option<RestartStrategyKind>,
    /// `restart-strategy.fixed-delay.attempts`: restarts before giving up.
    pub restart_fixed_delay_attempts: u32,
    /// `restart-strategy.fixed-delay.delay`.
    pub restart_fixed_delay_delay: Duration,
    /// `restart-strategy.exponential-delay.initial-backoff`.
    pub restart_exp_initial_backoff: Duration,
    /// `restart-strategy.exponential-delay.max-backoff`, at least the initial backoff.
    pub restart_exp_max_backoff: Duration,
    /// `restart-strategy.exponential-delay.backoff-multiplier`, at least 1.
    pub restart_exp_multiplier: f64,
    /// `restart-strategy.exponential-delay.reset-backoff-threshold`: a job
    /// that ran this long since its last restart starts the back-off over.
    pub restart_exp_reset_threshold: Duration,
    /// `restart-strategy.exponential-delay.jitter-factor`, in [0, 1].
    pub restart_exp_jitter: f64,
    /// `restart-strategy.exponential-delay.attempts-before-reset-backoff`:
    /// restarts allowed between two resets.
    pub restart_exp_attempts: u32,
    /// `io.tmp.dirs`: spill directories, at least one.
    pub tmp_dirs: Vec<PathBuf>,
    /// `io.backend`: `auto`, `io_uring` or `threadpool`.
    pub io_backend: IoBackend,
    /// `parallelism.default`.
    pub default_parallelism: u32,
    /// `pipeline.max-parallelism`, in `default_parallelism..=32768`.
    pub max_parallelism: u32,
    /// `execution.buffer-timeout.interval`: output flush period.
    pub buffer_timeout: Duration,
    /// `rest.port`.
    pub rest_port: u16,
    /// `jobmanager.flight.port`: where a trainer asks the JobManager for a
    /// job's Flight endpoints (Arrow Flight's customary 8815).
    pub jobmanager_flight_port: u16,
    /// `taskmanager.flight.port`: where a TaskManager serves its
    /// `flight_sink` partitions; 0 binds any free port.
    pub taskmanager_flight_port: u16,
    /// `metrics.reporter.prom.port`.
    pub prometheus_port: u16,
    /// `placement.mode`.
    pub placement_mode: PlacementMode,
    /// `taskmanager.gpu.coalesce-bytes`: a GPU chain gathers input batches
    /// until their device columns reach this many bytes, so that each
    /// upload, launch and sync is paid per 32 MiB rather than per batch.
    pub gpu_coalesce_bytes: u64,
    /// `taskmanager.gpu.coalesce-latency`: the longest a row waits in a GPU
    /// chain's coalescing buffer (checked when a batch arrives, and the
    /// buffer is flushed when the input goes idle or a checkpoint comes).
    pub gpu_coalesce_latency: Duration,
    /// `taskmanager.gpu.batches-in-flight`: device batches a GPU chain has
    /// submitted and not yet waited for. At 2 (the default) batch N+1 is
    /// packed and uploaded while batch N computes and comes back; 1 waits
    /// for each batch before the next is submitted.
    pub gpu_batches_in_flight: u32,
    /// `placement.calibration-file`: the rates `strata bench --calibrate`
    /// wrote; empty means the default location (see `placement::calibration`).
    pub calibration_file: String,
    /// `taskmanager.data.connections.max`: concurrent connections the data
    /// server accepts; more are closed at accept.
    pub data_connections_max: u32,
    /// `jobmanager.rpc.connections.max`: concurrent control connections the
    /// JobManager accepts.
    pub rpc_connections_max: u32,
    /// `security.auth.secret`: the cluster secret, inline. Prefer
    /// `security.auth.secret-file`: a `-D` argument is visible in `ps`.
    /// Read it through `security::ClusterSecret::from_config`.
    pub auth_secret: Option<SecretText>,
    /// `security.auth.secret-file`: a file holding the cluster secret,
    /// readable by its owner only.
    pub auth_secret_file: Option<PathBuf>,
    /// `security.handshake.timeout`: how long a peer has to complete the
    /// authentication handshake, and then (on the data plane) to send its
    /// first request.
    pub handshake_timeout: Duration,
    layout: MemoryLayout,
    origins: BTreeMap<&'static str, Origin>,
}

impl Config {
    /// Loads defaults, then `file` (`.toml`, or `.yaml`/`.yml` in Flink's flat
    /// form), then `env_properties` (the content of `STRATA_PROPERTIES`), then
    /// the `-D` `overrides`, each `key=value`; later sources win.
    pub fn load(
        file: Option<&Path>,
        env_properties: Option<&str>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut entries = Vec::new();
        if let Some(path) = file {
            entries.extend(source::read_file(path)?);
        }
        if let Some(text) = env_properties {
            entries.extend(source::parse_env_properties(text)?);
        }
        entries.extend(source::parse_overrides(overrides)?);

        let mut config = Config::flink_defaults();
        for entry in entries {
            config.apply(entry)?;
        }
        config.validate()?;
        config.layout = MemoryLayout::derive(&config)?;
        Ok(config)
    }

    /// Defaults plus `-D` overrides only.
    pub fn from_overrides(overrides: &[String]) -> Result<Config, ConfigError> {
        Config::load(None, None, overrides)
    }

    pub fn memory_layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// `restart-strategy.type` with Flink's default resolved: exponential-delay
    /// when checkpointing is on, none otherwise.
    pub fn effective_restart_strategy(&self) -> RestartStrategyKind {
        match (self.restart_strategy, self.checkpoint_interval) {
            (Some(kind), _) => kind,
            (None, Some(_)) => RestartStrategyKind::ExponentialDelay,
            (None, None) => RestartStrategyKind::None,
        }
    }

    /// Which source set `key`; `None` for a key this module does not know.
    pub fn source_of(&self, key: &str) -> Option<&ConfigSource> {
        self.origins.get(key).map(|origin| &origin.source)
    }

    /// The `strata config` output: every key with its effective value and where
    /// it came from, then the memory layout, as aligned text tables.
    pub fn render_table(&self) -> String {
        let settings: Vec<[String; 3]> = keys::KEYS
            .iter()
            .map(|key| {
                let origin = self.origins.get(key.name).unwrap_or(&Origin::DEFAULT);
                [key.name.to_owned(), (key.show)(self), origin.to_string()]
            })
            .collect();
        let layout = &self.layout;
        let mut memory: Vec<[String; 3]> = layout
            .rows()
            .iter()
            .map(|(label, bytes)| [label.to_string(), human_size(*bytes), bytes.to_string()])
            .collect();
        memory.push([
            "network segments".to_owned(),
            format!(
                "{} x {}",
                layout.network_segment_count,
                units::format_memory_size(self.segment_size_bytes)
            ),
            layout.network_segment_count.to_string(),
        ]);
        let mut out = String::new();
        write_table(&mut out, ["KEY", "VALUE", "SOURCE"], &settings);
        out.push('\n');
        write_table(&mut out, ["MEMORY", "SIZE", "BYTES"], &memory);
        out
    }

    fn flink_defaults() -> Config {
        Config {
            slot_count: 1,
            process_size_bytes: 1728 * MIB,
            managed_fraction: 0.4,
            network_fraction: 0.1,
            network_min_bytes: 64 * MIB,
            network_max_bytes: u64::MAX,
            framework_heap_bytes: 128 * MIB,
            framework_off_heap_bytes: 128 * MIB,
            task_off_heap_bytes: 0,
            jvm_metaspace_bytes: 256 * MIB,
            jvm_overhead_fraction: 0.1,
            jvm_overhead_min_bytes: 192 * MIB,
            jvm_overhead_max_bytes: 1024 * MIB,
            segment_size_bytes: 64 << 10,
            page_size_bytes: 32 << 10,
            pre_allocate: false,
            buffers_per_channel: 2,
            floating_buffers_per_gate: 8,
            max_buffers_per_channel: 10,
            transport: Transport::Auto,
            compression_enabled: false,
            compression_codec: "LZ4".to_owned(),
            network_checksum: false,
            tcp_task_reads: true,
            debloat_enabled: false,
            debloat_target: Duration::from_secs(1),
            debloat_period: Duration::from_millis(200),
            debloat_min_buffer_bytes: 256,
            host: "127.0.0.1".to_owned(),
            data_port: 0,
            rpc_port: 0,
            registration_timeout: Duration::from_secs(5 * 60),
            registration_initial_timeout: Duration::from_millis(100),
            registration_max_timeout: Duration::from_secs(30),
            jobmanager_address: "127.0.0.1".to_owned(),
            jobmanager_port: 6123,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(50),
            checkpoint_interval: None,
            checkpoint_timeout: Duration::from_secs(10 * 60),
            checkpoint_dir: std::env::temp_dir().join("strata-checkpoints"),
            checkpoints_retained: 1,
            restart_strategy: None,
            restart_fixed_delay_attempts: 1,
            restart_fixed_delay_delay: Duration::from_secs(1),
            restart_exp_initial_backoff: Duration::from_secs(1),
            restart_exp_max_backoff: Duration::from_secs(60),
            restart_exp_multiplier: 1.5,
            restart_exp_reset_threshold: Duration::from_secs(60 * 60),
            restart_exp_jitter: 0.1,
            restart_exp_attempts: u32::MAX,
            tmp_dirs: vec![std::env::temp_dir()],
            io_backend: IoBackend::Auto,
            default_parallelism: 1,
            max_parallelism: 128,
            buffer_timeout: Duration::from_millis(100),
            rest_port: 8081,
            jobmanager_flight_port: 8815,
            taskmanager_flight_port: 0,
            prometheus_port: 9249,
            placement_mode: PlacementMode::Auto,
            calibration_file: String::new(),
            gpu_coalesce_bytes: 32 << 20,
            gpu_coalesce_latency: Duration::from_millis(20),
            gpu_batches_in_flight: 2,
            data_connections_max: 1024,
            rpc_connections_max: 1024,
            auth_secret: None,
            auth_secret_file: None,
            handshake_timeout: Duration::from_secs(10),
            layout: MemoryLayout::default(),
            origins: keys::KEYS
                .iter()
                .map(|key| (key.name, Origin::DEFAULT))
                .collect(),
        }
    }

    fn apply(&mut self, entry: Entry) -> Result<(), ConfigError> {
        let Some(key) = keys::find(&entry.key) else {
            if let Some(why) = keys::flink_only(&entry.key) {
                tracing::warn!(
                    "{}: `{}` is a Flink setting strata does not use ({why}); ignored",
                    entry.origin,
                    entry.key
                );
                return Ok(());
            }
            return Err(ConfigError::UnknownKey {
                suggestion: keys::closest(&entry.key),
                key: entry.key,
                origin: entry.origin,
            });
        };
        let value = if keys::REDACTED_KEYS.contains(&key.name) {
            keys::REDACTED.to_owned()
        } else {
            entry.value.to_string()
        };
        (key.apply)(self, &entry.value).map_err(|reason| ConfigError::InvalidValue {
            key: entry.key.clone(),
            value,
            origin: entry.origin.clone(),
            reason,
        })?;
        let previous = self.origins.insert(key.name, entry.origin);
        if let Some(previous) = previous.filter(|p| p.source == self.origins[key.name].source) {
            tracing::warn!(key = key.name, %previous, "config key set twice; the later value wins");
        }
        Ok(())
    }

    /// Checks between keys; each key's own range was checked when it was parsed.
    fn validate(&self) -> Result<(), ConfigError> {
        let rules = [
            (
                self.heartbeat_timeout > self.heartbeat_interval,
                ("heartbeat.timeout", "heartbeat.interval"),
                "the heartbeat timeout must be longer than the interval",
            ),
            (
                self.max_parallelism >= self.default_parallelism,
                ("pipeline.max-parallelism", "parallelism.default"),
                "max parallelism must be at least the default parallelism",
            ),
            (
                self.registration_initial_timeout <= self.registration_max_timeout,
                (
                    "cluster.registration.initial-timeout",
                    "cluster.registration.max-timeout",
                ),
                "the initial registration back-off must not exceed the maximum",
            ),
            (
                self.restart_exp_max_backoff >= self.restart_exp_initial_backoff,
                (
                    "restart-strategy.exponential-delay.max-backoff",
                    "restart-strategy.exponential-delay.initial-backoff",
                ),
                "the maximum restart back-off must not be shorter than the initial back-off",
            ),
        ];
        let Some((_, (key, other_key), reason)) = rules.into_iter().find(|(holds, ..)| !holds)
        else {
            return Ok(());
        };
        let show = |name| keys::find(name).map(|k| (k.show)(self).into_boxed_str());
        Err(ConfigError::Conflict {
            key,
            value: show(key).unwrap_or_default(),
            origin: self.origins.get(key).unwrap_or(&Origin::DEFAULT).clone(),
            other_key,
            other_value: show(other_key).unwrap_or_default(),
            reason,
        })
    }
}

impl Default for Config {
    /// The defaults (Flink's, but for the segment size), with the layout
    /// derived.
    fn default() -> Config {
        Config::from_overrides(&[]).expect("the defaults form a valid configuration")
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
            Transport::RdmaEmulated => "rdma-emulated",
        })
    }
}

/// Whole units where that reads well (`384mb`, `32kb`), else MiB with two decimals.
fn human_size(bytes: u64) -> String {
    if bytes < MIB || bytes.is_multiple_of(MIB) {
        return units::format_memory_size(bytes);
    }
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

/// Writes rows under a header, columns padded to their widest cell.
fn write_table(out: &mut String, header: [&str; 3], rows: &[[String; 3]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {}",
            row[0],
            row[1],
            row[2],
            w0 = widths[0],
            w1 = widths[1]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// A config file in its own directory under the system temp dir (the main
    /// crate's tests may use `tempfile`; this module keeps to std), removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, content: &str) -> TempFile {
            let dir_name = format!("strata-config-{}-{name}", std::process::id());
            let dir = std::env::temp_dir().join(dir_name);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    #[test]
    fn defaults_are_flinks() {
        let config = Config::default();
        assert_eq!(config.slot_count, 1);
        assert_eq!(config.process_size_bytes, 1728 * MIB);
        assert_eq!(config.network_max_bytes, u64::MAX);
        // The one default that is not Flink's (see the field's doc).
        assert_eq!(config.segment_size_bytes, 64 << 10);
        assert_eq!(config.transport, Transport::Auto);
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(50));
        assert_eq!(config.registration_timeout, Duration::from_secs(300));
        assert_eq!(config.tmp_dirs, vec![std::env::temp_dir()]);
        assert_eq!(config.jobmanager_port, 6123);
        assert_eq!(config.max_parallelism, 128);
        assert_eq!(config.prometheus_port, 9249);
        assert_eq!(config.checkpoint_interval, None);
        assert_eq!(config.checkpoint_timeout, Duration::from_secs(600));
        let checkpoint_dir = std::env::temp_dir().join("strata-checkpoints");
        assert_eq!(config.checkpoint_dir, checkpoint_dir);
        assert_eq!(config.checkpoints_retained, 1);
        assert_eq!(config.restart_strategy, None);
        assert_eq!(config.restart_fixed_delay_attempts, 1);
        assert_eq!(config.restart_exp_max_backoff, Duration::from_secs(60));
        assert_eq!(config.restart_exp_multiplier, 1.5);
        assert_eq!(config.restart_exp_jitter, 0.1);
        assert_eq!(config.restart_exp_attempts, u32::MAX);
        assert_eq!(config.memory_layout().task_heap, 384 * MIB);
        assert_eq!(config.source_of("rest.port"), Some(&ConfigSource::Default));
        assert_eq!(config.source_of("no.such.key"), None);
    }

    #[test]
    fn default_restart_strategy_follows_checkpointing() {
        let config = Config::default();
        assert_eq!(
            config.effective_restart_strategy(),
            RestartStrategyKind::None
        );
        let config =
            Config::from_overrides(&args(&["execution.checkpointing.interval=10 s"])).unwrap();
        assert_eq!(config.checkpoint_interval, Some(Duration::from_secs(10)));
        assert_eq!(
            config.effective_restart_strategy(),
            RestartStrategyKind::ExponentialDelay
        );
        let config = Config::from_overrides(&args(&[
            "execution.checkpointing.interval=10 s",
            "restart-strategy.type=none",
        ]))
        .unwrap();
        assert_eq!(
            config.effective_restart_strategy(),
            RestartStrategyKind::None
        );
    }

    #[test]
    fn checkpoint_and_restart_keys_set_their_fields() {
        let config = Config::from_overrides(&args(&[
            "execution.checkpointing.interval=500 ms",
            "execution.checkpointing.timeout=2 min",
            "execution.checkpointing.dir=/ck",
            "execution.checkpointing.num-retained=3",
            "restart-strategy.type=fixed-delay",
            "restart-strategy.fixed-delay.attempts=0",
            "restart-strategy.fixed-delay.delay=250 ms",
            "restart-strategy.exponential-delay.initial-backoff=2 s",
            "restart-strategy.exponential-delay.max-backoff=2 s",
            "restart-strategy.exponential-delay.backoff-multiplier=2",
            "restart-strategy.exponential-delay.reset-backoff-threshold=5 min",
            "restart-strategy.exponential-delay.jitter-factor=0",
            "restart-strategy.exponential-delay.attempts-before-reset-backoff=4",
        ]))
        .unwrap();
        assert_eq!(config.checkpoint_interval, Some(Duration::from_millis(500)));
        assert_eq!(config.checkpoint_timeout, Duration::from_secs(120));
        assert_eq!(config.checkpoint_dir, PathBuf::from("/ck"));
        assert_eq!(config.checkpoints_retained, 3);
        assert_eq!(
            config.restart_strategy,
            Some(RestartStrategyKind::FixedDelay)
        );
        assert_eq!(config.restart_fixed_delay_attempts, 0);
        assert_eq!(config.restart_fixed_delay_delay, Duration::from_millis(250));
        assert_eq!(config.restart_exp_initial_backoff, Duration::from_secs(2));
        assert_eq!(config.restart_exp_max_backoff, Duration::from_secs(2));
        assert_eq!(config.restart_exp_multiplier, 2.0);
        assert_eq!(config.restart_exp_reset_threshold, Duration::from_secs(300));
        assert_eq!(config.restart_exp_jitter, 0.0);
        assert_eq!(config.restart_exp_attempts, 4);
    }

    #[test]
    fn older_checkpoint_dir_name_sets_the_same_field() {
        let file = TempFile::new("legacy.yaml", "state.checkpoints.dir: /old/ck\n");
        let config = Config::load(Some(&file.0), None, &[]).unwrap();
        assert_eq!(config.checkpoint_dir, PathBuf::from("/old/ck"));
        let file_source = ConfigSource::File(file.0.clone());
        assert_eq!(
            config.source_of("execution.checkpointing.dir"),
            Some(&file_source)
        );
        let overrides = args(&["execution.checkpointing.dir=/new/ck"]);
        let config = Config::load(Some(&file.0), None, &overrides).unwrap();
        assert_eq!(config.checkpoint_dir, PathBuf::from("/new/ck"));
    }

    #[test]
    fn max_restart_backoff_must_not_be_below_initial() {
        let error = Config::from_overrides(&args(&[
            "restart-strategy.exponential-delay.initial-backoff=2 min",
        ]))
        .unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ConfigError::Conflict { .. }), "{message}");
        assert!(
            message.contains(
                "`restart-strategy.exponential-delay.max-backoff` = 1 min (from default)"
            ),
            "{message}"
        );
        assert!(
            message.contains("`restart-strategy.exponential-delay.initial-backoff` = 2 min"),
            "{message}"
        );
    }

    #[test]
    fn override_beats_env_beats_file_beats_default() {
        let file = TempFile::new(
            "precedence.toml",
            "taskmanager.numberOfTaskSlots = 2\nrest.port = 1\nheartbeat.interval = 2000\n\
             [jobmanager.rpc]\nport = 7000\n",
        );
        let env = "rest.port: 2\njobmanager.rpc.port: 7001\n";
        let overrides = args(&["jobmanager.rpc.port=7002"]);
        let config = Config::load(Some(&file.0), Some(env), &overrides).unwrap();

        assert_eq!(config.slot_count, 2);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(config.rest_port, 2);
        assert_eq!(config.jobmanager_port, 7002);
        assert_eq!(config.data_port, 0);
        let file_source = ConfigSource::File(file.0.clone());
        assert_eq!(
            config.source_of("taskmanager.numberOfTaskSlots"),
            Some(&file_source)
        );
        assert_eq!(config.source_of("rest.port"), Some(&ConfigSource::Env));
        assert_eq!(
            config.source_of("jobmanager.rpc.port"),
            Some(&ConfigSource::CommandLine)
        );
        assert_eq!(
            config.source_of("taskmanager.data.port"),
            Some(&ConfigSource::Default)
        );
    }

    #[test]
    fn flat_yaml_file_sets_typed_fields() {
        let file = TempFile::new(
            "flink.yaml",
            "# shipped defaults\n\
             taskmanager.memory.process.size: 4g\n\
             taskmanager.numberOfTaskSlots: 4\n\
             taskmanager.network.transport: \"tcp\"\n\
             io.tmp.dirs: /data/a,/data/b\n\
             execution.buffer-timeout.interval: 5 ms\n",
        );
        let config = Config::load(Some(&file.0), None, &[]).unwrap();
        assert_eq!(config.process_size_bytes, 4096 * MIB);
        assert_eq!(config.slot_count, 4);
        assert_eq!(config.transport, Transport::Tcp);
        let dirs: Vec<PathBuf> = vec!["/data/a".into(), "/data/b".into()];
        assert_eq!(config.tmp_dirs, dirs);
        assert_eq!(config.buffer_timeout, Duration::from_millis(5));
        assert_eq!(
            config.memory_layout().managed_per_slot * 4,
            config.memory_layout().managed
        );
    }

    #[test]
    fn toml_file_takes_native_integers_and_arrays() {
        let file = TempFile::new(
            "native.toml",
            "[taskmanager.memory]\nprocess.size = 2147483648\n\
             [io.tmp]\ndirs = [\"/x\"]\n\
             [heartbeat]\ninterval = 1000\ntimeout = \"3 s\"\n",
        );
        let config = Config::load(Some(&file.0), None, &[]).unwrap();
        assert_eq!(config.process_size_bytes, 2048 * MIB);
        assert_eq!(config.tmp_dirs, vec![PathBuf::from("/x")]);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(3));
    }

    #[test]
    fn unknown_key_suggests_closest() {
        let error = Config::from_overrides(&args(&["taskmanager.numberOfTaskSlot=4"])).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ConfigError::UnknownKey { .. }));
        assert!(
            message.contains("`taskmanager.numberOfTaskSlot`"),
            "{message}"
        );
        assert!(message.contains("from -D"), "{message}");
        assert!(
            message.contains("did you mean `taskmanager.numberOfTaskSlots`"),
            "{message}"
        );

        let error =
            Config::from_overrides(&args(&["high-availability.type=zookeeper"])).unwrap_err();
        assert!(!error.to_string().contains("did you mean"), "{error}");
    }

    #[test]
    fn unknown_key_in_a_file_names_the_file_and_line() {
        let file = TempFile::new("typo.yaml", "rest.port: 1\n\nheartbeat.intervall: 5 s\n");
        let message = Config::load(Some(&file.0), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&format!("{}:3", file.0.display())),
            "{message}"
        );
        assert!(
            message.contains("did you mean `heartbeat.interval`"),
            "{message}"
        );

        let error = Config::load(None, Some("\nrest.prot: 1"), &[]).unwrap_err();
        assert!(
            error.to_string().contains("from STRATA_PROPERTIES line 2"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_name_key_value_origin_and_reason() {
        let cases = [
            (
                "taskmanager.memory.process.size=lots",
                "expected a memory size like 1728m",
            ),
            (
                "taskmanager.memory.managed.fraction=1.2",
                "fraction must be in [0, 1]",
            ),
            ("taskmanager.numberOfTaskSlots=0", "must be at least 1"),
            ("taskmanager.memory.segment-size=48kb", "power of two"),
            ("heartbeat.interval=soon", "expected a duration like 10 s"),
            (
                "taskmanager.network.transport=udp",
                "expected one of auto, tcp, rdma",
            ),
            ("pipeline.max-parallelism=40000", "between 1 and 32768"),
            ("rest.port=99999", "expected a port number"),
            (
                "execution.checkpointing.interval=0",
                "must be longer than zero",
            ),
            ("execution.checkpointing.interval=sometimes", "or none"),
            (
                "execution.checkpointing.num-retained=0",
                "must be at least 1",
            ),
            (
                "restart-strategy.type=failure-rate",
                "expected one of none, fixed-delay",
            ),
            (
                "restart-strategy.exponential-delay.backoff-multiplier=0.5",
                "at least 1.0",
            ),
            (
                "restart-strategy.exponential-delay.jitter-factor=1.5",
                "fraction must be in [0, 1]",
            ),
            (
                "restart-strategy.exponential-delay.attempts-before-reset-backoff=0",
                "must be at least 1",
            ),
        ];
        for (argument, reason) in cases {
            let error = Config::from_overrides(&args(&[argument])).unwrap_err();
            let (key, value) = argument.split_once('=').unwrap();
            let message = error.to_string();
            assert!(
                matches!(error, ConfigError::InvalidValue { .. }),
                "{message}"
            );
            assert!(message.contains(&format!("`{key}`")), "{message}");
            assert!(message.contains(&format!("`{value}`")), "{message}");
            assert!(message.contains("from -D"), "{message}");
            assert!(message.contains(reason), "{message}");
        }
    }

    #[test]
    fn bad_value_in_toml_names_file_and_line() {
        let file = TempFile::new("bad.toml", "\n[taskmanager]\nnumberOfTaskSlots = -2\n");
        let message = Config::load(Some(&file.0), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&format!("{}:3", file.0.display())),
            "{message}"
        );
        assert!(message.contains("`-2`"), "{message}");
    }

    #[test]
    fn heartbeat_timeout_must_exceed_interval() {
        let error = Config::from_overrides(&args(&["heartbeat.timeout=10 s"])).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ConfigError::Conflict { .. }));
        assert!(
            message.contains("`heartbeat.timeout` = 10 s (from -D)"),
            "{message}"
        );
        assert!(message.contains("`heartbeat.interval` = 10 s"), "{message}");
    }

    #[test]
    fn max_parallelism_must_cover_default_parallelism() {
        let error = Config::from_overrides(&args(&["parallelism.default=200"])).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("`pipeline.max-parallelism` = 128 (from default)"),
            "{message}"
        );
        assert!(message.contains("`parallelism.default` = 200"), "{message}");
    }

    /// The `config.yaml` Flink 2 ships loads: its nested blocks are read,
    /// the settings strata shares with Flink take effect, and those that
    /// mean nothing here (JVM options, bind hosts, the failover strategy)
    /// are ignored with a warning. A typo is still an error.
    #[test]
    fn flink_2_default_config_yaml_loads() {
        let flink = format!(
            "{}state:\n  backend:\n    type: hashmap\n",
            source::FLINK_2_CONFIG_YAML
        );
        let file = TempFile::new("config.yaml", &flink);
        let config = Config::load(Some(&file.0), None, &[]).unwrap();
        assert_eq!(config.slot_count, 1);
        assert_eq!(config.process_size_bytes, 1728 << 20);
        assert_eq!(config.default_parallelism, 1);
        let file_source = ConfigSource::File(file.0.clone());
        assert_eq!(config.source_of("jobmanager.rpc.port"), Some(&file_source));
        assert_eq!(
            config.source_of("taskmanager.memory.process.size"),
            Some(&file_source)
        );

        let typo = TempFile::new("typo-config.yaml", "taskmanager:\n  numberOfTaskSlot: 2\n");
        let error = Config::load(Some(&typo.0), None, &[]).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("taskmanager.numberOfTaskSlot`"),
            "{message}"
        );
        assert!(message.contains("typo-config.yaml:2"), "{message}");
        let unsupported = args(&["high-availability.type=zookeeper"]);
        assert!(Config::load(None, None, &unsupported).is_err());
    }

    #[test]
    fn malformed_file_errors_name_the_path() {
        let file = TempFile::new("nested.yaml", "taskmanager: |\n  numberOfTaskSlots: 4\n");
        let error = Config::load(Some(&file.0), None, &[]).unwrap_err();
        assert!(matches!(
            error,
            ConfigError::FileParse { line: Some(1), .. }
        ));
        assert!(error.to_string().contains("nested.yaml:1"), "{error}");

        let missing = Path::new("/nonexistent/strata.yaml");
        let error = Config::load(Some(missing), None, &[]).unwrap_err();
        assert!(matches!(error, ConfigError::FileRead { .. }));
        assert!(
            error.to_string().contains("/nonexistent/strata.yaml"),
            "{error}"
        );
    }

    #[test]
    fn malformed_override_is_reported() {
        let error = Config::from_overrides(&args(&["rest.port"])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "-D argument `rest.port` is not of the form key=value"
        );
    }

    #[test]
    fn render_table_lists_values_sources_and_layout() {
        let overrides = args(&["taskmanager.numberOfTaskSlots=2"]);
        let table = Config::from_overrides(&overrides).unwrap().render_table();
        let slot_line = table
            .lines()
            .find(|line| line.starts_with("taskmanager.numberOfTaskSlots "))
            .unwrap();
        assert!(
            slot_line.contains(" 2 ") && slot_line.ends_with("-D"),
            "{slot_line}"
        );
        let process_line = table
            .lines()
            .find(|line| line.starts_with("taskmanager.memory.process.size "))
            .unwrap();
        assert!(process_line.contains("1728mb") && process_line.ends_with("default"));
        for expected in [
            "384mb",
            "512mb",
            "128mb",
            "1280mb",
            "192mb",
            "256mb",
            "2048 x 64kb",
        ] {
            assert!(table.contains(expected), "missing {expected} in\n{table}");
        }
        let metaspace_line = table.lines().find(|l| l.starts_with("  jvm metaspace"));
        let metaspace_line = metaspace_line.unwrap();
        assert!(metaspace_line.contains("256mb") && metaspace_line.ends_with("268435456"));
        let value_column = |line: &str| line.find("1728mb");
        assert_eq!(
            value_column(process_line),
            table.lines().next().unwrap().find("VALUE")
        );
    }

    /// Every key as `strata config` prints it, as `-D` arguments; an unset
    /// optional key prints nothing and is left out (setting it empty is an
    /// error for the secret keys).
    fn shown_overrides(config: &Config) -> Vec<String> {
        keys::KEYS
            .iter()
            .map(|key| (key.name, (key.show)(config)))
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| format!("{name}={value}"))
            .collect()
    }

    #[test]
    fn the_cluster_secret_is_never_printed() {
        let secret = "hunter2-hunter2-hunter2";
        let config = Config::from_overrides(&args(&[
            &format!("security.auth.secret={secret}"),
            "security.handshake.timeout=3 s",
        ]))
        .unwrap();
        assert_eq!(
            config.auth_secret.as_ref().map(SecretText::expose),
            Some(secret)
        );
        assert_eq!(config.handshake_timeout, Duration::from_secs(3));
        let table = config.render_table();
        let line = table
            .lines()
            .find(|line| line.starts_with("security.auth.secret "))
            .unwrap();
        assert!(line.contains("<redacted>"), "{line}");
        for printed in [table, format!("{config:?}")] {
            assert!(!printed.contains(secret), "the secret leaked:\n{printed}");
        }
        // Not even an error about the key repeats what was given.
        let error = Config::from_overrides(&args(&["security.auth.secret= "])).unwrap_err();
        assert!(error.to_string().contains("<redacted>"), "{error}");
        let defaults = Config::default();
        assert_eq!(defaults.auth_secret, None);
        assert_eq!(defaults.auth_secret_file, None);
        assert_eq!(defaults.handshake_timeout, Duration::from_secs(10));
        assert_eq!(defaults.data_connections_max, 1024);
        assert_eq!(defaults.rpc_connections_max, 1024);
        assert!(Config::from_overrides(&args(&["taskmanager.data.connections.max=0"])).is_err());
    }

    #[test]
    fn rendered_values_load_back_to_the_same_config() {
        let config = Config::from_overrides(&args(&["heartbeat.timeout=2 min"])).unwrap();
        let shown = |config: &Config| -> Vec<String> {
            keys::KEYS.iter().map(|key| (key.show)(config)).collect()
        };
        let reloaded = Config::from_overrides(&shown_overrides(&config)).unwrap();
        assert_eq!(shown(&reloaded), shown(&config));
        assert_eq!(reloaded.memory_layout(), config.memory_layout());
        assert_eq!(reloaded.heartbeat_timeout, Duration::from_secs(120));
    }

    #[test]
    fn rendered_checkpoint_and_restart_values_load_back() {
        for overrides in [
            args(&[]),
            args(&[
                "execution.checkpointing.interval=30 s",
                "state.checkpoints.dir=/ck",
                "restart-strategy.type=exponentialdelay",
                "restart-strategy.exponential-delay.backoff-multiplier=1.25",
            ]),
        ] {
            let config = Config::from_overrides(&overrides).unwrap();
            let reloaded = Config::from_overrides(&shown_overrides(&config)).unwrap();
            assert_eq!(reloaded.checkpoint_interval, config.checkpoint_interval);
            assert_eq!(reloaded.checkpoint_dir, config.checkpoint_dir);
            assert_eq!(reloaded.restart_strategy, config.restart_strategy);
            assert_eq!(
                reloaded.restart_exp_multiplier,
                config.restart_exp_multiplier
            );
            assert_eq!(reloaded.restart_exp_attempts, config.restart_exp_attempts);
        }
        let table = Config::default().render_table();
        for expected in [
            "execution.checkpointing.interval",
            "none",
            "restart-strategy.type",
            "default",
            "4294967295",
        ] {
            assert!(table.contains(expected), "missing {expected} in\n{table}");
        }
    }
}
