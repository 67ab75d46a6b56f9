//! Sinks: blackhole, print, CSV and Parquet files.
//!
//! Without checkpointing, file sinks write `part-<subtask>.<ext>` in the
//! sink's directory. A part file is written under a hidden in-progress name
//! and renamed when the task finishes. A sink dropped before that (the task
//! failed, panicked or was canceled) removes its in-progress file, so a
//! failed run leaves no partial part file, hidden or not.
//!
//! With checkpointing, file sinks are exactly-once ([`two_phase`]): they roll
//! a new part file `part-<subtask>-<seq>.<ext>` at each checkpoint and commit
//! it when the checkpoint completes. Their rule for leftovers differs: files
//! staged for a checkpoint stay, since restoring that checkpoint needs them.
//!
//! What a sink finds in its directory when the job starts is decided once
//! per job, at submission, by the sink's `mode` ([`output`]).
//!
//! Parquet part files carry a CRC in every page header
//! ([`page_checksums`]), which the Parquet source verifies.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::RecordBatch;
use arrow_cast::display::{ArrayFormatter, FormatOptions};
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;

use super::ExecError;
use super::operators::{Operator, Output};

pub mod flight;
pub mod output;
pub mod page_checksums;
#[cfg(test)]
mod tests;
pub mod two_phase;

pub use two_phase::{TwoPhaseCsvSink, TwoPhaseFileSink, TwoPhaseParquetSink};

/// Counts rows and drops them.
#[derive(Default)]
pub struct BlackholeSink;

impl Operator for BlackholeSink {
    fn process(&mut self, _batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }
    fn watermark(&mut self, _w: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }
}

/// Prints rows to standard output as Flink does: `<subtask>> +I[a, b, c]`.
pub struct PrintSink {
    prefix: String,
    limit: Option<u64>,
    printed: Arc<AtomicU64>,
}

impl PrintSink {
    /// `printed` is shared by all subtasks so that `limit` is job-wide.
    pub fn new(
        subtask: u32,
        parallelism: u32,
        limit: Option<u64>,
        printed: Arc<AtomicU64>,
    ) -> Self {
        let prefix = if parallelism > 1 {
            format!("{}> ", subtask + 1)
        } else {
            String::new()
        };
        Self {
            prefix,
            limit,
            printed,
        }
    }
}

impl Operator for PrintSink {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        let options = FormatOptions::default().with_null("null");
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        for row in 0..batch.num_rows() {
            if let Some(limit) = self.limit
                && self.printed.fetch_add(1, Ordering::Relaxed) >= limit
            {
                return Ok(());
            }
            let cells: Vec<String> = formatters
                .iter()
                .map(|f| f.value(row).to_string())
                .collect();
            // A closed stdout (e.g. `| head`) must not fail the job.
            let _ = writeln!(w, "{}+I[{}]", self.prefix, cells.join(", "));
        }
        Ok(())
    }
    fn watermark(&mut self, _w: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }
}

/// A part file being written under an in-progress name.
struct PartFile {
    final_path: PathBuf,
    temp_path: PathBuf,
    /// The in-progress file until it is committed.
    identity: Option<FileIdentity>,
}

impl PartFile {
    fn create(dir: &Path, subtask: u32, extension: &str) -> Result<(Self, File), ExecError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let final_path = dir.join(format!("part-{subtask}.{extension}"));
        let temp_path = dir.join(format!(".part-{subtask}.{extension}.inprogress"));
        let (file, identity) = create_fresh(&temp_path)?;
        Ok((
            Self {
                final_path,
                temp_path,
                identity: Some(identity),
            },
            file,
        ))
    }

    fn commit(&mut self) -> Result<(), ExecError> {
        std::fs::rename(&self.temp_path, &self.final_path)
            .map_err(|e| io_error(&self.final_path, e))?;
        // Committed: there is nothing left to remove on drop.
        self.identity = None;
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        // Not committed: the task failed or was canceled; drop the partial.
        // The writer that holds the file open is dropped after this, so the
        // file's identity cannot have been reused by another file.
        if let Some(identity) = self.identity {
            remove_if_same_file(&self.temp_path, identity);
        }
    }
}

/// The device and inode of a file: which file a path names right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            device: metadata.dev(),
            inode: metadata.ino(),
        }
    }
}

/// Creates `path` as a new file, replacing (not truncating) whatever was
/// there: a failed earlier attempt of the same subtask may still hold the
/// old file open, and must not find its name on this attempt's file.
pub(super) fn create_fresh(path: &Path) -> Result<(File, FileIdentity), ExecError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, e)),
    }
    let file = File::create_new(path).map_err(|e| io_error(path, e))?;
    let identity = FileIdentity::of(&file.metadata().map_err(|e| io_error(path, e))?);
    Ok((file, identity))
}

/// Removes `path` if it still names the file with `identity`, and not a
/// later attempt's file of the same name. Best effort: it runs on drop.
pub(super) fn remove_if_same_file(path: &Path, identity: FileIdentity) {
    let same = std::fs::symlink_metadata(path).is_ok_and(|m| FileIdentity::of(&m) == identity);
    if same && let Err(e) = std::fs::remove_file(path) {
        let path = path.display();
        tracing::warn!(%path, error = %e, "could not remove an unfinished part file");
    }
}

fn io_error(path: &Path, source: std::io::Error) -> ExecError {
    ExecError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct CsvSink {
    part: PartFile,
    writer: Option<arrow_csv::Writer<BufWriter<File>>>,
    schema: SchemaRef,
}

impl CsvSink {
    pub fn new(dir: &Path, subtask: u32, schema: SchemaRef) -> Result<Self, ExecError> {
        let (part, file) = PartFile::create(dir, subtask, "csv")?;
        let writer = arrow_csv::WriterBuilder::new()
            .with_header(true)
            .build(BufWriter::with_capacity(1 << 20, file));
        Ok(Self {
            part,
            writer: Some(writer),
            schema,
        })
    }
}

impl Operator for CsvSink {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        if let Some(w) = &mut self.writer {
            w.write(&batch).map_err(|e| ExecError::Write {
                path: self.part.final_path.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }
    fn watermark(&mut self, _w: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }
    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        let path = self.part.final_path.clone();
        let werr = |detail: String| ExecError::Write {
            path: path.clone(),
            detail,
        };
        if let Some(mut w) = self.writer.take() {
            // An empty part still carries the header.
            w.write(&RecordBatch::new_empty(Arc::clone(&self.schema)))
                .map_err(|e| werr(e.to_string()))?;
            let mut inner = w.into_inner();
            inner.flush().map_err(|e| werr(e.to_string()))?;
            inner
                .into_inner()
                .map_err(|e| werr(e.to_string()))?
                .sync_all()
                .map_err(|e| werr(e.to_string()))?;
        }
        self.part.commit()
    }
}

pub struct ParquetSink {
    part: PartFile,
    writer: Option<ArrowWriter<File>>,
}

impl ParquetSink {
    pub fn new(dir: &Path, subtask: u32, schema: SchemaRef) -> Result<Self, ExecError> {
        let (part, file) = PartFile::create(dir, subtask, "parquet")?;
        let properties = page_checksums::sink_writer_properties();
        let writer =
            ArrowWriter::try_new(file, schema, Some(properties)).map_err(|e| ExecError::Write {
                path: part.final_path.clone(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            part,
            writer: Some(writer),
        })
    }
}

impl Operator for ParquetSink {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        if let Some(w) = &mut self.writer {
            w.write(&batch).map_err(|e| ExecError::Write {
                path: self.part.final_path.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }
    fn watermark(&mut self, _w: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }
    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        let werr = |detail: String| ExecError::Write {
            path: self.part.final_path.clone(),
            detail,
        };
        if let Some(w) = self.writer.take() {
            w.close().map_err(|e| werr(e.to_string()))?;
            page_checksums::add_page_checksums(&self.part.temp_path).map_err(werr)?;
            // The copy replaced the in-progress file: follow it.
            let metadata = std::fs::symlink_metadata(&self.part.temp_path)
                .map_err(|e| io_error(&self.part.temp_path, e))?;
            self.part.identity = Some(FileIdentity::of(&metadata));
        }
        self.part.commit()
    }
}
