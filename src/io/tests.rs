//! Tests of the io module through its public API, on every backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::block::block_len_for;
use super::manager::{marker_for, new_with_uring_setup, own_start_ticks};
use super::uring::UringOptions;
use super::*;

fn config(dirs: &[&Path], backend: BackendChoice) -> IoConfig {
    IoConfig {
        tmp_dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
        backend,
        queue_depth: 8,
        buf_size_bytes: 64 << 10,
        buf_count_max: 16,
        threadpool_threads: 4,
        ..IoConfig::default()
    }
}

/// Payload of block `index`: a length that varies from empty to full, and
/// bytes that differ per block and position.
fn payload(index: usize, payload_bytes_max: usize) -> Vec<u8> {
    let len = match index % 4 {
        0 => 0,
        1 => 1 + index * 97 % 5000,
        2 => payload_bytes_max,
        _ => payload_bytes_max / 3,
    };
    (0..len).map(|i| (i * 31 + index * 7) as u8).collect()
}

fn spill_and_read_back(io: &IoManager, block_count: usize) {
    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 4 })
        .unwrap();
    let payload_bytes_max = writer.payload_bytes_max();
    for index in 0..block_count {
        assert_eq!(
            writer
                .write_block(&payload(index, payload_bytes_max))
                .unwrap(),
            index
        );
    }
    let file = writer.finish().unwrap();
    let path = file.path().to_path_buf();
    let expected_len: usize = (0..block_count)
        .map(|i| block_len_for(payload(i, payload_bytes_max).len()))
        .sum();
    assert_eq!(file.len_bytes(), expected_len as u64);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        expected_len as u64,
        "reserved tail released"
    );
    let mut reader = io
        .create_spill_reader(file, SpillOptions { buf_count: 3 })
        .unwrap();
    for index in 0..block_count {
        assert_eq!(
            reader.next_block().unwrap().unwrap(),
            payload(index, payload_bytes_max),
            "block {index}"
        );
    }
    assert!(reader.next_block().unwrap().is_none());
    for index in [block_count - 1, 0, block_count / 2] {
        assert_eq!(
            reader.read_block(index).unwrap(),
            payload(index, payload_bytes_max)
        );
    }
    assert_eq!(
        reader.next_block().unwrap().unwrap(),
        payload(block_count / 2 + 1, payload_bytes_max)
    );
    drop(reader);
    assert!(!path.exists(), "spill file deleted with its reader");
}

fn assert_all_buffers_returned(io: &IoManager) {
    assert_eq!(io.buffer_pool().free_count(), io.buffer_pool().buf_count());
}

fn uring_unavailable() -> Option<String> {
    let options = UringOptions {
        queue_depth: 4,
        sqpoll: false,
        sqpoll_idle_ms: 0,
        direct: false,
    };
    let err = UringStorage::new(options, None).err()?;
    Some(UringRefusal::classify(&err, uring::io_uring_disabled_sysctl()).to_string())
}

#[test]
fn round_trip_on_io_uring() {
    if let Some(reason) = uring_unavailable() {
        println!("skipped: io_uring unavailable: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Uring)).unwrap();
    assert_eq!(io.backend(), BackendKind::Uring);
    assert!(io.fallback_reason().is_none());
    spill_and_read_back(&io, 41);
    assert_all_buffers_returned(&io);
}

#[test]
fn round_trip_on_io_uring_with_sqpoll() {
    if let Some(reason) = uring_unavailable() {
        println!("skipped: io_uring unavailable: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(IoConfig {
        sqpoll: true,
        ..config(&[dir.path()], BackendChoice::Uring)
    })
    .unwrap();
    spill_and_read_back(&io, 23);
    assert_all_buffers_returned(&io);
}

#[test]
fn round_trip_on_thread_pool() {
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::ThreadPool)).unwrap();
    assert_eq!(io.backend(), BackendKind::ThreadPool);
    assert_eq!(io.fallback_reason(), Some(&FallbackReason::Configured));
    spill_and_read_back(&io, 41);
    assert_all_buffers_returned(&io);
}

/// Reads back every block of a live writer between writes (as a checkpoint
/// snapshot does), then keeps writing: the finished file is unchanged.
fn read_back_while_writing(io: &IoManager, block_count: usize) {
    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 2 })
        .unwrap();
    let payload_bytes_max = writer.payload_bytes_max();
    for index in 0..block_count {
        writer
            .write_block(&payload(index, payload_bytes_max))
            .unwrap();
        if index % 5 == 4 {
            for back in [index, 0, index / 2] {
                assert_eq!(
                    writer.read_block(back).unwrap(),
                    payload(back, payload_bytes_max),
                    "block {back} read back after {index}"
                );
            }
        }
    }
    let file = writer.finish().unwrap();
    let mut reader = io
        .create_spill_reader(file, SpillOptions { buf_count: 2 })
        .unwrap();
    for index in 0..block_count {
        assert_eq!(
            reader.next_block().unwrap().unwrap(),
            payload(index, payload_bytes_max),
            "block {index}"
        );
    }
    assert!(reader.next_block().unwrap().is_none());
}

#[test]
fn a_live_writer_reads_back_its_blocks_on_thread_pool_and_sim() {
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::ThreadPool)).unwrap();
    read_back_while_writing(&io, 23);
    assert_all_buffers_returned(&io);
    let sim = SimOptions {
        latency_max: std::time::Duration::from_micros(50),
        ..SimOptions::from_env(11)
    };
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Sim(sim))).unwrap();
    read_back_while_writing(&io, 23);
    assert_all_buffers_returned(&io);
}

#[test]
fn a_live_writer_reads_back_its_blocks_on_io_uring() {
    if let Some(reason) = uring_unavailable() {
        println!("skipped: io_uring unavailable: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Uring)).unwrap();
    read_back_while_writing(&io, 23);
    assert_all_buffers_returned(&io);
}

#[test]
fn round_trip_on_sim_with_latency_and_short_writes() {
    let dir = tempfile::tempdir().unwrap();
    let options = SimOptions {
        latency_max: std::time::Duration::from_micros(200),
        short_write_ppm: 300_000,
        ..SimOptions::from_env(7)
    };
    let seed = options.seed;
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Sim(options))).unwrap();
    assert_eq!(io.backend(), BackendKind::Sim, "seed={seed}");
    spill_and_read_back(&io, 41);
    assert_all_buffers_returned(&io);
}

#[test]
fn refused_io_uring_falls_back_to_thread_pool_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let refuse =
        |_: UringOptions, _: Option<&BufPool>| Err(std::io::Error::from_raw_os_error(libc::EPERM));
    let io = new_with_uring_setup(config(&[dir.path()], BackendChoice::Auto), &refuse).unwrap();
    assert_eq!(io.backend(), BackendKind::ThreadPool);
    let Some(FallbackReason::Uring(refusal)) = io.fallback_reason() else {
        panic!("no fallback reason: {:?}", io.fallback_reason());
    };
    assert!(matches!(
        refusal,
        UringRefusal::PermissionDenied { errno: libc::EPERM }
            | UringRefusal::DisabledBySysctl { .. }
    ));
    assert!(
        io.summary().contains("io_uring unavailable"),
        "{}",
        io.summary()
    );
    spill_and_read_back(&io, 9);
    assert_all_buffers_returned(&io);

    let err = new_with_uring_setup(config(&[dir.path()], BackendChoice::Uring), &refuse)
        .err()
        .unwrap();
    assert!(matches!(err, IoError::UringUnavailable { .. }), "{err}");
    let enosys = std::io::Error::from_raw_os_error(libc::ENOSYS);
    assert_eq!(
        UringRefusal::classify(&enosys, None),
        UringRefusal::NotSupported
    );
    let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
    assert_eq!(
        UringRefusal::classify(&eperm, Some(2)),
        UringRefusal::DisabledBySysctl { value: 2 }
    );
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_dir() {
            files.extend(files_in(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

#[test]
fn sim_enospc_mid_spill_is_no_space_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let options = SimOptions {
        space_bytes_max: Some(10 * (64 << 10) + 12345),
        ..SimOptions::from_env(11)
    };
    let seed = options.seed;
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Sim(options))).unwrap();
    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 4 })
        .unwrap();
    let path = writer.path().to_path_buf();
    let block = vec![0xAB; writer.payload_bytes_max()];
    let err = (0..100)
        .map(|_| writer.write_block(&block))
        .find_map(Result::err)
        .unwrap_or_else(|| panic!("no error, seed={seed}"));
    assert!(
        matches!(&err, IoError::NoSpace { path: p } if *p == path),
        "{err} seed={seed}"
    );
    assert!(err.to_string().contains("no space left"), "{err}");
    assert!(
        !path.exists(),
        "partial spill file left behind, seed={seed}"
    );
    let left: Vec<_> = files_in(dir.path())
        .into_iter()
        .filter(|p| !p.ends_with("owner"))
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
    drop(writer);
    assert_eq!(io.buffer_pool().free_count(), io.buffer_pool().buf_count());
}

#[test]
fn sim_bit_flip_is_corrupt_block_at_the_flipped_block() {
    let dir = tempfile::tempdir().unwrap();
    let options = SimOptions {
        bit_flip_ppm: 150_000,
        ..SimOptions::from_env(3)
    };
    let seed = options.seed;
    let sim = Arc::new(SimStorage::new(options));
    let pool = BufPool::new(16 << 10, 8);
    let path = dir.path().join("flip.blk");
    let mut writer =
        SpillWriter::new(sim.clone(), path.clone(), pool.try_acquire(4).unwrap()).unwrap();
    let block_len = 16 << 10;
    for index in 0..40u8 {
        // Full blocks: no padding, so every flipped bit lands in checked bytes.
        writer
            .write_block(&vec![index; writer.payload_bytes_max()])
            .unwrap();
    }
    let mut reader = SpillReader::new(writer.finish().unwrap(), pool.try_acquire(4).unwrap());
    let mut blocks_read = 0;
    let err = loop {
        match reader.next_block() {
            Ok(Some(payload)) => assert!(
                payload.iter().all(|&b| b == blocks_read),
                "wrong data, seed={seed}"
            ),
            Ok(None) => panic!("no flip detected in 40 blocks, seed={seed}"),
            Err(err) => break err,
        }
        blocks_read += 1;
    };
    let first_flip = sim
        .flips()
        .iter()
        .map(|flip| flip.offset)
        .min()
        .expect("a flip");
    let flipped_block_offset = first_flip / block_len * block_len;
    let IoError::CorruptBlock {
        path: p, offset, ..
    } = &err
    else {
        panic!("{err}, seed={seed}");
    };
    assert_eq!((p, *offset), (&path, flipped_block_offset), "seed={seed}");
    assert_eq!(*offset, u64::from(blocks_read) * block_len, "seed={seed}");
}

#[test]
fn corrupt_byte_on_disk_is_detected_on_every_backend_it_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Auto)).unwrap();
    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 2 })
        .unwrap();
    for index in 0..6 {
        writer
            .write_block(&payload(index, writer.payload_bytes_max()))
            .unwrap();
    }
    let mut file = writer.finish().unwrap();
    file.keep();
    let path = file.path().to_path_buf();
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let third_block = (block_len_for(0) + block_len_for(payload(1, 65504).len())) as u64;
    bytes[third_block as usize + 100] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let file = io.open_spill_file(path.clone()).unwrap();
    assert_eq!(file.block_count(), 6);
    let mut reader = io
        .create_spill_reader(file, SpillOptions::default())
        .unwrap();
    assert!(reader.next_block().is_ok() && reader.next_block().is_ok());
    let err = reader.next_block().unwrap_err();
    assert!(
        matches!(&err, IoError::CorruptBlock { offset, field: BlockField::PayloadChecksum, .. }
            if *offset == third_block),
        "{err}"
    );
}

#[test]
fn spill_files_go_with_their_owner_unless_kept() {
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Auto)).unwrap();
    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 2 })
        .unwrap();
    writer.write_block(b"cancelled mid-spill").unwrap();
    let path = writer.path().to_path_buf();
    assert!(path.exists());
    drop(writer);
    assert!(!path.exists(), "dropped writer removes its file");

    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 2 })
        .unwrap();
    writer.write_block(b"kept").unwrap();
    let mut reader = io
        .create_spill_reader(writer.finish().unwrap(), SpillOptions { buf_count: 1 })
        .unwrap();
    reader.keep();
    let path = reader.path().to_path_buf();
    drop(reader);
    let mut reader = io
        .create_spill_reader(
            io.open_spill_file(path.clone()).unwrap(),
            SpillOptions { buf_count: 1 },
        )
        .unwrap();
    assert_eq!(reader.next_block().unwrap().unwrap(), b"kept");
    drop(reader);
    assert!(path.exists(), "a reopened kept file stays kept");
    let own_dir = io.spill_dirs()[0].path.clone();
    drop(io);
    assert!(!own_dir.exists(), "manager removes its directory");
}

#[test]
fn spill_writers_rotate_over_the_directories() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let io = IoManager::new(config(&[a.path(), b.path()], BackendChoice::Auto)).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            io.create_spill_writer(SpillOptions { buf_count: 1 })
                .unwrap()
        })
        .collect();
    let in_a: Vec<bool> = writers
        .iter()
        .map(|w| w.path().starts_with(a.path()))
        .collect();
    assert_eq!(in_a, [true, false, true, false]);
    assert!(writers.iter().all(|w| w.path().exists()));
}

#[test]
fn stale_directories_of_dead_processes_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |name: &str, marker: Option<String>| {
        let path = tmp.path().join(name);
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("spill-00000000.blk"), b"left over").unwrap();
        if let Some(marker) = marker {
            std::fs::write(path.join("owner"), marker).unwrap();
        }
        path
    };
    let pid = std::process::id();
    // Same pid, other start time: the pid was reused, the owner is dead.
    let reused = make(
        "strata-io-reused",
        Some(marker_for(pid, own_start_ticks() + 1)),
    );
    let dead = make("strata-io-dead", Some(marker_for(u32::MAX - 1, 1)));
    let alive = make("strata-io-alive", Some(marker_for(pid, own_start_ticks())));
    let fresh = make("strata-io-fresh", None);
    let other = make("not-strata", Some(marker_for(u32::MAX - 1, 1)));
    let mut removed = clean_stale(&[tmp.path().to_path_buf()]);
    removed.sort();
    assert_eq!(removed, [dead.clone(), reused.clone()]);
    assert!(alive.exists() && fresh.exists() && other.exists());

    // A manager cleans at start-up too.
    let dead = make("strata-io-dead2", Some(marker_for(u32::MAX - 1, 1)));
    let io = IoManager::new(config(&[tmp.path()], BackendChoice::ThreadPool)).unwrap();
    assert!(!dead.exists());
    assert!(io.spill_dirs()[0].path.join("owner").exists());
}

#[test]
fn writers_on_many_threads_share_one_ring() {
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(
        IoManager::new(IoConfig {
            queue_depth: 4,
            buf_count_max: 32,
            ..config(&[dir.path()], BackendChoice::Auto)
        })
        .unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let io = io.clone();
            std::thread::spawn(move || spill_and_read_back(&io, 17))
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_all_buffers_returned(&io);
}

#[test]
fn limits_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let io = IoManager::new(config(&[dir.path()], BackendChoice::Auto)).unwrap();
    let mut writer = io
        .create_spill_writer(SpillOptions { buf_count: 10 })
        .unwrap();
    let too_large = vec![0; writer.payload_bytes_max() + 1];
    assert!(matches!(
        writer.write_block(&too_large),
        Err(IoError::BlockTooLarge { .. })
    ));
    let err = io
        .create_spill_writer(SpillOptions { buf_count: 7 })
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            IoError::BuffersExhausted {
                requested: 7,
                free: 6,
                buf_count_max: 16
            }
        ),
        "{err}"
    );
}

#[test]
fn spill_handles_move_between_threads() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<SpillWriter>();
    assert_send::<SpillReader>();
    assert_send::<SpillFile>();
    assert_send_sync::<IoManager>();
}
