//! Storage: a spill file written and read back through the IOManager's
//! io_uring backend and its thread-pool backend, beside a raw sequential
//! O_DIRECT write and read of the same size, block by block, in the same
//! directory; and fio's sequential write and read of the same size when
//! `fio` is on the PATH.
//!
//! The raw reference is one synchronous `write`/`read` per block from a
//! 4096-aligned buffer (queue depth 1), the floor of what the device does
//! with no help; the spill backends keep up to [`QUEUE_DEPTH`] blocks in
//! flight, as fio's `iodepth`. Where the file system refuses O_DIRECT
//! (tmpfs), the reference is a buffered write with an fsync and the spill
//! files are buffered too; the figure names say which.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::report::{Figure, Size, Unit};
use super::{BenchError, Recorder, Section};
use crate::io::{BackendChoice, BufPool, IoConfig, IoManager, SpillOptions};

/// Blocks in flight for the spill backends and fio.
pub const QUEUE_DEPTH: usize = 32;
/// The most buffer memory one backend's pool may hold.
const BUFFER_BYTES_MAX: usize = 256 << 20;

pub fn run(recorder: &mut Recorder<'_>, dir: &Path) -> Result<(), BenchError> {
    let plan = recorder.plan;
    std::fs::create_dir_all(dir).map_err(|source| BenchError::File {
        what: "creating the storage benchmark directory",
        path: dir.to_owned(),
        source,
    })?;
    for &block in &plan.block_bytes {
        let size = Size::Bytes(block as u64);
        recorder.step(&format!(
            "storage: raw sequential, {size} blocks in {}",
            dir.display()
        ));
        let raw = raw_sequential(dir, plan.storage_bytes, block)?;
        for (label, backend) in [
            ("io_uring", BackendChoice::Uring),
            ("thread pool", BackendChoice::ThreadPool),
        ] {
            recorder.step(&format!("storage: spill through {label}, {size} blocks"));
            match spill(dir, plan.storage_bytes, block, backend) {
                Ok(spilled) => {
                    let mode = if spilled.direct { "" } else { ", buffered" };
                    recorder.figure(
                        Figure::new(
                            Section::Storage,
                            format!("spill write {label}{mode}"),
                            spilled.write_bytes_per_s,
                            Unit::BytesPerS,
                        )
                        .at(size)
                        .plotted("storage-write")
                        .against(
                            raw.write_name(),
                            raw.write_bytes_per_s,
                            Unit::BytesPerS,
                        ),
                    );
                    recorder.figure(
                        Figure::new(
                            Section::Storage,
                            format!("spill read {label}{mode}"),
                            spilled.read_bytes_per_s,
                            Unit::BytesPerS,
                        )
                        .at(size)
                        .plotted("storage-read")
                        .against(
                            raw.read_name(),
                            raw.read_bytes_per_s,
                            Unit::BytesPerS,
                        ),
                    );
                }
                Err(e) => recorder.skip(
                    Section::Storage,
                    &format!("spill {label} at {size}"),
                    e.to_string(),
                ),
            }
        }
    }
    recorder.step("storage: fio");
    fio(
        recorder,
        dir,
        plan.storage_bytes,
        *plan.block_bytes.last().unwrap_or(&(1 << 20)),
    )
}

/// Rates of the raw reference, and whether it got O_DIRECT.
struct Raw {
    direct: bool,
    write_bytes_per_s: f64,
    read_bytes_per_s: f64,
}

impl Raw {
    fn write_name(&self) -> &'static str {
        if self.direct {
            "raw O_DIRECT write"
        } else {
            "raw buffered write + fsync"
        }
    }
    fn read_name(&self) -> &'static str {
        if self.direct {
            "raw O_DIRECT read"
        } else {
            "raw buffered read (page cache)"
        }
    }
}

/// A scratch file of this process, removed when dropped.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    if write {
        options.write(true).create(true).truncate(true);
    } else {
        options.read(true);
    }
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((options.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` in `block`-byte writes from one aligned buffer, then
/// reads them back the same way.
fn raw_sequential(dir: &Path, bytes: u64, block: usize) -> Result<Raw, BenchError> {
    let path = dir.join(format!("strata-bench-{}-raw.tmp", std::process::id()));
    let scratch = ScratchFile(path.clone());
    let io = |what| {
        let path = path.clone();
        move |source| BenchError::File { what, path, source }
    };
    let pool = BufPool::new(block, 1);
    let mut buffer = pool
        .try_acquire(1)
        .map_err(|e| BenchError::Spill {
            dir: dir.to_owned(),
            source: e,
        })?
        .pop()
        .expect("one buffer was asked for");
    buffer.set_len(block);
    fill(buffer.as_mut_slice());
    let blocks = bytes.div_ceil(block as u64);

    let (mut file, direct) = open_direct(&path, true).map_err(io("creating"))?;
    let started = Instant::now();
    for _ in 0..blocks {
        file.write_all(buffer.as_slice()).map_err(io("writing"))?;
    }
    if !direct {
        file.sync_all().map_err(io("syncing"))?;
    }
    let write_s = started.elapsed().as_secs_f64();
    drop(file);

    let (mut file, _) = open_direct(&path, false).map_err(io("opening"))?;
    let started = Instant::now();
    for _ in 0..blocks {
        file.read_exact(buffer.as_mut_slice())
            .map_err(io("reading"))?;
    }
    let read_s = started.elapsed().as_secs_f64();
    drop(scratch);
    let total = (blocks * block as u64) as f64;
    Ok(Raw {
        direct,
        write_bytes_per_s: total / write_s.max(1e-9),
        read_bytes_per_s: total / read_s.max(1e-9),
    })
}

/// Incompressible-looking bytes, as a serializer's output.
fn fill(bytes: &mut [u8]) {
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
    }
}

struct Spilled {
    direct: bool,
    write_bytes_per_s: f64,
    read_bytes_per_s: f64,
}

/// One spill file of `bytes` in `block`-byte blocks (header included, as
/// `examples/spill_bench.rs`), written then read back with checksums
/// verified.
fn spill(
    dir: &Path,
    bytes: u64,
    block: usize,
    backend: BackendChoice,
) -> Result<Spilled, BenchError> {
    let fail = |source| BenchError::Spill {
        dir: dir.to_owned(),
        source,
    };
    let depth = QUEUE_DEPTH.min(BUFFER_BYTES_MAX / block).max(2);
    let io = IoManager::new(IoConfig {
        tmp_dirs: vec![dir.to_owned()],
        backend,
        queue_depth: depth as u32,
        buf_size_bytes: block,
        buf_count_max: depth,
        ..IoConfig::default()
    })
    .map_err(fail)?;
    let direct = io.spill_dirs().iter().all(|d| d.direct_io);
    let options = SpillOptions { buf_count: depth };
    let mut writer = io.create_spill_writer(options).map_err(fail)?;
    let mut payload = vec![0u8; writer.payload_bytes_max()];
    fill(&mut payload);
    let blocks = bytes.div_ceil(block as u64);
    let started = Instant::now();
    for _ in 0..blocks {
        writer.write_block(&payload).map_err(fail)?;
    }
    let file = writer.finish().map_err(fail)?;
    let write_s = started.elapsed().as_secs_f64();
    let on_disk = file.len_bytes();
    let mut reader = io.create_spill_reader(file, options).map_err(fail)?;
    let started = Instant::now();
    let mut read = 0u64;
    while let Some(block) = reader.next_block().map_err(fail)? {
        assert_eq!(block.len(), payload.len(), "a spill block came back short");
        read += 1;
    }
    let read_s = started.elapsed().as_secs_f64();
    assert_eq!(read, blocks, "the spill file lost blocks");
    Ok(Spilled {
        direct,
        write_bytes_per_s: on_disk as f64 / write_s.max(1e-9),
        read_bytes_per_s: on_disk as f64 / read_s.max(1e-9),
    })
}

/// `fio` on the PATH, if any (never installed by strata).
fn fio_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("fio"))
            .find(|candidate| candidate.is_file())
    })
}

/// fio's sequential write then read of the same size, io_uring, O_DIRECT,
/// [`QUEUE_DEPTH`] deep, as a third line beside strata's and the raw one.
fn fio(
    recorder: &mut Recorder<'_>,
    dir: &Path,
    bytes: u64,
    block: usize,
) -> Result<(), BenchError> {
    let Some(fio) = fio_binary() else {
        recorder.skip(Section::Storage, "fio", "fio is not on PATH");
        return Ok(());
    };
    let size = Size::Bytes(block as u64);
    let scratch = ScratchFile(dir.join(format!("strata-bench-{}-fio.tmp", std::process::id())));
    for (rw, label) in [("write", "fio write"), ("read", "fio read")] {
        let output = Command::new(&fio)
            .arg(format!("--name=strata-bench-{rw}"))
            .arg(format!("--filename={}", scratch.0.display()))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={block}"))
            .arg(format!("--size={bytes}"))
            .arg(format!("--iodepth={QUEUE_DEPTH}"))
            .args(["--direct=1", "--ioengine=io_uring", "--output-format=json"])
            .output()
            .map_err(|source| BenchError::File {
                what: "running fio on",
                path: scratch.0.clone(),
                source,
            })?;
        match fio_bandwidth(&output.stdout, rw) {
            Some(rate) if output.status.success() => recorder
                .figure(Figure::new(Section::Storage, label, rate, Unit::BytesPerS).at(size)),
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let reason = stderr.lines().next().unwrap_or("no output").to_owned();
                recorder.skip(Section::Storage, label, format!("fio failed: {reason}"));
            }
        }
    }
    Ok(())
}

/// `jobs[0].<rw>.bw_bytes` of fio's JSON output.
fn fio_bandwidth(stdout: &[u8], rw: &str) -> Option<f64> {
    let text = String::from_utf8_lossy(stdout);
    // fio may print notes before the JSON object.
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{')?..]).ok()?;
    json.get("jobs")?.get(0)?.get(rw)?.get("bw_bytes")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Plan;

    #[test]
    fn storage_section_puts_each_backend_beside_the_raw_reference() {
        let dir = tempfile::tempdir().unwrap();
        let mut plan = Plan::new(true, 1.0 / 128.0);
        plan.repetitions = 1;
        let progress = indicatif::ProgressBar::hidden();
        let mut recorder = Recorder::new(&plan, &progress);
        run(&mut recorder, dir.path()).unwrap();
        let (figures, skipped) = recorder.into_parts();
        let threadpool = figures
            .iter()
            .filter(|f| f.name.starts_with("spill write thread pool"))
            .count();
        assert_eq!(
            threadpool,
            plan.block_bytes.len(),
            "{figures:?} {skipped:?}"
        );
        for figure in &figures {
            if figure.name.starts_with("spill") {
                assert!(figure.reference.as_ref().unwrap().name.starts_with("raw"));
            }
        }
        // io_uring either ran or says why not; fio either ran or is missing.
        let uring = figures.iter().any(|f| f.name.contains("io_uring"))
            || skipped.iter().any(|s| s.name.contains("io_uring"));
        assert!(uring, "{skipped:?}");
        assert!(fio_binary().is_some() || skipped.iter().any(|s| s.reason == "fio is not on PATH"));
        // Nothing is left behind in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn fio_bandwidth_is_read_from_its_json() {
        let out = br#"note: something
{"jobs": [{"write": {"bw_bytes": 1234567}}]}"#;
        assert_eq!(fio_bandwidth(out, "write"), Some(1234567.0));
        assert_eq!(fio_bandwidth(out, "read"), None);
        assert_eq!(fio_bandwidth(b"garbage", "read"), None);
    }
}
