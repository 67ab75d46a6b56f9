//! Kernels: the hot loops over Arrow buffers, on two tiers.
//!
//! Each kernel is a free function over slices (`cpu/`) with a CUDA twin in
//! `kernels/*.cu` of identical semantics. [`backend::KernelBackend`] is the
//! seam operators call: [`backend::CpuBackend`] runs the twins,
//! [`gpu::cuda::CudaBackend`] launches the CUDA kernels, and
//! [`backend::TieredKernels`] wraps a GPU backend with split-and-retry on
//! device out-of-memory and the CPU twin as the last resort. [`gpu`] also
//! detects GPUs (never panicking on a machine without one) and keeps the
//! per-slot device memory budgets.

pub mod aggtable;
pub mod backend;
pub mod chain;
pub mod cpu;
pub mod gpu;
pub mod health;
