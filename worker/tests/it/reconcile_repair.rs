//! Reconcile repairs content: a listed object is `unchanged` only when its stored row is, column
//! for column, what the door would write for it under the current settings. A row of the same
//! `updated_at` that differs (a column added after it was written, another `WORKER_ROLES`, an
//! email the email rule cleared) is rewritten and counted as updated; a webhook of the same
//! version still writes nothing. Real Postgres and the Backend API stand-in.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use shared::Roles;
use test_support::TestEnv;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization};
use test_support::signing::svix_id;
use test_support::worker::apply_changes;
use worker::apply::organizations::Change;
use worker::apply::{Message, Outcome, Reading, Source};
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::reconcile::{Counts, Options, Report};

const KEY: &str = "sk_test_standin_key";
const CREATED: i64 = 1_700_000_000_000;
const UPDATED: i64 = CREATED + 5;

fn user_id(i: usize) -> String {
    format!("user_{i:06}")
}

/// A Clerk user with a username and profile columns, its email `user{i}@example.org`.
fn user(i: usize, updated_at: i64) -> Value {
    json!({
        "id": user_id(i), "object": "user",
        "email_addresses": [{"id": format!("idn_{i}"), "object": "email_address",
                             "email_address": format!("user{i}@example.org")}],
        "primary_email_address_id": format!("idn_{i}"),
        "phone_numbers": [], "primary_phone_number_id": null,
        "username": format!("name{i}"), "first_name": "First", "last_name": "Last",
        "public_metadata": {"role": "trainer"}, "private_metadata": {}, "unsafe_metadata": {},
        "created_at": CREATED + i as i64, "updated_at": updated_at,
    })
}

fn with_email(mut user: Value, email: &str) -> Value {
    user["email_addresses"][0]["email_address"] = json!(email);
    user
}

fn client(api: &ClerkApi) -> ClerkClient {
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

async fn reconcile(env: &TestEnv, api: &ClerkApi, options: &Options) -> Report {
    let report = worker::reconcile::reconcile(env.db(), &client(api), options).await;
    assert!(report.succeeded(), "{report:?}");
    report
}

async fn run(env: &TestEnv, api: &ClerkApi) -> Report {
    reconcile(env, api, &Options::default()).await
}

fn counts(listed: u64, created: u64, updated: u64, unchanged: u64, stale: u64) -> Counts {
    Counts {
        listed,
        created,
        updated,
        unchanged,
        stale,
        deleted: 0,
    }
}

async fn execute(env: &TestEnv, sql: &str) {
    env.db()
        .execute_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The stored row of `table` without `synced_at`, as JSON.
async fn row(env: &TestEnv, table: &str, id: &str) -> Value {
    env.db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("SELECT to_jsonb(t) - 'synced_at' AS row FROM {table} t WHERE id = $1"),
            [id.into()],
        ))
        .await
        .expect("row")
        .and_then(|row| row.try_get::<Value>("", "row").ok())
        .unwrap_or(Value::Null)
}

/// The outcome and reason of the history rows of `subject` written by reconcile.
async fn reconcile_history(env: &TestEnv, subject: &str) -> Vec<(String, Option<String>)> {
    env.db()
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT outcome, reason FROM processed_events \
             WHERE subject_id = $1 AND source = 'reconcile' ORDER BY processed_at, svix_id",
            [subject.into()],
        ))
        .await
        .expect("history")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "outcome").expect("outcome"),
                row.try_get("", "reason").expect("reason"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_the_same_updated_at_that_differ_are_rewritten_and_counted_as_updated() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..5).map(|i| user(i, UPDATED)));
    assert_eq!(run(&env, &api).await.summary.users, counts(5, 5, 0, 0, 0));
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(row(&env, "users", &user_id(i)).await);
    }
    // Rows as an older release left them, or as someone edited them, all at Clerk's
    // `updated_at`: written before `username` and `clerk_data` existed, a role of other
    // settings, a name edited by hand. User 4 is left alone.
    execute(
        &env,
        "UPDATE users SET username = NULL, clerk_data = NULL WHERE id = 'user_000000'",
    )
    .await;
    execute(
        &env,
        "UPDATE users SET role = 'admin' WHERE id = 'user_000001'",
    )
    .await;
    execute(
        &env,
        "UPDATE users SET first_name = 'Edited' WHERE id = 'user_000002'",
    )
    .await;
    execute(
        &env,
        "UPDATE users SET public_metadata = '{\"role\": \"trainer\", \"x\": 1}' \
         WHERE id = 'user_000003'",
    )
    .await;
    let processed = env.processed_count().await;

    let report = run(&env, &api).await;

    assert_eq!(report.summary.users, counts(5, 0, 4, 1, 0));
    for (i, before) in written.iter().enumerate() {
        assert_eq!(&row(&env, "users", &user_id(i)).await, before, "user {i}");
    }
    assert_eq!(
        env.processed_count().await,
        processed + 4,
        "one event per repair"
    );
    assert_eq!(
        reconcile_history(&env, &user_id(0)).await,
        [
            ("applied".to_owned(), None),
            (
                "applied".to_owned(),
                Some(worker::apply::compare::REPAIRED.to_owned())
            )
        ]
    );
    assert_eq!(
        reconcile_history(&env, &user_id(4)).await.len(),
        1,
        "not written again"
    );

    // Repaired, everything is unchanged and nothing is written.
    let processed = env.processed_count().await;
    assert_eq!(run(&env, &api).await.summary.users, counts(5, 0, 0, 5, 0));
    assert_eq!(env.processed_count().await, processed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_compared_under_the_current_settings() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..3).map(|i| user(i, UPDATED)));
    run(&env, &api).await;
    assert_eq!(env.user(&user_id(0)).await.expect("stored").role, "trainer");

    // `WORKER_ROLES` without `trainer` now: every row is rewritten with the default role once.
    let mut options = Options::default();
    options.reading.roles = Roles::new(["admin", "member"], "member").expect("roles");
    let report = reconcile(&env, &api, &options).await;
    assert_eq!(report.summary.users, counts(3, 0, 3, 0, 0));
    assert_eq!(env.user(&user_id(0)).await.expect("stored").role, "member");
    let report = reconcile(&env, &api, &options).await;
    assert_eq!(report.summary.users, counts(3, 0, 0, 3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_comparison_expects_the_email_the_email_rule_stores() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    // Two users listed with one address: the newer holds it, the older is stored without.
    api.put_users([
        with_email(user(1, UPDATED), "shared@example.org"),
        with_email(user(2, UPDATED + 1), "shared@example.org"),
    ]);
    assert_eq!(run(&env, &api).await.summary.users, counts(2, 2, 0, 0, 0));
    assert_eq!(env.user(&user_id(1)).await.expect("stored").email, None);

    // What the rule would store again: unchanged.
    let report = run(&env, &api).await;
    assert_eq!(report.summary.users, counts(2, 0, 0, 2, 0));

    // The newer user moves to another address (its webhook applied); the older one, still at
    // the same version in Clerk, gets its address back although its `updated_at` did not move.
    let moved = with_email(user(2, UPDATED + 10), "moved@example.org");
    let event = webhook("user.updated", &moved);
    worker::apply::apply(env.db(), &event)
        .await
        .expect("applied");
    api.put_user(moved);
    let report = run(&env, &api).await;
    assert_eq!(report.summary.users, counts(2, 0, 1, 1, 0));
    let older = env.user(&user_id(1)).await.expect("stored");
    assert_eq!(older.email.as_deref(), Some("shared@example.org"));
    assert_eq!(
        env.user(&user_id(2))
            .await
            .expect("stored")
            .email
            .as_deref(),
        Some("moved@example.org")
    );
    let report = run(&env, &api).await;
    assert_eq!(report.summary.users, counts(2, 0, 0, 2, 0));
}

fn organization(updated_at: i64) -> Value {
    clerk_organization("org_0001", "Org One", updated_at)
}

fn membership(user: usize, updated_at: i64) -> Value {
    clerk_membership(
        &format!("orgmem_0001_{user:06}"),
        &organization(CREATED),
        &user_id(user),
        "org:member",
        CREATED + user as i64,
        updated_at,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_and_memberships_of_the_same_updated_at_that_differ_are_rewritten() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_organization(organization(UPDATED));
    api.put_memberships([membership(1, UPDATED), membership(2, UPDATED)]);
    let report = run(&env, &api).await;
    assert_eq!(report.summary.organizations, counts(1, 1, 0, 0, 0));
    assert_eq!(report.summary.memberships, counts(2, 2, 0, 0, 0));
    let organization_row = row(&env, "organizations", "org_0001").await;
    let membership_row = row(&env, "organization_memberships", "orgmem_0001_000001").await;
    execute(
        &env,
        "UPDATE organizations SET clerk_data = '{}', slug = NULL",
    )
    .await;
    execute(
        &env,
        "UPDATE organization_memberships SET role = 'org:admin', permissions = '[]' \
         WHERE id = 'orgmem_0001_000001'",
    )
    .await;

    let report = run(&env, &api).await;

    assert_eq!(report.summary.organizations, counts(1, 0, 1, 0, 0));
    assert_eq!(report.summary.memberships, counts(2, 0, 1, 1, 0));
    assert_eq!(
        row(&env, "organizations", "org_0001").await,
        organization_row
    );
    assert_eq!(
        row(&env, "organization_memberships", "orgmem_0001_000001").await,
        membership_row
    );
    assert_eq!(
        reconcile_history(&env, "org_0001").await.last(),
        Some(&(
            "applied".to_owned(),
            Some(worker::apply::compare::REPAIRED.to_owned())
        ))
    );
    let report = run(&env, &api).await;
    assert_eq!(report.summary.organizations, counts(1, 0, 0, 1, 0));
    assert_eq!(report.summary.memberships, counts(2, 0, 0, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_whose_organization_is_missing_is_not_unchanged() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_membership(membership(1, UPDATED));
    run(&env, &api).await;
    // The organization row went (an operator's cleanup); its snapshot would write it again.
    execute(&env, "DELETE FROM organizations").await;

    let report = reconcile(
        &env,
        &api,
        &Options {
            delete: false,
            ..Options::default()
        },
    )
    .await;

    assert_eq!(report.summary.memberships, counts(1, 0, 1, 0, 0));
    assert!(env.organization("org_0001").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_repairs_and_writes_nothing() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..2).map(|i| user(i, UPDATED)));
    run(&env, &api).await;
    execute(
        &env,
        "UPDATE users SET clerk_data = NULL WHERE id = 'user_000000'",
    )
    .await;
    let processed = env.processed_count().await;

    let report = reconcile(
        &env,
        &api,
        &Options {
            dry_run: true,
            ..Options::default()
        },
    )
    .await;

    assert_eq!(report.summary.users, counts(2, 0, 1, 1, 0));
    assert_eq!(env.processed_count().await, processed);
    assert_eq!(
        env.user(&user_id(0)).await.expect("stored").clerk_data,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstoned_object_stays_stale() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users([user(0, UPDATED)]);
    run(&env, &api).await;
    // A wrong `user.deleted` under `soft`: the row is kept, marked and tombstoned; Clerk still
    // lists the user. Its content differs from the listing (no `deleted_at` there), yet it is
    // never written again.
    execute(
        &env,
        "UPDATE users SET deleted_at = now(), username = NULL WHERE id = 'user_000000'",
    )
    .await;
    execute(
        &env,
        "INSERT INTO user_tombstones (id, deleted_at) VALUES ('user_000000', now())",
    )
    .await;

    let report = reconcile(
        &env,
        &api,
        &Options {
            delete: false,
            ..Options::default()
        },
    )
    .await;

    assert_eq!(report.summary.users, counts(1, 0, 0, 0, 1));
    assert_eq!(env.user(&user_id(0)).await.expect("kept").username, None);
}

/// The event a webhook delivers for `data`, read by the door as a delivery is.
fn webhook(event_type: &str, data: &Value) -> worker::apply::Event {
    let body = json!({"type": event_type, "object": "event", "data": data}).to_string();
    Reading::default()
        .read(&Message::new(body.as_bytes(), svix_id(), Source::Webhook))
        .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_of_the_same_updated_at_still_writes_nothing() {
    let env = TestEnv::new().await;
    let listed = user(0, UPDATED);
    let first = webhook("user.updated", &listed);
    assert_eq!(
        worker::apply::apply(env.db(), &first)
            .await
            .expect("applied"),
        Outcome::Applied
    );
    execute(&env, "UPDATE users SET username = NULL").await;

    // A second delivery of the same version (another svix-id): stale, the row as it is.
    let again = webhook("user.updated", &listed);
    assert_eq!(
        worker::apply::apply(env.db(), &again).await.expect("stale"),
        Outcome::Stale
    );
    assert_eq!(env.user(&user_id(0)).await.expect("stored").username, None);
    // The same for an organization and a membership.
    let changes = [
        Change::read(
            shared::organizations::OrganizationEventKind::OrganizationUpdated,
            organization(UPDATED),
        )
        .expect("change"),
        Change::read(
            shared::organizations::OrganizationEventKind::MembershipUpdated,
            membership(0, UPDATED),
        )
        .expect("change"),
    ];
    assert_eq!(
        apply_changes(env.db(), &changes).await.expect("applied"),
        [true, true]
    );
    execute(&env, "UPDATE organizations SET slug = NULL").await;
    execute(&env, "UPDATE organization_memberships SET role = 'edited'").await;
    assert_eq!(
        apply_changes(env.db(), &changes).await.expect("stale"),
        [false, false]
    );
    assert_eq!(
        env.organization("org_0001").await.expect("stored").slug,
        None
    );
    assert_eq!(
        env.membership("orgmem_0001_000000")
            .await
            .expect("stored")
            .role,
        "edited"
    );
}
