//! The TCP transport: a data server per TaskManager that serves its result
//! partitions, and a connection manager that opens one multiplexed
//! connection per peer TaskManager for the local input channels.
//!
//! Every data connection starts with the authentication handshake
//! ([`crate::security::handshake`], data plane) before any frame. The server
//! bounds what an unauthenticated or idle peer can hold: connections above
//! `taskmanager.data.connections.max` are closed at accept; the handshake,
//! and then the first partition request, must each arrive within
//! `security.handshake.timeout`; frame heads are validated before any body
//! is buffered (the control reader's buffer is fixed). A partition request
//! is served only for a partition registered here, and a channel has one
//! consumer at a time ([`NetworkRegistry::claim_channel`]); a refusal goes
//! back to the requester as an `Error` frame for its channel and is logged
//! naming the peer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::frame::{
    BufferHeader, BufferKind, ControlMessage, Incoming, ReadError, encode_buffer_header,
    encode_control, read_incoming,
};
use super::gate::{CreditLink, GateItem, InputGate};
use super::partition::{OutBuffer, Subpartition};
use super::rdma::{ChannelRouter, RemoteBuffer, VerbsEnv, VerbsReceiver, VerbsSender};
use super::reader::{ControlReader, FrameReader, Polled};
use super::{ChannelClaim, NetworkError, NetworkRegistry, PartitionId};
use crate::memory::Segment;
use crate::security::{PeerAuth, Plane, Role, SecurityError, check_bind};

/// How long a partition request waits for its producer to be deployed.
pub const PARTITION_WAIT: Duration = Duration::from_secs(30);
/// The key whose host decides whether the data server listens beyond
/// loopback (the address is `taskmanager.host`:`taskmanager.data.port`).
const BIND_KEY: &str = "taskmanager.host";
/// Channels one connection may have attached or waiting for their producer
/// at once: a consumer TaskManager's shared connection carries all of its
/// channels from this TaskManager, so this is far above any real job.
const CHANNELS_PER_CONNECTION_MAX: usize = 64 * 1024;
/// At most one warning per this long for each kind of refused connection.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Most buffers one gathered write sends.
const GATHER_BUFFERS_MAX: usize = 32;
/// A gathered write stops adding buffers past this many bytes.
const GATHER_BYTES_MAX: usize = 512 * 1024;
/// Slices per gathered write (a buffer of Arrow parts is a dozen or so;
/// Linux takes up to 1024).
const IOV_BATCH: usize = 512;
/// A BufferResponse's head and routing header.
const FRAME_HEAD_BYTES: usize = super::frame::HEAD_LEN + super::frame::BUFFER_HEADER_LEN;
/// How long a consumer waits for the producer's answer to `VerbsConnect`.
const VERBS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Verbs credits a producer holds for channels whose partition request is
/// still waiting for its producer task.
const PENDING_CREDIT_MAX: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the data server admits.
#[derive(Clone, Debug)]
pub struct DataServerOptions {
    /// The cluster secret and `security.handshake.timeout`, which also
    /// bounds the wait for a connection's first partition request.
    pub auth: PeerAuth,
    /// `taskmanager.data.connections.max`.
    pub connections_max: usize,
    /// How long a partition request waits for its producer to be deployed
    /// before it is refused ([`PARTITION_WAIT`]).
    pub partition_wait: Duration,
}

impl DataServerOptions {
    /// `taskmanager.data.connections.max` from `config`, with `auth` (see
    /// [`PeerAuth::from_config`]).
    pub fn new(config: &crate::config::Config, auth: PeerAuth) -> Self {
        Self {
            auth,
            connections_max: config.data_connections_max as usize,
            partition_wait: PARTITION_WAIT,
        }
    }
}

impl Default for DataServerOptions {
    /// No secret (loopback only), 1024 connections, the 30 s partition wait.
    fn default() -> Self {
        Self {
            auth: PeerAuth::loopback(),
            connections_max: 1024,
            partition_wait: PARTITION_WAIT,
        }
    }
}

/// Why the data server did not start.
#[derive(Debug, thiserror::Error)]
pub enum DataServerError {
    #[error(transparent)]
    Insecure(#[from] SecurityError),
    #[error("{source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The data server's counters since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataServerStats {
    pub connections_accepted: u64,
    /// Connections open now (handshaking or serving).
    pub connections_active: u64,
    /// The most connections open at once.
    pub connections_active_peak: u64,
    /// Closed at accept: `taskmanager.data.connections.max` were open.
    pub connections_refused_at_cap: u64,
    /// Warning lines logged about connections refused at the cap.
    pub cap_warnings_logged: u64,
    pub handshakes_failed: u64,
    /// Authenticated, but no partition request within the handshake timeout.
    pub connections_idle_closed: u64,
    /// Connections closed on an error after the handshake: a malformed or
    /// unexpected frame (most), or a failed write.
    pub protocol_errors: u64,
    /// Partition requests refused (unknown or released execution, no such
    /// partition, a channel that already has a consumer).
    pub requests_refused: u64,
    pub requests_served: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    active_peak: AtomicU64,
    refused_at_cap: AtomicU64,
    cap_warnings: AtomicU64,
    handshakes_failed: AtomicU64,
    idle_closed: AtomicU64,
    protocol_errors: AtomicU64,
    requests_refused: AtomicU64,
    requests_served: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DataServerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DataServerStats {
            connections_accepted: get(&self.accepted),
            connections_active: get(&self.active),
            connections_active_peak: get(&self.active_peak),
            connections_refused_at_cap: get(&self.refused_at_cap),
            cap_warnings_logged: get(&self.cap_warnings),
            handshakes_failed: get(&self.handshakes_failed),
            connections_idle_closed: get(&self.idle_closed),
            protocol_errors: get(&self.protocol_errors),
            requests_refused: get(&self.requests_refused),
            requests_served: get(&self.requests_served),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One open connection in `Counters::active`, until dropped.
struct ActiveGuard(Arc<Counters>);

impl ActiveGuard {
    fn new(counters: &Arc<Counters>) -> Self {
        let now = counters.active.fetch_add(1, Ordering::Relaxed) + 1;
        counters.active_peak.fetch_max(now, Ordering::Relaxed);
        Self(Arc::clone(counters))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A warning that is logged at most once per [`WARNING_INTERVAL`]; the
/// next line says how many were left out.
struct RateLimited {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    fn new() -> Self {
        Self {
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut state = lock(&self.state);
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < WARNING_INTERVAL => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

/// What every connection of a data server shares.
struct ServerShared {
    registry: Arc<NetworkRegistry>,
    verbs: Option<Arc<VerbsEnv>>,
    options: DataServerOptions,
    counters: Arc<Counters>,
    handshake_warnings: RateLimited,
}

/// Serves this TaskManager's result partitions to remote consumers.
pub struct DataServer {
    pub local_addr: SocketAddr,
    counters: Arc<Counters>,
}

impl DataServer {
    /// Listens on `bind`; a non-loopback address needs a cluster secret in
    /// `options`. With `verbs`, consumers that ask for it get their buffers
    /// over RDMA writes; others over this socket.
    pub async fn start(
        bind: SocketAddr,
        registry: Arc<NetworkRegistry>,
        verbs: Option<Arc<VerbsEnv>>,
        options: DataServerOptions,
    ) -> Result<Self, DataServerError> {
        check_bind(&bind, options.auth.secret.as_ref(), BIND_KEY)?;
        let listen = |source| DataServerError::Listen {
            address: bind,
            source,
        };
        let listener = TcpListener::bind(bind).await.map_err(listen)?;
        let local_addr = listener.local_addr().map_err(listen)?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(ServerShared {
            registry,
            verbs,
            options,
            counters: Arc::clone(&counters),
            handshake_warnings: RateLimited::new(),
        });
        tokio::spawn(accept_loop(listener, local_addr, shared));
        Ok(Self {
            local_addr,
            counters,
        })
    }

    /// The server's counters now.
    pub fn stats(&self) -> DataServerStats {
        self.counters.snapshot()
    }
}

async fn accept_loop(listener: TcpListener, local_addr: SocketAddr, shared: Arc<ServerShared>) {
    let counters = &shared.counters;
    let max = shared.options.connections_max;
    let cap_warnings = RateLimited::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("data server accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        bump(&counters.accepted);
        if counters.active.load(Ordering::Relaxed) >= max as u64 {
            // Counted first, so whoever sees the close sees the count.
            bump(&counters.refused_at_cap);
            // Closed before a byte is read or a buffer allocated for it.
            drop(stream);
            if let Some(left_out) = cap_warnings.allow() {
                bump(&counters.cap_warnings);
                tracing::warn!(
                    "data server {local_addr}: closed the connection from {peer} at accept: \
                     {max} connections are open, the cap (taskmanager.data.connections.max); \
                     {left_out} more were closed since the last such warning"
                );
            }
            continue;
        }
        let guard = ActiveGuard::new(counters);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _guard = guard;
            serve_connection(stream, peer, &shared).await;
        });
    }
}

/// A subpartition being sent on a connection.
struct Attached {
    channel_id: u32,
    partition: PartitionId,
    subpartition: u32,
    sub: Arc<Subpartition>,
    seq: u32,
    /// Verbs only: the buffers the consumer lent, one per credit.
    remote: VecDeque<RemoteBuffer>,
    /// The backlog last announced while the channel had no credit; 0 once
    /// a buffer went out.
    announced_backlog: u32,
    /// This connection's hold on the channel: no other consumer gets it.
    claim: ChannelClaim,
}

#[derive(Default)]
struct Attachments {
    list: Vec<Attached>,
    /// Verbs credit that arrived before its channel was attached.
    pending: HashMap<u32, VecDeque<RemoteBuffer>>,
    pending_count: usize,
    /// Channel ids whose request waits for its producer.
    requested: HashSet<u32>,
    /// The connection ended: a request that resolves now releases its
    /// subpartition instead of attaching it.
    closed: bool,
}

type AttachedList = Arc<Mutex<Attachments>>;

/// What a producer's connection needs to act on its consumer's messages.
struct Served {
    peer: SocketAddr,
    registry: Arc<NetworkRegistry>,
    counters: Arc<Counters>,
    partition_wait: Duration,
    attached: AttachedList,
    /// Wakes the connection's sender: data, credit or an error to send.
    wake: Arc<Notify>,
    errors: UnboundedSender<ControlMessage>,
    verbs: bool,
}

async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &ServerShared) {
    let counters = &shared.counters;
    let auth = &shared.options.auth;
    if let Err(e) = auth
        .handshake(&mut stream, Role::Server, Plane::Data, &peer.to_string())
        .await
    {
        bump(&counters.handshakes_failed);
        if let Some(left_out) = shared.handshake_warnings.allow() {
            tracing::warn!(
                "data connection refused: {e} ({left_out} more refused since the last such warning)"
            );
        }
        return;
    }
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    // Credits arrive as many small frames: read them many to a system call.
    let mut reader = ControlReader::new(reader);
    // The first frame says whether this consumer wants its buffers over verbs.
    let Some(mut first) = first_frame(&mut reader, peer, shared).await else {
        return;
    };
    let mut sender = None;
    if let Incoming::Control(ControlMessage::VerbsConnect { endpoint }) = &first {
        let answer = match accept_verbs(shared.verbs.as_ref(), endpoint, peer) {
            Ok(s) => {
                let endpoint = s.endpoint();
                sender = Some(s);
                ControlMessage::VerbsConnect { endpoint }
            }
            Err(message) => {
                tracing::warn!("verbs connection from {peer} refused: {message}");
                ControlMessage::Error {
                    channel_id: u32::MAX,
                    message,
                }
            }
        };
        let mut out = Vec::new();
        encode_control(&answer, &mut out);
        if writer.write_all(&out).await.is_err() || sender.is_none() {
            return;
        }
        // The partition request follows the verbs set-up.
        match first_frame(&mut reader, peer, shared).await {
            Some(next) => first = next,
            None => {
                if let Some(s) = &sender {
                    super::rdma::stop_sender(s);
                }
                return;
            }
        }
    }
    let (errors_tx, errors_rx) = unbounded_channel();
    let served = Served {
        peer,
        registry: Arc::clone(&shared.registry),
        counters: Arc::clone(counters),
        partition_wait: shared.options.partition_wait,
        attached: Arc::default(),
        wake: Arc::new(Notify::new()),
        errors: errors_tx,
        verbs: sender.is_some(),
    };
    let outcome = match on_incoming(&served, first) {
        Err(reason) => Err(reason),
        Ok(false) => Ok(()),
        Ok(true) => match &sender {
            Some(s) => {
                if let Err(e) = s.start(Arc::clone(&served.wake)) {
                    tracing::warn!("verbs completion thread for {peer}: {e}");
                    close_attachments(&served);
                    super::rdma::stop_sender(s);
                    return;
                }
                let writer_task = tokio::spawn(send_loop_verbs(
                    writer,
                    Arc::clone(&served.attached),
                    Arc::clone(&served.wake),
                    errors_rx,
                    Arc::clone(s),
                ));
                let outcome = read_loop(&mut reader, &served).await;
                writer_task.abort();
                outcome
            }
            None => serve_tcp(&mut reader, writer, &served, errors_rx).await,
        },
    };
    if let Err(reason) = &outcome {
        bump(&counters.protocol_errors);
        tracing::warn!("data connection from {peer} closed: {reason}");
    }
    close_attachments(&served);
    if let Some(s) = &sender {
        super::rdma::stop_sender(s);
    }
}

/// The connection ended: its channels' subpartitions are released, and
/// requests still waiting for their producer will release theirs.
fn close_attachments(served: &Served) {
    let attached = {
        let mut state = lock(&served.attached);
        state.closed = true;
        std::mem::take(&mut state.list)
    };
    for a in attached {
        a.sub.release("consumer connection closed");
    }
}

/// The consumer's first frame after the handshake (or after the verbs
/// set-up): a partition request, or the verbs set-up itself, within the
/// handshake timeout. `None` (logged and counted) closes the connection.
async fn first_frame(
    reader: &mut ControlReader,
    peer: SocketAddr,
    shared: &ServerShared,
) -> Option<Incoming> {
    let counters = &shared.counters;
    let timeout = shared.options.auth.timeout;
    match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => {
            bump(&counters.idle_closed);
            tracing::warn!(
                "data connection from {peer} closed: no partition request within {timeout:?} \
                 of its handshake (security.handshake.timeout)"
            );
            None
        }
        Ok(Ok(None)) => None,
        Ok(Ok(Some(
            frame @ Incoming::Control(
                ControlMessage::PartitionRequest { .. } | ControlMessage::VerbsConnect { .. },
            ),
        ))) => Some(frame),
        Ok(Ok(Some(other))) => {
            bump(&counters.protocol_errors);
            tracing::warn!(
                "data connection from {peer} closed: it sent {} before any partition request",
                frame_name(&other)
            );
            None
        }
        Ok(Err(e)) => {
            bump(&counters.protocol_errors);
            tracing::warn!("data connection from {peer} closed: {e}");
            None
        }
    }
}

/// A frame's kind, for a log line (never its contents).
fn frame_name(incoming: &Incoming) -> &'static str {
    match incoming {
        Incoming::Buffer(_) => "a data buffer",
        Incoming::Control(msg) => match msg {
            ControlMessage::PartitionRequest { .. } => "PartitionRequest",
            ControlMessage::AddCredit { .. } => "AddCredit",
            ControlMessage::CancelPartition { .. } => "CancelPartition",
            ControlMessage::Close => "Close",
            ControlMessage::Error { .. } => "Error",
            ControlMessage::VerbsConnect { .. } => "VerbsConnect",
            ControlMessage::VerbsCredit { .. } => "VerbsCredit",
            ControlMessage::BufferSize { .. } => "BufferSize",
            ControlMessage::BacklogAnnouncement { .. } => "BacklogAnnouncement",
        },
    }
}

/// A verbs connection's socket reader: the consumer's messages until it
/// closes (its buffers go out from [`send_loop_verbs`]).
async fn read_loop(reader: &mut ControlReader, served: &Served) -> Result<(), String> {
    loop {
        match reader.next().await {
            Ok(Some(incoming)) => {
                if !on_incoming(served, incoming)? {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Acts on one frame from the consumer; `Ok(false)` when it closed the
/// connection.
fn on_incoming(served: &Served, incoming: Incoming) -> Result<bool, String> {
    let peer = served.peer;
    let msg = match incoming {
        Incoming::Control(msg) => msg,
        Incoming::Buffer(_) => {
            return Err(format!(
                "consumer {peer} sent a data buffer to the data server"
            ));
        }
    };
    match msg {
        ControlMessage::PartitionRequest {
            channel_id,
            job,
            edge,
            source_subtask,
            subpartition,
            initial_credit,
        } => {
            let id = PartitionId {
                job,
                edge,
                source_subtask,
            };
            request_partition(served, channel_id, id, subpartition, initial_credit)?;
        }
        ControlMessage::AddCredit { channel_id, credit } => {
            let state = lock(&served.attached);
            if let Some(a) = state.list.iter().find(|a| a.channel_id == channel_id) {
                a.sub.add_credit(credit);
            }
        }
        ControlMessage::VerbsCredit { .. } if served.verbs => {
            add_verbs_credit(&served.attached, &msg)?;
        }
        ControlMessage::BufferSize { channel_id, size } => {
            let state = lock(&served.attached);
            if let Some(a) = state.list.iter().find(|a| a.channel_id == channel_id) {
                a.sub.set_buffer_size(size as usize);
            }
        }
        ControlMessage::CancelPartition { channel_id } => {
            let mut state = lock(&served.attached);
            if let Some(pos) = state.list.iter().position(|a| a.channel_id == channel_id) {
                state
                    .list
                    .remove(pos)
                    .sub
                    .release("consumer canceled the partition");
            }
        }
        ControlMessage::Close => return Ok(false),
        ControlMessage::Error { message, .. } => {
            tracing::warn!("consumer {peer} reported: {message}");
        }
        other => return Err(format!("consumer {peer} sent unexpected {other:?}")),
    }
    Ok(true)
}

/// Starts serving a partition request: a task waits for the producer (so
/// waiting does not stall credit for other channels), checks that the
/// channel is free, and attaches it, or sends the refusal back to the
/// consumer as an `Error` on its channel. `Err` (the connection closes) for
/// a consumer that breaks the protocol: a channel id it already uses, or
/// more than [`CHANNELS_PER_CONNECTION_MAX`] channels.
fn request_partition(
    served: &Served,
    channel_id: u32,
    id: PartitionId,
    subpartition: u32,
    initial_credit: u32,
) -> Result<(), String> {
    let peer = served.peer;
    {
        let mut state = lock(&served.attached);
        if state.requested.contains(&channel_id)
            || state.list.iter().any(|a| a.channel_id == channel_id)
        {
            return Err(format!(
                "consumer {peer} requested channel id {channel_id} twice"
            ));
        }
        if state.requested.len() + state.list.len() >= CHANNELS_PER_CONNECTION_MAX {
            return Err(format!(
                "consumer {peer} requested more than {CHANNELS_PER_CONNECTION_MAX} channels on one connection"
            ));
        }
        state.requested.insert(channel_id);
    }
    let registry = Arc::clone(&served.registry);
    let counters = Arc::clone(&served.counters);
    let attached = Arc::clone(&served.attached);
    let wake = Arc::clone(&served.wake);
    let errors = served.errors.clone();
    let wait = served.partition_wait;
    tokio::spawn(async move {
        let found = find_subpartition(&registry, id, subpartition, wait)
            .await
            .and_then(|sub| {
                registry
                    .claim_channel(id, subpartition)
                    .map(|claim| (sub, claim))
                    .map_err(|refused| refused.to_string())
            });
        let mut state = lock(&attached);
        state.requested.remove(&channel_id);
        let (sub, claim) = match found {
            Ok(found) => found,
            Err(reason) => {
                drop(state);
                bump(&counters.requests_refused);
                tracing::warn!(
                    "partition request from {peer} refused (channel {channel_id}): {reason}"
                );
                let _ = errors.send(ControlMessage::Error {
                    channel_id,
                    message: format!("partition request refused by the producer: {reason}"),
                });
                wake.notify_one();
                return;
            }
        };
        if state.closed {
            drop(state);
            sub.release("consumer connection closed");
            return;
        }
        bump(&counters.requests_served);
        let remote = state.pending.remove(&channel_id).unwrap_or_default();
        state.pending_count -= remote.len();
        let credit = initial_credit + remote.len() as u32;
        state.list.push(Attached {
            channel_id,
            partition: id,
            subpartition,
            sub: Arc::clone(&sub),
            seq: 0,
            remote,
            announced_backlog: 0,
            claim,
        });
        // Under the lock, so no credit that arrives meanwhile is
        // overwritten.
        sub.attach(wake, credit);
    });
    Ok(())
}

/// Sets up the producer's queue pair for a consumer that asked for verbs.
fn accept_verbs(
    verbs: Option<&Arc<VerbsEnv>>,
    endpoint: &super::verbs::QpEndpoint,
    peer: SocketAddr,
) -> Result<Arc<VerbsSender>, String> {
    let env = verbs.ok_or_else(|| {
        "this TaskManager serves its partitions over TCP only (taskmanager.network.transport)"
            .to_owned()
    })?;
    let sender = VerbsSender::new(env, &peer.to_string()).map_err(|e| e.to_string())?;
    sender.connect(endpoint).map_err(|e| e.to_string())?;
    Ok(sender)
}

/// One verbs credit from the consumer: a buffer for the channel's next write.
fn add_verbs_credit(attached: &AttachedList, msg: &ControlMessage) -> Result<(), String> {
    let Some((channel_id, remote)) = RemoteBuffer::from_credit(msg) else {
        return Ok(());
    };
    let mut state = lock(attached);
    if let Some(a) = state.list.iter_mut().find(|a| a.channel_id == channel_id) {
        a.remote.push_back(remote);
        a.sub.add_credit(1);
        return Ok(());
    }
    if state.pending_count >= PENDING_CREDIT_MAX {
        return Err(format!(
            "more than {PENDING_CREDIT_MAX} verbs credits for channels not yet attached"
        ));
    }
    state.pending_count += 1;
    state
        .pending
        .entry(channel_id)
        .or_default()
        .push_back(remote);
    Ok(())
}

/// The subpartition a request names, once its producer registered it here;
/// the refusal's reason otherwise. A released execution is refused at once;
/// an unknown one after `wait` (its producer may still be deploying).
async fn find_subpartition(
    registry: &NetworkRegistry,
    id: PartitionId,
    subpartition: u32,
    wait: Duration,
) -> Result<Arc<Subpartition>, String> {
    let deadline = Instant::now() + wait;
    loop {
        if registry.is_released(id.job) {
            return Err(format!(
                "execution {} was released at this TaskManager (partition {id:?})",
                id.job
            ));
        }
        if let Some(p) = registry.partition(&id) {
            return p
                .subpartitions
                .get(subpartition as usize)
                .and_then(Option::clone)
                .ok_or_else(|| {
                    format!("partition {id:?} has no remote subpartition {subpartition}")
                });
        }
        if Instant::now() >= deadline {
            return Err(if registry.knows_execution(id.job) {
                format!("partition {id:?} subpartition {subpartition} not found after {wait:?}")
            } else {
                format!(
                    "execution {} is unknown at this TaskManager: no partition of it registered \
                     within {wait:?} (partition {id:?})",
                    id.job
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The next buffer that may be sent, round-robin over the attached
/// subpartitions: its routing header, the buffer, and (verbs) the remote
/// buffer its credit stands for.
fn next_ready(
    attached: &AttachedList,
    next: &mut usize,
) -> Option<(BufferHeader, OutBuffer, Option<RemoteBuffer>)> {
    let mut state = lock(attached);
    let list = &mut state.list;
    let n = list.len();
    for i in 0..n {
        let idx = (*next + i) % n;
        let Some((buffer, backlog)) = list[idx].sub.poll_next() else {
            continue;
        };
        let a = &mut list[idx];
        let seq = a.seq;
        a.seq = a.seq.wrapping_add(1);
        let header = BufferHeader {
            channel_id: a.channel_id,
            edge: a.partition.edge,
            source_subtask: a.partition.source_subtask,
            target_subtask: a.subpartition,
            seq,
            backlog,
            kind: buffer.kind,
            crc: a.sub.checksum().then(|| buffer.payload.crc32c()),
            size: buffer.payload.len() as u32,
        };
        let remote = a.remote.pop_front();
        a.announced_backlog = 0;
        if buffer.kind == BufferKind::EndOfPartition {
            // Read to its end: the channel is not served again.
            list.remove(idx).claim.set_consumed();
        }
        *next = idx + 1;
        return Some((header, buffer, remote));
    }
    None
}

/// Backlog announcements for the channels that have buffers queued and no
/// credit, and have not announced at least that backlog since their last
/// buffer went out.
fn starved_backlogs(attached: &AttachedList, out: &mut Vec<u8>) {
    let mut state = lock(attached);
    for a in &mut state.list {
        if let Some(backlog) = a.sub.starved_backlog()
            && backlog > a.announced_backlog
        {
            a.announced_backlog = backlog;
            encode_control(
                &ControlMessage::BacklogAnnouncement {
                    channel_id: a.channel_id,
                    backlog,
                },
                out,
            );
        }
    }
}

/// Writes each buffer behind its frame head, [`IOV_BATCH`] slices to a
/// gathered write.
async fn write_buffers(
    stream: &mut OwnedWriteHalf,
    heads: &[[u8; FRAME_HEAD_BYTES]],
    buffers: &[OutBuffer],
) -> std::io::Result<()> {
    let mut batch = [std::io::IoSlice::new(&[]); IOV_BATCH];
    let mut count = 0;
    for (head, buffer) in heads.iter().zip(buffers) {
        let mut slices = buffer.payload.slices();
        let mut next = Some(&head[..]);
        while let Some(slice) = next {
            if count == IOV_BATCH {
                write_all_gathered(stream, &mut batch[..count]).await?;
                count = 0;
            }
            if !slice.is_empty() {
                batch[count] = std::io::IoSlice::new(slice);
                count += 1;
            }
            next = slices.next();
        }
    }
    write_all_gathered(stream, &mut batch[..count]).await
}

/// Writes every slice in `parts`, in order, with as few system calls as
/// the socket allows.
async fn write_all_gathered(
    stream: &mut OwnedWriteHalf,
    mut parts: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    while !parts.is_empty() {
        let n = stream.write_vectored(parts).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

/// A TCP connection's one task: reads the consumer's credits and requests,
/// and sends every attached subpartition's buffers while it has credit.
/// Credits are read between writes, without waiting, so a credit that
/// arrives while the task runs needs no wake-up of another thread (one
/// task per connection, as a Netty event loop serves a channel).
///
/// The buffers ready at one moment (up to [`GATHER_BUFFERS_MAX`] or
/// [`GATHER_BYTES_MAX`]) go out in one gathered write, straight from their
/// memory (a batch's own Arrow buffers, or a segment): no copy in user
/// space, one system call for many buffers.
async fn serve_tcp(
    reader: &mut ControlReader,
    mut writer: OwnedWriteHalf,
    served: &Served,
    mut errors: UnboundedReceiver<ControlMessage>,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("write failed: {e}");
    let mut control = Vec::with_capacity(64);
    let mut heads = vec![[0u8; FRAME_HEAD_BYTES]; GATHER_BUFFERS_MAX];
    let mut head = Vec::with_capacity(FRAME_HEAD_BYTES);
    let mut buffers: Vec<OutBuffer> = Vec::with_capacity(GATHER_BUFFERS_MAX);
    let mut next = 0usize;
    loop {
        // Credits and requests first: they decide what may be sent.
        loop {
            match reader.try_next().map_err(|e| e.to_string())? {
                Polled::Frame(incoming) => {
                    if !on_incoming(served, incoming)? {
                        return Ok(());
                    }
                }
                Polled::Empty => break,
                Polled::End => return Ok(()),
            }
        }
        control.clear();
        while let Ok(msg) = errors.try_recv() {
            encode_control(&msg, &mut control);
        }
        if !control.is_empty() {
            writer.write_all(&control).await.map_err(io)?;
        }
        let mut bytes = 0usize;
        while buffers.len() < GATHER_BUFFERS_MAX && bytes < GATHER_BYTES_MAX {
            let Some((header, buffer, _)) = next_ready(&served.attached, &mut next) else {
                break;
            };
            head.clear();
            encode_buffer_header(&header, &mut head);
            heads[buffers.len()].copy_from_slice(&head);
            bytes += head.len() + buffer.payload.len();
            buffers.push(buffer);
        }
        if buffers.is_empty() {
            control.clear();
            starved_backlogs(&served.attached, &mut control);
            if !control.is_empty() {
                writer.write_all(&control).await.map_err(io)?;
            }
            tokio::select! {
                ready = reader.readable() => ready.map_err(|e| e.to_string())?,
                () = served.wake.notified() => {}
            }
            continue;
        }
        write_buffers(&mut writer, &heads, &buffers)
            .await
            .map_err(io)?;
        // The segments go back to the pool only now that the kernel holds
        // their bytes.
        buffers.clear();
    }
}

/// Sends every attached subpartition's buffers as RDMA writes into the
/// buffers the consumer lent; the socket carries only error messages.
async fn send_loop_verbs(
    writer: OwnedWriteHalf,
    attached: AttachedList,
    wake: Arc<Notify>,
    mut errors: UnboundedReceiver<ControlMessage>,
    sender: Arc<VerbsSender>,
) -> std::io::Result<()> {
    let mut writer = BufWriter::new(writer);
    let mut head = Vec::with_capacity(64);
    let mut next = 0usize;
    loop {
        while let Ok(msg) = errors.try_recv() {
            head.clear();
            encode_control(&msg, &mut head);
            writer.write_all(&head).await?;
            writer.flush().await?;
        }
        if let Some(reason) = sender.failure() {
            return Err(std::io::Error::other(reason));
        }
        if !sender.has_room() {
            wake.notified().await;
            continue;
        }
        match next_ready(&attached, &mut next) {
            Some((header, buffer, remote)) => {
                // Verbs credit is granted as buffers: a credit without one
                // is a broken invariant of this side, not the peer's fault.
                let remote = remote.expect("verbs credit without a lent buffer");
                sender
                    .send(&header, buffer, remote)
                    .map_err(std::io::Error::other)?;
            }
            None => wake.notified().await,
        }
    }
}

/// Binding of a connection's channel id to a gate channel.
struct Binding {
    gate: Arc<InputGate>,
    channel: usize,
    expected_seq: u32,
}

/// A connection's channels, shared by its socket reader, its verbs
/// completion thread and its control writer.
struct Bindings {
    peer: String,
    map: Mutex<HashMap<u32, Binding>>,
    closed: Mutex<Option<NetworkError>>,
}

impl ChannelRouter for Bindings {
    fn route(&self, h: &BufferHeader) -> Result<(Arc<InputGate>, usize), NetworkError> {
        let mut map = lock(&self.map);
        let protocol = |detail: String| NetworkError::Protocol {
            peer: self.peer.clone(),
            detail,
        };
        let b = map
            .get_mut(&h.channel_id)
            .ok_or_else(|| protocol(format!("buffer for unknown channel {}", h.channel_id)))?;
        if h.seq != b.expected_seq {
            return Err(protocol(format!(
                "channel {} expected buffer #{} but got #{}",
                h.channel_id, b.expected_seq, h.seq
            )));
        }
        b.expected_seq = b.expected_seq.wrapping_add(1);
        let found = (Arc::clone(&b.gate), b.channel);
        if h.kind == BufferKind::EndOfPartition {
            map.remove(&h.channel_id);
        }
        Ok(found)
    }

    fn lookup(&self, channel_id: u32) -> Option<(Arc<InputGate>, usize)> {
        lock(&self.map)
            .get(&channel_id)
            .map(|b| (Arc::clone(&b.gate), b.channel))
    }

    fn fail_all(&self, error: NetworkError) {
        lock(&self.closed).get_or_insert_with(|| error.clone());
        let gates: Vec<_> = lock(&self.map).drain().map(|(_, b)| b.gate).collect();
        if !gates.is_empty() {
            tracing::warn!("{error}");
        }
        for g in gates {
            g.fail(error.clone());
        }
    }
}

/// One connection to a peer TaskManager's data server, shared by every
/// remote input channel that reads from that peer.
pub struct PeerConnection {
    peer: String,
    control: UnboundedSender<ControlMessage>,
    bindings: Arc<Bindings>,
    next_channel_id: AtomicU32,
    /// Set when buffers arrive over verbs rather than this socket.
    verbs: Option<Arc<VerbsReceiver>>,
}

impl PeerConnection {
    /// Attaches a gate channel to a remote subpartition; the request carries
    /// the channel's initial credit (over verbs, the credit follows as lent
    /// buffers).
    pub fn request_partition(
        &self,
        gate: &Arc<InputGate>,
        channel: usize,
        partition: PartitionId,
        subpartition: u32,
    ) -> Result<(), NetworkError> {
        if let Some(e) = lock(&self.bindings.closed).clone() {
            return Err(e);
        }
        let channel_id = self.next_channel_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.bindings.map).insert(
            channel_id,
            Binding {
                gate: Arc::clone(gate),
                channel,
                expected_seq: 0,
            },
        );
        let credit = gate.bind_remote(channel, CreditLink::new(self.control.clone(), channel_id));
        let initial_credit = if self.verbs.is_some() { 0 } else { credit };
        let lost = |_| NetworkError::PeerLost {
            peer: self.peer.clone(),
            reason: "connection closed".into(),
        };
        self.control
            .send(ControlMessage::PartitionRequest {
                channel_id,
                job: partition.job,
                edge: partition.edge,
                source_subtask: partition.source_subtask,
                subpartition,
                initial_credit,
            })
            .map_err(lost)?;
        if self.verbs.is_some() {
            self.control
                .send(ControlMessage::AddCredit { channel_id, credit })
                .map_err(lost)?;
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.bindings.closed).is_some()
    }

    /// Whether buffers arrive over verbs on this connection.
    pub fn uses_verbs(&self) -> bool {
        self.verbs.is_some()
    }
}

/// Opens and caches connections to peer TaskManagers.
#[derive(Default)]
pub struct ConnectionManager {
    connections: tokio::sync::Mutex<HashMap<SocketAddr, Arc<PeerConnection>>>,
    /// With a verbs device, every connection asks its producer for RDMA.
    verbs: Option<Arc<VerbsEnv>>,
    /// The secret and timeout of every connection's handshake (also the
    /// task-read connections': [`ConnectionManager::auth`]).
    auth: PeerAuth,
}

impl ConnectionManager {
    pub fn new(verbs: Option<Arc<VerbsEnv>>, auth: PeerAuth) -> Self {
        Self {
            connections: tokio::sync::Mutex::default(),
            verbs,
            auth,
        }
    }

    /// How this TaskManager authenticates to its peers' data servers.
    pub fn auth(&self) -> &PeerAuth {
        &self.auth
    }

    /// Whether connections ask their producers for RDMA.
    pub fn uses_verbs(&self) -> bool {
        self.verbs.is_some()
    }

    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer_name: &str,
        segment_size: usize,
    ) -> Result<Arc<PeerConnection>, NetworkError> {
        let mut map = self.connections.lock().await;
        if let Some(c) = map.get(&addr)
            && !c.is_closed()
        {
            return Ok(Arc::clone(c));
        }
        let peer = format!("{peer_name} ({addr})");
        let connect_err = |reason: String| NetworkError::Connect {
            peer: peer.clone(),
            reason,
        };
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        self.auth
            .handshake(&mut stream, Role::Client, Plane::Data, &addr.to_string())
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let verbs = match &self.verbs {
            Some(env) => Some(
                verbs_handshake(env, &mut reader, &mut writer, &peer, segment_size)
                    .await
                    .map_err(connect_err)?,
            ),
            None => None,
        };
        let (control, control_rx) = unbounded_channel();
        let bindings = Arc::new(Bindings {
            peer: peer.clone(),
            map: Mutex::default(),
            closed: Mutex::default(),
        });
        if let Some(receiver) = &verbs {
            let router: Arc<dyn ChannelRouter> = Arc::clone(&bindings) as _;
            receiver
                .start(router)
                .map_err(|e| connect_err(e.to_string()))?;
        }
        let conn = Arc::new(PeerConnection {
            peer: peer.clone(),
            control,
            bindings: Arc::clone(&bindings),
            next_channel_id: AtomicU32::new(0),
            verbs: verbs.clone(),
        });
        let granter = verbs.clone().map(|r| (r, Arc::clone(&bindings)));
        tokio::spawn(control_loop(writer, control_rx, granter));
        tokio::spawn(receive_loop(reader, bindings, verbs, segment_size));
        map.insert(addr, Arc::clone(&conn));
        Ok(conn)
    }
}

/// The consumer's half of the verbs set-up: its endpoint out, the
/// producer's back, both queue pairs connected.
async fn verbs_handshake(
    env: &Arc<VerbsEnv>,
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    peer: &str,
    segment_size: usize,
) -> Result<Arc<VerbsReceiver>, String> {
    let receiver = VerbsReceiver::new(env, peer).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    encode_control(
        &ControlMessage::VerbsConnect {
            endpoint: receiver.endpoint(),
        },
        &mut out,
    );
    writer.write_all(&out).await.map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(VERBS_HANDSHAKE_TIMEOUT, read_incoming(reader, segment_size))
        .await
        .map_err(|_| {
            format!("no answer to the verbs handshake within {VERBS_HANDSHAKE_TIMEOUT:?}")
        })?
        .map_err(|e| e.to_string())?;
    match answer {
        Some(Incoming::Control(ControlMessage::VerbsConnect { endpoint })) => {
            receiver.connect(&endpoint).map_err(|e| e.to_string())?;
            Ok(receiver)
        }
        Some(Incoming::Control(ControlMessage::Error { message, .. })) => Err(message),
        other => Err(format!(
            "unexpected answer to the verbs handshake: {other:?}"
        )),
    }
}

async fn control_loop(
    writer: OwnedWriteHalf,
    mut rx: UnboundedReceiver<ControlMessage>,
    verbs: Option<(Arc<VerbsReceiver>, Arc<Bindings>)>,
) {
    let mut writer = BufWriter::new(writer);
    let mut out = Vec::with_capacity(64);
    let mut grants = Vec::new();
    while let Some(msg) = rx.recv().await {
        out.clear();
        let mut next = Some(msg);
        // Coalesce whatever else is queued into the same flush.
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match (&msg, &verbs) {
                (ControlMessage::AddCredit { channel_id, credit }, Some((receiver, bindings))) => {
                    grants.clear();
                    if let Err(e) = receiver.grant(&**bindings, *channel_id, *credit, &mut grants) {
                        bindings.fail_all(e);
                        return;
                    }
                    for g in &grants {
                        encode_control(g, &mut out);
                    }
                }
                _ => encode_control(&msg, &mut out),
            }
        }
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
}

async fn receive_loop(
    reader: OwnedReadHalf,
    bindings: Arc<Bindings>,
    verbs: Option<Arc<VerbsReceiver>>,
    segment_size: usize,
) {
    let mut reader = FrameReader::new(reader);
    let error = loop {
        match receive_one(&mut reader, &bindings, segment_size).await {
            Ok(true) => continue,
            Ok(false) => {
                break NetworkError::PeerLost {
                    peer: bindings.peer.clone(),
                    reason: "connection closed by peer".into(),
                };
            }
            Err(e) => break e,
        }
    };
    if let Some(v) = &verbs {
        v.stop();
    }
    bindings.fail_all(error);
}

/// Queues a received buffer in its gate (TCP, either reader): its CRC
/// checked when it carries one, an IPC payload read into memory of its own
/// (`body`) or the payload in the segment. `Err` names a CRC mismatch.
pub(super) fn deliver(
    gate: &InputGate,
    channel: usize,
    h: &BufferHeader,
    segment: Segment,
    floating: bool,
    body: Option<Vec<u8>>,
) -> Result<(), String> {
    let len = h.size as usize;
    if let Some(expected) = h.crc {
        let payload = body.as_deref().unwrap_or(&segment.as_slice()[..len]);
        let crc = crc32c::crc32c(payload);
        if crc != expected {
            return Err(format!(
                "CRC mismatch on channel {} buffer #{}: header {expected:#010x}, payload {crc:#010x}",
                h.channel_id, h.seq
            ));
        }
    }
    let item = GateItem::Remote {
        kind: h.kind,
        segment,
        body: body.map(arrow_buffer::Buffer::from_vec),
        offset: 0,
        len,
        floating,
    };
    gate.push_remote(channel, item, len, h.backlog);
    Ok(())
}

/// Receives one frame; `Ok(false)` at a clean end of stream.
async fn receive_one(
    reader: &mut FrameReader,
    bindings: &Bindings,
    segment_size: usize,
) -> Result<bool, NetworkError> {
    let peer = &bindings.peer;
    let protocol = |detail: String| NetworkError::Protocol {
        peer: peer.to_owned(),
        detail,
    };
    let incoming = match reader.next_frame(segment_size).await {
        Ok(Some(i)) => i,
        Ok(None) => return Ok(false),
        Err(ReadError::Io(e)) => {
            return Err(NetworkError::PeerLost {
                peer: peer.to_owned(),
                reason: e.to_string(),
            });
        }
        Err(ReadError::Frame(e)) => return Err(protocol(e.to_string())),
    };
    match incoming {
        Incoming::Buffer(h) => {
            let (gate, channel) = bindings.route(&h)?;
            let len = h.size as usize;
            let (mut segment, floating) = match gate.take_segment(channel) {
                Ok(taken) => taken,
                Err(_) if gate.has_failed() => {
                    // The gate failed for another reason (another peer was
                    // lost): drop its buffer and keep the connection, which
                    // other gates, even other jobs', share.
                    reader.skip(len).await.map_err(|e| NetworkError::PeerLost {
                        peer: peer.to_owned(),
                        reason: e.to_string(),
                    })?;
                    return Ok(true);
                }
                Err(e) => return Err(e),
            };
            let lost = |e: std::io::Error| NetworkError::PeerLost {
                peer: peer.to_owned(),
                reason: e.to_string(),
            };
            // An IPC payload is read into memory of its own, which the
            // decoded batch then shares: no copy out of the segment, which
            // stands for the credit until the consumer takes the buffer.
            let body = if h.kind == BufferKind::Ipc {
                Some(reader.read_owned(len).await.map_err(lost)?)
            } else {
                reader
                    .read_exact(&mut segment.as_mut_slice()[..len])
                    .await
                    .map_err(lost)?;
                None
            };
            deliver(&gate, channel, &h, segment, floating, body).map_err(protocol)?;
            Ok(true)
        }
        Incoming::Control(ControlMessage::Error {
            channel_id,
            message,
        }) => {
            let binding = lock(&bindings.map).remove(&channel_id);
            match binding {
                Some(b) => {
                    b.gate.fail(protocol(message));
                    Ok(true)
                }
                None => Err(protocol(message)),
            }
        }
        Incoming::Control(ControlMessage::BacklogAnnouncement {
            channel_id,
            backlog,
        }) => {
            // A channel that ended meanwhile needs no buffers.
            if let Some((gate, channel)) = bindings.lookup(channel_id) {
                gate.announce_backlog(channel, backlog);
            }
            Ok(true)
        }
        Incoming::Control(ControlMessage::Close) => Ok(false),
        Incoming::Control(other) => Err(protocol(format!("unexpected message {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use arrow_array::{Int64Array, RecordBatch};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::memory::NetworkBufferPool;
    use crate::network::gate::{ChannelKind, GateBuffers, InputEvent};
    use crate::network::ipc::ChannelEncoder;
    use crate::network::partition::{Partitioner, Target, WriterMetrics};
    use crate::network::{GateId, InputReader, RecordWriter, ResultPartition};

    const SEGMENT: usize = 4096;
    const BUFFERS: GateBuffers = GateBuffers {
        exclusive_per_channel: 2,
        floating_per_gate: 3,
        max_per_channel: 4,
    };
    const PARTITION: PartitionId = PartitionId {
        job: 1,
        edge: 0,
        source_subtask: 0,
    };
    const GATE: GateId = GateId {
        job: 1,
        edge: 0,
        target_subtask: 0,
    };

    fn drain(mut reader: InputReader) -> Result<Vec<i64>, NetworkError> {
        let mut values = Vec::new();
        loop {
            match reader.next(Duration::from_secs(10))? {
                Some(InputEvent::Batch(b)) => values.extend(
                    b.column(0)
                        .as_primitive::<Int64Type>()
                        .values()
                        .iter()
                        .copied(),
                ),
                Some(InputEvent::End) => return Ok(values),
                Some(InputEvent::Watermark(_)) => {}
                // A barrier is a marker in the value sequence.
                Some(InputEvent::Barrier(n)) => values.push(i64::MIN + n as i64),
                None => panic!("no progress for 10 s"),
            }
        }
    }

    /// Channel 0 of `gate` reads `PARTITION` over its own connection, on
    /// the thread that pops it.
    async fn attach_task_read(gate: &Arc<InputGate>, addr: SocketAddr, peer: &str) {
        let link = crate::network::taskread::connect(addr, peer, &PeerAuth::loopback())
            .await
            .unwrap();
        link.request_partition(gate, 0, PARTITION, 0).unwrap();
        let input = crate::network::taskread::TaskReadInput::new(vec![link], SEGMENT).unwrap();
        gate.set_driver(input);
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Tcp,
        /// TCP, the gate's own connection read by its task thread.
        TaskRead,
        /// Emulated verbs, both ends in one process.
        VerbsInProcess,
        /// Emulated verbs over the emulation's TCP link, as between processes.
        VerbsLinked,
    }

    fn verbs_env(mode: Mode, pool: &Arc<NetworkBufferPool>) -> Option<Arc<VerbsEnv>> {
        use crate::network::verbs::emu::EmuDevice;
        let device = match mode {
            Mode::Tcp | Mode::TaskRead => return None,
            Mode::VerbsInProcess => EmuDevice::open("127.0.0.1").unwrap(),
            Mode::VerbsLinked => EmuDevice::open_isolated("127.0.0.1").unwrap(),
        };
        Some(VerbsEnv::new(device, pool).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_channel_delivers_every_batch_once_in_order_and_returns_all_credit() {
        channel_delivers_every_batch_once_in_order(Mode::Tcp).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn task_read_channel_delivers_every_batch_once_in_order_and_returns_all_credit() {
        channel_delivers_every_batch_once_in_order(Mode::TaskRead).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verbs_channel_delivers_every_batch_once_in_order_and_returns_all_credit() {
        channel_delivers_every_batch_once_in_order(Mode::VerbsInProcess).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verbs_channel_over_the_emulation_link_delivers_every_batch_once_in_order() {
        channel_delivers_every_batch_once_in_order(Mode::VerbsLinked).await;
    }

    async fn channel_delivers_every_batch_once_in_order(mode: Mode) {
        let registry = Arc::new(NetworkRegistry::default());
        let pool = NetworkBufferPool::new(64, SEGMENT);
        let producer_side = NetworkBufferPool::new(64, SEGMENT);
        // Registered at start-up, before any segment is handed out.
        let consumer_env = verbs_env(mode, &pool);
        let server = DataServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&registry),
            verbs_env(mode, &producer_side),
            DataServerOptions::default(),
        )
        .await
        .unwrap();
        let sub = Subpartition::new(BUFFERS.max_per_channel);
        // Checksummed buffers on TCP and over the link, plain in process:
        // both kinds of header on both receive paths.
        sub.set_checksum(mode != Mode::VerbsInProcess);
        registry.register_partition(Arc::new(ResultPartition {
            id: PARTITION,
            subpartitions: vec![Some(Arc::clone(&sub))],
        }));
        let gate = InputGate::new(GATE, &[ChannelKind::Remote], BUFFERS, &pool).unwrap();
        let connections = ConnectionManager::new(consumer_env, PeerAuth::loopback());
        if mode == Mode::TaskRead {
            attach_task_read(&gate, server.local_addr, "tm-test").await;
        } else {
            let conn = connections
                .connect(server.local_addr, "tm-test", SEGMENT)
                .await
                .unwrap();
            assert_eq!(conn.uses_verbs(), mode != Mode::Tcp);
            conn.request_partition(&gate, 0, PARTITION, 0).unwrap();
        }

        let producer_pool = Arc::clone(&producer_side);
        let producer = std::thread::spawn(move || {
            let mut writer = RecordWriter::new(
                Partitioner::Forward,
                vec![Target::Remote {
                    sub,
                    encoder: Box::new(ChannelEncoder::new(
                        SEGMENT - crate::network::PAYLOAD_HEADROOM,
                    )),
                }],
                128,
                producer_pool,
                Arc::new(|| false),
                Arc::new(WriterMetrics::default()),
            );
            // 2000 rows of 8 bytes do not fit one 4 KiB segment: batches are cut.
            for start in (0..200_000i64).step_by(2000) {
                let column = Int64Array::from_iter_values(start..start + 2000);
                let batch = RecordBatch::try_from_iter([("v", Arc::new(column) as _)]).unwrap();
                writer.emit(batch).unwrap();
                if start % 50_000 == 48_000 {
                    writer.barrier(1 + start as u64 / 50_000).unwrap();
                }
            }
            writer.finish().unwrap();
        });
        let reader = InputReader::new(vec![Arc::clone(&gate)]);
        let values = tokio::task::spawn_blocking(move || drain(reader))
            .await
            .unwrap()
            .unwrap();
        producer.join().unwrap();
        // Barriers arrive in order with the data, after the batch before them.
        let mut expected = Vec::new();
        for v in 0..200_000i64 {
            expected.push(v);
            if v % 50_000 == 49_999 {
                expected.push(i64::MIN + 1 + v / 50_000);
            }
        }
        assert_eq!(values, expected);
        // Every credit came back: exclusive and floating segments are free
        // (over verbs, the ones still lent at the end are reclaimed).
        assert_eq!(gate.free_segment_count(), 2 + 3);
        // And every producer segment went back to its pool.
        for _ in 0..100 {
            if producer_side.available_count() == 64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(producer_side.available_count(), 64);
    }

    /// A raw connection to `addr` that has passed the handshake.
    async fn authenticated(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        PeerAuth::loopback()
            .handshake(&mut s, Role::Client, Plane::Data, "test producer")
            .await
            .unwrap();
        s
    }

    /// Waits until the server has closed `s` (the read sees the end or a
    /// reset); fails if it keeps the connection open. Returns the bytes the
    /// server sent before closing.
    async fn closed_by_server(s: &mut TcpStream) -> usize {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let mut sent = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the server must close a connection that sent garbage")
            {
                Ok(0) | Err(_) => return sent,
                Ok(n) => sent += n,
            }
        }
    }

    fn request_frame(channel_id: u32, partition: PartitionId) -> Vec<u8> {
        let mut request = Vec::new();
        encode_control(
            &ControlMessage::PartitionRequest {
                channel_id,
                job: partition.job,
                edge: partition.edge,
                source_subtask: partition.source_subtask,
                subpartition: 0,
                initial_credit: 1,
            },
            &mut request,
        );
        request
    }

    /// Registers `PARTITION` with one subpartition that holds only its end.
    fn register_finished_partition(registry: &NetworkRegistry) {
        let sub = Subpartition::new(4);
        registry.register_partition(Arc::new(ResultPartition {
            id: PARTITION,
            subpartitions: vec![Some(Arc::clone(&sub))],
        }));
        let pool = NetworkBufferPool::new(4, SEGMENT);
        let mut writer = RecordWriter::new(
            Partitioner::Forward,
            vec![Target::Remote {
                sub,
                encoder: Box::new(ChannelEncoder::new(
                    SEGMENT - crate::network::PAYLOAD_HEADROOM,
                )),
            }],
            128,
            pool,
            Arc::new(|| false),
            Arc::new(WriterMetrics::default()),
        );
        writer.finish().unwrap();
    }

    /// A TCP data server on an ephemeral loopback port, without a secret.
    async fn plain_server(registry: &Arc<NetworkRegistry>) -> DataServer {
        DataServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(registry),
            None,
            DataServerOptions::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_frames_close_only_their_connection_and_the_server_keeps_serving() {
        let registry = Arc::new(NetworkRegistry::default());
        let server = plain_server(&registry).await;
        let request = request_frame(0, PARTITION);
        let mut bad_magic = request.clone();
        bad_magic[4] ^= 0xff;
        let mut too_long = request.clone();
        too_long[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let truncated = request[..request.len() - 3].to_vec();
        for garbage in [vec![0xa5; 64], bad_magic, too_long, truncated] {
            // Before the handshake: refused as not a strata peer...
            let mut s = TcpStream::connect(server.local_addr).await.unwrap();
            s.write_all(&garbage).await.unwrap();
            s.shutdown().await.unwrap();
            // At most the server's own hello came back.
            assert!(closed_by_server(&mut s).await <= crate::security::HELLO_BYTES);
            // ...and after it, as a malformed frame.
            let mut s = authenticated(server.local_addr).await;
            s.write_all(&garbage).await.unwrap();
            // A truncated frame is only known as such at end of stream.
            s.shutdown().await.unwrap();
            assert_eq!(closed_by_server(&mut s).await, 0);
        }
        let stats = server.stats();
        assert_eq!(stats.handshakes_failed, 4, "{stats:?}");
        // The truncated request ends at a clean-looking close; the others
        // are malformed.
        assert!(stats.protocol_errors >= 3, "{stats:?}");
        // The data server still serves well-formed consumers.
        register_finished_partition(&registry);
        let mut s = authenticated(server.local_addr).await;
        s.write_all(&request).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_incoming(&mut s, SEGMENT))
            .await
            .unwrap()
            .unwrap();
        match answer {
            Some(Incoming::Buffer(h)) => assert_eq!(h.kind, BufferKind::EndOfPartition),
            other => panic!("expected the end-of-partition buffer, got {other:?}"),
        }
    }

    /// Sends `request` on a fresh authenticated connection and returns the
    /// server's first answer.
    async fn answer_to(addr: SocketAddr, request: &[u8]) -> (TcpStream, Option<Incoming>) {
        let mut s = authenticated(addr).await;
        s.write_all(request).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_incoming(&mut s, SEGMENT))
            .await
            .expect("no answer to the partition request")
            .unwrap();
        (s, answer)
    }

    fn refusal(answer: Option<Incoming>) -> String {
        match answer {
            Some(Incoming::Control(ControlMessage::Error { message, .. })) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_is_served_to_one_consumer_and_only_while_its_execution_lives() {
        let registry = Arc::new(NetworkRegistry::default());
        let options = DataServerOptions {
            partition_wait: Duration::from_millis(100),
            ..DataServerOptions::default()
        };
        let server = DataServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&registry),
            None,
            options,
        )
        .await
        .unwrap();
        let addr = server.local_addr;
        // Unknown execution: refused after the wait, naming it.
        let unknown = PartitionId {
            job: 77,
            ..PARTITION
        };
        let message = refusal(answer_to(addr, &request_frame(0, unknown)).await.1);
        assert!(message.contains("execution 77 is unknown"), "{message}");
        // A subpartition queue that never ends: the first consumer holds it.
        let sub = Subpartition::new(4);
        registry.register_partition(Arc::new(ResultPartition {
            id: PARTITION,
            subpartitions: vec![Some(Arc::clone(&sub))],
        }));
        let mut first = authenticated(addr).await;
        first.write_all(&request_frame(0, PARTITION)).await.unwrap();
        while server.stats().requests_served == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let message = refusal(answer_to(addr, &request_frame(0, PARTITION)).await.1);
        assert!(message.contains("already has a consumer"), "{message}");
        // The same connection may not reuse a channel id either.
        first.write_all(&request_frame(0, PARTITION)).await.unwrap();
        closed_by_server(&mut first).await;
        // Its close freed the channel; once released, the execution is
        // refused at once.
        registry.release_job(PARTITION.job, "test");
        let message = refusal(answer_to(addr, &request_frame(0, PARTITION)).await.1);
        assert!(message.contains("was released"), "{message}");
        let stats = server.stats();
        assert_eq!(stats.requests_refused, 3, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_read_to_its_end_is_not_served_again() {
        let registry = Arc::new(NetworkRegistry::default());
        let server = plain_server(&registry).await;
        register_finished_partition(&registry);
        let (_first, answer) = answer_to(server.local_addr, &request_frame(0, PARTITION)).await;
        assert!(
            matches!(answer, Some(Incoming::Buffer(h)) if h.kind == BufferKind::EndOfPartition)
        );
        let message = refusal(
            answer_to(server.local_addr, &request_frame(0, PARTITION))
                .await
                .1,
        );
        assert!(message.contains("read to its end"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_authenticated_connection_without_a_request_is_closed_after_the_timeout() {
        let registry = Arc::new(NetworkRegistry::default());
        let options = DataServerOptions {
            auth: PeerAuth {
                timeout: Duration::from_millis(200),
                ..PeerAuth::loopback()
            },
            ..DataServerOptions::default()
        };
        let server = DataServer::start("127.0.0.1:0".parse().unwrap(), registry, None, options)
            .await
            .unwrap();
        let mut idle = authenticated(server.local_addr).await;
        closed_by_server(&mut idle).await;
        // A credit before any request is no request.
        let mut early = authenticated(server.local_addr).await;
        let mut credit = Vec::new();
        encode_control(
            &ControlMessage::AddCredit {
                channel_id: 0,
                credit: 1,
            },
            &mut credit,
        );
        early.write_all(&credit).await.unwrap();
        closed_by_server(&mut early).await;
        let stats = server.stats();
        assert_eq!(stats.connections_idle_closed, 1, "{stats:?}");
        assert_eq!(stats.protocol_errors, 1, "{stats:?}");
    }

    /// A producer that answers the partition request with `bytes` and then
    /// either closes the connection or holds it open; returns the error the
    /// consuming gate sees.
    async fn consume_from_fake_producer(bytes: Vec<u8>, hold_open: bool) -> NetworkError {
        let shared = consume_from_fake_producer_as(bytes.clone(), hold_open, false).await;
        let task_read = consume_from_fake_producer_as(bytes, hold_open, true).await;
        // Both readers of a connection see the same failure.
        assert_eq!(
            std::mem::discriminant(&shared),
            std::mem::discriminant(&task_read),
            "{shared} / {task_read}"
        );
        assert!(task_read.to_string().contains("tm-9"), "{task_read}");
        shared
    }

    async fn consume_from_fake_producer_as(
        bytes: Vec<u8>,
        hold_open: bool,
        task_read: bool,
    ) -> NetworkError {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            PeerAuth::loopback()
                .handshake(&mut s, Role::Server, Plane::Data, "test consumer")
                .await
                .unwrap();
            // A real producer answers only after the partition request.
            let request = read_incoming(&mut s, SEGMENT).await.unwrap();
            assert!(matches!(
                request,
                Some(Incoming::Control(ControlMessage::PartitionRequest { .. }))
            ));
            s.write_all(&bytes).await.unwrap();
            if hold_open {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let pool = NetworkBufferPool::new(16, SEGMENT);
        let gate = InputGate::new(GATE, &[ChannelKind::Remote], BUFFERS, &pool).unwrap();
        let connections = ConnectionManager::default();
        if task_read {
            attach_task_read(&gate, addr, "tm-9").await;
        } else {
            let conn = connections.connect(addr, "tm-9", SEGMENT).await.unwrap();
            conn.request_partition(&gate, 0, PARTITION, 0).unwrap();
        }
        let reader = InputReader::new(vec![Arc::clone(&gate)]);
        tokio::task::spawn_blocking(move || drain(reader))
            .await
            .unwrap()
            .unwrap_err()
    }

    fn header(kind: BufferKind, backlog: u32, crc: Option<u32>, size: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let h = BufferHeader {
            channel_id: 0,
            edge: 0,
            source_subtask: 0,
            target_subtask: 0,
            seq: 0,
            backlog,
            kind,
            crc,
            size,
        };
        encode_buffer_header(&h, &mut out);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_vanishing_mid_transfer_fails_the_gate_naming_the_peer() {
        // Half a frame, then the process "dies".
        let mut bytes = header(BufferKind::Ipc, 5, None, 100);
        bytes.extend_from_slice(&[0u8; 40]);
        let err = consume_from_fake_producer(bytes, false).await;
        assert!(matches!(err, NetworkError::PeerLost { .. }), "{err}");
        assert!(err.to_string().contains("tm-9"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupted_buffer_is_a_protocol_error_not_data() {
        let payload = 7i64.to_be_bytes();
        let mut bytes = header(
            BufferKind::Watermark,
            0,
            Some(crc32c::crc32c(&payload) ^ 1),
            8,
        );
        bytes.extend_from_slice(&payload);
        let err = consume_from_fake_producer(bytes, true).await;
        assert!(err.to_string().contains("CRC mismatch"), "{err}");
    }
}
