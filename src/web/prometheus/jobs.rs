//! Each running job and the ended ones the JobManager keeps
//! (`strata_jobmanager_job_*` {`job_id`, `job_name`}): what the JobManager
//! summed over the job's tasks, as Flink's JobManager reports a job's
//! checkpoints and restarts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::{Count, CountF64, GaugeF64, GaugeU64, family, ratio, seconds};
use crate::protocol::JobSummary;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct JobLabels {
    job_id: String,
    job_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobTransportLabels {
    #[prometheus(flatten)]
    job: JobLabels,
    transport: String,
}

impl JobLabels {
    pub(super) fn of(j: &JobSummary) -> JobLabels {
        JobLabels {
            job_id: format!("{:016x}", j.job),
            job_name: j.name.clone(),
        }
    }
}

/// The transport's name without its reason or mode: "tcp" of "tcp, task
/// reads between TaskManagers, …", "rdma-emulated" of "rdma-emulated (…)";
/// "none" before the job's tasks are deployed.
pub(super) fn transport_name(j: &JobSummary) -> String {
    let name: String = j
        .transport
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    if name.is_empty() {
        "none".to_owned()
    } else {
        name
    }
}

/// A per-job counter: metric name, help text, and how to read it.
struct JobCounter {
    name: &'static str,
    help: &'static str,
    value: fn(&JobSummary) -> u64,
}

const JOB_COUNTERS: [JobCounter; 22] = [
    JobCounter {
        name: "strata_jobmanager_job_numRecordsIn",
        help: "Rows read by the job's sources",
        value: |j| j.rows_in,
    },
    JobCounter {
        name: "strata_jobmanager_job_numRecordsOut",
        help: "Rows written by the job's sinks",
        value: |j| j.rows_out,
    },
    JobCounter {
        name: "strata_jobmanager_job_numRecordsOutLocal",
        help: "Rows passed over local channels (between tasks of one TaskManager)",
        value: |j| j.local_rows,
    },
    JobCounter {
        name: "strata_jobmanager_job_numLateRecordsDropped",
        help: "Rows dropped as late by windows",
        value: |j| j.late_rows,
    },
    JobCounter {
        name: "strata_jobmanager_job_numRestarts",
        help: "Restarts after failures",
        value: |j| u64::from(j.restarts),
    },
    JobCounter {
        name: "strata_jobmanager_job_numberOfCompletedCheckpoints",
        help: "Checkpoints completed",
        value: |j| j.checkpoints.completed,
    },
    JobCounter {
        name: "strata_jobmanager_job_numberOfFailedCheckpoints",
        help: "Checkpoints aborted or failed",
        value: |j| j.checkpoints.failed,
    },
    JobCounter {
        name: "strata_jobmanager_job_spill_numBytesWritten",
        help: "Spill block bytes written by the job's operators (headers and padding included)",
        value: |j| j.spill_bytes_written,
    },
    JobCounter {
        name: "strata_jobmanager_job_spill_numBytesRead",
        help: "Spilled payload bytes read back by the job's operators",
        value: |j| j.spill_bytes_read,
    },
    JobCounter {
        name: "strata_jobmanager_job_spill_numFiles",
        help: "Spill files created by the job's operators",
        value: |j| j.spill_file_count,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numBatches",
        help: "Batch pieces that GPU-placed operators ran on the GPU",
        value: |j| j.gpu_offload.gpu_batches,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numOutOfMemorySplits",
        help: "Batches split in two after the GPU ran out of device memory",
        value: |j| j.gpu_offload.oom_splits,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numCpuFallbackBatches",
        help: "Batch pieces of GPU-placed operators run on the CPU twin after out-of-memory",
        value: |j| j.gpu_offload.cpu_fallback_batches,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numDeviceErrorFallbacks",
        help: "Batch pieces of GPU-placed operators run on the CPU twin after a device error (the backend out of service until reopened)",
        value: |j| j.gpu_offload.device_error_fallbacks,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numChainBatches",
        help: "Coalesced device batches of fused GPU chains",
        value: |j| j.gpu_offload.chain_batches,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numBytesHostToDevice",
        help: "Bytes fused GPU chains copied to the device",
        value: |j| j.gpu_offload.h2d_bytes,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numBytesDeviceToHost",
        help: "Bytes fused GPU chains copied back to the host",
        value: |j| j.gpu_offload.d2h_bytes,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numLaunches",
        help: "Kernel launches and memsets of fused GPU chains",
        value: |j| j.gpu_offload.launches,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numStreamWaits",
        help: "Host waits on a GPU stream by fused GPU chains",
        value: |j| j.gpu_offload.syncs,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numRecordsRouted",
        help: "Rows whose key_by target subtask the GPU computed",
        value: |j| j.gpu_offload.routed_rows,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numAggregationBatches",
        help: "Device batches upserted into GPU aggregation tables",
        value: |j| j.gpu_offload.agg_batches,
    },
    JobCounter {
        name: "strata_jobmanager_job_gpu_numAggregationDrains",
        help: "GPU aggregation tables drained into managed memory",
        value: |j| j.gpu_offload.agg_drains,
    },
];

/// Running and ended jobs: what the JobManager summed over their tasks.
pub(super) fn register_jobs(r: &mut Registry, jobs: &[&JobSummary]) {
    for c in &JOB_COUNTERS {
        let f: Family<JobLabels, Count> = family(r, c.name, c.help, None);
        for j in jobs {
            f.get_or_create(&JobLabels::of(j)).inc_by((c.value)(j));
        }
    }
    // Labelled with the transport as well: the job's TaskManagers' data
    // plane, by which a dashboard compares TCP and verbs.
    let bytes_out: Family<JobTransportLabels, Count> = family(
        r,
        "strata_jobmanager_job_numBytesOutRemote",
        "Bytes the job's tasks sent to other TaskManagers (local channels pass batches without serializing them)",
        None,
    );
    let buffers_out: Family<JobTransportLabels, Count> = family(
        r,
        "strata_jobmanager_job_numBuffersOutRemote",
        "Buffers the job's tasks sent to other TaskManagers",
        None,
    );
    let backpressured: Family<JobLabels, CountF64> = family(
        r,
        "strata_jobmanager_job_accumulatedBackPressuredTime",
        "Time the job's tasks waited for credit or buffers, summed over the tasks (its rate() is their backPressuredTimeMsPerSecond summed, over 1000)",
        Some(Unit::Seconds),
    );
    let managed_peak: Family<JobLabels, GaugeU64> = family(
        r,
        "strata_jobmanager_job_managedMemoryPeak",
        "Most managed memory any one of the job's tasks held",
        Some(Unit::Bytes),
    );
    for j in jobs {
        let labels = JobLabels::of(j);
        let by_transport = JobTransportLabels {
            job: labels.clone(),
            transport: transport_name(j),
        };
        bytes_out
            .get_or_create(&by_transport)
            .inc_by(j.remote_bytes);
        buffers_out
            .get_or_create(&by_transport)
            .inc_by(j.remote_buffers);
        backpressured
            .get_or_create(&labels)
            .inc_by(seconds(j.backpressure_ms));
        managed_peak
            .get_or_create(&labels)
            .set(j.managed_peak_bytes);
    }
    register_last_checkpoints(r, jobs);
}

/// Flink's lastCheckpoint* gauges, for jobs with a completed checkpoint.
pub(super) fn register_last_checkpoints(r: &mut Registry, jobs: &[&JobSummary]) {
    let duration: Family<JobLabels, GaugeF64> = family(
        r,
        "strata_jobmanager_job_lastCheckpointDuration",
        "Trigger to completion of the latest completed checkpoint",
        Some(Unit::Seconds),
    );
    let size: Family<JobLabels, GaugeU64> = family(
        r,
        "strata_jobmanager_job_lastCheckpointSize",
        "State bytes of the latest completed checkpoint",
        Some(Unit::Bytes),
    );
    let alignment: Family<JobLabels, GaugeF64> = family(
        r,
        "strata_jobmanager_job_lastCheckpointAlignmentTime",
        "Longest barrier alignment of any task in the latest completed checkpoint",
        Some(Unit::Seconds),
    );
    for j in jobs {
        let Some(last) = j.checkpoints.last_completed() else {
            continue;
        };
        let labels = JobLabels::of(j);
        duration
            .get_or_create(&labels)
            .set(seconds(last.duration_ms));
        size.get_or_create(&labels).set(last.size_bytes);
        alignment
            .get_or_create(&labels)
            .set(seconds(last.alignment_ms));
    }
}

/// Running jobs only: the highest pool usage over their tasks' last reports.
pub(super) fn register_running_jobs(r: &mut Registry, running: &[JobSummary]) {
    let in_pool: Family<JobLabels, GaugeF64> = family(
        r,
        "strata_jobmanager_job_buffers_maxInPoolUsage",
        "Highest inPoolUsage over the job's tasks",
        None,
    );
    let out_pool: Family<JobLabels, GaugeF64> = family(
        r,
        "strata_jobmanager_job_buffers_maxOutPoolUsage",
        "Highest outPoolUsage over the job's tasks",
        None,
    );
    for j in running {
        let labels = JobLabels::of(j);
        in_pool
            .get_or_create(&labels)
            .set(ratio(j.in_pool_usage_permille));
        out_pool
            .get_or_create(&labels)
            .set(ratio(j.out_pool_usage_permille));
    }
}
