//! Organizations and memberships: what their events ask for ([`Change`]) and how it is applied.
//!
//! The rules (DESIGN.md "Organizations and memberships"):
//! - creates and updates: last writer wins on `updated_at`; an older or equal version, or one
//!   whose id has a tombstone, writes nothing (an equal one does when it is a reconcile repair,
//!   [`Event::repair`], and then only its own row, never a membership's organization snapshot);
//! - a delete always wins and leaves a tombstone; the row goes or stays marked as the event's
//!   delete mode says (`super::delete_mode`). Memberships are deleted by membership id, so a
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
//! one membership never interleave, whichever worker applies them.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde_json::{Value, json};
use shared::organizations::{
    MembershipDeletion, MembershipRecord, OrganizationDataError, OrganizationEventKind,
    OrganizationRecord, deleted_organization_id,
};

use super::Outcome;
use super::compare::Standing;
use super::delete_mode::{self, DeleteMode};
use super::event::{Event, ReadError};
use super::history;
use super::subject::{Subject, SubjectKind};

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
                kind: SubjectKind::Organization,
                id: &record.id,
            },
            Change::DeleteOrganization { id } => Subject {
                kind: SubjectKind::Organization,
                id,
            },
            Change::UpsertMembership(record) => Subject {
                kind: SubjectKind::Membership,
                id: &record.id,
            },
            Change::DeleteMembership(deletion) => Subject {
                kind: SubjectKind::Membership,
                id: &deletion.id,
            },
        }
    }

    /// The `updated_at` of the version an upsert carries; `None` for a delete.
    pub fn version(&self) -> Option<DateTime<Utc>> {
        match self {
            Change::UpsertOrganization(record) => Some(record.updated_at),
            Change::UpsertMembership(record) => Some(record.updated_at),
            Change::DeleteOrganization { .. } | Change::DeleteMembership(_) => None,
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
pub(super) async fn apply_event<C: ConnectionTrait>(
    db: &C,
    event: &Event,
    change: &Change,
) -> Result<Outcome, DbErr> {
    let outcome = if change.deletes() {
        "deleted"
    } else {
        "applied"
    };
    if !history::record(db, event, outcome).await? {
        return Ok(Outcome::Duplicate);
    }
    if apply_change(db, change, event.delete_mode, event.repair).await? {
        if event.repair {
            history::note(db, &event.svix_id, super::compare::REPAIRED).await?;
        }
        return Ok(Outcome::Applied);
    }
    history::mark_stale(db, &event.svix_id, STALE_REASON).await?;
    delete_mode::forget_stale_payload(db, event.delete_mode, &event.svix_id, &change.lock_ids())
        .await?;
    Ok(Outcome::Stale)
}

/// Why an organization or membership event wrote nothing.
const STALE_REASON: &str = "a version with a later updated_at, or a tombstone, was already stored";

/// Applies one change inside the caller's transaction, which holds its locks. True when a row
/// was written or deleted; a delete always counts as written. `repair` ([`Event::repair`])
/// rewrites the change's own row when its stored `updated_at` is the same; a membership's
/// organization snapshot is never a repair (the organization's own listing repairs it).
async fn apply_change<C: ConnectionTrait>(
    db: &C,
    change: &Change,
    mode: DeleteMode,
    repair: bool,
) -> Result<bool, DbErr> {
    match change {
        Change::UpsertOrganization(record) => upsert_organization(db, record, repair).await,
        Change::DeleteOrganization { id } => {
            delete_mode::delete_organization(db, mode, id).await?;
            Ok(true)
        }
        Change::UpsertMembership(record) => {
            let organization = upsert_organization(db, &record.organization, false).await?;
            let membership = upsert_membership(db, record, mode, repair).await?;
            Ok(organization || membership)
        }
        Change::DeleteMembership(deletion) => {
            if let Some(organization) = &deletion.organization {
                upsert_organization(db, organization, false).await?;
            }
            delete_mode::delete_membership(db, mode, &deletion.id).await?;
            Ok(true)
        }
    }
}

/// A column of a synced table with the value a version writes into it.
type Column = (&'static str, Value);

/// The columns of `organizations` a version writes, with its values: the write
/// ([`upsert_organization`]) and the comparison ([`compare_organizations`]) both come from this
/// one list, so a new column is one line here.
fn organization_columns(record: &OrganizationRecord) -> Vec<Column> {
    vec![
        ("id", json!(record.id)),
        ("name", json!(record.name)),
        ("slug", json!(record.slug)),
        ("image_url", json!(record.image_url)),
        ("created_by", json!(record.created_by)),
        ("public_metadata", record.public_metadata.clone()),
        ("clerk_data", record.clerk_data.clone()),
        ("created_at", json!(record.created_at)),
        ("updated_at", json!(record.updated_at)),
    ]
}

/// The columns of `organization_memberships` a version writes (see [`organization_columns`]).
fn membership_columns(record: &MembershipRecord) -> Vec<Column> {
    vec![
        ("id", json!(record.id)),
        ("organization_id", json!(record.organization_id)),
        ("user_id", json!(record.user_id)),
        ("role", json!(record.role)),
        ("permissions", record.permissions.clone()),
        ("public_metadata", record.public_metadata.clone()),
        ("clerk_data", record.clerk_data.clone()),
        ("created_at", json!(record.created_at)),
        ("updated_at", json!(record.updated_at)),
    ]
}

/// The columns as a JSON object, as `jsonb_populate_record` reads it.
fn row_object(columns: Vec<Column>) -> Value {
    Value::Object(
        columns
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    )
}

/// The names of `columns`, each prefixed with `alias.` when one is given, comma-separated.
fn column_list(columns: &[Column], alias: Option<&str>, skip_id: bool) -> String {
    columns
        .iter()
        .filter(|(name, _)| !(skip_id && *name == "id"))
        .map(|(name, _)| match alias {
            Some(alias) => format!("{alias}.{name}"),
            None => (*name).to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The upsert of one row of `table` from `$1`, a JSON object of `columns`: inserted when
/// `guard` holds for it (`r`), else updated when the stored row is older, or of the same
/// `updated_at` and `$2` (a repair) is true.
fn upsert_statement(table: &str, columns: &[Column], guard: &str) -> String {
    let names = column_list(columns, None, false);
    let set = columns
        .iter()
        .filter(|(name, _)| *name != "id")
        .map(|(name, _)| format!("{name} = excluded.{name}, "))
        .collect::<String>();
    format!(
        "INSERT INTO {table} ({names}, synced_at) \
         SELECT {names}, now() FROM jsonb_populate_record(NULL::{table}, $1::jsonb) AS r \
         WHERE {guard} \
         ON CONFLICT (id) DO UPDATE SET {set}synced_at = excluded.synced_at \
         WHERE {table}.updated_at < excluded.updated_at \
           OR ($2 AND {table}.updated_at = excluded.updated_at) \
         RETURNING id"
    )
}

/// Writes the organization when it is not tombstoned and newer than the stored row (or, for a
/// repair, of the same `updated_at`). True when written.
async fn upsert_organization<C: ConnectionTrait>(
    db: &C,
    record: &OrganizationRecord,
    repair: bool,
) -> Result<bool, DbErr> {
    let columns = organization_columns(record);
    let written = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            upsert_statement(
                "organizations",
                &columns,
                "NOT EXISTS (SELECT 1 FROM organization_tombstones t WHERE t.id = r.id)",
            ),
            [row_object(columns).into(), repair.into()],
        ))
        .await?;
    Ok(written.is_some())
}

/// Whether a membership, its organization or its user is tombstoned, for SQL expressions naming
/// the three ids.
fn membership_tombstoned(membership: &str, organization: &str, user: &str) -> String {
    format!(
        "(EXISTS (SELECT 1 FROM membership_tombstones WHERE id = {membership}) \
          OR EXISTS (SELECT 1 FROM organization_tombstones WHERE id = {organization}) \
          OR EXISTS (SELECT 1 FROM user_tombstones WHERE id = {user}))"
    )
}

/// What decides a membership write, read in one statement. `$1` membership id, `$2`
/// organization id, `$3` user id.
static MEMBERSHIP_STANDING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "\
SELECT {tombstoned} AS tombstoned, \
  (SELECT updated_at FROM organization_memberships WHERE id = $1) AS stored_updated_at, \
  other.id AS other_id, other.created_at AS other_created_at \
FROM (SELECT 1) AS one \
LEFT JOIN organization_memberships AS other \
  ON other.organization_id = $2 AND other.user_id = $3 AND other.id <> $1 \
  AND other.deleted_at IS NULL",
        tombstoned = membership_tombstoned("$1", "$2", "$3")
    )
});

/// Writes the membership when none of its membership, organization and user is tombstoned, no
/// later-created membership holds its (organization, user) pair (a row kept after its deletion
/// holds none), and it is newer than the stored row (or, for a repair, of the same
/// `updated_at`). An older membership holding the pair is deleted (as `mode` says) and
/// tombstoned. True when anything was written.
async fn upsert_membership<C: ConnectionTrait>(
    db: &C,
    record: &MembershipRecord,
    mode: DeleteMode,
    repair: bool,
) -> Result<bool, DbErr> {
    let standing = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            MEMBERSHIP_STANDING.as_str(),
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
    let other_created_at: Option<DateTime<Utc>> = standing.try_get("", "other_created_at")?;
    if let (Some(other_id), Some(other_created_at)) = (other_id, other_created_at) {
        // One membership per pair at a time: the later one is current, and the earlier one
        // has been deleted in Clerk, whether or not its delete has arrived yet.
        if (other_created_at, other_id.as_str()) > (record.created_at, record.id.as_str()) {
            delete_mode::delete_membership(db, mode, &record.id).await?;
            return Ok(false);
        }
        delete_mode::delete_membership(db, mode, &other_id).await?;
        tracing::info!(
            membership_id = %record.id, replaced = %other_id,
            "a newer membership of the same member replaced the older one"
        );
    }
    let stored_updated_at: Option<DateTime<Utc>> = standing.try_get("", "stored_updated_at")?;
    if stored_updated_at.is_some_and(|stored| {
        stored > record.updated_at || (stored == record.updated_at && !repair)
    }) {
        return Ok(false);
    }
    let columns = membership_columns(record);
    db.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        upsert_statement("organization_memberships", &columns, "true"),
        [row_object(columns).into(), repair.into()],
    ))
    .await?;
    Ok(true)
}

/// How listed organizations stand against the stored rows, in one statement (see
/// [`super::compare`]); the expected rows are [`organization_columns`].
pub(super) async fn compare_organizations<C: ConnectionTrait>(
    db: &C,
    records: &[&OrganizationRecord],
) -> Result<Vec<(String, Standing)>, DbErr> {
    let Some(first) = records.first() else {
        return Ok(Vec::new());
    };
    let columns = organization_columns(first);
    let sql = format!(
        "SELECT l.id, o.updated_at, \
           EXISTS (SELECT 1 FROM organization_tombstones t WHERE t.id = l.id) AS tombstoned, \
           (o.id IS NOT NULL AND ROW({stored}) IS NOT DISTINCT FROM ROW({listed})) AS same \
         FROM jsonb_populate_recordset(NULL::organizations, $1::jsonb) AS l \
         LEFT JOIN organizations o ON o.id = l.id",
        stored = column_list(&columns, Some("o"), true),
        listed = column_list(&columns, Some("l"), true),
    );
    let rows: Vec<Value> = records
        .iter()
        .map(|record| row_object(organization_columns(record)))
        .collect();
    let found = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [Value::Array(rows).into()],
        ))
        .await?;
    found.iter().map(Standing::read).collect()
}

/// How listed memberships stand against the stored rows, in one statement (see
/// [`super::compare`]): the expected rows are [`membership_columns`], and a membership whose
/// organization snapshot would create or advance the organization row (as
/// [`upsert_organization`] decides) is not the same.
pub(super) async fn compare_memberships<C: ConnectionTrait>(
    db: &C,
    records: &[&MembershipRecord],
) -> Result<Vec<(String, Standing)>, DbErr> {
    let Some(first) = records.first() else {
        return Ok(Vec::new());
    };
    let columns = membership_columns(first);
    let sql = format!(
        "SELECT l.id, m.updated_at, {tombstoned} AS tombstoned, \
           (m.id IS NOT NULL AND ROW({stored}) IS NOT DISTINCT FROM ROW({listed}) \
            AND EXISTS (SELECT 1 FROM organizations o \
                        WHERE o.id = s.id AND o.updated_at >= s.updated_at)) AS same \
         FROM jsonb_array_elements($1::jsonb) AS e \
         CROSS JOIN LATERAL \
           jsonb_populate_record(NULL::organization_memberships, e -> 'membership') AS l \
         CROSS JOIN LATERAL jsonb_populate_record(NULL::organizations, e -> 'organization') AS s \
         LEFT JOIN organization_memberships m ON m.id = l.id",
        tombstoned = membership_tombstoned("l.id", "l.organization_id", "l.user_id"),
        stored = column_list(&columns, Some("m"), true),
        listed = column_list(&columns, Some("l"), true),
    );
    let rows: Vec<Value> = records
        .iter()
        .map(|record| {
            json!({
                "membership": row_object(membership_columns(record)),
                "organization": row_object(organization_columns(&record.organization)),
            })
        })
        .collect();
    let found = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [Value::Array(rows).into()],
        ))
        .await?;
    found.iter().map(Standing::read).collect()
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
