//! The clerk-sync database schema, one migration per change. Applied by the `migrations` binary
//! and, unless told not to, by the worker at start, both through [`online::up`]: one process at a
//! time, under a lock timeout.
//!
//! Every migration runs while the worker applies events, so each one says in its module comment
//! what it locks and for how long; the rules (indexes `CONCURRENTLY`, constraints `NOT VALID`
//! then validated, no table rewrites) are in `docs/upgrades.md`.

pub use sea_orm_migration::prelude::*;

pub mod online;

mod m20261127_000001_create_users;
mod m20261127_000002_create_user_tombstones;
mod m20261127_000003_create_processed_events;
mod m20261130_000001_add_user_profile_columns;
mod m20261130_000002_drop_users_role_check;
mod m20261130_000003_index_processed_events_processed_at;
mod m20261130_000004_create_organizations;
mod m20261130_000005_create_reconcile_runs;
mod m20261130_000006_extend_processed_events_into_history;
mod m20261206_000001_allow_on_demand_source;
mod m20261206_000030_create_clerk_instance;
mod m20261206_000040_add_deleted_at;
mod m20261206_000050_add_processed_events_trace_id;
mod m20261206_000060_reconcile_resume;

/// Every migration, oldest first. Never edit one that has been applied anywhere; add a new one.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_create_users::Migration),
            Box::new(m20261127_000002_create_user_tombstones::Migration),
            Box::new(m20261127_000003_create_processed_events::Migration),
            Box::new(m20261130_000001_add_user_profile_columns::Migration),
            Box::new(m20261130_000002_drop_users_role_check::Migration),
            Box::new(m20261130_000003_index_processed_events_processed_at::Migration),
            Box::new(m20261130_000004_create_organizations::Migration),
            Box::new(m20261130_000005_create_reconcile_runs::Migration),
            Box::new(m20261130_000006_extend_processed_events_into_history::Migration),
            Box::new(m20261206_000001_allow_on_demand_source::Migration),
            Box::new(m20261206_000030_create_clerk_instance::Migration),
            Box::new(m20261206_000040_add_deleted_at::Migration),
            Box::new(m20261206_000050_add_processed_events_trace_id::Migration),
            Box::new(m20261206_000060_reconcile_resume::Migration),
        ]
    }
}
