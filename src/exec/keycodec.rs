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
