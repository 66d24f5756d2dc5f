//! Failures: what is dead-lettered, when, and with which headers; and what is never
//! dead-lettered (the database being away).

use std::time::Duration;

use lapin::types::AMQPValue;
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;
use shared::headers;
use test_support::events::{clerk_user, header};
use test_support::signing::svix_id;
use test_support::{TestEnv, database_url, eventually};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_without_id_is_dead_lettered_at_once_as_permanent_with_its_headers() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let id = svix_id();
    let body = br#"{"type":"user.deleted","data":{"deleted":true,"object":"user"}}"#;
    env.publish(&id, "user.deleted", body).await;
    eventually(WITHIN, "a dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;
    worker.stop().await;
    let letters = env.take_dead_letters().await;
    let (table, dead_body) = &letters[0];
    assert_eq!(dead_body.as_slice(), body, "body kept byte for byte");
    assert_eq!(
        header(table, headers::SVIX_ID).as_deref(),
        Some(id.as_str())
    );
    assert!(
        header(table, headers::RECEIVED_AT).is_some(),
        "original headers kept"
    );
    assert_eq!(
        header(table, headers::ERROR_KIND).as_deref(),
        Some(headers::KIND_PERMANENT)
    );
    assert_eq!(
        header(table, headers::ERROR).as_deref(),
        Some("user.deleted without data.id")
    );
    assert_eq!(
        table.inner().get(headers::ATTEMPTS),
        Some(&AMQPValue::LongUInt(1))
    );
    let failed_at = header(table, headers::FAILED_AT).expect("failed-at");
    chrono::DateTime::parse_from_rfc3339(&failed_at).expect("failed-at is RFC 3339");
    assert_eq!(
        env.ready(&env.topology.queue).await,
        0,
        "original acknowledged"
    );
    assert_eq!(env.processed_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_is_dead_lettered_as_permanent() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    env.publish(&svix_id(), "user.created", b"{not json").await;
    eventually(WITHIN, "a dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;
    worker.stop().await;
    let letters = env.take_dead_letters().await;
    assert_eq!(
        header(&letters[0].0, headers::ERROR_KIND).as_deref(),
        Some(headers::KIND_PERMANENT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_updated_at_is_retried_then_dead_lettered_as_exhausted_with_its_attempts() {
    let env = TestEnv::new().await;
    let config = env.config();
    let max_attempts = config.max_attempts;
    let worker = env.start_worker(config).await;
    let id = svix_id();
    let mut data = clerk_user("user_1", Some("a@example.org"), None, 100);
    data.as_object_mut().expect("object").remove("updated_at");
    env.publish_event(&id, "user.updated", data).await;
    eventually(WITHIN, "a dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;
    assert_eq!(
        worker.metrics.retries.with_label_values(&["message"]).get(),
        u64::from(max_attempts - 1)
    );
    worker.stop().await;
    let letters = env.take_dead_letters().await;
    let (table, _) = &letters[0];
    assert_eq!(
        header(table, headers::ERROR_KIND).as_deref(),
        Some(headers::KIND_EXHAUSTED)
    );
    assert_eq!(
        table.inner().get(headers::ATTEMPTS),
        Some(&AMQPValue::LongUInt(max_attempts))
    );
    let error = header(table, headers::ERROR).expect("error");
    assert!(error.contains("updated_at"), "{error}");
    assert!(!error.contains('\n'), "one line: {error}");
    assert_eq!(
        header(table, headers::SVIX_ID).as_deref(),
        Some(id.as_str())
    );
    assert!(env.user("user_1").await.is_none());
    assert_eq!(
        env.ready(&env.topology.queue).await,
        0,
        "original acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_the_database_rejects_is_dead_lettered_alone_and_the_rest_of_its_batch_applies() {
    let env = TestEnv::new().await;
    // Events published before the worker starts arrive together and share a transaction.
    for n in 0..6 {
        let mut data = clerk_user(&format!("user_{n}"), None, None, 100);
        if n == 3 {
            // Postgres refuses a NUL character in text (SQLSTATE 22021): the message's fault.
            data["first_name"] = json!("bad\u{0}name");
        }
        env.publish_event(&svix_id(), "user.created", data).await;
    }
    let worker = env.start_worker(env.config()).await;
    eventually(WITHIN, "a dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;
    eventually(WITHIN, "the five other users", || async {
        env.processed_count().await == 5
    })
    .await;
    for n in [0, 1, 2, 4, 5] {
        assert!(env.user(&format!("user_{n}")).await.is_some(), "user_{n}");
    }
    assert!(env.user("user_3").await.is_none());
    worker.stop().await;
    let letters = env.take_dead_letters().await;
    assert_eq!(
        header(&letters[0].0, headers::ERROR_KIND).as_deref(),
        Some(headers::KIND_EXHAUSTED)
    );
    assert_eq!(env.ready(&env.topology.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_unreachable_nothing_is_dead_lettered_and_everything_applies_after() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    eventually(WITHIN, "ready", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    let admin = Database::connect(database_url().as_str())
        .await
        .expect("admin");
    let db = &env.database.name;
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{db}' AND pid <> pg_backend_pid();"
        ))
        .await
        .expect("cut the database off");

    for n in 0..20 {
        env.publish_event(
            &svix_id(),
            "user.created",
            clerk_user(
                &format!("user_{n}"),
                Some(&format!("u{n}@example.org")),
                None,
                100,
            ),
        )
        .await;
    }
    eventually(WITHIN, "several transient retries", || async {
        worker
            .metrics
            .retries
            .with_label_values(&["transient"])
            .get()
            >= 3
    })
    .await;
    assert_eq!(
        worker.get("/readyz").await.0,
        503,
        "not ready without database"
    );
    assert_eq!(env.ready(&env.topology.dead_queue).await, 0);

    admin
        .execute_unprepared(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
        .await
        .expect("let the database back in");
    admin.close().await.expect("close admin");
    eventually(WITHIN, "all twenty users", || async {
        env.processed_count().await == 20
    })
    .await;
    for n in 0..20 {
        assert!(env.user(&format!("user_{n}")).await.is_some(), "user_{n}");
    }
    worker.stop().await;
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        env.ready(&env.topology.queue).await,
        0,
        "everything acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_rejects_one_user_dead_letters_it_as_exhausted_and_its_batch_mates_apply_at_once()
 {
    let env = TestEnv::new().await;
    // An ordinary trigger of the user's own: RAISE EXCEPTION is SQLSTATE P0001, which the worker
    // has no name for. It must count against the message, not be waited out.
    env.db()
        .execute_unprepared(
            "CREATE FUNCTION reject_banned() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.id = 'user_banned' THEN RAISE EXCEPTION 'user % is banned', NEW.id; END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER reject_banned BEFORE INSERT OR UPDATE ON users \
             FOR EACH ROW EXECUTE FUNCTION reject_banned();",
        )
        .await
        .expect("trigger");
    // Published before the worker starts, so the bad one shares a batch with good ones.
    let bad_id = svix_id();
    for n in 0..60 {
        if n == 30 {
            env.publish_event(
                &bad_id,
                "user.created",
                clerk_user("user_banned", None, None, 100),
            )
            .await;
        }
        env.publish_event(
            &svix_id(),
            "user.created",
            clerk_user(&format!("user_{n}"), None, None, 100),
        )
        .await;
    }
    let mut config = env.config();
    // Long pauses between the bad one's attempts: its batch-mates must not wait for them.
    config.backoff.base = Duration::from_secs(3);
    config.backoff.max = Duration::from_secs(3);
    let max_attempts = config.max_attempts;
    let worker = env.start_worker(config).await;
    eventually(WITHIN, "the sixty good users", || async {
        env.processed_count().await == 60
    })
    .await;
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "the good ones were applied while the bad one still waited for its retries"
    );
    eventually(WITHIN, "the rejected event's dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;
    assert_eq!(
        worker
            .metrics
            .retries
            .with_label_values(&["transient"])
            .get(),
        0,
        "a trigger's exception is not infrastructure"
    );
    worker.stop().await;
    let letters = env.take_dead_letters().await;
    let (table, _) = &letters[0];
    assert_eq!(
        header(table, headers::SVIX_ID).as_deref(),
        Some(bad_id.as_str())
    );
    assert_eq!(
        header(table, headers::ERROR_KIND).as_deref(),
        Some(headers::KIND_EXHAUSTED)
    );
    assert_eq!(
        table.inner().get(headers::ATTEMPTS),
        Some(&AMQPValue::LongUInt(max_attempts))
    );
    let error = header(table, headers::ERROR).expect("error");
    assert!(error.contains("user user_banned is banned"), "{error}");
    assert!(env.user("user_banned").await.is_none());
    for n in 0..60 {
        assert!(env.user(&format!("user_{n}")).await.is_some(), "user_{n}");
    }
    assert_eq!(env.ready(&env.topology.queue).await, 0, "all acknowledged");
}
