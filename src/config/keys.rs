//! The table of known keys: each Flink key name, the `Config` field it sets, the
//! parser for its value and the printer for `strata config`.
//!
//! A key's parser checks everything that concerns that key alone (syntax, range,
//! power of two); relations between keys are checked in `Config::validate` and
//! in the memory layout.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::source::RawValue;
use super::units::{self, DURATION_SYNTAX, MEMORY_SYNTAX};
use super::{Config, IoBackend, PlacementMode, RestartStrategyKind, SecretText, Transport};

/// Flink caps max parallelism at 2^15 (`KeyGroupRangeAssignment.UPPER_BOUND_MAX_PARALLELISM`).
pub(super) const MAX_PARALLELISM_LIMIT: u32 = 1 << 15;
const PAGE_BYTES_MIN: u64 = 4 << 10;
const PAGE_BYTES_MAX: u64 = 16 << 20;

/// One known key: `apply` parses a value into its `Config` field (the error is
/// the reason it was refused); `show` prints the effective value so that it parses back.
pub(super) struct Key {
    pub(super) name: &'static str,
    pub(super) apply: fn(&mut Config, &RawValue) -> Result<(), &'static str>,
    pub(super) show: fn(&Config) -> String,
}

/// `"flink.key" => config_field: parser, printer;` for each key, in the order
/// `strata config` prints them.
macro_rules! keys {
    ($($name:literal => $field:ident: $parse:ident, $show:ident;)*) => {
        pub(super) const KEYS: &[Key] = &[$(Key {
            name: $name,
            apply: |config, value| {
                config.$field = $parse(value)?;
                Ok(())
            },
            show: |config| $show(&config.$field),
        }),*];
    };
}

keys! {
    "taskmanager.numberOfTaskSlots"                        => slot_count: at_least_one, show;
    "taskmanager.memory.process.size"                      => process_size_bytes: memory, show_memory;
    "taskmanager.memory.managed.fraction"                  => managed_fraction: fraction, show;
    "taskmanager.memory.network.fraction"                  => network_fraction: fraction, show;
    "taskmanager.memory.network.min"                       => network_min_bytes: memory, show_memory;
    "taskmanager.memory.network.max"                       => network_max_bytes: memory_or_unlimited, show_memory;
    "taskmanager.memory.framework.heap.size"               => framework_heap_bytes: memory, show_memory;
    "taskmanager.memory.framework.off-heap.size"           => framework_off_heap_bytes: memory, show_memory;
    "taskmanager.memory.task.off-heap.size"                => task_off_heap_bytes: memory, show_memory;
    "taskmanager.memory.jvm-metaspace.size"                => jvm_metaspace_bytes: memory, show_memory;
    "taskmanager.memory.jvm-overhead.fraction"             => jvm_overhead_fraction: fraction, show;
    "taskmanager.memory.jvm-overhead.min"                  => jvm_overhead_min_bytes: memory, show_memory;
    "taskmanager.memory.jvm-overhead.max"                  => jvm_overhead_max_bytes: memory, show_memory;
    "taskmanager.memory.segment-size"                      => segment_size_bytes: page_size, show_memory;
    "taskmanager.memory.page-size"                         => page_size_bytes: page_size, show_memory;
    "taskmanager.memory.pre-allocate"                      => pre_allocate: boolean, show;
    "taskmanager.network.memory.buffers-per-channel"       => buffers_per_channel: at_least_one, show;
    "taskmanager.network.memory.floating-buffers-per-gate" => floating_buffers_per_gate: count, show;
    "taskmanager.network.memory.max-buffers-per-channel"   => max_buffers_per_channel: at_least_one, show;
    "taskmanager.network.transport"                        => transport: transport, show;
    "taskmanager.network.compression.enabled"              => compression_enabled: boolean, show;
    "taskmanager.network.compression.codec"                => compression_codec: codec, show;
    "taskmanager.network.checksum.enabled"                 => network_checksum: boolean, show;
    "taskmanager.network.tcp.task-reads"                   => tcp_task_reads: boolean, show;
    "taskmanager.network.memory.buffer-debloat.enabled"    => debloat_enabled: boolean, show;
    "taskmanager.network.memory.buffer-debloat.target"     => debloat_target: positive_duration, show_duration;
    "taskmanager.network.memory.buffer-debloat.period"     => debloat_period: positive_duration, show_duration;
    "taskmanager.network.memory.buffer-debloat.min-buffer-size" => debloat_min_buffer_bytes: memory, show_memory;
    "taskmanager.host"                                     => host: text, show;
    "taskmanager.data.port"                                => data_port: port, show;
    "taskmanager.rpc.port"                                 => rpc_port: port, show;
    "taskmanager.registration.timeout"                     => registration_timeout: duration, show_duration;
    "cluster.registration.initial-timeout"                 => registration_initial_timeout: duration, show_duration;
    "cluster.registration.max-timeout"                     => registration_max_timeout: duration, show_duration;
    "jobmanager.rpc.address"                               => jobmanager_address: text, show;
    "jobmanager.rpc.port"                                  => jobmanager_port: port, show;
    "heartbeat.interval"                                   => heartbeat_interval: positive_duration, show_duration;
    "heartbeat.timeout"                                    => heartbeat_timeout: positive_duration, show_duration;
    "io.tmp.dirs"                                          => tmp_dirs: paths, show_paths;
    "io.backend"                                           => io_backend: io_backend, show;
    "parallelism.default"                                  => default_parallelism: at_least_one, show;
    "pipeline.max-parallelism"                             => max_parallelism: max_parallelism, show;
    "execution.buffer-timeout.interval"                    => buffer_timeout: duration, show_duration;
    "execution.checkpointing.interval"                     => checkpoint_interval: optional_positive_duration, show_optional_duration;
    "execution.checkpointing.timeout"                      => checkpoint_timeout: positive_duration, show_duration;
    "execution.checkpointing.dir"                          => checkpoint_dir: path, show_path;
    "execution.checkpointing.num-retained"                 => checkpoints_retained: at_least_one, show;
    "restart-strategy.type"                                => restart_strategy: restart_strategy, show_restart_strategy;
    "restart-strategy.fixed-delay.attempts"                => restart_fixed_delay_attempts: count, show;
    "restart-strategy.fixed-delay.delay"                   => restart_fixed_delay_delay: duration, show_duration;
    "restart-strategy.exponential-delay.initial-backoff"   => restart_exp_initial_backoff: positive_duration, show_duration;
    "restart-strategy.exponential-delay.max-backoff"       => restart_exp_max_backoff: positive_duration, show_duration;
    "restart-strategy.exponential-delay.backoff-multiplier" => restart_exp_multiplier: multiplier, show;
    "restart-strategy.exponential-delay.reset-backoff-threshold" => restart_exp_reset_threshold: positive_duration, show_duration;
    "restart-strategy.exponential-delay.jitter-factor"     => restart_exp_jitter: fraction, show;
    "restart-strategy.exponential-delay.attempts-before-reset-backoff" => restart_exp_attempts: at_least_one, show;
    "rest.port"                                            => rest_port: port, show;
    "jobmanager.flight.port"                               => jobmanager_flight_port: port, show;
    "taskmanager.flight.port"                              => taskmanager_flight_port: port, show;
    "metrics.reporter.prom.port"                           => prometheus_port: port, show;
    "placement.mode"                                       => placement_mode: placement_mode, show;
    "placement.calibration-file"                           => calibration_file: optional_text, show;
    "taskmanager.gpu.coalesce-bytes"                       => gpu_coalesce_bytes: memory, show_memory;
    "taskmanager.gpu.coalesce-latency"                     => gpu_coalesce_latency: positive_duration, show_duration;
    "taskmanager.gpu.batches-in-flight"                    => gpu_batches_in_flight: in_flight_batches, show;
    "taskmanager.data.connections.max"                     => data_connections_max: at_least_one, show;
    "jobmanager.rpc.connections.max"                       => rpc_connections_max: at_least_one, show;
    "security.auth.secret"                                 => auth_secret: secret, show_secret;
    "security.auth.secret-file"                            => auth_secret_file: optional_path, show_optional_path;
    "security.handshake.timeout"                           => handshake_timeout: positive_duration, show_duration;
}

/// Keys whose values are never printed, not even in an error about them.
pub(super) const REDACTED_KEYS: &[&str] = &["security.auth.secret"];

/// What `strata config` and errors print instead of a redacted value.
pub(super) const REDACTED: &str = "<redacted>";

/// Older Flink names that set the same field as a current key: `(old, current)`.
/// The current name is the one `strata config` prints.
const ALIASES: &[(&str, &str)] = &[("state.checkpoints.dir", "execution.checkpointing.dir")];

/// The key `name` sets, by its current name or an older alias.
pub(super) fn find(name: &str) -> Option<&'static Key> {
    let name = ALIASES
        .iter()
        .find(|(old, _)| *old == name)
        .map_or(name, |(_, current)| current);
    KEYS.iter().find(|key| key.name == name)
}

/// Flink settings that have no meaning in strata, each with why: a file
/// written for Flink (the `config.yaml` Flink ships) loads, and each of these
/// is named in a warning instead of failing as an unknown key. An entry
/// covers itself and every key under it. Anything not here is still an
/// unknown key, so that a typo is never ignored.
const FLINK_ONLY: &[(&str, &str)] = &[
    (
        "env",
        "Flink's launch-script environment (JVM options, log and pid directories); strata is a native process",
    ),
    (
        "jobmanager.memory",
        "the JobManager's JVM memory; strata's JobManager has no heap to size",
    ),
    (
        "classloader",
        "Java class loading; a strata job is a TOML file, not a jar",
    ),
    ("blob.server.port", "strata ships no jars to TaskManagers"),
    (
        "jobmanager.bind-host",
        "the JobManager binds the host of --bind (jobmanager.rpc.address)",
    ),
    (
        "taskmanager.bind-host",
        "a TaskManager binds taskmanager.host",
    ),
    (
        "rest.address",
        "the REST API is served on the JobManager's host",
    ),
    (
        "rest.bind-address",
        "the REST API binds the JobManager's host",
    ),
    (
        "jobmanager.execution.failover-strategy",
        "strata restarts the whole job on a failure, as Flink's `full`",
    ),
    (
        "state.backend",
        "strata keeps keyed state in managed memory and spills it to io.tmp.dirs",
    ),
];

/// Why `name` is a Flink setting strata does not use, if it is one.
pub(super) fn flink_only(name: &str) -> Option<&'static str> {
    FLINK_ONLY
        .iter()
        .find(|(key, _)| {
            name.strip_prefix(key)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        .map(|(_, why)| *why)
}

/// Every accepted key name: the current ones, then the aliases.
fn all_names() -> impl Iterator<Item = &'static str> {
    KEYS.iter()
        .map(|key| key.name)
        .chain(ALIASES.iter().map(|(old, _)| *old))
}

/// The known key closest to `name` by edit distance (ignoring case), if it is
/// close enough to be a plausible typo.
pub(super) fn closest(name: &str) -> Option<&'static str> {
    let name = name.to_lowercase();
    let allowed = (name.chars().count() / 4).max(2);
    all_names()
        .map(|key| (edit_distance(&name, &key.to_lowercase()), key))
        .min_by_key(|(distance, _)| *distance)
        .filter(|(distance, _)| *distance <= allowed)
        .map(|(_, key)| key)
}

/// Levenshtein distance over chars, two rows at a time.
fn edit_distance(source: &str, target: &str) -> usize {
    let target: Vec<char> = target.chars().collect();
    let mut previous: Vec<usize> = (0..=target.len()).collect();
    for (i, s) in source.chars().enumerate() {
        let mut current = vec![i + 1; target.len() + 1];
        for (j, t) in target.iter().enumerate() {
            let substitution = previous[j] + usize::from(s != *t);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[target.len()]
}

fn memory(value: &RawValue) -> Result<u64, &'static str> {
    match value {
        RawValue::Text(text) => units::parse_memory_size(text),
        RawValue::Integer(bytes) => u64::try_from(*bytes).map_err(|_| MEMORY_SYNTAX),
        _ => Err(MEMORY_SYNTAX),
    }
}

/// `unlimited` is how `strata config` prints the default `network.max`.
fn memory_or_unlimited(value: &RawValue) -> Result<u64, &'static str> {
    match value {
        RawValue::Text(text) if text.trim().eq_ignore_ascii_case("unlimited") => Ok(u64::MAX),
        _ => memory(value),
    }
}

fn page_size(value: &RawValue) -> Result<u64, &'static str> {
    let bytes = memory(value)?;
    let in_range = (PAGE_BYTES_MIN..=PAGE_BYTES_MAX).contains(&bytes);
    if bytes.is_power_of_two() && in_range {
        Ok(bytes)
    } else {
        Err("must be a power of two between 4kb and 16mb")
    }
}

fn duration(value: &RawValue) -> Result<Duration, &'static str> {
    match value {
        RawValue::Text(text) => units::parse_duration(text),
        RawValue::Integer(millis) => u64::try_from(*millis)
            .map(Duration::from_millis)
            .map_err(|_| DURATION_SYNTAX),
        _ => Err(DURATION_SYNTAX),
    }
}

fn positive_duration(value: &RawValue) -> Result<Duration, &'static str> {
    Some(duration(value)?)
        .filter(|duration| !duration.is_zero())
        .ok_or("must be longer than zero")
}

/// `strata config` prints `none` for "checkpointing off"; `off` is accepted too.
fn optional_positive_duration(value: &RawValue) -> Result<Option<Duration>, &'static str> {
    match value {
        RawValue::Text(text) if is_one_of(text, &["none", "off"]) => Ok(None),
        _ => positive_duration(value)
            .map(Some)
            .map_err(|reason| match reason {
                DURATION_SYNTAX => "expected a duration like 10 s, 500 ms or 5 min, or none",
                other => other,
            }),
    }
}

fn float(value: &RawValue, syntax: &'static str) -> Result<f64, &'static str> {
    match value {
        RawValue::Text(text) => text.trim().parse().map_err(|_| syntax),
        RawValue::Float(number) => Ok(*number),
        RawValue::Integer(number) => Ok(*number as f64),
        _ => Err(syntax),
    }
}

fn fraction(value: &RawValue) -> Result<f64, &'static str> {
    let number = float(value, "expected a fraction like 0.4")?;
    if (0.0..=1.0).contains(&number) {
        Ok(number)
    } else {
        Err("fraction must be in [0, 1]")
    }
}

/// A back-off multiplier: finite and at least 1 (1 keeps the back-off constant).
fn multiplier(value: &RawValue) -> Result<f64, &'static str> {
    let number = float(value, "expected a number like 1.5")?;
    if number.is_finite() && number >= 1.0 {
        Ok(number)
    } else {
        Err("must be a finite number of at least 1.0")
    }
}

fn count(value: &RawValue) -> Result<u32, &'static str> {
    const SYNTAX: &str = "expected a non-negative integer";
    match value {
        RawValue::Text(text) => text.trim().parse().map_err(|_| SYNTAX),
        RawValue::Integer(number) => u32::try_from(*number).map_err(|_| SYNTAX),
        _ => Err(SYNTAX),
    }
}

fn at_least_one(value: &RawValue) -> Result<u32, &'static str> {
    Some(count(value)?)
        .filter(|n| *n >= 1)
        .ok_or("must be at least 1")
}

/// Device batches a GPU chain keeps in flight: 1 (wait for each) to 4.
fn in_flight_batches(value: &RawValue) -> Result<u32, &'static str> {
    Some(count(value)?)
        .filter(|n| (1..=4).contains(n))
        .ok_or("must be 1 to 4")
}

fn max_parallelism(value: &RawValue) -> Result<u32, &'static str> {
    Some(at_least_one(value)?)
        .filter(|n| *n <= MAX_PARALLELISM_LIMIT)
        .ok_or("must be between 1 and 32768")
}

fn port(value: &RawValue) -> Result<u16, &'static str> {
    u16::try_from(count(value)?).map_err(|_| "expected a port number in 0..=65535")
}

fn text(value: &RawValue) -> Result<String, &'static str> {
    match value {
        RawValue::Text(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        RawValue::Text(_) => Err("must not be empty"),
        _ => Err("expected a string"),
    }
}

/// Flink separates `io.tmp.dirs` with `,` or the path separator `:`; TOML may
/// also give an array of strings.
fn paths(value: &RawValue) -> Result<Vec<PathBuf>, &'static str> {
    let parts: Vec<&str> = match value {
        RawValue::Text(text) => text.split([',', ':']).collect(),
        RawValue::List(items) => items.iter().map(String::as_str).collect(),
        _ => return Err("expected directories separated by `,` or `:`"),
    };
    let dirs: Vec<PathBuf> = parts
        .iter()
        .map(|part| part.trim())
        .filter(|part| !part.is_empty())
        .map(PathBuf::from)
        .collect();
    if dirs.is_empty() {
        return Err("expected at least one directory");
    }
    Ok(dirs)
}

fn path(value: &RawValue) -> Result<PathBuf, &'static str> {
    text(value).map(PathBuf::from)
}

fn boolean(value: &RawValue) -> Result<bool, &'static str> {
    const SYNTAX: &str = "expected true or false";
    match value {
        RawValue::Bool(b) => Ok(*b),
        RawValue::Text(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(SYNTAX),
        },
        _ => Err(SYNTAX),
    }
}

fn codec(value: &RawValue) -> Result<String, &'static str> {
    const SYNTAX: &str = "expected LZ4 (the only shuffle compression codec strata supports)";
    match value {
        RawValue::Text(text) if text.trim().eq_ignore_ascii_case("lz4") => Ok("LZ4".to_owned()),
        _ => Err(SYNTAX),
    }
}

fn io_backend(value: &RawValue) -> Result<IoBackend, &'static str> {
    const SYNTAX: &str = "expected one of auto, io_uring, threadpool";
    let RawValue::Text(text) = value else {
        return Err(SYNTAX);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(IoBackend::Auto),
        "io_uring" | "uring" => Ok(IoBackend::Uring),
        "threadpool" | "thread-pool" => Ok(IoBackend::ThreadPool),
        _ => Err(SYNTAX),
    }
}

fn transport(value: &RawValue) -> Result<Transport, &'static str> {
    const SYNTAX: &str = "expected one of auto, tcp, rdma, rdma-emulated";
    let RawValue::Text(text) = value else {
        return Err(SYNTAX);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Transport::Auto),
        "tcp" => Ok(Transport::Tcp),
        "rdma" => Ok(Transport::Rdma),
        "rdma-emulated" => Ok(Transport::RdmaEmulated),
        _ => Err(SYNTAX),
    }
}

fn placement_mode(value: &RawValue) -> Result<PlacementMode, &'static str> {
    const SYNTAX: &str = "expected one of auto, cpu, gpu";
    let RawValue::Text(text) = value else {
        return Err(SYNTAX);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(PlacementMode::Auto),
        "cpu" => Ok(PlacementMode::Cpu),
        "gpu" => Ok(PlacementMode::Gpu),
        _ => Err(SYNTAX),
    }
}

/// `default` (what `strata config` prints when unset) leaves the choice to
/// Flink's rule; see [`Config::effective_restart_strategy`].
fn restart_strategy(value: &RawValue) -> Result<Option<RestartStrategyKind>, &'static str> {
    const SYNTAX: &str = "expected one of none, fixed-delay, exponential-delay or default";
    let RawValue::Text(text) = value else {
        return Err(SYNTAX);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "default" => Ok(None),
        "none" | "off" | "disable" => Ok(Some(RestartStrategyKind::None)),
        "fixed-delay" | "fixeddelay" => Ok(Some(RestartStrategyKind::FixedDelay)),
        "exponential-delay" | "exponentialdelay" => Ok(Some(RestartStrategyKind::ExponentialDelay)),
        _ => Err(SYNTAX),
    }
}

fn is_one_of(text: &str, words: &[&str]) -> bool {
    let text = text.trim();
    words.iter().any(|word| text.eq_ignore_ascii_case(word))
}

/// A string that may be empty (empty means "the default").
fn optional_text(value: &RawValue) -> Result<String, &'static str> {
    match value {
        RawValue::Text(text) => Ok(text.trim().to_owned()),
        _ => Err("expected a string"),
    }
}

/// The cluster secret: any non-empty text (its length is checked where it
/// is used, by `security::ClusterSecret::from_config`, so that the error
/// there covers the secret file and the environment variable alike).
fn secret(value: &RawValue) -> Result<Option<SecretText>, &'static str> {
    match value {
        RawValue::Text(text) if !text.trim().is_empty() => {
            Ok(Some(SecretText::new(text.trim().to_owned())))
        }
        RawValue::Text(_) => Err("must not be empty (leave the key unset for no secret)"),
        _ => Err("expected a string"),
    }
}

fn optional_path(value: &RawValue) -> Result<Option<PathBuf>, &'static str> {
    path(value).map(Some)
}

fn show(value: &impl Display) -> String {
    value.to_string()
}

fn show_memory(bytes: &u64) -> String {
    units::format_memory_size(*bytes)
}

fn show_duration(duration: &Duration) -> String {
    units::format_duration(*duration)
}

fn show_optional_duration(duration: &Option<Duration>) -> String {
    duration.map_or_else(|| "none".to_owned(), units::format_duration)
}

fn show_path(path: &Path) -> String {
    path.display().to_string()
}

/// Never the secret itself: `<redacted>` when one is set, nothing otherwise.
fn show_secret(secret: &Option<SecretText>) -> String {
    secret
        .as_ref()
        .map_or_else(String::new, |_| REDACTED.to_owned())
}

fn show_optional_path(path: &Option<PathBuf>) -> String {
    path.as_deref().map_or_else(String::new, show_path)
}

fn show_restart_strategy(kind: &Option<RestartStrategyKind>) -> String {
    kind.map_or_else(|| "default".to_owned(), |kind| kind.to_string())
}

fn show_paths(dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = dirs.iter().map(|dir| dir.display().to_string()).collect();
    dirs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_value(s: &str) -> RawValue {
        RawValue::Text(s.to_owned())
    }

    #[test]
    fn key_names_are_unique_and_none_is_a_prefix_of_another() {
        // A key that is a dotted prefix of another could not be written in TOML.
        let names: Vec<&str> = all_names().collect();
        for (i, a) in names.iter().enumerate() {
            for (j, b) in names.iter().enumerate() {
                if i != j {
                    assert_ne!(a, b);
                    assert!(!b.starts_with(&format!("{a}.")), "{a}");
                }
            }
        }
    }

    #[test]
    fn an_alias_finds_the_key_of_its_current_name() {
        let key = find("state.checkpoints.dir").unwrap();
        assert_eq!(key.name, "execution.checkpointing.dir");
        assert!(ALIASES.iter().all(|(_, current)| find(current).is_some()));
    }

    #[test]
    fn closest_key_tolerates_typos_and_case() {
        let cases = [
            (
                "taskmanager.numberOfTaskSlot",
                Some("taskmanager.numberOfTaskSlots"),
            ),
            (
                "taskmanager.numberoftaskslots",
                Some("taskmanager.numberOfTaskSlots"),
            ),
            ("heartbeat.intervall", Some("heartbeat.interval")),
            ("rest.prot", Some("rest.port")),
            (
                "taskmanager.memory.process",
                Some("taskmanager.memory.process.size"),
            ),
            (
                "execution.checkpointing.intervall",
                Some("execution.checkpointing.interval"),
            ),
            ("state.checkpoint.dir", Some("state.checkpoints.dir")),
            (
                "restart-strategy.fixed-delay.attempt",
                Some("restart-strategy.fixed-delay.attempts"),
            ),
            ("state.backend.type", None),
            ("x", None),
        ];
        for (typo, expected) in cases {
            assert_eq!(closest(typo), expected, "{typo}");
        }
    }

    #[test]
    fn value_parsers_accept_flink_forms_and_explain_refusals() {
        assert_eq!(fraction(&text_value("0.25")), Ok(0.25));
        assert_eq!(fraction(&RawValue::Integer(1)), Ok(1.0));
        assert_eq!(
            fraction(&text_value("1.5")),
            Err("fraction must be in [0, 1]")
        );
        assert_eq!(
            fraction(&RawValue::Float(f64::NAN)),
            Err("fraction must be in [0, 1]")
        );
        assert_eq!(memory(&RawValue::Integer(4096)), Ok(4096));
        assert_eq!(memory(&RawValue::Integer(-1)), Err(MEMORY_SYNTAX));
        assert_eq!(memory_or_unlimited(&text_value("Unlimited")), Ok(u64::MAX));
        assert_eq!(
            duration(&RawValue::Integer(250)),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(page_size(&text_value("64kb")), Ok(64 << 10));
        assert!(page_size(&text_value("48kb")).is_err());
        assert!(page_size(&text_value("2kb")).is_err());
        assert!(page_size(&text_value("32mb")).is_err());
        assert_eq!(at_least_one(&text_value("0")), Err("must be at least 1"));
        assert!(port(&text_value("70000")).is_err());
        assert!(max_parallelism(&text_value("32769")).is_err());
        assert_eq!(transport(&text_value("RDMA")), Ok(Transport::Rdma));
        assert!(transport(&text_value("udp")).is_err());
        assert_eq!(placement_mode(&text_value("GPU")), Ok(PlacementMode::Gpu));
        assert!(placement_mode(&text_value("tpu")).is_err());
        assert!(text(&text_value("  ")).is_err());
    }

    #[test]
    fn checkpoint_and_restart_parsers_accept_flink_forms_and_explain_refusals() {
        assert_eq!(optional_positive_duration(&text_value("none")), Ok(None));
        assert_eq!(optional_positive_duration(&text_value(" OFF ")), Ok(None));
        assert_eq!(
            optional_positive_duration(&text_value("30 s")),
            Ok(Some(Duration::from_secs(30)))
        );
        assert_eq!(
            optional_positive_duration(&RawValue::Integer(500)),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(
            optional_positive_duration(&text_value("0 s")),
            Err("must be longer than zero")
        );
        assert!(
            optional_positive_duration(&text_value("never"))
                .unwrap_err()
                .ends_with("or none")
        );
        let kinds = [
            ("default", None),
            ("none", Some(RestartStrategyKind::None)),
            ("off", Some(RestartStrategyKind::None)),
            ("disable", Some(RestartStrategyKind::None)),
            ("fixed-delay", Some(RestartStrategyKind::FixedDelay)),
            ("FixedDelay", Some(RestartStrategyKind::FixedDelay)),
            (
                "exponential-delay",
                Some(RestartStrategyKind::ExponentialDelay),
            ),
            (
                "exponentialdelay",
                Some(RestartStrategyKind::ExponentialDelay),
            ),
        ];
        for (text, kind) in kinds {
            assert_eq!(restart_strategy(&text_value(text)), Ok(kind), "{text}");
            assert_eq!(
                restart_strategy(&text_value(&show_restart_strategy(&kind))),
                Ok(kind)
            );
        }
        assert!(restart_strategy(&text_value("failure-rate")).is_err());
        assert_eq!(multiplier(&text_value("1.5")), Ok(1.5));
        assert_eq!(multiplier(&RawValue::Integer(2)), Ok(2.0));
        for refused in ["0.5", "inf", "NaN", "-2"] {
            assert!(multiplier(&text_value(refused)).is_err(), "{refused}");
        }
        assert_eq!(
            multiplier(&text_value("fast")),
            Err("expected a number like 1.5")
        );
        assert_eq!(path(&text_value(" /ck ")), Ok(PathBuf::from("/ck")));
        assert!(path(&text_value("")).is_err());
    }

    #[test]
    fn tmp_dirs_split_on_commas_and_colons_or_take_a_list() {
        let expected: Vec<PathBuf> = vec!["/a".into(), "/b".into(), "/c".into()];
        assert_eq!(paths(&text_value("/a,/b:/c")), Ok(expected.clone()));
        let list = RawValue::List(vec!["/a".into(), "/b".into(), "/c".into()]);
        assert_eq!(paths(&list), Ok(expected));
        assert!(paths(&text_value(" , ")).is_err());
    }
}
