//! `processed_events.trace_id`: the OpenTelemetry trace (32 hex digits) an event was handled
//! in, when one was recorded, so `worker explain` can point at the trace. Rows from before it
//! stay null.
//!
//! Locks, on `processed_events`, outside a transaction: ACCESS EXCLUSIVE for a moment to add the
//! column (nullable, no default: no rewrite, no scan). It waits at most `WORKER_LOCK_TIMEOUT`
//! for the lock (set on the migrating connection, see `online::connect`) and can be run again.
//! First written with a `SET LOCAL lock_timeout` of its own; the schema it leaves is the same.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// One step, committed on its own: see the module comment.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ProcessedEvents::Table)
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::TraceId).text().null(),
                    )
                    .to_owned(),
            )
            .await
    }

    /// In one transaction of its own: ACCESS EXCLUSIVE on `processed_events` until it commits.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let manager = manager.begin().await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ProcessedEvents::Table)
                    .drop_column(ProcessedEvents::TraceId)
                    .to_owned(),
            )
            .await?;
        manager.commit().await
    }
}

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
    TraceId,
}
