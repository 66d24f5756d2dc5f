//! A fresh database and topology for worker tests, events published the way the ingest
//! publishes them, and workers running in the test's process.

use std::time::Duration;

use lapin::types::FieldTable;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait, Statement,
};
use serde_json::Value;
use worker::{StopHandle, WorkerConfig};

use crate::broker::{BrokerChannel, TestTopology};
use crate::database::TestDatabase;
use crate::events::{envelope, event_properties};
use crate::eventually;
use crate::http::get;
use crate::rows::{
    organization_memberships, organizations, processed_events, user_tombstones, users,
};
use crate::services::{amqp_url, broker_env};
use crate::signing::svix_id;

/// One test's database and declared topology, and a confirming channel on the broker. Dropped,
/// it deletes both, even when the test failed.
pub struct TestEnv {
    pub broker: BrokerChannel,
    pub database: TestDatabase,
    pub topology: TestTopology,
}

impl TestEnv {
    /// A fresh, migrated database and a freshly declared topology.
    pub async fn new() -> Self {
        Self {
            broker: BrokerChannel::open().await,
            database: TestDatabase::migrated().await,
            topology: TestTopology::declared().await,
        }
    }

    /// The test's database pool.
    pub fn db(&self) -> &DatabaseConnection {
        &self.database.db
    }

    /// The test database's URL.
    pub fn db_url(&self) -> &str {
        &self.database.url
    }

    /// A worker configuration for this test: its own names, port 0, short back-off.
    pub fn config(&self) -> WorkerConfig {
        WorkerConfig::from_settings(&self.settings()).expect("the test's worker settings")
    }

    /// The settings of [`TestEnv::config`]: this test's database and topology, the shared
    /// broker, port 0, short back-off, the rest the defaults.
    pub fn settings(&self) -> shared::Settings {
        let topology = &self.topology.topology;
        shared::Settings {
            database_url: Some(self.database.url.clone().into()),
            amqp_url: Some(amqp_url().into()),
            amqp_exchange: topology.exchange.clone(),
            amqp_queue: topology.queue.clone(),
            amqp_dead_queue: topology.dead_queue.clone(),
            amqp_delivery_limit: topology.delivery_limit,
            amqp_quorum_initial_group_size: topology.quorum_initial_group_size,
            worker_prefetch: 32,
            worker_batch_size: 8,
            worker_max_attempts: 3,
            worker_retry_base_ms: 20,
            worker_retry_max_ms: 400,
            worker_run_migrations: true,
            worker_listen: "127.0.0.1:0".into(),
            worker_db_pool_size: 3,
            worker_store_payloads: true,
            worker_stalled_after: "300s".into(),
            worker_broker_timeout_ms: 5_000,
            ..shared::Settings::default()
        }
    }

    /// Builds (by `worker::Application::build`) and starts a worker in this process.
    pub async fn start_worker(&self, config: WorkerConfig) -> TestWorker {
        TestWorker::start(config).await
    }

    /// The binary `program` (`env!("CARGO_BIN_EXE_worker")`) as a command for this test: its
    /// database, the shared broker, its topology names, and logs of errors only.
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut command = std::process::Command::new(program);
        command
            .env("DATABASE_URL", self.db_url())
            .envs(broker_env(&amqp_url(), &self.topology))
            .env("RUST_LOG", "error");
        command
    }

    /// Publishes an event the way the ingest does, and waits for the broker's confirm.
    pub async fn publish(&self, svix_id: &str, event_type: &str, body: &[u8]) {
        let confirmation = self
            .broker
            .publish(
                &self.topology.exchange,
                event_type,
                body,
                event_properties(svix_id, event_type),
            )
            .await;
        assert!(confirmation.is_ack(), "broker did not confirm");
    }

    /// Publishes an envelope `{"type": …, "data": …}`.
    pub async fn publish_event(&self, svix_id: &str, event_type: &str, data: Value) {
        let body = envelope(event_type, data);
        self.publish(svix_id, event_type, body.to_string().as_bytes())
            .await;
    }

    /// Publishes the events one after another, each recorded in the history before the next is
    /// sent, so their outcomes do not depend on how a running worker batches them; returns their
    /// svix-ids.
    pub async fn apply_in_order(&self, events: &[(&str, Value)]) -> Vec<String> {
        let mut ids = Vec::new();
        for (event_type, data) in events {
            let id = svix_id();
            self.publish_event(&id, event_type, data.clone()).await;
            eventually(Duration::from_secs(20), "the event recorded", || async {
                self.processed(&id).await.is_some()
            })
            .await;
            ids.push(id);
        }
        ids
    }

    /// The stored user `id`.
    pub async fn user(&self, id: &str) -> Option<users::Model> {
        users::Entity::find_by_id(id.to_owned())
            .one(self.db())
            .await
            .expect("read user")
    }

    /// The stored organization `id`.
    pub async fn organization(&self, id: &str) -> Option<organizations::Model> {
        organizations::Entity::find_by_id(id.to_owned())
            .one(self.db())
            .await
            .expect("read organization")
    }

    /// The stored membership `id`.
    pub async fn membership(&self, id: &str) -> Option<organization_memberships::Model> {
        organization_memberships::Entity::find_by_id(id.to_owned())
            .one(self.db())
            .await
            .expect("read membership")
    }

    /// Whether `table` (a tombstone table) holds `id`.
    pub async fn has_tombstone(&self, table: &str, id: &str) -> bool {
        self.db()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!("SELECT 1 FROM {table} WHERE id = $1"),
                [id.into()],
            ))
            .await
            .expect("read tombstone")
            .is_some()
    }

    /// The `processed_events` row of `svix_id`.
    pub async fn processed(&self, svix_id: &str) -> Option<processed_events::Model> {
        processed_events::Entity::find_by_id(svix_id.to_owned())
            .one(self.db())
            .await
            .expect("read processed event")
    }

    /// Rows in `processed_events`.
    pub async fn processed_count(&self) -> u64 {
        processed_events::Entity::find()
            .count(self.db())
            .await
            .expect("count processed events")
    }

    /// Whether user `id` has a tombstone.
    pub async fn tombstoned(&self, id: &str) -> bool {
        user_tombstones::Entity::find_by_id(id.to_owned())
            .one(self.db())
            .await
            .expect("read tombstone")
            .is_some()
    }

    /// Ready messages in `queue` (unacknowledged ones are not counted).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.broker.ready(queue).await
    }

    /// Takes every message out of the dead queue: headers and body.
    pub async fn take_dead_letters(&self) -> Vec<(FieldTable, Vec<u8>)> {
        self.broker
            .drain(&self.topology.dead_queue)
            .await
            .into_iter()
            .map(|delivery| {
                let headers = delivery.properties.headers().clone().unwrap_or_default();
                (headers, delivery.data)
            })
            .collect()
    }
}

/// A worker running in this process.
pub struct TestWorker {
    /// Its health and metrics port.
    pub port: u16,
    /// The port of its on-demand sync API, when that is on.
    pub api_port: Option<u16>,
    /// Its metrics, to read without HTTP.
    pub metrics: worker::metrics::Metrics,
    stop: StopHandle,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestWorker {
    /// Builds (by `worker::Application::build`) and starts a worker with `config`.
    pub async fn start(config: WorkerConfig) -> Self {
        let app = worker::Application::build(config)
            .await
            .expect("the worker builds");
        let port = app.port();
        let api_port = app.api_port();
        let metrics = app.metrics().clone();
        let stop = app.stop_handle();
        let task = tokio::spawn(app.run_until_stopped());
        Self {
            port,
            api_port,
            metrics,
            stop,
            task,
        }
    }

    /// Stops it and waits until it has finished what it held.
    pub async fn stop(self) {
        self.stop.stop();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task")
            .expect("worker ends cleanly");
    }

    /// GETs a path of the health server: status and body (status 0 without an answer).
    pub async fn get(&self, path: &str) -> (u16, String) {
        get(&format!("http://127.0.0.1:{}{path}", self.port)).await
    }
}

/// Applies organization and membership changes through the door, in one transaction, as events
/// of their own (no payload; deletes are `hard`); for each, whether it wrote anything (`applied`, not `stale`).
pub async fn apply_changes(
    db: &DatabaseConnection,
    changes: &[worker::apply::organizations::Change],
) -> Result<Vec<bool>, sea_orm::DbErr> {
    use worker::apply::organizations::Change;
    use worker::apply::{Action, Event, Outcome, Source};
    let events: Vec<Event> = changes
        .iter()
        .cloned()
        .map(|change| Event {
            svix_id: svix_id(),
            event_type: match &change {
                Change::UpsertOrganization(_) => "organization.updated",
                Change::DeleteOrganization { .. } => "organization.deleted",
                Change::UpsertMembership(_) => "organizationMembership.updated",
                Change::DeleteMembership(_) => "organizationMembership.deleted",
            }
            .into(),
            action: Action::Organization(change),
            source: Source::Webhook,
            payload: None,
            svix_timestamp: None,
            received_at: None,
            delete_mode: worker::apply::DeleteMode::Hard,
            instance_id: None,
            trace_id: None,
            repair: false,
        })
        .collect();
    match worker::apply::apply_batch(db, &events).await {
        Ok(outcomes) => Ok(outcomes.iter().map(|o| *o == Outcome::Applied).collect()),
        Err(
            worker::apply::BatchFailure::Transient(error)
            | worker::apply::BatchFailure::Event(error),
        ) => Err(error),
    }
}
