//! io: the IOManager — spill files on local disks through io_uring.
//!
//! # What it owns
//!
//! - [`Storage`], the seam every spill byte goes through, with three
//!   implementations side by side: [`uring`] (io_uring, O_DIRECT, registered
//!   buffers, optional SQPOLL, one ring per spill directory), [`threadpool`]
//!   (pread/pwrite on std threads: the fallback when io_uring is refused) and
//!   [`sim`] (seeded faults: latency, ENOSPC, short writes, bit flips).
//! - [`BufPool`]/[`AlignedBuf`]: 4096-aligned buffers, allocated and touched
//!   at start-up, never grown. A buffer is moved into an operation and comes
//!   back with its completion; no borrow crosses the kernel boundary.
//! - [`IoManager`]: chooses the backend (`auto | uring | threadpool`), creates
//!   `strata-io-<pid>-<random>/` in each of `io.tmp.dirs`, removes those of
//!   dead processes, and hands out [`SpillWriter`]s round-robin over the
//!   directories.
//! - Spill files ([`SpillWriter`], [`SpillReader`], [`SpillFile`]): blocks of
//!   header + payload padded to 4096 (see [`block`]), crc32c per block,
//!   verified on read. A writer can also read back the blocks it wrote
//!   ([`SpillWriter::read_block`]): checkpoints copy live spilled state.
//!
//! # How it is used
//!
//! Tasks run on their own threads, so the API blocks; it pipelines inside: a
//! writer keeps one write in flight per buffer it reserved and waits only
//! when it needs a buffer back; a reader reads ahead the same way.
//!
//! ```no_run
//! # fn main() -> Result<(), strata::io::IoError> {
//! use strata::io::{IoConfig, IoManager, SpillOptions};
//! let tmp_dirs = vec!["/data1/tmp".into(), "/data2/tmp".into()];
//! let io = IoManager::new(IoConfig { tmp_dirs, ..IoConfig::default() })?;
//! println!("{}", io.summary()); // backend, fallback reason, O_DIRECT per dir
//! let mut writer = io.create_spill_writer(SpillOptions::default())?;
//! writer.write_block(b"a sorted run, serialized")?;
//! let mut reader = io.create_spill_reader(writer.finish()?, SpillOptions::default())?;
//! while let Some(payload) = reader.next_block()? {
//!     assert_eq!(payload, b"a sorted run, serialized");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Invariants
//!
//! - Every block read is verified (header crc, length, index, payload crc)
//!   before its bytes are returned; a mismatch is [`IoError::CorruptBlock`].
//! - A spill file is deleted when its owner (writer, reader or [`SpillFile`])
//!   is dropped, unless kept; a write that hits ENOSPC removes its file at once.
//! - Nothing closes a file or frees a buffer while the kernel may use it:
//!   writers, readers and backends wait for their in-flight operations first.
//!
//! # Limits
//!
//! - Operations in flight per directory: `IoConfig::queue_depth`; buffers in
//!   the whole manager: `buf_count_max × buf_size_bytes`, reserved per writer
//!   or reader (`SpillOptions::buf_count`) and refused with
//!   [`IoError::BuffersExhausted`] past the pool — size the pool by summing
//!   the consumers.
//! - A block carries at most `buf_size_bytes - 32` payload bytes.

pub mod block;
mod buf;
mod manager;
mod reader;
pub mod sim;
mod spill;
mod storage;
mod sys;
pub mod threadpool;
pub mod uring;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use block::BlockField;
pub use buf::{AlignedBuf, BufPool};
pub use manager::{
    BackendChoice, FallbackReason, IoConfig, IoManager, STALE_MARKERLESS_AGE, SpillDir,
    SpillOptions, clean_stale,
};
pub use reader::SpillReader;
pub use sim::{SimOptions, SimStorage};
pub use spill::{ALLOCATE_CHUNK_BYTES, SpillFile};
pub use storage::{Completion, FileId, Op, OpKind, Storage, Ticket};
pub use threadpool::ThreadPoolStorage;
pub use uring::{UringRefusal, UringStorage};
pub use writer::SpillWriter;

/// O_DIRECT alignment of offsets, lengths and buffer addresses.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// The backend a manager runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Uring,
    ThreadPool,
    Sim,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uring => "io_uring",
            Self::ThreadPool => "threadpool",
            Self::Sim => "sim",
        })
    }
}

/// Errors of the io module; each names the file (and offset) involved.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error(
        "no space left on device while spilling to {path}; the partial file was removed. \
         Free space there or add directories to io.tmp.dirs"
    )]
    NoSpace { path: PathBuf },
    #[error("I/O error on {path} at offset {offset}: {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error(
        "corrupt spill block in {path} at offset {offset}: {field:?} expected {expected:#x}, \
         found {found:#x}"
    )]
    CorruptBlock {
        path: PathBuf,
        offset: u64,
        field: BlockField,
        expected: u64,
        found: u64,
    },
    #[error("io_uring unavailable: {reason}")]
    UringUnavailable { reason: UringRefusal },
    #[error("spill directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "spill block payload of {payload_len} bytes exceeds the maximum of {payload_bytes_max}"
    )]
    BlockTooLarge {
        payload_len: usize,
        payload_bytes_max: usize,
    },
    #[error(
        "I/O buffer pool exhausted: requested {requested} buffers, {free} of {buf_count_max} \
         free; raise the pool size or lower the buffers per spill writer/reader"
    )]
    BuffersExhausted {
        requested: usize,
        free: usize,
        buf_count_max: usize,
    },
}
