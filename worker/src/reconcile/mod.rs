//! `worker reconcile`: brings the tables to what Clerk's Backend API holds, for what no webhook
//! brought (users or organizations created before the endpoint existed, an outage longer than
//! Svix's retries, a purged dead letter).
//!
//! A run has one pass per [`Kind`], in this order: users, organizations, memberships (a
//! membership carries an organization snapshot, so its organization is best settled first).
//! Each pass:
//! 1. The listing, page by page, 500 a page: users with the `starting_after` cursor (after
//!    `GET /v1/users/count`, the bar's length and the first check of the key), organizations
//!    and memberships (`GET /v1/organizations`, `GET /v1/organization_memberships`) by offset.
//!    A page's stored versions and tombstones are read first: an object whose stored
//!    `updated_at` equals the listed one is `unchanged` and not written (that is what makes a
//!    run with nothing to do fast), an older listed version or a tombstoned object is `stale`.
//!    The rest go through [`apply_batch`](crate::apply::apply_batch) as the `.updated` event a
//!    webhook would have delivered, read from the listed JSON by [`Event::read`] like any
//!    delivery (so the same mapping and the same rules apply), with a svix-id of their own per
//!    run and object (all made by one function, `reconcile_event`), a page split into
//!    [`WRITERS`] transactions applied at once.
//! 2. Only after a complete listing: every stored object that was not listed is confirmed on
//!    its own: `GET /v1/users/{id}` or `GET /v1/organizations/{id}` answering 404, or, for a
//!    membership, its organization's memberships of its user not holding its id (404 for the
//!    organization counts as gone too). A gone object makes the `.deleted` event (row deleted,
//!    tombstone written; an organization's memberships go with it); one still there is applied
//!    instead. When more objects of the kind would be deleted than `--max-delete` allows,
//!    nothing of the kind is deleted and the run fails: a key of another instance lists none
//!    of the stored objects and answers 404 for all of them.
//!
//! A listing that did not complete deletes nothing of its kind and fails the run; a pass that
//! fails (that, a refused key, the deletion limit) ends the run, and the passes after it do not
//! run. Objects that could not be read or written fail the run too, but only once every pass
//! has run.

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
use futures_util::FutureExt as _;
use lapin::BasicProperties;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use shared::Roles;
use tracing::Instrument as _;

use crate::apply::{self, BatchFailure, Outcome};
use crate::event::{Action, Event, Source};
use crate::organizations;

pub use clerk::{ClerkClient, ClerkConfig, ClerkError};
pub use runs::Trigger;
pub use schedule::ScheduledReconcile;

/// Objects asked for per page: Clerk's largest, so the fewest requests.
pub const PAGE_SIZE: u32 = clerk::MAX_PAGE;

/// The kinds of object a run converges, in the order it walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Users,
    Organizations,
    Memberships,
}

impl Kind {
    /// Every kind, in the order of a run.
    pub const ALL: [Kind; 3] = [Kind::Users, Kind::Organizations, Kind::Memberships];

    /// The key in the summary and in `reconcile_runs.counts`, and the metrics' `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Users => "users",
            Kind::Organizations => "organizations",
            Kind::Memberships => "memberships",
        }
    }

    /// The type a listed object is applied as: a listed object is Clerk's current version,
    /// which is what an `.updated` event carries.
    fn upsert_type(self) -> &'static str {
        match self {
            Kind::Users => "user.updated",
            Kind::Organizations => "organization.updated",
            Kind::Memberships => "organizationMembership.updated",
        }
    }

    fn delete_type(self) -> &'static str {
        match self {
            Kind::Users => "user.deleted",
            Kind::Organizations => "organization.deleted",
            Kind::Memberships => "organizationMembership.deleted",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Kind::Users => "users",
            Kind::Organizations => "organizations",
            Kind::Memberships => "organization_memberships",
        }
    }

    /// The `data` of the `.deleted` event Clerk sends for an object of this kind: `{object,
    /// id, deleted}` for users and organizations; for a membership the membership itself, of
    /// which the delete rules need only the ids.
    fn deleted_data(self, candidate: &Candidate) -> Value {
        match self {
            Kind::Users => json!({"object": "user", "id": candidate.id, "deleted": true}),
            Kind::Organizations => {
                json!({"object": "organization", "id": candidate.id, "deleted": true})
            }
            Kind::Memberships => json!({
                "object": "organization_membership", "id": candidate.id,
                "organization": {"id": candidate.organization_id},
                "public_user_data": {"user_id": candidate.user_id},
            }),
        }
    }
}

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
    /// Skip the deletion phases: users, organizations and memberships missing from Clerk stay.
    #[arg(long)]
    pub no_delete: bool,
    /// The most rows each deletion phase (users, organizations, memberships) may remove: a
    /// number (`250`) or a share of the table (`25%`). Default: 10 % of the table, at least 10.
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
    /// The least a percentage allows, so a small table can lose a few rows.
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
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub users: Counts,
    pub organizations: Counts,
    pub memberships: Counts,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Summary {
    /// The counts of one kind.
    pub fn of(&self, kind: Kind) -> &Counts {
        match kind {
            Kind::Users => &self.users,
            Kind::Organizations => &self.organizations,
            Kind::Memberships => &self.memberships,
        }
    }

    fn of_mut(&mut self, kind: Kind) -> &mut Counts {
        match kind {
            Kind::Users => &mut self.users,
            Kind::Organizations => &mut self.organizations,
            Kind::Memberships => &mut self.memberships,
        }
    }

    /// What `reconcile_runs.counts` holds: the counts of every kind, by name.
    fn counts_json(&self) -> Value {
        Value::Object(
            Kind::ALL
                .iter()
                .map(|&kind| (kind.name().to_owned(), json!(self.of(kind))))
                .collect(),
        )
    }
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
        let dry = if self.dry_run {
            " Dry run, nothing written: these are the changes it would have made."
        } else {
            ""
        };
        let kinds: String = Kind::ALL
            .iter()
            .map(|&kind| {
                let c = self.summary.of(kind);
                let name = kind.name();
                let capital = name[..1].to_uppercase() + &name[1..];
                format!(
                    " {capital}: {} listed, {} created, {} updated, {} unchanged, {} stale, {} \
                     deleted.",
                    c.listed, c.created, c.updated, c.unchanged, c.stale, c.deleted
                )
            })
            .collect();
        let end = match &self.failure {
            None => "The tables match Clerk.".to_owned(),
            Some(why) => format!("FAILED: {why}"),
        };
        format!(
            "Reconcile {} in {:.1} s.{dry}{kinds} {end}",
            self.run_id, self.summary.seconds
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
    let mut summary = Summary::default();
    if !options.dry_run
        && let Err(error) = runs::start(db, &run_id, options.trigger).await
    {
        summary.seconds = started.elapsed().as_secs_f64();
        return Report {
            run_id,
            dry_run: options.dry_run,
            summary,
            failure: Some(format!("cannot record the run in reconcile_runs: {error}")),
        };
    }
    let mut reasons = Vec::new();
    let mut dry_deleted = HashSet::new();
    for kind in Kind::ALL {
        let mut pass = Pass::new(kind, db, client, options, &run_id, &dry_deleted);
        let result = pass.run().await;
        *summary.of_mut(kind) = pass.counts;
        let shortfalls = pass.shortfalls();
        let would_delete = std::mem::take(&mut pass.would_delete);
        dry_deleted.extend(would_delete);
        if let Err(why) = result {
            reasons.push(why);
            reasons.extend(shortfalls);
            break;
        }
        reasons.extend(shortfalls);
    }
    let failure = (!reasons.is_empty()).then(|| reasons.join("; "));
    summary.seconds = started.elapsed().as_secs_f64();
    if !options.dry_run
        && let Err(error) =
            runs::finish(db, &run_id, summary.counts_json(), failure.as_deref()).await
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

/// What a page's objects are in Postgres before anything is written.
struct Stored {
    updated_at: Option<DateTime<Utc>>,
    /// The object, or one it hangs on (a membership's organization or user), has a tombstone.
    tombstoned: bool,
}

/// A page read as events and compared with what is stored, before anything is counted or
/// written.
struct Prepared {
    /// The page's objects.
    objects: u64,
    /// The id of each listed object (`None`: it has none); empty outside the listing.
    listed: Vec<Option<String>>,
    unreadable: Vec<String>,
    /// The events newer than what is stored, with the change each makes.
    writes: Vec<Event>,
    changes: Vec<Change>,
    unchanged: u64,
    stale: u64,
}

/// The outcome of each write (`None`: it failed on its own account) and the reasons of the
/// failed ones.
type Written = Result<(Vec<Option<Outcome>>, Vec<String>), String>;

/// Where a listed object goes, decided from what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Create,
    Update,
}

/// A stored object missing from the listing, with what its own GET needs.
struct Candidate {
    id: String,
    /// A membership's organization and user; `None` for the other kinds.
    organization_id: Option<String>,
    user_id: Option<String>,
}

/// Pages of a listing: users have a cursor, organizations and memberships an offset.
enum Listing<'a> {
    Cursor(clerk::UserPages<'a>),
    Offset(clerk::OffsetPages<'a>),
}

impl Listing<'_> {
    #[tracing::instrument(name = "fetch page", level = "info", skip_all)]
    async fn next(&mut self) -> Result<Option<Vec<Box<RawValue>>>, ClerkError> {
        match self {
            Listing::Cursor(pages) => pages.next().await,
            Listing::Offset(pages) => pages.next().await,
        }
    }

    /// The listing's own count, once a page was fetched (offset listings only).
    fn total(&self) -> Option<u64> {
        match self {
            Listing::Cursor(_) => None,
            Listing::Offset(pages) => pages.total(),
        }
    }
}

/// The pass of one kind of object in one run.
struct Pass<'a> {
    kind: Kind,
    db: &'a DatabaseConnection,
    client: &'a ClerkClient,
    options: &'a Options,
    run_id: &'a str,
    counts: Counts,
    /// Every id the listing returned: what is not in here is a deletion candidate.
    listed: HashSet<String>,
    /// Listed objects that cannot be read as their kind (the reason of each).
    unreadable: Vec<String>,
    /// Objects whose write failed on their own account.
    failed: Vec<String>,
    /// In a dry run, the ids the earlier passes counted as deleted: a real run would have
    /// removed their memberships with them, so the memberships pass does not count those again.
    deleted_before: &'a HashSet<String>,
    /// In a dry run, the ids this pass counted as deleted.
    would_delete: Vec<String>,
}

impl<'a> Pass<'a> {
    fn new(
        kind: Kind,
        db: &'a DatabaseConnection,
        client: &'a ClerkClient,
        options: &'a Options,
        run_id: &'a str,
        deleted_before: &'a HashSet<String>,
    ) -> Self {
        Self {
            kind,
            db,
            client,
            options,
            run_id,
            counts: Counts::default(),
            listed: HashSet::new(),
            unreadable: Vec::new(),
            failed: Vec::new(),
            deleted_before,
            would_delete: Vec::new(),
        }
    }

    /// The listing, then the deletion phase. An error ends the run (the passes after this one
    /// do not run); objects that could not be read or written do not: see [`Pass::shortfalls`].
    async fn run(&mut self) -> Result<(), String> {
        let name = self.kind.name();
        let stored_rows = retry_database(&format!("counting the stored {name}"), || {
            count_rows(self.db, self.kind)
        })
        .await?;
        // Users are counted first (also the first check of the key); the other listings say
        // their count on every page.
        let counted = match self.kind {
            Kind::Users => Some(self.client.count_users().await.map_err(|e| e.to_string())?),
            Kind::Organizations | Kind::Memberships => None,
        };
        let mut pages = match self.kind {
            Kind::Users => Listing::Cursor(self.client.users(PAGE_SIZE)),
            Kind::Organizations => Listing::Offset(self.client.organizations(PAGE_SIZE)),
            Kind::Memberships => Listing::Offset(self.client.memberships(PAGE_SIZE)),
        };
        let mut current = pages.next().await;
        let total = counted.or(pages.total()).unwrap_or(0);
        let mut progress =
            progress::Progress::new(self.options.progress_bar, "reconciling", name, total);
        // Three pages at once: one written, the next compared with what is stored, the one
        // after fetched. A page's writes would otherwise wait for the comparison, a single
        // statement that keeps one core busy while the other idles.
        let mut compared: Option<Prepared> = None;
        loop {
            let page = match current {
                Ok(page) => page,
                Err(error) => {
                    // What was listed before the failure is still written.
                    if let Some(mut prepared) = compared.take() {
                        let written = self
                            .write_prepared(std::mem::take(&mut prepared.writes))
                            .await;
                        self.absorb_written(prepared, written)?;
                    }
                    return Err(format!(
                        "the {name} listing did not complete ({} {name} listed): {error}; no \
                         {name} were deleted",
                        self.counts.listed
                    ));
                }
            };
            if page.is_none() && compared.is_none() {
                break;
            }
            let mut writing = compared.take();
            let writes = writing.as_mut().map(|p| std::mem::take(&mut p.writes));
            let (written, (next_compared, next)) = tokio::join!(
                async {
                    match writes {
                        Some(writes) => Some(self.write_prepared(writes).await),
                        None => None,
                    }
                },
                async {
                    match page {
                        Some(objects) => {
                            tokio::join!(self.prepare(objects, true).map(Some), pages.next())
                        }
                        None => (None, Ok(None)),
                    }
                },
            );
            if let (Some(prepared), Some(written)) = (writing, written) {
                progress.advance(prepared.objects);
                self.absorb_written(prepared, written)?;
            }
            if let Some(prepared) = next_compared {
                compared = Some(self.absorb_compared(prepared?));
            }
            current = next;
        }
        if self.options.delete {
            self.delete_missing(stored_rows, &mut progress).await?;
        }
        Ok(())
    }

    /// Why the tables may still differ from the listing although the pass ran to its end.
    fn shortfalls(&self) -> Vec<String> {
        let name = self.kind.name();
        let mut shortfalls = Vec::new();
        if let Some(first) = self.failed.first() {
            shortfalls.push(format!(
                "{} {name} could not be written, e.g. {first}",
                self.failed.len()
            ));
        }
        if let Some(first) = self.unreadable.first() {
            shortfalls.push(format!(
                "{} listed {name} could not be read and were left as they are, e.g. {first}",
                self.unreadable.len()
            ));
        }
        shortfalls
    }

    /// Compares objects with what is stored and writes those that are newer. `listing` is
    /// false for objects fetched one by one in the deletion phase, which are not counted as
    /// listed.
    async fn apply_objects(
        &mut self,
        objects: Vec<Box<RawValue>>,
        listing: bool,
    ) -> Result<(), String> {
        let prepared = self.prepare(objects, listing).await?;
        let mut prepared = self.absorb_compared(prepared);
        let written = self
            .write_prepared(std::mem::take(&mut prepared.writes))
            .await;
        self.absorb_written(prepared, written)
    }

    /// Reads objects as events and compares them with what is stored; writes nothing and
    /// changes no count (see [`Pass::absorb_compared`]), so that it can run while an earlier
    /// page is written.
    #[tracing::instrument(
        name = "compare page",
        level = "info",
        skip_all,
        fields(kind = self.kind.name(), objects = objects.len())
    )]
    async fn prepare(
        &self,
        objects: Vec<Box<RawValue>>,
        listing: bool,
    ) -> Result<Prepared, String> {
        let mut prepared = Prepared {
            objects: objects.len() as u64,
            listed: Vec::new(),
            unreadable: Vec::new(),
            writes: Vec::new(),
            changes: Vec::new(),
            unchanged: 0,
            stale: 0,
        };
        // Keyed by id: an object listed twice (pages shift while objects are created) is
        // applied once, in its last version.
        let mut events: HashMap<String, Event> = HashMap::with_capacity(objects.len());
        for object in objects {
            let id = clerk::object_id(&object);
            if listing {
                prepared.listed.push(id.clone());
            }
            match reconcile_event(self.run_id, self.options, self.kind.upsert_type(), &object) {
                Ok((id, event)) => {
                    events.insert(id, event);
                }
                Err(reason) => {
                    tracing::warn!(kind = self.kind.name(), id = ?id, %reason, "a listed object cannot be read; left as it is");
                    prepared
                        .unreadable
                        .push(format!("{}: {reason}", id.as_deref().unwrap_or("(no id)")));
                }
            }
        }
        if events.is_empty() {
            return Ok(prepared);
        }
        let stored = self.stored(&events).await?;
        for (id, event) in events {
            let Some(listed_at) = version(&event.action) else {
                continue;
            };
            let change = match stored.get(&id) {
                Some(Stored {
                    tombstoned: true, ..
                }) => None,
                Some(Stored {
                    updated_at: Some(at),
                    ..
                }) if *at == listed_at => {
                    prepared.unchanged += 1;
                    continue;
                }
                Some(Stored {
                    updated_at: Some(at),
                    ..
                }) if *at > listed_at => None,
                Some(Stored {
                    updated_at: Some(_),
                    ..
                }) => Some(Change::Update),
                _ => Some(Change::Create),
            };
            match change {
                None => prepared.stale += 1,
                Some(change) => {
                    prepared.writes.push(event);
                    prepared.changes.push(change);
                }
            }
        }
        Ok(prepared)
    }

    /// Counts what a comparison found; returns what is left to write.
    fn absorb_compared(&mut self, mut prepared: Prepared) -> Prepared {
        self.counts.listed += prepared.listed.len() as u64;
        self.listed.extend(prepared.listed.drain(..).flatten());
        self.unreadable.append(&mut prepared.unreadable);
        self.counts.unchanged += prepared.unchanged;
        self.counts.stale += prepared.stale;
        prepared
    }

    /// Writes what a comparison found newer (nothing in a dry run).
    async fn write_prepared(&self, writes: Vec<Event>) -> Written {
        if self.options.dry_run {
            return Ok((vec![Some(Outcome::Applied); writes.len()], Vec::new()));
        }
        self.write(writes).await
    }

    /// Counts what the writes of a comparison did.
    fn absorb_written(&mut self, prepared: Prepared, written: Written) -> Result<(), String> {
        let (outcomes, failed) = written?;
        self.failed.extend(failed);
        for (change, outcome) in prepared.changes.into_iter().zip(outcomes) {
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

    /// Stored `updated_at` of each id, and whether it, or what it hangs on, is tombstoned (ids
    /// never collide across kinds: Clerk prefixes them).
    async fn stored(
        &self,
        events: &HashMap<String, Event>,
    ) -> Result<HashMap<String, Stored>, String> {
        let batch: Vec<Value> = events
            .iter()
            .map(|(id, event)| json!({"id": id, "locks": event.action.lock_ids()}))
            .collect();
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT b.id, t.updated_at, \
                   EXISTS (SELECT 1 FROM user_tombstones WHERE id = ANY (b.locks)) \
                   OR EXISTS (SELECT 1 FROM organization_tombstones WHERE id = ANY (b.locks)) \
                   OR EXISTS (SELECT 1 FROM membership_tombstones WHERE id = ANY (b.locks)) \
                     AS tombstoned \
                 FROM jsonb_to_recordset($1::jsonb) AS b(id text, locks text[]) \
                 LEFT JOIN {} AS t ON t.id = b.id",
                self.kind.table()
            ),
            [Value::Array(batch).into()],
        );
        let what = format!("reading the stored {}", self.kind.name());
        let rows = retry_database(&what, || self.db.query_all_raw(statement.clone())).await?;
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
            let (id, entry) = read().map_err(|e| format!("{what}: {e}"))?;
            stored.insert(id, entry);
        }
        Ok(stored)
    }

    /// Applies events in [`WRITERS`] transactions at once (a page's objects are distinct; those
    /// that share a lock, like memberships of one organization, wait for each other), keeping
    /// their order in the outcomes. `None` for an event that failed on its own account. Each
    /// transaction is a task of its own, so that building its statements (serializing the
    /// rows) runs on every core rather than on the one that polls the pass.
    async fn write(&self, events: Vec<Event>) -> Written {
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let size = events.len().div_ceil(WRITERS);
        let mut events = events.into_iter();
        let tasks: Vec<_> = std::iter::from_fn(|| {
            let chunk: Vec<Event> = events.by_ref().take(size).collect();
            (!chunk.is_empty()).then(|| {
                let db = self.db.clone();
                tokio::spawn(async move { write(&db, &chunk).await }.in_current_span())
            })
        })
        .collect();
        let mut outcomes = Vec::new();
        let mut failed = Vec::new();
        for task in tasks {
            let (chunk_outcomes, chunk_failed) = task
                .await
                .map_err(|error| format!("a write task failed: {error}"))??;
            outcomes.extend(chunk_outcomes);
            failed.extend(chunk_failed);
        }
        Ok((outcomes, failed))
    }

    /// The deletion phase: every stored object that was not listed is asked for on its own; the
    /// ones Clerk no longer has are deleted, unless there are more than the limit.
    async fn delete_missing(
        &mut self,
        stored_rows: u64,
        progress: &mut progress::Progress,
    ) -> Result<(), String> {
        let name = self.kind.name();
        let limit = self.options.max_delete.limit(stored_rows);
        let candidates = self.missing().await?;
        if candidates.is_empty() {
            return Ok(());
        }
        progress.phase(
            &format!("confirming the {name} missing from the listing"),
            candidates.len() as u64,
        );
        let mut gone = Vec::new();
        let mut still_there = Vec::new();
        for (checked, candidate) in candidates.iter().enumerate() {
            match self.confirm(candidate).await {
                Ok(None) => gone.push(candidate),
                Ok(Some(object)) => still_there
                    .push(serde_json::value::to_raw_value(&object).map_err(|e| e.to_string())?),
                Err(error) => {
                    return Err(format!(
                        "confirming the {name} missing from the listing failed: {error}; no \
                         {name} were deleted"
                    ));
                }
            }
            progress.advance(1);
            if gone.len() as u64 > limit {
                return Err(format!(
                    "the deletion phase would remove more than {limit} {name} (--max-delete {}): \
                     {} of the first {} of {} stored {name} missing from the listing are gone \
                     from Clerk; no {name} were deleted. A key of another Clerk instance looks \
                     like this; if the deletions are meant, run again with a higher --max-delete",
                    self.options.max_delete,
                    gone.len(),
                    checked + 1,
                    candidates.len()
                ));
            }
        }
        // Objects that an offset walk skipped, or that were created while the listing ran.
        for chunk in still_there.chunks(PAGE_SIZE as usize) {
            self.apply_objects(chunk.to_vec(), false).await?;
        }
        if self.options.dry_run {
            self.counts.deleted += gone.len() as u64;
            self.would_delete
                .extend(gone.iter().map(|candidate| candidate.id.clone()));
            return Ok(());
        }
        for chunk in gone.chunks(PAGE_SIZE as usize) {
            let events = chunk
                .iter()
                .map(|candidate| {
                    let data = serde_json::value::to_raw_value(&self.kind.deleted_data(candidate))
                        .map_err(|e| e.to_string())?;
                    reconcile_event(self.run_id, self.options, self.kind.delete_type(), &data)
                        .map(|(_, event)| event)
                })
                .collect::<Result<Vec<Event>, String>>()?;
            let (outcomes, failed) = self.write(events).await?;
            self.failed.extend(failed);
            self.counts.deleted += outcomes
                .iter()
                .filter(|o| **o == Some(Outcome::Applied))
                .count() as u64;
        }
        Ok(())
    }

    /// The stored objects the listing did not return.
    async fn missing(&self) -> Result<Vec<Candidate>, String> {
        let statement = Statement::from_string(
            DbBackend::Postgres,
            match self.kind {
                Kind::Memberships => {
                    "SELECT id, organization_id, user_id FROM organization_memberships".to_owned()
                }
                Kind::Users | Kind::Organizations => format!(
                    "SELECT id, NULL::text AS organization_id, NULL::text AS user_id FROM {}",
                    self.kind.table()
                ),
            },
        );
        let what = format!("reading the stored {} ids", self.kind.name());
        let rows = retry_database(&what, || self.db.query_all_raw(statement.clone())).await?;
        let mut candidates = Vec::new();
        for row in rows {
            let read = || -> Result<Candidate, DbErr> {
                Ok(Candidate {
                    id: row.try_get("", "id")?,
                    organization_id: row.try_get("", "organization_id")?,
                    user_id: row.try_get("", "user_id")?,
                })
            };
            let candidate = read().map_err(|e| format!("{what}: {e}"))?;
            let goes_with_its_owner = [&candidate.organization_id, &candidate.user_id]
                .into_iter()
                .flatten()
                .any(|owner| self.deleted_before.contains(owner));
            if !self.listed.contains(&candidate.id) && !goes_with_its_owner {
                candidates.push(candidate);
            }
        }
        Ok(candidates)
    }

    /// Asks Clerk for one object missing from the listing: `None` when it is gone. A user or
    /// an organization has its own GET (404 when deleted); a membership is looked for among its
    /// organization's memberships of its user, since none is read by id (a removed member's
    /// membership is gone even when the member was added again: that is a new id).
    async fn confirm(&self, candidate: &Candidate) -> Result<Option<Value>, ClerkError> {
        match self.kind {
            Kind::Users => self.client.user(&candidate.id).await,
            Kind::Organizations => self.client.organization(&candidate.id).await,
            Kind::Memberships => {
                let (Some(organization_id), Some(user_id)) =
                    (&candidate.organization_id, &candidate.user_id)
                else {
                    return Ok(None);
                };
                let found = self.client.memberships_of(organization_id, user_id).await?;
                Ok(found.into_iter().flatten().find(|membership| {
                    membership.get("id").and_then(Value::as_str) == Some(candidate.id.as_str())
                }))
            }
        }
    }
}

/// The event a webhook would have delivered with this type and `data` (which needs its `id`),
/// read by the same code as a delivery, with this run's svix-id for the object: never one Svix
/// would send, and unique per run, so a second run applies again. Every event a reconcile
/// applies is made here, with source `reconcile` and the payload kept as `WORKER_STORE_PAYLOADS`
/// says. Returns the object's id with the event.
fn reconcile_event(
    run_id: &str,
    options: &Options,
    event_type: &str,
    data: &RawValue,
) -> Result<(String, Event), String> {
    let id = clerk::object_id(data).ok_or("no id")?;
    // The envelope around the object as Clerk wrote it: no second parse and serialization of
    // the object (a backfill does this for every user).
    let body = format!(
        r#"{{"type":{},"object":"event","data":{}}}"#,
        Value::from(event_type),
        data.get()
    );
    let svix_id = format!("reconcile_{run_id}_{id}");
    let properties = BasicProperties::default().with_message_id(svix_id.into());
    let mut event =
        Event::read(body.as_bytes(), &properties, &options.roles).map_err(|e| e.to_string())?;
    event.source = Source::Reconcile;
    if !options.store_payloads {
        event = event.without_payload();
    }
    Ok((id, event))
}

/// The `updated_at` of the version an upsert event carries.
fn version(action: &Action) -> Option<DateTime<Utc>> {
    match action {
        Action::Upsert(record) => Some(record.updated_at),
        Action::Organization(organizations::Change::UpsertOrganization(record)) => {
            Some(record.updated_at)
        }
        Action::Organization(organizations::Change::UpsertMembership(record)) => {
            Some(record.updated_at)
        }
        _ => None,
    }
}

/// The id of the object an event is about, for messages.
fn subject(action: &Action) -> &str {
    use organizations::Change as C;
    match action {
        Action::Upsert(record) => &record.id,
        Action::Delete { id } => id,
        Action::Organization(C::UpsertOrganization(record)) => &record.id,
        Action::Organization(C::DeleteOrganization { id }) => id,
        Action::Organization(C::UpsertMembership(record)) => &record.id,
        Action::Organization(C::DeleteMembership(deletion)) => &deletion.id,
        Action::Ignore => "",
    }
}

/// Applies events in one transaction, retrying it while the database fails on its own account;
/// when one event fails on its own, the events are applied one by one so only that one fails
/// (and is named in the second list). Also `worker replay` and `worker rebuild`'s way to apply.
#[tracing::instrument(name = "write page", level = "info", skip_all, fields(events = events.len()))]
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
                            let id = subject(&event.action);
                            tracing::error!(%id, %error, "cannot write an object");
                            failed.push(format!("{id}: {error}"));
                            outcomes.push(None);
                        }
                    }
                }
                return Ok((outcomes, failed));
            }
        }
    }
}

async fn count_rows(db: &DatabaseConnection, kind: Kind) -> Result<u64, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT count(*) AS n FROM {}", kind.table()),
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
            organizations: Counts {
                listed: 2,
                created: 2,
                ..Counts::default()
            },
            memberships: Counts {
                listed: 1,
                stale: 1,
                ..Counts::default()
            },
            seconds: 1.5,
        };
        let zero = |listed, created, stale| {
            json!({"listed": listed, "created": created, "updated": 0, "unchanged": 0,
                   "stale": stale, "deleted": 0})
        };
        assert_eq!(
            serde_json::to_value(&summary).expect("json"),
            json!({"users": {"listed": 3, "created": 1, "updated": 1, "unchanged": 1,
                             "stale": 0, "deleted": 2},
                   "organizations": zero(2, 2, 0), "memberships": zero(1, 0, 1),
                   "seconds": 1.5})
        );
        let mut counts = summary.counts_json();
        counts["seconds"] = json!(1.5);
        assert_eq!(counts, serde_json::to_value(&summary).expect("json"));
    }

    #[test]
    fn the_paragraph_names_every_kind() {
        let report = Report {
            run_id: "r1".into(),
            dry_run: true,
            summary: Summary {
                memberships: Counts {
                    deleted: 4,
                    ..Counts::default()
                },
                ..Summary::default()
            },
            failure: None,
        };
        let text = report.paragraph();
        assert!(text.contains("Dry run, nothing written"), "{text}");
        assert!(text.contains(" Users: 0 listed"), "{text}");
        assert!(text.contains(" Organizations: 0 listed"), "{text}");
        assert!(
            text.contains(
                " Memberships: 0 listed, 0 created, 0 updated, 0 unchanged, 0 stale, 4 deleted."
            ),
            "{text}"
        );
        assert!(text.ends_with("The tables match Clerk."), "{text}");
    }
}
