//! Criterion benches of the pipeline's stages, one at a time: CSV and
//! Parquet scans (one split of a 200k-row file), the filter, the stable
//! hash, hash partitioning for `key_by`, the paged-hash-table aggregation,
//! Arrow IPC framing for the wire, and the CSV and Parquet sinks.
//!
//!   cargo bench --bench pipeline

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

/// The datagen rows `0..rows` (key, value, price, ts) as one batch.
fn datagen_batch(rows: u64) -> RecordBatch {
    use strata::exec::source::datagen_row;
    let spec = strata::job::DatagenSpec::new(rows, 100_000, 7);
    let r: Vec<_> = (0..rows).map(|i| datagen_row(&spec, i)).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(r.iter().map(|r| r.key))),
        Arc::new(Int64Array::from_iter_values(r.iter().map(|r| r.value))),
        Arc::new(arrow_array::Float64Array::from_iter_values(
            r.iter().map(|r| r.price),
        )),
        Arc::new(Int64Array::from_iter_values(r.iter().map(|r| r.ts))),
    ];
    RecordBatch::try_from_iter(["key", "value", "price", "ts"].into_iter().zip(columns))
        .expect("batch")
}

const SCAN_ROWS: u64 = 200_000;

fn scan(c: &mut Criterion) {
    use strata::exec::source::{CsvSource, ParquetSource, Source};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = datagen_batch(SCAN_ROWS);
    let csv_dir = dir.path().join("csv");
    std::fs::create_dir_all(&csv_dir).expect("mkdir");
    let file = std::fs::File::create(csv_dir.join("a.csv")).expect("create");
    let mut w = arrow_csv::WriterBuilder::new()
        .with_header(true)
        .build(file);
    w.write(&data).expect("write csv");
    drop(w);
    let pq_dir = dir.path().join("parquet");
    std::fs::create_dir_all(&pq_dir).expect("mkdir");
    let file = std::fs::File::create(pq_dir.join("a.parquet")).expect("create");
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, data.schema(), Some(props)).expect("w");
    w.write(&data).expect("write parquet");
    w.close().expect("close");
    let drain = |source: &mut dyn Source| {
        let mut rows = 0;
        while let Some(b) = source.next_batch().expect("read") {
            rows += b.num_rows();
        }
        assert_eq!(rows as u64, SCAN_ROWS);
    };
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Elements(SCAN_ROWS));
    g.sample_size(10);
    let csv = strata::job::CsvSourceSpec {
        path: csv_dir,
        has_header: true,
        schema: data.schema(),
        batch_size: 8192,
        watermark: None,
        columns: None,
    };
    g.bench_function("csv/all-columns", |bench| {
        bench.iter(|| drain(&mut CsvSource::new(csv.clone(), 0, 1).expect("csv")))
    });
    let projected = strata::job::CsvSourceSpec {
        columns: Some(vec!["key".into(), "value".into(), "price".into()]),
        ..csv.clone()
    };
    g.bench_function("csv/3-of-4-columns", |bench| {
        bench.iter(|| drain(&mut CsvSource::new(projected.clone(), 0, 1).expect("csv")))
    });
    let parquet = strata::job::ParquetSourceSpec {
        path: pq_dir,
        schema: data.schema(),
        batch_size: 8192,
        watermark: None,
        columns: None,
        prune: None,
    };
    g.bench_function("parquet/all-columns", |bench| {
        bench.iter(|| drain(&mut ParquetSource::new(parquet.clone(), 0, 1).expect("parquet")))
    });
    let projected = strata::job::ParquetSourceSpec {
        columns: Some(vec!["key".into(), "value".into(), "price".into()]),
        ..parquet.clone()
    };
    g.bench_function("parquet/3-of-4-columns", |bench| {
        bench.iter(|| drain(&mut ParquetSource::new(projected.clone(), 0, 1).expect("parquet")))
    });
    g.finish();
}

fn filter(c: &mut Criterion) {
    use strata::exec::operators::{FilterOperator, Operator};
    let data = datagen_batch(8192);
    let predicate = strata::job::Expr::parse("value >= 10").expect("predicate");
    let mut op = FilterOperator::new("bench", predicate);
    let mut g = c.benchmark_group("exec/filter");
    g.throughput(Throughput::Elements(8192));
    g.bench_function("value>=10/rows=8192", |bench| {
        bench.iter(|| op.process(data.clone(), &mut Discard).expect("filter"))
    });
    g.finish();
}

fn hash_partition(c: &mut Criterion) {
    let data = datagen_batch(8192);
    let mut splitter = strata::network::HashSplitter::new(vec![0]);
    let mut g = c.benchmark_group("network/hash-partition");
    g.throughput(Throughput::Elements(8192));
    g.bench_function("targets=4/rows=8192", |bench| {
        bench.iter(|| {
            let mut rows = 0;
            splitter
                .split(&data, 128, 4, |_, piece| {
                    rows += piece.num_rows();
                    Ok(())
                })
                .expect("split");
            assert_eq!(rows, 8192);
        })
    });
    g.finish();
}

fn sinks(c: &mut Criterion) {
    use strata::exec::operators::Operator;
    use strata::exec::sink::{CsvSink, ParquetSink};
    let data = datagen_batch(8192);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("sink");
    g.throughput(Throughput::Elements(8192));
    let mut csv = CsvSink::new(&dir.path().join("csv"), 0, data.schema()).expect("csv sink");
    g.bench_function("csv/rows=8192", |bench| {
        bench.iter(|| csv.process(data.clone(), &mut Discard).expect("write"))
    });
    let mut parquet =
        ParquetSink::new(&dir.path().join("parquet"), 0, data.schema()).expect("parquet sink");
    g.bench_function("parquet/rows=8192", |bench| {
        bench.iter(|| parquet.process(data.clone(), &mut Discard).expect("write"))
    });
    g.finish();
}

criterion_group!(
    benches,
    scan,
    filter,
    hash,
    hash_partition,
    aggregate,
    ipc,
    sinks
);
criterion_main!(benches);
