//! Sources: datagen, CSV files, Parquet files and Arrow IPC files ([`ipc`]).
//!
//! Every source is split across its subtasks deterministically (datagen by
//! strided row index, CSV by byte ranges aligned to line starts, Parquet by
//! row group, Arrow IPC by ranges of record batches), so that a
//! subtask's output depends only on the job file and its index. That makes
//! every source replayable: its checkpointed offset is the position after
//! the last batch returned (datagen: the local row index; files: the splits
//! read and the rows returned from the next one), and a restored source
//! continues exactly there. A file source's offset names the files it was
//! taken over, so a restore against different files fails, naming the file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_schema::SchemaRef;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder, RowSelection,
};
use parquet::file::metadata::PageIndexPolicy;

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
    list_files_with(path, &[extension])
}

/// As [`list_files`], for files with any of `extensions`.
pub fn list_files_with(path: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>, ExecError> {
    let io = |e: std::io::Error| ExecError::Io {
        path: path.to_owned(),
        source: e,
    };
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let listed = |p: &Path| {
        p.extension()
            .is_some_and(|e| extensions.iter().any(|x| e == *x))
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && listed(p))
        .collect();
    files.sort();
    Ok(files)
}

/// One unit of a file source subtask's share: a byte range of a CSV file
/// (the whole file when it is small), one row group of a Parquet file, or a
/// range of record batches of an Arrow IPC file (the whole file when it is
/// small or a stream). A checkpoint records the subtask's splits by name, so
/// that restoring against other files fails, naming the file, instead of
/// silently skipping the wrong rows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SplitName {
    /// The file's name in the source directory.
    file: String,
    /// The file's length: catches a file rewritten under the same name.
    size_bytes: u64,
    /// The row group, for Parquet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    row_group: Option<usize>,
    /// The byte range `[start, end)`, for a CSV file split in several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<[u64; 2]>,
    /// The record batches `[start, end)`, for an Arrow IPC file split in
    /// several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batches: Option<[usize; 2]>,
}

impl SplitName {
    fn new(path: &Path, row_group: Option<usize>) -> Result<Self, ExecError> {
        let metadata = std::fs::metadata(path).map_err(|e| ExecError::Io {
            path: path.to_owned(),
            source: e,
        })?;
        let file = path.file_name().unwrap_or(path.as_os_str());
        Ok(Self {
            file: file.to_string_lossy().into_owned(),
            size_bytes: metadata.len(),
            row_group,
            bytes: None,
            batches: None,
        })
    }
}

impl std::fmt::Display for SplitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' ({} bytes)", self.file, self.size_bytes)?;
        if let Some(rg) = self.row_group {
            write!(f, " row group {rg}")?;
        }
        if let Some([start, end]) = self.bytes {
            write!(f, " bytes {start}..{end}")?;
        }
        if let Some([start, end]) = self.batches {
            write!(f, " batches {start}..{end}")?;
        }
        Ok(())
    }
}

/// Where a file source subtask stands within its splits.
trait SplitProgress: Copy + serde::Serialize + serde::de::DeserializeOwned {
    /// The splits read to their end.
    fn split_index(&self) -> usize;
    /// How far into the next split, in words (`row 5`); `None` at its start.
    fn within(&self) -> Option<String>;
}

/// Where a CSV or Parquet source subtask stands: `split_index` splits are
/// read, and `rows` rows of the next one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SplitPosition {
    split_index: usize,
    rows: u64,
}

impl SplitProgress for SplitPosition {
    fn split_index(&self) -> usize {
        self.split_index
    }

    fn within(&self) -> Option<String> {
        (self.rows > 0).then(|| format!("row {}", self.rows))
    }
}

/// A file source subtask's checkpointed position, with the splits it was
/// taken against.
#[derive(serde::Serialize, serde::Deserialize)]
struct FileOffset<P> {
    subtask: u32,
    parallelism: u32,
    splits: Vec<SplitName>,
    position: P,
}

/// Which subtask of how many: the identity a file offset must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SubtaskIndex {
    subtask: u32,
    parallelism: u32,
}

fn snapshot_file_offset<P: SplitProgress>(
    operator: &str,
    owner: SubtaskIndex,
    splits: &[SplitName],
    position: P,
) -> Result<Vec<u8>, ExecError> {
    let state = FileOffset {
        subtask: owner.subtask,
        parallelism: owner.parallelism,
        splits: splits.to_vec(),
        position,
    };
    serde_json::to_vec(&state).map_err(|e| state_error(operator, e))
}

/// Reads a checkpointed position and checks that it was taken by this
/// subtask over the same splits that it finds now.
fn restore_file_offset<P: SplitProgress>(
    operator: &str,
    owner: SubtaskIndex,
    splits: &[SplitName],
    state: &[u8],
) -> Result<P, ExecError> {
    let state: FileOffset<P> =
        serde_json::from_slice(state).map_err(|e| state_error(operator, e))?;
    let mismatch = |detail: String| ExecError::State {
        operator: operator.into(),
        detail,
    };
    let checkpointed = SubtaskIndex {
        subtask: state.subtask,
        parallelism: state.parallelism,
    };
    if checkpointed != owner {
        return Err(mismatch(format!(
            "the checkpointed offset belongs to subtask {}/{}, not {}/{}",
            state.subtask, state.parallelism, owner.subtask, owner.parallelism
        )));
    }
    let position = state.position;
    let split_index = position.split_index();
    let at = match state.splits.get(split_index) {
        Some(split) => format!(
            "{} of {split}",
            position.within().unwrap_or_else(|| "the start".to_owned())
        ),
        None => "the end of its files".to_owned(),
    };
    if let Some(difference) = split_difference(&state.splits, splits) {
        return Err(mismatch(format!(
            "cannot restore subtask {}'s position at {at}: {difference}",
            owner.subtask
        )));
    }
    if split_index > splits.len() || (split_index == splits.len() && position.within().is_some()) {
        return Err(mismatch(format!(
            "the checkpointed position (split {split_index}, {}) lies past the subtask's {} \
             splits",
            position.within().unwrap_or_else(|| "its start".to_owned()),
            splits.len()
        )));
    }
    Ok(position)
}

/// The first difference between the splits a checkpoint recorded and the
/// splits found now, in words; `None` when they are the same.
fn split_difference(checkpointed: &[SplitName], found: &[SplitName]) -> Option<String> {
    let count = checkpointed.len().max(found.len());
    (0..count).find_map(|i| match (checkpointed.get(i), found.get(i)) {
        (Some(c), Some(f)) if c == f => None,
        (Some(c), Some(f)) => Some(format!(
            "split {i} was {c} in the checkpoint but is {f} now"
        )),
        (Some(c), None) => Some(format!("{c} (split {i}) is gone now")),
        (None, Some(f)) => Some(format!("{f} (split {i}) is new since the checkpoint")),
        (None, None) => unreachable!("i < max of both lengths"),
    })
}

/// The smallest and largest byte range a CSV file is split into.
const CSV_SPLIT_BYTES_MIN: u64 = 1 << 20;
const CSV_SPLIT_BYTES_MAX: u64 = 32 << 20;

/// The split size for `total_bytes` of CSV over `parallelism` subtasks:
/// about eight splits per subtask, so that round-robin dealing balances
/// them within an eighth, between 1 and 32 MiB (a split's set-up is two
/// small reads; a larger one is no faster to read).
fn csv_split_bytes(total_bytes: u64, parallelism: u32) -> u64 {
    total_bytes
        .div_ceil(u64::from(parallelism.max(1)) * 8)
        .clamp(CSV_SPLIT_BYTES_MIN, CSV_SPLIT_BYTES_MAX)
}

/// One byte range of a CSV file. It holds the lines that start inside it:
/// a reader skips to the first line start at or after `start` and reads
/// through the end of the line that holds byte `end - 1`. Records must not
/// hold line breaks inside quotes (each line is one record).
#[derive(Clone, Debug)]
struct CsvSplit {
    path: PathBuf,
    start: u64,
    end: u64,
    file_bytes: u64,
}

/// The position of the first line start at or after `offset` (the file's
/// length when no line starts there).
fn line_start_at_or_after(file: &mut File, offset: u64, file_bytes: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    if offset == 0 || offset >= file_bytes {
        return Ok(offset.min(file_bytes));
    }
    // A line starts at `offset` when the byte before it ends a line.
    file.seek(SeekFrom::Start(offset - 1))?;
    let mut chunk = [0u8; 8192];
    let mut at = offset - 1;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(file_bytes);
        }
        if let Some(i) = chunk[..n].iter().position(|&b| b == b'\n') {
            return Ok(at + i as u64 + 1);
        }
        at += n as u64;
    }
}

/// A CSV split's records, as a reader over its aligned byte range.
type CsvReader = arrow_csv::Reader<std::io::Take<File>>;

/// CSV files, split into byte ranges aligned to line starts; subtask `s`
/// reads every split `i` with `i % p == s`.
pub struct CsvSource {
    spec: CsvSourceSpec,
    owner: SubtaskIndex,
    /// This subtask's splits in reading order.
    files: Vec<CsvSplit>,
    /// `files` by name, for checkpoints.
    splits: Vec<SplitName>,
    /// The replay offset: splits read, and rows returned from the next one.
    position: SplitPosition,
    /// The reader of `files[position.split_index]`, once opened, and the
    /// byte its records start at.
    reader: Option<(CsvReader, u64)>,
}

impl CsvSource {
    pub fn new(spec: CsvSourceSpec, subtask: u32, parallelism: u32) -> Result<Self, ExecError> {
        Self::with_split_bytes(spec, subtask, parallelism, None)
    }

    /// As [`CsvSource::new`], with splits of `split_bytes` instead of the
    /// size [`csv_split_bytes`] picks.
    pub(crate) fn with_split_bytes(
        spec: CsvSourceSpec,
        subtask: u32,
        parallelism: u32,
        split_bytes: Option<u64>,
    ) -> Result<Self, ExecError> {
        let mut sized = Vec::new();
        for path in list_files(&spec.path, "csv")? {
            let name = SplitName::new(&path, None)?;
            sized.push((path, name));
        }
        let total: u64 = sized.iter().map(|(_, n)| n.size_bytes).sum();
        let split_bytes = split_bytes
            .unwrap_or_else(|| csv_split_bytes(total, parallelism))
            .max(1);
        let mut all = Vec::new();
        for (path, name) in sized {
            let file_bytes = name.size_bytes;
            let pieces = file_bytes.div_ceil(split_bytes).max(1);
            for piece in 0..pieces {
                let start = piece * split_bytes;
                let end = ((piece + 1) * split_bytes).min(file_bytes);
                let mut name = name.clone();
                if pieces > 1 {
                    name.bytes = Some([start, end]);
                }
                let split = CsvSplit {
                    path: path.clone(),
                    start,
                    end: if pieces > 1 { end } else { file_bytes },
                    file_bytes,
                };
                all.push((split, name));
            }
        }
        let (files, splits) = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, x)| x)
            .unzip();
        Ok(Self {
            spec,
            owner: SubtaskIndex {
                subtask,
                parallelism,
            },
            files,
            splits,
            position: SplitPosition::default(),
            reader: None,
        })
    }

    /// Opens `split` past its first `rows_skipped` records; returns the
    /// reader and the byte its records start at. The CSV decoder skips
    /// records without building arrays, so replaying into the middle of a
    /// split costs a parse of the consumed part, not a decode.
    fn open(&self, split: &CsvSplit, rows_skipped: u64) -> Result<(CsvReader, u64), ExecError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = &split.path;
        let read_err = |detail: String| ExecError::Read {
            path: path.to_owned(),
            detail,
        };
        let io = |e: std::io::Error| ExecError::Io {
            path: path.to_owned(),
            source: e,
        };
        let mut file = File::open(path).map_err(io)?;
        let start = line_start_at_or_after(&mut file, split.start, split.file_bytes).map_err(io)?;
        let end = line_start_at_or_after(&mut file, split.end, split.file_bytes).map_err(io)?;
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let body = file.take(end.saturating_sub(start));
        // Only the split at the file's start holds the header line.
        let has_header = self.spec.has_header && start == 0;
        let format = arrow_csv::reader::Format::default().with_header(has_header);
        let mut builder = arrow_csv::ReaderBuilder::new(Arc::clone(&self.spec.schema))
            .with_format(format)
            .with_batch_size(self.spec.batch_size.max(1));
        if let Some(projection) = self.spec.projection() {
            builder = builder.with_projection(projection);
        }
        if rows_skipped > 0 {
            let first = usize::try_from(rows_skipped).map_err(|e| read_err(e.to_string()))?;
            // The decoder adds the header line to both bounds: leave room.
            builder = builder.with_bounds(first, usize::MAX - 1);
        }
        let reader = builder.build(body).map_err(|e| read_err(e.to_string()))?;
        Ok((reader, start))
    }
}

/// The number of lines that end before byte `offset` of `path` (read only
/// when a split's error must say where it is in the whole file).
fn lines_before(path: &Path, offset: u64) -> std::io::Result<u64> {
    use std::io::Read;
    if offset == 0 {
        return Ok(0);
    }
    let mut file = File::open(path)?.take(offset);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += chunk[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

/// `detail` with the number that follows `marker` in it replaced by what
/// `replace` makes of it; `detail` unchanged when there is no such number
/// or `replace` declines.
fn replace_number_after(
    detail: &str,
    marker: &str,
    replace: impl FnOnce(u64) -> Option<String>,
) -> String {
    let Some(at) = detail.find(marker) else {
        return detail.to_owned();
    };
    let digits_at = at + marker.len();
    let digits = detail[digits_at..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    let replaced = detail[digits_at..digits_at + digits]
        .parse::<u64>()
        .ok()
        .and_then(replace);
    match replaced {
        Some(text) => format!(
            "{}{text}{}",
            &detail[..digits_at],
            &detail[digits_at + digits..]
        ),
        None => detail.to_owned(),
    }
}

/// `detail` with the column a CSV value error names by its index ("for
/// column 1") named by the schema instead ("for column 'value'").
pub(crate) fn with_column_name(detail: &str, schema: &SchemaRef) -> String {
    replace_number_after(detail, "for column ", |index| {
        let field = schema.fields().get(usize::try_from(index).ok()?)?;
        Some(format!("'{}'", field.name()))
    })
}

/// `detail` (a CSV decoder's error, redacted) with the line it names as the
/// file's own line: 1-based, the header included, counted from the file's
/// start rather than the split's. The decoder's value errors ("at line N")
/// count from 0 and its record errors ("for line N") from 1, both from the
/// split's first line, so the same file used to get two different numbers.
pub(crate) fn with_file_line(
    error: &arrow_schema::ArrowError,
    detail: &str,
    lines_before: u64,
) -> String {
    let (marker, zero_based) = match error {
        arrow_schema::ArrowError::ParseError(_) => (" at line ", true),
        arrow_schema::ArrowError::CsvError(_) => ("for line ", false),
        _ => return detail.to_owned(),
    };
    replace_number_after(detail, marker, |line| {
        Some((line + lines_before + u64::from(zero_based)).to_string())
    })
}

/// A CSV decoder's error without the data it quotes from the file (the
/// offending value and the whole row): an error reaches whoever submitted
/// the job, who need not be allowed to read the file. What is wrong and
/// where (column, line, expected type) stays.
pub(crate) fn redact_file_data(detail: &str) -> String {
    let mut out = match detail.find("Row data:") {
        Some(at) => detail[..at].trim_end().to_owned(),
        None => detail.to_owned(),
    };
    if let Some(start) = out.find("value '")
        && let Some(len) = out[start + 7..].find("' as type")
    {
        out.replace_range(start..start + 7 + len + 1, "a value");
    }
    out
}

impl Source for CsvSource {
    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError> {
        snapshot_file_offset("csv_source", self.owner, &self.splits, self.position)
    }

    fn restore_offset(&mut self, state: &[u8]) -> Result<(), ExecError> {
        assert!(self.reader.is_none(), "restore_offset after next_batch");
        self.position = restore_file_offset("csv_source", self.owner, &self.splits, state)?;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError> {
        loop {
            let Some(split) = self.files.get(self.position.split_index) else {
                return Ok(None);
            };
            if self.reader.is_none() {
                self.reader = Some(self.open(split, self.position.rows)?);
            }
            let (reader, start) = self.reader.as_mut().expect("opened above");
            match reader.next() {
                Some(Ok(batch)) => {
                    self.position.rows += batch.num_rows() as u64;
                    return Ok(Some(batch));
                }
                Some(Err(e)) => {
                    let start = *start;
                    let detail = redact_file_data(&e.to_string());
                    let detail = with_column_name(&detail, &self.spec.schema);
                    let detail = match lines_before(&split.path, start) {
                        Ok(lines) => with_file_line(&e, &detail, lines),
                        Err(_) => format!("{detail} (lines counted from byte {start})"),
                    };
                    return Err(ExecError::Read {
                        path: split.path.clone(),
                        detail,
                    });
                }
                None => {
                    self.reader = None;
                    self.position = SplitPosition {
                        split_index: self.position.split_index + 1,
                        rows: 0,
                    };
                }
            }
        }
    }
}

/// One row group of a Parquet source subtask's share.
struct RowGroupSplit {
    path: PathBuf,
    row_group: usize,
    row_count: u64,
    /// The rows the page index says may match the pushed-down predicate
    /// (`None`: all).
    selection: Option<RowSelection>,
    /// The file's footer (and page index), read once and shared by its row
    /// groups, so opening a row group does not parse it again.
    metadata: ArrowReaderMetadata,
}

/// Parquet files; row groups are dealt round-robin over subtasks, after
/// those that the pushed-down predicate excludes are left out.
pub struct ParquetSource {
    batch_size: usize,
    /// The columns read (projection pushdown), by name; `None`: all.
    columns: Option<Vec<String>>,
    owner: SubtaskIndex,
    /// This subtask's row groups in reading order.
    row_groups: Vec<RowGroupSplit>,
    /// `row_groups` by name, for checkpoints.
    splits: Vec<SplitName>,
    /// The replay offset: row groups read, and rows returned from the next.
    position: SplitPosition,
    /// The reader of `row_groups[position.split_index]`, once opened.
    reader: Option<ParquetRecordBatchReader>,
    /// Row groups and rows the pushed-down predicate skipped (all subtasks').
    pruned: PruneStats,
}

/// Reader options that load the page index (when the file has one) if
/// `page_index`.
fn reader_options(page_index: bool) -> ArrowReaderOptions {
    let policy = if page_index {
        PageIndexPolicy::Optional
    } else {
        PageIndexPolicy::Skip
    };
    ArrowReaderOptions::new().with_page_index_policy(policy)
}

/// What predicate pushdown skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub row_groups: u64,
    pub rows: u64,
}

impl ParquetSource {
    pub fn new(spec: ParquetSourceSpec, subtask: u32, parallelism: u32) -> Result<Self, ExecError> {
        let mut all = Vec::new();
        let mut pruned = PruneStats::default();
        for path in list_files(&spec.path, "parquet")? {
            let file = File::open(&path).map_err(|e| ExecError::Io {
                path: path.clone(),
                source: e,
            })?;
            let options = reader_options(spec.prune.is_some());
            let file_metadata =
                ArrowReaderMetadata::load(&file, options).map_err(|e| ExecError::Read {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            let metadata = file_metadata.metadata();
            let integer_columns = spec
                .prune
                .as_ref()
                .map(|p| prune::integer_columns(p, file_metadata.schema(), metadata));
            for (row_group, rg) in metadata.row_groups().iter().enumerate() {
                let row_count = u64::try_from(rg.num_rows()).unwrap_or(0);
                let mut selection = None;
                if let (Some(predicate), Some(columns)) = (&spec.prune, &integer_columns) {
                    if !prune::row_group_may_match(predicate, columns, rg) {
                        pruned.row_groups += 1;
                        pruned.rows += row_count;
                        continue;
                    }
                    selection = prune::page_selection(predicate, columns, metadata, row_group);
                    if let Some(s) = &selection {
                        pruned.rows += row_count - s.row_count() as u64;
                    }
                }
                all.push(RowGroupSplit {
                    path: path.clone(),
                    row_group,
                    row_count,
                    selection,
                    metadata: file_metadata.clone(),
                });
            }
        }
        let row_groups: Vec<RowGroupSplit> = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, x)| x)
            .collect();
        let splits = row_groups
            .iter()
            .map(|rg| SplitName::new(&rg.path, Some(rg.row_group)))
            .collect::<Result<_, _>>()?;
        if subtask == 0 && pruned != PruneStats::default() {
            tracing::info!(
                "parquet source {}: the filter's predicate skips {} row group(s) and {} row(s) in all",
                spec.path.display(),
                pruned.row_groups,
                pruned.rows
            );
        }
        Ok(Self {
            batch_size: spec.batch_size.max(1),
            columns: spec.columns,
            owner: SubtaskIndex {
                subtask,
                parallelism,
            },
            row_groups,
            splits,
            position: SplitPosition::default(),
            reader: None,
            pruned,
        })
    }

    /// Row groups and rows the pushed-down predicate skipped, over all of
    /// the source's files.
    pub fn pruned(&self) -> PruneStats {
        self.pruned
    }

    /// Opens one row group past its first `rows_skipped` rows; the reader
    /// skips them by row selection, so whole pages are not decoded. Only
    /// the source's columns are decoded, and only the pages that may match.
    fn open(
        &self,
        split: &RowGroupSplit,
        rows_skipped: u64,
    ) -> Result<ParquetRecordBatchReader, ExecError> {
        let read_err = |detail: String| ExecError::Read {
            path: split.path.clone(),
            detail,
        };
        let file = File::open(&split.path).map_err(|e| ExecError::Io {
            path: split.path.clone(),
            source: e,
        })?;
        let builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, split.metadata.clone());
        let mut builder = builder
            .with_row_groups(vec![split.row_group])
            .with_batch_size(self.batch_size);
        if let Some(columns) = &self.columns {
            let file_schema = builder.schema().clone();
            let mut roots = Vec::with_capacity(columns.len());
            for column in columns {
                match file_schema.index_of(column) {
                    Ok(i) => roots.push(i),
                    Err(_) => {
                        return Err(read_err(format!(
                            "column '{column}', read by the job, is missing from this file"
                        )));
                    }
                }
            }
            roots.sort_unstable();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            builder = builder.with_projection(mask);
        }
        if let Some(selection) = &split.selection {
            builder = builder.with_row_selection(selection.clone());
        }
        if rows_skipped > 0 {
            let offset = usize::try_from(rows_skipped).map_err(|e| read_err(e.to_string()))?;
            builder = builder.with_offset(offset);
        }
        builder.build().map_err(|e| read_err(e.to_string()))
    }
}

impl Source for ParquetSource {
    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError> {
        snapshot_file_offset("parquet_source", self.owner, &self.splits, self.position)
    }

    fn restore_offset(&mut self, state: &[u8]) -> Result<(), ExecError> {
        assert!(self.reader.is_none(), "restore_offset after next_batch");
        let position: SplitPosition =
            restore_file_offset("parquet_source", self.owner, &self.splits, state)?;
        if let Some(split) = self.row_groups.get(position.split_index)
            && position.rows > split.row_count
        {
            return Err(ExecError::State {
                operator: "parquet_source".into(),
                detail: format!(
                    "the checkpointed position, row {}, lies past the {} rows of {}",
                    position.rows, split.row_count, self.splits[position.split_index]
                ),
            });
        }
        self.position = position;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError> {
        loop {
            let Some(split) = self.row_groups.get(self.position.split_index) else {
                return Ok(None);
            };
            if self.reader.is_none() {
                self.reader = Some(self.open(split, self.position.rows)?);
            }
            let reader = self.reader.as_mut().expect("opened above");
            match reader.next() {
                Some(Ok(batch)) => {
                    self.position.rows += batch.num_rows() as u64;
                    return Ok(Some(batch));
                }
                Some(Err(e)) => return Err(parquet_read_error(split, e.to_string())),
                None => {
                    self.reader = None;
                    self.position = SplitPosition {
                        split_index: self.position.split_index + 1,
                        rows: 0,
                    };
                }
            }
        }
    }
}

/// The error for a failed read of a row group: [`ExecError::CorruptPage`]
/// when one of its column chunks does not read page by page (a page
/// checksum mismatch, or a page that does not decode), naming the first
/// such column; else a plain read error. The Arrow reader's error does not
/// say which column it was reading, so the row group is read again, column
/// by column, one page at a time.
fn parquet_read_error(split: &RowGroupSplit, detail: String) -> ExecError {
    match corrupt_column(&split.path, split.row_group) {
        Some(corrupt) => ExecError::CorruptPage {
            path: split.path.clone(),
            row_group: split.row_group,
            column_index: corrupt.column_index,
            column: corrupt.column,
            detail: corrupt.detail,
        },
        None => ExecError::Read {
            path: split.path.clone(),
            detail,
        },
    }
}

/// The first column chunk of a row group whose pages do not read.
struct CorruptColumn {
    column_index: usize,
    column: String,
    detail: String,
}

fn corrupt_column(path: &Path, row_group: usize) -> Option<CorruptColumn> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(File::open(path).ok()?).ok()?;
    let row_group_reader = reader.get_row_group(row_group).ok()?;
    let metadata = row_group_reader.metadata();
    (0..row_group_reader.num_columns()).find_map(|column_index| {
        let failure = match row_group_reader.get_column_page_reader(column_index) {
            Ok(mut pages) => {
                std::iter::from_fn(|| pages.get_next_page().transpose()).find_map(Result::err)?
            }
            Err(e) => e,
        };
        Some(CorruptColumn {
            column_index,
            column: metadata.column(column_index).column_path().string(),
            detail: failure.to_string(),
        })
    })
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

pub mod ipc;
mod prune;

pub use ipc::ArrowIpcSource;

#[cfg(test)]
mod tests;
