//! Every way loading a configuration can fail. Messages name the key, the value,
//! where it came from and what to change, because they are read by an operator
//! at startup, not by code.

use std::path::PathBuf;

use super::source::Origin;
use super::units::format_memory_size as size;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {cause}", path.display())]
    FileRead {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("cannot parse config file {}{}: {message}", path.display(), at_line(*line))]
    FileParse {
        path: PathBuf,
        line: Option<u32>,
        message: String,
    },
    #[error("config file {} must end in .toml, .yaml or .yml", path.display())]
    UnsupportedFileFormat { path: PathBuf },
    #[error("cannot parse STRATA_PROPERTIES line {line}: {reason}")]
    PropertiesParse { line: u32, reason: &'static str },
    #[error("-D argument `{argument}` is not of the form key=value")]
    MalformedOverride { argument: String },
    #[error("unknown config key `{key}` (from {origin}){}", did_you_mean(*suggestion))]
    UnknownKey {
        key: String,
        origin: Origin,
        suggestion: Option<&'static str>,
    },
    #[error("invalid value `{value}` for `{key}` (from {origin}): {reason}")]
    InvalidValue {
        key: String,
        value: String,
        origin: Origin,
        reason: &'static str,
    },
    /// Two keys disagree. The values are boxed so that `Result<_, ConfigError>` stays small.
    #[error(
        "`{key}` = {value} (from {origin}) conflicts with `{other_key}` = {other_value}: {reason}"
    )]
    Conflict {
        key: &'static str,
        value: Box<str>,
        origin: Origin,
        other_key: &'static str,
        other_value: Box<str>,
        reason: &'static str,
    },
    #[error("`{min_key}` ({}) is larger than `{max_key}` ({})", size(*min_bytes), size(*max_bytes))]
    LayoutMinAboveMax {
        min_key: &'static str,
        max_key: &'static str,
        min_bytes: u64,
        max_bytes: u64,
    },
    #[error(
        "total Flink memory would be zero or negative: taskmanager.memory.process.size ({}) \
         must exceed JVM overhead ({}) plus taskmanager.memory.jvm-metaspace.size ({})",
        size(*process_size), size(*jvm_overhead), size(*jvm_metaspace)
    )]
    LayoutTotalFlinkNotPositive {
        process_size: u64,
        jvm_overhead: u64,
        jvm_metaspace: u64,
    },
    #[error(
        "task heap would be negative: framework heap {} + framework off-heap {} + task off-heap {} \
         + managed {} + network {} exceed total Flink memory {} by {}; free that much by lowering \
         taskmanager.memory.framework.heap.size, taskmanager.memory.framework.off-heap.size, \
         taskmanager.memory.task.off-heap.size, taskmanager.memory.managed.fraction or \
         taskmanager.memory.network.fraction/min{}",
        size(*framework_heap), size(*framework_off_heap), size(*task_off_heap), size(*managed),
        size(*network), size(*total_flink), size(*shortfall), raise_process_size(*process_size_needed)
    )]
    LayoutTaskHeapNegative {
        total_flink: u64,
        framework_heap: u64,
        framework_off_heap: u64,
        task_off_heap: u64,
        managed: u64,
        network: u64,
        shortfall: u64,
        /// The smallest `taskmanager.memory.process.size` that fits, if one does.
        process_size_needed: Option<u64>,
    },
    #[error(
        "network memory {} holds {segment_count} segments of {}, but {slot_count} slots x \
         {buffers_per_channel} buffers per channel need {required_segments}; raise \
         taskmanager.memory.network.fraction or taskmanager.memory.network.min, or lower \
         taskmanager.memory.segment-size",
        size(*network), size(*segment_size)
    )]
    LayoutNetworkTooSmall {
        network: u64,
        segment_size: u64,
        segment_count: u64,
        slot_count: u32,
        buffers_per_channel: u32,
        required_segments: u64,
    },
    #[error(
        "managed memory per slot {} (taskmanager.numberOfTaskSlots = {slot_count}) is smaller than one page ({}); raise \
         taskmanager.memory.managed.fraction, or lower taskmanager.numberOfTaskSlots or \
         taskmanager.memory.page-size",
        size(*managed_per_slot), size(*page_size)
    )]
    LayoutManagedPerSlotTooSmall {
        managed_per_slot: u64,
        page_size: u64,
        slot_count: u32,
    },
}

fn at_line(line: Option<u32>) -> String {
    line.map(|line| format!(":{line}")).unwrap_or_default()
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion
        .map(|key| format!("; did you mean `{key}`?"))
        .unwrap_or_default()
}

fn raise_process_size(needed: Option<u64>) -> String {
    needed
        .map(|bytes| {
            format!(
                ", or raise taskmanager.memory.process.size to at least {}",
                size(bytes)
            )
        })
        .unwrap_or_default()
}
