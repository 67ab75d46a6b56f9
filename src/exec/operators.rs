//! The operator interface and the stateless operators.
//!
//! A task runs a chain of operators: each pushes its output into the next
//! through [`Output`]; the last one's output goes to the task's record
//! writers (or nowhere, for sinks).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use arrow_select::filter::filter_record_batch;

use super::ExecError;
use crate::job::{Expr, NamedExpr};
use crate::kernels::backend::KernelBackend;

/// Where an operator sends its results.
pub trait Output {
    fn emit(&mut self, batch: RecordBatch) -> Result<(), ExecError>;
    fn watermark(&mut self, watermark: i64) -> Result<(), ExecError>;

    /// `batch` with each row's target subtask of the hash exchange that
    /// follows computed already (a GPU chain hashes on the device). Where
    /// no such exchange follows directly, the targets are dropped.
    fn emit_routed(&mut self, batch: RecordBatch, _targets: &[u32]) -> Result<(), ExecError> {
        self.emit(batch)
    }
}

/// One step of a task's chain.
pub trait Operator: Send {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError>;

    /// The input watermark advanced. Stateless operators forward it.
    fn watermark(&mut self, watermark: i64, out: &mut dyn Output) -> Result<(), ExecError> {
        out.watermark(watermark)
    }

    /// End of input: flush any state.
    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }

    /// Emits what the operator holds back only to batch work up (a GPU
    /// chain's coalescing buffer), not state. The task calls it before a
    /// checkpoint's snapshot (so the rows belong to the checkpoint they
    /// arrived in) and when its input has been idle for a poll interval.
    fn flush(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }

    /// Checkpoint `checkpoint`'s barrier reached this operator: returns the
    /// operator's state at this point of the stream (`None`: it has none).
    /// Called between batches; everything the operator emits after this
    /// call belongs to the next checkpoint. A transactional sink stages
    /// (pre-commits) its output here.
    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        Ok(None)
    }

    /// Called once before any input when checkpointing is on: `Some` with
    /// what [`Operator::snapshot_state`] returned in the checkpoint the task
    /// restarts from, `None` when it starts from the beginning (first run,
    /// or no checkpoint completed). A transactional sink commits what the
    /// restored checkpoint staged and discards everything after it.
    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        match state {
            None => Ok(()),
            Some(_) => Err(ExecError::Unsupported {
                operator: "operator".into(),
                detail: "a checkpoint holds state for an operator that has none".into(),
            }),
        }
    }

    /// Checkpoint `checkpoint` completed on every task: a transactional sink
    /// commits what it staged up to it. [`FINAL_CHECKPOINT`] follows
    /// `finish` when the whole job has finished.
    fn notify_checkpoint_complete(&mut self, _checkpoint: u64) -> Result<(), ExecError> {
        Ok(())
    }

    /// After `finish`: whether output is staged that only
    /// `notify_checkpoint_complete(FINAL_CHECKPOINT)` commits.
    fn has_pending_commit(&self) -> bool {
        false
    }
}

/// The id of the commit that follows the end of the whole job.
pub const FINAL_CHECKPOINT: u64 = u64::MAX;

/// Keeps the rows for which the predicate is true (null counts as false).
pub struct FilterOperator {
    name: String,
    predicate: Expr,
    /// The GPU kernels, when placement put this filter on the GPU.
    kernels: Option<Arc<dyn KernelBackend>>,
}

impl FilterOperator {
    pub fn new(name: &str, predicate: Expr) -> Self {
        Self {
            name: name.to_owned(),
            predicate,
            kernels: None,
        }
    }

    /// Evaluates the predicate with `kernels` where it has their shape
    /// (see [`super::gpu_filter`]), else with the expression evaluator.
    pub fn on_gpu(mut self, kernels: Arc<dyn KernelBackend>) -> Self {
        self.kernels = Some(kernels);
        self
    }
}

impl Operator for FilterOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        if let Some(kernels) = &self.kernels {
            let mask = super::gpu_filter::selection(&self.predicate, &batch, kernels.as_ref())
                .map_err(|e| ExecError::Expression {
                    operator: self.name.clone(),
                    detail: e.to_string(),
                })?;
            if let Some(mask) = mask {
                let kept = filter_record_batch(&batch, &mask)?;
                if kept.num_rows() > 0 {
                    out.emit(kept)?;
                }
                return Ok(());
            }
        }
        let mask = self
            .predicate
            .eval(&batch)
            .map_err(|e| ExecError::Expression {
                operator: self.name.clone(),
                detail: e.to_string(),
            })?;
        let mask = mask.as_boolean_opt().ok_or_else(|| ExecError::Expression {
            operator: self.name.clone(),
            detail: "predicate is not boolean".into(),
        })?;
        let kept = if mask.null_count() == 0 && mask.true_count() == batch.num_rows() {
            batch
        } else {
            filter_record_batch(&batch, mask)?
        };
        if kept.num_rows() > 0 {
            out.emit(kept)?;
        }
        Ok(())
    }
}

/// Computes named expressions into a new batch.
pub struct ProjectOperator {
    name: String,
    columns: Vec<NamedExpr>,
    schema: SchemaRef,
    /// The GPU kernels, when placement put this projection on the GPU.
    kernels: Option<Arc<dyn KernelBackend>>,
}

impl ProjectOperator {
    pub fn new(name: &str, columns: Vec<NamedExpr>, schema: SchemaRef) -> Self {
        Self {
            name: name.to_owned(),
            columns,
            schema,
            kernels: None,
        }
    }

    /// Computes `left <op> right` columns with `kernels` (see
    /// [`super::gpu_filter::projection`]), the rest with the evaluator.
    pub fn on_gpu(mut self, kernels: Arc<dyn KernelBackend>) -> Self {
        self.kernels = Some(kernels);
        self
    }

    fn evaluate(&self, expr: &Expr, batch: &RecordBatch) -> Result<ArrayRef, ExecError> {
        let expression_error = |detail: String| ExecError::Expression {
            operator: self.name.clone(),
            detail,
        };
        if let Some(kernels) = &self.kernels
            && let Some(array) = super::gpu_filter::projection(expr, batch, kernels.as_ref())
                .map_err(|e| expression_error(e.to_string()))?
        {
            return Ok(array);
        }
        expr.eval(batch)
            .map_err(|e| expression_error(e.to_string()))
    }
}

impl Operator for ProjectOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let arrays = self
            .columns
            .iter()
            .zip(self.schema.fields())
            .map(|(c, field)| {
                let a = self.evaluate(&c.expr, &batch)?;
                if a.data_type() == field.data_type() {
                    Ok(a)
                } else {
                    Ok(arrow_cast::cast(&a, field.data_type())?)
                }
            })
            .collect::<Result<Vec<ArrayRef>, ExecError>>()?;
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        out.emit(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            arrays,
            &options,
        )?)
    }
}
