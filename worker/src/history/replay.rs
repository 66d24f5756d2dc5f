//! `worker replay`: applies the stored events of a time window again, through the same rules as
//! a delivery ([`apply_batch`](crate::apply::apply_batch)). Last writer wins and tombstones make
//! that safe at any time, beside a worker applying live events: an event older than what is
//! stored changes nothing.
//!
//! Each event is read again from its stored payload with the role settings of now, gets a
//! svix-id of its own (`replay_<run>_<original>`, the svix-id being the dedup key), source
//! `replay` and its own history row. The window's end is fixed when the run starts (at the
//! latest, the database's time then), so the run never reads the rows it writes itself.
//!
//! The history is read a page of [`PAGE_SIZE`] events at a time (never all of it in memory),
//! and each page is applied in a transaction of its own ([`apply::write`]: batch, then one by
//! one), which takes the advisory locks of that page's ids only: at most a few per event,
//! whatever the size of the window, so live events of those ids wait for one page at most. A
//! page blocked past `WORKER_LOCK_TIMEOUT` is rolled back and tried again after a pause.
//!
//! `--dry-run` applies each page in a transaction that is rolled back: nothing is written, and
//! the report says what each event would do against the tables as they are, with the events of
//! its own page before it. An event does not see the effect of an earlier page (a user created
//! in one page and updated in the next is reported `applied` twice, as it would be; an older
//! version in a later page than the newer one is reported `applied` where a real run says
//! `stale`).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, PaginatorTrait, QueryFilter, Statement,
    TransactionTrait,
};
use serde::Serialize;

use super::{Filter, Pages, RunFlags, event_from_row, note_failure, rerun_svix_id};
use crate::apply::pace::Pace;
use crate::apply::{self, Event, Outcome, Reading};
use crate::commands::progress::{self, Progress};

/// History rows read at once, and events applied in one transaction.
const PAGE_SIZE: u64 = 500;

/// Subjects listed by name in the report at most.
pub const CHANGED_LISTED: usize = 50;

/// `worker replay --since TIME [--until TIME] [--type T] [--subject ID] [--dry-run] [--json]`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("since", |since| since.required(true)))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: Filter,
    #[command(flatten)]
    pub flags: RunFlags,
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The events to apply again; `since` is required.
    pub filter: Filter,
    pub dry_run: bool,
    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE` now (the events are read with them) and
    /// `WORKER_STORE_PAYLOADS` (keep the payload in the replay's history rows).
    pub reading: Reading,
    /// A progress bar (on a terminal) rather than progress log lines.
    pub progress_bar: bool,
    /// `WORKER_REPAIR_SHARE`: the replay rests after each page.
    pub pace: Pace,
}

/// How many events ended how. `applied` wrote a newer version; `deleted` is a delete applied
/// again (its row was gone already unless something brought it back); `stale` and `ignored` as
/// in the history; `duplicate` an event the run had applied already (the history held an earlier
/// replay of it too); `failed` an event that could not be applied (named in the summary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub applied: u64,
    pub deleted: u64,
    pub stale: u64,
    pub ignored: u64,
    pub duplicate: u64,
    pub failed: u64,
}

impl Tally {
    fn count(&mut self, event: &Event, outcome: Option<Outcome>) {
        match outcome {
            Some(Outcome::Applied) if event.action.deletes() => self.deleted += 1,
            Some(Outcome::Applied) => self.applied += 1,
            Some(Outcome::Stale) => self.stale += 1,
            Some(Outcome::Ignored) => self.ignored += 1,
            Some(Outcome::Duplicate) => self.duplicate += 1,
            None => self.failed += 1,
        }
    }
}

/// A row the replay wrote.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Changed {
    /// `user`, `organization` or `membership`.
    pub kind: String,
    pub id: String,
}

/// The summary of a run: `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run's id: its start in milliseconds since the epoch, part of its svix-ids.
    pub run: i64,
    pub dry_run: bool,
    /// The window actually read: `until` is at the latest the start of the run.
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// History rows in the window.
    pub read: u64,
    /// Rows without a payload (`WORKER_STORE_PAYLOADS=false` then): cannot be applied again.
    pub without_payload: u64,
    /// Rows whose payload cannot be read as an event any more (the reason of the first few in
    /// `failures`).
    pub unreadable: u64,
    /// What became of the events applied again.
    pub outcomes: Tally,
    /// The same per event type.
    pub types: BTreeMap<String, Tally>,
    /// The subjects whose rows were written (`applied`), the first [`CHANGED_LISTED`] of them.
    pub changed: Vec<Changed>,
    /// Whether more subjects were written than `changed` lists.
    pub changed_more: bool,
    /// Why events could not be read or applied, the first few.
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl Summary {
    /// The report for a person: a paragraph, the outcomes per type, the subjects written.
    pub fn text(&self) -> String {
        let o = &self.outcomes;
        let verb = if self.dry_run {
            "Dry run, nothing written: would have applied"
        } else {
            "Applied"
        };
        let mut text = format!(
            "Replay {} of the events applied from {} to {} in {:.1} s: {} read, {} without a \
             payload (not replayable), {} unreadable. {verb}: {} applied, {} deleted, {} stale, \
             {} ignored, {} duplicate, {} failed.\n",
            self.run,
            self.since
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            self.until
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            self.seconds,
            self.read,
            self.without_payload,
            self.unreadable,
            o.applied,
            o.deleted,
            o.stale,
            o.ignored,
            o.duplicate,
            o.failed,
        );
        for (event_type, t) in &self.types {
            text.push_str(&format!(
                "  {event_type:<34} {} applied, {} deleted, {} stale, {} ignored, {} duplicate, \
                 {} failed\n",
                t.applied, t.deleted, t.stale, t.ignored, t.duplicate, t.failed
            ));
        }
        if self.changed.is_empty() {
            text.push_str("No row changed.\n");
        } else {
            let more = if self.changed_more {
                format!(" (the first {CHANGED_LISTED})")
            } else {
                String::new()
            };
            text.push_str(&format!("Rows written{more}:\n"));
            for changed in &self.changed {
                text.push_str(&format!("  {:<12} {}\n", changed.kind, changed.id));
            }
        }
        for failure in &self.failures {
            text.push_str(&format!("FAILED: {failure}\n"));
        }
        text
    }
}

/// `worker replay`: runs once with the settings' roles and payload setting, prints the summary.
/// An error when events failed (after the summary was printed), so the process exits non-zero.
pub async fn execute(settings: &shared::Settings, args: ReplayArgs) -> anyhow::Result<()> {
    let options = Options {
        progress_bar: progress::shows_bar(settings, args.flags.json),
        filter: args.filter,
        dry_run: args.flags.dry_run,
        reading: Reading::from_settings(settings)?,
        pace: Pace::from_settings(settings)?,
    };
    let db = crate::commands::connect_command(settings, 2).await?;
    let summary = replay(&db, &options).await;
    db.close().await.ok();
    let summary = summary?;
    args.flags.print(&summary, summary.text())?;
    let failed = summary.outcomes.failed + summary.unreadable;
    anyhow::ensure!(failed == 0, "{failed} events could not be replayed");
    Ok(())
}

/// Applies the stored events that `options.filter` selects again; see the module.
pub async fn replay(db: &DatabaseConnection, options: &Options) -> anyhow::Result<Summary> {
    let since = options
        .filter
        .since
        .context("--since is required: the start of the window to replay")?;
    let started = Instant::now();
    let run = Utc::now().timestamp_millis();
    let now = database_now(db).await?;
    let until = options.filter.until.map_or(now, |until| until.min(now));
    anyhow::ensure!(
        since < until,
        "the window is empty: --since {} is not before {}",
        since.to_rfc3339(),
        until.to_rfc3339()
    );
    let filter = Filter {
        until: Some(until),
        ..options.filter.clone()
    };
    let mut summary = Summary {
        run,
        dry_run: options.dry_run,
        since,
        until,
        read: 0,
        without_payload: 0,
        unreadable: 0,
        outcomes: Tally::default(),
        types: BTreeMap::new(),
        changed: Vec::new(),
        changed_more: false,
        failures: Vec::new(),
        seconds: 0.0,
    };
    let select = filter.select().filter(Expr::cust_with_values(
        "NOT starts_with(svix_id, $1)",
        [format!("replay_{run}_")],
    ));
    let total = select
        .clone()
        .count(db)
        .await
        .context("cannot count the events to replay")?;
    let mut progress = Progress::new(options.progress_bar, "replaying", "events", total);
    let mut pages = Pages::new(select, PAGE_SIZE);
    run_pages(db, &mut pages, options, &mut summary, &mut progress).await?;
    summary.changed.sort();
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        run,
        read = summary.read,
        applied = summary.outcomes.applied,
        "replay finished"
    );
    Ok(summary)
}

/// Reads the pages and applies their events, a page per transaction (rolled back in a dry run).
async fn run_pages(
    db: &DatabaseConnection,
    pages: &mut Pages,
    options: &Options,
    summary: &mut Summary,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    loop {
        let step = Instant::now();
        let rows = pages
            .next(db)
            .await
            .context("cannot read the event history")?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let svix_id = rerun_svix_id("replay", summary.run, &row.svix_id);
            match event_from_row(row, &svix_id, &options.reading) {
                None => summary.without_payload += 1,
                Some(Ok(event)) => events.push(event),
                Some(Err(error)) => {
                    summary.unreadable += 1;
                    note_failure(&mut summary.failures, format!("{}: {error}", row.svix_id));
                }
            }
        }
        summary.read += rows.len() as u64;
        let written = if options.dry_run {
            let txn = db.begin().await.context("cannot reach the database")?;
            let written = apply::write(&txn, &events).await;
            txn.rollback()
                .await
                .context("cannot roll the dry run back")?;
            written
        } else {
            // In the history's order, a few events a transaction (see `apply::pace`).
            apply::pace::write_in_transactions(db, &events, 1).await
        };
        let (outcomes, failed) =
            written.map_err(|error| anyhow::anyhow!("replay stopped: {error}"))?;
        for failure in failed {
            note_failure(&mut summary.failures, failure);
        }
        for (event, outcome) in events.iter().zip(outcomes) {
            summary.outcomes.count(event, outcome);
            summary
                .types
                .entry(event.event_type.clone())
                .or_default()
                .count(event, outcome);
            if outcome == Some(Outcome::Applied)
                && !event.action.deletes()
                && let Some(subject) = event.action.subject()
            {
                let changed = Changed {
                    kind: subject.kind.label().to_owned(),
                    id: subject.id.to_owned(),
                };
                if !summary.changed.contains(&changed) {
                    if summary.changed.len() < CHANGED_LISTED {
                        summary.changed.push(changed);
                    } else {
                        summary.changed_more = true;
                    }
                }
            }
        }
        progress.advance(rows.len() as u64);
        options.pace.rest_since(step).await;
    }
}

/// The database's time now: the end of the window when none is given, so the clocks of this
/// machine and the database's cannot disagree about what the run wrote itself.
async fn database_now<C: ConnectionTrait>(db: &C) -> anyhow::Result<DateTime<Utc>> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT now() AS now",
        ))
        .await
        .context("cannot reach the database (DATABASE_URL)")?
        .context("the database returned no time")?;
    let now: DateTime<Utc> = row.try_get("", "now")?;
    Ok(now)
}
