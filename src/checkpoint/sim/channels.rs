//! The simulated wire: FIFO channels between tasks, delayed message
//! queues between the tasks and the JobManager, and a consumer's reading
//! of its channels, which mirrors `InputReader::on_item` with the real
//! [`BarrierAligner`]. A blocked channel is simply not read.

use std::collections::VecDeque;
use std::time::Duration;

use crate::network::StreamEvent;
use crate::network::align::{AlignStep, BarrierAligner};
use crate::network::gate::InputEvent;

/// A FIFO whose messages each arrive at a step; order is kept even when a
/// later message drew a shorter delay.
pub(super) struct Wire<T> {
    queue: VecDeque<(u64, T)>,
    last_at: u64,
}

impl<T> Default for Wire<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            last_at: 0,
        }
    }
}

impl<T> Wire<T> {
    pub fn send(&mut self, message: T, step: u64, delay_steps: u64) {
        let at = (step + delay_steps).max(self.last_at);
        self.last_at = at;
        self.queue.push_back((at, message));
    }

    /// The next message if it has arrived by `step`.
    pub fn receive(&mut self, step: u64) -> Option<T> {
        if self.queue.front()?.0 > step {
            return None;
        }
        self.queue.pop_front().map(|(_, m)| m)
    }
}

/// A producer → consumer channel.
#[derive(Default)]
pub(super) struct Channel {
    events: VecDeque<StreamEvent>,
    batch_count: usize,
}

impl Channel {
    pub fn push(&mut self, event: StreamEvent) {
        self.batch_count += usize::from(matches!(event, StreamEvent::Batch(_)));
        self.events.push_back(event);
    }

    fn pop(&mut self) -> Option<StreamEvent> {
        let event = self.events.pop_front()?;
        self.batch_count -= usize::from(matches!(event, StreamEvent::Batch(_)));
        Some(event)
    }

    /// Batches queued: what back-pressure counts.
    pub fn batch_count(&self) -> usize {
        self.batch_count
    }
}

/// A consumer's input: its channels (one gate) as `InputReader` reads them.
pub(super) struct InputChannels {
    /// The simulator's channel for each gate channel.
    channels: Vec<usize>,
    aligner: BarrierAligner,
    blocked: Vec<bool>,
    watermarks: Vec<i64>,
    ended: Vec<bool>,
    current_watermark: i64,
    alignment_started: Option<Duration>,
    /// How long the last completed alignment took.
    pub last_alignment: Duration,
}

impl InputChannels {
    pub fn new(channels: Vec<usize>) -> Self {
        let n = channels.len();
        Self {
            channels,
            aligner: BarrierAligner::new(&[n]),
            blocked: vec![false; n],
            watermarks: vec![i64::MIN; n],
            ended: vec![false; n],
            current_watermark: i64::MIN,
            alignment_started: None,
            last_alignment: Duration::ZERO,
        }
    }

    /// Gate channels that hold an event and are not blocked.
    pub fn readable(&self, channels: &[Channel]) -> Vec<usize> {
        (0..self.channels.len())
            .filter(|&g| !self.blocked[g] && !channels[self.channels[g]].events.is_empty())
            .collect()
    }

    /// Takes the next event of gate channel `g`, which holds one.
    pub fn pop(&mut self, g: usize, channels: &mut [Channel]) -> StreamEvent {
        let event = channels[self.channels[g]].pop();
        event.expect("a readable channel holds an event")
    }

    pub fn is_blocked(&self, g: usize) -> bool {
        self.blocked[g]
    }

    /// What the task reads for `event` on gate channel `g`, as
    /// `InputReader::on_item` decides it.
    pub fn on_event(
        &mut self,
        g: usize,
        event: StreamEvent,
        now: Duration,
    ) -> Result<Vec<InputEvent>, String> {
        Ok(match event {
            StreamEvent::Batch(batch) => vec![InputEvent::Batch(batch)],
            StreamEvent::Watermark(w) => {
                self.watermarks[g] = self.watermarks[g].max(w);
                self.advance_watermark().into_iter().collect()
            }
            StreamEvent::Barrier(checkpoint) => {
                let step = self
                    .aligner
                    .on_barrier(0, g, checkpoint)
                    .map_err(|e| e.to_string())?;
                if self.alignment_started.is_none() || step.subsumed.is_some() {
                    self.alignment_started = Some(now);
                }
                self.apply(step, Some(g), now).into_iter().collect()
            }
            StreamEvent::EndOfPartition => {
                if !std::mem::replace(&mut self.ended[g], true) {
                    self.watermarks[g] = i64::MAX;
                }
                let step = self.aligner.on_end(0, g);
                let mut events: Vec<InputEvent> = self.apply(step, None, now).into_iter().collect();
                if self.ended.iter().all(|e| *e) {
                    events.push(InputEvent::End);
                } else {
                    events.extend(self.advance_watermark());
                }
                events
            }
        })
    }

    fn apply(&mut self, step: AlignStep, from: Option<usize>, now: Duration) -> Option<InputEvent> {
        if step.unblock_all {
            self.blocked.iter_mut().for_each(|b| *b = false);
        }
        if step.block
            && let Some(g) = from
        {
            self.blocked[g] = true;
        }
        let checkpoint = step.complete?;
        if let Some(started) = self.alignment_started.take() {
            self.last_alignment = now.saturating_sub(started);
        }
        Some(InputEvent::Barrier(checkpoint))
    }

    /// The coordinator aborted checkpoints up to `checkpoint`.
    pub fn abort(&mut self, checkpoint: u64, now: Duration) {
        let step = self.aligner.abort(checkpoint);
        if step.unblock_all {
            self.alignment_started = None;
        }
        self.apply(step, None, now);
    }

    fn advance_watermark(&mut self) -> Option<InputEvent> {
        let min = self.watermarks.iter().copied().min().unwrap_or(i64::MIN);
        (min > self.current_watermark && min != i64::MAX).then(|| {
            self.current_watermark = min;
            InputEvent::Watermark(min)
        })
    }
}
