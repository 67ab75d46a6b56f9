//! Output directories of file sinks: the job file's `mode` key, checked and
//! carried out once per job, when the job is submitted.
//!
//! - `mode = "error"` (the default) refuses an output directory that exists
//!   and holds anything, so that a second run never mixes its parts with, or
//!   silently replaces, an earlier run's output.
//! - `mode = "overwrite"` removes the part files this kind of sink writes
//!   (`part-*.<ext>`, and the hidden `.part-*.<ext>.inprogress` and
//!   `.pending` files) and nothing else; a directory that holds any other
//!   file is refused, naming that file, so that a mistyped path never costs a
//!   user unrelated files.
//!
//! Why at submission, in the JobManager, and not when a task starts: every
//! attempt of a job re-plans it on the TaskManagers, and a restart after a
//! failure redeploys the same job into a directory its first attempt has
//! written (an exactly-once sink then restores from it; see [`super::two_phase`]).
//! A check at task start would refuse every restart. Removal at task start
//! would also have to happen exactly once while a sink's subtasks start on
//! several threads and TaskManagers at once; making the other subtasks wait
//! for subtask 0 can deadlock when they do not all get slots. The JobManager
//! accepts a job exactly once and before it deploys any task, so removing
//! there is once per job and before any write.
//!
//! Limit: the JobManager sees its own file system. That is the right one for
//! `strata run` (one process) and for clusters whose sink paths are on a
//! shared file system, as Flink's file sinks assume; a path local to each
//! TaskManager host is not checked there.

use std::path::{Path, PathBuf};

use crate::job::{JobSpec, Location, OperatorSpec, SinkMode};

/// The job-file key that names a file sink's directory.
const PATH_KEY: &str = "path";

/// Which sink, key and directory an error is about.
#[derive(Debug)]
pub struct SinkPlace {
    /// The job file and the line of the key.
    pub at: Location,
    pub operator: String,
    /// The operator's type.
    pub kind: &'static str,
    pub key: &'static str,
    pub dir: PathBuf,
}

impl std::fmt::Display for SinkPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: operator '{}' ({}): key '{}'",
            self.at, self.operator, self.kind, self.key
        )
    }
}

/// Why a file sink's output directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SinkOutputError {
    #[error(
        "{place}: output directory {} is not empty ({entry_count} entries); set mode = \
         \"overwrite\" on this operator to replace the part files of an earlier run, or choose \
         another path",
        .place.dir.display()
    )]
    NotEmpty {
        place: Box<SinkPlace>,
        entry_count: usize,
    },
    #[error("{place}: {} exists and is not a directory", .place.dir.display())]
    NotADirectory { place: Box<SinkPlace> },
    #[error(
        "{place}: mode = \"overwrite\" removes only the sink's own part files, but output \
         directory {} also holds {}; move it away or choose another path",
        .place.dir.display(), .entry.display()
    )]
    ForeignEntry {
        place: Box<SinkPlace>,
        entry: PathBuf,
    },
    #[error(
        "{place}: output directory {} is also the output of operator '{other}'; their part \
         files would overwrite each other",
        .place.dir.display()
    )]
    SharedDirectory {
        place: Box<SinkPlace>,
        other: String,
    },
    #[error("output directory {}: {source}", .dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file sink of a job, as the checks need it.
struct FileSink<'a> {
    op: &'a OperatorSpec,
    at: Location,
    dir: &'a Path,
    mode: SinkMode,
    extension: &'static str,
}

impl FileSink<'_> {
    fn place(&self) -> Box<SinkPlace> {
        Box::new(SinkPlace {
            at: self.at.clone(),
            operator: self.op.name.clone(),
            kind: self.op.kind.type_name(),
            key: PATH_KEY,
            dir: self.dir.to_owned(),
        })
    }
}

fn file_sinks(spec: &JobSpec) -> Vec<FileSink<'_>> {
    spec.operators
        .iter()
        .filter_map(|op| {
            let (dir, mode, extension) = op.kind.file_sink()?;
            let at = Location {
                file: spec.file.clone(),
                line: op.lines.key(PATH_KEY).unwrap_or(op.line),
            };
            Some(FileSink {
                op,
                at,
                dir,
                mode,
                extension,
            })
        })
        .collect()
}

/// Checks every file sink's output directory against its mode; touches
/// nothing. Run it early so that a refused job is refused before anything
/// else is done for it.
pub fn check_sink_outputs(spec: &JobSpec) -> Result<(), SinkOutputError> {
    let sinks = file_sinks(spec);
    for (index, sink) in sinks.iter().enumerate() {
        if let Some(other) = sinks[..index].iter().find(|s| s.dir == sink.dir) {
            return Err(SinkOutputError::SharedDirectory {
                place: sink.place(),
                other: other.op.name.clone(),
            });
        }
        doomed_parts(sink)?;
    }
    Ok(())
}

/// Checks every file sink's output directory, then removes the earlier
/// run's part files of the sinks in `overwrite` mode; returns the files
/// removed. Call it once per job, after the job is accepted and before any
/// of its tasks is deployed (see the module documentation).
pub fn prepare_sink_outputs(spec: &JobSpec) -> Result<Vec<PathBuf>, SinkOutputError> {
    check_sink_outputs(spec)?;
    let mut removed = Vec::new();
    for sink in file_sinks(spec) {
        for part in doomed_parts(&sink)? {
            match std::fs::remove_file(&part) {
                Ok(()) => removed.push(part),
                // Gone already: what overwrite wants.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SinkOutputError::Io { dir: part, source }),
            }
        }
    }
    Ok(removed)
}

/// The files `overwrite` removes from a sink's directory; an error where the
/// sink's mode refuses the directory. A missing directory holds nothing.
fn doomed_parts(sink: &FileSink<'_>) -> Result<Vec<PathBuf>, SinkOutputError> {
    let io = |source| SinkOutputError::Io {
        dir: sink.dir.to_owned(),
        source,
    };
    let metadata = match std::fs::metadata(sink.dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    if !metadata.is_dir() {
        return Err(SinkOutputError::NotADirectory {
            place: sink.place(),
        });
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(sink.dir).map_err(io)? {
        entries.push(entry.map_err(io)?);
    }
    // Sorted so that the error names the same entry on every run.
    entries.sort_by_key(|e| e.file_name());
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    if sink.mode == SinkMode::Error {
        return Err(SinkOutputError::NotEmpty {
            place: sink.place(),
            entry_count: entries.len(),
        });
    }
    let mut parts = Vec::with_capacity(entries.len());
    for entry in entries {
        // A symbolic link or a directory is never a part this sink wrote.
        let is_file = entry.file_type().map_err(io)?.is_file();
        let own_part = is_file
            && entry
                .file_name()
                .to_str()
                .is_some_and(|name| is_part_file_name(name, sink.extension));
        if !own_part {
            return Err(SinkOutputError::ForeignEntry {
                place: sink.place(),
                entry: entry.path(),
            });
        }
        parts.push(entry.path());
    }
    Ok(parts)
}

/// Whether `name` is a part file a file sink with `extension` writes:
/// `part-<n>.<ext>` (without checkpoints), `part-<subtask>-<seq>.<ext>`
/// (exactly-once), and their hidden in-progress and pending names, including
/// the Parquet sink's checksum scratch file (`.<…>.crc.inprogress`).
pub fn is_part_file_name(name: &str, extension: &str) -> bool {
    let stem = match name.strip_prefix('.') {
        Some(hidden) => {
            let Some(stem) = hidden
                .strip_suffix(".inprogress")
                .or_else(|| hidden.strip_suffix(".pending"))
            else {
                return false;
            };
            stem.strip_suffix(".crc").unwrap_or(stem)
        }
        None => name,
    };
    let Some(numbers) = stem
        .strip_prefix("part-")
        .and_then(|s| s.strip_suffix(extension))
        .and_then(|s| s.strip_suffix('.'))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match numbers.split_once('-') {
        Some((subtask, seq)) => digits(subtask) && digits(seq),
        None => digits(numbers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse_job;

    fn job(dir: &Path, mode: Option<&str>) -> JobSpec {
        let mode = mode.map_or(String::new(), |m| format!("mode = \"{m}\"\n"));
        let text = format!(
            "[job]\nname = \"j\"\n\n[[operator]]\nname = \"src\"\ntype = \"datagen\"\nrows = 10\n\n\
             [[operator]]\nname = \"out\"\ntype = \"csv_sink\"\npath = \"{}\"\n{mode}",
            dir.display()
        );
        parse_job(&text, Path::new("job.toml")).expect("valid job")
    }

    #[test]
    fn part_file_names_are_recognised_strictly() {
        for name in [
            "part-0.csv",
            "part-12.csv",
            "part-3-7.csv",
            ".part-0.csv.inprogress",
            ".part-3-7.csv.pending",
            ".part-3-7.csv.inprogress",
            ".part-3-7.csv.crc.inprogress",
        ] {
            assert!(is_part_file_name(name, "csv"), "{name}");
        }
        for name in [
            "part-0.arrow",
            "part-2-11.arrow",
            ".part-2-11.arrow.inprogress",
        ] {
            assert!(is_part_file_name(name, "arrow"), "{name}");
            let stream = name.replace(".arrow", ".arrows");
            assert!(is_part_file_name(&stream, "arrows"), "{stream}");
            assert!(!is_part_file_name(&stream, "arrow"), "{stream}");
            assert!(!is_part_file_name(name, "arrows"), "{name}");
        }
        for name in [
            "part-0.parquet",
            "part-.csv",
            "part-a.csv",
            "part-0.csv.bak",
            "notes.txt",
            ".part-0.csv",
            "_SUCCESS",
            "part-1-2-3.csv",
            "xpart-0.csv",
        ] {
            assert!(!is_part_file_name(name, "csv"), "{name}");
        }
    }

    #[test]
    fn default_mode_refuses_a_non_empty_directory_naming_operator_key_and_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("part-0.csv"), "a\n").expect("write");
        let error = check_sink_outputs(&job(dir.path(), None)).expect_err("refused");
        let message = error.to_string();
        assert!(
            matches!(error, SinkOutputError::NotEmpty { .. }),
            "{message}"
        );
        assert!(message.contains("operator 'out'"), "{message}");
        assert!(message.contains("key 'path'"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.starts_with("job.toml:"), "{message}");
    }

    #[test]
    fn missing_or_empty_directory_is_fine_in_both_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        for mode in [None, Some("overwrite")] {
            check_sink_outputs(&job(&missing, mode)).expect("missing is fine");
            check_sink_outputs(&job(dir.path(), mode)).expect("empty is fine");
        }
    }

    #[test]
    fn overwrite_removes_only_part_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["part-0.csv", "part-1-0.csv", ".part-2.csv.inprogress"] {
            std::fs::write(dir.path().join(name), "a\n").expect("write");
        }
        let removed = prepare_sink_outputs(&job(dir.path(), Some("overwrite"))).expect("ok");
        assert_eq!(removed.len(), 3);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn overwrite_refuses_a_directory_with_other_files_and_removes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("part-0.csv"), "a\n").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "mine\n").expect("write");
        let error = prepare_sink_outputs(&job(dir.path(), Some("overwrite"))).expect_err("refused");
        let message = error.to_string();
        assert!(
            matches!(error, SinkOutputError::ForeignEntry { .. }),
            "{message}"
        );
        assert!(message.contains("notes.txt"), "{message}");
        assert!(dir.path().join("part-0.csv").exists(), "nothing removed");
        assert!(dir.path().join("notes.txt").exists());
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("out");
        std::fs::write(&file, "x").expect("write");
        let error = check_sink_outputs(&job(&file, Some("overwrite"))).expect_err("refused");
        assert!(
            matches!(error, SinkOutputError::NotADirectory { .. }),
            "{error}"
        );
    }

    #[test]
    fn two_sinks_into_one_directory_are_refused() {
        let text = "[job]\nname = \"j\"\n\n[[operator]]\nname = \"src\"\ntype = \"datagen\"\nrows = 10\n\n\
             [[operator]]\nname = \"a\"\ntype = \"csv_sink\"\ninput = \"src\"\npath = \"o\"\n\n\
             [[operator]]\nname = \"b\"\ntype = \"csv_sink\"\ninput = \"src\"\npath = \"o\"\n";
        let spec = parse_job(text, Path::new("job.toml")).expect("valid job");
        let error = check_sink_outputs(&spec).expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("operator 'b'"), "{message}");
        assert!(message.contains("operator 'a'"), "{message}");
    }

    #[test]
    fn an_unknown_mode_is_a_job_file_error() {
        let text = "[job]\nname = \"j\"\n\n[[operator]]\nname = \"src\"\ntype = \"datagen\"\nrows = 10\n\n\
             [[operator]]\nname = \"out\"\ntype = \"parquet_sink\"\npath = \"o\"\nmode = \"append\"\n";
        let message = parse_job(text, Path::new("job.toml"))
            .expect_err("refused")
            .to_string();
        assert!(message.contains("mode"), "{message}");
        assert!(message.contains("'append'"), "{message}");
        assert!(message.contains("overwrite"), "{message}");
    }
}
