//! The encoding and enrichment operators of ML feature pipelines (issue
//! 17) as job-file values: `bucketize`, `one_hot` and the `join` of the
//! stream with a bounded dimension table, and their parsers.
//!
//! Parsing checks what needs no schema: key types, that boundaries are
//! finite and strictly increasing, that categories are distinct, of one
//! type and at most [`ONE_HOT_CATEGORIES_MAX`], that `how`, `unknown` and
//! `format` hold known words. Columns, types and the dimension table's
//! file are checked by `plan` (its `features` module).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{Schema, SchemaRef};
use toml::Spanned;
use toml::de::DeValue;

use super::{csv_schema, required_strings};
use crate::job::JobError;
use crate::job::tomlx::Table;

/// The most categories a `one_hot` takes: it makes one column per
/// category, so it is for small categorical columns (a larger vocabulary
/// wants an index or a hash, not a column each).
pub const ONE_HOT_CATEGORIES_MAX: usize = 1024;

/// A number of the job file: TOML integers stay exact, so that an Int64
/// column is bucketized against the integer the user wrote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    /// Always finite.
    Float(f64),
}

impl Number {
    /// The exact order of two numbers (an integer against a float is
    /// compared without rounding either).
    pub fn cmp_exact(self, other: Number) -> Ordering {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a.cmp(&b),
            (Number::Float(a), Number::Float(b)) => {
                a.partial_cmp(&b).expect("boundaries are finite")
            }
            (Number::Int(a), Number::Float(b)) => int_float_cmp(a, b),
            (Number::Float(a), Number::Int(b)) => int_float_cmp(b, a).reverse(),
        }
    }

    /// The smallest integer at least this number, when there is an i64
    /// that large: an integer `x` is at least the number exactly when it
    /// is at least this threshold. `Err(Ordering::Less)`: every i64 is
    /// (the number is below i64::MIN); `Err(Ordering::Greater)`: none is.
    pub fn int_threshold(self) -> Result<i64, Ordering> {
        match self {
            Number::Int(v) => Ok(v),
            Number::Float(f) => {
                let ceil = f.ceil();
                if ceil >= TWO_POW_63 {
                    Err(Ordering::Greater)
                } else if ceil < -TWO_POW_63 {
                    Err(Ordering::Less)
                } else {
                    // In range and integral: the cast is exact.
                    Ok(ceil as i64)
                }
            }
        }
    }

    /// The smallest f64 at least this number: a float `x` is at least the
    /// number exactly when it is at least this threshold (an integer
    /// beyond 2^53 rounds up, never down).
    pub fn float_threshold(self) -> f64 {
        match self {
            Number::Float(f) => f,
            Number::Int(v) => {
                let nearest = v as f64;
                // Both sides are exact in i128.
                if (nearest as i128) < i128::from(v) {
                    nearest.next_up()
                } else {
                    nearest
                }
            }
        }
    }
}

const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// `a` against the finite float `b`, exactly.
fn int_float_cmp(a: i64, b: f64) -> Ordering {
    if b >= TWO_POW_63 {
        return Ordering::Less;
    }
    if b < -TWO_POW_63 {
        return Ordering::Greater;
    }
    let whole = b.trunc();
    // In [-2^63, 2^63) and integral: the cast is exact.
    match a.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0.partial_cmp(&(b - whole)).expect("finite"),
        other => other,
    }
}

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Number::Int(v) => write!(f, "{v}"),
            Number::Float(v) => write!(f, "{v:?}"),
        }
    }
}

/// `bucketize`: an Int64 column of bucket numbers from a numeric column.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketizeSpec {
    pub column: String,
    /// Finite and strictly increasing. Bucket `i` holds the values with
    /// exactly `i` boundaries at or below them, so there are
    /// `boundaries.len() + 1` buckets; NaN goes to the last one.
    pub boundaries: Vec<Number>,
    /// The bucket column's name (default `<column>_bucket`); equal to
    /// `column`, it replaces that column in place.
    pub output: String,
}

/// The categories of a `one_hot`, of the column's type.
#[derive(Debug, Clone, PartialEq)]
pub enum Categories {
    Utf8(Vec<String>),
    Int64(Vec<i64>),
}

impl Categories {
    pub fn len(&self) -> usize {
        match self {
            Categories::Utf8(v) => v.len(),
            Categories::Int64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each category as it appears in an output column's name.
    pub fn labels(&self) -> Vec<String> {
        match self {
            Categories::Utf8(v) => v.clone(),
            Categories::Int64(v) => v.iter().map(i64::to_string).collect(),
        }
    }
}

/// What a `one_hot` does with a value that is not one of its categories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownCategory {
    /// All of the row's category columns are 0 (the default).
    #[default]
    Ignore,
    /// An extra `<prefix>_other` column is 1.
    Column,
    /// The job fails, naming the value and the column.
    Error,
}

/// `one_hot`: one Int8 column (0 or 1) per category.
#[derive(Debug, Clone, PartialEq)]
pub struct OneHotSpec {
    pub column: String,
    /// Distinct, at least one, at most [`ONE_HOT_CATEGORIES_MAX`].
    pub categories: Categories,
    /// Output columns are `<prefix>_<category>`; default the column's name.
    pub prefix: String,
    pub unknown: UnknownCategory,
    /// Removes the source column from the output (default: kept).
    pub drop: bool,
}

impl OneHotSpec {
    /// The names of the columns the operator appends, in order: one per
    /// category, then `<prefix>_other` when unknown values get a column.
    pub fn output_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .categories
            .labels()
            .iter()
            .map(|label| format!("{}_{label}", self.prefix))
            .collect();
        if self.unknown == UnknownCategory::Column {
            names.push(format!("{}_other", self.prefix));
        }
        names
    }
}

/// The file format of a dimension table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// With a header line; the schema is inferred like a `csv_source`'s
    /// unless the job file declares it.
    Csv,
    Parquet,
}

/// Which stream rows a `join` keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JoinHow {
    /// Only rows whose key the table holds (the default).
    #[default]
    Inner,
    /// Every row; the added columns are null where the table has no row.
    Left,
}

/// The bounded table a `join` looks rows up in.
#[derive(Debug, Clone, PartialEq)]
pub struct DimensionTableSpec {
    /// A file, or a directory of `.csv` / `.parquet` files.
    pub path: PathBuf,
    pub format: TableFormat,
    /// Every column of the table, in file order: declared by the job
    /// file's `schema` (CSV), else empty until `plan` reads it.
    pub schema: SchemaRef,
}

/// `join`: enriches each stream row with the columns of the dimension
/// table's row of the same key.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinSpec {
    pub table: DimensionTableSpec,
    /// Key columns of the stream.
    pub on: Vec<String>,
    /// Key columns of the table, as many as `on` (default: `on`).
    pub table_on: Vec<String>,
    pub how: JoinHow,
    /// Table columns to add; `None`: every column but the keys.
    pub columns: Option<Vec<String>>,
    /// Prepended to the name of every added column (default empty).
    pub prefix: String,
}

impl JoinSpec {
    /// The table columns the join adds, in output order: `columns`, else
    /// every non-key column of the table's schema (so only once planned).
    pub fn added_columns(&self) -> Vec<String> {
        match &self.columns {
            Some(columns) => columns.clone(),
            None => self
                .table
                .schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|name| !self.table_on.contains(name))
                .collect(),
        }
    }
}

pub(super) fn bucketize(t: &Table<'_, '_>) -> Result<BucketizeSpec, JobError> {
    const EXPECTED: &str = "finite numbers in strictly increasing order";
    let column = t.required_str("column")?.into_inner().to_string();
    let items = t
        .array("boundaries")?
        .ok_or_else(|| t.missing("boundaries", "an array of numbers"))?;
    if items.is_empty() {
        let span = t.get("boundaries").map_or(t.span.clone(), |v| v.span());
        return Err(t.invalid("boundaries", &span, "[]".into(), "at least one boundary"));
    }
    let mut boundaries: Vec<Number> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let key = format!("boundaries[{index}]");
        let Some(number) = number(item.get_ref()) else {
            return Err(t.invalid(&key, &item.span(), value_text(item), EXPECTED));
        };
        if let Some(previous) = boundaries.last()
            && previous.cmp_exact(number) != Ordering::Less
        {
            let expected = format!("a boundary greater than the one before it ({previous})");
            return Err(t.invalid(&key, &item.span(), number.to_string(), &expected));
        }
        boundaries.push(number);
    }
    let output = match t.str("output")? {
        Some(output) => output.into_inner().to_string(),
        None => format!("{column}_bucket"),
    };
    Ok(BucketizeSpec {
        column,
        boundaries,
        output,
    })
}

pub(super) fn one_hot(t: &Table<'_, '_>) -> Result<OneHotSpec, JobError> {
    let column = t.required_str("column")?.into_inner().to_string();
    let categories = categories(t)?;
    let unknown = match t.str("unknown")? {
        None => UnknownCategory::default(),
        Some(word) => match *word.get_ref() {
            "ignore" => UnknownCategory::Ignore,
            "column" => UnknownCategory::Column,
            "error" => UnknownCategory::Error,
            other => {
                return Err(t.invalid(
                    "unknown",
                    &word.span(),
                    format!("\"{other}\""),
                    "\"ignore\" (all zeros), \"column\" (a <prefix>_other column) or \
                     \"error\" (fail the job)",
                ));
            }
        },
    };
    let prefix = match t.str("prefix")? {
        Some(prefix) => prefix.into_inner().to_string(),
        None => column.clone(),
    };
    Ok(OneHotSpec {
        column,
        categories,
        prefix,
        unknown,
        drop: t.bool("drop")?.unwrap_or(false),
    })
}

/// `categories`: distinct strings, or distinct integers.
fn categories(t: &Table<'_, '_>) -> Result<Categories, JobError> {
    const EXPECTED: &str = "distinct strings, or distinct integers";
    let items = t
        .array("categories")?
        .ok_or_else(|| t.missing("categories", "an array of strings or integers"))?;
    let span = t.get("categories").map_or(t.span.clone(), |v| v.span());
    if items.is_empty() {
        return Err(t.invalid("categories", &span, "[]".into(), "at least one category"));
    }
    if items.len() > ONE_HOT_CATEGORIES_MAX {
        let expected = format!(
            "at most {ONE_HOT_CATEGORIES_MAX} categories: one_hot makes a column per category \
             and is for small categorical columns"
        );
        let found = format!("{} categories", items.len());
        return Err(t.invalid("categories", &span, found, &expected));
    }
    let strings = items[0].get_ref().as_str().is_some();
    let mut labels: Vec<String> = Vec::with_capacity(items.len());
    let mut integers: Vec<i64> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let key = format!("categories[{index}]");
        let label = match (strings, item.get_ref()) {
            (true, DeValue::String(s)) => s.to_string(),
            (false, DeValue::Integer(_)) => match number(item.get_ref()) {
                Some(Number::Int(v)) => {
                    integers.push(v);
                    v.to_string()
                }
                _ => return Err(t.invalid(&key, &item.span(), value_text(item), EXPECTED)),
            },
            _ => return Err(t.invalid(&key, &item.span(), value_text(item), EXPECTED)),
        };
        if labels.contains(&label) {
            return Err(t.invalid(&key, &item.span(), value_text(item), EXPECTED));
        }
        labels.push(label);
    }
    Ok(if strings {
        Categories::Utf8(labels)
    } else {
        Categories::Int64(integers)
    })
}

pub(super) fn join(t: &Table<'_, '_>) -> Result<JoinSpec, JobError> {
    let table = t.required_str("table")?;
    let path = PathBuf::from(*table.get_ref());
    let format = table_format(t, &path, &table)?;
    let schema = match format {
        TableFormat::Csv => csv_schema(t)?,
        TableFormat::Parquet => {
            if let Some(value) = t.get("schema") {
                return Err(t.invalid(
                    "schema",
                    &value.span(),
                    "a schema".into(),
                    "no schema for a Parquet table (its footer holds one)",
                ));
            }
            Arc::new(Schema::empty())
        }
    };
    let on = strings(&required_strings(t, "on")?);
    let table_on = match t.str_array("table_on")? {
        Some(items) => strings(&items),
        None => on.clone(),
    };
    let how = match t.str("how")? {
        None => JoinHow::default(),
        Some(word) => match *word.get_ref() {
            "inner" => JoinHow::Inner,
            "left" => JoinHow::Left,
            other => {
                return Err(t.invalid(
                    "how",
                    &word.span(),
                    format!("\"{other}\""),
                    "\"inner\" (rows whose key the table holds) or \"left\" (every row)",
                ));
            }
        },
    };
    Ok(JoinSpec {
        table: DimensionTableSpec {
            path,
            format,
            schema,
        },
        on,
        table_on,
        how,
        columns: t.str_array("columns")?.map(|items| strings(&items)),
        prefix: t
            .str("prefix")?
            .map_or_else(String::new, |p| p.into_inner().to_string()),
    })
}

/// The `format` key, else the table path's extension; a path without
/// one (a directory) is Parquet. The file itself is read by `plan`.
fn table_format(
    t: &Table<'_, '_>,
    path: &Path,
    table: &Spanned<&str>,
) -> Result<TableFormat, JobError> {
    if let Some(format) = t.str("format")? {
        return match *format.get_ref() {
            "csv" => Ok(TableFormat::Csv),
            "parquet" => Ok(TableFormat::Parquet),
            other => Err(t.invalid(
                "format",
                &format.span(),
                format!("\"{other}\""),
                "\"csv\" or \"parquet\"",
            )),
        };
    }
    let extension = path.extension().map(|e| e.to_string_lossy().to_lowercase());
    match extension.as_deref() {
        Some("csv") => Ok(TableFormat::Csv),
        Some("parquet" | "parq") | None => Ok(TableFormat::Parquet),
        Some(_) => Err(t.invalid(
            "table",
            &table.span(),
            format!("\"{}\"", table.get_ref()),
            "a .csv or .parquet file, a directory of Parquet files, or a `format` key",
        )),
    }
}

fn strings(items: &[Spanned<&str>]) -> Vec<String> {
    items.iter().map(|s| s.get_ref().to_string()).collect()
}

/// A TOML integer or finite float.
fn number(value: &DeValue<'_>) -> Option<Number> {
    if let Some(i) = value.as_integer() {
        return i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
            .ok()
            .map(Number::Int);
    }
    let f = value.as_float()?.as_str().replace('_', "").parse::<f64>();
    f.ok().filter(|f| f.is_finite()).map(Number::Float)
}

/// A value as an error message shows it.
fn value_text(item: &Spanned<DeValue<'_>>) -> String {
    match item.get_ref() {
        DeValue::String(s) => format!("\"{s}\""),
        DeValue::Integer(i) => i.as_str().to_string(),
        DeValue::Float(f) => f.as_str().to_string(),
        other => format!("a {}", other.type_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_exactly_across_integers_and_floats() {
        use Number::{Float, Int};
        let cases = [
            (Int(1), Float(1.5), Ordering::Less),
            (Int(2), Float(1.5), Ordering::Greater),
            (Int(-1), Float(-0.5), Ordering::Less),
            (Int(0), Float(-0.5), Ordering::Greater),
            (Int(3), Float(3.0), Ordering::Equal),
            (Float(0.0), Float(-0.0), Ordering::Equal),
            (Int(i64::MAX), Float(9.3e18), Ordering::Less),
            (Int(i64::MIN), Float(-9.3e18), Ordering::Greater),
            // 2^53 + 1 is no f64; it lies above 2^53.
            (
                Int((1 << 53) + 1),
                Float(9_007_199_254_740_992.0),
                Ordering::Greater,
            ),
        ];
        for (a, b, expected) in cases {
            assert_eq!(a.cmp_exact(b), expected, "{a} vs {b}");
            assert_eq!(b.cmp_exact(a), expected.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn thresholds_round_towards_the_bucket_above() {
        assert_eq!(Number::Float(2.5).int_threshold(), Ok(3));
        assert_eq!(Number::Float(-2.5).int_threshold(), Ok(-2));
        assert_eq!(Number::Float(4.0).int_threshold(), Ok(4));
        assert_eq!(Number::Float(1e19).int_threshold(), Err(Ordering::Greater));
        assert_eq!(Number::Float(-1e19).int_threshold(), Err(Ordering::Less));
        let big = (1i64 << 53) + 1;
        let threshold = Number::Int(big).float_threshold();
        assert!(threshold > 9_007_199_254_740_992.0);
        assert_eq!(Number::Int(7).float_threshold(), 7.0);
    }
}
