//! A TaskManager whose peer or whose own process stops (issue 14): a failed
//! deployment leaves no slot behind, and a TaskManager paused for longer
//! than `heartbeat.timeout` cancels its tasks, waits for its slots and
//! registers again as a new TaskManager.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CLUSTER: &[&str] = &[
    "-D",
    "heartbeat.interval=300ms",
    "-D",
    "heartbeat.timeout=2s",
    "-D",
    "taskmanager.memory.process.size=1g",
    "-D",
    "taskmanager.memory.managed.fraction=0.2",
    "-D",
    "taskmanager.numberOfTaskSlots=2",
];

const BOUND: Duration = Duration::from_secs(60);

struct Cluster {
    _jm: Proc,
    address: String,
    dir: tempfile::TempDir,
    next: usize,
}

impl Cluster {
    fn start() -> Self {
        let mut jm = strata_command();
        jm.args(["jobmanager", "--bind", "127.0.0.1:0"])
            .args(CLUSTER);
        let (jm, address) = spawn_announcing_command(jm, "JobManager listening on ");
        Self {
            _jm: jm,
            address,
            dir: tempfile::tempdir().unwrap(),
            next: 0,
        }
    }

    /// A TaskManager whose log goes to a file, with that file.
    fn taskmanager(&mut self) -> (Proc, PathBuf) {
        self.next += 1;
        let log = self.dir.path().join(format!("tm{}.log", self.next));
        let mut tm = strata_command();
        tm.args(["taskmanager", "--jobmanager", &self.address])
            .args(CLUSTER)
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = tm.stdout(Stdio::piped()).spawn().expect("spawn strata");
        // The first line announces the data port once the TaskManager started.
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("TaskManager data port"), "{line:?}");
        (Proc(child), log)
    }

    /// A keyed job file of `rows` rows at `parallelism`, in a fresh directory.
    fn job(&mut self, rows: u64, parallelism: u32, extra: &str) -> PathBuf {
        self.next += 1;
        let dir = self.dir.path().join(format!("job-{}", self.next));
        std::fs::create_dir_all(&dir).unwrap();
        let job = dir.join("job.toml");
        let text = keyed_job(rows, 50, 3, parallelism, &dir.join("out"), extra);
        std::fs::write(&job, text).unwrap();
        job
    }

    fn submit(&self, job: &Path) -> Command {
        let mut c = strata_command();
        c.args(["submit", "--no-progress", "--jobmanager", &self.address])
            .arg(job);
        c
    }

    /// Submits `job` until it finishes, within [`BOUND`]: the cluster may
    /// not have settled yet (TaskManagers registering or being declared
    /// lost). Panics with the last answer naming `what`.
    fn submit_until_finished(&self, job: &Path, what: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let output = bounded(self.submit(job), what);
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            if output.status.success() && stdout.contains("FINISHED") {
                return stdout;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not finish within {BOUND:?}; last answer:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Runs `command` with a bound; a hang fails the test naming `what`.
fn bounded(mut command: Command, what: &str) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(BOUND) {
        Ok(output) => output.expect("waiting for strata"),
        Err(_) => {
            signal("KILL", id);
            panic!("{what} did not end within {BOUND:?}");
        }
    }
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Waits until `log` says `needle` `count` times; returns the log.
fn wait_for_log(log: &Path, needle: &str, count: usize) -> String {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    wait_for(
        &format!("{} to say {needle:?}", log.display()),
        BOUND,
        || read().matches(needle).count() >= count,
    );
    read()
}

/// Issue 14: a deployment that cannot reach a producer TaskManager (killed,
/// not yet declared lost) used to keep its slots allocated for good, and
/// every later job failed with "slot 0 is occupied".
#[test]
fn a_deployment_that_cannot_reach_a_killed_peer_leaves_no_slot_behind() {
    let mut cluster = Cluster::start();
    let (_tm1, tm1_log) = cluster.taskmanager();
    let (mut tm2, _) = cluster.taskmanager();
    let warm_up = cluster.job(1_000, 4, "");
    cluster.submit_until_finished(&warm_up, "the job on both TaskManagers");
    tm2.0.kill().unwrap(); // SIGKILL
    // The JobManager declares tm2 lost as soon as its control connection
    // closes, so this job is refused for want of slots; if it was deployed
    // before that, tm1's consumers cannot connect to tm2's producers — the
    // path that used to leak tm1's slots. It fails either way.
    let doomed = cluster.job(1_000, 4, "");
    let output = bounded(cluster.submit(&doomed), "the job on the killed TaskManager");
    assert!(!output.status.success(), "{output:?}");
    let _ = &tm1_log;
    // Once tm2 is declared lost, tm1's two slots run the next job.
    let after = cluster.job(1_000, 2, "");
    let stdout = cluster.submit_until_finished(&after, "the job after the failed deployment");
    assert!(
        stdout.contains("tm-1/slot0") && stdout.contains("tm-1/slot1"),
        "{stdout}"
    );
}

/// A TaskManager stopped (SIGSTOP) for longer than `heartbeat.timeout`
/// notices the gap when it continues: it cancels its tasks, waits until
/// their slots are free, and only then registers again, under a new name.
#[test]
fn a_paused_taskmanager_fences_its_tasks_before_registering_again() {
    let mut cluster = Cluster::start();
    let (_tm1, _) = cluster.taskmanager();
    let (tm2, log) = cluster.taskmanager();
    let warm_up = cluster.job(1_000, 4, "");
    cluster.submit_until_finished(&warm_up, "the job on both TaskManagers");
    // A job that runs for a while, with tasks on tm2.
    let slow = cluster.job(2_000_000, 4, "rows_per_second = 50_000");
    let mut running = cluster.submit(&slow);
    let running = running
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Proc(running);
    // The warm-up job said it once.
    wait_for_log(&log, "every task deployed here started", 2);
    signal("STOP", tm2.0.id());
    // The JobManager declares tm2 lost and fails the job.
    let mut running = running;
    wait_for("the job to fail without tm2", BOUND, || {
        running.0.try_wait().unwrap().is_some()
    });
    signal("CONT", tm2.0.id());
    let text = wait_for_log(&log, "registered with the JobManager as tm-3", 1);
    let fenced = text
        .find("every task stopped and every slot is free")
        .expect("the fence waited for the tasks");
    // Which side notices first depends on scheduling after SIGCONT: the
    // TaskManager's own pause detector ("was not scheduled for"), its
    // heartbeat timeout ("no message from"), or the JobManager having
    // closed the session ("lost the session with the JobManager"). Any of
    // them must come before the fence.
    let paused = [
        "was not scheduled for",
        "no message from",
        "lost the session with the JobManager",
    ]
    .iter()
    .filter_map(|line| text.find(line))
    .min();
    assert!(paused.is_some_and(|p| p < fenced), "{text}");
    assert!(fenced < text.find("as tm-3").unwrap(), "{text}");
    // Both TaskManagers' slots are free again: a job needs all four.
    let after = cluster.job(1_000, 4, "");
    let stdout = cluster.submit_until_finished(&after, "the job after the fence");
    assert!(stdout.contains("tm-3/slot"), "{stdout}");
    drop(tm2);
}

/// A TaskManager stopped with SIGTERM mid-job (how a service manager stops
/// it) cancels its tasks, exits, and leaves no spill directory behind; the
/// job fails with the TaskManager named instead of hanging.
#[test]
fn sigterm_mid_job_exits_and_removes_the_spill_directory() {
    let mut cluster = Cluster::start();
    let spill = cluster.dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    let log = cluster.dir.path().join("tm-term.log");
    let mut tm = strata_command();
    tm.args(["taskmanager", "--jobmanager", &cluster.address])
        .args(CLUSTER)
        .args(["-D", &format!("io.tmp.dirs={}", spill.display())])
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null());
    let mut tm = Proc(tm.spawn().expect("spawn strata"));
    wait_for_log(&log, "registered with the JobManager", 1);
    let spill_dirs = || std::fs::read_dir(&spill).unwrap().count();
    assert_eq!(spill_dirs(), 1, "the TaskManager's spill directory");
    let job = cluster.job(200_000_000, 2, "rows_per_second = 2000000");
    let mut running = cluster.submit(&job);
    let mut running = Proc(running.stdout(Stdio::null()).spawn().unwrap());
    wait_for_log(&log, "every task deployed here started", 1);
    signal("TERM", tm.0.id());
    wait_for("the TaskManager to exit on SIGTERM", BOUND, || {
        tm.0.try_wait().unwrap().is_some()
    });
    assert!(tm.0.wait().unwrap().success());
    assert_eq!(spill_dirs(), 0, "no spill directory left behind");
    wait_for("the job to end without its TaskManager", BOUND, || {
        running.0.try_wait().unwrap().is_some()
    });
}
