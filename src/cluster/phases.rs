//! Fit phases: a `standardize` whose statistics are fitted (`fit =
//! "input"` or `fit = "<operator>"`) needs them before its job starts, and
//! they depend on the whole bounded input. The client therefore runs, for
//! each such operator and in file order, a fit job first: the operators
//! upstream of the fitted data, unchanged (same seeds, same parallelism,
//! so the same rows), ending in a `standardize_fit` that writes the
//! artifact. The job itself then reads the artifact (see `job::stats`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::job::{FitSource, JobError, JobSpec, OperatorKind, parse_job};

/// One fit job to run before the job.
#[derive(Debug, Clone)]
pub struct FitPhase {
    /// The `standardize` operator it fits.
    pub operator: String,
    /// The operator whose whole output it fits over.
    pub fitted: String,
    pub columns: Vec<String>,
    pub stats: PathBuf,
    pub job_name: String,
    pub job_text: String,
}

/// The fit phases `text` (the job file at `path`) needs, in the order to
/// run them; none when no `standardize` fits.
pub fn fit_phases(text: &str, path: &Path) -> Result<Vec<FitPhase>, JobError> {
    let spec = parse_job(text, path)?;
    let fits: Vec<usize> = spec
        .operators
        .iter()
        .enumerate()
        .filter(|(_, op)| {
            matches!(
                op.kind,
                OperatorKind::Standardize {
                    fit: FitSource::Input | FitSource::Operator(_),
                    ..
                }
            )
        })
        .map(|(i, _)| i)
        .collect();
    if fits.is_empty() {
        return Ok(Vec::new());
    }
    let document: toml::Table = toml::from_str(text).map_err(|e| JobError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let mut phases: Vec<FitPhase> = Vec::new();
    for index in fits {
        let phase = fit_phase(&spec, &document, index)?;
        // Two operators fitting the same columns of the same data into the
        // same artifact (train and validation both fitted on train) share
        // one phase.
        let same = |p: &FitPhase| {
            p.fitted == phase.fitted && p.columns == phase.columns && p.stats == phase.stats
        };
        if !phases.iter().any(same) {
            phases.push(phase);
        }
    }
    Ok(phases)
}

fn fit_phase(spec: &JobSpec, document: &toml::Table, index: usize) -> Result<FitPhase, JobError> {
    let op = &spec.operators[index];
    let OperatorKind::Standardize {
        columns,
        stats,
        fit,
    } = &op.kind
    else {
        unreachable!("fit phases are built for standardize operators")
    };
    let target = match fit {
        FitSource::Operator(target) => *target,
        _ => op.input.ok_or(JobError::MissingInput {
            kind: "standardize",
        })?,
    };
    // The fitted operator and everything upstream of it, as file tables.
    let mut tables = BTreeSet::new();
    let mut at = Some(target);
    while let Some(i) = at {
        tables.insert(spec.operators[i].table);
        at = spec.operators[i].input;
    }
    let originals = document
        .get("operator")
        .and_then(toml::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut operators = Vec::new();
    for position in tables {
        let Some(toml::Value::Table(mut table)) = originals.get(position).cloned() else {
            continue;
        };
        let Some(first) = spec.operators.iter().find(|o| o.table == position) else {
            continue;
        };
        // Inputs made explicit: the tables in between are left out.
        if let Some(input) = first.input {
            table.insert(
                "input".into(),
                toml::Value::String(spec.operators[input].name.clone()),
            );
        }
        // An earlier standardize reads what its own (earlier) phase wrote.
        if matches!(first.kind, OperatorKind::Standardize { .. }) {
            table.insert("fit".into(), toml::Value::String("none".into()));
        }
        operators.push(toml::Value::Table(table));
    }
    let mut fit_sink = toml::Table::new();
    fit_sink.insert(
        "name".into(),
        toml::Value::String(format!("{}.fit", op.name)),
    );
    fit_sink.insert("type".into(), toml::Value::String("standardize_fit".into()));
    fit_sink.insert(
        "input".into(),
        toml::Value::String(spec.operators[target].name.clone()),
    );
    fit_sink.insert(
        "columns".into(),
        toml::Value::Array(columns.iter().cloned().map(toml::Value::String).collect()),
    );
    fit_sink.insert(
        "stats".into(),
        toml::Value::String(stats.to_string_lossy().into_owned()),
    );
    operators.push(toml::Value::Table(fit_sink));
    let mut job = document
        .get("job")
        .and_then(toml::Value::as_table)
        .cloned()
        .unwrap_or_default();
    let job_name = format!("{}.fit-{}", spec.name, op.name);
    job.insert("name".into(), toml::Value::String(job_name.clone()));
    let mut fit_document = toml::Table::new();
    fit_document.insert("job".into(), toml::Value::Table(job));
    fit_document.insert("operator".into(), toml::Value::Array(operators));
    let job_text = toml::to_string(&fit_document).map_err(|e| JobError::Io {
        path: spec.file.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(FitPhase {
        operator: op.name.clone(),
        fitted: spec.operators[target].name.clone(),
        columns: columns.clone(),
        stats: stats.clone(),
        job_name,
        job_text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fit_phase_keeps_only_the_upstream_operators_with_explicit_inputs() {
        let text = r#"
[job]
name = "ml"
parallelism = 2

[[operator]]
name = "events"
type = "datagen"
rows = 1000

[[operator]]
name = "split"
type = "split"
columns = ["key"]
outputs = { train = 0.8, validation = 0.2 }

[[operator]]
name = "train-scaled"
type = "standardize"
input = "split.train"
columns = ["value"]
stats = "target/stats.json"

[[operator]]
name = "val-scaled"
type = "standardize"
input = "split.validation"
columns = ["value"]
stats = "target/stats.json"
fit = "split.train"

[[operator]]
name = "out"
type = "blackhole"
input = "val-scaled"
"#;
        let phases = fit_phases(text, Path::new("ml.toml")).expect("phases");
        // Both fit the training side into one artifact: one phase.
        assert_eq!(phases.len(), 1);
        let first = &phases[0];
        assert_eq!(first.fitted, "split.train");
        let parsed = parse_job(&first.job_text, Path::new("fit.toml")).expect("fit job parses");
        let names: Vec<&str> = parsed.operators.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "events",
                "split.train",
                "split.validation",
                "train-scaled.fit"
            ]
        );
        assert_eq!(parsed.default_parallelism, Some(2));
        let fit = parsed.operators.last().expect("fit sink");
        assert_eq!(fit.input, Some(1), "fits the training side");
        assert!(matches!(fit.kind, OperatorKind::StandardizeFit { .. }));
    }
}
