//! The deletion phase of a pass: only after a complete listing, every stored object that was
//! not listed is confirmed gone on its own before it is deleted (as `WORKER_DELETE_MODE` says),
//! within what is left of the run's deletion limits (`super::limits`), memberships that go with
//! their owner included. Rows kept after an earlier deletion are neither candidates nor part of
//! the table a limit is a share of.
//!
//! In flat memory: the candidates are the stored rows the listing's ids (`super::listed`) do not
//! hold, found by an anti-join in Postgres and read 500 at a time in id order (keyset); the ones
//! confirmed gone are written back under `<kind>.gone` and counted there, and deleted from there
//! once every candidate was confirmed and the limits allow it. The worker holds one chunk.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde_json::Value;

use crate::apply::{Event, Outcome, retry_read};
use crate::clerk::ClerkError;
use crate::commands::progress;

use super::limits::{self, Budget};
use super::pass::{Candidate, Pass, reconcile_event};
use super::{Kind, PAGE_SIZE, listed};

impl Pass<'_> {
    /// The deletion phase: every stored object that was not listed is asked for on its own; the
    /// ones Clerk no longer has are deleted, unless there are more than the limit.
    pub(super) async fn delete_missing(
        &mut self,
        budget: &mut Budget,
        progress: &mut progress::Progress,
    ) -> Result<(), String> {
        let name = self.kind.name();
        let limit = budget.left(self.kind);
        let gone_key = listed::gone(self.kind);
        let what = format!("forgetting the {name} an earlier phase found gone");
        retry_read(&what, || listed::clear(self.db, self.listing_id, &gone_key)).await?;
        let candidates = self.count_missing().await?;
        if candidates == 0 {
            return Ok(());
        }
        progress.phase(
            &format!("confirming the {name} missing from the listing"),
            candidates,
        );
        let mut gone: u64 = 0;
        let mut checked: u64 = 0;
        let mut after = String::new();
        loop {
            let chunk = self.missing_after(&after).await?;
            let Some(last) = chunk.last() else {
                break;
            };
            after = last.id.clone();
            let mut gone_ids = Vec::new();
            let mut still_there = Vec::new();
            for candidate in &chunk {
                let confirmed = match self
                    .options
                    .interruption
                    .unless(self.confirm(candidate))
                    .await
                {
                    Some(confirmed) => confirmed,
                    None => {
                        return Err(self.interrupt("while confirming the objects missing from"));
                    }
                };
                match confirmed {
                    Ok(None) => gone_ids.push(candidate.id.clone()),
                    Ok(Some(object)) => still_there
                        .push(serde_json::value::to_raw_value(&object).map_err(|e| e.to_string())?),
                    Err(error) => {
                        return Err(format!(
                            "confirming the {name} missing from the listing failed: {error}; no \
                             {name} were deleted"
                        ));
                    }
                }
                checked += 1;
                progress.advance(1);
                let gone_now = gone + gone_ids.len() as u64;
                if gone_now > limit
                    && let Err(refused) = budget.take(self.kind, gone_now, 0)
                {
                    let why = format!(
                        "{}: {gone_now} of the first {checked} of {candidates} stored {name} \
                         missing from the listing are gone from Clerk. If the deletions are \
                         meant, run again with a higher --max-delete",
                        refused.reason,
                    );
                    self.refused = Some(limits::Refused {
                        reason: why.clone(),
                        ..refused
                    });
                    return Err(why);
                }
            }
            gone += gone_ids.len() as u64;
            let what = format!("recording the {name} gone from Clerk");
            retry_read(&what, || {
                listed::add(self.db, self.listing_id, &gone_key, gone_ids.clone())
            })
            .await?;
            // Objects that an offset walk skipped, or that were created while the listing ran.
            if !still_there.is_empty() {
                self.apply_objects(still_there, false).await?;
            }
        }
        // What goes with them counts too: a user's or an organization's memberships.
        let with_them = limits::memberships_going_with(
            self.db,
            self.kind,
            self.listing_id,
            self.options.dry_run,
        )
        .await?;
        if let Err(refused) = budget.take(self.kind, gone, with_them) {
            let why = refused.reason.clone();
            self.refused = Some(refused);
            return Err(why);
        }
        if self.options.dry_run {
            self.counts.deleted += gone;
            return Ok(());
        }
        let mut after = String::new();
        loop {
            if self.options.interruption.requested() {
                return Err(self.interrupt("while deleting the objects gone from"));
            }
            let chunk = self.gone_after(&after).await?;
            let Some(last) = chunk.last() else {
                break;
            };
            after = last.id.clone();
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

    /// What makes a stored row (`t`) a candidate: not kept after a deletion, not listed, and,
    /// in a dry run, for a membership: not going with an owner the dry run counted as deleted
    /// already (a real run would have removed it with its owner). `$1` is the listing id, `$2`
    /// the kind.
    ///
    /// Each stored row is looked up in the listed ids by their primary key (`OFFSET 0` keeps the
    /// lookup a subplan rather than a join): linear in the rows, whatever the statistics say.
    /// The table of listed ids is filled during the run and never analyzed before this, so
    /// Postgres estimates it at one row and, left to plan a join, compares every stored row with
    /// every listed id (35 s for 20 000 users).
    fn missing_condition(&self) -> String {
        let owners_gone = match (self.kind, self.options.dry_run) {
            (Kind::Memberships, true) => format!(
                " AND NOT EXISTS (SELECT 1 FROM reconcile_listed g WHERE g.listing_id = $1 \
                   AND g.kind IN ('{}', '{}') AND g.id IN (t.user_id, t.organization_id) \
                   OFFSET 0)",
                listed::gone(Kind::Users),
                listed::gone(Kind::Organizations)
            ),
            _ => String::new(),
        };
        format!(
            "t.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM reconcile_listed l \
               WHERE l.listing_id = $1 AND l.kind = $2 AND l.id = t.id OFFSET 0){owners_gone}"
        )
    }

    /// How many stored objects the listing did not return.
    async fn count_missing(&self) -> Result<u64, String> {
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT count(*) AS n FROM {} t WHERE {}",
                self.kind.table(),
                self.missing_condition()
            ),
            [self.listing_id.into(), self.kind.name().into()],
        );
        let what = format!(
            "counting the stored {} missing from the listing",
            self.kind.name()
        );
        let row = retry_read(&what, || self.db.query_one_raw(statement.clone())).await?;
        let n: i64 = match row {
            Some(row) => row.try_get("", "n").map_err(|e| format!("{what}: {e}"))?,
            None => 0,
        };
        Ok(n.max(0) as u64)
    }

    /// The next stored objects the listing did not return, after id `after` in id order, a
    /// page at most (rows kept after their deletion are not stored objects: Clerk has deleted
    /// them).
    async fn missing_after(&self, after: &str) -> Result<Vec<Candidate>, String> {
        let owners = match self.kind {
            Kind::Memberships => "t.organization_id, t.user_id",
            Kind::Users | Kind::Organizations => {
                "NULL::text AS organization_id, NULL::text AS user_id"
            }
        };
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT t.id, {owners} FROM {table} t WHERE t.id > $3 AND {condition} \
                 ORDER BY t.id LIMIT {PAGE_SIZE}",
                table = self.kind.table(),
                condition = self.missing_condition()
            ),
            [
                self.listing_id.into(),
                self.kind.name().into(),
                after.into(),
            ],
        );
        let what = format!(
            "reading the stored {} missing from the listing",
            self.kind.name()
        );
        self.candidates(&what, statement).await
    }

    /// The next objects confirmed gone, after id `after` in id order, a page at most; a
    /// membership with its organization and user, as stored (one deleted meanwhile, by a
    /// webhook, is left out).
    async fn gone_after(&self, after: &str) -> Result<Vec<Candidate>, String> {
        let (owners, join) = match self.kind {
            Kind::Memberships => (
                "t.organization_id, t.user_id",
                "JOIN organization_memberships t ON t.id = g.id",
            ),
            Kind::Users | Kind::Organizations => {
                ("NULL::text AS organization_id, NULL::text AS user_id", "")
            }
        };
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT g.id, {owners} FROM reconcile_listed g {join} \
                 WHERE g.listing_id = $1 AND g.kind = $2 AND g.id > $3 \
                 ORDER BY g.id LIMIT {PAGE_SIZE}"
            ),
            [
                self.listing_id.into(),
                listed::gone(self.kind).into(),
                after.into(),
            ],
        );
        let what = format!("reading the {} gone from Clerk", self.kind.name());
        self.candidates(&what, statement).await
    }

    async fn candidates(&self, what: &str, statement: Statement) -> Result<Vec<Candidate>, String> {
        let rows = retry_read(what, || self.db.query_all_raw(statement.clone())).await?;
        rows.into_iter()
            .map(|row| {
                let read = || -> Result<Candidate, DbErr> {
                    Ok(Candidate {
                        id: row.try_get("", "id")?,
                        organization_id: row.try_get("", "organization_id")?,
                        user_id: row.try_get("", "user_id")?,
                    })
                };
                read().map_err(|e| format!("{what}: {e}"))
            })
            .collect()
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
