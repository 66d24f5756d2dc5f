//! One Clerk instance per database, on the reconcile side: the first reconcile pins the key's
//! instance (`GET /v1/instance`), and a reconcile with the key of another instance stops before
//! its first listing with exit code 3 and a message naming both instances and their environment
//! types, having written, deleted and tombstoned nothing. The stand-in for the Backend API and
//! a fresh Postgres database each.

use std::process::Output;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::Value;
use test_support::TestEnv;
use test_support::clerk_api::ClerkApi;
use test_support::events::clerk_user;
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::instance::pinned_instance;
use worker::reconcile::{Options, Report};

const PRODUCTION_KEY: &str = "sk_live_standin_production";
const DEVELOPMENT_KEY: &str = "sk_test_standin_development";
const PRODUCTION: &str = "ins_prod_5n2w";
const DEVELOPMENT: &str = "ins_dev_8c1r";

fn user(i: usize, updated_at: i64) -> Value {
    clerk_user(
        &format!("user_{i:04}"),
        Some(&format!("person{i}@example.org")),
        None,
        updated_at,
    )
}

async fn stand_in(key: &str, instance: &str, environment: &str) -> ClerkApi {
    let api = ClerkApi::start(key).await;
    api.set_instance(instance, environment);
    api
}

fn client(api: &ClerkApi) -> ClerkClient {
    let config = ClerkConfig {
        retries: 1,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(20),
        ..ClerkConfig::new(api.url(), api.secret_key().to_owned().into())
    };
    ClerkClient::new(config).expect("client")
}

async fn reconcile(env: &TestEnv, api: &ClerkApi, options: Options) -> Report {
    worker::reconcile::reconcile(env.db(), &client(api), &options).await
}

fn command(env: &TestEnv, api: &ClerkApi, args: &[&str]) -> Output {
    env.command(env!("CARGO_BIN_EXE_worker"))
        .arg("reconcile")
        .args(args)
        .env("CLERK_API_URL", api.url())
        .env("CLERK_SECRET_KEY", api.secret_key())
        .output()
        .expect("run the worker binary")
}

/// Every row of the synced tables, the tombstones and the history, as one JSON text each, in
/// order: what "nothing written" compares.
async fn everything(env: &TestEnv) -> Vec<String> {
    let mut all = Vec::new();
    for table in [
        "users",
        "user_tombstones",
        "organizations",
        "organization_tombstones",
        "organization_memberships",
        "membership_tombstones",
        "processed_events",
    ] {
        let rows = env
            .db()
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT to_jsonb(t)::text AS row FROM {table} t ORDER BY 1"),
            ))
            .await
            .expect("read");
        for row in rows {
            let row: String = row.try_get("", "row").expect("row");
            all.push(format!("{table}: {row}"));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_reconcile_pins_the_keys_instance_and_a_dry_run_pins_nothing() {
    let env = TestEnv::new().await;
    let api = stand_in(PRODUCTION_KEY, PRODUCTION, "production").await;
    api.put_users((0..3).map(|i| user(i, 100)));

    let dry = reconcile(
        &env,
        &api,
        Options {
            dry_run: true,
            ..Options::default()
        },
    )
    .await;
    assert!(dry.succeeded(), "{dry:?}");
    assert_eq!(pinned_instance(env.db()).await.expect("read"), None);

    let report = reconcile(&env, &api, Options::default()).await;
    assert!(report.succeeded(), "{report:?}");
    let pin = pinned_instance(env.db())
        .await
        .expect("read")
        .expect("pinned");
    assert_eq!(pin.id, PRODUCTION);
    assert_eq!(pin.environment_type.as_deref(), Some("production"));
    assert_eq!(pin.pinned_by, "reconcile");
    // The instance was asked for before anything was listed.
    let served = api.served();
    assert_eq!(served[0].path, "/v1/instance", "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_of_a_second_instance_stops_before_listing_with_exit_code_3() {
    let env = TestEnv::new().await;
    let production = stand_in(PRODUCTION_KEY, PRODUCTION, "production").await;
    production.put_users((0..3).map(|i| user(i, 100)));
    let first = command(&env, &production, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let before = everything(&env).await;
    assert_eq!(
        before
            .iter()
            .filter(|row| row.starts_with("users:"))
            .count(),
        3
    );
    // The development instance lists other users and has none of ours.
    let development = stand_in(DEVELOPMENT_KEY, DEVELOPMENT, "development").await;
    development.put_users((100..105).map(|i| user(i, 100)));

    let output = command(&env, &development, &["--max-delete", "100%"]);

    assert_eq!(
        output.status.code(),
        Some(worker::exit::WRONG_INSTANCE as i32),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let message = String::from_utf8_lossy(&output.stderr);
    for named in [
        format!("{DEVELOPMENT} (development)"),
        format!("{PRODUCTION} (production, pinned"),
    ] {
        assert!(message.contains(&named), "{named} in {message}");
    }
    assert!(message.contains("worker instance move"), "{message}");
    assert!(!message.contains(DEVELOPMENT_KEY), "the key never shows");
    // Nothing written, deleted or tombstoned; nothing listed.
    assert_eq!(everything(&env).await, before);
    let asked: Vec<String> = development.served().into_iter().map(|s| s.path).collect();
    assert_eq!(asked, ["/v1/instance"]);
    // The run is recorded as failed, with the reason.
    let runs = env
        .db()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT outcome, error FROM reconcile_runs ORDER BY started_at",
        ))
        .await
        .expect("runs");
    assert_eq!(runs.len(), 2);
    let outcome: String = runs[1].try_get("", "outcome").expect("outcome");
    let error: String = runs[1].try_get("", "error").expect("error");
    assert_eq!(outcome, "failed");
    assert!(error.contains(DEVELOPMENT), "{error}");

    // The --json summary goes to stdout all the same, and a dry run is refused too.
    let dry = command(&env, &development, &["--dry-run", "--json"]);
    assert_eq!(dry.status.code(), Some(3));
    let summary: Value = serde_json::from_slice(&dry.stdout).expect("JSON summary");
    assert_eq!(summary["users"]["listed"], 0);
}

/// Pinned by an event, which does not say its environment type: the first reconcile of the
/// same instance records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_of_the_event_pinned_instance_records_its_environment_type() {
    let env = TestEnv::new().await;
    env.db()
        .execute_unprepared(&format!(
            "INSERT INTO clerk_instance (id, pinned_at, pinned_by) VALUES ('{DEVELOPMENT}', \
             now(), 'webhook')"
        ))
        .await
        .expect("pin as an event would");
    let api = stand_in(DEVELOPMENT_KEY, DEVELOPMENT, "development").await;
    api.put_users((0..2).map(|i| user(i, 100)));

    let report = reconcile(&env, &api, Options::default()).await;

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.created, 2);
    let pin = pinned_instance(env.db())
        .await
        .expect("read")
        .expect("pinned");
    assert_eq!(pin.environment_type.as_deref(), Some("development"));
    assert_eq!(pin.pinned_by, "webhook");
}

/// A key whose instance cannot be read (here a wrong key: 401) stops the run before any
/// listing, as a wrong instance does, but with the ordinary failure code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_instance_cannot_be_read_lists_nothing() {
    let env = TestEnv::new().await;
    let api = stand_in(PRODUCTION_KEY, PRODUCTION, "production").await;
    api.put_users((0..2).map(|i| user(i, 100)));
    let output = env
        .command(env!("CARGO_BIN_EXE_worker"))
        .arg("reconcile")
        .env("CLERK_API_URL", api.url())
        .env("CLERK_SECRET_KEY", "sk_live_not_this_one")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("GET /v1/instance: 401"), "{message}");
    assert_eq!(api.served().len(), 1);
    assert_eq!(pinned_instance(env.db()).await.expect("read"), None);
}
