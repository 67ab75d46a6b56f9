//! Raw column views: what a GPU kernel receives, seen from the CPU.
//!
//! Every CPU twin of a kernel in `kernels/*.cu` works on these views rather
//! than on Arrow arrays, so that the twin and the kernel read the same
//! buffers: a values slice, an optional validity bitmap in Arrow's LSB-first
//! bit order with a bit offset (so sliced arrays need no repacking), and the
//! row count implied by the values. Bitmaps that the twins write (selections,
//! output validity) are Arrow bitmaps of `row_count.div_ceil(8)` bytes with the
//! bits past the last row cleared; a kernel writes the same bytes followed by
//! zero padding up to a 32-bit word.

use arrow_array::{Array, ArrowPrimitiveType, PrimitiveArray};
use arrow_buffer::{ArrowNativeType, BooleanBuffer, Buffer, NullBuffer};

/// An Arrow validity bitmap: row `i` is valid when bit `offset + i` is set.
#[derive(Clone, Copy, Debug)]
pub struct Validity<'a> {
    pub bits: &'a [u8],
    pub offset: usize,
}

impl<'a> Validity<'a> {
    /// The validity bitmap of an Arrow array's null buffer, if it has one.
    pub fn from_nulls(nulls: Option<&'a NullBuffer>) -> Option<Self> {
        nulls.map(|nulls| Validity {
            bits: nulls.inner().values(),
            offset: nulls.offset(),
        })
    }

    #[inline]
    pub fn is_valid(&self, row: usize) -> bool {
        let bit = self.offset + row;
        (self.bits[bit / 8] >> (bit % 8)) & 1 == 1
    }

    /// Whether the bitmap has a bit for each of `row_count` rows.
    pub fn covers(&self, row_count: usize) -> bool {
        self.bits.len() * 8 >= self.offset + row_count
    }
}

/// A column of fixed-width values with optional validity.
#[derive(Clone, Copy, Debug)]
pub struct Column<'a, T> {
    values: &'a [T],
    validity: Option<Validity<'a>>,
}

impl<'a, T: Copy> Column<'a, T> {
    /// # Panics
    /// If the bitmap has fewer bits than the column has rows.
    pub fn new(values: &'a [T], validity: Option<Validity<'a>>) -> Self {
        if let Some(validity) = validity {
            assert!(
                validity.covers(values.len()),
                "validity bitmap of {} bytes at bit offset {} cannot cover {} rows",
                validity.bits.len(),
                validity.offset,
                values.len()
            );
        }
        Column { values, validity }
    }

    pub fn values(&self) -> &'a [T] {
        self.values
    }

    pub fn validity(&self) -> Option<Validity<'a>> {
        self.validity
    }

    pub fn row_count(&self) -> usize {
        self.values.len()
    }

    #[inline]
    pub fn is_valid(&self, row: usize) -> bool {
        self.validity.is_none_or(|validity| validity.is_valid(row))
    }

    /// The value of a valid row, `None` for a null row.
    #[inline]
    pub fn get(&self, row: usize) -> Option<T> {
        self.is_valid(row).then(|| self.values[row])
    }
}

impl<'a, T: ArrowNativeType> Column<'a, T> {
    /// A view of an Arrow primitive array's buffers (no copy).
    pub fn from_array<A>(array: &'a PrimitiveArray<A>) -> Self
    where
        A: ArrowPrimitiveType<Native = T>,
    {
        Column::new(array.values(), Validity::from_nulls(array.nulls()))
    }
}

/// Bytes in the Arrow bitmap of `row_count` rows.
pub const fn bitmap_len_bytes(row_count: usize) -> usize {
    row_count.div_ceil(8)
}

/// Writes the bitmap of `row_count` rows whose bit `row` is `is_set(row)`,
/// clearing the bits past the last row, and returns the number of set bits.
///
/// # Panics
/// If `bitmap` is not exactly `bitmap_len_bytes(row_count)` bytes.
pub fn fill_bitmap(
    bitmap: &mut [u8],
    row_count: usize,
    mut is_set: impl FnMut(usize) -> bool,
) -> usize {
    assert_eq!(bitmap.len(), bitmap_len_bytes(row_count), "bitmap length");
    let mut set_count = 0;
    for (byte_index, byte) in bitmap.iter_mut().enumerate() {
        let first_row = byte_index * 8;
        let rows_in_byte = (row_count - first_row).min(8);
        let mut bits = 0u8;
        for bit in 0..rows_in_byte {
            bits |= u8::from(is_set(first_row + bit)) << bit;
        }
        set_count += bits.count_ones() as usize;
        *byte = bits;
    }
    set_count
}

/// Wraps a twin's output bitmap as an Arrow boolean buffer.
pub fn boolean_buffer(bitmap: Vec<u8>, row_count: usize) -> BooleanBuffer {
    BooleanBuffer::new(Buffer::from_vec(bitmap), 0, row_count)
}

/// Wraps a twin's output validity as an Arrow null buffer; `None` when every
/// row is valid (Arrow's cheaper form of the same thing).
pub fn null_buffer(validity: Vec<u8>, row_count: usize) -> Option<NullBuffer> {
    Some(NullBuffer::new(boolean_buffer(validity, row_count))).filter(|n| n.null_count() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Int64Array};

    #[test]
    fn sliced_array_view_reads_validity_at_its_bit_offset() {
        let array = Int64Array::from(vec![Some(1), None, Some(3), None, Some(5)]);
        let sliced = array.slice(1, 4);
        let column = Column::from_array(&sliced);
        let rows: Vec<_> = (0..column.row_count()).map(|r| column.get(r)).collect();
        assert_eq!(rows, vec![None, Some(3), None, Some(5)]);
        assert_eq!(sliced.null_count(), 2);
    }

    #[test]
    fn fill_bitmap_clears_bits_past_the_last_row() {
        let mut bitmap = vec![0xFF; 2];
        let set = fill_bitmap(&mut bitmap, 10, |_| true);
        assert_eq!(set, 10);
        assert_eq!(bitmap, vec![0xFF, 0b11]);
    }

    #[test]
    #[should_panic(expected = "cannot cover")]
    fn short_validity_bitmap_is_rejected() {
        let bits = [0xFFu8];
        Column::new(
            &[0i64; 9],
            Some(Validity {
                bits: &bits,
                offset: 0,
            }),
        );
    }
}
