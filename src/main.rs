//! The `strata` command line: glue only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use strata::cluster::client::submit_job_with;
use strata::cluster::jobmanager::JobManager;
use strata::cluster::summary;
use strata::config::{Config, ConfigSource};
use strata::job::graph::JobGraph;
use strata::minicluster::MiniCluster;
use strata::protocol::JobState;
use strata::security::PeerAuth;
use strata::taskmanager::TaskManager;

/// Buffers cross threads (read on a network thread, freed by a task), which
/// glibc's allocator answers by returning and re-faulting pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "A hardware-tiered TaskManager for dataflow jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Configuration file (.toml, or Flink-style flat .yaml).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Override a configuration key: -D key=value (repeatable).
    #[arg(short = 'D', value_name = "KEY=VALUE", global = true)]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config> {
        let env = std::env::var("STRATA_PROPERTIES").ok();
        Ok(Config::load(
            self.config.as_deref(),
            env.as_deref(),
            &self.overrides,
        )?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on an embedded mini-cluster (one JobManager, N TaskManagers).
    Run {
        job: PathBuf,
        /// Number of TaskManagers. One by default: its slots exchange data
        /// through local channels (by reference); two or more exchange over
        /// loopback sockets, as a real cluster does.
        #[arg(long, default_value_t = 1)]
        taskmanagers: usize,
        /// Slots per TaskManager (taskmanager.numberOfTaskSlots).
        #[arg(long)]
        slots: Option<u32>,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Run a JobManager.
    Jobmanager {
        /// Listen address; default jobmanager.rpc.address:jobmanager.rpc.port.
        #[arg(long)]
        bind: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Run a TaskManager that registers with a JobManager.
    Taskmanager {
        /// JobManager address HOST:PORT; default jobmanager.rpc.address:port.
        #[arg(long)]
        jobmanager: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Submit a job to a running JobManager and wait for it.
    Submit {
        job: PathBuf,
        #[arg(long)]
        jobmanager: Option<String>,
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print where each operator of a job would run (CPU or GPU), why, and
    /// its estimated cost on each tier.
    Explain {
        job: PathBuf,
        /// Calibration file to price with (default: placement.calibration-file,
        /// else ~/.config/strata/calibration.json, else built-in defaults).
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Print the placement as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Measure the whole node (memory, CPU, GPU, network, storage), each
    /// figure beside a reference measured in the same run; or write the
    /// placement calibration (--calibrate); or compare two reports
    /// (--compare); or serve as the far end of another node's run (--serve).
    Bench {
        /// Write the kernel rates as the calibration file placement reads
        /// (the measurement `strata bench --calibrate` always made).
        #[arg(long)]
        calibrate: bool,
        /// Where to write the calibration (default: placement.calibration-file,
        /// else ~/.config/strata/calibration.json).
        #[arg(long, requires = "calibrate")]
        output: Option<PathBuf>,
        /// Rows per kernel measurement of --calibrate.
        #[arg(long, default_value_t = 4 << 20)]
        rows: usize,
        /// Smaller sizes and fewer repetitions: under a minute.
        #[arg(long)]
        quick: bool,
        /// Sections to run, comma-separated: memory, cpu, gpu, network, storage.
        #[arg(long, value_delimiter = ',', value_parser = parse_section)]
        only: Vec<strata::bench::Section>,
        /// Write every result as JSON (with the machine it ran on).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write one self-contained HTML report (tables and plots).
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Write SVG plots of throughput against batch and message size.
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
        /// Print B/A per figure of two JSON reports (with --html/--plots:
        /// write the comparison there too).
        #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with_all = ["calibrate", "serve"])]
        compare: Vec<PathBuf>,
        /// The change --compare flags: 0.1 is ±10%.
        #[arg(long, default_value_t = strata::bench::compare::NOISE_DEFAULT)]
        noise: f64,
        /// Measure the network against `strata bench --serve` on HOST:PORT
        /// instead of loopback.
        #[arg(long, value_name = "HOST:PORT")]
        peer: Option<String>,
        /// Serve as the far end of another node's `--peer` run.
        #[arg(long, conflicts_with = "calibrate")]
        serve: bool,
        /// Address --serve listens on (a non-loopback one needs the
        /// cluster secret for the shuffle's data server).
        #[arg(long, value_name = "ADDR", default_value = strata::bench::serve::LISTEN_DEFAULT)]
        listen: String,
        /// Directory the storage section writes in (default: the first
        /// io.tmp.dirs).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Multiplies every data size (for tests on a debug build).
        #[arg(long, default_value_t = 1.0, hide = true)]
        size_scale: f64,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the effective configuration and memory layout.
    Config {
        /// Configuration file (same as --config).
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn main() -> ExitCode {
    let started = std::time::SystemTime::now();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,strata=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text
/// the message already holds (typed errors often name their source in
/// their own message, as `report a.json: <serde error>`).
fn error_chain(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

fn parse_section(text: &str) -> Result<strata::bench::Section, String> {
    text.parse()
        .map_err(|e: strata::bench::BenchError| e.to_string())
}

/// `strata bench --compare A B`: the table, and the page and plot if asked.
fn bench_compare(
    a: &Path,
    b: &Path,
    noise: f64,
    html: Option<&Path>,
    plots: Option<&Path>,
) -> Result<ExitCode> {
    let (report_a, report_b) = (
        strata::bench::Report::read_json(a)?,
        strata::bench::Report::read_json(b)?,
    );
    println!("A: {} ({})", a.display(), report_a.machine.describe());
    println!("B: {} ({})", b.display(), report_b.machine.describe());
    let comparison = strata::bench::compare::compare(&report_a, &report_b, noise);
    print!("{}", comparison.render_table());
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the plot directory {}", dir.display()))?;
        let path = dir.join("compare.svg");
        std::fs::write(&path, comparison.ratio_svg()?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("comparison plot written to {}", path.display());
    }
    if let Some(path) = html {
        let page = comparison.render_html(&a.display().to_string(), &b.display().to_string())?;
        std::fs::write(path, page)
            .with_context(|| format!("writing the comparison report {}", path.display()))?;
        println!("comparison report written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn stop_signal() {
    StopSignals::new().next().await;
}

/// A signal that asks the process to stop.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Interrupt,
    Terminate,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Interrupt => "SIGINT (Ctrl-C)",
            Stop::Terminate => "SIGTERM",
        }
    }

    /// The shell's convention: 128 + the signal's number.
    fn code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        }
    }

    fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

/// SIGINT and SIGTERM, caught from when this is made (a signal that comes
/// before anyone waits is kept for the next [`StopSignals::next`]).
struct StopSignals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Needs a running tokio runtime. A handler that cannot be installed
    /// leaves that signal's default action (the process ends).
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        StopSignals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next stop signal.
    async fn next(&mut self) -> Stop {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            let received = match signal {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !received {
                // No handler, or the runtime is shutting down: never.
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            _ = recv(&mut self.interrupt) => Stop::Interrupt,
            _ = recv(&mut self.terminate) => Stop::Terminate,
        }
    }
}

/// How often a stopped `strata run` looks again for jobs to cancel: a job
/// submitted just after the signal is not running yet when it comes.
const CANCEL_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `work` (a local run's jobs) until it returns. The first SIGINT or
/// SIGTERM cancels every running job, so that the run ends through the
/// normal path: tasks canceled, the mini-cluster shut down, its spill
/// directories removed, a summary printed. A second signal exits at once.
async fn run_until_stopped<T>(
    work: impl std::future::Future<Output = T>,
    signals: &mut StopSignals,
    jobmanager: &JobManager,
) -> (T, Option<Stop>) {
    let cancel = jobmanager.cancel_handle();
    let snapshot = jobmanager.snapshot_source();
    let cancel_running = |stop: Stop| {
        for job in snapshot().running {
            if cancel(job.job, format!("canceled by {}", stop.name())) {
                tracing::info!("job '{}' canceled by {}", job.name, stop.name());
            }
        }
    };
    tokio::pin!(work);
    let mut stopped: Option<Stop> = None;
    let mut recheck = tokio::time::interval(CANCEL_RECHECK);
    loop {
        tokio::select! {
            out = &mut work => return (out, stopped),
            stop = signals.next() => {
                if stopped.is_some() {
                    eprintln!("{}: stopping now, without waiting for the job", stop.name());
                    std::process::exit(i32::from(stop.code()));
                }
                eprintln!(
                    "{}: canceling the job (send it again to stop at once)",
                    stop.name()
                );
                stopped = Some(stop);
                cancel_running(stop);
            }
            _ = recheck.tick(), if stopped.is_some() => {
                if let Some(stop) = stopped {
                    cancel_running(stop);
                }
            }
        }
    }
}

/// `strata run` reads its sources on this machine. A CSV source whose job
/// file declares its schema is not read when the job is planned (so that
/// `explain`, or a cluster whose data is on its TaskManagers, needs no data
/// where the job is planned); a local run checks that the path has CSV
/// files, so that a mistyped path is an error now, not a task failure that
/// the restart strategy retries (forever, with checkpointing on).
fn check_local_sources(plan: &strata::job::LogicalPlan) -> Result<()> {
    for op in &plan.spec.operators {
        if let strata::job::OperatorKind::CsvSource(csv) = &op.kind
            && let Err(e) = strata::job::source_files(&csv.path, "csv")
        {
            let line = op.lines.key("path").unwrap_or(op.line);
            anyhow::bail!(
                "{}:{line}: operator '{}' (csv_source): key 'path': {e}",
                plan.spec.file.display(),
                op.name
            );
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn read_job(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// Prints the summary; `since` names the moment the time to the first row
/// is measured from.
fn finish(
    summary: &strata::protocol::JobSummary,
    since: (&str, std::time::SystemTime),
) -> ExitCode {
    print!("{}", summary::render(summary));
    if let Some(first) = summary.first_row_unix_us {
        let (what, at) = since;
        let start = strata::exec::task::unix_micros(at);
        println!(
            "  time to first row: {:.1} ms after {what}",
            first.saturating_sub(start) as f64 / 1000.0
        );
    }
    if summary.state == JobState::Finished {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs the fit phases of the job's `standardize` operators (each a job of
/// its own) before the job, and says what each fitted.
async fn run_fit_phases(
    auth: &PeerAuth,
    address: &str,
    text: &str,
    path: &str,
    progress: bool,
) -> Result<()> {
    let phases = strata::cluster::phases::fit_phases(text, std::path::Path::new(path))?;
    for phase in phases {
        eprintln!(
            "fit phase for '{}': {} over the whole output of '{}' -> {}",
            phase.operator,
            phase.columns.join(", "),
            phase.fitted,
            phase.stats.display()
        );
        let summary = submit_job_with(
            auth,
            address,
            phase.job_text.clone(),
            path.to_owned(),
            progress,
        )
        .await?;
        if summary.state != JobState::Finished {
            anyhow::bail!(
                "the fit phase of '{}' (job '{}') ended {:?}: {}",
                phase.operator,
                phase.job_name,
                summary.state,
                summary.reason.as_deref().unwrap_or("no reason given")
            );
        }
        let artifact = strata::job::stats::StatsArtifact::read(&phase.stats)?;
        let fits: Vec<String> = artifact
            .columns
            .iter()
            .map(|(c, f)| format!("{c}: mean {:.6} std {:.6}", f.mean, f.std))
            .collect();
        eprintln!(
            "  fitted over {} rows in {:.2} s: {}",
            artifact.rows,
            summary.wall_ms as f64 / 1000.0,
            fits.join("; ")
        );
    }
    Ok(())
}

/// The host part of a HOST:PORT bind address.
fn jm_host(bind: &str) -> &str {
    bind.rsplit_once(':').map_or(bind, |(host, _)| host)
}

fn jm_address(explicit: Option<String>, config: &Config) -> String {
    explicit.unwrap_or_else(|| format!("{}:{}", config.jobmanager_address, config.jobmanager_port))
}

fn run(cli: Cli, started: std::time::SystemTime) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            job,
            taskmanagers,
            slots,
            no_progress,
            config,
        } => {
            let mut overrides = config.overrides.clone();
            if let Some(s) = slots {
                overrides.push(format!("taskmanager.numberOfTaskSlots={s}"));
            }
            let mut args = ConfigArgs {
                overrides,
                ..config
            };
            let mut config = args.load()?;
            let (text, path) = read_job(&job)?;
            // Validate the job before starting anything.
            let plan = strata::job::load_job(&job)?;
            check_local_sources(&plan)?;
            let taskmanagers = taskmanagers.max(1);
            if matches!(
                config.source_of("taskmanager.numberOfTaskSlots"),
                Some(ConfigSource::Default) | None
            ) {
                // Like Flink's local MiniCluster: enough slots for the job.
                // Reloaded so that the memory layout is derived for them.
                let needed = JobGraph::build(&plan, config.default_parallelism).slots_needed();
                let slots = needed.div_ceil(taskmanagers as u32).max(1);
                args.overrides
                    .push(format!("taskmanager.numberOfTaskSlots={slots}"));
                config = args.load()?;
            }
            let rt = runtime()?;
            rt.block_on(async {
                let rest_port = config.rest_port;
                let cluster_config = config.clone();
                let cluster = MiniCluster::start(config, taskmanagers).await?;
                // Caught from here on (during start-up, Ctrl-C still ends
                // the process at once); the run acts on it once the job is
                // submitted.
                let mut signals = StopSignals::new();
                // The configured port when free, else any: a busy 8081 must
                // not stop a local run.
                let jm = &cluster.jobmanager;
                if strata::minicluster::serve_rest(jm, &format!("127.0.0.1:{rest_port}"))
                    .await
                    .is_err()
                {
                    strata::minicluster::serve_rest(jm, "127.0.0.1:0").await?;
                }
                let auth = PeerAuth::from_config(&cluster_config)?;
                // Arrow Flight for a trainer: the configured port when
                // free, else any (a job with a flight_sink says where).
                let flight_port = cluster_config.jobmanager_flight_port;
                let secret = auth.secret.as_ref();
                let flight = match strata::minicluster::serve_flight(
                    jm,
                    &format!("127.0.0.1:{flight_port}"),
                    secret,
                )
                .await
                {
                    Ok(bound) => bound,
                    Err(_) => strata::minicluster::serve_flight(jm, "127.0.0.1:0", secret).await?,
                };
                if plan
                    .spec
                    .operators
                    .iter()
                    .any(|op| matches!(op.kind, strata::job::OperatorKind::FlightSink { .. }))
                {
                    eprintln!(
                        "Arrow Flight: grpc://{flight} (GetFlightInfo on \"{}\")",
                        plan.spec.name
                    );
                }
                let address = cluster.address().to_string();
                let work = async {
                    run_fit_phases(&auth, &address, &text, &path, !no_progress).await?;
                    submit_job_with(&auth, &address, text.clone(), path.clone(), !no_progress)
                        .await
                        .map_err(anyhow::Error::from)
                };
                let (summary, stopped) =
                    run_until_stopped(work, &mut signals, &cluster.jobmanager).await;
                cluster.shutdown().await;
                match (summary, stopped) {
                    (Ok(summary), None) => Ok(finish(&summary, ("process start", started))),
                    (Ok(summary), Some(stop)) => {
                        finish(&summary, ("process start", started));
                        Ok(stop.exit_code())
                    }
                    // A fit phase canceled by the signal ends the run here.
                    (Err(e), Some(stop)) => {
                        eprintln!("stopped by {}: {e:#}", stop.name());
                        Ok(stop.exit_code())
                    }
                    (Err(e), None) => Err(e),
                }
            })
        }
        Command::Jobmanager { bind, config } => {
            let config = config.load()?;
            let bind = bind.unwrap_or_else(|| {
                format!("{}:{}", config.jobmanager_address, config.jobmanager_port)
            });
            let rt = runtime()?;
            rt.block_on(async {
                let rest = format!("{}:{}", jm_host(&bind), config.rest_port);
                let flight = format!("{}:{}", jm_host(&bind), config.jobmanager_flight_port);
                let secret = strata::security::ClusterSecret::from_config(&config)?;
                let jm = JobManager::start(config, &bind).await?;
                println!("JobManager listening on {}", jm.addr);
                if let Err(e) = strata::minicluster::serve_rest(&jm, &rest).await {
                    tracing::warn!("{e}; running without the web UI (set rest.port)");
                }
                // serve_flight logs the address it bound (logged, not
                // printed: a supervisor may read only the first line of
                // standard output and close it).
                if let Err(e) =
                    strata::minicluster::serve_flight(&jm, &flight, secret.as_ref()).await
                {
                    tracing::warn!(
                        "{e}; running without Arrow Flight (set jobmanager.flight.port)"
                    );
                }
                // SIGTERM (service managers, `docker stop`, pod deletion) or Ctrl-C.
                stop_signal().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Taskmanager { jobmanager, config } => {
            let config = config.load()?;
            let address = jm_address(jobmanager, &config);
            let rt = runtime()?;
            rt.block_on(async {
                let tm = TaskManager::start(config).await?;
                println!("TaskManager data port {}", tm.data_addr());
                let shutdown = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                // SIGTERM (how service managers stop it) or Ctrl-C: the
                // TaskManager cancels its tasks and returns, so its spill
                // directories are removed instead of left for the next start.
                let stop = std::sync::Arc::clone(&shutdown);
                tokio::spawn(async move {
                    stop_signal().await;
                    tracing::info!("TaskManager stopping on a signal: cancelling its tasks");
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                });
                tm.run(address, shutdown).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Submit {
            job,
            jobmanager,
            no_progress,
            config,
        } => {
            let config = config.load()?;
            let address = jm_address(jobmanager, &config);
            let (text, path) = read_job(&job)?;
            let auth = PeerAuth::from_config(&config)?;
            let rt = runtime()?;
            rt.block_on(async {
                let submitted = std::time::SystemTime::now();
                let mut signals = StopSignals::new();
                let work = async {
                    run_fit_phases(&auth, &address, &text, &path, !no_progress).await?;
                    let summary =
                        submit_job_with(&auth, &address, text.clone(), path.clone(), !no_progress)
                            .await?;
                    Ok::<_, anyhow::Error>(finish(&summary, ("submission", submitted)))
                };
                tokio::select! {
                    code = work => code,
                    // The job is the cluster's now: leaving does not stop
                    // it, and the user is told so rather than left to guess.
                    stop = signals.next() => {
                        eprintln!(
                            "{}: stopped waiting; a job already submitted keeps running \
                             (JobManager {address}: its REST API lists it at /jobs and \
                             cancels it with POST /jobs/ID/cancel)",
                            stop.name()
                        );
                        Ok(stop.exit_code())
                    }
                }
            })
        }
        Command::Explain {
            job,
            calibration,
            json,
            config,
        } => {
            let config = config.load()?;
            let plan = strata::job::load_job(&job)?;
            let graph = JobGraph::build(&plan, config.default_parallelism);
            let placement = strata::placement::place_on_this_node(
                &plan,
                &graph,
                &config,
                calibration.as_deref(),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&placement)?);
            } else {
                print!(
                    "{}",
                    strata::placement::explain::render(&plan.spec.name, &placement)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            calibrate,
            output,
            rows,
            quick,
            only,
            json,
            html,
            plots,
            compare,
            noise,
            peer,
            serve,
            listen,
            dir,
            size_scale,
            no_progress,
            config,
        } => {
            let config = config.load()?;
            if let [a, b] = compare.as_slice() {
                return bench_compare(a, b, noise, html.as_deref(), plots.as_deref());
            }
            if serve {
                let auth = PeerAuth::from_config(&config)?;
                let server =
                    strata::bench::serve::Server::bind(strata::bench::serve::ServeOptions {
                        listen,
                        auth,
                        stoppable: false,
                    })?;
                // The test harness and scripts wait for this line.
                println!("strata bench serving on {}", server.local_addr());
                server.serve()?;
                return Ok(ExitCode::SUCCESS);
            }
            if calibrate {
                eprintln!("{}", strata::kernels::gpu::detect().describe());
                let options = strata::bench::CalibrateOptions {
                    rows: rows.max(1),
                    ..Default::default()
                };
                let measured = strata::bench::calibrate(options)?;
                print!("{}", strata::bench::render(&measured));
                let path = output
                    .or_else(|| {
                        (!config.calibration_file.is_empty())
                            .then(|| PathBuf::from(&config.calibration_file))
                    })
                    .unwrap_or_else(strata::placement::calibration::default_path);
                measured.write(&path)?;
                println!("calibration written to {}", path.display());
                return Ok(ExitCode::SUCCESS);
            }
            let options = strata::bench::BenchOptions {
                sections: if only.is_empty() {
                    strata::bench::Section::ALL.to_vec()
                } else {
                    only
                },
                quick,
                size_scale,
                dir: dir.unwrap_or_else(|| config.tmp_dirs[0].clone()),
                peer,
                auth: PeerAuth::from_config(&config)?,
            };
            let progress = if no_progress {
                indicatif::ProgressBar::hidden()
            } else {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} {prefix}: {msg}",
                    )
                    .expect("a valid progress template"),
                );
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
                bar
            };
            let report = strata::bench::run(&options, &progress);
            progress.finish_and_clear();
            print!("{}", report.render_table());
            if let Some(path) = &json {
                report.write_json(path)?;
                println!("JSON written to {}", path.display());
            }
            if let Some(dir) = &plots {
                let written = report.write_plots(dir)?;
                println!("{} plots written to {}", written.len(), dir.display());
            }
            if let Some(path) = &html {
                std::fs::write(path, report.render_html()?)
                    .with_context(|| format!("writing the HTML report {}", path.display()))?;
                println!("HTML report written to {}", path.display());
            }
            let failed = report
                .run
                .skipped
                .iter()
                .any(|s| s.reason.starts_with("failed:"));
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Config { file, config } => {
            let args = ConfigArgs {
                config: file.or(config.config.clone()),
                ..config
            };
            print!("{}", args.load()?.render_table());
            Ok(ExitCode::SUCCESS)
        }
    }
}
