//! `users.role` loses its fixed check (`admin`, `trainer`, `client`) and its default: the roles
//! are the worker's `WORKER_ROLES` setting, which the worker enforces on every write, so changing
//! them needs no migration. A constraint kept in step with the setting would make a worker still
//! running with the previous setting (during a rolling change) fail every write of a role the new
//! one dropped, and would block updates of rows that keep a retired role.
//!
//! Locks: ACCESS EXCLUSIVE on `users` for a moment (dropping a constraint and a default scans and
//! rewrites nothing), waiting at most `WORKER_LOCK_TIMEOUT` for it; in one transaction.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

/// The name Postgres gave the column's inline check in `m20261127_000001_create_users`.
const ROLE_CHECK: &str = "users_role_check";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "ALTER TABLE users DROP CONSTRAINT IF EXISTS {ROLE_CHECK}, \
                 ALTER COLUMN role DROP DEFAULT"
            ))
            .await?;
        Ok(())
    }

    /// Fails, changing nothing, while a row holds a role other than the three: those rows are the
    /// operator's to settle first.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "ALTER TABLE users \
                 ADD CONSTRAINT {ROLE_CHECK} CHECK (role IN ('admin', 'trainer', 'client')), \
                 ALTER COLUMN role SET DEFAULT 'client'"
            ))
            .await?;
        Ok(())
    }
}
