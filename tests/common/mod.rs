//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

/// Memory settings small enough for several TaskManagers per test.
pub const SMALL_MEMORY: &[&str] = &[
    "taskmanager.memory.process.size=1g",
    "taskmanager.memory.managed.fraction=0.2",
];

/// Reads every `part-*.csv` under `dir` into rows of strings (header
/// dropped), sorted.
pub fn read_csv_parts(dir: &Path) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no part files in {}", dir.display());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines().skip(1) {
            if !line.is_empty() {
                rows.push(line.split(',').map(str::to_owned).collect());
            }
        }
    }
    rows.sort();
    rows
}

/// count, sum, min, max, avg(price) per key over a datagen source, computed
/// without strata's runtime.
pub struct Reference {
    pub groups: HashMap<i64, (i64, i64, i64, i64, f64)>,
}

pub fn reference_aggregation(rows: u64, keys: u64, seed: u64, min_value: i64) -> Reference {
    let spec = strata::job::DatagenSpec::new(rows, keys, seed);
    let mut groups: HashMap<i64, (i64, i64, i64, i64, f64)> = HashMap::new();
    for i in 0..rows {
        let r = strata::exec::source::datagen_row(&spec, i);
        if r.value < min_value {
            continue;
        }
        let g = groups
            .entry(r.key)
            .or_insert((0, 0, i64::MAX, i64::MIN, 0.0));
        g.0 += 1;
        g.1 += r.value;
        g.2 = g.2.min(r.value);
        g.3 = g.3.max(r.value);
        g.4 += r.price;
    }
    Reference { groups }
}

/// Compares CSV rows `key,cnt,total,lo,hi,avg_price` with the reference.
pub fn assert_matches_reference(rows: &[Vec<String>], reference: &Reference) {
    assert_eq!(rows.len(), reference.groups.len(), "number of keys");
    for row in rows {
        let key: i64 = row[0].parse().unwrap();
        let (cnt, total, lo, hi, price_sum) = reference.groups[&key];
        assert_eq!(row[1].parse::<i64>().unwrap(), cnt, "count of key {key}");
        assert_eq!(row[2].parse::<i64>().unwrap(), total, "sum of key {key}");
        assert_eq!(row[3].parse::<i64>().unwrap(), lo, "min of key {key}");
        assert_eq!(row[4].parse::<i64>().unwrap(), hi, "max of key {key}");
        let avg: f64 = row[5].parse().unwrap();
        let expected = price_sum / cnt as f64;
        assert!(
            (avg - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "avg of key {key}: {avg} vs {expected}"
        );
    }
}

/// A keyed-aggregation job file writing CSV to `out`.
pub fn keyed_job(
    rows: u64,
    keys: u64,
    seed: u64,
    parallelism: u32,
    out: &Path,
    extra_source: &str,
) -> String {
    format!(
        r#"
[job]
name = "keyed-test"
parallelism = {parallelism}

[[operator]]
name = "events"
type = "datagen"
rows = {rows}
keys = {keys}
seed = {seed}
batch_size = 4096
{extra_source}

[[operator]]
name = "positive"
type = "filter"
predicate = "value >= 10"

[[operator]]
type = "key_by"
keys = ["key"]

[[operator]]
name = "totals"
type = "aggregate"
aggs = ["count(*) as cnt", "sum(value) as total", "min(value) as lo", "max(value) as hi", "avg(price) as avg_price"]

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
"#,
        out.display()
    )
}

/// A child process killed when dropped, so a failing test leaves nothing
/// behind.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `strata` with the test log level.
pub fn strata_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("STRATA_LOG", "warn,strata=info");
    c
}

/// Starts `command` and returns it with what its first line of standard
/// output says after `prefix`.
pub fn spawn_announcing_command(
    mut command: std::process::Command,
    prefix: &str,
) -> (Proc, String) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn strata");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let value = line
        .trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (Proc(child), value)
}
