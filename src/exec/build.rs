//! Builds a task's source and operators from the logical plan.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::ExecError;
use super::aggregate::{AggregateOperator, WindowOperator};
use super::gpu_chain::CoalescePolicy;
use super::operators::{FilterOperator, Operator, ProjectOperator};
use super::sink::{
    ArrowIpcSink, BlackholeSink, CsvSink, IpcPart, ParquetPart, ParquetSink, PartFiles, PrintSink,
    TwoPhaseCsvSink, TwoPhaseIpcSink, TwoPhaseParquetSink,
};
use super::sort::{SortColumn, SortOperator};
use super::source::{
    ArrowIpcSource, CsvSource, DatagenSource, ParquetSource, Source, WatermarkGenerator,
};
use super::spill::SpillContext;
use super::task::TaskInput;
use crate::job::{LogicalPlan, OperatorKind, WatermarkSpec};
use crate::memory::MemoryManager;

/// The GPU side of a task placed (in part) on the GPU.
pub struct GpuContext {
    /// The slot's GPU kernels with split-and-retry and CPU fallback.
    pub kernels: Arc<crate::kernels::backend::TieredKernels>,
    /// Logical operators that placement put on the GPU.
    pub operators: Vec<usize>,
    /// When a fused chain's buffered input becomes a device batch.
    pub coalesce: super::gpu_chain::CoalescePolicy,
    /// The hash exchange the task's output feeds, if any: a fused chain
    /// that ends the task computes its rows' targets on the device.
    pub route: Option<crate::kernels::chain::Route>,
}

/// Per-subtask context for building operators.
pub struct BuildContext<'a> {
    pub plan: &'a LogicalPlan,
    pub subtask: u32,
    pub parallelism: u32,
    pub memory: MemoryManager,
    /// How operators spill; `None` makes a budget refusal fail the task.
    pub spill: Option<SpillContext>,
    /// Shared by the print sinks of one job so `limit` is job-wide.
    pub printed: Arc<AtomicU64>,
    /// `None` when no operator of the task is on the GPU.
    pub gpu: Option<GpuContext>,
    /// Checkpointing is on for the job: file sinks write exactly-once (two-phase commit per checkpoint).
    pub checkpointing: bool,
    /// The operators placement put on the GPU, whether or not this slot
    /// has a GPU backend: a GPU-placed aggregate keeps its state in the
    /// partial form on every slot, so its checkpoints restore anywhere.
    pub gpu_placed: Vec<usize>,
    /// Where `flight_sink` partitions are served; `None` where there is no
    /// Flight server (a `flight_sink` then fails to build).
    pub flight: Option<super::sink::flight::FlightTaskContext>,
}

/// The task input for a source operator.
pub fn build_source(
    ctx: &BuildContext<'_>,
    op: usize,
) -> Result<(TaskInput, Option<u64>), ExecError> {
    let spec = &ctx.plan.spec.operators[op];
    let schema = &ctx.plan.schemas[op];
    let watermark_gen = |w: &Option<WatermarkSpec>| {
        w.as_ref()
            .map(|w| WatermarkGenerator::new(w, schema))
            .transpose()
    };
    let (source, watermarks, rate): (Box<dyn Source>, _, _) = match &spec.kind {
        OperatorKind::Datagen(d) => {
            let s = DatagenSource::new(d.clone(), ctx.subtask, ctx.parallelism);
            let rate = s.rate_limit();
            (Box::new(s), watermark_gen(&d.watermark)?, rate)
        }
        OperatorKind::CsvSource(c) => (
            Box::new(CsvSource::new(c.clone(), ctx.subtask, ctx.parallelism)?),
            watermark_gen(&c.watermark)?,
            None,
        ),
        OperatorKind::ParquetSource(p) => (
            Box::new(ParquetSource::new(p.clone(), ctx.subtask, ctx.parallelism)?),
            watermark_gen(&p.watermark)?,
            None,
        ),
        OperatorKind::ArrowIpcSource(a) => (
            Box::new(ArrowIpcSource::new(
                a.clone(),
                ctx.subtask,
                ctx.parallelism,
            )?),
            watermark_gen(&a.watermark)?,
            None,
        ),
        _ => unreachable!("operator {op} is not a source"),
    };
    let expected = source.rows_expected();
    Ok((
        TaskInput::Source {
            source,
            watermarks,
            rows_per_second: rate,
        },
        expected,
    ))
}

/// The chained operators of a task, in order. A run of consecutive
/// filters and projections placed on the GPU becomes one fused program
/// ([`super::gpu_chain`]); a run whose expressions do not fuse keeps its
/// operators, each on the kernels where it can (the reason is logged).
///
/// `metrics` are the chained operators' metrics in the same order (empty
/// where nobody reads them): a fused chain corrects the row counts of the
/// operators it computes.
pub fn build_operators(
    ctx: &BuildContext<'_>,
    chained: &[usize],
    metrics: &[Arc<crate::metrics::OperatorMetrics>],
) -> Result<Vec<Box<dyn Operator>>, ExecError> {
    let fusable = |op: usize| {
        ctx.gpu.as_ref().is_some_and(|g| g.operators.contains(&op))
            && matches!(
                ctx.plan.spec.operators[op].kind,
                OperatorKind::Filter { .. } | OperatorKind::Project { .. }
            )
    };
    let mut operators: Vec<Box<dyn Operator>> = Vec::with_capacity(chained.len());
    let mut i = 0;
    while i < chained.len() {
        let mut end = i;
        while end < chained.len()
            && fusable(chained[end])
            && (end == i || ctx.plan.spec.operators[chained[end]].input == Some(chained[end - 1]))
        {
            end += 1;
        }
        if end > i
            && let Some(fused) = fused_chain(
                ctx,
                &chained[i..end],
                metrics.get(i..end),
                end == chained.len(),
            )
        {
            operators.extend((i..end - 1).map(|_| Box::new(super::gpu_chain::Forward) as _));
            operators.push(fused);
            i = end;
            continue;
        }
        operators.push(build_operator(ctx, chained[i])?);
        i += 1;
    }
    Ok(operators)
}

/// The run `ops` as one fused GPU program, or `None` (logged) when its
/// expressions do not fuse.
fn fused_chain(
    ctx: &BuildContext<'_>,
    ops: &[usize],
    metrics: Option<&[Arc<crate::metrics::OperatorMetrics>]>,
    ends_task: bool,
) -> Option<Box<dyn Operator>> {
    let gpu = ctx.gpu.as_ref()?;
    let plan = ctx.plan;
    let steps: Vec<crate::kernels::chain::ChainStep<'_>> = ops
        .iter()
        .map(|&op| {
            let spec = &plan.spec.operators[op];
            match &spec.kind {
                OperatorKind::Filter { predicate } => crate::kernels::chain::ChainStep::Filter {
                    name: &spec.name,
                    predicate,
                },
                OperatorKind::Project { columns } => crate::kernels::chain::ChainStep::Project {
                    name: &spec.name,
                    columns,
                },
                _ => unreachable!("only filters and projections fuse"),
            }
        })
        .collect();
    let input = plan.spec.operators[ops[0]].input?;
    let names = ops
        .iter()
        .map(|&op| plan.spec.operators[op].name.as_str())
        .collect::<Vec<_>>()
        .join(" → ");
    match crate::kernels::chain::ChainProgram::compile(
        &plan.schemas[input],
        &steps,
        &plan.schemas[*ops.last()?],
    ) {
        Ok(program) => {
            let program = match gpu.route.clone().filter(|_| ends_task) {
                None => program,
                Some(route) => match program.clone().with_route(route) {
                    Ok(routed) => routed,
                    Err(reason) => {
                        tracing::debug!(
                            "GPU chain {names}: the key_by after it hashes on the host ({reason})"
                        );
                        program
                    }
                },
            };
            tracing::debug!(
                "GPU chain {names}: one fused program of {} instructions, {} device input columns{}",
                program.instrs.len(),
                program.device_inputs().len(),
                if program.route.is_some() {
                    ", key_by targets hashed on the device"
                } else {
                    ""
                }
            );
            Some(Box::new(
                super::gpu_chain::GpuChainOperator::new(
                    names,
                    program,
                    Arc::clone(&gpu.kernels) as _,
                    gpu.coalesce,
                )
                .with_step_metrics(metrics.map(<[_]>::to_vec).unwrap_or_default()),
            ))
        }
        Err(reason) => {
            tracing::warn!(
                "GPU chain {names} does not fuse ({reason}); its operators run one by one"
            );
            None
        }
    }
}

/// Device table slots per byte of managed memory: the table mirrors the
/// operator's managed-memory budget, at most this share of it.
const AGG_TABLE_BUDGET_SHARE: u64 = 2;

/// A GPU-placed aggregate: a device table in front of a CPU aggregate over
/// its partials. The table comes from the slot's GPU, else (no backend on
/// this slot, or the device refuses even the smallest table) from the host
/// twin, which keeps the same partial state (and is logged).
fn gpu_aggregate(
    ctx: &BuildContext<'_>,
    name: &str,
    input_schema: &arrow_schema::Schema,
    keys: Vec<usize>,
    aggs: &[crate::job::AggSpec],
    output: arrow_schema::SchemaRef,
) -> Result<Box<dyn Operator>, ExecError> {
    use crate::kernels::aggtable::AggProgram;
    use crate::kernels::backend::{AGG_TABLE_SLOTS_MIN, CpuBackend, KernelBackend};
    let program = Arc::new(
        AggProgram::compile(input_schema, &keys, aggs).map_err(|detail| {
            ExecError::Unsupported {
                operator: name.to_owned(),
                detail,
            }
        })?,
    );
    let host = AggregateOperator::new(
        name,
        &program.partial_schema,
        vec![0],
        &program.merge_aggs(aggs),
        output,
        ctx.memory.clone(),
        ctx.spill.clone(),
    )?;
    let slot_bytes = crate::kernels::aggtable::device_bytes(&program, 1).max(1);
    let capacity = (ctx.memory.budget_bytes() / AGG_TABLE_BUDGET_SHARE / slot_bytes)
        .max(AGG_TABLE_SLOTS_MIN)
        .next_power_of_two();
    let table = match &ctx.gpu {
        Some(gpu) => gpu
            .kernels
            .open_device_agg_table(Arc::clone(&program), capacity)
            .map_err(|e| {
                tracing::warn!("{name}: no GPU aggregation table ({e}); its host twin aggregates");
                gpu.kernels
                    .stats()
                    .cpu_fallback_batches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .ok(),
        None => None,
    };
    let table = match table {
        Some(table) => table,
        None => CpuBackend
            .open_agg_table(Arc::clone(&program), capacity)
            .map_err(|e| ExecError::Unsupported {
                operator: name.to_owned(),
                detail: e.to_string(),
            })?,
    };
    let policy = ctx
        .gpu
        .as_ref()
        .map_or_else(CoalescePolicy::default, |g| g.coalesce);
    Ok(Box::new(super::gpu_aggregate::GpuAggregateOperator::new(
        name, program, table, host, policy,
    )))
}

/// A non-source operator.
pub fn build_operator(ctx: &BuildContext<'_>, op: usize) -> Result<Box<dyn Operator>, ExecError> {
    let plan = ctx.plan;
    let spec = &plan.spec.operators[op];
    let output = Arc::clone(&plan.schemas[op]);
    let input_op = spec.input.expect("non-source operators have an input");
    let input_schema = Arc::clone(&plan.schemas[input_op]);
    let keys = || plan.keyed[input_op].clone().unwrap_or_default();
    Ok(match &spec.kind {
        OperatorKind::Filter { predicate } => {
            let filter = FilterOperator::new(&spec.name, predicate.clone());
            match ctx.gpu.as_ref().filter(|g| g.operators.contains(&op)) {
                Some(gpu) => Box::new(filter.on_gpu(Arc::clone(&gpu.kernels) as _)),
                None => Box::new(filter),
            }
        }
        OperatorKind::Project { columns } => {
            let project = ProjectOperator::new(&spec.name, columns.clone(), output);
            match ctx.gpu.as_ref().filter(|g| g.operators.contains(&op)) {
                Some(gpu) => Box::new(project.on_gpu(Arc::clone(&gpu.kernels) as _)),
                None => Box::new(project),
            }
        }
        OperatorKind::Aggregate { aggs } if ctx.gpu_placed.contains(&op) => {
            gpu_aggregate(ctx, &spec.name, &input_schema, keys(), aggs, output)?
        }
        OperatorKind::Aggregate { aggs } => Box::new(AggregateOperator::new(
            &spec.name,
            &input_schema,
            keys(),
            aggs,
            output,
            ctx.memory.clone(),
            ctx.spill.clone(),
        )?),
        OperatorKind::Window {
            time_column,
            size_ms,
            aggs,
        } => {
            let time = input_schema.index_of(time_column)?;
            Box::new(WindowOperator::new(
                &spec.name,
                &input_schema,
                keys(),
                time,
                *size_ms,
                aggs,
                output,
                ctx.memory.clone(),
                ctx.spill.clone(),
            )?)
        }
        OperatorKind::Sort { keys, fan_in } => {
            let keys = keys
                .iter()
                .map(|k| {
                    Ok(SortColumn {
                        column: input_schema.index_of(&k.column)?,
                        descending: k.descending,
                    })
                })
                .collect::<Result<Vec<_>, ExecError>>()?;
            Box::new(SortOperator::new(
                &spec.name,
                input_schema,
                keys,
                *fan_in,
                ctx.memory.clone(),
                ctx.spill.clone(),
            )?)
        }
        OperatorKind::Sample { fraction, seed } => Box::new(super::features::SampleOperator::new(
            *fraction,
            *seed,
            ctx.subtask,
        )),
        OperatorKind::Shuffle { buffer_rows, seed } => {
            Box::new(super::features::ShuffleOperator::new(
                &spec.name,
                *buffer_rows,
                *seed,
                ctx.subtask,
                Arc::clone(&input_schema),
                ctx.memory.clone(),
            ))
        }
        OperatorKind::Cast { columns } => Box::new(super::features::CastOperator::new(
            &spec.name,
            &input_schema,
            columns,
            output,
        )?),
        OperatorKind::Batch { rows } => Box::new(super::features::BatchOperator::new(
            &spec.name,
            *rows,
            Arc::clone(&input_schema),
        )),
        OperatorKind::Standardize { columns, stats, .. } => {
            let backend: Arc<dyn crate::kernels::backend::KernelBackend> =
                match ctx.gpu.as_ref().filter(|g| g.operators.contains(&op)) {
                    Some(gpu) => Arc::clone(&gpu.kernels) as _,
                    None => Arc::new(crate::kernels::backend::CpuBackend),
                };
            Box::new(super::features::StandardizeOperator::new(
                &spec.name,
                &input_schema,
                output,
                columns,
                stats,
                backend,
            )?)
        }
        OperatorKind::StandardizeFit { columns, stats } => Box::new(
            super::features::StandardizeFitSink::new(&spec.name, &input_schema, columns, stats)?,
        ),
        OperatorKind::SplitSide {
            columns,
            seed,
            lo,
            hi,
            ..
        } => Box::new(super::features::SplitSideOperator::new(
            &spec.name,
            &input_schema,
            columns,
            *seed,
            *lo,
            *hi,
        )?),
        OperatorKind::FillNull { columns, value } => Box::new(
            super::features::FillNullOperator::new(&spec.name, &input_schema, columns, value)?,
        ),
        OperatorKind::Bucketize(bucketize) => Box::new(super::features::BucketizeOperator::new(
            &spec.name,
            &input_schema,
            bucketize,
            output,
        )?),
        OperatorKind::OneHot(one_hot) => Box::new(super::features::OneHotOperator::new(
            &spec.name,
            &input_schema,
            one_hot,
            output,
        )?),
        OperatorKind::Join(join) => Box::new(super::features::JoinOperator::open(
            join,
            super::features::JoinOptions {
                name: &spec.name,
                input: &input_schema,
                output,
                memory: ctx.memory.clone(),
            },
        )?),
        OperatorKind::Blackhole => Box::new(BlackholeSink),
        OperatorKind::Print { limit } => Box::new(PrintSink::new(
            ctx.subtask,
            ctx.parallelism,
            *limit,
            Arc::clone(&ctx.printed),
        )),
        OperatorKind::CsvSink { path, .. } if ctx.checkpointing => Box::new(TwoPhaseCsvSink::new(
            &spec.name,
            path,
            ctx.subtask,
            input_schema,
        )?),
        OperatorKind::ParquetSink { path, options, .. } if ctx.checkpointing => {
            Box::new(TwoPhaseParquetSink::with_parts(
                &spec.name,
                path,
                ctx.subtask,
                input_schema,
                parquet_parts(options),
            )?)
        }
        OperatorKind::ArrowIpcSink { path, options, .. } if ctx.checkpointing => {
            Box::new(TwoPhaseIpcSink::with_parts(
                &spec.name,
                path,
                ctx.subtask,
                input_schema,
                ipc_parts(options),
            )?)
        }
        OperatorKind::CsvSink { path, .. } => {
            Box::new(CsvSink::new(path, ctx.subtask, input_schema)?)
        }
        OperatorKind::ParquetSink { path, options, .. } => Box::new(ParquetSink::with_parts(
            path,
            ctx.subtask,
            input_schema,
            parquet_parts(options),
        )?),
        OperatorKind::ArrowIpcSink { path, options, .. } => Box::new(ArrowIpcSink::with_parts(
            path,
            ctx.subtask,
            input_schema,
            ipc_parts(options),
        )?),
        OperatorKind::FlightSink {
            queue_bytes,
            reader_timeout_ms,
        } => {
            let flight = ctx.flight.as_ref().ok_or_else(|| ExecError::Unsupported {
                operator: spec.name.clone(),
                detail: "this TaskManager serves no Arrow Flight (taskmanager.flight.port)".into(),
            })?;
            Box::new(super::sink::flight::FlightSink::new(
                &spec.name,
                op,
                ctx.subtask,
                input_schema,
                *queue_bytes,
                *reader_timeout_ms,
                flight,
            ))
        }
        OperatorKind::KeyBy { .. }
        | OperatorKind::Datagen(_)
        | OperatorKind::CsvSource(_)
        | OperatorKind::ParquetSource(_)
        | OperatorKind::ArrowIpcSource(_) => {
            unreachable!("operator {op} is not chained as an operator")
        }
    })
}

fn parquet_parts(options: &crate::job::ParquetSinkOptions) -> PartFiles<ParquetPart> {
    PartFiles {
        format: ParquetPart {
            row_group_rows: options.row_group_rows,
        },
        target_file_bytes: options.target_file_bytes,
    }
}

fn ipc_parts(options: &crate::job::ArrowIpcSinkOptions) -> PartFiles<IpcPart> {
    PartFiles {
        format: IpcPart {
            format: options.format,
            compression: options.compression,
        },
        target_file_bytes: options.target_file_bytes,
    }
}
