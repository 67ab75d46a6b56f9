//! A simulated GPU backend: the device memory pool's books are kept exactly
//! as the CUDA backend keeps them, and the results come from the CPU twins.
//! It lets the out-of-memory path (split, retry, CPU fallback) and the GPU
//! slot budgets be tested on a machine without a GPU.

use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{BooleanArray, Float64Array, Int64Array, RecordBatch};

use super::LaunchBytes;
use super::pool::SlotPool;
use std::sync::Arc;

use crate::kernels::aggtable::{AggProgram, DeviceAggTable, HostAggTable};
use crate::kernels::backend::{
    CpuBackend, KernelBackend, KernelError, PendingChain, Submitted, Tier,
};
use crate::kernels::chain::{ChainOutput, ChainProgram, DeviceTraffic, Download};
use crate::kernels::cpu::aggregate::{Group, KeyedArrays};
use crate::kernels::cpu::filter::CmpOp;
use crate::kernels::cpu::key_hash::HashMode;
use crate::kernels::cpu::partition::{Partitioning, Routing};
use crate::kernels::cpu::project::{ArithOp, ArrayOperand, Operands};
use crate::kernels::cpu::standardize::ColumnStats;

/// The CPU twins behind a GPU slot's device budget.
#[derive(Clone, Debug)]
pub struct SimulatedGpuBackend {
    pool: SlotPool,
}

impl SimulatedGpuBackend {
    pub fn new(pool: SlotPool) -> Self {
        SimulatedGpuBackend { pool }
    }

    fn reserve(&self, bytes: u64) -> Result<super::pool::DeviceReservation, KernelError> {
        self.pool
            .reserve(bytes)
            .map_err(KernelError::DeviceOutOfMemory)
    }
}

/// A submitted chain batch: what the CUDA backend would hold for it.
struct SimPending {
    program: Arc<ChainProgram>,
    pieces: Vec<RecordBatch>,
    downloaded: Download,
    _held: super::pool::DeviceReservation,
}

impl SimulatedGpuBackend {
    /// The batch's device memory (the CUDA plan's, every row surviving)
    /// and the rows its first download would copy.
    fn reserve_chain(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<(super::pool::DeviceReservation, Download), KernelError> {
        let rows = pieces.iter().map(|p| p.num_rows() as u64).sum();
        let plan = DeviceTraffic::plan(program, pieces, Download::Counted, rows);
        let held = self.reserve(plan.device_bytes)?;
        Ok((held, program.download(rows)))
    }
}

/// The host twin of the program, with the traffic the CUDA executor would
/// have had (downloading as `downloaded` says).
fn simulate_chain(
    program: &ChainProgram,
    pieces: &[RecordBatch],
    downloaded: Download,
) -> Result<ChainOutput, KernelError> {
    let rows = pieces.iter().map(|p| p.num_rows() as u64).sum();
    let mut result = CpuBackend.run_chain(program, pieces)?;
    let survivors = result.batch.num_rows() as u64;
    result.traffic = Some(DeviceTraffic::plan(program, pieces, downloaded, survivors));
    program.observe_kept(rows, survivors);
    Ok(result)
}

fn row_count<T: arrow_array::ArrowPrimitiveType>(
    operands: &Operands<ArrayOperand<'_, T>>,
) -> usize {
    [operands.left, operands.right]
        .iter()
        .find_map(|operand| match operand {
            ArrayOperand::Array(array) => Some(arrow_array::Array::len(*array)),
            ArrayOperand::Literal(_) => None,
        })
        .unwrap_or(0)
}

impl KernelBackend for SimulatedGpuBackend {
    fn tier(&self) -> Tier {
        Tier::Gpu
    }

    fn describe(&self) -> String {
        format!(
            "simulated GPU (CPU twins, slot {} budget {} bytes)",
            self.pool.slot_index(),
            self.pool.budget_bytes()
        )
    }

    fn filter_i64(
        &self,
        array: &Int64Array,
        op: CmpOp,
        literal: i64,
    ) -> Result<BooleanArray, KernelError> {
        let _held = self.reserve(
            LaunchBytes {
                row_count: array.len(),
            }
            .filter(),
        )?;
        CpuBackend.filter_i64(array, op, literal)
    }

    fn filter_f64(
        &self,
        array: &Float64Array,
        op: CmpOp,
        literal: f64,
    ) -> Result<BooleanArray, KernelError> {
        let _held = self.reserve(
            LaunchBytes {
                row_count: array.len(),
            }
            .filter(),
        )?;
        CpuBackend.filter_f64(array, op, literal)
    }

    fn project_i64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Int64Type>>,
    ) -> Result<Int64Array, KernelError> {
        let row_count = row_count(&operands);
        let _held = self.reserve(LaunchBytes { row_count }.project())?;
        CpuBackend.project_i64(op, operands)
    }

    fn project_f64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Float64Type>>,
    ) -> Result<Float64Array, KernelError> {
        let row_count = row_count(&operands);
        let _held = self.reserve(LaunchBytes { row_count }.project())?;
        CpuBackend.project_f64(op, operands)
    }

    fn hash_i64(
        &self,
        array: &Int64Array,
        mode: HashMode,
        hashes: &mut [u64],
    ) -> Result<(), KernelError> {
        let _held = self.reserve(
            LaunchBytes {
                row_count: array.len(),
            }
            .hash(),
        )?;
        CpuBackend.hash_i64(array, mode, hashes)
    }

    fn partition_hashes(
        &self,
        hashes: &[u64],
        routing: Routing,
    ) -> Result<Partitioning, KernelError> {
        let _held = self.reserve(
            LaunchBytes {
                row_count: hashes.len(),
            }
            .partition(routing.parallelism()),
        )?;
        CpuBackend.partition_hashes(hashes, routing)
    }

    fn standardize_fit(&self, array: &Float64Array) -> Result<ColumnStats, KernelError> {
        let _held = self.reserve(
            LaunchBytes {
                row_count: array.len(),
            }
            .standardize_fit(),
        )?;
        CpuBackend.standardize_fit(array)
    }

    fn standardize_apply(
        &self,
        array: &Float64Array,
        stats: ColumnStats,
    ) -> Result<Float64Array, KernelError> {
        let _held = self.reserve(
            LaunchBytes {
                row_count: array.len(),
            }
            .standardize_apply(),
        )?;
        CpuBackend.standardize_apply(array, stats)
    }

    fn aggregate_i64(&self, input: KeyedArrays<'_>) -> Result<Vec<Group>, KernelError> {
        let row_count = crate::kernels::backend::check_keyed_rows(input)?;
        let capacity = super::aggregate_capacity(row_count);
        let _held = self.reserve(LaunchBytes { row_count }.aggregate(capacity))?;
        CpuBackend.aggregate_i64(input)
    }

    /// Reserves what the CUDA backend's plan allocates (every row
    /// surviving), then runs the host twin of the program.
    fn run_chain(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError> {
        let (held, downloaded) = self.reserve_chain(program, pieces)?;
        let result = simulate_chain(program, pieces, downloaded);
        drop(held);
        result
    }

    /// As the CUDA backend does: the batch's device memory is held, and
    /// its download sized, when it is submitted; the twin runs when it is
    /// completed, so a batch's result waits behind its successor's submit.
    fn submit_chain(
        &self,
        program: &Arc<ChainProgram>,
        pieces: Vec<RecordBatch>,
    ) -> Result<Submitted, KernelError> {
        let (held, downloaded) = self.reserve_chain(program, &pieces)?;
        let rows = pieces.iter().map(RecordBatch::num_rows).sum();
        Ok(Submitted::Pending(PendingChain::new(
            rows,
            SimPending {
                program: Arc::clone(program),
                pieces,
                downloaded,
                _held: held,
            },
        )))
    }

    fn complete_chain(&self, pending: PendingChain) -> Result<ChainOutput, KernelError> {
        let pending = pending.downcast::<SimPending>().map_err(|p| {
            KernelError::Gpu(super::GpuError::NoGpu {
                reason: format!("a chain batch of {} rows submitted elsewhere", p.rows),
            })
        })?;
        simulate_chain(&pending.program, &pending.pieces, pending.downloaded)
    }

    /// The host twin of the table, its slots held in the device budget.
    fn open_agg_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn DeviceAggTable>, KernelError> {
        let held = self.reserve(crate::kernels::aggtable::device_bytes(&program, capacity))?;
        Ok(Box::new(HostAggTable::new(program, capacity, Some(held))))
    }
}
