//! A real OTLP/HTTP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`,
//! decoded with `opentelemetry-proto` and kept for the test to look at. It can stall (hold every
//! request unanswered) to play a collector that hangs. And [`ConnectionCounter`], a listener that
//! only counts the connections made to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use tokio::sync::watch;

use crate::eventually;

/// One span as the receiver got it, ids in lower-case hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SpanKind` as OTLP numbers it: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    /// The attributes, each as text (numbers and booleans written out).
    pub attributes: HashMap<String, String>,
    /// The names of the span's events.
    pub events: Vec<String>,
    /// `(trace_id, span_id)` of each linked span.
    pub links: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// The attribute `key` as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// The OTLP span kinds the tests look for.
pub const KIND_SERVER: i32 = 2;
pub const KIND_PRODUCER: i32 = 4;
pub const KIND_CONSUMER: i32 = 5;

#[derive(Default)]
struct State {
    spans: Vec<ReceivedSpan>,
    /// Export requests received (answered or not).
    requests: u64,
}

/// The running receiver. Dropped, it stops.
pub struct OtlpReceiver {
    endpoint: String,
    state: Arc<Mutex<State>>,
    stalled: watch::Sender<bool>,
    connections: Arc<AtomicU64>,
    handle: ServerHandle,
}

struct Shared {
    state: Arc<Mutex<State>>,
    stalled: watch::Receiver<bool>,
}

impl OtlpReceiver {
    /// Starts a receiver on a free loopback port, answering at once. It runs on a thread and
    /// runtime of its own, so one receiver can serve every test of a test binary.
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let (stalled, stalled_rx) = watch::channel(false);
        let shared = web::Data::new(Shared {
            state: state.clone(),
            stalled: stalled_rx,
        });
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let (started, start) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the OTLP receiver");
            runtime.block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(shared.clone())
                        // Spans of a busy test can make a large request.
                        .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                        .route("/v1/traces", web::post().to(traces))
                })
                .workers(1)
                .disable_signals()
                .on_connect(move |_, _| {
                    counted.fetch_add(1, Ordering::Relaxed);
                })
                .bind(("127.0.0.1", 0))
                .expect("bind the OTLP receiver");
                let port = server.addrs()[0].port();
                let server = server.run();
                let _ = started.send((port, server.handle()));
                let _ = server.await;
            });
        });
        let (port, handle) = start.recv().expect("the OTLP receiver starts");
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
            stalled,
            connections,
            handle,
        }
    }

    /// The base URL, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// While on, every export request is held unanswered (the exporter times out); off, the
    /// held ones are answered and kept.
    pub fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state().spans.clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.state()
            .spans
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Export requests received, answered or not.
    pub fn requests(&self) -> u64 {
        self.state().requests
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Waits until a span matching `found` has arrived, and returns it.
    pub async fn wait_for(
        &self,
        what: &str,
        found: impl Fn(&ReceivedSpan) -> bool,
    ) -> ReceivedSpan {
        eventually(Duration::from_secs(30), what, || async {
            self.state().spans.iter().any(&found)
        })
        .await;
        self.state()
            .spans
            .iter()
            .find(|span| found(span))
            .cloned()
            .expect("found above")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stall(false);
        // The stop command is sent at once; its thread ends when the server has stopped.
        drop(self.handle.stop(false));
    }
}

async fn traces(body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    shared
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .requests += 1;
    let mut stalled = shared.stalled.clone();
    let _ = stalled.wait_for(|stalled| !*stalled).await;
    let request = match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(request) => request,
        Err(error) => return HttpResponse::BadRequest().body(error.to_string()),
    };
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| {
                resource
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
            })
            .map(text)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect(),
                    events: span.events.into_iter().map(|event| event.name).collect(),
                    links: span
                        .links
                        .iter()
                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                        .collect(),
                });
            }
        }
    }
    shared
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .spans
        .extend(received);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(AnyValue::StringValue(text)) => text.clone(),
        Some(AnyValue::BoolValue(value)) => value.to_string(),
        Some(AnyValue::IntValue(value)) => value.to_string(),
        Some(AnyValue::DoubleValue(value)) => value.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Installs this process's subscriber with spans exported to `endpoint` (service name
/// `clerk-sync-test`, every span sampled, exported every 100 ms, `queue` spans queued at most,
/// each export bounded by `export_timeout`) and logs of warnings and errors. Keep what it returns
/// for as long as spans should be exported. Once per process: a second call exports nothing.
pub fn install_tracing(
    endpoint: &str,
    queue: usize,
    export_timeout: Duration,
) -> shared::telemetry::Telemetry {
    let settings = shared::Settings {
        otel_exporter_otlp_endpoint: Some(endpoint.to_owned()),
        otel_service_name: Some("clerk-sync-test".into()),
        otel_traces_sampler: "always_on".into(),
        otel_bsp_max_queue_size: queue,
        otel_bsp_schedule_delay: 100,
        otel_exporter_otlp_timeout: export_timeout.as_millis() as u64,
        ..shared::Settings::default()
    };
    let traces = shared::telemetry::TraceSettings::from_settings(&settings, "clerk-sync-test")
        .expect("valid trace settings");
    shared::telemetry::install(
        shared::telemetry::LogFormat::Pretty,
        traces,
        tracing_subscriber::EnvFilter::new("warn"),
    )
}

/// A listener that accepts and counts connections, and closes each at once.
pub struct ConnectionCounter {
    address: std::net::SocketAddr,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectionCounter {
    /// Listens on `address` (e.g. `127.0.0.1:4318`).
    pub async fn bind(address: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
        });
        Ok(Self {
            address,
            connections,
            task,
        })
    }

    /// The address it listens on.
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// For a test that installs this process's subscriber ([`install_tracing`]): the subscriber, the
/// propagator and the "tracing on" flag are process-wide, and every test of a crate shares one
/// binary, so such a test runs in a process of its own. Called first in the test with its full
/// name (`module::function`): in the test binary's own run it starts the binary again with only
/// that test, waits for it, fails when it fails or did not run, and returns false (the test then
/// returns); in that second process it returns true and the test goes on.
pub fn in_a_process_of_its_own(test: &str) -> bool {
    // Set on the process started below: the test it is to run.
    if std::env::var("CLERK_SYNC_TEST_ALONE").is_ok_and(|alone| alone == test) {
        return true;
    }
    let binary = std::env::current_exe().expect("the test binary's path");
    let output = std::process::Command::new(binary)
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env("CLERK_SYNC_TEST_ALONE", test)
        .output()
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test} in a process of its own: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    false
}
