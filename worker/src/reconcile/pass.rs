//! One pass of a run: one kind's listing, page by page, compared with what is stored and
//! written through the door (the deletion phase is in `deletion`).

use std::collections::HashMap;
use std::time::Instant;

use futures_util::FutureExt as _;
use sea_orm::DatabaseConnection;
use serde_json::value::RawValue;

use crate::apply::{self, Event, Outcome, Source, retry_read};
use crate::clerk::{self, ClerkClient, ClerkError};
use crate::commands::progress;

use super::{Counts, Kind, Options, PAGE_SIZE, listed};

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
    /// Where the listing stands once this page is written (the resume point).
    position: Option<String>,
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

/// A page of a listing and where the listing stands after it: the last user's id, or the
/// offset of the next page.
type Page = (Vec<Box<RawValue>>, String);

/// Why a listing gave no next page.
enum Halt {
    Failed(ClerkError),
    /// A stop was asked for while the page was fetched.
    Interrupted,
}

impl Listing<'_> {
    #[tracing::instrument(name = "fetch page", level = "info", skip_all)]
    async fn next(&mut self) -> Result<Option<Page>, ClerkError> {
        let page = match self {
            Listing::Cursor(pages) => pages.next().await?,
            Listing::Offset(pages) => pages.next().await?,
        };
        let position = match self {
            Listing::Cursor(pages) => pages.cursor().unwrap_or_default().to_owned(),
            Listing::Offset(pages) => pages.offset().to_string(),
        };
        Ok(page.map(|page| (page, position)))
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
    /// Under which id the listed ids are kept ([`listed`]): the run's own, or the one of the
    /// run whose listing it resumed.
    pub(super) listing_id: &'a str,
    /// Where the listing starts: after this user, or at this offset (a resumed listing);
    /// `None` for the first page.
    pub(super) start: Option<String>,
    pub(super) counts: Counts,
    /// Listed objects that cannot be read as their kind.
    pub(super) unreadable: Shortfall,
    /// Objects whose write failed on their own account.
    pub(super) failed: Shortfall,
    /// Set when a deletion limit refused this pass's deletion phase.
    pub(super) refused: Option<super::limits::Refused>,
    /// Set when a stop ended the pass before its end.
    pub(super) interrupted: bool,
}

/// How many objects fell short, with the first reason: the count grows, the memory does not.
#[derive(Debug, Default)]
pub(super) struct Shortfall {
    pub(super) count: u64,
    pub(super) first: Option<String>,
}

impl Shortfall {
    pub(super) fn extend(&mut self, reasons: impl IntoIterator<Item = String>) {
        for reason in reasons {
            self.count += 1;
            self.first.get_or_insert(reason);
        }
    }
}

impl<'a> Pass<'a> {
    pub(super) fn new(
        kind: Kind,
        db: &'a DatabaseConnection,
        client: &'a ClerkClient,
        options: &'a Options,
        run_id: &'a str,
        listing_id: &'a str,
        start: Option<String>,
    ) -> Self {
        Self {
            kind,
            db,
            client,
            options,
            run_id,
            listing_id,
            start,
            counts: Counts::default(),
            unreadable: Shortfall::default(),
            failed: Shortfall::default(),
            refused: None,
            interrupted: false,
        }
    }

    /// Ends the pass as interrupted: the error that ends the run.
    pub(super) fn interrupt(&mut self, at: &str) -> String {
        self.interrupted = true;
        format!(
            "interrupted by a stop {at} of the {} ({} listed); the next run resumes the              listing where it stopped",
            self.kind.name(),
            self.counts.listed
        )
    }

    /// The listing, then the deletion phase. An error ends the run (the passes after this one
    /// do not run); objects that could not be read or written do not: see [`Pass::shortfalls`].
    pub(super) async fn run(&mut self, budget: &mut super::limits::Budget) -> Result<(), String> {
        let name = self.kind.name();
        // Users are counted first (also the first check of the key); the other listings say
        // their count on every page.
        let interruption = self.options.interruption.clone();
        let counted = match self.kind {
            Kind::Users => match interruption.unless(self.client.count_users()).await {
                Some(counted) => Some(counted.map_err(|e| e.to_string())?),
                None => return Err(self.interrupt("before the listing")),
            },
            Kind::Organizations | Kind::Memberships => None,
        };
        let offset = || {
            self.start
                .as_deref()
                .and_then(|offset| offset.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut pages = match self.kind {
            Kind::Users => {
                let pages = self.client.users(PAGE_SIZE);
                Listing::Cursor(match self.start.clone() {
                    Some(cursor) => pages.starting_after(cursor),
                    None => pages,
                })
            }
            Kind::Organizations => {
                Listing::Offset(self.client.organizations(PAGE_SIZE).from_offset(offset()))
            }
            Kind::Memberships => {
                Listing::Offset(self.client.memberships(PAGE_SIZE).from_offset(offset()))
            }
        };
        let fetch = async |pages: &mut Listing<'_>| -> Result<Option<Page>, Halt> {
            match interruption.unless(pages.next()).await {
                None => Err(Halt::Interrupted),
                Some(page) => page.map_err(Halt::Failed),
            }
        };
        let mut current = fetch(&mut pages).await;
        let total = counted.or(pages.total()).unwrap_or(0);
        let mut progress =
            progress::Progress::new(self.options.progress_bar, "reconciling", name, total);
        // Three pages at once: one written, the next compared with what is stored, the one
        // after fetched. A page's writes would otherwise wait for the comparison, a single
        // statement that keeps one core busy while the other idles.
        let mut compared: Option<Prepared> = None;
        loop {
            let step = Instant::now();
            if interruption.requested() {
                current = Err(Halt::Interrupted);
            }
            let page = match current {
                Ok(page) => page,
                Err(halt) => {
                    // What was listed before the failure or the stop is still written.
                    if let Some(mut prepared) = compared.take() {
                        let written = self
                            .write_prepared(std::mem::take(&mut prepared.writes))
                            .await;
                        self.absorb_written(prepared, written).await?;
                    }
                    return Err(match halt {
                        Halt::Interrupted => self.interrupt("during the listing"),
                        Halt::Failed(error) => format!(
                            "the {name} listing did not complete ({} {name} listed): {error}; \
                             no {name} were deleted",
                            self.counts.listed
                        ),
                    });
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
                        Some((objects, position)) => {
                            let prepared = self.prepare(objects, true).map(move |prepared| {
                                Some(prepared.map(|prepared| Prepared {
                                    position: Some(position),
                                    ..prepared
                                }))
                            });
                            tokio::join!(prepared, fetch(&mut pages))
                        }
                        None => (None, Ok(None)),
                    }
                },
            );
            if let (Some(prepared), Some(written)) = (writing, written) {
                progress.advance(prepared.objects);
                self.absorb_written(prepared, written).await?;
            }
            if let Some(prepared) = next_compared {
                compared = Some(self.absorb_compared(prepared?));
            }
            current = next;
            // The page's fetch, comparison and writes took their share of the time: live events
            // get the rest (a stop does not wait for it).
            interruption
                .unless(self.options.pace.rest_since(step))
                .await;
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
        if let Some(first) = &self.failed.first {
            shortfalls.push(format!(
                "{} {name} could not be written, e.g. {first}",
                self.failed.count
            ));
        }
        if let Some(first) = &self.unreadable.first {
            shortfalls.push(format!(
                "{} listed {name} could not be read and were left as they are, e.g. {first}",
                self.unreadable.count
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
        self.absorb_written(prepared, written).await
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
            position: None,
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
        self.unreadable.extend(prepared.unreadable.drain(..));
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

    /// Counts what the writes of a comparison did; for a listed page, then records its ids and
    /// the resume point after it ([`listed::record_page`]): once its writes committed.
    async fn absorb_written(&mut self, prepared: Prepared, written: Written) -> Result<(), String> {
        let (outcomes, failed) = written?;
        self.failed.extend(failed);
        if let Some(position) = &prepared.position {
            let ids: Vec<String> = prepared.listed.iter().flatten().cloned().collect();
            let what = format!("recording the listed {}", self.kind.name());
            retry_read(&what, || {
                listed::record_page(
                    self.db,
                    self.run_id,
                    self.listing_id,
                    self.kind,
                    ids.clone(),
                    Some(position),
                )
            })
            .await?;
        }
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

    /// Applies events in transactions of at most
    /// [`TRANSACTION_EVENTS`](apply::pace::TRANSACTION_EVENTS), [`Options::writers`] at once (a
    /// page's objects are distinct; those that share a lock, like memberships of one
    /// organization, wait for each other).
    pub(super) async fn write(&self, events: Vec<Event>) -> Written {
        apply::pace::write_in_transactions(self.db, &events, self.options.writers()).await
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
