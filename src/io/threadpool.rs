//! Thread-pool backend: std threads doing `pread`/`pwrite`, used when io_uring
//! is refused (old kernel, seccomp, `kernel.io_uring_disabled`) or forced by
//! configuration. Same `Storage` contract as io_uring: up to `queue_depth`
//! operations queued or running, buffers owned by the operation until done.
//!
//! Each worker blocks in one syscall at a time, so `threads` is the device
//! queue depth this backend reaches; `queue_depth` bounds what is queued.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::storage::{
    Completion, FileId, FileTable, Op, OpKind, Slots, Storage, Ticket, open_file,
};
use super::sys;

#[derive(Debug, Clone)]
pub struct ThreadPoolOptions {
    /// Worker threads (each blocks in one pread/pwrite at a time).
    pub threads: usize,
    /// Operations queued or running at most.
    pub queue_depth: usize,
    /// Open files with O_DIRECT.
    pub direct: bool,
}

pub struct ThreadPoolStorage {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    options: ThreadPoolOptions,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when work is queued or on shutdown.
    queued: Condvar,
    /// Signalled when an operation completes.
    completed: Condvar,
}

struct State {
    queue: VecDeque<(u32, Op, Arc<File>)>,
    slots: Slots<()>,
    files: FileTable<Arc<File>>,
    shutdown: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("thread pool state lock")
    }
}

impl ThreadPoolStorage {
    pub fn new(options: ThreadPoolOptions) -> io::Result<Self> {
        assert!(options.threads > 0 && options.queue_depth > 0);
        let state = State {
            queue: VecDeque::with_capacity(options.queue_depth),
            slots: Slots::new(),
            files: FileTable::new(),
            shutdown: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            queued: Condvar::new(),
            completed: Condvar::new(),
        });
        let workers = (0..options.threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("strata-io-{i}"))
                    .spawn(move || worker(&shared))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            shared,
            workers,
            options,
        })
    }

    fn file(&self, file: FileId) -> Arc<File> {
        self.shared.lock().files.get(file).clone()
    }
}

fn worker(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        let Some((index, mut op, file)) = state.queue.pop_front() else {
            if state.shutdown {
                return;
            }
            state = shared.queued.wait(state).expect("thread pool state lock");
            continue;
        };
        drop(state);
        let result = transfer(&file, &mut op);
        state = shared.lock();
        state.slots.complete(index, |()| Completion {
            buf: op.buf,
            result,
        });
        shared.completed.notify_all();
    }
}

/// One pread/pwrite; a short count is returned as is, like the kernel's.
pub(super) fn transfer(file: &File, op: &mut Op) -> io::Result<usize> {
    let start = op.start;
    loop {
        let result = match op.kind {
            OpKind::Write => file.write_at(&op.buf.as_slice()[start..], op.offset),
            OpKind::Read => file.read_at(&mut op.buf.as_mut_slice()[start..], op.offset),
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl Storage for ThreadPoolStorage {
    fn open(&self, path: &Path, create: bool) -> io::Result<FileId> {
        let file = open_file(path, create, self.options.direct)?;
        Ok(self.shared.lock().files.insert(Arc::new(file)))
    }

    fn close(&self, file: FileId) {
        drop(self.shared.lock().files.remove(file));
    }

    fn allocate(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        sys::fallocate(&self.file(file), offset, len)
    }

    fn set_len(&self, file: FileId, len: u64) -> io::Result<()> {
        self.file(file).set_len(len)
    }

    fn submit(&self, op: Op) -> Ticket {
        let mut state = self.shared.lock();
        while state.slots.in_flight >= self.options.queue_depth {
            state = self
                .shared
                .completed
                .wait(state)
                .expect("thread pool state lock");
        }
        let file = state.files.get(op.file).clone();
        let index = state.slots.insert(());
        state.queue.push_back((index, op, file));
        self.shared.queued.notify_one();
        Ticket(index)
    }

    fn wait(&self, ticket: Ticket) -> Completion {
        let mut state = self.shared.lock();
        loop {
            if let Some(completion) = state.slots.take_done(ticket.0) {
                return completion;
            }
            state = self
                .shared
                .completed
                .wait(state)
                .expect("thread pool state lock");
        }
    }

    fn queue_depth(&self) -> usize {
        self.options.queue_depth
    }
}

impl Drop for ThreadPoolStorage {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.queued.notify_all();
        for worker in self.workers.drain(..) {
            // A worker that panicked has already reported its panic.
            let _ = worker.join();
        }
    }
}
