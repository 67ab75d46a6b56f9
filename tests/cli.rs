//! The real CLI: clear errors for bad config, bad job files and an
//! unreachable JobManager, and a full run with its summary.

use std::process::Command;

mod common;

fn strata() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("STRATA_LOG", "warn,strata=info");
    c
}

use common::output;

#[test]
fn config_prints_the_flink_memory_layout() {
    let (code, stdout, stderr) = output(strata().args(["config"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("taskmanager.memory.process.size"),
        "{stdout}"
    );
    assert!(
        stdout.contains("512"),
        "managed memory of the default layout: {stdout}"
    );
}

#[test]
fn bad_config_value_names_key_value_and_reason() {
    let (code, _, stderr) =
        output(strata().args(["config", "-D", "taskmanager.memory.managed.fraction=1.5"]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("taskmanager.memory.managed.fraction") && stderr.contains("1.5"),
        "{stderr}"
    );
}

#[test]
fn unknown_config_key_in_a_file_names_file_line_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("strata.yaml");
    std::fs::write(
        &file,
        "# cluster\ntaskmanager.numberOfTaskSlots: 2\ntaskmanager.numberOfTaskSlot: 4\n",
    )
    .unwrap();
    let (code, _, stderr) = output(strata().args(["config", "--file"]).arg(&file));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("strata.yaml") && stderr.contains(":3"),
        "{stderr}"
    );
    assert!(
        stderr.contains("taskmanager.numberOfTaskSlots"),
        "suggestion: {stderr}"
    );
}

/// A Flink 2 `config.yaml` (nested blocks, a list) loads: the keys strata
/// shares with Flink take effect, each Flink-only key is named in a warning.
#[test]
fn a_flink_2_config_yaml_loads_with_warnings_for_flink_only_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        "env:\n  java:\n    opts:\n      all: --add-opens=java.base/java.util=ALL-UNNAMED\n\
         jobmanager:\n  bind-host: localhost\n  rpc:\n    address: localhost\n    port: 6123\n\
         taskmanager:\n  numberOfTaskSlots: 3\n  memory:\n    process:\n      size: 1728m\n\
         io:\n  tmp:\n    dirs:\n      - /tmp\n",
    )
    .unwrap();
    let (code, stdout, stderr) = output(strata().args(["config", "--file"]).arg(&file));
    assert_eq!(code, 0, "{stderr}");
    let row = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {stdout}"))
            .to_owned()
    };
    assert!(
        row("taskmanager.numberOfTaskSlots").contains("config.yaml:11"),
        "{stdout}"
    );
    assert!(
        row("taskmanager.memory.process.size").contains("1728"),
        "{stdout}"
    );
    assert!(row("io.tmp.dirs").contains("config.yaml:17"), "{stdout}");
    for ignored in ["env.java.opts.all", "jobmanager.bind-host"] {
        assert!(
            stderr.contains(&format!(
                "`{ignored}` is a Flink setting strata does not use"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn bad_job_file_names_file_line_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("bad.toml");
    std::fs::write(
        &job,
        "[job]\nname = \"bad\"\n\n[[operator]]\ntype = \"datagen\"\nrows = 10\nkeys = 2\nseed = 1\n\n[[operator]]\ntype = \"filter\"\npredicate = \"vlaue > 3\"\n",
    )
    .unwrap();
    let (code, _, stderr) = output(strata().arg("run").arg(&job));
    assert_ne!(code, 0);
    assert!(stderr.contains("bad.toml:12"), "{stderr}");
    assert!(
        stderr.contains("vlaue") && stderr.contains("value"),
        "{stderr}"
    );
}

#[test]
fn submit_to_an_unreachable_jobmanager_names_the_address() {
    let (code, _, stderr) = output(strata().args([
        "submit",
        "examples/project_and_print.toml",
        "--jobmanager",
        "127.0.0.1:1",
        "--no-progress",
    ]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("cannot reach the JobManager at 127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn taskmanager_retries_then_gives_up_naming_the_address() {
    let (code, _, stderr) = output(strata().args([
        "taskmanager",
        "--jobmanager",
        "127.0.0.1:1",
        "-D",
        "taskmanager.registration.timeout=1s",
        "-D",
        "taskmanager.memory.process.size=1g",
    ]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("could not reach JobManager at 127.0.0.1:1"),
        "retry log line: {stderr}"
    );
    assert!(stderr.contains("retrying in"), "{stderr}");
    assert!(
        stderr.contains("could not register with the JobManager at 127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn run_prints_a_summary_and_the_results() {
    let (code, stdout, stderr) = output(strata().args([
        "run",
        "examples/project_and_print.toml",
        "--taskmanagers",
        "2",
        "--slots",
        "1",
        "--no-progress",
        "-D",
        "taskmanager.memory.process.size=1g",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("+I["), "printed result row: {stdout}");
    assert!(stdout.contains("FINISHED"), "{stdout}");
    assert!(stdout.contains("rows in 1,000,000"), "{stdout}");
    assert!(stdout.contains("parallelism 2"), "{stdout}");
    assert!(
        stdout.contains("tm-1/slot0") && stdout.contains("tm-2/slot0"),
        "placement: {stdout}"
    );
    assert!(
        stdout.contains("time to first row: ") && stdout.contains(" ms after process start"),
        "{stdout}"
    );
}

/// Ctrl-C (SIGINT) or SIGTERM on `strata run` cancels the job instead of
/// killing the process: the summary says CANCELED and names the signal,
/// the exit code is 128 + the signal's number, and the mini-cluster's
/// spill directory is removed (the process used to die on the spot and
/// leave it for the next start to sweep).
#[test]
fn a_signal_cancels_a_local_run_and_leaves_no_spill_directory() {
    use std::io::Read;
    const BOUND: std::time::Duration = std::time::Duration::from_secs(60);
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("spill");
        std::fs::create_dir_all(&spill).unwrap();
        let job = dir.path().join("job.toml");
        let out = dir.path().join("out");
        let text = common::keyed_job(200_000_000, 100, 7, 2, &out, "rows_per_second = 2000000");
        std::fs::write(&job, text).unwrap();
        let log = dir.path().join("run.log");
        let mut run = strata();
        run.arg("run")
            .arg(&job)
            .args(["--no-progress", "-D"])
            .arg(format!("io.tmp.dirs={}", spill.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut run = common::Proc(run.spawn().expect("spawn strata"));
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        common::wait_for("the job's tasks to start", BOUND, || {
            read_log().contains("every task deployed here started")
        });
        let spill_dirs = || std::fs::read_dir(&spill).unwrap().count();
        assert_eq!(spill_dirs(), 1, "the TaskManager's spill directory");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &run.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        common::wait_for(&format!("strata run to exit on SIG{signal}"), BOUND, || {
            run.0.try_wait().unwrap().is_some()
        });
        let status = run.0.wait().unwrap();
        let mut stdout = String::new();
        run.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let stderr = read_log();
        assert_eq!(status.code(), Some(code), "{stdout}\n{stderr}");
        assert!(stdout.contains("CANCELED"), "{stdout}");
        assert!(
            stdout.contains(&format!("canceled by SIG{signal}")),
            "{stdout}"
        );
        assert!(
            stderr.contains("canceling the job (send it again to stop at once)"),
            "{stderr}"
        );
        assert_eq!(spill_dirs(), 0, "no spill directory left behind");
    }
}

/// A mistyped CSV path is an error before the run starts, naming the job
/// file's line; it used to fail every task, and with checkpointing on the
/// default restart strategy retried it forever. `explain` still needs no
/// data for a source whose schema the job file declares.
#[test]
fn a_missing_csv_source_path_is_refused_before_the_run_starts() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for (path, expected) in [
        (dir.path().join("no-such.csv"), "No such file or directory"),
        (empty, "no .csv files in directory"),
    ] {
        let job = dir.path().join("typo.toml");
        std::fs::write(
            &job,
            format!(
                "[job]\nname = \"typo\"\n\n[[operator]]\nname = \"src\"\ntype = \"csv_source\"\n\
                 path = \"{}\"\nschema = {{ key = \"int64\" }}\n\n[[operator]]\nname = \"show\"\n\
                 type = \"print\"\n",
                path.display()
            ),
        )
        .unwrap();
        let (code, _, stderr) = output(strata().arg("run").arg(&job).args([
            "--no-progress",
            "-D",
            "execution.checkpointing.interval=1s",
        ]));
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains("typo.toml:7: operator 'src' (csv_source): key 'path'"),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "{stderr}");
        let (code, stdout, stderr) = output(strata().arg("explain").arg(&job));
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
}

/// Reads every row of the Parquet part files in `dir` as (key, n, s).
fn read_counts(dir: &std::path::Path) -> std::collections::BTreeMap<i64, (i64, i64)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use strata::exec::source::{ParquetSource, Source};
    let spec = strata::job::ParquetSourceSpec {
        path: dir.to_owned(),
        schema: std::sync::Arc::new(arrow_schema::Schema::empty()),
        batch_size: 1024,
        watermark: None,
        columns: None,
        prune: None,
    };
    let mut source = ParquetSource::new(spec, 0, 1).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    while let Some(batch) = source.next_batch().unwrap() {
        let column = |i: usize| batch.column(i).as_primitive::<Int64Type>().clone();
        let (keys, n, sums) = (column(0), column(1), column(2));
        for row in 0..batch.num_rows() {
            counts.insert(keys.value(row), (n.value(row), sums.value(row)));
        }
    }
    counts
}

/// One CSV file is split into byte ranges over the source subtasks, which
/// read only the columns the job uses: the results equal a plain
/// computation.
#[test]
fn one_csv_file_split_over_the_subtasks_gives_the_plain_result() {
    let dir = tempfile::tempdir().unwrap();
    let csv_dir = dir.path().join("csv");
    std::fs::create_dir(&csv_dir).unwrap();
    let mut text = String::from("key,value,note\n");
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..200_000i64 {
        text.push_str(&format!("{},{},n{i}\n", i % 7, i % 1000));
        if i % 1000 >= 990 {
            let e = expected.entry(i % 7).or_insert((0i64, 0i64));
            *e = (e.0 + 1, e.1 + i % 1000);
        }
    }
    std::fs::write(csv_dir.join("big.csv"), &text).unwrap();
    let run = |source: String, out: &std::path::Path| {
        let job = format!(
            "[job]\nname = \"split\"\nparallelism = 3\n\
             [[operator]]\nname = \"src\"\n{source}\n\
             [[operator]]\nname = \"f\"\ntype = \"filter\"\npredicate = \"value >= 990\"\n\
             [[operator]]\nname = \"k\"\ntype = \"key_by\"\nkeys = [\"key\"]\n\
             [[operator]]\nname = \"a\"\ntype = \"aggregate\"\naggs = [\"count(*) as n\", \"sum(value) as s\"]\n\
             [[operator]]\nname = \"out\"\ntype = \"parquet_sink\"\npath = {:?}\n",
            out.display().to_string()
        );
        let job_file = out.with_extension("toml");
        std::fs::write(&job_file, job).unwrap();
        let (code, stdout, stderr) = output(strata().args([
            "run",
            job_file.to_str().unwrap(),
            "--no-progress",
            "-D",
            "taskmanager.memory.process.size=1g",
        ]));
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    let from_csv = dir.path().join("from-csv");
    let csv_source = format!(
        "type = \"csv_source\"\npath = {:?}\nschema = {{ key = \"int64\", value = \"int64\", note = \"utf8\" }}",
        csv_dir.display().to_string()
    );
    let stdout = run(csv_source, &from_csv);
    assert!(stdout.contains("rows in 200,000"), "{stdout}");
    assert_eq!(read_counts(&from_csv), expected);
}

/// `taskmanager.memory.pre-allocate = true` touches all memory at start-up
/// and runs the same job to the same result.
#[test]
fn pre_allocated_memory_runs_the_job() {
    let (code, stdout, stderr) = output(strata().args([
        "run",
        "examples/project_and_print.toml",
        "--no-progress",
        "-D",
        "taskmanager.memory.process.size=1g",
        "-D",
        "taskmanager.memory.pre-allocate=true",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rows in 1,000,000"), "{stdout}");
}

#[test]
fn asking_for_rdma_without_a_device_is_a_clear_error() {
    let (code, _, stderr) = output(strata().args([
        "run",
        "examples/project_and_print.toml",
        "--no-progress",
        "-D",
        "taskmanager.network.transport=rdma",
        "-D",
        "taskmanager.memory.process.size=1g",
    ]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("taskmanager.network.transport = rdma, but no RDMA device"),
        "{stderr}"
    );
    assert!(stderr.contains("rdma-emulated"), "{stderr}");
}

/// A task that fails every time is restarted by the restart strategy until
/// it gives up; the job then fails with the last cause and the limit.
#[test]
fn a_failing_task_is_restarted_until_the_restart_strategy_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "key,value\n1,2\n3,not-a-number\n").unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"
[job]
name = "always-fails"
parallelism = 1

[[operator]]
name = "rows"
type = "csv_source"
path = "{}"
schema = {{ key = "int64", value = "int64" }}

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
"#,
            input.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let checkpoints = format!(
        "execution.checkpointing.dir={}",
        dir.path().join("chk").display()
    );
    let (code, stdout, stderr) = output(strata().arg("run").arg(&job).args([
        "--no-progress",
        "-D",
        "taskmanager.memory.process.size=1g",
        "-D",
        "execution.checkpointing.interval=100ms",
        "-D",
        &checkpoints,
        "-D",
        "restart-strategy.type=fixed-delay",
        "-D",
        "restart-strategy.fixed-delay.attempts=2",
        "-D",
        "restart-strategy.fixed-delay.delay=50ms",
    ]));
    assert_ne!(code, 0, "{stdout}");
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("FAILED"), "{all}");
    assert!(all.contains("in.csv"), "the cause names the file: {all}");
    assert!(
        all.contains("gave up after 2"),
        "names the strategy's limit: {all}"
    );
    assert!(all.contains("restarts 2"), "{all}");
}

/// A feature pipeline's operators (issue 17): `fill_null`, a seeded
/// `sample`, `cast`, a seeded `shuffle` and `batch`, whose rows are the same on every run with the same seed and
/// parallelism; and their bad inputs, refused before the job starts with
/// the file, line and what was expected.
#[test]
fn feature_operators_run_reproducibly_and_reject_bad_input_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let job = |tail: &str, out: &str| {
        format!(
            "[job]\nname = \"features\"\nparallelism = 3\n\n[[operator]]\nname = \"events\"\ntype = \"datagen\"\nrows = 30000\nkeys = 50\nseed = 4\ncolumns = [\"key\", \"value\"]\n\n{tail}\n[[operator]]\nname = \"out\"\ntype = \"csv_sink\"\npath = \"{out}\"\nmode = \"overwrite\"\n"
        )
    };
    let good = "[[operator]]\nname = \"filled\"\ntype = \"fill_null\"\ncolumns = [\"value\"]\nvalue = 0\n\n[[operator]]\nname = \"some\"\ntype = \"sample\"\nfraction = 0.25\nseed = 9\n\n[[operator]]\nname = \"as-float\"\ntype = \"cast\"\ncolumns = { value = \"float64\" }\n\n[[operator]]\nname = \"mixed\"\ntype = \"shuffle\"\nbuffer_rows = 700\nseed = 3\n\n[[operator]]\nname = \"chunks\"\ntype = \"batch\"\nrows = 1000\n";
    let mut outputs = Vec::new();
    for run in 0..2 {
        let out = dir.path().join(format!("out-{run}"));
        let path = dir.path().join(format!("good-{run}.toml"));
        std::fs::write(&path, job(good, &out.display().to_string())).unwrap();
        let (code, stdout, stderr) =
            output(
                strata()
                    .arg("run")
                    .arg(&path)
                    .args(["--no-progress", "-D", "rest.port=0"]),
            );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("FINISHED"), "{stdout}");
        // Each subtask's part file, in its order: the shuffle's order is
        // the same on every run too (datagen's batches are deterministic).
        let mut parts: Vec<(String, Vec<String>)> = std::fs::read_dir(&out)
            .unwrap()
            .map(|f| {
                let path = f.unwrap().path();
                let lines = std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .skip(1)
                    .map(str::to_owned)
                    .collect::<Vec<_>>();
                (
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    lines,
                )
            })
            .collect();
        parts.sort();
        outputs.push(parts);
    }
    assert_eq!(
        outputs[0], outputs[1],
        "the same seeds give the same rows in the same order"
    );
    let kept = outputs[0].iter().map(|(_, l)| l.len()).sum::<usize>() as f64 / 30_000.0;
    assert!((kept - 0.25).abs() < 0.02, "kept {kept}");
    for (tail, line, expected) in [
        (
            "[[operator]]\ntype = \"sample\"\nfraction = 0\n",
            "bad.toml:15",
            "greater than 0 and at most 1",
        ),
        (
            "[[operator]]\ntype = \"sample\"\nfraction = 1.5\n",
            "bad.toml:15",
            "greater than 0 and at most 1",
        ),
        (
            "[[operator]]\ntype = \"cast\"\ncolumns = { value = \"decimal\" }\n",
            "bad.toml:15",
            "one of int64, float64, utf8, boolean",
        ),
        (
            "[[operator]]\ntype = \"shuffle\"\nbuffer_rows = -5\n",
            "bad.toml:15",
            "between 1 and",
        ),
        (
            "[[operator]]\ntype = \"batch\"\nrows = 0\n",
            "bad.toml:15",
            "between 1 and",
        ),
        (
            "[[operator]]\ntype = \"fill_null\"\ncolumns = [\"vlaue\"]\nvalue = 0\n",
            "bad.toml",
            "vlaue",
        ),
        (
            "[[operator]]\ntype = \"fill_null\"\ncolumns = [\"value\"]\nvalue = \"none\"\n",
            "bad.toml",
            "Int64",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, job(tail, "/nonexistent/out")).unwrap();
        let (code, _, stderr) = output(strata().arg("run").arg(&path));
        assert_ne!(code, 0, "{tail}");
        assert!(
            stderr.contains(line) && stderr.contains(expected),
            "{tail}: {stderr}"
        );
    }
}

#[test]
fn split_standardize_and_flight_sink_reject_bad_input_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let head = "[job]\nname = \"ml\"\nparallelism = 2\n\n[[operator]]\nname = \"events\"\ntype = \"datagen\"\nrows = 1000\n\n";
    let split = "[[operator]]\nname = \"s\"\ntype = \"split\"\ncolumns = [\"key\"]\noutputs = { train = 0.8, validation = 0.2 }\n\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "[[operator]]\nname = \"s\"\ntype = \"split\"\ncolumns = [\"key\"]\noutputs = { train = 0.8, validation = 0.3 }\n".into(),
            "bad.toml:14",
            "fractions that sum to 1",
        ),
        (
            "[[operator]]\nname = \"s\"\ntype = \"split\"\ncolumns = [\"key\"]\noutputs = { train = 1 }\n".into(),
            "bad.toml:14",
            "at least two outputs",
        ),
        (
            "[[operator]]\nname = \"s\"\ntype = \"split\"\ncolumns = [\"kee\"]\noutputs = { a = 0.5, b = 0.5 }\n[[operator]]\ntype = \"blackhole\"\ninput = \"s.a\"\n".into(),
            "bad.toml:13",
            "'kee' not found",
        ),
        (
            format!("{split}[[operator]]\ntype = \"blackhole\"\ninput = \"s\"\n"),
            "bad.toml:18",
            "name one of s.train, s.validation",
        ),
        (
            format!("{split}[[operator]]\ntype = \"blackhole\"\n"),
            "bad.toml",
            "name one of s.train, s.validation",
        ),
        (
            "[[operator]]\ntype = \"project\"\ncolumns = [\"key\", \"'x' as name\"]\n[[operator]]\ntype = \"standardize\"\ncolumns = [\"name\"]\nstats = \"s.json\"\n[[operator]]\ntype = \"blackhole\"\n".into(),
            "bad.toml:15",
            "takes numeric columns",
        ),
        (
            "[[operator]]\ntype = \"standardize\"\ncolumns = [\"valeu\"]\nstats = \"s.json\"\n[[operator]]\ntype = \"blackhole\"\n".into(),
            "bad.toml:12",
            "'valeu' not found",
        ),
        (
            "[[operator]]\ntype = \"standardize\"\ncolumns = [\"value\"]\nstats = \"/nonexistent/s.json\"\nfit = \"none\"\n[[operator]]\ntype = \"blackhole\"\n".into(),
            "bad.toml:13",
            "/nonexistent/s.json",
        ),
        (
            "[[operator]]\ntype = \"standardize\"\ncolumns = [\"value\"]\nstats = \"s.json\"\nfit = \"nope\"\n[[operator]]\ntype = \"blackhole\"\n".into(),
            "bad.toml:14",
            "the name of an earlier operator",
        ),
        (
            "[[operator]]\ntype = \"flight_sink\"\nqueue_bytes = \"0\"\n".into(),
            "bad.toml:12",
            "queue_bytes",
        ),
        (
            "[[operator]]\ntype = \"flight_sink\"\nreader_timeout = \"soon\"\n".into(),
            "bad.toml:12",
            "reader_timeout",
        ),
    ];
    for (tail, line, expected) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{head}{tail}")).unwrap();
        let (code, _, stderr) = output(strata().arg("run").arg(&path));
        assert_ne!(code, 0, "{tail}");
        assert!(
            stderr.contains(line) && stderr.contains(expected),
            "{tail}: {stderr}"
        );
    }
}

#[test]
fn a_split_sends_each_key_to_one_side_with_the_stated_fractions_on_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut sides = Vec::new();
    for (run, parallelism) in [(0, 1), (1, 3)] {
        let out = |side: &str| dir.path().join(format!("{run}-{side}"));
        let text = format!(
            "[job]\nname = \"split\"\nparallelism = {parallelism}\n\n[[operator]]\nname = \"events\"\ntype = \"datagen\"\nrows = 50000\nkeys = 5000\nseed = 3\ncolumns = [\"key\", \"value\"]\n\n[[operator]]\nname = \"s\"\ntype = \"split\"\ncolumns = [\"key\"]\noutputs = {{ train = 0.7, test = 0.3 }}\nseed = 11\n\n[[operator]]\ntype = \"csv_sink\"\ninput = \"s.train\"\npath = \"{}\"\n\n[[operator]]\ntype = \"csv_sink\"\ninput = \"s.test\"\npath = \"{}\"\n",
            out("train").display(),
            out("test").display()
        );
        let path = dir.path().join(format!("split-{run}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) =
            output(
                strata()
                    .arg("run")
                    .arg(&path)
                    .args(["--no-progress", "-D", "rest.port=0"]),
            );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("FINISHED"), "{stdout}");
        let keys = |side: &str| -> std::collections::BTreeSet<(String, usize)> {
            let mut rows = Vec::new();
            for f in std::fs::read_dir(out(side)).unwrap() {
                let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
                rows.extend(text.lines().skip(1).map(str::to_owned));
            }
            let mut counted = std::collections::BTreeMap::new();
            for row in rows {
                *counted.entry(row).or_insert(0usize) += 1;
            }
            counted.into_iter().collect()
        };
        sides.push((keys("train"), keys("test")));
    }
    // The same rows on each side at parallelism 1 and 3.
    assert_eq!(sides[0], sides[1]);
    let (train, test) = &sides[0];
    let count =
        |s: &std::collections::BTreeSet<(String, usize)>| s.iter().map(|(_, n)| n).sum::<usize>();
    assert_eq!(
        count(train) + count(test),
        50_000,
        "every row on exactly one side"
    );
    let fraction = count(train) as f64 / 50_000.0;
    assert!((fraction - 0.7).abs() < 0.03, "train fraction {fraction}");
    // A key's rows are all on one side.
    let key_of = |row: &str| row.split(',').next().unwrap().to_owned();
    let train_keys: std::collections::BTreeSet<String> =
        train.iter().map(|(r, _)| key_of(r)).collect();
    assert!(test.iter().all(|(r, _)| !train_keys.contains(&key_of(r))));
}

/// The line of the first `marker` in `text` (1-based).
fn line_of(text: &str, marker: &str) -> usize {
    let offset = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in {text}"));
    text[..offset].matches('\n').count() + 1
}

/// A training-data pipeline of issue 17: datagen → `join` with a small CSV
/// dimension table → `bucketize` (appended, and in place) → `one_hot`
/// (dropping its source column) → csv_sink, checked row by row against
/// values computed here from the generator's definition.
#[test]
fn join_bucketize_and_one_hot_enrich_a_stream_as_computed_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("segments.csv");
    // Keys 0..40 but the multiples of 7 (an inner join drops those rows,
    // and those of keys 40..50); segment "z" is no category (all zeros).
    let segment = |key: i64| ["a", "b", "c", "z"][(key % 4) as usize];
    let weight = |key: i64| key as f64 * 1.5;
    let mut text = String::from("key,segment,weight\n");
    for key in (0..40).filter(|k| k % 7 != 0) {
        text.push_str(&format!("{key},{},{:?}\n", segment(key), weight(key)));
    }
    std::fs::write(&table, text).unwrap();
    let out = dir.path().join("out");
    let job = format!(
        "[job]\nname = \"enrich\"\nparallelism = 2\n\n\
         [[operator]]\ntype = \"datagen\"\nrows = 5000\nkeys = 50\nseed = 11\n\
         columns = [\"key\", \"value\", \"price\"]\n\n\
         [[operator]]\ntype = \"join\"\ntable = \"{}\"\non = [\"key\"]\n\n\
         [[operator]]\ntype = \"bucketize\"\ncolumn = \"value\"\nboundaries = [100, 500, 900]\n\n\
         [[operator]]\ntype = \"bucketize\"\ncolumn = \"weight\"\nboundaries = [10, 30.5]\n\
         output = \"weight\"\n\n\
         [[operator]]\ntype = \"one_hot\"\ncolumn = \"segment\"\ncategories = [\"a\", \"b\", \"c\"]\n\
         drop = true\n\n\
         [[operator]]\ntype = \"csv_sink\"\npath = \"{}\"\n",
        table.display(),
        out.display()
    );
    let path = dir.path().join("enrich.toml");
    std::fs::write(&path, job).unwrap();
    let (code, stdout, stderr) =
        output(
            strata()
                .arg("run")
                .arg(&path)
                .args(["--no-progress", "-D", "rest.port=0"]),
        );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("FINISHED"), "{stdout}");
    let header = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .find_map(|text| text.lines().next().map(str::to_owned))
        .unwrap();
    assert_eq!(
        header,
        "key,value,price,weight,value_bucket,segment_a,segment_b,segment_c"
    );
    // Every column but the price, whose text is the CSV writer's.
    let mut found: Vec<String> = common::read_csv_parts(&out)
        .into_iter()
        .map(|row| [&row[..2], &row[3..]].concat().join(","))
        .collect();
    found.sort();
    let spec = strata::job::DatagenSpec::new(5000, 50, 11);
    let mut expected: Vec<String> = (0..5000)
        .map(|i| strata::exec::source::datagen_row(&spec, i))
        .filter(|r| r.key % 7 != 0 && r.key < 40)
        .map(|r| {
            let value_bucket = [100, 500, 900].iter().filter(|&&b| b <= r.value).count();
            let weight_bucket = [10.0, 30.5].iter().filter(|&&b| b <= weight(r.key)).count();
            let hot = |c: &str| i32::from(segment(r.key) == c);
            format!(
                "{},{},{weight_bucket},{value_bucket},{},{},{}",
                r.key,
                r.value,
                hot("a"),
                hot("b"),
                hot("c")
            )
        })
        .collect();
    expected.sort();
    assert!(expected.len() > 3000, "most rows match: {}", expected.len());
    assert_eq!(found, expected);
}

/// Bad `bucketize`, `one_hot` and `join` operators are refused before the
/// job starts, naming the file, the line of the key and what is wrong; an
/// unknown category with `unknown = "error"` fails the running job naming
/// the value and the column.
#[test]
fn feature_encodings_and_join_reject_bad_input_naming_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("dim.csv");
    std::fs::write(&table, "key,segment,value\n1,a,5\n2,b,6\n").unwrap();
    let table = table.display().to_string();
    let job = |tail: &str| {
        format!(
            "[job]\nname = \"bad\"\n\n[[operator]]\ntype = \"datagen\"\nrows = 100\nkeys = 5\n\
             columns = [\"key\", \"value\", \"price\"]\n\n{tail}\n\
             [[operator]]\ntype = \"blackhole\"\n"
        )
    };
    let join = |tail: &str| {
        format!("[[operator]]\ntype = \"join\"\ntable = \"{table}\"\non = [\"key\"]\n{tail}")
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "[[operator]]\ntype = \"bucketize\"\ncolumn = \"value\"\nboundaries = [5, 1]\n".into(),
            "boundaries",
            "greater than the one before it (5)",
        ),
        (
            "[[operator]]\ntype = \"bucketize\"\ncolumn = \"valeu\"\nboundaries = [1]\n".into(),
            "column = \"valeu\"",
            "'valeu' not found",
        ),
        (
            "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = []\n".into(),
            "categories",
            "at least one category",
        ),
        (
            "[[operator]]\ntype = \"one_hot\"\ncolumn = \"price\"\ncategories = [1]\n".into(),
            "column = \"price\"",
            "must be Utf8 or Int64, found Float64",
        ),
        (
            "[[operator]]\ntype = \"join\"\ntable = \"/nonexistent/dim.csv\"\non = [\"key\"]\n"
                .into(),
            "table",
            "/nonexistent/dim.csv",
        ),
        (
            join("table_on = [\"segment\"]\n"),
            "table_on",
            "key types must match",
        ),
        (join("how = \"outer\"\n"), "how", "\"inner\""),
        (join(""), "table = ", "set `prefix`"),
    ];
    for (tail, marker, expected) in cases {
        let text = job(&tail);
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let (code, stdout, stderr) = output(strata().arg("run").arg(&path));
        assert_ne!(code, 0, "{tail}");
        let at = format!("bad.toml:{}", line_of(&text, marker));
        assert!(
            stderr.contains(&at) && stderr.contains(expected),
            "{tail}: expected {at} and {expected:?} in {stderr}"
        );
        assert!(
            stdout.trim().is_empty(),
            "refused before starting: {stdout}"
        );
    }
    // A prefix resolves the clash; an unknown category fails the run.
    let tail = join("prefix = \"dim_\"\n")
        + "\n[[operator]]\ntype = \"one_hot\"\ncolumn = \"dim_segment\"\ncategories = [\"a\"]\n\
           unknown = \"error\"\n";
    let path = dir.path().join("unknown.toml");
    std::fs::write(&path, job(&tail)).unwrap();
    let (code, stdout, stderr) = output(strata().arg("run").arg(&path).args([
        "--no-progress",
        "-D",
        "rest.port=0",
        "-D",
        "restart-strategy.type=none",
    ]));
    assert_ne!(code, 0, "{stdout}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("value 'b' of column 'dim_segment'"),
        "names the value and the column: {all}"
    );
}
