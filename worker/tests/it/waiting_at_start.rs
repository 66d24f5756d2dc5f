//! A worker started while the database or the broker is unreachable waits for it (alive, not
//! ready, consuming nothing), then becomes ready and applies what waited in the queue.

use std::time::Duration;

use test_support::events::clerk_user;
use test_support::signing::svix_id;
use test_support::{CuttableProxy, TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_database_waits_then_becomes_ready_and_applies_the_queue() {
    let env = TestEnv::new().await;
    let proxy = CuttableProxy::to_database(env.db_url()).await;
    proxy.cut();
    let mut config = env.config();
    config.database_url = proxy.database_url(env.db_url()).into();
    let event = svix_id();
    env.publish_event(
        &event,
        "user.created",
        clerk_user("user_a", None, None, 100),
    )
    .await;

    let worker = env.start_worker(config).await;
    eventually(WITHIN, "the worker retrying the database", || async {
        proxy.refused() >= 3
    })
    .await;
    assert_eq!(worker.get("/healthz").await.0, 200, "alive while waiting");
    let (status, body) = worker.get("/readyz").await;
    assert_eq!(status, 503, "not ready while waiting: {body}");
    assert!(body.contains(r#""database":false"#), "{body}");
    assert_eq!(
        env.ready(&env.topology.queue).await,
        1,
        "nothing consumed before the database is there"
    );

    proxy.restore();
    eventually(WITHIN, "ready once the database is reachable", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    eventually(WITHIN, "the waiting event applied", || async {
        env.processed(&event).await.is_some()
    })
    .await;
    worker.stop().await;
    assert_eq!(
        env.processed(&event).await.expect("processed").outcome,
        "applied"
    );
    assert!(env.user("user_a").await.is_some(), "the user is stored");
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_broker_waits_then_becomes_ready_and_applies_the_queue() {
    let env = TestEnv::new().await;
    let proxy = CuttableProxy::to_broker().await;
    proxy.cut();
    let mut config = env.config();
    config.amqp_nodes = shared::AmqpNodes::parse(&proxy.amqp_url()).expect("proxy URL");
    let event = svix_id();
    env.publish_event(
        &event,
        "user.created",
        clerk_user("user_a", None, None, 100),
    )
    .await;

    let worker = env.start_worker(config).await;
    eventually(WITHIN, "the worker retrying the broker", || async {
        proxy.refused() >= 3
    })
    .await;
    assert_eq!(worker.get("/healthz").await.0, 200, "alive while waiting");
    let (status, body) = worker.get("/readyz").await;
    assert_eq!(status, 503, "not ready while waiting: {body}");
    assert!(body.contains(r#""broker":false"#), "{body}");
    assert_eq!(env.ready(&env.topology.queue).await, 1, "nothing consumed");

    proxy.restore();
    eventually(WITHIN, "ready once the broker is reachable", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    eventually(WITHIN, "the waiting event applied", || async {
        env.processed(&event).await.is_some()
    })
    .await;
    worker.stop().await;
    assert!(env.user("user_a").await.is_some(), "the user is stored");
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "nothing dead-lettered"
    );
}
