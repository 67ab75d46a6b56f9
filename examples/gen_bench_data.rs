//! Writes the input files of the J2 benchmarks (`scripts/bench_pipeline.sh`,
//! `scripts/bench_flink.sh`): the same datagen rows (key, value, price, ts)
//! as one CSV file with a header line and as one Parquet file (snappy, row
//! groups of 1,048,576 rows), from a fixed seed, so every run and every
//! engine reads the same bytes.
//!
//!   cargo run --release --example gen_bench_data -- DIR [ROWS] [KEYS] [SEED]
//!
//! makes `DIR/j2-csv/j2.csv` and `DIR/j2-parquet/j2.parquet`; a file that
//! already exists with the same rows is left alone.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use strata::exec::source::datagen_row;
use strata::job::DatagenSpec;

const BATCH_ROWS: u64 = 65_536;
const ROW_GROUP_ROWS: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: gen_bench_data DIR [ROWS] [KEYS] [SEED]")?,
    );
    let mut numbers = args.map(|a| a.replace('_', "").parse::<u64>());
    let rows = numbers.next().transpose()?.unwrap_or(20_000_000);
    let keys = numbers.next().transpose()?.unwrap_or(100_000);
    let seed = numbers.next().transpose()?.unwrap_or(7);
    let spec = DatagenSpec::new(rows, keys, seed);
    let stamp = format!("{rows} rows, {keys} keys, seed {seed}");
    let csv = dir.join("j2-csv").join("j2.csv");
    let parquet = dir.join("j2-parquet").join("j2.parquet");
    if !up_to_date(&csv, &stamp) {
        write_csv(&csv, &spec)?;
        mark(&csv, &stamp)?;
    }
    if !up_to_date(&parquet, &stamp) {
        write_parquet(&parquet, &spec)?;
        mark(&parquet, &stamp)?;
    }
    println!("{} and {} hold {stamp}", csv.display(), parquet.display());
    Ok(())
}

/// The stamp file beside `path` (outside the source directory's `*.csv` /
/// `*.parquet` pattern) says which rows it holds.
fn stamp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}.rows", name.unwrap_or_default()))
}

fn up_to_date(path: &Path, stamp: &str) -> bool {
    path.exists() && std::fs::read_to_string(stamp_path(path)).is_ok_and(|s| s == stamp)
}

fn mark(path: &Path, stamp: &str) -> std::io::Result<()> {
    std::fs::write(stamp_path(path), stamp)
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("value", DataType::Int64, false),
        Field::new("price", DataType::Float64, false),
        Field::new("ts", DataType::Int64, false),
    ]))
}

/// The rows `first..first + count` as one batch.
fn batch(spec: &DatagenSpec, first: u64, count: u64) -> RecordBatch {
    let rows: Vec<_> = (first..first + count)
        .map(|i| datagen_row(spec, i))
        .collect();
    let columns: Vec<Arc<dyn arrow_array::Array>> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.key))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.value))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.price))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.ts))),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the schema")
}

fn batches(spec: &DatagenSpec) -> impl Iterator<Item = RecordBatch> + '_ {
    (0..spec.rows)
        .step_by(BATCH_ROWS as usize)
        .map(move |first| batch(spec, first, BATCH_ROWS.min(spec.rows - first)))
}

fn create(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    File::create(path)
}

fn write_csv(path: &Path, spec: &DatagenSpec) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = BufWriter::with_capacity(1 << 20, create(path)?);
    let mut writer = arrow_csv::WriterBuilder::new()
        .with_header(true)
        .build(&mut out);
    for b in batches(spec) {
        writer.write(&b)?;
    }
    drop(writer);
    out.flush()?;
    Ok(())
}

fn write_parquet(path: &Path, spec: &DatagenSpec) -> Result<(), Box<dyn std::error::Error>> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut writer = ArrowWriter::try_new(create(path)?, schema(), Some(properties))?;
    for b in batches(spec) {
        writer.write(&b)?;
    }
    writer.close()?;
    Ok(())
}
