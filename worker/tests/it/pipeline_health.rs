//! What the worker tells about the pipeline's health: a delivery held too long turns `/readyz`
//! 503, and the queue depths, the oldest held delivery and the messages waiting for a retry are
//! metrics.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use test_support::events::clerk_user;
use test_support::http::metric;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_past_the_threshold_turns_readiness_503_until_it_is_settled() {
    let env = TestEnv::new().await;
    env.db()
        .execute_unprepared(
            "CREATE FUNCTION reject_all() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'rejected by the test'; END $$; \
             CREATE TRIGGER reject_all BEFORE INSERT OR UPDATE ON users \
             FOR EACH ROW EXECUTE FUNCTION reject_all();",
        )
        .await
        .expect("trigger");
    let mut config = env.config();
    config.stalled_after = Duration::from_secs(1);
    // The rejected event waits 4 s before each of its retries: well past the threshold.
    config.backoff.base = Duration::from_secs(4);
    config.backoff.max = Duration::from_secs(4);
    config.max_attempts = 2;
    let worker = env.start_worker(config).await;
    eventually(WITHIN, "ready", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;

    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_1", None, None, 100),
    )
    .await;
    eventually(WITHIN, "the event waiting for its retry", || async {
        worker.metrics.retry_waiting.get() == 1
    })
    .await;
    eventually(WITHIN, "readiness 503 for a stalled delivery", || async {
        let (status, body) = worker.get("/readyz").await;
        status == 503 && body.contains(r#""stalled":true"#)
    })
    .await;
    let (_, text) = worker.get("/metrics").await;
    let oldest = metric(&text, "clerk_sync_worker_oldest_unacked_seconds").expect("oldest");
    assert!(oldest > 1.0, "{text}");

    // Dead-lettered after its second attempt: nothing held, ready again.
    eventually(WITHIN, "the dead letter", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;
    eventually(WITHIN, "ready again", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    assert_eq!(worker.metrics.retry_waiting.get(), 0);
    // The depths are polled every few seconds.
    eventually(WITHIN, "the dead-letter queue depth", || async {
        let (_, text) = worker.get("/metrics").await;
        metric(&text, r#"clerk_sync_worker_queue_depth{queue="dead"}"#) == Some(1.0)
            && metric(&text, r#"clerk_sync_worker_queue_depth{queue="worker"}"#) == Some(0.0)
    })
    .await;
    worker.stop().await;
}
