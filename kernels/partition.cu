// Hash partitioning: route each row to a subtask by its key hash (from
// hash.cu) and group the row indices by subtask. Three launches:
//
// 1. partition_assign: partition id per row, `subtask_for_hash(hash,
//    max_parallelism, parallelism)` as in hash.cuh, and per-partition row
//    counts (zero `partition_counts` first).
// 2. partition_offsets: exclusive prefix sum of the counts into
//    `partition_offsets` (parallelism + 1 entries; the last is the row count)
//    and a copy into `cursors`. One block of up to 1024 threads, a multiple
//    of 32.
// 3. partition_scatter: row indices into `rows`, grouped by partition:
//    partition p owns rows[offsets[p] .. offsets[p + 1]]. The order inside a
//    partition is unspecified on the GPU (the CPU twin keeps row order), so
//    compare per-partition row sets.
//
// Row indices are u32: a batch holds fewer than 2^32 rows.
// CPU twin: src/kernels/cpu/partition.rs.
#include "hash.cuh"

using namespace strata;

namespace {

// Partition counts are kept per block in shared memory up to this
// parallelism (4 KiB) and flushed with one global atomic per partition.
const u32 SHARED_COUNTS_MAX = 1024;

STRATA_DEVICE bool valid_routing(u32 max_parallelism, u32 parallelism) {
    return parallelism != 0 && parallelism <= max_parallelism;
}

}  // namespace

extern "C" __global__ void partition_assign(const u64* hashes, u64 row_count,
                                            u32 max_parallelism, u32 parallelism,
                                            u32* partition_ids, u32* partition_counts) {
    if (!valid_routing(max_parallelism, parallelism)) {
        return;
    }
    __shared__ u32 block_counts[SHARED_COUNTS_MAX];
    // Uniform across the block, so the barriers below are safe.
    const bool shared_counts = parallelism <= SHARED_COUNTS_MAX;
    if (shared_counts) {
        for (u32 p = threadIdx.x; p < parallelism; p += blockDim.x) {
            block_counts[p] = 0;
        }
        __syncthreads();
    }
    for (u64 row = global_thread_index(); row < row_count; row += global_thread_count()) {
        const u32 partition = subtask_for_hash(hashes[row], max_parallelism, parallelism);
        partition_ids[row] = partition;
        if (shared_counts) {
            atomicAdd(&block_counts[partition], 1u);
        } else {
            atomicAdd(&partition_counts[partition], 1u);
        }
    }
    if (shared_counts) {
        __syncthreads();
        for (u32 p = threadIdx.x; p < parallelism; p += blockDim.x) {
            if (block_counts[p] != 0) {
                atomicAdd(&partition_counts[p], block_counts[p]);
            }
        }
    }
}

extern "C" __global__ void partition_offsets(const u32* partition_counts, u32 parallelism,
                                             u32* partition_offsets, u32* cursors) {
    if (!whole_warps() || gridDim.x != 1) {
        return;
    }
    __shared__ u32 warp_totals[32];
    __shared__ u32 carry;
    const u32 lane = lane_index();
    const u32 warp = threadIdx.x >> 5;
    const u32 warps_per_block = blockDim.x >> 5;
    if (threadIdx.x == 0) {
        carry = 0;
    }
    __syncthreads();
    for (u32 base = 0; base < parallelism; base += blockDim.x) {
        const u32 p = base + threadIdx.x;
        const u32 count = p < parallelism ? partition_counts[p] : 0;
        // Inclusive scan inside the warp, then across the warps' totals.
        u32 inclusive = count;
        for (u32 delta = 1; delta < 32; delta <<= 1) {
            const u32 before = __shfl_up_sync(FULL_WARP, inclusive, delta);
            if (lane >= delta) {
                inclusive += before;
            }
        }
        if (lane == 31) {
            warp_totals[warp] = inclusive;
        }
        __syncthreads();
        if (warp == 0) {
            u32 total = lane < warps_per_block ? warp_totals[lane] : 0;
            for (u32 delta = 1; delta < 32; delta <<= 1) {
                const u32 before = __shfl_up_sync(FULL_WARP, total, delta);
                if (lane >= delta) {
                    total += before;
                }
            }
            warp_totals[lane] = total;
        }
        __syncthreads();
        inclusive += carry + (warp > 0 ? warp_totals[warp - 1] : 0);
        if (p < parallelism) {
            partition_offsets[p] = inclusive - count;
            cursors[p] = inclusive - count;
        }
        // Everyone has read `carry` and `warp_totals` before they change.
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) {
            carry = inclusive;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partition_offsets[parallelism] = carry;
    }
}

extern "C" __global__ void partition_scatter(const u32* partition_ids, u64 row_count,
                                             u32* cursors, u32* rows) {
    if (!whole_warps()) {
        return;
    }
    const u32 lane = lane_index();
    const u32 lanes_below = (1u << lane) - 1;
    const u32 NO_PARTITION = 0xFFFFFFFFu;
    const u64 word_count = bitmap_word_count(row_count);
    // Warp-aggregated: lanes that share a partition take their slots with one
    // atomic by the lowest such lane.
    for (u64 word = global_warp_index(); word < word_count; word += global_warp_count()) {
        const u64 row = word * 32 + lane;
        const u32 partition = row < row_count ? partition_ids[row] : NO_PARTITION;
        const u32 peers = __match_any_sync(FULL_WARP, partition);
        const u32 leader = __ffs(peers) - 1;
        u32 first_slot = 0;
        if (lane == leader && partition != NO_PARTITION) {
            first_slot = atomicAdd(&cursors[partition], (u32)__popc(peers));
        }
        first_slot = __shfl_sync(FULL_WARP, first_slot, leader);
        if (partition != NO_PARTITION) {
            rows[first_slot + __popc(peers & lanes_below)] = (u32)row;
        }
    }
}
