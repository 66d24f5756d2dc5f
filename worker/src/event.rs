//! A delivery read as an event: its svix-id, its type and what it asks of the database. Reading
//! needs no I/O, so a whole batch is read before its transaction starts.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use shared::events::{ClerkUser, DeletedObject, Envelope, UserEventKind, UserRecord};
use shared::organizations::OrganizationEventKind;
use shared::{Roles, headers};

use crate::organizations::Change;

/// One event, ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The svix-id: the idempotency key, recorded in `processed_events`.
    pub svix_id: String,
    /// The envelope's `type`, e.g. `user.created`.
    pub event_type: String,
    pub action: Action,
    /// Where the event came from, kept in its history row.
    pub source: Source,
    /// The body as delivered, kept in the history row; `None` when payloads are not stored
    /// (`WORKER_STORE_PAYLOADS=false`) or cannot be (see [`storable`]).
    pub payload: Option<String>,
    /// The `svix-timestamp` header: when Svix sent the event.
    pub svix_timestamp: Option<DateTime<Utc>>,
    /// The `received-at` header: when the ingest accepted it.
    pub received_at: Option<DateTime<Utc>>,
    /// The trace the event was handled in, kept in its history row when the trace was sampled:
    /// the `traceparent` header's, or the consumer span's (see `crate::trace`).
    pub trace_id: Option<String>,
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Delivered by Clerk through the ingest.
    Webhook,
    /// Made by `worker reconcile` from what Clerk's Backend API listed.
    Reconcile,
    /// Re-applied from the history by `worker replay`.
    Replay,
}

impl Source {
    /// The label kept in `processed_events.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Reconcile => "reconcile",
            Source::Replay => "replay",
        }
    }
}

/// What an event concerns: the row its history belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    /// `user`, `organization` or `membership`.
    pub kind: &'static str,
    pub id: &'a str,
}

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `user.created` / `user.updated`: this version of the user, if it is the newest.
    Upsert(Box<UserRecord>),
    /// `user.deleted`: remove the user for good.
    Delete { id: String },
    /// An organization or membership event (see [`crate::organizations`]).
    Organization(Change),
    /// A type the worker does not handle: recorded as `ignored`.
    Ignore,
}

impl Action {
    /// The user the event is about, if any.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Action::Upsert(record) => Some(&record.id),
            Action::Delete { id } => Some(id),
            Action::Organization(_) | Action::Ignore => None,
        }
    }

    /// The user, organization or membership the event concerns; `None` for an ignored type.
    pub fn subject(&self) -> Option<Subject<'_>> {
        match self {
            Action::Upsert(record) => Some(Subject {
                kind: "user",
                id: &record.id,
            }),
            Action::Delete { id } => Some(Subject { kind: "user", id }),
            Action::Organization(change) => Some(change.subject()),
            Action::Ignore => None,
        }
    }

    /// Whether the event removes what it concerns (its history outcome is then `deleted`).
    pub fn deletes(&self) -> bool {
        match self {
            Action::Delete { .. } => true,
            Action::Organization(change) => change.deletes(),
            Action::Upsert(_) | Action::Ignore => false,
        }
    }

    /// The ids whose advisory locks applying the event needs: the user's, or the organization's,
    /// member's and membership's.
    pub fn lock_ids(&self) -> Vec<&str> {
        match self {
            Action::Organization(change) => change.lock_ids(),
            other => other.user_id().into_iter().collect(),
        }
    }
}

/// Why a delivery cannot be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// It can never apply, however often it is tried: dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
    /// The event is recognisable but its data is not usable: retried, then dead-lettered.
    #[error("{0}")]
    Message(String),
}

impl Event {
    /// Reads a delivery's body and properties, the way the ingest published them; a user's role
    /// is resolved against `roles`.
    pub fn read(
        body: &[u8],
        properties: &BasicProperties,
        roles: &Roles,
    ) -> Result<Self, ReadError> {
        let envelope = Envelope::parse(body).map_err(|e| ReadError::Permanent(e.to_string()))?;
        let svix_id = svix_id(properties).ok_or_else(|| {
            ReadError::Permanent("message has no svix-id header and no message id".into())
        })?;
        let action = match UserEventKind::from_type(&envelope.event_type) {
            Some(UserEventKind::Created | UserEventKind::Updated) => {
                let user = ClerkUser::from_data(envelope.data)
                    .map_err(|e| ReadError::Message(format!("user data: {e}")))?;
                let record = user
                    .to_record(roles)
                    .map_err(|e| ReadError::Message(format!("user data: {e}")))?;
                Action::Upsert(Box::new(record))
            }
            Some(UserEventKind::Deleted) => {
                let deleted: Option<DeletedObject> = serde_json::from_value(envelope.data).ok();
                match deleted
                    .and_then(|d| d.id)
                    .filter(|id| !id.trim().is_empty())
                {
                    Some(id) => Action::Delete { id },
                    None => {
                        return Err(ReadError::Permanent("user.deleted without data.id".into()));
                    }
                }
            }
            None => match OrganizationEventKind::from_type(&envelope.event_type) {
                Some(kind) => Action::Organization(Change::read(kind, envelope.data)?),
                None => Action::Ignore,
            },
        };
        Ok(Self {
            svix_id,
            event_type: envelope.event_type,
            action,
            source: Source::Webhook,
            payload: storable(body),
            svix_timestamp: header(properties, headers::SVIX_TIMESTAMP)
                .and_then(|seconds| seconds.trim().parse().ok())
                .and_then(|seconds| DateTime::from_timestamp(seconds, 0)),
            received_at: header(properties, headers::RECEIVED_AT)
                .and_then(|at| DateTime::parse_from_rfc3339(&at).ok())
                .map(|at| at.with_timezone(&Utc)),
            trace_id: shared::trace_context::remote_span(properties.headers().as_ref())
                .filter(|span| span.is_sampled())
                .map(|span| span.trace_id().to_string()),
        })
    }

    /// The same event without its payload, for `WORKER_STORE_PAYLOADS=false`.
    pub fn without_payload(self) -> Self {
        Self {
            payload: None,
            ..self
        }
    }
}

/// The body as text for the history's `jsonb` column, unless Postgres would refuse it: `jsonb`
/// cannot hold the escaped NUL character (`\u0000`), and a history row must never be the reason
/// an event fails. Such an event is kept without its payload.
fn storable(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    (!text.contains("\\u0000")).then(|| text.to_owned())
}

/// A header's text value.
fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(name))
        .and_then(text)
}

/// The `svix-id` header, else the message id (the ingest sets both to the same value).
fn svix_id(properties: &BasicProperties) -> Option<String> {
    header(properties, headers::SVIX_ID)
        .or_else(|| properties.message_id().as_ref().map(|id| id.to_string()))
        .filter(|id| !id.trim().is_empty())
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
    use lapin::types::{FieldTable, LongString};

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
    fn a_body_that_is_not_json_is_permanent() {
        let error = Event::read(b"{nope", &properties(Some("msg_1")), &Roles::default())
            .expect_err("not json");
        assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
    }

    #[test]
    fn a_body_without_type_is_permanent() {
        let error = Event::read(
            br#"{"data":{}}"#,
            &properties(Some("msg_1")),
            &Roles::default(),
        )
        .expect_err("no type");
        assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
    }

    #[test]
    fn a_delete_without_id_is_permanent() {
        let body = br#"{"type":"user.deleted","data":{"deleted":true,"object":"user"}}"#;
        let error =
            Event::read(body, &properties(Some("msg_1")), &Roles::default()).expect_err("no id");
        assert_eq!(
            error,
            ReadError::Permanent("user.deleted without data.id".into())
        );
    }

    #[test]
    fn a_user_without_updated_at_is_a_message_failure() {
        let body = br#"{"type":"user.updated","data":{"id":"user_1","created_at":1}}"#;
        let error = Event::read(body, &properties(Some("msg_1")), &Roles::default())
            .expect_err("no updated_at");
        assert!(matches!(error, ReadError::Message(_)), "{error:?}");
    }

    #[test]
    fn the_message_id_stands_in_for_a_missing_svix_id_header() {
        let body = br#"{"type":"session.created","data":{}}"#;
        let props = properties(None).with_message_id("msg_2".into());
        let event = Event::read(body, &props, &Roles::default()).expect("event");
        assert_eq!(event.svix_id, "msg_2");
        assert_eq!(event.action, Action::Ignore);
        let error =
            Event::read(body, &properties(None), &Roles::default()).expect_err("no id at all");
        assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
    }
}
