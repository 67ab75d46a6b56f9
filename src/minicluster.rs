//! The embedded mini-cluster behind `strata run`: one JobManager and N
//! TaskManagers in one process, talking over real loopback sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::ClusterError;
use crate::cluster::jobmanager::JobManager;
use crate::config::Config;
use crate::taskmanager::TaskManager;

/// Serves `jobmanager`'s REST API, `/metrics` and the web UI on `address`
/// (here, not in the JobManager: the cluster and the web UI know only the
/// protocol's snapshot and a cancel handle, not each other). With a
/// cluster secret, `POST /jobs/{id}/cancel` accepts the token derived from
/// it; without one, cancelling over REST is disabled.
pub async fn serve_rest(
    jobmanager: &JobManager,
    address: &str,
) -> Result<SocketAddr, crate::web::WebError> {
    let snapshot = jobmanager.snapshot_source();
    let view = crate::web::ClusterView {
        snapshot: Box::new(snapshot),
        cancel: Box::new(jobmanager.cancel_handle()),
        cancel_token: jobmanager.secret().map(crate::web::cancel_token),
    };
    let bound = crate::web::serve(address, view).await?;
    tracing::info!("web UI and REST API at http://{bound}/ (Prometheus: /metrics)");
    Ok(bound)
}

/// Serves `jobmanager`'s Arrow Flight service (`GetFlightInfo` on a job's
/// name) on `address`, authenticated with `secret` when there is one.
pub async fn serve_flight(
    jobmanager: &JobManager,
    address: &str,
    secret: Option<&crate::security::ClusterSecret>,
) -> Result<SocketAddr, crate::flight::FlightError> {
    let service = crate::flight::JobManagerFlight::new(jobmanager.flight_directory(), secret);
    let bound = crate::flight::serve(service, address).await?;
    tracing::info!("Arrow Flight at grpc://{bound} (GetFlightInfo on a job's name)");
    Ok(bound)
}

pub struct MiniCluster {
    pub jobmanager: JobManager,
    shutdown: Arc<AtomicBool>,
    taskmanagers: Vec<tokio::task::JoinHandle<()>>,
}

impl MiniCluster {
    /// Starts the JobManager on an ephemeral loopback port and
    /// `taskmanagers` TaskManagers, and waits until all have registered.
    pub async fn start(config: Config, taskmanagers: usize) -> Result<Self, ClusterError> {
        let jobmanager = JobManager::start(config.clone(), "127.0.0.1:0").await?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let address = jobmanager.addr.to_string();
        // Start the TaskManagers side by side: each pre-touches its memory.
        let mut starting = tokio::task::JoinSet::new();
        let mut running = Vec::new();
        for _ in 0..taskmanagers {
            let mut tm_config = config.clone();
            tm_config.data_port = 0;
            tm_config.taskmanager_flight_port = 0;
            starting.spawn(TaskManager::start(tm_config));
        }
        while let Some(started) = starting.join_next().await {
            let tm = started
                .map_err(|e| ClusterError::Startup {
                    reason: e.to_string(),
                })?
                .map_err(|e| ClusterError::TaskManager(e.to_string()))?;
            let (address, shutdown) = (address.clone(), Arc::clone(&shutdown));
            running.push(tokio::spawn(async move {
                if let Err(e) = tm.run(address, shutdown).await {
                    tracing::error!("TaskManager stopped: {e}");
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while jobmanager.taskmanager_count() < taskmanagers {
            if Instant::now() > deadline {
                return Err(ClusterError::Startup {
                    reason: format!(
                        "{} of {taskmanagers} TaskManagers registered within 30 s",
                        jobmanager.taskmanager_count()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            jobmanager,
            shutdown,
            taskmanagers: running,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.jobmanager.addr
    }

    /// Stops the TaskManagers and waits for them: each cancels its tasks
    /// and waits for their threads (at most `heartbeat.timeout`), so that
    /// no task outlives the cluster and their spill directories are gone
    /// when this returns.
    pub async fn shutdown(mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
        for handle in std::mem::take(&mut self.taskmanagers) {
            if let Err(e) = handle.await {
                tracing::warn!("a TaskManager ended with {e}");
            }
        }
    }
}

impl Drop for MiniCluster {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }
}
