//! Checkpoint snapshots of the sort.
//!
//! A body (inside the framing of [`crate::exec::snapshot`]) is the plan as
//! a blob (column count, column key classes, sort keys), then every record
//! received so far, in chunks: a chunk count `u64`, then per chunk a blob of
//! records, each behind its `u32` length. That is the layout of a spilled
//! block, so the runs' blocks are copied verbatim (read back from the live
//! spill file); the records in memory follow as one chunk.
//!
//! Order: the runs in the order they were cut, each sorted stably, then the
//! records in memory in arrival order. Rows with equal keys are therefore in
//! arrival order, and a restore that feeds the records through the normal
//! path ([`SortOperator::add`], which cuts and spills runs as the budget
//! requires) before any later input produces the stable sort of the whole
//! input: the same output, row for row, as an uninterrupted run.

use super::{LEN_BYTES, SortOperator};
use crate::exec::ExecError;
use crate::exec::hashtable::read_u32;
use crate::exec::keycodec::encoded_key_len;
use crate::exec::snapshot::{SnapshotReader, SnapshotWriter, state_error};

const SORT_MAGIC: &[u8; 8] = b"STSORTOP";

impl SortOperator {
    pub(super) fn snapshot(&mut self) -> Result<Vec<u8>, ExecError> {
        let hint = self.arena.pages.len() * self.page_size();
        let mut w = SnapshotWriter::new(SORT_MAGIC, hint);
        w.blob(&self.plan_bytes());
        let run_block_count: usize = self.runs.iter().map(|run| run.block_count).sum();
        let in_memory = !self.arena.records.is_empty();
        w.u64((run_block_count + usize::from(in_memory)) as u64);
        if let Some(writer) = self.run_writer.as_mut() {
            for run in &self.runs {
                for block in run.first_block..run.first_block + run.block_count {
                    w.blob(writer.read_block(block)?);
                }
            }
        } else {
            assert!(self.runs.is_empty(), "runs live in the run writer's file");
        }
        if in_memory {
            let records = || self.arena.records.iter().map(|&at| self.arena.record(at));
            let chunk_bytes: usize = records().map(|record| LEN_BYTES + record.len()).sum();
            w.u64(chunk_bytes as u64);
            for record in records() {
                w.u32(record.len() as u32);
                w.raw(record);
            }
        }
        Ok(w.finish())
    }

    pub(super) fn restore(&mut self, bytes: &[u8]) -> Result<(), ExecError> {
        assert!(
            self.arena.records.is_empty() && self.runs.is_empty(),
            "state is restored before any input"
        );
        let restored = self.restore_records(bytes);
        if restored.is_err() {
            self.arena.clear();
            self.runs.clear();
            self.run_writer = None;
        }
        restored
    }

    fn restore_records(&mut self, bytes: &[u8]) -> Result<(), ExecError> {
        let mut r = SnapshotReader::open(&self.name, SORT_MAGIC, bytes)?;
        if r.blob()? != self.plan_bytes() {
            return Err(state_error(
                &self.name,
                "the snapshot was taken by a different plan (columns or sort keys differ)",
            ));
        }
        let chunk_count = r.count(8)?;
        let mut row_count = 0u64;
        for _ in 0..chunk_count {
            let mut chunk = r.blob()?;
            while !chunk.is_empty() {
                let record = split_record(&mut chunk)
                    .filter(|record| self.is_record(record))
                    .ok_or_else(|| r.corrupt(format!("row {row_count} does not decode")))?;
                self.add(record)
                    .map_err(|e| self.restore_error(e, row_count, bytes.len()))?;
                row_count += 1;
            }
        }
        r.finish()
    }

    /// Whether `record` is a sort key and a row of this operator's columns.
    fn is_record(&self, record: &[u8]) -> bool {
        if record.len() < 4 {
            return false;
        }
        let key_len = read_u32(record, 0) as usize;
        let Some(payload) = record.get(4 + key_len..) else {
            return false;
        };
        encoded_key_len(payload, &self.classes) == Some(payload.len())
    }

    /// The plan a snapshot must have been taken with.
    fn plan_bytes(&self) -> Vec<u8> {
        let mut plan = Vec::new();
        let mut u64 = |v: usize| plan.extend_from_slice(&(v as u64).to_le_bytes());
        u64(self.classes.len());
        for class in &self.classes {
            u64(class.tag().into());
        }
        u64(self.keys.len());
        for key in &self.keys {
            u64(key.column);
            u64(key.descending.into());
        }
        plan
    }

    /// Names what was being restored when `add` failed.
    fn restore_error(&self, e: ExecError, row_index: u64, snapshot_bytes: usize) -> ExecError {
        match e {
            ExecError::State { detail, .. } => state_error(
                &self.name,
                format!(
                    "restoring row {row_index} of a {snapshot_bytes}-byte snapshot (budget \
                     {} bytes, {} in use): {detail}",
                    self.memory.budget_bytes(),
                    self.memory.used_bytes()
                ),
            ),
            other => other,
        }
    }
}

/// Takes the next length-prefixed record off `chunk`; `None` if truncated.
fn split_record<'a>(chunk: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = read_u32(chunk.get(..LEN_BYTES)?, 0) as usize;
    let record = chunk.get(LEN_BYTES..LEN_BYTES + len)?;
    *chunk = &chunk[LEN_BYTES + len..];
    Some(record)
}
