//! Completion queues, with a completion channel for blocking waits, and the
//! mapping of `ibv_wc` to [`Completion`].

use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdma_sys::{
    ibv_ack_cq_events, ibv_comp_channel, ibv_cq, ibv_create_comp_channel, ibv_create_cq,
    ibv_destroy_comp_channel, ibv_destroy_cq, ibv_get_cq_event, ibv_poll_cq, ibv_req_notify_cq,
    ibv_wc, ibv_wc_flags, ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str,
};

use crate::device::{Context, Device};
use crate::error::{Error, call_failed, check_limit, last_errno, rc_failed};

/// Work completions fetched per `ibv_poll_cq` call (on the stack).
const POLL_BATCH: usize = 16;

/// Completion status, after `ibv_wc_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionStatus {
    Success,
    LocalLength,
    LocalProtection,
    Flushed,
    RemoteAccess,
    RetryExceeded,
    RnrRetryExceeded,
    /// Any other `ibv_wc_status` code.
    Other(u32),
}

impl CompletionStatus {
    pub fn from_raw(code: u32) -> CompletionStatus {
        match code {
            ibv_wc_status::IBV_WC_SUCCESS => CompletionStatus::Success,
            ibv_wc_status::IBV_WC_LOC_LEN_ERR => CompletionStatus::LocalLength,
            ibv_wc_status::IBV_WC_LOC_PROT_ERR => CompletionStatus::LocalProtection,
            ibv_wc_status::IBV_WC_WR_FLUSH_ERR => CompletionStatus::Flushed,
            ibv_wc_status::IBV_WC_REM_ACCESS_ERR => CompletionStatus::RemoteAccess,
            ibv_wc_status::IBV_WC_RETRY_EXC_ERR => CompletionStatus::RetryExceeded,
            ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => CompletionStatus::RnrRetryExceeded,
            other => CompletionStatus::Other(other),
        }
    }
}

/// libibverbs' text for a status code (`ibv_wc_status_str`).
pub fn status_text(code: u32) -> String {
    // SAFETY: ibv_wc_status_str accepts any code and returns a pointer to a
    // static NUL-terminated string ("unknown" for codes it does not know).
    let text = unsafe { ibv_wc_status_str(code) };
    if text.is_null() {
        return format!("status {code}");
    }
    // SAFETY: non-null, static and NUL-terminated (see above).
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// What a completed work request was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionOpcode {
    Send,
    RdmaWrite,
    Recv,
    RecvRdmaWithImm,
    /// Any other `ibv_wc_opcode` code. On error completions the verbs spec
    /// leaves the opcode undefined, so callers dispatch on `wr_id` there.
    Other(u32),
}

impl CompletionOpcode {
    pub fn from_raw(code: u32) -> CompletionOpcode {
        match code {
            ibv_wc_opcode::IBV_WC_SEND => CompletionOpcode::Send,
            ibv_wc_opcode::IBV_WC_RDMA_WRITE => CompletionOpcode::RdmaWrite,
            ibv_wc_opcode::IBV_WC_RECV => CompletionOpcode::Recv,
            ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => CompletionOpcode::RecvRdmaWithImm,
            other => CompletionOpcode::Other(other),
        }
    }

    /// Receive-side opcodes have bit 7 set (`IBV_WC_RECV` = 128 and up).
    pub fn is_receive(self) -> bool {
        match self {
            CompletionOpcode::Recv | CompletionOpcode::RecvRdmaWithImm => true,
            CompletionOpcode::Send | CompletionOpcode::RdmaWrite => false,
            CompletionOpcode::Other(code) => code & ibv_wc_opcode::IBV_WC_RECV != 0,
        }
    }
}

/// The fields of an `ibv_wc` that the mapping reads, as plain integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCompletion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Immediate data as it sits in the `ibv_wc` (network byte order).
    pub imm_data: u32,
    pub qp_num: u32,
    pub wc_flags: u32,
}

/// One work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: CompletionStatus,
    /// The raw status code, for [`status_text`] and logs.
    pub status_code: u32,
    pub opcode: CompletionOpcode,
    /// Bytes received (receive completions).
    pub byte_len: u32,
    /// Immediate data in host byte order, when the completion carries one.
    pub imm: Option<u32>,
    pub qp_num: u32,
    pub vendor_err: u32,
}

impl Completion {
    pub fn from_raw(raw: RawCompletion) -> Completion {
        let with_imm = raw.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        Completion {
            wr_id: raw.wr_id,
            status: CompletionStatus::from_raw(raw.status),
            status_code: raw.status,
            opcode: CompletionOpcode::from_raw(raw.opcode),
            byte_len: raw.byte_len,
            imm: with_imm.then(|| crate::qp::imm_from_wire(raw.imm_data)),
            qp_num: raw.qp_num,
            vendor_err: raw.vendor_err,
        }
    }

    /// `libibverbs`' text for this completion's status.
    pub fn status_text(&self) -> String {
        status_text(self.status_code)
    }
}

fn raw_of(wc: &ibv_wc) -> RawCompletion {
    RawCompletion {
        wr_id: wc.wr_id,
        status: wc.status,
        opcode: wc.opcode,
        vendor_err: wc.vendor_err,
        byte_len: wc.byte_len,
        // SAFETY: both union members are u32; any bit pattern is valid.
        imm_data: unsafe { wc.imm_data_invalidated_rkey_union.imm_data },
        qp_num: wc.qp_num,
        wc_flags: wc.wc_flags,
    }
}

/// A completion queue (`ibv_cq`) with its own completion channel.
/// Destroyed before its context (it holds an Arc to it) and after every queue
/// pair on it (they hold an Arc to it).
pub struct CompletionQueue {
    pub(crate) cq: NonNull<ibv_cq>,
    channel: NonNull<ibv_comp_channel>,
    depth: u32,
    _ctx: Arc<Context>,
}

// SAFETY: ibv_poll_cq, ibv_req_notify_cq and the channel calls are thread-safe
// in libibverbs providers; the channel fd is non-blocking, so concurrent
// waiters at worst see EAGAIN.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl Device {
    /// A completion queue of at least `depth` entries.
    pub fn create_cq(&self, depth: u32) -> Result<Arc<CompletionQueue>, Error> {
        check_limit("completion queue depth", depth, self.limits().0)?;
        let cqe = i32::try_from(depth).map_err(|_| Error::Call {
            call: "ibv_create_cq",
            errno: libc::EINVAL,
        })?;
        // SAFETY: the context is open (self holds it).
        let channel = unsafe { ibv_create_comp_channel(self.ctx.ptr.as_ptr()) };
        let channel =
            NonNull::new(channel).ok_or_else(|| call_failed("ibv_create_comp_channel"))?;
        // SAFETY: `channel` was just created and is non-null; its fd is an
        // open descriptor owned by libibverbs. Making it non-blocking changes
        // no ownership.
        let fd = unsafe { (*channel.as_ptr()).fd };
        set_nonblocking(fd).inspect_err(|_| destroy_channel(channel))?;
        // SAFETY: open context; `channel` belongs to it; no cq_context.
        let cq = unsafe {
            ibv_create_cq(
                self.ctx.ptr.as_ptr(),
                cqe,
                std::ptr::null_mut(),
                channel.as_ptr(),
                0,
            )
        };
        let Some(cq) = NonNull::new(cq) else {
            let e = call_failed("ibv_create_cq");
            destroy_channel(channel);
            return Err(e);
        };
        Ok(Arc::new(CompletionQueue {
            cq,
            channel,
            depth,
            _ctx: Arc::clone(&self.ctx),
        }))
    }
}

fn set_nonblocking(fd: i32) -> Result<(), Error> {
    // SAFETY: fcntl on a descriptor we were handed; F_GETFL has no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(call_failed("fcntl(F_GETFL)"));
    }
    // SAFETY: as above; F_SETFL with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(call_failed("fcntl(F_SETFL)"));
    }
    Ok(())
}

fn destroy_channel(channel: NonNull<ibv_comp_channel>) {
    // SAFETY: the channel came from ibv_create_comp_channel, no CQ uses it
    // (callers destroy the CQ first), and it is destroyed once.
    unsafe {
        ibv_destroy_comp_channel(channel.as_ptr());
    }
}

impl CompletionQueue {
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Moves up to `max` completions into `out`; never blocks.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, Error> {
        let mut taken = 0;
        while taken < max {
            // SAFETY: ibv_wc holds only integers (and a union of integers);
            // all-zero is a valid value.
            let mut wcs: [ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
            let want = (max - taken).min(POLL_BATCH);
            // `as i32`: want <= POLL_BATCH.
            // SAFETY: the CQ is alive (self), `wcs` has room for `want`
            // entries, and ibv_poll_cq writes at most that many.
            let n = unsafe { ibv_poll_cq(self.cq.as_ptr(), want as i32, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(rc_failed("ibv_poll_cq", -n));
            }
            let n = n as usize;
            out.extend(wcs[..n].iter().map(|wc| Completion::from_raw(raw_of(wc))));
            taken += n;
            if n < want {
                break;
            }
        }
        Ok(taken)
    }

    /// Requests an event on the channel for the next completion. Poll again
    /// after arming: a completion that arrived before arming raises no event.
    pub fn arm(&self) -> Result<(), Error> {
        // SAFETY: the CQ is alive (self); solicited_only = 0.
        let rc = unsafe { ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(rc_failed("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the event requested by [`arm`](Self::arm)
    /// and acknowledges it. True when an event came.
    pub fn wait_event(&self, timeout: Duration) -> Result<bool, Error> {
        // SAFETY: the channel is alive (owned by self).
        let fd = unsafe { (*self.channel.as_ptr()).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ready < 0 {
            let errno = last_errno();
            if errno == libc::EINTR {
                return Ok(false);
            }
            return Err(Error::Call {
                call: "poll(completion channel)",
                errno,
            });
        }
        if ready == 0 {
            return Ok(false);
        }
        let mut ev_cq: *mut ibv_cq = std::ptr::null_mut();
        let mut ev_ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the channel is alive; the out-pointers are valid. The fd is
        // non-blocking, so this returns EAGAIN if another waiter took the event.
        let rc = unsafe { ibv_get_cq_event(self.channel.as_ptr(), &mut ev_cq, &mut ev_ctx) };
        if rc != 0 {
            let errno = last_errno();
            if errno == libc::EAGAIN {
                return Ok(false);
            }
            return Err(Error::Call {
                call: "ibv_get_cq_event",
                errno,
            });
        }
        // SAFETY: one event was taken for this channel's only CQ (`ev_cq`);
        // acknowledging it at once keeps ibv_destroy_cq from waiting on it.
        unsafe { ibv_ack_cq_events(ev_cq, 1) };
        Ok(true)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: every queue pair on this CQ holds an Arc to it, so none is
        // alive; every event was acknowledged in `wait_event`. The CQ goes
        // first, then its channel (a channel with a CQ on it cannot be
        // destroyed).
        unsafe {
            ibv_destroy_cq(self.cq.as_ptr());
        }
        destroy_channel(self.channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map() {
        assert_eq!(CompletionStatus::from_raw(0), CompletionStatus::Success);
        assert_eq!(CompletionStatus::from_raw(1), CompletionStatus::LocalLength);
        assert_eq!(
            CompletionStatus::from_raw(4),
            CompletionStatus::LocalProtection
        );
        assert_eq!(CompletionStatus::from_raw(5), CompletionStatus::Flushed);
        assert_eq!(
            CompletionStatus::from_raw(10),
            CompletionStatus::RemoteAccess
        );
        assert_eq!(
            CompletionStatus::from_raw(12),
            CompletionStatus::RetryExceeded
        );
        assert_eq!(
            CompletionStatus::from_raw(13),
            CompletionStatus::RnrRetryExceeded
        );
        assert_eq!(CompletionStatus::from_raw(19), CompletionStatus::Other(19));
    }

    #[test]
    fn status_text_comes_from_libibverbs() {
        assert_eq!(status_text(0), "success");
        assert_eq!(status_text(5), "Work Request Flushed Error");
        assert!(!status_text(9999).is_empty());
    }

    #[test]
    fn opcodes_map_and_receive_bit_is_read() {
        assert_eq!(CompletionOpcode::from_raw(0), CompletionOpcode::Send);
        assert_eq!(CompletionOpcode::from_raw(1), CompletionOpcode::RdmaWrite);
        assert_eq!(CompletionOpcode::from_raw(128), CompletionOpcode::Recv);
        assert_eq!(
            CompletionOpcode::from_raw(129),
            CompletionOpcode::RecvRdmaWithImm
        );
        assert!(CompletionOpcode::Other(133).is_receive());
        assert!(!CompletionOpcode::Other(2).is_receive());
        assert!(CompletionOpcode::Recv.is_receive());
        assert!(!CompletionOpcode::RdmaWrite.is_receive());
    }

    #[test]
    fn immediate_is_read_only_with_the_flag_and_in_host_order() {
        let raw = RawCompletion {
            wr_id: 7,
            opcode: 129,
            byte_len: 4096,
            imm_data: 0x1234_5678u32.to_be(),
            qp_num: 42,
            wc_flags: 2, // IBV_WC_WITH_IMM
            ..RawCompletion::default()
        };
        let wc = Completion::from_raw(raw);
        assert_eq!(wc.imm, Some(0x1234_5678));
        assert_eq!(wc.opcode, CompletionOpcode::RecvRdmaWithImm);
        assert_eq!((wc.wr_id, wc.byte_len, wc.qp_num), (7, 4096, 42));
        let without = Completion::from_raw(RawCompletion { wc_flags: 0, ..raw });
        assert_eq!(without.imm, None);
    }
}
