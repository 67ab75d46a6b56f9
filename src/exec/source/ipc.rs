//! The Arrow IPC source: `.arrow` / Feather v2 files and `.arrows` streams.
//!
//! Splits: a file-format file is cut into ranges of record batches (its
//! footer says how many it has and where each is), about eight ranges per
//! subtask over all files, as the CSV source cuts bytes; a stream has no
//! index, so each stream file is one split. Splits are listed in file-name
//! order and dealt round-robin over the subtasks (subtask `s` of `p` reads
//! split `i` when `i % p == s`), as the Parquet source deals row groups.
//!
//! Position: the splits read, and the record batches returned from the
//! next (`IpcPosition`). A restore seeks a file-format split straight to
//! its batch through the footer; a stream split decodes and drops the
//! batches before it, since nothing says where they end.
//!
//! Batches come out as the file holds them (no re-chunking), carrying the
//! planned schema: every file's columns (after projection) must equal the
//! planned ones in name, type and nullability, or the source fails naming
//! the file. Buffers: each file's footer is checked against the file's
//! size before it is read ([`crate::job::inspect_ipc`]); arrow's stream
//! reader (arrow-ipc 60) grows a message's metadata and body as the bytes
//! arrive rather than trusting their declared lengths. One batch is held at
//! a time.

use std::fs::File;
use std::io::BufReader;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{RecordBatch, RecordBatchOptions};
use arrow_ipc::reader::{FileReader, StreamReader};
use arrow_schema::Schema;

use super::{
    ExecError, Source, SplitName, SplitProgress, SubtaskIndex, list_files_with,
    restore_file_offset, snapshot_file_offset,
};
use crate::job::{ArrowIpcSourceSpec, IPC_EXTENSIONS, inspect_ipc, schema_difference};

/// Splits per subtask the file-format batches are cut into: round-robin
/// dealing then balances subtasks within about an eighth.
const IPC_SPLITS_PER_SUBTASK: usize = 8;

const OPERATOR: &str = "arrow_ipc_source";

/// One split of an IPC source.
#[derive(Clone, Debug)]
struct IpcSplit {
    path: PathBuf,
    /// The record batches `[start, end)` of a file-format file; `None` for
    /// a stream, read whole.
    batches: Option<Range<usize>>,
    /// The file's columns to read, in file order; `None`: all.
    projection: Option<Vec<usize>>,
}

/// Where an IPC source subtask stands: `split_index` splits are read, and
/// `batch_index` record batches of the next one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct IpcPosition {
    split_index: usize,
    batch_index: usize,
}

impl SplitProgress for IpcPosition {
    fn split_index(&self) -> usize {
        self.split_index
    }

    fn within(&self) -> Option<String> {
        (self.batch_index > 0).then(|| format!("record batch {}", self.batch_index))
    }
}

/// The open reader of one split.
enum IpcReader {
    File {
        reader: FileReader<BufReader<File>>,
        /// The next batch, and the end of the split's range.
        next: usize,
        end: usize,
    },
    Stream(StreamReader<BufReader<File>>),
}

impl IpcReader {
    fn next_batch(&mut self) -> Option<Result<RecordBatch, arrow_schema::ArrowError>> {
        match self {
            IpcReader::File { reader, next, end } => {
                if *next >= *end {
                    return None;
                }
                *next += 1;
                reader.next()
            }
            IpcReader::Stream(reader) => reader.next(),
        }
    }
}

/// Arrow IPC files; see the module documentation.
pub struct ArrowIpcSource {
    spec: ArrowIpcSourceSpec,
    owner: SubtaskIndex,
    /// This subtask's splits in reading order.
    splits: Vec<IpcSplit>,
    /// `splits` by name, for checkpoints.
    names: Vec<SplitName>,
    /// The replay offset.
    position: IpcPosition,
    /// The reader of `splits[position.split_index]`, once opened.
    reader: Option<IpcReader>,
}

/// One file of the source, as listed when the source is built.
struct IpcFileEntry {
    path: PathBuf,
    /// `Some` for the file format, whose footer counts its batches.
    batch_count: Option<usize>,
    projection: Option<Vec<usize>>,
    name: SplitName,
}

impl ArrowIpcSource {
    pub fn new(
        spec: ArrowIpcSourceSpec,
        subtask: u32,
        parallelism: u32,
    ) -> Result<Self, ExecError> {
        let mut files = Vec::new();
        for path in list_files_with(&spec.path, &IPC_EXTENSIONS)? {
            files.push(inspect_file(&spec, path)?);
        }
        let parallelism = parallelism.max(1);
        let all = cut_splits(files, parallelism);
        let (splits, names) = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, x)| x)
            .unzip();
        Ok(Self {
            spec,
            owner: SubtaskIndex {
                subtask,
                parallelism,
            },
            splits,
            names,
            position: IpcPosition::default(),
            reader: None,
        })
    }

    /// Opens `split` past its first `batches_skipped` record batches.
    fn open(&self, split: &IpcSplit, batches_skipped: usize) -> Result<IpcReader, ExecError> {
        let arrow_error = |e: arrow_schema::ArrowError| read_error(&split.path, e.to_string());
        let file = File::open(&split.path).map_err(|e| ExecError::Io {
            path: split.path.clone(),
            source: e,
        })?;
        let file = BufReader::new(file);
        match &split.batches {
            Some(range) => {
                let projection = split.projection.clone();
                let mut reader = FileReader::try_new(file, projection).map_err(arrow_error)?;
                let next = range.start + batches_skipped;
                if next > range.end || range.end > reader.num_batches() {
                    return Err(read_error(
                        &split.path,
                        format!(
                            "record batches {next}..{} are not in this file of {} batches",
                            range.end,
                            reader.num_batches()
                        ),
                    ));
                }
                if next < range.end {
                    reader.set_index(next).map_err(arrow_error)?;
                }
                Ok(IpcReader::File {
                    reader,
                    next,
                    end: range.end,
                })
            }
            None => {
                let projection = split.projection.clone();
                let mut reader = StreamReader::try_new(file, projection).map_err(arrow_error)?;
                for skipped in 0..batches_skipped {
                    match reader.next() {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(arrow_error(e)),
                        None => {
                            return Err(ExecError::State {
                                operator: OPERATOR.into(),
                                detail: format!(
                                    "the checkpointed position, record batch {batches_skipped}, \
                                     lies past the {skipped} batches of {}",
                                    split.path.display()
                                ),
                            });
                        }
                    }
                }
                Ok(IpcReader::Stream(reader))
            }
        }
    }

    /// `batch` with the planned schema (which the file's metadata may
    /// differ from), checked against it.
    fn with_planned_schema(
        &self,
        path: &Path,
        batch: RecordBatch,
    ) -> Result<RecordBatch, ExecError> {
        let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        RecordBatch::try_new_with_options(
            Arc::clone(&self.spec.schema),
            batch.columns().to_vec(),
            &options,
        )
        .map_err(|e| {
            read_error(
                path,
                format!("a record batch does not fit the job's columns: {e}"),
            )
        })
    }
}

/// The format, batch count and name of one file; checks that its columns
/// are the planned ones.
fn inspect_file(spec: &ArrowIpcSourceSpec, path: PathBuf) -> Result<IpcFileEntry, ExecError> {
    let info = inspect_ipc(&path, spec.format).map_err(|e| read_error(&path, e.to_string()))?;
    let projection = projection(spec, &path, &info.schema)?;
    let found = match &projection {
        Some(indices) => info
            .schema
            .project(indices)
            .map_err(|e| read_error(&path, e.to_string()))?,
        None => info.schema.as_ref().clone(),
    };
    if let Some(difference) = schema_difference(&spec.schema, &found) {
        return Err(read_error(
            &path,
            format!("its columns differ from those the job was planned with: {difference}"),
        ));
    }
    let name = SplitName::new(&path, None)?;
    Ok(IpcFileEntry {
        path,
        batch_count: info.batch_count,
        projection,
        name,
    })
}

/// The indices of the planned columns in a file's schema, in file order;
/// `None`: all columns.
fn projection(
    spec: &ArrowIpcSourceSpec,
    path: &Path,
    file_schema: &Schema,
) -> Result<Option<Vec<usize>>, ExecError> {
    let Some(columns) = &spec.columns else {
        return Ok(None);
    };
    let mut indices = Vec::with_capacity(columns.len());
    for column in columns {
        match file_schema.index_of(column) {
            Ok(i) => indices.push(i),
            Err(_) => {
                return Err(read_error(
                    path,
                    format!("column '{column}', read by the job, is missing from this file"),
                ));
            }
        }
    }
    indices.sort_unstable();
    Ok(Some(indices))
}

/// Every split of the source in reading order: file-format files cut into
/// batch ranges, streams whole.
fn cut_splits(files: Vec<IpcFileEntry>, parallelism: u32) -> Vec<(IpcSplit, SplitName)> {
    let total_batches: usize = files.iter().filter_map(|f| f.batch_count).sum();
    let split_batches = total_batches
        .div_ceil(parallelism as usize * IPC_SPLITS_PER_SUBTASK)
        .max(1);
    let mut all = Vec::new();
    for file in files {
        let Some(batch_count) = file.batch_count else {
            let split = IpcSplit {
                path: file.path,
                batches: None,
                projection: file.projection,
            };
            all.push((split, file.name));
            continue;
        };
        let pieces = batch_count.div_ceil(split_batches).max(1);
        for piece in 0..pieces {
            let start = piece * split_batches;
            let end = ((piece + 1) * split_batches).min(batch_count);
            let mut name = file.name.clone();
            if pieces > 1 {
                name.batches = Some([start, end]);
            }
            let split = IpcSplit {
                path: file.path.clone(),
                batches: Some(start..end),
                projection: file.projection.clone(),
            };
            all.push((split, name));
        }
    }
    all
}

fn read_error(path: &Path, detail: String) -> ExecError {
    ExecError::Read {
        path: path.to_owned(),
        detail,
    }
}

impl Source for ArrowIpcSource {
    fn snapshot_offset(&self) -> Result<Vec<u8>, ExecError> {
        snapshot_file_offset(OPERATOR, self.owner, &self.names, self.position)
    }

    fn restore_offset(&mut self, state: &[u8]) -> Result<(), ExecError> {
        assert!(self.reader.is_none(), "restore_offset after next_batch");
        let position: IpcPosition = restore_file_offset(OPERATOR, self.owner, &self.names, state)?;
        let batch_count = self
            .splits
            .get(position.split_index)
            .and_then(|split| split.batches.as_ref())
            .map(|range| range.len());
        if let Some(batch_count) = batch_count
            && position.batch_index > batch_count
        {
            return Err(ExecError::State {
                operator: OPERATOR.into(),
                detail: format!(
                    "the checkpointed position, record batch {}, lies past the {batch_count} \
                     batches of {}",
                    position.batch_index, self.names[position.split_index]
                ),
            });
        }
        self.position = position;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>, ExecError> {
        loop {
            let Some(split) = self.splits.get(self.position.split_index) else {
                return Ok(None);
            };
            if self.reader.is_none() {
                self.reader = Some(self.open(split, self.position.batch_index)?);
            }
            let reader = self.reader.as_mut().expect("opened above");
            match reader.next_batch() {
                Some(Ok(batch)) => {
                    self.position.batch_index += 1;
                    let path = &self.splits[self.position.split_index].path;
                    return self.with_planned_schema(path, batch).map(Some);
                }
                Some(Err(e)) => return Err(read_error(&split.path, e.to_string())),
                None => {
                    self.reader = None;
                    self.position = IpcPosition {
                        split_index: self.position.split_index + 1,
                        batch_index: 0,
                    };
                }
            }
        }
    }
}
