//! `strata explain` and `strata bench --calibrate` through the real CLI:
//! placement on a node without a GPU, and with a simulated calibration that
//! declares one.

use std::path::{Path, PathBuf};
use std::process::Command;

use strata::kernels::backend::Tier;
use strata::placement::cost::ComputeRateSource;
use strata::placement::{OperatorPlacement, Placement};

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

/// The simulated H100 node of `examples/calibration/`.
fn h100_sim() -> PathBuf {
    example("calibration/h100-sim.json")
}

/// A calibration file as the first cost model wrote them: one link figure
/// and one launch overhead, no per-call measurements.
fn old_format_calibration(dir: &Path) -> PathBuf {
    let path = dir.join("old-gpu-node.json");
    std::fs::write(
        &path,
        r#"{
  "origin": "old-format H100 node",
  "cpu": {"filter_rows_per_s": 3e8, "project_rows_per_s": 2e8,
          "hash_rows_per_s": 3e8, "aggregate_rows_per_s": 3e7},
  "gpu": {"device": "NVIDIA H100 (old format)", "memory_bytes": 85899345920,
          "rates": {"filter_rows_per_s": 2e10, "project_rows_per_s": 1.5e10,
                    "hash_rows_per_s": 2e10, "aggregate_rows_per_s": 2e9},
          "link_bytes_per_s": 2.5e10, "launch_overhead_s": 1e-5}
}"#,
    )
    .unwrap();
    path
}

fn assert_close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs(),
        "{actual} != {expected}"
    );
}

fn operator<'a>(placement: &'a Placement, name: &str) -> &'a OperatorPlacement {
    placement
        .operators
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no operator {name}"))
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

/// gpu_pipeline.toml's project → filter chain reads `key` and `value`
/// (two Int64 columns: 8 bytes and a validity bit each, 16.25 bytes a row)
/// of 20M rows and returns all four columns (32.5 bytes a row) of the half
/// the filter keeps.
const PIPELINE_ROWS: f64 = 20e6;
const PIPELINE_H2D_BYTES: f64 = PIPELINE_ROWS * 16.25;
const PIPELINE_D2H_BYTES: f64 = PIPELINE_ROWS / 2.0 * 32.5;

#[test]
fn explain_with_the_simulated_h100_puts_the_project_filter_chain_on_the_gpu_priced_per_call() {
    let scratch = tempfile::tempdir().unwrap();
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("gpu_pipeline.toml"))
            .arg("--calibration")
            .arg(h100_sim()),
    );
    for name in ["scaled", "large"] {
        assert_eq!(tier_of(&placement, name), Tier::Gpu, "{placement:#?}");
    }
    // The Int64 aggregate keeps its state in a device table: a chain of
    // its own (the key_by between is an exchange), cheaper on the GPU.
    assert_eq!(tier_of(&placement, "totals"), Tier::Gpu, "{placement:#?}");
    assert!(
        operator(&placement, "totals")
            .reason
            .contains("GPU: chain totals costs"),
        "{placement:#?}"
    );
    for name in ["events", "by-key", "out"] {
        assert_eq!(tier_of(&placement, name), Tier::Cpu, "{placement:#?}");
    }
    assert!(
        placement.gpu_tier.contains("H100")
            && placement.gpu_tier.contains("launch 4 µs, sync 8 µs")
            && placement
                .gpu_tier
                .contains("H2D pinned 50.0 / pageable 15.0 GB/s")
            && placement
                .gpu_tier
                .contains("D2H pinned 48.0 / pageable 14.0 GB/s"),
        "{}",
        placement.gpu_tier
    );

    // The chain is decided and priced as one.
    assert_eq!(placement.chains.len(), 2, "{placement:#?}");
    let chain = &placement.chains[0];
    assert_eq!(chain.operators, vec![1, 2]);
    assert_eq!(chain.tier, Tier::Gpu);
    let cost = chain.gpu.as_ref().expect("priced on the GPU");
    // 325 MB of input in 32 MiB batches: 10 of 2M rows, each 3 kernels and
    // 6 memsets (fault word, 4 output bitmaps, the filter's row counter)
    // and two waits (the survivor count, then exactly the survivors: a
    // predicted download's margin, 250k rows of 32.5 bytes, would cost
    // more than the second wait).
    assert_eq!(cost.batches, 10);
    assert_close(cost.rows_per_batch, 2e6);
    assert_eq!((cost.launches, cost.syncs), (90, 20));
    assert_close(cost.h2d_bytes, PIPELINE_H2D_BYTES);
    assert_close(cost.d2h_bytes, PIPELINE_D2H_BYTES);
    // Each way: the host copy (20 GB/s) and the pinned DMA (50 in, 48 out).
    let h2d_batch_s = PIPELINE_H2D_BYTES / 10.0 * (1.0 / 20e9 + 1.0 / 50e9);
    let d2h_batch_s = PIPELINE_D2H_BYTES / 10.0 * (1.0 / 48e9 + 1.0 / 20e9);
    assert_close(cost.h2d_s, 10.0 * h2d_batch_s);
    assert_close(cost.d2h_s, 10.0 * d2h_batch_s);
    assert_eq!(cost.compute_rate_source, ComputeRateSource::MeasuredChain);
    // 32.5 MB batches lie between the 16 MiB (1.0 TB/s) and 64 MiB (1.3
    // TB/s) chain rates.
    assert!(
        cost.compute_bytes_per_s > 1.0e12 && cost.compute_bytes_per_s < 1.3e12,
        "{cost:?}"
    );
    // The copies dominate and overlap the compute: 10 × (D2H + 9 × 4 µs +
    // 2 × 8 µs) + one batch's H2D and D2H to fill the pipeline.
    assert!(cost.compute_s < cost.d2h_s && cost.h2d_s < cost.d2h_s);
    assert_close(cost.fixed_s, 10.0 * 52e-6);
    assert_close(cost.fill_s, h2d_batch_s + d2h_batch_s);
    assert_close(
        cost.total_s,
        10.0 * (d2h_batch_s + 52e-6) + h2d_batch_s + d2h_batch_s,
    );
    // CPU: 20M rows ÷ 200M rows/s (project) + ÷ 300M (filter), 2 subtasks.
    assert_close(chain.cpu_cost_s, (20e6 / 2e8 + 20e6 / 3e8) / 2.0);
    assert!(cost.total_s < chain.cpu_cost_s);
    // The operators share the chain's cost and print its breakdown.
    let (scaled, large) = (
        operator(&placement, "scaled"),
        operator(&placement, "large"),
    );
    assert_eq!(scaled.reason, large.reason);
    assert_close(
        scaled.gpu_cost_s.unwrap() + large.gpu_cost_s.unwrap(),
        cost.total_s,
    );
    for part in [
        "GPU: chain scaled → large costs 28.1 ms on GPU vs 83.3 ms on CPU",
        "10 coalesced batches of 2000000 rows",
        "H2D 309.9 MiB",
        "D2H 309.9 MiB",
        "90 launches + 20 syncs",
        "measured chain rate",
    ] {
        assert!(scaled.reason.contains(part), "{part}: {}", scaled.reason);
    }

    // The text table says the same, with the chain's breakdown below it.
    let (code, stdout, stderr) = run(strata(scratch.path())
        .arg("explain")
        .arg(example("gpu_pipeline.toml"))
        .arg("--calibration")
        .arg(h100_sim()));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("scaled → large on GPU: 28.1 ms on GPU vs 83.3 ms on CPU"),
        "{stdout}"
    );
    assert!(stdout.contains("batches of 32.0 MiB"), "{stdout}");
}

#[test]
fn a_lone_filter_whose_other_columns_are_gathered_on_the_host_stays_on_the_cpu() {
    let scratch = tempfile::tempdir().unwrap();
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("keyed_aggregation.toml"))
            .arg("--calibration")
            .arg(h100_sim()),
    );
    let filter = operator(&placement, "positive");
    assert_eq!(filter.tier, Tier::Cpu, "{filter:?}");
    assert!(
        filter.reason.starts_with("CPU: chain positive costs"),
        "{filter:?}"
    );
    let chain = &placement.chains[filter.chain.expect("in a chain")];
    let cost = chain.gpu.as_ref().unwrap();
    // The copies alone outweigh the filter on four CPU subtasks.
    assert!(cost.h2d_s + cost.d2h_s > chain.cpu_cost_s, "{cost:?}");
    assert!(cost.total_s > chain.cpu_cost_s, "{cost:?}");
}

#[test]
fn explain_with_the_default_calibration_of_a_detected_gpu_uses_the_family_rates() {
    let scratch = tempfile::tempdir().unwrap();
    let placement = explain_json(
        strata(scratch.path())
            .env("STRATA_SIMULATE_GPU_BYTES", "80000000000")
            .arg("explain")
            .arg(example("gpu_pipeline.toml")),
    );
    assert!(
        placement.gpu_tier.contains("launch 5 µs, sync 10 µs")
            && placement
                .gpu_tier
                .contains("H2D pinned 25.0 / pageable 8.0 GB/s")
            && placement.gpu_tier.contains("host copy 10.0 GB/s")
            && placement.gpu_tier.contains("fused chain rate not measured"),
        "{}",
        placement.gpu_tier
    );
    let chain = &placement.chains[0];
    let cost = chain.gpu.as_ref().unwrap();
    assert_eq!(cost.compute_rate_source, ComputeRateSource::FamilyRates);
    // 2M rows a batch ÷ 15 G rows/s (project) + ÷ 20 G rows/s (filter).
    assert_close(cost.compute_s, 10.0 * (2e6 / 15e9 + 2e6 / 20e9));
    let h2d_batch_s = PIPELINE_H2D_BYTES / 10.0 * (1.0 / 10e9 + 1.0 / 25e9);
    let d2h_batch_s = PIPELINE_D2H_BYTES / 10.0 * (1.0 / 25e9 + 1.0 / 10e9);
    assert_close(
        cost.total_s,
        10.0 * (h2d_batch_s.max(d2h_batch_s) + 9.0 * 5e-6 + 2.0 * 10e-6)
            + h2d_batch_s
            + d2h_batch_s,
    );
    assert_eq!(chain.tier, Tier::Gpu, "{placement:#?}");
    assert_eq!(tier_of(&placement, "scaled"), Tier::Gpu);
}

#[test]
fn an_old_format_calibration_file_still_prices_the_gpu() {
    let scratch = tempfile::tempdir().unwrap();
    let calibration = old_format_calibration(scratch.path());
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("gpu_pipeline.toml"))
            .arg("--calibration")
            .arg(&calibration),
    );
    // Its one link figure stands for every copy; its launch overhead for
    // the launch latency.
    assert!(
        placement
            .gpu_tier
            .contains("launch 10 µs, sync 10 µs; H2D pinned 25.0 / pageable 25.0 GB/s"),
        "{}",
        placement.gpu_tier
    );
    assert!(placement.chains[0].gpu.is_some());
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
    let calibration = h100_sim();
    // The lone filter the model keeps on the CPU goes to the GPU when
    // asked, and its reason still prints what that costs.
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
    let positive = operator(&forced, "positive");
    assert_eq!(positive.tier, Tier::Gpu, "{forced:#?}");
    assert!(
        positive
            .reason
            .starts_with("GPU: placement.mode = gpu (chain positive:"),
        "{positive:?}"
    );
    assert!(
        positive.reason.contains("coalesced batches"),
        "{positive:?}"
    );
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
    // Still priced, so that explain shows what the GPU would have cost.
    assert_eq!(cpu.chains[0].tier, Tier::Cpu);
    assert!(cpu.chains[0].gpu.is_some());
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
            .contains("measured by `strata bench --calibrate`")
            && placement
                .calibration_origin
                .contains("GPU per-call costs not measured"),
        "{}",
        placement.calibration_origin
    );
}

#[test]
fn bench_calibrate_on_a_simulated_gpu_keeps_the_default_per_call_costs_and_says_so() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("simulated.json");
    let (code, stdout, stderr) = run(strata(scratch.path())
        .env("STRATA_SIMULATE_GPU_BYTES", "100000000")
        .args(["bench", "--calibrate", "--rows", "20000", "--output"])
        .arg(&path));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .contains("simulated GPU: its rates and per-call costs are the defaults, not measured"),
        "{stdout}"
    );
    assert!(stdout.contains("launch 5.0 µs, sync 10.0 µs"), "{stdout}");
    let placement = explain_json(
        strata(scratch.path())
            .arg("explain")
            .arg(example("gpu_pipeline.toml"))
            .arg("--calibration")
            .arg(&path),
    );
    assert!(placement.chains[0].gpu.is_some(), "{placement:#?}");
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

/// The "in … out …" line of the chain's last filter in a run summary (a
/// fused GPU chain counts its rows where it ends: the filters before the
/// last pass its input on).
fn filter_line(stdout: &str) -> String {
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains(" filter ") && l.contains(" in "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    lines[1].clone()
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
    // Device batches of one 8192-row input batch each (64 KiB coalescing),
    // ~330 KB on the device with every row surviving; the slot gets 90% of
    // 55 KB, so each is split three times into pieces of 1024 rows.
    let (code, gpu_run, stderr) = run(strata(scratch.path())
        .env("STRATA_SIMULATE_GPU_BYTES", "55000")
        .arg("run")
        .arg(&job)
        .args(args)
        .args(["-D", "placement.mode=gpu"])
        .args(["-D", "taskmanager.gpu.coalesce-bytes=64kb"]));
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
    assert!(
        offload.contains(" 0 pieces (0 rows) on the CPU twin after out-of-memory"),
        "{offload}"
    );
    assert!(
        gpu_run.contains("gpu chains: 100,000 rows in "),
        "{gpu_run}"
    );
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

/// Every part file of a CSV sink's output directory, with its rows sorted.
fn parts(dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut parts: Vec<(String, Vec<String>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let mut lines: Vec<String> = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            lines.sort();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                lines,
            )
        })
        .collect();
    parts.sort();
    parts
}

/// A fused GPU chain (on the simulated GPU) whose `key_by` targets are
/// hashed on the device, at parallelism 3 with checkpoints: every
/// subtask's output file holds exactly the rows it holds on the CPU, so
/// the device routed every key to the subtask the CPU hash picks.
#[test]
fn a_gpu_chain_routes_its_key_by_on_the_device_to_the_cpu_hash_targets() {
    let scratch = tempfile::tempdir().unwrap();
    let job = |out: &Path| {
        format!(
            r#"[job]
name = "gpu-route"
parallelism = 3

[[operator]]
name = "events"
type = "datagen"
rows = 200000
keys = 97
seed = 9
columns = ["key", "value"]
rows_per_second = 400000

[[operator]]
name = "scaled"
type = "project"
columns = ["key", "value * 3 as tripled", "value / 4.0 as quarter"]

[[operator]]
name = "large"
type = "filter"
predicate = "tripled % 7 != 0 and quarter > -500.0"

[[operator]]
name = "by-key"
type = "key_by"
keys = ["key"]

[[operator]]
name = "totals"
type = "aggregate"
aggs = ["count(*) as cnt", "sum(tripled) as total", "max(quarter) as hi"]

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
mode = "overwrite"
"#,
            out.display()
        )
    };
    let args = [
        "--no-progress",
        "--taskmanagers",
        "2",
        "-D",
        "rest.port=0",
        "-D",
        "execution.checkpointing.interval=100ms",
        "-D",
        "taskmanager.gpu.coalesce-bytes=256kb",
    ];
    let mut outputs = Vec::new();
    for mode in ["cpu", "gpu"] {
        let out = scratch.path().join(format!("out-{mode}"));
        let path = scratch.path().join(format!("{mode}.toml"));
        std::fs::write(&path, job(&out)).unwrap();
        let (code, stdout, stderr) = run(strata(scratch.path())
            .env("STRATA_SIMULATE_GPU_BYTES", "1000000000")
            .arg("run")
            .arg(&path)
            .args(args)
            .args(["-D", &format!("placement.mode={mode}")]));
        assert_eq!(code, 0, "{stderr}");
        if mode == "gpu" {
            assert!(stdout.contains("tier GPU for scaled, large"), "{stdout}");
            assert!(
                stdout.contains("rows routed by targets hashed on the device"),
                "{stdout}"
            );
        }
        outputs.push(parts(&out));
    }
    assert_eq!(outputs[0].len(), 3, "one part per subtask");
    assert_eq!(outputs[0], outputs[1]);
}
