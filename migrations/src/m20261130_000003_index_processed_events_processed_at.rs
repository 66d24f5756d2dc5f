//! An index on `processed_events.processed_at`, so the worker's pruning finds the old rows
//! without reading the whole table.
//!
//! Locks: built `CONCURRENTLY`, outside a transaction: SHARE UPDATE EXCLUSIVE on
//! `processed_events` for the build (a scan of the table; reads and writes go on), after waiting
//! (at most `WORKER_LOCK_TIMEOUT` for the lock) for the transactions already running. First
//! written as a plain `CREATE INDEX` (writes blocked for the whole build); the index it leaves is
//! the same.

use sea_orm_migration::prelude::*;

use crate::online::create_index_concurrently;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const INDEX: &str = "processed_events_processed_at_idx";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        create_index_concurrently(manager, INDEX, "processed_events", &["processed_at"]).await
    }

    /// Drops the index: ACCESS EXCLUSIVE on `processed_events` for a moment.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(INDEX)
                    .table(ProcessedEvents::Table)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
}
