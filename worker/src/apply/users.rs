//! The users' rules, in a number of statements that does not grow with the batch: recording and
//! deciding last-writer-wins for every user at once, the deletes (as the event's delete mode
//! says, [`super::delete_mode`]), settling the emails the winners want, and writing the winners.
//!
//! An email held by another user (a row kept after its deletion holds none) goes to the newer
//! version (by `updated_at`, then id): the older holder's email becomes null, or, if the holder
//! is newer, the incoming user is written with a null email. In a real history two users never
//! hold one address at the same moment, so the loser is always a version that a later event of
//! the same user supersedes.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Func, OnConflict, Query};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, EntityName, IdenStatic, Statement};
use serde::Serialize;
use shared::events::UserRecord;

use super::Outcome;
use super::compare::Standing;
use super::delete_mode::{self, DeleteMode};
use super::event::{Action, Event};
use super::history;
use crate::storage::users;

/// Carries out the user deletes whose svix-id was new, each in its event's delete mode
/// ([`super::delete_mode`]); under `anonymize`, a stale version of a deleted user recorded now
/// keeps no payload.
pub(super) async fn delete_users<C: ConnectionTrait>(
    db: &C,
    events: &[Event],
    together: &[bool],
    recorded: &HashMap<String, Outcome>,
) -> Result<(), DbErr> {
    let mut gone: HashMap<DeleteMode, Vec<String>> = HashMap::new();
    let mut stale = Vec::new();
    for (event, _) in events.iter().zip(together).filter(|(_, t)| **t) {
        match (&event.action, recorded.get(event.svix_id.as_str())) {
            (Action::Delete { id }, Some(_)) => {
                gone.entry(event.delete_mode).or_default().push(id.clone());
            }
            (Action::Upsert(_), Some(Outcome::Stale)) if event.delete_mode.anonymizes() => {
                stale.push(event.svix_id.clone());
            }
            _ => {}
        }
    }
    for (mode, ids) in gone {
        delete_mode::delete_users(db, mode, ids).await?;
    }
    delete_mode::forget_stale_user_payloads(db, stale).await
}

/// Records every new svix-id with its outcome, deciding last-writer-wins for all users at once.
/// Returns the outcome of each svix-id that was new.
pub(super) async fn record_and_decide<C: ConnectionTrait>(
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
            BatchRow {
                history: history::Row::of(ordinal, event),
                user_id,
                updated_at,
                deletes,
                repair: event.repair,
            }
        })
        .collect();
    // As text, written straight from the events: a tree of JSON values would copy every
    // payload once more.
    let batch = serde_json::to_string(&batch).map_err(|e| DbErr::Custom(e.to_string()))?;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            RECORD_AND_DECIDE.as_str(),
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

/// An event as [`RECORD_AND_DECIDE`] reads it: its history row and what the users' rule needs.
#[derive(Serialize)]
struct BatchRow<'a> {
    #[serde(flatten)]
    history: history::Row<'a>,
    user_id: Option<&'a str>,
    updated_at: Option<DateTime<Utc>>,
    deletes: bool,
    /// [`Event::repair`]: an equal stored version is rewritten.
    repair: bool,
}

/// One statement for the whole batch, with the history's `INSERT` ([`history::insert`]) (`$1`: a JSON array of `{ordinal, svix_id, event_type,
/// user_id, updated_at, deletes}` and the history's fields, one per user or ignored event, first
/// copies only; `$2`: [`REASON_TIME_FORMAT`]). Each new svix-id becomes a history row with its
/// outcome and, for `stale`, the reason:
/// - an upsert is `applied` when it is its user's newest in the batch (then the earliest), no
///   tombstone exists and no delete of the user is in the batch, and the stored row is older
///   (or, for a repair, [`Event::repair`], of the same `updated_at`: applied with
///   [`super::compare::REPAIRED`] as its reason); every other upsert is `stale`. A svix-id
///   recorded before is never newer than what is stored (its own version, or a newer one, got
///   there, or a tombstone did), so letting it take part in the ranking changes no outcome;
/// - a delete is `deleted` (applied); if its svix-id is new, [`delete_users`] carries it out;
/// - any other type is `ignored`.
///
/// Raw SQL: sea-query builds neither data-modifying CTEs nor window functions. The batch comes
/// as JSON rather than arrays because sea-query's array values cannot hold NULL elements.
static RECORD_AND_DECIDE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "\
WITH batch AS ( \
  SELECT * FROM jsonb_to_recordset($1::text::jsonb) AS b( \
    {history_columns}, user_id text, updated_at timestamptz, deletes boolean, \
    repair boolean)), \
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
              AND (stored_updated_at IS NULL OR stored_updated_at < updated_at \
                   OR (repair AND stored_updated_at = updated_at)) THEN 'applied' \
         ELSE 'stale' END AS outcome, \
    CASE WHEN user_id IS NULL OR deletes THEN NULL \
         WHEN tombstoned_at IS NOT NULL THEN \
           'the user was deleted at ' || to_char(tombstoned_at AT TIME ZONE 'UTC', $2) \
         WHEN deleted_in_batch THEN 'the user is deleted by an event of the same batch' \
         WHEN rank > 1 THEN 'a newer version of the user came in the same batch' \
         WHEN repair AND stored_updated_at = updated_at THEN '{repaired}' \
         WHEN stored_updated_at >= updated_at THEN \
           'stored updated_at ' || to_char(stored_updated_at AT TIME ZONE 'UTC', $2) \
           || ' is not older than ' || to_char(updated_at AT TIME ZONE 'UTC', $2) \
    END AS reason \
  FROM standing s), \
recorded AS ({record}) \
SELECT svix_id, outcome FROM recorded",
        history_columns = history::ROW_COLUMNS,
        repaired = super::compare::REPAIRED,
        record = history::insert("decided"),
    )
});

/// How the history's reasons write a time (`to_char`, in UTC, to the millisecond).
const REASON_TIME_FORMAT: &str = "YYYY-MM-DD HH24:MI:SS.MS \"UTC\"";

/// Settles every address the writers want that someone else holds, or that two writers want:
/// the newest version (by `updated_at`, then id) wins it. Holders that lose have their email
/// set to null; returns the ids of writers that lose, to be written with a null email.
pub(super) async fn settle_emails<C: ConnectionTrait>(
    db: &C,
    writers: &[&UserRecord],
) -> Result<HashSet<String>, DbErr> {
    if writers.iter().all(|w| w.email.is_none()) {
        return Ok(HashSet::new());
    }
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            SETTLE_EMAILS.as_str(),
            email_claims(writers),
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

/// The parameters of [`EMAIL_WINNERS`]: `$1`–`$3` the writers that carry an email (id, email,
/// updated_at), `$4` every writer's id.
fn email_claims(writers: &[&UserRecord]) -> [sea_orm::Value; 4] {
    let wanting: Vec<&&UserRecord> = writers.iter().filter(|w| w.email.is_some()).collect();
    let ids: Vec<String> = wanting.iter().map(|w| w.id.clone()).collect();
    let emails: Vec<String> = wanting.iter().filter_map(|w| w.email.clone()).collect();
    let updated_at: Vec<DateTime<Utc>> = wanting.iter().map(|w| w.updated_at).collect();
    let all_writers: Vec<String> = writers.iter().map(|w| w.id.clone()).collect();
    [
        ids.into(),
        emails.into(),
        updated_at.into(),
        all_writers.into(),
    ]
}

/// The email rule's decision, as CTEs (`incoming`, `candidates`, `winners`) over
/// [`email_claims`]: for each wanted address the candidates are those writers and the live row
/// holding it now, unless that row is a writer's (it is about to be overwritten); the newest
/// (by `updated_at`, then id) wins. A writer whose address another candidate wins is written
/// with a null email. Shared by [`SETTLE_EMAILS`] and [`compare_users`], so the comparison
/// expects the email the write really stores.
const EMAIL_WINNERS: &str = "\
incoming AS ( \
  SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS i(id, email, updated_at)), \
candidates AS ( \
  SELECT id, email, updated_at FROM incoming \
  UNION ALL \
  SELECT u.id, u.email, u.updated_at FROM users u \
  WHERE u.email IN (SELECT email FROM incoming) AND u.id <> ALL ($4::text[]) \
    AND u.deleted_at IS NULL), \
winners AS ( \
  SELECT DISTINCT ON (email) email, id, updated_at FROM candidates \
  ORDER BY email, updated_at DESC, id DESC)";

/// [`EMAIL_WINNERS`], then: rows that hold a won address and are
/// not its winner lose it now, so the upsert that follows meets no conflict: a writer's old
/// row unconditionally, anyone else's only if still older than the winner, checked again under
/// the row lock (a holder that moved on meanwhile keeps it, and the upsert's unique violation
/// reruns the batch). Returns `lost` rows (a writer, the winner it lost to) and `freed` rows
/// (the winner, a holder other than a writer that lost the address).
///
/// Raw SQL: sea-query builds neither data-modifying CTEs nor `DISTINCT ON`.
static SETTLE_EMAILS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "\
WITH {EMAIL_WINNERS}, \
freed AS ( \
  UPDATE users SET email = NULL, synced_at = now() \
  FROM winners w \
  WHERE users.email = w.email AND users.id <> w.id AND users.deleted_at IS NULL \
    AND (users.id = ANY ($4::text[]) OR (users.updated_at, users.id) < (w.updated_at, w.id)) \
  RETURNING users.id AS holder, w.id AS winner) \
SELECT 'lost' AS kind, i.id AS user_id, w.id AS other \
FROM incoming i JOIN winners w ON w.email = i.email WHERE w.id <> i.id \
UNION ALL \
SELECT 'freed', winner, holder FROM freed WHERE holder <> ALL ($4::text[])"
    )
});

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

/// The rows the write stores for `writers` (a writer in `without_email` lost its address to
/// the email rule), each column with its value as JSON text, in [`user_columns`]' order.
fn written_rows(
    writers: &[&UserRecord],
    without_email: &HashSet<String>,
) -> Result<Vec<Vec<(users::Column, String)>>, DbErr> {
    writers
        .iter()
        .map(|w| {
            let email = w
                .email
                .as_deref()
                .filter(|_| !without_email.contains(&w.id));
            user_columns(w, email)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DbErr::Custom(e.to_string()))
}

/// The rows as one JSON array text, put together from each value's own text (column names need
/// no escaping): a tree of JSON values would copy every user's data, and the statement builder
/// copies its values again.
fn rows_json(rows: &[Vec<(users::Column, String)>]) -> String {
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
    json
}

/// Writes the winning versions in one statement:
/// `INSERT INTO users (…) SELECT … FROM jsonb_populate_recordset(NULL::users, $1) ON CONFLICT
/// (id) DO UPDATE SET … WHERE users.updated_at <= excluded.updated_at`. The rows come as JSON
/// typed by the table itself (not `unnest` of arrays: sea-query's array values cannot hold the
/// NULLs of nullable columns). The writers were decided under their locks
/// ([`record_and_decide`]): each is newer than its stored row, or a repair of the same
/// `updated_at`; the guard only keeps an older version from ever overwriting.
pub(super) async fn write_users<C: ConnectionTrait>(
    db: &C,
    writers: &[&UserRecord],
    without_email: &HashSet<String>,
) -> Result<(), DbErr> {
    let rows = written_rows(writers, without_email)?;
    let Some(columns) = rows
        .first()
        .map(|row| row.iter().map(|(column, _)| *column).collect::<Vec<_>>())
    else {
        return Ok(());
    };
    let json = rows_json(&rows);
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
                        .lte(Expr::col(("excluded", users::Column::UpdatedAt))),
                )
                .to_owned(),
        )
        .to_owned();
    db.execute(&upsert).await?;
    Ok(())
}

/// How listed versions of users stand against the stored rows, in one statement: for each, the
/// stored `updated_at`, whether it is tombstoned, and whether the stored row is, column for
/// column, what writing this version would store ([`super::compare`]). The expected row is
/// built by the write's own code ([`written_rows`], the email of a writer that loses its address
/// to the email rule null, decided by the write's own rule, [`EMAIL_WINNERS`], with every
/// listed user as a writer).
pub(super) async fn compare_users<C: ConnectionTrait>(
    db: &C,
    records: &[&UserRecord],
) -> Result<Vec<(String, Standing)>, DbErr> {
    let rows = written_rows(records, &HashSet::new())?;
    let Some(columns) = rows
        .first()
        .map(|row| row.iter().map(|(column, _)| *column).collect::<Vec<_>>())
    else {
        return Ok(Vec::new());
    };
    // Every written column but the id (the join) and the email (which the rule may clear).
    let compared: Vec<&str> = columns
        .iter()
        .filter(|c| !matches!(c, users::Column::Id | users::Column::Email))
        .map(|c| c.as_str())
        .collect();
    let row = |alias: &str| {
        compared
            .iter()
            .map(|c| format!("{alias}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = format!(
        "WITH {EMAIL_WINNERS}, \
         lost AS (SELECT i.id FROM incoming i JOIN winners w ON w.email = i.email \
                  WHERE w.id <> i.id), \
         listed AS (SELECT * FROM jsonb_populate_recordset(NULL::users, $5::text::jsonb)) \
         SELECT l.id, u.updated_at, \
           EXISTS (SELECT 1 FROM user_tombstones t WHERE t.id = l.id) AS tombstoned, \
           (u.id IS NOT NULL \
            AND u.email IS NOT DISTINCT FROM \
              (CASE WHEN l.id IN (SELECT id FROM lost) THEN NULL ELSE l.email END) \
            AND ROW({stored}) IS NOT DISTINCT FROM ROW({listed})) AS same \
         FROM listed l LEFT JOIN users u ON u.id = l.id",
        stored = row("u"),
        listed = row("l"),
    );
    let [ids, emails, updated_at, all] = email_claims(records);
    let found = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [ids, emails, updated_at, all, rows_json(&rows).into()],
        ))
        .await?;
    found.iter().map(Standing::read).collect()
}
