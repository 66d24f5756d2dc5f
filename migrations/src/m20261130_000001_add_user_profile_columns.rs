//! `users` gains what applications show and join on: `username`, `image_url`, `external_id`
//! (indexed), both metadata objects, `last_sign_in_at`, and `clerk_data`, the whole user object as
//! the stored version carried it, so any field Clerk has is queryable without a schema change.
//!
//! All nullable: rows written before this migration have none of them until their next event.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const EXTERNAL_ID_INDEX: &str = "users_external_id_idx";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(ColumnDef::new(Users::Username).text().null())
                    .add_column(ColumnDef::new(Users::ImageUrl).text().null())
                    .add_column(ColumnDef::new(Users::ExternalId).text().null())
                    .add_column(ColumnDef::new(Users::PublicMetadata).json_binary().null())
                    .add_column(ColumnDef::new(Users::PrivateMetadata).json_binary().null())
                    .add_column(
                        ColumnDef::new(Users::LastSignInAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .add_column(ColumnDef::new(Users::ClerkData).json_binary().null())
                    .to_owned(),
            )
            .await?;
        // Not unique: Clerk does not enforce it, and the sync must store what Clerk holds.
        manager
            .create_index(
                Index::create()
                    .name(EXTERNAL_ID_INDEX)
                    .table(Users::Table)
                    .col(Users::ExternalId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
            .await
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
