//! What writing a version would change, asked before anything is written: how each of a page of
//! upserts (read under the current [`super::Reading`]: roles, delete mode) stands against what
//! is stored. Reconcile calls a listed object `unchanged` only when its stored row is, column
//! for column, what the door would write for it now; anything else is written, a row of the
//! same `updated_at` as a repair ([`super::Event::repairing`]).
//!
//! The expected rows are built by the code that writes them (`users`, `organizations`): one
//! mapping from a version to its columns, so the comparison cannot drift from the write. The
//! comparison runs in Postgres, one statement per kind in the page.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, QueryResult};
use shared::events::UserRecord;
use shared::organizations::{MembershipRecord, OrganizationRecord};

use super::event::{Action, Event};
use super::organizations::{self, Change};
use super::users;

/// The history reason of a repair: an applied version whose `updated_at` the stored row had.
pub const REPAIRED: &str =
    "the stored row of this updated_at differed from what this version writes; rewritten";

/// How a version stands against what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The stored row's `updated_at`; `None` when there is no row.
    pub updated_at: Option<DateTime<Utc>>,
    /// The object, or one it hangs on (a membership's organization or user), has a tombstone:
    /// nothing of this version is written.
    pub tombstoned: bool,
    /// The stored rows are exactly what writing this version would store (a membership's
    /// organization snapshot included: it would not advance the organization row).
    pub same: bool,
}

impl Standing {
    /// `id`, `updated_at`, `tombstoned` and `same` of a comparison's row.
    pub(super) fn read(row: &QueryResult) -> Result<(String, Standing), DbErr> {
        Ok((
            row.try_get("", "id")?,
            Standing {
                updated_at: row.try_get("", "updated_at")?,
                tombstoned: row.try_get("", "tombstoned")?,
                same: row.try_get("", "same")?,
            },
        ))
    }
}

/// How each upsert of `events` stands, by the id of what it writes; deletes and ignored types
/// are left out. Reads only.
pub async fn standing<C: ConnectionTrait>(
    db: &C,
    events: &[&Event],
) -> Result<HashMap<String, Standing>, DbErr> {
    let mut users: Vec<&UserRecord> = Vec::new();
    let mut organizations: Vec<&OrganizationRecord> = Vec::new();
    let mut memberships: Vec<&MembershipRecord> = Vec::new();
    for event in events {
        match &event.action {
            Action::Upsert(record) => users.push(record),
            Action::Organization(Change::UpsertOrganization(record)) => organizations.push(record),
            Action::Organization(Change::UpsertMembership(record)) => memberships.push(record),
            Action::Organization(_) | Action::Delete { .. } | Action::Ignore => {}
        }
    }
    let mut standing = HashMap::with_capacity(events.len());
    if !users.is_empty() {
        standing.extend(users::compare_users(db, &users).await?);
    }
    if !organizations.is_empty() {
        standing.extend(organizations::compare_organizations(db, &organizations).await?);
    }
    if !memberships.is_empty() {
        standing.extend(organizations::compare_memberships(db, &memberships).await?);
    }
    Ok(standing)
}
