//! `reconcile_runs`: one row per `worker reconcile` (by command or on schedule), so an operator
//! can see when the tables were last brought to what Clerk holds, and what changed.
//!
//! Locks: none that anyone waits for: it creates the table and its index, in one transaction.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ReconcileRuns::Table)
                    .col(
                        ColumnDef::new(ReconcileRuns::Id)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    // `command` or `schedule`.
                    .col(ColumnDef::new(ReconcileRuns::Trigger).text().not_null())
                    .col(
                        ColumnDef::new(ReconcileRuns::StartedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ReconcileRuns::FinishedAt).timestamp_with_time_zone())
                    // `running`, `succeeded` or `failed`.
                    .col(ColumnDef::new(ReconcileRuns::Outcome).text().not_null())
                    // The summary's counts, `{"users": {"listed": …, …}}`: JSON, so the counts
                    // of organizations and memberships join without a migration.
                    .col(
                        ColumnDef::new(ReconcileRuns::Counts)
                            .json_binary()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ReconcileRuns::Error).text())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("reconcile_runs_started_at")
                    .table(ReconcileRuns::Table)
                    .col(ReconcileRuns::StartedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ReconcileRuns::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ReconcileRuns {
    Table,
    Id,
    Trigger,
    StartedAt,
    FinishedAt,
    Outcome,
    Counts,
    Error,
}
