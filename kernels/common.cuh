// Shared by every kernel in this directory: fixed-width types, Arrow
// validity bits and the warp-per-32-rows iteration that writes bitmaps.
//
// Conventions every kernel follows (the CPU twins in src/kernels/cpu/ mirror
// them; the module docs there say the same from the Rust side):
// - A column is `values` + `validity` (Arrow's LSB-first bitmap, or null for
//   "no nulls") + `validity_offset` (a bit offset, so sliced Arrow arrays need
//   no repacking) + `row_count`.
// - Bitmaps that kernels write (selections, output validity) are arrays of
//   32-bit words, one per 32 rows, written whole by one warp; bits past
//   `row_count` are zero. Their first ceil(row_count / 8) bytes are exactly
//   the Arrow bitmap the CPU twin writes. Kernels that write bitmaps need
//   blockDim.x to be a multiple of 32 and trap otherwise.
// - Floating-point arithmetic uses the `__d*_rn` intrinsics, never plain
//   operators, so that no compiler flag (--fmad, --use_fast_math) can contract
//   or approximate it: results are then bit-identical to the CPU twin except
//   for NaN payloads, which IEEE 754 leaves unspecified.
// - Grid sizes are free: kernels loop grid-stride over their work (the one
//   exception, partition_offsets, is a single-block scan).
//
// The pure helpers (no thread indices, no intrinsics) also compile as host
// C++, which is how tests/kernels_nvrtc.rs checks them against the Rust twins
// on a machine without a GPU.
#pragma once

#if defined(__CUDACC__)
#define STRATA_DEVICE __device__ __forceinline__
#else
#define STRATA_DEVICE inline
#endif

namespace strata {

typedef unsigned char u8;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

const i64 I64_MIN = (i64)0x8000000000000000ull;
const i64 I64_MAX = (i64)0x7FFFFFFFFFFFFFFFull;
const u64 U64_MAX = 0xFFFFFFFFFFFFFFFFull;

// Whether `row` is valid in an Arrow validity bitmap (null bitmap = all valid).
STRATA_DEVICE bool is_valid(const u8* validity, u64 validity_offset, u64 row) {
    if (validity == nullptr) {
        return true;
    }
    const u64 bit = validity_offset + row;
    return ((validity[bit >> 3] >> (bit & 7)) & 1) != 0;
}

#if defined(__CUDACC__)

const u32 FULL_WARP = 0xFFFFFFFFu;

STRATA_DEVICE u64 global_thread_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

STRATA_DEVICE u64 global_thread_count() { return (u64)gridDim.x * blockDim.x; }

STRATA_DEVICE u32 lane_index() { return threadIdx.x & 31u; }

// Warps own 32-row words: warp w handles words w, w + warp_count, ...
STRATA_DEVICE u64 global_warp_index() { return global_thread_index() >> 5; }

STRATA_DEVICE u64 global_warp_count() { return global_thread_count() >> 5; }

STRATA_DEVICE u64 bitmap_word_count(u64 row_count) { return (row_count + 31) / 32; }

// Argument and launch-configuration checks. The host checks every one of
// these before it launches (a bad value is a typed error there), so a kernel
// that still sees one returns without writing anything: a device trap would
// poison the context that every slot on the GPU shares.
STRATA_DEVICE bool whole_warps() { return (blockDim.x & 31u) == 0; }

#endif  // __CUDACC__

}  // namespace strata
