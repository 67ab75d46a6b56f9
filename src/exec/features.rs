//! Feature-preparation operators for ML training data (issue 17): seeded
//! sampling, null filling, casts, a seeded bounded shuffle and fixed-size
//! batches here; `bucketize` and `one_hot` in [`encode`], and the `join`
//! with a bounded dimension table in [`join`]. All run on the CPU;
//! `sample` checkpoints its row position, `shuffle` its buffer and
//! generator, and `batch` the rows waiting for a full batch, so a restored
//! task produces what an uninterrupted one does. The encodings and the
//! join hold no checkpoint state (a restored join reads its table again).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, Scalar};
use arrow_schema::{DataType, Schema};
use arrow_select::filter::filter_record_batch;

use super::ExecError;
use super::operators::{Operator, Output};
use crate::job::ScalarValue;
use crate::kernels::cpu::hash::fmix64;

pub mod encode;
pub mod join;

pub use encode::{BucketizeOperator, OneHotOperator};
pub use join::{JoinOperator, JoinOptions};

/// Keeps each row with probability `fraction`: row `n` of subtask `s` is
/// kept when a hash of (seed, s, n) falls below `fraction` of the 64-bit
/// range, so a seed and a parallelism always pick the same rows.
pub struct SampleOperator {
    threshold: u64,
    seed: u64,
    subtask: u32,
    /// Rows this subtask has seen (checkpointed).
    rows_seen: u64,
}

impl SampleOperator {
    pub fn new(fraction: f64, seed: u64, subtask: u32) -> Self {
        let threshold = if fraction >= 1.0 {
            u64::MAX
        } else {
            (fraction * u64::MAX as f64) as u64
        };
        SampleOperator {
            threshold,
            seed,
            subtask,
            rows_seen: 0,
        }
    }

    fn keeps(&self, row: u64) -> bool {
        let h = fmix64(
            fmix64(self.seed ^ 0x9E37_79B9_7F4A_7C15) ^ (u64::from(self.subtask) << 40) ^ row,
        );
        self.threshold == u64::MAX || h < self.threshold
    }
}

impl Operator for SampleOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let first = self.rows_seen;
        self.rows_seen += batch.num_rows() as u64;
        let mask: BooleanArray = (0..batch.num_rows() as u64)
            .map(|i| Some(self.keeps(first + i)))
            .collect();
        let kept = filter_record_batch(&batch, &mask)?;
        if kept.num_rows() > 0 {
            out.emit(kept)?;
        }
        Ok(())
    }

    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        Ok(Some(self.rows_seen.to_le_bytes().to_vec()))
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        if let Some(bytes) = state {
            let bytes: [u8; 8] = bytes.try_into().map_err(|_| ExecError::State {
                operator: "sample".into(),
                detail: format!("a sample's state is 8 bytes, found {}", bytes.len()),
            })?;
            self.rows_seen = u64::from_le_bytes(bytes);
        }
        Ok(())
    }
}

/// Re-chunks its input into batches of exactly `rows` rows; the rows that
/// wait for a full batch are part of its checkpoint, so a restored task
/// cuts the same batches.
pub struct BatchOperator {
    name: String,
    rows: usize,
    schema: arrow_schema::SchemaRef,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
}

impl BatchOperator {
    pub fn new(name: &str, rows: usize, schema: arrow_schema::SchemaRef) -> Self {
        assert!(rows > 0, "the planner refuses a zero batch size");
        BatchOperator {
            name: name.to_owned(),
            rows,
            schema,
            pending: Vec::new(),
            pending_rows: 0,
        }
    }

    /// The waiting rows as one batch, leaving none waiting.
    fn take_pending(&mut self) -> Result<RecordBatch, ExecError> {
        let all = arrow_select::concat::concat_batches(&self.schema, &self.pending)?;
        self.pending.clear();
        self.pending_rows = 0;
        Ok(all)
    }

    fn state_error(&self, detail: String) -> ExecError {
        ExecError::State {
            operator: self.name.clone(),
            detail,
        }
    }
}

impl Operator for BatchOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        if self.pending_rows < self.rows {
            return Ok(());
        }
        let all = self.take_pending()?;
        let mut offset = 0;
        while all.num_rows() - offset >= self.rows {
            out.emit(all.slice(offset, self.rows))?;
            offset += self.rows;
        }
        if offset < all.num_rows() {
            self.pending_rows = all.num_rows() - offset;
            self.pending.push(all.slice(offset, self.pending_rows));
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if self.pending_rows > 0 {
            let rest = self.take_pending()?;
            out.emit(rest)?;
        }
        Ok(())
    }

    /// The waiting rows, as an Arrow IPC stream.
    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        let mut bytes = Vec::new();
        encode_rows(&self.schema, &self.pending, &mut bytes)?;
        Ok(Some(bytes))
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        let Some(bytes) = state else {
            return Ok(());
        };
        self.pending = decode_rows(&self.schema, bytes)
            .map_err(|e| self.state_error(format!("unreadable waiting rows: {e}")))?;
        self.pending_rows = self.pending.iter().map(RecordBatch::num_rows).sum();
        Ok(())
    }
}

/// Appends `rows` (of `schema`) to `bytes` as one Arrow IPC stream: the
/// rows an operator holds back, in its checkpoint.
pub(crate) fn encode_rows(
    schema: &arrow_schema::SchemaRef,
    rows: &[RecordBatch],
    bytes: &mut Vec<u8>,
) -> Result<(), ExecError> {
    let waiting = arrow_select::concat::concat_batches(schema, rows)?;
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(bytes, schema)?;
    writer.write(&waiting)?;
    writer.finish()?;
    Ok(())
}

/// The rows [`encode_rows`] wrote, checked against `schema`.
pub(crate) fn decode_rows(
    schema: &arrow_schema::SchemaRef,
    bytes: &[u8],
) -> Result<Vec<RecordBatch>, String> {
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        if batch.schema() != *schema {
            return Err("the rows have another schema".into());
        }
        rows.push(batch);
    }
    Ok(rows)
}

/// A seeded, bounded shuffle of each subtask's stream: rows wait in a
/// buffer of `buffer_rows` (its bytes held in managed memory); whenever
/// twice that many wait, they are permuted (Fisher–Yates with a
/// splitmix64 stream seeded by the seed and the subtask) and all but
/// `buffer_rows` go out. The same input batches give the same order on
/// every run (after an exchange the arrival order of batches, and so the
/// output, can vary); the buffer and the generator's state are
/// checkpointed.
pub struct ShuffleOperator {
    name: String,
    buffer_rows: usize,
    rng: u64,
    schema: arrow_schema::SchemaRef,
    memory: crate::memory::MemoryManager,
    /// Pages held for the waiting rows' bytes.
    held: Vec<crate::memory::Page>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
}

impl ShuffleOperator {
    pub fn new(
        name: &str,
        buffer_rows: usize,
        seed: u64,
        subtask: u32,
        schema: arrow_schema::SchemaRef,
        memory: crate::memory::MemoryManager,
    ) -> Self {
        ShuffleOperator {
            name: name.to_owned(),
            buffer_rows: buffer_rows.max(1),
            rng: fmix64(seed ^ (u64::from(subtask) << 32) ^ 0x2545_F491_4F6C_DD1D),
            schema,
            memory,
            held: Vec::new(),
            pending: Vec::new(),
            pending_rows: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        fmix64(self.rng)
    }

    /// Holds managed-memory pages for the waiting rows' bytes.
    fn account(&mut self) -> Result<(), ExecError> {
        let bytes: usize = self.pending.iter().map(|b| b.get_array_memory_size()).sum();
        let pages = bytes.div_ceil(self.memory.page_size_bytes());
        if pages > self.held.len() {
            let more = self
                .memory
                .allocate_pages(pages - self.held.len())
                .map_err(|e| ExecError::State {
                    operator: self.name.clone(),
                    detail: format!(
                        "the shuffle buffer of {} rows does not fit managed memory ({e}); lower buffer_rows",
                        self.buffer_rows
                    ),
                })?;
            self.held.extend(more);
        } else {
            self.held.truncate(pages);
        }
        Ok(())
    }

    /// Permutes the waiting rows and emits all but `keep` of them.
    fn release(&mut self, keep: usize, out: &mut dyn Output) -> Result<(), ExecError> {
        let all = arrow_select::concat::concat_batches(&self.schema, &self.pending)?;
        let n = all.num_rows();
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let shuffled =
            arrow_select::take::take_record_batch(&all, &arrow_array::UInt32Array::from(order))?;
        let emit = n - keep.min(n);
        self.pending.clear();
        self.pending_rows = 0;
        if keep > 0 && emit < n {
            self.pending.push(shuffled.slice(emit, n - emit));
            self.pending_rows = n - emit;
        }
        self.account()?;
        if emit > 0 {
            out.emit(shuffled.slice(0, emit))?;
        }
        Ok(())
    }
}

impl Operator for ShuffleOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        self.account()?;
        if self.pending_rows >= 2 * self.buffer_rows {
            self.release(self.buffer_rows, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if self.pending_rows > 0 {
            self.release(0, out)?;
        }
        Ok(())
    }

    /// The generator's state, then the waiting rows as an Arrow IPC stream.
    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        let mut bytes = self.rng.to_le_bytes().to_vec();
        encode_rows(&self.schema, &self.pending, &mut bytes)?;
        Ok(Some(bytes))
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        let Some(bytes) = state else {
            return Ok(());
        };
        let unreadable = |detail: String| ExecError::State {
            operator: self.name.clone(),
            detail: format!("unreadable shuffle state: {detail}"),
        };
        let (rng, rows) = bytes
            .split_first_chunk::<8>()
            .ok_or_else(|| unreadable("shorter than its generator state".into()))?;
        self.rng = u64::from_le_bytes(*rng);
        self.pending = decode_rows(&self.schema, rows).map_err(unreadable)?;
        self.pending_rows = self.pending.iter().map(RecordBatch::num_rows).sum();
        self.account()
    }
}

/// Converts columns to other types; a value that does not convert fails
/// the batch naming the column (`safe = false`: never a silent null).
pub struct CastOperator {
    name: String,
    casts: Vec<(usize, DataType)>,
    output: arrow_schema::SchemaRef,
}

impl CastOperator {
    pub fn new(
        name: &str,
        input: &Schema,
        columns: &[(String, DataType)],
        output: arrow_schema::SchemaRef,
    ) -> Result<Self, ExecError> {
        let casts = columns
            .iter()
            .map(|(column, to)| Ok((input.index_of(column)?, to.clone())))
            .collect::<Result<_, ExecError>>()?;
        Ok(CastOperator {
            name: name.to_owned(),
            casts,
            output,
        })
    }
}

impl Operator for CastOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        let options = arrow_cast::CastOptions {
            safe: false,
            ..Default::default()
        };
        for (index, to) in &self.casts {
            columns[*index] = arrow_cast::cast_with_options(&columns[*index], to, &options)
                .map_err(|e| ExecError::Expression {
                    operator: self.name.clone(),
                    detail: format!(
                        "cannot cast column '{}' to {to}: {e}",
                        self.output.field(*index).name()
                    ),
                })?;
        }
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        out.emit(RecordBatch::try_new_with_options(
            Arc::clone(&self.output),
            columns,
            &options,
        )?)
    }
}

/// Replaces the nulls of some columns with a value.
pub struct FillNullOperator {
    /// Column index and its one-row fill value.
    fills: Vec<(usize, ArrayRef)>,
}

impl FillNullOperator {
    pub fn new(
        name: &str,
        input: &Schema,
        columns: &[String],
        value: &ScalarValue,
    ) -> Result<Self, ExecError> {
        let fills = columns
            .iter()
            .map(|column| {
                let index = input.index_of(column)?;
                let data_type = input.field(index).data_type();
                let fill = match (data_type, value) {
                    (DataType::Float64, ScalarValue::Int64(v)) => {
                        ScalarValue::Float64(*v as f64).to_array(1)
                    }
                    _ => value.to_array(1),
                };
                if fill.data_type() != data_type {
                    return Err(ExecError::Unsupported {
                        operator: name.to_owned(),
                        detail: format!("cannot fill {data_type} column '{column}' with {value}"),
                    });
                }
                Ok((index, fill))
            })
            .collect::<Result<_, ExecError>>()?;
        Ok(FillNullOperator { fills })
    }
}

impl Operator for FillNullOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for (index, fill) in &self.fills {
            let column = &columns[*index];
            if column.null_count() == 0 {
                continue;
            }
            let valid = arrow_arith::boolean::is_not_null(column.as_ref())?;
            columns[*index] =
                arrow_select::zip::zip(&valid, column, &Scalar::new(Arc::clone(fill)))?;
        }
        let schema = Arc::new(Schema::new(
            batch
                .schema()
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let filled = self.fills.iter().any(|(index, _)| *index == i);
                    f.as_ref().clone().with_nullable(f.is_nullable() && !filled)
                })
                .collect::<Vec<_>>(),
        ));
        out.emit(RecordBatch::try_new(schema, columns)?)
    }
}

/// Salt of a split's row hash, so a split never lines up with the key
/// groups of a `key_by` on the same columns.
const SPLIT_SALT: u64 = 0x5851_F42D_4C95_7F2D;

/// The point in `[0, 1)` a row's split columns hash to: the stable key
/// hash (`kernels::cpu::hash`, the one that routes `key_by`), mixed with
/// the split's seed, its top 53 bits as a fraction. It depends only on
/// the row's values, never on the subtask, the parallelism or the run.
pub fn split_point(key_hash: u64, seed: u64) -> f64 {
    let h = fmix64(key_hash ^ fmix64(seed ^ SPLIT_SALT));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// One output of a `split`: keeps the rows whose [`split_point`] falls in
/// `[lo, hi)`.
pub struct SplitSideOperator {
    name: String,
    columns: Vec<usize>,
    seed: u64,
    lo: f64,
    hi: f64,
    hashes: Vec<u64>,
}

impl SplitSideOperator {
    pub fn new(
        name: &str,
        schema: &Schema,
        columns: &[String],
        seed: u64,
        lo: f64,
        hi: f64,
    ) -> Result<Self, ExecError> {
        let columns = columns
            .iter()
            .map(|c| schema.index_of(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SplitSideOperator {
            name: name.to_owned(),
            columns,
            seed,
            lo,
            hi,
            hashes: Vec::new(),
        })
    }
}

impl Operator for SplitSideOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let keys: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|&c| Arc::clone(batch.column(c)))
            .collect();
        crate::kernels::cpu::hash::hash_columns(&keys, &mut self.hashes).map_err(|e| {
            ExecError::Unsupported {
                operator: self.name.clone(),
                detail: e.to_string(),
            }
        })?;
        let mask: BooleanArray = self
            .hashes
            .iter()
            .map(|&h| {
                let u = split_point(h, self.seed);
                Some(u >= self.lo && u < self.hi)
            })
            .collect();
        let kept = filter_record_batch(&batch, &mask)?;
        if kept.num_rows() > 0 {
            out.emit(kept)?;
        }
        Ok(())
    }
}

/// `standardize`: `(x - mean) / std` of each column with the fitted
/// statistics, through the kernel backend's `standardize_apply` (the CPU
/// twin of `kernels/standardize.cu`). Integer columns are converted to
/// Float64 first.
pub struct StandardizeOperator {
    name: String,
    /// Column index and its statistics.
    columns: Vec<(usize, crate::kernels::cpu::standardize::ColumnStats)>,
    output: arrow_schema::SchemaRef,
    backend: Arc<dyn crate::kernels::backend::KernelBackend>,
}

impl StandardizeOperator {
    pub fn new(
        name: &str,
        input: &Schema,
        output: arrow_schema::SchemaRef,
        columns: &[String],
        stats: &std::path::Path,
        backend: Arc<dyn crate::kernels::backend::KernelBackend>,
    ) -> Result<Self, ExecError> {
        let failed = |detail: String| ExecError::State {
            operator: name.to_owned(),
            detail,
        };
        let artifact =
            crate::job::stats::StatsArtifact::read(stats).map_err(|e| failed(e.to_string()))?;
        let fits = artifact
            .columns(stats, columns)
            .map_err(|e| failed(e.to_string()))?;
        let columns = columns
            .iter()
            .zip(fits)
            .map(|(c, fit)| {
                Ok((
                    input.index_of(c)?,
                    crate::kernels::cpu::standardize::ColumnStats {
                        mean: fit.mean,
                        std: fit.std,
                    },
                ))
            })
            .collect::<Result<Vec<_>, ExecError>>()?;
        Ok(StandardizeOperator {
            name: name.to_owned(),
            columns,
            output,
            backend,
        })
    }
}

impl Operator for StandardizeOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let mut arrays: Vec<ArrayRef> = batch.columns().to_vec();
        for &(index, stats) in &self.columns {
            let values = arrow_cast::cast(&arrays[index], &DataType::Float64)?;
            let values = values
                .as_any()
                .downcast_ref::<arrow_array::Float64Array>()
                .ok_or_else(|| ExecError::State {
                    operator: self.name.clone(),
                    detail: "a Float64 cast gave another type".into(),
                })?;
            let z = self.backend.standardize_apply(values, stats).map_err(|e| {
                ExecError::Unsupported {
                    operator: self.name.clone(),
                    detail: e.to_string(),
                }
            })?;
            arrays[index] = Arc::new(z);
        }
        out.emit(RecordBatch::try_new(Arc::clone(&self.output), arrays)?)
    }
}

/// An exact sum of f64 values, independent of the order they come in: each
/// finite value is added as an integer multiple of 2^-1074 into 32-bit
/// limbs, so the fit of a `standardize_fit`, whose single subtask receives
/// its producers' batches interleaved in whatever order the network
/// delivers them, is the same on every run and at every parallelism.
/// Infinities add into an f64 of their own (inf - inf is NaN either way).
#[derive(Clone, Debug, PartialEq)]
pub struct ExactSum {
    limbs: [i64; EXACT_LIMBS],
    adds: u32,
    special: f64,
}

/// Limbs covering every f64 (2^-1074 to 2^1024) plus carry room.
const EXACT_LIMBS: usize = 68;
/// Additions between carry propagations: each adds less than 2^32 to a
/// limb, so an i64 limb holds 2^30 of them.
const EXACT_ADDS_MAX: u32 = 1 << 30;

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum {
            limbs: [0; EXACT_LIMBS],
            adds: 0,
            special: 0.0,
        }
    }
}

impl ExactSum {
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            self.special += x;
            return;
        }
        if x == 0.0 {
            return;
        }
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as i64;
        let fraction = bits & ((1u64 << 52) - 1);
        // x = mantissa * 2^(shift - 1074), shift >= 0.
        let (mantissa, shift) = if exponent == 0 {
            (fraction, 0)
        } else {
            (fraction | (1u64 << 52), exponent - 1)
        };
        let signed = if x < 0.0 {
            -(mantissa as i128)
        } else {
            mantissa as i128
        };
        let limb = (shift / 32) as usize;
        let value = signed << (shift % 32);
        self.limbs[limb] += (value & 0xffff_ffff) as i64;
        self.limbs[limb + 1] += ((value >> 32) & 0xffff_ffff) as i64;
        self.limbs[limb + 2] += (value >> 64) as i64;
        self.adds += 1;
        if self.adds >= EXACT_ADDS_MAX {
            self.normalize();
        }
    }

    /// Adds another sum (two subtasks' partial sums).
    pub fn merge(&mut self, other: &ExactSum) {
        self.normalize();
        let mut other = other.clone();
        other.normalize();
        for (a, b) in self.limbs.iter_mut().zip(other.limbs) {
            *a += b;
        }
        self.special += other.special;
        self.normalize();
    }

    /// Carries into the canonical form: every limb but the top one in
    /// [0, 2^32).
    fn normalize(&mut self) {
        for i in 0..EXACT_LIMBS - 1 {
            let carry = self.limbs[i] >> 32;
            self.limbs[i] -= carry << 32;
            self.limbs[i + 1] += carry;
        }
        self.adds = 0;
    }

    /// The sum as an f64, a function of the exact value alone.
    pub fn value(&self) -> f64 {
        let mut canonical = self.clone();
        canonical.normalize();
        let mut total = 0.0f64;
        for (i, limb) in canonical.limbs.iter().enumerate().rev() {
            if *limb != 0 {
                total += (*limb as f64) * 2f64.powi(32 * i as i32 - 1074);
            }
        }
        total + self.special
    }

    fn to_bytes(&self, out: &mut Vec<u8>) {
        let mut canonical = self.clone();
        canonical.normalize();
        for limb in canonical.limbs {
            out.extend_from_slice(&limb.to_le_bytes());
        }
        out.extend_from_slice(&self.special.to_le_bytes());
    }

    const BYTES: usize = 8 * (EXACT_LIMBS + 1);

    fn from_bytes(bytes: &[u8]) -> ExactSum {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            b
        };
        let mut sum = ExactSum::default();
        for i in 0..EXACT_LIMBS {
            sum.limbs[i] = i64::from_le_bytes(word(i));
        }
        sum.special = f64::from_le_bytes(word(EXACT_LIMBS));
        sum
    }
}

/// One column's exact moments: the values counted are those that are
/// neither null nor NaN (the standardize kernels' rule).
#[derive(Clone, Debug, Default)]
struct ExactMoments {
    sum: ExactSum,
    sum_squares: ExactSum,
    count: u64,
}

/// `standardize_fit`: sums each column's moments exactly over its whole
/// input and writes the artifact at the end of input. Runs as one subtask.
pub struct StandardizeFitSink {
    name: String,
    columns: Vec<(String, usize)>,
    moments: Vec<ExactMoments>,
    rows: u64,
    path: std::path::PathBuf,
}

impl StandardizeFitSink {
    pub fn new(
        name: &str,
        input: &Schema,
        columns: &[String],
        path: &std::path::Path,
    ) -> Result<Self, ExecError> {
        let columns = columns
            .iter()
            .map(|c| Ok((c.clone(), input.index_of(c)?)))
            .collect::<Result<Vec<_>, ExecError>>()?;
        Ok(StandardizeFitSink {
            name: name.to_owned(),
            moments: vec![ExactMoments::default(); columns.len()],
            columns,
            rows: 0,
            path: path.to_owned(),
        })
    }

    fn state_error(&self, detail: String) -> ExecError {
        ExecError::State {
            operator: self.name.clone(),
            detail,
        }
    }
}

impl Operator for StandardizeFitSink {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        self.rows += batch.num_rows() as u64;
        for (i, (_, index)) in self.columns.iter().enumerate() {
            let values = arrow_cast::cast(batch.column(*index), &DataType::Float64)?;
            let values = values.as_primitive::<arrow_array::types::Float64Type>();
            let m = &mut self.moments[i];
            for x in values.iter().flatten().filter(|x| !x.is_nan()) {
                m.sum.add(x);
                m.sum_squares.add(x * x);
                m.count += 1;
            }
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        let columns = self
            .columns
            .iter()
            .zip(&self.moments)
            .map(|((name, _), m)| {
                let stats = crate::kernels::cpu::standardize::Moments {
                    sum: m.sum.value(),
                    sum_squares: m.sum_squares.value(),
                    count: m.count,
                }
                .stats();
                (
                    name.clone(),
                    crate::job::stats::ColumnFit {
                        count: m.count,
                        mean: stats.mean,
                        std: stats.std,
                        variance: stats.std * stats.std,
                    },
                )
            })
            .collect();
        let artifact = crate::job::stats::StatsArtifact {
            format: crate::job::stats::STATS_FORMAT.to_owned(),
            rows: self.rows,
            columns,
        };
        artifact
            .write(&self.path)
            .map_err(|e| self.state_error(e.to_string()))
    }

    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        let mut state = self.rows.to_le_bytes().to_vec();
        for m in &self.moments {
            m.sum.to_bytes(&mut state);
            m.sum_squares.to_bytes(&mut state);
            state.extend_from_slice(&m.count.to_le_bytes());
        }
        Ok(Some(state))
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        let Some(state) = state else { return Ok(()) };
        let per_column = 2 * ExactSum::BYTES + 8;
        let expected = 8 + per_column * self.moments.len();
        if state.len() != expected {
            return Err(self.state_error(format!(
                "a standardize_fit's state is {expected} bytes, found {}",
                state.len()
            )));
        }
        let mut rows = [0u8; 8];
        rows.copy_from_slice(&state[..8]);
        self.rows = u64::from_le_bytes(rows);
        for (i, m) in self.moments.iter_mut().enumerate() {
            let at = &state[8 + i * per_column..8 + (i + 1) * per_column];
            m.sum = ExactSum::from_bytes(&at[..ExactSum::BYTES]);
            m.sum_squares = ExactSum::from_bytes(&at[ExactSum::BYTES..2 * ExactSum::BYTES]);
            let mut count = [0u8; 8];
            count.copy_from_slice(&at[2 * ExactSum::BYTES..]);
            m.count = u64::from_le_bytes(count);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use arrow_schema::Field;

    use super::*;

    type Sink = crate::exec::spill_tests::Collect;

    fn batch(rows: i64) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("v", DataType::Int64, true),
                Field::new("x", DataType::Float64, true),
                Field::new("s", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(
                    (0..rows)
                        .map(|i| (i % 3 != 0).then_some(i))
                        .collect::<Int64Array>(),
                ),
                Arc::new(
                    (0..rows)
                        .map(|i| (i % 4 != 0).then_some(i as f64))
                        .collect::<Float64Array>(),
                ),
                Arc::new(
                    (0..rows)
                        .map(|i| (i % 5 != 0).then(|| format!("s{i}")))
                        .collect::<StringArray>(),
                ),
            ],
        )
        .unwrap()
    }

    fn sampled(fraction: f64, seed: u64, batches: &[RecordBatch]) -> Vec<i64> {
        let mut op = SampleOperator::new(fraction, seed, 1);
        let mut out = Sink::default();
        for b in batches {
            op.process(b.clone(), &mut out).unwrap();
        }
        out.batches
            .iter()
            .flat_map(|b| {
                let v = b.column(1).as_any().downcast_ref::<Float64Array>().unwrap();
                (0..v.len()).map(|i| v.value(i) as i64).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn a_sample_is_reproducible_for_a_seed_and_near_its_fraction() {
        let input: Vec<RecordBatch> = (0..20).map(|_| batch(1000)).collect();
        let a = sampled(0.1, 7, &input);
        assert_eq!(a, sampled(0.1, 7, &input), "same seed, same rows");
        assert_ne!(a, sampled(0.1, 8, &input), "another seed, other rows");
        let kept = a.len() as f64 / 20_000.0;
        assert!((kept - 0.1).abs() < 0.01, "kept {kept}");
        assert_eq!(sampled(1.0, 7, &input).len(), 20_000);
    }

    #[test]
    fn a_restored_sample_draws_the_rows_the_uninterrupted_one_draws() {
        let input: Vec<RecordBatch> = (0..6).map(|_| batch(500)).collect();
        let whole = sampled(0.3, 3, &input);
        let mut first = SampleOperator::new(0.3, 3, 1);
        let mut out = Sink::default();
        for b in &input[..2] {
            first.process(b.clone(), &mut out).unwrap();
        }
        let state = first.snapshot_state(1).unwrap();
        let mut second = SampleOperator::new(0.3, 3, 1);
        second.restore_state(state.as_deref()).unwrap();
        for b in &input[2..] {
            second.process(b.clone(), &mut out).unwrap();
        }
        let rows: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, whole.len());
    }

    #[test]
    fn batches_have_exactly_n_rows_the_last_shorter_and_survive_a_restore() {
        let input: Vec<RecordBatch> = [7i64, 300, 1, 45, 999].iter().map(|&n| batch(n)).collect();
        let total: usize = input.iter().map(RecordBatch::num_rows).sum();
        let schema = input[0].schema();
        let mut whole = BatchOperator::new("b", 64, Arc::clone(&schema));
        let mut out = Sink::default();
        for b in &input {
            whole.process(b.clone(), &mut out).unwrap();
        }
        whole.finish(&mut out).unwrap();
        let sizes: Vec<usize> = out.batches.iter().map(RecordBatch::num_rows).collect();
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&n| n == 64),
            "{sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), total);
        // Interrupted after two inputs, restored from the snapshot.
        let mut first = BatchOperator::new("b", 64, Arc::clone(&schema));
        let mut again = Sink::default();
        for b in &input[..2] {
            first.process(b.clone(), &mut again).unwrap();
        }
        let state = first.snapshot_state(1).unwrap();
        let mut second = BatchOperator::new("b", 64, Arc::clone(&schema));
        second.restore_state(state.as_deref()).unwrap();
        for b in &input[2..] {
            second.process(b.clone(), &mut again).unwrap();
        }
        second.finish(&mut again).unwrap();
        assert_eq!(again.batches, out.batches);
    }

    #[test]
    fn cast_converts_and_a_value_that_does_not_convert_fails_naming_the_column() {
        let input = batch(50);
        let output = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Float64, true),
            Field::new("x", DataType::Utf8, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let mut op = CastOperator::new(
            "c",
            &input.schema(),
            &[
                ("v".into(), DataType::Float64),
                ("x".into(), DataType::Utf8),
            ],
            Arc::clone(&output),
        )
        .unwrap();
        let mut out = Sink::default();
        op.process(input.clone(), &mut out).unwrap();
        let v = out.batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(v.value(4), 4.0);
        assert_eq!(v.null_count(), input.column(0).null_count());
        // Strings that are not numbers do not become nulls.
        let strings = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("x", DataType::Float64, true),
            Field::new("s", DataType::Int64, true),
        ]));
        let mut bad = CastOperator::new(
            "c",
            &input.schema(),
            &[("s".into(), DataType::Int64)],
            strings,
        )
        .unwrap();
        let error = bad.process(input, &mut out).unwrap_err().to_string();
        assert!(error.contains("cannot cast column 's' to Int64"), "{error}");
    }

    fn shuffled(seed: u64, input: &[RecordBatch], cut: Option<usize>) -> Vec<i64> {
        let schema = input[0].schema();
        let memory = crate::memory::PagePool::new(64 << 20, 32 << 10).slot_manager(0, 64 << 20);
        let mut op = ShuffleOperator::new("s", 500, seed, 2, Arc::clone(&schema), memory.clone());
        let mut out = Sink::default();
        for (i, b) in input.iter().enumerate() {
            if cut == Some(i) {
                let state = op.snapshot_state(1).unwrap();
                op = ShuffleOperator::new("s", 500, seed, 2, Arc::clone(&schema), memory.clone());
                op.restore_state(state.as_deref()).unwrap();
            }
            op.process(b.clone(), &mut out).unwrap();
        }
        op.finish(&mut out).unwrap();
        out.batches
            .iter()
            .flat_map(|b| {
                let x = b.column(1).as_any().downcast_ref::<Float64Array>().unwrap();
                (0..x.len())
                    .map(|i| if x.is_null(i) { -1 } else { x.value(i) as i64 })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn a_shuffle_is_a_permutation_reproducible_for_a_seed_and_across_a_restore() {
        let input: Vec<RecordBatch> = (0..8).map(|_| batch(400)).collect();
        let a = shuffled(5, &input, None);
        assert_eq!(a.len(), 3200);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        let mut expected: Vec<i64> = (0..8)
            .flat_map(|_| (0..400).map(|i| if i % 4 == 0 { -1 } else { i }))
            .collect();
        expected.sort_unstable();
        assert_eq!(sorted, expected, "every row once");
        assert_ne!(a[..400], expected[..400], "not the input order");
        assert_eq!(a, shuffled(5, &input, None), "same seed, same order");
        assert_ne!(a, shuffled(6, &input, None), "another seed, another order");
        assert_eq!(a, shuffled(5, &input, Some(5)), "restored mid-stream");
    }

    #[test]
    fn fill_null_replaces_nulls_and_leaves_values() {
        let input = batch(100);
        let mut op = FillNullOperator::new(
            "f",
            &input.schema(),
            &["v".into(), "x".into()],
            &ScalarValue::Int64(-1),
        )
        .unwrap();
        let mut out = Sink::default();
        op.process(input.clone(), &mut out).unwrap();
        let filled = &out.batches[0];
        let v = filled
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let x = filled
            .column(1)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(v.null_count(), 0);
        assert_eq!(x.null_count(), 0);
        assert_eq!(v.value(3), -1);
        assert_eq!(v.value(4), 4);
        assert_eq!(x.value(4), -1.0);
        assert_eq!(filled.column(2).null_count(), input.column(2).null_count());
        assert!(!filled.schema().field(0).is_nullable());
    }

    #[test]
    fn exact_sums_do_not_depend_on_the_order_of_the_values() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut values: Vec<f64> = (0..10_000)
            .map(|i| {
                state = crate::kernels::cpu::hash::fmix64(state.wrapping_add(i));
                let scale = [1e-300, 1e-3, 1.0, 7.5e5, 1e300][(state % 5) as usize];
                (state >> 11) as f64 / (1u64 << 53) as f64
                    * scale
                    * if state & 1 == 0 { -1.0 } else { 1.0 }
            })
            .collect();
        values.extend([0.1, 0.2, -0.3, f64::MIN_POSITIVE, -0.0, 5e-324]);
        let sum = |vals: &[f64]| {
            let mut s = ExactSum::default();
            vals.iter().for_each(|v| s.add(*v));
            s
        };
        let forward = sum(&values);
        values.reverse();
        let backward = sum(&values);
        assert_eq!(forward.value().to_bits(), backward.value().to_bits());
        // Split in two and merged: the same value again.
        let (a, b) = values.split_at(3333);
        let mut merged = sum(b);
        merged.merge(&sum(a));
        assert_eq!(merged.value().to_bits(), forward.value().to_bits());
        // Exact where a running sum is not.
        let mut tricky = ExactSum::default();
        for v in [1e16, 1.0, -1e16] {
            tricky.add(v);
        }
        assert_eq!(tricky.value(), 1.0);
        let mut inf = ExactSum::default();
        inf.add(f64::INFINITY);
        inf.add(1.0);
        assert_eq!(inf.value(), f64::INFINITY);
        // The state round-trips.
        let mut bytes = Vec::new();
        forward.to_bytes(&mut bytes);
        assert_eq!(bytes.len(), ExactSum::BYTES);
        assert_eq!(
            ExactSum::from_bytes(&bytes).value().to_bits(),
            forward.value().to_bits()
        );
    }
}
