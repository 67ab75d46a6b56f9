//! Control frames: a `u32` big-endian length, then a serde_json
//! [`Message`].
//!
//! We chose JSON frames over gRPC: the control plane sends a few messages a
//! second, JSON is readable in a packet capture, and it needs neither
//! `protoc` nor a code generator on the build machine. The data plane has
//! its own binary protocol ([`crate::network::frame`]).
//!
//! Reading is bounded three times: a frame longer than the reader's limit
//! is refused from its header, before any of its body is buffered; the body
//! is read in chunks that grow the buffer only as bytes arrive, every chunk
//! past the first drawn from a [`FrameBudget`] shared by every connection of
//! a process (a peer that announces a large frame and sends it slowly holds
//! only what it has sent, all such peers together at most the budget, and a
//! reader that cannot get budget drops its connection); and once its header
//! has arrived a frame must be complete within the reader's deadline. The
//! first chunk (64 KiB) is outside the budget, so that ordinary control
//! messages — heartbeats, task statuses — never wait on peers that stall
//! large frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::messages::Message;

/// Largest control frame (a deployment: job text plus placement table).
pub const FRAME_MAX_BYTES: usize = 16 << 20;

/// Bytes a frame body grows by per read.
const CHUNK_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge { length: usize, limit: usize },
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("a control frame of {length} bytes did not arrive within {deadline:?} of its header")]
    Stalled {
        length: usize,
        deadline: std::time::Duration,
    },
    #[error(
        "control frames being received hold {held_bytes} bytes, the budget of {budget_bytes}: \
         dropping the connection that asked for more"
    )]
    BudgetExhausted {
        held_bytes: usize,
        budget_bytes: usize,
    },
}

/// Bytes of partly received frames that all connections together may hold.
#[derive(Debug)]
pub struct FrameBudget {
    budget_bytes: usize,
    held_bytes: AtomicUsize,
}

impl FrameBudget {
    pub fn new(budget_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            budget_bytes,
            held_bytes: AtomicUsize::new(0),
        })
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    fn take(self: &Arc<Self>, bytes: usize) -> Result<Grant, RpcError> {
        let mut held = self.held_bytes.load(Ordering::Relaxed);
        loop {
            if held + bytes > self.budget_bytes {
                return Err(RpcError::BudgetExhausted {
                    held_bytes: held,
                    budget_bytes: self.budget_bytes,
                });
            }
            match self.held_bytes.compare_exchange_weak(
                held,
                held + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(Grant {
                        budget: Arc::clone(self),
                        bytes,
                    });
                }
                Err(now) => held = now,
            }
        }
    }
}

/// Budget held while a frame is read; returned on drop.
struct Grant {
    budget: Arc<FrameBudget>,
    bytes: usize,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget
            .held_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Encodes `msg` as one frame; refuses one over [`FRAME_MAX_BYTES`].
pub fn encode(msg: &Message) -> Result<Vec<u8>, RpcError> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, msg)?;
    let length = frame.len() - 4;
    if length > FRAME_MAX_BYTES {
        return Err(RpcError::TooLarge {
            length,
            limit: FRAME_MAX_BYTES,
        });
    }
    frame[..4].copy_from_slice(&(length as u32).to_be_bytes());
    Ok(frame)
}

pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), RpcError> {
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of at most [`FRAME_MAX_BYTES`], without a shared budget
/// or a deadline.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, RpcError> {
    read_message_bounded(r, FRAME_MAX_BYTES, None, None).await
}

/// Reads one frame of at most `limit` bytes; its body's buffer is drawn
/// from `budget` as it grows past the first chunk, and the body must arrive
/// within `body_deadline` of the header. Not cancel-safe: run it in a task
/// of its own.
pub async fn read_message_bounded<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
    budget: Option<&Arc<FrameBudget>>,
    body_deadline: Option<std::time::Duration>,
) -> Result<Message, RpcError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(RpcError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = u32::from_be_bytes(len) as usize;
    if length > limit {
        return Err(RpcError::TooLarge { length, limit });
    }
    let body = read_body(r, length, budget);
    let body = match body_deadline {
        Some(deadline) => tokio::time::timeout(deadline, body)
            .await
            .map_err(|_| RpcError::Stalled { length, deadline })??,
        None => body.await?,
    };
    Ok(serde_json::from_slice(&body)?)
}

/// Reads `length` bytes in chunks; the chunks past the first hold budget
/// until the frame is decoded (the caller drops the buffer).
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    length: usize,
    budget: Option<&Arc<FrameBudget>>,
) -> Result<Vec<u8>, RpcError> {
    let mut body: Vec<u8> = Vec::new();
    let mut grants = Vec::new();
    while body.len() < length {
        let chunk = CHUNK_BYTES.min(length - body.len());
        if let Some(budget) = budget
            && !body.is_empty()
        {
            grants.push(budget.take(chunk)?);
        }
        let start = body.len();
        // Exactly the chunk: doubling would hold twice what arrived.
        body.reserve_exact(chunk);
        body.resize(start + chunk, 0);
        r.read_exact(&mut body[start..]).await?;
    }
    drop(grants);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ExecutionId;

    /// Heartbeats of TaskManagers from before the usage report (and
    /// JobManagers from before it, which ignore the field) still decode.
    #[test]
    fn heartbeats_with_and_without_usage_decode_on_either_side() {
        let old: Message = serde_json::from_str(r#"{"Heartbeat":{"slots":[]}}"#).unwrap();
        assert!(matches!(old, Message::Heartbeat { usage: None, .. }));
        let usage = crate::protocol::ResourceUsage {
            managed_used_bytes: vec![1],
            network_segments_used: 2,
            network_segment_count: 3,
            network_segment_size_bytes: 4,
            gpu_used_bytes: vec![0],
        };
        let new = serde_json::to_value(Message::Heartbeat {
            slots: vec![],
            usage: Some(usage.clone()),
        })
        .unwrap();
        #[derive(serde::Deserialize)]
        enum OldMessage {
            Heartbeat {
                slots: Vec<crate::protocol::SlotStatus>,
            },
        }
        let OldMessage::Heartbeat { slots } = serde_json::from_value(new.clone()).unwrap();
        assert!(slots.is_empty());
        let back: Message = serde_json::from_value(new).unwrap();
        assert!(matches!(back, Message::Heartbeat { usage: Some(u), .. } if u == usage));
        let none = serde_json::to_string(&Message::Heartbeat {
            slots: vec![],
            usage: None,
        })
        .unwrap();
        assert_eq!(
            none, r#"{"Heartbeat":{"slots":[]}}"#,
            "no field for older peers"
        );
    }

    #[tokio::test]
    async fn messages_round_trip_and_oversize_is_refused_from_the_header() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_message(
            &mut a,
            &Message::CancelJob {
                execution: ExecutionId(7),
                reason: "x".into(),
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            read_message(&mut b).await.unwrap(),
            Message::CancelJob {
                execution: ExecutionId(7),
                ..
            }
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = a.write_all(&u32::MAX.to_be_bytes()).await;
        });
        assert!(matches!(
            read_message(&mut b).await,
            Err(RpcError::TooLarge { .. })
        ));
    }

    /// A peer that announces a large frame and trickles it holds only what
    /// it sent, and the budget refuses the connection that would exceed it.
    #[tokio::test]
    async fn unfinished_frames_hold_only_what_arrived_within_the_budget() {
        let budget = FrameBudget::new(192 << 10);
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(&(8u32 << 20).to_be_bytes()).await.unwrap();
        a.write_all(&vec![b' '; 100 << 10]).await.unwrap();
        let reader_budget = Arc::clone(&budget);
        let reader = tokio::spawn(async move {
            read_message_bounded(&mut b, FRAME_MAX_BYTES, Some(&reader_budget), None).await
        });
        // The first chunk is free; the second was granted for the 100 KiB
        // that arrived; the frame is far from complete.
        while budget.held_bytes() < 64 << 10 {
            tokio::task::yield_now().await;
        }
        assert!(budget.held_bytes() <= 128 << 10);
        a.write_all(&vec![b' '; 200 << 10]).await.unwrap();
        let result = reader.await.unwrap();
        assert!(
            matches!(result, Err(RpcError::BudgetExhausted { .. })),
            "{result:?}"
        );
        assert_eq!(
            budget.held_bytes(),
            0,
            "a dropped reader returns its budget"
        );
    }
}
