//! `processed_events.source` accepts `on_demand`: the events the worker's on-demand sync API
//! applies (`POST /v1/sync/users/{id}`, `POST /v1/sync/organizations/{id}`). A looser check, so
//! the previous release's workers (which never write it) are unaffected.
//!
//! Locks, on `processed_events` (the largest table), outside a transaction: ACCESS EXCLUSIVE for
//! a moment to swap the check for the wider one, added `NOT VALID` (no scan, under
//! `WORKER_LOCK_TIMEOUT`), then a full scan under SHARE UPDATE EXCLUSIVE to validate it (reads and
//! writes go on). Every existing row satisfied the narrower check, so the validation cannot fail,
//! and the step can be run again.

use sea_orm_migration::prelude::*;

use crate::online::add_check;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const SOURCE_CHECK: &str = "processed_events_source_check";

/// In one transaction of its own (ACCESS EXCLUSIVE on `processed_events` until it commits); fails,
/// changing nothing, while the history holds `on_demand` rows: they are the operator's to prune
/// first. Rolling back is an operator's deliberate step, not an online one.
const WITHOUT_ON_DEMAND: &str = "\
ALTER TABLE processed_events DROP CONSTRAINT IF EXISTS processed_events_source_check, \
  ADD CONSTRAINT processed_events_source_check \
    CHECK (source IN ('webhook', 'reconcile', 'replay'))";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// Step by step, each step committed on its own: see the module comment.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_check(
            manager,
            "processed_events",
            SOURCE_CHECK,
            "source IN ('webhook', 'reconcile', 'replay', 'on_demand')",
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let manager = manager.begin().await?;
        manager
            .get_connection()
            .execute_unprepared(WITHOUT_ON_DEMAND)
            .await?;
        manager.commit().await
    }
}
