//! Health and metrics on `WORKER_LISTEN`: `/healthz` (alive), `/readyz` (database and broker
//! usable, no delivery held longer than `WORKER_STALLED_AFTER`; the body also names the pinned
//! Clerk instance), `/metrics` (Prometheus text); and the on-demand sync API
//! ([`crate::on_demand::api`]) when it has no address of its own.

use std::net::TcpListener;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use lapin::Channel;
use sea_orm::DatabaseConnection;
use serde_json::json;

use crate::metrics::Metrics;
use crate::on_demand::api::{self, Api};

/// The consuming channel and its broker node (`host:port`) while there is one; `/readyz` asks
/// the channel whether it is connected.
#[derive(Default)]
pub(crate) struct BrokerState(RwLock<Option<(Channel, String)>>);

impl BrokerState {
    pub(crate) fn set(&self, channel: Option<(Channel, String)>) {
        match self.0.write() {
            Ok(mut slot) => *slot = channel,
            Err(poisoned) => *poisoned.into_inner() = channel,
        }
    }

    /// The node in use, when the consuming channel is connected.
    fn usable_node(&self) -> Option<String> {
        let slot = match self.0.read() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        slot.as_ref()
            .filter(|(channel, _)| channel.status().connected())
            .map(|(_, node)| node.clone())
    }
}

struct Probe {
    db: DatabaseConnection,
    broker: Arc<BrokerState>,
    metrics: Metrics,
    stalled_after: Duration,
}

/// Starts the server on `listener` (bound by the caller, so tests can pass port 0). Signals are
/// left to the worker, which stops the server itself.
pub(crate) fn serve(
    listener: TcpListener,
    db: DatabaseConnection,
    broker: Arc<BrokerState>,
    metrics: Metrics,
    stalled_after: Duration,
    on_demand: Option<web::Data<Api>>,
) -> std::io::Result<Server> {
    let probe = web::Data::new(Probe {
        db,
        broker,
        metrics,
        stalled_after,
    });
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(probe.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(render_metrics))
            .configure(|config| {
                if let Some(on_demand) = &on_demand {
                    api::routes(config, on_demand.clone());
                }
            })
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)?
    .run())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(probe: web::Data<Probe>) -> HttpResponse {
    let database = matches!(
        tokio::time::timeout(Duration::from_secs(2), probe.db.ping()).await,
        Ok(Ok(()))
    );
    // Shown, not judged: nothing pinned yet is a normal start.
    let instance = match database {
        true => tokio::time::timeout(
            Duration::from_secs(2),
            crate::pin::pinned_instance(&probe.db),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .flatten(),
        false => None,
    };
    let node = probe.broker.usable_node();
    let broker = node.is_some();
    // A delivery held longer than WORKER_STALLED_AFTER means the pipeline is stuck somewhere
    // (a retry that never ends, a broker that takes no acknowledgement): say so.
    let oldest = probe.metrics.held.oldest().unwrap_or_default();
    let stalled = oldest > probe.stalled_after;
    let body = json!({
        "database": database,
        "broker": broker,
        "stalled": stalled,
        "oldest_unacked_seconds": oldest.as_secs(),
        "node": node,
        "instance": crate::pin::as_json(instance.as_ref()),
    });
    if database && broker && !stalled {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn render_metrics(probe: web::Data<Probe>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(probe.metrics.render())
}
