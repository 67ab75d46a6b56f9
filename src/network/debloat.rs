//! Buffer debloating, as in Flink (FLIP-183): size in-flight buffers so a
//! gate's buffered data takes about `target` to consume.
//!
//! The consumer measures its throughput over each `period`; the new buffer
//! size is `throughput × target ÷ buffers in use` (exclusive buffers of every
//! remote channel plus the gate's floating buffers), clamped to
//! `[min_buffer_bytes, segment payload]`. It is announced to the producers
//! (`BufferSize` on each remote channel) only when it moves by more than
//! [`THRESHOLD_PERCENT`], so the network is not flooded with resizes.
//! Smaller buffers mean less data in flight in front of a slow operator, and
//! so faster checkpoint barriers; with fast consumers buffers stay whole.
//!
//! Pure: the caller passes the time in, so tests need no clock.

use std::time::Duration;

/// Flink's `taskmanager.network.memory.buffer-debloat.threshold-percentages`.
pub const THRESHOLD_PERCENT: u64 = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebloatConfig {
    pub target: Duration,
    pub period: Duration,
    pub min_buffer_bytes: usize,
    pub max_buffer_bytes: usize,
}

#[derive(Debug)]
pub struct Debloater {
    config: DebloatConfig,
    buffers_in_use: usize,
    window_start: Option<Duration>,
    window_bytes: u64,
    announced: usize,
}

impl Debloater {
    pub fn new(config: DebloatConfig, buffers_in_use: usize) -> Self {
        Self {
            config,
            buffers_in_use: buffers_in_use.max(1),
            window_start: None,
            window_bytes: 0,
            announced: config.max_buffer_bytes,
        }
    }

    /// Records `bytes` consumed at time `now` (since any fixed origin);
    /// returns a buffer size to announce when a period closed and the size
    /// moved past the threshold.
    pub fn on_consumed(&mut self, bytes: usize, now: Duration) -> Option<usize> {
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        let elapsed = now.saturating_sub(start);
        if elapsed < self.config.period {
            return None;
        }
        let throughput = self.window_bytes as f64 / elapsed.as_secs_f64();
        self.window_start = Some(now);
        self.window_bytes = 0;
        let wanted = throughput * self.config.target.as_secs_f64() / self.buffers_in_use as f64;
        let size = (wanted as usize).clamp(
            self.config
                .min_buffer_bytes
                .min(self.config.max_buffer_bytes),
            self.config.max_buffer_bytes,
        );
        let moved = size.abs_diff(self.announced) as u64 * 100;
        if moved <= THRESHOLD_PERCENT * self.announced as u64 {
            return None;
        }
        self.announced = size;
        Some(size)
    }

    pub fn buffer_size(&self) -> usize {
        self.announced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: DebloatConfig = DebloatConfig {
        target: Duration::from_secs(1),
        period: Duration::from_millis(200),
        min_buffer_bytes: 256,
        max_buffer_bytes: 32 * 1024,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slow_consumers_get_smaller_buffers() {
        // 10 buffers in use; 11 reads of 400 B in 0.2 s is 22 KB/s: 1 s of
        // data is 22 KB, 2.2 KB a buffer.
        let mut d = Debloater::new(CONFIG, 10);
        let mut announced = None;
        for t in 0..=10 {
            announced = announced.or(d.on_consumed(400, ms(t * 20)));
        }
        assert_eq!(announced, Some(2200));
        assert_eq!(d.buffer_size(), 2200);
    }

    #[test]
    fn fast_consumers_keep_whole_segments_and_nothing_is_announced() {
        let mut d = Debloater::new(CONFIG, 10);
        for t in 0..=50 {
            assert_eq!(d.on_consumed(1 << 20, ms(t * 20)), None);
        }
        assert_eq!(d.buffer_size(), 32 * 1024);
    }

    #[test]
    fn sizes_are_clamped_and_small_moves_are_not_announced() {
        let mut d = Debloater::new(CONFIG, 1000);
        let mut last = None;
        for t in 0..=10 {
            last = last.or(d.on_consumed(10, ms(t * 20)));
        }
        assert_eq!(last, Some(256), "clamped to the minimum");
        // 11 × 5 B in 0.2 s maps to 275 B (+7%): below the threshold.
        let mut d2 = Debloater::new(CONFIG, 1);
        d2.announced = 256;
        let mut moved = None;
        for t in 0..=10 {
            moved = moved.or(d2.on_consumed(5, ms(t * 20)));
        }
        assert_eq!(moved, None);
    }
}
