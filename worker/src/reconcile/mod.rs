//! `worker reconcile`: brings the tables to what Clerk's Backend API holds, for what no webhook
//! brought (users created before the endpoint existed, an outage longer than Svix's retries, a
//! purged dead letter).
//!
//! Users, in order:
//! 1. `GET /v1/users/count` (the bar's length; also the first check of the key).
//! 2. The listing, page by page (`starting_after`, 500 a page). A page's stored versions and
//!    tombstones are read first: a user whose stored `updated_at` equals the listed one is
//!    `unchanged` and not written (that is what makes a run with nothing to do fast), an older
//!    listed version or a tombstoned user is `stale`. The rest go through
//!    [`apply_batch`](crate::apply::apply_batch) as `user.updated` events, read from the listed
//!    JSON by [`Event::read`] like any delivery (so the same mapping and the same rules apply),
//!    with a svix-id of their own per run and user, a page split into [`WRITERS`] transactions
//!    applied at once.
//! 3. Only after a complete listing: every stored user that was not listed is confirmed with
//!    `GET /v1/users/{id}`. A 404 makes a `user.deleted` event (row deleted, tombstone written);
//!    a user still there is applied instead. When more users would be deleted than
//!    `--max-delete` allows, nothing is deleted and the run fails: a key of another instance
//!    lists none of the stored users and answers 404 for all of them.
//!
//! A listing that did not complete deletes nothing and fails the run. Organizations and
//! memberships will be passes of their own beside users, each with its [`Counts`] in the
//! [`Summary`].

pub mod clerk;
pub mod progress;
mod runs;
pub(crate) mod schedule;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait};
use serde::Serialize;
use serde_json::{Value, json};
use shared::Roles;
use tracing::Instrument as _;

use crate::apply::{self, BatchFailure, Outcome};
use crate::event::{Action, Event, Source};

pub use clerk::{ClerkClient, ClerkConfig, ClerkError};
pub use runs::Trigger;
pub use schedule::ScheduledReconcile;

/// Users asked for per page: Clerk's largest, so the fewest requests.
pub const PAGE_SIZE: u32 = clerk::MAX_PAGE;

/// The type every listed user is applied as: a listed user is Clerk's current version, which
/// is what a `user.updated` carries.
const UPSERT_TYPE: &str = "user.updated";
const DELETE_TYPE: &str = "user.deleted";

/// Transactions a page is split into and applied at once: like the worker's batches in flight.
/// The command's pool has one connection more, for the reads.
pub const WRITERS: usize = 8;

/// How often a batch whose transaction failed on the database's account is tried again.
const DATABASE_RETRIES: u32 = 5;

/// `worker reconcile [--dry-run] [--json] [--no-delete] [--max-delete N|P%]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Read and compare, write nothing; the summary says what would change.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip the deletion phase: users missing from Clerk stay.
    #[arg(long)]
    pub no_delete: bool,
    /// The most users the deletion phase may remove: a number (`250`) or a share of the table
    /// (`25%`). Default: 10 % of the table, at least 10.
    #[arg(long, value_name = "N|P%", default_value_t = MaxDelete::default())]
    pub max_delete: MaxDelete,
}

impl ReconcileArgs {
    /// Whether the run shows a progress bar: on a terminal, with human-readable logs, and not
    /// for `--json`.
    pub fn shows_bar(&self, settings: &shared::Settings) -> bool {
        progress::shows_bar(settings, self.json)
    }
}

/// The limit of the deletion phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxDelete {
    /// At most this many rows.
    Rows(u64),
    /// At most this share of the rows stored when the run started, in percent; never below
    /// [`MaxDelete::FLOOR`].
    Percent(f64),
}

impl MaxDelete {
    /// The least a percentage allows, so a small table can lose a few users.
    pub const FLOOR: u64 = 10;

    /// The number of rows allowed for a table of `rows`.
    pub fn limit(self, rows: u64) -> u64 {
        match self {
            MaxDelete::Rows(n) => n,
            MaxDelete::Percent(p) => ((rows as f64 * p / 100.0).floor() as u64).max(Self::FLOOR),
        }
    }
}

impl Default for MaxDelete {
    fn default() -> Self {
        MaxDelete::Percent(10.0)
    }
}

impl fmt::Display for MaxDelete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxDelete::Rows(n) => write!(f, "{n}"),
            MaxDelete::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for MaxDelete {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(MaxDelete::Percent(p)),
                _ => Err(format!("{text:?} is not a percentage from 0% to 100%")),
            },
            None => text
                .parse::<u64>()
                .map(MaxDelete::Rows)
                .map_err(|_| format!("{text:?} is neither a number of rows nor a percentage")),
        }
    }
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    /// False with `--no-delete`.
    pub delete: bool,
    pub max_delete: MaxDelete,
    pub trigger: Trigger,
    /// A progress bar (on a terminal) rather than progress log lines.
    pub progress_bar: bool,
    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE`: listed users are read with them, as events are.
    pub roles: Roles,
    /// `WORKER_STORE_PAYLOADS`: keep each listed object in its history row.
    pub store_payloads: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            dry_run: false,
            delete: true,
            max_delete: MaxDelete::default(),
            trigger: Trigger::Command,
            progress_bar: false,
            roles: Roles::default(),
            store_payloads: true,
        }
    }
}

/// What became of one kind of object. In a dry run: what would have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Objects the listing returned.
    pub listed: u64,
    /// Written where no row was.
    pub created: u64,
    /// Written over an older stored version.
    pub updated: u64,
    /// Stored exactly as listed (same `updated_at`); not written.
    pub unchanged: u64,
    /// Postgres already had a newer version, or a tombstone; not written.
    pub stale: u64,
    /// Stored, not listed, and gone from Clerk (404): deleted and tombstoned.
    pub deleted: u64,
}

/// The summary of a run: `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub users: Counts,
    /// Wall time of the run.
    pub seconds: f64,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// The `reconcile_runs` id (also part of the svix-ids the run records).
    pub run_id: String,
    pub dry_run: bool,
    pub summary: Summary,
    /// Why the tables may not match the listing; `None` when they do.
    pub failure: Option<String>,
}

impl Report {
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// The one-paragraph summary for a person.
    pub fn paragraph(&self) -> String {
        let c = &self.summary.users;
        let verb = if self.dry_run {
            "Dry run, nothing written: would have"
        } else {
            "Users:"
        };
        let end = match &self.failure {
            None => "The tables match Clerk.".to_owned(),
            Some(why) => format!("FAILED: {why}"),
        };
        format!(
            "Reconcile {} in {:.1} s. {verb} {} listed, {} created, {} updated, {} unchanged, \
             {} stale, {} deleted. {end}",
            self.run_id,
            self.summary.seconds,
            c.listed,
            c.created,
            c.updated,
            c.unchanged,
            c.stale,
            c.deleted
        )
    }
}

/// `worker reconcile`: loads the settings it needs, runs once, prints the summary. An error when
/// the run failed (after the summary was printed), so the process exits non-zero.
pub async fn execute(settings: &shared::Settings, args: ReconcileArgs) -> anyhow::Result<()> {
    let clerk = ClerkConfig::from_settings(settings)?;
    let client = ClerkClient::new(clerk).context("cannot set up the Backend API client")?;
    let db = crate::startup::connect_command(settings, WRITERS as u32 + 1).await?;
    let options = Options {
        progress_bar: args.shows_bar(settings),
        dry_run: args.dry_run,
        delete: !args.no_delete,
        max_delete: args.max_delete,
        trigger: Trigger::Command,
        roles: settings.roles()?,
        store_payloads: settings.worker_store_payloads,
    };
    let report = reconcile(&db, &client, &options).await;
    db.close().await.ok();
    if args.json {
        println!("{}", serde_json::to_string(&report.summary)?);
    } else {
        println!("{}", report.paragraph());
    }
    match report.failure {
        None => Ok(()),
        Some(why) => Err(anyhow::anyhow!("reconcile failed: {why}")),
    }
}

/// Runs one reconcile and records it in `reconcile_runs` (unless dry). Never panics and never
/// returns early without a report: every failure ends up in [`Report::failure`].
pub async fn reconcile(db: &DatabaseConnection, client: &ClerkClient, options: &Options) -> Report {
    let run_id = format!(
        "{}_{}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let span = tracing::info_span!("reconcile", run_id = %run_id, dry_run = options.dry_run);
    run(db, client, options, run_id).instrument(span).await
}

async fn run(
    db: &DatabaseConnection,
    client: &ClerkClient,
    options: &Options,
    run_id: String,
) -> Report {
    let started = Instant::now();
    if !options.dry_run
        && let Err(error) = runs::start(db, &run_id, options.trigger).await
    {
        return Report {
            run_id,
            dry_run: options.dry_run,
            summary: Summary {
                users: Counts::default(),
                seconds: started.elapsed().as_secs_f64(),
            },
            failure: Some(format!("cannot record the run in reconcile_runs: {error}")),
        };
    }
    let mut users = UsersPass {
        db,
        client,
        options,
        run_id: &run_id,
        counts: Counts::default(),
        listed: HashSet::new(),
        unreadable: Vec::new(),
        failed: Vec::new(),
    };
    let failure = users.run().await.err();
    let summary = Summary {
        users: users.counts,
        seconds: started.elapsed().as_secs_f64(),
    };
    if !options.dry_run
        && let Err(error) = runs::finish(
            db,
            &run_id,
            json!({ "users": summary.users }),
            failure.as_deref(),
        )
        .await
    {
        tracing::error!(%error, "cannot record the end of the run in reconcile_runs");
    }
    match &failure {
        None => tracing::info!(?summary, "reconcile finished"),
        Some(why) => tracing::error!(?summary, reason = %why, "reconcile failed"),
    }
    Report {
        run_id,
        dry_run: options.dry_run,
        summary,
        failure,
    }
}

/// What a page's users are in Postgres before anything is written.
struct Stored {
    updated_at: Option<DateTime<Utc>>,
    tombstoned: bool,
}

/// Where a listed user goes, decided from what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Create,
    Update,
}

/// The users pass of one run.
struct UsersPass<'a> {
    db: &'a DatabaseConnection,
    client: &'a ClerkClient,
    options: &'a Options,
    run_id: &'a str,
    counts: Counts,
    /// Every id the listing returned: what is not in here is a deletion candidate.
    listed: HashSet<String>,
    /// Listed users that cannot be read as a user (the reason of each).
    unreadable: Vec<String>,
    /// Users whose write failed on their own account.
    failed: Vec<String>,
}

impl UsersPass<'_> {
    async fn run(&mut self) -> Result<(), String> {
        let stored_rows = count_users(self.db)
            .await
            .map_err(|e| format!("cannot count the stored users: {e}"))?;
        let total = self.client.count_users().await.map_err(|e| e.to_string())?;
        let mut progress =
            progress::Progress::new(self.options.progress_bar, "reconciling", "users", total);
        let mut pages = self.client.users(PAGE_SIZE);
        let mut current = pages.next().await;
        loop {
            match current {
                Ok(Some(page)) => {
                    let n = page.len() as u64;
                    // The next page is fetched while this one is applied.
                    let (applied, next) = tokio::join!(self.apply_users(page, true), pages.next());
                    applied?;
                    progress.advance(n);
                    current = next;
                }
                Ok(None) => break,
                Err(error) => {
                    return Err(format!(
                        "the listing did not complete ({} users listed): {error}; nothing was \
                         deleted",
                        self.counts.listed
                    ));
                }
            }
        }
        if self.options.delete {
            self.delete_missing(stored_rows, &mut progress).await?;
        }
        if !self.failed.is_empty() {
            return Err(format!(
                "{} users could not be written, e.g. {}",
                self.failed.len(),
                self.failed[0]
            ));
        }
        if !self.unreadable.is_empty() {
            return Err(format!(
                "{} listed users could not be read and were left as they are, e.g. {}",
                self.unreadable.len(),
                self.unreadable[0]
            ));
        }
        Ok(())
    }

    /// Compares users with what is stored and writes those that are newer. `listing` is false
    /// for users fetched one by one in the deletion phase, which are not counted as listed.
    async fn apply_users(&mut self, users: Vec<Value>, listing: bool) -> Result<(), String> {
        // Keyed by id: a user listed twice (pages shift while users sign up) is applied once,
        // in its last version.
        let mut events: HashMap<String, Event> = HashMap::with_capacity(users.len());
        for user in users {
            let id = user.get("id").and_then(Value::as_str).map(str::to_owned);
            if listing {
                self.counts.listed += 1;
                if let Some(id) = &id {
                    self.listed.insert(id.clone());
                }
            }
            match self.upsert_event(user) {
                Ok((id, event)) => {
                    events.insert(id, event);
                }
                Err(reason) => {
                    tracing::warn!(user_id = ?id, %reason, "a listed user cannot be read; left as it is");
                    self.unreadable
                        .push(format!("{}: {reason}", id.as_deref().unwrap_or("(no id)")));
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = events.keys().cloned().collect();
        let stored = self.stored(ids).await?;
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        for (id, event) in events {
            let Action::Upsert(record) = &event.action else {
                continue;
            };
            let change = match stored.get(&id) {
                Some(Stored {
                    tombstoned: true, ..
                }) => None,
                Some(Stored {
                    updated_at: Some(at),
                    ..
                }) if *at == record.updated_at => {
                    self.counts.unchanged += 1;
                    continue;
                }
                Some(Stored {
                    updated_at: Some(at),
                    ..
                }) if *at > record.updated_at => None,
                Some(Stored {
                    updated_at: Some(_),
                    ..
                }) => Some(Change::Update),
                _ => Some(Change::Create),
            };
            match change {
                None => self.counts.stale += 1,
                Some(change) => {
                    writes.push(event);
                    changes.push(change);
                }
            }
        }
        if self.options.dry_run {
            for change in changes {
                self.count_change(change);
            }
            return Ok(());
        }
        let outcomes = self.write(&writes).await?;
        for (change, outcome) in changes.into_iter().zip(outcomes) {
            match outcome {
                Some(Outcome::Applied) => self.count_change(change),
                // A webhook got there first with a newer version (or a delete).
                Some(Outcome::Stale) => self.counts.stale += 1,
                Some(Outcome::Duplicate | Outcome::Ignored) => self.counts.unchanged += 1,
                None => {}
            }
        }
        Ok(())
    }

    fn count_change(&mut self, change: Change) {
        match change {
            Change::Create => self.counts.created += 1,
            Change::Update => self.counts.updated += 1,
        }
    }

    /// A listed user as the `user.updated` event a webhook would have delivered, read by the
    /// same code as a delivery.
    fn upsert_event(&self, user: Value) -> Result<(String, Event), String> {
        let id = user
            .get("id")
            .and_then(Value::as_str)
            .ok_or("no id")?
            .to_owned();
        let body = json!({ "type": UPSERT_TYPE, "object": "event", "data": user });
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let properties = BasicProperties::default().with_message_id(self.svix_id(&id).into());
        let mut event =
            Event::read(&body, &properties, &self.options.roles).map_err(|e| e.to_string())?;
        event.source = Source::Reconcile;
        if !self.options.store_payloads {
            event = event.without_payload();
        }
        Ok((id, event))
    }

    /// The svix-id recorded for this run's event about `user_id`: never one Svix would send,
    /// and unique per run, so a second run applies again.
    fn svix_id(&self, user_id: &str) -> String {
        format!("reconcile_{}_{user_id}", self.run_id)
    }

    /// Stored `updated_at` and tombstone of each id.
    async fn stored(&self, ids: Vec<String>) -> Result<HashMap<String, Stored>, String> {
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT ids.id, users.updated_at, (user_tombstones.id IS NOT NULL) AS tombstoned \
             FROM unnest($1::text[]) AS ids(id) \
             LEFT JOIN users ON users.id = ids.id \
             LEFT JOIN user_tombstones ON user_tombstones.id = ids.id",
            [ids.into()],
        );
        let rows = retry_database("reading the stored users", || {
            self.db.query_all_raw(statement.clone())
        })
        .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in rows {
            let read = || -> Result<(String, Stored), DbErr> {
                Ok((
                    row.try_get("", "id")?,
                    Stored {
                        updated_at: row.try_get("", "updated_at")?,
                        tombstoned: row.try_get("", "tombstoned")?,
                    },
                ))
            };
            let (id, entry) = read().map_err(|e| format!("reading the stored users: {e}"))?;
            stored.insert(id, entry);
        }
        Ok(stored)
    }

    /// Applies events in [`WRITERS`] transactions at once (a page's users are distinct, so they
    /// do not wait on each other's locks), keeping their order in the outcomes. `None` for an
    /// event that failed on its own account.
    async fn write(&mut self, events: &[Event]) -> Result<Vec<Option<Outcome>>, String> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let size = events.len().div_ceil(WRITERS);
        let written =
            futures_util::future::join_all(events.chunks(size).map(|chunk| write(self.db, chunk)))
                .await;
        let mut outcomes = Vec::with_capacity(events.len());
        for chunk in written {
            let (chunk_outcomes, failed) = chunk?;
            outcomes.extend(chunk_outcomes);
            self.failed.extend(failed);
        }
        Ok(outcomes)
    }

    /// The deletion phase: every stored user that was not listed is asked for on its own; the
    /// ones Clerk answers 404 for are deleted, unless there are more than the limit.
    async fn delete_missing(
        &mut self,
        stored_rows: u64,
        progress: &mut progress::Progress,
    ) -> Result<(), String> {
        let limit = self.options.max_delete.limit(stored_rows);
        let statement = Statement::from_string(DbBackend::Postgres, "SELECT id FROM users");
        let rows = retry_database("reading the stored user ids", || {
            self.db.query_all_raw(statement.clone())
        })
        .await?;
        let mut candidates = Vec::new();
        for row in rows {
            let id: String = row
                .try_get("", "id")
                .map_err(|e| format!("reading the stored user ids: {e}"))?;
            if !self.listed.contains(&id) {
                candidates.push(id);
            }
        }
        if candidates.is_empty() {
            return Ok(());
        }
        progress.phase(
            "confirming the users missing from the listing",
            candidates.len() as u64,
        );
        let mut gone = Vec::new();
        let mut still_there = Vec::new();
        for (checked, id) in candidates.iter().enumerate() {
            match self.client.user(id).await {
                Ok(None) => gone.push(id.clone()),
                Ok(Some(user)) => still_there.push(user),
                Err(error) => {
                    return Err(format!(
                        "confirming a user missing from the listing failed: {error}; nothing \
                         was deleted"
                    ));
                }
            }
            progress.advance(1);
            if gone.len() as u64 > limit {
                return Err(format!(
                    "the deletion phase would remove more than {limit} users (--max-delete {}): \
                     {} of the first {} of {} stored users missing from the listing are gone \
                     from Clerk; nothing was deleted. A key of another Clerk instance looks like \
                     this; if the deletions are meant, run again with a higher --max-delete",
                    self.options.max_delete,
                    gone.len(),
                    checked + 1,
                    candidates.len()
                ));
            }
        }
        // Users that an offset walk skipped, or that signed up while the listing ran.
        for chunk in still_there.chunks(PAGE_SIZE as usize) {
            self.apply_users(chunk.to_vec(), false).await?;
        }
        if self.options.dry_run {
            self.counts.deleted += gone.len() as u64;
            return Ok(());
        }
        for chunk in gone.chunks(PAGE_SIZE as usize) {
            let events: Vec<Event> = chunk
                .iter()
                .map(|id| Event {
                    svix_id: self.svix_id(id),
                    event_type: DELETE_TYPE.to_owned(),
                    action: Action::Delete { id: id.clone() },
                    source: Source::Reconcile,
                    payload: None,
                    svix_timestamp: None,
                    received_at: None,
                })
                .collect();
            let outcomes = self.write(&events).await?;
            self.counts.deleted += outcomes
                .iter()
                .filter(|o| **o == Some(Outcome::Applied))
                .count() as u64;
        }
        Ok(())
    }
}

/// Applies events in one transaction, retrying it while the database fails on its own account;
/// when one event fails on its own, the events are applied one by one so only that one fails
/// (and is named in the second list). Also `worker replay` and `worker rebuild`'s way to apply.
pub(crate) async fn write<C: TransactionTrait>(
    db: &C,
    events: &[Event],
) -> Result<(Vec<Option<Outcome>>, Vec<String>), String> {
    let mut retries = 0;
    loop {
        match apply::apply_batch(db, events).await {
            Ok(outcomes) => return Ok((outcomes.into_iter().map(Some).collect(), Vec::new())),
            Err(BatchFailure::Transient(error)) if retries < DATABASE_RETRIES => {
                retries += 1;
                let delay = Duration::from_millis(200) * 2u32.pow(retries);
                tracing::warn!(%error, retries, next_attempt_in = ?delay, "database failure, retrying the batch");
                tokio::time::sleep(delay).await;
            }
            Err(BatchFailure::Transient(error)) => {
                return Err(format!("the database kept failing: {error}"));
            }
            Err(BatchFailure::Event(error)) => {
                tracing::warn!(%error, "an event of the batch failed; applying them one by one");
                let mut outcomes = Vec::with_capacity(events.len());
                let mut failed = Vec::new();
                for event in events {
                    match apply::apply(db, event).await {
                        Ok(outcome) => outcomes.push(Some(outcome)),
                        Err(error) => {
                            let user = event.action.user_id().unwrap_or_default();
                            tracing::error!(user_id = %user, %error, "cannot write a user");
                            failed.push(format!("{user}: {error}"));
                            outcomes.push(None);
                        }
                    }
                }
                return Ok((outcomes, failed));
            }
        }
    }
}

async fn count_users(db: &DatabaseConnection) -> Result<u64, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM users",
        ))
        .await?;
    let n: i64 = match row {
        Some(row) => row.try_get("", "n")?,
        None => 0,
    };
    Ok(n.max(0) as u64)
}

/// Runs a read again while the database fails on its own account, a bounded number of times.
async fn retry_database<T, F, Fut>(what: &str, mut read: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbErr>>,
{
    let mut retries = 0;
    loop {
        match read().await {
            Ok(value) => return Ok(value),
            Err(error)
                if retries < DATABASE_RETRIES
                    && apply::classify(&error) == apply::DbFailure::Transient =>
            {
                retries += 1;
                let delay = Duration::from_millis(200) * 2u32.pow(retries);
                tracing::warn!(%error, retries, next_attempt_in = ?delay, "database failure while {what}, retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(format!("{what}: {error}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_delete_reads_rows_and_percentages() {
        assert_eq!("250".parse::<MaxDelete>(), Ok(MaxDelete::Rows(250)));
        assert_eq!("25%".parse::<MaxDelete>(), Ok(MaxDelete::Percent(25.0)));
        assert!("-3".parse::<MaxDelete>().is_err());
        assert!("150%".parse::<MaxDelete>().is_err());
        assert!("many".parse::<MaxDelete>().is_err());
    }

    #[test]
    fn the_default_limit_is_a_tenth_of_the_table_and_at_least_ten() {
        let default = MaxDelete::default();
        assert_eq!(default.limit(0), 10);
        assert_eq!(default.limit(50), 10);
        assert_eq!(default.limit(1_000), 100);
        assert_eq!(MaxDelete::Rows(3).limit(1_000), 3);
        assert_eq!(default.to_string(), "10%");
    }

    #[test]
    fn the_json_summary_has_the_documented_shape() {
        let summary = Summary {
            users: Counts {
                listed: 3,
                created: 1,
                updated: 1,
                unchanged: 1,
                stale: 0,
                deleted: 2,
            },
            seconds: 1.5,
        };
        assert_eq!(
            serde_json::to_value(&summary).expect("json"),
            json!({"users": {"listed": 3, "created": 1, "updated": 1, "unchanged": 1,
                             "stale": 0, "deleted": 2}, "seconds": 1.5})
        );
    }
}
