//! Applying events to Postgres: one event's rules in [`apply_event`], one delivery per call in
//! [`apply`], and many deliveries in one transaction in [`apply_batch`].
//!
//! The rules, all inside one transaction:
//! - the svix-id goes into `processed_events` before anything else is written; a conflict means
//!   the event was handled before, and nothing else is written (`Duplicate`);
//! - `user.created`/`user.updated` write the user only when no tombstone exists for the id and
//!   the event's `updated_at` is newer than the stored row's; otherwise the event is `Stale`;
//! - `user.deleted` deletes the row and writes a tombstone;
//! - an email held by another user goes to the newer version (by `updated_at`, then id): the older
//!   holder's email becomes null, or, if the holder is newer, the incoming user is written with a
//!   null email. In a real history two users never hold one address at the same moment, so the
//!   loser is always a version that a later event of the same user supersedes.
//!
//! Every event takes a transaction-scoped advisory lock on its user id before reading, so events
//! of one user never interleave, whichever worker or batch applies them. That is what makes a
//! delete and a late update on two workers unable to resurrect a user.

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, RuntimeErr, Set, Statement,
    TransactionTrait, TryInsertResult,
};
use shared::events::{RoleSource, UserRecord};

use crate::event::{Action, Event};
use crate::metrics::Metrics;
use crate::storage::processed_events;

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

/// Why an event did not apply. The kind decides the retry policy (see the crate README).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Infrastructure trouble (see [`classify`]): retried with back-off for as long as it lasts,
    /// never counted against the message, never dead-lettered.
    #[error("transient: {0}")]
    Transient(String),
    /// Anything else: retried up to `WORKER_MAX_ATTEMPTS` times, then dead-lettered as
    /// `exhausted` with this reason.
    #[error("{0}")]
    Message(String),
}

/// How a database error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbFailure {
    /// A named infrastructure condition: waited out, not counted against the message.
    Transient,
    /// A unique violation: another transaction took the same key first; rerunning sees it.
    Race,
    /// Everything else: counted against the message.
    Message,
}

/// Sorts a database error. Only named infrastructure conditions are transient: no connection
/// (refused, lost, a pool timeout, any failure while connecting), and the SQLSTATEs of classes 08
/// (connection exception), 53 (insufficient resources) and 57P (server shutting down or starting
/// up), plus 40001 (serialization failure), 40P01 (deadlock) and 55P03 (lock not available).
/// 23505 is a race, rerun at once. Every other error (a trigger's `RAISE EXCEPTION`, a dropped
/// column, a value too large for an index, a row that does not decode, …) belongs to the
/// message: an unknown error must end in a dead letter, never in a retry that lasts forever.
pub(crate) fn classify(error: &DbErr) -> DbFailure {
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        // Connecting or taking a connection from the pool failed, whatever the reason.
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => DbFailure::Transient,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                Sqlx::Database(db) => match db.code().as_deref() {
                    Some("23505") => DbFailure::Race,
                    Some(code) if infrastructure_sqlstate(code) => DbFailure::Transient,
                    _ => DbFailure::Message,
                },
                // The connection broke under the statement.
                Sqlx::Io(_)
                | Sqlx::Tls(_)
                | Sqlx::Protocol(_)
                | Sqlx::PoolTimedOut
                | Sqlx::PoolClosed
                | Sqlx::WorkerCrashed
                | Sqlx::BeginFailed => DbFailure::Transient,
                _ => DbFailure::Message,
            }
        }
        _ => DbFailure::Message,
    }
}

/// The SQLSTATEs that say the database, not the statement, is in trouble.
fn infrastructure_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03")
}

fn to_apply_error(error: &DbErr) -> ApplyError {
    match classify(error) {
        DbFailure::Transient => ApplyError::Transient(error.to_string()),
        DbFailure::Race | DbFailure::Message => {
            ApplyError::Message(format!("database rejected the event: {error}"))
        }
    }
}

/// Applies one event in a transaction of its own, rerunning it when it lost a unique race.
pub async fn apply(db: &DatabaseConnection, event: &Event) -> Result<Outcome, ApplyError> {
    let mut reruns = 0;
    loop {
        match apply_alone(db, event).await {
            Ok(outcome) => return Ok(outcome),
            Err(error) if classify(&error) == DbFailure::Race && reruns < UNIQUE_RACE_RERUNS => {
                reruns += 1;
                tracing::debug!(%error, reruns, "unique race, rerunning the event");
            }
            Err(error) => return Err(to_apply_error(&error)),
        }
    }
}

async fn apply_alone(db: &DatabaseConnection, event: &Event) -> Result<Outcome, DbErr> {
    let txn = db.begin().await?;
    lock_keys(&txn, event.action.lock_ids().into_iter()).await?;
    let outcome = apply_event(&txn, event).await?;
    txn.commit().await?;
    Ok(outcome)
}

/// Why a batch did not commit.
#[derive(Debug)]
pub(crate) enum BatchFailure {
    /// Retry the whole batch after a pause.
    Transient(DbErr),
    /// One of the events failed on its own account: apply them one by one instead, so only that
    /// one is retried.
    Event(DbErr),
}

/// Applies several events in one transaction, each with exactly the effect it would have alone.
/// Commits all or nothing.
pub(crate) async fn apply_batch(
    db: &DatabaseConnection,
    events: &[Event],
) -> Result<Vec<Outcome>, BatchFailure> {
    let sort = |error: DbErr| match classify(&error) {
        DbFailure::Transient => BatchFailure::Transient(error),
        DbFailure::Race | DbFailure::Message => BatchFailure::Event(error),
    };
    let txn = db.begin().await.map_err(sort)?;
    // All of the batch's locks up front and in one order, so two batches never deadlock on
    // them.
    lock_keys(&txn, events.iter().flat_map(|e| e.action.lock_ids()))
        .await
        .map_err(sort)?;
    let mut outcomes = Vec::with_capacity(events.len());
    for event in events {
        outcomes.push(apply_event(&txn, event).await.map_err(sort)?);
    }
    txn.commit().await.map_err(sort)?;
    Ok(outcomes)
}

/// Takes the transaction-scoped advisory lock of every id given (user, organization and
/// membership ids never collide: Clerk prefixes them), in the order of the lock keys.
pub(crate) async fn lock_keys<'a, C: ConnectionTrait>(
    db: &C,
    ids: impl Iterator<Item = &'a str>,
) -> Result<(), DbErr> {
    let ids: Vec<String> = ids.map(str::to_owned).collect();
    if ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock(key) FROM \
           (SELECT DISTINCT hashtextextended(id, 0) AS key FROM unnest($1::text[]) AS ids(id) \
            ORDER BY key) AS keys",
        [ids.into()],
    ))
    .await?;
    Ok(())
}

/// Applies one event inside the caller's transaction. The caller holds the user's lock.
pub(crate) async fn apply_event<C: ConnectionTrait>(
    db: &C,
    event: &Event,
) -> Result<Outcome, DbErr> {
    match &event.action {
        Action::Ignore => {
            let recorded = record(db, event, Outcome::Ignored).await?;
            Ok(if recorded {
                Outcome::Ignored
            } else {
                Outcome::Duplicate
            })
        }
        Action::Delete { id } => {
            let recorded = db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    RECORD_AND_DELETE,
                    [
                        id.clone().into(),
                        event.svix_id.clone().into(),
                        event.event_type.clone().into(),
                    ],
                ))
                .await?;
            Ok(if recorded.is_some() {
                Outcome::Applied
            } else {
                Outcome::Duplicate
            })
        }
        Action::Upsert(record_in) => upsert(db, event, record_in).await,
        Action::Organization(change) => crate::organizations::apply_event(db, event, change).await,
    }
}

/// Inserts the svix-id; false when it was there already.
async fn record<C: ConnectionTrait>(
    db: &C,
    event: &Event,
    outcome: Outcome,
) -> Result<bool, DbErr> {
    let row = processed_events::ActiveModel {
        svix_id: Set(event.svix_id.clone()),
        event_type: Set(event.event_type.clone()),
        outcome: Set(outcome.as_str().to_owned()),
        processed_at: Set(Utc::now().into()),
    };
    let result = processed_events::Entity::insert(row)
        .on_conflict_do_nothing()
        .exec(db)
        .await?;
    Ok(matches!(result, TryInsertResult::Inserted(_)))
}

/// `user.deleted` in one statement: record the svix-id and, only if it was new, delete the row
/// (cascading) and the user's organization memberships, and write the tombstone; a second delete
/// keeps the first deletion time. Returns a row only when the svix-id was new. `$1` is the user
/// id, `$2` the svix-id, `$3` the type.
const RECORD_AND_DELETE: &str = "\
WITH recorded AS ( \
  INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
  VALUES ($2, $3, 'applied', now()) \
  ON CONFLICT (svix_id) DO NOTHING \
  RETURNING svix_id), \
deleted AS (DELETE FROM users WHERE id = $1 AND EXISTS (SELECT 1 FROM recorded)), \
memberships AS ( \
  DELETE FROM organization_memberships WHERE user_id = $1 AND EXISTS (SELECT 1 FROM recorded)), \
buried AS ( \
  INSERT INTO user_tombstones (id, deleted_at) SELECT $1, now() FROM recorded \
  ON CONFLICT (id) DO NOTHING) \
SELECT svix_id FROM recorded";

/// The common case in one statement: read what decides the upsert, record the svix-id with its
/// outcome, and write the user when it is newer, not tombstoned and its email is free. All parts
/// see the database as it was before the statement. `$1`–`$8` are the user's columns, `$9` the
/// svix-id, `$10` the type.
const RECORD_AND_UPSERT: &str = "\
WITH decision AS ( \
  SELECT *, NOT tombstoned AND (stored_updated_at IS NULL OR stored_updated_at < $8) AS newer \
  FROM (SELECT EXISTS (SELECT 1 FROM user_tombstones WHERE id = $1) AS tombstoned, \
               (SELECT updated_at FROM users WHERE id = $1) AS stored_updated_at, \
               holder.id AS holder_id, holder.updated_at AS holder_updated_at \
        FROM (SELECT 1) AS one \
        LEFT JOIN users AS holder ON holder.email = $2 AND holder.id <> $1) AS standing), \
recorded AS ( \
  INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
  SELECT $9, $10, CASE WHEN newer THEN 'applied' ELSE 'stale' END, now() FROM decision \
  ON CONFLICT (svix_id) DO NOTHING \
  RETURNING outcome), \
written AS ( \
  INSERT INTO users \
    (id, email, first_name, last_name, role, phone, created_at, updated_at, synced_at) \
  SELECT $1, $2, $3, $4, $5, $6, $7, $8, now() FROM decision, recorded \
  WHERE recorded.outcome = 'applied' AND decision.holder_id IS NULL \
  ON CONFLICT (id) DO UPDATE SET \
    email = excluded.email, first_name = excluded.first_name, last_name = excluded.last_name, \
    role = excluded.role, phone = excluded.phone, created_at = excluded.created_at, \
    updated_at = excluded.updated_at, synced_at = excluded.synced_at \
  WHERE users.updated_at < excluded.updated_at \
  RETURNING id) \
SELECT (SELECT outcome FROM recorded) AS recorded_outcome, \
       EXISTS (SELECT 1 FROM written) AS written, holder_id, holder_updated_at \
FROM decision";

/// The conditional upsert alone, for when the email had to be settled first.
const UPSERT: &str = "\
INSERT INTO users \
  (id, email, first_name, last_name, role, phone, created_at, updated_at, synced_at) \
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) \
ON CONFLICT (id) DO UPDATE SET \
  email = excluded.email, first_name = excluded.first_name, last_name = excluded.last_name, \
  role = excluded.role, phone = excluded.phone, created_at = excluded.created_at, \
  updated_at = excluded.updated_at, synced_at = excluded.synced_at \
WHERE users.updated_at < excluded.updated_at";

fn user_values(record: &UserRecord, email: Option<String>) -> Vec<sea_orm::Value> {
    vec![
        record.id.clone().into(),
        email.into(),
        record.first_name.clone().into(),
        record.last_name.clone().into(),
        record.role.as_str().into(),
        record.phone.clone().into(),
        record.created_at.into(),
        record.updated_at.into(),
    ]
}

async fn upsert<C: ConnectionTrait>(
    db: &C,
    event: &Event,
    incoming: &UserRecord,
) -> Result<Outcome, DbErr> {
    let mut values = user_values(incoming, incoming.email.clone());
    values.push(event.svix_id.clone().into());
    values.push(event.event_type.clone().into());
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            RECORD_AND_UPSERT,
            values,
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the upsert statement returned no row".into()))?;
    let recorded: Option<String> = row.try_get("", "recorded_outcome")?;
    match recorded.as_deref() {
        None => return Ok(Outcome::Duplicate),
        Some("stale") => return Ok(Outcome::Stale),
        _ => {}
    }
    let written: bool = row.try_get("", "written")?;
    let holder_id: Option<String> = row.try_get("", "holder_id")?;
    let holder_updated_at: Option<DateTime<Utc>> = row.try_get("", "holder_updated_at")?;
    if let (false, Some(holder_id), Some(holder_updated_at), Some(address)) =
        (written, holder_id, holder_updated_at, &incoming.email)
    {
        settle_email(db, incoming, address, &holder_id, holder_updated_at).await?;
    }
    Ok(Outcome::Applied)
}

/// The incoming email is held by another user: the newer version wins it. Then the user is
/// written, with or without the address.
async fn settle_email<C: ConnectionTrait>(
    db: &C,
    incoming: &UserRecord,
    address: &str,
    holder_id: &str,
    holder_updated_at: DateTime<Utc>,
) -> Result<(), DbErr> {
    let mut email = Some(address.to_owned());
    if (holder_updated_at, holder_id) < (incoming.updated_at, incoming.id.as_str()) {
        // The condition is checked again under the row lock: if the holder moved on in the
        // meantime, nothing is taken from it, and a remaining conflict shows up below as a
        // unique violation, which reruns the event.
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE users SET email = NULL, synced_at = now() \
             WHERE id = $1 AND email = $2 AND (updated_at, id) < ($3, $4)",
            [
                holder_id.into(),
                address.into(),
                incoming.updated_at.into(),
                incoming.id.clone().into(),
            ],
        ))
        .await?;
        tracing::warn!(
            user_id = %incoming.id, previous_holder = %holder_id,
            "email moved to a newer user version; the older holder's email is now null"
        );
    } else {
        email = None;
        tracing::warn!(
            user_id = %incoming.id, holder = %holder_id,
            "email held by a newer version of another user; stored with a null email"
        );
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        UPSERT,
        user_values(incoming, email),
    ))
    .await?;
    Ok(())
}

/// Counts and logs what became of an event, once its transaction committed.
pub(crate) fn report(metrics: &Metrics, event: &Event, outcome: Outcome) {
    metrics.event(&event.event_type, outcome.as_str());
    if outcome == Outcome::Duplicate {
        metrics.duplicates.inc();
    }
    if let Action::Upsert(record) = &event.action
        && let RoleSource::Unknown(value) = &record.role_source
        && outcome == Outcome::Applied
    {
        metrics.unknown_roles.inc();
        tracing::warn!(user_id = %record.id, role = %value, "unknown role in public_metadata; stored as client");
    }
    tracing::info!(outcome = outcome.as_str(), "event handled");
}
