//! Reliable-connected queue pairs: creation (RESET → INIT), connection
//! (INIT → RTR → RTS) and posting.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rdma_sys::{
    ibv_access_flags, ibv_create_qp, ibv_destroy_qp, ibv_gid, ibv_modify_qp, ibv_post_recv,
    ibv_post_send, ibv_qp, ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_cap, ibv_qp_init_attr,
    ibv_qp_state, ibv_qp_type, ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode,
};

use crate::cq::CompletionQueue;
use crate::device::{Device, LinkLayer, PortInfo, ProtectionDomain};
use crate::error::{Error, call_failed, check_limit, rc_failed};

/// Local ACK timeout exponent: 4.096 µs × 2^14 ≈ 67 ms per try.
pub const TIMEOUT: u8 = 14;
/// Transport retries before a send fails with RETRY_EXC_ERR.
pub const RETRY_COUNT: u8 = 7;
/// Receiver-not-ready retries; 7 means "retry forever" in the verbs spec.
pub const RNR_RETRY: u8 = 7;
/// RNR NAK timer code 12 = 0.64 ms before the peer retries.
pub const MIN_RNR_TIMER: u8 = 12;
/// Outstanding RDMA reads/atomics (none are posted; 1 is the usual minimum).
pub const MAX_RD_ATOMIC: u8 = 1;
/// Hop limit of the global route header (RoCE v2 across routers).
const HOP_LIMIT: u8 = 64;
/// Scatter/gather entries a send may carry through this wrapper (the array
/// is kept on the stack while posting).
pub const SGE_PER_SEND_MAX: usize = 4;

/// Immediate data goes on the wire in network byte order.
pub fn imm_to_wire(imm: u32) -> u32 {
    imm.to_be()
}

/// Immediate data from an `ibv_wc`, back to host order.
pub fn imm_from_wire(imm: u32) -> u32 {
    u32::from_be(imm)
}

/// A 24-bit initial packet sequence number. It only has to differ between
/// incarnations of a queue pair number, so the QPN mixed with the clock does.
pub fn initial_psn(qpn: u32, clock_nanos: u32) -> u32 {
    (qpn.wrapping_mul(0x9E37_79B9) ^ clock_nanos) & 0x00FF_FFFF
}

/// Queue sizes of a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    pub send_depth: u32,
    pub recv_depth: u32,
    pub send_sge_max: u32,
}

/// The peer's side of the connection, exchanged out of band.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

/// One scatter/gather entry inside the region of `lkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    Send {
        imm: Option<u32>,
    },
    WriteWithImm {
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    },
}

/// A signaled send work request.
#[derive(Clone, Copy, Debug)]
pub struct SendWr<'a> {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: &'a [Sge],
}

/// A reliable-connected queue pair (`ibv_qp`). Destroyed before its
/// completion queue and protection domain (it holds Arcs to both).
pub struct QueuePair {
    ptr: NonNull<ibv_qp>,
    qpn: u32,
    psn: u32,
    caps: QpCaps,
    port: PortInfo,
    connected: AtomicBool,
    _cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: ibv_post_send, ibv_post_recv and ibv_modify_qp are thread-safe in
// libibverbs providers (they lock the queue they touch); the Rust-side state
// is immutable or atomic.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl Device {
    /// An RC queue pair whose sends and receives complete on `cq`, already
    /// in INIT so receives can be posted before [`QueuePair::connect`].
    pub fn create_rc_qp(
        &self,
        cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<QueuePair, Error> {
        let (_, max_wr, max_sge) = self.limits();
        check_limit("send queue depth", caps.send_depth, max_wr)?;
        check_limit("receive queue depth", caps.recv_depth, max_wr)?;
        check_limit(
            "scatter/gather entries per send",
            caps.send_sge_max,
            max_sge,
        )?;
        let mut init = ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.cq.as_ptr(),
            recv_cq: cq.cq.as_ptr(),
            srq: std::ptr::null_mut(),
            cap: ibv_qp_cap {
                max_send_wr: caps.send_depth,
                max_recv_wr: caps.recv_depth,
                max_send_sge: caps.send_sge_max,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the PD and CQ are alive (held by self and `cq`) and belong
        // to the same context; `init` is valid for the call.
        let qp = unsafe { ibv_create_qp(self.pd.ptr.as_ptr(), &mut init) };
        let ptr = NonNull::new(qp).ok_or_else(|| call_failed("ibv_create_qp"))?;
        // SAFETY: a non-null ibv_qp from ibv_create_qp is initialized.
        let qpn = unsafe { (*ptr.as_ptr()).qp_num };
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Built before INIT so that a failure below drops (destroys) it.
        let qp = QueuePair {
            ptr,
            qpn,
            psn: initial_psn(qpn, clock),
            caps,
            port: self.port().clone(),
            connected: AtomicBool::new(false),
            _cq: Arc::clone(cq),
            _pd: Arc::clone(&self.pd),
        };
        qp.to_init()?;
        Ok(qp)
    }
}

/// An all-zero `ibv_qp_attr`: the fields a mask does not name are ignored.
fn zeroed_attr() -> ibv_qp_attr {
    // SAFETY: ibv_qp_attr holds integers, an ibv_gid union of bytes and
    // integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Whether the address vector needs a global route header: always on RoCE;
/// on InfiniBand only when the peer has no LID (another subnet).
fn needs_grh(link_layer: LinkLayer, remote_lid: u16) -> bool {
    link_layer == LinkLayer::Ethernet || remote_lid == 0
}

impl QueuePair {
    pub fn qpn(&self) -> u32 {
        self.qpn
    }
    pub fn psn(&self) -> u32 {
        self.psn
    }
    pub fn caps(&self) -> QpCaps {
        self.caps
    }
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// This side's endpoint.
    pub fn local_endpoint(&self) -> RemoteEndpoint {
        RemoteEndpoint {
            qpn: self.qpn,
            psn: self.psn,
            lid: self.port.lid,
            gid: self.port.gid,
        }
    }

    fn modify(
        &self,
        call: &'static str,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
    ) -> Result<(), Error> {
        // `as i32`: the mask is a few low bits.
        // SAFETY: the QP is alive (self); `attr` is valid for the call and the
        // fields named by `mask` are set.
        let rc = unsafe { ibv_modify_qp(self.ptr.as_ptr(), attr, mask.0 as i32) };
        if rc != 0 {
            return Err(rc_failed(call, rc));
        }
        Ok(())
    }

    fn to_init(&self) -> Result<(), Error> {
        let mut attr = zeroed_attr();
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = self.port.port_num;
        // Peers write into this side's regions (WRITE WITH IMMEDIATE); each
        // region's own access flags still decide what may be written.
        attr.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        self.modify("ibv_modify_qp(INIT)", &mut attr, mask)
    }

    /// INIT → RTR → RTS against `remote`, with the port's active MTU.
    pub fn connect(&self, remote: &RemoteEndpoint) -> Result<(), Error> {
        let mut rtr = zeroed_attr();
        rtr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        rtr.path_mtu = self.port.active_mtu;
        rtr.dest_qp_num = remote.qpn;
        rtr.rq_psn = remote.psn & 0x00FF_FFFF;
        rtr.max_dest_rd_atomic = MAX_RD_ATOMIC;
        rtr.min_rnr_timer = MIN_RNR_TIMER;
        rtr.ah_attr.dlid = remote.lid;
        rtr.ah_attr.sl = 0;
        rtr.ah_attr.src_path_bits = 0;
        rtr.ah_attr.port_num = self.port.port_num;
        if needs_grh(self.port.link_layer, remote.lid) {
            rtr.ah_attr.is_global = 1;
            rtr.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
            rtr.ah_attr.grh.sgid_index = self.port.gid_index;
            rtr.ah_attr.grh.hop_limit = HOP_LIMIT;
            rtr.ah_attr.grh.traffic_class = 0;
            rtr.ah_attr.grh.flow_label = 0;
        }
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify("ibv_modify_qp(RTR)", &mut rtr, mask)?;

        let mut rts = zeroed_attr();
        rts.qp_state = ibv_qp_state::IBV_QPS_RTS;
        rts.timeout = TIMEOUT;
        rts.retry_cnt = RETRY_COUNT;
        rts.rnr_retry = RNR_RETRY;
        rts.sq_psn = self.psn;
        rts.max_rd_atomic = MAX_RD_ATOMIC;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify("ibv_modify_qp(RTS)", &mut rts, mask)?;
        self.connected.store(true, Ordering::Release);
        Ok(())
    }

    /// Posts one signaled send. The NIC reads the gather list through its
    /// local keys, so only registered memory can be read (see the crate docs).
    pub fn post_send(&self, wr: &SendWr<'_>) -> Result<(), Error> {
        if !self.is_connected() {
            return Err(Error::NotConnected { qpn: self.qpn });
        }
        let count = wr.sges.len();
        if count > self.caps.send_sge_max as usize || count > SGE_PER_SEND_MAX {
            return Err(Error::TooManySges {
                count,
                max: self.caps.send_sge_max.min(SGE_PER_SEND_MAX as u32),
            });
        }
        let mut sg_list = [ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; SGE_PER_SEND_MAX];
        for (slot, sge) in sg_list.iter_mut().zip(wr.sges) {
            *slot = ibv_sge {
                addr: sge.addr,
                length: sge.len,
                lkey: sge.lkey,
            };
        }
        // SAFETY: ibv_send_wr holds integers, raw pointers and unions of
        // those; all-zero (null `next`, no flags) is a valid value.
        let mut send: ibv_send_wr = unsafe { std::mem::zeroed() };
        send.wr_id = wr.wr_id;
        send.next = std::ptr::null_mut();
        send.sg_list = sg_list.as_mut_ptr();
        send.num_sge = count as i32;
        send.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        match wr.op {
            SendOp::Send { imm: None } => send.opcode = ibv_wr_opcode::IBV_WR_SEND,
            SendOp::Send { imm: Some(imm) } => {
                send.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
                send.imm_data_invalidated_rkey_union.imm_data = imm_to_wire(imm);
            }
            SendOp::WriteWithImm {
                remote_addr,
                rkey,
                imm,
            } => {
                send.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                send.imm_data_invalidated_rkey_union.imm_data = imm_to_wire(imm);
                send.wr.rdma = rdma_sys::rdma_t { remote_addr, rkey };
            }
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive (self). `send` and `sg_list` live on this
        // stack frame for the whole call; the provider copies the request
        // into the send queue before returning and keeps no pointer to it.
        let rc = unsafe { ibv_post_send(self.ptr.as_ptr(), &mut send, &mut bad) };
        self.post_result("ibv_post_send", "send", self.caps.send_depth, rc)
    }

    /// Posts one receive, landing a SEND in `sge` (a WRITE WITH IMMEDIATE
    /// consumes it without data and needs none).
    pub fn post_recv(&self, wr_id: u64, sge: Option<Sge>) -> Result<(), Error> {
        let mut sg = ibv_sge {
            addr: sge.map_or(0, |s| s.addr),
            length: sge.map_or(0, |s| s.len),
            lkey: sge.map_or(0, |s| s.lkey),
        };
        let mut recv = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: if sge.is_some() {
                &mut sg
            } else {
                std::ptr::null_mut()
            },
            num_sge: i32::from(sge.is_some()),
        };
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive (self). `recv` and `sg` live on this stack
        // frame for the whole call; the provider copies them into the
        // receive queue before returning.
        let rc = unsafe { ibv_post_recv(self.ptr.as_ptr(), &mut recv, &mut bad) };
        self.post_result("ibv_post_recv", "receive", self.caps.recv_depth, rc)
    }

    fn post_result(
        &self,
        call: &'static str,
        queue: &'static str,
        depth: u32,
        rc: i32,
    ) -> Result<(), Error> {
        match rc {
            0 => Ok(()),
            libc::ENOMEM => Err(Error::QueueFull {
                qpn: self.qpn,
                queue,
                depth,
            }),
            rc => Err(rc_failed(call, rc)),
        }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from ibv_create_qp and is destroyed once, here;
        // its CQ and PD are still alive (held by `_cq` and `_pd`, dropped
        // after this body). Outstanding work requests are discarded by the
        // provider; the memory they named belongs to regions the caller keeps.
        unsafe {
            ibv_destroy_qp(self.ptr.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_round_trips_through_network_order() {
        let imm = 0x0102_0304;
        assert_eq!(imm_to_wire(imm).to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(imm_from_wire(imm_to_wire(imm)), imm);
    }

    #[test]
    fn psn_fits_24_bits_and_depends_on_qpn() {
        for (qpn, clock) in [(0, 0), (1, 0), (0xFF_FFFF, u32::MAX), (77, 123_456_789)] {
            assert!(initial_psn(qpn, clock) <= 0xFF_FFFF);
        }
        assert_ne!(initial_psn(1, 5), initial_psn(2, 5));
    }

    #[test]
    fn grh_on_roce_always_and_on_infiniband_without_lid() {
        assert!(needs_grh(LinkLayer::Ethernet, 0));
        assert!(needs_grh(LinkLayer::Ethernet, 5));
        assert!(!needs_grh(LinkLayer::InfiniBand, 5));
        assert!(needs_grh(LinkLayer::InfiniBand, 0));
    }

    #[test]
    fn connection_constants_are_the_documented_ones() {
        assert_eq!(
            (TIMEOUT, RETRY_COUNT, RNR_RETRY, MIN_RNR_TIMER),
            (14, 7, 7, 12)
        );
    }
}
