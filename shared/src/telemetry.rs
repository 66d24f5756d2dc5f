//! Logging and tracing set-up, the same for every binary.
//!
//! Logs go to stderr, human-readable or JSON. Traces go over OTLP (HTTP with protobuf) only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise no exporter is built, no connection is ever
//! attempted and no span is created for OpenTelemetry's sake.
//!
//! When on, the export runs on a thread and runtime of its own, away from the request and
//! consumer threads: a collector that is down, slow or failing holds up nothing but that thread.
//! Finished spans wait in a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`); a span that finds it full
//! is dropped and counted in `clerk_sync_trace_spans_dropped_total`, so memory stays bounded
//! whatever the collector does. Each export, retries included, is bounded by
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, and so is the flush at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::{IntCounter, IntGauge};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{ConfigError, Settings};

/// `LOG_FORMAT`: human-readable lines or one JSON object a line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Whether spans are exported (set once by [`init`]). The hot paths ask this before they do any
/// work for tracing, so that tracing off costs one atomic load.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Spans dropped because the export queue was full (process-wide, like the tracer provider).
static SPANS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "clerk_sync_trace_spans_dropped_total",
        "Finished spans dropped because the trace export queue was full (collector down or slow)",
    )
    .expect("a valid metric name")
});

/// Spans waiting in the export queue.
static SPANS_QUEUED: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::new(
        "clerk_sync_trace_spans_queued",
        "Finished spans waiting in the trace export queue",
    )
    .expect("a valid metric name")
});

/// Whether this process exports spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Registers the export queue's metrics in `registry` (each binary has a registry of its own;
/// the counts are the process's).
pub fn register_metrics(registry: &prometheus::Registry) -> prometheus::Result<()> {
    registry.register(Box::new(SPANS_DROPPED.clone()))?;
    registry.register(Box::new(SPANS_QUEUED.clone()))
}

/// Spans dropped so far because the export queue was full.
pub fn spans_dropped() -> u64 {
    SPANS_DROPPED.get()
}

/// Spans waiting in the export queue now.
pub fn spans_queued() -> i64 {
    SPANS_QUEUED.get()
}

/// The tracing settings, read from [`Settings`] (the standard `OTEL_*` variables). `Debug`
/// shows the headers' names only.
#[derive(Clone)]
pub struct TraceSettings {
    /// Where `/v1/traces` is posted, e.g. `http://collector:4318`.
    pub endpoint: String,
    /// Sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: HashMap<String, String>,
    pub service_name: String,
    pub sampler: Sampler,
    pub resource_attributes: Vec<KeyValue>,
    pub max_queue_size: usize,
    pub schedule_delay: Duration,
    pub export_timeout: Duration,
}

impl std::fmt::Debug for TraceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceSettings")
            .field("endpoint", &self.endpoint)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("service_name", &self.service_name)
            .field("sampler", &self.sampler)
            .field("resource_attributes", &self.resource_attributes)
            .field("max_queue_size", &self.max_queue_size)
            .field("schedule_delay", &self.schedule_delay)
            .field("export_timeout", &self.export_timeout)
            .finish()
    }
}

impl TraceSettings {
    /// The settings for `service` (the default service name), or `None` when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is not set: tracing is off.
    pub fn from_settings(settings: &Settings, service: &str) -> Result<Option<Self>, ConfigError> {
        let Some(endpoint) = settings
            .otel_exporter_otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
        else {
            return Ok(None);
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ConfigError::Malformed {
                variable: "OTEL_EXPORTER_OTLP_ENDPOINT",
                reason: "not an http:// or https:// URL".into(),
            });
        }
        match settings.otel_exporter_otlp_protocol.trim() {
            "" | "http/protobuf" => {}
            other => {
                return Err(ConfigError::Malformed {
                    variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    reason: format!("{other:?} is not supported; use http/protobuf"),
                });
            }
        }
        if settings.otel_bsp_max_queue_size == 0 {
            return Err(ConfigError::Malformed {
                variable: "OTEL_BSP_MAX_QUEUE_SIZE",
                reason: "must be at least 1".into(),
            });
        }
        let service_name = settings
            .otel_service_name
            .as_deref()
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .unwrap_or(service)
            .to_owned();
        let headers = settings
            .otel_exporter_otlp_headers
            .as_ref()
            .map(|headers| key_values(headers.expose_secret(), "OTEL_EXPORTER_OTLP_HEADERS"))
            .transpose()?
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Some(Self {
            endpoint: endpoint.to_owned(),
            headers,
            service_name,
            sampler: sampler(
                &settings.otel_traces_sampler,
                settings.otel_traces_sampler_arg.as_deref(),
            )?,
            resource_attributes: resource_attributes(
                settings.otel_resource_attributes.as_deref().unwrap_or(""),
            )?,
            max_queue_size: settings.otel_bsp_max_queue_size,
            schedule_delay: Duration::from_millis(settings.otel_bsp_schedule_delay.max(1)),
            export_timeout: Duration::from_millis(settings.otel_exporter_otlp_timeout),
        }))
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
    }
}

/// `OTEL_TRACES_SAMPLER` with its `OTEL_TRACES_SAMPLER_ARG`, as the specification names them.
fn sampler(name: &str, arg: Option<&str>) -> Result<Sampler, ConfigError> {
    let ratio = || {
        let arg = arg
            .map(str::trim)
            .filter(|arg| !arg.is_empty())
            .unwrap_or("1");
        match arg.parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
            _ => Err(ConfigError::Malformed {
                variable: "OTEL_TRACES_SAMPLER_ARG",
                reason: format!("{arg:?} is not a ratio between 0 and 1"),
            }),
        }
    };
    Ok(match name.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "" | "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => {
            return Err(ConfigError::Malformed {
                variable: "OTEL_TRACES_SAMPLER",
                reason: format!(
                    "{other:?} is not one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            });
        }
    })
}

/// `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by commas.
fn resource_attributes(text: &str) -> Result<Vec<KeyValue>, ConfigError> {
    Ok(key_values(text, "OTEL_RESOURCE_ATTRIBUTES")?
        .into_iter()
        .map(|(key, value)| KeyValue::new(key, value))
        .collect())
}

/// `key=value` pairs separated by commas, as the `OTEL_*` lists are written. A malformed pair is
/// named without its value (the headers may hold a key).
fn key_values(text: &str, variable: &'static str) -> Result<Vec<(String, String)>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => Err(ConfigError::Malformed {
                variable,
                reason: "expected key=value pairs separated by commas".into(),
            }),
        })
        .collect()
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans still queued.
#[must_use = "call shutdown() before exiting, or queued spans are lost"]
pub struct Telemetry {
    pipeline: Option<Pipeline>,
}

struct Pipeline {
    provider: SdkTracerProvider,
    export_timeout: Duration,
    /// Keeps the export runtime's thread alive until the flush is done.
    runtime: Option<ExportRuntime>,
}

impl Telemetry {
    /// Nothing to flush: tracing off.
    pub fn off() -> Self {
        Self { pipeline: None }
    }

    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.pipeline.is_some()
    }

    /// Exports what is queued and stops the exporter, waiting at most the export timeout and a
    /// second: a collector that does not answer never holds up an exit for longer.
    pub async fn shutdown(mut self) {
        let Some(mut pipeline) = self.pipeline.take() else {
            return;
        };
        let limit = pipeline.export_timeout + Duration::from_secs(1);
        let provider = pipeline.provider.clone();
        // The processor's shutdown blocks its caller until the export task answers.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(limit));
        match tokio::time::timeout(limit, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "cannot flush the last spans"),
            Ok(Err(error)) => tracing::warn!(%error, "the span flush failed"),
            Err(_) => tracing::warn!(
                timeout_ms = limit.as_millis() as u64,
                "the trace collector did not take the last spans in time; they are dropped"
            ),
        }
        if let Some(runtime) = pipeline.runtime.take() {
            runtime.stop();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(runtime) = self.pipeline.as_mut().and_then(|p| p.runtime.take()) {
            runtime.stop();
        }
    }
}

/// Installs the global subscriber: logs per `LOG_FORMAT` and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set, the OpenTelemetry layer exporting to it under the service name `service` (unless
/// `OTEL_SERVICE_NAME` says otherwise). `RUST_LOG` overrides the default log filter.
///
/// A second call in one process (tests start several apps) installs nothing and returns
/// [`Telemetry::off`].
pub fn init(settings: &Settings, service: &str) -> Result<Telemetry, ConfigError> {
    let traces = TraceSettings::from_settings(settings, service)?;
    Ok(install(settings.log_format, traces, filter()))
}

/// [`init`] with explicit trace settings and log filter (for tests and benchmarks).
pub fn install(format: LogFormat, traces: Option<TraceSettings>, logs: EnvFilter) -> Telemetry {
    let telemetry = Telemetry::start(traces);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Pretty => fmt.with_filter(logs).boxed(),
        LogFormat::Json if telemetry.is_on() => fmt
            .json()
            .flatten_event(true)
            .event_format(WithTraceIds(Format::default().json().flatten_event(true)))
            .with_filter(logs)
            .boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(logs).boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(telemetry.layer())
        .try_init()
        .is_ok();
    telemetry.installed(installed)
}

impl Telemetry {
    /// Starts the export pipeline when `traces` is given; nothing happens without it. Add
    /// [`Telemetry::layer`] to the subscriber, then report with [`Telemetry::installed`].
    pub fn start(traces: Option<TraceSettings>) -> Self {
        Self {
            pipeline: traces.map(Pipeline::start),
        }
    }

    /// The layer that turns spans into exported OpenTelemetry spans; `None` when tracing is off.
    pub fn layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        self.pipeline.as_ref().map(|pipeline| {
            tracing_opentelemetry::layer()
                .with_tracer(pipeline.provider.tracer("clerk-sync"))
                // Per span, each of these is attributes to build or timings to take on every
                // poll; the span names and attributes say what and where already.
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_location(false)
                .with_filter(span_filter())
        })
    }

    /// Whether the subscriber with [`Telemetry::layer`] was installed; when it was not (another
    /// one already is), the pipeline is dropped and tracing stays off.
    pub fn installed(self, installed: bool) -> Self {
        if installed && self.is_on() {
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            ENABLED.store(true, Ordering::Relaxed);
            self
        } else {
            Self::off()
        }
    }
}

/// The filter when `RUST_LOG` is not set: info, without the database driver's per-statement
/// lines, the AMQP client's chatter and the ORM's per-statement spans (those are for the trace
/// exporter).
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,sea_orm_migration=warn,sea_orm=warn";

/// The filter every binary logs with: `RUST_LOG`, else [`DEFAULT_FILTER`].
pub fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// The spans exported: this project's at info and above, and the ORM's statement spans.
fn span_filter() -> EnvFilter {
    EnvFilter::new("warn,shared=info,ingest=info,worker=info,dlq=info,sea_orm=info")
}

impl Pipeline {
    fn start(settings: TraceSettings) -> Self {
        let runtime = ExportRuntime::start();
        let queued = Arc::new(AtomicUsize::new(0));
        // The processor's task, the exporter's HTTP client and its timers live on the export
        // runtime, whatever runtime (or none) the caller has.
        let provider = runtime.enter(|| {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(settings.traces_url())
                .with_headers(settings.headers.clone())
                .with_timeout(settings.export_timeout)
                .build();
            let processor = exporter.map(|exporter| {
                let config = BatchConfigBuilder::default()
                    .with_max_queue_size(settings.max_queue_size)
                    .with_max_export_timeout(settings.export_timeout)
                    .with_scheduled_delay(settings.schedule_delay)
                    .with_max_concurrent_exports(1)
                    .build();
                BatchSpanProcessor::builder(
                    CountedExporter {
                        inner: exporter,
                        queued: Arc::clone(&queued),
                    },
                    opentelemetry_sdk::runtime::Tokio,
                )
                .with_batch_config(config)
                .build()
            });
            let mut builder = SdkTracerProvider::builder()
                .with_sampler(settings.sampler.clone())
                .with_resource(
                    Resource::builder()
                        .with_service_name(settings.service_name.clone())
                        .with_attributes(settings.resource_attributes.clone())
                        .build(),
                );
            match processor {
                Ok(processor) => {
                    builder = builder.with_span_processor(BoundedQueue {
                        inner: processor,
                        queued,
                        limit: settings.max_queue_size,
                    });
                }
                Err(error) => eprintln!("tracing: cannot build the OTLP exporter: {error}"),
            }
            builder.build()
        });
        Self {
            provider,
            export_timeout: settings.export_timeout,
            runtime: Some(runtime),
        }
    }
}

/// A current-thread Tokio runtime on a thread of its own, for the span export.
struct ExportRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ExportRuntime {
    fn start() -> Self {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the trace export");
                let _ = handle_tx.send(runtime.handle().clone());
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("a thread for the trace export");
        let handle = handle_rx.recv().expect("the trace export runtime starts");
        Self {
            handle,
            stop: Some(stop),
        }
    }

    fn enter<T>(&self, build: impl FnOnce() -> T) -> T {
        let _entered = self.handle.enter();
        build()
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Admits a finished span into the export queue only while fewer than `limit` are waiting, and
/// counts the ones it turns away: the batch processor's own queue drops silently.
#[derive(Debug)]
struct BoundedQueue<P> {
    inner: P,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl<P: SpanProcessor> SpanProcessor for BoundedQueue<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            SPANS_DROPPED.inc();
            return;
        }
        SPANS_QUEUED.inc();
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, taking each batch it is handed out of [`BoundedQueue`]'s count.
#[derive(Debug)]
struct CountedExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountedExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        SPANS_QUEUED.sub(i64::try_from(batch.len()).unwrap_or(i64::MAX));
        self.inner.export(batch)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The JSON line format with the current span's `trace_id` and `span_id` first, when the line
/// is written inside a sampled or remote-parented span.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    Format<Json>: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt as _;
        let cx = Context::current();
        let span = cx.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                ids.trace_id(),
                ids.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests;
