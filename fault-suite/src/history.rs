//! Realistic Clerk user histories: each user is created, updated a few times and sometimes
//! deleted. The events of all users are interleaved, each user's in its own order, the way Clerk
//! emits them; what the pipeline must end with follows from the events that were acknowledged.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Clerk's documented `user.created` event, used as the template of every user event so the
/// bodies carry all the fields a real one has.
const USER_CREATED: &str = include_str!("../../fixtures/clerk/user.created.json");

/// Roles written to `public_metadata.role`, with the role the sync must store for each. `None`
/// leaves the key out; "superuser" is a value Clerk lets through but the sync must not trust.
const ROLES: [(Option<&str>, &str); 5] = [
    (Some("admin"), "admin"),
    (Some("trainer"), "trainer"),
    (Some("client"), "client"),
    (None, "client"),
    (Some("superuser"), "client"),
];

/// One row of `users` as the sync must store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub role: String,
    pub phone: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What an acknowledged event must leave behind.
#[derive(Debug, Clone)]
pub enum Effect {
    /// `user.created` / `user.updated`: this version, unless a newer one or a delete wins.
    Upsert(UserRow),
    /// `user.deleted`: no row and a tombstone, whatever else arrives.
    Delete,
}

/// An event the sender will deliver.
#[derive(Debug, Clone)]
pub struct PlannedEvent {
    pub svix_id: String,
    pub event_type: &'static str,
    pub user_id: String,
    pub body: Vec<u8>,
    pub effect: Effect,
}

/// The state `users` and `user_tombstones` must be in once every acknowledged event is applied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExpectedState {
    pub users: HashMap<String, UserRow>,
    pub deleted: HashSet<String>,
}

impl ExpectedState {
    /// Folds acknowledged events in any order: a delete wins over everything, otherwise the
    /// version with the newest `updated_at` wins. This is the rule the worker must converge to.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a PlannedEvent>) -> Self {
        let mut state = Self::default();
        for event in events {
            match &event.effect {
                Effect::Delete => {
                    state.users.remove(&event.user_id);
                    state.deleted.insert(event.user_id.clone());
                }
                Effect::Upsert(_) if state.deleted.contains(&event.user_id) => {}
                Effect::Upsert(row) => {
                    let newer = state
                        .users
                        .get(&row.id)
                        .is_none_or(|stored| stored.updated_at_ms < row.updated_at_ms);
                    if newer {
                        state.users.insert(row.id.clone(), row.clone());
                    }
                }
            }
        }
        state
    }
}

/// Plans `total` events for as many users as it takes, interleaved at random (reproducibly for
/// one `seed`). Every user starts with `user.created`; later versions have later `updated_at`.
pub fn plan(total: usize, seed: u64) -> Vec<PlannedEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let template: Value =
        serde_json::from_str(USER_CREATED).expect("the user.created fixture is JSON");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let base_ms = chrono::Utc::now().timestamp_millis() - 3_600_000;

    let mut histories: Vec<Vec<PlannedEvent>> = Vec::new();
    let mut planned = 0;
    while planned < total {
        let user_id = format!("user_{}x{}", &run[..12], histories.len());
        let created_at_ms = base_ms + rng.random_range(0..60_000);
        let updates = rng.random_range(0..=4);
        let mut history = Vec::new();
        for version in 0..=updates {
            let (row, metadata) = version_of(&mut rng, &user_id, version, created_at_ms);
            let event_type = if version == 0 {
                "user.created"
            } else {
                "user.updated"
            };
            history.push(PlannedEvent {
                svix_id: svix_id(),
                event_type,
                user_id: user_id.clone(),
                body: user_event_body(&template, event_type, &row, metadata),
                effect: Effect::Upsert(row),
            });
        }
        if rng.random_bool(0.25) {
            history.push(PlannedEvent {
                svix_id: svix_id(),
                event_type: "user.deleted",
                user_id: user_id.clone(),
                body: deleted_event_body(&user_id),
                effect: Effect::Delete,
            });
        }
        history.truncate(total - planned);
        planned += history.len();
        histories.push(history);
    }

    interleave(&mut rng, histories)
}

/// An endless supply of planned events, `chunk` at a time, each chunk with users of its own, so a
/// load can last as long as its faults take without planning everything up front.
pub fn endless(chunk: usize, seed: u64) -> impl Iterator<Item = PlannedEvent> {
    (0_u64..).flat_map(move |round| plan(chunk, seed.wrapping_add(round)))
}

/// Merges the histories in a random order that keeps each user's own order.
fn interleave(rng: &mut StdRng, histories: Vec<Vec<PlannedEvent>>) -> Vec<PlannedEvent> {
    let total = histories.iter().map(Vec::len).sum();
    let mut pending: Vec<std::vec::IntoIter<PlannedEvent>> =
        histories.into_iter().map(Vec::into_iter).collect();
    let mut merged = Vec::with_capacity(total);
    while !pending.is_empty() {
        let pick = rng.random_range(0..pending.len());
        match pending[pick].next() {
            Some(event) => merged.push(event),
            None => {
                pending.swap_remove(pick);
            }
        }
    }
    merged
}

fn svix_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// The `version`th state of a user: names, email, phone and role change between versions, and
/// some versions have no email or no phone at all (phone-only and email-only users exist).
/// Returns the row and the `public_metadata` that carries its role.
fn version_of(
    rng: &mut StdRng,
    user_id: &str,
    version: u32,
    created_at_ms: i64,
) -> (UserRow, Value) {
    let (written_role, role) = ROLES[rng.random_range(0..ROLES.len())];
    let metadata = match written_role {
        Some(role) => json!({ "role": role }),
        None => json!({}),
    };
    let email = rng
        .random_bool(0.9)
        .then(|| format!("{}.v{version}@example.test", user_id.to_lowercase()));
    let phone = rng
        .random_bool(0.5)
        .then(|| format!("+1555{:07}", rng.random_range(0..10_000_000)));
    let row = UserRow {
        id: user_id.to_owned(),
        email,
        first_name: rng.random_bool(0.8).then(|| format!("First{version}")),
        last_name: rng.random_bool(0.7).then(|| format!("Last{version}")),
        role: role.to_owned(),
        phone,
        created_at_ms,
        // Versions are at least a second apart, as edits of one user in Clerk are.
        updated_at_ms: created_at_ms + i64::from(version) * 1_000 + rng.random_range(0..1_000),
    };
    (row, metadata)
}

fn user_event_body(template: &Value, event_type: &str, row: &UserRow, metadata: Value) -> Vec<u8> {
    let mut event = template.clone();
    event["type"] = json!(event_type);
    event["timestamp"] = json!(row.updated_at_ms);
    event["instance_id"] = json!("ins_faultsuite");
    let data = &mut event["data"];
    let email_id = format!("idn_{}_{}", row.id, row.updated_at_ms);
    data["id"] = json!(row.id);
    data["external_id"] = Value::Null;
    data["first_name"] = json!(row.first_name);
    data["last_name"] = json!(row.last_name);
    data["created_at"] = json!(row.created_at_ms);
    data["updated_at"] = json!(row.updated_at_ms);
    data["public_metadata"] = metadata;
    match &row.email {
        Some(address) => {
            data["email_addresses"] = json!([{
                "id": email_id, "object": "email_address", "email_address": address,
                "linked_to": [], "reserved": false,
                "verification": {"status": "verified", "strategy": "email_code", "attempts": 1, "expire_at": null},
                "created_at": row.created_at_ms, "updated_at": row.updated_at_ms
            }]);
            data["primary_email_address_id"] = json!(email_id);
        }
        None => {
            data["email_addresses"] = json!([]);
            data["primary_email_address_id"] = Value::Null;
        }
    }
    match &row.phone {
        Some(number) => {
            let phone_id = format!("idn_phone_{}_{}", row.id, row.updated_at_ms);
            data["phone_numbers"] = json!([{
                "id": phone_id, "object": "phone_number", "phone_number": number,
                "reserved_for_second_factor": false, "default_second_factor": false,
                "linked_to": [], "verification": {"status": "verified", "strategy": "phone_code"}
            }]);
            data["primary_phone_number_id"] = json!(phone_id);
        }
        None => {
            data["phone_numbers"] = json!([]);
            data["primary_phone_number_id"] = Value::Null;
        }
    }
    event.to_string().into_bytes()
}

fn deleted_event_body(user_id: &str) -> Vec<u8> {
    json!({
        "data": {"deleted": true, "id": user_id, "object": "user"},
        "event_attributes": {"http_request": {"client_ip": "127.0.0.1", "user_agent": "fault-suite"}},
        "instance_id": "ins_faultsuite",
        "object": "event",
        "timestamp": chrono::Utc::now().timestamp_millis(),
        "type": "user.deleted"
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::events::{ClerkUser, Envelope};

    #[test]
    fn the_plan_has_the_requested_length_and_starts_every_user_with_a_create() {
        let events = plan(500, 7);
        assert_eq!(events.len(), 500);
        let mut seen = HashSet::new();
        for event in &events {
            if seen.insert(event.user_id.clone()) {
                assert_eq!(event.event_type, "user.created", "{}", event.user_id);
            }
        }
        let ids: HashSet<&str> = events.iter().map(|e| e.svix_id.as_str()).collect();
        assert_eq!(ids.len(), 500, "svix-ids are unique");
    }

    #[test]
    fn every_planned_body_maps_to_the_row_it_promises() {
        for event in plan(300, 11) {
            let envelope = Envelope::parse(&event.body).expect("envelope");
            assert_eq!(envelope.event_type, event.event_type);
            let Effect::Upsert(row) = &event.effect else {
                assert_eq!(envelope.data["id"], json!(event.user_id));
                continue;
            };
            let record = serde_json::from_value::<ClerkUser>(envelope.data)
                .expect("user")
                .to_record(&shared::Roles::default())
                .expect("record");
            assert_eq!(record.id, row.id);
            assert_eq!(record.email, row.email);
            assert_eq!(record.first_name, row.first_name);
            assert_eq!(record.last_name, row.last_name);
            assert_eq!(record.phone, row.phone);
            assert_eq!(record.role, row.role);
            assert_eq!(record.updated_at.timestamp_millis(), row.updated_at_ms);
        }
    }

    #[test]
    fn a_delete_wins_and_otherwise_the_newest_version_does_in_any_order() {
        let events = plan(400, 3);
        let forward = ExpectedState::from_events(&events);
        let backward = ExpectedState::from_events(events.iter().rev());
        assert_eq!(forward, backward);
        assert!(!forward.deleted.is_empty() && !forward.users.is_empty());
        for id in &forward.deleted {
            assert!(!forward.users.contains_key(id));
        }
    }
}
