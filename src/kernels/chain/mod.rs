//! Fused operator chains: a run of filters and projections compiled into
//! one program that a device runs in one pass over the rows.
//!
//! Placement puts a chain of consecutive filters and projections on the GPU
//! as a whole (`placement::gpu_chains`). Instead of one launch, one upload
//! and one download per expression node, the chain is compiled once per
//! task into a [`ChainProgram`]: a flat, typed register program over the
//! chain's input columns (SSA: instruction `i` defines register `i`). The
//! program is the single source of the chain's semantics on every tier:
//!
//! - [`cuda_src`] generates one CUDA module from it (three kernels: count
//!   the surviving rows per block, scan the counts, write the survivors in
//!   order), which NVRTC compiles and the kernel cache keeps;
//! - [`interp`] runs it on the host, column at a time: the simulated GPU
//!   backend's "device", and the twin the CUDA results are checked against.
//!
//! Both agree with the expression evaluator (`job::eval`), which the
//! property tests hold them to: nulls propagate, `and`/`or`/`not` follow
//! SQL's three-valued logic, Float64 compares by Arrow's total order with
//! one NaN (every NaN equal, above every number; -0.0 below 0.0), Int64 arithmetic
//! is checked (overflow and division by zero fail the batch with the
//! evaluator's own error, naming the subexpression), Float64 follows IEEE
//! 754 (the generated code is compiled without FMA contraction). A row that
//! an earlier filter of the chain dropped raises no error, exactly as it
//! never reaches the later operators on the CPU; among several failures the
//! first instruction in evaluation order wins, then the lowest row, which
//! is the error the column-at-a-time evaluator meets first.
//!
//! What fuses: Int64 and Float64 columns, Int64/Float64/Boolean/null
//! literals, `+ - * / %`, unary `-`, the six comparisons, `and`, `or`,
//! `not`. Output columns that pass through the chain unread (a string
//! column, or a number no expression uses) are "host columns": the device
//! returns the surviving row numbers and the host gathers them, so only
//! the columns the chain reads cross the link.
//! Anything else keeps the chain on the CPU, with the reason in `explain`.

pub mod cuda_src;
pub mod interp;
mod traffic;

pub use traffic::{DeviceTraffic, bitmap_word_bytes};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_schema::{DataType, SchemaRef};

use crate::job::{BinOp, Expr, ExprError, NamedExpr, ScalarValue};

/// The value type of a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    I64,
    F64,
    Bool,
}

impl ValueType {
    fn of(data_type: &DataType) -> Option<ValueType> {
        match data_type {
            DataType::Int64 => Some(ValueType::I64),
            DataType::Float64 => Some(ValueType::F64),
            DataType::Boolean => Some(ValueType::Bool),
            _ => None,
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            ValueType::I64 => DataType::Int64,
            ValueType::F64 => DataType::Float64,
            ValueType::Bool => DataType::Boolean,
        }
    }

    /// Bytes of one value on the device (a Boolean is a bit; counted as a
    /// byte by the cost model's row weight).
    pub fn value_bytes(self) -> usize {
        match self {
            ValueType::I64 | ValueType::F64 => 8,
            ValueType::Bool => 1,
        }
    }
}

/// A register: the index of the instruction that defines it.
pub type Reg = u32;

/// A constant; `Null` is a null of the register's type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Const {
    I64(i64),
    F64(f64),
    Bool(bool),
    Null,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One step of a program; instruction `i` defines register `i` (a `Keep`
/// defines none: its register is never read).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instr {
    /// Input column `column` of the chain's input batch.
    Load {
        column: u32,
    },
    Const {
        value: Const,
    },
    /// Int64 to Float64, rounding to nearest (Arrow's cast).
    ToF64 {
        a: Reg,
    },
    Arith {
        op: Arith,
        a: Reg,
        b: Reg,
    },
    Neg {
        a: Reg,
    },
    Cmp {
        op: Cmp,
        a: Reg,
        b: Reg,
    },
    And {
        a: Reg,
        b: Reg,
    },
    Or {
        a: Reg,
        b: Reg,
    },
    Not {
        a: Reg,
    },
    /// Rows where `a` is not true (false or null) leave the chain here.
    Keep {
        a: Reg,
    },
}

/// How a checked Int64 instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Overflow,
    DivideByZero,
}

/// An instruction failed on a row: the evaluator's error for the same
/// subexpression, with the operator that owns it.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct ChainError {
    pub operator: String,
    pub row: u64,
    pub detail: ExprError,
}

/// What a device batch of a chain gives back.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainOutput {
    /// The surviving rows with the output columns, in input order.
    pub batch: arrow_array::RecordBatch,
    /// Rows alive after each operator of the chain (the last is the
    /// batch's row count), so each operator's metrics stay its own.
    pub step_rows: Vec<u64>,
    /// Each row's target subtask, when the program routes ([`Route`]).
    pub targets: Option<Vec<u32>>,
    /// What the batch really cost the device, where the backend measured
    /// it (the CUDA executor adapts its downloads and waits); `None`: its
    /// [`DeviceTraffic::plan`].
    pub traffic: Option<DeviceTraffic>,
}

impl ChainOutput {
    /// Two adjacent device batches as one.
    pub fn join(self, other: ChainOutput) -> Result<ChainOutput, arrow_schema::ArrowError> {
        let batch =
            arrow_select::concat::concat_batches(&self.batch.schema(), &[self.batch, other.batch])?;
        let step_rows = self
            .step_rows
            .iter()
            .zip(&other.step_rows)
            .map(|(a, b)| a + b)
            .collect();
        let targets = match (self.targets, other.targets) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            _ => None,
        };
        let traffic = match (self.traffic, other.traffic) {
            (Some(a), Some(b)) => Some(DeviceTraffic {
                rows: a.rows + b.rows,
                h2d_bytes: a.h2d_bytes + b.h2d_bytes,
                d2h_bytes: a.d2h_bytes + b.d2h_bytes,
                launches: a.launches + b.launches,
                syncs: a.syncs + b.syncs,
                device_bytes: a.device_bytes.max(b.device_bytes),
            }),
            _ => None,
        };
        Ok(ChainOutput {
            batch,
            step_rows,
            targets,
            traffic,
        })
    }
}

/// Where an output column comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputSource {
    /// A register computed on the device.
    Device(Reg),
    /// An input column of a type the device does not hold, gathered on the
    /// host by the surviving row numbers.
    Host(u32),
}

/// How the `key_by` after a chain routes its rows: the device hashes the
/// key output columns with the stable hash (`kernels/hash.cuh`, the CPU's
/// `hash_columns` bit for bit) and computes each survivor's target subtask,
/// so the exchange only groups rows by target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Output columns of the key, in key order.
    pub key_columns: Vec<usize>,
    pub max_parallelism: u32,
    pub parallelism: u32,
}

/// A compiled chain.
#[derive(Clone, Debug)]
pub struct ChainProgram {
    pub input_schema: SchemaRef,
    pub output_schema: SchemaRef,
    pub instrs: Vec<Instr>,
    /// The type of each register.
    pub types: Vec<ValueType>,
    /// The expression each checked instruction computes (its error names
    /// it), and the chain operator it belongs to.
    pub exprs: Vec<Option<String>>,
    pub instr_operator: Vec<u16>,
    pub operator_names: Vec<String>,
    pub outputs: Vec<OutputSource>,
    /// The survivors' target subtasks, computed on the device.
    pub route: Option<Route>,
    /// Permille of rows the program's last device batch kept, or
    /// [`KEPT_UNKNOWN`]: it sizes the next batch's download
    /// ([`ChainProgram::download`]). Shared by clones (they are the same
    /// program).
    kept_permille: Arc<AtomicU64>,
}

/// `ChainProgram::kept_permille` before any batch completed.
const KEPT_UNKNOWN: u64 = u64::MAX;

/// A filtering chain's download is sized before the survivors are counted:
/// the fraction the last batch kept, times this margin, plus
/// [`DOWNLOAD_SLACK_ROWS`]. One wait then covers the counts and the
/// results; a batch that keeps more than that downloads again after a
/// second wait.
pub const DOWNLOAD_MARGIN: f64 = 1.25;
/// Rows added to every predicted download, so that small batches and
/// selectivity jitter rarely need a second wait.
pub const DOWNLOAD_SLACK_ROWS: u64 = 1024;

/// Rows a device batch of `rows` downloads with its single wait when the
/// chain is expected to keep `kept_fraction` of them (see
/// [`DOWNLOAD_MARGIN`]); the cost model prices the same.
pub fn predicted_download_rows(rows: u64, kept_fraction: f64) -> u64 {
    let predicted = (rows as f64 * kept_fraction.clamp(0.0, 1.0) * DOWNLOAD_MARGIN).ceil() as u64;
    predicted.saturating_add(DOWNLOAD_SLACK_ROWS).min(rows)
}

/// Bytes a predicted download may bring back beyond the expected survivors
/// before a second wait is the cheaper way: about one wait's latency
/// (~10 µs) at a PCIe 4–5 copy's 25 GB/s.
pub const SINGLE_WAIT_MARGIN_BYTES: f64 = 256.0 * 1024.0;

/// How a device batch brings its outputs back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Download {
    /// The outputs of this many rows come back right behind the kernels,
    /// with the survivor count: one wait (a second only when more rows
    /// survive than that).
    Predicted(u64),
    /// Wait for the survivor count, then copy exactly the survivors: two
    /// waits, no byte more than needed.
    Counted,
}

/// The executor's and the cost model's choice for a batch of `rows`
/// expected to keep `kept_fraction`, whose outputs cost `row_bytes` a row
/// to bring back: predicted while the rows it downloads for nothing cost
/// less than a wait ([`SINGLE_WAIT_MARGIN_BYTES`]), counted beyond.
/// `None`: nothing is known yet (the chain's first batches): the whole
/// batch is the prediction, and its margin the whole batch.
pub fn download_plan(
    rows: u64,
    kept_fraction: Option<f64>,
    row_bytes: f64,
    filters: bool,
) -> Download {
    if !filters {
        return Download::Predicted(rows);
    }
    let Some(kept_fraction) = kept_fraction else {
        return if rows as f64 * row_bytes <= SINGLE_WAIT_MARGIN_BYTES {
            Download::Predicted(rows)
        } else {
            Download::Counted
        };
    };
    let predicted = predicted_download_rows(rows, kept_fraction);
    let expected = rows as f64 * kept_fraction.clamp(0.0, 1.0);
    if (predicted as f64 - expected).max(0.0) * row_bytes <= SINGLE_WAIT_MARGIN_BYTES {
        Download::Predicted(predicted)
    } else {
        Download::Counted
    }
}

/// One operator of a chain, as the compiler sees it.
#[derive(Clone, Copy, Debug)]
pub enum ChainStep<'a> {
    Filter {
        name: &'a str,
        predicate: &'a Expr,
    },
    Project {
        name: &'a str,
        columns: &'a [NamedExpr],
    },
}

impl ChainProgram {
    /// Compiles `steps` over `input_schema`, or says why the chain does
    /// not fuse (the reason `explain` prints).
    pub fn compile(
        input_schema: &SchemaRef,
        steps: &[ChainStep<'_>],
        output_schema: &SchemaRef,
    ) -> Result<ChainProgram, String> {
        let mut compiler = Compiler {
            program: ChainProgram {
                input_schema: Arc::clone(input_schema),
                output_schema: Arc::clone(output_schema),
                instrs: Vec::new(),
                types: Vec::new(),
                exprs: Vec::new(),
                instr_operator: Vec::new(),
                operator_names: Vec::new(),
                outputs: Vec::new(),
                route: None,
                kept_permille: Arc::new(AtomicU64::new(KEPT_UNKNOWN)),
            },
            loads: HashMap::new(),
            operator: 0,
        };
        // The columns in flight: name → device register or host input column.
        let mut columns: Vec<(String, ColumnAt)> = input_schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name().clone(), ColumnAt::Input(i as u32)))
            .collect();
        for (index, step) in steps.iter().enumerate() {
            compiler.operator = u16::try_from(index).map_err(|_| "chain too long".to_owned())?;
            match step {
                ChainStep::Filter { name, predicate } => {
                    compiler.program.operator_names.push((*name).to_owned());
                    let reg = compiler.expr(predicate, &columns)?;
                    if compiler.program.types[reg as usize] != ValueType::Bool {
                        return Err(format!("`{predicate}` is not a boolean predicate"));
                    }
                    compiler.push(Instr::Keep { a: reg }, ValueType::Bool, None);
                }
                ChainStep::Project {
                    name,
                    columns: list,
                } => {
                    compiler.program.operator_names.push((*name).to_owned());
                    let mut next = Vec::with_capacity(list.len());
                    for named in *list {
                        let at = match &named.expr {
                            Expr::Column(c) => lookup(&columns, c)?,
                            expr => ColumnAt::Reg(compiler.expr(expr, &columns)?),
                        };
                        next.push((named.name.clone(), at));
                    }
                    columns = next;
                }
            }
        }
        if columns.len() != output_schema.fields().len() {
            return Err("the chain's columns do not match its output schema".into());
        }
        for ((_, at), field) in columns.iter().zip(output_schema.fields()) {
            // A column that passes through unread stays on the host and is
            // gathered by the survivors' row numbers (4 bytes a row back
            // instead of its values up and down); one the chain reads is on
            // the device already.
            let source = match *at {
                ColumnAt::Reg(reg) => OutputSource::Device(reg),
                ColumnAt::Input(column) => match compiler.loads.get(&column) {
                    Some(reg) => OutputSource::Device(*reg),
                    None => OutputSource::Host(column),
                },
            };
            let produced = match source {
                OutputSource::Device(reg) => compiler.program.types[reg as usize].data_type(),
                OutputSource::Host(column) => {
                    input_schema.field(column as usize).data_type().clone()
                }
            };
            if &produced != field.data_type() {
                return Err(format!(
                    "column `{}` is {produced} in the chain but {} in its output",
                    field.name(),
                    field.data_type()
                ));
            }
            compiler.program.outputs.push(source);
        }
        Ok(compiler.program)
    }

    /// Routes the survivors by `route` on the device, or says why not:
    /// every key column must be computed there as Int64 or Float64.
    pub fn with_route(mut self, route: Route) -> Result<Self, String> {
        for &column in &route.key_columns {
            // A key that passes through unread goes to the device after all:
            // the hash reads it there.
            if let Some(OutputSource::Host(input)) = self.outputs.get(column).copied()
                && let Some(ty @ (ValueType::I64 | ValueType::F64)) =
                    ValueType::of(self.input_schema.field(input as usize).data_type())
            {
                let reg = self.instrs.len() as Reg;
                self.instrs.push(Instr::Load { column: input });
                self.types.push(ty);
                self.exprs.push(None);
                let last_operator = self.operator_names.len().saturating_sub(1) as u16;
                self.instr_operator.push(last_operator);
                self.outputs[column] = OutputSource::Device(reg);
            }
            match self.outputs.get(column) {
                Some(OutputSource::Device(reg))
                    if matches!(self.types[*reg as usize], ValueType::I64 | ValueType::F64) => {}
                _ => {
                    return Err(format!(
                        "key column `{}` is not an Int64 or Float64 column on the device",
                        self.output_schema
                            .fields()
                            .get(column)
                            .map_or("?", |f| f.name().as_str())
                    ));
                }
            }
        }
        if route.parallelism == 0 || route.max_parallelism < route.parallelism {
            return Err("the key_by's parallelism is out of range".into());
        }
        self.route = Some(route);
        Ok(self)
    }

    /// The operator each `Keep` belongs to, in instruction order: the
    /// device counts the rows alive after each.
    pub fn keep_steps(&self) -> Vec<u16> {
        self.instrs
            .iter()
            .zip(&self.instr_operator)
            .filter(|(i, _)| matches!(i, Instr::Keep { .. }))
            .map(|(_, op)| *op)
            .collect()
    }

    /// Rows alive after each operator from the rows alive after each
    /// `Keep` (`keep_rows`, in [`ChainProgram::keep_steps`] order).
    pub fn step_rows(&self, input_rows: u64, keep_rows: &[u64]) -> Vec<u64> {
        let keeps = self.keep_steps();
        (0..self.operator_names.len())
            .map(|step| {
                keeps
                    .iter()
                    .zip(keep_rows)
                    .filter(|(op, _)| usize::from(**op) <= step)
                    .map(|(_, rows)| *rows)
                    .next_back()
                    .unwrap_or(input_rows)
            })
            .collect()
    }

    /// How a device batch of `rows` brings its outputs back
    /// ([`download_plan`], with the fraction the last batch kept).
    pub fn download(&self, rows: u64) -> Download {
        download_plan(
            rows,
            self.kept_fraction(),
            self.download_bytes_per_row(),
            self.filters(),
        )
    }

    /// The fraction of rows the program's last device batch kept, if one
    /// completed.
    pub fn kept_fraction(&self) -> Option<f64> {
        match self.kept_permille.load(Ordering::Relaxed) {
            KEPT_UNKNOWN => None,
            permille => Some(permille as f64 / 1000.0),
        }
    }

    /// Bytes a surviving row brings back: each device output's values and
    /// validity bit, its row number when the host gathers columns, its
    /// target subtask when the chain routes.
    pub fn download_bytes_per_row(&self) -> f64 {
        let outputs: f64 = self
            .outputs
            .iter()
            .map(|o| match o {
                OutputSource::Device(reg) => match self.types[*reg as usize] {
                    ValueType::Bool => 2.0 / 8.0,
                    _ => 8.0 + 1.0 / 8.0,
                },
                OutputSource::Host(_) => 0.0,
            })
            .sum();
        let ids = if self.needs_row_ids() { 4.0 } else { 0.0 };
        let targets = if self.route.is_some() { 4.0 } else { 0.0 };
        outputs + ids + targets
    }

    /// A device batch of `rows` kept `survivors`: the next one's download
    /// is sized by it.
    pub fn observe_kept(&self, rows: u64, survivors: u64) {
        if rows > 0 {
            self.kept_permille.store(
                (survivors.min(rows) * 1000).div_ceil(rows),
                Ordering::Relaxed,
            );
        }
    }

    /// Whether any instruction drops rows.
    pub fn filters(&self) -> bool {
        self.instrs.iter().any(|i| matches!(i, Instr::Keep { .. }))
    }

    /// Whether the device returns the surviving row numbers (for host columns).
    pub fn needs_row_ids(&self) -> bool {
        self.outputs
            .iter()
            .any(|o| matches!(o, OutputSource::Host(_)))
    }

    /// The input columns the device reads, in column order: what a batch
    /// uploads.
    pub fn device_inputs(&self) -> Vec<u32> {
        let mut inputs: Vec<u32> = self
            .instrs
            .iter()
            .filter_map(|i| match i {
                Instr::Load { column } => Some(*column),
                _ => None,
            })
            .collect();
        inputs.sort_unstable();
        inputs.dedup();
        inputs
    }

    /// Bytes uploaded per input row (values and validity of each device
    /// input column).
    pub fn upload_bytes_per_row(&self) -> f64 {
        self.device_inputs().len() as f64 * (8.0 + 1.0 / 8.0)
    }

    /// The evaluator's error for a fault of checked instruction `instr`.
    pub fn fault(&self, instr: usize, row: u64, fault: Fault) -> ChainError {
        let expr = self.exprs[instr].clone().unwrap_or_default();
        ChainError {
            operator: self.operator_names[self.instr_operator[instr] as usize].clone(),
            row,
            detail: match fault {
                Fault::Overflow => ExprError::Overflow { expr },
                Fault::DivideByZero => ExprError::DivideByZero { expr },
            },
        }
    }
}

/// Where a column of the chain currently lives.
#[derive(Clone, Copy, Debug)]
enum ColumnAt {
    Input(u32),
    Reg(Reg),
}

fn lookup(columns: &[(String, ColumnAt)], name: &str) -> Result<ColumnAt, String> {
    columns
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, at)| *at)
        .ok_or_else(|| format!("unknown column `{name}`"))
}

struct Compiler {
    program: ChainProgram,
    loads: HashMap<u32, Reg>,
    operator: u16,
}

/// An operand before coercion: a register, or a null literal whose type
/// the other side decides.
#[derive(Clone, Copy)]
enum Operand {
    Reg(Reg),
    Null,
}

impl Compiler {
    fn push(&mut self, instr: Instr, ty: ValueType, expr: Option<String>) -> Reg {
        let reg = self.program.instrs.len() as Reg;
        self.program.instrs.push(instr);
        self.program.types.push(ty);
        self.program.exprs.push(expr);
        self.program.instr_operator.push(self.operator);
        reg
    }

    fn ty(&self, reg: Reg) -> ValueType {
        self.program.types[reg as usize]
    }

    fn load(&mut self, column: u32) -> Result<Reg, String> {
        if let Some(reg) = self.loads.get(&column) {
            return Ok(*reg);
        }
        let field = self.program.input_schema.field(column as usize);
        let ty = match ValueType::of(field.data_type()) {
            Some(t @ (ValueType::I64 | ValueType::F64)) => t,
            _ => {
                return Err(format!(
                    "column `{}` is {}: the GPU chain computes on Int64 and Float64 columns",
                    field.name(),
                    field.data_type()
                ));
            }
        };
        let reg = self.push(Instr::Load { column }, ty, None);
        self.loads.insert(column, reg);
        Ok(reg)
    }

    fn expr(&mut self, expr: &Expr, columns: &[(String, ColumnAt)]) -> Result<Reg, String> {
        match self.operand(expr, columns)? {
            Operand::Reg(reg) => Ok(reg),
            Operand::Null => Err(format!("`{expr}` is an untyped null")),
        }
    }

    fn operand(&mut self, expr: &Expr, columns: &[(String, ColumnAt)]) -> Result<Operand, String> {
        match expr {
            Expr::Column(name) => match lookup(columns, name)? {
                ColumnAt::Reg(reg) => Ok(Operand::Reg(reg)),
                ColumnAt::Input(column) => self.load(column).map(Operand::Reg),
            },
            Expr::Literal(value) => Ok(match constant(value, expr)? {
                (Const::Null, _) => Operand::Null,
                (value, ty) => Operand::Reg(self.push(Instr::Const { value }, ty, None)),
            }),
            Expr::Neg(inner) => {
                if let Expr::Literal(value) = inner.as_ref() {
                    return self.negated_literal(value, expr);
                }
                let a = self.expr(inner, columns)?;
                if self.ty(a) == ValueType::Bool {
                    return Err(format!("`{expr}` negates a boolean"));
                }
                let checked = (self.ty(a) == ValueType::I64).then(|| expr.to_string());
                Ok(Operand::Reg(self.push(
                    Instr::Neg { a },
                    self.ty(a),
                    checked,
                )))
            }
            Expr::Not(inner) => {
                let a = self.operand(inner, columns)?;
                let a = self.typed(a, ValueType::Bool);
                if self.ty(a) != ValueType::Bool {
                    return Err(format!("`{expr}` is `not` of a non-boolean"));
                }
                Ok(Operand::Reg(self.push(
                    Instr::Not { a },
                    ValueType::Bool,
                    None,
                )))
            }
            Expr::Binary { op, left, right } => {
                if is_constant(left) && is_constant(right) {
                    return Err(format!(
                        "`{expr}` has no column (constant expressions stay on the CPU)"
                    ));
                }
                let l = self.operand(left, columns)?;
                let r = self.operand(right, columns)?;
                self.binary(*op, l, r, expr).map(Operand::Reg)
            }
        }
    }

    fn negated_literal(&mut self, value: &ScalarValue, expr: &Expr) -> Result<Operand, String> {
        let (value, ty) = match constant(value, expr)? {
            (Const::I64(v), t) => (
                Const::I64(
                    v.checked_neg()
                        .ok_or_else(|| format!("`{expr}` overflows"))?,
                ),
                t,
            ),
            (Const::F64(v), t) => (Const::F64(-v), t),
            (Const::Null, _) => return Ok(Operand::Null),
            (Const::Bool(_), _) => return Err(format!("`{expr}` negates a boolean")),
        };
        Ok(Operand::Reg(self.push(Instr::Const { value }, ty, None)))
    }

    /// A null operand as a null constant of `ty`.
    fn typed(&mut self, operand: Operand, ty: ValueType) -> Reg {
        match operand {
            Operand::Reg(reg) => reg,
            Operand::Null => self.push(Instr::Const { value: Const::Null }, ty, None),
        }
    }

    /// `reg` coerced to `ty` (only Int64 → Float64 exists).
    fn coerce(&mut self, reg: Reg, ty: ValueType) -> Reg {
        if self.ty(reg) == ty {
            reg
        } else {
            self.push(Instr::ToF64 { a: reg }, ValueType::F64, None)
        }
    }

    fn binary(&mut self, op: BinOp, l: Operand, r: Operand, expr: &Expr) -> Result<Reg, String> {
        let (l, r) = match (l, r) {
            (Operand::Null, Operand::Null) => {
                return Err(format!("`{expr}` combines two nulls"));
            }
            (Operand::Null, Operand::Reg(r)) => (self.typed(Operand::Null, self.ty(r)), r),
            (Operand::Reg(l), Operand::Null) => (l, self.typed(Operand::Null, self.ty(l))),
            (Operand::Reg(l), Operand::Reg(r)) => (l, r),
        };
        let (lt, rt) = (self.ty(l), self.ty(r));
        let numeric = |t: ValueType| t != ValueType::Bool;
        if op.is_logical() {
            if lt != ValueType::Bool || rt != ValueType::Bool {
                return Err(format!("`{expr}`: `{op}` needs booleans"));
            }
            let instr = if op == BinOp::And {
                Instr::And { a: l, b: r }
            } else {
                Instr::Or { a: l, b: r }
            };
            return Ok(self.push(instr, ValueType::Bool, None));
        }
        let operand_type = match (lt, rt) {
            (a, b) if a == b => a,
            (a, b) if numeric(a) && numeric(b) => ValueType::F64,
            _ => return Err(format!("`{expr}` mixes {lt:?} and {rt:?}")),
        };
        let (l, r) = (self.coerce(l, operand_type), self.coerce(r, operand_type));
        if let Some(cmp) = comparison(op) {
            return Ok(self.push(
                Instr::Cmp {
                    op: cmp,
                    a: l,
                    b: r,
                },
                ValueType::Bool,
                None,
            ));
        }
        let arith = match op {
            BinOp::Add => Arith::Add,
            BinOp::Sub => Arith::Sub,
            BinOp::Mul => Arith::Mul,
            BinOp::Div => Arith::Div,
            BinOp::Mod => Arith::Rem,
            _ => return Err(format!("`{expr}`: no fused form of `{op}`")),
        };
        if operand_type == ValueType::Bool {
            return Err(format!("`{expr}`: arithmetic on booleans"));
        }
        let checked = (operand_type == ValueType::I64).then(|| expr.to_string());
        Ok(self.push(
            Instr::Arith {
                op: arith,
                a: l,
                b: r,
            },
            operand_type,
            checked,
        ))
    }
}

fn is_constant(expr: &Expr) -> bool {
    match expr {
        Expr::Literal(_) => true,
        Expr::Neg(inner) | Expr::Not(inner) => is_constant(inner),
        Expr::Binary { left, right, .. } => is_constant(left) && is_constant(right),
        Expr::Column(_) => false,
    }
}

fn constant(value: &ScalarValue, expr: &Expr) -> Result<(Const, ValueType), String> {
    Ok(match value {
        ScalarValue::Int64(v) => (Const::I64(*v), ValueType::I64),
        ScalarValue::Float64(v) => (Const::F64(*v), ValueType::F64),
        ScalarValue::Boolean(v) => (Const::Bool(*v), ValueType::Bool),
        ScalarValue::Null => (Const::Null, ValueType::Bool),
        ScalarValue::Utf8(_) => return Err(format!("`{expr}`: strings stay on the CPU")),
    })
}

fn comparison(op: BinOp) -> Option<Cmp> {
    Some(match op {
        BinOp::Eq => Cmp::Eq,
        BinOp::NotEq => Cmp::Ne,
        BinOp::Lt => Cmp::Lt,
        BinOp::LtEq => Cmp::Le,
        BinOp::Gt => Cmp::Gt,
        BinOp::GtEq => Cmp::Ge,
        _ => return None,
    })
}

/// The comparison key of a Float64: Arrow's total order (`f64::total_cmp`)
/// with every NaN as the positive quiet NaN (the evaluator's `one_nan`):
/// integers that compare as the floats do, NaN above every number and equal
/// to every NaN, -0.0 below 0.0.
pub fn total_order_key(v: f64) -> i64 {
    let v = if v.is_nan() { f64::NAN } else { v };
    let bits = v.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

#[cfg(test)]
mod tests;
