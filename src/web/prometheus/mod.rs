//! `/metrics`: the cluster snapshot as Prometheus metrics.
//!
//! Every scrape builds a fresh `prometheus_client` [`Registry`] from one
//! [`ClusterSnapshot`] and encodes it. Nothing is kept between scrapes: the
//! JobManager already holds the numbers (heartbeats and task reports), so a
//! second set of live metric objects would only be a copy to keep in step,
//! and a job or TaskManager that leaves the snapshot leaves the exposition
//! with it. The crate owns the format: names, `_total` and unit suffixes,
//! label escaping, float formatting.
//!
//! Names follow Flink's scopes as its Prometheus reporter exports them
//! (`flink_jobmanager_job_numRestarts`,
//! `flink_taskmanager_job_task_numBytesInRemote`), with `strata_` for
//! `flink_` and Flink's label names (`job_id`, `job_name`, `task_name`,
//! `subtask_index`, `tm_id`):
//!
//! - `strata_jobmanager_*`: the cluster as the JobManager sees it;
//! - `strata_taskmanager_*` {`tm_id`}: each registered TaskManager;
//! - `strata_jobmanager_job_*` {`job_id`, `job_name`}: each running job and
//!   the ended ones the JobManager keeps (the last 100), summed over the
//!   job's tasks;
//! - `strata_taskmanager_job_task_*` {…, `task_name`, `subtask_index`,
//!   `tm_id`, `transport`}: each task of a running job;
//! - `strata_taskmanager_job_task_operator_*` {…, `operator_name`}: each
//!   operator of a running job, summed over its subtasks.
//!
//! Where Flink's name carries no unit, the unit is declared (OpenMetrics'
//! `# UNIT`) and ends the name, in base units: `lastCheckpointSize_bytes`,
//! `lastCheckpointDuration_seconds`. Counters end in `_total`, as both text
//! formats want. Pool usages are ratios from 0 to 1, as in Flink.
//!
//! Two formats, chosen from the scrape's `Accept` header as the Go client's
//! `promhttp` does: OpenMetrics 1.0 (with `# UNIT` lines and `# EOF`) for a
//! scraper that asks for it, which Prometheus does; otherwise the Prometheus
//! text format 0.0.4 (curl, older scrapers).

mod cluster;
mod jobs;
mod tasks;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::protocol::{ClusterSnapshot, JobSummary};

/// The `Content-Type` of an OpenMetrics 1.0 exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which text format a scrape gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0: `# UNIT` lines and a closing `# EOF`.
    OpenMetrics,
    /// The Prometheus text format, version 0.0.4.
    PrometheusText,
}

impl Format {
    /// OpenMetrics when the scraper's `Accept` header lists it, else the
    /// 0.0.4 text format, which every scraper reads.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::PrometheusText => prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Renders every metric of the snapshot in `format`.
pub fn render(s: &ClusterSnapshot, format: Format) -> String {
    let registry = registry(s);
    let mut out = String::new();
    let encoded = match format {
        Format::OpenMetrics => text::encode(&mut out, &registry),
        Format::PrometheusText => prometheus_text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail, and no label set here fails to
    // encode: an error is a bug in this module or the crate.
    encoded.expect("encoding the metrics into a String");
    out
}

/// One registry with every family, in the order the exposition lists them.
fn registry(s: &ClusterSnapshot) -> Registry {
    let mut r = Registry::default();
    cluster::register_cluster(&mut r, s);
    cluster::register_taskmanagers(&mut r, &s.taskmanagers);
    let jobs: Vec<&JobSummary> = s.running.iter().chain(&s.completed).collect();
    jobs::register_jobs(&mut r, &jobs);
    jobs::register_running_jobs(&mut r, &s.running);
    tasks::register_tasks(&mut r, &s.running);
    tasks::register_operators(&mut r, &s.running);
    r
}

pub(super) type Count = Counter<u64>;
pub(super) type CountF64 = Counter<f64, AtomicU64>;
pub(super) type GaugeU64 = Gauge<u64, AtomicU64>;
pub(super) type GaugeF64 = Gauge<f64, AtomicU64>;

/// Registers `metric` as `name`, suffixed with `unit` when there is one,
/// and returns it to be filled. (The crate ends `help` with a period.)
pub(super) fn register<M: Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(unit) => r.register_with_unit(name, help, unit, metric.clone()),
        None => r.register(name, help, metric.clone()),
    }
    metric
}

/// A new labelled family, registered.
pub(super) fn family<L, M>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<L, M>
where
    Family<L, M>: Metric + Clone + Default,
{
    register(r, name, help, unit, Family::default())
}

pub(super) fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

pub(super) fn ratio(permille: u64) -> f64 {
    permille as f64 / 1000.0
}
