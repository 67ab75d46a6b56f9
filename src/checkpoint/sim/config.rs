//! What one simulated run is: the job, its sizes and timing, the crashes
//! to inflict and the defect to plant, all drawn from a seed.

use std::path::Path;
use std::time::Duration;

use super::JOB_NAME;
use crate::network::sim::SplitMix64;

/// The keyed stateful operator between the source and the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// `aggregate` with count, sum, min and max: output only at the end.
    Aggregate,
    /// A tumbling event-time `window` with count and sum: output whenever
    /// the watermark passes a window, so the sink commits along the way.
    Window,
}

impl JobKind {
    /// Mixed into the seed, so the two jobs run different schedules.
    pub(super) fn salt(self) -> u64 {
        match self {
            JobKind::Aggregate => 0xC4EC_4901_5EED,
            JobKind::Window => 0x3A1D_0B57_F00D,
        }
    }
}

/// Where the simulator crashes the job. Each planned crash waits for its
/// point; the next one is armed once it fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Before the n-th task step from now.
    Step(u64),
    /// After the n-th task snapshot from now: its acknowledgement is still
    /// on the wire.
    AfterSnapshot(u64),
    /// After the n-th checkpoint from now completed in storage, before any
    /// task was notified.
    AfterComplete(u64),
    /// After the first task committed its final output.
    DuringFinalCommit,
}

/// Deliberate defects, to show that the checker catches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Restore gives the operators no state (the source offset stays).
    DropOperatorState,
    /// Every task hears that a checkpoint completed right after it took
    /// its snapshot: the sink commits what it staged before the
    /// checkpoint is complete.
    CommitOnSnapshot,
}

/// One simulated job: its size, timing and the crashes to inflict.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub job: JobKind,
    /// Rows of the datagen source, over its subtasks.
    pub rows: u64,
    /// Subtasks of the source, the keyed operator and the sink. The sink
    /// chains to the keyed operator when they are equal; otherwise it is a
    /// task of its own behind a rebalance edge, and the keyed task, which
    /// then stages nothing, finishes before the job's final commit.
    pub parallelism: [u32; 3],
    pub keys: u64,
    pub batch_size: usize,
    /// Tumbling window size ([`JobKind::Window`]).
    pub window_size_ms: i64,
    /// Event-time disorder of the source, also its watermark delay, so no
    /// row is ever late and the output does not depend on the schedule.
    pub ts_disorder_ms: i64,
    /// `execution.checkpointing.interval` and `.timeout`.
    pub interval: Duration,
    pub timeout: Duration,
    pub channel_batches_max: usize,
    /// Longest delay of a control or task message, in steps.
    pub delay_max_steps: u64,
    /// Crashes in the order they are armed.
    pub crashes: Vec<CrashPoint>,
    /// A restart may corrupt the newest completed checkpoint first.
    pub corrupt: bool,
    /// Also hold files committed by the final commit to invariant 3 (on;
    /// off only checks less).
    pub final_commit_durable: bool,
    pub fault: Fault,
}

impl SimConfig {
    /// Sizes, timing and one to four crashes, drawn from `seed`.
    pub fn from_seed(seed: u64, job: JobKind) -> Self {
        let mut rng = SplitMix64(seed ^ job.salt());
        let crash_count = rng.range(1, 4);
        let crashes = (0..crash_count)
            .map(|_| match rng.below(8) {
                0..=3 => CrashPoint::Step(1 + rng.below(300)),
                4 | 5 => CrashPoint::AfterSnapshot(1 + rng.below(12)),
                6 => CrashPoint::AfterComplete(1 + rng.below(4)),
                _ => CrashPoint::DuringFinalCommit,
            })
            .collect();
        Self {
            seed,
            job,
            rows: rng.range(1500, 4000) as u64,
            parallelism: {
                let keyed = rng.range(1, 3) as u32;
                let sink = if rng.chance(1, 2) {
                    keyed
                } else {
                    rng.range(1, 3) as u32
                };
                [rng.range(1, 3) as u32, keyed, sink]
            },
            keys: rng.range(3, 60) as u64,
            batch_size: rng.range(8, 64),
            window_size_ms: rng.range(40, 400) as i64,
            ts_disorder_ms: rng.range(0, 30) as i64,
            interval: Duration::from_millis(rng.range(3, 25) as u64),
            timeout: Duration::from_millis(rng.range(20, 300) as u64),
            channel_batches_max: rng.range(1, 6),
            delay_max_steps: rng.range(0, 8) as u64,
            crashes,
            corrupt: rng.chance(1, 2),
            final_commit_durable: true,
            fault: Fault::None,
        }
    }

    /// The job file: datagen → key_by → the keyed operator → the CSV sink
    /// writing into `out`.
    pub(super) fn job_file(&self, out: &Path) -> String {
        let keyed = match self.job {
            JobKind::Aggregate => "name = \"totals\"\ntype = \"aggregate\"\n\
                 aggs = [\"count(*) as cnt\", \"sum(value) as total\", \
                 \"min(value) as lo\", \"max(value) as hi\"]"
                .to_owned(),
            JobKind::Window => format!(
                "name = \"per-window\"\ntype = \"window\"\ntime_column = \"ts\"\n\
                 size = \"{}ms\"\naggs = [\"count(*) as cnt\", \"sum(value) as total\"]",
                self.window_size_ms
            ),
        };
        format!(
            "[job]\nname = \"{JOB_NAME}\"\n\n\
             [[operator]]\nname = \"events\"\ntype = \"datagen\"\nparallelism = {p0}\nrows = {rows}\n\
             keys = {keys}\nseed = {seed}\nbatch_size = {batch}\nts_disorder_ms = {disorder}\n\n\
             [[operator]]\nname = \"by-key\"\ntype = \"key_by\"\nkeys = [\"key\"]\n\n\
             [[operator]]\n{keyed}\nparallelism = {p1}\n\n\
             [[operator]]\nname = \"out\"\ntype = \"csv_sink\"\nparallelism = {p2}\npath = \"{out}\"\n",
            p0 = self.parallelism[0],
            p1 = self.parallelism[1],
            p2 = self.parallelism[2],
            rows = self.rows,
            keys = self.keys,
            seed = self.seed,
            batch = self.batch_size,
            disorder = self.ts_disorder_ms,
            out = out.display(),
        )
    }
}
