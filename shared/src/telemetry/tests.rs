use super::*;

fn settings(endpoint: Option<&str>) -> Settings {
    Settings {
        otel_exporter_otlp_endpoint: endpoint.map(str::to_owned),
        ..Settings::default()
    }
}

#[test]
fn no_endpoint_means_tracing_off() {
    assert!(
        TraceSettings::from_settings(&settings(None), "ingest")
            .expect("valid")
            .is_none()
    );
    assert!(
        TraceSettings::from_settings(&settings(Some("  ")), "ingest")
            .expect("valid")
            .is_none()
    );
}

#[test]
fn the_traces_path_is_appended_to_the_endpoint() {
    let traces = TraceSettings::from_settings(&settings(Some("http://c:4318/")), "ingest")
        .expect("valid")
        .expect("on");
    assert_eq!(traces.traces_url(), "http://c:4318/v1/traces");
    assert_eq!(traces.service_name, "ingest");
}

#[test]
fn bad_values_are_named() {
    let line = |settings: Settings| {
        TraceSettings::from_settings(&settings, "worker")
            .expect_err("malformed")
            .to_string()
    };
    assert!(line(settings(Some("collector:4318"))).contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
    assert!(
        line(Settings {
            otel_exporter_otlp_protocol: "grpc".into(),
            ..settings(Some("http://c:4317"))
        })
        .contains("OTEL_EXPORTER_OTLP_PROTOCOL")
    );
    assert!(
        line(Settings {
            otel_traces_sampler: "sometimes".into(),
            ..settings(Some("http://c:4318"))
        })
        .contains("OTEL_TRACES_SAMPLER")
    );
    assert!(
        line(Settings {
            otel_traces_sampler: "traceidratio".into(),
            otel_traces_sampler_arg: Some("1.5".into()),
            ..settings(Some("http://c:4318"))
        })
        .contains("OTEL_TRACES_SAMPLER_ARG")
    );
    assert!(
        line(Settings {
            otel_resource_attributes: Some("deployment.environment".into()),
            ..settings(Some("http://c:4318"))
        })
        .contains("OTEL_RESOURCE_ATTRIBUTES")
    );
}

#[test]
fn headers_are_read_and_never_shown() {
    let traces = TraceSettings::from_settings(
        &Settings {
            otel_exporter_otlp_headers: Some("x-api-key=hunter2, team=sync".into()),
            ..settings(Some("http://c:4318"))
        },
        "worker",
    )
    .expect("valid")
    .expect("on");
    assert_eq!(
        traces.headers.get("x-api-key").map(String::as_str),
        Some("hunter2")
    );
    assert!(!format!("{traces:?}").contains("hunter2"));
    let line = TraceSettings::from_settings(
        &Settings {
            otel_exporter_otlp_headers: Some("hunter2".into()),
            ..settings(Some("http://c:4318"))
        },
        "worker",
    )
    .expect_err("malformed")
    .to_string();
    assert!(
        line.contains("OTEL_EXPORTER_OTLP_HEADERS") && !line.contains("hunter2"),
        "{line}"
    );
}

/// A writer the test reads back.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn json_lines_inside_a_span_carry_its_trace_and_span_ids() {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let lines = Lines::default();
    let writer = lines.clone();
    // No processor: spans are made and sampled, and go nowhere.
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .event_format(WithTraceIds(Format::default().json().flatten_event(true)))
                .with_writer(move || writer.clone()),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let ids = tracing::subscriber::with_default(subscriber, || {
        tracing::info!("outside any span");
        let span = tracing::info_span!("event", svix_id = "msg_1");
        let cx = span.context();
        let ids = cx.span().span_context().clone();
        span.in_scope(|| tracing::info!(outcome = "applied", "event handled"));
        ids
    });
    let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
    let parsed: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(parsed.len(), 2, "{text}");
    assert!(parsed[0].get("trace_id").is_none(), "{text}");
    assert_eq!(parsed[1]["trace_id"], ids.trace_id().to_string());
    assert_eq!(parsed[1]["span_id"], ids.span_id().to_string());
    assert_eq!(parsed[1]["outcome"], "applied");
    assert_eq!(parsed[1]["span"]["svix_id"], "msg_1");
}

#[test]
fn resource_attributes_are_key_value_pairs() {
    let attributes =
        resource_attributes("deployment.environment=prod, team = sync").expect("valid");
    assert_eq!(
        attributes,
        [
            KeyValue::new("deployment.environment", "prod"),
            KeyValue::new("team", "sync")
        ]
    );
}
