//! Restart strategies: whether, and after how long, the JobManager restarts a
//! failed job (Flink's `RestartBackoffTimeStrategy`s).
//!
//! Pure logic with no clock and no random source of its own: the caller
//! passes the time of each failure (measured from the job's start) and a
//! uniform random number for the jitter, so the simulator can drive it from
//! its seed and replay any sequence of failures.
//!
//! - `none` never restarts.
//! - `fixed-delay` restarts `restart-strategy.fixed-delay.attempts` times,
//!   each after `restart-strategy.fixed-delay.delay`, then gives up.
//! - `exponential-delay` waits `initial-backoff × multiplier^k` (capped at
//!   `max-backoff`) before the k-th restart since the last reset, spread by
//!   ±`jitter-factor` of that back-off. A job that ran for
//!   `reset-backoff-threshold` since its previous restart starts over at the
//!   initial back-off. It gives up when more than
//!   `attempts-before-reset-backoff` restarts happen without a reset. A
//!   failure that arrives while a restart is still pending belongs to the
//!   same failover: it is answered with what remains of that delay and does
//!   not count as another attempt (several tasks failing together cost one
//!   attempt, as in Flink).
//!
//! Two deliberate differences from Flink's exponential-delay: the jitter is
//! applied to the capped back-off (so it still spreads restarts once the
//! back-off reached its maximum), and the jittered delay is bounded by
//! `[0, max-backoff]` rather than `[initial-backoff, max-backoff]` (so the
//! spread stays uniform on the first restart as well).

use std::time::Duration;

use crate::config::{Config, RestartStrategyKind, format_duration};

/// What to do about one failure of the job.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartDecision {
    /// Restart the job after `delay`. `attempt` numbers the job's restarts
    /// from 1 and never goes back (a back-off reset does not renumber), so
    /// it can serve as the redeployed tasks' attempt number.
    Restart { delay: Duration, attempt: u32 },
    /// Fail the job; `reason` names the strategy and the limit it reached.
    GiveUp { reason: String },
}

/// One job's restart strategy and the failures it has seen.
#[derive(Debug, Clone)]
pub struct RestartStrategy {
    policy: Policy,
    /// Whether `restart-strategy.type` was unset and Flink's default chose the policy.
    defaulted: bool,
    /// Restarts granted so far, over the job's lifetime.
    restart_count: u32,
}

#[derive(Debug, Clone)]
enum Policy {
    None,
    FixedDelay { attempts: u32, delay: Duration },
    ExponentialDelay(ExponentialDelay),
}

#[derive(Debug, Clone)]
struct ExponentialDelay {
    initial_backoff: Duration,
    max_backoff: Duration,
    multiplier: f64,
    reset_threshold: Duration,
    jitter: f64,
    attempts_before_reset: u32,
    /// Restarts granted since the back-off last started over.
    attempts_since_reset: u32,
    /// When the last granted restart happens (its failure time plus delay).
    restart_at: Option<Duration>,
}

impl RestartStrategy {
    /// The strategy `restart-strategy.*` configure, with Flink's default
    /// (exponential-delay with checkpointing, none without) resolved.
    pub fn from_config(config: &Config) -> Self {
        let policy = match config.effective_restart_strategy() {
            RestartStrategyKind::None => Policy::None,
            RestartStrategyKind::FixedDelay => Policy::FixedDelay {
                attempts: config.restart_fixed_delay_attempts,
                delay: config.restart_fixed_delay_delay,
            },
            RestartStrategyKind::ExponentialDelay => Policy::ExponentialDelay(ExponentialDelay {
                initial_backoff: config.restart_exp_initial_backoff,
                max_backoff: config.restart_exp_max_backoff,
                multiplier: config.restart_exp_multiplier,
                reset_threshold: config.restart_exp_reset_threshold,
                jitter: config.restart_exp_jitter,
                attempts_before_reset: config.restart_exp_attempts,
                attempts_since_reset: 0,
                restart_at: None,
            }),
        };
        if let Policy::ExponentialDelay(exp) = &policy {
            assert!(exp.initial_backoff <= exp.max_backoff, "config validation");
            assert!(exp.multiplier >= 1.0 && (0.0..=1.0).contains(&exp.jitter));
        }
        RestartStrategy {
            policy,
            defaulted: config.restart_strategy.is_none(),
            restart_count: 0,
        }
    }

    pub fn kind(&self) -> RestartStrategyKind {
        match self.policy {
            Policy::None => RestartStrategyKind::None,
            Policy::FixedDelay { .. } => RestartStrategyKind::FixedDelay,
            Policy::ExponentialDelay(_) => RestartStrategyKind::ExponentialDelay,
        }
    }

    /// One line for the JobManager's log and the job's status, e.g.
    /// `fixed-delay (1 attempt, delay 1 s)`.
    pub fn describe(&self) -> String {
        let described = match &self.policy {
            Policy::None => "none".to_owned(),
            Policy::FixedDelay { attempts, delay } => format!(
                "fixed-delay ({}, delay {})",
                plural(*attempts, "attempt"),
                format_duration(*delay)
            ),
            Policy::ExponentialDelay(exp) => format!(
                "exponential-delay (initial backoff {}, max {}, multiplier {}, \
                 reset after {}, jitter {}, {} before reset)",
                format_duration(exp.initial_backoff),
                format_duration(exp.max_backoff),
                exp.multiplier,
                format_duration(exp.reset_threshold),
                exp.jitter,
                plural(exp.attempts_before_reset, "attempt"),
            ),
        };
        if !self.defaulted {
            return described;
        }
        let why = match self.policy {
            Policy::ExponentialDelay(_) => "the default with checkpointing",
            _ => "the default without checkpointing",
        };
        format!("{described}, {why}")
    }

    /// A failure of the job at `now` (time since the job started); `random`
    /// is uniform in [0, 1) and spreads the exponential-delay jitter.
    pub fn on_failure(&mut self, now: Duration, random: f64) -> RestartDecision {
        debug_assert!((0.0..1.0).contains(&random), "random = {random}");
        let granted = match &mut self.policy {
            Policy::None => Err(none_reason(self.defaulted)),
            Policy::FixedDelay { attempts, delay } => {
                if self.restart_count < *attempts {
                    Ok(*delay)
                } else {
                    Err(format!(
                        "restart strategy fixed-delay gave up after {} \
                         (restart-strategy.fixed-delay.attempts = {attempts})",
                        plural(self.restart_count, "attempt")
                    ))
                }
            }
            Policy::ExponentialDelay(exp) => {
                if let Some(pending) = exp.restart_at.filter(|at| now < *at) {
                    return RestartDecision::Restart {
                        delay: pending - now,
                        attempt: self.restart_count,
                    };
                }
                exp.on_failure(now, random)
            }
        };
        match granted {
            Ok(delay) => {
                self.restart_count = self.restart_count.saturating_add(1);
                RestartDecision::Restart {
                    delay,
                    attempt: self.restart_count,
                }
            }
            Err(reason) => RestartDecision::GiveUp { reason },
        }
    }
}

fn none_reason(defaulted: bool) -> String {
    let setting = if defaulted {
        "restart-strategy.type is unset and checkpointing is off"
    } else {
        "restart-strategy.type = none"
    };
    format!("restart strategy none does not restart a failed job ({setting})")
}

impl ExponentialDelay {
    /// Counts a new failover at `now`: resets the back-off after a long
    /// enough run, then grants a delay or gives up.
    fn on_failure(&mut self, now: Duration, random: f64) -> Result<Duration, String> {
        let ran_since_restart = self.restart_at.map(|at| now.saturating_sub(at));
        if ran_since_restart.is_some_and(|ran| ran >= self.reset_threshold) {
            self.attempts_since_reset = 0;
        }
        if self.attempts_since_reset >= self.attempts_before_reset {
            return Err(format!(
                "restart strategy exponential-delay gave up after {} without a back-off reset \
                 (restart-strategy.exponential-delay.attempts-before-reset-backoff = {})",
                plural(self.attempts_since_reset, "attempt"),
                self.attempts_before_reset
            ));
        }
        let backoff = backoff(
            self.initial_backoff,
            self.max_backoff,
            self.multiplier,
            self.attempts_since_reset,
        );
        let delay = jittered(backoff, self.max_backoff, self.jitter, random);
        self.attempts_since_reset += 1;
        self.restart_at = Some(now + delay);
        Ok(delay)
    }
}

/// `initial × multiplier^exponent`, capped at `max`.
fn backoff(initial: Duration, max: Duration, multiplier: f64, exponent: u32) -> Duration {
    let grown = initial.as_secs_f64() * multiplier.powf(f64::from(exponent));
    // `min` also turns an overflow to infinity into the cap.
    Duration::from_secs_f64(grown.min(max.as_secs_f64()))
}

/// `backoff` moved uniformly within ±`jitter × backoff` by `random` in
/// [0, 1), never below zero nor above `max`.
fn jittered(backoff: Duration, max: Duration, jitter: f64, random: f64) -> Duration {
    let random = random.clamp(0.0, 1.0);
    let factor = 1.0 + jitter * (2.0 * random - 1.0);
    let secs = (backoff.as_secs_f64() * factor).clamp(0.0, max.as_secs_f64());
    Duration::from_secs_f64(secs)
}

fn plural(count: u32, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(overrides: &[&str]) -> Config {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::from_overrides(&overrides).unwrap()
    }

    fn exponential(extra: &[&str]) -> RestartStrategy {
        let mut overrides = vec!["restart-strategy.type=exponential-delay"];
        overrides.extend_from_slice(extra);
        RestartStrategy::from_config(&config(&overrides))
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn delay_of(decision: RestartDecision) -> Duration {
        match decision {
            RestartDecision::Restart { delay, .. } => delay,
            RestartDecision::GiveUp { reason } => panic!("gave up: {reason}"),
        }
    }

    #[test]
    fn default_is_none_without_checkpointing_and_exponential_with_it() {
        let mut strategy = RestartStrategy::from_config(&Config::default());
        assert_eq!(strategy.kind(), RestartStrategyKind::None);
        assert_eq!(
            strategy.describe(),
            "none, the default without checkpointing"
        );
        let RestartDecision::GiveUp { reason } = strategy.on_failure(secs(1.0), 0.5) else {
            panic!("none restarted");
        };
        assert!(reason.contains("checkpointing is off"), "{reason}");

        let strategy =
            RestartStrategy::from_config(&config(&["execution.checkpointing.interval=1 s"]));
        assert_eq!(strategy.kind(), RestartStrategyKind::ExponentialDelay);
        assert!(
            strategy
                .describe()
                .ends_with(", the default with checkpointing"),
            "{}",
            strategy.describe()
        );
    }

    #[test]
    fn none_always_gives_up_naming_the_setting() {
        let mut strategy = RestartStrategy::from_config(&config(&[
            "execution.checkpointing.interval=1 s",
            "restart-strategy.type=none",
        ]));
        assert_eq!(strategy.describe(), "none");
        for _ in 0..3 {
            assert_eq!(
                strategy.on_failure(secs(5.0), 0.0),
                RestartDecision::GiveUp {
                    reason: "restart strategy none does not restart a failed job \
                             (restart-strategy.type = none)"
                        .into()
                }
            );
        }
    }

    #[test]
    fn fixed_delay_restarts_attempts_times_then_gives_up() {
        let mut strategy = RestartStrategy::from_config(&config(&[
            "restart-strategy.type=fixed-delay",
            "restart-strategy.fixed-delay.attempts=3",
            "restart-strategy.fixed-delay.delay=2 s",
        ]));
        assert_eq!(strategy.describe(), "fixed-delay (3 attempts, delay 2 s)");
        for attempt in 1..=3 {
            let now = secs(10.0 * f64::from(attempt));
            assert_eq!(
                strategy.on_failure(now, 0.9),
                RestartDecision::Restart {
                    delay: secs(2.0),
                    attempt
                }
            );
        }
        let RestartDecision::GiveUp { reason } = strategy.on_failure(secs(100.0), 0.0) else {
            panic!("restarted a fourth time");
        };
        assert_eq!(
            reason,
            "restart strategy fixed-delay gave up after 3 attempts \
             (restart-strategy.fixed-delay.attempts = 3)"
        );
    }

    #[test]
    fn fixed_delay_default_gives_up_after_one_attempt() {
        let mut strategy =
            RestartStrategy::from_config(&config(&["restart-strategy.type=fixed-delay"]));
        assert_eq!(strategy.describe(), "fixed-delay (1 attempt, delay 1 s)");
        assert!(matches!(
            strategy.on_failure(secs(0.0), 0.0),
            RestartDecision::Restart { attempt: 1, .. }
        ));
        assert_eq!(
            strategy.on_failure(secs(60.0), 0.0),
            RestartDecision::GiveUp {
                reason: "restart strategy fixed-delay gave up after 1 attempt \
                         (restart-strategy.fixed-delay.attempts = 1)"
                    .into()
            }
        );
    }

    #[test]
    fn fixed_delay_with_zero_attempts_never_restarts() {
        let mut strategy = RestartStrategy::from_config(&config(&[
            "restart-strategy.type=fixed-delay",
            "restart-strategy.fixed-delay.attempts=0",
        ]));
        assert!(matches!(
            strategy.on_failure(secs(0.0), 0.0),
            RestartDecision::GiveUp { .. }
        ));
    }

    #[test]
    fn exponential_backoff_grows_by_the_multiplier_up_to_the_max() {
        let mut strategy = exponential(&[
            "restart-strategy.exponential-delay.jitter-factor=0",
            "restart-strategy.exponential-delay.backoff-multiplier=2",
            "restart-strategy.exponential-delay.max-backoff=10 s",
        ]);
        assert_eq!(
            strategy.describe(),
            "exponential-delay (initial backoff 1 s, max 10 s, multiplier 2, reset after 1 h, \
             jitter 0, 4294967295 attempts before reset)"
        );
        let mut now = secs(0.0);
        let mut delays = Vec::new();
        for attempt in 1..=6 {
            let decision = strategy.on_failure(now, 0.3);
            let RestartDecision::Restart { delay, attempt: a } = decision else {
                panic!("gave up");
            };
            assert_eq!(a, attempt);
            delays.push(delay.as_secs_f64());
            now += delay + secs(1.0);
        }
        assert_eq!(delays, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]);
    }

    #[test]
    fn exponential_default_multiplier_is_one_and_a_half() {
        let mut strategy = exponential(&["restart-strategy.exponential-delay.jitter-factor=0"]);
        let first = delay_of(strategy.on_failure(secs(0.0), 0.0));
        let second = delay_of(strategy.on_failure(secs(5.0), 0.0));
        let third = delay_of(strategy.on_failure(secs(10.0), 0.0));
        assert_eq!((first, second, third), (secs(1.0), secs(1.5), secs(2.25)));
    }

    #[test]
    fn a_long_enough_run_resets_the_backoff_and_the_attempt_budget() {
        let mut strategy = exponential(&[
            "restart-strategy.exponential-delay.jitter-factor=0",
            "restart-strategy.exponential-delay.backoff-multiplier=2",
            "restart-strategy.exponential-delay.reset-backoff-threshold=1 min",
            "restart-strategy.exponential-delay.attempts-before-reset-backoff=2",
        ]);
        // Restarted at 1 s and at 2 + 2 = 4 s.
        assert_eq!(delay_of(strategy.on_failure(secs(0.0), 0.0)), secs(1.0));
        assert_eq!(delay_of(strategy.on_failure(secs(2.0), 0.0)), secs(2.0));
        // Ran 59 s since the restart at 4 s: not long enough, and the budget is spent.
        let RestartDecision::GiveUp { reason } = strategy.on_failure(secs(63.0), 0.0) else {
            panic!("restarted a third time without a reset");
        };
        assert_eq!(
            reason,
            "restart strategy exponential-delay gave up after 2 attempts without a back-off \
             reset (restart-strategy.exponential-delay.attempts-before-reset-backoff = 2)"
        );
        // Ran exactly the threshold: back to the initial back-off and a fresh budget;
        // the attempt number keeps counting.
        assert_eq!(
            strategy.on_failure(secs(64.0), 0.0),
            RestartDecision::Restart {
                delay: secs(1.0),
                attempt: 3
            }
        );
        assert_eq!(delay_of(strategy.on_failure(secs(70.0), 0.0)), secs(2.0));
    }

    #[test]
    fn a_failure_while_a_restart_is_pending_costs_no_attempt() {
        let mut strategy = exponential(&[
            "restart-strategy.exponential-delay.jitter-factor=0",
            "restart-strategy.exponential-delay.attempts-before-reset-backoff=1",
        ]);
        assert_eq!(
            strategy.on_failure(secs(10.0), 0.0),
            RestartDecision::Restart {
                delay: secs(1.0),
                attempt: 1
            }
        );
        assert_eq!(
            strategy.on_failure(secs(10.25), 0.0),
            RestartDecision::Restart {
                delay: secs(0.75),
                attempt: 1
            }
        );
        // At the restart time itself the restart has happened: a new failover.
        assert!(matches!(
            strategy.on_failure(secs(11.0), 0.0),
            RestartDecision::GiveUp { .. }
        ));
    }

    #[test]
    fn jitter_spreads_the_delay_both_ways() {
        let mut low = exponential(&["restart-strategy.exponential-delay.initial-backoff=10 s"]);
        let mut high = low.clone();
        assert_eq!(delay_of(low.on_failure(secs(0.0), 0.0)), secs(9.0));
        let high_delay = delay_of(high.on_failure(secs(0.0), 0.999_999));
        assert!(high_delay > secs(10.99) && high_delay <= secs(11.0));
    }

    #[test]
    fn jitter_at_the_cap_only_lowers_the_delay() {
        let mut strategy = exponential(&[
            "restart-strategy.exponential-delay.initial-backoff=1 min",
            "restart-strategy.exponential-delay.jitter-factor=0.5",
        ]);
        assert_eq!(delay_of(strategy.on_failure(secs(0.0), 0.99)), secs(60.0));
        assert_eq!(delay_of(strategy.on_failure(secs(100.0), 0.0)), secs(30.0));
    }

    #[test]
    fn backoff_saturates_at_the_max_after_very_many_attempts() {
        let initial = secs(1.0);
        let max = secs(60.0);
        assert_eq!(backoff(initial, max, 1.5, u32::MAX), max);
        assert_eq!(backoff(initial, max, 1.0, u32::MAX), initial);
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_its_bounds(
            initial_ms in 1u64..120_000,
            extra_ms in 0u64..600_000,
            multiplier in 1.0f64..4.0,
            jitter in 0.0f64..=1.0,
            failures in proptest::collection::vec((0u64..200_000, 0.0f64..1.0), 1..30),
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = initial + Duration::from_millis(extra_ms);
            let overrides = [
                format!("restart-strategy.exponential-delay.initial-backoff={initial_ms} ms"),
                format!("restart-strategy.exponential-delay.max-backoff={} ms", initial_ms + extra_ms),
                format!("restart-strategy.exponential-delay.backoff-multiplier={multiplier}"),
                format!("restart-strategy.exponential-delay.jitter-factor={jitter}"),
            ];
            let mut strategy = exponential(&overrides.each_ref().map(String::as_str));
            let mut now = Duration::ZERO;
            for (exponent, (gap_ms, random)) in (0u32..).zip(failures) {
                let decision = strategy.on_failure(now, random);
                let RestartDecision::Restart { delay, .. } = decision else {
                    panic!("unlimited attempts gave up");
                };
                // The back-off this restart was drawn around, as the strategy saw it.
                let unjittered = backoff(initial, max, multiplier, exponent);
                let spread = unjittered.as_secs_f64() * jitter;
                prop_assert!(delay <= max, "{delay:?} > {max:?}");
                prop_assert!(delay.as_secs_f64() >= unjittered.as_secs_f64() - spread - 1e-9);
                prop_assert!(delay.as_secs_f64() <= unjittered.as_secs_f64() + spread + 1e-9);
                now += delay + Duration::from_millis(gap_ms);
            }
        }
    }
}
