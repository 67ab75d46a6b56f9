//! Job files end to end through the public API: error messages (file, line,
//! hint), schema propagation, and schemas read from CSV and Parquet files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};

use super::*;

const FILE: &str = "examples/x.toml";

/// The job of the module's documentation, with the window reading the key_by.
const FULL_JOB: &str = r#"[job]
name = "keyed-aggregation"
parallelism = 4

[[operator]]
name = "gen"
type = "datagen"
rows = 50_000_000
keys = 100_000
seed = 42
rows_per_second = 1_000_000
batch_size = 8192
columns = ["key", "value", "price", "ts"]
ts_step_ms = 1
ts_disorder_ms = 5
parallelism = 2

[[operator]]
name = "f"
type = "filter"
predicate = "value >= 10 and key % 2 = 0"
input = "gen"

[[operator]]
name = "p"
type = "project"
columns = ["key", "value * 2 + 1 as v2", "price", "ts"]

[[operator]]
name = "by_key"
type = "key_by"
keys = ["key"]

[[operator]]
name = "agg"
type = "aggregate"
aggs = ["count(*) as cnt", "sum(v2) as total", "min(v2)", "max(v2)", "avg(price) as avg_price"]

[[operator]]
name = "win"
type = "window"
input = "by_key"
time_column = "ts"
size = "10s"
aggs = ["count(*) as cnt", "sum(v2) as total"]

[[operator]]
type = "csv_sink"
path = "out/result"

[[operator]]
name = "all"
type = "aggregate"
input = "p"
aggs = ["count(*)", "max(price)"]

[[operator]]
type = "print"
limit = 10
"#;

fn field_list(schema: &Schema) -> Vec<(String, DataType, bool)> {
    schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect()
}

fn col(name: &str, data_type: DataType, nullable: bool) -> (String, DataType, bool) {
    (name.to_string(), data_type, nullable)
}

#[test]
fn full_job_propagates_schemas_and_keys() {
    let spec = parse_job(FULL_JOB, Path::new(FILE)).expect("valid job");
    assert_eq!(spec.name, "keyed-aggregation");
    assert_eq!(spec.default_parallelism, Some(4));
    let names: Vec<&str> = spec.operators.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "gen",
            "f",
            "p",
            "by_key",
            "agg",
            "win",
            "csv_sink-6",
            "all",
            "print-8"
        ]
    );
    let inputs: Vec<Option<usize>> = spec.operators.iter().map(|o| o.input).collect();
    assert_eq!(
        inputs,
        [
            None,
            Some(0),
            Some(1),
            Some(2),
            Some(3),
            Some(3),
            Some(5),
            Some(2),
            Some(7)
        ]
    );
    assert_eq!(spec.operators[0].line, 5);
    assert_eq!(spec.operators[0].parallelism, Some(2));
    let OperatorKind::Datagen(datagen) = &spec.operators[0].kind else {
        panic!("datagen expected")
    };
    assert_eq!(
        (
            datagen.rows,
            datagen.keys,
            datagen.seed,
            datagen.rows_per_second
        ),
        (50_000_000, 100_000, 42, Some(1_000_000))
    );
    let watermark = WatermarkSpec {
        column: "ts".to_string(),
        delay_ms: 5,
    };
    assert_eq!(datagen.watermark.as_ref(), Some(&watermark));
    let OperatorKind::Window { size_ms, .. } = &spec.operators[5].kind else {
        panic!("window expected")
    };
    assert_eq!(*size_ms, 10_000);

    let plan = plan(spec).expect("plannable job");
    let i64_ = DataType::Int64;
    let f64_ = DataType::Float64;
    let gen_schema = vec![
        col("key", i64_.clone(), false),
        col("value", i64_.clone(), false),
        col("price", f64_.clone(), false),
        col("ts", i64_.clone(), false),
    ];
    assert_eq!(field_list(&plan.schemas[0]), gen_schema);
    assert_eq!(field_list(&plan.schemas[1]), gen_schema);
    let projected = vec![
        col("key", i64_.clone(), false),
        col("v2", i64_.clone(), false),
        col("price", f64_.clone(), false),
        col("ts", i64_.clone(), false),
    ];
    assert_eq!(field_list(&plan.schemas[2]), projected);
    assert_eq!(field_list(&plan.schemas[3]), projected);
    assert_eq!(
        field_list(&plan.schemas[4]),
        vec![
            col("key", i64_.clone(), false),
            col("cnt", i64_.clone(), false),
            col("total", i64_.clone(), true),
            col("min_v2", i64_.clone(), true),
            col("max_v2", i64_.clone(), true),
            col("avg_price", f64_.clone(), true),
        ]
    );
    assert_eq!(
        field_list(&plan.schemas[5]),
        vec![
            col("key", i64_.clone(), false),
            col("window_start", i64_.clone(), false),
            col("window_end", i64_.clone(), false),
            col("cnt", i64_.clone(), false),
            col("total", i64_.clone(), true),
        ]
    );
    assert!(plan.schemas[6].fields().is_empty());
    assert_eq!(
        field_list(&plan.schemas[7]),
        vec![col("count", i64_, false), col("max_price", f64_, true)]
    );
    let keyed: Vec<bool> = plan.keyed.iter().map(Option::is_some).collect();
    assert_eq!(
        keyed,
        [false, false, false, true, false, false, false, false, false]
    );
    assert_eq!(plan.keyed[3], Some(vec![0]));
}

/// Each case: operators appended to a valid `[job]` header, a marker on the
/// line the error must name, and fragments the message must contain.
const ERROR_CASES: &[(&str, &str, &[&str])] = &[
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"key_by\"\nkeys = [\"key\"]\n[[operator]]\nname = \"agg\"\ntype = \"aggregate\"\naggs = [\n  \"count(*)\",\n  \"median(value)\",\n]\n",
        "median",
        &[
            "operator 'agg': unknown aggregate function 'median' in \"median(value)\"",
            "expected one of count, sum, min, max, avg",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\nname = \"f\"\ntype = \"filter\"\npredicate = \"vlaue >= 10\"\n",
        "vlaue",
        &[
            "operator 'f':",
            "column 'vlaue' not found; input columns are key, value, price, ts",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"fliter\"\n",
        "fliter",
        &[
            "unknown operator type 'fliter'",
            "did you mean 'filter'?",
            "expected one of datagen, csv_source,",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"filter\"\npredicat = \"key > 1\"\n",
        "predicat =",
        &["unknown key 'predicat' for filter; did you mean 'predicate'?"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = \"many\"\n",
        "many",
        &["operator 'datagen-0': key 'rows' must be an integer, found string"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\nname = \"f\"\ntype = \"filter\"\npredicate = \"value > 'abc'\"\n",
        "abc",
        &["predicate \"value > 'abc'\"", "compares Int64 with Utf8"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"filter\"\npredicate = \"value >= \"\n",
        "predicate",
        &[
            "predicate \"value >= \"",
            "syntax error at column 10",
            "end of input",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"filter\"\npredicate = \"value + 1\"\n",
        "predicate",
        &["predicate \"value + 1\" must be Boolean, found Int64"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"filter\"\ninput = \"nope\"\npredicate = \"true\"\n",
        "nope",
        &["input 'nope' does not name an earlier operator; earlier operators are datagen-0"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"blackhole\"\n[[operator]]\ntype = \"print\"\ninput = \"blackhole-1\"\n",
        "input =",
        &["operator 'print-2': input 'blackhole-1' is a sink"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"window\"\ninput = \"datagen-0\"\ntime_column = \"ts\"\nsize = \"1 min\"\naggs = [\"count(*)\"]\n",
        "input =",
        &["a window needs a key_by input, but 'datagen-0' is a datagen"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"key_by\"\nkeys = [\"key\"]\n[[operator]]\ntype = \"window\"\ntime_column = \"price\"\nsize = \"1 min\"\naggs = [\"count(*)\"]\n",
        "time_column",
        &["time column 'price' must be Int64 (epoch milliseconds), found Float64"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"key_by\"\nkeys = [\"key\"]\n[[operator]]\ntype = \"window\"\ntime_column = \"ts\"\nsize = \"10 parsecs\"\naggs = [\"count(*)\"]\n",
        "parsecs",
        &["key 'size' has invalid value \"10 parsecs\"", "\"500ms\""],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"project\"\ncolumns = [\"key\", \"value * 2\"]\n",
        "value * 2",
        &["column expression \"value * 2\" needs a name", "as <name>"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"project\"\ncolumns = [\n  \"key\",\n  \"key + 1 as key\",\n]\n",
        "as key",
        &["output column 'key' is defined twice"],
    ),
    (
        "[[operator]]\nname = \"a\"\ntype = \"datagen\"\nrows = 10\n[[operator]]\nname = \"a\"\ntype = \"blackhole\"\n",
        "name = \"a\"\ntype = \"blackhole",
        &["operator name 'a' is already used on line"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nkeys = 3\n",
        "[[operator]]",
        &["operator 'datagen-0': missing required key 'rows' (an integer)"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\nkeys = 0\n",
        "keys = 0",
        &["key 'keys' has invalid value 0; expected an integer between 1 and"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"datagen\"\nrows = 10\ninput = \"datagen-0\"\n",
        "input =",
        &["a datagen source takes no input, but input 'datagen-0' is given"],
    ),
    (
        "[[operator]]\ntype = \"filter\"\npredicate = \"true\"\n",
        "[[operator]]",
        &["a filter operator needs an input, but no operator precedes it"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"key_by\"\nkeys = [\"key\", \"kee\"]\n",
        "kee",
        &["column 'kee' not found; input columns are key, value, price, ts"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"aggregate\"\naggs = [\"sum(*)\"]\n",
        "sum(*)",
        &["only count accepts *"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"aggregate\"\naggs = [\"sum(valu)\"]\n",
        "valu",
        &["column 'valu' not found"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\ncolumns = [\"key\", \"vlaue\"]\n",
        "vlaue",
        &[
            "key 'columns' has invalid value 'vlaue'; expected distinct names among key, value, price, ts",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\ncolumns = [\"key\", 3]\n",
        "columns",
        &["key 'columns[1]' must be a string, found integer"],
    ),
    (
        "[[operator]]\ntype = \"csv_source\"\npath = \"/nonexistent/strata-job-test.csv\"\n",
        "nonexistent",
        &["/nonexistent/strata-job-test.csv: ", "No such file"],
    ),
    (
        "[[operator]]\ntype = \"csv_source\"\npath = \"x.csv\"\nschema = { id = \"int64\", name = \"utf8\" }\n[[operator]]\ntype = \"aggregate\"\naggs = [\"sum(name)\"]\n",
        "sum(name)",
        &["sum(name) needs a numeric column, but 'name' is Utf8"],
    ),
    (
        "[[operator]]\ntype = \"csv_source\"\npath = \"x.csv\"\nschema = { id = \"int32\" }\n",
        "int32",
        &[
            "key 'schema.id' has invalid value \"int32\"",
            "timestamp_ms",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"project\"\ncolumns = [\"key\", \"null as nothing\"]\n[[operator]]\ntype = \"key_by\"\nkeys = [\"nothing\"]\n",
        "[\"nothing\"]",
        &["key column 'nothing' has type Null; keys must be"],
    ),
    (
        "[operator]\ntype = \"datagen\"\n",
        "[operator]",
        &["key 'operator' must be an array, found table"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"parquet_sink\"\npath = \"o\"\nrow_group_rows = 0\n",
        "row_group_rows",
        &["key 'row_group_rows' has invalid value 0; expected an integer between 1 and"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"parquet_sink\"\npath = \"o\"\ntarget_file_bytes = \"128 parsecs\"\n",
        "parsecs",
        &[
            "key 'target_file_bytes' has invalid value \"128 parsecs\"",
            "\"128mb\"",
        ],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"arrow_ipc_sink\"\npath = \"o\"\ntarget_file_bytes = 0\n",
        "target_file_bytes",
        &["key 'target_file_bytes' has invalid value 0; expected a size of at least 1 byte"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"arrow_ipc_sink\"\npath = \"o\"\ncompression = \"zstd\"\n",
        "zstd",
        &["key 'compression' has invalid value 'zstd'; expected \"lz4\" or \"none\""],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"arrow_ipc_sink\"\npath = \"o\"\nformat = \"feather\"\n",
        "feather",
        &[
            "key 'format' has invalid value 'feather'",
            "\"file\"",
            "\"stream\"",
        ],
    ),
    (
        "[[operator]]\ntype = \"arrow_ipc_source\"\npath = \"/nonexistent/strata-job-test.arrow\"\nformat = \"streams\"\n",
        "streams",
        &["key 'format' has invalid value 'streams'"],
    ),
    (
        "[[operator]]\ntype = \"arrow_ipc_source\"\npath = \"/nonexistent/strata-job-test.arrow\"\n",
        "nonexistent",
        &["/nonexistent/strata-job-test.arrow: ", "No such file"],
    ),
    (
        "[[operator]]\ntype = \"datagen\"\nrows = 10\n[[operator]]\ntype = \"csv_sink\"\npath = \"o\"\nrow_group_rows = 10\n",
        "row_group_rows",
        &["unknown key 'row_group_rows' for csv_sink"],
    ),
];

fn line_of(text: &str, marker: &str) -> usize {
    let offset = text
        .find(marker)
        .unwrap_or_else(|| panic!("marker {marker:?} not in job"));
    text[..offset].matches('\n').count() + 1
}

fn load(text: &str) -> Result<LogicalPlan, JobError> {
    plan(parse_job(text, Path::new(FILE))?)
}

#[test]
fn sort_keys_parse_with_order_and_fan_in() {
    let text = "[job]\nname = \"t\"\n\n[[operator]]\ntype = \"datagen\"\nrows = 10\n\n\
                [[operator]]\ntype = \"sort\"\nkeys = [\"key\", \"value desc\", \"price ASC\"]\n\
                fan_in = 3\n\n[[operator]]\ntype = \"blackhole\"\n";
    let plan = load(text).expect("sort job");
    let OperatorKind::Sort { keys, fan_in } = &plan.spec.operators[1].kind else {
        panic!("not a sort: {:?}", plan.spec.operators[1].kind);
    };
    let keys: Vec<(&str, bool)> = keys
        .iter()
        .map(|k| (k.column.as_str(), k.descending))
        .collect();
    assert_eq!(keys, [("key", false), ("value", true), ("price", false)]);
    assert_eq!(*fan_in, 3);
    assert_eq!(
        plan.schemas[1], plan.schemas[0],
        "a sort keeps its input's schema"
    );
    let bad = text.replace("value desc", "value downwards");
    let error = load(&bad).expect_err("bad order").to_string();
    assert!(error.contains("\"column desc\""), "{error}");
    let unknown = text.replace("value desc", "valeu desc");
    let error = load(&unknown).expect_err("unknown column").to_string();
    assert!(error.contains("valeu"), "{error}");
}

#[test]
fn errors_name_the_file_the_line_and_a_hint() {
    for (operators, marker, fragments) in ERROR_CASES {
        let text = format!("[job]\nname = \"t\"\n\n{operators}");
        let message = match load(&text) {
            Ok(_) => panic!("job should fail: {marker}\n{text}"),
            Err(error) => error.to_string(),
        };
        let line = line_of(&text, marker);
        assert!(
            message.starts_with(&format!("{FILE}:{line}: ")),
            "line {line} expected: {message}"
        );
        for fragment in *fragments {
            assert!(
                message.contains(fragment),
                "missing {fragment:?} in: {message}"
            );
        }
    }
}

#[test]
fn watermark_column_must_exist_in_the_source() {
    let text = "[job]\nname = \"t\"\n[[operator]]\ntype = \"datagen\"\nrows = 1\ncolumns = [\"key\"]\nwatermark = { column = \"ts\" }\n";
    let message = load(text).expect_err("ts is not generated").to_string();
    assert!(
        message.contains("examples/x.toml:7: operator 'datagen-0': column 'ts' not found"),
        "{message}"
    );
}

#[test]
fn toml_syntax_errors_name_line_and_column() {
    let text = "[job]\nname = \"t\"\nrows = = 3\n";
    let message = parse_job(text, Path::new(FILE))
        .expect_err("bad TOML")
        .to_string();
    assert!(
        message.starts_with("examples/x.toml:3:8: TOML syntax error"),
        "{message}"
    );
}

#[test]
fn top_level_problems_are_reported() {
    let cases = [
        ("name = \"x\"\n", "unknown key 'name' for the job file"),
        (
            "[job]\nnmae = \"x\"\n",
            "[job]: unknown key 'nmae' for [job]; did you mean 'name'?",
        ),
        ("[jbo]\nname = \"x\"\n", "did you mean 'job'?"),
        ("[job]\nname = \"x\"\n", "the job has no operators"),
        (
            "[[operator]]\ntype = \"blackhole\"\n",
            "missing required key 'job'",
        ),
    ];
    for (text, fragment) in cases {
        let message = parse_job(text, Path::new(FILE))
            .expect_err(text)
            .to_string();
        assert!(
            message.contains(fragment),
            "missing {fragment:?} in: {message}"
        );
    }
}

#[test]
fn missing_job_file_names_the_path() {
    let message = load_job(Path::new("/nonexistent/strata-job.toml"))
        .expect_err("missing")
        .to_string();
    assert!(
        message.starts_with("/nonexistent/strata-job.toml: "),
        "{message}"
    );
}

fn temp_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

#[test]
fn csv_schema_is_inferred_from_header_and_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let csv = temp_file(
        dir.path(),
        "in.csv",
        "id,name,price,flag\n1,a,1.5,true\n2,b,2.5,false\n",
    );
    let job = format!(
        "[job]\nname = \"csv\"\n[[operator]]\ntype = \"csv_source\"\npath = {:?}\n[[operator]]\ntype = \"filter\"\npredicate = \"flag and price > 2\"\n[[operator]]\ntype = \"blackhole\"\n",
        csv.display().to_string()
    );
    let job_file = temp_file(dir.path(), "job.toml", &job);
    let plan = load_job(&job_file).expect("plannable");
    let expected = vec![
        col("id", DataType::Int64, true),
        col("name", DataType::Utf8, true),
        col("price", DataType::Float64, true),
        col("flag", DataType::Boolean, true),
    ];
    assert_eq!(field_list(&plan.schemas[0]), expected);
    let OperatorKind::CsvSource(source) = &plan.spec.operators[0].kind else {
        panic!("csv source expected")
    };
    assert_eq!(
        field_list(&source.schema),
        expected,
        "the spec carries the inferred schema"
    );
    assert!(source.has_header);
}

#[test]
fn csv_directory_uses_its_first_csv_file_and_declared_schemas_keep_file_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    temp_file(dir.path(), "b.csv", "x\nnot-a-number\n");
    temp_file(dir.path(), "a.csv", "x\n1\n");
    temp_file(dir.path(), "notes.txt", "ignored");
    let schema = infer_csv_schema(dir.path(), true).expect("inferable");
    assert_eq!(field_list(&schema), vec![col("x", DataType::Int64, true)]);
    let text = "[job]\nname = \"t\"\n[[operator]]\ntype = \"csv_source\"\npath = \"unread.csv\"\nschema = { z = \"int64\", a = \"timestamp_ms\" }\n";
    let plan = load(text).expect("declared schemas need no file");
    let names: Vec<&str> = plan.schemas[0]
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, ["z", "a"]);
    let empty = tempfile::tempdir().expect("temp dir");
    let message = infer_csv_schema(empty.path(), true)
        .expect_err("no files")
        .to_string();
    assert!(message.contains("no .csv files in directory"), "{message}");
}

/// Writes a two-row Parquet file (id, name, score) into `dir`; returns its
/// schema.
fn write_scores_parquet(dir: &Path) -> arrow_schema::SchemaRef {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2])),
        Arc::new(StringArray::from(vec![Some("a"), None])),
        Arc::new(Float64Array::from(vec![0.5, 1.5])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("valid batch");
    let file = std::fs::File::create(dir.join("part-0.parquet")).expect("create parquet file");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).expect("writer");
    writer.write(&batch).expect("write batch");
    writer.close().expect("close writer");
    schema
}

#[test]
fn parquet_schema_is_read_from_the_footer() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_scores_parquet(dir.path());
    let text = format!(
        "[job]\nname = \"pq\"\n[[operator]]\ntype = \"parquet_source\"\npath = {:?}\n[[operator]]\ntype = \"key_by\"\nkeys = [\"name\"]\n[[operator]]\ntype = \"aggregate\"\naggs = [\"avg(score) as mean\", \"count(name)\"]\n[[operator]]\ntype = \"parquet_sink\"\npath = \"out\"\n",
        dir.path().display().to_string()
    );
    let plan = load(&text).expect("plannable");
    // Projection pushdown: `id` is used by no operator, so it is not read.
    assert_eq!(
        field_list(&plan.schemas[0]),
        vec![
            col("name", DataType::Utf8, true),
            col("score", DataType::Float64, true),
        ]
    );
    let OperatorKind::ParquetSource(source) = &plan.spec.operators[0].kind else {
        panic!("operator 0 is the parquet source");
    };
    assert_eq!(source.columns, Some(vec!["name".into(), "score".into()]));
    assert_eq!(source.prune, None, "no filter follows the source");
    assert_eq!(plan.keyed[1], Some(vec![0]));
    assert_eq!(
        field_list(&plan.schemas[2]),
        vec![
            col("name", DataType::Utf8, true),
            col("mean", DataType::Float64, true),
            col("count_name", DataType::Int64, false),
        ]
    );
}

#[test]
fn parquet_pushdown_keeps_what_sinks_and_filters_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let schema = write_scores_parquet(dir.path());
    let source = |plan: &LogicalPlan| match &plan.spec.operators[0].kind {
        OperatorKind::ParquetSource(p) => p.clone(),
        _ => panic!("operator 0 is the parquet source"),
    };
    let path = dir.path().display().to_string();
    // A filter then a sink: the sink writes every column, nothing is pruned,
    // but the filter's predicate is pushed down.
    let text = format!(
        "[job]\nname = \"pq\"\n[[operator]]\ntype = \"parquet_source\"\npath = {path:?}\n[[operator]]\ntype = \"filter\"\npredicate = \"id > 1\"\n[[operator]]\ntype = \"print\"\n"
    );
    let plan = load(&text).expect("plannable");
    assert_eq!(source(&plan).columns, None);
    assert_eq!(
        source(&plan).prune,
        Some(Expr::parse("id > 1").expect("parse"))
    );
    assert_eq!(field_list(&plan.schemas[0]), field_list(&schema));
    // A filter, then a projection of one column: the filter's and the
    // projection's columns are read.
    let text = format!(
        "[job]\nname = \"pq\"\n[[operator]]\ntype = \"parquet_source\"\npath = {path:?}\n[[operator]]\ntype = \"filter\"\npredicate = \"id > 1\"\n[[operator]]\ntype = \"project\"\ncolumns = [\"score * 2 as s\"]\n[[operator]]\ntype = \"print\"\n"
    );
    let plan = load(&text).expect("plannable");
    assert_eq!(
        source(&plan).columns,
        Some(vec!["id".into(), "score".into()])
    );
}

#[test]
fn aggregate_output_schema_rejects_duplicates_and_types_sums() {
    let input = Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("small", DataType::Int32, false),
        Field::new("x", DataType::Float32, false),
    ]);
    let agg = |func, column: Option<&str>, output: &str| AggSpec {
        func,
        column: column.map(str::to_string),
        output: output.to_string(),
    };
    let aggs = [
        agg(AggFunc::Sum, Some("small"), "s"),
        agg(AggFunc::Sum, Some("x"), "t"),
        agg(AggFunc::Max, Some("x"), "m"),
    ];
    let schema = aggregate_output_schema(&input, &[0], &aggs, true).expect("valid");
    let types: Vec<DataType> = schema
        .fields()
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    assert_eq!(
        types,
        [
            DataType::Utf8,
            DataType::Int64,
            DataType::Int64,
            DataType::Int64,
            DataType::Float64,
            DataType::Float32
        ]
    );
    let duplicate = [agg(AggFunc::Count, None, "k")];
    let message = aggregate_output_schema(&input, &[0], &duplicate, false)
        .expect_err("duplicate")
        .to_string();
    assert_eq!(message, "output column 'k' is defined twice");
}

#[test]
fn datagen_schema_follows_the_requested_columns() {
    let schema = datagen_schema(&["ts".to_string(), "price".to_string()]);
    assert_eq!(
        field_list(&schema),
        vec![
            col("ts", DataType::Int64, false),
            col("price", DataType::Float64, false)
        ]
    );
}

#[test]
fn example_job_files_plan() {
    for name in [
        "keyed_aggregation.toml",
        "project_and_print.toml",
        "windowed_counts.toml",
        "external_sort.toml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("example");
        plan(parse_job(&text, &path).expect("parses")).expect("plans");
    }
}

/// Writes an Arrow IPC file of `batch` at `path` in `format`.
fn write_ipc(path: &Path, format: IpcFormat, batch: &RecordBatch) {
    let file = std::fs::File::create(path).expect("create ipc file");
    match format {
        IpcFormat::File => {
            let mut w =
                arrow_ipc::writer::FileWriter::try_new(file, &batch.schema()).expect("writer");
            w.write(batch).expect("write");
            w.finish().expect("finish");
        }
        IpcFormat::Stream => {
            let mut w =
                arrow_ipc::writer::StreamWriter::try_new(file, &batch.schema()).expect("writer");
            w.write(batch).expect("write");
            w.finish().expect("finish");
        }
    }
}

fn scores_batch() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2])),
        Arc::new(StringArray::from(vec![Some("a"), None])),
        Arc::new(Float64Array::from(vec![0.5, 1.5])),
    ];
    RecordBatch::try_new(schema, columns).expect("valid batch")
}

fn ipc_job(path: &Path, tail: &str) -> String {
    format!(
        "[job]\nname = \"ipc\"\n[[operator]]\ntype = \"arrow_ipc_source\"\npath = {:?}\n{tail}\n[[operator]]\ntype = \"key_by\"\nkeys = [\"name\"]\n[[operator]]\ntype = \"aggregate\"\naggs = [\"avg(score) as mean\"]\n[[operator]]\ntype = \"arrow_ipc_sink\"\npath = \"out\"\nformat = \"stream\"\ncompression = \"lz4\"\ntarget_file_bytes = \"64kb\"\n",
        path.display().to_string()
    )
}

#[test]
fn arrow_ipc_schema_is_read_from_files_of_either_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let batch = scores_batch();
    write_ipc(&dir.path().join("a.arrow"), IpcFormat::File, &batch);
    write_ipc(&dir.path().join("b.arrows"), IpcFormat::Stream, &batch);
    let plan = load(&ipc_job(dir.path(), "")).expect("plannable");
    // Projection pushdown: `id` is used by no operator, so it is not read.
    assert_eq!(
        field_list(&plan.schemas[0]),
        vec![
            col("name", DataType::Utf8, true),
            col("score", DataType::Float64, true),
        ]
    );
    let OperatorKind::ArrowIpcSource(source) = &plan.spec.operators[0].kind else {
        panic!("operator 0 is the arrow_ipc source");
    };
    assert_eq!(source.columns, Some(vec!["name".into(), "score".into()]));
    assert_eq!(source.format, None);
    let OperatorKind::ArrowIpcSink { options, .. } = &plan.spec.operators[3].kind else {
        panic!("operator 3 is the arrow_ipc sink");
    };
    let expected = ArrowIpcSinkOptions {
        format: IpcFormat::Stream,
        compression: IpcCompression::Lz4,
        target_file_bytes: Some(64 << 10),
    };
    assert_eq!(*options, expected);
    assert_eq!(
        plan.spec.operators[3].kind.file_sink().map(|(_, _, e)| e),
        Some("arrows")
    );
    // Forcing the format of a directory that holds both is an error
    // naming the file that does not have it.
    let text = ipc_job(dir.path(), "format = \"file\"");
    let message = load(&text).expect_err("b.arrows is a stream").to_string();
    assert!(message.contains("b.arrows"), "{message}");
    assert!(
        message.contains("format = \"file\", but the file is in the Arrow IPC stream format"),
        "{message}"
    );
}

#[test]
fn arrow_ipc_files_must_share_the_first_files_columns() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_ipc(
        &dir.path().join("a.arrow"),
        IpcFormat::File,
        &scores_batch(),
    );
    let other = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "secret",
            DataType::Int64,
            false,
        )])),
        vec![Arc::new(Int64Array::from(vec![1]))],
    )
    .expect("batch");
    write_ipc(&dir.path().join("b.arrow"), IpcFormat::File, &other);
    let text = ipc_job(dir.path(), "");
    let message = load(&text).expect_err("b.arrow differs").to_string();
    let line = line_of(&text, "path = ");
    assert!(
        message.starts_with(&format!("{FILE}:{line}: operator 'arrow_ipc_source-0': ")),
        "{message}"
    );
    assert!(
        message.contains("b.arrow: its columns differ from those of"),
        "{message}"
    );
    assert!(
        message.contains("a.arrow, the first file: it has 1 columns, not 3"),
        "{message}"
    );
    assert!(
        !message.contains("secret"),
        "the file's column names stay out: {message}"
    );

    std::fs::write(dir.path().join("b.arrow"), "id,name\n").expect("write");
    let message = load(&text).expect_err("b.arrow is text").to_string();
    assert!(
        message.contains("b.arrow: not an Arrow IPC file"),
        "{message}"
    );
    std::fs::remove_file(dir.path().join("b.arrow")).expect("remove");
    std::fs::remove_file(dir.path().join("a.arrow")).expect("remove");
    let message = load(&text).expect_err("no files").to_string();
    assert!(
        message.contains("no .arrow, .arrows, .feather or .ipc files in directory"),
        "{message}"
    );
}

#[test]
fn parquet_sink_options_default_to_parquets_own() {
    let text = "[job]\nname = \"t\"\n[[operator]]\ntype = \"datagen\"\nrows = 10\n\
                [[operator]]\ntype = \"parquet_sink\"\npath = \"a\"\n\
                [[operator]]\ntype = \"parquet_sink\"\ninput = \"datagen-0\"\npath = \"b\"\n\
                row_group_rows = 1_000\ntarget_file_bytes = 1048576\n";
    let plan = load(text).expect("plannable");
    let options = |i: usize| match &plan.spec.operators[i].kind {
        OperatorKind::ParquetSink { options, .. } => *options,
        other => panic!("not a parquet sink: {other:?}"),
    };
    assert_eq!(options(1), ParquetSinkOptions::default());
    assert_eq!(options(1).row_group_rows, 1024 * 1024);
    assert_eq!(
        options(2),
        ParquetSinkOptions {
            row_group_rows: 1000,
            target_file_bytes: Some(1 << 20),
        }
    );
}
