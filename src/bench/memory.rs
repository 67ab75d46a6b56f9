//! Memory: copy bandwidth on one thread and on every core (the machine is
//! its own reference: the many-thread figure is a ratio to the one-thread
//! one), the cost of touching a fresh page (against a warm copy of a page),
//! and strata's managed-memory pages (against first touch of the same
//! bytes, and a warm copy of a page once the pool reuses them).
#![allow(unsafe_code)]

use std::sync::Barrier;

use super::report::{Figure, Size, Unit};
use super::{BenchError, Recorder, Section, best_of};
use crate::memory::PagePool;

/// strata's managed page size (`taskmanager.memory.page-size`'s default).
const MANAGED_PAGE_BYTES: usize = 32 << 10;
const OS_PAGE_BYTES: usize = 4096;

pub fn run(recorder: &mut Recorder<'_>) -> Result<(), BenchError> {
    let plan = recorder.plan;
    let total = plan.memory_bytes;
    let reps = plan.repetitions;

    recorder.step("memory: copy bandwidth");
    let mut sizes = vec![32 << 10, 1 << 20, 16 << 20, total];
    sizes.retain(|&s| s <= total);
    sizes.dedup();
    let mut single = 0.0;
    for &size in &sizes {
        let rate = copy_rate(size, total, reps);
        recorder.figure(
            Figure::new(Section::Memory, "copy 1 thread", rate, Unit::BytesPerS)
                .at(Size::Bytes(size as u64))
                .plotted("memory-copy"),
        );
        single = rate;
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    recorder.step("memory: copy on every core");
    let multi = parallel_copy_rate(total, threads, reps);
    recorder.figure(
        Figure::new(
            Section::Memory,
            format!("copy {threads} threads"),
            multi,
            Unit::BytesPerS,
        )
        .at(Size::Bytes(total as u64))
        .against("copy 1 thread", single, Unit::BytesPerS),
    );

    recorder.step("memory: first touch");
    let warm_page_s = OS_PAGE_BYTES as f64 / single.max(1.0);
    let touch_s = first_touch_s_per_page(total, reps)?;
    recorder.figure(
        Figure::new(
            Section::Memory,
            "first touch per 4 KiB page",
            touch_s,
            Unit::Seconds,
        )
        .against("warm copy of 4 KiB", warm_page_s, Unit::Seconds),
    );

    recorder.step("memory: managed pages");
    let (fresh_s, reused_s) = managed_page_s(total, reps);
    let pages_per_managed = (MANAGED_PAGE_BYTES / OS_PAGE_BYTES) as f64;
    recorder.figure(
        Figure::new(
            Section::Memory,
            "managed page 32 KiB, first use",
            fresh_s,
            Unit::Seconds,
        )
        .against(
            "first touch of 32 KiB",
            touch_s * pages_per_managed,
            Unit::Seconds,
        ),
    );
    recorder.figure(
        Figure::new(
            Section::Memory,
            "managed page 32 KiB, reused",
            reused_s,
            Unit::Seconds,
        )
        .against(
            "warm copy of 32 KiB",
            warm_page_s * pages_per_managed,
            Unit::Seconds,
        ),
    );
    Ok(())
}

/// Bytes per second of copying a `size`-byte buffer into another, repeated
/// until `total` bytes moved; both buffers touched first.
fn copy_rate(size: usize, total: usize, reps: u32) -> f64 {
    let source = vec![1u8; size];
    let mut target = vec![0u8; size];
    target.copy_from_slice(&source);
    let rounds = total.div_ceil(size);
    let best = best_of::<()>(reps, || {
        for _ in 0..rounds {
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&mut target);
        }
        Ok(())
    })
    .unwrap_or(f64::INFINITY);
    (rounds * size) as f64 / best
}

/// Bytes per second of `threads` threads each copying its share of `total`
/// between buffers of its own, started together.
fn parallel_copy_rate(total: usize, threads: usize, reps: u32) -> f64 {
    let share = (total / threads).max(OS_PAGE_BYTES);
    let mut buffers: Vec<(Vec<u8>, Vec<u8>)> = (0..threads)
        .map(|_| (vec![1u8; share], vec![0u8; share]))
        .collect();
    let mut best_s = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let barrier = Barrier::new(threads + 1);
        let elapsed = std::thread::scope(|scope| {
            for (source, target) in buffers.iter_mut() {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    target.copy_from_slice(std::hint::black_box(source));
                    std::hint::black_box(target);
                });
            }
            barrier.wait();
            std::time::Instant::now()
        })
        .elapsed();
        best_s = best_s.min(elapsed.as_secs_f64());
    }
    (share * threads) as f64 / best_s.max(1e-9)
}

/// Seconds per 4 KiB page of writing one byte into each page of a fresh
/// anonymous mapping: the page fault and the kernel's zeroing.
fn first_touch_s_per_page(total: usize, reps: u32) -> Result<f64, BenchError> {
    let pages = total / OS_PAGE_BYTES;
    let mut best_s = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let mut region =
            FreshRegion::map(pages * OS_PAGE_BYTES).map_err(|source| BenchError::File {
                what: "mapping anonymous memory for",
                path: "first touch".into(),
                source,
            })?;
        let started = std::time::Instant::now();
        for page in region.as_mut_slice().chunks_mut(OS_PAGE_BYTES) {
            page[0] = 1;
        }
        std::hint::black_box(region.as_mut_slice());
        best_s = best_s.min(started.elapsed().as_secs_f64());
    }
    Ok(best_s / pages.max(1) as f64)
}

/// Seconds per page of allocating a slot's budget of managed pages from a
/// fresh pool (first use: allocated and zeroed), and again once they were
/// handed back (reused from the free list).
fn managed_page_s(total: usize, reps: u32) -> (f64, f64) {
    let count = (total / MANAGED_PAGE_BYTES).max(1);
    let mut fresh_s = f64::INFINITY;
    let mut reused_s = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let pool = PagePool::new((count * MANAGED_PAGE_BYTES) as u64, MANAGED_PAGE_BYTES);
        let memory = pool.slot_manager(0, (count * MANAGED_PAGE_BYTES) as u64);
        let started = std::time::Instant::now();
        let pages = memory
            .allocate_pages(count)
            .expect("the budget fits the pool");
        fresh_s = fresh_s.min(started.elapsed().as_secs_f64());
        drop(pages);
        let started = std::time::Instant::now();
        let pages = memory
            .allocate_pages(count)
            .expect("the budget fits the pool");
        reused_s = reused_s.min(started.elapsed().as_secs_f64());
        std::hint::black_box(&pages);
    }
    (fresh_s / count as f64, reused_s / count as f64)
}

/// Anonymous memory straight from `mmap`, so that every page is fresh: an
/// allocator would hand back pages it touched before, and first touch
/// would measure a memset instead of a page fault.
struct FreshRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl FreshRegion {
    fn map(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address the kernel
        // picks aliases nothing; the result is checked before it is used.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null pointer"))?;
        Ok(Self { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` readable and writable bytes (zero
        // until written), owned by `self` until `drop` unmaps it; `&mut
        // self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FreshRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly what `mmap` returned and
        // nothing borrows the region any more (`as_mut_slice` borrows `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Plan;

    #[test]
    fn memory_section_reports_each_figure_with_its_reference() {
        let plan = Plan::new(true, 1.0 / 64.0);
        let progress = indicatif::ProgressBar::hidden();
        let mut recorder = Recorder::new(&plan, &progress);
        run(&mut recorder).unwrap();
        let (figures, skipped) = recorder.into_parts();
        assert!(skipped.is_empty(), "{skipped:?}");
        for name in [
            "copy 1 thread",
            "first touch per 4 KiB page",
            "managed page 32 KiB, first use",
            "managed page 32 KiB, reused",
        ] {
            let figure = figures
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name} missing: {figures:?}"));
            assert!(figure.value.is_finite() && figure.value > 0.0, "{figure:?}");
        }
        let multi = figures
            .iter()
            .find(|f| f.name.ends_with("threads"))
            .unwrap();
        assert!(multi.ratio.is_some(), "{multi:?}");
    }
}
