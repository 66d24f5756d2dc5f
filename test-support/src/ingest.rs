//! An ingest running in the test's process on port 0, with its own exchange and queue names.

use std::time::Duration;

use actix_web::dev::ServerHandle;
use lapin::message::Delivery;
use shared::Settings;

use crate::broker::{BrokerChannel, TestTopology};
use crate::http::{Answer, get, post};
use crate::services::amqp_url;
use crate::signing::{SECRET, signed_headers};

/// Settings for a test ingest: [`SECRET`], port 0 on loopback, the topology's names.
pub fn ingest_settings(topology: &TestTopology) -> Settings {
    Settings {
        clerk_webhook_secret: Some(SECRET.into()),
        amqp_url: Some(amqp_url().into()),
        amqp_exchange: topology.exchange.clone(),
        amqp_queue: topology.queue.clone(),
        amqp_dead_queue: topology.dead_queue.clone(),
        ingest_listen: "127.0.0.1:0".into(),
        ingest_confirm_timeout_ms: 2_000,
        ..Settings::default()
    }
}

/// A running ingest, a channel of the test's own on the same broker, and its topology, deleted
/// when this is dropped.
pub struct TestIngest {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    pub broker: BrokerChannel,
    /// The application's own metrics, to read without HTTP.
    pub application_metrics: ingest::metrics::Metrics,
    handle: ServerHandle,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    // Last: deleted after the channel above is closed.
    pub topology: TestTopology,
}

impl TestIngest {
    /// Starts an ingest with the default test settings and waits until it is ready.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts an ingest with adjusted settings and waits until it is ready.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let app = Self::spawn_unready(adjust).await;
        app.wait_until_ready().await;
        app
    }

    /// Starts an ingest without waiting for the broker.
    pub async fn spawn_unready(adjust: impl FnOnce(&mut Settings)) -> Self {
        let topology = TestTopology::names();
        let mut settings = ingest_settings(&topology);
        adjust(&mut settings);
        let config = ingest::IngestConfig::from_settings(&settings).expect("test configuration");
        let application = ingest::Application::build(config)
            .await
            .expect("the ingest builds");
        let address = format!("http://127.0.0.1:{}", application.port());
        let handle = application.handle();
        let application_metrics = application.metrics();
        let server = tokio::spawn(application.run_until_stopped());
        Self {
            address,
            broker: BrokerChannel::open().await,
            application_metrics,
            handle,
            server,
            topology,
        }
    }

    /// `…/api/webhooks`.
    pub fn webhook_url(&self) -> String {
        format!("{}/api/webhooks", self.address)
    }

    /// Waits (up to 20 s) until `/readyz` answers 200.
    pub async fn wait_until_ready(&self) {
        let url = format!("{}/readyz", self.address);
        crate::eventually(
            Duration::from_secs(20),
            "the ingest to become ready",
            || async { get(&url).await.0 == 200 },
        )
        .await;
    }

    /// POSTs `body` signed with [`SECRET`] now.
    pub async fn post_signed(&self, body: &str) -> Answer {
        post(&self.webhook_url(), &signed_headers(body), body.as_bytes()).await
    }

    /// Takes the next message off the worker queue, waiting for it a little.
    pub async fn next_message(&self) -> Delivery {
        self.broker.next(&self.topology.queue).await
    }

    /// Messages now in the worker queue.
    pub async fn queue_depth(&self) -> u32 {
        self.broker.ready(&self.topology.queue).await
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        get(&format!("{}/metrics", self.address)).await.1
    }

    /// Stops the server gracefully and waits for the publisher to close.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        self.server
            .await
            .expect("server task")
            .expect("server result");
    }
}
