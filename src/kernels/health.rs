//! One GPU slot's backend and its health.
//!
//! A CUDA error other than out-of-memory (a sticky error after a kernel
//! fault, a lost device, a failed launch) means the backend's context can
//! no longer be trusted. The slot then takes the backend out of service:
//! its batches run on the CPU twin, and after a backoff (doubling up to a
//! maximum) the next batch reopens the backend — a new context — and uses
//! it again if that succeeds.
//!
//! A sticky error breaks the device's shared primary context for every
//! slot on it ([`crate::kernels::gpu::contexts`]): the failing slot's probe
//! marks the context lost, and each other slot sees that before its next
//! batch and goes out of service too, so the context is released by all
//! and reset before any slot reopens on it.
//!
//! States: `Healthy(backend)` → on a device error, or when the backend's
//! context is lost → `Unhealthy { retry_at }`
//! → at `retry_at`, reopen: success → `Healthy(new backend)`; failure →
//! `Unhealthy` with twice the backoff. A failure reported against a backend
//! that has already been replaced changes nothing (a late report from
//! another task must not take the new backend out).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backend::KernelBackend;
use super::gpu::GpuError;

/// Opens (or reopens) a slot's GPU backend.
pub type Reopen = dyn Fn() -> Result<Arc<dyn KernelBackend>, GpuError> + Send + Sync;

/// The first wait before a backend is reopened after a device error.
pub const REOPEN_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The longest wait between reopen attempts.
pub const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(60);

enum State {
    Healthy(Arc<dyn KernelBackend>),
    Unhealthy {
        retry_at: Instant,
        backoff: Duration,
    },
}

/// A GPU slot's backend behind its health state (see the module docs).
pub struct DeviceSlot {
    state: Mutex<State>,
    reopen: Box<Reopen>,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// Device errors reported, and reopen attempts that failed.
    errors: std::sync::atomic::AtomicU64,
    reopened: std::sync::atomic::AtomicU64,
}

impl DeviceSlot {
    pub fn new(backend: Arc<dyn KernelBackend>, reopen: Box<Reopen>) -> Self {
        Self::with_backoff(backend, reopen, REOPEN_BACKOFF_INITIAL, REOPEN_BACKOFF_MAX)
    }

    pub fn with_backoff(
        backend: Arc<dyn KernelBackend>,
        reopen: Box<Reopen>,
        backoff_initial: Duration,
        backoff_max: Duration,
    ) -> Self {
        DeviceSlot {
            state: Mutex::new(State::Healthy(backend)),
            reopen,
            backoff_initial,
            backoff_max: backoff_max.max(backoff_initial),
            errors: Default::default(),
            reopened: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The backend to run on now, or `None` while the slot is out of
    /// service. Reopens the backend when its backoff has passed.
    pub fn current(&self, now: Instant) -> Option<Arc<dyn KernelBackend>> {
        let mut state = self.lock();
        let backoff = match &*state {
            State::Healthy(backend) if backend.context_lost() => {
                // Another slot's sticky error broke the shared context.
                self.errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    "GPU backend out of service: its device context was lost to a sticky error; batches run on the CPU twin until the context is reset, next try in {:.1} s",
                    self.backoff_initial.as_secs_f64()
                );
                *state = State::Unhealthy {
                    retry_at: now + self.backoff_initial,
                    backoff: self.backoff_initial,
                };
                return None;
            }
            State::Healthy(backend) => return Some(Arc::clone(backend)),
            State::Unhealthy { retry_at, .. } if now < *retry_at => return None,
            State::Unhealthy { backoff, .. } => *backoff,
        };
        match (self.reopen)() {
            Ok(backend) => {
                tracing::info!("GPU backend reopened: {}", backend.describe());
                self.reopened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *state = State::Healthy(Arc::clone(&backend));
                Some(backend)
            }
            Err(e) => {
                let backoff = (backoff * 2).min(self.backoff_max);
                tracing::warn!(
                    "GPU backend could not be reopened ({e}); its batches stay on the CPU twin, next try in {:.1} s",
                    backoff.as_secs_f64()
                );
                *state = State::Unhealthy {
                    retry_at: now + backoff,
                    backoff,
                };
                None
            }
        }
    }

    /// `backend` failed with a device error: takes it out of service, if
    /// it is still the slot's backend.
    pub fn report_failure(&self, backend: &Arc<dyn KernelBackend>, error: &GpuError, now: Instant) {
        // Outside the lock: the probe waits for the device.
        let sticky = backend.probe_after_error();
        let mut state = self.lock();
        let State::Healthy(current) = &*state else {
            return;
        };
        if !Arc::ptr_eq(current, backend) {
            return;
        }
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scope = if sticky {
            "the error is sticky: the device's context is lost for every slot on it and is reset once they release it"
        } else {
            "the context still works"
        };
        tracing::warn!(
            "GPU backend unhealthy after a device error ({error}; {scope}); its batches run on the CPU twin, reopening in {:.1} s",
            self.backoff_initial.as_secs_f64()
        );
        *state = State::Unhealthy {
            retry_at: now + self.backoff_initial,
            backoff: self.backoff_initial,
        };
    }

    /// Device errors that took the backend out of service.
    pub fn error_count(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Times the backend was reopened.
    pub fn reopen_count(&self) -> u64 {
        self.reopened.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::backend::CpuBackend;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn backend() -> Arc<dyn KernelBackend> {
        Arc::new(CpuBackend)
    }

    fn device_error() -> GpuError {
        GpuError::Driver {
            call: "cuLaunchKernel",
            reason: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
        }
    }

    /// A slot whose reopen fails `failures` times, then succeeds; counts
    /// the attempts.
    fn slot(failures: u32, attempts: Arc<AtomicU32>) -> DeviceSlot {
        let reopen = move || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            if n < failures {
                Err(GpuError::NoGpu {
                    reason: "still broken".into(),
                })
            } else {
                Ok(backend())
            }
        };
        DeviceSlot::with_backoff(
            backend(),
            Box::new(reopen),
            Duration::from_secs(1),
            Duration::from_secs(4),
        )
    }

    #[test]
    fn a_device_error_takes_the_backend_out_until_the_backoff_then_reopens() {
        let attempts = Arc::new(AtomicU32::new(0));
        let slot = slot(0, Arc::clone(&attempts));
        let t0 = Instant::now();
        let first = slot.current(t0).expect("healthy at start");
        slot.report_failure(&first, &device_error(), t0);
        assert_eq!(slot.error_count(), 1);
        assert!(slot.current(t0 + Duration::from_millis(999)).is_none());
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            0,
            "no reopen before the backoff"
        );
        let reopened = slot.current(t0 + Duration::from_secs(1)).expect("reopened");
        assert!(!Arc::ptr_eq(&first, &reopened), "a new backend");
        assert_eq!(
            (attempts.load(Ordering::SeqCst), slot.reopen_count()),
            (1, 1)
        );
        // A late report against the replaced backend changes nothing.
        slot.report_failure(&first, &device_error(), t0 + Duration::from_secs(2));
        assert!(slot.current(t0 + Duration::from_secs(2)).is_some());
        assert_eq!(slot.error_count(), 1);
    }

    #[test]
    fn failed_reopens_double_the_backoff_up_to_the_maximum() {
        let attempts = Arc::new(AtomicU32::new(0));
        let slot = slot(3, Arc::clone(&attempts));
        let t0 = Instant::now();
        let first = slot.current(t0).expect("healthy");
        slot.report_failure(&first, &device_error(), t0);
        // Tries at 1 s (fails, next in 2 s), 3 s (fails, next in 4 s),
        // 7 s (fails, next in 4 s: the maximum), 11 s (succeeds).
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(slot.current(at(1)).is_none());
        assert!(slot.current(at(2)).is_none());
        assert!(slot.current(at(3)).is_none());
        assert!(slot.current(at(6)).is_none());
        assert!(slot.current(at(7)).is_none());
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert!(slot.current(at(10)).is_none(), "the maximum backoff is 4 s");
        assert!(slot.current(at(11)).is_some());
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
    }

    /// A seeded random schedule of reports and lookups: the slot never
    /// hands out a backend before its retry time after a failure, and every
    /// reopen attempt happens at or after it.
    #[test]
    fn random_schedules_respect_the_backoff() {
        for seed in 0..200u64 {
            let attempts = Arc::new(AtomicU32::new(0));
            let slot = slot((seed % 4) as u32, Arc::clone(&attempts));
            let t0 = Instant::now();
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut now = t0;
            let mut out_until: Option<Instant> = None;
            for _ in 0..100 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                now += Duration::from_millis(rng % 1500);
                let got = slot.current(now);
                if let (Some(until), Some(_)) = (out_until, &got) {
                    assert!(now >= until, "seed {seed}: a backend before its retry time");
                }
                match got {
                    Some(b) if rng % 3 == 0 => {
                        slot.report_failure(&b, &device_error(), now);
                        out_until = Some(now + Duration::from_secs(1));
                    }
                    Some(_) => out_until = None,
                    None => {}
                }
            }
        }
    }
}
