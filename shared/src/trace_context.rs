//! The W3C trace context (`traceparent`, `tracestate`) in AMQP message headers, so one trace
//! runs from the ingest's request through the broker to the worker.
//!
//! Written as `LongString` values, the type every other header of the message has; read from a
//! `LongString` or a `ShortString`, whichever a publisher chose.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The header names the W3C trace context uses.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Writes `cx`'s span (if any) into `headers` as `traceparent` and `tracestate`.
pub fn inject(cx: &opentelemetry::Context, headers: &mut FieldTable) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The context a message's headers carry: a remote parent, or an empty context when they carry
/// none (or a malformed one).
pub fn extract(headers: Option<&FieldTable>) -> opentelemetry::Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => opentelemetry::Context::new(),
    }
}

/// The context any carrier of `traceparent`/`tracestate` (an HTTP request's headers, say)
/// holds; an empty context when it holds none.
pub fn extract_from(carrier: &dyn Extractor) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(carrier)
}

/// The span a message's headers name, when they carry a valid `traceparent`.
pub fn remote_span(headers: Option<&FieldTable>) -> Option<SpanContext> {
    let cx = extract(headers);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// The trace id (32 hex digits) of a message's `traceparent`, if it has a valid one.
pub fn trace_id(headers: Option<&FieldTable>) -> Option<String> {
    remote_span(headers).map(|span| span.trace_id().to_string())
}

/// Writes trace context entries into an AMQP header table.
pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
}

/// Reads trace context entries from an AMQP header table.
pub struct HeaderExtractor<'a>(pub &'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
            AMQPValue::ShortString(text) => Some(text.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(ShortString::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_context_written_is_read_back_as_long_strings() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "value")]).expect("state"),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(span.clone());
        let mut headers = FieldTable::default();
        inject(&cx, &mut headers);
        assert_eq!(
            headers.inner().get(TRACEPARENT),
            Some(&AMQPValue::LongString(LongString::from(PARENT)))
        );
        assert_eq!(
            headers.inner().get(TRACESTATE),
            Some(&AMQPValue::LongString(LongString::from("vendor=value")))
        );
        let read = remote_span(Some(&headers)).expect("a remote span");
        assert_eq!(read.trace_id(), span.trace_id());
        assert_eq!(read.span_id(), span.span_id());
        assert!(read.is_remote() && read.is_sampled());
        assert_eq!(read.trace_state().header(), "vendor=value");
    }

    #[test]
    fn a_short_string_traceparent_is_accepted() {
        let mut headers = FieldTable::default();
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::ShortString(ShortString::from(PARENT)),
        );
        assert_eq!(
            trace_id(Some(&headers)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn no_or_a_malformed_traceparent_gives_no_parent() {
        assert_eq!(trace_id(None), None);
        let mut headers = FieldTable::default();
        assert_eq!(trace_id(Some(&headers)), None);
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from("00-not-a-trace-01")),
        );
        assert_eq!(trace_id(Some(&headers)), None);
        headers.insert(TRACEPARENT.into(), AMQPValue::LongLongInt(7));
        assert_eq!(trace_id(Some(&headers)), None);
    }
}
