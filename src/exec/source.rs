//! Sources: datagen, CSV files and Parquet files.
//!
//! Every source is split across its subtasks deterministically (datagen by
//! strided row index, files by file, Parquet by row group), so that a
//! subtask's output depends only on the job file and its index — the basis
//! for replay from an offset when checkpoints arrive.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::ExecError;
use crate::job::{CsvSourceSpec, DatagenSpec, ParquetSourceSpec, WatermarkSpec, datagen_schema};
use crate::kernels::cpu::hash::fmix64;

/// A subtask's share of a source.
pub trait Source: Send {
    /// The next batch, or `None` at the end.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError>;
    /// Rows this subtask will produce, when known.
    fn rows_expected(&self) -> Option<u64> {
        None
    }
    /// The position after the last batch returned: a checkpoint's source
    /// state. Restoring it makes the source continue with the next batch.
    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError>;
    /// Continues from a position [`Source::snapshot_offset`] returned, before
    /// the first `next_batch`.
    fn restore_offset(&mut self, state: &[u8]) -> Result<(), ExecError>;
}

/// One datagen row, as a pure function of the seed and the global row index:
/// tests recompute a job's reference result from this.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DatagenRow {
    pub key: i64,
    pub value: i64,
    pub price: f64,
    pub ts: i64,
}

const K_KEY: u64 = 0xA076_1D64_78BD_642F;
const K_VALUE: u64 = 0xE703_7ED1_A0B4_28DB;
const K_PRICE: u64 = 0x8EBC_6AF0_9C88_C6E3;
const K_TS: u64 = 0x5899_65CC_7537_4CC3;

#[inline]
fn draw(seed: u64, index: u64, stream: u64) -> u64 {
    fmix64(seed ^ fmix64(index.wrapping_mul(stream) ^ stream))
}

/// The row at global index `index` of a datagen source.
#[inline]
pub fn datagen_row(spec: &DatagenSpec, index: u64) -> DatagenRow {
    let key = (draw(spec.seed, index, K_KEY) % spec.keys.max(1)) as i64;
    let value = (draw(spec.seed, index, K_VALUE) % 1000) as i64;
    let price = (draw(spec.seed, index, K_PRICE) >> 11) as f64 / (1u64 << 53) as f64 * 100.0;
    let lateness = if spec.ts_disorder_ms > 0 {
        (draw(spec.seed, index, K_TS) % (spec.ts_disorder_ms as u64 + 1)) as i64
    } else {
        0
    };
    let ts = (index as i64).saturating_mul(spec.ts_step_ms) - lateness;
    DatagenRow {
        key,
        value,
        price,
        ts,
    }
}

/// Datagen: subtask `s` of `p` produces global rows `s, s+p, s+2p, …`, so
/// event time advances evenly on every subtask.
pub struct DatagenSource {
    spec: DatagenSpec,
    schema: SchemaRef,
    subtask: u64,
    parallelism: u64,
    /// Next local row index (the replay offset).
    offset: u64,
    local_rows: u64,
}

impl DatagenSource {
    pub fn new(spec: DatagenSpec, subtask: u32, parallelism: u32) -> Self {
        let (s, p) = (u64::from(subtask), u64::from(parallelism));
        let local_rows = if spec.rows > s {
            (spec.rows - s).div_ceil(p)
        } else {
            0
        };
        let schema = datagen_schema(&spec.columns);
        Self {
            spec,
            schema,
            subtask: s,
            parallelism: p,
            offset: 0,
            local_rows,
        }
    }

    /// Rows per second this subtask may produce (its share of the limit).
    pub fn rate_limit(&self) -> Option<f64> {
        self.spec
            .rows_per_second
            .map(|r| r as f64 / self.parallelism as f64)
    }
}

impl Source for DatagenSource {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError> {
        if self.offset >= self.local_rows {
            return Ok(None);
        }
        let n = (self.local_rows - self.offset).min(self.spec.batch_size.max(1) as u64) as usize;
        let (mut keys, mut values, mut prices, mut tss) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in 0..n as u64 {
            let global = (self.offset + i) * self.parallelism + self.subtask;
            let row = datagen_row(&self.spec, global);
            keys.push(row.key);
            values.push(row.value);
            prices.push(row.price);
            tss.push(row.ts);
        }
        self.offset += n as u64;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.spec.columns.len());
        let (mut keys, mut values, mut prices, mut tss) =
            (Some(keys), Some(values), Some(prices), Some(tss));
        for c in &self.spec.columns {
            let array: ArrayRef = match c.as_str() {
                "key" => Arc::new(Int64Array::from(keys.take().unwrap_or_default())),
                "value" => Arc::new(Int64Array::from(values.take().unwrap_or_default())),
                "price" => Arc::new(Float64Array::from(prices.take().unwrap_or_default())),
                "ts" => Arc::new(Int64Array::from(tss.take().unwrap_or_default())),
                other => {
                    return Err(ExecError::Unsupported {
                        operator: "datagen".into(),
                        detail: format!("unknown datagen column '{other}'"),
                    });
                }
            };
            columns.push(array);
        }
        Ok(Some(RecordBatch::try_new(
            Arc::clone(&self.schema),
            columns,
        )?))
    }

    fn rows_expected(&self) -> Option<u64> {
        Some(self.local_rows)
    }

    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError> {
        let state = DatagenOffset {
            subtask: self.subtask,
            parallelism: self.parallelism,
            offset: self.offset,
        };
        serde_json::to_vec(&state).map_err(|e| state_error("datagen", e))
    }

    fn restore_offset(&mut self, state: &[u8]) -> Result<(), ExecError> {
        let state: DatagenOffset =
            serde_json::from_slice(state).map_err(|e| state_error("datagen", e))?;
        if (state.subtask, state.parallelism) != (self.subtask, self.parallelism)
            || state.offset > self.local_rows
        {
            return Err(ExecError::State {
                operator: "datagen".into(),
                detail: format!(
                    "checkpointed offset {} of subtask {}/{} does not fit subtask {}/{} with {} rows",
                    state.offset,
                    state.subtask,
                    state.parallelism,
                    self.subtask,
                    self.parallelism,
                    self.local_rows
                ),
            });
        }
        self.offset = state.offset;
        Ok(())
    }
}

/// A datagen subtask's checkpointed position.
#[derive(serde::Serialize, serde::Deserialize)]
struct DatagenOffset {
    subtask: u64,
    parallelism: u64,
    /// Local rows already produced.
    offset: u64,
}

fn state_error(operator: &str, e: impl std::fmt::Display) -> ExecError {
    ExecError::State {
        operator: operator.into(),
        detail: format!("source offset in the checkpoint is unreadable: {e}"),
    }
}

/// Lists the files of a path: the file itself, or the directory's files with
/// the given extension, sorted by name.
pub fn list_files(path: &Path, extension: &str) -> Result<Vec<PathBuf>, ExecError> {
    let io = |e: std::io::Error| ExecError::Io {
        path: path.to_owned(),
        source: e,
    };
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    Ok(files)
}

/// CSV files; subtask `s` reads every file `i` with `i % p == s`.
pub struct CsvSource {
    spec: CsvSourceSpec,
    files: Vec<PathBuf>,
    current: Option<(PathBuf, arrow_csv::Reader<File>)>,
}

impl CsvSource {
    pub fn new(spec: CsvSourceSpec, subtask: u32, parallelism: u32) -> Result<Self, ExecError> {
        let files = list_files(&spec.path, "csv")?
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, f)| f)
            .rev()
            .collect();
        Ok(Self {
            spec,
            files,
            current: None,
        })
    }
}

impl Source for CsvSource {
    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError> {
        Err(ExecError::Unsupported {
            operator: "csv_source".into(),
            detail: "checkpointing this source is not implemented yet".into(),
        })
    }
    fn restore_offset(&mut self, _state: &[u8]) -> Result<(), ExecError> {
        self.snapshot_offset().map(|_| ())
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError> {
        loop {
            if let Some((path, reader)) = &mut self.current {
                match reader.next() {
                    Some(Ok(batch)) => return Ok(Some(batch)),
                    Some(Err(e)) => {
                        return Err(ExecError::Read {
                            path: path.clone(),
                            detail: e.to_string(),
                        });
                    }
                    None => self.current = None,
                }
            }
            let Some(path) = self.files.pop() else {
                return Ok(None);
            };
            let file = File::open(&path).map_err(|e| ExecError::Io {
                path: path.clone(),
                source: e,
            })?;
            let format = arrow_csv::reader::Format::default().with_header(self.spec.has_header);
            let reader = arrow_csv::ReaderBuilder::new(Arc::clone(&self.spec.schema))
                .with_format(format)
                .with_batch_size(self.spec.batch_size.max(1))
                .build(file)
                .map_err(|e| ExecError::Read {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            self.current = Some((path, reader));
        }
    }
}

/// Parquet files; row groups are dealt round-robin over subtasks.
pub struct ParquetSource {
    batch_size: usize,
    /// (file, row group) pairs left to read, last first.
    row_groups: Vec<(PathBuf, usize)>,
    current: Option<(PathBuf, ParquetRecordBatchReader)>,
}

impl ParquetSource {
    pub fn new(spec: ParquetSourceSpec, subtask: u32, parallelism: u32) -> Result<Self, ExecError> {
        let mut all = Vec::new();
        for path in list_files(&spec.path, "parquet")? {
            let file = File::open(&path).map_err(|e| ExecError::Io {
                path: path.clone(),
                source: e,
            })?;
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ExecError::Read {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            for rg in 0..builder.metadata().num_row_groups() {
                all.push((path.clone(), rg));
            }
        }
        let mut row_groups: Vec<_> = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, x)| x)
            .collect();
        row_groups.reverse();
        Ok(Self {
            batch_size: spec.batch_size.max(1),
            row_groups,
            current: None,
        })
    }
}

impl Source for ParquetSource {
    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError> {
        Err(ExecError::Unsupported {
            operator: "parquet_source".into(),
            detail: "checkpointing this source is not implemented yet".into(),
        })
    }
    fn restore_offset(&mut self, _state: &[u8]) -> Result<(), ExecError> {
        self.snapshot_offset().map(|_| ())
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError> {
        loop {
            if let Some((path, reader)) = &mut self.current {
                match reader.next() {
                    Some(Ok(batch)) => return Ok(Some(batch)),
                    Some(Err(e)) => {
                        return Err(ExecError::Read {
                            path: path.clone(),
                            detail: e.to_string(),
                        });
                    }
                    None => self.current = None,
                }
            }
            let Some((path, rg)) = self.row_groups.pop() else {
                return Ok(None);
            };
            let read_err = |e: parquet::errors::ParquetError| ExecError::Read {
                path: path.clone(),
                detail: e.to_string(),
            };
            let file = File::open(&path).map_err(|e| ExecError::Io {
                path: path.clone(),
                source: e,
            })?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(read_err)?
                .with_row_groups(vec![rg])
                .with_batch_size(self.batch_size)
                .build()
                .map_err(read_err)?;
            self.current = Some((path, reader));
        }
    }
}

/// Bounded-out-of-orderness watermarks (Flink's `forBoundedOutOfOrderness`):
/// the watermark trails the largest event time seen by `delay + 1` ms.
pub struct WatermarkGenerator {
    column: usize,
    delay_ms: i64,
    max_seen: i64,
}

impl WatermarkGenerator {
    pub fn new(spec: &WatermarkSpec, schema: &arrow_schema::Schema) -> Result<Self, ExecError> {
        let column = schema
            .index_of(&spec.column)
            .map_err(|_| ExecError::Unsupported {
                operator: "source".into(),
                detail: format!("watermark column '{}' not found", spec.column),
            })?;
        Ok(Self {
            column,
            delay_ms: spec.delay_ms,
            max_seen: i64::MIN,
        })
    }

    /// The largest event time seen (a checkpoint's generator state).
    pub fn max_seen(&self) -> i64 {
        self.max_seen
    }

    /// Continues from a checkpointed [`Self::max_seen`].
    pub fn restore(&mut self, max_seen: i64) {
        self.max_seen = max_seen;
    }

    /// Observes a batch; returns the new watermark if it advanced.
    pub fn observe(&mut self, batch: &RecordBatch) -> Result<Option<i64>, ExecError> {
        let ts = arrow_cast::cast(batch.column(self.column), &arrow_schema::DataType::Int64)?;
        let max = arrow_arith::aggregate::max(ts.as_primitive::<Int64Type>());
        match max {
            Some(m) if m > self.max_seen => {
                self.max_seen = m;
                Ok(Some(m.saturating_sub(self.delay_ms).saturating_sub(1)))
            }
            _ => Ok(None),
        }
    }
}
