//! The deletion phase of a pass: only after a complete listing, every stored object that was
//! not listed is confirmed gone on its own before it is deleted (as `WORKER_DELETE_MODE` says),
//! within what is left of the run's deletion limits (`super::limits`), memberships that go with
//! their owner included. Rows kept after an earlier deletion are neither candidates nor part of
//! the table a limit is a share of.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde_json::Value;

use crate::apply::{Event, Outcome, retry_read};
use crate::clerk::ClerkError;
use crate::commands::progress;

use super::limits::{self, Budget};
use super::pass::{Candidate, Pass, reconcile_event};
use super::{Kind, PAGE_SIZE};

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
            if gone.len() as u64 > limit
                && let Err(refused) = budget.take(self.kind, gone.len() as u64, 0)
            {
                let why = format!(
                    "{}: {} of the first {} of {} stored {name} missing from the listing are \
                     gone from Clerk. If the deletions are meant, run again with a higher \
                     --max-delete",
                    refused.reason,
                    gone.len(),
                    checked + 1,
                    candidates.len()
                );
                self.refused = Some(limits::Refused {
                    reason: why.clone(),
                    ..refused
                });
                return Err(why);
            }
        }
        // What goes with them counts too: a user's or an organization's memberships.
        let gone_ids: Vec<String> = gone.iter().map(|candidate| candidate.id.clone()).collect();
        let with_them =
            limits::memberships_going_with(self.db, self.kind, &gone_ids, self.deleted_before)
                .await?;
        if let Err(refused) = budget.take(self.kind, gone.len() as u64, with_them) {
            let why = refused.reason.clone();
            self.refused = Some(refused);
            return Err(why);
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

    /// The stored objects the listing did not return (rows kept after their deletion are not
    /// stored objects: Clerk has deleted them).
    async fn missing(&self) -> Result<Vec<Candidate>, String> {
        let statement = Statement::from_string(
            DbBackend::Postgres,
            match self.kind {
                Kind::Memberships => "SELECT id, organization_id, user_id \
                     FROM organization_memberships WHERE deleted_at IS NULL"
                    .to_owned(),
                Kind::Users | Kind::Organizations => format!(
                    "SELECT id, NULL::text AS organization_id, NULL::text AS user_id FROM {} \
                     WHERE deleted_at IS NULL",
                    self.kind.table()
                ),
            },
        );
        let what = format!("reading the stored {} ids", self.kind.name());
        let rows = retry_read(&what, || self.db.query_all_raw(statement.clone())).await?;
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
