//! The resource manager: TaskManager instances, their connections and slot
//! views, and the heartbeat monitor's bookkeeping.
//!
//! Each slot has two views: the JobManager's allocation (which job it
//! deployed there) and the TaskManager's own report (which execution holds
//! it, from the latest heartbeat or slot report). A slot is free for the
//! scheduler only when both say so, so a slot whose old tasks are still
//! ending is never deployed onto ("slot occupied"), and a slot the
//! TaskManager still holds for an ended execution is noticed and canceled.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use super::ConnId;
use crate::protocol::{
    ExecutionId, JobId, ResourceUsage, SlotState, SlotStatus, TaskManagerId, TaskManagerInfo,
};

/// Who is at the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Has not said who it is yet.
    New,
    TaskManager(TaskManagerId),
    Client,
    /// Declared lost or refused: nothing it sends is read.
    Fenced,
}

/// What a TaskManager says when it registers.
pub struct Registration {
    pub data_addr: SocketAddr,
    pub slots: Vec<SlotStatus>,
    pub io: String,
    pub transport: String,
    pub gpu: String,
    pub flight_addr: Option<SocketAddr>,
}

pub struct TaskManagerEntry {
    pub id: TaskManagerId,
    pub conn: ConnId,
    pub data_addr: SocketAddr,
    pub io: String,
    pub transport: String,
    pub gpu: String,
    /// Where it serves `flight_sink` partitions (`None`: no Flight server).
    pub flight_addr: Option<SocketAddr>,
    /// The TaskManager's own view, from its latest report.
    pub reported: Vec<SlotStatus>,
    /// The JobManager's allocations: the job and execution deployed there.
    pub allocated: Vec<Option<(JobId, ExecutionId)>>,
    pub last_heartbeat: Duration,
    /// Memory in use, from the latest heartbeat that carried it.
    pub usage: Option<ResourceUsage>,
}

impl TaskManagerEntry {
    fn slot_is_free(&self, index: usize) -> bool {
        self.allocated[index].is_none()
            && self
                .reported
                .get(index)
                .is_some_and(|s| s.execution.is_none() && s.state == SlotState::Free)
    }
}

#[derive(Default)]
pub struct ResourceManager {
    taskmanagers: BTreeMap<TaskManagerId, TaskManagerEntry>,
    conns: HashMap<ConnId, Peer>,
    next_id: u64,
}

impl ResourceManager {
    pub fn peer(&self, conn: ConnId) -> Peer {
        self.conns.get(&conn).copied().unwrap_or(Peer::New)
    }

    pub fn set_client(&mut self, conn: ConnId) {
        self.conns.insert(conn, Peer::Client);
    }

    pub fn fence_conn(&mut self, conn: ConnId) {
        self.conns.insert(conn, Peer::Fenced);
    }

    pub fn forget_conn(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// A new instance; each registration gets a new id.
    pub fn register(&mut self, conn: ConnId, r: Registration, now: Duration) -> TaskManagerId {
        self.next_id += 1;
        let id = TaskManagerId(self.next_id);
        let allocated = vec![None; r.slots.len()];
        tracing::info!(
            "TaskManager {id} registered ({} slots, data port {})",
            r.slots.len(),
            r.data_addr
        );
        self.taskmanagers.insert(
            id,
            TaskManagerEntry {
                id,
                conn,
                data_addr: r.data_addr,
                io: r.io,
                transport: r.transport,
                gpu: r.gpu,
                flight_addr: r.flight_addr,
                reported: r.slots,
                allocated,
                last_heartbeat: now,
                usage: None,
            },
        );
        self.conns.insert(conn, Peer::TaskManager(id));
        id
    }

    pub fn heartbeat(
        &mut self,
        tm: TaskManagerId,
        slots: Vec<SlotStatus>,
        usage: Option<ResourceUsage>,
        now: Duration,
    ) {
        if let Some(t) = self.taskmanagers.get_mut(&tm) {
            t.last_heartbeat = now;
            if usage.is_some() {
                t.usage = usage;
            }
            if slots.len() == t.allocated.len() {
                t.reported = slots;
            } else {
                tracing::warn!(
                    "{tm} reported {} slots, registered {}; report ignored",
                    slots.len(),
                    t.allocated.len()
                );
            }
        }
    }

    /// Removes an instance and fences its connection.
    pub fn remove(&mut self, tm: TaskManagerId) -> Option<TaskManagerEntry> {
        let entry = self.taskmanagers.remove(&tm)?;
        self.conns.insert(entry.conn, Peer::Fenced);
        Some(entry)
    }

    pub fn get(&self, tm: TaskManagerId) -> Option<&TaskManagerEntry> {
        self.taskmanagers.get(&tm)
    }

    pub fn contains(&self, tm: TaskManagerId) -> bool {
        self.taskmanagers.contains_key(&tm)
    }

    pub fn len(&self) -> usize {
        self.taskmanagers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.taskmanagers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TaskManagerEntry> {
        self.taskmanagers.values()
    }

    /// Instances whose last heartbeat is older than `timeout`, with how
    /// long they have been silent.
    pub fn silent_longer_than(
        &self,
        timeout: Duration,
        now: Duration,
    ) -> Vec<(TaskManagerId, Duration)> {
        self.taskmanagers
            .values()
            .filter_map(|t| {
                let silent = now.saturating_sub(t.last_heartbeat);
                (silent > timeout).then_some((t.id, silent))
            })
            .collect()
    }

    /// Free slots, interleaved across TaskManagers so a job spreads evenly
    /// (Flink's `taskmanager.load-balance.mode: SLOTS`).
    pub fn free_slots(&self) -> Vec<(TaskManagerId, usize)> {
        let max = self
            .taskmanagers
            .values()
            .map(|t| t.allocated.len())
            .max()
            .unwrap_or(0);
        let mut out = Vec::new();
        for slot in 0..max {
            for t in self.taskmanagers.values() {
                if slot < t.allocated.len() && t.slot_is_free(slot) {
                    out.push((t.id, slot));
                }
            }
        }
        out
    }

    /// Slots the JobManager has not allocated that their TaskManager still
    /// reports held: they become free when its tasks there end.
    pub fn releasing_slots(&self) -> usize {
        self.taskmanagers
            .values()
            .map(|t| {
                (0..t.allocated.len())
                    .filter(|&i| t.allocated[i].is_none() && !t.slot_is_free(i))
                    .count()
            })
            .sum()
    }

    pub fn total_slots(&self) -> usize {
        self.taskmanagers.values().map(|t| t.allocated.len()).sum()
    }

    pub fn allocate(&mut self, tm: TaskManagerId, slot: usize, job: JobId, exec: ExecutionId) {
        if let Some(t) = self.taskmanagers.get_mut(&tm) {
            assert!(
                t.allocated[slot].is_none(),
                "{tm}/slot{slot} allocated twice"
            );
            t.allocated[slot] = Some((job, exec));
        }
    }

    /// Drops the JobManager's allocations of `job`. The slots become
    /// schedulable when their TaskManager reports them free.
    pub fn free_job(&mut self, job: JobId) {
        for t in self.taskmanagers.values_mut() {
            for a in &mut t.allocated {
                if a.is_some_and(|(j, _)| j == job) {
                    *a = None;
                }
            }
        }
    }

    pub fn infos(&self, now: Duration) -> Vec<TaskManagerInfo> {
        self.taskmanagers
            .values()
            .map(|t| TaskManagerInfo {
                id: t.id,
                data_addr: t.data_addr,
                slots: t.reported.clone(),
                allocated: t.allocated.iter().map(|a| a.map(|(j, _)| j)).collect(),
                last_heartbeat_ms: now.saturating_sub(t.last_heartbeat).as_millis() as u64,
                io: t.io.clone(),
                transport: t.transport.clone(),
                gpu: t.gpu.clone(),
                usage: t.usage.clone(),
                spill_bytes_written: 0,
            })
            .collect()
    }

    pub fn gpu_slot(&self) -> Option<(String, u32, u64)> {
        self.taskmanagers.values().find_map(|t| {
            t.reported.iter().find_map(|s| {
                s.profile
                    .gpu
                    .map(|(id, bytes)| (format!("{} on {}", t.gpu, t.id), id, bytes))
            })
        })
    }
}
