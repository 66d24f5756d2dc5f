//! The on-demand sync API's latency against the stand-in for Clerk's Backend API, with the
//! stand-in's own round trip measured in the same run as the floor.
//!
//! ```text
//! cargo run --release -p worker --example worker-on-demand-bench -- --users 2000 --concurrency 16
//! ```
//!
//! A worker runs in this process with the API on (no result reuse, no client-side rate limit to
//! speak of), on a fresh database and fresh queue names; the stand-in holds `--users` users.
//! 1. Floor: `GET /v1/users/{id}` straight to the stand-in, one at a time, on a keep-alive
//!    connection: what the Backend API call alone costs here.
//! 2. New users: `POST /v1/sync/users/{id}` for each user, one at a time: fetch, insert, answer.
//! 3. The same users again: fetch, found stale (same version), answer.
//! 4. New versions under `--concurrency` callers at once: fetch, update, answer.
//! 5. A herd: `--concurrency` callers for one id at once, `--herds` times, each herd sharing one
//!    Backend API call.
//!
//! Prints p50/p99/max per phase and each phase's p50 against the floor. Uses `DATABASE_URL` and
//! `AMQP_URL` like the tests, and drops the database and deletes the queues it made afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use test_support::TestEnv;
use test_support::clerk_api::ClerkApi;
use test_support::events::clerk_user;
use test_support::http::Client;
use worker::clerk::ClerkConfig;
use worker::on_demand::OnDemandConfig;

// The same allocator as the `worker` binary, so that the worker measured in this process is the
// one that runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Users in the stand-in; each phase syncs every one of them once.
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    /// Callers at once in phases 4 and 5.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Herds in phase 5.
    #[arg(long, default_value_t = 200)]
    herds: usize,
}

const KEY: &str = "sk_test_bench";
const TOKEN: &str = "bench-token";

fn user_id(n: usize) -> String {
    format!("user_{n:08}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.users > 0 && args.concurrency > 0,
        "--users and --concurrency must be above 0"
    );
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let put = |version: i64| {
        api.put_users((0..args.users).map(|n| {
            clerk_user(
                &user_id(n),
                Some(&format!("user{n}@example.org")),
                Some("client"),
                version,
            )
        }));
    };
    put(1_000);
    let config = worker::WorkerConfig {
        on_demand: Some(OnDemandConfig {
            token: TOKEN.into(),
            listen: None,
            timeout: Duration::from_secs(30),
            reuse: Duration::ZERO,
            clerk: ClerkConfig {
                rate_limit: 1_000_000,
                ..ClerkConfig::new(api.url(), KEY.to_owned().into())
            },
        }),
        ..env.config()
    };
    let worker = env.start_worker(config).await;
    let port = worker.api_port.context("the API is on")?;
    let client = Client::new();
    let headers = vec![("authorization".to_owned(), format!("Bearer {TOKEN}"))];
    println!(
        "users={} concurrency={} herds={}",
        args.users, args.concurrency, args.herds
    );

    // 1. The floor: the stand-in's own round trip.
    let stand_in = vec![("authorization".to_owned(), format!("Bearer {KEY}"))];
    let mut floor = Vec::with_capacity(args.users);
    for n in 0..args.users {
        let url = format!("{}/v1/users/{}", api.url(), user_id(n));
        let started = Instant::now();
        let answer = get(&client, &url, &stand_in).await?;
        floor.push(started.elapsed());
        ensure!(answer == 200, "the stand-in answered {answer}");
    }
    let floor = Summary::of("floor: GET /v1/users/{id} from the stand-in", floor, None);

    // 2. and 3. One at a time: inserts, then the same versions again (stale).
    for phase in ["new users, one at a time", "same versions again (stale)"] {
        let mut took = Vec::with_capacity(args.users);
        for n in 0..args.users {
            took.push(sync(&client, port, &headers, &user_id(n)).await?);
        }
        Summary::of(phase, took, Some(&floor));
    }

    // 4. New versions, `concurrency` callers at once over distinct users.
    put(2_000);
    let started = Instant::now();
    let took = concurrently(args.concurrency, args.users, |n| {
        let (client, headers) = (client.clone(), headers.clone());
        async move { sync(&client, port, &headers, &user_id(n)).await }
    })
    .await?;
    let wall = started.elapsed();
    Summary::of(
        &format!("new versions, {} callers at once", args.concurrency),
        took,
        Some(&floor),
    );
    println!("  {:.0} syncs/s", args.users as f64 / wall.as_secs_f64());

    // 5. Herds: `concurrency` callers for one id at once.
    let before = api.served().len();
    let mut took = Vec::with_capacity(args.herds * args.concurrency);
    for herd in 0..args.herds {
        let id = user_id(herd % args.users);
        let calls = (0..args.concurrency).map(|_| {
            let (client, headers, id) = (client.clone(), headers.clone(), id.clone());
            async move { sync(&client, port, &headers, &id).await }
        });
        for result in futures_util::future::join_all(calls).await {
            took.push(result?);
        }
    }
    let backend_calls = api.served().len() - before;
    Summary::of(
        &format!("herds of {} callers for one id", args.concurrency),
        took,
        Some(&floor),
    );
    println!(
        "  {} Backend API calls for {} herds ({} requests)",
        backend_calls,
        args.herds,
        args.herds * args.concurrency
    );
    worker.stop().await;
    Ok(())
}

/// One `POST /v1/sync/users/{id}`: its latency, failing on anything but 200.
async fn sync(
    client: &Client,
    port: u16,
    headers: &[(String, String)],
    id: &str,
) -> anyhow::Result<Duration> {
    let url = format!("http://127.0.0.1:{port}/v1/sync/users/{id}");
    let started = Instant::now();
    let answer = client.try_post(&url, headers, b"").await?;
    let took = started.elapsed();
    ensure!(answer.status == 200, "{url}: {answer:?}");
    Ok(took)
}

async fn get(client: &Client, url: &str, headers: &[(String, String)]) -> anyhow::Result<u16> {
    Ok(client.try_get_with(url, headers).await?.status)
}

/// Runs `call(0..count)` with at most `width` at once; the latencies in completion order.
async fn concurrently<F, Fut>(width: usize, count: usize, call: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>>,
{
    use futures_util::StreamExt as _;
    futures_util::stream::iter((0..count).map(call))
        .buffer_unordered(width)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Percentiles of one phase.
struct Summary {
    p50: Duration,
}

impl Summary {
    /// Prints the phase's p50, p99 and max (and its p50 against the floor's) and returns it.
    fn of(name: &str, mut took: Vec<Duration>, floor: Option<&Summary>) -> Summary {
        took.sort();
        let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (p50, p99, max) = (at(0.50), at(0.99), took[took.len() - 1]);
        let ratio = floor.map_or(String::new(), |floor| {
            format!(" ({:.1}x the floor's p50)", ms(p50) / ms(floor.p50))
        });
        println!(
            "{name}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms{ratio}",
            took.len(),
            ms(p50),
            ms(p99),
            ms(max)
        );
        Summary { p50 }
    }
}
