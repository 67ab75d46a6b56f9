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

/// A child process stopped when dropped, so a failing test leaves nothing
/// behind: SIGTERM first (a TaskManager then removes its spill directory),
/// SIGKILL after a short grace.
pub struct Proc(pub std::process::Child);

/// How long a dropped [`Proc`] may take to exit on SIGTERM.
const TERM_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .stderr(std::process::Stdio::null())
                .status();
            let deadline = std::time::Instant::now() + TERM_GRACE;
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
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

/// Polls `done` every 50 ms until it holds; panics naming `what` after
/// `timeout`. The timeout only bounds a hung test: nothing here measures
/// speed.
pub fn wait_for(what: &str, timeout: std::time::Duration, done: impl FnMut() -> bool) {
    wait_for_explained(timeout, done, || format!("timed out waiting for {what}"));
}

/// [`wait_for`], panicking with what `explain` says then (the state the
/// test saw: logs, counts).
pub fn wait_for_explained(
    timeout: std::time::Duration,
    mut done: impl FnMut() -> bool,
    explain: impl FnOnce() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        if std::time::Instant::now() >= deadline {
            panic!("{}", explain());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Lines kept per process by [`Logged`]; a test that logs more keeps the
/// first ones and counts the rest.
const LOG_LINES_MAX: usize = 200_000;

/// What a child process printed after its first line: standard error and
/// the rest of standard output, interleaved in arrival order.
#[derive(Default)]
struct LogLines {
    lines: Vec<String>,
    dropped: usize,
}

/// A child process whose output is collected line by line, so a test can
/// wait for a line instead of sleeping.
pub struct Logged {
    pub proc: Proc,
    /// What the first line of standard output said after the expected prefix.
    pub announced: String,
    log: std::sync::Arc<std::sync::Mutex<LogLines>>,
}

impl Logged {
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// A copy of the lines collected so far.
    pub fn lines(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lines
            .clone()
    }

    /// Lines collected so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Waits until a line containing `needle` was printed and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: std::time::Duration) -> String {
        let mut found = None;
        wait_for(&format!("a line containing {needle:?}"), timeout, || {
            found = self.lines_with(needle).into_iter().next();
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits until `count` lines containing `needle` were printed.
    pub fn wait_for_lines(&self, needle: &str, count: usize, timeout: std::time::Duration) {
        wait_for(
            &format!("{count} lines containing {needle:?}"),
            timeout,
            || self.lines_with(needle).len() >= count,
        );
    }

    /// The whole log, for assertion messages.
    pub fn dump(&self) -> String {
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        format!(
            "{}\n({} more lines dropped)",
            log.lines.join("\n"),
            log.dropped
        )
    }
}

fn collect_lines(
    from: impl std::io::Read + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<LogLines>>,
) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            let mut log = into
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if log.lines.len() < LOG_LINES_MAX {
                log.lines.push(line);
            } else {
                log.dropped += 1;
            }
        }
    })
}

/// Starts `command`, reads its first line of standard output (which must
/// start with `prefix`), and from then on collects its standard error and
/// the rest of its standard output.
pub fn spawn_logged(mut command: std::process::Command, prefix: &str) -> Logged {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let log = std::sync::Arc::new(std::sync::Mutex::new(LogLines::default()));
    let stderr = collect_lines(child.stderr.take().expect("piped stderr"), log.clone());
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("first line");
    let proc = Proc(child);
    let Some(announced) = line.trim().strip_prefix(prefix).map(str::to_owned) else {
        // The process exited or printed something unexpected: stop it and
        // collect all of its standard error for the message.
        drop(proc);
        let _ = stderr.join();
        let log = log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        panic!(
            "unexpected first line {line:?}; standard error:\n{}",
            log.lines.join("\n")
        );
    };
    collect_lines(stdout, log.clone());
    Logged {
        proc,
        announced,
        log,
    }
}

/// The address of a JobManager's REST API, from its log line (start it with
/// `-D rest.port=0` so that parallel tests do not compete for 8081).
pub fn rest_address(jobmanager: &Logged) -> String {
    let line = jobmanager.wait_for_line(
        "web UI and REST API at http://",
        std::time::Duration::from_secs(30),
    );
    let (_, rest) = line
        .split_once("http://")
        .expect("the line holds an address");
    rest.split('/').next().expect("host:port").to_owned()
}

/// `GET path` on `address`; the body of a 200 response, `None` for any
/// other outcome (not listening yet, an error status).
pub fn http_get(address: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// `GET path` parsed as JSON; `None` until the REST API answers.
pub fn rest_json(address: &str, path: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&http_get(address, path)?).ok()
}

/// TaskManagers the JobManager lists at `/taskmanagers`.
pub fn registered_taskmanagers(rest: &str) -> usize {
    rest_json(rest, "/taskmanagers")
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

/// The states of the running jobs and of the completed ones (`/jobs`).
pub fn job_states(rest: &str) -> (Vec<String>, Vec<String>) {
    let Some(jobs) = rest_json(rest, "/jobs") else {
        return (Vec::new(), Vec::new());
    };
    let states = |key: &str| {
        jobs[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|j| j["state"].as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    (states("running"), states("completed"))
}

/// A process's resident set size in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Data addresses of the TaskManagers whose last heartbeat reported a slot
/// running tasks (`Active`), per the JobManager's `/taskmanagers`.
pub fn taskmanagers_running_tasks(rest: &str) -> Vec<String> {
    let Some(tms) = rest_json(rest, "/taskmanagers") else {
        return Vec::new();
    };
    tms.as_array()
        .into_iter()
        .flatten()
        .filter(|tm| {
            tm["slots"]
                .as_array()
                .is_some_and(|slots| slots.iter().any(|s| s["state"] == "Active"))
        })
        .filter_map(|tm| tm["data_addr"].as_str().map(str::to_owned))
        .collect()
}

/// The first Python that runs `import <modules>`: `STRATA_PYTHON`, the
/// virtual environment `scripts/install_python_deps.sh` makes in
/// `target/py`, then `python3` on the `PATH`.
pub fn python_importing(modules: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    let candidates: Vec<PathBuf> = std::env::var_os("STRATA_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python"),
            PathBuf::from("python3"),
        ])
        .collect();
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", &format!("import {modules}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs `cmd` to the end: its exit code (-1 when killed by a signal),
/// stdout and stderr.
pub fn output(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("running strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
