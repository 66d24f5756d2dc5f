//! `worker rebuild`: derives `users`, `organizations` and `organization_memberships` again from
//! the stored history, after a mapping change (`WORKER_ROLES`, new columns).
//!
//! One transaction, so readers keep seeing the old rows until the commit (MVCC; rows are
//! deleted, not truncated, since `TRUNCATE` would block the readers):
//! 1. an advisory lock, so two rebuilds never run at once;
//! 2. a snapshot of the three tables (temporary tables), to report what changed;
//! 3. the subjects to derive again: those with history rows that carry a payload, unless the
//!    stored row is newer than every version in that history (pruned by
//!    `WORKER_PROCESSED_RETENTION`, or written while payloads were not stored); such a row, like
//!    the rows of subjects without any payload, is kept as it is: a row that cannot be derived
//!    again is never deleted;
//! 4. the advisory locks of those subjects (and of the organizations and users their
//!    memberships name), in the order the worker takes them: live events of those ids wait
//!    until the commit;
//! 5. their rows deleted, their history applied again in the order it was applied, through
//!    [`apply_batch`](crate::apply::apply_batch) with the role settings of now, under svix-ids
//!    of the run (`rebuild_<run>_<original>`) whose history rows are deleted again right away:
//!    a rebuild is not an event. Tombstones stay, so a deleted user stays deleted;
//! 6. the tables compared with the snapshot; commit, or roll back for `--dry-run` and whenever
//!    an event could not be read or applied.

use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    PaginatorTrait, QueryFilter, Statement, TransactionTrait,
};
use serde::Serialize;
use shared::Roles;

use super::{Filter, Pages, RunFlags, event_from_row, note_failure, rerun_svix_id};
use crate::apply::locks::LOCK_KEY;
use crate::apply::{self, Reading, SubjectKind};
use crate::commands::progress::{self, Progress};
use crate::storage::processed_events;

/// History rows read and applied at once.
const PAGE_SIZE: u64 = 500;

/// The advisory lock of a rebuild (the two-key form, whose keys never meet the one-key locks of
/// ids and migrations).
const REBUILD_LOCK: &str = "pg_try_advisory_xact_lock(1919247467, 1)";

/// `worker rebuild [--dry-run] [--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub flags: RunFlags,
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE` now: the events are read with them.
    pub roles: Roles,
    /// A progress bar (on a terminal) rather than progress log lines.
    pub progress_bar: bool,
}

/// The history the rebuild had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct History {
    /// Rows in `processed_events`.
    pub rows: u64,
    pub with_payload: u64,
    pub without_payload: u64,
    /// Rows applied again: those with a payload, of the subjects derived again.
    pub applied_again: u64,
    /// Subjects (users, organizations, memberships) derived again.
    pub subjects: u64,
}

/// One table after the rebuild, against the snapshot taken before it. Rows are compared without
/// `synced_at` (the time of the write).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    pub created: u64,
    pub changed: u64,
    pub removed: u64,
    pub unchanged: u64,
    /// Rows whose subject had no history to derive them from, left as they were (counted in
    /// `unchanged` as well, unless another row's event changed them).
    pub kept_without_history: u64,
}

/// The summary of a run: `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run's id: its start in milliseconds since the epoch.
    pub run: i64,
    pub dry_run: bool,
    /// Whether the rebuild was committed (false for a dry run and after a failure).
    pub committed: bool,
    pub history: History,
    pub users: TableCounts,
    pub organizations: TableCounts,
    pub organization_memberships: TableCounts,
    /// Events that could not be read or applied, the first few; any makes the run roll back.
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl Summary {
    /// The counts of one table.
    pub fn counts(&self, kind: SubjectKind) -> &TableCounts {
        match kind {
            SubjectKind::User => &self.users,
            SubjectKind::Organization => &self.organizations,
            SubjectKind::Membership => &self.organization_memberships,
        }
    }

    fn counts_mut(&mut self, kind: SubjectKind) -> &mut TableCounts {
        match kind {
            SubjectKind::User => &mut self.users,
            SubjectKind::Organization => &mut self.organizations,
            SubjectKind::Membership => &mut self.organization_memberships,
        }
    }

    /// The report for a person.
    pub fn text(&self) -> String {
        let h = &self.history;
        let mut text = format!(
            "Rebuild {} in {:.1} s. History: {} rows, {} with a payload, {} without; {} applied \
             again for {} subjects.\n",
            self.run,
            self.seconds,
            h.rows,
            h.with_payload,
            h.without_payload,
            h.applied_again,
            h.subjects
        );
        for (table, counts) in SubjectKind::ALL.map(|kind| (kind.table(), self.counts(kind))) {
            text.push_str(&format!(
                "  {table:<25} {} created, {} changed, {} removed, {} unchanged, {} kept without \
                 history\n",
                counts.created,
                counts.changed,
                counts.removed,
                counts.unchanged,
                counts.kept_without_history
            ));
        }
        for failure in &self.failures {
            text.push_str(&format!("FAILED: {failure}\n"));
        }
        text.push_str(if self.committed {
            "Committed.\n"
        } else if self.dry_run && self.failures.is_empty() {
            "Dry run: rolled back, nothing written.\n"
        } else {
            "Rolled back, nothing written.\n"
        });
        text
    }
}

/// `worker rebuild`: runs once with the settings' roles, prints the summary. An error when events
/// failed (after the summary was printed), so the process exits non-zero.
pub async fn execute(settings: &shared::Settings, args: RebuildArgs) -> anyhow::Result<()> {
    let options = Options {
        progress_bar: progress::shows_bar(settings, args.flags.json),
        dry_run: args.flags.dry_run,
        roles: settings.roles()?,
    };
    let db = crate::commands::connect_command(settings, 1).await?;
    let summary = rebuild(&db, &options).await;
    db.close().await.ok();
    let summary = summary?;
    args.flags.print(&summary, summary.text())?;
    anyhow::ensure!(
        summary.failures.is_empty(),
        "the rebuild was rolled back: events could not be applied again"
    );
    Ok(())
}

/// Derives the tables again from the history; see the module.
pub async fn rebuild(db: &DatabaseConnection, options: &Options) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let run = Utc::now().timestamp_millis();
    let txn = db.begin().await.context("cannot reach the database")?;
    let locked: bool = query_one(&txn, &format!("SELECT {REBUILD_LOCK} AS locked"), "locked")
        .await
        .context("cannot take the rebuild's lock")?;
    anyhow::ensure!(locked, "another rebuild is running; nothing was done");
    let mut summary = Summary {
        run,
        dry_run: options.dry_run,
        committed: false,
        history: History::default(),
        users: TableCounts::default(),
        organizations: TableCounts::default(),
        organization_memberships: TableCounts::default(),
        failures: Vec::new(),
        seconds: 0.0,
    };
    prepare(&txn, &mut summary.history)
        .await
        .context("cannot prepare the rebuild")?;
    let svix_prefix = format!("rebuild_{run}_");
    let select = Filter::default()
        .select()
        .filter(processed_events::Column::Payload.is_not_null())
        .filter(Expr::cust(
            "EXISTS (SELECT 1 FROM rebuild_subjects s \
             WHERE s.kind = processed_events.subject_kind AND s.id = processed_events.subject_id)",
        ))
        .filter(Expr::cust_with_values(
            "NOT starts_with(svix_id, $1)",
            [svix_prefix],
        ));
    let total = select
        .clone()
        .count(&txn)
        .await
        .context("cannot count the history to apply")?;
    let mut progress = Progress::new(options.progress_bar, "rebuilding from", "events", total);
    // The rebuild's own history rows are deleted again: no payload to keep.
    let reading = Reading {
        roles: options.roles.clone(),
        store_payloads: false,
    };
    let mut pages = Pages::new(select, PAGE_SIZE);
    loop {
        let rows = pages
            .next(&txn)
            .await
            .context("cannot read the event history")?;
        if rows.is_empty() {
            break;
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let svix_id = rerun_svix_id("rebuild", run, &row.svix_id);
            match event_from_row(row, &svix_id, &reading) {
                Some(Ok(event)) => events.push(event),
                Some(Err(error)) => {
                    note_failure(&mut summary.failures, format!("{}: {error}", row.svix_id))
                }
                None => {}
            }
        }
        let (_, failed) = apply::write(&txn, &events)
            .await
            .map_err(|error| anyhow::anyhow!("the rebuild stopped: {error}"))?;
        for failure in failed {
            note_failure(&mut summary.failures, failure);
        }
        forget(
            &txn,
            events.into_iter().map(|event| event.svix_id).collect(),
        )
        .await
        .context("cannot delete the rebuild's own history rows")?;
        summary.history.applied_again += rows.len() as u64;
        progress.advance(rows.len() as u64);
    }
    for kind in SubjectKind::ALL {
        let table = kind.table();
        *summary.counts_mut(kind) = compare(&txn, table, kind.label())
            .await
            .with_context(|| format!("cannot compare {table} with its snapshot"))?;
    }
    if options.dry_run || !summary.failures.is_empty() {
        txn.rollback().await?;
    } else {
        txn.commit().await.context("cannot commit the rebuild")?;
        summary.committed = true;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        run,
        committed = summary.committed,
        applied_again = summary.history.applied_again,
        "rebuild finished"
    );
    Ok(summary)
}

/// Steps 2 to 5 up to the re-application: counts the history, snapshots the tables, decides the
/// subjects, takes their locks and deletes their rows.
async fn prepare(txn: &DatabaseTransaction, history: &mut History) -> anyhow::Result<()> {
    let rows: i64 = query_one(txn, "SELECT count(*) AS n FROM processed_events", "n").await?;
    let with_payload: i64 = query_one(
        txn,
        "SELECT count(*) AS n FROM processed_events WHERE payload IS NOT NULL",
        "n",
    )
    .await?;
    history.rows = rows.max(0) as u64;
    history.with_payload = with_payload.max(0) as u64;
    history.without_payload = history.rows - history.with_payload;
    for table in SubjectKind::ALL.map(SubjectKind::table) {
        txn.execute_unprepared(&format!(
            "CREATE TEMPORARY TABLE rebuild_before_{table} ON COMMIT DROP AS \
             SELECT * FROM {table}; \
             ALTER TABLE rebuild_before_{table} ADD PRIMARY KEY (id)"
        ))
        .await?;
    }
    txn.execute_unprepared(SUBJECTS).await?;
    for (table, kind) in SubjectKind::ALL.map(|kind| (kind.table(), kind.label())) {
        txn.execute_unprepared(&format!(
            "DELETE FROM rebuild_subjects s USING {table} t \
             WHERE s.kind = '{kind}' AND t.id = s.id \
               AND (s.newest_ms IS NULL OR extract(epoch FROM t.updated_at) * 1000 > s.newest_ms)"
        ))
        .await?;
    }
    let subjects: i64 = query_one(txn, "SELECT count(*) AS n FROM rebuild_subjects", "n").await?;
    history.subjects = subjects.max(0) as u64;
    txn.execute_unprepared(&format!(
        "SELECT count(*) FROM (SELECT pg_advisory_xact_lock(key) FROM \
           (SELECT DISTINCT {LOCK_KEY} AS key FROM ({LOCKED_IDS}) AS ids(id) \
            WHERE id IS NOT NULL ORDER BY key) AS keys) AS locked"
    ))
    .await?;
    for (table, kind) in SubjectKind::ALL.map(|kind| (kind.table(), kind.label())) {
        txn.execute_unprepared(&format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM rebuild_subjects WHERE kind = '{kind}')"
        ))
        .await?;
    }
    Ok(())
}

/// Every subject with history that carries a payload, with the newest `updated_at` (in
/// milliseconds, as Clerk sends it) among those payloads; null when none has one (only deletes).
const SUBJECTS: &str = "\
CREATE TEMPORARY TABLE rebuild_subjects ON COMMIT DROP AS \
SELECT subject_kind AS kind, subject_id AS id, \
  max(CASE WHEN jsonb_typeof(payload -> 'data' -> 'updated_at') = 'number' \
      THEN (payload -> 'data' ->> 'updated_at')::numeric END) AS newest_ms \
FROM processed_events \
WHERE payload IS NOT NULL AND subject_id IS NOT NULL \
GROUP BY subject_kind, subject_id; \
ALTER TABLE rebuild_subjects ADD PRIMARY KEY (kind, id); \
ANALYZE rebuild_subjects";

/// The ids whose advisory locks applying the subjects' history takes: the subjects, and the
/// organization and user each membership event names (see `Change::lock_ids`).
const LOCKED_IDS: &str = "\
SELECT id FROM rebuild_subjects \
UNION \
SELECT p.payload -> 'data' -> 'organization' ->> 'id' FROM processed_events p \
  JOIN rebuild_subjects s ON s.kind = p.subject_kind AND s.id = p.subject_id \
  WHERE p.subject_kind = 'membership' AND p.payload IS NOT NULL \
UNION \
SELECT p.payload -> 'data' -> 'public_user_data' ->> 'user_id' FROM processed_events p \
  JOIN rebuild_subjects s ON s.kind = p.subject_kind AND s.id = p.subject_id \
  WHERE p.subject_kind = 'membership' AND p.payload IS NOT NULL";

/// Deletes the history rows of the rebuild's own events.
async fn forget(txn: &DatabaseTransaction, svix_ids: Vec<String>) -> Result<(), sea_orm::DbErr> {
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

/// `table` now against its snapshot.
async fn compare(
    txn: &DatabaseTransaction,
    table: &str,
    kind: &str,
) -> anyhow::Result<TableCounts> {
    let row = txn
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT \
                   count(*) FILTER (WHERE b.id IS NULL) AS created, \
                   count(*) FILTER (WHERE a.id IS NULL) AS removed, \
                   count(*) FILTER (WHERE a.id IS NOT NULL AND b.id IS NOT NULL \
                     AND (to_jsonb(a) - 'synced_at') IS DISTINCT FROM (to_jsonb(b) - 'synced_at')) \
                     AS changed, \
                   count(*) FILTER (WHERE a.id IS NOT NULL AND b.id IS NOT NULL \
                     AND (to_jsonb(a) - 'synced_at') = (to_jsonb(b) - 'synced_at')) AS unchanged, \
                   count(*) FILTER (WHERE b.id IS NOT NULL AND NOT EXISTS ( \
                     SELECT 1 FROM rebuild_subjects s WHERE s.kind = '{kind}' AND s.id = b.id)) \
                     AS kept \
                 FROM {table} a FULL JOIN rebuild_before_{table} b ON a.id = b.id"
            ),
        ))
        .await?
        .context("no counts")?;
    let count = |column: &str| -> anyhow::Result<u64> {
        let n: i64 = row.try_get("", column)?;
        Ok(n.max(0) as u64)
    };
    Ok(TableCounts {
        created: count("created")?,
        changed: count("changed")?,
        removed: count("removed")?,
        unchanged: count("unchanged")?,
        kept_without_history: count("kept")?,
    })
}

async fn query_one<T: sea_orm::TryGetable>(
    txn: &DatabaseTransaction,
    sql: &str,
    column: &str,
) -> anyhow::Result<T> {
    let row = txn
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .with_context(|| format!("no row from {sql}"))?;
    Ok(row.try_get("", column)?)
}
