//! The block writer: appends checksummed blocks to a new spill file, keeping
//! up to one write per buffer in flight.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::IoError;
use super::block::{BLOCK_HEADER_BYTES, BlockHeader, block_len_for};
use super::buf::AlignedBuf;
use super::spill::{ALLOCATE_CHUNK_BYTES, Pending, SpillFile, complete, io_error, verify_block};
use super::storage::{Op, OpKind, Storage};

/// Writes checksummed blocks to a new spill file, pipelined over its buffers.
pub struct SpillWriter {
    file: Option<SpillFile>,
    free: Vec<AlignedBuf>,
    in_flight: VecDeque<Pending>,
    next_offset: u64,
    allocated_bytes: u64,
    /// Capacity of every buffer (they come from one pool).
    buf_capacity: usize,
    failed: bool,
}

impl SpillWriter {
    /// Creates the file; `bufs` (at least one) bound the writes in flight.
    pub fn new(
        storage: Arc<dyn Storage>,
        path: PathBuf,
        bufs: Vec<AlignedBuf>,
    ) -> Result<Self, IoError> {
        assert!(!bufs.is_empty(), "a spill writer needs at least one buffer");
        let buf_capacity = bufs[0].capacity();
        assert!(bufs.iter().all(|buf| buf.capacity() == buf_capacity));
        Ok(Self {
            buf_capacity,
            file: Some(SpillFile::create(storage, path)?),
            free: bufs,
            in_flight: VecDeque::new(),
            next_offset: 0,
            allocated_bytes: 0,
            failed: false,
        })
    }

    pub fn path(&self) -> &Path {
        self.spill().path()
    }

    /// Largest payload one block can carry with these buffers.
    pub fn payload_bytes_max(&self) -> usize {
        self.buf_capacity - BLOCK_HEADER_BYTES
    }

    /// Bytes written (or in flight) so far, padding included.
    pub fn len_bytes(&self) -> u64 {
        self.next_offset
    }

    /// Appends one block with a copy of `payload`; returns its block index.
    pub fn write_block(&mut self, payload: &[u8]) -> Result<usize, IoError> {
        self.write_block_with(payload.len(), |target| target.copy_from_slice(payload))
    }

    /// Appends one block of `payload_len` bytes that `fill` writes in place
    /// (no copy); returns its block index. `fill` must write every byte: the
    /// buffer still holds an earlier block.
    ///
    /// # Panics
    /// If called after an error: the file is gone then, and the caller must
    /// fail the task (or start a new writer).
    pub fn write_block_with(
        &mut self,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<usize, IoError> {
        assert!(!self.failed, "spill writer used after a failed write");
        let payload_bytes_max = self.payload_bytes_max();
        if payload_len > payload_bytes_max {
            return Err(IoError::BlockTooLarge {
                payload_len,
                payload_bytes_max,
            });
        }
        let block_len = block_len_for(payload_len);
        self.reserve(block_len as u64)?;
        let mut buf = self.take_buf()?;
        let block_index = self.spill().block_offsets.len();
        encode_block(&mut buf, block_index as u64, block_len, payload_len, fill);
        let offset = self.next_offset;
        let spill = self.file.as_mut().expect("writer owns its file");
        spill.block_offsets.push(offset);
        let ticket = spill
            .storage
            .submit(Op::write(spill.file_id(), offset, buf));
        self.in_flight.push_back(Pending {
            ticket,
            offset,
            start: 0,
        });
        self.next_offset += block_len as u64;
        Ok(block_index)
    }

    /// Blocks written so far.
    pub fn block_count(&self) -> usize {
        self.spill().block_count()
    }

    /// Reads back block `index` (written earlier through this writer),
    /// verified as a [`super::SpillReader`] verifies it, without finishing
    /// the writer: operators copy their live spilled state into checkpoint
    /// snapshots this way and keep appending afterwards. Waits for every
    /// write in flight first (the block may be one of them) and reads into
    /// one of the writer's own buffers, so it needs none from the pool; the
    /// payload is valid until the next call.
    ///
    /// A failed read leaves the writer usable: only its writes fail it.
    ///
    /// # Panics
    /// If `index` was not written, or after a failed write.
    pub fn read_block(&mut self, index: usize) -> Result<&[u8], IoError> {
        assert!(!self.failed, "spill writer used after a failed write");
        assert!(index < self.block_count(), "block {index} not written");
        while !self.in_flight.is_empty() {
            let buf = self.reclaim_oldest()?;
            self.free.push(buf);
        }
        let mut buf = self.free.pop().expect("no write in flight");
        let spill = self.file.as_ref().expect("writer owns its file");
        let offset = spill.block_offsets[index];
        let end = spill
            .block_offsets
            .get(index + 1)
            .copied()
            .unwrap_or(self.next_offset);
        let block_len = (end - offset) as usize;
        assert!(
            block_len <= buf.capacity(),
            "blocks fit the writer's buffers"
        );
        buf.set_len(block_len);
        let file = spill.file_id();
        let pending = Pending {
            ticket: spill.storage.submit(Op::read(file, offset, buf)),
            offset,
            start: 0,
        };
        let (buf, result) = complete(spill.storage.as_ref(), file, OpKind::Read, pending);
        let checked = verify_block(spill, index, (offset, block_len), &buf, result);
        self.free.push(buf);
        let payload_len = checked?;
        let buf = self.free.last().expect("pushed above");
        Ok(&buf.as_slice()[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + payload_len])
    }

    /// Waits for every write and hands the file over (still deleted on drop
    /// unless kept). The space reserved past the last block is released.
    pub fn finish(mut self) -> Result<SpillFile, IoError> {
        assert!(!self.failed, "spill writer finished after a failed write");
        while !self.in_flight.is_empty() {
            let buf = self.reclaim_oldest()?;
            self.free.push(buf);
        }
        let mut spill = self.file.take().expect("writer owns its file");
        spill.len_bytes = self.next_offset;
        let file = spill.file_id();
        if let Err(e) = spill.storage.set_len(file, self.next_offset) {
            return Err(io_error(&spill.path, self.next_offset, e));
        }
        Ok(spill)
    }

    fn spill(&self) -> &SpillFile {
        self.file.as_ref().expect("writer owns its file")
    }

    /// Makes sure `[next_offset, next_offset + len)` is reserved on disk.
    fn reserve(&mut self, len: u64) -> Result<(), IoError> {
        let end = self.next_offset + len;
        if end <= self.allocated_bytes {
            return Ok(());
        }
        let chunk = ALLOCATE_CHUNK_BYTES.max(len);
        let spill = self.spill();
        let result = spill
            .storage
            .allocate(spill.file_id(), self.allocated_bytes, chunk);
        match result {
            Ok(()) => {
                self.allocated_bytes += chunk;
                Ok(())
            }
            Err(e) => {
                let err = io_error(&spill.path, self.allocated_bytes, e);
                Err(self.fail(err))
            }
        }
    }

    fn take_buf(&mut self) -> Result<AlignedBuf, IoError> {
        match self.free.pop() {
            Some(buf) => Ok(buf),
            None => self.reclaim_oldest(),
        }
    }

    /// Waits for the oldest write; on error, fails the whole writer.
    fn reclaim_oldest(&mut self) -> Result<AlignedBuf, IoError> {
        let pending = self.in_flight.pop_front().expect("a write in flight");
        let offset = pending.offset;
        let spill = self.spill();
        let (buf, result) = complete(
            spill.storage.as_ref(),
            spill.file_id(),
            OpKind::Write,
            pending,
        );
        let expected = buf.len();
        let error = match result {
            Ok(done) if done == expected => return Ok(buf),
            Ok(_) => io::Error::from(io::ErrorKind::WriteZero),
            Err(e) => e,
        };
        self.free.push(buf);
        let err = io_error(&self.spill().path, offset, error);
        Err(self.fail(err))
    }

    /// Waits out every write still in flight, removes the partial file and
    /// marks the writer failed; returns `err` for the caller to propagate.
    fn fail(&mut self, err: IoError) -> IoError {
        self.drain();
        self.failed = true;
        if let Some(spill) = self.file.as_mut() {
            spill.remove();
        }
        tracing::warn!(error = %err, "spill write failed; partial file removed");
        err
    }

    /// Waits for every write in flight, ignoring results.
    fn drain(&mut self) {
        let Some(spill) = self.file.as_ref() else {
            return;
        };
        if self.in_flight.is_empty() {
            return;
        }
        for pending in self.in_flight.drain(..) {
            let (buf, _) = complete(
                spill.storage.as_ref(),
                spill.file_id(),
                OpKind::Write,
                pending,
            );
            self.free.push(buf);
        }
    }
}

impl Drop for SpillWriter {
    fn drop(&mut self) {
        // The kernel may still read the buffers; the file must stay open until
        // every write completed. `SpillFile`'s drop then removes the file.
        self.drain();
    }
}

/// Lays out one block in `buf`: header, payload filled by `fill`, zero padding.
fn encode_block(
    buf: &mut AlignedBuf,
    block_index: u64,
    block_len: usize,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    buf.set_len(block_len);
    let bytes = buf.as_mut_slice();
    let (header, rest) = bytes.split_at_mut(BLOCK_HEADER_BYTES);
    let (payload, padding) = rest.split_at_mut(payload_len);
    fill(payload);
    padding.fill(0);
    header.copy_from_slice(&BlockHeader::new(block_index, payload).encode());
}
