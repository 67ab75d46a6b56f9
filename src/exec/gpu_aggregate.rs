//! A keyed aggregate placed on the GPU: its state lives in a device table
//! across batches (`kernels::aggtable`), and the CPU aggregate operator
//! behind it holds what the table drains.
//!
//! Input batches are coalesced as a GPU chain's are (same keys and flush
//! points) and upserted into the table one device batch at a time. Before
//! a batch that could fill the table past half, at every checkpoint
//! barrier, and at the end of input the table is drained: its partial
//! groups go into the host operator, which merges them (`sum` of counts
//! and sums, `min`, `max`) in managed memory and spills to the IOManager
//! when that budget is full, like any aggregate. A snapshot is therefore
//! always the host operator's, and restores on any slot, GPU or not. The
//! table's capacity mirrors the operator's managed-memory budget as device
//! memory; a device that refuses even the smallest table leaves the
//! aggregate on the CPU (the build logs it).

use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;

use super::ExecError;
use super::aggregate::AggregateOperator;
use super::gpu_chain::CoalescePolicy;
use super::operators::{Operator, Output};
use crate::kernels::aggtable::{AggProgram, DeviceAggTable};
use crate::kernels::backend::KernelError;

pub struct GpuAggregateOperator {
    name: String,
    program: Arc<AggProgram>,
    table: Box<dyn DeviceAggTable>,
    /// Merges the drained partials; emits the results.
    host: AggregateOperator,
    policy: CoalescePolicy,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    pending_since: Option<Instant>,
    /// Tables drained into the host operator.
    drains: u64,
}

impl GpuAggregateOperator {
    pub fn new(
        name: &str,
        program: Arc<AggProgram>,
        table: Box<dyn DeviceAggTable>,
        host: AggregateOperator,
        policy: CoalescePolicy,
    ) -> Self {
        GpuAggregateOperator {
            name: name.to_owned(),
            program,
            table,
            host,
            policy,
            pending: Vec::new(),
            pending_rows: 0,
            pending_since: None,
            drains: 0,
        }
    }

    fn device_error(&self, e: KernelError) -> ExecError {
        match e {
            KernelError::Aggregate(a) => ExecError::State {
                operator: self.name.clone(),
                detail: a.to_string(),
            },
            other => ExecError::State {
                operator: self.name.clone(),
                detail: format!("GPU aggregation state lost: {other}"),
            },
        }
    }

    /// The table's groups into the host operator.
    fn drain(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if self.table.groups().map_err(|e| self.device_error(e))? == 0 {
            return Ok(());
        }
        let partials = self.table.drain().map_err(|e| self.device_error(e))?;
        self.drains += 1;
        tracing::debug!(
            operator = %self.name,
            groups = partials.num_rows(),
            drains = self.drains,
            "GPU aggregation table drained into managed memory"
        );
        self.host.process(partials, out)
    }

    /// Upserts the buffered rows, draining first whenever the table could
    /// pass half full (open addressing stays short then).
    fn run(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pieces = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        self.pending_since = None;
        let half = (self.table.capacity() / 2).max(1) as usize;
        // Device batches of at most half the table.
        let mut batch: Vec<RecordBatch> = Vec::new();
        let mut rows = 0;
        for piece in pieces {
            let mut offset = 0;
            while offset < piece.num_rows() {
                let take = (half - rows).min(piece.num_rows() - offset);
                batch.push(piece.slice(offset, take));
                rows += take;
                offset += take;
                if rows == half {
                    self.upsert(&std::mem::take(&mut batch), rows, out)?;
                    rows = 0;
                }
            }
        }
        if rows > 0 {
            self.upsert(&batch, rows, out)?;
        }
        Ok(())
    }

    fn upsert(
        &mut self,
        pieces: &[RecordBatch],
        rows: usize,
        out: &mut dyn Output,
    ) -> Result<(), ExecError> {
        let groups = self.table.groups().map_err(|e| self.device_error(e))?;
        if groups + rows as u64 > self.table.capacity() / 2 {
            self.drain(out)?;
        }
        self.table.upsert(pieces).map_err(|e| self.device_error(e))
    }

    /// Device bytes the buffered rows upload: the key and value columns.
    fn pending_bytes(&self) -> u64 {
        (self.pending_rows as u64) * 8 * (1 + self.program.value_columns().len() as u64)
    }
}

impl Operator for GpuAggregateOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        let now = Instant::now();
        let since = *self.pending_since.get_or_insert(now);
        if self.pending_bytes() >= self.policy.bytes
            || now.duration_since(since) >= self.policy.latency
        {
            self.run(out)?;
        }
        Ok(())
    }

    fn watermark(&mut self, _watermark: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        // Results are final only at the end of input; nothing to forward.
        Ok(())
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.run(out)?;
        self.drain(out)?;
        self.host.finish(out)
    }

    fn flush(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.run(out)
    }

    /// The host operator's state after draining the table (the task
    /// flushed the coalescing buffer just before).
    fn snapshot_state(&mut self, checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        self.drain(&mut Discard)?;
        self.host.snapshot_state(checkpoint)
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        self.host.restore_state(state)
    }
}

/// Where the host operator's output would go while it only merges (an
/// aggregate emits nothing before `finish`).
struct Discard;

impl Output for Discard {
    fn emit(&mut self, _batch: RecordBatch) -> Result<(), ExecError> {
        Ok(())
    }

    fn watermark(&mut self, _watermark: i64) -> Result<(), ExecError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema, SchemaRef};

    use super::*;
    use crate::job::{AggFunc, AggSpec};
    use crate::kernels::backend::{KernelBackend, OffloadStats, TieredKernels};
    use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
    use crate::kernels::gpu::sim::SimulatedGpuBackend;
    use crate::memory::{MemoryManager, PagePool};

    /// Collects what an operator emits.
    type Sink = crate::exec::spill_tests::Collect;

    fn memory() -> MemoryManager {
        PagePool::new(64 << 20, 32 << 10).slot_manager(0, 64 << 20)
    }

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, true),
            Field::new("value", DataType::Int64, true),
        ]))
    }

    fn aggs() -> Vec<AggSpec> {
        let spec = |func, column: Option<&str>, output: &str| AggSpec {
            func,
            column: column.map(str::to_owned),
            output: output.to_owned(),
        };
        vec![
            spec(AggFunc::Count, None, "rows"),
            spec(AggFunc::Count, Some("value"), "values"),
            spec(AggFunc::Sum, Some("value"), "total"),
            spec(AggFunc::Min, Some("value"), "lo"),
            spec(AggFunc::Max, Some("value"), "hi"),
        ]
    }

    fn output_schema() -> SchemaRef {
        crate::job::aggregate_output_schema(&input_schema(), &[0], &aggs(), false).unwrap()
    }

    /// `count` batches of 1000 rows over `keys` keys, some keys and values null.
    fn batches(count: usize, keys: i64, big: bool) -> Vec<RecordBatch> {
        (0..count)
            .map(|b| {
                let base = (b * 1000) as i64;
                let key: Int64Array = (0..1000)
                    .map(|i| ((base + i) % 97 != 0).then_some((base + i) * 7919 % keys))
                    .collect();
                let value: Int64Array = (0..1000)
                    .map(|i| {
                        ((base + i) % 13 != 0).then_some(if big {
                            i64::MAX / 3
                        } else {
                            (base + i) * 31 % 20_001 - 10_000
                        })
                    })
                    .collect();
                RecordBatch::try_new(input_schema(), vec![Arc::new(key), Arc::new(value)]).unwrap()
            })
            .collect()
    }

    fn cpu() -> AggregateOperator {
        AggregateOperator::new(
            "totals",
            &input_schema(),
            vec![0],
            &aggs(),
            output_schema(),
            memory(),
            None,
        )
        .unwrap()
    }

    /// The GPU-placed aggregate over a simulated device whose table has
    /// `capacity` slots, and the slot's counters.
    fn gpu(capacity: u64) -> (GpuAggregateOperator, Arc<OffloadStats>) {
        let program = Arc::new(AggProgram::compile(&input_schema(), &[0], &aggs()).unwrap());
        let pool = DevicePool::new(PoolConfig::even(1 << 30, 1)).unwrap();
        let stats = Arc::new(OffloadStats::default());
        let kernels = TieredKernels::new(
            Arc::new(SimulatedGpuBackend::new(pool.slot(0))),
            Arc::clone(&stats),
        );
        let table = kernels
            .open_agg_table(Arc::clone(&program), capacity)
            .unwrap();
        let host = AggregateOperator::new(
            "totals",
            &program.partial_schema,
            vec![0],
            &program.merge_aggs(&aggs()),
            output_schema(),
            memory(),
            None,
        )
        .unwrap();
        let policy = CoalescePolicy {
            bytes: 48_000,
            latency: Duration::from_secs(3600),
            in_flight: 1,
        };
        (
            GpuAggregateOperator::new("totals", program, table, host, policy),
            stats,
        )
    }

    fn run(op: &mut dyn Operator, input: &[RecordBatch]) -> Result<RecordBatch, String> {
        let mut out = Sink::default();
        for batch in input {
            op.process(batch.clone(), &mut out)
                .map_err(|e| e.to_string())?;
        }
        op.finish(&mut out).map_err(|e| e.to_string())?;
        sorted(&out.batches)
    }

    fn sorted(batches: &[RecordBatch]) -> Result<RecordBatch, String> {
        let all = arrow_select::concat::concat_batches(&output_schema(), batches).unwrap();
        let order = arrow_ord::sort::sort_to_indices(all.column(0), None, None).unwrap();
        Ok(arrow_select::take::take_record_batch(&all, &order).unwrap())
    }

    #[test]
    fn device_state_drained_many_times_equals_the_cpu_aggregate() {
        let input = batches(40, 5_000, false);
        let expected = run(&mut cpu(), &input).unwrap();
        // 5,000 keys through a 4,096-slot table: drained whenever it could
        // pass 2,048 groups.
        let (mut op, _) = gpu(4096);
        let actual = run(&mut op, &input).unwrap();
        assert_eq!(actual, expected);
        assert!(op.drains >= 5, "{} drains", op.drains);
    }

    #[test]
    fn a_snapshot_taken_mid_stream_restores_to_the_same_result() {
        let input = batches(20, 3_000, false);
        let expected = run(&mut cpu(), &input).unwrap();
        let (mut first, _) = gpu(8192);
        let mut out = Sink::default();
        for batch in &input[..9] {
            first.process(batch.clone(), &mut out).unwrap();
        }
        // The task flushes the coalescing buffer before a snapshot.
        first.flush(&mut out).unwrap();
        let state = first.snapshot_state(1).unwrap();
        let (mut second, _) = gpu(8192);
        second.restore_state(state.as_deref()).unwrap();
        let actual = run(&mut second, &input[9..]).unwrap();
        assert_eq!(actual, expected);
    }

    #[test]
    fn a_sum_past_int64_fails_on_the_device_path_as_on_the_cpu() {
        let input = batches(2, 10, true);
        let cpu_error = run(&mut cpu(), &input).unwrap_err();
        let (mut op, _) = gpu(4096);
        let gpu_error = run(&mut op, &input).unwrap_err();
        assert!(cpu_error.contains("overflow"), "{cpu_error}");
        assert!(gpu_error.contains("overflow"), "{gpu_error}");
    }
}
