//! File formats in the job language: the `arrow_ipc_source` spec, the part
//! file options of `parquet_sink` and `arrow_ipc_sink`, and what planning
//! needs to know about an Arrow IPC file before the job starts.
//!
//! Arrow IPC comes in two framings (the Arrow columnar format spec,
//! "Serialization and Interprocess Communication"):
//!
//! - the *file* format (`.arrow`, Feather v2) starts and ends with the magic
//!   bytes `ARROW1` and has a footer that indexes its record batches, so a
//!   reader can seek to any batch;
//! - the *stream* format (`.arrows`) is a sequence of messages, each opened
//!   by the continuation marker `0xFFFFFFFF`, with no index: a reader decodes
//!   its way to a batch.
//!
//! [`inspect_ipc`] tells them apart by their first bytes (unless the job file
//! forces a `format`), and reads a file-format file's footer itself,
//! checking its length and every batch's place against the file's size
//! before anything is allocated for them (arrow's reader trusts them). A source's files must all have
//! the first file's columns, compared by [`schema_difference`] on names,
//! types and nullability (not metadata, which writers fill differently).
//!
//! Sizes (`target_file_bytes`) use the syntax of the configuration's memory
//! keys: `"128mb"`, `"64 kb"`, or an integer number of bytes.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{ArrowError, DataType, Schema, SchemaRef};

use super::JobError;
use super::spec::WatermarkSpec;
use super::tomlx::Table;

/// The extensions of the files an `arrow_ipc_source` directory is read
/// from, whatever their format (which the magic bytes decide).
pub const IPC_EXTENSIONS: [&str; 4] = ["arrow", "arrows", "feather", "ipc"];

/// The first bytes of an IPC file-format file, and its last six.
const FILE_MAGIC: &[u8; 6] = b"ARROW1";
/// The magic, padded to 8 bytes, at the start of a file-format file.
const FILE_HEAD_BYTES: u64 = 8;
/// The footer length (i32, little-endian) and the magic, at the end.
const FILE_TAIL_BYTES: u64 = 10;
/// Opens every message of a stream since format version 0.15.
const CONTINUATION_MARKER: [u8; 4] = [0xFF; 4];

/// Parquet's own row group size, which `parquet_sink` keeps unless
/// `row_group_rows` says otherwise.
pub const ROW_GROUP_ROWS_DEFAULT: usize =
    parquet::file::properties::DEFAULT_MAX_ROW_GROUP_ROW_COUNT;

/// The framing of an Arrow IPC file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpcFormat {
    /// Magic bytes, messages, and a footer indexing the record batches.
    #[default]
    File,
    /// Messages only, ended by an end-of-stream marker.
    Stream,
}

impl IpcFormat {
    /// The value of the job file's `format` key.
    pub fn as_str(self) -> &'static str {
        match self {
            IpcFormat::File => "file",
            IpcFormat::Stream => "stream",
        }
    }

    /// The extension of the part files an `arrow_ipc_sink` writes.
    pub fn extension(self) -> &'static str {
        match self {
            IpcFormat::File => "arrow",
            IpcFormat::Stream => "arrows",
        }
    }
}

/// How an `arrow_ipc_sink` compresses the buffers of its record batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpcCompression {
    #[default]
    None,
    /// LZ4 frames (the `lz4` of pyarrow's `IpcWriteOptions`).
    Lz4,
}

impl IpcCompression {
    pub fn as_str(self) -> &'static str {
        match self {
            IpcCompression::None => "none",
            IpcCompression::Lz4 => "lz4",
        }
    }
}

/// `arrow_ipc_source`: Arrow IPC files, in the file or the stream format.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrowIpcSourceSpec {
    /// A file, or a directory whose [`IPC_EXTENSIONS`] files are read in
    /// name order.
    pub path: PathBuf,
    /// `None`: each file's format is detected from its first bytes.
    pub format: Option<IpcFormat>,
    /// Empty until `plan` reads it from the first file (and projects it on
    /// `columns`).
    pub schema: SchemaRef,
    pub watermark: Option<WatermarkSpec>,
    /// The columns read, in file order; `None`: all. Set by `plan` to the
    /// columns the operators downstream use (projection pushdown).
    pub columns: Option<Vec<String>>,
}

/// `parquet_sink`'s part files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParquetSinkOptions {
    /// Rows per row group (the last of a file holds the rest), at least 1.
    pub row_group_rows: usize,
    /// Close a part file once it holds this many bytes and go on in the
    /// next; `None`: one part file per subtask (per checkpoint, when
    /// checkpointing).
    pub target_file_bytes: Option<u64>,
}

impl Default for ParquetSinkOptions {
    fn default() -> Self {
        Self {
            row_group_rows: ROW_GROUP_ROWS_DEFAULT,
            target_file_bytes: None,
        }
    }
}

/// `arrow_ipc_sink`'s part files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArrowIpcSinkOptions {
    pub format: IpcFormat,
    pub compression: IpcCompression,
    /// As [`ParquetSinkOptions::target_file_bytes`].
    pub target_file_bytes: Option<u64>,
}

pub(super) fn arrow_ipc_source(
    t: &Table<'_, '_>,
    path: PathBuf,
    watermark: Option<WatermarkSpec>,
) -> Result<ArrowIpcSourceSpec, JobError> {
    Ok(ArrowIpcSourceSpec {
        path,
        format: ipc_format(t)?,
        schema: Arc::new(Schema::empty()),
        watermark,
        columns: None,
    })
}

pub(super) fn parquet_sink_options(t: &Table<'_, '_>) -> Result<ParquetSinkOptions, JobError> {
    let row_group_rows = t.int("row_group_rows", 1, i128::from(u32::MAX))?;
    Ok(ParquetSinkOptions {
        row_group_rows: row_group_rows
            .and_then(|n| usize::try_from(n.into_inner()).ok())
            .unwrap_or(ROW_GROUP_ROWS_DEFAULT),
        target_file_bytes: target_file_bytes(t)?,
    })
}

pub(super) fn arrow_ipc_sink_options(t: &Table<'_, '_>) -> Result<ArrowIpcSinkOptions, JobError> {
    Ok(ArrowIpcSinkOptions {
        format: ipc_format(t)?.unwrap_or_default(),
        compression: ipc_compression(t)?,
        target_file_bytes: target_file_bytes(t)?,
    })
}

fn ipc_format(t: &Table<'_, '_>) -> Result<Option<IpcFormat>, JobError> {
    let Some(format) = t.str("format")? else {
        return Ok(None);
    };
    match *format.get_ref() {
        "file" => Ok(Some(IpcFormat::File)),
        "stream" => Ok(Some(IpcFormat::Stream)),
        other => Err(t.invalid(
            "format",
            &format.span(),
            format!("'{other}'"),
            "\"file\" (the IPC file format, .arrow / Feather v2) or \"stream\" (the IPC \
             stream format, .arrows)",
        )),
    }
}

fn ipc_compression(t: &Table<'_, '_>) -> Result<IpcCompression, JobError> {
    let Some(compression) = t.str("compression")? else {
        return Ok(IpcCompression::default());
    };
    match *compression.get_ref() {
        "none" => Ok(IpcCompression::None),
        "lz4" => Ok(IpcCompression::Lz4),
        other => Err(t.invalid(
            "compression",
            &compression.span(),
            format!("'{other}'"),
            "\"lz4\" or \"none\"",
        )),
    }
}

/// `target_file_bytes`: a size string such as `"128mb"` or an integer
/// number of bytes, at least 1.
fn target_file_bytes(t: &Table<'_, '_>) -> Result<Option<u64>, JobError> {
    const EXPECTED: &str =
        "a size of at least 1 byte, such as \"128mb\", \"64 kb\" or 1048576 (bytes)";
    let Some(value) = t.get("target_file_bytes") else {
        return Ok(None);
    };
    let v = value.get_ref();
    let (text, parsed) = if let Some(text) = v.as_str() {
        (
            format!("\"{text}\""),
            crate::config::parse_memory_size(text).ok(),
        )
    } else if let Some(int) = v.as_integer() {
        let digits = int.as_str().replace('_', "");
        let bytes = i128::from_str_radix(&digits, int.radix())
            .ok()
            .and_then(|n| u64::try_from(n).ok());
        (digits, bytes)
    } else {
        (v.type_str().to_owned(), None)
    };
    match parsed.filter(|bytes| *bytes > 0) {
        Some(bytes) => Ok(Some(bytes)),
        None => Err(t.invalid("target_file_bytes", &value.span(), text, EXPECTED)),
    }
}

/// Why a file is not the Arrow IPC file it should be.
#[derive(Debug, thiserror::Error)]
pub enum IpcFileError {
    #[error("not an Arrow IPC file: {reason}")]
    NotArrowIpc { reason: &'static str },
    #[error("format = \"{forced}\", but the file is in the Arrow IPC {found} format")]
    FormatMismatch {
        forced: &'static str,
        found: &'static str,
    },
    #[error(
        "its Arrow IPC footer of {footer_bytes} bytes is larger than the {} bytes a source \
         reads",
        IPC_FOOTER_BYTES_MAX
    )]
    FooterTooLarge { footer_bytes: u64 },
    #[error("cannot read the Arrow IPC schema: {0}")]
    Schema(#[source] ArrowError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The largest file-format footer a source reads: the schema plus 24 bytes
/// per record batch, so about 2.8 million batches. A larger length is a
/// damaged file, and is not allocated.
pub const IPC_FOOTER_BYTES_MAX: u64 = 64 << 20;

/// What a source needs to know about one IPC file before reading it.
#[derive(Debug, Clone)]
pub struct IpcFileInfo {
    pub format: IpcFormat,
    /// The whole file's schema.
    pub schema: SchemaRef,
    /// The record batches a file-format file's footer lists; `None` for a
    /// stream, which has no index.
    pub batch_count: Option<usize>,
}

/// Reads what [`IpcFileInfo`] holds from the file at `path`. The format is
/// `forced` when the job file says, after checking that the file does not
/// plainly have the other one, else detected from the first bytes. A
/// file-format file's footer is read here, not by arrow's reader: its
/// length and every batch's place are checked against the file's size
/// first, so a truncated or damaged file fails with an error and nothing is
/// allocated for lengths it claims but cannot hold.
pub fn inspect_ipc(path: &Path, forced: Option<IpcFormat>) -> Result<IpcFileInfo, IpcFileError> {
    let mut file = File::open(path)?;
    let file_bytes = file.metadata()?.len();
    let format = detect_format(&mut file, forced)?;
    match format {
        IpcFormat::File => {
            let (schema, batch_count) = read_footer(&mut file, file_bytes)?;
            Ok(IpcFileInfo {
                format,
                schema,
                batch_count: Some(batch_count),
            })
        }
        IpcFormat::Stream => {
            file.seek(SeekFrom::Start(0))?;
            let reader = arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
                .map_err(IpcFileError::Schema)?;
            Ok(IpcFileInfo {
                format,
                schema: reader.schema(),
                batch_count: None,
            })
        }
    }
}

fn detect_format(file: &mut File, forced: Option<IpcFormat>) -> Result<IpcFormat, IpcFileError> {
    let mut head = [0u8; 8];
    let head_len = read_up_to(file, &mut head)?;
    let head = &head[..head_len];
    let detected = if head.starts_with(FILE_MAGIC) {
        Some(IpcFormat::File)
    } else if head.starts_with(&CONTINUATION_MARKER) {
        Some(IpcFormat::Stream)
    } else {
        None
    };
    match (forced, detected) {
        (Some(forced), Some(found)) if forced != found => Err(IpcFileError::FormatMismatch {
            forced: forced.as_str(),
            found: found.as_str(),
        }),
        // A forced stream may be one from before format 0.15, whose
        // messages have no continuation marker: the reader decides.
        (Some(IpcFormat::Stream), None) if !head.is_empty() => Ok(IpcFormat::Stream),
        (_, Some(found)) => Ok(found),
        (_, None) if head.is_empty() => Err(IpcFileError::NotArrowIpc {
            reason: "the file is empty",
        }),
        (_, None) => Err(IpcFileError::NotArrowIpc {
            reason: "it starts with neither the file magic ARROW1 nor a stream message",
        }),
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// A file-format file ends with its footer, the footer's length and the
/// magic. Returns the schema and the number of record batches.
fn read_footer(file: &mut File, file_bytes: u64) -> Result<(SchemaRef, usize), IpcFileError> {
    let truncated = IpcFileError::NotArrowIpc {
        reason: "it starts with ARROW1 but does not end with the file format's footer and \
                 ARROW1 (a truncated or unfinished file?)",
    };
    let damaged = |reason| IpcFileError::NotArrowIpc { reason };
    if file_bytes < FILE_HEAD_BYTES + FILE_TAIL_BYTES {
        return Err(truncated);
    }
    let mut tail = [0u8; FILE_TAIL_BYTES as usize];
    file.seek(SeekFrom::Start(file_bytes - FILE_TAIL_BYTES))?;
    file.read_exact(&mut tail)?;
    if &tail[4..] != FILE_MAGIC {
        return Err(truncated);
    }
    let footer_bytes = i32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let body_end = file_bytes - FILE_TAIL_BYTES;
    let footer_bytes = u64::try_from(footer_bytes)
        .ok()
        .filter(|n| *n > 0 && *n <= body_end - FILE_HEAD_BYTES)
        .ok_or(damaged(
            "its footer length does not fit the file (a damaged file?)",
        ))?;
    if footer_bytes > IPC_FOOTER_BYTES_MAX {
        return Err(IpcFileError::FooterTooLarge { footer_bytes });
    }
    let footer_start = body_end - footer_bytes;
    let mut footer = vec![0u8; footer_bytes as usize];
    file.seek(SeekFrom::Start(footer_start))?;
    file.read_exact(&mut footer)?;
    let footer = arrow_ipc::root_as_footer(&footer)
        .map_err(|_| damaged("its footer does not decode (a damaged file?)"))?;
    let schema = footer
        .schema()
        .ok_or(damaged("its footer holds no schema"))?;
    let schema = arrow_ipc::convert::try_fb_to_schema(schema).map_err(IpcFileError::Schema)?;
    let blocks = footer.recordBatches().into_iter().flatten();
    let dictionaries = footer.dictionaries().into_iter().flatten();
    let mut batch_count = 0;
    for (block, is_batch) in blocks
        .map(|b| (b, true))
        .chain(dictionaries.map(|b| (b, false)))
    {
        let end = u64::try_from(block.offset())
            .ok()
            .filter(|offset| *offset >= FILE_HEAD_BYTES)
            .and_then(|offset| {
                let metadata = u64::try_from(block.metaDataLength()).ok()?;
                let body = u64::try_from(block.bodyLength()).ok()?;
                offset.checked_add(metadata)?.checked_add(body)
            });
        if end.is_none_or(|end| end > footer_start) {
            return Err(damaged(
                "its footer places a record batch outside the file (a damaged file?)",
            ));
        }
        batch_count += usize::from(is_batch);
    }
    Ok((Arc::new(schema), batch_count))
}

/// Reads the schema of one IPC file (the footer's, or the stream's first
/// message).
fn read_ipc_file_schema(path: &Path, forced: Option<IpcFormat>) -> Result<SchemaRef, JobError> {
    match inspect_ipc(path, forced) {
        Ok(info) => Ok(info.schema),
        Err(source) => Err(JobError::IpcFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads the schema of the IPC files at `path` (a file or a directory) from
/// the first, and checks that every other file has the same columns.
pub fn read_ipc_schema(path: &Path, forced: Option<IpcFormat>) -> Result<SchemaRef, JobError> {
    let files = super::plan::data_files(path, &IPC_EXTENSIONS)?;
    let Some((first, rest)) = files.split_first() else {
        unreachable!("data_files never returns an empty list");
    };
    let schema = read_ipc_file_schema(first, forced)?;
    for other in rest {
        let found = read_ipc_file_schema(other, forced)?;
        if let Some(difference) = schema_difference(&schema, &found) {
            return Err(JobError::IpcSchemaMismatch {
                path: other.clone(),
                first: first.clone(),
                difference,
            });
        }
    }
    Ok(schema)
}

/// How a file's columns differ from those expected. Column names are not
/// quoted: they are the file's data, and an error reaches whoever submitted
/// the job (see `plan`'s redaction of data-file columns).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaDifference {
    #[error("it has {found} columns, not {expected}")]
    ColumnCount { found: usize, expected: usize },
    #[error("column {index} has another name")]
    Name { index: usize },
    #[error("column {index} is {found}, not {expected}")]
    Type {
        index: usize,
        found: DataType,
        expected: DataType,
    },
    #[error(
        "column {index} is {}nullable, not {}nullable",
        not(*.found_nullable),
        not(!*.found_nullable)
    )]
    Nullability { index: usize, found_nullable: bool },
}

fn not(nullable: bool) -> &'static str {
    if nullable { "" } else { "non-" }
}

/// The first way `found` differs from `expected` in column names, types or
/// nullability; `None` when it does not. Schema and field metadata are not
/// compared.
pub fn schema_difference(expected: &Schema, found: &Schema) -> Option<SchemaDifference> {
    let (expected, found) = (expected.fields(), found.fields());
    if expected.len() != found.len() {
        return Some(SchemaDifference::ColumnCount {
            found: found.len(),
            expected: expected.len(),
        });
    }
    expected
        .iter()
        .zip(found.iter())
        .enumerate()
        .find_map(|(index, (e, f))| {
            if e.name() != f.name() {
                Some(SchemaDifference::Name { index })
            } else if e.data_type() != f.data_type() {
                Some(SchemaDifference::Type {
                    index,
                    found: f.data_type().clone(),
                    expected: e.data_type().clone(),
                })
            } else if e.is_nullable() != f.is_nullable() {
                Some(SchemaDifference::Nullability {
                    index,
                    found_nullable: f.is_nullable(),
                })
            } else {
                None
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::Field;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))])
            .expect("batch")
    }

    fn write(path: &Path, format: IpcFormat) {
        let file = File::create(path).expect("create");
        let batch = batch();
        match format {
            IpcFormat::File => {
                let mut w =
                    arrow_ipc::writer::FileWriter::try_new(file, &batch.schema()).expect("writer");
                w.write(&batch).expect("write");
                w.finish().expect("finish");
            }
            IpcFormat::Stream => {
                let mut w = arrow_ipc::writer::StreamWriter::try_new(file, &batch.schema())
                    .expect("writer");
                w.write(&batch).expect("write");
                w.finish().expect("finish");
            }
        }
    }

    #[test]
    fn the_format_is_detected_from_the_magic_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        for format in [IpcFormat::File, IpcFormat::Stream] {
            // The extension does not matter, only the bytes.
            let path = dir.path().join(format!("x-{}.ipc", format.as_str()));
            write(&path, format);
            let info = inspect_ipc(&path, None).expect("inspect");
            assert_eq!(info.format, format);
            assert_eq!(info.schema.fields().len(), 1);
            let batch_count = (format == IpcFormat::File).then_some(1);
            assert_eq!(info.batch_count, batch_count);
            let forced = inspect_ipc(&path, Some(format)).expect("inspect");
            assert_eq!(forced.format, format);
        }
    }

    #[test]
    fn a_forced_format_that_the_file_does_not_have_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.arrow");
        write(&path, IpcFormat::File);
        let error = inspect_ipc(&path, Some(IpcFormat::Stream)).expect_err("mismatch");
        assert!(
            matches!(
                error,
                IpcFileError::FormatMismatch {
                    forced: "stream",
                    found: "file"
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn text_empty_and_truncated_files_are_not_arrow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("a.arrow");
        std::fs::write(&text, "key,value\n1,2\n").expect("write");
        let empty = dir.path().join("b.arrow");
        std::fs::write(&empty, "").expect("write");
        let truncated = dir.path().join("c.arrow");
        write(&truncated, IpcFormat::File);
        let bytes = std::fs::read(&truncated).expect("read");
        std::fs::write(&truncated, &bytes[..bytes.len() - 3]).expect("write");
        let mut damaged = bytes.clone();
        let at = damaged.len() - 10;
        damaged[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        let huge_footer = dir.path().join("d.arrow");
        std::fs::write(&huge_footer, damaged).expect("write");
        for (path, fragment) in [
            (&text, "neither"),
            (&empty, "empty"),
            (&truncated, "truncated"),
            (&huge_footer, "footer length"),
        ] {
            let error = inspect_ipc(path, None).expect_err("not arrow");
            assert!(matches!(error, IpcFileError::NotArrowIpc { .. }), "{error}");
            assert!(error.to_string().contains(fragment), "{error}");
        }
    }

    #[test]
    fn schema_differences_name_the_column_by_index_only() {
        let base = Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Utf8, true),
        ]);
        let with = |fields: Vec<Field>| Schema::new(fields);
        assert_eq!(schema_difference(&base, &base), None);
        let metadata = base
            .clone()
            .with_metadata(std::collections::HashMap::from([(
                "pandas".to_owned(),
                "{}".to_owned(),
            )]));
        assert_eq!(schema_difference(&base, &metadata), None);
        let cases = [
            (
                with(vec![Field::new("a", DataType::Int64, false)]),
                SchemaDifference::ColumnCount {
                    found: 1,
                    expected: 2,
                },
            ),
            (
                with(vec![
                    Field::new("a", DataType::Int64, false),
                    Field::new("secret", DataType::Utf8, true),
                ]),
                SchemaDifference::Name { index: 1 },
            ),
            (
                with(vec![
                    Field::new("a", DataType::Int32, false),
                    Field::new("b", DataType::Utf8, true),
                ]),
                SchemaDifference::Type {
                    index: 0,
                    found: DataType::Int32,
                    expected: DataType::Int64,
                },
            ),
            (
                with(vec![
                    Field::new("a", DataType::Int64, true),
                    Field::new("b", DataType::Utf8, true),
                ]),
                SchemaDifference::Nullability {
                    index: 0,
                    found_nullable: true,
                },
            ),
        ];
        for (found, expected) in cases {
            let difference = schema_difference(&base, &found);
            assert_eq!(difference.as_ref(), Some(&expected));
            assert!(!expected.to_string().contains("secret"), "{expected}");
        }
        assert_eq!(
            SchemaDifference::Nullability {
                index: 0,
                found_nullable: true
            }
            .to_string(),
            "column 0 is nullable, not non-nullable"
        );
    }
}
