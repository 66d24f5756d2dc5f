//! The SeaORM entities of the tables the worker writes: one home for each table's shape. (The
//! door writes organizations, memberships and the tombstones in SQL; the commands and the tests
//! read them through these.)

/// `users`: one row per Clerk user.
pub mod users {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub email: Option<String>,
        pub first_name: Option<String>,
        pub last_name: Option<String>,
        /// One of `WORKER_ROLES` when written; a row keeps a role that was dropped from the
        /// setting later until its next event.
        pub role: String,
        pub phone: Option<String>,
        pub created_at: DateTimeWithTimeZone,
        pub updated_at: DateTimeWithTimeZone,
        pub synced_at: DateTimeWithTimeZone,
        pub username: Option<String>,
        pub image_url: Option<String>,
        pub external_id: Option<String>,
        pub public_metadata: Option<Json>,
        pub private_metadata: Option<Json>,
        pub last_sign_in_at: Option<DateTimeWithTimeZone>,
        /// The user object exactly as the version stored here carried it; null for a row last
        /// written before the column existed.
        pub clerk_data: Option<Json>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `processed_events`: every svix-id handled, with its outcome: the event history.
pub mod processed_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "processed_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub svix_id: String,
        pub event_type: String,
        /// `applied`, `deleted`, `stale` or `ignored`.
        pub outcome: String,
        /// When the event was applied (its transaction's time).
        pub processed_at: DateTimeWithTimeZone,
        /// `webhook`, `reconcile`, `replay` or `on_demand`.
        pub source: String,
        /// `user`, `organization` or `membership`; null for an ignored type.
        pub subject_kind: Option<String>,
        pub subject_id: Option<String>,
        /// The body as delivered; null when payloads are not stored.
        pub payload: Option<Json>,
        pub svix_timestamp: Option<DateTimeWithTimeZone>,
        /// When the ingest accepted the event.
        pub received_at: Option<DateTimeWithTimeZone>,
        /// Why a `stale` event wrote nothing.
        pub reason: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    /// A row with its payload as text: SeaORM reads `jsonb` with serde_json's limit of 128
    /// levels of nesting, and an end user can nest metadata deeper (see `shared::json`).
    #[derive(sea_orm::FromQueryResult)]
    struct RowWithTextPayload {
        svix_id: String,
        event_type: String,
        outcome: String,
        processed_at: DateTimeWithTimeZone,
        source: String,
        subject_kind: Option<String>,
        subject_id: Option<String>,
        payload: Option<String>,
        svix_timestamp: Option<DateTimeWithTimeZone>,
        received_at: Option<DateTimeWithTimeZone>,
        reason: Option<String>,
    }

    /// The rows `select` (over the whole entity) finds, their payloads read at any depth: what
    /// the history commands read rows with.
    pub async fn all<C: ConnectionTrait>(
        select: Select<Entity>,
        db: &C,
    ) -> Result<Vec<Model>, DbErr> {
        use sea_orm::sea_query::{Alias, Expr, ExprTrait as _};
        use sea_orm::{Iterable as _, QuerySelect as _};
        let rows = select
            .select_only()
            .columns(Column::iter().filter(|column| !matches!(column, Column::Payload)))
            .column_as(
                Expr::col(Column::Payload).cast_as(Alias::new("text")),
                "payload",
            )
            .into_model::<RowWithTextPayload>()
            .all(db)
            .await?;
        rows.into_iter()
            .map(|row| {
                let payload = row
                    .payload
                    .map(|text| shared::json::from_slice(text.as_bytes()))
                    .transpose()
                    .map_err(|error| {
                        DbErr::Type(format!("payload of {} is not JSON: {error}", row.svix_id))
                    })?;
                Ok(Model {
                    svix_id: row.svix_id,
                    event_type: row.event_type,
                    outcome: row.outcome,
                    processed_at: row.processed_at,
                    source: row.source,
                    subject_kind: row.subject_kind,
                    subject_id: row.subject_id,
                    payload,
                    svix_timestamp: row.svix_timestamp,
                    received_at: row.received_at,
                    reason: row.reason,
                })
            })
            .collect()
    }
}

/// `user_tombstones`: ids of deleted users.
pub mod user_tombstones {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "user_tombstones")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub deleted_at: DateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `organizations`: one row per Clerk organization.
pub mod organizations {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "organizations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub slug: Option<String>,
        pub image_url: Option<String>,
        pub created_by: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub public_metadata: Json,
        /// The Organization object as the stored version carried it.
        #[sea_orm(column_type = "JsonBinary")]
        pub clerk_data: Json,
        pub created_at: DateTimeWithTimeZone,
        pub updated_at: DateTimeWithTimeZone,
        pub synced_at: DateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `organization_memberships`: who belongs to which organization, one row per (organization,
/// user).
pub mod organization_memberships {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "organization_memberships")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub organization_id: String,
        pub user_id: String,
        pub role: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub permissions: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub public_metadata: Json,
        /// The OrganizationMembership object as the stored version carried it.
        #[sea_orm(column_type = "JsonBinary")]
        pub clerk_data: Json,
        pub created_at: DateTimeWithTimeZone,
        pub updated_at: DateTimeWithTimeZone,
        pub synced_at: DateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `organization_tombstones`: ids of deleted organizations.
pub mod organization_tombstones {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "organization_tombstones")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub deleted_at: DateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `membership_tombstones`: ids of deleted (or replaced) memberships.
pub mod membership_tombstones {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "membership_tombstones")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub deleted_at: DateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
