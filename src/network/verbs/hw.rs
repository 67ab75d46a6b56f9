//! Hardware verbs: the [`VerbsDevice`] interface over libibverbs, through the
//! `strata-verbs` FFI crate (which holds every `unsafe` FFI call; the only
//! `unsafe` here is forwarding [`VerbsDevice::register`]'s contract).
//!
//! Behind the cargo feature `rdma`: that build links libibverbs, so the
//! default binary stays free of it and starts on machines without it.
//!
//! # How the interface maps onto verbs
//!
//! - One device = one port and one protection domain ([`probe`] opens the
//!   first active port; [`probe_with`] takes a port and GID index).
//! - [`CompletionQueue::wait`] uses the CQ's completion channel. Verbs cannot
//!   peek at a CQ, so `wait` moves what it finds into a small stash that the
//!   next `poll` hands out first; the stash never holds more than the CQ's
//!   depth.
//! - Queue pairs are created in INIT (receives may be posted before
//!   `connect`); `connect` takes them through RTR to RTS.
//! - A queue pair must be created with a completion queue from the same
//!   device. The interface passes `Arc<dyn CompletionQueue>`, so the device
//!   keeps a table of the queues it made and finds the hardware CQ by the
//!   Arc's address (no downcasting, no `unsafe`).
//!
//! # Limits
//!
//! Queue depths are the caller's [`QpCaps`] (the provider may round them
//! up); a full queue is [`VerbsError::QueueFull`]. At most
//! [`super::SGE_MAX`] gather entries per send.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use strata_verbs as ffi;

use super::{
    Access, CompletionQueue, DeviceKind, MemoryRegion, QpCaps, QpEndpoint, QueuePair, RecvRequest,
    SGE_MAX, SendOp, SendRequest, VerbsDevice, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};

// The interface's gather lists must fit the FFI crate's on-stack list.
const _: () = assert!(SGE_MAX <= ffi::SGE_PER_SEND_MAX);

/// Which device, port and GID to open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HwOptions {
    /// `mlx5_0`; the first device when `None`.
    pub device_name: Option<String>,
    /// The first active port when `None`.
    pub port: Option<u8>,
    /// Chosen from the GID table when `None` (see `strata_verbs::choose_gid_index`).
    pub gid_index: Option<u8>,
}

/// Opens the named device (or the first one) on its first active port.
/// `VerbsError::NoDevice` names why when there is none; never panics.
pub fn probe(device_name: Option<&str>) -> Result<Arc<dyn VerbsDevice>, VerbsError> {
    probe_with(&HwOptions {
        device_name: device_name.map(str::to_string),
        ..HwOptions::default()
    })
}

/// [`probe`] with a port and GID index.
pub fn probe_with(options: &HwOptions) -> Result<Arc<dyn VerbsDevice>, VerbsError> {
    let device = ffi::Device::open(&ffi::OpenOptions {
        device_name: options.device_name.clone(),
        port: options.port,
        gid_index: options.gid_index,
    })
    .map_err(map_error)?;
    Ok(Arc::new(HwDevice {
        device,
        cqs: Mutex::new(Vec::new()),
    }))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An open RDMA device port with its protection domain.
pub struct HwDevice {
    device: ffi::Device,
    /// The completion queues this device made, by the address of their Arc.
    cqs: Mutex<Vec<(usize, Weak<HwCq>)>>,
}

/// The address an `Arc<dyn CompletionQueue>` and the `Arc<HwCq>` it was made
/// from share.
fn arc_address<T: ?Sized>(arc: &Arc<T>) -> usize {
    Arc::as_ptr(arc).cast::<()>() as usize
}

impl HwDevice {
    fn hardware_cq(&self, cq: &Arc<dyn CompletionQueue>) -> Option<Arc<ffi::CompletionQueue>> {
        let address = arc_address(cq);
        lock(&self.cqs)
            .iter()
            .filter(|(a, _)| *a == address)
            .find_map(|(_, weak)| weak.upgrade())
            .filter(|hw| arc_address(hw) == address)
            .map(|hw| Arc::clone(&hw.cq))
    }
}

impl VerbsDevice for HwDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Hardware
    }

    fn describe(&self) -> String {
        self.device.describe()
    }

    #[allow(unsafe_code)]
    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, VerbsError> {
        // SAFETY: this fn's contract (memory valid until the region drops, no
        // Rust references while the NIC may write) is the FFI fn's contract,
        // and our caller upholds it.
        let region = unsafe { self.device.register(addr, len, map_access(access)) };
        Ok(Box::new(HwRegion(region.map_err(map_error)?)))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CompletionQueue>, VerbsError> {
        let cq = self.device.create_cq(depth).map_err(map_error)?;
        let hw = Arc::new(HwCq {
            stash: Mutex::new(VecDeque::with_capacity(depth as usize)),
            scratch: Mutex::new(Vec::with_capacity(depth as usize)),
            cq,
        });
        let mut cqs = lock(&self.cqs);
        cqs.retain(|(_, weak)| weak.strong_count() > 0);
        cqs.push((arc_address(&hw), Arc::downgrade(&hw)));
        Ok(hw)
    }

    fn create_qp(
        &self,
        cq: &Arc<dyn CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QueuePair>, VerbsError> {
        let hw_cq = self.hardware_cq(cq).ok_or_else(|| VerbsError::Call {
            call: "create_qp",
            reason: format!(
                "the completion queue was not created by {}",
                self.device.name()
            ),
        })?;
        let qp = self
            .device
            .create_rc_qp(&hw_cq, map_caps(caps))
            .map_err(map_error)?;
        Ok(Arc::new(HwQp { qp }))
    }
}

struct HwRegion(ffi::MemoryRegion);

impl MemoryRegion for HwRegion {
    fn addr(&self) -> u64 {
        self.0.addr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn lkey(&self) -> u32 {
        self.0.lkey()
    }
    fn rkey(&self) -> u32 {
        self.0.rkey()
    }
}

struct HwCq {
    cq: Arc<ffi::CompletionQueue>,
    /// Completions taken off the CQ by `wait`, handed out first by `poll`.
    stash: Mutex<VecDeque<WorkCompletion>>,
    /// Reused buffer for `ibv_poll_cq` results (no allocation per poll).
    scratch: Mutex<Vec<ffi::Completion>>,
}

impl HwCq {
    /// Polls the hardware CQ for up to `max` completions, mapped, into `sink`.
    fn poll_hardware(&self, max: usize, sink: &mut dyn FnMut(WorkCompletion)) -> usize {
        let mut scratch = lock(&self.scratch);
        scratch.clear();
        let polled = match self.cq.poll(&mut scratch, max) {
            Ok(n) => n,
            Err(e) => {
                // A failing ibv_poll_cq means the CQ itself broke (overrun);
                // its queue pairs are in the error state and report through
                // their own errors.
                tracing::error!(error = %e, "polling an RDMA completion queue failed");
                0
            }
        };
        scratch.iter().map(map_completion).for_each(sink);
        polled
    }

    fn fill_stash(&self) -> bool {
        let mut stash = lock(&self.stash);
        let room = (self.cq.depth() as usize)
            .saturating_sub(stash.len())
            .max(1);
        self.poll_hardware(room, &mut |wc| stash.push_back(wc)) > 0
    }
}

impl CompletionQueue for HwCq {
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> usize {
        // The stash stays locked while the hardware is polled, so a `wait` on
        // another thread cannot slip later completions in ahead of these.
        let mut stash = lock(&self.stash);
        let from_stash = stash.len().min(max);
        out.extend(stash.drain(..from_stash));
        if from_stash == max {
            return from_stash;
        }
        from_stash + self.poll_hardware(max - from_stash, &mut |wc| out.push(wc))
    }

    fn wait(&self, timeout: Duration) {
        if !lock(&self.stash).is_empty() || self.fill_stash() {
            return;
        }
        if let Err(e) = self.cq.arm() {
            tracing::error!(error = %e, "arming an RDMA completion queue failed");
            return;
        }
        // A completion that landed before arming raised no event.
        if self.fill_stash() {
            return;
        }
        if let Err(e) = self.cq.wait_event(timeout) {
            tracing::error!(error = %e, "waiting on an RDMA completion channel failed");
        }
    }
}

struct HwQp {
    qp: ffi::QueuePair,
}

impl QueuePair for HwQp {
    fn qpn(&self) -> u32 {
        self.qp.qpn()
    }

    fn endpoint(&self) -> QpEndpoint {
        endpoint_of(&self.qp.local_endpoint())
    }

    fn connect(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        let remote = remote_of(remote).map_err(|device| VerbsError::Call {
            call: "connect",
            reason: format!(
                "queue pair {} is on hardware but the peer's endpoint is emulated verbs device {device}",
                self.qp.qpn()
            ),
        })?;
        self.qp.connect(&remote).map_err(map_error)
    }

    fn post_send(&self, req: SendRequest) -> Result<(), VerbsError> {
        let sges = map_sges(&req);
        let wr = ffi::SendWr {
            wr_id: req.wr_id,
            op: map_send_op(req.op),
            sges: &sges[..req.sges.as_slice().len()],
        };
        self.qp.post_send(&wr).map_err(map_error)
    }

    fn post_recv(&self, req: RecvRequest) -> Result<(), VerbsError> {
        self.qp
            .post_recv(req.wr_id, req.sge.map(map_sge))
            .map_err(map_error)
    }
}

// ---- pure mappings between the interface and the FFI crate ----

fn map_error(e: ffi::Error) -> VerbsError {
    if e.is_no_device() {
        return VerbsError::NoDevice {
            reason: e.to_string(),
        };
    }
    match e {
        ffi::Error::Call { call, errno } => VerbsError::Call {
            call,
            reason: std::io::Error::from_raw_os_error(errno).to_string(),
        },
        ffi::Error::QueueFull { qpn, queue, depth } => VerbsError::QueueFull { qpn, queue, depth },
        ffi::Error::TooManySges { count, max } => VerbsError::TooManySges { count, max },
        ffi::Error::NotConnected { qpn } => VerbsError::NotConnected { qpn },
        ffi::Error::Limit { what, .. } => {
            let call = if what.starts_with("completion") {
                "ibv_create_cq"
            } else {
                "ibv_create_qp"
            };
            VerbsError::Call {
                call,
                reason: e.to_string(),
            }
        }
        _ => VerbsError::NoDevice {
            reason: e.to_string(),
        },
    }
}

fn map_access(access: Access) -> ffi::AccessFlags {
    ffi::AccessFlags {
        local_write: access.local_write,
        remote_write: access.remote_write,
        remote_read: access.remote_read,
    }
}

fn map_caps(caps: QpCaps) -> ffi::QpCaps {
    ffi::QpCaps {
        send_depth: caps.send_depth,
        recv_depth: caps.recv_depth,
        send_sge_max: caps.send_sge_max,
    }
}

fn map_sge(sge: super::Sge) -> ffi::Sge {
    ffi::Sge {
        addr: sge.addr,
        len: sge.len,
        lkey: sge.lkey,
    }
}

fn map_sges(req: &SendRequest) -> [ffi::Sge; SGE_MAX] {
    let empty = ffi::Sge {
        addr: 0,
        len: 0,
        lkey: 0,
    };
    let mut sges = [empty; SGE_MAX];
    for (slot, sge) in sges.iter_mut().zip(req.sges.as_slice()) {
        *slot = map_sge(*sge);
    }
    sges
}

fn map_send_op(op: SendOp) -> ffi::SendOp {
    match op {
        SendOp::Send { imm } => ffi::SendOp::Send { imm },
        SendOp::WriteWithImm {
            remote_addr,
            rkey,
            imm,
        } => ffi::SendOp::WriteWithImm {
            remote_addr,
            rkey,
            imm,
        },
    }
}

fn map_status(status: ffi::CompletionStatus) -> WcStatus {
    match status {
        ffi::CompletionStatus::Success => WcStatus::Success,
        ffi::CompletionStatus::LocalLength => WcStatus::LocalLength,
        ffi::CompletionStatus::LocalProtection => WcStatus::LocalProtection,
        ffi::CompletionStatus::Flushed => WcStatus::Flushed,
        ffi::CompletionStatus::RemoteAccess => WcStatus::RemoteAccess,
        ffi::CompletionStatus::RetryExceeded => WcStatus::RetryExceeded,
        ffi::CompletionStatus::RnrRetryExceeded => WcStatus::RnrRetryExceeded,
        ffi::CompletionStatus::Other(code) => WcStatus::Other(code),
    }
}

/// The interface has four opcodes. Anything else (which this crate never
/// posts, or the undefined opcode of an error completion) is reported by
/// side: receive-side codes as `Recv`, send-side as `Send`.
fn map_opcode(opcode: ffi::CompletionOpcode) -> WcOpcode {
    match opcode {
        ffi::CompletionOpcode::Send => WcOpcode::Send,
        ffi::CompletionOpcode::RdmaWrite => WcOpcode::RdmaWrite,
        ffi::CompletionOpcode::Recv => WcOpcode::Recv,
        ffi::CompletionOpcode::RecvRdmaWithImm => WcOpcode::RecvRdmaWithImm,
        other if other.is_receive() => WcOpcode::Recv,
        _ => WcOpcode::Send,
    }
}

fn map_completion(wc: &ffi::Completion) -> WorkCompletion {
    WorkCompletion {
        wr_id: wc.wr_id,
        status: map_status(wc.status),
        opcode: map_opcode(wc.opcode),
        byte_len: wc.byte_len,
        imm: wc.imm,
        qpn: wc.qp_num,
    }
}

fn endpoint_of(ep: &ffi::RemoteEndpoint) -> QpEndpoint {
    QpEndpoint {
        qpn: ep.qpn,
        psn: ep.psn,
        lid: ep.lid,
        gid: ep.gid,
        device: String::new(),
    }
}

/// The hardware view of a peer's endpoint; `Err(device)` when the peer is an
/// emulated device (its endpoint names one).
fn remote_of(ep: &QpEndpoint) -> Result<ffi::RemoteEndpoint, String> {
    if !ep.device.is_empty() {
        return Err(ep.device.clone());
    }
    Ok(ffi::RemoteEndpoint {
        qpn: ep.qpn,
        psn: ep.psn,
        lid: ep.lid,
        gid: ep.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::verbs::Sge;

    #[test]
    fn completion_statuses_map_one_to_one() {
        use ffi::CompletionStatus as F;
        let pairs = [
            (F::Success, WcStatus::Success),
            (F::LocalLength, WcStatus::LocalLength),
            (F::LocalProtection, WcStatus::LocalProtection),
            (F::Flushed, WcStatus::Flushed),
            (F::RemoteAccess, WcStatus::RemoteAccess),
            (F::RetryExceeded, WcStatus::RetryExceeded),
            (F::RnrRetryExceeded, WcStatus::RnrRetryExceeded),
            (F::Other(19), WcStatus::Other(19)),
        ];
        for (from, to) in pairs {
            assert_eq!(map_status(from), to, "{from:?}");
        }
    }

    #[test]
    fn unknown_opcodes_map_by_side() {
        use ffi::CompletionOpcode as F;
        assert_eq!(map_opcode(F::Send), WcOpcode::Send);
        assert_eq!(map_opcode(F::RdmaWrite), WcOpcode::RdmaWrite);
        assert_eq!(map_opcode(F::Recv), WcOpcode::Recv);
        assert_eq!(map_opcode(F::RecvRdmaWithImm), WcOpcode::RecvRdmaWithImm);
        assert_eq!(map_opcode(F::Other(130)), WcOpcode::Recv);
        assert_eq!(map_opcode(F::Other(2)), WcOpcode::Send);
    }

    #[test]
    fn a_raw_write_with_imm_completion_becomes_the_interface_completion() {
        let raw = ffi::RawCompletion {
            wr_id: 99,
            status: 0,
            opcode: 129,
            byte_len: 32768,
            imm_data: 0xDEAD_BEEFu32.to_be(),
            qp_num: 0x1234,
            wc_flags: 2,
            ..ffi::RawCompletion::default()
        };
        let wc = map_completion(&ffi::Completion::from_raw(raw));
        assert_eq!(
            wc,
            WorkCompletion {
                wr_id: 99,
                status: WcStatus::Success,
                opcode: WcOpcode::RecvRdmaWithImm,
                byte_len: 32768,
                imm: Some(0xDEAD_BEEF),
                qpn: 0x1234,
            }
        );
        let flushed = map_completion(&ffi::Completion::from_raw(ffi::RawCompletion {
            status: 5,
            opcode: 0xFF,
            wc_flags: 0,
            ..raw
        }));
        assert_eq!(flushed.status, WcStatus::Flushed);
        assert_eq!(flushed.opcode, WcOpcode::Recv);
        assert_eq!(flushed.imm, None);
    }

    #[test]
    fn access_maps_field_by_field() {
        let f = map_access(Access::REMOTE_WRITE);
        assert!(f.local_write && f.remote_write && !f.remote_read);
        assert_eq!(f.to_raw(), 0b011);
        let f = map_access(Access::LOCAL);
        assert!(f.local_write && !f.remote_write && !f.remote_read);
        assert_eq!(f.to_raw(), 0b001);
    }

    #[test]
    fn endpoints_round_trip_and_emulated_peers_are_refused() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 0, 0, 7]);
        let ffi_ep = ffi::RemoteEndpoint {
            qpn: 0x11,
            psn: 0xABCDEF,
            lid: 0,
            gid,
        };
        let ep = endpoint_of(&ffi_ep);
        assert!(ep.device.is_empty());
        assert_eq!(remote_of(&ep), Ok(ffi_ep));
        assert_eq!(ffi::format_gid(&ep.gid), "::ffff:10.0.0.7");
        let emulated = QpEndpoint {
            device: "127.0.0.1:4000#1".into(),
            ..ep
        };
        assert_eq!(remote_of(&emulated), Err("127.0.0.1:4000#1".to_string()));
    }

    #[test]
    fn sends_map_with_their_gather_list() {
        let a = Sge {
            addr: 0x1000,
            len: 64,
            lkey: 7,
        };
        let b = Sge {
            addr: 0x2000,
            len: 4096,
            lkey: 8,
        };
        let req = SendRequest {
            wr_id: 5,
            op: SendOp::WriteWithImm {
                remote_addr: 0x9000,
                rkey: 3,
                imm: 42,
            },
            sges: super::super::SgeList::two(a, b),
        };
        let sges = map_sges(&req);
        assert_eq!((sges[0].addr, sges[0].len, sges[0].lkey), (0x1000, 64, 7));
        assert_eq!((sges[1].addr, sges[1].len, sges[1].lkey), (0x2000, 4096, 8));
        assert_eq!(
            map_send_op(req.op),
            ffi::SendOp::WriteWithImm {
                remote_addr: 0x9000,
                rkey: 3,
                imm: 42
            }
        );
    }

    /// The whole hardware path through the interface, on a real device:
    /// two queue pairs on one port connected to each other, a WRITE WITH
    /// IMMEDIATE and a SEND, completions through `wait` and `poll`. Without a
    /// device (CI) it checks that the probe says so and stops.
    #[test]
    fn loopback_write_with_imm_and_send_on_a_real_device_when_present() {
        let device = match probe(None) {
            Ok(device) => device,
            Err(VerbsError::NoDevice { reason }) => {
                eprintln!("skipped, no RDMA device: {reason}");
                return;
            }
            Err(other) => panic!("probe failed on a machine with a device: {other}"),
        };
        eprintln!("loopback on {}", device.describe());
        let cq = device.create_cq(64).expect("create_cq");
        let caps = QpCaps {
            send_depth: 16,
            recv_depth: 16,
            send_sge_max: 2,
        };
        let a = device.create_qp(&cq, caps).expect("create_qp a");
        let b = device.create_qp(&cq, caps).expect("create_qp b");
        let mut source: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut target = vec![0u8; 8192];
        // SAFETY: both vectors outlive their regions (dropped below before
        // the vectors are read) and are not touched while registered.
        let source_mr =
            unsafe { device.register(source.as_mut_ptr(), source.len(), Access::LOCAL) }
                .expect("register source");
        // SAFETY: as above.
        let target_mr =
            unsafe { device.register(target.as_mut_ptr(), target.len(), Access::REMOTE_WRITE) }
                .expect("register target");
        // Queue pairs start in INIT: receives go in before connecting.
        b.post_recv(RecvRequest {
            wr_id: 100,
            sge: None,
        })
        .expect("post_recv for the write");
        b.post_recv(RecvRequest {
            wr_id: 101,
            sge: Some(Sge {
                addr: target_mr.addr() + 4096,
                len: 4096,
                lkey: target_mr.lkey(),
            }),
        })
        .expect("post_recv for the send");
        a.connect(&b.endpoint()).expect("connect a");
        b.connect(&a.endpoint()).expect("connect b");
        let half = |offset: u64| Sge {
            addr: source_mr.addr() + offset,
            len: 4096,
            lkey: source_mr.lkey(),
        };
        a.post_send(SendRequest {
            wr_id: 1,
            op: SendOp::WriteWithImm {
                remote_addr: target_mr.addr(),
                rkey: target_mr.rkey(),
                imm: 0x00C0_FFEE,
            },
            sges: super::super::SgeList::one(half(0)),
        })
        .expect("post WRITE WITH IMM");
        a.post_send(SendRequest {
            wr_id: 2,
            op: SendOp::Send { imm: None },
            sges: super::super::SgeList::one(half(4096)),
        })
        .expect("post SEND");

        let mut completions = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while completions.len() < 4 && std::time::Instant::now() < deadline {
            cq.wait(Duration::from_millis(100));
            cq.poll(&mut completions, 16);
        }
        let by_id = |id: u64| {
            completions
                .iter()
                .find(|wc| wc.wr_id == id)
                .copied()
                .unwrap_or_else(|| panic!("no completion for wr {id}: {completions:?}"))
        };
        for id in [1, 2, 100, 101] {
            assert_eq!(by_id(id).status, WcStatus::Success, "{:?}", by_id(id));
        }
        assert_eq!(by_id(1).opcode, WcOpcode::RdmaWrite);
        assert_eq!(by_id(2).opcode, WcOpcode::Send);
        assert_eq!(by_id(100).opcode, WcOpcode::RecvRdmaWithImm);
        assert_eq!(by_id(100).imm, Some(0x00C0_FFEE));
        assert_eq!(by_id(100).qpn, b.qpn());
        assert_eq!(
            (by_id(101).opcode, by_id(101).byte_len),
            (WcOpcode::Recv, 4096)
        );
        drop((a, b, source_mr, target_mr, cq));
        assert_eq!(target, source);
    }

    #[test]
    fn ffi_errors_map_to_interface_errors() {
        let no_dev = map_error(ffi::Error::NoDevices {
            errno: Some(libc::ENOSYS),
        });
        match no_dev {
            VerbsError::NoDevice { reason } => {
                assert!(reason.contains("no RDMA devices found"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            map_error(ffi::Error::Call {
                call: "ibv_reg_mr",
                errno: libc::EFAULT
            }),
            VerbsError::Call {
                call: "ibv_reg_mr",
                reason: std::io::Error::from_raw_os_error(libc::EFAULT).to_string(),
            }
        );
        assert_eq!(
            map_error(ffi::Error::Limit {
                what: "send queue depth",
                asked: 70000,
                max: 32768
            }),
            VerbsError::Call {
                call: "ibv_create_qp",
                reason: "send queue depth of 70000 exceeds the device's maximum of 32768".into(),
            }
        );
        assert_eq!(
            map_error(ffi::Error::QueueFull {
                qpn: 3,
                queue: "send",
                depth: 64
            }),
            VerbsError::QueueFull {
                qpn: 3,
                queue: "send",
                depth: 64
            }
        );
    }
}
