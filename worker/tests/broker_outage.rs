//! The broker going away: the worker reconnects by itself, dead-letters nothing, and applies
//! everything once the broker is back.

use std::time::Duration;

use test_support::events::clerk_user;
use test_support::signing::svix_id;
use test_support::{CuttableProxy, TestEnv, eventually};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_outage_the_worker_reconnects_and_applies_everything() {
    let env = TestEnv::new().await;
    let proxy = CuttableProxy::to_broker().await;
    let mut config = env.config();
    config.amqp_url = proxy.amqp_url().into();
    let worker = env.start_worker(config).await;
    eventually(WITHIN, "ready", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;

    let publish = |range: std::ops::Range<usize>| {
        let env = &env;
        async move {
            for n in range {
                env.publish_event(
                    &svix_id(),
                    "user.created",
                    clerk_user(&format!("user_{n}"), None, None, 100),
                )
                .await;
            }
        }
    };
    publish(0..10).await;
    eventually(WITHIN, "the first ten", || async {
        env.processed_count().await == 10
    })
    .await;

    proxy.cut();
    eventually(WITHIN, "not ready without the broker", || async {
        worker.get("/readyz").await.0 == 503
    })
    .await;
    // Published straight to the broker while the worker cannot reach it.
    publish(10..30).await;
    proxy.restore();

    eventually(WITHIN, "all thirty", || async {
        env.processed_count().await == 30
    })
    .await;
    eventually(WITHIN, "ready again", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
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
