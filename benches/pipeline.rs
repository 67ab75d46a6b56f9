//! Criterion benches of the pipeline's hot paths: the stable hash, the
//! paged-hash-table aggregation, and Arrow IPC framing for the wire.

use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use strata::kernels::cpu::hash::hash_columns;
use strata::network::ipc::{ChannelDecoder, ChannelEncoder};

fn batch(rows: usize) -> RecordBatch {
    let keys: ArrayRef = Arc::new(Int64Array::from_iter_values(
        (0..rows as i64).map(|i| (i * 7919) % 100_000),
    ));
    let values: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows as i64));
    RecordBatch::try_from_iter([("key", keys), ("value", values)]).expect("batch")
}

fn hash(c: &mut Criterion) {
    let b = batch(8192);
    let mut out = Vec::new();
    let mut g = c.benchmark_group("kernels/hash");
    g.throughput(Throughput::Elements(8192));
    g.bench_function("int64/rows=8192", |bench| {
        bench.iter(|| hash_columns(&[Arc::clone(b.column(0))], &mut out).expect("hash"))
    });
    g.finish();
}

fn ipc(c: &mut Criterion) {
    let b = batch(8192);
    let bytes = (b.get_array_memory_size()) as u64;
    let mut g = c.benchmark_group("network/ipc");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("encode+decode/segment=32KiB", |bench| {
        bench.iter(|| {
            let mut enc = ChannelEncoder::new(32 * 1024);
            let mut dec = ChannelDecoder::default();
            let mut rows = 0;
            enc.encode(&b, &mut |payload| {
                rows += dec.decode(payload)?.num_rows();
                Ok(())
            })
            .expect("encode");
            assert_eq!(rows, 8192);
        })
    });
    g.finish();
}

/// Collects nothing: the bench measures the aggregation's update path.
struct Discard;

impl strata::exec::operators::Output for Discard {
    fn emit(&mut self, _batch: RecordBatch) -> Result<(), strata::exec::ExecError> {
        Ok(())
    }
    fn watermark(&mut self, _w: i64) -> Result<(), strata::exec::ExecError> {
        Ok(())
    }
}

fn aggregate(c: &mut Criterion) {
    use strata::exec::aggregate::AggregateOperator;
    use strata::exec::operators::Operator;
    use strata::job::{AggFunc, AggSpec};
    let spec = |func, column: Option<&str>, output: &str| AggSpec {
        func,
        column: column.map(str::to_owned),
        output: output.to_owned(),
    };
    let aggs = vec![
        spec(AggFunc::Count, None, "cnt"),
        spec(AggFunc::Sum, Some("value"), "total"),
        spec(AggFunc::Min, Some("value"), "lo"),
        spec(AggFunc::Max, Some("value"), "hi"),
    ];
    let input = batch(8192);
    let schema =
        strata::job::aggregate_output_schema(&input.schema(), &[0], &aggs, false).expect("schema");
    let pool = strata::memory::PagePool::new(256 << 20, 32 * 1024);
    let mut op = AggregateOperator::new(
        "bench",
        &input.schema(),
        vec![0],
        &aggs,
        schema,
        pool.slot_manager(0, 256 << 20),
        None,
    )
    .expect("operator");
    let mut g = c.benchmark_group("exec/aggregate");
    g.throughput(Throughput::Elements(8192));
    g.bench_function("keys=100k/aggs=4/rows=8192", |bench| {
        bench.iter(|| op.process(input.clone(), &mut Discard).expect("process"))
    });
    g.finish();
}

criterion_group!(benches, hash, ipc, aggregate);
criterion_main!(benches);
