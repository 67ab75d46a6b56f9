//! `strata bench --serve [--listen ADDR]`: the far end of the network
//! section, and the client that drives it.
//!
//! The protocol is one JSON line per control connection, then the transfer:
//!
//! - `{"kind":"raw","bytes":N,"message_bytes":M}`: the client writes N
//!   bytes in M-byte writes on the same socket; the server reads them all
//!   and answers `{"received":N}`. The client's clock runs from its first
//!   write to that answer.
//! - `{"kind":"shuffle","bytes":N,"batch_rows":R}`: the server starts a
//!   data server (strata's, with the cluster secret when one is
//!   configured) beside its listener, registers one result partition and
//!   answers `{"data_port":P}`; the client connects to it as a TaskManager's
//!   input gate does and requests the partition; the server's producer
//!   writes N bytes of Arrow batches of R rows into it under credit-based
//!   flow control, then answers `{"payload_bytes":B}` (IPC bytes sent).
//!   The server keeps the data server until the client closes the control
//!   connection.
//! - `{"kind":"stop"}`: ends an in-process server (loopback runs); a
//!   `--serve` process refuses it.
//!
//! Limits: one client at a time (the bench is a measurement, not a
//! service); a request line of at most [`REQUEST_BYTES_MAX`], transfers of
//! at most [`TRANSFER_BYTES_MAX`], messages of at most
//! [`MESSAGE_BYTES_MAX`]; every socket read and write has
//! [`IO_TIMEOUT`]. A failed request is logged and answered with
//! `{"error":...}`; the server goes on with the next client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Int64Array, RecordBatch};
use serde::{Deserialize, Serialize};

use super::BenchError;
use crate::config::Config;
use crate::memory::NetworkBufferPool;
use crate::network::gate::{ChannelKind, GateBuffers, InputEvent};
use crate::network::ipc::ChannelEncoder;
use crate::network::partition::{Partitioner, Target, WriterMetrics};
use crate::network::taskread::{GateLink, TaskReadInput};
use crate::network::tcp::{DataServer, DataServerOptions};
use crate::network::{
    GateId, InputGate, InputReader, NetworkRegistry, PAYLOAD_HEADROOM, PartitionId, RecordWriter,
    ResultPartition, Subpartition,
};
use crate::security::{self, PeerAuth, Plane, Role};

pub const REQUEST_BYTES_MAX: usize = 4096;
pub const TRANSFER_BYTES_MAX: u64 = 64 << 30;
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
pub const BATCH_ROWS_MAX: usize = 1 << 20;
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The default `--listen` address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7790";
/// Segments in each end's network buffer pool.
const POOL_SEGMENTS: usize = 2048;
/// Int64 columns per shuffled batch.
const SHUFFLE_COLUMNS: usize = 4;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    Raw { bytes: u64, message_bytes: usize },
    Shuffle { bytes: u64, batch_rows: usize },
    Stop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Received(u64),
    DataPort(u16),
    PayloadBytes(u64),
    Error(String),
}

/// How the server's data plane is set up.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: String,
    pub auth: PeerAuth,
    /// `--serve` refuses `stop`; the in-process loopback server obeys it.
    pub stoppable: bool,
}

pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    auth: PeerAuth,
    stoppable: bool,
}

impl Server {
    pub fn bind(options: ServeOptions) -> Result<Self, BenchError> {
        let error = |source| BenchError::Serve {
            address: options.listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&options.listen).map_err(error)?;
        let local_addr = listener.local_addr().map_err(error)?;
        Ok(Server {
            listener,
            local_addr,
            auth: options.auth,
            stoppable: options.stoppable,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves clients one at a time until a `stop` request (stoppable
    /// servers only) or an accept error.
    pub fn serve(self) -> Result<(), BenchError> {
        loop {
            let (stream, peer) = self.listener.accept().map_err(|source| BenchError::Serve {
                address: self.local_addr.to_string(),
                source,
            })?;
            match self.handle(stream, peer) {
                Ok(Handled::Continue) => {}
                Ok(Handled::Stop) => return Ok(()),
                Err(e) => tracing::warn!("bench client {peer}: {e}"),
            }
        }
    }

    fn handle(&self, stream: TcpStream, peer: SocketAddr) -> Result<Handled, BenchError> {
        let io = |what| {
            move |source| BenchError::Peer {
                peer: peer.to_string(),
                what,
                source,
            }
        };
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(io("setting a timeout"))?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(io("setting a timeout"))?;
        let _ = stream.set_nodelay(true);
        let mut reader =
            BufReader::with_capacity(1 << 20, stream.try_clone().map_err(io("clone"))?);
        let mut writer = stream;
        let request = read_line::<Request>(&mut reader, &peer.to_string())?;
        let outcome = match request {
            Request::Stop if self.stoppable => return Ok(Handled::Stop),
            Request::Stop => Err(BenchError::PeerProtocol {
                peer: peer.to_string(),
                detail: "a `strata bench --serve` does not stop on request".into(),
            }),
            Request::Raw {
                bytes,
                message_bytes,
            } => check_sizes(bytes, message_bytes, &peer)
                .and_then(|()| sink_raw(&mut reader, bytes, message_bytes, &peer))
                .map(Some),
            Request::Shuffle { bytes, batch_rows } => check_sizes(bytes, batch_rows, &peer)
                .and_then(|()| {
                    self.produce_shuffle(&mut reader, &mut writer, bytes, batch_rows, &peer)
                }),
        };
        match outcome {
            Ok(Some(reply)) => write_line(&mut writer, &reply, &peer.to_string())?,
            Ok(None) => {}
            Err(e) => {
                let _ = write_line(&mut writer, &Reply::Error(e.to_string()), &peer.to_string());
                return Err(e);
            }
        }
        Ok(Handled::Continue)
    }

    /// Starts a data server, tells the client its port, produces the
    /// batches and waits for the client to close the control connection.
    /// Answers on `writer` itself, so it returns no reply.
    fn produce_shuffle(
        &self,
        reader: &mut BufReader<TcpStream>,
        writer: &mut TcpStream,
        bytes: u64,
        batch_rows: usize,
        peer: &SocketAddr,
    ) -> Result<Option<Reply>, BenchError> {
        let fail = |detail: String| BenchError::Shuffle {
            peer: peer.to_string(),
            detail,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting the data server's runtime: {e}")))?;
        let segment = segment_bytes();
        let registry = Arc::new(NetworkRegistry::default());
        let server = runtime
            .block_on(DataServer::start(
                SocketAddr::new(self.local_addr.ip(), 0),
                Arc::clone(&registry),
                None,
                DataServerOptions {
                    auth: self.auth.clone(),
                    ..DataServerOptions::default()
                },
            ))
            .map_err(|e| fail(format!("data server: {e}")))?;
        let buffers = GateBuffers::from(&Config::default());
        let sub = Subpartition::new(buffers.max_per_channel);
        registry.register_partition(Arc::new(ResultPartition {
            id: PARTITION,
            subpartitions: vec![Some(Arc::clone(&sub))],
        }));
        write_line(
            writer,
            &Reply::DataPort(server.local_addr.port()),
            &peer.to_string(),
        )?;
        let batch = shuffle_batch(batch_rows);
        let batches = bytes.div_ceil(batch_bytes(&batch)).max(1);
        let metrics = Arc::new(WriterMetrics::default());
        let target = Target::Remote {
            sub,
            encoder: Box::new(ChannelEncoder::new(segment - PAYLOAD_HEADROOM)),
        };
        let mut record_writer = RecordWriter::new(
            Partitioner::Forward,
            vec![target],
            128,
            NetworkBufferPool::new(POOL_SEGMENTS, segment),
            Arc::new(|| false),
            Arc::clone(&metrics),
        );
        for _ in 0..batches {
            record_writer
                .emit(batch.clone())
                .map_err(|e| fail(format!("producing: {e}")))?;
        }
        record_writer
            .finish()
            .map_err(|e| fail(format!("finishing: {e}")))?;
        let payload = metrics
            .remote_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        write_line(writer, &Reply::PayloadBytes(payload), &peer.to_string())?;
        // Keep the data server until the client has drained and hung up.
        let mut rest = Vec::new();
        let _ = reader.take(REQUEST_BYTES_MAX as u64).read_to_end(&mut rest);
        runtime.shutdown_timeout(Duration::from_secs(1));
        Ok(None)
    }
}

enum Handled {
    Continue,
    Stop,
}

const PARTITION: PartitionId = PartitionId {
    job: 1,
    edge: 0,
    source_subtask: 0,
};

fn segment_bytes() -> usize {
    Config::default().segment_size_bytes as usize
}

fn check_sizes(bytes: u64, per_message: usize, peer: &SocketAddr) -> Result<(), BenchError> {
    if bytes == 0
        || bytes > TRANSFER_BYTES_MAX
        || per_message == 0
        || per_message > MESSAGE_BYTES_MAX
    {
        return Err(BenchError::PeerProtocol {
            peer: peer.to_string(),
            detail: format!(
                "request of {bytes} bytes in pieces of {per_message}: the limits are \
                 1..={TRANSFER_BYTES_MAX} bytes and 1..={MESSAGE_BYTES_MAX} per piece"
            ),
        });
    }
    Ok(())
}

fn sink_raw(
    reader: &mut BufReader<TcpStream>,
    bytes: u64,
    message_bytes: usize,
    peer: &SocketAddr,
) -> Result<Reply, BenchError> {
    let mut buffer = vec![0u8; message_bytes.min(MESSAGE_BYTES_MAX)];
    let mut received = 0u64;
    while received < bytes {
        let want = (bytes - received).min(buffer.len() as u64) as usize;
        let n = reader
            .read(&mut buffer[..want])
            .map_err(|source| BenchError::Peer {
                peer: peer.to_string(),
                what: "reading the raw stream",
                source,
            })?;
        if n == 0 {
            return Err(BenchError::PeerProtocol {
                peer: peer.to_string(),
                detail: format!("raw stream closed after {received} of {bytes} bytes"),
            });
        }
        received += n as u64;
    }
    Ok(Reply::Received(received))
}

fn read_line<T: serde::de::DeserializeOwned>(
    reader: &mut BufReader<TcpStream>,
    peer: &str,
) -> Result<T, BenchError> {
    let mut line = String::new();
    reader
        .by_ref()
        .take(REQUEST_BYTES_MAX as u64)
        .read_line(&mut line)
        .map_err(|source| BenchError::Peer {
            peer: peer.to_owned(),
            what: "reading a control line",
            source,
        })?;
    if !line.ends_with('\n') {
        return Err(BenchError::PeerProtocol {
            peer: peer.to_owned(),
            detail: format!(
                "expected one JSON line of at most {REQUEST_BYTES_MAX} bytes, got {} bytes \
                 (is this a `strata bench --serve`?)",
                line.len()
            ),
        });
    }
    serde_json::from_str(&line).map_err(|e| BenchError::PeerProtocol {
        peer: peer.to_owned(),
        detail: format!("unreadable control line {:?}: {e}", line.trim_end()),
    })
}

fn write_line<T: Serialize>(
    writer: &mut TcpStream,
    value: &T,
    peer: &str,
) -> Result<(), BenchError> {
    let mut line = serde_json::to_string(value).expect("control messages serialize");
    line.push('\n');
    writer
        .write_all(line.as_bytes())
        .map_err(|source| BenchError::Peer {
            peer: peer.to_owned(),
            what: "writing a control line",
            source,
        })
}

/// A batch of `rows` rows of [`SHUFFLE_COLUMNS`] Int64 columns.
pub fn shuffle_batch(rows: usize) -> RecordBatch {
    let rows = rows.clamp(1, BATCH_ROWS_MAX) as i64;
    let column = |k: i64| Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i * k))) as _;
    RecordBatch::try_from_iter(
        ["a", "b", "c", "d"]
            .into_iter()
            .zip([1, 3, 7, 11])
            .map(|(name, k)| (name, column(k))),
    )
    .expect("four Int64 columns")
}

/// Rows per batch so that a batch holds about `message_bytes` bytes.
pub fn rows_for_message(message_bytes: usize) -> usize {
    (message_bytes / (8 * SHUFFLE_COLUMNS)).clamp(1, BATCH_ROWS_MAX)
}

pub fn batch_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| c.get_buffer_memory_size() as u64)
        .sum()
}

/// The client side, driving a server at `peer`.
pub struct Client {
    pub peer: String,
    address: SocketAddr,
}

impl Client {
    pub fn new(peer: &str) -> Result<Self, BenchError> {
        let address = peer
            .to_socket_addrs()
            .map_err(|source| BenchError::Peer {
                peer: peer.to_owned(),
                what: "resolving the address",
                source,
            })?
            .next()
            .ok_or_else(|| BenchError::PeerProtocol {
                peer: peer.to_owned(),
                detail: "the address resolves to nothing".into(),
            })?;
        Ok(Client {
            peer: peer.to_owned(),
            address,
        })
    }

    fn connect(&self, request: &Request) -> Result<(BufReader<TcpStream>, TcpStream), BenchError> {
        let io = |what| {
            move |source| BenchError::Peer {
                peer: self.peer.clone(),
                what,
                source,
            }
        };
        let stream = TcpStream::connect_timeout(&self.address, IO_TIMEOUT)
            .map_err(io("connecting (is `strata bench --serve` running there?)"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(io("setting a timeout"))?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(io("setting a timeout"))?;
        let _ = stream.set_nodelay(true);
        let reader = BufReader::new(stream.try_clone().map_err(io("clone"))?);
        let mut writer = stream;
        write_line(&mut writer, request, &self.peer)?;
        Ok((reader, writer))
    }

    fn expect_reply(&self, reader: &mut BufReader<TcpStream>) -> Result<Reply, BenchError> {
        match read_line::<Reply>(reader, &self.peer)? {
            Reply::Error(detail) => Err(BenchError::PeerProtocol {
                peer: self.peer.clone(),
                detail: format!("the server refused: {detail}"),
            }),
            reply => Ok(reply),
        }
    }

    /// Seconds to write `bytes` in `message_bytes` writes and hear that
    /// the server read them all.
    pub fn raw(&self, bytes: u64, message_bytes: usize) -> Result<f64, BenchError> {
        let message_bytes = message_bytes.clamp(1, MESSAGE_BYTES_MAX);
        let (mut reader, mut writer) = self.connect(&Request::Raw {
            bytes,
            message_bytes,
        })?;
        let message = vec![0x5au8; message_bytes];
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(message_bytes as u64) as usize;
            writer
                .write_all(&message[..n])
                .map_err(|source| BenchError::Peer {
                    peer: self.peer.clone(),
                    what: "writing the raw stream",
                    source,
                })?;
            sent += n as u64;
        }
        match self.expect_reply(&mut reader)? {
            Reply::Received(n) if n == bytes => Ok(started.elapsed().as_secs_f64()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Pulls `bytes` of batches of `batch_rows` rows from the server's
    /// producer through strata's TCP data plane: (IPC payload bytes,
    /// seconds from the partition request to the end of input).
    pub fn shuffle(
        &self,
        bytes: u64,
        batch_rows: usize,
        auth: &PeerAuth,
    ) -> Result<(u64, f64), BenchError> {
        let fail = |detail: String| BenchError::Shuffle {
            peer: self.peer.clone(),
            detail,
        };
        let (mut reader, writer) = self.connect(&Request::Shuffle { bytes, batch_rows })?;
        let port = match self.expect_reply(&mut reader)? {
            Reply::DataPort(port) => port,
            other => return Err(self.unexpected(&other)),
        };
        let data_address = SocketAddr::new(self.address.ip(), port);
        let segment = segment_bytes();
        let buffers = GateBuffers::from(&Config::default());
        let pool = NetworkBufferPool::new(POOL_SEGMENTS, segment);
        let id = GateId {
            job: 1,
            edge: 0,
            target_subtask: 0,
        };
        let gate = InputGate::new(id, &[ChannelKind::Remote], buffers, &pool)
            .map_err(|e| fail(format!("input gate: {e}")))?;
        let mut stream = TcpStream::connect_timeout(&data_address, IO_TIMEOUT)
            .map_err(|e| fail(format!("connecting to the data server {data_address}: {e}")))?;
        security::handshake_blocking(
            &mut stream,
            auth.secret.as_ref(),
            Role::Client,
            Plane::Data,
            auth.timeout,
        )
        .map_err(|e| fail(format!("handshake with {data_address}: {e}")))?;
        let link = GateLink::new(stream, format!("bench-peer {}", self.peer))
            .map_err(|e| fail(format!("link: {e}")))?;
        let started = Instant::now();
        link.request_partition(&gate, 0, PARTITION, 0)
            .map_err(|e| fail(format!("partition request: {e}")))?;
        gate.set_driver(
            TaskReadInput::new(vec![link], segment).map_err(|e| fail(format!("poller: {e}")))?,
        );
        let rows = drain(InputReader::new(vec![gate])).map_err(fail)?;
        let seconds = started.elapsed().as_secs_f64();
        let payload = match self.expect_reply(&mut reader)? {
            Reply::PayloadBytes(n) => n,
            other => return Err(self.unexpected(&other)),
        };
        let batch = shuffle_batch(batch_rows);
        let expected = bytes.div_ceil(batch_bytes(&batch)).max(1) * batch.num_rows() as u64;
        if rows != expected {
            return Err(fail(format!("received {rows} rows, expected {expected}")));
        }
        drop(writer);
        Ok((payload, seconds))
    }

    /// Ends an in-process server.
    pub fn stop(&self) -> Result<(), BenchError> {
        let (_reader, _writer) = self.connect(&Request::Stop)?;
        Ok(())
    }

    fn unexpected(&self, reply: &Reply) -> BenchError {
        BenchError::PeerProtocol {
            peer: self.peer.clone(),
            detail: format!("unexpected answer {reply:?}"),
        }
    }
}

/// Rows until the end of input; an error names what stopped it.
fn drain(mut reader: InputReader) -> Result<u64, String> {
    let mut rows = 0u64;
    loop {
        match reader.next(IO_TIMEOUT) {
            Ok(Some(InputEvent::Batch(b))) => rows += b.num_rows() as u64,
            Ok(Some(InputEvent::End)) => return Ok(rows),
            Ok(Some(InputEvent::Watermark(_) | InputEvent::Barrier(_))) => {}
            Ok(None) => return Err(format!("no data for {IO_TIMEOUT:?} after {rows} rows")),
            Err(e) => return Err(format!("consumer failed after {rows} rows: {e}")),
        }
    }
}

/// An in-process server on loopback, ended by [`LoopbackServer::stop`].
pub struct LoopbackServer {
    pub address: SocketAddr,
    thread: Option<std::thread::JoinHandle<Result<(), BenchError>>>,
}

impl LoopbackServer {
    pub fn start(ip: IpAddr) -> Result<Self, BenchError> {
        let server = Server::bind(ServeOptions {
            listen: SocketAddr::new(ip, 0).to_string(),
            auth: PeerAuth::loopback(),
            stoppable: true,
        })?;
        let address = server.local_addr();
        let thread = std::thread::Builder::new()
            .name("bench-serve".into())
            .spawn(move || server.serve())
            .map_err(|source| BenchError::Serve {
                address: address.to_string(),
                source,
            })?;
        Ok(LoopbackServer {
            address,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) -> Result<(), BenchError> {
        Client::new(&self.address.to_string())?.stop()?;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => Err(BenchError::PeerProtocol {
                peer: self.address.to_string(),
                detail: "the in-process bench server panicked".into(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_shuffle_requests_move_every_byte_over_loopback() {
        let server = LoopbackServer::start(IpAddr::from([127, 0, 0, 1])).unwrap();
        let client = Client::new(&server.address.to_string()).unwrap();
        let seconds = client.raw(3 << 20, 64 << 10).unwrap();
        assert!(seconds > 0.0);
        let (payload, seconds) = client
            .shuffle(2 << 20, 2048, &PeerAuth::loopback())
            .unwrap();
        assert!(payload >= 2 << 20, "{payload}");
        assert!(seconds > 0.0);
        server.stop().unwrap();
    }

    #[test]
    fn requests_past_the_limits_are_refused_with_the_reason() {
        let server = LoopbackServer::start(IpAddr::from([127, 0, 0, 1])).unwrap();
        let client = Client::new(&server.address.to_string()).unwrap();
        // The request alone: the server answers before any byte is sent.
        let (mut reader, _writer) = client
            .connect(&Request::Raw {
                bytes: TRANSFER_BYTES_MAX + 1,
                message_bytes: 4096,
            })
            .unwrap();
        let error = client.expect_reply(&mut reader).unwrap_err();
        assert!(error.to_string().contains("limits"), "{error}");
        server.stop().unwrap();
    }

    #[test]
    fn a_client_without_a_server_names_the_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let error = Client::new(&address).unwrap().raw(1, 1).unwrap_err();
        assert!(error.to_string().contains(&address), "{error}");
    }

    #[test]
    fn messages_round_trip_as_one_json_line() {
        let text = serde_json::to_string(&Request::Raw {
            bytes: 5,
            message_bytes: 1,
        })
        .unwrap();
        assert_eq!(text, r#"{"kind":"raw","bytes":5,"message_bytes":1}"#);
        assert_eq!(rows_for_message(64 << 10), 2048);
    }
}
