//! Column arithmetic `left <op> right`: the CPU twin of `kernels/project.cu`.
//!
//! Each side is a column or a literal. Nulls propagate: a row is valid when
//! both operands are, and a null row's value is 0 (as the kernel writes it).
//! `i64` supports `+ - *` and never wraps: the first overflowing row (in row
//! order; the kernel reports the same row with an atomic minimum) fails the
//! whole call with [`ProjectError::Overflow`]. Null rows never overflow,
//! whatever garbage their value slots hold. `f64` supports `+ - * /` with IEEE
//! round-to-nearest, so `x / 0.0` is ±inf and `0.0 / 0.0` is NaN.

use std::convert::Infallible;

use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{ArrowPrimitiveType, Float64Array, Int64Array, PrimitiveArray};
use arrow_buffer::ScalarBuffer;

use crate::kernels::cpu::column::{Column, bitmap_len_bytes, fill_bitmap, null_buffer};

/// An arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl ArithOp {
    pub const ALL: [ArithOp; 4] = [ArithOp::Add, ArithOp::Sub, ArithOp::Mul, ArithOp::Div];

    /// The operator's code in `kernels/project.cu` (`ARITH_ADD` = 0 … `ARITH_DIV` = 3).
    pub const fn code(self) -> u32 {
        match self {
            ArithOp::Add => 0,
            ArithOp::Sub => 1,
            ArithOp::Mul => 2,
            ArithOp::Div => 3,
        }
    }
}

/// Errors of the projection kernels.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProjectError {
    #[error("integer overflow at row {row}: {left} {op:?} {right} does not fit in Int64")]
    Overflow {
        row: usize,
        op: ArithOp,
        left: i64,
        right: i64,
    },
    #[error("{op:?} is not supported on Int64 columns (only Add, Sub and Mul)")]
    UnsupportedInt64Op { op: ArithOp },
    #[error("operands have different row counts: left {left_rows}, right {right_rows}")]
    RowCountMismatch { left_rows: usize, right_rows: usize },
    #[error("at least one operand must be a column, not both literals")]
    NoColumnOperand,
}

/// One side of a slice-level projection.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a, T> {
    Column(Column<'a, T>),
    Literal(T),
}

/// One side of an Arrow-level projection.
#[derive(Debug)]
pub enum ArrayOperand<'a, A: ArrowPrimitiveType> {
    Array(&'a PrimitiveArray<A>),
    Literal(A::Native),
}

// Written out because the derive would demand `A: Copy` of the type marker.
impl<A: ArrowPrimitiveType> Clone for ArrayOperand<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A: ArrowPrimitiveType> Copy for ArrayOperand<'_, A> {}

/// The two sides of `left <op> right`, named because `-` and `/` care.
#[derive(Clone, Copy, Debug)]
pub struct Operands<O> {
    pub left: O,
    pub right: O,
}

/// Where a projection writes: one value per row and the output validity
/// bitmap (`bitmap_len_bytes(values.len())` bytes).
#[derive(Debug)]
pub struct ProjectOutput<'a, T> {
    pub values: &'a mut [T],
    pub validity: &'a mut [u8],
}

impl<T: Copy> Operand<'_, T> {
    #[inline]
    fn get(&self, row: usize) -> Option<T> {
        match self {
            Operand::Column(column) => column.get(row),
            Operand::Literal(literal) => Some(*literal),
        }
    }

    fn assert_row_count(&self, row_count: usize) {
        if let Operand::Column(column) = self {
            assert_eq!(column.row_count(), row_count, "operand row count");
        }
    }
}

/// `left <op> right` over `i64`, writing `output`; fails at the first
/// overflowing valid row.
///
/// # Panics
/// If a column operand or the output bitmap does not match
/// `output.values.len()` rows.
pub fn project_i64(
    op: ArithOp,
    operands: Operands<Operand<'_, i64>>,
    output: ProjectOutput<'_, i64>,
) -> Result<(), ProjectError> {
    let apply = checked_op(op).ok_or(ProjectError::UnsupportedInt64Op { op })?;
    project_rows(operands, output, |row, left, right| {
        apply(left, right).ok_or(ProjectError::Overflow {
            row,
            op,
            left,
            right,
        })
    })
}

/// `left <op> right` over `f64`, writing `output`.
///
/// # Panics
/// If a column operand or the output bitmap does not match
/// `output.values.len()` rows.
pub fn project_f64(
    op: ArithOp,
    operands: Operands<Operand<'_, f64>>,
    output: ProjectOutput<'_, f64>,
) {
    let apply = float_op(op);
    let Ok(()) =
        project_rows::<_, Infallible>(operands, output, |_, left, right| Ok(apply(left, right)));
}

/// `left <op> right` over Int64 arrays and literals.
pub fn project_i64_array(
    op: ArithOp,
    operands: Operands<ArrayOperand<'_, Int64Type>>,
) -> Result<Int64Array, ProjectError> {
    let row_count = operand_row_count(&operands)?;
    let mut values = vec![0; row_count];
    let mut validity = vec![0; bitmap_len_bytes(row_count)];
    let output = ProjectOutput {
        values: &mut values,
        validity: &mut validity,
    };
    project_i64(op, slice_operands(&operands), output)?;
    Ok(Int64Array::new(
        ScalarBuffer::from(values),
        null_buffer(validity, row_count),
    ))
}

/// `left <op> right` over Float64 arrays and literals.
pub fn project_f64_array(
    op: ArithOp,
    operands: Operands<ArrayOperand<'_, Float64Type>>,
) -> Result<Float64Array, ProjectError> {
    let row_count = operand_row_count(&operands)?;
    let mut values = vec![0.0; row_count];
    let mut validity = vec![0; bitmap_len_bytes(row_count)];
    let output = ProjectOutput {
        values: &mut values,
        validity: &mut validity,
    };
    project_f64(op, slice_operands(&operands), output);
    Ok(Float64Array::new(
        ScalarBuffer::from(values),
        null_buffer(validity, row_count),
    ))
}

/// Drives a projection row by row: output validity, zero for null rows, and
/// the first error in row order.
fn project_rows<T: Copy + Default, E>(
    operands: Operands<Operand<'_, T>>,
    output: ProjectOutput<'_, T>,
    mut apply: impl FnMut(usize, T, T) -> Result<T, E>,
) -> Result<(), E> {
    let row_count = output.values.len();
    operands.left.assert_row_count(row_count);
    operands.right.assert_row_count(row_count);
    fill_bitmap(output.validity, row_count, |row| {
        operands.left.get(row).is_some() && operands.right.get(row).is_some()
    });
    for (row, slot) in output.values.iter_mut().enumerate() {
        *slot = match (operands.left.get(row), operands.right.get(row)) {
            (Some(left), Some(right)) => apply(row, left, right)?,
            _ => T::default(),
        };
    }
    Ok(())
}

fn checked_op(op: ArithOp) -> Option<fn(i64, i64) -> Option<i64>> {
    match op {
        ArithOp::Add => Some(i64::checked_add),
        ArithOp::Sub => Some(i64::checked_sub),
        ArithOp::Mul => Some(i64::checked_mul),
        ArithOp::Div => None,
    }
}

fn float_op(op: ArithOp) -> fn(f64, f64) -> f64 {
    match op {
        ArithOp::Add => |l, r| l + r,
        ArithOp::Sub => |l, r| l - r,
        ArithOp::Mul => |l, r| l * r,
        ArithOp::Div => |l, r| l / r,
    }
}

fn operand_row_count<A: ArrowPrimitiveType>(
    operands: &Operands<ArrayOperand<'_, A>>,
) -> Result<usize, ProjectError> {
    match (operands.left, operands.right) {
        (ArrayOperand::Array(left), ArrayOperand::Array(right)) if left.len() != right.len() => {
            Err(ProjectError::RowCountMismatch {
                left_rows: left.len(),
                right_rows: right.len(),
            })
        }
        (ArrayOperand::Array(array), _) | (_, ArrayOperand::Array(array)) => Ok(array.len()),
        (ArrayOperand::Literal(_), ArrayOperand::Literal(_)) => Err(ProjectError::NoColumnOperand),
    }
}

fn slice_operands<'a, A: ArrowPrimitiveType>(
    operands: &Operands<ArrayOperand<'a, A>>,
) -> Operands<Operand<'a, A::Native>> {
    let slice = |operand: ArrayOperand<'a, A>| match operand {
        ArrayOperand::Array(array) => Operand::Column(Column::from_array(array)),
        ArrayOperand::Literal(literal) => Operand::Literal(literal),
    };
    Operands {
        left: slice(operands.left),
        right: slice(operands.right),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use proptest::prelude::*;

    fn edge_i64() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(i64::MIN + 1),
            Just(i64::MAX - 1),
            Just(-1),
            Just(0),
            Just(1),
            Just(2),
            Just(1 << 32),
            Just(3_037_000_500), // just above sqrt(i64::MAX)
            any::<i64>()
        ]
    }

    fn edge_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            (-3i8..3).prop_map(f64::from),
            any::<f64>()
        ]
    }

    fn int_op() -> impl Strategy<Value = ArithOp> {
        proptest::sample::select(vec![ArithOp::Add, ArithOp::Sub, ArithOp::Mul])
    }

    fn any_op() -> impl Strategy<Value = ArithOp> {
        proptest::sample::select(ArithOp::ALL.to_vec())
    }

    /// The reference computes in i128 and checks the range, row by row.
    fn reference_i64(op: ArithOp, rows: &[RowPair<i64>]) -> Result<Vec<Option<i64>>, usize> {
        let mut out = Vec::new();
        for (row, pair) in rows.iter().enumerate() {
            let value = match *pair {
                (Some(l), Some(r)) => {
                    let (l, r) = (i128::from(l), i128::from(r));
                    let wide = match op {
                        ArithOp::Add => l + r,
                        ArithOp::Sub => l - r,
                        ArithOp::Mul => l * r,
                        ArithOp::Div => unreachable!(),
                    };
                    Some(i64::try_from(wide).map_err(|_| row)?)
                }
                _ => None,
            };
            out.push(value);
        }
        Ok(out)
    }

    fn reference_f64(op: ArithOp, l: Option<f64>, r: Option<f64>) -> Option<f64> {
        let (l, r) = (l?, r?);
        Some(match op {
            ArithOp::Add => l + r,
            ArithOp::Sub => l - r,
            ArithOp::Mul => l * r,
            ArithOp::Div => l / r,
        })
    }

    /// Equal bits, or both NaN (IEEE leaves NaN payloads unspecified).
    fn same_f64(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            (a, b) => a.is_none() && b.is_none(),
        }
    }

    fn check_null_slots_are_zero<A: ArrowPrimitiveType>(array: &PrimitiveArray<A>)
    where
        A::Native: Default + PartialEq,
    {
        for row in 0..array.len() {
            if array.is_null(row) {
                assert!(
                    array.values()[row] == A::Native::default(),
                    "null row {row} not zero"
                );
            }
        }
    }

    /// One row's (left, right) operands.
    type RowPair<T> = (Option<T>, Option<T>);

    /// Row pairs of (left, right) operands, 15% null on each side.
    fn row_pairs<S: Strategy>(
        values: impl Fn() -> S,
    ) -> impl Strategy<Value = Vec<RowPair<S::Value>>> {
        let side = || prop::option::weighted(0.85, values());
        prop::collection::vec((side(), side()), 0..100)
    }

    fn arrays<'a, A: ArrowPrimitiveType>(
        left: &'a PrimitiveArray<A>,
        right: &'a PrimitiveArray<A>,
    ) -> Operands<ArrayOperand<'a, A>> {
        Operands {
            left: ArrayOperand::Array(left),
            right: ArrayOperand::Array(right),
        }
    }

    fn split<T: Copy, A>(rows: &[RowPair<T>]) -> (PrimitiveArray<A>, PrimitiveArray<A>)
    where
        A: ArrowPrimitiveType<Native = T>,
    {
        let left = rows.iter().map(|r| r.0).collect();
        let right = rows.iter().map(|r| r.1).collect();
        (left, right)
    }

    proptest! {
        #[test]
        fn project_i64_columns_match_i128_reference_or_name_the_first_overflow(
            rows in row_pairs(edge_i64),
            op in int_op(),
        ) {
            let (left, right) = split::<i64, Int64Type>(&rows);
            let got = project_i64_array(op, arrays(&left, &right));
            match reference_i64(op, &rows) {
                Ok(expected) => {
                    let got = got.unwrap();
                    prop_assert_eq!(got.iter().collect::<Vec<_>>(), expected);
                    check_null_slots_are_zero(&got);
                }
                Err(row) => {
                    let Err(ProjectError::Overflow { row: got_row, left, right, .. }) = got else {
                        panic!("expected overflow at row {row}, got {got:?}");
                    };
                    prop_assert_eq!(got_row, row);
                    prop_assert_eq!((Some(left), Some(right)), rows[row]);
                }
            }
        }

        #[test]
        fn project_i64_literal_on_either_side_matches_reference(
            column in prop::collection::vec(prop::option::weighted(0.85, edge_i64()), 0..100),
            literal in edge_i64(),
            literal_on_left in any::<bool>(),
            op in int_op(),
        ) {
            let array = Int64Array::from(column.clone());
            let (column_side, literal_side) = (ArrayOperand::Array(&array), ArrayOperand::Literal(literal));
            let (operands, rows): (_, Vec<_>) = if literal_on_left {
                let rows = column.iter().map(|v| (Some(literal), *v)).collect();
                (Operands { left: literal_side, right: column_side }, rows)
            } else {
                let rows = column.iter().map(|v| (*v, Some(literal))).collect();
                (Operands { left: column_side, right: literal_side }, rows)
            };
            let got = project_i64_array(op, operands).map(|a| a.iter().collect::<Vec<_>>());
            match (got, reference_i64(op, &rows)) {
                (Ok(got), Ok(expected)) => prop_assert_eq!(got, expected),
                (Err(ProjectError::Overflow { row, .. }), Err(expected)) => prop_assert_eq!(row, expected),
                (got, expected) => panic!("got {got:?}, expected {expected:?}"),
            }
        }

        #[test]
        fn project_f64_is_ieee_with_nulls_propagating(
            rows in row_pairs(edge_f64),
            offset in 0usize..9,
            op in any_op(),
        ) {
            let (left, right) = split::<f64, Float64Type>(&rows);
            let offset = offset.min(rows.len());
            let length = rows.len() - offset;
            let (left, right) = (left.slice(offset, length), right.slice(offset, length));
            let got = project_f64_array(op, arrays(&left, &right)).unwrap();
            check_null_slots_are_zero(&got);
            let expected = left.iter().zip(right.iter()).map(|(l, r)| reference_f64(op, l, r));
            for (row, (value, expected)) in got.iter().zip(expected).enumerate() {
                prop_assert!(same_f64(value, expected), "row {row}: {value:?} vs {expected:?}");
            }
        }
    }

    #[test]
    fn project_add_reports_overflow_at_the_row() {
        let left = Int64Array::from(vec![Some(1), None, Some(i64::MAX), Some(i64::MAX)]);
        let right = Int64Array::from(vec![Some(1), Some(i64::MAX), Some(1), Some(1)]);
        let operands = Operands {
            left: ArrayOperand::Array(&left),
            right: ArrayOperand::Array(&right),
        };
        let error = project_i64_array(ArithOp::Add, operands).unwrap_err();
        assert_eq!(
            error,
            ProjectError::Overflow {
                row: 2,
                op: ArithOp::Add,
                left: i64::MAX,
                right: 1
            }
        );
        assert!(error.to_string().contains("row 2"), "{error}");
    }

    #[test]
    fn project_mul_of_min_by_minus_one_overflows() {
        let column = Int64Array::from(vec![i64::MIN]);
        let operands = Operands {
            left: ArrayOperand::Array(&column),
            right: ArrayOperand::Literal(-1),
        };
        let error = project_i64_array(ArithOp::Mul, operands).unwrap_err();
        assert!(matches!(error, ProjectError::Overflow { row: 0, .. }));
    }

    #[test]
    fn project_sub_literal_minus_column_keeps_operand_order() {
        let column = Int64Array::from(vec![1, 2]);
        let operands = Operands {
            left: ArrayOperand::Literal(10),
            right: ArrayOperand::Array(&column),
        };
        let got = project_i64_array(ArithOp::Sub, operands).unwrap();
        assert_eq!(got.values().to_vec(), vec![9, 8]);
    }

    #[test]
    fn project_null_rows_never_overflow() {
        let left = Int64Array::from(vec![None, Some(1)]);
        let right = Int64Array::from(vec![Some(i64::MAX), Some(1)]);
        let operands = Operands {
            left: ArrayOperand::Array(&left),
            right: ArrayOperand::Literal(i64::MAX),
        };
        assert!(project_i64_array(ArithOp::Add, operands).is_err());
        let operands = Operands {
            left: ArrayOperand::Array(&left),
            right: ArrayOperand::Array(&right),
        };
        let got = project_i64_array(ArithOp::Mul, operands).unwrap();
        assert_eq!(got.iter().collect::<Vec<_>>(), vec![None, Some(1)]);
    }

    #[test]
    fn project_i64_division_is_rejected_not_wrapped() {
        let column = Int64Array::from(vec![1]);
        let operands = Operands {
            left: ArrayOperand::Array(&column),
            right: ArrayOperand::Literal(1),
        };
        assert_eq!(
            project_i64_array(ArithOp::Div, operands).unwrap_err(),
            ProjectError::UnsupportedInt64Op { op: ArithOp::Div }
        );
    }

    #[test]
    fn project_f64_divides_by_zero_to_infinity_and_nan() {
        let column = Float64Array::from(vec![1.0, -1.0, 0.0]);
        let operands = Operands {
            left: ArrayOperand::Array(&column),
            right: ArrayOperand::Literal(0.0),
        };
        let got = project_f64_array(ArithOp::Div, operands).unwrap();
        assert_eq!(got.value(0), f64::INFINITY);
        assert_eq!(got.value(1), f64::NEG_INFINITY);
        assert!(got.value(2).is_nan());
    }

    #[test]
    fn project_rejects_mismatched_row_counts_and_two_literals() {
        let (a, b) = (Int64Array::from(vec![1]), Int64Array::from(vec![1, 2]));
        let mismatched = Operands {
            left: ArrayOperand::Array(&a),
            right: ArrayOperand::Array(&b),
        };
        assert_eq!(
            project_i64_array(ArithOp::Add, mismatched).unwrap_err(),
            ProjectError::RowCountMismatch {
                left_rows: 1,
                right_rows: 2
            }
        );
        let literals = Operands {
            left: ArrayOperand::<Int64Type>::Literal(1),
            right: ArrayOperand::Literal(2),
        };
        assert_eq!(
            project_i64_array(ArithOp::Add, literals).unwrap_err(),
            ProjectError::NoColumnOperand
        );
    }
}
