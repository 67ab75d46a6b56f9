//! Keyed aggregation state that lives on a device across batches.
//!
//! A GPU-placed aggregate keeps a hash table of partial aggregates on its
//! slot's device: each coalesced batch is upserted into it (one kernel, no
//! copy back), and only when the table is half full, at a checkpoint, or at
//! the end of input are its groups drained to the host, where the
//! operator's managed-memory state (which spills to the IOManager like any
//! aggregate's) merges them. The device table is a write-back cache of that
//! state: what a checkpoint snapshots is always on the host, and a device
//! that fails loses at most what a restart from the last checkpoint
//! replays.
//!
//! What fuses: one Int64 key and `count(*)`, `count`, `sum`, `min`, `max`
//! of Int64 columns. A partial holds, per group and aggregate, the count of
//! non-null values, their exact sum (128-bit), minimum and maximum; the host
//! merges partials with `sum` of counts and sums, `min` of minimums and
//! `max` of maximums, which gives exactly the CPU aggregate's integers. A
//! partial sum that does not fit Int64 is an error, as the CPU aggregate's
//! running sum overflowing is.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::backend::KernelError;
use super::gpu::pool::DeviceReservation;
use crate::job::{AggFunc, AggSpec};

/// What one aggregate keeps per group on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialKind {
    CountStar,
    Count,
    Sum,
    Min,
    Max,
}

/// A keyed aggregation as the device runs it.
#[derive(Clone, Debug)]
pub struct AggProgram {
    /// The key column of the input batches.
    pub key_column: usize,
    /// Per aggregate: what it keeps, and its Int64 input column.
    pub parts: Vec<(PartialKind, Option<usize>)>,
    /// What a drain gives back: the key, then one partial column per
    /// aggregate (`p0`, `p1`, ...).
    pub partial_schema: SchemaRef,
}

impl AggProgram {
    /// The device form of `aggs` grouped by `key_columns` of `input`, or
    /// why there is none (the reason `explain` prints).
    pub fn compile(
        input: &Schema,
        key_columns: &[usize],
        aggs: &[AggSpec],
    ) -> Result<AggProgram, String> {
        let [key_column] = key_columns else {
            return Err(format!(
                "the GPU aggregation groups by one Int64 key, not {}",
                key_columns.len()
            ));
        };
        let key = input.field(*key_column);
        if key.data_type() != &DataType::Int64 {
            return Err(format!(
                "key `{}` is {}: the GPU aggregation groups by Int64",
                key.name(),
                key.data_type()
            ));
        }
        let mut parts = Vec::with_capacity(aggs.len());
        let mut fields = vec![key.clone().with_nullable(true)];
        for (j, agg) in aggs.iter().enumerate() {
            let column = match &agg.column {
                None => None,
                Some(name) => {
                    let index = input
                        .index_of(name)
                        .map_err(|_| format!("unknown column `{name}`"))?;
                    if input.field(index).data_type() != &DataType::Int64 {
                        return Err(format!(
                            "`{}({name})` is over {}: the GPU aggregation sums Int64",
                            agg.func.name(),
                            input.field(index).data_type()
                        ));
                    }
                    Some(index)
                }
            };
            let kind = match (agg.func, column) {
                (AggFunc::Count, None) => PartialKind::CountStar,
                (AggFunc::Count, Some(_)) => PartialKind::Count,
                (AggFunc::Sum, Some(_)) => PartialKind::Sum,
                (AggFunc::Min, Some(_)) => PartialKind::Min,
                (AggFunc::Max, Some(_)) => PartialKind::Max,
                (func, _) => {
                    return Err(format!("no GPU aggregation for `{}`", func.name()));
                }
            };
            let nullable = matches!(kind, PartialKind::Sum | PartialKind::Min | PartialKind::Max);
            fields.push(Field::new(format!("p{j}"), DataType::Int64, nullable));
            parts.push((kind, column));
        }
        Ok(AggProgram {
            key_column: *key_column,
            parts,
            partial_schema: Arc::new(Schema::new(fields)),
        })
    }

    /// The aggregates that merge drained partials into the CPU aggregate's
    /// state: counts and sums add up, minimums and maximums combine.
    pub fn merge_aggs(&self, aggs: &[AggSpec]) -> Vec<AggSpec> {
        aggs.iter()
            .zip(&self.parts)
            .enumerate()
            .map(|(j, (agg, (kind, _)))| AggSpec {
                func: match kind {
                    PartialKind::CountStar | PartialKind::Count | PartialKind::Sum => AggFunc::Sum,
                    PartialKind::Min => AggFunc::Min,
                    PartialKind::Max => AggFunc::Max,
                },
                column: Some(format!("p{j}")),
                output: agg.output.clone(),
            })
            .collect()
    }

    /// The distinct value columns, in the order the device keeps them.
    pub fn value_columns(&self) -> Vec<usize> {
        let mut columns: Vec<usize> = self.parts.iter().filter_map(|(_, c)| *c).collect();
        columns.sort_unstable();
        columns.dedup();
        columns
    }
}

/// One group's partials of one value column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partial {
    pub count: u64,
    pub sum: i128,
    pub min: i64,
    pub max: i64,
}

impl Default for Partial {
    fn default() -> Self {
        Partial {
            count: 0,
            sum: 0,
            min: i64::MAX,
            max: i64::MIN,
        }
    }
}

/// A group's partials: `count(*)`, then one per value column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPartials {
    pub rows: u64,
    pub values: Vec<Partial>,
}

/// The keyed partials of a device table, and its capacity.
pub trait DeviceAggTable: Send {
    /// Folds `pieces` (input batches) into the table. The caller keeps
    /// `groups() + rows` at most half the capacity (it drains first).
    fn upsert(&mut self, pieces: &[RecordBatch]) -> Result<(), KernelError>;

    /// Groups in the table now (a device table waits here for its last
    /// upsert, which it did not wait for).
    fn groups(&mut self) -> Result<u64, KernelError>;

    /// Slots of the table.
    fn capacity(&self) -> u64;

    /// The groups as a batch of [`AggProgram::partial_schema`], leaving the
    /// table empty.
    fn drain(&mut self) -> Result<RecordBatch, KernelError>;
}

/// The partials of `groups` as a batch (shared by every implementation):
/// a sum that does not fit Int64 is the CPU aggregate's overflow.
pub fn partials_batch(
    program: &AggProgram,
    groups: Vec<(Option<i64>, GroupPartials)>,
) -> Result<RecordBatch, KernelError> {
    let values = program.value_columns();
    let keys: Int64Array = groups.iter().map(|(k, _)| *k).collect();
    let mut columns: Vec<ArrayRef> = vec![Arc::new(keys)];
    for (kind, column) in &program.parts {
        let slot = column.and_then(|c| values.iter().position(|v| *v == c));
        let array: Int64Array = groups
            .iter()
            .map(|(key, g)| {
                let p = slot.map(|s| g.values[s]).unwrap_or_default();
                Ok(match kind {
                    PartialKind::CountStar => Some(g.rows as i64),
                    PartialKind::Count => Some(p.count as i64),
                    _ if p.count == 0 => None,
                    PartialKind::Sum => Some(i64::try_from(p.sum).map_err(|_| {
                        KernelError::Aggregate(
                            crate::kernels::cpu::aggregate::AggregateError::SumOverflow {
                                key: *key,
                            },
                        )
                    })?),
                    PartialKind::Min => Some(p.min),
                    PartialKind::Max => Some(p.max),
                })
            })
            .collect::<Result<_, KernelError>>()?;
        columns.push(Arc::new(array));
    }
    Ok(RecordBatch::try_new(
        Arc::clone(&program.partial_schema),
        columns,
    )?)
}

/// The host twin of a device table (the CPU backend's, and the simulated
/// GPU's, which also holds the table's bytes in the slot's device budget).
pub struct HostAggTable {
    program: Arc<AggProgram>,
    capacity: u64,
    groups: HashMap<Option<i64>, GroupPartials>,
    _reservation: Option<DeviceReservation>,
}

impl HostAggTable {
    pub fn new(
        program: Arc<AggProgram>,
        capacity: u64,
        reservation: Option<DeviceReservation>,
    ) -> Self {
        HostAggTable {
            program,
            capacity,
            groups: HashMap::new(),
            _reservation: reservation,
        }
    }
}

impl DeviceAggTable for HostAggTable {
    fn upsert(&mut self, pieces: &[RecordBatch]) -> Result<(), KernelError> {
        let values = self.program.value_columns();
        for piece in pieces {
            let keys = piece
                .column(self.program.key_column)
                .as_primitive::<Int64Type>();
            let columns: Vec<&Int64Array> = values
                .iter()
                .map(|&c| piece.column(c).as_primitive::<Int64Type>())
                .collect();
            for row in 0..piece.num_rows() {
                let key = keys.is_valid(row).then(|| keys.value(row));
                let group = self.groups.entry(key).or_insert_with(|| GroupPartials {
                    rows: 0,
                    values: vec![Partial::default(); columns.len()],
                });
                group.rows += 1;
                for (p, column) in group.values.iter_mut().zip(&columns) {
                    if column.is_valid(row) {
                        let v = column.value(row);
                        p.count += 1;
                        p.sum += i128::from(v);
                        p.min = p.min.min(v);
                        p.max = p.max.max(v);
                    }
                }
            }
        }
        Ok(())
    }

    fn groups(&mut self) -> Result<u64, KernelError> {
        Ok(self.groups.len() as u64)
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn drain(&mut self) -> Result<RecordBatch, KernelError> {
        let groups: Vec<(Option<i64>, GroupPartials)> = self.groups.drain().collect();
        partials_batch(&self.program, groups)
    }
}

/// Device bytes of a table of `capacity` slots (plus the null key's slot):
/// the table itself, its two counters, and the drain's output (sized for
/// every slot, reserved with the table so a drain never fails for memory).
pub fn device_bytes(program: &AggProgram, capacity: u64) -> u64 {
    let values = program.value_columns().len() as u64;
    let slots = capacity + 1;
    let table = slots * (8 + 8 + 4 + 40 * values) + 16;
    let out = slots * (8 + 8 + 8 + 40 * values);
    table + out
}

/// Offsets (bytes) of the table's arrays in its one allocation, for
/// `slots` slots and `values` value columns: keys, rows, per value column
/// count / sum low word / sum high word / min / max, the state words, then
/// the group and drain counters.
pub fn table_layout(slots: u64, values: u64) -> (u64, u64) {
    let state = slots * (16 + 40 * values);
    let counters = state + slots * 4;
    (state, counters.div_ceil(8) * 8)
}

/// CUDA source of the table's kernels for `program` (NVRTC, cached like
/// the chains'): `agg_clear` empties slots, `agg_upsert` folds rows in
/// (open addressing with linear probing; a slot is claimed by CAS on its
/// state word, 0 empty → 1 claiming → 2 ready; counts and the 128-bit sums
/// by atomic adds, the sum's carry from the low word's old value; min and
/// max by atomicMin/atomicMax), `agg_drain` compacts the ready slots into
/// the output with an atomic cursor. The null key has its own slot, the
/// last. The key hash is `kernels/hash.cuh`'s, remixed.
pub fn cuda_source(program: &AggProgram) -> String {
    let values = program.value_columns().len();
    let mut params = String::new();
    let mut fold = String::new();
    for v in 0..values {
        params.push_str(&format!(
            "const long long* __restrict__ v{v}, const unsigned int* __restrict__ m{v}, "
        ));
        fold.push_str(&format!(
            r#"  if (m{v} == 0 || ((m{v}[row >> 5] >> (row & 31)) & 1u)) {{
    const long long x = v{v}[row];
    unsigned long long* col = (unsigned long long*)(table + (16ull + 40ull * {v}) * slots);
    atomicAdd(&col[s], 1ull);
    const unsigned long long old = atomicAdd(&col[slots + s], (unsigned long long)x);
    const unsigned long long carry = old + (unsigned long long)x < old ? 1ull : 0ull;
    const unsigned long long high = (x < 0 ? ~0ull : 0ull) + carry;
    if (high != 0ull) atomicAdd(&col[2 * slots + s], high);
    atomicMin((long long*)&col[3 * slots + s], x);
    atomicMax((long long*)&col[4 * slots + s], x);
  }}
"#
        ));
    }
    format!(
        r#"// Generated by strata from a keyed aggregation; do not edit.
#include "hash.cuh"

__device__ __forceinline__ unsigned int* state_words(unsigned char* table, unsigned long long slots) {{
  return (unsigned int*)(table + (16ull + 40ull * {values}) * slots);
}}
__device__ __forceinline__ unsigned long long* counters(unsigned char* table, unsigned long long slots) {{
  return (unsigned long long*)(table + (((16ull + 40ull * {values}) * slots + 4ull * slots + 7ull) / 8ull) * 8ull);
}}

extern "C" __global__ void agg_clear(unsigned char* __restrict__ table, unsigned long long slots) {{
  const unsigned long long s = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (s == 0) {{ counters(table, slots)[0] = 0ull; counters(table, slots)[1] = 0ull; }}
  if (s >= slots) return;
  unsigned long long* words = (unsigned long long*)table;
  words[s] = 0ull;
  words[slots + s] = 0ull;
  for (unsigned int v = 0; v < {values}u; ++v) {{
    unsigned long long* col = (unsigned long long*)(table + (16ull + 40ull * v) * slots);
    col[s] = 0ull;
    col[slots + s] = 0ull;
    col[2 * slots + s] = 0ull;
    col[3 * slots + s] = 0x7fffffffffffffffull;
    col[4 * slots + s] = 0x8000000000000000ull;
  }}
  state_words(table, slots)[s] = 0u;
}}

extern "C" __global__ void agg_upsert(const long long* __restrict__ keys, const unsigned int* __restrict__ key_valid, {params}unsigned long long n, unsigned char* __restrict__ table, unsigned long long slots) {{
  const unsigned long long row = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= n) return;
  long long* table_keys = (long long*)table;
  unsigned int* state = state_words(table, slots);
  const unsigned long long capacity = slots - 1;
  const bool valid = key_valid == 0 || ((key_valid[row >> 5] >> (row & 31)) & 1u);
  const long long key = valid ? keys[row] : 0;
  unsigned long long s = valid ? (strata::fmix64(strata::hash_u64((unsigned long long)key) ^ 0x5BD1E995ull) & (capacity - 1)) : capacity;
  for (unsigned long long probes = 0; probes <= capacity; ++probes) {{
    unsigned int seen = atomicCAS(&state[s], 0u, 1u);
    if (seen == 0u) {{
      table_keys[s] = key;
      __threadfence();
      atomicExch(&state[s], 2u);
      atomicAdd(&counters(table, slots)[0], 1ull);
      break;
    }}
    while (seen == 1u) seen = atomicAdd(&state[s], 0u);
    __threadfence();
    if (!valid || ((volatile long long*)table_keys)[s] == key) break;
    s = (s + 1) & (capacity - 1);
  }}
  atomicAdd(&((unsigned long long*)table)[slots + s], 1ull);
{fold}}}

extern "C" __global__ void agg_drain(unsigned char* __restrict__ table, unsigned long long slots, unsigned long long* __restrict__ out) {{
  const unsigned long long s = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= slots || state_words(table, slots)[s] != 2u) return;
  const unsigned long long at = atomicAdd(&counters(table, slots)[1], 1ull);
  const unsigned long long* words = (const unsigned long long*)table;
  out[at] = words[s];
  out[slots + at] = s == slots - 1 ? 1ull : 0ull;
  out[2 * slots + at] = words[slots + s];
  for (unsigned int w = 0; w < {value_words}u; ++w) out[(3 + w) * slots + at] = words[(2 + w) * slots + s];
}}
"#,
        value_words = 5 * values,
    )
}
