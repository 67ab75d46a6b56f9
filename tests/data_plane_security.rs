//! The data plane under a cluster secret, from outside: consumers without the
//! secret or with a wrong one are refused while the real consumer is served;
//! a channel has one consumer; unknown executions are refused; the server
//! stays within its connection cap and drops garbage without buffering it;
//! the TaskManager refuses to expose its data port without a secret.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Int64Array, RecordBatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use strata::memory::NetworkBufferPool;
use strata::network::frame::{ControlMessage, encode_control};
use strata::network::gate::{ChannelKind, GateBuffers, InputEvent};
use strata::network::ipc::ChannelEncoder;
use strata::network::partition::{Partitioner, Target, WriterMetrics};
use strata::network::tcp::{ConnectionManager, DataServer, DataServerOptions};
use strata::network::{
    GateId, InputGate, InputReader, NetworkError, NetworkRegistry, PartitionId, RecordWriter,
    ResultPartition, Subpartition,
};
use strata::security::{self, ClusterSecret, PeerAuth, Plane, Role, SecurityError};

const SEGMENT: usize = 4096;
const BUFFERS: GateBuffers = GateBuffers {
    exclusive_per_channel: 2,
    floating_per_gate: 2,
    max_per_channel: 4,
};
const ROWS: i64 = 20_000;

fn secret() -> ClusterSecret {
    ClusterSecret::from_bytes(b"the-cluster-secret-of-this-test").unwrap()
}

fn auth(secret: Option<ClusterSecret>) -> PeerAuth {
    PeerAuth {
        secret,
        timeout: Duration::from_secs(10),
    }
}

fn partition(execution: u64) -> PartitionId {
    PartitionId {
        job: execution,
        edge: 0,
        source_subtask: 0,
    }
}

async fn server_with(options: DataServerOptions) -> (DataServer, Arc<NetworkRegistry>) {
    let registry = Arc::new(NetworkRegistry::default());
    let server = DataServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::clone(&registry),
        None,
        options,
    )
    .await
    .unwrap();
    (server, registry)
}

fn secured() -> DataServerOptions {
    DataServerOptions {
        auth: auth(Some(secret())),
        ..DataServerOptions::default()
    }
}

/// Registers `id` with one remote subpartition and returns the producer
/// thread that writes `ROWS` values into it, once `start` is called.
fn produce(registry: &NetworkRegistry, id: PartitionId) -> Arc<Subpartition> {
    let sub = Subpartition::new(BUFFERS.max_per_channel);
    registry.register_partition(Arc::new(ResultPartition {
        id,
        subpartitions: vec![Some(Arc::clone(&sub))],
    }));
    sub
}

fn write_rows(sub: Arc<Subpartition>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let pool = NetworkBufferPool::new(16, SEGMENT);
        let mut writer = RecordWriter::new(
            Partitioner::Forward,
            vec![Target::Remote {
                sub,
                encoder: Box::new(ChannelEncoder::new(
                    SEGMENT - strata::network::PAYLOAD_HEADROOM,
                )),
            }],
            128,
            pool,
            Arc::new(|| false),
            Arc::new(WriterMetrics::default()),
        );
        for start in (0..ROWS).step_by(1000) {
            let column = Int64Array::from_iter_values(start..start + 1000);
            let batch = RecordBatch::try_from_iter([("v", Arc::new(column) as _)]).unwrap();
            writer.emit(batch).unwrap();
        }
        writer.finish().unwrap();
    })
}

/// A consumer gate for `id` over `connections`; its reader drains it.
async fn consume(
    connections: &ConnectionManager,
    addr: SocketAddr,
    id: PartitionId,
) -> Result<InputReader, NetworkError> {
    let pool = NetworkBufferPool::new(16, SEGMENT);
    let gate_id = GateId {
        job: id.job,
        edge: id.edge,
        target_subtask: 0,
    };
    let gate = InputGate::new(gate_id, &[ChannelKind::Remote], BUFFERS, &pool)?;
    let conn = connections.connect(addr, "tm-producer", SEGMENT).await?;
    conn.request_partition(&gate, 0, id, 0)?;
    Ok(InputReader::new(vec![gate]))
}

async fn drain(reader: InputReader) -> Result<Vec<i64>, NetworkError> {
    tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let mut values = Vec::new();
        loop {
            match reader.next(Duration::from_secs(30))? {
                Some(InputEvent::Batch(b)) => values.extend(
                    b.column(0)
                        .as_primitive::<Int64Type>()
                        .values()
                        .iter()
                        .copied(),
                ),
                Some(InputEvent::End) => return Ok(values),
                Some(_) => {}
                None => panic!("no progress for 30 s"),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_without_the_secret_are_refused_and_the_real_one_is_served() {
    let (server, registry) = server_with(secured()).await;
    let addr = server.local_addr;
    let sub = produce(&registry, partition(1));

    let without = ConnectionManager::new(None, auth(None));
    let err = consume(&without, addr, partition(1)).await.err().unwrap();
    assert!(
        err.to_string().contains("requires a cluster secret"),
        "{err}"
    );
    let wrong = ClusterSecret::from_bytes(b"not-the-cluster-secret-at-all").unwrap();
    let wrong_manager = ConnectionManager::new(None, auth(Some(wrong.clone())));
    let err = consume(&wrong_manager, addr, partition(1))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("different cluster secrets"),
        "{err}"
    );
    let err = strata::network::taskread::connect(addr, "tm-producer", &auth(Some(wrong)))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("different cluster secrets"),
        "{err}"
    );

    let real = ConnectionManager::new(None, auth(Some(secret())));
    let reader = consume(&real, addr, partition(1)).await.unwrap();
    let producer = write_rows(sub);
    let values = drain(reader).await.unwrap();
    producer.join().unwrap();
    assert_eq!(values, (0..ROWS).collect::<Vec<_>>());
    // The refused clients saw their failure on their own: the server's
    // count may come a moment later.
    while server.stats().handshakes_failed < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = server.stats();
    assert_eq!(stats.handshakes_failed, 3, "{stats:?}");
    assert_eq!(stats.requests_served, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_of_a_channel_is_refused_while_the_first_reads_it() {
    let (server, registry) = server_with(secured()).await;
    let addr = server.local_addr;
    let sub = produce(&registry, partition(2));
    let first = ConnectionManager::new(None, auth(Some(secret())));
    let reader = consume(&first, addr, partition(2)).await.unwrap();
    while server.stats().requests_served == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Another TaskManager (its own connection) asks for the same channel.
    let second = ConnectionManager::new(None, auth(Some(secret())));
    let intruder = consume(&second, addr, partition(2)).await.unwrap();
    let err = drain(intruder).await.unwrap_err();
    assert!(err.to_string().contains("already has a consumer"), "{err}");
    // The first consumer still gets everything.
    let producer = write_rows(sub);
    assert_eq!(drain(reader).await.unwrap(), (0..ROWS).collect::<Vec<_>>());
    producer.join().unwrap();
    assert_eq!(server.stats().requests_refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_an_unknown_or_released_execution_is_refused() {
    let options = DataServerOptions {
        partition_wait: Duration::from_millis(200),
        ..secured()
    };
    let (server, registry) = server_with(options).await;
    let consumer = ConnectionManager::new(None, auth(Some(secret())));
    let reader = consume(&consumer, server.local_addr, partition(404))
        .await
        .unwrap();
    let err = drain(reader).await.unwrap_err();
    assert!(
        err.to_string().contains("execution 404 is unknown"),
        "{err}"
    );

    produce(&registry, partition(5));
    registry.release_job(5, "job finished");
    let reader = consume(&consumer, server.local_addr, partition(5))
        .await
        .unwrap();
    let err = drain(reader).await.unwrap_err();
    assert!(
        err.to_string().contains("execution 5 was released"),
        "{err}"
    );
    assert_eq!(server.stats().requests_refused, 2);
}

/// Reads until the server closes `s`; fails if it neither closes nor answers
/// within 10 s.
/// A data connection to `addr` that completed the handshake with the
/// cluster's secret.
async fn authenticated(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    security::handshake(
        &mut s,
        Some(&secret()),
        Role::Client,
        Plane::Data,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    s
}

async fn closed_by_server(s: &mut TcpStream) -> usize {
    let mut buf = [0u8; 256];
    let mut read = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open"),
            Ok(Ok(0)) | Ok(Err(_)) => return read,
            Ok(Ok(n)) => read += n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_accept_and_the_server_keeps_serving() {
    const CAP: usize = 4;
    const BEYOND: u64 = 2000;
    let options = DataServerOptions {
        connections_max: CAP,
        auth: PeerAuth {
            secret: Some(secret()),
            timeout: Duration::from_secs(120),
        },
        ..DataServerOptions::default()
    };
    let (server, registry) = server_with(options).await;
    let addr = server.local_addr;
    // CAP connections that never say a word hold every place.
    let mut holders = Vec::new();
    for _ in 0..CAP {
        holders.push(TcpStream::connect(addr).await.unwrap());
    }
    while server.stats().connections_active < CAP as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    for _ in 0..BEYOND {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Closed without a byte of the handshake.
        assert_eq!(closed_by_server(&mut s).await, 0);
    }
    let elapsed = started.elapsed();
    let stats = server.stats();
    assert_eq!(stats.connections_refused_at_cap, BEYOND, "{stats:?}");
    assert_eq!(stats.connections_active_peak, CAP as u64, "{stats:?}");
    assert_eq!(stats.connections_active, CAP as u64, "{stats:?}");
    // One warning line per 10 s, not one per connection.
    let warnings_max = 1 + elapsed.as_secs() / 10 + 1;
    assert!(
        (1..=warnings_max).contains(&stats.cap_warnings_logged),
        "{stats:?} in {elapsed:?}"
    );
    // The holders leave; a real consumer gets its data.
    drop(holders);
    while server.stats().connections_active > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sub = produce(&registry, partition(3));
    let consumer = ConnectionManager::new(None, auth(Some(secret())));
    let reader = consume(&consumer, addr, partition(3)).await.unwrap();
    let producer = write_rows(sub);
    assert_eq!(drain(reader).await.unwrap(), (0..ROWS).collect::<Vec<_>>());
    producer.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_half_written_oversize_frame_are_dropped_without_buffering() {
    let (server, registry) = server_with(secured()).await;
    let addr = server.local_addr;
    // Garbage instead of a hello: closed after its first bytes, though
    // much more is on its way.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&vec![0x5a; 1 << 20]).await;
    closed_by_server(&mut s).await;

    // Authenticated, then the head of a 1 GiB error frame and 100 bytes of
    // it, the rest never sent: refused at the head, not awaited or buffered.
    for id in [1u8, 0u8] {
        let mut s = authenticated(addr).await;
        let mut head = Vec::new();
        head.extend_from_slice(&(1u32 << 30).to_be_bytes());
        head.extend_from_slice(&0xBADC_0FFEu32.to_be_bytes());
        head.push(id);
        head.extend_from_slice(&[0u8; 100]);
        s.write_all(&head).await.unwrap();
        closed_by_server(&mut s).await;
    }
    // Legal frame heads, but the body of an error frame longer than any
    // allowed: the same.
    let mut s = authenticated(addr).await;
    let mut error = Vec::new();
    encode_control(
        &ControlMessage::Error {
            channel_id: 0,
            message: "x".repeat(100),
        },
        &mut error,
    );
    error[..4].copy_from_slice(&(64u32 << 20).to_be_bytes());
    s.write_all(&error).await.unwrap();
    closed_by_server(&mut s).await;

    let stats = server.stats();
    assert_eq!(stats.handshakes_failed, 1, "{stats:?}");
    assert_eq!(stats.protocol_errors, 3, "{stats:?}");
    // And it still serves.
    let sub = produce(&registry, partition(6));
    let consumer = ConnectionManager::new(None, auth(Some(secret())));
    let reader = consume(&consumer, addr, partition(6)).await.unwrap();
    let producer = write_rows(sub);
    assert_eq!(drain(reader).await.unwrap(), (0..ROWS).collect::<Vec<_>>());
    producer.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_server_beyond_loopback_needs_a_secret() {
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let registry = Arc::new(NetworkRegistry::default());
    let err = DataServer::start(
        any,
        Arc::clone(&registry),
        None,
        DataServerOptions::default(),
    )
    .await
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("taskmanager.host") && text.contains("0.0.0.0"),
        "{text}"
    );
    assert!(matches!(
        err,
        strata::network::tcp::DataServerError::Insecure(SecurityError::InsecureBind { .. })
    ));
    DataServer::start(any, registry, None, secured())
        .await
        .unwrap();
}

#[test]
fn the_taskmanager_refuses_a_public_data_port_without_a_secret_and_config_hides_the_secret() {
    let mut command = common::strata_command();
    command.args(["taskmanager", "--jobmanager", "127.0.0.1:1"]);
    for setting in common::SMALL_MEMORY {
        command.args(["-D", setting]);
    }
    let output = command
        .args(["-D", "taskmanager.host=0.0.0.0"])
        .env_remove(security::SECRET_ENV)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0") && stderr.contains("taskmanager.host"),
        "{stderr}"
    );

    let output = common::strata_command()
        .args([
            "config",
            "-D",
            "security.auth.secret=do-not-print-this-secret",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("do-not-print-this-secret"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
}
