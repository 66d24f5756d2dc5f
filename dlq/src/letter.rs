//! One dead letter as fetched from the queue, and what an operator wants to know about it.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::{Map, Number, Value};
use shared::headers;

/// A message fetched from the dead-letter queue and not yet acknowledged: until it is, the broker
/// keeps it and gives it back to the queue when the channel closes.
#[derive(Debug)]
pub struct DeadLetter {
    pub(crate) delivery: Delivery,
    summary: Summary,
}

impl DeadLetter {
    pub(crate) fn new(delivery: Delivery) -> Self {
        let summary = Summary::of(&delivery.properties, &delivery.data);
        Self { delivery, summary }
    }

    /// The operator's view: id, type, kind, reason, attempts, failed at.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The message properties, headers included, as the broker delivered them.
    pub fn properties(&self) -> &BasicProperties {
        &self.delivery.properties
    }

    /// The body, byte for byte.
    pub fn body(&self) -> &[u8] {
        &self.delivery.data
    }
}

/// One row of `dlq list`. Fields the message does not carry are `None` (`null` in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The message id, which the ingest sets to the svix-id (else the `svix-id` header).
    pub id: Option<String>,
    /// The event type (the `type` property, else the body's `type`).
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// `permanent` or `exhausted` (the worker's `error-kind`), or `delivery-limit` when the broker
    /// dead-lettered the message itself.
    pub kind: String,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// How often the worker tried it.
    pub attempts: Option<u64>,
    /// When it was dead-lettered (RFC 3339).
    pub failed_at: Option<String>,
}

impl Summary {
    fn of(properties: &BasicProperties, body: &[u8]) -> Self {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let header = |name: &str| headers.inner().get(name);
        let death = header(headers::X_DEATH).and_then(first_death);

        let id = properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .or_else(|| header(headers::SVIX_ID).and_then(text));
        let event_type = properties
            .kind()
            .as_ref()
            .map(|kind| kind.to_string())
            .or_else(|| body_type(body));

        let (kind, reason, failed_at) = match (header(headers::ERROR_KIND), death) {
            (Some(kind), _) => (
                text(kind).unwrap_or_else(|| "unknown".into()),
                header(headers::ERROR).and_then(text),
                header(headers::FAILED_AT).and_then(text),
            ),
            (None, Some(death)) => (
                headers::KIND_DELIVERY_LIMIT.to_string(),
                Some(death_reason(death)),
                death.inner().get("time").and_then(timestamp),
            ),
            (None, None) => (
                "unknown".to_string(),
                header(headers::ERROR).and_then(text),
                header(headers::FAILED_AT).and_then(text),
            ),
        };
        Self {
            id,
            event_type,
            kind,
            reason,
            attempts: header(headers::ATTEMPTS).and_then(count),
            failed_at,
        }
    }
}

/// RabbitMQ puts the latest dead-lettering first in `x-death`.
fn first_death(value: &AMQPValue) -> Option<&FieldTable> {
    match value {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|death| match death {
            AMQPValue::FieldTable(table) => Some(table),
            _ => None,
        }),
        _ => None,
    }
}

fn death_reason(death: &FieldTable) -> String {
    let field = |name: &str| death.inner().get(name).and_then(text);
    let reason = field("reason").unwrap_or_else(|| "unknown reason".into());
    match field("queue") {
        Some(queue) => format!("dead-lettered by the broker from {queue}: {reason}"),
        None => format!("dead-lettered by the broker: {reason}"),
    }
}

fn body_type(body: &[u8]) -> Option<String> {
    let value: Value = shared::json::from_slice(body).ok()?;
    value.get("type")?.as_str().map(str::to_owned)
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

/// The attempt count, whichever integer type (or decimal text) the writer used.
fn count(value: &AMQPValue) -> Option<u64> {
    match to_json(value) {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn timestamp(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::Timestamp(seconds) => Some(rfc3339(*seconds)),
        _ => None,
    }
}

/// Seconds since the epoch as RFC 3339, or the bare number when it is out of range.
pub(crate) fn rfc3339(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|seconds| DateTime::<Utc>::from_timestamp(seconds, 0))
        .map(|time| time.to_rfc3339())
        .unwrap_or_else(|| seconds.to_string())
}

/// An AMQP header value as JSON, for display: text as strings, timestamps as RFC 3339, tables as
/// objects, byte arrays as lowercase hex.
pub fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(value) => Value::Bool(*value),
        AMQPValue::ShortShortInt(value) => Value::from(*value),
        AMQPValue::ShortShortUInt(value) => Value::from(*value),
        AMQPValue::ShortInt(value) => Value::from(*value),
        AMQPValue::ShortUInt(value) => Value::from(*value),
        AMQPValue::LongInt(value) => Value::from(*value),
        AMQPValue::LongUInt(value) => Value::from(*value),
        AMQPValue::LongLongInt(value) => Value::from(*value),
        AMQPValue::Float(value) => float(f64::from(*value)),
        AMQPValue::Double(value) => float(*value),
        AMQPValue::DecimalValue(decimal) => {
            Value::String(format!("{}e-{}", decimal.value, decimal.scale))
        }
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => {
            Value::String(text(value).unwrap_or_default())
        }
        AMQPValue::FieldArray(values) => {
            Value::Array(values.as_slice().iter().map(to_json).collect())
        }
        AMQPValue::Timestamp(seconds) => Value::String(rfc3339(*seconds)),
        AMQPValue::FieldTable(table) => table_to_json(table),
        AMQPValue::ByteArray(bytes) => Value::String(
            bytes
                .as_slice()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// A header table as a JSON object, keys in order.
pub fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(key, value)| (key.to_string(), to_json(value)))
            .collect::<Map<String, Value>>(),
    )
}

fn float(value: f64) -> Value {
    Number::from_f64(value).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    fn properties(headers: FieldTable) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(ShortString::from("msg_1"))
            .with_type(ShortString::from("user.created"))
            .with_headers(headers)
    }

    #[test]
    fn a_worker_dead_letter_is_summarised_from_its_headers() {
        let mut headers = FieldTable::default();
        headers.insert(headers::ERROR.into(), long("missing data.id"));
        headers.insert(headers::ERROR_KIND.into(), long("exhausted"));
        headers.insert(headers::ATTEMPTS.into(), AMQPValue::LongUInt(5));
        headers.insert(headers::FAILED_AT.into(), long("2026-11-27T03:00:00Z"));

        let summary = Summary::of(&properties(headers), b"{}");

        assert_eq!(
            summary,
            Summary {
                id: Some("msg_1".into()),
                event_type: Some("user.created".into()),
                kind: "exhausted".into(),
                reason: Some("missing data.id".into()),
                attempts: Some(5),
                failed_at: Some("2026-11-27T03:00:00Z".into()),
            }
        );
    }

    #[test]
    fn a_broker_dead_letter_is_shown_as_delivery_limit_with_the_queue_and_time() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), long("delivery_limit"));
        death.insert("queue".into(), long("clerk.events.worker"));
        death.insert("time".into(), AMQPValue::Timestamp(1_764_212_400));
        let mut headers = FieldTable::default();
        headers.insert(
            headers::X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );

        let summary = Summary::of(&properties(headers), b"{}");

        assert_eq!(summary.kind, "delivery-limit");
        assert_eq!(
            summary.reason.as_deref(),
            Some("dead-lettered by the broker from clerk.events.worker: delivery_limit")
        );
        assert_eq!(
            summary.failed_at.as_deref(),
            Some("2025-11-27T03:00:00+00:00")
        );
        assert_eq!(summary.attempts, None);
    }

    #[test]
    fn id_and_type_fall_back_to_the_svix_header_and_the_body() {
        let mut headers = FieldTable::default();
        headers.insert(headers::SVIX_ID.into(), long("msg_from_header"));
        let properties = BasicProperties::default().with_headers(headers);

        let summary = Summary::of(&properties, br#"{"type":"user.deleted"}"#);

        assert_eq!(summary.id.as_deref(), Some("msg_from_header"));
        assert_eq!(summary.event_type.as_deref(), Some("user.deleted"));
        assert_eq!(summary.kind, "unknown");
    }

    #[test]
    fn attempts_written_as_text_are_read_too() {
        let mut headers = FieldTable::default();
        headers.insert(headers::ATTEMPTS.into(), long("3"));
        assert_eq!(Summary::of(&properties(headers), b"").attempts, Some(3));
    }
}
