use super::*;
use crate::network::verbs::SgeList;

const CAPS: QpCaps = QpCaps {
    send_depth: 8,
    recv_depth: 8,
    send_sge_max: 2,
};

/// Two connected queue pairs with a completion queue each.
struct Pair {
    _devices: (Arc<EmuDevice>, Arc<EmuDevice>),
    a: Arc<dyn QueuePair>,
    a_cq: Arc<dyn CompletionQueue>,
    b: Arc<dyn QueuePair>,
    b_cq: Arc<dyn CompletionQueue>,
}

fn pair(isolated: bool) -> Pair {
    let open = |_| {
        if isolated {
            EmuDevice::open_isolated("127.0.0.1").unwrap()
        } else {
            EmuDevice::open("127.0.0.1").unwrap()
        }
    };
    let (da, db) = (open(0), open(1));
    let a_cq = da.create_cq(64).unwrap();
    let b_cq = db.create_cq(64).unwrap();
    let a = da.create_qp(&a_cq, CAPS).unwrap();
    let b = db.create_qp(&b_cq, CAPS).unwrap();
    a.connect(&b.endpoint()).unwrap();
    b.connect(&a.endpoint()).unwrap();
    Pair {
        _devices: (da, db),
        a,
        a_cq,
        b,
        b_cq,
    }
}

fn devices(p: &Pair) -> (&EmuDevice, &EmuDevice) {
    (&p._devices.0, &p._devices.1)
}

fn next(cq: &Arc<dyn CompletionQueue>) -> WorkCompletion {
    let mut out = Vec::new();
    for _ in 0..200 {
        if cq.poll(&mut out, 1) == 1 {
            return out[0];
        }
        cq.wait(Duration::from_millis(10));
    }
    panic!("no completion within 2 s");
}

/// One gather entry of `len` bytes at `offset` in `mr`.
fn sge(mr: &dyn MemoryRegion, offset: u64, len: u32) -> Sge {
    Sge {
        addr: mr.addr() + offset,
        len,
        lkey: mr.lkey(),
    }
}

/// A WRITE WITH IMMEDIATE of `len` bytes from the start of `src` to
/// `remote_addr` under `rkey`.
fn write_imm(
    wr_id: u64,
    src: &dyn MemoryRegion,
    len: u32,
    remote_addr: u64,
    rkey: u32,
    imm: u32,
) -> SendRequest {
    SendRequest {
        wr_id,
        op: SendOp::WriteWithImm {
            remote_addr,
            rkey,
            imm,
        },
        sges: SgeList::one(sge(src, 0, len)),
    }
}

/// A SEND of `len` bytes from the start of `src`.
fn send(wr_id: u64, src: &dyn MemoryRegion, len: u32, imm: Option<u32>) -> SendRequest {
    SendRequest {
        wr_id,
        op: SendOp::Send { imm },
        sges: SgeList::one(sge(src, 0, len)),
    }
}

fn register(dev: &EmuDevice, buf: &mut [u8], access: Access) -> Box<dyn MemoryRegion> {
    // SAFETY: each test keeps `buf` alive and unread until the region and
    // every operation on it are done.
    unsafe { dev.register(buf.as_mut_ptr(), buf.len(), access) }.unwrap()
}

fn write_imm_lands_bytes_and_completes_with_imm(isolated: bool) {
    let p = pair(isolated);
    let (da, db) = devices(&p);
    let mut src = vec![7u8; 100];
    src[..5].copy_from_slice(b"hello");
    let mut dst = vec![0u8; 4096];
    let src_mr = register(da, &mut src, Access::LOCAL);
    let dst_mr = register(db, &mut dst, Access::REMOTE_WRITE);
    p.b.post_recv(RecvRequest {
        wr_id: 9,
        sge: None,
    })
    .unwrap();
    p.a.post_send(write_imm(
        1,
        &*src_mr,
        100,
        dst_mr.addr() + 64,
        dst_mr.rkey(),
        0xabcd,
    ))
    .unwrap();
    let sent = next(&p.a_cq);
    assert_eq!((sent.wr_id, sent.status), (1, WcStatus::Success));
    let got = next(&p.b_cq);
    assert_eq!(got.opcode, WcOpcode::RecvRdmaWithImm);
    assert_eq!((got.wr_id, got.imm, got.byte_len), (9, Some(0xabcd), 100));
    drop((src_mr, dst_mr));
    assert_eq!(&dst[64..69], b"hello");
    assert_eq!(dst[163], 7);
    assert_eq!(dst[164], 0);
}

#[test]
fn write_with_imm_in_process() {
    write_imm_lands_bytes_and_completes_with_imm(false);
}

#[test]
fn write_with_imm_over_the_tcp_link() {
    write_imm_lands_bytes_and_completes_with_imm(true);
}

fn bad_rkey_is_a_remote_access_error_and_nothing_lands(isolated: bool) {
    let p = pair(isolated);
    let (da, db) = devices(&p);
    let mut src = vec![1u8; 64];
    let mut dst = vec![0u8; 64];
    let src_mr = register(da, &mut src, Access::LOCAL);
    let dst_mr = register(db, &mut dst, Access::REMOTE_WRITE);
    p.b.post_recv(RecvRequest {
        wr_id: 0,
        sge: None,
    })
    .unwrap();
    // Out of bounds by one byte.
    p.a.post_send(write_imm(
        5,
        &*src_mr,
        64,
        dst_mr.addr() + 1,
        dst_mr.rkey(),
        0,
    ))
    .unwrap();
    let sent = next(&p.a_cq);
    assert_eq!(sent.status, WcStatus::RemoteAccess);
    // The requester is now in the error state.
    let again = p.a.post_send(send(6, &*src_mr, 1, None));
    assert!(
        matches!(again, Err(VerbsError::QpError { .. })),
        "{again:?}"
    );
    drop((src_mr, dst_mr));
    assert!(dst.iter().all(|&b| b == 0));
}

#[test]
fn out_of_bounds_write_is_refused_in_process() {
    bad_rkey_is_a_remote_access_error_and_nothing_lands(false);
}

#[test]
fn out_of_bounds_write_is_refused_over_the_link() {
    bad_rkey_is_a_remote_access_error_and_nothing_lands(true);
}

#[test]
fn a_write_into_a_region_without_remote_write_is_refused() {
    let p = pair(false);
    let (da, db) = devices(&p);
    let mut src = vec![1u8; 8];
    let mut dst = vec![0u8; 8];
    let src_mr = register(da, &mut src, Access::LOCAL);
    let dst_mr = register(db, &mut dst, Access::LOCAL);
    p.b.post_recv(RecvRequest {
        wr_id: 0,
        sge: None,
    })
    .unwrap();
    p.a.post_send(write_imm(1, &*src_mr, 8, dst_mr.addr(), dst_mr.rkey(), 0))
        .unwrap();
    assert_eq!(next(&p.a_cq).status, WcStatus::RemoteAccess);
}

#[test]
fn a_send_without_a_posted_receive_is_receiver_not_ready() {
    let p = pair(false);
    let (da, _) = devices(&p);
    let mut src = vec![1u8; 8];
    let src_mr = register(da, &mut src, Access::LOCAL);
    p.a.post_send(send(1, &*src_mr, 8, Some(3))).unwrap();
    assert_eq!(next(&p.a_cq).status, WcStatus::RnrRetryExceeded);
}

#[test]
fn a_gather_entry_outside_its_region_is_a_local_protection_error() {
    let p = pair(false);
    let (da, _) = devices(&p);
    let mut src = vec![1u8; 8];
    let src_mr = register(da, &mut src, Access::LOCAL);
    p.b.post_recv(RecvRequest {
        wr_id: 0,
        sge: None,
    })
    .unwrap();
    p.a.post_send(send(1, &*src_mr, 9, None)).unwrap();
    assert_eq!(next(&p.a_cq).status, WcStatus::LocalProtection);
}

fn sends_arrive_in_order_with_two_gather_entries(isolated: bool) {
    let p = pair(isolated);
    let (da, db) = devices(&p);
    let mut src = vec![0u8; 16];
    let mut dst = vec![0u8; 16 * 32];
    let src_mr = register(da, &mut src, Access::LOCAL);
    let dst_mr = register(db, &mut dst, Access::REMOTE_WRITE);
    let mut received = Vec::new();
    for round in 0..4u64 {
        for i in 0..8u64 {
            let slot = (round * 8 + i) as usize;
            p.b.post_recv(RecvRequest {
                wr_id: slot as u64,
                sge: Some(Sge {
                    addr: dst_mr.addr() + (slot * 16) as u64,
                    len: 16,
                    lkey: dst_mr.lkey(),
                }),
            })
            .unwrap();
        }
        for i in 0..8u64 {
            // Each send gathers two 8-byte halves of the same source.
            p.a.post_send(SendRequest {
                wr_id: round * 8 + i,
                op: SendOp::Send {
                    imm: Some((round * 8 + i) as u32),
                },
                sges: SgeList::two(
                    Sge {
                        addr: src_mr.addr(),
                        len: 8,
                        lkey: src_mr.lkey(),
                    },
                    Sge {
                        addr: src_mr.addr() + 8,
                        len: 8,
                        lkey: src_mr.lkey(),
                    },
                ),
            })
            .unwrap();
        }
        for _ in 0..8 {
            assert_eq!(next(&p.a_cq).status, WcStatus::Success);
            received.push(next(&p.b_cq).imm.unwrap());
        }
    }
    assert_eq!(received, (0..32).collect::<Vec<_>>());
    drop((src_mr, dst_mr));
}

#[test]
fn ordered_delivery_in_process() {
    sends_arrive_in_order_with_two_gather_entries(false);
}

#[test]
fn ordered_delivery_over_the_link() {
    sends_arrive_in_order_with_two_gather_entries(true);
}

#[test]
fn posting_past_the_send_depth_is_queue_full() {
    let p = pair(true);
    let (da, _) = devices(&p);
    let mut src = vec![1u8; 8];
    let src_mr = register(da, &mut src, Access::LOCAL);
    // No receives posted at the peer; over the link each send waits for
    // its acknowledgement, so the queue fills.
    // Either the send queue fills (more than 8 unacknowledged) or the first
    // receiver-not-ready error puts the queue pair in the error state first.
    let mut stopped = false;
    for i in 0..64 {
        match p.a.post_send(send(i, &*src_mr, 8, None)) {
            Ok(()) => {}
            Err(VerbsError::QueueFull { depth: 8, .. }) | Err(VerbsError::QpError { .. }) => {
                stopped = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(stopped, "64 sends posted past a send queue of 8");
    let wc = next(&p.a_cq);
    assert_eq!(wc.status, WcStatus::RnrRetryExceeded);
}

#[test]
fn keys_of_a_dropped_region_are_refused() {
    let p = pair(false);
    let (da, db) = devices(&p);
    let mut src = vec![1u8; 8];
    let mut dst = vec![0u8; 8];
    let src_mr = register(da, &mut src, Access::LOCAL);
    let dst_mr = register(db, &mut dst, Access::REMOTE_WRITE);
    let (addr, rkey) = (dst_mr.addr(), dst_mr.rkey());
    drop(dst_mr);
    p.b.post_recv(RecvRequest {
        wr_id: 0,
        sge: None,
    })
    .unwrap();
    p.a.post_send(write_imm(1, &*src_mr, 8, addr, rkey, 0))
        .unwrap();
    assert_eq!(next(&p.a_cq).status, WcStatus::RemoteAccess);
    assert_eq!(dst, vec![0u8; 8]);
}
