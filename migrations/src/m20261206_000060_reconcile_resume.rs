//! Reconcile runs that survive being stopped, in flat memory:
//! - `reconcile_listed (listing_id, kind, id)`: the ids a run's listing returned, written page by
//!   page, so the deletion phase finds the stored objects missing from the listing with an
//!   anti-join in Postgres instead of in the worker's memory, and an interrupted listing keeps
//!   what it listed. Its `kind` is `users`, `organizations` or `memberships` for the listed ids,
//!   and `<kind>.gone` for the ids a deletion phase confirmed gone from Clerk.
//! - `reconcile_runs.listing_id` (the run whose listing this run writes: its own id, or the id
//!   of the run it resumed), `listing_kind` and `listing_cursor` (where its listing stands: the
//!   last user listed, or the offset of organizations or memberships; written after each page's
//!   writes committed), `resumed_from` (the interrupted run it continues).
//! - `reconcile_runs.outcome` may now be `interrupted` (a run stopped by SIGTERM, or found
//!   `running` with nobody holding the reconcile lock); the `CHECK` added here names every
//!   outcome (there was none).
//!
//! Locks, outside a transaction, each step safe to run again: the new table locks nothing
//! anyone else uses; `ADD COLUMN` (nullable, no default: no rewrite, no scan) takes ACCESS
//! EXCLUSIVE on `reconcile_runs` for a moment, waiting at most `WORKER_LOCK_TIMEOUT`; the
//! `CHECK` is added `NOT VALID` (ACCESS EXCLUSIVE for a moment, no scan) and then validated
//! (SHARE UPDATE EXCLUSIVE: reads and writes go on; a scan of a table of one row per run).

use sea_orm_migration::prelude::*;

use crate::online::add_check;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const OUTCOMES: &str = "reconcile_runs_outcome_check";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// Each step committed on its own: see the module comment.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS reconcile_listed (\
               listing_id text NOT NULL, kind text NOT NULL, id text NOT NULL, \
               PRIMARY KEY (listing_id, kind, id))",
        )
        .await?;
        db.execute_unprepared(
            "ALTER TABLE reconcile_runs \
               ADD COLUMN IF NOT EXISTS listing_id text NULL, \
               ADD COLUMN IF NOT EXISTS listing_kind text NULL, \
               ADD COLUMN IF NOT EXISTS listing_cursor text NULL, \
               ADD COLUMN IF NOT EXISTS resumed_from text NULL",
        )
        .await?;
        add_check(
            manager,
            "reconcile_runs",
            OUTCOMES,
            "outcome IN ('running', 'succeeded', 'failed', 'interrupted')",
        )
        .await
    }

    /// Interrupted runs become failed ones (what they were recorded as before), then the check,
    /// the columns and the table go: ACCESS EXCLUSIVE on `reconcile_runs` for a moment each.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "ALTER TABLE reconcile_runs DROP CONSTRAINT IF EXISTS {OUTCOMES}"
        ))
        .await?;
        db.execute_unprepared(
            "UPDATE reconcile_runs SET outcome = 'failed' WHERE outcome = 'interrupted'",
        )
        .await?;
        db.execute_unprepared(
            "ALTER TABLE reconcile_runs \
               DROP COLUMN IF EXISTS listing_id, DROP COLUMN IF EXISTS listing_kind, \
               DROP COLUMN IF EXISTS listing_cursor, DROP COLUMN IF EXISTS resumed_from",
        )
        .await?;
        db.execute_unprepared("DROP TABLE IF EXISTS reconcile_listed")
            .await?;
        Ok(())
    }
}
