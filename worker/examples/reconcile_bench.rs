//! Reconcile throughput against the worker's own drain of the same users, in the same run.
//!
//! ```text
//! cargo run --release -p worker --example worker-reconcile-bench -- --users 100000
//! ```
//!
//! 1. Baseline: a fresh queue pre-filled with one `user.updated` event per user (the same user
//!    objects Clerk's stand-in serves); a worker is timed until every event is recorded.
//! 2. The tables are emptied; `reconcile` (deletion phase included) runs against the stand-in
//!    for Clerk's Backend API, served without artificial delay and without a client-side rate
//!    limit (the default limit alone would make 200 pages take 22 s), into the empty table.
//! 3. `reconcile` again with nothing changed.
//!
//! Prints users/s for each and the ratios backfill/drain and no-change/backfill. Uses
//! `DATABASE_URL` (a database to create the bench database from; default the local `test`
//! database) and `AMQP_URL`, and drops the database and deletes the queues it made afterwards.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, EntityTrait, PaginatorTrait};
use serde_json::{Value, json};
use shared::{Topology, headers};
use test_support::clerk_api::ClerkApi;
use test_support::{TestDatabase, TestTopology, amqp_url};
use worker::clerk::{ClerkClient, ClerkConfig};
use worker::reconcile::{Options, Report};
use worker::storage::processed_events;
use worker::{Application, WorkerConfig};

// The same allocator as the `worker` binary, so that the worker measured in this process is the
// one that runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Users in the stand-in (and events in the queue).
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Database connections of the worker (batches in flight) and of the reconcile's pool
    /// (`WORKER_RECONCILE_CONNECTIONS`: one fewer writers).
    #[arg(long, default_value_t = 8)]
    connections: u32,
}

const KEY: &str = "sk_test_bench";

fn user(n: usize) -> Value {
    json!({
        "id": format!("user_{n:08}"), "object": "user",
        "email_addresses": [{"id": format!("idn_{n}"), "object": "email_address",
                             "email_address": format!("user{n}@example.org")}],
        "primary_email_address_id": format!("idn_{n}"),
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "Bench", "last_name": format!("No{n}"),
        "public_metadata": {"role": if n.is_multiple_of(10) { "trainer" } else { "client" }},
        "private_metadata": {}, "unsafe_metadata": {},
        "created_at": 1_654_012_591_514_i64 + n as i64,
        "updated_at": 1_654_012_591_835_i64 + n as i64,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A database and broker names of the bench's own, dropped and deleted whatever happens.
    let database = TestDatabase::empty().await;
    let topology = TestTopology::names();
    measure(&args, &database.url, &amqp_url(), &topology).await
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
    println!("users={} connections={}", args.users, args.connections);

    // 1. The webhook path.
    prefill(amqp_url, topology, args.users).await?;
    let config = WorkerConfig::from_settings(&shared::Settings {
        database_url: Some(db_url.to_owned().into()),
        amqp_url: Some(amqp_url.to_owned().into()),
        amqp_exchange: topology.exchange.clone(),
        amqp_queue: topology.queue.clone(),
        amqp_dead_queue: topology.dead_queue.clone(),
        amqp_delivery_limit: topology.delivery_limit,
        amqp_quorum_initial_group_size: topology.quorum_initial_group_size,
        // The worker's own defaults: the drain as a deployment with no tuning runs it.
        worker_max_attempts: 5,
        worker_retry_base_ms: 100,
        worker_retry_max_ms: 30_000,
        worker_run_migrations: false,
        worker_listen: "127.0.0.1:0".into(),
        worker_db_pool_size: args.connections,
        worker_broker_timeout_ms: 10_000,
        ..shared::Settings::default()
    })?;
    let app = Application::build(config).await?;
    let stop = app.stop_handle();
    let started = Instant::now();
    let running = tokio::spawn(app.run_until_stopped());
    let deadline = started + Duration::from_secs(1200);
    loop {
        let done = processed_events::Entity::find().count(&db).await?;
        if done as usize >= args.users {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker applied only {done} of {} events", args.users);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = started.elapsed();
    stop.stop();
    running.await??;
    let drain_rate = args.users as f64 / drain.as_secs_f64();
    println!(
        "worker drain:       {} user.updated events in {:>6.2} s = {:>7.0} users/s",
        args.users,
        drain.as_secs_f64(),
        drain_rate
    );
    db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
        .await?;

    // 2. and 3. Reconcile from the stand-in.
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..args.users).map(user));
    let client = ClerkClient::new(ClerkConfig {
        rate_limit: u32::MAX,
        ..ClerkConfig::new(api.url(), KEY.to_owned().into())
    })?;
    let backfill = timed(&db, &client, args.connections).await?;
    let backfill_rate = args.users as f64 / backfill.as_secs_f64();
    println!(
        "reconcile backfill: {} users created    in {:>6.2} s = {:>7.0} users/s",
        args.users,
        backfill.as_secs_f64(),
        backfill_rate
    );
    let unchanged = timed(&db, &client, args.connections).await?;
    let unchanged_rate = args.users as f64 / unchanged.as_secs_f64();
    println!(
        "reconcile again:    {} users unchanged  in {:>6.2} s = {:>7.0} users/s",
        args.users,
        unchanged.as_secs_f64(),
        unchanged_rate
    );
    println!(
        "ratio backfill/drain: {:.2}   ratio no-change/backfill: {:.2}",
        backfill_rate / drain_rate,
        unchanged_rate / backfill_rate
    );
    db.close().await?;
    Ok(())
}

async fn timed(
    db: &sea_orm::DatabaseConnection,
    client: &ClerkClient,
    connections: u32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let options = Options {
        connections,
        ..Options::default()
    };
    let report: Report = worker::reconcile::reconcile(db, client, &options).await;
    let elapsed = started.elapsed();
    if let Some(failure) = &report.failure {
        bail!("reconcile failed: {failure}");
    }
    println!("  {}", report.paragraph());
    Ok(elapsed)
}

/// Publishes one `user.updated` event per user as the ingest does, with confirms, before the
/// clock starts.
async fn prefill(amqp_url: &str, topology: &Topology, users: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    for chunk in (0..users).collect::<Vec<_>>().chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &n in chunk {
            let svix_id = format!("msg_bench_{n:08}");
            let body = json!({"type": "user.updated", "object": "event", "data": user(n)});
            let mut table = FieldTable::default();
            table.insert(
                headers::SVIX_ID.into(),
                AMQPValue::LongString(LongString::from(svix_id.as_str())),
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(svix_id.as_str().into())
                .with_type("user.updated".into())
                .with_headers(table);
            confirms.push(
                channel
                    .basic_publish(
                        topology.exchange.as_str().into(),
                        "user.updated".into(),
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
        "queue pre-filled with {users} events in {:.2} s (not part of any figure)",
        started.elapsed().as_secs_f64()
    );
    let _ = connection.close(200, "prefilled".into()).await;
    Ok(())
}
