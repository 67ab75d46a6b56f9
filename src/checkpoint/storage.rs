//! Checkpoint storage on a file system (`execution.checkpointing.dir`).
//!
//! Layout, one directory per job:
//!
//! ```text
//! <checkpoint_dir>/<job>/chk-<n>.inprogress/   checkpoint n while tasks write it
//! <checkpoint_dir>/<job>/chk-<n>/              checkpoint n once complete
//!     <vertex>-<subtask>.state                 one task's state (state::TaskState)
//!     _manifest.json                           the Manifest: every file with its size and CRC-32C
//! ```
//!
//! Invariants:
//! - A checkpoint is complete exactly when `chk-<n>/` exists. Every file is
//!   written under a temporary name, fsynced and renamed into place; the
//!   manifest is written last, the in-progress directory is fsynced, renamed
//!   to `chk-<n>/` (one atomic step) and the job directory fsynced. A crash
//!   at any point leaves either a complete checkpoint or an in-progress
//!   directory, which restore never reads.
//! - Restore trusts nothing on disk: [`CheckpointStorage::latest_valid`]
//!   checks the manifest, its id and every file's size and CRC-32C, and
//!   falls back to an older checkpoint with a log line naming the one it
//!   skipped and why.
//! - Retention runs after each completion: the newest
//!   `execution.checkpointing.num-retained` complete checkpoints stay, and
//!   in-progress directories of older ids go (a completed checkpoint subsumes
//!   every earlier one still in flight, as in Flink).
//!
//! Limits: the file system must make a rename atomic and a directory fsync
//! durable (a local disk, or a shared one with POSIX semantics for the
//! JobManager and TaskManagers on several machines). Sanitizing the job name
//! may map two names to one directory (`a/b` and `a_b`); the caller picks
//! names that stay distinct. The manifest's `completed_unix_ms` is the wall
//! clock, for people reading it; no decision depends on it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::CheckpointError;

const MANIFEST_FILE: &str = "_manifest.json";
const DIR_PREFIX: &str = "chk-";
const INPROGRESS_SUFFIX: &str = ".inprogress";
/// Verification streams files through the CRC in chunks of this size, so a
/// large state file is not read into memory twice.
const VERIFY_CHUNK_BYTES: usize = 64 << 10;
/// A job directory name stays well below the 255-byte file name limit.
const JOB_DIR_NAME_MAX: usize = 128;

/// One task's state file in a checkpoint, as the task acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateHandle {
    pub vertex: usize,
    pub subtask: u32,
    /// The file name inside the checkpoint directory: `<vertex>-<subtask>.state`.
    pub file: String,
    pub size_bytes: u64,
    pub crc32c: u32,
}

/// `_manifest.json`: what a complete checkpoint holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub checkpoint: u64,
    pub job: String,
    pub completed_unix_ms: u64,
    /// From trigger to completion.
    pub duration_ms: u64,
    /// The sum of the files' sizes.
    pub total_bytes: u64,
    pub files: Vec<StateHandle>,
    /// Tasks (vertex, subtask) that had finished before this checkpoint: a
    /// restore starts them finished instead of replaying them.
    #[serde(default)]
    pub finished: Vec<(usize, u32)>,
}

/// A complete checkpoint that verified (or was just written).
#[derive(Clone, Debug)]
pub struct CompletedCheckpoint {
    pub id: u64,
    /// `<checkpoint_dir>/<job>/chk-<id>`.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// One job's checkpoint directory, as the JobManager sees it.
#[derive(Debug)]
pub struct CheckpointStorage {
    job_dir: PathBuf,
    job: String,
    retained: usize,
}

impl CheckpointStorage {
    /// `dir` is `execution.checkpointing.dir`; `job` names the job (it is
    /// sanitized into a directory name); `retained` is
    /// `execution.checkpointing.num-retained`, at least 1. Creates the job
    /// directory.
    pub fn new(dir: &Path, job: &str, retained: usize) -> Result<Self, CheckpointError> {
        assert!(retained >= 1, "execution.checkpointing.num-retained >= 1");
        let job_dir = dir.join(job_dir_name(job));
        fs::create_dir_all(&job_dir).map_err(io_error(&job_dir))?;
        Ok(CheckpointStorage {
            job_dir,
            job: job.to_owned(),
            retained,
        })
    }

    pub fn job_dir(&self) -> &Path {
        &self.job_dir
    }

    /// `<job_dir>/chk-<id>.inprogress`, where tasks write checkpoint `id`.
    pub fn inprogress_dir(job_dir: &Path, id: u64) -> PathBuf {
        job_dir.join(format!("{DIR_PREFIX}{id}{INPROGRESS_SUFFIX}"))
    }

    /// `<job_dir>/chk-<id>`, checkpoint `id` once complete.
    pub fn completed_dir(job_dir: &Path, id: u64) -> PathBuf {
        job_dir.join(format!("{DIR_PREFIX}{id}"))
    }

    /// Creates the in-progress directory of checkpoint `id` and returns it.
    /// One left by an earlier attempt at the same id (a failover before it
    /// completed) is emptied first: its files belong to tasks that are gone.
    pub fn begin(&self, id: u64) -> Result<PathBuf, CheckpointError> {
        let completed = Self::completed_dir(&self.job_dir, id);
        if completed.exists() {
            return Err(CheckpointError::Exists { path: completed });
        }
        let dir = Self::inprogress_dir(&self.job_dir, id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!("removed {} left by an earlier attempt", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&dir)(e)),
        }
        fs::create_dir(&dir).map_err(io_error(&dir))?;
        Ok(dir)
    }

    /// Task side: writes `<vertex>-<subtask>.state` into the in-progress
    /// directory `inprogress` atomically (temporary name, write, fsync,
    /// rename) and returns the handle the task acknowledges with.
    pub fn write_state_file(
        inprogress: &Path,
        vertex: usize,
        subtask: u32,
        bytes: &[u8],
    ) -> Result<StateHandle, CheckpointError> {
        let file = state_file_name(vertex, subtask);
        write_atomically(&inprogress.join(&file), bytes)?;
        Ok(StateHandle {
            vertex,
            subtask,
            file,
            size_bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        })
    }

    /// JobManager side, once every task acknowledged checkpoint `id` with
    /// `files`: checks that each file is there with its size, writes the
    /// manifest, renames `chk-<id>.inprogress` to `chk-<id>` durably, then
    /// applies retention. In-progress directories of smaller ids are removed
    /// with it, so the caller aborts those checkpoints (this one subsumes
    /// them). `duration` runs from the trigger to now.
    pub fn complete(
        &self,
        id: u64,
        files: Vec<StateHandle>,
        duration: Duration,
    ) -> Result<CompletedCheckpoint, CheckpointError> {
        self.complete_with_finished(id, files, Vec::new(), duration)
    }

    /// [`Self::complete`], recording tasks that had already finished.
    pub fn complete_with_finished(
        &self,
        id: u64,
        files: Vec<StateHandle>,
        finished: Vec<(usize, u32)>,
        duration: Duration,
    ) -> Result<CompletedCheckpoint, CheckpointError> {
        debug_assert!(has_unique_tasks(&files), "one state file per subtask");
        let inprogress = Self::inprogress_dir(&self.job_dir, id);
        let completed = Self::completed_dir(&self.job_dir, id);
        if completed.exists() {
            return Err(CheckpointError::Exists { path: completed });
        }
        for handle in &files {
            let path = handle_path(&inprogress, handle)?;
            let size_bytes = fs::metadata(&path).map_err(io_error(&path))?.len();
            check_size(
                &path,
                size_bytes,
                handle.size_bytes,
                "the task acknowledged",
            )?;
        }
        let manifest = Manifest {
            checkpoint: id,
            job: self.job.clone(),
            completed_unix_ms: unix_ms_now(),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            total_bytes: files.iter().map(|f| f.size_bytes).sum(),
            files,
            finished,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        write_atomically(&inprogress.join(MANIFEST_FILE), &json)?;
        sync_dir(&inprogress)?;
        fs::rename(&inprogress, &completed).map_err(io_error(&inprogress))?;
        sync_dir(&self.job_dir)?;
        self.apply_retention(id);
        Ok(CompletedCheckpoint {
            id,
            dir: completed,
            manifest,
        })
    }

    /// Removes aborted checkpoint `id`'s in-progress directory. Best effort:
    /// a failure is logged, and the next completion's retention retries.
    pub fn abort(&self, id: u64) {
        let dir = Self::inprogress_dir(&self.job_dir, id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => tracing::debug!("removed aborted checkpoint {}", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove aborted checkpoint {}: {e}", dir.display()),
        }
    }

    /// The newest complete checkpoint that verifies: its manifest parses and
    /// names this id, and every file has the manifest's size and CRC-32C.
    /// Each newer one skipped is logged with the reason and the checkpoint
    /// used instead. `Ok(None)` when none verifies. `Err` only when the job
    /// directory cannot be listed.
    pub fn latest_valid(&self) -> Result<Option<CompletedCheckpoint>, CheckpointError> {
        let (found, skipped) = self.scan()?;
        let instead = match &found {
            Some(checkpoint) => format!("falling back to {DIR_PREFIX}{}", checkpoint.id),
            None => "no older checkpoint verifies".to_owned(),
        };
        for (id, reason) in &skipped {
            tracing::warn!("checkpoint {DIR_PREFIX}{id} is unusable ({reason}); {instead}");
        }
        Ok(found)
    }

    /// Reads one state file of the complete checkpoint in `checkpoint_dir`,
    /// verifying its size and CRC-32C against `handle`.
    pub fn read_state_file(
        checkpoint_dir: &Path,
        handle: &StateHandle,
    ) -> Result<Vec<u8>, CheckpointError> {
        let path = handle_path(checkpoint_dir, handle)?;
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        check_size(
            &path,
            bytes.len() as u64,
            handle.size_bytes,
            "the manifest says",
        )?;
        check_crc(&path, crc32c::crc32c(&bytes), handle.crc32c)?;
        Ok(bytes)
    }

    /// The newest complete checkpoint that verifies, and every newer one
    /// that did not, newest first, with the reason.
    fn scan(&self) -> Result<ScanResult, CheckpointError> {
        let mut ids = list(&self.job_dir)?.completed;
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut skipped = Vec::new();
        for id in ids {
            let dir = Self::completed_dir(&self.job_dir, id);
            match verify(&dir, id) {
                Ok(manifest) => {
                    let checkpoint = CompletedCheckpoint { id, dir, manifest };
                    return Ok((Some(checkpoint), skipped));
                }
                Err(reason) => skipped.push((id, reason)),
            }
        }
        Ok((None, skipped))
    }

    /// Keeps `newest` and the `retained - 1` complete checkpoints below it;
    /// removes older complete ones and older in-progress ones. Ids above
    /// `newest` (which a coordinator that resumes numbering never leaves)
    /// are left alone. Failures are logged: the checkpoint is complete.
    fn apply_retention(&self, newest: u64) {
        let listing = match list(&self.job_dir) {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!("checkpoint retention skipped: {e}");
                return;
            }
        };
        let mut older: Vec<u64> = listing
            .completed
            .into_iter()
            .filter(|id| *id < newest)
            .collect();
        older.sort_unstable_by(|a, b| b.cmp(a));
        let expired = older.into_iter().skip(self.retained - 1);
        let expired = expired.map(|id| Self::completed_dir(&self.job_dir, id));
        let subsumed = listing.inprogress.into_iter().filter(|id| *id < newest);
        let subsumed = subsumed.map(|id| Self::inprogress_dir(&self.job_dir, id));
        for dir in expired.chain(subsumed) {
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::debug!("removed checkpoint {}", dir.display()),
                Err(e) => tracing::warn!("cannot remove checkpoint {}: {e}", dir.display()),
            }
        }
    }
}

type ScanResult = (Option<CompletedCheckpoint>, Vec<(u64, CheckpointError)>);

/// The checkpoint directories in a job directory, by id; other entries are ignored.
#[derive(Debug, Default)]
struct Listing {
    completed: Vec<u64>,
    inprogress: Vec<u64>,
}

fn list(job_dir: &Path) -> Result<Listing, CheckpointError> {
    let mut listing = Listing::default();
    for entry in fs::read_dir(job_dir).map_err(io_error(job_dir))? {
        let entry = entry.map_err(io_error(job_dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        match parse_dir_name(&name) {
            Some((id, false)) => listing.completed.push(id),
            Some((id, true)) => listing.inprogress.push(id),
            None => {}
        }
    }
    Ok(listing)
}

/// `chk-<n>` → `(n, false)`, `chk-<n>.inprogress` → `(n, true)`; only the
/// spelling this module writes (no sign, no leading zeros).
fn parse_dir_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix(DIR_PREFIX)?;
    let (digits, inprogress) = match rest.strip_suffix(INPROGRESS_SUFFIX) {
        Some(digits) => (digits, true),
        None => (rest, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: u64 = digits.parse().ok()?;
    (id.to_string() == digits).then_some((id, inprogress))
}

/// Reads and checks the manifest of complete checkpoint `id` in `dir`, then
/// every file it lists.
fn verify(dir: &Path, id: u64) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    let manifest = parse_manifest(&bytes, &path, id)?;
    for handle in &manifest.files {
        verify_file(dir, handle)?;
    }
    Ok(manifest)
}

/// Parses `_manifest.json` of checkpoint `id` and checks that it is
/// consistent with itself; `path` names it in errors.
fn parse_manifest(bytes: &[u8], path: &Path, id: u64) -> Result<Manifest, CheckpointError> {
    let corrupt = |detail: String| CheckpointError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(format!("manifest does not parse: {e}")))?;
    if manifest.checkpoint != id {
        return Err(corrupt(format!(
            "manifest is for checkpoint {}, its directory for {id}",
            manifest.checkpoint
        )));
    }
    let total_bytes = manifest
        .files
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.size_bytes));
    if total_bytes != Some(manifest.total_bytes) {
        return Err(corrupt(format!(
            "manifest total of {} bytes does not match its files",
            manifest.total_bytes
        )));
    }
    Ok(manifest)
}

/// Streams one file through the CRC and compares size and checksum with `handle`.
fn verify_file(dir: &Path, handle: &StateHandle) -> Result<(), CheckpointError> {
    let path = handle_path(dir, handle)?;
    let mut file = File::open(&path).map_err(io_error(&path))?;
    let size_bytes = file.metadata().map_err(io_error(&path))?.len();
    check_size(&path, size_bytes, handle.size_bytes, "the manifest says")?;
    let mut crc = 0;
    let mut chunk = vec![0u8; VERIFY_CHUNK_BYTES];
    loop {
        let n = file.read(&mut chunk).map_err(io_error(&path))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
    }
    check_crc(&path, crc, handle.crc32c)
}

/// The file `handle` names inside `dir`. The name must be the one
/// [`state_file_name`] gives its vertex and subtask, so a manifest or an
/// acknowledgement cannot point outside the checkpoint directory.
fn handle_path(dir: &Path, handle: &StateHandle) -> Result<PathBuf, CheckpointError> {
    let expected = state_file_name(handle.vertex, handle.subtask);
    if handle.file != expected {
        return Err(CheckpointError::Corrupt {
            path: dir.to_owned(),
            detail: format!(
                "state file of vertex {} subtask {} is named {:?}, expected {expected:?}",
                handle.vertex, handle.subtask, handle.file
            ),
        });
    }
    Ok(dir.join(expected))
}

fn check_size(
    path: &Path,
    actual_bytes: u64,
    expected_bytes: u64,
    expected_by: &str,
) -> Result<(), CheckpointError> {
    if actual_bytes == expected_bytes {
        return Ok(());
    }
    Err(CheckpointError::Corrupt {
        path: path.to_owned(),
        detail: format!("{actual_bytes} bytes, {expected_by} {expected_bytes}"),
    })
}

fn check_crc(path: &Path, actual: u32, expected: u32) -> Result<(), CheckpointError> {
    if actual == expected {
        return Ok(());
    }
    Err(CheckpointError::Corrupt {
        path: path.to_owned(),
        detail: format!("CRC-32C mismatch (expected {expected:08x}, computed {actual:08x})"),
    })
}

fn state_file_name(vertex: usize, subtask: u32) -> String {
    format!("{vertex}-{subtask}.state")
}

/// ASCII letters, digits, `-`, `_` and `.` stay, anything else becomes `_`;
/// leading dots go (no hidden, `.` or `..` directories); empty becomes `job`.
fn job_dir_name(job: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let name: String = job
        .chars()
        .map(|c| if safe(c) { c } else { '_' })
        .take(JOB_DIR_NAME_MAX)
        .collect();
    let name = name.trim_start_matches('.');
    if name.is_empty() {
        "job".to_owned()
    } else {
        name.to_owned()
    }
}

/// Writes `bytes` to `path` so that a reader sees all of it or nothing:
/// a hidden temporary name in the same directory, fsync, rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let name = path.file_name().expect("a file path").to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(bytes).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    drop(file);
    fs::rename(&temporary, path).map_err(io_error(path))
}

/// Makes the directory's entries (renames into it) durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

fn has_unique_tasks(files: &[StateHandle]) -> bool {
    let mut tasks: Vec<(usize, u32)> = files.iter().map(|f| (f.vertex, f.subtask)).collect();
    tasks.sort_unstable();
    tasks.windows(2).all(|pair| pair[0] != pair[1])
}

/// For the manifest's `completed_unix_ms` only (see the module limits).
fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &[u8] = b"state of vertex 0 subtask 0";
    const B: &[u8] = b"state of vertex 1 subtask 0, a little longer";

    fn storage(root: &Path, retained: usize) -> CheckpointStorage {
        CheckpointStorage::new(root, "word count", retained).unwrap()
    }

    /// Writes both task files of checkpoint `id` and completes it.
    fn checkpoint(storage: &CheckpointStorage, id: u64) -> CompletedCheckpoint {
        let dir = storage.begin(id).unwrap();
        let files = vec![
            CheckpointStorage::write_state_file(&dir, 0, 0, A).unwrap(),
            CheckpointStorage::write_state_file(&dir, 1, 0, B).unwrap(),
        ];
        storage
            .complete(id, files, Duration::from_millis(42))
            .unwrap()
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn latest_id(storage: &CheckpointStorage) -> Option<u64> {
        storage.latest_valid().unwrap().map(|c| c.id)
    }

    #[test]
    fn a_completed_checkpoint_is_found_and_its_files_read_back() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 1);
        assert_eq!(storage.job_dir(), root.path().join("word_count"));
        let written = checkpoint(&storage, 1);
        assert_eq!(dir_names(storage.job_dir()), ["chk-1"]);
        assert_eq!(
            dir_names(&written.dir),
            ["0-0.state", "1-0.state", "_manifest.json"]
        );

        let found = storage.latest_valid().unwrap().unwrap();
        assert_eq!(found.id, 1);
        assert_eq!(found.dir, written.dir);
        assert_eq!(found.manifest, written.manifest);
        let manifest = &found.manifest;
        assert_eq!(manifest.job, "word count");
        assert_eq!(manifest.duration_ms, 42);
        assert_eq!(manifest.total_bytes, (A.len() + B.len()) as u64);
        assert!(manifest.completed_unix_ms > 0);
        let bytes: Vec<Vec<u8>> = manifest
            .files
            .iter()
            .map(|h| CheckpointStorage::read_state_file(&found.dir, h).unwrap())
            .collect();
        assert_eq!(bytes, [A, B]);
    }

    #[test]
    fn in_progress_checkpoints_are_never_returned() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 3);
        let dir = storage.begin(1).unwrap();
        CheckpointStorage::write_state_file(&dir, 0, 0, A).unwrap();
        assert_eq!(latest_id(&storage), None);

        checkpoint(&storage, 2);
        let dir = storage.begin(3).unwrap();
        CheckpointStorage::write_state_file(&dir, 0, 0, A).unwrap();
        assert_eq!(dir, CheckpointStorage::inprogress_dir(storage.job_dir(), 3));
        assert_eq!(latest_id(&storage), Some(2));
    }

    #[test]
    fn retention_keeps_the_newest_and_removes_subsumed_in_progress_ones() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 2);
        for id in 1..=4 {
            checkpoint(&storage, id);
        }
        assert_eq!(dir_names(storage.job_dir()), ["chk-3", "chk-4"]);

        storage.begin(5).unwrap();
        storage.begin(7).unwrap();
        checkpoint(&storage, 6);
        assert_eq!(
            dir_names(storage.job_dir()),
            ["chk-4", "chk-6", "chk-7.inprogress"]
        );
    }

    #[test]
    fn retention_of_one_keeps_only_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 1);
        for id in 1..=3 {
            checkpoint(&storage, id);
        }
        assert_eq!(dir_names(storage.job_dir()), ["chk-3"]);
    }

    /// Completes checkpoints 1 and 2, damages 2 with `damage`, and checks
    /// that restore falls back to 1 with a reason containing `expected`.
    fn falls_back_when(damage: impl FnOnce(&Path), expected: &str) {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 2);
        checkpoint(&storage, 1);
        let newest = checkpoint(&storage, 2);
        damage(&newest.dir);

        let (found, skipped) = storage.scan().unwrap();
        assert_eq!(found.map(|c| c.id), Some(1));
        assert_eq!(skipped.len(), 1);
        let (id, reason) = &skipped[0];
        assert_eq!(*id, 2);
        let reason = reason.to_string();
        assert!(reason.contains(expected), "{reason}");
        assert!(reason.contains("chk-2"), "{reason}");
        assert_eq!(latest_id(&storage), Some(1));
    }

    #[test]
    fn a_flipped_byte_in_a_state_file_falls_back_to_the_previous_checkpoint() {
        falls_back_when(
            |dir| {
                let path = dir.join("1-0.state");
                let mut bytes = fs::read(&path).unwrap();
                bytes[3] ^= 0x10;
                fs::write(&path, bytes).unwrap();
            },
            "1-0.state: corrupt checkpoint state: CRC-32C mismatch",
        );
    }

    #[test]
    fn a_truncated_state_file_falls_back_to_the_previous_checkpoint() {
        falls_back_when(
            |dir| fs::write(dir.join("0-0.state"), &A[..5]).unwrap(),
            "0-0.state: corrupt checkpoint state: 5 bytes, the manifest says 27",
        );
    }

    #[test]
    fn a_missing_state_file_falls_back_to_the_previous_checkpoint() {
        falls_back_when(
            |dir| fs::remove_file(dir.join("1-0.state")).unwrap(),
            "1-0.state: No such file",
        );
    }

    #[test]
    fn a_truncated_manifest_falls_back_to_the_previous_checkpoint() {
        falls_back_when(
            |dir| {
                let path = dir.join(MANIFEST_FILE);
                let bytes = fs::read(&path).unwrap();
                fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            },
            "_manifest.json: corrupt checkpoint state: manifest does not parse",
        );
    }

    #[test]
    fn a_garbage_manifest_falls_back_to_the_previous_checkpoint() {
        falls_back_when(
            |dir| fs::write(dir.join(MANIFEST_FILE), [0xff, 0x00, 0x7b]).unwrap(),
            "manifest does not parse",
        );
    }

    #[test]
    fn a_missing_manifest_falls_back_to_the_previous_checkpoint() {
        falls_back_when(
            |dir| fs::remove_file(dir.join(MANIFEST_FILE)).unwrap(),
            "_manifest.json: No such file",
        );
    }

    #[test]
    fn a_manifest_of_another_checkpoint_falls_back_to_the_previous_one() {
        falls_back_when(
            |dir| {
                let path = dir.join(MANIFEST_FILE);
                let text = fs::read_to_string(&path).unwrap();
                let text = text.replace("\"checkpoint\": 2", "\"checkpoint\": 1");
                fs::write(&path, text).unwrap();
            },
            "manifest is for checkpoint 1, its directory for 2",
        );
    }

    #[test]
    fn a_manifest_pointing_outside_the_checkpoint_falls_back() {
        falls_back_when(
            |dir| {
                let path = dir.join(MANIFEST_FILE);
                let text = fs::read_to_string(&path).unwrap();
                let text = text.replace("\"0-0.state\"", "\"../chk-1/0-0.state\"");
                fs::write(&path, text).unwrap();
            },
            "is named \"../chk-1/0-0.state\", expected \"0-0.state\"",
        );
    }

    #[test]
    fn no_valid_checkpoint_is_none() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 3);
        assert_eq!(latest_id(&storage), None);

        let only = checkpoint(&storage, 1);
        fs::write(only.dir.join("0-0.state"), b"garbage").unwrap();
        let (found, skipped) = storage.scan().unwrap();
        assert!(found.is_none());
        assert_eq!(skipped.len(), 1);
        assert_eq!(latest_id(&storage), None);
    }

    #[test]
    fn several_corrupt_checkpoints_are_skipped_newest_first() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 3);
        checkpoint(&storage, 1);
        for id in [2, 3] {
            let dir = checkpoint(&storage, id).dir;
            fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        }
        let (found, skipped) = storage.scan().unwrap();
        assert_eq!(found.map(|c| c.id), Some(1));
        let skipped: Vec<u64> = skipped.iter().map(|(id, _)| *id).collect();
        assert_eq!(skipped, [3, 2]);
    }

    #[test]
    fn stray_entries_in_the_job_dir_are_ignored_or_skipped_without_panicking() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 3);
        checkpoint(&storage, 1);
        let job_dir = storage.job_dir();
        for name in ["chk-abc", "chk-007", "chk-", "chk--1", "notes"] {
            fs::create_dir(job_dir.join(name)).unwrap();
        }
        fs::write(job_dir.join("chk-9"), b"a file, not a directory").unwrap();
        fs::create_dir(job_dir.join("chk-8")).unwrap();
        let (found, skipped) = storage.scan().unwrap();
        assert_eq!(found.map(|c| c.id), Some(1));
        let skipped: Vec<u64> = skipped.iter().map(|(id, _)| *id).collect();
        assert_eq!(skipped, [9, 8]);
    }

    #[test]
    fn abort_removes_the_in_progress_dir() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 1);
        let dir = storage.begin(4).unwrap();
        CheckpointStorage::write_state_file(&dir, 2, 1, A).unwrap();
        storage.abort(4);
        assert!(!dir.exists());
        assert!(dir_names(storage.job_dir()).is_empty());
        storage.abort(4);
        storage.abort(99);
    }

    #[test]
    fn begin_clears_an_earlier_attempt_and_refuses_a_completed_id() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 2);
        let dir = storage.begin(1).unwrap();
        CheckpointStorage::write_state_file(&dir, 0, 0, A).unwrap();
        let dir = storage.begin(1).unwrap();
        assert!(dir_names(&dir).is_empty());

        checkpoint(&storage, 2);
        let error = storage.begin(2).unwrap_err();
        assert!(matches!(error, CheckpointError::Exists { .. }), "{error}");
        assert!(error.to_string().contains("chk-2"), "{error}");
    }

    #[test]
    fn complete_refuses_a_missing_or_short_state_file() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 1);
        let dir = storage.begin(1).unwrap();
        let handle = CheckpointStorage::write_state_file(&dir, 0, 0, A).unwrap();
        let mut missing = handle.clone();
        missing.vertex = 5;
        missing.file = state_file_name(5, 0);
        let error = storage
            .complete(1, vec![handle.clone(), missing], Duration::ZERO)
            .unwrap_err();
        assert!(error.to_string().contains("5-0.state"), "{error}");

        fs::write(dir.join("0-0.state"), b"short").unwrap();
        let error = storage
            .complete(1, vec![handle], Duration::ZERO)
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("0-0.state") && message.contains("5 bytes, the task acknowledged 27"),
            "{message}"
        );
        assert_eq!(latest_id(&storage), None);
        assert!(
            dir.exists(),
            "a refused completion leaves the checkpoint in progress"
        );
    }

    #[test]
    fn complete_without_begin_names_the_directory() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 1);
        let error = storage.complete(3, Vec::new(), Duration::ZERO).unwrap_err();
        assert!(error.to_string().contains("chk-3.inprogress"), "{error}");
    }

    #[test]
    fn read_state_file_detects_a_flipped_byte() {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(root.path(), 1);
        let done = checkpoint(&storage, 1);
        let handle = &done.manifest.files[0];
        let path = done.dir.join(&handle.file);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, bytes).unwrap();
        let error = CheckpointStorage::read_state_file(&done.dir, handle).unwrap_err();
        assert!(error.to_string().contains("CRC-32C mismatch"), "{error}");
        assert!(error.to_string().contains("0-0.state"), "{error}");
    }

    #[test]
    fn job_names_become_safe_directory_names() {
        let cases = [
            ("word count/v2", "word_count_v2"),
            ("etl-2024.01_x", "etl-2024.01_x"),
            ("..", "job"),
            ("../../etc", "_.._etc"),
            ("", "job"),
            ("café", "caf_"),
        ];
        for (job, expected) in cases {
            assert_eq!(job_dir_name(job), expected, "{job}");
        }
        assert_eq!(job_dir_name(&"x".repeat(1000)).len(), JOB_DIR_NAME_MAX);
    }

    #[test]
    fn directory_names_parse_only_as_written() {
        assert_eq!(parse_dir_name("chk-12"), Some((12, false)));
        assert_eq!(parse_dir_name("chk-0.inprogress"), Some((0, true)));
        for name in [
            "chk-",
            "chk-01",
            "chk-+1",
            "chk-1.tmp",
            "chk-x.inprogress",
            "chk1",
        ] {
            assert_eq!(parse_dir_name(name), None, "{name}");
        }
    }

    fn handle_strategy() -> impl Strategy<Value = StateHandle> {
        (0usize..64, any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(vertex, subtask, size, crc32c)| StateHandle {
                vertex,
                subtask,
                file: state_file_name(vertex, subtask),
                size_bytes: u64::from(size),
                crc32c,
            },
        )
    }

    proptest! {
        #[test]
        fn manifests_round_trip_through_json(
            checkpoint in any::<u64>(),
            job in ".{0,20}",
            completed_unix_ms in any::<u64>(),
            duration_ms in any::<u64>(),
            files in proptest::collection::vec(handle_strategy(), 0..8),
        ) {
            let manifest = Manifest {
                checkpoint,
                job,
                completed_unix_ms,
                duration_ms,
                total_bytes: files.iter().map(|f| f.size_bytes).sum(),
                files,
                finished: Vec::new(),
            };
            let json = serde_json::to_vec_pretty(&manifest).unwrap();
            let parsed = parse_manifest(&json, Path::new("m"), checkpoint).unwrap();
            prop_assert_eq!(parsed, manifest);
        }

        #[test]
        fn parsing_arbitrary_manifest_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = parse_manifest(&bytes, Path::new("m"), 1);
        }

        #[test]
        fn a_cut_manifest_is_an_error(cut in 0usize..200) {
            let manifest = Manifest {
                checkpoint: 1,
                job: "j".into(),
                completed_unix_ms: 1,
                duration_ms: 1,
                finished: Vec::new(),
                total_bytes: 3,
                files: vec![StateHandle {
                    vertex: 0,
                    subtask: 0,
                    file: state_file_name(0, 0),
                    size_bytes: 3,
                    crc32c: 7,
                }],
            };
            let json = serde_json::to_vec_pretty(&manifest).unwrap();
            let cut = cut.min(json.len() - 1);
            prop_assert!(parse_manifest(&json[..cut], Path::new("m"), 1).is_err());
        }
    }
}
