//! OpenTelemetry traces across the ingest, the broker and the worker, received by a real OTLP
//! receiver: one signed webhook is one trace from the request to the committed row, a dead
//! letter replayed by `worker dlq replay` is linked to its first trace, and with no
//! `OTEL_EXPORTER_OTLP_ENDPOINT` nothing connects anywhere.
//!
//! The ingest and the worker run in the test's process and export through one pipeline (service
//! `clerk-sync-test`); `worker dlq …` runs as its own process and exports as `clerk-sync-worker`.
//! The pipeline is the process's (its subscriber, propagator and "tracing on" flag), and every
//! worker test shares this binary: so each test that installs it runs in a process of its own
//! ([`in_a_process_of_its_own`]), and the other tests of the binary never trace.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use shared::telemetry::Telemetry;
use test_support::events::{clerk_user, envelope};
use test_support::http::post;
use test_support::otlp::{
    ConnectionCounter, KIND_CONSUMER, KIND_PRODUCER, KIND_SERVER, OtlpReceiver, ReceivedSpan,
    in_a_process_of_its_own, install_tracing,
};
use test_support::signing::signed_headers;
use test_support::{TestEnv, TestIngest, eventually};

const WITHIN: Duration = Duration::from_secs(30);

/// The receiver the test's process exports to, and the pipeline installed once for it.
fn receiver() -> &'static OtlpReceiver {
    static TRACING: OnceLock<(OtlpReceiver, Telemetry)> = OnceLock::new();
    &TRACING
        .get_or_init(|| {
            let receiver = OtlpReceiver::start();
            let telemetry = install_tracing(receiver.endpoint(), 65_536, Duration::from_secs(5));
            assert!(telemetry.is_on(), "the test's subscriber is the first");
            (receiver, telemetry)
        })
        .0
}

/// An ingest publishing to `env`'s exchange.
async fn ingest_for(env: &TestEnv) -> TestIngest {
    let topology = env.topology.topology.clone();
    TestIngest::spawn_with(move |settings| {
        settings.amqp_exchange = topology.exchange;
        settings.amqp_queue = topology.queue;
        settings.amqp_dead_queue = topology.dead_queue;
    })
    .await
}

/// POSTs `body` signed, with `extra` headers; the status.
async fn post_webhook(ingest: &TestIngest, body: &str, extra: &[(&str, &str)]) -> u16 {
    let mut headers = signed_headers(body);
    headers.extend(
        extra
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string())),
    );
    post(&ingest.webhook_url(), &headers, body.as_bytes())
        .await
        .status
}

/// Whether `ancestor` is `span`'s parent, or its parent's, and so on, within `trace`.
fn descends_from(span: &ReceivedSpan, ancestor: &ReceivedSpan, trace: &[ReceivedSpan]) -> bool {
    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut parent = span.parent_span_id.as_str();
    for _ in 0..trace.len() {
        if parent == ancestor.span_id {
            return true;
        }
        match by_id.get(parent) {
            Some(next) => parent = next.parent_span_id.as_str(),
            None => return false,
        }
    }
    false
}

fn random_hex(bytes: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..bytes * 2].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signed_webhook_is_one_trace_from_the_request_to_the_committed_row() {
    if !in_a_process_of_its_own(
        "tracing::one_signed_webhook_is_one_trace_from_the_request_to_the_committed_row",
    ) {
        return;
    }
    let receiver = receiver();
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let ingest = ingest_for(&env).await;

    // The caller's own trace: the ingest continues it.
    let (trace_id, caller_span) = (random_hex(16), random_hex(8));
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let user = format!("user_{}", random_hex(6));
    let body = envelope(
        "user.created",
        clerk_user(&user, Some("ada@example.com"), None, 1_700_000_000_000),
    )
    .to_string();
    let status = post_webhook(&ingest, &body, &[("traceparent", traceparent.as_str())]).await;
    assert_eq!(status, 200);

    let consumer = receiver
        .wait_for("the worker's consumer span", |span| {
            span.trace_id == trace_id && span.kind == KIND_CONSUMER
        })
        .await;
    let svix = consumer
        .attribute("svix_id")
        .expect("the consumer span names the svix-id")
        .to_owned();
    assert_eq!(consumer.attribute("outcome"), Some("applied"));
    assert_eq!(consumer.attribute("type"), Some("user.created"));
    let queue_ms: i64 = consumer
        .attribute("clerk_sync.queue_time_ms")
        .expect("the queue time")
        .parse()
        .expect("a number of milliseconds");
    assert!(queue_ms >= 0, "queue time {queue_ms}");
    assert!(consumer.events.iter().any(|event| event == "dequeued"));

    let server = receiver
        .wait_for("the ingest's request span", |span| {
            span.trace_id == trace_id && span.kind == KIND_SERVER
        })
        .await;
    assert_eq!(server.name, "POST /api/webhooks");
    assert_eq!(
        server.parent_span_id, caller_span,
        "continues the caller's trace"
    );
    assert_eq!(server.attribute("svix_id"), Some(svix.as_str()));
    assert_eq!(server.attribute("event_type"), Some("user.created"));
    assert_eq!(server.attribute("outcome"), Some("accepted"));
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));

    let producer = receiver
        .wait_for("the ingest's producer span", |span| {
            span.trace_id == trace_id && span.kind == KIND_PRODUCER
        })
        .await;
    assert_eq!(producer.parent_span_id, server.span_id);
    assert_eq!(producer.attribute("outcome"), Some("confirmed"));
    assert_eq!(
        producer.attribute("messaging.destination.name"),
        Some(env.topology.exchange.as_str())
    );
    // Across the broker: the consumer's parent is the producer, by the message's headers.
    assert_eq!(consumer.parent_span_id, producer.span_id);

    // The batch's statements, under the consumer span.
    eventually(WITHIN, "the statements' spans", || async {
        let trace = receiver.trace(&trace_id);
        trace.iter().any(|span| {
            span.attribute("db.system") == Some("postgresql")
                && descends_from(span, &consumer, &trace)
        })
    })
    .await;

    // The history row keeps the trace id, and `explain` shows it.
    let row = env
        .db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT trace_id FROM processed_events WHERE svix_id = $1",
            [svix.clone().into()],
        ))
        .await
        .expect("read the history")
        .expect("the history row");
    let stored: Option<String> = row.try_get("", "trace_id").expect("trace_id");
    assert_eq!(stored.as_deref(), Some(trace_id.as_str()));
    let explanation = worker::history::explain::from_database(env.db(), &user)
        .await
        .expect("explain");
    assert_eq!(
        explanation.history[0].trace_id.as_deref(),
        Some(trace_id.as_str())
    );
    let mut text = Vec::new();
    worker::history::explain::write_text(&mut text, &explanation).expect("text");
    let text = String::from_utf8(text).expect("utf-8");
    assert!(
        text.contains("TRACE ID") && text.contains(&trace_id),
        "{text}"
    );

    ingest.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_by_the_dlq_command_is_linked_to_its_first_trace() {
    if !in_a_process_of_its_own(
        "tracing::a_dead_letter_replayed_by_the_dlq_command_is_linked_to_its_first_trace",
    ) {
        return;
    }
    let receiver = receiver();
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let ingest = ingest_for(&env).await;

    // A delete without an id can never apply: dead-lettered at once.
    let body =
        json!({"type": "user.deleted", "object": "event", "data": {"deleted": true}}).to_string();
    assert_eq!(post_webhook(&ingest, &body, &[]).await, 200);
    let failed = receiver
        .wait_for("the consumer span of the failure", |span| {
            span.kind == KIND_CONSUMER
                && span.attribute("outcome") == Some("dead_lettered")
                && span.attribute("messaging.destination.name")
                    == Some(env.topology.exchange.as_str())
        })
        .await;
    let svix = failed.attribute("svix_id").expect("svix-id").to_owned();
    let first_producer = receiver
        .trace(&failed.trace_id)
        .into_iter()
        .find(|span| span.kind == KIND_PRODUCER)
        .expect("the ingest's producer span in the first trace");
    eventually(WITHIN, "the dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;

    let output = env
        .command(env!("CARGO_BIN_EXE_worker"))
        .args(["dlq", "replay", "--all"])
        .env_remove("DATABASE_URL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output()
        .expect("run the worker binary");
    assert!(output.status.success(), "replay failed: {output:?}");

    let republish = receiver
        .wait_for("the replay's producer span", |span| {
            span.service == "clerk-sync-worker"
                && span.kind == KIND_PRODUCER
                && span.attribute("messaging.message.id") == Some(&svix)
        })
        .await;
    assert_eq!(
        republish.name,
        format!("{} publish", env.topology.queue),
        "named for the worker queue it goes to"
    );
    assert_eq!(republish.attribute("outcome"), Some("confirmed"));
    assert_ne!(republish.trace_id, failed.trace_id, "a trace of its own");
    assert!(
        republish
            .links
            .contains(&(failed.trace_id.clone(), first_producer.span_id.clone())),
        "linked to the first delivery's trace: {:?}",
        republish.links
    );
    let run = receiver
        .wait_for("the command's root span", |span| {
            span.trace_id == republish.trace_id && span.name == "worker dlq replay"
        })
        .await;
    assert!(run.parent_span_id.is_empty(), "one trace per run");
    assert_eq!(republish.parent_span_id, run.span_id);

    // The worker takes the copy in the replay's trace (and dead-letters it again).
    let again = receiver
        .wait_for("the consumer span of the replayed copy", |span| {
            span.kind == KIND_CONSUMER && span.trace_id == republish.trace_id
        })
        .await;
    assert_eq!(again.parent_span_id, republish.span_id);
    assert_eq!(again.attribute("svix_id"), Some(svix.as_str()));

    ingest.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_command_connects_to_a_collector() {
    // Nothing here is process-wide: the commands run as processes of their own, with the
    // OTEL_ variables set on them only. No other test of this binary listens on 4318, and none
    // exports to it: the traced ones run in processes of their own, each with its receiver on
    // a port of its own.
    let env = TestEnv::new().await;
    // The default OTLP/HTTP address, and one named by the other OTEL_ variables.
    let default_port = ConnectionCounter::bind("127.0.0.1:4318")
        .await
        .expect("port 4318 (the default OTLP/HTTP port) is free for this test");
    let named = ConnectionCounter::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let named_url = format!("http://{}", named.address());
    let run = |endpoint: Option<&str>| {
        let mut command = env.command(env!("CARGO_BIN_EXE_worker"));
        command
            .args(["dlq", "list"])
            .env_remove("DATABASE_URL")
            .env("OTEL_SERVICE_NAME", "clerk-sync-off-test")
            .env("OTEL_TRACES_SAMPLER", "always_on")
            .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &named_url)
            .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        if let Some(endpoint) = endpoint {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        let output = command.output().expect("run the worker binary");
        assert!(output.status.success(), "dlq list failed: {output:?}");
    };

    run(None);
    // Give a connection attempt, had there been one, the time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        default_port.connections(),
        0,
        "connected to the default port"
    );
    assert_eq!(named.connections(), 0, "connected to the traces endpoint");

    // The same run with the endpoint set does connect: the counter can see it.
    run(Some(&named_url));
    eventually(WITHIN, "the exporter's connection", || async {
        named.connections() > 0
    })
    .await;
}
