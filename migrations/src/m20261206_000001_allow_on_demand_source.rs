//! `processed_events.source` accepts `on_demand`: the events the worker's on-demand sync API
//! applies (`POST /v1/sync/users/{id}`, `POST /v1/sync/organizations/{id}`).
//!
//! Locks: `processed_events` ACCESS EXCLUSIVE for the swap of the check (no scan: the new check is
//! added `NOT VALID`), then the validation reads the table once. Every row satisfies it already
//! (it only widens the old check), so the validation cannot fail. Each statement waits at most
//! `lock_timeout` for its lock, so a long transaction on the table fails the migration instead of
//! queueing every writer behind it.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Raw SQL: sea-query's `ALTER TABLE` adds and drops columns, not constraints.
const WITH_ON_DEMAND: &str = "\
SET LOCAL lock_timeout = '10s'; \
ALTER TABLE processed_events DROP CONSTRAINT IF EXISTS processed_events_source_check, \
  ADD CONSTRAINT processed_events_source_check \
    CHECK (source IN ('webhook', 'reconcile', 'replay', 'on_demand')) NOT VALID; \
ALTER TABLE processed_events VALIDATE CONSTRAINT processed_events_source_check";

/// Fails, changing nothing, while the history holds `on_demand` rows: they are the operator's to
/// prune (or wait out `WORKER_PROCESSED_RETENTION`) first.
const WITHOUT_ON_DEMAND: &str = "\
SET LOCAL lock_timeout = '10s'; \
ALTER TABLE processed_events DROP CONSTRAINT IF EXISTS processed_events_source_check, \
  ADD CONSTRAINT processed_events_source_check \
    CHECK (source IN ('webhook', 'reconcile', 'replay'))";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(WITH_ON_DEMAND)
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(WITHOUT_ON_DEMAND)
            .await?;
        Ok(())
    }
}
