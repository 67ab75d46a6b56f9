//! The data-plane wire format, after Flink's `NettyMessage`.
//!
//! Every frame starts with `length: u32` (the whole frame, this field
//! included), `magic: u32 = 0xBADC0FFE` and `id: u8`; integers are big-endian.
//! A `BufferResponse` carries the routing header (channel, edge, source and
//! target subtask, sequence number, backlog, kind, CRC-32C, size) and then the
//! payload: Arrow IPC messages, a watermark, or nothing (end of partition).
//!
//! Decoding never trusts the peer: a bad magic, an unknown id, a length that
//! disagrees with the body or exceeds the segment size is a [`FrameError`],
//! and the connection that sent it is closed.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::verbs::QpEndpoint;

pub const MAGIC: u32 = 0xBADC_0FFE;
pub const HEAD_LEN: usize = 9;
/// Fixed part of a BufferResponse body, before the payload.
pub const BUFFER_HEADER_LEN: usize = 4 * 6 + 1 + 4 + 4;

const ID_BUFFER: u8 = 0;
const ID_ERROR: u8 = 1;
const ID_PARTITION_REQUEST: u8 = 2;
const ID_CANCEL: u8 = 4;
const ID_CLOSE: u8 = 5;
const ID_ADD_CREDIT: u8 = 6;
const ID_VERBS_CONNECT: u8 = 7;
const ID_VERBS_CREDIT: u8 = 8;
const ID_BUFFER_SIZE: u8 = 9;
const ID_BACKLOG: u8 = 10;
/// Longest emulated-device address in a VerbsConnect.
const DEVICE_TEXT_MAX: usize = 256;
const VERBS_CONNECT_FIXED: usize = 4 + 4 + 2 + 16 + 2;
const VERBS_CREDIT_LEN: usize = 4 + 4 + 8 + 4 + 4;
/// Longest error text a peer may send.
const ERROR_TEXT_MAX: usize = 16 * 1024;
/// The longest control message body (an error with its text).
pub const CONTROL_BODY_MAX: usize = 4 + ERROR_TEXT_MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x} (expected 0xbadc0ffe)")]
    BadMagic { found: u32 },
    #[error("unknown frame id {id}")]
    UnknownId { id: u8 },
    #[error("frame length {length} out of range (at least {min}, at most {max})")]
    BadLength {
        length: usize,
        min: usize,
        max: usize,
    },
    #[error("unknown buffer kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("frame body of {actual} bytes does not match its header ({expected} expected)")]
    Truncated { expected: usize, actual: usize },
    #[error("error text is not valid UTF-8")]
    BadText,
}

/// What a data buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BufferKind {
    /// Arrow IPC stream messages (schema on a channel's first buffer, then a batch).
    Ipc = 0,
    /// An event-time watermark: 8 bytes, big-endian i64.
    Watermark = 1,
    /// The producer subtask finished; no payload.
    EndOfPartition = 2,
    /// A checkpoint barrier: 8 bytes, big-endian checkpoint id. Like every
    /// event it needs no credit.
    Barrier = 3,
}

impl BufferKind {
    fn from_u8(kind: u8) -> Result<Self, FrameError> {
        match kind {
            0 => Ok(Self::Ipc),
            1 => Ok(Self::Watermark),
            2 => Ok(Self::EndOfPartition),
            3 => Ok(Self::Barrier),
            _ => Err(FrameError::UnknownKind { kind }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferHeader {
    pub channel_id: u32,
    pub edge: u32,
    pub source_subtask: u32,
    pub target_subtask: u32,
    pub seq: u32,
    pub backlog: u32,
    pub kind: BufferKind,
    /// CRC-32C of the payload, when the producer computes one
    /// (`taskmanager.network.checksum.enabled`); on the wire, bit 7 of the
    /// kind byte says whether the CRC field holds one.
    pub crc: Option<u32>,
    pub size: u32,
}

/// Set in the kind byte when the CRC field holds the payload's CRC-32C.
const KIND_CHECKSUMMED: u8 = 0x80;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlMessage {
    /// Consumer → producer: attach `channel_id` to a subpartition, with initial credit.
    PartitionRequest {
        channel_id: u32,
        job: u64,
        edge: u32,
        source_subtask: u32,
        subpartition: u32,
        initial_credit: u32,
    },
    /// Consumer → producer: `credit` more buffers may be sent on the channel.
    AddCredit { channel_id: u32, credit: u32 },
    /// Consumer → producer: the consumer is gone; drop the subpartition's data.
    CancelPartition { channel_id: u32 },
    /// Either side: the connection is closing normally.
    Close,
    /// Either side: the channel (or the connection, for `u32::MAX`) failed.
    Error { channel_id: u32, message: String },
    /// Either side, first on a connection that moves buffers over verbs: the
    /// sender's queue pair endpoint (the consumer asks, the producer answers).
    VerbsConnect { endpoint: QpEndpoint },
    /// Consumer → producer over verbs: one credit, as the registered buffer
    /// the producer may write into (`slot` comes back as the immediate).
    VerbsCredit {
        channel_id: u32,
        slot: u32,
        addr: u64,
        rkey: u32,
        len: u32,
    },
    /// Consumer → producer: buffer debloating's new buffer size for a channel.
    BufferSize { channel_id: u32, size: u32 },
    /// Producer → consumer (Flink's `BacklogAnnouncement`): the channel has
    /// `backlog` buffers queued and no credit. The backlog otherwise rides
    /// on data buffers only, so without this a consumer would not lend
    /// floating buffers to a sender that has none to send with.
    BacklogAnnouncement { channel_id: u32, backlog: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Buffer(BufferHeader),
    Control(ControlMessage),
}

fn put_head(out: &mut Vec<u8>, frame_len: usize, id: u8) {
    out.extend_from_slice(&(frame_len as u32).to_be_bytes());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.push(id);
}

/// Appends a BufferResponse's head and routing header; the payload follows.
pub fn encode_buffer_header(h: &BufferHeader, out: &mut Vec<u8>) {
    put_head(
        out,
        HEAD_LEN + BUFFER_HEADER_LEN + h.size as usize,
        ID_BUFFER,
    );
    for v in [
        h.channel_id,
        h.edge,
        h.source_subtask,
        h.target_subtask,
        h.seq,
        h.backlog,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.push(kind_byte(h));
    out.extend_from_slice(&h.crc.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&h.size.to_be_bytes());
}

pub fn encode_control(msg: &ControlMessage, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(32);
    let id = match msg {
        ControlMessage::PartitionRequest {
            channel_id,
            job,
            edge,
            source_subtask,
            subpartition,
            initial_credit,
        } => {
            body.extend_from_slice(&channel_id.to_be_bytes());
            body.extend_from_slice(&job.to_be_bytes());
            for v in [edge, source_subtask, subpartition, initial_credit] {
                body.extend_from_slice(&v.to_be_bytes());
            }
            ID_PARTITION_REQUEST
        }
        ControlMessage::AddCredit { channel_id, credit } => {
            body.extend_from_slice(&channel_id.to_be_bytes());
            body.extend_from_slice(&credit.to_be_bytes());
            ID_ADD_CREDIT
        }
        ControlMessage::CancelPartition { channel_id } => {
            body.extend_from_slice(&channel_id.to_be_bytes());
            ID_CANCEL
        }
        ControlMessage::Close => ID_CLOSE,
        ControlMessage::VerbsConnect { endpoint } => {
            let device = truncate_utf8(&endpoint.device, DEVICE_TEXT_MAX);
            body.extend_from_slice(&endpoint.qpn.to_be_bytes());
            body.extend_from_slice(&endpoint.psn.to_be_bytes());
            body.extend_from_slice(&endpoint.lid.to_be_bytes());
            body.extend_from_slice(&endpoint.gid);
            body.extend_from_slice(&(device.len() as u16).to_be_bytes());
            body.extend_from_slice(device.as_bytes());
            ID_VERBS_CONNECT
        }
        ControlMessage::VerbsCredit {
            channel_id,
            slot,
            addr,
            rkey,
            len,
        } => {
            body.extend_from_slice(&channel_id.to_be_bytes());
            body.extend_from_slice(&slot.to_be_bytes());
            body.extend_from_slice(&addr.to_be_bytes());
            body.extend_from_slice(&rkey.to_be_bytes());
            body.extend_from_slice(&len.to_be_bytes());
            ID_VERBS_CREDIT
        }
        ControlMessage::BufferSize { channel_id, size } => {
            body.extend_from_slice(&channel_id.to_be_bytes());
            body.extend_from_slice(&size.to_be_bytes());
            ID_BUFFER_SIZE
        }
        ControlMessage::BacklogAnnouncement {
            channel_id,
            backlog,
        } => {
            body.extend_from_slice(&channel_id.to_be_bytes());
            body.extend_from_slice(&backlog.to_be_bytes());
            ID_BACKLOG
        }
        ControlMessage::Error {
            channel_id,
            message,
        } => {
            let text = truncate_utf8(message, ERROR_TEXT_MAX);
            body.extend_from_slice(&channel_id.to_be_bytes());
            body.extend_from_slice(text.as_bytes());
            ID_ERROR
        }
    };
    put_head(out, HEAD_LEN + body.len(), id);
    out.extend_from_slice(&body);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Validates a frame head; returns the id and the length of the body.
pub fn parse_head(head: &[u8; HEAD_LEN], payload_max: usize) -> Result<(u8, usize), FrameError> {
    let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let magic = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let id = head[8];
    let (min, max) = match id {
        ID_BUFFER => (BUFFER_HEADER_LEN, BUFFER_HEADER_LEN + payload_max),
        ID_PARTITION_REQUEST => (28, 28),
        ID_ADD_CREDIT => (8, 8),
        ID_CANCEL => (4, 4),
        ID_CLOSE => (0, 0),
        ID_ERROR => (4, CONTROL_BODY_MAX),
        ID_VERBS_CONNECT => (VERBS_CONNECT_FIXED, VERBS_CONNECT_FIXED + DEVICE_TEXT_MAX),
        ID_VERBS_CREDIT => (VERBS_CREDIT_LEN, VERBS_CREDIT_LEN),
        ID_BUFFER_SIZE => (8, 8),
        ID_BACKLOG => (8, 8),
        _ => return Err(FrameError::UnknownId { id }),
    };
    let body = length.checked_sub(HEAD_LEN).ok_or(FrameError::BadLength {
        length,
        min: HEAD_LEN + min,
        max: HEAD_LEN + max,
    })?;
    if body < min || body > max {
        return Err(FrameError::BadLength {
            length,
            min: HEAD_LEN + min,
            max: HEAD_LEN + max,
        });
    }
    Ok((id, body))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses a frame body. For a BufferResponse, `body` is the fixed routing
/// header only and `body_len` the whole body (header + payload).
pub fn parse_body(id: u8, body: &[u8], body_len: usize) -> Result<Incoming, FrameError> {
    match id {
        ID_BUFFER => {
            if body.len() != BUFFER_HEADER_LEN {
                return Err(FrameError::Truncated {
                    expected: BUFFER_HEADER_LEN,
                    actual: body.len(),
                });
            }
            let size = be32(body, 29);
            if body_len != BUFFER_HEADER_LEN + size as usize {
                return Err(FrameError::Truncated {
                    expected: BUFFER_HEADER_LEN + size as usize,
                    actual: body_len,
                });
            }
            decode_routing_header(body).map(Incoming::Buffer)
        }
        _ => {
            if body.len() != body_len {
                return Err(FrameError::Truncated {
                    expected: body_len,
                    actual: body.len(),
                });
            }
            parse_control(id, body).map(Incoming::Control)
        }
    }
}

fn kind_byte(h: &BufferHeader) -> u8 {
    h.kind as u8 | if h.crc.is_some() { KIND_CHECKSUMMED } else { 0 }
}

/// Writes a buffer's routing header alone (the verbs transport puts it in
/// front of the payload in the receiver's segment).
pub fn encode_routing_header(h: &BufferHeader, out: &mut [u8; BUFFER_HEADER_LEN]) {
    for (i, v) in [
        h.channel_id,
        h.edge,
        h.source_subtask,
        h.target_subtask,
        h.seq,
        h.backlog,
    ]
    .into_iter()
    .enumerate()
    {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out[24] = kind_byte(h);
    out[25..29].copy_from_slice(&h.crc.unwrap_or(0).to_be_bytes());
    out[29..33].copy_from_slice(&h.size.to_be_bytes());
}

/// Reads a routing header; `body` holds at least [`BUFFER_HEADER_LEN`] bytes.
pub fn decode_routing_header(body: &[u8]) -> Result<BufferHeader, FrameError> {
    if body.len() < BUFFER_HEADER_LEN {
        return Err(FrameError::Truncated {
            expected: BUFFER_HEADER_LEN,
            actual: body.len(),
        });
    }
    Ok(BufferHeader {
        channel_id: be32(body, 0),
        edge: be32(body, 4),
        source_subtask: be32(body, 8),
        target_subtask: be32(body, 12),
        seq: be32(body, 16),
        backlog: be32(body, 20),
        kind: BufferKind::from_u8(body[24] & !KIND_CHECKSUMMED)?,
        crc: (body[24] & KIND_CHECKSUMMED != 0).then(|| be32(body, 25)),
        size: be32(body, 29),
    })
}

fn parse_control(id: u8, body: &[u8]) -> Result<ControlMessage, FrameError> {
    Ok(match id {
        ID_VERBS_CONNECT => {
            let device_len = u16::from_be_bytes([body[26], body[27]]) as usize;
            if body.len() != VERBS_CONNECT_FIXED + device_len {
                return Err(FrameError::Truncated {
                    expected: VERBS_CONNECT_FIXED + device_len,
                    actual: body.len(),
                });
            }
            let mut gid = [0u8; 16];
            gid.copy_from_slice(&body[10..26]);
            ControlMessage::VerbsConnect {
                endpoint: QpEndpoint {
                    qpn: be32(body, 0),
                    psn: be32(body, 4),
                    lid: u16::from_be_bytes([body[8], body[9]]),
                    gid,
                    device: std::str::from_utf8(&body[VERBS_CONNECT_FIXED..])
                        .map_err(|_| FrameError::BadText)?
                        .to_owned(),
                },
            }
        }
        ID_VERBS_CREDIT => ControlMessage::VerbsCredit {
            channel_id: be32(body, 0),
            slot: be32(body, 4),
            addr: u64::from_be_bytes([
                body[8], body[9], body[10], body[11], body[12], body[13], body[14], body[15],
            ]),
            rkey: be32(body, 16),
            len: be32(body, 20),
        },
        ID_BACKLOG => ControlMessage::BacklogAnnouncement {
            channel_id: be32(body, 0),
            backlog: be32(body, 4),
        },
        ID_BUFFER_SIZE => ControlMessage::BufferSize {
            channel_id: be32(body, 0),
            size: be32(body, 4),
        },
        ID_PARTITION_REQUEST => ControlMessage::PartitionRequest {
            channel_id: be32(body, 0),
            job: u64::from_be_bytes(body[4..12].try_into().map_err(|_| FrameError::Truncated {
                expected: 28,
                actual: body.len(),
            })?),
            edge: be32(body, 12),
            source_subtask: be32(body, 16),
            subpartition: be32(body, 20),
            initial_credit: be32(body, 24),
        },
        ID_ADD_CREDIT => ControlMessage::AddCredit {
            channel_id: be32(body, 0),
            credit: be32(body, 4),
        },
        ID_CANCEL => ControlMessage::CancelPartition {
            channel_id: be32(body, 0),
        },
        ID_CLOSE => ControlMessage::Close,
        ID_ERROR => ControlMessage::Error {
            channel_id: be32(body, 0),
            message: std::str::from_utf8(&body[4..])
                .map_err(|_| FrameError::BadText)?
                .to_owned(),
        },
        _ => return Err(FrameError::UnknownId { id }),
    })
}

/// Errors while reading a frame from a socket.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How much of a frame's body precedes the payload: a buffer's routing
/// header, or a control message's whole body.
pub fn fixed_body_len(id: u8, body_len: usize) -> usize {
    if id == ID_BUFFER {
        BUFFER_HEADER_LEN
    } else {
        body_len
    }
}

/// Reads the next frame's head and fixed body. `Ok(None)` is a clean end of
/// stream at a frame boundary. A buffer's payload is left on the stream for
/// the caller to read into a segment.
pub async fn read_incoming<R: AsyncRead + Unpin>(
    reader: &mut R,
    payload_max: usize,
) -> Result<Option<Incoming>, ReadError> {
    let mut head = [0u8; HEAD_LEN];
    match reader.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    reader.read_exact(&mut head[1..]).await?;
    let (id, body_len) = parse_head(&head, payload_max)?;
    let fixed = fixed_body_len(id, body_len);
    let mut body = vec![0u8; fixed];
    reader.read_exact(&mut body).await?;
    Ok(Some(parse_body(id, &body, body_len)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(bytes: &[u8]) -> Result<Option<Incoming>, ReadError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = bytes;
            read_incoming(&mut r, 1 << 16).await
        })
    }

    #[test]
    fn control_messages_round_trip() {
        for msg in [
            ControlMessage::PartitionRequest {
                channel_id: 7,
                job: u64::MAX - 3,
                edge: 2,
                source_subtask: 1,
                subpartition: 3,
                initial_credit: 2,
            },
            ControlMessage::AddCredit {
                channel_id: 9,
                credit: 4,
            },
            ControlMessage::CancelPartition { channel_id: 1 },
            ControlMessage::Close,
            ControlMessage::Error {
                channel_id: 5,
                message: "boom".into(),
            },
            ControlMessage::VerbsConnect {
                endpoint: QpEndpoint {
                    qpn: 0x1234,
                    psn: 77,
                    lid: 3,
                    gid: [9; 16],
                    device: "emu-1-0@127.0.0.1:4000".into(),
                },
            },
            ControlMessage::VerbsCredit {
                channel_id: 2,
                slot: 17,
                addr: 0x7f00_dead_beef,
                rkey: 0xabc,
                len: 32768,
            },
            ControlMessage::BufferSize {
                channel_id: 4,
                size: 4096,
            },
            ControlMessage::BacklogAnnouncement {
                channel_id: 5,
                backlog: 9,
            },
        ] {
            let mut out = Vec::new();
            encode_control(&msg, &mut out);
            let got = roundtrip(&out).unwrap().unwrap();
            assert_eq!(got, Incoming::Control(msg));
        }
    }

    #[test]
    fn buffer_header_round_trips() {
        let h = BufferHeader {
            channel_id: 1,
            edge: 2,
            source_subtask: 3,
            target_subtask: 4,
            seq: 5,
            backlog: 6,
            kind: BufferKind::Watermark,
            crc: Some(0xDEAD_BEEF),
            size: 8,
        };
        let mut out = Vec::new();
        encode_buffer_header(&h, &mut out);
        out.extend_from_slice(&[0; 8]);
        assert_eq!(roundtrip(&out).unwrap().unwrap(), Incoming::Buffer(h));
    }

    #[test]
    fn barrier_header_round_trips() {
        let h = BufferHeader {
            channel_id: 9,
            edge: 1,
            source_subtask: 0,
            target_subtask: 2,
            seq: 41,
            backlog: 0,
            kind: BufferKind::Barrier,
            crc: None,
            size: 8,
        };
        let mut out = Vec::new();
        encode_buffer_header(&h, &mut out);
        out.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(roundtrip(&out).unwrap().unwrap(), Incoming::Buffer(h));
    }

    #[test]
    fn oversized_buffer_is_rejected_before_reading_payload() {
        let h = BufferHeader {
            channel_id: 1,
            edge: 0,
            source_subtask: 0,
            target_subtask: 0,
            seq: 0,
            backlog: 0,
            kind: BufferKind::Ipc,
            crc: None,
            size: 1 << 20,
        };
        let mut out = Vec::new();
        encode_buffer_header(&h, &mut out);
        assert!(matches!(
            roundtrip(&out),
            Err(ReadError::Frame(FrameError::BadLength { .. }))
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = roundtrip(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_mutated_frames(pos in 0usize..160, val in any::<u8>(), cut in 0usize..160) {
            let mut out = Vec::new();
            encode_control(&ControlMessage::PartitionRequest { channel_id: 1, job: 2, edge: 3, source_subtask: 4, subpartition: 5, initial_credit: 6 }, &mut out);
            encode_control(&ControlMessage::Error { channel_id: 1, message: "x".repeat(20) }, &mut out);
            encode_control(&ControlMessage::VerbsConnect { endpoint: QpEndpoint { qpn: 1, psn: 2, lid: 3, gid: [4; 16], device: "d@h:1".into() } }, &mut out);
            encode_control(&ControlMessage::VerbsCredit { channel_id: 1, slot: 2, addr: 3, rkey: 4, len: 5 }, &mut out);
            if pos < out.len() { out[pos] = val; }
            out.truncate(out.len().saturating_sub(cut));
            let _ = roundtrip(&out);
        }
    }
}
