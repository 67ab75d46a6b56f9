//! What the simulator reads and damages on disk: the sink's part files,
//! the reference output they must add up to, and a checkpoint's state
//! files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::exec::source::datagen_row;
use crate::job::DatagenSpec;
use crate::network::sim::SplitMix64;

/// Flips one bit of a seeded byte of a seeded `.state` file in `dir`.
/// Returns `false` when there is none: a checkpoint that completed after
/// every task had finished holds no state file.
pub(super) fn flip_a_state_byte(dir: &Path, rng: &mut SplitMix64) -> std::io::Result<bool> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "state"))
        .collect();
    // The directory's order is the file system's: sort for the replay.
    files.sort();
    if files.is_empty() {
        return Ok(false);
    }
    let path = &files[rng.below(files.len() as u64) as usize];
    let mut bytes = std::fs::read(path)?;
    let at = rng.below(bytes.len() as u64) as usize;
    bytes[at] ^= 1 << rng.below(8);
    std::fs::write(path, bytes)?;
    Ok(true)
}

/// The sink directory's part files: committed ones with their rows
/// (sorted, header dropped), and the names of hidden (staged or
/// in-progress) ones.
pub(super) struct OutputFiles {
    pub committed: BTreeMap<String, Vec<String>>,
    pub hidden: Vec<String>,
}

pub(super) fn read_output(dir: &Path) -> std::io::Result<OutputFiles> {
    let mut files = OutputFiles {
        committed: BTreeMap::new(),
        hidden: Vec::new(),
    };
    if !dir.exists() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            files.hidden.push(name);
            continue;
        }
        let text = std::fs::read_to_string(entry.path())?;
        let mut rows: Vec<String> = text.lines().skip(1).map(str::to_owned).collect();
        rows.sort_unstable();
        files.committed.insert(name, rows);
    }
    files.hidden.sort();
    Ok(files)
}

/// `key,cnt,total,lo,hi` per key.
pub(super) fn reference_aggregate(spec: &DatagenSpec) -> Vec<String> {
    let mut groups: BTreeMap<i64, (i64, i64, i64, i64)> = BTreeMap::new();
    for index in 0..spec.rows {
        let row = datagen_row(spec, index);
        let g = groups.entry(row.key).or_insert((0, 0, i64::MAX, i64::MIN));
        g.0 += 1;
        g.1 += row.value;
        g.2 = g.2.min(row.value);
        g.3 = g.3.max(row.value);
    }
    groups
        .into_iter()
        .map(|(key, (cnt, total, lo, hi))| format!("{key},{cnt},{total},{lo},{hi}"))
        .collect()
}

/// `key,window_start,window_end,cnt,total` per key and tumbling window.
pub(super) fn reference_window(spec: &DatagenSpec, size_ms: i64) -> Vec<String> {
    let mut groups: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for index in 0..spec.rows {
        let row = datagen_row(spec, index);
        let start = row.ts - row.ts.rem_euclid(size_ms);
        let g = groups.entry((row.key, start)).or_insert((0, 0));
        g.0 += 1;
        g.1 += row.value;
    }
    groups
        .into_iter()
        .map(|((key, start), (cnt, total))| {
            format!("{key},{start},{},{cnt},{total}", start + size_ms)
        })
        .collect()
}

/// Row counts and a few rows missing from and extra in `actual`.
pub(super) fn describe_difference(expected: &[String], actual: &[String]) -> String {
    let mut expected_counts: BTreeMap<&str, i64> = BTreeMap::new();
    for row in expected {
        *expected_counts.entry(row).or_default() += 1;
    }
    for row in actual {
        *expected_counts.entry(row).or_default() -= 1;
    }
    let missing: Vec<&str> = expected_counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, _)| *r)
        .take(3)
        .collect();
    let extra: Vec<&str> = expected_counts
        .iter()
        .filter(|(_, n)| **n < 0)
        .map(|(r, _)| *r)
        .take(3)
        .collect();
    format!(
        "committed {} rows, expected {}; missing e.g. {missing:?}, extra or duplicated e.g. {extra:?}",
        actual.len(),
        expected.len()
    )
}
