//! The SeaORM entity the worker writes through. (Users, organizations, memberships and their
//! tombstones are written in SQL; tests read them through `test-support`.)

/// `processed_events`: every svix-id handled, with its outcome.
pub mod processed_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "processed_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub svix_id: String,
        pub event_type: String,
        /// `applied`, `stale` or `ignored`.
        pub outcome: String,
        pub processed_at: DateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
