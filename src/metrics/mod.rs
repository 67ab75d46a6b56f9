//! Metrics shared by tasks and reported to the JobManager.
//!
//! Counters are relaxed atomics updated on the task thread and read by the
//! TaskManager's reporter; snapshots travel in task status updates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::network::InputGate;
use crate::network::partition::{Subpartition, WriterMetrics};

#[derive(Default, Debug)]
pub struct OperatorMetrics {
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
}

/// What a task's operators spilled, through the IOManager.
#[derive(Default, Debug)]
pub struct SpillMetrics {
    /// Block bytes written, headers and padding included.
    pub bytes_written: AtomicU64,
    /// Payload bytes read back (verified).
    pub bytes_read: AtomicU64,
    /// Spill files created.
    pub file_count: AtomicU64,
}

/// Counters of one running task.
#[derive(Default)]
pub struct TaskMetrics {
    /// By the vertex's operator order: (logical operator index, counters).
    pub operators: Vec<(usize, Arc<OperatorMetrics>)>,
    pub writers: Vec<Arc<WriterMetrics>>,
    pub remote_bytes_in: AtomicU64,
    pub late_rows: AtomicU64,
    pub managed_peak_bytes: AtomicU64,
    pub source_rows_expected: AtomicU64,
    /// When a source task produced its first batch, in microseconds since
    /// the Unix epoch (0: not yet).
    pub first_row_unix_us: AtomicU64,
    /// The task's input gates and remote output queues, read for Flink's
    /// inPoolUsage and outPoolUsage.
    pub gates: Vec<Arc<InputGate>>,
    pub subpartitions: Vec<Arc<Subpartition>>,
    /// When the previous snapshot was taken, and the back-pressure total then.
    pub last_backpressure: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// GPU launches, out-of-memory splits and CPU-twin fallbacks.
    pub gpu: Arc<crate::kernels::backend::OffloadStats>,
    pub spill: Arc<SpillMetrics>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OperatorSnapshot {
    pub operator: usize,
    pub rows_in: u64,
    pub rows_out: u64,
}

/// A point-in-time copy of a task's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaskSnapshot {
    pub operators: Vec<OperatorSnapshot>,
    pub remote_bytes_out: u64,
    pub remote_buffers_out: u64,
    pub remote_bytes_in: u64,
    pub local_rows_out: u64,
    pub backpressure_ms: u64,
    pub late_rows: u64,
    pub managed_peak_bytes: u64,
    pub source_rows_expected: u64,
    /// When a source task produced its first batch, µs since the Unix
    /// epoch (0: not yet, or not a source).
    #[serde(default)]
    pub first_row_unix_us: u64,
    /// Share of the input gates' remote buffers holding unconsumed data, ‰.
    #[serde(default)]
    pub in_pool_usage_permille: u64,
    /// Share of the remote output queues' capacity in use, ‰.
    #[serde(default)]
    pub out_pool_usage_permille: u64,
    /// Time blocked on credit or buffers per second since the last report
    /// (Flink's backPressuredTimeMsPerSecond).
    #[serde(default)]
    pub backpressured_ms_per_second: u64,
    #[serde(default)]
    pub gpu: crate::kernels::backend::OffloadSnapshot,
    #[serde(default)]
    pub spill_bytes_written: u64,
    #[serde(default)]
    pub spill_bytes_read: u64,
    #[serde(default)]
    pub spill_file_count: u64,
}

impl TaskMetrics {
    pub fn snapshot(&self) -> TaskSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sum =
            |f: &dyn Fn(&WriterMetrics) -> u64| self.writers.iter().map(|w| f(w)).sum::<u64>();
        TaskSnapshot {
            operators: self
                .operators
                .iter()
                .map(|(op, m)| OperatorSnapshot {
                    operator: *op,
                    rows_in: r(&m.rows_in),
                    rows_out: r(&m.rows_out),
                })
                .collect(),
            remote_bytes_out: sum(&|w| r(&w.remote_bytes)),
            remote_buffers_out: sum(&|w| r(&w.remote_buffers)),
            remote_bytes_in: r(&self.remote_bytes_in),
            local_rows_out: sum(&|w| r(&w.local_rows)),
            backpressure_ms: sum(&|w| r(&w.backpressure_nanos)) / 1_000_000,
            late_rows: r(&self.late_rows),
            managed_peak_bytes: r(&self.managed_peak_bytes),
            source_rows_expected: r(&self.source_rows_expected),
            first_row_unix_us: r(&self.first_row_unix_us),
            backpressured_ms_per_second: self.backpressure_rate(sum(&|w| r(&w.backpressure_nanos))),
            in_pool_usage_permille: self.in_pool_usage_permille(),
            out_pool_usage_permille: self.out_pool_usage_permille(),
            gpu: self.gpu.snapshot(),
            spill_bytes_written: r(&self.spill.bytes_written),
            spill_bytes_read: r(&self.spill.bytes_read),
            spill_file_count: r(&self.spill.file_count),
        }
    }

    /// Back-pressured milliseconds per second since the previous snapshot.
    fn backpressure_rate(&self, total_nanos: u64) -> u64 {
        let now = std::time::Instant::now();
        let mut last = self
            .last_backpressure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (since, before) = last.unwrap_or((now, total_nanos));
        *last = Some((now, total_nanos));
        let elapsed = now.duration_since(since).as_secs_f64();
        if elapsed <= 0.0 {
            return 0;
        }
        let blocked_ms = total_nanos.saturating_sub(before) as f64 / 1e6;
        (blocked_ms / elapsed).min(1000.0) as u64
    }

    fn in_pool_usage_permille(&self) -> u64 {
        let total: usize = self.gates.iter().map(|g| g.remote_buffer_count()).sum();
        let free: usize = self.gates.iter().map(|g| g.free_segment_count()).sum();
        permille(total.saturating_sub(free), total)
    }

    fn out_pool_usage_permille(&self) -> u64 {
        let total: usize = self.subpartitions.iter().map(|s| s.capacity()).sum();
        let queued: usize = self.subpartitions.iter().map(|s| s.queued()).sum();
        permille(queued, total)
    }
}

fn permille(used: usize, total: usize) -> u64 {
    if total == 0 {
        return 0;
    }
    (used.min(total) * 1000 / total) as u64
}
