//! `worker replay` and `worker rebuild` against the real Postgres, with events delivered through
//! the real RabbitMQ to a worker running in the test's process: a fresh database per test.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use sea_orm::{
    ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, Statement,
    TransactionTrait,
};
use serde_json::{Value, json};
use shared::Roles;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization, clerk_user};
use test_support::rows::processed_events;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};
use worker::apply::DeleteMode;
use worker::apply::Reading;
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::history::{Filter, rebuild, replay};
use worker::storage::users;

const WITHIN: Duration = Duration::from_secs(60);

/// Publishes the events at once and waits until the worker has recorded every one; returns
/// their svix-ids.
async fn publish_all(env: &TestEnv, events: &[(&str, Value)]) -> Vec<String> {
    let mut ids = Vec::with_capacity(events.len());
    for (event_type, data) in events {
        let id = svix_id();
        env.publish_event(&id, event_type, data.clone()).await;
        ids.push(id);
    }
    for id in &ids {
        eventually(WITHIN, "the event recorded", || async {
            env.processed(id).await.is_some()
        })
        .await;
    }
    ids
}

fn user_id(i: usize) -> String {
    format!("user_r{i:03}")
}

/// Version `updated_at` of user `i`: its first name names the version, so a row shows which
/// version it holds.
fn user(i: usize, role: Option<&str>, updated_at: i64) -> Value {
    let mut user = clerk_user(
        &user_id(i),
        Some(&format!("r{i}@example.org")),
        role,
        updated_at,
    );
    user["first_name"] = json!(format!("v{updated_at}"));
    user
}

/// Every stored user, by id, with `synced_at` (the time of the write) left out.
async fn users_table(env: &TestEnv) -> Vec<users::Model> {
    let epoch = chrono::DateTime::UNIX_EPOCH.fixed_offset();
    users::Entity::find()
        .order_by_asc(users::Column::Id)
        .all(env.db())
        .await
        .expect("users")
        .into_iter()
        .map(|row| users::Model {
            synced_at: epoch,
            ..row
        })
        .collect()
}

async fn execute(env: &TestEnv, sql: &str) {
    env.db()
        .execute_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect(sql);
}

fn replay_options(filter: Filter) -> replay::Options {
    replay::Options {
        filter,
        dry_run: false,
        reading: Reading {
            roles: Roles::default(),
            store_payloads: true,
            ..Reading::default()
        },
        progress_bar: false,
        pace: worker::apply::pace::Pace::FULL,
    }
}

fn since(at: chrono::DateTime<Utc>) -> Filter {
    Filter {
        since: Some(at),
        ..Filter::default()
    }
}

/// The history rows whose svix-id starts with `prefix`.
async fn history_with_prefix(env: &TestEnv, prefix: &str) -> Vec<processed_events::Model> {
    processed_events::Entity::find()
        .filter(sea_orm::sea_query::Expr::cust_with_values(
            "starts_with(svix_id, $1)",
            [prefix.to_owned()],
        ))
        .all(env.db())
        .await
        .expect("history")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_beside_live_events_ends_equal_to_the_newest_versions() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let start = Utc::now() - chrono::Duration::seconds(1);
    // Two versions of 30 users, newest first for half of them, and a user created then deleted.
    let mut first = Vec::new();
    for i in 0..30 {
        let (a, b) = if i % 2 == 0 {
            (1_000, 2_000)
        } else {
            (2_000, 1_000)
        };
        first.push(("user.updated", user(i, None, a)));
        first.push(("user.updated", user(i, None, b)));
    }
    first.push(("user.created", user(99, None, 1_000)));
    first.push((
        "user.deleted",
        json!({"id": user_id(99), "object": "user", "deleted": true}),
    ));
    let originals = publish_all(&env, &first).await;
    // A bug lost ten rows and wrote an older, wrong state into five others.
    execute(
        &env,
        "DELETE FROM users WHERE id IN (SELECT id FROM users ORDER BY id LIMIT 10)",
    )
    .await;
    execute(
        &env,
        "UPDATE users SET first_name = 'wrong', updated_at = updated_at - interval '1 ms' \
         WHERE id IN (SELECT id FROM users ORDER BY id DESC LIMIT 5)",
    )
    .await;

    // The replay runs while users 0 to 14 get a newer version live.
    let live: Vec<(&str, Value)> = (0..15)
        .map(|i| ("user.updated", user(i, None, 3_000)))
        .collect();
    let options = replay_options(since(start));
    let (summary, live_ids) = tokio::join!(replay::replay(env.db(), &options), async {
        publish_all(&env, &live).await
    });
    let summary = summary.expect("replay");
    worker.stop().await;

    for i in 0..30 {
        let row = env.user(&user_id(i)).await.expect("user back");
        let newest = if i < 15 { 3_000 } else { 2_000 };
        assert_eq!(row.updated_at.timestamp_millis(), newest, "{}", user_id(i));
        assert_eq!(row.first_name, Some(format!("v{newest}")));
    }
    assert!(env.user(&user_id(99)).await.is_none(), "no resurrection");
    assert!(env.tombstoned(&user_id(99)).await);

    // Every original event of the window, and nothing else, was applied again under its own
    // svix-id, with source `replay` and a history row of its own.
    let replayed = history_with_prefix(&env, &format!("replay_{}_", summary.run)).await;
    let mut by_original: HashMap<String, processed_events::Model> = replayed
        .into_iter()
        .map(|row| {
            let original = row.svix_id[format!("replay_{}_", summary.run).len()..].to_owned();
            (original, row)
        })
        .collect();
    assert!(summary.read >= originals.len() as u64, "{summary:?}");
    for original in &originals {
        let row = by_original.remove(original).expect("replayed");
        assert_eq!(row.source, "replay");
        assert!(row.payload.is_some());
        let stored = env.processed(original).await.expect("original kept");
        assert_eq!(row.payload, stored.payload);
        assert_eq!(row.subject_id, stored.subject_id);
    }
    // Live events that came in before the run started are in the window too; none after it.
    for (original, row) in &by_original {
        assert!(live_ids.contains(original), "{original}: {row:?}");
        assert!(row.processed_at > env.processed(original).await.expect("live").processed_at);
    }
    assert_eq!(summary.without_payload, 0);
    assert_eq!(summary.outcomes.failed, 0);
    assert_eq!(summary.unreadable, 0);
    // The five wrong rows were written again, and the ten lost ones unless a live version got
    // there first.
    assert!(
        (5..=15).contains(&summary.changed.len()),
        "{:?}",
        summary.changed
    );
    assert_eq!(summary.outcomes.deleted, 1);
    assert_eq!(summary.types["user.deleted"].deleted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_what_would_change_and_writes_nothing() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let start = Utc::now() - chrono::Duration::seconds(1);
    publish_all(
        &env,
        &[
            ("user.created", user(1, None, 1_000)),
            ("user.created", user(2, None, 1_000)),
            ("session.created", json!({"id": "sess_1"})),
        ],
    )
    .await;
    worker.stop().await;
    execute(&env, "DELETE FROM users").await;
    let history = env.processed_count().await;

    let dry = replay::replay(
        env.db(),
        &replay::Options {
            dry_run: true,
            ..replay_options(since(start))
        },
    )
    .await
    .expect("dry run");

    assert_eq!(dry.read, 3);
    assert_eq!(dry.outcomes.applied, 2);
    assert_eq!(dry.outcomes.ignored, 1);
    assert_eq!(dry.types["user.created"].applied, 2);
    assert_eq!(
        dry.changed
            .iter()
            .map(|c| (c.kind.as_str(), c.id.as_str()))
            .collect::<Vec<_>>(),
        [("user", &*user_id(1)), ("user", &*user_id(2))]
    );
    assert_eq!(env.processed_count().await, history, "no history written");
    assert!(users_table(&env).await.is_empty(), "no row written");

    // The same through the binary, for one subject, and for real.
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["replay", "--since", &start.to_rfc3339(), "--json"])
        .args(["--subject", &user_id(2), "--type", "user.created"])
        .env("DATABASE_URL", env.db_url())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the worker binary");
    assert!(output.status.success(), "{output:?}");
    let summary: Value = serde_json::from_slice(&output.stdout).expect("json summary");
    assert_eq!(summary["read"], 1, "{summary}");
    assert_eq!(summary["outcomes"]["applied"], 1, "{summary}");
    assert_eq!(
        summary["changed"],
        json!([{"kind": "user", "id": user_id(2)}])
    );
    assert!(env.user(&user_id(2)).await.is_some());
    assert!(env.user(&user_id(1)).await.is_none());
    assert_eq!(env.processed_count().await, history + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_kept_without_payloads_are_counted_and_not_replayed() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.reading.store_payloads = false;
    let worker = env.start_worker(config).await;
    let start = Utc::now() - chrono::Duration::seconds(1);
    publish_all(&env, &[("user.created", user(1, None, 1_000))]).await;
    worker.stop().await;
    execute(&env, "DELETE FROM users").await;

    let summary = replay::replay(env.db(), &replay_options(since(start)))
        .await
        .expect("replay");

    assert_eq!((summary.read, summary.without_payload), (1, 1));
    assert_eq!(summary.outcomes, replay::Tally::default());
    assert!(env.user(&user_id(1)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error() {
    let env = TestEnv::new().await;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .arg("replay")
            .args(args)
            .env("DATABASE_URL", env.db_url())
            .output()
            .expect("run the worker binary")
    };
    let stderr =
        |output: std::process::Output| String::from_utf8_lossy(&output.stderr).into_owned();
    let missing = run(&[]);
    assert!(!missing.status.success());
    assert!(stderr(missing).contains("--since <TIME>"));
    let malformed = run(&["--since", "yesterday"]);
    assert!(!malformed.status.success());
    assert!(stderr(malformed).contains("neither an RFC 3339 time"));
    let empty = run(&["--since", "1h", "--until", "2h"]);
    assert!(!empty.status.success());
    assert!(stderr(empty).contains("the window is empty"));
}

/// Users with several roles in `public_metadata`, as Clerk would hold them.
fn users_with_roles() -> Vec<Value> {
    let roles = [
        Some("admin"),
        Some("coach"),
        Some("trainer"),
        None,
        Some("owner"),
    ];
    (0..10)
        .map(|i| user(i, roles[i % roles.len()], 5_000))
        .collect()
}

fn new_roles() -> Roles {
    Roles::new(["coach", "owner", "admin", "member"], "member").expect("roles")
}

fn only_members() -> Roles {
    Roles::new(["member"], "member").expect("roles")
}

async fn rebuild_with(
    env: &TestEnv,
    roles: Roles,
    dry_run: bool,
) -> anyhow::Result<rebuild::Summary> {
    let options = rebuild::Options {
        dry_run,
        roles,
        delete_mode: DeleteMode::Hard,
        progress_bar: false,
        pace: worker::apply::pace::Pace::FULL,
        chunk_subjects: rebuild::CHUNK_SUBJECTS,
    };
    rebuild::rebuild(env.db(), &options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_after_a_role_change_stores_what_a_reconcile_with_the_new_roles_would() {
    // The history: each user created with an older version, then updated to the newest.
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let mut events: Vec<(&str, Value)> = (0..10)
        .map(|i| ("user.created", user(i, Some("client"), 1_000)))
        .collect();
    events.extend(users_with_roles().into_iter().map(|u| ("user.updated", u)));
    publish_all(&env, &events).await;
    worker.stop().await;
    let before = users_table(&env).await;
    assert_eq!(before.iter().filter(|u| u.role == "client").count(), 6);
    let history = env.processed_count().await;

    let dry = rebuild_with(&env, new_roles(), true)
        .await
        .expect("dry run");
    assert!(!dry.committed);
    assert_eq!(users_table(&env).await, before, "a dry run writes nothing");
    assert_eq!(env.processed_count().await, history);

    let summary = rebuild_with(&env, new_roles(), false)
        .await
        .expect("rebuild");

    assert!(summary.committed, "{summary:?}");
    assert_eq!(summary.users, dry.users, "the dry run said exactly this");
    // admin stays; coach, owner and the absent role (client before, member now) change; trainer
    // is no role any more.
    assert_eq!(
        summary.users,
        rebuild::TableCounts {
            created: 0,
            changed: 8,
            removed: 0,
            unchanged: 2,
            kept_without_history: 0,
        }
    );
    assert_eq!(
        summary.history,
        rebuild::History {
            rows: 20,
            with_payload: 20,
            without_payload: 0,
            applied_again: 20,
            subjects: 10,
        }
    );
    assert_eq!(
        env.processed_count().await,
        history,
        "a rebuild is not an event"
    );

    // A reconcile with the new roles over the same users stores exactly the same rows.
    let reconciled = TestEnv::new().await;
    let api = ClerkApi::start("sk_test_rebuild").await;
    api.put_users(users_with_roles());
    let client = ClerkClient::new(ClerkConfig {
        rate_limit: 10_000,
        ..ClerkConfig::new(api.url(), api.secret_key().to_owned().into())
    })
    .expect("client");
    let report = worker::reconcile::reconcile(
        reconciled.db(),
        &client,
        &worker::reconcile::Options {
            reading: Reading {
                roles: new_roles(),
                store_payloads: true,
                ..Reading::default()
            },
            ..Default::default()
        },
    )
    .await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(users_table(&env).await, users_table(&reconciled).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_rows_it_cannot_derive_and_tombstones() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let organization = clerk_organization("org_r1", "Acme", 2_000);
    publish_all(
        &env,
        &[
            ("user.created", user(1, Some("admin"), 1_000)),
            ("user.created", user(2, Some("admin"), 1_000)),
            ("user.created", user(3, Some("admin"), 1_000)),
            ("user.created", user(4, Some("admin"), 1_000)),
            (
                "user.deleted",
                json!({"id": user_id(4), "object": "user", "deleted": true}),
            ),
            ("organization.created", organization.clone()),
            (
                "organizationMembership.created",
                clerk_membership(
                    "orgmem_r1",
                    &organization,
                    &user_id(1),
                    "org:admin",
                    1_000,
                    2_000,
                ),
            ),
        ],
    )
    .await;
    worker.stop().await;
    // User 2's history was pruned; user 3's row is newer than anything its history holds.
    execute(
        &env,
        &format!(
            "DELETE FROM processed_events WHERE subject_id = '{}'",
            user_id(2)
        ),
    )
    .await;
    execute(
        &env,
        &format!(
            "UPDATE users SET updated_at = updated_at + interval '1 day', first_name = 'later' \
             WHERE id = '{}'",
            user_id(3)
        ),
    )
    .await;
    let before = users_table(&env).await;

    let summary = rebuild_with(&env, only_members(), false)
        .await
        .expect("rebuild");

    assert!(summary.committed, "{summary:?}");
    assert_eq!(
        summary.users,
        rebuild::TableCounts {
            created: 0,
            changed: 1,
            removed: 0,
            unchanged: 2,
            kept_without_history: 2,
        }
    );
    let after = users_table(&env).await;
    assert_eq!(after.len(), 3);
    assert_eq!(after[0].role, "member", "user 1 derived with the new roles");
    assert_eq!(after[1], before[1], "user 2 kept as it was");
    assert_eq!(after[2], before[2], "user 3 kept as it was");
    assert_eq!(after[2].first_name.as_deref(), Some("later"));
    assert!(env.user(&user_id(4)).await.is_none(), "still deleted");
    assert!(env.tombstoned(&user_id(4)).await);
    // The organization and the membership are derived again, the same.
    for counts in [summary.organizations, summary.organization_memberships] {
        assert_eq!(
            (counts.unchanged, counts.created, counts.removed),
            (1, 0, 0),
            "{summary:?}"
        );
    }
    assert!(env.membership("orgmem_r1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_of_history_kept_without_payloads_keeps_every_row() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.reading.store_payloads = false;
    let worker = env.start_worker(config).await;
    publish_all(&env, &[("user.created", user(1, Some("admin"), 1_000))]).await;
    worker.stop().await;
    let before = users_table(&env).await;

    let summary = rebuild_with(&env, only_members(), false)
        .await
        .expect("rebuild");

    assert_eq!(
        (summary.history.rows, summary.history.without_payload),
        (1, 1)
    );
    assert_eq!(summary.history.applied_again, 0);
    assert_eq!(summary.users.kept_without_history, 1);
    assert_eq!(summary.users.unchanged, 1);
    assert_eq!(users_table(&env).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_while_another_runs_stops_at_once_and_writes_nothing() {
    let env = TestEnv::new().await;
    let running = env.db().begin().await.expect("transaction");
    running
        .execute_unprepared("SELECT pg_advisory_xact_lock(1919247467, 1)")
        .await
        .expect("the rebuild lock");

    let error = rebuild_with(&env, Roles::default(), false)
        .await
        .expect_err("a rebuild is running");

    assert!(
        error.to_string().contains("another rebuild is running"),
        "{error}"
    );
    running.rollback().await.expect("rollback");
    let users = users::Entity::find().count(env.db()).await.expect("count");
    assert_eq!(users, 0);
}
