//! Schema propagation and validation: from a [`JobSpec`] to a [`LogicalPlan`].
//!
//! Operators are visited in file order; each one's output schema is derived from
//! its input's, so one pass suffices. Source schemas come from the datagen column
//! list, the job file, the CSV header plus first rows, the Parquet footer, or
//! the Arrow IPC schema of the first file (which every other file must share).
//! Every error is located at the line of the value it concerns when the spec came
//! from a file, else at the operator's line.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::spec::{AggFunc, AggSpec, JobSpec, OperatorKind, OperatorSpec, WatermarkSpec};
use super::{ExprError, JobError, Location, Scope, datagen_schema};

mod features;

/// Rows read from the first CSV file to infer column types.
const CSV_INFER_ROWS_MAX: usize = 1000;

/// A job whose every operator has a known output schema.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalPlan {
    pub spec: JobSpec,
    /// Output schema of each operator, by index; empty for sinks.
    pub schemas: Vec<SchemaRef>,
    /// Key column indices for operators whose output is keyed (`key_by`).
    pub keyed: Vec<Option<Vec<usize>>>,
}

/// Checks the graph and derives every operator's output schema. CSV sources
/// without a declared schema, and Parquet sources, get theirs from their files.
/// Parquet sources then read only the columns used downstream, and skip
/// what the filter after them would drop (see [`super::pushdown`]).
pub fn plan(spec: JobSpec) -> Result<LogicalPlan, JobError> {
    let first = plan_once(spec)?;
    match super::pushdown::push_down(&first) {
        Some(pushed) => plan_once(pushed),
        None => Ok(first),
    }
}

fn plan_once(mut spec: JobSpec) -> Result<LogicalPlan, JobError> {
    let count = spec.operators.len();
    let mut schemas: Vec<SchemaRef> = Vec::with_capacity(count);
    let mut keyed: Vec<Option<Vec<usize>>> = Vec::with_capacity(count);
    // Per operator: the data file whose column names its output carries.
    let mut origins: Vec<Option<PathBuf>> = Vec::with_capacity(count);
    let file = spec.file.clone();
    for index in 0..count {
        check_input(&spec, index)?;
        let own_origin = data_file_schema(&spec.operators[index].kind);
        resolve_source_schema(&file, &mut spec.operators[index])?;
        features::resolve_table_schema(&file, &mut spec.operators[index])?;
        let op = &spec.operators[index];
        let input_origin = op.input.and_then(|i| origins[i].clone());
        let data_file = own_origin.as_deref().or(input_origin.as_deref());
        let at = At {
            file: &file,
            op,
            data_file,
        };
        let input = op.input.map(|i| Input {
            op: &spec.operators[i],
            schema: &schemas[i],
            keys: keyed[i].as_deref(),
        });
        let (schema, keys) = output(&at, input)?;
        schemas.push(schema);
        keyed.push(keys);
        origins.push(output_origin(&op.kind, own_origin, input_origin));
    }
    for index in 0..count {
        check_fit(&spec, &schemas, index)?;
    }
    Ok(LogicalPlan {
        spec,
        schemas,
        keyed,
    })
}

/// The path of a source whose schema comes from its data files (the CSV
/// header, the Parquet footer) rather than from the job file.
fn data_file_schema(kind: &OperatorKind) -> Option<PathBuf> {
    match kind {
        OperatorKind::CsvSource(csv) if csv.schema.fields().is_empty() => Some(csv.path.clone()),
        OperatorKind::ParquetSource(parquet) => Some(parquet.path.clone()),
        OperatorKind::ArrowIpcSource(ipc) => Some(ipc.path.clone()),
        _ => None,
    }
}

/// Whose column names an operator's output carries: a file source's, those
/// of its input for operators that pass columns through, and none for
/// operators whose output columns the job file names (project, aggregate,
/// window).
fn output_origin(
    kind: &OperatorKind,
    own: Option<PathBuf>,
    input: Option<PathBuf>,
) -> Option<PathBuf> {
    match kind {
        OperatorKind::Filter { .. }
        | OperatorKind::KeyBy { .. }
        | OperatorKind::Sort { .. }
        | OperatorKind::Sample { .. }
        | OperatorKind::Batch { .. }
        | OperatorKind::Shuffle { .. }
        | OperatorKind::SplitSide { .. }
        | OperatorKind::FillNull { .. }
        | OperatorKind::Bucketize(_)
        | OperatorKind::OneHot(_) => input,
        // The added columns carry the dimension table's column names.
        OperatorKind::Join(join) => input.or_else(|| Some(join.table.path.clone())),
        _ => own,
    }
}

/// Locates errors of one operator at the line of one of its values.
struct At<'a> {
    file: &'a Path,
    op: &'a OperatorSpec,
    /// The data file whose column names the operator's input carries (or,
    /// for a source, its own): errors must not list them, since a job must
    /// not learn a file's header from an error message.
    data_file: Option<&'a Path>,
}

impl At<'_> {
    fn error(&self, key: &str, error: JobError) -> JobError {
        self.located(self.op.lines.key(key), self.redacted(key, error))
    }

    fn item_error(&self, key: &str, index: usize, error: JobError) -> JobError {
        self.located(self.op.lines.item(key, index), self.redacted(key, error))
    }

    /// `error` without the column names of a data file: an unknown column
    /// names only itself, the key and the file.
    fn redacted(&self, key: &str, error: JobError) -> JobError {
        let Some(data_file) = self.data_file else {
            return error;
        };
        let column = match error {
            JobError::UnknownColumn { column, .. } => column,
            JobError::Expr {
                error: ExprError::UnknownColumn { column, .. },
                ..
            } => column,
            JobError::KeyType { found, .. } if key == "type" => {
                return JobError::UnsortableDataColumn {
                    data_file: data_file.to_path_buf(),
                    found,
                };
            }
            other => return other,
        };
        JobError::UnknownDataColumn {
            column,
            key: key.to_string(),
            data_file: data_file.to_path_buf(),
        }
    }

    fn located(&self, line: Option<usize>, error: JobError) -> JobError {
        JobError::At {
            at: Location {
                file: self.file.to_path_buf(),
                line: line.unwrap_or(self.op.line),
            },
            scope: Scope::Operator(self.op.name.clone()),
            error: Box::new(error),
        }
    }
}

struct Input<'a> {
    op: &'a OperatorSpec,
    schema: &'a SchemaRef,
    keys: Option<&'a [usize]>,
}

fn check_input(spec: &JobSpec, index: usize) -> Result<(), JobError> {
    let op = &spec.operators[index];
    assert_eq!(op.index, index, "operator indices follow file order");
    let at = At {
        file: &spec.file,
        op,
        data_file: None,
    };
    let kind = op.kind.type_name();
    let name_of = |i: usize| {
        spec.operators
            .get(i)
            .map_or_else(|| format!("#{i}"), |o| o.name.clone())
    };
    match op.input {
        Some(i) if op.kind.is_source() => Err(at.error(
            "input",
            JobError::SourceWithInput {
                kind,
                input: name_of(i),
            },
        )),
        None if !op.kind.is_source() => Err(at.error("input", JobError::MissingInput { kind })),
        Some(i) if i >= index => {
            let earlier = spec.operators[..index]
                .iter()
                .map(|o| o.name.clone())
                .collect();
            Err(at.error(
                "input",
                JobError::UnknownInput {
                    input: name_of(i),
                    earlier,
                },
            ))
        }
        Some(i) if spec.operators[i].kind.is_sink() => {
            Err(at.error("input", JobError::SinkAsInput { input: name_of(i) }))
        }
        _ => Ok(()),
    }
}

fn resolve_source_schema(file: &Path, op: &mut OperatorSpec) -> Result<(), JobError> {
    let at_path = |error: JobError| {
        let at = At {
            file,
            op,
            data_file: None,
        };
        at.error("path", error)
    };
    let schema = match &op.kind {
        OperatorKind::CsvSource(csv) if csv.schema.fields().is_empty() => {
            infer_csv_schema(&csv.path, csv.has_header).map_err(at_path)?
        }
        OperatorKind::ParquetSource(parquet) => {
            let schema = read_parquet_schema(&parquet.path).map_err(at_path)?;
            super::spec::project_schema(&schema, parquet.columns.as_deref())
        }
        OperatorKind::ArrowIpcSource(ipc) => {
            let schema = super::read_ipc_schema(&ipc.path, ipc.format).map_err(at_path)?;
            super::spec::project_schema(&schema, ipc.columns.as_deref())
        }
        _ => return Ok(()),
    };
    match &mut op.kind {
        OperatorKind::CsvSource(csv) => csv.schema = schema,
        OperatorKind::ParquetSource(parquet) => parquet.schema = schema,
        OperatorKind::ArrowIpcSource(ipc) => ipc.schema = schema,
        _ => unreachable!("only sources reach here"),
    }
    Ok(())
}

/// The files a source at `path` reads: the file itself, or the directory's files
/// ending in `.extension`, sorted by name.
pub fn source_files(path: &Path, extension: &'static str) -> Result<Vec<PathBuf>, JobError> {
    data_files(path, &[extension])
}

/// The files a source at `path` reads: the file itself, or the directory's
/// files ending in one of `extensions`, sorted by name; never empty.
pub(super) fn data_files(
    path: &Path,
    extensions: &[&'static str],
) -> Result<Vec<PathBuf>, JobError> {
    let io = |source| JobError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !std::fs::metadata(path).map_err(io)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let file = entry.map_err(io)?.path();
        let listed = file
            .extension()
            .is_some_and(|e| extensions.iter().any(|x| e == *x));
        if listed && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(JobError::NoDataFiles {
            path: path.to_path_buf(),
            extensions: extensions.to_vec(),
        });
    }
    Ok(files)
}

/// Infers a CSV schema from the header and first rows of the first file.
pub fn infer_csv_schema(path: &Path, has_header: bool) -> Result<SchemaRef, JobError> {
    let first = first_file(path, "csv")?;
    let reader = File::open(&first).map_err(|source| JobError::Io {
        path: first.clone(),
        source,
    })?;
    let format = arrow_csv::reader::Format::default().with_header(has_header);
    match format.infer_schema(reader, Some(CSV_INFER_ROWS_MAX)) {
        Ok((schema, _rows)) => Ok(Arc::new(schema)),
        Err(source) => Err(JobError::CsvSchema {
            path: first,
            source,
        }),
    }
}

/// Reads the Arrow schema from the footer of the first Parquet file.
pub fn read_parquet_schema(path: &Path) -> Result<SchemaRef, JobError> {
    let first = first_file(path, "parquet")?;
    let file = File::open(&first).map_err(|source| JobError::Io {
        path: first.clone(),
        source,
    })?;
    match ParquetRecordBatchReaderBuilder::try_new(file) {
        Ok(builder) => Ok(builder.schema().clone()),
        Err(source) => Err(JobError::ParquetSchema {
            path: first,
            source,
        }),
    }
}

fn first_file(path: &Path, extension: &'static str) -> Result<PathBuf, JobError> {
    let first = source_files(path, extension)?.into_iter().next();
    first.ok_or_else(|| JobError::NoDataFiles {
        path: path.to_path_buf(),
        extensions: vec![extension],
    })
}

/// The output schema of `at.op` and, for `key_by`, its key column indices.
fn output(
    at: &At<'_>,
    input: Option<Input<'_>>,
) -> Result<(SchemaRef, Option<Vec<usize>>), JobError> {
    let Some(input) = input else {
        return source_output(at);
    };
    let schema = input.schema.as_ref();
    let derived = match &at.op.kind {
        OperatorKind::Filter { predicate } => {
            let text = predicate.to_string();
            let expr_error = |error| {
                at.error(
                    "predicate",
                    JobError::Expr {
                        role: "predicate",
                        text: text.clone(),
                        error,
                    },
                )
            };
            let found = predicate.data_type(schema).map_err(expr_error)?;
            if !matches!(found, DataType::Boolean | DataType::Null) {
                return Err(at.error("predicate", JobError::PredicateNotBoolean { text, found }));
            }
            input.schema.clone()
        }
        OperatorKind::Project { columns } => {
            let mut fields = Vec::with_capacity(columns.len());
            for (i, column) in columns.iter().enumerate() {
                let text = column.expr.to_string();
                let data_type = column.expr.data_type(schema).map_err(|error| {
                    at.item_error(
                        "columns",
                        i,
                        JobError::Expr {
                            role: "column",
                            text,
                            error,
                        },
                    )
                })?;
                let field = Field::new(&column.name, data_type, column.expr.nullable(schema));
                if fields.iter().any(|f: &Field| f.name() == &column.name) {
                    let error = JobError::DuplicateColumn {
                        name: column.name.clone(),
                    };
                    return Err(at.item_error("columns", i, error));
                }
                fields.push(field);
            }
            Arc::new(Schema::new(fields))
        }
        OperatorKind::KeyBy { keys } => {
            let indices = key_indices(at, schema, keys)?;
            return Ok((input.schema.clone(), Some(indices)));
        }
        OperatorKind::Aggregate { aggs } => {
            // Only a key_by feeding this operator directly makes it keyed.
            let keys = input.keys.unwrap_or_default();
            aggregate_schema(at, schema, keys, aggs, false)?
        }
        OperatorKind::Window {
            time_column, aggs, ..
        } => {
            let Some(keys) = input.keys else {
                let kind = input.op.kind.type_name();
                let error = JobError::WindowNeedsKeyBy {
                    input: input.op.name.clone(),
                    kind,
                };
                return Err(at.error("input", error));
            };
            check_time_column(schema, time_column, "time")
                .map_err(|e| at.error("time_column", e))?;
            aggregate_schema(at, schema, keys, aggs, true)?
        }
        OperatorKind::Sort { keys, .. } => {
            let columns: Vec<String> = keys.iter().map(|k| k.column.clone()).collect();
            key_indices(at, schema, &columns)?;
            // Every column travels through the sort's row format.
            if let Some(field) = schema
                .fields()
                .iter()
                .find(|f| !is_groupable(f.data_type()))
            {
                let error = JobError::KeyType {
                    column: field.name().clone(),
                    found: field.data_type().clone(),
                };
                return Err(at.error("type", error));
            }
            input.schema.clone()
        }
        OperatorKind::Sample { .. } | OperatorKind::Batch { .. } | OperatorKind::Shuffle { .. } => {
            input.schema.clone()
        }
        OperatorKind::Standardize { columns, .. }
        | OperatorKind::StandardizeFit { columns, .. } => {
            let mut fields: Vec<Field> =
                schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            for (i, column) in columns.iter().enumerate() {
                let index = numeric_column(schema, column, at.op.kind.type_name())
                    .map_err(|e| at.item_error("columns", i, e))?;
                fields[index] = fields[index].clone().with_data_type(DataType::Float64);
            }
            if at.op.kind.is_sink() {
                Arc::new(Schema::empty())
            } else {
                Arc::new(Schema::new(fields))
            }
        }
        OperatorKind::SplitSide { columns, .. } => {
            for (i, column) in columns.iter().enumerate() {
                let field = schema
                    .field_with_name(column)
                    .map_err(|_| at.item_error("columns", i, unknown_column(column, schema)))?;
                if !is_groupable(field.data_type()) {
                    let error = JobError::KeyType {
                        column: column.clone(),
                        found: field.data_type().clone(),
                    };
                    return Err(at.item_error("columns", i, error));
                }
            }
            input.schema.clone()
        }
        OperatorKind::FillNull { columns, value } => fill_null_schema(at, schema, columns, value)?,
        OperatorKind::Cast { columns } => {
            let mut fields: Vec<Field> =
                schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            for (column, to) in columns {
                let index = schema
                    .index_of(column)
                    .map_err(|_| at.error("columns", unknown_column(column, schema)))?;
                let from = schema.field(index).data_type();
                if !arrow_cast::can_cast_types(from, to) {
                    let error = JobError::InvalidValue {
                        key: format!("columns.{column}"),
                        value: to.to_string(),
                        expected: format!("a type {from} converts to"),
                    };
                    return Err(at.error("columns", error));
                }
                fields[index] = fields[index].clone().with_data_type(to.clone());
            }
            Arc::new(Schema::new(fields))
        }
        OperatorKind::Bucketize(bucketize) => features::bucketize_schema(at, schema, bucketize)?,
        OperatorKind::OneHot(one_hot) => features::one_hot_schema(at, schema, one_hot)?,
        OperatorKind::Join(join) => features::join_schema(at, schema, join)?,
        _ if at.op.kind.is_sink() => Arc::new(Schema::empty()),
        _ => unreachable!("sources have no input (checked by check_input)"),
    };
    Ok((derived, None))
}

fn source_output(at: &At<'_>) -> Result<(SchemaRef, Option<Vec<usize>>), JobError> {
    let (schema, watermark) = match &at.op.kind {
        OperatorKind::Datagen(datagen) => (datagen_schema(&datagen.columns), &datagen.watermark),
        OperatorKind::CsvSource(csv) => (csv.output_schema(), &csv.watermark),
        OperatorKind::ParquetSource(parquet) => (parquet.schema.clone(), &parquet.watermark),
        OperatorKind::ArrowIpcSource(ipc) => (ipc.schema.clone(), &ipc.watermark),
        _ => unreachable!("only sources lack an input (checked by check_input)"),
    };
    if let Some(WatermarkSpec { column, .. }) = watermark {
        check_time_column(&schema, column, "watermark").map_err(|e| at.error("watermark", e))?;
    }
    Ok((schema, None))
}

/// The index of `column`, which must hold numbers.
fn numeric_column(schema: &Schema, column: &str, kind: &'static str) -> Result<usize, JobError> {
    let index = schema
        .index_of(column)
        .map_err(|_| unknown_column(column, schema))?;
    let found = schema.field(index).data_type();
    if !(found.is_integer() || found.is_floating()) {
        return Err(JobError::NotNumeric {
            column: column.to_string(),
            found: found.clone(),
            kind,
        });
    }
    Ok(index)
}

/// A `standardize`'s fit: the fitted operator's output has the columns,
/// as numbers; without a fit, the artifact exists and has them.
fn check_fit(spec: &JobSpec, schemas: &[SchemaRef], index: usize) -> Result<(), JobError> {
    let op = &spec.operators[index];
    let OperatorKind::Standardize {
        columns,
        stats,
        fit,
    } = &op.kind
    else {
        return Ok(());
    };
    let at = At {
        file: &spec.file,
        op,
        data_file: None,
    };
    match fit {
        super::FitSource::Input => Ok(()),
        super::FitSource::Operator(target) => {
            let target_op = &spec.operators[*target];
            if target_op.kind.is_sink() {
                return Err(at.error(
                    "fit",
                    JobError::SinkAsInput {
                        input: target_op.name.clone(),
                    },
                ));
            }
            for column in columns {
                numeric_column(&schemas[*target], column, "standardize")
                    .map_err(|e| at.error("fit", e))?;
            }
            Ok(())
        }
        super::FitSource::None => {
            let path = stats.clone();
            let artifact = super::stats::StatsArtifact::read(&path)
                .map_err(|e| at.error("stats", e.into()))?;
            artifact
                .columns(&path, columns)
                .map_err(|e| at.error("stats", e.into()))?;
            Ok(())
        }
    }
}

fn check_time_column(schema: &Schema, column: &str, role: &'static str) -> Result<(), JobError> {
    let field = schema
        .field_with_name(column)
        .map_err(|_| unknown_column(column, schema))?;
    if field.data_type() != &DataType::Int64 {
        return Err(JobError::TimeColumnType {
            role,
            column: column.to_string(),
            found: field.data_type().clone(),
        });
    }
    Ok(())
}

/// The input schema with the filled columns no longer nullable; every
/// column must exist and hold the value's type (an integer also fills a
/// Float64 column).
fn fill_null_schema(
    at: &At<'_>,
    schema: &Schema,
    columns: &[String],
    value: &super::ScalarValue,
) -> Result<SchemaRef, JobError> {
    use super::ScalarValue;
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for (i, column) in columns.iter().enumerate() {
        let index = schema
            .index_of(column)
            .map_err(|_| at.item_error("columns", i, unknown_column(column, schema)))?;
        let found = schema.field(index).data_type();
        let fits = matches!(
            (found, value),
            (DataType::Int64, ScalarValue::Int64(_))
                | (
                    DataType::Float64,
                    ScalarValue::Int64(_) | ScalarValue::Float64(_)
                )
                | (DataType::Utf8, ScalarValue::Utf8(_))
                | (DataType::Boolean, ScalarValue::Boolean(_))
        );
        if !fits {
            let error = JobError::InvalidValue {
                key: "value".to_string(),
                value: value.to_string(),
                expected: format!("a value of column '{column}''s type {found}"),
            };
            return Err(at.error("value", error));
        }
        fields[index] = fields[index].clone().with_nullable(false);
    }
    Ok(Arc::new(Schema::new(fields)))
}

fn key_indices(at: &At<'_>, schema: &Schema, keys: &[String]) -> Result<Vec<usize>, JobError> {
    let mut indices = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let index = schema
            .index_of(key)
            .map_err(|_| at.item_error("keys", i, unknown_column(key, schema)))?;
        let found = schema.field(index).data_type();
        if !is_groupable(found) {
            let error = JobError::KeyType {
                column: key.clone(),
                found: found.clone(),
            };
            return Err(at.item_error("keys", i, error));
        }
        if indices.contains(&index) {
            let error = JobError::InvalidValue {
                key: "keys".to_string(),
                value: format!("'{key}'"),
                expected: "distinct key columns".to_string(),
            };
            return Err(at.item_error("keys", i, error));
        }
        indices.push(index);
    }
    Ok(indices)
}

/// Whether rows can be grouped by a column of type `t` (what the keyed runtime hashes).
fn is_groupable(t: &DataType) -> bool {
    t.is_integer()
        || t.is_floating()
        || matches!(
            t,
            DataType::Boolean
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Date32
                | DataType::Date64
                | DataType::Timestamp(_, _)
        )
}

/// [`aggregate_output_schema`], with errors located at the offending aggregate.
fn aggregate_schema(
    at: &At<'_>,
    schema: &Schema,
    keys: &[usize],
    aggs: &[AggSpec],
    window: bool,
) -> Result<SchemaRef, JobError> {
    for (i, agg) in aggs.iter().enumerate() {
        agg_field(schema, agg).map_err(|e| at.item_error("aggs", i, e))?;
    }
    aggregate_output_schema(schema, keys, aggs, window).map_err(|e| at.error("aggs", e))
}

/// The output of an aggregate or window over `input` grouped by the `keys`
/// columns: the keys, then `window_start`/`window_end` (Int64 ms) for windows,
/// then one column per aggregate: count → Int64, sum → Int64 or Float64,
/// min/max → the input type, avg → Float64.
pub fn aggregate_output_schema(
    input: &Schema,
    keys: &[usize],
    aggs: &[AggSpec],
    window: bool,
) -> Result<SchemaRef, JobError> {
    let mut fields: Vec<Field> = Vec::with_capacity(keys.len() + 2 + aggs.len());
    for &key in keys {
        assert!(key < input.fields().len(), "key index {key} out of range");
        fields.push(input.field(key).clone());
    }
    if window {
        fields.push(Field::new("window_start", DataType::Int64, false));
        fields.push(Field::new("window_end", DataType::Int64, false));
    }
    for agg in aggs {
        fields.push(agg_field(input, agg)?);
    }
    for (i, field) in fields.iter().enumerate() {
        if fields[..i].iter().any(|f| f.name() == field.name()) {
            return Err(JobError::DuplicateColumn {
                name: field.name().clone(),
            });
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

fn agg_field(input: &Schema, agg: &AggSpec) -> Result<Field, JobError> {
    let Some(column) = &agg.column else {
        return Ok(Field::new(&agg.output, DataType::Int64, false));
    };
    let source = input
        .field_with_name(column)
        .map_err(|_| unknown_column(column, input))?;
    let found = source.data_type();
    let numeric = found.is_integer() || found.is_floating();
    let (data_type, nullable) = match agg.func {
        AggFunc::Count => (Some(DataType::Int64), false),
        AggFunc::Sum if found.is_integer() => (Some(DataType::Int64), true),
        AggFunc::Sum if found.is_floating() => (Some(DataType::Float64), true),
        AggFunc::Avg if numeric => (Some(DataType::Float64), true),
        AggFunc::Min | AggFunc::Max if numeric => (Some(found.clone()), true),
        _ => (None, true),
    };
    let Some(data_type) = data_type else {
        // min/max over strings need variable-length accumulators, which the
        // paged hash table does not have yet.
        let needs = "numeric";
        return Err(JobError::AggregateType {
            func: agg.func,
            column: column.clone(),
            needs,
            found: found.clone(),
        });
    };
    Ok(Field::new(&agg.output, data_type, nullable))
}

fn unknown_column(column: &str, schema: &Schema) -> JobError {
    JobError::UnknownColumn {
        column: column.to_string(),
        available: schema.fields().iter().map(|f| f.name().clone()).collect(),
    }
}
