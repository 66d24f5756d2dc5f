//! The broker going away and coming back, without restarting the ingest: a TCP proxy the test
//! controls sits between the ingest and the broker.

use std::time::{Duration, Instant};

use test_support::http::{get, metric};
use test_support::services::closed_port;
use test_support::signing::event_body;
use test_support::{CuttableProxy, TestIngest, eventually};

/// An ingest whose broker connection runs through a proxy the test controls, with a confirm
/// timeout of 1 s, shown to accept an event before the test breaks anything.
async fn spawn_behind_proxy() -> (CuttableProxy, TestIngest) {
    let proxy = CuttableProxy::to_broker().await;
    let url = proxy.amqp_url();
    let app = TestIngest::spawn_with(|settings| {
        settings.amqp_url = Some(url.into());
        settings.ingest_confirm_timeout_ms = 1_000;
    })
    .await;
    assert_eq!(
        app.post_signed(&event_body("user.created", 300))
            .await
            .status,
        200
    );
    (proxy, app)
}

#[actix_web::test]
async fn a_lost_broker_makes_readyz_and_webhooks_503_and_both_recover_when_it_returns() {
    let (proxy, app) = spawn_behind_proxy().await;

    proxy.cut();

    let readyz = format!("{}/readyz", app.address);
    eventually(
        Duration::from_secs(10),
        "readyz to report the broker gone",
        || async { get(&readyz).await.0 == 503 },
    )
    .await;
    for _ in 0..3 {
        let started = Instant::now();
        let answer = app.post_signed(&event_body("user.created", 300)).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.retry_after.as_deref(), Some("5"));
        // Never longer than the confirm timeout (plus slack for a busy machine).
        assert!(
            started.elapsed() < Duration::from_millis(2_500),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        metric(
            &app.metrics_text().await,
            "clerk_sync_ingest_broker_connected"
        ),
        Some(0.0)
    );

    proxy.restore();

    eventually(
        Duration::from_secs(30),
        "readyz to report the broker back",
        || async { get(&readyz).await.0 == 200 },
    )
    .await;
    let answer = app.post_signed(&event_body("user.updated", 300)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // The first event and the one after recovery; nothing from the outage.
    assert_eq!(app.queue_depth().await, 2);
    let text = app.metrics_text().await;
    assert_eq!(
        metric(&text, "clerk_sync_ingest_broker_connected"),
        Some(1.0)
    );
    assert!(
        metric(&text, "clerk_sync_ingest_broker_reconnects_total") >= Some(1.0),
        "{text}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_broker_that_stops_answering_gets_503_within_the_confirm_timeout() {
    let (proxy, app) = spawn_behind_proxy().await;

    proxy.freeze();

    let started = Instant::now();
    let answer = app.post_signed(&event_body("user.created", 300)).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("5"));
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    // The confirm timeout, plus slack for a busy machine: the frozen broker would never answer.
    assert!(waited < Duration::from_millis(2_500), "{waited:?}");
    let text = app.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="broker_unavailable"}"#
        ),
        Some(1.0)
    );

    proxy.restore();

    let answer = app.post_signed(&event_body("user.updated", 300)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // The event answered 503 reached the broker late; Svix's retry would make it a duplicate,
    // which the worker absorbs. Nothing is lost either way.
    eventually(
        Duration::from_secs(10),
        "all three events on the queue",
        || async { app.queue_depth().await == 3 },
    )
    .await;
    app.stop().await;
}

#[actix_web::test]
async fn stopping_does_not_wait_for_a_connection_attempt_that_hangs() {
    let proxy = CuttableProxy::to_broker().await;
    // Connections are accepted but the AMQP handshake never gets an answer.
    proxy.freeze();
    let url = proxy.amqp_url();
    let app = TestIngest::spawn_unready(|settings| settings.amqp_url = Some(url.into())).await;
    let (status, _) = get(&format!("{}/readyz", app.address)).await;
    assert_eq!(status, 503);

    let started = Instant::now();
    app.stop().await;

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// The node `/readyz` names, once the ingest is ready.
async fn ready_node(app: &TestIngest) -> Option<String> {
    let (status, body) = get(&format!("{}/readyz", app.address)).await;
    let body: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| body["node"].as_str().map(str::to_owned))?
}

#[actix_web::test]
async fn with_several_nodes_the_ingest_skips_dead_ones_and_moves_on_when_its_node_is_lost() {
    // Two "nodes" (proxies to the one broker) among two dead ports, in whatever order the
    // ingest's shuffle puts them.
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
    let app = TestIngest::spawn_with(|settings| settings.amqp_url = Some(list.into())).await;
    let node_of = |proxy: &CuttableProxy| format!("127.0.0.1:{}", proxy.port);
    let first = ready_node(&app).await.expect("ready on a live node");
    let (used, other) = if first == node_of(&proxies[0]) {
        (&proxies[0], &proxies[1])
    } else {
        assert_eq!(first, node_of(&proxies[1]), "a live node is in use");
        (&proxies[1], &proxies[0])
    };
    let series = |node: &str| format!("clerk_sync_ingest_broker_node{{node=\"{node}\"}}");
    assert_eq!(
        metric(&app.metrics_text().await, &series(&first)),
        Some(1.0)
    );
    assert_eq!(
        app.post_signed(&event_body("user.created", 300))
            .await
            .status,
        200
    );

    used.cut();
    eventually(
        Duration::from_secs(20),
        "the ingest to be ready on the other live node",
        || async { ready_node(&app).await == Some(node_of(other)) },
    )
    .await;
    let answer = app.post_signed(&event_body("user.created", 300)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let metrics = app.metrics_text().await;
    assert_eq!(metric(&metrics, &series(&node_of(other))), Some(1.0));
    assert_eq!(metric(&metrics, &series(&first)), None, "{metrics}");
    assert_eq!(
        metric(&metrics, "clerk_sync_ingest_broker_reconnects_total"),
        Some(1.0)
    );
    // Both accepted events reached the queue through one node or the other.
    app.next_message().await;
    app.next_message().await;
    app.stop().await;
}
