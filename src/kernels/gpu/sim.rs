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
use crate::kernels::backend::{CpuBackend, KernelBackend, KernelError, Tier};
use crate::kernels::chain::{ChainOutput, ChainProgram, DeviceTraffic};
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
        let rows = pieces.iter().map(|p| p.num_rows() as u64).sum();
        let plan = DeviceTraffic::plan(program, pieces, rows);
        let _held = self.reserve(plan.device_bytes)?;
        CpuBackend.run_chain(program, pieces)
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
