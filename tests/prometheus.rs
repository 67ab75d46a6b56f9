//! `/metrics` of a JobManager running jobs on the embedded cluster, scraped
//! over HTTP and parsed by a Prometheus text-format parser, as a Prometheus
//! server reads it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use prometheus_parse::{Sample, Scrape, Value};
use strata::cluster::client::submit_job;
use strata::config::Config;
use strata::minicluster::{MiniCluster, serve_rest};
use strata::protocol::JobState;

fn config(slots: u32, extra: &[&str]) -> Config {
    let mut overrides: Vec<String> = SMALL_MEMORY.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("taskmanager.numberOfTaskSlots={slots}"));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    Config::from_overrides(&overrides).expect("test config")
}

/// `GET /metrics` with `Accept: accept`; the response's `Content-Type` and
/// body.
fn get_metrics(rest: SocketAddr, accept: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(rest).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .expect("a Content-Type");
    (content_type, body.to_owned())
}

/// A scrape in the Prometheus text format, parsed.
fn scrape(rest: SocketAddr) -> Scrape {
    let (content_type, body) = get_metrics(rest, "text/plain");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("a parsable exposition")
}

/// The samples of `metric` whose labels include `labels`.
fn samples<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect()
}

fn one<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found = samples(s, metric, labels);
    assert_eq!(found.len(), 1, "{metric}{labels:?} in {:#?}", s.samples);
    found[0]
}

fn gauge(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match one(s, metric, labels).value {
        Value::Gauge(v) => v,
        ref other => panic!("{metric} is not a gauge: {other:?}"),
    }
}

fn counter(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match one(s, metric, labels).value {
        Value::Counter(v) => v,
        ref other => panic!("{metric} is not a counter: {other:?}"),
    }
}

/// A finished, checkpointed job on two TaskManagers: the scraped counters
/// and gauges equal the job's summary and its output, each family has its
/// type and help, and a scraper asking for OpenMetrics gets units and
/// `# EOF`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_of_a_finished_job_equal_its_summary_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = keyed_job(20_000, 100, 1, 2, &out, "");
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
    let rest = serve_rest(&cluster.jobmanager, "127.0.0.1:0")
        .await
        .unwrap();
    let summary = submit_job(&cluster.address().to_string(), job, "j.toml".into(), false)
        .await
        .unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
    let rows_written = read_csv_parts(&out).len() as f64;
    tokio::task::spawn_blocking(move || {
        // The JobManager frees the job's slots as its tasks report the end.
        let mut s = scrape(rest);
        wait_for(
            "the job's slots to be free",
            Duration::from_secs(10),
            || {
                s = scrape(rest);
                gauge(&s, "strata_jobmanager_taskSlotsAvailable", &[]) == 2.0
            },
        );
        assert_eq!(
            gauge(&s, "strata_jobmanager_numRegisteredTaskManagers", &[]),
            2.0
        );
        assert_eq!(gauge(&s, "strata_jobmanager_taskSlotsTotal", &[]), 2.0);
        assert_eq!(gauge(&s, "strata_jobmanager_numRunningJobs", &[]), 0.0);
        let finished = [("state", "finished")];
        assert_eq!(gauge(&s, "strata_jobmanager_numEndedJobs", &finished), 1.0);
        for tm in ["tm-1", "tm-2"] {
            let tm_id = [("tm_id", tm)];
            assert_eq!(gauge(&s, "strata_taskmanager_info", &tm_id), 1.0);
            let age = "strata_taskmanager_timeSinceLastHeartbeat_seconds";
            assert!(gauge(&s, age, &tm_id) >= 0.0);
            // As the last heartbeat reported it, which may predate the end.
            let active = gauge(&s, "strata_taskmanager_taskSlotsActive", &tm_id);
            assert!(active == 0.0 || active == 1.0, "{active}");
        }

        let id = format!("{:016x}", summary.job);
        let job = [("job_id", id.as_str()), ("job_name", "keyed-test")];
        let job_counter = |m: &str| counter(&s, &format!("strata_jobmanager_job_{m}_total"), &job);
        assert_eq!(job_counter("numRecordsIn"), 20_000.0);
        assert_eq!(job_counter("numRecordsIn"), summary.rows_in as f64);
        assert_eq!(job_counter("numRecordsOut"), rows_written);
        assert_eq!(job_counter("numRecordsOut"), summary.rows_out as f64);
        assert_eq!(job_counter("numRecordsOutLocal"), summary.local_rows as f64);
        assert_eq!(job_counter("numRestarts"), 0.0);
        assert_eq!(
            job_counter("numberOfCompletedCheckpoints"),
            summary.checkpoints.completed as f64
        );
        let remote = [job[0], job[1], ("transport", "tcp")];
        let bytes = counter(&s, "strata_jobmanager_job_numBytesOutRemote_total", &remote);
        assert!(bytes > 0.0, "two TaskManagers exchange over TCP");
        assert_eq!(bytes, summary.remote_bytes as f64);
        let last = summary
            .checkpoints
            .last_completed()
            .expect("the final checkpoint");
        let job_gauge = |m: &str| gauge(&s, &format!("strata_jobmanager_job_{m}"), &job);
        assert_eq!(
            job_gauge("lastCheckpointSize_bytes"),
            last.size_bytes as f64
        );
        assert_eq!(
            job_gauge("lastCheckpointDuration_seconds"),
            last.duration_ms as f64 / 1000.0
        );
        // Every family has its help; per-task families wait for a running job.
        for family in s.samples.iter().map(|x| &x.metric) {
            let described = s.docs.contains_key(family.as_str());
            assert!(described, "{family} has no # HELP");
        }
        assert!(
            samples(
                &s,
                "strata_taskmanager_job_task_numBytesOutRemote_total",
                &[]
            )
            .is_empty()
        );

        let (content_type, text) = get_metrics(rest, "application/openmetrics-text; version=1.0.0");
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{content_type}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "# TYPE strata_jobmanager_job_numRecordsOut counter",
            "# UNIT strata_jobmanager_job_lastCheckpointSize_bytes bytes",
            "# UNIT strata_taskmanager_timeSinceLastHeartbeat_seconds seconds",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    })
    .await
    .unwrap();
}

/// While a job runs, `/metrics` has Flink's per-task shuffle metrics, each
/// labelled with the job, task, subtask, TaskManager and transport, and the
/// operators' record counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_export_per_task_shuffle_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // 300k rows at 150k rows/s: about two seconds of running job.
    let job = keyed_job(
        300_000,
        100,
        5,
        2,
        &dir.path().join("out"),
        "rows_per_second = 150_000",
    );
    let cluster = MiniCluster::start(
        config(1, &["taskmanager.network.transport=rdma-emulated"]),
        2,
    )
    .await
    .unwrap();
    let rest = serve_rest(&cluster.jobmanager, "127.0.0.1:0")
        .await
        .unwrap();
    let address = cluster.address().to_string();
    let running = tokio::spawn(async move {
        submit_job(&address, job, "j.toml".into(), false)
            .await
            .unwrap()
    });
    let s = tokio::task::spawn_blocking(move || {
        let mut s = scrape(rest);
        wait_for(
            "task metrics of the running job",
            Duration::from_secs(10),
            || {
                s = scrape(rest);
                let tasks = samples(
                    &s,
                    "strata_taskmanager_job_task_numBytesOutRemote_total",
                    &[],
                );
                tasks.len() == 4
            },
        );
        s
    })
    .await
    .unwrap();
    let summary = running.await.unwrap();
    assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);

    let id = format!("{:016x}", summary.job);
    let job = [("job_id", id.as_str()), ("job_name", "keyed-test")];
    let task_metric = |m: &str| format!("strata_taskmanager_job_task_{m}");
    for (family, is_counter) in [
        ("buffers_inPoolUsage", false),
        ("buffers_outPoolUsage", false),
        ("backPressuredTimeMsPerSecond", false),
        ("accumulatedBackPressuredTime_seconds_total", true),
        ("numBytesOutRemote_total", true),
        ("numBuffersOutRemote_total", true),
        ("numBytesInRemote_total", true),
    ] {
        let found = samples(&s, &task_metric(family), &job);
        // Two vertices (source chain, aggregation chain) of parallelism 2.
        assert_eq!(found.len(), 4, "{family}: {found:#?}");
        for x in found {
            assert_eq!(matches!(x.value, Value::Counter(_)), is_counter, "{x:?}");
            assert_eq!(x.labels.get("transport"), Some("rdma-emulated"), "{x:?}");
            assert!(
                matches!(x.labels.get("subtask_index"), Some("0" | "1")),
                "{x:?}"
            );
            assert!(
                matches!(x.labels.get("tm_id"), Some("tm-1" | "tm-2")),
                "{x:?}"
            );
            let task_name = x.labels.get("task_name");
            assert!(
                summary
                    .vertices
                    .iter()
                    .any(|v| Some(v.name.as_str()) == task_name),
                "{x:?}"
            );
        }
    }
    let totals = [job[0], job[1], ("operator_name", "totals")];
    let rows_in = "strata_taskmanager_job_task_operator_numRecordsIn_total";
    assert!(counter(&s, rows_in, &totals) >= 0.0);
    let usage = gauge(&s, "strata_jobmanager_job_buffers_maxInPoolUsage", &job);
    assert!((0.0..=1.0).contains(&usage), "{usage}");
}
