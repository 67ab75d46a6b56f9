//! Checkpoints, exactly-once output and failover, with a JobManager and
//! TaskManagers as separate OS processes killed with SIGKILL.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Cluster settings: fast heartbeats, one slot per TaskManager, checkpoints
/// every 300 ms into `checkpoints`, and a restart strategy with room for
/// the failures a lost TaskManager causes.
fn settings(checkpoints: &Path) -> Vec<String> {
    [
        "heartbeat.interval=300ms",
        "heartbeat.timeout=2s",
        "taskmanager.memory.process.size=1g",
        "taskmanager.memory.managed.fraction=0.2",
        "taskmanager.numberOfTaskSlots=1",
        "execution.checkpointing.interval=300ms",
        "execution.checkpointing.num-retained=2",
        "restart-strategy.type=fixed-delay",
        "restart-strategy.fixed-delay.attempts=5",
        "restart-strategy.fixed-delay.delay=200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!(
        "execution.checkpointing.dir={}",
        checkpoints.display()
    )])
    .flat_map(|kv| ["-D".to_string(), kv])
    .collect()
}

/// `strata ARGS SETTINGS` (options follow the subcommand).
fn strata(args: &[&str], settings: &[String]) -> Command {
    let mut c = strata_command();
    c.args(args).args(settings);
    c
}

/// Starts `strata ARGS SETTINGS` and returns it with what it announces on
/// its first line of standard output after `prefix`.
fn spawn_announcing(settings: &[String], args: &[&str], prefix: &str) -> (Proc, String) {
    spawn_announcing_command(strata(args, settings), prefix)
}

struct Cluster {
    settings: Vec<String>,
    _jm: Proc,
    addr: String,
    checkpoints: PathBuf,
    dir: tempfile::TempDir,
    /// Environment of the TaskManagers (a simulated GPU).
    tm_env: Vec<(String, String)>,
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// A cluster whose settings add `extra` (`key=value`, later wins).
    fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = dir.path().join("checkpoints");
        let mut settings = settings(&checkpoints);
        for kv in extra {
            settings.extend(["-D".to_string(), kv.to_string()]);
        }
        let (jm, addr) = spawn_announcing(
            &settings,
            &["jobmanager", "--bind", "127.0.0.1:0"],
            "JobManager listening on ",
        );
        Self {
            settings,
            _jm: jm,
            addr,
            checkpoints,
            dir,
            tm_env: Vec::new(),
        }
    }

    /// Starts a TaskManager and returns once it has registered (and
    /// offered its slot to the JobManager).
    fn taskmanager(&self) -> Logged {
        let mut command = strata(&["taskmanager", "--jobmanager", &self.addr], &self.settings);
        command.envs(self.tm_env.iter().map(|(k, v)| (k, v)));
        let tm = spawn_logged(command, "TaskManager data port ");
        tm.wait_for_line("registered with the JobManager as", Duration::from_secs(60));
        tm
    }

    /// Writes the job file for output directory `name` and starts
    /// `strata submit` on it.
    fn submit(&self, name: &str) -> (Child, PathBuf) {
        let out = self.dir.path().join(name);
        let job = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&job, exactly_once_job(&out)).unwrap();
        let job_arg = job.display().to_string();
        let args = [
            "submit",
            "--no-progress",
            "--jobmanager",
            &self.addr,
            &job_arg,
        ];
        let child = strata(&args, &self.settings)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, out)
    }

    /// Completed checkpoints of all jobs so far.
    fn completed_checkpoints(&self) -> usize {
        let Ok(jobs) = std::fs::read_dir(&self.checkpoints) else {
            return 0;
        };
        jobs.flatten()
            .filter_map(|j| std::fs::read_dir(j.path()).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("chk-") && !name.ends_with(".inprogress")
            })
            .count()
    }
}

/// A keyed aggregation with integer results, sorted by key per subtask, so
/// every run commits the same bytes; throttled to run for a few seconds.
fn exactly_once_job(out: &Path) -> String {
    format!(
        r#"
[job]
name = "exactly-once-test"
parallelism = 2

[[operator]]
name = "events"
type = "datagen"
rows = 1_200_000
keys = 5_000
seed = 23
batch_size = 4096
rows_per_second = 300_000

[[operator]]
type = "key_by"
keys = ["key"]

[[operator]]
name = "totals"
type = "aggregate"
aggs = ["count(*) as cnt", "sum(value) as total", "min(value) as lo", "max(value) as hi"]

[[operator]]
name = "ordered"
type = "sort"
keys = ["key"]

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
"#,
        out.display()
    )
}

fn wait_ok(child: Child) -> String {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The committed files of an output directory: name → bytes.
fn committed(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Byte-for-byte equality, reported by file and first differing line.
fn assert_same_output(actual: &[(String, Vec<u8>)], expected: &[(String, Vec<u8>)]) {
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(actual), names(expected), "committed files differ");
    for ((name, a), (_, e)) in actual.iter().zip(expected) {
        if a == e {
            continue;
        }
        let (a, e) = (String::from_utf8_lossy(a), String::from_utf8_lossy(e));
        let line = a
            .lines()
            .zip(e.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(a.lines().count().min(e.lines().count()));
        panic!(
            "{name} differs from the reference run at line {}: {:?} vs {:?} ({} vs {} lines)",
            line + 1,
            a.lines().nth(line),
            e.lines().nth(line),
            a.lines().count(),
            e.lines().count()
        );
    }
}

#[test]
fn killing_a_taskmanager_mid_job_restores_from_a_checkpoint_and_commits_exactly_once() {
    kill_mid_job_and_compare(Cluster::start());
}

/// The same with the keyed aggregate on (simulated) GPUs: its state lives
/// in device tables, drained into the checkpointed host state at every
/// barrier, so a killed TaskManager's groups come back from the checkpoint
/// and the output is byte-identical to the run without a failure.
#[test]
fn killing_a_taskmanager_with_a_gpu_aggregate_restores_its_device_state_exactly_once() {
    let mut cluster = Cluster::start_with(&["placement.mode=gpu"]);
    cluster.tm_env = vec![("STRATA_SIMULATE_GPU_BYTES".into(), "1000000000".into())];
    let stdout = kill_mid_job_and_compare(cluster);
    assert!(stdout.contains("tier GPU for totals"), "{stdout}");
    assert!(stdout.contains("gpu aggregation: "), "{stdout}");
}

/// Runs the job once without failure for the reference, then again with a
/// TaskManager killed after a checkpoint; returns the second run's summary.
fn kill_mid_job_and_compare(cluster: Cluster) -> String {
    let _tm1 = cluster.taskmanager();
    let mut tm2 = cluster.taskmanager();

    // A run without failure: the reference output.
    let (reference, reference_out) = cluster.submit("reference");
    let stdout = wait_ok(reference);
    assert!(stdout.contains("FINISHED"), "{stdout}");
    assert!(stdout.contains("checkpoints "), "{stdout}");
    let expected = committed(&reference_out);
    assert_eq!(expected.len(), 2, "one part per subtask: {expected:?}");

    // The same job again; a third TaskManager is the spare. Kill one of the
    // two running the job once a checkpoint of this run completed.
    let before = cluster.completed_checkpoints();
    let (run, out) = cluster.submit("failover");
    let _tm3 = cluster.taskmanager();
    wait_for("a checkpoint", Duration::from_secs(60), || {
        cluster.completed_checkpoints() > before
    });
    tm2.proc.0.kill().unwrap(); // SIGKILL
    let stdout = wait_ok(run);
    assert!(stdout.contains("FINISHED"), "{stdout}");
    assert!(stdout.contains("restarts 1"), "{stdout}");
    assert!(stdout.contains("restored from chk-"), "{stdout}");
    assert_same_output(&committed(&out), &expected);
    drop(tm2);
    stdout
}

/// The newest completed checkpoint directory of the only job that has one.
fn newest_checkpoint(root: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|j| std::fs::read_dir(j.path()).ok())
        .flat_map(|d| d.flatten())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("chk-")?.parse::<u64>().ok()?;
            Some((id, e.path()))
        })
        .max()
}

#[test]
fn a_corrupt_checkpoint_is_skipped_for_the_previous_one_and_the_output_stays_exact() {
    let cluster = Cluster::start_with(&["restart-strategy.fixed-delay.delay=3s"]);
    let _tm1 = cluster.taskmanager();
    let mut tm2 = cluster.taskmanager();
    let (reference, reference_out) = cluster.submit("reference");
    wait_ok(reference);
    let expected = committed(&reference_out);

    let (run, out) = cluster.submit("corrupted");
    let _tm3 = cluster.taskmanager();
    // Two checkpoints of this run (the reference run's were removed when it
    // finished), so one older than the newest is retained.
    wait_for("two checkpoints", Duration::from_secs(60), || {
        newest_checkpoint(&cluster.checkpoints).is_some_and(|(id, _)| id >= 2)
    });
    tm2.proc.0.kill().unwrap(); // SIGKILL
    // The JobManager hears of the loss at once (the control connection
    // closes), and no checkpoint completes once a TaskManager is gone; the
    // restart waits for its delay (3 s here), time enough to corrupt the
    // newest checkpoint first.
    let (newest, dir) = newest_checkpoint(&cluster.checkpoints).expect("a checkpoint");
    let state = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "state"))
        .expect("a state file");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&state, bytes).unwrap();

    let stdout = wait_ok(run);
    assert!(stdout.contains("FINISHED"), "{stdout}");
    assert!(
        stdout.contains(&format!("restored from chk-{}", newest - 1)),
        "restores the checkpoint before the corrupt chk-{newest}: {stdout}"
    );
    assert_same_output(&committed(&out), &expected);
}
