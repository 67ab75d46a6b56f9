//! A chain of filters and projections placed on the GPU, run as one fused
//! program over coalesced batches.
//!
//! The chain's operators stay in the task's chain (their metrics and
//! checkpoint ids do not move): the last one becomes a [`GpuChainOperator`]
//! and the ones before it [`Forward`], so the rows a chain keeps are
//! counted where the chain ends. Input batches are buffered until their
//! device columns reach `taskmanager.gpu.coalesce-bytes`, the oldest has
//! waited `taskmanager.gpu.coalesce-latency` (checked as batches arrive),
//! the input goes idle, a watermark or checkpoint barrier comes, or the
//! input ends; then the whole buffer is one device batch
//! ([`KernelBackend::run_chain`]) and the result is emitted in slices no
//! longer than the largest input batch, so operators downstream see the
//! batch sizes they were built for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

use super::ExecError;
use super::operators::{Operator, Output};
use crate::kernels::backend::{KernelBackend, KernelError};
use crate::kernels::chain::ChainProgram;

/// When a chain's buffered input becomes a device batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalescePolicy {
    pub bytes: u64,
    pub latency: Duration,
}

impl CoalescePolicy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        CoalescePolicy {
            bytes: config.gpu_coalesce_bytes,
            latency: config.gpu_coalesce_latency,
        }
    }
}

/// Rows a device batch holds at most: row numbers and block offsets are
/// 32-bit on the device.
const DEVICE_BATCH_ROWS_MAX: usize = 1 << 30;

pub struct GpuChainOperator {
    name: String,
    program: Arc<ChainProgram>,
    kernels: Arc<dyn KernelBackend>,
    policy: CoalescePolicy,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    pending_since: Option<Instant>,
    emit_rows_max: usize,
}

impl GpuChainOperator {
    pub fn new(
        name: String,
        program: ChainProgram,
        kernels: Arc<dyn KernelBackend>,
        policy: CoalescePolicy,
    ) -> Self {
        GpuChainOperator {
            name,
            program: Arc::new(program),
            kernels,
            policy,
            pending: Vec::new(),
            pending_rows: 0,
            pending_since: None,
            emit_rows_max: 1,
        }
    }

    /// Device bytes the buffered rows upload (at least a byte per row, so
    /// that a chain of host columns only still coalesces by size).
    fn pending_bytes(&self) -> u64 {
        let per_row = self.program.upload_bytes_per_row().max(1.0);
        (self.pending_rows as f64 * per_row) as u64
    }

    fn run(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pieces = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        self.pending_since = None;
        let result = self
            .kernels
            .run_chain(&self.program, &pieces)
            .map_err(|e| match e {
                KernelError::Chain(fault) => ExecError::Expression {
                    operator: fault.operator,
                    detail: fault.detail.to_string(),
                },
                other => ExecError::Expression {
                    operator: self.name.clone(),
                    detail: other.to_string(),
                },
            })?;
        let mut offset = 0;
        while offset < result.num_rows() {
            let length = self.emit_rows_max.min(result.num_rows() - offset);
            out.emit(result.slice(offset, length))?;
            offset += length;
        }
        Ok(())
    }
}

impl Operator for GpuChainOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.emit_rows_max = self.emit_rows_max.max(batch.num_rows());
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        let now = Instant::now();
        let since = *self.pending_since.get_or_insert(now);
        if self.pending_bytes() >= self.policy.bytes
            || self.pending_rows >= DEVICE_BATCH_ROWS_MAX
            || now.duration_since(since) >= self.policy.latency
        {
            self.run(out)?;
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: i64, out: &mut dyn Output) -> Result<(), ExecError> {
        self.run(out)?;
        out.watermark(watermark)
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.run(out)
    }

    fn flush(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.run(out)
    }
}

/// An operator of a fused chain other than its last: the chain's program
/// computes it, so it passes batches on.
pub struct Forward;

impl Operator for Forward {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        out.emit(batch)
    }
}
