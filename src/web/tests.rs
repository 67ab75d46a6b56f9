//! The REST routes over a real socket, with a scripted cluster behind them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::protocol::JobSummary;

const JOB: u64 = 0x00ab_cdef_0123_4567;

/// A running job of two vertices (source → hash → sink), `wall_ms` old.
fn running_job(wall_ms: u64) -> JobSummary {
    serde_json::from_value(json!({
        "job": format!("{JOB:016x}"), "name": "scripted", "state": "Running", "reason": null,
        "wall_ms": wall_ms, "rows_in": wall_ms * 10, "rows_out": wall_ms,
        "vertices": [
            { "name": "events -> positive", "parallelism": 2, "placement": [], "input_partitioner": null,
              "tier": "CPU", "operators": [],
              "metrics": { "rows_in": wall_ms * 10, "rows_out": wall_ms * 5, "subtasks_running": 2,
                           "backpressured_ms_per_second_max": 250, "in_pool_usage_permille_max": 0,
                           "out_pool_usage_permille_max": 600 } },
            { "name": "totals -> out", "parallelism": 2, "placement": [], "input_partitioner": "HASH",
              "tier": "CPU", "operators": [],
              "inputs": [ { "source": 0, "exchange": "hash", "transport": "tcp" } ] },
        ],
        "remote_bytes": 0, "remote_buffers": 0, "local_rows": 0, "backpressure_ms": 0,
        "late_rows": 0, "managed_peak_bytes": 0, "transport": "tcp", "io": [],
        "taskmanagers": 1, "slots": 2,
    }))
    .expect("a summary")
}

struct Scripted {
    addr: SocketAddr,
    canceled: Arc<Mutex<Vec<JobId>>>,
}

/// Serves a cluster whose one job ages 1 s per snapshot.
async fn serve_scripted(cancel_token: Option<&str>) -> Scripted {
    let clock = Arc::new(AtomicU64::new(0));
    let canceled: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let done = Arc::clone(&canceled);
    let view = ClusterView {
        snapshot: Box::new(move || {
            let wall_ms = clock.fetch_add(1000, Ordering::Relaxed) + 1000;
            ClusterSnapshot {
                taskmanagers: vec![],
                running: vec![running_job(wall_ms)],
                completed: vec![],
            }
        }),
        cancel: Box::new(move |job, _reason| {
            let known = job.0 == JOB;
            if known {
                lock(&done).push(job);
            }
            known
        }),
        cancel_token: cancel_token.map(str::to_owned),
    };
    let addr = serve("127.0.0.1:0", view).await.expect("bind");
    Scripted { addr, canceled }
}

/// One HTTP/1.1 exchange: the status, the `Content-Type` and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n{extra}\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status = head[9..12].parse().expect("a status");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, content_type, body) = request(addr, "GET", path, "").await;
    assert_eq!(status, 200, "GET {path}: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    serde_json::from_str(&body).expect("JSON")
}

#[tokio::test]
async fn pages_and_their_scripts_are_served_self_contained() {
    let s = serve_scripted(None).await;
    for (path, needle) in [("/", "ui.js"), (&*format!("/job/{JOB:016x}"), "ui.js")] {
        let (status, content_type, body) = request(s.addr, "GET", path, "").await;
        assert_eq!(status, 200);
        assert!(content_type.starts_with("text/html"), "{content_type}");
        assert!(body.contains(needle));
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "no CDN in {path}"
        );
    }
    let (status, content_type, body) = request(s.addr, "GET", "/ui.js", "").await;
    assert_eq!((status, content_type.as_str()), (200, "text/javascript"));
    assert!(body.contains("function layoutGraph"));
    let (status, content_type, _) = request(s.addr, "GET", "/ui.css", "").await;
    assert_eq!((status, content_type.as_str()), (200, "text/css"));
}

#[tokio::test]
async fn overview_and_job_json_carry_what_the_pages_draw() {
    let s = serve_scripted(None).await;
    let o = get_json(s.addr, "/overview").await;
    for key in [
        "taskmanagers",
        "slots_total",
        "slots_used",
        "slots_free",
        "jobs_running",
        "jobs_finished",
        "jobs_failed",
        "jobs_canceled",
    ] {
        assert!(o[key].is_u64(), "{key} in {o}");
    }
    assert_eq!(o["jobs_running"], 1);
    assert_eq!(o["cancel_enabled"], false);
    let j = get_json(s.addr, &format!("/jobs/{JOB:016x}")).await;
    assert_eq!(j["job"], format!("{JOB:016x}"));
    let edge = &j["vertices"][1]["inputs"][0];
    assert_eq!(
        (edge["source"].as_u64(), edge["exchange"].as_str()),
        (Some(0), Some("hash"))
    );
    assert_eq!(j["vertices"][0]["inputs"], json!([]));
    assert_eq!(
        j["vertices"][0]["metrics"]["backpressured_ms_per_second_max"],
        250
    );
    // A job id without leading zeros names the same job.
    let short = get_json(s.addr, &format!("/jobs/{JOB:x}")).await;
    assert_eq!(short["job"], j["job"]);
}

#[tokio::test]
async fn garbage_job_ids_are_bad_requests_and_unknown_ones_not_found() {
    let s = serve_scripted(Some("t")).await;
    for path in [
        "/jobs/xyz",
        "/jobs/12345678901234567",
        "/jobs/-1/throughput",
        "/jobs/%00",
    ] {
        let (status, _, body) = request(s.addr, "GET", path, "").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("is not a job id"), "{body}");
    }
    for path in ["/jobs/1", "/jobs/1/throughput"] {
        let (status, _, body) = request(s.addr, "GET", path, "").await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("no job 0000000000000001"), "{body}");
    }
    let (status, _, _) = request(s.addr, "GET", "/jobs/1/cancel", "").await;
    assert_eq!(status, 405, "cancel is POST only");
}

#[tokio::test]
async fn cancel_is_refused_without_a_secret() {
    let s = serve_scripted(None).await;
    let path = format!("/jobs/{JOB:016x}/cancel");
    let (status, _, body) = request(s.addr, "POST", &path, "Authorization: Bearer x\r\n").await;
    assert_eq!(status, 403);
    assert!(
        body.contains("disabled") && body.contains("no secret"),
        "{body}"
    );
    assert!(lock(&s.canceled).is_empty());
}

#[tokio::test]
async fn cancel_needs_the_token_and_then_cancels_the_job() {
    let secret = crate::security::ClusterSecret::from_bytes(b"0123456789abcdef0123").unwrap();
    let token = cancel_token(&secret);
    let s = serve_scripted(Some(&token)).await;
    let path = format!("/jobs/{JOB:016x}/cancel");
    let (status, _, body) = request(s.addr, "POST", &path, "").await;
    assert_eq!(status, 403);
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let flight = crate::flight::flight_token(&secret);
    for wrong in ["Bearer nope".to_owned(), format!("Bearer {flight}")] {
        let header = format!("Authorization: {wrong}\r\n");
        let (status, _, body) = request(s.addr, "POST", &path, &header).await;
        assert_eq!(status, 403);
        assert!(body.contains("wrong cancel token"), "{body}");
    }
    // Refused before the id is looked at: no hint whether a job exists.
    let header = "Authorization: Bearer nope\r\n";
    let (status, _, _) = request(s.addr, "POST", "/jobs/zz/cancel", header).await;
    assert_eq!(status, 403);
    assert!(lock(&s.canceled).is_empty());

    let header = format!("Authorization: Bearer {token}\r\n");
    let (status, _, body) = request(s.addr, "POST", &path, &header).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["state"], "Canceled");
    assert_eq!(*lock(&s.canceled), [JobId(JOB)]);
    let (status, _, _) = request(s.addr, "POST", "/jobs/2/cancel", &header).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn throughput_history_is_served_with_rates() {
    let s = serve_scripted(None).await;
    let path = format!("/jobs/{JOB:016x}/throughput");
    // The sampler's first tick is immediate, its second a second later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let report = loop {
        let report = get_json(s.addr, &path).await;
        if report["samples"].as_array().is_some_and(|a| a.len() >= 2) {
            break report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no two samples: {report}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(report["job"], format!("{JOB:016x}"));
    assert_eq!(report["samples_max"], history::SAMPLES_MAX);
    assert_eq!(report["running"], true);
    let last = report["samples"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    // The scripted job moves 10 rows in per ms of its clock.
    assert_eq!(last["rows_in_per_second"], 10_000.0);
    assert_eq!(report["vertex_rows_per_second"][0], 10_000.0);
}
