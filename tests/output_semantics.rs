//! What jobs leave in their output directories, and what their errors say:
//! sink modes, no leftovers from failed runs, Parquet page checksums, and
//! errors that do not echo the contents of users' files.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use common::SMALL_MEMORY;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::ParquetMetaDataReader;
use strata::cluster::client::submit_job;
use strata::config::Config;
use strata::exec::ExecError;
use strata::exec::operators::{Operator, Output};
use strata::exec::sink::ParquetSink;
use strata::exec::source::{ParquetSource, Source};
use strata::job::ParquetSourceSpec;
use strata::minicluster::MiniCluster;
use strata::protocol::JobState;

fn config(slots: u32) -> Config {
    let mut overrides: Vec<String> = SMALL_MEMORY.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("taskmanager.numberOfTaskSlots={slots}"));
    Config::from_overrides(&overrides).expect("test config")
}

fn datagen_to_csv(out: &Path, parallelism: u32, mode: Option<&str>) -> String {
    let mode = mode.map_or(String::new(), |m| format!("mode = \"{m}\""));
    format!(
        r#"
[job]
name = "modes"
parallelism = {parallelism}

[[operator]]
name = "rows"
type = "datagen"
rows = 10000

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
{mode}
"#,
        out.display()
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_at_lower_parallelism_leaves_only_the_new_parts_and_the_default_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cluster = MiniCluster::start(config(4), 1).await.unwrap();
    let address = cluster.address().to_string();
    for (parallelism, expected) in [
        (
            4,
            vec!["part-0.csv", "part-1.csv", "part-2.csv", "part-3.csv"],
        ),
        (2, vec!["part-0.csv", "part-1.csv"]),
    ] {
        let job = datagen_to_csv(&out, parallelism, Some("overwrite"));
        let summary = submit_job(&address, job, "modes.toml".into(), false)
            .await
            .unwrap();
        assert_eq!(summary.state, JobState::Finished, "{:?}", summary.reason);
        assert_eq!(names(&out), expected, "p={parallelism}");
    }
    let job = datagen_to_csv(&out, 2, None);
    let error = submit_job(&address, job, "modes.toml".into(), false)
        .await
        .expect_err("the default mode refuses a non-empty directory");
    let message = error.to_string();
    assert!(message.contains(&out.display().to_string()), "{message}");
    assert!(message.contains("operator 'out'"), "{message}");
    assert!(message.contains("key 'path'"), "{message}");
    assert!(message.contains("modes.toml:"), "{message}");
    assert_eq!(names(&out), ["part-0.csv", "part-1.csv"], "nothing touched");

    // Overwrite never removes what the sink did not write.
    std::fs::write(out.join("README.txt"), "mine").unwrap();
    let job = datagen_to_csv(&out, 2, Some("overwrite"));
    let error = submit_job(&address, job, "modes.toml".into(), false)
        .await
        .expect_err("a foreign file is refused");
    assert!(error.to_string().contains("README.txt"), "{error}");
    assert_eq!(names(&out), ["README.txt", "part-0.csv", "part-1.csv"]);
}

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

/// Subtask 0 reads a good file and finishes; subtask 1 fails on a bad row
/// after it has written rows, on every attempt.
#[test]
fn a_failed_run_leaves_no_in_progress_parts_and_no_spill_directories() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let good: String = (0..5000).map(|i| format!("{i},{i}\n")).collect();
    std::fs::write(input.join("a.csv"), format!("key,value\n{good}")).unwrap();
    std::fs::write(
        input.join("b.csv"),
        format!("key,value\n{good}1,not-a-number\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let tmp = dir.path().join("tmp");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"
[job]
name = "fails"
parallelism = 2

[[operator]]
name = "rows"
type = "csv_source"
path = "{}"
schema = {{ key = "int64", value = "int64" }}
batch_size = 100

[[operator]]
name = "out"
type = "csv_sink"
path = "{}"
"#,
            input.display(),
            out.display()
        ),
    )
    .unwrap();
    let tmp_dirs = format!("io.tmp.dirs={}", tmp.display());
    let output = strata()
        .arg("run")
        .arg(&job)
        .args([
            "--no-progress",
            "-D",
            "taskmanager.memory.process.size=1g",
            "-D",
            &tmp_dirs,
            "-D",
            "restart-strategy.type=fixed-delay",
            "-D",
            "restart-strategy.fixed-delay.attempts=1",
            "-D",
            "restart-strategy.fixed-delay.delay=10ms",
        ])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{all}");
    assert!(all.contains("b.csv"), "the cause names the file: {all}");
    let hidden: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "in-progress parts left: {hidden:?}");
    let spill_dirs: Vec<String> = names(&tmp)
        .into_iter()
        .filter(|n| n.starts_with("strata-io-"))
        .collect();
    assert!(
        spill_dirs.is_empty(),
        "spill directories left: {spill_dirs:?}"
    );
}

struct NoOutput;

impl Output for NoOutput {
    fn emit(&mut self, _batch: RecordBatch) -> Result<(), ExecError> {
        Ok(())
    }
    fn watermark(&mut self, _watermark: i64) -> Result<(), ExecError> {
        Ok(())
    }
}

fn rows(count: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("price", DataType::Float64, false),
    ]));
    // Distinct, irregular prices: plain-encoded pages of several KiB.
    let prices = (0..count).map(|i| (i as f64 * 0.618_033_988_7).fract() * 1000.0);
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..count)),
            Arc::new(Float64Array::from_iter_values(prices)),
        ],
    )
    .unwrap()
}

fn read_all(path: &Path) -> Result<Vec<RecordBatch>, ExecError> {
    let spec = ParquetSourceSpec {
        path: path.to_owned(),
        schema: Arc::new(Schema::empty()),
        batch_size: 1024,
        watermark: None,
        columns: None,
        prune: None,
    };
    let mut source = ParquetSource::new(spec, 0, 1)?;
    let mut batches = Vec::new();
    while let Some(batch) = source.next_batch()? {
        batches.push(batch);
    }
    Ok(batches)
}

/// The largest column chunk of row group 0: (column index, path, range).
fn largest_chunk(path: &Path) -> (usize, String, u64, u64) {
    let file = File::open(path).unwrap();
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .unwrap();
    let (index, column) = metadata
        .row_group(0)
        .columns()
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| c.byte_range().1)
        .unwrap();
    let (start, length) = column.byte_range();
    (index, column.column_path().string(), start, length)
}

fn flip(path: &Path, at: u64, count: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = at as usize;
    for b in &mut bytes[at..at + count] {
        *b ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_parquet_page_is_an_error_naming_file_row_group_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let batch = rows(200_000);
    let mut sink = ParquetSink::new(&out, 0, batch.schema()).unwrap();
    sink.process(batch.clone(), &mut NoOutput).unwrap();
    sink.finish(&mut NoOutput).unwrap();
    let part = out.join("part-0.parquet");
    assert_eq!(read_all(&part).unwrap(), read_all(&part).unwrap());
    let total: usize = read_all(&part).unwrap().iter().map(|b| b.num_rows()).sum();
    assert_eq!(total, 200_000, "the checksummed file reads back whole");

    let (column_index, column, start, length) = largest_chunk(&part);
    assert!(length > 64 * 1024, "a chunk of several pages: {length}");
    // 4 KiB in the middle of the chunk: inside a data page's values.
    flip(&part, start + length / 2 - 2048, 4096);
    let error = read_all(&part).expect_err("a corrupt page is an error");
    let message = error.to_string();
    match &error {
        ExecError::CorruptPage {
            path,
            row_group,
            column_index: index,
            column: name,
            ..
        } => {
            assert_eq!(path, &part);
            assert_eq!((*row_group, *index), (0, column_index));
            assert_eq!(name, &column);
        }
        other => panic!("expected CorruptPage, got {other:?}"),
    }
    assert!(message.contains(&part.display().to_string()), "{message}");
    assert!(message.contains("row group 0"), "{message}");
    assert!(message.contains(&format!("'{column}'")), "{message}");
    assert!(message.contains("CRC"), "a checksum mismatch: {message}");
}

#[test]
fn a_parquet_file_without_checksums_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.parquet");
    let batch = rows(50_000);
    let mut writer =
        ArrowWriter::try_new(File::create(&path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let read = read_all(&path).unwrap();
    let total: usize = read.iter().map(|b| b.num_rows()).sum();
    assert_eq!(total, 50_000);
    assert_eq!(
        read[0].column(0).as_ref(),
        batch.column(0).slice(0, 1024).as_ref()
    );
}

fn job_over_csv(dir: &Path, schema_line: &str, operator: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("people.csv");
    std::fs::write(&data, "secret_salary,employee_ssn\n1,2\n3,4\n").unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"
[job]
name = "peek"

[[operator]]
name = "people"
type = "csv_source"
path = "{}"
{schema_line}

{operator}

[[operator]]
type = "blackhole"
"#,
            data.display()
        ),
    )
    .unwrap();
    (job, data)
}

#[test]
fn an_unknown_column_error_does_not_list_the_files_header() {
    let key_by = "[[operator]]\nname = \"by\"\ntype = \"key_by\"\nkeys = [\"nope\"]";
    let filter = "[[operator]]\nname = \"f\"\ntype = \"filter\"\npredicate = \"nope > 1\"";
    let sort = "[[operator]]\nname = \"s\"\ntype = \"sort\"\nkeys = [\"nope\"]";
    for (operator, key) in [(key_by, "keys"), (filter, "predicate"), (sort, "keys")] {
        let dir = tempfile::tempdir().unwrap();
        let (job, data) = job_over_csv(dir.path(), "", operator);
        let message = strata::job::load_job(&job)
            .expect_err("unknown column")
            .to_string();
        assert!(!message.contains("secret_salary"), "{message}");
        assert!(!message.contains("employee_ssn"), "{message}");
        assert!(message.contains("'nope'"), "{message}");
        assert!(message.contains(&format!("key '{key}'")), "{message}");
        assert!(message.contains(&data.display().to_string()), "{message}");
    }
}

#[test]
fn an_unknown_column_error_still_lists_the_columns_the_job_declares() {
    let dir = tempfile::tempdir().unwrap();
    let key_by = "[[operator]]\nname = \"by\"\ntype = \"key_by\"\nkeys = [\"nope\"]";
    let schema = "schema = { declared_a = \"int64\", declared_b = \"int64\" }";
    let (job, _) = job_over_csv(dir.path(), schema, key_by);
    let message = strata::job::load_job(&job)
        .expect_err("unknown column")
        .to_string();
    assert!(message.contains("declared_a, declared_b"), "{message}");
}
