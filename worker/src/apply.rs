//! Applying events to Postgres: one delivery per call in [`apply`], and many deliveries in one
//! transaction in [`apply_batch`], both through the same few set-based statements, so a batch
//! costs the same number of round trips whatever its size.
//!
//! The rules, all inside one transaction:
//! - the svix-id goes into `processed_events` in the statement that decides the outcome; a
//!   conflict means the event was handled before, and nothing else is written (`Duplicate`);
//! - `user.created`/`user.updated` write the user only when no tombstone exists for the id and
//!   the event's `updated_at` is newer than the stored row's; otherwise the event is `Stale`.
//!   Several versions of one user in a batch collapse to the newest: the others are `Stale`,
//!   exactly as if the newest had been applied first;
//! - `user.deleted` deletes the row and the user's organization memberships and writes a
//!   tombstone; a version of the same user in the same batch is `Stale`, as if the delete had
//!   come first;
//! - organization and membership events follow their own rules (`crate::organizations`), one at
//!   a time after the batch's user events, in the same transaction;
//! - an email held by another user goes to the newer version (by `updated_at`, then id): the older
//!   holder's email becomes null, or, if the holder is newer, the incoming user is written with a
//!   null email. In a real history two users never hold one address at the same moment, so the
//!   loser is always a version that a later event of the same user supersedes.
//!
//! The statements of a batch: the user locks; recording and deciding (with the deletes); settling
//! the emails the winners want; writing the winners. Every batch first takes a
//! transaction-scoped advisory lock on each id its events name, so events of one user never
//! interleave, whichever worker or batch applies them. That is what makes a delete and a late
//! update on two workers unable to resurrect a user, and what keeps the decision, read after the
//! locks, true until the commit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Func, OnConflict, Query};
use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, EntityName, IdenStatic, RuntimeErr, Statement,
    TransactionSession as _, TransactionTrait,
};
use serde::Serialize;
use shared::events::UserRecord;
use shared::roles::RoleSource;

use crate::event::{Action, Event};
use crate::metrics::Metrics;
use crate::storage::users;

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
pub async fn apply<C: TransactionTrait>(db: &C, event: &Event) -> Result<Outcome, ApplyError> {
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

async fn apply_alone<C: TransactionTrait>(db: &C, event: &Event) -> Result<Outcome, DbErr> {
    let txn = db.begin().await?;
    let outcomes = apply_events(&txn, std::slice::from_ref(event)).await?;
    txn.commit().await?;
    outcomes
        .first()
        .copied()
        .ok_or_else(|| DbErr::Custom("no outcome for the event".into()))
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
    let outcomes = apply_events(&txn, events).await.map_err(sort)?;
    txn.commit().await.map_err(sort)?;
    Ok(outcomes)
}

/// Applies the events inside the caller's transaction. The user and ignored events take at most
/// four statements, however many there are: lock, record and decide (with the deletes), settle
/// the emails, write the users. Their outcomes are those of applying them one at a time in this
/// order: the deletes, then each user's newest version, then the rest (`stale`); a svix-id seen
/// before, in the database or earlier in the slice, is a `Duplicate`. Organization and
/// membership events are applied after them, one at a time, in their order.
async fn apply_events<C: ConnectionTrait>(db: &C, events: &[Event]) -> Result<Vec<Outcome>, DbErr> {
    // All of the batch's locks up front and in one order, so two batches never deadlock on
    // them. Everything below reads the rows after the locks are held.
    lock_keys(db, events.iter().flat_map(|e| e.action.lock_ids())).await?;
    // The first copy of each user or ignored event is decided together; organization and
    // membership events follow their own rules afterwards (`crate::organizations`).
    let mut seen = HashSet::with_capacity(events.len());
    let together: Vec<bool> = events
        .iter()
        .map(|event| {
            seen.insert(event.svix_id.as_str()) && !matches!(event.action, Action::Organization(_))
        })
        .collect();
    let recorded = record_and_decide(db, events, &together).await?;
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
        let without_email = settle_emails(db, &writers).await?;
        write_users(db, &writers, &without_email).await?;
    }
    for (event, outcome) in events.iter().zip(outcomes.iter_mut()) {
        if let Action::Organization(change) = &event.action {
            *outcome = crate::organizations::apply_event(db, event, change).await?;
        }
    }
    Ok(outcomes)
}

/// The advisory lock key of an `id` (a column or value of that name in the query).
pub(crate) const LOCK_KEY: &str = "hashtextextended(id, 0)";

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
        format!(
            "SELECT pg_advisory_xact_lock(key) FROM \
               (SELECT DISTINCT {LOCK_KEY} AS key FROM unnest($1::text[]) AS ids(id) \
                ORDER BY key) AS keys"
        ),
        [ids.into()],
    ))
    .await?;
    Ok(())
}

/// Records every new svix-id with its outcome, deciding last-writer-wins for all users at once,
/// and carries out the new deletes. Returns the outcome of each svix-id that was new.
async fn record_and_decide<C: ConnectionTrait>(
    db: &C,
    events: &[Event],
    together: &[bool],
) -> Result<HashMap<String, Outcome>, DbErr> {
    let batch: Vec<BatchRow> = events
        .iter()
        .zip(together)
        .enumerate()
        .filter(|(_, (_, together))| **together)
        .map(|(ordinal, (event, _))| {
            let (user_id, updated_at, deletes) = match &event.action {
                Action::Upsert(record) => {
                    (Some(record.id.as_str()), Some(record.updated_at), false)
                }
                Action::Delete { id } => (Some(id.as_str()), None, true),
                Action::Organization(_) | Action::Ignore => (None, None, false),
            };
            let subject = event.action.subject();
            BatchRow {
                ordinal,
                svix_id: &event.svix_id,
                event_type: &event.event_type,
                user_id,
                updated_at,
                deletes,
                source: event.source.as_str(),
                subject_kind: subject.map(|s| s.kind),
                subject_id: subject.map(|s| s.id),
                payload: event.payload.as_deref(),
                svix_timestamp: event.svix_timestamp,
                received_at: event.received_at,
                trace_id: event.trace_id.as_deref(),
            }
        })
        .collect();
    // As text, written straight from the events: a tree of JSON values would copy every
    // payload once more.
    let batch = serde_json::to_string(&batch).map_err(|e| DbErr::Custom(e.to_string()))?;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            RECORD_AND_DECIDE,
            [batch.into(), REASON_TIME_FORMAT.into()],
        ))
        .await?;
    let mut recorded = HashMap::with_capacity(rows.len());
    for row in rows {
        let svix_id: String = row.try_get("", "svix_id")?;
        let outcome: String = row.try_get("", "outcome")?;
        let outcome = match outcome.as_str() {
            // A delete that took effect: `deleted` in the history, applied all the same.
            "applied" | "deleted" => Outcome::Applied,
            "stale" => Outcome::Stale,
            "ignored" => Outcome::Ignored,
            other => return Err(DbErr::Custom(format!("unexpected outcome {other:?}"))),
        };
        recorded.insert(svix_id, outcome);
    }
    Ok(recorded)
}

/// An event as [`RECORD_AND_DECIDE`] reads it.
#[derive(Serialize)]
struct BatchRow<'a> {
    ordinal: usize,
    svix_id: &'a str,
    event_type: &'a str,
    user_id: Option<&'a str>,
    updated_at: Option<DateTime<Utc>>,
    deletes: bool,
    source: &'a str,
    subject_kind: Option<&'a str>,
    subject_id: Option<&'a str>,
    /// The body, as a JSON string (Postgres parses it into the history's `jsonb`).
    payload: Option<&'a str>,
    svix_timestamp: Option<DateTime<Utc>>,
    received_at: Option<DateTime<Utc>>,
    /// The trace the event was handled in, when one was recorded.
    trace_id: Option<&'a str>,
}

/// One statement for the whole batch (`$1`: a JSON array of `{ordinal, svix_id, event_type,
/// user_id, updated_at, deletes}` and the history's fields, one per user or ignored event, first
/// copies only; `$2`: [`REASON_TIME_FORMAT`]). Each new svix-id becomes a history row with its
/// outcome and, for `stale`, the reason:
/// - an upsert is `applied` when it is its user's newest in the batch (then the earliest), no
///   tombstone exists and no delete of the user is in the batch, and the stored row is older;
///   every other upsert is `stale`. A svix-id recorded before is never newer than what is
///   stored (its own version, or a newer one, got there, or a tombstone did), so letting it take
///   part in the ranking changes no outcome;
/// - a delete is `deleted` (applied); if its svix-id is new, the row goes (cascading), and so do the
///   user's organization memberships, and a tombstone is written (a second delete keeps the
///   first deletion time);
/// - any other type is `ignored`.
///
/// Raw SQL: sea-query builds neither data-modifying CTEs nor window functions. The batch comes
/// as JSON rather than arrays because sea-query's array values cannot hold NULL elements.
const RECORD_AND_DECIDE: &str = "\
WITH batch AS ( \
  SELECT * FROM jsonb_to_recordset($1::text::jsonb) AS b( \
    ordinal int, svix_id text, event_type text, user_id text, updated_at timestamptz, \
    deletes boolean, source text, subject_kind text, subject_id text, payload text, \
    svix_timestamp timestamptz, received_at timestamptz, trace_id text)), \
standing AS ( \
  SELECT b.*, \
    (SELECT t.deleted_at FROM user_tombstones t WHERE t.id = b.user_id) AS tombstoned_at, \
    bool_or(b.deletes) OVER (PARTITION BY b.user_id) AS deleted_in_batch, \
    (SELECT u.updated_at FROM users u WHERE u.id = b.user_id) AS stored_updated_at, \
    row_number() OVER ( \
      PARTITION BY b.user_id, b.deletes ORDER BY b.updated_at DESC, b.ordinal) AS rank \
  FROM batch b), \
decided AS ( \
  SELECT s.*, \
    CASE WHEN user_id IS NULL THEN 'ignored' \
         WHEN deletes THEN 'deleted' \
         WHEN rank = 1 AND tombstoned_at IS NULL AND NOT deleted_in_batch \
              AND (stored_updated_at IS NULL OR stored_updated_at < updated_at) THEN 'applied' \
         ELSE 'stale' END AS outcome, \
    CASE WHEN user_id IS NULL OR deletes THEN NULL \
         WHEN tombstoned_at IS NOT NULL THEN \
           'the user was deleted at ' || to_char(tombstoned_at AT TIME ZONE 'UTC', $2) \
         WHEN deleted_in_batch THEN 'the user is deleted by an event of the same batch' \
         WHEN rank > 1 THEN 'a newer version of the user came in the same batch' \
         WHEN stored_updated_at >= updated_at THEN \
           'stored updated_at ' || to_char(stored_updated_at AT TIME ZONE 'UTC', $2) \
           || ' is not older than ' || to_char(updated_at AT TIME ZONE 'UTC', $2) \
    END AS reason \
  FROM standing s), \
recorded AS ( \
  INSERT INTO processed_events (svix_id, event_type, outcome, processed_at, source, \
    subject_kind, subject_id, payload, svix_timestamp, received_at, reason, trace_id) \
  SELECT svix_id, event_type, outcome, now(), source, subject_kind, subject_id, \
    payload::jsonb, svix_timestamp, received_at, reason, trace_id \
  FROM decided ORDER BY ordinal \
  ON CONFLICT (svix_id) DO NOTHING \
  RETURNING svix_id, outcome), \
gone AS ( \
  SELECT DISTINCT b.user_id FROM batch b JOIN recorded r USING (svix_id) WHERE b.deletes), \
deleted AS (DELETE FROM users WHERE id IN (SELECT user_id FROM gone)), \
memberships AS ( \
  DELETE FROM organization_memberships WHERE user_id IN (SELECT user_id FROM gone)), \
buried AS ( \
  INSERT INTO user_tombstones (id, deleted_at) SELECT user_id, now() FROM gone \
  ON CONFLICT (id) DO NOTHING) \
SELECT svix_id, outcome FROM recorded";

/// How the history's reasons write a time (`to_char`, in UTC, to the millisecond).
const REASON_TIME_FORMAT: &str = "YYYY-MM-DD HH24:MI:SS.MS \"UTC\"";

/// Settles every address the writers want that someone else holds, or that two writers want:
/// the newest version (by `updated_at`, then id) wins it. Holders that lose have their email
/// set to null; returns the ids of writers that lose, to be written with a null email.
async fn settle_emails<C: ConnectionTrait>(
    db: &C,
    writers: &[&UserRecord],
) -> Result<HashSet<String>, DbErr> {
    let wanting: Vec<&&UserRecord> = writers.iter().filter(|w| w.email.is_some()).collect();
    if wanting.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<String> = wanting.iter().map(|w| w.id.clone()).collect();
    let emails: Vec<String> = wanting.iter().filter_map(|w| w.email.clone()).collect();
    let updated_at: Vec<DateTime<Utc>> = wanting.iter().map(|w| w.updated_at).collect();
    let all_writers: Vec<String> = writers.iter().map(|w| w.id.clone()).collect();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            SETTLE_EMAILS,
            [
                ids.into(),
                emails.into(),
                updated_at.into(),
                all_writers.into(),
            ],
        ))
        .await?;
    let mut without_email = HashSet::new();
    for row in rows {
        let kind: String = row.try_get("", "kind")?;
        let user_id: String = row.try_get("", "user_id")?;
        let other: String = row.try_get("", "other")?;
        if kind == "lost" {
            tracing::warn!(
                %user_id, holder = %other,
                "email held by a newer version of another user; stored with a null email"
            );
            without_email.insert(user_id);
        } else {
            tracing::warn!(
                %user_id, previous_holder = %other,
                "email moved to a newer user version; the older holder's email is now null"
            );
        }
    }
    Ok(without_email)
}

/// `$1`–`$3`: the writers that carry an email (id, email, updated_at); `$4`: every writer's id.
/// For each wanted address the candidates are those writers and the row holding it now, unless
/// that row is a writer's (it is about to be overwritten). Rows that hold a won address and are
/// not its winner lose it now, so the upsert that follows meets no conflict: a writer's old
/// row unconditionally, anyone else's only if still older than the winner, checked again under
/// the row lock (a holder that moved on meanwhile keeps it, and the upsert's unique violation
/// reruns the batch). Returns `lost` rows (a writer, the winner it lost to) and `freed` rows
/// (the winner, a holder other than a writer that lost the address).
///
/// Raw SQL: sea-query builds neither data-modifying CTEs nor `DISTINCT ON`.
const SETTLE_EMAILS: &str = "\
WITH incoming AS ( \
  SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS i(id, email, updated_at)), \
candidates AS ( \
  SELECT id, email, updated_at FROM incoming \
  UNION ALL \
  SELECT u.id, u.email, u.updated_at FROM users u \
  WHERE u.email IN (SELECT email FROM incoming) AND u.id <> ALL ($4::text[])), \
winners AS ( \
  SELECT DISTINCT ON (email) email, id, updated_at FROM candidates \
  ORDER BY email, updated_at DESC, id DESC), \
freed AS ( \
  UPDATE users SET email = NULL, synced_at = now() \
  FROM winners w \
  WHERE users.email = w.email AND users.id <> w.id \
    AND (users.id = ANY ($4::text[]) OR (users.updated_at, users.id) < (w.updated_at, w.id)) \
  RETURNING users.id AS holder, w.id AS winner) \
SELECT 'lost' AS kind, i.id AS user_id, w.id AS other \
FROM incoming i JOIN winners w ON w.email = i.email WHERE w.id <> i.id \
UNION ALL \
SELECT 'freed', winner, holder FROM freed WHERE holder <> ALL ($4::text[])";

/// The columns of `users` an event writes, each with this version's value as JSON text. The
/// rows, the insert's column list and the update's `SET` list all come from this one list, so a
/// new column is one line here.
fn user_columns(
    record: &UserRecord,
    email: Option<&str>,
) -> Result<Vec<(users::Column, String)>, serde_json::Error> {
    use serde_json::to_string as json;
    use users::Column;
    Ok(vec![
        (Column::Id, json(&record.id)?),
        (Column::Email, json(&email)?),
        (Column::FirstName, json(&record.first_name)?),
        (Column::LastName, json(&record.last_name)?),
        (Column::Role, json(&record.role)?),
        (Column::Phone, json(&record.phone)?),
        (Column::CreatedAt, json(&record.created_at)?),
        (Column::UpdatedAt, json(&record.updated_at)?),
        (Column::Username, json(&record.username)?),
        (Column::ImageUrl, json(&record.image_url)?),
        (Column::ExternalId, json(&record.external_id)?),
        (Column::PublicMetadata, json(&record.public_metadata)?),
        (Column::PrivateMetadata, json(&record.private_metadata)?),
        (Column::LastSignInAt, json(&record.last_sign_in_at)?),
        (Column::ClerkData, json(&record.clerk_data)?),
    ])
}

/// Writes the winning versions in one statement:
/// `INSERT INTO users (…) SELECT … FROM jsonb_populate_recordset(NULL::users, $1) ON CONFLICT
/// (id) DO UPDATE SET … WHERE users.updated_at < excluded.updated_at`. The rows come as JSON
/// typed by the table itself (not `unnest` of arrays: sea-query's array values cannot hold the
/// NULLs of nullable columns).
async fn write_users<C: ConnectionTrait>(
    db: &C,
    writers: &[&UserRecord],
    without_email: &HashSet<String>,
) -> Result<(), DbErr> {
    let rows = writers
        .iter()
        .map(|w| {
            let email = w
                .email
                .as_deref()
                .filter(|_| !without_email.contains(&w.id));
            user_columns(w, email)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DbErr::Custom(e.to_string()))?;
    let Some(columns) = rows
        .first()
        .map(|row| row.iter().map(|(column, _)| *column).collect::<Vec<_>>())
    else {
        return Ok(());
    };
    // The rows as one JSON text, put together from each value's own text (column names need
    // no escaping): a tree of JSON values would copy every user's data, and the statement
    // builder copies its values again.
    let mut json = String::with_capacity(rows.iter().flatten().map(|(_, v)| v.len() + 24).sum());
    json.push('[');
    for (r, row) in rows.iter().enumerate() {
        json.push_str(if r == 0 { "{" } else { ",{" });
        for (c, (column, value)) in row.iter().enumerate() {
            if c > 0 {
                json.push(',');
            }
            json.push('"');
            json.push_str(column.as_str());
            json.push_str("\":");
            json.push_str(value);
        }
        json.push('}');
    }
    json.push(']');
    let table = users::Entity.table_name();
    let incoming = Query::select()
        .columns(columns.iter().copied())
        .expr(Expr::current_timestamp())
        .from_function(
            Func::cust("jsonb_populate_recordset")
                .arg(Expr::cust(format!("NULL::{table}")))
                .arg(Expr::val(json).cast_as("jsonb")),
            "incoming",
        )
        .to_owned();
    let updated: Vec<users::Column> = columns
        .iter()
        .copied()
        .filter(|column| !matches!(column, users::Column::Id))
        .chain([users::Column::SyncedAt])
        .collect();
    let upsert = Query::insert()
        .into_table(users::Entity)
        .columns(columns.iter().copied().chain([users::Column::SyncedAt]))
        .select_from(incoming)
        .map_err(|error| DbErr::Custom(error.to_string()))?
        .on_conflict(
            OnConflict::column(users::Column::Id)
                .update_columns(updated)
                .action_and_where(
                    Expr::col((users::Entity, users::Column::UpdatedAt))
                        .lt(Expr::col(("excluded", users::Column::UpdatedAt))),
                )
                .to_owned(),
        )
        .to_owned();
    db.execute(&upsert).await?;
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
        tracing::warn!(
            user_id = %record.id, role = %value, stored_as = %record.role,
            "unknown role in public_metadata; stored as the default role"
        );
    }
    tracing::info!(outcome = outcome.as_str(), "event handled");
}
