//! The repair commands at the size of a real Clerk instance, beside live events.
//!
//! ```text
//! cargo build --release -p worker --bins --examples
//! target/release/examples/worker-scale-bench --users 100000,1000000 --history 1000000
//! ```
//!
//! For each size: `worker reconcile` (a backfill into empty tables, then a run with nothing
//! changed) against the Backend API stand-in serving that many generated users; and `worker
//! rebuild` and `worker replay` over a history of that many rows filled by SQL. Each command
//! runs as its own process while a `worker` process applies live events at a steady rate; the
//! bench prints the command's wall time, the peak RSS of the command, of the worker and of the
//! bench (which serves the stand-in), and the live events' latency p50/p99/max during the
//! command next to an idle baseline measured just before it. See `test_support::scale`.
//!
//! By default everything runs on a Postgres cluster of the bench's own (`initdb` on a spare
//! port, default settings, removed afterwards), so a command that fills the lock table or the
//! disk harms no one else; `--postgres shared` uses `DATABASE_URL` instead. `AMQP_URL` names
//! the broker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use test_support::private_postgres::PgCluster;
use test_support::scale::history::{self, HistoryScenario};
use test_support::scale::reconcile::{self, KeyKind, ReconcileScenario};
use test_support::scale::{Phase, Setup, mib};

#[derive(Debug, Parser)]
struct Args {
    /// Users in the stand-in, one reconcile scenario per size (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    users: Vec<usize>,
    /// Rows of history, one rebuild/replay scenario per size (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    history: Vec<u64>,
    /// Rows of history per subject (version of a user).
    #[arg(long, default_value_t = 10)]
    versions: u64,
    /// Which scenarios run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reconcile,rebuild,replay"
    )]
    scenarios: Vec<Scenario>,
    /// The kind of key reconcile uses: its default rate limit and instance type.
    #[arg(long, value_enum, default_value_t = Key::Production)]
    key: Key,
    /// `CLERK_API_RATE_LIMIT` of each reconcile run (requests per 10 s), comma-separated:
    /// `default` (the key's), `unlimited` or a number. Each size runs once per value.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    rate_limit: Vec<String>,
    /// Only the backfill: no reconcile run with nothing changed after it.
    #[arg(long)]
    no_unchanged: bool,
    /// Live events per second.
    #[arg(long, default_value_t = 200)]
    live_rate: u32,
    /// Seconds of idle baseline before each command.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// Where the databases live.
    #[arg(long, value_enum, default_value_t = Postgres::Private)]
    postgres: Postgres,
    /// The `worker` binary; default: the one built beside this example.
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// A setting given to the worker and to every command, as `NAME=value` (repeatable), e.g.
    /// `--env WORKER_RECONCILE_CONNECTIONS=2`.
    #[arg(long = "env", value_parser = setting)]
    env: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Reconcile,
    Rebuild,
    Replay,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Key {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Postgres {
    Private,
    Shared,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker_bin = match &args.worker_bin {
        Some(path) => path.clone(),
        // target/<profile>/examples/<this> → target/<profile>/worker
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .context("the example's directory")?
            .join("worker"),
    };
    anyhow::ensure!(
        worker_bin.is_file(),
        "no worker binary at {} (build it with --bins, or pass --worker-bin)",
        worker_bin.display()
    );
    let cluster = match args.postgres {
        Postgres::Private => Some(PgCluster::start_temporary().await?),
        Postgres::Shared => None,
    };
    let setup = Setup {
        admin_url: match &cluster {
            Some(cluster) => cluster.url("postgres"),
            None => test_support::database_url(),
        },
        amqp_url: test_support::amqp_url(),
        worker_bin,
        live_rate: args.live_rate,
        idle: Duration::from_secs(args.idle_seconds),
        command_timeout: Duration::from_secs(3 * 3600),
        env: args.env.clone(),
    };
    println!(
        "{} · load {} · {} cores · Postgres {:?} · {} live events/s · worker {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        test_support::proc_stats::load_average().unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, usize::from),
        args.postgres,
        args.live_rate,
        setup.worker_bin.display()
    );
    for (name, value) in &setup.env {
        println!("{name}={value}");
    }

    let mut backfills = Vec::new();
    if args.scenarios.contains(&Scenario::Reconcile) {
        for &users in &args.users {
            for limit in &args.rate_limit {
                let scenario = ReconcileScenario {
                    users,
                    key: match args.key {
                        Key::Development => KeyKind::Development,
                        Key::Production => KeyKind::Production,
                    },
                    rate_limit: rate_limit(limit)?,
                    unchanged: !args.no_unchanged,
                };
                println!(
                    "\n== reconcile, {users} users, {:?} key, rate limit {limit}",
                    args.key
                );
                let figures = reconcile::run(&setup, scenario).await?;
                for (index, phase) in figures.phases.iter().enumerate() {
                    verdict(phase);
                    if let Some(floor) = figures.pacing_floor(index) {
                        // Within 15 % of the pacing alone: the rate limit is what it waited for.
                        let bound = if phase.wall.as_secs_f64() < 1.15 * floor.as_secs_f64() {
                            "the Backend API rate limit"
                        } else {
                            "the worker"
                        };
                        println!(
                            "  Backend API: {} requests, at most {} per 10 s: {:.1} s of pacing \
                             alone; bound by {bound}",
                            figures.api_requests[index],
                            figures.rate_limit,
                            floor.as_secs_f64()
                        );
                    }
                }
                println!(
                    "users stored: {} · bench process (stand-in, live events) peak RSS {}",
                    figures.stored_users,
                    mib(figures.bench_peak_kib)
                );
                if let Some(backfill) = figures.phases.first() {
                    backfills.push((users, limit.clone(), backfill.command_peak_kib));
                }
            }
        }
    }
    let replay = args.scenarios.contains(&Scenario::Replay);
    if args.scenarios.contains(&Scenario::Rebuild) || replay {
        for &rows in &args.history {
            let scenario = HistoryScenario {
                rows,
                subjects: (rows / args.versions.max(1)).max(1),
                rebuild: args.scenarios.contains(&Scenario::Rebuild),
                replay,
            };
            println!("\n== history: {rows} rows, {} subjects", scenario.subjects);
            let figures = history::run(&setup, scenario).await?;
            println!(
                "history filled in {:.1} s (not part of any figure)",
                figures.fill.as_secs_f64()
            );
            for phase in &figures.phases {
                verdict(phase);
            }
            println!("users stored: {}", figures.stored_users);
        }
    }
    if backfills.len() > 1 {
        println!("\n== reconcile backfill peak RSS by size");
        let smallest = backfills.iter().find_map(|(_, _, kib)| *kib);
        for (users, limit, kib) in &backfills {
            let ratio = match (kib, smallest) {
                (Some(kib), Some(smallest)) => format!("{:.2}", *kib as f64 / smallest as f64),
                _ => "-".to_owned(),
            };
            println!(
                "{users} users (rate limit {limit}): {} ({ratio} × the first)",
                mib(*kib)
            );
        }
    }
    drop(cluster);
    Ok(())
}

/// A `--env` value: `NAME=value`.
fn setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not NAME=value")),
    }
}

/// `CLERK_API_RATE_LIMIT` for a `--rate-limit` value.
fn rate_limit(value: &str) -> anyhow::Result<Option<u32>> {
    match value {
        "default" => Ok(None),
        // Far above what one process can send in 10 s.
        "unlimited" => Ok(Some(10_000_000)),
        number => Ok(Some(number.parse().with_context(|| {
            format!("--rate-limit {number:?}: default, unlimited or a number")
        })?)),
    }
}

/// The live-event targets, said for one phase.
fn verdict(phase: &Phase) {
    let ratio = phase.p99_ratio();
    let max = phase.during.max.unwrap_or_default();
    println!(
        "{}: p99 ≤ 2 × idle {}, no live event over 5 s {}, every live event applied {}",
        phase.name,
        match ratio {
            Some(ratio) if ratio <= 2.0 => "met",
            Some(_) => "MISSED",
            None => "-",
        },
        if max <= Duration::from_secs(5) {
            "met"
        } else {
            "MISSED"
        },
        if phase.during.applied == phase.during.published {
            "yes"
        } else {
            "NO"
        },
    );
}
