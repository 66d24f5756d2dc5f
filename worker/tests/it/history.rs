//! The event history in `processed_events`: one row per handled event with its subject, payload,
//! times, outcome, reason and source, written by a worker running in-process (and by reconcile),
//! read back from Postgres.

use std::time::Duration;

use serde_json::json;
use test_support::clerk_api::ClerkApi;
use test_support::events::{clerk_membership, clerk_organization, clerk_user, envelope};
use test_support::rows::processed_events;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::reconcile::Options;

const WITHIN: Duration = Duration::from_secs(20);

async fn row(env: &TestEnv, svix_id: &str) -> processed_events::Model {
    env.processed(svix_id).await.expect("history row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outcome_of_a_webhook_is_kept_with_its_subject_payload_times_and_reason() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let newer = clerk_user("user_h1", Some("h1@example.org"), None, 3_000);
    let older = clerk_user("user_h1", Some("h1@example.org"), None, 1_000);
    let deleted = json!({"id": "user_h1", "object": "user", "deleted": true});
    let late = clerk_user("user_h1", Some("h1@example.org"), None, 9_000);
    let ids = env
        .apply_in_order(&[
            ("user.created", newer.clone()),
            ("user.updated", older),
            ("session.created", json!({"id": "sess_1"})),
            ("user.deleted", deleted),
            ("user.updated", late),
        ])
        .await;
    worker.stop().await;

    let applied = row(&env, &ids[0]).await;
    assert_eq!(applied.outcome, "applied");
    assert_eq!(applied.source, "webhook");
    assert_eq!(applied.subject_kind.as_deref(), Some("user"));
    assert_eq!(applied.subject_id.as_deref(), Some("user_h1"));
    assert_eq!(applied.payload, Some(envelope("user.created", newer)));
    assert_eq!(applied.reason, None);
    // The test publisher stamps both headers with the time of publishing.
    let svix_timestamp = applied.svix_timestamp.expect("svix timestamp");
    let received_at = applied.received_at.expect("received at");
    assert!(
        (received_at.timestamp() - svix_timestamp.timestamp()).abs() <= 1,
        "{svix_timestamp} vs {received_at}"
    );
    assert!(received_at <= applied.processed_at);

    let stale = row(&env, &ids[1]).await;
    assert_eq!(stale.outcome, "stale");
    assert_eq!(
        stale.reason.as_deref(),
        Some(
            "stored updated_at 1970-01-01 00:00:03.000 UTC is not older than \
             1970-01-01 00:00:01.000 UTC"
        )
    );

    let ignored = row(&env, &ids[2]).await;
    assert_eq!(ignored.outcome, "ignored");
    assert_eq!((ignored.subject_kind, ignored.subject_id), (None, None));

    let delete = row(&env, &ids[3]).await;
    assert_eq!(delete.outcome, "deleted");
    assert_eq!(delete.subject_id.as_deref(), Some("user_h1"));

    let after_delete = row(&env, &ids[4]).await;
    assert_eq!(after_delete.outcome, "stale");
    let reason = after_delete.reason.expect("reason");
    assert!(reason.starts_with("the user was deleted at "), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_and_membership_events_are_kept_under_their_own_subjects() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let organization = clerk_organization("org_h1", "Acme", 2_000);
    let membership = clerk_membership(
        "orgmem_h1",
        &organization,
        "user_h2",
        "org:admin",
        1_000,
        2_000,
    );
    let ids = env
        .apply_in_order(&[
            ("organization.created", organization.clone()),
            ("organizationMembership.created", membership.clone()),
            (
                "organization.updated",
                clerk_organization("org_h1", "Acme", 1_500),
            ),
            ("organizationMembership.deleted", membership),
        ])
        .await;
    worker.stop().await;

    let created = row(&env, &ids[0]).await;
    assert_eq!(
        (
            created.subject_kind.as_deref(),
            created.subject_id.as_deref()
        ),
        (Some("organization"), Some("org_h1"))
    );
    assert_eq!(created.outcome, "applied");
    let member = row(&env, &ids[1]).await;
    assert_eq!(
        (member.subject_kind.as_deref(), member.subject_id.as_deref()),
        (Some("membership"), Some("orgmem_h1"))
    );
    let stale = row(&env, &ids[2]).await;
    assert_eq!(stale.outcome, "stale");
    assert!(stale.reason.is_some());
    assert_eq!(row(&env, &ids[3]).await.outcome, "deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stored_payloads_the_history_keeps_everything_but_the_body() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.reading.store_payloads = false;
    let worker = env.start_worker(config).await;
    let ids = env
        .apply_in_order(&[(
            "user.created",
            clerk_user("user_h3", Some("h3@example.org"), None, 1_000),
        )])
        .await;
    worker.stop().await;
    let kept = row(&env, &ids[0]).await;
    assert_eq!(kept.payload, None);
    assert_eq!(kept.outcome, "applied");
    assert_eq!(kept.subject_id.as_deref(), Some("user_h3"));
    assert!(kept.received_at.is_some());
    assert!(env.user("user_h3").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_jsonb_cannot_hold_is_applied_and_kept_without_its_payload() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let id = svix_id();
    // `\u0000` is valid JSON that Postgres's jsonb refuses; the event is ignored and must not
    // fail because of its history row.
    let body = br#"{"type":"session.created","object":"event","data":{"id":"sess_\u0000"}}"#;
    env.publish(&id, "session.created", body).await;
    eventually(WITHIN, "the event recorded", || async {
        env.processed(&id).await.is_some()
    })
    .await;
    worker.stop().await;
    let kept = row(&env, &id).await;
    assert_eq!(kept.outcome, "ignored");
    assert_eq!(kept.payload, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciled_user_is_kept_with_source_reconcile_and_the_listed_object() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start("sk_test_history").await;
    let user = clerk_user("user_h4", Some("h4@example.org"), None, 1_000);
    api.put_user(user.clone());
    let client = ClerkClient::new(ClerkConfig {
        rate_limit: 10_000,
        ..ClerkConfig::new(api.url(), api.secret_key().to_owned().into())
    })
    .expect("client");
    let report = worker::reconcile::reconcile(env.db(), &client, &Options::default()).await;
    assert_eq!(report.failure, None);

    let rows = worker::history::Filter {
        subject: Some("user_h4".into()),
        ..Default::default()
    }
    .select()
    .all(env.db())
    .await
    .expect("history");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].source, "reconcile");
    assert_eq!(rows[0].outcome, "applied");
    assert_eq!(rows[0].event_type, "user.updated");
    assert_eq!(
        rows[0].payload.as_ref().map(|payload| &payload["data"]),
        Some(&user)
    );
}
