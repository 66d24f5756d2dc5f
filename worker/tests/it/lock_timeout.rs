//! `WORKER_LOCK_TIMEOUT`: a statement blocked on a lock longer than the timeout fails with
//! SQLSTATE 55P03, and the worker retries its transaction (counting each time in
//! `clerk_sync_worker_lock_timeouts_total`) instead of waiting as long as the lock is held.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use test_support::events::clerk_user;
use test_support::http::metric;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(30);
const LOCK_TIMEOUTS: &str = "clerk_sync_worker_lock_timeouts_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_blocked_on_a_row_lock_is_retried_and_counted_then_applies_once_released() {
    let env = TestEnv::new().await;
    let mut config = env.config();
    config.lock_timeout = Duration::from_millis(200);
    let worker = env.start_worker(config).await;
    env.apply_in_order(&[(
        "user.created",
        clerk_user("user_1", Some("old@example.org"), None, 1_000),
    )])
    .await;
    assert_eq!(worker.metrics.lock_timeouts.get(), 0, "nothing blocked yet");

    // Another session holds the user's row, as a long report or a hand-run transaction would.
    let holder = env.db().begin().await.expect("begin");
    holder
        .execute_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id FROM users WHERE id = 'user_1' FOR UPDATE",
        ))
        .await
        .expect("lock the row");
    let update = svix_id();
    env.publish_event(
        &update,
        "user.updated",
        clerk_user("user_1", Some("new@example.org"), None, 2_000),
    )
    .await;

    // Each attempt waits 200 ms, fails with 55P03, and is tried again after a pause.
    eventually(WITHIN, "two lock timeouts counted", || async {
        worker.metrics.lock_timeouts.get() >= 2
    })
    .await;
    let (status, body) = worker.get("/metrics").await;
    assert_eq!(status, 200);
    let exported = metric(&body, LOCK_TIMEOUTS).expect("the counter is exported");
    assert!(exported >= 2.0, "{LOCK_TIMEOUTS} = {exported}");
    assert!(
        env.processed(&update).await.is_none(),
        "each attempt was rolled back, its history row with it"
    );
    assert_eq!(
        env.user("user_1").await.expect("user").email.as_deref(),
        Some("old@example.org")
    );
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "a lock timeout never counts against the message"
    );

    holder.rollback().await.expect("release the row");
    eventually(WITHIN, "the update applied", || async {
        env.processed(&update).await.is_some()
    })
    .await;
    let row = env.processed(&update).await.expect("history row");
    assert_eq!(row.outcome, "applied");
    assert_eq!(
        env.user("user_1").await.expect("user").email.as_deref(),
        Some("new@example.org")
    );
    let timeouts = worker.metrics.lock_timeouts.get();
    worker.stop().await;
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "nothing dead-lettered"
    );
    assert!(timeouts >= 2, "{timeouts}");
}
