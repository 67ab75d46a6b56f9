//! The job client: submits a job to a JobManager, shows progress, and
//! returns the end-of-job summary.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::TcpStream;

use super::ClusterError;
use crate::protocol::{JobSummary, Message, read_message, write_message};
use crate::security::{PeerAuth, Plane, Role};

/// Submits a job to a JobManager without a cluster secret (loopback) and
/// waits for its end; see [`submit_job_with`].
pub async fn submit_job(
    jobmanager: &str,
    job_text: String,
    job_path: String,
    progress: bool,
) -> Result<JobSummary, ClusterError> {
    submit_job_with(
        &PeerAuth::loopback(),
        jobmanager,
        job_text,
        job_path,
        progress,
    )
    .await
}

/// Submits a job and waits for its end, authenticating with `auth`.
/// `progress` draws a progress bar on standard error (hidden when it is not
/// a terminal).
pub async fn submit_job_with(
    auth: &PeerAuth,
    jobmanager: &str,
    job_text: String,
    job_path: String,
    progress: bool,
) -> Result<JobSummary, ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        address: jobmanager.to_owned(),
        reason,
    };
    let connect = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(jobmanager));
    let mut stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable("connection timed out after 10 s".into())),
    };
    auth.handshake(&mut stream, Role::Client, Plane::Control, jobmanager)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut reader, mut writer) = stream.into_split();
    write_message(&mut writer, &Message::SubmitJob { job_text, job_path })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let lost = |reason: String| ClusterError::Lost {
        address: jobmanager.to_owned(),
        reason,
    };
    let bar = if progress {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    loop {
        match read_message(&mut reader)
            .await
            .map_err(|e| lost(e.to_string()))?
        {
            Message::JobAccepted { job, name } => {
                bar.set_message(format!("{name} ({job:016x})"));
            }
            Message::JobRejected { reason } | Message::Disconnect { reason } => {
                return Err(ClusterError::Rejected { reason });
            }
            Message::JobProgress {
                rows_in,
                rows_expected,
                tasks_running,
                tasks_total,
                ..
            } => {
                if rows_expected > 0 && bar.length().is_none() {
                    bar.set_length(rows_expected);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {msg} [{bar:30}] {human_pos}/{human_len} rows ({per_sec}, eta {eta})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                }
                bar.set_position(rows_in);
                if rows_expected == 0 {
                    bar.set_message(format!(
                        "{rows_in} rows, {tasks_running}/{tasks_total} tasks running"
                    ));
                    bar.tick();
                }
            }
            Message::JobFinished { summary } => {
                bar.finish_and_clear();
                return Ok(*summary);
            }
            other => tracing::debug!("ignoring {other:?}"),
        }
    }
}
