//! The TaskManager: slots, memory, the data plane, and the tasks it runs.
//!
//! Start-up allocates (and pre-touches) managed memory and the network
//! buffer pool from the memory layout, starts the data server, then
//! registers with the JobManager — retrying with exponential backoff from
//! `cluster.registration.initial-timeout` to `max-timeout` and giving up
//! after `taskmanager.registration.timeout`. While registered it sends a
//! heartbeat with its slot report every `heartbeat.interval`, runs the tasks
//! it is deployed, and reports their states and metrics.

mod deploy;
pub mod slots;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::config::Config;
use crate::io::{IoConfig, IoManager};
use crate::memory::{Commit, MemoryManager, NetworkBufferPool, PagePool};
use crate::metrics::TaskMetrics;
use crate::network::NetworkRegistry;
use crate::network::tcp::{ConnectionManager, DataServer, DataServerOptions};
use crate::network::transport;
use crate::protocol::{
    CheckpointId, ExecutionId, Message, ResourceProfile, RpcError, TaskManagerId, read_message,
    write_message,
};
use crate::security::PeerAuth;
use slots::SlotTable;

#[derive(Debug, thiserror::Error)]
pub enum TaskManagerError {
    #[error(
        "could not register with the JobManager at {address} within {timeout:?} \
         (taskmanager.registration.timeout): {last_error}"
    )]
    RegistrationTimeout {
        address: String,
        timeout: Duration,
        last_error: String,
    },
    #[error("cannot start the data server on {address}: {source}")]
    DataServer {
        address: String,
        #[source]
        source: crate::network::tcp::DataServerError,
    },
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    #[error(transparent)]
    Transport(crate::network::transport::TransportError),
    #[error("starting the IOManager: {0}")]
    Io(#[source] crate::io::IoError),
    #[error("allocating managed memory and network buffers failed: {reason}")]
    MemoryPools { reason: String },
    #[error("invalid TaskManager address '{address}': {reason}")]
    Address { address: String, reason: String },
}

/// A running job's tasks on this TaskManager: one execution, from its
/// deployment until its last task thread ended.
struct JobTasks {
    canceled: Arc<AtomicBool>,
    /// Task threads started and not yet ended.
    running: usize,
    /// The deployment is still starting tasks: the entry stays while it
    /// does, even when every thread started so far has already ended.
    deploying: bool,
    tasks: Vec<(usize, u32, Arc<TaskMetrics>)>,
    /// Control channels of the job's tasks (with checkpointing on).
    controls: Vec<TaskControlHandle>,
}

/// Where the TaskManager sends a task's checkpoint messages.
struct TaskControlHandle {
    vertex: usize,
    subtask: u32,
    sender: std::sync::mpsc::SyncSender<crate::exec::task::TaskControl>,
}

/// Control messages queued per task at most: a task reads them between
/// batches, and the JobManager has one checkpoint in flight at a time.
const TASK_CONTROL_MAX: usize = 64;

/// Delivers a checkpoint control message to every task of a job (a task
/// that has nothing to do with it ignores it). A task whose queue is full
/// declines a trigger, so the checkpoint is aborted rather than left to time
/// out.
fn deliver_control(
    services: &Services,
    out: &UnboundedSender<Message>,
    job: u64,
    control: crate::exec::task::TaskControl,
) {
    use crate::exec::task::TaskControl;
    let jobs = lock(&services.jobs);
    let Some(tasks) = jobs.get(&job) else {
        if let TaskControl::TriggerCheckpoint(checkpoint) = control {
            tracing::debug!("checkpoint {checkpoint} for job {job:016x}: no task here");
        }
        return;
    };
    for h in &tasks.controls {
        // A task that ended has dropped its receiver: the JobManager hears
        // of its end from its status. A full queue declines the barrier.
        if let Err(e @ std::sync::mpsc::TrySendError::Full(_)) = h.sender.try_send(control)
            && let TaskControl::TriggerCheckpoint(checkpoint) = control
        {
            let _ = out.send(Message::DeclineCheckpoint {
                execution: ExecutionId(job),
                vertex: h.vertex,
                subtask: h.subtask,
                checkpoint: CheckpointId(checkpoint),
                reason: format!("the task cannot take a barrier now: {e}"),
            });
        }
    }
}

/// Services shared by the TaskManager's tasks.
pub struct Services {
    pub config: Config,
    /// This instance's id (`tm-0` until it registers).
    pub name: Mutex<TaskManagerId>,
    pub slot_memory: Vec<MemoryManager>,
    pub netpool: Arc<NetworkBufferPool>,
    pub registry: Arc<NetworkRegistry>,
    pub connections: ConnectionManager,
    /// The data-plane transport and why it was chosen (log, summary, metric).
    pub transport: String,
    pub data_addr: SocketAddr,
    /// Spill storage, shared by the tasks' spilling operators.
    pub io: Arc<IoManager>,
    slots: Mutex<SlotTable>,
    jobs: Mutex<HashMap<u64, JobTasks>>,
    /// Woken whenever a task thread ended or a deployment was rolled back,
    /// for the fence that waits for slots to become free.
    task_ended: tokio::sync::Notify,
    /// Each GPU slot's kernel backend; `None` for a CPU slot (or a GPU that
    /// could not be opened, which the log says).
    /// Each GPU slot's backend and health (a device error takes it out of
    /// service until it is reopened); `None` for CPU slots.
    pub gpu_kernels: Vec<Option<Arc<crate::kernels::health::DeviceSlot>>>,
    /// Each GPU slot's device-memory budget, for the usage report.
    gpu_memory: Vec<Option<crate::kernels::gpu::pool::SlotPool>>,
    /// The `flight_sink` partitions this TaskManager serves.
    pub flight: Arc<crate::flight::FlightStreams>,
    /// Where they are served.
    pub flight_addr: SocketAddr,
}

impl Services {
    /// Memory in use now, for the periodic heartbeat (the web UI shows it
    /// against the slot profiles' budgets).
    pub fn usage(&self) -> crate::protocol::ResourceUsage {
        crate::protocol::ResourceUsage {
            managed_used_bytes: self.slot_memory.iter().map(|m| m.used_bytes()).collect(),
            // In use: handed out and not returned (`allocated_count` counts
            // segments committed so far, which the pool keeps).
            network_segments_used: (self.netpool.segment_count() - self.netpool.available_count())
                as u64,
            network_segment_count: self.netpool.segment_count() as u64,
            network_segment_size_bytes: self.netpool.segment_size_bytes() as u64,
            gpu_used_bytes: self
                .gpu_memory
                .iter()
                .map(|p| p.as_ref().map_or(0, |p| p.in_use_bytes()))
                .collect(),
        }
    }
}

/// 1 MiB spill buffers per TaskManager (16 MiB, pre-touched).
const IO_BUFFERS_MAX: usize = 16;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Services {
    pub fn name(&self) -> TaskManagerId {
        *lock(&self.name)
    }

    /// Cancels execution `job` (CancelJob, ReleaseJob, a fence): sets its
    /// tasks' cancel flag, unregisters its gates and partitions, and releases
    /// its slots; those whose tasks still run free themselves as the tasks
    /// end.
    fn release(&self, job: u64, reason: &str) {
        if let Some(tasks) = lock(&self.jobs).get(&job) {
            tasks.canceled.store(true, Ordering::Relaxed);
        }
        self.registry.release_job(job, reason);
        let released = lock(&self.slots).release(job);
        if !released.freed.is_empty() || !released.draining.is_empty() {
            tracing::debug!("job {job:016x} released: {released:?}");
        }
    }

    /// Fences this TaskManager after it lost its session with the
    /// JobManager, which has given its tasks up by now: cancels every
    /// execution and waits, at most `bound`, until every task thread has
    /// ended and every slot is free. Returns the slots still held; they stay
    /// reported occupied until their tasks end.
    async fn fence(&self, reason: &str, bound: Duration) -> Vec<slots::Occupancy> {
        let mut jobs: Vec<u64> = lock(&self.jobs).keys().copied().collect();
        jobs.extend(lock(&self.slots).jobs());
        jobs.sort_unstable();
        jobs.dedup();
        for &job in &jobs {
            tracing::warn!("canceling job {job:016x}: {reason}");
            self.release(job, reason);
        }
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            // Registered before the check, so that an end between the check
            // and the wait is not missed.
            let ended = self.task_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let running: usize = lock(&self.jobs).values().map(|t| t.running).sum();
            let occupied = lock(&self.slots).occupied();
            if running == 0 && occupied.is_empty() {
                return Vec::new();
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                for o in &occupied {
                    tracing::error!(
                        "slot {} stays {:?}: tasks {:?} of job {:016x} did not stop within {bound:?}                          after the cancel; it is reported occupied until they end",
                        o.index,
                        o.state,
                        o.tasks,
                        o.job
                    );
                }
                return occupied;
            }
        }
    }
}

/// The message of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".to_owned())
}

type GpuSlots = (
    Vec<Option<Arc<crate::kernels::health::DeviceSlot>>>,
    Vec<Option<crate::kernels::gpu::pool::SlotPool>>,
);

/// One kernel backend per GPU slot, each within its slot's device budget,
/// with what reopens it after a device error; and each slot's budget, for
/// the usage report.
fn open_gpu_slots(
    profiles: &[ResourceProfile],
    devices: &[crate::kernels::gpu::GpuDevice],
) -> GpuSlots {
    use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
    let pools: Vec<Option<DevicePool>> = devices
        .iter()
        .map(|device| {
            let budgets: Vec<u64> = profiles
                .iter()
                .filter_map(|p| p.gpu.filter(|(id, _)| *id == device.ordinal))
                .map(|(_, bytes)| bytes)
                .collect();
            let config = PoolConfig {
                pool_bytes_max: budgets.iter().sum(),
                slot_count: budgets.len(),
                slot_budget_bytes: budgets.iter().copied().min().unwrap_or(0),
            };
            DevicePool::new(config)
                .map_err(|e| {
                    tracing::warn!("GPU {}: {e}; its slots run on the CPU", device.ordinal)
                })
                .ok()
        })
        .collect();
    let mut next_in_pool = vec![0usize; devices.len()];
    let mut budgets = Vec::with_capacity(profiles.len());
    let backends = profiles
        .iter()
        .enumerate()
        .map(|(slot_index, profile)| {
            budgets.push(None);
            let (id, _) = profile.gpu?;
            let device_index = devices.iter().position(|d| d.ordinal == id)?;
            let pool = pools[device_index].as_ref()?;
            let slot_pool = pool.slot(next_in_pool[device_index]);
            next_in_pool[device_index] += 1;
            budgets[slot_index] = Some(slot_pool.clone());
            let device = devices[device_index].clone();
            let backend = crate::kernels::gpu::open_backend(&device, slot_pool.clone())
                .map_err(|e| {
                    tracing::warn!("slot {slot_index}: cannot open GPU {id} ({e}); its GPU operators run on the CPU")
                })
                .ok()?;
            let reopen = move || crate::kernels::gpu::open_backend(&device, slot_pool.clone());
            Some(Arc::new(crate::kernels::health::DeviceSlot::new(
                backend,
                Box::new(reopen),
            )))
        })
        .collect();
    (backends, budgets)
}

/// A TaskManager that has started its services but not yet registered.
pub struct TaskManager {
    services: Arc<Services>,
}

impl TaskManager {
    /// Allocates memory and starts the data server.
    pub async fn start(config: Config) -> Result<Self, TaskManagerError> {
        let layout = *config.memory_layout();
        let slot_count = config.slot_count as usize;
        let page_size = config.page_size_bytes as usize;
        let segment_size = config.segment_size_bytes as usize;
        let commit = if config.pre_allocate {
            Commit::PreTouched
        } else {
            Commit::OnFirstUse
        };
        // Pre-touching hundreds of MiB takes seconds: keep it off the async workers.
        let (pages, netpool) = tokio::task::spawn_blocking(move || {
            (
                PagePool::with_commit(
                    layout.managed_per_slot * slot_count as u64,
                    page_size,
                    commit,
                ),
                NetworkBufferPool::with_commit(
                    layout.network_segment_count as usize,
                    segment_size,
                    commit,
                ),
            )
        })
        .await
        .map_err(|e| TaskManagerError::MemoryPools {
            reason: e.to_string(),
        })?;
        let io_config = IoConfig {
            tmp_dirs: config.tmp_dirs.clone(),
            backend: match config.io_backend {
                crate::config::IoBackend::Auto => crate::io::BackendChoice::Auto,
                crate::config::IoBackend::Uring => crate::io::BackendChoice::Uring,
                crate::config::IoBackend::ThreadPool => crate::io::BackendChoice::ThreadPool,
            },
            buf_count_max: IO_BUFFERS_MAX,
            ..IoConfig::default()
        };
        let io = tokio::task::spawn_blocking(move || IoManager::new(io_config))
            .await
            .map_err(|e| TaskManagerError::MemoryPools {
                reason: e.to_string(),
            })?
            .map_err(TaskManagerError::Io)
            .map(Arc::new)?;
        tracing::info!("{}", io.summary());
        let slot_memory = (0..slot_count)
            .map(|i| pages.slot_manager(i, layout.managed_per_slot))
            .collect();
        let registry = Arc::new(NetworkRegistry::default());
        let bind = format!("{}:{}", config.host, config.data_port);
        let bind_addr: SocketAddr = tokio::net::lookup_host(&bind)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| TaskManagerError::Address {
                address: bind.clone(),
                reason: "cannot resolve taskmanager.host".into(),
            })?;
        let transport = transport::choose(config.transport, &config.host, &netpool)
            .map_err(TaskManagerError::Transport)?;
        tracing::info!(
            "data-plane transport {}: {}",
            transport.kind.name(),
            transport.reason
        );
        let auth = PeerAuth::from_config(&config)?;
        let server = DataServer::start(
            bind_addr,
            Arc::clone(&registry),
            transport.verbs.clone(),
            DataServerOptions::new(&config, auth.clone()),
        )
        .await
        .map_err(|source| TaskManagerError::DataServer {
            address: bind.clone(),
            source,
        })?;
        let flight = Arc::new(crate::flight::FlightStreams::default());
        let flight_bind = format!("{}:{}", config.host, config.taskmanager_flight_port);
        let flight_addr = crate::flight::serve(
            crate::flight::TaskManagerFlight::new(Arc::clone(&flight), auth.secret.as_ref()),
            &flight_bind,
        )
        .await
        .map_err(|e| TaskManagerError::Address {
            address: flight_bind.clone(),
            reason: e.to_string(),
        })?;
        let profile = ResourceProfile {
            cpu_cores: 1.0,
            managed_memory_bytes: layout.managed_per_slot,
            network_memory_bytes: layout.network / slot_count.max(1) as u64,
            gpu: None,
        };
        let gpu = crate::kernels::gpu::detect();
        let profiles = slots::gpu_slot_profiles(&profile, slot_count, gpu.devices());
        let gpu_slot_count = profiles.iter().filter(|p| p.gpu.is_some()).count();
        // Over TCP, gates read their own connections on their task threads
        // (`taskmanager.network.tcp.task-reads`).
        let transport_name = if transport.verbs.is_none() && config.tcp_task_reads {
            format!("{}, task reads", transport.kind.name())
        } else {
            transport.kind.name().to_owned()
        };
        tracing::info!(
            "TaskManager started: {slot_count} slots ({gpu_slot_count} with a GPU; {}), managed memory {} MiB ({} pages of {} KiB, pre-touched), network {} segments of {} KiB, data port {}, transport {} ({})",
            gpu.describe(),
            layout.managed >> 20,
            pages.page_count(),
            page_size >> 10,
            layout.network_segment_count,
            config.segment_size_bytes >> 10,
            server.local_addr,
            transport_name,
            transport.reason
        );
        let (gpu_kernels, gpu_memory) = open_gpu_slots(&profiles, gpu.devices());
        Ok(Self {
            services: Arc::new(Services {
                name: Mutex::new(TaskManagerId(0)),
                slot_memory,
                netpool,
                registry,
                connections: ConnectionManager::new(transport.verbs.clone(), auth),
                transport: format!("{transport_name} ({})", transport.reason),
                data_addr: server.local_addr,
                io,
                gpu_kernels,
                gpu_memory,
                slots: Mutex::new(SlotTable::with_profiles(profiles)),
                jobs: Mutex::default(),
                task_ended: tokio::sync::Notify::new(),
                flight,
                flight_addr,
                config,
            }),
        })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.services.data_addr
    }

    /// Registers with the JobManager and serves it until `shutdown` is set.
    /// After losing the JobManager (connection closed, silent for
    /// `heartbeat.timeout`, or this process paused for longer) it fences
    /// itself, cancelling every task and waiting for their slots, and then
    /// registers again as a new TaskManager.
    pub async fn run(
        self,
        jobmanager: String,
        shutdown: Arc<AtomicBool>,
    ) -> Result<(), TaskManagerError> {
        let services = self.services;
        let config = &services.config;
        // Sessions the JobManager ends at once (it refuses this TaskManager,
        // or restarts in a loop) are retried with the registration backoff,
        // not in a tight loop.
        let mut backoff = config.registration_initial_timeout;
        loop {
            let started = Instant::now();
            let auth = services.connections.auth();
            let stream = connect_with_backoff(&jobmanager, config, auth, &shutdown).await?;
            let Some(stream) = stream else {
                return Ok(());
            };
            // The session runs in its own task, so that a panic in it ends
            // the session (and fences) instead of the TaskManager.
            let ended = tokio::spawn(session(
                stream,
                Arc::clone(&services),
                Arc::clone(&shutdown),
            ))
            .await;
            let error = match ended {
                Ok(Ok(())) => {
                    // Shutting down: stop every task first, so that their
                    // spill directories and partitions go with them.
                    let stuck = services
                        .fence("the TaskManager is shutting down", config.heartbeat_timeout)
                        .await;
                    if stuck.is_empty() {
                        // Every task has stopped: no spill file is in use.
                        services.io.remove_spill_dirs();
                    } else {
                        tracing::warn!("shutting down with {} slot(s) still held", stuck.len());
                    }
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(e) => joined("session", Err::<(), _>(e)),
            };
            tracing::warn!(
                "lost the session with the JobManager at {jobmanager}: {error}; \
                 canceling every task before registering again"
            );
            let stuck = services
                .fence("lost the JobManager", config.heartbeat_timeout)
                .await;
            if stuck.is_empty() {
                tracing::info!("every task stopped and every slot is free; registering again");
            }
            if started.elapsed() < config.heartbeat_interval {
                tracing::warn!(
                    "the session with the JobManager lasted only {:?}; retrying in {} ms",
                    started.elapsed(),
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.registration_max_timeout);
            } else {
                backoff = config.registration_initial_timeout;
            }
        }
    }
}

/// Connects to the JobManager and authenticates (the cluster secret's
/// handshake), retrying both with backoff until
/// `taskmanager.registration.timeout`.
async fn connect_with_backoff(
    address: &str,
    config: &Config,
    auth: &crate::security::PeerAuth,
    shutdown: &AtomicBool,
) -> Result<Option<TcpStream>, TaskManagerError> {
    let started = Instant::now();
    let mut backoff = config.registration_initial_timeout;
    loop {
        if shutdown.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let error = match TcpStream::connect(address).await {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                let role = crate::security::Role::Client;
                let plane = crate::security::Plane::Control;
                match auth.handshake(&mut s, role, plane, address).await {
                    Ok(()) => return Ok(Some(s)),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= config.registration_timeout {
            return Err(TaskManagerError::RegistrationTimeout {
                address: address.to_owned(),
                timeout: config.registration_timeout,
                last_error: error,
            });
        }
        tracing::warn!(
            "could not reach JobManager at {address}: {error}; retrying in {} ms",
            backoff.as_millis()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.registration_max_timeout);
    }
}

/// Why a session with the JobManager ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("the JobManager answered the registration with {got}")]
    Unregistered { got: String },
    #[error("no message from the JobManager for {timeout:?} (heartbeat.timeout)")]
    Silent { timeout: Duration },
    #[error(
        "this TaskManager was not scheduled for {gap:?}, longer than {limit:?} \
         (heartbeat.timeout less up to one heartbeat.interval): the JobManager may have \
         declared it lost"
    )]
    Paused { gap: Duration, limit: Duration },
    #[error("the session's {part} panicked: {message}")]
    Panicked { part: &'static str, message: String },
    #[error("the session's {part} stopped")]
    Stopped { part: &'static str },
    #[error("the JobManager disconnected this TaskManager: {reason}")]
    Disconnected { reason: String },
}

/// What a session task's `JoinHandle` says about how it ended.
fn joined<T>(part: &'static str, joined: Result<T, tokio::task::JoinError>) -> SessionError {
    match joined {
        Ok(_) => SessionError::Stopped { part },
        Err(e) if e.is_panic() => SessionError::Panicked {
            part,
            message: panic_message(&*e.into_panic()),
        },
        Err(_) => SessionError::Stopped { part },
    }
}

/// How often the session loop wakes up with nothing to read, to look at
/// `shutdown`, the JobManager's silence and its own scheduling gaps.
const SESSION_TICK: Duration = Duration::from_millis(200);

async fn session(
    stream: TcpStream,
    services: Arc<Services>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), SessionError> {
    let (mut reader, mut writer) = stream.into_split();
    // Slots whose tasks could not be stopped after a lost session are
    // reported occupied, so that the JobManager schedules around them.
    let slots = lock(&services.slots).report();
    write_message(
        &mut writer,
        &Message::RegisterTaskManager {
            data_addr: services.data_addr,
            slots,
            io: services.io.summary(),
            transport: services.transport.clone(),
            gpu: crate::kernels::gpu::detect().describe(),
            flight_addr: Some(services.flight_addr),
        },
    )
    .await?;
    let taskmanager = match read_message(&mut reader).await? {
        Message::Registered { taskmanager } => taskmanager,
        other => {
            return Err(SessionError::Unregistered {
                got: format!("{other:?}").chars().take(200).collect(),
            });
        }
    };
    tracing::info!("registered with the JobManager as {taskmanager}");
    *lock(&services.name) = taskmanager;
    let (out, mut out_rx) = unbounded_channel::<Message>();
    let mut writer_task = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if write_message(&mut writer, &msg).await.is_err() {
                break;
            }
        }
    });
    let mut ticker = tokio::spawn(report_loop(Arc::clone(&services), out.clone()));
    // `read_message` is not cancel-safe, so it runs in its own task and the
    // loop below waits on a channel, which is.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Result<Message, RpcError>>(64);
    let mut reader_task = tokio::spawn(async move {
        loop {
            let msg = read_message(&mut reader).await;
            let failed = msg.is_err();
            if in_tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    let timeout = services.config.heartbeat_timeout;
    let pause_limit = pause_limit(&services.config);
    let mut last_message = Instant::now();
    let mut last_wakeup = Instant::now();
    let result = loop {
        if shutdown.load(Ordering::Relaxed) {
            break Ok(());
        }
        let received = tokio::select! {
            received = in_rx.recv() => received,
            () = tokio::time::sleep(SESSION_TICK) => {
                if let Some(e) = paused(&mut last_wakeup, pause_limit) {
                    break Err(e);
                }
                if last_message.elapsed() > timeout {
                    break Err(SessionError::Silent { timeout });
                }
                continue;
            }
            // The heartbeat loop ends only when it detects a pause, the
            // writer only when the connection fails; a panic in either
            // ends the session too.
            ended = &mut ticker => match ended {
                Ok(Err(e)) => break Err(e),
                other => break Err(joined("heartbeat loop", other)),
            },
            ended = &mut writer_task => break Err(joined("writer", ended)),
        };
        // Messages that waited in the socket while this process was paused
        // are not acted on: the JobManager has declared it lost.
        if let Some(e) = paused(&mut last_wakeup, pause_limit) {
            break Err(e);
        }
        let msg = match received {
            // The reader ended without an error for us: it panicked.
            None => break Err(joined("reader", (&mut reader_task).await)),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(m)) => m,
        };
        last_message = Instant::now();
        if let Message::Disconnect { reason } = msg {
            break Err(SessionError::Disconnected { reason });
        }
        on_message(&services, &out, msg);
    };
    ticker.abort();
    writer_task.abort();
    reader_task.abort();
    result
}

/// The longest gap this process may go unscheduled (SIGSTOP, a VM pause, a
/// swap storm) before it must assume that the JobManager declared it lost.
/// The JobManager counts `heartbeat.timeout` from the last heartbeat it
/// received, which this process sent up to one `heartbeat.interval` before
/// the pause began; so a pause longer than `timeout - interval` may already
/// be fatal. The slack is capped at a quarter of the timeout, so that a
/// timeout close to the interval does not make every tick look like a pause.
fn pause_limit(config: &Config) -> Duration {
    let timeout = config.heartbeat_timeout;
    timeout - config.heartbeat_interval.min(timeout / 4)
}

/// Whether more than `limit` passed since `last_wakeup` ([`pause_limit`]);
/// updates it.
fn paused(last_wakeup: &mut Instant, limit: Duration) -> Option<SessionError> {
    let now = Instant::now();
    let gap = now.duration_since(*last_wakeup);
    *last_wakeup = now;
    (gap > limit).then_some(SessionError::Paused { gap, limit })
}

/// Acts on one message from the JobManager.
fn on_message(services: &Arc<Services>, out: &UnboundedSender<Message>, msg: Message) {
    match msg {
        Message::DeployTasks {
            execution,
            attempt,
            job_text,
            job_path,
            default_parallelism,
            placement,
            tasks,
            gpu_operators,
            checkpointing,
            ..
        } => {
            let job = execution.0;
            let tasks: Vec<deploy::TaskKey> = tasks
                .into_iter()
                .map(|(vertex, subtask)| deploy::TaskKey { vertex, subtask })
                .collect();
            let Some(canceled) = deploy::begin(services, job, &tasks, &placement, out) else {
                return;
            };
            let deployment = deploy::Deployment {
                job,
                attempt,
                job_text,
                job_path,
                default_parallelism,
                placement,
                gpu_operators,
                checkpointing,
            };
            let handle = tokio::spawn(deploy::deploy(
                Arc::clone(services),
                deployment,
                tasks.clone(),
                canceled,
                out.clone(),
            ));
            // A panic in the deployment fails its tasks and frees its slots
            // instead of leaving the job waiting for them.
            let (services, out) = (Arc::clone(services), out.clone());
            tokio::spawn(async move {
                if let Err(e) = handle.await {
                    let cause = format!(
                        "deploying on {} failed: internal error (panic): {}",
                        services.name(),
                        if e.is_panic() {
                            panic_message(&*e.into_panic())
                        } else {
                            e.to_string()
                        }
                    );
                    let failed = crate::protocol::ExecutionState::Failed;
                    deploy::abort(&services, job, &tasks, &cause, failed, &out);
                }
            });
        }
        Message::TriggerCheckpoint {
            execution: ExecutionId(job),
            checkpoint: CheckpointId(checkpoint),
        } => {
            // Running source tasks inject the barrier; tasks waiting
            // for the final commit snapshot for the final checkpoint;
            // the others ignore it.
            let control = crate::exec::task::TaskControl::TriggerCheckpoint(checkpoint);
            deliver_control(services, out, job, control);
        }
        Message::CheckpointComplete {
            execution: ExecutionId(job),
            checkpoint: CheckpointId(checkpoint),
        } => {
            let control = crate::exec::task::TaskControl::CheckpointComplete(checkpoint);
            deliver_control(services, out, job, control);
        }
        Message::AbortCheckpoint {
            execution: ExecutionId(job),
            checkpoint: CheckpointId(checkpoint),
        } => {
            let control = crate::exec::task::TaskControl::AbortCheckpoint(checkpoint);
            deliver_control(services, out, job, control);
        }
        Message::CancelJob {
            execution: ExecutionId(job),
            reason,
        } => {
            tracing::info!("canceling job {job:016x}: {reason}");
            services.release(job, &reason);
            report_slots(services, out);
        }
        Message::ReleaseJob {
            execution: ExecutionId(job),
        } => {
            services.release(job, "job finished");
            report_slots(services, out);
        }
        Message::HeartbeatAck => {}
        // Handled by the session, which ends (and fences) on it.
        Message::Disconnect { .. } => {}
        other => tracing::warn!("unexpected message from the JobManager: {other:?}"),
    }
}

/// Sends a slot report now, under the slot table's lock (so reports leave
/// in the order the table changed).
fn report_slots(services: &Services, out: &UnboundedSender<Message>) {
    let slots = lock(&services.slots);
    let _ = out.send(Message::Heartbeat {
        slots: slots.report(),
        usage: None,
    });
}

/// Sends heartbeats with slot reports, and running tasks' metrics. Ends
/// (with the error) only when it finds that it was not scheduled for longer
/// than `heartbeat.timeout`.
async fn report_loop(
    services: Arc<Services>,
    out: UnboundedSender<Message>,
) -> Result<(), SessionError> {
    let interval = services.config.heartbeat_interval;
    let tick = Duration::from_millis(250).min(interval);
    // Heartbeats leave every `interval` (plus a tick) when nothing stalls.
    let limit = pause_limit(&services.config).max(interval + 2 * tick);
    let mut last_heartbeat = Instant::now() - interval;
    loop {
        // The time since the last heartbeat was sent, not since the last
        // tick: that is the silence the JobManager sees.
        let silence = last_heartbeat.elapsed();
        if silence > limit {
            return Err(SessionError::Paused {
                gap: silence,
                limit,
            });
        }
        if last_heartbeat.elapsed() >= interval {
            last_heartbeat = Instant::now();
            // Reported under the slot table's lock, so reports leave in the
            // order the table changed (task ends send one too).
            let usage = services.usage();
            let slots = lock(&services.slots);
            if out
                .send(Message::Heartbeat {
                    slots: slots.report(),
                    usage: Some(usage),
                })
                .is_err()
            {
                return Ok(());
            }
        }
        let updates: Vec<Message> = lock(&services.jobs)
            .iter()
            .flat_map(|(job, t)| {
                t.tasks
                    .iter()
                    .map(|(vertex, subtask, m)| Message::TaskStatus {
                        execution: ExecutionId(*job),
                        vertex: *vertex,
                        subtask: *subtask,
                        state: crate::protocol::ExecutionState::Running,
                        error: None,
                        metrics: Some(m.snapshot()),
                    })
            })
            .collect();
        for u in updates {
            if out.send(u).is_err() {
                return Ok(());
            }
        }
        tokio::time::sleep(tick).await;
    }
}
