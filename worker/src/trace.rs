//! The worker's spans when traces are exported (`OTEL_EXPORTER_OTLP_ENDPOINT`): each delivery's
//! consumer span continues the trace its `traceparent` header carries, with the time the event
//! spent between the ingest and the worker; a batch's statements are children of a batch span.
//! With tracing off nothing here runs.

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use opentelemetry::trace::TraceContextExt as _;
use shared::headers;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::apply::Event;
use crate::apply::Outcome;

/// The consumer span of one delivery: a child of the producer span named by its `traceparent`
/// (a new trace without one), with the queue time as an attribute and an event.
pub(crate) fn consumer_span(delivery: &Delivery, svix_id: &str, event_type: &str) -> tracing::Span {
    let queue_ms = queue_time_ms(delivery);
    let span = tracing::info_span!(
        "event",
        otel.kind = "consumer",
        otel.name = format!("{} process", delivery.routing_key).as_str(),
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = delivery.exchange.as_str(),
        messaging.rabbitmq.destination.routing_key = delivery.routing_key.as_str(),
        messaging.message.id = svix_id,
        messaging.rabbitmq.delivery_tag = delivery.delivery_tag,
        svix_id = svix_id,
        r#type = event_type,
        clerk_sync.queue_time_ms = queue_ms,
        clerk_sync.redelivered = delivery.redelivered,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = shared::trace_context::extract(delivery.properties.headers().as_ref());
    // Only fails when the span is disabled or already started; neither is the case here.
    let _ = span.set_parent(parent);
    if let Some(queue_ms) = queue_ms {
        span.add_event(
            "dequeued",
            vec![opentelemetry::KeyValue::new(
                "clerk_sync.queue_time_ms",
                queue_ms,
            )],
        );
    }
    span
}

/// Milliseconds from the ingest's `received-at` to now: the time in the ingest and the queue.
fn queue_time_ms(delivery: &Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    let received = crate::delivery::text(headers.inner().get(headers::RECEIVED_AT)?)?;
    let received = DateTime::parse_from_rfc3339(&received).ok()?;
    Some((Utc::now() - received.with_timezone(&Utc)).num_milliseconds())
}

/// The span a batch's statements are children of: a child of the first event's span, linked to
/// the others' (one transaction serves them all).
pub(crate) fn batch_span(spans: &[&tracing::Span]) -> tracing::Span {
    let Some(first) = spans.first() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(parent: *first, "apply batch", events = spans.len());
    for other in &spans[1..] {
        span.add_link(other.context().span().span_context().clone());
    }
    span
}

/// Records the event's outcome on its span.
pub(crate) fn record_outcome(span: &tracing::Span, event: &Event, outcome: Outcome) {
    let label = match outcome {
        Outcome::Applied if event.action.deletes() => "deleted",
        other => other.as_str(),
    };
    span.record("outcome", label);
}

/// The trace id to keep in the event's history row: the consumer span's when it is sampled
/// (its trace is exported), else none.
pub(crate) fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span = cx.span();
    let context = span.span_context();
    (context.is_valid() && context.is_sampled()).then(|| context.trace_id().to_string())
}
