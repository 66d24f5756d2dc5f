//! An end user can nest `unsafe_metadata` deeper than the 128 levels serde_json reads by default
//! (Clerk bounds metadata by size, 8 KB, not by depth). Such a user syncs like any other, against
//! the real Postgres and RabbitMQ (and the stand-in for Clerk's Backend API): through the
//! webhook path, replay and rebuild of its history, and a reconcile whose listing page holds it.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use shared::Roles;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_user, envelope};
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};
use worker::apply::{DeleteMode, Reading};
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::history::{Filter, rebuild, replay};
use worker::reconcile::Options;

const WITHIN: Duration = Duration::from_secs(60);
/// Far past serde_json's 128, inside what 8 KB of metadata can nest.
const DEPTH: usize = 1_000;

/// `[[…[leaf]…]]`, `DEPTH` arrays deep.
fn nested(leaf: &str) -> Value {
    (0..DEPTH).fold(json!(leaf), |inner, _| json!([inner]))
}

fn deep_user(id: &str, leaf: &str, updated_at: i64) -> Value {
    let mut user = clerk_user(id, Some(&format!("{id}@example.org")), None, updated_at);
    user["unsafe_metadata"] = json!({ "deep": nested(leaf) });
    user
}

/// The outcome of history row `svix_id`, read as text: an entity would read the payload with
/// serde_json's default depth limit.
async fn outcome(env: &TestEnv, svix_id: &str) -> Option<String> {
    let row = env
        .db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT outcome FROM processed_events WHERE svix_id = $1",
            [svix_id.into()],
        ))
        .await
        .expect("history");
    row.map(|row| row.try_get("", "outcome").expect("outcome"))
}

/// Whether user `id`'s stored `clerk_data.unsafe_metadata` is `expected`, compared in Postgres.
async fn stored_metadata_is(env: &TestEnv, id: &str, expected: &Value) -> bool {
    let row = env
        .db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT clerk_data -> 'unsafe_metadata' = $2::jsonb AS same FROM users WHERE id = $1",
            [id.into(), expected.to_string().into()],
        ))
        .await
        .expect("user")
        .expect("user stored");
    row.try_get("", "same").expect("same")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_deeply_nested_metadata_is_applied_from_webhooks() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;

    let mut ids = Vec::new();
    for (event_type, leaf, updated_at) in [
        ("user.created", "first", 1_000),
        ("user.updated", "second", 2_000),
    ] {
        let id = svix_id();
        let body = envelope(event_type, deep_user("user_deep", leaf, updated_at)).to_string();
        env.publish(&id, event_type, body.as_bytes()).await;
        eventually(WITHIN, "the event recorded or dead-lettered", || async {
            outcome(&env, &id).await.is_some() || env.ready(&env.topology.dead_queue).await > 0
        })
        .await;
        ids.push(id);
    }
    worker.stop().await;

    assert_eq!(env.ready(&env.topology.dead_queue).await, 0, "dead letters");
    for id in &ids {
        assert_eq!(outcome(&env, id).await.as_deref(), Some("applied"), "{id}");
    }
    assert!(
        stored_metadata_is(&env, "user_deep", &json!({ "deep": nested("second") })).await,
        "the newer version, whole"
    );

    // The history holds both payloads, whole: replay and rebuild read them again.
    let replayed = replay::replay(
        env.db(),
        &replay::Options {
            filter: Filter {
                since: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
                subject: Some("user_deep".into()),
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
    // The two webhook events and their two replays.
    assert_eq!(rebuilt.history.applied_again, 4, "{rebuilt:?}");
    assert!(
        stored_metadata_is(&env, "user_deep", &json!({ "deep": nested("second") })).await,
        "rebuilt from the history, whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_lists_a_user_with_deeply_nested_metadata() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start("sk_test_standin_key").await;
    api.put_user(deep_user("user_deep", "listed", 1_000));
    api.put_user(clerk_user(
        "user_flat",
        Some("flat@example.org"),
        None,
        1_000,
    ));
    let config = ClerkConfig::new(api.url(), api.secret_key().to_owned().into());
    let client = ClerkClient::new(ClerkConfig {
        retries: 1,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        rate_limit: 10_000,
        ..config
    })
    .expect("client");

    let report = worker::reconcile::reconcile(env.db(), &client, &Options::default()).await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.created, 2, "{report:?}");
    assert!(stored_metadata_is(&env, "user_deep", &json!({ "deep": nested("listed") })).await);

    let again = worker::reconcile::reconcile(env.db(), &client, &Options::default()).await;
    assert!(again.succeeded(), "{again:?}");
    assert_eq!(again.summary.users.unchanged, 2, "{again:?}");
}
