//! The host twin of a fused chain: the program run one instruction at a
//! time over all rows, with the same per-row rules as the generated CUDA
//! (`cuda_src`). The simulated GPU backend computes with it; the GPU
//! equality tests compare the device's results with it and with the
//! expression evaluator.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, RecordBatchOptions,
    UInt32Array,
};
use arrow_buffer::{BooleanBuffer, NullBuffer};

use super::{
    Arith, ChainError, ChainOutput, ChainProgram, Cmp, Const, Fault, Instr, OutputSource,
    total_order_key,
};

/// The values of one register.
enum Values {
    I64(Vec<i64>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    /// `Keep` defines no value.
    Unit,
}

struct Register {
    values: Values,
    valid: Vec<bool>,
}

/// Runs `program` over `input` (whose schema is the program's input
/// schema): the surviving rows with the output columns.
pub fn run(program: &ChainProgram, input: &RecordBatch) -> Result<ChainOutput, ChainError> {
    let rows = input.num_rows();
    let mut alive = vec![true; rows];
    let mut regs: Vec<Register> = Vec::with_capacity(program.instrs.len());
    let mut keep_rows = Vec::new();
    for (index, instr) in program.instrs.iter().enumerate() {
        let register = step(program, index, *instr, input, &regs, &mut alive)?;
        regs.push(register);
        if matches!(instr, Instr::Keep { .. }) {
            keep_rows.push(alive.iter().filter(|a| **a).count() as u64);
        }
    }
    let row_ids: Vec<u32> = (0..rows as u32).filter(|&r| alive[r as usize]).collect();
    let arrays = program
        .outputs
        .iter()
        .map(|output| match output {
            OutputSource::Device(reg) => gather(&regs[*reg as usize], &row_ids),
            OutputSource::Host(column) => {
                let ids = UInt32Array::from(row_ids.clone());
                arrow_select::take::take(input.column(*column as usize).as_ref(), &ids, None)
                    .expect("row numbers are in range")
            }
        })
        .collect();
    let options = RecordBatchOptions::new().with_row_count(Some(row_ids.len()));
    let batch =
        RecordBatch::try_new_with_options(Arc::clone(&program.output_schema), arrays, &options)
            .expect("outputs match the program's output schema");
    let targets = program.route.as_ref().map(|route| targets(route, &batch));
    Ok(ChainOutput {
        step_rows: program.step_rows(rows as u64, &keep_rows),
        batch,
        targets,
        traffic: None,
    })
}

/// The target subtask of each row, by the CPU's stable hash of the key
/// columns (what `network::partition::HashSplitter` computes).
pub fn targets(route: &super::Route, batch: &RecordBatch) -> Vec<u32> {
    let keys: Vec<ArrayRef> = route
        .key_columns
        .iter()
        .map(|&c| Arc::clone(batch.column(c)))
        .collect();
    let mut hashes = Vec::new();
    crate::kernels::cpu::hash::hash_columns(&keys, &mut hashes)
        .expect("route keys are Int64 or Float64");
    hashes
        .iter()
        .map(|&h| {
            crate::kernels::cpu::hash::subtask_for_hash(h, route.max_parallelism, route.parallelism)
        })
        .collect()
}

fn gather(register: &Register, row_ids: &[u32]) -> ArrayRef {
    let nulls = NullBuffer::from(
        row_ids
            .iter()
            .map(|&r| register.valid[r as usize])
            .collect::<Vec<bool>>(),
    );
    let nulls = (nulls.null_count() > 0).then_some(nulls);
    match &register.values {
        Values::I64(v) => Arc::new(Int64Array::new(
            row_ids.iter().map(|&r| v[r as usize]).collect(),
            nulls,
        )),
        Values::F64(v) => Arc::new(Float64Array::new(
            row_ids.iter().map(|&r| v[r as usize]).collect(),
            nulls,
        )),
        Values::Bool(v) => Arc::new(BooleanArray::new(
            BooleanBuffer::from_iter(row_ids.iter().map(|&r| v[r as usize])),
            nulls,
        )),
        Values::Unit => unreachable!("a Keep is never an output"),
    }
}

fn validity(array: &dyn Array) -> Vec<bool> {
    (0..array.len()).map(|r| array.is_valid(r)).collect()
}

fn step(
    program: &ChainProgram,
    index: usize,
    instr: Instr,
    input: &RecordBatch,
    regs: &[Register],
    alive: &mut [bool],
) -> Result<Register, ChainError> {
    let rows = input.num_rows();
    let reg = |r: u32| &regs[r as usize];
    let both = |a: &Register, b: &Register| -> Vec<bool> {
        a.valid
            .iter()
            .zip(&b.valid)
            .map(|(x, y)| *x && *y)
            .collect()
    };
    Ok(match instr {
        Instr::Load { column } => {
            let array = input.column(column as usize);
            let values = match array.data_type() {
                arrow_schema::DataType::Int64 => {
                    Values::I64(array.as_primitive::<Int64Type>().values().to_vec())
                }
                _ => Values::F64(array.as_primitive::<Float64Type>().values().to_vec()),
            };
            Register {
                values,
                valid: validity(array.as_ref()),
            }
        }
        Instr::Const { value } => {
            let ty = program.types[index];
            let (values, valid) = match value {
                Const::I64(v) => (Values::I64(vec![v; rows]), true),
                Const::F64(v) => (Values::F64(vec![v; rows]), true),
                Const::Bool(v) => (Values::Bool(vec![v; rows]), true),
                Const::Null => (
                    match ty {
                        super::ValueType::I64 => Values::I64(vec![0; rows]),
                        super::ValueType::F64 => Values::F64(vec![0.0; rows]),
                        super::ValueType::Bool => Values::Bool(vec![false; rows]),
                    },
                    false,
                ),
            };
            Register {
                values,
                valid: vec![valid; rows],
            }
        }
        Instr::ToF64 { a } => match &reg(a).values {
            Values::I64(v) => Register {
                values: Values::F64(v.iter().map(|x| *x as f64).collect()),
                valid: reg(a).valid.clone(),
            },
            _ => unreachable!("ToF64 reads an Int64"),
        },
        Instr::Arith { op, a, b } => {
            let valid = both(reg(a), reg(b));
            let values = match (&reg(a).values, &reg(b).values) {
                (Values::I64(x), Values::I64(y)) => {
                    let mut out = vec![0i64; rows];
                    for r in 0..rows {
                        if !valid[r] {
                            continue;
                        }
                        match checked_i64(op, x[r], y[r]) {
                            Ok(v) => out[r] = v,
                            Err(fault) if alive[r] => {
                                return Err(program.fault(index, r as u64, fault));
                            }
                            Err(_) => {}
                        }
                    }
                    Values::I64(out)
                }
                (Values::F64(x), Values::F64(y)) => Values::F64(
                    x.iter()
                        .zip(y)
                        .map(|(x, y)| match op {
                            Arith::Add => x + y,
                            Arith::Sub => x - y,
                            Arith::Mul => x * y,
                            Arith::Div => x / y,
                            Arith::Rem => x % y,
                        })
                        .collect(),
                ),
                _ => unreachable!("arithmetic on equal numeric types"),
            };
            Register { values, valid }
        }
        Instr::Neg { a } => {
            let valid = reg(a).valid.clone();
            let values = match &reg(a).values {
                Values::I64(x) => {
                    let mut out = vec![0i64; rows];
                    for r in 0..rows {
                        if !valid[r] {
                            continue;
                        }
                        match x[r].checked_neg() {
                            Some(v) => out[r] = v,
                            None if alive[r] => {
                                return Err(program.fault(index, r as u64, Fault::Overflow));
                            }
                            None => {}
                        }
                    }
                    Values::I64(out)
                }
                Values::F64(x) => Values::F64(x.iter().map(|v| -v).collect()),
                _ => unreachable!("negation of a number"),
            };
            Register { values, valid }
        }
        Instr::Cmp { op, a, b } => {
            let valid = both(reg(a), reg(b));
            let ordering: Vec<std::cmp::Ordering> = match (&reg(a).values, &reg(b).values) {
                (Values::I64(x), Values::I64(y)) => {
                    x.iter().zip(y).map(|(x, y)| x.cmp(y)).collect()
                }
                (Values::F64(x), Values::F64(y)) => x
                    .iter()
                    .zip(y)
                    .map(|(x, y)| total_order_key(*x).cmp(&total_order_key(*y)))
                    .collect(),
                (Values::Bool(x), Values::Bool(y)) => {
                    x.iter().zip(y).map(|(x, y)| x.cmp(y)).collect()
                }
                _ => unreachable!("comparison of equal types"),
            };
            let values = ordering
                .into_iter()
                .map(|o| match op {
                    Cmp::Eq => o.is_eq(),
                    Cmp::Ne => o.is_ne(),
                    Cmp::Lt => o.is_lt(),
                    Cmp::Le => o.is_le(),
                    Cmp::Gt => o.is_gt(),
                    Cmp::Ge => o.is_ge(),
                })
                .collect();
            Register {
                values: Values::Bool(values),
                valid,
            }
        }
        Instr::And { a, b } | Instr::Or { a, b } => {
            let is_and = matches!(instr, Instr::And { .. });
            let (Values::Bool(x), Values::Bool(y)) = (&reg(a).values, &reg(b).values) else {
                unreachable!("logic on booleans")
            };
            let (xv, yv) = (&reg(a).valid, &reg(b).valid);
            let mut values = vec![false; rows];
            let mut valid = vec![false; rows];
            for r in 0..rows {
                (values[r], valid[r]) = kleene(is_and, (x[r], xv[r]), (y[r], yv[r]));
            }
            Register {
                values: Values::Bool(values),
                valid,
            }
        }
        Instr::Not { a } => {
            let Values::Bool(x) = &reg(a).values else {
                unreachable!("not of a boolean")
            };
            Register {
                values: Values::Bool(x.iter().map(|v| !v).collect()),
                valid: reg(a).valid.clone(),
            }
        }
        Instr::Keep { a } => {
            let Values::Bool(x) = &reg(a).values else {
                unreachable!("keep reads a boolean")
            };
            for r in 0..rows {
                alive[r] = alive[r] && reg(a).valid[r] && x[r];
            }
            Register {
                values: Values::Unit,
                valid: Vec::new(),
            }
        }
    })
}

/// Checked Int64 arithmetic with Arrow's rules: `%` by -1 is 0 (never an
/// overflow), division by zero is its own fault.
pub fn checked_i64(op: Arith, x: i64, y: i64) -> Result<i64, Fault> {
    match op {
        Arith::Add => x.checked_add(y).ok_or(Fault::Overflow),
        Arith::Sub => x.checked_sub(y).ok_or(Fault::Overflow),
        Arith::Mul => x.checked_mul(y).ok_or(Fault::Overflow),
        Arith::Div if y == 0 => Err(Fault::DivideByZero),
        Arith::Div => x.checked_div(y).ok_or(Fault::Overflow),
        Arith::Rem if y == 0 => Err(Fault::DivideByZero),
        Arith::Rem => Ok(x.wrapping_rem(y)),
    }
}

/// SQL's three-valued `and`/`or` of `(value, valid)` pairs.
pub fn kleene(is_and: bool, (x, xv): (bool, bool), (y, yv): (bool, bool)) -> (bool, bool) {
    if is_and {
        let false_side = (xv && !x) || (yv && !y);
        (!false_side && xv && yv, false_side || (xv && yv))
    } else {
        let true_side = (xv && x) || (yv && y);
        (true_side, true_side || (xv && yv))
    }
}
