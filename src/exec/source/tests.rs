//! Replay of the file sources from a checkpointed offset, and how they split
//! their files over subtasks.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use arrow_select::concat::concat_batches;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use super::{ArrowIpcSource, CsvSource, ParquetSource, Source};
use crate::exec::ExecError;
use crate::job::{ArrowIpcSourceSpec, CsvSourceSpec, IpcFormat, ParquetSourceSpec};

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
        columns: None,
    }
}

fn parquet_spec(dir: &Path, batch_size: usize) -> ParquetSourceSpec {
    ParquetSourceSpec {
        path: dir.to_owned(),
        schema: schema(),
        batch_size,
        watermark: None,
        columns: None,
        prune: None,
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

/// The error of the first subtask of a `parallelism`-way CSV source over
/// `dir` (with `split_bytes` splits) that fails, read to the end.
fn csv_read_error(dir: &Path, parallelism: u32, split_bytes: u64, batch_size: usize) -> String {
    for subtask in 0..parallelism {
        let mut source = CsvSource::with_split_bytes(
            csv_spec(dir, batch_size),
            subtask,
            parallelism,
            Some(split_bytes),
        )
        .expect("csv");
        loop {
            match source.next_batch() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return e.to_string(),
            }
        }
    }
    panic!("no subtask failed")
}

/// A CSV error names the line of the file (1-based, the header included),
/// whichever split and batch it is in: a bad value and a short record on
/// the same line used to be reported one line apart, and a split's lines
/// were counted from the split's start.
#[test]
fn csv_errors_name_the_line_of_the_whole_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.csv");
    // Header on line 1, ids 0..40 on lines 2..=41; line 30 is broken.
    let broken = 30;
    for (bad, what) in [("x,n28", "column 'id'"), ("28", "expected 2 got 1")] {
        let mut text = String::from("id,name\n");
        for line in 2..=41 {
            if line == broken {
                text.push_str(bad);
            } else {
                text.push_str(&format!("{},n{}", line - 2, line - 2));
            }
            text.push('\n');
        }
        std::fs::write(&path, &text).expect("write");
        for (parallelism, split_bytes, batch_size) in
            [(1, 1 << 20, 1024), (1, 1 << 20, 4), (3, 64, 5), (2, 100, 1)]
        {
            let message = csv_read_error(dir.path(), parallelism, split_bytes, batch_size);
            assert!(
                message.contains(&format!("line {broken}")) && message.contains(what),
                "{bad:?} at p={parallelism} split={split_bytes} batch={batch_size}: {message}"
            );
            assert!(message.contains("a.csv"), "{message}");
        }
    }
}

/// Every id the subtasks of a `parallelism`-way CSV source read, sorted.
fn csv_ids_read(dir: &Path, parallelism: u32, split_bytes: u64, has_header: bool) -> Vec<i64> {
    let mut ids = Vec::new();
    for subtask in 0..parallelism {
        let spec = CsvSourceSpec {
            has_header,
            ..csv_spec(dir, 4)
        };
        let mut source = CsvSource::with_split_bytes(spec, subtask, parallelism, Some(split_bytes))
            .expect("csv");
        for batch in read_batches(&mut source, None) {
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
            ids.extend(column.expect("int64 ids").values().iter().copied());
        }
    }
    ids.sort_unstable();
    ids
}

#[test]
fn csv_byte_splits_read_every_line_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Lines of different lengths (ids 0..9 vs 1000..), a file without a
    // final line break, and a file with only a header.
    write_csv(&dir.path().join("a.csv"), 0, 40);
    write_csv(&dir.path().join("b.csv"), 1000, 25);
    std::fs::write(dir.path().join("c.csv"), "id,name\n5000,n5000").expect("write");
    std::fs::write(dir.path().join("d.csv"), "id,name\n").expect("write");
    let mut expected: Vec<i64> = (0..40).chain(1000..1025).chain([5000]).collect();
    expected.sort_unstable();
    for split_bytes in [1, 2, 5, 7, 13, 64, 1 << 20] {
        for parallelism in [1, 2, 3, 8] {
            assert_eq!(
                csv_ids_read(dir.path(), parallelism, split_bytes, true),
                expected,
                "splits of {split_bytes} bytes over {parallelism} subtasks"
            );
        }
    }
}

#[test]
fn csv_byte_splits_without_header_and_with_crlf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text: String = (0..30).map(|i| format!("{i},n{i}\r\n")).collect();
    std::fs::write(dir.path().join("a.csv"), text).expect("write");
    for split_bytes in [1, 3, 9, 100] {
        assert_eq!(
            csv_ids_read(dir.path(), 3, split_bytes, false),
            (0..30).collect::<Vec<i64>>()
        );
    }
}

#[test]
fn csv_byte_splits_restore_at_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv(&dir.path().join("a.csv"), 0, 30);
    write_csv(&dir.path().join("b.csv"), 100, 17);
    for (subtask, parallelism) in [(0, 1), (0, 2), (1, 2), (2, 3)] {
        assert_replay_at_every_batch(&|| {
            Box::new(
                CsvSource::with_split_bytes(
                    csv_spec(dir.path(), 3),
                    subtask,
                    parallelism,
                    Some(40),
                )
                .expect("csv"),
            )
        });
    }
}

#[test]
fn csv_split_size_balances_one_big_file_over_the_subtasks() {
    use super::csv_split_bytes;
    assert_eq!(csv_split_bytes(0, 4), 1 << 20);
    assert_eq!(csv_split_bytes(533 << 20, 4), 17_465_344);
    assert_eq!(csv_split_bytes(100 << 30, 4), 32 << 20);
}

#[test]
fn parquet_pushdown_skips_row_groups_and_reads_only_named_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Ids ascend, so each row group of 10 holds one decade of ids.
    write_parquet(&dir.path().join("a.parquet"), 0, 100, 10);
    let spec = ParquetSourceSpec {
        columns: Some(vec!["id".into()]),
        prune: Some(crate::job::Expr::parse("id >= 55 and name != 'x'").expect("parse")),
        ..parquet_spec(dir.path(), 7)
    };
    let mut ids = Vec::new();
    for subtask in 0..3 {
        let mut source = ParquetSource::new(spec.clone(), subtask, 3).expect("parquet");
        assert_eq!(
            source.pruned().row_groups,
            5,
            "decades 0..4 cannot hold id >= 55"
        );
        for batch in read_batches(&mut source, None) {
            assert_eq!(batch.num_columns(), 1, "only the id column is decoded");
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
            ids.extend(column.expect("ids").values().iter().copied());
        }
    }
    ids.sort_unstable();
    assert!(
        ids.iter().all(|&id| id >= 50),
        "pruned row groups are not read"
    );
    assert!(
        (55..100).all(|id| ids.contains(&id)),
        "every matching row is read"
    );
}

#[test]
fn parquet_pruned_source_restores_at_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_parquet(&dir.path().join("a.parquet"), 0, 60, 10);
    write_parquet(&dir.path().join("b.parquet"), 100, 30, 10);
    let spec = ParquetSourceSpec {
        prune: Some(crate::job::Expr::parse("id < 25 or id >= 110").expect("parse")),
        ..parquet_spec(dir.path(), 4)
    };
    for (subtask, parallelism) in [(0, 1), (1, 2)] {
        assert_replay_at_every_batch(&|| {
            Box::new(ParquetSource::new(spec.clone(), subtask, parallelism).expect("parquet"))
        });
    }
}

#[test]
fn csv_projection_outputs_only_the_named_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_csv(&dir.path().join("a.csv"), 0, 10);
    let spec = CsvSourceSpec {
        columns: Some(vec!["name".into()]),
        ..csv_spec(dir.path(), 4)
    };
    let mut source = CsvSource::new(spec, 0, 1).expect("csv");
    let batches = read_batches(&mut source, None);
    assert!(
        batches
            .iter()
            .all(|b| b.num_columns() == 1 && b.schema().field(0).name() == "name")
    );
    assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 10);
}

/// An Arrow IPC file of batches of `batch_rows` rows holding rows
/// `first..first + row_count`; LZ4-compressed when `lz4`.
fn write_ipc(path: &Path, format: IpcFormat, first: i64, row_count: i64, lz4: bool) {
    let batch_rows = 3;
    let file = std::fs::File::create(path).expect("create ipc");
    let compression = lz4.then_some(arrow_ipc::CompressionType::LZ4_FRAME);
    let options = arrow_ipc::writer::IpcWriteOptions::default()
        .try_with_compression(compression)
        .expect("options");
    // Schema metadata, as pyarrow writes it, must not matter.
    let schema = Arc::new(schema().as_ref().clone().with_metadata(
        std::collections::HashMap::from([("writer".to_owned(), "test".to_owned())]),
    ));
    let batches = (first..first + row_count).step_by(batch_rows).map(|start| {
        let count = batch_rows.min((first + row_count - start) as usize) as i64;
        rows(start, count)
            .with_schema(Arc::clone(&schema))
            .expect("same columns")
    });
    match format {
        IpcFormat::File => {
            let mut w = arrow_ipc::writer::FileWriter::try_new_with_options(file, &schema, options)
                .expect("writer");
            batches.for_each(|b| w.write(&b).expect("write"));
            w.finish().expect("finish");
        }
        IpcFormat::Stream => {
            let mut w =
                arrow_ipc::writer::StreamWriter::try_new_with_options(file, &schema, options)
                    .expect("writer");
            batches.for_each(|b| w.write(&b).expect("write"));
            w.finish().expect("finish");
        }
    }
}

fn ipc_spec(path: &Path) -> ArrowIpcSourceSpec {
    ArrowIpcSourceSpec {
        path: path.to_owned(),
        format: None,
        schema: schema(),
        watermark: None,
        columns: None,
    }
}

/// Files of both formats, compressed or not: 14 + 9 + 16 rows in batches of
/// three, and two files without batches.
fn write_ipc_dir(dir: &Path) {
    write_ipc(&dir.join("a.arrow"), IpcFormat::File, 0, 14, false);
    write_ipc(&dir.join("b.arrows"), IpcFormat::Stream, 100, 9, true);
    write_ipc(&dir.join("c.feather"), IpcFormat::File, 200, 16, true);
    // Files without batches, as an empty subtask's sink writes them.
    write_ipc(&dir.join("e.arrow"), IpcFormat::File, 500, 0, false);
    write_ipc(&dir.join("f.arrows"), IpcFormat::Stream, 600, 0, false);
    // Not listed: another extension, and a hidden in-progress part.
    write_ipc(&dir.join("d.bin"), IpcFormat::File, 300, 3, false);
    write_ipc(
        &dir.join(".part-0-1.arrow.inprogress"),
        IpcFormat::File,
        400,
        3,
        false,
    );
}

fn ipc_ids_read(spec: &ArrowIpcSourceSpec, parallelism: u32) -> Vec<i64> {
    let mut ids = Vec::new();
    for subtask in 0..parallelism {
        let mut source = ArrowIpcSource::new(spec.clone(), subtask, parallelism).expect("ipc");
        for batch in read_batches(&mut source, None) {
            assert_eq!(
                batch.schema(),
                spec.schema,
                "batches carry the planned schema"
            );
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
            ids.extend(column.expect("int64 ids").values().iter().copied());
        }
    }
    ids.sort_unstable();
    ids
}

#[test]
fn arrow_ipc_splits_read_every_batch_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ipc_dir(dir.path());
    let expected: Vec<i64> = (0..14).chain(100..109).chain(200..216).collect();
    for parallelism in [1, 2, 3, 5, 16] {
        assert_eq!(
            ipc_ids_read(&ipc_spec(dir.path()), parallelism),
            expected,
            "over {parallelism} subtasks"
        );
    }
    // A file path reads that file, whatever its extension.
    let single = ipc_spec(&dir.path().join("d.bin"));
    assert_eq!(ipc_ids_read(&single, 2), (300..303).collect::<Vec<_>>());
}

#[test]
fn arrow_ipc_file_format_batches_are_dealt_over_the_subtasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One file of 30 batches: every one of 3 subtasks gets some.
    write_ipc(&dir.path().join("a.arrow"), IpcFormat::File, 0, 90, false);
    for subtask in 0..3 {
        let mut source = ArrowIpcSource::new(ipc_spec(dir.path()), subtask, 3).expect("ipc");
        let batch_count = read_batches(&mut source, None).len();
        assert_eq!(batch_count, 10, "subtask {subtask}");
    }
}

#[test]
fn arrow_ipc_restore_continues_exactly_after_the_snapshot_at_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ipc_dir(dir.path());
    for (subtask, parallelism) in [(0, 1), (0, 2), (1, 2), (2, 3)] {
        assert_replay_at_every_batch(&|| {
            Box::new(ArrowIpcSource::new(ipc_spec(dir.path()), subtask, parallelism).expect("ipc"))
        });
    }
}

#[test]
fn arrow_ipc_restore_against_a_changed_file_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ipc(&dir.path().join("a.arrows"), IpcFormat::Stream, 0, 9, false);
    write_ipc(
        &dir.path().join("b.arrows"),
        IpcFormat::Stream,
        100,
        9,
        false,
    );
    let mut first = ArrowIpcSource::new(ipc_spec(dir.path()), 0, 1).expect("ipc");
    read_batches(&mut first, Some(4));
    let offset = first.snapshot_offset().expect("snapshot");
    let mut same = ArrowIpcSource::new(ipc_spec(dir.path()), 0, 1).expect("ipc");
    same.restore_offset(&offset).expect("restore");

    write_ipc(
        &dir.path().join("b.arrows"),
        IpcFormat::Stream,
        100,
        12,
        false,
    );
    let mut second = ArrowIpcSource::new(ipc_spec(dir.path()), 0, 1).expect("ipc");
    let message = restore_error(&mut second, &offset);
    assert!(message.contains("'b.arrows'"), "{message}");
    assert!(message.contains("record batch 1"), "{message}");
}

#[test]
fn arrow_ipc_files_with_other_columns_or_bytes_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ipc(&dir.path().join("a.arrow"), IpcFormat::File, 0, 3, false);
    let other = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
    ]));
    let file = std::fs::File::create(dir.path().join("b.arrow")).expect("create");
    let mut w = arrow_ipc::writer::FileWriter::try_new(file, &other).expect("writer");
    w.finish().expect("finish");
    let error = ArrowIpcSource::new(ipc_spec(dir.path()), 0, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("b.arrow") && error.contains("column 0 is Utf8, not Int64"),
        "{error}"
    );

    std::fs::write(dir.path().join("b.arrow"), "id,name\n1,a\n").expect("write");
    let error = ArrowIpcSource::new(ipc_spec(dir.path()), 0, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("b.arrow") && error.contains("not an Arrow IPC file"),
        "{error}"
    );
}

#[test]
fn arrow_ipc_projection_reads_only_the_named_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ipc_dir(dir.path());
    let name_only = Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)]));
    let spec = ArrowIpcSourceSpec {
        columns: Some(vec!["name".into()]),
        schema: name_only,
        ..ipc_spec(dir.path())
    };
    let mut source = ArrowIpcSource::new(spec, 0, 1).expect("ipc");
    let batches = read_batches(&mut source, None);
    assert!(
        batches
            .iter()
            .all(|b| b.num_columns() == 1 && b.schema().field(0).name() == "name")
    );
    assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 39);
}
