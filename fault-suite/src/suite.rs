//! The command line and the run of the chosen scenarios on one RabbitMQ node and one Postgres
//! cluster, both started here and removed at the end.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::cluster::RabbitCluster;

use crate::rabbit::{self, RabbitNode};
use crate::report;
use crate::scenario::{self, Binaries, Broker, Infrastructure, Load, Names, Scenario};
use crate::support;
use test_support::private_postgres::{self as postgres, PgCluster};

/// Runs the pipeline under faults and counts what was lost.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
pub struct Options {
    /// The scenario to run, or `all` (each fault alone, then all of them combined).
    #[arg(long, default_value = "all", value_parser = parse_scenario)]
    scenario: Selection,
    /// The short form, for CI: 20 s of load at 40 events/s per scenario (the default).
    #[arg(long, conflicts_with = "full")]
    short: bool,
    /// The full form: 120 s of load at 150 events/s per scenario.
    #[arg(long)]
    full: bool,
    /// Events per second, instead of the form's.
    #[arg(long)]
    rate: Option<u32>,
    /// Seconds of load per scenario, instead of the form's.
    #[arg(long)]
    seconds: Option<u64>,
    /// Seed of the user histories (random by default; printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory holding the `ingest` and `worker` binaries [default: this binary's directory].
    #[arg(long, env = "FAULT_SUITE_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// The `rabbitmq-server` start script [default: /usr/lib/rabbitmq/bin/rabbitmq-server, else
    /// the one on PATH].
    #[arg(long, env = "FAULT_SUITE_RABBITMQ_SERVER")]
    rabbitmq_server: Option<PathBuf>,
    /// Directory holding `initdb` and `pg_ctl` [default: PATH, else the newest
    /// /usr/lib/postgresql/<version>/bin].
    #[arg(long, env = "FAULT_SUITE_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Keep the working directory (logs, data) instead of removing it at the end.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone)]
enum Selection {
    All,
    One(Scenario),
}

fn parse_scenario(text: &str) -> Result<Selection, String> {
    if text == "all" {
        return Ok(Selection::All);
    }
    <Scenario as clap::ValueEnum>::from_str(text, false)
        .map(Selection::One)
        .map_err(|_| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            format!("one of: all, {}, cluster", names.join(", "))
        })
}

impl Options {
    fn load(&self) -> Load {
        let (rate, seconds) = if self.full { (150, 120) } else { (40, 20) };
        Load {
            rate: self.rate.unwrap_or(rate),
            seconds: self.seconds.unwrap_or(seconds),
            seed: self.seed.unwrap_or_else(rand::random),
        }
    }
}

/// Runs the selected scenarios; `Ok(false)` when any of them failed.
pub async fn run(options: Options) -> anyhow::Result<bool> {
    let binaries = binaries(options.bin_dir.as_deref())?;
    let server = rabbit::find_server(options.rabbitmq_server.as_deref())?;
    let pg_bin = match &options.pg_bin {
        Some(dir) => dir.clone(),
        None => postgres::find_bin_dir()?,
    };
    let load = options.load();
    let scenarios = match options.scenario {
        Selection::All => Scenario::ALL.to_vec(),
        Selection::One(scenario) => vec![scenario],
    };

    let workdir = support::workdir("fault-suite-").context("creating the working directory")?;
    println!(
        "fault-suite: {} scenario(s), {} events/s for {} s each, seed {}; working in {}",
        scenarios.len(),
        load.rate,
        load.seconds,
        load.seed,
        workdir.path().display()
    );

    let outcome = run_scenarios(
        &binaries,
        &server,
        &pg_bin,
        workdir.path(),
        &scenarios,
        load,
    )
    .await;
    if options.keep {
        let kept = workdir.keep();
        println!("fault-suite: kept {}", kept.display());
    }
    let reports = outcome?;
    let all: Vec<&scenario::Report> = reports.iter().collect();
    println!("\n{}", report::table(&all));
    let passed = reports.iter().all(scenario::Report::passed);
    println!("fault-suite: {}", if passed { "passed" } else { "FAILED" });
    Ok(passed)
}

async fn run_scenarios(
    binaries: &Binaries,
    server: &Path,
    pg_bin: &Path,
    workdir: &Path,
    scenarios: &[Scenario],
    load: Load,
) -> anyhow::Result<Vec<scenario::Report>> {
    let binaries = binaries.snapshot(&workdir.join("bin"))?;
    let binaries = &binaries;
    let mut postgres = PgCluster::start(pg_bin, &workdir.join("postgres")).await?;
    if scenarios == [Scenario::Cluster] {
        return run_on_cluster(binaries, server, &mut postgres, workdir, load).await;
    }
    let mut rabbit = RabbitNode::start(server, &workdir.join("rabbitmq")).await?;
    println!(
        "fault-suite: RabbitMQ at {}, Postgres at {}",
        rabbit.amqp_url(),
        postgres.url("")
    );

    let names: Vec<Names> = scenarios.iter().map(|&s| Names::new(s)).collect();
    prepare_queues(&mut rabbit, &names).await?;

    let mut reports = Vec::new();
    for (&scenario, names) in scenarios.iter().zip(names) {
        let infra = Infrastructure {
            rabbit: Broker::Node(&mut rabbit),
            postgres: &mut postgres,
            binaries,
            dir: workdir,
        };
        let report = scenario::run(infra, scenario, names, load).await;
        println!("\n{}", report::details(&report));
        println!("{}", report::table(&[&report]));
        reports.push(report);
    }
    Ok(reports)
}

/// The cluster scenario, on a three-node cluster of its own.
async fn run_on_cluster(
    binaries: &Binaries,
    server: &Path,
    postgres: &mut PgCluster,
    workdir: &Path,
    load: Load,
) -> anyhow::Result<Vec<scenario::Report>> {
    let mut cluster = RabbitCluster::start(server, &workdir.join("rabbitmq"), 3).await?;
    println!(
        "fault-suite: RabbitMQ cluster at {}, Postgres at {}",
        cluster.amqp_urls(),
        postgres.url("")
    );
    let names = Names::new(Scenario::Cluster);
    // Declared with the binaries' default group size (3), so the queues have a member on every
    // node; then each node is restarted cleanly, for the reason given in `prepare_queues`.
    let (connection, node) = shared::AmqpNodes::parse(&cluster.amqp_urls())
        .map_err(anyhow::Error::msg)?
        .connect(ConnectionProperties::default(), Duration::from_secs(10))
        .await?;
    names
        .topology
        .declare_on(&connection)
        .await
        .with_context(|| format!("declaring {} on {node}", names.topology.queue))?;
    let _ = connection.close(200, "declared".into()).await;
    cluster.rolling_restart().await?;
    let infra = Infrastructure {
        rabbit: Broker::Cluster(&mut cluster),
        postgres,
        binaries,
        dir: workdir,
    };
    let report = scenario::run(infra, Scenario::Cluster, names, load).await;
    println!("\n{}", report::details(&report));
    Ok(vec![report])
}

/// Declares every scenario's queues up front, then restarts the node cleanly, as a deployment
/// has its queues long before anything goes wrong. RabbitMQ 3.10 writes its registry of quorum
/// queues out lazily (every few minutes or at a clean stop): a quorum queue declared moments
/// before a SIGKILL does not come back after it, with or without messages.
async fn prepare_queues(rabbit: &mut RabbitNode, names: &[Names]) -> anyhow::Result<()> {
    let connection = Connection::connect(&rabbit.amqp_url(), ConnectionProperties::default())
        .await
        .context("connecting to the suite's RabbitMQ node")?;
    let channel = connection.create_channel().await?;
    for names in names {
        names
            .topology
            .declare(&channel)
            .await
            .with_context(|| format!("declaring {}", names.topology.queue))?;
    }
    let _ = connection.close(200, "declared".into()).await;
    rabbit.stop().await?;
    rabbit.restart().await
}

fn binaries(dir: Option<&Path>) -> anyhow::Result<Binaries> {
    let dir = match dir {
        Some(dir) => dir.to_owned(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .parent()
            .context("this binary has no directory")?
            .to_owned(),
    };
    let binaries = Binaries {
        ingest: dir.join("ingest"),
        worker: dir.join("worker"),
    };
    for binary in [&binaries.ingest, &binaries.worker] {
        if !binary.is_file() {
            bail!(
                "{} not found; build the binaries first (cargo build --release -p ingest -p \
                 worker -p fault-suite) or pass --bin-dir",
                binary.display()
            );
        }
    }
    Ok(binaries)
}
