//! Spilling through the real CLI: a JobManager and a TaskManager as separate
//! processes, an aggregation whose state is many times the managed memory
//! budget, and the TaskManager's peak RSS read from `/proc`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Small enough that the managed budget (1% of Flink memory) is under 3 MiB.
const PROCESS_SIZE_BYTES: u64 = 320 << 20;
const TASKMANAGER_MEMORY: &[&str] = &[
    "-D",
    "taskmanager.memory.process.size=320m",
    "-D",
    "taskmanager.memory.managed.fraction=0.01",
    "-D",
    "taskmanager.memory.jvm-metaspace.size=16m",
    "-D",
    "taskmanager.memory.framework.heap.size=32m",
    "-D",
    "taskmanager.memory.framework.off-heap.size=16m",
    "-D",
    "taskmanager.memory.jvm-overhead.min=32m",
    "-D",
    "taskmanager.memory.network.min=16m",
    "-D",
    "taskmanager.memory.page-size=4kb",
    "-D",
    "taskmanager.numberOfTaskSlots=1",
];
/// Bytes one group of the test job takes in the hash table: a 40-byte entry
/// header, 5 accumulators of 16 bytes, and at least 4 bytes of index.
const GROUP_BYTES_MIN: u64 = 40 + 5 * 16 + 4;

fn strata() -> Command {
    strata_command()
}

/// Starts `strata ARGS` and returns it with what its first line of standard
/// output says after `prefix`.
fn spawn_announcing(args: &[&str], prefix: &str) -> (Proc, String) {
    let mut command = strata();
    command.args(args);
    spawn_announcing_command(command, prefix)
}

/// `VmHWM` (peak resident set) of `pid`, in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}

/// Runs the keyed job on a separate JobManager and TaskManager; returns the
/// submit output and the TaskManager's peak RSS.
fn run_spilling_job(rows: u64, keys: u64, extra: &[&str]) -> (String, u64, tempfile::TempDir) {
    let (_jm, addr) = spawn_announcing(
        &["jobmanager", "--bind", "127.0.0.1:0"],
        "JobManager listening on ",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let spill_dir = dir.path().join("spill");
    let tmp_dirs = format!("io.tmp.dirs={}", spill_dir.display());
    let mut args = vec!["taskmanager", "--jobmanager", &addr, "-D", &tmp_dirs];
    args.extend_from_slice(TASKMANAGER_MEMORY);
    args.extend_from_slice(extra);
    let (tm, _) = spawn_announcing(&args, "TaskManager data port ");
    let out = dir.path().join("out");
    let job = dir.path().join("job.toml");
    std::fs::write(&job, keyed_job(rows, keys, 23, 1, &out, "")).expect("job file");
    let deadline = Instant::now() + Duration::from_secs(20);
    let output = loop {
        let o = strata()
            .args(["submit", "--no-progress", "--jobmanager", &addr])
            .arg(&job)
            .output()
            .expect("submit");
        let stderr = String::from_utf8_lossy(&o.stderr);
        if o.status.success()
            || !stderr.contains("not enough free task slots")
            || Instant::now() > deadline
        {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let peak = peak_rss_bytes(tm.0.id());
    assert_matches_reference(
        &read_csv_parts(&out),
        &reference_aggregation(rows, keys, 23, 10),
    );
    let left: Vec<_> = walk(&spill_dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "blk"))
        .collect();
    assert!(left.is_empty(), "spill files left after the job: {left:?}");
    (stdout, peak, dir)
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The managed memory peak the summary reports, in bytes.
fn managed_peak_bytes(summary: &str) -> u64 {
    let text = summary
        .split("managed memory peak per slot ")
        .nth(1)
        .and_then(|rest| rest.split("   ").next())
        .unwrap_or_else(|| panic!("no managed peak in {summary}"));
    let (number, unit) = text.split_once(' ').expect("value and unit");
    let value: f64 = number.parse().expect("number");
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unit {other}"),
    };
    (value * scale) as u64
}

#[test]
fn state_ten_times_managed_memory_spills_with_peak_rss_under_process_size() {
    let started = Instant::now();
    let (rows, keys) = (700_000, 700_000);
    let (summary, peak_rss, _dir) = run_spilling_job(rows, keys, &[]);
    let managed_peak = managed_peak_bytes(&summary);
    // Rows with value < 10 are filtered out; nearly every key survives.
    let state_bytes_min =
        reference_aggregation(rows, keys, 23, 10).groups.len() as u64 * GROUP_BYTES_MIN;
    eprintln!(
        "state >= {} MiB, managed peak {} KiB, peak RSS {} MiB of {} MiB, {:.1} s\n{summary}",
        state_bytes_min >> 20,
        managed_peak >> 10,
        peak_rss >> 20,
        PROCESS_SIZE_BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    assert!(
        state_bytes_min >= 10 * managed_peak,
        "state {state_bytes_min} B is not 10x the managed peak {managed_peak} B"
    );
    assert!(
        summary.contains("spilled ") && !summary.contains("spilled 0 B"),
        "{summary}"
    );
    assert!(
        peak_rss < PROCESS_SIZE_BYTES,
        "peak RSS {peak_rss} B over taskmanager.memory.process.size {PROCESS_SIZE_BYTES} B"
    );
}

#[test]
fn spilling_job_passes_on_the_forced_thread_pool_backend() {
    let (summary, peak_rss, _dir) =
        run_spilling_job(200_000, 100_000, &["-D", "io.backend=threadpool"]);
    assert!(
        summary.contains("backend=threadpool (thread pool chosen by configuration)"),
        "{summary}"
    );
    assert!(!summary.contains("spilled 0 B"), "{summary}");
    assert!(peak_rss < PROCESS_SIZE_BYTES);
}
