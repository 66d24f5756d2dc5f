//! Throughput of the worker against a baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p worker --example worker-bench -- --events 20000
//! ```
//!
//! - Baseline: the same N user rows upserted straight into Postgres, one transaction per row,
//!   over `--connections` connections at once.
//! - Worker: a fresh queue pre-filled with N unique `user.created` events; a worker with
//!   `--connections` batches in flight is started and timed until every event is recorded in
//!   `processed_events`.
//!
//! Prints events/s for both and the ratio worker/baseline. Uses `DATABASE_URL` (a database to
//! create the bench database from; default the local `test` database) and `AMQP_URL`, and drops
//! the database and deletes the queues it made afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, EntityTrait,
    PaginatorTrait, Statement, TransactionTrait,
};
use serde_json::json;
use shared::{Topology, headers};
use worker::config::Backoff;
use worker::storage::processed_events;
use worker::{Application, WorkerConfig};

#[derive(Debug, Parser)]
struct Args {
    /// Events (and baseline rows).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Database connections for the baseline; batches in flight for the worker.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// WORKER_BATCH_SIZE.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// WORKER_PREFETCH.
    #[arg(long, default_value_t = 512)]
    prefetch: u16,
}

fn user(n: usize) -> serde_json::Value {
    json!({
        "id": format!("user_{n:08}"), "object": "user",
        "email_addresses": [{"id": format!("idn_{n}"), "email_address": format!("user{n}@example.org")}],
        "primary_email_address_id": format!("idn_{n}"),
        "phone_numbers": [], "first_name": "Bench", "last_name": format!("No{n}"),
        "public_metadata": {"role": if n.is_multiple_of(10) { "trainer" } else { "client" }},
        "created_at": 1_654_012_591_514_i64, "updated_at": 1_654_012_591_835_i64 + n as i64,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("bench_{suffix}");
    let (base, _) = admin_url
        .rsplit_once('/')
        .context("DATABASE_URL has no database")?;
    let db_url = format!("{base}/{db_name}");
    let topology = Topology::prefixed(&format!("bench.{suffix}"));

    let admin = Database::connect(admin_url.as_str()).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{db_name}\""))
        .await?;
    let outcome = measure(&args, &db_url, &amqp_url, &topology).await;

    // Clean up whatever happened.
    if let Ok(connection) = Connection::connect(&amqp_url, ConnectionProperties::default()).await {
        let channel = connection.create_channel().await?;
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
        let _ = connection.close(200, "bench done".into()).await;
    }
    admin
        .execute_unprepared(&format!("DROP DATABASE \"{db_name}\" WITH (FORCE)"))
        .await?;
    outcome
}

async fn measure(
    args: &Args,
    db_url: &str,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let mut options = ConnectOptions::new(db_url);
    options
        .max_connections(args.connections)
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    Migrator::up(&db, None).await?;

    println!(
        "events={} connections={} batch_size={} prefetch={}",
        args.events, args.connections, args.batch_size, args.prefetch
    );
    let baseline = baseline(&db, args).await?;
    let baseline_rate = args.events as f64 / baseline.as_secs_f64();
    println!(
        "baseline: {} rows upserted, one transaction each, in {:.2} s = {:.0} rows/s",
        args.events,
        baseline.as_secs_f64(),
        baseline_rate
    );
    db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
        .await?;

    prefill(amqp_url, topology, args.events).await?;
    let config = WorkerConfig {
        database_url: db_url.to_owned().into(),
        amqp_nodes: shared::AmqpNodes::parse(amqp_url).map_err(anyhow::Error::msg)?,
        topology: topology.clone(),
        prefetch: args.prefetch,
        batch_size: args.batch_size,
        max_attempts: 5,
        backoff: Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
        },
        run_migrations: false,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        db_pool_size: args.connections,
        processed_retention: Duration::from_secs(30 * 24 * 3600),
        stalled_after: Duration::from_secs(300),
        broker_timeout: Duration::from_secs(10),
    };
    let app = Application::build(config).await?;
    let metrics = app.metrics().clone();
    let stop = app.stop_handle();
    let started = Instant::now();
    let running = tokio::spawn(app.run_until_stopped());
    let deadline = started + Duration::from_secs(600);
    loop {
        let done = processed_events::Entity::find().count(&db).await?;
        if done as usize >= args.events {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker applied only {done} of {} events", args.events);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let worker = started.elapsed();
    stop.stop();
    running.await??;
    let worker_rate = args.events as f64 / worker.as_secs_f64();
    println!(
        "worker:   {} events consumed, applied and acknowledged in {:.2} s = {:.0} events/s",
        args.events,
        worker.as_secs_f64(),
        worker_rate
    );
    println!(
        "worker transactions: {}, mean batch {:.1} events, mean {:.1} ms each",
        metrics.batch_size.get_sample_count(),
        metrics.batch_size.get_sample_sum() / metrics.batch_size.get_sample_count().max(1) as f64,
        1000.0 * metrics.apply_seconds.get_sample_sum()
            / metrics.apply_seconds.get_sample_count().max(1) as f64,
    );
    println!("ratio worker/baseline: {:.2}", worker_rate / baseline_rate);
    // The worker runs in this process, beside the pre-fill publisher and the baseline's pool, so
    // the process's peak is an upper bound for the worker's.
    match peak_rss_kib() {
        Some(kib) => println!(
            "peak RSS of this process (worker + bench driver): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("peak RSS: not available (no /proc/self/status)"),
    }
    db.close().await?;
    Ok(())
}

/// N rows, one `BEGIN; INSERT … ON CONFLICT … DO UPDATE … WHERE newer; COMMIT` each, spread over
/// `connections` tasks.
async fn baseline(db: &DatabaseConnection, args: &Args) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let db = db.clone();
        let next = next.clone();
        let events = args.events;
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    return Ok::<_, sea_orm::DbErr>(());
                }
                let txn = db.begin().await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "INSERT INTO users \
                       (id, email, first_name, last_name, role, phone, created_at, updated_at, synced_at) \
                     VALUES ($1, $2, 'Bench', $3, $4, NULL, to_timestamp($5 / 1000.0), \
                             to_timestamp($6 / 1000.0), now()) \
                     ON CONFLICT (id) DO UPDATE SET \
                       email = excluded.email, first_name = excluded.first_name, \
                       last_name = excluded.last_name, role = excluded.role, phone = excluded.phone, \
                       created_at = excluded.created_at, updated_at = excluded.updated_at, \
                       synced_at = excluded.synced_at \
                     WHERE users.updated_at < excluded.updated_at",
                    [
                        format!("user_{n:08}").into(),
                        format!("user{n}@example.org").into(),
                        format!("No{n}").into(),
                        (if n.is_multiple_of(10) { "trainer" } else { "client" }).into(),
                        1_654_012_591_514_i64.into(),
                        (1_654_012_591_835_i64 + n as i64).into(),
                    ],
                ))
                .await?;
                txn.commit().await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

/// Publishes N `user.created` events as the ingest does, with confirms, before the clock starts.
async fn prefill(amqp_url: &str, topology: &Topology, events: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &n in chunk {
            let svix_id = format!("msg_bench_{n:08}");
            let body = json!({"type": "user.created", "object": "event", "data": user(n)});
            let mut table = FieldTable::default();
            table.insert(
                headers::SVIX_ID.into(),
                AMQPValue::LongString(LongString::from(svix_id.as_str())),
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(svix_id.as_str().into())
                .with_type("user.created".into())
                .with_headers(table);
            confirms.push(
                channel
                    .basic_publish(
                        topology.exchange.as_str().into(),
                        "user.created".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body.to_string().as_bytes(),
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                bail!("the broker refused a bench event");
            }
        }
    }
    println!(
        "queue pre-filled with {events} events in {:.2} s (not part of either figure)",
        started.elapsed().as_secs_f64()
    );
    let _ = connection.close(200, "prefilled".into()).await;
    Ok(())
}

/// `VmHWM` of this process, in KiB: the most resident memory it has held so far.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}
