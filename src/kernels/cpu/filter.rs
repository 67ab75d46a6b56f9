//! Predicate filter `column <op> literal`: the CPU twin of `kernels/filter.cu`.
//!
//! The result is a selection bitmap: row `i` is selected when it is valid and
//! satisfies the predicate, so null rows are never selected. Comparisons are
//! IEEE 754 for floats: a NaN on either side makes every operator false
//! except `!=`, and `-0.0 == 0.0`.

use arrow_array::{BooleanArray, Float64Array, Int64Array};

use crate::kernels::cpu::column::{Column, bitmap_len_bytes, boolean_buffer, fill_bitmap};

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Ne,
    Eq,
}

impl CmpOp {
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::Ne,
        CmpOp::Eq,
    ];

    /// The operator's code in `kernels/filter.cu` (`CMP_LT` = 0 … `CMP_EQ` = 5).
    pub const fn code(self) -> u32 {
        match self {
            CmpOp::Lt => 0,
            CmpOp::Le => 1,
            CmpOp::Gt => 2,
            CmpOp::Ge => 3,
            CmpOp::Ne => 4,
            CmpOp::Eq => 5,
        }
    }

    /// `value <op> literal` with `PartialOrd`'s IEEE semantics for floats.
    #[inline]
    pub fn holds<T: PartialOrd>(self, value: T, literal: T) -> bool {
        match self {
            CmpOp::Lt => value < literal,
            CmpOp::Le => value <= literal,
            CmpOp::Gt => value > literal,
            CmpOp::Ge => value >= literal,
            CmpOp::Ne => value != literal,
            CmpOp::Eq => value == literal,
        }
    }
}

/// Writes the selection bitmap of `column <op> literal` (see
/// [`fill_bitmap`] for its shape) and returns the number of selected rows.
pub fn filter_i64(column: Column<'_, i64>, op: CmpOp, literal: i64, selection: &mut [u8]) -> usize {
    filter_column(column, op, literal, selection)
}

/// Writes the selection bitmap of `column <op> literal` and returns the
/// number of selected rows.
pub fn filter_f64(column: Column<'_, f64>, op: CmpOp, literal: f64, selection: &mut [u8]) -> usize {
    filter_column(column, op, literal, selection)
}

/// The selection mask of `array <op> literal`, without nulls (ready for
/// `arrow_select::filter`).
pub fn filter_i64_array(array: &Int64Array, op: CmpOp, literal: i64) -> BooleanArray {
    let column = Column::from_array(array);
    let mut selection = vec![0; bitmap_len_bytes(column.row_count())];
    filter_i64(column, op, literal, &mut selection);
    BooleanArray::new(boolean_buffer(selection, column.row_count()), None)
}

/// The selection mask of `array <op> literal`, without nulls.
pub fn filter_f64_array(array: &Float64Array, op: CmpOp, literal: f64) -> BooleanArray {
    let column = Column::from_array(array);
    let mut selection = vec![0; bitmap_len_bytes(column.row_count())];
    filter_f64(column, op, literal, &mut selection);
    BooleanArray::new(boolean_buffer(selection, column.row_count()), None)
}

fn filter_column<T: Copy + PartialOrd>(
    column: Column<'_, T>,
    op: CmpOp,
    literal: T,
    selection: &mut [u8],
) -> usize {
    let values = column.values();
    match column.validity() {
        None => fill_bitmap(selection, values.len(), |row| {
            op.holds(values[row], literal)
        }),
        Some(validity) => fill_bitmap(selection, values.len(), |row| {
            validity.is_valid(row) && op.holds(values[row], literal)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use proptest::prelude::*;

    /// The plain-language definition: one row at a time over Arrow's
    /// `Option` iterator, with Rust's comparison operators written out.
    fn reference<T: PartialOrd + Copy>(
        rows: impl Iterator<Item = Option<T>>,
        op: CmpOp,
        literal: T,
    ) -> Vec<bool> {
        rows.map(|row| match row {
            None => false,
            Some(v) => match op {
                CmpOp::Lt => v < literal,
                CmpOp::Le => v <= literal,
                CmpOp::Gt => v > literal,
                CmpOp::Ge => v >= literal,
                CmpOp::Ne => v != literal,
                CmpOp::Eq => v == literal,
            },
        })
        .collect()
    }

    fn selected(mask: &BooleanArray) -> Vec<bool> {
        assert_eq!(mask.null_count(), 0);
        mask.values().iter().collect()
    }

    fn edge_i64() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(0),
            Just(-1),
            -3i64..3,
            any::<i64>()
        ]
    }

    fn edge_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MIN_POSITIVE / 2.0),
            (-3i8..3).prop_map(f64::from),
            any::<f64>()
        ]
    }

    fn op() -> impl Strategy<Value = CmpOp> {
        proptest::sample::select(CmpOp::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn filter_i64_selects_valid_rows_that_satisfy_the_predicate(
            rows in prop::collection::vec(prop::option::weighted(0.8, edge_i64()), 0..200),
            offset in 0usize..9,
            op in op(),
            literal in edge_i64(),
        ) {
            let array = Int64Array::from(rows);
            let array = array.slice(offset.min(array.len()), array.len() - offset.min(array.len()));
            let mask = filter_i64_array(&array, op, literal);
            prop_assert_eq!(selected(&mask), reference(array.iter(), op, literal));
        }

        #[test]
        fn filter_f64_follows_ieee_for_nan_and_signed_zero(
            rows in prop::collection::vec(prop::option::weighted(0.8, edge_f64()), 0..200),
            offset in 0usize..9,
            op in op(),
            literal in edge_f64(),
        ) {
            let array = Float64Array::from(rows);
            let array = array.slice(offset.min(array.len()), array.len() - offset.min(array.len()));
            let mask = filter_f64_array(&array, op, literal);
            prop_assert_eq!(selected(&mask), reference(array.iter(), op, literal));
        }

        #[test]
        fn filter_returns_the_selected_row_count(
            rows in prop::collection::vec(prop::option::weighted(0.8, edge_i64()), 0..200),
            op in op(),
            literal in edge_i64(),
        ) {
            let array = Int64Array::from(rows);
            let mut selection = vec![0; bitmap_len_bytes(array.len())];
            let count = filter_i64(Column::from_array(&array), op, literal, &mut selection);
            let expected = reference(array.iter(), op, literal).iter().filter(|s| **s).count();
            prop_assert_eq!(count, expected);
        }
    }

    #[test]
    fn nan_is_selected_only_by_not_equal() {
        let array = Float64Array::from(vec![f64::NAN, 1.0]);
        for op in CmpOp::ALL {
            let mask = filter_f64_array(&array, op, f64::NAN);
            assert_eq!(selected(&mask), vec![op == CmpOp::Ne; 2], "{op:?}");
        }
    }

    #[test]
    fn negative_zero_equals_zero() {
        let array = Float64Array::from(vec![-0.0]);
        assert_eq!(selected(&filter_f64_array(&array, CmpOp::Eq, 0.0)), [true]);
        assert_eq!(selected(&filter_f64_array(&array, CmpOp::Lt, 0.0)), [false]);
    }

    #[test]
    fn null_rows_are_never_selected() {
        let array = Int64Array::from(vec![None, Some(1)]);
        for op in CmpOp::ALL {
            assert!(!selected(&filter_i64_array(&array, op, 1))[0], "{op:?}");
        }
    }
}
