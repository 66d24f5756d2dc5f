//! What the clerk-sync tests share. A dev-dependency of the other crates (and a dependency of the
//! fault suite, a test tool itself): nothing here is ever part of a shipped binary.
//!
//! - [`services`]: where the shared Postgres and RabbitMQ are (`DATABASE_URL`, `AMQP_URL`).
//! - [`TestDatabase`]: a fresh database, migrated or not, dropped on drop.
//! - [`TestTopology`] and [`BrokerChannel`]: fresh exchange and queue names, deleted on drop, and
//!   a confirming channel to publish and look at queues.
//! - [`TestIngest`] and [`TestEnv`] / [`TestWorker`]: the services running in the test's process
//!   on port 0, built by their own `Application::build`.
//! - [`signing`] and [`events`]: signed requests and Clerk-shaped events.
//! - [`CuttableProxy`]: a TCP proxy the test cuts, freezes and restores.
//! - [`http`]: an HTTP client, and [`http::metric`] to read a Prometheus series.
//! - [`http_load`]: a release `ingest` process and a minimal keep-alive client to load it, for
//!   the benchmarks.
//! - [`eventually`]: poll a condition with a deadline instead of sleeping.
//! - [`clerk_api`]: a stand-in for Clerk's Backend API, for `worker reconcile`.
//! - [`otlp`]: a real OTLP/HTTP trace receiver that keeps what it gets, and can stall.
//! - [`proc_stats`]: CPU time, peak memory and load from `/proc`, for the benchmarks.
//! - [`private_postgres`]: a Postgres cluster of the test's own, with default settings, that the
//!   test may stop (the fault suite uses it too).
//! - [`scale`]: the repair commands at scale beside live events, for the scale bench and its
//!   short form.

pub mod broker;
pub mod clerk_api;
pub mod database;
pub mod events;
pub mod http;
pub mod http_load;
pub mod ingest;
pub mod otlp;
pub mod private_postgres;
pub mod proc_stats;
pub mod proxy;
pub mod rows;
pub mod scale;
pub mod services;
pub mod signing;
pub mod worker;

use std::future::Future;
use std::time::{Duration, Instant};

pub use broker::{BrokerChannel, TestTopology};
pub use database::TestDatabase;
pub use ingest::TestIngest;
pub use proxy::CuttableProxy;
pub use services::{amqp_url, database_url};
pub use worker::{TestEnv, TestWorker};

/// Polls `condition` until it holds, failing the test with `what` once `within` has passed.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `cleanup` to completion on a thread and runtime of its own. `Drop` cannot await, and it
/// runs inside the test's runtime, or while a failed test unwinds.
pub(crate) fn block_on_own_runtime<F>(cleanup: F) -> std::thread::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("clean-up runtime");
        runtime.block_on(cleanup);
    })
    .join()
}
