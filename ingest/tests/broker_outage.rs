//! The broker going away and coming back, without restarting the ingest: a TCP proxy the test
//! controls sits between the ingest and the broker.

use std::time::{Duration, Instant};

use test_support::http::{get, metric};
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
