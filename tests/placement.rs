//! `strata explain` and `strata bench --calibrate` through the real CLI:
//! placement on a node without a GPU, and with a simulated calibration that
//! declares one.

use std::path::{Path, PathBuf};
use std::process::Command;

use strata::kernels::backend::Tier;
use strata::placement::Placement;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut jobs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    jobs.sort();
    jobs
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// `strata` as on a machine without a GPU and without a calibration file.
fn strata(scratch: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("STRATA_LOG", "warn")
        .env("STRATA_DISABLE_GPU", "1")
        .env("STRATA_CALIBRATION", scratch.join("absent.json"));
    c
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("running strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn explain_json(cmd: &mut Command) -> Placement {
    let (code, stdout, stderr) = run(cmd.arg("--json"));
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn tier_of(placement: &Placement, name: &str) -> Tier {
    placement
        .operators
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no operator {name}"))
        .tier
}

/// A calibration of an H100-class node with the built-in CPU rates.
fn gpu_calibration(dir: &Path) -> PathBuf {
    let path = dir.join("gpu-node.json");
    std::fs::write(
        &path,
        r#"{
  "origin": "simulated H100 node",
  "cpu": {"filter_rows_per_s": 3e8, "project_rows_per_s": 2e8,
          "hash_rows_per_s": 3e8, "aggregate_rows_per_s": 3e7},
  "gpu": {"device": "NVIDIA H100 (simulated)", "memory_bytes": 85899345920,
          "rates": {"filter_rows_per_s": 2e10, "project_rows_per_s": 1.5e10,
                    "hash_rows_per_s": 2e10, "aggregate_rows_per_s": 2e9},
          "link_bytes_per_s": 2.5e10, "launch_overhead_s": 1e-5}
}"#,
    )
    .unwrap();
    path
}

#[test]
fn explain_without_a_gpu_places_every_example_operator_on_the_cpu_with_a_reason() {
    let scratch = tempfile::tempdir().unwrap();
    for job in examples() {
        let (code, stdout, stderr) = run(strata(scratch.path()).arg("explain").arg(&job));
        assert_eq!(code, 0, "{}: {stderr}", job.display());
        assert!(stdout.contains("GPU tier:    none"), "{stdout}");
        assert!(stdout.contains("CPU COST"), "{stdout}");
        let placement = explain_json(strata(scratch.path()).arg("explain").arg(&job));
        for op in &placement.operators {
            assert_eq!(op.tier, Tier::Cpu, "{}: {op:?}", job.display());
            assert!(!op.reason.is_empty(), "{op:?}");
        }
    }
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("gpu_pipeline.toml")),
    );
    let filter = &placement.operators[2];
    assert!(
        filter
            .reason
            .contains("no GPU tier (disabled by STRATA_DISABLE_GPU)"),
        "{filter:?}"
    );
    assert!(filter.cpu_cost_s.is_some() && filter.gpu_cost_s.is_none());
}

#[test]
fn explain_with_a_simulated_gpu_calibration_puts_filter_project_chains_on_the_gpu() {
    let scratch = tempfile::tempdir().unwrap();
    let calibration = gpu_calibration(scratch.path());
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("gpu_pipeline.toml"))
            .arg("--calibration")
            .arg(&calibration),
    );
    for name in ["scaled", "large"] {
        assert_eq!(tier_of(&placement, name), Tier::Gpu, "{placement:#?}");
    }
    // The aggregate operator does not call the GPU kernel yet: the aggregate
    // stays on the CPU and says why.
    let totals = placement
        .operators
        .iter()
        .find(|o| o.name == "totals")
        .unwrap();
    assert!(
        totals
            .reason
            .contains("does not run the GPU aggregation kernel"),
        "{totals:?}"
    );
    for name in ["events", "by-key", "totals", "out"] {
        assert_eq!(tier_of(&placement, name), Tier::Cpu, "{placement:#?}");
    }
    // The project -> filter chain is decided as one.
    assert_eq!(placement.operators[1].reason, placement.operators[2].reason);
    assert!(placement.operators[1].reason.contains("scaled → large"));
    assert!(
        placement.gpu_tier.contains("H100"),
        "{}",
        placement.gpu_tier
    );

    // The 50M-row example: a lone filter does not pay for its transfers.
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("keyed_aggregation.toml"))
            .arg("--calibration")
            .arg(&calibration),
    );
    let filter = &placement.operators[1];
    assert_eq!(filter.tier, Tier::Cpu);
    assert!(filter.reason.contains("transfers"), "{filter:?}");
}

#[test]
fn placement_mode_gpu_without_a_gpu_is_a_clear_error() {
    let scratch = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(strata(scratch.path())
        .arg("explain")
        .arg(example("gpu_pipeline.toml"))
        .args(["-D", "placement.mode=gpu"]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("placement.mode = gpu, but this node has no GPU tier"),
        "{stderr}"
    );
    assert!(stderr.contains("STRATA_DISABLE_GPU"), "{stderr}");
}

#[test]
fn placement_modes_override_the_cost_model() {
    let scratch = tempfile::tempdir().unwrap();
    let calibration = gpu_calibration(scratch.path());
    let forced = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("keyed_aggregation.toml"))
            .args(["-D", "placement.mode=gpu", "-D"])
            .arg(format!(
                "placement.calibration-file={}",
                calibration.display()
            )),
    );
    assert_eq!(tier_of(&forced, "positive"), Tier::Gpu, "{forced:#?}");
    assert_eq!(
        tier_of(&forced, "totals"),
        Tier::Cpu,
        "the aggregate has no GPU dispatch"
    );
    let cpu = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("gpu_pipeline.toml"))
            .args(["-D", "placement.mode=cpu", "--calibration"])
            .arg(&calibration),
    );
    assert!(cpu.operators.iter().all(|op| op.tier == Tier::Cpu));
    assert_eq!(cpu.operators[1].reason, "CPU: placement.mode = cpu");
}

#[test]
fn bench_calibrate_writes_the_file_that_explain_prices_with() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("measured.json");
    let (code, stdout, stderr) = run(strata(scratch.path())
        .args(["bench", "--calibrate", "--rows", "50000", "--output"])
        .arg(&path));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("calibration written to"), "{stdout}");
    assert!(stdout.contains("GPU  none"), "{stdout}");
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("project_and_print.toml"))
            .arg("--calibration")
            .arg(&path),
    );
    assert!(
        placement
            .calibration_origin
            .contains("measured by `strata bench --calibrate`"),
        "{}",
        placement.calibration_origin
    );
}

fn tiny_job(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(
        &path,
        r#"[job]
name = "tiny"
parallelism = 1

[[operator]]
name = "events"
type = "datagen"
rows = 5000
columns = ["key", "value"]

[[operator]]
name = "small"
type = "filter"
predicate = "value < 500"

[[operator]]
name = "out"
type = "blackhole"
"#,
    )
    .unwrap();
    path
}

#[test]
fn run_summary_shows_the_placement_and_that_the_cluster_has_no_gpu() {
    let scratch = tempfile::tempdir().unwrap();
    let job = tiny_job(scratch.path());
    let (code, stdout, stderr) = run(strata(scratch.path()).arg("run").arg(&job).args([
        "--no-progress",
        "--taskmanagers",
        "1",
        "-D",
        "rest.port=0",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("gpu no GPU (disabled by STRATA_DISABLE_GPU): CPU slots only"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "placement (placement.mode = auto; GPU tier: none (no TaskManager offers a GPU slot))"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("small                CPU  CPU: no GPU tier"),
        "{stdout}"
    );
}

#[test]
fn run_with_placement_mode_gpu_on_a_cluster_without_gpus_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let job = tiny_job(scratch.path());
    let (code, stdout, stderr) = run(strata(scratch.path()).arg("run").arg(&job).args([
        "--no-progress",
        "--taskmanagers",
        "1",
        "-D",
        "rest.port=0",
        "-D",
        "placement.mode=gpu",
    ]));
    assert_ne!(code, 0, "{stdout}");
    assert!(
        stderr.contains(
            "placement.mode = gpu, but this node has no GPU tier (no TaskManager offers a GPU slot)"
        ),
        "{stderr}"
    );
}

/// The "in … out …" lines of the filters of a run summary.
fn filter_line(stdout: &str) -> String {
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains(" filter ") && l.contains(" in "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    lines.join("; ")
}

#[test]
fn project_and_filters_on_a_simulated_gpu_split_on_out_of_memory_and_keep_the_cpu_result() {
    let scratch = tempfile::tempdir().unwrap();
    let job = scratch.path().join("gpu-filter.toml");
    std::fs::write(
        &job,
        r#"[job]
name = "gpu-filter"
parallelism = 1

[[operator]]
name = "events"
type = "datagen"
rows = 100000
keys = 50
seed = 5
columns = ["key", "value"]

[[operator]]
name = "scaled"
type = "project"
columns = ["key", "value * 3 as value", "value - key as spread"]

[[operator]]
name = "small"
type = "filter"
predicate = "value < 1500 and key != 3 or 2970 <= value"

[[operator]]
name = "wide"
type = "filter"
predicate = "spread > 10"

[[operator]]
name = "out"
type = "blackhole"
"#,
    )
    .unwrap();
    let args = ["--no-progress", "--taskmanagers", "1", "-D", "rest.port=0"];
    let (code, cpu_run, stderr) = run(strata(scratch.path()).arg("run").arg(&job).args(args));
    assert_eq!(code, 0, "{stderr}");
    // One 8192-row launch needs ~68 KB of device memory; the slot gets 90%
    // of 55 KB, so every batch is split in two.
    let (code, gpu_run, stderr) = run(strata(scratch.path())
        .env("STRATA_SIMULATE_GPU_BYTES", "55000")
        .arg("run")
        .arg(&job)
        .args(args)
        .args(["-D", "placement.mode=gpu"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        gpu_run.contains("tier GPU for scaled, small, wide"),
        "{gpu_run}"
    );
    assert!(gpu_run.contains("gpu GPU 0 simulated GPU"), "{gpu_run}");
    let offload = gpu_run
        .lines()
        .find(|l| l.contains("gpu offload:"))
        .unwrap_or_else(|| panic!("no offload line in {gpu_run}"));
    assert!(!offload.contains(" 0 out-of-memory splits"), "{offload}");
    assert!(!offload.contains("gpu offload: 0 batch"), "{offload}");
    assert_eq!(filter_line(&gpu_run), filter_line(&cpu_run));

    // A budget that no piece of a full batch fits even split 8 ways: those
    // pieces run on the CPU twin, and are counted.
    let (code, starved_run, stderr) = run(strata(scratch.path())
        .env("STRATA_SIMULATE_GPU_BYTES", "2000")
        .arg("run")
        .arg(&job)
        .args(args)
        .args(["-D", "placement.mode=gpu"]));
    assert_eq!(code, 0, "{stderr}");
    let offload = starved_run
        .lines()
        .find(|l| l.contains("gpu offload:"))
        .unwrap_or_else(|| panic!("no offload line in {starved_run}"));
    assert!(
        !offload.contains(" 0 pieces (0 rows) on the CPU twin"),
        "{offload}"
    );
    assert_eq!(filter_line(&starved_run), filter_line(&cpu_run));
}
