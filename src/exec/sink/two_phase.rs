//! Exactly-once file sinks: a two-phase commit per checkpoint (Flink's
//! `FileSink`).
//!
//! With checkpointing on, a file sink subtask writes a sequence of part
//! files, each passing through three names in its directory:
//!
//! - `.part-<subtask>-<seq>.<ext>.inprogress` while rows are written to it,
//! - `.part-<subtask>-<seq>.<ext>.pending` once staged (pre-committed) by a
//!   checkpoint's barrier: closed, fsynced, waiting for that checkpoint to
//!   complete,
//! - `part-<subtask>-<seq>.<ext>` once committed, when the checkpoint it was
//!   staged for completed.
//!
//! Readers treat hidden files as absent, so the visible output is always the
//! rows up to a completed checkpoint, never more.
//!
//! Invariants:
//!
//! - `next_seq` only grows while a sink runs, and every file it names with
//!   `seq >= next_seq` is younger than the state that holds that `next_seq`.
//!   A restore from a checkpoint therefore deletes every file of the subtask
//!   with `seq >= next_seq`, whatever its stage: committed files too, because
//!   a newer checkpoint may have committed them before the job fell back to
//!   an older one. The source replays those rows into the same sequence
//!   numbers, so the committed output equals an uninterrupted run's.
//! - Every pending file that a checkpoint's state lists holds rows from
//!   before that checkpoint's barrier, so restoring that checkpoint commits
//!   it (the checkpoint completed by definition; the notification may have
//!   been lost in the failure). Committing is a rename, so it is idempotent.
//! - A part file is opened on the first row after a roll, so a checkpoint
//!   with no new rows stages nothing and no empty files pile up; only a
//!   subtask that never produced a file writes an empty one at the end, so
//!   every subtask yields at least one file (a CSV file with its header).
//! - Dropping a sink commits nothing: its pending files stay for the next
//!   restore to commit or delete, because a checkpoint may list them (the
//!   rule for leftovers of a failed or canceled run: what a checkpoint may
//!   refer to stays, nothing else does). The open in-progress file, which no
//!   checkpoint refers to, is removed on drop, unless its name already
//!   belongs to a later attempt's file (checked by inode, while the dropped
//!   writer still holds its own file open, so the inode cannot be reused).
//!
//! File names are matched strictly (`part-1-…` is never subtask 11's, the
//! non-checkpointed `part-<subtask>.<ext>` never matches), so a restore only
//! ever deletes this subtask's own part files.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;

use super::{FileIdentity, create_fresh, remove_if_same_file};
use crate::exec::ExecError;
use crate::exec::operators::{FINAL_CHECKPOINT, Operator, Output};

/// A file format a two-phase sink writes.
pub trait PartFormat: 'static {
    type Writer: Send;
    /// The committed file's extension.
    const EXTENSION: &'static str;
    fn create(file: File, schema: &SchemaRef) -> Result<Self::Writer, String>;
    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String>;
    /// Completes the file at `path` (buffers, footer) and hands it back for
    /// the fsync.
    fn close(writer: Self::Writer, schema: &SchemaRef, path: &Path) -> Result<File, String>;
}

/// CSV part files, each with its header.
pub struct CsvPart;

impl PartFormat for CsvPart {
    type Writer = arrow_csv::Writer<BufWriter<File>>;
    const EXTENSION: &'static str = "csv";

    fn create(file: File, _schema: &SchemaRef) -> Result<Self::Writer, String> {
        Ok(arrow_csv::WriterBuilder::new()
            .with_header(true)
            .build(BufWriter::with_capacity(1 << 20, file)))
    }

    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String> {
        writer.write(batch).map_err(|e| e.to_string())
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

/// Parquet part files: one `ArrowWriter` per file, closed on roll.
pub struct ParquetPart;

impl PartFormat for ParquetPart {
    type Writer = ArrowWriter<File>;
    const EXTENSION: &'static str = "parquet";

    fn create(file: File, schema: &SchemaRef) -> Result<Self::Writer, String> {
        let properties = super::page_checksums::sink_writer_properties();
        ArrowWriter::try_new(file, Arc::clone(schema), Some(properties)).map_err(|e| e.to_string())
    }

    fn write(writer: &mut Self::Writer, batch: &RecordBatch) -> Result<(), String> {
        writer.write(batch).map_err(|e| e.to_string())
    }

    fn close(writer: Self::Writer, _schema: &SchemaRef, path: &Path) -> Result<File, String> {
        // `into_inner` flushes the last row group and writes the footer.
        drop(writer.into_inner().map_err(|e| e.to_string())?);
        super::page_checksums::add_page_checksums(path)?;
        File::open(path).map_err(|e| e.to_string())
    }
}

/// The stage of a part file, encoded in its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PartStage {
    InProgress,
    Pending,
    Committed,
}

/// A two-phase sink's part file name, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PartName {
    pub(super) subtask: u32,
    pub(super) seq: u64,
    pub(super) stage: PartStage,
}

impl PartName {
    pub(super) fn file_name(&self, extension: &str) -> String {
        let (subtask, seq) = (self.subtask, self.seq);
        match self.stage {
            PartStage::InProgress => format!(".part-{subtask}-{seq}.{extension}.inprogress"),
            PartStage::Pending => format!(".part-{subtask}-{seq}.{extension}.pending"),
            PartStage::Committed => format!("part-{subtask}-{seq}.{extension}"),
        }
    }

    /// The inverse of [`PartName::file_name`]; `None` for any other name,
    /// including non-canonical numbers (`part-01-0.csv`), so that a name
    /// parses exactly when `file_name` could have produced it.
    pub(super) fn parse(name: &str, extension: &str) -> Option<Self> {
        let (stage, stem) = match name.strip_prefix('.') {
            Some(hidden) => {
                if let Some(stem) = hidden.strip_suffix(".pending") {
                    (PartStage::Pending, stem)
                } else {
                    (PartStage::InProgress, hidden.strip_suffix(".inprogress")?)
                }
            }
            None => (PartStage::Committed, name),
        };
        let numbers = stem
            .strip_prefix("part-")?
            .strip_suffix(extension)?
            .strip_suffix('.')?;
        let (subtask, seq) = numbers.split_once('-')?;
        Some(Self {
            subtask: parse_canonical(subtask)?,
            seq: parse_canonical(seq)?,
            stage,
        })
    }
}

/// A decimal number exactly as `Display` writes it: no sign, no leading
/// zeros.
fn parse_canonical<T: std::str::FromStr + ToString>(text: &str) -> Option<T> {
    let n: T = text.parse().ok()?;
    (n.to_string() == text).then_some(n)
}

/// A part file staged for a checkpoint, waiting for it to complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PendingPart {
    seq: u64,
    checkpoint: u64,
}

/// What a two-phase sink checkpoints.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SinkState {
    subtask: u32,
    /// The first sequence number not used before the checkpoint.
    next_seq: u64,
    /// Staged and not yet committed when the checkpoint was taken.
    pending: Vec<PendingPart>,
}

/// The part file being written.
struct InProgress<W> {
    seq: u64,
    writer: W,
    /// Which file the in-progress name named when it was opened.
    identity: FileIdentity,
}

/// An exactly-once file sink subtask; see the module documentation.
pub struct TwoPhaseFileSink<F: PartFormat> {
    name: String,
    dir: PathBuf,
    subtask: u32,
    schema: SchemaRef,
    /// The sequence number of the next part file (the open one, if any).
    next_seq: u64,
    /// Opened on the first row after a roll, so it always has rows, except
    /// for an empty subtask's file that `finish` writes.
    in_progress: Option<InProgress<F::Writer>>,
    /// Staged parts, in staging order, so by checkpoint.
    pending: Vec<PendingPart>,
    /// `restore_state` ran: until then the files of an earlier attempt in
    /// the directory are not sorted out, so writing would mix with them.
    restored: bool,
    format: PhantomData<fn() -> F>,
}

/// The exactly-once CSV sink.
pub type TwoPhaseCsvSink = TwoPhaseFileSink<CsvPart>;
/// The exactly-once Parquet sink.
pub type TwoPhaseParquetSink = TwoPhaseFileSink<ParquetPart>;

impl<F: PartFormat> TwoPhaseFileSink<F> {
    /// `name` is the operator's, for errors. Creates `dir`; touches no file
    /// until `restore_state`.
    pub fn new(name: &str, dir: &Path, subtask: u32, schema: SchemaRef) -> Result<Self, ExecError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        Ok(Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            subtask,
            schema,
            next_seq: 0,
            in_progress: None,
            pending: Vec::new(),
            restored: false,
            format: PhantomData,
        })
    }

    fn path(&self, seq: u64, stage: PartStage) -> PathBuf {
        let name = PartName {
            subtask: self.subtask,
            seq,
            stage,
        };
        self.dir.join(name.file_name(F::EXTENSION))
    }

    fn state_error(&self, detail: String) -> ExecError {
        ExecError::State {
            operator: self.name.clone(),
            detail,
        }
    }

    fn check_restored(&self) -> Result<(), ExecError> {
        if self.restored {
            return Ok(());
        }
        Err(self.state_error(
            "restore_state was not called before the first input: an exactly-once file sink \
             must sort out an earlier attempt's files before it writes"
                .into(),
        ))
    }

    /// Opens part `next_seq` under its in-progress name.
    fn open_part(&mut self) -> Result<&mut InProgress<F::Writer>, ExecError> {
        assert!(self.in_progress.is_none(), "a part file is already open");
        let seq = self.next_seq;
        let path = self.path(seq, PartStage::InProgress);
        let (file, identity) = create_fresh(&path)?;
        let writer = F::create(file, &self.schema).map_err(|e| write_error(&path, e))?;
        Ok(self.in_progress.insert(InProgress {
            seq,
            writer,
            identity,
        }))
    }

    /// Closes the open part, makes it durable and renames it to pending,
    /// staged for `checkpoint`.
    fn stage(&mut self, checkpoint: u64) -> Result<(), ExecError> {
        let part = self.in_progress.take().expect("stage needs an open part");
        assert_eq!(part.seq, self.next_seq);
        assert!(
            self.pending
                .last()
                .is_none_or(|p| p.checkpoint <= checkpoint),
            "checkpoints are staged in order"
        );
        let source = self.path(part.seq, PartStage::InProgress);
        let file =
            F::close(part.writer, &self.schema, &source).map_err(|e| write_error(&source, e))?;
        file.sync_all().map_err(|e| io_error(&source, e))?;
        drop(file);
        let target = self.path(part.seq, PartStage::Pending);
        std::fs::rename(&source, &target).map_err(|e| io_error(&target, e))?;
        sync_dir(&self.dir)?;
        self.pending.push(PendingPart {
            seq: part.seq,
            checkpoint,
        });
        self.next_seq += 1;
        Ok(())
    }

    /// Renames a pending part to its committed name. Idempotent: a part
    /// already committed (by an attempt that failed after the rename) is
    /// fine; a part found under neither name is lost output, an error.
    fn commit(&self, seq: u64) -> Result<(), ExecError> {
        let source = self.path(seq, PartStage::Pending);
        let target = self.path(seq, PartStage::Committed);
        match std::fs::rename(&source, &target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && target.is_file() => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.state_error(format!(
                "{} was staged for a completed checkpoint but is gone, and {} does not exist",
                source.display(),
                target.display()
            ))),
            Err(e) => Err(io_error(&target, e)),
        }
    }

    /// This subtask's part files in the directory, by parsed name.
    fn own_parts(&self) -> Result<Vec<(PartName, PathBuf)>, ExecError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        let mut parts = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&self.dir, e))?;
            let file_name = entry.file_name();
            let Some(part) = file_name
                .to_str()
                .and_then(|n| PartName::parse(n, F::EXTENSION))
            else {
                continue;
            };
            if part.subtask == self.subtask {
                parts.push((part, entry.path()));
            }
        }
        Ok(parts)
    }

    /// Deletes this subtask's part files that `doomed` selects.
    fn delete_parts(&self, doomed: impl Fn(&PartName) -> bool) -> Result<(), ExecError> {
        for (part, path) in self.own_parts()? {
            if doomed(&part) {
                std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
            }
        }
        Ok(())
    }

    fn restore_from(&mut self, bytes: &[u8]) -> Result<(), ExecError> {
        let state: SinkState = serde_json::from_slice(bytes)
            .map_err(|e| self.state_error(format!("sink state is unreadable: {e}")))?;
        if state.subtask != self.subtask {
            return Err(self.state_error(format!(
                "the checkpointed sink state belongs to subtask {}, not {}",
                state.subtask, self.subtask
            )));
        }
        if let Some(part) = state.pending.iter().find(|p| p.seq >= state.next_seq) {
            return Err(self.state_error(format!(
                "the checkpointed sink state lists part {} as staged, past its next part {}",
                part.seq, state.next_seq
            )));
        }
        for part in &state.pending {
            self.commit(part.seq)?;
        }
        let next_seq = state.next_seq;
        self.delete_parts(|p| p.seq >= next_seq || p.stage == PartStage::InProgress)?;
        self.next_seq = next_seq;
        Ok(())
    }
}

impl<F: PartFormat> Operator for TwoPhaseFileSink<F> {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        self.check_restored()?;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let part = match self.in_progress.as_mut() {
            Some(part) => part,
            None => self.open_part()?,
        };
        let seq = part.seq;
        F::write(&mut part.writer, &batch)
            .map_err(|e| write_error(&self.path(seq, PartStage::InProgress), e))
    }

    fn watermark(&mut self, _w: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        self.check_restored()?;
        if self.in_progress.is_none() && self.next_seq == 0 {
            // Like the non-checkpointed sink, every subtask yields a file.
            self.open_part()?;
        }
        if self.in_progress.is_some() {
            self.stage(FINAL_CHECKPOINT)?;
        }
        Ok(())
    }

    fn snapshot_state(&mut self, checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        self.check_restored()?;
        if self.in_progress.is_some() {
            self.stage(checkpoint)?;
        }
        let state = SinkState {
            subtask: self.subtask,
            next_seq: self.next_seq,
            pending: self.pending.clone(),
        };
        let bytes = serde_json::to_vec(&state)
            .map_err(|e| self.state_error(format!("cannot encode the sink state: {e}")))?;
        Ok(Some(bytes))
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        assert!(!self.restored, "restore_state is called once");
        assert!(self.in_progress.is_none() && self.pending.is_empty());
        match state {
            Some(bytes) => self.restore_from(bytes)?,
            None => {
                self.delete_parts(|_| true)?;
                self.next_seq = 0;
            }
        }
        sync_dir(&self.dir)?;
        self.restored = true;
        Ok(())
    }

    fn notify_checkpoint_complete(&mut self, checkpoint: u64) -> Result<(), ExecError> {
        let mut committed_any = false;
        while let Some(part) = self.pending.first().filter(|p| p.checkpoint <= checkpoint) {
            self.commit(part.seq)?;
            self.pending.remove(0);
            committed_any = true;
        }
        if committed_any {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn has_pending_commit(&self) -> bool {
        !self.pending.is_empty()
    }
}

impl<F: PartFormat> Drop for TwoPhaseFileSink<F> {
    fn drop(&mut self) {
        // An open part holds rows after the last checkpoint's barrier: no
        // checkpoint refers to it, and a restore would delete it anyway.
        if let Some(part) = &self.in_progress {
            remove_if_same_file(&self.path(part.seq, PartStage::InProgress), part.identity);
        }
    }
}

fn io_error(path: &Path, source: std::io::Error) -> ExecError {
    ExecError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_error(path: &Path, detail: String) -> ExecError {
    ExecError::Write {
        path: path.to_owned(),
        detail,
    }
}

/// Makes renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), ExecError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}
