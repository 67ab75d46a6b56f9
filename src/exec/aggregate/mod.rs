//! Keyed aggregation and tumbling event-time windows over the paged hash
//! table.
//!
//! Keys are encoded row by row into bytes ([`super::keycodec`]), accumulators are 16
//! bytes each (value, non-null count). Results are built back into Arrow
//! arrays and cast to the planned output types.
//!
//! Checkpoints: both operators snapshot their tables (raw entries) and the
//! rows they spilled (copied out of the spill file, which stays theirs), so a
//! snapshot restores on any TaskManager; see [`snapshot`].

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int64Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_cast::cast;
use arrow_schema::{DataType, SchemaRef};

use super::ExecError;
use super::hashtable::{NO_CANDIDATE, PagedHashTable, TableError, read_u64, write_u64};
use super::keycodec::{
    FIXED_KEY_BYTES, KeyClass, KeyColumn, decode_keys, encode_fixed_keys, encode_key,
    is_fixed_width, key_class, prepare_key,
};
use super::operators::{Operator, Output};
use super::spill::SpillContext;
use crate::job::{AggFunc, AggSpec};
use crate::kernels::cpu::hash::{fmix64, hash_columns};
use crate::memory::{MemoryManager, Page};

mod snapshot;
mod spill;

use spill::{SpilledRows, partition_of};

const ACC_WIDTH: usize = 16;
const OUTPUT_BATCH_ROWS: usize = 8192;
/// Partitions per spill level, picked by [`PARTITION_BITS`] hash bits.
pub const PARTITION_COUNT: usize = 16;
const PARTITION_BITS: u32 = PARTITION_COUNT.trailing_zeros();
const _: () = assert!(PARTITION_COUNT.is_power_of_two());
/// Spilled rows staged per partition before they are encoded into a block:
/// bounds the heap the spill path uses to `PARTITION_COUNT × this` per level.
const STAGED_BYTES_MAX: usize = 256 << 10;
/// Pages a spilling grouper holds back from its table and hands to the
/// re-aggregation of each partition: without them, a window firing while
/// newer windows hold the whole budget could not re-aggregate anything.
const RESERVE_PAGES: usize = 8;
/// Levels of re-partitioning before giving up: 16 levels use all 64 bits.
const SPILL_LEVEL_MAX: u32 = 64 / PARTITION_BITS;

#[derive(Clone, Copy, Debug, PartialEq)]
enum AccKind {
    CountStar,
    Count,
    SumInt,
    SumFloat,
    MinInt,
    MinFloat,
    MaxInt,
    MaxFloat,
    Avg,
}

#[derive(Clone, Debug)]
struct AccPlan {
    kind: AccKind,
    column: Option<usize>,
    output: String,
}

/// An input column prepared for accumulation.
enum AccInput {
    None,
    Int(Int64Array),
    Float(Float64Array),
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

/// The grouping state of one aggregation (one window, for windows).
struct Groups {
    /// `None` when not even the first page could be reserved.
    table: Option<PagedHashTable>,
    /// Set once the table was refused a page: it admits no new key after.
    full: bool,
    /// Rows of keys that are not in the table; created on the first refusal.
    spilled: Option<SpilledRows>,
    /// Spill level: which hash bits pick a row's partition.
    level: u32,
}

impl Groups {
    fn len(&self) -> usize {
        self.table.as_ref().map_or(0, PagedHashTable::len)
    }
}

/// Shared machinery of aggregate and window operators.
struct Grouper {
    operator: String,
    /// What rows restored from a checkpoint are checked against.
    input_schema: SchemaRef,
    key_columns: Vec<usize>,
    key_classes: Vec<KeyClass>,
    accs: Vec<AccPlan>,
    output_schema: SchemaRef,
    memory: MemoryManager,
    spill: Option<SpillContext>,
    hashes: Vec<u64>,
    key_scratch: Vec<u8>,
    /// Whether every key fits [`FIXED_KEY_BYTES`]: then a batch's keys are
    /// encoded column at a time into `fixed_keys` and compared as words.
    fixed_width: bool,
    fixed_keys: Vec<[u8; FIXED_KEY_BYTES]>,
    fixed_lens: Vec<u8>,
    group_ids: Vec<u32>,
    probes: Vec<u64>,
    kept_rows: Vec<u32>,
    spill_rows: Vec<Vec<u32>>,
    /// Held back for re-aggregation (see [`RESERVE_PAGES`]).
    reserve: Vec<Page>,
}

impl Grouper {
    fn new(
        operator: &str,
        input: &arrow_schema::Schema,
        key_columns: Vec<usize>,
        aggs: &[AggSpec],
        output_schema: SchemaRef,
        memory: MemoryManager,
        spill: Option<SpillContext>,
    ) -> Result<Self, ExecError> {
        let key_classes: Vec<KeyClass> = key_columns
            .iter()
            .map(|&i| {
                let field = input.field(i);
                key_class(field.data_type()).ok_or_else(|| ExecError::Unsupported {
                    operator: operator.to_owned(),
                    detail: format!(
                        "key column '{}' of type {} cannot be grouped on",
                        field.name(),
                        field.data_type()
                    ),
                })
            })
            .collect::<Result<_, _>>()?;
        let accs = aggs
            .iter()
            .map(|a| plan_acc(operator, input, a))
            .collect::<Result<_, _>>()?;
        let fixed_width = is_fixed_width(&key_classes);
        Ok(Self {
            fixed_width,
            fixed_keys: Vec::new(),
            fixed_lens: Vec::new(),
            operator: operator.to_owned(),
            input_schema: Arc::new(input.clone()),
            key_columns,
            key_classes,
            accs,
            output_schema,
            memory,
            spill,
            hashes: Vec::new(),
            key_scratch: Vec::with_capacity(64),
            group_ids: Vec::new(),
            probes: Vec::new(),
            kept_rows: Vec::new(),
            spill_rows: vec![Vec::new(); PARTITION_COUNT],
            reserve: Vec::new(),
        }
        .with_reserve())
    }

    /// Takes back the reserve pages, as many as the budget allows now.
    fn with_reserve(mut self) -> Self {
        self.refill_reserve();
        self
    }

    fn refill_reserve(&mut self) {
        if self.spill.is_none() {
            return;
        }
        while self.reserve.len() < RESERVE_PAGES {
            match self.memory.allocate_pages(1) {
                Ok(pages) => self.reserve.extend(pages),
                Err(_) => break,
            }
        }
    }

    fn new_groups(&self, level: u32) -> Result<Groups, ExecError> {
        let table = match PagedHashTable::new(self.memory.clone(), ACC_WIDTH * self.accs.len()) {
            Ok(table) => Some(table),
            Err(TableError::Memory(e)) if self.spill.is_some() => {
                self.log_spill_start(level, &e.to_string());
                None
            }
            Err(e) => return Err(self.table_error(e)),
        };
        Ok(Groups {
            full: table.is_none(),
            table,
            spilled: None,
            level,
        })
    }

    fn log_spill_start(&self, level: u32, reason: &str) {
        tracing::info!(
            operator = %self.operator,
            level,
            used_bytes = self.memory.used_bytes(),
            budget_bytes = self.memory.budget_bytes(),
            "aggregation state does not fit managed memory; spilling rows of new keys \
             to {PARTITION_COUNT} hash partitions: {reason}"
        );
    }

    fn table_error(&self, e: TableError) -> ExecError {
        ExecError::State {
            operator: self.operator.clone(),
            detail: e.to_string(),
        }
    }

    /// Folds the selected rows of `batch` into `groups` (`rows = None`: all).
    fn update(
        &mut self,
        groups: &mut Groups,
        batch: &RecordBatch,
        rows: Option<&[u32]>,
    ) -> Result<(), ExecError> {
        let keys: Vec<ArrayRef> = self
            .key_columns
            .iter()
            .map(|&i| Arc::clone(batch.column(i)))
            .collect();
        hash_columns(&keys, &mut self.hashes)?;
        let key_cols = keys
            .iter()
            .zip(&self.key_classes)
            .map(|(a, c)| prepare_key(a, *c))
            .collect::<Result<Vec<_>, _>>()?;
        let inputs = self
            .accs
            .iter()
            .map(|a| prepare_input(batch, a))
            .collect::<Result<Vec<_>, _>>()?;
        let all: Vec<u32>;
        let rows = match rows {
            Some(r) => r,
            None => {
                all = (0..batch.num_rows() as u32).collect();
                &all
            }
        };
        // Phase 1a: every row's first candidate entry. These index loads do
        // not depend on each other, so their cache misses overlap.
        let accs = &self.accs;
        self.probes.clear();
        self.group_ids.clear();
        for &row in rows {
            // Remix: the routing hash's low bits are skewed by key groups.
            let probe = fmix64(self.hashes.get(row as usize).copied().unwrap_or(0) ^ 0x5BD1_E995);
            self.probes.push(probe);
            let candidate = match &groups.table {
                Some(table) => table.first_candidate(probe),
                None => NO_CANDIDATE,
            };
            self.group_ids.push(candidate);
        }
        // Phase 1b: confirm each candidate (again independent loads), and
        // take the full probe-or-insert path only on a miss. This loop is
        // the hot path; it stops at the first row the budget refuses.
        let mut refused_at = rows.len();
        let fixed = self.fixed_width;
        if fixed {
            encode_fixed_keys(
                &key_cols,
                batch.num_rows(),
                &mut self.fixed_keys,
                &mut self.fixed_lens,
            );
        }
        if let (false, Some(table)) = (groups.full, groups.table.as_mut()) {
            for (i, &row) in rows.iter().enumerate() {
                let probe = self.probes[i];
                let candidate = self.group_ids[i];
                let key: &[u8] = if fixed {
                    let (key, len) = (
                        &self.fixed_keys[row as usize],
                        self.fixed_lens[row as usize],
                    );
                    if candidate != NO_CANDIDATE
                        && table.matches_fixed(candidate as usize, probe, key, len as usize)
                    {
                        continue;
                    }
                    &key[..len as usize]
                } else {
                    encode_row_key(&key_cols, row, &mut self.key_scratch);
                    if candidate != NO_CANDIDATE
                        && table.matches(candidate as usize, probe, &self.key_scratch)
                    {
                        continue;
                    }
                    &self.key_scratch
                };
                match table.find_or_insert(probe, key, |acc| init_accs(accs, acc)) {
                    Ok(id) => self.group_ids[i] = id as u32,
                    Err(TableError::Memory(e)) if self.spill.is_some() => {
                        tracing::info!(
                            operator = %self.operator,
                            level = groups.level,
                            groups = table.len(),
                            table_bytes = table.memory_bytes(),
                            used_bytes = self.memory.used_bytes(),
                            budget_bytes = self.memory.budget_bytes(),
                            "aggregation state does not fit managed memory; spilling rows \
                             of new keys to {PARTITION_COUNT} hash partitions: {e}"
                        );
                        groups.full = true;
                        refused_at = i;
                        break;
                    }
                    Err(e) => return Err(self.table_error(e)),
                }
            }
        } else {
            refused_at = 0;
        }
        // Phase 1c, once the table admits no new key: rows of keys in it are
        // kept, the others go to their partitions.
        let spilled_any = refused_at < rows.len();
        if spilled_any {
            self.kept_rows.clear();
            self.kept_rows.extend_from_slice(&rows[..refused_at]);
            for (i, &row) in rows.iter().enumerate().skip(refused_at) {
                let key: &[u8] = if fixed {
                    &self.fixed_keys[row as usize][..self.fixed_lens[row as usize] as usize]
                } else {
                    encode_row_key(&key_cols, row, &mut self.key_scratch);
                    &self.key_scratch
                };
                let probe = self.probes[i];
                let candidate = self.group_ids[i];
                let found = groups.table.as_ref().and_then(|table| {
                    if candidate != NO_CANDIDATE && table.matches(candidate as usize, probe, key) {
                        Some(candidate as usize)
                    } else {
                        table.find(probe, key)
                    }
                });
                match found {
                    // Kept rows never overtake `i`, so this slot was read.
                    Some(id) => {
                        self.group_ids[self.kept_rows.len()] = id as u32;
                        self.kept_rows.push(row);
                    }
                    None => self.spill_rows[partition_of(probe, groups.level)].push(row),
                }
            }
        }
        // Phase 2: one tight loop per accumulator, column at a time.
        let kept_rows = if spilled_any { &self.kept_rows } else { rows };
        if let Some(table) = groups.table.as_mut() {
            let ids = &self.group_ids[..kept_rows.len()];
            for (i, (plan, input)) in accs.iter().zip(&inputs).enumerate() {
                accumulate(table, plan, input, kept_rows, ids, i * ACC_WIDTH).map_err(|()| {
                    ExecError::Overflow {
                        operator: self.operator.clone(),
                        column: plan.output.clone(),
                    }
                })?;
            }
        }
        if spilled_any {
            self.spill_partitions(groups, batch)?;
        }
        Ok(())
    }

    /// Builds the output batches of `groups`; `window` adds start/end columns.
    fn emit(
        &self,
        groups: &Groups,
        window: Option<(i64, i64)>,
        out: &mut dyn Output,
    ) -> Result<(), ExecError> {
        let Some(table) = &groups.table else {
            return Ok(());
        };
        let total = table.len();
        let mut start = 0;
        while start < total {
            let end = (start + OUTPUT_BATCH_ROWS).min(total);
            let batch = self.build(table, start..end, window)?;
            out.emit(batch)?;
            start = end;
        }
        Ok(())
    }

    fn build(
        &self,
        table: &PagedHashTable,
        ids: std::ops::Range<usize>,
        window: Option<(i64, i64)>,
    ) -> Result<RecordBatch, ExecError> {
        let n = ids.len();
        let mut columns: Vec<ArrayRef> =
            decode_keys(ids.clone().map(|id| table.key(id)), n, &self.key_classes);
        if let Some((ws, we)) = window {
            columns.push(Arc::new(Int64Array::from_value(ws, n)));
            columns.push(Arc::new(Int64Array::from_value(we, n)));
        }
        for (i, plan) in self.accs.iter().enumerate() {
            columns.push(build_acc(plan, table, ids.clone(), i));
        }
        let columns = columns
            .into_iter()
            .zip(self.output_schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    cast(&c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(
            Arc::clone(&self.output_schema),
            columns,
        )?)
    }
}

/// Encodes row `row`'s key (every key column) into `out`.
#[inline]
fn encode_row_key(key_cols: &[KeyColumn], row: u32, out: &mut Vec<u8>) {
    out.clear();
    for k in key_cols {
        encode_key(k, row as usize, out);
    }
}

fn plan_acc(
    operator: &str,
    input: &arrow_schema::Schema,
    a: &AggSpec,
) -> Result<AccPlan, ExecError> {
    let column = match &a.column {
        None => None,
        Some(name) => Some(input.index_of(name).map_err(|_| ExecError::Unsupported {
            operator: operator.to_owned(),
            detail: format!("column '{name}' not found"),
        })?),
    };
    let float = column.is_some_and(|c| is_float(input.field(c).data_type()));
    let numeric = column.is_some_and(|c| input.field(c).data_type().is_numeric());
    let kind = match (&a.func, column) {
        (AggFunc::Count, None) => AccKind::CountStar,
        (AggFunc::Count, Some(_)) => AccKind::Count,
        (_, None) => {
            return Err(ExecError::Unsupported {
                operator: operator.to_owned(),
                detail: format!("{} needs a column", a.output),
            });
        }
        (_, Some(c)) if !numeric => {
            return Err(ExecError::Unsupported {
                operator: operator.to_owned(),
                detail: format!(
                    "{}: aggregating column '{}' of type {} is not supported",
                    a.output,
                    input.field(c).name(),
                    input.field(c).data_type()
                ),
            });
        }
        (AggFunc::Sum, _) => {
            if float {
                AccKind::SumFloat
            } else {
                AccKind::SumInt
            }
        }
        (AggFunc::Min, _) => {
            if float {
                AccKind::MinFloat
            } else {
                AccKind::MinInt
            }
        }
        (AggFunc::Max, _) => {
            if float {
                AccKind::MaxFloat
            } else {
                AccKind::MaxInt
            }
        }
        (AggFunc::Avg, _) => AccKind::Avg,
    };
    Ok(AccPlan {
        kind,
        column,
        output: a.output.clone(),
    })
}

fn prepare_input(batch: &RecordBatch, plan: &AccPlan) -> Result<AccInput, ExecError> {
    let Some(c) = plan.column else {
        return Ok(AccInput::None);
    };
    let col = batch.column(c);
    Ok(match plan.kind {
        AccKind::SumFloat | AccKind::MinFloat | AccKind::MaxFloat | AccKind::Avg => {
            AccInput::Float(
                cast(col, &DataType::Float64)?
                    .as_primitive::<Float64Type>()
                    .clone(),
            )
        }
        AccKind::Count => {
            // Only validity matters; keep the cheapest view.
            AccInput::Int(Int64Array::new(
                vec![0; col.len()].into(),
                col.logical_nulls(),
            ))
        }
        _ => AccInput::Int(
            cast(col, &DataType::Int64)?
                .as_primitive::<Int64Type>()
                .clone(),
        ),
    })
}

fn init_accs(accs: &[AccPlan], bytes: &mut [u8]) {
    for (i, plan) in accs.iter().enumerate() {
        let slot = &mut bytes[i * ACC_WIDTH..(i + 1) * ACC_WIDTH];
        let init: u64 = match plan.kind {
            AccKind::MinInt => i64::MAX as u64,
            AccKind::MaxInt => i64::MIN as u64,
            AccKind::MinFloat => f64::INFINITY.to_bits(),
            AccKind::MaxFloat => f64::NEG_INFINITY.to_bits(),
            AccKind::SumFloat | AccKind::Avg => 0f64.to_bits(),
            _ => 0,
        };
        write_u64(slot, 0, init);
        write_u64(slot, 8, 0);
    }
}

/// Folds one input column into one accumulator of each row's group;
/// `Err(())` on integer overflow.
fn accumulate(
    table: &mut PagedHashTable,
    plan: &AccPlan,
    input: &AccInput,
    rows: &[u32],
    ids: &[u32],
    offset: usize,
) -> Result<(), ()> {
    match (plan.kind, input) {
        (AccKind::CountStar, _) => {
            for &id in ids {
                bump_count(table.acc_mut(id as usize), offset);
            }
            Ok(())
        }
        (AccKind::Count, AccInput::Int(a)) => {
            for (&row, &id) in rows.iter().zip(ids) {
                if a.is_valid(row as usize) {
                    bump_count(table.acc_mut(id as usize), offset);
                }
            }
            Ok(())
        }
        (AccKind::SumInt, AccInput::Int(a)) => {
            fold_int(table, a, rows, ids, offset, i64::checked_add)
        }
        (AccKind::MinInt, AccInput::Int(a)) => {
            fold_int(table, a, rows, ids, offset, |c, v| Some(c.min(v)))
        }
        (AccKind::MaxInt, AccInput::Int(a)) => {
            fold_int(table, a, rows, ids, offset, |c, v| Some(c.max(v)))
        }
        (AccKind::SumFloat | AccKind::Avg, AccInput::Float(a)) => {
            fold_float(table, a, rows, ids, offset, |c, v| c + v);
            Ok(())
        }
        (AccKind::MinFloat, AccInput::Float(a)) => {
            fold_float(table, a, rows, ids, offset, f64::min);
            Ok(())
        }
        (AccKind::MaxFloat, AccInput::Float(a)) => {
            fold_float(table, a, rows, ids, offset, f64::max);
            Ok(())
        }
        (kind, _) => unreachable!("accumulator {kind:?} prepared with the wrong input"),
    }
}

#[inline]
fn bump_count(acc: &mut [u8], offset: usize) {
    let count = read_u64(acc, offset + 8);
    write_u64(acc, offset + 8, count + 1);
}

#[inline]
fn fold_int(
    table: &mut PagedHashTable,
    a: &Int64Array,
    rows: &[u32],
    ids: &[u32],
    offset: usize,
    f: impl Fn(i64, i64) -> Option<i64>,
) -> Result<(), ()> {
    let values = a.values();
    let nulls = a.nulls();
    for (&row, &id) in rows.iter().zip(ids) {
        let row = row as usize;
        if nulls.is_some_and(|n| n.is_null(row)) {
            continue;
        }
        let acc = table.acc_mut(id as usize);
        let cur = read_u64(acc, offset) as i64;
        let next = f(cur, values[row]).ok_or(())?;
        write_u64(acc, offset, next as u64);
        bump_count(acc, offset);
    }
    Ok(())
}

#[inline]
fn fold_float(
    table: &mut PagedHashTable,
    a: &Float64Array,
    rows: &[u32],
    ids: &[u32],
    offset: usize,
    f: impl Fn(f64, f64) -> f64,
) {
    let values = a.values();
    let nulls = a.nulls();
    for (&row, &id) in rows.iter().zip(ids) {
        let row = row as usize;
        if nulls.is_some_and(|n| n.is_null(row)) {
            continue;
        }
        let acc = table.acc_mut(id as usize);
        let cur = f64::from_bits(read_u64(acc, offset));
        write_u64(acc, offset, f(cur, values[row]).to_bits());
        bump_count(acc, offset);
    }
}

fn build_acc(
    plan: &AccPlan,
    table: &PagedHashTable,
    ids: std::ops::Range<usize>,
    i: usize,
) -> ArrayRef {
    let slot = |id: usize| &table.acc(id)[i * ACC_WIDTH..(i + 1) * ACC_WIDTH];
    match plan.kind {
        AccKind::CountStar | AccKind::Count => Arc::new(Int64Array::from_iter_values(
            ids.map(|id| read_u64(slot(id), 8) as i64),
        )),
        AccKind::SumInt | AccKind::MinInt | AccKind::MaxInt => {
            let mut b = Int64Builder::with_capacity(ids.len());
            for id in ids {
                let s = slot(id);
                if read_u64(s, 8) == 0 {
                    b.append_null();
                } else {
                    b.append_value(read_u64(s, 0) as i64);
                }
            }
            Arc::new(b.finish())
        }
        AccKind::SumFloat | AccKind::MinFloat | AccKind::MaxFloat | AccKind::Avg => {
            let avg = plan.kind == AccKind::Avg;
            let mut b = Float64Builder::with_capacity(ids.len());
            for id in ids {
                let s = slot(id);
                let count = read_u64(s, 8);
                let v = f64::from_bits(read_u64(s, 0));
                match count {
                    0 => b.append_null(),
                    _ if avg => b.append_value(v / count as f64),
                    _ => b.append_value(v),
                }
            }
            Arc::new(b.finish())
        }
    }
}
/// Keyed (or global) aggregation over a bounded input: emits once, at the
/// end of input.
pub struct AggregateOperator {
    grouper: Grouper,
    /// `None` once emitted.
    groups: Option<Groups>,
}

impl AggregateOperator {
    pub fn new(
        name: &str,
        input: &arrow_schema::Schema,
        key_columns: Vec<usize>,
        aggs: &[AggSpec],
        output_schema: SchemaRef,
        memory: MemoryManager,
        spill: Option<SpillContext>,
    ) -> Result<Self, ExecError> {
        let grouper = Grouper::new(name, input, key_columns, aggs, output_schema, memory, spill)?;
        let groups = grouper.new_groups(0)?;
        Ok(Self {
            grouper,
            groups: Some(groups),
        })
    }
}

impl Operator for AggregateOperator {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        let groups = self.groups.as_mut().expect("input after finish");
        self.grouper.update(groups, &batch, None)
    }

    fn watermark(&mut self, _watermark: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        // Results are final only at the end of input; nothing to forward.
        Ok(())
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        match self.groups.take() {
            Some(groups) => self.grouper.emit_all(groups, None, out),
            None => Ok(()),
        }
    }

    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        self.snapshot().map(Some)
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        match state {
            Some(bytes) => self.restore(bytes),
            None => Ok(()),
        }
    }
}

/// Tumbling event-time windows per key. A window fires when the watermark
/// passes its last millisecond; rows for a fired window are late and
/// dropped (and counted).
pub struct WindowOperator {
    grouper: Grouper,
    time_column: usize,
    size_ms: i64,
    windows: BTreeMap<i64, Groups>,
    watermark: i64,
    late_rows: u64,
    rows_by_window: BTreeMap<i64, Vec<u32>>,
}

impl WindowOperator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        input: &arrow_schema::Schema,
        key_columns: Vec<usize>,
        time_column: usize,
        size_ms: i64,
        aggs: &[AggSpec],
        output_schema: SchemaRef,
        memory: MemoryManager,
        spill: Option<SpillContext>,
    ) -> Result<Self, ExecError> {
        assert!(size_ms > 0);
        let grouper = Grouper::new(name, input, key_columns, aggs, output_schema, memory, spill)?;
        Ok(Self {
            grouper,
            time_column,
            size_ms,
            windows: BTreeMap::new(),
            watermark: i64::MIN,
            late_rows: 0,
            rows_by_window: BTreeMap::new(),
        })
    }

    pub fn late_rows(&self) -> u64 {
        self.late_rows
    }

    fn fire_until(&mut self, watermark: i64, out: &mut dyn Output) -> Result<(), ExecError> {
        while let Some((&start, _)) = self.windows.first_key_value() {
            let end = start.saturating_add(self.size_ms);
            if end - 1 > watermark {
                break;
            }
            if let Some((_, groups)) = self.windows.pop_first() {
                self.grouper.emit_all(groups, Some((start, end)), out)?;
            }
        }
        Ok(())
    }
}

impl Operator for WindowOperator {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        let ts = cast(batch.column(self.time_column), &DataType::Int64)?;
        let ts = ts.as_primitive::<Int64Type>();
        for rows in self.rows_by_window.values_mut() {
            rows.clear();
        }
        for row in 0..ts.len() {
            if ts.is_null(row) {
                self.late_rows += 1;
                continue;
            }
            let t = ts.value(row);
            let start = t - t.rem_euclid(self.size_ms);
            if start.saturating_add(self.size_ms) - 1 <= self.watermark {
                self.late_rows += 1;
                continue;
            }
            self.rows_by_window
                .entry(start)
                .or_default()
                .push(row as u32);
        }
        let starts: Vec<i64> = self
            .rows_by_window
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(s, _)| *s)
            .collect();
        for start in starts {
            if !self.windows.contains_key(&start) {
                let groups = self.grouper.new_groups(0)?;
                self.windows.insert(start, groups);
            }
            let rows = std::mem::take(self.rows_by_window.get_mut(&start).expect("window rows"));
            let groups = self.windows.get_mut(&start).expect("window state");
            self.grouper.update(groups, &batch, Some(&rows))?;
            self.rows_by_window.insert(start, rows);
        }
        // Keep the scratch map from growing with every window ever seen.
        self.rows_by_window
            .retain(|s, r| !r.is_empty() || self.windows.contains_key(s));
        Ok(())
    }

    fn watermark(&mut self, watermark: i64, out: &mut dyn Output) -> Result<(), ExecError> {
        self.watermark = self.watermark.max(watermark);
        self.fire_until(self.watermark, out)?;
        out.watermark(watermark)
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.fire_until(i64::MAX, out)
    }

    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        self.snapshot().map(Some)
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        match state {
            Some(bytes) => self.restore(bytes),
            None => Ok(()),
        }
    }
}
