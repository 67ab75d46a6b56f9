//! Feature standardization for ML pipelines: the CPU twin of
//! `kernels/standardize.cu`.
//!
//! `z = (x - mean) / std` per column, with scikit-learn's `StandardScaler`
//! semantics: the statistics ignore nulls and NaNs; `std` is the population
//! standard deviation `sqrt(sum_squares / count - mean^2)`, a slightly
//! negative variance (rounding) clamped to 0; a column with no counted value
//! has mean 0 and std 0. The transform keeps a null row null (value 0.0), a
//! NaN NaN, maps every row of a zero-std column to 0.0, and lets infinities
//! turn the statistics NaN or infinite by IEEE rules.
//!
//! The moments are summed in the kernel's fixed order so that mean and std
//! are bit-identical on both tiers: rows are cut into chunks of
//! [`REDUCE_CHUNK_ROWS`], each chunk is reduced by the shared-memory tree of
//! the kernel (zero padding, then `lane[t] += lane[t + stride]` for stride
//! 128, 64, …, 1), and the chunk partials are reduced the same way until one
//! remains. A pairwise tree also loses less precision than a running sum.

use arrow_array::{Array, Float64Array};
use arrow_buffer::ScalarBuffer;

use crate::kernels::cpu::column::Column;

/// Rows per reduction chunk: the kernel's block size.
pub const REDUCE_CHUNK_ROWS: usize = 256;
const _: () = assert!(REDUCE_CHUNK_ROWS.is_power_of_two());

/// Sum, sum of squares and count of the counted (valid, non-NaN) values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Moments {
    pub sum: f64,
    pub sum_squares: f64,
    pub count: u64,
}

/// The statistics that standardize a column.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColumnStats {
    pub mean: f64,
    pub std: f64,
}

impl Moments {
    const ZERO: Moments = Moments {
        sum: 0.0,
        sum_squares: 0.0,
        count: 0,
    };

    /// Adds two sets of moments (one tree step, or two batches in sequence).
    #[inline]
    pub fn combine(self, other: Moments) -> Moments {
        Moments {
            sum: self.sum + other.sum,
            sum_squares: self.sum_squares + other.sum_squares,
            count: self.count + other.count,
        }
    }

    /// Mean and population std (`standardize_stats`).
    pub fn stats(self) -> ColumnStats {
        if self.count == 0 {
            return ColumnStats {
                mean: 0.0,
                std: 0.0,
            };
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        let mut variance = self.sum_squares / n - mean * mean;
        // A NaN variance stays NaN.
        if variance < 0.0 {
            variance = 0.0;
        }
        ColumnStats {
            mean,
            std: variance.sqrt(),
        }
    }

    fn of_value(value: Option<f64>) -> Moments {
        match value {
            Some(x) if !x.is_nan() => Moments {
                sum: x,
                sum_squares: x * x,
                count: 1,
            },
            _ => Moments::ZERO,
        }
    }
}

/// Chunks (and so partials) for `item_count` inputs: at least one.
pub const fn chunk_count(item_count: usize) -> usize {
    let chunks = item_count.div_ceil(REDUCE_CHUNK_ROWS);
    if chunks == 0 { 1 } else { chunks }
}

/// `standardize_moments`: one partial per chunk of rows.
///
/// # Panics
/// If `partials` is not `chunk_count(column.row_count())` long.
pub fn moments_of_chunks(column: Column<'_, f64>, partials: &mut [Moments]) {
    reduce_level(column.row_count(), partials, |row| {
        Moments::of_value(column.get(row))
    });
}

/// `standardize_moments_merge`: one partial per chunk of partials.
///
/// # Panics
/// If `merged` is not `chunk_count(partials.len())` long.
pub fn merge_moment_chunks(partials: &[Moments], merged: &mut [Moments]) {
    reduce_level(partials.len(), merged, |item| partials[item]);
}

/// The moments of a column, by the kernels' full launch sequence.
pub fn column_moments(column: Column<'_, f64>) -> Moments {
    let mut partials = vec![Moments::ZERO; chunk_count(column.row_count())];
    moments_of_chunks(column, &mut partials);
    while partials.len() > 1 {
        let mut merged = vec![Moments::ZERO; chunk_count(partials.len())];
        merge_moment_chunks(&partials, &mut merged);
        partials = merged;
    }
    partials[0]
}

/// `standardize_apply`: writes z-scores into `out`; null rows get 0.0.
///
/// # Panics
/// If `out` is not one value per row.
pub fn standardize_values(column: Column<'_, f64>, stats: ColumnStats, out: &mut [f64]) {
    assert_eq!(out.len(), column.row_count(), "one output per row");
    for (row, z) in out.iter_mut().enumerate() {
        *z = match column.get(row) {
            None => 0.0,
            Some(x) if x.is_nan() => x,
            Some(_) if stats.std == 0.0 => 0.0,
            Some(x) => (x - stats.mean) / stats.std,
        };
    }
}

/// The statistics of an Arrow column.
pub fn fit_column(array: &Float64Array) -> ColumnStats {
    column_moments(Column::from_array(array)).stats()
}

/// Standardizes an Arrow column with given statistics (from [`fit_column`],
/// possibly over other batches); the nulls are the input's.
pub fn transform_column(array: &Float64Array, stats: ColumnStats) -> Float64Array {
    let mut out = vec![0.0; array.len()];
    standardize_values(Column::from_array(array), stats, &mut out);
    Float64Array::new(ScalarBuffer::from(out), array.nulls().cloned())
}

/// Fits and transforms one Arrow column.
pub fn standardize_column(array: &Float64Array) -> (Float64Array, ColumnStats) {
    let stats = fit_column(array);
    (transform_column(array, stats), stats)
}

/// One level of the reduction: chunk `c` of the `item_count` inputs reduces
/// to `out[c]` through the kernel's tree.
fn reduce_level(item_count: usize, out: &mut [Moments], item: impl Fn(usize) -> Moments) {
    assert_eq!(out.len(), chunk_count(item_count), "one partial per chunk");
    for (chunk, partial) in out.iter_mut().enumerate() {
        let first = chunk * REDUCE_CHUNK_ROWS;
        let mut lanes = [Moments::ZERO; REDUCE_CHUNK_ROWS];
        for (lane, slot) in lanes.iter_mut().enumerate() {
            if first + lane < item_count {
                *slot = item(first + lane);
            }
        }
        *partial = reduce_chunk(&mut lanes);
    }
}

/// The kernel's shared-memory tree, step for step.
fn reduce_chunk(lanes: &mut [Moments; REDUCE_CHUNK_ROWS]) -> Moments {
    let mut stride = REDUCE_CHUNK_ROWS / 2;
    while stride > 0 {
        for t in 0..stride {
            lanes[t] = lanes[t].combine(lanes[t + stride]);
        }
        stride /= 2;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An independent statement of the reduction order: pad to a whole
    /// number of 256-item chunks, fold each chunk's halves onto each other
    /// until one item is left, and repeat over the partials.
    fn reference_sum(mut items: Vec<f64>) -> f64 {
        loop {
            let chunks = items.len().div_ceil(256).max(1);
            items.resize(chunks * 256, 0.0);
            items = items
                .chunks(256)
                .map(|chunk| {
                    let mut lanes = chunk.to_vec();
                    while lanes.len() > 1 {
                        let half = lanes.len() / 2;
                        lanes = (0..half).map(|i| lanes[i] + lanes[i + half]).collect();
                    }
                    lanes[0]
                })
                .collect();
            if items.len() == 1 {
                return items[0];
            }
        }
    }

    fn counted(rows: &[Option<f64>]) -> Vec<f64> {
        rows.iter()
            .flatten()
            .copied()
            .filter(|x| !x.is_nan())
            .collect()
    }

    /// Each row's contribution in row position: a null or NaN adds zero.
    fn contributions(rows: &[Option<f64>]) -> Vec<f64> {
        rows.iter()
            .map(|x| x.filter(|x| !x.is_nan()).unwrap_or(0.0))
            .collect()
    }

    fn value() -> impl Strategy<Value = Option<f64>> {
        prop::option::weighted(
            0.85,
            prop_oneof![
                1 => Just(f64::NAN),
                1 => Just(-0.0),
                1 => Just(0.0),
                12 => -1e6f64..1e6,
            ],
        )
    }

    fn same(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    proptest! {
        #[test]
        fn moments_follow_the_kernel_tree_bit_for_bit(
            rows in prop::collection::vec(value(), 0..1100),
        ) {
            let array = Float64Array::from(rows.clone());
            let moments = column_moments(Column::from_array(&array));
            prop_assert_eq!(moments.count, counted(&rows).len() as u64);
            let values = contributions(&rows);
            prop_assert!(same(moments.sum, reference_sum(values.clone())));
            let squares = values.iter().map(|x| x * x).collect();
            prop_assert!(same(moments.sum_squares, reference_sum(squares)));
        }

        #[test]
        fn standardize_matches_the_textbook_formula(
            rows in prop::collection::vec(value(), 0..600),
        ) {
            let array = Float64Array::from(rows.clone());
            let (z, stats) = standardize_column(&array);
            let values = counted(&rows);
            let n = values.len() as f64;
            let mean = if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / n };
            let variance = if values.is_empty() { 0.0 } else {
                values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n
            };
            let scale = 1.0 + mean.abs() + variance.sqrt();
            prop_assert!((stats.mean - mean).abs() <= 1e-9 * scale, "mean {} vs {mean}", stats.mean);
            // sum_squares / n - mean^2 cancels: allow for the lost digits.
            let variance_error = (stats.std * stats.std - variance).abs();
            prop_assert!(variance_error <= 1e-9 * scale * scale, "std {} vs {}", stats.std, variance.sqrt());
            prop_assert_eq!(z.nulls(), array.nulls());
            for (row, input) in rows.iter().enumerate() {
                let got = z.values()[row];
                match input {
                    None => prop_assert!(same(got, 0.0)),
                    Some(x) if x.is_nan() => prop_assert!(got.is_nan()),
                    Some(_) if stats.std == 0.0 => prop_assert!(same(got, 0.0)),
                    Some(x) => prop_assert!(same(got, (x - stats.mean) / stats.std)),
                }
            }
        }
    }

    #[test]
    fn moments_past_256_chunks_take_a_second_merge_level_in_tree_order() {
        // 70 000 rows: 274 chunks, so the partials are merged twice.
        let rows: Vec<Option<f64>> = (0..70_000u32)
            .map(|i| (i % 97 != 0).then(|| f64::from(i % 1009) * 1.1 - 500.0))
            .collect();
        assert!(chunk_count(chunk_count(rows.len())) > 1);
        let array = Float64Array::from(rows.clone());
        let moments = column_moments(Column::from_array(&array));
        let values = contributions(&rows);
        assert_eq!(moments.count, counted(&rows).len() as u64);
        assert!(same(moments.sum, reference_sum(values.clone())));
        assert!(same(
            moments.sum_squares,
            reference_sum(values.iter().map(|x| x * x).collect())
        ));
    }

    #[test]
    fn standardize_constant_column_gives_zeros_not_nan() {
        let array = Float64Array::from(vec![Some(3.0), None, Some(3.0), Some(f64::NAN)]);
        let (z, stats) = standardize_column(&array);
        assert_eq!(
            stats,
            ColumnStats {
                mean: 3.0,
                std: 0.0
            }
        );
        assert_eq!(z.value(0), 0.0);
        assert!(z.is_null(1));
        assert_eq!(z.value(2), 0.0);
        assert!(z.value(3).is_nan());
    }

    #[test]
    fn standardize_all_null_or_nan_column_has_zero_stats() {
        let array = Float64Array::from(vec![None, Some(f64::NAN)]);
        let (z, stats) = standardize_column(&array);
        assert_eq!(
            stats,
            ColumnStats {
                mean: 0.0,
                std: 0.0
            }
        );
        assert!(z.is_null(0));
        assert!(z.value(1).is_nan());
        let empty = Float64Array::from(Vec::<f64>::new());
        assert_eq!(
            fit_column(&empty),
            ColumnStats {
                mean: 0.0,
                std: 0.0
            }
        );
    }

    #[test]
    fn standardize_infinity_makes_the_column_nan() {
        let array = Float64Array::from(vec![1.0, f64::INFINITY]);
        let (z, stats) = standardize_column(&array);
        assert!(stats.std.is_nan(), "{stats:?}");
        assert!(z.values().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn standardize_known_values() {
        let array = Float64Array::from(vec![1.0, 2.0, 3.0, 4.0]);
        let (z, stats) = standardize_column(&array);
        assert_eq!(stats.mean, 2.5);
        assert_eq!(stats.std, 1.25f64.sqrt());
        let expected: Vec<f64> = [1.0, 2.0, 3.0, 4.0]
            .iter()
            .map(|x| (x - 2.5) / 1.25f64.sqrt())
            .collect();
        assert_eq!(z.values().to_vec(), expected);
    }

    #[test]
    fn moments_of_batches_combine_in_sequence() {
        let a = Float64Array::from(vec![1.0, 2.0]);
        let b = Float64Array::from(vec![3.0]);
        let merged =
            column_moments(Column::from_array(&a)).combine(column_moments(Column::from_array(&b)));
        assert_eq!(
            merged,
            Moments {
                sum: 6.0,
                sum_squares: 14.0,
                count: 3
            }
        );
    }
}
