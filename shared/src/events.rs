//! Clerk's webhook events, parsed leniently: Clerk adds fields without notice, so unknown fields
//! are ignored (never `deny_unknown_fields`), and everything that may be null or absent is
//! optional. Only what the sync needs is read.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The event envelope. Its `timestamp` is seconds in some events and milliseconds in others, so
/// it is not read at all.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub data: Value,
}

/// Why a message body is not an event at all. Such a message can never apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("body has no string \"type\"")]
    NoType,
}

impl Envelope {
    /// Reads the envelope of a raw body: a JSON object with a string `type`.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(EnvelopeError::NotAnObject);
        };
        let Some(Value::String(event_type)) = object.remove("type") else {
            return Err(EnvelopeError::NoType);
        };
        let data = object.remove("data").unwrap_or(Value::Null);
        Ok(Self { event_type, data })
    }
}

/// The events the worker applies; everything else is acknowledged and recorded as ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserEventKind {
    Created,
    Updated,
    Deleted,
}

impl UserEventKind {
    pub fn from_type(event_type: &str) -> Option<Self> {
        match event_type {
            "user.created" => Some(Self::Created),
            "user.updated" => Some(Self::Updated),
            "user.deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// Clerk's `User` object, the `data` of `user.created` and `user.updated`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClerkUser {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub email_addresses: Vec<EmailAddress>,
    #[serde(default)]
    pub primary_email_address_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub phone_numbers: Vec<PhoneNumber>,
    #[serde(default)]
    pub primary_phone_number_id: Option<String>,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    /// Arbitrary JSON; Clerk does not validate it.
    #[serde(default)]
    pub public_metadata: Value,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch; the version the sync orders writes by.
    pub updated_at: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmailAddress {
    pub id: String,
    pub email_address: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PhoneNumber {
    pub id: String,
    pub phone_number: String,
}

/// The `data` of `user.deleted`: `{"object":"user","id":"user_…","deleted":true}`. The schema
/// makes `id` optional; a delete without one can never apply.
#[derive(Debug, Clone, Deserialize)]
pub struct DeletedObject {
    #[serde(default)]
    pub id: Option<String>,
}

/// The roles an application user can hold; anything else in `public_metadata.role` is `Client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Trainer,
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Trainer => "trainer",
            Role::Client => "client",
        }
    }
}

/// How the role was found in `public_metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSource {
    /// `role` names a known role.
    Known,
    /// No `role` key (or a null one): the default role, nothing to warn about.
    Absent,
    /// `role` holds something else; the value (as JSON text) is for a warning, never trusted.
    Unknown(String),
}

/// The row the sync writes for a user: Clerk's user reduced to the columns of `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub role: Role,
    pub role_source: RoleSource,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A user object whose fields cannot be turned into a row.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("user id is empty")]
    EmptyId,
    #[error("{field} is not a valid millisecond timestamp: {value}")]
    BadTimestamp { field: &'static str, value: i64 },
}

impl ClerkUser {
    /// The primary email: the entry whose id is `primary_email_address_id`, found by id and never
    /// by position (the dashboard's example event names a primary id with an empty list).
    pub fn primary_email(&self) -> Option<&str> {
        let primary = self.primary_email_address_id.as_deref()?;
        self.email_addresses
            .iter()
            .find(|entry| entry.id == primary)
            .map(|entry| entry.email_address.as_str())
    }

    pub fn primary_phone(&self) -> Option<&str> {
        let primary = self.primary_phone_number_id.as_deref()?;
        self.phone_numbers
            .iter()
            .find(|entry| entry.id == primary)
            .map(|entry| entry.phone_number.as_str())
    }

    /// `public_metadata.role` when it is one of the known roles, else `Client`.
    pub fn role(&self) -> (Role, RoleSource) {
        match self.public_metadata.get("role") {
            None | Some(Value::Null) => (Role::Client, RoleSource::Absent),
            Some(Value::String(role)) if role == "admin" => (Role::Admin, RoleSource::Known),
            Some(Value::String(role)) if role == "trainer" => (Role::Trainer, RoleSource::Known),
            Some(Value::String(role)) if role == "client" => (Role::Client, RoleSource::Known),
            Some(other) => (Role::Client, RoleSource::Unknown(other.to_string())),
        }
    }

    pub fn to_record(&self) -> Result<UserRecord, RecordError> {
        if self.id.trim().is_empty() {
            return Err(RecordError::EmptyId);
        }
        let (role, role_source) = self.role();
        Ok(UserRecord {
            id: self.id.clone(),
            email: self.primary_email().map(str::to_owned),
            first_name: self.first_name.clone(),
            last_name: self.last_name.clone(),
            phone: self.primary_phone().map(str::to_owned),
            role,
            role_source,
            created_at: millis("created_at", self.created_at)?,
            updated_at: millis("updated_at", self.updated_at)?,
        })
    }
}

fn millis(field: &'static str, value: i64) -> Result<DateTime<Utc>, RecordError> {
    DateTime::from_timestamp_millis(value).ok_or(RecordError::BadTimestamp { field, value })
}

/// `null` reads as the type's default (an empty list), like an absent field.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../fixtures/clerk/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn user(body: &[u8]) -> ClerkUser {
        let envelope = Envelope::parse(body).expect("envelope");
        serde_json::from_value(envelope.data).expect("user")
    }

    #[test]
    fn documented_user_created_maps_to_its_row() {
        let record = user(&fixture("user.created")).to_record().expect("record");
        assert_eq!(record.id, "user_29w83sxmDNGwOuEthce5gg56FcC");
        assert_eq!(record.email.as_deref(), Some("example@example.org"));
        assert_eq!(record.first_name.as_deref(), Some("Example"));
        assert_eq!(record.last_name.as_deref(), Some("Example"));
        assert_eq!(record.phone, None);
        assert_eq!(
            (record.role, record.role_source),
            (Role::Client, RoleSource::Absent)
        );
        assert_eq!(record.created_at.timestamp_millis(), 1654012591514);
        assert_eq!(record.updated_at.timestamp_millis(), 1654012591835);
    }

    #[test]
    fn documented_user_updated_has_phone_role_and_null_last_name() {
        let record = user(&fixture("user.updated")).to_record().expect("record");
        assert_eq!(record.phone.as_deref(), Some("+19876543210"));
        assert_eq!(
            (record.role, record.role_source),
            (Role::Trainer, RoleSource::Known)
        );
        assert_eq!(record.last_name, None);
        assert_eq!(record.updated_at.timestamp_millis(), 1654012824306);
    }

    #[test]
    fn documented_user_deleted_has_only_an_id() {
        let envelope = Envelope::parse(&fixture("user.deleted")).expect("envelope");
        assert_eq!(
            UserEventKind::from_type(&envelope.event_type),
            Some(UserEventKind::Deleted)
        );
        let deleted: DeletedObject = serde_json::from_value(envelope.data).expect("deleted");
        assert_eq!(
            deleted.id.as_deref(),
            Some("user_29w83sxmDNGwOuEthce5gg56FcC")
        );
    }

    #[test]
    fn dashboard_example_with_no_addresses_syncs_with_a_null_email() {
        let data = json!({
            "id": "user_example", "object": "user",
            "email_addresses": [], "primary_email_address_id": "idn_missing",
            "phone_numbers": null, "private_metadata": null, "public_metadata": null,
            "first_name": null, "last_name": null,
            "created_at": 1654012591514_i64, "updated_at": 1654012591835_i64,
            "some_field_clerk_added_later": {"nested": true}
        });
        let record = serde_json::from_value::<ClerkUser>(data)
            .expect("user")
            .to_record()
            .expect("record");
        assert_eq!(record.email, None);
        assert_eq!(record.phone, None);
        assert_eq!(record.role, Role::Client);
    }

    #[test]
    fn email_is_found_by_id_not_by_position() {
        let data = json!({
            "id": "user_1",
            "email_addresses": [
                {"id": "idn_other", "email_address": "old@example.org"},
                {"id": "idn_primary", "email_address": "new@example.org"}
            ],
            "primary_email_address_id": "idn_primary",
            "created_at": 1, "updated_at": 2
        });
        let user: ClerkUser = serde_json::from_value(data).expect("user");
        assert_eq!(user.primary_email(), Some("new@example.org"));
    }

    #[test]
    fn unknown_or_mistyped_roles_fall_back_to_client_and_are_reported() {
        for (role, expected) in [
            (json!("admin"), (Role::Admin, RoleSource::Known)),
            (json!("client"), (Role::Client, RoleSource::Known)),
            (
                json!("superuser"),
                (Role::Client, RoleSource::Unknown("\"superuser\"".into())),
            ),
            (
                json!("Admin"),
                (Role::Client, RoleSource::Unknown("\"Admin\"".into())),
            ),
            (
                json!(["admin"]),
                (Role::Client, RoleSource::Unknown("[\"admin\"]".into())),
            ),
            (json!(7), (Role::Client, RoleSource::Unknown("7".into()))),
        ] {
            let data = json!({"id": "u", "public_metadata": {"role": role}, "created_at": 1, "updated_at": 1});
            let user: ClerkUser = serde_json::from_value(data).expect("user");
            assert_eq!(user.role(), expected, "role {role}");
        }
    }

    #[test]
    fn envelope_rejects_what_is_not_an_event() {
        assert!(matches!(
            Envelope::parse(b"not json"),
            Err(EnvelopeError::NotJson(_))
        ));
        assert_eq!(
            Envelope::parse(b"[1]").err(),
            Some(EnvelopeError::NotAnObject)
        );
        assert_eq!(
            Envelope::parse(br#"{"data":{}}"#).err(),
            Some(EnvelopeError::NoType)
        );
        assert_eq!(
            Envelope::parse(br#"{"type":7}"#).err(),
            Some(EnvelopeError::NoType)
        );
        let ok = Envelope::parse(br#"{"type":"session.created","timestamp":1}"#).expect("event");
        assert_eq!(ok.event_type, "session.created");
        assert_eq!(UserEventKind::from_type(&ok.event_type), None);
    }

    #[test]
    fn a_user_without_updated_at_does_not_parse() {
        let data = json!({"id": "u", "created_at": 1});
        assert!(serde_json::from_value::<ClerkUser>(data).is_err());
    }
}
