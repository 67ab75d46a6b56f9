//! The consumer's reader of a data connection.
//!
//! Frame heads are parsed out of a small carry buffer; a buffer's payload is
//! read straight into its segment by one `readv` that also takes the start
//! of whatever follows (the next frame's head and the first bytes of its
//! payload) into the carry. So when data is waiting, a buffer costs one
//! system call, and the only copy in user space is the carry's share of a
//! payload (at most [`CARRY_BYTES`]).

use std::io::{ErrorKind, IoSliceMut};

use tokio::net::tcp::OwnedReadHalf;

use super::frame::{HEAD_LEN, Incoming, ReadError, fixed_body_len, parse_body, parse_head};

/// The carry buffer: room for any frame's head and fixed header.
pub const CARRY_BYTES: usize = 2 * 1024;
const _: () = assert!(
    CARRY_BYTES >= HEAD_LEN + super::frame::BUFFER_HEADER_LEN,
    "a buffer frame's head and routing header must fit the carry"
);

/// A socket that frames are read from: tokio's read half (it waits by
/// awaiting readiness), or a task thread's socket (it waits by blocking in
/// the thread's poller, so its futures are ready when first polled).
pub trait FrameSource {
    /// Reads without waiting (`WouldBlock` when nothing is there).
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn try_read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize>;
    /// Reads into `body`'s spare capacity (not zeroed first) without waiting.
    fn try_read_spare(&mut self, body: &mut Vec<u8>) -> std::io::Result<usize>;
    /// Waits until a read may find bytes.
    fn readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl FrameSource for OwnedReadHalf {
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        OwnedReadHalf::try_read(self, buf)
    }

    fn try_read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        OwnedReadHalf::try_read_vectored(self, bufs)
    }

    fn try_read_spare(&mut self, body: &mut Vec<u8>) -> std::io::Result<usize> {
        let room = body.capacity() - body.len();
        self.try_read_buf(&mut bytes::BufMut::limit(body, room))
    }

    async fn readable(&mut self) -> std::io::Result<()> {
        OwnedReadHalf::readable(self).await
    }
}

/// Reads without waiting, then waits for readiness and reads again.
macro_rules! read_ready {
    ($src:expr, $read:expr) => {
        loop {
            match $read {
                Err(e) if e.kind() == ErrorKind::WouldBlock => $src.readable().await?,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                other => break other,
            }
        }
    };
}

/// What a frame reader holds between frames: the carry buffer.
pub struct Carry {
    buf: Box<[u8]>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Default for Carry {
    fn default() -> Self {
        Self {
            buf: vec![0; CARRY_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Carry {
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// One read into the carry without waiting: `None` when the socket has
    /// nothing, `Some(0)` at its end.
    pub fn try_read_more<S: FrameSource>(&mut self, src: &mut S) -> std::io::Result<Option<usize>> {
        self.compact();
        loop {
            match src.try_read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One read into the carry's free space; `Ok(0)` at the end of stream.
    async fn read_more<S: FrameSource>(&mut self, src: &mut S) -> std::io::Result<usize> {
        self.compact();
        let n = read_ready!(src, src.try_read(&mut self.buf[self.end..]))?;
        self.end += n;
        Ok(n)
    }

    /// Makes `n` (at most [`CARRY_BYTES`]) bytes available in the carry.
    async fn fill<S: FrameSource>(&mut self, src: &mut S, n: usize) -> std::io::Result<()> {
        while self.buffered() < n {
            if self.read_more(src).await? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Reads exactly `dst.len()` bytes: the carried ones first, then
    /// straight from the socket, together with the start of what follows.
    pub async fn read_exact<S: FrameSource>(
        &mut self,
        src: &mut S,
        dst: &mut [u8],
    ) -> std::io::Result<()> {
        let carried = dst.len().min(self.buffered());
        dst[..carried].copy_from_slice(&self.buf[self.start..self.start + carried]);
        self.start += carried;
        let mut filled = carried;
        if filled == dst.len() {
            return Ok(());
        }
        // The carry is empty now.
        self.start = 0;
        self.end = 0;
        while filled < dst.len() {
            let rest = dst.len() - filled;
            let mut parts = [
                IoSliceMut::new(&mut dst[filled..]),
                IoSliceMut::new(&mut self.buf),
            ];
            match read_ready!(src, src.try_read_vectored(&mut parts))? {
                0 => return Err(ErrorKind::UnexpectedEof.into()),
                n if n <= rest => filled += n,
                n => {
                    filled = dst.len();
                    self.end = n - rest;
                }
            }
        }
        Ok(())
    }

    /// Reads a payload of `len` bytes into memory of its own, with the start
    /// of whatever follows, as [`Carry::read_exact`] does: the memory has
    /// room for the carry's worth past the payload, and what lands there
    /// moves to the carry. Nothing is zeroed first, and the only copy in
    /// user space is the carry's share.
    pub async fn read_owned<S: FrameSource>(
        &mut self,
        src: &mut S,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        // Exactly this capacity (`Vec::with_capacity` guarantees it): a read
        // takes at most the carry's worth past the payload.
        let mut body = Vec::with_capacity(len + CARRY_BYTES);
        let carried = len.min(self.buffered());
        body.extend_from_slice(&self.buf[self.start..self.start + carried]);
        self.start += carried;
        if body.len() == len {
            return Ok(body);
        }
        // The carry is empty now.
        self.start = 0;
        self.end = 0;
        while body.len() < len {
            if read_ready!(src, src.try_read_spare(&mut body))? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
        let past = body.len() - len;
        if past > CARRY_BYTES {
            return Err(std::io::Error::other("read past the carry's room"));
        }
        self.buf[..past].copy_from_slice(&body[len..]);
        self.end = past;
        body.truncate(len);
        Ok(body)
    }

    /// Skips `len` bytes of a payload nobody will read.
    pub async fn skip<S: FrameSource>(
        &mut self,
        src: &mut S,
        mut len: usize,
    ) -> std::io::Result<()> {
        let mut sink = [0u8; 4096];
        while len > 0 {
            let n = len.min(sink.len());
            self.read_exact(src, &mut sink[..n]).await?;
            len -= n;
        }
        Ok(())
    }

    /// Reads the next frame's head and fixed body, as
    /// [`super::frame::read_incoming`] does: `Ok(None)` is a clean end of
    /// stream at a frame boundary, and a buffer's payload is left for
    /// [`Carry::read_exact`] or [`Carry::read_owned`].
    pub async fn next_frame<S: FrameSource>(
        &mut self,
        src: &mut S,
        payload_max: usize,
    ) -> Result<Option<Incoming>, ReadError> {
        if self.buffered() == 0 && self.read_more(src).await? == 0 {
            return Ok(None);
        }
        self.fill(src, HEAD_LEN).await?;
        let mut head = [0u8; HEAD_LEN];
        head.copy_from_slice(&self.buf[self.start..self.start + HEAD_LEN]);
        let (id, body_len) = parse_head(&head, payload_max)?;
        self.start += HEAD_LEN;
        let fixed = fixed_body_len(id, body_len);
        if fixed <= CARRY_BYTES {
            self.fill(src, fixed).await?;
            let incoming = parse_body(id, &self.buf[self.start..self.start + fixed], body_len)?;
            self.start += fixed;
            return Ok(Some(incoming));
        }
        // Only an error message is longer than the carry.
        let mut body = vec![0u8; fixed];
        self.read_exact(src, &mut body).await?;
        Ok(Some(parse_body(id, &body, body_len)?))
    }
}

/// The consumer's reader of a shared connection, on the network runtime.
pub struct FrameReader {
    half: OwnedReadHalf,
    carry: Carry,
}

impl FrameReader {
    pub fn new(half: OwnedReadHalf) -> Self {
        Self {
            half,
            carry: Carry::default(),
        }
    }

    /// See [`Carry::read_exact`].
    pub async fn read_exact(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        self.carry.read_exact(&mut self.half, dst).await
    }

    /// See [`Carry::read_owned`].
    pub async fn read_owned(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        self.carry.read_owned(&mut self.half, len).await
    }

    /// See [`Carry::skip`].
    pub async fn skip(&mut self, len: usize) -> std::io::Result<()> {
        self.carry.skip(&mut self.half, len).await
    }

    /// See [`Carry::next_frame`].
    pub async fn next_frame(&mut self, payload_max: usize) -> Result<Option<Incoming>, ReadError> {
        self.carry.next_frame(&mut self.half, payload_max).await
    }
}

/// The producer's reader of a data connection. The consumer sends only
/// control messages (credits, requests, cancels), so they are read many to
/// a system call into a buffer and parsed without waiting: the task that
/// sends the connection's buffers reads its credits between two writes, as
/// a Netty event loop does, and no second task has to wake it.
pub struct ControlReader {
    half: OwnedReadHalf,
    buf: Box<[u8]>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The peer closed its side: what is buffered is all there is.
    eof: bool,
}

/// Read buffer of a [`ControlReader`]: room for the longest control frame.
pub const CONTROL_READ_BYTES: usize = 32 * 1024;
const _: () = assert!(
    CONTROL_READ_BYTES >= HEAD_LEN + super::frame::CONTROL_BODY_MAX,
    "the longest control frame must fit the control reader's buffer"
);

/// What [`ControlReader::try_next`] found.
#[derive(Debug, PartialEq)]
pub enum Polled {
    Frame(Incoming),
    /// No whole frame yet: wait for [`ControlReader::readable`].
    Empty,
    /// The peer closed the stream at a frame boundary.
    End,
}

impl ControlReader {
    pub fn new(half: OwnedReadHalf) -> Self {
        Self {
            half,
            buf: vec![0; CONTROL_READ_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The next whole frame, without waiting. A data buffer is parsed with
    /// no room for a payload: consumers do not send them.
    pub fn try_next(&mut self) -> Result<Polled, ReadError> {
        loop {
            if let Some(frame) = self.parse_buffered()? {
                return Ok(Polled::Frame(frame));
            }
            if self.eof {
                return if self.start == self.end {
                    Ok(Polled::End)
                } else {
                    Err(ReadError::Io(ErrorKind::UnexpectedEof.into()))
                };
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.half.try_read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Polled::Empty),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn parse_buffered(&mut self) -> Result<Option<Incoming>, ReadError> {
        let buffered = &self.buf[self.start..self.end];
        let Some(head) = buffered.first_chunk::<HEAD_LEN>() else {
            return Ok(None);
        };
        let (id, body_len) = parse_head(head, 0)?;
        let fixed = fixed_body_len(id, body_len);
        let Some(body) = buffered.get(HEAD_LEN..HEAD_LEN + fixed) else {
            return Ok(None);
        };
        let incoming = parse_body(id, body, body_len)?;
        self.start += HEAD_LEN + fixed;
        Ok(Some(incoming))
    }

    /// Waits until the socket has bytes (or its end) to read. Cancel-safe.
    pub async fn readable(&self) -> std::io::Result<()> {
        if self.eof {
            return Ok(());
        }
        self.half.readable().await
    }

    /// The next frame, waiting for it; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            match self.try_next()? {
                Polled::Frame(frame) => return Ok(Some(frame)),
                Polled::End => return Ok(None),
                Polled::Empty => self.readable().await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::network::frame::{
        BufferHeader, BufferKind, ControlMessage, encode_buffer_header, encode_control,
    };

    /// Connects to a server that writes `stream` in chunks of growing size
    /// (`chunk % modulus + step` bytes, from 1), yielding between them; the
    /// read half, the write half to keep, and the writer's task.
    async fn serve_in_chunks(
        stream: Vec<u8>,
        modulus: usize,
        step: usize,
    ) -> (
        OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut at = 0;
            let mut chunk = 1;
            while at < stream.len() {
                let end = (at + chunk).min(stream.len());
                s.write_all(&stream[at..end]).await.unwrap();
                s.flush().await.unwrap();
                at = end;
                chunk = chunk % modulus + step;
                tokio::task::yield_now().await;
            }
        });
        let (half, w) = TcpStream::connect(addr).await.unwrap().into_split();
        (half, w, writer)
    }

    /// A stream of buffers and control messages, written in chunks of every
    /// size from 1 byte up, reads back frame by frame with every payload
    /// intact, and ends cleanly.
    #[tokio::test]
    async fn frames_split_anywhere_read_back_whole() {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for i in 0..40u32 {
            let len = [0usize, 1, 7, 100, 2047, 2048, 5000, 40_000][i as usize % 8];
            let payload: Vec<u8> = (0..len).map(|b| (b as u32 * 31 + i) as u8).collect();
            let header = BufferHeader {
                channel_id: i,
                edge: 1,
                source_subtask: 2,
                target_subtask: 3,
                seq: i,
                backlog: 0,
                kind: BufferKind::Ipc,
                crc: (i % 2 == 0).then(|| crc32c::crc32c(&payload)),
                size: len as u32,
            };
            encode_buffer_header(&header, &mut stream);
            stream.extend_from_slice(&payload);
            expected.push((header, payload));
            let credit = ControlMessage::AddCredit {
                channel_id: i,
                credit: 2,
            };
            encode_control(&credit, &mut stream);
        }
        let error = ControlMessage::Error {
            channel_id: 9,
            message: "x".repeat(10_000),
        };
        encode_control(&error, &mut stream);
        let (half, _w, writer) = serve_in_chunks(stream, 3001, 37).await;
        let mut reader = FrameReader::new(half);
        for (header, payload) in expected {
            let Some(Incoming::Buffer(h)) = reader.next_frame(1 << 16).await.unwrap() else {
                panic!("expected buffer {}", header.seq);
            };
            assert_eq!(h, header);
            // Odd buffers into memory of their own, even ones into a slice.
            let got = if h.seq % 2 == 1 {
                reader.read_owned(h.size as usize).await.unwrap()
            } else {
                let mut got = vec![0u8; h.size as usize];
                reader.read_exact(&mut got).await.unwrap();
                got
            };
            assert_eq!(got, payload, "payload of buffer {}", h.seq);
            let next = reader.next_frame(1 << 16).await.unwrap();
            assert!(matches!(
                next,
                Some(Incoming::Control(ControlMessage::AddCredit {
                    credit: 2,
                    ..
                }))
            ));
        }
        let last = reader.next_frame(1 << 16).await.unwrap();
        assert_eq!(last, Some(Incoming::Control(error)));
        writer.await.unwrap();
        assert!(reader.next_frame(1 << 16).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_error_not_a_clean_end() {
        let mut stream = Vec::new();
        encode_control(
            &ControlMessage::AddCredit {
                channel_id: 1,
                credit: 1,
            },
            &mut stream,
        );
        stream.truncate(stream.len() - 3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&stream).await.unwrap();
        });
        let (half, _w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut reader = FrameReader::new(half);
        let err = reader.next_frame(1 << 16).await.unwrap_err();
        assert!(matches!(err, ReadError::Io(e) if e.kind() == ErrorKind::UnexpectedEof));
    }

    /// Control frames written a few bytes at a time come back whole from
    /// the control reader, which says `Empty` instead of waiting between
    /// them and `End` at a clean close.
    #[tokio::test]
    async fn control_frames_split_anywhere_read_back_whole_without_waiting() {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let msg = match i % 3 {
                0 => ControlMessage::AddCredit {
                    channel_id: i,
                    credit: i % 7 + 1,
                },
                1 => ControlMessage::BufferSize {
                    channel_id: i,
                    size: 4096 + i,
                },
                _ => ControlMessage::Error {
                    channel_id: i,
                    message: "e".repeat(i as usize * 80),
                },
            };
            encode_control(&msg, &mut stream);
            expected.push(msg);
        }
        let (half, _w, writer) = serve_in_chunks(stream, 4001, 13).await;
        let mut reader = ControlReader::new(half);
        let mut got = Vec::new();
        loop {
            match reader.try_next().unwrap() {
                Polled::Frame(Incoming::Control(msg)) => got.push(msg),
                Polled::Frame(other) => panic!("unexpected {other:?}"),
                Polled::Empty => reader.readable().await.unwrap(),
                Polled::End => break,
            }
        }
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_control_stream_cut_inside_a_frame_is_an_error_and_a_data_buffer_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cut = Vec::new();
        encode_control(
            &ControlMessage::AddCredit {
                channel_id: 1,
                credit: 1,
            },
            &mut cut,
        );
        cut.truncate(cut.len() - 3);
        let mut buffer = Vec::new();
        let header = BufferHeader {
            channel_id: 1,
            edge: 0,
            source_subtask: 0,
            target_subtask: 0,
            seq: 0,
            backlog: 0,
            kind: BufferKind::Ipc,
            crc: None,
            size: 100,
        };
        encode_buffer_header(&header, &mut buffer);
        buffer.extend_from_slice(&[0; 100]);
        let streams = [cut, buffer];
        tokio::spawn(async move {
            for stream in streams {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(&stream).await.unwrap();
            }
        });
        let (half, _w) = TcpStream::connect(addr).await.unwrap().into_split();
        let err = ControlReader::new(half).next().await.unwrap_err();
        assert!(matches!(err, ReadError::Io(e) if e.kind() == ErrorKind::UnexpectedEof));
        let (half, _w) = TcpStream::connect(addr).await.unwrap().into_split();
        let err = ControlReader::new(half).next().await.unwrap_err();
        assert!(matches!(err, ReadError::Frame(_)), "{err:?}");
    }
}
