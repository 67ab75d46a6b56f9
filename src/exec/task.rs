//! A task's thread: the loop that moves batches from a source or input
//! gates through the operator chain into the record writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

use super::ExecError;
use super::operators::{Operator, Output};
use super::source::{Source, WatermarkGenerator};
use crate::metrics::{OperatorMetrics, TaskMetrics};
use crate::network::gate::InputEvent;
use crate::network::{InputReader, RecordWriter};

/// How long the task waits on its inputs before checking for cancellation.
const POLL: Duration = Duration::from_millis(100);

/// The operators of a task after its head, and where their output goes.
pub struct Chain {
    pub operators: Vec<Box<dyn Operator>>,
    pub metrics: Vec<Arc<OperatorMetrics>>,
    pub writers: Vec<RecordWriter>,
    /// Counts the rows that enter the chain's first operator from its head
    /// (the source's output, for source tasks).
    pub head: Option<Arc<OperatorMetrics>>,
}

struct Link<'a> {
    operators: &'a mut [Box<dyn Operator>],
    metrics: &'a [Arc<OperatorMetrics>],
    writers: &'a mut [RecordWriter],
    upstream: Option<&'a OperatorMetrics>,
}

impl Output for Link<'_> {
    fn emit(&mut self, batch: RecordBatch) -> Result<(), ExecError> {
        let rows = batch.num_rows() as u64;
        if let Some(u) = self.upstream {
            u.rows_out.fetch_add(rows, Ordering::Relaxed);
        }
        match (self.operators.split_first_mut(), self.metrics.split_first()) {
            (Some((op, rest)), Some((m, mrest))) => {
                m.rows_in.fetch_add(rows, Ordering::Relaxed);
                op.process(
                    batch,
                    &mut Link {
                        operators: rest,
                        metrics: mrest,
                        writers: &mut *self.writers,
                        upstream: Some(m),
                    },
                )
            }
            _ => {
                if let Some((last, others)) = self.writers.split_last_mut() {
                    for w in others {
                        w.emit(batch.clone())?;
                    }
                    last.emit(batch)?;
                }
                Ok(())
            }
        }
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), ExecError> {
        match (self.operators.split_first_mut(), self.metrics.split_first()) {
            (Some((op, rest)), Some((m, mrest))) => op.watermark(
                watermark,
                &mut Link {
                    operators: rest,
                    metrics: mrest,
                    writers: &mut *self.writers,
                    upstream: Some(m),
                },
            ),
            _ => {
                for w in self.writers.iter_mut() {
                    w.watermark(watermark)?;
                }
                Ok(())
            }
        }
    }
}

impl Chain {
    fn link(&mut self) -> Link<'_> {
        Link {
            operators: &mut self.operators,
            metrics: &self.metrics,
            writers: &mut self.writers,
            upstream: self.head.as_deref(),
        }
    }

    pub fn push(&mut self, batch: RecordBatch) -> Result<(), ExecError> {
        self.link().emit(batch)
    }

    pub fn watermark(&mut self, watermark: i64) -> Result<(), ExecError> {
        self.link().watermark(watermark)
    }

    /// End of input: each operator flushes into the rest of the chain, in
    /// order; then every edge gets its end-of-partition.
    pub fn finish(&mut self) -> Result<(), ExecError> {
        for i in 0..self.operators.len() {
            let (done, rest) = self.operators.split_at_mut(i + 1);
            let op = &mut done[i];
            let mut link = Link {
                operators: rest,
                metrics: &self.metrics[i + 1..],
                writers: &mut self.writers,
                upstream: Some(&self.metrics[i]),
            };
            op.finish(&mut link)?;
        }
        for w in &mut self.writers {
            w.finish()?;
        }
        Ok(())
    }
}

/// Where a task's input comes from.
pub enum TaskInput {
    Source {
        source: Box<dyn Source>,
        watermarks: Option<WatermarkGenerator>,
        rows_per_second: Option<f64>,
    },
    Gates(InputReader),
}

/// Everything a task thread needs.
pub struct Task {
    pub name: String,
    pub input: TaskInput,
    pub chain: Chain,
    pub canceled: Arc<AtomicBool>,
    pub metrics: Arc<TaskMetrics>,
}

impl Task {
    /// Runs the task to its end. Gates are closed on every exit path so no
    /// producer stays blocked on a dead consumer.
    pub fn run(mut self) -> Result<(), ExecError> {
        let result = match &mut self.input {
            TaskInput::Source {
                source,
                watermarks,
                rows_per_second,
            } => run_source(
                source.as_mut(),
                watermarks.as_mut(),
                *rows_per_second,
                &mut self.chain,
                &self.canceled,
            ),
            TaskInput::Gates(reader) => {
                let r = run_gates(reader, &mut self.chain, &self.canceled, &self.metrics);
                reader.close();
                r
            }
        };
        result.and_then(|()| self.chain.finish())
    }
}

fn check_canceled(canceled: &AtomicBool) -> Result<(), ExecError> {
    if canceled.load(Ordering::Relaxed) {
        Err(ExecError::Canceled)
    } else {
        Ok(())
    }
}

fn run_source(
    source: &mut dyn Source,
    mut watermarks: Option<&mut WatermarkGenerator>,
    rows_per_second: Option<f64>,
    chain: &mut Chain,
    canceled: &AtomicBool,
) -> Result<(), ExecError> {
    let started = Instant::now();
    let mut produced = 0u64;
    while let Some(batch) = source.next_batch()? {
        check_canceled(canceled)?;
        produced += batch.num_rows() as u64;
        let watermark = match watermarks.as_deref_mut() {
            Some(g) => g.observe(&batch)?,
            None => None,
        };
        chain.push(batch)?;
        if let Some(w) = watermark {
            chain.watermark(w)?;
        }
        if let Some(rate) = rows_per_second {
            throttle(started, produced, rate, canceled)?;
        }
    }
    Ok(())
}

/// Sleeps until `produced` rows are due at `rate` rows/s.
fn throttle(
    started: Instant,
    produced: u64,
    rate: f64,
    canceled: &AtomicBool,
) -> Result<(), ExecError> {
    let due = Duration::from_secs_f64(produced as f64 / rate.max(1.0));
    while started.elapsed() < due {
        check_canceled(canceled)?;
        std::thread::sleep((due - started.elapsed()).min(POLL));
    }
    Ok(())
}

fn run_gates(
    reader: &mut InputReader,
    chain: &mut Chain,
    canceled: &AtomicBool,
    metrics: &TaskMetrics,
) -> Result<(), ExecError> {
    loop {
        check_canceled(canceled)?;
        let event = reader.next(POLL)?;
        metrics
            .remote_bytes_in
            .store(reader.remote_bytes(), Ordering::Relaxed);
        match event {
            Some(InputEvent::Batch(batch)) => chain.push(batch)?,
            Some(InputEvent::Watermark(w)) => chain.watermark(w)?,
            Some(InputEvent::End) => return Ok(()),
            None => {}
        }
    }
}
