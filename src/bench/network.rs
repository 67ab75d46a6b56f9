//! Network: strata's shuffle over TCP beside a raw TCP stream of the same
//! bytes to the same endpoint (a `strata bench --serve` at `--peer`, else an
//! in-process server on loopback), at each message size; then the verbs
//! protocol over emulated verbs, and over hardware verbs when the `rdma`
//! feature is built and a device exists (both in-process, against the raw
//! TCP stream of the same size).
//!
//! The shuffle's message size is its batch size: batches of
//! [`serve::rows_for_message`] rows of four Int64 columns hold about that
//! many bytes, and the data plane cuts them into its own segments.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::report::{Figure, Size, Unit};
use super::serve::{self, Client, LoopbackServer};
use super::{BenchError, BenchOptions, Recorder, Section};
use crate::config::Config;
use crate::memory::NetworkBufferPool;
use crate::network::gate::{ChannelKind, GateBuffers, InputEvent};
use crate::network::ipc::ChannelEncoder;
use crate::network::partition::{Partitioner, Target, WriterMetrics};
use crate::network::rdma::VerbsEnv;
use crate::network::tcp::{ConnectionManager, DataServer, DataServerOptions};
use crate::network::verbs::VerbsDevice;
use crate::network::verbs::emu::EmuDevice;
use crate::network::{
    GateId, InputGate, InputReader, NetworkRegistry, PAYLOAD_HEADROOM, PartitionId, RecordWriter,
    ResultPartition, Subpartition,
};
use crate::security::PeerAuth;

const RAW: &str = "raw tcp stream";

/// Opens a verbs device, or says why there is none.
type OpenDevice<'a> = &'a dyn Fn() -> Result<Arc<dyn VerbsDevice>, String>;
const POOL_SEGMENTS: usize = 2048;

pub fn run(recorder: &mut Recorder<'_>, options: &BenchOptions) -> Result<(), BenchError> {
    let loopback = match &options.peer {
        Some(_) => None,
        None => Some(LoopbackServer::start(IpAddr::from([127, 0, 0, 1]))?),
    };
    let peer = match (&options.peer, &loopback) {
        (Some(peer), _) => peer.clone(),
        (None, Some(server)) => server.address.to_string(),
        (None, None) => unreachable!("a loopback server without a peer"),
    };
    let outcome = over_tcp(recorder, &peer, &options.auth, options.peer.is_none());
    if let Some(server) = loopback {
        server.stop()?;
    }
    let raw_rates = outcome?;
    verbs(recorder, &raw_rates);
    Ok(())
}

/// The raw stream and the shuffle at each message size; returns the raw
/// rates, the reference of the verbs lines.
fn over_tcp(
    recorder: &mut Recorder<'_>,
    peer: &str,
    auth: &PeerAuth,
    loopback: bool,
) -> Result<Vec<(usize, f64)>, BenchError> {
    let plan = recorder.plan;
    let client = Client::new(peer)?;
    let where_ = if loopback { "loopback" } else { "peer" };
    let mut raw_rates = Vec::new();
    for &message in &plan.message_bytes {
        let size = Size::Bytes(message as u64);
        recorder.step(&format!("network: raw tcp, {size} messages to {peer}"));
        let mut best_raw = f64::INFINITY;
        for _ in 0..plan.repetitions.max(1) {
            best_raw = best_raw.min(client.raw(plan.network_bytes, message)?);
        }
        let raw = plan.network_bytes as f64 / best_raw.max(1e-9);
        raw_rates.push((message, raw));
        recorder.figure(
            Figure::new(
                Section::Network,
                format!("{RAW} ({where_})"),
                raw,
                Unit::BytesPerS,
            )
            .at(size)
            .plotted("network"),
        );
        recorder.step(&format!(
            "network: shuffle over tcp, {size} batches to {peer}"
        ));
        let mut best = 0.0f64;
        for _ in 0..plan.repetitions.max(1) {
            let (payload, seconds) =
                client.shuffle(plan.network_bytes, serve::rows_for_message(message), auth)?;
            best = best.max(payload as f64 / seconds.max(1e-9));
        }
        recorder.figure(
            Figure::new(
                Section::Network,
                format!("shuffle tcp ({where_})"),
                best,
                Unit::BytesPerS,
            )
            .at(size)
            .plotted("network")
            .against(format!("{RAW} ({where_})"), raw, Unit::BytesPerS),
        );
    }
    Ok(raw_rates)
}

/// The verbs protocol in-process: emulated always, hardware when built
/// and present; a skipped line says why not.
fn verbs(recorder: &mut Recorder<'_>, raw_rates: &[(usize, f64)]) {
    let plan = recorder.plan;
    let emulated = || -> Result<Arc<dyn VerbsDevice>, String> {
        EmuDevice::open("127.0.0.1")
            .map(|d| d as Arc<dyn VerbsDevice>)
            .map_err(|e| e.to_string())
    };
    let hardware = || -> Result<Arc<dyn VerbsDevice>, String> {
        crate::network::verbs::probe::probe_hardware(None).map_err(|e| e.to_string())
    };
    let kinds: [(&str, OpenDevice<'_>); 2] = [
        ("shuffle verbs emulated", &emulated),
        ("shuffle verbs hardware", &hardware),
    ];
    for (name, open) in kinds {
        if let Err(reason) = open() {
            recorder.skip(Section::Network, name, reason);
            continue;
        }
        for &(message, raw) in raw_rates {
            let size = Size::Bytes(message as u64);
            recorder.step(&format!("network: {name}, {size} batches"));
            let mut best = 0.0f64;
            let mut failure = None;
            for _ in 0..plan.repetitions.max(1) {
                match verbs_shuffle(open, plan.network_bytes, serve::rows_for_message(message)) {
                    Ok((payload, seconds)) => best = best.max(payload as f64 / seconds),
                    Err(e) => failure = Some(e),
                }
            }
            if let Some(reason) = failure {
                recorder.skip(Section::Network, name, format!("at {size}: {reason}"));
                break;
            }
            recorder.figure(
                Figure::new(Section::Network, name, best, Unit::BytesPerS)
                    .at(size)
                    .plotted("network")
                    .against(format!("{RAW} (loopback or peer)"), raw, Unit::BytesPerS),
            );
        }
    }
}

/// Producer and consumer TaskManagers in this process, each with its own
/// runtime, buffer pool and verbs device, joined by the data server's
/// connection with the buffers going over verbs: (payload bytes, seconds).
fn verbs_shuffle(
    open: OpenDevice<'_>,
    bytes: u64,
    batch_rows: usize,
) -> Result<(u64, f64), String> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))
    };
    let (producer_rt, consumer_rt) = (runtime()?, runtime()?);
    let segment = Config::default().segment_size_bytes as usize;
    let buffers = GateBuffers::from(&Config::default());
    let producer_pool = NetworkBufferPool::new(POOL_SEGMENTS, segment);
    let consumer_pool = NetworkBufferPool::new(POOL_SEGMENTS, segment);
    let env = |pool: &Arc<NetworkBufferPool>| {
        VerbsEnv::new(open()?, pool).map_err(|e| format!("registering buffers: {e}"))
    };
    let (producer_env, consumer_env) = (env(&producer_pool)?, env(&consumer_pool)?);
    let registry = Arc::new(NetworkRegistry::default());
    let server = producer_rt
        .block_on(DataServer::start(
            "127.0.0.1:0".parse().expect("a loopback address"),
            Arc::clone(&registry),
            Some(producer_env),
            DataServerOptions::default(),
        ))
        .map_err(|e| format!("data server: {e}"))?;
    let partition = PartitionId {
        job: 1,
        edge: 0,
        source_subtask: 0,
    };
    let sub = Subpartition::new(buffers.max_per_channel);
    registry.register_partition(Arc::new(ResultPartition {
        id: partition,
        subpartitions: vec![Some(Arc::clone(&sub))],
    }));
    let id = GateId {
        job: 1,
        edge: 0,
        target_subtask: 0,
    };
    let gate = InputGate::new(id, &[ChannelKind::Remote], buffers, &consumer_pool)
        .map_err(|e| format!("input gate: {e}"))?;
    let connections = ConnectionManager::new(Some(consumer_env), PeerAuth::loopback());
    let connection = consumer_rt
        .block_on(connections.connect(server.local_addr, "bench-verbs", segment))
        .map_err(|e| format!("connect: {e}"))?;
    let batch = serve::shuffle_batch(batch_rows);
    let batches = bytes.div_ceil(serve::batch_bytes(&batch)).max(1);
    let metrics = Arc::new(WriterMetrics::default());
    let producer_metrics = Arc::clone(&metrics);
    let started = Instant::now();
    connection
        .request_partition(&gate, 0, partition, 0)
        .map_err(|e| format!("partition request: {e}"))?;
    let producer = std::thread::spawn(move || -> Result<(), String> {
        let target = Target::Remote {
            sub,
            encoder: Box::new(ChannelEncoder::new(segment - PAYLOAD_HEADROOM)),
        };
        let mut writer = RecordWriter::new(
            Partitioner::Forward,
            vec![target],
            128,
            producer_pool,
            Arc::new(|| false),
            producer_metrics,
        );
        for _ in 0..batches {
            writer.emit(batch.clone()).map_err(|e| e.to_string())?;
        }
        writer.finish().map_err(|e| e.to_string())
    });
    let mut reader = InputReader::new(vec![gate]);
    let mut rows = 0u64;
    let drained = loop {
        match reader.next(serve::IO_TIMEOUT) {
            Ok(Some(InputEvent::Batch(b))) => rows += b.num_rows() as u64,
            Ok(Some(InputEvent::End)) => break Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => break Err(format!("no data for {:?}", serve::IO_TIMEOUT)),
            Err(e) => break Err(format!("consumer: {e}")),
        }
    };
    let produced = producer
        .join()
        .map_err(|_| "the producer panicked".to_owned())?;
    let seconds = started.elapsed().as_secs_f64();
    drained?;
    produced?;
    let expected = batches * batch_rows.max(1) as u64;
    if rows != expected {
        return Err(format!("received {rows} rows, expected {expected}"));
    }
    drop(connection);
    drop(connections);
    let payload = metrics
        .remote_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    Ok((payload, seconds.max(1e-9)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Plan;

    #[test]
    fn network_section_puts_the_shuffle_beside_the_raw_stream_at_each_size() {
        let mut plan = Plan::new(true, 1.0 / 128.0);
        plan.repetitions = 1;
        let progress = indicatif::ProgressBar::hidden();
        let mut recorder = Recorder::new(&plan, &progress);
        let options = BenchOptions {
            sections: vec![Section::Network],
            quick: true,
            size_scale: 1.0 / 128.0,
            dir: std::env::temp_dir(),
            peer: None,
            auth: PeerAuth::loopback(),
        };
        run(&mut recorder, &options).unwrap();
        let (figures, skipped) = recorder.into_parts();
        for &message in &plan.message_bytes {
            let at = |prefix: &str| {
                figures
                    .iter()
                    .find(|f| {
                        f.name.starts_with(prefix) && f.size == Some(Size::Bytes(message as u64))
                    })
                    .unwrap_or_else(|| panic!("{prefix} at {message} missing: {figures:?}"))
            };
            assert!(at("raw tcp stream").value > 0.0);
            assert!(at("shuffle tcp").ratio.is_some());
            assert!(at("shuffle verbs emulated").ratio.is_some());
        }
        // No NIC here (or no `rdma` feature): the hardware line says why.
        if !figures.iter().any(|f| f.name == "shuffle verbs hardware") {
            assert!(
                skipped.iter().any(|s| s.name == "shuffle verbs hardware"),
                "{skipped:?}"
            );
        }
    }
}
