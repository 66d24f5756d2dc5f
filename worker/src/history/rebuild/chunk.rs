//! One chunk of a rebuild: a few hundred subjects derived again in one transaction of their own,
//! which takes only their advisory locks, so the number of locks it holds is bounded by the
//! chunk's size whatever the size of the history.

use std::collections::HashMap;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    QueryFilter, Statement, TransactionTrait,
};

use super::{PAGE_SIZE, TableCounts};
use crate::apply::locks::LOCK_KEY;
use crate::apply::{
    self, ApplyError, BatchFailure, DbFailure, Event, Reading, SubjectKind, lock_timeout,
};
use crate::history::{Filter, Pages, event_from_row, rerun_svix_id};
use crate::storage::processed_events;

/// What one chunk did.
#[derive(Debug, Default)]
pub(super) struct ChunkReport {
    /// The counts of each table, in the order of [`SubjectKind::ALL`], over the chunk's
    /// subjects.
    pub(super) counts: [TableCounts; 3],
    /// History rows applied again.
    pub(super) applied_again: u64,
    /// Subjects derived again (the others of the chunk were kept as they were).
    pub(super) derived: u64,
    /// Events that could not be read or applied: the chunk was rolled back.
    pub(super) failures: Vec<String>,
    /// Whether the chunk was committed.
    pub(super) committed: bool,
}

/// Why a chunk did not finish.
#[derive(Debug)]
pub(super) enum ChunkError {
    /// The database's trouble, not the history's (a lock held past `WORKER_LOCK_TIMEOUT`, a
    /// deadlock, a lost connection): the chunk was rolled back and can be run again.
    Transient {
        reason: String,
        /// Whether a statement waited longer than `WORKER_LOCK_TIMEOUT` for a lock.
        lock_timeout: bool,
    },
    /// Anything else: the run stops.
    Fatal(DbErr),
}

impl ChunkError {
    fn transient(reason: String) -> Self {
        ChunkError::Transient {
            lock_timeout: lock_timeout::is_reason(&reason),
            reason,
        }
    }
}

impl From<DbErr> for ChunkError {
    fn from(error: DbErr) -> Self {
        match apply::classify(&error) {
            DbFailure::Transient => ChunkError::transient(lock_timeout::reason(&error)),
            DbFailure::Race | DbFailure::Message => ChunkError::Fatal(error),
        }
    }
}

/// What every chunk of a run shares.
pub(super) struct Run<'a> {
    pub(super) run: i64,
    pub(super) dry_run: bool,
    pub(super) reading: &'a Reading,
}

/// Derives the subjects `ids` (ids of any kind, as the history names them) again, in one
/// transaction: their locks (in the lock order of the door), the choice of the subjects that
/// can be derived again, their rows before, deleted, their history applied again, their rows
/// after. Committed, or rolled back for a dry run and when an event failed.
pub(super) async fn run_chunk(
    db: &DatabaseConnection,
    run: &Run<'_>,
    ids: &[String],
) -> Result<ChunkReport, ChunkError> {
    let txn = db.begin().await?;
    let mut report = ChunkReport::default();
    lock(&txn, ids).await?;
    let mut derived_ids = Vec::new();
    let mut before = Vec::with_capacity(SubjectKind::ALL.len());
    for (index, kind) in SubjectKind::ALL.into_iter().enumerate() {
        let (derived, kept) = choose(&txn, kind, ids).await?;
        report.counts[index].kept_without_history += kept;
        report.counts[index].unchanged += kept;
        report.derived += derived.len() as u64;
        before.push(rows(&txn, kind, &derived).await?);
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("DELETE FROM {} WHERE id = ANY($1)", kind.table()),
            [derived.clone().into()],
        ))
        .await?;
        derived_ids.push(derived);
    }
    let all: Vec<String> = derived_ids.iter().flatten().cloned().collect();
    if !all.is_empty() {
        apply_history(&txn, run, &all, &mut report).await?;
    }
    for (index, kind) in SubjectKind::ALL.into_iter().enumerate() {
        let after = rows(&txn, kind, &derived_ids[index]).await?;
        compare(&before[index], &after, &mut report.counts[index]);
    }
    if run.dry_run || !report.failures.is_empty() {
        txn.rollback().await?;
    } else {
        txn.commit().await?;
        report.committed = true;
    }
    Ok(report)
}

/// Takes the advisory locks applying the subjects' history needs, in the door's order (the
/// order of the lock keys), before anything is read: the subjects, and the organization and
/// user each of their membership events names (see `Change::lock_ids`). A live event of one of
/// them waits until the chunk ends; one that came first is in the history the chunk reads.
async fn lock(txn: &DatabaseTransaction, ids: &[String]) -> Result<(), DbErr> {
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT count(*) FROM (SELECT pg_advisory_xact_lock(key) FROM \
               (SELECT DISTINCT {LOCK_KEY} AS key FROM ( \
                  SELECT unnest($1::text[]) \
                  UNION ALL SELECT p.payload -> 'data' -> 'organization' ->> 'id' \
                    FROM processed_events p \
                    WHERE p.subject_id = ANY($1) AND p.subject_kind = 'membership' \
                      AND p.payload IS NOT NULL \
                  UNION ALL SELECT p.payload -> 'data' -> 'public_user_data' ->> 'user_id' \
                    FROM processed_events p \
                    WHERE p.subject_id = ANY($1) AND p.subject_kind = 'membership' \
                      AND p.payload IS NOT NULL \
                ) AS ids(id) WHERE id IS NOT NULL ORDER BY key) AS keys) AS locked"
        ),
        [ids.to_vec().into()],
    ))
    .await?;
    Ok(())
}

/// Of the chunk's subjects of `kind`, those derived again, and how many stored rows are kept as
/// they are: a row newer than every version its history holds (pruned by
/// `WORKER_PROCESSED_RETENTION`, or written while payloads were not stored), and a row kept
/// after its deletion (`WORKER_DELETE_MODE` `soft` or `anonymize`: its tombstone would turn
/// every version away). Decided after the locks, so a live event that came first counts.
async fn choose(
    txn: &DatabaseTransaction,
    kind: SubjectKind,
    ids: &[String],
) -> Result<(Vec<String>, u64), DbErr> {
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT s.id, (t.id IS NULL OR NOT (s.newest_ms IS NULL \
                   OR extract(epoch FROM t.updated_at) * 1000 > s.newest_ms \
                   OR t.deleted_at IS NOT NULL)) AS derive \
                 FROM (SELECT subject_id AS id, \
                         max(CASE WHEN jsonb_typeof(payload -> 'data' -> 'updated_at') = 'number' \
                             THEN (payload -> 'data' ->> 'updated_at')::numeric END) AS newest_ms \
                       FROM processed_events \
                       WHERE subject_id = ANY($1) AND subject_kind = '{kind}' \
                         AND payload IS NOT NULL \
                       GROUP BY subject_id) AS s \
                 LEFT JOIN {table} t ON t.id = s.id \
                 ORDER BY s.id",
                kind = kind.label(),
                table = kind.table()
            ),
            [ids.to_vec().into()],
        ))
        .await?;
    let mut derived = Vec::with_capacity(rows.len());
    let mut kept = 0;
    for row in rows {
        let id: String = row.try_get("", "id")?;
        if row.try_get::<bool>("", "derive")? {
            derived.push(id);
        } else {
            kept += 1;
        }
    }
    Ok((derived, kept))
}

/// The rows of `ids` in the table of `kind`, each as a digest of its columns but `synced_at`
/// (the time of the write).
async fn rows(
    txn: &DatabaseTransaction,
    kind: SubjectKind,
    ids: &[String],
) -> Result<HashMap<String, String>, DbErr> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT id, md5((to_jsonb(t) - 'synced_at')::text) AS digest \
                 FROM {} t WHERE id = ANY($1)",
                kind.table()
            ),
            [ids.to_vec().into()],
        ))
        .await?;
    rows.into_iter()
        .map(|row| Ok((row.try_get("", "id")?, row.try_get("", "digest")?)))
        .collect()
}

fn compare(
    before: &HashMap<String, String>,
    after: &HashMap<String, String>,
    counts: &mut TableCounts,
) {
    for (id, digest) in after {
        match before.get(id) {
            None => counts.created += 1,
            Some(old) if old == digest => counts.unchanged += 1,
            Some(_) => counts.changed += 1,
        }
    }
    counts.removed += before.keys().filter(|id| !after.contains_key(*id)).count() as u64;
}

/// Applies the history of `ids` again in the order it was applied, a page at a time, under the
/// run's own svix-ids, whose history rows are deleted again right away.
async fn apply_history(
    txn: &DatabaseTransaction,
    run: &Run<'_>,
    ids: &[String],
    report: &mut ChunkReport,
) -> Result<(), ChunkError> {
    let select = Filter::default()
        .select()
        .filter(processed_events::Column::Payload.is_not_null())
        .filter(processed_events::Column::SubjectId.is_in(ids.iter().map(String::as_str)))
        .filter(Expr::cust_with_values(
            "NOT starts_with(svix_id, $1)",
            [format!("rebuild_{}_", run.run)],
        ));
    let mut pages = Pages::new(select, PAGE_SIZE);
    loop {
        let rows = pages.next(txn).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let svix_id = rerun_svix_id("rebuild", run.run, &row.svix_id);
            match event_from_row(row, &svix_id, run.reading) {
                Some(Ok(event)) => events.push(event),
                Some(Err(error)) => report.failures.push(format!("{}: {error}", row.svix_id)),
                None => {}
            }
        }
        write(txn, &events, &mut report.failures).await?;
        forget(txn, events.into_iter().map(|event| event.svix_id).collect()).await?;
        report.applied_again += rows.len() as u64;
    }
}

/// Batch, then one by one: the events in one savepoint; when one fails on its own account, each
/// in a savepoint of its own so the reason names it. The database's own trouble ends the chunk's
/// attempt at once instead (no retry while the chunk holds its locks).
async fn write(
    txn: &DatabaseTransaction,
    events: &[Event],
    failures: &mut Vec<String>,
) -> Result<(), ChunkError> {
    match apply::apply_batch(txn, events).await {
        Ok(_) => Ok(()),
        Err(BatchFailure::Transient(error)) => Err(error.into()),
        Err(BatchFailure::Event(_)) => {
            for event in events {
                match apply::apply(txn, event).await {
                    Ok(_) => {}
                    Err(ApplyError::Transient(reason)) => {
                        return Err(ChunkError::transient(reason));
                    }
                    Err(error) => {
                        let id = event.action.subject().map_or("", |s| s.id);
                        failures.push(format!("{} ({id}): {error}", event.svix_id));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Deletes the history rows of the rebuild's own events: a rebuild is not an event.
async fn forget(txn: &DatabaseTransaction, svix_ids: Vec<String>) -> Result<(), DbErr> {
    if svix_ids.is_empty() {
        return Ok(());
    }
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM processed_events WHERE svix_id = ANY($1)",
        [svix_ids.into()],
    ))
    .await?;
    Ok(())
}
