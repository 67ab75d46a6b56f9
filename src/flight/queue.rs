//! One Flight partition: the bounded queue between a `flight_sink` subtask
//! (a task thread) and the trainer reading its stream (an async gRPC
//! stream).
//!
//! The queue holds at most `limit_bytes` of batches (always at least one).
//! A full queue blocks the sink's task thread, which stops taking input,
//! so the job's credit-based flow control slows every upstream task: a
//! slow trainer slows the job instead of filling memory. Every row has an
//! offset (its position in the partition), carried in each Flight
//! message's `app_metadata`, so a reader that reconnects (or reads a
//! restarted attempt) can tell exactly which rows it has seen.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

/// Names one partition: a subtask of a `flight_sink` operator in one
/// execution attempt of a job. The Flight ticket carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StreamKey {
    /// The execution attempt's id (unique across JobManager runs).
    #[serde(with = "super::hex_u64")]
    pub execution: u64,
    /// The `flight_sink` operator's index in the job.
    pub operator: u32,
    pub subtask: u32,
}

/// Why a sink could not hand over a batch.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("task canceled")]
    Canceled,
    #[error("{0}")]
    Aborted(String),
    #[error(
        "no Flight reader took a batch of partition {subtask} for {} s (flight_sink key reader_timeout); is the trainer running?",
        .waited.as_secs()
    )]
    NoReader { subtask: u32, waited: Duration },
}

/// A batch in the queue and the offset of its first row.
pub struct Item {
    pub offset: u64,
    pub batch: RecordBatch,
}

struct State {
    queue: VecDeque<Item>,
    queued_bytes: usize,
    /// Offset of the next row the sink pushes.
    next_offset: u64,
    /// The sink finished: the stream ends once the queue is empty.
    ended: bool,
    /// A reader saw the end of the stream.
    drained: bool,
    aborted: Option<String>,
    reader_attached: bool,
    /// When a reader last took a batch (or the partition was created).
    last_progress: Instant,
    rows_taken: u64,
}

pub struct Partition {
    pub key: StreamKey,
    pub schema: SchemaRef,
    limit_bytes: usize,
    state: Mutex<State>,
    /// The sink waits here for space (or the end to be read).
    space: Condvar,
    /// The reader waits here for a batch, the end or an abort.
    data: tokio::sync::Notify,
}

/// How often a blocked sink looks at its cancel flag.
const POLL: Duration = Duration::from_millis(50);

impl Partition {
    pub fn new(key: StreamKey, schema: SchemaRef, limit_bytes: usize) -> Self {
        Partition {
            key,
            schema,
            limit_bytes: limit_bytes.max(1),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_bytes: 0,
                next_offset: 0,
                ended: false,
                drained: false,
                aborted: None,
                reader_attached: false,
                last_progress: Instant::now(),
                rows_taken: 0,
            }),
            space: Condvar::new(),
            data: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restores a checkpoint: the rows start at `offset`, and `pending`
    /// (the batches no reader had taken when the checkpoint was taken)
    /// are served first.
    pub fn restore(&self, offset: u64, pending: Vec<RecordBatch>) {
        let mut state = self.lock();
        state.next_offset = offset;
        for batch in pending {
            let rows = batch.num_rows() as u64;
            state.queued_bytes += batch.get_array_memory_size();
            let offset = state.next_offset;
            state.queue.push_back(Item { offset, batch });
            state.next_offset += rows;
        }
        drop(state);
        self.data.notify_one();
    }

    /// The offset of the first row not yet taken by a reader and the
    /// batches from there on (a checkpoint's state), and the offset of the
    /// next row.
    pub fn pending(&self) -> (u64, Vec<RecordBatch>) {
        let state = self.lock();
        let first = state
            .queue
            .front()
            .map_or(state.next_offset, |item| item.offset);
        (
            first,
            state.queue.iter().map(|item| item.batch.clone()).collect(),
        )
    }

    /// Hands `batch` to the reader, waiting while the queue is full.
    /// `canceled` is polled while waiting; `reader_timeout` (`None`:
    /// forever) bounds how long the queue may stay full without a reader
    /// taking anything.
    pub fn push(
        &self,
        batch: RecordBatch,
        canceled: &dyn Fn() -> bool,
        reader_timeout: Option<Duration>,
    ) -> Result<(), PushError> {
        let bytes = batch.get_array_memory_size();
        let mut state = self.lock();
        loop {
            if let Some(reason) = &state.aborted {
                return Err(PushError::Aborted(reason.clone()));
            }
            if state.queue.is_empty() || state.queued_bytes + bytes <= self.limit_bytes {
                break;
            }
            state = self.wait(state, canceled, reader_timeout)?;
        }
        let rows = batch.num_rows() as u64;
        let offset = state.next_offset;
        state.next_offset += rows;
        state.queued_bytes += bytes;
        state.queue.push_back(Item { offset, batch });
        drop(state);
        self.data.notify_one();
        Ok(())
    }

    /// Ends the stream and waits until a reader has read all of it.
    pub fn finish(
        &self,
        canceled: &dyn Fn() -> bool,
        reader_timeout: Option<Duration>,
    ) -> Result<(), PushError> {
        let mut state = self.lock();
        state.ended = true;
        self.data.notify_one();
        while !state.drained {
            if let Some(reason) = &state.aborted {
                return Err(PushError::Aborted(reason.clone()));
            }
            state = self.wait(state, canceled, reader_timeout)?;
        }
        Ok(())
    }

    fn wait<'a>(
        &self,
        state: MutexGuard<'a, State>,
        canceled: &dyn Fn() -> bool,
        reader_timeout: Option<Duration>,
    ) -> Result<MutexGuard<'a, State>, PushError> {
        if canceled() {
            return Err(PushError::Canceled);
        }
        if let Some(limit) = reader_timeout {
            let waited = state.last_progress.elapsed();
            if waited >= limit {
                return Err(PushError::NoReader {
                    subtask: self.key.subtask,
                    waited,
                });
            }
        }
        let (state, _) = self
            .space
            .wait_timeout(state, POLL)
            .unwrap_or_else(|e| e.into_inner());
        Ok(state)
    }

    /// Ends the stream with an error every reader sees.
    pub fn abort(&self, reason: String) {
        let mut state = self.lock();
        if state.aborted.is_none() && !state.drained {
            state.aborted = Some(reason);
        }
        drop(state);
        self.data.notify_one();
        self.space.notify_all();
    }

    /// Attaches the partition's only reader.
    pub fn attach(self: &Arc<Self>) -> Result<Reader, String> {
        let mut state = self.lock();
        if state.reader_attached {
            return Err(format!(
                "partition {} is already being read by another client",
                self.key.subtask
            ));
        }
        if state.drained {
            return Err(format!(
                "partition {} was read to its end already",
                self.key.subtask
            ));
        }
        state.reader_attached = true;
        state.last_progress = Instant::now();
        Ok(Reader {
            partition: Arc::clone(self),
        })
    }

    /// Rows readers have taken so far.
    pub fn rows_taken(&self) -> u64 {
        self.lock().rows_taken
    }
}

/// What a reader gets next.
pub enum Next {
    Batch(Item),
    End,
    Aborted(String),
}

/// The attached reader of a partition; detaches on drop, so a trainer
/// that reconnects carries on from the first row not yet taken.
pub struct Reader {
    partition: Arc<Partition>,
}

impl Reader {
    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    pub async fn next(&mut self) -> Next {
        let p = &self.partition;
        loop {
            {
                let mut state = p.lock();
                if let Some(reason) = &state.aborted {
                    return Next::Aborted(reason.clone());
                }
                if let Some(item) = state.queue.pop_front() {
                    state.queued_bytes = state
                        .queued_bytes
                        .saturating_sub(item.batch.get_array_memory_size());
                    state.last_progress = Instant::now();
                    state.rows_taken += item.batch.num_rows() as u64;
                    drop(state);
                    p.space.notify_all();
                    return Next::Batch(item);
                }
                if state.ended {
                    state.drained = true;
                    drop(state);
                    p.space.notify_all();
                    return Next::End;
                }
            }
            // A single reader: a notify_one that came before this await
            // left its permit, so no wake-up is lost.
            p.data.notified().await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut state = self.partition.lock();
        state.reader_attached = false;
        state.last_progress = Instant::now();
    }
}

/// A TaskManager's Flight partitions, by ticket.
#[derive(Default)]
pub struct FlightStreams {
    partitions: Mutex<HashMap<StreamKey, Arc<Partition>>>,
}

impl FlightStreams {
    pub fn register(&self, partition: Arc<Partition>) {
        self.lock().insert(partition.key, partition);
    }

    pub fn get(&self, key: &StreamKey) -> Option<Arc<Partition>> {
        self.lock().get(key).cloned()
    }

    pub fn remove(&self, key: &StreamKey) {
        self.lock().remove(key);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamKey, Arc<Partition>>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Int64Array;
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn batch(from: i64, rows: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(from..from + rows))],
        )
        .expect("batch")
    }

    fn partition(limit: usize) -> Arc<Partition> {
        let key = StreamKey {
            execution: 2,
            operator: 3,
            subtask: 0,
        };
        Arc::new(Partition::new(key, batch(0, 1).schema(), limit))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_bounds_the_queue_and_gets_every_row_once_in_order() {
        let p = partition(1); // one batch at a time
        let producer = {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                for i in 0..50 {
                    p.push(batch(i * 10, 10), &|| false, None).expect("push");
                    let state = p.lock();
                    assert!(state.queue.len() <= 1, "the queue grew past its limit");
                }
                p.finish(&|| false, None).expect("finish");
            })
        };
        let mut reader = p.attach().expect("attach");
        let mut expected = 0u64;
        loop {
            match reader.next().await {
                Next::Batch(item) => {
                    assert_eq!(item.offset, expected);
                    expected += item.batch.num_rows() as u64;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Next::End => break,
                Next::Aborted(reason) => panic!("aborted: {reason}"),
            }
        }
        assert_eq!(expected, 500);
        producer.join().expect("producer");
    }

    #[test]
    fn a_blocked_sink_sees_cancel_abort_and_the_reader_timeout() {
        let p = partition(1);
        p.push(batch(0, 10), &|| false, None)
            .expect("first batch is always admitted");
        let canceled = AtomicBool::new(true);
        let err = p
            .push(batch(10, 10), &|| canceled.load(Ordering::Relaxed), None)
            .expect_err("full queue and canceled");
        assert!(matches!(err, PushError::Canceled));
        let err = p
            .push(batch(10, 10), &|| false, Some(Duration::from_millis(10)))
            .expect_err("nobody reads");
        assert!(err.to_string().contains("reader_timeout"), "{err}");
        p.abort("job restarting".into());
        let err = p.push(batch(10, 10), &|| false, None).expect_err("aborted");
        assert_eq!(err.to_string(), "job restarting");
    }

    #[tokio::test]
    async fn one_reader_at_a_time_and_a_reconnect_continues_where_the_first_stopped() {
        let p = partition(usize::MAX);
        for i in 0..3 {
            p.push(batch(i * 5, 5), &|| false, None).expect("push");
        }
        let mut first = p.attach().expect("attach");
        assert!(p.attach().is_err(), "a second concurrent reader is refused");
        let Next::Batch(item) = first.next().await else {
            panic!("expected a batch")
        };
        assert_eq!(item.offset, 0);
        drop(first);
        let (from, pending) = p.pending();
        assert_eq!((from, pending.len()), (5, 2));
        let mut second = p.attach().expect("reattach");
        let Next::Batch(item) = second.next().await else {
            panic!("expected a batch")
        };
        assert_eq!(item.offset, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restored_partition_serves_the_checkpointed_rows_first() {
        let p = partition(usize::MAX);
        p.restore(100, vec![batch(0, 4), batch(4, 4)]);
        p.push(batch(8, 2), &|| false, None).expect("push");
        let finisher = {
            let p = Arc::clone(&p);
            std::thread::spawn(move || p.finish(&|| false, Some(Duration::from_secs(30))))
        };
        let mut reader = p.attach().expect("attach");
        let mut offsets = Vec::new();
        while let Next::Batch(item) = reader.next().await {
            offsets.push(item.offset);
        }
        assert_eq!(offsets, vec![100, 104, 108]);
        finisher
            .join()
            .expect("thread")
            .expect("finish after the drain");
        // An abort after the drain changes nothing for the reader.
        p.abort("too late".into());
        assert!(p.attach().is_err(), "a drained partition is not read twice");
    }
}
