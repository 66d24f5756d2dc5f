//! `worker reconcile`: brings the tables to what Clerk's Backend API holds, for what no webhook
//! brought (users or organizations created before the endpoint existed, an outage longer than
//! Svix's retries, a purged dead letter).
//!
//! A run holds the reconcile lock ([`lock`]: the command and the schedule share it), then asks
//! `GET /v1/instance` which Clerk instance the key belongs to and stops there, before any
//! listing, when the database mirrors another one ([`instance::check_reconcile`]). The
//! deletion limits of the run are counted once, when it starts ([`limits`]).
//!
//! A run has one pass per [`Kind`], in this order: users, organizations, memberships (a
//! membership carries an organization snapshot, so its organization is best settled first).
//! Each pass:
//! 1. The listing, page by page, 500 a page: users with the `starting_after` cursor (after
//!    `GET /v1/users/count`, the bar's length and the first check of the key), organizations
//!    and memberships (`GET /v1/organizations`, `GET /v1/organization_memberships`) by offset.
//!    A page is first compared with what is stored, by the door
//!    ([`crate::apply::compare`], one statement per page): an object whose stored row is,
//!    column for column, what the door would write for it under the current settings is
//!    `unchanged` and not written (that is what makes a run with nothing to do fast); an older
//!    listed version or a tombstoned object is `stale`. The rest go through the door
//!    ([`crate::apply::write`]) as the `.updated` event a webhook would have delivered (a row of
//!    the same `updated_at` that differs as a repair, [`crate::apply::Event::repair`]), read
//!    from the listed JSON by [`crate::apply::Reading`] like any delivery (so the same mapping
//!    and the same rules apply), with a svix-id of their own per run and object (all made by
//!    one function, `reconcile_event`), a page split into [`WRITERS`] transactions applied at
//!    once.
//! 2. Only after a complete listing: every stored object that was not listed is confirmed on
//!    its own: `GET /v1/users/{id}` or `GET /v1/organizations/{id}` answering 404, or, for a
//!    membership, its organization's memberships of its user not holding its id (404 for the
//!    organization counts as gone too). A gone object makes the `.deleted` event (row deleted,
//!    tombstone written; an organization's memberships go with it); one still there is applied
//!    instead. When more objects of the kind would be deleted than what is left of its limit
//!    (or, for users and organizations, more memberships with them than is left of the
//!    memberships limit), nothing of the kind is deleted and the run fails.
//!
//! A listing that did not complete deletes nothing of its kind and fails the run; a pass that
//! fails (that, a refused key, the deletion limit) ends the run, and the passes after it do not
//! run. Objects that could not be read or written fail the run too, but only once every pass
//! has run.
//!
//! The parts: [`args`] (the command's arguments and a run's options), [`report`] (the counts,
//! the summary and the report), `pass` (one kind's listing and writes) and `deletion` (its
//! deletion phase), [`limits`] (the deletion limits of a run), [`lock`] (one run at a time),
//! [`instance`] (the key's instance), [`runs`] (`reconcile_runs`), [`schedule`]
//! (`WORKER_RECONCILE_INTERVAL`).
//! The Backend API client and its pages are [`crate::clerk`].

pub mod args;
mod deletion;
pub mod instance;
pub mod limits;
pub mod lock;
mod pass;
pub mod report;
mod runs;
pub mod schedule;

use std::collections::HashSet;
use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tracing::Instrument as _;

use crate::apply::{Reading, SubjectKind};
use crate::clerk::{self, ClerkClient, ClerkConfig};
use crate::commands;

pub use args::{MaxDelete, Options, ReconcileArgs};
pub use report::{Counts, Report, Summary};
pub use runs::Trigger;

use pass::{Candidate, Pass};

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

    /// The subject kind of the objects.
    pub fn subject(self) -> SubjectKind {
        match self {
            Kind::Users => SubjectKind::User,
            Kind::Organizations => SubjectKind::Organization,
            Kind::Memberships => SubjectKind::Membership,
        }
    }

    fn table(self) -> &'static str {
        self.subject().table()
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

/// `worker reconcile`: loads the settings it needs, runs once, prints the summary. An error when
/// the run failed (after the summary was printed), so the process exits non-zero.
pub async fn execute(settings: &shared::Settings, args: ReconcileArgs) -> anyhow::Result<()> {
    let clerk = ClerkConfig::from_settings(settings)?;
    let client = ClerkClient::new(clerk).context("cannot set up the Backend API client")?;
    let db = commands::connect_command(settings, WRITERS as u32 + 1).await?;
    let Some(lock) = lock::RunLock::try_take(&settings.database_url()?, settings.lock_timeout()?)
        .await
        .context("cannot take the reconcile lock (DATABASE_URL)")?
    else {
        let busy = lock::AnotherRunHoldsTheLock::describe(&db).await;
        db.close().await.ok();
        return Err(busy.into());
    };
    let options = Options {
        progress_bar: args.shows_bar(settings),
        dry_run: args.dry_run,
        delete: !args.no_delete,
        max_delete: args.max_delete,
        trigger: Trigger::Command,
        reading: Reading::from_settings(settings)?,
    };
    let report = reconcile(&db, &client, &options).await;
    lock.release().await.ok();
    db.close().await.ok();
    commands::print(
        args.json,
        &report.summary,
        format!("{}\n", report.paragraph()),
    )?;
    if let Some(wrong) = report.wrong_instance {
        return Err(wrong.into());
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
            wrong_instance: None,
        };
    }
    // Before the first listing: the key must belong to the instance the database mirrors.
    let checked = instance::check_reconcile(db, client, options.dry_run).await;
    let budget = match checked {
        Ok(_) => limits::Budget::at_start(db, options.max_delete).await,
        Err(ref refusal) => Err(refusal.to_string()),
    };
    let mut budget = match budget {
        Ok(budget) => budget,
        Err(why) => {
            summary.seconds = started.elapsed().as_secs_f64();
            if !options.dry_run
                && let Err(error) =
                    runs::finish(db, &run_id, summary.counts_json(), Some(&why)).await
            {
                tracing::error!(%error, "cannot record the end of the run in reconcile_runs");
            }
            tracing::error!(reason = %why, "reconcile stopped before its first listing");
            return Report {
                run_id,
                dry_run: options.dry_run,
                summary,
                failure: Some(why),
                wrong_instance: match checked {
                    Err(instance::ReconcileRefusal::WrongInstance(wrong)) => Some(wrong),
                    _ => None,
                },
            };
        }
    };
    let mut reasons = Vec::new();
    let mut dry_deleted = HashSet::new();
    for kind in Kind::ALL {
        let mut pass = Pass::new(kind, db, client, options, &run_id, &dry_deleted);
        let result = pass.run(&mut budget).await;
        *summary.of_mut(kind) = pass.counts;
        if let Some(refused) = pass.refused.take() {
            summary.refused.insert(kind.name(), refused);
        }
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
        wrong_instance: None,
    }
}
