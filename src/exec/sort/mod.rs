//! The `sort` operator: an external merge sort of each subtask's input.
//!
//! Rows are encoded into records in managed memory pages: a memcomparable
//! key (so records compare with `memcmp`) followed by every column in the
//! aggregation's key encoding (so the row can be rebuilt). When the slot's
//! budget refuses a page, the records in memory are sorted into a run and
//! written to a spill file as checksummed blocks, and the pages are freed. At
//! the end of input, with no run spilled, the records are sorted and emitted
//! from memory; otherwise the last run is spilled too and the runs are merged
//! `fan_in` at a time (more runs take several passes, each writing one new
//! file of longer runs) until one pass merges the rest into the output.
//!
//! # Order
//!
//! Keys compare column by column; `desc` inverts a key's bytes. Nulls sort
//! last ascending and first descending (PostgreSQL's defaults); floats sort
//! by value with -0 = +0 and NaN greatest. The sort is stable: records are
//! sorted stably within a run, runs are cut in arrival order, and a merge
//! takes equal keys from the earlier run first — so the output equals a
//! stable sort of the subtask's input.
//!
//! # Memory
//!
//! Records and the run index live in (or are charged as) managed pages; a
//! spilled block is at most one page, so a merge holds one page per input
//! run and the fan-in shrinks to the pages the budget has left (at least 2).
//! The heap holds only one output batch being built.
//!
//! # Checkpoints
//!
//! A snapshot holds every record received so far, runs copied out of the
//! spill file, in an order that keeps the sort stable across a restore; see
//! [`snapshot`].

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_cast::cast;
use arrow_schema::SchemaRef;

use super::ExecError;
use super::hashtable::read_u32;
use super::keycodec::{KeyClass, KeyColumn, decode_keys, encode_key, key_class, prepare_key};
use super::operators::{Operator, Output};
use super::spill::{RunReader, RunWriter, SpillContext};
use crate::io::block::BLOCK_HEADER_BYTES;
use crate::memory::{MemoryError, MemoryManager, Page};

mod snapshot;

const OUTPUT_BATCH_ROWS: usize = 8192;
/// Bytes of records staged for one output batch at most.
const OUTPUT_BATCH_BYTES_MAX: usize = 4 << 20;
/// Each record is stored behind its length.
const LEN_BYTES: usize = 4;

/// One sort key, resolved against the input schema.
#[derive(Debug, Clone, Copy)]
pub struct SortColumn {
    pub column: usize,
    pub descending: bool,
}

/// A sorted run: consecutive blocks of one spill file.
#[derive(Debug, Clone, Copy)]
struct Run {
    first_block: usize,
    block_count: usize,
}

/// Where a record is, and the first bytes of its key: the sort compares
/// the prefixes (one `u64` compare, no page access) and reads the records
/// only when they are equal (Flink's normalized key). A key shorter than 8
/// bytes is padded with zeros, which keeps the order: a prefix compare that
/// is not `Equal` agrees with `memcmp` of the whole keys.
#[derive(Clone, Copy, Debug)]
struct Slot {
    prefix: u64,
    page: u32,
    offset: u32,
}

impl Slot {
    fn new(key: &[u8], page: u32, offset: u32) -> Self {
        let mut bytes = [0u8; 8];
        let n = key.len().min(8);
        bytes[..n].copy_from_slice(&key[..n]);
        Slot {
            prefix: u64::from_be_bytes(bytes),
            page,
            offset,
        }
    }
}

/// Records in managed pages, with their positions.
struct Arena {
    pages: Vec<Page>,
    /// Bytes used in the last page.
    used: usize,
    /// Each record's slot (its length prefix's page and offset), in
    /// arrival order.
    records: Vec<Slot>,
    /// Pages charged to the budget for `records` (they hold no data).
    index_pages: Vec<Page>,
}

impl Arena {
    fn new() -> Self {
        Self {
            pages: Vec::new(),
            used: 0,
            records: Vec::new(),
            index_pages: Vec::new(),
        }
    }

    fn record(&self, at: Slot) -> &[u8] {
        let page = self.pages[at.page as usize].as_slice();
        let offset = at.offset as usize;
        let len = read_u32(page, offset) as usize;
        &page[offset + LEN_BYTES..offset + LEN_BYTES + len]
    }

    fn clear(&mut self) {
        self.pages.clear();
        self.index_pages.clear();
        self.records.clear();
        self.used = 0;
    }

    /// Sorts the record index by key, stably.
    fn sort(&mut self) {
        let mut records = std::mem::take(&mut self.records);
        records.sort_by(|&a, &b| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| record_key(self.record(a)).cmp(record_key(self.record(b))))
        });
        self.records = records;
    }
}

/// A record's memcomparable key: `key_len: u32 | key | payload`.
#[inline]
fn record_key(record: &[u8]) -> &[u8] {
    let key_len = read_u32(record, 0) as usize;
    &record[4..4 + key_len]
}

#[inline]
fn record_payload(record: &[u8]) -> &[u8] {
    let key_len = read_u32(record, 0) as usize;
    &record[4 + key_len..]
}

pub struct SortOperator {
    name: String,
    schema: SchemaRef,
    keys: Vec<SortColumn>,
    classes: Vec<KeyClass>,
    memory: MemoryManager,
    spill: Option<SpillContext>,
    fan_in: usize,
    arena: Arena,
    runs: Vec<Run>,
    run_writer: Option<RunWriter>,
    scratch: Vec<u8>,
}

impl SortOperator {
    pub fn new(
        name: &str,
        schema: SchemaRef,
        keys: Vec<SortColumn>,
        fan_in: usize,
        memory: MemoryManager,
        spill: Option<SpillContext>,
    ) -> Result<Self, ExecError> {
        assert!(fan_in >= 2, "a merge needs at least two inputs");
        let classes = schema
            .fields()
            .iter()
            .map(|field| {
                key_class(field.data_type()).ok_or_else(|| ExecError::Unsupported {
                    operator: name.to_owned(),
                    detail: format!(
                        "column '{}' of type {} cannot be sorted",
                        field.name(),
                        field.data_type()
                    ),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: name.to_owned(),
            schema,
            keys,
            classes,
            memory,
            spill,
            fan_in,
            arena: Arena::new(),
            runs: Vec::new(),
            run_writer: None,
            scratch: Vec::new(),
        })
    }

    fn page_size(&self) -> usize {
        self.memory.page_size_bytes()
    }

    /// Largest record (with its length) a spilled block, and so one page, holds.
    fn record_bytes_max(&self) -> usize {
        self.page_size() - BLOCK_HEADER_BYTES
    }

    /// Copies `record` into the arena, or refuses with the budget error and
    /// changes nothing a retry would trip over.
    fn push_record(&mut self, record: &[u8]) -> Result<(), MemoryError> {
        let page_size = self.page_size();
        let need = LEN_BYTES + record.len();
        let index_per_page = page_size / std::mem::size_of::<Slot>();
        if self.arena.records.len() == self.arena.index_pages.len() * index_per_page {
            let pages = self.memory.allocate_pages(1)?;
            self.arena.index_pages.extend(pages);
        }
        if self.arena.pages.is_empty() || self.arena.used + need > page_size {
            let pages = self.memory.allocate_pages(1)?;
            self.arena.pages.extend(pages);
            self.arena.used = 0;
        }
        let page_index = self.arena.pages.len() - 1;
        let offset = self.arena.used;
        let page = self.arena.pages[page_index].as_mut_slice();
        page[offset..offset + LEN_BYTES].copy_from_slice(&(record.len() as u32).to_le_bytes());
        page[offset + LEN_BYTES..offset + need].copy_from_slice(record);
        self.arena.used += need;
        self.arena.records.push(Slot::new(
            record_key(record),
            page_index as u32,
            offset as u32,
        ));
        Ok(())
    }

    fn add(&mut self, record: &[u8]) -> Result<(), ExecError> {
        if LEN_BYTES + record.len() > self.record_bytes_max() {
            return Err(ExecError::State {
                operator: self.name.clone(),
                detail: format!(
                    "a row of {} encoded bytes does not fit a managed memory page of {} bytes; \
                     raise taskmanager.memory.page-size",
                    record.len(),
                    self.page_size()
                ),
            });
        }
        let refused = match self.push_record(record) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if self.spill.is_none() || self.arena.records.is_empty() {
            return Err(ExecError::State {
                operator: self.name.clone(),
                detail: refused.to_string(),
            });
        }
        if self.runs.is_empty() {
            tracing::info!(
                operator = %self.name,
                rows = self.arena.records.len(),
                used_bytes = self.memory.used_bytes(),
                budget_bytes = self.memory.budget_bytes(),
                "sort input does not fit managed memory; spilling sorted runs: {refused}"
            );
        }
        self.spill_run()?;
        self.push_record(record).map_err(|e| ExecError::State {
            operator: self.name.clone(),
            detail: e.to_string(),
        })
    }

    /// Sorts the records in memory and writes them as one run.
    fn spill_run(&mut self) -> Result<(), ExecError> {
        if self.arena.records.is_empty() {
            return Ok(());
        }
        self.arena.sort();
        if self.run_writer.is_none() {
            let spill = self.spill.as_ref().expect("runs spill only with a context");
            self.run_writer = Some(spill.writer(&self.name)?);
        }
        let block_bytes_max = self.record_bytes_max();
        let writer = self.run_writer.as_mut().expect("created above");
        let mut blocks = BlockSink::new(writer, block_bytes_max);
        for &at in &self.arena.records {
            blocks.push(self.arena.record(at))?;
        }
        let run = blocks.finish()?;
        self.runs.push(run);
        self.arena.clear();
        Ok(())
    }

    /// Emits the arena's records in sorted order.
    fn emit_in_memory(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.arena.sort();
        for chunk in self.arena.records.chunks(OUTPUT_BATCH_ROWS) {
            let records: Vec<&[u8]> = chunk.iter().map(|&at| self.arena.record(at)).collect();
            out.emit(self.build(&records)?)?;
        }
        self.arena.clear();
        Ok(())
    }

    /// Rebuilds a batch from records.
    fn build(&self, records: &[&[u8]]) -> Result<RecordBatch, ExecError> {
        let payloads = records.iter().map(|r| record_payload(r));
        let columns = decode_keys(payloads, records.len(), &self.classes)
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    cast(&c, f.data_type())
                }
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }

    /// Merges the spilled runs, `fan_in` at a time, into the output.
    fn merge_runs(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        self.spill_run()?;
        let spill = self.spill.clone().expect("runs spill only with a context");
        let writer = self.run_writer.take().expect("runs were spilled");
        let mut file = writer.finish()?;
        let mut runs = std::mem::take(&mut self.runs);
        let fan_in = self.effective_fan_in()?;
        let mut pass = 0;
        while runs.len() > fan_in {
            pass += 1;
            tracing::debug!(operator = %self.name, pass, runs = runs.len(), fan_in, "merge pass");
            let mut reader = spill.reader(&self.name, file)?;
            let mut writer = spill.writer(&self.name)?;
            let mut merged = Vec::with_capacity(runs.len().div_ceil(fan_in));
            for group in runs.chunks(fan_in) {
                let mut blocks = BlockSink::new(&mut writer, self.record_bytes_max());
                self.merge(group, &mut reader, &mut |record| blocks.push(record))?;
                merged.push(blocks.finish()?);
            }
            drop(reader);
            file = writer.finish()?;
            runs = merged;
        }
        let mut reader = spill.reader(&self.name, file)?;
        let mut staged = OutputStage::default();
        self.merge(&runs, &mut reader, &mut |record| {
            staged.push(record);
            if staged.is_full() {
                out.emit(self.build(&staged.records())?)?;
                staged.clear();
            }
            Ok(())
        })?;
        if !staged.offsets.is_empty() {
            out.emit(self.build(&staged.records())?)?;
        }
        Ok(())
    }

    /// Runs merged at once: the configured fan-in, lowered to the pages the
    /// budget can give (one per input run).
    fn effective_fan_in(&self) -> Result<usize, ExecError> {
        let free_bytes = self
            .memory
            .budget_bytes()
            .saturating_sub(self.memory.used_bytes());
        let pages_free = (free_bytes / self.page_size() as u64) as usize;
        if pages_free < 2 {
            return Err(ExecError::State {
                operator: self.name.clone(),
                detail: format!(
                    "merging sorted runs needs at least 2 managed memory pages, {pages_free} \
                     free; raise taskmanager.memory.managed.fraction"
                ),
            });
        }
        Ok(self.fan_in.min(pages_free))
    }

    /// Merges `runs` (in order; equal keys come from the earlier run first)
    /// and hands each record to `sink`.
    fn merge(
        &self,
        runs: &[Run],
        reader: &mut RunReader,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ExecError>,
    ) -> Result<(), ExecError> {
        let pages = self
            .memory
            .allocate_pages(runs.len())
            .map_err(|e| ExecError::State {
                operator: self.name.clone(),
                detail: e.to_string(),
            })?;
        let mut cursors: Vec<Cursor> = runs
            .iter()
            .zip(pages)
            .map(|(run, page)| Cursor {
                page,
                len: 0,
                pos: 0,
                next_block: run.first_block,
                end_block: run.first_block + run.block_count,
            })
            .collect();
        for cursor in &mut cursors {
            cursor.load(reader)?;
        }
        loop {
            let mut best: Option<usize> = None;
            for (index, cursor) in cursors.iter().enumerate() {
                let Some(record) = cursor.current() else {
                    continue;
                };
                let better = match best {
                    None => true,
                    Some(b) => {
                        let current = cursors[b].current().expect("best has a record");
                        record_key(record) < record_key(current)
                    }
                };
                if better {
                    best = Some(index);
                }
            }
            let Some(best) = best else {
                return Ok(());
            };
            let cursor = &mut cursors[best];
            sink(cursor.current().expect("best has a record"))?;
            cursor.advance(reader)?;
        }
    }
}

/// One run being merged: its current block in a managed page.
struct Cursor {
    page: Page,
    len: usize,
    pos: usize,
    next_block: usize,
    end_block: usize,
}

impl Cursor {
    /// Loads the next block, if the run has one.
    fn load(&mut self, reader: &mut RunReader) -> Result<(), ExecError> {
        self.pos = 0;
        self.len = 0;
        if self.next_block >= self.end_block {
            return Ok(());
        }
        let payload = reader.read_block(self.next_block)?;
        self.next_block += 1;
        // Blocks are written at most a page long (record_bytes_max).
        self.page.as_mut_slice()[..payload.len()].copy_from_slice(payload);
        self.len = payload.len();
        Ok(())
    }

    fn current(&self) -> Option<&[u8]> {
        if self.pos >= self.len {
            return None;
        }
        let bytes = &self.page.as_slice()[..self.len];
        let len = read_u32(bytes, self.pos) as usize;
        Some(&bytes[self.pos + LEN_BYTES..self.pos + LEN_BYTES + len])
    }

    fn advance(&mut self, reader: &mut RunReader) -> Result<(), ExecError> {
        let len = read_u32(self.page.as_slice(), self.pos) as usize;
        self.pos += LEN_BYTES + len;
        if self.pos >= self.len {
            self.load(reader)?;
        }
        Ok(())
    }
}

/// Packs records (each behind its length) into blocks of one run.
struct BlockSink<'a> {
    writer: &'a mut RunWriter,
    block: Vec<u8>,
    block_bytes_max: usize,
    first_block: Option<usize>,
    block_count: usize,
}

impl<'a> BlockSink<'a> {
    fn new(writer: &'a mut RunWriter, block_bytes_max: usize) -> Self {
        assert!(block_bytes_max <= writer.payload_bytes_max());
        Self {
            writer,
            block: Vec::with_capacity(block_bytes_max),
            block_bytes_max,
            first_block: None,
            block_count: 0,
        }
    }

    fn push(&mut self, record: &[u8]) -> Result<(), ExecError> {
        let need = LEN_BYTES + record.len();
        assert!(need <= self.block_bytes_max, "records are checked on entry");
        if self.block.len() + need > self.block_bytes_max {
            self.flush()?;
        }
        self.block
            .extend_from_slice(&(record.len() as u32).to_le_bytes());
        self.block.extend_from_slice(record);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ExecError> {
        if self.block.is_empty() {
            return Ok(());
        }
        let index = self.writer.write_block(&self.block)?;
        self.first_block.get_or_insert(index);
        self.block_count += 1;
        self.block.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<Run, ExecError> {
        self.flush()?;
        Ok(Run {
            first_block: self.first_block.unwrap_or(0),
            block_count: self.block_count,
        })
    }
}

/// Records copied out of the merge for one output batch.
#[derive(Default)]
struct OutputStage {
    bytes: Vec<u8>,
    offsets: Vec<(usize, usize)>,
}

impl OutputStage {
    fn push(&mut self, record: &[u8]) {
        self.offsets.push((self.bytes.len(), record.len()));
        self.bytes.extend_from_slice(record);
    }

    fn is_full(&self) -> bool {
        self.offsets.len() >= OUTPUT_BATCH_ROWS || self.bytes.len() >= OUTPUT_BATCH_BYTES_MAX
    }

    fn records(&self) -> Vec<&[u8]> {
        self.offsets
            .iter()
            .map(|&(at, len)| &self.bytes[at..at + len])
            .collect()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.offsets.clear();
    }
}

/// Appends `col[row]` as [`encode_key`] does, but with floats as they are:
/// a key encoding merges -0 with +0 and every NaN, a row must not change.
fn encode_value(col: &KeyColumn, row: usize, out: &mut Vec<u8>) {
    match col {
        KeyColumn::Float(a) if arrow_array::Array::is_valid(a, row) => {
            out.push(1);
            out.extend_from_slice(&a.value(row).to_bits().to_le_bytes());
        }
        _ => encode_key(col, row, out),
    }
}

/// Appends the memcomparable encoding of `col[row]` to `out`.
fn encode_sort_key(col: &KeyColumn, row: usize, descending: bool, out: &mut Vec<u8>) {
    let start = out.len();
    let valid = match col {
        KeyColumn::Int(a) => arrow_array::Array::is_valid(a, row),
        KeyColumn::Float(a) => arrow_array::Array::is_valid(a, row),
        KeyColumn::Bool(a) => arrow_array::Array::is_valid(a, row),
        KeyColumn::Str(a) => arrow_array::Array::is_valid(a, row),
    };
    if !valid {
        // After every valid value: nulls last ascending, first descending.
        out.push(2);
    } else {
        out.push(1);
        match col {
            KeyColumn::Int(a) => {
                out.extend_from_slice(&((a.value(row) as u64) ^ (1 << 63)).to_be_bytes());
            }
            KeyColumn::Float(a) => {
                out.extend_from_slice(&float_order_bits(a.value(row)).to_be_bytes())
            }
            KeyColumn::Bool(a) => out.push(u8::from(a.value(row))),
            KeyColumn::Str(a) => {
                // 0x00 is escaped as 0x00 0xFF and the end is 0x00 0x00, so no
                // encoding is a prefix of another and bytes order strings.
                for &b in a.value(row).as_bytes() {
                    out.push(b);
                    if b == 0 {
                        out.push(0xFF);
                    }
                }
                out.extend_from_slice(&[0, 0]);
            }
        }
    }
    if descending {
        for b in &mut out[start..] {
            *b = !*b;
        }
    }
}

/// Bits of `v` whose unsigned order is the float order (-0 = +0, NaN last).
fn float_order_bits(v: f64) -> u64 {
    let v = if v == 0.0 {
        0.0
    } else if v.is_nan() {
        f64::NAN
    } else {
        v
    };
    let bits = v.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits ^ (1 << 63)
    }
}

impl Operator for SortOperator {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        let columns = batch
            .columns()
            .iter()
            .zip(&self.classes)
            .map(|(a, c)| prepare_key(a, *c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut scratch = std::mem::take(&mut self.scratch);
        for row in 0..batch.num_rows() {
            scratch.clear();
            scratch.extend_from_slice(&[0; 4]);
            for key in &self.keys {
                encode_sort_key(&columns[key.column], row, key.descending, &mut scratch);
            }
            let key_len = (scratch.len() - 4) as u32;
            scratch[..4].copy_from_slice(&key_len.to_le_bytes());
            for column in &columns {
                encode_value(column, row, &mut scratch);
            }
            let record = std::mem::take(&mut scratch);
            let result = self.add(&record);
            scratch = record;
            result?;
        }
        self.scratch = scratch;
        Ok(())
    }

    fn watermark(&mut self, _watermark: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        // The output is complete only at the end of input; nothing to forward.
        Ok(())
    }

    fn finish(&mut self, out: &mut dyn Output) -> Result<(), ExecError> {
        if self.runs.is_empty() {
            self.emit_in_memory(out)
        } else {
            self.merge_runs(out)
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

#[cfg(test)]
mod tests {
    use super::Slot;

    /// The prefix compare, then the whole key on a tie, orders keys as
    /// `memcmp` does: keys shorter than, as long as and longer than the
    /// prefix, keys that are prefixes of others, and zero bytes (which the
    /// padding also uses).
    #[test]
    fn the_normalized_prefix_orders_keys_as_memcmp_does() {
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1],
            vec![1, 0],
            vec![1, 0, 0, 0, 0, 0, 0, 0],
            vec![1, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![1, 0, 0, 0, 0, 0, 0, 0, 1],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 0xff],
            vec![1, 2, 3, 4, 5, 6, 7, 9],
            vec![0xff; 12],
            vec![0xff; 7],
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 13) as usize;
            // Few distinct byte values, so that prefixes often tie.
            keys.push((0..len).map(|i| ((state >> (i * 4)) & 3) as u8).collect());
        }
        let mut by_slot: Vec<(Slot, &[u8])> = keys
            .iter()
            .map(|k| (Slot::new(k, 0, 0), k.as_slice()))
            .collect();
        by_slot.sort_by(|a, b| a.0.prefix.cmp(&b.0.prefix).then_with(|| a.1.cmp(b.1)));
        let mut by_memcmp: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        by_memcmp.sort();
        let sorted: Vec<&[u8]> = by_slot.iter().map(|(_, k)| *k).collect();
        assert_eq!(sorted, by_memcmp);
    }
}
