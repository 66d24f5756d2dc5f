//! Throughput and latency of the worker against what Postgres itself does, in the same run.
//!
//! ```text
//! cargo run --release -p worker --example worker-bench -- --events 20000
//! ```
//!
//! - Floor: the N `users` rows the worker writes for the bench's events (every column, mapped by
//!   the same code) written straight into Postgres as one multi-row `INSERT … ON CONFLICT (id)
//!   DO UPDATE … WHERE newer` per `--batch-size` rows, one transaction each, over
//!   `--connections` connections at once: the fastest way to write them. Then the same with each
//!   transaction also inserting its events' `processed_events` rows (svix-id, type, outcome,
//!   subject, the body as `jsonb`) in one more statement: the least the contract asks per event.
//! - Baseline: the same N rows, one transaction per row, over the same connections (what a
//!   route handler inserting per request does).
//! - Broker: a fresh queue pre-filled with N unique `user.created` events, consumed with the
//!   worker's prefetch, touching no database, once acknowledged 64 at a time (the most the
//!   broker allows a consumer here) and once each delivery on its own, as the worker does.
//! - Worker: the queue pre-filled again with the same N events; a worker with
//!   `--connections` batches in flight is started and timed until every event is recorded in
//!   `processed_events`.
//! - Trickle: then `--trickle` events, one every 10 ms, to the idle worker; the latency of each
//!   is from just before its publish to the commit that applied it (a trigger on
//!   `processed_events` sends a notification, which Postgres delivers at commit).
//! - Processes (`--processes 1,2`): for each count, the queue pre-filled again and drained by
//!   that many release `worker` processes at once (spawned, same queue, same settings each),
//!   timed from the first event recorded to the last; with each process's peak RSS and the CPU
//!   the workers, the database's backends and the broker spent per 1,000 events.
//! - Route handler (with `--end-to-end`): the usual alternative to the pipeline, under the same
//!   load as the end-to-end run below: this bench started again as an actix-web endpoint that
//!   verifies each signed request and upserts its user row in a transaction of its own before
//!   answering (`bench/route_handler.rs`), timed from the first request to the last answer.
//! - End to end (`--end-to-end`): last, the tables and the queue emptied, one release `ingest`
//!   process and one release `worker` process started (both from the folder above this
//!   example's unless `--ingest` and `--worker` say otherwise); `--clients` keep-alive HTTP
//!   clients POST the N `user.created` events, each signed with a svix-id of its own, to the
//!   ingest, which publishes them to the queue the worker drains into Postgres. Timed from the
//!   first request to the last 2xx answer (the ingest's accept rate) and to the last event
//!   recorded in `processed_events` (the end-to-end rate, compared with the route handler and
//!   the baseline); with the CPU the ingest, the worker, the worker's database backends, the
//!   broker and this process (the load generator) spent per 1,000 events over that time, the
//!   machine's idle share, and the two processes' peak RSS. Built and run with:
//!
//! ```text
//! cargo build --release -p worker -p ingest --bins --examples
//! target/release/examples/worker-bench --events 20000 --end-to-end
//! ```
//!
//! Prints events/s for each, the ratios worker/floor (both floors), worker/broker and
//! worker/baseline, the trickle's latencies and the process's peak RSS. Uses `DATABASE_URL` (a
//! database to create the bench database from; default the local `test` database) and
//! `AMQP_URL`, and drops the database and deletes the queues it made afterwards.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueuePurgeOptions,
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
use test_support::broker::queue_counts;
use test_support::http_load::{self, HttpClient, SignedHeaders};
use test_support::signing::SECRET;
use test_support::{TestDatabase, TestTopology, amqp_url, proc_stats};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use worker::storage::{processed_events, users};
use worker::{Application, WorkerConfig};

#[path = "bench/route_handler.rs"]
mod route_handler;
#[path = "bench/rows.rs"]
mod rows;

// The same allocator as the `worker` binary, so that the worker measured in this process is the
// one that runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Events (and baseline rows).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Database connections for the baseline; batches in flight for the worker.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// WORKER_BATCH_SIZE.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// WORKER_PREFETCH.
    #[arg(long, default_value_t = 1024)]
    prefetch: u16,
    /// Events sent one every 10 ms after the backlog, for the latency figures.
    #[arg(long, default_value_t = 500)]
    trickle: usize,
    /// Worker process counts to drain the pre-filled queue with, one drain each (e.g. `1,2`);
    /// none by default.
    #[arg(long, value_delimiter = ',')]
    processes: Vec<usize>,
    /// The `worker` binary for `--processes` and `--end-to-end` (default: `worker` in the folder
    /// above this example's, i.e. the release build beside it).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// Last, drive one `ingest` and one `worker` process with signed HTTP requests and time the
    /// events from the first request until the last is applied.
    #[arg(long)]
    end_to_end: bool,
    /// Concurrent keep-alive HTTP clients for `--end-to-end`.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// The `ingest` binary for `--end-to-end` (default: `ingest` in the folder above this
    /// example's, beside the release `worker`).
    #[arg(long)]
    ingest: Option<PathBuf>,
    /// Instead of measuring, serve the route handler `--end-to-end` compares with, on this
    /// database (the bench starts itself so, as a process of its own).
    #[arg(long, hide = true, value_name = "DATABASE_URL")]
    serve_route_handler: Option<String>,
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

/// The `user.created` event of bench user `n`, as Clerk sends it.
fn envelope(n: usize) -> serde_json::Value {
    json!({"type": "user.created", "object": "event", "data": user(n)})
}

/// The svix-id the bench's pre-filled and recorded events carry for user `n`.
fn bench_svix_id(n: usize) -> String {
    format!("msg_bench_{n:08}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(database_url) = &args.serve_route_handler {
        return route_handler::serve(database_url, args.connections).await;
    }
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
    // Located first, so that a missing build fails the run before the long phases do.
    let end_to_end_binaries = if args.end_to_end {
        Some(Binaries {
            worker: release_binary(args.worker.as_deref(), "worker")?,
            ingest: release_binary(args.ingest.as_deref(), "ingest")?,
        })
    } else {
        None
    };

    println!(
        "events={} connections={} batch_size={} prefetch={} load average {}",
        args.events,
        args.connections,
        args.batch_size,
        args.prefetch,
        proc_stats::load_average().unwrap_or_else(|| "unknown".into())
    );
    let plain_floor = floor(&db, args, false).await?;
    let floor_rate = args.events as f64 / plain_floor.as_secs_f64();
    println!(
        "floor:    {} users rows as multi-row upserts of {}, one transaction each, in {:.2} s = {:.0} rows/s",
        args.events,
        args.batch_size,
        plain_floor.as_secs_f64(),
        floor_rate
    );
    db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
        .await?;
    let recorded_floor = floor(&db, args, true).await?;
    let recorded_floor_rate = args.events as f64 / recorded_floor.as_secs_f64();
    println!(
        "floor with the history: the same, each transaction also inserting the {} events' \
         processed_events rows in one statement, in {:.2} s = {:.0} rows/s",
        args.batch_size,
        recorded_floor.as_secs_f64(),
        recorded_floor_rate
    );
    db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
        .await?;
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
    let broker = drain(amqp_url, topology, args, false).await?;
    let broker_rate = args.events as f64 / broker.as_secs_f64();
    println!(
        "broker:   {} events consumed, acknowledged 64 at a time, no database, in {:.2} s = {:.0} events/s",
        args.events,
        broker.as_secs_f64(),
        broker_rate
    );
    prefill(amqp_url, topology, args.events).await?;
    let acks = drain(amqp_url, topology, args, true).await?;
    println!(
        "broker:   {} events consumed, each acknowledged, no database, in {:.2} s = {:.0} events/s",
        args.events,
        acks.as_secs_f64(),
        args.events as f64 / acks.as_secs_f64()
    );

    prefill(amqp_url, topology, args.events).await?;
    let config = WorkerConfig::from_settings(&shared::Settings {
        database_url: Some(db_url.to_owned().into()),
        amqp_url: Some(amqp_url.to_owned().into()),
        amqp_exchange: topology.exchange.clone(),
        amqp_queue: topology.queue.clone(),
        amqp_dead_queue: topology.dead_queue.clone(),
        amqp_delivery_limit: topology.delivery_limit,
        amqp_quorum_initial_group_size: topology.quorum_initial_group_size,
        worker_prefetch: args.prefetch,
        worker_batch_size: args.batch_size,
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
    let metrics = app.metrics().clone();
    let stop = app.stop_handle();
    let started = Instant::now();
    let running = tokio::spawn(app.run_until_stopped());
    let committed = Committed::InProcess(&metrics);
    let deadline = started + Duration::from_secs(600);
    loop {
        let done = committed.events().await?;
        if done >= args.events {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker applied only {done} of {} events", args.events);
        }
        tokio::time::sleep(POLL).await;
    }
    let worker = started.elapsed();
    confirm_recorded(&db, args.events).await?;
    let latencies = trickle(&db, db_url, amqp_url, topology, args).await;
    stop.stop();
    running.await??;
    let latencies = latencies?;
    let worker_rate = args.events as f64 / worker.as_secs_f64();
    println!(
        "worker:   {} events consumed, applied and acknowledged in {:.2} s = {:.0} events/s",
        args.events,
        worker.as_secs_f64(),
        worker_rate
    );
    println!(
        "worker transactions: {}, mean batch {:.1} events, mean {:.1} ms each; duplicates {}",
        metrics.batch_size.get_sample_count(),
        metrics.batch_size.get_sample_sum() / metrics.batch_size.get_sample_count().max(1) as f64,
        1000.0 * metrics.apply_seconds.get_sample_sum()
            / metrics.apply_seconds.get_sample_count().max(1) as f64,
        metrics.duplicates.get(),
    );
    println!("ratio worker/floor:    {:.2}", worker_rate / floor_rate);
    println!(
        "ratio worker/floor with the history: {:.2}",
        worker_rate / recorded_floor_rate
    );
    println!("ratio worker/broker:   {:.2}", worker_rate / broker_rate);
    println!("ratio worker/baseline: {:.2}", worker_rate / baseline_rate);
    if latencies.is_empty() {
        println!("trickle: none (--trickle 0)");
    } else {
        println!(
            "trickle: {} events, one every 10 ms, publish to commit: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
        );
    }
    // The worker runs in this process, beside the pre-fill publisher and the baseline's pool, so
    // the process's peak is an upper bound for the worker's.
    match proc_stats::peak_rss_kib(std::process::id()) {
        Some(kib) => println!(
            "peak RSS of this process (worker + bench driver): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("peak RSS: not available (no /proc/self/status)"),
    }
    // CPU-seconds as milliseconds per 1,000 events.
    let per_thousand = |cpu: Option<f64>| {
        cpu.map_or("?".into(), |cpu| {
            format!("{:.0}", 1000.0 * cpu * 1000.0 / args.events as f64)
        })
    };
    let mib =
        |kib: Option<u64>| kib.map_or("?".into(), |kib| format!("{:.1} MiB", kib as f64 / 1024.0));
    let percent =
        |share: Option<f64>| share.map_or("?".into(), |share| format!("{:.0}%", 100.0 * share));
    let mut single = None;
    for &count in &args.processes {
        db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
            .await?;
        prefill(amqp_url, topology, args.events).await?;
        let drain = drain_with_processes(&db, db_url, amqp_url, topology, args, count).await?;
        let rate = args.events as f64 / drain.elapsed.as_secs_f64();
        let single_rate = *single.get_or_insert(rate);
        println!(
            "processes {count}: {} events in {:.2} s = {rate:.0} events/s, ratio to 1 process \
             {:.2}, worker/floor {:.2}; peak RSS per process {}; CPU ms per 1000 events: \
             workers {}, Postgres backends {}, broker {} (the whole broker, other traffic \
             included)",
            args.events,
            drain.elapsed.as_secs_f64(),
            rate / single_rate,
            rate / floor_rate,
            drain
                .peak_rss_kib
                .iter()
                .map(|&kib| mib(kib))
                .collect::<Vec<_>>()
                .join(" / "),
            per_thousand(drain.worker_cpu),
            per_thousand(drain.database_cpu),
            per_thousand(drain.broker_cpu),
        );
    }
    if let Some(binaries) = &end_to_end_binaries {
        let handler = route_handler_run(&db, db_url, args).await?;
        let handler_rate = args.events as f64 / handler.elapsed.as_secs_f64();
        println!(
            "route handler: {} events, signed HTTP, each verified and upserted in a transaction of \
             its own before its answer, in {:.2} s = {handler_rate:.0} ev/s; CPU ms per 1000 \
             events: handler {}, its Postgres backends {}, load generator (this process) {}; \
             machine idle {}",
            args.events,
            handler.elapsed.as_secs_f64(),
            per_thousand(handler.handler_cpu),
            per_thousand(handler.database_cpu),
            per_thousand(handler.bench_cpu),
            percent(handler.idle_share),
        );
        let run = end_to_end(&db, db_url, amqp_url, topology, args, binaries).await?;
        let applied_rate = args.events as f64 / run.applied.as_secs_f64();
        println!(
            "end to end: {} events, HTTP accepted in {:.2} s = {:.0} ev/s, applied in {:.2} s = \
             {applied_rate:.0} ev/s, ratio to the route handler {:.2}, to the one-row-per-commit \
             baseline {:.2}",
            args.events,
            run.accepted.as_secs_f64(),
            args.events as f64 / run.accepted.as_secs_f64(),
            run.applied.as_secs_f64(),
            applied_rate / handler_rate,
            applied_rate / baseline_rate,
        );
        println!(
            "end to end, CPU ms per 1000 events over the {:.2} s applied: ingest {}, worker {}, \
             worker's Postgres backends {}, broker {} (the whole broker, other traffic included), \
             load generator (this process) {}; machine idle {}; peak RSS ingest {}, worker {}",
            run.applied.as_secs_f64(),
            per_thousand(run.ingest_cpu),
            per_thousand(run.worker_cpu),
            per_thousand(run.database_cpu),
            per_thousand(run.broker_cpu),
            per_thousand(run.bench_cpu),
            percent(run.idle_share),
            mib(run.ingest_peak_rss_kib),
            mib(run.worker_peak_rss_kib),
        );
    }
    db.close().await?;
    Ok(())
}

/// The release binaries `--end-to-end` starts.
struct Binaries {
    worker: PathBuf,
    ingest: PathBuf,
}

/// What an end-to-end run measured: times from the first request, CPU-seconds over the time to
/// the last event applied, peak RSS in KiB.
struct EndToEnd {
    /// To the last 2xx answer.
    accepted: Duration,
    /// To the last event recorded in `processed_events`.
    applied: Duration,
    ingest_cpu: Option<f64>,
    worker_cpu: Option<f64>,
    /// The worker's own backends.
    database_cpu: Option<f64>,
    broker_cpu: Option<f64>,
    /// This process: the HTTP clients and the polling.
    bench_cpu: Option<f64>,
    /// The machine's idle share of all its CPUs' time (iowait included).
    idle_share: Option<f64>,
    ingest_peak_rss_kib: Option<u64>,
    worker_peak_rss_kib: Option<u64>,
}

/// The CPU time used so far by what [`end_to_end`] and [`route_handler_run`] look at.
struct CpuReading {
    /// The processes asked for, in their order.
    processes: Vec<Option<f64>>,
    /// Each of their database backends, by pid.
    backends: std::collections::HashMap<u32, Option<f64>>,
    broker: Option<f64>,
    bench: Option<f64>,
    /// Idle and total ticks of the machine's CPUs.
    machine: Option<(u64, u64)>,
}

impl CpuReading {
    /// Reads it now; `bench_backends` are the backends to leave out, the bench's own.
    async fn now(
        db: &DatabaseConnection,
        bench_backends: &std::collections::HashMap<u32, Option<f64>>,
        processes: &[u32],
        broker: &[u32],
    ) -> anyhow::Result<Self> {
        let mut backends = database_cpu(db).await?;
        backends.retain(|pid, _| !bench_backends.contains_key(pid));
        Ok(Self {
            processes: processes
                .iter()
                .map(|&pid| proc_stats::cpu_seconds(pid))
                .collect(),
            backends,
            broker: proc_stats::total_cpu_seconds(broker),
            bench: proc_stats::cpu_seconds(std::process::id()),
            machine: machine_ticks(),
        })
    }

    /// CPU-seconds of the `i`th process since `before`.
    fn process_since(&self, before: &Self, i: usize) -> Option<f64> {
        Some(self.processes.get(i).copied()?? - before.processes.get(i).copied()??)
    }

    /// CPU-seconds of the backends since `before`; one opened meanwhile counts from zero.
    fn backends_since(&self, before: &Self) -> Option<f64> {
        self.backends
            .iter()
            .map(|(pid, &cpu)| Some(cpu? - before.backends.get(pid).copied().unwrap_or(Some(0.0))?))
            .sum()
    }

    /// The machine's idle share of all its CPUs' time since `before`.
    fn idle_share_since(&self, before: &Self) -> Option<f64> {
        let ((idle_after, total_after), (idle_before, total_before)) =
            self.machine.zip(before.machine)?;
        let total = total_after
            .checked_sub(total_before)
            .filter(|&total| total > 0)?;
        Some(idle_after.saturating_sub(idle_before) as f64 / total as f64)
    }
}

/// One release ingest and one release worker process on the emptied tables and queue; N unique
/// `user.created` events POSTed signed by `--clients` keep-alive clients, timed from the first
/// request to the last 2xx answer and to the last event recorded in `processed_events`.
async fn end_to_end(
    db: &DatabaseConnection,
    db_url: &str,
    amqp_url: &str,
    topology: &Topology,
    args: &Args,
    binaries: &Binaries,
) -> anyhow::Result<EndToEnd> {
    db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
        .await?;
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .queue_purge(topology.queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let (ready, _) = queue_counts(&channel, &topology.queue).await?;
    if ready > 0 {
        bail!("the queue still holds {ready} messages after the purge");
    }

    // The bench's own backends, open from the earlier phases: only those opened after this,
    // the worker's, count.
    let bench_backends = database_cpu(db).await?;
    let worker_port = free_port()?;
    let mut worker = spawn_worker(
        &binaries.worker,
        db_url,
        amqp_url,
        topology,
        args,
        worker_port,
    )?;
    let worker_pid = worker.id().context("the worker exited")?;
    let (mut ingest, port) =
        http_load::start_ingest(&binaries.ingest, amqp_url, topology, &[]).await?;
    let ingest_pid = ingest.id().context("the ingest exited")?;
    // The worker is ready once it consumes: the clock starts with both processes ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    while queue_counts(&channel, &topology.queue).await?.1 == 0 {
        if let Some(status) = worker.try_wait()? {
            bail!("the worker exited with {status} before consuming");
        }
        if Instant::now() > deadline {
            bail!("the worker did not start consuming within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = connection.close(200, "ready".into()).await;

    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(HttpClient::connect(port).await?);
    }
    let broker_pids = proc_stats::pids_named("beam.smp");
    let processes = [ingest_pid, worker_pid];
    let before = CpuReading::now(db, &bench_backends, &processes, &broker_pids).await?;
    let started = Instant::now();
    let accepted = post_events(clients, args.events)
        .await?
        .duration_since(started);

    let committed = Committed::processes(vec![worker_port]);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = committed.events().await?;
        if done >= args.events {
            break;
        }
        if let Some(status) = worker.try_wait()? {
            bail!("the worker exited with {status} after {done} events");
        }
        if Instant::now() > deadline {
            bail!("the worker applied only {done} of {} events", args.events);
        }
        tokio::time::sleep(POLL).await;
    }
    let applied = started.elapsed();
    let after = CpuReading::now(db, &bench_backends, &processes, &broker_pids).await?;
    let ingest_peak_rss_kib = proc_stats::peak_rss_kib(ingest_pid);
    let worker_peak_rss_kib = proc_stats::peak_rss_kib(worker_pid);
    http_load::stop_process(&mut ingest, ingest_pid).await?;
    http_load::stop_process(&mut worker, worker_pid).await?;
    confirm_recorded(db, args.events).await?;

    Ok(EndToEnd {
        accepted,
        applied,
        ingest_cpu: after.process_since(&before, 0),
        worker_cpu: after.process_since(&before, 1),
        database_cpu: after.backends_since(&before),
        broker_cpu: after.broker.zip(before.broker).map(|(a, b)| a - b),
        bench_cpu: after.bench.zip(before.bench).map(|(a, b)| a - b),
        idle_share: after.idle_share_since(&before),
        ingest_peak_rss_kib,
        worker_peak_rss_kib,
    })
}

/// What the route handler's run measured: the time from the first request to the last answer
/// (each answered after its commit), and CPU-seconds over it.
struct RouteHandlerRun {
    elapsed: Duration,
    handler_cpu: Option<f64>,
    /// The handler's own backends.
    database_cpu: Option<f64>,
    /// This process: the HTTP clients.
    bench_cpu: Option<f64>,
    idle_share: Option<f64>,
}

/// The same signed load as [`end_to_end`], sent to the usual route handler instead
/// ([`route_handler`]: this bench started again as a process of its own) on the emptied tables.
async fn route_handler_run(
    db: &DatabaseConnection,
    db_url: &str,
    args: &Args,
) -> anyhow::Result<RouteHandlerRun> {
    db.execute_unprepared("TRUNCATE users, processed_events, user_tombstones")
        .await?;
    let bench_backends = database_cpu(db).await?;
    let mut handler = Command::new(std::env::current_exe()?)
        .arg("--serve-route-handler")
        .arg(db_url)
        .arg("--connections")
        .arg(args.connections.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the route handler")?;
    let pid = handler.id().context("the route handler exited")?;
    let mut lines = BufReader::new(handler.stdout.take().context("stdout")?).lines();
    let port: u16 = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("waiting for the route handler to listen")??
            .context("the route handler exited before listening")?;
        if let Some(port) = line.strip_prefix(route_handler::LISTENING) {
            break port.parse()?;
        }
    };
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(HttpClient::connect(port).await?);
    }
    let before = CpuReading::now(db, &bench_backends, &[pid], &[]).await?;
    let started = Instant::now();
    let elapsed = post_events(clients, args.events)
        .await?
        .duration_since(started);
    let after = CpuReading::now(db, &bench_backends, &[pid], &[]).await?;
    http_load::stop_process(&mut handler, pid).await?;
    let stored = users::Entity::find().count(db).await? as usize;
    if stored != args.events {
        bail!(
            "the route handler answered every request but stored {stored} of {} users",
            args.events
        );
    }
    Ok(RouteHandlerRun {
        elapsed,
        handler_cpu: after.process_since(&before, 0),
        database_cpu: after.backends_since(&before),
        bench_cpu: after.bench.zip(before.bench).map(|(a, b)| a - b),
        idle_share: after.idle_share_since(&before),
    })
}

/// POSTs the N bench users as `user.created` events, each signed with a svix-id of its own,
/// spread over the clients; fails on any answer but 2xx. Returns when the last was answered.
async fn post_events(clients: Vec<HttpClient>, events: usize) -> anyhow::Result<Instant> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let next = next.clone();
            tokio::spawn(async move {
                let signer = test_support::signing::signer(SECRET);
                let mut last_accepted = None;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= events {
                        return anyhow::Ok(last_accepted);
                    }
                    let body = envelope(n).to_string();
                    let id = test_support::signing::svix_id();
                    let timestamp = chrono::Utc::now().timestamp();
                    let signature = signer.sign(&id, timestamp, body.as_bytes())?;
                    let signed = SignedHeaders {
                        id: id.into(),
                        timestamp,
                        signature,
                    };
                    let status = client.post(&body, &signed).await?;
                    if !(200..300).contains(&status) {
                        bail!("event {n} was answered {status}");
                    }
                    last_accepted = Some(Instant::now());
                }
            })
        })
        .collect();
    let mut last_accepted = None;
    for task in tasks {
        last_accepted = last_accepted.max(task.await??);
    }
    last_accepted.context("no event sent")
}

/// Idle (iowait included) and total ticks of all the machine's CPUs so far, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let total = fields.iter().take(8).sum();
    Some((fields.get(3)? + fields.get(4)?, total))
}

/// What a drain by worker processes measured.
struct ProcessDrain {
    elapsed: Duration,
    peak_rss_kib: Vec<Option<u64>>,
    worker_cpu: Option<f64>,
    database_cpu: Option<f64>,
    broker_cpu: Option<f64>,
}

/// Starts `count` release worker processes on the pre-filled queue and waits until every event
/// is recorded; timed from the first recorded event, so the processes' start is not counted.
async fn drain_with_processes(
    db: &DatabaseConnection,
    db_url: &str,
    amqp_url: &str,
    topology: &Topology,
    args: &Args,
    count: usize,
) -> anyhow::Result<ProcessDrain> {
    let binary = release_binary(args.worker.as_deref(), "worker")?;
    let broker_pids = proc_stats::pids_named("beam.smp");
    let broker_cpu = || proc_stats::total_cpu_seconds(&broker_pids);
    // The bench's own pool has backends on this database too (busy in the earlier phases, and
    // counting the recorded events now): only the workers' own backends, opened after this,
    // count.
    let backends_before = database_cpu(db).await?;
    let mut children = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    for _ in 0..count {
        let port = free_port()?;
        children.push(spawn_worker(
            &binary, db_url, amqp_url, topology, args, port,
        )?);
        ports.push(port);
    }
    let committed = Committed::processes(ports);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        let done = committed.events().await?;
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), broker_cpu()));
        }
        if done >= args.events {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{count} worker processes applied only {done} of {} events",
                args.events
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let (started, broker_before) = first.context("no event recorded")?;
    let elapsed = started.elapsed();
    let broker_cpu = broker_cpu()
        .zip(broker_before)
        .map(|(after, before)| after - before);
    let pids: Vec<u32> = children.iter().filter_map(Child::id).collect();
    let peak_rss_kib = pids
        .iter()
        .map(|&pid| proc_stats::peak_rss_kib(pid))
        .collect();
    // Whole lifetimes: the start and the few events before the clock are a small part.
    let worker_cpu = proc_stats::total_cpu_seconds(&pids);
    let database_cpu = database_cpu(db)
        .await?
        .into_iter()
        .filter(|(pid, _)| !backends_before.contains_key(pid))
        .map(|(_, cpu)| cpu)
        .sum::<Option<f64>>();
    for (child, &pid) in children.iter_mut().zip(&pids) {
        http_load::stop_process(child, pid).await?;
    }
    confirm_recorded(db, args.events).await?;
    Ok(ProcessDrain {
        elapsed,
        peak_rss_kib,
        worker_cpu,
        database_cpu,
        broker_cpu,
    })
}

/// How often the bench looks whether the workers are done.
const POLL: Duration = Duration::from_millis(2);

/// Where the bench reads how many events the workers recorded: the events of their committed
/// transactions (`clerk_sync_worker_batch_size`) less the duplicates among them (a delivery
/// the broker made twice). Waiting so costs the database nothing, where a `count(*)` of
/// `processed_events` every few milliseconds scans the whole table and takes CPU from the
/// worker it measures; [`confirm_recorded`] counts once at the end.
enum Committed<'a> {
    /// The worker running in this process.
    InProcess(&'a worker::metrics::Metrics),
    /// Worker processes, by the port each serves `/metrics` on.
    Processes {
        http: reqwest::Client,
        ports: Vec<u16>,
    },
}

impl Committed<'_> {
    fn processes(ports: Vec<u16>) -> Self {
        Self::Processes {
            http: reqwest::Client::new(),
            ports,
        }
    }

    /// Events recorded so far, all workers together.
    async fn events(&self) -> anyhow::Result<usize> {
        match self {
            Self::InProcess(metrics) => Ok((metrics.batch_size.get_sample_sum() as u64)
                .saturating_sub(metrics.duplicates.get())
                as usize),
            Self::Processes { http, ports } => {
                let mut events = 0;
                for port in ports {
                    let response = match http
                        .get(format!("http://127.0.0.1:{port}/metrics"))
                        .send()
                        .await
                    {
                        // Not listening yet: a worker starting has recorded nothing.
                        Err(error) if error.is_connect() => continue,
                        response => response?,
                    };
                    let text = response.error_for_status()?.text().await?;
                    let value = |name: &str| {
                        text.lines()
                            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                            .with_context(|| format!("no {name} in a worker's metrics"))?
                            .trim()
                            .parse::<f64>()
                            .map_err(anyhow::Error::from)
                    };
                    let committed = value("clerk_sync_worker_batch_size_sum")?;
                    let duplicates = value("clerk_sync_worker_duplicates_total")?;
                    events += (committed - duplicates).max(0.0) as usize;
                }
                Ok(events)
            }
        }
    }
}

/// Waits up to 10 s for `processed_events` to hold the `events` the workers said they recorded
/// (their two counters are read one after the other), and fails if it does not.
async fn confirm_recorded(db: &DatabaseConnection, events: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recorded = processed_events::Entity::find().count(db).await? as usize;
        if recorded == events {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the workers recorded {events} events, but processed_events holds {recorded}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A local port free now, for a process the bench starts to listen on.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The binary `name` (`worker` or `ingest`): `given` by its flag, or else the release build in
/// the folder above this example's. Fails, saying how to build it, when it is not there.
fn release_binary(given: Option<&std::path::Path>, name: &str) -> anyhow::Result<PathBuf> {
    let binary = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .map(|dir| dir.join(name))
            .with_context(|| format!("cannot locate the {name} binary; pass --{name}"))?,
    };
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p {name} --bin {name}`",
            binary.display()
        );
    }
    Ok(binary)
}

/// CPU-seconds so far of each backend on the bench's database, other than this query's, by pid.
async fn database_cpu(
    db: &DatabaseConnection,
) -> anyhow::Result<std::collections::HashMap<u32, Option<f64>>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
               AND pid <> pg_backend_pid()",
        ))
        .await?;
    let mut cpu = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let pid = u32::try_from(row.try_get::<i32>("", "pid")?)?;
        cpu.insert(pid, proc_stats::cpu_seconds(pid));
    }
    Ok(cpu)
}

/// One release worker process on the bench's queue and database, with the bench's settings,
/// serving its metrics on `port`.
fn spawn_worker(
    binary: &std::path::Path,
    db_url: &str,
    amqp_url: &str,
    topology: &Topology,
    args: &Args,
    port: u16,
) -> anyhow::Result<Child> {
    let mut command = Command::new(binary);
    command.env_clear();
    // The default log filter, as deployed (a line per event is part of the cost), unless the
    // bench is given one.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        command.env("RUST_LOG", filter);
    }
    command
        .env("DATABASE_URL", db_url)
        .envs(test_support::services::broker_env(amqp_url, topology))
        .env("WORKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("WORKER_RUN_MIGRATIONS", "false")
        .env("WORKER_BATCH_SIZE", args.batch_size.to_string())
        .env("WORKER_PREFETCH", args.prefetch.to_string())
        .env("WORKER_DB_POOL_SIZE", args.connections.to_string())
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker process")
}

/// N rows in chunks of `batch_size`, one `BEGIN; INSERT … VALUES (…), (…), … ON CONFLICT … DO
/// UPDATE … WHERE newer; COMMIT` per chunk, spread over `connections` tasks. With `history`,
/// each chunk's transaction also inserts each event's `processed_events` row (svix-id, type,
/// outcome, source, subject and the body as `jsonb`, as the worker records it) in one
/// multi-row insert: the least the contract asks per event.
async fn floor(db: &DatabaseConnection, args: &Args, history: bool) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let db = db.clone();
        let next = next.clone();
        let (events, batch_size) = (args.events, args.batch_size);
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch_size, Ordering::Relaxed);
                if start >= events {
                    return anyhow::Ok(());
                }
                let chunk = start..(start + batch_size).min(events);
                let mut users = format!("INSERT INTO users ({}) VALUES ", rows::COLUMNS);
                let mut user_values = Vec::with_capacity(chunk.len() * rows::PARAMETERS);
                for (i, n) in chunk.clone().enumerate() {
                    if i > 0 {
                        users.push_str(", ");
                    }
                    users.push_str(&rows::placeholders(i * rows::PARAMETERS));
                    user_values.extend(rows::values(rows::record(user(n))?));
                }
                users.push(' ');
                users.push_str(rows::UPSERT_TAIL);
                let txn = db.begin().await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    users,
                    user_values,
                ))
                .await?;
                if history {
                    let mut recorded = String::from(
                        "INSERT INTO processed_events (svix_id, event_type, outcome, \
                           processed_at, source, subject_kind, subject_id, payload) VALUES ",
                    );
                    let mut recorded_values = Vec::with_capacity(chunk.len() * 3);
                    for (i, n) in chunk.enumerate() {
                        if i > 0 {
                            recorded.push_str(", ");
                        }
                        recorded.push_str(&format!(
                            "(${}, 'user.created', 'applied', now(), 'webhook', 'user', ${}, ${})",
                            3 * i + 1,
                            3 * i + 2,
                            3 * i + 3
                        ));
                        recorded_values.extend([
                            bench_svix_id(n).into(),
                            format!("user_{n:08}").into(),
                            envelope(n).into(),
                        ]);
                    }
                    txn.execute_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        recorded,
                        recorded_values,
                    ))
                    .await?;
                }
                txn.commit().await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
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
            let sql = format!(
                "INSERT INTO users ({}) VALUES {} {}",
                rows::COLUMNS,
                rows::placeholders(0),
                rows::UPSERT_TAIL
            );
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    return anyhow::Ok(());
                }
                let txn = db.begin().await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    sql.as_str(),
                    rows::values(rows::record(user(n))?),
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

/// Consumes the pre-filled queue with the worker's prefetch, touching no database: what the
/// broker alone allows a consumer. `each` acknowledges every delivery on its own (as the worker
/// must: its batches finish out of order), 64 in flight; otherwise one acknowledgement covers 64
/// deliveries, the cheapest the protocol allows.
async fn drain(
    amqp_url: &str,
    topology: &Topology,
    args: &Args,
    each: bool,
) -> anyhow::Result<Duration> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            topology.queue.as_str().into(),
            "bench-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut pending = Vec::with_capacity(64);
    for n in 1..=args.events {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("the queue ran dry")?
            .context("the consumer ended")??;
        let last = n % 64 == 0 || n == args.events;
        if each {
            pending.push(async move { delivery.ack(BasicAckOptions::default()).await });
            if last {
                futures_util::future::try_join_all(pending.drain(..)).await?;
            }
        } else if last {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "drained".into()).await;
    Ok(elapsed)
}

/// Event `n` as the ingest publishes it: its svix-id, body and properties.
fn bench_event(n: usize) -> (String, Vec<u8>, BasicProperties) {
    let svix_id = bench_svix_id(n);
    let body = envelope(n);
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
    (svix_id, body.to_string().into_bytes(), properties)
}

/// Publishes N `user.created` events as the ingest does, with confirms, before the clock starts,
/// into the emptied queue, and checks that it then holds exactly those N.
async fn prefill(amqp_url: &str, topology: &Topology, events: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    // An earlier phase may have left messages behind (after the bare consumer that acknowledges
    // each delivery closed, up to a few hundred of the 60,000 it had acknowledged were back in
    // the queue): the next drain would take them as duplicates.
    channel
        .queue_purge(topology.queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &n in chunk {
            let (_, body, properties) = bench_event(n);
            confirms.push(
                channel
                    .basic_publish(
                        topology.exchange.as_str().into(),
                        "user.created".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
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
    let (ready, _) = queue_counts(&channel, &topology.queue).await?;
    if ready != events as u32 {
        bail!("the queue holds {ready} messages after the pre-fill of {events}");
    }
    let _ = connection.close(200, "prefilled".into()).await;
    Ok(())
}

/// Sends `args.trickle` events to the running worker, one every 10 ms, and returns the
/// milliseconds from just before each publish to the commit that recorded it.
async fn trickle(
    db: &DatabaseConnection,
    db_url: &str,
    amqp_url: &str,
    topology: &Topology,
    args: &Args,
) -> anyhow::Result<Vec<f64>> {
    // Notifications are delivered when the inserting transaction commits.
    db.execute_unprepared(
        "CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_notify('bench_applied', NEW.svix_id); RETURN NULL; END $$; \
         CREATE TRIGGER bench_notify AFTER INSERT ON processed_events \
           FOR EACH ROW EXECUTE FUNCTION bench_notify()",
    )
    .await?;
    let mut listener = sea_orm::sqlx::postgres::PgListener::connect(db_url).await?;
    listener.listen("bench_applied").await?;
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let sent = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let publisher = {
        let sent = sent.clone();
        let topology = topology.clone();
        let count = args.trickle;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for n in 0..count {
                tick.tick().await;
                let n = 1_000_000_000 + n;
                let (svix_id, body, properties) = bench_event(n);
                sent.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .insert(svix_id, Instant::now());
                let confirm = channel
                    .basic_publish(
                        topology.exchange.as_str().into(),
                        "user.created".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        properties,
                    )
                    .await?
                    .await?;
                if !confirm.is_ack() {
                    bail!("the broker refused a trickle event");
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let mut latencies = Vec::with_capacity(args.trickle);
    let deadline =
        Instant::now() + Duration::from_secs(60) + args.trickle as u32 * Duration::from_millis(10);
    while latencies.len() < args.trickle {
        let notification = tokio::time::timeout_at(deadline.into(), listener.recv())
            .await
            .context("the trickle did not finish in time")??;
        let committed = Instant::now();
        let published = sent
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .get(notification.payload())
            .copied()
            .context("a notification for an event not sent")?;
        latencies.push(committed.duration_since(published).as_secs_f64() * 1000.0);
    }
    publisher.await??;
    let _ = connection.close(200, "trickle done".into()).await;
    // A notification per recorded event is the trickle's own cost: the phases after it run
    // without it, as a deployed worker does.
    db.execute_unprepared("DROP TRIGGER bench_notify ON processed_events")
        .await?;
    Ok(latencies)
}

/// The `q`-quantile of `values` (sorted here), in their unit.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
