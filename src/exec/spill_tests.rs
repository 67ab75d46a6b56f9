//! Spilling operators against their in-memory path, on the simulated and
//! thread-pool storage backends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::ExecError;
use super::aggregate::{AggregateOperator, WindowOperator};
use super::operators::{Operator, Output};
use super::spill::SpillContext;
use crate::io::{BackendChoice, IoConfig, IoError, IoManager, SimOptions};
use crate::job::{AggFunc, AggSpec};
use crate::memory::{MemoryManager, PagePool};
use crate::metrics::SpillMetrics;

pub(super) const PAGE: usize = 4096;

/// Collects emitted batches.
#[derive(Default)]
pub(super) struct Collect {
    pub batches: Vec<RecordBatch>,
    pub watermarks: Vec<i64>,
}

impl Output for Collect {
    fn emit(&mut self, batch: RecordBatch) -> Result<(), ExecError> {
        self.batches.push(batch);
        Ok(())
    }
    fn watermark(&mut self, watermark: i64) -> Result<(), ExecError> {
        self.watermarks.push(watermark);
        Ok(())
    }
}

pub(super) fn io_config(dir: &Path, backend: BackendChoice) -> IoConfig {
    IoConfig {
        tmp_dirs: vec![dir.to_path_buf()],
        backend,
        queue_depth: 8,
        buf_count_max: 8,
        threadpool_threads: 2,
        ..IoConfig::default()
    }
}

pub(super) fn spill_context(dir: &Path, backend: BackendChoice) -> SpillContext {
    let io = IoManager::new(io_config(dir, backend)).expect("io manager");
    SpillContext::new(Arc::new(io), Arc::new(SpillMetrics::default()))
}

pub(super) fn sim() -> BackendChoice {
    BackendChoice::Sim(SimOptions::from_env(7))
}

/// Spill files (not directories or owner markers) under `dir`.
pub(super) fn spill_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(spill_files_in(&path));
        } else if !path.ends_with("owner") {
            files.push(path);
        }
    }
    files
}

pub(super) fn memory(budget_pages: usize) -> MemoryManager {
    let pool = PagePool::new((budget_pages * PAGE) as u64, PAGE);
    pool.slot_manager(0, (budget_pages * PAGE) as u64)
}

pub(super) fn input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("value", DataType::Int64, true),
        Field::new("price", DataType::Float64, true),
        Field::new("ts", DataType::Int64, false),
    ]))
}

/// Deterministic rows: `keys` distinct keys (a few null), string keys of
/// both inline and arena length, some null values, float prices whose sum
/// depends on the order of addition.
pub(super) fn batches(rows: usize, keys: u64, batch_rows: usize) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows {
        let end = (start + batch_rows).min(rows);
        let ids: Vec<u64> = (start..end)
            .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys)
            .collect();
        let key: Int64Array = ids
            .iter()
            .map(|&k| (k % 997 != 5).then_some(k as i64))
            .collect();
        let name: StringArray = ids
            .iter()
            .map(|&k| {
                Some(if k % 3 == 0 {
                    format!("k{k}")
                } else {
                    format!("a-longer-key-that-lives-in-the-arena-{k}")
                })
            })
            .collect();
        let value: Int64Array = (start..end)
            .map(|i| (i % 11 != 3).then_some((i as i64 * 7919) % 10_007 - 5000))
            .collect();
        let price: Float64Array = (start..end)
            .map(|i| Some(((i * 31) % 1000) as f64 * 0.1 + 1e-7 * i as f64))
            .collect();
        let ts = Int64Array::from_iter_values((start..end).map(|i| i as i64 * 10));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(key),
            Arc::new(name),
            Arc::new(value),
            Arc::new(price),
            Arc::new(ts),
        ];
        out.push(RecordBatch::try_new(input_schema(), columns).expect("batch"));
        start = end;
    }
    out
}

pub(super) fn aggs() -> Vec<AggSpec> {
    let spec = |func, column: Option<&str>, output: &str| AggSpec {
        func,
        column: column.map(str::to_owned),
        output: output.to_owned(),
    };
    vec![
        spec(AggFunc::Count, None, "cnt"),
        spec(AggFunc::Count, Some("value"), "cnt_value"),
        spec(AggFunc::Sum, Some("value"), "total"),
        spec(AggFunc::Min, Some("value"), "lo"),
        spec(AggFunc::Max, Some("price"), "hi"),
        spec(AggFunc::Sum, Some("price"), "price_sum"),
        spec(AggFunc::Avg, Some("price"), "price_avg"),
    ]
}

/// Every output row as text (floats bit-exact), sorted.
pub(super) fn rows_of(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|c| cell(c.as_ref(), row))
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

pub(super) fn cell(column: &dyn Array, row: usize) -> String {
    if column.is_null(row) {
        return "null".into();
    }
    match column.data_type() {
        DataType::Int64 => column.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Float64 => format!(
            "{:#x}",
            column.as_primitive::<Float64Type>().value(row).to_bits()
        ),
        DataType::Utf8 => column.as_string::<i32>().value(row).to_owned(),
        other => panic!("unexpected type {other}"),
    }
}

fn aggregate(
    keys: Vec<usize>,
    input: &[RecordBatch],
    budget_pages: usize,
    spill: Option<SpillContext>,
) -> Result<Vec<String>, ExecError> {
    let aggs = aggs();
    let schema = input_schema();
    let output = crate::job::aggregate_output_schema(&schema, &keys, &aggs, false).expect("schema");
    let mut op = AggregateOperator::new(
        "agg",
        &schema,
        keys,
        &aggs,
        output,
        memory(budget_pages),
        spill,
    )?;
    let mut out = Collect::default();
    for batch in input {
        op.process(batch.clone(), &mut out)?;
    }
    op.finish(&mut out)?;
    Ok(rows_of(&out.batches))
}

#[test]
fn aggregation_state_ten_times_the_budget_spills_and_equals_the_in_memory_path() {
    let input = batches(120_000, 30_000, 4096);
    let reference = aggregate(vec![0, 1], &input, 16_384, None).expect("in memory");
    assert_eq!(reference.len(), 30_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = spill_context(dir.path(), sim());
    // 64 pages (256 KiB): the in-memory table holds about 6 MiB.
    let spilled = aggregate(vec![0, 1], &input, 64, Some(spill.clone())).expect("spilling");
    assert_eq!(spilled, reference);
    let metrics = &spill.metrics;
    assert!(metrics.bytes_written.load(Ordering::Relaxed) > 0);
    assert!(metrics.bytes_read.load(Ordering::Relaxed) > 0);
    // Partitions of 30k/16 keys do not fit 64 pages either: a second level.
    assert!(metrics.file_count.load(Ordering::Relaxed) > 1);
    assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
}

#[test]
fn aggregation_spills_through_the_thread_pool_backend() {
    let input = batches(40_000, 10_000, 4096);
    let reference = aggregate(vec![0], &input, 16_384, None).expect("in memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = spill_context(dir.path(), BackendChoice::ThreadPool);
    let spilled = aggregate(vec![0], &input, 24, Some(spill.clone())).expect("spilling");
    assert_eq!(spilled, reference);
    assert!(spill.metrics.file_count.load(Ordering::Relaxed) >= 1);
    assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
}

#[test]
fn aggregation_without_a_spill_context_still_fails_naming_the_key() {
    let input = batches(40_000, 10_000, 4096);
    let err = aggregate(vec![0], &input, 16, None).expect_err("over budget");
    assert!(
        err.to_string()
            .contains("taskmanager.memory.managed.fraction"),
        "{err}"
    );
}

#[test]
fn a_budget_too_small_to_make_progress_is_a_clear_error() {
    let input = batches(10_000, 5_000, 4096);
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = spill_context(dir.path(), sim());
    // Not even the table's first page fits.
    let err = aggregate(vec![0], &input, 0, Some(spill)).expect_err("no progress");
    assert!(err.to_string().contains("cannot make progress"), "{err}");
    assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
}

#[test]
fn enospc_mid_spill_fails_naming_the_file_and_leaves_nothing() {
    let input = batches(120_000, 30_000, 4096);
    let dir = tempfile::tempdir().expect("tempdir");
    let options = SimOptions {
        space_bytes_max: Some(600 << 10),
        ..SimOptions::from_env(3)
    };
    let seed = options.seed;
    let spill = spill_context(dir.path(), BackendChoice::Sim(options));
    let err = aggregate(vec![0, 1], &input, 64, Some(spill)).expect_err("ENOSPC");
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            ExecError::Spill {
                source: IoError::NoSpace { .. },
                ..
            }
        ),
        "{text} seed={seed}"
    );
    assert!(
        text.contains("no space left") && text.contains(&dir.path().display().to_string()),
        "{text}"
    );
    assert!(text.contains("spill-"), "names the file: {text}");
    assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
}

#[test]
fn a_flipped_bit_in_spilled_state_is_a_corrupt_block_never_a_result() {
    let input = batches(60_000, 20_000, 4096);
    let dir = tempfile::tempdir().expect("tempdir");
    let options = SimOptions {
        bit_flip_ppm: 200_000,
        ..SimOptions::from_env(5)
    };
    let seed = options.seed;
    let spill = spill_context(dir.path(), BackendChoice::Sim(options));
    let err = aggregate(vec![0], &input, 32, Some(spill)).expect_err("corrupt");
    assert!(
        matches!(
            &err,
            ExecError::Spill {
                source: IoError::CorruptBlock { .. },
                ..
            }
        ),
        "{err} seed={seed}"
    );
    assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
}

fn windowed(
    input: &[RecordBatch],
    budget_pages: usize,
    spill: Option<SpillContext>,
) -> Result<(Vec<String>, Vec<usize>), ExecError> {
    let aggs = aggs();
    let schema = input_schema();
    let output = crate::job::aggregate_output_schema(&schema, &[0], &aggs, true).expect("schema");
    let mut op = WindowOperator::new(
        "win",
        &schema,
        vec![0],
        4,
        100_000,
        &aggs,
        output,
        memory(budget_pages),
        spill,
    )?;
    let mut out = Collect::default();
    // Rows emitted by the time each watermark was processed: windows must
    // fire at the same points whether they spilled or not.
    let mut emitted_at_watermark = Vec::new();
    for batch in input {
        let ts = batch.column(4).as_primitive::<Int64Type>();
        let watermark = ts.value(ts.len() - 1) - 20_000;
        op.process(batch.clone(), &mut out)?;
        op.watermark(watermark, &mut out)?;
        emitted_at_watermark.push(out.batches.iter().map(RecordBatch::num_rows).sum());
    }
    op.finish(&mut out)?;
    Ok((rows_of(&out.batches), emitted_at_watermark))
}

#[test]
fn window_state_spills_and_fires_with_the_same_watermarks() {
    let input = batches(100_000, 8_000, 2048);
    let reference = windowed(&input, 16_384, None).expect("in memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = spill_context(dir.path(), sim());
    let spilled = windowed(&input, 24, Some(spill.clone())).expect("spilling");
    assert_eq!(spilled, reference);
    assert!(spill.metrics.file_count.load(Ordering::Relaxed) > 1);
    assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
}

pub(super) mod sort {
    use std::cmp::Ordering as CmpOrdering;

    use super::super::sort::{SortColumn, SortOperator};
    use super::*;

    /// Rows with many ties, nulls in every key, NaN, -0.0 and strings that
    /// share prefixes (and one with a NUL byte).
    pub(in crate::exec) fn sort_input(rows: usize, batch_rows: usize) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < rows {
            let end = (start + batch_rows).min(rows);
            let ids: Vec<u64> = (start..end)
                .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20)
                .collect();
            let key: Int64Array = ids
                .iter()
                .map(|&k| (k % 13 != 0).then_some((k % 50) as i64 - 25))
                .collect();
            let name: StringArray = ids
                .iter()
                .map(|&k| match k % 7 {
                    0 => None,
                    1 => Some("b\0x".to_string()),
                    2 => Some("b".to_string()),
                    _ => Some(format!("name-{}", k % 9)),
                })
                .collect();
            let value = Int64Array::from_iter_values(start as i64..end as i64);
            let price: Float64Array = ids
                .iter()
                .map(|&k| match k % 11 {
                    0 => None,
                    1 => Some(f64::NAN),
                    2 => Some(-0.0),
                    3 => Some(0.0),
                    _ => Some((k % 5) as f64 - 2.5),
                })
                .collect();
            let ts = Int64Array::from_iter_values((start..end).map(|i| i as i64));
            let columns: Vec<ArrayRef> = vec![
                Arc::new(key),
                Arc::new(name),
                Arc::new(value),
                Arc::new(price),
                Arc::new(ts),
            ];
            out.push(RecordBatch::try_new(input_schema(), columns).expect("batch"));
            start = end;
        }
        out
    }

    /// `name desc, key, price`: the keys the tests sort by.
    pub(in crate::exec) fn sort_keys() -> Vec<SortColumn> {
        vec![
            SortColumn {
                column: 1,
                descending: true,
            },
            SortColumn {
                column: 0,
                descending: false,
            },
            SortColumn {
                column: 3,
                descending: false,
            },
        ]
    }

    pub(in crate::exec) type Row = (Option<i64>, Option<String>, i64, Option<f64>);

    pub(in crate::exec) fn rows(batches: &[RecordBatch]) -> Vec<Row> {
        let mut rows = Vec::new();
        for b in batches {
            let key = b.column(0).as_primitive::<Int64Type>();
            let name = b.column(1).as_string::<i32>();
            let value = b.column(2).as_primitive::<Int64Type>();
            let price = b.column(3).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                rows.push((
                    key.is_valid(i).then(|| key.value(i)),
                    name.is_valid(i).then(|| name.value(i).to_owned()),
                    value.value(i),
                    price.is_valid(i).then(|| price.value(i)),
                ));
            }
        }
        rows
    }

    /// Nulls last; `descending` reverses everything, so nulls come first.
    fn nulls_last<T>(
        a: &Option<T>,
        b: &Option<T>,
        f: impl Fn(&T, &T) -> CmpOrdering,
    ) -> CmpOrdering {
        match (a, b) {
            (None, None) => CmpOrdering::Equal,
            (None, Some(_)) => CmpOrdering::Greater,
            (Some(_), None) => CmpOrdering::Less,
            (Some(a), Some(b)) => f(a, b),
        }
    }

    fn float_order(a: &f64, b: &f64) -> CmpOrdering {
        match (a.is_nan(), b.is_nan()) {
            (true, true) => CmpOrdering::Equal,
            (true, false) => CmpOrdering::Greater,
            (false, true) => CmpOrdering::Less,
            // -0.0 == 0.0 here, as the sort wants.
            _ => a.partial_cmp(b).expect("not NaN"),
        }
    }

    pub(in crate::exec) fn reference(input: &[RecordBatch]) -> Vec<Row> {
        let mut rows = rows(input);
        rows.sort_by(|a, b| {
            nulls_last(&a.1, &b.1, |x, y| x.as_bytes().cmp(y.as_bytes()))
                .reverse()
                .then_with(|| nulls_last(&a.0, &b.0, Ord::cmp))
                .then_with(|| nulls_last(&a.3, &b.3, float_order))
        });
        rows
    }

    pub(in crate::exec) fn same(a: &[Row], b: &[Row]) -> bool {
        if let Some(i) =
            (0..a.len().min(b.len())).find(|&i| format!("{:?}", a[i]) != format!("{:?}", b[i]))
        {
            eprintln!("first difference at row {i}: {:?} vs {:?}", a[i], b[i]);
        }
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.0 == y.0
                    && x.1 == y.1
                    && x.2 == y.2
                    && match (x.3, y.3) {
                        (Some(p), Some(q)) => p.to_bits() == q.to_bits(),
                        (p, q) => p.is_none() && q.is_none(),
                    }
            })
    }

    fn sorted(
        input: &[RecordBatch],
        budget_pages: usize,
        fan_in: usize,
        spill: Option<SpillContext>,
    ) -> Result<Vec<Row>, ExecError> {
        let mut op = SortOperator::new(
            "sort",
            input_schema(),
            sort_keys(),
            fan_in,
            memory(budget_pages),
            spill,
        )?;
        let mut out = Collect::default();
        for batch in input {
            op.process(batch.clone(), &mut out)?;
        }
        op.finish(&mut out)?;
        Ok(rows(&out.batches))
    }

    #[test]
    fn in_memory_sort_equals_a_stable_std_sort() {
        let input = sort_input(20_000, 3000);
        let expected = reference(&input);
        let got = sorted(&input, 4096, 16, None).expect("in memory");
        assert!(
            same(&got, &expected),
            "in-memory sort differs from std sort"
        );
    }

    #[test]
    fn external_sort_with_multi_pass_merge_equals_a_stable_std_sort() {
        let input = sort_input(60_000, 3000);
        let expected = reference(&input);
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = spill_context(dir.path(), sim());
        // 48 pages of 4 KiB: dozens of runs; fan-in 3 takes several passes.
        let got = sorted(&input, 48, 3, Some(spill.clone())).expect("external");
        assert!(same(&got, &expected), "external sort differs from std sort");
        let files = spill.metrics.file_count.load(Ordering::Relaxed);
        assert!(
            files >= 3,
            "run file and at least two merge passes: {files}"
        );
        assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
    }

    #[test]
    fn external_sort_on_the_thread_pool_backend() {
        let input = sort_input(30_000, 3000);
        let expected = reference(&input);
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = spill_context(dir.path(), BackendChoice::ThreadPool);
        let got = sorted(&input, 32, 16, Some(spill)).expect("external");
        assert!(same(&got, &expected), "external sort differs from std sort");
    }

    #[test]
    fn a_canceled_sort_leaves_no_spill_files() {
        let input = sort_input(30_000, 3000);
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = spill_context(dir.path(), sim());
        let mut op = SortOperator::new(
            "sort",
            input_schema(),
            sort_keys(),
            4,
            memory(32),
            Some(spill),
        )
        .expect("operator");
        let mut out = Collect::default();
        for batch in &input {
            op.process(batch.clone(), &mut out).expect("process");
        }
        assert!(!spill_files_in(dir.path()).is_empty(), "runs were spilled");
        // A canceled task drops its operators without finishing them.
        drop(op);
        assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
    }

    #[test]
    fn enospc_while_spilling_runs_fails_and_leaves_nothing() {
        let input = sort_input(60_000, 3000);
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SimOptions {
            space_bytes_max: Some(256 << 10),
            ..SimOptions::from_env(9)
        };
        let spill = spill_context(dir.path(), BackendChoice::Sim(options));
        let err = sorted(&input, 32, 4, Some(spill)).expect_err("ENOSPC");
        assert!(
            matches!(
                &err,
                ExecError::Spill {
                    source: IoError::NoSpace { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(spill_files_in(dir.path()).is_empty(), "spill files left");
    }
}
