//! Record batches ↔ Arrow IPC stream messages, cut to fit network segments.
//!
//! Each channel is one Arrow IPC stream: its first buffer starts with the
//! schema message, every buffer then holds exactly one record-batch message,
//! so a receiver decodes buffer by buffer and never reassembles across
//! buffers (which would need memory outside the credit budget). A batch whose
//! encoding does not fit a segment is sliced by rows until every piece fits.

use std::cell::Cell;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::{IpcWriteOptions, StreamEncoder, StreamWriter};
use arrow_schema::{ArrowError, DataType, Schema};

use crate::memory::Segment;

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
    #[error("compression must be enabled before a channel's first batch")]
    CompressionAfterStart,
}

/// Memory a piece is encoded into: a network segment on the data path, or a
/// reused heap buffer (spill blocks, tests).
pub enum Room {
    Segment(Segment),
    Heap(Vec<u8>),
}

impl Room {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Room::Segment(s) => s.as_slice(),
            Room::Heap(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Room::Segment(s) => s.as_mut_slice(),
            Room::Heap(v) => v,
        }
    }
}

/// What arrow's `StreamWriter` writes into: the current piece's room. Bytes
/// past `limit` are counted, not stored, so an oversized piece is measured
/// (and then cut) without a second encoding pass. With no room, bytes go to
/// `prefix`: the schema message, written when the stream starts, which
/// leads the channel's first piece.
struct PieceWriter {
    room: Option<Room>,
    len: usize,
    limit: usize,
    prefix: Vec<u8>,
}

impl std::io::Write for PieceWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.room {
            None => self.prefix.extend_from_slice(bytes),
            Some(room) => {
                let end = self.len + bytes.len();
                if end <= self.limit {
                    room.as_mut_slice()[self.len..end].copy_from_slice(bytes);
                }
                self.len = end;
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes one channel's stream. Each piece is written once, from the
/// batch's own Arrow buffers straight into the memory it is sent from.
pub struct ChannelEncoder {
    options: IpcWriteOptions,
    /// Created at the first batch (it needs the schema); dropped when the
    /// options change, or when a piece with dictionaries overflowed (its
    /// dictionary tracker then believes they were sent).
    writer: Option<StreamWriter<PieceWriter>>,
    schema_sent: bool,
    /// The segment's room for payload.
    segment_payload_max: usize,
    /// What buffers are cut to now: the segment's room, or less when buffer
    /// debloating asked for smaller buffers.
    payload_max: usize,
    /// The heap room [`ChannelEncoder::encode`] reuses.
    heap: Option<Vec<u8>>,
    /// [`ChannelEncoder::encode_out`]'s encoder for schemas without
    /// dictionaries: its pieces stay in the batch's own buffers.
    stream: Option<StreamEncoder>,
}

/// One encoded piece of a channel's stream, in its segment or not.
pub enum Piece {
    /// Written into the segment (`len` bytes from its start).
    Contiguous { segment: Segment, len: usize },
    /// Left in Arrow buffers (the batch's own body buffers and small new
    /// ones for message headers and padding), sent in this order; the
    /// segment is the pool's budget for it, and holds its bytes only where
    /// a transport needs them there.
    Parts {
        segment: Segment,
        parts: Vec<Buffer>,
        len: usize,
    },
}

impl ChannelEncoder {
    pub fn new(payload_max: usize) -> Self {
        Self {
            options: IpcWriteOptions::default(),
            writer: None,
            schema_sent: false,
            segment_payload_max: payload_max,
            payload_max,
            heap: None,
            stream: None,
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
        if self.schema_sent {
            // A new encoder would start a second stream on the channel.
            return Err(IpcError::CompressionAfterStart);
        }
        self.writer = None;
        self.stream = None;
        Ok(())
    }

    /// Encodes `batch` into one or more payloads, each at most `payload_max`
    /// bytes, handing each to `sink` in order.
    pub fn encode(
        &mut self,
        batch: &RecordBatch,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), IpcError>,
    ) -> Result<(), IpcError> {
        let size = self.segment_payload_max;
        let spare = Cell::new(self.heap.take());
        let result = self.encode_into(
            batch,
            &mut || Ok(Room::Heap(spare.take().unwrap_or_else(|| vec![0; size]))),
            &mut |room, len| {
                let result = sink(&room.as_slice()[..len]);
                if let Room::Heap(v) = room {
                    spare.set(Some(v));
                }
                result
            },
        );
        self.heap = spare.take();
        result
    }

    /// Encodes `batch` into one or more pieces of at most `payload_max`
    /// bytes. Each piece is written into memory from `room` (called once per
    /// piece, before encoding, so it may wait for a free segment) and handed
    /// to `emit` with its length, in order.
    pub fn encode_into(
        &mut self,
        batch: &RecordBatch,
        room: &mut dyn FnMut() -> Result<Room, IpcError>,
        emit: &mut dyn FnMut(Room, usize) -> Result<(), IpcError>,
    ) -> Result<(), IpcError> {
        let has_dictionaries = batch
            .schema_ref()
            .fields()
            .iter()
            .any(|f| contains_dictionary(f.data_type()));
        let mut spare: Option<Room> = None;
        let mut pending = Vec::new();
        push_pieces(&mut pending, 0, batch.num_rows(), self.first_cut(batch));
        while let Some((offset, rows)) = pending.pop() {
            let target = match spare.take() {
                Some(r) => r,
                None => room()?,
            };
            let (payload_max, schema_sent) = (self.payload_max, self.schema_sent);
            let writer = self.writer_for(batch.schema_ref())?;
            let w = writer.get_mut();
            w.limit = payload_max.min(target.as_slice().len());
            w.len = 0;
            w.room = Some(target);
            if !schema_sent {
                let prefix = std::mem::take(&mut w.prefix);
                std::io::Write::write_all(w, &prefix).map_err(ArrowError::from)?;
                w.prefix = prefix;
            }
            let written = writer.write(&batch.slice(offset, rows));
            let w = writer.get_mut();
            let (target, len) = (w.room.take(), w.len);
            let target = target.expect("the room stays in the writer while it writes");
            written?;
            if len <= self.payload_max {
                self.schema_sent = true;
                if let Some(w) = self.writer.as_mut() {
                    w.get_mut().prefix = Vec::new();
                }
                emit(target, len)?;
                continue;
            }
            spare = Some(target);
            if has_dictionaries {
                // Its tracker counts the discarded piece's dictionaries as
                // sent; a fresh writer sends them again.
                self.writer = None;
            }
            recut(&mut pending, offset, rows, len, self.payload_max)?;
        }
        Ok(())
    }

    /// Encodes `batch` for the network: into pieces of at most
    /// `payload_max` bytes, each with a segment from `room` (called once per
    /// piece, before encoding, so it may wait for the pool), handed to
    /// `emit` in order. Without dictionaries a piece stays in the batch's
    /// own buffers and the gathered write sends it from there; with them
    /// it is written into its segment (a piece that overflows must send its
    /// dictionaries again, which only the stream writer can redo).
    pub fn encode_out(
        &mut self,
        batch: &RecordBatch,
        room: &mut dyn FnMut() -> Result<Segment, IpcError>,
        emit: &mut dyn FnMut(Piece) -> Result<(), IpcError>,
    ) -> Result<(), IpcError> {
        let has_dictionaries = batch
            .schema_ref()
            .fields()
            .iter()
            .any(|f| contains_dictionary(f.data_type()));
        if has_dictionaries {
            return self.encode_into(batch, &mut || room().map(Room::Segment), &mut |r, len| {
                let Room::Segment(segment) = r else {
                    unreachable!("rooms here are segments")
                };
                emit(Piece::Contiguous { segment, len })
            });
        }
        let mut spare: Option<Segment> = None;
        let mut pending = Vec::new();
        push_pieces(&mut pending, 0, batch.num_rows(), self.first_cut(batch));
        while let Some((offset, rows)) = pending.pop() {
            let segment = match spare.take() {
                Some(s) => s,
                None => room()?,
            };
            let payload_max = self.payload_max.min(segment.capacity());
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => self.stream.insert(StreamEncoder::try_new_with_options(
                    batch.schema_ref(),
                    self.options.clone(),
                )?),
            };
            let parts = stream.encode(&batch.slice(offset, rows))?;
            let len: usize = parts.iter().map(Buffer::len).sum();
            if len <= payload_max {
                self.schema_sent = true;
                emit(Piece::Parts {
                    segment,
                    parts,
                    len,
                })?;
                continue;
            }
            spare = Some(segment);
            if !self.schema_sent {
                // The discarded piece led with the schema message; a fresh
                // encoder leads the next one with it again.
                self.stream = None;
            }
            recut(&mut pending, offset, rows, len, payload_max)?;
        }
        Ok(())
    }

    /// The stream writer, created (with the schema message captured as the
    /// prefix of the first piece) when there is none.
    fn writer_for(&mut self, schema: &Schema) -> Result<&mut StreamWriter<PieceWriter>, IpcError> {
        if self.writer.is_none() {
            let capture = PieceWriter {
                room: None,
                len: 0,
                limit: 0,
                prefix: Vec::new(),
            };
            let mut writer =
                StreamWriter::try_new_with_options(capture, schema, self.options.clone())?;
            if self.schema_sent {
                writer.get_mut().prefix.clear();
            }
            self.writer = Some(writer);
        }
        Ok(self.writer.as_mut().expect("created above"))
    }

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

fn contains_dictionary(t: &DataType) -> bool {
    match t {
        DataType::Dictionary(..) => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => contains_dictionary(f.data_type()),
        DataType::Struct(fields) => fields.iter().any(|f| contains_dictionary(f.data_type())),
        DataType::Union(fields, _) => fields
            .iter()
            .any(|(_, f)| contains_dictionary(f.data_type())),
        DataType::RunEndEncoded(_, values) => contains_dictionary(values.data_type()),
        _ => false,
    }
}

/// A piece of `rows` rows from `offset` encoded to `len` bytes, over
/// `payload_max`: cuts it into pieces sized from that encoding, 10% under
/// the limit, all at once (re-encoding the remainder after every piece would
/// cost quadratic time on large batches). A piece that still does not fit
/// is cut again; a single row that does not fit is an error.
fn recut(
    pending: &mut Vec<(usize, usize)>,
    offset: usize,
    rows: usize,
    len: usize,
    payload_max: usize,
) -> Result<(), IpcError> {
    if rows <= 1 {
        return Err(IpcError::RowTooLarge {
            row_bytes: len,
            segment_bytes: payload_max,
        });
    }
    let piece_rows = ((rows as u128 * payload_max as u128 * 9 / 10) / len as u128)
        .clamp(1, rows as u128 - 1) as usize;
    push_pieces(pending, offset, rows, piece_rows);
    Ok(())
}

/// Queues `rows` rows from `offset` as pieces of `piece_rows`, so that they
/// pop from `pending` in order (pushed in reverse).
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
        self.decode_buffer(Buffer::from(payload))
    }

    /// Decodes one buffer already copied out of its segment; the batch's
    /// arrays share its memory.
    pub fn decode_buffer(&mut self, mut buffer: Buffer) -> Result<RecordBatch, IpcError> {
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

    fn round_trip(
        input: &RecordBatch,
        enc: &mut ChannelEncoder,
        dec: &mut ChannelDecoder,
        limit: usize,
    ) -> usize {
        let mut out = Vec::new();
        enc.encode(input, &mut |bytes| {
            assert!(bytes.len() <= limit);
            out.push(dec.decode(bytes)?);
            Ok(())
        })
        .unwrap();
        let joined = arrow_select::concat::concat_batches(&input.schema(), &out).unwrap();
        assert_eq!(&joined, input);
        out.len()
    }

    #[test]
    fn pieces_that_overflow_resend_their_dictionaries() {
        use arrow_array::DictionaryArray;
        use arrow_array::types::Int32Type;
        let words: Vec<String> = (0..100)
            .map(|i| format!("dictionary-value-{i:04}"))
            .collect();
        let keys: DictionaryArray<Int32Type> =
            (0..10_000).map(|i| words[(i * 7) % 100].as_str()).collect();
        let input = RecordBatch::try_from_iter([
            ("d", Arc::new(keys) as _),
            ("k", Arc::new(Int64Array::from_iter_values(0..10_000)) as _),
        ])
        .unwrap();
        let mut enc = ChannelEncoder::new(8 * 1024);
        let mut dec = ChannelDecoder::default();
        // Twice: the second batch continues the stream (no schema message).
        assert!(round_trip(&input, &mut enc, &mut dec, 8 * 1024) > 4);
        assert!(round_trip(&input, &mut enc, &mut dec, 8 * 1024) > 4);
    }

    #[test]
    fn lz4_pieces_and_segment_rooms_round_trip() {
        let input = batch(20_000);
        let mut enc = ChannelEncoder::new(16 * 1024);
        enc.enable_lz4().unwrap();
        round_trip(&input, &mut enc, &mut ChannelDecoder::default(), 16 * 1024);
        // Into pool segments, as the data path does.
        let pool = crate::memory::NetworkBufferPool::new(4, 16 * 1024);
        let mut enc = ChannelEncoder::new(16 * 1024 - 64);
        let mut dec = ChannelDecoder::default();
        let mut out = Vec::new();
        enc.encode_into(
            &input,
            &mut || Ok(Room::Segment(pool.try_request().expect("a free segment"))),
            &mut |room, len| {
                assert!(matches!(room, Room::Segment(_)));
                out.push(dec.decode(&room.as_slice()[..len])?);
                Ok(())
            },
        )
        .unwrap();
        let joined = arrow_select::concat::concat_batches(&input.schema(), &out).unwrap();
        assert_eq!(joined, input);
        assert_eq!(pool.available_count(), 4, "every segment went back");
    }

    #[test]
    fn a_row_larger_than_a_segment_is_an_error() {
        let mut enc = ChannelEncoder::new(64);
        let err = enc.encode(&batch(1), &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, IpcError::RowTooLarge { .. }));
    }

    /// Encodes with `encode_out` into pool segments and decodes each piece
    /// from its bytes (parts joined, as the gathered write sends them);
    /// returns the pieces' kinds (true: parts).
    fn round_trip_out(
        input: &RecordBatch,
        enc: &mut ChannelEncoder,
        dec: &mut ChannelDecoder,
        pool: &Arc<crate::memory::NetworkBufferPool>,
        limit: usize,
    ) -> Vec<bool> {
        let mut out = Vec::new();
        let mut kinds = Vec::new();
        enc.encode_out(
            input,
            &mut || Ok(pool.try_request().expect("a free segment")),
            &mut |piece| {
                let (bytes, parts) = match piece {
                    Piece::Contiguous { segment, len } => {
                        (segment.as_slice()[..len].to_vec(), false)
                    }
                    Piece::Parts { parts, len, .. } => {
                        let joined: Vec<u8> =
                            parts.iter().flat_map(|p| p.iter().copied()).collect();
                        assert_eq!(joined.len(), len);
                        (joined, true)
                    }
                };
                assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
                kinds.push(parts);
                out.push(dec.decode(&bytes)?);
                Ok(())
            },
        )
        .unwrap();
        let joined = arrow_select::concat::concat_batches(&input.schema(), &out).unwrap();
        assert_eq!(&joined, input);
        kinds
    }

    #[test]
    fn pieces_left_in_arrow_buffers_round_trip_and_share_the_batch_memory() {
        let pool = crate::memory::NetworkBufferPool::new(4, 8 * 1024);
        let input = batch(10_000);
        // A limit the first guess overshoots: the first piece (with the
        // schema message) is cut again by a fresh encoder.
        let mut enc = ChannelEncoder::new(3 * 1024);
        let mut dec = ChannelDecoder::default();
        let kinds = round_trip_out(&input, &mut enc, &mut dec, &pool, 3 * 1024);
        assert!(kinds.len() > 10 && kinds.iter().all(|p| *p));
        // The stream goes on without a second schema message.
        round_trip_out(&input, &mut enc, &mut dec, &pool, 3 * 1024);
        assert_eq!(pool.available_count(), 4, "every segment went back");
        // A body buffer is the batch's own memory, not a copy.
        let small = batch(100);
        let values = small.column(0).to_data().buffers()[0].as_ptr();
        let mut shared = false;
        ChannelEncoder::new(8 * 1024)
            .encode_out(
                &small,
                &mut || Ok(pool.try_request().expect("a free segment")),
                &mut |piece| {
                    if let Piece::Parts { parts, .. } = piece {
                        shared |= parts.iter().any(|p| p.as_ptr() == values);
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert!(shared);
    }

    #[test]
    fn lz4_and_dictionary_pieces_from_encode_out_round_trip() {
        use arrow_array::DictionaryArray;
        use arrow_array::types::Int32Type;
        let pool = crate::memory::NetworkBufferPool::new(4, 16 * 1024);
        let mut enc = ChannelEncoder::new(16 * 1024);
        enc.enable_lz4().unwrap();
        let kinds = round_trip_out(
            &batch(20_000),
            &mut enc,
            &mut ChannelDecoder::default(),
            &pool,
            16 * 1024,
        );
        assert!(kinds.iter().all(|p| *p));
        assert!(matches!(
            enc.enable_lz4(),
            Err(IpcError::CompressionAfterStart)
        ));
        // Dictionaries are written into segments (a piece that overflows
        // sends them again).
        let words: Vec<String> = (0..100).map(|i| format!("value-{i:04}")).collect();
        let keys: DictionaryArray<Int32Type> =
            (0..10_000).map(|i| words[(i * 7) % 100].as_str()).collect();
        let input = RecordBatch::try_from_iter([("d", Arc::new(keys) as _)]).unwrap();
        let mut enc = ChannelEncoder::new(8 * 1024);
        let kinds = round_trip_out(
            &input,
            &mut enc,
            &mut ChannelDecoder::default(),
            &pool,
            8 * 1024,
        );
        assert!(kinds.len() > 2 && kinds.iter().all(|p| !*p));
        assert_eq!(pool.available_count(), 4);
    }
}
