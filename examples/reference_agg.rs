//! A hand-written single-threaded baseline for the benchmark jobs: the same
//! filter (`value >= 10`) and keyed aggregation (count, sum, min, max of
//! value, avg of price per key) in one plain loop over a
//! `std::collections::HashMap`, fed by datagen rows (J1), a Parquet file
//! read with the Arrow Parquet reader (J2-Parquet, only the three columns
//! used), or a CSV file read with the Arrow CSV reader (J2-CSV).
//! `scripts/bench_pipeline.sh` prints strata's rates beside this one's.
//!
//!   cargo run --release --example reference_agg -- [ROWS] [KEYS] [SEED]
//!   cargo run --release --example reference_agg -- --parquet FILE
//!   cargo run --release --example reference_agg -- --csv FILE

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use strata::exec::source::datagen_row;
use strata::job::DatagenSpec;

type Groups = HashMap<i64, (i64, i64, i64, i64, f64)>;

#[inline]
fn add(groups: &mut Groups, key: i64, value: i64, price: f64) {
    if value < 10 {
        return;
    }
    let g = groups.entry(key).or_insert((0, 0, i64::MAX, i64::MIN, 0.0));
    g.0 += 1;
    g.1 += value;
    g.2 = g.2.min(value);
    g.3 = g.3.max(value);
    g.4 += price;
}

fn add_batch(groups: &mut Groups, batch: &RecordBatch) {
    let column = |name: &str| batch.column_by_name(name).expect("column present");
    let keys = column("key").as_primitive::<Int64Type>();
    let values = column("value").as_primitive::<Int64Type>();
    let prices = column("price").as_primitive::<Float64Type>();
    for ((k, v), p) in keys
        .values()
        .iter()
        .zip(values.values())
        .zip(prices.values())
    {
        add(groups, *k, *v, *p);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    let mut groups: Groups = HashMap::with_capacity(100_000);
    let mut rows = 0u64;
    let what = match args.first().map(String::as_str) {
        Some("--parquet") => {
            let path = args.get(1).ok_or("--parquet FILE")?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
            let wanted = ["key", "value", "price"];
            let roots: Vec<usize> = builder
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| wanted.contains(&f.name().as_str()))
                .map(|(i, _)| i)
                .collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(8192)
                .build()?;
            for batch in reader {
                let batch = batch?;
                rows += batch.num_rows() as u64;
                add_batch(&mut groups, &batch);
            }
            "Parquet, Arrow reader"
        }
        Some("--csv") => {
            let path = args.get(1).ok_or("--csv FILE")?;
            let schema = Arc::new(Schema::new(vec![
                Field::new("key", DataType::Int64, false),
                Field::new("value", DataType::Int64, false),
                Field::new("price", DataType::Float64, false),
                Field::new("ts", DataType::Int64, false),
            ]));
            let format = arrow_csv::reader::Format::default().with_header(true);
            let reader = arrow_csv::ReaderBuilder::new(schema)
                .with_format(format)
                .with_batch_size(8192)
                .build(File::open(path)?)?;
            for batch in reader {
                let batch = batch?;
                rows += batch.num_rows() as u64;
                add_batch(&mut groups, &batch);
            }
            "CSV, Arrow reader"
        }
        _ => {
            let numbers: Vec<u64> = args
                .iter()
                .filter_map(|a| a.replace('_', "").parse().ok())
                .collect();
            rows = numbers.first().copied().unwrap_or(50_000_000);
            let keys = numbers.get(1).copied().unwrap_or(100_000);
            let seed = numbers.get(2).copied().unwrap_or(42);
            let spec = DatagenSpec::new(rows, keys, seed);
            for i in 0..rows {
                let r = datagen_row(&spec, i);
                add(&mut groups, r.key, r.value, r.price);
            }
            "datagen"
        }
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "reference (1 thread, HashMap, {what}): {rows} rows, {} keys in {secs:.2} s = {:.2} M rows/s",
        groups.len(),
        rows as f64 / secs / 1e6
    );
    Ok(())
}
