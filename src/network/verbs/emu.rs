//! Emulated verbs: the semantics of an RDMA NIC in user space.
//!
//! What is emulated, and checked on every access as a NIC would:
//!
//! - Memory registration: a region has a local key and a remote key; every
//!   scatter/gather entry must lie inside the region of its lkey
//!   (`LocalProtection` otherwise), every remote write inside the region of
//!   its rkey with the remote-write right (`RemoteAccess` otherwise).
//! - Reliable-connected queue pairs: operations of one queue pair arrive in
//!   the order they were posted, exactly once; a SEND or WRITE WITH IMMEDIATE
//!   consumes one posted receive at the peer (`RnrRetryExceeded` when none is
//!   posted); an error puts the queue pair in the error state and flushes
//!   what is still queued.
//! - Completion queues with a fixed depth.
//!
//! Two links carry operations between queue pairs. In one process the
//! poster's thread delivers straight into the peer's memory (the fabric
//! table finds the peer's device by id). Between processes every queue pair
//! opens a TCP connection to the peer device's link listener; a writer
//! thread plays the NIC's send engine (reads the gather list, writes a
//! frame), the peer's link thread validates and lands the data, and its
//! acknowledgement completes the send, in order.
//!
//! Link frame (big-endian): `op: u8` (0 SEND, 1 WRITE_IMM), `qpn: u32`
//! (target), `imm_flag: u8`, `imm: u32`, `remote_addr: u64`, `rkey: u32`,
//! `len: u32`, then `len` bytes. Acknowledgement: `status: u8`. A link starts
//! with `magic: u32 = 0x454D5642` ("EMVB") and the target device id
//! (`len: u16` + bytes).

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, LazyLock, Mutex, Weak};
use std::time::Duration;

use super::{
    Access, CompletionQueue, DeviceKind, MemoryRegion, QpCaps, QpEndpoint, QueuePair, RecvRequest,
    SendOp, SendRequest, Sge, VerbsDevice, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};

const LINK_MAGIC: u32 = 0x454D_5642;
const OP_SEND: u8 = 0;
const OP_WRITE_IMM: u8 = 1;
const FRAME_HEAD_LEN: usize = 1 + 4 + 1 + 4 + 8 + 4 + 4;
/// Longest device id a link hello may carry.
const DEVICE_ID_MAX: usize = 256;
/// Largest single operation a link accepts (a NIC's max message size is 2 GiB;
/// the shuffle never sends more than one segment).
const MESSAGE_MAX: u32 = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Devices of this process by id, so that queue pairs in one process deliver
/// to each other without a socket.
static FABRIC: LazyLock<Mutex<HashMap<String, Weak<DeviceInner>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static DEVICE_COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug)]
struct Region {
    addr: u64,
    len: usize,
    access: Access,
}

impl Region {
    fn contains(&self, addr: u64, len: usize) -> bool {
        addr >= self.addr
            && (addr - self.addr)
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.len as u64)
    }
}

struct DeviceInner {
    id: String,
    link_addr: SocketAddr,
    /// Regions by lkey and by rkey (the two keys differ, as on hardware).
    by_lkey: Mutex<HashMap<u32, Region>>,
    by_rkey: Mutex<HashMap<u32, Region>>,
    qps: Mutex<HashMap<u32, Weak<QpInner>>>,
    next_key: AtomicU32,
    next_qpn: AtomicU32,
}

impl DeviceInner {
    fn local_region(&self, sge: &Sge) -> Option<Region> {
        let region = *lock(&self.by_lkey).get(&sge.lkey)?;
        region
            .contains(sge.addr, sge.len as usize)
            .then_some(region)
    }

    fn qp(&self, qpn: u32) -> Option<Arc<QpInner>> {
        lock(&self.qps).get(&qpn).and_then(Weak::upgrade)
    }
}

/// An emulated RDMA device. Its link listener (for peers in other processes)
/// binds `bind_host:0`.
pub struct EmuDevice {
    inner: Arc<DeviceInner>,
}

impl EmuDevice {
    /// Opens a device that peers in this process reach directly and peers in
    /// other processes over its link listener.
    pub fn open(bind_host: &str) -> Result<Arc<Self>, VerbsError> {
        Self::open_with(bind_host, true)
    }

    /// Opens a device that every peer, even one in this process, reaches over
    /// the TCP link: what two processes do, inside one test.
    pub fn open_isolated(bind_host: &str) -> Result<Arc<Self>, VerbsError> {
        Self::open_with(bind_host, false)
    }

    fn open_with(bind_host: &str, in_process: bool) -> Result<Arc<Self>, VerbsError> {
        let listener = TcpListener::bind((bind_host, 0)).map_err(|e| VerbsError::Call {
            call: "emulated device link listener",
            reason: format!("bind {bind_host}:0: {e}"),
        })?;
        let link_addr = listener.local_addr().map_err(|e| VerbsError::Call {
            call: "emulated device link listener",
            reason: e.to_string(),
        })?;
        let n = DEVICE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("emu-{}-{n}", std::process::id());
        // Keys start at a per-device offset so that a key of one device is
        // not valid on another by accident.
        let salt = (std::process::id() << 16) ^ (n << 8) ^ 0x5a5a_0001;
        let inner = Arc::new(DeviceInner {
            id: id.clone(),
            link_addr,
            by_lkey: Mutex::default(),
            by_rkey: Mutex::default(),
            qps: Mutex::default(),
            next_key: AtomicU32::new(salt | 1),
            next_qpn: AtomicU32::new(0x100),
        });
        if in_process {
            lock(&FABRIC).insert(id, Arc::downgrade(&inner));
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("emu-verbs-accept".into())
            .spawn(move || accept_loop(listener, weak))
            .map_err(|e| VerbsError::Call {
                call: "spawn link thread",
                reason: e.to_string(),
            })?;
        Ok(Arc::new(Self { inner }))
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        lock(&FABRIC).remove(&self.inner.id);
        // Wake the accept loop so it notices the device is gone.
        let _ = TcpStream::connect_timeout(&self.inner.link_addr, Duration::from_millis(100));
    }
}

struct EmuRegion {
    device: Arc<DeviceInner>,
    region: Region,
    lkey: u32,
    rkey: u32,
}

impl MemoryRegion for EmuRegion {
    fn addr(&self) -> u64 {
        self.region.addr
    }
    fn len(&self) -> usize {
        self.region.len
    }
    fn lkey(&self) -> u32 {
        self.lkey
    }
    fn rkey(&self) -> u32 {
        self.rkey
    }
}

impl Drop for EmuRegion {
    fn drop(&mut self) {
        lock(&self.device.by_lkey).remove(&self.lkey);
        lock(&self.device.by_rkey).remove(&self.rkey);
    }
}

impl VerbsDevice for EmuDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Emulated
    }

    fn describe(&self) -> String {
        format!(
            "emulated verbs {} (link {})",
            self.inner.id, self.inner.link_addr
        )
    }

    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, VerbsError> {
        if addr.is_null() || len == 0 {
            return Err(VerbsError::Call {
                call: "ibv_reg_mr",
                reason: format!("empty region at {addr:p} ({len} bytes)"),
            });
        }
        let region = Region {
            addr: addr as u64,
            len,
            access,
        };
        let lkey = self.inner.next_key.fetch_add(2, Ordering::Relaxed);
        let rkey = lkey.rotate_left(13) ^ 0x9e37_79b9;
        lock(&self.inner.by_lkey).insert(lkey, region);
        lock(&self.inner.by_rkey).insert(rkey, region);
        Ok(Box::new(EmuRegion {
            device: Arc::clone(&self.inner),
            region,
            lkey,
            rkey,
        }))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CompletionQueue>, VerbsError> {
        let cq = EmuCq::new(depth);
        let inner = Arc::clone(&cq.inner);
        let cq: Arc<dyn CompletionQueue> = Arc::new(cq);
        register_cq(&cq, &inner);
        Ok(cq)
    }

    fn create_qp(
        &self,
        cq: &Arc<dyn CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QueuePair>, VerbsError> {
        // The emulated queue pair pushes completions itself, so it needs the
        // concrete queue: a completion queue of another device is refused.
        let cq = lock(&CQS)
            .get(&cq_key(cq))
            .and_then(Weak::upgrade)
            .ok_or(VerbsError::Call {
                call: "ibv_create_qp",
                reason: "the completion queue was not created by this emulated device".into(),
            })?;
        let qpn = self.inner.next_qpn.fetch_add(1, Ordering::Relaxed);
        let qp = Arc::new(QpInner {
            qpn,
            device: Arc::clone(&self.inner),
            cq,
            caps,
            state: Mutex::new(QpState::Reset),
            recvs: Mutex::new(VecDeque::new()),
            sends_outstanding: AtomicU32::new(0),
        });
        lock(&self.inner.qps).insert(qpn, Arc::downgrade(&qp));
        Ok(Arc::new(EmuQp { inner: qp }))
    }
}

/// Emulated completion queues by address, so `create_qp` can find the
/// concrete queue behind a trait object.
static CQS: LazyLock<Mutex<HashMap<usize, Weak<CqInner>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn cq_key(cq: &Arc<dyn CompletionQueue>) -> usize {
    Arc::as_ptr(cq) as *const () as usize
}

struct CqInner {
    depth: usize,
    queue: Mutex<VecDeque<WorkCompletion>>,
    ready: Condvar,
}

impl CqInner {
    /// Queues a completion; `false` when the queue overflowed (the
    /// completion is lost, as on hardware, and the queue pair must go to
    /// the error state).
    fn push(&self, wc: WorkCompletion) -> bool {
        let mut q = lock(&self.queue);
        if q.len() >= self.depth {
            return false;
        }
        q.push_back(wc);
        drop(q);
        self.ready.notify_all();
        true
    }
}

struct EmuCq {
    inner: Arc<CqInner>,
}

impl EmuCq {
    fn new(depth: u32) -> Self {
        Self {
            inner: Arc::new(CqInner {
                depth: depth.max(1) as usize,
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
            }),
        }
    }
}

impl Drop for EmuCq {
    fn drop(&mut self) {
        lock(&CQS).remove(&(self as *const Self as *const () as usize));
    }
}

impl CompletionQueue for EmuCq {
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> usize {
        let mut q = lock(&self.inner.queue);
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        n
    }

    fn wait(&self, timeout: Duration) {
        let q = lock(&self.inner.queue);
        let _ = self
            .inner
            .ready
            .wait_timeout_while(q, timeout, |q| q.is_empty());
    }
}

/// Registers a freshly made completion queue in [`CQS`]; `create_cq` returns
/// it as a trait object whose data pointer is the `EmuCq`.
fn register_cq(cq: &Arc<dyn CompletionQueue>, inner: &Arc<CqInner>) {
    lock(&CQS).insert(cq_key(cq), Arc::downgrade(inner));
}

/// Where a connected queue pair's operations go.
enum Peer {
    /// A queue pair of this process.
    Local(Weak<QpInner>),
    /// A queue pair in another process, over a TCP link.
    Link(SyncSender<SendRequest>),
}

enum QpState {
    Reset,
    Ready(Peer),
    Error(String),
}

struct QpInner {
    qpn: u32,
    device: Arc<DeviceInner>,
    cq: Arc<CqInner>,
    caps: QpCaps,
    state: Mutex<QpState>,
    recvs: Mutex<VecDeque<RecvRequest>>,
    sends_outstanding: AtomicU32,
}

impl QpInner {
    fn complete(&self, wc: WorkCompletion) {
        if !self.cq.push(wc) {
            self.fail("completion queue overflow".into());
        }
    }

    fn complete_send(&self, wr_id: u64, op: SendOp, status: WcStatus) {
        self.sends_outstanding.fetch_sub(1, Ordering::AcqRel);
        let opcode = match op {
            SendOp::Send { .. } => WcOpcode::Send,
            SendOp::WriteWithImm { .. } => WcOpcode::RdmaWrite,
        };
        // As on hardware, the queue pair is in the error state before its
        // error completion can be polled.
        if status != WcStatus::Success {
            self.fail(format!(
                "send work request {wr_id} completed with {status:?}"
            ));
        }
        self.complete(WorkCompletion {
            wr_id,
            status,
            opcode,
            byte_len: 0,
            imm: None,
            qpn: self.qpn,
        });
    }

    /// Moves to the error state and flushes the posted receives.
    fn fail(&self, reason: String) {
        {
            let mut state = lock(&self.state);
            if matches!(*state, QpState::Error(_)) {
                return;
            }
            tracing::debug!("emulated queue pair {} error: {reason}", self.qpn);
            *state = QpState::Error(reason);
        }
        let flushed: Vec<_> = lock(&self.recvs).drain(..).collect();
        for r in flushed {
            let _ = self.cq.push(WorkCompletion {
                wr_id: r.wr_id,
                status: WcStatus::Flushed,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                imm: None,
                qpn: self.qpn,
            });
        }
    }

    /// The responder side of one operation: validates everything before
    /// touching memory, then lands `len` bytes through `fill` and completes
    /// the consumed receive. Returns the status for the requester.
    ///
    /// The state lock is held throughout, so once [`Self::fail`] has returned
    /// no landing is in progress and none will start: the owner of the
    /// memory may then take it back.
    fn land(
        &self,
        op: SendOp,
        len: usize,
        fill: &mut dyn FnMut(*mut u8, usize) -> Result<(), ()>,
    ) -> WcStatus {
        let state = lock(&self.state);
        if !matches!(*state, QpState::Ready(_)) {
            return WcStatus::RetryExceeded;
        }
        let (status, failure) = self.land_ready(op, len, fill);
        drop(state);
        if let Some(reason) = failure {
            self.fail(reason);
        }
        status
    }

    fn land_ready(
        &self,
        op: SendOp,
        len: usize,
        fill: &mut dyn FnMut(*mut u8, usize) -> Result<(), ()>,
    ) -> (WcStatus, Option<String>) {
        let Some(recv) = lock(&self.recvs).pop_front() else {
            return (WcStatus::RnrRetryExceeded, None);
        };
        let (dest, opcode, imm) = match op {
            SendOp::WriteWithImm {
                remote_addr,
                rkey,
                imm,
            } => {
                let region = lock(&self.device.by_rkey).get(&rkey).copied();
                match region {
                    Some(r) if r.access.remote_write && r.contains(remote_addr, len) => {
                        (remote_addr, WcOpcode::RecvRdmaWithImm, Some(imm))
                    }
                    _ => {
                        // Put the receive back: the access never happened.
                        lock(&self.recvs).push_front(recv);
                        return (WcStatus::RemoteAccess, None);
                    }
                }
            }
            SendOp::Send { imm } => {
                let fits = recv.sge.is_some_and(|sge| {
                    sge.len as usize >= len
                        && self
                            .device
                            .local_region(&sge)
                            .is_some_and(|r| r.access.local_write)
                });
                if !fits {
                    let _ = self.cq.push(WorkCompletion {
                        wr_id: recv.wr_id,
                        status: WcStatus::LocalLength,
                        opcode: WcOpcode::Recv,
                        byte_len: len as u32,
                        imm,
                        qpn: self.qpn,
                    });
                    let reason = "incoming SEND longer than the posted receive".to_owned();
                    return (WcStatus::Other(0x10), Some(reason));
                }
                let addr = recv.sge.map_or(0, |s| s.addr);
                (addr, WcOpcode::Recv, imm)
            }
        };
        if len > 0 && fill(dest as *mut u8, len).is_err() {
            lock(&self.recvs).push_front(recv);
            return (WcStatus::RetryExceeded, None);
        }
        let pushed = self.cq.push(WorkCompletion {
            wr_id: recv.wr_id,
            status: WcStatus::Success,
            opcode,
            byte_len: len as u32,
            imm,
            qpn: self.qpn,
        });
        let failure = (!pushed).then(|| "completion queue overflow".to_owned());
        (WcStatus::Success, failure)
    }
}

struct EmuQp {
    inner: Arc<QpInner>,
}

impl Drop for EmuQp {
    fn drop(&mut self) {
        lock(&self.inner.device.qps).remove(&self.inner.qpn);
        self.inner.fail("queue pair destroyed".into());
    }
}

impl QueuePair for EmuQp {
    fn qpn(&self) -> u32 {
        self.inner.qpn
    }

    fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qpn: self.inner.qpn,
            psn: 0,
            lid: 0,
            gid: [0; 16],
            device: format!("{}@{}", self.inner.device.id, self.inner.device.link_addr),
        }
    }

    fn connect(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        let (device_id, addr) = remote
            .device
            .split_once('@')
            .ok_or_else(|| VerbsError::Link {
                device: remote.device.clone(),
                reason: "endpoint names no emulated device (expected id@host:port)".into(),
            })?;
        let local = lock(&FABRIC).get(device_id).and_then(Weak::upgrade);
        let peer = match local {
            Some(device) => {
                let qp = device.qp(remote.qpn).ok_or_else(|| VerbsError::Link {
                    device: remote.device.clone(),
                    reason: format!("no queue pair {}", remote.qpn),
                })?;
                Peer::Local(Arc::downgrade(&qp))
            }
            None => Peer::Link(open_link(&self.inner, device_id, addr, remote)?),
        };
        let mut state = lock(&self.inner.state);
        match *state {
            QpState::Reset => {
                *state = QpState::Ready(peer);
                Ok(())
            }
            _ => Err(VerbsError::Call {
                call: "ibv_modify_qp",
                reason: format!("queue pair {} is not in RESET", self.inner.qpn),
            }),
        }
    }

    fn post_send(&self, req: SendRequest) -> Result<(), VerbsError> {
        let qp = &self.inner;
        let sges = req.sges.as_slice();
        if sges.len() > qp.caps.send_sge_max as usize {
            return Err(VerbsError::TooManySges {
                count: sges.len(),
                max: qp.caps.send_sge_max,
            });
        }
        if qp.sends_outstanding.fetch_add(1, Ordering::AcqRel) >= qp.caps.send_depth {
            qp.sends_outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(VerbsError::QueueFull {
                qpn: qp.qpn,
                queue: "send",
                depth: qp.caps.send_depth,
            });
        }
        // The state is read under its lock, but delivery happens outside it:
        // a local peer may be completing into a queue this thread waits on.
        let target = match &*lock(&qp.state) {
            QpState::Ready(Peer::Local(w)) => Ok(Some(w.clone())),
            QpState::Ready(Peer::Link(tx)) => Err(tx.clone()),
            QpState::Reset => {
                qp.sends_outstanding.fetch_sub(1, Ordering::AcqRel);
                return Err(VerbsError::NotConnected { qpn: qp.qpn });
            }
            QpState::Error(reason) => {
                qp.sends_outstanding.fetch_sub(1, Ordering::AcqRel);
                return Err(VerbsError::QpError {
                    qpn: qp.qpn,
                    reason: reason.clone(),
                });
            }
        };
        if sges.iter().any(|s| qp.device.local_region(s).is_none()) {
            qp.complete_send(req.wr_id, req.op, WcStatus::LocalProtection);
            return Ok(());
        }
        match target {
            Ok(weak) => {
                let status = match weak.and_then(|w| w.upgrade()) {
                    Some(peer) => deliver_local(&peer, &req),
                    None => WcStatus::RetryExceeded,
                };
                qp.complete_send(req.wr_id, req.op, status);
            }
            Err(tx) => {
                // The writer thread completes it; the channel holds at most
                // send_depth requests, so this never blocks for long.
                if tx.send(req).is_err() {
                    qp.complete_send(req.wr_id, req.op, WcStatus::RetryExceeded);
                }
            }
        }
        Ok(())
    }

    fn post_recv(&self, req: RecvRequest) -> Result<(), VerbsError> {
        let qp = &self.inner;
        if let QpState::Error(reason) = &*lock(&qp.state) {
            return Err(VerbsError::QpError {
                qpn: qp.qpn,
                reason: reason.clone(),
            });
        }
        if let Some(sge) = &req.sge
            && qp.device.local_region(sge).is_none()
        {
            return Err(VerbsError::Call {
                call: "ibv_post_recv",
                reason: format!("receive buffer outside the region of lkey {:#x}", sge.lkey),
            });
        }
        let mut recvs = lock(&qp.recvs);
        if recvs.len() >= qp.caps.recv_depth as usize {
            return Err(VerbsError::QueueFull {
                qpn: qp.qpn,
                queue: "receive",
                depth: qp.caps.recv_depth,
            });
        }
        recvs.push_back(req);
        Ok(())
    }
}

/// In one process: copy the gather list straight into the peer's memory.
fn deliver_local(peer: &QpInner, req: &SendRequest) -> WcStatus {
    let sges = req.sges.as_slice();
    let len = req.sges.total_len();
    peer.land(req.op, len, &mut |dest, total| {
        let mut at = 0usize;
        for sge in sges {
            // SAFETY: `sge` lies inside a region registered on the sender's
            // device (checked in post_send), whose owner keeps it alive and
            // untouched until this request completes; `dest..dest+total` lies
            // inside a region registered on the peer's device with the
            // remote-write right (checked in `land`), lent to the peer by the
            // same contract. `at + sge.len <= total` because `total` is the
            // sum of the entries. Distinct registered buffers do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sge.addr as *const u8,
                    dest.add(at),
                    sge.len as usize,
                );
            }
            at += sge.len as usize;
        }
        debug_assert_eq!(at, total);
        Ok(())
    })
}

/// Connects a queue pair in this process to one in another: a TCP link and
/// a writer thread that reads gather lists and sends frames, then waits for
/// each acknowledgement in order.
fn open_link(
    qp: &Arc<QpInner>,
    device_id: &str,
    addr: &str,
    remote: &QpEndpoint,
) -> Result<SyncSender<SendRequest>, VerbsError> {
    let link_err = |reason: String| VerbsError::Link {
        device: remote.device.clone(),
        reason,
    };
    let stream = TcpStream::connect(addr).map_err(|e| link_err(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let mut hello = Vec::with_capacity(6 + device_id.len());
    hello.extend_from_slice(&LINK_MAGIC.to_be_bytes());
    hello.extend_from_slice(&(device_id.len() as u16).to_be_bytes());
    hello.extend_from_slice(device_id.as_bytes());
    (&stream)
        .write_all(&hello)
        .map_err(|e| link_err(e.to_string()))?;
    let (tx, rx) = sync_channel(qp.caps.send_depth.max(1) as usize);
    let weak = Arc::downgrade(qp);
    let target_qpn = remote.qpn;
    std::thread::Builder::new()
        .name("emu-verbs-link".into())
        .spawn(move || link_writer(stream, rx, weak, target_qpn))
        .map_err(|e| link_err(e.to_string()))?;
    Ok(tx)
}

/// The link's send engine: writes each request's frame as it is posted
/// (flushing when the queue runs dry), while [`link_acks`] completes them in
/// order as the peer acknowledges. Many writes are in flight, as on a NIC.
fn link_writer(stream: TcpStream, rx: Receiver<SendRequest>, qp: Weak<QpInner>, target_qpn: u32) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let pending: Arc<Mutex<VecDeque<SendRequest>>> = Arc::default();
    let acks = {
        let pending = Arc::clone(&pending);
        let qp = qp.clone();
        std::thread::Builder::new()
            .name("emu-verbs-acks".into())
            .spawn(move || link_acks(read_half, pending, qp))
    };
    if acks.is_err() {
        return;
    }
    let mut writer = BufWriter::with_capacity(256 * 1024, stream);
    let mut head = [0u8; FRAME_HEAD_LEN];
    let mut broken = false;
    let mut next = rx.recv().map_err(|_| ());
    while let Ok(req) = next {
        let Some(qp) = qp.upgrade() else { return };
        let written = {
            // Held while the gather list is read: once the queue pair has
            // failed (or been destroyed), its memory is no longer touched.
            let state = lock(&qp.state);
            if !matches!(*state, QpState::Ready(_)) {
                Err(WcStatus::Flushed)
            } else if broken {
                Err(WcStatus::RetryExceeded)
            } else {
                // Queued before it is written: the ack may come at once.
                lock(&pending).push_back(req);
                write_frame(&mut writer, &mut head, target_qpn, &req).map_err(|e| {
                    tracing::debug!("emulated verbs link to qp {target_qpn} broke: {e}");
                    broken = true;
                    WcStatus::RetryExceeded
                })
            }
        };
        if let Err(status) = written {
            if status == WcStatus::RetryExceeded {
                // The ack reader sees the broken stream and fails the rest.
                lock(&pending).retain(|p| p.wr_id != req.wr_id);
            }
            qp.complete_send(req.wr_id, req.op, status);
        }
        next = match rx.try_recv() {
            Ok(req) => Ok(req),
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if !broken && writer.flush().is_err() {
                    broken = true;
                }
                rx.recv().map_err(|_| ())
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(()),
        };
    }
}

/// Completes the link's sends in order as the peer acknowledges them; when
/// the link breaks, fails whatever is still waiting.
fn link_acks(stream: TcpStream, pending: Arc<Mutex<VecDeque<SendRequest>>>, qp: Weak<QpInner>) {
    let mut reader = BufReader::new(stream);
    let mut status = [0u8; 1];
    loop {
        let read = reader.read_exact(&mut status);
        let Some(qp) = qp.upgrade() else { return };
        if read.is_err() {
            // Under the state lock: the writer may be reading the gather
            // list of the last request queued; wait for it to finish.
            let rest: Vec<_> = {
                let _state = lock(&qp.state);
                lock(&pending).drain(..).collect()
            };
            for req in rest {
                qp.complete_send(req.wr_id, req.op, WcStatus::RetryExceeded);
            }
            return;
        }
        let Some(req) = lock(&pending).pop_front() else {
            qp.fail("emulated verbs link acknowledged an operation never sent".into());
            return;
        };
        qp.complete_send(req.wr_id, req.op, status_from_u8(status[0]));
    }
}

fn write_frame(
    writer: &mut BufWriter<TcpStream>,
    head: &mut [u8; FRAME_HEAD_LEN],
    target_qpn: u32,
    req: &SendRequest,
) -> std::io::Result<()> {
    let (op, imm, remote_addr, rkey) = match req.op {
        SendOp::Send { imm } => (OP_SEND, imm, 0, 0),
        SendOp::WriteWithImm {
            remote_addr,
            rkey,
            imm,
        } => (OP_WRITE_IMM, Some(imm), remote_addr, rkey),
    };
    let len = req.sges.total_len() as u32;
    head[0] = op;
    head[1..5].copy_from_slice(&target_qpn.to_be_bytes());
    head[5] = imm.is_some() as u8;
    head[6..10].copy_from_slice(&imm.unwrap_or(0).to_be_bytes());
    head[10..18].copy_from_slice(&remote_addr.to_be_bytes());
    head[18..22].copy_from_slice(&rkey.to_be_bytes());
    head[22..26].copy_from_slice(&len.to_be_bytes());
    writer.write_all(head)?;
    for sge in req.sges.as_slice() {
        // SAFETY: the entry lies inside a region registered on this device
        // (checked in post_send) whose owner keeps it alive and unwritten
        // until this request's completion, which comes from the peer's
        // acknowledgement, after these bytes have been written (or from the
        // broken link, after this write has returned).
        let bytes = unsafe { std::slice::from_raw_parts(sge.addr as *const u8, sge.len as usize) };
        writer.write_all(bytes)?;
    }
    Ok(())
}

fn status_to_u8(s: WcStatus) -> u8 {
    match s {
        WcStatus::Success => 0,
        WcStatus::LocalProtection => 1,
        WcStatus::RemoteAccess => 2,
        WcStatus::RnrRetryExceeded => 3,
        WcStatus::Flushed => 4,
        WcStatus::RetryExceeded => 5,
        WcStatus::LocalLength => 6,
        WcStatus::Other(_) => 255,
    }
}

fn status_from_u8(b: u8) -> WcStatus {
    match b {
        0 => WcStatus::Success,
        1 => WcStatus::LocalProtection,
        2 => WcStatus::RemoteAccess,
        3 => WcStatus::RnrRetryExceeded,
        4 => WcStatus::Flushed,
        5 => WcStatus::RetryExceeded,
        6 => WcStatus::LocalLength,
        other => WcStatus::Other(other as u32),
    }
}

fn accept_loop(listener: TcpListener, device: Weak<DeviceInner>) {
    for stream in listener.incoming() {
        let Some(dev) = device.upgrade() else { return };
        let Ok(stream) = stream else { continue };
        let weak = Arc::downgrade(&dev);
        drop(dev);
        let _ = std::thread::Builder::new()
            .name("emu-verbs-peer".into())
            .spawn(move || {
                if let Err(e) = serve_link(stream, weak) {
                    tracing::debug!("emulated verbs link closed: {e}");
                }
            });
    }
}

/// The responder side of a link: validate each frame against the target
/// queue pair and its regions, land it, acknowledge it.
fn serve_link(stream: TcpStream, device: Weak<DeviceInner>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::with_capacity(256 * 1024, stream.try_clone()?);
    let mut writer = stream;
    let mut hello = [0u8; 6];
    reader.read_exact(&mut hello)?;
    let magic = u32::from_be_bytes([hello[0], hello[1], hello[2], hello[3]]);
    let id_len = u16::from_be_bytes([hello[4], hello[5]]) as usize;
    if magic != LINK_MAGIC || id_len > DEVICE_ID_MAX {
        return Err(std::io::Error::other("not an emulated verbs link"));
    }
    let mut id = vec![0u8; id_len];
    reader.read_exact(&mut id)?;
    let Some(dev) = device.upgrade() else {
        return Ok(());
    };
    if id != dev.id.as_bytes() {
        return Err(std::io::Error::other(format!(
            "link for device {} reached {}",
            String::from_utf8_lossy(&id),
            dev.id
        )));
    }
    drop(dev);
    let mut head = [0u8; FRAME_HEAD_LEN];
    loop {
        if let Err(e) = reader.read_exact(&mut head) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let qpn = u32::from_be_bytes(head[1..5].try_into().unwrap_or_default());
        let imm = u32::from_be_bytes(head[6..10].try_into().unwrap_or_default());
        let remote_addr = u64::from_be_bytes(head[10..18].try_into().unwrap_or_default());
        let rkey = u32::from_be_bytes(head[18..22].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[22..26].try_into().unwrap_or_default());
        if len > MESSAGE_MAX {
            return Err(std::io::Error::other(format!(
                "operation of {len} bytes exceeds the {MESSAGE_MAX}-byte message limit"
            )));
        }
        let op = match head[0] {
            OP_SEND => SendOp::Send {
                imm: (head[5] != 0).then_some(imm),
            },
            OP_WRITE_IMM => SendOp::WriteWithImm {
                remote_addr,
                rkey,
                imm,
            },
            other => {
                return Err(std::io::Error::other(format!("unknown link op {other}")));
            }
        };
        let target = device.upgrade().and_then(|d| d.qp(qpn));
        let mut landed = false;
        let status = match &target {
            Some(qp) => qp.land(op, len as usize, &mut |dest, total| {
                // SAFETY: `land` checked that `dest..dest+total` lies inside a
                // region registered on this device for remote writes (or the
                // posted receive's buffer), lent to the peer until it is
                // completed; no Rust reference to it exists meanwhile.
                let buf = unsafe { std::slice::from_raw_parts_mut(dest, total) };
                landed = true;
                reader.read_exact(buf).map_err(|_| ())
            }),
            None => WcStatus::RetryExceeded,
        };
        if !landed && len > 0 {
            // The frame was refused: skip its bytes to stay in step.
            std::io::copy(&mut (&mut reader).take(len as u64), &mut std::io::sink())?;
        }
        writer.write_all(&[status_to_u8(status)])?;
    }
}

#[cfg(test)]
mod tests;
