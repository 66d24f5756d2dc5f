//! The broker going away: the worker reconnects by itself, dead-letters nothing, and applies
//! everything once the broker is back.

use std::time::Duration;

use test_support::events::clerk_user;
use test_support::services::closed_port;
use test_support::signing::svix_id;
use test_support::{CuttableProxy, TestEnv, TestWorker, eventually};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_outage_the_worker_reconnects_and_applies_everything() {
    let env = TestEnv::new().await;
    let proxy = CuttableProxy::to_broker().await;
    let mut config = env.config();
    config.amqp_nodes = shared::AmqpNodes::parse(&proxy.amqp_url()).expect("proxy URL");
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

/// The node `/readyz` names, once it is ready.
async fn ready_node(worker: &TestWorker) -> Option<String> {
    let (status, body) = worker.get("/readyz").await;
    let body: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| body["node"].as_str().map(str::to_owned))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_nodes_the_worker_skips_dead_ones_and_moves_on_when_its_node_is_lost() {
    let env = TestEnv::new().await;
    // Two "nodes" (proxies to the one broker) among two dead ports, in whatever order the
    // worker's shuffle puts them.
    let proxies = [
        CuttableProxy::to_broker().await,
        CuttableProxy::to_broker().await,
    ];
    let list = [
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()),
        proxies[0].amqp_url(),
        proxies[1].amqp_url(),
    ]
    .join(",");
    let mut config = env.config();
    config.amqp_nodes = shared::AmqpNodes::parse(&list).expect("node list");
    let worker = env.start_worker(config).await;
    let node_of = |proxy: &CuttableProxy| format!("127.0.0.1:{}", proxy.port);
    eventually(WITHIN, "ready on one of the live nodes", || async {
        ready_node(&worker).await.is_some()
    })
    .await;
    let first = ready_node(&worker).await.expect("a node");
    let (used, other) = if first == node_of(&proxies[0]) {
        (&proxies[0], &proxies[1])
    } else {
        assert_eq!(first, node_of(&proxies[1]), "a live node is in use");
        (&proxies[1], &proxies[0])
    };
    let metrics = worker.get("/metrics").await.1;
    assert!(
        metrics.contains(&format!(
            "clerk_sync_worker_broker_node{{node=\"{first}\"}} 1"
        )),
        "{metrics}"
    );

    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_a", None, None, 100),
    )
    .await;
    eventually(WITHIN, "the first event", || async {
        env.processed_count().await == 1
    })
    .await;

    used.cut();
    eventually(WITHIN, "ready on the other live node", || async {
        ready_node(&worker).await == Some(node_of(other))
    })
    .await;
    env.publish_event(
        &svix_id(),
        "user.created",
        clerk_user("user_b", None, None, 100),
    )
    .await;
    eventually(WITHIN, "the second event", || async {
        env.processed_count().await == 2
    })
    .await;
    let metrics = worker.get("/metrics").await.1;
    assert!(
        !metrics.contains(&format!("node=\"{first}\"")),
        "the lost node is no longer reported: {metrics}"
    );
    worker.stop().await;
}
