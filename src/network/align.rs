//! Checkpoint barrier alignment (Flink's `SingleCheckpointBarrierHandler`,
//! aligned mode) as a pure state machine over a task's input channels.
//!
//! When the first barrier of checkpoint `n` arrives on a channel, alignment
//! for `n` starts: that channel is blocked, and so is every further channel
//! that delivers barrier `n`, until every open channel has delivered it (a
//! channel that ended counts as delivered). Then all channels are released
//! and the task takes its snapshot. A barrier of a newer checkpoint while
//! aligning subsumes the older one (its alignment is abandoned); barriers of
//! checkpoints already completed, abandoned or aborted are ignored.
//!
//! The caller (the input reader) applies the [`AlignStep`]s to its gates, so
//! the simulator can drive the same logic.

/// What the caller must do after an input event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlignStep {
    /// Block the channel the barrier came from.
    pub block: bool,
    /// Release every blocked channel (before blocking, if both are set).
    pub unblock_all: bool,
    /// Alignment of this checkpoint completed: snapshot and forward it.
    pub complete: Option<u64>,
    /// A checkpoint whose alignment was abandoned for a newer one.
    pub subsumed: Option<u64>,
}

struct Alignment {
    checkpoint: u64,
    /// Per gate, per channel: delivered barrier `checkpoint`.
    seen: Vec<Vec<bool>>,
    /// Open channels that have not delivered it yet.
    missing: usize,
}

/// A protocol violation by a producer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel {channel} of input {gate} delivered barrier {checkpoint} twice")]
pub struct DuplicateBarrier {
    pub gate: usize,
    pub channel: usize,
    pub checkpoint: u64,
}

pub struct BarrierAligner {
    /// Per gate, per channel: the channel ended.
    ended: Vec<Vec<bool>>,
    open: usize,
    current: Option<Alignment>,
    /// The newest checkpoint completed, subsumed or aborted here.
    last: u64,
}

impl BarrierAligner {
    /// `channels[g]` is the channel count of gate `g`.
    pub fn new(channels: &[usize]) -> Self {
        Self {
            ended: channels.iter().map(|&n| vec![false; n]).collect(),
            open: channels.iter().sum(),
            current: None,
            last: 0,
        }
    }

    /// The checkpoint being aligned, if any.
    pub fn aligning(&self) -> Option<u64> {
        self.current.as_ref().map(|a| a.checkpoint)
    }

    pub fn on_barrier(
        &mut self,
        gate: usize,
        channel: usize,
        checkpoint: u64,
    ) -> Result<AlignStep, DuplicateBarrier> {
        let mut step = AlignStep::default();
        if checkpoint <= self.last {
            return Ok(step);
        }
        if let Some(a) = &self.current
            && a.checkpoint < checkpoint
        {
            step.subsumed = Some(a.checkpoint);
            step.unblock_all = true;
            self.last = a.checkpoint;
            self.current = None;
        }
        let ended = &self.ended;
        let open = self.open;
        let a = self.current.get_or_insert_with(|| Alignment {
            checkpoint,
            seen: ended.iter().map(|g| vec![false; g.len()]).collect(),
            missing: open,
        });
        if std::mem::replace(&mut a.seen[gate][channel], true) {
            return Err(DuplicateBarrier {
                gate,
                channel,
                checkpoint,
            });
        }
        assert!(
            !self.ended[gate][channel],
            "barrier on an ended channel {gate}/{channel}"
        );
        a.missing -= 1;
        if a.missing == 0 {
            self.finish_alignment(&mut step);
        } else {
            step.block = true;
        }
        Ok(step)
    }

    /// Channel `gate/channel` delivered its end of partition.
    pub fn on_end(&mut self, gate: usize, channel: usize) -> AlignStep {
        let mut step = AlignStep::default();
        if std::mem::replace(&mut self.ended[gate][channel], true) {
            return step;
        }
        self.open -= 1;
        if let Some(a) = &mut self.current
            && !a.seen[gate][channel]
        {
            a.missing -= 1;
            if a.missing == 0 {
                self.finish_alignment(&mut step);
            }
        }
        step
    }

    /// The coordinator aborted every checkpoint up to `checkpoint`: stop
    /// aligning it and ignore its barriers from now on.
    pub fn abort(&mut self, checkpoint: u64) -> AlignStep {
        let mut step = AlignStep::default();
        if let Some(a) = &self.current
            && a.checkpoint <= checkpoint
        {
            step.unblock_all = true;
            step.subsumed = Some(a.checkpoint);
            self.current = None;
        }
        self.last = self.last.max(checkpoint);
        step
    }

    fn finish_alignment(&mut self, step: &mut AlignStep) {
        if let Some(a) = self.current.take() {
            self.last = a.checkpoint;
            step.complete = Some(a.checkpoint);
            step.unblock_all = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_channel_aligns_at_once() {
        let mut a = BarrierAligner::new(&[1]);
        let s = a.on_barrier(0, 0, 1).unwrap();
        assert_eq!(s.complete, Some(1));
        assert!(!s.block);
    }

    #[test]
    fn channels_block_until_every_open_channel_delivered_the_barrier() {
        let mut a = BarrierAligner::new(&[2, 1]);
        assert!(a.on_barrier(0, 1, 4).unwrap().block);
        assert_eq!(a.aligning(), Some(4));
        assert!(a.on_barrier(1, 0, 4).unwrap().block);
        let s = a.on_barrier(0, 0, 4).unwrap();
        assert_eq!((s.complete, s.unblock_all, s.block), (Some(4), true, false));
        assert_eq!(a.aligning(), None);
    }

    #[test]
    fn an_ended_channel_counts_as_aligned() {
        let mut a = BarrierAligner::new(&[3]);
        assert!(a.on_barrier(0, 0, 1).unwrap().block);
        assert_eq!(a.on_end(0, 2).complete, None);
        assert_eq!(a.on_barrier(0, 1, 1).unwrap().complete, Some(1));
        // Checkpoint 2 needs only the two open channels.
        assert!(a.on_barrier(0, 1, 2).unwrap().block);
        assert_eq!(a.on_end(0, 0).complete, Some(2));
    }

    #[test]
    fn a_newer_barrier_subsumes_the_alignment_and_stale_ones_are_ignored() {
        let mut a = BarrierAligner::new(&[2]);
        assert!(a.on_barrier(0, 0, 1).unwrap().block);
        let s = a.on_barrier(0, 1, 2).unwrap();
        assert_eq!((s.subsumed, s.unblock_all, s.block), (Some(1), true, true));
        assert_eq!(a.on_barrier(0, 1, 1).unwrap(), AlignStep::default());
        assert_eq!(a.on_barrier(0, 0, 2).unwrap().complete, Some(2));
    }

    #[test]
    fn abort_releases_the_channels_and_later_barriers_of_it_are_ignored() {
        let mut a = BarrierAligner::new(&[2]);
        a.on_barrier(0, 0, 3).unwrap();
        let s = a.abort(3);
        assert!(s.unblock_all);
        assert_eq!(a.on_barrier(0, 1, 3).unwrap(), AlignStep::default());
        assert_eq!(a.abort(9), AlignStep::default());
        assert_eq!(a.on_barrier(0, 1, 5).unwrap(), AlignStep::default());
    }

    #[test]
    fn a_duplicate_barrier_is_a_protocol_error() {
        let mut a = BarrierAligner::new(&[2]);
        a.on_barrier(0, 0, 1).unwrap();
        assert!(a.on_barrier(0, 0, 1).is_err());
    }
}
