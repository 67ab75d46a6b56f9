//! Shuffle throughput: moves `--size` bytes of Arrow batches from a producer
//! to a consumer through strata's exchange, over each transport, and a
//! memcpy of the same bytes, then prints GB/s (10^9 bytes per second) per
//! line. `scripts/bench_shuffle.sh` runs it beside iperf3.
//!
//!   cargo run --release --example shuffle_bench -- [--size 2G] [--segment 64K]
//!       [--only NAME] [--checksum] [--workers N] [--shared-runtime]
//!       [--shared-connection]
//!
//! Segment size and buffer counts are strata's defaults
//! (`taskmanager.memory.segment-size` 64 KiB; 2 exclusive buffers per
//! channel, 8 floating per gate, 10 queued per subpartition, as Flink has);
//! `--segment 32K` gives Flink's segment size.
//!
//! `--checksum` turns on the per-buffer CRC-32C
//! (`taskmanager.network.checksum.enabled`) for the remote transports. Each
//! of the two TaskManagers has its own tokio runtime of `--workers` threads
//! (2, as `strata taskmanager` has), as two processes would;
//! `--shared-runtime` gives them one, which saves cross-thread wake-ups and
//! flatters the numbers. Over TCP the consumer's gate reads its own
//! connection on its task thread, as `taskmanager.network.tcp.task-reads`
//! (default `true`) has it; `--shared-connection` makes it Flink's shared
//! connection read by the consumer's network runtime instead.
//!
//! - `memcpy`: one thread copying the bytes between two pre-touched buffers.
//! - `local`: a local channel (producer and consumer tasks in one
//!   TaskManager: batches are handed over, not copied).
//! - `tcp`: two TaskManagers' data planes on loopback (own runtimes, own
//!   buffer pools, a data server and a connection), credit-based flow
//!   control, IPC encode and decode (and a CRC per buffer with
//!   `--checksum`). The bench's consumer task is its main thread.
//! - `rdma-emulated`: the verbs protocol over emulated verbs, both ends in
//!   one process (RDMA writes are memory copies).
//! - `rdma-emulated-link`: the same over the emulation's TCP link, as
//!   between two processes.
//!
//! Bytes counted are Arrow IPC payload bytes on the wire (for `local`, the
//! batches' buffer bytes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Int64Array, RecordBatch};
use strata::config::Config;
use strata::memory::NetworkBufferPool;
use strata::network::gate::{ChannelKind, GateBuffers, InputEvent};
use strata::network::ipc::ChannelEncoder;
use strata::network::partition::{Partitioner, Target, WriterMetrics};
use strata::network::rdma::VerbsEnv;
use strata::network::taskread::{GateLink, TaskReadInput};
use strata::network::tcp::{ConnectionManager, DataServer, DataServerOptions};
use strata::network::verbs::emu::EmuDevice;
use strata::network::{
    GateId, InputGate, InputReader, NetworkRegistry, PAYLOAD_HEADROOM, PartitionId, RecordWriter,
    ResultPartition, Subpartition,
};
use strata::security::{self, PeerAuth, Plane, Role};

/// As the `strata` binary has (see `src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROWS_PER_BATCH: usize = 8192;
const POOL_SEGMENTS: usize = 2048;
/// strata's defaults (`taskmanager.network.memory.*`).
static BUFFERS: std::sync::LazyLock<GateBuffers> =
    std::sync::LazyLock::new(|| GateBuffers::from(&Config::default()));

fn parse_bytes(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {text}"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("unknown unit in {text}")),
    };
    Ok(n << shift)
}

fn batch() -> RecordBatch {
    let column = |k: i64| Int64Array::from_iter_values((0..ROWS_PER_BATCH as i64).map(|i| i * k));
    RecordBatch::try_from_iter([
        ("a", Arc::new(column(1)) as _),
        ("b", Arc::new(column(3)) as _),
        ("c", Arc::new(column(7)) as _),
        ("d", Arc::new(column(11)) as _),
    ])
    .expect("batch")
}

fn batch_bytes(b: &RecordBatch) -> u64 {
    b.columns()
        .iter()
        .map(|c| c.get_buffer_memory_size() as u64)
        .sum()
}

fn report(name: &str, bytes: u64, elapsed: Duration) -> f64 {
    let gbps = bytes as f64 / elapsed.as_secs_f64() / 1e9;
    println!(
        "{name:<20} {gbps:8.3} GB/s  ({bytes} bytes in {:.3} s)",
        elapsed.as_secs_f64()
    );
    gbps
}

fn memcpy(size: u64) {
    let chunk = 64 << 20;
    let src = vec![1u8; chunk];
    let mut dst = vec![0u8; chunk];
    dst.copy_from_slice(&src); // touch
    let rounds = size.div_ceil(chunk as u64);
    let start = Instant::now();
    for _ in 0..rounds {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    report("memcpy", rounds * chunk as u64, start.elapsed());
}

fn drain(mut reader: InputReader) -> u64 {
    let mut rows = 0u64;
    loop {
        match reader.next(Duration::from_secs(30)) {
            Ok(Some(InputEvent::Batch(b))) => rows += b.num_rows() as u64,
            Ok(Some(InputEvent::End)) => return rows,
            Ok(Some(InputEvent::Watermark(_) | InputEvent::Barrier(_))) => {}
            Ok(None) => panic!("no progress for 30 s"),
            Err(e) => panic!("consumer failed: {e}"),
        }
    }
}

fn writer(
    target: Target,
    pool: Arc<NetworkBufferPool>,
    metrics: Arc<WriterMetrics>,
) -> RecordWriter {
    RecordWriter::new(
        Partitioner::Forward,
        vec![target],
        128,
        pool,
        Arc::new(|| false),
        metrics,
    )
}

fn local(size: u64, segment: usize) {
    let pool = NetworkBufferPool::new(POOL_SEGMENTS, segment);
    let id = GateId {
        job: 1,
        edge: 0,
        target_subtask: 0,
    };
    let gate = InputGate::new(id, &[ChannelKind::Local], *BUFFERS, &pool).expect("gate");
    let b = batch();
    let per_batch = batch_bytes(&b);
    let batches = size.div_ceil(per_batch);
    let reader = InputReader::new(vec![Arc::clone(&gate)]);
    let consumer = std::thread::spawn(move || drain(reader));
    let start = Instant::now();
    let mut w = writer(
        Target::Local { gate, channel: 0 },
        pool,
        Arc::new(WriterMetrics::default()),
    );
    for _ in 0..batches {
        w.emit(b.clone()).expect("emit");
    }
    w.finish().expect("finish");
    consumer.join().expect("consumer");
    report("local", batches * per_batch, start.elapsed());
}

#[derive(Clone, Copy, PartialEq)]
enum Remote {
    Tcp,
    Verbs,
    VerbsLink,
}

fn env(mode: Remote, pool: &Arc<NetworkBufferPool>) -> Option<Arc<VerbsEnv>> {
    let device = match mode {
        Remote::Tcp => return None,
        Remote::Verbs => EmuDevice::open("127.0.0.1"),
        Remote::VerbsLink => EmuDevice::open_isolated("127.0.0.1"),
    }
    .expect("emulated device");
    Some(VerbsEnv::new(device, pool).expect("registration"))
}

#[derive(Clone, Copy)]
struct RemoteOptions {
    checksum: bool,
    workers: usize,
    shared_runtime: bool,
    task_reads: bool,
}

fn remote(name: &str, mode: Remote, size: u64, segment: usize, options: &RemoteOptions) {
    let RemoteOptions {
        checksum,
        workers,
        shared_runtime,
        task_reads,
    } = *options;
    // Each TaskManager has its own runtime, as its own process would
    // (`--shared-runtime`: one for both, which saves cross-thread wake-ups).
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let producer_rt = runtime();
    let own_consumer_rt = (!shared_runtime).then(runtime);
    let consumer_rt = own_consumer_rt.as_ref().unwrap_or(&producer_rt);
    let producer_pool = NetworkBufferPool::new(POOL_SEGMENTS, segment);
    let consumer_pool = NetworkBufferPool::new(POOL_SEGMENTS, segment);
    let consumer_env = env(mode, &consumer_pool);
    let registry = Arc::new(NetworkRegistry::default());
    let server = producer_rt
        .block_on(DataServer::start(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::clone(&registry),
            env(mode, &producer_pool),
            DataServerOptions::default(),
        ))
        .expect("data server");
    let partition = PartitionId {
        job: 1,
        edge: 0,
        source_subtask: 0,
    };
    let sub = Subpartition::new(BUFFERS.max_per_channel);
    sub.set_checksum(checksum);
    registry.register_partition(Arc::new(ResultPartition {
        id: partition,
        subpartitions: vec![Some(Arc::clone(&sub))],
    }));
    let id = GateId {
        job: 1,
        edge: 0,
        target_subtask: 0,
    };
    let gate = InputGate::new(id, &[ChannelKind::Remote], *BUFFERS, &consumer_pool).expect("gate");
    let connections = ConnectionManager::new(consumer_env, PeerAuth::loopback());
    let conn = if task_reads && mode == Remote::Tcp {
        // The gate's own connection, read by the consumer's thread.
        let mut stream = std::net::TcpStream::connect(server.local_addr).expect("connect");
        // Every data connection opens with the handshake (no secret on loopback).
        security::handshake_blocking(
            &mut stream,
            None,
            Role::Client,
            Plane::Data,
            security::HANDSHAKE_TIMEOUT_DEFAULT,
        )
        .expect("handshake");
        let link = GateLink::new(stream, "tm-bench".into()).expect("link");
        link.request_partition(&gate, 0, partition, 0)
            .expect("request");
        gate.set_driver(TaskReadInput::new(vec![link], segment).expect("poller"));
        None
    } else {
        let conn = consumer_rt
            .block_on(connections.connect(server.local_addr, "tm-bench", segment))
            .expect("connect");
        conn.request_partition(&gate, 0, partition, 0)
            .expect("request");
        Some(conn)
    };
    let b = batch();
    let batches = size.div_ceil(batch_bytes(&b));
    let metrics = Arc::new(WriterMetrics::default());
    let producer_metrics = Arc::clone(&metrics);
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        let target = Target::Remote {
            sub,
            encoder: Box::new(ChannelEncoder::new(segment - PAYLOAD_HEADROOM)),
        };
        let mut w = writer(target, producer_pool, producer_metrics);
        for _ in 0..batches {
            w.emit(b.clone()).expect("emit");
        }
        w.finish().expect("finish");
    });
    let rows = drain(InputReader::new(vec![gate]));
    producer.join().expect("producer");
    let elapsed = start.elapsed();
    assert_eq!(rows, batches * ROWS_PER_BATCH as u64);
    let bytes = metrics
        .remote_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    report(name, bytes, elapsed);
    drop(conn);
    drop(connections);
}

fn main() {
    let mut size = 2u64 << 30;
    let mut segment = Config::default().segment_size_bytes as usize;
    let mut only: Option<String> = None;
    let mut options = RemoteOptions {
        checksum: false,
        workers: 2,
        shared_runtime: false,
        task_reads: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--size" => size = parse_bytes(&value).expect("--size"),
            "--segment" => segment = parse_bytes(&value).expect("--segment") as usize,
            "--only" => only = Some(value),
            "--workers" => options.workers = value.parse().expect("--workers"),
            "--checksum" | "--shared-runtime" | "--shared-connection" => {
                match args[i].as_str() {
                    "--checksum" => options.checksum = true,
                    "--shared-runtime" => options.shared_runtime = true,
                    _ => options.task_reads = false,
                }
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("memcpy") {
        memcpy(size);
    }
    if run("local") {
        local(size, segment);
    }
    if run("tcp") {
        remote("tcp", Remote::Tcp, size, segment, &options);
    }
    if run("rdma-emulated") {
        remote("rdma-emulated", Remote::Verbs, size, segment, &options);
    }
    if run("rdma-emulated-link") {
        remote(
            "rdma-emulated-link",
            Remote::VerbsLink,
            size,
            segment,
            &options,
        );
    }
}
