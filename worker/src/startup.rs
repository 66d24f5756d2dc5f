//! Wiring: [`Application::build`] connects, migrates and binds; [`Application::run_until_stopped`]
//! consumes until [`StopHandle::stop`] is called, reconnecting to the broker whenever it is lost.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use secrecy::ExposeSecret;
use tokio::sync::watch;

use crate::config::WorkerConfig;
use crate::consumer::{self, End, Handler, Stop};
use crate::dead_letter::DeadLetters;
use crate::http::{self, BrokerState};
use crate::metrics::Metrics;

/// Any number fixed for the project: the advisory lock that keeps two workers starting at once
/// from running the migrations side by side.
const MIGRATION_LOCK: i64 = 0x636c_6572_6b73_796e; // "clerksyn"

/// Stops a running [`Application`]: it stops consuming, finishes what is in flight and returns.
#[derive(Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// A worker, connected to the database, migrated, with its health server bound.
pub struct Application {
    config: WorkerConfig,
    db: DatabaseConnection,
    metrics: Metrics,
    broker: Arc<BrokerState>,
    server: actix_web::dev::Server,
    port: u16,
    stop: Arc<watch::Sender<bool>>,
}

impl Application {
    /// Connects to the database, applies pending migrations (unless configured not to) and binds
    /// the health server. The broker is connected by [`Application::run_until_stopped`], which
    /// keeps retrying while it is down.
    pub async fn build(config: WorkerConfig) -> anyhow::Result<Self> {
        let metrics = Metrics::new().context("cannot register the metrics")?;
        let db = connect_database(&config, config.db_pool_size + 1)
            .await
            .context("cannot connect to the database (DATABASE_URL)")?;
        if config.run_migrations {
            migrate(&config)
                .await
                .context("cannot apply the migrations")?;
        }
        let listener = TcpListener::bind(config.listen)
            .with_context(|| format!("cannot listen on {} (WORKER_LISTEN)", config.listen))?;
        let port = listener.local_addr()?.port();
        let broker = Arc::new(BrokerState::default());
        let server = http::serve(listener, db.clone(), broker.clone(), metrics.clone())
            .context("cannot start the health server")?;
        let (stop, _) = watch::channel(false);
        Ok(Self {
            config,
            db,
            metrics,
            broker,
            server,
            port,
            stop: Arc::new(stop),
        })
    }

    /// The port of the health and metrics server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The metrics this worker exports.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A handle that stops the worker from anywhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Consumes until stopped: connects to the broker (retrying with back-off while it is down),
    /// declares the topology and consumes; when the connection is lost, waits for the work in
    /// flight and connects again.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let server = self.server.handle();
        let server_task = tokio::spawn(self.server);
        let mut stop = Stop(self.stop.subscribe());
        let mut failures = 0;
        while !stop.requested() {
            match open_broker(&self.config).await {
                Ok((connection, channel, dead)) => {
                    failures = 0;
                    self.broker.set(Some(channel.clone()));
                    tracing::info!(queue = %self.config.topology.queue, "consuming");
                    let handler = Handler {
                        db: self.db.clone(),
                        metrics: self.metrics.clone(),
                        config: self.config.clone(),
                        dead,
                        stop: stop.clone(),
                    };
                    let end = consumer::consume(&channel, handler).await;
                    self.broker.set(None);
                    if let Err(error) = connection.close(200, "worker stopping".into()).await {
                        tracing::debug!(%error, "closing the broker connection");
                    }
                    match end {
                        End::Stopped => break,
                        End::Lost(reason) => {
                            tracing::warn!(%reason, "lost the broker; reconnecting");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot use the broker; retrying"
                    );
                }
            }
            failures += 1;
            if !stop.sleep(self.config.backoff.delay(failures)).await {
                break;
            }
        }
        tracing::info!("stopped consuming; everything in flight is done");
        server.stop(true).await;
        let _ = server_task.await;
        self.db.close().await.context("closing the database pool")?;
        Ok(())
    }
}

async fn connect_database(
    config: &WorkerConfig,
    pool_size: u32,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = ConnectOptions::new(config.database_url.expose_secret());
    options
        .max_connections(pool_size)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        // Statements are not logged one by one; errors are logged where they are handled.
        .sqlx_logging(false);
    Database::connect(options).await
}

/// Applies pending migrations under a session advisory lock, on a connection of its own.
async fn migrate(config: &WorkerConfig) -> anyhow::Result<()> {
    let db = connect_database(config, 1).await?;
    db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .await?;
    let result = Migrator::up(&db, None).await;
    // Closing the only connection releases the lock whatever happened.
    db.close().await?;
    result?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn open_broker(config: &WorkerConfig) -> anyhow::Result<(Connection, Channel, DeadLetters)> {
    // No automatic recovery: a lost connection ends the consumer, the worker finishes what it
    // holds and connects afresh, which is simpler to reason about than a recovered channel.
    let connection = Connection::connect(
        config.amqp_url.expose_secret(),
        ConnectionProperties::default(),
    )
    .await
    .context("cannot connect to the broker (AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    config
        .topology
        .declare(&channel)
        .await
        .context("cannot declare the topology")?;
    channel
        .basic_qos(
            config.prefetch,
            BasicQosOptions {
                // Per consumer, not per channel.
                global: false,
            },
        )
        .await?;
    let dead = DeadLetters::open(&connection, &config.topology.dead_queue).await?;
    Ok((connection, channel, dead))
}
