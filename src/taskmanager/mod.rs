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

use crate::cluster::rpc::{Message, ResourceProfile, RpcError, read_message, write_message};
use crate::config::Config;
use crate::io::{IoConfig, IoManager};
use crate::memory::{MemoryManager, NetworkBufferPool, PagePool};
use crate::metrics::TaskMetrics;
use crate::network::NetworkRegistry;
use crate::network::tcp::{ConnectionManager, DataServer, DataServerOptions};
use crate::network::transport;
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

/// A running job's tasks on this TaskManager.
struct JobTasks {
    canceled: Arc<AtomicBool>,
    running: usize,
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
                job,
                vertex: h.vertex,
                subtask: h.subtask,
                checkpoint,
                reason: format!("the task cannot take a barrier now: {e}"),
            });
        }
    }
}

/// Services shared by the TaskManager's tasks.
pub struct Services {
    pub config: Config,
    pub name: Mutex<String>,
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
    /// Each GPU slot's kernel backend; `None` for a CPU slot (or a GPU that
    /// could not be opened, which the log says).
    pub gpu_kernels: Vec<Option<Arc<dyn crate::kernels::backend::KernelBackend>>>,
}

/// 1 MiB spill buffers per TaskManager (16 MiB, pre-touched).
const IO_BUFFERS_MAX: usize = 16;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Services {
    pub fn name(&self) -> String {
        lock(&self.name).clone()
    }

    fn cancel_all(&self, reason: &str) {
        for (job, tasks) in lock(&self.jobs).iter() {
            tracing::warn!("canceling job {job:016x}: {reason}");
            tasks.canceled.store(true, Ordering::Relaxed);
        }
    }
}

/// One kernel backend per GPU slot, each within its slot's device budget.
fn open_gpu_slots(
    profiles: &[ResourceProfile],
    devices: &[crate::kernels::gpu::GpuDevice],
) -> Vec<Option<Arc<dyn crate::kernels::backend::KernelBackend>>> {
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
    profiles
        .iter()
        .enumerate()
        .map(|(slot_index, profile)| {
            let (id, _) = profile.gpu?;
            let device_index = devices.iter().position(|d| d.ordinal == id)?;
            let pool = pools[device_index].as_ref()?;
            let slot_pool = pool.slot(next_in_pool[device_index]);
            next_in_pool[device_index] += 1;
            crate::kernels::gpu::open_backend(&devices[device_index], slot_pool)
                .map_err(|e| {
                    tracing::warn!("slot {slot_index}: cannot open GPU {id} ({e}); its GPU operators run on the CPU")
                })
                .ok()
        })
        .collect()
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
        // Touching hundreds of MiB takes seconds: keep it off the async workers.
        let (pages, netpool) = tokio::task::spawn_blocking(move || {
            (
                PagePool::new(layout.managed_per_slot * slot_count as u64, page_size),
                NetworkBufferPool::new(layout.network_segment_count as usize, segment_size),
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
        Ok(Self {
            services: Arc::new(Services {
                name: Mutex::new(String::from("unregistered")),
                slot_memory,
                netpool,
                registry,
                connections: ConnectionManager::new(transport.verbs.clone(), auth),
                transport: format!("{transport_name} ({})", transport.reason),
                data_addr: server.local_addr,
                io,
                gpu_kernels: open_gpu_slots(&profiles, gpu.devices()),
                slots: Mutex::new(SlotTable::with_profiles(profiles)),
                jobs: Mutex::default(),
                config,
            }),
        })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.services.data_addr
    }

    /// Registers with the JobManager and serves it until `shutdown` is set.
    /// Re-registers after losing the JobManager.
    pub async fn run(
        self,
        jobmanager: String,
        shutdown: Arc<AtomicBool>,
    ) -> Result<(), TaskManagerError> {
        let services = self.services;
        let config = &services.config;
        loop {
            let stream = connect_with_backoff(&jobmanager, config, &shutdown).await?;
            let Some(stream) = stream else {
                return Ok(());
            };
            match session(stream, &services, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    services.cancel_all("lost the JobManager");
                    tracing::warn!(
                        "lost connection to JobManager at {jobmanager}: {e}; re-registering"
                    );
                }
            }
        }
    }
}

async fn connect_with_backoff(
    address: &str,
    config: &Config,
    shutdown: &AtomicBool,
) -> Result<Option<TcpStream>, TaskManagerError> {
    let started = Instant::now();
    let mut backoff = config.registration_initial_timeout;
    loop {
        if shutdown.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let error = match TcpStream::connect(address).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(Some(s));
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

async fn session(
    stream: TcpStream,
    services: &Arc<Services>,
    shutdown: &AtomicBool,
) -> Result<(), RpcError> {
    let (mut reader, mut writer) = stream.into_split();
    let slots = lock(&services.slots).report();
    write_message(
        &mut writer,
        &Message::RegisterTaskManager {
            name: None,
            data_addr: services.data_addr,
            slots,
            io: services.io.summary(),
            transport: services.transport.clone(),
            gpu: crate::kernels::gpu::detect().describe(),
        },
    )
    .await?;
    let Message::Registered { taskmanager } = read_message(&mut reader).await? else {
        return Err(RpcError::Closed);
    };
    tracing::info!("registered with the JobManager as {taskmanager}");
    *lock(&services.name) = taskmanager;
    let (out, mut out_rx) = unbounded_channel::<Message>();
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if write_message(&mut writer, &msg).await.is_err() {
                break;
            }
        }
    });
    let ticker = tokio::spawn(report_loop(Arc::clone(services), out.clone()));
    // `read_message` is not cancel-safe, so it runs in its own task and the
    // loop below waits on a channel, which is.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Result<Message, RpcError>>(64);
    let reader_task = tokio::spawn(async move {
        loop {
            let msg = read_message(&mut reader).await;
            let failed = msg.is_err();
            if in_tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    let mut last_message = Instant::now();
    let result = loop {
        if shutdown.load(Ordering::Relaxed) {
            break Ok(());
        }
        let timeout = services.config.heartbeat_timeout;
        let msg = match tokio::time::timeout(Duration::from_millis(200), in_rx.recv()).await {
            Err(_) => {
                if last_message.elapsed() > timeout {
                    break Err(RpcError::Io(std::io::Error::other(format!(
                        "no heartbeat answer from the JobManager for {timeout:?} (heartbeat.timeout)"
                    ))));
                }
                continue;
            }
            Ok(None) => break Err(RpcError::Closed),
            Ok(Some(Err(e))) => break Err(e),
            Ok(Some(Ok(m))) => m,
        };
        last_message = Instant::now();
        match msg {
            Message::DeployTasks {
                job,
                job_text,
                job_path,
                default_parallelism,
                tasks,
                checkpointing,
            } => {
                let services = Arc::clone(services);
                let out = out.clone();
                tokio::spawn(async move {
                    deploy::deploy(
                        &services,
                        deploy::Deployment {
                            job,
                            job_text: &job_text,
                            job_path: &job_path,
                            default_parallelism,
                            checkpointing,
                        },
                        tasks,
                        out,
                    )
                    .await;
                });
            }
            Message::TriggerCheckpoint { job, checkpoint } => {
                // Running source tasks inject the barrier; tasks waiting
                // for the final commit snapshot for the final checkpoint;
                // the others ignore it.
                let control = crate::exec::task::TaskControl::TriggerCheckpoint(checkpoint);
                deliver_control(services, &out, job, control);
            }
            Message::CheckpointComplete { job, checkpoint } => {
                let control = crate::exec::task::TaskControl::CheckpointComplete(checkpoint);
                deliver_control(services, &out, job, control);
            }
            Message::AbortCheckpoint { job, checkpoint } => {
                let control = crate::exec::task::TaskControl::AbortCheckpoint(checkpoint);
                deliver_control(services, &out, job, control);
            }
            Message::CancelJob { job, reason } => {
                if let Some(tasks) = lock(&services.jobs).get(&job) {
                    tracing::info!("canceling job {job:016x}: {reason}");
                    tasks.canceled.store(true, Ordering::Relaxed);
                }
                services.registry.release_job(job, &reason);
            }
            Message::ReleaseJob { job } => {
                services.registry.release_job(job, "job finished");
            }
            Message::HeartbeatAck => {}
            other => tracing::warn!("unexpected message from the JobManager: {other:?}"),
        }
    };
    ticker.abort();
    writer_task.abort();
    reader_task.abort();
    result
}

/// Sends heartbeats with slot reports, and running tasks' metrics.
async fn report_loop(services: Arc<Services>, out: UnboundedSender<Message>) {
    let interval = services.config.heartbeat_interval;
    let mut last_heartbeat = Instant::now() - interval;
    loop {
        if last_heartbeat.elapsed() >= interval {
            last_heartbeat = Instant::now();
            let slots = lock(&services.slots).report();
            if out.send(Message::Heartbeat { slots }).is_err() {
                return;
            }
        }
        let updates: Vec<Message> = lock(&services.jobs)
            .iter()
            .flat_map(|(job, t)| {
                t.tasks
                    .iter()
                    .map(|(vertex, subtask, m)| Message::TaskStatus {
                        job: *job,
                        vertex: *vertex,
                        subtask: *subtask,
                        state: crate::cluster::rpc::ExecutionState::Running,
                        error: None,
                        metrics: Some(m.snapshot()),
                    })
            })
            .collect();
        for u in updates {
            if out.send(u).is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250).min(interval)).await;
    }
}
