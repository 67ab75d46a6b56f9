//! Stateless feature encodings: `bucketize` (a numeric column to bucket
//! numbers) and `one_hot` (a categorical column to one 0/1 column per
//! category). Both run on the CPU, batch by batch, and hold no state.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, Int8Array, Int64Array, RecordBatch, RecordBatchOptions};
use arrow_schema::{DataType, Schema, SchemaRef};

use crate::exec::ExecError;
use crate::exec::operators::{Operator, Output};
use crate::job::{BucketizeSpec, Categories, OneHotSpec, UnknownCategory};

/// The boundaries, as thresholds of the column's own type: a value is at
/// or above a boundary exactly when it is at or above its threshold.
enum Thresholds {
    /// Boundaries above every i64 are left out (no value reaches them);
    /// those below every i64 become i64::MIN (every value does).
    Int(Vec<i64>),
    Float(Vec<f64>),
}

/// Bucket numbers of a numeric column: bucket `i` holds the values with
/// `i` boundaries at or below them (`boundaries.len() + 1` buckets). Nulls
/// stay null; NaN is in the last bucket, so that every non-null value has
/// a bucket and NaN sorts where `sort` puts it (after every number).
pub struct BucketizeOperator {
    column: usize,
    /// Whether the bucket column takes the input column's place (else it
    /// is appended).
    in_place: bool,
    thresholds: Thresholds,
    /// The NaN bucket: one past the last boundary.
    last_bucket: i64,
    output: SchemaRef,
}

impl BucketizeOperator {
    pub fn new(
        name: &str,
        input: &Schema,
        spec: &BucketizeSpec,
        output: SchemaRef,
    ) -> Result<Self, ExecError> {
        let column = input.index_of(&spec.column)?;
        let thresholds = match input.field(column).data_type() {
            DataType::Int64 => Thresholds::Int(
                spec.boundaries
                    .iter()
                    .filter_map(|b| match b.int_threshold() {
                        Ok(t) => Some(t),
                        Err(std::cmp::Ordering::Less) => Some(i64::MIN),
                        Err(_) => None,
                    })
                    .collect(),
            ),
            DataType::Float64 => Thresholds::Float(
                spec.boundaries
                    .iter()
                    .map(|b| b.float_threshold())
                    .collect(),
            ),
            other => {
                return Err(ExecError::Unsupported {
                    operator: name.to_owned(),
                    detail: format!("cannot bucketize column '{}' of type {other}", spec.column),
                });
            }
        };
        Ok(BucketizeOperator {
            column,
            in_place: spec.output == spec.column,
            thresholds,
            last_bucket: spec.boundaries.len() as i64,
            output,
        })
    }
}

impl Operator for BucketizeOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let input = batch.column(self.column);
        let mut buckets = Vec::with_capacity(input.len());
        match &self.thresholds {
            Thresholds::Int(thresholds) => {
                let values = input.as_primitive::<Int64Type>().values();
                bucket_i64(values, thresholds, &mut buckets);
            }
            Thresholds::Float(thresholds) => {
                let values = input.as_primitive::<Float64Type>().values();
                bucket_f64(values, thresholds, self.last_bucket, &mut buckets);
            }
        }
        let bucket: ArrayRef = Arc::new(Int64Array::new(buckets.into(), input.nulls().cloned()));
        let mut columns = batch.columns().to_vec();
        if self.in_place {
            columns[self.column] = bucket;
        } else {
            columns.push(bucket);
        }
        emit_with(&self.output, columns, batch.num_rows(), out)
    }
}

/// Each value's bucket: how many thresholds (sorted) are at or below it.
/// Values under a null slot get a bucket too, which the null hides.
fn bucket_i64(values: &[i64], thresholds: &[i64], out: &mut Vec<i64>) {
    out.extend(
        values
            .iter()
            .map(|&x| thresholds.partition_point(|&t| t <= x) as i64),
    );
}

/// As [`bucket_i64`]; NaN (at or above no threshold) goes to `nan_bucket`.
fn bucket_f64(values: &[f64], thresholds: &[f64], nan_bucket: i64, out: &mut Vec<i64>) {
    out.extend(values.iter().map(|&x| {
        if x.is_nan() {
            nan_bucket
        } else {
            thresholds.partition_point(|&t| t <= x) as i64
        }
    }));
}

/// A batch of `output`'s schema from `columns`, emitted.
fn emit_with(
    output: &SchemaRef,
    columns: Vec<ArrayRef>,
    rows: usize,
    out: &mut dyn Output,
) -> Result<(), ExecError> {
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    out.emit(RecordBatch::try_new_with_options(
        Arc::clone(output),
        columns,
        &options,
    )?)
}

/// Category positions by value.
enum Lookup {
    Utf8(HashMap<String, u16>),
    Int64(HashMap<i64, u16>),
}

/// One Int8 column per category, 1 where the row holds that category and
/// 0 elsewhere. A null is no category (all 0, and 0 in `<prefix>_other`;
/// never an error); a value that is none of the categories is all 0
/// (`unknown = "ignore"`), 1 in `<prefix>_other` (`"column"`), or fails
/// the job naming the value and the column (`"error"`).
pub struct OneHotOperator {
    name: String,
    column: usize,
    column_name: String,
    lookup: Lookup,
    category_count: usize,
    unknown: UnknownCategory,
    drop: bool,
    output: SchemaRef,
}

/// What a row's value is, for [`OneHotOperator`]: a category's position,
/// or one of these.
const CODE_UNKNOWN: u16 = u16::MAX;
const CODE_NULL: u16 = u16::MAX - 1;
const _: () = assert!(crate::job::ONE_HOT_CATEGORIES_MAX < CODE_NULL as usize);

impl OneHotOperator {
    pub fn new(
        name: &str,
        input: &Schema,
        spec: &OneHotSpec,
        output: SchemaRef,
    ) -> Result<Self, ExecError> {
        let column = input.index_of(&spec.column)?;
        assert!(spec.categories.len() <= crate::job::ONE_HOT_CATEGORIES_MAX);
        let lookup = match (&spec.categories, input.field(column).data_type()) {
            (Categories::Utf8(values), DataType::Utf8) => Lookup::Utf8(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v.clone(), i as u16))
                    .collect(),
            ),
            (Categories::Int64(values), DataType::Int64) => Lookup::Int64(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (*v, i as u16))
                    .collect(),
            ),
            (_, other) => {
                return Err(ExecError::Unsupported {
                    operator: name.to_owned(),
                    detail: format!(
                        "the categories do not match column '{}' of type {other}",
                        spec.column
                    ),
                });
            }
        };
        Ok(OneHotOperator {
            name: name.to_owned(),
            column,
            column_name: spec.column.clone(),
            lookup,
            category_count: spec.categories.len(),
            unknown: spec.unknown,
            drop: spec.drop,
            output,
        })
    }

    /// Each row's code: its category's position, [`CODE_NULL`] or
    /// [`CODE_UNKNOWN`].
    fn codes(&self, input: &dyn Array, codes: &mut Vec<u16>) {
        let code = |valid: bool, found: Option<&u16>| match (valid, found) {
            (false, _) => CODE_NULL,
            (true, Some(&i)) => i,
            (true, None) => CODE_UNKNOWN,
        };
        match &self.lookup {
            Lookup::Utf8(map) => {
                let values = input.as_string::<i32>();
                codes.extend(
                    (0..values.len()).map(|i| code(values.is_valid(i), map.get(values.value(i)))),
                );
            }
            Lookup::Int64(map) => {
                let values = input.as_primitive::<Int64Type>();
                codes.extend(
                    (0..values.len()).map(|i| code(values.is_valid(i), map.get(&values.value(i)))),
                );
            }
        }
    }

    fn unknown_value(&self, input: &dyn Array, row: usize) -> ExecError {
        let value = match &self.lookup {
            Lookup::Utf8(_) => format!("'{}'", input.as_string::<i32>().value(row)),
            Lookup::Int64(_) => input.as_primitive::<Int64Type>().value(row).to_string(),
        };
        ExecError::UnknownCategory {
            operator: self.name.clone(),
            column: self.column_name.clone(),
            value,
        }
    }
}

impl Operator for OneHotOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        let input = batch.column(self.column);
        let rows = batch.num_rows();
        let mut codes = Vec::with_capacity(rows);
        self.codes(input.as_ref(), &mut codes);
        if self.unknown == UnknownCategory::Error
            && let Some(row) = codes.iter().position(|&c| c == CODE_UNKNOWN)
        {
            return Err(self.unknown_value(input.as_ref(), row));
        }
        let other = usize::from(self.unknown == UnknownCategory::Column);
        let mut indicators = vec![vec![0i8; rows]; self.category_count + other];
        set_indicators(&codes, self.category_count, &mut indicators);
        let mut columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .enumerate()
            .filter(|(i, _)| !(self.drop && *i == self.column))
            .map(|(_, c)| Arc::clone(c))
            .collect();
        columns.extend(
            indicators
                .into_iter()
                .map(|values| Arc::new(Int8Array::from(values)) as ArrayRef),
        );
        emit_with(&self.output, columns, rows, out)
    }
}

/// Sets `indicators[code][row]` to 1 for each row's category; an unknown
/// value's goes to the column after the categories, when there is one.
fn set_indicators(codes: &[u16], category_count: usize, indicators: &mut [Vec<i8>]) {
    for (row, &code) in codes.iter().enumerate() {
        let target = match code {
            CODE_NULL => continue,
            CODE_UNKNOWN => category_count,
            category => usize::from(category),
        };
        if let Some(column) = indicators.get_mut(target) {
            column[row] = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{Float64Array, StringArray};
    use arrow_schema::Field;

    use super::*;
    use crate::job::Number;

    type Sink = crate::exec::spill_tests::Collect;

    fn run(op: &mut dyn Operator, batch: RecordBatch) -> Result<RecordBatch, ExecError> {
        let mut out = Sink::default();
        op.process(batch, &mut out)?;
        assert_eq!(out.batches.len(), 1);
        Ok(out.batches.remove(0))
    }

    fn bucketize(
        input: &Schema,
        column: &str,
        boundaries: Vec<Number>,
        output: &str,
    ) -> BucketizeOperator {
        let spec = BucketizeSpec {
            column: column.into(),
            boundaries,
            output: output.into(),
        };
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        let bucket = Field::new(output, DataType::Int64, true);
        match input.index_of(output) {
            Ok(i) => fields[i] = bucket,
            Err(_) => fields.push(bucket),
        }
        BucketizeOperator::new("b", input, &spec, Arc::new(Schema::new(fields))).unwrap()
    }

    fn buckets(batch: &RecordBatch, column: usize) -> Vec<Option<i64>> {
        batch
            .column(column)
            .as_primitive::<Int64Type>()
            .iter()
            .collect()
    }

    #[test]
    fn a_value_on_a_boundary_belongs_to_the_bucket_above_it() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let values = Int64Array::from(vec![
            Some(-5),
            Some(0),
            Some(9),
            Some(10),
            Some(99),
            Some(100),
            Some(i64::MAX),
            None,
        ]);
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(values)]).unwrap();
        let boundaries = vec![Number::Int(0), Number::Int(10), Number::Int(100)];
        let mut op = bucketize(&schema, "v", boundaries, "v_bucket");
        let out = run(&mut op, batch).unwrap();
        assert_eq!(out.num_columns(), 2, "appended");
        assert_eq!(
            buckets(&out, 1),
            [
                Some(0),
                Some(1),
                Some(1),
                Some(2),
                Some(2),
                Some(3),
                Some(3),
                None
            ]
        );
    }

    #[test]
    fn integers_against_fractional_and_out_of_range_boundaries() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let values = Int64Array::from(vec![i64::MIN, 2, 3, i64::MAX]);
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(values)]).unwrap();
        // -1e19 is below every i64, 2.5 lies between 2 and 3, 1e19 above every i64.
        let boundaries = vec![
            Number::Float(-1e19),
            Number::Float(2.5),
            Number::Float(1e19),
        ];
        let mut op = bucketize(&schema, "v", boundaries, "v");
        let out = run(&mut op, batch).unwrap();
        assert_eq!(out.num_columns(), 1, "in place");
        assert_eq!(out.schema().field(0).data_type(), &DataType::Int64);
        assert_eq!(buckets(&out, 0), [Some(1), Some(1), Some(2), Some(2)]);
    }

    #[test]
    fn floats_bucketize_with_nan_last_and_nulls_kept() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float64, true)]));
        let values = Float64Array::from(vec![
            Some(f64::NEG_INFINITY),
            Some(-0.0),
            Some(0.5),
            Some(1.0),
            Some(f64::INFINITY),
            Some(f64::NAN),
            None,
        ]);
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(values)]).unwrap();
        let boundaries = vec![Number::Int(0), Number::Float(0.5), Number::Int(1)];
        let mut op = bucketize(&schema, "x", boundaries, "x_bucket");
        let out = run(&mut op, batch).unwrap();
        assert_eq!(
            buckets(&out, 1),
            [Some(0), Some(1), Some(2), Some(3), Some(3), Some(3), None],
            "-0.0 is on the boundary 0; NaN joins the last bucket"
        );
    }

    fn one_hot(
        categories: &[&str],
        unknown: UnknownCategory,
        drop: bool,
    ) -> (OneHotOperator, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("color", DataType::Utf8, true),
        ]));
        let spec = OneHotSpec {
            column: "color".into(),
            categories: Categories::Utf8(categories.iter().map(|c| c.to_string()).collect()),
            prefix: "color".into(),
            unknown,
            drop,
        };
        let mut fields: Vec<Field> = schema
            .fields()
            .iter()
            .filter(|f| !(drop && f.name() == "color"))
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(
            spec.output_names()
                .into_iter()
                .map(|n| Field::new(n, DataType::Int8, false)),
        );
        let op = OneHotOperator::new("h", &schema, &spec, Arc::new(Schema::new(fields))).unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(StringArray::from(vec![
                    Some("red"),
                    Some("teal"),
                    None,
                    Some("blue"),
                ])),
            ],
        )
        .unwrap();
        (op, batch)
    }

    fn indicators(batch: &RecordBatch, first: usize) -> Vec<Vec<i8>> {
        (first..batch.num_columns())
            .map(|c| {
                batch
                    .column(c)
                    .as_primitive::<arrow_array::types::Int8Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    #[test]
    fn one_hot_ignores_unknown_values_and_nulls_by_default() {
        let (mut op, batch) = one_hot(&["red", "blue"], UnknownCategory::Ignore, false);
        let out = run(&mut op, batch).unwrap();
        let schema = out.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "color", "color_red", "color_blue"]);
        assert_eq!(indicators(&out, 2), [vec![1, 0, 0, 0], vec![0, 0, 0, 1]]);
    }

    #[test]
    fn one_hot_marks_unknown_values_in_an_other_column_and_can_drop_the_source() {
        let (mut op, batch) = one_hot(&["red", "blue"], UnknownCategory::Column, true);
        let out = run(&mut op, batch).unwrap();
        assert_eq!(out.num_columns(), 4, "id and three indicators");
        assert_eq!(out.schema().field(3).name(), "color_other");
        assert_eq!(
            indicators(&out, 1),
            [vec![1, 0, 0, 0], vec![0, 0, 0, 1], vec![0, 1, 0, 0]],
            "a null is no category and not unknown either"
        );
    }

    #[test]
    fn one_hot_fails_on_an_unknown_value_naming_it_and_the_column() {
        let (mut op, batch) = one_hot(&["red", "blue"], UnknownCategory::Error, false);
        let error = run(&mut op, batch).unwrap_err().to_string();
        assert!(
            error.contains("value 'teal' of column 'color'") && error.contains("'h'"),
            "{error}"
        );
        let (mut op, batch) = one_hot(&["red", "blue", "teal"], UnknownCategory::Error, false);
        run(&mut op, batch).expect("nulls are not unknown values");
    }

    #[test]
    fn one_hot_of_integers() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let spec = OneHotSpec {
            column: "k".into(),
            categories: Categories::Int64(vec![7, -1]),
            prefix: "k".into(),
            unknown: UnknownCategory::Error,
            drop: true,
        };
        let output = Arc::new(Schema::new(vec![
            Field::new("k_7", DataType::Int8, false),
            Field::new("k_-1", DataType::Int8, false),
        ]));
        let mut op = OneHotOperator::new("h", &schema, &spec, output).unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(vec![Some(-1), None, Some(7)]))],
        )
        .unwrap();
        let out = run(&mut op, batch.clone()).unwrap();
        assert_eq!(indicators(&out, 0), [vec![0, 0, 1], vec![1, 0, 0]]);
        let bad = RecordBatch::try_new(batch.schema(), vec![Arc::new(Int64Array::from(vec![3]))])
            .unwrap();
        let error = run(&mut op, bad).unwrap_err().to_string();
        assert!(error.contains("value 3 of column 'k'"), "{error}");
    }
}
