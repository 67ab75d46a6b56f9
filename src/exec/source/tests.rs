//! Replay of the file sources from a checkpointed offset.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use arrow_select::concat::concat_batches;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use super::{CsvSource, ParquetSource, Source};
use crate::exec::ExecError;
use crate::job::{CsvSourceSpec, ParquetSourceSpec};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
    ]))
}

/// Rows `first..first + row_count` of the test schema.
fn rows(first: i64, row_count: i64) -> RecordBatch {
    let ids: Vec<i64> = (first..first + row_count).collect();
    let names: Vec<String> = ids.iter().map(|i| format!("n{i}")).collect();
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(names)),
        ],
    )
    .expect("batch")
}

fn write_csv(path: &Path, first: i64, row_count: i64) {
    write_csv_text(path, first, row_count, "id,name\n");
}

fn write_csv_text(path: &Path, first: i64, row_count: i64, header: &str) {
    let mut text = String::from(header);
    for i in first..first + row_count {
        text.push_str(&format!("{i},n{i}\n"));
    }
    std::fs::write(path, text).expect("write csv");
}

fn write_parquet(path: &Path, first: i64, row_count: i64, row_group_rows: usize) {
    let file = std::fs::File::create(path).expect("create parquet");
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group_rows))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema(), Some(props)).expect("writer");
    writer.write(&rows(first, row_count)).expect("write");
    writer.close().expect("close");
}

fn csv_spec(dir: &Path, batch_size: usize) -> CsvSourceSpec {
    CsvSourceSpec {
        path: dir.to_owned(),
        has_header: true,
        schema: schema(),
        batch_size,
        watermark: None,
    }
}

fn parquet_spec(dir: &Path, batch_size: usize) -> ParquetSourceSpec {
    ParquetSourceSpec {
        path: dir.to_owned(),
        schema: schema(),
        batch_size,
        watermark: None,
    }
}

fn read_batches(source: &mut dyn Source, limit: Option<usize>) -> Vec<RecordBatch> {
    let mut batches = Vec::new();
    while limit.is_none_or(|l| batches.len() < l) {
        match source.next_batch().expect("next batch") {
            Some(b) => batches.push(b),
            None => break,
        }
    }
    batches
}

fn concat(batches: &[RecordBatch]) -> RecordBatch {
    concat_batches(&schema(), batches).expect("concat")
}

/// For every cut point k: read k batches, snapshot, restore a fresh source,
/// read the rest; the concatenation must equal one uninterrupted read.
fn assert_replay_at_every_batch(make: &dyn Fn() -> Box<dyn Source>) {
    let everything = read_batches(make().as_mut(), None);
    assert!(everything.len() > 3, "the test data spans several batches");
    for k in 0..=everything.len() {
        let mut first = make();
        let mut seen = read_batches(first.as_mut(), Some(k));
        let offset = first.snapshot_offset().expect("snapshot");
        drop(first);
        let mut second = make();
        second.restore_offset(&offset).expect("restore");
        seen.extend(read_batches(second.as_mut(), None));
        assert_eq!(concat(&seen), concat(&everything), "cut after {k} batches");
    }
}

#[test]
fn csv_restore_continues_exactly_after_the_snapshot_at_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv(&dir.path().join("a.csv"), 0, 7);
    write_csv(&dir.path().join("b.csv"), 100, 8);
    write_csv(&dir.path().join("c.csv"), 200, 11);
    write_csv(&dir.path().join("d.csv"), 300, 3);
    for (subtask, parallelism) in [(0, 1), (0, 2), (1, 2)] {
        assert_replay_at_every_batch(&|| {
            Box::new(CsvSource::new(csv_spec(dir.path(), 3), subtask, parallelism).expect("csv"))
        });
    }
}

#[test]
fn csv_without_header_restores_at_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv_text(&dir.path().join("a.csv"), 0, 8, "");
    write_csv_text(&dir.path().join("b.csv"), 100, 4, "");
    assert_replay_at_every_batch(&|| {
        let spec = CsvSourceSpec {
            has_header: false,
            ..csv_spec(dir.path(), 3)
        };
        Box::new(CsvSource::new(spec, 0, 1).expect("csv"))
    });
}

#[test]
fn parquet_restore_continues_exactly_after_the_snapshot_at_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_parquet(&dir.path().join("a.parquet"), 0, 10, 4);
    write_parquet(&dir.path().join("b.parquet"), 100, 7, 4);
    write_parquet(&dir.path().join("c.parquet"), 200, 9, 5);
    for (subtask, parallelism) in [(0, 1), (0, 2), (1, 2)] {
        assert_replay_at_every_batch(&|| {
            let spec = parquet_spec(dir.path(), 3);
            Box::new(ParquetSource::new(spec, subtask, parallelism).expect("parquet"))
        });
    }
}

#[test]
fn source_restored_at_its_end_produces_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv(&dir.path().join("a.csv"), 0, 4);
    let mut first = CsvSource::new(csv_spec(dir.path(), 3), 0, 1).expect("csv");
    read_batches(&mut first, None);
    let offset = first.snapshot_offset().expect("snapshot");
    let mut second = CsvSource::new(csv_spec(dir.path(), 3), 0, 1).expect("csv");
    second.restore_offset(&offset).expect("restore");
    assert!(second.next_batch().expect("next").is_none());
}

fn restore_error(source: &mut dyn Source, offset: &[u8]) -> String {
    match source.restore_offset(offset) {
        Err(e @ ExecError::State { .. }) => e.to_string(),
        other => panic!("expected a state error, got {other:?}"),
    }
}

#[test]
fn csv_restore_against_changed_files_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv(&dir.path().join("a.csv"), 0, 7);
    write_csv(&dir.path().join("b.csv"), 100, 5);
    let mut first = CsvSource::new(csv_spec(dir.path(), 3), 0, 1).expect("csv");
    read_batches(&mut first, Some(4));
    let offset = first.snapshot_offset().expect("snapshot");

    std::fs::rename(dir.path().join("b.csv"), dir.path().join("c.csv")).expect("rename");
    let mut renamed = CsvSource::new(csv_spec(dir.path(), 3), 0, 1).expect("csv");
    let message = restore_error(&mut renamed, &offset);
    assert!(
        message.contains("'b.csv'") && message.contains("'c.csv'"),
        "{message}"
    );

    std::fs::rename(dir.path().join("c.csv"), dir.path().join("b.csv")).expect("rename");
    write_csv(&dir.path().join("b.csv"), 100, 6);
    let mut rewritten = CsvSource::new(csv_spec(dir.path(), 3), 0, 1).expect("csv");
    let message = restore_error(&mut rewritten, &offset);
    assert!(message.contains("'b.csv'"), "{message}");
}

#[test]
fn parquet_restore_against_a_missing_file_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_parquet(&dir.path().join("a.parquet"), 0, 10, 4);
    write_parquet(&dir.path().join("b.parquet"), 100, 7, 4);
    let mut first = ParquetSource::new(parquet_spec(dir.path(), 3), 0, 1).expect("parquet");
    read_batches(&mut first, Some(2));
    let offset = first.snapshot_offset().expect("snapshot");

    std::fs::remove_file(dir.path().join("b.parquet")).expect("remove");
    let mut second = ParquetSource::new(parquet_spec(dir.path(), 3), 0, 1).expect("parquet");
    let message = restore_error(&mut second, &offset);
    assert!(message.contains("'b.parquet'"), "{message}");
}

#[test]
fn restore_of_another_subtasks_offset_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv(&dir.path().join("a.csv"), 0, 7);
    write_csv(&dir.path().join("b.csv"), 100, 5);
    let offset = CsvSource::new(csv_spec(dir.path(), 3), 0, 2)
        .expect("csv")
        .snapshot_offset()
        .expect("snapshot");
    let mut other = CsvSource::new(csv_spec(dir.path(), 3), 1, 2).expect("csv");
    let message = restore_error(&mut other, &offset);
    assert!(message.contains("subtask 0/2"), "{message}");
    assert!(restore_error(&mut other, b"not json").contains("unreadable"));
}

/// Issue 14: a CSV parse error names the column, line and type, but not the
/// value or the row it read from the file.
#[test]
fn csv_parse_errors_do_not_quote_the_file() {
    let detail = "Parser error: Error while parsing value 'secret-42' as type 'Int64' \
                  for column 1 at line 2. Row data: '[3,secret-42]'";
    let redacted = super::redact_file_data(detail);
    assert!(!redacted.contains("secret"), "{redacted}");
    assert!(redacted.contains("column 1 at line 2"), "{redacted}");
    assert!(redacted.contains("'Int64'"), "{redacted}");
}
