//! The JobManager's REST API, Prometheus endpoint and web UI.
//!
//! Read-only views over [`ClusterSnapshot`]s: `/taskmanagers`, `/jobs`,
//! `/jobs/{id}` (JSON, like Flink's REST API), `/metrics` (Prometheus, see
//! [`prometheus`] for the names and formats) and `/` (a page that polls the
//! JSON endpoints). The server never
//! holds the JobManager's lock across an await: each request takes one
//! snapshot.

mod prometheus;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::protocol::ClusterSnapshot;

pub use prometheus::{Format as MetricsFormat, render as render_prometheus};

type Source = Arc<dyn Fn() -> ClusterSnapshot + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("cannot serve the REST API on {address}: {source}")]
pub struct WebError {
    pub address: String,
    #[source]
    pub source: std::io::Error,
}

/// Binds the REST server and serves it in the background; returns the bound
/// address.
pub async fn serve(
    address: &str,
    source: impl Fn() -> ClusterSnapshot + Send + Sync + 'static,
) -> Result<SocketAddr, WebError> {
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
    let source: Source = Arc::new(source);
    let app = Router::new()
        .route("/", get(index))
        .route("/taskmanagers", get(taskmanagers))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/metrics", get(metrics))
        .with_state(source);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("REST server stopped: {e}");
        }
    });
    Ok(bound)
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

async fn taskmanagers(State(source): State<Source>) -> impl IntoResponse {
    Json(source().taskmanagers)
}

async fn jobs(State(source): State<Source>) -> impl IntoResponse {
    let s = source();
    Json(serde_json::json!({ "running": s.running, "completed": s.completed }))
}

async fn job(State(source): State<Source>, Path(id): Path<String>) -> Response {
    let Ok(id) = u64::from_str_radix(&id, 16) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("job id '{id}' is not a hex job id"),
        )
            .into_response();
    };
    let s = source();
    match s
        .running
        .iter()
        .chain(&s.completed)
        .rev()
        .find(|j| j.job.0 == id)
    {
        Some(j) => Json(j.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no job {id:016x}")).into_response(),
    }
}

async fn metrics(State(source): State<Source>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = prometheus::Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        prometheus::render(&source(), format),
    )
        .into_response()
}
