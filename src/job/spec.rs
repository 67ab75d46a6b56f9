//! The job file's contents as Rust values, and the TOML → [`JobSpec`] parser.
//!
//! Parsing checks everything that needs no schema: keys and their types, operator
//! types and names, input names (resolved to indices of earlier operators),
//! durations, and the syntax of expressions and aggregates. Schemas, column
//! references and the shape of the graph are checked by `plan`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::expr::{Expr, ExprError, ScalarValue, parse_agg_call};
use super::formats::{self, ArrowIpcSinkOptions, ArrowIpcSourceSpec, ParquetSinkOptions};
use super::tomlx::{Source, Table, closest};
use super::{DATAGEN_COLUMNS, JobError, Scope};

mod features;

pub use features::{
    BucketizeSpec, Categories, DimensionTableSpec, JoinHow, JoinSpec, Number,
    ONE_HOT_CATEGORIES_MAX, OneHotSpec, TableFormat, UnknownCategory,
};

/// Rows per batch when a source does not say.
pub const BATCH_SIZE_DEFAULT: usize = 8192;
/// Key cardinality of a `datagen` source that does not say.
pub const DATAGEN_KEYS_DEFAULT: u64 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub file: PathBuf,
    pub default_parallelism: Option<u32>,
    /// In file order, which is topological: inputs have smaller indices.
    pub operators: Vec<OperatorSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OperatorSpec {
    /// Index in `JobSpec::operators`: the position in the file, but for the
    /// outputs of a `split`, which each become an operator of their own.
    pub index: usize,
    /// Position of the operator's `[[operator]]` table in the file, 0-based
    /// (the outputs of one `split` share it).
    pub table: usize,
    pub name: String,
    /// Line of the operator's `[[operator]]` header.
    pub line: usize,
    pub input: Option<usize>,
    pub parallelism: Option<u32>,
    pub kind: OperatorKind,
    /// Lines of the operator's values, so that `plan` can point at them.
    pub lines: SourceLines,
}

/// The line of each key's value in an operator table, and of each element of
/// array values. Empty for specs built in code; errors then fall back to
/// [`OperatorSpec::line`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceLines {
    lines: BTreeMap<String, (usize, Vec<usize>)>,
}

impl SourceLines {
    pub(super) fn insert(&mut self, key: &str, line: usize, items: Vec<usize>) {
        self.lines.insert(key.to_string(), (line, items));
    }

    pub fn key(&self, key: &str) -> Option<usize> {
        self.lines.get(key).map(|(line, _)| *line)
    }

    /// The line of element `index` of an array value, else of the value.
    pub fn item(&self, key: &str, index: usize) -> Option<usize> {
        let (line, items) = self.lines.get(key)?;
        Some(items.get(index).copied().unwrap_or(*line))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OperatorKind {
    Datagen(DatagenSpec),
    CsvSource(CsvSourceSpec),
    ParquetSource(ParquetSourceSpec),
    ArrowIpcSource(ArrowIpcSourceSpec),
    Filter {
        predicate: Expr,
    },
    Project {
        columns: Vec<NamedExpr>,
    },
    KeyBy {
        keys: Vec<String>,
    },
    Aggregate {
        aggs: Vec<AggSpec>,
    },
    Window {
        time_column: String,
        size_ms: i64,
        aggs: Vec<AggSpec>,
    },
    /// External merge sort of each subtask's input.
    Sort {
        keys: Vec<SortKey>,
        /// Runs merged at once; more runs take several passes.
        fan_in: usize,
    },
    /// Keeps each row with probability `fraction`, decided by a hash of
    /// `seed`, the subtask and the row's position in the subtask's input:
    /// the same rows for the same seed and parallelism on every run.
    Sample {
        fraction: f64,
        seed: u64,
    },
    /// Shuffles each subtask's stream through a buffer of `buffer_rows`
    /// rows with a seeded generator.
    Shuffle {
        buffer_rows: usize,
        seed: u64,
    },
    /// Re-chunks the stream into batches of exactly `rows` rows (the
    /// last one of each subtask shorter).
    Batch {
        rows: usize,
    },
    /// Converts `columns` to the given types (an invalid value fails the
    /// job naming the column, it never becomes a null).
    Cast {
        columns: Vec<(String, arrow_schema::DataType)>,
    },
    /// One named output of a `split` (the job file's `<split>.<side>`):
    /// the rows whose stable hash of `columns`, seeded by `seed`, falls in
    /// `[lo, hi)` of the unit interval, so a row's side never changes
    /// between runs, parallelisms or machines.
    SplitSide {
        split: String,
        side: String,
        columns: Vec<String>,
        seed: u64,
        lo: f64,
        hi: f64,
    },
    /// `(x - mean) / std` of each of `columns` (Float64 out), with the
    /// statistics in the JSON artifact `stats`. Where `fit` says, the
    /// client first runs a fit phase (a job of the operators upstream of
    /// the fitted data, ending in a `standardize_fit`) that writes them.
    Standardize {
        columns: Vec<String>,
        stats: PathBuf,
        fit: FitSource,
    },
    /// Fits the mean and population std of `columns` over its whole input
    /// and writes them to `stats` (runs as one subtask). The sink of a
    /// `standardize`'s fit phase; usable alone.
    StandardizeFit {
        columns: Vec<String>,
        stats: PathBuf,
    },
    /// Replaces the nulls of `columns` with `value`.
    FillNull {
        columns: Vec<String>,
        value: ScalarValue,
    },
    /// Appends (or puts in place of its column) an Int64 column of bucket
    /// numbers.
    Bucketize(BucketizeSpec),
    /// Appends one Int8 column per category.
    OneHot(OneHotSpec),
    /// Adds the columns of a bounded dimension table's row with the same
    /// key.
    Join(JoinSpec),
    Blackhole,
    Print {
        limit: Option<u64>,
    },
    CsvSink {
        path: PathBuf,
        mode: SinkMode,
    },
    ParquetSink {
        path: PathBuf,
        mode: SinkMode,
        options: ParquetSinkOptions,
    },
    ArrowIpcSink {
        path: PathBuf,
        mode: SinkMode,
        options: ArrowIpcSinkOptions,
    },
    /// Serves each subtask's output as an Arrow Flight stream (one
    /// partition per subtask) that a trainer reads directly.
    FlightSink {
        /// Bytes of batches a partition holds for its reader before the
        /// sink blocks (and back-pressure slows the job).
        queue_bytes: u64,
        /// How long a full partition may wait for a reader before the job
        /// fails (`None`: forever).
        reader_timeout_ms: Option<u64>,
    },
}

/// What a `standardize` fits its statistics over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitSource {
    /// Its own whole input (the default).
    Input,
    /// The whole output of an earlier operator (e.g. a split's training
    /// side), so other data is standardized with the same statistics.
    Operator(usize),
    /// No fit: the artifact of an earlier run (inference).
    None,
}

/// Bytes a `flight_sink` partition queues when the job file does not say.
pub const FLIGHT_QUEUE_BYTES_DEFAULT: u64 = 4 << 20;
/// How long a full `flight_sink` partition waits for a reader by default.
pub const FLIGHT_READER_TIMEOUT_MS_DEFAULT: u64 = 10 * 60 * 1000;

/// What a file sink does with an output directory that already holds files
/// (the job file's `mode` key). Checked once per job, at submission: see
/// `exec::sink::output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SinkMode {
    /// Refuse a non-empty directory (the default: never lose output).
    #[default]
    Error,
    /// Remove the strata part files of an earlier run first; refuse a
    /// directory that holds anything else.
    Overwrite,
}

impl SinkMode {
    /// The value of the job file's `mode` key.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkMode::Error => "error",
            SinkMode::Overwrite => "overwrite",
        }
    }
}

impl OperatorKind {
    /// The `type` string of the job file.
    pub fn type_name(&self) -> &'static str {
        match self {
            OperatorKind::Datagen(_) => "datagen",
            OperatorKind::CsvSource(_) => "csv_source",
            OperatorKind::ParquetSource(_) => "parquet_source",
            OperatorKind::ArrowIpcSource(_) => "arrow_ipc_source",
            OperatorKind::Filter { .. } => "filter",
            OperatorKind::Project { .. } => "project",
            OperatorKind::KeyBy { .. } => "key_by",
            OperatorKind::Aggregate { .. } => "aggregate",
            OperatorKind::Window { .. } => "window",
            OperatorKind::Sort { .. } => "sort",
            OperatorKind::Sample { .. } => "sample",
            OperatorKind::FillNull { .. } => "fill_null",
            OperatorKind::SplitSide { .. } => "split",
            OperatorKind::Standardize { .. } => "standardize",
            OperatorKind::StandardizeFit { .. } => "standardize_fit",
            OperatorKind::Batch { .. } => "batch",
            OperatorKind::Cast { .. } => "cast",
            OperatorKind::Shuffle { .. } => "shuffle",
            OperatorKind::Bucketize(_) => "bucketize",
            OperatorKind::OneHot(_) => "one_hot",
            OperatorKind::Join(_) => "join",
            OperatorKind::Blackhole => "blackhole",
            OperatorKind::Print { .. } => "print",
            OperatorKind::CsvSink { .. } => "csv_sink",
            OperatorKind::ParquetSink { .. } => "parquet_sink",
            OperatorKind::FlightSink { .. } => "flight_sink",
            OperatorKind::ArrowIpcSink { .. } => "arrow_ipc_sink",
        }
    }

    pub fn is_source(&self) -> bool {
        matches!(
            self,
            OperatorKind::Datagen(_)
                | OperatorKind::CsvSource(_)
                | OperatorKind::ParquetSource(_)
                | OperatorKind::ArrowIpcSource(_)
        )
    }

    /// A file sink's output directory, its `mode`, and the extension of the
    /// part files it writes; `None` for every other operator.
    pub fn file_sink(&self) -> Option<(&Path, SinkMode, &'static str)> {
        match self {
            OperatorKind::CsvSink { path, mode } => Some((path, *mode, "csv")),
            OperatorKind::ParquetSink { path, mode, .. } => Some((path, *mode, "parquet")),
            OperatorKind::ArrowIpcSink {
                path,
                mode,
                options,
            } => Some((path, *mode, options.format.extension())),
            _ => None,
        }
    }

    pub fn is_sink(&self) -> bool {
        matches!(
            self,
            OperatorKind::Blackhole
                | OperatorKind::Print { .. }
                | OperatorKind::CsvSink { .. }
                | OperatorKind::ParquetSink { .. }
                | OperatorKind::FlightSink { .. }
                | OperatorKind::StandardizeFit { .. }
                | OperatorKind::ArrowIpcSink { .. }
        )
    }
}

/// A deterministic generator; defaults are those of the job file.
#[derive(Debug, Clone, PartialEq)]
pub struct DatagenSpec {
    /// Required.
    pub rows: u64,
    /// Key cardinality, at least 1; default [`DATAGEN_KEYS_DEFAULT`].
    pub keys: u64,
    /// Default 0.
    pub seed: u64,
    /// At least 1 when present; `None` is unthrottled.
    pub rows_per_second: Option<u64>,
    /// Default [`BATCH_SIZE_DEFAULT`].
    pub batch_size: usize,
    /// Distinct names from `DATAGEN_COLUMNS`, in output order; default all four.
    pub columns: Vec<String>,
    /// Event time advance per global row, ≥ 0; default 1.
    pub ts_step_ms: i64,
    /// Largest random lateness of `ts`, ≥ 0; default 0.
    pub ts_disorder_ms: i64,
    /// Default: on `ts` (when generated) with `delay_ms = ts_disorder_ms`.
    pub watermark: Option<WatermarkSpec>,
}

impl DatagenSpec {
    /// A generator with the job file's defaults for everything but the row
    /// count, key cardinality and seed (no watermark).
    pub fn new(rows: u64, keys: u64, seed: u64) -> Self {
        Self {
            rows,
            keys,
            seed,
            rows_per_second: None,
            batch_size: BATCH_SIZE_DEFAULT,
            columns: crate::job::DATAGEN_COLUMNS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            ts_step_ms: 1,
            ts_disorder_ms: 0,
            watermark: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CsvSourceSpec {
    pub path: PathBuf,
    pub has_header: bool,
    /// Empty until `plan` infers it, unless the job file declares it.
    /// Every column of the file, in order (the reader parses by position).
    pub schema: SchemaRef,
    pub batch_size: usize,
    pub watermark: Option<WatermarkSpec>,
    /// The columns the source outputs, in file order; `None`: all. Set by
    /// `plan` to the columns the operators downstream use (projection
    /// pushdown: the others are not converted to arrays).
    pub columns: Option<Vec<String>>,
}

impl CsvSourceSpec {
    /// The source's output schema: `schema` projected on `columns`.
    pub fn output_schema(&self) -> SchemaRef {
        project_schema(&self.schema, self.columns.as_deref())
    }

    /// Indices in `schema` of the output columns, when projected.
    pub fn projection(&self) -> Option<Vec<usize>> {
        let columns = self.columns.as_ref()?;
        Some(
            self.schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| columns.contains(f.name()))
                .map(|(i, _)| i)
                .collect(),
        )
    }
}

/// `schema` with only the fields named in `columns` (all when `None`), in
/// `schema`'s order.
pub fn project_schema(schema: &SchemaRef, columns: Option<&[String]>) -> SchemaRef {
    let Some(columns) = columns else {
        return Arc::clone(schema);
    };
    let kept: Vec<_> = schema
        .fields()
        .iter()
        .filter(|f| columns.contains(f.name()))
        .cloned()
        .collect();
    Arc::new(Schema::new_with_metadata(kept, schema.metadata().clone()))
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParquetSourceSpec {
    pub path: PathBuf,
    /// Empty until `plan` reads it from the footer (and projects it on
    /// `columns`).
    pub schema: SchemaRef,
    pub batch_size: usize,
    pub watermark: Option<WatermarkSpec>,
    /// The columns read, in file order; `None`: all. Set by `plan` to the
    /// columns the operators downstream use (projection pushdown).
    pub columns: Option<Vec<String>>,
    /// A predicate every row the job keeps satisfies (the filter that
    /// follows the source): row groups and pages whose statistics prove it
    /// false are skipped. Set by `plan` (predicate pushdown).
    pub prune: Option<Expr>,
}

/// `watermark = { column = "ts", delay = "2s" }`: the watermark trails the
/// largest `column` value seen by `delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkSpec {
    pub column: String,
    pub delay_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NamedExpr {
    pub name: String,
    pub expr: Expr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

impl AggFunc {
    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Count => "count",
            AggFunc::Sum => "sum",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::Avg => "avg",
        }
    }

    fn from_name(name: &str) -> Option<AggFunc> {
        [
            AggFunc::Count,
            AggFunc::Sum,
            AggFunc::Min,
            AggFunc::Max,
            AggFunc::Avg,
        ]
        .into_iter()
        .find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

impl std::fmt::Display for AggFunc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggSpec {
    pub func: AggFunc,
    /// `None` for `count(*)`.
    pub column: Option<String>,
    /// The alias, else `count` for `count(*)`, else `<func>_<column>`.
    pub output: String,
}

/// One sort key: `"column"`, `"column asc"` or `"column desc"`. Nulls sort
/// last ascending and first descending (as in PostgreSQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub column: String,
    pub descending: bool,
}

/// Runs a sort merges at once unless the job file sets `fan_in`.
pub const SORT_FAN_IN_DEFAULT: usize = 16;

const OPERATOR_TYPES: [&str; 27] = [
    "datagen",
    "csv_source",
    "parquet_source",
    "arrow_ipc_source",
    "filter",
    "project",
    "key_by",
    "aggregate",
    "window",
    "sort",
    "sample",
    "fill_null",
    "batch",
    "cast",
    "shuffle",
    "split",
    "standardize",
    "standardize_fit",
    "bucketize",
    "one_hot",
    "join",
    "blackhole",
    "print",
    "csv_sink",
    "parquet_sink",
    "flight_sink",
    "arrow_ipc_sink",
];

const COMMON_KEYS: [&str; 4] = ["name", "type", "input", "parallelism"];

/// Keys an operator table of type `type_name` may hold besides [`COMMON_KEYS`].
fn type_keys(type_name: &str) -> &'static [&'static str] {
    match type_name {
        "datagen" => &[
            "rows",
            "keys",
            "seed",
            "rows_per_second",
            "batch_size",
            "columns",
            "ts_step_ms",
            "ts_disorder_ms",
            "watermark",
        ],
        "csv_source" => &["path", "has_header", "schema", "batch_size", "watermark"],
        "parquet_source" => &["path", "batch_size", "watermark"],
        "arrow_ipc_source" => &["path", "format", "watermark"],
        "filter" => &["predicate"],
        "project" => &["columns"],
        "key_by" => &["keys"],
        "aggregate" => &["aggs"],
        "window" => &["time_column", "size", "aggs"],
        "sort" => &["keys", "fan_in"],
        "sample" => &["fraction", "seed"],
        "fill_null" => &["columns", "value"],
        "batch" => &["rows"],
        "cast" => &["columns"],
        "shuffle" => &["buffer_rows", "seed"],
        "split" => &["columns", "outputs", "seed"],
        "standardize" => &["columns", "stats", "fit"],
        "standardize_fit" => &["columns", "stats"],
        "bucketize" => &["column", "boundaries", "output"],
        "one_hot" => &["column", "categories", "prefix", "unknown", "drop"],
        "join" => &[
            "table", "format", "schema", "on", "table_on", "how", "columns", "prefix",
        ],
        "print" => &["limit"],
        "csv_sink" => &["path", "mode"],
        "parquet_sink" => &["path", "mode", "row_group_rows", "target_file_bytes"],
        "arrow_ipc_sink" => &["path", "mode", "format", "compression", "target_file_bytes"],
        "flight_sink" => &["queue_bytes", "reader_timeout"],
        _ => &[],
    }
}

/// Parses a job file's text; `file` is used in error messages only.
pub fn parse_job(text: &str, file: &Path) -> Result<JobSpec, JobError> {
    let source = Source { file, text };
    let document = DeTable::parse(text).map_err(|e| toml_error(source, &e))?;
    let root = Table {
        source,
        table: document.get_ref(),
        span: 0..0,
        scope: Scope::Document,
    };
    root.check_keys(&["job", "operator"], "the job file")?;
    let mut job = root
        .table("job")?
        .ok_or_else(|| root.missing("job", "a [job] table"))?;
    job.scope = Scope::Job;
    job.check_keys(&["name", "parallelism"], "[job]")?;
    let name = job.required_str("name")?.into_inner().to_string();
    let default_parallelism = parallelism(&job)?;
    let items = root.array("operator")?.unwrap_or_default();
    if items.is_empty() {
        return Err(source.error(&(0..0), &Scope::Document, JobError::NoOperators));
    }
    let mut operators: Vec<OperatorSpec> = Vec::with_capacity(items.len());
    for (table, item) in items.iter().enumerate() {
        let parsed = parse_operator(source, table, item, &operators)?;
        operators.extend(parsed);
    }
    Ok(JobSpec {
        name,
        file: file.to_path_buf(),
        default_parallelism,
        operators,
    })
}

fn toml_error(source: Source<'_>, error: &toml::de::Error) -> JobError {
    let offset = error.span().map_or(0, |span| span.start);
    JobError::Toml {
        file: source.file.to_path_buf(),
        line: source.line(offset),
        column: source.column(offset),
        message: error.message().to_string(),
    }
}

fn parallelism(table: &Table<'_, '_>) -> Result<Option<u32>, JobError> {
    let n = table.int("parallelism", 1, i128::from(u32::MAX))?;
    Ok(n.and_then(|n| u32::try_from(n.into_inner()).ok()))
}

/// The operator of the `[[operator]]` table at position `position`: one,
/// or one per output of a `split`.
fn parse_operator(
    source: Source<'_>,
    position: usize,
    item: &Spanned<DeValue<'_>>,
    earlier: &[OperatorSpec],
) -> Result<Vec<OperatorSpec>, JobError> {
    let index = earlier.len();
    let key = format!("operator[{position}]");
    let Some(table) = item.get_ref().as_table() else {
        let error = JobError::WrongType {
            key,
            expected: "a table",
            found: item.get_ref().type_str(),
        };
        return Err(source.error(&item.span(), &Scope::Document, error));
    };
    let mut table = Table {
        source,
        table,
        span: item.span(),
        scope: Scope::Document,
    };
    let given_name = table.str("name")?;
    if let Some(name) = &given_name {
        table.scope = Scope::Operator(name.get_ref().to_string());
    }
    let type_name = table.required_str("type")?;
    if !OPERATOR_TYPES.contains(type_name.get_ref()) {
        let error = JobError::UnknownOperatorType {
            found: type_name.get_ref().to_string(),
            suggestion: closest(type_name.get_ref(), &OPERATOR_TYPES).map(str::to_string),
            allowed: OPERATOR_TYPES.to_vec(),
        };
        return Err(table.error(&type_name.span(), error));
    }
    let type_name = *type_name.get_ref();
    let name = given_name.map_or_else(
        || format!("{type_name}-{position}"),
        |n| n.get_ref().to_string(),
    );
    table.scope = Scope::Operator(name.clone());
    let allowed: Vec<&'static str> = COMMON_KEYS
        .iter()
        .chain(type_keys(type_name))
        .copied()
        .collect();
    table.check_keys(&allowed, type_name)?;
    if let Some(first) = earlier.iter().find(|op| op.name == name) {
        let span = table.get("name").map_or(table.span.clone(), |v| v.span());
        let error = JobError::DuplicateName {
            name,
            first_line: first.line,
        };
        return Err(table.error(&span, error));
    }
    let input = match table.str("input")? {
        Some(input) => Some(resolve_input(&table, &input, earlier)?),
        None if type_name_is_source(type_name) => None,
        None => match earlier.last() {
            Some(OperatorSpec {
                kind: OperatorKind::SplitSide { split, .. },
                ..
            }) => {
                let error = split_input_error(split, earlier);
                return Err(table.error(&table.span, error));
            }
            Some(last) => Some(last.index),
            None => None,
        },
    };
    let line = source.line(item.span().start);
    let parallelism = parallelism(&table)?;
    if type_name == "split" {
        let columns: Vec<String> = required_strings(&table, "columns")?
            .iter()
            .map(|c| c.get_ref().to_string())
            .collect();
        let seed = table.u64("seed", 0)?.unwrap_or(0);
        let mut lo = 0.0;
        let sides = split_outputs(&table)?;
        let last = sides.len() - 1;
        let mut operators = Vec::with_capacity(sides.len());
        for (i, (side, fraction)) in sides.into_iter().enumerate() {
            let side_name = format!("{name}.{side}");
            if let Some(first) = earlier.iter().find(|op| op.name == side_name) {
                let span = table
                    .get("outputs")
                    .map_or(table.span.clone(), |v| v.span());
                let error = JobError::DuplicateName {
                    name: side_name,
                    first_line: first.line,
                };
                return Err(table.error(&span, error));
            }
            // The last side ends at exactly 1: no row falls between sides
            // through rounding.
            let hi = if i == last { 1.0 } else { lo + fraction };
            operators.push(OperatorSpec {
                index: index + i,
                table: position,
                name: side_name,
                line,
                input,
                parallelism,
                kind: OperatorKind::SplitSide {
                    split: name.clone(),
                    side,
                    columns: columns.clone(),
                    seed,
                    lo,
                    hi,
                },
                lines: table.lines(),
            });
            lo = hi;
        }
        return Ok(operators);
    }
    let mut kind = parse_kind(&table, type_name)?;
    if let OperatorKind::Standardize { fit, .. } = &mut kind {
        *fit = match table.str("fit")? {
            None => FitSource::Input,
            Some(text) => match *text.get_ref() {
                "input" => FitSource::Input,
                "none" => FitSource::None,
                name => FitSource::Operator(resolve_input(&table, &text, earlier).map_err(
                    |_| {
                        table.invalid(
                            "fit",
                            &text.span(),
                            format!("\"{name}\""),
                            "\"input\" (fit over this operator's input), \"none\" (read `stats` from an earlier run), or the name of an earlier operator whose output to fit over",
                        )
                    },
                )?),
            },
        };
    }
    Ok(vec![OperatorSpec {
        index,
        table: position,
        name,
        line,
        input,
        parallelism,
        kind,
        lines: table.lines(),
    }])
}

fn type_name_is_source(type_name: &str) -> bool {
    matches!(
        type_name,
        "datagen" | "csv_source" | "parquet_source" | "arrow_ipc_source"
    )
}

/// An operator reads a `split` itself rather than one of its outputs.
fn split_input_error(split: &str, earlier: &[OperatorSpec]) -> JobError {
    JobError::SplitInput {
        split: split.to_string(),
        outputs: earlier
            .iter()
            .filter(|op| matches!(&op.kind, OperatorKind::SplitSide { split: s, .. } if s == split))
            .map(|op| op.name.clone())
            .collect(),
    }
}

/// `outputs = { train = 0.9, validation = 0.1 }` of a `split`, in file
/// order: at least two, each fraction in (0, 1], summing to 1.
fn split_outputs(t: &Table<'_, '_>) -> Result<Vec<(String, f64)>, JobError> {
    const EXPECTED: &str = "a number greater than 0 and at most 1";
    let table = t.table("outputs")?.ok_or_else(|| {
        t.missing(
            "outputs",
            "a table of output = fraction, e.g. { train = 0.9, validation = 0.1 }",
        )
    })?;
    let mut sides = Vec::new();
    for (name, value) in table.entries() {
        let key = format!("outputs.{}", name.get_ref());
        let text = match (value.get_ref().as_float(), value.get_ref().as_integer()) {
            (Some(f), _) => f.as_str().replace('_', ""),
            (None, Some(i)) => i.as_str().replace('_', ""),
            _ => String::new(),
        };
        match text.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => sides.push((name.get_ref().to_string(), f)),
            _ => {
                let shown = if text.is_empty() {
                    format!("a {}", value.get_ref().type_str())
                } else {
                    text
                };
                return Err(table.invalid(&key, &value.span(), shown, EXPECTED));
            }
        }
        let valid = name
            .get_ref()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(table.invalid(
                &key,
                &name.span(),
                format!("\"{}\"", name.get_ref()),
                "an output name of letters, digits, '_' and '-'",
            ));
        }
    }
    let span = t.get("outputs").map_or(t.span.clone(), |v| v.span());
    let listed = sides
        .iter()
        .map(|(n, f)| format!("{n} = {f}"))
        .collect::<Vec<_>>()
        .join(", ");
    if sides.len() < 2 {
        return Err(t.invalid(
            "outputs",
            &span,
            format!("{{ {listed} }}"),
            "at least two outputs, e.g. { train = 0.9, validation = 0.1 }",
        ));
    }
    let sum: f64 = sides.iter().map(|(_, f)| f).sum();
    if (sum - 1.0).abs() > 1e-9 {
        return Err(t.invalid(
            "outputs",
            &span,
            format!("{{ {listed} }} (sum {sum})"),
            "fractions that sum to 1",
        ));
    }
    Ok(sides)
}

fn resolve_input(
    table: &Table<'_, '_>,
    input: &Spanned<&str>,
    earlier: &[OperatorSpec],
) -> Result<usize, JobError> {
    match earlier.iter().find(|op| op.name == *input.get_ref()) {
        Some(op) => Ok(op.index),
        None if earlier.iter().any(
            |op| matches!(&op.kind, OperatorKind::SplitSide { split, .. } if split == input.get_ref()),
        ) =>
        {
            Err(table.error(&input.span(), split_input_error(input.get_ref(), earlier)))
        }
        None => {
            let error = JobError::UnknownInput {
                input: input.get_ref().to_string(),
                earlier: earlier.iter().map(|op| op.name.clone()).collect(),
            };
            Err(table.error(&input.span(), error))
        }
    }
}

fn parse_kind(t: &Table<'_, '_>, type_name: &str) -> Result<OperatorKind, JobError> {
    Ok(match type_name {
        "datagen" => OperatorKind::Datagen(datagen(t)?),
        "csv_source" => OperatorKind::CsvSource(CsvSourceSpec {
            path: required_path(t)?,
            has_header: t.bool("has_header")?.unwrap_or(true),
            schema: csv_schema(t)?,
            batch_size: batch_size(t)?,
            watermark: watermark(t)?,
            columns: None,
        }),
        "parquet_source" => OperatorKind::ParquetSource(ParquetSourceSpec {
            path: required_path(t)?,
            schema: Arc::new(Schema::empty()),
            batch_size: batch_size(t)?,
            watermark: watermark(t)?,
            columns: None,
            prune: None,
        }),
        "arrow_ipc_source" => OperatorKind::ArrowIpcSource(formats::arrow_ipc_source(
            t,
            required_path(t)?,
            watermark(t)?,
        )?),
        "filter" => {
            let text = t.required_str("predicate")?;
            let predicate = Expr::parse(text.get_ref());
            let predicate = predicate.map_err(|e| expr_error(t, &text, "predicate", e))?;
            OperatorKind::Filter { predicate }
        }
        "project" => {
            let items = required_strings(t, "columns")?;
            let columns = items
                .iter()
                .map(|item| named_expr(t, item))
                .collect::<Result<_, _>>()?;
            OperatorKind::Project { columns }
        }
        "key_by" => {
            let keys = required_strings(t, "keys")?;
            OperatorKind::KeyBy {
                keys: keys.iter().map(|k| k.get_ref().to_string()).collect(),
            }
        }
        "aggregate" => OperatorKind::Aggregate { aggs: aggs(t)? },
        "window" => {
            let size = t.required_str("size")?;
            let size_ms = parse_duration_ms(size.get_ref()).filter(|ms| *ms > 0);
            let size_ms = size_ms.ok_or_else(|| invalid_duration(t, "size", &size))?;
            OperatorKind::Window {
                time_column: t.required_str("time_column")?.into_inner().to_string(),
                size_ms,
                aggs: aggs(t)?,
            }
        }
        "sort" => OperatorKind::Sort {
            keys: sort_keys(t)?,
            fan_in: t
                .u64("fan_in", 2)?
                .map_or(SORT_FAN_IN_DEFAULT, |n| n as usize),
        },
        "sample" => OperatorKind::Sample {
            fraction: fraction(t, "fraction")?,
            seed: t.u64("seed", 0)?.unwrap_or(0),
        },
        "fill_null" => OperatorKind::FillNull {
            columns: required_strings(t, "columns")?
                .iter()
                .map(|c| c.get_ref().to_string())
                .collect(),
            value: scalar(t, "value")?,
        },
        "batch" => OperatorKind::Batch {
            rows: t
                .int("rows", 1, 1 << 30)?
                .ok_or_else(|| t.missing("rows", "an integer between 1 and 1073741824"))?
                .into_inner() as usize,
        },
        "shuffle" => OperatorKind::Shuffle {
            buffer_rows: t
                .int("buffer_rows", 1, 1 << 30)?
                .map_or(SHUFFLE_BUFFER_ROWS_DEFAULT, |n| n.into_inner() as usize),
            seed: t.u64("seed", 0)?.unwrap_or(0),
        },
        "cast" => OperatorKind::Cast {
            columns: cast_columns(t)?,
        },
        "standardize" => OperatorKind::Standardize {
            columns: distinct_columns(t)?,
            stats: PathBuf::from(t.required_str("stats")?.into_inner()),
            fit: FitSource::Input,
        },
        "standardize_fit" => OperatorKind::StandardizeFit {
            columns: distinct_columns(t)?,
            stats: PathBuf::from(t.required_str("stats")?.into_inner()),
        },
        "bucketize" => OperatorKind::Bucketize(features::bucketize(t)?),
        "one_hot" => OperatorKind::OneHot(features::one_hot(t)?),
        "join" => OperatorKind::Join(features::join(t)?),
        "blackhole" => OperatorKind::Blackhole,
        "print" => OperatorKind::Print {
            limit: t.u64("limit", 0)?,
        },
        "csv_sink" => OperatorKind::CsvSink {
            path: required_path(t)?,
            mode: sink_mode(t)?,
        },
        "parquet_sink" => OperatorKind::ParquetSink {
            path: required_path(t)?,
            mode: sink_mode(t)?,
            options: formats::parquet_sink_options(t)?,
        },
        "arrow_ipc_sink" => OperatorKind::ArrowIpcSink {
            path: required_path(t)?,
            mode: sink_mode(t)?,
            options: formats::arrow_ipc_sink_options(t)?,
        },
        "flight_sink" => OperatorKind::FlightSink {
            queue_bytes: match t.str("queue_bytes")? {
                None => FLIGHT_QUEUE_BYTES_DEFAULT,
                Some(text) => crate::config::parse_memory_size(text.get_ref())
                    .ok()
                    .filter(|b| *b > 0 && *b <= 1 << 40)
                    .ok_or_else(|| {
                        t.invalid(
                            "queue_bytes",
                            &text.span(),
                            format!("\"{}\"", text.get_ref()),
                            "a size such as \"4mb\" (more than 0, at most 1tb)",
                        )
                    })?,
            },
            reader_timeout_ms: match t.str("reader_timeout")? {
                None => Some(FLIGHT_READER_TIMEOUT_MS_DEFAULT),
                Some(text) if matches!(text.get_ref().trim(), "0" | "none" | "forever") => None,
                Some(text) => Some(
                    parse_duration_ms(text.get_ref())
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| invalid_duration(t, "reader_timeout", &text))?
                        as u64,
                ),
            },
        },
        other => unreachable!("operator type '{other}' passed the OPERATOR_TYPES check"),
    })
}

/// A non-empty `columns` list without repeats.
fn distinct_columns(t: &Table<'_, '_>) -> Result<Vec<String>, JobError> {
    let items = required_strings(t, "columns")?;
    let mut columns: Vec<String> = Vec::with_capacity(items.len());
    for item in &items {
        if columns.iter().any(|c| c == item.get_ref()) {
            return Err(t.invalid(
                "columns",
                &item.span(),
                format!("'{}' twice", item.get_ref()),
                "distinct column names",
            ));
        }
        columns.push(item.get_ref().to_string());
    }
    if columns.is_empty() {
        return Err(t.missing("columns", "at least one column name"));
    }
    Ok(columns)
}

/// `columns = { name = "type", ... }` of a `cast`, in file order.
fn cast_columns(t: &Table<'_, '_>) -> Result<Vec<(String, arrow_schema::DataType)>, JobError> {
    const EXPECTED: &str = "one of int64, float64, utf8, boolean";
    let table = t
        .table("columns")?
        .ok_or_else(|| t.missing("columns", "a table of column = \"type\""))?;
    let mut columns = Vec::new();
    for (name, value) in table.entries() {
        let text = value
            .get_ref()
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let data_type = match text.as_str() {
            "int64" | "bigint" => arrow_schema::DataType::Int64,
            "float64" | "double" => arrow_schema::DataType::Float64,
            "utf8" | "string" => arrow_schema::DataType::Utf8,
            "boolean" | "bool" => arrow_schema::DataType::Boolean,
            _ => {
                return Err(table.invalid(name.get_ref(), &value.span(), text, EXPECTED));
            }
        };
        columns.push((name.get_ref().to_string(), data_type));
    }
    if columns.is_empty() {
        return Err(t.missing("columns", "at least one column = \"type\""));
    }
    Ok(columns)
}

/// Rows a `shuffle` holds when the job file does not say.
pub const SHUFFLE_BUFFER_ROWS_DEFAULT: usize = 1 << 16;

/// A number in (0, 1] (an integer or a float).
fn fraction(t: &Table<'_, '_>, key: &str) -> Result<f64, JobError> {
    let value = t
        .get(key)
        .ok_or_else(|| t.missing(key, "a number greater than 0 and at most 1"))?;
    let text = match (value.get_ref().as_float(), value.get_ref().as_integer()) {
        (Some(f), _) => f.as_str().replace('_', ""),
        (None, Some(i)) => i.as_str().replace('_', ""),
        _ => String::new(),
    };
    match text.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(t.invalid(
            key,
            &value.span(),
            if text.is_empty() {
                "a non-number".to_owned()
            } else {
                text
            },
            "a number greater than 0 and at most 1",
        )),
    }
}

/// A literal: an integer, a float, a string or a boolean.
fn scalar(t: &Table<'_, '_>, key: &str) -> Result<ScalarValue, JobError> {
    let value = t
        .get(key)
        .ok_or_else(|| t.missing(key, "an integer, float, string or boolean"))?;
    let v = value.get_ref();
    let parsed = if let Some(i) = v.as_integer() {
        i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
            .ok()
            .map(ScalarValue::Int64)
    } else if let Some(f) = v.as_float() {
        f.as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .map(ScalarValue::Float64)
    } else if let Some(s) = v.as_str() {
        Some(ScalarValue::Utf8(s.to_owned()))
    } else {
        v.as_bool().map(ScalarValue::Boolean)
    };
    parsed.ok_or_else(|| {
        t.invalid(
            key,
            &value.span(),
            "this value".to_owned(),
            "an integer, float, string or boolean",
        )
    })
}

fn datagen(t: &Table<'_, '_>) -> Result<DatagenSpec, JobError> {
    let columns = match t.str_array("columns")? {
        Some(items) => datagen_columns(t, &items)?,
        None => DATAGEN_COLUMNS.iter().map(|c| c.to_string()).collect(),
    };
    let ts_disorder_ms = t.i64("ts_disorder_ms", 0)?.unwrap_or(0);
    let default_watermark = columns.iter().any(|c| c == "ts").then(|| WatermarkSpec {
        column: "ts".to_string(),
        delay_ms: ts_disorder_ms,
    });
    Ok(DatagenSpec {
        rows: t
            .u64("rows", 0)?
            .ok_or_else(|| t.missing("rows", "an integer"))?,
        keys: t.u64("keys", 1)?.unwrap_or(DATAGEN_KEYS_DEFAULT),
        seed: t.u64("seed", 0)?.unwrap_or(0),
        rows_per_second: t.u64("rows_per_second", 1)?,
        batch_size: batch_size(t)?,
        columns,
        ts_step_ms: t.i64("ts_step_ms", 0)?.unwrap_or(1),
        ts_disorder_ms,
        watermark: watermark(t)?.or(default_watermark),
    })
}

fn datagen_columns(t: &Table<'_, '_>, items: &[Spanned<&str>]) -> Result<Vec<String>, JobError> {
    let mut columns: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let name = item.get_ref().to_string();
        if !DATAGEN_COLUMNS.contains(item.get_ref()) || columns.contains(&name) {
            let expected = format!("distinct names among {}", DATAGEN_COLUMNS.join(", "));
            return Err(t.invalid("columns", &item.span(), format!("'{name}'"), &expected));
        }
        columns.push(name);
    }
    if columns.is_empty() {
        let span = t.get("columns").map_or(t.span.clone(), |v| v.span());
        return Err(t.invalid("columns", &span, "[]".to_string(), "at least one column"));
    }
    Ok(columns)
}

fn batch_size(t: &Table<'_, '_>) -> Result<usize, JobError> {
    let n = t.int("batch_size", 1, i128::from(u32::MAX))?;
    Ok(n.and_then(|n| usize::try_from(n.into_inner()).ok())
        .unwrap_or(BATCH_SIZE_DEFAULT))
}

fn required_path(t: &Table<'_, '_>) -> Result<PathBuf, JobError> {
    Ok(PathBuf::from(t.required_str("path")?.into_inner()))
}

fn sink_mode(t: &Table<'_, '_>) -> Result<SinkMode, JobError> {
    let Some(mode) = t.str("mode")? else {
        return Ok(SinkMode::default());
    };
    match *mode.get_ref() {
        "error" => Ok(SinkMode::Error),
        "overwrite" => Ok(SinkMode::Overwrite),
        other => Err(t.invalid(
            "mode",
            &mode.span(),
            format!("'{other}'"),
            "\"error\" (refuse a non-empty directory) or \"overwrite\" (replace its part files)",
        )),
    }
}

fn sort_keys(t: &Table<'_, '_>) -> Result<Vec<SortKey>, JobError> {
    let items = required_strings(t, "keys")?;
    let mut keys = Vec::with_capacity(items.len());
    for item in &items {
        let words: Vec<&str> = item.get_ref().split_whitespace().collect();
        let descending = match words.as_slice() {
            [_] => false,
            [_, order] if order.eq_ignore_ascii_case("asc") => false,
            [_, order] if order.eq_ignore_ascii_case("desc") => true,
            _ => {
                let value = format!("'{}'", item.get_ref());
                return Err(t.invalid(
                    "keys",
                    &item.span(),
                    value,
                    "\"column\", \"column asc\" or \"column desc\"",
                ));
            }
        };
        keys.push(SortKey {
            column: words[0].to_string(),
            descending,
        });
    }
    Ok(keys)
}

fn required_strings<'a>(t: &Table<'a, '_>, key: &str) -> Result<Vec<Spanned<&'a str>>, JobError> {
    let items = t
        .str_array(key)?
        .ok_or_else(|| t.missing(key, "an array of strings"))?;
    if items.is_empty() {
        let span = t.get(key).map_or(t.span.clone(), |v| v.span());
        return Err(t.invalid(key, &span, "[]".to_string(), "at least one element"));
    }
    Ok(items)
}

fn watermark(t: &Table<'_, '_>) -> Result<Option<WatermarkSpec>, JobError> {
    let Some(w) = t.table("watermark")? else {
        return Ok(None);
    };
    w.check_keys(&["column", "delay"], "watermark")?;
    let column = w.required_str("column")?.into_inner().to_string();
    let delay_ms = match w.str("delay")? {
        Some(delay) => parse_duration_ms(delay.get_ref())
            .ok_or_else(|| invalid_duration(&w, "delay", &delay))?,
        None => 0,
    };
    Ok(Some(WatermarkSpec { column, delay_ms }))
}

/// Parses `500ms`, `10s`, `1 min`, `2h` (an integer and a unit) to milliseconds.
fn parse_duration_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

fn invalid_duration(t: &Table<'_, '_>, key: &str, text: &Spanned<&str>) -> JobError {
    let expected = "a positive duration such as \"500ms\", \"10s\", \"1 min\" or \"2h\"";
    t.invalid(
        key,
        &text.span(),
        format!("\"{}\"", text.get_ref()),
        expected,
    )
}

fn csv_schema(t: &Table<'_, '_>) -> Result<SchemaRef, JobError> {
    let Some(schema) = t.table("schema")? else {
        return Ok(Arc::new(Schema::empty()));
    };
    let mut fields = Vec::new();
    for (column, value) in schema.entries() {
        let key = format!("schema.{}", column.get_ref());
        let type_name = value.get_ref().as_str();
        let data_type = type_name.and_then(csv_type);
        let Some(data_type) = data_type else {
            let found = type_name.map_or_else(
                || value.get_ref().type_str().to_string(),
                |s| format!("\"{s}\""),
            );
            let expected = "one of \"int64\", \"float64\", \"utf8\", \"boolean\", \"timestamp_ms\"";
            return Err(t.invalid(&key, &value.span(), found, expected));
        };
        fields.push(Field::new(column.get_ref().as_ref(), data_type, true));
    }
    Ok(Arc::new(Schema::new(fields)))
}

fn csv_type(name: &str) -> Option<DataType> {
    match name {
        "int64" => Some(DataType::Int64),
        "float64" => Some(DataType::Float64),
        "utf8" => Some(DataType::Utf8),
        "boolean" => Some(DataType::Boolean),
        "timestamp_ms" => Some(DataType::Timestamp(TimeUnit::Millisecond, None)),
        _ => None,
    }
}

fn named_expr(t: &Table<'_, '_>, item: &Spanned<&str>) -> Result<NamedExpr, JobError> {
    let parsed = Expr::parse_named(item.get_ref());
    let (expr, alias) = parsed.map_err(|e| expr_error(t, item, "column", e))?;
    let text = item.get_ref().to_string();
    let name = match (alias, &expr) {
        (Some(alias), _) => alias,
        (None, Expr::Column(column)) => column.clone(),
        (None, _) => return Err(t.error(&item.span(), JobError::MissingAlias { text })),
    };
    Ok(NamedExpr { name, expr })
}

fn expr_error(
    t: &Table<'_, '_>,
    item: &Spanned<&str>,
    role: &'static str,
    error: ExprError,
) -> JobError {
    let text = item.get_ref().to_string();
    t.error(&item.span(), JobError::Expr { role, text, error })
}

fn aggs(t: &Table<'_, '_>) -> Result<Vec<AggSpec>, JobError> {
    let items = required_strings(t, "aggs")?;
    items
        .iter()
        .enumerate()
        .map(|(index, item)| agg(t, index, item))
        .collect()
}

fn agg(t: &Table<'_, '_>, index: usize, item: &Spanned<&str>) -> Result<AggSpec, JobError> {
    let call = parse_agg_call(item.get_ref()).map_err(|e| expr_error(t, item, "aggregate", e))?;
    let text = item.get_ref().to_string();
    let Some(func) = AggFunc::from_name(&call.func) else {
        let error = JobError::UnknownAggregate {
            func: call.func,
            text,
        };
        return Err(t.error(&item.span(), error));
    };
    if call.column.is_none() && func != AggFunc::Count {
        let expected = format!("a column inside {func}(...); only count accepts *");
        return Err(t.invalid(
            &format!("aggs[{index}]"),
            &item.span(),
            format!("\"{text}\""),
            &expected,
        ));
    }
    let output = match (call.alias, &call.column) {
        (Some(alias), _) => alias,
        (None, None) => "count".to_string(),
        (None, Some(column)) => format!("{func}_{column}"),
    };
    Ok(AggSpec {
        func,
        column: call.column,
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_units() {
        let cases = [
            ("500ms", Some(500)),
            ("10s", Some(10_000)),
            ("1 min", Some(60_000)),
            ("2h", Some(7_200_000)),
            ("10", None),
            ("1.5s", None),
            ("10 parsecs", None),
            ("-1s", None),
            ("99999999999999999h", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration_ms(text), expected, "{text}");
        }
    }
}
