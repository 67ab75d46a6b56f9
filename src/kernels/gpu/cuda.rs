//! The CUDA backend: Arrow buffers to the device, one kernel launch, the
//! results back to the host.
//!
//! Each call reserves its device bytes in the slot's [`SlotPool`] first (a
//! refusal is [`KernelError::DeviceOutOfMemory`], which `TieredKernels`
//! answers by splitting the batch), copies its inputs with `clone_htod`,
//! launches on the backend's stream, copies the outputs back and
//! synchronizes the stream before it returns. So the input arrays (borrowed
//! for the call, kept alive by the caller's `Arc`ed Arrow buffers) and the
//! device buffers (owned by the call) outlive every use the device makes of
//! them, and nothing is lent across the kernel boundary. Two paths return
//! before the device is done, and own what it uses until then: a fused
//! chain's submitted batch (`cuda/chain.rs`: its lane's pinned staging and
//! device buffers, released only after its streams are synchronized, on
//! completion or drop) and an aggregation table's upsert (`cuda/aggtable.rs`:
//! the table's pinned staging, not written again before the next wait).
//! The input columns are copied into pinned staging before the call
//! returns, so the caller's Arrow buffers are never read by the device.
//!
//! Kernels are compiled at start-up with NVRTC for the device's compute
//! capability and cached on disk ([`PtxCache`]); no fast-math, no FMA
//! contraction flags, so the results equal the CPU twins (the kernels use
//! the `__d*_rn` intrinsics as well).
//!
//! This is the one module of the crate's GPU tier that needs `unsafe`: the
//! driver probe, the NVRTC version query and kernel launches are `unsafe` in
//! `cudarc`. Each block says what it relies on.
#![allow(unsafe_code)]

mod aggtable;
mod chain;
pub mod measure;
pub mod nvrtc;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array, ArrowPrimitiveType, BooleanArray, Float64Array, Int64Array, PrimitiveArray,
};
use arrow_buffer::ScalarBuffer;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::contexts::{DeviceContexts, Lease, OpenError};
use super::pool::{PoolError, SlotPool};
use super::source::{CacheKey, PtxCache, SOURCES, expand_includes};
use super::{GpuDetection, GpuDevice, GpuError, LaunchBytes};
use crate::kernels::backend::{KernelBackend, KernelError, Tier, check_keyed_rows, sort_groups};
use crate::kernels::cpu::aggregate::{AggregateError, Group, GroupStats, KeyedArrays};
use crate::kernels::cpu::column::{bitmap_len_bytes, boolean_buffer, null_buffer};
use crate::kernels::cpu::filter::CmpOp;
use crate::kernels::cpu::key_hash::HashMode;
use crate::kernels::cpu::partition::{PartitionError, Partitioning, Routing};
use crate::kernels::cpu::project::{ArithOp, ArrayOperand, Operands, ProjectError};
use crate::kernels::cpu::standardize::{ColumnStats, REDUCE_CHUNK_ROWS, chunk_count};

/// Threads per block: a multiple of 32, as the bitmap kernels require.
const BLOCK_THREADS: u32 = 256;
/// Blocks per launch at most; the kernels loop grid-stride beyond it.
const GRID_BLOCKS_MAX: u32 = 4096;
const _: () = assert!(BLOCK_THREADS.is_multiple_of(32));

/// Every entry point the backend launches, by source stem.
pub const ENTRY_POINTS: [(&str, &str); 17] = [
    ("filter", "filter_i64"),
    ("filter", "filter_f64"),
    ("project", "project_i64_columns"),
    ("project", "project_i64_literal"),
    ("project", "project_f64_columns"),
    ("project", "project_f64_literal"),
    ("hash", "hash_i64"),
    ("partition", "partition_assign"),
    ("partition", "partition_offsets"),
    ("partition", "partition_scatter"),
    ("standardize", "standardize_moments"),
    ("standardize", "standardize_moments_merge"),
    ("standardize", "standardize_stats"),
    ("standardize", "standardize_apply"),
    ("aggregate", "aggregate_init"),
    ("aggregate", "aggregate_update"),
    ("aggregate", "aggregate_compact"),
];

/// Threads of the reduction kernels' blocks (`REDUCE_CHUNK_ROWS` in
/// kernels/standardize.cu, which traps on any other block size).
const REDUCE_BLOCK_THREADS: u32 = REDUCE_CHUNK_ROWS as u32;
/// The most threads of `partition_offsets`' single block.
const SCAN_BLOCK_THREADS_MAX: u32 = 1024;

/// Finds the GPUs, or says why there are none. Never panics: `cudarc`
/// panics when `libcuda` cannot be loaded, so the library's presence is
/// checked first and every driver call runs under `catch_unwind`.
pub fn probe() -> GpuDetection {
    // SAFETY: `is_culib_present` only tries to `dlopen` the driver library
    // by its usual names and closes it again; it touches no CUDA state.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return GpuDetection::Absent {
            reason: "libcuda.so not found (no NVIDIA driver)".into(),
        };
    }
    match catch_unwind(list_devices) {
        Ok(Ok(devices)) if devices.is_empty() => GpuDetection::Absent {
            reason: "the CUDA driver reports no device".into(),
        },
        Ok(Ok(devices)) => GpuDetection::Present(devices),
        Ok(Err(e)) => GpuDetection::Absent {
            reason: e.to_string(),
        },
        Err(_) => GpuDetection::Absent {
            reason: "the CUDA driver library panicked while loading".into(),
        },
    }
}

fn driver(call: &'static str) -> impl Fn(DriverError) -> GpuError {
    move |e| GpuError::Driver {
        call,
        reason: format!("{e:?}"),
    }
}

fn list_devices() -> Result<Vec<GpuDevice>, GpuError> {
    use cudarc::driver::result::{device, init};
    use cudarc::driver::sys::CUdevice_attribute as Attr;
    init().map_err(driver("cuInit"))?;
    let count = device::get_count().map_err(driver("cuDeviceGetCount"))?;
    (0..count)
        .map(|ordinal| {
            let dev = device::get(ordinal).map_err(driver("cuDeviceGet"))?;
            let name = device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
            // SAFETY: `dev` was just returned by `cuDeviceGet` for an
            // ordinal below the device count.
            let (memory_bytes, major, minor) = unsafe {
                (
                    device::total_mem(dev).map_err(driver("cuDeviceTotalMem"))?,
                    device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                        .map_err(driver("cuDeviceGetAttribute"))?,
                    device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                        .map_err(driver("cuDeviceGetAttribute"))?,
                )
            };
            Ok(GpuDevice {
                ordinal: ordinal as u32,
                name,
                memory_bytes: memory_bytes as u64,
                compute_capability: (major.max(0) as u32, minor.max(0) as u32),
                simulated: false,
            })
        })
        .collect()
}

/// `major.minor` of the NVRTC library, or why it cannot be used.
pub fn nvrtc_version() -> Result<String, GpuError> {
    nvrtc::nvrtc().map(nvrtc::Nvrtc::version)
}

/// Where the NVRTC library was loaded from, or why there is none.
pub fn nvrtc_library() -> Result<std::path::PathBuf, GpuError> {
    nvrtc::nvrtc().map(|n| n.path().to_path_buf())
}

/// The CUDA driver's version as `cuDriverGetVersion` reports it (e.g.
/// `12080` for 12.8), or `None` without a driver.
pub fn driver_version() -> Option<i32> {
    // SAFETY: only a `dlopen` probe, as in `probe`.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let query = || {
        let mut version = 0;
        // SAFETY: the pointer is to a live local for the duration of the
        // call, which writes one int and keeps no pointer.
        let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
        (status, version)
    };
    match catch_unwind(query) {
        Ok((cudarc::driver::sys::CUresult::CUDA_SUCCESS, version)) => Some(version),
        _ => None,
    }
}

/// The NVRTC options every kernel is compiled with for `arch`.
fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()]
}

/// Compiles (or loads from the cache, in files ending in `.extension`)
/// every kernel source for `arch`: `compile(stem, expanded source, NVRTC
/// options)` makes one image, its error is NVRTC's log.
fn compile_all(
    arch: &str,
    cache: &PtxCache,
    extension: &str,
    compile: impl Fn(&'static str, &str, &[String]) -> Result<Vec<u8>, String>,
) -> Result<Vec<(&'static str, Vec<u8>)>, GpuError> {
    let nvrtc_version = nvrtc_version()?;
    let driver_version = driver_version().map_or_else(|| "none".to_owned(), |v| v.to_string());
    let options = compile_options(arch);
    let options_text = options.join(" ");
    SOURCES
        .iter()
        .map(|source| {
            let expanded = expand_includes(*source)?;
            let key = CacheKey {
                expanded_source: &expanded,
                arch,
                nvrtc_version: &nvrtc_version,
                options: &options_text,
                driver_version: &driver_version,
            };
            let (image, outcome) =
                cache.get_or_compile_bytes(source.stem, key, extension, || {
                    compile(source.stem, &expanded, &options).map_err(|log| GpuError::Compile {
                        stem: source.stem,
                        arch: arch.to_owned(),
                        log,
                    })
                })?;
            tracing::debug!("kernels/{}.cu for {arch}: {outcome:?}", source.stem);
            Ok((source.stem, image))
        })
        .collect()
}

/// Compiles (or loads from the cache) every kernel source for `arch`
/// (`compute_90`): `(stem, PTX)` per source. Needs only NVRTC, not a GPU.
pub fn compile_modules(
    arch: &str,
    cache: &PtxCache,
) -> Result<Vec<(&'static str, String)>, GpuError> {
    let images = compile_all(arch, cache, "ptx", |stem, source, options| {
        nvrtc_compile(stem, source, options, nvrtc::Image::Ptx)
    })?;
    Ok(images
        .into_iter()
        .map(|(stem, bytes)| (stem, String::from_utf8_lossy(&bytes).into_owned()))
        .collect())
}

/// Compiles (or loads from the cache) every kernel source into a cubin for
/// the real architecture `sm_arch` (`sm_90`) with `nvrtcGetCUBIN`: machine
/// code the driver loads without a JIT, so a driver older than NVRTC still
/// runs it. Needs only NVRTC, not a GPU.
pub fn compile_cubins(
    sm_arch: &str,
    cache: &PtxCache,
) -> Result<Vec<(&'static str, Vec<u8>)>, GpuError> {
    compile_all(sm_arch, cache, "cubin", nvrtc_cubin)
}

/// One NVRTC compilation to a cubin; the error is NVRTC's log.
fn nvrtc_cubin(stem: &str, source: &str, options: &[String]) -> Result<Vec<u8>, String> {
    nvrtc_compile(stem, source, options, nvrtc::Image::Cubin)
}

/// One NVRTC compilation of `kernels/<stem>.cu` (expanded) to `image`.
fn nvrtc_compile(
    stem: &str,
    source: &str,
    options: &[String],
    image: nvrtc::Image,
) -> Result<Vec<u8>, String> {
    let compiler = nvrtc::nvrtc().map_err(|e| e.to_string())?;
    let compile = || compiler.compile(&format!("{stem}.cu"), source, options, image);
    catch_unwind(AssertUnwindSafe(compile)).unwrap_or_else(|_| Err("libnvrtc panicked".into()))
}

/// `major * 1000 + minor * 10` of a `major.minor` version, as the driver
/// reports its own (`12.9` → 12090).
fn cuda_version_number(text: &str) -> Option<i32> {
    let (major, minor) = text.split_once('.')?;
    Some(major.parse::<i32>().ok()? * 1000 + minor.parse::<i32>().ok()? * 10)
}

/// A projection's values, Arrow validity bytes and first overflowing row.
type ProjectResult<T> = (Vec<T>, Vec<u8>, Option<u64>);

/// The kernel modules for `device`: cubins for its architecture, else PTX
/// for the driver to JIT, which needs a driver at least as new as NVRTC.
fn kernel_images(
    device: &GpuDevice,
    cache: &PtxCache,
) -> Result<Vec<(&'static str, Ptx)>, GpuError> {
    let (major, minor) = device.compute_capability;
    let cubin_error = match compile_cubins(&format!("sm_{major}{minor}"), cache) {
        Ok(cubins) => {
            return Ok(cubins
                .into_iter()
                .map(|(stem, cubin)| (stem, Ptx::from_binary(cubin)))
                .collect());
        }
        Err(e) => e,
    };
    let nvrtc = nvrtc_version()?;
    if let (Some(driver), Some(needed)) = (driver_version(), cuda_version_number(&nvrtc))
        && driver < needed
    {
        return Err(GpuError::NoGpu {
            reason: format!(
                "the CUDA driver supports CUDA {}.{} but NVRTC {nvrtc} makes PTX only CUDA {nvrtc} or newer loads, \
                 and compiling cubins failed ({cubin_error}); update the driver or use an NVRTC no newer than it",
                driver / 1000,
                driver % 1000 / 10
            ),
        });
    }
    tracing::warn!(
        "cubins for {} failed ({cubin_error}); loading PTX for the driver to compile",
        device.name
    );
    Ok(compile_modules(&device.nvrtc_arch(), cache)?
        .into_iter()
        .map(|(stem, ptx)| (stem, Ptx::from_src(ptx)))
        .collect())
}

/// Lets the device's stream-ordered memory pool keep up to `bytes` of
/// freed allocations instead of returning them to the driver at every
/// synchronization: a chain allocates the same buffers batch after batch,
/// and with the default threshold (0) each batch would pay cuMemAlloc
/// again. The slot budget still bounds what is in use. Failing to set it
/// only costs speed, so it is logged, not an error.
fn keep_freed_device_memory(context: &Arc<CudaContext>, bytes: u64) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = bytes;
    // SAFETY: `pool` and `threshold` are live locals the driver writes or
    // reads during the calls; the device handle is the context's own.
    let result = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .and_then(|()| {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
                .result()
            })
    };
    if let Err(e) = result {
        tracing::warn!("GPU memory pool keeps nothing freed (release threshold not set: {e})");
    }
}

/// A driver error of slot `slot_index` as a kernel error; the device's own
/// out-of-memory is one the caller may split on, like the pool's.
fn driver_error_in(
    slot_index: usize,
    call: &'static str,
    bytes: u64,
) -> impl Fn(DriverError) -> KernelError {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            KernelError::DeviceOutOfMemory(PoolError::DeviceRefused {
                slot_index,
                requested_bytes: bytes,
            })
        } else {
            KernelError::Gpu(driver(call)(e))
        }
    }
}

/// The kernels of one GPU, launched on one stream, within one slot's budget.
pub struct CudaBackend {
    device: GpuDevice,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pool: SlotPool,
    /// Fused chains' modules and the slot's pinned staging.
    chains: chain::ChainCache,
    /// The device's primary context, shared with the other slots on it.
    lease: Lease<CudaContext>,
}

/// The contexts of the GPUs this process uses (see [`super::contexts`]).
static CONTEXTS: std::sync::LazyLock<DeviceContexts<CudaContext>> =
    std::sync::LazyLock::new(DeviceContexts::default);

/// Destroys everything in device `ordinal`'s primary context, so that the
/// next retain makes a working one after a sticky error. Called only once
/// no backend holds the context ([`DeviceContexts::lease`]).
fn reset_primary_context(ordinal: u32) -> Result<(), DriverError> {
    cudarc::driver::result::init()?;
    let device = cudarc::driver::result::device::get(ordinal as i32)?;
    // SAFETY: `device` is a handle the driver just returned; no object of
    // this process lives in the context any more (the registry resets
    // only after the last holder dropped it), so nothing is used after
    // the reset frees it.
    unsafe { cudarc::driver::sys::cuDevicePrimaryCtxReset_v2(device) }.result()
}

impl CudaBackend {
    /// Opens `device`, compiles the kernels (or loads them from `cache`) and
    /// loads them; launches then reserve device memory from `pool`.
    pub fn new(device: &GpuDevice, pool: SlotPool, cache: &PtxCache) -> Result<Self, GpuError> {
        let open = || -> Result<_, GpuError> {
            let lease = CONTEXTS
                .lease(
                    device.ordinal,
                    || CudaContext::new(device.ordinal as usize),
                    || reset_primary_context(device.ordinal),
                )
                .map_err(|e| match e {
                    OpenError::Open(e) => driver("cuDevicePrimaryCtxRetain")(e),
                    OpenError::Reset { source, .. } => driver("cuDevicePrimaryCtxReset")(source),
                    waiting @ OpenError::WaitingForRelease { .. } => GpuError::NoGpu {
                        reason: waiting.to_string(),
                    },
                })?;
            let context = Arc::clone(&lease.context);
            let modules = kernel_images(device, cache)?;
            let mut functions = HashMap::new();
            for (stem, image) in modules {
                let module = context
                    .load_module(image)
                    .map_err(driver("cuModuleLoadData"))?;
                for (_, name) in ENTRY_POINTS.iter().filter(|(s, _)| *s == stem) {
                    let function = module
                        .load_function(name)
                        .map_err(driver("cuModuleGetFunction"))?;
                    functions.insert(*name, function);
                }
            }
            // One stream per slot backend, so that slots sharing a GPU do
            // not serialise on the legacy default stream.
            let stream = context.new_stream().map_err(driver("cuStreamCreate"))?;
            // SAFETY: cudarc records an event on every buffer use so that
            // buffers shared across streams are ordered; here every device
            // buffer is allocated, used and freed on one stream (the
            // backend's, or one of the two streams of a chain batch's lane),
            // and each call synchronizes its streams before it returns (a
            // submitted chain batch: before it completes or is dropped), so
            // the ~28 event calls per launch order nothing.
            unsafe { context.disable_event_tracking() };
            // The device's default pool is shared by its slots: keep what
            // all of them may use, not one slot's share (the last slot to
            // open would otherwise set it for all).
            keep_freed_device_memory(&context, pool.device_budget_bytes());
            Ok((stream, functions, lease))
        };
        let (stream, functions, lease) =
            catch_unwind(AssertUnwindSafe(open)).map_err(|_| GpuError::NoGpu {
                reason: format!("opening GPU {} panicked in the CUDA driver", device.ordinal),
            })??;
        Ok(CudaBackend {
            device: device.clone(),
            stream,
            functions,
            pool,
            chains: chain::ChainCache::default(),
            lease,
        })
    }

    /// Whether this backend's context was found broken by a sticky error
    /// (here or by another slot on the device).
    pub fn context_lost(&self) -> bool {
        self.lease.lost()
    }

    /// After a device error: a sticky one breaks the whole context, so
    /// every later call fails with it, `cuCtxSynchronize` included. Marks
    /// the context lost (for every backend on the device) when it does.
    pub fn probe_context(&self) -> bool {
        let sticky = catch_unwind(AssertUnwindSafe(|| self.stream.context().synchronize()))
            .map_or(true, |r| {
                r.is_err_and(|e| e.0 != cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
            });
        if sticky {
            self.lease.mark_lost();
        }
        sticky
    }

    /// A generated module (a fused chain's, an aggregation table's) with
    /// its embedded headers expanded, as a cubin for this device: compiled
    /// by NVRTC with `options` (no FMA contraction) or loaded from the
    /// kernel cache, then loaded into the context.
    fn load_generated(
        &self,
        stem: &'static str,
        generated: &str,
    ) -> Result<Arc<cudarc::driver::CudaModule>, KernelError> {
        let source = super::source::expand_generated(stem, generated)
            .map_err(|e| KernelError::Gpu(GpuError::from(e)))?;
        let (major, minor) = self.device.compute_capability;
        let arch = format!("sm_{major}{minor}");
        let mut options = vec![format!("--gpu-architecture={arch}")];
        options.extend(
            crate::kernels::chain::cuda_src::COMPILE_OPTIONS
                .iter()
                .map(|o| (*o).to_owned()),
        );
        let cache = PtxCache::new(PtxCache::default_dir());
        let nvrtc_version = nvrtc_version()?;
        let driver_version = driver_version().map_or_else(|| "none".to_owned(), |v| v.to_string());
        let options_text = options.join(" ");
        let key = CacheKey {
            expanded_source: &source,
            arch: &arch,
            nvrtc_version: &nvrtc_version,
            options: &options_text,
            driver_version: &driver_version,
        };
        let (cubin, _) = cache.get_or_compile_bytes(stem, key, "cubin", || {
            nvrtc_cubin(stem, &source, &options).map_err(|log| GpuError::Compile {
                stem,
                arch: arch.clone(),
                log,
            })
        })?;
        self.stream
            .context()
            .load_module(Ptx::from_binary(cubin))
            .map_err(self.driver_error("cuModuleLoadData", 0))
    }

    /// Entry `name` of a generated module.
    fn generated_function(
        module: &Arc<cudarc::driver::CudaModule>,
        name: &'static str,
    ) -> Result<CudaFunction, KernelError> {
        module
            .load_function(name)
            .map_err(|_| KernelError::Gpu(GpuError::MissingKernel { name }))
    }

    fn function(&self, name: &'static str) -> Result<&CudaFunction, KernelError> {
        self.functions
            .get(name)
            .ok_or(KernelError::Gpu(GpuError::MissingKernel { name }))
    }

    fn reserve(&self, bytes: u64) -> Result<super::pool::DeviceReservation, KernelError> {
        self.pool
            .reserve(bytes)
            .map_err(KernelError::DeviceOutOfMemory)
    }

    /// A driver error as a kernel error; the device's own out-of-memory is
    /// one the caller may split on, like the pool's.
    fn driver_error(&self, call: &'static str, bytes: u64) -> impl Fn(DriverError) -> KernelError {
        driver_error_in(self.pool.slot_index(), call, bytes)
    }

    fn upload<T: DeviceRepr>(&self, host: &[T], bytes: u64) -> Result<CudaSlice<T>, KernelError> {
        self.stream
            .clone_htod(host)
            .map_err(self.driver_error("cuMemcpyHtoD", bytes))
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
        bytes: u64,
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(self.driver_error("cuMemAlloc", bytes))
    }

    fn download<T: DeviceRepr>(&self, device: &CudaSlice<T>) -> Result<Vec<T>, KernelError> {
        let host = self
            .stream
            .clone_dtoh(device)
            .map_err(self.driver_error("cuMemcpyDtoH", 0))?;
        self.stream
            .synchronize()
            .map_err(self.driver_error("cuStreamSynchronize", 0))?;
        Ok(host)
    }

    /// A column's validity on the device (its whole bitmap buffer and the
    /// bit offset of row 0), or `None` when every row is valid.
    fn upload_validity(
        &self,
        array: &dyn Array,
        bytes: u64,
    ) -> Result<(Option<CudaSlice<u8>>, u64), KernelError> {
        match array.nulls() {
            None => Ok((None, 0)),
            Some(nulls) => {
                let (window, bit_offset) = super::validity_window(nulls.inner());
                Ok((Some(self.upload(window, bytes)?), bit_offset))
            }
        }
    }

    fn launch_config(&self, work_items: usize) -> LaunchConfig {
        let blocks = work_items.div_ceil(BLOCK_THREADS as usize).max(1);
        LaunchConfig {
            grid_dim: (blocks.min(GRID_BLOCKS_MAX as usize) as u32, 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn filter<T: ArrowPrimitiveType>(
        &self,
        name: &'static str,
        array: &PrimitiveArray<T>,
        op: CmpOp,
        literal: T::Native,
    ) -> Result<BooleanArray, KernelError>
    where
        T::Native: DeviceRepr,
    {
        let row_count = array.len();
        if row_count == 0 {
            // The driver refuses zero-byte allocations; nothing to launch.
            return Ok(BooleanArray::new(boolean_buffer(Vec::new(), 0), None));
        }
        let bytes = LaunchBytes { row_count }.filter();
        let _held = self.reserve(bytes)?;
        let values = self.upload(array.values().as_ref(), bytes)?;
        let (validity, validity_offset) = self.upload_validity(array, bytes)?;
        let word_count = row_count.div_ceil(32);
        let mut selection = self.zeros::<u32>(word_count, bytes)?;
        let mut selected_count = self.zeros::<u64>(1, bytes)?;
        let null_pointer = 0u64;
        let (rows, code) = (row_count as u64, op.code());
        let function = self.function(name)?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(&values);
        match &validity {
            Some(bits) => launch.arg(bits),
            None => launch.arg(&null_pointer),
        };
        launch
            .arg(&validity_offset)
            .arg(&rows)
            .arg(&code)
            .arg(&literal)
            .arg(&mut selection)
            .arg(&mut selected_count);
        // SAFETY: the arguments match `filter_<type>` in kernels/filter.cu
        // one for one (values, validity or a null pointer, bit offset, row
        // count, operator code, literal, selection words, counter); the
        // device buffers hold `row_count` values, the validity bits of
        // `validity_offset + row_count` rows and `word_count` words; all of
        // them live until `download` has synchronized the stream.
        unsafe { launch.launch(self.launch_config(word_count * 32)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        let words = self.download(&selection)?;
        let mut bitmap: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bitmap.truncate(bitmap_len_bytes(row_count));
        Ok(BooleanArray::new(boolean_buffer(bitmap, row_count), None))
    }

    fn project<T: ArrowPrimitiveType>(
        &self,
        names: (&'static str, &'static str),
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, T>>,
        checks_overflow: bool,
    ) -> Result<ProjectResult<T::Native>, KernelError>
    where
        T::Native: DeviceRepr + ValidAsZeroBits,
    {
        let (column_name, literal_name) = names;
        let row_count = match (operands.left, operands.right) {
            (ArrayOperand::Array(array), _) | (_, ArrayOperand::Array(array)) => array.len(),
            _ => return Err(ProjectError::NoColumnOperand.into()),
        };
        if let (ArrayOperand::Array(left), ArrayOperand::Array(right)) =
            (operands.left, operands.right)
            && left.len() != right.len()
        {
            return Err(ProjectError::RowCountMismatch {
                left_rows: left.len(),
                right_rows: right.len(),
            }
            .into());
        }
        if row_count == 0 {
            return Ok((Vec::new(), Vec::new(), None));
        }
        let bytes = LaunchBytes { row_count }.project();
        let _held = self.reserve(bytes)?;
        let word_count = row_count.div_ceil(32);
        let mut out = self.zeros::<T::Native>(row_count, bytes)?;
        let mut out_validity = self.zeros::<u32>(word_count, bytes)?;
        let mut first_overflow_row = self.upload(&[u64::MAX], bytes)?;
        let null_pointer = 0u64;
        let (rows, code) = (row_count as u64, op.code());
        let config = self.launch_config(word_count * 32);
        match (operands.left, operands.right) {
            (ArrayOperand::Array(left), ArrayOperand::Array(right)) => {
                let left_values = self.upload(left.values().as_ref(), bytes)?;
                let right_values = self.upload(right.values().as_ref(), bytes)?;
                let (left_validity, left_offset) = self.upload_validity(left, bytes)?;
                let (right_validity, right_offset) = self.upload_validity(right, bytes)?;
                let function = self.function(column_name)?;
                let mut launch = self.stream.launch_builder(function);
                launch.arg(&left_values);
                match &left_validity {
                    Some(bits) => launch.arg(bits),
                    None => launch.arg(&null_pointer),
                };
                launch.arg(&left_offset).arg(&right_values);
                match &right_validity {
                    Some(bits) => launch.arg(bits),
                    None => launch.arg(&null_pointer),
                };
                launch
                    .arg(&right_offset)
                    .arg(&rows)
                    .arg(&code)
                    .arg(&mut out)
                    .arg(&mut out_validity);
                if checks_overflow {
                    launch.arg(&mut first_overflow_row);
                }
                // SAFETY: the arguments match `project_<type>_columns` in
                // kernels/project.cu one for one (the f64 entry has no
                // overflow row); both columns hold `row_count` values and
                // their validity bits; the outputs hold `row_count` values
                // and `word_count` words; every buffer lives until
                // `download` has synchronized the stream.
                unsafe { launch.launch(config) }
                    .map_err(self.driver_error("cuLaunchKernel", bytes))?;
            }
            (column, literal) => {
                let literal_on_left = u32::from(matches!(column, ArrayOperand::Literal(_)));
                let (ArrayOperand::Array(array), ArrayOperand::Literal(value)) =
                    (if literal_on_left == 1 {
                        (literal, column)
                    } else {
                        (column, literal)
                    })
                else {
                    return Err(ProjectError::NoColumnOperand.into());
                };
                let values = self.upload(array.values().as_ref(), bytes)?;
                let (validity, offset) = self.upload_validity(array, bytes)?;
                let function = self.function(literal_name)?;
                let mut launch = self.stream.launch_builder(function);
                launch.arg(&values);
                match &validity {
                    Some(bits) => launch.arg(bits),
                    None => launch.arg(&null_pointer),
                };
                launch
                    .arg(&offset)
                    .arg(&value)
                    .arg(&literal_on_left)
                    .arg(&rows)
                    .arg(&code)
                    .arg(&mut out)
                    .arg(&mut out_validity);
                if checks_overflow {
                    launch.arg(&mut first_overflow_row);
                }
                // SAFETY: the arguments match `project_<type>_literal` in
                // kernels/project.cu one for one; the column holds
                // `row_count` values and their validity bits; the outputs
                // hold `row_count` values and `word_count` words; every
                // buffer lives until `download` has synchronized the stream.
                unsafe { launch.launch(config) }
                    .map_err(self.driver_error("cuLaunchKernel", bytes))?;
            }
        }
        let values = self.download(&out)?;
        let words = self.download(&out_validity)?;
        let mut validity: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        validity.truncate(bitmap_len_bytes(row_count));
        let overflow_row = if checks_overflow {
            self.download(&first_overflow_row)?
                .first()
                .copied()
                .filter(|row| *row != u64::MAX)
        } else {
            None
        };
        Ok((values, validity, overflow_row))
    }
}

impl CudaBackend {
    /// One aggregation of a batch in a device table of `capacity` slots:
    /// the groups in the kernel's order, or `None` when the table was full
    /// (the caller retries with a bigger one).
    fn aggregate_in_table(
        &self,
        input: KeyedArrays<'_>,
        capacity: u64,
    ) -> Result<Option<Vec<Group>>, KernelError> {
        let row_count = input.keys.len();
        let bytes = LaunchBytes { row_count }.aggregate(capacity);
        let _held = self.reserve(bytes)?;
        let slot_count = capacity as usize + 2;
        let keys = self.upload(input.keys.values().as_ref(), bytes)?;
        let (key_validity, key_validity_offset) = self.upload_validity(input.keys, bytes)?;
        let values = self.upload(input.values.values().as_ref(), bytes)?;
        let (value_validity, value_validity_offset) = self.upload_validity(input.values, bytes)?;
        let mut table_keys = self.zeros::<i64>(slot_count, bytes)?;
        let mut counts = self.zeros::<u64>(slot_count, bytes)?;
        let mut sum_low = self.zeros::<u64>(slot_count, bytes)?;
        let mut sum_high = self.zeros::<u64>(slot_count, bytes)?;
        let mut mins = self.zeros::<i64>(slot_count, bytes)?;
        let mut maxs = self.zeros::<i64>(slot_count, bytes)?;
        let mut special_used = self.zeros::<u32>(2, bytes)?;
        let mut table_full = self.zeros::<u32>(1, bytes)?;
        let null_pointer = 0u64;
        let rows = row_count as u64;

        let mut launch = self.stream.launch_builder(self.function("aggregate_init")?);
        launch
            .arg(&mut table_keys)
            .arg(&mut counts)
            .arg(&mut sum_low)
            .arg(&mut sum_high)
            .arg(&mut mins)
            .arg(&mut maxs)
            .arg(&mut special_used)
            .arg(&capacity);
        // SAFETY: the arguments match `aggregate_init` in
        // kernels/aggregate.cu one for one (table keys, counts, sum low and
        // high words, mins, maxs, the two special-slot flags, capacity);
        // `capacity` is a power of two (else the kernel traps); every table
        // array holds `capacity + 2` entries and `special_used` two; all
        // live until `download` has synchronized the stream.
        unsafe { launch.launch(self.launch_config(slot_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;

        let mut launch = self
            .stream
            .launch_builder(self.function("aggregate_update")?);
        launch.arg(&keys);
        match &key_validity {
            Some(bits) => launch.arg(bits),
            None => launch.arg(&null_pointer),
        };
        launch.arg(&key_validity_offset).arg(&values);
        match &value_validity {
            Some(bits) => launch.arg(bits),
            None => launch.arg(&null_pointer),
        };
        launch
            .arg(&value_validity_offset)
            .arg(&rows)
            .arg(&mut table_keys)
            .arg(&mut counts)
            .arg(&mut sum_low)
            .arg(&mut sum_high)
            .arg(&mut mins)
            .arg(&mut maxs)
            .arg(&mut special_used)
            .arg(&capacity)
            .arg(&mut table_full);
        // SAFETY: the arguments match `aggregate_update` in
        // kernels/aggregate.cu one for one (keys, key validity or a null
        // pointer, its bit offset, values, value validity or a null pointer,
        // its bit offset, row count, the seven table arrays in `init`'s
        // order, capacity, the table-full flag); keys and values hold
        // `row_count` elements and the validity their bits; the table is
        // the one `aggregate_init` filled, earlier on the same stream.
        unsafe { launch.launch(self.launch_config(row_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        if self.download(&table_full)?[0] != 0 {
            return Ok(None);
        }

        // Every group got at least one row: `row_count` outputs suffice.
        let mut group_keys = self.zeros::<i64>(row_count, bytes)?;
        let mut group_key_valid = self.zeros::<u8>(row_count, bytes)?;
        let mut group_counts = self.zeros::<u64>(row_count, bytes)?;
        let mut group_sums = self.zeros::<i64>(row_count, bytes)?;
        let mut group_sum_overflowed = self.zeros::<u8>(row_count, bytes)?;
        let mut group_mins = self.zeros::<i64>(row_count, bytes)?;
        let mut group_maxs = self.zeros::<i64>(row_count, bytes)?;
        let mut group_count = self.zeros::<u64>(1, bytes)?;
        let mut launch = self
            .stream
            .launch_builder(self.function("aggregate_compact")?);
        launch
            .arg(&table_keys)
            .arg(&counts)
            .arg(&sum_low)
            .arg(&sum_high)
            .arg(&mins)
            .arg(&maxs)
            .arg(&special_used)
            .arg(&capacity)
            .arg(&mut group_keys)
            .arg(&mut group_key_valid)
            .arg(&mut group_counts)
            .arg(&mut group_sums)
            .arg(&mut group_sum_overflowed)
            .arg(&mut group_mins)
            .arg(&mut group_maxs)
            .arg(&mut group_count);
        // SAFETY: the arguments match `aggregate_compact` in
        // kernels/aggregate.cu one for one (the seven table arrays,
        // capacity, then group keys, key validity bytes, counts, sums,
        // overflow bytes, mins, maxs, and the group counter, zeroed as it
        // requires); the used slots are at most the distinct keys, so at
        // most `row_count` (> 0) groups are written into outputs of
        // `row_count` entries; all live until `download` has synchronized
        // the stream.
        unsafe { launch.launch(self.launch_config(slot_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        let group_count = self.download(&group_count)?[0] as usize;
        assert!(group_count <= row_count, "more groups than rows");
        let keys = self.download(&group_keys)?;
        let key_valid = self.download(&group_key_valid)?;
        let counts = self.download(&group_counts)?;
        let sums = self.download(&group_sums)?;
        let overflowed = self.download(&group_sum_overflowed)?;
        let mins = self.download(&group_mins)?;
        let maxs = self.download(&group_maxs)?;
        let key_of = |group: usize| (key_valid[group] != 0).then_some(keys[group]);
        let overflowed_key = (0..group_count)
            .filter(|&group| overflowed[group] != 0)
            .map(key_of)
            .min();
        if let Some(key) = overflowed_key {
            return Err(AggregateError::SumOverflow { key }.into());
        }
        let groups = (0..group_count)
            .map(|group| {
                let present = counts[group] > 0;
                Group {
                    key: key_of(group),
                    stats: GroupStats {
                        count: counts[group],
                        sum: present.then_some(sums[group]),
                        min: present.then_some(mins[group]),
                        max: present.then_some(maxs[group]),
                    },
                }
            })
            .collect();
        Ok(Some(groups))
    }
}

impl KernelBackend for CudaBackend {
    fn tier(&self) -> Tier {
        Tier::Gpu
    }

    fn context_lost(&self) -> bool {
        CudaBackend::context_lost(self)
    }

    fn probe_after_error(&self) -> bool {
        self.probe_context()
    }

    fn describe(&self) -> String {
        format!(
            "CUDA GPU {} {} (slot {} budget {} MiB)",
            self.device.ordinal,
            self.device.name,
            self.pool.slot_index(),
            self.pool.budget_bytes() >> 20
        )
    }

    fn filter_i64(
        &self,
        array: &Int64Array,
        op: CmpOp,
        literal: i64,
    ) -> Result<BooleanArray, KernelError> {
        self.filter("filter_i64", array, op, literal)
    }

    fn filter_f64(
        &self,
        array: &Float64Array,
        op: CmpOp,
        literal: f64,
    ) -> Result<BooleanArray, KernelError> {
        self.filter("filter_f64", array, op, literal)
    }

    fn project_i64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Int64Type>>,
    ) -> Result<Int64Array, KernelError> {
        if op == ArithOp::Div {
            return Err(ProjectError::UnsupportedInt64Op { op }.into());
        }
        let names = ("project_i64_columns", "project_i64_literal");
        let (values, validity, overflow_row) = self.project(names, op, operands, true)?;
        if let Some(row) = overflow_row {
            // The kernel names the row; the operands come from the host.
            let row = row as usize;
            let value_at = |operand: ArrayOperand<'_, Int64Type>| match operand {
                ArrayOperand::Array(array) => array.value(row),
                ArrayOperand::Literal(value) => value,
            };
            return Err(ProjectError::Overflow {
                row,
                op,
                left: value_at(operands.left),
                right: value_at(operands.right),
            }
            .into());
        }
        let row_count = values.len();
        Ok(Int64Array::new(
            ScalarBuffer::from(values),
            null_buffer(validity, row_count),
        ))
    }

    fn project_f64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Float64Type>>,
    ) -> Result<Float64Array, KernelError> {
        let names = ("project_f64_columns", "project_f64_literal");
        let (values, validity, _) = self.project(names, op, operands, false)?;
        let row_count = values.len();
        Ok(Float64Array::new(
            ScalarBuffer::from(values),
            null_buffer(validity, row_count),
        ))
    }

    fn hash_i64(
        &self,
        array: &Int64Array,
        mode: HashMode,
        hashes: &mut [u64],
    ) -> Result<(), KernelError> {
        let row_count = array.len();
        assert_eq!(hashes.len(), row_count, "one hash per row");
        if row_count == 0 {
            return Ok(());
        }
        let bytes = LaunchBytes { row_count }.hash();
        let _held = self.reserve(bytes)?;
        let values = self.upload(array.values().as_ref(), bytes)?;
        let (validity, validity_offset) = self.upload_validity(array, bytes)?;
        let mut device_hashes = self.upload(hashes, bytes)?;
        let null_pointer = 0u64;
        let (rows, code) = (row_count as u64, mode.code());
        let function = self.function("hash_i64")?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(&values);
        match &validity {
            Some(bits) => launch.arg(bits),
            None => launch.arg(&null_pointer),
        };
        launch
            .arg(&validity_offset)
            .arg(&rows)
            .arg(&code)
            .arg(&mut device_hashes);
        // SAFETY: the arguments match `hash_i64` in kernels/hash.cu one for
        // one; `values` and `device_hashes` hold `row_count` elements and the
        // validity the bits of its rows; all live until `download` has
        // synchronized the stream.
        unsafe { launch.launch(self.launch_config(row_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        hashes.copy_from_slice(&self.download(&device_hashes)?);
        Ok(())
    }

    fn partition_hashes(
        &self,
        hashes: &[u64],
        routing: Routing,
    ) -> Result<Partitioning, KernelError> {
        let row_count = hashes.len();
        if u32::try_from(row_count).is_err() {
            return Err(PartitionError::TooManyRows { row_count }.into());
        }
        let parallelism = routing.parallelism();
        let partition_count = parallelism as usize;
        if row_count == 0 {
            return Ok(Partitioning {
                partition_ids: Vec::new(),
                partition_offsets: vec![0; partition_count + 1],
                rows: Vec::new(),
            });
        }
        let bytes = LaunchBytes { row_count }.partition(parallelism);
        let _held = self.reserve(bytes)?;
        let device_hashes = self.upload(hashes, bytes)?;
        let mut partition_ids = self.zeros::<u32>(row_count, bytes)?;
        let mut partition_counts = self.zeros::<u32>(partition_count, bytes)?;
        let mut partition_offsets = self.zeros::<u32>(partition_count + 1, bytes)?;
        let mut cursors = self.zeros::<u32>(partition_count, bytes)?;
        let mut rows = self.zeros::<u32>(row_count, bytes)?;
        let (rows_u64, max_parallelism) = (row_count as u64, routing.max_parallelism());

        let mut launch = self
            .stream
            .launch_builder(self.function("partition_assign")?);
        launch
            .arg(&device_hashes)
            .arg(&rows_u64)
            .arg(&max_parallelism)
            .arg(&parallelism)
            .arg(&mut partition_ids)
            .arg(&mut partition_counts);
        // SAFETY: the arguments match `partition_assign` in
        // kernels/partition.cu one for one (hashes, row count as u64, max
        // parallelism and parallelism as u32, partition ids, counts); `Routing`
        // guarantees 1 <= parallelism <= max parallelism (else the kernel
        // traps); `device_hashes` and `partition_ids` hold `row_count`
        // elements and `partition_counts` `parallelism`, zeroed as the kernel
        // requires; all live until `download` has synchronized the stream.
        unsafe { launch.launch(self.launch_config(row_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;

        let scan_threads = parallelism
            .div_ceil(32)
            .saturating_mul(32)
            .clamp(32, SCAN_BLOCK_THREADS_MAX);
        let scan_config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (scan_threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self
            .stream
            .launch_builder(self.function("partition_offsets")?);
        launch
            .arg(&partition_counts)
            .arg(&parallelism)
            .arg(&mut partition_offsets)
            .arg(&mut cursors);
        // SAFETY: the arguments match `partition_offsets` in
        // kernels/partition.cu one for one (counts, parallelism as u32,
        // offsets, cursors); one block of a multiple of 32 threads, at most
        // 1024, as the kernel requires; the offsets hold `parallelism + 1`
        // entries and the counts and cursors `parallelism`; the launch is on
        // the same stream, after `partition_assign`.
        unsafe { launch.launch(scan_config) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;

        let word_count = row_count.div_ceil(32);
        let mut launch = self
            .stream
            .launch_builder(self.function("partition_scatter")?);
        launch
            .arg(&partition_ids)
            .arg(&rows_u64)
            .arg(&mut cursors)
            .arg(&mut rows);
        // SAFETY: the arguments match `partition_scatter` in
        // kernels/partition.cu one for one (partition ids, row count as u64,
        // cursors, rows); whole warps (BLOCK_THREADS is a multiple of 32),
        // one warp per 32 rows; `rows` holds `row_count` slots and the
        // cursors start at the offsets, so every row gets one slot; the
        // launch follows `partition_offsets` on the same stream.
        unsafe { launch.launch(self.launch_config(word_count * 32)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;

        let partition_ids = self.download(&partition_ids)?;
        let mut partition_offsets = self.download(&partition_offsets)?;
        let mut rows = self.download(&rows)?;
        partition_offsets.truncate(partition_count + 1);
        rows.truncate(row_count);
        // The scatter's order inside a partition is unspecified: row order,
        // as the twin gives, makes the result the same on every tier.
        for window in partition_offsets.windows(2) {
            rows[window[0] as usize..window[1] as usize].sort_unstable();
        }
        Ok(Partitioning {
            partition_ids,
            partition_offsets,
            rows,
        })
    }

    fn standardize_fit(&self, array: &Float64Array) -> Result<ColumnStats, KernelError> {
        let row_count = array.len();
        if row_count == 0 {
            // No counted value: mean 0 and std 0, as `standardize_stats` says.
            return Ok(ColumnStats {
                mean: 0.0,
                std: 0.0,
            });
        }
        let bytes = LaunchBytes { row_count }.standardize_fit();
        let _held = self.reserve(bytes)?;
        let values = self.upload(array.values().as_ref(), bytes)?;
        let (validity, validity_offset) = self.upload_validity(array, bytes)?;
        let null_pointer = 0u64;
        let rows = row_count as u64;
        let reduce_config = |chunks: usize| LaunchConfig {
            grid_dim: (chunks.min(GRID_BLOCKS_MAX as usize) as u32, 1, 1),
            block_dim: (REDUCE_BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };

        let mut partial_count = chunk_count(row_count);
        let mut sums = self.zeros::<f64>(partial_count, bytes)?;
        let mut sum_squares = self.zeros::<f64>(partial_count, bytes)?;
        let mut counts = self.zeros::<u64>(partial_count, bytes)?;
        let mut launch = self
            .stream
            .launch_builder(self.function("standardize_moments")?);
        launch.arg(&values);
        match &validity {
            Some(bits) => launch.arg(bits),
            None => launch.arg(&null_pointer),
        };
        launch
            .arg(&validity_offset)
            .arg(&rows)
            .arg(&mut sums)
            .arg(&mut sum_squares)
            .arg(&mut counts);
        // SAFETY: the arguments match `standardize_moments` in
        // kernels/standardize.cu one for one (values, validity or a null
        // pointer, bit offset, row count, partial sums, sums of squares,
        // counts); blocks of exactly REDUCE_CHUNK_ROWS threads as it
        // requires; `values` holds `row_count` values and the validity their
        // bits; the partials hold `chunk_count(row_count)` entries, one per
        // chunk; all live until `download` has synchronized the stream.
        unsafe { launch.launch(reduce_config(partial_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;

        while partial_count > 1 {
            let merged_count = chunk_count(partial_count);
            let mut merged_sums = self.zeros::<f64>(merged_count, bytes)?;
            let mut merged_squares = self.zeros::<f64>(merged_count, bytes)?;
            let mut merged_counts = self.zeros::<u64>(merged_count, bytes)?;
            let partials = partial_count as u64;
            let mut launch = self
                .stream
                .launch_builder(self.function("standardize_moments_merge")?);
            launch
                .arg(&sums)
                .arg(&sum_squares)
                .arg(&counts)
                .arg(&partials)
                .arg(&mut merged_sums)
                .arg(&mut merged_squares)
                .arg(&mut merged_counts);
            // SAFETY: the arguments match `standardize_moments_merge` in
            // kernels/standardize.cu one for one (sums, sums of squares,
            // counts, partial count, and the three merged outputs); blocks
            // of REDUCE_CHUNK_ROWS threads; the inputs hold `partial_count`
            // entries and the outputs `chunk_count(partial_count)`; the
            // inputs replaced below are freed in stream order (cudarc's
            // `CudaSlice` drop frees asynchronously on this stream, or
            // synchronizes it first), so after this launch has read them.
            unsafe { launch.launch(reduce_config(merged_count)) }
                .map_err(self.driver_error("cuLaunchKernel", bytes))?;
            sums = merged_sums;
            sum_squares = merged_squares;
            counts = merged_counts;
            partial_count = merged_count;
        }

        let mut mean = self.zeros::<f64>(1, bytes)?;
        let mut std = self.zeros::<f64>(1, bytes)?;
        let column_count = 1u64;
        let mut launch = self
            .stream
            .launch_builder(self.function("standardize_stats")?);
        launch
            .arg(&sums)
            .arg(&sum_squares)
            .arg(&counts)
            .arg(&column_count)
            .arg(&mut mean)
            .arg(&mut std);
        // SAFETY: the arguments match `standardize_stats` in
        // kernels/standardize.cu one for one (sum, sum of squares, count,
        // column count, mean, std); one column: the final moments hold one
        // entry each, as do `mean` and `std`.
        unsafe { launch.launch(self.launch_config(1)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        let mean = self.download(&mean)?[0];
        let std = self.download(&std)?[0];
        Ok(ColumnStats { mean, std })
    }

    fn standardize_apply(
        &self,
        array: &Float64Array,
        stats: ColumnStats,
    ) -> Result<Float64Array, KernelError> {
        let row_count = array.len();
        if row_count == 0 {
            return Ok(Float64Array::new(
                ScalarBuffer::from(Vec::<f64>::new()),
                None,
            ));
        }
        let bytes = LaunchBytes { row_count }.standardize_apply();
        let _held = self.reserve(bytes)?;
        let values = self.upload(array.values().as_ref(), bytes)?;
        let (validity, validity_offset) = self.upload_validity(array, bytes)?;
        let mean = self.upload(&[stats.mean], bytes)?;
        let std = self.upload(&[stats.std], bytes)?;
        let mut out = self.zeros::<f64>(row_count, bytes)?;
        let null_pointer = 0u64;
        let rows = row_count as u64;
        let mut launch = self
            .stream
            .launch_builder(self.function("standardize_apply")?);
        launch.arg(&values);
        match &validity {
            Some(bits) => launch.arg(bits),
            None => launch.arg(&null_pointer),
        };
        launch
            .arg(&validity_offset)
            .arg(&rows)
            .arg(&mean)
            .arg(&std)
            .arg(&mut out);
        // SAFETY: the arguments match `standardize_apply` in
        // kernels/standardize.cu one for one (values, validity or a null
        // pointer, bit offset, row count, mean, std, out); `values` and `out`
        // hold `row_count` values, `mean` and `std` one each; all live until
        // `download` has synchronized the stream.
        unsafe { launch.launch(self.launch_config(row_count)) }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        let mut z = self.download(&out)?;
        z.truncate(row_count);
        Ok(Float64Array::new(
            ScalarBuffer::from(z),
            array.nulls().cloned(),
        ))
    }

    fn aggregate_i64(&self, input: KeyedArrays<'_>) -> Result<Vec<Group>, KernelError> {
        let row_count = check_keyed_rows(input)?;
        if row_count == 0 {
            return Ok(Vec::new());
        }
        // Sized so that it cannot fill (twice the rows); a full table is
        // still answered as the kernel asks, by a retry twice as big.
        let mut capacity = super::aggregate_capacity(row_count);
        loop {
            if let Some(mut groups) = self.aggregate_in_table(input, capacity)? {
                sort_groups(&mut groups);
                return Ok(groups);
            }
            tracing::debug!("GPU aggregation table of {capacity} slots was full; retrying");
            capacity *= 2;
        }
    }

    fn run_chain(
        &self,
        program: &crate::kernels::chain::ChainProgram,
        pieces: &[arrow_array::RecordBatch],
    ) -> Result<crate::kernels::chain::ChainOutput, KernelError> {
        self.run_chain_on_device(program, pieces)
    }

    fn submit_chain(
        &self,
        program: &Arc<crate::kernels::chain::ChainProgram>,
        pieces: Vec<arrow_array::RecordBatch>,
    ) -> Result<crate::kernels::backend::Submitted, KernelError> {
        use crate::kernels::backend::{PendingChain, Submitted};
        let rows: usize = pieces.iter().map(arrow_array::RecordBatch::num_rows).sum();
        if rows == 0 {
            return self.run_chain(program, &pieces).map(Submitted::Done);
        }
        let pending = self.submit_chain_on_device(program, pieces)?;
        Ok(Submitted::Pending(PendingChain::new(
            rows,
            (Arc::clone(program), pending),
        )))
    }

    fn complete_chain(
        &self,
        pending: crate::kernels::backend::PendingChain,
    ) -> Result<crate::kernels::chain::ChainOutput, KernelError> {
        type State = (Arc<crate::kernels::chain::ChainProgram>, chain::CudaPending);
        let (program, pending) = pending.downcast::<State>().map_err(|p| {
            KernelError::Gpu(GpuError::NoGpu {
                reason: format!("a chain batch of {} rows submitted elsewhere", p.rows),
            })
        })?;
        self.complete_chain_on_device(&program, pending)
    }

    fn open_agg_table(
        &self,
        program: Arc<crate::kernels::aggtable::AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn crate::kernels::aggtable::DeviceAggTable>, KernelError> {
        Ok(Box::new(self.open_device_table(program, capacity)?))
    }
}

#[cfg(test)]
mod tests {
    use super::cuda_version_number;

    #[test]
    fn cuda_versions_compare_as_the_driver_reports_them() {
        assert_eq!(cuda_version_number("12.9"), Some(12090));
        assert_eq!(cuda_version_number("13.0"), Some(13000));
        assert_eq!(cuda_version_number("twelve"), None);
    }
}
