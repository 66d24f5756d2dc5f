//! One pass of a run: one kind's listing, page by page, compared with what is stored and
//! written through the door (the deletion phase is in `deletion`).

use std::collections::{HashMap, HashSet};

use futures_util::FutureExt as _;
use sea_orm::DatabaseConnection;
use serde_json::value::RawValue;
use tracing::Instrument as _;

use crate::apply::{self, Event, Outcome, Source, retry_read};
use crate::clerk::{self, ClerkClient, ClerkError};
use crate::commands::progress;

use super::{Counts, Kind, Options, PAGE_SIZE, WRITERS};

/// What a page's objects are in Postgres before anything is written: the door's comparison of
/// each listed version with its stored rows.
type Stored = apply::compare::Standing;

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
type Written = Result<apply::Written, String>;

/// Where a listed object goes, decided from what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Create,
    Update,
}

/// A stored object missing from the listing, with what its own GET needs.
pub(super) struct Candidate {
    pub(super) id: String,
    /// A membership's organization and user; `None` for the other kinds.
    pub(super) organization_id: Option<String>,
    pub(super) user_id: Option<String>,
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
pub(super) struct Pass<'a> {
    pub(super) kind: Kind,
    pub(super) db: &'a DatabaseConnection,
    pub(super) client: &'a ClerkClient,
    pub(super) options: &'a Options,
    pub(super) run_id: &'a str,
    pub(super) counts: Counts,
    /// Every id the listing returned: what is not in here is a deletion candidate.
    pub(super) listed: HashSet<String>,
    /// Listed objects that cannot be read as their kind (the reason of each).
    pub(super) unreadable: Vec<String>,
    /// Objects whose write failed on their own account.
    pub(super) failed: Vec<String>,
    /// In a dry run, the ids the earlier passes counted as deleted: a real run would have
    /// removed their memberships with them, so the memberships pass does not count those again.
    pub(super) deleted_before: &'a HashSet<String>,
    /// In a dry run, the ids this pass counted as deleted.
    pub(super) would_delete: Vec<String>,
    /// Set when a deletion limit refused this pass's deletion phase.
    pub(super) refused: Option<super::limits::Refused>,
}

impl<'a> Pass<'a> {
    pub(super) fn new(
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
            refused: None,
        }
    }

    /// The listing, then the deletion phase. An error ends the run (the passes after this one
    /// do not run); objects that could not be read or written do not: see [`Pass::shortfalls`].
    pub(super) async fn run(&mut self, budget: &mut super::limits::Budget) -> Result<(), String> {
        let name = self.kind.name();
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
            self.delete_missing(budget, &mut progress).await?;
        }
        Ok(())
    }

    /// Why the tables may still differ from the listing although the pass ran to its end.
    pub(super) fn shortfalls(&self) -> Vec<String> {
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
    pub(super) async fn apply_objects(
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
            let Some(listed_at) = event.action.version() else {
                continue;
            };
            // `unchanged` only when the stored row is what this version writes, column for
            // column; a row of the same `updated_at` that differs is repaired.
            let (change, event) = match stored.get(&id) {
                Some(Stored {
                    tombstoned: true, ..
                }) => (None, event),
                Some(Stored { same: true, .. }) => {
                    prepared.unchanged += 1;
                    continue;
                }
                Some(Stored {
                    updated_at: Some(at),
                    ..
                }) if *at == listed_at => (Some(Change::Update), event.repairing()),
                Some(Stored {
                    updated_at: Some(at),
                    ..
                }) if *at > listed_at => (None, event),
                Some(Stored {
                    updated_at: Some(_),
                    ..
                }) => (Some(Change::Update), event),
                _ => (Some(Change::Create), event),
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

    /// How each listed version stands against what is stored (ids never collide across kinds:
    /// Clerk prefixes them), compared by the door with what it would write now.
    async fn stored(
        &self,
        events: &HashMap<String, Event>,
    ) -> Result<HashMap<String, Stored>, String> {
        let events: Vec<&Event> = events.values().collect();
        let what = format!("reading the stored {}", self.kind.name());
        retry_read(&what, || apply::compare::standing(self.db, &events)).await
    }

    /// Applies events in [`WRITERS`] transactions at once (a page's objects are distinct; those
    /// that share a lock, like memberships of one organization, wait for each other), keeping
    /// their order in the outcomes. `None` for an event that failed on its own account. Each
    /// transaction is a task of its own, so that building its statements (serializing the
    /// rows) runs on every core rather than on the one that polls the pass.
    pub(super) async fn write(&self, events: Vec<Event>) -> Written {
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let size = events.len().div_ceil(WRITERS);
        let mut events = events.into_iter();
        let tasks: Vec<_> = std::iter::from_fn(|| {
            let chunk: Vec<Event> = events.by_ref().take(size).collect();
            (!chunk.is_empty()).then(|| {
                let db = self.db.clone();
                tokio::spawn(async move { apply::write(&db, &chunk).await }.in_current_span())
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
}

/// The event a webhook would have delivered with this type and `data` (which needs its `id`),
/// read by the door like a delivery, with this run's svix-id for the object
/// (`reconcile_<run>_<id>`). Every event a reconcile applies is made here, with source
/// `reconcile` and the payload kept as `WORKER_STORE_PAYLOADS` says. Returns the object's id
/// with the event.
pub(super) fn reconcile_event(
    run_id: &str,
    options: &Options,
    event_type: &str,
    data: &RawValue,
) -> Result<(String, Event), String> {
    options
        .reading
        .read_object(Source::Reconcile, run_id, event_type, data)
}
