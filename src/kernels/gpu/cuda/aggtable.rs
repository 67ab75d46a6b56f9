//! The device aggregation table (`kernels::aggtable`) on CUDA: one
//! allocation holding the slots, its kernels generated per program and
//! compiled by NVRTC.
//!
//! An upsert packs the key and value columns into the table's pinned
//! staging (one host copy each), copies them up, launches, and enqueues the
//! copy of the group counter into pinned memory, then returns without
//! waiting: the host coalesces the next input while the device works. The
//! wait comes when the group count is next needed (the operator asks before
//! its next upsert, to decide whether to drain) or before the staging is
//! reused.
//!
//! Every device buffer is owned by the table or the call and used on the
//! table's one stream; the pinned staging is the table's, and nothing
//! writes it again (and the table is not dropped) before the stream has
//! been synchronized after the upsert that reads it.

use std::sync::Arc;

use arrow_array::RecordBatch;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::CudaBackend;
use crate::kernels::aggtable::{
    AggProgram, DeviceAggTable, GroupPartials, Partial, cuda_source, device_bytes, partials_batch,
    table_layout,
};
use crate::kernels::backend::KernelError;
use crate::kernels::gpu::pool::DeviceReservation;

const BLOCK_THREADS: u32 = 256;

pub(super) struct CudaAggTable {
    program: Arc<AggProgram>,
    stream: Arc<CudaStream>,
    slot_index: usize,
    capacity: u64,
    table: CudaSlice<u8>,
    out: CudaSlice<u8>,
    upsert: CudaFunction,
    drain: CudaFunction,
    clear: CudaFunction,
    groups: u64,
    /// Pinned staging of each uploaded column (key first, then values):
    /// values, then validity words.
    staging: Vec<PinnedHostSlice<u8>>,
    /// Where the group counter lands after an upsert.
    counter: PinnedHostSlice<u64>,
    /// An upsert was enqueued and not yet waited for.
    outstanding: bool,
    _held: DeviceReservation,
}

impl Drop for CudaAggTable {
    fn drop(&mut self) {
        if self.outstanding {
            // The device may still read the pinned staging: wait before it
            // is freed. A failure means the context is gone with it.
            let _ = self.stream.synchronize();
        }
    }
}

/// Pinned host memory of `len` elements (write-combined for uploads: the
/// host only writes it), for staging on `stream`'s context.
pub(super) fn pinned<T: cudarc::driver::DeviceRepr>(
    stream: &CudaStream,
    len: usize,
    write_combined: bool,
    slot_index: usize,
) -> Result<PinnedHostSlice<T>, KernelError> {
    let flags = if write_combined {
        cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
    } else {
        0
    };
    // SAFETY: every caller writes the buffer (upload staging) or has a
    // device copy fill it (downloads, the group counter) before any byte of
    // it is read.
    unsafe {
        stream
            .context()
            .alloc_pinned_with_flags::<T>(len.max(1), flags)
    }
    .map_err(super::driver_error_in(
        slot_index,
        "cuMemHostAlloc",
        (len * std::mem::size_of::<T>()) as u64,
    ))
}

impl CudaBackend {
    pub(super) fn open_device_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<CudaAggTable, KernelError> {
        let capacity = capacity.next_power_of_two();
        let bytes = device_bytes(&program, capacity);
        let held = self.reserve(bytes)?;
        let module = self.load_generated("aggregate_table", &cuda_source(&program))?;
        let function = |name| Self::generated_function(&module, name);
        let slots = capacity + 1;
        let values = program.value_columns().len() as u64;
        let (_, counters) = table_layout(slots, values);
        // SAFETY: `agg_clear` below writes every slot and both counters
        // before any other kernel or copy reads the table.
        let table = unsafe { self.stream.alloc::<u8>((counters + 16) as usize) }
            .map_err(self.driver_error("cuMemAllocAsync", bytes))?;
        // SAFETY: `agg_drain` writes the entries a drain then reads.
        let out = unsafe {
            self.stream
                .alloc::<u8>((slots * (24 + 40 * values)) as usize)
        }
        .map_err(self.driver_error("cuMemAllocAsync", bytes))?;
        let mut table = CudaAggTable {
            program,
            stream: Arc::clone(&self.stream),
            slot_index: self.pool.slot_index(),
            capacity,
            table,
            out,
            upsert: function("agg_upsert")?,
            drain: function("agg_drain")?,
            clear: function("agg_clear")?,
            groups: 0,
            staging: Vec::new(),
            counter: pinned::<u64>(&self.stream, 1, false, self.pool.slot_index())?,
            outstanding: false,
            _held: held,
        };
        table.clear()?;
        table.sync()?;
        Ok(table)
    }
}

impl CudaAggTable {
    fn error(&self, call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
        super::driver_error_in(self.slot_index, call, 0)
    }

    fn slots(&self) -> u64 {
        self.capacity + 1
    }

    fn grid(&self, items: u64) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (items.div_ceil(u64::from(BLOCK_THREADS)).max(1) as u32, 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn clear(&mut self) -> Result<(), KernelError> {
        let slots = self.slots();
        let config = self.grid(slots);
        let mut launch = self.stream.launch_builder(&self.clear);
        launch.arg(&mut self.table).arg(&slots);
        // SAFETY: `agg_clear(table, slots)`: the table holds `slots` slots
        // and the counters (`table_layout`); it lives as long as `self`.
        unsafe { launch.launch(config) }.map_err(self.error("cuLaunchKernel"))?;
        self.groups = 0;
        Ok(())
    }

    fn sync(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(self.error("cuStreamSynchronize"))
    }

    /// Waits for the last upsert, if it was not waited for, and takes its
    /// group count.
    fn settle(&mut self) -> Result<(), KernelError> {
        if self.outstanding {
            self.sync()?;
            self.outstanding = false;
            let counter = self
                .counter
                .as_slice()
                .map_err(self.error("cuEventSynchronize"))?;
            self.groups = counter[0];
        }
        Ok(())
    }

    /// Int64 column `column` of the pieces packed into pinned staging
    /// `slot` (values, then validity words when a row is null) and copied
    /// up; the stream must be idle (the staging is reused).
    fn column(
        &mut self,
        pieces: &[RecordBatch],
        column: usize,
        slot: usize,
    ) -> Result<(CudaSlice<u8>, Option<CudaSlice<u8>>), KernelError> {
        let (value_bytes, word_bytes) = super::chain::column_layout(pieces, column);
        let nullable = word_bytes > 0;
        let len = value_bytes + word_bytes;
        while self.staging.len() <= slot {
            self.staging
                .push(pinned::<u8>(&self.stream, 1, true, self.slot_index)?);
        }
        if self.staging[slot].len() < len {
            self.staging[slot] =
                pinned::<u8>(&self.stream, len.next_power_of_two(), true, self.slot_index)?;
        }
        let (stream, slot_index) = (Arc::clone(&self.stream), self.slot_index);
        let error = |call| super::driver_error_in(slot_index, call, 0);
        let host = self.staging[slot]
            .as_mut_slice()
            .map_err(error("cuEventSynchronize"))?;
        super::chain::pack_column(pieces, column, &mut host[..len]);
        let host: &[u8] = host;
        let upload = |range: std::ops::Range<usize>| -> Result<CudaSlice<u8>, KernelError> {
            // SAFETY: every byte is overwritten by the copy below before a
            // kernel reads it.
            let mut device =
                unsafe { stream.alloc::<u8>(range.len()) }.map_err(error("cuMemAllocAsync"))?;
            {
                let (pointer, _record) = device.device_ptr_mut(&stream);
                // SAFETY: `device` holds `range.len()` bytes; the pinned
                // source is not written again until the stream is
                // synchronized (`settle` before the next upsert, or the
                // table's drop).
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        pointer,
                        &host[range],
                        stream.cu_stream(),
                    )
                }
                .map_err(error("cuMemcpyHtoDAsync"))?;
            }
            Ok(device)
        };
        let values = upload(0..value_bytes)?;
        let validity = if nullable {
            Some(upload(value_bytes..len)?)
        } else {
            None
        };
        Ok((values, validity))
    }

    fn read_counter(&self, index: u64) -> Result<u64, KernelError> {
        let (_, counters) = table_layout(self.slots(), self.program.value_columns().len() as u64);
        let at = (counters + 8 * index) as usize;
        let mut word = [0u8; 8];
        self.stream
            .memcpy_dtoh(&self.table.slice(at..at + 8), &mut word)
            .map_err(self.error("cuMemcpyDtoH"))?;
        self.sync()?;
        Ok(u64::from_le_bytes(word))
    }
}

impl DeviceAggTable for CudaAggTable {
    fn upsert(&mut self, pieces: &[RecordBatch]) -> Result<(), KernelError> {
        let rows: u64 = pieces.iter().map(|p| p.num_rows() as u64).sum();
        if rows == 0 {
            return Ok(());
        }
        self.settle()?;
        let (keys, key_valid) = self.column(pieces, self.program.key_column, 0)?;
        let value_columns = self.program.value_columns();
        let mut values = Vec::with_capacity(value_columns.len());
        for (k, &c) in value_columns.iter().enumerate() {
            values.push(self.column(pieces, c, k + 1)?);
        }
        let null_pointer = 0u64;
        let slots = self.slots();
        let config = self.grid(rows);
        let mut launch = self.stream.launch_builder(&self.upsert);
        launch.arg(&keys);
        match &key_valid {
            Some(v) => launch.arg(v),
            None => launch.arg(&null_pointer),
        };
        for (v, m) in &values {
            launch.arg(v);
            match m {
                Some(m) => launch.arg(m),
                None => launch.arg(&null_pointer),
            };
        }
        launch.arg(&rows).arg(&mut self.table).arg(&slots);
        // SAFETY: the arguments follow `agg_upsert`'s generated signature
        // (keys and their validity words or a null pointer, each value
        // column and its validity, the row count, the table, its slots);
        // every input holds `rows` rows; dropped at the end of this call,
        // the inputs are freed in stream order, after the kernel.
        unsafe { launch.launch(config) }.map_err(self.error("cuLaunchKernel"))?;
        // The group counter comes back behind the kernel, without a wait.
        let (_, counters) = table_layout(slots, value_columns.len() as u64);
        let at = counters as usize;
        let error = |call| super::driver_error_in(self.slot_index, call, 0);
        {
            let view = self.table.slice(at..at + 8);
            let (pointer, _record) = cudarc::driver::DevicePtr::device_ptr(&view, &self.stream);
            let counter = self
                .counter
                .as_mut_slice()
                .map_err(error("cuEventSynchronize"))?;
            // SAFETY: the pinned counter holds one word and is read only
            // after the stream is synchronized (`settle`); the table
            // outlives the copy.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut counter[..1],
                    pointer,
                    self.stream.cu_stream(),
                )
            }
            .map_err(error("cuMemcpyDtoHAsync"))?;
        }
        self.outstanding = true;
        Ok(())
    }

    fn groups(&mut self) -> Result<u64, KernelError> {
        self.settle()?;
        Ok(self.groups)
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn drain(&mut self) -> Result<RecordBatch, KernelError> {
        self.settle()?;
        let slots = self.slots();
        let config = self.grid(slots);
        let mut launch = self.stream.launch_builder(&self.drain);
        launch.arg(&mut self.table).arg(&slots).arg(&mut self.out);
        // SAFETY: `agg_drain(table, slots, out)`: `out` holds `slots`
        // entries of every output word (`device_bytes`).
        unsafe { launch.launch(config) }.map_err(self.error("cuLaunchKernel"))?;
        let groups = self.read_counter(1)? as usize;
        let words = 3 + 5 * self.program.value_columns().len();
        let mut columns: Vec<Vec<u64>> = Vec::with_capacity(words);
        for w in 0..words {
            let at = (w as u64 * slots * 8) as usize;
            let mut host = vec![0u64; groups];
            if groups > 0 {
                let view = self.out.slice(at..at + groups * 8);
                let bytes: &mut [u8] = bytemuck_u64(&mut host);
                self.stream
                    .memcpy_dtoh(&view, bytes)
                    .map_err(self.error("cuMemcpyDtoH"))?;
            }
            columns.push(host);
        }
        self.sync()?;
        let values = self.program.value_columns().len();
        let partials = (0..groups)
            .map(|g| {
                let key = (columns[1][g] == 0).then_some(columns[0][g] as i64);
                let partials = (0..values)
                    .map(|v| {
                        let w = |a: usize| columns[3 + 5 * v + a][g];
                        Partial {
                            count: w(0),
                            sum: ((w(2) as i128) << 64) | i128::from(w(1)),
                            min: w(3) as i64,
                            max: w(4) as i64,
                        }
                    })
                    .collect();
                (
                    key,
                    GroupPartials {
                        rows: columns[2][g],
                        values: partials,
                    },
                )
            })
            .collect();
        self.clear()?;
        self.sync()?;
        partials_batch(&self.program, partials)
    }
}

/// The bytes of a `u64` slice, for a device copy into it.
fn bytemuck_u64(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: a `u64` slice is `len` initialised bytes with no padding, and
    // every byte pattern is a valid `u64`; the borrow covers the slice.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}
