//! The exactly-once file sinks' commit protocol.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use arrow_select::concat::concat_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::format::{CsvPart, IpcPart, ParquetPart, PartFiles, PartFormat};
use super::two_phase::{PartName, PartStage};
use super::{TwoPhaseCsvSink, TwoPhaseFileSink, TwoPhaseParquetSink};
use crate::exec::ExecError;
use crate::exec::operators::{FINAL_CHECKPOINT, Operator, Output};
use crate::job::{IpcCompression, IpcFormat};

struct NoOutput;

impl Output for NoOutput {
    fn emit(&mut self, _batch: RecordBatch) -> Result<(), ExecError> {
        unreachable!("sinks emit nothing")
    }
    fn watermark(&mut self, _watermark: i64) -> Result<(), ExecError> {
        unreachable!("sinks forward no watermark")
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
    ]))
}

/// Rows `first..first + row_count`.
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

fn csv_sink(dir: &Path, subtask: u32) -> TwoPhaseCsvSink {
    TwoPhaseCsvSink::new("sink", dir, subtask, schema()).expect("sink")
}

/// Every file in `dir` by name, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    names
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).expect("read part")
}

/// The rows of every committed (visible) part file, by name.
fn committed_rows(dir: &Path) -> BTreeMap<String, RecordBatch> {
    let mut parts = BTreeMap::new();
    for name in file_names(dir) {
        let path = dir.join(&name);
        let batch = if name.starts_with('.') {
            continue;
        } else if name.ends_with(".arrow") || name.ends_with(".arrows") {
            let batches = read_ipc(&path);
            concat_batches(&schema(), &batches).expect("concat")
        } else if name.ends_with(".csv") {
            let reader = arrow_csv::ReaderBuilder::new(schema())
                .with_header(true)
                .build(std::fs::File::open(&path).expect("open"))
                .expect("csv reader");
            let batches: Vec<RecordBatch> = reader.map(|b| b.expect("csv batch")).collect();
            concat_batches(&schema(), &batches).expect("concat")
        } else {
            let file = std::fs::File::open(&path).expect("open");
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .expect("parquet builder")
                .build()
                .expect("parquet reader");
            let batches: Vec<RecordBatch> = reader.map(|b| b.expect("parquet batch")).collect();
            concat_batches(&schema(), &batches).expect("concat")
        };
        parts.insert(name, batch);
    }
    parts
}

/// The batches of an Arrow IPC file of either format.
fn read_ipc(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).expect("open");
    let batches: Result<Vec<RecordBatch>, _> = if path.extension().is_some_and(|e| e == "arrow") {
        arrow_ipc::reader::FileReader::try_new(file, None)
            .expect("file reader")
            .collect()
    } else {
        arrow_ipc::reader::StreamReader::try_new(file, None)
            .expect("stream reader")
            .collect()
    };
    batches.expect("ipc batches")
}

#[test]
fn part_file_is_committed_only_when_its_checkpoint_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 3), &mut NoOutput).expect("process");
    assert_eq!(file_names(dir.path()), [".part-0-0.csv.inprogress"]);

    sink.snapshot_state(1).expect("snapshot");
    assert_eq!(file_names(dir.path()), [".part-0-0.csv.pending"]);

    sink.notify_checkpoint_complete(1).expect("notify");
    assert_eq!(file_names(dir.path()), ["part-0-0.csv"]);
    assert_eq!(
        read(dir.path(), "part-0-0.csv"),
        "id,name\n0,n0\n1,n1\n2,n2\n"
    );
}

#[test]
fn checkpoint_without_new_rows_stages_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    sink.snapshot_state(1).expect("snapshot");
    sink.process(rows(0, 2), &mut NoOutput).expect("process");
    sink.snapshot_state(2).expect("snapshot");
    sink.process(rows(2, 0), &mut NoOutput)
        .expect("empty batch");
    sink.snapshot_state(3).expect("snapshot");
    sink.notify_checkpoint_complete(3).expect("notify");
    assert_eq!(file_names(dir.path()), ["part-0-0.csv"]);
}

#[test]
fn notify_commits_every_part_staged_up_to_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    for checkpoint in 1..=3 {
        sink.process(rows(checkpoint, 1), &mut NoOutput)
            .expect("process");
        sink.snapshot_state(checkpoint as u64).expect("snapshot");
    }
    // Checkpoint 1's notification was lost; 2's covers it.
    sink.notify_checkpoint_complete(2).expect("notify");
    assert_eq!(
        file_names(dir.path()),
        [".part-0-2.csv.pending", "part-0-0.csv", "part-0-1.csv"]
    );
    sink.process(rows(9, 1), &mut NoOutput).expect("process");
    sink.finish(&mut NoOutput).expect("finish");
    assert!(sink.has_pending_commit());
    sink.notify_checkpoint_complete(3).expect("notify");
    assert!(
        sink.has_pending_commit(),
        "the tail waits for the job's end"
    );
    sink.notify_checkpoint_complete(FINAL_CHECKPOINT)
        .expect("notify final");
    assert!(!sink.has_pending_commit());
    assert_eq!(
        file_names(dir.path()),
        [
            "part-0-0.csv",
            "part-0-1.csv",
            "part-0-2.csv",
            "part-0-3.csv"
        ]
    );
    assert_eq!(read(dir.path(), "part-0-3.csv"), "id,name\n9,n9\n");
}

#[test]
fn empty_subtask_yields_one_file_with_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 2);
    sink.restore_state(None).expect("restore");
    sink.snapshot_state(1).expect("snapshot");
    sink.finish(&mut NoOutput).expect("finish");
    assert!(sink.has_pending_commit());
    sink.notify_checkpoint_complete(FINAL_CHECKPOINT)
        .expect("notify");
    assert_eq!(file_names(dir.path()), ["part-2-0.csv"]);
    assert_eq!(read(dir.path(), "part-2-0.csv"), "id,name\n");
}

#[test]
fn finish_after_the_last_checkpoint_took_every_row_stages_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 2), &mut NoOutput).expect("process");
    sink.snapshot_state(1).expect("snapshot");
    sink.notify_checkpoint_complete(1).expect("notify");
    sink.finish(&mut NoOutput).expect("finish");
    assert!(!sink.has_pending_commit());
    assert_eq!(file_names(dir.path()), ["part-0-0.csv"]);
}

#[test]
fn input_before_restore_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    let err = sink.process(rows(0, 1), &mut NoOutput).unwrap_err();
    assert!(matches!(err, ExecError::State { .. }), "{err}");
    assert!(file_names(dir.path()).is_empty());
}

/// The input of the failover scenario: batch `i` holds rows `10 i ..`.
fn batch(i: i64) -> RecordBatch {
    rows(10 * i, 3)
}

/// One run without failure: batches 0..6, checkpoints 1..=3 after batches
/// 1, 2 and 4, each notified.
fn uninterrupted_run<F: PartFormat + Clone>(dir: &Path, parts: &PartFiles<F>) {
    let sink = TwoPhaseFileSink::with_parts("sink", dir, 0, schema(), parts.clone());
    let mut sink = sink.expect("sink");
    sink.restore_state(None).expect("restore");
    let mut checkpoint = 0;
    for i in 0..6 {
        sink.process(batch(i), &mut NoOutput).expect("process");
        if [1, 2, 4].contains(&i) {
            checkpoint += 1;
            sink.snapshot_state(checkpoint).expect("snapshot");
            sink.notify_checkpoint_complete(checkpoint).expect("notify");
        }
    }
    sink.finish(&mut NoOutput).expect("finish");
    sink.notify_checkpoint_complete(FINAL_CHECKPOINT)
        .expect("notify");
}

/// The same input with a failure: checkpoint 2 is staged but never
/// completes, batch 3 is half way into a part file, and the task dies. The
/// restarted task restores checkpoint 1 and the source replays from batch 2.
/// `notified_1`: whether checkpoint 1's notification arrived before the
/// failure (if not, the restore must commit its part).
fn run_with_failure<F: PartFormat + Clone>(dir: &Path, parts: &PartFiles<F>, notified_1: bool) {
    let sink = TwoPhaseFileSink::with_parts("sink", dir, 0, schema(), parts.clone());
    let mut sink = sink.expect("sink");
    sink.restore_state(None).expect("restore");
    sink.process(batch(0), &mut NoOutput).expect("process");
    sink.process(batch(1), &mut NoOutput).expect("process");
    let state_1 = sink.snapshot_state(1).expect("snapshot").expect("state");
    if notified_1 {
        sink.notify_checkpoint_complete(1).expect("notify");
    }
    sink.process(batch(2), &mut NoOutput).expect("process");
    sink.snapshot_state(2).expect("snapshot");
    sink.process(batch(3), &mut NoOutput).expect("process");
    drop(sink);

    let sink = TwoPhaseFileSink::with_parts("sink", dir, 0, schema(), parts.clone());
    let mut sink = sink.expect("sink");
    sink.restore_state(Some(&state_1)).expect("restore");
    let mut checkpoint = 1;
    for i in 2..6 {
        sink.process(batch(i), &mut NoOutput).expect("process");
        if [2, 4].contains(&i) {
            checkpoint += 1;
            sink.snapshot_state(checkpoint).expect("snapshot");
            sink.notify_checkpoint_complete(checkpoint).expect("notify");
        }
    }
    sink.finish(&mut NoOutput).expect("finish");
    sink.notify_checkpoint_complete(FINAL_CHECKPOINT)
        .expect("notify");
}

/// Fails over as [`run_with_failure`] does and checks the committed files
/// against an uninterrupted run's; returns how many files that run made.
fn assert_failover_is_exactly_once<F: PartFormat + Clone>(parts: PartFiles<F>) -> usize {
    let reference = tempfile::tempdir().expect("tempdir");
    uninterrupted_run(reference.path(), &parts);
    let expected = committed_rows(reference.path());
    let all_rows: Vec<RecordBatch> = expected.values().cloned().collect();
    assert_eq!(
        concat(&all_rows),
        concat(&(0..6).map(batch).collect::<Vec<_>>())
    );
    for notified_1 in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        run_with_failure(dir.path(), &parts, notified_1);
        assert_eq!(
            file_names(dir.path()),
            file_names(reference.path()),
            "notified_1={notified_1}"
        );
        assert_eq!(
            committed_rows(dir.path()),
            expected,
            "notified_1={notified_1}"
        );
    }
    expected.len()
}

fn concat(batches: &[RecordBatch]) -> RecordBatch {
    concat_batches(&schema(), batches).expect("concat")
}

/// Whole part files: one per checkpoint interval.
fn whole<F>(format: F) -> PartFiles<F> {
    PartFiles {
        format,
        target_file_bytes: None,
    }
}

#[test]
fn csv_failover_commits_exactly_what_an_uninterrupted_run_does() {
    assert_eq!(assert_failover_is_exactly_once(whole(CsvPart)), 4);
}

#[test]
fn parquet_failover_commits_exactly_what_an_uninterrupted_run_does() {
    assert_eq!(
        assert_failover_is_exactly_once(whole(ParquetPart::default())),
        4
    );
}

#[test]
fn arrow_ipc_failover_commits_exactly_what_an_uninterrupted_run_does() {
    for format in [IpcFormat::File, IpcFormat::Stream] {
        for compression in [IpcCompression::None, IpcCompression::Lz4] {
            let part = IpcPart {
                format,
                compression,
            };
            assert_eq!(assert_failover_is_exactly_once(whole(part)), 4);
        }
    }
}

/// With a target of one byte every batch fills a part file: each
/// checkpoint stages several parts, and a failover still commits exactly
/// the uninterrupted run's files.
#[test]
fn rolled_parts_fail_over_exactly_once() {
    let parquet = PartFiles {
        format: ParquetPart { row_group_rows: 2 },
        target_file_bytes: Some(1),
    };
    assert_eq!(assert_failover_is_exactly_once(parquet), 6);
    let ipc = PartFiles {
        format: IpcPart::default(),
        target_file_bytes: Some(1),
    };
    assert_eq!(assert_failover_is_exactly_once(ipc), 6);
}

#[test]
fn rolled_parts_stay_in_progress_until_a_barrier_stages_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parts = PartFiles {
        format: IpcPart::default(),
        target_file_bytes: Some(1),
    };
    let mut sink =
        TwoPhaseFileSink::with_parts("sink", dir.path(), 2, schema(), parts).expect("sink");
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 3), &mut NoOutput).expect("process");
    sink.process(rows(3, 3), &mut NoOutput).expect("process");
    assert_eq!(
        file_names(dir.path()),
        [".part-2-0.arrow.inprogress", ".part-2-1.arrow.inprogress"]
    );
    sink.snapshot_state(1).expect("snapshot");
    assert_eq!(
        file_names(dir.path()),
        [".part-2-0.arrow.pending", ".part-2-1.arrow.pending"]
    );
    sink.process(rows(6, 3), &mut NoOutput).expect("process");
    sink.notify_checkpoint_complete(1).expect("notify");
    assert_eq!(
        file_names(dir.path()),
        [
            ".part-2-2.arrow.inprogress",
            "part-2-0.arrow",
            "part-2-1.arrow"
        ]
    );
    // A failure now: the closed part after the barrier goes with the sink.
    drop(sink);
    assert_eq!(file_names(dir.path()), ["part-2-0.arrow", "part-2-1.arrow"]);
}

#[test]
fn restore_from_an_older_checkpoint_deletes_parts_committed_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 1), &mut NoOutput).expect("process");
    let state_1 = sink.snapshot_state(1).expect("snapshot").expect("state");
    sink.process(rows(1, 1), &mut NoOutput).expect("process");
    sink.snapshot_state(2).expect("snapshot");
    sink.notify_checkpoint_complete(2).expect("notify");
    drop(sink);
    assert_eq!(file_names(dir.path()), ["part-0-0.csv", "part-0-1.csv"]);

    // Checkpoint 2 turned out corrupt: the job falls back to checkpoint 1.
    for _ in 0..2 {
        let mut sink = csv_sink(dir.path(), 0);
        sink.restore_state(Some(&state_1)).expect("restore");
        assert_eq!(file_names(dir.path()), ["part-0-0.csv"], "idempotent");
    }
}

#[test]
fn restore_reports_a_lost_staged_part_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 1), &mut NoOutput).expect("process");
    let state = sink.snapshot_state(1).expect("snapshot").expect("state");
    drop(sink);
    std::fs::remove_file(dir.path().join(".part-0-0.csv.pending")).expect("remove");

    let mut sink = csv_sink(dir.path(), 0);
    let err = sink.restore_state(Some(&state)).unwrap_err();
    assert!(err.to_string().contains(".part-0-0.csv.pending"), "{err}");
}

#[test]
fn restore_of_another_subtasks_state_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    let state = sink.snapshot_state(1).expect("snapshot").expect("state");
    let mut other = csv_sink(dir.path(), 1);
    let err = other.restore_state(Some(&state)).unwrap_err();
    assert!(matches!(err, ExecError::State { .. }), "{err}");
}

/// Files that subtask 1's sink must leave alone: other subtasks (11 above
/// all), the non-checkpointed sink's names, other formats and shapes.
const FOREIGN_FILES: [&str; 12] = [
    "part-11-0.csv",
    ".part-11-0.csv.pending",
    ".part-11-5.csv.inprogress",
    "part-0-1.csv",
    "part-1.csv",
    ".part-1.csv.inprogress",
    "part-1-0.parquet",
    "part-01-0.csv",
    "part-1-0.csv.pending",
    ".part-1-0.csv",
    "part-1-0.csv.bak",
    "notes.txt",
];

const OWN_FILES: [&str; 4] = [
    "part-1-0.csv",
    "part-1-7.csv",
    ".part-1-8.csv.pending",
    ".part-1-9.csv.inprogress",
];

#[test]
fn restore_from_scratch_wipes_this_subtasks_parts_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in FOREIGN_FILES.iter().chain(&OWN_FILES) {
        std::fs::write(dir.path().join(name), "x").expect("write");
    }
    let mut sink = csv_sink(dir.path(), 1);
    sink.restore_state(None).expect("restore");
    let mut foreign: Vec<&str> = FOREIGN_FILES.to_vec();
    foreign.sort();
    assert_eq!(file_names(dir.path()), foreign);
}

#[test]
fn restore_of_subtask_11_leaves_subtask_1_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink_1 = csv_sink(dir.path(), 1);
    sink_1.restore_state(None).expect("restore");
    sink_1.process(rows(0, 1), &mut NoOutput).expect("process");
    sink_1.snapshot_state(1).expect("snapshot");
    sink_1.notify_checkpoint_complete(1).expect("notify");
    sink_1.process(rows(1, 1), &mut NoOutput).expect("process");
    sink_1.snapshot_state(2).expect("snapshot");

    let mut sink_11 = csv_sink(dir.path(), 11);
    sink_11.restore_state(None).expect("restore");
    let state = br#"{"subtask":11,"next_seq":0,"pending":[]}"#;
    let mut sink_11 = csv_sink(dir.path(), 11);
    sink_11.restore_state(Some(state)).expect("restore");
    assert_eq!(
        file_names(dir.path()),
        [".part-1-1.csv.pending", "part-1-0.csv"]
    );
}

#[test]
fn part_names_parse_strictly() {
    let parsed = |name: &str| PartName::parse(name, "csv");
    let part = |subtask, seq, stage| {
        Some(PartName {
            subtask,
            seq,
            stage,
        })
    };
    assert_eq!(parsed("part-1-0.csv"), part(1, 0, PartStage::Committed));
    assert_eq!(parsed("part-11-0.csv"), part(11, 0, PartStage::Committed));
    assert_eq!(parsed("part-1-10.csv"), part(1, 10, PartStage::Committed));
    assert_eq!(
        parsed(".part-1-3.csv.pending"),
        part(1, 3, PartStage::Pending)
    );
    assert_eq!(
        parsed(".part-1-3.csv.inprogress"),
        part(1, 3, PartStage::InProgress)
    );
    for name in FOREIGN_FILES.iter().filter(|n| n.contains("part-1")) {
        assert_eq!(
            parsed(name).map(|p| p.subtask).filter(|s| *s == 1),
            None,
            "{name}"
        );
    }
    for name in [
        "part--0.csv",
        "part-1-.csv",
        "part-+1-0.csv",
        "part-1-0csv",
        "part-1-0.csvx",
    ] {
        assert_eq!(parsed(name), None, "{name}");
    }
    for subtask in [0, 1, 11, 110] {
        for seq in [0, 1, 11, u64::MAX] {
            for stage in [
                PartStage::InProgress,
                PartStage::Pending,
                PartStage::Committed,
            ] {
                let name = PartName {
                    subtask,
                    seq,
                    stage,
                };
                assert_eq!(parsed(&name.file_name("csv")), Some(name));
            }
        }
    }
}

#[test]
fn parquet_parts_roll_per_checkpoint_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = TwoPhaseParquetSink::new("sink", dir.path(), 3, schema()).expect("sink");
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 4), &mut NoOutput).expect("process");
    sink.process(rows(4, 2), &mut NoOutput).expect("process");
    sink.snapshot_state(1).expect("snapshot");
    sink.process(rows(6, 1), &mut NoOutput).expect("process");
    sink.finish(&mut NoOutput).expect("finish");
    sink.notify_checkpoint_complete(1).expect("notify");
    assert_eq!(
        file_names(dir.path()),
        [".part-3-1.parquet.pending", "part-3-0.parquet"]
    );
    sink.notify_checkpoint_complete(FINAL_CHECKPOINT)
        .expect("notify");
    let parts = committed_rows(dir.path());
    assert_eq!(parts["part-3-0.parquet"], rows(0, 6));
    assert_eq!(parts["part-3-1.parquet"], rows(6, 1));
}

#[test]
fn restore_of_an_inconsistent_or_unreadable_state_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let past_next = br#"{"subtask":0,"next_seq":1,"pending":[{"seq":1,"checkpoint":1}]}"#;
    for state in [&past_next[..], b"not json"] {
        let mut sink = csv_sink(dir.path(), 0);
        let err = sink.restore_state(Some(state)).unwrap_err();
        assert!(matches!(err, ExecError::State { .. }), "{err}");
    }
}

#[test]
fn a_dropped_two_phase_sink_removes_its_open_part_and_keeps_staged_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = csv_sink(dir.path(), 0);
    sink.restore_state(None).expect("restore");
    sink.process(rows(0, 1), &mut NoOutput).expect("process");
    sink.snapshot_state(1).expect("snapshot");
    sink.process(rows(1, 1), &mut NoOutput).expect("process");
    assert_eq!(
        file_names(dir.path()),
        [".part-0-0.csv.pending", ".part-0-1.csv.inprogress"]
    );
    drop(sink);
    assert_eq!(file_names(dir.path()), [".part-0-0.csv.pending"]);
}

#[test]
fn a_dropped_sink_never_removes_a_later_attempts_file_of_the_same_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = super::CsvSink::new(dir.path(), 0, schema()).expect("old attempt");
    // The restarted attempt opens the same name before the old one drops.
    let mut new = super::CsvSink::new(dir.path(), 0, schema()).expect("new attempt");
    drop(old);
    assert_eq!(file_names(dir.path()), [".part-0.csv.inprogress"]);
    new.process(rows(0, 2), &mut NoOutput).expect("process");
    new.finish(&mut NoOutput).expect("finish");
    assert_eq!(file_names(dir.path()), ["part-0.csv"]);
}

#[test]
fn a_sink_dropped_before_finishing_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    for parquet in [false, true] {
        let mut sink: Box<dyn Operator> = if parquet {
            Box::new(super::ParquetSink::new(dir.path(), 0, schema()).expect("sink"))
        } else {
            Box::new(super::CsvSink::new(dir.path(), 0, schema()).expect("sink"))
        };
        sink.process(rows(0, 100), &mut NoOutput).expect("process");
        drop(sink);
        assert!(file_names(dir.path()).is_empty(), "parquet={parquet}");
    }
}

/// Every file in `dir` read back, in name order.
fn all_rows(dir: &Path) -> RecordBatch {
    let parts: Vec<RecordBatch> = committed_rows(dir).into_values().collect();
    concat(&parts)
}

#[test]
fn a_rolling_sink_without_checkpoints_shows_its_parts_only_when_it_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parts = PartFiles {
        format: IpcPart {
            format: IpcFormat::Stream,
            compression: IpcCompression::Lz4,
        },
        target_file_bytes: Some(1),
    };
    let mut sink = super::ArrowIpcSink::with_parts(dir.path(), 1, schema(), parts).expect("sink");
    for i in 0..3 {
        sink.process(rows(10 * i, 4), &mut NoOutput)
            .expect("process");
    }
    assert_eq!(
        file_names(dir.path()),
        [
            ".part-1-0.arrows.inprogress",
            ".part-1-1.arrows.inprogress",
            ".part-1-2.arrows.inprogress"
        ]
    );
    sink.finish(&mut NoOutput).expect("finish");
    assert_eq!(
        file_names(dir.path()),
        ["part-1-0.arrows", "part-1-1.arrows", "part-1-2.arrows"]
    );
    let expected = concat(&[rows(0, 4), rows(10, 4), rows(20, 4)]);
    assert_eq!(all_rows(dir.path()), expected);
}

#[test]
fn a_rolling_sink_dropped_before_finishing_removes_its_closed_parts_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parts = PartFiles {
        format: ParquetPart::default(),
        target_file_bytes: Some(1),
    };
    let mut sink = super::ParquetSink::with_parts(dir.path(), 0, schema(), parts).expect("sink");
    sink.process(rows(0, 4), &mut NoOutput).expect("process");
    sink.process(rows(4, 4), &mut NoOutput).expect("process");
    assert_eq!(file_names(dir.path()).len(), 2);
    drop(sink);
    assert!(file_names(dir.path()).is_empty());
}

#[test]
fn parquet_parts_keep_to_row_group_rows() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let parts = PartFiles {
        format: ParquetPart { row_group_rows: 4 },
        target_file_bytes: None,
    };
    let mut sink = super::ParquetSink::with_parts(dir.path(), 0, schema(), parts).expect("sink");
    sink.process(rows(0, 3), &mut NoOutput).expect("process");
    sink.process(rows(3, 7), &mut NoOutput).expect("process");
    sink.finish(&mut NoOutput).expect("finish");
    assert_eq!(file_names(dir.path()), ["part-0.parquet"]);
    let file = std::fs::File::open(dir.path().join("part-0.parquet")).expect("open");
    let reader = SerializedFileReader::new(file).expect("reader");
    let groups: Vec<i64> = reader
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows())
        .collect();
    assert_eq!(groups, [4, 4, 2]);
    assert_eq!(all_rows(dir.path()), rows(0, 10));
}

#[test]
fn an_empty_subtask_still_writes_a_readable_ipc_file_of_either_format() {
    for format in [IpcFormat::File, IpcFormat::Stream] {
        let dir = tempfile::tempdir().expect("tempdir");
        let part = IpcPart {
            format,
            compression: IpcCompression::None,
        };
        let mut sink = TwoPhaseFileSink::with_parts("sink", dir.path(), 0, schema(), whole(part))
            .expect("sink");
        sink.restore_state(None).expect("restore");
        sink.finish(&mut NoOutput).expect("finish");
        sink.notify_checkpoint_complete(FINAL_CHECKPOINT)
            .expect("notify");
        let name = format!("part-0-0.{}", format.extension());
        assert_eq!(file_names(dir.path()), std::slice::from_ref(&name));
        assert_eq!(all_rows(dir.path()).num_rows(), 0, "{name}");
    }
}
