//! Reconcile runs that survive being stopped: `worker reconcile` as a process stopped by
//! SIGTERM (or killed) part-way through its listing is recorded `interrupted`, and the next run
//! resumes the listing where it stopped, keeping what was listed before, so the deletion phase
//! still follows one complete listing; the schedule is due one interval after the last run that
//! ran to its end. Against the stand-in for Clerk's Backend API, real Postgres and RabbitMQ.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization};
use test_support::{TestEnv, eventually};
use tokio::sync::watch;
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::config::ScheduledReconcile;
use worker::reconcile::lock::RunLock;
use worker::reconcile::{self, Interruption, Options, Resumed};

const KEY: &str = "sk_test_standin_key";
const WITHIN: Duration = Duration::from_secs(60);
const CREATED: i64 = 1_700_000_000_000;

fn user(i: usize) -> Value {
    json!({
        "id": user_id(i), "object": "user",
        "email_addresses": [{"id": format!("idn_{i}"), "object": "email_address",
                             "email_address": format!("user{i}@example.org")}],
        "primary_email_address_id": format!("idn_{i}"),
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "First", "last_name": "Last",
        "public_metadata": {}, "private_metadata": {}, "unsafe_metadata": {},
        "created_at": CREATED + i as i64, "updated_at": CREATED + 5,
    })
}

fn user_id(i: usize) -> String {
    format!("user_{i:06}")
}

/// `worker reconcile --json` of the real binary against this test's database and stand-in.
fn command(env: &TestEnv, api: &ClerkApi) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command
        .args(["reconcile", "--json"])
        .env("DATABASE_URL", env.db_url())
        .env("CLERK_API_URL", api.url())
        .env("CLERK_SECRET_KEY", KEY)
        .env("WORKER_RECONCILE_CONNECTIONS", "3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn finished(child: Child) -> (Output, Value) {
    let output = child.wait_with_output().expect("the run ends");
    let summary = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, summary)
}

/// One `reconcile_runs` row.
#[derive(Debug)]
struct Run {
    id: String,
    outcome: String,
    counts: Value,
    error: Option<String>,
    listing_kind: Option<String>,
    listing_cursor: Option<String>,
    resumed_from: Option<String>,
}

async fn runs(env: &TestEnv) -> Vec<Run> {
    env.db()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, outcome, counts, error, listing_kind, listing_cursor, resumed_from \
             FROM reconcile_runs ORDER BY started_at",
        ))
        .await
        .expect("runs")
        .into_iter()
        .map(|row| Run {
            id: row.try_get("", "id").expect("id"),
            outcome: row.try_get("", "outcome").expect("outcome"),
            counts: row.try_get("", "counts").expect("counts"),
            error: row.try_get("", "error").expect("error"),
            listing_kind: row.try_get("", "listing_kind").expect("kind"),
            listing_cursor: row.try_get("", "listing_cursor").expect("cursor"),
            resumed_from: row.try_get("", "resumed_from").expect("resumed_from"),
        })
        .collect()
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    env.db()
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect("count")
        .expect("a row")
        .try_get("", "n")
        .expect("n")
}

/// Starts `worker reconcile` over slow listing pages and waits until its first page is written
/// (its resume point recorded): the stop then lands in the listing.
async fn started_run(env: &TestEnv, api: &ClerkApi) -> Child {
    api.slow_listings(Duration::from_millis(700));
    let child = command(env, api).spawn().expect("start worker reconcile");
    eventually(WITHIN, "the first page written", || async {
        runs(env)
            .await
            .iter()
            .any(|run| run.outcome == "running" && run.listing_cursor.is_some())
    })
    .await;
    child
}

/// The `GET /v1/users` listing requests served from `from` on, by query.
fn user_listings(api: &ClerkApi, from: usize) -> Vec<String> {
    api.served()[from..]
        .iter()
        .filter(|served| served.path == "/v1/users")
        .map(|served| served.query.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_by_sigterm_is_interrupted_and_the_next_one_resumes_its_listing() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    // A user stored by an earlier run and deleted in Clerk since: only a complete listing may
    // delete it.
    api.put_user(user(9_999));
    let first = command(&env, &api).output().expect("first run");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    api.delete_user(&user_id(9_999));
    api.put_users((0..2_000).map(user));

    let child = started_run(&env, &api).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let (output, summary) = finished(child);

    assert!(
        !output.status.success(),
        "an interrupted run exits non-zero"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reconcile interrupted"), "{stderr}");
    let recorded = runs(&env).await;
    let stopped = &recorded[1];
    assert_eq!(stopped.outcome, "interrupted", "{stopped:?}");
    assert_eq!(stopped.listing_kind.as_deref(), Some("users"));
    let cursor = stopped.listing_cursor.clone().expect("a resume point");
    let listed = stopped.counts["users"]["listed"]
        .as_u64()
        .expect("counts so far");
    let created = stopped.counts["users"]["created"]
        .as_u64()
        .expect("counts so far");
    assert!((500..2_000).contains(&listed), "{stopped:?}");
    assert_eq!(
        summary["users"]["listed"].as_u64(),
        Some(listed),
        "{summary}"
    );
    assert!(
        env.user(&user_id(9_999)).await.is_some(),
        "an incomplete listing deletes nothing"
    );
    assert!(count(&env, "SELECT count(*) AS n FROM reconcile_listed").await >= 500);
    let served_before = api.served().len();

    api.slow_listings(Duration::ZERO);
    let (output, summary) = finished(command(&env, &api).spawn().expect("second run"));

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        summary["resumed"],
        json!({"run_id": stopped.id, "kind": "users", "after": cursor}),
        "{summary}"
    );
    // It went on after the recorded point, never from the first page again.
    let listings = user_listings(&api, served_before);
    assert!(
        listings[0].contains(&format!("starting_after={cursor}")),
        "{listings:?}"
    );
    assert!(
        listings
            .iter()
            .all(|query| query.contains("starting_after=")),
        "{listings:?}"
    );
    // What the interrupted run listed was kept: no user of it was asked for on its own, and
    // only the one gone from Clerk was deleted.
    let asked: Vec<String> = api.served()[served_before..]
        .iter()
        .filter(|served| served.path.starts_with("/v1/users/user_"))
        .map(|served| served.path.clone())
        .collect();
    assert_eq!(asked, [format!("/v1/users/{}", user_id(9_999))]);
    assert_eq!(summary["users"]["deleted"], 1, "{summary}");
    assert_eq!(
        summary["users"]["created"].as_u64().expect("created") + created,
        2_000,
        "{summary}"
    );
    assert!(env.user(&user_id(9_999)).await.is_none());
    assert!(env.tombstoned(&user_id(9_999)).await);
    assert_eq!(count(&env, "SELECT count(*) AS n FROM users").await, 2_000);
    assert_eq!(
        count(&env, "SELECT count(*) AS n FROM user_tombstones").await,
        1
    );
    let recorded = runs(&env).await;
    assert_eq!(recorded[2].outcome, "succeeded");
    assert_eq!(
        recorded[2].resumed_from.as_deref(),
        Some(stopped.id.as_str())
    );
    assert_eq!(
        count(&env, "SELECT count(*) AS n FROM reconcile_listed").await,
        0,
        "a finished run removes its listed ids"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_running_by_a_killed_process_is_recorded_interrupted_and_resumed() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..1_500).map(user));

    let mut child = started_run(&env, &api).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("killed");
    let left = runs(&env).await;
    assert_eq!(left[0].outcome, "running", "nobody recorded its end");
    let cursor = left[0].listing_cursor.clone().expect("a resume point");

    api.slow_listings(Duration::ZERO);
    let (output, summary) = finished(command(&env, &api).spawn().expect("next run"));

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let recorded = runs(&env).await;
    assert_eq!(recorded[0].outcome, "interrupted", "{:?}", recorded[0]);
    assert!(
        recorded[0]
            .error
            .as_deref()
            .is_some_and(|error| error.contains("nobody holding the reconcile lock")),
        "{:?}",
        recorded[0]
    );
    assert_eq!(
        recorded[1].resumed_from.as_deref(),
        Some(left[0].id.as_str())
    );
    assert_eq!(summary["resumed"]["after"], json!(cursor), "{summary}");
    assert_eq!(count(&env, "SELECT count(*) AS n FROM users").await, 1_500);
    assert_eq!(summary["users"]["deleted"], 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_scheduled_run_is_due_one_interval_after_the_last_finished_run() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(user));
    // A run that finished ten minutes ago (it started three hours ago), and one left running
    // since by a process that ended: by the last start a run would be due, by the last end it
    // is not.
    env.db()
        .execute_unprepared(
            "INSERT INTO reconcile_runs (id, trigger, started_at, finished_at, outcome, counts) \
             VALUES ('long', 'command', now() - interval '3 hours', \
                     now() - interval '10 minutes', 'succeeded', '{}'), \
                    ('abandoned', 'schedule', now() - interval '3 hours', NULL, 'running', '{}')",
        )
        .await
        .expect("runs");
    let mut config = env.config();
    config.reconcile = Some(ScheduledReconcile {
        interval: Duration::from_secs(3600),
        clerk: ClerkConfig {
            rate_limit: 10_000,
            ..ClerkConfig::new(api.url(), KEY.to_owned().into())
        },
        connections: 3,
        pace: worker::apply::pace::Pace::FULL,
    });
    let worker = env.start_worker(config.clone()).await;

    eventually(WITHIN, "the abandoned run recorded interrupted", || async {
        runs(&env)
            .await
            .iter()
            .any(|run| run.id == "abandoned" && run.outcome == "interrupted")
    })
    .await;
    // Once the schedule let go of the lock, it had decided: no run was due.
    let url = env.db_url().to_owned().into();
    let deadline = std::time::Instant::now() + WITHIN;
    let lock = loop {
        if let Some(lock) = RunLock::try_take(&url, Duration::from_secs(5))
            .await
            .expect("database")
        {
            break lock;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the schedule kept the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock.release().await.expect("release");
    assert_eq!(runs(&env).await.len(), 2, "no run was due");
    assert!(api.served().is_empty());
    worker.stop().await;

    // The last run that ran to its end finished two hours ago; one interrupted since started
    // five minutes ago: due, by the last end (by the last start it would not be).
    env.db()
        .execute_unprepared(
            "UPDATE reconcile_runs SET finished_at = now() - interval '2 hours' WHERE id = 'long'; \
             UPDATE reconcile_runs SET started_at = now() - interval '5 minutes' \
             WHERE id = 'abandoned'",
        )
        .await
        .expect("runs");
    let worker = env.start_worker(config).await;
    eventually(WITHIN, "a scheduled run finished", || async {
        runs(&env)
            .await
            .iter()
            .any(|run| run.outcome == "succeeded" && run.id != "long")
    })
    .await;
    worker.stop().await;
    assert_eq!(count(&env, "SELECT count(*) AS n FROM users").await, 3);
}

fn membership(user: usize) -> Value {
    let organization = clerk_organization("org_0001", "Org", CREATED);
    clerk_membership(
        &format!("orgmem_{user:06}"),
        &organization,
        &user_id(user),
        "org:member",
        CREATED + user as i64,
        CREATED + 5,
    )
}

/// The library's run, stopped by its interruption while it lists memberships: the next run goes
/// on at the recorded offset, skipping the kinds that were done, and its deletion phase still
/// follows the whole listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_memberships_listing_resumes_at_its_offset() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let client = std::sync::Arc::new(
        ClerkClient::new(ClerkConfig {
            rate_limit: 10_000,
            ..ClerkConfig::new(api.url(), KEY.to_owned().into())
        })
        .expect("client"),
    );
    api.put_organization(clerk_organization("org_0001", "Org", CREATED + 5));
    api.put_membership(membership(9_999));
    let first = reconcile::reconcile(env.db(), &client, &Options::default()).await;
    assert!(first.succeeded(), "{first:?}");
    api.delete_membership("orgmem_009999");
    api.put_memberships((0..2_500).map(membership));

    api.slow_listings(Duration::from_millis(500));
    let (stop, stopped) = watch::channel(false);
    let options = Options {
        interruption: Interruption::new(stopped),
        ..Options::default()
    };
    let running = {
        let (db, client) = (env.db().clone(), client.clone());
        tokio::spawn(async move { reconcile::reconcile(&db, &client, &options).await })
    };
    eventually(WITHIN, "a page of memberships written", || async {
        runs(&env).await.iter().any(|run| {
            run.outcome == "running"
                && run.listing_kind.as_deref() == Some("memberships")
                && run.listing_cursor.is_some()
        })
    })
    .await;
    stop.send_replace(true);
    let stopped = running.await.expect("the run ends");

    assert!(stopped.interrupted, "{stopped:?}");
    assert!(
        stopped
            .failure
            .as_deref()
            .is_some_and(|why| why.contains("interrupted")),
        "{stopped:?}"
    );
    let recorded = runs(&env).await;
    assert_eq!(recorded[1].outcome, "interrupted");
    let offset = recorded[1].listing_cursor.clone().expect("an offset");
    let at: u64 = offset.parse().expect("an offset");
    assert!(
        at.is_multiple_of(500) && (500..2_500).contains(&at),
        "{offset}"
    );
    assert!(
        env.membership("orgmem_009999").await.is_some(),
        "nothing deleted"
    );
    // A dry run meanwhile neither resumes it nor takes its listed ids away.
    api.slow_listings(Duration::ZERO);
    let dry = Options {
        dry_run: true,
        ..Options::default()
    };
    let dry = reconcile::reconcile(env.db(), &client, &dry).await;
    assert!(dry.succeeded(), "{dry:?}");
    assert_eq!(dry.summary.resumed, None);
    assert_eq!(dry.summary.memberships.listed, 2_500);
    let served_before = api.served().len();

    let resumed = reconcile::reconcile(env.db(), &client, &Options::default()).await;

    assert!(resumed.succeeded(), "{resumed:?}");
    assert_eq!(
        resumed.summary.resumed,
        Some(Resumed {
            run_id: recorded[1].id.clone(),
            kind: "memberships",
            after: Some(offset.clone()),
        })
    );
    assert_eq!(resumed.summary.users.listed, 0, "done before the stop");
    assert_eq!(
        resumed.summary.organizations.listed, 0,
        "done before the stop"
    );
    let served = &api.served()[served_before..];
    let listings: Vec<&str> = served
        .iter()
        .filter(|s| s.path == "/v1/organization_memberships")
        .map(|s| s.query.as_str())
        .collect();
    assert!(
        listings[0].contains(&format!("offset={offset}")),
        "{listings:?}"
    );
    assert!(
        !served
            .iter()
            .any(|s| s.path == "/v1/users" || s.path == "/v1/organizations"),
        "{served:?}"
    );
    // Only the membership gone from Clerk was confirmed and deleted.
    let confirmed = served
        .iter()
        .filter(|s| s.path == "/v1/organizations/org_0001/memberships")
        .count();
    assert_eq!(confirmed, 1, "{served:?}");
    assert_eq!(resumed.summary.memberships.deleted, 1);
    assert!(env.membership("orgmem_009999").await.is_none());
    assert_eq!(
        count(&env, "SELECT count(*) AS n FROM organization_memberships").await,
        2_500
    );
}

/// A worker stopped (as SIGTERM stops it) while its schedule runs a reconcile records the run
/// `interrupted` with its counts so far, and the next worker's schedule resumes it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_stopped_with_its_worker_is_interrupted_and_taken_up_by_the_next() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..2_500).map(user));
    api.slow_listings(Duration::from_millis(500));
    let mut config = env.config();
    config.reconcile = Some(ScheduledReconcile {
        interval: Duration::from_secs(3600),
        clerk: ClerkConfig {
            rate_limit: 10_000,
            ..ClerkConfig::new(api.url(), KEY.to_owned().into())
        },
        connections: 2,
        pace: worker::apply::pace::Pace::FULL,
    });
    let worker = env.start_worker(config.clone()).await;
    eventually(WITHIN, "the first page written", || async {
        runs(&env)
            .await
            .iter()
            .any(|run| run.outcome == "running" && run.listing_cursor.is_some())
    })
    .await;

    worker.stop().await;

    let recorded = runs(&env).await;
    assert_eq!(recorded[0].outcome, "interrupted", "{:?}", recorded[0]);
    let listed = recorded[0].counts["users"]["listed"]
        .as_u64()
        .expect("counts so far");
    assert!((500..2_500).contains(&listed), "{:?}", recorded[0]);
    let cursor = recorded[0].listing_cursor.clone().expect("a resume point");

    api.slow_listings(Duration::ZERO);
    let worker = env.start_worker(config).await;
    eventually(WITHIN, "the next run finished", || async {
        runs(&env)
            .await
            .iter()
            .any(|run| run.outcome == "succeeded")
    })
    .await;
    worker.stop().await;
    let recorded = runs(&env).await;
    assert_eq!(
        recorded[1].resumed_from.as_deref(),
        Some(recorded[0].id.as_str())
    );
    assert!(
        api.served()
            .iter()
            .filter(|s| s.path == "/v1/users")
            .any(|s| s.query.contains(&format!("starting_after={cursor}"))),
        "resumed after {cursor}"
    );
    assert_eq!(count(&env, "SELECT count(*) AS n FROM users").await, 2_500);
}
