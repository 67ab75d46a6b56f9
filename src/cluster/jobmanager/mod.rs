//! The JobManager process: a thin tokio shell around the I/O-free
//! [`core::JobManagerCore`].
//!
//! The shell accepts control connections, authenticates each with the
//! cluster secret's handshake, reads frames (bounded: a small first frame,
//! a shared budget for partly received ones), turns them into core events
//! under one lock, and carries out the core's commands: each connection has
//! a writer task with a bounded queue, and a `Close` flushes then shuts the
//! socket. A timer sends `Tick`s. Job files are parsed, planned and placed
//! here (placement may read the calibration file) and handed to the core as
//! a planned submission.
//!
//! Limits: at most `jobmanager.rpc.connections.max` connections (one log
//! line when the cap refuses some), the handshake and then the first
//! message each within `security.handshake.timeout`, a first frame of at most `FIRST_FRAME_MAX_BYTES`,
//! later frames of at most `FRAME_MAX_BYTES`, partly received frames of all
//! connections within `FRAME_BUDGET_BYTES`, and `WRITE_QUEUE_MAX` messages
//! queued per connection (a peer that does not read is disconnected).

pub mod core;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use self::core::{Command, ConnId, CoreConfig, Event, JobManagerCore, PlannedJob};
use super::ClusterError;
use crate::config::Config;
use crate::exec::sink::output::{check_sink_outputs, prepare_sink_outputs};
use crate::job::graph::JobGraph;
use crate::job::{LogicalPlan, parse_job, plan};
use crate::protocol::codec::{FrameBudget, RpcError, read_message_bounded};
use crate::protocol::{ClusterSnapshot, FRAME_MAX_BYTES, Message};
use crate::security::{PeerAuth, Plane, Role, check_bind};

/// The first frame of a connection (a registration or a job file).
const FIRST_FRAME_MAX_BYTES: usize = 4 << 20;
/// Bytes of partly received frames over all connections.
const FRAME_BUDGET_BYTES: usize = 64 << 20;
/// Messages queued for one connection's writer.
const WRITE_QUEUE_MAX: usize = 4096;
/// How often the core's timers are looked at.
const TICK: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[allow(clippy::large_enum_variant)] // queued per connection, bounded
enum Outgoing {
    Message(Message),
    Close(String),
}

struct Shell {
    core: JobManagerCore,
    started: Instant,
    writers: HashMap<ConnId, mpsc::Sender<Outgoing>>,
    next_conn: u64,
}

impl Shell {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Feeds one event to the core and carries out its commands.
    fn handle(&mut self, event: Event) {
        let now = self.now();
        for command in self.core.handle(now, event) {
            let (conn, outgoing) = match command {
                Command::Send { conn, message } => (conn, Outgoing::Message(message)),
                Command::Close { conn, reason } => (conn, Outgoing::Close(reason)),
            };
            let Some(writer) = self.writers.get(&conn) else {
                continue;
            };
            let closing = matches!(outgoing, Outgoing::Close(_));
            if let Err(e) = writer.try_send(outgoing) {
                if let mpsc::error::TrySendError::Full(_) = e {
                    tracing::warn!(
                        "{conn}: {WRITE_QUEUE_MAX} messages wait for a peer that does not read; disconnecting it"
                    );
                }
                self.writers.remove(&conn);
            } else if closing {
                self.writers.remove(&conn);
            }
        }
    }
}

/// A running JobManager.
pub struct JobManager {
    pub addr: SocketAddr,
    shell: Arc<Mutex<Shell>>,
    /// The cluster secret, when there is one: the REST API derives the
    /// token that authorizes cancelling a job from it.
    secret: Option<crate::security::ClusterSecret>,
}

impl JobManager {
    pub async fn start(config: Config, bind: &str) -> Result<Self, ClusterError> {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| ClusterError::Bind {
                address: bind.to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ClusterError::Bind {
            address: bind.to_owned(),
            source,
        })?;
        // Without a cluster secret the control port serves loopback only.
        let auth = Arc::new(PeerAuth::from_config(&config).map_err(ClusterError::Security)?);
        check_bind(&addr, auth.secret.as_ref(), "jobmanager.rpc.address")
            .map_err(ClusterError::Security)?;
        let stores = Box::new(core::checkpointing::FsCheckpointStores {
            config: config.clone(),
        });
        let core = JobManagerCore::new(CoreConfig::new(config.clone()), id_seed(), stores);
        let shell = Arc::new(Mutex::new(Shell {
            core,
            started: Instant::now(),
            writers: HashMap::new(),
            next_conn: 0,
        }));
        let config = Arc::new(config);
        let secret = auth.secret.clone();
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&shell),
            Arc::clone(&config),
            auth,
        ));
        tokio::spawn(tick_loop(Arc::clone(&shell)));
        tracing::info!("JobManager listening on {addr}");
        Ok(Self {
            addr,
            shell,
            secret,
        })
    }

    /// TaskManagers currently registered.
    pub fn taskmanager_count(&self) -> usize {
        lock(&self.shell).core.taskmanager_count()
    }

    /// A consistent copy of the cluster's state for the REST API.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let shell = lock(&self.shell);
        shell.core.snapshot(shell.now())
    }

    /// The cluster secret, if one is configured.
    pub fn secret(&self) -> Option<&crate::security::ClusterSecret> {
        self.secret.as_ref()
    }

    /// A handle that cancels a running job (the REST API's cancel): `true`
    /// when the job ran and is now canceled, `false` when no such job runs.
    pub fn cancel_handle(
        &self,
    ) -> impl Fn(crate::protocol::JobId, String) -> bool + Send + Sync + 'static {
        let shell = Arc::clone(&self.shell);
        move |job, reason| {
            let mut shell = lock(&shell);
            if !shell.core.job_is_running(job) {
                return false;
            }
            shell.handle(Event::Cancel { job, reason });
            true
        }
    }

    /// The running jobs' Flight sinks, for the JobManager's Flight service.
    pub fn flight_directory(&self) -> crate::flight::FlightDirectory {
        let shell = Arc::clone(&self.shell);
        Arc::new(move || lock(&shell).core.flights())
    }

    /// A handle the REST server polls.
    pub fn snapshot_source(&self) -> impl Fn() -> ClusterSnapshot + Send + Sync + 'static {
        let shell = Arc::clone(&self.shell);
        move || {
            let shell = lock(&shell);
            shell.core.snapshot(shell.now())
        }
    }
}

/// Seeds job and execution ids: distinct across JobManager runs, so a
/// TaskManager never confuses an old JobManager's execution with a new one's.
fn id_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::kernels::cpu::hash::fmix64(nanos ^ u64::from(std::process::id()))
}

async fn tick_loop(shell: Arc<Mutex<Shell>>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        lock(&shell).handle(Event::Tick);
    }
}

async fn accept_loop(
    listener: TcpListener,
    shell: Arc<Mutex<Shell>>,
    config: Arc<Config>,
    auth: Arc<PeerAuth>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let budget = FrameBudget::new(FRAME_BUDGET_BYTES);
    let connections_max = config.rpc_connections_max as usize;
    let mut refused_logged = false;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most often: wait rather than spin.
                tracing::warn!("JobManager accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= connections_max {
            if !refused_logged {
                tracing::warn!(
                    "refusing control connections from {peer} and others: {connections_max} are open \
                     (jobmanager.rpc.connections.max)"
                );
                refused_logged = true;
            }
            drop(stream);
            continue;
        }
        refused_logged = false;
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let (shell, config, budget, open, auth) = (
            Arc::clone(&shell),
            Arc::clone(&config),
            Arc::clone(&budget),
            Arc::clone(&open),
            Arc::clone(&auth),
        );
        tokio::spawn(async move {
            serve(stream, peer, &shell, &config, &budget, &auth).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shell: &Arc<Mutex<Shell>>,
    config: &Config,
    budget: &Arc<FrameBudget>,
    auth: &PeerAuth,
) {
    // Nothing is read from a peer before it proves it holds the cluster
    // secret (or, without one, that it speaks strata on loopback).
    if let Err(e) = auth
        .handshake(&mut stream, Role::Server, Plane::Control, &peer.to_string())
        .await
    {
        tracing::warn!("control connection refused: {e}");
        return;
    }
    let (mut reader, mut writer) = stream.into_split();
    let first = tokio::time::timeout(
        auth.timeout,
        read_message_bounded(&mut reader, FIRST_FRAME_MAX_BYTES, Some(budget), None),
    )
    .await;
    let first = match first {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::debug!("control connection from {peer} refused before its first message: {e}");
            if let RpcError::TooLarge { .. } = e {
                let refusal = Message::Disconnect {
                    reason: format!("refused: {e}"),
                };
                let _ = crate::protocol::write_message(&mut writer, &refusal).await;
            }
            return;
        }
        Err(_) => {
            tracing::debug!(
                "control connection from {peer} sent nothing within the handshake timeout; closed"
            );
            return;
        }
    };
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
    let conn = {
        let mut s = lock(shell);
        s.next_conn += 1;
        let conn = ConnId(s.next_conn);
        s.writers.insert(conn, tx);
        conn
    };
    let mut writer_task = tokio::spawn(write_loop(writer, rx));
    let event = match first {
        Message::SubmitJob { job_text, job_path } => {
            let gpu = lock(shell).core.gpu_slot();
            let planned = plan_job(config, &job_text, &job_path, gpu);
            Event::Submit { conn, job: planned }
        }
        message => Event::Message { conn, message },
    };
    lock(shell).handle(event);
    let frame_deadline = auth.timeout;
    // Reading stops when the peer closes, a frame is bad or stalls, or the
    // writer ends (the core closed the connection, or the peer stopped
    // reading): a fenced peer's half-sent frame holds no budget.
    let reason = tokio::select! {
        reason = read_loop(&mut reader, conn, shell, budget, frame_deadline) => reason,
        _ = &mut writer_task => "closed by the JobManager".to_owned(),
    };
    lock(shell).handle(Event::Closed { conn, reason });
    if !writer_task.is_finished() {
        let _ = writer_task.await;
    }
}

async fn read_loop(
    reader: &mut OwnedReadHalf,
    conn: ConnId,
    shell: &Arc<Mutex<Shell>>,
    budget: &Arc<FrameBudget>,
    frame_deadline: Duration,
) -> String {
    loop {
        let message =
            read_message_bounded(reader, FRAME_MAX_BYTES, Some(budget), Some(frame_deadline)).await;
        let mut s = lock(shell);
        if !s.writers.contains_key(&conn) {
            // Fenced or closed by the core: stop reading.
            return "closed by the JobManager".into();
        }
        match message {
            Ok(message) => s.handle(Event::Message { conn, message }),
            Err(e) => return e.to_string(),
        }
    }
}

async fn write_loop(mut writer: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(outgoing) = rx.recv().await {
        match outgoing {
            Outgoing::Message(message) => {
                if let Err(e) = crate::protocol::write_message(&mut writer, &message).await {
                    if matches!(message, crate::protocol::Message::Disconnect { .. }) {
                        // A goodbye to a peer that has already gone.
                        tracing::debug!("control write of Disconnect failed: {e}");
                    } else {
                        tracing::warn!("control write of {} failed: {e}", message.kind());
                    }
                    break;
                }
            }
            Outgoing::Close(reason) => {
                tracing::debug!("closing a control connection: {reason}");
                break;
            }
        }
    }
    let _ = writer.shutdown().await;
}

/// Parses, plans and places a submitted job on the tiers the cluster
/// offers: the GPU tier exists when some TaskManager reported a GPU slot
/// (priced with the configured calibration, else the defaults).
fn plan_job(
    config: &Config,
    text: &str,
    path: &str,
    gpu_slot: Option<(String, u32, u64)>,
) -> Result<Box<PlannedJob>, String> {
    let plan = parse_job(text, Path::new(path))
        .and_then(plan)
        .map_err(|e| e.to_string())?;
    // Sink output directories are checked once per job, here, and not per
    // attempt: a restart must not be refused by its own earlier output.
    check_sink_outputs(&plan.spec).map_err(|e| e.to_string())?;
    let plan = Arc::new(plan);
    let graph = Arc::new(JobGraph::build(&plan, config.default_parallelism));
    let placement = place_on_cluster(&plan, &graph, config, gpu_slot).map_err(|e| e.to_string())?;
    // `overwrite` removes the old parts once per job, before any task is
    // deployed (see exec::sink::output). It happens before the scheduler
    // looks for slots: a job refused for lack of them has still cleared
    // its output directory, as its mode asked.
    let removed = prepare_sink_outputs(&plan.spec).map_err(|e| e.to_string())?;
    if !removed.is_empty() {
        tracing::info!(
            "job '{}': removed {} part files of an earlier run",
            plan.spec.name,
            removed.len()
        );
    }
    Ok(Box::new(PlannedJob {
        name: plan.spec.name.clone(),
        plan,
        graph,
        placement,
        text: text.to_owned(),
        path: path.to_owned(),
        default_parallelism: config.default_parallelism,
    }))
}

fn place_on_cluster(
    plan: &LogicalPlan,
    graph: &JobGraph,
    config: &Config,
    gpu_slot: Option<(String, u32, u64)>,
) -> Result<crate::placement::Placement, crate::placement::PlacementError> {
    use crate::placement::{PlacementInput, calibration, place};
    let device = gpu_slot.map(|(name, id, bytes)| crate::kernels::gpu::GpuDevice {
        ordinal: id,
        name,
        memory_bytes: bytes,
        compute_capability: (0, 0),
        simulated: false,
    });
    let mut calibration = calibration::load(None, &config.calibration_file, device.as_ref())?;
    if device.is_none() {
        // A calibration measured on a GPU node does not make these
        // TaskManagers GPU nodes.
        calibration.gpu = None;
    }
    let absent = "no TaskManager offers a GPU slot";
    let placement = place(&PlacementInput {
        plan,
        graph,
        calibration: &calibration,
        mode: config.placement_mode,
        gpu_absent_reason: absent,
        coalesce_bytes: config.gpu_coalesce_bytes.max(1),
        gpu_key_by_hash: false,
    })?;
    for op in &placement.operators {
        tracing::info!(
            "placement: {} ({}) on {}: {}",
            op.name,
            op.kind,
            op.tier,
            op.reason
        );
    }
    Ok(placement)
}
