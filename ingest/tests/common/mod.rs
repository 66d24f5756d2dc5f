//! Test support: an ingest on port 0 with its own exchange and queue names, signed requests,
//! a broker connection to look at the queue, and a TCP proxy that can cut the broker off.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use ingest::signature::Verifier;
use ingest::{Application, IngestConfig};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::SecretString;
use shared::{Settings, Topology};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
pub const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Settings for a test ingest: port 0 on loopback, fresh topology names.
pub fn settings(topology: &Topology) -> Settings {
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

/// Fresh names for one test.
pub fn fresh_topology() -> Topology {
    Topology::prefixed(&format!("test-{}", uuid::Uuid::new_v4().simple()))
}

/// A running ingest and a channel of the test's own on the same broker.
pub struct TestApp {
    pub address: String,
    pub topology: Topology,
    pub channel: Channel,
    pub application_metrics: ingest::metrics::Metrics,
    handle: ServerHandle,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _connection: Connection,
    _cleanup: Cleanup,
}

impl TestApp {
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
        let topology = fresh_topology();
        let cleanup = Cleanup(topology.clone());
        let mut settings = settings(&topology);
        adjust(&mut settings);
        let config = IngestConfig::from_settings(&settings).expect("test configuration");
        let application = Application::build(config).await.expect("build");
        let address = format!("http://127.0.0.1:{}", application.port());
        let handle = application.handle();
        let application_metrics = application.metrics();
        let server = tokio::spawn(application.run_until_stopped());
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test connection to the broker");
        let channel = connection.create_channel().await.expect("test channel");
        Self {
            address,
            topology,
            channel,
            application_metrics,
            handle,
            server,
            _connection: connection,
            _cleanup: cleanup,
        }
    }

    pub fn webhook_url(&self) -> String {
        format!("{}/api/webhooks", self.address)
    }

    pub async fn wait_until_ready(&self) {
        let url = format!("{}/readyz", self.address);
        eventually(
            "the ingest to become ready",
            Duration::from_secs(20),
            || async { get(&url).await.0 == 200 },
        )
        .await;
    }

    /// POSTs a signed body and returns status, `Retry-After` and the answer's body.
    pub async fn post_signed(&self, body: &str) -> Answer {
        post(&self.webhook_url(), &signed_headers(body), body.as_bytes()).await
    }

    /// Takes the next message off the test's worker queue, waiting for it a little.
    pub async fn next_message(&self) -> BasicGetMessage {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self
                .channel
                .basic_get(
                    self.topology.queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            if let Some(message) = got {
                return message;
            }
            assert!(Instant::now() < deadline, "no message arrived on the queue");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Messages now in the worker queue, by a passive declare.
    pub async fn queue_depth(&self) -> u32 {
        let queue = self
            .channel
            .queue_declare(
                self.topology.queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("passive declare");
        queue.message_count()
    }

    pub async fn metrics_text(&self) -> String {
        get(&format!("{}/metrics", self.address)).await.1
    }

    /// Stops the server gracefully and waits for the publisher to close.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        let server = self.server;
        server.await.expect("server task").expect("server result");
    }
}

/// Deletes a test's exchange and queues when dropped, even when the test failed.
pub struct Cleanup(pub Topology);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let topology = self.0.clone();
        // Drop cannot await, and the test's runtime may be shutting down: use a runtime of its own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(delete_topology(&topology));
        })
        .join();
        if cleaned.is_err() {
            eprintln!("could not clean up test topology {}", self.0.exchange);
        }
    }
}

pub async fn delete_topology(topology: &Topology) {
    let Ok(connection) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
    else {
        eprintln!("cleanup: broker unreachable");
        return;
    };
    for queue in [&topology.queue, &topology.dead_queue] {
        // Each on a fresh channel: a failure closes the channel it happened on.
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .exchange_delete(
                topology.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = connection.close(200, "cleanup done".into()).await;
}

/// A verifier holding `SECRET`, for signing.
pub fn signer(secret: &str) -> Verifier {
    Verifier::new(&[SecretString::from(secret)]).expect("secret")
}

/// svix-* headers for `body`, signed now with `SECRET` and a fresh id.
pub fn signed_headers(body: &str) -> Vec<(String, String)> {
    signed_headers_with(
        SECRET,
        ["svix-id", "svix-timestamp", "svix-signature"],
        body,
    )
}

/// Headers with the given names, signed now with `secret` and a fresh id.
pub fn signed_headers_with(secret: &str, names: [&str; 3], body: &str) -> Vec<(String, String)> {
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let timestamp = chrono::Utc::now().timestamp();
    let signature = signer(secret)
        .sign(&id, timestamp, body.as_bytes())
        .expect("sign");
    vec![
        (names[0].into(), id),
        (names[1].into(), timestamp.to_string()),
        (names[2].into(), signature),
    ]
}

/// A user event body of about `size` bytes.
pub fn event_body(event_type: &str, size: usize) -> String {
    let id = uuid::Uuid::new_v4().simple();
    let head = format!(
        r#"{{"type":"{event_type}","object":"event","data":{{"id":"user_{id}","padding":""#
    );
    let tail = r#""}}"#;
    let padding = "x".repeat(size.saturating_sub(head.len() + tail.len()));
    format!("{head}{padding}{tail}")
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("JSON answer: {self:?}"))
    }
}

pub async fn post(url: &str, headers: &[(String, String)], body: &[u8]) -> Answer {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let mut request = client
        .post(url)
        .insert_header(("content-type", "application/json"));
    for (name, value) in headers {
        request = request.insert_header((name.as_str(), value.as_str()));
    }
    let mut response = request
        .send_body(body.to_vec())
        .await
        .unwrap_or_else(|error| panic!("POST {url}: {error}"));
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let answer = response
        .body()
        .limit(1 << 20)
        .await
        .unwrap_or_else(|error| panic!("answer body: {error}"));
    Answer {
        status: response.status().as_u16(),
        retry_after,
        body: String::from_utf8_lossy(&answer).into_owned(),
    }
}

pub async fn get(url: &str) -> (u16, String) {
    let client = awc::Client::default();
    match client.get(url).send().await {
        Ok(mut response) => {
            let body = response.body().await.unwrap_or_default();
            (
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
        Err(error) => (0, error.to_string()),
    }
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric line such as `clerk_sync_ingest_requests_total{outcome="accepted"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// A TCP proxy in front of the broker that the test can cut (dropping every connection and
/// refusing new ones), freeze (keeping connections open but forwarding nothing, like a broker
/// that stopped answering), and restore.
pub struct Proxy {
    pub port: u16,
    state: watch::Sender<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyState {
    Open,
    Frozen,
    Cut,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, watcher) = watch::channel(ProxyState::Open);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if *watcher.borrow() == ProxyState::Cut {
                    drop(inbound);
                    continue;
                }
                let watcher = watcher.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (from_client, to_client) = inbound.into_split();
                    let (from_broker, to_broker) = outbound.into_split();
                    let mut cut = watcher.clone();
                    tokio::select! {
                        () = pump(from_client, to_broker, watcher.clone()) => {}
                        () = pump(from_broker, to_client, watcher) => {}
                        _ = cut.wait_for(|state| *state == ProxyState::Cut) => {}
                    }
                });
            }
        });
        Self { port, state, task }
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.state.send_replace(ProxyState::Cut);
    }

    /// Keeps the connections but forwards nothing until restored.
    pub fn freeze(&self) {
        self.state.send_replace(ProxyState::Frozen);
    }

    pub fn restore(&self) {
        self.state.send_replace(ProxyState::Open);
    }

    /// An AMQP URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// Copies one direction, holding the data back while frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if state
            .wait_for(|state| *state == ProxyState::Open)
            .await
            .is_err()
        {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// The broker's address, from `AMQP_URL`.
pub fn broker_address() -> SocketAddr {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL");
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        uri.authority.host.clone()
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .expect("broker address")
}
