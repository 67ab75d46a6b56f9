//! What a device batch of a fused chain costs the device: the plan the
//! CUDA executor follows, which the simulator reserves and counts.

use super::{ChainProgram, Download, OutputSource, ValueType, cuda_src};

/// What one device batch of a chain moves, allocates and launches: the
/// plan the CUDA backend follows (`gpu::cuda`), which the simulated backend
/// reserves and counts the same way.
///
/// Up: each device input column once (values, and validity words when a
/// piece has nulls). Launches: the fault-word memset, one memset per output
/// bitmap, then `chain_count` and `chain_scan` when the chain filters, then
/// `chain_write`. Down, as [`Download`] says
/// ([`super::ChainProgram::download`]): predicted, the first rows' values,
/// validity words, row numbers (for host columns) and targets (when it
/// routes) are enqueued behind the kernels before anyone knows the
/// survivor count, with the 16-byte count and fault word and the filters'
/// counters, and one wait covers them all (when more rows survive than
/// that, the survivors come down again after a second wait); counted, the
/// host waits for the count, then for exactly the survivors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTraffic {
    pub rows: u64,
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    pub launches: u64,
    pub syncs: u64,
    /// Device memory the batch holds at its peak (inputs, scratch, and
    /// outputs sized for every row surviving).
    pub device_bytes: u64,
}

/// Bytes of the 32-bit words of a bitmap over `rows` rows.
pub fn bitmap_word_bytes(rows: u64) -> u64 {
    rows.div_ceil(32) * 4
}

impl DeviceTraffic {
    /// The traffic of a batch of `pieces` that brought its outputs back as
    /// `download` says and kept `survivors`.
    pub fn plan(
        program: &ChainProgram,
        pieces: &[arrow_array::RecordBatch],
        download: Download,
        survivors: u64,
    ) -> DeviceTraffic {
        let rows: u64 = pieces.iter().map(|p| p.num_rows() as u64).sum();
        let has_nulls = |column: u32| {
            pieces
                .iter()
                .any(|p| arrow_array::Array::null_count(p.column(column as usize)) > 0)
        };
        let h2d_bytes: u64 = program
            .device_inputs()
            .iter()
            .map(|&c| {
                rows * 8
                    + if has_nulls(c) {
                        bitmap_word_bytes(rows)
                    } else {
                        0
                    }
            })
            .sum();
        let output_bytes = |n: u64| -> (u64, u64) {
            let mut bytes = 0;
            let mut bitmaps = 0;
            for output in &self_outputs(program) {
                match output {
                    ValueType::Bool => {
                        bytes += 2 * bitmap_word_bytes(n);
                        bitmaps += 2;
                    }
                    _ => {
                        bytes += n * 8 + bitmap_word_bytes(n);
                        bitmaps += 1;
                    }
                }
            }
            if program.needs_row_ids() {
                bytes += n * 4;
            }
            if program.route.is_some() {
                bytes += n * 4;
            }
            (bytes, bitmaps)
        };
        let (capacity_bytes, bitmaps) = output_bytes(rows);
        let (download, syncs) = match download {
            Download::Predicted(downloaded) if survivors <= downloaded => {
                (output_bytes(downloaded.min(rows)).0, 1)
            }
            Download::Predicted(downloaded) => (
                output_bytes(downloaded.min(rows)).0 + output_bytes(survivors).0,
                2,
            ),
            Download::Counted => (output_bytes(survivors).0, 2),
        };
        let filters = program.filters();
        let blocks = rows.div_ceil(u64::from(cuda_src::BLOCK_THREADS));
        let keep_bytes = 8 * program.keep_steps().len() as u64;
        DeviceTraffic {
            rows,
            h2d_bytes,
            d2h_bytes: download + 16 + keep_bytes,
            // Fault word and output bitmaps zeroed (and the keep counters,
            // with a filter); the kernels.
            launches: 1 + bitmaps + if filters { 4 } else { 1 },
            syncs,
            device_bytes: h2d_bytes + capacity_bytes + blocks * 4 + 16 + keep_bytes,
        }
    }
}

/// The value types of the device outputs, in output order.
fn self_outputs(program: &ChainProgram) -> Vec<ValueType> {
    program
        .outputs
        .iter()
        .filter_map(|o| match o {
            OutputSource::Device(reg) => Some(program.types[*reg as usize]),
            OutputSource::Host(_) => None,
        })
        .collect()
}
