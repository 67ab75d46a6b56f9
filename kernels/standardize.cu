// Feature standardization for ML pipelines: z = (x - mean) / std per column,
// with the statistics computed on the device by a deterministic reduction.
//
// Semantics (as scikit-learn's StandardScaler; the CPU twin,
// src/kernels/cpu/standardize.rs, has the same):
// - Statistics ignore nulls and NaNs. mean = sum / count and std is the
//   population standard deviation sqrt(sum_squares / count - mean^2), a
//   negative variance (rounding) clamped to 0. A column with no counted
//   value has mean 0 and std 0.
// - Transform: a null row stays null (its value is 0.0; reuse the input
//   validity), a NaN stays NaN, std == 0 gives 0.0, and otherwise
//   (x - mean) / std. An infinite value makes the statistics NaN or infinite
//   and they propagate by IEEE rules.
//
// The reduction is bit-reproducible: rows are cut into chunks of 256, each
// chunk summed by the fixed shared-memory tree below (pad with zeros, then
// s[t] += s[t + stride] for stride 128, 64, ..., 1), and the chunk partials
// are reduced the same way until one remains. The CPU twin replays the same
// tree, so mean and std are bit-identical across tiers and runs, which
// atomics would not give.
//
// Launches per column: standardize_moments over the values (one partial per
// chunk, at least one), standardize_moments_merge over the partials while
// more than one remains, standardize_stats over the columns' final moments,
// then standardize_apply. The reduction kernels need blockDim.x == 256.
#include "common.cuh"

using namespace strata;

namespace {

const u32 REDUCE_CHUNK_ROWS = 256;

STRATA_DEVICE u64 chunk_count(u64 item_count) {
    const u64 chunks = (item_count + REDUCE_CHUNK_ROWS - 1) / REDUCE_CHUNK_ROWS;
    return chunks == 0 ? 1 : chunks;
}

// Reduces one chunk already loaded into shared memory; thread 0 writes it.
__device__ void reduce_chunk(double* sums, double* sum_squares, u64* counts, u64 chunk,
                             double* out_sum, double* out_sum_squares, u64* out_count) {
    const u32 t = threadIdx.x;
    __syncthreads();
    for (u32 stride = REDUCE_CHUNK_ROWS / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            sums[t] = __dadd_rn(sums[t], sums[t + stride]);
            sum_squares[t] = __dadd_rn(sum_squares[t], sum_squares[t + stride]);
            counts[t] += counts[t + stride];
        }
        __syncthreads();
    }
    if (t == 0) {
        out_sum[chunk] = sums[0];
        out_sum_squares[chunk] = sum_squares[0];
        out_count[chunk] = counts[0];
    }
    // The next chunk may overwrite the shared arrays only after thread 0 read them.
    __syncthreads();
}

STRATA_DEVICE bool reduce_block() { return blockDim.x == REDUCE_CHUNK_ROWS; }

}  // namespace

extern "C" __global__ void standardize_moments(const double* values, const u8* validity,
                                               u64 validity_offset, u64 row_count,
                                               double* out_sum, double* out_sum_squares,
                                               u64* out_count) {
    if (!reduce_block()) {
        return;
    }
    __shared__ double sums[REDUCE_CHUNK_ROWS];
    __shared__ double sum_squares[REDUCE_CHUNK_ROWS];
    __shared__ u64 counts[REDUCE_CHUNK_ROWS];
    const u64 chunks = chunk_count(row_count);
    for (u64 chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
        const u64 row = chunk * REDUCE_CHUNK_ROWS + threadIdx.x;
        double x = 0.0;
        bool counted = false;
        if (row < row_count && is_valid(validity, validity_offset, row)) {
            x = values[row];
            counted = x == x;  // NaN is not counted
        }
        sums[threadIdx.x] = counted ? x : 0.0;
        sum_squares[threadIdx.x] = counted ? __dmul_rn(x, x) : 0.0;
        counts[threadIdx.x] = counted ? 1 : 0;
        reduce_chunk(sums, sum_squares, counts, chunk, out_sum, out_sum_squares, out_count);
    }
}

extern "C" __global__ void standardize_moments_merge(const double* sum, const double* sum_squares,
                                                     const u64* count, u64 partial_count,
                                                     double* out_sum, double* out_sum_squares,
                                                     u64* out_count) {
    if (!reduce_block()) {
        return;
    }
    __shared__ double sums[REDUCE_CHUNK_ROWS];
    __shared__ double squares[REDUCE_CHUNK_ROWS];
    __shared__ u64 counts[REDUCE_CHUNK_ROWS];
    const u64 chunks = chunk_count(partial_count);
    for (u64 chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
        const u64 item = chunk * REDUCE_CHUNK_ROWS + threadIdx.x;
        const bool present = item < partial_count;
        sums[threadIdx.x] = present ? sum[item] : 0.0;
        squares[threadIdx.x] = present ? sum_squares[item] : 0.0;
        counts[threadIdx.x] = present ? count[item] : 0;
        reduce_chunk(sums, squares, counts, chunk, out_sum, out_sum_squares, out_count);
    }
}

// One thread per column: final moments → mean and std.
extern "C" __global__ void standardize_stats(const double* sum, const double* sum_squares,
                                             const u64* count, u64 column_count, double* mean,
                                             double* std) {
    for (u64 column = global_thread_index(); column < column_count;
         column += global_thread_count()) {
        if (count[column] == 0) {
            mean[column] = 0.0;
            std[column] = 0.0;
            continue;
        }
        const double n = __ull2double_rn(count[column]);
        const double m = __ddiv_rn(sum[column], n);
        double variance = __dsub_rn(__ddiv_rn(sum_squares[column], n), __dmul_rn(m, m));
        if (variance < 0.0) {
            variance = 0.0;  // NaN stays NaN
        }
        mean[column] = m;
        std[column] = __dsqrt_rn(variance);
    }
}

// `mean` and `std` point at the column's entries of standardize_stats' output.
extern "C" __global__ void standardize_apply(const double* values, const u8* validity,
                                             u64 validity_offset, u64 row_count,
                                             const double* mean, const double* std,
                                             double* out) {
    const double m = *mean;
    const double s = *std;
    for (u64 row = global_thread_index(); row < row_count; row += global_thread_count()) {
        double z = 0.0;
        if (is_valid(validity, validity_offset, row)) {
            const double x = values[row];
            if (x != x) {
                z = x;
            } else if (s != 0.0) {
                z = __ddiv_rn(__dsub_rn(x, m), s);
            }
        }
        out[row] = z;
    }
}
