//! `WORKER_DELETE_MODE=hard|soft|anonymize`, end to end: webhooks through the real RabbitMQ into
//! a worker and the real Postgres (a fresh database and queue per test), reconcile against the
//! Backend API stand-in, replay, rebuild, explain and the purge of kept rows.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use shared::Roles;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization, clerk_user};
use test_support::{TestEnv, eventually};
use worker::apply::DeleteMode;
use worker::apply::Reading;
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::history::{Filter, explain, rebuild, replay};
use worker::reconcile::Options;

const WITHIN: Duration = Duration::from_secs(60);
const KEY: &str = "sk_test_standin_key";

/// The row `id` of `table`, every column, as JSON; `None` when there is none.
async fn row(env: &TestEnv, table: &str, id: &str) -> Option<Value> {
    env.db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("SELECT to_jsonb(t) AS row FROM {table} t WHERE id = $1"),
            [id.into()],
        ))
        .await
        .expect("read row")
        .map(|found| found.try_get::<Value>("", "row").expect("row"))
}

/// The ids a view shows, in order.
async fn shown(env: &TestEnv, view: &str) -> Vec<String> {
    env.db()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT id FROM {view} ORDER BY id"),
        ))
        .await
        .expect("read view")
        .into_iter()
        .map(|found| found.try_get("", "id").expect("id"))
        .collect()
}

/// History rows about any of `ids` that still hold a payload.
async fn payloads_about(env: &TestEnv, ids: &[&str]) -> i64 {
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    env.db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM processed_events \
             WHERE subject_id = ANY ($1) AND payload IS NOT NULL",
            [ids.into()],
        ))
        .await
        .expect("count payloads")
        .expect("a count")
        .try_get("", "n")
        .expect("n")
}

fn config_with(env: &TestEnv, mode: DeleteMode) -> worker::WorkerConfig {
    let mut config = env.config();
    config.reading.delete_mode = mode;
    config
}

fn user(id: &str, email: &str, updated_at: i64) -> Value {
    let mut data = clerk_user(id, Some(email), Some("trainer"), updated_at);
    data["username"] = json!(format!("{id}-name"));
    data["image_url"] = json!("https://img.clerk.com/face");
    data["external_id"] = json!(format!("ext-{id}"));
    data["private_metadata"] = json!({"plan": "gold"});
    data
}

fn membership(id: &str, organization: &Value, user_id: &str, at: i64) -> Value {
    clerk_membership(id, organization, user_id, "org:member", at, at)
}

/// Asserts what `mode` left of a deleted row: nothing (`hard`), the row with `deleted_at`
/// (`soft`), or the row with `deleted_at` and `cleared` columns emptied (`anonymize`); returns
/// the row when kept.
async fn assert_deleted(
    env: &TestEnv,
    mode: DeleteMode,
    table: &str,
    id: &str,
    cleared: &[(&str, Value)],
) -> Option<Value> {
    let stored = row(env, table, id).await;
    match mode {
        DeleteMode::Hard => {
            assert_eq!(stored, None, "{mode}: {table} {id} removed");
            None
        }
        DeleteMode::Soft | DeleteMode::Anonymize => {
            let stored = stored.unwrap_or_else(|| panic!("{mode}: {table} {id} kept"));
            assert!(
                stored["deleted_at"].is_string(),
                "{mode}: {table} {id} marked: {stored}"
            );
            for (column, empty) in cleared {
                if mode == DeleteMode::Anonymize {
                    assert_eq!(&stored[*column], empty, "{mode}: {table}.{column} cleared");
                } else {
                    assert_ne!(&stored[*column], empty, "{mode}: {table}.{column} kept");
                }
            }
            Some(stored)
        }
    }
}

/// A user with a membership, deleted by `user.deleted`; a late update; a new user with the
/// deleted user's email; the same delete again.
async fn a_deleted_user_in(mode: DeleteMode) {
    let env = TestEnv::new().await;
    let worker = env.start_worker(config_with(&env, mode)).await;
    let organization = clerk_organization("org_1", "Acme", 10);
    env.apply_in_order(&[
        ("user.created", user("user_a", "ada@example.org", 10)),
        ("organization.created", organization.clone()),
        (
            "organizationMembership.created",
            membership("orgmem_a", &organization, "user_a", 10),
        ),
    ])
    .await;
    let created_at = row(&env, "users", "user_a").await.expect("user")["created_at"].clone();

    let deleted = env
        .apply_in_order(&[(
            "user.deleted",
            json!({"deleted": true, "id": "user_a", "object": "user"}),
        )])
        .await;
    assert_eq!(
        env.processed(&deleted[0]).await.expect("recorded").outcome,
        "deleted"
    );

    assert!(env.tombstoned("user_a").await, "{mode}: tombstoned");
    let cleared = [
        ("email", Value::Null),
        ("first_name", Value::Null),
        ("last_name", Value::Null),
        ("username", Value::Null),
        ("image_url", Value::Null),
        ("external_id", Value::Null),
        ("public_metadata", Value::Null),
        ("private_metadata", Value::Null),
        ("clerk_data", Value::Null),
    ];
    let kept = assert_deleted(&env, mode, "users", "user_a", &cleared).await;
    if let Some(kept) = &kept {
        assert_eq!(kept["created_at"], created_at, "{mode}: created_at kept");
    }
    let membership_cleared = [("clerk_data", json!({})), ("public_metadata", json!({}))];
    // `public_metadata` of the membership is `{}` already; the Clerk object is what changes.
    assert_deleted(
        &env,
        mode,
        "organization_memberships",
        "orgmem_a",
        &membership_cleared[..1],
    )
    .await;
    assert_eq!(shown(&env, "live_users").await, Vec::<String>::new());
    assert_eq!(
        shown(&env, "live_organization_memberships").await,
        Vec::<String>::new()
    );
    assert_eq!(shown(&env, "live_organizations").await, ["org_1"]);
    let left = payloads_about(&env, &["user_a", "orgmem_a"]).await;
    if mode == DeleteMode::Anonymize {
        assert_eq!(left, 0, "{mode}: the history payloads cleared");
    } else {
        assert!(left >= 2, "{mode}: the history payloads kept ({left})");
    }

    // A late update is stale, and brings nothing back (in `anonymize`, not even in the history).
    let late = env
        .apply_in_order(&[("user.updated", user("user_a", "ada@example.org", 99))])
        .await;
    let late = env.processed(&late[0]).await.expect("recorded");
    assert_eq!(late.outcome, "stale", "{mode}: late update");
    assert_eq!(
        late.payload.is_none(),
        mode == DeleteMode::Anonymize,
        "{mode}: payload of the late update"
    );
    assert_eq!(
        row(&env, "users", "user_a").await,
        kept,
        "{mode}: unchanged"
    );

    // A new user may have the deleted user's email, and a new membership the same pair.
    env.apply_in_order(&[
        ("user.created", user("user_b", "ada@example.org", 100)),
        (
            "organizationMembership.created",
            membership("orgmem_b", &organization, "user_b", 100),
        ),
    ])
    .await;
    let new_user = row(&env, "users", "user_b").await.expect("new user");
    assert_eq!(new_user["email"], "ada@example.org", "{mode}: email taken");
    assert!(new_user["deleted_at"].is_null());
    if mode == DeleteMode::Soft {
        let kept = row(&env, "users", "user_a").await.expect("kept");
        assert_eq!(
            kept["email"], "ada@example.org",
            "{mode}: the kept row keeps its email"
        );
    }
    assert_eq!(shown(&env, "live_users").await, ["user_b"]);

    // The same delete again (another svix-id) keeps the first deletion's time.
    env.apply_in_order(&[(
        "user.deleted",
        json!({"deleted": true, "id": "user_a", "object": "user"}),
    )])
    .await;
    let again = row(&env, "users", "user_a").await;
    assert_eq!(
        again.as_ref().map(|row| row["deleted_at"].clone()),
        kept.as_ref().map(|row| row["deleted_at"].clone()),
        "{mode}: the first deletion's time stays"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_delete_removes_the_user_and_its_memberships() {
    a_deleted_user_in(DeleteMode::Hard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_delete_keeps_the_user_marked_and_lets_a_new_user_take_its_email() {
    a_deleted_user_in(DeleteMode::Soft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymizing_delete_keeps_the_user_without_personal_data_or_payloads() {
    a_deleted_user_in(DeleteMode::Anonymize).await;
}
/// An organization with two members, deleted by `organization.deleted`; then a membership
/// removed by `organizationMembership.deleted` in another organization, and its member added
/// again under a new id.
async fn a_deleted_organization_and_membership_in(mode: DeleteMode) {
    let env = TestEnv::new().await;
    let worker = env.start_worker(config_with(&env, mode)).await;
    let first = clerk_organization("org_1", "Acme", 10);
    let second = clerk_organization("org_2", "Globex", 10);
    env.apply_in_order(&[
        ("organization.created", first.clone()),
        ("organization.created", second.clone()),
        (
            "organizationMembership.created",
            membership("orgmem_1a", &first, "user_a", 10),
        ),
        (
            "organizationMembership.created",
            membership("orgmem_1b", &first, "user_b", 10),
        ),
        (
            "organizationMembership.created",
            membership("orgmem_2a", &second, "user_a", 10),
        ),
    ])
    .await;

    env.apply_in_order(&[(
        "organization.deleted",
        json!({"object": "organization", "id": "org_1", "deleted": true}),
    )])
    .await;
    assert!(env.has_tombstone("organization_tombstones", "org_1").await);
    assert_deleted(
        &env,
        mode,
        "organizations",
        "org_1",
        &[
            ("name", json!("")),
            ("slug", Value::Null),
            ("image_url", Value::Null),
            ("clerk_data", json!({})),
        ],
    )
    .await;
    for id in ["orgmem_1a", "orgmem_1b"] {
        assert_deleted(
            &env,
            mode,
            "organization_memberships",
            id,
            &[("clerk_data", json!({}))],
        )
        .await;
    }
    assert_eq!(shown(&env, "live_organizations").await, ["org_2"]);
    assert_eq!(
        shown(&env, "live_organization_memberships").await,
        ["orgmem_2a"]
    );
    let left = payloads_about(&env, &["org_1", "orgmem_1a", "orgmem_1b"]).await;
    assert_eq!(
        left == 0,
        mode == DeleteMode::Anonymize,
        "{mode}: {left} payloads"
    );
    assert!(payloads_about(&env, &["org_2", "orgmem_2a"]).await > 0);

    // A late membership of the deleted organization is stale.
    let late = env
        .apply_in_order(&[(
            "organizationMembership.updated",
            membership("orgmem_1a", &first, "user_a", 50),
        )])
        .await;
    let late = env.processed(&late[0]).await.expect("recorded");
    assert_eq!(late.outcome, "stale", "{mode}");
    assert_eq!(
        late.payload.is_none(),
        mode == DeleteMode::Anonymize,
        "{mode}"
    );

    // A membership removed, and its member added again under a new id: the kept row does not
    // hold the (organization, user) pair.
    let removed = membership("orgmem_2a", &second, "user_a", 10);
    env.apply_in_order(&[("organizationMembership.deleted", removed)])
        .await;
    assert!(
        env.has_tombstone("membership_tombstones", "orgmem_2a")
            .await
    );
    assert_deleted(
        &env,
        mode,
        "organization_memberships",
        "orgmem_2a",
        &[("clerk_data", json!({}))],
    )
    .await;
    assert_eq!(
        payloads_about(&env, &["orgmem_2a"]).await == 0,
        mode == DeleteMode::Anonymize
    );
    env.apply_in_order(&[(
        "organizationMembership.created",
        membership("orgmem_2a_again", &second, "user_a", 60),
    )])
    .await;
    assert_eq!(
        shown(&env, "live_organization_memberships").await,
        ["orgmem_2a_again"]
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_delete_removes_the_organization_its_memberships_and_a_membership() {
    a_deleted_organization_and_membership_in(DeleteMode::Hard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_delete_keeps_the_organization_and_memberships_marked() {
    a_deleted_organization_and_membership_in(DeleteMode::Soft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymizing_delete_clears_the_organization_and_memberships() {
    a_deleted_organization_and_membership_in(DeleteMode::Anonymize).await;
}

fn api_user(i: usize) -> Value {
    user(&format!("user_{i}"), &format!("user{i}@example.org"), 10)
}

fn quick_client(api: &ClerkApi) -> ClerkClient {
    ClerkClient::new(ClerkConfig {
        retries: 2,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        rate_limit: 10_000,
        timeout: Duration::from_secs(10),
        ..ClerkConfig::new(api.url(), api.secret_key().to_owned().into())
    })
    .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_reconcile_marks_a_missing_user_and_a_second_run_has_nothing_more_to_delete() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(api_user));
    let options = Options {
        reading: Reading {
            store_payloads: true,
            delete_mode: DeleteMode::Soft,
            ..Reading::default()
        },
        ..Options::default()
    };
    let client = quick_client(&api);
    let first = worker::reconcile::reconcile(env.db(), &client, &options).await;
    assert!(first.succeeded(), "{first:?}");
    assert_eq!(first.summary.users.created, 3);

    api.delete_user("user_1");
    let second = worker::reconcile::reconcile(env.db(), &client, &options).await;
    assert!(second.succeeded(), "{second:?}");
    assert_eq!(second.summary.users.deleted, 1, "{second:?}");
    assert_deleted(&env, DeleteMode::Soft, "users", "user_1", &[]).await;
    assert!(env.tombstoned("user_1").await);
    assert_eq!(shown(&env, "live_users").await, ["user_0", "user_2"]);

    // The kept row is neither missing from the listing nor counted: nothing more to delete, and
    // nothing asked of Clerk about it.
    let asked_before = api.served().len();
    let third = worker::reconcile::reconcile(env.db(), &client, &options).await;
    assert!(third.succeeded(), "{third:?}");
    assert_eq!(third.summary.users.deleted, 0, "{third:?}");
    assert_eq!(third.summary.users.listed, 2, "{third:?}");
    assert_eq!(third.summary.users.unchanged, 2, "{third:?}");
    let asked: Vec<String> = api.served()[asked_before..]
        .iter()
        .map(|served| served.path.clone())
        .collect();
    assert!(
        !asked.iter().any(|path| path.ends_with("/user_1")),
        "{asked:?}"
    );
    assert_deleted(&env, DeleteMode::Soft, "users", "user_1", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_rebuild_keep_the_kept_rows_and_apply_deletes_in_their_mode() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(config_with(&env, DeleteMode::Soft)).await;
    let start = chrono::Utc::now() - chrono::Duration::seconds(5);
    let organization = clerk_organization("org_1", "Acme", 10);
    env.apply_in_order(&[
        ("user.created", user("user_a", "ada@example.org", 10)),
        ("user.created", user("user_b", "bob@example.org", 10)),
        ("organization.created", organization.clone()),
        (
            "organizationMembership.created",
            membership("orgmem_a", &organization, "user_a", 10),
        ),
        (
            "user.deleted",
            json!({"deleted": true, "id": "user_a", "object": "user"}),
        ),
    ])
    .await;
    worker.stop().await;
    let kept = row(&env, "users", "user_a").await.expect("kept");

    // Rebuilt under `soft`: the kept rows stay as they are, the live ones are derived again.
    let rebuilt = rebuild::rebuild(
        env.db(),
        &rebuild::Options {
            dry_run: false,
            roles: Roles::default(),
            delete_mode: DeleteMode::Soft,
            progress_bar: false,
            pace: worker::apply::pace::Pace::FULL,
            chunk_subjects: rebuild::CHUNK_SUBJECTS,
        },
    )
    .await
    .expect("rebuild");
    assert!(rebuilt.committed, "{rebuilt:?}");
    assert_eq!(rebuilt.users.removed, 0, "{rebuilt:?}");
    assert_eq!(rebuilt.organization_memberships.removed, 0, "{rebuilt:?}");
    assert_eq!(row(&env, "users", "user_a").await, Some(kept));
    assert!(
        row(&env, "organization_memberships", "orgmem_a")
            .await
            .expect("kept")["deleted_at"]
            .is_string()
    );
    assert_eq!(shown(&env, "live_users").await, ["user_b"]);

    // Replayed under `anonymize`: the delete applied again clears the kept row.
    let replayed = replay::replay(
        env.db(),
        &replay::Options {
            filter: Filter {
                since: Some(start),
                ..Filter::default()
            },
            dry_run: false,
            reading: Reading {
                store_payloads: true,
                delete_mode: DeleteMode::Anonymize,
                ..Reading::default()
            },
            progress_bar: false,
            pace: worker::apply::pace::Pace::FULL,
        },
    )
    .await
    .expect("replay");
    assert_eq!(replayed.outcomes.failed, 0, "{replayed:?}");
    let anonymized = row(&env, "users", "user_a").await.expect("kept");
    assert_eq!(anonymized["email"], Value::Null, "{anonymized}");
    assert_eq!(anonymized["clerk_data"], Value::Null, "{anonymized}");
    assert_eq!(payloads_about(&env, &["user_a", "orgmem_a"]).await, 0);
    assert_eq!(shown(&env, "live_users").await, ["user_b"]);
    assert!(row(&env, "users", "user_b").await.expect("live")["email"] == "bob@example.org");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_when_a_kept_row_was_deleted() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(config_with(&env, DeleteMode::Soft)).await;
    let organization = clerk_organization("org_1", "Acme", 10);
    env.apply_in_order(&[
        ("user.created", user("user_a", "ada@example.org", 10)),
        (
            "organizationMembership.created",
            membership("orgmem_a", &organization, "user_a", 10),
        ),
        (
            "user.deleted",
            json!({"deleted": true, "id": "user_a", "object": "user"}),
        ),
    ])
    .await;
    worker.stop().await;

    let explanation = explain::from_database(env.db(), "user_a")
        .await
        .expect("explain");
    let row = explanation.row.clone().expect("kept row");
    assert!(row["deleted_at"].is_string(), "{row}");
    assert!(explanation.memberships[0].deleted_at.is_some());
    let mut text = Vec::new();
    explain::write_text(&mut text, &explanation).expect("text");
    let text = String::from_utf8(text).expect("utf-8");
    assert!(text.contains("kept after its deletion at"), "{text}");
    assert!(text.contains("DELETED AT"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_rows_are_purged_after_the_holdback_and_their_tombstones_stay() {
    let env = TestEnv::new().await;
    let mut config = config_with(&env, DeleteMode::Soft);
    config.purge_deleted_after = Some(Duration::from_secs(3));
    let worker = env.start_worker(config).await;
    env.apply_in_order(&[
        ("user.created", user("user_a", "ada@example.org", 10)),
        ("user.created", user("user_b", "bob@example.org", 10)),
        (
            "user.deleted",
            json!({"deleted": true, "id": "user_a", "object": "user"}),
        ),
    ])
    .await;
    assert!(
        row(&env, "users", "user_a").await.is_some(),
        "kept until the holdback has passed"
    );

    eventually(WITHIN, "the kept row purged", || async {
        row(&env, "users", "user_a").await.is_none()
    })
    .await;
    worker.stop().await;
    assert!(env.tombstoned("user_a").await);
    assert!(
        row(&env, "users", "user_b").await.is_some(),
        "a live row stays"
    );
}
