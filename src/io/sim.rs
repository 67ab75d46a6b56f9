//! Simulated storage: real files, injected faults, all decided by one seed.
//!
//! Operations run synchronously in submission order on the submitting thread,
//! so with the same seed and the same calls every fault lands at the same byte.
//! Faults: added latency (slept in `wait`), ENOSPC once `space_bytes_max`
//! bytes were written (the write that crosses it is short, as on ext4),
//! short writes, and bit flips in data read. Files are real (buffered, no
//! O_DIRECT), so tests can check what is left on disk.
//!
//! A failing test prints `seed=<n>`; `STRATA_SIM_SEED=<n>` replays it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::DIRECT_IO_ALIGN;
use super::storage::{
    Completion, FileId, FileTable, Op, OpKind, Slots, Storage, Ticket, open_file,
};
use super::threadpool::transfer;

/// Parts per million, for fault probabilities.
pub const PPM: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    pub seed: u64,
    /// Each operation completes after a uniform delay in `[0, latency_max]`.
    pub latency_max: Duration,
    /// Bytes all writes together may store before ENOSPC; `None`: no limit.
    pub space_bytes_max: Option<u64>,
    /// Chance (ppm) that a write stores only an aligned prefix of its range.
    pub short_write_ppm: u32,
    /// Chance (ppm) that a read flips one bit of the data it returns.
    pub bit_flip_ppm: u32,
    pub queue_depth: usize,
}

impl SimOptions {
    /// No faults, with the seed from `STRATA_SIM_SEED` or `default_seed`.
    pub fn from_env(default_seed: u64) -> Self {
        let seed = std::env::var("STRATA_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_seed);
        Self {
            seed,
            latency_max: Duration::ZERO,
            space_bytes_max: None,
            short_write_ppm: 0,
            bit_flip_ppm: 0,
            queue_depth: 32,
        }
    }
}

/// A bit the simulator flipped: file, absolute byte offset, bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimFlip {
    pub file: FileId,
    pub offset: u64,
    pub bit: u8,
}

pub struct SimStorage {
    options: SimOptions,
    state: Mutex<State>,
}

struct State {
    rng: SimRng,
    files: FileTable<File>,
    slots: Slots<()>,
    /// Latency drawn for each done slot, slept by `wait`.
    latency: Vec<Duration>,
    bytes_written: u64,
    flips: Vec<SimFlip>,
}

impl SimStorage {
    pub fn new(options: SimOptions) -> Self {
        assert!(options.short_write_ppm <= PPM && options.bit_flip_ppm <= PPM);
        let state = State {
            rng: SimRng::new(options.seed),
            files: FileTable::new(),
            slots: Slots::new(),
            latency: Vec::new(),
            bytes_written: 0,
            flips: Vec::new(),
        };
        Self {
            options,
            state: Mutex::new(state),
        }
    }

    pub fn seed(&self) -> u64 {
        self.options.seed
    }

    /// Every bit flipped so far, in order.
    pub fn flips(&self) -> Vec<SimFlip> {
        self.lock().flips.clone()
    }

    pub fn bytes_written(&self) -> u64 {
        self.lock().bytes_written
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("sim state lock")
    }

    fn write(&self, state: &mut State, op: &mut Op) -> io::Result<usize> {
        let space_left = self
            .options
            .space_bytes_max
            .map_or(u64::MAX, |max| max.saturating_sub(state.bytes_written));
        let mut len = op.io_len();
        if (len as u64) > space_left {
            len = align_down(space_left as usize);
            if len == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        } else if len > DIRECT_IO_ALIGN && state.rng.chance(self.options.short_write_ppm) {
            len = align_down(state.rng.below(len as u64) as usize).max(DIRECT_IO_ALIGN);
        }
        let end = op.buf.len();
        op.buf.set_len(op.start + len);
        let result = transfer(state.files.get(op.file), op);
        op.buf.set_len(end);
        state.bytes_written += *result.as_ref().unwrap_or(&0) as u64;
        result
    }

    fn read(&self, state: &mut State, op: &mut Op) -> io::Result<usize> {
        let count = transfer(state.files.get(op.file), op)?;
        if count > 0 && state.rng.chance(self.options.bit_flip_ppm) {
            let byte_index = state.rng.below(count as u64) as usize;
            let bit = state.rng.below(8) as u8;
            op.buf.as_mut_slice()[op.start + byte_index] ^= 1 << bit;
            let offset = op.offset + byte_index as u64;
            state.flips.push(SimFlip {
                file: op.file,
                offset,
                bit,
            });
        }
        Ok(count)
    }
}

fn align_down(len: usize) -> usize {
    len / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN
}

impl Storage for SimStorage {
    fn open(&self, path: &Path, create: bool) -> io::Result<FileId> {
        let file = open_file(path, create, false)?;
        Ok(self.lock().files.insert(file))
    }

    fn close(&self, file: FileId) {
        drop(self.lock().files.remove(file));
    }

    /// Space is accounted on writes, so reserving is a no-op here.
    fn allocate(&self, _file: FileId, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn set_len(&self, file: FileId, len: u64) -> io::Result<()> {
        self.lock().files.get(file).set_len(len)
    }

    fn submit(&self, mut op: Op) -> Ticket {
        let mut state = self.lock();
        let result = match op.kind {
            OpKind::Write => self.write(&mut state, &mut op),
            OpKind::Read => self.read(&mut state, &mut op),
        };
        let max_nanos = self.options.latency_max.as_nanos() as u64;
        let latency = Duration::from_nanos(state.rng.below(max_nanos.saturating_add(1)));
        let index = state.slots.insert(());
        state.slots.complete(index, |()| Completion {
            buf: op.buf,
            result,
        });
        if state.latency.len() <= index as usize {
            state.latency.resize(index as usize + 1, Duration::ZERO);
        }
        state.latency[index as usize] = latency;
        Ticket(index)
    }

    fn wait(&self, ticket: Ticket) -> Completion {
        let mut state = self.lock();
        let latency = state.latency[ticket.0 as usize];
        let completion = state
            .slots
            .take_done(ticket.0)
            .expect("sim ops complete on submit");
        drop(state);
        std::thread::sleep(latency);
        completion
    }

    fn queue_depth(&self) -> usize {
        self.options.queue_depth
    }
}

/// splitmix64: tiny, seedable, good enough to place faults.
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, bound)`; `bound` must be non-zero.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    pub fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.below(u64::from(PPM)) < u64::from(ppm)
    }
}
