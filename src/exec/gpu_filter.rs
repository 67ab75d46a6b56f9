//! Filters and projections on the kernel backend.
//!
//! A projected column `left <op> right` (`+ - *` on Int64, `+ - * /` on
//! Float64, each side a column or a literal of the same type) is one project
//! launch; any other expression returns `None` and the evaluator computes
//! it. Results equal the evaluator's: nulls propagate, Float64 is IEEE, and
//! an Int64 overflow fails the batch (the message names the row instead of
//! the expression).
//!
//! Filter predicates: the selection of a predicate
//! made of Int64 `column <op> literal` comparisons joined by `and` / `or`,
//! one filter launch per comparison and the selection bitmaps combined on
//! the host.
//!
//! Other predicates return `None` and the filter evaluates them with the
//! expression evaluator: `not` (a kernel selection drops null rows, so
//! `not` of it would keep them, where SQL drops them), and Float64
//! comparisons (the evaluator orders NaN above every number like Arrow's
//! comparison kernels, the filter kernel follows IEEE 754). `and` and `or`
//! agree with SQL's three-valued logic once a null result is dropped: a
//! comparison on a null row selects nothing, and so does its null result.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{ArrayRef, BooleanArray, RecordBatch};

use crate::job::{BinOp, Expr, ScalarValue};
use crate::kernels::backend::{KernelBackend, KernelError};
use crate::kernels::cpu::filter::CmpOp;
use crate::kernels::cpu::project::{ArithOp, ArrayOperand, Operands};

/// The rows `predicate` selects, or `None` when it is not of the supported
/// shape (the caller evaluates it on the CPU).
pub fn selection(
    predicate: &Expr,
    batch: &RecordBatch,
    kernels: &dyn KernelBackend,
) -> Result<Option<BooleanArray>, KernelError> {
    if !supported(predicate, batch) {
        return Ok(None);
    }
    evaluate(predicate, batch, kernels).map(Some)
}

/// One side of a kernel projection.
fn operand<'b, T: arrow_array::ArrowPrimitiveType>(
    expr: &Expr,
    batch: &'b RecordBatch,
    literal: impl Fn(&ScalarValue) -> Option<T::Native>,
) -> Option<ArrayOperand<'b, T>> {
    match expr {
        Expr::Column(name) => {
            let index = batch.schema().index_of(name).ok()?;
            batch
                .column(index)
                .as_primitive_opt::<T>()
                .map(ArrayOperand::Array)
        }
        Expr::Literal(value) => literal(value).map(ArrayOperand::Literal),
        _ => None,
    }
}

/// The column `expr` computes, when it is one kernel projection; `None`
/// otherwise (the caller evaluates it).
pub fn projection(
    expr: &Expr,
    batch: &RecordBatch,
    kernels: &dyn KernelBackend,
) -> Result<Option<ArrayRef>, KernelError> {
    let Expr::Binary { op, left, right } = expr else {
        return Ok(None);
    };
    let op = match op {
        BinOp::Add => ArithOp::Add,
        BinOp::Sub => ArithOp::Sub,
        BinOp::Mul => ArithOp::Mul,
        BinOp::Div => ArithOp::Div,
        _ => return Ok(None),
    };
    if matches!(
        (left.as_ref(), right.as_ref()),
        (Expr::Literal(_), Expr::Literal(_))
    ) {
        return Ok(None);
    }
    let int = |v: &ScalarValue| match v {
        ScalarValue::Int64(v) => Some(*v),
        _ => None,
    };
    let float = |v: &ScalarValue| match v {
        ScalarValue::Float64(v) => Some(*v),
        _ => None,
    };
    if op != ArithOp::Div
        && let (Some(l), Some(r)) = (
            operand::<Int64Type>(left, batch, int),
            operand::<Int64Type>(right, batch, int),
        )
    {
        let operands = Operands { left: l, right: r };
        return Ok(Some(Arc::new(kernels.project_i64(op, operands)?)));
    }
    if let (Some(l), Some(r)) = (
        operand::<Float64Type>(left, batch, float),
        operand::<Float64Type>(right, batch, float),
    ) {
        let operands = Operands { left: l, right: r };
        return Ok(Some(Arc::new(kernels.project_f64(op, operands)?)));
    }
    Ok(None)
}

/// A comparison's column, operator (as `column <op> literal`) and literal.
fn comparison<'e>(expr: &'e Expr, batch: &RecordBatch) -> Option<(&'e str, CmpOp, i64)> {
    let Expr::Binary { op, left, right } = expr else {
        return None;
    };
    let op = match op {
        BinOp::Eq => CmpOp::Eq,
        BinOp::NotEq => CmpOp::Ne,
        BinOp::Lt => CmpOp::Lt,
        BinOp::LtEq => CmpOp::Le,
        BinOp::Gt => CmpOp::Gt,
        BinOp::GtEq => CmpOp::Ge,
        _ => return None,
    };
    let (column, literal, op) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(ScalarValue::Int64(l))) => (c, *l, op),
        (Expr::Literal(ScalarValue::Int64(l)), Expr::Column(c)) => (c, *l, mirrored(op)),
        _ => return None,
    };
    let index = batch.schema().index_of(column).ok()?;
    batch.column(index).as_primitive_opt::<Int64Type>()?;
    Some((column.as_str(), op, literal))
}

/// `literal <op> column` as `column <mirrored op> literal`.
fn mirrored(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Ge => CmpOp::Le,
        CmpOp::Eq | CmpOp::Ne => op,
    }
}

fn supported(expr: &Expr, batch: &RecordBatch) -> bool {
    match expr {
        Expr::Binary {
            op: BinOp::And | BinOp::Or,
            left,
            right,
        } => supported(left, batch) && supported(right, batch),
        _ => comparison(expr, batch).is_some(),
    }
}

fn evaluate(
    expr: &Expr,
    batch: &RecordBatch,
    kernels: &dyn KernelBackend,
) -> Result<BooleanArray, KernelError> {
    if let Expr::Binary {
        op: op @ (BinOp::And | BinOp::Or),
        left,
        right,
    } = expr
    {
        let left = evaluate(left, batch, kernels)?;
        let right = evaluate(right, batch, kernels)?;
        return Ok(match op {
            BinOp::And => arrow_arith::boolean::and(&left, &right)?,
            _ => arrow_arith::boolean::or(&left, &right)?,
        });
    }
    let (column, op, literal) =
        comparison(expr, batch).expect("`supported` checked every comparison");
    let index = batch.schema().index_of(column)?;
    let values = batch.column(index).as_primitive::<Int64Type>();
    kernels.filter_i64(values, op, literal)
}

#[cfg(test)]
mod tests {
    use arrow_array::{Array, Float64Array, Int64Array};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::kernels::backend::CpuBackend;

    fn batch() -> RecordBatch {
        let key: Int64Array = (0..500).map(|i| (i % 7 != 0).then_some(i % 5)).collect();
        let value: Int64Array = (0..500).map(|i| (i % 11 != 0).then_some(i - 250)).collect();
        let price: Float64Array = (0..500).map(|i| Some(i as f64)).collect();
        let schema = Schema::new(vec![
            Field::new("key", DataType::Int64, true),
            Field::new("value", DataType::Int64, true),
            Field::new("price", DataType::Float64, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(key), Arc::new(value), Arc::new(price)],
        )
        .unwrap()
    }

    /// The evaluator's mask with nulls dropped, as the filter applies it.
    fn evaluator_selection(predicate: &Expr, batch: &RecordBatch) -> Vec<bool> {
        let mask = predicate.eval(batch).unwrap();
        let mask = mask.as_boolean();
        (0..mask.len())
            .map(|i| mask.is_valid(i) && mask.value(i))
            .collect()
    }

    #[test]
    fn kernel_selection_equals_the_evaluator_with_nulls_and_mirrored_literals() {
        let batch = batch();
        for text in [
            "value >= 10",
            "10 > value",
            "value >= 10 and key != 3",
            "key = 1 or 5 <= value and value < 100",
            "(key = 1 or key = 2) and value != 0",
        ] {
            let predicate = Expr::parse(text).unwrap();
            let selection = selection(&predicate, &batch, &CpuBackend)
                .unwrap()
                .unwrap_or_else(|| panic!("{text} should run on the kernels"));
            assert_eq!(selection.null_count(), 0);
            let kernel: Vec<bool> = selection.iter().map(|v| v == Some(true)).collect();
            assert_eq!(kernel, evaluator_selection(&predicate, &batch), "{text}");
        }
    }

    #[test]
    fn kernel_projection_equals_the_evaluator() {
        let batch = batch();
        for text in [
            "value * 3",
            "value + key",
            "7 - value",
            "price / 4.0",
            "price * price",
        ] {
            let expr = Expr::parse(text).unwrap();
            let kernel = projection(&expr, &batch, &CpuBackend)
                .unwrap()
                .unwrap_or_else(|| panic!("{text} should run on the kernels"));
            let evaluated = expr.eval(&batch).unwrap();
            assert_eq!(kernel.as_ref(), evaluated.as_ref(), "{text}");
        }
        for text in ["value / 2", "value % 7", "price * value", "1 + 2", "key"] {
            let expr = Expr::parse(text).unwrap();
            assert!(
                projection(&expr, &batch, &CpuBackend).unwrap().is_none(),
                "{text}"
            );
        }
    }

    #[test]
    fn not_and_float_predicates_stay_on_the_evaluator() {
        let batch = batch();
        for text in ["not value > 3", "price > 1.5", "value + 1 > 3", "key > 1.5"] {
            let predicate = Expr::parse(text).unwrap();
            assert!(
                selection(&predicate, &batch, &CpuBackend)
                    .unwrap()
                    .is_none(),
                "{text}"
            );
        }
    }
}
