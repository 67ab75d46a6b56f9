//! The CUDA kernels against their CPU twins, through the `KernelBackend`
//! seam: on a machine with a GPU every kernel the dispatcher launches must
//! return exactly what the twin returns (bit for bit, NaN and null rows
//! included), on inputs with nulls, NaN, ±0.0, overflow edges and sliced
//! arrays. Without a GPU each test prints "skipped: no GPU" and passes.

use std::sync::Arc;

use arrow_array::{Array, Float64Array, Int64Array};
use strata::kernels::backend::{CpuBackend, KernelBackend, OffloadStats, TieredKernels};
use strata::kernels::cpu::aggregate::KeyedArrays;
use strata::kernels::cpu::filter::CmpOp;
use strata::kernels::cpu::key_hash::HashMode;
use strata::kernels::cpu::partition::Routing;
use strata::kernels::cpu::project::{ArithOp, ArrayOperand, Operands};
use strata::kernels::cpu::standardize::ColumnStats;
use strata::kernels::gpu::cuda::CudaBackend;
use strata::kernels::gpu::pool::{DevicePool, PoolConfig};
use strata::kernels::gpu::source::PtxCache;
use strata::kernels::gpu::{GpuDetection, detect};

/// Rows per test column: `STRATA_GPU_TEST_ROWS` (e.g. 3000017 for the
/// device check's large run), else 100,003.
fn rows() -> usize {
    std::env::var("STRATA_GPU_TEST_ROWS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n: &usize| n >= 1_000)
        .unwrap_or(100_003)
}

/// The CUDA backend on GPU 0 with a 1 GiB slot budget, or `None` (having
/// printed "skipped: no GPU") on a machine without one.
fn cuda() -> Option<CudaBackend> {
    let device = match detect() {
        GpuDetection::Present(devices) => devices[0].clone(),
        GpuDetection::Absent { reason } => {
            println!("skipped: no GPU ({reason})");
            return None;
        }
    };
    let pool = DevicePool::new(PoolConfig::even(1 << 30, 1)).expect("pool");
    let cache = PtxCache::new(std::env::temp_dir().join("strata-gpu-test-ptx"));
    Some(CudaBackend::new(&device, pool.slot(0), &cache).expect("opening the GPU"))
}

/// A small deterministic generator (splitmix64), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn int_column(seed: u64) -> Int64Array {
    let mut rng = Rng(seed);
    let edges = [i64::MIN, i64::MAX, -1, 0, 1, i64::MIN + 1, i64::MAX - 1];
    (0..rows())
        .map(|_| match rng.next() % 10 {
            0 => None,
            1 => Some(edges[(rng.next() % edges.len() as u64) as usize]),
            _ => Some((rng.next() % 2_000_001) as i64 - 1_000_000),
        })
        .collect()
}

fn float_column(seed: u64) -> Float64Array {
    let mut rng = Rng(seed);
    let edges = [
        f64::NAN,
        -0.0,
        0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN_POSITIVE,
        f64::MAX,
    ];
    (0..rows())
        .map(|_| match rng.next() % 10 {
            0 => None,
            1 => Some(edges[(rng.next() % edges.len() as u64) as usize]),
            _ => Some((rng.next() % 1_000_000) as f64 / 7.0 - 70_000.0),
        })
        .collect()
}

fn float_bits(array: &Float64Array) -> Vec<(bool, u64)> {
    (0..array.len())
        .map(|i| {
            let valid = array.is_valid(i);
            let value = array.value(i);
            // IEEE leaves NaN payloads unspecified: compare NaN as NaN.
            (
                valid,
                if value.is_nan() {
                    u64::MAX
                } else {
                    value.to_bits()
                },
            )
        })
        .collect()
}

#[test]
fn gpu_filter_equals_the_cpu_twin() {
    let Some(gpu) = cuda() else { return };
    let ints = int_column(1);
    let floats = float_column(2);
    for op in CmpOp::ALL {
        for sliced in [false, true] {
            let (ints, floats) = if sliced {
                (ints.slice(3, rows() - 10), floats.slice(5, rows() - 10))
            } else {
                (ints.clone(), floats.clone())
            };
            assert_eq!(
                gpu.filter_i64(&ints, op, 17).unwrap(),
                CpuBackend.filter_i64(&ints, op, 17).unwrap(),
                "{op:?} sliced={sliced}"
            );
            for literal in [0.0, -0.0, 12.5, f64::NAN] {
                assert_eq!(
                    gpu.filter_f64(&floats, op, literal).unwrap(),
                    CpuBackend.filter_f64(&floats, op, literal).unwrap(),
                    "{op:?} {literal} sliced={sliced}"
                );
            }
        }
    }
}

#[test]
fn gpu_projection_equals_the_cpu_twin_including_overflow() {
    let Some(gpu) = cuda() else { return };
    let (left, right) = (int_column(3), int_column(4));
    for op in [ArithOp::Add, ArithOp::Sub, ArithOp::Mul] {
        let cases = [
            Operands {
                left: ArrayOperand::Array(&left),
                right: ArrayOperand::Array(&right),
            },
            Operands {
                left: ArrayOperand::Literal(3),
                right: ArrayOperand::Array(&right),
            },
        ];
        for operands in cases {
            let expected = CpuBackend
                .project_i64(op, operands)
                .map_err(|e| e.to_string());
            let actual = gpu.project_i64(op, operands).map_err(|e| e.to_string());
            assert_eq!(actual, expected, "{op:?}");
        }
    }
    let (left, right) = (float_column(5), float_column(6));
    for op in ArithOp::ALL {
        let operands = Operands {
            left: ArrayOperand::Array(&left),
            right: ArrayOperand::Array(&right),
        };
        let expected = CpuBackend.project_f64(op, operands).unwrap();
        let actual = gpu.project_f64(op, operands).unwrap();
        assert_eq!(float_bits(&actual), float_bits(&expected), "{op:?}");
    }
}

#[test]
fn gpu_key_hash_equals_the_cpu_twin() {
    let Some(gpu) = cuda() else { return };
    let (first, second) = (int_column(7), int_column(8));
    let mut expected = vec![0; rows()];
    let mut actual = vec![0; rows()];
    for (column, mode) in [(&first, HashMode::Replace), (&second, HashMode::Combine)] {
        CpuBackend.hash_i64(column, mode, &mut expected).unwrap();
        gpu.hash_i64(column, mode, &mut actual).unwrap();
        assert_eq!(actual, expected, "{mode:?}");
    }
}

#[test]
fn gpu_partitioning_equals_the_cpu_twin() {
    let Some(gpu) = cuda() else { return };
    // Key hashes of columns with nulls and edges, and raw 64-bit hashes.
    let mut key_hashes = vec![0; rows()];
    CpuBackend
        .hash_i64(&int_column(10), HashMode::Replace, &mut key_hashes)
        .unwrap();
    let mut rng = Rng(11);
    let raw: Vec<u64> = (0..rows())
        .map(|i| match i % 50 {
            0 => 0,
            1 => u64::MAX,
            _ => rng.next(),
        })
        .collect();
    // One partition, shared-memory counts, and (above 1024 partitions)
    // global counts with a scan of several block-sized rounds.
    let routings = [(128, 1), (128, 7), (128, 128), (4096, 1000), (32_768, 3000)];
    for hashes in [&key_hashes[..], &raw[..], &raw[..31], &raw[..33]] {
        for (max_parallelism, parallelism) in routings {
            let routing = Routing::new(max_parallelism, parallelism).unwrap();
            let expected = CpuBackend.partition_hashes(hashes, routing).unwrap();
            let actual = gpu.partition_hashes(hashes, routing).unwrap();
            assert_eq!(
                actual,
                expected,
                "{} rows, routing {max_parallelism}/{parallelism}",
                hashes.len()
            );
        }
    }
}

fn assert_same_stats(actual: ColumnStats, expected: ColumnStats, what: &str) {
    let bits = |v: f64| if v.is_nan() { u64::MAX } else { v.to_bits() };
    assert_eq!(
        (bits(actual.mean), bits(actual.std)),
        (bits(expected.mean), bits(expected.std)),
        "{what}: {actual:?} vs {expected:?}"
    );
}

#[test]
fn gpu_standardization_equals_the_cpu_twin_bit_for_bit() {
    let Some(gpu) = cuda() else { return };
    let with_edges = float_column(12);
    // Without infinities the statistics are finite and the z-scores real.
    let finite: Float64Array = with_edges
        .iter()
        .map(|v| v.map(|x| if x.is_infinite() { 1.5 } else { x }))
        .collect();
    let all_null = Float64Array::from(vec![None::<f64>; 1000]);
    let constant = Float64Array::from(vec![Some(4.25); 70_000]);
    let cases = [
        ("edges", with_edges.clone()),
        ("finite", finite.clone()),
        ("finite sliced", finite.slice(7, rows() - 300)),
        ("one chunk", finite.slice(0, 200)),
        ("two levels of merge", finite.slice(1, 256 * 256 + 5)),
        ("all null", all_null),
        ("constant", constant),
        ("empty", finite.slice(0, 0)),
    ];
    for (what, column) in cases {
        let expected_stats = CpuBackend.standardize_fit(&column).unwrap();
        let stats = gpu.standardize_fit(&column).unwrap();
        assert_same_stats(stats, expected_stats, what);
        let expected = CpuBackend
            .standardize_apply(&column, expected_stats)
            .unwrap();
        let actual = gpu.standardize_apply(&column, expected_stats).unwrap();
        assert_eq!(float_bits(&actual), float_bits(&expected), "{what}");
    }
}

#[test]
fn gpu_aggregation_equals_the_cpu_twin() {
    let Some(gpu) = cuda() else { return };
    // Keys: nulls, i64::MIN (the kernel's special slot), a few thousand
    // repeated keys and the other edges.
    let key_source = int_column(14);
    let few_keys: Int64Array = key_source
        .iter()
        .map(|k| {
            k.map(|k| match k {
                i64::MIN | i64::MAX | -1 | 0 | 1 => k,
                _ => k % 3000,
            })
        })
        .collect();
    let distinct_keys = int_column(15);
    // Values: small ones (no group overflows), and with the i64 edges.
    let small: Int64Array = int_column(16)
        .iter()
        .map(|v| v.map(|v| v % 1_000_000))
        .collect();
    let with_edges = int_column(17);
    for (what, keys, values) in [
        ("few keys, small values", &few_keys, &small),
        ("distinct keys, small values", &distinct_keys, &small),
        ("few keys, edge values", &few_keys, &with_edges),
        ("distinct keys, edge values", &distinct_keys, &with_edges),
    ] {
        for sliced in [false, true] {
            let (keys, values) = if sliced {
                (keys.slice(3, rows() - 10), values.slice(3, rows() - 10))
            } else {
                (keys.clone(), values.clone())
            };
            let input = KeyedArrays {
                keys: &keys,
                values: &values,
            };
            let expected = CpuBackend.aggregate_i64(input).map_err(|e| e.to_string());
            let actual = gpu.aggregate_i64(input).map_err(|e| e.to_string());
            assert_eq!(actual, expected, "{what} sliced={sliced}");
        }
    }
    // An intermediate excursion past i64 that later rows undo is no
    // overflow; a total past it is, naming the smallest key (null first).
    let keys = Int64Array::from(vec![Some(7), Some(7), Some(7), None, None, Some(i64::MIN)]);
    let values = Int64Array::from(vec![i64::MAX, 5, -10, i64::MIN, -1, 3]);
    let input = KeyedArrays {
        keys: &keys,
        values: &values,
    };
    assert_eq!(
        gpu.aggregate_i64(input).map_err(|e| e.to_string()),
        CpuBackend.aggregate_i64(input).map_err(|e| e.to_string())
    );
    let all_null_values = Int64Array::from(vec![None::<i64>; 1000]);
    let input = KeyedArrays {
        keys: &few_keys.slice(0, 1000),
        values: &all_null_values,
    };
    assert_eq!(
        gpu.aggregate_i64(input).unwrap(),
        CpuBackend.aggregate_i64(input).unwrap()
    );
}

#[test]
fn gpu_out_of_memory_splits_and_still_equals_the_cpu_twin() {
    let Some(device) = detect().devices().first().cloned() else {
        println!("skipped: no GPU");
        return;
    };
    // A budget of about a quarter of one launch: the batch is split.
    let pool = DevicePool::new(PoolConfig::even(300_000, 1)).expect("pool");
    let cache = PtxCache::new(std::env::temp_dir().join("strata-gpu-test-ptx"));
    let gpu = CudaBackend::new(&device, pool.slot(0), &cache).expect("opening the GPU");
    let stats = Arc::new(OffloadStats::default());
    let tiered = TieredKernels::new(Arc::new(gpu), Arc::clone(&stats));
    let ints = int_column(9);
    assert_eq!(
        tiered.filter_i64(&ints, CmpOp::Lt, 5).unwrap(),
        CpuBackend.filter_i64(&ints, CmpOp::Lt, 5).unwrap()
    );
    assert!(stats.snapshot().oom_splits > 0, "{:?}", stats.snapshot());
    let mut hashes = vec![0; rows()];
    CpuBackend
        .hash_i64(&ints, HashMode::Replace, &mut hashes)
        .unwrap();
    let routing = Routing::new(128, 9).unwrap();
    assert_eq!(
        tiered.partition_hashes(&hashes, routing).unwrap(),
        CpuBackend.partition_hashes(&hashes, routing).unwrap()
    );
    let floats = float_column(13);
    let fit = CpuBackend.standardize_fit(&floats).unwrap();
    assert_eq!(
        float_bits(&tiered.standardize_apply(&floats, fit).unwrap()),
        float_bits(&CpuBackend.standardize_apply(&floats, fit).unwrap())
    );
}

#[test]
fn gpu_detection_never_panics_and_explains_an_absent_gpu() {
    match detect() {
        GpuDetection::Present(devices) => {
            for device in devices {
                assert!(device.memory_bytes > 0 && device.compute_capability.0 >= 5);
            }
        }
        GpuDetection::Absent { reason } => {
            assert!(!reason.is_empty());
            println!("skipped: no GPU ({reason})");
        }
    }
}

#[test]
fn nvrtc_compiles_the_embedded_kernels_to_ptx_and_caches_them() {
    use strata::kernels::gpu::cuda::{ENTRY_POINTS, compile_modules, nvrtc_version};
    let version = match nvrtc_version() {
        Ok(version) => version,
        Err(e) => {
            println!("skipped: no NVRTC ({e})");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("scratch dir");
    let cache = PtxCache::new(dir.path());
    for arch in ["compute_80", "compute_90"] {
        let modules = compile_modules(arch, &cache).expect("NVRTC compiles every kernel");
        for (stem, name) in ENTRY_POINTS {
            let (_, ptx) = modules
                .iter()
                .find(|(s, _)| *s == stem)
                .unwrap_or_else(|| panic!("no module {stem}"));
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{stem}: {name} for {arch}"
            );
        }
    }
    let cached = std::fs::read_dir(dir.path()).expect("cache dir").count();
    assert_eq!(cached, 12, "six sources × two architectures");
    // A second compile is served from the cache: same PTX, no new files.
    let again = compile_modules("compute_90", &cache).expect("cached");
    assert_eq!(again.len(), 6);
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("cache dir").count(),
        12
    );
    let library = strata::kernels::gpu::cuda::nvrtc_library().expect("loaded above");
    println!(
        "NVRTC {version} ({}): every dispatched kernel compiles for sm_80 and sm_90",
        library.display()
    );
}

#[test]
fn nvrtc_compiles_the_embedded_kernels_to_cubins_and_caches_them() {
    use strata::kernels::gpu::cuda::{compile_cubins, nvrtc_version};
    if let Err(e) = nvrtc_version() {
        println!("skipped: no NVRTC ({e})");
        return;
    }
    let dir = tempfile::tempdir().expect("scratch dir");
    let cache = PtxCache::new(dir.path());
    for arch in ["sm_80", "sm_90"] {
        let cubins = compile_cubins(arch, &cache).expect("NVRTC makes a cubin of every kernel");
        assert_eq!(cubins.len(), 6);
        for (stem, cubin) in &cubins {
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{stem} for {arch} is an ELF image"
            );
        }
        let again = compile_cubins(arch, &cache).expect("cached");
        assert_eq!(again, cubins, "served from the cache");
    }
    let files = std::fs::read_dir(dir.path()).expect("cache dir").count();
    assert_eq!(files, 12, "six sources × two architectures");
    println!("NVRTC: every kernel compiles to an sm_80 and an sm_90 cubin");
}

/// Columns equal, with every NaN equal to every NaN (a GPU makes the
/// canonical NaN where x86 makes a negative one).
fn same_batches(gpu: &arrow_array::RecordBatch, cpu: &arrow_array::RecordBatch, what: &str) {
    use arrow_array::cast::AsArray;
    assert_eq!(gpu.num_rows(), cpu.num_rows(), "{what}: rows");
    for c in 0..cpu.num_columns() {
        let (g, e) = (gpu.column(c), cpu.column(c));
        if let (Some(g), Some(e)) = (
            g.as_primitive_opt::<arrow_array::types::Float64Type>(),
            e.as_primitive_opt::<arrow_array::types::Float64Type>(),
        ) {
            for r in 0..e.len() {
                assert_eq!(
                    g.is_valid(r),
                    e.is_valid(r),
                    "{what}: column {c} row {r} validity"
                );
                let (x, y) = (g.value(r), e.value(r));
                assert!(
                    e.is_null(r) || x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{what}: column {c} row {r}: {x} vs {y}"
                );
            }
        } else {
            assert_eq!(g.to_data(), e.to_data(), "{what}: column {c}");
        }
    }
}

/// Fused chains (`kernels::chain`) on the device against the host twin:
/// the input in uneven coalesced pieces (one of them a slice whose bitmap
/// starts mid-byte), filters, projections of every instruction, a string
/// column gathered on the host, and chains that overflow or divide by zero
/// on some row (the same first fault, named the same way).
#[test]
fn gpu_fused_chains_equal_the_host_twin() {
    use arrow_array::{RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use strata::job::{Expr, NamedExpr};
    use strata::kernels::chain::{ChainProgram, ChainStep};

    let Some(gpu) = cuda() else { return };
    let n = rows();
    let names: StringArray = (0..n)
        .map(|i| (i % 5 != 0).then(|| format!("r{i}")))
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, true),
            Field::new("value", DataType::Int64, true),
            Field::new("price", DataType::Float64, true),
            Field::new("name", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(int_column(31)),
            Arc::new(int_column(32)),
            Arc::new(float_column(33)),
            Arc::new(names),
        ],
    )
    .expect("batch");
    // The batch as is (one stream below 128k rows), and three times over
    // (two halves on two streams), each in uneven pieces.
    let tripled = arrow_select::concat::concat_batches(&batch.schema(), [&batch, &batch, &batch])
        .expect("concat");
    let cut_pieces = |b: &RecordBatch| -> Vec<RecordBatch> {
        let n = b.num_rows();
        let cut = [n / 7, n / 7 + 3, n / 2 + 1, n];
        [0, cut[0], cut[1], cut[2]]
            .iter()
            .zip(cut)
            .map(|(&from, to)| b.slice(from, to - from))
            .collect()
    };
    let named = |text: &str| {
        let (expr, name) = Expr::parse_named(text).expect("parses");
        NamedExpr {
            name: name.unwrap_or_else(|| text.to_owned()),
            expr,
        }
    };
    let chains: [(&[&str], Option<&str>); 5] = [
        (
            &["key", "name", "price"],
            Some("key % 7 < 3 and price >= -1.5 or key = null"),
        ),
        (
            &[
                "key",
                "value % 1000 * 3 as v",
                "price * 2.0 - -price / 3.0 as p",
                "not (price > 0.0) as flag",
                "name",
            ],
            Some("v > 100 or p != p"),
        ),
        (&["key % 1000 - 1 as k", "price % 2.5 as r"], None),
        (&["value * 4611686018427387904 as big"], None),
        (&["value / (key % 3) as q", "key"], Some("q < 0")),
    ];
    for input in [&batch, &tripled] {
        let pieces = cut_pieces(input);
        for (columns, predicate) in chains {
            let columns: Vec<NamedExpr> = columns.iter().map(|c| named(c)).collect();
            let fields: Vec<Field> = columns
                .iter()
                .map(|c| {
                    Field::new(
                        &c.name,
                        c.expr.data_type(&batch.schema()).expect("types"),
                        true,
                    )
                })
                .collect();
            let schema = Arc::new(Schema::new(fields));
            let predicate = predicate.map(|p| Expr::parse(p).expect("parses"));
            let mut steps = vec![ChainStep::Project {
                name: "project",
                columns: &columns,
            }];
            if let Some(p) = &predicate {
                steps.push(ChainStep::Filter {
                    name: "filter",
                    predicate: p,
                });
            }
            let program =
                ChainProgram::compile(batch.schema_ref(), &steps, &schema).expect("fuses");
            let what = format!(
                "{:?} where {} over {} rows",
                columns.iter().map(|c| &c.name).collect::<Vec<_>>(),
                predicate.as_ref().map_or("-".to_owned(), |p| p.to_string()),
                input.num_rows()
            );
            let cpu = CpuBackend.run_chain(&program, &pieces);
            let device = gpu.run_chain(&program, &pieces);
            match (device, cpu) {
                (Ok(g), Ok(c)) => {
                    same_batches(&g.batch, &c.batch, &what);
                    assert_eq!(g.step_rows, c.step_rows, "{what}: rows after each operator");
                    println!("ok {what}: {} kept", c.batch.num_rows());
                }
                (Err(g), Err(c)) => {
                    assert_eq!(g.to_string(), c.to_string(), "{what}");
                    println!("ok {what}: both fail with {c}");
                }
                (g, c) => panic!(
                    "{what}: GPU {:?} vs CPU {:?}",
                    g.map(|o| o.step_rows),
                    c.map(|o| o.step_rows)
                ),
            }
        }
    }
}

/// Device batches in flight, as the chain operator drives them: each batch
/// is submitted before the one before it is completed (two lanes of
/// streams busy at once). A filter keeping 1% is counted first (nothing
/// known), then downloads the predicted survivors with one wait; a batch
/// where every row passes downloads again after a second wait. Every
/// result equals the host twin. A batch dropped while in flight waits for
/// its device work, and the backend goes on working after it.
/// The simulated backend runs the same schedule everywhere (same waits:
/// it prices each batch as the CUDA executor runs it).
#[test]
fn gpu_chain_batches_in_flight_equal_the_host_twin() {
    let pool = DevicePool::new(PoolConfig::even(1 << 30, 1)).expect("pool");
    let simulated = strata::kernels::gpu::sim::SimulatedGpuBackend::new(pool.slot(0));
    chain_batches_in_flight(&simulated);
    println!("simulated backend: ok");
    let Some(gpu) = cuda() else { return };
    chain_batches_in_flight(&gpu);
}

fn chain_batches_in_flight(gpu: &dyn KernelBackend) {
    use arrow_array::RecordBatch;
    use arrow_schema::{DataType, Field, Schema};
    use strata::job::{Expr, NamedExpr};
    use strata::kernels::backend::Submitted;
    use strata::kernels::chain::{ChainProgram, ChainStep};

    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("value", DataType::Int64, true),
    ]));
    let batch = |seed: u64| {
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(int_column(seed)), Arc::new(int_column(seed + 1))],
        )
        .expect("batch")
    };
    let everyone = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(int_column(90)),
            Arc::new(Int64Array::from(vec![7; rows()])),
        ],
    )
    .expect("batch");
    let columns: Vec<NamedExpr> = ["key", "value"]
        .iter()
        .map(|c| NamedExpr {
            name: (*c).to_owned(),
            expr: Expr::parse(c).expect("parses"),
        })
        .collect();
    let predicate = Expr::parse("value % 100 = 7").expect("parses");
    let steps = [
        ChainStep::Project {
            name: "project",
            columns: &columns,
        },
        ChainStep::Filter {
            name: "filter",
            predicate: &predicate,
        },
    ];
    let program = Arc::new(ChainProgram::compile(&schema, &steps, &schema).expect("fuses"));
    let mut inputs: Vec<RecordBatch> = (0..6).map(|b| batch(100 + 2 * b)).collect();
    inputs.insert(4, everyone);
    let mut in_flight: std::collections::VecDeque<(usize, Submitted)> = Default::default();
    let mut waits = Vec::new();
    let mut complete = |index: usize, submitted: Submitted| {
        let output = match submitted {
            Submitted::Done(output) => output,
            Submitted::Pending(pending) => gpu.complete_chain(pending).expect("completes"),
        };
        let expected = CpuBackend
            .run_chain(&program, std::slice::from_ref(&inputs[index]))
            .expect("twin");
        same_batches(&output.batch, &expected.batch, &format!("batch {index}"));
        waits.push(output.traffic.map_or(0, |t| t.syncs));
    };
    for (index, input) in inputs.iter().enumerate() {
        let submitted = gpu
            .submit_chain(&program, vec![input.clone()])
            .expect("submits");
        in_flight.push_back((index, submitted));
        if in_flight.len() == 2 {
            let (i, s) = in_flight.pop_front().expect("two in flight");
            complete(i, s);
        }
    }
    while let Some((i, s)) = in_flight.pop_front() {
        complete(i, s);
    }
    println!("waits per batch: {waits:?}");
    assert_eq!(waits[0], 2, "the first large batch is counted first");
    assert_eq!(
        waits[4], 2,
        "the batch where every row passes downloads again"
    );
    assert_eq!(waits[3], 1, "a predicted download covers 1% survivors");
    // A batch dropped in flight, then the backend again.
    drop(
        gpu.submit_chain(&program, vec![inputs[0].clone()])
            .expect("submits"),
    );
    let again = gpu
        .run_chain(&program, std::slice::from_ref(&inputs[1]))
        .expect("runs");
    let expected = CpuBackend
        .run_chain(&program, std::slice::from_ref(&inputs[1]))
        .expect("twin");
    same_batches(&again.batch, &expected.batch, "after a dropped batch");
}

/// The GPU aggregation table (`kernels::aggtable`) against its host twin:
/// keys with nulls in uneven pieces, upserted in several device batches,
/// drained (the table then cleared) and upserted again; the partials
/// (counts, exact sums, minimums, maximums, the null key's group) equal
/// bit for bit, whatever order the device drains its slots in.
#[test]
fn gpu_aggregation_table_equals_the_host_twin() {
    use arrow_array::RecordBatch;
    use arrow_schema::{DataType, Field, Schema};
    use strata::job::AggFunc::{Count, Max, Min, Sum};
    use strata::job::AggSpec;
    use strata::kernels::aggtable::AggProgram;

    let Some(gpu) = cuda() else { return };
    let n = rows();
    let mut rng = Rng(77);
    let keys: Int64Array = (0..n)
        .map(|_| (!rng.next().is_multiple_of(50)).then(|| (rng.next() % 10_007) as i64 - 5_000))
        .collect();
    let values: Int64Array = (0..n)
        .map(|_| {
            (!rng.next().is_multiple_of(9)).then(|| (rng.next() % 2_000_001) as i64 - 1_000_000)
        })
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("value", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(keys), Arc::new(values)])
        .expect("batch");
    let agg = |func, column: Option<&str>, output: &str| AggSpec {
        func,
        column: column.map(str::to_owned),
        output: output.to_owned(),
    };
    let aggs = vec![
        agg(Count, None, "n"),
        agg(Count, Some("value"), "c"),
        agg(Sum, Some("value"), "s"),
        agg(Min, Some("value"), "lo"),
        agg(Max, Some("value"), "hi"),
        agg(Sum, Some("key"), "sk"),
    ];
    let program = Arc::new(AggProgram::compile(&schema, &[0], &aggs).expect("device form"));
    let sorted = |b: RecordBatch| {
        let order = arrow_ord::sort::sort_to_indices(b.column(0), None, None).expect("sort");
        arrow_select::take::take_record_batch(&b, &order).expect("take")
    };
    let mut device = gpu
        .open_agg_table(Arc::clone(&program), 1 << 16)
        .expect("a device table");
    let mut host = CpuBackend
        .open_agg_table(Arc::clone(&program), 1 << 16)
        .expect("the host twin");
    let half = n / 2;
    for round in 0..2 {
        let pieces = [
            batch.slice(0, half / 3),
            batch.slice(half / 3, half - half / 3),
            batch.slice(half, n - half),
        ];
        for piece in &pieces {
            device.upsert(std::slice::from_ref(piece)).expect("upsert");
            host.upsert(std::slice::from_ref(piece)).expect("upsert");
            assert_eq!(
                device.groups().unwrap(),
                host.groups().unwrap(),
                "round {round}: groups"
            );
        }
        let (d, h) = (device.drain().expect("drain"), host.drain().expect("drain"));
        assert_eq!(sorted(d), sorted(h), "round {round}");
        assert_eq!(device.groups().unwrap(), 0, "a drain empties the table");
        println!("ok round {round}");
    }
}
