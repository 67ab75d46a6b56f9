// The stable key hash, bit-identical to src/kernels/cpu/hash.rs (the wire
// contract: a key's target subtask never depends on where it was hashed).
// Every constant and step below is a transcription of that file; change both
// together or neither. tests/kernels_nvrtc.rs compiles this header as host
// C++ and compares it with the Rust functions on pinned and random inputs.
#pragma once

#include "common.cuh"

namespace strata {

const u64 HASH_SEED = 0x9E3779B97F4A7C15ull;
const u64 NULL_HASH = 0x2545F4914F6CDD1Dull;
const u64 HASH_P1 = 0x87C37B91114253D5ull;
const u64 HASH_P2 = 0x4CF5AD432745937Full;
// The bits of Rust's `f64::NAN`, the canonical NaN that every NaN hashes as.
const u64 CANONICAL_NAN_BITS = 0x7FF8000000000000ull;

STRATA_DEVICE u64 rotate_left(u64 x, u32 r) { return (x << r) | (x >> (64 - r)); }

// MurmurHash3's 64-bit finaliser.
STRATA_DEVICE u64 fmix64(u64 k) {
    k ^= k >> 33;
    k *= 0xFF51AFD7ED558CCDull;
    k ^= k >> 33;
    k *= 0xC4CEB9FE1A85EC53ull;
    k ^= k >> 33;
    return k;
}

STRATA_DEVICE u64 hash_u64(u64 v) { return fmix64(v ^ HASH_SEED); }

STRATA_DEVICE u64 f64_bits(double v) {
#if defined(__CUDACC__)
    return (u64)__double_as_longlong(v);
#else
    u64 bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    return bits;
#endif
}

// -0.0 hashes as 0.0 and every NaN as the canonical NaN.
STRATA_DEVICE u64 hash_f64(double v) {
    u64 bits;
    if (v == 0.0) {
        bits = 0;
    } else if (v != v) {
        bits = CANONICAL_NAN_BITS;
    } else {
        bits = f64_bits(v);
    }
    return hash_u64(bits);
}

STRATA_DEVICE u64 mix_word(u64 h, u64 word) {
    return rotate_left(h ^ fmix64(word), 27) * HASH_P1 + HASH_P2;
}

// Little-endian 8-byte words, the tail zero-padded. Bytes are read one at a
// time: Arrow's utf8 values start at any byte offset.
STRATA_DEVICE u64 hash_bytes(const u8* bytes, u64 length) {
    u64 h = HASH_SEED ^ (length * HASH_P1);
    for (u64 start = 0; start < length; start += 8) {
        u64 word = 0;
        const u64 end = length - start < 8 ? length - start : 8;
        for (u64 i = 0; i < end; ++i) {
            word |= (u64)bytes[start + i] << (8 * i);
        }
        h = mix_word(h, word);
    }
    return fmix64(h);
}

// Folds the hash of the next key column into the running row hash.
STRATA_DEVICE u64 combine(u64 acc, u64 next) {
    return fmix64(rotate_left(acc, 5) ^ (next * HASH_P2));
}

STRATA_DEVICE u32 key_group(u64 hash, u32 max_parallelism) {
    return (u32)(hash % (u64)max_parallelism);
}

// Flink's computeOperatorIndexForKeyGroup.
STRATA_DEVICE u32 subtask_for_key_group(u32 key_group, u32 max_parallelism, u32 parallelism) {
    return (u32)(((u64)key_group * parallelism) / max_parallelism);
}

STRATA_DEVICE u32 subtask_for_hash(u64 hash, u32 max_parallelism, u32 parallelism) {
    return subtask_for_key_group(key_group(hash, max_parallelism), max_parallelism, parallelism);
}

}  // namespace strata
