//! Spill throughput: writes `--size` bytes of blocks through the IOManager's
//! spill writer into `--dir`, then reads them back through the spill reader
//! (checksums verified), and prints MB/s (10^6 bytes per second) for each.
//! `scripts/bench_spill.sh` runs it beside fio on the same directory.
//!
//!   cargo run --release --example spill_bench -- --dir /tmp --size 1G \
//!       [--block 1M] [--depth 32] [--backend auto|uring|threadpool] [--sqpoll]
//!
//! Blocks are `--block` bytes on disk (header + payload, as fio's `bs`), and
//! `--depth` blocks are in flight (as fio's `iodepth`). Files are opened with
//! O_DIRECT where the file system accepts it, so the page cache plays no part
//! in the read and no cache drop is needed; the summary line says which mode
//! each directory got.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use strata::io::{BackendChoice, IoConfig, IoError, IoManager, SpillOptions};

struct Args {
    dir: PathBuf,
    size_bytes: u64,
    block_bytes: usize,
    depth: usize,
    backend: BackendChoice,
    sqpoll: bool,
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = digits.parse().map_err(|_| format!("not a size: {text}"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(format!(
                "unknown unit in {text} (use K, M or G: powers of 1024, as fio)"
            ));
        }
    };
    Ok(number << shift)
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::temp_dir(),
        size_bytes: 1 << 30,
        block_bytes: 1 << 20,
        depth: 32,
        backend: BackendChoice::Auto,
        sqpoll: false,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--size" => args.size_bytes = parse_bytes(&value()?)?,
            "--block" => args.block_bytes = parse_bytes(&value()?)? as usize,
            "--depth" => args.depth = value()?.parse().map_err(|e| format!("--depth: {e}"))?,
            "--sqpoll" => args.sqpoll = true,
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "auto" => BackendChoice::Auto,
                    "uring" => BackendChoice::Uring,
                    "threadpool" => BackendChoice::ThreadPool,
                    other => return Err(format!("unknown backend {other}")),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.depth == 0 || args.block_bytes == 0 || !args.block_bytes.is_multiple_of(4096) {
        return Err("--depth must be > 0 and --block a non-zero multiple of 4096".into());
    }
    Ok(args)
}

fn run(args: &Args) -> Result<(), IoError> {
    let io = IoManager::new(IoConfig {
        tmp_dirs: vec![args.dir.clone()],
        backend: args.backend.clone(),
        queue_depth: args.depth as u32,
        sqpoll: args.sqpoll,
        buf_size_bytes: args.block_bytes,
        buf_count_max: args.depth,
        ..IoConfig::default()
    })?;
    println!("{}", io.summary());
    let options = SpillOptions {
        buf_count: args.depth,
    };

    let mut writer = io.create_spill_writer(options)?;
    // Incompressible-looking data, copied into each block as an operator's
    // serializer would; block lengths on disk are exactly `--block`.
    let payload: Vec<u8> = (0..writer.payload_bytes_max() as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let block_count = args.size_bytes.div_ceil(args.block_bytes as u64);
    let started = Instant::now();
    for _ in 0..block_count {
        writer.write_block(&payload)?;
    }
    let file = writer.finish()?;
    let write_secs = started.elapsed().as_secs_f64();
    let bytes = file.len_bytes();

    let mut reader = io.create_spill_reader(file, options)?;
    let started = Instant::now();
    let mut blocks_read = 0u64;
    while let Some(block) = reader.next_block()? {
        assert_eq!(block.len(), payload.len());
        blocks_read += 1;
    }
    let read_secs = started.elapsed().as_secs_f64();
    assert_eq!(blocks_read, block_count);

    let mb_s = |secs: f64| bytes as f64 / secs / 1e6;
    println!(
        "strata spill write: {bytes} bytes in {write_secs:.3} s = {:.0} MB/s",
        mb_s(write_secs)
    );
    println!(
        "strata spill read:  {bytes} bytes in {read_secs:.3} s = {:.0} MB/s",
        mb_s(read_secs)
    );
    println!(
        "write_mb_s={:.1} read_mb_s={:.1}",
        mb_s(write_secs),
        mb_s(read_secs)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("spill_bench: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spill_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
