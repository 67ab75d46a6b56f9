//! The block reader: sequential with read-ahead (one read per buffer in
//! flight), or by block index. Every block is verified before its payload is
//! lent out.

use std::collections::VecDeque;
use std::path::Path;

use super::IoError;
use super::block::BLOCK_HEADER_BYTES;
use super::buf::AlignedBuf;
use super::spill::{Pending, SpillFile, complete, verify_block};
use super::storage::{Op, OpKind};

/// Reads the blocks of a [`SpillFile`], which it owns (and deletes on drop
/// unless kept).
pub struct SpillReader {
    file: SpillFile,
    free: Vec<AlignedBuf>,
    /// Reads in flight, for blocks `next_block..next_block + in_flight.len()`.
    in_flight: VecDeque<Pending>,
    /// Next block `next` returns.
    next_block: usize,
    /// The buffer whose payload was last lent out, with that payload's length.
    current: Option<(AlignedBuf, usize)>,
}

impl SpillReader {
    /// `bufs` (at least one) bound the reads in flight; each must hold the
    /// file's largest block.
    pub fn new(file: SpillFile, bufs: Vec<AlignedBuf>) -> Self {
        assert!(!bufs.is_empty(), "a spill reader needs at least one buffer");
        Self {
            file,
            free: bufs,
            in_flight: VecDeque::new(),
            next_block: 0,
            current: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn block_count(&self) -> usize {
        self.file.block_count()
    }

    /// Keeps the file on disk when the reader is dropped.
    pub fn keep(&mut self) {
        self.file.keep();
    }

    /// The next block's payload, or `None` after the last block. The payload
    /// is valid until the next call.
    pub fn next_block(&mut self) -> Result<Option<&[u8]>, IoError> {
        if let Some((buf, _)) = self.current.take() {
            self.free.push(buf);
        }
        if self.next_block >= self.file.block_count() {
            return Ok(None);
        }
        self.read_ahead();
        let pending = self
            .in_flight
            .pop_front()
            .expect("read ahead submitted the next block");
        let index = self.next_block;
        self.next_block += 1;
        let (buf, result) = complete(
            self.file.storage.as_ref(),
            self.file.file_id(),
            OpKind::Read,
            pending,
        );
        let checked = self.check(index, &buf, result);
        match checked {
            Ok(payload_len) => {
                let (buf, payload_len) = self.current.insert((buf, payload_len));
                Ok(Some(
                    &buf.as_slice()[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + *payload_len],
                ))
            }
            Err(err) => {
                self.free.push(buf);
                Err(err)
            }
        }
    }

    /// The payload of block `index`; sequential reading goes on after it.
    pub fn read_block(&mut self, index: usize) -> Result<&[u8], IoError> {
        assert!(
            index < self.file.block_count(),
            "block {index} out of range"
        );
        self.seek(index);
        Ok(self.next_block()?.expect("index is in range"))
    }

    /// Moves the cursor to block `index`, dropping read-ahead past it.
    pub fn seek(&mut self, index: usize) {
        assert!(
            index <= self.file.block_count(),
            "block {index} out of range"
        );
        if index != self.next_block {
            self.drain();
            self.next_block = index;
        }
    }

    /// Submits reads for the blocks after the cursor while buffers are free.
    fn read_ahead(&mut self) {
        let file = self.file.file_id();
        while let Some(mut buf) = self.free.pop() {
            let index = self.next_block + self.in_flight.len();
            if index >= self.file.block_count() {
                self.free.push(buf);
                return;
            }
            let (offset, block_len) = self.file.extent(index);
            assert!(
                block_len <= buf.capacity(),
                "block {index} larger than the reader's buffers"
            );
            buf.set_len(block_len);
            let ticket = self.file.storage.submit(Op::read(file, offset, buf));
            self.in_flight.push_back(Pending {
                ticket,
                offset,
                start: 0,
            });
        }
    }

    /// Verifies block `index` in `buf`; returns its payload length.
    fn check(
        &self,
        index: usize,
        buf: &AlignedBuf,
        result: std::io::Result<usize>,
    ) -> Result<usize, IoError> {
        verify_block(&self.file, index, self.file.extent(index), buf, result)
    }

    /// Waits for every read in flight, keeping the buffers.
    fn drain(&mut self) {
        for pending in self.in_flight.drain(..) {
            let (buf, _) = complete(
                self.file.storage.as_ref(),
                self.file.file_id(),
                OpKind::Read,
                pending,
            );
            self.free.push(buf);
        }
    }
}

impl Drop for SpillReader {
    fn drop(&mut self) {
        // Reads in flight write into our buffers: wait before the file closes.
        self.drain();
    }
}
