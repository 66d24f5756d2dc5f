//! The door into the tables: every source of events (the queue consumer, `worker reconcile`,
//! `worker replay`, `worker rebuild`, and the on-demand sync) hands its events in here,
//! and nothing else writes the synced tables or the history. Nothing in here knows where an
//! event came from beyond its [`Source`] label: no broker, no HTTP.
//!
//! The entry: a source turns what it received into a [`Message`] (body, svix-id, times,
//! source), [`Reading::read`] makes it an [`Event`] (or says why it never can be one), and
//! [`apply`] (one event) or [`apply_batch`] (many, in one transaction) applies it. Many events
//! go "batch, then one by one" through [`write_with`], every source the same way: in one
//! transaction, then, when one event fails on its own account, each alone; the source says what
//! becomes of each event through its [`Settle`] turns. [`write`] is the commands' tally of it.
//!
//! What is in here:
//! - [`event`]: reading a message as an event;
//! - the rules: [`users`] (all of a batch's users in a few set-based statements) and
//!   [`organizations`] (organizations and memberships, one at a time);
//! - [`locks`]: the advisory locks every transaction takes first;
//! - [`errors`]: the error classes, and the one SQLSTATE classifier;
//! - [`batches`]: "batch, then one by one", with the source's turns;
//! - [`pace`]: how the repair commands write beside live events (small transactions, a share
//!   of the time);
//! - [`history`]: the history writer;
//! - [`subject`]: the kinds of subject, their tables and their history labels.
//!
//! The rules, all inside one transaction:
//! - the svix-id goes into `processed_events` in the statement that decides the outcome; a
//!   conflict means the event was handled before, and nothing else is written (`Duplicate`);
//! - `user.created`/`user.updated` write the user only when no tombstone exists for the id and
//!   the event's `updated_at` is newer than the stored row's (or equal, for a reconcile's repair
//!   of a row whose content differs: [`compare`]); otherwise the event is `Stale`.
//!   Several versions of one user in a batch collapse to the newest: the others are `Stale`,
//!   exactly as if the newest had been applied first;
//! - `user.deleted` deletes the row and the user's organization memberships and writes a
//!   tombstone; a version of the same user in the same batch is `Stale`, as if the delete had
//!   come first;
//! - organization and membership events follow their own rules ([`organizations`]), one at
//!   a time after the batch's user events, in the same transaction;
//! - an email held by another user goes to the newer version ([`users`]).
//!
//! The statements of a batch: the locks; recording and deciding (with the deletes); settling
//! the emails the winners want; writing the winners. Every batch first takes a
//! transaction-scoped advisory lock on each id its events name, so events of one user never
//! interleave, whichever worker or batch applies them. That is what makes a delete and a late
//! update on two workers unable to resurrect a user, and what keeps the decision, read after the
//! locks, true until the commit.

mod batches;
pub mod compare;
pub mod delete_mode;
pub mod errors;
pub mod event;
mod history;
pub(crate) mod lock_timeout;
pub mod locks;
pub mod organizations;
pub mod pace;
pub mod subject;
mod users;

use sea_orm::{ConnectionTrait, DbErr, TransactionSession as _, TransactionTrait};
use serde_json::value::RawValue;
use shared::events::UserRecord;
use shared::{ConfigError, Roles, Settings};
use std::collections::HashSet;

pub use batches::{Next, Settle, Written, retry_read, write, write_with};
pub use delete_mode::DeleteMode;
pub use errors::{ApplyError, DbFailure, classify};
pub use event::{Action, Event, Message, ReadError, Source};
pub use subject::{Subject, SubjectKind};

use errors::to_apply_error;
use locks::lock_keys;

/// How often a transaction that lost a unique-constraint race is rerun before the failure is
/// taken to belong to the message.
const UNIQUE_RACE_RERUNS: u32 = 3;

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The database now holds what the event says.
    Applied,
    /// A newer version, or a tombstone, was already there; recorded, nothing else changed.
    Stale,
    /// A type the worker does not handle; recorded and acknowledged.
    Ignored,
    /// The svix-id was processed before; nothing changed.
    Duplicate,
}

impl Outcome {
    /// The label used in logs and metrics (and, except `duplicate`, in `processed_events`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// How messages are read: the settings of the rules, taken once from [`Settings`].
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE`: a user's role is resolved against them.
    pub roles: Roles,
    /// `WORKER_STORE_PAYLOADS`: keep each event's body in its history row.
    pub store_payloads: bool,
    /// `WORKER_DELETE_MODE`: what the deletions an event makes do to the rows.
    pub delete_mode: DeleteMode,
}

impl Reading {
    /// The roles, `WORKER_STORE_PAYLOADS` and `WORKER_DELETE_MODE` of the settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        Ok(Self {
            roles: settings.roles()?,
            store_payloads: settings.worker_store_payloads,
            delete_mode: DeleteMode::from_settings(settings)?,
        })
    }

    /// Reads a message as an event, deleting as `WORKER_DELETE_MODE` says, its payload kept only
    /// when `WORKER_STORE_PAYLOADS` allows.
    pub fn read(&self, message: &Message<'_>) -> Result<Event, ReadError> {
        let event = Event::read(message, &self.roles)?.with_delete_mode(self.delete_mode);
        Ok(if self.store_payloads {
            event
        } else {
            event.without_payload()
        })
    }

    /// Reads an object as Clerk's Backend API answered it (`data`, which needs its `id`) as the
    /// event a webhook would have delivered with `event_type`, by the same code as a delivery:
    /// how the sources that ask the Backend API (reconcile, the on-demand sync) make their
    /// events. Its svix-id is `{source}_{batch}_{object id}`: never one Svix would send, and
    /// unique per run or request, so a second one applies again. Returns the object's id with
    /// the event.
    pub fn read_object(
        &self,
        source: Source,
        batch: &str,
        event_type: &str,
        data: &RawValue,
    ) -> Result<(String, Event), String> {
        #[derive(serde::Deserialize)]
        struct Id {
            id: Option<String>,
        }
        let id = shared::json::from_slice::<Id>(data.get().as_bytes())
            .ok()
            .and_then(|object| object.id)
            .ok_or("no id")?;
        // The envelope around the object as Clerk wrote it: no second parse and serialization
        // of the object (a backfill does this for every user).
        let body = format!(
            r#"{{"type":{},"object":"event","data":{}}}"#,
            serde_json::Value::from(event_type),
            data.get()
        );
        let svix_id = format!("{}_{batch}_{id}", source.as_str());
        let event = self
            .read(&Message::new(body.as_bytes(), svix_id, source))
            .map_err(|e| e.to_string())?;
        Ok((id, event))
    }
}

/// Applies one event in a transaction of its own, rerunning it when it lost a unique race.
pub async fn apply<C: TransactionTrait>(db: &C, event: &Event) -> Result<Outcome, ApplyError> {
    let mut reruns = 0;
    loop {
        match apply_alone(db, event).await {
            Ok(Ok(outcome)) => return Ok(outcome),
            Ok(Err(reason)) => return Err(ApplyError::ForeignInstance(reason)),
            Err(error) if classify(&error) == DbFailure::Race && reruns < UNIQUE_RACE_RERUNS => {
                reruns += 1;
                tracing::debug!(%error, reruns, "unique race, rerunning the event");
            }
            Err(error) => return Err(to_apply_error(&error)),
        }
    }
}

/// The outcome, or the reason the event's instance is refused (nothing written then).
async fn apply_alone<C: TransactionTrait>(
    db: &C,
    event: &Event,
) -> Result<Result<Outcome, String>, DbErr> {
    let txn = db.begin().await?;
    let events = std::slice::from_ref(event);
    if let Some((_, reason)) = crate::pin::admit(&txn, admitted(events)).await? {
        txn.rollback().await?;
        return Ok(Err(reason));
    }
    let outcomes = apply_events(&txn, events).await?;
    txn.commit().await?;
    outcomes
        .first()
        .copied()
        .map(Ok)
        .ok_or_else(|| DbErr::Custom("no outcome for the event".into()))
}

/// Each event's `instance_id` and source label, for [`crate::pin::admit`].
fn admitted(events: &[Event]) -> impl Iterator<Item = (Option<&str>, &str)> + Clone {
    events
        .iter()
        .map(|event| (event.instance_id.as_deref(), event.source.as_str()))
}

/// Why a batch did not commit.
#[derive(Debug)]
pub enum BatchFailure {
    /// Retry the whole batch after a pause.
    Transient(DbErr),
    /// One of the events failed on its own account: apply them one by one instead, so only that
    /// one is retried.
    Event(DbErr),
}

/// Applies several events in one transaction, each with exactly the effect it would have alone;
/// user events take a number of statements that does not grow with their number (see
/// `apply_events`). Commits all or nothing; inside a transaction (`worker replay --dry-run`,
/// `worker rebuild`), as a savepoint.
pub async fn apply_batch<C: TransactionTrait>(
    db: &C,
    events: &[Event],
) -> Result<Vec<Outcome>, BatchFailure> {
    let sort = |error: DbErr| match classify(&error) {
        DbFailure::Transient => BatchFailure::Transient(error),
        DbFailure::Race | DbFailure::Message => BatchFailure::Event(error),
    };
    let txn = db.begin().await.map_err(sort)?;
    // An event of another instance: none is written; one by one, only that one is refused.
    if let Some((_, reason)) = crate::pin::admit(&txn, admitted(events))
        .await
        .map_err(sort)?
    {
        txn.rollback().await.map_err(sort)?;
        return Err(BatchFailure::Event(DbErr::Custom(reason)));
    }
    let outcomes = apply_events(&txn, events).await.map_err(sort)?;
    txn.commit().await.map_err(sort)?;
    Ok(outcomes)
}

/// Applies the events inside the caller's transaction. The user and ignored events take a few
/// statements, however many there are: lock, record and decide, delete (one per delete mode in
/// the batch, when there are deletes), settle the emails, write the users. Their outcomes are those of applying them one at a time in this
/// order: the deletes, then each user's newest version, then the rest (`stale`); a svix-id seen
/// before, in the database or earlier in the slice, is a `Duplicate`. Organization and
/// membership events are applied after them, one at a time, in their order.
async fn apply_events<C: ConnectionTrait>(db: &C, events: &[Event]) -> Result<Vec<Outcome>, DbErr> {
    // All of the batch's locks up front and in one order, so two batches never deadlock on
    // them. Everything below reads the rows after the locks are held.
    lock_keys(db, events.iter().flat_map(|e| e.action.lock_ids())).await?;
    // The first copy of each user or ignored event is decided together; organization and
    // membership events follow their own rules afterwards ([`organizations`]).
    let mut seen = HashSet::with_capacity(events.len());
    let together: Vec<bool> = events
        .iter()
        .map(|event| {
            seen.insert(event.svix_id.as_str()) && !matches!(event.action, Action::Organization(_))
        })
        .collect();
    let recorded = users::record_and_decide(db, events, &together).await?;
    users::delete_users(db, events, &together, &recorded).await?;
    let mut outcomes: Vec<Outcome> = events
        .iter()
        .zip(&together)
        .map(
            |(event, &together)| match recorded.get(event.svix_id.as_str()) {
                Some(&outcome) if together => outcome,
                _ => Outcome::Duplicate,
            },
        )
        .collect();
    let writers: Vec<&UserRecord> = events
        .iter()
        .zip(&outcomes)
        .filter_map(|(event, outcome)| match (&event.action, outcome) {
            (Action::Upsert(record), Outcome::Applied) => Some(record.as_ref()),
            _ => None,
        })
        .collect();
    if !writers.is_empty() {
        let without_email = users::settle_emails(db, &writers).await?;
        users::write_users(db, &writers, &without_email).await?;
    }
    for (event, outcome) in events.iter().zip(outcomes.iter_mut()) {
        if let Action::Organization(change) = &event.action {
            *outcome = organizations::apply_event(db, event, change).await?;
        }
    }
    Ok(outcomes)
}
