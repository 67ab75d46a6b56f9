//! Hash partitioning: the CPU twin of `kernels/partition.cu`.
//!
//! Rows are routed by key hash exactly as the network's hash exchange routes
//! them (`subtask_for_hash`, Flink's key groups), and their indices are
//! grouped by partition in three passes that mirror the kernel's launches:
//! [`assign_partitions`] (partition id per row and counts per partition),
//! [`partition_offsets`] (exclusive prefix sum) and [`scatter_rows`]. The CPU
//! twin keeps row order inside each partition; the GPU does not promise an
//! order, so the two agree on each partition's set of rows. Row indices are
//! `u32`: a batch holds fewer than 2^32 rows.

use arrow_array::ArrayRef;

use crate::kernels::cpu::hash::{HashError, hash_columns, subtask_for_hash};

/// Errors of the partitioning kernels.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(
        "invalid routing: parallelism {parallelism} must be between 1 and max parallelism {max_parallelism}"
    )]
    InvalidRouting {
        max_parallelism: u32,
        parallelism: u32,
    },
    #[error("cannot partition a batch of {row_count} rows: row indices are 32-bit")]
    TooManyRows { row_count: usize },
    #[error("cannot partition by an empty key")]
    NoKeyColumns,
    #[error(transparent)]
    Hash(#[from] HashError),
}

/// How hashes map to partitions: `parallelism` partitions over
/// `max_parallelism` key groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    max_parallelism: u32,
    parallelism: u32,
}

impl Routing {
    pub fn new(max_parallelism: u32, parallelism: u32) -> Result<Self, PartitionError> {
        if parallelism == 0 || parallelism > max_parallelism {
            return Err(PartitionError::InvalidRouting {
                max_parallelism,
                parallelism,
            });
        }
        Ok(Routing {
            max_parallelism,
            parallelism,
        })
    }

    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    /// The number of partitions.
    pub fn parallelism(&self) -> u32 {
        self.parallelism
    }

    #[inline]
    pub fn partition_of(&self, hash: u64) -> u32 {
        subtask_for_hash(hash, self.max_parallelism, self.parallelism)
    }
}

/// The rows of a batch grouped by partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partitioning {
    /// Partition id per row.
    pub partition_ids: Vec<u32>,
    /// `parallelism + 1` offsets into `rows`; the last is the row count.
    pub partition_offsets: Vec<u32>,
    /// Row indices grouped by partition, in row order inside each.
    pub rows: Vec<u32>,
}

impl Partitioning {
    pub fn partition_count(&self) -> usize {
        self.partition_offsets.len() - 1
    }

    /// The rows of one partition.
    pub fn rows_of(&self, partition: usize) -> &[u32] {
        let start = self.partition_offsets[partition] as usize;
        let end = self.partition_offsets[partition + 1] as usize;
        &self.rows[start..end]
    }
}

/// Pass 1: the partition of each row into `partition_ids`, and the number of
/// rows per partition into `partition_counts` (overwritten).
///
/// # Panics
/// If `partition_ids` is not one per hash or `partition_counts` not one per
/// partition.
pub fn assign_partitions(
    hashes: &[u64],
    routing: Routing,
    partition_ids: &mut [u32],
    partition_counts: &mut [u32],
) {
    assert_eq!(
        partition_ids.len(),
        hashes.len(),
        "one partition id per row"
    );
    assert_eq!(
        partition_counts.len(),
        routing.parallelism as usize,
        "one count per partition"
    );
    partition_counts.fill(0);
    for (id, &hash) in partition_ids.iter_mut().zip(hashes) {
        *id = routing.partition_of(hash);
        partition_counts[*id as usize] += 1;
    }
}

/// Pass 2: the exclusive prefix sum of the counts, with the total appended.
///
/// # Panics
/// If `partition_offsets` is not one longer than `partition_counts`.
pub fn partition_offsets(partition_counts: &[u32], partition_offsets: &mut [u32]) {
    assert_eq!(
        partition_offsets.len(),
        partition_counts.len() + 1,
        "offsets are counts + 1"
    );
    let mut total = 0u32;
    for (offset, &count) in partition_offsets.iter_mut().zip(partition_counts) {
        *offset = total;
        total += count;
    }
    partition_offsets[partition_counts.len()] = total;
}

/// Pass 3: the row indices grouped by partition, in row order inside each.
///
/// # Panics
/// If the offsets do not account for every row exactly once.
pub fn scatter_rows(partition_ids: &[u32], partition_offsets: &[u32], rows: &mut [u32]) {
    assert_eq!(rows.len(), partition_ids.len(), "one slot per row");
    assert_eq!(
        partition_offsets.last().copied(),
        Some(partition_ids.len() as u32),
        "offsets end at the row count"
    );
    let mut cursors = partition_offsets[..partition_offsets.len() - 1].to_vec();
    for (row, &partition) in partition_ids.iter().enumerate() {
        let cursor = &mut cursors[partition as usize];
        rows[*cursor as usize] = row as u32;
        *cursor += 1;
    }
    debug_assert!(
        cursors
            .iter()
            .zip(&partition_offsets[1..])
            .all(|(cursor, end)| cursor == end),
        "a partition's rows overran its offsets"
    );
}

/// All three passes over a batch's row hashes.
pub fn partition_hashes(hashes: &[u64], routing: Routing) -> Result<Partitioning, PartitionError> {
    let row_count = hashes.len();
    if u32::try_from(row_count).is_err() {
        return Err(PartitionError::TooManyRows { row_count });
    }
    let mut partition_ids = vec![0; row_count];
    let mut counts = vec![0; routing.parallelism as usize];
    assign_partitions(hashes, routing, &mut partition_ids, &mut counts);
    let mut offsets = vec![0; counts.len() + 1];
    partition_offsets(&counts, &mut offsets);
    let mut rows = vec![0; row_count];
    scatter_rows(&partition_ids, &offsets, &mut rows);
    Ok(Partitioning {
        partition_ids,
        partition_offsets: offsets,
        rows,
    })
}

/// Hashes the key columns with the stable hash and partitions the rows.
pub fn partition_key_columns(
    key_columns: &[ArrayRef],
    routing: Routing,
) -> Result<Partitioning, PartitionError> {
    if key_columns.is_empty() {
        return Err(PartitionError::NoKeyColumns);
    }
    let mut hashes = Vec::new();
    hash_columns(key_columns, &mut hashes)?;
    partition_hashes(&hashes, routing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::hash::hash_u64;
    use arrow_array::{Int64Array, StringArray};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// The plain-language definition: each row goes to its subtask, in order.
    fn reference(
        hashes: &[u64],
        max_parallelism: u32,
        parallelism: u32,
    ) -> BTreeMap<u32, Vec<u32>> {
        let mut partitions = BTreeMap::new();
        for (row, &hash) in hashes.iter().enumerate() {
            let target = subtask_for_hash(hash, max_parallelism, parallelism);
            partitions
                .entry(target)
                .or_insert_with(Vec::new)
                .push(row as u32);
        }
        partitions
    }

    fn routing() -> impl Strategy<Value = Routing> {
        (1u32..=4096)
            .prop_flat_map(|max| (Just(max), 1..=max))
            .prop_map(|(max, parallelism)| Routing::new(max, parallelism).unwrap())
    }

    fn hash_values() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            Just(u64::MAX),
            any::<u64>(),
            (0u64..1000).prop_map(hash_u64)
        ]
    }

    proptest! {
        #[test]
        fn partitions_hold_exactly_the_rows_routed_to_them_in_row_order(
            hashes in prop::collection::vec(hash_values(), 0..300),
            routing in routing(),
        ) {
            let got = partition_hashes(&hashes, routing).unwrap();
            let expected = reference(&hashes, routing.max_parallelism(), routing.parallelism());
            prop_assert_eq!(got.partition_count(), routing.parallelism() as usize);
            for partition in 0..got.partition_count() {
                let expected_rows = expected.get(&(partition as u32)).cloned().unwrap_or_default();
                prop_assert_eq!(got.rows_of(partition), expected_rows.as_slice());
            }
            for (row, &id) in got.partition_ids.iter().enumerate() {
                prop_assert_eq!(id, routing.partition_of(hashes[row]));
            }
        }

        #[test]
        fn partition_offsets_are_the_exclusive_prefix_sum(
            counts in prop::collection::vec(0u32..1000, 1..200),
        ) {
            let mut offsets = vec![u32::MAX; counts.len() + 1];
            partition_offsets(&counts, &mut offsets);
            prop_assert_eq!(offsets[0], 0);
            for (i, &count) in counts.iter().enumerate() {
                prop_assert_eq!(offsets[i + 1] - offsets[i], count);
            }
        }
    }

    #[test]
    fn key_columns_route_like_the_hash_exchange() {
        let keys: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![Some(1), None, Some(3), Some(1)])),
            Arc::new(StringArray::from(vec![
                Some("a"),
                Some("b"),
                None,
                Some("a"),
            ])),
        ];
        let routing = Routing::new(128, 4).unwrap();
        let got = partition_key_columns(&keys, routing).unwrap();
        let mut hashes = Vec::new();
        hash_columns(&keys, &mut hashes).unwrap();
        for (row, &hash) in hashes.iter().enumerate() {
            assert_eq!(got.partition_ids[row], subtask_for_hash(hash, 128, 4));
        }
        // Equal keys land together.
        assert_eq!(got.partition_ids[0], got.partition_ids[3]);
    }

    #[test]
    fn invalid_routing_is_rejected_with_both_numbers() {
        let error = Routing::new(8, 9).unwrap_err();
        assert!(matches!(
            error,
            PartitionError::InvalidRouting {
                max_parallelism: 8,
                parallelism: 9
            }
        ));
        assert!(Routing::new(8, 0).is_err());
        assert!(matches!(
            partition_key_columns(&[], Routing::new(8, 1).unwrap()),
            Err(PartitionError::NoKeyColumns)
        ));
    }
}
