//! The file formats the file sinks write, behind one trait: CSV, Parquet
//! and Arrow IPC (file or stream framing).
//!
//! A format is a value, not only a type, because its options come from the
//! job file: Parquet's rows per row group, the IPC framing and compression.
//! Both kinds of file sink ([`super::part_sink`] without checkpoints,
//! [`super::two_phase`] with them) drive a format the same way: create a
//! writer over a fresh file, write batches, ask how large the file has
//! grown (to roll at `target_file_bytes`), and close it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_ipc::writer::{FileWriter, IpcWriteOptions, StreamWriter};
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;

use crate::job::{IpcCompression, IpcFormat, ROW_GROUP_ROWS_DEFAULT};

/// Bytes a sink's writer buffers before it writes to its file.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// How a file sink writes its part files: in which format, and when a part
/// file is full.
#[derive(Clone, Copy, Debug, Default)]
pub struct PartFiles<F> {
    pub format: F,
    /// Close a part file once [`PartFormat::size_bytes`] reaches this and
    /// write on into the next; `None`: never on size.
    pub target_file_bytes: Option<u64>,
}

/// A file format a file sink writes.
pub trait PartFormat: Send + 'static {
    type Writer: Send;
    /// The committed file's extension.
    fn extension(&self) -> &'static str;
    fn create(&self, file: File, schema: &SchemaRef) -> Result<Self::Writer, String>;
    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String>;
    /// The bytes the file would hold if it were closed now, as far as the
    /// writer knows (estimated for what it has buffered but not encoded);
    /// `None` when the format cannot tell, and then its files never roll.
    fn size_bytes(writer: &Self::Writer) -> Option<u64>;
    /// Completes the file at `path` (buffers, footer) and hands it back for
    /// the fsync.
    fn close(writer: Self::Writer, schema: &SchemaRef, path: &Path) -> Result<File, String>;
}

/// CSV part files, each with its header.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsvPart;

impl PartFormat for CsvPart {
    type Writer = arrow_csv::Writer<BufWriter<File>>;

    fn extension(&self) -> &'static str {
        "csv"
    }

    fn create(&self, file: File, _schema: &SchemaRef) -> Result<Self::Writer, String> {
        Ok(arrow_csv::WriterBuilder::new()
            .with_header(true)
            .build(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file)))
    }

    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String> {
        writer.write(batch).map_err(|e| e.to_string())
    }

    fn size_bytes(_writer: &Self::Writer) -> Option<u64> {
        // arrow-csv's writer does not lend its inner writer; the job file
        // offers no target_file_bytes for CSV.
        None
    }

    fn close(mut writer: Self::Writer, schema: &SchemaRef, _path: &Path) -> Result<File, String> {
        // Writes the header if no row did (an empty subtask's only file).
        writer
            .write(&RecordBatch::new_empty(Arc::clone(schema)))
            .map_err(|e| e.to_string())?;
        let mut buffered = writer.into_inner();
        buffered.flush().map_err(|e| e.to_string())?;
        buffered.into_inner().map_err(|e| e.to_string())
    }
}

/// Parquet part files: one `ArrowWriter` per file, with a CRC in every page
/// header once closed ([`super::page_checksums`]).
#[derive(Clone, Copy, Debug)]
pub struct ParquetPart {
    /// Rows per row group; the writer splits batches to keep to it, so
    /// every row group but a file's last holds exactly this many.
    pub row_group_rows: usize,
}

impl Default for ParquetPart {
    fn default() -> Self {
        Self {
            row_group_rows: ROW_GROUP_ROWS_DEFAULT,
        }
    }
}

impl PartFormat for ParquetPart {
    type Writer = ArrowWriter<File>;

    fn extension(&self) -> &'static str {
        "parquet"
    }

    fn create(&self, file: File, schema: &SchemaRef) -> Result<Self::Writer, String> {
        let properties = super::page_checksums::sink_writer_properties(self.row_group_rows);
        ArrowWriter::try_new(file, Arc::clone(schema), Some(properties)).map_err(|e| e.to_string())
    }

    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String> {
        writer.write(batch).map_err(|e| e.to_string())
    }

    fn size_bytes(writer: &Self::Writer) -> Option<u64> {
        // Row groups written, plus the encoded size the open row group is
        // expected to have; the footer is left out (it is small).
        let bytes = writer.bytes_written() + writer.in_progress_size();
        Some(u64::try_from(bytes).unwrap_or(u64::MAX))
    }

    fn close(writer: Self::Writer, _schema: &SchemaRef, path: &Path) -> Result<File, String> {
        // `into_inner` flushes the last row group and writes the footer.
        drop(writer.into_inner().map_err(|e| e.to_string())?);
        super::page_checksums::add_page_checksums(path)?;
        // The copy replaced the file at `path`: hand back the new one.
        File::open(path).map_err(|e| e.to_string())
    }
}

/// Arrow IPC part files, in the file (`.arrow`) or stream (`.arrows`)
/// framing, their buffers LZ4-compressed or not.
#[derive(Clone, Copy, Debug, Default)]
pub struct IpcPart {
    pub format: IpcFormat,
    pub compression: IpcCompression,
}

/// Counts the bytes written through it: an IPC writer's file size so far.
pub struct CountingWriter<W> {
    inner: W,
    bytes_written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes_written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type IpcTarget = CountingWriter<BufWriter<File>>;

/// An IPC part file's writer, in either framing.
pub enum IpcWriter {
    File(FileWriter<IpcTarget>),
    Stream(StreamWriter<IpcTarget>),
}

impl IpcPart {
    fn options(&self) -> Result<IpcWriteOptions, String> {
        let compression = match self.compression {
            IpcCompression::None => None,
            IpcCompression::Lz4 => Some(arrow_ipc::CompressionType::LZ4_FRAME),
        };
        IpcWriteOptions::default()
            .try_with_compression(compression)
            .map_err(|e| e.to_string())
    }
}

impl PartFormat for IpcPart {
    type Writer = IpcWriter;

    fn extension(&self) -> &'static str {
        self.format.extension()
    }

    fn create(&self, file: File, schema: &SchemaRef) -> Result<Self::Writer, String> {
        let target = CountingWriter {
            inner: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
            bytes_written: 0,
        };
        let options = self.options()?;
        let writer = match self.format {
            IpcFormat::File => {
                FileWriter::try_new_with_options(target, schema, options).map(IpcWriter::File)
            }
            IpcFormat::Stream => {
                StreamWriter::try_new_with_options(target, schema, options).map(IpcWriter::Stream)
            }
        };
        writer.map_err(|e| e.to_string())
    }

    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String> {
        let written = match writer {
            IpcWriter::File(w) => w.write(batch),
            IpcWriter::Stream(w) => w.write(batch),
        };
        written.map_err(|e| e.to_string())
    }

    fn size_bytes(writer: &Self::Writer) -> Option<u64> {
        let target = match writer {
            IpcWriter::File(w) => w.get_ref(),
            IpcWriter::Stream(w) => w.get_ref(),
        };
        Some(target.bytes_written)
    }

    fn close(writer: Self::Writer, _schema: &SchemaRef, _path: &Path) -> Result<File, String> {
        // `into_inner` writes the footer (file) or the end-of-stream
        // marker (stream) and flushes.
        let target = match writer {
            IpcWriter::File(w) => w.into_inner(),
            IpcWriter::Stream(w) => w.into_inner(),
        };
        let target = target.map_err(|e| e.to_string())?;
        target.inner.into_inner().map_err(|e| e.to_string())
    }
}
