//! `user_tombstones`: the ids of deleted users, so a late create or update never brings one back.
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
                    .table(UserTombstones::Table)
                    .col(
                        ColumnDef::new(UserTombstones::Id)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(UserTombstones::DeletedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(UserTombstones::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum UserTombstones {
    Table,
    Id,
    DeletedAt,
}
