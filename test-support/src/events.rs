//! Clerk-shaped events, and the AMQP properties the ingest gives them.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};
use shared::headers;

/// The envelope Clerk sends around an event's `data`, as the tests publish it.
pub fn envelope(event_type: &str, data: Value) -> Value {
    json!({"type": event_type, "object": "event", "timestamp": 1, "data": data})
}

/// Clerk's user JSON with the fields the sync reads, shaped like the documented payload.
pub fn clerk_user(id: &str, email: Option<&str>, role: Option<&str>, updated_at: i64) -> Value {
    let email_id = format!("idn_{id}");
    let emails = match email {
        Some(address) => json!([{
            "id": email_id, "object": "email_address", "email_address": address,
            "verification": {"status": "verified", "strategy": "ticket"}, "linked_to": []
        }]),
        None => json!([]),
    };
    let public_metadata = match role {
        Some(role) => json!({ "role": role }),
        None => json!({}),
    };
    json!({
        "id": id, "object": "user",
        "email_addresses": emails,
        "primary_email_address_id": email.map(|_| email_id),
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "First", "last_name": "Last",
        "public_metadata": public_metadata, "private_metadata": {}, "unsafe_metadata": {},
        "created_at": 1_654_012_591_514_i64, "updated_at": updated_at,
    })
}

/// Clerk's Organization JSON, shaped like the documented payload; `created_at` is 1000.
pub fn clerk_organization(id: &str, name: &str, updated_at: i64) -> Value {
    json!({
        "object": "organization", "id": id, "name": name,
        "slug": name.to_lowercase().replace(' ', "-"),
        "image_url": "https://img.clerk.com/x", "has_image": false, "members_count": 1,
        "max_allowed_memberships": 5, "admin_delete_enabled": true,
        "public_metadata": {}, "private_metadata": {}, "created_by": "user_creator",
        "created_at": 1000, "updated_at": updated_at, "role_set_key": null
    })
}

/// Clerk's OrganizationMembership JSON, with `organization` as its snapshot.
pub fn clerk_membership(
    id: &str,
    organization: &Value,
    user_id: &str,
    role: &str,
    created_at: i64,
    updated_at: i64,
) -> Value {
    json!({
        "object": "organization_membership", "id": id, "role": role, "role_name": role,
        "permissions": ["org:sys_profile:read"], "public_metadata": {}, "private_metadata": {},
        "organization": organization,
        "public_user_data": {
            "user_id": user_id, "first_name": "First", "last_name": "Last",
            "identifier": format!("{user_id}@example.org"), "image_url": "https://img.clerk.com/y",
            "has_image": false, "profile_image_url": null, "username": null
        },
        "created_at": created_at, "updated_at": updated_at
    })
}

/// A documented Clerk payload from `fixtures/clerk`, by file name without `.json`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../fixtures/clerk/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The properties and headers the ingest gives an event received now.
pub fn event_properties(svix_id: &str, event_type: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    let now = chrono::Utc::now();
    table.insert(headers::SVIX_ID.into(), long(svix_id));
    table.insert(
        headers::SVIX_TIMESTAMP.into(),
        long(&now.timestamp().to_string()),
    );
    table.insert(headers::SVIX_SIGNATURE.into(), long("v1,dGVzdA=="));
    table.insert(headers::RECEIVED_AT.into(), long(&now.to_rfc3339()));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(svix_id.into())
        .with_type(event_type.into())
        .with_timestamp(u64::try_from(now.timestamp()).unwrap_or_default())
        .with_headers(table)
}

/// An AMQP long-string header value.
pub fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// A header's text, if it is there and a string.
pub fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

/// A long-string header's text, failing the test when it is missing or of another type.
pub fn header_text(headers: &FieldTable, name: &str) -> String {
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(value)) => value.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}
