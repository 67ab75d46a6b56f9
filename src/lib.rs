//! strata — a hardware-tiered TaskManager: the worker process of a dataflow
//! cluster in the mould of Apache Flink's TaskManager.
//!
//! # How a batch flows
//!
//! A job file ([`job`]) is parsed, type-checked and planned into a logical
//! plan, then chained into a [`job::graph::JobGraph`] of vertices joined by
//! exchange edges (forward, hash, rebalance, global). The JobManager
//! ([`cluster::jobmanager`]) allocates one slot per subtask index (slot
//! sharing, as in Flink), and deploys tasks to TaskManagers
//! ([`taskmanager`]) over the control protocol ([`protocol`]).
//!
//! Inside a TaskManager every task runs on its own thread ([`exec::task`]): a
//! source or an input gate feeds a chain of operators ([`exec::operators`]);
//! the chain's tail writes record batches into result partitions
//! ([`network`]). A partition's subpartition is either a local channel
//! straight into the consuming task's input gate, or a queue of Arrow IPC
//! buffers that the TaskManager's data server sends over TCP under Flink's
//! credit-based flow control. Keys are routed with one stable hash
//! ([`kernels::cpu::hash`]) through key groups, so a key's target subtask never
//! depends on where it was hashed.
//!
//! Operator working memory (the keyed aggregation's hash table) lives in
//! managed memory pages ([`memory`]) handed out against a per-slot budget;
//! network buffers come from a fixed pool of pre-touched segments.
//!
//! # Modules (dependencies point downward)
//!
//! - [`config`]: typed configuration with Flink's keys and the memory layout.
//! - [`job`]: job files, expressions, the logical plan and the job graph.
//! - [`protocol`]: every control message, the id newtypes, states,
//!   deployments and REST snapshots; `cluster`, `taskmanager` and `web`
//!   speak it and do not depend on each other.
//! - [`cluster`]: the JobManager (an I/O-free core — resource manager,
//!   scheduler, heartbeat monitor, failover, checkpoint coordination — in a
//!   thin tokio shell), its seeded cluster simulator, the embedded
//!   mini-cluster and the job client.
//! - [`minicluster`]: the embedded cluster behind `strata run` (a
//!   JobManager and TaskManagers in one process) and the REST server's
//!   start; the one module that depends on both `cluster` and `taskmanager`.
//! - [`taskmanager`]: slot table, task deployment and lifecycle.
//! - [`exec`]: task runtime, operators (the aggregation, windows and sort
//!   spill through the IOManager when managed memory is full), sources and
//!   sinks.
//! - [`network`]: frames, result partitions, input gates, credit-based flow
//!   control; TCP and RDMA verbs (hardware or emulated) transports; a seeded
//!   network simulator.
//! - [`checkpoint`]: aligned checkpoints: the coordinator, task state files,
//!   checkpoint storage with verified fallback; in tests, a seeded
//!   simulation of a checkpointed job that crashes, checked exactly once.
//! - [`memory`]: managed memory pages and budgets, network buffer pool.
//! - [`io`]: the IOManager: io_uring / thread-pool / simulated storage and
//!   checksummed spill files, removed with the operator that owns them.
//! - [`kernels`]: hot loops over Arrow buffers on two tiers: CPU twins and
//!   CUDA kernels behind the `KernelBackend` seam, GPU detection and the
//!   per-slot device memory pool.
//! - [`bench`]: `strata bench`, the whole-node benchmark (each figure beside
//!   a reference from the same run; table, JSON, HTML, plots, compare), and
//!   `--calibrate`, the rates placement prices with.
//! - [`placement`]: the tier cost model, calibration files and the table
//!   `strata explain` prints.
//! - [`metrics`]: counters shared by tasks and reported to the JobManager.
//! - [`web`]: the JobManager's REST API, Prometheus endpoint and web UI.
//! - [`security`]: the cluster secret, the handshake every control and data
//!   connection starts with, and the loopback-only rule without a secret.
#![deny(unsafe_code)]

pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod exec;
pub mod flight;
pub mod io;
pub mod job;
pub mod kernels;
pub mod memory;
pub mod metrics;
pub mod minicluster;
pub mod network;
pub mod placement;
pub mod protocol;
pub mod security;
pub mod taskmanager;
pub mod web;
