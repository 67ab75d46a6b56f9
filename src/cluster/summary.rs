//! The end-of-run summary a user reads.

use std::fmt::Write;

use crate::checkpoint::coordinator::CheckpointStatus;
use crate::protocol::{JobState, JobSummary};

/// Checkpoints listed one by one at the end of a run (the REST API has more).
const SUMMARY_CHECKPOINTS_MAX: usize = 8;

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Renders the summary as aligned text.
pub fn render(s: &JobSummary) -> String {
    let secs = s.wall_ms as f64 / 1000.0;
    let rate = if secs > 0.0 {
        s.rows_in as f64 / secs
    } else {
        0.0
    };
    let mut out = String::new();
    let state = match s.state {
        JobState::Finished => "FINISHED",
        JobState::Failed => "FAILED",
        JobState::Canceled => "CANCELED",
        JobState::Running => "RUNNING",
        JobState::Created => "CREATED",
    };
    let _ = writeln!(
        out,
        "Job '{}' ({:016x}) {state} in {secs:.2} s",
        s.name, s.job
    );
    if let Some(reason) = &s.reason {
        let _ = writeln!(out, "  cause: {reason}");
    }
    let _ = writeln!(
        out,
        "  rows in {}   rows out {}   throughput {:.2} M rows/s",
        human_count(s.rows_in),
        human_count(s.rows_out),
        rate / 1e6
    );
    let _ = writeln!(
        out,
        "  cluster {} TaskManager(s), {} slots   transport: {}",
        s.taskmanagers, s.slots, s.transport
    );
    let _ = writeln!(
        out,
        "  exchange: {} in {} buffers between TaskManagers, {} rows over local channels, back-pressured {} ms",
        human_bytes(s.remote_bytes),
        human_count(s.remote_buffers),
        human_count(s.local_rows),
        s.backpressure_ms
    );
    for io in &s.io {
        let _ = writeln!(out, "  spill {io}");
    }
    let _ = writeln!(
        out,
        "  managed memory peak per slot {}   late rows dropped {}",
        human_bytes(s.managed_peak_bytes),
        human_count(s.late_rows)
    );
    let _ = writeln!(
        out,
        "  spilled {} written, {} read back, in {} file(s)",
        human_bytes(s.spill_bytes_written),
        human_bytes(s.spill_bytes_read),
        human_count(s.spill_file_count)
    );
    if s.checkpointing {
        let c = &s.checkpoints;
        let _ = write!(
            out,
            "  checkpoints {} completed, {} failed",
            c.completed, c.failed
        );
        if let Some(last) = c.last_completed() {
            let _ = write!(
                out,
                "; last chk-{}: {} in {} ms (alignment {} ms)",
                last.id,
                human_bytes(last.size_bytes),
                last.duration_ms,
                last.alignment_ms
            );
        }
        let _ = writeln!(out);
        let recent: Vec<String> = c
            .history
            .iter()
            .rev()
            .take(SUMMARY_CHECKPOINTS_MAX)
            .rev()
            .map(|h| match h.status {
                CheckpointStatus::Completed => format!(
                    "chk-{} {} {} ms",
                    h.id,
                    human_bytes(h.size_bytes),
                    h.duration_ms
                ),
                CheckpointStatus::Failed => format!("chk-{} failed", h.id),
            })
            .collect();
        if !recent.is_empty() {
            let _ = writeln!(out, "    recent: {}", recent.join(", "));
        }
    }
    if s.restarts > 0 {
        let restored = match s.checkpoints.restored_from {
            Some(id) => format!("restored from chk-{id}"),
            None => "restarted from the beginning".into(),
        };
        let _ = writeln!(
            out,
            "  restarts {} ({restored}); last failure: {}",
            s.restarts,
            s.last_failure.as_deref().unwrap_or("unknown")
        );
    }
    for gpu in &s.gpu {
        let _ = writeln!(out, "  gpu {gpu}");
    }
    if let Some(placement) = &s.placement {
        let _ = writeln!(
            out,
            "  placement (placement.mode = {}; GPU tier: {}):",
            placement.mode, placement.gpu_tier
        );
        for op in &placement.operators {
            let _ = writeln!(
                out,
                "    {:<20} {:<4} {}",
                op.name,
                op.tier.to_string(),
                op.reason
            );
        }
        if placement.gpu_operator_count() > 0 {
            let o = &s.gpu_offload;
            let _ = writeln!(
                out,
                "  gpu offload: {} batch pieces on the GPU, {} out-of-memory splits, {} pieces ({} rows) on the CPU twin after out-of-memory, {} pieces on the CPU twin after a device error",
                human_count(o.gpu_batches),
                human_count(o.oom_splits),
                human_count(o.cpu_fallback_batches),
                human_count(o.cpu_fallback_rows),
                human_count(o.device_error_fallbacks)
            );
            if o.agg_batches > 0 {
                let _ = writeln!(
                    out,
                    "  gpu aggregation: {} device batches into device tables, {} drains into managed memory",
                    human_count(o.agg_batches),
                    human_count(o.agg_drains)
                );
            }
            if o.chain_batches > 0 {
                let _ = writeln!(
                    out,
                    "  gpu chains: {} rows in {} coalesced device batches ({} rows each), {} up, {} down, {} launches, {} stream waits",
                    human_count(o.chain_rows),
                    human_count(o.chain_batches),
                    human_count(o.chain_rows / o.chain_batches),
                    human_bytes(o.h2d_bytes),
                    human_bytes(o.d2h_bytes),
                    human_count(o.launches),
                    human_count(o.syncs)
                );
                if o.routed_rows > 0 {
                    let _ = writeln!(
                        out,
                        "  gpu key_by: {} rows routed by targets hashed on the device",
                        human_count(o.routed_rows)
                    );
                }
            }
        }
    }
    let _ = writeln!(out, "  vertices:");
    for v in &s.vertices {
        let _ = writeln!(
            out,
            "    [{}] {} — parallelism {}, tier {}, on {}",
            v.input_partitioner.as_deref().unwrap_or("SOURCE"),
            v.name,
            v.parallelism,
            v.tier,
            v.placement.join(", ")
        );
        for o in &v.operators {
            let _ = writeln!(
                out,
                "        {:<20} {:<14} in {:>14}   out {:>14}",
                o.name,
                o.kind,
                human_count(o.rows_in),
                human_count(o.rows_out)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_bytes_are_human() {
        assert_eq!(human_count(50_000_000), "50,000,000");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
