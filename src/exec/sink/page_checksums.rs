//! Page CRC checksums for the Parquet files strata writes.
//!
//! The Parquet format has an optional CRC-32 (IEEE) of each page's
//! compressed bytes in the page header, and the `parquet` crate (with its
//! `crc` feature, which strata enables) verifies it on read whenever it is
//! present. Its writer, as of parquet 60, never fills it in (`crc: None` in
//! `CompressedPage::to_thrift_header`) and has no option to. So the Parquet
//! sinks write a file with the ordinary `ArrowWriter`, then copy it page by
//! page into a second file, adding the checksum to each page header, and
//! replace the first file with the second.
//!
//! The copy patches the Thrift compact encoding of `PageHeader` directly:
//! fields 1–3 (type, uncompressed size, compressed size) come first, the
//! optional field 4 is the CRC, and the next field's header byte encodes
//! its id as a delta from the previous one, so inserting field 4 after
//! field 3 means lowering that delta by one. Everything else in the header
//! is copied as it is. Column chunk metadata are rebuilt with the grown
//! sizes by `SerializedRowGroupWriter::append_column`, which also moves
//! every offset to its place in the new file.
//!
//! Limits: the sink's writer writes no page index (column and offset
//! indexes), because their page offsets would have to be moved too; the
//! Parquet source does not need it. The copy costs one more read and write
//! of each part file when it is finished.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::ChunkReader;
use parquet::file::writer::SerializedFileWriter;

/// Thrift compact type ids (the low nibble of a field header).
mod compact {
    pub const BOOL_TRUE: u8 = 1;
    pub const BOOL_FALSE: u8 = 2;
    pub const I8: u8 = 3;
    pub const I16: u8 = 4;
    pub const I32: u8 = 5;
    pub const I64: u8 = 6;
    pub const DOUBLE: u8 = 7;
    pub const BINARY: u8 = 8;
    pub const LIST: u8 = 9;
    pub const SET: u8 = 10;
    pub const MAP: u8 = 11;
    pub const STRUCT: u8 = 12;
    pub const UUID: u8 = 13;
}

/// The `PageHeader` field id of the CRC.
const CRC_FIELD_ID: i16 = 4;
/// `PageType::DICTIONARY_PAGE`.
const DICTIONARY_PAGE: i32 = 2;
/// Nesting deeper than this is not a page header strata's writer made.
const THRIFT_DEPTH_MAX: usize = 16;

/// Writer properties of the Parquet sinks: no page index (see the module
/// documentation), and row groups of `row_group_rows` rows.
pub fn sink_writer_properties(row_group_rows: usize) -> WriterProperties {
    assert!(
        row_group_rows > 0,
        "the job file refuses row_group_rows = 0"
    );
    WriterProperties::builder()
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_offset_index_disabled(true)
        .set_max_row_group_row_count(Some(row_group_rows))
        .build()
}

/// Rewrites the Parquet file at `path` with a CRC in every page header.
/// The copy is written to a hidden scratch file beside it that replaces it
/// by a rename, so `path` is either the old file or the new one, never half
/// of either; on an error the scratch file is removed.
pub fn add_page_checksums(path: &Path) -> Result<(), String> {
    let scratch = scratch_path(path);
    let result = write_checksummed_copy(path, &scratch)
        .and_then(|()| std::fs::rename(&scratch, path).map_err(|e| e.to_string()));
    if result.is_err() {
        let _ = std::fs::remove_file(&scratch);
    }
    result
}

/// `.part-0.parquet.inprogress` → `.part-0.parquet.crc.inprogress`: a
/// hidden name that the sinks' cleanup recognises as theirs.
fn scratch_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".inprogress").unwrap_or(&name);
    let stem = stem.strip_prefix('.').unwrap_or(stem);
    path.with_file_name(format!(".{stem}.crc.inprogress"))
}

fn write_checksummed_copy(source: &Path, target: &Path) -> Result<(), String> {
    let input = File::open(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&input)
        .map_err(|e| e.to_string())?;
    let output = File::create(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let file_metadata = metadata.file_metadata();
    let mut properties = WriterProperties::builder()
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_offset_index_disabled(true)
        .set_key_value_metadata(file_metadata.key_value_metadata().cloned());
    if let Some(created_by) = file_metadata.created_by() {
        properties = properties.set_created_by(created_by.to_owned());
    }
    let schema = file_metadata.schema_descr().root_schema_ptr();
    let mut writer = SerializedFileWriter::new(output, schema, Arc::new(properties.build()))
        .map_err(|e| e.to_string())?;
    copy_row_groups(&input, &metadata, &mut writer)?;
    let file = writer.into_inner().map_err(|e| e.to_string())?;
    file.sync_all()
        .map_err(|e| format!("{}: {e}", target.display()))
}

fn copy_row_groups(
    input: &File,
    metadata: &ParquetMetaData,
    writer: &mut SerializedFileWriter<File>,
) -> Result<(), String> {
    for (row_group_index, row_group) in metadata.row_groups().iter().enumerate() {
        let rows = u64::try_from(row_group.num_rows()).unwrap_or(0);
        let mut row_group_writer = writer.next_row_group().map_err(|e| e.to_string())?;
        for (column_index, column) in row_group.columns().iter().enumerate() {
            let at = |e: String| {
                format!(
                    "row group {row_group_index}, column {column_index} ({column_path}): {e}",
                    column_path = column.column_path()
                )
            };
            let (bytes, close) = checksummed_chunk(input, column, rows).map_err(at)?;
            row_group_writer
                .append_column(&bytes, close)
                .map_err(|e| at(e.to_string()))?;
        }
        row_group_writer.close().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One column chunk with a CRC in each page header, and its metadata in the
/// chunk's own coordinates (the first page at offset 0).
fn checksummed_chunk(
    input: &File,
    column: &ColumnChunkMetaData,
    rows: u64,
) -> Result<(Bytes, ColumnCloseResult), String> {
    let (start, length) = column.byte_range();
    let length = usize::try_from(length).map_err(|e| e.to_string())?;
    let chunk = input.get_bytes(start, length).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(length + 16 * 1024);
    let mut data_page_offset = None;
    let mut position = 0;
    while position < chunk.len() {
        let page = parse_page_header(&chunk[position..])?;
        let body_start = position + page.header_len;
        let body_end = body_start
            .checked_add(page.compressed_len)
            .filter(|&end| end <= chunk.len())
            .ok_or("a page runs past the end of its column chunk")?;
        if page.page_type != DICTIONARY_PAGE && data_page_offset.is_none() {
            data_page_offset = Some(out.len() as i64);
        }
        let crc = crc32fast::hash(&chunk[body_start..body_end]);
        write_header_with_crc(&chunk[position..body_start], &page, crc, &mut out)?;
        out.extend_from_slice(&chunk[body_start..body_end]);
        position = body_end;
    }
    let data_page_offset = data_page_offset.ok_or("a column chunk without data pages")?;
    let growth = out.len() as i64 - chunk.len() as i64;
    let new_length = out.len() as i64;
    let metadata = column
        .clone()
        .into_builder()
        .set_total_compressed_size(new_length)
        .set_total_uncompressed_size(column.uncompressed_size() + growth)
        .set_data_page_offset(data_page_offset)
        .set_dictionary_page_offset(column.dictionary_page_offset().map(|_| 0))
        .set_offset_index_offset(None)
        .set_offset_index_length(None)
        .set_column_index_offset(None)
        .set_column_index_length(None)
        .set_bloom_filter_offset(None)
        .set_bloom_filter_length(None)
        .build()
        .map_err(|e| e.to_string())?;
    let close = ColumnCloseResult {
        bytes_written: out.len() as u64,
        rows_written: rows,
        metadata,
        bloom_filter: None,
        column_index: None,
        offset_index: None,
    };
    Ok((Bytes::from(out), close))
}

/// What the copy needs from one page header.
#[derive(Debug, PartialEq)]
struct PageHeaderScan {
    header_len: usize,
    page_type: i32,
    compressed_len: usize,
    /// Where field 3 ends: the CRC goes here.
    crc_at: usize,
    /// Field 4 is there already.
    has_crc: bool,
}

/// Reads a Thrift compact `PageHeader` far enough to copy it.
fn parse_page_header(bytes: &[u8]) -> Result<PageHeaderScan, String> {
    let mut r = Reader { bytes, at: 0 };
    let mut last_id: i16 = 0;
    let (mut page_type, mut compressed_len, mut crc_at, mut has_crc) = (None, None, None, false);
    while let Some((id, kind)) = r.field_header(last_id)? {
        match (id, kind) {
            (1, compact::I32) => page_type = Some(r.i32()?),
            (2, compact::I32) => {
                r.i32()?;
            }
            (3, compact::I32) => {
                let len = r.i32()?;
                compressed_len = Some(usize::try_from(len).map_err(|_| "a negative page size")?);
                crc_at = Some(r.at);
            }
            (CRC_FIELD_ID, compact::I32) => {
                r.i32()?;
                has_crc = true;
            }
            _ => r.skip(kind, 0)?,
        }
        if id <= last_id {
            return Err("page header fields out of order".into());
        }
        last_id = id;
    }
    Ok(PageHeaderScan {
        header_len: r.at,
        page_type: page_type.ok_or("a page header without a type")?,
        compressed_len: compressed_len.ok_or("a page header without a size")?,
        crc_at: crc_at.ok_or("a page header without a size")?,
        has_crc,
    })
}

/// Copies `header`, inserting field 4 (the CRC) after field 3.
fn write_header_with_crc(
    header: &[u8],
    scan: &PageHeaderScan,
    crc: u32,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    if scan.has_crc {
        // Another writer's checksum: the reader verifies it as it is.
        out.extend_from_slice(header);
        return Ok(());
    }
    let (head, tail) = header.split_at(scan.crc_at);
    out.extend_from_slice(head);
    out.push((1 << 4) | compact::I32);
    // The CRC is a Thrift i32 holding the unsigned 32 bits.
    write_varint(zigzag_i32(crc as i32), out);
    match tail.split_first() {
        Some((&next, rest)) if next >> 4 != 0 => {
            // A short-form field header: its id is a delta from field 3's,
            // now from field 4's.
            if next >> 4 < 2 {
                return Err("page header field 4 present but not an i32".into());
            }
            out.push(next - (1 << 4));
            out.extend_from_slice(rest);
        }
        // The stop byte, or a long-form header with an absolute id.
        _ => out.extend_from_slice(tail),
    }
    Ok(())
}

fn zigzag_i32(n: i32) -> u32 {
    ((n << 1) ^ (n >> 31)) as u32
}

fn write_varint(mut n: u32, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A cursor over Thrift compact bytes that never reads past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or("a page header runs past its column chunk")?;
        self.at += 1;
        Ok(b)
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        self.at = end.ok_or("a page header runs past its column chunk")?;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 64 bits in a page header".into())
    }

    fn i32(&mut self) -> Result<i32, String> {
        let n = self.varint()?;
        let n = u32::try_from(n).map_err(|_| "an i32 out of range in a page header")?;
        Ok(((n >> 1) as i32) ^ -((n & 1) as i32))
    }

    /// The next field's id and type, or `None` at the struct's stop byte.
    fn field_header(&mut self, last_id: i16) -> Result<Option<(i16, u8)>, String> {
        let b = self.byte()?;
        if b == 0 {
            return Ok(None);
        }
        let kind = b & 0x0f;
        let delta = i16::from(b >> 4);
        let id = if delta == 0 {
            let n = self.varint()?;
            let n = u16::try_from(n).map_err(|_| "a field id out of range in a page header")?;
            ((n >> 1) as i16) ^ -((n & 1) as i16)
        } else {
            last_id
                .checked_add(delta)
                .ok_or("a field id out of range in a page header")?
        };
        Ok(Some((id, kind)))
    }

    /// Skips one value of type `kind`.
    fn skip(&mut self, kind: u8, depth: usize) -> Result<(), String> {
        if depth > THRIFT_DEPTH_MAX {
            return Err("a page header nested too deeply".into());
        }
        match kind {
            compact::BOOL_TRUE | compact::BOOL_FALSE => Ok(()),
            compact::I8 => self.advance(1),
            compact::I16 | compact::I32 | compact::I64 => self.varint().map(drop),
            compact::DOUBLE => self.advance(8),
            compact::UUID => self.advance(16),
            compact::BINARY => {
                let len = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                self.advance(len)
            }
            compact::LIST | compact::SET => {
                let b = self.byte()?;
                let element = b & 0x0f;
                let count = match b >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                for _ in 0..count {
                    // Booleans in a list take a byte each.
                    if matches!(element, compact::BOOL_TRUE | compact::BOOL_FALSE) {
                        self.advance(1)?;
                    } else {
                        self.skip(element, depth + 1)?;
                    }
                }
                Ok(())
            }
            compact::MAP => {
                let count = self.varint()?;
                if count == 0 {
                    return Ok(());
                }
                let kinds = self.byte()?;
                for _ in 0..count {
                    self.skip(kinds >> 4, depth + 1)?;
                    self.skip(kinds & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            compact::STRUCT => {
                let mut last_id = 0;
                while let Some((id, field_kind)) = self.field_header(last_id)? {
                    self.skip(field_kind, depth + 1)?;
                    last_id = id;
                }
                Ok(())
            }
            other => Err(format!("unknown Thrift type {other} in a page header")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn batch(rows: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let ids = Int64Array::from_iter_values(0..rows);
        let names =
            StringArray::from_iter((0..rows).map(|i| (i % 7 != 0).then(|| format!("n{}", i % 13))));
        RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(names)]).expect("batch")
    }

    fn write(path: &Path, rows: i64) {
        let file = File::create(path).expect("create");
        let b = batch(rows);
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(4000))
            .set_data_page_row_count_limit(500)
            .set_write_batch_size(500)
            .build();
        let mut writer = ArrowWriter::try_new(file, b.schema(), Some(props)).expect("writer");
        writer.write(&b).expect("write");
        writer.close().expect("close");
    }

    fn read(path: &Path) -> Vec<RecordBatch> {
        let file = File::open(path).expect("open");
        ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("builder")
            .build()
            .expect("reader")
            .collect::<Result<_, _>>()
            .expect("read")
    }

    #[test]
    fn checksummed_copy_reads_back_the_same_rows_and_every_page_has_a_crc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.parquet");
        write(&path, 10_000);
        let before = read(&path);
        add_page_checksums(&path).expect("checksums");
        assert_eq!(read(&path), before);
        let file = File::open(&path).expect("open");
        let metadata = ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .expect("meta");
        assert_eq!(metadata.num_row_groups(), 3);
        let mut pages = 0;
        for row_group in metadata.row_groups() {
            for column in row_group.columns() {
                let (start, length) = column.byte_range();
                let chunk = file.get_bytes(start, length as usize).expect("chunk");
                let mut position = 0;
                while position < chunk.len() {
                    let scan = parse_page_header(&chunk[position..]).expect("header");
                    assert!(scan.has_crc);
                    position += scan.header_len + scan.compressed_len;
                    pages += 1;
                }
            }
        }
        assert!(pages > 6, "several pages per chunk: {pages}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
        assert_eq!(names.len(), 1, "no scratch file is left");
    }

    #[test]
    fn a_header_round_trips_through_the_crc_insertion() {
        // type=0, uncompressed=100, compressed=90, then field 5 (a struct
        // holding field 1 = i32 7), stop.
        let header = [
            0x15, 0x00, 0x15, 200, 1, 0x15, 180, 1, 0x2c, 0x15, 14, 0x00, 0x00,
        ];
        let scan = parse_page_header(&header).expect("scan");
        assert_eq!(
            (scan.page_type, scan.compressed_len, scan.has_crc),
            (0, 90, false)
        );
        assert_eq!(scan.header_len, header.len());
        let mut out = Vec::new();
        write_header_with_crc(&header, &scan, 0xdead_beef, &mut out).expect("insert");
        let again = parse_page_header(&out).expect("rescan");
        assert!(again.has_crc);
        assert_eq!((again.page_type, again.compressed_len), (0, 90));
        assert_eq!(again.header_len, out.len());
    }

    #[test]
    fn scratch_names_stay_hidden_part_names() {
        let path = Path::new("/o/.part-3-1.parquet.inprogress");
        assert_eq!(
            scratch_path(path),
            Path::new("/o/.part-3-1.parquet.crc.inprogress")
        );
        assert!(super::super::output::is_part_file_name(
            ".part-3-1.parquet.crc.inprogress",
            "parquet"
        ));
    }
}
