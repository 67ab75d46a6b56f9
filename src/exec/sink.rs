//! Sinks: blackhole, print, and CSV, Parquet and Arrow IPC files.
//!
//! Without checkpointing, file sinks write `part-<subtask>.<ext>` in the
//! sink's directory ([`part_sink`]), or, when they roll at
//! `target_file_bytes`, `part-<subtask>-<n>.<ext>` for `n = 0, 1, …`. A part
//! file is written under a hidden in-progress name and renamed when the task
//! finishes. A sink dropped before that (the task failed, panicked or was
//! canceled) removes its in-progress files, so a failed run leaves no
//! partial part file, hidden or not.
//!
//! With checkpointing, file sinks are exactly-once ([`two_phase`]): they roll
//! a new part file `part-<subtask>-<seq>.<ext>` at each checkpoint and commit
//! it when the checkpoint completes. Their rule for leftovers differs: files
//! staged for a checkpoint stay, since restoring that checkpoint needs them.
//!
//! What a sink finds in its directory when the job starts is decided once
//! per job, at submission, by the sink's `mode` ([`output`]).
//!
//! Both kinds of file sink write through a [`format::PartFormat`]: CSV,
//! Parquet (row groups of `row_group_rows`) or Arrow IPC (file or stream
//! framing, LZ4 or not). Parquet part files carry a CRC in every page header
//! ([`page_checksums`]), which the Parquet source verifies.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::RecordBatch;
use arrow_cast::display::{ArrayFormatter, FormatOptions};

use super::ExecError;
use super::operators::{Operator, Output};

pub mod flight;
pub mod format;
pub mod output;
pub mod page_checksums;
pub mod part_sink;
#[cfg(test)]
mod tests;
pub mod two_phase;

pub use format::{CsvPart, IpcPart, ParquetPart, PartFiles, PartFormat};
pub use part_sink::{ArrowIpcSink, CsvSink, ParquetSink, PartFileSink};
pub use two_phase::{TwoPhaseCsvSink, TwoPhaseFileSink, TwoPhaseIpcSink, TwoPhaseParquetSink};

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

/// A part file of a sink without checkpoints, under its in-progress name
/// until it is committed.
struct PartFile {
    final_path: PathBuf,
    temp_path: PathBuf,
    /// What to remove on drop: the in-progress file until it is committed.
    guard: Option<PartGuard>,
}

/// Which file an uncommitted part's in-progress name named.
#[derive(Clone, Copy, Debug)]
enum PartGuard {
    /// Being written: the writer holds it open.
    Open(FileIdentity),
    /// Closed at `target_file_bytes`, waiting for the task to finish.
    Closed(ClosedFile),
}

impl PartFile {
    /// Creates `.<stem>.<extension>.inprogress` in `dir`, to be committed
    /// as `<stem>.<extension>`.
    fn create(dir: &Path, stem: &str, extension: &str) -> Result<(Self, File), ExecError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let final_path = dir.join(format!("{stem}.{extension}"));
        let temp_path = dir.join(format!(".{stem}.{extension}.inprogress"));
        let (file, identity) = create_fresh(&temp_path)?;
        Ok((
            Self {
                final_path,
                temp_path,
                guard: Some(PartGuard::Open(identity)),
            },
            file,
        ))
    }

    /// The part's writer closed `file`, which the in-progress name now names.
    fn closed(&mut self, file: &File) -> Result<(), ExecError> {
        let closed = ClosedFile::of(file).map_err(|e| io_error(&self.temp_path, e))?;
        self.guard = Some(PartGuard::Closed(closed));
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ExecError> {
        std::fs::rename(&self.temp_path, &self.final_path)
            .map_err(|e| io_error(&self.final_path, e))?;
        // Committed: there is nothing left to remove on drop.
        self.guard = None;
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        // Not committed: the task failed or was canceled; drop the partial.
        // The writer that holds an open file is dropped after this, so the
        // file's identity cannot have been reused by another file.
        match self.guard {
            Some(PartGuard::Open(identity)) => remove_if_same_file(&self.temp_path, identity),
            Some(PartGuard::Closed(closed)) => remove_if_same_closed_file(&self.temp_path, closed),
            None => {}
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

/// A part file that its writer has closed: which file it is, and its length.
/// Nothing holds it open any more, so once a later attempt unlinks it (to
/// reuse its name) its inode number may be reused too; the length makes
/// taking that later file for it as unlikely as the two agreeing to the byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ClosedFile {
    identity: FileIdentity,
    len_bytes: u64,
}

impl ClosedFile {
    pub(super) fn of(file: &File) -> std::io::Result<Self> {
        let metadata = file.metadata()?;
        Ok(Self {
            identity: FileIdentity::of(&metadata),
            len_bytes: metadata.len(),
        })
    }
}

/// Removes `path` if it still names the closed file `closed`. Best effort:
/// it runs on drop.
pub(super) fn remove_if_same_closed_file(path: &Path, closed: ClosedFile) {
    let same = std::fs::symlink_metadata(path)
        .is_ok_and(|m| FileIdentity::of(&m) == closed.identity && m.len() == closed.len_bytes);
    if same {
        remove_unfinished(path);
    }
}

/// Removes `path` if it still names the file with `identity`, and not a
/// later attempt's file of the same name. Best effort: it runs on drop.
pub(super) fn remove_if_same_file(path: &Path, identity: FileIdentity) {
    let same = std::fs::symlink_metadata(path).is_ok_and(|m| FileIdentity::of(&m) == identity);
    if same {
        remove_unfinished(path);
    }
}

fn remove_unfinished(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
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
