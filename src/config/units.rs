//! Flink's text syntax for memory sizes and durations, parsed and printed.
//!
//! Both are an unsigned integer followed by an optional unit, with optional
//! whitespace between them; units are case-insensitive. Memory units are binary
//! (`1k` is 1024 bytes) and a bare number is bytes; a bare duration is
//! milliseconds. Printing picks the largest unit that divides the value exactly,
//! so what `strata config` prints parses back to the same value.

use std::time::Duration;

pub(super) const MEMORY_SYNTAX: &str = "expected a memory size like 1728m, 32kb or 1 gb";
pub(super) const DURATION_SYNTAX: &str = "expected a duration like 10 s, 500 ms or 5 min";

const KIB: u64 = 1024;
const MEMORY_UNITS: &[(&[&str], u64)] = &[
    (&["", "b", "bytes"], 1),
    (&["k", "kb", "kibibytes"], KIB),
    (&["m", "mb", "mebibytes"], KIB.pow(2)),
    (&["g", "gb", "gibibytes"], KIB.pow(3)),
    (&["t", "tb", "tebibytes"], KIB.pow(4)),
];

const NANOS_PER_MS: u128 = 1_000_000;
/// Flink's `TimeUtils` spellings, plus `us` for those without a `µ` key.
const DURATION_UNITS: &[(&[&str], u128)] = &[
    (&["ns", "nano", "nanos", "nanosecond", "nanoseconds"], 1),
    (
        &["us", "µs", "micro", "micros", "microsecond", "microseconds"],
        1_000,
    ),
    (
        &["", "ms", "milli", "millis", "millisecond", "milliseconds"],
        NANOS_PER_MS,
    ),
    (
        &["s", "sec", "secs", "second", "seconds"],
        1_000 * NANOS_PER_MS,
    ),
    (
        &["min", "m", "mins", "minute", "minutes"],
        60_000 * NANOS_PER_MS,
    ),
    (&["h", "hour", "hours"], 3_600_000 * NANOS_PER_MS),
    (&["d", "day", "days"], 86_400_000 * NANOS_PER_MS),
];

/// Parses `1728m`, `32kb`, `1 gb`, `512 mebibytes` or `4096` (bytes).
pub(crate) fn parse_memory_size(text: &str) -> Result<u64, &'static str> {
    let (number, unit) = split_number(text).ok_or(MEMORY_SYNTAX)?;
    let factor = lookup_unit(MEMORY_UNITS, &unit).ok_or(MEMORY_SYNTAX)?;
    number
        .checked_mul(u128::from(factor))
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or("memory size does not fit in 64 bits")
}

/// Parses `10 s`, `50000 ms`, `1 min`, `2h`, `1d` or `100` (milliseconds).
pub(super) fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let (number, unit) = split_number(text).ok_or(DURATION_SYNTAX)?;
    let factor = lookup_unit(DURATION_UNITS, &unit).ok_or(DURATION_SYNTAX)?;
    number
        .checked_mul(factor)
        .and_then(|nanos| u64::try_from(nanos).ok())
        .map(Duration::from_nanos)
        .ok_or("duration is too long")
}

/// Prints bytes in the largest exact unit: `1728m`, `32kb`, `0`; `unlimited` for `u64::MAX`.
pub(super) fn format_memory_size(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".to_owned();
    }
    let exact = MEMORY_UNITS
        .iter()
        .rev()
        .find(|(_, factor)| bytes != 0 && bytes.is_multiple_of(*factor));
    match exact {
        Some((names, factor)) if *factor > 1 => format!("{}{}", bytes / factor, names[1]),
        _ => bytes.to_string(),
    }
}

/// Prints a duration in the largest exact unit: `10 s`, `5 min`, `100 ms`.
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    let exact = DURATION_UNITS
        .iter()
        .rev()
        .find(|(_, factor)| nanos.is_multiple_of(*factor))
        .filter(|_| nanos != 0);
    match exact {
        Some((names, factor)) => format!("{} {}", nanos / factor, display_unit(names)),
        None => "0 ms".to_owned(),
    }
}

/// Splits `" 32 KB "` into `(32, "kb")`; `None` when there is no leading integer.
fn split_number(text: &str) -> Option<(u128, String)> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = text[..digits_end].parse().ok()?;
    Some((number, text[digits_end..].trim().to_lowercase()))
}

fn lookup_unit<F: Copy>(units: &[(&[&str], F)], unit: &str) -> Option<F> {
    units
        .iter()
        .find(|(names, _)| names.contains(&unit))
        .map(|(_, factor)| *factor)
}

/// The spelling used when printing: the first non-empty one (`ms`, not the bare number).
fn display_unit(names: &[&'static str]) -> &'static str {
    names
        .iter()
        .copied()
        .find(|name| !name.is_empty())
        .unwrap_or("ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = KIB * KIB;

    #[test]
    fn memory_sizes_parse_with_flink_units_and_spacing() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("12b", 12),
            ("7 bytes", 7),
            ("32kb", 32 * KIB),
            ("32k", 32 * KIB),
            ("32 KB", 32 * KIB),
            ("2 kibibytes", 2 * KIB),
            ("1728m", 1728 * MIB),
            ("64MB", 64 * MIB),
            ("512 mebibytes", 512 * MIB),
            ("1 gb", 1024 * MIB),
            ("1g", 1024 * MIB),
            ("3 Gibibytes", 3 * 1024 * MIB),
            ("2t", 2 * 1024 * 1024 * MIB),
            ("1 tebibytes", 1024 * 1024 * MIB),
            ("  16m  ", 16 * MIB),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_memory_size(text), Ok(*bytes), "{text}");
        }
    }

    #[test]
    fn malformed_memory_sizes_are_rejected_with_the_expected_syntax() {
        for text in ["", "m", "1.5g", "-1m", "12 parsecs", "1 m b", "0x10"] {
            assert_eq!(parse_memory_size(text), Err(MEMORY_SYNTAX), "{text}");
        }
        assert!(parse_memory_size("20000000 tb").is_err());
    }

    #[test]
    fn durations_parse_with_flink_units_and_spacing() {
        let cases: &[(&str, Duration)] = &[
            ("100", Duration::from_millis(100)),
            ("50000 ms", Duration::from_millis(50_000)),
            ("10 s", Duration::from_secs(10)),
            ("10s", Duration::from_secs(10)),
            ("3 sec", Duration::from_secs(3)),
            ("1 min", Duration::from_secs(60)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("1d", Duration::from_secs(86_400)),
            ("250 us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("42 ns", Duration::from_nanos(42)),
            ("2 MIN", Duration::from_secs(120)),
        ];
        for (text, duration) in cases {
            assert_eq!(parse_duration(text), Ok(*duration), "{text}");
        }
    }

    #[test]
    fn malformed_durations_are_rejected_with_the_expected_syntax() {
        for text in ["", "s", "1.5 s", "-3 s", "10 fortnights"] {
            assert_eq!(parse_duration(text), Err(DURATION_SYNTAX), "{text}");
        }
    }

    #[test]
    fn printed_sizes_and_durations_parse_back_to_the_same_value() {
        for bytes in [0, 1, 1000, 32 * KIB, 1728 * MIB, 1024 * MIB, 5 * KIB + 1] {
            let text = format_memory_size(bytes);
            assert_eq!(parse_memory_size(&text), Ok(bytes), "{text}");
        }
        assert_eq!(format_memory_size(1728 * MIB), "1728mb");
        assert_eq!(format_memory_size(u64::MAX), "unlimited");
        for millis in [0, 1, 100, 10_000, 300_000, 86_400_000] {
            let duration = Duration::from_millis(millis);
            let text = format_duration(duration);
            assert_eq!(parse_duration(&text), Ok(duration), "{text}");
        }
        assert_eq!(format_duration(Duration::from_secs(300)), "5 min");
        assert_eq!(format_duration(Duration::from_millis(100)), "100 ms");
    }
}
