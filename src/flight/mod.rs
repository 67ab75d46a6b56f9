//! Arrow Flight output: the `flight_sink` partitions a trainer reads
//! directly (issue 17).
//!
//! Each TaskManager serves the partitions of the `flight_sink` subtasks it
//! runs (`DoGet` on a ticket); the JobManager answers `GetFlightInfo` on a
//! job's name with one endpoint per partition (ticket and the TaskManager's
//! Flight address), and `ListFlights` with every running job's sinks. A
//! trainer reads the partitions in parallel, one stream each.
//!
//! Every batch message carries JSON `app_metadata`: the partition, the
//! execution attempt, and the offset of its first row in the partition.
//! After a failover a trainer asks for the flight info again, reads the
//! new attempt's streams and skips the rows whose offset it has seen:
//! see "What a trainer sees when a TaskManager fails" in the README.
//!
//! With a cluster secret, every call needs `authorization: Bearer <token>`,
//! the token being HMAC-SHA256(secret, "strata-flight-v1") in hex
//! ([`flight_token`]): it proves knowledge of the secret without sending
//! it, and a leaked token opens no other plane.

pub mod queue;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use arrow_schema::SchemaRef;
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

pub use queue::{FlightStreams, Next, Partition, PushError, StreamKey};

use crate::security::{ClusterSecret, constant_time_eq};

/// What the bearer token is derived from.
const TOKEN_CONTEXT: &[u8] = b"strata-flight-v1";
/// Largest Flight message: batches are sliced below it (gRPC clients
/// refuse large messages by default; Arrow's encoder uses 2 MiB).
const MESSAGE_BYTES_MAX: usize = 2 << 20;

/// Errors of the Flight servers.
#[derive(Debug, thiserror::Error)]
pub enum FlightError {
    #[error("Flight server on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// The bearer token of a cluster secret: HMAC-SHA256(secret,
/// "strata-flight-v1") as 64 hex digits.
pub fn flight_token(secret: &ClusterSecret) -> String {
    secret.mac_hex(TOKEN_CONTEXT)
}

/// Checks a request's `authorization` header against the token.
fn authorize<T>(token: &Option<String>, request: &Request<T>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    let given = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Status::unauthenticated(
            "wrong Flight token: use HMAC-SHA256(cluster secret, \"strata-flight-v1\") in hex",
        )),
        None => Err(Status::unauthenticated(
            "this cluster has a secret: send 'authorization: Bearer <token>', the token being HMAC-SHA256(cluster secret, \"strata-flight-v1\") in hex",
        )),
    }
}

/// The JSON `app_metadata` of a batch message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BatchMetadata {
    pub partition: u32,
    #[serde(with = "hex_u64")]
    pub execution: u64,
    /// The offset of the message's first row in the partition.
    pub offset: u64,
    pub rows: u64,
}

/// 64-bit ids as 16 hex digits in JSON.
pub mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{id:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Encodes batches as Flight messages of at most [`MESSAGE_BYTES_MAX`].
struct Encoder {
    generator: IpcDataGenerator,
    tracker: DictionaryTracker,
    options: IpcWriteOptions,
    context: arrow_ipc::writer::IpcWriteContext,
}

impl Encoder {
    fn new() -> Self {
        Encoder {
            generator: IpcDataGenerator::default(),
            tracker: DictionaryTracker::new(false),
            options: IpcWriteOptions::default(),
            context: Default::default(),
        }
    }

    fn schema(&self, schema: &arrow_schema::Schema) -> FlightData {
        SchemaAsIpc::new(schema, &self.options).into()
    }

    fn batch(
        &mut self,
        batch: &RecordBatch,
        offset: u64,
        key: &StreamKey,
        out: &mut std::collections::VecDeque<FlightData>,
    ) -> Result<(), Status> {
        let rows = batch.num_rows();
        let bytes = batch.get_array_memory_size().max(1);
        let pieces = bytes.div_ceil(MESSAGE_BYTES_MAX).clamp(1, rows.max(1));
        let per_piece = rows.div_ceil(pieces).max(1);
        let mut start = 0;
        while start < rows || (rows == 0 && start == 0) {
            let len = per_piece.min(rows - start);
            let piece = batch.slice(start, len);
            let (dictionaries, data) = self
                .generator
                .encode(&piece, &mut self.tracker, &self.options, &mut self.context)
                .map_err(|e| Status::internal(format!("encoding a batch: {e}")))?;
            out.extend(dictionaries.into_iter().map(FlightData::from));
            let metadata = BatchMetadata {
                partition: key.subtask,
                execution: key.execution,
                offset: offset + start as u64,
                rows: len as u64,
            };
            let metadata = serde_json::to_vec(&metadata)
                .map_err(|e| Status::internal(format!("encoding metadata: {e}")))?;
            out.push_back(FlightData::from(data).with_app_metadata(metadata));
            if rows == 0 {
                break;
            }
            start += len;
        }
        Ok(())
    }
}

fn unimplemented<T>(what: &str, role: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "a strata {role} does not serve {what}"
    )))
}

/// The TaskManager's Flight service: `DoGet` of its partitions.
pub struct TaskManagerFlight {
    streams: Arc<FlightStreams>,
    token: Option<String>,
}

impl TaskManagerFlight {
    pub fn new(streams: Arc<FlightStreams>, secret: Option<&ClusterSecret>) -> Self {
        TaskManagerFlight {
            streams,
            token: secret.map(flight_token),
        }
    }
}

/// Parses a ticket (JSON [`StreamKey`]).
pub fn parse_ticket(ticket: &[u8]) -> Result<StreamKey, Status> {
    serde_json::from_slice(ticket).map_err(|e| {
        Status::invalid_argument(format!(
            "not a strata ticket ({e}); get tickets from the JobManager's GetFlightInfo"
        ))
    })
}

#[tonic::async_trait]
impl FlightService for TaskManagerFlight {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented(
            "Handshake (send the bearer token with each call)",
            "TaskManager",
        )
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("ListFlights (ask the JobManager)", "TaskManager")
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unimplemented("GetFlightInfo (ask the JobManager)", "TaskManager")
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented("PollFlightInfo", "TaskManager")
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unimplemented("GetSchema (ask the JobManager)", "TaskManager")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        authorize(&self.token, &request)?;
        let key = parse_ticket(&request.get_ref().ticket)?;
        let partition = self.streams.get(&key).ok_or_else(|| {
            Status::not_found(format!(
                "no partition {} of execution {:016x} here: the attempt ended (a restart or the job's end); get the flight info again",
                key.subtask, key.execution
            ))
        })?;
        let reader = partition.attach().map_err(Status::failed_precondition)?;
        let encoder = Encoder::new();
        let mut pending = std::collections::VecDeque::new();
        pending.push_back(encoder.schema(&partition.schema));
        let state = (reader, encoder, pending, false);
        let stream = futures::stream::unfold(
            state,
            |(mut reader, mut encoder, mut pending, done)| async move {
                loop {
                    if let Some(message) = pending.pop_front() {
                        return Some((Ok(message), (reader, encoder, pending, done)));
                    }
                    if done {
                        return None;
                    }
                    match reader.next().await {
                        Next::Batch(item) => {
                            let key = reader.partition().key;
                            if let Err(status) =
                                encoder.batch(&item.batch, item.offset, &key, &mut pending)
                            {
                                return Some((Err(status), (reader, encoder, pending, true)));
                            }
                        }
                        Next::End => return None,
                        Next::Aborted(reason) => {
                            return Some((
                                Err(Status::aborted(reason)),
                                (reader, encoder, pending, true),
                            ));
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unimplemented("DoPut", "TaskManager")
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("DoExchange", "TaskManager")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented("DoAction", "TaskManager")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }
}

/// One `flight_sink` of a running job, as the JobManager sees it.
#[derive(Clone, Debug)]
pub struct FlightEntry {
    pub job_name: String,
    /// The `flight_sink` operator's name.
    pub sink: String,
    pub job: u64,
    pub attempt: u32,
    pub schema: SchemaRef,
    /// The partitions in subtask order and where each is served, or why
    /// they cannot be read now (deploying, restarting).
    pub partitions: Result<Vec<(StreamKey, SocketAddr)>, String>,
}

/// The JobManager's view of the running jobs' Flight sinks.
pub type FlightDirectory = Arc<dyn Fn() -> Vec<FlightEntry> + Send + Sync>;

/// The JobManager's Flight service: `GetFlightInfo`, `GetSchema` and
/// `ListFlights` over the running jobs' `flight_sink`s.
pub struct JobManagerFlight {
    directory: FlightDirectory,
    token: Option<String>,
}

impl JobManagerFlight {
    pub fn new(directory: FlightDirectory, secret: Option<&ClusterSecret>) -> Self {
        JobManagerFlight {
            directory,
            token: secret.map(flight_token),
        }
    }

    /// The entry a descriptor names: path `[job]` (a job with one
    /// `flight_sink`) or `[job, sink]`.
    fn find(&self, descriptor: &FlightDescriptor) -> Result<FlightEntry, Status> {
        let path: Vec<String> = if descriptor.path.is_empty() {
            String::from_utf8(descriptor.cmd.to_vec())
                .map(|c| c.split('/').map(str::to_owned).collect())
                .unwrap_or_default()
        } else {
            descriptor.path.clone()
        };
        let entries = (self.directory)();
        let (job, sink) = match path.as_slice() {
            [job] => (job.as_str(), None),
            [job, sink] => (job.as_str(), Some(sink.as_str())),
            _ => {
                return Err(Status::invalid_argument(
                    "a descriptor path of [job name] or [job name, flight_sink name]",
                ));
            }
        };
        let of_job: Vec<&FlightEntry> = entries.iter().filter(|e| e.job_name == job).collect();
        if of_job.is_empty() {
            let running: Vec<&str> = entries.iter().map(|e| e.job_name.as_str()).collect();
            return Err(Status::not_found(format!(
                "no running job '{job}' with a flight_sink (running: {}); a finished job's streams were read to their end: run the job again for another epoch",
                if running.is_empty() {
                    "none".to_owned()
                } else {
                    running.join(", ")
                }
            )));
        }
        let chosen = match sink {
            Some(sink) => of_job.iter().find(|e| e.sink == sink).ok_or_else(|| {
                let sinks: Vec<&str> = of_job.iter().map(|e| e.sink.as_str()).collect();
                Status::not_found(format!(
                    "job '{job}' has no flight_sink '{sink}'; its flight sinks are {}",
                    sinks.join(", ")
                ))
            })?,
            None if of_job.len() == 1 => &of_job[0],
            None => {
                let sinks: Vec<&str> = of_job.iter().map(|e| e.sink.as_str()).collect();
                return Err(Status::invalid_argument(format!(
                    "job '{job}' has {} flight sinks ({}): name one as the descriptor's second path element",
                    sinks.len(),
                    sinks.join(", ")
                )));
            }
        };
        Ok((*chosen).clone())
    }
}

/// The FlightInfo of an entry whose partitions are being served.
fn flight_info(entry: &FlightEntry) -> Result<FlightInfo, Status> {
    let partitions = entry
        .partitions
        .as_ref()
        .map_err(|reason| Status::unavailable(reason.clone()))?;
    let mut info = FlightInfo::new()
        .try_with_schema(&entry.schema)
        .map_err(|e| Status::internal(format!("encoding the schema: {e}")))?
        .with_descriptor(FlightDescriptor::new_path(vec![
            entry.job_name.clone(),
            entry.sink.clone(),
        ]))
        .with_ordered(false)
        .with_app_metadata(
            serde_json::json!({
                "job": format!("{:016x}", entry.job),
                "attempt": entry.attempt,
                "execution": partitions.first().map(|(k, _)| format!("{:016x}", k.execution)),
                "partitions": partitions.len(),
            })
            .to_string(),
        );
    for (key, addr) in partitions {
        let ticket = serde_json::to_vec(key)
            .map_err(|e| Status::internal(format!("encoding a ticket: {e}")))?;
        info = info.with_endpoint(
            FlightEndpoint::new()
                .with_ticket(Ticket::new(ticket))
                .with_location(format!("grpc+tcp://{addr}")),
        );
    }
    Ok(info)
}

#[tonic::async_trait]
impl FlightService for JobManagerFlight {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented(
            "Handshake (send the bearer token with each call)",
            "JobManager",
        )
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        authorize(&self.token, &request)?;
        let infos: Vec<Result<FlightInfo, Status>> = (self.directory)()
            .iter()
            .filter_map(|e| flight_info(e).ok())
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(infos))))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        authorize(&self.token, &request)?;
        let entry = self.find(request.get_ref())?;
        flight_info(&entry).map(Response::new)
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented("PollFlightInfo (use GetFlightInfo)", "JobManager")
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        authorize(&self.token, &request)?;
        let entry = self.find(request.get_ref())?;
        let options = IpcWriteOptions::default();
        SchemaResult::try_from(SchemaAsIpc::new(&entry.schema, &options))
            .map(Response::new)
            .map_err(|e| Status::internal(format!("encoding the schema: {e}")))
    }

    async fn do_get(
        &self,
        _request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        unimplemented("DoGet (read each endpoint's TaskManager)", "JobManager")
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unimplemented("DoPut", "JobManager")
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("DoExchange", "JobManager")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented("DoAction", "JobManager")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }
}

/// Serves `service` on `bind` (port 0: any free port) in the background;
/// returns the address it listens on.
pub async fn serve<S: FlightService>(service: S, bind: &str) -> Result<SocketAddr, FlightError> {
    let bind_error = |source| FlightError::Bind {
        address: bind.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!("Flight server on {addr} stopped: {e}");
        }
    });
    Ok(addr)
}
