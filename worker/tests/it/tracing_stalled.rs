//! A trace collector that takes requests and never answers costs the pipeline nothing but spans:
//! every webhook is still answered 200 and every event applied and acknowledged, the spans
//! waiting for export never exceed the queue's bound (the rest are dropped and counted on
//! `/metrics`), and the flush at shutdown gives up within its bound.
//!
//! In a process of its own ([`in_a_process_of_its_own`]): the process's subscriber exports to
//! the stalled receiver, and the queue's gauge and the dropped-spans counter are the process's.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use test_support::events::{clerk_user, envelope};
use test_support::http::metric;
use test_support::otlp::{OtlpReceiver, in_a_process_of_its_own, install_tracing};
use test_support::{TestEnv, TestIngest, eventually};

/// Spans the export queue holds at most in this test.
const QUEUE: usize = 64;
/// Each export, and the flush at shutdown, gives up after about this long.
const EXPORT_TIMEOUT: Duration = Duration::from_millis(500);
const EVENTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_bounds_the_queued_spans_and_delays_no_answer_or_ack() {
    if !in_a_process_of_its_own(
        "tracing_stalled::a_stalled_collector_bounds_the_queued_spans_and_delays_no_answer_or_ack",
    ) {
        return;
    }
    let receiver = OtlpReceiver::start();
    receiver.stall(true);
    let telemetry = install_tracing(receiver.endpoint(), QUEUE, EXPORT_TIMEOUT);
    assert!(telemetry.is_on());

    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let topology = env.topology.topology.clone();
    let ingest = TestIngest::spawn_with(move |settings| {
        settings.amqp_exchange = topology.exchange;
        settings.amqp_queue = topology.queue;
        settings.amqp_dead_queue = topology.dead_queue;
    })
    .await;

    // The most spans seen waiting for export while the events go through.
    let most_queued = Arc::new(AtomicI64::new(0));
    let watching = {
        let most_queued = most_queued.clone();
        tokio::spawn(async move {
            loop {
                most_queued.fetch_max(shared::telemetry::spans_queued(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(20) {
        let answers = join_all(chunk.iter().map(|n| {
            let body = envelope(
                "user.created",
                clerk_user(&format!("user_stall_{n}"), None, None, 1_700_000_000_000),
            )
            .to_string();
            let ingest = &ingest;
            async move { ingest.post_signed(&body).await.status }
        }))
        .await;
        assert!(answers.iter().all(|status| *status == 200), "{answers:?}");
    }
    eventually(
        Duration::from_secs(60),
        "every event applied and acknowledged",
        || async {
            env.processed_count().await == EVENTS as u64
                && env.ready(&env.topology.queue).await == 0
        },
    )
    .await;
    watching.abort();

    assert!(
        receiver.requests() >= 1,
        "the exporter reached the stalled collector"
    );
    let most = most_queued.load(Ordering::Relaxed);
    assert!(most <= QUEUE as i64, "{most} spans queued, over {QUEUE}");
    let dropped = metric(
        &ingest.metrics_text().await,
        "clerk_sync_trace_spans_dropped_total",
    )
    .expect("the dropped-spans series");
    assert!(
        dropped > 0.0,
        "spans over the bound are dropped and counted"
    );
    assert_eq!(receiver.spans().len(), 0, "the collector answered nothing");

    // The flush cannot reach the collector: it gives up within its bound.
    tokio::time::timeout(
        EXPORT_TIMEOUT * 4 + Duration::from_secs(5),
        telemetry.shutdown(),
    )
    .await
    .expect("the flush at shutdown is bounded");

    ingest.stop().await;
    worker.stop().await;
    // Anything left unacknowledged would be back in the queue once the worker's channel closed.
    assert_eq!(
        env.ready(&env.topology.queue).await,
        0,
        "every delivery acknowledged"
    );
}
