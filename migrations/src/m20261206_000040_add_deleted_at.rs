//! Rows kept after their deletion (`WORKER_DELETE_MODE` `soft` or `anonymize`): `deleted_at` on
//! `users`, `organizations` and `organization_memberships`; the unique rules hold only the rows
//! not deleted, so a kept row never blocks a new one; and the views `live_users`,
//! `live_organizations` and `live_organization_memberships`, the rows not deleted, for the
//! application to read in every mode.
//!
//! Steps, outside a transaction (`CREATE INDEX CONCURRENTLY` cannot run in one), each safe to run
//! again after an interruption:
//! 1. `ADD COLUMN deleted_at timestamptz NULL` on each table: no default, so no rewrite; ACCESS
//!    EXCLUSIVE on the table for a moment (a catalog change), once the transactions already
//!    running on it are done.
//! 2. Indexes built `CONCURRENTLY` (SHARE UPDATE EXCLUSIVE: reads and writes go on; each build
//!    scans its table once or twice and waits, without a lock timeout, for the transactions
//!    running at its start; the other statements run under `WORKER_LOCK_TIMEOUT`), as
//!    `online::create_index_concurrently` does, with the `UNIQUE` and `WHERE` it has not:
//!    - `users_email_live_key`: unique `users(email) WHERE deleted_at IS NULL`;
//!    - `organization_memberships_organization_user_live_key`: unique
//!      `(organization_id, user_id) WHERE deleted_at IS NULL`;
//!    - `idx_organization_memberships_organization`: `(organization_id)`, for the lookups by
//!      organization the old unique index served, whatever the row's state;
//!    - `<table>_deleted_at_idx`: `(deleted_at) WHERE deleted_at IS NOT NULL` on each table, for
//!      the purge (`WORKER_PURGE_DELETED_AFTER`); small, it holds the kept rows only.
//!
//!    An invalid index left by an interrupted build is dropped (`CONCURRENTLY`) and built again.
//! 3. The old unique rules go once their partial replacements exist: the constraint
//!    `users_email_key` (`ALTER TABLE … DROP CONSTRAINT`: ACCESS EXCLUSIVE on `users` for a
//!    moment, no scan) and the index `uq_organization_memberships_organization_user`
//!    (`DROP INDEX CONCURRENTLY`).
//! 4. The views (`CREATE OR REPLACE VIEW`: a catalog change, nothing on the tables but ACCESS
//!    SHARE). `SELECT *` is expanded when a view is made: a migration that adds a column to one
//!    of the tables makes its view again to show it.
//!
//! `down` refuses while kept rows exist (dropping `deleted_at` would make them live again, and
//! they may hold emails that live users hold too); it restores the full unique rules the same
//! way (built concurrently, then attached).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::online::without_lock_timeout;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const TABLES: [&str; 3] = ["users", "organizations", "organization_memberships"];

/// The indexes `up` builds: name, table, definition, unique.
const INDEXES: [(&str, &str, &str, bool); 6] = [
    (
        "users_email_live_key",
        "users",
        "(email) WHERE deleted_at IS NULL",
        true,
    ),
    (
        "organization_memberships_organization_user_live_key",
        "organization_memberships",
        "(organization_id, user_id) WHERE deleted_at IS NULL",
        true,
    ),
    (
        "idx_organization_memberships_organization",
        "organization_memberships",
        "(organization_id)",
        false,
    ),
    (
        "users_deleted_at_idx",
        "users",
        "(deleted_at) WHERE deleted_at IS NOT NULL",
        false,
    ),
    (
        "organizations_deleted_at_idx",
        "organizations",
        "(deleted_at) WHERE deleted_at IS NOT NULL",
        false,
    ),
    (
        "organization_memberships_deleted_at_idx",
        "organization_memberships",
        "(deleted_at) WHERE deleted_at IS NOT NULL",
        false,
    ),
];

const OLD_MEMBERSHIP_INDEX: &str = "uq_organization_memberships_organization_user";
const OLD_EMAIL_CONSTRAINT: &str = "users_email_key";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for table in TABLES {
            db.execute_unprepared(&format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS deleted_at timestamptz NULL"
            ))
            .await?;
        }
        for (name, table, definition, unique) in INDEXES {
            build_index(manager, name, table, definition, unique).await?;
        }
        db.execute_unprepared(&format!(
            "ALTER TABLE users DROP CONSTRAINT IF EXISTS {OLD_EMAIL_CONSTRAINT}"
        ))
        .await?;
        without_lock_timeout(
            manager,
            &format!("DROP INDEX CONCURRENTLY IF EXISTS {OLD_MEMBERSHIP_INDEX}"),
        )
        .await?;
        for table in TABLES {
            db.execute_unprepared(&format!(
                "CREATE OR REPLACE VIEW live_{table} AS \
                 SELECT * FROM {table} WHERE deleted_at IS NULL"
            ))
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for table in TABLES {
            let kept = db
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT count(*) AS n FROM {table} WHERE deleted_at IS NOT NULL"),
                ))
                .await?
                .map(|row| row.try_get::<i64>("", "n"))
                .transpose()?
                .unwrap_or(0);
            if kept > 0 {
                return Err(DbErr::Migration(format!(
                    "{table} holds {kept} rows kept after their deletion; remove them first \
                     (DELETE FROM {table} WHERE deleted_at IS NOT NULL, or \
                     WORKER_PURGE_DELETED_AFTER), since without deleted_at they would be live \
                     again"
                )));
            }
        }
        for table in TABLES {
            db.execute_unprepared(&format!("DROP VIEW IF EXISTS live_{table}"))
                .await?;
        }
        build_index(
            manager,
            OLD_MEMBERSHIP_INDEX,
            "organization_memberships",
            "(organization_id, user_id)",
            true,
        )
        .await?;
        build_index(manager, OLD_EMAIL_CONSTRAINT, "users", "(email)", true).await?;
        let attached = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT EXISTS (SELECT 1 FROM pg_constraint \
                     WHERE conname = '{OLD_EMAIL_CONSTRAINT}') AS attached"
                ),
            ))
            .await?
            .map(|row| row.try_get::<bool>("", "attached"))
            .transpose()?
            .unwrap_or(false);
        if !attached {
            db.execute_unprepared(&format!(
                "ALTER TABLE users ADD CONSTRAINT {OLD_EMAIL_CONSTRAINT} \
                 UNIQUE USING INDEX {OLD_EMAIL_CONSTRAINT}"
            ))
            .await?;
        }
        for (name, _, _, _) in INDEXES {
            without_lock_timeout(
                manager,
                &format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"),
            )
            .await?;
        }
        for table in TABLES {
            db.execute_unprepared(&format!(
                "ALTER TABLE {table} DROP COLUMN IF EXISTS deleted_at"
            ))
            .await?;
        }
        Ok(())
    }
}

/// Builds an index `CONCURRENTLY`, unless a valid one of that name exists; an invalid one (an
/// interrupted build) is dropped first.
async fn build_index(
    manager: &SchemaManager<'_>,
    name: &str,
    table: &str,
    definition: &str,
    unique: bool,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let valid = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT i.indisvalid AS valid FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace",
            [name.into()],
        ))
        .await?
        .map(|row| row.try_get::<bool>("", "valid"))
        .transpose()?;
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            tracing::warn!(
                index = name,
                "an earlier build left this index invalid; dropping it to build it again"
            );
            without_lock_timeout(
                manager,
                &format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"),
            )
            .await?;
        }
        None => {}
    }
    let unique = if unique { "UNIQUE " } else { "" };
    tracing::info!(
        index = name,
        table,
        "building the index concurrently (after the transactions already running end)"
    );
    without_lock_timeout(
        manager,
        &format!("CREATE {unique}INDEX CONCURRENTLY {name} ON {table} {definition}"),
    )
    .await
}
