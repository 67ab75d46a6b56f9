//! Spilling for operators: the task's handle on the TaskManager's IOManager.
//!
//! Operators never touch `std::fs`: they ask a [`SpillContext`] for a
//! [`RunWriter`] (a new checksummed spill file in the next `io.tmp.dirs`
//! directory) and read finished files back through a [`RunReader`]. Both
//! count what they move into the task's [`SpillMetrics`].
//!
//! Ownership: every file belongs to the writer, reader or [`SpillFile`] that
//! holds it, and those belong to the operator, so a task's spill files are
//! removed when its operators are dropped — when the task finishes, fails or
//! is canceled (the io layer's RAII, see `io::spill`).
//!
//! Limits: a writer reserves [`WRITER_BUF_COUNT`] and a reader
//! [`READER_BUF_COUNT`] buffers of the TaskManager's I/O pool; an operator
//! holds at most one writer and one reader per recursion level, so the pool
//! (sized in `taskmanager`) bounds how many operators spill at once, with
//! `BuffersExhausted` past it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::ExecError;
use crate::io::{IoError, IoManager, SpillFile, SpillOptions, SpillReader, SpillWriter};
use crate::metrics::SpillMetrics;

/// Buffers per spill writer: one block in flight while the next is filled.
pub const WRITER_BUF_COUNT: usize = 2;
/// Buffers per spill reader: readers seek between runs, so read-ahead past
/// the block asked for would mostly be thrown away.
pub const READER_BUF_COUNT: usize = 1;

/// What an operator needs to spill: the IOManager and the task's counters.
#[derive(Clone)]
pub struct SpillContext {
    pub io: Arc<IoManager>,
    pub metrics: Arc<SpillMetrics>,
}

impl SpillContext {
    pub fn new(io: Arc<IoManager>, metrics: Arc<SpillMetrics>) -> Self {
        Self { io, metrics }
    }

    /// A writer on a new spill file.
    pub fn writer(&self, operator: &str) -> Result<RunWriter, ExecError> {
        let options = SpillOptions {
            buf_count: WRITER_BUF_COUNT,
        };
        let inner = self
            .io
            .create_spill_writer(options)
            .map_err(|e| spill_error(operator, e))?;
        self.metrics.file_count.fetch_add(1, Ordering::Relaxed);
        Ok(RunWriter {
            inner,
            metrics: Arc::clone(&self.metrics),
            operator: operator.to_owned(),
        })
    }

    /// A reader over a finished spill file.
    pub fn reader(&self, operator: &str, file: SpillFile) -> Result<RunReader, ExecError> {
        let options = SpillOptions {
            buf_count: READER_BUF_COUNT,
        };
        let inner = self
            .io
            .create_spill_reader(file, options)
            .map_err(|e| spill_error(operator, e))?;
        Ok(RunReader {
            inner,
            metrics: Arc::clone(&self.metrics),
            operator: operator.to_owned(),
        })
    }
}

pub fn spill_error(operator: &str, source: IoError) -> ExecError {
    ExecError::Spill {
        operator: operator.to_owned(),
        source,
    }
}

/// Appends blocks to one spill file and counts the bytes.
pub struct RunWriter {
    inner: SpillWriter,
    metrics: Arc<SpillMetrics>,
    operator: String,
}

impl RunWriter {
    pub fn payload_bytes_max(&self) -> usize {
        self.inner.payload_bytes_max()
    }

    /// Appends one block; returns its index in the file.
    pub fn write_block(&mut self, payload: &[u8]) -> Result<usize, ExecError> {
        let before = self.inner.len_bytes();
        let index = self
            .inner
            .write_block(payload)
            .map_err(|e| spill_error(&self.operator, e))?;
        let written = self.inner.len_bytes() - before;
        self.metrics
            .bytes_written
            .fetch_add(written, Ordering::Relaxed);
        Ok(index)
    }

    /// Reads back block `index` of the file being written (verified), for a
    /// checkpoint snapshot of live spilled state; the writer goes on
    /// appending afterwards. The payload is valid until the next call.
    pub fn read_block(&mut self, index: usize) -> Result<&[u8], ExecError> {
        let payload = self
            .inner
            .read_block(index)
            .map_err(|e| spill_error(&self.operator, e))?;
        self.metrics
            .bytes_read
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(payload)
    }

    /// Waits for the writes; the file is still removed when dropped.
    pub fn finish(self) -> Result<SpillFile, ExecError> {
        let operator = self.operator;
        self.inner.finish().map_err(|e| spill_error(&operator, e))
    }
}

/// Reads blocks of one spill file (verified) and counts the bytes.
pub struct RunReader {
    inner: SpillReader,
    metrics: Arc<SpillMetrics>,
    operator: String,
}

impl RunReader {
    pub fn block_count(&self) -> usize {
        self.inner.block_count()
    }

    /// The payload of block `index`, valid until the next read.
    pub fn read_block(&mut self, index: usize) -> Result<&[u8], ExecError> {
        let payload = self
            .inner
            .read_block(index)
            .map_err(|e| spill_error(&self.operator, e))?;
        self.metrics
            .bytes_read
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(payload)
    }
}
