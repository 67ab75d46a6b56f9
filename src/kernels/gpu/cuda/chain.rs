//! Fused chains on the device: one coalesced batch up, three kernels, the
//! survivors down, on a lane of two streams so that copies overlap, with
//! the next batch already going up while this one runs.
//!
//! A batch is submitted ([`CudaBackend::submit_chain_on_device`]) and
//! completed later: the operator submits batch N+1 before it waits for
//! batch N, so N+1's host packing and upload overlap N's kernels and
//! download. Each batch in flight has a lane of its own (two streams, the
//! pinned staging of each), taken from the backend's free lanes.
//!
//! A coalesced batch of at least `2 × CHUNK_ROWS_MIN` rows is split in two
//! halves, one per stream of the lane: while the first half's kernels run
//! and its results come down, the second half goes up (a GPU copies both
//! ways at once). For each half, the device input columns are packed from
//! the pieces into pinned staging (one host copy each) and copied up once;
//! the program's module (`chain::cuda_src`, compiled by NVRTC on first use
//! and kept per program text) counts, scans and writes the surviving rows
//! in order. Behind the kernels, still without waiting, come the 16-byte
//! survivor count and fault word, the filters' counters, and the outputs of
//! as many rows as the program expects to keep
//! ([`ChainProgram::download`]: the last batch's fraction with a margin).
//! Completing waits once; only a batch that kept more rows than that
//! downloads the survivors and waits again. Where the margin would bring
//! back more bytes than a wait costs (a chain keeping millions of wide
//! rows), the batch is counted first and exactly the survivors come down
//! after a second wait.
//!
//! Buffers handed to the device are owned by the pending batch: device
//! buffers, each used only on the stream it was allocated on, and the
//! lane's pinned staging, which no other batch touches until this one is
//! completed or dropped; both synchronize the lane's streams first.

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
    ChainOutput, ChainProgram, DeviceTraffic, Download, Fault, OutputSource, ValueType,
    bitmap_word_bytes, predicted_download_rows,
};
use crate::kernels::gpu::pool::PoolError;

/// Programs whose modules a backend keeps; a task compiles one per chain,
/// so more means programs are churning and the cache starts over.
const MODULES_MAX: usize = 64;

/// The compiled modules and the device batch lanes of one slot's backend.
#[derive(Default)]
pub(super) struct ChainCache {
    modules: Mutex<HashMap<String, Arc<ChainModule>>>,
    /// Lanes no batch is using; a batch takes one (or makes one) when it
    /// is submitted and gives it back once the device is done with it.
    lanes: Arc<Mutex<Vec<Lane>>>,
    /// `strata bench --calibrate`: time the kernels of each batch with
    /// events (off in production: two event records per batch).
    profile: std::sync::atomic::AtomicBool,
    /// The last profiled batch's kernel time, in nanoseconds.
    kernel_ns: std::sync::atomic::AtomicU64,
}

/// Free lanes a backend keeps; more are made while more batches are in
/// flight (each operator has at most `IN_FLIGHT` of them, see
/// `exec::gpu_chain`) and freed when they come back beyond this.
const LANES_KEPT: usize = 4;

/// What one device batch in flight uses alone: two streams (one per half)
/// and the pinned staging of each half. Two batches on two lanes overlap:
/// the second one's uploads run while the first one computes and copies
/// back.
struct Lane {
    streams: [Arc<cudarc::driver::CudaStream>; 2],
    staging: [Staging; 2],
}

/// A device batch in flight: its chunks (device buffers), its lane
/// (streams and pinned staging the copies read and write), its device
/// memory reservation. Dropped without being completed (an operator that
/// failed or was cancelled), it waits for its streams before the lane is
/// reused and its buffers freed.
pub(super) struct CudaPending {
    chunks: Vec<Chunk>,
    /// Rows of each chunk whose outputs were downloaded with the header
    /// (`None`: counted first, downloaded after the wait).
    downloaded: Vec<Option<usize>>,
    lane: Option<Lane>,
    lanes: Arc<Mutex<Vec<Lane>>>,
    rows: usize,
    plan: DeviceTraffic,
    /// Kernel timing events (calibration).
    events: Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
    _held: crate::kernels::gpu::pool::DeviceReservation,
}

impl Drop for CudaPending {
    fn drop(&mut self) {
        let Some(lane) = self.lane.take() else {
            return;
        };
        // The device may still read the pinned uploads or write the pinned
        // downloads; nothing of the lane is reused until it is done. A
        // stream that fails to synchronize has a broken context: the lane
        // is dropped with it rather than reused.
        let synced: Vec<bool> = lane
            .streams
            .iter()
            .map(|s| s.synchronize().is_ok())
            .collect();
        let idle = synced.iter().all(|ok| *ok);
        if idle {
            let mut free = lock(&self.lanes);
            if free.len() < LANES_KEPT {
                free.push(lane);
            }
        }
    }
}

struct ChainModule {
    count: CudaFunction,
    scan: CudaFunction,
    write: CudaFunction,
}

/// Rows per chunk below which a device batch stays on one stream: smaller
/// copies do not amortise a second set of launches.
const CHUNK_ROWS_MIN: usize = 1 << 16;

/// One chunk of a device batch, enqueued on its stream.
struct Chunk {
    stream: Arc<cudarc::driver::CudaStream>,
    /// The chunk's first row in the device batch.
    offset: usize,
    rows: usize,
    pieces: Vec<RecordBatch>,
    /// Device buffers the enqueued work reads or writes, kept alive until
    /// the stream is synchronized (dropping one frees it stream-ordered).
    _columns: Vec<DeviceColumn>,
    _scratch: [CudaSlice<u8>; 4],
    outputs: Vec<(ValueType, CudaSlice<u8>, CudaSlice<u8>)>,
    row_ids: Option<CudaSlice<u8>>,
    targets: Option<CudaSlice<u8>>,
}

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
        let source = cuda_src::cuda_source(program);
        if let Some(module) = lock(&self.chains.modules).get(&source) {
            return Ok(Arc::clone(module));
        }
        let module = self.load_generated("chain", &source)?;
        let function = |name| Self::generated_function(&module, name);
        let loaded = Arc::new(ChainModule {
            count: function("chain_count")?,
            scan: function("chain_scan")?,
            write: function("chain_write")?,
        });
        let mut modules = lock(&self.chains.modules);
        if modules.len() >= MODULES_MAX {
            modules.clear();
        }
        modules.insert(source, Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Device memory the driver hands out uninitialised, on `stream`.
    fn alloc_bytes(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
        len: usize,
        bytes: u64,
    ) -> Result<CudaSlice<u8>, KernelError> {
        // SAFETY: every caller overwrites the whole buffer (a copy up, a
        // memset, or a kernel that writes every element it later reads)
        // before the device or the host reads it.
        unsafe { stream.alloc::<u8>(len.max(1)) }
            .map_err(self.driver_error("cuMemAllocAsync", bytes))
    }

    /// Zeroed device memory on `stream` (one memset).
    fn zeroed_bytes(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
        len: usize,
        bytes: u64,
    ) -> Result<CudaSlice<u8>, KernelError> {
        stream
            .alloc_zeros::<u8>(len.max(1))
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
        super::aggtable::pinned(&self.stream, len, write_combined, self.pool.slot_index())
    }

    /// Packs device input `column` of the pieces into pinned staging and
    /// copies it up (values, then validity words if any row is null).
    fn upload_column(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
        staging: &mut Staging,
        slot: usize,
        pieces: &[RecordBatch],
        column: usize,
        bytes: u64,
    ) -> Result<DeviceColumn, KernelError> {
        let (value_bytes, word_bytes) = column_layout(pieces, column);
        let nullable = word_bytes > 0;
        let buffer = self.stage(&mut staging.up, slot, value_bytes + word_bytes, true)?;
        let host = buffer
            .as_mut_slice()
            .map_err(self.driver_error("cuEventSynchronize", bytes))?;
        pack_column(pieces, column, &mut host[..value_bytes + word_bytes]);
        let mut values = self.alloc_bytes(stream, value_bytes, bytes)?;
        let mut validity = if nullable {
            Some(self.alloc_bytes(stream, word_bytes, bytes)?)
        } else {
            None
        };
        let host: &[u8] = host;
        {
            let (pointer, _record) = values.device_ptr_mut(stream);
            // SAFETY: `values` holds `value_bytes` bytes; the pinned source
            // stays untouched (the staging mutex is held) until the stream
            // is synchronized at the end of the batch.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    pointer,
                    &host[..value_bytes],
                    stream.cu_stream(),
                )
            }
            .map_err(self.driver_error("cuMemcpyHtoDAsync", bytes))?;
        }
        if let Some(validity) = validity.as_mut() {
            let (pointer, _record) = validity.device_ptr_mut(stream);
            // SAFETY: as above, `word_bytes` bytes each side.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    pointer,
                    &host[value_bytes..value_bytes + word_bytes],
                    stream.cu_stream(),
                )
            }
            .map_err(self.driver_error("cuMemcpyHtoDAsync", bytes))?;
        }
        Ok(DeviceColumn { values, validity })
    }

    /// Copies the first `len` bytes of `device` into pinned buffer `slot`.
    fn download_into(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
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
        let (pointer, _record) = cudarc::driver::DevicePtr::device_ptr(device, stream);
        // SAFETY: `device` holds at least `len` bytes (outputs are sized for
        // every row); the pinned destination is not read until the stream
        // is synchronized, and the staging mutex is held until then.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host[..len], pointer, stream.cu_stream())
        }
        .map_err(self.driver_error("cuMemcpyDtoHAsync", 0))
    }

    /// A lane for one device batch: a free one, or a new one (two new
    /// streams, empty staging).
    fn take_lane(&self) -> Result<Lane, KernelError> {
        if let Some(lane) = lock(&self.chains.lanes).pop() {
            return Ok(lane);
        }
        let context = self.stream.context();
        let stream = || {
            context
                .new_stream()
                .map_err(self.driver_error("cuStreamCreate", 0))
        };
        Ok(Lane {
            streams: [stream()?, stream()?],
            staging: [Staging::default(), Staging::default()],
        })
    }

    /// Enqueues a device batch on a lane of its own and returns without
    /// waiting: uploads, kernels, the header, and the download of the rows
    /// the program expects to keep when it predicts ([`ChainProgram::download`]).
    pub(super) fn submit_chain_on_device(
        &self,
        program: &ChainProgram,
        pieces: Vec<RecordBatch>,
    ) -> Result<CudaPending, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        let plan = DeviceTraffic::plan(program, &pieces, Download::Counted, rows as u64);
        if rows > u32::MAX as usize / 2 {
            // Row numbers and block offsets are 32-bit on the device.
            return Err(KernelError::DeviceOutOfMemory(PoolError::DeviceRefused {
                slot_index: self.pool.slot_index(),
                requested_bytes: plan.device_bytes,
            }));
        }
        let bytes = plan.device_bytes;
        let held = self.reserve(bytes)?;
        let module = self.chain_module(program)?;
        let profile = self
            .chains
            .profile
            .load(std::sync::atomic::Ordering::Relaxed);
        // Two halves on the lane's two streams, unless the batch is small
        // or the kernels are being timed (one stream times them alone).
        let halves = if rows >= 2 * CHUNK_ROWS_MIN && !profile {
            split_rows(&pieces, rows / 2)
        } else {
            vec![pieces]
        };
        let mut pending = CudaPending {
            chunks: Vec::with_capacity(halves.len()),
            downloaded: Vec::with_capacity(halves.len()),
            lane: Some(self.take_lane()?),
            lanes: Arc::clone(&self.chains.lanes),
            rows,
            plan,
            events: None,
            _held: held,
        };
        let Some(lane) = pending.lane.as_mut() else {
            unreachable!("taken above")
        };
        let timing = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let started = if profile {
            Some(
                lane.streams[0]
                    .record_event(Some(timing))
                    .map_err(self.driver_error("cuEventRecord", 0))?,
            )
        } else {
            None
        };
        let mut offset = 0;
        for (c, half) in halves.into_iter().enumerate() {
            let chunk = self.enqueue_chunk(
                program,
                &module,
                &lane.streams[c],
                &mut lane.staging[c],
                half,
                offset,
                bytes,
            )?;
            offset += chunk.rows;
            pending.chunks.push(chunk);
        }
        if let Some(start) = started {
            let end = lane.streams[0]
                .record_event(Some(timing))
                .map_err(self.driver_error("cuEventRecord", 0))?;
            pending.events = Some((start, end));
        }
        // Decided for the whole batch (as the simulator and the cost model
        // decide it), then sized per half.
        let download = program.download(rows as u64);
        for (c, chunk) in pending.chunks.iter().enumerate() {
            let download = match download {
                Download::Predicted(all) if all as usize == rows => Some(chunk.rows),
                Download::Predicted(_) => Some(predicted_download_rows(
                    chunk.rows as u64,
                    program.kept_fraction().unwrap_or(1.0),
                ) as usize),
                Download::Counted => None,
            };
            if let Some(rows) = download {
                self.download_outputs(chunk, &mut lane.staging[c], rows)?;
            }
            pending.downloaded.push(download);
        }
        Ok(pending)
    }

    /// Waits for a submitted batch (one wait when its survivors fit the
    /// rows downloaded, a second for the rest otherwise) and assembles it.
    pub(super) fn complete_chain_on_device(
        &self,
        program: &ChainProgram,
        mut pending: CudaPending,
    ) -> Result<ChainOutput, KernelError> {
        let Some(lane) = pending.lane.as_mut() else {
            unreachable!("a pending batch holds its lane until it is dropped")
        };
        sync_chunks(&pending.chunks).map_err(self.driver_error("cuStreamSynchronize", 0))?;
        // The fault word came back with the header: a fault of the data
        // fails the batch before anything else is fetched.
        self.check_faults(program, &pending.chunks, &lane.staging)?;
        let mut syncs = 1;
        let mut d2h_bytes = 0;
        let header_bytes = 8 * (2 + program.keep_steps().len()) as u64;
        let mut again = false;
        for (c, chunk) in pending.chunks.iter().enumerate() {
            let survivors = self.header_word(&lane.staging[c], 0)? as usize;
            d2h_bytes += header_bytes;
            match pending.downloaded[c] {
                Some(rows) if survivors <= rows => d2h_bytes += self.output_bytes(chunk, rows),
                downloaded => {
                    // Counted, or more survived than the last batch
                    // suggested: fetch exactly the survivors now.
                    d2h_bytes += downloaded.map_or(0, |rows| self.output_bytes(chunk, rows));
                    d2h_bytes += self.download_outputs(chunk, &mut lane.staging[c], survivors)?;
                    again = true;
                }
            }
        }
        if again {
            sync_chunks(&pending.chunks).map_err(self.driver_error("cuStreamSynchronize", 0))?;
            syncs = 2;
        }
        if let Some((start, end)) = &pending.events {
            let ms = start
                .elapsed_ms(end)
                .map_err(self.driver_error("cuEventElapsedTime", 0))?;
            self.chains.kernel_ns.store(
                (f64::from(ms) * 1e6) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let mut output: Option<ChainOutput> = None;
        for (c, chunk) in pending.chunks.iter().enumerate() {
            let part = self.chunk_output(program, chunk, &lane.staging[c])?;
            output = Some(match output {
                None => part,
                Some(first) => first.join(part)?,
            });
        }
        let mut output = output.expect("a device batch has a chunk");
        program.observe_kept(pending.rows as u64, output.batch.num_rows() as u64);
        output.traffic = Some(DeviceTraffic {
            d2h_bytes,
            syncs,
            launches: pending.plan.launches * pending.chunks.len() as u64,
            ..pending.plan
        });
        Ok(output)
    }

    /// A fused chain as one device batch, waited for at once.
    pub(super) fn run_chain_on_device(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            return crate::kernels::backend::CpuBackend.run_chain(program, pieces);
        }
        let pending = self.submit_chain_on_device(program, pieces.to_vec())?;
        self.complete_chain_on_device(program, pending)
    }

    /// Uploads a chunk's columns and enqueues its memsets, kernels and the
    /// copy of its header words, all on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_chunk(
        &self,
        program: &ChainProgram,
        module: &ChainModule,
        stream: &Arc<cudarc::driver::CudaStream>,
        staging: &mut Staging,
        pieces: Vec<RecordBatch>,
        offset: usize,
        bytes: u64,
    ) -> Result<Chunk, KernelError> {
        let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
        let columns = program
            .device_inputs()
            .iter()
            .enumerate()
            .map(|(k, &c)| self.upload_column(stream, staging, k, &pieces, c as usize, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let blocks = rows.div_ceil(BLOCK_THREADS as usize);
        let mut fault = self.alloc_bytes(stream, 8, bytes)?;
        {
            let (pointer, _record) = fault.device_ptr_mut(stream);
            // SAFETY: `fault` holds 8 bytes; all-ones is `NO_FAULT`.
            unsafe {
                cudarc::driver::result::memset_d8_async(pointer, 0xff, 8, stream.cu_stream())
            }
            .map_err(self.driver_error("cuMemsetD8Async", bytes))?;
        }
        let mut header = self.alloc_bytes(stream, 16, bytes)?;
        let keeps = program.keep_steps().len();
        // Zeroed (one memset) only where a filter counts into it.
        let mut keep_counts = if keeps > 0 {
            self.zeroed_bytes(stream, 8 * keeps, bytes)?
        } else {
            self.alloc_bytes(stream, 8, bytes)?
        };
        let mut block_counts = self.alloc_bytes(stream, blocks * 4, bytes)?;
        // Outputs sized for every row surviving; bitmaps zeroed for atomicOr.
        let words = bitmap_word_bytes(rows as u64) as usize;
        let mut outputs: Vec<(ValueType, CudaSlice<u8>, CudaSlice<u8>)> = Vec::new();
        for output in &program.outputs {
            if let OutputSource::Device(reg) = output {
                let ty = program.types[*reg as usize];
                let values = if ty == ValueType::Bool {
                    self.zeroed_bytes(stream, words, bytes)?
                } else {
                    self.alloc_bytes(stream, rows * 8, bytes)?
                };
                let validity = self.zeroed_bytes(stream, words, bytes)?;
                outputs.push((ty, values, validity));
            }
        }
        let mut row_ids = if program.needs_row_ids() {
            Some(self.alloc_bytes(stream, rows * 4, bytes)?)
        } else {
            None
        };
        let mut targets = if program.route.is_some() {
            Some(self.alloc_bytes(stream, rows * 4, bytes)?)
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
        if filters {
            let mut launch = stream.launch_builder(&module.count);
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
            // `rows` rows, `blocks` blocks or `keeps` filters and lives in
            // the chunk until its stream is synchronized.
            unsafe { launch.launch(grid) }.map_err(self.driver_error("cuLaunchKernel", bytes))?;
            let blocks_arg = blocks as u64;
            let mut launch = stream.launch_builder(&module.scan);
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
        let mut launch = stream.launch_builder(&module.write);
        push_inputs(&mut launch, &columns, &null_pointer);
        launch.arg(&n);
        if filters {
            launch.arg(&block_counts);
        } else {
            launch.arg(&null_pointer);
        }
        for (_, values, validity) in outputs.iter_mut() {
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
        // The header words: survivor count, fault word, rows after each
        // filter.
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
                        stream.cu_stream(),
                    )
                }
                .map_err(self.driver_error("cuMemcpyDtoHAsync", 0))
            };
            let (pointer, _record) = cudarc::driver::DevicePtr::device_ptr(&fault, stream);
            copy(1..2, pointer)?;
            if filters {
                let (pointer, _record) = cudarc::driver::DevicePtr::device_ptr(&header, stream);
                copy(0..1, pointer)?;
                let (pointer, _record) =
                    cudarc::driver::DevicePtr::device_ptr(&keep_counts, stream);
                copy(2..2 + keeps, pointer)?;
            } else {
                host[0] = n;
            }
        }
        Ok(Chunk {
            stream: Arc::clone(stream),
            offset,
            rows,
            pieces,
            _columns: columns,
            _scratch: [block_counts, fault, header, keep_counts],
            outputs,
            row_ids,
            targets,
        })
    }

    /// The first fault in evaluation order over the chunks (instruction,
    /// then row of the whole batch), as the evaluator's error.
    fn check_faults(
        &self,
        program: &ChainProgram,
        chunks: &[Chunk],
        staging: &[Staging],
    ) -> Result<(), KernelError> {
        let mut first: Option<(usize, u64, bool)> = None;
        for (c, chunk) in chunks.iter().enumerate() {
            if let Some((instr, row, zero)) =
                cuda_src::decode_fault(self.header_word(&staging[c], 1)?)
            {
                let at = (instr, row + chunk.offset as u64, zero);
                if first.is_none_or(|f| (at.0, at.1) < (f.0, f.1)) {
                    first = Some(at);
                }
            }
        }
        match first {
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

    /// A chunk's result from its header and downloaded outputs.
    fn chunk_output(
        &self,
        program: &ChainProgram,
        chunk: &Chunk,
        staging: &Staging,
    ) -> Result<ChainOutput, KernelError> {
        let header_len = 2 + program.keep_steps().len();
        let header: Vec<u64> = (0..header_len)
            .map(|i| self.header_word(staging, i))
            .collect::<Result<_, _>>()?;
        let survivors = header[0] as usize;
        let batch = self.assemble(program, &chunk.pieces, staging, survivors)?;
        let device_outputs = chunk.outputs.len();
        let targets = match program.route {
            Some(_) if survivors == 0 => Some(Vec::new()),
            Some(_) => {
                let host = staging.down[2 * device_outputs + 1]
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
            step_rows: program.step_rows(chunk.rows as u64, &header[2..]),
            batch,
            targets,
            traffic: None,
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

    /// Bytes of the first `rows` rows of every output of `chunk`.
    fn output_bytes(&self, chunk: &Chunk, rows: usize) -> u64 {
        let words = bitmap_word_bytes(rows as u64) as usize;
        let mut bytes = 0;
        for (ty, _, _) in &chunk.outputs {
            bytes += if *ty == ValueType::Bool {
                words
            } else {
                rows * 8
            } + words;
        }
        bytes += rows
            * 4
            * (usize::from(chunk.row_ids.is_some()) + usize::from(chunk.targets.is_some()));
        bytes as u64
    }

    /// Enqueues the copies of the first `rows` rows of every output of
    /// `chunk` into its pinned staging; returns their bytes.
    fn download_outputs(
        &self,
        chunk: &Chunk,
        staging: &mut Staging,
        rows: usize,
    ) -> Result<u64, KernelError> {
        let stream = &chunk.stream;
        let words = bitmap_word_bytes(rows as u64) as usize;
        let mut bytes = 0;
        for (j, (ty, values, validity)) in chunk.outputs.iter().enumerate() {
            let value_len = if *ty == ValueType::Bool {
                words
            } else {
                rows * 8
            };
            self.download_into(stream, staging, 2 * j, values, value_len)?;
            self.download_into(stream, staging, 2 * j + 1, validity, words)?;
            bytes += value_len + words;
        }
        let slot = 2 * chunk.outputs.len();
        if let Some(ids) = &chunk.row_ids {
            self.download_into(stream, staging, slot, ids, rows * 4)?;
            bytes += rows * 4;
        }
        if let Some(targets) = &chunk.targets {
            self.download_into(stream, staging, slot + 1, targets, rows * 4)?;
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

/// Bytes of an Int64 or Float64 column of `pieces` packed for the device:
/// its values, and its 32-bit validity words when some row is null (else 0).
pub(super) fn column_layout(pieces: &[RecordBatch], column: usize) -> (usize, usize) {
    let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
    let nullable = pieces.iter().any(|p| p.column(column).null_count() > 0);
    let word_bytes = if nullable {
        bitmap_word_bytes(rows as u64) as usize
    } else {
        0
    };
    (rows * 8, word_bytes)
}

/// Packs an Int64 or Float64 column of `pieces` into `host`, laid out as
/// [`column_layout`] says (`host` is exactly that long): one host copy of
/// the values, the validity bits after them.
pub(super) fn pack_column(pieces: &[RecordBatch], column: usize, host: &mut [u8]) {
    let rows: usize = pieces.iter().map(RecordBatch::num_rows).sum();
    let value_bytes = rows * 8;
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
    if host.len() > value_bytes {
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
        host[value_bytes + packed.len()..].fill(0);
    }
}

/// Waits for every chunk's stream.
fn sync_chunks(chunks: &[Chunk]) -> Result<(), cudarc::driver::DriverError> {
    for chunk in chunks {
        chunk.stream.synchronize()?;
    }
    Ok(())
}

/// `pieces` cut into the first `first_rows` rows and the rest (slices, no
/// copies).
fn split_rows(pieces: &[RecordBatch], first_rows: usize) -> Vec<Vec<RecordBatch>> {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut taken = 0;
    for piece in pieces {
        let want = first_rows.saturating_sub(taken).min(piece.num_rows());
        if want > 0 {
            first.push(piece.slice(0, want));
            taken += want;
        }
        if want < piece.num_rows() {
            second.push(piece.slice(want, piece.num_rows() - want));
        }
    }
    vec![first, second]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};

    use super::{column_layout, pack_column, split_rows};

    /// Pieces (one sliced mid-byte, with nulls) packed for the device: the
    /// values one after another, then validity words whose bit `i` is row
    /// `i` of the whole batch, the tail of the last word zero.
    #[test]
    fn a_column_of_pieces_packs_into_values_then_validity_words() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let whole: Int64Array = (0..45).map(|i| (i % 4 != 1).then_some(i * 10)).collect();
        let whole = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(whole)]).unwrap();
        let pieces = [whole.slice(3, 17), whole.slice(20, 25)];
        let (value_bytes, word_bytes) = column_layout(&pieces, 0);
        assert_eq!((value_bytes, word_bytes), (42 * 8, 8));
        let mut host = vec![0xAAu8; value_bytes + word_bytes];
        pack_column(&pieces, 0, &mut host);
        for row in 0..42 {
            let value = i64::from_le_bytes(host[row * 8..row * 8 + 8].try_into().unwrap());
            let word = u32::from_le_bytes(
                host[value_bytes + row / 32 * 4..value_bytes + row / 32 * 4 + 4]
                    .try_into()
                    .unwrap(),
            );
            let valid = (word >> (row % 32)) & 1 == 1;
            let source = row as i64 + 3;
            assert_eq!(valid, source % 4 != 1, "row {row}");
            if valid {
                assert_eq!(value, source * 10, "row {row}");
            }
        }
        let last = u32::from_le_bytes(host[value_bytes + 4..].try_into().unwrap());
        assert_eq!(last >> 10, 0, "bits past row 42 are zero");
        // Without nulls there are no validity words.
        let dense =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..10))])
                .unwrap();
        assert_eq!(column_layout(&[dense], 0), (80, 0));
    }

    #[test]
    fn halves_cut_pieces_at_the_row_without_losing_or_reordering_rows() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let piece = |from: i64, to: i64| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from_iter_values(from..to))],
            )
            .unwrap()
        };
        let pieces = [piece(0, 3), piece(3, 10), piece(10, 11)];
        for first_rows in [0, 1, 3, 5, 10, 11] {
            let halves = split_rows(&pieces, first_rows);
            let rows = |h: &Vec<RecordBatch>| h.iter().map(RecordBatch::num_rows).sum::<usize>();
            assert_eq!(rows(&halves[0]), first_rows);
            assert_eq!(rows(&halves[1]), 11 - first_rows);
            let values: Vec<i64> = halves
                .iter()
                .flatten()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect();
            assert_eq!(values, (0..11).collect::<Vec<_>>(), "cut at {first_rows}");
            assert!(halves.iter().flatten().all(|b| b.num_rows() > 0));
        }
    }
}
