//! The exposition of an empty and a populated snapshot, parsed as a scraper
//! parses it.

use prometheus_parse::{Sample, Scrape, Value};

use super::jobs::transport_name;
use super::{Format, render};
use crate::checkpoint::coordinator::{CheckpointStats, CheckpointStatus};
use crate::protocol::{
    ClusterSnapshot, JobId, JobState, JobSummary, OperatorSummary, ResourceProfile, SlotState,
    SlotStatus, TaskManagerId, TaskManagerInfo, TaskNetworkMetrics, VertexSummary,
};

fn empty() -> ClusterSnapshot {
    ClusterSnapshot {
        taskmanagers: vec![],
        running: vec![],
        completed: vec![],
    }
}

fn job(id: u64, name: &str, state: JobState) -> JobSummary {
    JobSummary {
        job: JobId(id),
        name: name.to_owned(),
        state,
        reason: None,
        wall_ms: 0,
        rows_in: 0,
        rows_out: 0,
        first_row_unix_us: None,
        vertices: vec![],
        remote_bytes: 0,
        remote_buffers: 0,
        in_pool_usage_permille: 0,
        out_pool_usage_permille: 0,
        local_rows: 0,
        backpressure_ms: 0,
        late_rows: 0,
        managed_peak_bytes: 0,
        spill_bytes_written: 0,
        spill_bytes_read: 0,
        spill_file_count: 0,
        transport: String::new(),
        io: vec![],
        taskmanagers: 0,
        slots: 0,
        tasks: vec![],
        placement: None,
        gpu: vec![],
        gpu_offload: Default::default(),
        checkpoints: Default::default(),
        checkpointing: false,
        restarts: 0,
        last_failure: None,
    }
}

fn slot(index: usize, state: SlotState, gpu: Option<(u32, u64)>) -> SlotStatus {
    SlotStatus {
        index,
        state,
        execution: None,
        profile: ResourceProfile {
            cpu_cores: 1.0,
            managed_memory_bytes: 1 << 20,
            network_memory_bytes: 1 << 20,
            gpu,
        },
    }
}

fn taskmanager(id: u64, slots: Vec<SlotStatus>, allocated: Vec<Option<JobId>>) -> TaskManagerInfo {
    TaskManagerInfo {
        id: TaskManagerId(id),
        data_addr: "127.0.0.1:1".parse().unwrap(),
        slots,
        allocated,
        last_heartbeat_ms: 1500,
        io: "io_uring".to_owned(),
        transport: "tcp, task reads".to_owned(),
        gpu: "no GPU (libcuda.so not found): CPU slots only".to_owned(),
        usage: None,
        spill_bytes_written: 0,
    }
}

fn task(vertex: usize, subtask: u32, tm: u64) -> TaskNetworkMetrics {
    TaskNetworkMetrics {
        vertex,
        subtask,
        taskmanager: TaskManagerId(tm),
        in_pool_usage_permille: 250,
        out_pool_usage_permille: 500,
        backpressured_ms_per_second: 40,
        backpressure_ms: 1200,
        remote_bytes_out: 7000,
        remote_buffers_out: 7,
        remote_bytes_in: 3000,
    }
}

/// Two TaskManagers (three slots, two running tasks, one with a GPU), a
/// running job with two tasks and a completed checkpoint, two ended jobs.
fn populated() -> ClusterSnapshot {
    let mut running = job(0xab, "etl", JobState::Running);
    running.rows_in = 1000;
    running.rows_out = 900;
    running.remote_bytes = 7000;
    running.remote_buffers = 7;
    running.local_rows = 400;
    running.backpressure_ms = 2500;
    running.managed_peak_bytes = 1 << 20;
    running.spill_bytes_written = 8192;
    running.in_pool_usage_permille = 250;
    running.out_pool_usage_permille = 500;
    running.restarts = 2;
    running.gpu_offload.launches = 12;
    running.transport =
        "tcp, task reads between TaskManagers, local channels within one".to_owned();
    running.checkpoints.completed = 3;
    running.checkpoints.failed = 1;
    running.checkpoints.history = vec![CheckpointStats {
        id: 3,
        status: CheckpointStatus::Completed,
        duration_ms: 1500,
        size_bytes: 4096,
        alignment_ms: 20,
        reason: None,
    }];
    let operator = |name: &str, rows_in, rows_out| OperatorSummary {
        name: name.to_owned(),
        kind: "filter".to_owned(),
        rows_in,
        rows_out,
    };
    running.vertices = vec![
        VertexSummary {
            name: "events -> filter-1".to_owned(),
            operators: vec![operator("events", 0, 1000), operator("filter-1", 1000, 900)],
            ..Default::default()
        },
        VertexSummary {
            name: "sink".to_owned(),
            operators: vec![operator("sink", 900, 0)],
            ..Default::default()
        },
    ];
    running.tasks = vec![task(0, 0, 1), task(1, 0, 2)];
    let mut failed = job(0xcd, "old", JobState::Failed);
    failed.rows_out = 5;
    ClusterSnapshot {
        taskmanagers: vec![
            taskmanager(
                1,
                vec![
                    slot(0, SlotState::Active, Some((0, 1 << 30))),
                    slot(1, SlotState::Free, None),
                ],
                vec![Some(JobId(0xab)), None],
            ),
            taskmanager(
                2,
                vec![slot(0, SlotState::Active, None)],
                vec![Some(JobId(0xab))],
            ),
        ],
        running: vec![running],
        completed: vec![failed, job(0xef, "done", JobState::Finished)],
    }
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("a parsable exposition")
}

/// The one sample of `metric` whose labels include `labels`.
fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{metric}{labels:?} in {:#?}",
        scrape.samples
    );
    found[0]
}

fn gauge(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels).value {
        Value::Gauge(v) => v,
        ref other => panic!("{metric} is not a gauge: {other:?}"),
    }
}

fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels).value {
        Value::Counter(v) => v,
        ref other => panic!("{metric} is not a counter: {other:?}"),
    }
}

/// The metric names of the `# TYPE` lines, in order.
fn families(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect()
}

#[test]
fn empty_cluster_exposes_only_the_cluster_gauges_at_zero() {
    let text = render(&empty(), Format::PrometheusText);
    // The encoder leaves out a family without samples.
    assert_eq!(families(&text).len(), 5, "{text}");
    let scrape = parse(&text);
    for metric in [
        "strata_jobmanager_numRegisteredTaskManagers",
        "strata_jobmanager_taskSlotsTotal",
        "strata_jobmanager_taskSlotsAvailable",
        "strata_jobmanager_numRunningJobs",
    ] {
        assert_eq!(gauge(&scrape, metric, &[]), 0.0, "{metric}");
    }
    for state in ["finished", "failed", "canceled"] {
        let n = gauge(
            &scrape,
            "strata_jobmanager_numEndedJobs",
            &[("state", state)],
        );
        assert_eq!(n, 0.0, "{state}");
    }
    assert_eq!(scrape.samples.len(), 7, "{:#?}", scrape.samples);
}

#[test]
fn populated_snapshot_has_every_family_once() {
    let text = render(&populated(), Format::PrometheusText);
    let names = families(&text);
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a family twice: {names:?}");
    assert_eq!(names.len(), 49, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("strata_")), "{names:?}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').expect("name value");
        value.parse::<f64>().expect("numeric sample");
    }
}

#[test]
fn populated_snapshot_has_flink_names_labels_and_the_snapshots_values() {
    let s = render(&populated(), Format::PrometheusText);
    let s = &parse(&s);
    assert_eq!(
        gauge(s, "strata_jobmanager_numRegisteredTaskManagers", &[]),
        2.0
    );
    assert_eq!(gauge(s, "strata_jobmanager_taskSlotsTotal", &[]), 3.0);
    assert_eq!(gauge(s, "strata_jobmanager_taskSlotsAvailable", &[]), 1.0);
    assert_eq!(gauge(s, "strata_jobmanager_numRunningJobs", &[]), 1.0);
    let ended = |state| gauge(s, "strata_jobmanager_numEndedJobs", &[("state", state)]);
    assert_eq!(
        (ended("finished"), ended("failed"), ended("canceled")),
        (1.0, 1.0, 0.0)
    );

    let tm1 = [("tm_id", "tm-1")];
    assert_eq!(gauge(s, "strata_taskmanager_taskSlotsActive", &tm1), 1.0);
    assert_eq!(gauge(s, "strata_taskmanager_taskSlotsWithGpu", &tm1), 1.0);
    let tm2 = [("tm_id", "tm-2")];
    assert_eq!(gauge(s, "strata_taskmanager_taskSlotsWithGpu", &tm2), 0.0);
    let heartbeat = "strata_taskmanager_timeSinceLastHeartbeat_seconds";
    assert_eq!(gauge(s, heartbeat, &tm1), 1.5);
    let info = sample(s, "strata_taskmanager_info", &tm1);
    assert_eq!(info.labels.get("io"), Some("io_uring"));

    let etl = [("job_id", "00000000000000ab"), ("job_name", "etl")];
    let job_counter = |m: &str| counter(s, &format!("strata_jobmanager_job_{m}_total"), &etl);
    assert_eq!(job_counter("numRecordsIn"), 1000.0);
    assert_eq!(job_counter("numRecordsOut"), 900.0);
    assert_eq!(job_counter("numRecordsOutLocal"), 400.0);
    assert_eq!(job_counter("numRestarts"), 2.0);
    assert_eq!(job_counter("numberOfCompletedCheckpoints"), 3.0);
    assert_eq!(job_counter("numberOfFailedCheckpoints"), 1.0);
    assert_eq!(job_counter("spill_numBytesWritten"), 8192.0);
    assert_eq!(job_counter("gpu_numLaunches"), 12.0);
    assert_eq!(job_counter("accumulatedBackPressuredTime_seconds"), 2.5);
    let tcp = [etl[0], ("transport", "tcp")];
    let remote = "strata_jobmanager_job_numBytesOutRemote_total";
    assert_eq!(counter(s, remote, &tcp), 7000.0);
    let buffers = "strata_jobmanager_job_numBuffersOutRemote_total";
    assert_eq!(counter(s, buffers, &tcp), 7.0);
    let job_gauge = |m: &str| gauge(s, &format!("strata_jobmanager_job_{m}"), &etl);
    assert_eq!(job_gauge("lastCheckpointDuration_seconds"), 1.5);
    assert_eq!(job_gauge("lastCheckpointSize_bytes"), 4096.0);
    assert_eq!(job_gauge("lastCheckpointAlignmentTime_seconds"), 0.02);
    assert_eq!(job_gauge("managedMemoryPeak_bytes"), 1048576.0);
    assert_eq!(job_gauge("buffers_maxInPoolUsage"), 0.25);
    assert_eq!(job_gauge("buffers_maxOutPoolUsage"), 0.5);
    // Ended jobs keep their counters, not the running jobs' gauges.
    let old = [("job_id", "00000000000000cd"), ("job_name", "old")];
    let rows_out = "strata_jobmanager_job_numRecordsOut_total";
    assert_eq!(counter(s, rows_out, &old), 5.0);
    let max_in_pool = "strata_jobmanager_job_buffers_maxInPoolUsage";
    assert!(
        !s.samples
            .iter()
            .any(|x| x.metric == max_in_pool && x.labels.get("job_name") == Some("old"))
    );

    let task = [
        etl[0],
        ("task_name", "events -> filter-1"),
        ("subtask_index", "0"),
        ("tm_id", "tm-1"),
        ("transport", "tcp"),
    ];
    let task_metric = |m: &str| format!("strata_taskmanager_job_task_{m}");
    assert_eq!(gauge(s, &task_metric("buffers_inPoolUsage"), &task), 0.25);
    assert_eq!(gauge(s, &task_metric("buffers_outPoolUsage"), &task), 0.5);
    let rate = task_metric("backPressuredTimeMsPerSecond");
    assert_eq!(gauge(s, &rate, &task), 40.0);
    let accumulated = task_metric("accumulatedBackPressuredTime_seconds_total");
    assert_eq!(counter(s, &accumulated, &task), 1.2);
    let bytes_out = task_metric("numBytesOutRemote_total");
    assert_eq!(counter(s, &bytes_out, &task), 7000.0);
    let buffers_out = task_metric("numBuffersOutRemote_total");
    assert_eq!(counter(s, &buffers_out, &task), 7.0);
    let bytes_in = task_metric("numBytesInRemote_total");
    assert_eq!(counter(s, &bytes_in, &task), 3000.0);

    let filter = [
        etl[0],
        ("task_name", "events -> filter-1"),
        ("operator_name", "filter-1"),
    ];
    let op_metric = |m: &str| format!("strata_taskmanager_job_task_operator_{m}_total");
    assert_eq!(counter(s, &op_metric("numRecordsIn"), &filter), 1000.0);
    assert_eq!(counter(s, &op_metric("numRecordsOut"), &filter), 900.0);
}

#[test]
fn openmetrics_declares_units_and_counter_suffixes_and_ends_with_eof() {
    let text = render(&populated(), Format::OpenMetrics);
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in [
        "# TYPE strata_jobmanager_job_lastCheckpointSize_bytes gauge",
        "# UNIT strata_jobmanager_job_lastCheckpointSize_bytes bytes",
        "# UNIT strata_jobmanager_job_lastCheckpointDuration_seconds seconds",
        "# UNIT strata_taskmanager_timeSinceLastHeartbeat_seconds seconds",
        "# TYPE strata_jobmanager_job_numRestarts counter",
        "strata_jobmanager_job_numRestarts_total{job_id=\"00000000000000ab\",job_name=\"etl\"} 2",
        "strata_jobmanager_job_lastCheckpointSize_bytes{job_id=\"00000000000000ab\",job_name=\"etl\"} 4096",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    // The 0.0.4 format names a counter with its suffix and has no units.
    let text = render(&populated(), Format::PrometheusText);
    assert!(text.contains("# TYPE strata_jobmanager_job_numRestarts_total counter\n"));
    assert!(
        !text.contains("# UNIT") && !text.contains("# EOF"),
        "{text}"
    );
}

#[test]
fn label_values_are_escaped_by_the_encoder() {
    let mut s = empty();
    s.completed.push(job(1, "a\"b\\c\nd", JobState::Finished));
    let escaped = "job_name=\"a\\\"b\\\\c\\nd\"";
    for format in [Format::OpenMetrics, Format::PrometheusText] {
        let text = render(&s, format);
        assert!(text.contains(escaped), "{format:?}:\n{text}");
        assert!(!text.contains("c\nd"), "{format:?}:\n{text}");
    }
}

#[test]
fn scrapers_asking_for_openmetrics_get_it_and_others_get_the_text_format() {
    // What Prometheus 2.x sends.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
    assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
    assert_eq!(Format::negotiate(None), Format::PrometheusText);
    let openmetrics = Format::OpenMetrics.content_type();
    assert!(openmetrics.starts_with("application/openmetrics-text; version=1.0.0"));
    let text = Format::PrometheusText.content_type();
    assert!(text.starts_with("text/plain; version=0.0.4"));
}

#[test]
fn transport_label_is_the_transports_name_without_its_mode_or_reason() {
    let mut j = job(1, "j", JobState::Running);
    for (line, name) in [
        (
            "tcp, task reads between TaskManagers, local channels within one",
            "tcp",
        ),
        (
            "rdma-emulated (forced) between TaskManagers",
            "rdma-emulated",
        ),
        (" between TaskManagers, local channels within one", "none"),
    ] {
        j.transport = line.to_owned();
        assert_eq!(transport_name(&j), name, "{line}");
    }
}
