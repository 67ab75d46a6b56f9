// Keyed hash aggregation: GROUP BY an i64 key with count, sum, min and max
// over an i64 value column, in a device hash table.
//
// Semantics (the CPU twin, src/kernels/cpu/aggregate.rs, has the same):
// - A null key is a group of its own. A null value leaves sum/min/max alone
//   and is not counted: count is the number of non-null values, so a group
//   whose values are all null has count 0 (its sum, min and max are null).
// - The sum is exact: it is accumulated in 128 bits, and a group's sum
//   overflows when the exact total does not fit in i64. That makes overflow
//   independent of the order in which threads add (an intermediate wrap that
//   a later value undoes is not an overflow); `aggregate_compact` reports it
//   per group, and the dispatcher names the smallest overflowing key (the
//   null key first) in its error, as the CPU twin does.
//
// The table: `capacity` (a power of two) open-addressing slots plus two
// special slots. Slot keys start as EMPTY_KEY (i64::MIN) and are claimed with
// atomicCAS; linear probing. The key i64::MIN itself lives in slot
// `capacity`, the null key in slot `capacity + 1`; `special_used[0..2]` says
// whether those two were used. Every table array has capacity + 2 entries.
// If a row finds no free slot after probing the whole table, `table_full` is
// set to 1 and the row is dropped: the dispatcher must retry the batch with a
// bigger table (size it at twice the expected group count).
//
// Launches: aggregate_init, then aggregate_update per batch, then
// aggregate_compact into dense per-group arrays (capacity + 2 entries each;
// zero `group_count` first).
#include "hash.cuh"

using namespace strata;

namespace {

const i64 EMPTY_KEY = I64_MIN;
const u64 NO_SLOT = U64_MAX;

STRATA_DEVICE bool is_power_of_two(u64 capacity) {
    return capacity != 0 && (capacity & (capacity - 1)) == 0;
}

// The slot that holds `key`, claiming an empty one if the key is new.
STRATA_DEVICE u64 find_or_claim(i64* table_keys, u64 capacity, i64 key) {
    const u64 mask = capacity - 1;
    u64 slot = hash_u64((u64)key) & mask;
    for (u64 probe = 0; probe < capacity; ++probe) {
        // A stale read can only see EMPTY_KEY for a claimed slot (keys are
        // written once), and the CAS below then returns the real key.
        const i64 seen = table_keys[slot];
        if (seen == key) {
            return slot;
        }
        if (seen == EMPTY_KEY) {
            const i64 previous = (i64)atomicCAS((u64*)&table_keys[slot], (u64)EMPTY_KEY, (u64)key);
            if (previous == EMPTY_KEY || previous == key) {
                return slot;
            }
        }
        slot = (slot + 1) & mask;
    }
    return NO_SLOT;
}

// Adds v to the 128-bit sum (sum_high:sum_low) with two independent atomics.
// The low word's carries are counted from the value each atomic saw, so the
// final pair is the exact sum whatever the interleaving.
STRATA_DEVICE void add_to_sum(u64* sum_low, u64* sum_high, i64 v) {
    const u64 low = (u64)v;
    const u64 previous = atomicAdd(sum_low, low);
    const u64 carry = previous + low < previous ? 1 : 0;
    const u64 high = (v < 0 ? U64_MAX : 0) + carry;
    if (high != 0) {
        atomicAdd(sum_high, high);
    }
}

}  // namespace

extern "C" __global__ void aggregate_init(i64* table_keys, u64* counts, u64* sum_low,
                                          u64* sum_high, i64* mins, i64* maxs,
                                          u32* special_used, u64 capacity) {
    if (!is_power_of_two(capacity)) {
        return;
    }
    const u64 slot_count = capacity + 2;
    for (u64 slot = global_thread_index(); slot < slot_count; slot += global_thread_count()) {
        table_keys[slot] = EMPTY_KEY;
        counts[slot] = 0;
        sum_low[slot] = 0;
        sum_high[slot] = 0;
        mins[slot] = I64_MAX;
        maxs[slot] = I64_MIN;
    }
    if (global_thread_index() < 2) {
        special_used[global_thread_index()] = 0;
    }
}

extern "C" __global__ void aggregate_update(const i64* keys, const u8* key_validity,
                                            u64 key_validity_offset, const i64* values,
                                            const u8* value_validity,
                                            u64 value_validity_offset, u64 row_count,
                                            i64* table_keys, u64* counts, u64* sum_low,
                                            u64* sum_high, i64* mins, i64* maxs,
                                            u32* special_used, u64 capacity,
                                            u32* table_full) {
    if (!is_power_of_two(capacity)) {
        return;
    }
    for (u64 row = global_thread_index(); row < row_count; row += global_thread_count()) {
        u64 slot;
        if (!is_valid(key_validity, key_validity_offset, row)) {
            slot = capacity + 1;
        } else if (keys[row] == EMPTY_KEY) {
            slot = capacity;
        } else {
            slot = find_or_claim(table_keys, capacity, keys[row]);
            if (slot == NO_SLOT) {
                atomicExch(table_full, 1u);
                continue;
            }
        }
        if (slot >= capacity && special_used[slot - capacity] == 0) {
            special_used[slot - capacity] = 1;  // every writer stores 1: a benign race
        }
        if (!is_valid(value_validity, value_validity_offset, row)) {
            continue;
        }
        const i64 v = values[row];
        atomicAdd(&counts[slot], 1ull);
        add_to_sum(&sum_low[slot], &sum_high[slot], v);
        atomicMin(&mins[slot], v);
        atomicMax(&maxs[slot], v);
    }
}

// Dense output, one entry per group in unspecified order: key (key_valid = 0
// for the null key), count, sum (the low 64 bits; sum_overflowed = 1 when the
// exact sum does not fit in i64), min and max. Sum, min and max are
// meaningless when count is 0.
extern "C" __global__ void aggregate_compact(const i64* table_keys, const u64* counts,
                                             const u64* sum_low, const u64* sum_high,
                                             const i64* mins, const i64* maxs,
                                             const u32* special_used, u64 capacity,
                                             i64* group_keys, u8* group_key_valid,
                                             u64* group_counts, i64* group_sums,
                                             u8* group_sum_overflowed, i64* group_mins,
                                             i64* group_maxs, u64* group_count) {
    if (!is_power_of_two(capacity)) {
        return;
    }
    const u64 slot_count = capacity + 2;
    for (u64 slot = global_thread_index(); slot < slot_count; slot += global_thread_count()) {
        const bool used = slot < capacity ? table_keys[slot] != EMPTY_KEY
                                          : special_used[slot - capacity] != 0;
        if (!used) {
            continue;
        }
        const u64 group = atomicAdd(group_count, 1ull);
        group_keys[group] = slot == capacity ? EMPTY_KEY : slot == capacity + 1 ? 0 : table_keys[slot];
        group_key_valid[group] = slot == capacity + 1 ? 0 : 1;
        group_counts[group] = counts[slot];
        const i64 low = (i64)sum_low[slot];
        group_sums[group] = low;
        group_sum_overflowed[group] = (i64)sum_high[slot] != (low >> 63) ? 1 : 0;
        group_mins[group] = mins[slot];
        group_maxs[group] = maxs[slot];
    }
}
