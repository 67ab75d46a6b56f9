//! Flink's TaskManager memory model, derived from `taskmanager.memory.process.size`.
//!
//! ```text
//! process = jvm overhead + jvm metaspace + total flink
//! total flink = framework heap + framework off-heap + task heap + task off-heap + managed + network
//! ```
//!
//! As in Flink, overhead is `fraction × process` clamped to [min, max], network is
//! `fraction × total flink` clamped to [min, max], managed is `fraction × total
//! flink`, and task heap takes what is left. Unlike Flink, network is rounded
//! down to whole segments and managed to whole pages per slot, so that every
//! pool is an exact number of buffers; task heap absorbs the remainder.
//! Fractions are applied in parts per billion, not in floating point, so that
//! `0.4 × 1280m` is exactly `512m` and rounding down to pages never loses one.

use super::{Config, ConfigError};

const MIB: u64 = 1 << 20;
const PARTS_PER_BILLION: u128 = 1_000_000_000;

/// Where every byte of `process_size` goes. Invariant: the components add up,
/// `process_size = jvm_overhead + jvm_metaspace + total_flink` and
/// `total_flink = framework_heap + framework_off_heap + task_heap + task_off_heap + managed + network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryLayout {
    pub process_size: u64,
    pub jvm_overhead: u64,
    /// Reserved for code, thread stacks and allocator metadata; the key keeps Flink's name.
    pub jvm_metaspace: u64,
    pub total_flink: u64,
    pub framework_heap: u64,
    pub framework_off_heap: u64,
    pub task_heap: u64,
    pub task_off_heap: u64,
    /// Whole pages per slot times the slot count.
    pub managed: u64,
    /// Whole segments.
    pub network: u64,
    pub managed_per_slot: u64,
    pub network_segment_count: u64,
}

/// The sizes that follow from one process size, before validation.
struct Draft {
    jvm_overhead: u64,
    total_flink: u64,
    network: u64,
    managed: u64,
    managed_per_slot: u64,
    /// Framework heap, both off-heaps, managed and network: all but task heap.
    reserved: u64,
}

impl MemoryLayout {
    /// Derives the layout and refuses one that cannot work.
    pub(super) fn derive(config: &Config) -> Result<MemoryLayout, ConfigError> {
        check_min_max(
            "taskmanager.memory.jvm-overhead.min",
            "taskmanager.memory.jvm-overhead.max",
            config.jvm_overhead_min_bytes,
            config.jvm_overhead_max_bytes,
        )?;
        check_min_max(
            "taskmanager.memory.network.min",
            "taskmanager.memory.network.max",
            config.network_min_bytes,
            config.network_max_bytes,
        )?;
        let draft = draft(config, config.process_size_bytes);
        if draft.total_flink == 0 {
            return Err(ConfigError::LayoutTotalFlinkNotPositive {
                process_size: config.process_size_bytes,
                jvm_overhead: draft.jvm_overhead,
                jvm_metaspace: config.jvm_metaspace_bytes,
            });
        }
        let Some(task_heap) = draft.total_flink.checked_sub(draft.reserved) else {
            return Err(task_heap_negative(config, &draft));
        };
        let layout = MemoryLayout {
            process_size: config.process_size_bytes,
            jvm_overhead: draft.jvm_overhead,
            jvm_metaspace: config.jvm_metaspace_bytes,
            total_flink: draft.total_flink,
            framework_heap: config.framework_heap_bytes,
            framework_off_heap: config.framework_off_heap_bytes,
            task_heap,
            task_off_heap: config.task_off_heap_bytes,
            managed: draft.managed,
            network: draft.network,
            managed_per_slot: draft.managed_per_slot,
            network_segment_count: draft.network / config.segment_size_bytes,
        };
        check_network_segments(config, &layout)?;
        check_managed_per_slot(config, &layout)?;
        layout.assert_components_add_up();
        Ok(layout)
    }

    /// `(label, bytes)` for each component, in the order `strata config` prints them.
    pub(super) fn rows(&self) -> [(&'static str, u64); 11] {
        [
            ("process", self.process_size),
            ("  jvm overhead", self.jvm_overhead),
            ("  jvm metaspace", self.jvm_metaspace),
            ("  total flink", self.total_flink),
            ("    framework heap", self.framework_heap),
            ("    framework off-heap", self.framework_off_heap),
            ("    task heap", self.task_heap),
            ("    task off-heap", self.task_off_heap),
            ("    managed", self.managed),
            ("    network", self.network),
            ("managed per slot", self.managed_per_slot),
        ]
    }

    fn assert_components_add_up(&self) {
        assert_eq!(
            self.process_size,
            self.jvm_overhead + self.jvm_metaspace + self.total_flink
        );
        let flink_parts = [
            self.framework_heap,
            self.framework_off_heap,
            self.task_heap,
            self.task_off_heap,
            self.managed,
            self.network,
        ];
        assert_eq!(self.total_flink, flink_parts.iter().sum::<u64>());
    }
}

fn draft(config: &Config, process_size: u64) -> Draft {
    let jvm_overhead = fraction_of(process_size, config.jvm_overhead_fraction)
        .clamp(config.jvm_overhead_min_bytes, config.jvm_overhead_max_bytes);
    let total_flink = process_size
        .saturating_sub(jvm_overhead)
        .saturating_sub(config.jvm_metaspace_bytes);
    let network = fraction_of(total_flink, config.network_fraction)
        .clamp(config.network_min_bytes, config.network_max_bytes);
    let network = round_down(network, config.segment_size_bytes);
    let slot_count = u64::from(config.slot_count);
    let managed_per_slot = round_down(
        fraction_of(total_flink, config.managed_fraction) / slot_count,
        config.page_size_bytes,
    );
    let managed = managed_per_slot * slot_count;
    let reserved = [
        config.framework_heap_bytes,
        config.framework_off_heap_bytes,
        config.task_off_heap_bytes,
        managed,
        network,
    ]
    .iter()
    .fold(0u64, |sum, bytes| sum.saturating_add(*bytes));
    Draft {
        jvm_overhead,
        total_flink,
        network,
        managed,
        managed_per_slot,
        reserved,
    }
}

fn check_min_max(
    min_key: &'static str,
    max_key: &'static str,
    min_bytes: u64,
    max_bytes: u64,
) -> Result<(), ConfigError> {
    if min_bytes <= max_bytes {
        return Ok(());
    }
    Err(ConfigError::LayoutMinAboveMax {
        min_key,
        max_key,
        min_bytes,
        max_bytes,
    })
}

fn task_heap_negative(config: &Config, draft: &Draft) -> ConfigError {
    ConfigError::LayoutTaskHeapNegative {
        total_flink: draft.total_flink,
        framework_heap: config.framework_heap_bytes,
        framework_off_heap: config.framework_off_heap_bytes,
        task_off_heap: config.task_off_heap_bytes,
        managed: draft.managed,
        network: draft.network,
        shortfall: draft.reserved - draft.total_flink,
        process_size_needed: smallest_fitting_process_size(config),
    }
}

/// Every input channel of every slot needs its exclusive buffers at once.
fn check_network_segments(config: &Config, layout: &MemoryLayout) -> Result<(), ConfigError> {
    let required_segments = u64::from(config.slot_count) * u64::from(config.buffers_per_channel);
    if layout.network_segment_count >= required_segments {
        return Ok(());
    }
    Err(ConfigError::LayoutNetworkTooSmall {
        network: layout.network,
        segment_size: config.segment_size_bytes,
        segment_count: layout.network_segment_count,
        slot_count: config.slot_count,
        buffers_per_channel: config.buffers_per_channel,
        required_segments,
    })
}

/// A managed fraction of exactly zero turns managed memory off, as in Flink;
/// any other fraction must leave each slot at least one page.
fn check_managed_per_slot(config: &Config, layout: &MemoryLayout) -> Result<(), ConfigError> {
    if config.managed_fraction == 0.0 || layout.managed_per_slot >= config.page_size_bytes {
        return Ok(());
    }
    Err(ConfigError::LayoutManagedPerSlotTooSmall {
        managed_per_slot: layout.managed_per_slot,
        page_size: config.page_size_bytes,
        slot_count: config.slot_count,
    })
}

/// The smallest process size, rounded up to a MiB, whose task heap is not
/// negative; `None` when the fractions leave no room at any size. Task heap
/// grows with process size (overhead and network grow more slowly than total
/// flink), so a binary search finds the boundary.
fn smallest_fitting_process_size(config: &Config) -> Option<u64> {
    let fits = |process_size| {
        let draft = draft(config, process_size);
        draft.total_flink > 0 && draft.reserved <= draft.total_flink
    };
    let (mut low, mut high) = (config.process_size_bytes, u64::MAX / 4);
    if !fits(high) {
        return None;
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if fits(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    Some(high.div_ceil(MIB) * MIB)
}

/// `fraction × bytes`, rounded down, exact for fractions with up to nine decimals.
fn fraction_of(bytes: u64, fraction: f64) -> u64 {
    let parts = (fraction * PARTS_PER_BILLION as f64).round() as u128;
    let product = u128::from(bytes) * parts / PARTS_PER_BILLION;
    u64::try_from(product).expect("a fraction in [0, 1] of a u64 fits in a u64")
}

fn round_down(bytes: u64, unit: u64) -> u64 {
    bytes - bytes % unit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_with(overrides: &[&str]) -> Result<MemoryLayout, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::from_overrides(&overrides).map(|config| *config.memory_layout())
    }

    #[test]
    fn default_process_size_reproduces_flink_layout() {
        let layout = layout_with(&[]).unwrap();
        let expected = MemoryLayout {
            process_size: 1728 * MIB,
            jvm_overhead: 192 * MIB,
            jvm_metaspace: 256 * MIB,
            total_flink: 1280 * MIB,
            framework_heap: 128 * MIB,
            framework_off_heap: 128 * MIB,
            task_heap: 384 * MIB,
            task_off_heap: 0,
            managed: 512 * MIB,
            network: 128 * MIB,
            managed_per_slot: 512 * MIB,
            // 128 MiB of 64 KiB segments (Flink's 32 KiB would give 4096).
            network_segment_count: 2048,
        };
        assert_eq!(layout, expected);
    }

    #[test]
    fn overhead_is_clamped_to_its_max_for_large_processes() {
        let layout = layout_with(&["taskmanager.memory.process.size=16g"]).unwrap();
        assert_eq!(layout.jvm_overhead, 1024 * MIB);
        assert_eq!(layout.total_flink, (16 * 1024 - 1024 - 256) * MIB);
    }

    #[test]
    fn managed_is_split_into_whole_pages_per_slot_and_heap_takes_the_rest() {
        let layout = layout_with(&["taskmanager.numberOfTaskSlots=3"]).unwrap();
        let page = 32 << 10;
        assert_eq!(layout.managed_per_slot % page, 0);
        assert_eq!(layout.managed, 3 * layout.managed_per_slot);
        assert!(512 * MIB - layout.managed < 3 * page);
        assert_eq!(layout.task_heap, 384 * MIB + (512 * MIB - layout.managed));
    }

    #[test]
    fn network_is_rounded_down_to_whole_segments() {
        let layout = layout_with(&["taskmanager.memory.network.min=100000"]).unwrap();
        assert_eq!(layout.network, 128 * MIB);
        let layout = layout_with(&[
            "taskmanager.memory.segment-size=64kb",
            "taskmanager.memory.network.fraction=0.0999999",
        ])
        .unwrap();
        assert_eq!(layout.network % (64 << 10), 0);
        assert_eq!(layout.network_segment_count, layout.network / (64 << 10));
    }

    #[test]
    fn process_too_small_for_overhead_and_metaspace_is_refused() {
        let error = layout_with(&["taskmanager.memory.process.size=400m"]).unwrap_err();
        assert!(matches!(
            error,
            ConfigError::LayoutTotalFlinkNotPositive { .. }
        ));
        let message = error.to_string();
        assert!(
            message.contains("taskmanager.memory.process.size (400mb)"),
            "{message}"
        );
        assert!(
            message.contains("192mb") && message.contains("256mb"),
            "{message}"
        );
    }

    #[test]
    fn negative_task_heap_names_keys_and_the_process_size_that_fits() {
        let error = layout_with(&["taskmanager.memory.framework.heap.size=1g"]).unwrap_err();
        let ConfigError::LayoutTaskHeapNegative {
            shortfall,
            process_size_needed: Some(needed),
            ..
        } = error
        else {
            panic!("unexpected error {error}");
        };
        assert_eq!(shortfall, 512 * MIB);
        let message = error.to_string();
        assert!(message.contains("by 512mb"), "{message}");
        assert!(
            message.contains("taskmanager.memory.framework.heap.size"),
            "{message}"
        );
        assert!(message.contains(&units_text(needed)), "{message}");

        let fitted = layout_with(&[
            "taskmanager.memory.framework.heap.size=1g",
            &format!("taskmanager.memory.process.size={needed}"),
        ]);
        assert!(fitted.is_ok(), "{fitted:?}");
        let smaller = format!("taskmanager.memory.process.size={}", needed - MIB);
        assert!(layout_with(&["taskmanager.memory.framework.heap.size=1g", &smaller]).is_err());
    }

    #[test]
    fn negative_task_heap_without_any_fitting_size_suggests_none() {
        let error = layout_with(&[
            "taskmanager.memory.managed.fraction=0.95",
            "taskmanager.memory.network.fraction=0.1",
        ])
        .unwrap_err();
        assert!(matches!(
            error,
            ConfigError::LayoutTaskHeapNegative {
                process_size_needed: None,
                ..
            }
        ));
        assert!(!error.to_string().contains("raise"), "{error}");
    }

    #[test]
    fn network_without_one_segment_per_slot_and_channel_buffer_is_refused() {
        let error = layout_with(&[
            "taskmanager.numberOfTaskSlots=2",
            "taskmanager.memory.segment-size=32kb",
            "taskmanager.memory.network.min=32kb",
            "taskmanager.memory.network.max=96kb",
        ])
        .unwrap_err();
        assert!(matches!(
            error,
            ConfigError::LayoutNetworkTooSmall {
                segment_count: 3,
                required_segments: 4,
                ..
            }
        ));
        let message = error.to_string();
        assert!(
            message.contains("3 segments") && message.contains("need 4"),
            "{message}"
        );
    }

    #[test]
    fn managed_per_slot_below_one_page_is_refused_unless_turned_off() {
        let error = layout_with(&["taskmanager.memory.managed.fraction=0.00001"]).unwrap_err();
        assert!(matches!(
            error,
            ConfigError::LayoutManagedPerSlotTooSmall {
                managed_per_slot: 0,
                ..
            }
        ));
        assert!(error.to_string().contains("one page (32kb)"), "{error}");
        let off = layout_with(&["taskmanager.memory.managed.fraction=0"]).unwrap();
        assert_eq!(off.managed, 0);
    }

    #[test]
    fn min_above_max_is_refused_naming_both_keys() {
        let error = layout_with(&[
            "taskmanager.memory.network.min=256m",
            "taskmanager.memory.network.max=128m",
        ])
        .unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ConfigError::LayoutMinAboveMax { .. }));
        assert!(
            message.contains("`taskmanager.memory.network.min` (256mb)"),
            "{message}"
        );
        assert!(
            message.contains("`taskmanager.memory.network.max` (128mb)"),
            "{message}"
        );
        let error = layout_with(&["taskmanager.memory.jvm-overhead.min=2g"]).unwrap_err();
        assert!(error.to_string().contains("jvm-overhead.max"), "{error}");
    }

    #[test]
    fn fractions_are_exact_for_decimal_inputs() {
        assert_eq!(fraction_of(1280 * MIB, 0.4), 512 * MIB);
        assert_eq!(fraction_of(1280 * MIB, 0.1), 128 * MIB);
        assert_eq!(fraction_of(u64::MAX, 1.0), u64::MAX);
        assert_eq!(fraction_of(u64::MAX, 0.0), 0);
    }

    fn units_text(bytes: u64) -> String {
        super::super::units::format_memory_size(bytes)
    }
}
