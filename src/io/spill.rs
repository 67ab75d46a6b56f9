//! Spill files: a block writer and a block reader over any [`Storage`].
//!
//! The writer keeps up to its buffer count of block writes in flight: it only
//! waits for a write when it needs that write's buffer again (or at
//! `finish`). The reader reads ahead the same way and verifies every block
//! (header checksum, length, index, payload crc32c) before it lends the payload
//! out; a mismatch is [`IoError::CorruptBlock`], never data.
//!
//! Ownership: a [`SpillFile`] deletes its file when dropped unless
//! [`SpillFile::keep`] was called; the writer and the reader own one, so a
//! task's spill files go when the task's operators are dropped — at the end,
//! on failure or on cancel. Both wait for their in-flight operations before
//! the file is closed, since the kernel may still be using their buffers.
//!
//! Writes go to space reserved ahead with `fallocate` in chunks of
//! `ALLOCATE_CHUNK_BYTES`: ext4 serialises direct writes that extend a file,
//! and reserving turns them into overwrites that run in parallel.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::IoError;
use super::block::{BLOCK_HEADER_BYTES, BlockField, BlockHeader, BlockMismatch};
use super::buf::AlignedBuf;
use super::storage::{Completion, FileId, Op, OpKind, Storage, Ticket};

/// Space reserved ahead of the writer at a time.
pub const ALLOCATE_CHUNK_BYTES: u64 = 64 << 20;

/// A spill file on disk with its block index.
pub struct SpillFile {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) file: Option<FileId>,
    pub(super) path: PathBuf,
    /// Offset of each block; block `i` ends where `i + 1` starts, the last at `len_bytes`.
    pub(super) block_offsets: Vec<u64>,
    pub(super) len_bytes: u64,
    pub(super) keep: bool,
}

impl SpillFile {
    /// Creates (truncating) `path` through `storage`.
    pub fn create(storage: Arc<dyn Storage>, path: PathBuf) -> Result<Self, IoError> {
        let file = storage
            .open(&path, true)
            .map_err(|e| io_error(&path, 0, e))?;
        Ok(Self::new(storage, file, path))
    }

    /// Opens a kept spill file and rebuilds its block index by reading every
    /// block header (`buf` must hold one 4096-byte header read).
    pub fn open(
        storage: Arc<dyn Storage>,
        path: PathBuf,
        buf: AlignedBuf,
    ) -> Result<Self, IoError> {
        let file = storage
            .open(&path, false)
            .map_err(|e| io_error(&path, 0, e))?;
        let mut spill = Self::new(storage, file, path);
        spill.keep = true;
        spill.scan(buf)?;
        Ok(spill)
    }

    fn new(storage: Arc<dyn Storage>, file: FileId, path: PathBuf) -> Self {
        Self {
            storage,
            file: Some(file),
            path,
            block_offsets: Vec::new(),
            len_bytes: 0,
            keep: false,
        }
    }

    fn scan(&mut self, mut buf: AlignedBuf) -> Result<(), IoError> {
        let file = self.file_id();
        let mut offset = 0u64;
        loop {
            buf.set_len(super::DIRECT_IO_ALIGN);
            let completion = self
                .storage
                .wait(self.storage.submit(Op::read(file, offset, buf)));
            buf = completion.buf;
            match completion
                .result
                .map_err(|e| io_error(&self.path, offset, e))?
            {
                0 => break,
                n if n < BLOCK_HEADER_BYTES => {
                    return Err(self.corrupt(offset, truncated(BLOCK_HEADER_BYTES, n)));
                }
                _ => {}
            }
            let header_bytes = buf.as_slice()[..BLOCK_HEADER_BYTES]
                .try_into()
                .expect("32 bytes");
            let header = BlockHeader::decode(header_bytes).map_err(|m| self.corrupt(offset, m))?;
            let index = self.block_offsets.len() as u64;
            BlockMismatch::check(BlockField::Index, index, header.block_index)
                .map_err(|m| self.corrupt(offset, m))?;
            self.block_offsets.push(offset);
            offset += u64::from(header.block_len);
        }
        self.len_bytes = offset;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn block_count(&self) -> usize {
        self.block_offsets.len()
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Keeps the file on disk when this handle is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// `(offset, block_len)` of block `index`.
    pub(super) fn extent(&self, index: usize) -> (u64, usize) {
        let offset = self.block_offsets[index];
        let end = self
            .block_offsets
            .get(index + 1)
            .copied()
            .unwrap_or(self.len_bytes);
        (offset, (end - offset) as usize)
    }

    pub(super) fn file_id(&self) -> FileId {
        self.file.expect("spill file is open")
    }

    pub(super) fn corrupt(&self, offset: u64, mismatch: BlockMismatch) -> IoError {
        IoError::CorruptBlock {
            path: self.path.clone(),
            offset,
            field: mismatch.field,
            expected: mismatch.expected,
            found: mismatch.found,
        }
    }

    /// Closes and unlinks the file now. No operation on it may be in flight.
    pub(super) fn remove(&mut self) {
        if let Some(file) = self.file.take() {
            self.storage.close(file);
            if let Err(e) = std::fs::remove_file(&self.path) {
                let path = self.path.display();
                tracing::warn!(%path, error = %e, "could not remove spill file");
            }
        }
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        match (self.keep, self.file.take()) {
            (true, Some(file)) => self.storage.close(file),
            (false, Some(file)) => {
                self.file = Some(file);
                self.remove();
            }
            (_, None) => {}
        }
    }
}

/// Maps an errno to the typed error: ENOSPC is `NoSpace`, the rest `Io`.
pub(super) fn io_error(path: &Path, offset: u64, source: io::Error) -> IoError {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        return IoError::NoSpace {
            path: path.to_path_buf(),
        };
    }
    IoError::Io {
        path: path.to_path_buf(),
        offset,
        source,
    }
}

pub(super) fn truncated(expected_bytes: usize, found_bytes: usize) -> BlockMismatch {
    BlockMismatch {
        field: BlockField::Truncated,
        expected: expected_bytes as u64,
        found: found_bytes as u64,
    }
}

/// Verifies block `index` of `file`, read from `extent` (offset, block
/// length) into `buf` with `result`; returns its payload length. Shared by
/// the reader and the writer's read-back, so both check the same fields.
pub(super) fn verify_block(
    file: &SpillFile,
    index: usize,
    extent: (u64, usize),
    buf: &AlignedBuf,
    result: io::Result<usize>,
) -> Result<usize, IoError> {
    let (offset, block_len) = extent;
    let done = result.map_err(|e| io_error(file.path(), offset, e))?;
    let verify = || -> Result<usize, BlockMismatch> {
        if done < block_len {
            return Err(truncated(block_len, done));
        }
        let bytes = buf.as_slice();
        let header =
            BlockHeader::decode(bytes[..BLOCK_HEADER_BYTES].try_into().expect("32 bytes"))?;
        BlockMismatch::check(BlockField::Index, index as u64, header.block_index)?;
        BlockMismatch::check(
            BlockField::Length,
            block_len as u64,
            u64::from(header.block_len),
        )?;
        let payload_len = header.payload_len as usize;
        header.verify_payload(&bytes[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + payload_len])?;
        Ok(payload_len)
    };
    verify().map_err(|mismatch| file.corrupt(offset, mismatch))
}

/// An operation in flight: its ticket, file offset and first buffer byte.
pub(super) struct Pending {
    pub(super) ticket: Ticket,
    pub(super) offset: u64,
    pub(super) start: usize,
}

/// Waits for `pending`, resubmitting the rest of a short transfer, and returns
/// the buffer with the bytes moved in all (fewer than `buf.len()` only when a
/// transfer moved nothing: end of file on a read).
pub(super) fn complete(
    storage: &dyn Storage,
    file: FileId,
    kind: OpKind,
    mut pending: Pending,
) -> (AlignedBuf, io::Result<usize>) {
    loop {
        let Completion { buf, result } = storage.wait(pending.ticket);
        let done = match result {
            Ok(count) => pending.start + count,
            Err(e) => return (buf, Err(e)),
        };
        if done == pending.start || done >= buf.len() {
            return (buf, Ok(done));
        }
        let offset = pending.offset + (done - pending.start) as u64;
        let op = Op {
            kind,
            file,
            offset,
            buf,
            start: done,
        };
        pending = Pending {
            ticket: storage.submit(op),
            offset,
            start: done,
        };
    }
}
