//! Organizations and memberships: what their events ask for ([`Change`]) and how it is applied.
//!
//! The rules (DESIGN.md "Organizations and memberships"):
//! - creates and updates: last writer wins on `updated_at`; an older or equal version, or one
//!   whose id has a tombstone, writes nothing;
//! - a delete always wins and leaves a tombstone. Memberships are deleted by membership id, so a
//!   late delete of a removed member's old id never touches the re-added member's new row;
//! - `organization.deleted` removes the organization's memberships, and `user.deleted` the
//!   user's (in `apply.rs`), in the same transaction; a membership of a tombstoned organization
//!   or user is never written;
//! - a membership may arrive before its organization or its user, and is kept;
//! - one membership per (organization, user): the one created later (then the greater id)
//!   replaces the other, whose id is tombstoned, since Clerk has deleted it;
//! - a membership's `organization` snapshot creates or advances the organization row by the same
//!   last-writer-wins rule.
//!
//! The caller holds the transaction-scoped advisory locks of [`Change::lock_ids`] (the
//! organization, the user and the membership), so changes to one organization, one member or
//! one membership never interleave, whichever worker applies them. The record-level functions
//! ([`apply_change`], [`apply_changes`]) need no svix-id, for callers other than the event path.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait};
use serde_json::Value;
use shared::organizations::{
    MembershipDeletion, MembershipRecord, OrganizationDataError, OrganizationEventKind,
    OrganizationRecord, deleted_organization_id,
};

use crate::apply::Outcome;
use crate::event::{Event, ReadError, Subject};

/// What an organization or membership event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `organization.created|updated`: this version, if it is the newest.
    UpsertOrganization(Box<OrganizationRecord>),
    /// `organization.deleted`: remove the organization and its memberships for good.
    DeleteOrganization { id: String },
    /// `organizationMembership.created|updated`: this version, if it is the newest, and its
    /// organization snapshot.
    UpsertMembership(Box<MembershipRecord>),
    /// `organizationMembership.deleted`: remove this membership id for good.
    DeleteMembership(Box<MembershipDeletion>),
}

impl Change {
    /// Reads the `data` of an organization or membership event.
    pub fn read(kind: OrganizationEventKind, data: Value) -> Result<Self, ReadError> {
        use OrganizationEventKind as Kind;
        let message = |e: OrganizationDataError| match e {
            OrganizationDataError::NoUserId => {
                ReadError::Permanent(format!("organizationMembership without a user: {e}"))
            }
            other => ReadError::Message(other.to_string()),
        };
        match kind {
            Kind::OrganizationCreated | Kind::OrganizationUpdated => {
                let record = OrganizationRecord::from_data(data).map_err(message)?;
                Ok(Self::UpsertOrganization(Box::new(record)))
            }
            Kind::OrganizationDeleted => deleted_organization_id(&data)
                .map(|id| Self::DeleteOrganization { id })
                .ok_or_else(|| ReadError::Permanent("organization.deleted without data.id".into())),
            Kind::MembershipCreated | Kind::MembershipUpdated => {
                let record = MembershipRecord::from_data(data).map_err(message)?;
                Ok(Self::UpsertMembership(Box::new(record)))
            }
            Kind::MembershipDeleted => MembershipDeletion::from_data(&data)
                .map(|deletion| Self::DeleteMembership(Box::new(deletion)))
                .ok_or_else(|| {
                    ReadError::Permanent("organizationMembership.deleted without data.id".into())
                }),
        }
    }

    /// The organization or membership the change concerns.
    pub fn subject(&self) -> Subject<'_> {
        match self {
            Change::UpsertOrganization(record) => Subject {
                kind: "organization",
                id: &record.id,
            },
            Change::DeleteOrganization { id } => Subject {
                kind: "organization",
                id,
            },
            Change::UpsertMembership(record) => Subject {
                kind: "membership",
                id: &record.id,
            },
            Change::DeleteMembership(deletion) => Subject {
                kind: "membership",
                id: &deletion.id,
            },
        }
    }

    /// Whether the change removes what it concerns.
    pub fn deletes(&self) -> bool {
        matches!(
            self,
            Change::DeleteOrganization { .. } | Change::DeleteMembership(_)
        )
    }

    /// The ids whose advisory locks the change needs: its organization, its user and its
    /// membership, whichever it names.
    pub fn lock_ids(&self) -> Vec<&str> {
        match self {
            Change::UpsertOrganization(record) => vec![&record.id],
            Change::DeleteOrganization { id } => vec![id],
            Change::UpsertMembership(record) => {
                vec![&record.organization_id, &record.user_id, &record.id]
            }
            Change::DeleteMembership(deletion) => [
                deletion.organization_id.as_deref(),
                deletion.user_id.as_deref(),
                Some(deletion.id.as_str()),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }
}

/// Applies an event's change inside the caller's transaction: records the svix-id first (a
/// duplicate changes nothing), then applies, and records `stale` when nothing was written.
pub(crate) async fn apply_event<C: ConnectionTrait>(
    db: &C,
    event: &Event,
    change: &Change,
) -> Result<Outcome, DbErr> {
    let subject = change.subject();
    let outcome = if change.deletes() {
        "deleted"
    } else {
        "applied"
    };
    let recorded = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at, source, \
               subject_kind, subject_id, payload, svix_timestamp, received_at, trace_id) \
             VALUES ($1, $2, $3, now(), $4, $5, $6, $7::jsonb, $8, $9, $10) \
             ON CONFLICT (svix_id) DO NOTHING RETURNING svix_id",
            [
                event.svix_id.clone().into(),
                event.event_type.clone().into(),
                outcome.into(),
                event.source.as_str().into(),
                subject.kind.into(),
                subject.id.into(),
                event.payload.clone().into(),
                event.svix_timestamp.into(),
                event.received_at.into(),
                event.trace_id.clone().into(),
            ],
        ))
        .await?;
    if recorded.is_none() {
        return Ok(Outcome::Duplicate);
    }
    if apply_change(db, change).await? {
        return Ok(Outcome::Applied);
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE processed_events SET outcome = 'stale', reason = $2 WHERE svix_id = $1",
        [event.svix_id.clone().into(), STALE_REASON.into()],
    ))
    .await?;
    Ok(Outcome::Stale)
}

/// Why an organization or membership event wrote nothing.
const STALE_REASON: &str = "a version with a later updated_at, or a tombstone, was already stored";

/// Applies several changes in one transaction, taking their locks first in one sorted statement;
/// returns for each whether it wrote anything. For callers without events (a reconcile).
pub async fn apply_changes(
    db: &DatabaseConnection,
    changes: &[Change],
) -> Result<Vec<bool>, DbErr> {
    let txn = db.begin().await?;
    let ids: Vec<String> = changes
        .iter()
        .flat_map(Change::lock_ids)
        .map(str::to_owned)
        .collect();
    crate::apply::lock_keys(&txn, ids.iter().map(String::as_str)).await?;
    let mut written = Vec::with_capacity(changes.len());
    for change in changes {
        written.push(apply_change(&txn, change).await?);
    }
    txn.commit().await?;
    Ok(written)
}

/// Applies one change inside the caller's transaction, which holds its locks. True when a row
/// was written or deleted; a delete always counts as written.
pub async fn apply_change<C: ConnectionTrait>(db: &C, change: &Change) -> Result<bool, DbErr> {
    match change {
        Change::UpsertOrganization(record) => upsert_organization(db, record).await,
        Change::DeleteOrganization { id } => {
            delete_organization(db, id).await?;
            Ok(true)
        }
        Change::UpsertMembership(record) => {
            let organization = upsert_organization(db, &record.organization).await?;
            let membership = upsert_membership(db, record).await?;
            Ok(organization || membership)
        }
        Change::DeleteMembership(deletion) => {
            if let Some(organization) = &deletion.organization {
                upsert_organization(db, organization).await?;
            }
            delete_membership(db, &deletion.id).await?;
            Ok(true)
        }
    }
}

/// Writes the organization when it is not tombstoned and newer than the stored row. True when
/// written.
pub async fn upsert_organization<C: ConnectionTrait>(
    db: &C,
    record: &OrganizationRecord,
) -> Result<bool, DbErr> {
    let written = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO organizations (id, name, slug, image_url, created_by, public_metadata, \
               clerk_data, created_at, updated_at, synced_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, now() \
             WHERE NOT EXISTS (SELECT 1 FROM organization_tombstones WHERE id = $1) \
             ON CONFLICT (id) DO UPDATE SET \
               name = excluded.name, slug = excluded.slug, image_url = excluded.image_url, \
               created_by = excluded.created_by, public_metadata = excluded.public_metadata, \
               clerk_data = excluded.clerk_data, created_at = excluded.created_at, \
               updated_at = excluded.updated_at, synced_at = excluded.synced_at \
             WHERE organizations.updated_at < excluded.updated_at \
             RETURNING id",
            [
                record.id.clone().into(),
                record.name.clone().into(),
                record.slug.clone().into(),
                record.image_url.clone().into(),
                record.created_by.clone().into(),
                record.public_metadata.clone().into(),
                record.clerk_data.clone().into(),
                record.created_at.into(),
                record.updated_at.into(),
            ],
        ))
        .await?;
    Ok(written.is_some())
}

/// Deletes the organization and its memberships and writes its tombstone (a second delete keeps
/// the first deletion time).
pub async fn delete_organization<C: ConnectionTrait>(db: &C, id: &str) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "WITH memberships AS (DELETE FROM organization_memberships WHERE organization_id = $1), \
              organization AS (DELETE FROM organizations WHERE id = $1) \
         INSERT INTO organization_tombstones (id, deleted_at) VALUES ($1, now()) \
         ON CONFLICT (id) DO NOTHING",
        [id.into()],
    ))
    .await?;
    Ok(())
}

/// Deletes the membership by id and writes its tombstone.
pub async fn delete_membership<C: ConnectionTrait>(db: &C, id: &str) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "WITH deleted AS (DELETE FROM organization_memberships WHERE id = $1) \
         INSERT INTO membership_tombstones (id, deleted_at) VALUES ($1, now()) \
         ON CONFLICT (id) DO NOTHING",
        [id.into()],
    ))
    .await?;
    Ok(())
}

/// What decides a membership write, read in one statement. `$1` membership id, `$2`
/// organization id, `$3` user id.
const MEMBERSHIP_STANDING: &str = "\
SELECT EXISTS (SELECT 1 FROM membership_tombstones WHERE id = $1) \
    OR EXISTS (SELECT 1 FROM organization_tombstones WHERE id = $2) \
    OR EXISTS (SELECT 1 FROM user_tombstones WHERE id = $3) AS tombstoned, \
  (SELECT updated_at FROM organization_memberships WHERE id = $1) AS stored_updated_at, \
  other.id AS other_id, other.created_at AS other_created_at \
FROM (SELECT 1) AS one \
LEFT JOIN organization_memberships AS other \
  ON other.organization_id = $2 AND other.user_id = $3 AND other.id <> $1";

/// Writes the membership when none of its membership, organization and user is tombstoned, no
/// later-created membership holds its (organization, user) pair, and it is newer than the
/// stored row. An older membership holding the pair is deleted and tombstoned. True when
/// anything was written.
pub async fn upsert_membership<C: ConnectionTrait>(
    db: &C,
    record: &MembershipRecord,
) -> Result<bool, DbErr> {
    let standing = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            MEMBERSHIP_STANDING,
            [
                record.id.clone().into(),
                record.organization_id.clone().into(),
                record.user_id.clone().into(),
            ],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the membership standing returned no row".into()))?;
    let tombstoned: bool = standing.try_get("", "tombstoned")?;
    if tombstoned {
        return Ok(false);
    }
    let other_id: Option<String> = standing.try_get("", "other_id")?;
    let other_created_at: Option<chrono::DateTime<chrono::Utc>> =
        standing.try_get("", "other_created_at")?;
    if let (Some(other_id), Some(other_created_at)) = (other_id, other_created_at) {
        // One membership per pair at a time: the later one is current, and the earlier one
        // has been deleted in Clerk, whether or not its delete has arrived yet.
        if (other_created_at, other_id.as_str()) > (record.created_at, record.id.as_str()) {
            delete_membership(db, &record.id).await?;
            return Ok(false);
        }
        delete_membership(db, &other_id).await?;
        tracing::info!(
            membership_id = %record.id, replaced = %other_id,
            "a newer membership of the same member replaced the older one"
        );
    }
    let stored_updated_at: Option<chrono::DateTime<chrono::Utc>> =
        standing.try_get("", "stored_updated_at")?;
    if stored_updated_at.is_some_and(|stored| stored >= record.updated_at) {
        return Ok(false);
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO organization_memberships (id, organization_id, user_id, role, permissions, \
           public_metadata, clerk_data, created_at, updated_at, synced_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now()) \
         ON CONFLICT (id) DO UPDATE SET \
           organization_id = excluded.organization_id, user_id = excluded.user_id, \
           role = excluded.role, permissions = excluded.permissions, \
           public_metadata = excluded.public_metadata, clerk_data = excluded.clerk_data, \
           created_at = excluded.created_at, updated_at = excluded.updated_at, \
           synced_at = excluded.synced_at \
         WHERE organization_memberships.updated_at < excluded.updated_at",
        [
            record.id.clone().into(),
            record.organization_id.clone().into(),
            record.user_id.clone().into(),
            record.role.clone().into(),
            record.permissions.clone().into(),
            record.public_metadata.clone().into(),
            record.clerk_data.clone().into(),
            record.created_at.into(),
            record.updated_at.into(),
        ],
    ))
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn membership(public_user_data: Value) -> Value {
        json!({
            "id": "orgmem_1", "role": "org:member", "public_user_data": public_user_data,
            "organization": {"id": "org_1", "name": "N", "created_at": 1, "updated_at": 2},
            "created_at": 1, "updated_at": 2
        })
    }

    #[test]
    fn a_membership_change_locks_its_organization_its_user_and_itself() {
        let change = Change::read(
            OrganizationEventKind::MembershipUpdated,
            membership(json!({"user_id": "user_1"})),
        )
        .expect("change");
        assert_eq!(change.lock_ids(), ["org_1", "user_1", "orgmem_1"]);
        // A delete without a member still locks what it names.
        let change = Change::read(
            OrganizationEventKind::MembershipDeleted,
            membership(Value::Null),
        )
        .expect("change");
        assert_eq!(change.lock_ids(), ["org_1", "orgmem_1"]);
    }

    #[test]
    fn unusable_data_is_retried_and_data_naming_nothing_is_permanent() {
        let read = |kind, data| Change::read(kind, data).expect_err("unusable");
        assert!(matches!(
            read(
                OrganizationEventKind::OrganizationUpdated,
                json!({"id": "org_1"})
            ),
            ReadError::Message(_)
        ));
        assert!(matches!(
            read(
                OrganizationEventKind::MembershipCreated,
                membership(Value::Null)
            ),
            ReadError::Permanent(_)
        ));
        assert!(matches!(
            read(
                OrganizationEventKind::OrganizationDeleted,
                json!({"deleted": true})
            ),
            ReadError::Permanent(_)
        ));
        assert!(matches!(
            read(
                OrganizationEventKind::MembershipDeleted,
                json!({"role": "x"})
            ),
            ReadError::Permanent(_)
        ));
    }
}
