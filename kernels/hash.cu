// Key hashing: one hash per row, folded across key columns.
//
// Launch one kernel per key column, in key order, over the same `hashes`
// buffer: the first with combine_with_previous = 0 (the column's hash is
// stored), the rest with 1 (it is folded in with `combine`). Null rows hash as
// NULL_HASH. Integer keys of every width widen to 64 bits and floats to
// double, so an Int32 5 and an Int64 5 hash alike. CPU twin:
// src/kernels/cpu/key_hash.rs; the functions live in hash.cuh.
#include "hash.cuh"

using namespace strata;

namespace {

STRATA_DEVICE void store_hash(u64* hashes, u64 row, u64 hash, u32 combine_with_previous) {
    hashes[row] = combine_with_previous != 0 ? combine(hashes[row], hash) : hash;
}

template <typename T, typename Widen>
__device__ void hash_primitive(const T* values, const u8* validity, u64 validity_offset,
                               u64 row_count, u32 combine_with_previous, u64* hashes,
                               Widen widen) {
    for (u64 row = global_thread_index(); row < row_count; row += global_thread_count()) {
        const u64 hash =
            is_valid(validity, validity_offset, row) ? widen(values[row]) : NULL_HASH;
        store_hash(hashes, row, hash, combine_with_previous);
    }
}

// Utf8 (i32 offsets) and LargeUtf8 (i64 offsets): row i is
// data[offsets[i] .. offsets[i + 1]]; offsets need not start at zero.
template <typename Offset>
__device__ void hash_strings(const Offset* offsets, const u8* data, const u8* validity,
                             u64 validity_offset, u64 row_count, u32 combine_with_previous,
                             u64* hashes) {
    for (u64 row = global_thread_index(); row < row_count; row += global_thread_count()) {
        u64 hash = NULL_HASH;
        if (is_valid(validity, validity_offset, row)) {
            const Offset start = offsets[row];
            hash = hash_bytes(data + start, (u64)(offsets[row + 1] - start));
        }
        store_hash(hashes, row, hash, combine_with_previous);
    }
}

struct WidenI64 {
    STRATA_DEVICE u64 operator()(i64 v) const { return hash_u64((u64)v); }
};
struct WidenI32 {
    STRATA_DEVICE u64 operator()(i32 v) const { return hash_u64((u64)(i64)v); }
};
struct WidenF64 {
    STRATA_DEVICE u64 operator()(double v) const { return strata::hash_f64(v); }
};
struct WidenF32 {
    STRATA_DEVICE u64 operator()(float v) const { return strata::hash_f64((double)v); }
};

}  // namespace

extern "C" __global__ void hash_i64(const i64* values, const u8* validity, u64 validity_offset,
                                    u64 row_count, u32 combine_with_previous, u64* hashes) {
    hash_primitive(values, validity, validity_offset, row_count, combine_with_previous, hashes,
                   WidenI64());
}

extern "C" __global__ void hash_i32(const i32* values, const u8* validity, u64 validity_offset,
                                    u64 row_count, u32 combine_with_previous, u64* hashes) {
    hash_primitive(values, validity, validity_offset, row_count, combine_with_previous, hashes,
                   WidenI32());
}

extern "C" __global__ void hash_f64(const double* values, const u8* validity,
                                    u64 validity_offset, u64 row_count,
                                    u32 combine_with_previous, u64* hashes) {
    hash_primitive(values, validity, validity_offset, row_count, combine_with_previous, hashes,
                   WidenF64());
}

extern "C" __global__ void hash_f32(const float* values, const u8* validity,
                                    u64 validity_offset, u64 row_count,
                                    u32 combine_with_previous, u64* hashes) {
    hash_primitive(values, validity, validity_offset, row_count, combine_with_previous, hashes,
                   WidenF32());
}

extern "C" __global__ void hash_utf8(const i32* offsets, const u8* data, const u8* validity,
                                     u64 validity_offset, u64 row_count,
                                     u32 combine_with_previous, u64* hashes) {
    hash_strings(offsets, data, validity, validity_offset, row_count, combine_with_previous,
                 hashes);
}

extern "C" __global__ void hash_large_utf8(const i64* offsets, const u8* data,
                                           const u8* validity, u64 validity_offset,
                                           u64 row_count, u32 combine_with_previous,
                                           u64* hashes) {
    hash_strings(offsets, data, validity, validity_offset, row_count, combine_with_previous,
                 hashes);
}
