//! Clerk Organizations and their memberships, parsed leniently like the user events: unknown
//! fields are ignored, optional ones may be null or absent, and each record keeps the object as
//! Clerk sent it (`clerk_data`).
//!
//! `organization.deleted` carries only `{object, id, slug?, deleted}`. The three membership
//! events all carry the full membership, with an `organization` snapshot and
//! `public_user_data.user_id`, and no top-level ids; the `.deleted` one keeps the membership's
//! previous `updated_at`, so it must never be ordered by it.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

/// The organization and membership events the worker applies. Clerk's other organization events
/// (`organizationInvitation.*`, `organizationDomain.*`) are acknowledged and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrganizationEventKind {
    OrganizationCreated,
    OrganizationUpdated,
    OrganizationDeleted,
    MembershipCreated,
    MembershipUpdated,
    MembershipDeleted,
}

impl OrganizationEventKind {
    pub fn from_type(event_type: &str) -> Option<Self> {
        match event_type {
            "organization.created" => Some(Self::OrganizationCreated),
            "organization.updated" => Some(Self::OrganizationUpdated),
            "organization.deleted" => Some(Self::OrganizationDeleted),
            "organizationMembership.created" => Some(Self::MembershipCreated),
            "organizationMembership.updated" => Some(Self::MembershipUpdated),
            "organizationMembership.deleted" => Some(Self::MembershipDeleted),
            _ => None,
        }
    }
}

/// Clerk's `Organization` object: the `data` of `organization.created|updated`, and the
/// `organization` snapshot inside every membership.
#[derive(Debug, Clone, Deserialize)]
pub struct ClerkOrganization {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub slug: Option<String>,
    #[serde(default)]
    pub image_url: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub public_metadata: Value,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch; the version the sync orders writes by.
    pub updated_at: i64,
}

/// Clerk's `OrganizationMembership` object, the `data` of all three membership events.
#[derive(Debug, Clone, Deserialize)]
pub struct ClerkMembership {
    pub id: String,
    /// Opaque: `org:admin`, `org:member`, a custom `org:…`, or legacy `admin`/`basic_member`.
    pub role: String,
    #[serde(default)]
    pub permissions: Value,
    #[serde(default)]
    pub public_metadata: Value,
    /// A full Organization snapshot, read into [`OrganizationRecord`] separately so the record
    /// can keep it as sent.
    #[serde(default)]
    pub organization: Value,
    /// May be null.
    #[serde(default)]
    pub public_user_data: Option<PublicUserData>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The part of a membership's `public_user_data` the sync reads.
#[derive(Debug, Clone, Deserialize)]
pub struct PublicUserData {
    #[serde(default)]
    pub user_id: Option<String>,
}

/// The row the sync writes for an organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrganizationRecord {
    pub id: String,
    pub name: String,
    pub slug: Option<String>,
    pub image_url: Option<String>,
    pub created_by: Option<String>,
    /// `{}` when Clerk sent null.
    pub public_metadata: Value,
    /// The Organization object exactly as this version carried it.
    pub clerk_data: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The row the sync writes for a membership, with the organization snapshot it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipRecord {
    pub id: String,
    pub organization_id: String,
    pub user_id: String,
    pub role: String,
    /// `[]` when Clerk sent null.
    pub permissions: Value,
    /// `{}` when Clerk sent null.
    pub public_metadata: Value,
    /// The OrganizationMembership object exactly as this version carried it.
    pub clerk_data: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The `organization` snapshot, which may create or advance the organization row.
    pub organization: OrganizationRecord,
}

/// What an `organizationMembership.deleted` needs: the membership id. The rest is read when it
/// is usable (for locks and the organization snapshot) and never stops the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipDeletion {
    pub id: String,
    pub organization_id: Option<String>,
    pub user_id: Option<String>,
    pub organization: Option<OrganizationRecord>,
}

/// Organization or membership data that cannot be turned into a row.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrganizationDataError {
    #[error("{0}")]
    Json(String),
    #[error("{0} is empty")]
    EmptyId(&'static str),
    /// A membership without `public_user_data.user_id` names no member: it can never apply.
    #[error("membership has no public_user_data.user_id")]
    NoUserId,
    #[error("{field} is not a valid millisecond timestamp: {value}")]
    BadTimestamp { field: &'static str, value: i64 },
}

impl OrganizationRecord {
    /// Reads an Organization object, keeping it as `clerk_data`.
    pub fn from_data(data: Value) -> Result<Self, OrganizationDataError> {
        let organization: ClerkOrganization = serde_json::from_value(data.clone())
            .map_err(|e| OrganizationDataError::Json(format!("organization: {e}")))?;
        non_empty("organization id", &organization.id)?;
        Ok(Self {
            id: organization.id,
            name: organization.name,
            slug: organization.slug,
            image_url: organization.image_url,
            created_by: organization.created_by,
            public_metadata: or_default(organization.public_metadata, json!({})),
            clerk_data: data,
            created_at: millis("organization created_at", organization.created_at)?,
            updated_at: millis("organization updated_at", organization.updated_at)?,
        })
    }
}

impl MembershipRecord {
    /// Reads an OrganizationMembership object, keeping it as `clerk_data`.
    pub fn from_data(data: Value) -> Result<Self, OrganizationDataError> {
        let membership: ClerkMembership = serde_json::from_value(data.clone())
            .map_err(|e| OrganizationDataError::Json(format!("membership: {e}")))?;
        non_empty("membership id", &membership.id)?;
        let user_id = membership
            .public_user_data
            .and_then(|user| user.user_id)
            .filter(|id| !id.trim().is_empty())
            .ok_or(OrganizationDataError::NoUserId)?;
        let organization = OrganizationRecord::from_data(membership.organization)?;
        Ok(Self {
            id: membership.id,
            organization_id: organization.id.clone(),
            user_id,
            role: membership.role,
            permissions: or_default(membership.permissions, json!([])),
            public_metadata: or_default(membership.public_metadata, json!({})),
            clerk_data: data,
            created_at: millis("membership created_at", membership.created_at)?,
            updated_at: millis("membership updated_at", membership.updated_at)?,
            organization,
        })
    }
}

impl MembershipDeletion {
    /// Reads the `data` of `organizationMembership.deleted`; None without a usable `id`.
    pub fn from_data(data: &Value) -> Option<Self> {
        let id = data
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.trim().is_empty())?
            .to_owned();
        let organization = data
            .get("organization")
            .and_then(|snapshot| OrganizationRecord::from_data(snapshot.clone()).ok());
        let organization_id = organization.as_ref().map(|o| o.id.clone()).or_else(|| {
            data.pointer("/organization/id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let user_id = data
            .pointer("/public_user_data/user_id")
            .and_then(Value::as_str)
            .filter(|id| !id.trim().is_empty())
            .map(str::to_owned);
        Some(Self {
            id,
            organization_id,
            user_id,
            organization,
        })
    }
}

/// The id in the `data` of `organization.deleted` (`{object, id, slug?, deleted}`), if usable.
pub fn deleted_organization_id(data: &Value) -> Option<String> {
    data.get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.trim().is_empty())
        .map(str::to_owned)
}

fn non_empty(what: &'static str, id: &str) -> Result<(), OrganizationDataError> {
    if id.trim().is_empty() {
        Err(OrganizationDataError::EmptyId(what))
    } else {
        Ok(())
    }
}

fn or_default(value: Value, default: Value) -> Value {
    if value.is_null() { default } else { value }
}

fn millis(field: &'static str, value: i64) -> Result<DateTime<Utc>, OrganizationDataError> {
    DateTime::from_timestamp_millis(value)
        .ok_or(OrganizationDataError::BadTimestamp { field, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Envelope;

    fn fixture_data(name: &str) -> (String, Value) {
        let path = format!(
            "{}/../fixtures/clerk/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let envelope = Envelope::parse(&body).expect("envelope");
        (envelope.event_type, envelope.data)
    }

    #[test]
    fn documented_organization_created_maps_to_its_row() {
        let (event_type, data) = fixture_data("organization.created");
        assert_eq!(
            OrganizationEventKind::from_type(&event_type),
            Some(OrganizationEventKind::OrganizationCreated)
        );
        let record = OrganizationRecord::from_data(data.clone()).expect("record");
        assert_eq!(record.id, "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
        assert_eq!(record.name, "Acme Corp");
        assert_eq!(record.slug.as_deref(), Some("acme-corp"));
        assert_eq!(
            record.created_by.as_deref(),
            Some("user_29w83sxmDNGwOuEthce5gg56FcC")
        );
        assert_eq!(record.public_metadata, json!({}));
        assert_eq!(record.updated_at.timestamp_millis(), 1_716_883_200_000);
        assert_eq!(record.clerk_data, data);
    }

    #[test]
    fn documented_membership_updated_maps_to_its_row_and_its_organization_snapshot() {
        let (event_type, data) = fixture_data("organizationMembership.updated");
        assert_eq!(
            OrganizationEventKind::from_type(&event_type),
            Some(OrganizationEventKind::MembershipUpdated)
        );
        let record = MembershipRecord::from_data(data.clone()).expect("record");
        assert_eq!(record.id, "orgmem_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
        assert_eq!(record.organization_id, "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
        assert_eq!(record.user_id, "user_29w83sxmDNGwOuEthce5gg56FcC");
        assert_eq!(record.role, "org:admin");
        assert_eq!(
            record.permissions,
            json!(["org:sys_profile:read", "org:sys_memberships:read"])
        );
        assert_eq!(record.updated_at.timestamp_millis(), 1_716_883_500_000);
        assert_eq!(record.organization.name, "Acme Corp");
        assert_eq!(record.organization.clerk_data, data["organization"]);
        assert_eq!(record.clerk_data, data);
    }

    #[test]
    fn documented_deletes_name_what_they_delete() {
        let (event_type, data) = fixture_data("organization.deleted");
        assert_eq!(
            OrganizationEventKind::from_type(&event_type),
            Some(OrganizationEventKind::OrganizationDeleted)
        );
        assert_eq!(
            deleted_organization_id(&data).as_deref(),
            Some("org_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
        );
        let (_, data) = fixture_data("organizationMembership.deleted");
        let deletion = MembershipDeletion::from_data(&data).expect("deletion");
        assert_eq!(deletion.id, "orgmem_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
        assert_eq!(
            deletion.user_id.as_deref(),
            Some("user_29w83sxmDNGwOuEthce5gg56FcC")
        );
        assert_eq!(
            deletion.organization.map(|o| o.id),
            Some("org_2g7np7Hrk0SN6kj5EDMLDaKNL0S".to_owned())
        );
    }

    #[test]
    fn nulls_and_absent_optional_fields_are_accepted() {
        let organization = json!({
            "id": "org_1", "name": "N", "slug": null, "public_metadata": null,
            "created_at": 1, "updated_at": 2, "added_later": [1]
        });
        let record = OrganizationRecord::from_data(organization.clone()).expect("record");
        assert_eq!(
            (record.slug, record.image_url, record.created_by),
            (None, None, None)
        );
        assert_eq!(record.public_metadata, json!({}));
        let membership = json!({
            "id": "orgmem_1", "role": "basic_member", "permissions": null,
            "organization": organization, "public_user_data": {"user_id": "user_1"},
            "created_at": 1, "updated_at": 2
        });
        let record = MembershipRecord::from_data(membership).expect("record");
        assert_eq!(record.permissions, json!([]));
        assert_eq!(record.public_metadata, json!({}));
    }

    #[test]
    fn a_membership_without_a_user_or_an_organization_does_not_make_a_row() {
        let organization = json!({"id": "org_1", "name": "N", "created_at": 1, "updated_at": 2});
        let without_user = json!({
            "id": "orgmem_1", "role": "org:member", "organization": organization,
            "public_user_data": null, "created_at": 1, "updated_at": 2
        });
        assert_eq!(
            MembershipRecord::from_data(without_user.clone()).err(),
            Some(OrganizationDataError::NoUserId)
        );
        // A delete needs only the id.
        let deletion = MembershipDeletion::from_data(&without_user).expect("deletion");
        assert_eq!((deletion.id.as_str(), deletion.user_id), ("orgmem_1", None));
        let without_organization = json!({
            "id": "orgmem_1", "role": "org:member", "public_user_data": {"user_id": "user_1"},
            "created_at": 1, "updated_at": 2
        });
        assert!(matches!(
            MembershipRecord::from_data(without_organization),
            Err(OrganizationDataError::Json(_))
        ));
        assert_eq!(MembershipDeletion::from_data(&json!({"object": "x"})), None);
        assert_eq!(deleted_organization_id(&json!({"deleted": true})), None);
    }
}
