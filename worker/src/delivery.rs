//! A delivery as the door reads it: its body and what the ingest put in its properties. The one
//! place that knows how the message carries the svix-id and the times.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use shared::headers;

use crate::apply::{Message, Source};

/// What a delivery hands the door: its body and what the ingest put in its properties (the
/// `svix-id` header, else the message id; the `svix-timestamp` and `received-at` headers; the
/// trace of a sampled `traceparent` header).
pub(crate) fn message<'a>(body: &'a [u8], properties: &BasicProperties) -> Message<'a> {
    Message {
        body,
        svix_id: header(properties, headers::SVIX_ID)
            .or_else(|| properties.message_id().as_ref().map(|id| id.to_string())),
        svix_timestamp: header(properties, headers::SVIX_TIMESTAMP)
            .and_then(|seconds| seconds.trim().parse().ok())
            .and_then(|seconds| DateTime::from_timestamp(seconds, 0)),
        received_at: header(properties, headers::RECEIVED_AT)
            .and_then(|at| DateTime::parse_from_rfc3339(&at).ok())
            .map(|at| at.with_timezone(&Utc)),
        source: Source::Webhook,
        trace_id: shared::trace_context::remote_span(properties.headers().as_ref())
            .filter(|span| span.is_sampled())
            .map(|span| span.trace_id().to_string()),
    }
}

/// A header's text value.
fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(name))
        .and_then(text)
}

/// A header's value as text, whichever string type the publisher chose.
pub(crate) fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Action, Event, ReadError};
    use lapin::types::{FieldTable, LongString};
    use shared::Roles;

    fn properties(svix_id: Option<&str>) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(id) = svix_id {
            headers.insert(
                headers::SVIX_ID.into(),
                AMQPValue::LongString(LongString::from(id)),
            );
        }
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn the_message_id_stands_in_for_a_missing_svix_id_header() {
        let body = br#"{"type":"session.created","data":{}}"#;
        let props = properties(None).with_message_id("msg_2".into());
        let event = Event::read(&message(body, &props), &Roles::default()).expect("event");
        assert_eq!(event.svix_id, "msg_2");
        assert_eq!(event.action, Action::Ignore);
        let error = Event::read(&message(body, &properties(None)), &Roles::default())
            .expect_err("no id at all");
        assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
    }

    #[test]
    fn the_svix_id_header_and_the_times_are_read_from_the_properties() {
        let mut headers = FieldTable::default();
        for (name, value) in [
            (headers::SVIX_ID, "msg_1"),
            (headers::SVIX_TIMESTAMP, "1700000000"),
            (headers::RECEIVED_AT, "2026-11-30T12:00:00Z"),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("other".into());
        let message = message(b"{}", &props);
        assert_eq!(message.svix_id.as_deref(), Some("msg_1"));
        assert_eq!(
            message.svix_timestamp,
            DateTime::from_timestamp(1_700_000_000, 0)
        );
        assert_eq!(
            message.received_at,
            Some(
                DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
                    .expect("time")
                    .to_utc()
            )
        );
        assert_eq!(message.source, Source::Webhook);
    }
}
