// Column arithmetic: `left <op> right` where each side is a column or a
// literal, for i64 (+ - *) and f64 (+ - * /).
//
// Nulls propagate: a row is valid in `out_validity` (a bitmap of 32-bit
// words, see common.cuh) when both operands are valid; null rows get the
// value 0. i64 arithmetic detects overflow: the overflowing row's value is
// unspecified and `first_overflow_row` (set it to U64_MAX before the launch)
// ends up holding the smallest overflowing row, which is the row the CPU twin
// names in its error. Null rows never overflow. f64 arithmetic is IEEE with
// round-to-nearest (x / 0.0 is ±inf, 0.0 / 0.0 is NaN).
// CPU twin: src/kernels/cpu/project.rs.
#include "common.cuh"

using namespace strata;

namespace {

// Operator codes; the Rust twin's `ArithOp::code` returns the same numbers.
enum ArithOp : u32 { ARITH_ADD = 0, ARITH_SUB = 1, ARITH_MUL = 2, ARITH_DIV = 3 };

template <typename T>
struct ColumnOperand {
    const T* values;
    const u8* validity;
    u64 validity_offset;

    STRATA_DEVICE bool valid(u64 row) const { return is_valid(validity, validity_offset, row); }
    STRATA_DEVICE T value(u64 row) const { return values[row]; }
};

template <typename T>
struct LiteralOperand {
    T literal;

    STRATA_DEVICE bool valid(u64) const { return true; }
    STRATA_DEVICE T value(u64) const { return literal; }
};

// Two's complement arithmetic with overflow detection; the wrapped result is
// returned either way.
STRATA_DEVICE i64 apply_i64(i64 left, i64 right, u32 op, bool* overflowed) {
    const u64 l = (u64)left;
    const u64 r = (u64)right;
    switch (op) {
        case ARITH_ADD: {
            const i64 sum = (i64)(l + r);
            *overflowed = ((left ^ sum) & (right ^ sum)) < 0;
            return sum;
        }
        case ARITH_SUB: {
            const i64 difference = (i64)(l - r);
            *overflowed = ((left ^ right) & (left ^ difference)) < 0;
            return difference;
        }
        default: {
            // The product fits when the high 64 bits are the sign extension
            // of the low 64 bits.
            const u64 low = l * r;
            const i64 high = __mul64hi(left, right);
            *overflowed = high != ((i64)low >> 63);
            return (i64)low;
        }
    }
}

STRATA_DEVICE double apply_f64(double left, double right, u32 op, bool* overflowed) {
    *overflowed = false;
    switch (op) {
        case ARITH_ADD: return __dadd_rn(left, right);
        case ARITH_SUB: return __dsub_rn(left, right);
        case ARITH_MUL: return __dmul_rn(left, right);
        default: return __ddiv_rn(left, right);
    }
}

STRATA_DEVICE i64 apply(i64 left, i64 right, u32 op, bool* overflowed) {
    return apply_i64(left, right, op, overflowed);
}

STRATA_DEVICE double apply(double left, double right, u32 op, bool* overflowed) {
    return apply_f64(left, right, op, overflowed);
}

template <typename T, typename Left, typename Right>
__device__ void project(Left left, Right right, u64 row_count, u32 op, u32 op_max, T* out,
                        u32* out_validity, u64* first_overflow_row) {
    if (!whole_warps() || op > op_max) {
        return;
    }
    const u32 lane = lane_index();
    const u64 word_count = bitmap_word_count(row_count);
    u64 overflow_row = U64_MAX;
    for (u64 word = global_warp_index(); word < word_count; word += global_warp_count()) {
        const u64 row = word * 32 + lane;
        const bool in_range = row < row_count;
        const bool valid = in_range && left.valid(row) && right.valid(row);
        if (valid) {
            bool overflowed = false;
            out[row] = apply(left.value(row), right.value(row), op, &overflowed);
            if (overflowed && row < overflow_row) {
                overflow_row = row;
            }
        } else if (in_range) {
            out[row] = T(0);
        }
        const u32 bits = __ballot_sync(FULL_WARP, valid);
        if (lane == 0) {
            out_validity[word] = bits;
        }
    }
    if (overflow_row != U64_MAX && first_overflow_row != nullptr) {
        atomicMin(first_overflow_row, overflow_row);
    }
}

}  // namespace

extern "C" __global__ void project_i64_columns(const i64* left, const u8* left_validity,
                                               u64 left_validity_offset, const i64* right,
                                               const u8* right_validity,
                                               u64 right_validity_offset, u64 row_count,
                                               u32 op, i64* out, u32* out_validity,
                                               u64* first_overflow_row) {
    project<i64>(ColumnOperand<i64>{left, left_validity, left_validity_offset},
                 ColumnOperand<i64>{right, right_validity, right_validity_offset}, row_count,
                 op, ARITH_MUL, out, out_validity, first_overflow_row);
}

// literal_on_left = 0: `column <op> literal`; otherwise `literal <op> column`.
extern "C" __global__ void project_i64_literal(const i64* column, const u8* validity,
                                               u64 validity_offset, i64 literal,
                                               u32 literal_on_left, u64 row_count, u32 op,
                                               i64* out, u32* out_validity,
                                               u64* first_overflow_row) {
    const ColumnOperand<i64> values{column, validity, validity_offset};
    const LiteralOperand<i64> constant{literal};
    if (literal_on_left != 0) {
        project<i64>(constant, values, row_count, op, ARITH_MUL, out, out_validity,
                     first_overflow_row);
    } else {
        project<i64>(values, constant, row_count, op, ARITH_MUL, out, out_validity,
                     first_overflow_row);
    }
}

extern "C" __global__ void project_f64_columns(const double* left, const u8* left_validity,
                                               u64 left_validity_offset, const double* right,
                                               const u8* right_validity,
                                               u64 right_validity_offset, u64 row_count,
                                               u32 op, double* out, u32* out_validity) {
    project<double>(ColumnOperand<double>{left, left_validity, left_validity_offset},
                    ColumnOperand<double>{right, right_validity, right_validity_offset},
                    row_count, op, ARITH_DIV, out, out_validity, nullptr);
}

// literal_on_left = 0: `column <op> literal`; otherwise `literal <op> column`.
extern "C" __global__ void project_f64_literal(const double* column, const u8* validity,
                                               u64 validity_offset, double literal,
                                               u32 literal_on_left, u64 row_count, u32 op,
                                               double* out, u32* out_validity) {
    const ColumnOperand<double> values{column, validity, validity_offset};
    const LiteralOperand<double> constant{literal};
    if (literal_on_left != 0) {
        project<double>(constant, values, row_count, op, ARITH_DIV, out, out_validity,
                        nullptr);
    } else {
        project<double>(values, constant, row_count, op, ARITH_DIV, out, out_validity,
                        nullptr);
    }
}
