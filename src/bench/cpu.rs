//! CPU: every kernel family the placement model prices (the same
//! measurement as `--calibrate`, at several batch sizes) and every
//! operator (filter, project, hash partition, keyed aggregate, sort), in
//! rows per second on one core. The reference at each batch size is a
//! memcpy of the same batches' bytes in the same run, as rows per second,
//! so the ratio says how far from "just moving the bytes" each one is.

use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::calibrate::{backend_rates, input_batches};
use super::report::{Figure, Size, Unit};
use super::{BenchError, CalibrateOptions, Recorder, Section, best_of};
use crate::exec::ExecError;
use crate::exec::aggregate::AggregateOperator;
use crate::exec::operators::{FilterOperator, Operator, Output, ProjectOperator};
use crate::exec::sort::{SortColumn, SortOperator};
use crate::job::{AggFunc, AggSpec, Expr, NamedExpr};
use crate::kernels::backend::CpuBackend;
use crate::memory::{MemoryManager, PagePool};
use crate::network::partition::HashSplitter;

/// Bytes per input row: an Int64 key and an Int64 value.
const ROW_BYTES: usize = 16;
/// Targets of the hash partition (a parallelism-4 exchange) and its key groups.
const PARTITION_TARGETS: usize = 4;
const MAX_PARALLELISM: u32 = 128;
const PAGE_BYTES: usize = 32 << 10;
const REFERENCE: &str = "memcpy of the same bytes";

pub fn run(recorder: &mut Recorder<'_>) -> Result<(), BenchError> {
    let plan = recorder.plan;
    let options = CalibrateOptions {
        rows: plan.cpu_rows,
        repetitions: plan.repetitions,
    };
    for &batch_rows in &plan.batch_rows {
        recorder.step(&format!("cpu: batches of {batch_rows} rows"));
        let pairs = input_batches(plan.cpu_rows, batch_rows);
        let batches = record_batches(&pairs);
        let memcpy = memcpy_rows_per_s(&pairs, plan.repetitions);
        let size = Size::Rows(batch_rows as u64);
        let mut push = |name: &str, plot: &str, rate: f64| {
            recorder.figure(
                Figure::new(Section::Cpu, name, rate, Unit::RowsPerS)
                    .at(size)
                    .plotted(plot)
                    .against(REFERENCE, memcpy, Unit::RowsPerS),
            );
        };
        let kernels = backend_rates(&CpuBackend, options, &pairs)?;
        push("kernel filter", "cpu-kernels", kernels.filter_rows_per_s);
        push("kernel project", "cpu-kernels", kernels.project_rows_per_s);
        push("kernel hash", "cpu-kernels", kernels.hash_rows_per_s);
        push(
            "kernel aggregate",
            "cpu-kernels",
            kernels.aggregate_rows_per_s,
        );
        for operator in OperatorKind::ALL {
            let seconds = best_of(plan.repetitions, || run_operator(operator, &batches))?;
            push(
                operator.figure_name(),
                "cpu-operators",
                plan.cpu_rows as f64 / seconds,
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum OperatorKind {
    Filter,
    Project,
    HashPartition,
    KeyedAggregate,
    Sort,
}

impl OperatorKind {
    const ALL: [OperatorKind; 5] = [
        OperatorKind::Filter,
        OperatorKind::Project,
        OperatorKind::HashPartition,
        OperatorKind::KeyedAggregate,
        OperatorKind::Sort,
    ];

    fn figure_name(self) -> &'static str {
        match self {
            OperatorKind::Filter => "operator filter",
            OperatorKind::Project => "operator project",
            OperatorKind::HashPartition => "operator hash partition",
            OperatorKind::KeyedAggregate => "operator keyed aggregate",
            OperatorKind::Sort => "operator sort",
        }
    }
}

fn input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("value", DataType::Int64, false),
    ]))
}

fn record_batches(pairs: &[(Int64Array, Int64Array)]) -> Vec<RecordBatch> {
    let schema = input_schema();
    pairs
        .iter()
        .map(|(keys, values)| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(keys.clone()), Arc::new(values.clone())],
            )
            .expect("two Int64 columns match the schema")
        })
        .collect()
}

/// Rows per second of copying each batch's key and value buffers into a
/// scratch buffer: the bytes the operators read, moved and nothing more.
fn memcpy_rows_per_s(pairs: &[(Int64Array, Int64Array)], reps: u32) -> f64 {
    let rows: usize = pairs.iter().map(|(k, _)| k.len()).sum();
    let largest = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut scratch = vec![0i64; 2 * largest];
    let seconds = best_of::<()>(reps, || {
        for (keys, values) in pairs {
            let n = keys.len();
            scratch[..n].copy_from_slice(keys.values());
            scratch[n..2 * n].copy_from_slice(values.values());
            std::hint::black_box(&mut scratch);
        }
        Ok(())
    })
    .unwrap_or(f64::INFINITY);
    debug_assert_eq!(std::mem::size_of::<i64>() * 2, ROW_BYTES);
    rows as f64 / seconds
}

/// Counts what an operator emits and drops it.
#[derive(Default)]
struct CountingOutput {
    rows: u64,
}

impl Output for CountingOutput {
    fn emit(&mut self, batch: RecordBatch) -> Result<(), ExecError> {
        self.rows += batch.num_rows() as u64;
        std::hint::black_box(&batch);
        Ok(())
    }
    fn watermark(&mut self, _watermark: i64) -> Result<(), ExecError> {
        Ok(())
    }
}

/// A slot budget that holds `rows` rows of sorted records or hash-table
/// entries without spilling (the benchmark measures the in-memory path).
fn managed_memory(rows: usize) -> MemoryManager {
    let bytes = (rows * 64 + (4 << 20)).next_multiple_of(PAGE_BYTES) as u64;
    PagePool::new(bytes, PAGE_BYTES).slot_manager(0, bytes)
}

/// Feeds every batch through a fresh operator of `kind`, then finishes it.
fn run_operator(kind: OperatorKind, batches: &[RecordBatch]) -> Result<(), BenchError> {
    let name = kind.figure_name();
    let fail = |source| BenchError::Operator {
        operator: name,
        source,
    };
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut out = CountingOutput::default();
    if let OperatorKind::HashPartition = kind {
        let mut splitter = HashSplitter::new(vec![0]);
        for batch in batches {
            splitter
                .split(batch, MAX_PARALLELISM, PARTITION_TARGETS, |_, piece| {
                    out.rows += piece.num_rows() as u64;
                    std::hint::black_box(&piece);
                    Ok(())
                })
                .map_err(|e| {
                    fail(ExecError::Unsupported {
                        operator: name.into(),
                        detail: e.to_string(),
                    })
                })?;
        }
        assert_eq!(out.rows, rows as u64, "the partition lost rows");
        return Ok(());
    }
    let mut operator = build_operator(kind, rows).map_err(fail)?;
    for batch in batches {
        operator.process(batch.clone(), &mut out).map_err(fail)?;
    }
    operator.finish(&mut out).map_err(fail)?;
    std::hint::black_box(out.rows);
    Ok(())
}

fn build_operator(kind: OperatorKind, rows: usize) -> Result<Box<dyn Operator>, ExecError> {
    let parse = |text: &str| Expr::parse(text).expect("the benchmark's expressions parse");
    let schema = input_schema();
    Ok(match kind {
        OperatorKind::Filter => Box::new(FilterOperator::new("filter", parse("value >= 0"))),
        OperatorKind::Project => {
            let columns = vec![
                NamedExpr {
                    name: "key".into(),
                    expr: parse("key"),
                },
                NamedExpr {
                    name: "shifted".into(),
                    expr: parse("value + key"),
                },
            ];
            let output = Arc::new(Schema::new(vec![
                Field::new("key", DataType::Int64, false),
                Field::new("shifted", DataType::Int64, false),
            ]));
            Box::new(ProjectOperator::new("project", columns, output))
        }
        OperatorKind::KeyedAggregate => {
            let aggs = vec![
                AggSpec {
                    func: AggFunc::Count,
                    column: None,
                    output: "cnt".into(),
                },
                AggSpec {
                    func: AggFunc::Sum,
                    column: Some("value".into()),
                    output: "total".into(),
                },
            ];
            let output =
                crate::job::aggregate_output_schema(&schema, &[0], &aggs, false).map_err(|e| {
                    ExecError::Unsupported {
                        operator: "aggregate".into(),
                        detail: e.to_string(),
                    }
                })?;
            Box::new(AggregateOperator::new(
                "aggregate",
                &schema,
                vec![0],
                &aggs,
                output,
                managed_memory(rows),
                None,
            )?)
        }
        OperatorKind::Sort => Box::new(SortOperator::new(
            "sort",
            schema,
            vec![SortColumn {
                column: 1,
                descending: false,
            }],
            4,
            managed_memory(rows),
            None,
        )?),
        OperatorKind::HashPartition => unreachable!("the hash partition is no operator"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Plan;

    #[test]
    fn every_operator_and_kernel_has_a_figure_per_batch_size() {
        let mut plan = Plan::new(true, 1.0 / 256.0);
        plan.repetitions = 1;
        let progress = indicatif::ProgressBar::hidden();
        let mut recorder = Recorder::new(&plan, &progress);
        run(&mut recorder).unwrap();
        let (figures, _) = recorder.into_parts();
        assert_eq!(figures.len(), plan.batch_rows.len() * 9);
        for figure in &figures {
            assert!(figure.value > 0.0, "{figure:?}");
            assert_eq!(figure.reference.as_ref().unwrap().name, REFERENCE);
        }
    }

    #[test]
    fn operators_see_every_row_and_sort_keeps_them() {
        let batches = record_batches(&input_batches(5000, 1000));
        for kind in OperatorKind::ALL {
            run_operator(kind, &batches).unwrap();
        }
        let mut sort = build_operator(OperatorKind::Sort, 5000).unwrap();
        let mut out = CountingOutput::default();
        for batch in &batches {
            sort.process(batch.clone(), &mut out).unwrap();
        }
        sort.finish(&mut out).unwrap();
        assert_eq!(out.rows, 5000);
    }
}
