//! End-to-end jobs on the embedded mini-cluster, through the public API.

mod common;

use common::*;
use strata::cluster::client::submit_job;
use strata::config::Config;
use strata::minicluster::MiniCluster;
use strata::protocol::JobState;

fn config(slots: u32, extra: &[&str]) -> Config {
    let mut overrides: Vec<String> = SMALL_MEMORY.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("taskmanager.numberOfTaskSlots={slots}"));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    Config::from_overrides(&overrides).expect("test config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_aggregation_on_two_taskmanagers_equals_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = keyed_job(300_000, 5_000, 42, 4, &out, "");
    let cluster = MiniCluster::start(config(2, &[]), 2).await.unwrap();
    let summary = submit_job(
        &cluster.address().to_string(),
        job,
        "keyed.toml".into(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
    assert_eq!(summary.rows_in, 300_000);
    assert!(
        summary.remote_bytes > 0,
        "4 slots on 2 TaskManagers must cross TCP"
    );
    assert!(summary.local_rows > 0, "and use local channels too");
    let reference = reference_aggregation(300_000, 5_000, 42, 10);
    assert_eq!(summary.rows_out as usize, reference.groups.len());
    assert_matches_reference(&read_csv_parts(&out), &reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_do_not_depend_on_parallelism_or_segment_size() {
    let reference = reference_aggregation(100_000, 777, 9, 10);
    for (parallelism, taskmanagers, segment) in [(1, 1, "32kb"), (3, 3, "4kb"), (2, 1, "64kb")] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let job = keyed_job(100_000, 777, 9, parallelism, &out, "");
        let seg = format!("taskmanager.memory.segment-size={segment}");
        let cluster = MiniCluster::start(
            config(1.max(parallelism.div_ceil(taskmanagers as u32)), &[&seg]),
            taskmanagers,
        )
        .await
        .unwrap();
        let summary = submit_job(
            &cluster.address().to_string(),
            job,
            "keyed.toml".into(),
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            summary.state,
            JobState::Finished,
            "p={parallelism}: {:?}",
            summary.reason
        );
        assert_matches_reference(&read_csv_parts(&out), &reference);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_slots_is_rejected_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let job = keyed_job(1000, 10, 1, 8, &dir.path().join("out"), "");
    let cluster = MiniCluster::start(config(2, &[]), 1).await.unwrap();
    let err = submit_job(
        &cluster.address().to_string(),
        job,
        "keyed.toml".into(),
        false,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("needs 8") && err.contains("2 free"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregation_beyond_managed_memory_spills_and_equals_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spill_dir = dir.path().join("spill");
    let job = keyed_job(400_000, 400_000, 5, 1, &out, "");
    // 1 MiB of managed memory per slot cannot hold 400k groups: it spills.
    let tmp_dirs = format!("io.tmp.dirs={}", spill_dir.display());
    let cluster = MiniCluster::start(
        config(
            1,
            &[
                "taskmanager.memory.managed.fraction=0.004",
                "taskmanager.memory.page-size=4kb",
                &tmp_dirs,
            ],
        ),
        1,
    )
    .await
    .unwrap();
    let summary = submit_job(
        &cluster.address().to_string(),
        job,
        "keyed.toml".into(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
    assert!(summary.spill_bytes_written > 0 && summary.spill_file_count > 0);
    assert!(summary.spill_bytes_read > 0);
    let reference = reference_aggregation(400_000, 400_000, 5, 10);
    assert_eq!(summary.rows_out as usize, reference.groups.len());
    assert_matches_reference(&read_csv_parts(&out), &reference);
    let text = strata::cluster::summary::render(&summary);
    assert!(
        text.contains("spilled ") && text.contains("file(s)"),
        "{text}"
    );
    // The task ended: its spill files are gone (the directory stays while
    // the TaskManager runs).
    let left: Vec<_> = walk(&spill_dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "blk"))
        .collect();
    assert!(left.is_empty(), "spill files left: {left:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_global_aggregates_match_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("win");
    let job = format!(
        r#"
[job]
name = "windows"
parallelism = 2
[[operator]]
type = "datagen"
rows = 50000
keys = 20
seed = 11
ts_step_ms = 1
ts_disorder_ms = 300
[[operator]]
type = "key_by"
keys = ["key"]
[[operator]]
type = "window"
time_column = "ts"
size = "5s"
aggs = ["count(*) as n", "sum(value) as s"]
[[operator]]
type = "csv_sink"
path = "{}"
"#,
        out.display()
    );
    let cluster = MiniCluster::start(config(2, &[]), 1).await.unwrap();
    let summary = submit_job(&cluster.address().to_string(), job, "w.toml".into(), false)
        .await
        .unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
    assert_eq!(
        summary.late_rows, 0,
        "watermarks trail the disorder, so nothing is late"
    );
    let spec = strata::job::DatagenSpec {
        ts_disorder_ms: 300,
        ..strata::job::DatagenSpec::new(50000, 20, 11)
    };
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..50000 {
        let r = strata::exec::source::datagen_row(&spec, i);
        let start = r.ts - r.ts.rem_euclid(5000);
        let e = expected.entry((r.key, start)).or_insert((0i64, 0i64));
        e.0 += 1;
        e.1 += r.value;
    }
    let rows = read_csv_parts(&out);
    assert_eq!(rows.len(), expected.len());
    for row in rows {
        let key: i64 = row[0].parse().unwrap();
        let start: i64 = row[1].parse().unwrap();
        let end: i64 = row[2].parse().unwrap();
        assert_eq!(end - start, 5000);
        assert_eq!(
            (row[3].parse().unwrap(), row[4].parse().unwrap()),
            expected[&(key, start)]
        );
    }
}

/// A plain HTTP/1.1 GET; returns (status line, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_and_prometheus_show_taskmanagers_and_finished_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let job = keyed_job(20_000, 100, 1, 2, &dir.path().join("out"), "");
    let cluster = MiniCluster::start(config(1, &[]), 2).await.unwrap();
    let rest = strata::minicluster::serve_rest(&cluster.jobmanager, "127.0.0.1:0")
        .await
        .unwrap();
    let summary = submit_job(&cluster.address().to_string(), job, "j.toml".into(), false)
        .await
        .unwrap();
    let id = format!("{:016x}", summary.job);
    let (status, body) = tokio::task::spawn_blocking(move || {
        let tms = http_get(rest, "/taskmanagers");
        let jobs = http_get(rest, "/jobs");
        let one = http_get(rest, &format!("/jobs/{id}"));
        let metrics = http_get(rest, "/metrics");
        let page = http_get(rest, "/");
        assert!(
            tms.0.contains("200") && tms.1.contains("tm-1") && tms.1.contains("tm-2"),
            "{tms:?}"
        );
        assert!(
            jobs.1.contains(&id) && jobs.1.contains("Finished"),
            "{jobs:?}"
        );
        assert!(one.1.contains("\"rows_in\":20000"), "{one:?}");
        // tests/prometheus.rs parses `/metrics`; here it is served beside the rest.
        assert!(
            metrics
                .1
                .contains("\nstrata_jobmanager_numRegisteredTaskManagers 2\n"),
            "{}",
            metrics.1
        );
        assert!(
            metrics
                .1
                .contains("strata_taskmanager_info{tm_id=\"tm-1\",transport=\"tcp"),
            "{}",
            metrics.1
        );
        assert!(
            metrics.1.contains(&format!(
                "strata_jobmanager_job_numRecordsIn_total{{job_id=\"{id}\",job_name=\"keyed-test\"}} 20000"
            )),
            "{}",
            metrics.1
        );
        assert!(page.1.contains("<title>strata"), "{page:?}");
        http_get(rest, "/jobs/not-hex")
    })
    .await
    .unwrap();
    assert!(status.contains("400"), "{status}: {body}");
}

/// The same keyed job over every transport: local channels only (one
/// TaskManager), TCP, emulated verbs, and emulated verbs with LZ4 and buffer
/// debloating. Each equals the reference, so all equal each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_job_is_identical_over_local_tcp_and_emulated_verbs() {
    let reference = reference_aggregation(200_000, 3_000, 11, 10);
    let mut outputs = Vec::new();
    for (name, taskmanagers, extra) in [
        ("local", 1, vec!["taskmanager.network.transport=tcp"]),
        ("tcp", 2, vec!["taskmanager.network.transport=tcp"]),
        // Flink's shared connection per peer, read by the network runtime.
        (
            "tcp",
            2,
            vec![
                "taskmanager.network.transport=tcp",
                "taskmanager.network.tcp.task-reads=false",
            ],
        ),
        (
            "rdma-emulated",
            2,
            vec!["taskmanager.network.transport=rdma-emulated"],
        ),
        (
            "rdma-emulated",
            2,
            vec![
                "taskmanager.network.transport=rdma-emulated",
                "taskmanager.network.compression.enabled=true",
                "taskmanager.network.memory.buffer-debloat.enabled=true",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let job = keyed_job(200_000, 3_000, 11, 4, &out, "");
        let slots = 4 / taskmanagers as u32;
        let cluster = MiniCluster::start(config(slots, &extra), taskmanagers)
            .await
            .unwrap();
        let summary = submit_job(
            &cluster.address().to_string(),
            job,
            "keyed.toml".into(),
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            summary.state,
            JobState::Finished,
            "{name}: {:?}",
            summary.reason
        );
        if taskmanagers == 1 {
            assert_eq!(
                summary.remote_bytes, 0,
                "one TaskManager: local channels only"
            );
        } else {
            assert!(
                summary.remote_bytes > 0,
                "{name}: nothing crossed TaskManagers"
            );
            assert!(
                summary.transport.starts_with(name),
                "{name}: summary says {}",
                summary.transport
            );
        }
        let rows = read_csv_parts(&out);
        assert_matches_reference(&rows, &reference);
        // Integer columns are identical; float sums may differ in the last
        // bits with the order rows arrived in (checked against the
        // reference with a tolerance above).
        let exact: Vec<Vec<String>> = rows
            .into_iter()
            .map(|r| r.into_iter().filter(|c| c.parse::<i64>().is_ok()).collect())
            .collect();
        outputs.push(exact);
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_job_beyond_managed_memory_spills_and_equals_a_std_sort() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sorted");
    let rows = 100_000u64;
    let job = format!(
        r#"
[job]
name = "sort"
parallelism = 1

[[operator]]
name = "events"
type = "datagen"
rows = {rows}
keys = 500
seed = 8
batch_size = 4096

[[operator]]
name = "ordered"
type = "sort"
keys = ["key", "value desc", "ts"]
fan_in = 2

[[operator]]
type = "csv_sink"
path = "{}"
"#,
        out.display()
    );
    let cluster = MiniCluster::start(
        config(
            1,
            &[
                "taskmanager.memory.managed.fraction=0.004",
                "taskmanager.memory.page-size=4kb",
            ],
        ),
        1,
    )
    .await
    .unwrap();
    let summary = submit_job(
        &cluster.address().to_string(),
        job,
        "sort.toml".into(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
    assert!(
        summary.spill_file_count > 1,
        "runs and merge passes spilled"
    );
    let spec = strata::job::DatagenSpec::new(rows, 500, 8);
    let mut expected: Vec<(i64, i64, i64)> = (0..rows)
        .map(|i| {
            let r = strata::exec::source::datagen_row(&spec, i);
            (r.key, r.value, r.ts)
        })
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let part = walk(&out)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "csv"))
        .expect("a part file");
    let text = std::fs::read_to_string(part).unwrap();
    let got: Vec<(i64, i64, i64)> = text
        .lines()
        .skip(1)
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            (
                cells[0].parse().unwrap(),
                cells[1].parse().unwrap(),
                cells[3].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "sorted output differs from std sort");
}

/// With checkpointing on, a keyed job still equals its reference: sources
/// and aggregates snapshot as they run, the sink commits its staged parts,
/// and the summary reports the checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpointed_keyed_job_commits_exactly_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = keyed_job(400_000, 2_000, 5, 2, &out, "rows_per_second = 400_000");
    let chk = format!(
        "execution.checkpointing.dir={}",
        dir.path().join("chk").display()
    );
    let cluster = MiniCluster::start(
        config(1, &["execution.checkpointing.interval=100ms", &chk]),
        2,
    )
    .await
    .unwrap();
    let summary = submit_job(
        &cluster.address().to_string(),
        job,
        "keyed.toml".into(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
    assert!(summary.checkpointing);
    let c = &summary.checkpoints;
    assert!(c.completed >= 2, "{c:?}");
    let last = c.last_completed().expect("a completed checkpoint");
    assert!(last.size_bytes > 0, "{last:?}");
    // Committed parts only: nothing staged or in progress is left.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.starts_with("part-") && name.ends_with(".csv"),
            "{name}"
        );
    }
    assert_matches_reference(
        &read_csv_parts(&out),
        &reference_aggregation(400_000, 2_000, 5, 10),
    );
    // A finished job's checkpoints are removed.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("chk"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
