//! CPU kernels.

pub mod hash;
