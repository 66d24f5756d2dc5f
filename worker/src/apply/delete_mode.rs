//! What a deletion does to the rows (`WORKER_DELETE_MODE`), one function per kind, called by the
//! rules (`users`, `organizations`) wherever a row is deleted: a user's, an organization's or a membership's `.deleted` event
//! (from a webhook, a reconcile, a replay or a rebuild), and a membership replaced by a newer
//! one of the same member.
//!
//! - [`DeleteMode::Hard`] (the default): the row goes, and so do the memberships that hang on a
//!   user or an organization.
//! - [`DeleteMode::Soft`]: the row stays with `deleted_at` set (the first deletion's time), and
//!   so do those memberships.
//! - [`DeleteMode::Anonymize`]: as `soft`, and the personal columns of those rows are cleared
//!   (`NULL`, or the empty value of a column that cannot be null: `''` for an organization's
//!   name, `{}` for metadata and `clerk_data`), and so are the history payloads of the deleted
//!   subjects. A stale event of a deleted subject keeps no payload either
//!   ([`forget_stale_payload`], [`forget_stale_user_payloads`]).
//!
//! In every mode a tombstone is written, so a deleted id never comes back. A kept row blocks
//! nothing: the unique indexes on `users.email` and on a membership's (organization, user) hold
//! only rows with `deleted_at IS NULL`, the email rule ignores kept rows, and reconcile's
//! deletion phase neither lists nor counts them. The views `live_users`, `live_organizations`
//! and `live_organization_memberships` show the rows that are not deleted, whatever the mode.
//!
//! [`purge`] removes kept rows once they have been deleted longer than
//! `WORKER_PURGE_DELETED_AFTER`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

/// What a deletion does to the rows: `WORKER_DELETE_MODE`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DeleteMode {
    /// The row is removed.
    #[default]
    Hard,
    /// The row is kept with `deleted_at` set.
    Soft,
    /// The row is kept with `deleted_at` set and its personal data cleared, and the history
    /// payloads of the subject too.
    Anonymize,
}

impl DeleteMode {
    /// Every mode, in the order the documentation lists them.
    pub const ALL: [DeleteMode; 3] = [DeleteMode::Hard, DeleteMode::Soft, DeleteMode::Anonymize];

    /// The value of `WORKER_DELETE_MODE` that names the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteMode::Hard => "hard",
            DeleteMode::Soft => "soft",
            DeleteMode::Anonymize => "anonymize",
        }
    }

    /// Whether the rows stay (with `deleted_at`).
    pub fn keeps_rows(self) -> bool {
        !matches!(self, DeleteMode::Hard)
    }

    /// Whether the personal data of deleted subjects is cleared.
    pub fn anonymizes(self) -> bool {
        matches!(self, DeleteMode::Anonymize)
    }

    /// `WORKER_DELETE_MODE` of the settings, checked.
    pub fn from_settings(settings: &shared::Settings) -> Result<Self, shared::ConfigError> {
        settings
            .worker_delete_mode
            .parse()
            .map_err(|reason| shared::ConfigError::Malformed {
                variable: "WORKER_DELETE_MODE",
                reason,
            })
    }
}

impl fmt::Display for DeleteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeleteMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        DeleteMode::ALL
            .into_iter()
            .find(|mode| text.eq_ignore_ascii_case(mode.as_str()))
            .ok_or_else(|| format!("{text:?} is not one of hard, soft, anonymize"))
    }
}

/// The clearing of a user's personal columns (`anonymize`).
const ANONYMIZED_USER: &str = "email = NULL, first_name = NULL, last_name = NULL, phone = NULL, \
     username = NULL, image_url = NULL, external_id = NULL, public_metadata = NULL, \
     private_metadata = NULL, last_sign_in_at = NULL, clerk_data = NULL";

/// The clearing of an organization's personal columns (`anonymize`); `created_by` is an id, like
/// a membership's `user_id`, and stays.
const ANONYMIZED_ORGANIZATION: &str = "name = '', slug = NULL, image_url = NULL, \
     public_metadata = '{}'::jsonb, clerk_data = '{}'::jsonb";

/// The clearing of a membership's personal columns (`anonymize`): its metadata, and the Clerk
/// object, which carries the member's name, identifier and image.
const ANONYMIZED_MEMBERSHIP: &str = "public_metadata = '{}'::jsonb, clerk_data = '{}'::jsonb";

/// How `deleted_at` is set: a row already kept keeps its first deletion's time.
const MARK: &str = "deleted_at = coalesce(deleted_at, now()), synced_at = now()";

/// What the rows of `table` whose `column` is in the CTE `gone` become in `mode`, as a
/// data-modifying CTE body returning the ids of the memberships it touched (for `anonymize`'s
/// payloads).
fn rows_statement(mode: DeleteMode, table: &str, column: &str, cleared: &str) -> String {
    match mode {
        DeleteMode::Hard => {
            format!("DELETE FROM {table} WHERE {column} IN (SELECT id FROM gone) RETURNING id")
        }
        // Only rows not yet kept: a second delete keeps the first deletion's time.
        DeleteMode::Soft => format!(
            "UPDATE {table} SET {MARK} WHERE {column} IN (SELECT id FROM gone) \
             AND deleted_at IS NULL RETURNING id"
        ),
        // Every row, kept or not: a row kept by `soft` before is cleared when it is deleted
        // again (a replay) under `anonymize`.
        DeleteMode::Anonymize => format!(
            "UPDATE {table} SET {MARK}, {cleared} WHERE {column} IN (SELECT id FROM gone) \
             RETURNING id"
        ),
    }
}

/// The statement that deletes subjects of one kind with everything hanging on them: `$1` the ids.
fn deletion(
    mode: DeleteMode,
    table: &str,
    cleared: &str,
    memberships_by: Option<&str>,
    tombstones: &str,
) -> String {
    let mut parts = vec![
        "gone AS (SELECT DISTINCT unnest($1::text[]) AS id)".to_owned(),
        format!(
            "subjects AS ({})",
            rows_statement(mode, table, "id", cleared)
        ),
    ];
    if let Some(column) = memberships_by {
        parts.push(format!(
            "memberships AS ({})",
            rows_statement(
                mode,
                "organization_memberships",
                column,
                ANONYMIZED_MEMBERSHIP
            )
        ));
    }
    if mode.anonymizes() {
        let memberships = if memberships_by.is_some() {
            " UNION ALL SELECT id FROM memberships"
        } else {
            ""
        };
        // The payloads of the subjects, and of the memberships that went with them (a
        // membership event carries its member's name, identifier and image).
        parts.push(format!(
            "payloads AS (UPDATE processed_events SET payload = NULL \
             WHERE subject_id IN (SELECT id FROM gone{memberships}) AND payload IS NOT NULL)"
        ));
    }
    format!(
        "WITH {} INSERT INTO {tombstones} (id, deleted_at) SELECT id, now() FROM gone \
         ON CONFLICT (id) DO NOTHING",
        parts.join(", ")
    )
}

async fn run<C: ConnectionTrait>(db: &C, sql: String, ids: Vec<String>) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [ids.into()],
    ))
    .await?;
    Ok(())
}

/// Deletes users in `mode`, with their organization memberships, and tombstones them (a second
/// delete keeps the first deletion time). The caller holds the users' locks.
pub async fn delete_users<C: ConnectionTrait>(
    db: &C,
    mode: DeleteMode,
    ids: Vec<String>,
) -> Result<(), DbErr> {
    let sql = deletion(
        mode,
        "users",
        ANONYMIZED_USER,
        Some("user_id"),
        "user_tombstones",
    );
    run(db, sql, ids).await
}

/// Deletes an organization in `mode`, with its memberships, and tombstones it.
pub async fn delete_organization<C: ConnectionTrait>(
    db: &C,
    mode: DeleteMode,
    id: &str,
) -> Result<(), DbErr> {
    let sql = deletion(
        mode,
        "organizations",
        ANONYMIZED_ORGANIZATION,
        Some("organization_id"),
        "organization_tombstones",
    );
    run(db, sql, vec![id.to_owned()]).await
}

/// Deletes a membership by id in `mode` and tombstones it.
pub async fn delete_membership<C: ConnectionTrait>(
    db: &C,
    mode: DeleteMode,
    id: &str,
) -> Result<(), DbErr> {
    let sql = deletion(
        mode,
        "organization_memberships",
        ANONYMIZED_MEMBERSHIP,
        None,
        "membership_tombstones",
    );
    run(db, sql, vec![id.to_owned()]).await
}

/// Under `anonymize`, drops the payload of the history row `svix_id` when the event was stale
/// because one of `ids` (its subject, or the organization or user a membership names) is
/// tombstoned: a late event must not bring a deleted subject's personal data back.
pub async fn forget_stale_payload<C: ConnectionTrait>(
    db: &C,
    mode: DeleteMode,
    svix_id: &str,
    ids: &[&str],
) -> Result<(), DbErr> {
    if !mode.anonymizes() {
        return Ok(());
    }
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE processed_events SET payload = NULL \
         WHERE svix_id = $1 AND payload IS NOT NULL AND ( \
           EXISTS (SELECT 1 FROM user_tombstones WHERE id = ANY ($2)) \
           OR EXISTS (SELECT 1 FROM organization_tombstones WHERE id = ANY ($2)) \
           OR EXISTS (SELECT 1 FROM membership_tombstones WHERE id = ANY ($2)))",
        [svix_id.into(), ids.into()],
    ))
    .await?;
    Ok(())
}

/// Drops the payloads of the user events `svix_ids` (recorded `stale` under `anonymize`) whose
/// user is tombstoned.
pub async fn forget_stale_user_payloads<C: ConnectionTrait>(
    db: &C,
    svix_ids: Vec<String>,
) -> Result<(), DbErr> {
    if svix_ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE processed_events p SET payload = NULL \
         WHERE p.svix_id = ANY ($1) AND p.payload IS NOT NULL \
           AND EXISTS (SELECT 1 FROM user_tombstones t WHERE t.id = p.subject_id)",
        [svix_ids.into()],
    ))
    .await?;
    Ok(())
}

/// Rows removed by one purge statement: small enough to hold their locks for milliseconds.
const PURGE_BATCH: i64 = 1000;

/// The tables whose kept rows [`purge`] removes.
const KEPT_TABLES: [&str; 3] = ["users", "organizations", "organization_memberships"];

/// Removes the rows deleted before `cutoff` (kept by `soft` or `anonymize`), a batch at a time;
/// their tombstones stay. Returns how many rows went.
pub async fn purge<C: ConnectionTrait>(db: &C, cutoff: DateTime<Utc>) -> Result<u64, DbErr> {
    let mut total = 0;
    for table in KEPT_TABLES {
        loop {
            // SKIP LOCKED: a row a transaction holds right now is left for the next round.
            let deleted = db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!(
                        "DELETE FROM {table} WHERE id IN ( \
                           SELECT id FROM {table} WHERE deleted_at < $1 \
                           ORDER BY deleted_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
                    ),
                    [cutoff.into(), PURGE_BATCH.into()],
                ))
                .await?
                .rows_affected();
            total += deleted;
            if deleted < PURGE_BATCH as u64 {
                break;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_their_names_and_a_bad_one_is_explained() {
        for mode in DeleteMode::ALL {
            assert_eq!(mode.as_str().parse::<DeleteMode>(), Ok(mode));
        }
        assert_eq!(" Soft ".parse::<DeleteMode>(), Ok(DeleteMode::Soft));
        let error = "archive".parse::<DeleteMode>().expect_err("unknown");
        assert!(error.contains("hard, soft, anonymize"), "{error}");
        assert_eq!(DeleteMode::default(), DeleteMode::Hard);
    }

    #[test]
    fn a_hard_delete_removes_and_the_others_keep() {
        let hard = deletion(
            DeleteMode::Hard,
            "users",
            ANONYMIZED_USER,
            Some("user_id"),
            "user_tombstones",
        );
        assert!(hard.contains("DELETE FROM users"), "{hard}");
        assert!(
            hard.contains("DELETE FROM organization_memberships"),
            "{hard}"
        );
        assert!(!hard.contains("processed_events"), "{hard}");
        let soft = deletion(
            DeleteMode::Soft,
            "users",
            ANONYMIZED_USER,
            Some("user_id"),
            "user_tombstones",
        );
        assert!(!soft.contains("DELETE"), "{soft}");
        assert!(!soft.contains("email = NULL"), "{soft}");
        let anonymize = deletion(
            DeleteMode::Anonymize,
            "organization_memberships",
            ANONYMIZED_MEMBERSHIP,
            None,
            "membership_tombstones",
        );
        assert!(!anonymize.contains("DELETE"), "{anonymize}");
        assert!(
            anonymize.contains("UPDATE processed_events SET payload = NULL"),
            "{anonymize}"
        );
    }
}
