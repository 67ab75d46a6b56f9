//! Projection pushdown into CSV, Parquet and Arrow IPC sources, and
//! predicate pushdown into Parquet sources.
//!
//! After a first planning pass, each Parquet source learns which of its
//! columns the operators downstream use (walking the graph from the sinks
//! back to the sources) and, when its only consumer is a filter, that
//! filter's predicate. The source then decodes only those columns and skips
//! row groups (and, with a page index, pages) whose statistics prove the
//! predicate false for every row. The filter still runs on every row that
//! is read: pushdown only saves work, it never decides a result.

use std::collections::BTreeSet;

use super::plan::LogicalPlan;
use super::spec::{JobSpec, OperatorKind};

/// Columns an operator's consumers need from its output: `None` for all.
type Needed = Option<BTreeSet<String>>;

fn union(a: Needed, b: Needed) -> Needed {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.extend(b);
            Some(a)
        }
        _ => None,
    }
}

/// The spec with pushdown applied to its Parquet sources, or `None` when
/// nothing changes (no Parquet source, or every column is used and no
/// filter follows).
pub(super) fn push_down(plan: &LogicalPlan) -> Option<JobSpec> {
    let ops = &plan.spec.operators;
    if !ops.iter().any(|op| {
        matches!(
            op.kind,
            OperatorKind::ParquetSource(_)
                | OperatorKind::CsvSource(_)
                | OperatorKind::ArrowIpcSource(_)
        )
    }) {
        return None;
    }
    // Consumers come after their inputs (file order), so one backward pass
    // sees every consumer of an operator before the operator itself.
    let mut needed: Vec<Needed> = vec![Some(BTreeSet::new()); ops.len()];
    let mut consumers = vec![0usize; ops.len()];
    for index in (0..ops.len()).rev() {
        let op = &ops[index];
        let Some(input) = op.input else { continue };
        consumers[input] += 1;
        let own = needed[index].take();
        let key_names = || -> BTreeSet<String> {
            let schema = &plan.schemas[input];
            plan.keyed[input]
                .iter()
                .flatten()
                .filter_map(|&k| schema.fields().get(k).map(|f| f.name().clone()))
                .collect()
        };
        let from_input: Needed = match &op.kind {
            OperatorKind::Filter { predicate } => union(own, Some(names(predicate.columns()))),
            OperatorKind::KeyBy { keys } => union(own, Some(keys.iter().cloned().collect())),
            OperatorKind::Sort { keys, .. } => {
                union(own, Some(keys.iter().map(|k| k.column.clone()).collect()))
            }
            OperatorKind::Project { columns } => Some(
                columns
                    .iter()
                    .flat_map(|c| c.expr.columns())
                    .map(str::to_owned)
                    .collect(),
            ),
            OperatorKind::Aggregate { aggs } => {
                let mut set = key_names();
                set.extend(aggs.iter().filter_map(|a| a.column.clone()));
                Some(set)
            }
            OperatorKind::Window {
                time_column, aggs, ..
            } => {
                let mut set = key_names();
                set.insert(time_column.clone());
                set.extend(aggs.iter().filter_map(|a| a.column.clone()));
                Some(set)
            }
            // Sinks write (or count) whole rows; sources have no input.
            _ => None,
        };
        needed[input] = union(needed[input].take(), from_input);
    }
    let mut spec = plan.spec.clone();
    let mut changed = false;
    for (index, op) in spec.operators.iter_mut().enumerate() {
        let schema = &plan.schemas[index];
        if let OperatorKind::CsvSource(csv) = &mut op.kind {
            if let Some(kept) = kept_columns(&needed[index], csv.watermark.as_ref(), schema) {
                csv.columns = Some(kept);
                changed = true;
            }
            continue;
        }
        if let OperatorKind::ArrowIpcSource(ipc) = &mut op.kind {
            if let Some(kept) = kept_columns(&needed[index], ipc.watermark.as_ref(), schema) {
                ipc.columns = Some(kept);
                changed = true;
            }
            continue;
        }
        let OperatorKind::ParquetSource(parquet) = &mut op.kind else {
            continue;
        };
        if let Some(kept) = kept_columns(&needed[index], parquet.watermark.as_ref(), schema) {
            parquet.columns = Some(kept);
            changed = true;
        }
        // The filter right after the source: its predicate prunes row
        // groups and pages, when it is the source's only consumer.
        if consumers[index] == 1
            && let Some(OperatorKind::Filter { predicate }) = plan
                .spec
                .operators
                .iter()
                .find(|c| c.input == Some(index))
                .map(|c| &c.kind)
        {
            parquet.prune = Some(predicate.clone());
            changed = true;
        }
    }
    changed.then_some(spec)
}

/// The columns of `schema` to keep for `needed` (and the watermark's),
/// when that is fewer than all and more than none.
fn kept_columns(
    needed: &Needed,
    watermark: Option<&super::spec::WatermarkSpec>,
    schema: &arrow_schema::Schema,
) -> Option<Vec<String>> {
    let mut set = needed.clone()?;
    if let Some(w) = watermark {
        set.insert(w.column.clone());
    }
    let kept: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|name| set.contains(name))
        .collect();
    (!kept.is_empty() && kept.len() < schema.fields().len()).then_some(kept)
}

fn names(columns: Vec<&str>) -> BTreeSet<String> {
    columns.into_iter().map(str::to_owned).collect()
}
