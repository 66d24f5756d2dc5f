//! `users` gains what applications show and join on: `username`, `image_url`, `external_id`
//! (indexed), both metadata objects, `last_sign_in_at`, and `clerk_data`, the whole user object as
//! the stored version carried it, so any field Clerk has is queryable without a schema change.
//!
//! All nullable: rows written before this migration have none of them until their next event.
//!
//! Locks, on `users`, outside a transaction: ACCESS EXCLUSIVE for a moment to add the columns
//! (nullable, no default: no rewrite, no scan); then the `external_id` index is built
//! `CONCURRENTLY` (SHARE UPDATE EXCLUSIVE for the build; reads and writes go on). Each step waits
//! at most `WORKER_LOCK_TIMEOUT` for its lock and can be run again. First written as one
//! transaction (writes to `users` blocked for the whole index build); the schema it leaves is the
//! same.

use sea_orm_migration::prelude::*;

use crate::online::create_index_concurrently;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const EXTERNAL_ID_INDEX: &str = "users_external_id_idx";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// Step by step: `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column_if_not_exists(ColumnDef::new(Users::Username).text().null())
                    .add_column_if_not_exists(ColumnDef::new(Users::ImageUrl).text().null())
                    .add_column_if_not_exists(ColumnDef::new(Users::ExternalId).text().null())
                    .add_column_if_not_exists(
                        ColumnDef::new(Users::PublicMetadata).json_binary().null(),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(Users::PrivateMetadata).json_binary().null(),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(Users::LastSignInAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .add_column_if_not_exists(ColumnDef::new(Users::ClerkData).json_binary().null())
                    .to_owned(),
            )
            .await?;
        // Not unique: Clerk does not enforce it, and the sync must store what Clerk holds.
        create_index_concurrently(manager, EXTERNAL_ID_INDEX, "users", &["external_id"]).await
    }

    /// In one transaction of its own: ACCESS EXCLUSIVE on `users` until it commits.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let manager = manager.begin().await?;
        manager
            .drop_index(
                Index::drop()
                    .name(EXTERNAL_ID_INDEX)
                    .table(Users::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .drop_column(Users::Username)
                    .drop_column(Users::ImageUrl)
                    .drop_column(Users::ExternalId)
                    .drop_column(Users::PublicMetadata)
                    .drop_column(Users::PrivateMetadata)
                    .drop_column(Users::LastSignInAt)
                    .drop_column(Users::ClerkData)
                    .to_owned(),
            )
            .await?;
        manager.commit().await
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Username,
    ImageUrl,
    ExternalId,
    PublicMetadata,
    PrivateMetadata,
    LastSignInAt,
    ClerkData,
}
