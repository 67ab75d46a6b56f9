//! The IOManager: picks the backend, owns the spill directories and the
//! buffer pool, and hands out spill writers and readers round-robin over the
//! directories (Flink's `io.tmp.dirs`).
//!
//! At start it removes `strata-io-*` directories whose owner process is gone,
//! then creates `strata-io-<pid>-<random>/` in every directory with an `owner`
//! marker (`<pid> <start time in clock ticks>`, so a reused pid is not
//! mistaken for the owner). Dropping the manager removes its directories.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::buf::BufPool;
use super::reader::SpillReader;
use super::sim::{SimOptions, SimStorage};
use super::spill::SpillFile;
use super::storage::{Storage, probe_direct_io};
use super::threadpool::{ThreadPoolOptions, ThreadPoolStorage};
use super::uring::{UringOptions, UringRefusal, UringStorage, io_uring_disabled_sysctl};
use super::writer::SpillWriter;
use super::{BackendKind, IoError};

/// A directory without a readable owner marker is only taken for stale after
/// this long (it may be a manager between `mkdir` and writing the marker).
pub const STALE_MARKERLESS_AGE: Duration = Duration::from_secs(60);
const DIR_PREFIX: &str = "strata-io-";
const OWNER_MARKER: &str = "owner";

/// Which backend to use.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendChoice {
    /// io_uring, or the thread pool (with the reason logged) if refused.
    Auto,
    /// io_uring or a start-up error.
    Uring,
    ThreadPool,
    /// The fault-injecting simulator (tests).
    Sim(SimOptions),
}

#[derive(Debug, Clone)]
pub struct IoConfig {
    /// `io.tmp.dirs`; empty means the system temp directory.
    pub tmp_dirs: Vec<PathBuf>,
    pub backend: BackendChoice,
    /// Operations in flight per directory (per ring).
    pub queue_depth: u32,
    pub sqpoll: bool,
    /// Register the buffer pool with each ring (if the memlock limit allows).
    pub register_buffers: bool,
    /// O_DIRECT where the file system accepts it.
    pub direct_io: bool,
    /// Worker threads per directory for the thread-pool backend.
    pub threadpool_threads: usize,
    pub buf_size_bytes: usize,
    /// The whole pool, allocated and touched at start: writers and readers
    /// reserve their buffers from it and fail with `BuffersExhausted` past it.
    pub buf_count_max: usize,
}

impl Default for IoConfig {
    fn default() -> Self {
        Self {
            tmp_dirs: Vec::new(),
            backend: BackendChoice::Auto,
            queue_depth: 32,
            sqpoll: false,
            register_buffers: true,
            direct_io: true,
            threadpool_threads: 8,
            buf_size_bytes: 1 << 20,
            buf_count_max: 64,
        }
    }
}

/// Why the backend is not io_uring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackReason {
    /// The configuration asked for the thread pool.
    Configured,
    Uring(UringRefusal),
}

impl std::fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Configured => write!(f, "thread pool chosen by configuration"),
            Self::Uring(refusal) => write!(f, "io_uring unavailable: {refusal}"),
        }
    }
}

/// One spill directory as the manager runs it.
#[derive(Debug, Clone)]
pub struct SpillDir {
    /// This manager's own `strata-io-*` directory.
    pub path: PathBuf,
    pub direct_io: bool,
    /// Errno of the O_DIRECT probe when the file system refused it.
    pub direct_io_refused: Option<i32>,
    pub fixed_buffers: bool,
}

/// Buffers a writer or reader reserves: its pipeline depth.
#[derive(Debug, Clone, Copy)]
pub struct SpillOptions {
    pub buf_count: usize,
}

impl Default for SpillOptions {
    fn default() -> Self {
        Self { buf_count: 8 }
    }
}

pub struct IoManager {
    storages: Vec<Arc<dyn Storage>>,
    dirs: Vec<SpillDir>,
    pool: BufPool,
    backend: BackendKind,
    fallback_reason: Option<FallbackReason>,
    next_dir_index: AtomicUsize,
    next_file_index: AtomicU64,
}

/// How the io_uring rings are made; a seam so tests can refuse io_uring.
type UringSetup<'a> =
    &'a dyn Fn(UringOptions, Option<&BufPool>) -> io::Result<(UringStorage, Option<String>)>;

impl IoManager {
    pub fn new(config: IoConfig) -> Result<Self, IoError> {
        Self::with_uring_setup(config, &UringStorage::new)
    }

    fn with_uring_setup(
        mut config: IoConfig,
        uring_setup: UringSetup<'_>,
    ) -> Result<Self, IoError> {
        assert!(config.queue_depth > 0 && config.threadpool_threads > 0);
        if config.tmp_dirs.is_empty() {
            config.tmp_dirs.push(std::env::temp_dir());
        }
        for removed in clean_stale(&config.tmp_dirs) {
            let path = removed.display();
            tracing::info!(%path, "removed stale spill directory of a dead process");
        }
        let pool = BufPool::new(config.buf_size_bytes, config.buf_count_max);
        let mut manager = Self {
            storages: Vec::new(),
            dirs: Vec::new(),
            pool,
            backend: BackendKind::ThreadPool,
            fallback_reason: None,
            next_dir_index: AtomicUsize::new(0),
            next_file_index: AtomicU64::new(0),
        };
        for tmp_dir in &config.tmp_dirs {
            // Pushed one by one so that a failure removes the ones made so far.
            manager
                .dirs
                .push(create_own_dir(tmp_dir, config.direct_io)?);
        }
        let (backend, reason) = choose_backend(
            &config,
            &mut manager.dirs,
            &manager.pool,
            uring_setup,
            &mut manager.storages,
        )?;
        manager.backend = backend;
        manager.fallback_reason = reason;
        tracing::info!("{}", manager.summary());
        Ok(manager)
    }

    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Why the backend is not io_uring (`None` when it is, or for the sim).
    pub fn fallback_reason(&self) -> Option<&FallbackReason> {
        self.fallback_reason.as_ref()
    }

    pub fn spill_dirs(&self) -> &[SpillDir] {
        &self.dirs
    }

    pub fn buffer_pool(&self) -> &BufPool {
        &self.pool
    }

    /// One line for the run summary: backend, why, and per-directory modes.
    pub fn summary(&self) -> String {
        let mut line = format!("io: backend={}", self.backend);
        if let Some(reason) = &self.fallback_reason {
            line += &format!(" ({reason})");
        }
        for dir in &self.dirs {
            let direct = match dir.direct_io_refused {
                Some(errno) => format!(
                    "buffered: O_DIRECT refused, {}",
                    io::Error::from_raw_os_error(errno)
                ),
                None if dir.direct_io => "O_DIRECT".to_string(),
                None => "buffered".to_string(),
            };
            let fixed = if dir.fixed_buffers {
                ", fixed buffers"
            } else {
                ""
            };
            line += &format!("; {} [{direct}{fixed}]", dir.path.display());
        }
        line
    }

    /// A writer on a new spill file in the next directory (round-robin).
    pub fn create_spill_writer(&self, options: SpillOptions) -> Result<SpillWriter, IoError> {
        let dir_index = self.next_dir_index.fetch_add(1, Ordering::Relaxed) % self.dirs.len();
        let file_index = self.next_file_index.fetch_add(1, Ordering::Relaxed);
        let path = self.dirs[dir_index]
            .path
            .join(format!("spill-{file_index:08}.blk"));
        let bufs = self.pool.try_acquire(options.buf_count)?;
        SpillWriter::new(self.storages[dir_index].clone(), path, bufs)
    }

    /// A reader over a finished spill file.
    pub fn create_spill_reader(
        &self,
        file: SpillFile,
        options: SpillOptions,
    ) -> Result<SpillReader, IoError> {
        let bufs = self.pool.try_acquire(options.buf_count)?;
        Ok(SpillReader::new(file, bufs))
    }

    /// Opens a kept spill file by path, rebuilding its block index.
    pub fn open_spill_file(&self, path: PathBuf) -> Result<SpillFile, IoError> {
        let dir_index = self
            .dirs
            .iter()
            .position(|dir| path.starts_with(&dir.path))
            .unwrap_or(0);
        let buf = self.pool.try_acquire(1)?.pop().expect("one buffer");
        SpillFile::open(self.storages[dir_index].clone(), path, buf)
    }
}

impl IoManager {
    /// Removes the spill directories now (a TaskManager shutting down,
    /// once its tasks have stopped): the process may exit before the last
    /// thread holding this manager drops it. Dropping it later finds them
    /// gone.
    pub fn remove_spill_dirs(&self) {
        for dir in &self.dirs {
            match std::fs::remove_dir_all(&dir.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let path = dir.path.display();
                    tracing::warn!(%path, error = %e, "could not remove spill directory");
                }
            }
        }
    }
}

impl Drop for IoManager {
    fn drop(&mut self) {
        self.remove_spill_dirs();
    }
}

/// Creates the storage of every directory: one ring each, or one thread pool
/// each; returns the backend and why it is not io_uring.
fn choose_backend(
    config: &IoConfig,
    dirs: &mut [SpillDir],
    pool: &BufPool,
    uring_setup: UringSetup<'_>,
    storages: &mut Vec<Arc<dyn Storage>>,
) -> Result<(BackendKind, Option<FallbackReason>), IoError> {
    let reason = match &config.backend {
        BackendChoice::Sim(options) => {
            for (index, _) in dirs.iter().enumerate() {
                let seed = options.seed.wrapping_add(index as u64);
                storages.push(Arc::new(SimStorage::new(SimOptions {
                    seed,
                    ..options.clone()
                })));
            }
            return Ok((BackendKind::Sim, None));
        }
        BackendChoice::ThreadPool => FallbackReason::Configured,
        BackendChoice::Auto | BackendChoice::Uring => {
            match uring_storages(config, dirs, pool, uring_setup) {
                Ok(rings) => {
                    storages.extend(rings);
                    return Ok((BackendKind::Uring, None));
                }
                Err(refusal) if config.backend == BackendChoice::Uring => {
                    return Err(IoError::UringUnavailable { reason: refusal });
                }
                Err(refusal) => {
                    let reason = &refusal;
                    tracing::warn!(%reason, "io_uring unavailable; spilling via the thread pool");
                    FallbackReason::Uring(refusal)
                }
            }
        }
    };
    for dir in dirs.iter() {
        let options = ThreadPoolOptions {
            threads: config.threadpool_threads,
            queue_depth: config.queue_depth as usize,
            direct: dir.direct_io,
        };
        let storage = ThreadPoolStorage::new(options).map_err(|source| IoError::Directory {
            path: dir.path.clone(),
            source,
        })?;
        storages.push(Arc::new(storage));
    }
    Ok((BackendKind::ThreadPool, Some(reason)))
}

fn uring_storages(
    config: &IoConfig,
    dirs: &mut [SpillDir],
    pool: &BufPool,
    uring_setup: UringSetup<'_>,
) -> Result<Vec<Arc<dyn Storage>>, UringRefusal> {
    let mut rings: Vec<Arc<dyn Storage>> = Vec::with_capacity(dirs.len());
    for dir in dirs.iter_mut() {
        let options = UringOptions {
            queue_depth: config.queue_depth,
            sqpoll: config.sqpoll,
            sqpoll_idle_ms: 100,
            direct: dir.direct_io,
        };
        let registered = config.register_buffers.then_some(pool);
        let (ring, skipped) = uring_setup(options, registered)
            .map_err(|e| UringRefusal::classify(&e, io_uring_disabled_sysctl()))?;
        if let (true, Some(why)) = (config.register_buffers, &skipped) {
            let dir = dir.path.display();
            tracing::warn!(%dir, reason = %why, "io_uring without registered buffers");
        }
        dir.fixed_buffers = ring.fixed_buffers();
        rings.push(Arc::new(ring));
    }
    Ok(rings)
}

/// Creates `<tmp_dir>/strata-io-<pid>-<random>/` with its owner marker and
/// probes O_DIRECT in it.
fn create_own_dir(tmp_dir: &Path, direct_io: bool) -> Result<SpillDir, IoError> {
    let dir_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IoError::Directory { path, source }
    };
    std::fs::create_dir_all(tmp_dir).map_err(dir_error(tmp_dir))?;
    let pid = std::process::id();
    let random = RandomState::new().build_hasher().finish();
    let path = tmp_dir.join(format!("{DIR_PREFIX}{pid}-{random:016x}"));
    std::fs::create_dir(&path).map_err(dir_error(&path))?;
    let marker = format!("{pid} {}\n", process_start_ticks(pid).unwrap_or(0));
    let direct_io_refused = std::fs::write(path.join(OWNER_MARKER), marker)
        .and_then(|()| {
            if direct_io {
                probe_direct_io(&path)
            } else {
                Ok(())
            }
        })
        .map(|()| None)
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(Some(libc::EINVAL)),
            _ => Err(e),
        });
    let direct_io_refused = match direct_io_refused {
        Ok(refused) => refused,
        Err(source) => {
            let _ = std::fs::remove_dir_all(&path);
            return Err(IoError::Directory { path, source });
        }
    };
    if direct_io_refused.is_some() {
        let path = path.display();
        tracing::warn!(%path, "file system refuses O_DIRECT (EINVAL); spilling buffered");
    }
    Ok(SpillDir {
        path,
        direct_io: direct_io && direct_io_refused.is_none(),
        direct_io_refused,
        fixed_buffers: false,
    })
}

/// Removes the `strata-io-*` directories in `tmp_dirs` whose owner process
/// is gone; returns the ones removed. Errors are logged, not returned: a
/// directory that cannot be cleaned must not stop the TaskManager.
pub fn clean_stale(tmp_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for tmp_dir in tmp_dirs {
        let Ok(entries) = std::fs::read_dir(tmp_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_ours = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX);
            if !is_ours || !path.is_dir() || !is_stale(&path) {
                continue;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(e) => {
                    let path = path.display();
                    tracing::warn!(%path, error = %e, "could not remove stale spill directory")
                }
            }
        }
    }
    removed
}

fn is_stale(dir: &Path) -> bool {
    let marker = std::fs::read_to_string(dir.join(OWNER_MARKER)).ok();
    match marker.as_deref().and_then(parse_marker) {
        Some((pid, start_ticks)) => process_start_ticks(pid) != Some(start_ticks),
        None => {
            let age = std::fs::metadata(dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            age.is_some_and(|age| age > STALE_MARKERLESS_AGE)
        }
    }
}

fn parse_marker(text: &str) -> Option<(u32, u64)> {
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let start_ticks = fields.next()?.parse().ok()?;
    Some((pid, start_ticks))
}

/// Field 22 of `/proc/<pid>/stat` (start time since boot, in clock ticks), or
/// `None` when no such process exists.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
pub(super) fn new_with_uring_setup(
    config: IoConfig,
    uring_setup: UringSetup<'_>,
) -> Result<IoManager, IoError> {
    IoManager::with_uring_setup(config, uring_setup)
}

#[cfg(test)]
pub(super) fn marker_for(pid: u32, start_ticks: u64) -> String {
    format!("{pid} {start_ticks}\n")
}

#[cfg(test)]
pub(super) fn own_start_ticks() -> u64 {
    process_start_ticks(std::process::id()).expect("own /proc stat")
}
