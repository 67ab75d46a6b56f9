//! The device aggregation table (`kernels::aggtable`) on CUDA: one
//! allocation holding the slots, its kernels generated per program and
//! compiled by NVRTC, and one host wait per upsert (for the group count
//! that decides when to drain).
//!
//! Every buffer is owned by the table or the call and used on the table's
//! one stream, which each call synchronizes before it returns, so nothing
//! the device reads is freed or reused while a copy or kernel runs.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, RecordBatch};
use arrow_buffer::BooleanBufferBuilder;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

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
    _held: DeviceReservation,
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

    /// An Int64 column of the pieces, values and validity words, on the
    /// device (pageable copies: the table does not share the chains'
    /// pinned staging yet).
    fn column(
        &self,
        pieces: &[RecordBatch],
        column: usize,
    ) -> Result<(CudaSlice<i64>, Option<CudaSlice<u32>>), KernelError> {
        let mut values = Vec::new();
        let mut bits = BooleanBufferBuilder::new(0);
        let mut nulls = false;
        for piece in pieces {
            let array = piece.column(column).as_primitive::<Int64Type>();
            values.extend_from_slice(array.values());
            nulls |= array.null_count() > 0;
            match array.nulls() {
                Some(n) => bits.append_buffer(n.inner()),
                None => bits.append_n(array.len(), true),
            }
        }
        let device = self
            .stream
            .clone_htod(&values)
            .map_err(self.error("cuMemcpyHtoD"))?;
        if !nulls {
            return Ok((device, None));
        }
        let bits = bits.finish();
        let mut words = vec![0u32; values.len().div_ceil(32)];
        for (i, chunk) in bits.values().chunks(4).enumerate() {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            words[i] = u32::from_le_bytes(word);
        }
        let validity = self
            .stream
            .clone_htod(&words)
            .map_err(self.error("cuMemcpyHtoD"))?;
        Ok((device, Some(validity)))
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
        let (keys, key_valid) = self.column(pieces, self.program.key_column)?;
        let values = self
            .program
            .value_columns()
            .iter()
            .map(|&c| self.column(pieces, c))
            .collect::<Result<Vec<_>, _>>()?;
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
        // every input holds `rows` rows and lives until the sync below.
        unsafe { launch.launch(config) }.map_err(self.error("cuLaunchKernel"))?;
        self.groups = self.read_counter(0)?;
        Ok(())
    }

    fn groups(&self) -> u64 {
        self.groups
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn drain(&mut self) -> Result<RecordBatch, KernelError> {
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
