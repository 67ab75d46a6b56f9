//! The ML example end to end (issue 17): `examples/ml/features.toml` runs on
//! the embedded cluster and a real `pyarrow.flight` client (PyPI) reads
//! every Flight stream, checked against a reference run of the same job
//! writing Parquet. No mocks: the client is `examples/ml/check_flight.py`
//! and then the example trainer, `examples/ml/train.py`.
//!
//! Python with pyarrow comes from `scripts/install_python_deps.sh` (CI runs
//! it and sets `STRATA_PYTHON`); without it the test reports "skipped: no
//! pyarrow", unless `STRATA_REQUIRE_PYARROW=1` (CI) makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{spawn_logged, strata_command, wait_for, wait_for_explained};

fn python() -> Option<PathBuf> {
    common::python_importing("pyarrow.flight, numpy")
}

/// The Python with pyarrow, or `None` after saying "skipped: no pyarrow"
/// (a failure instead when `STRATA_REQUIRE_PYARROW` is set, as in CI).
fn python_or_skip() -> Option<PathBuf> {
    let python = python();
    if python.is_none() {
        assert!(
            std::env::var_os("STRATA_REQUIRE_PYARROW").is_none(),
            "STRATA_REQUIRE_PYARROW is set but no Python with pyarrow was found"
        );
        eprintln!("skipped: no pyarrow (scripts/install_python_deps.sh)");
    }
    python
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn strata() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("STRATA_LOG", "warn");
    c
}

/// The example job with its outputs under `dir`; `parquet` replaces the
/// Flight sinks with Parquet sinks (the reference run).
fn example_job(dir: &Path, parquet: bool) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ml/features.toml"),
    )
    .expect("example job");
    let stats = dir.join("stats.json");
    let mut text = text.replace("target/out/ml/stats.json", &stats.display().to_string());
    if parquet {
        for sink in ["train", "validation"] {
            let out = dir.join("reference").join(sink);
            text = text.replace(
                &format!("name = \"{sink}\"\ntype = \"flight_sink\""),
                &format!(
                    "name = \"{sink}\"\ntype = \"parquet_sink\"\npath = \"{}\"",
                    out.display()
                ),
            );
        }
        assert!(!text.contains("flight_sink"), "both sinks replaced");
    }
    text
}

/// Runs the reference job at `path` to its end on the embedded cluster.
fn run_reference(path: &Path) {
    let out = strata()
        .arg("run")
        .arg(path)
        .args(["--no-progress", "-D", "rest.port=0"])
        .output()
        .expect("reference run");
    assert!(
        out.status.success(),
        "reference run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_python(python: &Path, script: &str, args: &[String]) -> (bool, String, String) {
    let out = Command::new(python)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/ml")
                .join(script),
        )
        .args(args)
        .output()
        .expect("running python");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_pyarrow_flight_client_reads_every_stream_of_the_ml_example() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // The reference: the same job writing Parquet.
    let reference = dir.path().join("reference.toml");
    std::fs::write(&reference, example_job(dir.path(), true)).expect("write job");
    run_reference(&reference);
    let stats = dir.path().join("stats.json");
    let reference_stats = std::fs::read_to_string(&stats).expect("the fit phase wrote the stats");
    std::fs::remove_file(&stats).expect("remove stats");

    let job = dir.path().join("flight.toml");
    std::fs::write(&job, example_job(dir.path(), false)).expect("write job");
    for (round, script) in ["check_flight.py", "train.py"].into_iter().enumerate() {
        let port = free_port();
        let mut cluster = strata()
            .arg("run")
            .arg(&job)
            .args(["--no-progress", "-D", "rest.port=0", "-D"])
            .arg(format!("jobmanager.flight.port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the job");
        let flight = format!("grpc://127.0.0.1:{port}");
        let args: Vec<String> = match script {
            "check_flight.py" => vec![
                "--flight".into(),
                flight,
                "--reference".into(),
                dir.path().join("reference").display().to_string(),
            ],
            _ => vec!["--flight".into(), flight, "--numpy".into()],
        };
        let (ok, stdout, stderr) = run_python(&python, script, &args);
        if !ok {
            let _ = cluster.kill();
        }
        let run = cluster.wait_with_output().expect("the job ends");
        let job_out = String::from_utf8_lossy(&run.stdout);
        let job_err = String::from_utf8_lossy(&run.stderr);
        assert!(
            ok,
            "{script} failed:\n{stdout}\n{stderr}\njob:\n{job_out}\n{job_err}"
        );
        assert!(run.status.success(), "job: {job_out}\n{job_err}");
        assert!(job_out.contains("FINISHED"), "{job_out}");
        assert!(
            job_err.contains("fit phase for 'train-scaled'"),
            "the fit phase ran: {job_err}"
        );
        if round == 0 {
            eprintln!("check_flight.py: {stdout}");
            let fitted = std::fs::read_to_string(&stats).expect("stats");
            assert_eq!(fitted, reference_stats, "the fit is reproducible");
        } else {
            assert!(stdout.contains("epoch 1: train loss"), "{stdout}");
        }
    }
}

/// A job that streams for a few seconds: 400k rows at 100k rows/s.
const STREAMING_JOB: &str = "[job]\nname = \"stream\"\nparallelism = 2\n\n[[operator]]\nname = \"events\"\ntype = \"datagen\"\nrows = 400000\nkeys = 1000\nseed = 3\nrows_per_second = 100000\nbatch_size = 1000\n\n[[operator]]\nname = \"out\"\ntype = \"flight_sink\"\n";

#[test]
fn a_trainer_reads_every_row_exactly_once_across_a_taskmanager_kill() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("STRATA_KEEP").is_some())
        .tempdir()
        .expect("tempdir");
    eprintln!("dir {}", dir.path().display());
    // The reference: the same job writing Parquet, without failures.
    let reference = dir.path().join("reference.toml");
    let reference_out = dir.path().join("reference");
    std::fs::write(
        &reference,
        STREAMING_JOB.replace(
            "type = \"flight_sink\"",
            &format!(
                "type = \"parquet_sink\"\npath = \"{}\"",
                reference_out.display()
            ),
        ),
    )
    .expect("write job");
    run_reference(&reference);

    let flight_port = free_port();
    let settings: Vec<String> = [
        "heartbeat.interval=300ms".to_owned(),
        "heartbeat.timeout=2s".into(),
        "taskmanager.numberOfTaskSlots=1".into(),
        "taskmanager.memory.process.size=1g".into(),
        "execution.checkpointing.interval=300ms".into(),
        "restart-strategy.type=fixed-delay".into(),
        "restart-strategy.fixed-delay.attempts=5".into(),
        "restart-strategy.fixed-delay.delay=200ms".into(),
        "rest.port=0".into(),
        format!(
            "execution.checkpointing.dir={}",
            dir.path().join("checkpoints").display()
        ),
        format!("jobmanager.flight.port={flight_port}"),
    ]
    .into_iter()
    .flat_map(|kv| ["-D".to_owned(), kv])
    .collect();
    let command = |args: &[&str]| {
        let mut c = strata_command();
        c.args(args).args(&settings);
        c
    };
    let jm_proc = spawn_logged(
        command(&["jobmanager", "--bind", "127.0.0.1:0"]),
        "JobManager listening on ",
    );
    let jm = jm_proc.announced.clone();
    let taskmanager = || {
        let tm = spawn_logged(
            command(&["taskmanager", "--jobmanager", &jm]),
            "TaskManager data port ",
        );
        tm.wait_for_line("registered with the JobManager as", Duration::from_secs(60));
        tm
    };
    let _tm1 = taskmanager();
    let mut tm2 = taskmanager();
    let job = dir.path().join("stream.toml");
    std::fs::write(&job, STREAMING_JOB).expect("write job");
    let job_arg = job.display().to_string();
    let submit = command(&["submit", "--no-progress", "--jobmanager", &jm, &job_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("submit");
    let read = dir.path().join("read");
    let reader = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ml/read_flight.py"))
        .args(["--flight", &format!("grpc://127.0.0.1:{flight_port}")])
        .args(["--job", "stream", "--sink", "out", "--out"])
        .arg(&read)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("reader.log")).expect("log"))
        .spawn()
        .expect("reader");
    // The spare, then a kill once the trainer has read some rows and a
    // checkpoint of the job has completed.
    let _tm3 = taskmanager();
    let rows_read = || {
        std::fs::read_to_string(read.join("rows-read"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let log = dir.path().join("reader.log");
    wait_for_explained(
        Duration::from_secs(60),
        || rows_read() >= 20_000,
        || {
            format!(
                "the trainer read {} rows in 60 s; its log:\n{}\nthe JobManager's:\n{}",
                rows_read(),
                std::fs::read_to_string(&log).unwrap_or_default(),
                jm_proc.lines().join("\n")
            )
        },
    );
    wait_for("a completed checkpoint", Duration::from_secs(60), || {
        std::fs::read_dir(dir.path().join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|j| std::fs::read_dir(j.path()).ok())
            .flat_map(|d| d.flatten())
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("chk-") && !name.ends_with(".inprogress")
            })
    });
    assert!(rows_read() < 400_000, "the stream ended before the kill");
    tm2.proc.0.kill().expect("SIGKILL"); // SIGKILL
    let reader = reader.wait_with_output().expect("reader ends");
    let submitted = submit.wait_with_output().expect("submit ends");
    let summary = String::from_utf8_lossy(&submitted.stdout);
    assert!(
        reader.status.success(),
        "reader: {}\n{}\njob: {summary}",
        String::from_utf8_lossy(&reader.stdout),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(summary.contains("FINISHED"), "{summary}");
    assert!(summary.contains("restarts 1"), "{summary}");
    let report = String::from_utf8_lossy(&reader.stdout);
    assert!(report.contains("\"rows\": 400000"), "{report}");
    assert!(
        !report.contains("\"breaks\": 0"),
        "the streams broke: {report}"
    );
    // Every partition holds the reference's rows, in order: none lost,
    // none twice.
    let compare = format!(
        "import pyarrow.parquet as pq\nfor i in (0, 1):\n    a = pq.read_table('{}/part-%d.parquet' % i)\n    b = pq.read_table('{}/part-%d.parquet' % i)\n    assert a.equals(b.select(a.column_names)), i\n",
        reference_out.display(),
        read.display()
    );
    let status = Command::new(&python)
        .args(["-c", &compare])
        .status()
        .expect("compare");
    assert!(
        status.success(),
        "the trainer's rows differ from the reference"
    );
}
