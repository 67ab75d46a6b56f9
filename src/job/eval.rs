//! Type checking and vectorised evaluation of [`Expr`].
//!
//! Both walk the tree with the same coercion rule ([`binary_types`]), so a plan
//! that type-checks evaluates to exactly the type it promised:
//!
//! - arithmetic needs numeric operands; equal types stay, mixed integers widen to
//!   Int64 and anything mixed with a float becomes Float64;
//! - comparisons accept two numerics (coerced as above), two strings, or two
//!   values of the same type, and yield Boolean;
//! - `and`, `or`, `not` need Boolean and follow SQL's three-valued logic;
//! - `null` fits any operand type; nulls propagate through every operator.
//!
//! Literals are evaluated once as length-1 arrays flagged as scalars (Arrow's
//! `Datum`), and only widened to the batch length when a kernel needs it. Integer
//! overflow and division by zero are errors (Arrow's checked kernels), never
//! panics or silent wrap-around; float division follows IEEE 754.

use std::sync::Arc;

use arrow_arith::{boolean, numeric};
use arrow_array::cast::AsArray;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Datum, Float64Array, Int64Array, RecordBatch, StringArray,
    UInt32Array, new_null_array,
};
use arrow_cast::{CastOptions, cast_with_options};
use arrow_ord::cmp;
use arrow_schema::{ArrowError, DataType, Schema};

use super::expr::{BinOp, Expr, ExprError, ScalarValue};

impl ScalarValue {
    pub fn data_type(&self) -> DataType {
        match self {
            ScalarValue::Int64(_) => DataType::Int64,
            ScalarValue::Float64(_) => DataType::Float64,
            ScalarValue::Utf8(_) => DataType::Utf8,
            ScalarValue::Boolean(_) => DataType::Boolean,
            ScalarValue::Null => DataType::Null,
        }
    }

    /// The value repeated `length` times.
    pub fn to_array(&self, length: usize) -> ArrayRef {
        match self {
            ScalarValue::Int64(v) => Arc::new(Int64Array::from_value(*v, length)),
            ScalarValue::Float64(v) => Arc::new(Float64Array::from_value(*v, length)),
            ScalarValue::Utf8(s) => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                s, length,
            ))),
            ScalarValue::Boolean(b) => Arc::new(BooleanArray::from(vec![*b; length])),
            ScalarValue::Null => new_null_array(&DataType::Null, length),
        }
    }
}

impl Expr {
    /// The type the expression evaluates to over `schema`, or why it is ill-typed.
    pub fn data_type(&self, schema: &Schema) -> Result<DataType, ExprError> {
        match self {
            Expr::Column(name) => match schema.field_with_name(name) {
                Ok(field) => Ok(field.data_type().clone()),
                Err(_) => Err(unknown_column(name, schema)),
            },
            Expr::Literal(value) => Ok(value.data_type()),
            Expr::Binary { op, left, right } => {
                binary_types(*op, &left.data_type(schema)?, &right.data_type(schema)?)
                    .map(|t| t.result)
            }
            Expr::Not(inner) => not_type(&inner.data_type(schema)?),
            Expr::Neg(inner) => neg_type(&inner.data_type(schema)?),
        }
    }

    /// Whether the result can hold nulls: only if a nullable column or a `null`
    /// literal feeds it, since errors are reported rather than turned into nulls.
    pub fn nullable(&self, schema: &Schema) -> bool {
        match self {
            Expr::Column(name) => schema
                .field_with_name(name)
                .map_or(true, |f| f.is_nullable()),
            Expr::Literal(value) => *value == ScalarValue::Null,
            Expr::Binary { left, right, .. } => left.nullable(schema) || right.nullable(schema),
            Expr::Not(inner) | Expr::Neg(inner) => inner.nullable(schema),
        }
    }

    /// Evaluates the expression over `batch`, giving an array of `num_rows` values.
    pub fn eval(&self, batch: &RecordBatch) -> Result<ArrayRef, ExprError> {
        let operand = self.evaluate(batch)?;
        if operand.is_scalar {
            expand(&operand.array, batch.num_rows()).map_err(|e| self.arrow_error(e))
        } else {
            Ok(operand.array)
        }
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<Operand, ExprError> {
        match self {
            Expr::Column(name) => match batch.column_by_name(name) {
                Some(array) => Ok(Operand::array(array.clone())),
                None => Err(unknown_column(name, &batch.schema())),
            },
            Expr::Literal(value) => Ok(Operand::scalar(value.to_array(1))),
            Expr::Binary { op, left, right } => {
                let (left, right) = (left.evaluate(batch)?, right.evaluate(batch)?);
                let types = binary_types(*op, left.array.data_type(), right.array.data_type())?;
                evaluate_binary(*op, &types, left, right, batch.num_rows())
                    .map_err(|e| self.arrow_error(e))
            }
            Expr::Not(inner) => {
                let operand = inner.evaluate(batch)?;
                not_type(operand.array.data_type())?;
                let array = cast_exact(&operand.array, &DataType::Boolean)
                    .and_then(|a| boolean::not(a.as_boolean()))
                    .map_err(|e| self.arrow_error(e))?;
                Ok(operand.with(Arc::new(array)))
            }
            Expr::Neg(inner) => {
                let operand = inner.evaluate(batch)?;
                if neg_type(operand.array.data_type())? == DataType::Null {
                    return Ok(operand);
                }
                let array = numeric::neg(&operand.array).map_err(|e| self.arrow_error(e))?;
                Ok(operand.with(array))
            }
        }
    }

    /// Names this (sub)expression in a runtime error.
    fn arrow_error(&self, error: ArrowError) -> ExprError {
        let expr = self.to_string();
        match error {
            ArrowError::DivideByZero => ExprError::DivideByZero { expr },
            ArrowError::ArithmeticOverflow(_) => ExprError::Overflow { expr },
            source => ExprError::Arrow { expr, source },
        }
    }
}

/// Applies `op` after casting both operands to the common type.
fn evaluate_binary(
    op: BinOp,
    types: &BinaryTypes,
    left: Operand,
    right: Operand,
    num_rows: usize,
) -> Result<Operand, ArrowError> {
    let is_scalar = left.is_scalar && right.is_scalar;
    if types.operand == DataType::Null {
        let length = if is_scalar { 1 } else { num_rows };
        return Ok(Operand {
            array: new_null_array(&types.result, length),
            is_scalar,
        });
    }
    let mut left = left.with(cast_exact(&left.array, &types.operand)?);
    let mut right = right.with(cast_exact(&right.array, &types.operand)?);
    if op.is_comparison() && types.operand == DataType::Float64 {
        left = left.with(one_nan(&left.array));
        right = right.with(one_nan(&right.array));
    }
    let array: ArrayRef = match op {
        BinOp::And | BinOp::Or => {
            // The Kleene kernels take two arrays of equal length.
            let length = if is_scalar { 1 } else { num_rows };
            let (l, r) = (left.widen(length)?, right.widen(length)?);
            let (l, r) = (l.as_boolean(), r.as_boolean());
            let kernel = if op == BinOp::And {
                boolean::and_kleene
            } else {
                boolean::or_kleene
            };
            Arc::new(kernel(l, r)?)
        }
        BinOp::Eq => Arc::new(cmp::eq(&left, &right)?),
        BinOp::NotEq => Arc::new(cmp::neq(&left, &right)?),
        BinOp::Lt => Arc::new(cmp::lt(&left, &right)?),
        BinOp::LtEq => Arc::new(cmp::lt_eq(&left, &right)?),
        BinOp::Gt => Arc::new(cmp::gt(&left, &right)?),
        BinOp::GtEq => Arc::new(cmp::gt_eq(&left, &right)?),
        BinOp::Add => numeric::add(&left, &right)?,
        BinOp::Sub => numeric::sub(&left, &right)?,
        BinOp::Mul => numeric::mul(&left, &right)?,
        BinOp::Div => numeric::div(&left, &right)?,
        BinOp::Mod => numeric::rem(&left, &right)?,
    };
    Ok(Operand { array, is_scalar })
}

/// `array` with every NaN replaced by the positive quiet NaN.
///
/// Comparisons order Float64 by Arrow's total order, which puts a NaN with
/// the sign bit set below every number. The sign of a computed NaN is not
/// specified (x86 makes `0.0 / 0.0` negative, a GPU makes it positive, and
/// LLVM may swap the operands of a commutative operation, which picks the
/// other NaN), so comparisons treat all NaNs as one value above +inf, as
/// SQL engines do. The fused GPU chains (`kernels::chain`) compare the same
/// way.
fn one_nan(array: &ArrayRef) -> ArrayRef {
    let values = array.as_primitive::<arrow_array::types::Float64Type>();
    let canonical = f64::NAN.to_bits();
    if !values
        .values()
        .iter()
        .any(|v| v.is_nan() && v.to_bits() != canonical)
    {
        return array.clone();
    }
    Arc::new(
        values.unary::<_, arrow_array::types::Float64Type>(
            |v| {
                if v.is_nan() { f64::NAN } else { v }
            },
        ),
    )
}

/// An intermediate result: a batch-length array, or a length-1 scalar.
struct Operand {
    array: ArrayRef,
    is_scalar: bool,
}

impl Operand {
    fn array(array: ArrayRef) -> Operand {
        Operand {
            array,
            is_scalar: false,
        }
    }

    fn scalar(array: ArrayRef) -> Operand {
        Operand {
            array,
            is_scalar: true,
        }
    }

    /// The same scalar-ness with new values.
    fn with(&self, array: ArrayRef) -> Operand {
        Operand {
            array,
            is_scalar: self.is_scalar,
        }
    }

    fn widen(&self, length: usize) -> Result<ArrayRef, ArrowError> {
        if self.is_scalar && length != 1 {
            expand(&self.array, length)
        } else {
            Ok(self.array.clone())
        }
    }
}

impl Datum for Operand {
    fn get(&self) -> (&dyn Array, bool) {
        (self.array.as_ref(), self.is_scalar)
    }
}

/// Repeats the single value of `scalar` `length` times.
fn expand(scalar: &ArrayRef, length: usize) -> Result<ArrayRef, ArrowError> {
    let indices = UInt32Array::from_value(0, length);
    arrow_select::take::take(scalar.as_ref(), &indices, None)
}

/// Casts that fail instead of producing nulls (e.g. a UInt64 above i64::MAX).
fn cast_exact(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, ArrowError> {
    if array.data_type() == to {
        return Ok(array.clone());
    }
    let options = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    cast_with_options(array, to, &options)
}

fn unknown_column(name: &str, schema: &Schema) -> ExprError {
    ExprError::UnknownColumn {
        column: name.to_string(),
        available: schema.fields().iter().map(|f| f.name().clone()).collect(),
    }
}

/// The type both operands are cast to, and the type of the result.
#[derive(Debug, PartialEq)]
struct BinaryTypes {
    operand: DataType,
    result: DataType,
}

fn binary_types(op: BinOp, left: &DataType, right: &DataType) -> Result<BinaryTypes, ExprError> {
    let mismatch = || ExprError::BinaryTypes {
        op,
        left: left.clone(),
        right: right.clone(),
    };
    let operand = if op.is_logical() {
        let is_boolean = |t: &DataType| matches!(t, DataType::Boolean | DataType::Null);
        (is_boolean(left) && is_boolean(right))
            .then_some(DataType::Boolean)
            .ok_or_else(mismatch)?
    } else if op.is_comparison() {
        comparison_type(left, right).ok_or_else(mismatch)?
    } else {
        numeric_type(left, right).ok_or_else(mismatch)?
    };
    let result = if op.is_logical() || op.is_comparison() {
        DataType::Boolean
    } else {
        operand.clone()
    };
    Ok(BinaryTypes { operand, result })
}

fn is_numeric(t: &DataType) -> bool {
    t.is_integer() || t.is_floating()
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// The common type of two arithmetic operands; `None` if one is not numeric.
fn numeric_type(left: &DataType, right: &DataType) -> Option<DataType> {
    match (left, right) {
        (DataType::Null, t) | (t, DataType::Null) if is_numeric(t) || *t == DataType::Null => {
            Some(t.clone())
        }
        (l, r) if !is_numeric(l) || !is_numeric(r) => None,
        (l, r) if l == r => Some(l.clone()),
        (l, r) if l.is_floating() || r.is_floating() => Some(DataType::Float64),
        _ => Some(DataType::Int64),
    }
}

/// The type two compared operands are cast to; `None` if they are not comparable.
fn comparison_type(left: &DataType, right: &DataType) -> Option<DataType> {
    match (left, right) {
        (DataType::Null, t) | (t, DataType::Null) => Some(t.clone()),
        (l, r) if l == r => Some(l.clone()),
        (l, r) if is_numeric(l) && is_numeric(r) => numeric_type(l, r),
        (l, r) if is_string(l) && is_string(r) => Some(DataType::Utf8),
        _ => None,
    }
}

fn not_type(operand: &DataType) -> Result<DataType, ExprError> {
    match operand {
        DataType::Boolean | DataType::Null => Ok(DataType::Boolean),
        other => Err(ExprError::UnaryType {
            op: "not",
            expected: "Boolean",
            found: other.clone(),
        }),
    }
}

fn neg_type(operand: &DataType) -> Result<DataType, ExprError> {
    if is_numeric(operand) && !operand.is_unsigned_integer() || *operand == DataType::Null {
        Ok(operand.clone())
    } else {
        Err(ExprError::UnaryType {
            op: "-",
            expected: "signed numeric",
            found: operand.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::Field;

    fn batch() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("x", DataType::Float64, false),
            Field::new("s", DataType::Utf8, false),
            Field::new("f", DataType::Boolean, true),
        ]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![
                Some(7),
                None,
                Some(-4),
                Some(i64::MAX),
            ])),
            Arc::new(Int64Array::from(vec![Some(2), Some(3), None, Some(1)])),
            Arc::new(Float64Array::from(vec![0.5, 1.5, 2.0, -1.0])),
            Arc::new(StringArray::from(vec!["a", "b", "abc", "z"])),
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                None,
                None,
            ])),
        ];
        RecordBatch::try_new(Arc::new(schema), columns).expect("valid batch")
    }

    fn eval(text: &str) -> Result<ArrayRef, ExprError> {
        Expr::parse(text).expect("valid syntax").eval(&batch())
    }

    fn ints(text: &str) -> Vec<Option<i64>> {
        let array = eval(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        array
            .as_primitive::<arrow_array::types::Int64Type>()
            .iter()
            .collect()
    }

    fn floats(text: &str) -> Vec<Option<f64>> {
        let array = eval(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        array
            .as_primitive::<arrow_array::types::Float64Type>()
            .iter()
            .collect()
    }

    fn bools(text: &str) -> Vec<Option<bool>> {
        let array = eval(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        array.as_boolean().iter().collect()
    }

    #[test]
    fn integer_arithmetic_propagates_nulls() {
        assert_eq!(
            ints("a % 2 + b * 10 - 1"),
            vec![Some(20), None, None, Some(10)]
        );
        assert_eq!(ints("-b"), vec![Some(-2), Some(-3), None, Some(-1)]);
        assert_eq!(
            ints("a / 2"),
            vec![Some(3), None, Some(-2), Some(i64::MAX / 2)]
        );
    }

    #[test]
    fn mixed_arithmetic_promotes_integers_to_float() {
        assert_eq!(
            floats("a + x"),
            vec![Some(7.5), None, Some(-2.0), Some(i64::MAX as f64 - 1.0)]
        );
        assert_eq!(
            floats("b * 0.5"),
            vec![Some(1.0), Some(1.5), None, Some(0.5)]
        );
        assert_eq!(
            floats("x / 0"),
            vec![
                Some(f64::INFINITY),
                Some(f64::INFINITY),
                Some(f64::INFINITY),
                Some(f64::NEG_INFINITY)
            ]
        );
    }

    #[test]
    fn comparisons_coerce_and_keep_nulls() {
        assert_eq!(
            bools("a > x"),
            vec![Some(true), None, Some(false), Some(true)]
        );
        assert_eq!(
            bools("s >= 'abc'"),
            vec![Some(false), Some(true), Some(true), Some(true)]
        );
        assert_eq!(bools("b = null"), vec![None, None, None, None]);
        assert_eq!(bools("1 < 2"), vec![Some(true); 4]);
    }

    #[test]
    fn logic_is_three_valued() {
        assert_eq!(bools("f or true"), vec![Some(true); 4]);
        assert_eq!(bools("f and false"), vec![Some(false); 4]);
        assert_eq!(
            bools("f and true"),
            vec![Some(true), Some(false), None, None]
        );
        assert_eq!(bools("not f"), vec![Some(false), Some(true), None, None]);
        assert_eq!(
            bools("a > 0 and not (s = 'z')"),
            vec![Some(true), None, Some(false), Some(false)]
        );
    }

    #[test]
    fn literals_are_widened_to_the_batch_length() {
        assert_eq!(ints("1 + 2"), vec![Some(3); 4]);
        assert_eq!(eval("null").expect("valid").len(), 4);
    }

    #[test]
    fn integer_division_by_zero_is_an_error_naming_the_expression() {
        let error = eval("a / (b - b)")
            .expect_err("divides by zero")
            .to_string();
        assert!(error.contains("division by zero in a / (b - b)"), "{error}");
        assert!(matches!(eval("a % 0"), Err(ExprError::DivideByZero { .. })));
    }

    #[test]
    fn null_divisors_do_not_count_as_zero() {
        assert_eq!(ints("b / a"), vec![Some(0), None, None, Some(0)]);
    }

    #[test]
    fn integer_overflow_is_an_error_naming_the_expression() {
        let error = eval("b + a * 2").expect_err("overflows").to_string();
        assert!(error.contains("integer overflow in a * 2"), "{error}");
        assert!(matches!(eval("a + 1"), Err(ExprError::Overflow { .. })));
        assert!(matches!(
            eval("-(a - a - 9223372036854775807 - 1)"),
            Err(ExprError::Overflow { .. })
        ));
    }

    #[test]
    fn type_check_reports_the_operand_types() {
        let schema = batch().schema();
        let cases = [
            ("a > 'abc'", "'>' compares Int64 with Utf8"),
            ("s + 1", "'+' needs numeric operands, found Utf8 and Int64"),
            (
                "a and f",
                "'and' needs Boolean operands, found Int64 and Boolean",
            ),
            ("not a", "'not' needs a Boolean operand, found Int64"),
            ("-s", "'-' needs a signed numeric operand, found Utf8"),
            (
                "vlaue + 1",
                "column 'vlaue' not found; input columns are a, b, x, s, f",
            ),
        ];
        for (text, message) in cases {
            let error = Expr::parse(text)
                .expect("valid syntax")
                .data_type(&schema)
                .expect_err(text);
            assert_eq!(error.to_string(), message, "{text}");
        }
    }

    #[test]
    fn type_check_agrees_with_evaluation() {
        let batch = batch();
        for text in [
            "a + x",
            "b * 2",
            "s = 'a'",
            "null + 1",
            "-x",
            "f or null",
            "a % b",
            "x > 1",
        ] {
            let expr = Expr::parse(text).expect("valid syntax");
            let data_type = expr.data_type(&batch.schema()).expect("well typed");
            let array = expr.eval(&batch).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(array.data_type(), &data_type, "{text}");
            assert_eq!(array.len(), batch.num_rows(), "{text}");
        }
    }

    #[test]
    fn nullability_follows_the_inputs() {
        let schema = batch().schema();
        let nullable = |text: &str| Expr::parse(text).expect("valid syntax").nullable(&schema);
        assert!(!nullable("x * 2 + 1"));
        assert!(nullable("x + a"));
        assert!(nullable("x + null"));
    }
}
