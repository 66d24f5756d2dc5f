//! The `reconcile_runs` table: a row written when a run starts (`running`) and completed when it
//! ends: `succeeded` or `failed`, or `interrupted` (stopped by a signal, or found `running` by
//! the next holder of the reconcile lock: its process ended without saying so), with the counts
//! and the reason. A dry run writes no row.
//!
//! The row also says where its listing stands (`listing_kind`, `listing_cursor`, written after
//! each page's writes committed) and under which id its listed ids are kept (`listing_id`, see
//! `super::listed`), so that the next run can resume an interrupted listing
//! ([`resumable`]).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use super::Kind;

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `worker reconcile`.
    Command,
    /// `WORKER_RECONCILE_INTERVAL` in a running worker.
    Schedule,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Command => "command",
            Trigger::Schedule => "schedule",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Succeeded,
    Failed,
    /// Stopped before its end; its listing can be resumed.
    Interrupted,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Succeeded => "succeeded",
            Ending::Failed => "failed",
            Ending::Interrupted => "interrupted",
        }
    }
}

/// An interrupted run whose listing the next run continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resumable {
    /// The interrupted run.
    pub(crate) run_id: String,
    /// Under which id its listed ids are kept (its own, or the run it resumed in turn).
    pub(crate) listing_id: String,
    /// The kind whose listing it was walking.
    pub(crate) kind: Kind,
    /// Where that listing stopped (`None`: before its first page).
    pub(crate) cursor: Option<String>,
}

/// Records a run that starts, continuing `resuming`'s listing if given.
pub(crate) async fn start<C: ConnectionTrait>(
    db: &C,
    id: &str,
    trigger: Trigger,
    resuming: Option<&Resumable>,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO reconcile_runs (id, trigger, started_at, outcome, counts, listing_id, \
           listing_kind, listing_cursor, resumed_from) \
         VALUES ($1, $2, now(), 'running', '{}'::jsonb, $3, $4, $5, $6)",
        [
            id.into(),
            trigger.as_str().into(),
            resuming.map_or(id, |r| r.listing_id.as_str()).into(),
            resuming.map(|r| r.kind.name().to_owned()).into(),
            resuming.and_then(|r| r.cursor.clone()).into(),
            resuming.map(|r| r.run_id.clone()).into(),
        ],
    ))
    .await?;
    Ok(())
}

pub(crate) async fn finish<C: ConnectionTrait>(
    db: &C,
    id: &str,
    counts: serde_json::Value,
    ending: Ending,
    error: Option<&str>,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE reconcile_runs SET finished_at = now(), outcome = $2, counts = $3, error = $4 \
         WHERE id = $1",
        [
            id.into(),
            ending.as_str().into(),
            counts.into(),
            error.map(str::to_owned).into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Records where the run's listing stands: `kind` walked up to `cursor` (`None`: `kind` not
/// started yet; no kind: every listing done).
pub(crate) async fn listing_at<C: ConnectionTrait>(
    db: &C,
    id: &str,
    kind: Option<Kind>,
    cursor: Option<&str>,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE reconcile_runs SET listing_kind = $2, listing_cursor = $3 WHERE id = $1",
        [
            id.into(),
            kind.map(|kind| kind.name().to_owned()).into(),
            cursor.map(str::to_owned).into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Records as `interrupted` every run still `running`: the caller holds the reconcile lock, so
/// none of them has a live process (one killed, out of memory, or whose host was lost). Returns
/// how many there were.
pub(crate) async fn settle_abandoned<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    let result = db
        .execute_raw(Statement::from_string(
            DbBackend::Postgres,
            "UPDATE reconcile_runs SET outcome = 'interrupted', \
               error = 'found running with nobody holding the reconcile lock: its process \
                        ended without recording it (killed, out of memory, host lost)' \
             WHERE outcome = 'running'",
        ))
        .await?;
    let settled = result.rows_affected();
    if settled > 0 {
        tracing::warn!(
            runs = settled,
            "reconcile runs left running by a process that ended are recorded as interrupted"
        );
    }
    Ok(settled)
}

/// The latest run, when it was interrupted in a listing: the next run continues there.
pub(crate) async fn resumable<C: ConnectionTrait>(db: &C) -> Result<Option<Resumable>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, outcome, listing_id, listing_kind, listing_cursor FROM reconcile_runs \
             ORDER BY started_at DESC LIMIT 1",
        ))
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let outcome: String = row.try_get("", "outcome")?;
    let listing_id: Option<String> = row.try_get("", "listing_id")?;
    let kind: Option<String> = row.try_get("", "listing_kind")?;
    let kind = kind.and_then(|name| Kind::ALL.into_iter().find(|kind| kind.name() == name));
    match (outcome.as_str(), listing_id, kind) {
        ("interrupted", Some(listing_id), Some(kind)) => Ok(Some(Resumable {
            run_id: row.try_get("", "id")?,
            listing_id,
            kind,
            cursor: row.try_get("", "listing_cursor")?,
        })),
        _ => Ok(None),
    }
}

/// When the latest run that ran to its end (`succeeded` or `failed`, by any worker or command)
/// finished, if any ever did. An interrupted run is not an end: the next one is due at once.
pub(crate) async fn last_finished<C: ConnectionTrait>(
    db: &C,
) -> Result<Option<DateTime<Utc>>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT max(finished_at) AS last FROM reconcile_runs \
             WHERE outcome IN ('succeeded', 'failed')",
        ))
        .await?;
    match row {
        Some(row) => row.try_get("", "last"),
        None => Ok(None),
    }
}
