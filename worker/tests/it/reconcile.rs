//! `worker reconcile` against the stand-in for Clerk's Backend API and the real Postgres (and,
//! where webhooks flow at the same time, the real RabbitMQ and a worker): a fresh database per
//! test. Users first, then organizations and memberships.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, Statement};
use serde_json::{Value, json};
use shared::organizations::{MembershipDeletion, MembershipRecord, OrganizationRecord};
use test_support::clerk_api::{ClerkApi, Fault};
use test_support::events::{clerk_membership, clerk_organization};
use test_support::rows::user_tombstones;
use test_support::signing::svix_id;
use test_support::worker::apply_changes;
use test_support::{TestEnv, eventually};
use worker::apply::organizations::Change;
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::config::ScheduledReconcile;
use worker::reconcile::{Counts, MaxDelete, Options, Report};
use worker::storage::users;

const KEY: &str = "sk_test_standin_key";
const WITHIN: Duration = Duration::from_secs(60);
/// `created_at` of the first test user; the i-th is `CREATED + i`, which orders the listing.
const CREATED: i64 = 1_700_000_000_000;

/// A Clerk user object shaped like the Backend API's (and the webhooks') `User`.
fn user(i: usize, updated_at: i64) -> Value {
    let id = user_id(i);
    json!({
        "id": id, "object": "user",
        "email_addresses": [{"id": format!("idn_{i}"), "object": "email_address",
                             "email_address": format!("user{i}@example.org"),
                             "verification": {"status": "verified", "strategy": "email_code"},
                             "linked_to": []}],
        "primary_email_address_id": format!("idn_{i}"),
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "First", "last_name": format!("Last {updated_at}"),
        "public_metadata": {"role": "trainer"}, "private_metadata": {}, "unsafe_metadata": {},
        "created_at": CREATED + i as i64, "updated_at": updated_at,
    })
}

fn user_id(i: usize) -> String {
    format!("user_{i:06}")
}

/// A client with quick retries, so a test about failures does not wait for production back-off.
fn client(api: &ClerkApi) -> ClerkClient {
    client_with_key(api, api.secret_key())
}

fn client_with_key(api: &ClerkApi, key: &str) -> ClerkClient {
    ClerkClient::new(quick(ClerkConfig::new(api.url(), key.to_owned().into()))).expect("client")
}

fn quick(config: ClerkConfig) -> ClerkConfig {
    ClerkConfig {
        retries: 2,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        rate_limit: 10_000,
        timeout: Duration::from_secs(10),
        ..config
    }
}

async fn reconcile(env: &TestEnv, api: &ClerkApi, options: Options) -> Report {
    worker::reconcile::reconcile(env.db(), &client(api), &options).await
}

async fn run(env: &TestEnv, api: &ClerkApi) -> Report {
    reconcile(env, api, Options::default()).await
}

fn counts(
    listed: u64,
    created: u64,
    updated: u64,
    unchanged: u64,
    stale: u64,
    deleted: u64,
) -> Counts {
    Counts {
        listed,
        created,
        updated,
        unchanged,
        stale,
        deleted,
    }
}

async fn stored_users(env: &TestEnv) -> u64 {
    users::Entity::find().count(env.db()).await.expect("count")
}

async fn tombstones(env: &TestEnv) -> u64 {
    user_tombstones::Entity::find()
        .count(env.db())
        .await
        .expect("count")
}

/// `reconcile_runs` rows: (trigger, outcome, counts).
async fn recorded_runs(env: &TestEnv) -> Vec<(String, String, Value)> {
    env.db()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT trigger, outcome, counts FROM reconcile_runs ORDER BY started_at",
        ))
        .await
        .expect("runs")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "trigger").expect("trigger"),
                row.try_get("", "outcome").expect("outcome"),
                row.try_get("", "counts").expect("counts"),
            )
        })
        .collect()
}

/// Runs the real binary's `worker reconcile ARGS` against this test's database.
fn command(env: &TestEnv, api_url: &str, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command
        .arg("reconcile")
        .args(args)
        .env("DATABASE_URL", env.db_url())
        .env("CLERK_API_URL", api_url)
        .env_remove("CLERK_SECRET_KEY")
        .env("RUST_LOG", "warn");
    if let Some(key) = key {
        command.env("CLERK_SECRET_KEY", key);
    }
    command.output().expect("run the worker binary")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_fills_an_empty_table_over_several_pages_and_records_the_run() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..1203).map(|i| user(i, CREATED + 5)));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users, counts(1203, 1203, 0, 0, 0, 0));
    assert_eq!(stored_users(&env).await, 1203);
    let row = env.user(&user_id(1202)).await.expect("last user stored");
    assert_eq!(row.email.as_deref(), Some("user1202@example.org"));
    assert_eq!(row.role, "trainer");
    assert_eq!(row.updated_at.timestamp_millis(), CREATED + 5);
    // Three pages walked with the cursor, every request with the pinned version.
    let served = api.served();
    let listings: Vec<_> = served.iter().filter(|s| s.path == "/v1/users").collect();
    assert_eq!(listings.len(), 3, "{listings:?}");
    assert!(listings[0].query.contains("limit=500"), "{listings:?}");
    assert!(
        listings[1].query.contains("starting_after=user_000499"),
        "{listings:?}"
    );
    assert!(served.iter().any(|s| s.path == "/v1/users/count"));
    assert!(
        served
            .iter()
            .all(|s| s.api_version.as_deref() == Some(worker::clerk::API_VERSION)),
        "{served:?}"
    );
    let runs = recorded_runs(&env).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].0.as_str(), runs[0].1.as_str()),
        ("command", "succeeded")
    );
    assert_eq!(runs[0].2["users"]["created"], 1203);
}

/// A listed user is stored exactly as the same object delivered by a webhook would be: every
/// column, the profile ones and `clerk_data` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_writes_the_same_columns_as_a_webhook_event() {
    let mut listed = user(1, CREATED + 5);
    let profile = json!({
        "username": "ada", "image_url": "https://img.example.org/ada.png",
        "external_id": "crm-42", "last_sign_in_at": CREATED + 3,
        "public_metadata": {"role": "admin", "plan": "team"},
        "private_metadata": {"stripe_customer": "cus_1"},
    });
    for (field, value) in profile.as_object().expect("object") {
        listed[field] = value.clone();
    }
    let by_reconcile = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_user(listed.clone());
    let report = run(&by_reconcile, &api).await;
    assert!(report.succeeded(), "{report:?}");

    let by_webhook = TestEnv::new().await;
    let worker = by_webhook.start_worker(by_webhook.config()).await;
    by_webhook
        .publish_event(&svix_id(), "user.updated", listed.clone())
        .await;
    eventually(WITHIN, "the webhook applied", || async {
        by_webhook.user(&user_id(1)).await.is_some()
    })
    .await;
    worker.stop().await;

    let mut from_listing = by_reconcile.user(&user_id(1)).await.expect("reconciled");
    let from_event = by_webhook.user(&user_id(1)).await.expect("applied");
    assert_eq!(from_listing.username.as_deref(), Some("ada"));
    assert_eq!(from_listing.external_id.as_deref(), Some("crm-42"));
    assert_eq!(from_listing.role, "admin");
    assert_eq!(from_listing.clerk_data, Some(listed));
    // Only the time of the write may differ.
    from_listing.synced_at = from_event.synced_at;
    assert_eq!(from_listing, from_event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_finds_everything_unchanged_and_writes_nothing() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..700).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    let processed = env.processed_count().await;

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users, counts(700, 0, 0, 700, 0, 0));
    assert_eq!(
        env.processed_count().await,
        processed,
        "nothing was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_row_is_left_alone_and_an_older_one_updated() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users([user(0, CREATED + 200), user(1, CREATED + 200)]);
    assert!(run(&env, &api).await.succeeded());
    // Postgres holds a newer version of user 0 than the listing; user 1 moved on in Clerk.
    api.put_users([user(0, CREATED + 100), user(1, CREATED + 300)]);

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users, counts(2, 0, 1, 0, 1, 0));
    let kept = env.user(&user_id(0)).await.expect("user 0");
    assert_eq!(kept.updated_at.timestamp_millis(), CREATED + 200);
    let updated = env.user(&user_id(1)).await.expect("user 1");
    assert_eq!(updated.updated_at.timestamp_millis(), CREATED + 300);
    assert_eq!(
        updated.last_name.as_deref(),
        Some(&*format!("Last {}", CREATED + 300))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_deleted_in_clerk_is_deleted_and_tombstoned() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    api.delete_user(&user_id(1));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users, counts(2, 0, 0, 2, 0, 1));
    assert!(env.user(&user_id(1)).await.is_none());
    assert!(env.tombstoned(&user_id(1)).await);
    assert!(env.user(&user_id(0)).await.is_some());
    let confirmed = api
        .served()
        .into_iter()
        .any(|s| s.path == format!("/v1/users/{}", user_id(1)) && s.status == 404);
    assert!(
        confirmed,
        "the deletion was confirmed by the user's own GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_missing_from_the_listing_but_found_on_its_own_is_kept_and_applied() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    api.put_user(user(2, CREATED + 50));
    api.hide_from_listing(&user_id(2));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users, counts(2, 0, 1, 2, 0, 0));
    let kept = env.user(&user_id(2)).await.expect("kept");
    assert_eq!(kept.updated_at.timestamp_millis(), CREATED + 50);
    assert!(!env.tombstoned(&user_id(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_waited_out_for_its_retry_after() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..10).map(|i| user(i, CREATED + 5)));
    api.inject([
        Fault::RateLimited { retry_after: 1 },
        Fault::RateLimited { retry_after: 1 },
    ]);
    let started = Instant::now();

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "both Retry-After waits were kept"
    );
    assert_eq!(report.summary.users.created, 10);
    let statuses: Vec<u16> = api.served().iter().map(|s| s.status).collect();
    assert_eq!(&statuses[..3], [429, 429, 200], "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_retried_with_back_off() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..10).map(|i| user(i, CREATED + 5)));
    api.inject([Fault::Status(503), Fault::Status(500)]);

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.created, 10);
    let statuses: Vec<u16> = api.served().iter().map(|s| s.status).collect();
    assert_eq!(&statuses[..3], [503, 500, 200], "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_fails_part_way_deletes_nothing_and_fails_the_run() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..600).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    api.delete_user(&user_id(3));
    api.fail_listing_from(500);

    let report = run(&env, &api).await;

    let failure = report.failure.clone().expect("the run failed");
    assert!(failure.contains("listing did not complete"), "{failure}");
    assert!(failure.contains("no users were deleted"), "{failure}");
    assert_eq!(report.summary.users.deleted, 0);
    assert!(env.user(&user_id(3)).await.is_some(), "nothing was deleted");
    assert_eq!(tombstones(&env).await, 0);
    // The failing page was tried 1 + 2 retries times, and no user was asked for on its own.
    let served = api.served();
    let failed = served.iter().filter(|s| s.status == 500).count();
    assert_eq!(failed, 3, "{served:?}");
    assert!(!served.iter().any(|s| s.path.starts_with("/v1/users/user_")));
    let runs = recorded_runs(&env).await;
    assert_eq!(runs[1].1, "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_exits_non_zero_on_a_failed_listing_and_prints_its_json_summary() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, CREATED + 5)));

    api.put_organizations([organization(0, CREATED + 5), organization(1, CREATED + 5)]);
    api.put_membership(membership(0, 1, CREATED + 5));

    let ok = command(&env, api.url(), Some(KEY), &["--json"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let summary: Value = serde_json::from_slice(&ok.stdout).expect("one JSON object");
    assert_eq!(
        summary["users"],
        json!({"listed": 3, "created": 3, "updated": 0, "unchanged": 0, "stale": 0, "deleted": 0})
    );
    assert_eq!(
        summary["organizations"],
        json!({"listed": 2, "created": 2, "updated": 0, "unchanged": 0, "stale": 0, "deleted": 0})
    );
    assert_eq!(
        summary["memberships"],
        json!({"listed": 1, "created": 1, "updated": 0, "unchanged": 0, "stale": 0, "deleted": 0})
    );
    assert!(summary["seconds"].as_f64().is_some(), "{summary}");

    let again = command(&env, api.url(), Some(KEY), &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    let paragraph = String::from_utf8_lossy(&again.stdout);
    assert!(
        paragraph.contains(
            "Organizations: 2 listed, 0 created, 0 updated, 2 unchanged, 0 stale, 0 deleted. \
             Memberships: 1 listed, 0 created, 0 updated, 1 unchanged, 0 stale, 0 deleted. \
             The tables match Clerk."
        ),
        "{paragraph}"
    );

    api.inject(std::iter::repeat_n(Fault::Status(502), 20));
    let failed = command(&env, api.url(), Some(KEY), &[]);
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("reconcile failed"),
        "{}",
        stderr(&failed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_stops_at_the_first_request_with_a_clear_message() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, CREATED + 5)));

    let output = command(&env, api.url(), Some("sk_test_wrong_secret"), &[]);

    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("401"), "{text}");
    assert!(text.contains("authentication_invalid"), "{text}");
    assert!(text.contains("CLERK_SECRET_KEY"), "{text}");
    assert!(
        !text.contains("sk_test_wrong_secret"),
        "the key never shows: {text}"
    );
    assert_eq!(api.served().len(), 1, "no retry of a 401");
    assert_eq!(stored_users(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_stops_before_any_request() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;

    let output = command(&env, api.url(), None, &[]);

    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("CLERK_SECRET_KEY is required but not set"),
        "{text}"
    );
    assert!(api.served().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_of_another_instance_is_stopped_by_the_deletion_limit() {
    let env = TestEnv::new().await;
    let production = ClerkApi::start(KEY).await;
    production.put_users((0..30).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &production).await.succeeded());
    // The development instance: other users, and 404 for every one of ours.
    let development = ClerkApi::start("sk_test_development").await;
    development.put_users((1000..1005).map(|i| user(i, CREATED + 5)));

    let report = run(&env, &development).await;

    let failure = report.failure.clone().expect("stopped");
    assert!(
        failure.contains("would remove more than 10 users"),
        "{failure}"
    );
    assert!(failure.contains("no users were deleted"), "{failure}");
    assert_eq!(report.summary.users.deleted, 0);
    assert_eq!(tombstones(&env).await, 0);
    for i in 0..30 {
        assert!(env.user(&user_id(i)).await.is_some(), "user {i} kept");
    }
    // It stopped asking once the limit was passed: 11 of the 30 confirmed gone.
    let asked = development
        .served()
        .iter()
        .filter(|s| s.path.starts_with("/v1/users/user_"))
        .count();
    assert_eq!(asked, 11);

    // A run that means it raises the limit.
    let options = Options {
        max_delete: MaxDelete::Rows(30),
        ..Options::default()
    };
    let report = reconcile(&env, &development, options).await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.deleted, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_what_would_change_and_writes_nothing() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..5).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    api.put_users([user(0, CREATED + 9), user(7, CREATED + 9)]);
    api.delete_user(&user_id(4));

    let options = Options {
        dry_run: true,
        ..Options::default()
    };
    let report = reconcile(&env, &api, options).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users, counts(5, 1, 1, 3, 0, 1));
    assert!(env.user(&user_id(7)).await.is_none());
    assert!(env.user(&user_id(4)).await.is_some());
    assert_eq!(
        env.user(&user_id(0))
            .await
            .expect("user 0")
            .updated_at
            .timestamp_millis(),
        CREATED + 5
    );
    assert_eq!(
        recorded_runs(&env).await.len(),
        1,
        "a dry run records no run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delete_skips_the_deletion_phase() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    api.delete_user(&user_id(0));

    let options = Options {
        delete: false,
        ..Options::default()
    };
    let report = reconcile(&env, &api, options).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.deleted, 0);
    assert!(env.user(&user_id(0)).await.is_some());
    assert!(
        !api.served()
            .iter()
            .any(|s| s.path.starts_with("/v1/users/user_"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_while_webhooks_flow_ends_equal_to_clerks_final_state() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let users = 300;
    api.put_users((0..users).map(|i| user(i, CREATED + 1)));
    let worker = env.start_worker(env.config()).await;

    // Clerk changes every user twice and deletes every tenth, sending the webhooks as it goes,
    // while a reconcile walks the same users.
    let changes = async {
        for version in [2, 3] {
            for i in 0..users {
                if i % 10 == 0 && version == 3 {
                    api.delete_user(&user_id(i));
                    env.publish_event(
                        &svix_id(),
                        "user.deleted",
                        json!({"id": user_id(i), "object": "user", "deleted": true}),
                    )
                    .await;
                } else {
                    let data = user(i, CREATED + version);
                    api.put_user(data.clone());
                    env.publish_event(&svix_id(), "user.updated", data).await;
                }
            }
        }
    };
    // Deletions during the run are real ones: the limit is not what this test is about.
    let options = Options {
        max_delete: MaxDelete::Rows(users as u64),
        ..Options::default()
    };
    let (report, ()) = tokio::join!(reconcile(&env, &api, options), changes);
    assert!(report.succeeded(), "{report:?}");

    eventually(WITHIN, "the worker handled every webhook", || async {
        webhooks_handled(&env).await == (2 * users) as u64
    })
    .await;
    worker.stop().await;
    for i in 0..users {
        let row = env.user(&user_id(i)).await;
        if i % 10 == 0 {
            assert!(row.is_none(), "user {i} deleted");
            assert!(env.tombstoned(&user_id(i)).await);
        } else {
            let row = row.unwrap_or_else(|| panic!("user {i} stored"));
            assert_eq!(row.updated_at.timestamp_millis(), CREATED + 3, "user {i}");
        }
    }
}

/// Webhook events recorded in `processed_events` (a reconcile's svix-ids start otherwise).
async fn webhooks_handled(env: &TestEnv) -> u64 {
    let row = env
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM processed_events WHERE svix_id LIKE 'msg\\_%'",
        ))
        .await
        .expect("count")
        .expect("a row");
    let n: i64 = row.try_get("", "n").expect("n");
    n as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_webhook_after_reconcile_deleted_a_user_does_not_revive_it() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    api.delete_user(&user_id(2));
    let report = run(&env, &api).await;
    assert_eq!(report.summary.users.deleted, 1, "{report:?}");
    let worker = env.start_worker(env.config()).await;

    let late = svix_id();
    env.publish_event(&late, "user.updated", user(2, CREATED + 999))
        .await;

    eventually(WITHIN, "the late webhook handled", || async {
        env.processed(&late).await.is_some()
    })
    .await;
    worker.stop().await;
    assert_eq!(
        env.processed(&late).await.expect("recorded").outcome,
        "stale"
    );
    assert!(env.user(&user_id(2)).await.is_none(), "not revived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_an_interval_reconciles_once_across_workers_and_counts_it() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..20).map(|i| user(i, CREATED + 5)));
    organizations_and_members(&api, CREATED + 5);
    let mut config = env.config();
    config.reconcile = Some(ScheduledReconcile {
        interval: Duration::from_secs(3600),
        clerk: quick(ClerkConfig::new(api.url(), KEY.to_owned().into())),
        connections: 4,
        pace: worker::apply::pace::Pace::FULL,
    });
    let first = env.start_worker(config.clone()).await;
    let second = env.start_worker(config).await;

    eventually(WITHIN, "a scheduled run finished", || async {
        recorded_runs(&env)
            .await
            .iter()
            .any(|(_, outcome, _)| outcome == "succeeded")
    })
    .await;
    eventually(WITHIN, "the run counted in a worker's metrics", || async {
        let text = first.metrics.render() + &second.metrics.render();
        text.contains("clerk_sync_worker_reconcile_runs_total{outcome=\"succeeded\"} 1")
    })
    .await;
    // Drift is counted by kind, organizations and memberships too.
    let text = first.metrics.render() + &second.metrics.render();
    for (kind, created) in [("users", 20), ("organizations", 2), ("memberships", 3)] {
        let series = format!(
            "clerk_sync_worker_reconcile_changes_total{{change=\"created\",kind=\"{kind}\"}} \
             {created}"
        );
        assert!(text.contains(&series), "{series} in {text}");
    }
    first.stop().await;
    second.stop().await;

    let runs = recorded_runs(&env).await;
    assert_eq!(runs.len(), 1, "one run across both workers: {runs:?}");
    assert_eq!(runs[0].0, "schedule");
    assert_eq!(stored_users(&env).await, 20);
    let served = api.served();
    let counts = served
        .iter()
        .filter(|s| s.path == "/v1/users/count")
        .count();
    assert_eq!(counts, 1, "{served:?}");
}

// Organizations and memberships.

fn organization_id(i: usize) -> String {
    format!("org_{i:04}")
}

/// Clerk's Organization JSON for organization `i`.
fn organization(i: usize, updated_at: i64) -> Value {
    clerk_organization(
        &organization_id(i),
        &format!("Org {i} {updated_at}"),
        updated_at,
    )
}

fn membership_id(organization: usize, user: usize) -> String {
    format!("orgmem_{organization:04}_{user:06}")
}

/// Clerk's OrganizationMembership JSON for user `user` in organization `organization`; its role
/// tells the version apart. Its organization snapshot is the first version of the
/// organization, older than any a test lists.
fn membership(organization_index: usize, user: usize, updated_at: i64) -> Value {
    clerk_membership(
        &membership_id(organization_index, user),
        &organization(organization_index, CREATED),
        &user_id(user),
        &format!("org:role_{updated_at}"),
        CREATED + user as i64,
        updated_at,
    )
}

/// Two organizations; users 0 and 1 in the first, user 2 in the second.
fn organizations_and_members(api: &ClerkApi, updated_at: i64) {
    api.put_organizations([organization(0, updated_at), organization(1, updated_at)]);
    api.put_memberships([
        membership(0, 0, updated_at),
        membership(0, 1, updated_at),
        membership(1, 2, updated_at),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_and_memberships_missing_from_the_database_are_created() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.organizations, counts(2, 2, 0, 0, 0, 0));
    assert_eq!(report.summary.memberships, counts(3, 3, 0, 0, 0, 0));
    let stored = env
        .organization(&organization_id(0))
        .await
        .expect("organization stored");
    assert_eq!(stored.name, format!("Org 0 {}", CREATED + 5));
    assert_eq!(stored.updated_at.timestamp_millis(), CREATED + 5);
    assert_eq!(stored.clerk_data, organization(0, CREATED + 5));
    let member = env
        .membership(&membership_id(1, 2))
        .await
        .expect("membership stored");
    assert_eq!(
        (member.organization_id.as_str(), member.user_id.as_str()),
        (organization_id(1).as_str(), user_id(2).as_str())
    );
    assert_eq!(member.role, format!("org:role_{}", CREATED + 5));
    // The snapshot is older than the listed organization: it did not win.
    let second = env.organization(&organization_id(1)).await.expect("stored");
    assert_eq!(second.updated_at.timestamp_millis(), CREATED + 5);
    // Organizations were walked before memberships, by offset and oldest first.
    let served = api.served();
    let walked: Vec<&str> = served
        .iter()
        .map(|s| s.path.as_str())
        .filter(|path| path.ends_with("organizations") || path.ends_with("memberships"))
        .collect();
    assert_eq!(
        walked,
        ["/v1/organizations", "/v1/organization_memberships"],
        "{served:?}"
    );
    assert!(
        served
            .iter()
            .filter(|s| s.path == "/v1/organization_memberships")
            .all(|s| s.query.contains("limit=500")
                && s.query.contains("offset=0")
                && s.query.contains("order_by=%2Bcreated_at")),
        "{served:?}"
    );
    let runs = recorded_runs(&env).await;
    assert_eq!(runs[0].2["organizations"]["created"], 2);
    assert_eq!(runs[0].2["memberships"]["created"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_stored_organization_and_membership_are_updated() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);
    assert!(run(&env, &api).await.succeeded());
    api.put_organization(organization(1, CREATED + 100));
    api.put_membership(membership(0, 1, CREATED + 100));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.organizations, counts(2, 0, 1, 1, 0, 0));
    assert_eq!(report.summary.memberships, counts(3, 0, 1, 2, 0, 0));
    let updated = env.organization(&organization_id(1)).await.expect("stored");
    assert_eq!(updated.name, format!("Org 1 {}", CREATED + 100));
    let member = env.membership(&membership_id(0, 1)).await.expect("stored");
    assert_eq!(member.role, format!("org:role_{}", CREATED + 100));
    assert_eq!(member.updated_at.timestamp_millis(), CREATED + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_deleted_in_clerk_is_deleted_with_its_memberships_and_tombstoned() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);
    assert!(run(&env, &api).await.succeeded());
    api.delete_organization(&organization_id(0));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.organizations, counts(1, 0, 0, 1, 0, 1));
    // Its memberships went with it, before the memberships pass looked for missing ones.
    assert_eq!(report.summary.memberships, counts(1, 0, 0, 1, 0, 0));
    assert!(env.organization(&organization_id(0)).await.is_none());
    assert!(
        env.has_tombstone("organization_tombstones", &organization_id(0))
            .await
    );
    for user in [0, 1] {
        assert!(env.membership(&membership_id(0, user)).await.is_none());
    }
    assert!(env.membership(&membership_id(1, 2)).await.is_some());
    let confirmed = api
        .served()
        .into_iter()
        .any(|s| s.path == format!("/v1/organizations/{}", organization_id(0)) && s.status == 404);
    assert!(
        confirmed,
        "the deletion was confirmed by the organization's own GET"
    );
}

/// A dry run counts what the real run then does: the memberships of an organization it would
/// delete go with it, and are not counted again by the memberships pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_an_organizations_deletion_as_the_real_run_does() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);
    assert!(run(&env, &api).await.succeeded());
    api.delete_organization(&organization_id(0));

    let options = Options {
        dry_run: true,
        ..Options::default()
    };
    let dry = reconcile(&env, &api, options).await;
    assert!(dry.succeeded(), "{dry:?}");
    assert!(env.organization(&organization_id(0)).await.is_some());
    assert!(env.membership(&membership_id(0, 1)).await.is_some());

    let real = run(&env, &api).await;
    assert!(real.succeeded(), "{real:?}");
    assert_eq!(dry.summary.organizations, counts(1, 0, 0, 1, 0, 1));
    assert_eq!(dry.summary.memberships, counts(1, 0, 0, 1, 0, 0));
    assert_eq!(dry.summary.organizations, real.summary.organizations);
    assert_eq!(dry.summary.memberships, real.summary.memberships);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_missing_from_a_complete_listing_is_deleted_unless_clerk_still_has_it() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);
    assert!(run(&env, &api).await.succeeded());
    api.delete_membership(&membership_id(0, 1));
    // Skipped by the offset walk, but still there.
    api.put_membership(membership(1, 2, CREATED + 50));
    api.hide_from_listing(&membership_id(1, 2));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.memberships, counts(1, 0, 1, 1, 0, 1));
    assert!(env.membership(&membership_id(0, 1)).await.is_none());
    assert!(
        env.has_tombstone("membership_tombstones", &membership_id(0, 1))
            .await
    );
    let kept = env.membership(&membership_id(1, 2)).await.expect("kept");
    assert_eq!(kept.updated_at.timestamp_millis(), CREATED + 50);
    assert!(
        !env.has_tombstone("membership_tombstones", &membership_id(1, 2))
            .await
    );
    // Each was looked for among its organization's memberships of its user.
    let served = api.served();
    let confirmation = format!("/v1/organizations/{}/memberships", organization_id(0));
    assert!(
        served
            .iter()
            .any(|s| s.path == confirmation && s.query.contains(&user_id(1))),
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memberships_listing_that_fails_part_way_deletes_no_membership() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_organization(organization(0, CREATED + 5));
    api.put_memberships((0..600).map(|user| membership(0, user, CREATED + 5)));
    let report = run(&env, &api).await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.memberships, counts(600, 600, 0, 0, 0, 0));
    let second_page = api
        .served()
        .iter()
        .any(|s| s.path == "/v1/organization_memberships" && s.query.contains("offset=500"));
    assert!(second_page, "two pages by offset");
    api.delete_membership(&membership_id(0, 3));
    api.fail_listing_from(500);

    let report = run(&env, &api).await;

    let failure = report.failure.clone().expect("the run failed");
    assert!(
        failure.contains("memberships listing did not complete"),
        "{failure}"
    );
    assert!(failure.contains("no memberships were deleted"), "{failure}");
    assert_eq!(report.summary.memberships.deleted, 0);
    assert!(env.membership(&membership_id(0, 3)).await.is_some());
    assert!(
        !env.has_tombstone("membership_tombstones", &membership_id(0, 3))
            .await
    );
    assert!(
        !api.served()
            .iter()
            .any(|s| s.path.ends_with("/memberships") && s.path.starts_with("/v1/organizations/")),
        "no membership was confirmed"
    );
    assert_eq!(recorded_runs(&env).await[1].1, "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deletion_limit_holds_for_organizations() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_organizations((0..15).map(|i| organization(i, CREATED + 5)));
    assert!(run(&env, &api).await.succeeded());
    for i in 0..11 {
        api.delete_organization(&organization_id(i));
    }
    let served_before = api.served().len();

    let report = run(&env, &api).await;

    let failure = report.failure.clone().expect("stopped");
    assert!(
        failure.contains("would remove more than 10 organizations"),
        "{failure}"
    );
    assert_eq!(report.summary.organizations.deleted, 0);
    for i in 0..15 {
        assert!(
            env.organization(&organization_id(i)).await.is_some(),
            "organization {i} kept"
        );
    }
    // The run stopped there: memberships were not walked.
    assert!(
        !api.served()[served_before..]
            .iter()
            .any(|s| s.path == "/v1/organization_memberships")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_version_from_a_webhook_is_not_overwritten_nor_a_deleted_membership_revived() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);
    assert!(run(&env, &api).await.succeeded());
    // Webhooks brought what the listing does not show yet.
    let newer_organization =
        OrganizationRecord::from_data(organization(0, CREATED + 50)).expect("organization");
    let newer_membership =
        MembershipRecord::from_data(membership(0, 0, CREATED + 50)).expect("membership");
    let deleted = MembershipDeletion::from_data(&membership(0, 1, CREATED + 5)).expect("deletion");
    apply_changes(
        env.db(),
        &[
            Change::UpsertOrganization(Box::new(newer_organization)),
            Change::UpsertMembership(Box::new(newer_membership)),
            Change::DeleteMembership(Box::new(deleted)),
        ],
    )
    .await
    .expect("webhook changes");
    // The listing is behind the webhooks: its versions moved on in Postgres, not in the API.
    api.put_organization(organization(0, CREATED + 20));
    api.put_membership(membership(0, 0, CREATED + 20));

    let report = run(&env, &api).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.organizations, counts(2, 0, 0, 1, 1, 0));
    assert_eq!(report.summary.memberships, counts(3, 0, 0, 1, 2, 0));
    let kept = env.organization(&organization_id(0)).await.expect("stored");
    assert_eq!(kept.updated_at.timestamp_millis(), CREATED + 50);
    let member = env.membership(&membership_id(0, 0)).await.expect("stored");
    assert_eq!(member.updated_at.timestamp_millis(), CREATED + 50);
    assert!(
        env.membership(&membership_id(0, 1)).await.is_none(),
        "not revived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_writes_no_organization_nor_membership() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    organizations_and_members(&api, CREATED + 5);
    assert!(run(&env, &api).await.succeeded());
    let processed = env.processed_count().await;
    api.put_organizations([organization(0, CREATED + 9), organization(2, CREATED + 9)]);
    api.put_membership(membership(2, 0, CREATED + 9));
    api.delete_membership(&membership_id(0, 1));

    let options = Options {
        dry_run: true,
        ..Options::default()
    };
    let report = reconcile(&env, &api, options).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.organizations, counts(3, 1, 1, 1, 0, 0));
    assert_eq!(report.summary.memberships, counts(3, 1, 0, 2, 0, 1));
    assert!(env.organization(&organization_id(2)).await.is_none());
    assert!(env.membership(&membership_id(2, 0)).await.is_none());
    assert!(env.membership(&membership_id(0, 1)).await.is_some());
    assert!(
        !env.has_tombstone("membership_tombstones", &membership_id(0, 1))
            .await
    );
    let first = env.organization(&organization_id(0)).await.expect("stored");
    assert_eq!(first.updated_at.timestamp_millis(), CREATED + 5);
    assert_eq!(env.processed_count().await, processed, "nothing recorded");
    assert_eq!(
        recorded_runs(&env).await.len(),
        1,
        "a dry run records no run"
    );
}
