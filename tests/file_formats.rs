//! File formats through the real CLI (issue 17): Arrow IPC written by
//! `arrow_ipc_sink` reads back through `arrow_ipc_source` to the rows that
//! went in, in both IPC formats and with checkpoints; `parquet_sink` keeps
//! to `row_group_rows` and rolls at `target_file_bytes`; and bad keys or
//! bad files are refused before the job starts, naming the line or file.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn strata() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("STRATA_LOG", "warn,strata=info");
    c
}

/// Runs `strata run` on `job` (written to `<dir>/<name>.toml`) with `extra`
/// configuration; returns the exit code, stdout and stderr.
fn run_job(dir: &Path, name: &str, job: &str, extra: &[String]) -> (i32, String, String) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, job).unwrap();
    let mut command = strata();
    command
        .arg("run")
        .arg(&path)
        .args(["--no-progress", "-D", "rest.port=0"]);
    for setting in common::SMALL_MEMORY
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
    {
        command.args(["-D", &setting]);
    }
    let out = command.output().expect("running strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A datagen row as the CSV sink writes it, parsed back.
type Row = (i64, i64, f64, i64);

/// The rows of a datagen source with the job file's defaults but for
/// `rows`, `keys` and `seed`, sorted.
fn datagen_rows(rows: u64, keys: u64, seed: u64) -> Vec<Row> {
    let spec = strata::job::DatagenSpec::new(rows, keys, seed);
    let mut all: Vec<Row> = (0..rows)
        .map(|i| {
            let r = strata::exec::source::datagen_row(&spec, i);
            (r.key, r.value, r.price, r.ts)
        })
        .collect();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    all
}

/// Every row of the CSV part files in `dir`, sorted.
fn csv_rows(dir: &Path) -> Vec<Row> {
    let mut rows: Vec<Row> = common::read_csv_parts(dir)
        .into_iter()
        .map(|r| {
            (
                r[0].parse().unwrap(),
                r[1].parse().unwrap(),
                r[2].parse().unwrap(),
                r[3].parse().unwrap(),
            )
        })
        .collect();
    rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rows
}

/// The files in `dir` with `extension`, sorted by name.
fn files_with(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

const ROWS: u64 = 20_000;

/// Checkpoints every 100 ms into `dir/chk`: file sinks write exactly-once.
fn checkpointing(dir: &Path) -> [String; 2] {
    [
        "execution.checkpointing.interval=100ms".to_owned(),
        format!("execution.checkpointing.dir={}", dir.join("chk").display()),
    ]
}

/// The number in the summary's `checkpoints <n> completed`; 0 without.
fn completed_checkpoints(stdout: &str) -> usize {
    stdout
        .split("checkpoints ")
        .skip(1)
        .find_map(|rest| rest.split_once(" completed")?.0.trim().parse().ok())
        .unwrap_or(0)
}

/// The job's datagen source. `throttled`: at 40,000 rows a second, so that
/// a job with checkpoints every 100 ms takes several before it ends.
fn datagen(parallelism: u32, throttled: bool) -> String {
    let rate = if throttled {
        "rows_per_second = 40_000\n"
    } else {
        ""
    };
    format!(
        "[[operator]]\nname = \"events\"\ntype = \"datagen\"\nrows = {ROWS}\nkeys = 50\nseed = 7\nbatch_size = 1000\nparallelism = {parallelism}\n{rate}"
    )
}

/// datagen → `arrow_ipc_sink` (both formats, with and without LZ4, rolling
/// or not, with and without checkpoints), then `arrow_ipc_source` →
/// `csv_sink`: the rows that come out are the rows that went in.
#[test]
fn arrow_ipc_written_by_the_sink_reads_back_to_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let expected = datagen_rows(ROWS, 50, 7);
    let checkpoints = checkpointing(dir.path());
    let cases: [(&str, &str, &str, bool); 4] = [
        ("file", "arrow", "compression = \"lz4\"", false),
        ("stream", "arrows", "", false),
        ("file", "arrow", "target_file_bytes = \"32kb\"", true),
        (
            "stream",
            "arrows",
            "compression = \"lz4\"\ntarget_file_bytes = 20000",
            true,
        ),
    ];
    for (case, (format, extension, keys, checkpointed)) in cases.into_iter().enumerate() {
        let ipc = dir.path().join(format!("ipc-{case}"));
        let csv = dir.path().join(format!("csv-{case}"));
        let extra = if checkpointed { &checkpoints[..] } else { &[] };
        let write = format!(
            "[job]\nname = \"write-ipc\"\nparallelism = 2\n\n{}\n[[operator]]\nname = \"out\"\ntype = \"arrow_ipc_sink\"\npath = {:?}\nformat = \"{format}\"\n{keys}\n",
            datagen(3, checkpointed),
            ipc.display().to_string()
        );
        let (code, stdout, stderr) = run_job(dir.path(), "write", &write, extra);
        assert_eq!(code, 0, "case {case}: {stderr}");
        assert!(stdout.contains("FINISHED"), "case {case}: {stdout}");
        if checkpointed {
            let completed = completed_checkpoints(&stdout);
            assert!(
                completed >= 3,
                "case {case}: {completed} checkpoints: {stdout}"
            );
        }
        let parts = files_with(&ipc, extension);
        let rolled = keys.contains("target_file_bytes");
        if rolled {
            assert!(parts.len() > 4, "case {case}: {parts:?}");
        } else if !checkpointed {
            assert_eq!(parts.len(), 2, "one part file per subtask: {parts:?}");
        }
        let read = format!(
            "[job]\nname = \"read-ipc\"\nparallelism = 3\n\n[[operator]]\nname = \"in\"\ntype = \"arrow_ipc_source\"\npath = {:?}\n\n[[operator]]\nname = \"out\"\ntype = \"csv_sink\"\npath = {:?}\n",
            ipc.display().to_string(),
            csv.display().to_string()
        );
        let (code, stdout, stderr) = run_job(dir.path(), "read", &read, extra);
        assert_eq!(code, 0, "case {case}: {stderr}");
        assert!(
            stdout.contains(&format!("rows in {}", "20,000")),
            "case {case}: {stdout}"
        );
        assert!(csv_rows(&csv) == expected, "case {case}: the rows differ");
    }
}

/// Row group sizes and part file sizes of one Parquet file.
fn row_groups(path: &Path) -> Vec<i64> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let metadata = reader.metadata();
    metadata
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows())
        .collect()
}

/// The datagen rows of the Parquet part files in `dir`, sorted.
fn parquet_rows(dir: &Path) -> Vec<Row> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};
    let mut rows = Vec::new();
    for path in files_with(dir, "parquet") {
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let int = |i: usize| batch.column(i).as_primitive::<Int64Type>().clone();
            let (key, value, ts) = (int(0), int(1), int(3));
            let price = batch.column(2).as_primitive::<Float64Type>().clone();
            for row in 0..batch.num_rows() {
                rows.push((
                    key.value(row),
                    value.value(row),
                    price.value(row),
                    ts.value(row),
                ));
            }
        }
    }
    rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rows
}

/// `row_group_rows` sizes every row group but a file's last exactly;
/// `target_file_bytes` rolls each subtask through several part files whose
/// rows together are the input, with and without checkpoints.
#[test]
fn parquet_sink_keeps_row_group_rows_and_rolls_at_target_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let groups = dir.path().join("groups");
    let job = format!(
        "[job]\nname = \"groups\"\nparallelism = 1\n\n{}\n[[operator]]\nname = \"out\"\ntype = \"parquet_sink\"\npath = {:?}\nrow_group_rows = 1_500\n",
        datagen(1, false),
        groups.display().to_string()
    );
    let (code, _, stderr) = run_job(dir.path(), "groups", &job, &[]);
    assert_eq!(code, 0, "{stderr}");
    let parts = files_with(&groups, "parquet");
    assert_eq!(parts.len(), 1, "{parts:?}");
    let mut expected_groups = vec![1500; 13];
    expected_groups.push(500);
    assert_eq!(row_groups(&parts[0]), expected_groups);
    assert!(parquet_rows(&groups) == datagen_rows(ROWS, 50, 7));

    let checkpoints = checkpointing(dir.path());
    for (case, extra) in [&[][..], &checkpoints[..]].into_iter().enumerate() {
        let rolled = dir.path().join(format!("rolled-{case}"));
        let job = format!(
            "[job]\nname = \"rolled\"\nparallelism = 2\n\n{}\n[[operator]]\nname = \"out\"\ntype = \"parquet_sink\"\npath = {:?}\nrow_group_rows = 700\ntarget_file_bytes = \"32kb\"\n",
            datagen(2, !extra.is_empty()),
            rolled.display().to_string()
        );
        let (code, stdout, stderr) = run_job(dir.path(), "rolled", &job, extra);
        assert_eq!(code, 0, "case {case}: {stderr}");
        if !extra.is_empty() {
            let completed = completed_checkpoints(&stdout);
            assert!(
                completed >= 3,
                "case {case}: {completed} checkpoints: {stdout}"
            );
        }
        let parts = files_with(&rolled, "parquet");
        for subtask in 0..2 {
            let own = parts
                .iter()
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with(&format!("part-{subtask}-"))
                })
                .count();
            assert!(own >= 3, "case {case}: subtask {subtask} rolls: {parts:?}");
        }
        for part in &parts {
            let groups = row_groups(part);
            let (last, full) = groups.split_last().unwrap();
            assert!(full.iter().all(|g| *g == 700), "{part:?}: {groups:?}");
            assert!(*last <= 700, "{part:?}: {groups:?}");
        }
        assert!(
            parquet_rows(&rolled) == datagen_rows(ROWS, 50, 7),
            "case {case}: the union of the part files is the input"
        );
    }
}

/// Bad keys and bad files are refused before the job starts, naming the
/// job file's line or the data file.
#[test]
fn bad_file_format_keys_and_files_are_refused_before_the_job_starts() {
    let dir = tempfile::tempdir().unwrap();
    let sink_job = |keys: &str| {
        format!(
            "[job]\nname = \"bad\"\n\n[[operator]]\ntype = \"datagen\"\nrows = 10\n\n[[operator]]\ntype = \"{keys}\npath = \"/nonexistent/out\"\n"
        )
    };
    for (keys, line, expected) in [
        (
            "parquet_sink\"\nrow_group_rows = 0",
            "bad.toml:10",
            "row_group_rows",
        ),
        (
            "parquet_sink\"\ntarget_file_bytes = \"12 parsecs\"",
            "bad.toml:10",
            "\"128mb\"",
        ),
        (
            "arrow_ipc_sink\"\ncompression = \"zstd\"",
            "bad.toml:10",
            "\"lz4\" or \"none\"",
        ),
        (
            "arrow_ipc_sink\"\nformat = \"parquet\"",
            "bad.toml:10",
            "\"file\"",
        ),
    ] {
        let (code, _, stderr) = run_job(dir.path(), "bad", &sink_job(keys), &[]);
        assert_ne!(code, 0, "{keys}");
        assert!(
            stderr.contains(line) && stderr.contains(expected),
            "{keys}: {stderr}"
        );
    }

    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.arrow"), "key,value\n1,2\n").unwrap();
    let source_job = format!(
        "[job]\nname = \"bad\"\n\n[[operator]]\ntype = \"arrow_ipc_source\"\npath = {:?}\n\n[[operator]]\ntype = \"blackhole\"\n",
        data.display().to_string()
    );
    let (code, _, stderr) = run_job(dir.path(), "bad", &source_job, &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("bad.toml:6") && stderr.contains("a.arrow: not an Arrow IPC file"),
        "{stderr}"
    );
}
