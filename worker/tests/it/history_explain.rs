//! `worker explain ID` and `worker events list` on a history written by a worker running
//! in-process (explain) or by rows stored as the worker stores them (list, whose filters want
//! exact times), read back through the library into a buffer; one test runs the binary.

use std::process::Output;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection};
use serde_json::{Value, json};
use test_support::events::{clerk_membership, clerk_organization, clerk_user, envelope};
use test_support::rows::processed_events;
use test_support::services::closed_port;
use test_support::signing::svix_id;
use test_support::{TestDatabase, TestEnv, amqp_url, eventually};
use worker::history::Filter;
use worker::history::explain::{self, ExplainError, Explanation};
use worker::history::list::{self, ListArgs, RecordedOutcome};

const WITHIN: Duration = Duration::from_secs(20);

/// A broker session on this test's dead-letter queue.
async fn broker(env: &TestEnv) -> dlq::Broker {
    let nodes = shared::AmqpNodes::parse(&amqp_url()).expect("AMQP_URL");
    dlq::Broker::connect(&nodes, env.topology.topology.clone())
        .await
        .expect("broker")
}

/// What `worker explain ID` finds, dead letters included.
async fn explain_with_dead_letters(env: &TestEnv, id: &str) -> Explanation {
    let mut explanation = explain::from_database(env.db(), id)
        .await
        .expect("database part");
    let broker = broker(env).await;
    let letters = explain::dead_letters_about(&broker, id).await;
    broker.close().await;
    explanation.dead_letters = Some(letters.expect("dead letters read"));
    explanation
}

fn text(explanation: &Explanation) -> String {
    let mut out = Vec::new();
    explain::write(&mut out, explanation, false, true).expect("a whole explanation");
    String::from_utf8(out).expect("utf-8")
}

fn outcomes(explanation: &Explanation) -> Vec<&str> {
    explanation
        .history
        .iter()
        .map(|event| event.outcome.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_a_users_row_its_stale_event_with_the_reason_and_its_dead_letter() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let ids = env
        .apply_in_order(&[
            (
                "user.created",
                clerk_user("user_e1", Some("e1@example.org"), None, 3_000),
            ),
            (
                "user.updated",
                clerk_user("user_e1", Some("e1@example.org"), None, 1_000),
            ),
        ])
        .await;
    // Two events the worker cannot apply (no `updated_at`), one about this user and one about
    // another: both end in the dead-letter queue.
    let (ours, theirs) = (svix_id(), svix_id());
    env.publish_event(
        &ours,
        "user.updated",
        json!({"id": "user_e1", "object": "user"}),
    )
    .await;
    env.publish_event(
        &theirs,
        "user.updated",
        json!({"id": "user_e9", "object": "user"}),
    )
    .await;
    eventually(WITHIN, "both events dead-lettered", || async {
        env.ready(&env.topology.dead_queue).await == 2
    })
    .await;
    worker.stop().await;

    let explanation = explain_with_dead_letters(&env, "user_e1").await;

    assert_eq!(explanation.kind.as_deref(), Some("user"));
    let row = explanation.row.as_ref().expect("current row");
    assert_eq!(row["email"], "e1@example.org");
    assert_eq!(explanation.deleted_at, None);
    assert_eq!(outcomes(&explanation), ["applied", "stale"]);
    let reason = "stored updated_at 1970-01-01 00:00:03.000 UTC is not older than \
                  1970-01-01 00:00:01.000 UTC";
    assert_eq!(explanation.history[1].svix_id, ids[1]);
    assert_eq!(explanation.history[1].reason.as_deref(), Some(reason));
    let letters = explanation.dead_letters.as_ref().expect("read");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id.as_deref(), Some(ours.as_str()));

    let shown = text(&explanation);
    assert!(shown.starts_with("user user_e1\n"), "{shown}");
    assert!(shown.contains("e1@example.org"), "{shown}");
    assert!(shown.contains(reason), "{shown}");
    assert!(
        shown.contains("history (2 events, oldest first):"),
        "{shown}"
    );
    assert!(shown.contains("dead letters (1):"), "{shown}");
    assert!(shown.contains(&ours) && !shown.contains(&theirs), "{shown}");
    // Looking did not take anything: both letters are back in the queue.
    eventually(WITHIN, "the dead letters back in their queue", || async {
        env.ready(&env.topology.dead_queue).await == 2
    })
    .await;

    let mut json = Vec::new();
    explain::write(&mut json, &explanation, true, true).expect("json");
    let json: Value = serde_json::from_slice(&json).expect("JSON");
    assert_eq!(json["kind"], "user");
    assert_eq!(json["history"][1]["reason"], reason);
    assert_eq!(
        json["history"][0]["payload"],
        envelope(
            "user.created",
            clerk_user("user_e1", Some("e1@example.org"), None, 3_000)
        )
    );
    assert_eq!(json["dead_letters"][0]["id"], ours.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_a_deleted_users_tombstone_and_the_late_update_it_made_stale() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    env.apply_in_order(&[
        (
            "user.created",
            clerk_user("user_e2", Some("e2@example.org"), None, 1_000),
        ),
        (
            "user.deleted",
            json!({"id": "user_e2", "object": "user", "deleted": true}),
        ),
        (
            "user.updated",
            clerk_user("user_e2", Some("e2@example.org"), None, 9_000),
        ),
    ])
    .await;
    worker.stop().await;

    let explanation = explain_with_dead_letters(&env, "user_e2").await;

    assert_eq!(explanation.kind.as_deref(), Some("user"));
    assert_eq!(explanation.row, None);
    assert!(explanation.deleted_at.is_some());
    assert_eq!(outcomes(&explanation), ["applied", "deleted", "stale"]);
    let reason = explanation.history[2].reason.clone().expect("reason");
    assert!(reason.starts_with("the user was deleted at "), "{reason}");
    let shown = text(&explanation);
    assert!(shown.contains("current row: none"), "{shown}");
    assert!(shown.contains("tombstone: deleted at "), "{shown}");
    assert!(shown.contains(&reason), "{shown}");
    assert!(shown.contains("dead letters (0):"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_lists_an_organizations_members_and_a_users_memberships() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let acme = clerk_organization("org_e3", "Acme", 2_000);
    let other = clerk_organization("org_e4", "Other", 2_000);
    env.apply_in_order(&[
        ("organization.created", acme.clone()),
        ("organization.created", other.clone()),
        (
            "user.created",
            clerk_user("user_e3", Some("e3@example.org"), None, 1_000),
        ),
        (
            "organizationMembership.created",
            clerk_membership("orgmem_e1", &acme, "user_e3", "org:admin", 1_000, 2_000),
        ),
        (
            "organizationMembership.created",
            clerk_membership("orgmem_e2", &acme, "user_e4", "org:member", 1_000, 2_000),
        ),
        (
            "organizationMembership.created",
            clerk_membership("orgmem_e3", &other, "user_e3", "org:member", 1_000, 2_000),
        ),
    ])
    .await;
    worker.stop().await;

    let organization = explain_with_dead_letters(&env, "org_e3").await;
    assert_eq!(organization.kind.as_deref(), Some("organization"));
    assert_eq!(organization.row.as_ref().expect("row")["name"], "Acme");
    let members: Vec<(&str, &str, &str)> = organization
        .memberships
        .iter()
        .map(|m| (m.id.as_str(), m.user_id.as_str(), m.role.as_str()))
        .collect();
    assert_eq!(
        members,
        [
            ("orgmem_e1", "user_e3", "org:admin"),
            ("orgmem_e2", "user_e4", "org:member")
        ]
    );
    assert_eq!(outcomes(&organization), ["applied"]);
    let shown = text(&organization);
    assert!(shown.contains("memberships (2):"), "{shown}");
    assert!(
        shown.contains("orgmem_e2  org_e3        user_e4"),
        "{shown}"
    );

    let user = explain_with_dead_letters(&env, "user_e3").await;
    let organizations: Vec<&str> = user
        .memberships
        .iter()
        .map(|m| m.organization_id.as_str())
        .collect();
    assert_eq!(organizations, ["org_e3", "org_e4"]);

    // Known only as a member: no row and no event of its own, but its membership.
    let member = explain_with_dead_letters(&env, "user_e4").await;
    assert_eq!(member.kind.as_deref(), Some("user"));
    assert!(member.row.is_none());
    let memberships: Vec<&str> = member.memberships.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(memberships, ["orgmem_e2"]);
    let shown = text(&member);
    assert!(shown.contains("current row: none"), "{shown}");
    assert!(shown.contains("memberships (1):"), "{shown}");

    let membership = explain_with_dead_letters(&env, "orgmem_e1").await;
    assert_eq!(membership.kind.as_deref(), Some("membership"));
    assert_eq!(membership.row.as_ref().expect("row")["role"], "org:admin");
    assert_eq!(outcomes(&membership), ["applied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_found_nowhere_is_an_error() {
    let env = TestEnv::new().await;
    let explanation = explain_with_dead_letters(&env, "user_nobody").await;
    let error = explain::write(&mut Vec::new(), &explanation, false, true).expect_err("unknown");
    assert!(matches!(error, ExplainError::Unknown { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "nothing is known about user_nobody: no row, tombstone, recorded event or dead letter"
    );
}

/// 2026-11-30 12:MM:00 UTC.
fn minute(minute: u32) -> DateTime<FixedOffset> {
    Utc.with_ymd_and_hms(2026, 11, 30, 12, minute, 0)
        .single()
        .expect("a time")
        .fixed_offset()
}

/// Stores a history row as the worker does, applied at 12:`at`.
async fn record(
    db: &DatabaseConnection,
    id: &str,
    event_type: &str,
    subject_id: Option<&str>,
    outcome: &str,
    at: u32,
) {
    let subject_kind = subject_id.map(|_| "user".to_string());
    let reason =
        (outcome == "stale").then_some("a newer version of the user came in the same batch");
    processed_events::ActiveModel {
        svix_id: Set(id.into()),
        event_type: Set(event_type.into()),
        outcome: Set(outcome.into()),
        processed_at: Set(minute(at)),
        source: Set("webhook".into()),
        subject_kind: Set(subject_kind),
        subject_id: Set(subject_id.map(str::to_owned)),
        payload: Set(Some(envelope(event_type, json!({"id": subject_id})))),
        svix_timestamp: Set(Some(minute(at))),
        received_at: Set(Some(minute(at))),
        reason: Set(reason.map(str::to_owned)),
    }
    .insert(db)
    .await
    .expect("history row");
}

/// Five events, one a minute from 12:01: two users, each outcome.
async fn five_events() -> TestDatabase {
    let database = TestDatabase::migrated().await;
    let db = &database.db;
    record(db, "msg_1", "user.created", Some("user_l1"), "applied", 1).await;
    record(db, "msg_2", "user.updated", Some("user_l1"), "stale", 2).await;
    record(db, "msg_3", "user.created", Some("user_l2"), "applied", 3).await;
    record(db, "msg_4", "session.created", None, "ignored", 4).await;
    record(db, "msg_5", "user.deleted", Some("user_l1"), "deleted", 5).await;
    database
}

async fn listed(
    db: &DatabaseConnection,
    filter: Filter,
    outcome: Option<RecordedOutcome>,
    limit: u64,
) -> (Vec<String>, bool) {
    let listing = list::list(db, &filter, outcome, limit)
        .await
        .expect("listing");
    let ids = listing.events.into_iter().map(|event| event.svix_id);
    (ids.collect(), listing.cut)
}

fn ids(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| id.to_string()).collect()
}

#[tokio::test]
async fn events_list_filters_by_subject_type_time_and_outcome_oldest_first() {
    let database = five_events().await;
    let db = &database.db;

    let by_subject = Filter {
        subject: Some("user_l1".into()),
        ..Filter::default()
    };
    assert_eq!(
        listed(db, by_subject, None, 100).await,
        (ids(&["msg_1", "msg_2", "msg_5"]), false)
    );
    let by_type = Filter {
        event_type: Some("user.created".into()),
        ..Filter::default()
    };
    assert_eq!(
        listed(db, by_type, None, 100).await,
        (ids(&["msg_1", "msg_3"]), false)
    );
    // `--since` includes its time, `--until` excludes its own.
    let by_time = Filter {
        since: Some(minute(2).to_utc()),
        until: Some(minute(5).to_utc()),
        ..Filter::default()
    };
    assert_eq!(
        listed(db, by_time, None, 100).await,
        (ids(&["msg_2", "msg_3", "msg_4"]), false)
    );
    assert_eq!(
        listed(db, Filter::default(), Some(RecordedOutcome::Stale), 100).await,
        (ids(&["msg_2"]), false)
    );
    assert_eq!(
        listed(db, Filter::default(), Some(RecordedOutcome::Deleted), 100).await,
        (ids(&["msg_5"]), false)
    );
}

#[tokio::test]
async fn events_list_keeps_the_newest_within_the_limit_and_says_it_cut() {
    let database = five_events().await;
    let db = &database.db;
    assert_eq!(
        listed(db, Filter::default(), None, 2).await,
        (ids(&["msg_4", "msg_5"]), true)
    );
    assert!(!listed(db, Filter::default(), None, 5).await.1);

    let args = ListArgs {
        filter: Filter::default(),
        outcome: None,
        limit: 2,
        json: false,
    };
    let (mut out, mut notes) = (Vec::new(), Vec::new());
    list::write_listing(db, &args, &mut out, &mut notes)
        .await
        .expect("listing");
    let table = String::from_utf8(out).expect("utf-8");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("APPLIED AT") && lines[0].ends_with("SOURCE   REASON"),
        "{table}"
    );
    let newest: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        newest,
        [
            "2026-11-30T12:05:00.000000Z",
            "msg_5",
            "user.deleted",
            "user",
            "user_l1",
            "deleted",
            "webhook",
            "-"
        ],
        "{table}"
    );
    let notes = String::from_utf8(notes).expect("utf-8");
    assert!(
        notes.contains("showing the newest 2 matching events"),
        "{notes}"
    );
}

#[tokio::test]
async fn events_list_json_has_every_column_and_the_payload() {
    let database = five_events().await;
    let args = ListArgs {
        filter: Filter {
            subject: Some("user_l1".into()),
            ..Filter::default()
        },
        outcome: Some(RecordedOutcome::Stale),
        limit: 100,
        json: true,
    };
    let (mut out, mut notes) = (Vec::new(), Vec::new());
    list::write_listing(&database.db, &args, &mut out, &mut notes)
        .await
        .expect("listing");
    let json: Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(
        json,
        json!([{
            "processed_at": "2026-11-30T12:02:00.000000Z",
            "svix_id": "msg_2",
            "event_type": "user.updated",
            "subject_kind": "user",
            "subject_id": "user_l1",
            "outcome": "stale",
            "source": "webhook",
            "reason": "a newer version of the user came in the same batch",
            "svix_timestamp": "2026-11-30T12:02:00.000000Z",
            "received_at": "2026-11-30T12:02:00.000000Z",
            "payload": envelope("user.updated", json!({"id": "user_l1"})),
        }])
    );
    assert!(notes.is_empty());
}

/// Runs the worker binary with this test's database and names; the broker at `amqp`.
fn worker_binary(env: &TestEnv, amqp: &str, args: &[&str]) -> Output {
    env.command(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env("AMQP_URL", amqp)
        .output()
        .expect("run the worker binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_explains_without_a_broker_lists_and_refuses_bad_input() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let ids = env
        .apply_in_order(&[(
            "user.created",
            clerk_user("user_b1", Some("b1@example.org"), None, 1_000),
        )])
        .await;
    worker.stop().await;
    let no_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());

    // The database part is printed; the missing dead letters make the exit non-zero.
    let output = worker_binary(&env, &no_broker, &["explain", "user_b1"]);
    assert!(!output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("b1@example.org"), "{output:?}");
    assert!(
        stdout(&output).contains("dead letters: cannot connect"),
        "{output:?}"
    );
    assert!(
        stderr(&output).contains("the dead letters could not be read"),
        "{output:?}"
    );
    let output = worker_binary(
        &env,
        &no_broker,
        &["explain", "user_b1", "--no-dead-letters"],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains(&ids[0]), "{output:?}");

    let output = worker_binary(&env, &amqp_url(), &["explain", "user_nobody"]);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr(&output).contains("nothing is known about user_nobody"),
        "{output:?}"
    );
    assert!(stdout(&output).is_empty(), "{output:?}");

    let output = worker_binary(&env, &no_broker, &["events", "list", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json[0]["svix_id"], ids[0].as_str());

    // Refused before any database is needed.
    let reversed = env
        .command(env!("CARGO_BIN_EXE_worker"))
        .args(["events", "list", "--since", "2026-11-30T13:00:00Z"])
        .args(["--until", "2026-11-30T12:00:00Z"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the worker binary");
    assert!(!reversed.status.success());
    assert!(
        stderr(&reversed).contains("is not before --until"),
        "{reversed:?}"
    );
    let unknown = worker_binary(&env, &no_broker, &["events", "list", "--outcome", "lost"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("applied, deleted, stale, ignored"),
        "{unknown:?}"
    );
}
