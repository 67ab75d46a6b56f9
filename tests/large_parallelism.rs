//! Parallelism 1000 with `key_by` through the real CLI: 1000 producers each
//! route into 1000 consumers (a million channels), deployed compactly and
//! run on an embedded cluster.
//!
//! On one TaskManager every channel is local, so the gates take no network
//! segments; on two TaskManagers half of them are remote and each needs its
//! exclusive segments, which the default network memory cannot hold: the
//! run must then fail at once, naming the keys to raise.

use std::path::Path;
use std::process::Command;

const PARALLELISM: u32 = 1000;
const ROWS: u64 = 20_000;
const KEYS: u64 = 1000;

fn strata() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("STRATA_LOG", "warn");
    c
}

fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("running strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// datagen → key_by(key) → count and sum per key → CSV parts under `out`,
/// every vertex at parallelism 1000.
fn write_job(dir: &Path, out: &Path) -> std::path::PathBuf {
    let job = dir.join("p1000.toml");
    let text = format!(
        "[job]\nname = \"p1000\"\nparallelism = {PARALLELISM}\n\n\
         [[operator]]\nname = \"events\"\ntype = \"datagen\"\nrows = {ROWS}\nkeys = {KEYS}\nseed = 7\n\n\
         [[operator]]\nname = \"by-key\"\ntype = \"key_by\"\nkeys = [\"key\"]\n\n\
         [[operator]]\nname = \"totals\"\ntype = \"aggregate\"\naggs = [\"count(*) as cnt\", \"sum(value) as total\"]\n\n\
         [[operator]]\nname = \"out\"\ntype = \"csv_sink\"\npath = {:?}\nmode = \"overwrite\"\n",
        out.display().to_string()
    );
    std::fs::write(&job, text).expect("writing the job file");
    job
}

/// The CLI arguments of a run with `taskmanagers × slots` slots.
///
/// `pipeline.max-parallelism` is raised to cover the job: its default (128)
/// is below 1000, and routing 1000 consumers by 128 key groups would leave
/// 872 of them without keys (the job's own parallelism is not checked
/// against it yet; see the report of this change).
fn run_args(job: &Path, taskmanagers: u32, slots: u32) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), job.display().to_string()];
    for (flag, value) in [
        ("--taskmanagers", taskmanagers.to_string()),
        ("--slots", slots.to_string()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    args.push("--no-progress".into());
    for setting in ["pipeline.max-parallelism=1024", "rest.port=0"] {
        args.extend(["-D".to_string(), setting.to_string()]);
    }
    args
}

/// `(data rows, sum of cnt)` over every CSV part file in `dir`.
fn count_output(dir: &Path) -> (u64, u64) {
    let mut rows = 0;
    let mut counted = 0;
    for entry in std::fs::read_dir(dir).expect("listing the sink directory") {
        let path = entry.expect("a directory entry").path();
        let text = std::fs::read_to_string(&path).expect("reading a part file");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("key,cnt,total"), "{}", path.display());
        for line in lines {
            let cnt = line.split(',').nth(1).expect("a cnt column");
            counted += cnt.parse::<u64>().expect("cnt is a count");
            rows += 1;
        }
    }
    (rows, counted)
}

#[test]
fn parallelism_1000_with_key_by_runs_on_one_taskmanager_of_1000_slots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = write_job(dir.path(), &out);
    let (code, stdout, stderr) = output(strata().args(run_args(&job, 1, PARALLELISM)));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("FINISHED"), "{stdout}");
    assert!(stdout.contains("rows in 20,000"), "{stdout}");
    // Every key once, every generated row counted once.
    assert_eq!(count_output(&out), (KEYS, ROWS));
}

#[test]
fn two_taskmanagers_without_the_network_memory_fail_at_once_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = write_job(dir.path(), &out);
    let (code, stdout, stderr) = output(strata().args(run_args(&job, 2, PARALLELISM / 2)));
    assert_ne!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let all = format!("{stdout}\n{stderr}");
    // 500 consumers per TaskManager, each with 500 remote channels of 2
    // exclusive 64 KiB segments: far beyond the default 128 MiB.
    for needle in [
        "insufficient network memory",
        "remote channel(s) × taskmanager.network.memory.buffers-per-channel = 2",
        "taskmanager.memory.network.max",
        "taskmanager.network.memory.buffers-per-channel",
    ] {
        assert!(all.contains(needle), "{needle:?} not in:\n{all}");
    }
}
