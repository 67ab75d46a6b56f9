//! The fused program against the expression evaluator, on random chains of
//! random expressions over columns with nulls, NaN, -0.0 and extreme
//! integers. A failure prints its seed; `STRATA_SIM_SEED=<n>` replays one.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use arrow_select::filter::filter_record_batch;

use super::interp;
use super::*;
use crate::job::NamedExpr;

/// splitmix64: enough randomness for expression shapes, seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const ROWS: usize = 300;

fn input(rng: &mut Rng) -> RecordBatch {
    let ints = [
        0,
        1,
        -1,
        2,
        3,
        7,
        100,
        -100,
        i64::MAX,
        i64::MIN,
        1 << 40,
        -(1 << 33),
    ];
    let floats = [
        0.0,
        -0.0,
        1.5,
        -2.25,
        f64::NAN,
        -f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e300,
        3.0,
    ];
    let a: Int64Array = (0..ROWS)
        .map(|_| (rng.below(6) != 0).then(|| ints[rng.below(ints.len() as u64) as usize]))
        .collect();
    let b: Int64Array = (0..ROWS).map(|_| Some(rng.below(21) as i64 - 10)).collect();
    let x: Float64Array = (0..ROWS)
        .map(|_| (rng.below(5) != 0).then(|| floats[rng.below(floats.len() as u64) as usize]))
        .collect();
    let s: StringArray = (0..ROWS).map(|i| Some(format!("row{i}"))).collect();
    let schema = Schema::new(vec![
        Field::new("a", DataType::Int64, true),
        Field::new("b", DataType::Int64, false),
        Field::new("x", DataType::Float64, true),
        Field::new("s", DataType::Utf8, false),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![Arc::new(a), Arc::new(b), Arc::new(x), Arc::new(s)],
    )
    .unwrap()
}

fn numeric(rng: &mut Rng, columns: &[(String, DataType)], depth: u32) -> Expr {
    let numeric_columns: Vec<&String> = columns
        .iter()
        .filter(|(_, t)| matches!(t, DataType::Int64 | DataType::Float64))
        .map(|(n, _)| n)
        .collect();
    if numeric_columns.is_empty() {
        return Expr::Literal(ScalarValue::Int64(rng.below(9) as i64 - 4));
    }
    if depth == 0 || rng.below(3) == 0 {
        return match rng.below(6) {
            0 => Expr::Literal(ScalarValue::Int64(rng.below(9) as i64 - 4)),
            1 => Expr::Literal(ScalarValue::Float64((rng.below(9) as f64 - 4.0) * 0.5)),
            2 if rng.below(4) == 0 => Expr::Literal(ScalarValue::Null),
            _ => Expr::Column(
                numeric_columns[rng.below(numeric_columns.len() as u64) as usize].clone(),
            ),
        };
    }
    if rng.below(8) == 0 {
        return Expr::Neg(Box::new(numeric(rng, columns, depth - 1)));
    }
    let op = [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Mod][rng.below(5) as usize];
    Expr::Binary {
        op,
        left: Box::new(numeric(rng, columns, depth - 1)),
        right: Box::new(numeric(rng, columns, depth - 1)),
    }
}

fn predicate(rng: &mut Rng, columns: &[(String, DataType)], depth: u32) -> Expr {
    if depth > 0 && rng.below(3) == 0 {
        if rng.below(4) == 0 {
            return Expr::Not(Box::new(predicate(rng, columns, depth - 1)));
        }
        let op = if rng.below(2) == 0 {
            BinOp::And
        } else {
            BinOp::Or
        };
        return Expr::Binary {
            op,
            left: Box::new(predicate(rng, columns, depth - 1)),
            right: Box::new(predicate(rng, columns, depth - 1)),
        };
    }
    let op = [
        BinOp::Eq,
        BinOp::NotEq,
        BinOp::Lt,
        BinOp::LtEq,
        BinOp::Gt,
        BinOp::GtEq,
    ][rng.below(6) as usize];
    Expr::Binary {
        op,
        left: Box::new(numeric(rng, columns, 2)),
        right: Box::new(numeric(rng, columns, 1)),
    }
}

/// What the operators compute, step by step, with the evaluator.
fn evaluate(
    steps: &[ChainStep<'_>],
    batch: &RecordBatch,
    schemas: &[SchemaRef],
) -> Result<RecordBatch, String> {
    let mut batch = batch.clone();
    for (step, schema) in steps.iter().zip(schemas) {
        batch = match step {
            ChainStep::Filter { predicate, .. } => {
                let mask = predicate.eval(&batch).map_err(|e| e.to_string())?;
                filter_record_batch(&batch, mask.as_boolean()).unwrap()
            }
            ChainStep::Project { columns, .. } => {
                let arrays = columns
                    .iter()
                    .map(|c| c.expr.eval(&batch).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<ArrayRef>, String>>()?;
                let options =
                    arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                RecordBatch::try_new_with_options(Arc::clone(schema), arrays, &options).unwrap()
            }
        };
    }
    Ok(batch)
}

enum Owned {
    Filter(Expr),
    Project(Vec<NamedExpr>),
}

fn random_chain(rng: &mut Rng, schema: &SchemaRef) -> (Vec<Owned>, Vec<SchemaRef>) {
    let mut columns: Vec<(String, DataType)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let mut current = Arc::clone(schema);
    let (mut steps, mut schemas) = (Vec::new(), Vec::new());
    for _ in 0..1 + rng.below(3) {
        if rng.below(2) == 0 {
            let p = predicate(rng, &columns, 2);
            if p.data_type(&current).is_err() {
                continue;
            }
            steps.push(Owned::Filter(p));
            schemas.push(Arc::clone(&current));
        } else {
            let mut list = vec![];
            for (i, (name, _)) in columns.iter().enumerate() {
                if rng.below(3) != 0 {
                    list.push(NamedExpr {
                        name: format!("p{}_{i}", steps.len()),
                        expr: Expr::Column(name.clone()),
                    });
                }
            }
            for k in 0..1 + rng.below(3) {
                let expr = if rng.below(4) == 0 {
                    predicate(rng, &columns, 1)
                } else {
                    numeric(rng, &columns, 3)
                };
                list.push(NamedExpr {
                    name: format!("e{}_{k}", steps.len()),
                    expr,
                });
            }
            let fields: Result<Vec<Field>, _> = list
                .iter()
                .map(|c| {
                    c.expr
                        .data_type(&current)
                        .map(|t| Field::new(&c.name, t, true))
                })
                .collect();
            let Ok(fields) = fields else { continue };
            current = Arc::new(Schema::new(fields));
            columns = current
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect();
            steps.push(Owned::Project(list));
            schemas.push(Arc::clone(&current));
        }
    }
    (steps, schemas)
}

fn borrowed(steps: &[Owned]) -> Vec<ChainStep<'_>> {
    steps
        .iter()
        .map(|s| match s {
            Owned::Filter(p) => ChainStep::Filter {
                name: "f",
                predicate: p,
            },
            Owned::Project(c) => ChainStep::Project {
                name: "p",
                columns: c,
            },
        })
        .collect()
}

fn same(expected: &RecordBatch, actual: &RecordBatch) -> Result<(), String> {
    if expected.num_rows() != actual.num_rows() || expected.num_columns() != actual.num_columns() {
        return Err(format!(
            "shape {}x{} vs {}x{}",
            expected.num_rows(),
            expected.num_columns(),
            actual.num_rows(),
            actual.num_columns()
        ));
    }
    for c in 0..expected.num_columns() {
        let (e, a) = (expected.column(c), actual.column(c));
        if let (Some(e), Some(a)) = (
            e.as_primitive_opt::<arrow_array::types::Float64Type>(),
            a.as_primitive_opt::<arrow_array::types::Float64Type>(),
        ) {
            for r in 0..e.len() {
                let equal = e.is_valid(r) == a.is_valid(r)
                    && (e.is_null(r)
                        || e.value(r).to_bits() == a.value(r).to_bits()
                        || (e.value(r).is_nan() && a.value(r).is_nan()));
                if !equal {
                    return Err(format!(
                        "column {c} row {r}: {:x} vs {:x}",
                        e.value(r).to_bits(),
                        a.value(r).to_bits()
                    ));
                }
            }
            continue;
        }
        if e.to_data() != a.to_data() && format!("{e:?}") != format!("{a:?}") {
            return Err(format!("column {c}: {e:?} vs {a:?}"));
        }
    }
    Ok(())
}

use arrow_array::Array;

#[test]
fn fused_chains_equal_the_evaluator_on_random_programs() {
    let seeds: Vec<u64> = match std::env::var("STRATA_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("STRATA_SIM_SEED is a number")],
        Err(_) => (0..1500).collect(),
    };
    let (mut fused, mut errors) = (0, 0);
    for seed in seeds {
        let mut rng = Rng(seed);
        let batch = input(&mut rng);
        let (steps, schemas) = random_chain(&mut rng, batch.schema_ref());
        if steps.is_empty() {
            continue;
        }
        let chain = borrowed(&steps);
        let output = schemas.last().unwrap();
        let Ok(program) = ChainProgram::compile(batch.schema_ref(), &chain, output) else {
            continue;
        };
        fused += 1;
        let expected = evaluate(&chain, &batch, &schemas);
        let actual = interp::run(&program, &batch)
            .map(|o| o.batch)
            .map_err(|e| e.to_string());
        match (expected, actual) {
            (Ok(e), Ok(a)) => {
                if let Err(diff) = same(&e, &a) {
                    panic!("seed={seed}: {diff}\nprogram {:?}", program.instrs);
                }
            }
            (Err(e), Err(a)) => {
                errors += 1;
                assert_eq!(e, a, "seed={seed}");
            }
            (e, a) => panic!(
                "seed={seed}: evaluator {:?} vs fused {:?}\nprogram {:?}",
                e.map(|b| b.num_rows()),
                a.map(|b| b.num_rows()),
                program.instrs
            ),
        }
    }
    assert!(fused > 500, "only {fused} chains fused");
    assert!(errors > 10, "only {errors} chains failed: faults untested");
}

/// `predicate` as a one-filter chain over `batch`'s columns.
fn filter_program(batch: &RecordBatch, predicate: &Expr) -> Result<ChainProgram, String> {
    let steps = [ChainStep::Filter {
        name: "f",
        predicate,
    }];
    ChainProgram::compile(batch.schema_ref(), &steps, batch.schema_ref())
}

#[test]
fn unread_columns_pass_through_as_host_columns() {
    let batch = input(&mut Rng(7));
    let predicate = crate::job::Expr::parse("a > 0 and x < 2.0").unwrap();
    let steps = [ChainStep::Filter {
        name: "f",
        predicate: &predicate,
    }];
    let program = filter_program(&batch, &predicate).unwrap();
    assert!(program.needs_row_ids());
    assert_eq!(
        program.device_inputs(),
        vec![0, 2],
        "a and x on the device; b, unread, is gathered on the host like s"
    );
    let out = interp::run(&program, &batch).unwrap().batch;
    let expected = evaluate(&steps, &batch, &[batch.schema()]).unwrap();
    same(&expected, &out).unwrap();
}

#[test]
fn unsupported_shapes_say_why() {
    let batch = input(&mut Rng(7));
    let predicate = crate::job::Expr::parse("s = 'row1'").unwrap();
    let error = filter_program(&batch, &predicate).unwrap_err();
    assert!(
        error.contains("`s`") || error.contains("strings"),
        "{error}"
    );
}

#[test]
fn generated_source_has_the_three_kernels_and_no_trap() {
    let batch = input(&mut Rng(3));
    let predicate = crate::job::Expr::parse("a * b > 10 or x / 2.0 <= -1.0").unwrap();
    let program = filter_program(&batch, &predicate).unwrap();
    let source = cuda_src::cuda_source(&program);
    for kernel in ["chain_count", "chain_scan", "chain_write"] {
        assert!(source.contains(&format!("void {kernel}(")), "{source}");
    }
    assert!(!source.contains("__trap"));
    assert!(source.contains("__mul64hi"), "checked multiply");
}

/// Writes the harness's input file: the row count, then each device input
/// column's 8-byte values and one validity byte per row.
fn harness_input(program: &ChainProgram, batch: &RecordBatch, path: &std::path::Path) {
    let mut bytes = (batch.num_rows() as u64).to_le_bytes().to_vec();
    for c in program.device_inputs() {
        let column = batch.column(c as usize);
        let data = column.to_data();
        let values =
            &data.buffers()[0].as_slice()[data.offset() * 8..(data.offset() + data.len()) * 8];
        bytes.extend_from_slice(values);
        bytes.extend((0..column.len()).map(|r| u8::from(column.is_valid(r))));
    }
    std::fs::write(path, bytes).unwrap();
}

/// Compares the harness's rows with the host twin's output; `Err` says how
/// they differ.
fn compare_harness(
    program: &ChainProgram,
    printed: &str,
    twin: &Result<ChainOutput, ChainError>,
) -> Result<(), String> {
    let mut lines: Vec<&str> = printed.lines().collect();
    let fault_line = lines.pop().ok_or("no output")?;
    let fault_word = u64::from_str_radix(fault_line.trim_start_matches("fault "), 16)
        .map_err(|e| format!("{fault_line}: {e}"))?;
    let output = match twin {
        Err(error) => {
            let Some((instr, row, zero)) = cuda_src::decode_fault(fault_word) else {
                return Err(format!(
                    "the twin failed ({error}), the generated code did not"
                ));
            };
            let kind = if zero {
                Fault::DivideByZero
            } else {
                Fault::Overflow
            };
            let generated = program.fault(instr, row, kind);
            if generated.to_string() != error.to_string() || generated.row != error.row {
                return Err(format!(
                    "faults differ: generated {generated} at row {}, twin {error} at row {}",
                    generated.row, error.row
                ));
            }
            return Ok(());
        }
        Ok(output) => output,
    };
    if fault_word != cuda_src::NO_FAULT {
        return Err(format!(
            "the generated code faulted ({fault_word:x}), the twin did not"
        ));
    }
    let survivors: Vec<&str> = lines.into_iter().filter(|l| l.starts_with('1')).collect();
    if survivors.len() != output.batch.num_rows() {
        return Err(format!(
            "{} survivors vs the twin's {}",
            survivors.len(),
            output.batch.num_rows()
        ));
    }
    let device_columns: Vec<usize> = program
        .outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, OutputSource::Device(_)))
        .map(|(i, _)| i)
        .collect();
    for (row, line) in survivors.iter().enumerate() {
        let fields: Vec<&str> = line.split(' ').skip(1).collect();
        for (k, &column) in device_columns.iter().enumerate() {
            let array = output.batch.column(column);
            let valid = fields[2 * k] == "1";
            if valid != array.is_valid(row) {
                return Err(format!("row {row} column {column}: validity {valid}"));
            }
            if !valid {
                continue;
            }
            let bits = u64::from_str_radix(fields[2 * k + 1], 16).unwrap();
            let same = if let Some(f) = array.as_primitive_opt::<arrow_array::types::Float64Type>()
            {
                let (g, t) = (f64::from_bits(bits), f.value(row));
                g.to_bits() == t.to_bits() || (g.is_nan() && t.is_nan())
            } else if let Some(i) = array.as_primitive_opt::<arrow_array::types::Int64Type>() {
                bits as i64 == i.value(row)
            } else {
                (bits != 0) == array.as_boolean().value(row)
            };
            if !same {
                return Err(format!(
                    "row {row} column {column}: generated bits {bits:x}"
                ));
            }
        }
        if let Some(targets) = &output.targets {
            let printed = fields
                .last()
                .and_then(|f| f.strip_prefix('t'))
                .and_then(|t| t.parse::<u32>().ok());
            if printed != Some(targets[row]) {
                return Err(format!(
                    "row {row}: generated target {printed:?}, the CPU hash says {}",
                    targets[row]
                ));
            }
        }
    }
    Ok(())
}

/// Routes `program` by its first one or two numeric device outputs, when
/// it has any (a `key_by` after the chain).
fn routed(program: ChainProgram, seed: u64) -> ChainProgram {
    let keys: Vec<usize> = program
        .outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| match o {
            OutputSource::Device(reg) => program.types[*reg as usize] != ValueType::Bool,
            OutputSource::Host(_) => false,
        })
        .map(|(i, _)| i)
        .take(1 + (seed % 2) as usize)
        .collect();
    if keys.is_empty() {
        return program;
    }
    program
        .with_route(Route {
            key_columns: keys,
            max_parallelism: 128,
            parallelism: 7,
        })
        .expect("numeric device outputs route")
}

/// The generated per-row CUDA text, compiled as host C++ with the few
/// intrinsics it uses defined, computes what the host twin computes on
/// random chains: survivors, values bit for bit, and the same first fault.
/// This machine has no GPU; the scan and ordered write around that code are
/// checked on a GPU by `tests/gpu_kernels.rs`.
#[test]
fn generated_row_code_compiled_for_the_host_equals_the_twin() {
    let cxx = ["c++", "g++", "clang++"].into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(cxx) = cxx else {
        println!("skipped: no C++ compiler");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<u64> = match std::env::var("STRATA_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("STRATA_SIM_SEED is a number")],
        Err(_) => (0..400).step_by(13).collect(),
    };
    let (mut checked, mut routes) = (0, 0);
    for seed in seeds {
        let mut rng = Rng(seed);
        let batch = input(&mut rng);
        let (steps, schemas) = random_chain(&mut rng, batch.schema_ref());
        if steps.is_empty() {
            continue;
        }
        let chain = borrowed(&steps);
        let Ok(program) =
            ChainProgram::compile(batch.schema_ref(), &chain, schemas.last().unwrap())
        else {
            continue;
        };
        let program = routed(program, seed);
        routes += usize::from(program.route.is_some());
        let source = dir.path().join(format!("h{seed}.cpp"));
        let binary = dir.path().join(format!("h{seed}"));
        let data = dir.path().join(format!("h{seed}.bin"));
        std::fs::write(&source, cuda_src::host_harness(&program)).unwrap();
        let built = std::process::Command::new(cxx)
            .args(["-std=c++17", "-O1", "-ffp-contract=off", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "seed={seed}: {}\n{}",
            String::from_utf8_lossy(&built.stderr),
            std::fs::read_to_string(&source).unwrap()
        );
        harness_input(&program, &batch, &data);
        let ran = std::process::Command::new(&binary)
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "seed={seed}: harness exit {:?}",
            ran.status
        );
        let twin = interp::run(&program, &batch);
        if let Err(diff) = compare_harness(&program, &String::from_utf8_lossy(&ran.stdout), &twin) {
            panic!("seed={seed}: {diff}\nprogram {:?}", program.instrs);
        }
        checked += 1;
    }
    assert!(checked > 10, "only {checked} programs checked");
    assert!(routes > 5, "only {routes} programs routed");
}
