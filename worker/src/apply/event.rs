//! A message read as an event: its svix-id, its type and what it asks of the database. Reading
//! needs no I/O, so a whole batch is read before its transaction starts.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use shared::events::{ClerkUser, DeletedObject, Envelope, UserEventKind, UserRecord};
use shared::organizations::OrganizationEventKind;
use shared::{Roles, sanitize};

use super::delete_mode::DeleteMode;
use super::organizations::Change;
use super::subject::{Subject, SubjectKind};

/// What a source hands the door: a message as it came, without its transport. The queue
/// consumer takes it from a delivery's body and headers; reconcile, replay and rebuild make it
/// from what they listed or stored.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The body: a Clerk event envelope (`{"type", "data", …}`), as Clerk sent it.
    pub body: &'a [u8],
    /// The svix-id, the idempotency key; a message without one can never apply.
    pub svix_id: Option<String>,
    /// When Svix sent the event (the `svix-timestamp` header).
    pub svix_timestamp: Option<DateTime<Utc>>,
    /// When the ingest accepted it (the `received-at` header).
    pub received_at: Option<DateTime<Utc>>,
    /// Where it came from, kept in its history row.
    pub source: Source,
    /// The trace it is handled in, kept in its history row: the delivery's `traceparent` when
    /// that trace is sampled (the consumer's span replaces it when traces are exported).
    pub trace_id: Option<String>,
}

impl<'a> Message<'a> {
    /// A message with a svix-id of its own and no times, as the commands make them.
    pub fn new(body: &'a [u8], svix_id: impl Into<String>, source: Source) -> Self {
        Self {
            body,
            svix_id: Some(svix_id.into()),
            svix_timestamp: None,
            received_at: None,
            source,
            trace_id: None,
        }
    }
}

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
    /// (`WORKER_STORE_PAYLOADS=false`). Without what Postgres cannot store, like every string
    /// of the event (see [`Event::read`]).
    pub payload: Option<String>,
    /// The `svix-timestamp` header: when Svix sent the event.
    pub svix_timestamp: Option<DateTime<Utc>>,
    /// The `received-at` header: when the ingest accepted it.
    pub received_at: Option<DateTime<Utc>>,
    /// What a deletion the event makes does to the rows (`WORKER_DELETE_MODE`): `hard` as read;
    /// [`super::Reading::read`] sets the configured one.
    pub delete_mode: DeleteMode,
    /// The envelope's `instance_id`: the Clerk instance it comes from, if it says
    /// (`crate::pin`).
    pub instance_id: Option<String>,
    /// The trace the event was handled in, kept in its history row when the trace was sampled:
    /// the `traceparent` header's, or the consumer span's (see `crate::trace`).
    pub trace_id: Option<String>,
    /// Rewrite a stored row whose `updated_at` equals this version's: set by reconcile for a
    /// row whose content differs from what this version writes ([`super::compare`]). False as
    /// read: an equal version (a webhook's duplicate) is `stale`.
    pub repair: bool,
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Delivered by Clerk through the ingest.
    Webhook,
    /// Made by `worker reconcile` from what Clerk's Backend API listed.
    Reconcile,
    /// Re-applied from the history by `worker replay` (and `worker rebuild`).
    Replay,
    /// Fetched from Clerk's Backend API for one object on request.
    OnDemand,
}

impl Source {
    /// The label kept in `processed_events.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Reconcile => "reconcile",
            Source::Replay => "replay",
            Source::OnDemand => "on_demand",
        }
    }
}

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `user.created` / `user.updated`: this version of the user, if it is the newest.
    Upsert(Box<UserRecord>),
    /// `user.deleted`: remove the user for good.
    Delete { id: String },
    /// An organization or membership event (see [`super::organizations`]).
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
                kind: SubjectKind::User,
                id: &record.id,
            }),
            Action::Delete { id } => Some(Subject {
                kind: SubjectKind::User,
                id,
            }),
            Action::Organization(change) => Some(change.subject()),
            Action::Ignore => None,
        }
    }

    /// The `updated_at` of the version an upsert carries; `None` for a delete or an ignored
    /// type.
    pub fn version(&self) -> Option<DateTime<Utc>> {
        match self {
            Action::Upsert(record) => Some(record.updated_at),
            Action::Organization(change) => change.version(),
            Action::Delete { .. } | Action::Ignore => None,
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

/// Why a message cannot be read as an event.
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
    /// Reads a message; a user's role is resolved against `roles`. The payload is kept (see
    /// [`super::Reading::read`] for `WORKER_STORE_PAYLOADS`). Every source of events reads them
    /// here, so this is where the body loses what Postgres cannot store (NUL, lone surrogates;
    /// see [`shared::sanitize`]): the columns and the history payload are read from the clean
    /// text.
    pub fn read(message: &Message<'_>, roles: &Roles) -> Result<Self, ReadError> {
        let clean = sanitize::strip_unstorable(message.body);
        let body = clean.as_ref();
        let envelope = Envelope::parse(body).map_err(|e| ReadError::Permanent(e.to_string()))?;
        let svix_id = message
            .svix_id
            .clone()
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                ReadError::Permanent("message has no svix-id header and no message id".into())
            })?;
        if matches!(clean, Cow::Owned(_)) {
            tracing::info!(
                svix_id,
                event_type = envelope.event_type,
                "removed what Postgres cannot store (NUL, lone surrogates) from the event"
            );
        }
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
            instance_id: envelope.instance_id,
            event_type: envelope.event_type,
            action,
            source: message.source,
            payload: storable(body),
            svix_timestamp: message.svix_timestamp,
            received_at: message.received_at,
            delete_mode: DeleteMode::Hard,
            trace_id: message.trace_id.clone(),
            repair: false,
        })
    }

    /// The same event, deleting as `mode` says.
    pub fn with_delete_mode(self, delete_mode: DeleteMode) -> Self {
        Self {
            delete_mode,
            ..self
        }
    }

    /// The same event, rewriting a stored row of the same `updated_at` (see [`Event::repair`]).
    pub fn repairing(self) -> Self {
        Self {
            repair: true,
            ..self
        }
    }

    /// The same event without its payload, for `WORKER_STORE_PAYLOADS=false`.
    pub fn without_payload(self) -> Self {
        Self {
            payload: None,
            ..self
        }
    }
}

/// The (clean) body as text for the history's `jsonb` column.
fn storable(body: &[u8]) -> Option<String> {
    std::str::from_utf8(body).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<'a>(body: &'a [u8], svix_id: Option<&str>) -> Message<'a> {
        Message {
            body,
            svix_id: svix_id.map(str::to_owned),
            svix_timestamp: None,
            received_at: None,
            source: Source::Webhook,
            trace_id: None,
        }
    }

    #[test]
    fn a_body_that_is_not_json_is_permanent() {
        let error = Event::read(&message(b"{nope", Some("msg_1")), &Roles::default())
            .expect_err("not json");
        assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
    }

    #[test]
    fn a_body_without_type_is_permanent() {
        let error = Event::read(
            &message(br#"{"data":{}}"#, Some("msg_1")),
            &Roles::default(),
        )
        .expect_err("no type");
        assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
    }

    #[test]
    fn a_delete_without_id_is_permanent() {
        let body = br#"{"type":"user.deleted","data":{"deleted":true,"object":"user"}}"#;
        let error =
            Event::read(&message(body, Some("msg_1")), &Roles::default()).expect_err("no id");
        assert_eq!(
            error,
            ReadError::Permanent("user.deleted without data.id".into())
        );
    }

    #[test]
    fn a_user_without_updated_at_is_a_message_failure() {
        let body = br#"{"type":"user.updated","data":{"id":"user_1","created_at":1}}"#;
        let error = Event::read(&message(body, Some("msg_1")), &Roles::default())
            .expect_err("no updated_at");
        assert!(matches!(error, ReadError::Message(_)), "{error:?}");
    }

    #[test]
    fn a_message_without_a_svix_id_is_permanent() {
        let body = br#"{"type":"session.created","data":{}}"#;
        let event = Event::read(&message(body, Some("msg_2")), &Roles::default()).expect("event");
        assert_eq!(event.svix_id, "msg_2");
        assert_eq!(event.action, Action::Ignore);
        for svix_id in [None, Some(" ")] {
            let error =
                Event::read(&message(body, svix_id), &Roles::default()).expect_err("no id at all");
            assert!(matches!(error, ReadError::Permanent(_)), "{error:?}");
        }
    }
}
