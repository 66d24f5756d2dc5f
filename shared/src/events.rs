//! Clerk's webhook events, parsed leniently: Clerk adds fields without notice, so unknown fields
//! are ignored (never `deny_unknown_fields`), and everything that may be null or absent is
//! optional. Only what the sync needs is read.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::roles::{RoleSource, Roles};

/// The event envelope. Its `timestamp` is seconds in some events and milliseconds in others, so
/// it is not read at all.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub data: Value,
    /// The Clerk instance (`ins_…`) the event comes from; absent in the dashboard's "Send
    /// Example" events and in hand-made ones.
    #[serde(default)]
    pub instance_id: Option<String>,
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
            crate::json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(EnvelopeError::NotAnObject);
        };
        let Some(Value::String(event_type)) = object.remove("type") else {
            return Err(EnvelopeError::NoType);
        };
        let data = object.remove("data").unwrap_or(Value::Null);
        // Anything but a non-empty string counts as no instance: such an event pins nothing.
        let instance_id = match object.remove("instance_id") {
            Some(Value::String(id)) if !id.trim().is_empty() => Some(id),
            _ => None,
        };
        Ok(Self {
            event_type,
            data,
            instance_id,
        })
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

/// A Clerk object: `fields`, the part the sync reads, and `data`, the JSON exactly as Clerk sent
/// it, kept whole so that any field Clerk has (or adds later) can be stored and queried without a
/// schema change.
#[derive(Debug, Clone, PartialEq)]
pub struct ClerkObject<T> {
    pub fields: T,
    pub data: Value,
}

impl<T: DeserializeOwned> ClerkObject<T> {
    /// Reads `fields` out of `data` and keeps `data` as it is.
    pub fn from_data(data: Value) -> Result<Self, serde_json::Error> {
        let fields = T::deserialize(&data)?;
        Ok(Self { fields, data })
    }
}

/// Lets a listing (`Vec<ClerkUser>`) or any other container keep each object's JSON too.
impl<'de, T: DeserializeOwned> Deserialize<'de> for ClerkObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::from_data(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Clerk's `User` object, the `data` of `user.created` and `user.updated` (and an entry of the
/// Backend API's user listing).
pub type ClerkUser = ClerkObject<UserFields>;

/// The fields of Clerk's `User` object that have columns of their own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UserFields {
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
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub image_url: Option<String>,
    /// The application's own id for the user, set through Clerk's Backend API.
    #[serde(default)]
    pub external_id: Option<String>,
    /// Arbitrary JSON; Clerk does not validate it.
    #[serde(default)]
    pub public_metadata: Value,
    /// Arbitrary JSON, readable only from the backend; null in the dashboard's example event.
    #[serde(default)]
    pub private_metadata: Value,
    /// Milliseconds since the epoch; null for a user who never signed in.
    #[serde(default)]
    pub last_sign_in_at: Option<i64>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch; the version the sync orders writes by.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EmailAddress {
    pub id: String,
    pub email_address: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// The row the sync writes for a user: Clerk's user reduced to the columns of `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub username: Option<String>,
    pub image_url: Option<String>,
    pub external_id: Option<String>,
    /// `None` when Clerk sent null or nothing.
    pub public_metadata: Option<Value>,
    /// `None` when Clerk sent null or nothing.
    pub private_metadata: Option<Value>,
    pub last_sign_in_at: Option<DateTime<Utc>>,
    /// One of the configured roles.
    pub role: String,
    pub role_source: RoleSource,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The user object exactly as it came (the `clerk_data` column).
    pub clerk_data: Value,
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
        let primary = self.fields.primary_email_address_id.as_deref()?;
        self.fields
            .email_addresses
            .iter()
            .find(|entry| entry.id == primary)
            .map(|entry| entry.email_address.as_str())
    }

    pub fn primary_phone(&self) -> Option<&str> {
        let primary = self.fields.primary_phone_number_id.as_deref()?;
        self.fields
            .phone_numbers
            .iter()
            .find(|entry| entry.id == primary)
            .map(|entry| entry.phone_number.as_str())
    }

    /// The row for this user: every write path (events, reconcile) maps users here and only here.
    pub fn to_record(&self, roles: &Roles) -> Result<UserRecord, RecordError> {
        let fields = &self.fields;
        if fields.id.trim().is_empty() {
            return Err(RecordError::EmptyId);
        }
        let (role, role_source) = roles.resolve(&fields.public_metadata);
        Ok(UserRecord {
            id: fields.id.clone(),
            email: self.primary_email().map(str::to_owned),
            first_name: fields.first_name.clone(),
            last_name: fields.last_name.clone(),
            phone: self.primary_phone().map(str::to_owned),
            username: fields.username.clone(),
            image_url: fields.image_url.clone(),
            external_id: fields.external_id.clone(),
            public_metadata: non_null(&fields.public_metadata),
            private_metadata: non_null(&fields.private_metadata),
            last_sign_in_at: fields
                .last_sign_in_at
                .map(|value| millis("last_sign_in_at", value))
                .transpose()?,
            role,
            role_source,
            created_at: millis("created_at", fields.created_at)?,
            updated_at: millis("updated_at", fields.updated_at)?,
            clerk_data: self.data.clone(),
        })
    }
}

/// JSON null (or an absent field) as `None`, so the column holds SQL NULL rather than `'null'`.
fn non_null(value: &Value) -> Option<Value> {
    (!value.is_null()).then(|| value.clone())
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
        ClerkUser::from_data(envelope.data).expect("user")
    }

    fn record(body: &[u8]) -> UserRecord {
        user(body).to_record(&Roles::default()).expect("record")
    }

    #[test]
    fn documented_user_created_maps_to_its_row() {
        let record = record(&fixture("user.created"));
        assert_eq!(record.id, "user_29w83sxmDNGwOuEthce5gg56FcC");
        assert_eq!(record.email.as_deref(), Some("example@example.org"));
        assert_eq!(record.first_name.as_deref(), Some("Example"));
        assert_eq!(record.last_name.as_deref(), Some("Example"));
        assert_eq!(record.phone, None);
        assert_eq!(record.username, None);
        assert_eq!(
            record.image_url.as_deref(),
            Some("https://img.clerk.com/xxxxxx")
        );
        assert_eq!(record.external_id.as_deref(), Some("567772"));
        assert_eq!(record.public_metadata, Some(json!({})));
        assert_eq!(record.private_metadata, Some(json!({})));
        assert_eq!(
            record.last_sign_in_at.map(|at| at.timestamp_millis()),
            Some(1654012591514)
        );
        assert_eq!(
            (record.role.as_str(), record.role_source),
            ("client", RoleSource::Absent)
        );
        assert_eq!(record.created_at.timestamp_millis(), 1654012591514);
        assert_eq!(record.updated_at.timestamp_millis(), 1654012591835);
    }

    #[test]
    fn clerk_data_is_the_events_data_exactly() {
        let body = fixture("user.created");
        let envelope = Envelope::parse(&body).expect("envelope");
        let record = record(&body);
        assert_eq!(record.clerk_data, envelope.data);
        // Fields without a column of their own are there too.
        assert_eq!(
            record.clerk_data["email_addresses"][0]["verification"]["status"],
            json!("verified")
        );
    }

    #[test]
    fn a_listing_keeps_each_users_own_json() {
        let listing = json!([
            {"id": "user_1", "created_at": 1, "updated_at": 2, "locale": "fr"},
            {"id": "user_2", "created_at": 1, "updated_at": 3, "username": "two"}
        ]);
        let users: Vec<ClerkUser> = serde_json::from_value(listing.clone()).expect("users");
        assert_eq!(users[0].data, listing[0]);
        assert_eq!(users[1].data, listing[1]);
        assert_eq!(users[1].fields.username.as_deref(), Some("two"));
    }

    #[test]
    fn documented_user_updated_has_phone_role_and_null_last_name() {
        let record = record(&fixture("user.updated"));
        assert_eq!(record.phone.as_deref(), Some("+19876543210"));
        assert_eq!(
            (record.role.as_str(), record.role_source),
            ("trainer", RoleSource::Known)
        );
        assert_eq!(record.public_metadata, Some(json!({"role": "trainer"})));
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
        let record = serde_json::from_value::<ClerkUser>(data.clone())
            .expect("user")
            .to_record(&Roles::default())
            .expect("record");
        assert_eq!(record.email, None);
        assert_eq!(record.phone, None);
        assert_eq!(record.role, "client");
        assert_eq!(
            (record.username, record.image_url, record.external_id),
            (None, None, None)
        );
        assert_eq!(
            (record.public_metadata, record.private_metadata),
            (None, None)
        );
        assert_eq!(record.last_sign_in_at, None);
        assert_eq!(record.clerk_data, data);
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
    fn the_role_comes_from_the_configured_roles() {
        let data = json!({"id": "u", "public_metadata": {"role": "editor"}, "created_at": 1, "updated_at": 1});
        let user = ClerkUser::from_data(data).expect("user");
        let custom = Roles::new(["owner", "editor"], "owner").expect("roles");
        let record = user.to_record(&custom).expect("record");
        assert_eq!(
            (record.role.as_str(), record.role_source),
            ("editor", RoleSource::Known)
        );
        let record = user.to_record(&Roles::default()).expect("record");
        assert_eq!(
            (record.role.as_str(), record.role_source),
            ("client", RoleSource::Unknown("\"editor\"".into()))
        );
    }

    #[test]
    fn a_last_sign_in_out_of_range_is_an_error() {
        let data =
            json!({"id": "u", "last_sign_in_at": i64::MAX, "created_at": 1, "updated_at": 1});
        let user = ClerkUser::from_data(data).expect("user");
        assert_eq!(
            user.to_record(&Roles::default()).err(),
            Some(RecordError::BadTimestamp {
                field: "last_sign_in_at",
                value: i64::MAX
            })
        );
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
    fn the_envelope_names_its_instance_when_it_has_one() {
        let with = Envelope::parse(&fixture("user.created")).expect("envelope");
        assert_eq!(with.instance_id.as_deref(), Some("ins_123"));
        for body in [
            &br#"{"type":"user.created","data":{}}"#[..],
            br#"{"type":"user.created","instance_id":null}"#,
            br#"{"type":"user.created","instance_id":" "}"#,
            br#"{"type":"user.created","instance_id":7}"#,
        ] {
            let without = Envelope::parse(body).expect("envelope");
            assert_eq!(
                without.instance_id,
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_user_without_updated_at_does_not_parse() {
        let data = json!({"id": "u", "created_at": 1});
        assert!(serde_json::from_value::<ClerkUser>(data).is_err());
    }
}
