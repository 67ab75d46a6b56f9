//! The aggregation's spill path: rows of keys that do not fit the table go
//! to hash partitions in one spill file per [`Groups`]; each partition is
//! re-aggregated on its own when the groups are emitted (see the module
//! documentation of [`super`]).

use arrow_array::{RecordBatch, UInt32Array};
use arrow_select::concat::concat_batches;
use arrow_select::take::take_record_batch;

use super::{Grouper, Groups, PARTITION_BITS, PARTITION_COUNT, SPILL_LEVEL_MAX, STAGED_BYTES_MAX};
use crate::exec::ExecError;
use crate::exec::operators::Output;
use crate::exec::snapshot::SnapshotWriter;
use crate::exec::spill::{RunReader, RunWriter};
use crate::network::ipc::{ChannelDecoder, ChannelEncoder, IpcError};

/// Rows spilled by one [`Groups`]: one spill file, its blocks tagged by
/// partition.
pub(super) struct SpilledRows {
    writer: RunWriter,
    partitions: Vec<PartitionRun>,
    rows: u64,
}

/// Largest IPC message that carries staged rows in a snapshot: any size
/// works (the encoder cuts batches by rows), this one keeps the encoder's
/// scratch buffer small.
const SNAPSHOT_MESSAGE_BYTES_MAX: usize = 1 << 20;

#[derive(Default)]
struct PartitionRun {
    encoder: Option<ChannelEncoder>,
    staged: Vec<RecordBatch>,
    staged_bytes: usize,
    /// Block indexes in the spill file, in write order.
    blocks: Vec<usize>,
}

impl SpilledRows {
    /// Writes the spilled rows into a checkpoint snapshot: the row count,
    /// then Arrow IPC streams — per partition, the blocks on disk (read back
    /// verbatim: each partition's blocks are one stream) and then the rows
    /// still staged (encoded as a second stream), so that every key's rows
    /// stay in input order. The spill file and the staging are left as they
    /// are; the operator goes on spilling into them.
    pub(super) fn write_snapshot(
        &mut self,
        operator: &str,
        w: &mut SnapshotWriter,
    ) -> Result<(), ExecError> {
        let stream_count: usize = self
            .partitions
            .iter()
            .map(|p| usize::from(!p.blocks.is_empty()) + usize::from(!p.staged.is_empty()))
            .sum();
        w.u64(self.rows);
        w.u64(stream_count as u64);
        for partition in &self.partitions {
            if !partition.blocks.is_empty() {
                w.u64(partition.blocks.len() as u64);
                for &block in &partition.blocks {
                    w.blob(self.writer.read_block(block)?);
                }
            }
            if !partition.staged.is_empty() {
                let messages = encode_staged(operator, &partition.staged)?;
                w.u64(messages.len() as u64);
                for message in &messages {
                    w.blob(message);
                }
            }
        }
        Ok(())
    }
}

/// Staged rows as the messages of one Arrow IPC stream.
fn encode_staged(operator: &str, staged: &[RecordBatch]) -> Result<Vec<Vec<u8>>, ExecError> {
    let mut encoder = ChannelEncoder::new(SNAPSHOT_MESSAGE_BYTES_MAX);
    let mut messages = Vec::new();
    for batch in staged {
        encoder
            .encode(batch, &mut |message| {
                messages.push(message.to_vec());
                Ok(())
            })
            .map_err(|e| ExecError::State {
                operator: operator.to_owned(),
                detail: format!("snapshotting staged spilled rows: {e}"),
            })?;
    }
    Ok(messages)
}

/// The partition of a row at `level`: the next [`PARTITION_BITS`] bits from
/// the top of its probe hash (the table's index uses the low bits).
#[inline]
pub(super) fn partition_of(probe: u64, level: u32) -> usize {
    (probe.rotate_left(PARTITION_BITS * (level + 1)) as usize) & (PARTITION_COUNT - 1)
}

impl Grouper {
    /// Stages the rows collected in `spill_rows` into their partitions,
    /// writing a partition's block once enough is staged.
    pub(super) fn spill_partitions(
        &mut self,
        groups: &mut Groups,
        batch: &RecordBatch,
    ) -> Result<(), ExecError> {
        if groups.spilled.is_none() {
            let spill = self
                .spill
                .as_ref()
                .expect("rows spill only with a spill context");
            groups.spilled = Some(SpilledRows {
                writer: spill.writer(&self.operator)?,
                partitions: (0..PARTITION_COUNT)
                    .map(|_| PartitionRun::default())
                    .collect(),
                rows: 0,
            });
        }
        let spilled = groups.spilled.as_mut().expect("created above");
        for (index, rows) in self.spill_rows.iter_mut().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let indices = UInt32Array::from(rows.clone());
            rows.clear();
            let taken = take_record_batch(batch, &indices)?;
            spilled.rows += taken.num_rows() as u64;
            let partition = &mut spilled.partitions[index];
            partition.staged_bytes += taken.get_array_memory_size();
            partition.staged.push(taken);
            if partition.staged_bytes >= STAGED_BYTES_MAX {
                flush_partition(&self.operator, &mut spilled.writer, partition)?;
            }
        }
        Ok(())
    }

    /// Emits `groups` (its table, then every spilled partition, re-aggregated
    /// one at a time), freeing its memory as it goes.
    pub(super) fn emit_all(
        &mut self,
        mut groups: Groups,
        window: Option<(i64, i64)>,
        out: &mut dyn Output,
    ) -> Result<(), ExecError> {
        self.emit(&groups, window, out)?;
        let in_memory = groups.len();
        drop(groups.table.take());
        let Some(spilled) = groups.spilled.take() else {
            return Ok(());
        };
        self.drain(spilled, groups.level, in_memory, window, out)
    }

    /// Re-aggregates each partition of `spilled` (written at `level`) and
    /// emits it; a partition that does not fit spills again one level down.
    fn drain(
        &mut self,
        mut spilled: SpilledRows,
        level: u32,
        groups_in_memory: usize,
        window: Option<(i64, i64)>,
        out: &mut dyn Output,
    ) -> Result<(), ExecError> {
        if level + 1 >= SPILL_LEVEL_MAX {
            return Err(self.no_progress(level, groups_in_memory));
        }
        for partition in &mut spilled.partitions {
            flush_partition(&self.operator, &mut spilled.writer, partition)?;
        }
        let spill = self
            .spill
            .clone()
            .expect("rows spill only with a spill context");
        let file = spilled.writer.finish()?;
        let mut reader = spill.reader(&self.operator, file)?;
        tracing::debug!(
            operator = %self.operator,
            level,
            rows = spilled.rows,
            blocks = reader.block_count(),
            "re-aggregating spilled partitions"
        );
        for partition in &spilled.partitions {
            if partition.blocks.is_empty() {
                continue;
            }
            self.reserve.clear();
            let mut groups = self.new_groups(level + 1)?;
            self.fold_partition(&mut groups, &mut reader, &partition.blocks)?;
            // Each level must take at least one key off the disk, or the
            // recursion would only copy rows from file to file.
            if groups.len() == 0 && groups.spilled.is_some() {
                return Err(self.no_progress(level + 1, 0));
            }
            self.emit_all(groups, window, out)?;
            self.refill_reserve();
        }
        Ok(())
    }

    fn no_progress(&self, level: u32, groups_in_memory: usize) -> ExecError {
        ExecError::State {
            operator: self.operator.clone(),
            detail: format!(
                "cannot make progress re-aggregating spilled state at level {level}: the \
                 managed memory budget of {} bytes holds {groups_in_memory} groups; raise \
                 taskmanager.memory.managed.fraction",
                self.memory.budget_bytes()
            ),
        }
    }

    fn fold_partition(
        &mut self,
        groups: &mut Groups,
        reader: &mut RunReader,
        blocks: &[usize],
    ) -> Result<(), ExecError> {
        let mut decoder = ChannelDecoder::default();
        for &block in blocks {
            let payload = reader.read_block(block)?;
            let batch = decoder.decode(payload).map_err(|e| self.ipc_error(e))?;
            self.update(groups, &batch, None)?;
        }
        Ok(())
    }

    fn ipc_error(&self, e: IpcError) -> ExecError {
        ExecError::State {
            operator: self.operator.clone(),
            detail: format!("spilled rows: {e}"),
        }
    }
}

/// Encodes a partition's staged rows into blocks of the spill file.
fn flush_partition(
    operator: &str,
    writer: &mut RunWriter,
    partition: &mut PartitionRun,
) -> Result<(), ExecError> {
    if partition.staged.is_empty() {
        return Ok(());
    }
    let schema = partition.staged[0].schema();
    let batch = concat_batches(&schema, &partition.staged)?;
    partition.staged.clear();
    partition.staged_bytes = 0;
    let encoder = partition
        .encoder
        .get_or_insert_with(|| ChannelEncoder::new(writer.payload_bytes_max()));
    let mut payloads = Vec::new();
    encoder
        .encode(&batch, &mut |payload| {
            payloads.push(payload.to_vec());
            Ok(())
        })
        .map_err(|e| ExecError::State {
            operator: operator.to_owned(),
            detail: format!("spilling rows: {e}"),
        })?;
    for payload in payloads {
        partition.blocks.push(writer.write_block(&payload)?);
    }
    Ok(())
}
