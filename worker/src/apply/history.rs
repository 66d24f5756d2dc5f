//! The history writer: every handled event becomes one `processed_events` row (svix-id, type,
//! outcome and its reason, source, subject, payload, times, trace id), in the statement that
//! decides its outcome and in the same transaction as its effect. One row type and one `INSERT` for every
//! rule: the users' batch statement and the organizations' and memberships' one-by-one path
//! both write through [`insert`].

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde::Serialize;

use super::event::Event;

/// The columns of a JSON array of [`Row`]s, as `jsonb_to_recordset` reads them.
pub(super) const ROW_COLUMNS: &str = "ordinal int, svix_id text, event_type text, source text, \
     subject_kind text, subject_id text, payload text, svix_timestamp timestamptz, \
     received_at timestamptz, trace_id text";

/// An event as its history row holds it (the outcome and its reason are decided in SQL).
#[derive(Serialize)]
pub(super) struct Row<'a> {
    /// The event's place in its batch: rows are written in this order.
    ordinal: usize,
    svix_id: &'a str,
    event_type: &'a str,
    source: &'a str,
    subject_kind: Option<&'static str>,
    subject_id: Option<&'a str>,
    /// The body, as a JSON string (Postgres parses it into the history's `jsonb`).
    payload: Option<&'a str>,
    svix_timestamp: Option<DateTime<Utc>>,
    received_at: Option<DateTime<Utc>>,
    /// The trace the event was handled in, when one was recorded.
    trace_id: Option<&'a str>,
}

impl<'a> Row<'a> {
    pub(super) fn of(ordinal: usize, event: &'a Event) -> Self {
        let subject = event.action.subject();
        Self {
            ordinal,
            svix_id: &event.svix_id,
            event_type: &event.event_type,
            source: event.source.as_str(),
            subject_kind: subject.map(|s| s.kind.label()),
            subject_id: subject.map(|s| s.id),
            payload: event.payload.as_deref(),
            svix_timestamp: event.svix_timestamp,
            received_at: event.received_at,
            trace_id: event.trace_id.as_deref(),
        }
    }
}

/// The history's `INSERT` from `from`, a relation with the columns of [`Row`] plus `outcome`
/// and `reason`: new svix-ids become rows, in `ordinal` order; a svix-id recorded before is
/// left alone (the dedup). Returns `svix_id, outcome` of each row written.
pub(super) fn insert(from: &str) -> String {
    format!(
        "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at, source, \
           subject_kind, subject_id, payload, svix_timestamp, received_at, reason, trace_id) \
         SELECT svix_id, event_type, outcome, now(), source, subject_kind, subject_id, \
           payload::jsonb, svix_timestamp, received_at, reason, trace_id \
         FROM {from} ORDER BY ordinal \
         ON CONFLICT (svix_id) DO NOTHING \
         RETURNING svix_id, outcome"
    )
}

/// One event's row with the outcome `$2` and no reason (`$1`: a one-row JSON array).
static RECORD_ONE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH one AS (SELECT b.*, $2::text AS outcome, NULL::text AS reason \
           FROM jsonb_to_recordset($1::text::jsonb) AS b({ROW_COLUMNS})) {}",
        insert("one")
    )
});

/// Records one event with `outcome`; false when its svix-id was recorded before (a duplicate:
/// nothing else may change).
pub(super) async fn record<C: ConnectionTrait>(
    db: &C,
    event: &Event,
    outcome: &str,
) -> Result<bool, DbErr> {
    let row =
        serde_json::to_string(&[Row::of(0, event)]).map_err(|e| DbErr::Custom(e.to_string()))?;
    let recorded = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            RECORD_ONE.as_str(),
            [row.into(), outcome.into()],
        ))
        .await?;
    Ok(recorded.is_some())
}

/// Marks a recorded event `stale`, with the reason it wrote nothing.
pub(super) async fn mark_stale<C: ConnectionTrait>(
    db: &C,
    svix_id: &str,
    reason: &str,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE processed_events SET outcome = 'stale', reason = $2 WHERE svix_id = $1",
        [svix_id.into(), reason.into()],
    ))
    .await?;
    Ok(())
}

/// Gives a recorded event the reason of its outcome (a repair's, [`super::compare::REPAIRED`]).
pub(super) async fn note<C: ConnectionTrait>(
    db: &C,
    svix_id: &str,
    reason: &str,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE processed_events SET reason = $2 WHERE svix_id = $1",
        [svix_id.into(), reason.into()],
    ))
    .await?;
    Ok(())
}
