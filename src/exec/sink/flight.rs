//! `flight_sink`: each subtask's output becomes one Arrow Flight partition
//! that a trainer reads (see [`crate::flight`]).
//!
//! The sink hands batches to its partition's bounded queue and blocks while
//! the queue is full, so a slow trainer back-pressures the job through the
//! normal credit flow. It finishes only when a reader has read its
//! partition to the end: a finished job has delivered every row.
//!
//! Its checkpoint state is the offset of the first row no reader had taken
//! and the batches from there on, so a restored sink serves them again
//! first; rows carry their offsets, and a trainer that read some of them
//! before the failure skips those.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use super::super::ExecError;
use super::super::operators::{Operator, Output};
use crate::flight::{FlightStreams, Partition, PushError, StreamKey};

/// What a task needs to serve Flight partitions.
#[derive(Clone)]
pub struct FlightTaskContext {
    pub streams: Arc<FlightStreams>,
    pub execution: u64,
    /// Set when the task is canceled (a blocked sink gives up).
    pub canceled: Arc<AtomicBool>,
}

pub struct FlightSink {
    name: String,
    partition: Arc<Partition>,
    streams: Arc<FlightStreams>,
    canceled: Arc<AtomicBool>,
    reader_timeout: Option<Duration>,
    finished: bool,
}

impl FlightSink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        operator: usize,
        subtask: u32,
        schema: SchemaRef,
        queue_bytes: u64,
        reader_timeout_ms: Option<u64>,
        ctx: &FlightTaskContext,
    ) -> Self {
        let key = StreamKey {
            execution: ctx.execution,
            operator: operator as u32,
            subtask,
        };
        let partition = Arc::new(Partition::new(
            key,
            schema,
            usize::try_from(queue_bytes).unwrap_or(usize::MAX),
        ));
        ctx.streams.register(Arc::clone(&partition));
        FlightSink {
            name: name.to_owned(),
            partition,
            streams: Arc::clone(&ctx.streams),
            canceled: Arc::clone(&ctx.canceled),
            reader_timeout: reader_timeout_ms.map(Duration::from_millis),
            finished: false,
        }
    }

    fn error(&self, e: PushError) -> ExecError {
        match e {
            PushError::Canceled => ExecError::Canceled,
            other => ExecError::State {
                operator: self.name.clone(),
                detail: other.to_string(),
            },
        }
    }
}

impl Operator for FlightSink {
    fn process(&mut self, batch: RecordBatch, _out: &mut dyn Output) -> Result<(), ExecError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let canceled = Arc::clone(&self.canceled);
        self.partition
            .push(
                batch,
                &move || canceled.load(Ordering::Relaxed),
                self.reader_timeout,
            )
            .map_err(|e| self.error(e))
    }

    fn finish(&mut self, _out: &mut dyn Output) -> Result<(), ExecError> {
        let canceled = Arc::clone(&self.canceled);
        self.partition
            .finish(
                &move || canceled.load(Ordering::Relaxed),
                self.reader_timeout,
            )
            .map_err(|e| self.error(e))?;
        self.finished = true;
        Ok(())
    }

    fn snapshot_state(&mut self, _checkpoint: u64) -> Result<Option<Vec<u8>>, ExecError> {
        let (offset, pending) = self.partition.pending();
        let mut state = offset.to_le_bytes().to_vec();
        if !pending.is_empty() {
            super::super::features::encode_rows(&self.partition.schema, &pending, &mut state)?;
        }
        Ok(Some(state))
    }

    fn restore_state(&mut self, state: Option<&[u8]>) -> Result<(), ExecError> {
        let Some(state) = state else { return Ok(()) };
        let bad = |detail: String| ExecError::State {
            operator: self.name.clone(),
            detail,
        };
        let (offset, rows) = state.split_at_checked(8).ok_or_else(|| {
            bad(format!(
                "a flight_sink's state is at least 8 bytes, found {}",
                state.len()
            ))
        })?;
        let offset = u64::from_le_bytes(offset.try_into().map_err(|_| bad("offset".into()))?);
        let pending = if rows.is_empty() {
            Vec::new()
        } else {
            super::super::features::decode_rows(&self.partition.schema, rows)
                .map_err(|e| bad(format!("decoding the unread batches: {e}")))?
        };
        self.partition.restore(offset, pending);
        Ok(())
    }
}

impl Drop for FlightSink {
    fn drop(&mut self) {
        if !self.finished {
            let key = self.partition.key;
            self.partition.abort(format!(
                "strata: partition {} of execution {:016x} ended before its end was read (the task was canceled or failed; the job restarts or has ended): get the flight info again and skip the offsets already read",
                key.subtask, key.execution
            ));
        }
        self.streams.remove(&self.partition.key);
    }
}
