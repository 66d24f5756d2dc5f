//! Wiring: [`Application::build`] binds the health server (and the on-demand sync API, on the
//! same port or its own); [`Application::run_until_stopped`]
//! waits for the database (and migrates it), then consumes until [`StopHandle::stop`] is called,
//! reconnecting to the broker whenever it is lost.
//!
//! A service started alongside its database and broker must not die because it came up first:
//! every wait uses the worker's back-off (`WORKER_RETRY_BASE_MS`, `WORKER_RETRY_MAX_MS`), logs
//! each failed attempt at warn with the next delay, and gives way to a stop at once. Only what
//! waiting cannot fix (a setting, a refused login, a failing migration) ends the process.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement};
use shared::Roles;
use tokio::sync::watch;

use crate::apply::errors::transient_sqlstate;
use crate::clerk::ClerkClient;
use crate::config::WorkerConfig;
use crate::consumer::{self, End, Handler};
use crate::database::{connect_database, migrate};
use crate::dead_letter::DeadLetters;
use crate::http::{self, BrokerState};
use crate::metrics::Metrics;
use crate::on_demand::api::Api;
use crate::on_demand::{self, OnDemand};
use crate::stop::Stop;
use crate::{depth, prune, reconcile};

/// How long one broker node may take to answer before the next one is tried (an unreachable
/// host would otherwise hang for the operating system's TCP timeout).
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops a running [`Application`]: it stops consuming, finishes what is in flight and returns.
#[derive(Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// A worker with its health server bound, ready to run.
pub struct Application {
    config: WorkerConfig,
    db: DatabaseConnection,
    metrics: Metrics,
    broker: Arc<BrokerState>,
    server: actix_web::dev::Server,
    port: u16,
    /// The on-demand sync API's server when it has an address of its own, and its port.
    api_server: Option<actix_web::dev::Server>,
    api_port: Option<u16>,
    /// The one Backend API client (and rate limit) of the scheduled reconcile and the on-demand
    /// sync, when either is on.
    clerk: Option<Arc<ClerkClient>>,
    stop: Arc<watch::Sender<bool>>,
}

impl Application {
    /// Binds the health server and sets up the database pool, which connects on first use; it
    /// fails only on what waiting cannot fix. The database and the broker are waited for by
    /// [`Application::run_until_stopped`], with `/healthz` answering 200 and `/readyz` 503
    /// meanwhile.
    pub async fn build(config: WorkerConfig) -> anyhow::Result<Self> {
        let metrics = Metrics::new().context("cannot register the metrics")?;
        let db = connect_database(
            &config.database_url,
            config.db_pool_size + 1,
            config.lock_timeout,
        )
        .await
        .context("cannot set up the database pool (DATABASE_URL)")?;
        let listener = TcpListener::bind(config.listen)
            .with_context(|| format!("cannot listen on {} (WORKER_LISTEN)", config.listen))?;
        let port = listener.local_addr()?.port();
        let broker = Arc::new(BrokerState::default());
        let clerk = match config
            .reconcile
            .as_ref()
            .map(|schedule| &schedule.clerk)
            .or(config.on_demand.as_ref().map(|api| &api.clerk))
        {
            Some(clerk) => Some(Arc::new(
                ClerkClient::new(clerk.clone()).context("cannot set up the Backend API client")?,
            )),
            None => None,
        };
        let api = match (&config.on_demand, &clerk) {
            (Some(api), Some(client)) => Some(on_demand_api(&config, api, client, &metrics).await?),
            _ => None,
        };
        // The API on its own address, or next to the health endpoints.
        let (api_server, api_port, shared_api) =
            match (config.on_demand.as_ref().and_then(|api| api.listen), api) {
                (Some(address), Some(api)) => {
                    let listener = TcpListener::bind(address).with_context(|| {
                        format!("cannot listen on {address} (WORKER_API_LISTEN)")
                    })?;
                    let api_port = listener.local_addr()?.port();
                    let server = on_demand::api::serve(listener, api)
                        .context("cannot start the on-demand sync API")?;
                    (Some(server), Some(api_port), None)
                }
                (None, Some(api)) => (None, Some(port), Some(api)),
                (_, None) => (None, None, None),
            };
        let server = http::serve(
            listener,
            db.clone(),
            broker.clone(),
            metrics.clone(),
            config.stalled_after,
            shared_api,
        )
        .context("cannot start the health server")?;
        if let Some(api_port) = api_port {
            tracing::info!(port = api_port, "on-demand sync API on");
        }
        let (stop, _) = watch::channel(false);
        Ok(Self {
            config,
            db,
            metrics,
            broker,
            server,
            port,
            api_server,
            api_port,
            clerk,
            stop: Arc::new(stop),
        })
    }

    /// The port of the on-demand sync API (`WORKER_LISTEN`'s or `WORKER_API_LISTEN`'s), when it
    /// is on.
    pub fn api_port(&self) -> Option<u16> {
        self.api_port
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

    /// Runs until stopped: waits for the database and applies pending migrations (unless
    /// configured not to), then connects to the broker, declares the topology and consumes. Both
    /// are retried with back-off while they are unreachable; when the broker connection is lost,
    /// the work in flight finishes and the worker connects again.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let server = self.server.handle();
        let server_task = tokio::spawn(self.server);
        let api_server = self.api_server.map(|api| (api.handle(), tokio::spawn(api)));
        let mut stop = Stop(self.stop.subscribe());
        let database = wait_for_database(&self.config, &self.db, &mut stop).await;
        if matches!(database, Ok(true)) {
            report_unlisted_roles(&self.db, &self.config.reading.roles).await;
            let pruning = tokio::spawn(prune::prune_until_stopped(
                self.db.clone(),
                self.config.processed_retention,
                self.config.purge_deleted_after,
                self.metrics.clone(),
                stop.clone(),
            ));
            let scheduled =
                self.config
                    .reconcile
                    .clone()
                    .zip(self.clerk)
                    .map(|(schedule, client)| {
                        tokio::spawn(reconcile::schedule::run(
                            schedule,
                            self.config.reading.clone(),
                            client,
                            self.config.database_url.clone(),
                            self.config.lock_timeout,
                            self.metrics.clone(),
                            Stop(self.stop.subscribe()),
                        ))
                    });
            consume_until_stopped(&self.config, &self.db, &self.metrics, &self.broker, stop).await;
            let _ = pruning.await;
            if let Some(task) = scheduled {
                // A run in progress ends at its next page, recorded interrupted.
                let _ = task.await;
            }
        }
        server.stop(true).await;
        let _ = server_task.await;
        if let Some((api, task)) = api_server {
            api.stop(true).await;
            let _ = task.await;
        }
        self.db.close().await.context("closing the database pool")?;
        database.map(|_| ())
    }
}

/// The on-demand sync API on a database pool of its own (so its requests never take the
/// consumer's connections), drawing on the worker's one Backend API rate limit.
async fn on_demand_api(
    config: &WorkerConfig,
    api: &on_demand::OnDemandConfig,
    client: &ClerkClient,
    metrics: &Metrics,
) -> anyhow::Result<actix_web::web::Data<Api>> {
    let db = connect_database(
        &config.database_url,
        on_demand::API_DB_POOL,
        config.lock_timeout,
    )
    .await
    .context("cannot set up the on-demand sync API's database pool (DATABASE_URL)")?;
    let service = OnDemand::new(api, db, client, config.reading.clone(), metrics)
        .context("cannot register the on-demand sync metrics")?;
    Ok(actix_web::web::Data::new(Api::new(service, &api.token)))
}

/// Consumes until a stop, reconnecting to the broker (with back-off) whenever it is unusable.
async fn consume_until_stopped(
    config: &WorkerConfig,
    db: &DatabaseConnection,
    metrics: &Metrics,
    broker: &BrokerState,
    mut stop: Stop,
) {
    let mut failures = 0;
    while !stop.requested() {
        let error = match stop.unless_stopped(open_broker(config)).await {
            None => break,
            Some(Err(error)) => format!("{error:#}"),
            Some(Ok((connection, node, channel, dead))) => {
                failures = 0;
                broker.set(Some((channel.clone(), node.clone())));
                metrics.broker_node.reset();
                metrics
                    .broker_node
                    .with_label_values(&[node.as_str()])
                    .set(1);
                tracing::info!(queue = %config.topology.queue, %node, "consuming");
                let handler = Handler {
                    db: db.clone(),
                    metrics: metrics.clone(),
                    config: config.clone(),
                    dead,
                    stop: stop.clone(),
                };
                let depths = tokio::spawn(depth::poll(
                    connection.clone(),
                    config.topology.clone(),
                    config.broker_timeout,
                    metrics.clone(),
                ));
                let end = consumer::consume(&channel, handler).await;
                depths.abort();
                broker.set(None);
                metrics.broker_node.reset();
                // Bounded: a blocked broker reads nothing, not even a close.
                let close = connection.close(200, "worker stopping".into());
                match tokio::time::timeout(config.broker_timeout, close).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::debug!(%error, "closing the broker connection"),
                    Err(_) => tracing::warn!("the broker did not take the close in time"),
                }
                match end {
                    End::Stopped => break,
                    End::Lost(reason) => format!("lost the broker: {reason}"),
                }
            }
        };
        failures += 1;
        let delay = config.backoff.delay(failures);
        tracing::warn!(
            %error,
            attempt = failures,
            next_attempt_in = ?delay,
            "waiting for the broker"
        );
        if !stop.sleep(delay).await {
            break;
        }
    }
    tracing::info!("stopped consuming; everything in flight is done");
}

/// Waits until the database is usable: applies pending migrations (or, with migrations off,
/// pings it), retrying with back-off while the server is unreachable. `Ok(false)` when a stop
/// came first; an error when the failure is not one that waiting fixes.
async fn wait_for_database(
    config: &WorkerConfig,
    db: &DatabaseConnection,
    stop: &mut Stop,
) -> anyhow::Result<bool> {
    let mut failures = 0;
    loop {
        let attempt = async {
            if config.run_migrations {
                migrate(&config.database_url, config.lock_timeout).await
            } else {
                db.ping().await
            }
        };
        let error = match stop.unless_stopped(attempt).await {
            None => return Ok(false),
            Some(Ok(())) => return Ok(true),
            Some(Err(error)) if worth_waiting_for(&error) => error,
            Some(Err(error)) => {
                return Err(anyhow::Error::new(error).context(if config.run_migrations {
                    "cannot apply the migrations (DATABASE_URL)"
                } else {
                    "cannot use the database (DATABASE_URL)"
                }));
            }
        };
        failures += 1;
        let delay = config.backoff.delay(failures);
        tracing::warn!(
            %error,
            attempt = failures,
            next_attempt_in = ?delay,
            "waiting for the database"
        );
        if !stop.sleep(delay).await {
            return Ok(false);
        }
    }
}

/// Logs, once at start, the users stored with a role that `WORKER_ROLES` no longer lists, counted
/// per role. They are left as they are: rewriting them would be a silent decision the operator
/// did not make; each one takes a configured role with its next event.
async fn report_unlisted_roles(db: &DatabaseConnection, roles: &Roles) {
    match unlisted_roles(db, roles).await {
        Ok(counts) if counts.is_empty() => {}
        Ok(counts) => {
            let users: i64 = counts.iter().map(|(_, count)| count).sum();
            let per_role = counts
                .iter()
                .map(|(role, count)| format!("{role}={count}"))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                users,
                roles = %per_role,
                configured = %roles.names().join(","),
                "users stored with roles WORKER_ROLES does not list; left unchanged until their \
                 next event"
            );
        }
        Err(error) => tracing::warn!(%error, "cannot count the stored roles"),
    }
}

/// Each stored role outside `roles` with its number of users, by role name.
async fn unlisted_roles(
    db: &DatabaseConnection,
    roles: &Roles,
) -> Result<Vec<(String, i64)>, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT role, count(*) AS users FROM users WHERE role <> ALL($1) \
             GROUP BY role ORDER BY role",
            [roles.names().to_vec().into()],
        ))
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "role")?, row.try_get("", "users")?)))
        .collect()
}

/// Whether a database failure at start is worth waiting out: the server unreachable, starting
/// up, shutting down, out of connections: no answer, or a SQLSTATE the door's classifier calls
/// transient. A refused login, a missing database or a failing migration is a mistake to fix,
/// not to wait for.
fn worth_waiting_for(error: &DbErr) -> bool {
    match error {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            // The server answered: the door's classifier of SQLSTATEs decides.
            sea_orm::sqlx::Error::Database(db) => {
                db.code().is_some_and(|code| transient_sqlstate(&code))
            }
            // Refused, reset, timed out, TLS or protocol trouble, the pool's own timeout.
            _ => true,
        },
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        _ => false,
    }
}

async fn open_broker(
    config: &WorkerConfig,
) -> anyhow::Result<(Arc<Connection>, String, Channel, DeadLetters)> {
    // No automatic recovery: a lost connection ends the consumer, the worker finishes what it
    // holds and connects afresh (to the next node of AMQP_URL first), which is simpler to reason
    // about than a recovered channel.
    let (connection, node) = config
        .amqp_nodes
        .connect(ConnectionProperties::default(), BROKER_CONNECT_TIMEOUT)
        .await
        .context("cannot connect to the broker (AMQP_URL)")?;
    config
        .topology
        .declare_on(&connection)
        .await
        .with_context(|| format!("cannot declare the topology on {node}"))?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(
            config.prefetch,
            BasicQosOptions {
                // Per consumer, not per channel.
                global: false,
            },
        )
        .await?;
    let connection = Arc::new(connection);
    let dead = DeadLetters::open(
        connection.clone(),
        &config.topology.dead_queue,
        config.broker_timeout,
    )
    .await?;
    Ok((connection, node, channel, dead))
}
