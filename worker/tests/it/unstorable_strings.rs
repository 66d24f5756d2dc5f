//! What Postgres refuses in `text` and `jsonb` but valid JSON can carry, the NUL character
//! (`\u0000`) and lone surrogate escapes (`\ud800`, `\udc00`), never stops a sync: end users type
//! them (`unsafe_metadata` is writable from the browser), and the event is stored without them,
//! through the webhook path, reconcile, replay and rebuild, against the real Postgres and
//! RabbitMQ (and the stand-in for Clerk's Backend API). Last, a property: arbitrary JSON strings
//! in every string field and metadata value of user events, and every event applied.

use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use shared::Roles;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization, clerk_user, envelope};
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};
use worker::apply::DeleteMode;
use worker::apply::Reading;
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::history::{Filter, rebuild, replay};
use worker::reconcile::Options;

const WITHIN: Duration = Duration::from_secs(60);
const KEY: &str = "sk_test_standin_key";

/// Markers the tests put in strings of a `serde_json::Value` (which cannot hold a lone
/// surrogate), and the escapes they stand for in the JSON text sent.
const MARKERS: [(&str, &str); 3] = [
    ("~NUL~", r"\u0000"),
    ("~HIGH~", r"\ud800"),
    ("~LOW~", r"\udc00"),
];

/// The JSON text of `value` with every marker turned into its escape.
fn with_escapes(value: &Value) -> String {
    let mut text = value.to_string();
    for (marker, escape) in MARKERS {
        text = text.replace(marker, escape);
    }
    text
}

/// `value` as it must be stored: every marker gone, from keys and strings at any depth.
fn stored_form(value: &Value) -> Value {
    let clean = |text: &str| {
        MARKERS.iter().fold(text.to_owned(), |text, (marker, _)| {
            text.replace(marker, "")
        })
    };
    match value {
        Value::String(text) => Value::String(clean(text)),
        Value::Array(items) => Value::Array(items.iter().map(stored_form).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| (clean(key), stored_form(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A user whose names, email, username and metadata (nested, keys too) carry NULs and lone
/// surrogates; its role is `admin` once they are removed. The last name holds the text
/// `\u0000` (an escaped backslash): that is ordinary text and stays.
fn marked_user(id: &str, updated_at: i64) -> Value {
    let mut user = clerk_user(id, Some("ada~NUL~@exa~HIGH~mple.org"), None, updated_at);
    user["first_name"] = json!("A~NUL~da~HIGH~");
    user["last_name"] = json!(r"Love\u0000lace~LOW~");
    user["username"] = json!("~LOW~ada~NUL~");
    user["public_metadata"] = json!({"role": "ad~NUL~min", "plan~NUL~": "te~HIGH~am"});
    user["private_metadata"] = json!({"note": "~LOW~~HIGH~ok"});
    user["unsafe_metadata"] = json!({
        "bio~NUL~": "hi~NUL~",
        "deep": {"list": ["a~NUL~", {"k~HIGH~": "~LOW~v~NUL~"}], "emoji": "😀 stays"},
    });
    user
}

async fn publish_marked(env: &TestEnv, event_type: &str, data: &Value) -> String {
    let id = svix_id();
    let body = with_escapes(&envelope(event_type, data.clone()));
    assert!(
        body.contains(r"\u0000") && body.contains(r"\ud800"),
        "{body}"
    );
    env.publish(&id, event_type, body.as_bytes()).await;
    // A dead letter ends the wait at once: the assertions after it say what went wrong.
    eventually(WITHIN, "the event recorded or dead-lettered", || async {
        env.processed(&id).await.is_some() || env.ready(&env.topology.dead_queue).await > 0
    })
    .await;
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "dead-lettered: {body}"
    );
    id
}

/// The stored user `id` is `marked_user` without the markers, in every column.
async fn assert_stored_without_markers(env: &TestEnv, id: &str, sent: &Value) {
    let row = env.user(id).await.expect("user stored");
    assert_eq!(row.email.as_deref(), Some("ada@example.org"));
    assert_eq!(row.first_name.as_deref(), Some("Ada"));
    assert_eq!(row.last_name.as_deref(), Some(r"Love\u0000lace"));
    assert_eq!(row.username.as_deref(), Some("ada"));
    assert_eq!(row.role, "admin");
    assert_eq!(
        row.public_metadata,
        Some(json!({"role": "admin", "plan": "team"}))
    );
    assert_eq!(row.private_metadata, Some(json!({"note": "ok"})));
    let clerk_data = row.clerk_data.expect("clerk_data");
    assert_eq!(clerk_data, stored_form(sent));
    assert_eq!(
        clerk_data["unsafe_metadata"],
        json!({"bio": "hi", "deep": {"list": ["a", {"k": "v"}], "emoji": "😀 stays"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_nul_and_lone_surrogates_is_applied_from_a_webhook_without_them() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let user = marked_user("user_nul", 2_000);

    let id = publish_marked(&env, "user.created", &user).await;
    worker.stop().await;

    let history = env.processed(&id).await.expect("history row");
    assert_eq!(history.outcome, "applied", "{:?}", history.reason);
    assert_eq!(
        history.payload,
        Some(stored_form(&envelope("user.created", user.clone()))),
        "the payload is kept, without what Postgres refuses"
    );
    assert_stored_without_markers(&env, "user_nul", &user).await;
    assert_eq!(env.ready(&env.topology.dead_queue).await, 0, "dead letters");
    assert_eq!(env.ready(&env.topology.queue).await, 0, "left in the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_and_a_membership_with_nuls_are_applied_from_webhooks_without_them() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let mut organization = clerk_organization("org_nul", "Acme~NUL~ Inc~HIGH~", 2_000);
    organization["slug"] = json!("ac~NUL~me");
    organization["public_metadata"] = json!({"tier~NUL~": {"name": "gold~LOW~~NUL~"}});
    let mut membership = clerk_membership(
        "orgmem_nul",
        &organization,
        "user_member",
        "org:mem~NUL~ber",
        1_000,
        2_000,
    );
    membership["public_metadata"] = json!({"team": ["r~NUL~ed", "~HIGH~blue"]});
    membership["public_user_data"]["first_name"] = json!("Gr~NUL~ace");

    let org_event = publish_marked(&env, "organization.created", &organization).await;
    let member_event = publish_marked(&env, "organizationMembership.created", &membership).await;
    worker.stop().await;

    for id in [&org_event, &member_event] {
        let history = env.processed(id).await.expect("history row");
        assert_eq!(history.outcome, "applied", "{:?}", history.reason);
        assert!(history.payload.is_some(), "payload kept");
    }
    let stored = env.organization("org_nul").await.expect("organization");
    assert_eq!(stored.name, "Acme Inc");
    assert_eq!(stored.slug.as_deref(), Some("acme"));
    assert_eq!(stored.public_metadata, json!({"tier": {"name": "gold"}}));
    assert_eq!(stored.clerk_data, stored_form(&organization));
    let member = env.membership("orgmem_nul").await.expect("membership");
    assert_eq!(member.role, "org:member");
    assert_eq!(member.public_metadata, json!({"team": ["red", "blue"]}));
    assert_eq!(member.clerk_data, stored_form(&membership));
    assert_eq!(member.clerk_data["public_user_data"]["first_name"], "Grace");
    assert_eq!(env.ready(&env.topology.dead_queue).await, 0, "dead letters");
}

fn client(api: &ClerkApi) -> ClerkClient {
    let config = ClerkConfig::new(api.url(), api.secret_key().to_owned().into());
    ClerkClient::new(ClerkConfig {
        retries: 1,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        rate_limit: 10_000,
        ..config
    })
    .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_stores_users_organizations_and_memberships_without_nuls_and_surrogates() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let user = marked_user("user_nul", 2_000);
    let organization = clerk_organization("org_nul", "Acme~NUL~ Inc~LOW~", 2_000);
    let mut membership = clerk_membership(
        "orgmem_nul",
        &organization,
        "user_nul",
        "org:ad~HIGH~min",
        1_000,
        2_000,
    );
    membership["public_metadata"] = json!({"k~NUL~": "v~NUL~"});
    api.put_user(user.clone());
    api.put_organization(organization.clone());
    api.put_membership(membership.clone());
    for (marker, escape) in MARKERS {
        api.rewrite_answers(marker, escape);
    }

    let report = worker::reconcile::reconcile(env.db(), &client(&api), &Options::default()).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.created, 1, "{report:?}");
    assert_eq!(report.summary.organizations.created, 1, "{report:?}");
    assert_eq!(report.summary.memberships.created, 1, "{report:?}");
    assert_stored_without_markers(&env, "user_nul", &user).await;
    let stored = env.organization("org_nul").await.expect("organization");
    assert_eq!(stored.name, "Acme Inc");
    assert_eq!(stored.clerk_data, stored_form(&organization));
    let member = env.membership("orgmem_nul").await.expect("membership");
    assert_eq!(member.role, "org:admin");
    assert_eq!(member.clerk_data, stored_form(&membership));
    // The history keeps each listed object, clean.
    let payloads: Vec<Value> = history_payloads(&env).await;
    assert_eq!(payloads.len(), 3, "{payloads:?}");
    assert!(
        payloads.contains(&stored_form(&json!({
            "type": "user.updated", "object": "event", "data": user
        }))),
        "{payloads:?}"
    );
    // A second run finds the same clean objects.
    let again = worker::reconcile::reconcile(env.db(), &client(&api), &Options::default()).await;
    assert!(again.succeeded(), "{again:?}");
    assert_eq!(again.summary.users.unchanged, 1, "{again:?}");
}

async fn history_payloads(env: &TestEnv) -> Vec<Value> {
    use sea_orm::EntityTrait;
    test_support::rows::processed_events::Entity::find()
        .all(env.db())
        .await
        .expect("history")
        .into_iter()
        .filter_map(|row| row.payload)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_rebuild_apply_the_cleaned_history_again() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let start = Utc::now() - chrono::Duration::seconds(1);
    let user = marked_user("user_nul", 2_000);
    publish_marked(&env, "user.created", &user).await;
    let mut newer = marked_user("user_nul", 3_000);
    newer["first_name"] = json!("Ad~NUL~a 2");
    publish_marked(&env, "user.updated", &newer).await;
    worker.stop().await;
    let before = env.user("user_nul").await.expect("user");
    assert_eq!(before.first_name.as_deref(), Some("Ada 2"));

    let replayed = replay::replay(
        env.db(),
        &replay::Options {
            filter: Filter {
                since: Some(start),
                ..Filter::default()
            },
            dry_run: false,
            reading: Reading {
                roles: Roles::default(),
                store_payloads: true,
                ..Reading::default()
            },
            progress_bar: false,
            pace: worker::apply::pace::Pace::FULL,
        },
    )
    .await
    .expect("replay");
    assert_eq!(replayed.unreadable, 0, "{replayed:?}");
    assert_eq!(replayed.outcomes.failed, 0, "{replayed:?}");
    assert_eq!(replayed.outcomes.stale, 2, "{replayed:?}");

    let rebuilt = rebuild::rebuild(
        env.db(),
        &rebuild::Options {
            dry_run: false,
            roles: Roles::default(),
            delete_mode: DeleteMode::Hard,
            progress_bar: false,
            pace: worker::apply::pace::Pace::FULL,
            chunk_subjects: rebuild::CHUNK_SUBJECTS,
        },
    )
    .await
    .expect("rebuild");
    assert!(rebuilt.committed, "{rebuilt:?}");
    assert!(rebuilt.failures.is_empty(), "{rebuilt:?}");
    let after = env.user("user_nul").await.expect("user rebuilt");
    assert_eq!(
        worker::storage::users::Model {
            synced_at: before.synced_at,
            ..after
        },
        before
    );
}

// The property.

/// One piece of a JSON string's text: a character (written as serde_json writes it, so control
/// characters and NUL come escaped), a `\uXXXX` escape of any UTF-16 code unit (NUL, either
/// surrogate half alone, any other; lower or upper case hex), a valid surrogate pair as two
/// escapes, or the text `\u0000` behind an escaped backslash.
#[derive(Debug, Clone)]
enum Piece {
    Char(char),
    Unit(u16, bool),
    Pair(u16, u16, bool),
    EscapedBackslash,
}

fn piece() -> impl Strategy<Value = Piece> {
    let unit = prop_oneof![
        Just(0u16),
        0xD800u16..=0xDBFF,
        0xDC00u16..=0xDFFF,
        any::<u16>()
    ];
    prop_oneof![
        6 => any::<char>().prop_map(Piece::Char),
        1 => Just(Piece::Char('\0')),
        3 => (unit, any::<bool>()).prop_map(|(unit, upper)| Piece::Unit(unit, upper)),
        1 => (0xD800u16..=0xDBFF, 0xDC00u16..=0xDFFF, any::<bool>())
            .prop_map(|(high, low, upper)| Piece::Pair(high, low, upper)),
        1 => Just(Piece::EscapedBackslash),
    ]
}

fn escape(unit: u16, upper: bool) -> String {
    if upper {
        format!(r"\u{unit:04X}")
    } else {
        format!(r"\u{unit:04x}")
    }
}

/// A string's JSON text (without the quotes) and the string that must be stored for it: the
/// text decoded as UTF-16, without NULs and without surrogates that are not part of a pair.
fn render(pieces: &[Piece]) -> (String, String) {
    enum Token {
        Char(char),
        Unit(u16),
        Text(&'static str),
    }
    let mut text = String::new();
    let mut tokens = Vec::new();
    for piece in pieces {
        match *piece {
            Piece::Char(c) => {
                let quoted = serde_json::to_string(&c.to_string()).expect("a string serializes");
                text.push_str(&quoted[1..quoted.len() - 1]);
                tokens.push(Token::Char(c));
            }
            Piece::Unit(unit, upper) => {
                text.push_str(&escape(unit, upper));
                tokens.push(Token::Unit(unit));
            }
            Piece::Pair(high, low, upper) => {
                text.push_str(&escape(high, upper));
                text.push_str(&escape(low, !upper));
                tokens.push(Token::Unit(high));
                tokens.push(Token::Unit(low));
            }
            Piece::EscapedBackslash => {
                text.push_str(r"\\u0000");
                tokens.push(Token::Text(r"\u0000"));
            }
        }
    }
    let high = |unit: u16| (0xD800..=0xDBFF).contains(&unit);
    let low = |unit: u16| (0xDC00..=0xDFFF).contains(&unit);
    let mut expected = String::new();
    let mut at = 0;
    while at < tokens.len() {
        match tokens[at] {
            Token::Unit(first) if high(first) => match tokens.get(at + 1) {
                Some(&Token::Unit(second)) if low(second) => {
                    expected.extend(char::decode_utf16([first, second]).map(|c| c.expect("pair")));
                    at += 1;
                }
                _ => {}
            },
            Token::Unit(unit) if unit == 0 || low(unit) => {}
            Token::Unit(unit) => expected.push(char::from_u32(unit.into()).expect("a BMP char")),
            Token::Char('\0') => {}
            Token::Char(c) => expected.push(c),
            Token::Text(literal) => expected.push_str(literal),
        }
        at += 1;
    }
    (text, expected)
}

/// A JSON string: its text (without quotes) and what must be stored.
fn json_string() -> impl Strategy<Value = (String, String)> {
    prop::collection::vec(piece(), 0..8).prop_map(|pieces| render(&pieces))
}

/// A JSON value for metadata, nested a few levels, with such strings as keys and values: its
/// text and what must be stored (of repeated keys, the last one, as serde_json and `jsonb`
/// keep).
fn json_value() -> impl Strategy<Value = (String, Value)> {
    let leaf = prop_oneof![
        3 => json_string().prop_map(|(text, expected)| (format!("\"{text}\""), json!(expected))),
        1 => any::<i32>().prop_map(|n| (n.to_string(), json!(n))),
        1 => Just(("null".to_owned(), Value::Null)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|items| {
                let (text, values): (Vec<String>, Vec<Value>) = items.into_iter().unzip();
                (format!("[{}]", text.join(",")), Value::Array(values))
            }),
            json_object(inner),
        ]
    })
}

fn json_object(
    inner: impl Strategy<Value = (String, Value)>,
) -> impl Strategy<Value = (String, Value)> {
    prop::collection::vec((json_string(), inner), 0..4).prop_map(|entries| {
        let mut map = Map::new();
        let mut text = Vec::new();
        for ((key_text, key), (value_text, value)) in entries {
            text.push(format!("\"{key_text}\":{value_text}"));
            map.insert(key, value);
        }
        (format!("{{{}}}", text.join(",")), Value::Object(map))
    })
}

/// Random strings for one user: every string column, and the three metadata objects.
#[derive(Debug, Clone)]
struct RandomUser {
    strings: Vec<(String, String)>,
    public_metadata: (String, Value),
    private_metadata: (String, Value),
    unsafe_metadata: (String, Value),
}

/// The string fields of a user, in `RandomUser::strings` order (the email's local part and the
/// phone number included).
const STRING_FIELDS: [&str; 7] = [
    "first_name",
    "last_name",
    "username",
    "image_url",
    "external_id",
    "email",
    "phone",
];

fn random_user() -> impl Strategy<Value = RandomUser> {
    let metadata = || json_object(json_value());
    (
        prop::collection::vec(json_string(), STRING_FIELDS.len()),
        // The role sometimes one the settings know, behind NULs and surrogates.
        (
            metadata(),
            prop::sample::select(vec![r"ad\u0000min", r"\ud800trainer", "client", "other"]),
        ),
        metadata(),
        metadata(),
    )
        .prop_map(
            |(strings, ((public_text, mut public), role), private, unsafe_)| {
                let (role_text, role_value) = render_role(role);
                if let Value::Object(map) = &mut public {
                    map.insert("role".into(), json!(role_value));
                }
                // The role comes last in the text, so it is the one kept.
                let public_text = if public_text == "{}" {
                    format!("{{\"role\":\"{role_text}\"}}")
                } else {
                    format!(
                        "{},\"role\":\"{role_text}\"}}",
                        &public_text[..public_text.len() - 1]
                    )
                };
                RandomUser {
                    strings,
                    public_metadata: (public_text, public),
                    private_metadata: private,
                    unsafe_metadata: unsafe_,
                }
            },
        )
}

fn render_role(text: &'static str) -> (&'static str, String) {
    let stored = text.replace(r"\u0000", "").replace(r"\ud800", "");
    (text, stored)
}

/// User `i`'s `user.created` event: its body's text, and the `data` that must be stored.
fn user_event(i: usize, user: &RandomUser) -> (String, Value) {
    let id = format!("user_p{i}");
    let mut data = clerk_user(&id, Some("@email@"), None, 1_000 + i as i64);
    data["phone_numbers"] = json!([{"id": format!("idn_phone_{i}"), "object": "phone_number",
                                    "phone_number": "@phone@"}]);
    data["primary_phone_number_id"] = json!(format!("idn_phone_{i}"));
    for field in &STRING_FIELDS[..5] {
        data[*field] = json!(format!("@{field}@"));
    }
    for field in ["public_metadata", "private_metadata", "unsafe_metadata"] {
        data[field] = json!(format!("@{field}@"));
    }
    let mut text = envelope("user.created", data.clone()).to_string();
    let mut expected = data;
    let suffix = format!("+{i}@example.org");
    for (field, (string_text, stored)) in STRING_FIELDS.iter().zip(&user.strings) {
        let (string_text, stored) = if *field == "email" {
            (
                format!("{string_text}{suffix}"),
                format!("{stored}{suffix}"),
            )
        } else {
            (string_text.clone(), stored.clone())
        };
        text = text.replace(&format!("\"@{field}@\""), &format!("\"{string_text}\""));
        match *field {
            "email" => expected["email_addresses"][0]["email_address"] = json!(stored),
            "phone" => expected["phone_numbers"][0]["phone_number"] = json!(stored),
            _ => expected[*field] = json!(stored),
        }
    }
    for (field, (value_text, stored)) in [
        ("public_metadata", &user.public_metadata),
        ("private_metadata", &user.private_metadata),
        ("unsafe_metadata", &user.unsafe_metadata),
    ] {
        text = text.replace(&format!("\"@{field}@\""), value_text);
        expected[field] = stored.clone();
    }
    (text, expected)
}

async fn run_case(users: Vec<RandomUser>) {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let mut sent = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (body, expected) = user_event(i, user);
        let id = svix_id();
        env.publish(&id, "user.created", body.as_bytes()).await;
        sent.push((id, format!("user_p{i}"), expected));
    }
    eventually(
        WITHIN,
        "every event recorded, or one dead-lettered",
        || async {
            env.processed_count().await == sent.len() as u64
                || env.ready(&env.topology.dead_queue).await > 0
        },
    )
    .await;
    worker.stop().await;
    assert_eq!(env.ready(&env.topology.dead_queue).await, 0, "dead letters");

    for (svix_id, user_id, expected) in &sent {
        let history = env.processed(svix_id).await.expect("history row");
        assert_eq!(
            history.outcome, "applied",
            "{user_id}: {:?}",
            history.reason
        );
        assert_eq!(
            history.payload.as_ref().map(|payload| &payload["data"]),
            Some(expected),
            "{user_id}: payload"
        );
        let row = env.user(user_id).await.expect("user stored");
        let text = |field: &str| expected[field].as_str().map(str::to_owned);
        assert_eq!(row.first_name, text("first_name"), "{user_id}");
        assert_eq!(row.last_name, text("last_name"), "{user_id}");
        assert_eq!(row.username, text("username"), "{user_id}");
        assert_eq!(row.image_url, text("image_url"), "{user_id}");
        assert_eq!(row.external_id, text("external_id"), "{user_id}");
        assert_eq!(
            row.email.as_deref(),
            expected["email_addresses"][0]["email_address"].as_str(),
            "{user_id}"
        );
        assert_eq!(
            row.phone.as_deref(),
            expected["phone_numbers"][0]["phone_number"].as_str(),
            "{user_id}"
        );
        assert_eq!(
            row.public_metadata.as_ref(),
            Some(&expected["public_metadata"])
        );
        assert_eq!(
            row.private_metadata.as_ref(),
            Some(&expected["private_metadata"])
        );
        let (role, _) = Roles::default().resolve(&expected["public_metadata"]);
        assert_eq!(row.role, role, "{user_id}");
        assert_eq!(
            row.clerk_data.as_ref(),
            Some(expected),
            "{user_id}: clerk_data"
        );
    }
    assert_eq!(env.ready(&env.topology.dead_queue).await, 0, "dead letters");
    assert_eq!(env.ready(&env.topology.queue).await, 0, "left in the queue");
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(8)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Every case costs a database and a queue: shrink a little, not for ever.
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_strings_in_every_user_field_and_metadata_value_are_applied(
        users in prop::collection::vec(random_user(), 1..6),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_case(users));
    }
}
