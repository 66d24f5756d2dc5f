//! `processed_events`: every svix-id the worker has handled and what came of it, so a redelivered
//! or resent event changes nothing.
//!
//! Locks: none that anyone waits for: it creates the table, in one transaction.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ProcessedEvents::Table)
                    .col(
                        ColumnDef::new(ProcessedEvents::SvixId)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(ProcessedEvents::EventType).text().not_null())
                    .col(
                        ColumnDef::new(ProcessedEvents::Outcome)
                            .text()
                            .not_null()
                            .check(
                                Expr::col(ProcessedEvents::Outcome)
                                    .is_in(["applied", "stale", "ignored"]),
                            ),
                    )
                    .col(
                        ColumnDef::new(ProcessedEvents::ProcessedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ProcessedEvents::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
    SvixId,
    EventType,
    Outcome,
    ProcessedAt,
}
