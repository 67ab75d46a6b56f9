//! Record batches ↔ Arrow IPC stream messages, cut to fit network segments.
//!
//! Each channel is one Arrow IPC stream: its first buffer starts with the
//! schema message, every buffer then holds exactly one record-batch message,
//! so a receiver decodes buffer by buffer and never reassembles across
//! buffers (which would need memory outside the credit budget). A batch whose
//! encoding does not fit a segment is sliced by rows until every piece fits.

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::{
    DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions, write_message,
};
use arrow_schema::ArrowError;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error(
        "one row of {row_bytes} bytes does not fit a network segment of {segment_bytes} bytes; raise taskmanager.memory.segment-size"
    )]
    RowTooLarge {
        row_bytes: usize,
        segment_bytes: usize,
    },
    #[error("arrow IPC: {0}")]
    Arrow(#[from] ArrowError),
    #[error("IPC buffer held no record batch")]
    NoBatch,
}

/// Encodes one channel's stream.
pub struct ChannelEncoder {
    generator: IpcDataGenerator,
    tracker: DictionaryTracker,
    options: IpcWriteOptions,
    context: IpcWriteContext,
    schema_sent: bool,
    /// The segment's room for payload.
    segment_payload_max: usize,
    /// What buffers are cut to now: the segment's room, or less when buffer
    /// debloating asked for smaller buffers.
    payload_max: usize,
    /// Reused for every piece: at most one segment's payload plus what a
    /// piece that did not fit overshot by.
    scratch: Vec<u8>,
}

impl ChannelEncoder {
    pub fn new(payload_max: usize) -> Self {
        Self {
            generator: IpcDataGenerator::default(),
            tracker: DictionaryTracker::new(false),
            options: IpcWriteOptions::default(),
            context: IpcWriteContext::default(),
            schema_sent: false,
            segment_payload_max: payload_max,
            payload_max,
            scratch: Vec::with_capacity(payload_max),
        }
    }

    /// Cuts later buffers to at most `bytes` of payload (never more than a
    /// segment holds); `None` restores whole segments.
    pub fn set_buffer_size(&mut self, bytes: Option<usize>) {
        self.payload_max = bytes.map_or(self.segment_payload_max, |b| {
            b.clamp(1, self.segment_payload_max)
        });
    }

    /// Compresses the body buffers of every later batch with LZ4 (frame
    /// format), as Arrow IPC allows; receivers decompress transparently.
    pub fn enable_lz4(&mut self) -> Result<(), IpcError> {
        self.options = self
            .options
            .clone()
            .try_with_compression(Some(arrow_ipc::CompressionType::LZ4_FRAME))?;
        Ok(())
    }

    /// Encodes `batch` into one or more payloads, each at most `payload_max`
    /// bytes, handing each to `sink` in order.
    pub fn encode(
        &mut self,
        batch: &RecordBatch,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), IpcError>,
    ) -> Result<(), IpcError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.encode_pieces(batch, sink, &mut scratch);
        self.scratch = scratch;
        result
    }

    fn encode_pieces(
        &mut self,
        batch: &RecordBatch,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), IpcError>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), IpcError> {
        let mut pending = Vec::new();
        push_pieces(&mut pending, 0, batch.num_rows(), self.first_cut(batch));
        while let Some((offset, rows)) = pending.pop() {
            scratch.clear();
            if !self.schema_sent {
                let schema = self.generator.schema_to_bytes_with_dictionary_tracker(
                    batch.schema_ref(),
                    &mut self.tracker,
                    &self.options,
                );
                write_message(&mut *scratch, schema, &self.options)?;
            }
            let piece = batch.slice(offset, rows);
            let (dicts, encoded) = self.generator.encode(
                &piece,
                &mut self.tracker,
                &self.options,
                &mut self.context,
            )?;
            for dict in dicts {
                write_message(&mut *scratch, dict, &self.options)?;
            }
            write_message(&mut *scratch, encoded, &self.options)?;
            if scratch.len() <= self.payload_max {
                sink(scratch)?;
                self.schema_sent = true;
                continue;
            }
            if rows <= 1 {
                return Err(IpcError::RowTooLarge {
                    row_bytes: scratch.len(),
                    segment_bytes: self.payload_max,
                });
            }
            // Cut the rest into pieces sized from this encoding, 10% under
            // the limit, all at once: re-encoding the remainder after every
            // piece would cost quadratic time on large batches. Pushed in
            // reverse so they pop in order; a piece that still does not fit
            // is cut again.
            let piece_rows = ((rows as u128 * self.payload_max as u128 * 9 / 10)
                / scratch.len() as u128)
                .clamp(1, rows as u128 - 1) as usize;
            push_pieces(&mut pending, offset, rows, piece_rows);
        }
        Ok(())
    }
}

impl ChannelEncoder {
    /// Rows per piece for a first cut, estimated from the batch's buffer
    /// bytes (10% headroom for IPC metadata and padding), so a large batch
    /// is not encoded whole just to learn that it does not fit.
    fn first_cut(&self, batch: &RecordBatch) -> usize {
        let rows = batch.num_rows().max(1);
        let bytes: usize = batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
            .sum();
        if bytes <= self.payload_max * 9 / 10 {
            return rows;
        }
        (rows * (self.payload_max * 9 / 10) / bytes).clamp(1, rows)
    }
}

/// Queues `rows` rows from `offset` as pieces of `piece_rows`, so that they
/// pop from `pending` in order.
fn push_pieces(pending: &mut Vec<(usize, usize)>, offset: usize, rows: usize, piece_rows: usize) {
    let piece_rows = piece_rows.max(1);
    let count = rows.div_ceil(piece_rows);
    for i in (0..count).rev() {
        let start = offset + i * piece_rows;
        pending.push((start, piece_rows.min(offset + rows - start)));
    }
}

/// Decodes one channel's stream.
#[derive(Default)]
pub struct ChannelDecoder {
    decoder: StreamDecoder,
}

impl ChannelDecoder {
    /// Decodes one buffer into the record batch it holds.
    pub fn decode(&mut self, payload: &[u8]) -> Result<RecordBatch, IpcError> {
        let mut buffer = Buffer::from(payload);
        let mut batch = None;
        while !buffer.is_empty() {
            if let Some(b) = self.decoder.decode(&mut buffer)? {
                batch = Some(b);
            }
        }
        batch.ok_or(IpcError::NoBatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray};
    use std::sync::Arc;

    fn batch(rows: i64) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("k", Arc::new(Int64Array::from_iter_values(0..rows)) as _),
            (
                "s",
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("row-{i}")),
                )) as _,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn large_batches_are_cut_to_fit_and_reassemble_in_order() {
        let input = batch(10_000);
        let mut enc = ChannelEncoder::new(8 * 1024);
        let mut dec = ChannelDecoder::default();
        let mut out = Vec::new();
        let mut pieces = 0;
        enc.encode(&input, &mut |bytes| {
            assert!(bytes.len() <= 8 * 1024);
            pieces += 1;
            out.push(dec.decode(bytes)?);
            Ok(())
        })
        .unwrap();
        assert!(pieces > 10);
        let schema = input.schema();
        let joined = arrow_select::concat::concat_batches(&schema, &out).unwrap();
        assert_eq!(joined, input);
    }

    #[test]
    fn a_row_larger_than_a_segment_is_an_error() {
        let mut enc = ChannelEncoder::new(64);
        let err = enc.encode(&batch(1), &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, IpcError::RowTooLarge { .. }));
    }
}
