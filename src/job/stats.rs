//! The artifact of a `standardize`'s fit: each column's mean and population
//! standard deviation, as a small JSON file that later runs (inference,
//! validation data) read back with `fit = "none"`.
//!
//! ```json
//! {"format": "strata-standardize-v1", "rows": 1000,
//!  "columns": {"value": {"count": 990, "mean": 12.5, "std": 3.25, "variance": 10.5625}}}
//! ```
//! `count` is the number of values counted (nulls and NaNs are not);
//! `std` is the population standard deviation (scikit-learn's
//! `StandardScaler`), 0 for a constant column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const STATS_FORMAT: &str = "strata-standardize-v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnFit {
    pub count: u64,
    pub mean: f64,
    pub std: f64,
    /// `std` squared (population variance), for readers that want it; the
    /// transform uses `std`.
    #[serde(default)]
    pub variance: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsArtifact {
    pub format: String,
    /// Rows the fit saw.
    pub rows: u64,
    pub columns: BTreeMap<String, ColumnFit>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("standardize statistics {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("standardize statistics {}: not a strata statistics file: {detail}", .path.display())]
    Format { path: PathBuf, detail: String },
    #[error(
        "standardize statistics {}: no column '{column}' (it has {}); fit it first (fit = \"input\")",
        .path.display(),
        .available.join(", ")
    )]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: Vec<String>,
    },
}

impl StatsArtifact {
    pub fn read(path: &Path) -> Result<Self, StatsError> {
        let text = std::fs::read_to_string(path).map_err(|source| StatsError::Io {
            path: path.to_owned(),
            source,
        })?;
        let artifact: StatsArtifact =
            serde_json::from_str(&text).map_err(|e| StatsError::Format {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
        if artifact.format != STATS_FORMAT {
            return Err(StatsError::Format {
                path: path.to_owned(),
                detail: format!("format '{}', expected '{STATS_FORMAT}'", artifact.format),
            });
        }
        Ok(artifact)
    }

    /// Writes the artifact atomically (a temporary file renamed over it),
    /// creating the directory.
    pub fn write(&self, path: &Path) -> Result<(), StatsError> {
        let io = |source| StatsError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| StatsError::Format {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The fit of each of `columns`, in order.
    pub fn columns(&self, path: &Path, columns: &[String]) -> Result<Vec<ColumnFit>, StatsError> {
        columns
            .iter()
            .map(|c| {
                self.columns
                    .get(c)
                    .cloned()
                    .ok_or_else(|| StatsError::MissingColumn {
                        path: path.to_owned(),
                        column: c.clone(),
                        available: self.columns.keys().cloned().collect(),
                    })
            })
            .collect()
    }
}
