//! File sinks without checkpoints: each subtask writes its part files
//! under hidden in-progress names and renames them all when it finishes.
//!
//! Names: `part-<subtask>.<ext>` when the sink does not roll; with
//! `target_file_bytes`, `part-<subtask>-<n>.<ext>` for `n = 0, 1, …` (the
//! exactly-once sinks' scheme, whose names sort in writing order), so a
//! directory's listing says which files a sink rolls through.
//!
//! Invariants:
//!
//! - The first part file is created when the sink is built, so every
//!   subtask yields a file, and a restarted attempt takes over the name of
//!   an attempt that has not dropped yet (see [`super::create_fresh`]).
//! - After a roll, the next part file is opened on the next row, so no
//!   empty file follows the last full one.
//! - Until `finish`, no file is visible: a closed part keeps its hidden
//!   name, and a sink dropped before `finish` removes every part it wrote.

use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use super::format::{CsvPart, IpcPart, ParquetPart, PartFiles, PartFormat};
use super::{PartFile, io_error};
use crate::exec::ExecError;
use crate::exec::operators::{Operator, Output};

/// A file sink subtask without checkpoints; see the module documentation.
pub struct PartFileSink<F: PartFormat> {
    dir: PathBuf,
    subtask: u32,
    schema: SchemaRef,
    parts: PartFiles<F>,
    /// The part being written and its writer. The part is the first field,
    /// so that on drop it removes its file while the writer still holds it
    /// open.
    open: Option<(PartFile, F::Writer)>,
    /// Parts closed at `target_file_bytes`, in order, not yet committed.
    closed: Vec<PartFile>,
    /// The number in the next part file's name, when the sink rolls.
    next_index: u64,
}

/// The CSV sink without checkpoints.
pub type CsvSink = PartFileSink<CsvPart>;
/// The Parquet sink without checkpoints.
pub type ParquetSink = PartFileSink<ParquetPart>;
/// The Arrow IPC sink without checkpoints.
pub type ArrowIpcSink = PartFileSink<IpcPart>;

impl<F: PartFormat + Default> PartFileSink<F> {
    /// A sink of the format's default options that never rolls on size.
    pub fn new(dir: &Path, subtask: u32, schema: SchemaRef) -> Result<Self, ExecError> {
        Self::with_parts(dir, subtask, schema, PartFiles::default())
    }
}

impl<F: PartFormat> PartFileSink<F> {
    /// Creates `dir` and the first part file.
    pub fn with_parts(
        dir: &Path,
        subtask: u32,
        schema: SchemaRef,
        parts: PartFiles<F>,
    ) -> Result<Self, ExecError> {
        let mut sink = Self {
            dir: dir.to_owned(),
            subtask,
            schema,
            parts,
            open: None,
            closed: Vec::new(),
            next_index: 0,
        };
        sink.open_part()?;
        Ok(sink)
    }

    fn open_part(&mut self) -> Result<&mut (PartFile, F::Writer), ExecError> {
        assert!(self.open.is_none(), "a part file is already open");
        let stem = match self.parts.target_file_bytes {
            None => format!("part-{}", self.subtask),
            Some(_) => format!("part-{}-{}", self.subtask, self.next_index),
        };
        let format = &self.parts.format;
        let (part, file) = PartFile::create(&self.dir, &stem, format.extension())?;
        let writer = format
            .create(file, &self.schema)
            .map_err(|detail| write_error(&part.final_path, detail))?;
        self.next_index += 1;
        Ok(self.open.insert((part, writer)))
    }

    /// Closes the open part, durably, under its in-progress name.
    fn close_open_part(&mut self) -> Result<(), ExecError> {
        let (mut part, writer) = self.open.take().expect("close needs an open part");
        let file = F::close(writer, &self.schema, &part.temp_path)
            .map_err(|detail| write_error(&part.final_path, detail))?;
        file.sync_all().map_err(|e| io_error(&part.temp_path, e))?;
        part.closed(&file)?;
        self.closed.push(part);
        Ok(())
    }

    fn open_part_is_full(&self) -> bool {
        let (Some(target), Some((_, writer))) = (self.parts.target_file_bytes, &self.open) else {
            return false;
        };
        F::size_bytes(writer).is_some_and(|size| size >= target)
    }
}

impl<F: PartFormat> Operator for PartFileSink<F> {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (part, writer) = match self.open.as_mut() {
            Some(open) => open,
            None => self.open_part()?,
        };
        F::write(writer, &batch).map_err(|detail| write_error(&part.final_path, detail))?;
        if self.open_part_is_full() {
            self.close_open_part()?;
        }
        Ok(())
    }

    fn watermark(&mut self, _w: i64, _out: &mut dyn Output) -> Result<(), ExecError> {
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        if self.open.is_some() {
            self.close_open_part()?;
        }
        for part in &mut self.closed {
            part.commit()?;
        }
        Ok(())
    }
}

fn write_error(path: &Path, detail: String) -> ExecError {
    ExecError::Write {
        path: path.to_owned(),
        detail,
    }
}
