//! `processed_events` rows older than `WORKER_PROCESSED_RETENTION` are pruned in the background;
//! users and tombstones are kept for good.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use serde_json::json;
use test_support::events::clerk_user;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_older_than_the_retention_are_pruned_in_batches_and_tombstones_stay() {
    let env = TestEnv::new().await;
    // More old rows than one pruning statement takes.
    env.db()
        .execute_unprepared(
            "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
             SELECT 'msg_old_' || n, 'user.updated', 'applied', now() - interval '1 hour' \
             FROM generate_series(1, 2500) AS n",
        )
        .await
        .expect("old rows");
    let mut config = env.config();
    config.processed_retention = Duration::from_secs(3);
    let worker = env.start_worker(config).await;
    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_1", None, None, 100),
    )
    .await;
    env.publish_event(
        &svix_id(),
        "user.deleted",
        json!({"deleted": true, "id": "user_2", "object": "user"}),
    )
    .await;
    eventually(WITHIN, "the two events applied", || async {
        env.user("user_1").await.is_some() && env.tombstoned("user_2").await
    })
    .await;
    eventually(
        WITHIN,
        "every row pruned, the new ones once 3 s old",
        || async { env.processed_count().await == 0 },
    )
    .await;
    assert_eq!(worker.metrics.pruned.get(), 2502);
    assert!(env.user("user_1").await.is_some(), "users are not pruned");
    assert!(
        env.tombstoned("user_2").await,
        "tombstones are kept for good"
    );
    worker.stop().await;
}
