//! Kernels: the hot loops over Arrow buffers.
//!
//! Each kernel is a free function over slices so that a GPU twin can be
//! written with identical semantics later. `cpu/` holds the CPU
//! implementations; today the CPU is the only backend.

pub mod cpu;
