//! The ML example end to end (issue 17): `examples/ml/features.toml` runs on
//! the embedded cluster and a real `pyarrow.flight` client (PyPI) reads
//! every Flight stream, checked against a reference run of the same job
//! writing Parquet. No mocks: the client is `examples/ml/check_flight.py`
//! and then the example trainer, `examples/ml/train.py`.
//!
//! Python with pyarrow comes from `scripts/install_python_deps.sh` (CI runs
//! it and sets `STRATA_PYTHON`); without it the test reports "skipped: no
//! pyarrow", unless `STRATA_REQUIRE_PYARROW=1` (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("STRATA_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python"),
            PathBuf::from("python3"),
        ])
        .collect();
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import pyarrow.flight, numpy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(python);
        }
    }
    None
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
    let Some(python) = python() else {
        assert!(
            std::env::var_os("STRATA_REQUIRE_PYARROW").is_none(),
            "STRATA_REQUIRE_PYARROW is set but no Python with pyarrow was found"
        );
        eprintln!("skipped: no pyarrow (scripts/install_python_deps.sh)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // The reference: the same job writing Parquet.
    let reference = dir.path().join("reference.toml");
    std::fs::write(&reference, example_job(dir.path(), true)).expect("write job");
    let out = strata()
        .arg("run")
        .arg(&reference)
        .args(["--no-progress", "-D", "rest.port=0"])
        .output()
        .expect("reference run");
    assert!(
        out.status.success(),
        "reference run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
