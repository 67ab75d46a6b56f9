//! CPU kernels: the twins of the CUDA kernels in `kernels/*.cu`, with the
//! same semantics (overflow, NaN, nulls) on the same column buffers.

pub mod aggregate;
pub mod column;
pub mod filter;
pub mod hash;
pub mod key_hash;
pub mod partition;
pub mod project;
pub mod standardize;
