// Predicate filter: `column <op> literal` for i64 and f64 columns.
//
// Output: a selection bitmap (32-bit words, see common.cuh) with bit i set
// when row i is valid and satisfies the predicate; null rows are never
// selected. Comparisons are IEEE: a NaN on either side makes every operator
// false except !=, and -0.0 == 0.0. `selected_count`, when not null, gets the
// number of selected rows added to it (zero it before the launch).
// CPU twin: src/kernels/cpu/filter.rs.
#include "common.cuh"

using namespace strata;

namespace {

// Operator codes; the Rust twin's `CmpOp::code` returns the same numbers.
enum CmpOp : u32 { CMP_LT = 0, CMP_LE = 1, CMP_GT = 2, CMP_GE = 3, CMP_NE = 4, CMP_EQ = 5 };

template <typename T>
STRATA_DEVICE bool compare(T value, T literal, u32 op) {
    switch (op) {
        case CMP_LT: return value < literal;
        case CMP_LE: return value <= literal;
        case CMP_GT: return value > literal;
        case CMP_GE: return value >= literal;
        case CMP_NE: return value != literal;
        default: return value == literal;
    }
}

template <typename T>
__device__ void filter_column(const T* values, const u8* validity, u64 validity_offset,
                              u64 row_count, u32 op, T literal, u32* selection,
                              u64* selected_count) {
    if (!whole_warps() || op > CMP_EQ) {
        return;
    }
    const u32 lane = lane_index();
    const u64 word_count = bitmap_word_count(row_count);
    u64 warp_selected = 0;
    for (u64 word = global_warp_index(); word < word_count; word += global_warp_count()) {
        const u64 row = word * 32 + lane;
        const bool selected = row < row_count && is_valid(validity, validity_offset, row) &&
                              compare(values[row], literal, op);
        const u32 bits = __ballot_sync(FULL_WARP, selected);
        if (lane == 0) {
            selection[word] = bits;
            warp_selected += __popc(bits);
        }
    }
    // One atomic per warp, not per word.
    if (lane == 0 && selected_count != nullptr && warp_selected != 0) {
        atomicAdd(selected_count, warp_selected);
    }
}

}  // namespace

extern "C" __global__ void filter_i64(const i64* values, const u8* validity, u64 validity_offset,
                                      u64 row_count, u32 op, i64 literal, u32* selection,
                                      u64* selected_count) {
    filter_column(values, validity, validity_offset, row_count, op, literal, selection,
                  selected_count);
}

extern "C" __global__ void filter_f64(const double* values, const u8* validity,
                                      u64 validity_offset, u64 row_count, u32 op,
                                      double literal, u32* selection, u64* selected_count) {
    filter_column(values, validity, validity_offset, row_count, op, literal, selection,
                  selected_count);
}
