//! `clerk_instance`: the Clerk instance the database mirrors, in one row. Pinned by the
//! `instance_id` of the first event applied or by `GET /v1/instance` on the first reconcile;
//! events and reconciles of any other instance are refused. Changed only by
//! `worker instance move`.
//!
//! A database that already holds synced rows takes its pin from its event history: when the
//! latest 10 000 history rows name, among the webhook events with a stored payload, exactly one
//! instance, that one is pinned (`pinned_by = 'history'`); otherwise nothing is, and the next
//! event or reconcile pins.
//!
//! Locks: in one transaction, creates a new table (nobody can see it yet) and reads at most the
//! latest 10 000 rows of `processed_events` through its `processed_at` index, under ACCESS SHARE,
//! which blocks no reader nor writer.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ClerkInstance::Table)
                    // Always true: the primary key that makes the table hold one row at most, so
                    // two transactions pinning at once meet on it and the second sees the first.
                    .col(
                        ColumnDef::new(ClerkInstance::Singleton)
                            .boolean()
                            .not_null()
                            .default(true)
                            .primary_key()
                            .check(Expr::col(ClerkInstance::Singleton)),
                    )
                    // `ins_…`.
                    .col(ColumnDef::new(ClerkInstance::Id).text().not_null())
                    // `development` or `production` once a reconcile read it from
                    // `GET /v1/instance`; null when only events were seen (they do not say).
                    .col(ColumnDef::new(ClerkInstance::EnvironmentType).text())
                    .col(
                        ColumnDef::new(ClerkInstance::PinnedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    // What pinned it: `webhook` (an event's `instance_id`), `reconcile`
                    // (`GET /v1/instance`) or `move` (`worker instance move`).
                    .col(ColumnDef::new(ClerkInstance::PinnedBy).text().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(PIN_FROM_HISTORY)
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ClerkInstance::Table).to_owned())
            .await
    }
}

/// Bounded: the latest 10 000 history rows at most, whatever the table's size.
const PIN_FROM_HISTORY: &str = "\
INSERT INTO clerk_instance (singleton, id, environment_type, pinned_at, pinned_by) \
SELECT true, min(latest.instance), NULL, now(), 'history' \
FROM ( \
  SELECT payload->>'instance_id' AS instance, source FROM processed_events \
  ORDER BY processed_at DESC LIMIT 10000) AS latest \
WHERE latest.source = 'webhook' AND latest.instance IS NOT NULL AND latest.instance <> '' \
HAVING count(DISTINCT latest.instance) = 1";

#[derive(DeriveIden)]
enum ClerkInstance {
    Table,
    Singleton,
    Id,
    EnvironmentType,
    PinnedAt,
    PinnedBy,
}
