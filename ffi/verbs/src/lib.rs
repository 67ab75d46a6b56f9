//! strata-verbs: a small, safe wrapper over libibverbs (through `rdma-sys`)
//! holding all of strata's RDMA FFI, so that `src/` stays free of `unsafe`
//! except for registering memory.
//!
//! # What it wraps
//!
//! Only what a credit-based shuffle over reliable-connected queue pairs
//! needs: open a device on its first active port ([`Device::open`]), one
//! protection domain per device, memory regions ([`MemoryRegion`]),
//! completion queues with a completion channel for blocking waits
//! ([`CompletionQueue`]), RC queue pairs ([`QueuePair`]) taken
//! RESET → INIT at creation and INIT → RTR → RTS by [`QueuePair::connect`],
//! SEND and RDMA WRITE WITH IMMEDIATE, receives, and completions mapped to
//! plain Rust types ([`Completion`]).
//!
//! # Ownership and teardown order
//!
//! libibverbs objects must be destroyed children first: queue pairs before
//! their completion queues and protection domain, memory regions before their
//! protection domain, completion queues and protection domains before the
//! device context. Every wrapper holds an `Arc` to its parents, so a parent
//! cannot be freed while a child lives, whatever order the caller drops
//! things in.
//!
//! # Memory the NIC touches
//!
//! Registering memory is the one `unsafe` entry point
//! ([`Device::register`]): its caller promises the memory outlives the
//! region. Posting is safe: the NIC only reads or writes through local keys,
//! and a local key names a registered region (or none, which fails the work
//! request with a protection error instead of touching memory).
//!
//! # Threads
//!
//! The verbs in use here (post, poll, modify, create, destroy) are
//! thread-safe in libibverbs and its providers, so every wrapper is
//! `Send + Sync`.

#![deny(clippy::undocumented_unsafe_blocks)]

mod cq;
mod device;
mod error;
mod mr;
mod qp;

pub use cq::{
    Completion, CompletionOpcode, CompletionQueue, CompletionStatus, RawCompletion, status_text,
};
pub use device::{
    Device, GidCandidate, LinkLayer, OpenOptions, PortInfo, choose_gid_index, format_gid,
};
pub use error::Error;
pub use mr::{AccessFlags, MemoryRegion};
pub use qp::{
    MAX_RD_ATOMIC, MIN_RNR_TIMER, QpCaps, QueuePair, RETRY_COUNT, RNR_RETRY, RemoteEndpoint,
    SGE_PER_SEND_MAX, SendOp, SendWr, Sge, TIMEOUT, imm_from_wire, imm_to_wire, initial_psn,
};
