//! The JobManager's REST API, Prometheus endpoint and web UI.
//!
//! What it owns: the HTTP routes, the throughput history ring
//! ([`history`]), the cancel authorization ([`cancel`]) and the UI's static
//! files (`ui/`, embedded with `include_str!`: no framework, no CDN, the
//! page works on an air-gapped cluster).
//!
//! Routes (JSON unless said otherwise, like Flink's REST API):
//! - `/` (HTML): the cluster overview — TaskManagers with their slots and
//!   memory against budgets, running and ended jobs;
//! - `/job/{id}` (HTML): one job — its graph, live rates, back-pressure,
//!   pool usage, the throughput chart, checkpoints, restarts, tasks;
//! - `/overview`: TaskManager, slot and job counts, and whether cancelling
//!   is enabled;
//! - `/taskmanagers`, `/jobs`, `/jobs/{id}`: the [`ClusterSnapshot`]'s
//!   parts;
//! - `/jobs/{id}/throughput`: the job's last [`history::SAMPLES_MAX`]
//!   throughput samples;
//! - `POST /jobs/{id}/cancel`: cancels a running job; needs the cancel
//!   token (see [`cancel`]) and is disabled without a cluster secret;
//! - `/metrics`: Prometheus (see [`prometheus`] for the names and formats).
//!
//! Invariants: the server never holds the JobManager's lock across an
//! await (each request takes one snapshot); every view but the cancel is
//! read-only; the history is sampled once per [`history::SAMPLE_INTERVAL`]
//! by one task, whatever the number of open pages.
//!
//! Limits: the history holds at most [`history::SAMPLES_MAX`] samples for
//! each of at most [`history::JOBS_MAX`] jobs. There is no request rate
//! limit: each request costs one snapshot under the JobManager's lock.

pub mod cancel;
pub mod history;
mod prometheus;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;

use crate::protocol::{ClusterSnapshot, JobId, JobState};

pub use cancel::cancel_token;
pub use history::ThroughputHistory;
pub use prometheus::{Format as MetricsFormat, render as render_prometheus};

/// What the REST server reads and the one thing it may do: the seam
/// between the web UI and the JobManager (which knows nothing of HTTP).
pub struct ClusterView {
    /// A consistent copy of the cluster's state.
    pub snapshot: Box<dyn Fn() -> ClusterSnapshot + Send + Sync>,
    /// Cancels a running job with a reason; `false` when no such job runs.
    pub cancel: Box<dyn Fn(JobId, String) -> bool + Send + Sync>,
    /// The token `POST /jobs/{id}/cancel` needs ([`cancel_token`]); `None`
    /// disables cancelling (no cluster secret).
    pub cancel_token: Option<String>,
}

#[derive(Clone)]
struct AppState {
    view: Arc<ClusterView>,
    history: Arc<Mutex<ThroughputHistory>>,
}

impl AppState {
    fn snapshot(&self) -> ClusterSnapshot {
        (self.view.snapshot)()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve the REST API on {address}: {source}")]
pub struct WebError {
    pub address: String,
    #[source]
    pub source: std::io::Error,
}

/// Binds the REST server and serves it in the background, with the task
/// that samples the throughput history; returns the bound address.
pub async fn serve(address: &str, view: ClusterView) -> Result<SocketAddr, WebError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| WebError {
            address: address.to_owned(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| WebError {
        address: address.to_owned(),
        source,
    })?;
    let state = AppState {
        view: Arc::new(view),
        history: Arc::new(Mutex::new(ThroughputHistory::default())),
    };
    tokio::spawn(sample_loop(state.clone()));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::warn!("REST server stopped: {e}");
        }
    });
    Ok(bound)
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(include_str!("ui/index.html")) }))
        .route(
            "/job/{id}",
            get(|| async { Html(include_str!("ui/job.html")) }),
        )
        .route(
            "/ui.css",
            get(|| async { static_file("text/css", include_str!("ui/ui.css")) }),
        )
        .route(
            "/ui.js",
            get(|| async { static_file("text/javascript", include_str!("ui/ui.js")) }),
        )
        .route("/overview", get(overview))
        .route("/taskmanagers", get(taskmanagers))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/throughput", get(throughput))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Samples the cluster into the history every [`history::SAMPLE_INTERVAL`].
async fn sample_loop(state: AppState) {
    let mut interval = tokio::time::interval(history::SAMPLE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let snapshot = state.snapshot();
        lock(&state.history).record(&snapshot);
    }
}

/// A JSON error body with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A job id of up to 16 hex digits, or a 400 response saying so.
fn parse_job_id(id: &str) -> Result<JobId, Box<Response>> {
    let valid = !id.is_empty() && id.len() <= 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    match valid.then(|| u64::from_str_radix(id, 16)) {
        Some(Ok(id)) => Ok(JobId(id)),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!(
                "job id '{}' is not a job id (up to 16 hex digits)",
                id.chars().take(64).collect::<String>()
            ),
        ))),
    }
}

async fn overview(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.snapshot();
    let slots_total: usize = s.taskmanagers.iter().map(|t| t.allocated.len()).sum();
    let slots_used: usize = s
        .taskmanagers
        .iter()
        .map(|t| t.allocated.iter().filter(|a| a.is_some()).count())
        .sum();
    let ended = |state: JobState| s.completed.iter().filter(|j| j.state == state).count();
    Json(json!({
        "taskmanagers": s.taskmanagers.len(),
        "slots_total": slots_total,
        "slots_used": slots_used,
        "slots_free": slots_total - slots_used,
        "jobs_running": s.running.len(),
        "jobs_finished": ended(JobState::Finished),
        "jobs_failed": ended(JobState::Failed),
        "jobs_canceled": ended(JobState::Canceled),
        "cancel_enabled": state.view.cancel_token.is_some(),
    }))
}

async fn taskmanagers(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.snapshot().taskmanagers)
}

async fn jobs(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.snapshot();
    Json(json!({ "running": s.running, "completed": s.completed }))
}

async fn job(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let id = match parse_job_id(&id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let s = state.snapshot();
    match s
        .running
        .iter()
        .chain(&s.completed)
        .rev()
        .find(|j| j.job == id)
    {
        Some(j) => Json(j.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no job {:016x}", id.0)),
    }
}

async fn throughput(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let id = match parse_job_id(&id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    if let Some(report) = lock(&state.history).report(id) {
        return Json(report).into_response();
    }
    // A job that started after the last sample, or ended before the
    // history knew it: an empty history, not an error.
    let s = state.snapshot();
    match s.running.iter().chain(&s.completed).find(|j| j.job == id) {
        Some(j) => Json(history::ThroughputReport {
            job: id,
            samples_max: history::SAMPLES_MAX,
            interval_ms: history::SAMPLE_INTERVAL.as_millis() as u64,
            running: j.state == JobState::Running,
            samples: Vec::new(),
            vertex_rows_per_second: vec![0.0; j.vertices.len()],
        })
        .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no job {:016x}", id.0)),
    }
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    // Authorization first: a caller without the token learns nothing, not
    // even whether the job exists.
    if let Err(refusal) = cancel::authorize(state.view.cancel_token.as_deref(), &headers) {
        // A wrong token is worth a line; a missing one (a curious browser,
        // a cluster without a secret) is not, or refusals could flood the log.
        if refusal == cancel::Refusal::Wrong {
            tracing::info!("REST cancel of job {id:.64} refused: {refusal}");
        } else {
            tracing::debug!("REST cancel of job {id:.64} refused: {refusal}");
        }
        return error(refusal.status(), refusal.to_string());
    }
    let id = match parse_job_id(&id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    if (state.view.cancel)(id, "canceled over the REST API".to_owned()) {
        return Json(json!({ "job": format!("{:016x}", id.0), "state": JobState::Canceled }))
            .into_response();
    }
    let s = state.snapshot();
    match s.completed.iter().rev().find(|j| j.job == id) {
        Some(j) => error(
            StatusCode::CONFLICT,
            format!("job {:016x} already ended ({:?})", id.0, j.state),
        ),
        None => error(StatusCode::NOT_FOUND, format!("no job {:016x}", id.0)),
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = prometheus::Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        prometheus::render(&state.snapshot(), format),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
