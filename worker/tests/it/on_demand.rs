//! The on-demand sync API (`POST /v1/sync/users/{id}`, `POST /v1/sync/organizations/{id}`) of a
//! worker running in this process, against the real Postgres and RabbitMQ (webhooks flow at the
//! same time) and the stand-in for Clerk's Backend API: a fresh database and topology per test.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization, clerk_user};
use test_support::http::{Answer, Client, metric};
use test_support::{TestEnv, TestWorker};
use worker::clerk::ClerkConfig;
use worker::on_demand::OnDemandConfig;

const KEY: &str = "sk_test_standin_key";
const TOKEN: &str = "on-demand-test-token-0123456789";

/// The API on with `reuse` and `timeout`, talking to the stand-in, with quick retries and a
/// rate limit of `rate_limit` requests per 10 s.
fn api_config(
    api: &ClerkApi,
    reuse: Duration,
    timeout: Duration,
    rate_limit: u32,
) -> OnDemandConfig {
    OnDemandConfig {
        token: TOKEN.into(),
        listen: None,
        timeout,
        reuse,
        clerk: ClerkConfig {
            retries: 1,
            retry_base: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
            rate_limit,
            timeout: Duration::from_secs(10),
            ..ClerkConfig::new(api.url(), KEY.to_owned().into())
        },
    }
}

async fn start(env: &TestEnv, on_demand: OnDemandConfig) -> TestWorker {
    let config = worker::WorkerConfig {
        on_demand: Some(on_demand),
        ..env.config()
    };
    env.start_worker(config).await
}

/// `POST /v1/sync/{kind}/{id}` with `Authorization: Bearer {token}` (none when `None`).
async fn sync(
    client: &Client,
    worker: &TestWorker,
    kind: &str,
    id: &str,
    token: Option<&str>,
) -> Answer {
    let port = worker.api_port.unwrap_or(worker.port);
    let headers: Vec<(String, String)> = token
        .map(|token| ("authorization".to_owned(), format!("Bearer {token}")))
        .into_iter()
        .collect();
    client
        .try_post(
            &format!("http://127.0.0.1:{port}/v1/sync/{kind}/{id}"),
            &headers,
            b"",
        )
        .await
        .unwrap_or_else(|error| panic!("POST /v1/sync/{kind}/{id}: {error:#}"))
}

async fn sync_user(worker: &TestWorker, id: &str) -> Answer {
    sync(&Client::new(), worker, "users", id, Some(TOKEN)).await
}

/// The history of `id` written by the on-demand sync: (event type, outcome), oldest first.
async fn on_demand_history(env: &TestEnv, id: &str) -> Vec<(String, String)> {
    env.db()
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT event_type, outcome FROM processed_events \
             WHERE subject_id = $1 AND source = 'on_demand' ORDER BY processed_at, svix_id",
            [id.into()],
        ))
        .await
        .expect("history")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "event_type").expect("type"),
                row.try_get("", "outcome").expect("outcome"),
            )
        })
        .collect()
}

/// The stored row of `table` as Postgres would write it in JSON.
async fn stored_json(env: &TestEnv, table: &str, id: &str) -> Option<Value> {
    env.db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("SELECT to_jsonb(t)::text AS row FROM {table} t WHERE id = $1"),
            [id.into()],
        ))
        .await
        .expect("row")
        .map(|row| {
            let text: String = row.try_get("", "row").expect("row text");
            serde_json::from_str(&text).expect("json")
        })
}

#[tokio::test]
async fn a_user_only_in_clerk_is_synced_on_demand_and_its_late_webhook_follows_the_usual_rule() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(5), 10_000),
    )
    .await;
    api.put_user(clerk_user(
        "user_signup",
        Some("new@example.org"),
        Some("trainer"),
        1_000,
    ));

    let answer = sync_user(&worker, "user_signup").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // The row exactly as stored, after the commit.
    let stored = stored_json(&env, "users", "user_signup")
        .await
        .expect("stored");
    assert_eq!(answer.json(), stored);
    assert_eq!(stored["email"], "new@example.org");
    assert_eq!(stored["role"], "trainer");
    assert_eq!(
        on_demand_history(&env, "user_signup").await,
        [("user.updated".to_owned(), "applied".to_owned())]
    );

    // The sign-up's webhook arrives a second later with the same version: stale, nothing
    // changes. A later update applies as usual.
    let ids = env
        .apply_in_order(&[
            (
                "user.created",
                clerk_user(
                    "user_signup",
                    Some("new@example.org"),
                    Some("trainer"),
                    1_000,
                ),
            ),
            (
                "user.updated",
                clerk_user(
                    "user_signup",
                    Some("renamed@example.org"),
                    Some("admin"),
                    2_000,
                ),
            ),
        ])
        .await;
    let created = env.processed(&ids[0]).await.expect("recorded");
    assert_eq!(created.outcome, "stale");
    assert_eq!(
        env.processed(&ids[1]).await.expect("recorded").outcome,
        "applied"
    );
    let user = env.user("user_signup").await.expect("user");
    assert_eq!(user.email.as_deref(), Some("renamed@example.org"));

    // And an on-demand sync of the older version Clerk still shows (say, a stale cache) never
    // goes back: stale, and the answer is the newer stored row.
    let answer = sync_user(&worker, "user_signup").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["email"], "renamed@example.org");
    assert_eq!(
        on_demand_history(&env, "user_signup")
            .await
            .last()
            .map(|(_, o)| o.as_str()),
        Some("stale")
    );

    let (_, metrics) = worker.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"clerk_sync_worker_on_demand_requests_total{kind="user",outcome="synced"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"clerk_sync_worker_on_demand_seconds_count{kind="user"}"#
        ),
        Some(2.0)
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_user_deleted_in_clerk_answers_404_and_the_deletion_is_applied() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(5), 10_000),
    )
    .await;
    env.apply_in_order(&[(
        "user.created",
        clerk_user("user_gone", Some("gone@example.org"), None, 1_000),
    )])
    .await;
    assert!(env.user("user_gone").await.is_some());

    let answer = sync_user(&worker, "user_gone").await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert_eq!(answer.json()["error"], "not_found");
    assert!(
        env.user("user_gone").await.is_none(),
        "the row is still there"
    );
    assert!(env.tombstoned("user_gone").await, "no tombstone");
    assert_eq!(
        on_demand_history(&env, "user_gone").await,
        [("user.deleted".to_owned(), "deleted".to_owned())]
    );
    assert_eq!(api.calls("/v1/users/user_gone"), 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_tombstoned_id_answers_404_without_asking_clerk() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(5), 10_000),
    )
    .await;
    env.apply_in_order(&[(
        "user.deleted",
        json!({"deleted": true, "id": "user_buried", "object": "user"}),
    )])
    .await;
    // Clerk would still answer (a stale cache, a replayed id): it is not asked.
    api.put_user(clerk_user(
        "user_buried",
        Some("b@example.org"),
        None,
        5_000,
    ));

    let answer = sync_user(&worker, "user_buried").await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(api.served().is_empty(), "asked Clerk: {:?}", api.served());
    assert!(env.user("user_buried").await.is_none());
    assert!(on_demand_history(&env, "user_buried").await.is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_calls_for_one_user_make_one_backend_api_call_and_one_write() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    // No reuse: only the sharing of the flight in progress keeps the calls down.
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(5), 10_000),
    )
    .await;
    api.put_user(clerk_user(
        "user_herd",
        Some("herd@example.org"),
        None,
        1_000,
    ));
    api.answer_after(Duration::from_millis(500));

    let client = Client::new();
    let calls = (0..50).map(|_| {
        let client = client.clone();
        let worker = &worker;
        async move { sync(&client, worker, "users", "user_herd", Some(TOKEN)).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let stored = stored_json(&env, "users", "user_herd")
        .await
        .expect("stored");
    for answer in &answers {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json(), stored);
    }
    assert_eq!(api.calls("/v1/users/user_herd"), 1);
    assert_eq!(on_demand_history(&env, "user_herd").await.len(), 1);

    // Once it has landed, the next call asks again (no reuse configured).
    api.answer_after(Duration::ZERO);
    assert_eq!(sync_user(&worker, "user_herd").await.status, 200);
    assert_eq!(api.calls("/v1/users/user_herd"), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_fresh_result_is_reused_without_asking_clerk_again() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let worker = start(
        &env,
        api_config(
            &api,
            Duration::from_secs(60),
            Duration::from_secs(5),
            10_000,
        ),
    )
    .await;
    api.put_user(clerk_user(
        "user_fresh",
        Some("fresh@example.org"),
        None,
        1_000,
    ));
    assert_eq!(sync_user(&worker, "user_fresh").await.status, 200);
    // A webhook changes the row meanwhile: the reused answer is the row as stored now.
    env.apply_in_order(&[(
        "user.updated",
        clerk_user("user_fresh", Some("fresher@example.org"), None, 2_000),
    )])
    .await;
    let again = sync_user(&worker, "user_fresh").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json()["email"], "fresher@example.org");
    assert_eq!(api.calls("/v1/users/user_fresh"), 1);
    let (_, metrics) = worker.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"clerk_sync_worker_on_demand_requests_total{kind="user",outcome="reused"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_organization_is_synced_with_its_memberships_and_a_deleted_one_answers_404() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(5), 10_000),
    )
    .await;
    let organization = clerk_organization("org_new", "New Team", 1_000);
    api.put_organization(organization.clone());
    api.put_memberships([
        clerk_membership(
            "orgmem_1",
            &organization,
            "user_a",
            "org:admin",
            1_000,
            1_000,
        ),
        clerk_membership(
            "orgmem_2",
            &organization,
            "user_b",
            "org:member",
            1_001,
            1_001,
        ),
    ]);
    let client = Client::new();

    let answer = sync(&client, &worker, "organizations", "org_new", Some(TOKEN)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.json(),
        stored_json(&env, "organizations", "org_new")
            .await
            .expect("stored")
    );
    assert_eq!(answer.json()["name"], "New Team");
    assert_eq!(
        env.membership("orgmem_1").await.expect("member a").user_id,
        "user_a"
    );
    assert_eq!(
        env.membership("orgmem_2").await.expect("member b").role,
        "org:member"
    );
    assert_eq!(on_demand_history(&env, "org_new").await.len(), 1);
    assert_eq!(on_demand_history(&env, "orgmem_2").await.len(), 1);

    api.delete_organization("org_new");
    let answer = sync(&client, &worker, "organizations", "org_new", Some(TOKEN)).await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(env.organization("org_new").await.is_none());
    assert!(
        env.membership("orgmem_1").await.is_none(),
        "its memberships go with it"
    );
    assert!(
        env.has_tombstone("organization_tombstones", "org_new")
            .await
    );
    worker.stop().await;
}

#[tokio::test]
async fn no_token_is_401_a_wrong_one_403_and_a_worker_without_the_setting_has_no_api() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_user(clerk_user("user_1", Some("one@example.org"), None, 1_000));
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(5), 10_000),
    )
    .await;
    let client = Client::new();

    let answer = sync(&client, &worker, "users", "user_1", None).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    let answer = sync(&client, &worker, "users", "user_1", Some("not-the-token")).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    let answer = sync(
        &client,
        &worker,
        "users",
        "user_1",
        Some(&TOKEN[..TOKEN.len() - 1]),
    )
    .await;
    assert_eq!(
        answer.status, 403,
        "a prefix of the token passed: {answer:?}"
    );
    let answer = sync(&client, &worker, "users", "user%20one", Some(TOKEN)).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(api.served().is_empty(), "asked Clerk: {:?}", api.served());
    assert!(env.user("user_1").await.is_none());
    // Health and metrics stay as they are, without a token.
    assert_eq!(worker.get("/healthz").await.0, 200);
    let (status, metrics) = worker.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &metrics,
            r#"clerk_sync_worker_on_demand_requests_total{kind="user",outcome="forbidden"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    worker.stop().await;

    // Without WORKER_API_TOKEN there is no such route, whatever the token.
    let disabled = env.start_worker(env.config()).await;
    assert_eq!(disabled.api_port, None);
    let answer = sync(&client, &disabled, "users", "user_1", Some(TOKEN)).await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(api.served().is_empty(), "asked Clerk: {:?}", api.served());
    assert!(env.user("user_1").await.is_none());
    disabled.stop().await;
}

#[tokio::test]
async fn clerk_down_or_slow_is_503_and_throttling_is_429_each_with_retry_after() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(1), 10_000),
    )
    .await;
    api.put_user(clerk_user("user_1", Some("one@example.org"), None, 1_000));

    api.go_down();
    let answer = sync_user(&worker, "user_1").await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("5"));

    api.throttle(7);
    let answer = sync_user(&worker, "user_1").await;
    assert_eq!(answer.status, 429, "{answer:?}");
    assert_eq!(
        answer.retry_after.as_deref(),
        Some("7"),
        "Clerk's Retry-After passed on"
    );

    // Slower than WORKER_API_TIMEOUT_MS (1 s): 503 rather than holding the app.
    api.come_back();
    api.answer_after(Duration::from_secs(3));
    let answer = sync_user(&worker, "user_1").await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.retry_after.is_some(), "{answer:?}");
    assert!(env.user("user_1").await.is_none());

    // Back to normal: the same request syncs.
    api.answer_after(Duration::ZERO);
    // The slow call may still be on its way; the next one waits for it or starts afresh.
    test_support::eventually(
        Duration::from_secs(20),
        "a sync after the outage",
        || async { sync_user(&worker, "user_1").await.status == 200 },
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn the_shared_rate_limit_answers_429_with_the_time_until_there_is_room() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    // Two requests per 10 s; a request waits for a free moment at most half its 2 s timeout.
    let worker = start(
        &env,
        api_config(&api, Duration::ZERO, Duration::from_secs(2), 2),
    )
    .await;
    for i in 0..3 {
        api.put_user(clerk_user(&format!("user_{i}"), None, None, 1_000));
    }
    assert_eq!(sync_user(&worker, "user_0").await.status, 200);
    assert_eq!(sync_user(&worker, "user_1").await.status, 200);
    let answer = sync_user(&worker, "user_2").await;
    assert_eq!(answer.status, 429, "{answer:?}");
    let wait: u64 = answer
        .retry_after
        .as_deref()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {answer:?}"));
    assert!((1..=10).contains(&wait), "Retry-After {wait}");
    assert_eq!(api.calls("/v1/users/user_2"), 0, "went past the limit");
    worker.stop().await;
}
