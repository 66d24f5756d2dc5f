//! `users`: one row per Clerk user, as of the newest event applied for it.
//!
//! Locks: none that anyone waits for: it creates the table (and its indexes with it), in one
//! transaction, and nothing else can see the table before it commits.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .col(ColumnDef::new(Users::Id).text().not_null().primary_key())
                    // Unique, but null for users without an email (phone-only, username-only),
                    // and Postgres lets any number of rows hold null.
                    .col(ColumnDef::new(Users::Email).text().null().unique_key())
                    .col(ColumnDef::new(Users::FirstName).text().null())
                    .col(ColumnDef::new(Users::LastName).text().null())
                    .col(
                        ColumnDef::new(Users::Role)
                            .text()
                            .not_null()
                            .default("client")
                            .check(Expr::col(Users::Role).is_in(["admin", "trainer", "client"])),
                    )
                    .col(ColumnDef::new(Users::Phone).text().null())
                    .col(
                        ColumnDef::new(Users::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Users::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Users::SyncedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Users::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Email,
    FirstName,
    LastName,
    Role,
    Phone,
    CreatedAt,
    UpdatedAt,
    SyncedAt,
}
