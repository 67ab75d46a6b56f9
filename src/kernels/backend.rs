//! The `KernelBackend` seam: operators call one interface, and the tier
//! behind it is the CPU twins or the CUDA kernels.
//!
//! A backend takes Arrow arrays and gives back Arrow arrays, so that the
//! buffers handed to a device are owned by the call until its results are
//! back on the host: nothing is lent across a launch. Every backend must
//! return exactly what [`CpuBackend`] returns on the same input; the GPU
//! equality tests (`tests/gpu_kernels.rs`) hold the CUDA backend to that.
//!
//! [`TieredKernels`] is what an operator placed on the GPU holds: a GPU
//! backend whose device-memory refusals it answers by splitting the batch
//! and retrying the halves, and, when a piece still does not fit, by running
//! the CPU twin for that piece and counting it. The CPU fallback is never
//! silent: [`OffloadStats`] feeds the task metrics and the run summary.

use super::health::DeviceSlot;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, BooleanArray, Float64Array, Int64Array, PrimitiveArray};
use arrow_schema::ArrowError;

use super::aggtable::{AggProgram, DeviceAggTable, HostAggTable};
use super::chain::{ChainError, ChainOutput, ChainProgram};
use super::cpu::aggregate::{AggregateError, Group, KeyedArrays, KeyedValues, aggregate_i64};
use super::cpu::column::Column;
use super::cpu::filter::{CmpOp, filter_f64_array, filter_i64_array};
use super::cpu::key_hash::{HashMode, hash_i64_column};
use super::cpu::partition::{PartitionError, Partitioning, Routing, partition_hashes};
use super::cpu::project::{
    ArithOp, ArrayOperand, Operands, ProjectError, project_f64_array, project_i64_array,
};
use super::cpu::standardize::{ColumnStats, fit_column, transform_column};
use super::gpu::GpuError;
use super::gpu::pool::PoolError;
use arrow_array::RecordBatch;

/// Where a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Cpu,
    Gpu,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Cpu => "CPU",
            Tier::Gpu => "GPU",
        })
    }
}

/// Errors of a kernel call, whatever the backend.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Project(#[from] ProjectError),
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// The slot's device budget (or the device itself) cannot hold the
    /// launch's buffers: the caller may split the batch.
    #[error("GPU out of memory: {0}")]
    DeviceOutOfMemory(PoolError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("combining kernel results: {0}")]
    Arrow(#[from] ArrowError),
    /// A fused chain's checked instruction failed on a row: the
    /// evaluator's error, a fault of the data and not of the device.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// The kernels an operator can call, on one tier.
pub trait KernelBackend: Send + Sync {
    fn tier(&self) -> Tier;

    /// One line for logs and the summary: the tier and the device.
    fn describe(&self) -> String;

    /// The selection mask of `array <op> literal` (nulls never selected).
    fn filter_i64(
        &self,
        array: &Int64Array,
        op: CmpOp,
        literal: i64,
    ) -> Result<BooleanArray, KernelError>;

    fn filter_f64(
        &self,
        array: &Float64Array,
        op: CmpOp,
        literal: f64,
    ) -> Result<BooleanArray, KernelError>;

    /// `left <op> right` over Int64; overflow is an error naming the row.
    fn project_i64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Int64Type>>,
    ) -> Result<Int64Array, KernelError>;

    fn project_f64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Float64Type>>,
    ) -> Result<Float64Array, KernelError>;

    /// Hashes one Int64 key column into `hashes` (one per row).
    fn hash_i64(
        &self,
        array: &Int64Array,
        mode: HashMode,
        hashes: &mut [u64],
    ) -> Result<(), KernelError>;

    /// Routes each row by its key hash (`kernels/partition.cu`) and groups
    /// the row indices by partition, in row order inside each partition on
    /// every tier (the CUDA backend sorts each partition's rows on the host,
    /// since the kernel's scatter order is unspecified).
    fn partition_hashes(
        &self,
        hashes: &[u64],
        routing: Routing,
    ) -> Result<Partitioning, KernelError>;

    /// Mean and population std of a Float64 column, ignoring nulls and NaNs,
    /// by the fixed reduction tree of `kernels/standardize.cu` (bit-identical
    /// across tiers).
    fn standardize_fit(&self, array: &Float64Array) -> Result<ColumnStats, KernelError>;

    /// `(x - mean) / std` per row (`standardize_apply`); the nulls are the
    /// input's, a NaN stays NaN and a zero std gives 0.0.
    fn standardize_apply(
        &self,
        array: &Float64Array,
        stats: ColumnStats,
    ) -> Result<Float64Array, KernelError>;

    /// `GROUP BY key` with count, sum, min and max of the values
    /// (`kernels/aggregate.cu`, semantics of `cpu::aggregate`), the groups
    /// sorted by key with the null key first on every tier (the kernel's
    /// group order is unspecified). A sum whose exact total does not fit in
    /// i64 is an error naming the smallest such key.
    fn aggregate_i64(&self, input: KeyedArrays<'_>) -> Result<Vec<Group>, KernelError>;

    /// Runs a fused chain (`kernels::chain`) over `pieces`, the coalesced
    /// input batches (each of the program's input schema), as one device
    /// batch: the surviving rows with the output columns, in input order.
    fn run_chain(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError>;

    /// A keyed aggregation table of `capacity` slots that stays on this
    /// tier across batches (`kernels::aggtable`).
    fn open_agg_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn DeviceAggTable>, KernelError>;

    /// Starts a fused chain over `pieces` as one device batch without
    /// waiting for it: copies and kernels are enqueued, and the host is
    /// free to prepare the next batch while the device works. A backend
    /// without a device (and the default) runs it at once. The result is
    /// [`KernelBackend::complete_chain`]'s, on the same backend.
    fn submit_chain(
        &self,
        program: &Arc<ChainProgram>,
        pieces: Vec<RecordBatch>,
    ) -> Result<Submitted, KernelError> {
        self.run_chain(program, &pieces).map(Submitted::Done)
    }

    /// Waits for a batch this backend submitted and assembles its result.
    fn complete_chain(&self, pending: PendingChain) -> Result<ChainOutput, KernelError> {
        Err(KernelError::Gpu(GpuError::NoGpu {
            reason: format!(
                "{} did not submit this chain batch ({} rows)",
                self.describe(),
                pending.rows
            ),
        }))
    }

    /// Whether the backend's device context is broken for good (a sticky
    /// error, seen by this backend or another on the same device): its
    /// slot takes it out of service before the next batch.
    fn context_lost(&self) -> bool {
        false
    }

    /// After a device error of this backend: whether the error broke the
    /// context for good (then [`KernelBackend::context_lost`] says so from
    /// now on, on every backend sharing it).
    fn probe_after_error(&self) -> bool {
        false
    }
}

/// A chain batch handed to a backend ([`KernelBackend::submit_chain`]).
pub enum Submitted {
    /// It ran at once.
    Done(ChainOutput),
    /// It runs on the device; [`KernelBackend::complete_chain`] waits.
    Pending(PendingChain),
}

/// A device batch in flight: the backend's own state for it (its device
/// buffers, pinned staging and streams, which it owns until it completes
/// or is dropped — a dropped one waits for the device first).
pub struct PendingChain {
    pub rows: usize,
    pub state: Box<dyn std::any::Any + Send>,
}

impl PendingChain {
    pub fn new<T: std::any::Any + Send>(rows: usize, state: T) -> Self {
        PendingChain {
            rows,
            state: Box::new(state),
        }
    }

    /// The backend's state, when it is of type `T`.
    pub fn downcast<T: std::any::Any>(self) -> Result<T, PendingChain> {
        let rows = self.rows;
        self.state
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|state| PendingChain { rows, state })
    }
}

/// The pieces as one batch (the host twin and the simulator run on one).
pub(crate) fn coalesce(
    program: &ChainProgram,
    pieces: &[RecordBatch],
) -> Result<RecordBatch, KernelError> {
    match pieces {
        [one] => Ok(one.clone()),
        _ => Ok(arrow_select::concat::concat_batches(
            &program.input_schema,
            pieces,
        )?),
    }
}

/// Checks that the key and value columns have the same rows.
pub(crate) fn check_keyed_rows(input: KeyedArrays<'_>) -> Result<usize, KernelError> {
    let (key_rows, value_rows) = (input.keys.len(), input.values.len());
    if key_rows != value_rows {
        return Err(AggregateError::RowCountMismatch {
            key_rows,
            value_rows,
        }
        .into());
    }
    Ok(key_rows)
}

/// The seam's group order: by key, the null key first.
pub(crate) fn sort_groups(groups: &mut [Group]) {
    groups.sort_unstable_by_key(|group| group.key);
}

/// The CPU twins.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl KernelBackend for CpuBackend {
    fn tier(&self) -> Tier {
        Tier::Cpu
    }

    fn describe(&self) -> String {
        "CPU (twin kernels)".into()
    }

    fn filter_i64(
        &self,
        array: &Int64Array,
        op: CmpOp,
        literal: i64,
    ) -> Result<BooleanArray, KernelError> {
        Ok(filter_i64_array(array, op, literal))
    }

    fn filter_f64(
        &self,
        array: &Float64Array,
        op: CmpOp,
        literal: f64,
    ) -> Result<BooleanArray, KernelError> {
        Ok(filter_f64_array(array, op, literal))
    }

    fn project_i64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Int64Type>>,
    ) -> Result<Int64Array, KernelError> {
        Ok(project_i64_array(op, operands)?)
    }

    fn project_f64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Float64Type>>,
    ) -> Result<Float64Array, KernelError> {
        Ok(project_f64_array(op, operands)?)
    }

    fn hash_i64(
        &self,
        array: &Int64Array,
        mode: HashMode,
        hashes: &mut [u64],
    ) -> Result<(), KernelError> {
        hash_i64_column(Column::from_array(array), mode, hashes);
        Ok(())
    }

    fn partition_hashes(
        &self,
        hashes: &[u64],
        routing: Routing,
    ) -> Result<Partitioning, KernelError> {
        Ok(partition_hashes(hashes, routing)?)
    }

    fn standardize_fit(&self, array: &Float64Array) -> Result<ColumnStats, KernelError> {
        Ok(fit_column(array))
    }

    fn standardize_apply(
        &self,
        array: &Float64Array,
        stats: ColumnStats,
    ) -> Result<Float64Array, KernelError> {
        Ok(transform_column(array, stats))
    }

    fn aggregate_i64(&self, input: KeyedArrays<'_>) -> Result<Vec<Group>, KernelError> {
        check_keyed_rows(input)?;
        let mut groups = aggregate_i64(KeyedValues {
            keys: Column::from_array(input.keys),
            values: Column::from_array(input.values),
        })?;
        sort_groups(&mut groups);
        Ok(groups)
    }

    fn run_chain(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError> {
        let input = coalesce(program, pieces)?;
        Ok(super::chain::interp::run(program, &input)?)
    }

    fn open_agg_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn DeviceAggTable>, KernelError> {
        Ok(Box::new(HostAggTable::new(program, capacity, None)))
    }
}

/// Counters of the GPU offload of one operator (or one task).
#[derive(Debug, Default)]
pub struct OffloadStats {
    /// Pieces of batches that ran on the GPU.
    pub gpu_batches: AtomicU64,
    /// Times a piece was split in two after a device-memory refusal.
    pub oom_splits: AtomicU64,
    /// Pieces that ran on the CPU twin because they did not fit even split.
    pub cpu_fallback_batches: AtomicU64,
    pub cpu_fallback_rows: AtomicU64,
    /// Pieces that ran on the CPU twin because the GPU backend failed with
    /// a device error (not out-of-memory) or was out of service after one.
    pub device_error_fallbacks: AtomicU64,
    /// Coalesced device batches of fused chains, and their input rows.
    pub chain_batches: AtomicU64,
    pub chain_rows: AtomicU64,
    /// What those batches cost the device: bytes each way over the link,
    /// kernel launches (memsets included) and host waits on a stream.
    pub h2d_bytes: AtomicU64,
    pub d2h_bytes: AtomicU64,
    pub launches: AtomicU64,
    pub syncs: AtomicU64,
    /// Rows whose `key_by` target the device computed (`chain::Route`).
    pub routed_rows: AtomicU64,
    /// Device batches upserted into GPU aggregation tables, and the tables'
    /// drains into managed memory.
    pub agg_batches: AtomicU64,
    pub agg_drains: AtomicU64,
}

impl OffloadStats {
    pub fn snapshot(&self) -> OffloadSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OffloadSnapshot {
            gpu_batches: load(&self.gpu_batches),
            oom_splits: load(&self.oom_splits),
            cpu_fallback_batches: load(&self.cpu_fallback_batches),
            cpu_fallback_rows: load(&self.cpu_fallback_rows),
            device_error_fallbacks: load(&self.device_error_fallbacks),
            chain_batches: load(&self.chain_batches),
            chain_rows: load(&self.chain_rows),
            h2d_bytes: load(&self.h2d_bytes),
            d2h_bytes: load(&self.d2h_bytes),
            launches: load(&self.launches),
            syncs: load(&self.syncs),
            routed_rows: load(&self.routed_rows),
            agg_batches: load(&self.agg_batches),
            agg_drains: load(&self.agg_drains),
        }
    }

    /// Counts one device batch of a fused chain.
    pub fn count_chain_batch(&self, traffic: &super::chain::DeviceTraffic) {
        let add = |c: &AtomicU64, v: u64| c.fetch_add(v, Ordering::Relaxed);
        add(&self.chain_batches, 1);
        add(&self.chain_rows, traffic.rows);
        add(&self.h2d_bytes, traffic.h2d_bytes);
        add(&self.d2h_bytes, traffic.d2h_bytes);
        add(&self.launches, traffic.launches);
        add(&self.syncs, traffic.syncs);
    }
}

/// A copy of [`OffloadStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffloadSnapshot {
    pub gpu_batches: u64,
    pub oom_splits: u64,
    pub cpu_fallback_batches: u64,
    pub cpu_fallback_rows: u64,
    #[serde(default)]
    pub device_error_fallbacks: u64,
    #[serde(default)]
    pub chain_batches: u64,
    #[serde(default)]
    pub chain_rows: u64,
    #[serde(default)]
    pub h2d_bytes: u64,
    #[serde(default)]
    pub d2h_bytes: u64,
    #[serde(default)]
    pub launches: u64,
    #[serde(default)]
    pub syncs: u64,
    #[serde(default)]
    pub routed_rows: u64,
    #[serde(default)]
    pub agg_batches: u64,
    #[serde(default)]
    pub agg_drains: u64,
}

impl OffloadSnapshot {
    /// Adds another task's counters (the job's totals).
    pub fn add(&mut self, other: &OffloadSnapshot) {
        self.gpu_batches += other.gpu_batches;
        self.oom_splits += other.oom_splits;
        self.cpu_fallback_batches += other.cpu_fallback_batches;
        self.cpu_fallback_rows += other.cpu_fallback_rows;
        self.device_error_fallbacks += other.device_error_fallbacks;
        self.chain_batches += other.chain_batches;
        self.chain_rows += other.chain_rows;
        self.h2d_bytes += other.h2d_bytes;
        self.d2h_bytes += other.d2h_bytes;
        self.launches += other.launches;
        self.syncs += other.syncs;
        self.routed_rows += other.routed_rows;
        self.agg_batches += other.agg_batches;
        self.agg_drains += other.agg_drains;
    }
}

/// Halvings of one batch before its pieces fall back to the CPU: a batch
/// becomes at most 2^3 = 8 pieces.
pub const OOM_SPLIT_DEPTH_MAX: u32 = 3;

/// Runs a kernel on rows `offset..offset + length` of a batch on a backend.
type PieceCall<'a, T> = dyn FnMut(&dyn KernelBackend, usize, usize) -> Result<T, KernelError> + 'a;

/// A GPU backend with split-and-retry on device out-of-memory and the CPU
/// twin as the last resort, per piece. Any other device error takes the
/// slot's backend out of service (see [`DeviceSlot`]): the piece reruns on
/// the CPU twin, and so do later ones until the backend is reopened.
#[derive(Clone)]
pub struct TieredKernels {
    slot: Arc<DeviceSlot>,
    /// The backend's description when the kernels were made.
    gpu_description: String,
    gpu_tier: Tier,
    cpu: CpuBackend,
    stats: Arc<OffloadStats>,
    split_depth_max: u32,
}

impl TieredKernels {
    /// Kernels over `gpu`, which a device error takes out of service for
    /// good (its "reopen" hands back the same backend after the backoff).
    pub fn new(gpu: Arc<dyn KernelBackend>, stats: Arc<OffloadStats>) -> Self {
        let same = Arc::clone(&gpu);
        let slot = DeviceSlot::new(gpu, Box::new(move || Ok(Arc::clone(&same))));
        Self::on_slot(Arc::new(slot), stats)
    }

    /// Kernels over a GPU slot's current backend.
    pub fn on_slot(slot: Arc<DeviceSlot>, stats: Arc<OffloadStats>) -> Self {
        let (gpu_description, gpu_tier) = match slot.current(std::time::Instant::now()) {
            Some(gpu) => (gpu.describe(), gpu.tier()),
            None => (
                "GPU (out of service after a device error)".into(),
                Tier::Gpu,
            ),
        };
        TieredKernels {
            slot,
            gpu_description,
            gpu_tier,
            cpu: CpuBackend,
            stats,
            split_depth_max: OOM_SPLIT_DEPTH_MAX,
        }
    }

    pub fn stats(&self) -> &Arc<OffloadStats> {
        &self.stats
    }

    /// Runs `call` on the GPU backend over rows `0..row_count`, halving the
    /// range on out-of-memory and running it on the CPU twin once it has
    /// been halved `split_depth_max` times. `call(backend, offset, length)`
    /// returns the piece's result; `join` puts two adjacent pieces together.
    fn run_split<T>(
        &self,
        row_count: usize,
        call: &mut PieceCall<'_, T>,
        join: &dyn Fn(T, T) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        self.run_piece(0, row_count, 0, call, join)
    }

    /// The slot's backend, or `None` (counted) while it is out of service.
    fn gpu(&self, rows: usize) -> Option<Arc<dyn KernelBackend>> {
        let gpu = self.slot.current(std::time::Instant::now());
        if gpu.is_none() {
            self.count_device_fallback(rows);
        }
        gpu
    }

    fn count_device_fallback(&self, rows: usize) {
        self.stats
            .device_error_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!("{rows} rows of a GPU-placed operator run on the CPU twin (device error)");
    }

    /// `gpu` failed with a device error: out of service, and counted.
    fn device_failed(&self, gpu: &Arc<dyn KernelBackend>, error: &GpuError, rows: usize) {
        self.slot
            .report_failure(gpu, error, std::time::Instant::now());
        self.count_device_fallback(rows);
    }

    fn run_piece<T>(
        &self,
        offset: usize,
        length: usize,
        depth: u32,
        call: &mut PieceCall<'_, T>,
        join: &dyn Fn(T, T) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let Some(gpu) = self.gpu(length) else {
            return call(&self.cpu, offset, length);
        };
        match call(gpu.as_ref(), offset, length) {
            Ok(result) => {
                self.stats.gpu_batches.fetch_add(1, Ordering::Relaxed);
                Ok(result)
            }
            Err(KernelError::DeviceOutOfMemory(refusal)) => {
                if depth >= self.split_depth_max || length < 2 {
                    tracing::debug!(
                        "GPU piece of {length} rows does not fit ({refusal}); CPU twin runs it"
                    );
                    self.stats
                        .cpu_fallback_batches
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .cpu_fallback_rows
                        .fetch_add(length as u64, Ordering::Relaxed);
                    return call(&self.cpu, offset, length);
                }
                self.stats.oom_splits.fetch_add(1, Ordering::Relaxed);
                let half = length / 2;
                let first = self.run_piece(offset, half, depth + 1, call, join)?;
                let second = self.run_piece(offset + half, length - half, depth + 1, call, join)?;
                join(first, second)
            }
            Err(KernelError::Gpu(error)) => {
                self.device_failed(&gpu, &error, length);
                call(&self.cpu, offset, length)
            }
            Err(other) => Err(other),
        }
    }

    /// Runs an operation that cannot be split (its result depends on the
    /// whole batch) on the GPU, and on the CPU twin when the device refuses
    /// its memory, counting the fallback.
    fn run_whole<T>(
        &self,
        row_count: usize,
        call: &dyn Fn(&dyn KernelBackend) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let Some(gpu) = self.gpu(row_count) else {
            return call(&self.cpu);
        };
        match call(gpu.as_ref()) {
            Ok(result) => {
                self.stats.gpu_batches.fetch_add(1, Ordering::Relaxed);
                Ok(result)
            }
            Err(KernelError::DeviceOutOfMemory(refusal)) => {
                tracing::debug!(
                    "GPU batch of {row_count} rows does not fit ({refusal}); CPU twin runs it"
                );
                self.stats
                    .cpu_fallback_batches
                    .fetch_add(1, Ordering::Relaxed);
                self.stats
                    .cpu_fallback_rows
                    .fetch_add(row_count as u64, Ordering::Relaxed);
                call(&self.cpu)
            }
            Err(KernelError::Gpu(error)) => {
                self.device_failed(&gpu, &error, row_count);
                call(&self.cpu)
            }
            Err(other) => Err(other),
        }
    }
}

/// Two adjacent pieces' partitionings as one: the ids concatenated, the
/// offsets added, each partition's rows of the first piece before those of
/// the second (row indices are already in the whole batch's numbering).
fn join_partitionings(
    first: Partitioning,
    second: Partitioning,
) -> Result<Partitioning, KernelError> {
    let partition_count = first.partition_count();
    assert_eq!(partition_count, second.partition_count(), "same routing");
    let mut partition_ids = first.partition_ids.clone();
    partition_ids.extend_from_slice(&second.partition_ids);
    let mut rows = Vec::with_capacity(first.rows.len() + second.rows.len());
    let mut partition_offsets = Vec::with_capacity(partition_count + 1);
    for partition in 0..partition_count {
        partition_offsets.push(rows.len() as u32);
        rows.extend_from_slice(first.rows_of(partition));
        rows.extend_from_slice(second.rows_of(partition));
    }
    partition_offsets.push(rows.len() as u32);
    Ok(Partitioning {
        partition_ids,
        partition_offsets,
        rows,
    })
}

fn join_boolean(first: BooleanArray, second: BooleanArray) -> Result<BooleanArray, KernelError> {
    let joined = arrow_select::concat::concat(&[&first, &second])?;
    Ok(arrow_array::cast::AsArray::as_boolean(joined.as_ref()).clone())
}

fn join_primitive<T: arrow_array::ArrowPrimitiveType>(
    first: PrimitiveArray<T>,
    second: PrimitiveArray<T>,
) -> Result<PrimitiveArray<T>, KernelError> {
    let joined = arrow_select::concat::concat(&[&first, &second])?;
    Ok(arrow_array::cast::AsArray::as_primitive::<T>(joined.as_ref()).clone())
}

/// The rows `offset..offset + length` of an operand.
fn slice_operand<T: arrow_array::ArrowPrimitiveType>(
    operand: ArrayOperand<'_, T>,
    offset: usize,
    length: usize,
) -> SlicedOperand<T> {
    match operand {
        ArrayOperand::Array(array) => SlicedOperand::Array(array.slice(offset, length)),
        ArrayOperand::Literal(value) => SlicedOperand::Literal(value),
    }
}

enum SlicedOperand<T: arrow_array::ArrowPrimitiveType> {
    Array(PrimitiveArray<T>),
    Literal(T::Native),
}

impl<T: arrow_array::ArrowPrimitiveType> SlicedOperand<T> {
    fn as_operand(&self) -> ArrayOperand<'_, T> {
        match self {
            SlicedOperand::Array(array) => ArrayOperand::Array(array),
            SlicedOperand::Literal(value) => ArrayOperand::Literal(*value),
        }
    }
}

/// The row count of a projection's operands (a literal has none).
fn operands_row_count<T: arrow_array::ArrowPrimitiveType>(
    operands: &Operands<ArrayOperand<'_, T>>,
) -> usize {
    [operands.left, operands.right]
        .iter()
        .find_map(|operand| match operand {
            ArrayOperand::Array(array) => Some(array.len()),
            ArrayOperand::Literal(_) => None,
        })
        .unwrap_or(0)
}

/// A projection over rows `offset..offset + length`, with an overflow's row
/// reported in the whole batch's numbering.
fn project_piece<T, R>(
    operands: Operands<ArrayOperand<'_, T>>,
    offset: usize,
    length: usize,
    project: impl FnOnce(Operands<ArrayOperand<'_, T>>) -> Result<R, KernelError>,
) -> Result<R, KernelError>
where
    T: arrow_array::ArrowPrimitiveType,
{
    let left = slice_operand(operands.left, offset, length);
    let right = slice_operand(operands.right, offset, length);
    let sliced = Operands {
        left: left.as_operand(),
        right: right.as_operand(),
    };
    project(sliced).map_err(|e| match e {
        KernelError::Project(ProjectError::Overflow {
            row,
            op,
            left,
            right,
        }) => KernelError::Project(ProjectError::Overflow {
            row: row + offset,
            op,
            left,
            right,
        }),
        other => other,
    })
}

impl KernelBackend for TieredKernels {
    fn tier(&self) -> Tier {
        self.gpu_tier
    }

    fn describe(&self) -> String {
        format!(
            "{} (out of memory: split up to {}×, then the CPU twin; device errors: the CPU twin until the backend is reopened)",
            self.gpu_description,
            1u32 << self.split_depth_max
        )
    }

    fn filter_i64(
        &self,
        array: &Int64Array,
        op: CmpOp,
        literal: i64,
    ) -> Result<BooleanArray, KernelError> {
        self.run_split(
            array.len(),
            &mut |backend, offset, length| {
                backend.filter_i64(&array.slice(offset, length), op, literal)
            },
            &join_boolean,
        )
    }

    fn filter_f64(
        &self,
        array: &Float64Array,
        op: CmpOp,
        literal: f64,
    ) -> Result<BooleanArray, KernelError> {
        self.run_split(
            array.len(),
            &mut |backend, offset, length| {
                backend.filter_f64(&array.slice(offset, length), op, literal)
            },
            &join_boolean,
        )
    }

    fn project_i64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Int64Type>>,
    ) -> Result<Int64Array, KernelError> {
        let row_count = operands_row_count(&operands);
        self.run_split(
            row_count,
            &mut |backend, offset, length| {
                project_piece(operands, offset, length, |sliced| {
                    backend.project_i64(op, sliced)
                })
            },
            &join_primitive,
        )
    }

    fn project_f64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Float64Type>>,
    ) -> Result<Float64Array, KernelError> {
        let row_count = operands_row_count(&operands);
        self.run_split(
            row_count,
            &mut |backend, offset, length| {
                project_piece(operands, offset, length, |sliced| {
                    backend.project_f64(op, sliced)
                })
            },
            &join_primitive,
        )
    }

    fn hash_i64(
        &self,
        array: &Int64Array,
        mode: HashMode,
        hashes: &mut [u64],
    ) -> Result<(), KernelError> {
        assert_eq!(hashes.len(), array.len(), "one hash per row");
        self.run_split(
            array.len(),
            &mut |backend, offset, length| {
                backend.hash_i64(
                    &array.slice(offset, length),
                    mode,
                    &mut hashes[offset..offset + length],
                )
            },
            &|(), ()| Ok(()),
        )
    }

    fn partition_hashes(
        &self,
        hashes: &[u64],
        routing: Routing,
    ) -> Result<Partitioning, KernelError> {
        let row_count = hashes.len();
        if u32::try_from(row_count).is_err() {
            return Err(PartitionError::TooManyRows { row_count }.into());
        }
        self.run_split(
            row_count,
            &mut |backend, offset, length| {
                let mut piece =
                    backend.partition_hashes(&hashes[offset..offset + length], routing)?;
                for row in &mut piece.rows {
                    *row += offset as u32;
                }
                Ok(piece)
            },
            &join_partitionings,
        )
    }

    fn standardize_fit(&self, array: &Float64Array) -> Result<ColumnStats, KernelError> {
        // The reduction tree spans the whole column: split pieces would sum
        // in another order, so a refusal runs the twin on the whole column.
        self.run_whole(array.len(), &|backend| backend.standardize_fit(array))
    }

    fn standardize_apply(
        &self,
        array: &Float64Array,
        stats: ColumnStats,
    ) -> Result<Float64Array, KernelError> {
        self.run_split(
            array.len(),
            &mut |backend, offset, length| {
                backend.standardize_apply(&array.slice(offset, length), stats)
            },
            &join_primitive,
        )
    }

    fn aggregate_i64(&self, input: KeyedArrays<'_>) -> Result<Vec<Group>, KernelError> {
        // One device hash table holds every group of the batch: a refusal
        // runs the twin on the whole batch.
        let row_count = check_keyed_rows(input)?;
        self.run_whole(row_count, &|backend| backend.aggregate_i64(input))
    }

    fn run_chain(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        let Some(gpu) = self.gpu(rows) else {
            return self.cpu.run_chain(program, pieces);
        };
        self.chain_piece(&gpu, program, pieces, 0)
    }

    fn submit_chain(
        &self,
        program: &Arc<ChainProgram>,
        pieces: Vec<RecordBatch>,
    ) -> Result<Submitted, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        let Some(gpu) = self.gpu(rows) else {
            return self.cpu.run_chain(program, &pieces).map(Submitted::Done);
        };
        match gpu.submit_chain(program, pieces.clone()) {
            Ok(Submitted::Done(result)) => {
                self.count_chain(program, &pieces, &result);
                Ok(Submitted::Done(result))
            }
            Ok(Submitted::Pending(inner)) => Ok(Submitted::Pending(PendingChain::new(
                rows,
                TieredPending {
                    gpu,
                    inner,
                    program: Arc::clone(program),
                    pieces,
                },
            ))),
            // Does not fit beside what is in flight: split and wait.
            Err(KernelError::DeviceOutOfMemory(_)) => self
                .chain_piece(&gpu, program, &pieces, 0)
                .map(Submitted::Done),
            Err(KernelError::Gpu(error)) => {
                self.device_failed(&gpu, &error, rows);
                self.cpu.run_chain(program, &pieces).map(Submitted::Done)
            }
            Err(other) => Err(other),
        }
    }

    fn complete_chain(&self, pending: PendingChain) -> Result<ChainOutput, KernelError> {
        let TieredPending {
            gpu,
            inner,
            program,
            pieces,
        } = pending.downcast::<TieredPending>().map_err(|p| {
            KernelError::Gpu(GpuError::NoGpu {
                reason: format!("a chain batch of {} rows submitted elsewhere", p.rows),
            })
        })?;
        match gpu.complete_chain(inner) {
            Ok(result) => {
                self.count_chain(&program, &pieces, &result);
                Ok(result)
            }
            Err(KernelError::DeviceOutOfMemory(_)) => self.chain_piece(&gpu, &program, &pieces, 0),
            Err(KernelError::Gpu(error)) => {
                let rows = pieces.iter().map(RecordBatch::num_rows).sum();
                self.device_failed(&gpu, &error, rows);
                self.cpu.run_chain(&program, &pieces)
            }
            Err(other) => Err(other),
        }
    }

    fn open_agg_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn DeviceAggTable>, KernelError> {
        self.open_device_agg_table(program, capacity)
    }
}

/// A batch [`TieredKernels`] submitted: the backend that runs it, and the
/// input, to rerun on the CPU twin if the device fails it.
struct TieredPending {
    gpu: Arc<dyn KernelBackend>,
    inner: PendingChain,
    program: Arc<ChainProgram>,
    pieces: Vec<RecordBatch>,
}

/// Slots below which a device aggregation table is not worth opening: the
/// operator aggregates on the CPU instead.
pub const AGG_TABLE_SLOTS_MIN: u64 = 1 << 12;

impl TieredKernels {
    /// A device aggregation table: halved while the device refuses its
    /// memory, down to [`AGG_TABLE_SLOTS_MIN`] slots; a device error takes
    /// the slot out of service. An error means the caller aggregates on
    /// the CPU.
    pub fn open_device_agg_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn DeviceAggTable>, KernelError> {
        let Some(gpu) = self.gpu(0) else {
            return Err(KernelError::Gpu(GpuError::NoGpu {
                reason: "the slot's GPU is out of service after a device error".into(),
            }));
        };
        let mut capacity = capacity.max(AGG_TABLE_SLOTS_MIN);
        loop {
            match gpu.open_agg_table(Arc::clone(&program), capacity) {
                Ok(table) => {
                    return Ok(Box::new(ReportingTable {
                        inner: table,
                        slot: Arc::clone(&self.slot),
                        gpu: Arc::clone(&gpu),
                        stats: Arc::clone(&self.stats),
                    }));
                }
                Err(KernelError::DeviceOutOfMemory(_)) if capacity / 2 >= AGG_TABLE_SLOTS_MIN => {
                    self.stats.oom_splits.fetch_add(1, Ordering::Relaxed);
                    capacity /= 2;
                }
                Err(KernelError::Gpu(error)) => {
                    self.device_failed(&gpu, &error, 0);
                    return Err(KernelError::Gpu(error));
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// A device batch of a chain ran: counted in the stats.
    fn count_chain(&self, program: &ChainProgram, pieces: &[RecordBatch], result: &ChainOutput) {
        self.stats.gpu_batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .count_chain_batch(&result.traffic.unwrap_or_else(|| {
                let rows: u64 = pieces.iter().map(|p| p.num_rows() as u64).sum();
                super::chain::DeviceTraffic::plan(
                    program,
                    pieces,
                    super::chain::Download::Predicted(rows),
                    result.batch.num_rows() as u64,
                )
            }));
        if let Some(targets) = &result.targets {
            self.stats
                .routed_rows
                .fetch_add(targets.len() as u64, Ordering::Relaxed);
        }
    }

    /// A device batch of a chain; on a memory refusal, its halves (by
    /// pieces, or by rows when one piece is left), then the host twin.
    fn chain_piece(
        &self,
        gpu: &Arc<dyn KernelBackend>,
        program: &ChainProgram,
        pieces: &[RecordBatch],
        depth: u32,
    ) -> Result<ChainOutput, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        match gpu.run_chain(program, pieces) {
            Ok(result) => {
                self.count_chain(program, pieces, &result);
                Ok(result)
            }
            Err(KernelError::DeviceOutOfMemory(refusal)) => {
                if depth >= self.split_depth_max || rows < 2 {
                    tracing::debug!(
                        "GPU chain batch of {rows} rows does not fit ({refusal}); the host twin runs it"
                    );
                    self.stats
                        .cpu_fallback_batches
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .cpu_fallback_rows
                        .fetch_add(rows as u64, Ordering::Relaxed);
                    return self.cpu.run_chain(program, pieces);
                }
                self.stats.oom_splits.fetch_add(1, Ordering::Relaxed);
                let halves: [Vec<RecordBatch>; 2] = if pieces.len() > 1 {
                    let (a, b) = pieces.split_at(pieces.len() / 2);
                    [a.to_vec(), b.to_vec()]
                } else {
                    let one = &pieces[0];
                    let half = one.num_rows() / 2;
                    [
                        vec![one.slice(0, half)],
                        vec![one.slice(half, one.num_rows() - half)],
                    ]
                };
                let first = self.chain_piece(gpu, program, &halves[0], depth + 1);
                let first = first.map_err(|e| offset_chain_row(e, 0))?;
                let first_rows: usize = halves[0].iter().map(RecordBatch::num_rows).sum();
                let second = self
                    .chain_piece(gpu, program, &halves[1], depth + 1)
                    .map_err(|e| offset_chain_row(e, first_rows as u64))?;
                Ok(first.join(second)?)
            }
            Err(KernelError::Gpu(error)) => {
                self.device_failed(gpu, &error, rows);
                self.cpu.run_chain(program, pieces)
            }
            Err(other) => Err(other),
        }
    }
}

/// A device table whose device errors take its slot out of service (the
/// state on it is lost: the task fails and restarts from its checkpoint).
struct ReportingTable {
    inner: Box<dyn DeviceAggTable>,
    slot: Arc<DeviceSlot>,
    gpu: Arc<dyn KernelBackend>,
    stats: Arc<OffloadStats>,
}

impl ReportingTable {
    fn report<T>(&self, result: Result<T, KernelError>) -> Result<T, KernelError> {
        if let Err(KernelError::Gpu(error)) = &result {
            self.slot
                .report_failure(&self.gpu, error, std::time::Instant::now());
        }
        result
    }
}

impl DeviceAggTable for ReportingTable {
    fn upsert(&mut self, pieces: &[RecordBatch]) -> Result<(), KernelError> {
        let result = self.inner.upsert(pieces);
        self.stats.agg_batches.fetch_add(1, Ordering::Relaxed);
        self.report(result)
    }

    fn groups(&mut self) -> Result<u64, KernelError> {
        let groups = self.inner.groups();
        self.report(groups)
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn drain(&mut self) -> Result<RecordBatch, KernelError> {
        let result = self.inner.drain();
        self.stats.agg_drains.fetch_add(1, Ordering::Relaxed);
        self.report(result)
    }
}

/// A chain fault's row in the numbering of the whole device batch.
fn offset_chain_row(error: KernelError, offset: u64) -> KernelError {
    match error {
        KernelError::Chain(mut fault) => {
            fault.row += offset;
            KernelError::Chain(fault)
        }
        other => other,
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
