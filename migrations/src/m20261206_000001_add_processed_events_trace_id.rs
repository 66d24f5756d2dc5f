//! `processed_events.trace_id`: the OpenTelemetry trace (32 hex digits) an event was handled
//! in, when one was recorded, so `worker explain` can point at the trace. Nullable without a
//! default: adding it rewrites nothing and holds the table's `ACCESS EXCLUSIVE` lock only for the
//! catalog change, waiting for it at most 5 s (then the migration fails and can be run again);
//! rows from before it stay null.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "SET LOCAL lock_timeout = '5s'; \
                 ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS trace_id text",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "SET LOCAL lock_timeout = '5s'; \
                 ALTER TABLE processed_events DROP COLUMN IF EXISTS trace_id",
            )
            .await?;
        Ok(())
    }
}
