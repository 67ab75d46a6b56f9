//! Building a simulation: TaskManagers, connections, gates, subpartitions
//! and writers, wired as the real deployment wires them.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::sync::mpsc::unbounded_channel;

use super::{
    Channel, Connection, Consumer, Invariant, MAX_PARALLELISM, PAYLOAD_MAX_BYTES, Producer,
    SEGMENT_SIZE_BYTES, Sim, SimConfig, SimFailure, SimReport, SplitMix64, WriterState,
};
use crate::memory::NetworkBufferPool;
use crate::network::GateId;
use crate::network::gate::{ChannelKind, CreditLink, GateBuffers, InputGate, InputReader};
use crate::network::ipc::ChannelEncoder;
use crate::network::partition::{Partitioner, RecordWriter, Subpartition, Target, WriterMetrics};

impl Sim {
    pub(super) fn new(config: SimConfig) -> Result<Self, SimFailure> {
        let setup = |detail: String| SimFailure {
            seed: config.seed,
            tick: 0,
            invariant: Invariant::Setup,
            detail,
        };
        if config.producers == 0 || config.consumers == 0 || config.exclusive == 0 {
            return Err(setup(
                "producers, consumers and exclusive must be ≥ 1".into(),
            ));
        }
        let mut rng = SplitMix64(config.seed);
        let tm_count = config.task_managers.max(1);
        let producer_tms = tm_count.min(config.producers);
        let consumer_tms = tm_count.min(config.consumers);
        let mut senders = Vec::new();
        let mut connections = Vec::new();
        for source_tm in 0..producer_tms {
            for target_tm in 0..consumer_tms {
                let (tx, control_rx) = unbounded_channel();
                senders.push(tx);
                connections.push(Connection {
                    source_tm,
                    target_tm,
                    channel_indices: Vec::new(),
                    data: VecDeque::new(),
                    control: VecDeque::new(),
                    control_rx,
                    data_last_at: 0,
                    control_last_at: 0,
                    next_send: 0,
                    cut: false,
                });
            }
        }
        let (p_count, c_count) = (config.producers, config.consumers);
        let mut linked = vec![!config.sparse; p_count * c_count];
        if config.sparse {
            linked.iter_mut().for_each(|l| *l = rng.chance(1, 2));
            (0..p_count).for_each(|p| linked[p * c_count + p % c_count] = true);
            (0..c_count).for_each(|c| linked[(c % p_count) * c_count + c] = true);
        }
        let linked = &linked;
        let sources = |c: usize| (0..p_count).filter(move |p| linked[p * c_count + c]);
        let targets = |p: usize| (0..c_count).filter(move |c| linked[p * c_count + c]);
        let buffers = GateBuffers {
            exclusive_per_channel: config.exclusive,
            floating_per_gate: config.floating,
            max_per_channel: config.max_per_channel,
        };
        let mut consumers = Vec::new();
        for c in 0..c_count {
            let kinds = vec![ChannelKind::Remote; sources(c).count()];
            let pool = NetworkBufferPool::new(
                kinds.len() * config.exclusive + config.floating,
                SEGMENT_SIZE_BYTES,
            );
            let id = GateId {
                job: config.seed,
                edge: 0,
                target_subtask: c as u32,
            };
            let gate =
                InputGate::new(id, &kinds, buffers, &pool).map_err(|e| setup(e.to_string()))?;
            consumers.push(Consumer {
                reader: InputReader::new(vec![Arc::clone(&gate)]),
                gate,
                pool,
                slow: config.slow_receivers && rng.chance(1, 2),
                outcome: None,
                cut_off: false,
                gate_failed: false,
                closed: false,
            });
        }
        let mut channels = Vec::new();
        let mut channel_of = vec![None; p_count * c_count];
        let mut producers = Vec::new();
        for p in 0..p_count {
            let target_count = targets(p).count();
            // A producer holds at most its queues plus what its credit lets
            // it put on the wire, so this pool never makes `emit` wait.
            let segments =
                target_count * (config.max_per_channel + config.exclusive + config.floating) + 1;
            let pool = NetworkBufferPool::new(segments, SEGMENT_SIZE_BYTES);
            let mut writers = Vec::new();
            let mut channel_indices = Vec::new();
            for (slot, c) in targets(p).enumerate() {
                let connection = (p % producer_tms) * consumer_tms + c % consumer_tms;
                let gate_channel = sources(c).position(|q| q == p).unwrap_or(0);
                let sub = Subpartition::new(config.max_per_channel);
                let index = channels.len();
                let link = CreditLink::new(senders[connection].clone(), index as u32);
                // The partition request, resolved at start-up.
                let initial_credit = consumers[c].gate.bind_remote(gate_channel, link);
                sub.attach(Arc::new(Notify::new()), initial_credit);
                connections[connection].channel_indices.push(index);
                channel_of[p * c_count + c] = Some(index);
                channel_indices.push(index);
                writers.push(RecordWriter::new(
                    Partitioner::Forward,
                    vec![Target::Remote {
                        sub: Arc::clone(&sub),
                        encoder: Box::new(ChannelEncoder::new(PAYLOAD_MAX_BYTES)),
                    }],
                    MAX_PARALLELISM,
                    Arc::clone(&pool),
                    Arc::new(|| false),
                    Arc::new(WriterMetrics::default()),
                ));
                channels.push(Channel {
                    producer: p,
                    consumer: c,
                    gate_channel,
                    connection,
                    sub,
                    next_seq: slot,
                    seq_step: target_count,
                    announced_backlog: 0,
                });
            }
            producers.push(Producer {
                writer_states: vec![WriterState::Open; target_count],
                channel_indices,
                writers,
                pool,
                next_seq: 0,
            });
        }
        let total_batches = (config.producers * config.batches_per_producer) as u64;
        let cut_after_buffers = config.loss.then(|| rng.below(total_batches));
        let report = SimReport {
            seed: config.seed,
            ..SimReport::default()
        };
        Ok(Self {
            config,
            rng,
            now: 0,
            channels,
            channel_of,
            producers,
            consumers,
            connections,
            cut_after_buffers,
            credit_dropped: false,
            report,
        })
    }
}
