//! Job files: from TOML text to a validated, schema-annotated logical plan.
//!
//! This module owns everything between a user's job file and the first batch:
//!
//! - `tomlx` reads the TOML document with byte spans, so that every error can
//!   name the file and the 1-based line of the offending value;
//! - `spec` turns the document into a [`JobSpec`]: operators in file order with
//!   their inputs resolved to indices, expressions and aggregates parsed;
//! - `expr` and `eval` are the expression language of `filter` and `project`:
//!   lexer, precedence-climbing parser, type checker and a vectorised evaluator
//!   over Arrow compute kernels;
//! - `plan` propagates schemas through the operators (inferring CSV schemas and
//!   reading Parquet footers and Arrow IPC schemas on the way) and checks that
//!   every operator fits its input;
//! - `formats` holds the Arrow IPC source's spec, the part-file options of the
//!   Parquet and Arrow IPC sinks, and the probing of IPC files;
//! - `graph` chains a plan into the job graph that the scheduler deploys.
//!
//! Invariants of a [`LogicalPlan`]:
//!
//! - operators are in file order, which is a topological order: an operator's
//!   `input` is always a smaller index, never a sink, and sources have none;
//! - `schemas[i]` is the output schema of operator `i` (empty for sinks); every
//!   column an operator's expressions, keys or aggregates name exists in its
//!   input's schema with a type that fits its use;
//! - `keyed[i]` is `Some(key column indices)` exactly for `key_by` operators; an
//!   `aggregate` or `window` reads its keys from the `key_by` it consumes directly;
//! - CSV, Parquet and Arrow IPC source specs carry a non-empty schema after
//!   planning; every file of an Arrow IPC source has the same columns.
//!
//! Limits: one input per operator (no unions, and no stream-stream joins: a `join`
//! looks rows up in a bounded dimension table read from a file), tumbling event-time
//! windows only, relative paths are kept as written (they resolve against the
//! process's working directory, not the job file).
//!
//! Errors are a single [`JobError`] enum; the location of a problem is attached by
//! wrapping it in [`JobError::At`], so leaf checks (such as
//! [`aggregate_output_schema`]) stay usable without a file.

mod eval;
mod expr;
mod formats;
pub mod graph;
mod plan;
mod pushdown;
mod spec;
pub mod stats;
#[cfg(test)]
mod tests;
mod tomlx;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};

pub use expr::{BinOp, Expr, ExprError, ScalarValue};
pub use formats::{
    ArrowIpcSinkOptions, ArrowIpcSourceSpec, IPC_EXTENSIONS, IPC_FOOTER_BYTES_MAX, IpcCompression,
    IpcFileError, IpcFileInfo, IpcFormat, ParquetSinkOptions, ROW_GROUP_ROWS_DEFAULT,
    SchemaDifference, inspect_ipc, read_ipc_schema, schema_difference,
};
pub use plan::{
    LogicalPlan, aggregate_output_schema, infer_csv_schema, plan, read_parquet_schema, source_files,
};
pub use spec::{
    AggFunc, AggSpec, BucketizeSpec, Categories, CsvSourceSpec, DatagenSpec, DimensionTableSpec,
    FitSource, JobSpec, JoinHow, JoinSpec, NamedExpr, Number, ONE_HOT_CATEGORIES_MAX, OneHotSpec,
    OperatorKind, OperatorSpec, ParquetSourceSpec, SORT_FAN_IN_DEFAULT, SinkMode, SortKey,
    SourceLines, TableFormat, UnknownCategory, WatermarkSpec, parse_job,
};

/// The columns a `datagen` source can produce, in their default order.
pub const DATAGEN_COLUMNS: [&str; 4] = ["key", "value", "price", "ts"];

/// Reads, parses and plans the job file at `path`.
pub fn load_job(path: &Path) -> Result<LogicalPlan, JobError> {
    let text = std::fs::read_to_string(path).map_err(|source| JobError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    plan(parse_job(&text, path)?)
}

/// The schema of a `datagen` source producing `columns` (a subset of
/// [`DATAGEN_COLUMNS`], already validated): key, value and ts (epoch millis) are
/// Int64, price is Float64, none is nullable. Unknown names are typed Int64.
pub fn datagen_schema(columns: &[String]) -> SchemaRef {
    let fields: Vec<Field> = columns
        .iter()
        .map(|name| {
            let data_type = if name == "price" {
                DataType::Float64
            } else {
                DataType::Int64
            };
            Field::new(name, data_type, false)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Where in a job file a problem lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Which part of the job file a located error belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Document,
    Job,
    Operator(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Document => Ok(()),
            Scope::Job => write!(f, "[job]: "),
            Scope::Operator(name) => write!(f, "operator '{name}': "),
        }
    }
}

/// Everything that can be wrong with a job file. Problems found in a file are
/// wrapped in [`JobError::At`], whose Display reads
/// `file:line: operator 'name': <problem>`.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: TOML syntax error: {message}", .file.display())]
    Toml {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{at}: {scope}{error}")]
    At {
        at: Location,
        scope: Scope,
        error: Box<JobError>,
    },
    #[error("missing required key '{key}' ({expected})")]
    MissingKey { key: String, expected: &'static str },
    #[error("key '{key}' must be {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("key '{key}' has invalid value {value}; expected {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: String,
    },
    #[error("unknown key '{key}' for {table}{}", hint(.suggestion, .allowed))]
    UnknownKey {
        key: String,
        table: String,
        suggestion: Option<String>,
        allowed: Vec<&'static str>,
    },
    #[error("unknown operator type '{found}'{}", hint(.suggestion, .allowed))]
    UnknownOperatorType {
        found: String,
        suggestion: Option<String>,
        allowed: Vec<&'static str>,
    },
    #[error("operator name '{name}' is already used on line {first_line}")]
    DuplicateName { name: String, first_line: usize },
    #[error("input '{input}' does not name an earlier operator; earlier operators are {}", list(.earlier))]
    UnknownInput { input: String, earlier: Vec<String> },
    #[error("a {kind} source takes no input, but input '{input}' is given")]
    SourceWithInput { kind: &'static str, input: String },
    #[error("a {kind} operator needs an input, but no operator precedes it")]
    MissingInput { kind: &'static str },
    #[error("{0}")]
    Stats(#[from] stats::StatsError),
    #[error(
        "column '{column}' is {found}, and {kind} takes numeric columns (integers or floats): cast or project it first"
    )]
    NotNumeric {
        column: String,
        found: DataType,
        kind: &'static str,
    },
    #[error(
        "input '{split}' is a split, which has one output per side: name one of {} (e.g. input = \"{}\")",
        list(.outputs),
        .outputs.first().map_or("", String::as_str)
    )]
    SplitInput { split: String, outputs: Vec<String> },
    #[error("input '{input}' is a sink, and sinks produce nothing to consume")]
    SinkAsInput { input: String },
    #[error("{role} \"{text}\": {error}")]
    Expr {
        role: &'static str,
        text: String,
        error: ExprError,
    },
    #[error(
        "unknown aggregate function '{func}' in \"{text}\"; expected one of count, sum, min, max, avg"
    )]
    UnknownAggregate { func: String, text: String },
    #[error("column '{column}' not found; input columns are {}", list(.available))]
    UnknownColumn {
        column: String,
        available: Vec<String>,
    },
    #[error(
        "column '{column}' (key '{key}') is not a column of {}; the file's own column names are \
         not listed, since they are the file's data",
        .data_file.display()
    )]
    UnknownDataColumn {
        column: String,
        key: String,
        data_file: PathBuf,
    },
    #[error(
        "a column of {} has type {found}, which a sort cannot carry; project the columns to \
         sort first",
        .data_file.display()
    )]
    UnsortableDataColumn { data_file: PathBuf, found: DataType },
    #[error("{func}({column}) needs a {needs} column, but '{column}' is {found}")]
    AggregateType {
        func: AggFunc,
        column: String,
        needs: &'static str,
        found: DataType,
    },
    #[error("{role} column '{column}' must be Int64 (epoch milliseconds), found {found}")]
    TimeColumnType {
        role: &'static str,
        column: String,
        found: DataType,
    },
    #[error("predicate \"{text}\" must be Boolean, found {found}")]
    PredicateNotBoolean { text: String, found: DataType },
    #[error("column expression \"{text}\" needs a name; write \"{text} as <name>\"")]
    MissingAlias { text: String },
    #[error("output column '{name}' is defined twice")]
    DuplicateColumn { name: String },
    #[error(
        "key column '{column}' has type {found}; keys must be integers, floats, Boolean, strings, dates or timestamps"
    )]
    KeyType { column: String, found: DataType },
    #[error("{role} column '{column}' must be {expected}, found {found}; cast it first")]
    FeatureColumnType {
        role: &'static str,
        column: String,
        expected: &'static str,
        found: DataType,
    },
    #[error(
        "join key '{column}' is {found}, but the table's key column '{table_column}' is \
         {table_found}; key types must match ({})",
        if matches!(.table_found, DataType::Null) {
            "the table has no rows to infer types from: declare them with `schema`"
        } else {
            "cast the stream's column first"
        }
    )]
    JoinKeyType {
        column: String,
        found: DataType,
        table_column: String,
        table_found: DataType,
    },
    #[error(
        "column '{column}', added from the dimension table, is already a column of the \
         stream; set `prefix` (e.g. prefix = \"dim_\") or choose other `columns`"
    )]
    JoinColumnClash { column: String },
    #[error("a window needs a key_by input, but '{input}' is a {kind}")]
    WindowNeedsKeyBy { input: String, kind: &'static str },
    #[error("no {} files in directory {}", dotted(.extensions), .path.display())]
    NoDataFiles {
        path: PathBuf,
        extensions: Vec<&'static str>,
    },
    #[error("{}: cannot infer the CSV schema: {source}", .path.display())]
    CsvSchema { path: PathBuf, source: ArrowError },
    #[error("{}: cannot read the Parquet schema: {source}", .path.display())]
    ParquetSchema {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{}: {source}", .path.display())]
    IpcFile { path: PathBuf, source: IpcFileError },
    #[error(
        "{}: its columns differ from those of {}, the first file: {difference}",
        .path.display(), .first.display()
    )]
    IpcSchemaMismatch {
        path: PathBuf,
        first: PathBuf,
        difference: SchemaDifference,
    },
    #[error("the job has no operators; add an [[operator]] table")]
    NoOperators,
}

fn hint(suggestion: &Option<String>, allowed: &[&'static str]) -> String {
    let expected = format!("expected one of {}", allowed.join(", "));
    match suggestion {
        Some(s) => format!("; did you mean '{s}'? ({expected})"),
        None => format!("; {expected}"),
    }
}

/// `.csv`, or `.arrow, .arrows or .ipc`.
fn dotted(extensions: &[&'static str]) -> String {
    let dotted: Vec<String> = extensions.iter().map(|e| format!(".{e}")).collect();
    match dotted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => dotted.concat(),
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}
