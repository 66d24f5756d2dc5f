//! `worker rebuild`: derives `users`, `organizations` and `organization_memberships` again from
//! the stored history, after a mapping change (`WORKER_ROLES`, new columns).
//!
//! In chunks, so it works at any size on default Postgres settings and never stops live events
//! for long: the subjects with history that carries a payload are walked in the order of their
//! ids (a page of [`CHUNK_SUBJECTS`] at a time, never all of them in memory), and each chunk is
//! one transaction of its own ([`chunk`]):
//! 1. the advisory locks of the chunk's subjects (and of the organizations and users their
//!    memberships name), in the order the worker takes them: at most a few per subject, so a
//!    chunk stays far below the server's lock table (`max_locks_per_transaction` 64 by
//!    default, times `max_connections`), and live events of those ids wait only for this chunk;
//! 2. which subjects are derived again, decided after the locks: a stored row newer than every
//!    version in its history (pruned by `WORKER_PROCESSED_RETENTION`, or written while payloads
//!    were not stored), and a row kept after its deletion (`WORKER_DELETE_MODE` `soft` or
//!    `anonymize`: its tombstone would turn every version away, and an anonymized one has no
//!    payloads left), is kept as it is, like the rows of subjects without any payload: a row that
//!    cannot be derived again is never deleted;
//! 3. their rows read (a digest of each, for the summary), deleted, their history applied again
//!    in the order it was applied through [`apply_batch`](crate::apply::apply_batch) with the
//!    role and delete settings of now, under svix-ids of the run (`rebuild_<run>_<original>`)
//!    whose history rows are deleted again right away: a rebuild is not an event. Tombstones
//!    stay, so a deleted user stays deleted;
//! 4. their rows read again and compared; commit, or roll back for `--dry-run` and when an event
//!    of the chunk could not be read or applied (its subjects keep their rows; the run goes on
//!    and exits non-zero).
//!
//! What a reader sees meanwhile: each subject's row is replaced in the transaction of its chunk,
//! so a reader sees it either as it was or as it is derived again, never missing nor half
//! written; a statement sees the chunks committed before it started, the subjects not reached
//! yet keeping their previous rows. A live event of a subject is applied either before its chunk
//! (its chunk then applies it again, from the history, with the rest) or after (by the usual
//! rules, on top of the derived row): either way the newest version wins.
//!
//! A statement that waits longer than `WORKER_LOCK_TIMEOUT` (a live batch holding a subject's
//! lock or row) rolls its chunk back; the chunk is run again after a pause ([`CHUNK_BACKOFF`]),
//! and counted. An advisory lock of its own keeps two rebuilds from running at once.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use serde::Serialize;
use shared::{Backoff, Roles};

use super::{RunFlags, note_failure};
use crate::apply::pace::{Pace, TRANSACTION_EVENTS};
use crate::apply::{DeleteMode, Reading, SubjectKind};
use crate::commands::progress::{self, Progress};
use chunk::{ChunkError, ChunkReport, Run};

mod chunk;

/// History rows read and applied at once.
const PAGE_SIZE: u64 = 500;

/// Subjects derived again in one transaction, by default (`--chunk-subjects`): a repair
/// command's transaction ([`TRANSACTION_EVENTS`]), short enough that a live event of one of its
/// subjects waits little for it. Each takes its own advisory lock and those of the organization
/// and user of its memberships, so a chunk holds at most a few hundred locks, a few percent of
/// the default lock table (64 × `max_connections`, shared by every session).
pub const CHUNK_SUBJECTS: u64 = TRANSACTION_EVENTS as u64;

/// How often a chunk is run again after the database's own trouble (a lock held past
/// `WORKER_LOCK_TIMEOUT`, a deadlock, a lost connection) before the run stops, and the pause
/// before each try: 0.2 s, doubling up to 5 s.
const CHUNK_RETRIES: u32 = 12;
const CHUNK_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    max: Duration::from_secs(5),
};

/// The advisory lock of a rebuild (the two-key form, whose keys never meet the one-key locks of
/// ids and migrations).
const REBUILD_LOCK: &str = "pg_try_advisory_xact_lock(1919247467, 1)";

/// `worker rebuild [--dry-run] [--json] [--chunk-subjects N]`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub flags: RunFlags,
    /// Subjects derived again in one transaction: the advisory locks and the time a chunk
    /// holds grow with it.
    #[arg(long, value_name = "N", default_value_t = CHUNK_SUBJECTS, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_subjects: u64,
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE` now: the events are read with them.
    pub roles: Roles,
    /// `WORKER_DELETE_MODE` now: what the deletes applied again do to the rows.
    pub delete_mode: DeleteMode,
    /// A progress bar (on a terminal) rather than progress log lines.
    pub progress_bar: bool,
    /// Subjects derived again in one transaction ([`CHUNK_SUBJECTS`] unless told).
    pub chunk_subjects: u64,
    /// `WORKER_REPAIR_SHARE`: the rebuild rests after each chunk.
    pub pace: Pace,
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

/// How the chunks went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Chunks {
    /// Chunks committed.
    pub committed: u64,
    /// Chunks rolled back: every chunk of a dry run, and those with an event that failed.
    pub rolled_back: u64,
    /// Tries of a chunk that ended in the database's own trouble and were run again.
    pub retries: u64,
    /// Of those, the tries in which a statement waited longer than `WORKER_LOCK_TIMEOUT`.
    pub lock_timeouts: u64,
}

/// One table after the rebuild: the rows of the subjects derived again, each against itself
/// before its chunk, compared without `synced_at` (the time of the write). A row another
/// subject's event wrote (an email taken over, an organization a membership's snapshot
/// advanced) is counted with its own subject's chunk, as that chunk found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    pub created: u64,
    pub changed: u64,
    pub removed: u64,
    pub unchanged: u64,
    /// Rows whose subject had no history to derive them from, left as they were (counted in
    /// `unchanged` as well).
    pub kept_without_history: u64,
}

impl TableCounts {
    fn add(&mut self, other: &TableCounts) {
        self.created += other.created;
        self.changed += other.changed;
        self.removed += other.removed;
        self.unchanged += other.unchanged;
        self.kept_without_history += other.kept_without_history;
    }
}

/// The summary of a run: `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run's id: its start in milliseconds since the epoch.
    pub run: i64,
    pub dry_run: bool,
    /// Whether every chunk was committed (false for a dry run and after a failure).
    pub committed: bool,
    pub history: History,
    pub chunks: Chunks,
    pub users: TableCounts,
    pub organizations: TableCounts,
    pub organization_memberships: TableCounts,
    /// Events that could not be read or applied, the first few; each rolls its chunk back.
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
        let c = &self.chunks;
        text.push_str(&format!(
            "  {} chunks committed, {} rolled back; {} retried ({} after a lock timeout)\n",
            c.committed, c.rolled_back, c.retries, c.lock_timeouts
        ));
        for failure in &self.failures {
            text.push_str(&format!("FAILED: {failure}\n"));
        }
        text.push_str(if self.committed {
            "Committed.\n"
        } else if self.dry_run && self.failures.is_empty() {
            "Dry run: every chunk rolled back, nothing written.\n"
        } else if c.committed == 0 {
            "Rolled back, nothing written.\n"
        } else {
            "The chunks with a failure were rolled back (their subjects keep their rows); the \
             others were committed.\n"
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
        delete_mode: DeleteMode::from_settings(settings)?,
        chunk_subjects: args.chunk_subjects,
        pace: Pace::from_settings(settings)?,
    };
    // One connection holds the rebuild's lock, the other runs the chunks.
    let db = crate::commands::connect_command(settings, 2).await?;
    let summary = rebuild(&db, &options).await;
    db.close().await.ok();
    let summary = summary?;
    args.flags.print(&summary, summary.text())?;
    anyhow::ensure!(
        summary.failures.is_empty(),
        "events could not be applied again: their chunks were rolled back"
    );
    Ok(())
}

/// Derives the tables again from the history; see the module.
pub async fn rebuild(db: &DatabaseConnection, options: &Options) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let run = Utc::now().timestamp_millis();
    // The run's lock, held by a transaction that stays open (and idle: it has no snapshot, so it
    // keeps nothing from vacuum) until the end; closing its connection releases it too.
    let lock = db.begin().await.context("cannot reach the database")?;
    let locked: bool = query_one(&lock, &format!("SELECT {REBUILD_LOCK} AS locked"), "locked")
        .await
        .context("cannot take the rebuild's lock")?;
    anyhow::ensure!(locked, "another rebuild is running; nothing was done");
    let result = run_chunks(db, options, run).await;
    lock.rollback().await.ok();
    let mut summary = result?;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        run,
        committed = summary.committed,
        applied_again = summary.history.applied_again,
        chunks = summary.chunks.committed + summary.chunks.rolled_back,
        retries = summary.chunks.retries,
        "rebuild finished"
    );
    Ok(summary)
}

async fn run_chunks(
    db: &DatabaseConnection,
    options: &Options,
    run: i64,
) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        run,
        dry_run: options.dry_run,
        committed: false,
        history: History::default(),
        chunks: Chunks::default(),
        users: TableCounts::default(),
        organizations: TableCounts::default(),
        organization_memberships: TableCounts::default(),
        failures: Vec::new(),
        seconds: 0.0,
    };
    let subjects = count_history(db, &mut summary)
        .await
        .context("cannot count the history")?;
    let mut progress = Progress::new(options.progress_bar, "rebuilding", "subjects", subjects);
    // The rebuild's own history rows are deleted again: no payload to keep.
    let reading = Reading {
        roles: options.roles.clone(),
        store_payloads: false,
        delete_mode: options.delete_mode,
    };
    let chunk_run = Run {
        run,
        dry_run: options.dry_run,
        reading: &reading,
    };
    let mut after = String::new();
    loop {
        let step = Instant::now();
        let ids = crate::apply::retry_read("reading the subjects of the history", || {
            next_subjects(db, &after, options.chunk_subjects)
        })
        .await
        .map_err(|error| anyhow::anyhow!("the rebuild stopped: {error}"))?;
        let Some(last) = ids.last() else { break };
        after = last.clone();
        let report = run_chunk_until_done(db, &chunk_run, &ids, &mut summary.chunks).await?;
        if report.committed {
            summary.chunks.committed += 1;
        } else {
            summary.chunks.rolled_back += 1;
        }
        // A chunk rolled back for a failure changed nothing: only a dry run counts what it would
        // have done.
        if report.committed || (options.dry_run && report.failures.is_empty()) {
            for (index, kind) in SubjectKind::ALL.into_iter().enumerate() {
                summary.counts_mut(kind).add(&report.counts[index]);
            }
        }
        summary.history.applied_again += report.applied_again;
        summary.history.subjects += report.derived;
        for failure in report.failures {
            note_failure(&mut summary.failures, failure);
        }
        progress.advance(ids.len() as u64);
        options.pace.rest_since(step).await;
    }
    summary.committed = !options.dry_run && summary.chunks.rolled_back == 0;
    Ok(summary)
}

/// Runs a chunk, again after a pause while it ends in the database's own trouble, counting each
/// such try in `chunks`.
async fn run_chunk_until_done(
    db: &DatabaseConnection,
    run: &Run<'_>,
    ids: &[String],
    chunks: &mut Chunks,
) -> anyhow::Result<ChunkReport> {
    let mut retries = 0;
    loop {
        match chunk::run_chunk(db, run, ids).await {
            Ok(report) => return Ok(report),
            Err(ChunkError::Transient {
                reason,
                lock_timeout,
            }) if retries < CHUNK_RETRIES => {
                retries += 1;
                chunks.retries += 1;
                chunks.lock_timeouts += u64::from(lock_timeout);
                let delay = CHUNK_BACKOFF.delay(retries);
                tracing::warn!(%reason, retries, next_attempt_in = ?delay, first = %ids[0], "a chunk of the rebuild was rolled back, running it again");
                tokio::time::sleep(delay).await;
            }
            Err(ChunkError::Transient { reason, .. }) => {
                anyhow::bail!(
                    "the rebuild stopped after {retries} tries of the chunk from {}: {reason} \
                     (the chunks before it were done; running it again does them again)",
                    ids[0]
                )
            }
            Err(ChunkError::Fatal(error)) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("the rebuild stopped at the chunk from {}", ids[0])));
            }
        }
    }
}

/// Counts the history, and the rows that have none to derive them from (kept as they are);
/// returns the number of subjects with history that carries a payload.
async fn count_history(db: &DatabaseConnection, summary: &mut Summary) -> anyhow::Result<u64> {
    // One statement, so both counts are of the same rows: live events add history meanwhile.
    let counts = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n, count(payload) AS with_payload FROM processed_events",
        ))
        .await?
        .context("the history's counts")?;
    let rows: i64 = counts.try_get("", "n")?;
    let with_payload: i64 = counts.try_get("", "with_payload")?;
    let history = &mut summary.history;
    history.rows = rows.max(0) as u64;
    history.with_payload = with_payload.max(0) as u64;
    history.without_payload = history.rows - history.with_payload;
    for kind in SubjectKind::ALL {
        let kept: i64 = query_one(
            db,
            &format!(
                "SELECT count(*) AS n FROM {table} t WHERE NOT EXISTS (SELECT 1 \
                   FROM processed_events p WHERE p.subject_id = t.id \
                   AND p.subject_kind = '{kind}' AND p.payload IS NOT NULL)",
                table = kind.table(),
                kind = kind.label()
            ),
            "n",
        )
        .await?;
        let counts = summary.counts_mut(kind);
        counts.kept_without_history += kept.max(0) as u64;
        counts.unchanged += kept.max(0) as u64;
    }
    let subjects: i64 = query_one(
        db,
        "SELECT count(DISTINCT subject_id) AS n FROM processed_events WHERE payload IS NOT NULL",
        "n",
    )
    .await?;
    Ok(subjects.max(0) as u64)
}

/// The next `limit` subjects with history that carries a payload, in the order of their ids,
/// after `after` (the last of the previous chunk; empty at the start). Ids of users,
/// organizations and memberships never collide (Clerk prefixes them), so a subject is its id.
async fn next_subjects(
    db: &DatabaseConnection,
    after: &str,
    limit: u64,
) -> Result<Vec<String>, sea_orm::DbErr> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT DISTINCT subject_id AS id FROM processed_events \
             WHERE subject_id > $1 AND payload IS NOT NULL \
             ORDER BY subject_id LIMIT $2",
            [after.into(), (limit.min(i64::MAX as u64) as i64).into()],
        ))
        .await?;
    rows.into_iter().map(|row| row.try_get("", "id")).collect()
}

async fn query_one<C: ConnectionTrait, T: sea_orm::TryGetable>(
    db: &C,
    sql: &str,
    column: &str,
) -> anyhow::Result<T> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .with_context(|| format!("no row from {sql}"))?;
    Ok(row.try_get("", column)?)
}
