//! Deletion limits that mean what they say, and one reconcile at a time: `--max-delete 0`
//! deletes nothing; a user's or an organization's memberships count against the memberships
//! limit when they go with it; a refused kind deletes nothing of that kind and the summary says
//! so; a second `worker reconcile` started while one runs does nothing and exits 4. The
//! stand-in for the Backend API and a fresh Postgres database each.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization, clerk_user};
use test_support::{TestEnv, eventually};
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::reconcile::{MaxDelete, Options, Report};

const KEY: &str = "sk_test_standin_limits";

fn user_id(i: usize) -> String {
    format!("user_{i:04}")
}

fn user(i: usize) -> Value {
    clerk_user(
        &user_id(i),
        Some(&format!("person{i}@example.org")),
        None,
        100,
    )
}

fn organization_id(i: usize) -> String {
    format!("org_{i:04}")
}

fn organization(i: usize) -> Value {
    clerk_organization(&organization_id(i), &format!("Org {i}"), 100)
}

fn membership_id(organization: usize, user: usize) -> String {
    format!("orgmem_{organization:04}_{user:04}")
}

fn membership(organization_index: usize, user: usize) -> Value {
    clerk_membership(
        &membership_id(organization_index, user),
        &organization(organization_index),
        &user_id(user),
        "org:member",
        1000 + user as i64,
        100,
    )
}

fn client(api: &ClerkApi) -> ClerkClient {
    let config = ClerkConfig {
        retries: 1,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(20),
        rate_limit: 10_000,
        ..ClerkConfig::new(api.url(), KEY.to_owned().into())
    };
    ClerkClient::new(config).expect("client")
}

async fn reconcile(env: &TestEnv, api: &ClerkApi, max_delete: MaxDelete) -> Report {
    let options = Options {
        max_delete,
        ..Options::default()
    };
    worker::reconcile::reconcile(env.db(), &client(api), &options).await
}

fn command(env: &TestEnv, api: &ClerkApi, args: &[&str]) -> Command {
    let mut command = env.command(env!("CARGO_BIN_EXE_worker"));
    command
        .arg("reconcile")
        .args(args)
        .env("CLERK_API_URL", api.url())
        .env("CLERK_SECRET_KEY", KEY);
    command
}

fn output(mut command: Command) -> Output {
    command.output().expect("run the worker binary")
}

async fn users_stored(env: &TestEnv, ids: impl IntoIterator<Item = usize>) -> usize {
    let mut stored = 0;
    for i in ids {
        if env.user(&user_id(i)).await.is_some() {
            stored += 1;
        }
    }
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_delete_zero_deletes_nothing_as_rows_or_as_a_share() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(user));
    assert!(
        reconcile(&env, &api, MaxDelete::default())
            .await
            .succeeded()
    );
    api.delete_user(&user_id(0));

    for limit in ["0", "0%"] {
        let run = output(command(&env, &api, &["--max-delete", limit, "--json"]));

        assert_eq!(run.status.code(), Some(1), "--max-delete {limit}");
        let summary: Value = serde_json::from_slice(&run.stdout).expect("JSON summary");
        assert_eq!(summary["users"]["deleted"], 0, "{summary}");
        assert_eq!(summary["refused"]["users"]["limit"], 0, "{summary}");
        assert_eq!(summary["refused"]["users"]["gone"], 1, "{summary}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains("more than 0 users (--max-delete 0"),
            "{stderr}"
        );
        assert_eq!(users_stored(&env, 0..3).await, 3);
        assert!(!env.tombstoned(&user_id(0)).await);
    }
    // The same deletion within a limit goes through.
    let report = reconcile(&env, &api, MaxDelete::Rows(1)).await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.deleted, 1);
    assert!(report.summary.refused.is_empty());
    assert!(env.tombstoned(&user_id(0)).await);
}

/// Users 0..3 are members of three organizations each: deleting them takes 9 memberships with
/// them, which a limit of 5 does not allow, although it allows the 3 users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_that_go_with_their_users_count_against_the_memberships_limit() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..12).map(user));
    api.put_organizations((0..3).map(organization));
    api.put_memberships((0..3).flat_map(|o| (0..6).map(move |u| membership(o, u))));
    assert!(
        reconcile(&env, &api, MaxDelete::default())
            .await
            .succeeded()
    );
    for i in 0..3 {
        api.delete_user(&user_id(i));
        for o in 0..3 {
            api.delete_membership(&membership_id(o, i));
        }
    }

    let report = reconcile(&env, &api, MaxDelete::Rows(5)).await;

    let failure = report.failure.clone().expect("refused");
    assert!(
        failure.contains("would remove their 9 memberships with them"),
        "{failure}"
    );
    let refused = &report.summary.refused["users"];
    assert_eq!(
        (refused.gone, refused.memberships_with_them),
        (3, 9),
        "{refused:?}"
    );
    assert_eq!(report.summary.users.deleted, 0);
    assert_eq!(users_stored(&env, 0..12).await, 12);
    for o in 0..3 {
        for u in 0..3 {
            assert!(env.membership(&membership_id(o, u)).await.is_some());
        }
    }
    assert!(
        report
            .paragraph()
            .contains("deletion refused by --max-delete")
    );

    // A limit that holds the 9 memberships lets the users go, with them.
    let report = reconcile(&env, &api, MaxDelete::Rows(9)).await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.summary.users.deleted, 3);
    assert_eq!(users_stored(&env, 0..12).await, 9);
    for o in 0..3 {
        for u in 0..3 {
            assert!(env.membership(&membership_id(o, u)).await.is_none());
        }
        assert!(env.membership(&membership_id(o, 3)).await.is_some());
    }
}

/// An organization gone from Clerk with 11 members: the default limit (10 % of 11
/// memberships, at least 10) refuses it, and neither it nor any of its memberships goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_kind_deletes_nothing_of_that_kind() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..11).map(user));
    api.put_organizations([organization(0)]);
    api.put_memberships((0..11).map(|u| membership(0, u)));
    assert!(
        reconcile(&env, &api, MaxDelete::default())
            .await
            .succeeded()
    );
    api.delete_organization(&organization_id(0));

    let report = reconcile(&env, &api, MaxDelete::default()).await;

    let refused = &report.summary.refused["organizations"];
    assert_eq!((refused.gone, refused.memberships_with_them), (1, 11));
    assert_eq!(report.summary.organizations.deleted, 0);
    assert!(env.organization(&organization_id(0)).await.is_some());
    assert!(
        !env.has_tombstone("organization_tombstones", &organization_id(0))
            .await
    );
    for u in 0..11 {
        assert!(env.membership(&membership_id(0, u)).await.is_some());
    }
    assert!(!report.summary.refused.contains_key("memberships"));
    assert_eq!(report.summary.memberships.deleted, 0);
}

/// The memberships limit is one for the run: what went with a user is taken from it, and the
/// memberships pass, finding more gone than is left, deletes none of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memberships_pass_gets_what_the_cascades_left_of_the_limit() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..6).map(user));
    api.put_organizations((0..3).map(organization));
    // User 0 in three organizations; users 1..4 in organization 0.
    api.put_memberships((0..3).map(|o| membership(o, 0)));
    api.put_memberships((1..4).map(|u| membership(0, u)));
    assert!(
        reconcile(&env, &api, MaxDelete::default())
            .await
            .succeeded()
    );
    api.delete_user(&user_id(0));
    for o in 0..3 {
        api.delete_membership(&membership_id(o, 0));
    }
    for u in 1..4 {
        api.delete_membership(&membership_id(0, u));
    }

    let report = reconcile(&env, &api, MaxDelete::Rows(5)).await;

    // User 0 went with its 3 memberships (5 allowed, 2 left); the 3 others are refused.
    assert_eq!(report.summary.users.deleted, 1);
    for o in 0..3 {
        assert!(env.membership(&membership_id(o, 0)).await.is_none());
    }
    let refused = &report.summary.refused["memberships"];
    assert_eq!(refused.limit, 2, "{refused:?}");
    assert_eq!(report.summary.memberships.deleted, 0);
    for u in 1..4 {
        assert!(env.membership(&membership_id(0, u)).await.is_some());
    }
    assert!(!report.succeeded());
}

/// Two `worker reconcile` started at once: the first holds the reconcile lock for its whole
/// run; the second does nothing (not even ask Clerk anything) and exits 4 naming the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reconcile_started_while_one_runs_does_nothing_and_exits_4() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(user));
    api.slow_listings(Duration::from_millis(700));

    let mut first = command(&env, &api, &[]);
    let first = first
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the first run");
    // It holds the lock before its first request.
    eventually(Duration::from_secs(30), "the first run started", || async {
        !api.served().is_empty()
    })
    .await;
    let started = Instant::now();
    let second = output(command(&env, &api, &[]));

    assert_eq!(
        second.status.code(),
        Some(worker::exit::RECONCILE_RUNNING as i32),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(
        message.contains("another reconcile is running"),
        "{message}"
    );
    assert!(message.contains("started by command"), "{message}");
    let first = first.wait_with_output().expect("the first run ends");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // The second asked Clerk nothing: one instance check, the first run's.
    let checks = api
        .served()
        .iter()
        .filter(|s| s.path == "/v1/instance")
        .count();
    assert_eq!(checks, 1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the second did not wait for the first"
    );
    // Once the first is done, a run goes through.
    api.slow_listings(Duration::ZERO);
    let third = output(command(&env, &api, &[]));
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
}

/// The lock is the one a worker's schedule takes: held elsewhere, the command does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_and_the_schedule_share_one_lock() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..2).map(user));
    let held = worker::reconcile::lock::RunLock::try_take(
        &env.db_url().to_owned().into(),
        Duration::from_secs(5),
    )
    .await
    .expect("database")
    .expect("free");
    assert!(
        worker::reconcile::lock::RunLock::try_take(
            &env.db_url().to_owned().into(),
            Duration::from_secs(5)
        )
        .await
        .expect("database")
        .is_none(),
        "one holder at a time"
    );

    let refused = output(command(&env, &api, &[]));
    assert_eq!(refused.status.code(), Some(4));
    assert!(api.served().is_empty());

    held.release().await.expect("release");
    let run = output(command(&env, &api, &[]));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(users_stored(&env, 0..2).await, 2);
}
