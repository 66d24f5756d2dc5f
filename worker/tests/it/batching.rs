//! How deliveries become batches while other batches are in flight.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use test_support::events::clerk_user;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(20);

/// Advisory locks that a session waits for in the test's database.
async fn waiting_locks(env: &TestEnv) -> i64 {
    let row = env
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS waiting FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        ))
        .await
        .expect("pg_locks")
        .expect("a count");
    row.try_get("", "waiting").expect("waiting")
}

/// A batch gathers what arrives while another is in flight, but not for long: a batch in flight
/// that waits (here on a user's lock, which another session holds, as `worker rebuild` does)
/// holds up no other event for more than a moment, however few arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_apply_while_a_batch_in_flight_waits_on_a_lock() {
    let env = TestEnv::new().await;
    let holder = env.db().begin().await.expect("a transaction");
    holder
        .execute_unprepared("SELECT pg_advisory_xact_lock(hashtextextended('user_locked', 0))")
        .await
        .expect("the lock");
    let worker = env.start_worker(env.config()).await;
    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_locked", None, None, 100),
    )
    .await;
    eventually(WITHIN, "the locked user's batch waiting", || async {
        waiting_locks(&env).await == 1
    })
    .await;

    // Fewer than a batch, one at a time: each must apply while the first batch still waits.
    for n in 0..3 {
        let id = format!("user_free_{n}");
        env.publish_event(&svix_id(), "user.created", clerk_user(&id, None, None, 100))
            .await;
        eventually(WITHIN, &format!("{id} applied"), || async {
            env.user(&id).await.is_some()
        })
        .await;
    }
    assert!(env.user("user_locked").await.is_none());
    assert_eq!(waiting_locks(&env).await, 1, "the first batch still waits");

    holder.commit().await.expect("the lock released");
    eventually(WITHIN, "the locked user applied", || async {
        env.user("user_locked").await.is_some()
    })
    .await;
    worker.stop().await;
}
