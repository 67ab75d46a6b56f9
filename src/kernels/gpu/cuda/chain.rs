//! Fused chains on the device: one coalesced batch up, three kernels, the
//! survivors down.
//!
//! The batch's device input columns are packed from the coalesced pieces
//! into the slot's pinned staging buffers (one host copy each) and copied
//! up once; the program's module (`chain::cuda_src`, compiled by NVRTC on
//! first use and kept per program text) counts, scans and writes the
//! surviving rows in order on the device; with a filter the host waits once
//! for the 16-byte survivor count and fault word, then downloads exactly
//! the survivors into pinned buffers and waits a second time. The plan is
//! [`DeviceTraffic::plan`]: what the simulator reserves and the summary
//! counts is what this code does.
//!
//! Buffers handed to the device are owned by the call (device buffers) or
//! by the slot's staging (pinned buffers, behind a mutex the call holds),
//! and the call synchronizes its stream before it returns or fails, so no
//! buffer is reused or freed while a copy or kernel may still read it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, RecordBatchOptions,
    UInt32Array,
};
use arrow_buffer::{BooleanBuffer, BooleanBufferBuilder, Buffer, NullBuffer, ScalarBuffer};
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtrMut, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::CudaBackend;
use crate::kernels::backend::{KernelBackend, KernelError};
use crate::kernels::chain::cuda_src::{self, BLOCK_THREADS, SCAN_THREADS};
use crate::kernels::chain::{
    ChainOutput, ChainProgram, DeviceTraffic, Fault, OutputSource, ValueType, bitmap_word_bytes,
};
use crate::kernels::gpu::GpuError;
use crate::kernels::gpu::pool::PoolError;

/// Programs whose modules a backend keeps; a task compiles one per chain,
/// so more means programs are churning and the cache starts over.
const MODULES_MAX: usize = 64;

/// The compiled modules and pinned staging of one slot's backend.
#[derive(Default)]
pub(super) struct ChainCache {
    modules: Mutex<HashMap<String, Arc<ChainModule>>>,
    staging: Mutex<Staging>,
    /// `strata bench --calibrate`: time the kernels of each batch with
    /// events (off in production: two event records per batch).
    profile: std::sync::atomic::AtomicBool,
    /// The last profiled batch's kernel time, in nanoseconds.
    kernel_ns: std::sync::atomic::AtomicU64,
}

struct ChainModule {
    count: CudaFunction,
    scan: CudaFunction,
    write: CudaFunction,
    /// Permille of rows the program's last device batch kept: at
    /// [`SINGLE_WAIT_KEPT_PERMILLE`] or more, the next batch downloads its
    /// outputs at full size and waits once.
    kept_permille: std::sync::atomic::AtomicU64,
}

/// See [`ChainModule::kept_permille`]: downloading the dropped rows too
/// costs at most as much again as the kept ones, and saves a round trip.
const SINGLE_WAIT_KEPT_PERMILLE: u64 = 500;

/// Pinned host buffers reused across batches: `up[k]` stages device input
/// `k` (values, then validity words), `down[j]` receives output `j`.
#[derive(Default)]
struct Staging {
    up: Vec<PinnedHostSlice<u8>>,
    down: Vec<PinnedHostSlice<u8>>,
    header: Option<PinnedHostSlice<u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A device column: values, and validity words when some row is null.
struct DeviceColumn {
    values: CudaSlice<u8>,
    validity: Option<CudaSlice<u8>>,
}

/// The device inputs' kernel arguments, as every chain kernel takes them:
/// values, then validity words or a null pointer (every row valid).
fn push_inputs<'a>(
    launch: &mut cudarc::driver::LaunchArgs<'a>,
    columns: &'a [DeviceColumn],
    null_pointer: &'a u64,
) {
    for column in columns {
        launch.arg(&column.values);
        match &column.validity {
            Some(v) => launch.arg(v),
            None => launch.arg(null_pointer),
        };
    }
}

impl CudaBackend {
    /// Times the kernels of every following chain batch (calibration).
    pub fn profile_chains(&self, on: bool) {
        self.chains
            .profile
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The device time of the last profiled chain batch's kernels, from
    /// the first launch to the end of the ordered write.
    pub fn last_chain_kernel_seconds(&self) -> f64 {
        self.chains
            .kernel_ns
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e9
    }

    fn chain_module(&self, program: &ChainProgram) -> Result<Arc<ChainModule>, KernelError> {
        let source =
            super::super::source::expand_generated("chain", &cuda_src::cuda_source(program))
                .map_err(|e| KernelError::Gpu(GpuError::from(e)))?;
        if let Some(module) = lock(&self.chains.modules).get(&source) {
            return Ok(Arc::clone(module));
        }
        let (major, minor) = self.device.compute_capability;
        let arch = format!("sm_{major}{minor}");
        let mut options = vec![format!("--gpu-architecture={arch}")];
        options.extend(cuda_src::COMPILE_OPTIONS.iter().map(|o| (*o).to_owned()));
        let cache =
            super::super::source::PtxCache::new(super::super::source::PtxCache::default_dir());
        let nvrtc_version = super::nvrtc_version()?;
        let driver_version =
            super::driver_version().map_or_else(|| "none".to_owned(), |v| v.to_string());
        let options_text = options.join(" ");
        let key = super::super::source::CacheKey {
            expanded_source: &source,
            arch: &arch,
            nvrtc_version: &nvrtc_version,
            options: &options_text,
            driver_version: &driver_version,
        };
        let (cubin, _) = cache.get_or_compile_bytes("chain", key, "cubin", || {
            super::nvrtc_cubin("chain", &source, &options).map_err(|log| GpuError::Compile {
                stem: "chain",
                arch: arch.clone(),
                log,
            })
        })?;
        let module = self
            .stream
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(self.driver_error("cuModuleLoadData", 0))?;
        let function = |name: &'static str| {
            module
                .load_function(name)
                .map_err(|_| KernelError::Gpu(GpuError::MissingKernel { name }))
        };
        let loaded = Arc::new(ChainModule {
            count: function("chain_count")?,
            scan: function("chain_scan")?,
            write: function("chain_write")?,
            kept_permille: std::sync::atomic::AtomicU64::new(1000),
        });
        let mut modules = lock(&self.chains.modules);
        if modules.len() >= MODULES_MAX {
            modules.clear();
        }
        modules.insert(source, Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Device memory the driver hands out uninitialised.
    fn alloc_bytes(&self, len: usize, bytes: u64) -> Result<CudaSlice<u8>, KernelError> {
        // SAFETY: every caller overwrites the whole buffer (a copy up, a
        // memset, or a kernel that writes every element it later reads)
        // before the device or the host reads it.
        unsafe { self.stream.alloc::<u8>(len.max(1)) }
            .map_err(self.driver_error("cuMemAllocAsync", bytes))
    }

    /// `bytes` staged in pinned buffer `slot` of `buffers`, grown to fit.
    fn stage<'s, T: cudarc::driver::DeviceRepr + Default + Copy>(
        &self,
        buffers: &'s mut Vec<PinnedHostSlice<T>>,
        slot: usize,
        len: usize,
        write_combined: bool,
    ) -> Result<&'s mut PinnedHostSlice<T>, KernelError> {
        while buffers.len() <= slot {
            buffers.push(self.pinned(1, write_combined)?);
        }
        if buffers[slot].len() < len {
            buffers[slot] = self.pinned(len.next_power_of_two(), write_combined)?;
        }
        Ok(&mut buffers[slot])
    }

    fn pinned<T: cudarc::driver::DeviceRepr>(
        &self,
        len: usize,
        write_combined: bool,
    ) -> Result<PinnedHostSlice<T>, KernelError> {
        let flags = if write_combined {
            cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        // SAFETY: the staging buffer is written (uploads) or filled by a
        // device copy (downloads) before any byte of it is read.
        unsafe {
            self.stream
                .context()
                .alloc_pinned_with_flags::<T>(len, flags)
        }
        .map_err(self.driver_error("cuMemHostAlloc", (len * std::mem::size_of::<T>()) as u64))
    }

    /// Packs device input `column` of the pieces into pinned staging and
    /// copies it up (values, then validity words if any row is null).
    fn upload_column(
        &self,
        staging: &mut Staging,
        slot: usize,
        pieces: &[RecordBatch],
        column: usize,
        rows: usize,
        bytes: u64,
    ) -> Result<DeviceColumn, KernelError> {
        let value_bytes = rows * 8;
        let nullable = pieces.iter().any(|p| p.column(column).null_count() > 0);
        let word_bytes = if nullable {
            bitmap_word_bytes(rows as u64) as usize
        } else {
            0
        };
        let buffer = self.stage(&mut staging.up, slot, value_bytes + word_bytes, true)?;
        let host = buffer
            .as_mut_slice()
            .map_err(self.driver_error("cuEventSynchronize", bytes))?;
        let mut at = 0;
        for piece in pieces {
            let array = piece.column(column);
            let values = match array.as_primitive_opt::<Int64Type>() {
                Some(ints) => ints.values().inner().clone(),
                None => array.as_primitive::<Float64Type>().values().inner().clone(),
            };
            let values: &[u8] = values.as_slice();
            host[at..at + values.len()].copy_from_slice(values);
            at += values.len();
        }
        if nullable {
            let mut bits = BooleanBufferBuilder::new(rows);
            for piece in pieces {
                let array = piece.column(column);
                match array.nulls() {
                    Some(nulls) => bits.append_buffer(nulls.inner()),
                    None => bits.append_n(array.len(), true),
                }
            }
            let bits = bits.finish();
            let packed = bits.values();
            host[value_bytes..value_bytes + packed.len()].copy_from_slice(packed);
            host[value_bytes + packed.len()..value_bytes + word_bytes].fill(0);
        }
        let mut values = self.alloc_bytes(value_bytes, bytes)?;
        let mut validity = if nullable {
            Some(self.alloc_bytes(word_bytes, bytes)?)
        } else {
            None
        };
        let host: &[u8] = host;
        {
            let (pointer, _record) = values.device_ptr_mut(&self.stream);
            // SAFETY: `values` holds `value_bytes` bytes; the pinned source
            // stays untouched (the staging mutex is held) until the stream
            // is synchronized at the end of the batch.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    pointer,
                    &host[..value_bytes],
                    self.stream.cu_stream(),
                )
            }
            .map_err(self.driver_error("cuMemcpyHtoDAsync", bytes))?;
        }
        if let Some(validity) = validity.as_mut() {
            let (pointer, _record) = validity.device_ptr_mut(&self.stream);
            // SAFETY: as above, `word_bytes` bytes each side.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    pointer,
                    &host[value_bytes..value_bytes + word_bytes],
                    self.stream.cu_stream(),
                )
            }
            .map_err(self.driver_error("cuMemcpyHtoDAsync", bytes))?;
        }
        Ok(DeviceColumn { values, validity })
    }

    /// Copies the first `len` bytes of `device` into pinned buffer `slot`.
    fn download_into(
        &self,
        staging: &mut Staging,
        slot: usize,
        device: &CudaSlice<u8>,
        len: usize,
    ) -> Result<(), KernelError> {
        if len == 0 {
            return Ok(());
        }
        let buffer = self.stage(&mut staging.down, slot, len, false)?;
        let host = buffer
            .as_mut_slice()
            .map_err(self.driver_error("cuEventSynchronize", 0))?;
        let (pointer, _record) = cudarc::driver::DevicePtr::device_ptr(device, &self.stream);
        // SAFETY: `device` holds at least `len` bytes (outputs are sized for
        // every row); the pinned destination is not read until the stream
        // is synchronized, and the staging mutex is held until then.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut host[..len],
                pointer,
                self.stream.cu_stream(),
            )
        }
        .map_err(self.driver_error("cuMemcpyDtoHAsync", 0))
    }

    fn sync(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(self.driver_error("cuStreamSynchronize", 0))
    }

    pub(super) fn run_chain_on_device(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            return crate::kernels::backend::CpuBackend.run_chain(program, pieces);
        }
        let plan = DeviceTraffic::plan(program, pieces, rows as u64);
        if rows > u32::MAX as usize / 2 {
            // Row numbers and block offsets are 32-bit on the device.
            return Err(KernelError::DeviceOutOfMemory(PoolError::DeviceRefused {
                slot_index: self.pool.slot_index(),
                requested_bytes: plan.device_bytes,
            }));
        }
        let bytes = plan.device_bytes;
        let _held = self.reserve(bytes)?;
        let module = self.chain_module(program)?;
        let mut staging = lock(&self.chains.staging);
        let inputs = program.device_inputs();
        let columns = inputs
            .iter()
            .enumerate()
            .map(|(k, &c)| self.upload_column(&mut staging, k, pieces, c as usize, rows, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let blocks = rows.div_ceil(BLOCK_THREADS as usize);
        let mut fault = self.alloc_bytes(8, bytes)?;
        {
            let (pointer, _record) = fault.device_ptr_mut(&self.stream);
            // SAFETY: `fault` holds 8 bytes; all-ones is `NO_FAULT`.
            unsafe {
                cudarc::driver::result::memset_d8_async(pointer, 0xff, 8, self.stream.cu_stream())
            }
            .map_err(self.driver_error("cuMemsetD8Async", bytes))?;
        }
        let mut header = self.alloc_bytes(16, bytes)?;
        let keeps = program.keep_steps().len();
        // Zeroed (one memset) only where a filter counts into it.
        let mut keep_counts = if keeps > 0 {
            self.stream
                .alloc_zeros::<u8>(8 * keeps)
                .map_err(self.driver_error("cuMemAllocAsync", bytes))?
        } else {
            self.alloc_bytes(8, bytes)?
        };
        let mut block_counts = self.alloc_bytes(blocks * 4, bytes)?;
        // Outputs sized for every row surviving; bitmaps zeroed for atomicOr.
        let mut outputs: Vec<(ValueType, CudaSlice<u8>, CudaSlice<u8>)> = Vec::new();
        for output in &program.outputs {
            if let OutputSource::Device(reg) = output {
                let ty = program.types[*reg as usize];
                let words = bitmap_word_bytes(rows as u64) as usize;
                let values = if ty == ValueType::Bool {
                    self.stream
                        .alloc_zeros::<u8>(words)
                        .map_err(self.driver_error("cuMemAllocAsync", bytes))?
                } else {
                    self.alloc_bytes(rows * 8, bytes)?
                };
                let validity = self
                    .stream
                    .alloc_zeros::<u8>(words)
                    .map_err(self.driver_error("cuMemAllocAsync", bytes))?;
                outputs.push((ty, values, validity));
            }
        }
        let mut row_ids = if program.needs_row_ids() {
            Some(self.alloc_bytes(rows * 4, bytes)?)
        } else {
            None
        };
        let mut targets = if program.route.is_some() {
            Some(self.alloc_bytes(rows * 4, bytes)?)
        } else {
            None
        };
        let n = rows as u64;
        let null_pointer = 0u64;
        let grid = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let filters = program.filters();
        let profile = self
            .chains
            .profile
            .load(std::sync::atomic::Ordering::Relaxed);
        let timing = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let started = if profile {
            Some(
                self.stream
                    .record_event(Some(timing))
                    .map_err(self.driver_error("cuEventRecord", 0))?,
            )
        } else {
            None
        };
        if filters {
            let mut launch = self.stream.launch_builder(&module.count);
            push_inputs(&mut launch, &columns, &null_pointer);
            launch
                .arg(&n)
                .arg(&mut block_counts)
                .arg(&mut fault)
                .arg(&mut keep_counts);
            // SAFETY: the arguments follow `chain_count`'s generated
            // signature (each device input's values and validity words or
            // a null pointer, the row count, one count per block, the fault
            // word, one zeroed counter per filter); every buffer covers
            // `rows` rows, `blocks` blocks or `keeps` filters and lives
            // until the stream is synchronized below.
            unsafe { launch.launch(grid) }.map_err(self.driver_error("cuLaunchKernel", bytes))?;
            let blocks_arg = blocks as u64;
            let mut launch = self.stream.launch_builder(&module.scan);
            launch
                .arg(&mut block_counts)
                .arg(&blocks_arg)
                .arg(&mut header);
            // SAFETY: `chain_scan(counts, blocks, total)`: `block_counts`
            // holds `blocks` counts, `header` 16 bytes (the total first).
            unsafe {
                launch.launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (SCAN_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(self.driver_error("cuLaunchKernel", bytes))?;
        }
        let mut launch = self.stream.launch_builder(&module.write);
        push_inputs(&mut launch, &columns, &null_pointer);
        launch.arg(&n);
        if filters {
            launch.arg(&block_counts);
        } else {
            launch.arg(&null_pointer);
        }
        for (ty, values, validity) in outputs.iter_mut() {
            let _ = ty;
            launch.arg(values).arg(validity);
        }
        if let Some(ids) = row_ids.as_mut() {
            launch.arg(ids);
        }
        if let Some(targets) = targets.as_mut() {
            launch.arg(targets);
        }
        launch.arg(&mut fault);
        // SAFETY: the arguments follow `chain_write`'s generated signature
        // (inputs as for `chain_count`, the row count, the block offsets or
        // a null pointer, each device output's values and validity words,
        // the row numbers when the chain has host columns, the target
        // subtasks when it routes, the fault word); outputs are sized for
        // every row surviving.
        unsafe { launch.launch(grid) }.map_err(self.driver_error("cuLaunchKernel", bytes))?;
        let kernels_done = match started {
            Some(_) => Some(
                self.stream
                    .record_event(Some(timing))
                    .map_err(self.driver_error("cuEventRecord", 0))?,
            ),
            None => None,
        };
        // One wait or two. When most rows survived the program's last
        // batch, every output is copied back at full size right behind the
        // kernels and the host waits once; otherwise it first waits for the
        // 16-byte survivor count (and fault word and filter counters), which
        // sizes the downloads, and then for them.
        let kept_permille = module
            .kept_permille
            .load(std::sync::atomic::Ordering::Relaxed);
        let single_wait = !filters || kept_permille >= SINGLE_WAIT_KEPT_PERMILLE;
        let header_len = 2 + keeps;
        if staging.header.as_ref().is_none_or(|b| b.len() < header_len) {
            staging.header = Some(self.pinned::<u64>(header_len, false)?);
        }
        {
            let Some(buffer) = staging.header.as_mut() else {
                unreachable!("allocated above")
            };
            let host = buffer
                .as_mut_slice()
                .map_err(self.driver_error("cuEventSynchronize", 0))?;
            let mut copy = |to: std::ops::Range<usize>, from: cudarc::driver::sys::CUdeviceptr| {
                // SAFETY: `to` is within the pinned header and `from` holds
                // as many 8-byte words (the fault word, the scan's total, the
                // filter counters); the host reads them after a sync.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut host[to],
                        from,
                        self.stream.cu_stream(),
                    )
                }
                .map_err(self.driver_error("cuMemcpyDtoHAsync", 0))
            };
            let (pointer, _record) = cudarc::driver::DevicePtr::device_ptr(&fault, &self.stream);
            copy(1..2, pointer)?;
            if filters {
                let (pointer, _record) =
                    cudarc::driver::DevicePtr::device_ptr(&header, &self.stream);
                copy(0..1, pointer)?;
                let (pointer, _record) =
                    cudarc::driver::DevicePtr::device_ptr(&keep_counts, &self.stream);
                copy(2..2 + keeps, pointer)?;
            } else {
                host[0] = n;
            }
        }
        let mut syncs = 1;
        let downloaded_rows = if single_wait {
            rows
        } else {
            self.sync()?;
            syncs = 2;
            let survivors = self.header_word(&staging, 0)? as usize;
            self.check_fault(program, &staging)?;
            survivors
        };
        let d2h_bytes = self.download_outputs(
            &mut staging,
            &outputs,
            row_ids.as_ref(),
            targets.as_ref(),
            downloaded_rows,
        )? + 8 * header_len as u64;
        self.sync()?;
        self.check_fault(program, &staging)?;
        let header_host: Vec<u64> = (0..header_len)
            .map(|i| self.header_word(&staging, i))
            .collect::<Result<_, _>>()?;
        let survivors = header_host[0] as usize;
        module.kept_permille.store(
            (survivors as u64 * 1000).checked_div(n).unwrap_or(1000),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let (Some(start), Some(end)) = (&started, &kernels_done) {
            let ms = start
                .elapsed_ms(end)
                .map_err(self.driver_error("cuEventElapsedTime", 0))?;
            self.chains.kernel_ns.store(
                (f64::from(ms) * 1e6) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let batch = self.assemble(program, pieces, &staging, survivors)?;
        let targets = match program.route {
            Some(_) if survivors == 0 => Some(Vec::new()),
            Some(_) => {
                let host = staging.down[2 * outputs.len() + 1]
                    .as_slice()
                    .map_err(self.driver_error("cuEventSynchronize", 0))?;
                Some(
                    host[..survivors * 4]
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            None => None,
        };
        Ok(ChainOutput {
            step_rows: program.step_rows(n, &header_host[2..]),
            batch,
            targets,
            traffic: Some(DeviceTraffic {
                d2h_bytes,
                syncs,
                ..plan
            }),
        })
    }

    /// Word `index` of the pinned header (after a sync).
    fn header_word(&self, staging: &Staging, index: usize) -> Result<u64, KernelError> {
        let Some(header) = &staging.header else {
            unreachable!("the header is staged before any wait")
        };
        let host = header
            .as_slice()
            .map_err(self.driver_error("cuEventSynchronize", 0))?;
        Ok(host[index])
    }

    /// The fault the kernels recorded, as the evaluator's error.
    fn check_fault(&self, program: &ChainProgram, staging: &Staging) -> Result<(), KernelError> {
        match cuda_src::decode_fault(self.header_word(staging, 1)?) {
            Some((instr, row, zero)) => {
                let fault = if zero {
                    Fault::DivideByZero
                } else {
                    Fault::Overflow
                };
                Err(program.fault(instr, row, fault).into())
            }
            None => Ok(()),
        }
    }

    /// Enqueues the copies of the first `rows` rows of every output into
    /// pinned staging; returns their bytes.
    fn download_outputs(
        &self,
        staging: &mut Staging,
        outputs: &[(ValueType, CudaSlice<u8>, CudaSlice<u8>)],
        row_ids: Option<&CudaSlice<u8>>,
        targets: Option<&CudaSlice<u8>>,
        rows: usize,
    ) -> Result<u64, KernelError> {
        let words = bitmap_word_bytes(rows as u64) as usize;
        let mut bytes = 0;
        for (j, (ty, values, validity)) in outputs.iter().enumerate() {
            let value_len = if *ty == ValueType::Bool {
                words
            } else {
                rows * 8
            };
            self.download_into(staging, 2 * j, values, value_len)?;
            self.download_into(staging, 2 * j + 1, validity, words)?;
            bytes += value_len + words;
        }
        if let Some(ids) = row_ids {
            self.download_into(staging, 2 * outputs.len(), ids, rows * 4)?;
            bytes += rows * 4;
        }
        if let Some(targets) = targets {
            self.download_into(staging, 2 * outputs.len() + 1, targets, rows * 4)?;
            bytes += rows * 4;
        }
        Ok(bytes as u64)
    }

    /// The result batch from the downloaded outputs (copied out of pinned
    /// memory) and the host columns gathered by the row numbers.
    fn assemble(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
        staging: &Staging,
        survivors: usize,
    ) -> Result<RecordBatch, KernelError> {
        let words = bitmap_word_bytes(survivors as u64) as usize;
        let down = |slot: usize, len: usize| -> Result<Buffer, KernelError> {
            if len == 0 {
                return Ok(Buffer::from_vec(Vec::<u8>::new()));
            }
            let host = staging.down[slot]
                .as_slice()
                .map_err(self.driver_error("cuEventSynchronize", 0))?;
            Ok(Buffer::from_slice_ref(&host[..len]))
        };
        let row_ids = if program.needs_row_ids() {
            let device_outputs = program
                .outputs
                .iter()
                .filter(|o| matches!(o, OutputSource::Device(_)))
                .count();
            let ids: ScalarBuffer<u32> =
                ScalarBuffer::new(down(2 * device_outputs, survivors * 4)?, 0, survivors);
            Some(UInt32Array::new(ids, None))
        } else {
            None
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(program.outputs.len());
        let mut j = 0;
        for output in &program.outputs {
            match output {
                OutputSource::Device(reg) => {
                    let ty = program.types[*reg as usize];
                    let validity = BooleanBuffer::new(down(2 * j + 1, words)?, 0, survivors);
                    let nulls = NullBuffer::new(validity);
                    let nulls = (nulls.null_count() > 0).then_some(nulls);
                    arrays.push(match ty {
                        ValueType::I64 => Arc::new(Int64Array::new(
                            ScalarBuffer::new(down(2 * j, survivors * 8)?, 0, survivors),
                            nulls,
                        )),
                        ValueType::F64 => Arc::new(Float64Array::new(
                            ScalarBuffer::new(down(2 * j, survivors * 8)?, 0, survivors),
                            nulls,
                        )),
                        ValueType::Bool => Arc::new(BooleanArray::new(
                            BooleanBuffer::new(down(2 * j, words)?, 0, survivors),
                            nulls,
                        )),
                    });
                    j += 1;
                }
                OutputSource::Host(column) => {
                    let parts: Vec<&dyn Array> = pieces
                        .iter()
                        .map(|p| p.column(*column as usize).as_ref())
                        .collect();
                    let whole = arrow_select::concat::concat(&parts)?;
                    let ids = row_ids
                        .as_ref()
                        .expect("host columns come with row numbers");
                    arrays.push(arrow_select::take::take(whole.as_ref(), ids, None)?);
                }
            }
        }
        let options = RecordBatchOptions::new().with_row_count(Some(survivors));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&program.output_schema),
            arrays,
            &options,
        )?)
    }
}
