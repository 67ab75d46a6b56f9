//! Keyed hash aggregation over an i64 key: the CPU twin of
//! `kernels/aggregate.cu`.
//!
//! `GROUP BY key` with count, sum, min and max over an i64 value column, with
//! the kernel's semantics:
//! - A null key is a group of its own (reported as key `None`).
//! - Null values are skipped: `count` is the number of non-null values, and a
//!   group whose values are all null has count 0 and no sum, min or max.
//! - Sums never wrap. They are accumulated exactly (i128 here, a 128-bit pair
//!   of atomics on the GPU) and a group overflows when its exact total does
//!   not fit in i64; an intermediate excursion that later values undo is not
//!   an overflow. This makes the outcome independent of the order in which
//!   rows are added, which is the only definition a parallel GPU can honour.
//!   When several groups overflow, the error names the smallest key (the null
//!   key first), so both tiers report the same group.
//!
//! The table mirrors the kernel's: open addressing with linear probing on
//! `hash_u64(key)` over a power-of-two slot array. Unlike the device table it
//! grows (at half load) instead of reporting that it is full. Groups come out
//! in order of first appearance; the GPU's order is unspecified, so compare
//! results as maps from key to statistics.

use arrow_array::Int64Array;

use crate::kernels::cpu::column::Column;
use crate::kernels::cpu::hash::hash_u64;

/// Errors of the aggregation kernels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("sum overflows Int64 for key {}", display_key(.key))]
    SumOverflow { key: Option<i64> },
    #[error("key and value columns have different row counts: {key_rows} and {value_rows}")]
    RowCountMismatch { key_rows: usize, value_rows: usize },
}

fn display_key(key: &Option<i64>) -> String {
    key.map_or_else(|| "null".to_owned(), |k| k.to_string())
}

/// The statistics of one group. `sum`, `min` and `max` are `None` when the
/// group has no non-null value (`count == 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupStats {
    pub count: u64,
    pub sum: Option<i64>,
    pub min: Option<i64>,
    pub max: Option<i64>,
}

/// One output group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub key: Option<i64>,
    pub stats: GroupStats,
}

/// The slice-level input: keys and values of the same rows.
#[derive(Clone, Copy, Debug)]
pub struct KeyedValues<'a> {
    pub keys: Column<'a, i64>,
    pub values: Column<'a, i64>,
}

/// The Arrow-level input.
#[derive(Clone, Copy, Debug)]
pub struct KeyedArrays<'a> {
    pub keys: &'a Int64Array,
    pub values: &'a Int64Array,
}

/// The groups as Arrow columns, in order of first appearance.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateColumns {
    pub keys: Int64Array,
    pub counts: Int64Array,
    pub sums: Int64Array,
    pub mins: Int64Array,
    pub maxs: Int64Array,
}

#[derive(Clone, Copy, Debug)]
struct Accumulator {
    count: u64,
    sum: i128,
    min: i64,
    max: i64,
}

impl Accumulator {
    // The kernel's initial slot values.
    const EMPTY: Accumulator = Accumulator {
        count: 0,
        sum: 0,
        min: i64::MAX,
        max: i64::MIN,
    };

    #[inline]
    fn add(&mut self, value: i64) {
        self.count += 1;
        self.sum += i128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }
}

const SLOT_EMPTY: u32 = 0;
const SLOT_COUNT_MIN: usize = 16;

/// A growing group table; feed it batches with [`update`](Self::update).
#[derive(Clone, Debug)]
pub struct I64GroupTable {
    /// Group index + 1, or `SLOT_EMPTY`; the length is a power of two.
    slots: Vec<u32>,
    keys: Vec<Option<i64>>,
    accumulators: Vec<Accumulator>,
    null_group: Option<u32>,
}

impl Default for I64GroupTable {
    fn default() -> Self {
        Self::new()
    }
}

impl I64GroupTable {
    pub fn new() -> Self {
        I64GroupTable {
            slots: vec![SLOT_EMPTY; SLOT_COUNT_MIN],
            keys: Vec::new(),
            accumulators: Vec::new(),
            null_group: None,
        }
    }

    pub fn group_count(&self) -> usize {
        self.keys.len()
    }

    /// Adds a batch of rows.
    ///
    /// # Panics
    /// If the key and value columns have different row counts.
    pub fn update(&mut self, input: KeyedValues<'_>) {
        assert_eq!(
            input.keys.row_count(),
            input.values.row_count(),
            "key and value row counts"
        );
        for row in 0..input.keys.row_count() {
            let group = match input.keys.get(row) {
                None => self.null_group(),
                Some(key) => self.group_of(key),
            };
            if let Some(value) = input.values.get(row) {
                self.accumulators[group].add(value);
            }
        }
    }

    /// The groups in order of first appearance, or the overflow of the
    /// smallest key whose exact sum does not fit in i64.
    pub fn finish(self) -> Result<Vec<Group>, AggregateError> {
        let overflowed = self
            .keys
            .iter()
            .zip(&self.accumulators)
            .filter(|(_, acc)| i64::try_from(acc.sum).is_err())
            .map(|(key, _)| *key)
            .min();
        if let Some(key) = overflowed {
            return Err(AggregateError::SumOverflow { key });
        }
        let groups = self.keys.iter().zip(&self.accumulators).map(|(&key, acc)| {
            let present = acc.count > 0;
            Group {
                key,
                stats: GroupStats {
                    count: acc.count,
                    sum: present.then(|| i64::try_from(acc.sum).expect("checked above")),
                    min: present.then_some(acc.min),
                    max: present.then_some(acc.max),
                },
            }
        });
        Ok(groups.collect())
    }

    fn null_group(&mut self) -> usize {
        match self.null_group {
            Some(group) => group as usize,
            None => {
                let group = self.push_group(None);
                self.null_group = Some(group as u32);
                group
            }
        }
    }

    /// The group of a non-null key, created if new.
    fn group_of(&mut self, key: i64) -> usize {
        let mask = self.slots.len() - 1;
        let mut slot = hash_u64(key as u64) as usize & mask;
        loop {
            match self.slots[slot] {
                SLOT_EMPTY => break,
                entry if self.keys[entry as usize - 1] == Some(key) => return entry as usize - 1,
                _ => slot = (slot + 1) & mask,
            }
        }
        let group = self.push_group(Some(key));
        self.slots[slot] = group as u32 + 1;
        if self.group_count() * 2 > self.slots.len() {
            self.grow();
        }
        group
    }

    fn push_group(&mut self, key: Option<i64>) -> usize {
        assert!(self.keys.len() < u32::MAX as usize - 1, "group count");
        self.keys.push(key);
        self.accumulators.push(Accumulator::EMPTY);
        self.keys.len() - 1
    }

    fn grow(&mut self) {
        let slot_count = self.slots.len() * 2;
        let mask = slot_count - 1;
        let mut slots = vec![SLOT_EMPTY; slot_count];
        for (group, key) in self.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            let mut slot = hash_u64(*key as u64) as usize & mask;
            while slots[slot] != SLOT_EMPTY {
                slot = (slot + 1) & mask;
            }
            slots[slot] = group as u32 + 1;
        }
        self.slots = slots;
    }
}

/// Aggregates one batch.
pub fn aggregate_i64(input: KeyedValues<'_>) -> Result<Vec<Group>, AggregateError> {
    let mut table = I64GroupTable::new();
    table.update(input);
    table.finish()
}

/// Aggregates one batch of Arrow arrays into Arrow columns.
pub fn aggregate_i64_arrays(input: KeyedArrays<'_>) -> Result<AggregateColumns, AggregateError> {
    if input.keys.len() != input.values.len() {
        return Err(AggregateError::RowCountMismatch {
            key_rows: input.keys.len(),
            value_rows: input.values.len(),
        });
    }
    let groups = aggregate_i64(KeyedValues {
        keys: Column::from_array(input.keys),
        values: Column::from_array(input.values),
    })?;
    Ok(AggregateColumns {
        keys: groups.iter().map(|g| g.key).collect(),
        counts: groups.iter().map(|g| Some(g.stats.count as i64)).collect(),
        sums: groups.iter().map(|g| g.stats.sum).collect(),
        mins: groups.iter().map(|g| g.stats.min).collect(),
        maxs: groups.iter().map(|g| g.stats.max).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Stats = (u64, Option<i64>, Option<i64>, Option<i64>);

    /// The plain-language definition: a sorted map, exact i128 sums, and
    /// overflow judged on each group's total.
    fn reference(
        rows: &[(Option<i64>, Option<i64>)],
    ) -> Result<BTreeMap<Option<i64>, Stats>, Option<i64>> {
        let mut groups: BTreeMap<Option<i64>, Vec<i64>> = BTreeMap::new();
        for (key, value) in rows {
            let values = groups.entry(*key).or_default();
            values.extend(value);
        }
        let mut out = BTreeMap::new();
        for (key, values) in groups {
            let exact: i128 = values.iter().map(|v| i128::from(*v)).sum();
            let sum = i64::try_from(exact).map_err(|_| key)?;
            let present = !values.is_empty();
            out.insert(
                key,
                (
                    values.len() as u64,
                    present.then_some(sum),
                    values.iter().min().copied(),
                    values.iter().max().copied(),
                ),
            );
        }
        Ok(out)
    }

    fn as_map(groups: &[Group]) -> BTreeMap<Option<i64>, Stats> {
        let map: BTreeMap<_, _> = groups
            .iter()
            .map(|g| {
                (
                    g.key,
                    (g.stats.count, g.stats.sum, g.stats.min, g.stats.max),
                )
            })
            .collect();
        assert_eq!(map.len(), groups.len(), "a key appears in two groups");
        map
    }

    fn key() -> impl Strategy<Value = Option<i64>> {
        prop::option::weighted(
            0.9,
            prop_oneof![
                Just(i64::MIN),
                Just(i64::MAX),
                Just(0),
                -20i64..20,
                any::<i64>()
            ],
        )
    }

    fn value() -> impl Strategy<Value = Option<i64>> {
        prop::option::weighted(
            0.85,
            // Mostly small values so that most groups fit and a few overflow.
            prop_oneof![
                1 => Just(i64::MIN),
                1 => Just(i64::MAX),
                1 => Just(i64::MAX / 2 + 1),
                1 => Just(-1),
                16 => -1000i64..1000
            ],
        )
    }

    fn arrays(rows: &[(Option<i64>, Option<i64>)]) -> (Int64Array, Int64Array) {
        let keys = rows.iter().map(|r| r.0).collect();
        let values = rows.iter().map(|r| r.1).collect();
        (keys, values)
    }

    fn run(rows: &[(Option<i64>, Option<i64>)]) -> Result<Vec<Group>, AggregateError> {
        let (keys, values) = arrays(rows);
        aggregate_i64(KeyedValues {
            keys: Column::from_array(&keys),
            values: Column::from_array(&values),
        })
    }

    proptest! {
        #[test]
        fn aggregate_matches_the_sorted_map_reference_or_names_the_smallest_overflowing_key(
            rows in prop::collection::vec((key(), value()), 0..300),
        ) {
            match (run(&rows), reference(&rows)) {
                (Ok(groups), Ok(expected)) => prop_assert_eq!(as_map(&groups), expected),
                (Err(AggregateError::SumOverflow { key }), Err(expected)) => {
                    prop_assert_eq!(key, expected)
                }
                (got, expected) => panic!("got {got:?}, expected {expected:?}"),
            }
        }

        #[test]
        fn aggregate_over_batches_equals_aggregate_over_their_concatenation(
            rows in prop::collection::vec((key(), value()), 0..200),
            split in 0usize..200,
        ) {
            let split = split.min(rows.len());
            let mut table = I64GroupTable::new();
            for batch in [&rows[..split], &rows[split..]] {
                let (keys, values) = arrays(batch);
                table.update(KeyedValues {
                    keys: Column::from_array(&keys),
                    values: Column::from_array(&values),
                });
            }
            let batched = table.finish().map(|g| as_map(&g));
            let whole = run(&rows).map(|g| as_map(&g));
            prop_assert_eq!(batched, whole);
        }
    }

    #[test]
    fn aggregate_sum_overflow_is_judged_on_the_exact_total() {
        // MAX + 1 wraps half way, but the total MAX + 1 - 1 fits.
        let rows = [
            (Some(7), Some(i64::MAX)),
            (Some(7), Some(1)),
            (Some(7), Some(-1)),
        ];
        let groups = run(&rows).unwrap();
        assert_eq!(groups[0].stats.sum, Some(i64::MAX));
        let rows = [(Some(7), Some(i64::MIN)), (Some(7), Some(-1))];
        assert_eq!(
            run(&rows).unwrap_err(),
            AggregateError::SumOverflow { key: Some(7) }
        );
    }

    #[test]
    fn aggregate_sum_overflow_names_the_smallest_key_null_first() {
        let rows = [
            (Some(5), Some(i64::MAX)),
            (Some(5), Some(i64::MAX)),
            (None, Some(i64::MIN)),
            (None, Some(i64::MIN)),
        ];
        let error = run(&rows).unwrap_err();
        assert_eq!(error, AggregateError::SumOverflow { key: None });
        assert_eq!(error.to_string(), "sum overflows Int64 for key null");
    }

    #[test]
    fn aggregate_groups_with_only_null_values_have_count_zero_and_null_stats() {
        let keys = Int64Array::from(vec![Some(1), Some(1), None]);
        let values = Int64Array::from(vec![None, None, Some(4)]);
        let got = aggregate_i64_arrays(KeyedArrays {
            keys: &keys,
            values: &values,
        })
        .unwrap();
        assert_eq!(got.keys.iter().collect::<Vec<_>>(), vec![Some(1), None]);
        assert_eq!(got.counts.values().to_vec(), vec![0, 1]);
        assert_eq!(got.sums.iter().collect::<Vec<_>>(), vec![None, Some(4)]);
        assert_eq!(got.mins.iter().collect::<Vec<_>>(), vec![None, Some(4)]);
        assert_eq!(got.maxs.iter().collect::<Vec<_>>(), vec![None, Some(4)]);
    }

    #[test]
    fn aggregate_table_grows_past_many_distinct_keys_including_the_device_sentinel() {
        let keys: Vec<i64> = (0..10_000).map(|k| k * 7919).chain([i64::MIN]).collect();
        let keys = Int64Array::from(keys);
        let values = Int64Array::from(vec![1; keys.len()]);
        let groups = aggregate_i64(KeyedValues {
            keys: Column::from_array(&keys),
            values: Column::from_array(&values),
        })
        .unwrap();
        assert_eq!(groups.len(), 10_001);
        assert_eq!(groups.last().unwrap().key, Some(i64::MIN));
        assert!(groups.iter().all(|g| g.stats.count == 1));
    }

    #[test]
    fn aggregate_rejects_mismatched_row_counts() {
        let keys = Int64Array::from(vec![1, 2]);
        let values = Int64Array::from(vec![1]);
        assert_eq!(
            aggregate_i64_arrays(KeyedArrays {
                keys: &keys,
                values: &values
            })
            .unwrap_err(),
            AggregateError::RowCountMismatch {
                key_rows: 2,
                value_rows: 1
            }
        );
    }
}
