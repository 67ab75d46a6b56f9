//! The slot table: N static slots with a resource profile each, and their
//! states free → allocated → active → releasing → free.
//!
//! A slot belongs to one execution (the `job` id of the control messages)
//! from its allocation until the last task deployed on it has ended, or
//! until the execution is released and none of its tasks runs. Tasks start
//! and end in any order: a source subtask with nothing to read may end
//! before its slot's other tasks have started, and that must not free the
//! slot under them. The table does no I/O and never panics on what the
//! JobManager or a task thread tells it; every method says what changed so
//! that the caller can report it.
//!
//! On a node with GPUs every slot is also a GPU slot: slot `i` gets GPU
//! `i mod gpu_count` and an equal share of that GPU's memory (less a reserve
//! for the CUDA context and the kernels), which becomes its device memory
//! budget ([`gpu_slot_profiles`]). A node without a GPU offers CPU slots
//! only.

use std::collections::BTreeMap;

use crate::protocol::{ResourceProfile, SlotState, SlotStatus};

/// One task of an execution: a subtask of a job vertex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskKey {
    pub vertex: usize,
    pub subtask: u32,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vertex, self.subtask)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot {index} does not exist (this TaskManager has {count} slots)")]
    NoSuchSlot { index: usize, count: usize },
    #[error("slot {index} is occupied by job {job:016x}")]
    Occupied { index: usize, job: u64 },
    #[error(
        "slot {index} is still releasing job {job:016x}: its tasks {running:?} have not ended yet"
    )]
    Releasing {
        index: usize,
        job: u64,
        running: Vec<TaskKey>,
    },
    #[error("slot {index} holds no live task {task} of job {job:016x}")]
    UnknownTask {
        index: usize,
        job: u64,
        task: TaskKey,
    },
}

/// Device memory kept out of the slots' budgets on each GPU, for the CUDA
/// context, the loaded kernels and the driver's own allocations.
pub const GPU_MEMORY_RESERVE_FRACTION: f64 = 0.1;

/// The profile of each of `slot_count` slots: `base` for all, plus GPU id
/// and device-memory budget spread round-robin over `gpus`.
pub fn gpu_slot_profiles(
    base: &ResourceProfile,
    slot_count: usize,
    gpus: &[crate::kernels::gpu::GpuDevice],
) -> Vec<ResourceProfile> {
    (0..slot_count)
        .map(|slot_index| {
            let mut profile = base.clone();
            if !gpus.is_empty() {
                let gpu = &gpus[slot_index % gpus.len()];
                let sharing = (0..slot_count)
                    .filter(|s| s % gpus.len() == slot_index % gpus.len())
                    .count();
                let usable = gpu.memory_bytes as f64 * (1.0 - GPU_MEMORY_RESERVE_FRACTION);
                profile.gpu = Some((gpu.ordinal, (usable / sharing as f64) as u64));
            }
            profile
        })
        .collect()
}

/// Where a task deployed on a slot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskPhase {
    /// Deployed, its thread not yet started.
    Deployed,
    /// Its thread runs.
    Running,
}

/// The execution a slot is allocated to, with the tasks deployed on it.
#[derive(Debug)]
struct Holder {
    job: u64,
    /// Every task deployed on the slot that has not ended. Never empty: the
    /// slot frees itself with the last one.
    tasks: BTreeMap<TaskKey, TaskPhase>,
    /// The execution was released (canceled, finished, fenced) while some
    /// of its tasks still ran; no task may start any more.
    releasing: bool,
}

impl Holder {
    fn state(&self) -> SlotState {
        if self.releasing {
            SlotState::Releasing
        } else if self.tasks.values().any(|p| *p == TaskPhase::Running) {
            SlotState::Active
        } else {
            SlotState::Allocated
        }
    }

    fn running(&self) -> Vec<TaskKey> {
        self.tasks
            .iter()
            .filter(|(_, p)| **p == TaskPhase::Running)
            .map(|(t, _)| *t)
            .collect()
    }
}

/// What [`SlotTable::release`] did to an execution's slots.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Slots that are free now.
    pub freed: Vec<usize>,
    /// Slots whose running tasks must end first, with those tasks; each
    /// frees itself with its last one ([`SlotTable::task_ended`]).
    pub draining: Vec<(usize, Vec<TaskKey>)>,
}

/// A slot that is not free: whom it holds and which tasks still live.
#[derive(Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub index: usize,
    pub job: u64,
    pub state: SlotState,
    pub tasks: Vec<TaskKey>,
}

/// A fault the simulator re-introduces to show that its checker notices.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The old bug: a slot frees itself when its running-task count drops to
    /// zero, although tasks deployed on it have not started yet.
    FreeOnFirstEnd,
}

/// The slot table: an I/O-free state machine, driven by the deployment (which
/// allocates and starts), the task threads (which end) and the session
/// (which releases executions and reports).
///
/// A slot is allocated to one execution together with the tasks deployed on
/// it; tasks start and end in any order; the slot is free again when every
/// task deployed on it has ended (a task that never started ends too, when
/// its deployment is rolled back) or when its execution is released and no
/// task of it still runs. Nothing here panics on a message from outside: a
/// stray or late call is a typed error the caller logs.
pub struct SlotTable {
    slots: Vec<Option<Holder>>,
    profiles: Vec<ResourceProfile>,
    #[cfg(test)]
    fault: Option<Fault>,
}

impl SlotTable {
    pub fn new(count: usize, profile: ResourceProfile) -> Self {
        Self::with_profiles(vec![profile; count])
    }

    /// One slot per profile (GPU slots differ in their GPU).
    pub fn with_profiles(profiles: Vec<ResourceProfile>) -> Self {
        Self {
            slots: (0..profiles.len()).map(|_| None).collect(),
            profiles,
            #[cfg(test)]
            fault: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn inject(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn check_index(&self, index: usize) -> Result<(), SlotError> {
        let count = self.slots.len();
        if index < count {
            Ok(())
        } else {
            Err(SlotError::NoSuchSlot { index, count })
        }
    }

    /// Allocates each `(slot, task)` of one deployment of execution `job`,
    /// all or nothing: a slot held by another execution, or still releasing,
    /// refuses the whole deployment and nothing changes. A slot already
    /// allocated to `job` takes the further tasks (as Flink's duplicate
    /// allocation ids, allocating again is not an error).
    pub fn allocate(&mut self, job: u64, placements: &[(usize, TaskKey)]) -> Result<(), SlotError> {
        for &(index, _) in placements {
            self.check_index(index)?;
            match &self.slots[index] {
                None => {}
                Some(h) if h.job != job => {
                    return Err(SlotError::Occupied { index, job: h.job });
                }
                Some(h) if h.releasing => {
                    return Err(SlotError::Releasing {
                        index,
                        job,
                        running: h.running(),
                    });
                }
                Some(_) => {}
            }
        }
        for &(index, task) in placements {
            let holder = self.slots[index].get_or_insert_with(|| Holder {
                job,
                tasks: BTreeMap::new(),
                releasing: false,
            });
            holder.tasks.entry(task).or_insert(TaskPhase::Deployed);
        }
        self.debug_check();
        Ok(())
    }

    /// The live task `task` of `job` on slot `index`.
    fn live_task(
        &mut self,
        job: u64,
        index: usize,
        task: TaskKey,
    ) -> Result<(&mut Holder, TaskPhase), SlotError> {
        self.check_index(index)?;
        let unknown = SlotError::UnknownTask { index, job, task };
        let holder = match &mut self.slots[index] {
            Some(h) if h.job == job => h,
            _ => return Err(unknown),
        };
        let phase = *holder.tasks.get(&task).ok_or(unknown)?;
        Ok((holder, phase))
    }

    /// A deployed task's thread starts. Starting it again is a no-op; a task
    /// that is not deployed here (its execution was released meanwhile) is
    /// an error, and the caller must not run it.
    pub fn task_started(&mut self, job: u64, index: usize, task: TaskKey) -> Result<(), SlotError> {
        let (holder, _) = self.live_task(job, index, task)?;
        holder.tasks.insert(task, TaskPhase::Running);
        self.debug_check();
        Ok(())
    }

    /// A task ended, whether it ran or never started. Returns whether its
    /// slot is free now (it was the slot's last task).
    pub fn task_ended(&mut self, job: u64, index: usize, task: TaskKey) -> Result<bool, SlotError> {
        let (holder, _) = self.live_task(job, index, task)?;
        holder.tasks.remove(&task);
        let free = holder.tasks.is_empty() || self.fault_frees(index);
        if free {
            self.slots[index] = None;
        }
        self.debug_check();
        Ok(free)
    }

    /// Whether the injected fault frees slot `index` now: the old bug freed
    /// a slot when no task on it ran.
    #[cfg(test)]
    fn fault_frees(&self, index: usize) -> bool {
        self.fault == Some(Fault::FreeOnFirstEnd)
            && self.slots[index]
                .as_ref()
                .is_some_and(|h| h.running().is_empty())
    }

    #[cfg(not(test))]
    fn fault_frees(&self, _index: usize) -> bool {
        false
    }

    /// Releases execution `job` (canceled, finished, or fenced): its tasks
    /// that never started are dropped, slots without a running task are
    /// free at once, and the others free themselves with their last task.
    pub fn release(&mut self, job: u64) -> Released {
        let mut released = Released::default();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(holder) = slot.as_mut().filter(|h| h.job == job) else {
                continue;
            };
            holder.tasks.retain(|_, p| *p == TaskPhase::Running);
            if holder.tasks.is_empty() {
                *slot = None;
                released.freed.push(index);
            } else {
                holder.releasing = true;
                released.draining.push((index, holder.running()));
            }
        }
        self.debug_check();
        released
    }

    /// The executions holding slots, each once.
    pub fn jobs(&self) -> Vec<u64> {
        let mut jobs: Vec<u64> = self.slots.iter().flatten().map(|h| h.job).collect();
        jobs.sort_unstable();
        jobs.dedup();
        jobs
    }

    /// The slots that are not free.
    pub fn occupied(&self) -> Vec<Occupancy> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                slot.as_ref().map(|h| Occupancy {
                    index,
                    job: h.job,
                    state: h.state(),
                    tasks: h.tasks.keys().copied().collect(),
                })
            })
            .collect()
    }

    pub fn all_free(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Every slot's state and the execution it holds, in one consistent
    /// view (the caller holds the table's lock while it is taken).
    pub fn report(&self) -> Vec<SlotStatus> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| SlotStatus {
                index,
                state: s.as_ref().map_or(SlotState::Free, Holder::state),
                execution: s.as_ref().map(|h| crate::protocol::ExecutionId(h.job)),
                profile: self.profiles[index].clone(),
            })
            .collect()
    }

    /// The table's own invariants: a holder always has a live task, and a
    /// releasing one only running tasks. O(tasks), so debug builds only.
    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        for (index, holder) in self.slots.iter().enumerate() {
            let Some(h) = holder else { continue };
            #[cfg(test)]
            if self.fault.is_some() {
                continue;
            }
            assert!(!h.tasks.is_empty(), "slot {index}: held without a task");
            assert!(
                !h.releasing || h.tasks.values().all(|p| *p == TaskPhase::Running),
                "slot {index}: releasing with a task that never started"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SlotTable {
        SlotTable::new(
            2,
            ResourceProfile {
                cpu_cores: 1.0,
                managed_memory_bytes: 1,
                network_memory_bytes: 1,
                gpu: None,
            },
        )
    }

    fn task(vertex: usize) -> TaskKey {
        TaskKey { vertex, subtask: 0 }
    }

    #[test]
    fn slot_lifecycle_free_allocated_active_free() {
        let mut t = table();
        t.allocate(7, &[(0, task(0)), (0, task(1))]).unwrap();
        assert_eq!(t.report()[0].state, SlotState::Allocated);
        assert_eq!(t.report()[0].execution.map(|e| e.0), Some(7));
        t.task_started(7, 0, task(0)).unwrap();
        t.task_started(7, 0, task(1)).unwrap();
        assert_eq!(t.report()[0].state, SlotState::Active);
        assert_eq!(t.task_ended(7, 0, task(0)), Ok(false));
        assert_eq!(t.report()[0].state, SlotState::Active);
        assert_eq!(t.task_ended(7, 0, task(1)), Ok(true));
        assert_eq!(t.report()[0].state, SlotState::Free);
        assert_eq!(t.report()[0].execution, None);
    }

    /// Issue 14: a source subtask with no input ended before its slot's
    /// other task had started, freed the slot, and the next start panicked
    /// inside the deployment, which hung the job.
    #[test]
    fn a_task_ending_before_its_slot_mates_start_keeps_the_slot() {
        let mut t = table();
        t.allocate(7, &[(0, task(0)), (0, task(1))]).unwrap();
        t.task_started(7, 0, task(0)).unwrap();
        assert_eq!(t.task_ended(7, 0, task(0)), Ok(false));
        assert_eq!(t.report()[0].state, SlotState::Allocated);
        t.task_started(7, 0, task(1)).unwrap();
        assert_eq!(t.task_ended(7, 0, task(1)), Ok(true));
        assert!(t.all_free());
    }

    #[test]
    fn stray_and_late_calls_are_typed_errors() {
        let mut t = table();
        let unknown = |index, job, vertex| SlotError::UnknownTask {
            index,
            job,
            task: task(vertex),
        };
        assert_eq!(t.task_ended(7, 0, task(0)), Err(unknown(0, 7, 0)));
        assert_eq!(t.task_started(7, 1, task(0)), Err(unknown(1, 7, 0)));
        t.allocate(7, &[(0, task(0))]).unwrap();
        assert_eq!(t.task_ended(8, 0, task(0)), Err(unknown(0, 8, 0)));
        assert_eq!(t.task_ended(7, 0, task(3)), Err(unknown(0, 7, 3)));
        assert!(matches!(
            t.task_ended(7, 9, task(0)),
            Err(SlotError::NoSuchSlot { index: 9, count: 2 })
        ));
        assert_eq!(t.task_ended(7, 0, task(0)), Ok(true));
        assert_eq!(t.task_ended(7, 0, task(0)), Err(unknown(0, 7, 0)));
    }

    #[test]
    fn release_frees_idle_slots_at_once_and_running_ones_with_their_last_task() {
        let mut t = table();
        t.allocate(7, &[(0, task(0)), (0, task(1)), (1, task(0))])
            .unwrap();
        t.task_started(7, 0, task(1)).unwrap();
        let released = t.release(7);
        assert_eq!(released.freed, vec![1]);
        assert_eq!(released.draining, vec![(0, vec![task(1)])]);
        assert_eq!(t.report()[0].state, SlotState::Releasing);
        assert_eq!(t.report()[0].execution.map(|e| e.0), Some(7));
        // The dropped task may not start any more; no one may take the slot.
        assert!(t.task_started(7, 0, task(0)).is_err());
        assert!(matches!(
            t.allocate(8, &[(0, task(0))]),
            Err(SlotError::Occupied { index: 0, job: 7 })
        ));
        assert!(matches!(
            t.allocate(7, &[(0, task(0))]),
            Err(SlotError::Releasing { index: 0, .. })
        ));
        assert_eq!(t.task_ended(7, 0, task(1)), Ok(true));
        assert!(t.all_free());
        assert_eq!(t.release(7), Released::default());
    }

    #[test]
    fn a_refused_allocation_changes_nothing() {
        let mut t = table();
        t.allocate(7, &[(1, task(0))]).unwrap();
        assert!(matches!(
            t.allocate(8, &[(0, task(0)), (1, task(0))]),
            Err(SlotError::Occupied { index: 1, job: 7 })
        ));
        assert_eq!(t.report()[0].state, SlotState::Free, "slot 0 stays free");
        assert_eq!(t.jobs(), vec![7]);
    }

    #[test]
    fn gpu_slots_spread_over_the_gpus_and_share_their_memory() {
        let base = table().report()[0].profile.clone();
        let gpu = |ordinal| crate::kernels::gpu::GpuDevice {
            ordinal,
            name: "sim".into(),
            memory_bytes: 10 << 30,
            compute_capability: (9, 0),
            simulated: false,
        };
        let profiles = gpu_slot_profiles(&base, 3, &[gpu(0), gpu(1)]);
        let gpus: Vec<_> = profiles.iter().map(|p| p.gpu).collect();
        let nine_tenths = (10u64 << 30) as f64 * 0.9;
        assert_eq!(
            gpus,
            vec![
                Some((0, (nine_tenths / 2.0) as u64)),
                Some((1, nine_tenths as u64)),
                Some((0, (nine_tenths / 2.0) as u64)),
            ]
        );
        let cpu_only = gpu_slot_profiles(&base, 2, &[]);
        assert!(cpu_only.iter().all(|p| p.gpu.is_none()));
        let table = SlotTable::with_profiles(profiles);
        assert_eq!(table.report()[1].profile.gpu.map(|g| g.0), Some(1));
    }

    #[test]
    fn occupied_slot_refuses_another_job_but_not_the_same() {
        let mut t = table();
        t.allocate(7, &[(1, task(0))]).unwrap();
        t.allocate(7, &[(1, task(0)), (1, task(1))]).unwrap();
        assert_eq!(t.occupied()[0].tasks, vec![task(0), task(1)]);
        assert!(matches!(
            t.allocate(8, &[(1, task(0))]),
            Err(SlotError::Occupied { index: 1, job: 7 })
        ));
        assert!(matches!(
            t.allocate(8, &[(5, task(0))]),
            Err(SlotError::NoSuchSlot { .. })
        ));
    }
}

/// A seeded random-order simulation of the slot table: deployments of several
/// executions allocate, their tasks start and end in any order, stray and
/// late calls arrive, executions are released (canceled or finished) and the
/// whole table is fenced. A model that only records what was done (which
/// tasks live where) checks the table after every step. A failure prints its
/// seed; `STRATA_SIM_SEED=<n> cargo nextest run --lib slots::sim` replays it.
#[cfg(test)]
mod sim {
    use std::collections::HashSet;

    use super::*;
    use crate::network::sim::SplitMix64;

    const SLOT_COUNT: usize = 4;
    const STEPS: usize = 400;
    /// Executions at and above this id are never deployed.
    const UNKNOWN_JOB: u64 = 1 << 40;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Phase {
        Deployed,
        Running,
    }

    #[derive(Clone, Copy, Debug)]
    struct Live {
        job: u64,
        slot: usize,
        task: TaskKey,
        phase: Phase,
    }

    /// What the simulation did, independent of how the table does it.
    #[derive(Default)]
    struct Model {
        live: Vec<Live>,
        released: HashSet<u64>,
        next_job: u64,
    }

    impl Model {
        fn on_slot(&self, slot: usize) -> impl Iterator<Item = &Live> {
            self.live.iter().filter(move |l| l.slot == slot)
        }

        fn live_jobs(&self) -> Vec<u64> {
            let mut jobs: Vec<u64> = self.live.iter().map(|l| l.job).collect();
            jobs.sort_unstable();
            jobs.dedup();
            jobs
        }

        /// The error an allocation must get, if any.
        fn refusal(&self, job: u64, placements: &[(usize, TaskKey)]) -> Option<SlotError> {
            placements.iter().find_map(|&(index, _)| {
                if index >= SLOT_COUNT {
                    return Some(SlotError::NoSuchSlot {
                        index,
                        count: SLOT_COUNT,
                    });
                }
                let holder = self.on_slot(index).next()?.job;
                (holder != job).then_some(SlotError::Occupied { index, job: holder })
            })
        }
    }

    fn seeds(count: u64) -> Vec<u64> {
        match std::env::var("STRATA_SIM_SEED") {
            Ok(seed) => vec![seed.parse().expect("STRATA_SIM_SEED=<u64>")],
            Err(_) => (0..count).collect(),
        }
    }

    fn random_task(rng: &mut SplitMix64) -> TaskKey {
        TaskKey {
            vertex: rng.below(3) as usize,
            subtask: rng.below(2) as u32,
        }
    }

    /// One step; returns what went wrong, if anything.
    fn step(rng: &mut SplitMix64, table: &mut SlotTable, model: &mut Model) -> Result<(), String> {
        let op = rng.below(100);
        if op < 20 {
            // A deployment: a new execution, or more tasks of a live one.
            let unreleased: Vec<u64> = model
                .live_jobs()
                .into_iter()
                .filter(|j| !model.released.contains(j))
                .collect();
            let job = if !unreleased.is_empty() && rng.chance(3, 10) {
                unreleased[rng.below(unreleased.len() as u64) as usize]
            } else {
                model.next_job += 1;
                model.next_job
            };
            let placements: Vec<(usize, TaskKey)> = (0..rng.range(1, 3))
                .map(|_| {
                    let slot = if rng.chance(1, 30) {
                        SLOT_COUNT
                    } else {
                        rng.below(SLOT_COUNT as u64) as usize
                    };
                    (slot, random_task(rng))
                })
                .collect();
            let expected = model.refusal(job, &placements);
            let got = table.allocate(job, &placements);
            match (expected, got) {
                (None, Ok(())) => {
                    for (slot, task) in placements {
                        let known = model
                            .live
                            .iter()
                            .any(|l| (l.job, l.slot, l.task) == (job, slot, task));
                        if !known {
                            let phase = Phase::Deployed;
                            model.live.push(Live {
                                job,
                                slot,
                                task,
                                phase,
                            });
                        }
                    }
                }
                (Some(e), Err(g)) if e == g => {}
                (e, g) => {
                    return Err(format!(
                        "allocate {job} {placements:?}: {g:?}, expected {e:?}"
                    ));
                }
            }
        } else if op < 45 {
            // A deployed task starts (or, rarely, one that is not deployed).
            let deployed: Vec<usize> = (0..model.live.len())
                .filter(|&i| model.live[i].phase == Phase::Deployed)
                .collect();
            if deployed.is_empty() || rng.chance(1, 20) {
                return stray(rng, table, model, true);
            }
            let i = deployed[rng.below(deployed.len() as u64) as usize];
            let l = model.live[i];
            if let Err(e) = table.task_started(l.job, l.slot, l.task) {
                return Err(format!("start {l:?}: {e}"));
            }
            model.live[i].phase = Phase::Running;
        } else if op < 75 {
            // A live task ends: it ran, or its deployment rolled back.
            if model.live.is_empty() {
                return Ok(());
            }
            let l = model
                .live
                .swap_remove(rng.below(model.live.len() as u64) as usize);
            let last = model.on_slot(l.slot).next().is_none();
            match table.task_ended(l.job, l.slot, l.task) {
                Ok(freed) if freed == last => {}
                got => return Err(format!("end {l:?}: {got:?}, expected Ok({last})")),
            }
        } else if op < 82 {
            return stray(rng, table, model, false);
        } else if op < 94 {
            // CancelJob or ReleaseJob for a live or ended execution, or one
            // this TaskManager never saw (ids the simulation never deploys).
            let job = if rng.chance(1, 10) {
                UNKNOWN_JOB + rng.below(4)
            } else {
                rng.below(model.next_job + 1)
            };
            release(table, model, job)?;
        } else {
            // Fencing: every execution is released.
            for job in model.live_jobs() {
                release(table, model, job)?;
            }
        }
        Ok(())
    }

    /// A start or end of a task that does not live here must be refused.
    fn stray(
        rng: &mut SplitMix64,
        table: &mut SlotTable,
        model: &Model,
        start: bool,
    ) -> Result<(), String> {
        let job = rng.below(model.next_job + 2);
        let index = rng.below(SLOT_COUNT as u64) as usize;
        let task = random_task(rng);
        let live = model
            .live
            .iter()
            .any(|l| (l.job, l.slot, l.task) == (job, index, task));
        if live {
            return Ok(());
        }
        let got = if start {
            table.task_started(job, index, task)
        } else {
            table.task_ended(job, index, task).map(|_| ())
        };
        let expected = SlotError::UnknownTask { index, job, task };
        match got {
            Err(e) if e == expected => Ok(()),
            got => Err(format!(
                "stray {} of {task} of job {job} on slot {index}: {got:?}",
                if start { "start" } else { "end" }
            )),
        }
    }

    fn release(table: &mut SlotTable, model: &mut Model, job: u64) -> Result<(), String> {
        let mut expected = Released::default();
        for index in 0..SLOT_COUNT {
            let mine: Vec<Live> = model
                .on_slot(index)
                .filter(|l| l.job == job)
                .copied()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut running: Vec<TaskKey> = mine
                .iter()
                .filter(|l| l.phase == Phase::Running)
                .map(|l| l.task)
                .collect();
            running.sort_unstable();
            if running.is_empty() {
                expected.freed.push(index);
            } else {
                expected.draining.push((index, running));
            }
        }
        model
            .live
            .retain(|l| l.job != job || l.phase == Phase::Running);
        model.released.insert(job);
        let got = table.release(job);
        if got != expected {
            return Err(format!("release {job}: {got:?}, expected {expected:?}"));
        }
        Ok(())
    }

    /// The invariants, from the table's report against the model.
    fn check(table: &SlotTable, model: &Model) -> Result<(), String> {
        let report = table.report();
        for (index, status) in report.iter().enumerate() {
            let live: Vec<&Live> = model.on_slot(index).collect();
            let jobs: HashSet<u64> = live.iter().map(|l| l.job).collect();
            if jobs.len() > 1 {
                return Err(format!("slot {index} is held by executions {jobs:?}"));
            }
            let running = live.iter().filter(|l| l.phase == Phase::Running).count();
            let expected = match live.first() {
                None => SlotState::Free,
                Some(l) if model.released.contains(&l.job) => SlotState::Releasing,
                Some(_) if running > 0 => SlotState::Active,
                Some(_) => SlotState::Allocated,
            };
            let job = live.first().map(|l| l.job);
            if (status.state, status.execution.map(|e| e.0)) != (expected, job) {
                return Err(format!(
                    "slot {index} reports {:?} of {:?}; {} live tasks ({running} running) of {job:?} expect {expected:?}",
                    status.state,
                    status.execution,
                    live.len(),
                ));
            }
        }
        let mut occupied_tasks: Vec<(usize, TaskKey)> = table
            .occupied()
            .iter()
            .flat_map(|o| o.tasks.iter().map(move |t| (o.index, *t)))
            .collect();
        let mut live_tasks: Vec<(usize, TaskKey)> =
            model.live.iter().map(|l| (l.slot, l.task)).collect();
        occupied_tasks.sort_unstable();
        live_tasks.sort_unstable();
        if occupied_tasks != live_tasks {
            return Err(format!(
                "the table holds tasks {occupied_tasks:?}, the live ones are {live_tasks:?}"
            ));
        }
        if table.all_free() != model.live.is_empty() {
            return Err("all_free disagrees with the live tasks".into());
        }
        Ok(())
    }

    fn run(seed: u64, fault: Option<Fault>) -> Result<(), String> {
        let mut rng = SplitMix64(seed);
        let profile = ResourceProfile {
            cpu_cores: 1.0,
            managed_memory_bytes: 1,
            network_memory_bytes: 1,
            gpu: None,
        };
        let mut table = SlotTable::new(SLOT_COUNT, profile);
        if let Some(fault) = fault {
            table.inject(fault);
        }
        let mut model = Model::default();
        for tick in 0..STEPS {
            step(&mut rng, &mut table, &mut model)
                .and_then(|()| check(&table, &model))
                .map_err(|detail| {
                    format!(
                        "seed={seed} step={tick}: {detail} (replay: STRATA_SIM_SEED={seed} cargo nextest run --lib slots::sim)"
                    )
                })?;
        }
        Ok(())
    }

    #[test]
    fn slot_table_keeps_its_invariants_in_any_order() {
        for seed in seeds(500) {
            if let Err(failure) = run(seed, None) {
                panic!("{failure}");
            }
        }
    }

    /// The checker is worth something only if it catches the bug of issue
    /// 14: a slot that frees itself when no task runs, although tasks
    /// deployed on it have not started yet.
    #[test]
    fn checker_catches_a_slot_freed_on_its_first_task_end() {
        let failures: Vec<String> = seeds(100)
            .into_iter()
            .filter_map(|seed| run(seed, Some(Fault::FreeOnFirstEnd)).err())
            .collect();
        // A replayed seed (STRATA_SIM_SEED) need not meet the fault.
        if std::env::var("STRATA_SIM_SEED").is_err() {
            assert!(failures.iter().all(|f| f.contains("seed=")), "{failures:?}");
            assert!(
                failures.len() > 50,
                "only {} of 100 seeds noticed",
                failures.len()
            );
        }
    }
}
