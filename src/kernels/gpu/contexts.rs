//! The device contexts this process holds, and the reset of one that a
//! sticky error broke.
//!
//! Every slot backend on a GPU runs in that device's primary context, so
//! the slots share it. A sticky CUDA error (an illegal address, a kernel
//! trap) breaks the context for all of them: every later call returns the
//! same error. Making a new backend on the same primary context would only
//! fail again; the context has to be reset (`cuDevicePrimaryCtxReset`),
//! and that destroys every allocation, module and stream in it, so it may
//! happen only once no backend uses it.
//!
//! States of one device's entry:
//! - `Live(weak context, lost flag)`: backends share the context; a new
//!   backend gets the same one while any is alive, a fresh one otherwise.
//! - lost (the flag set by [`Lease::mark_lost`] after a probe saw a sticky
//!   error): every backend of the context reads the flag before each batch
//!   and takes itself out of service ([`crate::kernels::health`]); opening
//!   a backend fails with [`OpenError::WaitingForRelease`] while any still
//!   holds the context, and the first open after the last one is gone
//!   resets the device, then opens a fresh context with a new flag.
//!
//! The registry is generic over the context type so that this lifecycle is
//! tested without a GPU; the CUDA backend instantiates it with `cudarc`'s
//! context and the driver's reset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Why a backend could not be given a context.
#[derive(Debug, thiserror::Error)]
pub enum OpenError<E: std::error::Error + 'static> {
    #[error(
        "GPU {ordinal}'s context failed with a sticky error and {holders} backend(s) still hold it; \
         it is reset once they are released"
    )]
    WaitingForRelease { ordinal: u32, holders: usize },
    #[error("resetting GPU {ordinal}'s context after a sticky error failed: {source}")]
    Reset { ordinal: u32, source: E },
    #[error(transparent)]
    Open(E),
}

struct Entry<C> {
    context: Weak<C>,
    lost: Arc<AtomicBool>,
}

/// One device's context as a backend holds it.
pub struct Lease<C> {
    pub context: Arc<C>,
    lost: Arc<AtomicBool>,
}

impl<C> Lease<C> {
    /// Whether the context was found broken by a sticky error (by this
    /// backend or any other on the device).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// The context is broken for good: every backend on it stops using it.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }
}

/// The process's device contexts (see the module docs).
pub struct DeviceContexts<C> {
    devices: Mutex<HashMap<u32, Entry<C>>>,
    resets: AtomicU64,
}

impl<C> Default for DeviceContexts<C> {
    fn default() -> Self {
        DeviceContexts {
            devices: Mutex::new(HashMap::new()),
            resets: AtomicU64::new(0),
        }
    }
}

impl<C> DeviceContexts<C> {
    /// The context of device `ordinal` for a new backend: the live one,
    /// or one `open` makes, after `reset` if the last one was lost.
    pub fn lease<E: std::error::Error + 'static>(
        &self,
        ordinal: u32,
        open: impl FnOnce() -> Result<Arc<C>, E>,
        reset: impl FnOnce() -> Result<(), E>,
    ) -> Result<Lease<C>, OpenError<E>> {
        let mut devices = self
            .devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = devices.get(&ordinal) {
            let lost = entry.lost.load(Ordering::Acquire);
            match (entry.context.upgrade(), lost) {
                (Some(context), false) => {
                    return Ok(Lease {
                        context,
                        lost: Arc::clone(&entry.lost),
                    });
                }
                (Some(context), true) => {
                    return Err(OpenError::WaitingForRelease {
                        ordinal,
                        holders: Arc::strong_count(&context) - 1,
                    });
                }
                (None, true) => {
                    reset().map_err(|source| OpenError::Reset { ordinal, source })?;
                    self.resets.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "GPU {ordinal}: context reset after a sticky error; opening a new one"
                    );
                }
                (None, false) => {}
            }
        }
        let context = open().map_err(OpenError::Open)?;
        let lost = Arc::new(AtomicBool::new(false));
        devices.insert(
            ordinal,
            Entry {
                context: Arc::downgrade(&context),
                lost: Arc::clone(&lost),
            },
        );
        Ok(Lease { context, lost })
    }

    /// Contexts reset after sticky errors.
    pub fn reset_count(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Fail(&'static str);

    struct Context(u32);

    /// Opens number `next`, counting opens and resets.
    struct Driver {
        opened: Cell<u32>,
        resets: Cell<u32>,
    }

    impl Driver {
        fn new() -> Self {
            Driver {
                opened: Cell::new(0),
                resets: Cell::new(0),
            }
        }

        fn lease(&self, registry: &DeviceContexts<Context>) -> Result<Lease<Context>, String> {
            registry
                .lease(
                    0,
                    || {
                        self.opened.set(self.opened.get() + 1);
                        Ok::<_, Fail>(Arc::new(Context(self.opened.get())))
                    },
                    || {
                        self.resets.set(self.resets.get() + 1);
                        Ok(())
                    },
                )
                .map_err(|e| e.to_string())
        }
    }

    #[test]
    fn backends_share_a_live_context_and_a_released_one_is_opened_afresh() {
        let registry = DeviceContexts::default();
        let driver = Driver::new();
        let a = driver.lease(&registry).unwrap();
        let b = driver.lease(&registry).unwrap();
        assert!(Arc::ptr_eq(&a.context, &b.context));
        assert_eq!(driver.opened.get(), 1);
        drop((a, b));
        let c = driver.lease(&registry).unwrap();
        assert_eq!((c.context.0, driver.resets.get()), (2, 0));
    }

    #[test]
    fn a_lost_context_is_reset_only_after_its_last_holder_lets_go() {
        let registry = DeviceContexts::default();
        let driver = Driver::new();
        let a = driver.lease(&registry).unwrap();
        let b = driver.lease(&registry).unwrap();
        a.mark_lost();
        assert!(b.lost(), "every holder sees the loss");
        drop(a);
        let e = driver.lease(&registry).err().expect("b still holds it");
        assert!(e.contains("1 backend(s) still hold it"), "{e}");
        assert_eq!(driver.resets.get(), 0);
        drop(b);
        let fresh = driver.lease(&registry).unwrap();
        assert_eq!((fresh.context.0, driver.resets.get()), (2, 1));
        assert!(!fresh.lost(), "the new context has its own flag");
        assert_eq!(registry.reset_count(), 1);
    }

    #[test]
    fn a_failed_reset_is_retried_by_the_next_open() {
        let registry = DeviceContexts::<Context>::default();
        let first = registry
            .lease(0, || Ok::<_, Fail>(Arc::new(Context(1))), || Ok(()))
            .unwrap();
        first.mark_lost();
        drop(first);
        let e = registry
            .lease(
                0,
                || Ok(Arc::new(Context(2))),
                || Err(Fail("CUDA_ERROR_UNKNOWN")),
            )
            .err()
            .expect("reset failed");
        assert!(e.to_string().contains("CUDA_ERROR_UNKNOWN"), "{e}");
        let again = registry
            .lease(0, || Ok::<_, Fail>(Arc::new(Context(3))), || Ok(()))
            .unwrap();
        assert_eq!(again.context.0, 3);
    }

    /// A seeded schedule of leases, losses and releases on two devices:
    /// a lost context is never handed out, never reset while held, and
    /// reset exactly once per loss.
    #[test]
    fn random_schedules_never_share_or_reset_a_held_lost_context() {
        for seed in 0..300u64 {
            let registry = DeviceContexts::<Context>::default();
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut held: Vec<(u32, Lease<Context>)> = Vec::new();
            let opened = Cell::new(0u32);
            let losses = [Cell::new(0u64), Cell::new(0u64)];
            for _ in 0..200 {
                let ordinal = next(2) as u32;
                match next(4) {
                    0 | 1 => {
                        let holders_of_lost = held
                            .iter()
                            .filter(|(o, l)| *o == ordinal && l.lost())
                            .count();
                        let result = registry.lease(
                            ordinal,
                            || {
                                opened.set(opened.get() + 1);
                                Ok::<_, Fail>(Arc::new(Context(opened.get())))
                            },
                            || {
                                assert_eq!(holders_of_lost, 0, "seed {seed}: reset while held");
                                Ok(())
                            },
                        );
                        match result {
                            Ok(lease) => {
                                assert!(!lease.lost(), "seed {seed}: a lost context handed out");
                                held.push((ordinal, lease));
                            }
                            Err(OpenError::WaitingForRelease { holders, .. }) => {
                                assert_eq!(holders, holders_of_lost, "seed {seed}");
                            }
                            Err(e) => panic!("seed {seed}: {e}"),
                        }
                    }
                    2 if !held.is_empty() => {
                        let i = next(held.len() as u64) as usize;
                        if !held[i].1.lost() {
                            losses[held[i].0 as usize].set(losses[held[i].0 as usize].get() + 1);
                        }
                        held[i].1.mark_lost();
                    }
                    _ if !held.is_empty() => {
                        let i = next(held.len() as u64) as usize;
                        held.swap_remove(i);
                    }
                    _ => {}
                }
            }
            held.clear();
            // Each device's outstanding loss is reset by its next open.
            for ordinal in 0..2u32 {
                registry
                    .lease(ordinal, || Ok::<_, Fail>(Arc::new(Context(0))), || Ok(()))
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            }
            let total = losses[0].get() + losses[1].get();
            assert_eq!(
                registry.reset_count(),
                total,
                "seed {seed}: one reset per loss"
            );
        }
    }
}
