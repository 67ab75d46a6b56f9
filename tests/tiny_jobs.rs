//! Many tiny jobs, one after another, through the real CLI (issue 14).
//!
//! A source subtask with nothing to read (2 rows over 4 subtasks, no rows
//! at all, one small CSV file read by 4 subtasks, parallelism far above the
//! data) ends at once, before the other tasks of its slot have started. That
//! used to free the slot under them and panic inside the deployment, which
//! hung the job for good. Each run here has its own timeout and names the
//! job that did not finish; the submissions to one long-lived cluster also
//! show that no job leaks a slot to the next.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Far above what a tiny job needs, far below "forever".
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

const CLUSTER: &[&str] = &[
    "-D",
    "taskmanager.memory.process.size=1g",
    "-D",
    "taskmanager.memory.managed.fraction=0.2",
    "-D",
    "taskmanager.numberOfTaskSlots=2",
];

/// Runs `command` to its end, or kills it after [`RUN_TIMEOUT`] and fails
/// the test naming `what`.
fn run_bounded(mut command: Command, what: &str) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    // Drained on threads, so that a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for strata") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("{what} did not finish within {RUN_TIMEOUT:?}; its log:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn assert_finished(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && stdout.contains("FINISHED"),
        "{what}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A keyed aggregation over one CSV file.
fn csv_job(input: &Path, parallelism: u32, out: &Path) -> String {
    format!(
        r#"
[job]
name = "tiny-csv"
parallelism = {parallelism}

[[operator]]
name = "rows"
type = "csv_source"
path = "{}"
schema = {{ key = "int64", value = "int64" }}

[[operator]]
type = "key_by"
keys = ["key"]

[[operator]]
name = "totals"
type = "aggregate"
aggs = ["count(*) as cnt", "sum(value) as total"]

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
"#,
        input.display(),
        out.display()
    )
}

/// One tiny job: its file and where it writes, each in a fresh directory.
struct Tiny {
    what: String,
    job: std::path::PathBuf,
    out: std::path::PathBuf,
    /// Rows and keys of the datagen source; `None` for the CSV job.
    datagen: Option<(u64, u64)>,
}

fn tiny_jobs(dir: &Path, input: &Path) -> Vec<Tiny> {
    // (rows, parallelism); `None` rows is the CSV job. Parallelism 4 is the
    // whole cluster, far above 0, 1 or 2 rows.
    let shapes: [(Option<u64>, u32); 4] = [(Some(2), 4), (Some(0), 4), (None, 4), (Some(1), 4)];
    let mut jobs = Vec::new();
    for round in 0..9 {
        for (rows, parallelism) in shapes {
            let index = jobs.len();
            let run_dir = dir.join(format!("run-{index}"));
            std::fs::create_dir_all(&run_dir).unwrap();
            let out = run_dir.join("out");
            let (text, what) = match rows {
                Some(rows) => (
                    keyed_job(rows, 3, round, parallelism, &out, ""),
                    format!(
                        "run {index}: keyed aggregation of {rows} rows at parallelism {parallelism}"
                    ),
                ),
                None => (
                    csv_job(input, parallelism, &out),
                    format!("run {index}: one CSV file of 2 rows at parallelism {parallelism}"),
                ),
            };
            let job = run_dir.join("job.toml");
            std::fs::write(&job, text).unwrap();
            jobs.push(Tiny {
                what,
                job,
                out,
                datagen: rows.map(|r| (r, round)),
            });
        }
    }
    jobs
}

fn check_results(tiny: &Tiny) {
    let rows = read_csv_parts(&tiny.out);
    match tiny.datagen {
        Some((rows_in, seed)) => {
            assert_matches_reference(&rows, &reference_aggregation(rows_in, 3, seed, 10))
        }
        None => assert_eq!(
            rows,
            vec![vec!["1", "1", "5"], vec!["2", "1", "7"]],
            "{}",
            tiny.what
        ),
    }
}

#[test]
fn many_tiny_jobs_all_finish_on_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "key,value\n1,5\n2,7\n").unwrap();
    let mut jm = strata_command();
    jm.args(["jobmanager", "--bind", "127.0.0.1:0"])
        .args(CLUSTER);
    let (_jm, address) = spawn_announcing_command(jm, "JobManager listening on ");
    let mut taskmanagers = Vec::new();
    for _ in 0..2 {
        let mut tm = strata_command();
        tm.args(["taskmanager", "--jobmanager", &address])
            .args(CLUSTER);
        taskmanagers.push(spawn_announcing_command(tm, "TaskManager data port "));
    }
    let jobs = tiny_jobs(dir.path(), &input);
    assert!(jobs.len() >= 30);
    for (index, tiny) in jobs.iter().enumerate() {
        // The first submission may come before both TaskManagers have
        // registered; it is retried until they have.
        let deadline = Instant::now() + RUN_TIMEOUT;
        let output = loop {
            let mut submit = strata_command();
            submit
                .args(["submit", "--no-progress", "--jobmanager", &address])
                .arg(&tiny.job);
            let output = run_bounded(submit, &tiny.what);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let early = index == 0 && stderr.contains("not enough free task slots");
            if !early || Instant::now() > deadline {
                break output;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_finished(&output, &tiny.what);
        check_results(tiny);
    }
}

/// The embedded mini-cluster of `strata run`, with parallelism far above
/// the data.
#[test]
fn tiny_jobs_with_parallelism_far_above_the_data_finish_in_strata_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "key,value\n1,5\n2,7\n").unwrap();
    for (index, rows) in [Some(2), None, Some(0)].into_iter().enumerate() {
        let out = dir.path().join(format!("out-{index}"));
        let job = dir.path().join(format!("job-{index}.toml"));
        let (text, what) = match rows {
            Some(rows) => (
                keyed_job(rows, 3, 1, 16, &out, ""),
                format!("strata run of {rows} rows at parallelism 16"),
            ),
            None => (
                csv_job(&input, 16, &out),
                "strata run of one CSV file at parallelism 16".to_owned(),
            ),
        };
        std::fs::write(&job, text).unwrap();
        let mut run = strata_command();
        run.arg("run")
            .arg(&job)
            .args(["--no-progress", "--taskmanagers", "2", "--slots", "8"])
            .args(["-D", "taskmanager.memory.process.size=1g"]);
        let output = run_bounded(run, &what);
        assert_finished(&output, &what);
        check_results(&Tiny {
            what,
            job,
            out,
            datagen: rows.map(|r| (r, 1)),
        });
    }
}
