//! `organizations`, `organization_memberships` and a tombstone table for each: Clerk
//! Organizations and who belongs to them, as of the newest event applied for each.
//!
//! No foreign keys between the synced tables: events arrive in any order, so a membership may be
//! stored before its organization or its user.
//!
//! Locks: none that anyone waits for: it creates four tables and their indexes, in one
//! transaction (the indexes are built with their empty tables, which nothing else can see before
//! it commits, so `CONCURRENTLY` would gain nothing).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Organizations::Table)
                    .col(
                        ColumnDef::new(Organizations::Id)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Organizations::Name).text().not_null())
                    // Mutable, and off by default for newer Clerk apps: never a key.
                    .col(ColumnDef::new(Organizations::Slug).text().null())
                    .col(ColumnDef::new(Organizations::ImageUrl).text().null())
                    .col(ColumnDef::new(Organizations::CreatedBy).text().null())
                    .col(
                        ColumnDef::new(Organizations::PublicMetadata)
                            .json_binary()
                            .not_null()
                            .default(Expr::cust("'{}'::jsonb")),
                    )
                    .col(
                        ColumnDef::new(Organizations::ClerkData)
                            .json_binary()
                            .not_null(),
                    )
                    .col(timestamp(Organizations::CreatedAt))
                    .col(timestamp(Organizations::UpdatedAt))
                    .col(timestamp(Organizations::SyncedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_organizations_slug")
                    .table(Organizations::Table)
                    .col(Organizations::Slug)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Memberships::Table)
                    .col(
                        ColumnDef::new(Memberships::Id)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(Memberships::OrganizationId)
                            .text()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Memberships::UserId).text().not_null())
                    // Opaque: `org:admin`, `org:member`, custom `org:…`, legacy `admin`.
                    .col(ColumnDef::new(Memberships::Role).text().not_null())
                    .col(
                        ColumnDef::new(Memberships::Permissions)
                            .json_binary()
                            .not_null()
                            .default(Expr::cust("'[]'::jsonb")),
                    )
                    .col(
                        ColumnDef::new(Memberships::PublicMetadata)
                            .json_binary()
                            .not_null()
                            .default(Expr::cust("'{}'::jsonb")),
                    )
                    .col(
                        ColumnDef::new(Memberships::ClerkData)
                            .json_binary()
                            .not_null(),
                    )
                    .col(timestamp(Memberships::CreatedAt))
                    .col(timestamp(Memberships::UpdatedAt))
                    .col(timestamp(Memberships::SyncedAt))
                    .to_owned(),
            )
            .await?;
        // One membership per (organization, user) at a time. Its leading column also serves
        // lookups by organization.
        manager
            .create_index(
                Index::create()
                    .name("uq_organization_memberships_organization_user")
                    .table(Memberships::Table)
                    .col(Memberships::OrganizationId)
                    .col(Memberships::UserId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_organization_memberships_user")
                    .table(Memberships::Table)
                    .col(Memberships::UserId)
                    .to_owned(),
            )
            .await?;

        for table in [
            OrganizationTombstones::Table.into_iden(),
            MembershipTombstones::Table.into_iden(),
        ] {
            manager
                .create_table(
                    Table::create()
                        .table(table)
                        .col(
                            ColumnDef::new(OrganizationTombstones::Id)
                                .text()
                                .not_null()
                                .primary_key(),
                        )
                        .col(timestamp(OrganizationTombstones::DeletedAt))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            MembershipTombstones::Table.into_iden(),
            OrganizationTombstones::Table.into_iden(),
            Memberships::Table.into_iden(),
            Organizations::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}

fn timestamp(column: impl IntoIden) -> ColumnDef {
    ColumnDef::new(column)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

#[derive(DeriveIden)]
enum Organizations {
    Table,
    Id,
    Name,
    Slug,
    ImageUrl,
    CreatedBy,
    PublicMetadata,
    ClerkData,
    CreatedAt,
    UpdatedAt,
    SyncedAt,
}

#[derive(DeriveIden)]
enum Memberships {
    #[sea_orm(iden = "organization_memberships")]
    Table,
    Id,
    OrganizationId,
    UserId,
    Role,
    Permissions,
    PublicMetadata,
    ClerkData,
    CreatedAt,
    UpdatedAt,
    SyncedAt,
}

/// The ids of deleted organizations (also the column names of `membership_tombstones`).
#[derive(DeriveIden)]
enum OrganizationTombstones {
    Table,
    Id,
    DeletedAt,
}

/// The ids of deleted memberships.
#[derive(DeriveIden)]
enum MembershipTombstones {
    Table,
}
