//! Schemas and checks of `bucketize`, `one_hot` and `join` (issue 17).
//!
//! Each error is located at the line of the key it concerns. A `join`'s
//! dimension table is a data file: its schema is read here (the CSV header
//! and first rows, or the Parquet footer) unless the job file declares
//! it, and an unknown table column is reported without listing the
//! table's columns, as for the sources.

use std::path::Path;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::{
    At, infer_csv_schema, is_groupable, read_parquet_schema, source_files, unknown_column,
};
use crate::job::JobError;
use crate::job::spec::{
    BucketizeSpec, Categories, JoinHow, JoinSpec, OneHotSpec, OperatorKind, OperatorSpec,
    TableFormat, UnknownCategory,
};

/// Reads a `join`'s table schema from its file (CSV: the header and first
/// rows; Parquet: the footer), unless the job file declared it; either
/// way a missing table is an error at the `table` key.
pub(super) fn resolve_table_schema(file: &Path, op: &mut OperatorSpec) -> Result<(), JobError> {
    let OperatorKind::Join(join) = &op.kind else {
        return Ok(());
    };
    let at = At {
        file,
        op,
        data_file: None,
    };
    let table = &join.table;
    let read = match table.format {
        TableFormat::Csv if !table.schema.fields().is_empty() => {
            source_files(&table.path, "csv").map(|_| Arc::clone(&table.schema))
        }
        TableFormat::Csv => infer_csv_schema(&table.path, true),
        TableFormat::Parquet => read_parquet_schema(&table.path),
    };
    let schema = read.map_err(|e| at.error("table", e))?;
    if let OperatorKind::Join(join) = &mut op.kind {
        join.table.schema = schema;
    }
    Ok(())
}

/// The input with the Int64 bucket column appended, or in place of the
/// bucketized column when `output` names it.
pub(super) fn bucketize_schema(
    at: &At<'_>,
    schema: &Schema,
    spec: &BucketizeSpec,
) -> Result<SchemaRef, JobError> {
    let index = schema
        .index_of(&spec.column)
        .map_err(|_| at.error("column", unknown_column(&spec.column, schema)))?;
    let field = schema.field(index);
    if !matches!(field.data_type(), DataType::Int64 | DataType::Float64) {
        let error = JobError::FeatureColumnType {
            role: "bucketize",
            column: spec.column.clone(),
            expected: "Int64 or Float64",
            found: field.data_type().clone(),
        };
        return Err(at.error("column", error));
    }
    let bucket = Field::new(&spec.output, DataType::Int64, field.is_nullable());
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    if spec.output == spec.column {
        fields[index] = bucket;
    } else if schema.index_of(&spec.output).is_ok() {
        let error = JobError::DuplicateColumn {
            name: spec.output.clone(),
        };
        return Err(at.error("output", error));
    } else {
        fields.push(bucket);
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// The input (less the source column when `drop`) with one non-nullable
/// Int8 column per category, then `<prefix>_other` when unknown values
/// get a column.
pub(super) fn one_hot_schema(
    at: &At<'_>,
    schema: &Schema,
    spec: &OneHotSpec,
) -> Result<SchemaRef, JobError> {
    let index = schema
        .index_of(&spec.column)
        .map_err(|_| at.error("column", unknown_column(&spec.column, schema)))?;
    let found = schema.field(index).data_type();
    let fits = match (found, &spec.categories) {
        (DataType::Utf8, Categories::Utf8(_)) | (DataType::Int64, Categories::Int64(_)) => true,
        (DataType::Utf8 | DataType::Int64, _) => false,
        _ => {
            let error = JobError::FeatureColumnType {
                role: "one_hot",
                column: spec.column.clone(),
                expected: "Utf8 or Int64",
                found: found.clone(),
            };
            return Err(at.error("column", error));
        }
    };
    if !fits {
        let (value, wanted) = match &spec.categories {
            Categories::Utf8(_) => ("strings", "integers"),
            Categories::Int64(_) => ("integers", "strings"),
        };
        let error = JobError::InvalidValue {
            key: "categories".into(),
            value: value.into(),
            expected: format!("{wanted}, values of column '{}' ({found})", spec.column),
        };
        return Err(at.error("categories", error));
    }
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| !(spec.drop && *i == index))
        .map(|(_, f)| f.as_ref().clone())
        .collect();
    for (i, name) in spec.output_names().into_iter().enumerate() {
        if fields.iter().any(|f| f.name() == &name) {
            let error = JobError::DuplicateColumn { name };
            return Err(if i < spec.categories.len() {
                at.item_error("categories", i, error)
            } else {
                at.error("unknown", error)
            });
        }
        fields.push(Field::new(name, DataType::Int8, false));
    }
    debug_assert!(spec.unknown != UnknownCategory::Column || fields.len() > spec.categories.len());
    Ok(Arc::new(Schema::new(fields)))
}

/// The stream's columns, then the added table columns (named with the
/// prefix; nullable in a left join). Keys must exist on both sides with
/// the same type; added columns must exist in the table, not be keys and
/// not clash with the stream's columns.
pub(super) fn join_schema(
    at: &At<'_>,
    schema: &Schema,
    spec: &JoinSpec,
) -> Result<SchemaRef, JobError> {
    let table = &spec.table;
    let table_schema = table.schema.as_ref();
    // Keys given as `on` alone are looked up under that key in the table.
    let table_key = if at.op.lines.key("table_on").is_some() {
        "table_on"
    } else {
        "on"
    };
    if spec.table_on.len() != spec.on.len() {
        let error = JobError::InvalidValue {
            key: "table_on".into(),
            value: format!("{} column(s)", spec.table_on.len()),
            expected: format!("as many columns as `on` ({})", spec.on.len()),
        };
        return Err(at.error("table_on", error));
    }
    let unknown_table_column = |key: &str, column: &str| JobError::UnknownDataColumn {
        column: column.to_string(),
        key: key.to_string(),
        data_file: table.path.clone(),
    };
    for (i, (column, table_column)) in spec.on.iter().zip(&spec.table_on).enumerate() {
        let index = schema
            .index_of(column)
            .map_err(|_| at.item_error("on", i, unknown_column(column, schema)))?;
        if spec.on[..i].contains(column) {
            let error = JobError::InvalidValue {
                key: "on".into(),
                value: format!("'{column}'"),
                expected: "distinct key columns".into(),
            };
            return Err(at.item_error("on", i, error));
        }
        let found = schema.field(index).data_type();
        if !is_groupable(found) {
            let error = JobError::KeyType {
                column: column.clone(),
                found: found.clone(),
            };
            return Err(at.item_error("on", i, error));
        }
        let table_field = table_schema.field_with_name(table_column).map_err(|_| {
            at.item_error(table_key, i, unknown_table_column(table_key, table_column))
        })?;
        if table_field.data_type() != found {
            let error = JobError::JoinKeyType {
                column: column.clone(),
                found: found.clone(),
                table_column: table_column.clone(),
                table_found: table_field.data_type().clone(),
            };
            return Err(at.item_error(table_key, i, error));
        }
    }
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let added = spec.added_columns();
    for (i, column) in added.iter().enumerate() {
        let field = table_schema
            .field_with_name(column)
            .map_err(|_| at.item_error("columns", i, unknown_table_column("columns", column)))?;
        if spec.table_on.contains(column) || added[..i].contains(column) {
            let error = JobError::InvalidValue {
                key: "columns".into(),
                value: format!("'{column}'"),
                expected: "distinct non-key columns of the table (the stream's `on` columns \
                           hold the keys)"
                    .into(),
            };
            return Err(at.item_error("columns", i, error));
        }
        let name = format!("{}{column}", spec.prefix);
        if fields.iter().any(|f| f.name() == &name) {
            let error = JobError::JoinColumnClash { column: name };
            return Err(match (spec.columns.is_some(), at.op.lines.key("prefix")) {
                (_, Some(_)) => at.error("prefix", error),
                (true, None) => at.item_error("columns", i, error),
                (false, None) => at.error("table", error),
            });
        }
        let nullable = spec.how == JoinHow::Left || field.is_nullable();
        fields.push(Field::new(name, field.data_type().clone(), nullable));
    }
    Ok(Arc::new(Schema::new(fields)))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::job::{LogicalPlan, parse_job, plan};

    fn load(dir: &Path, operators: &str) -> Result<LogicalPlan, JobError> {
        let text = format!(
            "[job]\nname = \"t\"\n\n[[operator]]\ntype = \"datagen\"\nrows = 10\n\
             columns = [\"key\", \"value\", \"price\"]\n\n{operators}\n\
             [[operator]]\ntype = \"blackhole\"\n"
        );
        plan(parse_job(&text, &dir.join("job.toml"))?)
    }

    fn fields(plan: &LogicalPlan, op: usize) -> Vec<(String, DataType, bool)> {
        plan.schemas[op]
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
            .collect()
    }

    fn field(name: &str, data_type: DataType, nullable: bool) -> (String, DataType, bool) {
        (name.to_string(), data_type, nullable)
    }

    fn dimension_csv(dir: &Path) -> PathBuf {
        let path = dir.join("users.csv");
        std::fs::write(&path, "id,segment,score\n1,a,0.5\n2,b,1.5\n3,c,2.5\n").unwrap();
        path
    }

    #[test]
    fn bucketize_appends_an_int64_column_or_replaces_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let appended = load(
            dir.path(),
            "[[operator]]\ntype = \"bucketize\"\ncolumn = \"price\"\nboundaries = [0, 10.5, 100]\n",
        )
        .unwrap();
        let schema = fields(&appended, 1);
        assert_eq!(schema[3], field("price_bucket", DataType::Int64, false));
        assert_eq!(schema.len(), 4);
        let replaced = load(
            dir.path(),
            "[[operator]]\ntype = \"bucketize\"\ncolumn = \"value\"\nboundaries = [1]\n\
             output = \"value\"\n",
        )
        .unwrap();
        assert_eq!(
            fields(&replaced, 1)[1],
            field("value", DataType::Int64, false)
        );
        assert_eq!(replaced.schemas[1].fields().len(), 3);
    }

    #[test]
    fn one_hot_appends_an_int8_column_per_category_and_drops_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let plan = load(
            dir.path(),
            "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = [1, 2, -3]\n\
             unknown = \"column\"\nprefix = \"k\"\ndrop = true\n",
        )
        .unwrap();
        let names: Vec<String> = fields(&plan, 1).into_iter().map(|f| f.0).collect();
        assert_eq!(names, ["value", "price", "k_1", "k_2", "k_-3", "k_other"]);
        assert_eq!(fields(&plan, 1)[2], field("k_1", DataType::Int8, false));
    }

    #[test]
    fn join_adds_the_table_columns_with_a_prefix_nullable_in_a_left_join() {
        let dir = tempfile::tempdir().unwrap();
        let table = dimension_csv(dir.path());
        let inner = load(
            dir.path(),
            &format!(
                "[[operator]]\ntype = \"join\"\ntable = \"{}\"\non = [\"key\"]\n\
                 table_on = [\"id\"]\n",
                table.display()
            ),
        )
        .unwrap();
        let schema = fields(&inner, 1);
        assert_eq!(schema.len(), 5);
        assert_eq!(schema[3], field("segment", DataType::Utf8, true));
        assert_eq!(schema[4], field("score", DataType::Float64, true));
        let left = load(
            dir.path(),
            &format!(
                "[[operator]]\ntype = \"join\"\ntable = \"{}\"\non = [\"key\"]\n\
                 table_on = [\"id\"]\nhow = \"left\"\ncolumns = [\"score\"]\nprefix = \"u_\"\n\
                 schema = {{ id = \"int64\", segment = \"utf8\", score = \"float64\" }}\n",
                table.display()
            ),
        )
        .unwrap();
        let schema = fields(&left, 1);
        assert_eq!(schema.len(), 4);
        assert_eq!(schema[3], field("u_score", DataType::Float64, true));
        let OperatorKind::Join(join) = &left.spec.operators[1].kind else {
            panic!("not a join");
        };
        assert_eq!(join.how, JoinHow::Left);
    }

    #[test]
    fn join_reads_a_parquet_table_schema_from_its_footer() {
        use arrow_array::{Int64Array, RecordBatch, StringArray};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dim.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("label", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["x", "y"])),
            ],
        )
        .unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let plan = load(
            dir.path(),
            &format!(
                "[[operator]]\ntype = \"join\"\ntable = \"{}\"\non = [\"key\"]\n",
                path.display()
            ),
        )
        .unwrap();
        assert_eq!(
            fields(&plan, 1)[3],
            field("label", DataType::Utf8, false),
            "an inner join keeps the table's nullability"
        );
    }

    /// Each bad operator, the marker of the line its error names, and
    /// fragments the message holds.
    fn error_cases(table: &str) -> Vec<(String, &'static str, Vec<&'static str>)> {
        let join = |tail: &str| {
            format!("[[operator]]\ntype = \"join\"\ntable = \"{table}\"\non = [\"key\"]\n{tail}")
        };
        vec![
            (
                "[[operator]]\ntype = \"bucketize\"\ncolumn = \"prise\"\nboundaries = [1]\n".into(),
                "column = \"prise\"",
                vec!["'prise' not found", "price"],
            ),
            (
                "[[operator]]\ntype = \"bucketize\"\ncolumn = \"price\"\nboundaries = [1, 5,\n 3]\n"
                    .into(),
                " 3]",
                vec!["boundaries[2]", "greater than the one before it (5)"],
            ),
            (
                "[[operator]]\ntype = \"bucketize\"\ncolumn = \"price\"\nboundaries = [1, 1]\n"
                    .into(),
                "boundaries",
                vec!["boundaries[1]"],
            ),
            (
                "[[operator]]\ntype = \"bucketize\"\ncolumn = \"price\"\nboundaries = [1, nan]\n"
                    .into(),
                "boundaries",
                vec!["boundaries[1]", "finite numbers"],
            ),
            (
                "[[operator]]\ntype = \"bucketize\"\ncolumn = \"price\"\nboundaries = []\n".into(),
                "boundaries",
                vec!["at least one boundary"],
            ),
            (
                "[[operator]]\ntype = \"bucketize\"\ncolumn = \"price\"\nboundaries = [1]\n\
                 output = \"key\"\n"
                    .into(),
                "output",
                vec!["'key' is defined twice"],
            ),
            (
                "[[operator]]\ntype = \"cast\"\ncolumns = { value = \"utf8\" }\n\n\
                 [[operator]]\ntype = \"bucketize\"\ncolumn = \"value\"\nboundaries = [1]\n"
                    .into(),
                "column = \"value\"",
                vec!["bucketize column 'value' must be Int64 or Float64, found Utf8"],
            ),
            (
                "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = []\n".into(),
                "categories",
                vec!["at least one category"],
            ),
            (
                "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = [\"a\"]\n".into(),
                "categories",
                vec!["integers, values of column 'key' (Int64)"],
            ),
            (
                "[[operator]]\ntype = \"one_hot\"\ncolumn = \"price\"\ncategories = [1]\n".into(),
                "column = \"price\"",
                vec!["one_hot column 'price' must be Utf8 or Int64, found Float64"],
            ),
            (
                "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = [1, 1]\n".into(),
                "categories",
                vec!["categories[1]", "distinct"],
            ),
            (
                format!(
                    "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = [{}]\n",
                    (0..1025).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
                ),
                "categories",
                vec!["1025 categories", "at most 1024"],
            ),
            (
                "[[operator]]\ntype = \"one_hot\"\ncolumn = \"key\"\ncategories = [1]\n\
                 unknown = \"skip\"\n"
                    .into(),
                "unknown",
                vec!["\"skip\"", "\"ignore\""],
            ),
            (
                "[[operator]]\ntype = \"join\"\ntable = \"/nonexistent/dim.csv\"\non = [\"key\"]\n"
                    .into(),
                "table",
                vec!["/nonexistent/dim.csv"],
            ),
            (
                join("table_on = [\"segment\"]\n"),
                "table_on",
                vec!["join key 'key' is Int64", "'segment' is Utf8"],
            ),
            (
                "[[operator]]\ntype = \"join\"\ntable = \"dim.txt\"\non = [\"key\"]\n".into(),
                "table",
                vec!["\"dim.txt\"", "a `format` key"],
            ),
            (
                join("how = \"outer\"\n"),
                "how",
                vec!["\"outer\"", "\"inner\"", "\"left\""],
            ),
            (
                join("table_on = [\"idd\"]\n"),
                "table_on",
                vec!["'idd'", "is not a column of", "users.csv"],
            ),
            (
                join("table_on = [\"id\"]\ncolumns = [\"segment\", \"nope\"]\n"),
                "columns = [\"segment\"",
                vec!["'nope'", "users.csv"],
            ),
            (
                join("table_on = [\"id\"]\ncolumns = [\"id\"]\n"),
                "columns = [\"id\"]",
                vec!["non-key columns"],
            ),
            (
                join("table_on = [\"id\", \"score\"]\n"),
                "table_on",
                vec!["as many columns as `on` (1)"],
            ),
            (
                "[[operator]]\ntype = \"project\"\ncolumns = [\"key\", \"price as score\"]\n\n"
                    .to_string()
                    + &join("table_on = [\"id\"]\n"),
                "table = ",
                vec!["'score'", "set `prefix`"],
            ),
        ]
    }

    #[test]
    fn feature_operator_errors_name_the_key_and_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let table = dimension_csv(dir.path()).display().to_string();
        for (operators, marker, fragments) in error_cases(&table) {
            let text = format!(
                "[job]\nname = \"t\"\n\n[[operator]]\ntype = \"datagen\"\nrows = 10\n\
                 columns = [\"key\", \"value\", \"price\"]\n\n{operators}\n\
                 [[operator]]\ntype = \"blackhole\"\n"
            );
            let file = dir.path().join("job.toml");
            let message = match parse_job(&text, &file).and_then(plan) {
                Ok(_) => panic!("should fail: {operators}"),
                Err(e) => e.to_string(),
            };
            let offset = text.find(marker).expect("marker in the job");
            let line = text[..offset].matches('\n').count() + 1;
            assert!(
                message.starts_with(&format!("{}:{line}: ", file.display())),
                "line {line} expected: {message}"
            );
            for fragment in &fragments {
                assert!(message.contains(fragment), "{fragment:?} in: {message}");
            }
        }
    }
}
