//! Key hashing over raw column buffers: the CPU twin of `kernels/hash.cu`.
//!
//! [`crate::kernels::cpu::hash`] defines the stable hash and hashes Arrow
//! arrays of every key type; this module hashes exactly the buffers that the
//! GPU kernels receive (one function per kernel entry point), so that the
//! equality tests compare like with like. Each call hashes one key column
//! into `hashes`: [`HashMode::Replace`] for the first key column,
//! [`HashMode::Combine`] for the rest (folded in with `combine`). Null rows
//! hash as `NULL_HASH`; integers widen to 64 bits and floats to `f64`, as in
//! `hash.rs`.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, GenericStringArray, OffsetSizeTrait};
use arrow_schema::DataType;

use crate::kernels::cpu::column::{Column, Validity};
use crate::kernels::cpu::hash::{HashError, NULL_HASH, combine, hash_bytes, hash_f64, hash_u64};

/// Whether a column's hash replaces the running row hash or is folded into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashMode {
    /// The first key column: `hashes[row] = hash`.
    Replace,
    /// Every later key column: `hashes[row] = combine(hashes[row], hash)`.
    Combine,
}

impl HashMode {
    /// The kernels' `combine_with_previous` argument.
    pub const fn code(self) -> u32 {
        match self {
            HashMode::Replace => 0,
            HashMode::Combine => 1,
        }
    }

    fn mode_for_column(column_index: usize) -> Self {
        if column_index == 0 {
            HashMode::Replace
        } else {
            HashMode::Combine
        }
    }
}

/// A string column: row `i` is `data[offsets[i] .. offsets[i + 1]]`; the
/// offsets need not start at zero (a sliced Arrow array).
#[derive(Clone, Copy, Debug)]
pub struct Utf8Column<'a, O> {
    offsets: &'a [O],
    data: &'a [u8],
    validity: Option<Validity<'a>>,
}

impl<'a, O: OffsetSizeTrait> Utf8Column<'a, O> {
    /// # Panics
    /// If `offsets` is empty, its last offset lies past `data`, or the
    /// bitmap cannot cover the rows; offsets that decrease panic in debug
    /// builds (an O(n) check).
    pub fn new(offsets: &'a [O], data: &'a [u8], validity: Option<Validity<'a>>) -> Self {
        let last = offsets.last().expect("offsets hold row_count + 1 entries");
        assert!(last.as_usize() <= data.len(), "offsets run past the data");
        debug_assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "offsets decrease");
        let row_count = offsets.len() - 1;
        assert!(
            validity.is_none_or(|validity| validity.covers(row_count)),
            "validity bitmap cannot cover {row_count} rows"
        );
        Utf8Column {
            offsets,
            data,
            validity,
        }
    }

    /// A view of an Arrow string array's buffers (no copy).
    pub fn from_array(array: &'a GenericStringArray<O>) -> Self {
        Utf8Column::new(
            array.value_offsets(),
            array.value_data(),
            Validity::from_nulls(array.nulls()),
        )
    }

    pub fn row_count(&self) -> usize {
        self.offsets.len() - 1
    }

    #[inline]
    fn get(&self, row: usize) -> Option<&'a [u8]> {
        let valid = self.validity.is_none_or(|validity| validity.is_valid(row));
        valid.then(|| &self.data[self.offsets[row].as_usize()..self.offsets[row + 1].as_usize()])
    }
}

/// `hash_i64`: 64-bit integer keys.
pub fn hash_i64_column(column: Column<'_, i64>, mode: HashMode, hashes: &mut [u64]) {
    hash_primitive(column, mode, hashes, |v| hash_u64(v as u64));
}

/// `hash_i32`: 32-bit integer keys, sign-extended to 64 bits.
pub fn hash_i32_column(column: Column<'_, i32>, mode: HashMode, hashes: &mut [u64]) {
    hash_primitive(column, mode, hashes, |v| hash_u64(i64::from(v) as u64));
}

/// `hash_f64`: double keys, -0.0 as 0.0 and every NaN alike.
pub fn hash_f64_column(column: Column<'_, f64>, mode: HashMode, hashes: &mut [u64]) {
    hash_primitive(column, mode, hashes, hash_f64);
}

/// `hash_f32`: float keys, widened to double.
pub fn hash_f32_column(column: Column<'_, f32>, mode: HashMode, hashes: &mut [u64]) {
    hash_primitive(column, mode, hashes, |v| hash_f64(f64::from(v)));
}

/// `hash_utf8`: string keys with i32 offsets.
pub fn hash_utf8_column(column: Utf8Column<'_, i32>, mode: HashMode, hashes: &mut [u64]) {
    hash_strings(column, mode, hashes);
}

/// `hash_large_utf8`: string keys with i64 offsets.
pub fn hash_large_utf8_column(column: Utf8Column<'_, i64>, mode: HashMode, hashes: &mut [u64]) {
    hash_strings(column, mode, hashes);
}

/// Hashes the rows of the key columns into `hashes` (resized to the row
/// count) with the kernels' entry points, one launch per column. Supports
/// the key types the GPU kernels take: Int32, Int64, Float32, Float64, Utf8
/// and LargeUtf8; `hash::hash_columns` covers the rest on the CPU and agrees
/// with this function wherever both apply.
pub fn hash_key_columns(columns: &[ArrayRef], hashes: &mut Vec<u64>) -> Result<(), HashError> {
    hashes.clear();
    let Some(first) = columns.first() else {
        return Ok(());
    };
    hashes.resize(first.len(), 0);
    for (index, array) in columns.iter().enumerate() {
        let mode = HashMode::mode_for_column(index);
        match array.data_type() {
            DataType::Int64 => hash_i64_column(
                Column::from_array(array.as_primitive::<Int64Type>()),
                mode,
                hashes,
            ),
            DataType::Int32 => hash_i32_column(
                Column::from_array(array.as_primitive::<Int32Type>()),
                mode,
                hashes,
            ),
            DataType::Float64 => hash_f64_column(
                Column::from_array(array.as_primitive::<Float64Type>()),
                mode,
                hashes,
            ),
            DataType::Float32 => hash_f32_column(
                Column::from_array(array.as_primitive::<Float32Type>()),
                mode,
                hashes,
            ),
            DataType::Utf8 => hash_utf8_column(
                Utf8Column::from_array(array.as_string::<i32>()),
                mode,
                hashes,
            ),
            DataType::LargeUtf8 => hash_large_utf8_column(
                Utf8Column::from_array(array.as_string::<i64>()),
                mode,
                hashes,
            ),
            other => {
                return Err(HashError::UnsupportedType {
                    data_type: other.clone(),
                });
            }
        }
    }
    Ok(())
}

fn hash_primitive<T: Copy>(
    column: Column<'_, T>,
    mode: HashMode,
    hashes: &mut [u64],
    hash: impl Fn(T) -> u64,
) {
    assert_eq!(hashes.len(), column.row_count(), "hash output length");
    for (row, slot) in hashes.iter_mut().enumerate() {
        let h = column.get(row).map_or(NULL_HASH, &hash);
        store(slot, h, mode);
    }
}

fn hash_strings<O: OffsetSizeTrait>(column: Utf8Column<'_, O>, mode: HashMode, hashes: &mut [u64]) {
    assert_eq!(hashes.len(), column.row_count(), "hash output length");
    for (row, slot) in hashes.iter_mut().enumerate() {
        let h = column.get(row).map_or(NULL_HASH, hash_bytes);
        store(slot, h, mode);
    }
}

#[inline]
fn store(slot: &mut u64, hash: u64, mode: HashMode) {
    *slot = match mode {
        HashMode::Replace => hash,
        HashMode::Combine => combine(*slot, hash),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::hash::hash_columns;
    use arrow_array::{
        Float32Array, Float64Array, Int32Array, Int64Array, LargeStringArray, StringArray,
    };
    use proptest::prelude::*;
    use std::sync::Arc;

    fn edge_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(f64::from_bits(0x7FF0_0000_0000_0001)), // a signalling NaN
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            any::<f64>()
        ]
    }

    fn edge_i64() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(0),
            Just(-1),
            any::<i64>()
        ]
    }

    /// A batch of key columns of the GPU-supported types, all the same length,
    /// each possibly sliced so offsets and bitmaps start mid-buffer.
    fn key_columns() -> impl Strategy<Value = Vec<ArrayRef>> {
        (0usize..60, 0usize..5, prop::collection::vec(0u8..6, 1..4)).prop_flat_map(
            |(row_count, offset, kinds)| {
                let total = row_count + offset;
                let columns: Vec<BoxedStrategy<ArrayRef>> = kinds
                    .into_iter()
                    .map(|kind| {
                        column_of_kind(kind, total)
                            .prop_map(move |a| a.slice(offset, row_count))
                            .boxed()
                    })
                    .collect();
                columns
            },
        )
    }

    fn nullable<T: std::fmt::Debug>(
        values: BoxedStrategy<T>,
        rows: usize,
    ) -> impl Strategy<Value = Vec<Option<T>>> {
        prop::collection::vec(prop::option::weighted(0.8, values), rows)
    }

    fn column_of_kind(kind: u8, rows: usize) -> BoxedStrategy<ArrayRef> {
        match kind {
            0 => nullable(edge_i64().boxed(), rows)
                .prop_map(|v| Arc::new(Int64Array::from(v)) as ArrayRef)
                .boxed(),
            1 => nullable(any::<i32>().boxed(), rows)
                .prop_map(|v| Arc::new(Int32Array::from(v)) as ArrayRef)
                .boxed(),
            2 => nullable(edge_f64().boxed(), rows)
                .prop_map(|v| Arc::new(Float64Array::from(v)) as ArrayRef)
                .boxed(),
            3 => nullable(any::<f32>().boxed(), rows)
                .prop_map(|v| Arc::new(Float32Array::from(v)) as ArrayRef)
                .boxed(),
            4 => nullable(".{0,20}".boxed(), rows)
                .prop_map(|v| Arc::new(StringArray::from(v)) as ArrayRef)
                .boxed(),
            _ => nullable(".{0,20}".boxed(), rows)
                .prop_map(|v| Arc::new(LargeStringArray::from(v)) as ArrayRef)
                .boxed(),
        }
    }

    proptest! {
        #[test]
        fn kernel_twins_hash_like_hash_columns_across_types_nulls_and_slices(
            columns in key_columns(),
        ) {
            let (mut expected, mut got) = (Vec::new(), Vec::new());
            hash_columns(&columns, &mut expected).unwrap();
            hash_key_columns(&columns, &mut got).unwrap();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn int32_and_int64_keys_hash_alike(
            values in prop::collection::vec(prop::option::of(any::<i32>()), 0..50),
        ) {
            let narrow = Int32Array::from(values.clone());
            let wide: Int64Array = values.iter().map(|v| v.map(i64::from)).collect();
            let (mut a, mut b) = (vec![0; values.len()], vec![0; values.len()]);
            hash_i32_column(Column::from_array(&narrow), HashMode::Replace, &mut a);
            hash_i64_column(Column::from_array(&wide), HashMode::Replace, &mut b);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn unsupported_key_type_is_an_error_naming_the_type() {
        let column: ArrayRef = Arc::new(arrow_array::BooleanArray::from(vec![true]));
        let error = hash_key_columns(&[column], &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("Boolean"), "{error}");
    }

    #[test]
    fn every_nan_and_both_zeros_hash_alike() {
        let values = Float64Array::from(vec![
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7FF0_0000_0000_0001),
            0.0,
            -0.0,
        ]);
        let mut hashes = vec![0; values.len()];
        hash_f64_column(Column::from_array(&values), HashMode::Replace, &mut hashes);
        assert_eq!(hashes[0], hashes[1]);
        assert_eq!(hashes[0], hashes[2]);
        assert_eq!(hashes[3], hashes[4]);
    }
}
