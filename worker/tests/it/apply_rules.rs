//! The apply rules, end to end: events published to RabbitMQ as the ingest does, applied by a
//! worker running in-process, checked in Postgres.

use std::time::Duration;

use serde_json::{Value, json};
use shared::Roles;
use test_support::events::{clerk_user, fixture};
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(20);

/// The `data` of a fixture event, as the worker received it.
fn fixture_data(name: &str) -> Value {
    let event: Value = serde_json::from_slice(&fixture(name)).expect("fixture is JSON");
    event["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_user_created_is_stored_with_every_mapped_field() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let id = svix_id();
    env.publish(&id, "user.created", &fixture("user.created"))
        .await;
    eventually(WITHIN, "the user row", || async {
        env.user("user_29w83sxmDNGwOuEthce5gg56FcC").await.is_some()
    })
    .await;
    let user = env
        .user("user_29w83sxmDNGwOuEthce5gg56FcC")
        .await
        .expect("user");
    assert_eq!(user.email.as_deref(), Some("example@example.org"));
    assert_eq!(user.first_name.as_deref(), Some("Example"));
    assert_eq!(user.last_name.as_deref(), Some("Example"));
    assert_eq!(user.phone, None);
    assert_eq!(user.role, "client");
    assert_eq!(user.created_at.timestamp_millis(), 1_654_012_591_514);
    assert_eq!(user.updated_at.timestamp_millis(), 1_654_012_591_835);
    assert_eq!(user.username, None);
    assert_eq!(
        user.image_url.as_deref(),
        Some("https://img.clerk.com/xxxxxx")
    );
    assert_eq!(user.external_id.as_deref(), Some("567772"));
    assert_eq!(user.public_metadata, Some(json!({})));
    assert_eq!(user.private_metadata, Some(json!({})));
    assert_eq!(
        user.last_sign_in_at.map(|at| at.timestamp_millis()),
        Some(1_654_012_591_514)
    );
    assert_eq!(user.clerk_data, Some(fixture_data("user.created")));
    let processed = env.processed(&id).await.expect("processed event");
    assert_eq!(processed.outcome, "applied");
    assert_eq!(processed.event_type, "user.created");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_user_updated_sets_phone_role_and_a_null_last_name() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    env.publish(&svix_id(), "user.created", &fixture("user.created"))
        .await;
    env.publish(&svix_id(), "user.updated", &fixture("user.updated"))
        .await;
    eventually(WITHIN, "the updated row", || async {
        env.user("user_29w83sxmDNGwOuEthce5gg56FcC")
            .await
            .is_some_and(|u| u.updated_at.timestamp_millis() == 1_654_012_824_306)
    })
    .await;
    let user = env
        .user("user_29w83sxmDNGwOuEthce5gg56FcC")
        .await
        .expect("user");
    assert_eq!(user.phone.as_deref(), Some("+19876543210"));
    assert_eq!(user.role, "trainer");
    assert_eq!(user.last_name, None);
    assert_eq!(user.public_metadata, Some(json!({"role": "trainer"})));
    assert_eq!(user.clerk_data, Some(fixture_data("user.updated")));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_roles_become_client_and_known_roles_are_kept() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    for (user, role) in [
        ("user_admin", json!("admin")),
        ("user_trainer", json!("trainer")),
        ("user_super", json!("superuser")),
        ("user_array", json!(["admin"])),
    ] {
        let mut data = clerk_user(user, None, None, 10);
        data["public_metadata"] = json!({ "role": role });
        env.publish_event(&svix_id(), "user.created", data).await;
    }
    eventually(WITHIN, "four users", || async {
        env.user("user_array").await.is_some()
            && env.user("user_super").await.is_some()
            && env.user("user_admin").await.is_some()
            && env.user("user_trainer").await.is_some()
    })
    .await;
    let role = |id: &'static str| {
        let env = &env;
        async move { env.user(id).await.expect("user").role }
    };
    assert_eq!(role("user_admin").await, "admin");
    assert_eq!(role("user_trainer").await, "trainer");
    assert_eq!(role("user_super").await, "client");
    assert_eq!(role("user_array").await, "client");
    let (_, metrics) = worker.get("/metrics").await;
    assert!(
        metrics.contains("clerk_sync_worker_unknown_roles_total 2"),
        "{metrics}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_example_event_syncs_with_a_null_email_and_null_columns() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    // Shaped like the dashboard's "Send Example": no addresses although a primary id is set,
    // null private metadata, and nulls wherever a fresh user has nothing.
    let data = json!({
        "id": "user_example", "object": "user",
        "email_addresses": [], "primary_email_address_id": "idn_missing",
        "phone_numbers": [], "primary_phone_number_id": null,
        "private_metadata": null, "public_metadata": {}, "unsafe_metadata": {},
        "first_name": null, "last_name": null, "username": null,
        "image_url": "https://img.clerk.com/example", "has_image": false,
        "external_id": null, "last_sign_in_at": null, "last_active_at": null,
        "created_at": 1_654_012_591_514_i64, "updated_at": 1_654_012_591_835_i64,
    });
    env.publish_event(&svix_id(), "user.created", data.clone())
        .await;
    eventually(WITHIN, "the example user", || async {
        env.user("user_example").await.is_some()
    })
    .await;
    let user = env.user("user_example").await.expect("user");
    assert_eq!((user.email, user.first_name), (None, None));
    assert_eq!((user.username, user.external_id), (None, None));
    assert_eq!(
        user.image_url.as_deref(),
        Some("https://img.clerk.com/example")
    );
    assert_eq!(user.public_metadata, Some(json!({})));
    assert_eq!(user.private_metadata, None, "SQL NULL, not JSON null");
    assert_eq!(user.last_sign_in_at, None);
    assert_eq!(user.clerk_data, Some(data));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_profile_column_follows_the_newest_version_and_a_stale_one_changes_none() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    // One transaction at a time, so the events are applied in the order they are delivered.
    config.db_pool_size = 1;
    let worker = env.start_worker(config).await;
    let version = |updated_at: i64, tag: &str| {
        let mut data = clerk_user(
            "user_1",
            Some(&format!("{tag}@example.org")),
            None,
            updated_at,
        );
        data["username"] = json!(format!("{tag}_name"));
        data["image_url"] = json!(format!("https://img.clerk.com/{tag}"));
        data["external_id"] = json!(format!("ext-{tag}"));
        data["public_metadata"] = json!({"role": "admin", "plan": tag});
        data["private_metadata"] = json!({"stripe": {"customer": format!("cus_{tag}")}});
        data["unsafe_metadata"] = json!({"theme": tag});
        data["last_sign_in_at"] = json!(updated_at - 5);
        data
    };
    let newer = version(200, "newer");
    env.publish_event(&svix_id(), "user.updated", newer.clone())
        .await;
    eventually(WITHIN, "the newer version", || async {
        env.user("user_1").await.is_some()
    })
    .await;
    let stored = env.user("user_1").await.expect("user");
    assert_eq!(stored.username.as_deref(), Some("newer_name"));
    assert_eq!(
        stored.image_url.as_deref(),
        Some("https://img.clerk.com/newer")
    );
    assert_eq!(stored.external_id.as_deref(), Some("ext-newer"));
    assert_eq!(
        stored.public_metadata,
        Some(json!({"role": "admin", "plan": "newer"}))
    );
    assert_eq!(
        stored.private_metadata,
        Some(json!({"stripe": {"customer": "cus_newer"}}))
    );
    assert_eq!(
        stored.last_sign_in_at.map(|at| at.timestamp_millis()),
        Some(195)
    );
    assert_eq!(stored.role, "admin");
    assert_eq!(stored.clerk_data, Some(newer));

    // An older version, and one as old as the stored row, arrive late: both are stale.
    let (older, same_age) = (svix_id(), svix_id());
    env.publish_event(&older, "user.created", version(100, "older"))
        .await;
    let mut rewritten = version(200, "same");
    rewritten["public_metadata"] = json!({});
    env.publish_event(&same_age, "user.updated", rewritten)
        .await;
    eventually(WITHIN, "both late versions processed", || async {
        env.processed(&older).await.is_some() && env.processed(&same_age).await.is_some()
    })
    .await;
    assert_eq!(env.processed(&older).await.expect("older").outcome, "stale");
    assert_eq!(
        env.processed(&same_age).await.expect("same age").outcome,
        "stale"
    );
    assert_eq!(
        env.user("user_1").await.expect("user"),
        stored,
        "a stale version changed the row"
    );

    // A newer version clears what it no longer has.
    let mut cleared = clerk_user("user_1", None, None, 300);
    cleared["private_metadata"] = json!(null);
    env.publish_event(&svix_id(), "user.updated", cleared.clone())
        .await;
    eventually(WITHIN, "the cleared version", || async {
        env.user("user_1")
            .await
            .is_some_and(|u| u.updated_at.timestamp_millis() == 300)
    })
    .await;
    let user = env.user("user_1").await.expect("user");
    assert_eq!(
        (user.username, user.image_url, user.external_id),
        (None, None, None)
    );
    assert_eq!(user.public_metadata, Some(json!({})));
    assert_eq!(user.private_metadata, None);
    assert_eq!(user.last_sign_in_at, None);
    assert_eq!(user.role, "client");
    assert_eq!(user.clerk_data, Some(cleared));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerk_data_answers_json_path_queries_on_fields_without_a_column() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    env.publish(&svix_id(), "user.created", &fixture("user.created"))
        .await;
    eventually(WITHIN, "the user row", || async {
        env.user("user_29w83sxmDNGwOuEthce5gg56FcC").await.is_some()
    })
    .await;
    // The queries the README shows.
    let row = env
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT clerk_data #>> '{email_addresses,0,verification,status}' AS status, \
                    clerk_data->'unsafe_metadata' AS unsafe_metadata, \
                    (clerk_data->>'two_factor_enabled')::boolean AS two_factor \
             FROM users WHERE id = 'user_29w83sxmDNGwOuEthce5gg56FcC'",
        ))
        .await
        .expect("query")
        .expect("row");
    let status: String = row.try_get("", "status").expect("status");
    let unsafe_metadata: serde_json::Value =
        row.try_get("", "unsafe_metadata").expect("unsafe_metadata");
    let two_factor: bool = row.try_get("", "two_factor").expect("two_factor");
    assert_eq!(status, "verified");
    assert_eq!(unsafe_metadata, json!({}));
    assert!(!two_factor);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_roles_are_kept_and_anything_else_takes_the_configured_default() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.reading.roles = Roles::new(["owner", "editor", "viewer"], "viewer").expect("roles");
    let worker = env.start_worker(config).await;
    for (user, role) in [
        ("user_owner", json!("owner")),
        ("user_editor", json!("editor")),
        ("user_admin", json!("admin")),
        ("user_number", json!(3)),
        ("user_none", json!(null)),
    ] {
        let mut data = clerk_user(user, None, None, 10);
        data["public_metadata"] = json!({ "role": role });
        env.publish_event(&svix_id(), "user.created", data).await;
    }
    eventually(WITHIN, "five users", || async {
        env.processed_count().await == 5
    })
    .await;
    for (user, role) in [
        ("user_owner", "owner"),
        ("user_editor", "editor"),
        ("user_admin", "viewer"),
        ("user_number", "viewer"),
        ("user_none", "viewer"),
    ] {
        assert_eq!(env.user(user).await.expect(user).role, role, "{user}");
    }
    let (_, metrics) = worker.get("/metrics").await;
    assert!(
        metrics.contains("clerk_sync_worker_unknown_roles_total 2"),
        "{metrics}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_delivered_before_its_create_is_kept() {
    let env = TestEnv::new().await;
    // One transaction at a time, so the events are applied in the order they are delivered.
    let mut config = env.config();
    config.db_pool_size = 1;
    let worker = env.start_worker(config).await;
    let update = svix_id();
    let create = svix_id();
    env.publish_event(
        &update,
        "user.updated",
        clerk_user("user_1", Some("new@example.org"), Some("admin"), 200),
    )
    .await;
    env.publish_event(
        &create,
        "user.created",
        clerk_user("user_1", Some("old@example.org"), None, 100),
    )
    .await;
    eventually(WITHIN, "both events processed", || async {
        env.processed_count().await == 2
    })
    .await;
    let user = env.user("user_1").await.expect("user");
    assert_eq!(user.email.as_deref(), Some("new@example.org"));
    assert_eq!(user.role, "admin");
    assert_eq!(user.updated_at.timestamp_millis(), 200);
    assert_eq!(
        env.processed(&create).await.expect("create").outcome,
        "stale"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_svix_id_delivered_three_times_is_applied_once() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let id = svix_id();
    for _ in 0..3 {
        env.publish_event(
            &id,
            "user.created",
            clerk_user("user_1", Some("a@example.org"), None, 100),
        )
        .await;
    }
    eventually(WITHIN, "two duplicates counted", || async {
        worker.metrics.duplicates.get() == 2
    })
    .await;
    assert_eq!(env.processed_count().await, 1);
    assert_eq!(
        env.processed(&id).await.expect("processed").outcome,
        "applied"
    );
    let user = env.user("user_1").await.expect("user");
    let synced_once = user.synced_at;
    // A fourth copy, now that the row exists, changes nothing either.
    env.publish_event(
        &id,
        "user.created",
        clerk_user("user_1", Some("other@example.org"), None, 999),
    )
    .await;
    eventually(WITHIN, "the fourth copy counted", || async {
        worker.metrics.duplicates.get() == 3
    })
    .await;
    let user = env.user("user_1").await.expect("user");
    assert_eq!(user.email.as_deref(), Some("a@example.org"));
    assert_eq!(user.synced_at, synced_once);
    worker.stop().await;
    assert_eq!(env.ready(&env.topology.queue).await, 0, "all acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_update_after_a_delete_does_not_bring_the_user_back() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_1", Some("a@example.org"), None, 100),
    )
    .await;
    eventually(WITHIN, "the user", || async {
        env.user("user_1").await.is_some()
    })
    .await;
    env.publish_event(
        &svix_id(),
        "user.deleted",
        json!({"deleted": true, "id": "user_1", "object": "user"}),
    )
    .await;
    eventually(WITHIN, "the tombstone", || async {
        env.tombstoned("user_1").await
    })
    .await;
    assert!(env.user("user_1").await.is_none(), "row deleted");
    let late = svix_id();
    env.publish_event(
        &late,
        "user.updated",
        clerk_user("user_1", Some("a@example.org"), None, 999_999),
    )
    .await;
    eventually(WITHIN, "the late update processed", || async {
        env.processed(&late).await.is_some()
    })
    .await;
    assert_eq!(env.processed(&late).await.expect("late").outcome, "stale");
    assert!(env.user("user_1").await.is_none(), "user came back");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_before_the_create_and_repeated_deletes_keep_one_tombstone_from_the_first() {
    use sea_orm::EntityTrait;
    use test_support::rows::user_tombstones;
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let deleted = json!({"deleted": true, "id": "user_1", "object": "user"});
    let first = svix_id();
    env.publish_event(&first, "user.deleted", deleted.clone())
        .await;
    eventually(WITHIN, "the tombstone", || async {
        env.tombstoned("user_1").await
    })
    .await;
    let tombstone = || async {
        user_tombstones::Entity::find_by_id("user_1".to_owned())
            .one(env.db())
            .await
            .expect("read tombstone")
            .expect("tombstone")
    };
    let buried_at = tombstone().await.deleted_at;

    let (again, create) = (svix_id(), svix_id());
    env.publish_event(&first, "user.deleted", deleted.clone())
        .await;
    env.publish_event(&again, "user.deleted", deleted).await;
    env.publish_event(
        &create,
        "user.created",
        clerk_user("user_1", Some("a@example.org"), None, 100),
    )
    .await;
    eventually(WITHIN, "the second delete and the create", || async {
        env.processed(&again).await.is_some() && env.processed(&create).await.is_some()
    })
    .await;
    eventually(WITHIN, "the redelivered delete counted", || async {
        worker.metrics.duplicates.get() == 1
    })
    .await;
    worker.stop().await;
    assert_eq!(
        env.processed(&first).await.expect("first").outcome,
        "deleted"
    );
    assert_eq!(
        env.processed(&again).await.expect("again").outcome,
        "deleted"
    );
    assert_eq!(
        env.processed(&create).await.expect("create").outcome,
        "stale"
    );
    assert_eq!(
        tombstone().await.deleted_at,
        buried_at,
        "first deletion time kept"
    );
    assert!(
        env.user("user_1").await.is_none(),
        "the create did not resurrect"
    );
    assert_eq!(env.processed_count().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_moving_between_users_delivered_in_the_wrong_order_ends_with_its_new_owner() {
    // Truth: A held the address at t=100, gave it up at t=200; B took it at t=300.
    // Delivered: B's event first, then A's old one, then A's newer one.
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let shared_address = Some("moving@example.org");
    let events = [
        (
            "user.created",
            clerk_user("user_b", shared_address, None, 300),
        ),
        (
            "user.created",
            clerk_user("user_a", shared_address, None, 100),
        ),
    ];
    for (event_type, data) in events {
        env.publish_event(&svix_id(), event_type, data).await;
    }
    eventually(WITHIN, "both users", || async {
        env.user("user_a").await.is_some() && env.user("user_b").await.is_some()
    })
    .await;
    assert_eq!(
        env.user("user_b").await.expect("b").email.as_deref(),
        shared_address,
        "the newer holder keeps the address"
    );
    assert_eq!(env.user("user_a").await.expect("a").email, None);
    env.publish_event(
        &svix_id(),
        "user.updated",
        clerk_user("user_a", Some("a-new@example.org"), None, 200),
    )
    .await;
    eventually(WITHIN, "A's newer version", || async {
        env.user("user_a")
            .await
            .is_some_and(|a| a.email.as_deref() == Some("a-new@example.org"))
    })
    .await;

    // And the other way round: the old holder is stored first, then the new one arrives.
    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_c", Some("second@example.org"), None, 100),
    )
    .await;
    eventually(WITHIN, "C", || async { env.user("user_c").await.is_some() }).await;
    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_d", Some("second@example.org"), None, 300),
    )
    .await;
    eventually(WITHIN, "D holding the address", || async {
        env.user("user_d")
            .await
            .is_some_and(|d| d.email.as_deref() == Some("second@example.org"))
    })
    .await;
    assert_eq!(env.user("user_c").await.expect("c").email, None);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhandled_type_is_recorded_as_ignored_and_acknowledged() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let id = svix_id();
    env.publish_event(&id, "session.created", json!({"id": "sess_1"}))
        .await;
    eventually(WITHIN, "the ignored event", || async {
        env.processed(&id).await.is_some()
    })
    .await;
    assert_eq!(env.processed(&id).await.expect("event").outcome, "ignored");
    worker.stop().await;
    assert_eq!(env.ready(&env.topology.queue).await, 0, "acknowledged");
    assert!(env.take_dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer_and_metrics_count_events_by_type_and_outcome() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    assert_eq!(worker.get("/healthz").await.0, 200);
    eventually(WITHIN, "ready", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    env.publish_event(&svix_id(), "email.created", json!({}))
        .await;
    eventually(WITHIN, "the event counted", || async {
        worker.get("/metrics").await.1.contains(
            "clerk_sync_worker_events_total{outcome=\"ignored\",type=\"email.created\"} 1",
        )
    })
    .await;
    worker.stop().await;
}
