//! io_uring backend: one ring per spill directory, O_DIRECT, registered
//! buffers when the memlock limit allows, optional SQPOLL.
//!
//! Threads share a ring with a leader/follower scheme instead of a completion
//! thread: every submission-queue access happens under the state mutex, and a
//! thread that must wait (for its ticket, or for a free queue entry) either
//! becomes the one *reaper* — releases the mutex, blocks in `io_uring_enter`
//! for at least one completion, then files all completions into their slots —
//! or sleeps on the condition variable until the reaper is done. No thread hop
//! per operation, and a waiting thread never blocks others' submissions.
//!
//! In-flight operations are bounded by `queue_depth` ≤ the SQ size, and the CQ
//! is twice the SQ, so neither queue can overflow. Each in-flight operation owns
//! its buffer inside its slot until its completion is filed; dropping the
//! backend first waits for every in-flight operation.
#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};

use io_uring::{IoUring, opcode, squeue, types};

use super::buf::BufPool;
use super::storage::{
    Completion, FileId, FileTable, Op, OpKind, Slots, Storage, Ticket, open_file,
};
use super::sys;

/// Why io_uring could not be used; shown in logs and the run summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UringRefusal {
    /// `kernel.io_uring_disabled` is 1 (restricted to a group) or 2 (off).
    DisabledBySysctl { value: u8 },
    /// ENOSYS: kernel before 5.1 or built without io_uring.
    NotSupported,
    /// EPERM/EACCES: a seccomp profile (most container runtimes) or an LSM.
    PermissionDenied { errno: i32 },
    /// Any other setup failure, e.g. ENOMEM under a small memlock limit.
    SetupFailed { errno: i32 },
}

impl UringRefusal {
    /// Classifies a failed `io_uring_setup`; `sysctl` is the current value of
    /// `/proc/sys/kernel/io_uring_disabled`, if readable.
    pub fn classify(err: &io::Error, sysctl: Option<u8>) -> Self {
        let errno = err.raw_os_error().unwrap_or(0);
        match (errno, sysctl) {
            (libc::ENOSYS, _) => Self::NotSupported,
            (libc::EPERM | libc::EACCES, Some(value)) if value > 0 => {
                Self::DisabledBySysctl { value }
            }
            (libc::EPERM | libc::EACCES, _) => Self::PermissionDenied { errno },
            _ => Self::SetupFailed { errno },
        }
    }
}

impl fmt::Display for UringRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DisabledBySysctl { value } => write!(f, "kernel.io_uring_disabled = {value}"),
            Self::NotSupported => write!(f, "kernel without io_uring (ENOSYS)"),
            Self::PermissionDenied { errno } => write!(
                f,
                "io_uring_setup refused ({}): seccomp profile or LSM",
                io::Error::from_raw_os_error(*errno)
            ),
            Self::SetupFailed { errno } => {
                write!(
                    f,
                    "io_uring_setup failed: {}",
                    io::Error::from_raw_os_error(*errno)
                )
            }
        }
    }
}

/// Reads `/proc/sys/kernel/io_uring_disabled` (absent before Linux 6.6).
pub fn io_uring_disabled_sysctl() -> Option<u8> {
    let text = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    text.trim().parse().ok()
}

/// Settings of one ring.
#[derive(Debug, Clone)]
pub struct UringOptions {
    /// Operations in flight at most (the SQ is this rounded up to a power of 2).
    pub queue_depth: u32,
    /// A kernel thread polls the SQ; it sleeps after `sqpoll_idle_ms` idle.
    pub sqpoll: bool,
    pub sqpoll_idle_ms: u32,
    /// Open files with O_DIRECT (decided per directory by the manager's probe).
    pub direct: bool,
}

pub struct UringStorage {
    // Field order is drop order: the ring (and its buffer registration) goes
    // before the files and before the pool whose memory it registered.
    ring: IoUring,
    state: Mutex<State>,
    reaped: Condvar,
    options: UringOptions,
    /// The registered pool, kept alive while the ring references its memory.
    fixed: Option<BufPool>,
}

struct State {
    slots: Slots<Op>,
    files: FileTable<File>,
    /// One thread at a time blocks in the kernel and owns the CQ.
    reaping: bool,
}

impl UringStorage {
    /// Creates a ring and, when `pool` is given and the memlock limit allows,
    /// registers the pool's buffers. Returns why registration was skipped.
    pub fn new(
        options: UringOptions,
        pool: Option<&BufPool>,
    ) -> io::Result<(Self, Option<String>)> {
        assert!(options.queue_depth > 0);
        let entries = options.queue_depth.next_power_of_two();
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries * 2);
        if options.sqpoll {
            builder.setup_sqpoll(options.sqpoll_idle_ms);
        }
        let ring = builder.build(entries)?;
        let (fixed, skipped) = match pool {
            Some(pool) => match register(&ring, pool) {
                Ok(()) => (Some(pool.clone()), None),
                Err(reason) => (None, Some(reason)),
            },
            None => (None, Some("no buffer pool given".to_string())),
        };
        let state = State {
            slots: Slots::new(),
            files: FileTable::new(),
            reaping: false,
        };
        let storage = Self {
            ring,
            state: Mutex::new(state),
            reaped: Condvar::new(),
            options,
            fixed,
        };
        Ok((storage, skipped))
    }

    pub fn fixed_buffers(&self) -> bool {
        self.fixed.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("uring state lock")
    }

    fn entry(&self, op: &Op, fd: types::Fd) -> squeue::Entry {
        let ptr = op.buf.base_ptr().wrapping_add(op.start);
        let len = u32::try_from(op.io_len()).expect("op length fits u32");
        let fixed = self.fixed.as_ref().filter(|pool| op.buf.is_from(pool));
        let buf_index = u16::try_from(op.buf.buf_index()).expect("pool has ≤ u16::MAX buffers");
        match (op.kind, fixed) {
            (OpKind::Write, Some(_)) => opcode::WriteFixed::new(fd, ptr, len, buf_index)
                .offset(op.offset)
                .build(),
            (OpKind::Read, Some(_)) => opcode::ReadFixed::new(fd, ptr, len, buf_index)
                .offset(op.offset)
                .build(),
            (OpKind::Write, None) => opcode::Write::new(fd, ptr, len).offset(op.offset).build(),
            (OpKind::Read, None) => opcode::Read::new(fd, ptr, len).offset(op.offset).build(),
        }
    }

    /// Pushes one entry, retrying while the SQ is full (only possible under
    /// SQPOLL, whose kernel thread drains the SQ on its own schedule).
    fn push(&self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every SQ access happens under the state mutex, held by the
            // caller, so no other `SubmissionQueue` exists. The entry's buffer
            // is owned by the op stored in its slot until its completion is
            // filed, and the file stays open while ops on it are in flight.
            let pushed = unsafe { self.ring.submission_shared().push(entry) }.is_ok();
            if pushed {
                return;
            }
            enter(|| self.ring.submit());
            if self.options.sqpoll {
                enter(|| self.ring.submitter().squeue_wait());
            }
        }
    }

    /// Waits for the reaper, or becomes it. Called with at least one operation
    /// in flight, so the kernel always has a completion to give.
    fn make_progress<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if state.reaping {
            return self.reaped.wait(state).expect("uring state lock");
        }
        assert!(state.slots.in_flight > 0, "waiting with nothing in flight");
        state.reaping = true;
        drop(state);
        enter(|| self.ring.submit_and_wait(1));
        // SAFETY: only the thread that set `reaping` touches the CQ.
        let reaped: Vec<(u64, i32)> = unsafe { self.ring.completion_shared() }
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        let mut state = self.lock();
        for (user_data, result) in reaped {
            let index = u32::try_from(user_data).expect("user_data is a slot index");
            state.slots.complete(index, |op| Completion {
                buf: op.buf,
                result: completion_result(result),
            });
        }
        state.reaping = false;
        self.reaped.notify_all();
        state
    }
}

fn completion_result(result: i32) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::from_raw_os_error(-result))
    } else {
        Ok(result as usize)
    }
}

/// Runs an `io_uring_enter` call, retrying on EINTR. EAGAIN/EBUSY mean the
/// kernel took fewer entries for now; the rest go with the next enter.
fn enter(call: impl Fn() -> io::Result<usize>) {
    loop {
        match call() {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => return,
            Err(e) => panic!("io_uring_enter failed on a valid ring: {e}"),
        }
    }
}

/// Registers `pool` as fixed buffers, unless the memlock limit forbids it.
fn register(ring: &IoUring, pool: &BufPool) -> Result<(), String> {
    let (limit_bytes, is_root) = sys::memlock_limit_bytes();
    let pinned_bytes = pool.total_bytes() as u64;
    if !is_root && pinned_bytes > limit_bytes {
        return Err(format!(
            "RLIMIT_MEMLOCK {limit_bytes} bytes < buffer pool {pinned_bytes} bytes \
             (raise `ulimit -l`)"
        ));
    }
    let iovecs = pool.iovecs();
    // SAFETY: the iovecs cover the pool's region, which stays allocated while
    // `UringStorage::fixed` holds a clone of the pool; the ring is dropped (and
    // the registration released) before that field.
    let result = unsafe { ring.submitter().register_buffers(&iovecs) };
    result.map_err(|e| format!("register_buffers failed: {e}"))
}

impl Storage for UringStorage {
    fn open(&self, path: &Path, create: bool) -> io::Result<FileId> {
        let file = open_file(path, create, self.options.direct)?;
        Ok(self.lock().files.insert(file))
    }

    fn close(&self, file: FileId) {
        drop(self.lock().files.remove(file));
    }

    fn allocate(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        let file = self.lock().files.get(file).try_clone()?;
        sys::fallocate(&file, offset, len)
    }

    fn set_len(&self, file: FileId, len: u64) -> io::Result<()> {
        let file = self.lock().files.get(file).try_clone()?;
        file.set_len(len)
    }

    fn submit(&self, op: Op) -> Ticket {
        let mut state = self.lock();
        while state.slots.in_flight >= self.options.queue_depth as usize {
            state = self.make_progress(state);
        }
        let fd = types::Fd(state.files.get(op.file).as_raw_fd());
        let entry = self.entry(&op, fd);
        let index = state.slots.insert(op);
        self.push(&entry.user_data(u64::from(index)));
        enter(|| self.ring.submit());
        Ticket(index)
    }

    fn wait(&self, ticket: Ticket) -> Completion {
        let mut state = self.lock();
        loop {
            if let Some(completion) = state.slots.take_done(ticket.0) {
                return completion;
            }
            state = self.make_progress(state);
        }
    }

    fn queue_depth(&self) -> usize {
        self.options.queue_depth as usize
    }
}

impl Drop for UringStorage {
    fn drop(&mut self) {
        // The kernel may still write into buffers of in-flight operations:
        // wait for all of them before the ring, the files and the pool go.
        let mut state = self.lock();
        while state.slots.in_flight > 0 {
            state = self.make_progress(state);
        }
    }
}
