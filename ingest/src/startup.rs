//! Wiring: builds the application from its configuration, binds the listener, and runs until
//! a stop signal, then closes the broker connection.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use tokio::sync::Semaphore;

use crate::config::IngestConfig;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::routes::{self, AppState};
use crate::signature::Verifier;
use crate::throttle::LogThrottle;

/// How often the warning about the public demo secret repeats while the ingest runs with it.
const DEMO_SECRET_WARNING_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// "Signature rejected" lines written at most per second; the metric counts every rejection.
const REJECTIONS_LOGGED_PER_SECOND: u32 = 5;

/// A built ingest: listening, not yet serving until [`Application::run_until_stopped`].
pub struct Application {
    port: u16,
    server: Server,
    publisher: Publisher,
    metrics: Metrics,
    demo_warning: Option<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Binds `config.listen` (port 0 picks a free port), starts connecting to the broker in the
    /// background, and prepares the HTTP server. Must be called inside a Tokio runtime.
    pub async fn build(config: IngestConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&config.listen)
            .with_context(|| format!("binding INGEST_LISTEN={}", config.listen))?;
        let port = listener
            .local_addr()
            .context("reading the bound address")?
            .port();
        let metrics = Metrics::new().context("creating the metrics")?;
        let verifier = Verifier::new(&config.webhook_secrets)?;
        let publisher = Publisher::start(
            config.amqp_nodes.clone(),
            config.topology.clone(),
            config.publish_channels,
            config.confirm_timeout,
            metrics.clone(),
        );
        let state = web::Data::new(AppState {
            verifier,
            publisher: publisher.clone(),
            metrics: metrics.clone(),
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            body_budget: Semaphore::new(config.body_budget.min(Semaphore::MAX_PERMITS)),
            body_limit: config.body_limit,
            client_timeout: config.client_timeout,
            rejection_log: LogThrottle::new(REJECTIONS_LOGGED_PER_SECOND, Duration::from_secs(1)),
        });

        // A request in progress at shutdown may still be reading its body and then waiting for
        // its confirm; give it that long before the workers are dropped.
        let drain = config.client_timeout + config.confirm_timeout + Duration::from_secs(1);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .route("/api/webhooks", web::post().to(routes::webhook))
                .route("/healthz", web::get().to(routes::healthz))
                .route("/readyz", web::get().to(routes::readyz))
                .route("/metrics", web::get().to(routes::metrics))
                .default_service(web::to(routes::not_found))
        })
        // Slow clients: a request head not complete within this time is answered 408. (The
        // body has its own deadline in the route.) Heads are capped by actix itself at 96
        // headers and 128 KiB, answered 431.
        .client_request_timeout(config.client_timeout)
        // One worker thread by default: each request already crosses to the broker client's
        // own thread and back, and on a few cores more workers add thread hand-offs, not speed.
        .workers(config.workers)
        // actix reads up to ~160 KiB ahead on each connection before a handler can refuse it:
        // bounding the connections bounds that memory under a flood of junk uploads.
        .max_connections(config.max_connections)
        .shutdown_timeout(drain.as_secs().max(1))
        // SIGINT and SIGTERM both drain gracefully (actix treats SIGINT as a hard stop).
        .shutdown_signal(stop_signal())
        .listen(listener)
        .context("listening")?
        .run();

        let demo_warning = config
            .demo_secret
            .then(|| tokio::spawn(warn_about_the_demo_secret()));

        Ok(Self {
            port,
            server,
            publisher,
            metrics,
            demo_warning,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The application's metrics (its own registry).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// A handle that stops the server (gracefully with `stop(true)`), for tests and embedders.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT (or [`Application::handle`]'s `stop`): stops accepting, lets
    /// requests in progress finish (each confirmed or answered 503), then closes the broker
    /// connection.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let served = self.server.await.context("serving HTTP");
        if let Some(warning) = self.demo_warning {
            warning.abort();
        }
        self.publisher.close().await;
        tracing::info!("ingest stopped");
        served
    }
}

/// Warns now and every few minutes: anyone can sign events with the public demo secret.
async fn warn_about_the_demo_secret() {
    let mut every = tokio::time::interval(DEMO_SECRET_WARNING_INTERVAL);
    loop {
        every.tick().await;
        tracing::warn!(
            "CLERK_WEBHOOK_SECRET is the public demo secret of docker-compose.yml: anyone can \
             sign events for this ingest. Set your endpoint's signing secret in .env before the \
             ingest is reachable from another machine"
        );
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received; draining"),
                _ = interrupt.recv() => tracing::info!("SIGINT received; draining"),
            }
        }
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "cannot listen for stop signals; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
