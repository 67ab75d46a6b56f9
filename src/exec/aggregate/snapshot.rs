//! Checkpoint snapshots of aggregations and windows.
//!
//! A body (inside the framing of [`crate::exec::snapshot`]) is:
//!
//! - the plan, as a blob: input column count, key columns with their key
//!   classes, accumulator kinds with their columns (and, for windows, the
//!   time column and the window size). A restore compares it byte for byte,
//!   so a snapshot is never folded into a different aggregation.
//! - aggregate: `finished: bool`, then its groups unless finished.
//! - window: watermark `i64`, late rows `u64`, open window count `u64`, then
//!   per open window (ascending) its start `i64` and its groups.
//! - groups: spill level `u32`, full `bool`, has table `bool`, the table's
//!   managed bytes `u64` (for error messages only), entry count `u64`, then
//!   per entry in id order: hash `u64`, key length `u32`, encoded key,
//!   accumulators (16 raw bytes each); then the spilled rows (see
//!   [`super::spill::SpilledRows::write_snapshot`]).
//!
//! Restore rebuilds each table entry by entry in id order, so the entries
//! get the same ids, the keys the same arena layout and the table the same
//! pages as the snapshotted one ([`PagedHashTable::with_capacity`]), and it
//! copies accumulator bits, so float sums go on bit for bit. Spilled rows are
//! fed back through [`Grouper::update`]: with the table full they spill to
//! the same partitions in the same order, so every key still sees its rows
//! in input order. Hashes are stored, not recomputed, so a change of the key
//! hash needs a new [`crate::exec::snapshot::VERSION`].
//!
//! Limits: table entries hold partial results, which the spill path (raw
//! input rows) cannot carry; a restore whose budget cannot hold the
//! snapshotted tables fails with an [`ExecError::State`] naming the sizes.
//! Restoring with the budget the checkpoint was taken with always fits.

use std::collections::BTreeMap;

use arrow_array::RecordBatch;

use super::{ACC_WIDTH, AggregateOperator, Grouper, Groups, SPILL_LEVEL_MAX, WindowOperator};
use crate::exec::ExecError;
use crate::exec::hashtable::{PagedHashTable, TableError};
use crate::exec::keycodec::encoded_key_len;
use crate::exec::snapshot::{SnapshotReader, SnapshotWriter, state_error};
use crate::memory::MemoryError;
use crate::network::ipc::ChannelDecoder;

const AGGREGATE_MAGIC: &[u8; 8] = b"STAGGREG";
const WINDOW_MAGIC: &[u8; 8] = b"STWINDOW";
/// Hash, key length and accumulators: the least an entry takes.
const ENTRY_BYTES_MIN: usize = 8 + 4;

impl AggregateOperator {
    pub(super) fn snapshot(&mut self) -> Result<Vec<u8>, ExecError> {
        let hint = self.groups.as_ref().map_or(0, groups_bytes_hint);
        let mut w = SnapshotWriter::new(AGGREGATE_MAGIC, hint);
        w.blob(&self.grouper.plan_bytes());
        w.bool(self.groups.is_none());
        if let Some(groups) = self.groups.as_mut() {
            self.grouper.write_groups(groups, &mut w)?;
        }
        Ok(w.finish())
    }

    /// Replaces the fresh operator's empty groups with the snapshot's.
    pub(super) fn restore(&mut self, bytes: &[u8]) -> Result<(), ExecError> {
        let fresh = self
            .groups
            .as_ref()
            .is_some_and(|g| g.len() == 0 && g.spilled.is_none());
        assert!(fresh, "state is restored before any input");
        let mut r = SnapshotReader::open(&self.grouper.operator, AGGREGATE_MAGIC, bytes)?;
        self.grouper.check_plan(&mut r)?;
        // Free the fresh table and the reserve first: the snapshotted state
        // was built with them in the budget, and the reserve comes back
        // afterwards as far as the budget allows, as it does after a drain.
        self.groups = None;
        self.grouper.reserve.clear();
        let restored = restore_aggregate(&mut self.grouper, r);
        self.grouper.refill_reserve();
        match restored {
            Ok(groups) => {
                self.groups = groups;
                Ok(())
            }
            Err(e) => {
                self.groups = Some(self.grouper.new_groups(0)?);
                Err(e)
            }
        }
    }
}

fn restore_aggregate(
    grouper: &mut Grouper,
    mut r: SnapshotReader<'_>,
) -> Result<Option<Groups>, ExecError> {
    let groups = match r.bool()? {
        true => None,
        false => Some(grouper.restore_groups(&mut r)?),
    };
    r.finish()?;
    Ok(groups)
}

impl WindowOperator {
    pub(super) fn snapshot(&mut self) -> Result<Vec<u8>, ExecError> {
        let hint = self.windows.values().map(groups_bytes_hint).sum();
        let mut w = SnapshotWriter::new(WINDOW_MAGIC, hint);
        w.blob(&self.plan_bytes());
        w.i64(self.watermark);
        w.u64(self.late_rows);
        w.u64(self.windows.len() as u64);
        for (&start, groups) in &mut self.windows {
            w.i64(start);
            self.grouper.write_groups(groups, &mut w)?;
        }
        Ok(w.finish())
    }

    pub(super) fn restore(&mut self, bytes: &[u8]) -> Result<(), ExecError> {
        assert!(
            self.windows.is_empty() && self.late_rows == 0,
            "state is restored before any input"
        );
        let mut r = SnapshotReader::open(&self.grouper.operator, WINDOW_MAGIC, bytes)?;
        if r.blob()? != self.plan_bytes() {
            return Err(plan_mismatch(&self.grouper.operator));
        }
        let watermark = r.i64()?;
        let late_rows = r.u64()?;
        self.grouper.reserve.clear();
        let restored = self.restore_windows(r, watermark);
        self.grouper.refill_reserve();
        self.windows = restored?;
        self.watermark = watermark;
        self.late_rows = late_rows;
        Ok(())
    }

    fn restore_windows(
        &mut self,
        mut r: SnapshotReader<'_>,
        watermark: i64,
    ) -> Result<BTreeMap<i64, Groups>, ExecError> {
        let window_count = r.count(8)?;
        let mut windows = BTreeMap::new();
        for _ in 0..window_count {
            let start = r.i64()?;
            let aligned = start.rem_euclid(self.size_ms) == 0;
            let open = start.saturating_add(self.size_ms) - 1 > watermark;
            let ascending = windows
                .last_key_value()
                .is_none_or(|(&last, _)| last < start);
            if !(aligned && open && ascending) {
                return Err(r.corrupt(format!(
                    "window start {start} is not an open window of {} ms after watermark \
                     {watermark}, in ascending order",
                    self.size_ms
                )));
            }
            let groups = self.grouper.restore_groups(&mut r)?;
            windows.insert(start, groups);
        }
        r.finish()?;
        Ok(windows)
    }

    fn plan_bytes(&self) -> Vec<u8> {
        let mut plan = self.grouper.plan_bytes();
        plan.extend_from_slice(&(self.time_column as u64).to_le_bytes());
        plan.extend_from_slice(&self.size_ms.to_le_bytes());
        plan
    }
}

/// What a snapshot of `groups` takes at least: its table.
fn groups_bytes_hint(groups: &Groups) -> usize {
    groups
        .table
        .as_ref()
        .map_or(0, PagedHashTable::memory_bytes)
}

fn plan_mismatch(operator: &str) -> ExecError {
    state_error(
        operator,
        "the snapshot was taken by a different plan (input columns, keys, aggregates or \
         window differ)",
    )
}

impl Grouper {
    /// The plan a snapshot must have been taken with.
    fn plan_bytes(&self) -> Vec<u8> {
        let mut plan = Vec::new();
        let mut u64 = |v: usize| plan.extend_from_slice(&(v as u64).to_le_bytes());
        u64(self.input_schema.fields().len());
        u64(self.key_columns.len());
        for (&column, class) in self.key_columns.iter().zip(&self.key_classes) {
            u64(column);
            u64(class.tag().into());
        }
        u64(self.accs.len());
        for acc in &self.accs {
            u64(acc.kind as usize);
            u64(acc.column.map_or(usize::MAX, |c| c));
        }
        plan
    }

    fn check_plan(&self, r: &mut SnapshotReader<'_>) -> Result<(), ExecError> {
        if r.blob()? != self.plan_bytes() {
            return Err(plan_mismatch(&self.operator));
        }
        Ok(())
    }

    fn acc_width(&self) -> usize {
        ACC_WIDTH * self.accs.len()
    }

    /// Writes `groups` (table entries, then spilled rows) without changing
    /// anything the operator outputs later.
    fn write_groups(&self, groups: &mut Groups, w: &mut SnapshotWriter) -> Result<(), ExecError> {
        w.u32(groups.level);
        w.bool(groups.full);
        w.bool(groups.table.is_some());
        let table_bytes = groups
            .table
            .as_ref()
            .map_or(0, PagedHashTable::memory_bytes);
        w.u64(table_bytes as u64);
        w.u64(groups.len() as u64);
        if let Some(table) = &groups.table {
            for id in 0..table.len() {
                let key = table.key(id);
                w.u64(table.hash(id));
                w.u32(key.len() as u32);
                w.raw(key);
                w.raw(table.acc(id));
            }
        }
        match groups.spilled.as_mut() {
            Some(spilled) => spilled.write_snapshot(&self.operator, w),
            None => {
                w.u64(0);
                w.u64(0);
                Ok(())
            }
        }
    }

    /// Rebuilds one [`Groups`] from a snapshot.
    fn restore_groups(&mut self, r: &mut SnapshotReader<'_>) -> Result<Groups, ExecError> {
        let level = r.u32()?;
        if level >= SPILL_LEVEL_MAX {
            return Err(r.corrupt(format!("spill level {level}")));
        }
        let full = r.bool()?;
        let has_table = r.bool()?;
        let table_bytes = r.u64()?;
        let entry_count = r.count(ENTRY_BYTES_MIN + self.acc_width())?;
        if !has_table && entry_count > 0 {
            return Err(r.corrupt(format!("{entry_count} groups without a table")));
        }
        // Without a spill context a table that cannot be had is an error, as
        // it is for a fresh operator, and nothing may be marked full.
        let mut table = match has_table || self.spill.is_none() {
            true => self.table_for_restore(entry_count, table_bytes)?,
            false => None,
        };
        if let Some(table) = table.as_mut() {
            self.restore_entries(table, entry_count, table_bytes, r)?;
        }
        let mut groups = Groups {
            full: self.spill.is_some() && (full || table.is_none()),
            table,
            spilled: None,
            level,
        };
        self.restore_spilled_rows(&mut groups, r)?;
        Ok(groups)
    }

    /// A table sized for `entry_count` entries, or `None` when not even an
    /// empty one fits and the groups can spill (as [`Grouper::new_groups`]).
    fn table_for_restore(
        &self,
        entry_count: usize,
        table_bytes: u64,
    ) -> Result<Option<PagedHashTable>, ExecError> {
        match PagedHashTable::with_capacity(self.memory.clone(), self.acc_width(), entry_count) {
            Ok(table) => Ok(Some(table)),
            Err(TableError::Memory(e)) if entry_count == 0 && self.spill.is_some() => {
                self.log_spill_start(0, &e.to_string());
                Ok(None)
            }
            Err(TableError::Memory(e)) => {
                Err(self.restore_budget_error(entry_count, table_bytes, &e))
            }
            Err(e) => Err(self.table_error(e)),
        }
    }

    fn restore_entries(
        &self,
        table: &mut PagedHashTable,
        entry_count: usize,
        table_bytes: u64,
        r: &mut SnapshotReader<'_>,
    ) -> Result<(), ExecError> {
        let acc_width = self.acc_width();
        for expected_id in 0..entry_count {
            let hash = r.u64()?;
            let key_len = r.u32()? as usize;
            let key = r.take(key_len)?;
            let acc = r.take(acc_width)?;
            if encoded_key_len(key, &self.key_classes) != Some(key.len()) {
                return Err(r.corrupt(format!("the key of group {expected_id} does not decode")));
            }
            match table.find_or_insert(hash, key, |target| target.copy_from_slice(acc)) {
                Ok(id) if id == expected_id => {}
                Ok(id) => {
                    return Err(
                        r.corrupt(format!("group {expected_id} repeats the key of group {id}"))
                    );
                }
                Err(TableError::Memory(e)) => {
                    return Err(self.restore_budget_error(entry_count, table_bytes, &e));
                }
                Err(e) => return Err(self.table_error(e)),
            }
        }
        Ok(())
    }

    /// Feeds the snapshot's spilled rows through the normal update path.
    fn restore_spilled_rows(
        &mut self,
        groups: &mut Groups,
        r: &mut SnapshotReader<'_>,
    ) -> Result<(), ExecError> {
        let row_count = r.u64()?;
        let stream_count = r.count(8)?;
        let mut rows_restored = 0u64;
        for _ in 0..stream_count {
            let message_count = r.count(8)?;
            let mut decoder = ChannelDecoder::default();
            for _ in 0..message_count {
                let message = r.blob()?;
                let batch = decoder
                    .decode(message)
                    .map_err(|e| r.corrupt(format!("spilled rows: {e}")))?;
                self.check_restored_rows(&batch, r)?;
                rows_restored += batch.num_rows() as u64;
                self.update(groups, &batch, None)?;
            }
        }
        if rows_restored != row_count {
            return Err(r.corrupt(format!(
                "{rows_restored} spilled rows where the snapshot counted {row_count}"
            )));
        }
        Ok(())
    }

    fn check_restored_rows(
        &self,
        batch: &RecordBatch,
        r: &SnapshotReader<'_>,
    ) -> Result<(), ExecError> {
        let fields = self.input_schema.fields();
        let same = batch.num_columns() == fields.len()
            && batch
                .columns()
                .iter()
                .zip(fields)
                .all(|(column, field)| column.data_type() == field.data_type());
        if !same {
            return Err(r.corrupt(format!(
                "spilled rows of schema {:?}, the input is {:?}",
                batch.schema().fields(),
                fields
            )));
        }
        Ok(())
    }

    fn restore_budget_error(
        &self,
        entry_count: usize,
        table_bytes: u64,
        e: &MemoryError,
    ) -> ExecError {
        state_error(
            &self.operator,
            format!(
                "{entry_count} groups, whose table held {table_bytes} bytes of managed memory \
                 when the checkpoint was taken, do not fit the budget of {} bytes ({} bytes in \
                 use): {e}; groups with partial results cannot spill, so restore with at least \
                 the budget the checkpoint was taken with (raise \
                 taskmanager.memory.managed.fraction)",
                self.memory.budget_bytes(),
                self.memory.used_bytes()
            ),
        )
    }
}
