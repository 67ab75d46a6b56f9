//! Prometheus text exposition of the cluster's state (format 0.0.4).

use std::fmt::Write;

use crate::protocol::ClusterSnapshot;
use crate::protocol::{JobState, JobSummary, SlotState};

/// A per-job counter: metric name, help text, and how to read it.
type JobCounter = (&'static str, &'static str, fn(&JobSummary) -> u64);
type JobCounterFn = fn(&JobSummary) -> u64;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric of the snapshot.
pub fn render(s: &ClusterSnapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "strata_taskmanagers",
        "gauge",
        "Registered TaskManagers.",
    );
    let _ = writeln!(out, "strata_taskmanagers {}", s.taskmanagers.len());
    family(
        &mut out,
        "strata_slots",
        "gauge",
        "Task slots by state, as the JobManager allocated them.",
    );
    let (mut free, mut allocated) = (0, 0);
    for tm in &s.taskmanagers {
        for a in &tm.allocated {
            if a.is_some() {
                allocated += 1
            } else {
                free += 1
            }
        }
    }
    let _ = writeln!(out, "strata_slots{{state=\"free\"}} {free}");
    let _ = writeln!(out, "strata_slots{{state=\"allocated\"}} {allocated}");
    family(
        &mut out,
        "strata_taskmanager_slots_active",
        "gauge",
        "Slots running tasks, as each TaskManager last reported.",
    );
    for tm in &s.taskmanagers {
        let active = tm
            .slots
            .iter()
            .filter(|x| x.state == SlotState::Active)
            .count();
        let _ = writeln!(
            out,
            "strata_taskmanager_slots_active{{taskmanager=\"{}\"}} {active}",
            escape(&tm.id.to_string())
        );
    }
    family(
        &mut out,
        "strata_taskmanager_gpu_slots",
        "gauge",
        "Slots with a GPU (0 on a TaskManager without one: CPU slots only).",
    );
    for tm in &s.taskmanagers {
        let gpu_slots = tm.slots.iter().filter(|x| x.profile.gpu.is_some()).count();
        let _ = writeln!(
            out,
            "strata_taskmanager_gpu_slots{{taskmanager=\"{}\"}} {gpu_slots}",
            escape(&tm.id.to_string())
        );
    }
    family(
        &mut out,
        "strata_taskmanager_info",
        "gauge",
        "Tiers chosen by each TaskManager, with the reason for every fallback.",
    );
    for tm in &s.taskmanagers {
        let _ = writeln!(
            out,
            "strata_taskmanager_info{{taskmanager=\"{}\",transport=\"{}\",tier=\"{}\",io=\"{}\"}} 1",
            escape(&tm.id.to_string()),
            escape(&tm.transport),
            escape(&tm.gpu),
            escape(&tm.io)
        );
    }
    family(
        &mut out,
        "strata_taskmanager_heartbeat_age_seconds",
        "gauge",
        "Time since the TaskManager's last heartbeat.",
    );
    for tm in &s.taskmanagers {
        let _ = writeln!(
            out,
            "strata_taskmanager_heartbeat_age_seconds{{taskmanager=\"{}\"}} {:.3}",
            escape(&tm.id.to_string()),
            tm.last_heartbeat_ms as f64 / 1000.0
        );
    }
    family(
        &mut out,
        "strata_jobs",
        "gauge",
        "Jobs by state (running now; ended among the last 100).",
    );
    let _ = writeln!(out, "strata_jobs{{state=\"running\"}} {}", s.running.len());
    for (state, label) in [
        (JobState::Finished, "finished"),
        (JobState::Failed, "failed"),
        (JobState::Canceled, "canceled"),
    ] {
        let n = s.completed.iter().filter(|j| j.state == state).count();
        let _ = writeln!(out, "strata_jobs{{state=\"{label}\"}} {n}");
    }
    let jobs: Vec<&JobSummary> = s.running.iter().chain(&s.completed).collect();
    let per_job: [JobCounter; 24] = [
        (
            "strata_job_rows_in_total",
            "Rows read by the job's sources.",
            |j| j.rows_in,
        ),
        (
            "strata_job_rows_out_total",
            "Rows written by the job's sinks.",
            |j| j.rows_out,
        ),
        (
            "strata_job_exchange_remote_bytes_total",
            "Bytes sent between TaskManagers.",
            |j| j.remote_bytes,
        ),
        (
            "strata_job_exchange_local_rows_total",
            "Rows passed over local channels.",
            |j| j.local_rows,
        ),
        (
            "strata_job_backpressured_milliseconds_total",
            "Time tasks waited for credit or buffers.",
            |j| j.backpressure_ms,
        ),
        (
            "strata_job_late_rows_total",
            "Rows dropped as late by windows.",
            |j| j.late_rows,
        ),
        (
            "strata_job_gpu_batches_total",
            "Batch pieces that GPU-placed operators ran on the GPU.",
            |j| j.gpu_offload.gpu_batches,
        ),
        (
            "strata_job_gpu_oom_splits_total",
            "Batches split in two after the GPU ran out of device memory.",
            |j| j.gpu_offload.oom_splits,
        ),
        (
            "strata_job_gpu_cpu_fallback_batches_total",
            "Batch pieces of GPU-placed operators run on the CPU twin after out-of-memory.",
            |j| j.gpu_offload.cpu_fallback_batches,
        ),
        (
            "strata_job_gpu_device_error_fallbacks_total",
            "Batch pieces of GPU-placed operators run on the CPU twin after a device error (the backend out of service until reopened).",
            |j| j.gpu_offload.device_error_fallbacks,
        ),
        (
            "strata_job_gpu_chain_batches_total",
            "Coalesced device batches of fused GPU chains.",
            |j| j.gpu_offload.chain_batches,
        ),
        (
            "strata_job_gpu_h2d_bytes_total",
            "Bytes fused GPU chains copied to the device.",
            |j| j.gpu_offload.h2d_bytes,
        ),
        (
            "strata_job_gpu_d2h_bytes_total",
            "Bytes fused GPU chains copied back to the host.",
            |j| j.gpu_offload.d2h_bytes,
        ),
        (
            "strata_job_gpu_launches_total",
            "Kernel launches and memsets of fused GPU chains.",
            |j| j.gpu_offload.launches,
        ),
        (
            "strata_job_gpu_stream_waits_total",
            "Host waits on a GPU stream by fused GPU chains.",
            |j| j.gpu_offload.syncs,
        ),
        (
            "strata_job_gpu_routed_rows_total",
            "Rows whose key_by target subtask the GPU computed.",
            |j| j.gpu_offload.routed_rows,
        ),
        (
            "strata_job_gpu_aggregation_batches_total",
            "Device batches upserted into GPU aggregation tables.",
            |j| j.gpu_offload.agg_batches,
        ),
        (
            "strata_job_gpu_aggregation_drains_total",
            "GPU aggregation tables drained into managed memory.",
            |j| j.gpu_offload.agg_drains,
        ),
        (
            "strata_job_spill_written_bytes_total",
            "Spill block bytes written by the job's operators.",
            |j| j.spill_bytes_written,
        ),
        (
            "strata_job_spill_read_bytes_total",
            "Spilled bytes read back by the job's operators.",
            |j| j.spill_bytes_read,
        ),
        (
            "strata_job_spill_files_total",
            "Spill files created by the job's operators.",
            |j| j.spill_file_count,
        ),
        (
            "strata_job_checkpoints_completed_total",
            "Checkpoints completed (Flink's numberOfCompletedCheckpoints).",
            |j| j.checkpoints.completed,
        ),
        (
            "strata_job_checkpoints_failed_total",
            "Checkpoints aborted or failed (Flink's numberOfFailedCheckpoints).",
            |j| j.checkpoints.failed,
        ),
        (
            "strata_job_restarts_total",
            "Restarts after failures (Flink's numRestarts).",
            |j| u64::from(j.restarts),
        ),
    ];
    for (name, help, value) in per_job {
        family(&mut out, name, "counter", help);
        for j in &jobs {
            let _ = writeln!(
                out,
                "{name}{{job=\"{:016x}\",name=\"{}\"}} {}",
                j.job,
                escape(&j.name),
                value(j)
            );
        }
    }
    for (name, help, value) in [
        (
            "strata_job_last_checkpoint_duration_milliseconds",
            "Trigger to completion of the latest completed checkpoint (Flink's lastCheckpointDuration).",
            (|j| j.checkpoints.last_completed().map(|c| c.duration_ms))
                as fn(&JobSummary) -> Option<u64>,
        ),
        (
            "strata_job_last_checkpoint_size_bytes",
            "State bytes of the latest completed checkpoint (Flink's lastCheckpointSize).",
            |j| j.checkpoints.last_completed().map(|c| c.size_bytes),
        ),
        (
            "strata_job_last_checkpoint_alignment_milliseconds",
            "Longest barrier alignment of the latest completed checkpoint.",
            |j| j.checkpoints.last_completed().map(|c| c.alignment_ms),
        ),
    ] {
        family(&mut out, name, "gauge", help);
        for j in &jobs {
            if let Some(v) = value(j) {
                let _ = writeln!(
                    out,
                    "{name}{{job=\"{:016x}\",name=\"{}\"}} {v}",
                    j.job,
                    escape(&j.name)
                );
            }
        }
    }
    // Per transport: the job's TaskManagers' transport names the label.
    for (name, help, value) in [
        (
            "strata_job_exchange_remote_buffers_total",
            "Buffers sent between TaskManagers, by transport.",
            (|j| j.remote_buffers) as JobCounterFn,
        ),
        (
            "strata_job_exchange_transport_bytes_total",
            "Bytes sent between TaskManagers, by transport.",
            |j| j.remote_bytes,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for j in &jobs {
            let transport = j.transport.split_whitespace().next().unwrap_or("tcp");
            let _ = writeln!(
                out,
                "{name}{{job=\"{:016x}\",transport=\"{}\"}} {}",
                j.job,
                escape(transport),
                value(j)
            );
        }
    }
    for (name, help, value) in [
        (
            "strata_job_in_pool_usage",
            "Highest share of a task's input network buffers holding data (Flink's inPoolUsage).",
            (|j| j.in_pool_usage_permille) as JobCounterFn,
        ),
        (
            "strata_job_out_pool_usage",
            "Highest share of a task's remote output queues in use (Flink's outPoolUsage).",
            |j| j.out_pool_usage_permille,
        ),
    ] {
        family(&mut out, name, "gauge", help);
        for j in &s.running {
            let _ = writeln!(
                out,
                "{name}{{job=\"{:016x}\"}} {:.3}",
                j.job,
                value(j) as f64 / 1000.0
            );
        }
    }
    // Per task, for running jobs (Flink's task-level shuffle metrics).
    type TaskGauge = fn(&crate::protocol::TaskNetworkMetrics) -> String;
    let per_task: [(&str, &str, &str, TaskGauge); 6] = [
        (
            "strata_task_in_pool_usage",
            "gauge",
            "Share of the task's input network buffers holding data (inPoolUsage).",
            |t| format!("{:.3}", t.in_pool_usage_permille as f64 / 1000.0),
        ),
        (
            "strata_task_out_pool_usage",
            "gauge",
            "Share of the task's remote output queues in use (outPoolUsage).",
            |t| format!("{:.3}", t.out_pool_usage_permille as f64 / 1000.0),
        ),
        (
            "strata_task_backpressured_time_ms_per_second",
            "gauge",
            "Milliseconds per second the task waited for credit or buffers (backPressuredTimeMsPerSecond).",
            |t| t.backpressured_ms_per_second.to_string(),
        ),
        (
            "strata_task_exchange_out_bytes_total",
            "counter",
            "Bytes the task sent to other TaskManagers, by transport.",
            |t| t.remote_bytes_out.to_string(),
        ),
        (
            "strata_task_exchange_out_buffers_total",
            "counter",
            "Buffers the task sent to other TaskManagers, by transport.",
            |t| t.remote_buffers_out.to_string(),
        ),
        (
            "strata_task_exchange_in_bytes_total",
            "counter",
            "Bytes the task received from other TaskManagers, by transport.",
            |t| t.remote_bytes_in.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_task {
        family(&mut out, name, kind, help);
        for j in &s.running {
            let transport = j.transport.split_whitespace().next().unwrap_or("tcp");
            for t in &j.tasks {
                let _ = writeln!(
                    out,
                    "{name}{{job=\"{:016x}\",vertex=\"{}\",subtask=\"{}\",taskmanager=\"{}\",transport=\"{}\"}} {}",
                    j.job,
                    t.vertex,
                    t.subtask,
                    escape(&t.taskmanager.to_string()),
                    escape(transport),
                    value(t)
                );
            }
        }
    }
    family(
        &mut out,
        "strata_operator_rows_in_total",
        "counter",
        "Rows into each operator.",
    );
    for j in &s.running {
        for v in &j.vertices {
            for o in &v.operators {
                let _ = writeln!(
                    out,
                    "strata_operator_rows_in_total{{job=\"{:016x}\",operator=\"{}\"}} {}",
                    j.job,
                    escape(&o.name),
                    o.rows_in
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_cluster_renders_valid_families() {
        let s = ClusterSnapshot {
            taskmanagers: vec![],
            running: vec![],
            completed: vec![],
        };
        let text = render(&s);
        assert!(text.contains("# TYPE strata_taskmanagers gauge\nstrata_taskmanagers 0\n"));
        for family in [
            "strata_job_spill_written_bytes_total",
            "strata_job_spill_read_bytes_total",
            "strata_job_spill_files_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} counter")),
                "{family}"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().expect("numeric sample");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
