//! The row encoding of grouping keys (and of the sort's rows): a null tag,
//! then the value — integers, dates and timestamps widened to i64, floats to
//! f64 with a canonical zero and NaN, booleans, utf8 with a length — column
//! after column. Equal keys encode to equal bytes, so the hash table compares
//! keys with `memcmp`; [`decode_keys`] builds the Arrow arrays back.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow_cast::cast;
use arrow_schema::DataType;

use super::ExecError;
use super::hashtable::{read_u32, read_u64};

/// A key column prepared for encoding.
pub(crate) enum KeyColumn {
    Int(Int64Array),
    Float(Float64Array),
    Bool(BooleanArray),
    Str(StringArray),
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyClass {
    Int,
    Float,
    Bool,
    Str,
}

impl KeyClass {
    /// The class's tag in checkpoint snapshots.
    pub(crate) fn tag(self) -> u8 {
        match self {
            KeyClass::Int => 0,
            KeyClass::Float => 1,
            KeyClass::Bool => 2,
            KeyClass::Str => 3,
        }
    }
}

/// The length of the key that [`encode_key`] wrote for `classes` at the
/// start of `bytes`, or `None` when the bytes are not such a key: what a
/// restore checks before it hands keys to [`decode_keys`], which trusts them.
pub(crate) fn encoded_key_len(bytes: &[u8], classes: &[KeyClass]) -> Option<usize> {
    let mut at = 0;
    for class in classes {
        match *bytes.get(at)? {
            0 => {
                at += 1;
                continue;
            }
            1 => at += 1,
            _ => return None,
        }
        at += match class {
            KeyClass::Int | KeyClass::Float => 8,
            KeyClass::Bool => 1,
            KeyClass::Str => 4 + read_u32(bytes.get(at..at + 4)?, 0) as usize,
        };
        if at > bytes.len() {
            return None;
        }
    }
    Some(at)
}

pub(crate) fn key_class(t: &DataType) -> Option<KeyClass> {
    use DataType::*;
    match t {
        Int8
        | Int16
        | Int32
        | Int64
        | UInt8
        | UInt16
        | UInt32
        | UInt64
        | Date32
        | Date64
        | Timestamp(_, _) => Some(KeyClass::Int),
        Float32 | Float64 => Some(KeyClass::Float),
        Boolean => Some(KeyClass::Bool),
        Utf8 | LargeUtf8 => Some(KeyClass::Str),
        _ => None,
    }
}

pub(crate) fn prepare_key(array: &ArrayRef, class: KeyClass) -> Result<KeyColumn, ExecError> {
    Ok(match class {
        KeyClass::Int => KeyColumn::Int(
            cast(array, &DataType::Int64)?
                .as_primitive::<Int64Type>()
                .clone(),
        ),
        KeyClass::Float => KeyColumn::Float(
            cast(array, &DataType::Float64)?
                .as_primitive::<Float64Type>()
                .clone(),
        ),
        KeyClass::Bool => KeyColumn::Bool(array.as_boolean().clone()),
        KeyClass::Str => KeyColumn::Str(cast(array, &DataType::Utf8)?.as_string::<i32>().clone()),
    })
}

/// The widest key [`encode_fixed_keys`] encodes: a hash-table entry's
/// inline key.
pub(crate) const FIXED_KEY_BYTES: usize = 16;

/// Whether keys of `classes` always encode to at most [`FIXED_KEY_BYTES`]
/// (no string column, e.g. one or two integer, float or boolean columns).
pub(crate) fn is_fixed_width(classes: &[KeyClass]) -> bool {
    let mut width = 0;
    for class in classes {
        width += match class {
            KeyClass::Int | KeyClass::Float => 9,
            KeyClass::Bool => 2,
            KeyClass::Str => return false,
        };
    }
    width <= FIXED_KEY_BYTES
}

/// Encodes the keys of rows `0..n` column at a time into zero-padded
/// fixed-size slots, with each key's length: the same bytes as
/// [`encode_key`] writes, for key columns that [`is_fixed_width`].
pub(crate) fn encode_fixed_keys(
    cols: &[KeyColumn],
    n: usize,
    keys: &mut Vec<[u8; FIXED_KEY_BYTES]>,
    lens: &mut Vec<u8>,
) {
    keys.clear();
    keys.resize(n, [0; FIXED_KEY_BYTES]);
    lens.clear();
    lens.resize(n, 0);
    for col in cols {
        match col {
            KeyColumn::Int(a) => {
                put_fixed(keys, lens, a, |v: i64| v.to_le_bytes());
            }
            KeyColumn::Float(a) => put_fixed(keys, lens, a, |v: f64| {
                let v = if v == 0.0 {
                    0.0
                } else if v.is_nan() {
                    f64::NAN
                } else {
                    v
                };
                v.to_bits().to_le_bytes()
            }),
            KeyColumn::Bool(a) => {
                for (row, (key, len)) in keys.iter_mut().zip(lens.iter_mut()).enumerate() {
                    let at = *len as usize;
                    if a.is_valid(row) {
                        key[at] = 1;
                        key[at + 1] = u8::from(a.value(row));
                        *len += 2;
                    } else {
                        *len += 1;
                    }
                }
            }
            KeyColumn::Str(_) => unreachable!("string keys are not fixed-width"),
        }
    }
}

/// One 8-byte column into the fixed key slots: tag 1 and the value, or tag
/// 0 for a null.
#[inline]
fn put_fixed<T: arrow_array::types::ArrowPrimitiveType>(
    keys: &mut [[u8; FIXED_KEY_BYTES]],
    lens: &mut [u8],
    array: &arrow_array::PrimitiveArray<T>,
    bytes: impl Fn(T::Native) -> [u8; 8],
) {
    let values = array.values();
    if array.null_count() == 0 {
        for ((key, len), &v) in keys.iter_mut().zip(lens.iter_mut()).zip(values.iter()) {
            let at = *len as usize;
            key[at] = 1;
            key[at + 1..at + 9].copy_from_slice(&bytes(v));
            *len += 9;
        }
        return;
    }
    for (row, ((key, len), &v)) in keys
        .iter_mut()
        .zip(lens.iter_mut())
        .zip(values.iter())
        .enumerate()
    {
        let at = *len as usize;
        if array.is_valid(row) {
            key[at] = 1;
            key[at + 1..at + 9].copy_from_slice(&bytes(v));
            *len += 9;
        } else {
            *len += 1;
        }
    }
}

#[inline]
pub(crate) fn encode_key(col: &KeyColumn, row: usize, out: &mut Vec<u8>) {
    let valid = match col {
        KeyColumn::Int(a) => a.is_valid(row),
        KeyColumn::Float(a) => a.is_valid(row),
        KeyColumn::Bool(a) => a.is_valid(row),
        KeyColumn::Str(a) => a.is_valid(row),
    };
    if !valid {
        out.push(0);
        return;
    }
    out.push(1);
    match col {
        KeyColumn::Int(a) => out.extend_from_slice(&a.value(row).to_le_bytes()),
        KeyColumn::Float(a) => {
            let v = a.value(row);
            let v = if v == 0.0 {
                0.0
            } else if v.is_nan() {
                f64::NAN
            } else {
                v
            };
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        KeyColumn::Bool(a) => out.push(u8::from(a.value(row))),
        KeyColumn::Str(a) => {
            let s = a.value(row).as_bytes();
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
    }
}

/// Builds one array per class from `n` encoded keys (as [`encode_key`]
/// writes them, one after the other per key).
pub(crate) fn decode_keys<'a>(
    keys: impl Iterator<Item = &'a [u8]>,
    n: usize,
    classes: &[KeyClass],
) -> Vec<ArrayRef> {
    enum B {
        Int(Int64Builder),
        Float(Float64Builder),
        Bool(BooleanBuilder),
        Str(StringBuilder),
    }
    let mut builders: Vec<B> = classes
        .iter()
        .map(|c| match c {
            KeyClass::Int => B::Int(Int64Builder::with_capacity(n)),
            KeyClass::Float => B::Float(Float64Builder::with_capacity(n)),
            KeyClass::Bool => B::Bool(BooleanBuilder::with_capacity(n)),
            KeyClass::Str => B::Str(StringBuilder::with_capacity(n, n * 8)),
        })
        .collect();
    for key in keys {
        let mut at = 0;
        for b in &mut builders {
            let valid = key[at] == 1;
            at += 1;
            match b {
                B::Int(b) if valid => {
                    b.append_value(read_u64(key, at) as i64);
                    at += 8;
                }
                B::Float(b) if valid => {
                    b.append_value(f64::from_bits(read_u64(key, at)));
                    at += 8;
                }
                B::Bool(b) if valid => {
                    b.append_value(key[at] == 1);
                    at += 1;
                }
                B::Str(b) if valid => {
                    let len = read_u32(key, at) as usize;
                    at += 4;
                    // Keys were encoded from valid UTF-8.
                    b.append_value(String::from_utf8_lossy(&key[at..at + len]));
                    at += len;
                }
                B::Int(b) => b.append_null(),
                B::Float(b) => b.append_null(),
                B::Bool(b) => b.append_null(),
                B::Str(b) => b.append_null(),
            }
        }
    }
    builders
        .into_iter()
        .map(|b| -> ArrayRef {
            match b {
                B::Int(mut b) => Arc::new(b.finish()),
                B::Float(mut b) => Arc::new(b.finish()),
                B::Bool(mut b) => Arc::new(b.finish()),
                B::Str(mut b) => Arc::new(b.finish()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// What `encode_key` writes, `encoded_key_len` measures; every
        /// strict prefix is refused, so truncated keys never reach
        /// `decode_keys`.
        #[test]
        fn encoded_key_len_measures_exactly_what_encode_key_wrote(
            int in proptest::option::of(any::<i64>()),
            float in proptest::option::of(any::<f64>()),
            flag in proptest::option::of(any::<bool>()),
            text in proptest::option::of(".{0,40}"),
        ) {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(vec![int])),
                Arc::new(Float64Array::from(vec![float])),
                Arc::new(BooleanArray::from(vec![flag])),
                Arc::new(StringArray::from(vec![text])),
            ];
            let classes = [KeyClass::Int, KeyClass::Float, KeyClass::Bool, KeyClass::Str];
            let mut key = Vec::new();
            for (column, class) in columns.iter().zip(classes) {
                encode_key(&prepare_key(column, class).unwrap(), 0, &mut key);
            }
            prop_assert_eq!(encoded_key_len(&key, &classes), Some(key.len()));
            for cut in 0..key.len() {
                prop_assert_eq!(encoded_key_len(&key[..cut], &classes), None);
            }
            let decoded = decode_keys(std::iter::once(key.as_slice()), 1, &classes);
            prop_assert_eq!(decoded[0].as_primitive::<Int64Type>().is_valid(0), int.is_some());
        }

        /// The column-at-a-time fixed-width encoding writes exactly what
        /// `encode_key` writes row by row, zero-padded.
        #[test]
        fn fixed_keys_equal_row_encoded_keys(
            rows in proptest::collection::vec(
                (
                    proptest::option::of(any::<i64>()),
                    proptest::option::of(prop_oneof![Just(0.0), Just(-0.0), Just(f64::NAN), any::<f64>()]),
                    proptest::option::of(any::<bool>()),
                ),
                0..20,
            ),
            layout in 0usize..3,
        ) {
            let ints: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()));
            let floats: ArrayRef = Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
            let flags: ArrayRef = Arc::new(BooleanArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()));
            let (columns, classes): (Vec<ArrayRef>, Vec<KeyClass>) = match layout {
                0 => (vec![ints], vec![KeyClass::Int]),
                1 => (vec![floats, flags], vec![KeyClass::Float, KeyClass::Bool]),
                _ => (vec![flags, ints], vec![KeyClass::Bool, KeyClass::Int]),
            };
            prop_assert!(is_fixed_width(&classes));
            let prepared: Vec<KeyColumn> = columns
                .iter()
                .zip(&classes)
                .map(|(c, k)| prepare_key(c, *k).unwrap())
                .collect();
            let (mut keys, mut lens) = (Vec::new(), Vec::new());
            encode_fixed_keys(&prepared, rows.len(), &mut keys, &mut lens);
            for row in 0..rows.len() {
                let mut expected = Vec::new();
                for column in &prepared {
                    encode_key(column, row, &mut expected);
                }
                let len = lens[row] as usize;
                prop_assert_eq!(&keys[row][..len], expected.as_slice());
                prop_assert!(keys[row][len..].iter().all(|&b| b == 0));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_encoded_key_len(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let classes = [KeyClass::Str, KeyClass::Int, KeyClass::Bool];
            if let Some(len) = encoded_key_len(&bytes, &classes) {
                prop_assert!(len <= bytes.len());
            }
        }
    }
}

#[cfg(test)]
mod fixed_width_tests {
    use super::*;

    #[test]
    fn fixed_width_needs_sixteen_bytes_and_no_string() {
        assert!(is_fixed_width(&[KeyClass::Int]));
        assert!(is_fixed_width(&[
            KeyClass::Float,
            KeyClass::Bool,
            KeyClass::Bool
        ]));
        assert!(!is_fixed_width(&[KeyClass::Int, KeyClass::Int]), "18 bytes");
        assert!(!is_fixed_width(&[KeyClass::Str]));
    }
}
