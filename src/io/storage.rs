//! The `Storage` seam: positional reads and writes of [`AlignedBuf`]s, with up
//! to `queue_depth` operations in flight, blocking from the caller's view.
//!
//! A caller moves a buffer into [`Storage::submit`] and gets a [`Ticket`];
//! [`Storage::wait`] blocks until that operation completed and hands the buffer
//! back with the result. Submitting never waits for the *caller's own* earlier
//! operations, only for a free queue entry, which a completion always frees, so
//! one thread can keep `queue_depth` operations in flight and several threads
//! can share one backend. Every ticket must be waited exactly once: the
//! completion (and its buffer) stays parked in the backend until it is.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::buf::AlignedBuf;

/// A file opened through a backend; only valid with the backend that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub(super) u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// One positional operation on `buf[start..buf.len()]` at file offset `offset`.
#[derive(Debug)]
pub struct Op {
    pub kind: OpKind,
    pub file: FileId,
    pub offset: u64,
    pub buf: AlignedBuf,
    /// First byte of `buf` in the I/O range (non-zero when resubmitting the
    /// rest of a short transfer).
    pub start: usize,
}

impl Op {
    pub fn write(file: FileId, offset: u64, buf: AlignedBuf) -> Self {
        Self::new(OpKind::Write, file, offset, buf)
    }

    pub fn read(file: FileId, offset: u64, buf: AlignedBuf) -> Self {
        Self::new(OpKind::Read, file, offset, buf)
    }

    fn new(kind: OpKind, file: FileId, offset: u64, buf: AlignedBuf) -> Self {
        Self {
            kind,
            file,
            offset,
            buf,
            start: 0,
        }
    }

    /// Bytes this operation moves.
    pub fn io_len(&self) -> usize {
        assert!(self.start <= self.buf.len());
        self.buf.len() - self.start
    }
}

/// Claim on one submitted operation; redeem it with [`Storage::wait`].
#[must_use = "every ticket must be waited, or its buffer stays parked in the backend"]
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket(pub(super) u32);

/// A finished operation: the buffer comes back whatever the outcome.
#[derive(Debug)]
pub struct Completion {
    pub buf: AlignedBuf,
    /// Bytes transferred (possibly fewer than asked: a short transfer).
    pub result: io::Result<usize>,
}

/// What the backends have in common, so the spill layer and the tests are
/// generic over io_uring, the thread pool and the simulator.
pub trait Storage: Send + Sync {
    /// Opens (or creates and truncates) a file for positional I/O.
    fn open(&self, path: &Path, create: bool) -> io::Result<FileId>;
    /// Closes a file. No operation on it may be in flight.
    fn close(&self, file: FileId);
    /// Reserves disk space for `[offset, offset + len)` and sets the file size
    /// to at least its end, so later direct writes there are overwrites (ext4
    /// serialises size-extending direct writes; fio pre-allocates too).
    fn allocate(&self, file: FileId, offset: u64, len: u64) -> io::Result<()>;
    /// Sets the file size (drops what `allocate` reserved past the data).
    fn set_len(&self, file: FileId, len: u64) -> io::Result<()>;
    /// Queues an operation; blocks only while `queue_depth` are in flight.
    fn submit(&self, op: Op) -> Ticket;
    /// Blocks until the ticket's operation completed.
    fn wait(&self, ticket: Ticket) -> Completion;
    /// Operations the backend keeps in flight at most.
    fn queue_depth(&self) -> usize;
}

/// Opens with O_DIRECT when `direct`; files are created mode 0600 (spill data
/// is the job's data).
pub(super) fn open_file(path: &Path, create: bool, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    if create {
        options.create(true).truncate(true);
    }
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Probes whether `dir`'s file system accepts O_DIRECT. `Err` carries the
/// errno the open failed with (EINVAL on tmpfs and some overlay set-ups).
pub(super) fn probe_direct_io(dir: &Path) -> io::Result<()> {
    let path = dir.join(".strata-direct-probe");
    let result = open_file(&path, true, true).map(drop);
    let _ = std::fs::remove_file(&path);
    result
}

/// Table of open files, indexed by [`FileId`]; closed entries are reused.
pub(super) struct FileTable<T> {
    entries: Vec<Option<T>>,
}

impl<T> FileTable<T> {
    pub(super) fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    pub(super) fn insert(&mut self, value: T) -> FileId {
        let index = match self.entries.iter().position(Option::is_none) {
            Some(index) => index,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        self.entries[index] = Some(value);
        FileId(u32::try_from(index).expect("file table index"))
    }

    pub(super) fn get(&self, file: FileId) -> &T {
        self.entries[file.0 as usize]
            .as_ref()
            .expect("file is open")
    }

    pub(super) fn remove(&mut self, file: FileId) -> T {
        self.entries[file.0 as usize].take().expect("file is open")
    }
}

/// Per-backend table of submitted operations, indexed by ticket.
pub(super) struct Slots<P> {
    slots: Vec<Slot<P>>,
    free: Vec<u32>,
    /// Submitted and not yet completed: bounded by the queue depth.
    pub(super) in_flight: usize,
}

enum Slot<P> {
    Free,
    /// In the kernel or a worker; `P` is what the backend keeps meanwhile.
    Pending(P),
    Done(Completion),
}

impl<P> Slots<P> {
    pub(super) fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        }
    }

    pub(super) fn insert(&mut self, pending: P) -> u32 {
        self.in_flight += 1;
        match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = Slot::Pending(pending);
                index
            }
            None => {
                self.slots.push(Slot::Pending(pending));
                u32::try_from(self.slots.len() - 1).expect("slot index")
            }
        }
    }

    /// Marks a pending slot done; returns what the backend kept for it.
    pub(super) fn complete(&mut self, index: u32, finish: impl FnOnce(P) -> Completion) {
        let slot = std::mem::replace(&mut self.slots[index as usize], Slot::Free);
        let Slot::Pending(pending) = slot else {
            panic!("completion for slot {index} that is not pending");
        };
        self.slots[index as usize] = Slot::Done(finish(pending));
        self.in_flight -= 1;
    }

    /// Takes a done slot's completion, freeing the slot.
    pub(super) fn take_done(&mut self, index: u32) -> Option<Completion> {
        let slot = &mut self.slots[index as usize];
        match slot {
            Slot::Done(_) => {}
            Slot::Pending(_) => return None,
            Slot::Free => panic!("ticket {index} waited twice"),
        }
        let Slot::Done(completion) = std::mem::replace(slot, Slot::Free) else {
            unreachable!()
        };
        self.free.push(index);
        Some(completion)
    }
}
