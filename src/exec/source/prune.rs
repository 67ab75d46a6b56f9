//! Predicate pushdown for the Parquet source: which row groups, and which
//! pages of a row group, may hold a row that the filter after the source
//! keeps, judged from min/max statistics.
//!
//! Only comparisons of a 32- or 64-bit integer column with an integer
//! literal are judged (float statistics leave NaN out, and the filter's
//! comparison orders NaN above every number); anything else may match.
//! A null never satisfies a comparison, so an all-null range never matches.

use std::collections::HashMap;

use arrow_schema::{DataType, Schema};
use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use parquet::file::metadata::{ParquetMetaData, RowGroupMetaData};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::statistics::Statistics;

use crate::job::{BinOp, Expr, ScalarValue};

/// What statistics say about one column over a range of rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Range {
    pub min: Option<i64>,
    pub max: Option<i64>,
    /// Every value in the range is null.
    pub all_null: bool,
}

/// Whether a row for which `lookup` describes the columns may satisfy
/// `expr` (false only when the statistics prove it cannot).
pub(super) fn may_match(expr: &Expr, lookup: &dyn Fn(&str) -> Option<Range>) -> bool {
    match expr {
        Expr::Binary { op, left, right } => match op {
            BinOp::And => may_match(left, lookup) && may_match(right, lookup),
            BinOp::Or => may_match(left, lookup) || may_match(right, lookup),
            op => match comparison(*op, left, right) {
                Some((column, op, literal)) => match lookup(column) {
                    Some(range) => range_may_match(range, op, literal),
                    None => true,
                },
                None => true,
            },
        },
        _ => true,
    }
}

/// `column <op> literal`, with the operands turned around when the literal
/// comes first.
fn comparison<'a>(op: BinOp, left: &'a Expr, right: &'a Expr) -> Option<(&'a str, BinOp, i64)> {
    match (left, right) {
        (Expr::Column(c), Expr::Literal(ScalarValue::Int64(v))) => Some((c, op, *v)),
        (Expr::Literal(ScalarValue::Int64(v)), Expr::Column(c)) => {
            let flipped = match op {
                BinOp::Lt => BinOp::Gt,
                BinOp::LtEq => BinOp::GtEq,
                BinOp::Gt => BinOp::Lt,
                BinOp::GtEq => BinOp::LtEq,
                other => other,
            };
            Some((c, flipped, *v))
        }
        _ => None,
    }
}

fn range_may_match(range: Range, op: BinOp, v: i64) -> bool {
    if range.all_null {
        return false;
    }
    let (Some(min), Some(max)) = (range.min, range.max) else {
        return true;
    };
    match op {
        BinOp::Eq => min <= v && v <= max,
        BinOp::NotEq => !(min == v && max == v),
        BinOp::Lt => min < v,
        BinOp::LtEq => min <= v,
        BinOp::Gt => max > v,
        BinOp::GtEq => max >= v,
        _ => true,
    }
}

/// The leaf column index of each integer column of `schema` by name, for
/// the columns `predicate` names (flat columns only).
pub(super) fn integer_columns(
    predicate: &Expr,
    schema: &Schema,
    metadata: &ParquetMetaData,
) -> HashMap<String, usize> {
    let descr = metadata.file_metadata().schema_descr();
    predicate
        .columns()
        .into_iter()
        .filter(|name| {
            schema
                .field_with_name(name)
                .is_ok_and(|f| matches!(f.data_type(), DataType::Int32 | DataType::Int64))
        })
        .filter_map(|name| {
            let leaf = (0..descr.num_columns()).find(|&i| {
                let path = descr.column(i).path().parts().to_vec();
                path.len() == 1 && path[0] == name
            })?;
            Some((name.to_owned(), leaf))
        })
        .collect()
}

/// Whether row group `rg` may hold a matching row.
pub(super) fn row_group_may_match(
    predicate: &Expr,
    columns: &HashMap<String, usize>,
    rg: &RowGroupMetaData,
) -> bool {
    let rows = u64::try_from(rg.num_rows()).unwrap_or(0);
    may_match(predicate, &|name| {
        let stats = rg.column(*columns.get(name)?).statistics()?;
        let all_null = stats.null_count_opt() == Some(rows) && rows > 0;
        let (min, max) = match stats {
            Statistics::Int32(s) => (
                s.min_opt().map(|v| i64::from(*v)),
                s.max_opt().map(|v| i64::from(*v)),
            ),
            Statistics::Int64(s) => (s.min_opt().copied(), s.max_opt().copied()),
            _ => return None,
        };
        Some(Range { min, max, all_null })
    })
}

/// The rows of row group `rg` that may match, from the page index: for each
/// top-level conjunct of `predicate` on an integer column, the pages whose
/// statistics may match; `None` when the file has no page index or nothing
/// is skipped.
pub(super) fn page_selection(
    predicate: &Expr,
    columns: &HashMap<String, usize>,
    metadata: &ParquetMetaData,
    rg: usize,
) -> Option<RowSelection> {
    let page_index = metadata.page_index_for_row_group(rg);
    let rows = usize::try_from(metadata.row_group(rg).num_rows()).ok()?;
    let mut keep = vec![true; rows];
    let mut conjuncts = Vec::new();
    flatten_and(predicate, &mut conjuncts);
    let mut skipped_any = false;
    for conjunct in conjuncts {
        let Expr::Binary { op, left, right } = conjunct else {
            continue;
        };
        let Some((name, op, literal)) = comparison(*op, left, right) else {
            continue;
        };
        let Some(&leaf) = columns.get(name) else {
            continue;
        };
        let (Some(index), Some(offsets)) =
            (page_index.column_index(leaf), page_index.offset_index(leaf))
        else {
            continue;
        };
        let pages = offsets.page_locations();
        for (page, location) in pages.iter().enumerate() {
            let range = match index {
                ColumnIndexMetaData::INT32(ix) => Range {
                    min: ix.min_value(page).map(|v| i64::from(*v)),
                    max: ix.max_value(page).map(|v| i64::from(*v)),
                    all_null: ix.is_null_page(page),
                },
                ColumnIndexMetaData::INT64(ix) => Range {
                    min: ix.min_value(page).copied(),
                    max: ix.max_value(page).copied(),
                    all_null: ix.is_null_page(page),
                },
                _ => break,
            };
            if range_may_match(range, op, literal) {
                continue;
            }
            let first = usize::try_from(location.first_row_index).ok()?.min(rows);
            let end = pages
                .get(page + 1)
                .and_then(|next| usize::try_from(next.first_row_index).ok())
                .unwrap_or(rows)
                .min(rows);
            keep[first..end].iter_mut().for_each(|k| *k = false);
            skipped_any = true;
        }
    }
    skipped_any.then(|| selection_of(&keep))
}

fn flatten_and<'a>(expr: &'a Expr, out: &mut Vec<&'a Expr>) {
    match expr {
        Expr::Binary {
            op: BinOp::And,
            left,
            right,
        } => {
            flatten_and(left, out);
            flatten_and(right, out);
        }
        other => out.push(other),
    }
}

/// Runs of kept and skipped rows.
fn selection_of(keep: &[bool]) -> RowSelection {
    let mut selectors: Vec<RowSelector> = Vec::new();
    let mut start = 0;
    while start < keep.len() {
        let value = keep[start];
        let run = keep[start..].iter().take_while(|&&k| k == value).count();
        selectors.push(if value {
            RowSelector::select(run)
        } else {
            RowSelector::skip(run)
        });
        start += run;
    }
    RowSelection::from(selectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(min: i64, max: i64) -> Option<Range> {
        Some(Range {
            min: Some(min),
            max: Some(max),
            all_null: false,
        })
    }

    #[test]
    fn comparisons_prune_only_what_statistics_exclude() {
        let cases = [
            ("v >= 10", (0, 9), false),
            ("v >= 10", (0, 10), true),
            ("10 <= v", (0, 9), false),
            ("v < 5", (5, 9), false),
            ("v = 7", (8, 9), false),
            ("v != 3", (3, 3), false),
            ("v != 3", (3, 4), true),
            ("v > 1 and w < 0", (0, 9), true),
            ("v > 100 or v < 0", (0, 9), false),
            ("v > 100 or x < 0", (0, 9), true),
            ("v + 1 > 100", (0, 9), true),
            ("not (v > 100)", (0, 9), true),
        ];
        for (text, (min, max), expected) in cases {
            let expr = Expr::parse(text).expect("parse");
            let lookup = |name: &str| if name == "v" { range(min, max) } else { None };
            assert_eq!(
                may_match(&expr, &lookup),
                expected,
                "{text} over {min}..={max}"
            );
        }
    }

    #[test]
    fn an_all_null_range_never_matches_a_comparison() {
        let expr = Expr::parse("v != 1").expect("parse");
        let lookup = |_: &str| {
            Some(Range {
                min: None,
                max: None,
                all_null: true,
            })
        };
        assert!(!may_match(&expr, &lookup));
    }

    #[test]
    fn selection_runs() {
        let s = selection_of(&[true, true, false, false, false, true]);
        let runs: Vec<(bool, usize)> = Vec::from(s)
            .into_iter()
            .map(|r| (r.skip, r.row_count))
            .collect();
        assert_eq!(runs, vec![(false, 2), (true, 3), (false, 1)]);
    }
}
