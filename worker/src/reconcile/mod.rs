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
//!    one function, `reconcile_event`), a page split into [`Options::connections`] − 1
//!    transactions applied at once. Once a page's writes committed, its ids go to
//!    `reconcile_listed` and the run's resume point (`reconcile_runs.listing_cursor`) moves
//!    past it, in one statement (`listed`).
//! 2. Only after a complete listing: every stored object that was not listed (an anti-join of
//!    the table with the listed ids, in Postgres, 500 rows at a time) is confirmed on its own:
//!    `GET /v1/users/{id}` or `GET /v1/organizations/{id}` answering 404, or, for a
//!    membership, its organization's memberships of its user not holding its id (404 for the
//!    organization counts as gone too). A gone object is recorded as such and, once all are
//!    confirmed, makes the `.deleted` event (row deleted, tombstone written; an organization's
//!    memberships go with it); one still there is applied instead. When more objects of the
//!    kind would be deleted than what is left of its limit (or, for users and organizations,
//!    more memberships with them than is left of the memberships limit), nothing of the kind is
//!    deleted and the run fails.
//!
//! The worker's memory holds a page, never the whole listing: what grows with the number of
//! objects is in Postgres (`listed`).
//!
//! A listing that did not complete deletes nothing of its kind and fails the run; a pass that
//! fails (that, a refused key, the deletion limit) ends the run, and the passes after it do not
//! run. Objects that could not be read or written fail the run too, but only once every pass
//! has run.
//!
//! A stop ([`Options::interruption`]: SIGTERM to the command, a worker stopping) ends the run at
//! its next page (a page being fetched, or a Backend API wait, is given up): it is recorded
//! `interrupted`, deletes nothing more, and keeps its listed ids. A run found `running` by the
//! next holder of the lock is recorded `interrupted` too (its process died). The next run that
//! writes resumes the latest run's listing when that one was interrupted: it skips the kinds
//! that were done and continues the kind's listing at the recorded point, writing to the same
//! listed ids, so its deletion phase still follows one complete listing ([`Summary::resumed`]).
//!
//! The parts: [`args`] (the command's arguments and a run's options), [`report`] (the counts,
//! the summary and the report), `pass` (one kind's listing and writes) and `deletion` (its
//! deletion phase), `listed` (the listed ids, `reconcile_listed`), [`limits`] (the deletion
//! limits of a run), [`lock`] (one run at a time), [`instance`] (the key's instance), `runs`
//! (`reconcile_runs`: outcomes, resume points), [`schedule`] (`WORKER_RECONCILE_INTERVAL`).
//! The Backend API client and its pages are [`crate::clerk`].

pub mod args;
mod deletion;
pub mod instance;
pub mod limits;
mod listed;
pub mod lock;
mod pass;
pub mod report;
mod runs;
pub mod schedule;

use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::apply::pace::Pace;
use crate::apply::{Reading, SubjectKind};
use crate::clerk::{self, ClerkClient, ClerkConfig};
use crate::commands;

pub use args::{Interruption, MaxDelete, Options, ReconcileArgs};
pub use report::{Counts, Report, Resumed, Summary};
pub use runs::Trigger;

use runs::Ending;

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

/// `worker reconcile`: loads the settings it needs, runs once, prints the summary. An error when
/// the run failed or was interrupted (after the summary was printed), so the process exits
/// non-zero. SIGTERM or SIGINT ends the run at its next page, recorded `interrupted`.
pub async fn execute(settings: &shared::Settings, args: ReconcileArgs) -> anyhow::Result<()> {
    let clerk = ClerkConfig::from_settings(settings)?;
    let connections = crate::config::reconcile_connections(settings)?;
    let client = ClerkClient::new(clerk).context("cannot set up the Backend API client")?;
    let signals = crate::wait_for_signal()
        .await
        .context("cannot listen for signals")?;
    let (stop, stopped) = watch::channel(false);
    let stop = std::sync::Arc::new(stop);
    let on_signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            signals.await;
            tracing::warn!("stop requested: the run ends at its next page, recorded interrupted");
            stop.send_replace(true);
        })
    };
    let db = commands::connect_command(settings, connections).await?;
    let Some(lock) = lock::RunLock::try_take(&settings.database_url()?, settings.lock_timeout()?)
        .await
        .context("cannot take the reconcile lock (DATABASE_URL)")?
    else {
        let busy = lock::AnotherRunHoldsTheLock::describe(&db).await;
        db.close().await.ok();
        return Err(busy.into());
    };
    runs::settle_abandoned(&db)
        .await
        .context("cannot record abandoned runs as interrupted (reconcile_runs)")?;
    let options = Options {
        progress_bar: args.shows_bar(settings),
        dry_run: args.dry_run,
        delete: !args.no_delete,
        max_delete: args.max_delete,
        trigger: Trigger::Command,
        reading: Reading::from_settings(settings)?,
        connections,
        pace: Pace::from_settings(settings)?,
        interruption: Interruption::new(stopped),
    };
    let report = reconcile(&db, &client, &options).await;
    on_signal.abort();
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
        Some(why) if report.interrupted => Err(anyhow::anyhow!("reconcile interrupted: {why}")),
        Some(why) => Err(anyhow::anyhow!("reconcile failed: {why}")),
    }
}

/// Runs one reconcile and records it in `reconcile_runs` (unless dry). Never panics and never
/// returns early without a report: every failure ends up in [`Report::failure`]. The caller
/// holds the reconcile lock ([`lock`]).
pub async fn reconcile(db: &DatabaseConnection, client: &ClerkClient, options: &Options) -> Report {
    let run_id = format!(
        "{}_{}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let span = tracing::info_span!("reconcile", run_id = %run_id, dry_run = options.dry_run);
    run(db, client, options, run_id).instrument(span).await
}

/// A report of a run that ended before its first listing.
fn stopped_early(run_id: String, options: &Options, summary: Summary, why: String) -> Report {
    Report {
        run_id,
        dry_run: options.dry_run,
        summary,
        failure: Some(why),
        wrong_instance: None,
        interrupted: false,
    }
}

async fn run(
    db: &DatabaseConnection,
    client: &ClerkClient,
    options: &Options,
    run_id: String,
) -> Report {
    let started = Instant::now();
    let mut summary = Summary::default();
    // A run that writes continues the latest run's listing when that one was interrupted; a
    // dry run never does (it records nothing for a later run to resume either), and leaves
    // that listing's ids for the run that will.
    let prepared = match runs::resumable(db).await {
        Ok(resuming) => {
            let keep = resuming.as_ref().map(|r| r.listing_id.as_str());
            match listed::keep_only(db, keep).await {
                Ok(()) if options.dry_run => Ok(None),
                Ok(()) => runs::start(db, &run_id, options.trigger, resuming.as_ref())
                    .await
                    .map(|()| resuming),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    let resuming = match prepared {
        Ok(resuming) => resuming,
        Err(error) => {
            summary.seconds = started.elapsed().as_secs_f64();
            let why = format!("cannot record the run in reconcile_runs: {error}");
            return stopped_early(run_id, options, summary, why);
        }
    };
    let listing_id = resuming
        .as_ref()
        .map_or(run_id.clone(), |r| r.listing_id.clone());
    if let Some(resumed) = &resuming {
        tracing::info!(
            resumed_from = %resumed.run_id,
            kind = resumed.kind.name(),
            after = ?resumed.cursor,
            "resuming the listing of an interrupted run"
        );
        summary.resumed = Some(Resumed {
            run_id: resumed.run_id.clone(),
            kind: resumed.kind.name(),
            after: resumed.cursor.clone(),
        });
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
            end(
                db,
                options,
                &run_id,
                &listing_id,
                &summary,
                Ending::Failed,
                Some(&why),
            )
            .await;
            tracing::error!(reason = %why, "reconcile stopped before its first listing");
            let mut report = stopped_early(run_id, options, summary, why);
            if let Err(instance::ReconcileRefusal::WrongInstance(wrong)) = checked {
                report.wrong_instance = Some(wrong);
            }
            return report;
        }
    };
    let mut reasons = Vec::new();
    let mut interrupted = false;
    // The kinds before the one resumed were done by the interrupted run.
    let first = resuming
        .as_ref()
        .and_then(|r| Kind::ALL.iter().position(|&kind| kind == r.kind))
        .unwrap_or(0);
    for (index, &kind) in Kind::ALL.iter().enumerate().skip(first) {
        let start = match &resuming {
            Some(resumed) if resumed.kind == kind => resumed.cursor.clone(),
            _ => None,
        };
        let mut pass = Pass::new(kind, db, client, options, &run_id, &listing_id, start);
        let result = if options.interruption.requested() {
            Err(pass.interrupt("before the listing"))
        } else {
            pass.run(&mut budget).await
        };
        *summary.of_mut(kind) = pass.counts;
        if let Some(refused) = pass.refused.take() {
            summary.refused.insert(kind.name(), refused);
        }
        let shortfalls = pass.shortfalls();
        if let Err(why) = result {
            interrupted = pass.interrupted;
            reasons.push(why);
            reasons.extend(shortfalls);
            break;
        }
        reasons.extend(shortfalls);
        // The resume point moves on to the next kind, from its first page.
        if !options.dry_run
            && let Err(error) =
                runs::listing_at(db, &run_id, Kind::ALL.get(index + 1).copied(), None).await
        {
            tracing::warn!(%error, "cannot record the resume point in reconcile_runs");
        }
    }
    let failure = (!reasons.is_empty()).then(|| reasons.join("; "));
    summary.seconds = started.elapsed().as_secs_f64();
    let ending = match (&failure, interrupted) {
        (_, true) => Ending::Interrupted,
        (None, false) => Ending::Succeeded,
        (Some(_), false) => Ending::Failed,
    };
    end(
        db,
        options,
        &run_id,
        &listing_id,
        &summary,
        ending,
        failure.as_deref(),
    )
    .await;
    match (&failure, interrupted) {
        (None, _) => tracing::info!(?summary, "reconcile finished"),
        (Some(why), true) => tracing::warn!(?summary, reason = %why, "reconcile interrupted"),
        (Some(why), false) => tracing::error!(?summary, reason = %why, "reconcile failed"),
    }
    Report {
        run_id,
        dry_run: options.dry_run,
        summary,
        failure,
        wrong_instance: None,
        interrupted,
    }
}

/// Records the end of a run (unless dry) and, unless it was interrupted (its listing is then
/// kept for the run that resumes it), removes its listed ids.
async fn end(
    db: &DatabaseConnection,
    options: &Options,
    run_id: &str,
    listing_id: &str,
    summary: &Summary,
    ending: Ending,
    failure: Option<&str>,
) {
    if !options.dry_run
        && let Err(error) = runs::finish(db, run_id, summary.counts_json(), ending, failure).await
    {
        tracing::error!(%error, "cannot record the end of the run in reconcile_runs");
    }
    if (ending != Ending::Interrupted || options.dry_run)
        && let Err(error) = listed::forget(db, listing_id).await
    {
        // The next run removes them.
        tracing::warn!(%error, "cannot remove the run's listed ids (reconcile_listed)");
    }
}
