//! The `reconcile_runs` table: a row written when a run starts (`running`) and completed when it
//! ends (`succeeded` or `failed`, the counts, the reason). A dry run writes nothing, so no row.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

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

pub(crate) async fn start<C: ConnectionTrait>(
    db: &C,
    id: &str,
    trigger: Trigger,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO reconcile_runs (id, trigger, started_at, outcome, counts) \
         VALUES ($1, $2, now(), 'running', '{}'::jsonb)",
        [id.into(), trigger.as_str().into()],
    ))
    .await?;
    Ok(())
}

pub(crate) async fn finish<C: ConnectionTrait>(
    db: &C,
    id: &str,
    counts: serde_json::Value,
    error: Option<&str>,
) -> Result<(), DbErr> {
    let outcome = if error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE reconcile_runs SET finished_at = now(), outcome = $2, counts = $3, error = $4 \
         WHERE id = $1",
        [
            id.into(),
            outcome.into(),
            counts.into(),
            error.map(str::to_owned).into(),
        ],
    ))
    .await?;
    Ok(())
}

/// When the latest run (of any worker or command) started, if any ever did.
pub(crate) async fn last_started<C: ConnectionTrait>(
    db: &C,
) -> Result<Option<DateTime<Utc>>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT max(started_at) AS last FROM reconcile_runs",
        ))
        .await?;
    match row {
        Some(row) => row.try_get("", "last"),
        None => Ok(None),
    }
}
