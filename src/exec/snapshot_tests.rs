//! Checkpoint snapshots of the stateful operators: a run that is snapshotted,
//! dropped and restored into a fresh operator (with its own spill directory,
//! as on another TaskManager) emits what an uninterrupted run emits.

use std::sync::atomic::Ordering;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use proptest::prelude::*;

use super::ExecError;
use super::aggregate::{AggregateOperator, WindowOperator};
use super::operators::Operator;
use super::sort::SortOperator;
use super::spill::SpillContext;
use super::spill_tests::sort::{Row, reference, rows, same, sort_input, sort_keys};
use super::spill_tests::{
    Collect, aggs, batches, input_schema, memory, rows_of, sim, spill_context, spill_files_in,
};

/// Feeds one batch; windows also get a watermark 20 s behind its last row.
type Feed<'a, O> = &'a dyn Fn(&mut O, &RecordBatch, &mut Collect) -> Result<(), ExecError>;

fn process<O: Operator>(
    op: &mut O,
    batch: &RecordBatch,
    out: &mut Collect,
) -> Result<(), ExecError> {
    op.process(batch.clone(), out)
}

fn process_and_watermark<O: Operator>(
    op: &mut O,
    batch: &RecordBatch,
    out: &mut Collect,
) -> Result<(), ExecError> {
    let ts = batch.column(4).as_primitive::<Int64Type>();
    op.process(batch.clone(), out)?;
    op.watermark(ts.value(ts.len() - 1) - 20_000, out)
}

/// What a run that takes snapshots and one restored from one of them emit.
struct Resumed<O> {
    /// The run that took the snapshots, to its end: snapshots must not
    /// change what an operator outputs.
    snapshotting: Vec<RecordBatch>,
    /// What the snapshotting run emitted before the restored snapshot, then
    /// what the restored operator emitted for the rest of the input.
    resumed: Vec<RecordBatch>,
    restored: O,
    snapshot_bytes: usize,
}

/// Runs `input` through `make(0)`, snapshotting before the batches at
/// `snapshot_at` (`input.len()`: after the last); drops it (its spill files
/// go), restores `snapshot_at[restore_from]` into `make(1)` and feeds the
/// rest of the input.
fn resume<O: Operator>(
    make: &dyn Fn(usize) -> Result<O, ExecError>,
    feed: Feed<'_, O>,
    input: &[RecordBatch],
    snapshot_at: &[usize],
    restore_from: usize,
) -> Result<Resumed<O>, ExecError> {
    let mut original = make(0)?;
    let mut out = Collect::default();
    let mut snapshots = Vec::new();
    for index in 0..=input.len() {
        if snapshot_at.contains(&index) {
            let bytes = original.snapshot_state(index as u64)?.expect("stateful");
            snapshots.push((bytes, out.batches.len()));
        }
        if let Some(batch) = input.get(index) {
            feed(&mut original, batch, &mut out)?;
        }
    }
    original.finish(&mut out)?;
    drop(original);
    let (bytes, emitted_count) = &snapshots[restore_from];
    let mut restored = make(1)?;
    restored.restore_state(Some(bytes))?;
    let mut resumed = Collect {
        batches: out.batches[..*emitted_count].to_vec(),
        watermarks: Vec::new(),
    };
    for batch in &input[snapshot_at[restore_from]..] {
        feed(&mut restored, batch, &mut resumed)?;
    }
    restored.finish(&mut resumed)?;
    Ok(Resumed {
        snapshotting: out.batches,
        resumed: resumed.batches,
        restored,
        snapshot_bytes: bytes.len(),
    })
}

fn uninterrupted<O: Operator>(
    op: &mut O,
    feed: Feed<'_, O>,
    input: &[RecordBatch],
) -> Result<Vec<RecordBatch>, ExecError> {
    let mut out = Collect::default();
    for batch in input {
        feed(op, batch, &mut out)?;
    }
    op.finish(&mut out)?;
    Ok(out.batches)
}

fn aggregate_op(
    budget_pages: usize,
    spill: Option<SpillContext>,
) -> Result<AggregateOperator, ExecError> {
    let (aggs, schema, keys) = (aggs(), input_schema(), vec![0, 1]);
    let output = crate::job::aggregate_output_schema(&schema, &keys, &aggs, false).expect("schema");
    AggregateOperator::new(
        "agg",
        &schema,
        keys,
        &aggs,
        output,
        memory(budget_pages),
        spill,
    )
}

fn window_op(
    budget_pages: usize,
    spill: Option<SpillContext>,
) -> Result<WindowOperator, ExecError> {
    window_op_of(100_000, budget_pages, spill)
}

fn window_op_of(
    size_ms: i64,
    budget_pages: usize,
    spill: Option<SpillContext>,
) -> Result<WindowOperator, ExecError> {
    let (aggs, schema) = (aggs(), input_schema());
    let output = crate::job::aggregate_output_schema(&schema, &[0], &aggs, true).expect("schema");
    WindowOperator::new(
        "win",
        &schema,
        vec![0],
        4,
        size_ms,
        &aggs,
        output,
        memory(budget_pages),
        spill,
    )
}

fn sort_op(budget_pages: usize, spill: Option<SpillContext>) -> Result<SortOperator, ExecError> {
    SortOperator::new(
        "sort",
        input_schema(),
        sort_keys(),
        4,
        memory(budget_pages),
        spill,
    )
}

/// Two spill directories: the first run's and the restored run's.
struct Dirs {
    source: tempfile::TempDir,
    target: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        Self {
            source: tempfile::tempdir().expect("tempdir"),
            target: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn spill(&self, run: usize) -> SpillContext {
        let dir = if run == 0 { &self.source } else { &self.target };
        spill_context(dir.path(), sim())
    }

    fn assert_empty(&self) {
        assert!(
            spill_files_in(self.source.path()).is_empty(),
            "spill files left"
        );
        assert!(
            spill_files_in(self.target.path()).is_empty(),
            "spill files left"
        );
    }
}

mod aggregate {
    use super::*;

    #[test]
    fn restored_aggregation_equals_an_uninterrupted_one_at_every_cut() {
        let input = batches(30_000, 8_000, 2048);
        let reference = rows_of(
            &uninterrupted(&mut aggregate_op(4096, None).unwrap(), &process, &input).unwrap(),
        );
        // 0: the empty state; the last: everything, nothing after it.
        for cut in [0, 1, 7, input.len()] {
            let make = |_| aggregate_op(4096, None);
            let run = resume(&make, &process, &input, &[cut], 0).expect("resume");
            assert_eq!(rows_of(&run.snapshotting), reference, "cut {cut}");
            assert_eq!(rows_of(&run.resumed), reference, "cut {cut}");
        }
    }

    /// Rows of 30k keys: with 24 pages, the table is full after a few
    /// batches and the first spilled block is written after about 28.
    fn spilling_input() -> Vec<RecordBatch> {
        batches(100_000, 30_000, 2048)
    }

    #[test]
    fn spilled_state_is_copied_into_the_snapshot_and_restores_into_a_small_budget() {
        let input = spilling_input();
        let reference = rows_of(
            &uninterrupted(&mut aggregate_op(16_384, None).unwrap(), &process, &input).unwrap(),
        );
        let dirs = Dirs::new();
        let make = |run| aggregate_op(24, Some(dirs.spill(run)));
        // At 20 the spilled rows are all staged; at 36 some are in blocks on
        // disk and some staged. Either one restores.
        for restore_from in [0, 1] {
            let run = resume(&make, &process, &input, &[20, 36], restore_from).expect("resume");
            assert!(
                run.snapshot_bytes > 24 * 4096,
                "spilled rows are in the snapshot"
            );
            assert_eq!(rows_of(&run.snapshotting), reference);
            assert_eq!(
                rows_of(&run.resumed),
                reference,
                "restored from {restore_from}"
            );
        }
        dirs.assert_empty();
    }

    #[test]
    fn a_snapshot_reads_spilled_blocks_back_and_leaves_them_in_place() {
        let input = spilling_input();
        let dir = tempfile::tempdir().unwrap();
        let spill = spill_context(dir.path(), sim());
        let mut op = aggregate_op(24, Some(spill.clone())).unwrap();
        let mut out = Collect::default();
        for batch in &input[..36] {
            op.process(batch.clone(), &mut out).unwrap();
        }
        let metrics = &spill.metrics;
        let written = metrics.bytes_written.load(Ordering::Relaxed);
        assert!(written > 0, "state spilled before the snapshot");
        assert_eq!(metrics.bytes_read.load(Ordering::Relaxed), 0);
        let files = spill_files_in(dir.path());
        let first = op.snapshot_state(1).unwrap().expect("stateful");
        assert!(
            metrics.bytes_read.load(Ordering::Relaxed) > 0,
            "blocks read back"
        );
        assert_eq!(metrics.bytes_written.load(Ordering::Relaxed), written);
        assert_eq!(spill_files_in(dir.path()), files, "spill files untouched");
        let second = op.snapshot_state(2).unwrap().expect("stateful");
        assert_eq!(first, second, "a snapshot changes no state");
    }

    #[test]
    fn an_older_snapshot_restores_after_newer_ones_were_taken() {
        let input = batches(20_000, 5_000, 1024);
        let reference = rows_of(
            &uninterrupted(&mut aggregate_op(4096, None).unwrap(), &process, &input).unwrap(),
        );
        let make = |_| aggregate_op(4096, None);
        let run = resume(&make, &process, &input, &[3, 6, 12], 1).expect("resume");
        assert_eq!(rows_of(&run.resumed), reference);
    }

    #[test]
    fn a_snapshot_after_finish_restores_to_a_finished_operator() {
        let input = batches(2_000, 100, 500);
        let mut op = aggregate_op(256, None).unwrap();
        uninterrupted(&mut op, &process, &input).unwrap();
        let bytes = op.snapshot_state(1).unwrap().expect("stateful");
        let mut restored = aggregate_op(256, None).unwrap();
        restored.restore_state(Some(&bytes)).unwrap();
        let mut out = Collect::default();
        restored.finish(&mut out).unwrap();
        assert!(
            out.batches.is_empty(),
            "results were emitted before the checkpoint"
        );
    }

    #[test]
    fn a_budget_too_small_for_the_restored_table_is_a_state_error_naming_sizes() {
        let input = batches(20_000, 5_000, 2048);
        let mut op = aggregate_op(4096, None).unwrap();
        let mut out = Collect::default();
        for batch in &input {
            op.process(batch.clone(), &mut out).unwrap();
        }
        let bytes = op.snapshot_state(1).unwrap().expect("stateful");
        let dir = tempfile::tempdir().unwrap();
        let mut small = aggregate_op(16, Some(spill_context(dir.path(), sim()))).unwrap();
        let err = small.restore_state(Some(&bytes)).expect_err("too small");
        let text = err.to_string();
        assert!(
            matches!(&err, ExecError::State { operator, .. } if operator == "agg"),
            "{text}"
        );
        assert!(
            text.contains(" groups, whose table held ") && text.contains("65536 bytes"),
            "{text}"
        );
    }
}

mod window {
    use super::*;

    /// Rows for 10 windows, and a copy of the first batch once the first
    /// window fired: its rows are late.
    fn window_input(rows: usize) -> Vec<RecordBatch> {
        let mut input = batches(rows, 8_000, 2048);
        let late = input[0].clone();
        input.insert(input.len() / 3, late);
        input
    }

    fn check(budget_pages: usize, dirs: Option<&Dirs>, snapshot_at: &[usize], restore_from: usize) {
        let input = window_input(100_000);
        let mut reference_op = window_op(16_384, None).unwrap();
        let reference =
            rows_of(&uninterrupted(&mut reference_op, &process_and_watermark, &input).unwrap());
        let make = |run| window_op(budget_pages, dirs.map(|d| d.spill(run)));
        let run = resume(
            &make,
            &process_and_watermark,
            &input,
            snapshot_at,
            restore_from,
        )
        .expect("resume");
        assert_eq!(rows_of(&run.snapshotting), reference);
        assert_eq!(rows_of(&run.resumed), reference);
        assert!(reference_op.late_rows() > 0);
        assert_eq!(run.restored.late_rows(), reference_op.late_rows());
    }

    #[test]
    fn restored_windows_fire_as_uninterrupted_ones_with_some_fired_and_some_open() {
        // Snapshot 30 is after the late batch and after windows fired.
        check(16_384, None, &[0, 30, 40], 1);
        check(16_384, None, &[0], 0);
    }

    /// Windows of 80k rows: with 24 pages the open window writes spilled
    /// blocks to disk after about 60k rows, not only staged rows.
    const LARGE_WINDOW_MS: i64 = 800_000;
    const LARGE_WINDOW_INPUT_ROWS: usize = 200_000;
    /// In the second window, which fires at about batch 80.
    const LARGE_WINDOW_SNAPSHOT_AT: usize = 75;

    #[test]
    fn a_snapshot_of_spilled_open_windows_copies_their_spilled_blocks() {
        let input = window_input(LARGE_WINDOW_INPUT_ROWS);
        let dir = tempfile::tempdir().unwrap();
        let spill = spill_context(dir.path(), sim());
        let mut op = window_op_of(LARGE_WINDOW_MS, 24, Some(spill.clone())).unwrap();
        let mut out = Collect::default();
        for batch in &input[..LARGE_WINDOW_SNAPSHOT_AT] {
            process_and_watermark(&mut op, batch, &mut out).unwrap();
        }
        assert!(!out.batches.is_empty(), "the first window fired");
        let read = spill.metrics.bytes_read.load(Ordering::Relaxed);
        op.snapshot_state(1).unwrap().expect("stateful");
        let read_back = spill.metrics.bytes_read.load(Ordering::Relaxed) - read;
        assert!(read_back > 0, "the open window's blocks were read back");
    }

    #[test]
    fn large_spilled_windows_restore_into_a_small_budget() {
        let input = window_input(LARGE_WINDOW_INPUT_ROWS);
        let reference = rows_of(
            &uninterrupted(
                &mut window_op_of(LARGE_WINDOW_MS, 16_384, None).unwrap(),
                &process_and_watermark,
                &input,
            )
            .unwrap(),
        );
        let dirs = Dirs::new();
        let make = |run| window_op_of(LARGE_WINDOW_MS, 24, Some(dirs.spill(run)));
        let run = resume(
            &make,
            &process_and_watermark,
            &input,
            &[LARGE_WINDOW_SNAPSHOT_AT],
            0,
        )
        .expect("resume");
        assert_eq!(rows_of(&run.resumed), reference);
        drop(run);
        dirs.assert_empty();
    }

    #[test]
    fn spilled_windows_restore_into_a_small_budget() {
        let dirs = Dirs::new();
        check(24, Some(&dirs), &[20, 31], 1);
        dirs.assert_empty();
    }
}

mod sort {
    use super::*;

    fn sorted_rows(batches: &[RecordBatch]) -> Vec<Row> {
        rows(batches)
    }

    fn check(
        input: &[RecordBatch],
        budget_pages: usize,
        dirs: Option<&Dirs>,
        snapshot_at: &[usize],
        restore_from: usize,
    ) {
        let expected = reference(input);
        let make = |run| sort_op(budget_pages, dirs.map(|d| d.spill(run)));
        let run = resume(&make, &process, input, snapshot_at, restore_from).expect("resume");
        assert!(
            same(&sorted_rows(&run.snapshotting), &expected),
            "snapshots changed the output"
        );
        assert!(
            same(&sorted_rows(&run.resumed), &expected),
            "restored sort differs"
        );
    }

    #[test]
    fn restored_sort_equals_a_stable_sort_of_the_whole_input() {
        let input = sort_input(12_000, 1500);
        for cut in [0, 3, input.len()] {
            check(&input, 4096, None, &[cut], 0);
        }
        check(&input, 4096, None, &[2, 5], 0);
    }

    #[test]
    fn spilled_runs_are_copied_into_the_snapshot_and_restore_into_a_small_budget() {
        let input = sort_input(30_000, 3000);
        let dirs = Dirs::new();
        check(&input, 32, Some(&dirs), &[4, 7], 1);
        check(&input, 32, Some(&dirs), &[4, 7], 0);
        dirs.assert_empty();
    }

    #[test]
    fn a_snapshot_copies_every_spilled_run() {
        let input = sort_input(30_000, 3000);
        let dir = tempfile::tempdir().unwrap();
        let spill = spill_context(dir.path(), sim());
        let mut op = sort_op(32, Some(spill.clone())).unwrap();
        let mut out = Collect::default();
        for batch in &input[..5] {
            op.process(batch.clone(), &mut out).unwrap();
        }
        let written = spill.metrics.bytes_written.load(Ordering::Relaxed);
        assert!(written > 0, "runs spilled before the snapshot");
        let bytes = op.snapshot_state(1).unwrap().expect("stateful");
        let read = spill.metrics.bytes_read.load(Ordering::Relaxed);
        assert!(
            read > 0 && read <= written,
            "runs read back: {read} of {written}"
        );
        assert!(bytes.len() as u64 > read, "the runs and the rows in memory");
    }

    #[test]
    fn a_sort_without_spilling_restored_over_budget_is_a_state_error() {
        let input = sort_input(6_000, 3000);
        let mut op = sort_op(4096, None).unwrap();
        let mut out = Collect::default();
        for batch in &input {
            op.process(batch.clone(), &mut out).unwrap();
        }
        let bytes = op.snapshot_state(1).unwrap().expect("stateful");
        let err = sort_op(8, None)
            .unwrap()
            .restore_state(Some(&bytes))
            .expect_err("over budget");
        let text = err.to_string();
        assert!(
            matches!(&err, ExecError::State { operator, .. } if operator == "sort"),
            "{text}"
        );
        assert!(text.contains("budget 32768 bytes"), "{text}");
    }
}

/// A snapshot of every operator kind, with some state.
fn snapshots() -> Vec<(&'static str, Vec<u8>)> {
    let input = batches(3_000, 500, 1000);
    let mut out = Collect::default();
    let mut agg = aggregate_op(256, None).unwrap();
    let mut win = window_op(256, None).unwrap();
    let mut sort = sort_op(256, None).unwrap();
    for batch in &input {
        agg.process(batch.clone(), &mut out).unwrap();
        process_and_watermark(&mut win, batch, &mut out).unwrap();
        sort.process(batch.clone(), &mut out).unwrap();
    }
    vec![
        ("agg", agg.snapshot_state(1).unwrap().unwrap()),
        ("win", win.snapshot_state(1).unwrap().unwrap()),
        ("sort", sort.snapshot_state(1).unwrap().unwrap()),
    ]
}

fn restore_into(kind: &str, bytes: Option<&[u8]>) -> Result<(), ExecError> {
    match kind {
        "agg" => aggregate_op(256, None)?.restore_state(bytes),
        "win" => window_op(256, None)?.restore_state(bytes),
        _ => sort_op(256, None)?.restore_state(bytes),
    }
}

fn assert_state_error_naming(kind: &str, result: Result<(), ExecError>) {
    let err = result.expect_err("corrupt");
    assert!(
        matches!(&err, ExecError::State { operator, .. } if operator == kind),
        "{kind}: {err}"
    );
}

#[test]
fn corrupt_truncated_or_foreign_snapshots_are_state_errors_naming_the_operator() {
    for (kind, bytes) in snapshots() {
        restore_into(kind, Some(&bytes)).expect("the snapshot itself restores");
        restore_into(kind, None).expect("None is a no-op");
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        assert_state_error_naming(kind, restore_into(kind, Some(&flipped)));
        assert_state_error_naming(kind, restore_into(kind, Some(&bytes[..bytes.len() - 1])));
        assert_state_error_naming(kind, restore_into(kind, Some(&[])));
        // Another operator kind's snapshot.
        let other = if kind == "sort" { "agg" } else { "sort" };
        let (_, foreign) = snapshots().into_iter().find(|(k, _)| *k == other).unwrap();
        assert_state_error_naming(kind, restore_into(kind, Some(&foreign)));
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_a_restore(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        kind in proptest::sample::select(vec!["agg", "win", "sort"]),
    ) {
        prop_assert!(restore_into(kind, Some(&bytes)).is_err());
    }

    /// Past the CRC (as if the writer had a bug), a changed byte still makes
    /// at worst an error.
    #[test]
    fn a_changed_byte_under_a_valid_crc_never_panics_a_restore(
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
        kind_index in 0usize..3,
    ) {
        let (kind, mut bytes) = SNAPSHOTS.with(|s| s[kind_index].clone());
        let body = bytes.len() - 4;
        bytes[12 + at.index(body - 12)] = value;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        let _ = restore_into(kind, Some(&bytes));
    }
}

thread_local! {
    static SNAPSHOTS: Vec<(&'static str, Vec<u8>)> = snapshots();
}
