//! Test support: a fresh database and fresh exchange/queue names per test, events published the
//! way the ingest publishes them, and workers started in-process.
#![allow(dead_code)] // Each test file uses a different part of this module.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, EntityTrait, PaginatorTrait,
};
use serde_json::{Value, json};
use shared::{Topology, headers};
use worker::config::Backoff;
use worker::storage::{
    organization_memberships, organizations, processed_events, user_tombstones, users,
};
use worker::{Application, StopHandle, WorkerConfig};

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Polls `condition` until it holds, failing the test with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One test's database and broker names. Dropped (even on panic), it deletes both.
pub struct TestEnv {
    pub db_name: String,
    pub db_url: String,
    pub db: DatabaseConnection,
    pub topology: Topology,
    pub channel: Channel,
    connection: Connection,
}

impl TestEnv {
    /// A fresh, migrated database and a freshly declared topology.
    pub async fn new() -> Self {
        let admin_url = admin_database_url();
        let admin = Database::connect(admin_url.as_str())
            .await
            .expect("admin database");
        let db_name = format!("worker_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{db_name}\""))
            .await
            .expect("create database");
        admin.close().await.expect("close admin");
        let (base, _) = admin_url.rsplit_once('/').expect("database url has a path");
        let db_url = format!("{base}/{db_name}");
        let mut options = ConnectOptions::new(db_url.as_str());
        options.sqlx_logging(false).max_connections(4);
        let db = Database::connect(options).await.expect("test database");
        Migrator::up(&db, None).await.expect("migrations");

        let topology = Topology::prefixed(&format!("test.{}", uuid::Uuid::new_v4().simple()));
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        topology.declare(&channel).await.expect("topology");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Self {
            db_name,
            db_url,
            db,
            topology,
            channel,
            connection,
        }
    }

    /// A worker configuration for this test: its own names, port 0, short back-off.
    pub fn config(&self) -> WorkerConfig {
        WorkerConfig {
            database_url: self.db_url.clone().into(),
            amqp_nodes: shared::AmqpNodes::parse(&amqp_url()).expect("AMQP_URL"),
            topology: self.topology.clone(),
            prefetch: 32,
            batch_size: 8,
            max_attempts: 3,
            backoff: Backoff {
                base: Duration::from_millis(20),
                max: Duration::from_millis(400),
            },
            run_migrations: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db_pool_size: 3,
            roles: shared::Roles::default(),
            processed_retention: Duration::from_secs(30 * 24 * 3600),
            stalled_after: Duration::from_secs(300),
            broker_timeout: Duration::from_secs(5),
        }
    }

    /// Builds and starts a worker in this process.
    pub async fn start_worker(&self, config: WorkerConfig) -> RunningWorker {
        let app = Application::build(config).await.expect("worker builds");
        let port = app.port();
        let metrics = app.metrics().clone();
        let stop = app.stop_handle();
        let task = tokio::spawn(app.run_until_stopped());
        RunningWorker {
            port,
            metrics,
            stop,
            task,
        }
    }

    /// Publishes an event the way the ingest does, and waits for the broker's confirm.
    pub async fn publish(&self, svix_id: &str, event_type: &str, body: &[u8]) {
        let properties = event_properties(svix_id, event_type);
        let confirm = self
            .channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                event_type.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker did not confirm");
    }

    /// Publishes an envelope `{"type": …, "data": …}`.
    pub async fn publish_event(&self, svix_id: &str, event_type: &str, data: Value) {
        let body = json!({"type": event_type, "object": "event", "timestamp": 1, "data": data});
        self.publish(svix_id, event_type, body.to_string().as_bytes())
            .await;
    }

    pub async fn user(&self, id: &str) -> Option<users::Model> {
        users::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .expect("read user")
    }

    pub async fn organization(&self, id: &str) -> Option<organizations::Model> {
        organizations::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .expect("read organization")
    }

    pub async fn membership(&self, id: &str) -> Option<organization_memberships::Model> {
        organization_memberships::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .expect("read membership")
    }

    /// Whether `table` (a tombstone table) holds `id`.
    pub async fn has_tombstone(&self, table: &str, id: &str) -> bool {
        self.db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                format!("SELECT 1 FROM {table} WHERE id = $1"),
                [id.into()],
            ))
            .await
            .expect("read tombstone")
            .is_some()
    }

    pub async fn processed(&self, svix_id: &str) -> Option<processed_events::Model> {
        processed_events::Entity::find_by_id(svix_id.to_owned())
            .one(&self.db)
            .await
            .expect("read processed event")
    }

    pub async fn processed_count(&self) -> u64 {
        processed_events::Entity::find()
            .count(&self.db)
            .await
            .expect("count processed events")
    }

    pub async fn tombstoned(&self, id: &str) -> bool {
        user_tombstones::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .expect("read tombstone")
            .is_some()
    }

    /// Ready messages in `queue` (unacknowledged ones are not counted).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists")
            .message_count()
    }

    /// Takes every message out of the dead queue.
    pub async fn take_dead_letters(&self) -> Vec<(FieldTable, Vec<u8>)> {
        let mut letters = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            let headers = message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            letters.push((headers, message.delivery.data));
        }
        letters
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let db_name = self.db_name.clone();
        // A runtime of its own on a thread of its own: this runs inside the test's runtime, and
        // also while a failed test unwinds.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(connection) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                    && let Ok(channel) = connection.create_channel().await
                {
                    for queue in [&topology.queue, &topology.dead_queue] {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    let _ = channel
                        .exchange_delete(
                            topology.exchange.as_str().into(),
                            ExchangeDeleteOptions::default(),
                        )
                        .await;
                    let _ = connection.close(200, "cleanup".into()).await;
                }
                if let Ok(admin) = Database::connect(admin_database_url().as_str()).await {
                    let _ = admin
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
                        ))
                        .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A worker running in this process.
pub struct RunningWorker {
    pub port: u16,
    pub metrics: worker::metrics::Metrics,
    stop: StopHandle,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Stops it and waits until it has finished what it held.
    pub async fn stop(self) {
        self.stop.stop();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task")
            .expect("worker ends cleanly");
    }

    /// GET a path of the health server, returning the status code and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).await
    }
}

/// GET a path of the health server on `port`, returning the status code and body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to health server");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The properties and headers the ingest gives an event.
pub fn event_properties(svix_id: &str, event_type: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    let now = chrono::Utc::now();
    table.insert(headers::SVIX_ID.into(), long(svix_id));
    table.insert(
        headers::SVIX_TIMESTAMP.into(),
        long(&now.timestamp().to_string()),
    );
    table.insert(headers::SVIX_SIGNATURE.into(), long("v1,dGVzdA=="));
    table.insert(headers::RECEIVED_AT.into(), long(&now.to_rfc3339()));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(svix_id.into())
        .with_type(event_type.into())
        .with_timestamp(u64::try_from(now.timestamp()).unwrap_or_default())
        .with_headers(table)
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// Clerk's user JSON with the fields the sync reads, shaped like the documented payload.
pub fn clerk_user(id: &str, email: Option<&str>, role: Option<&str>, updated_at: i64) -> Value {
    let email_id = format!("idn_{id}");
    let emails = match email {
        Some(address) => json!([{
            "id": email_id, "object": "email_address", "email_address": address,
            "verification": {"status": "verified", "strategy": "ticket"}, "linked_to": []
        }]),
        None => json!([]),
    };
    let public_metadata = match role {
        Some(role) => json!({ "role": role }),
        None => json!({}),
    };
    json!({
        "id": id, "object": "user",
        "email_addresses": emails,
        "primary_email_address_id": email.map(|_| email_id),
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "First", "last_name": "Last",
        "public_metadata": public_metadata, "private_metadata": {}, "unsafe_metadata": {},
        "created_at": 1_654_012_591_514_i64, "updated_at": updated_at,
    })
}

/// Clerk's Organization JSON, shaped like the documented payload; `created_at` is 1000.
pub fn clerk_organization(id: &str, name: &str, updated_at: i64) -> Value {
    json!({
        "object": "organization", "id": id, "name": name,
        "slug": name.to_lowercase().replace(' ', "-"),
        "image_url": "https://img.clerk.com/x", "has_image": false, "members_count": 1,
        "max_allowed_memberships": 5, "admin_delete_enabled": true,
        "public_metadata": {}, "private_metadata": {}, "created_by": "user_creator",
        "created_at": 1000, "updated_at": updated_at, "role_set_key": null
    })
}

/// Clerk's OrganizationMembership JSON, with `organization` as its snapshot.
pub fn clerk_membership(
    id: &str,
    organization: &Value,
    user_id: &str,
    role: &str,
    created_at: i64,
    updated_at: i64,
) -> Value {
    json!({
        "object": "organization_membership", "id": id, "role": role, "role_name": role,
        "permissions": ["org:sys_profile:read"], "public_metadata": {}, "private_metadata": {},
        "organization": organization,
        "public_user_data": {
            "user_id": user_id, "first_name": "First", "last_name": "Last",
            "identifier": format!("{user_id}@example.org"), "image_url": "https://img.clerk.com/y",
            "has_image": false, "profile_image_url": null, "username": null
        },
        "created_at": created_at, "updated_at": updated_at
    })
}

/// A documented Clerk payload from `fixtures/clerk`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../fixtures/clerk/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fresh svix-id.
pub fn svix_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// A TCP proxy to the broker or the database that a test can cut (every connection dropped, new
/// ones refused) and restore, to simulate an outage without touching the shared services.
pub struct CuttableProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    /// Proxies 127.0.0.1:{port} to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = {
            let cut = cut.clone();
            let refused = refused.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections
                        .lock()
                        .expect("proxy connections")
                        .push(task.abort_handle());
                }
            })
        };
        Self {
            port,
            cut,
            refused,
            connections,
            accept,
        }
    }

    /// Proxies 127.0.0.1:{port} to the host and port of a `postgres://` URL.
    pub async fn to_database(database_url: &str) -> Self {
        use std::net::ToSocketAddrs;
        let (_, host_port, _) = split_database_url(database_url);
        let host_port = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:5432")
        };
        let upstream = host_port
            .to_socket_addrs()
            .expect("database address")
            .next()
            .expect("database address");
        Self::start(upstream).await
    }

    /// How many connections were refused while cut.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops every proxied connection and refuses new ones until [`CuttableProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for connection in self
            .connections
            .lock()
            .expect("proxy connections")
            .drain(..)
        {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The broker URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `database_url` with its host and port replaced by this proxy's.
    pub fn database_url(&self, database_url: &str) -> String {
        let (start, _, rest) = split_database_url(database_url);
        format!("{start}127.0.0.1:{}{rest}", self.port)
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Splits `postgres://user@host:port/db?x` into `postgres://user@`, `host:port` and `/db?x`.
fn split_database_url(url: &str) -> (&str, &str, &str) {
    let scheme_end = url.find("://").expect("a URL with a scheme") + 3;
    let path_start = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |at| scheme_end + at);
    let host_start = url[scheme_end..path_start]
        .rfind('@')
        .map_or(scheme_end, |at| scheme_end + at + 1);
    (
        &url[..host_start],
        &url[host_start..path_start],
        &url[path_start..],
    )
}
