//! The GPU kernels in `kernels/*.cu` compile, on a machine without a GPU.
//!
//! CI has neither a GPU nor a CUDA toolkit, but NVIDIA ships NVRTC (CUDA C++
//! → PTX) and ptxas (PTX → cubin) as PyPI wheels that work without either
//! (`scripts/install_cuda_tools.sh`). This test drives them as external
//! programs so the crate gains no dependency: a small Python helper loads
//! `libnvrtc.so.12` through ctypes and compiles every kernel for compute_80
//! and compute_90, and `ptxas` assembles the PTX into sm_80 and sm_90
//! cubins. Every `extern "C" __global__` function in a source must come out
//! as a PTX entry of the same name (a missing `extern "C"` would mangle it
//! and the dispatcher could not find it). Without the wheels the test says
//! so and passes; with them, any compile error fails it with NVRTC's log.
//!
//! A second test compiles `kernels/hash.cuh` as host C++ and checks it
//! against the Rust hash bit for bit: the stable hash is a wire contract
//! between tiers, and this machine cannot run the device code itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use strata::kernels::cpu::hash::{
    NULL_HASH, combine, fmix64, hash_bytes, hash_f64, hash_u64, subtask_for_hash,
};

/// Virtual architectures compiled by NVRTC, and the real one ptxas targets
/// for each.
const TARGETS: [(&str, &str); 2] = [("compute_80", "sm_80"), ("compute_90", "sm_90")];

/// NVRTC flags besides the architecture and include path. No fast-math and
/// no flush-to-zero: the kernels promise IEEE results equal to the CPU twins.
const NVRTC_FLAGS: [&str; 1] = ["-std=c++17"];

/// Run as `python3 -c NVRTC_HELPER OUT_DIR ARCHS SOURCE... -- FLAG...` (ARCHS
/// comma-separated). Prints `missing` when the wheels are not installed;
/// otherwise `nvrtc <version>`, `ptxas <path>`, then one line per source and
/// architecture, `built <stem> <arch> <ms>` or `failed <stem> <arch>`,
/// having written `<stem>.<arch>.ptx` and NVRTC's log `<stem>.<arch>.log`
/// into OUT_DIR. One process loads NVRTC once for all builds.
const NVRTC_HELPER: &str = r#"
import ctypes, glob, os, sys, time

def locate():
    try:
        import nvidia.cuda_nvrtc, nvidia.cuda_nvcc
    except ImportError:
        return None
    # The wheels install namespace packages: no __file__, only __path__.
    nvrtc_dir = os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib")
    libs = sorted(glob.glob(os.path.join(nvrtc_dir, "libnvrtc.so.*")))
    ptxas = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
    if not libs or not os.access(ptxas, os.X_OK):
        return None
    # libnvrtc dlopens its builtins by soname; loading them first makes
    # LD_LIBRARY_PATH unnecessary.
    for builtins in sorted(glob.glob(os.path.join(nvrtc_dir, "libnvrtc-builtins.so.*"))):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(libs[0]), ptxas

def check(nvrtc, status, call):
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise SystemExit(f"{call}: {nvrtc.nvrtcGetErrorString(status).decode()}")

def compile_source(nvrtc, source, arch, out_stem, flags):
    program = ctypes.c_void_p()
    with open(source, "rb") as f:
        text = f.read()
    name = os.path.basename(source).encode()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), text, name, 0, None, None),
          "nvrtcCreateProgram")
    options = [f"--gpu-architecture={arch}".encode()] + [f.encode() for f in flags]
    status = nvrtc.nvrtcCompileProgram(
        program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    check(nvrtc, nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "nvrtcGetProgramLogSize")
    log = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
    with open(out_stem + ".log", "wb") as f:
        f.write(log.value)
    if status == 0:
        check(nvrtc, nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        check(nvrtc, nvrtc.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
        with open(out_stem + ".ptx", "wb") as f:
            f.write(ptx.value)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return status == 0

def main():
    found = locate()
    if found is None:
        print("missing")
        return 0
    nvrtc, ptxas = found
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(nvrtc, nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    print(f"nvrtc {major.value}.{minor.value}")
    print(f"ptxas {ptxas}")
    out_dir, archs = sys.argv[1], sys.argv[2].split(",")
    split = sys.argv.index("--")
    sources, flags = sys.argv[3:split], sys.argv[split + 1:]
    for source in sources:
        stem = os.path.splitext(os.path.basename(source))[0]
        for arch in archs:
            started = time.perf_counter()
            ok = compile_source(nvrtc, source, arch, os.path.join(out_dir, f"{stem}.{arch}"), flags)
            ms = (time.perf_counter() - started) * 1000
            print(f"built {stem} {arch} {ms:.0f}" if ok else f"failed {stem} {arch}", flush=True)
    return 0

sys.exit(main())
"#;

/// What NVRTC made of one source for one architecture.
struct NvrtcBuild {
    stem: String,
    arch: String,
    /// Compile time in milliseconds, or `None` when NVRTC failed.
    nvrtc_ms: Option<u64>,
}

/// The helper's report: `None` when the wheels are not installed.
struct NvrtcRun {
    nvrtc_version: String,
    ptxas: PathBuf,
    builds: Vec<NvrtcBuild>,
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// Every `kernels/*.cu`, sorted.
fn kernel_sources() -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .expect("kernels/ exists")
        .map(|entry| entry.expect("readable kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    sources
}

/// The names of the `__global__` functions in a source. Each must be an
/// unmangled PTX entry, so one declared without `extern "C"` is caught.
fn kernel_entry_names(source: &str) -> Vec<String> {
    source
        .split("__global__ void ")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("create the test's scratch directory");
    dir
}

/// Compiles every source for every target in one helper process; `None`
/// when Python or the wheels are missing.
fn run_nvrtc(sources: &[PathBuf], out_dir: &Path, flags: &[&str]) -> Option<NvrtcRun> {
    let archs: Vec<&str> = TARGETS.iter().map(|(arch, _)| *arch).collect();
    let output = Command::new(python())
        .args(["-c", NVRTC_HELPER])
        .arg(out_dir)
        .arg(archs.join(","))
        .args(sources)
        .arg("--")
        .arg(format!("--include-path={}", kernels_dir().display()))
        .args(flags)
        .output()
        .ok()?;
    assert!(
        output.status.success(),
        "the NVRTC helper failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("the helper prints UTF-8");
    let mut lines = stdout.lines();
    let first = lines.next().expect("the helper prints a first line");
    let nvrtc_version = first.strip_prefix("nvrtc ")?.to_owned();
    let ptxas = lines
        .next()
        .and_then(|line| line.strip_prefix("ptxas "))
        .expect("the helper prints the ptxas path");
    let builds = lines.map(parse_build_line).collect();
    Some(NvrtcRun {
        nvrtc_version,
        ptxas: PathBuf::from(ptxas),
        builds,
    })
}

fn parse_build_line(line: &str) -> NvrtcBuild {
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["built", stem, arch, ms] => NvrtcBuild {
            stem: stem.to_string(),
            arch: arch.to_string(),
            nvrtc_ms: Some(ms.parse().expect("milliseconds")),
        },
        ["failed", stem, arch] => NvrtcBuild {
            stem: stem.to_string(),
            arch: arch.to_string(),
            nvrtc_ms: None,
        },
        _ => panic!("unexpected helper line {line:?}"),
    }
}

/// Checks one NVRTC build: the log on failure, else the entries and ptxas.
/// `Ok` carries a one-line summary with the timings.
fn check_build(
    build: &NvrtcBuild,
    ptxas: &Path,
    out_dir: &Path,
    source_dir: &Path,
) -> Result<String, String> {
    let output_path =
        |extension: &str| out_dir.join(format!("{}.{}.{extension}", build.stem, build.arch));
    let Some(nvrtc_ms) = build.nvrtc_ms else {
        let log = std::fs::read_to_string(output_path("log")).unwrap_or_default();
        return Err(format!("NVRTC failed:\n{log}"));
    };
    let source = source_dir.join(format!("{}.cu", build.stem));
    let ptx_path = output_path("ptx");
    let entry_count = check_entries(&source, &ptx_path)?;
    let sm = TARGETS
        .iter()
        .find(|(arch, _)| *arch == build.arch)
        .map(|(_, sm)| *sm)
        .expect("a known target");
    let ptxas_ms = assemble(ptxas, &ptx_path, sm, &output_path("cubin"))?;
    Ok(format!(
        "{entry_count} entries, NVRTC {nvrtc_ms} ms, ptxas -arch={sm} {ptxas_ms} ms"
    ))
}

fn check_entries(source: &Path, ptx_path: &Path) -> Result<usize, String> {
    let source_text = std::fs::read_to_string(source).expect("read the kernel source");
    let ptx = std::fs::read_to_string(ptx_path).expect("read the PTX NVRTC wrote");
    let names = kernel_entry_names(&source_text);
    if names.is_empty() {
        return Err("no __global__ function in the source".to_owned());
    }
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !ptx.contains(&format!(".entry {name}(")))
        .collect();
    if missing.is_empty() {
        Ok(names.len())
    } else {
        Err(format!("PTX lacks the entries {missing:?}"))
    }
}

fn assemble(ptxas: &Path, ptx_path: &Path, sm: &str, cubin: &Path) -> Result<u128, String> {
    let started = Instant::now();
    let output = Command::new(ptxas)
        .arg(format!("-arch={sm}"))
        .arg(ptx_path)
        .arg("-o")
        .arg(cubin)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    if !output.status.success() {
        return Err(format!(
            "ptxas -arch={sm} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(started.elapsed().as_millis())
}

#[test]
fn every_kernel_compiles_with_nvrtc_for_sm80_and_sm90_and_assembles_with_ptxas() {
    let sources = kernel_sources();
    assert!(!sources.is_empty(), "no kernels/*.cu found");
    let out_dir = work_dir("kernels_nvrtc");
    let Some(run) = run_nvrtc(&sources, &out_dir, &NVRTC_FLAGS) else {
        println!("skipped: NVRTC not installed (run scripts/install_cuda_tools.sh)");
        return;
    };
    println!("NVRTC {}, {}", run.nvrtc_version, run.ptxas.display());
    assert_eq!(
        run.builds.len(),
        sources.len() * TARGETS.len(),
        "one build per source and target"
    );
    let mut failures = Vec::new();
    for build in &run.builds {
        let label = format!("{}.cu for {}", build.stem, build.arch);
        match check_build(build, &run.ptxas, &out_dir, &kernels_dir()) {
            Ok(summary) => println!("ok   {label}: {summary}"),
            Err(error) => {
                println!("FAIL {label}");
                failures.push(format!("{label}: {error}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Fused chains as the GPU tier generates them (`kernels::chain`): a few
/// shapes covering every instruction, compiled with the chain's own NVRTC
/// options (no FMA contraction) for sm_80 and sm_90.
#[test]
fn generated_chain_kernels_compile_with_nvrtc_for_sm80_and_sm90() {
    use std::sync::Arc;

    use arrow_schema::{DataType, Field, Schema};
    use strata::job::{Expr, NamedExpr};
    use strata::kernels::chain::{ChainProgram, ChainStep, Route, cuda_src};

    let input = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("value", DataType::Int64, false),
        Field::new("price", DataType::Float64, true),
        Field::new("name", DataType::Utf8, true),
    ]));
    let named = |text: &str, name: &str| NamedExpr {
        name: name.to_owned(),
        expr: Expr::parse(text).expect("parses"),
    };
    let projection = vec![
        named("key", "key"),
        named("value * 3", "tripled"),
        named("value + key", "shifted"),
        named("price / 2.0 - -price % 3.0", "p"),
        named("value / (key - 1) % 7", "q"),
        named("not (price >= 1.5 or key = null)", "flag"),
        named("name", "name"),
    ];
    let projected = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("tripled", DataType::Int64, true),
        Field::new("shifted", DataType::Int64, true),
        Field::new("p", DataType::Float64, true),
        Field::new("q", DataType::Int64, true),
        Field::new("flag", DataType::Boolean, true),
        Field::new("name", DataType::Utf8, true),
    ]));
    let predicate = Expr::parse("tripled > 300 and shifted != 0 or -p < key").expect("parses");
    let no_filter = [ChainStep::Project {
        name: "scaled",
        columns: &projection,
    }];
    let with_filter = [
        ChainStep::Project {
            name: "scaled",
            columns: &projection,
        },
        ChainStep::Filter {
            name: "large",
            predicate: &predicate,
        },
    ];
    let dir = work_dir("chain_kernels_src");
    let mut sources = Vec::new();
    for (stem, steps, route) in [
        ("chain_project", &no_filter[..], false),
        ("chain_project_filter", &with_filter[..], false),
        ("chain_project_filter_route", &with_filter[..], true),
    ] {
        let mut program =
            ChainProgram::compile(&input, steps, &projected).expect("the chain fuses");
        if route {
            // key_by(key, p) after the chain: targets hashed on the device.
            program = program
                .with_route(Route {
                    key_columns: vec![0, 3],
                    max_parallelism: 128,
                    parallelism: 7,
                })
                .expect("numeric keys route");
        }
        let path = dir.join(format!("{stem}.cu"));
        std::fs::write(&path, cuda_src::cuda_source(&program)).expect("write the source");
        sources.push(path);
    }
    // The GPU aggregation table's kernels, for one and for two value columns.
    let agg = |func, column: Option<&str>, output: &str| strata::job::AggSpec {
        func,
        column: column.map(str::to_owned),
        output: output.to_owned(),
    };
    use strata::job::AggFunc::{Count, Max, Min, Sum};
    for (stem, aggs) in [
        (
            "aggregate_table_one",
            vec![agg(Count, None, "n"), agg(Sum, Some("value"), "s")],
        ),
        (
            "aggregate_table_two",
            vec![
                agg(Count, Some("value"), "c"),
                agg(Min, Some("value"), "lo"),
                agg(Max, Some("key"), "hi"),
                agg(Sum, Some("key"), "sk"),
            ],
        ),
    ] {
        let program = strata::kernels::aggtable::AggProgram::compile(&input, &[0], &aggs)
            .expect("the aggregation runs on the device");
        let path = dir.join(format!("{stem}.cu"));
        std::fs::write(&path, strata::kernels::aggtable::cuda_source(&program))
            .expect("write the source");
        sources.push(path);
    }
    let out_dir = work_dir("chain_kernels_nvrtc");
    let Some(run) = run_nvrtc(&sources, &out_dir, cuda_src::COMPILE_OPTIONS) else {
        println!("skipped: NVRTC not installed (run scripts/install_cuda_tools.sh)");
        return;
    };
    let mut failures = Vec::new();
    for build in &run.builds {
        let label = format!("{}.cu for {}", build.stem, build.arch);
        match check_build(build, &run.ptxas, &out_dir, &dir) {
            Ok(summary) => println!("ok   {label}: {summary}"),
            Err(error) => failures.push(format!("{label}: {error}")),
        }
    }
    assert_eq!(run.builds.len(), sources.len() * TARGETS.len());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// --- hash.cuh as host C++ --------------------------------------------------

/// Reads one request per line and prints one hexadecimal answer per line,
/// using only hash.cuh's functions.
const HASH_HARNESS: &str = r#"
#include "hash.cuh"
#include <cstdio>
#include <cstring>
#include <vector>

using namespace strata;

int main() {
    char op[16];
    while (std::scanf("%15s", op) == 1) {
        unsigned long long a = 0, b = 0, c = 0;
        if (std::strcmp(op, "fmix") == 0 && std::scanf("%llx", &a) == 1) {
            std::printf("%llx\n", fmix64(a));
        } else if (std::strcmp(op, "u64") == 0 && std::scanf("%llx", &a) == 1) {
            std::printf("%llx\n", hash_u64(a));
        } else if (std::strcmp(op, "f64") == 0 && std::scanf("%llx", &a) == 1) {
            double v;
            std::memcpy(&v, &a, sizeof v);
            std::printf("%llx\n", strata::hash_f64(v));
        } else if (std::strcmp(op, "bytes") == 0 && std::scanf("%llu", &a) == 1) {
            std::vector<u8> bytes(a);
            for (auto& byte : bytes) {
                unsigned int x;
                if (std::scanf("%2x", &x) != 1) return 2;
                byte = (u8)x;
            }
            std::printf("%llx\n", hash_bytes(bytes.data(), a));
        } else if (std::strcmp(op, "combine") == 0 && std::scanf("%llx %llx", &a, &b) == 2) {
            std::printf("%llx\n", combine(a, b));
        } else if (std::strcmp(op, "route") == 0 && std::scanf("%llx %llu %llu", &a, &b, &c) == 3) {
            std::printf("%x\n", subtask_for_hash(a, (u32)b, (u32)c));
        } else if (std::strcmp(op, "null") == 0) {
            std::printf("%llx\n", NULL_HASH);
        } else {
            return 3;
        }
    }
    return 0;
}
"#;

/// A deterministic generator so the test needs no `rand` (splitmix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        fmix64(self.0)
    }
}

fn cxx_compiler() -> Option<String> {
    let candidates = std::env::var("CXX")
        .into_iter()
        .chain(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|cxx| {
        Command::new(cxx)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Requests and the answers the Rust hash gives to them.
fn hash_cases() -> (String, Vec<u64>) {
    let mut rng = SplitMix(42);
    let mut requests = String::new();
    let mut expected = Vec::new();
    let mut push = |request: String, answer: u64| {
        requests.push_str(&request);
        requests.push('\n');
        expected.push(answer);
    };
    push("null".into(), NULL_HASH);
    let edge_u64 = [0, 1, 42, u64::MAX, i64::MIN as u64, i64::MAX as u64];
    let edge_f64 = [0.0, -0.0, f64::NAN, -f64::NAN, f64::INFINITY, 1.5, -1e300];
    let random_u64: Vec<u64> = (0..200).map(|_| rng.next()).collect();
    for v in edge_u64.into_iter().chain(random_u64) {
        push(format!("fmix {v:x}"), fmix64(v));
        push(format!("u64 {v:x}"), hash_u64(v));
        push(format!("f64 {v:x}"), hash_f64(f64::from_bits(v)));
        let other = rng.next();
        push(format!("combine {v:x} {other:x}"), combine(v, other));
        let max = (rng.next() % 32768 + 1) as u32;
        let parallelism = (rng.next() % u64::from(max) + 1) as u32;
        push(
            format!("route {v:x} {max} {parallelism}"),
            u64::from(subtask_for_hash(v, max, parallelism)),
        );
    }
    for v in edge_f64 {
        push(format!("f64 {:x}", v.to_bits()), hash_f64(v));
    }
    // Every tail length, and the pinned "strata".
    for length in (0..=40).chain([1000]) {
        let bytes: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        push(format!("bytes {length} {hex}"), hash_bytes(&bytes));
    }
    push("bytes 6 737472617461".into(), hash_bytes(b"strata"));
    (requests, expected)
}

#[test]
fn hash_header_compiled_as_host_cpp_matches_the_cpu_hash_bit_for_bit() {
    let Some(cxx) = cxx_compiler() else {
        println!("skipped: no C++ compiler (set CXX)");
        return;
    };
    let dir = work_dir("hash_harness");
    let source = dir.join("harness.cpp");
    let binary = dir.join("harness");
    std::fs::write(&source, HASH_HARNESS).expect("write the harness");
    let compiled = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Werror", "-I"])
        .arg(kernels_dir())
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .output()
        .expect("run the C++ compiler");
    assert!(
        compiled.status.success(),
        "hash.cuh does not compile as host C++:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let (requests, expected) = hash_cases();
    let mut child = Command::new(&binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the harness");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(requests.as_bytes())
        .expect("feed the harness");
    let output = child.wait_with_output().expect("harness output");
    assert!(output.status.success(), "harness exited {}", output.status);
    let answers: Vec<u64> = String::from_utf8(output.stdout)
        .expect("hex output")
        .lines()
        .map(|line| u64::from_str_radix(line, 16).expect("hex answer"))
        .collect();
    assert_eq!(answers.len(), expected.len(), "one answer per request");
    for ((request, answer), expected) in requests.lines().zip(&answers).zip(&expected) {
        assert_eq!(
            answer, expected,
            "hash.cuh and hash.rs disagree on `{request}`: {answer:#x} vs {expected:#x}"
        );
    }
}
