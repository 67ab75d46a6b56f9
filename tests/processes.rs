//! A JobManager and TaskManagers as separate OS processes over real sockets.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FAST_HEARTBEATS: &[&str] = &[
    "-D",
    "rest.port=0",
    "-D",
    "heartbeat.interval=500ms",
    "-D",
    "heartbeat.timeout=3s",
    "-D",
    "taskmanager.memory.process.size=1g",
    "-D",
    "taskmanager.memory.managed.fraction=0.2",
    "-D",
    "taskmanager.numberOfTaskSlots=2",
];

fn strata() -> Command {
    strata_command()
}

/// Starts `strata ARGS` and returns it with what it announces on its
/// first line of standard output after `prefix`, collecting its log.
fn spawn_announcing(args: &[&str], prefix: &str) -> Logged {
    let mut command = strata();
    command.args(args).args(FAST_HEARTBEATS);
    spawn_logged(command, prefix)
}

/// A JobManager on an ephemeral port (`announced`: its address).
fn jobmanager() -> Logged {
    spawn_announcing(
        &["jobmanager", "--bind", "127.0.0.1:0"],
        "JobManager listening on ",
    )
}

/// A TaskManager with extra arguments (`-D key=value`), registered with the
/// JobManager (`announced`: its data address).
fn taskmanager_with(jm: &str, extra: &[&str]) -> Logged {
    let mut args = vec!["taskmanager", "--jobmanager", jm];
    args.extend_from_slice(extra);
    let tm = spawn_announcing(&args, "TaskManager data port ");
    tm.wait_for_line("registered with the JobManager as", Duration::from_secs(60));
    tm
}

const EMULATED_VERBS: &[&str] = &["-D", "taskmanager.network.transport=rdma-emulated"];

fn submit(jm: &str, job: &std::path::Path) -> std::process::Output {
    strata()
        .args(["submit", "--no-progress", "--jobmanager", jm])
        .arg(job)
        .output()
        .unwrap()
}

#[test]
fn separate_processes_run_a_keyed_job_over_sockets() {
    keyed_job_across_processes(&[], "transport: tcp, task reads (");
}

/// The verbs protocol between processes: the emulated devices talk over
/// their TCP link, as two NICs would over the fabric.
#[test]
fn separate_processes_run_a_keyed_job_over_emulated_verbs() {
    keyed_job_across_processes(EMULATED_VERBS, "transport: rdma-emulated (");
}

fn keyed_job_across_processes(tm_args: &[&str], transport: &str) {
    let jm = jobmanager();
    let addr = jm.announced.clone();
    // Both TaskManagers have registered (and offered their slots) when
    // these return.
    let _tm1 = taskmanager_with(&addr, tm_args);
    let _tm2 = taskmanager_with(&addr, tm_args);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = dir.path().join("job.toml");
    std::fs::write(&job, keyed_job(200_000, 3_000, 17, 4, &out, "")).unwrap();
    let output = submit(&addr, &job);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("FINISHED") && stdout.contains("tm-2/slot"),
        "{stdout}"
    );
    assert!(stdout.contains(transport), "{stdout}");
    assert_matches_reference(
        &read_csv_parts(&out),
        &reference_aggregation(200_000, 3_000, 17, 10),
    );
}

/// A JobManager, two TaskManagers and a 20-second job running on both.
struct SlowJob {
    _jm: Logged,
    _tm1: Logged,
    tm2: Logged,
    tm2_data: String,
    rest: String,
    submitter: Option<Child>,
    _dir: tempfile::TempDir,
}

impl SlowJob {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(tm_args: &[&str]) -> Self {
        let jm = jobmanager();
        let addr = jm.announced.clone();
        let rest = rest_address(&jm);
        let tm1 = taskmanager_with(&addr, tm_args);
        let tm2 = taskmanager_with(&addr, tm_args);
        let tm2_data = tm2.announced.clone();
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("slow.toml");
        // 100k rows/s for 2M rows: ~20 s unless something fails it.
        let extra = "rows_per_second = 100_000";
        std::fs::write(
            &job,
            keyed_job(2_000_000, 1000, 3, 4, &dir.path().join("out"), extra),
        )
        .unwrap();
        let submitter = strata()
            .args(["submit", "--no-progress", "--jobmanager", &addr])
            .arg(&job)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Running on both TaskManagers, as their heartbeats report.
        let data = [tm1.announced.clone(), tm2_data.clone()];
        wait_for(
            "the job to run on both TaskManagers",
            Duration::from_secs(60),
            || {
                let running = taskmanagers_running_tasks(&rest);
                data.iter().all(|d| running.contains(d))
            },
        );
        Self {
            _jm: jm,
            _tm1: tm1,
            tm2,
            tm2_data,
            rest,
            submitter: Some(submitter),
            _dir: dir,
        }
    }
}

/// Ctrl-C on `strata submit` stops the client only, and says so: the job
/// is the cluster's and keeps running (the client used to die silently,
/// leaving the user to guess whether the job had stopped too).
#[test]
fn interrupting_submit_leaves_the_job_running_and_says_so() {
    let mut c = SlowJob::start();
    let mut submitter = c.submitter.take().expect("the submitter");
    let sent = Command::new("kill")
        .args(["-INT", &submitter.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    wait_for(
        "strata submit to exit on SIGINT",
        Duration::from_secs(30),
        || submitter.try_wait().unwrap().is_some(),
    );
    let out = submitter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped waiting; a job already submitted keeps running"),
        "{stderr}"
    );
    let (running, completed) = job_states(&c.rest);
    assert_eq!(running.len(), 1, "still running: {running:?} {completed:?}");
    assert!(completed.is_empty(), "{completed:?}");
}

#[test]
fn killing_a_taskmanager_fails_the_job_naming_it_within_the_heartbeat_timeout() {
    kill_mid_job(SlowJob::start());
}

#[test]
fn killing_a_taskmanager_mid_transfer_over_emulated_verbs_names_it() {
    kill_mid_job(SlowJob::start_with(EMULATED_VERBS));
}

fn kill_mid_job(mut c: SlowJob) {
    let (tm2, tm2_data) = (&mut c.tm2, c.tm2_data.clone());
    let submitter = c.submitter.take().unwrap();
    let killed_at = Instant::now();
    tm2.proc.0.kill().unwrap(); // SIGKILL
    let output = submitter.wait_with_output().unwrap();
    let elapsed = killed_at.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(
        stdout.contains(&tm2_data),
        "the cause names the lost TaskManager ({tm2_data}): {stdout}"
    );
    assert!(elapsed < Duration::from_secs(3 + 5), "took {elapsed:?}");
}

#[test]
fn a_frozen_taskmanager_is_declared_lost_after_the_heartbeat_timeout() {
    let mut c = SlowJob::start();
    let (tm2, tm2_data) = (&c.tm2, c.tm2_data.clone());
    let submitter = c.submitter.take().unwrap();
    // SIGSTOP: sockets stay open, heartbeats stop; only the timeout can tell.
    let stopped = Command::new("kill")
        .args(["-STOP", &tm2.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let frozen_at = Instant::now();
    let output = submitter.wait_with_output().unwrap();
    let elapsed = frozen_at.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("lost: no heartbeat"), "{stdout}");
    assert!(
        stdout.contains(&tm2_data),
        "names the frozen TaskManager ({tm2_data}): {stdout}"
    );
    assert!(
        elapsed >= Duration::from_secs(2),
        "declared lost before the timeout: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(3 + 5), "took {elapsed:?}");
}
