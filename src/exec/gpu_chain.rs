//! A chain of filters and projections placed on the GPU, run as one fused
//! program over coalesced batches.
//!
//! The chain's operators stay in the task's chain (their metrics and
//! checkpoint ids do not move): the last one becomes a [`GpuChainOperator`]
//! and the ones before it [`Forward`], so the rows a chain keeps are
//! counted where the chain ends. Input batches are buffered until their
//! device columns reach `taskmanager.gpu.coalesce-bytes`, the oldest has
//! waited `taskmanager.gpu.coalesce-latency` (checked as batches arrive),
//! the input goes idle, a watermark or checkpoint barrier comes, or the
//! input ends; then the whole buffer is one device batch, submitted
//! without waiting ([`KernelBackend::submit_chain`]). Up to
//! `taskmanager.gpu.batches-in-flight` batches (2) are in flight: after a
//! submit the oldest is completed, so batch N+1 is packed and uploaded
//! while batch N computes and comes back, and an idle input, watermark,
//! checkpoint barrier or the end of input completes them all (in order:
//! output order and exactly-once do not change). A completed batch is
//! emitted in slices no longer than the largest input batch, so operators
//! downstream see the batch sizes they were built for.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

use super::ExecError;
use super::operators::{Operator, Output};
use crate::kernels::backend::{KernelBackend, KernelError, Submitted};
use crate::kernels::chain::ChainProgram;

/// When a chain's buffered input becomes a device batch, and how many
/// device batches may be in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalescePolicy {
    pub bytes: u64,
    pub latency: Duration,
    /// `taskmanager.gpu.batches-in-flight`, at least 1.
    pub in_flight: usize,
}

impl Default for CoalescePolicy {
    /// The configuration's defaults.
    fn default() -> Self {
        CoalescePolicy::from_config(&crate::config::Config::default())
    }
}

impl CoalescePolicy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        CoalescePolicy {
            bytes: config.gpu_coalesce_bytes,
            latency: config.gpu_coalesce_latency,
            in_flight: config.gpu_batches_in_flight.max(1) as usize,
        }
    }
}

/// Rows a device batch holds at most: row numbers and block offsets are
/// 32-bit on the device.
const DEVICE_BATCH_ROWS_MAX: usize = 1 << 30;

pub struct GpuChainOperator {
    name: String,
    program: Arc<ChainProgram>,
    kernels: Arc<dyn KernelBackend>,
    policy: CoalescePolicy,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    pending_since: Option<Instant>,
    /// Device batches submitted and not yet waited for, oldest first.
    in_flight: VecDeque<InFlight>,
    emit_rows_max: usize,
    step_metrics: Vec<Arc<crate::metrics::OperatorMetrics>>,
}

/// A submitted device batch, and its input row count (for the metrics).
struct InFlight {
    submitted: Submitted,
    input_rows: u64,
}

impl GpuChainOperator {
    pub fn new(
        name: String,
        program: ChainProgram,
        kernels: Arc<dyn KernelBackend>,
        policy: CoalescePolicy,
    ) -> Self {
        GpuChainOperator {
            name,
            program: Arc::new(program),
            kernels,
            policy,
            pending: Vec::new(),
            pending_rows: 0,
            pending_since: None,
            in_flight: VecDeque::new(),
            emit_rows_max: 1,
            step_metrics: Vec::new(),
        }
    }

    /// The task counted every input row through the chain's operators (the
    /// ones before the last forward them); the device says how many rows
    /// each operator kept, and the difference comes off its `rows_out` and
    /// the next one's `rows_in`.
    fn correct_metrics(&self, step_rows: &[u64], input_rows: u64) {
        if self.step_metrics.len() != step_rows.len() {
            return;
        }
        let last = step_rows.len().saturating_sub(1);
        for (step, &kept) in step_rows.iter().enumerate().take(last) {
            let dropped = input_rows.saturating_sub(kept);
            if dropped > 0 {
                self.step_metrics[step]
                    .rows_out
                    .fetch_sub(dropped, std::sync::atomic::Ordering::Relaxed);
                self.step_metrics[step + 1]
                    .rows_in
                    .fetch_sub(dropped, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The metrics of the chain's operators, in order, for
    /// [`GpuChainOperator::correct_metrics`].
    pub fn with_step_metrics(mut self, metrics: Vec<Arc<crate::metrics::OperatorMetrics>>) -> Self {
        self.step_metrics = metrics;
        self
    }

    /// Device bytes the buffered rows upload (at least a byte per row, so
    /// that a chain of host columns only still coalesces by size).
    fn pending_bytes(&self) -> u64 {
        let per_row = self.program.upload_bytes_per_row().max(1.0);
        (self.pending_rows as f64 * per_row) as u64
    }

    /// Submits the buffered input as one device batch, then waits for the
    /// oldest batches until fewer than `in_flight` remain: with 2, this
    /// batch uploads while the previous one computes and comes back.
    fn run(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if !self.pending.is_empty() {
            let pieces = std::mem::take(&mut self.pending);
            self.pending_rows = 0;
            self.pending_since = None;
            let input_rows = pieces.iter().map(|p| p.num_rows() as u64).sum();
            let submitted = self
                .kernels
                .submit_chain(&self.program, pieces)
                .map_err(|e| self.error(e))?;
            self.in_flight.push_back(InFlight {
                submitted,
                input_rows,
            });
        }
        while self.in_flight.len() >= self.policy.in_flight.max(1) {
            self.complete_oldest(out)?;
        }
        Ok(())
    }

    /// Submits what is buffered and waits for every batch in flight (a
    /// flush, watermark, checkpoint or the end of input).
    fn drain(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.run(out)?;
        while !self.in_flight.is_empty() {
            self.complete_oldest(out)?;
        }
        Ok(())
    }

    fn error(&self, e: KernelError) -> ExecError {
        match e {
            KernelError::Chain(fault) => ExecError::Expression {
                operator: fault.operator,
                detail: fault.detail.to_string(),
            },
            other => ExecError::Expression {
                operator: self.name.clone(),
                detail: other.to_string(),
            },
        }
    }

    /// Waits for the oldest batch in flight and emits its rows.
    fn complete_oldest(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        let Some(InFlight {
            submitted,
            input_rows,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        let result = match submitted {
            Submitted::Done(result) => result,
            Submitted::Pending(pending) => self
                .kernels
                .complete_chain(pending)
                .map_err(|e| self.error(e))?,
        };
        self.correct_metrics(&result.step_rows, input_rows);
        let batch = result.batch;
        let mut offset = 0;
        while offset < batch.num_rows() {
            let length = self.emit_rows_max.min(batch.num_rows() - offset);
            let slice = batch.slice(offset, length);
            match &result.targets {
                Some(targets) => out.emit_routed(slice, &targets[offset..offset + length])?,
                None => out.emit(slice)?,
            }
            offset += length;
        }
        Ok(())
    }
}

impl Operator for GpuChainOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.emit_rows_max = self.emit_rows_max.max(batch.num_rows());
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        let now = Instant::now();
        let since = *self.pending_since.get_or_insert(now);
        if self.pending_bytes() >= self.policy.bytes
            || self.pending_rows >= DEVICE_BATCH_ROWS_MAX
            || now.duration_since(since) >= self.policy.latency
        {
            self.run(out)?;
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: i64, out: &mut dyn Output) -> Result<(), ExecError> {
        self.drain(out)?;
        out.watermark(watermark)
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.drain(out)
    }

    fn flush(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.drain(out)
    }
}

/// An operator of a fused chain other than its last: the chain's program
/// computes it, so it passes batches on.
pub struct Forward;

impl Operator for Forward {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        out.emit(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema, SchemaRef};

    use super::*;
    use crate::exec::operators::{FilterOperator, ProjectOperator};
    use crate::job::{Expr, NamedExpr};
    use crate::kernels::backend::{OffloadStats, TieredKernels};
    use crate::kernels::chain::ChainStep;
    use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
    use crate::kernels::gpu::sim::SimulatedGpuBackend;

    /// Collects what an operator emits.
    type Sink = crate::exec::spill_tests::Collect;

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, true),
            Field::new("value", DataType::Int64, false),
        ]))
    }

    fn batches(count: usize, rows: usize) -> Vec<RecordBatch> {
        (0..count)
            .map(|b| {
                let base = (b * rows) as i64;
                let key: Int64Array = (0..rows as i64)
                    .map(|i| ((base + i) % 7 != 0).then_some((base + i) % 50))
                    .collect();
                let value: Int64Array = (0..rows as i64).map(|i| (base + i) * 3 - 500).collect();
                RecordBatch::try_new(input_schema(), vec![Arc::new(key), Arc::new(value)]).unwrap()
            })
            .collect()
    }

    fn projection() -> Vec<NamedExpr> {
        ["key", "value * 3 as tripled", "value + key as shifted"]
            .iter()
            .map(|t| {
                let (expr, name) = Expr::parse_named(t).unwrap();
                NamedExpr {
                    name: name.unwrap_or_else(|| t.to_string()),
                    expr,
                }
            })
            .collect()
    }

    fn projected_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, true),
            Field::new("tripled", DataType::Int64, true),
            Field::new("shifted", DataType::Int64, true),
        ]))
    }

    /// `scaled` → `large` as one fused program.
    fn chain_program(predicate: &Expr) -> ChainProgram {
        let columns = projection();
        let steps = [
            ChainStep::Project {
                name: "scaled",
                columns: &columns,
            },
            ChainStep::Filter {
                name: "large",
                predicate,
            },
        ];
        ChainProgram::compile(&input_schema(), &steps, &projected_schema()).unwrap()
    }

    /// The chain as the CPU operators run it.
    fn on_cpu(predicate: &Expr, input: &[RecordBatch]) -> Result<RecordBatch, String> {
        let mut project = ProjectOperator::new("scaled", projection(), projected_schema());
        let mut filter = FilterOperator::new("large", predicate.clone());
        let mut projected = Sink::default();
        for batch in input {
            project
                .process(batch.clone(), &mut projected)
                .map_err(|e| e.to_string())?;
        }
        let mut kept = Sink::default();
        for batch in projected.batches {
            filter
                .process(batch, &mut kept)
                .map_err(|e| e.to_string())?;
        }
        Ok(arrow_select::concat::concat_batches(&projected_schema(), &kept.batches).unwrap())
    }

    fn fused(
        predicate: &Expr,
        input: &[RecordBatch],
        budget_bytes: u64,
        coalesce_bytes: u64,
    ) -> (Result<RecordBatch, String>, Arc<OffloadStats>) {
        fused_in_flight(predicate, input, budget_bytes, coalesce_bytes, 2)
    }

    fn fused_in_flight(
        predicate: &Expr,
        input: &[RecordBatch],
        budget_bytes: u64,
        coalesce_bytes: u64,
        in_flight: usize,
    ) -> (Result<RecordBatch, String>, Arc<OffloadStats>) {
        let program = chain_program(predicate);
        let pool = DevicePool::new(PoolConfig::even(budget_bytes, 1)).unwrap();
        let stats = Arc::new(OffloadStats::default());
        let kernels = Arc::new(TieredKernels::new(
            Arc::new(SimulatedGpuBackend::new(pool.slot(0))),
            Arc::clone(&stats),
        ));
        let mut op = GpuChainOperator::new(
            "scaled → large".into(),
            program,
            kernels,
            CoalescePolicy {
                bytes: coalesce_bytes,
                latency: Duration::from_secs(3600),
                in_flight,
            },
        );
        let mut out = Sink::default();
        let run = (|| {
            for batch in input {
                op.process(batch.clone(), &mut out)?;
            }
            op.finish(&mut out)
        })();
        let result = run.map_err(|e| e.to_string()).map(|()| {
            let largest = input.iter().map(RecordBatch::num_rows).max().unwrap_or(0);
            assert!(
                out.batches.iter().all(|b| b.num_rows() <= largest),
                "re-sliced"
            );
            arrow_select::concat::concat_batches(&projected_schema(), &out.batches).unwrap()
        });
        (result, stats)
    }

    #[test]
    fn coalesced_device_batches_equal_the_cpu_operators() {
        let predicate = Expr::parse("tripled > 300 and shifted != 0").unwrap();
        let input = batches(10, 1000);
        let expected = on_cpu(&predicate, &input).unwrap();
        for in_flight in [1, 2, 3] {
            // Three 1000-row batches of two 8-byte columns per device batch.
            let (actual, stats) =
                fused_in_flight(&predicate, &input, 1 << 30, 3 * 1000 * 16, in_flight);
            assert_eq!(actual.unwrap(), expected, "{in_flight} in flight");
            let stats = stats.snapshot();
            assert_eq!(
                stats.chain_batches, 4,
                "10 batches coalesced 3 by 3: {stats:?}"
            );
            assert_eq!(stats.chain_rows, 10_000);
            // Each device input column goes up once per device batch: two
            // columns of 8-byte values, and the nullable key's validity words.
            let validity: u64 = [3000u64, 3000, 3000, 1000]
                .iter()
                .map(|&rows| crate::kernels::chain::bitmap_word_bytes(rows))
                .sum();
            assert_eq!(stats.h2d_bytes, 10_000 * 16 + validity, "{stats:?}");
            assert_eq!(
                stats.syncs, 4,
                "one wait per device batch: the download covers the survivors"
            );
        }
    }

    /// A filter that keeps 1%: the first batch downloads every row (nothing
    /// is known yet), later ones only the predicted survivors, each with
    /// one wait; a batch that suddenly keeps everything waits twice.
    #[test]
    fn a_selective_filter_downloads_the_predicted_survivors_with_one_wait() {
        let predicate = Expr::parse("tripled % 100 = 7 or shifted > 100000000").unwrap();
        let mut input = batches(6, 10_000);
        // The last batch: every row passes `shifted > 100000000`.
        let big: Int64Array = (0..10_000).map(|i| 200_000_000 + i).collect();
        let key: Int64Array = (0..10_000).map(|i| Some(i % 50)).collect();
        input.push(
            RecordBatch::try_new(input_schema(), vec![Arc::new(key), Arc::new(big)]).unwrap(),
        );
        let expected = on_cpu(&predicate, &input).unwrap();
        let (actual, stats) = fused(&predicate, &input, 1 << 30, 10_000 * 16);
        let actual = actual.unwrap();
        assert_eq!(actual, expected);
        let stats = stats.snapshot();
        assert_eq!(stats.chain_batches, 7, "{stats:?}");
        assert_eq!(
            stats.syncs,
            7 + 1,
            "one wait each, two for the jump: {stats:?}"
        );
        // Three Int64 outputs of 8 bytes and their validity words a row.
        let row_bytes = |rows: u64| rows * 24 + 3 * crate::kernels::chain::bitmap_word_bytes(rows);
        let kept_of_first = (expected.num_rows() - 10_000) as u64 / 6;
        // Whole batches come down three times: the first two (submitted
        // before anything was known), and the jump's second download; the
        // other five download about 1.25 × survivors + 1,024 rows.
        let predicted = crate::kernels::chain::predicted_download_rows(10_000, 0.0101);
        assert!(
            stats.d2h_bytes < row_bytes(10_000) * 3 + 5 * row_bytes(predicted) + 5 * 64,
            "the selective batches download about {kept_of_first} rows each, not 10,000: {stats:?}"
        );
        assert!(
            stats.d2h_bytes < 4 * row_bytes(10_000),
            "not 7 whole batches: {stats:?}"
        );
    }

    /// With two batches in flight a batch's rows come out when the next one
    /// is submitted; a flush or a watermark waits for all, in order.
    #[test]
    fn batches_in_flight_come_out_in_order_and_flush_and_watermarks_wait_for_them() {
        let predicate = Expr::parse("tripled > -1000000").unwrap();
        let program = chain_program(&predicate);
        let pool = DevicePool::new(PoolConfig::even(1 << 30, 1)).unwrap();
        let kernels = Arc::new(TieredKernels::new(
            Arc::new(SimulatedGpuBackend::new(pool.slot(0))),
            Arc::default(),
        ));
        let mut op = GpuChainOperator::new(
            "c".into(),
            program,
            kernels,
            CoalescePolicy {
                bytes: 1,
                latency: Duration::from_secs(3600),
                in_flight: 2,
            },
        );
        let input = batches(4, 100);
        let first_key = |b: &RecordBatch| {
            b.column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        };
        let mut out = Sink::default();
        op.process(input[0].clone(), &mut out).unwrap();
        assert!(out.batches.is_empty(), "batch 0 is in flight");
        op.process(input[1].clone(), &mut out).unwrap();
        assert_eq!(out.batches.len(), 1, "batch 1 submitted, batch 0 out");
        op.process(input[2].clone(), &mut out).unwrap();
        assert_eq!(out.batches.len(), 2);
        op.watermark(7, &mut out).unwrap();
        assert_eq!(
            (out.batches.len(), out.watermarks.as_slice()),
            (3, &[7][..])
        );
        op.process(input[3].clone(), &mut out).unwrap();
        op.flush(&mut out).unwrap();
        op.finish(&mut out).unwrap();
        let firsts: Vec<i64> = out.batches.iter().map(first_key).collect();
        let expected: Vec<i64> = input.iter().map(|b| first_key(b) * 3).collect();
        assert_eq!(firsts, expected, "in input order");
        // A device batch still in flight when the operator is dropped
        // gives its device memory back.
        op.process(input[0].clone(), &mut out).unwrap();
        drop(op);
        assert_eq!(pool.slot(0).in_use_bytes(), 0);
    }

    #[test]
    fn a_device_batch_that_does_not_fit_is_split_and_still_equal() {
        let predicate = Expr::parse("tripled > 300 and shifted != 0").unwrap();
        let input = batches(4, 1000);
        let expected = on_cpu(&predicate, &input).unwrap();
        // Everything coalesces into one batch of 4000 rows (~230 KB on the
        // device); the slot holds 90% of 100 KB.
        let (actual, stats) = fused(&predicate, &input, 100_000, 1 << 30);
        assert_eq!(actual.unwrap(), expected);
        let stats = stats.snapshot();
        assert!(stats.oom_splits >= 1, "{stats:?}");
        assert!(stats.d2h_bytes > 3000 * 24, "most rows survive: {stats:?}");
        assert_eq!(stats.cpu_fallback_rows, 0, "{stats:?}");
    }

    #[test]
    fn an_overflow_fails_with_the_cpu_operators_error() {
        let predicate = Expr::parse("tripled * 4611686018427387904 > 0").unwrap();
        let input = batches(3, 1000);
        let expected = on_cpu(&predicate, &input).unwrap_err();
        let (actual, _) = fused(&predicate, &input, 1 << 30, 1 << 30);
        assert_eq!(actual.unwrap_err(), expected);
    }

    #[test]
    fn flush_emits_what_waits_and_nothing_twice() {
        let predicate = Expr::parse("tripled > -1000").unwrap();
        let program = chain_program(&predicate);
        let mut op = GpuChainOperator::new(
            "c".into(),
            program,
            Arc::new(crate::kernels::backend::CpuBackend),
            CoalescePolicy {
                bytes: 1 << 30,
                latency: Duration::from_secs(3600),
                in_flight: 2,
            },
        );
        let mut out = Sink::default();
        for batch in batches(2, 100) {
            op.process(batch, &mut out).unwrap();
        }
        assert!(
            out.batches.is_empty(),
            "held back below the coalescing size"
        );
        op.flush(&mut out).unwrap();
        let rows: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
        assert!(rows > 0);
        op.flush(&mut out).unwrap();
        op.finish(&mut out).unwrap();
        assert_eq!(
            out.batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            rows
        );
    }
}
