//! CUDA source for a fused chain: one module, three kernels, generated from
//! the [`ChainProgram`] and compiled by NVRTC once per distinct program (the
//! kernel cache is keyed by the source text).
//!
//! - `chain_count`: one thread per row evaluates the program, records the
//!   first fault (instruction, then row, by `atomicMin` on one 64-bit word),
//!   adds the rows alive after each filter to its counter (so every
//!   operator of the chain reports its own rows) and writes the block's
//!   surviving-row count.
//! - `chain_scan`: one block turns the counts into exclusive offsets and the
//!   total (the host reads 8 bytes: how much to download).
//! - `chain_write`: evaluates again (reading the inputs twice from device
//!   memory is far cheaper than a second pass over PCIe) and writes each
//!   survivor at its block offset plus its rank in the block, so the output
//!   keeps the input order. Validity and Boolean values are bit-packed with
//!   `atomicOr` into zeroed words.
//!
//! A chain without a filter skips the first two: every row survives.
//! Nothing traps: an out-of-range row is masked, and a fault is reported
//! through the fault word and turned into the evaluator's error on the host.
//! Compile with `--fmad=false` ([`COMPILE_OPTIONS`]): a fused multiply-add
//! rounds once where the CPU rounds twice.

use std::fmt::Write as _;

use super::{Arith, ChainProgram, Cmp, Const, Instr, OutputSource, ValueType};

/// Threads per block of `chain_count` and `chain_write`.
pub const BLOCK_THREADS: u32 = 256;
/// Threads of the single `chain_scan` block.
pub const SCAN_THREADS: u32 = 1024;
/// NVRTC options for chain modules: IEEE results equal to the CPU's.
pub const COMPILE_OPTIONS: &[&str] = &["--fmad=false", "--std=c++17"];
/// The fault word before any fault.
pub const NO_FAULT: u64 = u64::MAX;

/// Splits a fault word into (instruction, row, division by zero).
pub fn decode_fault(word: u64) -> Option<(usize, u64, bool)> {
    (word != NO_FAULT).then_some((
        (word >> 41) as usize,
        (word >> 1) & ((1 << 40) - 1),
        word & 1 == 1,
    ))
}

fn c_type(ty: ValueType) -> &'static str {
    match ty {
        ValueType::I64 => "long long",
        ValueType::F64 => "double",
        ValueType::Bool => "bool",
    }
}

/// The kernel parameters for the device inputs: values and validity words
/// (a null validity pointer: every row valid).
fn input_params(program: &ChainProgram) -> String {
    program
        .device_inputs()
        .iter()
        .map(|c| {
            let ty = match program.input_schema.field(*c as usize).data_type() {
                arrow_schema::DataType::Int64 => "long long",
                _ => "double",
            };
            format!("const {ty}* __restrict__ c{c}, const unsigned int* __restrict__ m{c}, ")
        })
        .collect()
}

fn literal(value: Const, ty: ValueType) -> String {
    match value {
        Const::I64(v) if v == i64::MIN => "(-9223372036854775807LL - 1)".into(),
        Const::I64(v) => format!("{v}LL"),
        Const::F64(v) => format!("__longlong_as_double({}LL)", v.to_bits() as i64),
        Const::Bool(v) => v.to_string(),
        Const::Null => match ty {
            ValueType::I64 => "0LL".into(),
            ValueType::F64 => "0.0".into(),
            ValueType::Bool => "false".into(),
        },
    }
}

/// The per-row body: defines `alive`, `v<i>` and `n<i>` for every register.
fn body(program: &ChainProgram, count_keeps: bool) -> String {
    let mut keep = 0;
    let mut s = String::from(
        "  const bool in_range = row < n;\n  const unsigned long long r = in_range ? row : 0;\n  bool alive = in_range;\n",
    );
    let fault = |s: &mut String, i: usize, cond: &str, kind: u32| {
        let _ = writeln!(
            s,
            "  if (alive && n{i} && ({cond})) atomicMin(fault, ((unsigned long long){i} << 41) | (r << 1) | {kind}ull);"
        );
    };
    for (i, instr) in program.instrs.iter().enumerate() {
        let ty = program.types[i];
        let t = c_type(ty);
        match *instr {
            Instr::Load { column: c } => {
                let _ = writeln!(
                    s,
                    "  const {t} v{i} = c{c}[r]; const bool n{i} = m{c} == 0 || ((m{c}[r >> 5] >> (r & 31)) & 1u);"
                );
            }
            Instr::Const { value } => {
                let valid = !matches!(value, Const::Null);
                let _ = writeln!(
                    s,
                    "  const {t} v{i} = {}; const bool n{i} = {valid};",
                    literal(value, ty)
                );
            }
            Instr::ToF64 { a } => {
                let _ = writeln!(
                    s,
                    "  const double v{i} = (double)v{a}; const bool n{i} = n{a};"
                );
            }
            Instr::Arith { op, a, b } => {
                let _ = writeln!(s, "  const bool n{i} = n{a} && n{b}; {t} v{i} = 0;");
                if ty == ValueType::F64 {
                    let e = match op {
                        Arith::Add => format!("v{a} + v{b}"),
                        Arith::Sub => format!("v{a} - v{b}"),
                        Arith::Mul => format!("v{a} * v{b}"),
                        Arith::Div => format!("v{a} / v{b}"),
                        Arith::Rem => format!("fmod(v{a}, v{b})"),
                    };
                    let _ = writeln!(s, "  v{i} = {e};");
                    continue;
                }
                match op {
                    Arith::Add | Arith::Sub => {
                        let sym = if op == Arith::Add { '+' } else { '-' };
                        let _ = writeln!(
                            s,
                            "  v{i} = (long long)((unsigned long long)v{a} {sym} (unsigned long long)v{b});"
                        );
                        let overflow = if op == Arith::Add {
                            format!("((v{a} ^ v{i}) & (v{b} ^ v{i})) < 0")
                        } else {
                            format!("((v{a} ^ v{b}) & (v{a} ^ v{i})) < 0")
                        };
                        fault(&mut s, i, &overflow, 0);
                    }
                    Arith::Mul => {
                        let _ = writeln!(
                            s,
                            "  v{i} = (long long)((unsigned long long)v{a} * (unsigned long long)v{b});"
                        );
                        fault(
                            &mut s,
                            i,
                            &format!("__mul64hi(v{a}, v{b}) != (v{i} >> 63)"),
                            0,
                        );
                    }
                    Arith::Div | Arith::Rem => {
                        fault(&mut s, i, &format!("v{b} == 0"), 1);
                        if op == Arith::Div {
                            fault(
                                &mut s,
                                i,
                                &format!("v{a} == (-9223372036854775807LL - 1) && v{b} == -1"),
                                0,
                            );
                            let _ = writeln!(
                                s,
                                "  if (n{i} && v{b} != 0 && !(v{b} == -1 && v{a} == (-9223372036854775807LL - 1))) v{i} = v{a} / v{b};"
                            );
                        } else {
                            let _ = writeln!(
                                s,
                                "  if (n{i} && v{b} != 0 && v{b} != -1) v{i} = v{a} % v{b};"
                            );
                        }
                    }
                }
            }
            Instr::Neg { a } => {
                let _ = writeln!(s, "  const bool n{i} = n{a};");
                if ty == ValueType::F64 {
                    let _ = writeln!(s, "  const double v{i} = -v{a};");
                } else {
                    let _ = writeln!(
                        s,
                        "  const long long v{i} = (long long)(0ull - (unsigned long long)v{a});"
                    );
                    fault(
                        &mut s,
                        i,
                        &format!("v{a} == (-9223372036854775807LL - 1)"),
                        0,
                    );
                }
            }
            Instr::Cmp { op, a, b } => {
                let sym = match op {
                    Cmp::Eq => "==",
                    Cmp::Ne => "!=",
                    Cmp::Lt => "<",
                    Cmp::Le => "<=",
                    Cmp::Gt => ">",
                    Cmp::Ge => ">=",
                };
                let (l, r) = if program.types[a as usize] == ValueType::F64 {
                    (format!("total_key(v{a})"), format!("total_key(v{b})"))
                } else {
                    (format!("v{a}"), format!("v{b}"))
                };
                let _ = writeln!(
                    s,
                    "  const bool n{i} = n{a} && n{b}; const bool v{i} = {l} {sym} {r};"
                );
            }
            Instr::And { a, b } => {
                let _ = writeln!(
                    s,
                    "  const bool f{i} = (n{a} && !v{a}) || (n{b} && !v{b}); const bool v{i} = !f{i} && n{a} && n{b}; const bool n{i} = f{i} || (n{a} && n{b});"
                );
            }
            Instr::Or { a, b } => {
                let _ = writeln!(
                    s,
                    "  const bool v{i} = (n{a} && v{a}) || (n{b} && v{b}); const bool n{i} = v{i} || (n{a} && n{b});"
                );
            }
            Instr::Not { a } => {
                let _ = writeln!(s, "  const bool v{i} = !v{a}; const bool n{i} = n{a};");
            }
            Instr::Keep { a } => {
                let _ = writeln!(s, "  alive = alive && n{a} && v{a};");
                if count_keeps {
                    let _ = writeln!(
                        s,
                        "  {{ const int kept = __syncthreads_count(alive); if (threadIdx.x == 0 && kept) atomicAdd(&keep_counts[{keep}], (unsigned long long)kept); }}"
                    );
                    keep += 1;
                }
            }
        }
    }
    s
}

/// The per-row statements that compute `target`, the survivor's subtask
/// (`kernels/hash.cuh`, bit for bit the CPU's `hash_columns` and
/// `subtask_for_hash`), or nothing when the program does not route.
fn route_code(program: &ChainProgram) -> String {
    let Some(route) = &program.route else {
        return String::new();
    };
    let mut s = String::from("    unsigned long long key_hash = 0;\n");
    for (k, &column) in route.key_columns.iter().enumerate() {
        let OutputSource::Device(reg) = program.outputs[column] else {
            continue;
        };
        let hash = match program.types[reg as usize] {
            ValueType::F64 => format!("strata::hash_f64(v{reg})"),
            _ => format!("strata::hash_u64((unsigned long long)v{reg})"),
        };
        let fold = if k == 0 {
            "key_hash = h;".to_owned()
        } else {
            "key_hash = strata::combine(key_hash, h);".to_owned()
        };
        let _ = writeln!(
            s,
            "    {{ const unsigned long long h = n{reg} ? {hash} : strata::NULL_HASH; {fold} }}"
        );
    }
    let _ = writeln!(
        s,
        "    const unsigned int target = strata::subtask_for_hash(key_hash, {}u, {}u);",
        route.max_parallelism, route.parallelism
    );
    s
}

/// The module's source text.
pub fn cuda_source(program: &ChainProgram) -> String {
    let inputs = input_params(program);
    let count_body = body(program, true);
    let body = body(program, false);
    let mut outputs = String::new();
    let mut stores = String::new();
    for (j, output) in program.outputs.iter().enumerate() {
        let OutputSource::Device(reg) = *output else {
            continue;
        };
        match program.types[reg as usize] {
            ValueType::Bool => {
                let _ = write!(
                    outputs,
                    "unsigned int* __restrict__ o{j}, unsigned int* __restrict__ ov{j}, "
                );
                let _ = writeln!(
                    stores,
                    "    if (v{reg}) atomicOr(&o{j}[at >> 5], 1u << (at & 31));"
                );
            }
            ty => {
                let _ = write!(
                    outputs,
                    "{}* __restrict__ o{j}, unsigned int* __restrict__ ov{j}, ",
                    c_type(ty)
                );
                let _ = writeln!(stores, "    o{j}[at] = v{reg};");
            }
        }
        let _ = writeln!(
            stores,
            "    if (n{reg}) atomicOr(&ov{j}[at >> 5], 1u << (at & 31));"
        );
    }
    if program.needs_row_ids() {
        outputs.push_str("unsigned int* __restrict__ row_ids, ");
        stores.push_str("    row_ids[at] = (unsigned int)r;\n");
    }
    let include = if program.route.is_some() {
        outputs.push_str("unsigned int* __restrict__ targets, ");
        stores.push_str(&route_code(program));
        stores.push_str("    targets[at] = target;\n");
        "#include \"hash.cuh\"\n"
    } else {
        ""
    };
    format!(
        r#"// Generated by strata from a fused operator chain; do not edit.
{include}__device__ __forceinline__ long long total_key(double v) {{
  long long bits = isnan(v) ? 0x7ff8000000000000LL : __double_as_longlong(v);
  return bits ^ (long long)(((unsigned long long)(bits >> 63)) >> 1);
}}

extern "C" __global__ void chain_count({inputs}unsigned long long n, unsigned int* __restrict__ block_counts, unsigned long long* __restrict__ fault, unsigned long long* __restrict__ keep_counts) {{
  const unsigned long long row = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
{count_body}  const int kept = __syncthreads_count(alive);
  if (threadIdx.x == 0) block_counts[blockIdx.x] = (unsigned int)kept;
}}

extern "C" __global__ void chain_scan(unsigned int* __restrict__ counts, unsigned long long blocks, unsigned long long* __restrict__ total) {{
  __shared__ unsigned int warp_sums[{scan_warps}];
  __shared__ unsigned long long carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (unsigned long long base = 0; base < blocks; base += blockDim.x) {{
    const unsigned long long i = base + threadIdx.x;
    const unsigned int count = i < blocks ? counts[i] : 0u;
    unsigned int inclusive = count;
    for (int d = 1; d < 32; d <<= 1) {{
      const unsigned int up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }}
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {{
      unsigned int w = lane < {scan_warps} ? warp_sums[lane] : 0u;
      for (int d = 1; d < 32; d <<= 1) {{
        const unsigned int up = __shfl_up_sync(0xffffffffu, w, d);
        if (lane >= d) w += up;
      }}
      if (lane < {scan_warps}) warp_sums[lane] = w;
    }}
    __syncthreads();
    const unsigned long long before = carry + (warp > 0 ? warp_sums[warp - 1] : 0u) + inclusive - count;
    if (i < blocks) counts[i] = (unsigned int)before;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = before + count;
    __syncthreads();
  }}
  if (threadIdx.x == 0) *total = carry;
}}

extern "C" __global__ void chain_write({inputs}unsigned long long n, const unsigned int* __restrict__ block_offsets, {outputs}unsigned long long* __restrict__ fault) {{
  __shared__ unsigned int warp_counts[{block_warps}];
  const unsigned long long row = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
{body}  const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned int ballot = __ballot_sync(0xffffffffu, alive);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  unsigned int before = 0;
  for (unsigned int w = 0; w < warp; ++w) before += warp_counts[w];
  const unsigned long long block_base = block_offsets == 0 ? (unsigned long long)blockIdx.x * blockDim.x : block_offsets[blockIdx.x];
  if (alive) {{
    const unsigned long long at = block_base + before + __popc(ballot & ((1u << lane) - 1u));
{stores}  }}
}}
"#,
        scan_warps = SCAN_THREADS / 32,
        block_warps = BLOCK_THREADS / 32,
    )
}

/// A host C++ program that runs the generated per-row code of `program`
/// (the exact text the kernels contain, with the few CUDA intrinsics it
/// uses defined for the host) over columns read from a file, printing per
/// row whether it survives and each device output's validity and bits,
/// then the fault word. The tests compile it with the system's C++
/// compiler and hold it to the host twin: a machine without a GPU still
/// checks what the device will compute, row by row.
pub fn host_harness(program: &ChainProgram) -> String {
    let inputs = program.device_inputs();
    let mut declare = String::new();
    for (k, c) in inputs.iter().enumerate() {
        let ty = match program.input_schema.field(*c as usize).data_type() {
            arrow_schema::DataType::Int64 => "long long",
            _ => "double",
        };
        let _ = writeln!(
            declare,
            "  std::vector<{ty}> c{c}_v(n); std::vector<unsigned int> m{c}_v((n + 31) / 32 + 1, 0u);\n  \
             if (std::fread(c{c}_v.data(), 8, n, in) != n) return 2;\n  \
             for (unsigned long long i = 0; i < n; ++i) {{ unsigned char b; if (std::fread(&b, 1, 1, in) != 1) return 2; if (b) m{c}_v[i >> 5] |= 1u << (i & 31); }}\n  \
             const {ty}* c{c} = c{c}_v.data(); const unsigned int* m{c} = m{c}_v.data(); (void){k};"
        );
    }
    let mut print = String::new();
    for output in &program.outputs {
        if let OutputSource::Device(reg) = output {
            let bits = match program.types[*reg as usize] {
                ValueType::F64 => format!("(unsigned long long)__double_as_longlong(v{reg})"),
                _ => format!("(unsigned long long)v{reg}"),
            };
            let _ = writeln!(
                print,
                "      std::printf(\" %d %llx\", (int)n{reg}, n{reg} ? {bits} : 0ull);"
            );
        }
    }
    let route = route_code(program);
    if program.route.is_some() {
        print.push_str("      std::printf(\" t%u\", target);\n");
    }
    let text = format!(
        r#"#include "hash.cuh"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
#define __device__
#define __forceinline__ inline
using std::isnan;
using std::fmod;
static inline long long __double_as_longlong(double v) {{ long long r; std::memcpy(&r, &v, 8); return r; }}
static inline double __longlong_as_double(long long v) {{ double r; std::memcpy(&r, &v, 8); return r; }}
static inline long long __mul64hi(long long a, long long b) {{ return (long long)(((__int128)a * (__int128)b) >> 64); }}
static inline void atomicMin(unsigned long long* p, unsigned long long v) {{ if (v < *p) *p = v; }}
__device__ __forceinline__ long long total_key(double v) {{
  long long bits = isnan(v) ? 0x7ff8000000000000LL : __double_as_longlong(v);
  return bits ^ (long long)(((unsigned long long)(bits >> 63)) >> 1);
}}
int main(int argc, char** argv) {{
  if (argc != 2) return 1;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 1;
  unsigned long long n = 0;
  if (std::fread(&n, 8, 1, in) != 1) return 2;
{declare}
  unsigned long long fault_word = ~0ull;
  unsigned long long* fault = &fault_word;
  for (unsigned long long row = 0; row < n; ++row) {{
{body}    std::printf("%d", (int)alive);
    if (alive) {{
{route}{print}    }}
    std::printf("\n");
  }}
  std::printf("fault %llx\n", fault_word);
  return 0;
}}
"#,
        body = body(program, false)
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>(),
    );
    crate::kernels::gpu::source::expand_generated("chain", &text)
        .expect("the harness includes only embedded headers")
}
