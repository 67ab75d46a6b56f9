//! The throughput history behind the web UI's chart: a bounded ring of
//! samples per job, so that a page opened during a job draws the last
//! minutes at once instead of starting empty.
//!
//! [`ThroughputHistory::record`] takes one [`ClusterSnapshot`]; each running
//! job whose clock advanced gets a sample with its row counters and the
//! rates since its previous sample. Time is the job's own `wall_ms` (the
//! JobManager's clock since submission), so this type reads no clock and
//! the caller decides how often to sample (the REST server: every
//! [`SAMPLE_INTERVAL`]).
//!
//! Limits: [`SAMPLES_MAX`] samples per job (the oldest go first) and
//! [`JOBS_MAX`] jobs (ended jobs' histories go first, oldest end first,
//! then the least recently sampled running jobs). A restart resets a job's
//! task counters: the sample after it shows a rate of 0, never a negative
//! one.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::protocol::{ClusterSnapshot, JobId, JobSummary};

/// Samples kept per job: five minutes at one a second.
pub const SAMPLES_MAX: usize = 300;
/// Jobs with a history: every running one up to this, plus the latest ended.
pub const JOBS_MAX: usize = 64;
/// How often the REST server samples the cluster.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// One point of a job's chart.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// The job's age when sampled (ms since submission).
    pub wall_ms: u64,
    pub rows_in: u64,
    pub rows_out: u64,
    /// Rates since the previous sample (the first: since submission).
    pub rows_in_per_second: f64,
    pub rows_out_per_second: f64,
}

/// What `/jobs/{id}/throughput` answers.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputReport {
    #[serde(with = "crate::protocol::ids::hex")]
    pub job: JobId,
    pub samples_max: usize,
    pub interval_ms: u64,
    /// Whether the job still runs (an ended job's history stays until
    /// newer ones push it out).
    pub running: bool,
    /// Oldest first.
    pub samples: Vec<Sample>,
    /// Each vertex's input rows per second over the last interval.
    pub vertex_rows_per_second: Vec<f64>,
}

struct JobHistory {
    samples: VecDeque<Sample>,
    vertex_rows: Vec<u64>,
    vertex_rows_per_second: Vec<f64>,
    running: bool,
    /// The `record` round that last touched it, for eviction order.
    touched: u64,
}

/// Bounded per-job throughput histories.
pub struct ThroughputHistory {
    jobs: BTreeMap<JobId, JobHistory>,
    samples_max: usize,
    jobs_max: usize,
    round: u64,
}

impl Default for ThroughputHistory {
    fn default() -> Self {
        Self::new(SAMPLES_MAX, JOBS_MAX)
    }
}

impl ThroughputHistory {
    pub fn new(samples_max: usize, jobs_max: usize) -> Self {
        assert!(samples_max > 0 && jobs_max > 0);
        Self {
            jobs: BTreeMap::new(),
            samples_max,
            jobs_max,
            round: 0,
        }
    }

    /// Samples every running job of `snapshot`; marks the others ended.
    pub fn record(&mut self, snapshot: &ClusterSnapshot) {
        self.round += 1;
        for job in &snapshot.running {
            self.record_job(job);
        }
        for history in self.jobs.values_mut() {
            if history.touched != self.round && history.running {
                history.running = false;
                history.touched = self.round;
            }
        }
        while self.jobs.len() > self.jobs_max {
            let victim = self
                .jobs
                .iter()
                .min_by_key(|(_, h)| (h.running, h.touched))
                .map(|(&id, _)| id)
                .expect("more than jobs_max > 0 histories");
            self.jobs.remove(&victim);
        }
        debug_assert!(
            self.jobs
                .values()
                .all(|h| h.samples.len() <= self.samples_max)
        );
    }

    fn record_job(&mut self, job: &JobSummary) {
        let vertex_rows: Vec<u64> = job.vertices.iter().map(|v| v.metrics.rows_in).collect();
        let history = self.jobs.entry(job.job).or_insert_with(|| JobHistory {
            samples: VecDeque::with_capacity(self.samples_max),
            vertex_rows: vec![0; vertex_rows.len()],
            vertex_rows_per_second: vec![0.0; vertex_rows.len()],
            running: true,
            touched: 0,
        });
        history.touched = self.round;
        history.running = true;
        let (since_ms, rows_in, rows_out) = history
            .samples
            .back()
            .map_or((0, 0, 0), |s| (s.wall_ms, s.rows_in, s.rows_out));
        if job.wall_ms <= since_ms && !history.samples.is_empty() {
            return; // The job's clock has not moved: nothing new to say.
        }
        let seconds = (job.wall_ms - since_ms).max(1) as f64 / 1000.0;
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
        if history.vertex_rows.len() != vertex_rows.len() {
            history.vertex_rows = vec![0; vertex_rows.len()];
        }
        history.vertex_rows_per_second = vertex_rows
            .iter()
            .zip(&history.vertex_rows)
            .map(|(&now, &before)| rate(now, before))
            .collect();
        history.vertex_rows = vertex_rows;
        if history.samples.len() == self.samples_max {
            history.samples.pop_front();
        }
        history.samples.push_back(Sample {
            wall_ms: job.wall_ms,
            rows_in: job.rows_in,
            rows_out: job.rows_out,
            rows_in_per_second: rate(job.rows_in, rows_in),
            rows_out_per_second: rate(job.rows_out, rows_out),
        });
    }

    /// `job`'s history, if it has one.
    pub fn report(&self, job: JobId) -> Option<ThroughputReport> {
        let history = self.jobs.get(&job)?;
        Some(ThroughputReport {
            job,
            samples_max: self.samples_max,
            interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
            running: history.running,
            samples: history.samples.iter().cloned().collect(),
            vertex_rows_per_second: history.vertex_rows_per_second.clone(),
        })
    }

    /// Jobs with a history.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{JobState, VertexMetrics, VertexSummary};

    fn job(id: u64, wall_ms: u64, rows_in: u64) -> JobSummary {
        let mut summary: JobSummary = serde_json::from_value(serde_json::json!({
            "job": format!("{id:016x}"), "name": "j", "state": "Running", "reason": null,
            "wall_ms": wall_ms, "rows_in": rows_in, "rows_out": rows_in / 2,
            "vertices": [], "remote_bytes": 0, "remote_buffers": 0, "local_rows": 0,
            "backpressure_ms": 0, "late_rows": 0, "managed_peak_bytes": 0,
            "transport": "local", "io": [], "taskmanagers": 1, "slots": 1,
        }))
        .expect("a summary");
        summary.state = JobState::Running;
        summary.vertices.push(VertexSummary {
            metrics: VertexMetrics {
                rows_in,
                ..VertexMetrics::default()
            },
            ..VertexSummary::default()
        });
        summary
    }

    fn snapshot(running: Vec<JobSummary>) -> ClusterSnapshot {
        ClusterSnapshot {
            taskmanagers: vec![],
            running,
            completed: vec![],
        }
    }

    #[test]
    fn rates_are_row_deltas_over_the_job_clock() {
        let mut h = ThroughputHistory::default();
        h.record(&snapshot(vec![job(1, 1000, 500)]));
        h.record(&snapshot(vec![job(1, 1000, 500)])); // clock did not move
        h.record(&snapshot(vec![job(1, 3000, 4500)]));
        let r = h.report(JobId(1)).expect("a history");
        assert_eq!(r.samples.len(), 2);
        assert_eq!(r.samples[0].rows_in_per_second, 500.0);
        assert_eq!(r.samples[1].rows_in_per_second, 2000.0);
        assert_eq!(r.samples[1].rows_out_per_second, 1000.0);
        assert_eq!(r.vertex_rows_per_second, [2000.0]);
        assert!(r.running);
    }

    #[test]
    fn a_restart_that_resets_counters_shows_a_zero_rate() {
        let mut h = ThroughputHistory::default();
        h.record(&snapshot(vec![job(1, 1000, 5000)]));
        h.record(&snapshot(vec![job(1, 2000, 100)]));
        let r = h.report(JobId(1)).expect("a history");
        assert_eq!(r.samples[1].rows_in_per_second, 0.0);
    }

    #[test]
    fn history_never_exceeds_samples_max_and_keeps_the_newest() {
        let mut h = ThroughputHistory::new(300, 4);
        for i in 1..=1000 {
            h.record(&snapshot(vec![job(1, i * 1000, i * 10)]));
        }
        let r = h.report(JobId(1)).expect("a history");
        assert_eq!(r.samples.len(), 300);
        assert_eq!(r.samples.first().map(|s| s.wall_ms), Some(701_000));
        assert_eq!(r.samples.last().map(|s| s.wall_ms), Some(1_000_000));
    }

    #[test]
    fn ended_jobs_are_evicted_before_running_ones() {
        let mut h = ThroughputHistory::new(10, 2);
        h.record(&snapshot(vec![job(1, 1000, 1), job(2, 1000, 1)]));
        // Job 1 ends; job 3 starts: job 1's history goes.
        h.record(&snapshot(vec![job(2, 2000, 2), job(3, 1000, 1)]));
        assert_eq!(h.len(), 2);
        assert!(h.report(JobId(1)).is_none());
        assert!(h.report(JobId(2)).is_some_and(|r| r.running));
        // Both end: their histories stay, marked ended.
        h.record(&snapshot(vec![]));
        assert!(h.report(JobId(3)).is_some_and(|r| !r.running));
        assert_eq!(h.len(), 2);
    }
}
