//! Task-read TCP input: an input gate's own connection to each producer
//! TaskManager, read by the gate's task thread whenever its queue is empty.
//!
//! On the shared connection (`tcp.rs`) every credit round trip crosses two
//! threads on the consumer's side: the network runtime reads a buffer and
//! wakes the task, the task recycles it and wakes the runtime to write the
//! credit. Here the task thread does both: it reads its connections where
//! it would otherwise wait for the runtime, and writes a credit as it
//! recycles the segment. A round trip then wakes one thread per side, as
//! iperf3's does. Flow control, frames and the producer's side are those of
//! the shared connection; only who reads and writes the consumer's socket
//! differs (`taskmanager.network.tcp.task-reads`).

use std::collections::HashMap;
use std::future::Future;
use std::io::{ErrorKind, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::frame::{BufferKind, ControlMessage, Incoming, ReadError, encode_control};
use super::gate::{CreditLink, GateDriver, InputGate};
use super::reader::{Carry, FrameSource};
use super::{NetworkError, PartitionId};
use crate::security::{PeerAuth, Plane, Role};

/// How long a frame that has started may take to arrive whole.
const MID_FRAME_WAIT: Duration = Duration::from_secs(30);
/// Frames one link gives per round before the next link's turn.
const FRAMES_PER_ROUND: usize = 64;
/// Control bytes a link holds while its socket takes none (credits are 17
/// bytes each; a consumer never has this many outstanding).
const PENDING_CONTROL_MAX: usize = 1 << 20;
const WAKE: Token = Token(usize::MAX);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One input gate's connection to one producer TaskManager.
pub struct GateLink {
    peer: String,
    stream: TcpStream,
    inbound: Mutex<Inbound>,
    /// Control bytes the socket has not taken yet (written first next time).
    pending: Mutex<Vec<u8>>,
}

/// What the task thread reads: the carry buffer and the channels' routes.
struct Inbound {
    carry: Carry,
    /// Channel id → (gate channel, expected sequence number).
    channels: HashMap<u32, (usize, u32)>,
    next_channel_id: u32,
    /// The stream ended or broke: the error the gate failed with.
    closed: Option<NetworkError>,
}

/// Opens an input gate's own connection to a producer TaskManager's data
/// server, authenticated with `auth` before any frame (as the shared
/// connection is: [`super::tcp::ConnectionManager::auth`]).
pub async fn connect(
    addr: std::net::SocketAddr,
    peer_name: &str,
    auth: &PeerAuth,
) -> Result<Arc<GateLink>, NetworkError> {
    let peer = format!("{peer_name} ({addr})");
    let failed = |reason: String| NetworkError::Connect {
        peer: peer.clone(),
        reason,
    };
    let io = |e: std::io::Error| failed(e.to_string());
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    auth.handshake(&mut stream, Role::Client, Plane::Data, &addr.to_string())
        .await
        .map_err(|e| failed(e.to_string()))?;
    GateLink::new(stream.into_std().map_err(io)?, peer.clone()).map_err(io)
}

impl GateLink {
    /// Wraps a connected socket (non-blocking, as tokio hands it over).
    pub fn new(stream: std::net::TcpStream, peer: String) -> std::io::Result<Arc<Self>> {
        stream.set_nonblocking(true)?;
        let _ = stream.set_nodelay(true);
        Ok(Arc::new(Self {
            peer,
            stream: TcpStream::from_std(stream),
            inbound: Mutex::new(Inbound {
                carry: Carry::default(),
                channels: HashMap::new(),
                next_channel_id: 0,
                closed: None,
            }),
            pending: Mutex::new(Vec::new()),
        }))
    }

    fn lost(&self, reason: impl std::fmt::Display) -> NetworkError {
        NetworkError::PeerLost {
            peer: self.peer.clone(),
            reason: reason.to_string(),
        }
    }

    fn protocol(&self, detail: String) -> NetworkError {
        NetworkError::Protocol {
            peer: self.peer.clone(),
            detail,
        }
    }

    /// Attaches `channel` of `gate` to a subpartition on this link's peer:
    /// the request carries the channel's initial credit, and later credit
    /// is written on this link by whoever recycles a segment.
    pub fn request_partition(
        self: &Arc<Self>,
        gate: &Arc<InputGate>,
        channel: usize,
        partition: PartitionId,
        subpartition: u32,
    ) -> Result<(), NetworkError> {
        let channel_id = {
            let mut inbound = lock(&self.inbound);
            if let Some(e) = &inbound.closed {
                return Err(e.clone());
            }
            let id = inbound.next_channel_id;
            inbound.next_channel_id += 1;
            inbound.channels.insert(id, (channel, 0));
            id
        };
        let credit = gate.bind_remote(channel, CreditLink::direct(channel_id, Arc::clone(self)));
        self.send(&ControlMessage::PartitionRequest {
            channel_id,
            job: partition.job,
            edge: partition.edge,
            source_subtask: partition.source_subtask,
            subpartition,
            initial_credit: credit,
        })
    }

    /// Writes a control message without waiting: what the socket does not
    /// take now goes out before the next message, or when the gate's task
    /// next reads.
    pub fn send(&self, msg: &ControlMessage) -> Result<(), NetworkError> {
        let mut pending = lock(&self.pending);
        encode_control(msg, &mut pending);
        if pending.len() > PENDING_CONTROL_MAX {
            return Err(self.lost(format!(
                "more than {PENDING_CONTROL_MAX} bytes of control messages not taken by the socket"
            )));
        }
        self.flush_locked(&mut pending)
    }

    fn flush(&self) -> Result<(), NetworkError> {
        let mut pending = lock(&self.pending);
        self.flush_locked(&mut pending)
    }

    fn flush_locked(&self, pending: &mut Vec<u8>) -> Result<(), NetworkError> {
        let mut written = 0;
        while written < pending.len() {
            match (&self.stream).write(&pending[written..]) {
                Ok(0) => return Err(self.lost("connection closed")),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
        pending.drain(..written);
        Ok(())
    }
}

impl Drop for GateLink {
    fn drop(&mut self) {
        // The producer releases the subpartitions when the connection ends.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The socket and the poller a frame in progress waits on.
struct Io<'a> {
    link: &'a GateLink,
    poll: &'a mut Poll,
    events: &'a mut Events,
    gate: &'a InputGate,
}

impl FrameSource for Io<'_> {
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.link.stream).read(buf)
    }

    fn try_read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        (&self.link.stream).read_vectored(bufs)
    }

    fn try_read_spare(&mut self, body: &mut Vec<u8>) -> std::io::Result<usize> {
        rustix::io::read(&self.link.stream, rustix::buffer::spare_capacity(body))
            .map_err(std::io::Error::from)
    }

    /// Blocks in the gate's poller until the socket (or anything the poller
    /// watches) has news, or the gate fails: a frame that has started is
    /// read to its end, as its bytes are already on their way.
    async fn readable(&mut self) -> std::io::Result<()> {
        if self.gate.has_failed() {
            return Err(std::io::Error::other("the gate failed"));
        }
        self.poll.poll(self.events, Some(MID_FRAME_WAIT))?;
        if self.events.is_empty() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no byte of a started frame for {MID_FRAME_WAIT:?}"),
            ));
        }
        Ok(())
    }
}

/// Runs a read on an [`Io`] to its end: its waits block in the poller, so
/// the future is ready when first polled.
fn blocking<T, E: From<std::io::Error>>(read: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let mut read = pin!(read);
    match read
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => {
            Err(std::io::Error::other("a task-read socket read returned without its bytes").into())
        }
    }
}

impl GateLink {
    /// Receives the frames that have arrived (up to [`FRAMES_PER_ROUND`]);
    /// returns how many.
    fn receive(
        &self,
        gate: &InputGate,
        poll: &mut Poll,
        events: &mut Events,
        segment_size: usize,
    ) -> Result<usize, NetworkError> {
        let mut inbound = lock(&self.inbound);
        if let Some(e) = &inbound.closed {
            return Err(e.clone());
        }
        let mut io = Io {
            link: self,
            poll,
            events,
            gate,
        };
        let mut frames = 0;
        while frames < FRAMES_PER_ROUND {
            match self.receive_one(&mut inbound, &mut io, gate, segment_size) {
                Ok(true) => frames += 1,
                Ok(false) => break,
                Err(e) => {
                    inbound.closed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(frames)
    }

    /// Receives one frame, as `tcp.rs` `receive_one` does; `Ok(false)` when
    /// none has arrived.
    fn receive_one(
        &self,
        inbound: &mut Inbound,
        io: &mut Io,
        gate: &InputGate,
        segment_size: usize,
    ) -> Result<bool, NetworkError> {
        // Has a frame started? Then it is read to its end.
        if inbound.carry.buffered() == 0 {
            match inbound.carry.try_read_more(io) {
                Ok(None) => return Ok(false),
                Ok(Some(0)) if inbound.channels.is_empty() => {
                    // Every channel ended: nothing is lost with the link.
                    return Ok(false);
                }
                Ok(Some(0)) => return Err(self.lost("connection closed by peer")),
                Ok(Some(_)) => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
        let incoming = match blocking(inbound.carry.next_frame(io, segment_size)) {
            Ok(Some(i)) => i,
            Ok(None) => return Err(self.lost("connection closed by peer")),
            Err(ReadError::Io(e)) => return Err(self.lost(e)),
            Err(ReadError::Frame(e)) => return Err(self.protocol(e.to_string())),
        };
        let h = match incoming {
            Incoming::Buffer(h) => h,
            Incoming::Control(ControlMessage::Error {
                channel_id,
                message,
            }) => {
                // The link serves one gate: its channel's error fails it.
                inbound.channels.remove(&channel_id);
                return Err(self.protocol(message));
            }
            Incoming::Control(ControlMessage::BacklogAnnouncement {
                channel_id,
                backlog,
            }) => {
                // A channel that ended meanwhile needs no buffers.
                if let Some((channel, _)) = inbound.channels.get(&channel_id) {
                    gate.announce_backlog(*channel, backlog);
                }
                return Ok(true);
            }
            Incoming::Control(other) => {
                return Err(self.protocol(format!("unexpected message {other:?}")));
            }
        };
        let Some((channel, expected)) = inbound.channels.get_mut(&h.channel_id) else {
            return Err(self.protocol(format!("buffer for unknown channel {}", h.channel_id)));
        };
        if h.seq != *expected {
            return Err(self.protocol(format!(
                "channel {} expected buffer #{} but got #{}",
                h.channel_id, expected, h.seq
            )));
        }
        *expected = expected.wrapping_add(1);
        let channel = *channel;
        if h.kind == BufferKind::EndOfPartition {
            inbound.channels.remove(&h.channel_id);
        }
        let len = h.size as usize;
        let (mut segment, floating) = gate.take_segment(channel)?;
        let lost = |e: std::io::Error| self.lost(e);
        // As on the shared connection: an IPC payload into memory of its
        // own, which the decoded batch shares; events into the segment.
        let body = if h.kind == BufferKind::Ipc {
            Some(blocking(inbound.carry.read_owned(io, len)).map_err(lost)?)
        } else {
            blocking(
                inbound
                    .carry
                    .read_exact(io, &mut segment.as_mut_slice()[..len]),
            )
            .map_err(lost)?;
            None
        };
        super::tcp::deliver(gate, channel, &h, segment, floating, body)
            .map_err(|detail| self.protocol(detail))?;
        Ok(true)
    }
}

/// An input gate's task-read connections: what its `pop` drives when the
/// queue is empty.
pub struct TaskReadInput {
    links: Vec<Arc<GateLink>>,
    poller: Mutex<(Poll, Events)>,
    waker: Waker,
    segment_size: usize,
}

impl TaskReadInput {
    pub fn new(links: Vec<Arc<GateLink>>, segment_size: usize) -> std::io::Result<Arc<Self>> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKE)?;
        for (i, link) in links.iter().enumerate() {
            poll.registry().register(
                &mut SourceFd(&link.stream.as_raw_fd()),
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        Ok(Arc::new(Self {
            links,
            poller: Mutex::new((poll, Events::with_capacity(64))),
            waker,
            segment_size,
        }))
    }
}

impl GateDriver for TaskReadInput {
    fn drive(&self, gate: &InputGate, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut poller = lock(&self.poller);
        let (poll, events) = &mut *poller;
        loop {
            let mut frames = 0;
            for link in &self.links {
                let round = link
                    .flush()
                    .and_then(|()| link.receive(gate, poll, events, self.segment_size));
                match round {
                    Ok(n) => frames += n,
                    Err(e) => {
                        gate.fail(e);
                        return;
                    }
                }
            }
            let now = Instant::now();
            if frames > 0 || now >= deadline {
                return;
            }
            match poll.poll(events, Some(deadline - now)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    gate.fail(NetworkError::PeerLost {
                        peer: self
                            .links
                            .first()
                            .map_or_else(String::new, |l| l.peer.clone()),
                        reason: format!("waiting for the connection: {e}"),
                    });
                    return;
                }
            }
            if events.iter().any(|e| e.token() == WAKE) {
                return;
            }
        }
    }

    fn wake(&self) {
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow_array::{Int64Array, RecordBatch};

    use super::*;
    use crate::memory::NetworkBufferPool;
    use crate::network::frame::read_incoming;
    use crate::network::gate::{ChannelKind, GateBuffers, GateItem};
    use crate::network::{GateId, StreamEvent};

    const SEGMENT: usize = 4096;
    const BUFFERS: GateBuffers = GateBuffers {
        exclusive_per_channel: 2,
        floating_per_gate: 2,
        max_per_channel: 4,
    };

    /// A gate with a local channel and a remote one whose producer answers
    /// its partition request and then sends nothing: its task waits in the
    /// driver's poll.
    async fn waiting_gate() -> (Arc<InputGate>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let producer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            PeerAuth::loopback()
                .handshake(&mut s, Role::Server, Plane::Data, "test consumer")
                .await
                .unwrap();
            let request = read_incoming(&mut s, SEGMENT).await.unwrap();
            assert!(matches!(
                request,
                Some(Incoming::Control(ControlMessage::PartitionRequest {
                    initial_credit: 2,
                    ..
                }))
            ));
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let pool = NetworkBufferPool::new(16, SEGMENT);
        let id = GateId {
            job: 1,
            edge: 0,
            target_subtask: 0,
        };
        let gate = InputGate::new(
            id,
            &[ChannelKind::Local, ChannelKind::Remote],
            BUFFERS,
            &pool,
        )
        .unwrap();
        let link = connect(addr, "tm-7", &PeerAuth::loopback()).await.unwrap();
        let partition = PartitionId {
            job: 1,
            edge: 0,
            source_subtask: 0,
        };
        link.request_partition(&gate, 1, partition, 0).unwrap();
        gate.set_driver(TaskReadInput::new(vec![link], SEGMENT).unwrap());
        (gate, producer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_push_or_a_failure_ends_the_wait_in_the_driver() {
        let (gate, producer) = waiting_gate().await;
        let pusher = Arc::clone(&gate);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let column = Int64Array::from_iter_values(0..3);
            let batch = RecordBatch::try_from_iter([("v", Arc::new(column) as _)]).unwrap();
            pusher
                .push_local(0, StreamEvent::Batch(batch), &|| false)
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            pusher.fail(NetworkError::Canceled);
        });
        let waiting = Arc::clone(&gate);
        let (first, second) = tokio::task::spawn_blocking(move || {
            let first = waiting.pop(Duration::from_secs(20));
            let second = waiting.pop(Duration::from_secs(20));
            (first, second)
        })
        .await
        .unwrap();
        // Woken by the push, not by the 20 s timeout.
        assert!(matches!(first, Ok(Some((0, GateItem::Local(_))))));
        assert!(
            matches!(second, Err(NetworkError::Canceled)),
            "{:?}",
            second.err()
        );
        producer.abort();
    }
}
