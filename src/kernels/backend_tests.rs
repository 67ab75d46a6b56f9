//! Tests of the tiered kernels: out-of-memory splits, device errors and
//! fallbacks, on simulated and faulty GPUs.
use super::*;
use crate::kernels::gpu::pool::{DevicePool, PoolConfig};
use crate::kernels::gpu::sim::SimulatedGpuBackend;

const ROWS: usize = 10_000;

/// A tiered backend over a simulated GPU whose one slot has
/// `budget_bytes` of device memory.
fn tiered(budget_bytes: u64) -> TieredKernels {
    let pool = DevicePool::new(PoolConfig::even(budget_bytes, 1)).unwrap();
    TieredKernels::new(
        Arc::new(SimulatedGpuBackend::new(pool.slot(0))),
        Arc::default(),
    )
}

fn values() -> Int64Array {
    (0..ROWS as i64)
        .map(|v| (v % 13 != 0).then_some(v * 7 - 30_000))
        .collect()
}

#[test]
fn oom_splits_the_batch_and_the_result_equals_the_cpu_twin() {
    let array = values();
    // A quarter of the batch fits; half does not.
    let kernels = tiered(30_000);
    let gpu = kernels.filter_i64(&array, CmpOp::Ge, 100).unwrap();
    assert_eq!(gpu, CpuBackend.filter_i64(&array, CmpOp::Ge, 100).unwrap());
    let stats = kernels.stats().snapshot();
    assert_eq!(stats.oom_splits, 3, "{stats:?}");
    assert_eq!(stats.gpu_batches, 4, "{stats:?}");
    assert_eq!(stats.cpu_fallback_batches, 0, "{stats:?}");
}

/// The CPU twin as a "GPU" whose calls fail with a device error while
/// `broken` is set.
struct Faulty {
    broken: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
    /// The device context it shares with other backends, when a test
    /// models one: its errors are then sticky (they break the context).
    lease: Option<crate::kernels::gpu::contexts::Lease<u32>>,
}

impl Faulty {
    fn check(&self) -> Result<(), KernelError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) {
            return Err(KernelError::Gpu(GpuError::Driver {
                call: "cuLaunchKernel",
                reason: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
            }));
        }
        Ok(())
    }
}

impl KernelBackend for Faulty {
    fn tier(&self) -> Tier {
        Tier::Gpu
    }
    fn context_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(|l| l.lost())
    }
    fn probe_after_error(&self) -> bool {
        match &self.lease {
            Some(lease) => {
                lease.mark_lost();
                true
            }
            None => false,
        }
    }
    fn describe(&self) -> String {
        "faulty test GPU".into()
    }
    fn filter_i64(&self, a: &Int64Array, op: CmpOp, v: i64) -> Result<BooleanArray, KernelError> {
        self.check()?;
        CpuBackend.filter_i64(a, op, v)
    }
    fn filter_f64(&self, a: &Float64Array, op: CmpOp, v: f64) -> Result<BooleanArray, KernelError> {
        self.check()?;
        CpuBackend.filter_f64(a, op, v)
    }
    fn project_i64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Int64Type>>,
    ) -> Result<Int64Array, KernelError> {
        self.check()?;
        CpuBackend.project_i64(op, operands)
    }
    fn project_f64(
        &self,
        op: ArithOp,
        operands: Operands<ArrayOperand<'_, Float64Type>>,
    ) -> Result<Float64Array, KernelError> {
        self.check()?;
        CpuBackend.project_f64(op, operands)
    }
    fn hash_i64(&self, a: &Int64Array, mode: HashMode, h: &mut [u64]) -> Result<(), KernelError> {
        self.check()?;
        CpuBackend.hash_i64(a, mode, h)
    }
    fn partition_hashes(&self, h: &[u64], r: Routing) -> Result<Partitioning, KernelError> {
        self.check()?;
        CpuBackend.partition_hashes(h, r)
    }
    fn standardize_fit(&self, a: &Float64Array) -> Result<ColumnStats, KernelError> {
        self.check()?;
        CpuBackend.standardize_fit(a)
    }
    fn standardize_apply(
        &self,
        a: &Float64Array,
        stats: ColumnStats,
    ) -> Result<Float64Array, KernelError> {
        self.check()?;
        CpuBackend.standardize_apply(a, stats)
    }
    fn aggregate_i64(&self, input: KeyedArrays<'_>) -> Result<Vec<Group>, KernelError> {
        self.check()?;
        CpuBackend.aggregate_i64(input)
    }

    fn run_chain(
        &self,
        program: &ChainProgram,
        pieces: &[RecordBatch],
    ) -> Result<ChainOutput, KernelError> {
        self.check()?;
        CpuBackend.run_chain(program, pieces)
    }

    fn open_agg_table(
        &self,
        program: Arc<AggProgram>,
        capacity: u64,
    ) -> Result<Box<dyn DeviceAggTable>, KernelError> {
        self.check()?;
        CpuBackend.open_agg_table(program, capacity)
    }
}

/// A slot over a [`Faulty`] GPU that fails until repaired, reopening
/// with no backoff (the next call after a failure reopens).
fn broken_slot() -> (
    Arc<Faulty>,
    Arc<crate::kernels::health::DeviceSlot>,
    TieredKernels,
) {
    let faulty = Arc::new(Faulty {
        broken: true.into(),
        calls: AtomicU64::new(0),
        lease: None,
    });
    let gpu: Arc<dyn KernelBackend> = faulty.clone();
    let reopened = Arc::clone(&gpu);
    let slot = Arc::new(crate::kernels::health::DeviceSlot::with_backoff(
        gpu,
        Box::new(move || Ok(Arc::clone(&reopened))),
        std::time::Duration::ZERO,
        std::time::Duration::ZERO,
    ));
    let kernels = TieredKernels::on_slot(Arc::clone(&slot), Arc::default());
    (faulty, slot, kernels)
}

#[test]
fn a_device_error_reruns_on_the_cpu_twin_and_the_slot_reopens_later() {
    let (faulty, slot, kernels) = broken_slot();
    let array = values();
    let expected = CpuBackend.filter_i64(&array, CmpOp::Ge, 100).unwrap();
    assert_eq!(
        kernels.filter_i64(&array, CmpOp::Ge, 100).unwrap(),
        expected
    );
    let stats = kernels.stats().snapshot();
    assert_eq!(
        (stats.device_error_fallbacks, stats.gpu_batches),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(slot.error_count(), 1);
    // Repaired: the reopened backend runs the next batch.
    faulty.broken.store(false, Ordering::SeqCst);
    assert_eq!(
        kernels.filter_i64(&array, CmpOp::Ge, 100).unwrap(),
        expected
    );
    assert_eq!(kernels.stats().snapshot().gpu_batches, 1);
    assert_eq!(slot.reopen_count(), 1);
    // Whole-batch operations fall back the same way.
    faulty.broken.store(true, Ordering::SeqCst);
    let fit = kernels
        .standardize_fit(&Float64Array::from(vec![1.0, 2.0, 3.0]))
        .unwrap();
    assert_eq!(
        fit,
        CpuBackend
            .standardize_fit(&Float64Array::from(vec![1.0, 2.0, 3.0]))
            .unwrap()
    );
    assert_eq!(kernels.stats().snapshot().device_error_fallbacks, 2);
}

#[test]
fn a_fused_chain_reruns_on_the_host_twin_after_a_device_error_and_a_fault_is_not_one() {
    use crate::job::Expr;
    use crate::kernels::chain::{ChainProgram, ChainStep};
    use arrow_schema::{DataType, Field, Schema};
    let (faulty, slot, kernels) = broken_slot();
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(values())]).unwrap();
    let compile = |text: &str| {
        let predicate = Expr::parse(text).unwrap();
        ChainProgram::compile(
            &schema,
            &[ChainStep::Filter {
                name: "f",
                predicate: &predicate,
            }],
            &schema,
        )
        .unwrap()
    };
    let program = compile("v * 2 >= 100");
    let expected = CpuBackend
        .run_chain(&program, std::slice::from_ref(&batch))
        .unwrap();
    let rerun = kernels
        .run_chain(&program, std::slice::from_ref(&batch))
        .unwrap();
    assert_eq!(rerun, expected);
    let stats = kernels.stats().snapshot();
    assert_eq!((stats.device_error_fallbacks, stats.gpu_batches), (1, 0));
    // A fault of the data fails the batch without blaming the device.
    faulty.broken.store(false, Ordering::SeqCst);
    let overflow = compile("v * 4611686018427387904 > 0");
    let error = kernels
        .run_chain(&overflow, std::slice::from_ref(&batch))
        .unwrap_err();
    assert!(matches!(error, KernelError::Chain(_)), "{error}");
    assert_eq!(slot.error_count(), 1, "only the device error counts");
    assert_eq!(kernels.stats().snapshot().device_error_fallbacks, 1);
}

#[test]
fn an_out_of_service_slot_sends_every_batch_to_the_cpu_twin_without_calling_the_gpu() {
    use crate::kernels::health::DeviceSlot;
    let faulty = Arc::new(Faulty {
        broken: true.into(),
        calls: AtomicU64::new(0),
        lease: None,
    });
    let gpu: Arc<dyn KernelBackend> = faulty.clone();
    let again = Arc::clone(&gpu);
    let slot = Arc::new(DeviceSlot::with_backoff(
        gpu,
        Box::new(move || Ok(Arc::clone(&again))),
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_secs(3600),
    ));
    let kernels = TieredKernels::on_slot(slot, Arc::default());
    let array = values();
    for _ in 0..5 {
        kernels.filter_i64(&array, CmpOp::Lt, 0).unwrap();
    }
    assert_eq!(
        faulty.calls.load(Ordering::SeqCst),
        1,
        "one failure, then the CPU twin"
    );
    assert_eq!(kernels.stats().snapshot().device_error_fallbacks, 5);
}

#[test]
fn piece_that_never_fits_runs_on_the_cpu_twin_and_is_counted() {
    let array = values();
    let kernels = tiered(100);
    let mut hashes = vec![0; ROWS];
    kernels
        .hash_i64(&array, HashMode::Replace, &mut hashes)
        .unwrap();
    let mut expected = vec![0; ROWS];
    CpuBackend
        .hash_i64(&array, HashMode::Replace, &mut expected)
        .unwrap();
    assert_eq!(hashes, expected);
    let stats = kernels.stats().snapshot();
    assert_eq!(stats.gpu_batches, 0);
    assert_eq!(stats.cpu_fallback_batches, 1 << OOM_SPLIT_DEPTH_MAX);
    assert_eq!(stats.cpu_fallback_rows, ROWS as u64);
}

#[test]
fn batch_that_fits_runs_whole_on_the_gpu() {
    let array = values();
    let kernels = tiered(1 << 20);
    let doubled = kernels
        .project_i64(
            ArithOp::Mul,
            Operands {
                left: ArrayOperand::Array(&array),
                right: ArrayOperand::Literal(2),
            },
        )
        .unwrap();
    assert_eq!(doubled.value(1), 2 * array.value(1));
    assert_eq!(kernels.stats().snapshot().gpu_batches, 1);
    assert_eq!(kernels.stats().snapshot().oom_splits, 0);
}

#[test]
fn overflow_after_a_split_names_the_row_of_the_whole_batch() {
    let mut rows: Vec<i64> = (0..ROWS as i64).collect();
    rows[7_000] = i64::MAX;
    let array = Int64Array::from(rows);
    let operands = Operands {
        left: ArrayOperand::Array(&array),
        right: ArrayOperand::Literal(1),
    };
    let expected = CpuBackend.project_i64(ArithOp::Add, operands).unwrap_err();
    let split = tiered(60_000)
        .project_i64(ArithOp::Add, operands)
        .unwrap_err();
    assert_eq!(split.to_string(), expected.to_string());
    assert!(split.to_string().contains("row 7000"), "{split}");
}

#[test]
fn split_float_projection_keeps_nulls_and_nan() {
    let left: Float64Array = (0..ROWS)
        .map(|i| match i % 5 {
            0 => None,
            1 => Some(f64::NAN),
            _ => Some(i as f64 * 0.5),
        })
        .collect();
    let operands = Operands {
        left: ArrayOperand::Array(&left),
        right: ArrayOperand::Literal(0.0),
    };
    let expected = CpuBackend.project_f64(ArithOp::Div, operands).unwrap();
    let split = tiered(100_000).project_f64(ArithOp::Div, operands).unwrap();
    assert_eq!(split.nulls(), expected.nulls());
    let bits = |a: &Float64Array| a.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&split), bits(&expected));
}

fn hashes() -> Vec<u64> {
    let mut hashes = vec![0; ROWS];
    CpuBackend
        .hash_i64(&values(), HashMode::Replace, &mut hashes)
        .unwrap();
    hashes
}

#[test]
fn split_partitioning_equals_the_cpu_twin() {
    let hashes = hashes();
    let routing = Routing::new(128, 7).unwrap();
    let expected = CpuBackend.partition_hashes(&hashes, routing).unwrap();
    // 16 bytes a row: a quarter of the batch fits, half does not.
    let kernels = tiered(50_000);
    assert_eq!(
        kernels.partition_hashes(&hashes, routing).unwrap(),
        expected
    );
    let stats = kernels.stats().snapshot();
    assert_eq!(stats.oom_splits, 3, "{stats:?}");
    assert_eq!(stats.gpu_batches, 4, "{stats:?}");
    assert_eq!(stats.cpu_fallback_batches, 0, "{stats:?}");
    // Uneven pieces (an odd row count) and one partition join too.
    let odd = &hashes[..ROWS - 3];
    for routing in [
        Routing::new(128, 1).unwrap(),
        Routing::new(4096, 1000).unwrap(),
    ] {
        assert_eq!(
            tiered(50_000).partition_hashes(odd, routing).unwrap(),
            CpuBackend.partition_hashes(odd, routing).unwrap()
        );
    }
}

#[test]
fn partitioning_that_never_fits_runs_on_the_cpu_twin_and_is_counted() {
    let hashes = hashes();
    let routing = Routing::new(128, 5).unwrap();
    let kernels = tiered(100);
    assert_eq!(
        kernels.partition_hashes(&hashes, routing).unwrap(),
        CpuBackend.partition_hashes(&hashes, routing).unwrap()
    );
    let stats = kernels.stats().snapshot();
    assert_eq!(stats.gpu_batches, 0);
    assert_eq!(stats.cpu_fallback_batches, 1 << OOM_SPLIT_DEPTH_MAX);
    assert_eq!(stats.cpu_fallback_rows, ROWS as u64);
    let empty = kernels.partition_hashes(&[], routing).unwrap();
    assert_eq!(empty.partition_offsets, vec![0; 6]);
}

fn floats() -> Float64Array {
    (0..ROWS)
        .map(|i| match i % 7 {
            0 => None,
            1 => Some(f64::NAN),
            2 => Some(-0.0),
            _ => Some(i as f64 * 0.25 - 900.0),
        })
        .collect()
}

fn bits(array: &Float64Array) -> Vec<u64> {
    array.values().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn standardize_fit_refused_runs_whole_on_the_cpu_twin_and_apply_splits() {
    let array = floats();
    let expected_stats = CpuBackend.standardize_fit(&array).unwrap();
    let expected = CpuBackend
        .standardize_apply(&array, expected_stats)
        .unwrap();
    // The fit needs the whole column (over 80 kB); the apply pieces of
    // a quarter (about 41 kB) fit.
    let kernels = tiered(45_000);
    let stats = kernels.standardize_fit(&array).unwrap();
    assert_eq!(stats.mean.to_bits(), expected_stats.mean.to_bits());
    assert_eq!(stats.std.to_bits(), expected_stats.std.to_bits());
    let snapshot = kernels.stats().snapshot();
    assert_eq!(snapshot.cpu_fallback_batches, 1, "{snapshot:?}");
    assert_eq!(snapshot.cpu_fallback_rows, ROWS as u64, "{snapshot:?}");
    assert_eq!(snapshot.oom_splits, 0, "{snapshot:?}");
    let z = kernels.standardize_apply(&array, stats).unwrap();
    assert_eq!(z.nulls(), expected.nulls());
    assert_eq!(bits(&z), bits(&expected));
    let snapshot = kernels.stats().snapshot();
    assert_eq!(snapshot.oom_splits, 3, "{snapshot:?}");
    assert_eq!(snapshot.gpu_batches, 4, "{snapshot:?}");
}

#[test]
fn standardize_that_fits_runs_on_the_gpu() {
    let array = floats().slice(3, ROWS - 10);
    let kernels = tiered(1 << 20);
    let stats = kernels.standardize_fit(&array).unwrap();
    let z = kernels.standardize_apply(&array, stats).unwrap();
    let (expected, expected_stats) = crate::kernels::cpu::standardize::standardize_column(&array);
    assert_eq!(stats, expected_stats);
    assert_eq!(bits(&z), bits(&expected));
    assert_eq!(kernels.stats().snapshot().gpu_batches, 2);
    assert_eq!(kernels.stats().snapshot().cpu_fallback_batches, 0);
}

fn keyed() -> (Int64Array, Int64Array) {
    let keys: Int64Array = (0..ROWS as i64)
        .map(|i| match i % 11 {
            0 => None,
            1 => Some(i64::MIN),
            _ => Some(i % 97 - 40),
        })
        .collect();
    (keys, values())
}

#[test]
fn aggregate_refused_runs_whole_on_the_cpu_twin_and_is_counted() {
    let (keys, values) = keyed();
    let input = KeyedArrays {
        keys: &keys,
        values: &values,
    };
    let expected = CpuBackend.aggregate_i64(input).unwrap();
    assert_eq!(
        expected.first().map(|g| g.key),
        Some(None),
        "null key first"
    );
    let kernels = tiered(100_000);
    assert_eq!(kernels.aggregate_i64(input).unwrap(), expected);
    let stats = kernels.stats().snapshot();
    assert_eq!(stats.cpu_fallback_batches, 1, "{stats:?}");
    assert_eq!(stats.cpu_fallback_rows, ROWS as u64, "{stats:?}");
    assert_eq!((stats.gpu_batches, stats.oom_splits), (0, 0), "{stats:?}");

    let kernels = tiered(1 << 24);
    assert_eq!(kernels.aggregate_i64(input).unwrap(), expected);
    assert_eq!(kernels.stats().snapshot().gpu_batches, 1);
}

#[test]
fn aggregate_overflow_and_row_mismatch_are_errors_on_every_tier() {
    let keys = Int64Array::from(vec![Some(5), Some(5), Some(3), None, Some(3)]);
    let values = Int64Array::from(vec![i64::MAX, 1, i64::MAX, 1, -1]);
    let input = KeyedArrays {
        keys: &keys,
        values: &values,
    };
    let expected = CpuBackend.aggregate_i64(input).unwrap_err().to_string();
    assert!(expected.contains("key 5"), "{expected}");
    let fallback = tiered(100).aggregate_i64(input).unwrap_err();
    let fits = tiered(1 << 20).aggregate_i64(input).unwrap_err();
    assert_eq!(fallback.to_string(), expected);
    assert_eq!(fits.to_string(), expected);
    let short = values.slice(0, 4);
    let mismatch = KeyedArrays {
        keys: &keys,
        values: &short,
    };
    assert!(matches!(
        tiered(1 << 20).aggregate_i64(mismatch),
        Err(KernelError::Aggregate(
            AggregateError::RowCountMismatch { .. }
        ))
    ));
}

/// Two slots on one device share its context. A sticky error on one slot
/// takes the other out of service before its next batch (which runs on
/// the CPU twin without touching the device); the context is reset once,
/// after both let go of it, and both slots come back on a fresh one.
#[test]
fn a_sticky_error_on_one_slot_takes_the_device_out_and_it_is_reset_once_both_let_go() {
    use crate::kernels::gpu::contexts::DeviceContexts;
    use crate::kernels::health::DeviceSlot;
    #[derive(Debug, thiserror::Error)]
    #[error("unreachable")]
    struct Never;
    let registry = Arc::new(DeviceContexts::<u32>::default());
    let opened = Arc::new(AtomicU64::new(0));
    let resets = Arc::new(AtomicU64::new(0));
    // Slot 0's first backend fails; every other backend works.
    let open = {
        let (registry, opened, resets) = (registry.clone(), opened.clone(), resets.clone());
        move |broken: bool| -> Result<Arc<dyn KernelBackend>, GpuError> {
            let lease = registry
                .lease(
                    0,
                    || Ok::<_, Never>(Arc::new(opened.fetch_add(1, Ordering::SeqCst) as u32)),
                    || {
                        resets.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    },
                )
                .map_err(|e| GpuError::NoGpu {
                    reason: e.to_string(),
                })?;
            Ok(Arc::new(Faulty {
                broken: broken.into(),
                calls: AtomicU64::new(0),
                lease: Some(lease),
            }))
        }
    };
    let slots: Vec<(Arc<DeviceSlot>, TieredKernels)> = (0..2)
        .map(|i| {
            let first = open(i == 0).unwrap();
            let reopen = open.clone();
            let slot = Arc::new(DeviceSlot::with_backoff(
                first,
                Box::new(move || reopen(false)),
                std::time::Duration::ZERO,
                std::time::Duration::ZERO,
            ));
            let kernels = TieredKernels::on_slot(Arc::clone(&slot), Arc::default());
            (slot, kernels)
        })
        .collect();
    assert_eq!(
        opened.load(Ordering::SeqCst),
        1,
        "the slots share one context"
    );
    let array = values();
    let expected = CpuBackend.filter_i64(&array, CmpOp::Ge, 100).unwrap();
    // Slot 0 fails stickily: its batch reruns on the CPU twin.
    assert_eq!(
        slots[0].1.filter_i64(&array, CmpOp::Ge, 100).unwrap(),
        expected
    );
    assert_eq!(slots[0].0.error_count(), 1);
    // Slot 1 never reaches its (working) backend: the context is lost.
    assert_eq!(
        slots[1].1.filter_i64(&array, CmpOp::Ge, 100).unwrap(),
        expected
    );
    let stats = slots[1].1.stats().snapshot();
    assert_eq!(
        (stats.gpu_batches, stats.device_error_fallbacks),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(slots[1].0.error_count(), 1);
    // Both let go, so the next batch of each reopens: one reset, one new
    // context shared by both, and the batches run on the device again.
    for (slot, kernels) in &slots {
        assert_eq!(
            kernels.filter_i64(&array, CmpOp::Ge, 100).unwrap(),
            expected
        );
        assert_eq!(slot.reopen_count(), 1);
        assert_eq!(kernels.stats().snapshot().gpu_batches, 1);
    }
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
    assert_eq!(registry.reset_count(), 1);
}
