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
//! With `target_file_bytes`, a part file that reaches that size is closed
//! and fsynced at once, and the next rows go to part `seq + 1`. A closed
//! part keeps its in-progress name until the next barrier stages it with
//! the open one, so one checkpoint may stage (and commit) several parts.
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
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use super::format::{PartFiles, PartFormat};
use super::{
    ClosedFile, FileIdentity, create_fresh, remove_if_same_closed_file, remove_if_same_file,
};
use crate::exec::ExecError;
use crate::exec::operators::{FINAL_CHECKPOINT, Operator, Output};

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

/// A part file closed at `target_file_bytes`, still under its in-progress
/// name: the next barrier stages it.
#[derive(Clone, Copy, Debug)]
struct ClosedPart {
    seq: u64,
    /// Which file the in-progress name named when it was closed.
    file: ClosedFile,
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
    parts: PartFiles<F>,
    /// The sequence number of the next part file (the open one, if any).
    next_seq: u64,
    /// Opened on the first row after a roll, so it always has rows, except
    /// for an empty subtask's file that `finish` writes.
    in_progress: Option<InProgress<F::Writer>>,
    /// Parts closed at `target_file_bytes` since the last barrier, in order.
    closed: Vec<ClosedPart>,
    /// Staged parts, in staging order, so by checkpoint.
    pending: Vec<PendingPart>,
    /// `restore_state` ran: until then the files of an earlier attempt in
    /// the directory are not sorted out, so writing would mix with them.
    restored: bool,
}

/// The exactly-once CSV sink.
pub type TwoPhaseCsvSink = TwoPhaseFileSink<super::format::CsvPart>;
/// The exactly-once Parquet sink.
pub type TwoPhaseParquetSink = TwoPhaseFileSink<super::format::ParquetPart>;
/// The exactly-once Arrow IPC sink.
pub type TwoPhaseIpcSink = TwoPhaseFileSink<super::format::IpcPart>;

impl<F: PartFormat + Default> TwoPhaseFileSink<F> {
    /// A sink of the format's default options that never rolls on size.
    pub fn new(name: &str, dir: &Path, subtask: u32, schema: SchemaRef) -> Result<Self, ExecError> {
        Self::with_parts(name, dir, subtask, schema, PartFiles::default())
    }
}

impl<F: PartFormat> TwoPhaseFileSink<F> {
    /// `name` is the operator's, for errors. Creates `dir`; touches no file
    /// until `restore_state`.
    pub fn with_parts(
        name: &str,
        dir: &Path,
        subtask: u32,
        schema: SchemaRef,
        parts: PartFiles<F>,
    ) -> Result<Self, ExecError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        Ok(Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            subtask,
            schema,
            parts,
            next_seq: 0,
            in_progress: None,
            closed: Vec::new(),
            pending: Vec::new(),
            restored: false,
        })
    }

    fn path(&self, seq: u64, stage: PartStage) -> PathBuf {
        let name = PartName {
            subtask: self.subtask,
            seq,
            stage,
        };
        self.dir.join(name.file_name(self.parts.format.extension()))
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
        let writer = (self.parts.format)
            .create(file, &self.schema)
            .map_err(|e| write_error(&path, e))?;
        Ok(self.in_progress.insert(InProgress {
            seq,
            writer,
            identity,
        }))
    }

    /// Closes the open part and makes it durable; it keeps its in-progress
    /// name until [`Self::stage`].
    fn close_open_part(&mut self) -> Result<(), ExecError> {
        let part = self.in_progress.take().expect("close needs an open part");
        assert_eq!(part.seq, self.next_seq);
        let path = self.path(part.seq, PartStage::InProgress);
        let file = F::close(part.writer, &self.schema, &path).map_err(|e| write_error(&path, e))?;
        file.sync_all().map_err(|e| io_error(&path, e))?;
        // The format may have replaced the file (Parquet's checksum copy).
        let closed = ClosedFile::of(&file).map_err(|e| io_error(&path, e))?;
        self.closed.push(ClosedPart {
            seq: part.seq,
            file: closed,
        });
        self.next_seq += 1;
        Ok(())
    }

    /// Whether the open part has reached `target_file_bytes`.
    fn open_part_is_full(&self) -> bool {
        let (Some(target), Some(part)) = (self.parts.target_file_bytes, &self.in_progress) else {
            return false;
        };
        F::size_bytes(&part.writer).is_some_and(|size| size >= target)
    }

    /// Closes the open part, if any, and renames it and the parts closed
    /// before it to pending, staged for `checkpoint`.
    fn stage(&mut self, checkpoint: u64) -> Result<(), ExecError> {
        if self.in_progress.is_some() {
            self.close_open_part()?;
        }
        assert!(!self.closed.is_empty(), "stage needs a closed part");
        assert!(
            self.pending
                .last()
                .is_none_or(|p| p.checkpoint <= checkpoint),
            "checkpoints are staged in order"
        );
        while let Some(part) = self.closed.first().copied() {
            let source = self.path(part.seq, PartStage::InProgress);
            let target = self.path(part.seq, PartStage::Pending);
            std::fs::rename(&source, &target).map_err(|e| io_error(&target, e))?;
            self.closed.remove(0);
            self.pending.push(PendingPart {
                seq: part.seq,
                checkpoint,
            });
        }
        sync_dir(&self.dir)
    }

    /// Whether a barrier has anything to stage.
    fn has_unstaged_parts(&self) -> bool {
        self.in_progress.is_some() || !self.closed.is_empty()
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
                .and_then(|n| PartName::parse(n, self.parts.format.extension()))
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
            .map_err(|e| write_error(&self.path(seq, PartStage::InProgress), e))?;
        if self.open_part_is_full() {
            self.close_open_part()?;
        }
        Ok(())
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
        if self.has_unstaged_parts() {
            self.stage(FINAL_CHECKPOINT)?;
        }
        Ok(())
    }

    fn snapshot_state(&mut self, checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        self.check_restored()?;
        if self.has_unstaged_parts() {
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
        assert!(self.in_progress.is_none() && self.closed.is_empty() && self.pending.is_empty());
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
        // Open and closed parts hold rows after the last checkpoint's
        // barrier: no checkpoint refers to them, and a restore would delete
        // them anyway.
        if let Some(part) = &self.in_progress {
            remove_if_same_file(&self.path(part.seq, PartStage::InProgress), part.identity);
        }
        for part in &self.closed {
            remove_if_same_closed_file(&self.path(part.seq, PartStage::InProgress), part.file);
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
