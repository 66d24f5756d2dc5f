//! The worker: consumes Clerk events from RabbitMQ and applies them to Postgres, so the `users`,
//! `organizations` and `organization_memberships` tables end equal to what Clerk holds whatever
//! the order and number of deliveries.
//!
//! [`Application::build`] returns a runnable worker (tests start several in one process);
//! [`run`] is what the binary calls; [`reconcile::execute`] is `worker reconcile`.
//!
//! The layout (docs/architecture.md draws it), every import pointing one way:
//! - the door: [`apply`] (reading events, the rules, the locks, the error classes, the history
//!   writer) over [`storage`] (the entities);
//! - the sources that hand it events: `consumer` (the queue, with `acks` and [`dead_letter`]),
//!   [`reconcile`] (Clerk's Backend API through [`clerk`]), [`history`] (`replay`, `rebuild`,
//!   and the read-only `explain` and `events`), [`on_demand`] (the authenticated API that syncs
//!   one user or organization now, through the same client);
//! - around them, the commands' scaffolding ([`commands`]: pools, summaries, progress) and the
//!   service's wiring (`startup`, [`config`], `database`, `http`, `depth`, `prune`, [`metrics`],
//!   `stop`).

mod acks;
pub mod apply;
pub mod clerk;
pub mod commands;
pub mod config;
mod consumer;
mod database;
pub mod dead_letter;
mod delivery;
mod depth;
pub mod doctor;
pub mod exit;
pub mod history;
mod http;
pub mod instance;
pub mod metrics;
pub mod on_demand;
pub mod pin;
mod prune;
pub mod reconcile;
mod startup;
mod stop;
pub mod storage;
mod trace;

pub use apply::{ApplyError, Outcome};
pub use config::WorkerConfig;
pub use startup::{Application, StopHandle};

use anyhow::Context as _;

/// Runs the worker until SIGTERM or SIGINT, then stops consuming, finishes and acknowledges what
/// is in flight, and returns. While the database or the broker is unreachable it waits for them
/// (a signal meanwhile returns at once); a malformed setting returns an error before anything.
pub async fn run(settings: shared::Settings) -> anyhow::Result<()> {
    let config = WorkerConfig::from_settings(&settings)?;
    // Listening before anything else, so a signal while the worker waits for the database or the
    // broker ends it at once.
    let signals = wait_for_signal()
        .await
        .context("cannot listen for signals")?;
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "worker started");
    let stop = app.stop_handle();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("stop requested");
        stop.stop();
    });
    app.run_until_stopped().await
}

/// Registers SIGTERM and SIGINT now (so none is missed), returning a future of the first one.
pub(crate) async fn wait_for_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[cfg(test)]
mod module_graph;
