//! The web UI and its REST endpoints on a real cluster: a JobManager and two
//! TaskManagers as separate processes (`strata jobmanager`, `strata
//! taskmanager`, `strata submit`) sharing a cluster secret, running a
//! throttled keyed job.
//!
//! `rest_endpoints_serve_a_running_job_and_cancel_it_with_the_token` reads
//! the JSON the pages draw from and cancels the job over REST.
//! `the_job_page_draws_the_graph_and_live_numbers_in_chromium` loads the job
//! page in a headless Chromium driven by Python Playwright
//! (`tests/web_ui/drive.py`) and checks that the graph's boxes carry the
//! vertices' names and parallelism and that the numbers move. It needs
//! `chromium` (scripts/install_browser.sh) and a Python with `playwright`
//! (scripts/install_python_deps.sh, or `STRATA_PYTHON`); without them it
//! reports "skipped: no chromium" or "skipped: no playwright", unless
//! `STRATA_REQUIRE_BROWSER=1` (CI) makes that a failure.
//! `STRATA_SCREENSHOT=path.png` saves the job page as the test saw it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Bounds a wait on a process, a line or a state; never a measure of speed.
const PATIENCE: Duration = Duration::from_secs(60);
const SECRET: &str = "web-ui-test-cluster-secret-0123456789";

/// A JobManager, two TaskManagers and a throttled keyed job, all sharing
/// the cluster secret; dropped, it stops every process.
struct Cluster {
    rest: String,
    job: String,
    _submit: Proc,
    _taskmanagers: Vec<Logged>,
    jm: Logged,
    _dir: tempfile::TempDir,
}

fn strata(args: &[&str]) -> Command {
    let mut c = strata_command();
    c.env("STRATA_AUTH_SECRET", SECRET).args(args);
    for kv in [
        "heartbeat.interval=500ms",
        "heartbeat.timeout=5s",
        "taskmanager.numberOfTaskSlots=2",
        "rest.port=0",
    ]
    .iter()
    .chain(SMALL_MEMORY)
    {
        c.args(["-D", kv]);
    }
    c
}

impl Cluster {
    /// Starts the cluster and submits a job that runs for minutes (a
    /// throttled source) until it is canceled; returns once the job has
    /// produced rows.
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jm = spawn_logged(
            strata(&["jobmanager", "--bind", "127.0.0.1:0"]),
            "JobManager listening on ",
        );
        let addr = jm.announced.clone();
        let rest = rest_address(&jm);
        let taskmanagers: Vec<Logged> = (0..2)
            .map(|_| {
                let tm = spawn_logged(
                    strata(&["taskmanager", "--jobmanager", &addr]),
                    "TaskManager data port ",
                );
                tm.wait_for_line("registered with the JobManager as", PATIENCE);
                tm
            })
            .collect();
        let out = dir.path().join("out");
        let job_file = dir.path().join("throttled.toml");
        let job = keyed_job(50_000_000, 1000, 3, 2, &out, "rows_per_second = 20_000");
        std::fs::write(&job_file, job).unwrap();
        let submit_log = dir.path().join("submit.log");
        let submit = Proc(
            strata(&["submit", "--no-progress", "--jobmanager", &addr])
                .arg(&job_file)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&submit_log).unwrap())
                .spawn()
                .unwrap(),
        );
        let mut job = String::new();
        wait_for_explained(
            PATIENCE,
            || {
                let running = rest_json(&rest, "/jobs")
                    .and_then(|j| j["running"].as_array().and_then(|a| a.first().cloned()));
                match running {
                    Some(j) if j["rows_in"].as_u64().unwrap_or(0) > 0 => {
                        job = j["job"].as_str().unwrap_or_default().to_owned();
                        true
                    }
                    _ => false,
                }
            },
            || {
                format!(
                    "no running job with rows; strata submit said:\n{}\nJobManager log:\n{}",
                    std::fs::read_to_string(&submit_log).unwrap_or_default(),
                    jm.dump()
                )
            },
        );
        Self {
            rest,
            job,
            _submit: submit,
            _taskmanagers: taskmanagers,
            jm,
            _dir: dir,
        }
    }

    fn job_json(&self) -> Value {
        rest_json(&self.rest, &format!("/jobs/{}", self.job)).expect("the job's JSON")
    }
}

/// One HTTP/1.1 exchange: the status and the body.
fn http(address: &str, method: &str, path: &str, headers: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    (head[9..12].parse().expect("a status"), body.to_owned())
}

/// HMAC-SHA256(secret, "strata-rest-cancel-v1") in hex, as a user computes
/// it (the README shows `openssl dgst`).
fn cancel_token() -> String {
    let secret = strata::security::ClusterSecret::from_bytes(SECRET.as_bytes()).unwrap();
    strata::web::cancel_token(&secret)
}

fn cancel(cluster: &Cluster) {
    let header = format!("Authorization: Bearer {}\r\n", cancel_token());
    let path = format!("/jobs/{}/cancel", cluster.job);
    let (status, body) = http(&cluster.rest, "POST", &path, &header);
    assert_eq!(status, 200, "{body}");
    wait_for_explained(
        PATIENCE,
        || {
            let (running, completed) = job_states(&cluster.rest);
            running.is_empty() && completed == ["Canceled"]
        },
        || {
            format!(
                "the job did not end CANCELED: {:?}",
                job_states(&cluster.rest)
            )
        },
    );
}

#[test]
fn rest_endpoints_serve_a_running_job_and_cancel_it_with_the_token() {
    let cluster = Cluster::start();
    let rest = cluster.rest.as_str();

    // The graph: datagen → filter chained, then a hash exchange into the
    // aggregation chain.
    let job = cluster.job_json();
    let vertices = job["vertices"].as_array().expect("vertices");
    assert_eq!(vertices.len(), 2, "{job}");
    assert_eq!(vertices[0]["inputs"], serde_json::json!([]));
    let edge = &vertices[1]["inputs"][0];
    assert_eq!(edge["source"], 0);
    assert_eq!(edge["exchange"], "hash");
    assert_eq!(
        edge["transport"].as_str(),
        Some("tcp"),
        "two TaskManagers: {edge}"
    );
    for v in vertices {
        assert_eq!(v["parallelism"], 2);
        assert_eq!(v["tier"], "CPU");
    }
    // Per-vertex metrics move while the job runs.
    let rows = |job: &Value, v: usize| job["vertices"][v]["metrics"]["rows_in"].as_u64().unwrap();
    let before = rows(&job, 1);
    wait_for("the aggregation's input to grow", PATIENCE, || {
        rows(&cluster.job_json(), 1) > before
    });
    wait_for("both source subtasks running", PATIENCE, || {
        cluster.job_json()["vertices"][0]["metrics"]["subtasks_running"] == 2
    });

    // The overview and each TaskManager's memory against its budgets.
    let overview = rest_json(rest, "/overview").unwrap();
    assert_eq!(overview["taskmanagers"], 2);
    assert_eq!(overview["slots_total"], 4);
    assert_eq!(overview["slots_used"], 2);
    assert_eq!(overview["slots_free"], 2);
    assert_eq!(overview["jobs_running"], 1);
    assert_eq!(overview["cancel_enabled"], true);
    wait_for("usage in every TaskManager's heartbeat", PATIENCE, || {
        rest_json(rest, "/taskmanagers")
            .and_then(|t| t.as_array().cloned())
            .is_some_and(|tms| tms.iter().all(|t| t["usage"].is_object()))
    });
    for tm in rest_json(rest, "/taskmanagers")
        .unwrap()
        .as_array()
        .unwrap()
    {
        let usage = &tm["usage"];
        let used = usage["network_segments_used"].as_u64().unwrap();
        let total = usage["network_segment_count"].as_u64().unwrap();
        assert!(total > 0 && used <= total, "{usage}");
        assert!(usage["network_segment_size_bytes"].as_u64().unwrap() > 0);
        let slots = tm["slots"].as_array().unwrap();
        let managed = usage["managed_used_bytes"].as_array().unwrap();
        assert_eq!(managed.len(), slots.len());
        for (used, slot) in managed.iter().zip(slots) {
            let budget = slot["profile"]["managed_memory_bytes"].as_u64().unwrap();
            assert!(used.as_u64().unwrap() <= budget, "{used} of {budget}");
        }
        assert_eq!(
            usage["gpu_used_bytes"].as_array().unwrap().len(),
            slots.len()
        );
        assert!(tm["spill_bytes_written"].is_u64());
    }

    // The throughput history fills (one sample a second) with rates.
    let path = format!("/jobs/{}/throughput", cluster.job);
    wait_for("two throughput samples", PATIENCE, || {
        rest_json(rest, &path).is_some_and(|t| t["samples"].as_array().unwrap().len() >= 2)
    });
    let throughput = rest_json(rest, &path).unwrap();
    assert_eq!(throughput["samples_max"], 300);
    assert_eq!(throughput["running"], true);
    let samples = throughput["samples"].as_array().unwrap();
    assert!(
        samples
            .windows(2)
            .all(|w| w[0]["wall_ms"].as_u64() < w[1]["wall_ms"].as_u64())
    );
    assert!(
        samples
            .iter()
            .any(|s| s["rows_in_per_second"].as_f64().unwrap() > 0.0)
    );
    assert_eq!(
        throughput["vertex_rows_per_second"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Garbage ids, and many rapid requests: answered, none dropped.
    for (path, status) in [
        ("/jobs/not-hex", 400),
        ("/jobs/ffffffffffffffffff", 400),
        ("/jobs/0", 404),
        ("/jobs/0/throughput", 404),
        ("/job/not-hex", 200), // the page itself, which then says so
    ] {
        assert_eq!(http(rest, "GET", path, "").0, status, "{path}");
    }
    let job_path = format!("/jobs/{}", cluster.job);
    for i in 0..200 {
        let path = ["/", "/overview", "/jobs", &job_path][i % 4];
        assert_eq!(http(rest, "GET", path, "").0, 200, "request {i}: {path}");
    }

    // Cancelling: refused without the token or with a wrong one (the
    // Flight token included: each plane has its own label), then done.
    let cancel_path = format!("/jobs/{}/cancel", cluster.job);
    let (status, body) = http(rest, "POST", &cancel_path, "");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Authorization: Bearer <token>"), "{body}");
    let secret = strata::security::ClusterSecret::from_bytes(SECRET.as_bytes()).unwrap();
    let flight = strata::flight::flight_token(&secret);
    for wrong in ["0123", flight.as_str()] {
        let header = format!("Authorization: Bearer {wrong}\r\n");
        let (status, body) = http(rest, "POST", &cancel_path, &header);
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("wrong cancel token"), "{body}");
    }
    assert_eq!(job_states(rest).0, ["Running"], "refusals change nothing");
    cancel(&cluster);
    let job = cluster.job_json();
    assert_eq!(job["state"], "Canceled");
    assert_eq!(job["reason"], "canceled over the REST API");
    let header = format!("Authorization: Bearer {}\r\n", cancel_token());
    let (status, body) = http(rest, "POST", &cancel_path, &header);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already ended"), "{body}");
    // The slots come back.
    wait_for("the job's slots to be free", PATIENCE, || {
        rest_json(rest, "/overview").is_some_and(|o| o["slots_free"] == 4)
    });
    cluster
        .jm
        .wait_for_line("Canceled: canceled over the REST API", PATIENCE);
}

/// A Python that imports `playwright`.
fn python_with_playwright() -> Option<PathBuf> {
    common::python_importing("playwright.sync_api")
}

/// `STRATA_BROWSER`, else `chromium` on the `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STRATA_BROWSER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The browser and the Python to drive it, or `None` after saying why the
/// test is skipped (a failure when `STRATA_REQUIRE_BROWSER` is set).
fn browser_or_skip() -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var_os("STRATA_REQUIRE_BROWSER").is_some_and(|v| v != "0");
    let Some(browser) = chromium() else {
        assert!(
            !required,
            "STRATA_REQUIRE_BROWSER is set but no chromium was found"
        );
        eprintln!("skipped: no chromium (scripts/install_browser.sh)");
        return None;
    };
    let Some(python) = python_with_playwright() else {
        assert!(
            !required,
            "STRATA_REQUIRE_BROWSER is set but no Python with playwright was found"
        );
        eprintln!("skipped: no playwright (scripts/install_python_deps.sh)");
        return None;
    };
    Some((browser, python))
}

#[test]
fn the_job_page_draws_the_graph_and_live_numbers_in_chromium() {
    let Some((browser, python)) = browser_or_skip() else {
        return;
    };
    let cluster = Cluster::start();
    let job = cluster.job_json();
    let expected: Vec<Value> = job["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::json!([v["name"], v["parallelism"]]))
        .collect();
    assert!(expected.len() >= 2, "{job}");
    let url = format!("http://{}/job/{}", cluster.rest, cluster.job);
    let mut command = Command::new(&python);
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web_ui/drive.py"))
        .args(["--browser".as_ref(), browser.as_os_str()])
        .args(["--url", &url])
        .args(["--vertices", &Value::from(expected).to_string()])
        .args(["--timeout-s", &PATIENCE.as_secs().to_string()]);
    if let Some(path) = std::env::var_os("STRATA_SCREENSHOT") {
        command.arg("--screenshot").arg(path);
    }
    let output = command.output().expect("run the browser driver");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}{stdout}");
    assert!(
        output.status.success(),
        "drive.py failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("drive.py's last line is not JSON ({e}):\n{stdout}"));
    let (first, second) = (&report["first"], &report["second"]);
    assert_eq!(report["boxes"].as_array().unwrap().len(), 2, "{report}");
    assert!(
        second["chart_points"].as_u64() > first["chart_points"].as_u64(),
        "{report}"
    );
    assert_ne!(first["rows_in"], second["rows_in"], "{report}");
    assert!(second["rate"].as_f64().unwrap() > 0.0, "{report}");
    cancel(&cluster);
}
