//! The scenarios: the whole pipeline under a steady load while one fault (or all of them, one
//! after the other) strikes, then the count of what was lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use rand::RngCore;
use shared::{Backoff, Topology};

use crate::check::{self, Verdict};
use crate::cluster::RabbitCluster;
use crate::history;
use crate::rabbit::RabbitNode;
use crate::sender::{self, SenderConfig, SenderOutcome, SenderStats};
use crate::service::Service;
use crate::support;
use test_support::private_postgres::PgCluster;

/// How long a broker or database outage lasts before the suite brings it back.
const OUTAGE: Duration = Duration::from_secs(3);
/// How long a cluster node stays dead before the suite restarts it: long enough for every
/// client to notice and move to another node.
const NODE_OUTAGE: Duration = Duration::from_secs(10);
/// How long the pipeline may take, after the load, to get every event acknowledged and applied.
const CATCH_UP: Duration = Duration::from_secs(180);

/// A fault scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// RabbitMQ killed with SIGKILL and restarted.
    RabbitmqKill,
    /// Postgres stopped in immediate mode and restarted.
    PostgresImmediate,
    /// The worker killed with SIGKILL and restarted, twice.
    WorkerKill,
    /// The ingest sent SIGTERM and restarted.
    IngestTerm,
    /// A second worker joining and leaving midway.
    SecondWorker,
    /// All of the above, one after the other, in one run.
    Combined,
    /// A three-node RabbitMQ cluster, two ingests and two workers given all three addresses:
    /// the node leading the worker queue killed with SIGKILL and restarted, then another one.
    /// Not part of `all`: it needs a cluster of its own (`--scenario cluster`).
    Cluster,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::RabbitmqKill,
        Scenario::PostgresImmediate,
        Scenario::WorkerKill,
        Scenario::IngestTerm,
        Scenario::SecondWorker,
        Scenario::Combined,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::RabbitmqKill => "rabbitmq-kill",
            Scenario::PostgresImmediate => "postgres-immediate",
            Scenario::WorkerKill => "worker-kill",
            Scenario::IngestTerm => "ingest-term",
            Scenario::SecondWorker => "second-worker",
            Scenario::Combined => "combined",
            Scenario::Cluster => "cluster",
        }
    }

    /// The faults, each at a fraction of the load's duration.
    fn faults(self) -> Vec<(f64, Fault)> {
        match self {
            Scenario::RabbitmqKill => vec![(0.33, Fault::KillRabbit)],
            Scenario::PostgresImmediate => vec![(0.33, Fault::StopPostgres)],
            Scenario::WorkerKill => vec![(0.3, Fault::KillWorker), (0.6, Fault::KillWorker)],
            Scenario::IngestTerm => vec![(0.4, Fault::TerminateIngest)],
            Scenario::SecondWorker => vec![(0.3, Fault::AddWorker), (0.65, Fault::RemoveWorker)],
            Scenario::Combined => vec![
                (0.1, Fault::KillRabbit),
                (0.22, Fault::AddWorker),
                (0.34, Fault::StopPostgres),
                (0.46, Fault::KillWorker),
                (0.58, Fault::TerminateIngest),
                (0.7, Fault::KillWorker),
                (0.82, Fault::RemoveWorker),
            ],
            Scenario::Cluster => vec![(0.33, Fault::KillLeader), (0.66, Fault::KillAnotherNode)],
        }
    }

    /// Ingests and workers running from the start: one each, and two each on the cluster.
    fn replicas(self) -> usize {
        if self == Scenario::Cluster { 2 } else { 1 }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillRabbit,
    StopPostgres,
    KillWorker,
    TerminateIngest,
    AddWorker,
    RemoveWorker,
    /// SIGKILL to the cluster node leading the worker queue, restarted after [`NODE_OUTAGE`].
    KillLeader,
    /// SIGKILL to a cluster node other than the one killed before, restarted likewise.
    KillAnotherNode,
}

/// The broker the scenario runs on.
pub enum Broker<'a> {
    Node(&'a mut RabbitNode),
    Cluster(&'a mut RabbitCluster),
}

impl Broker<'_> {
    /// `AMQP_URL` for the binaries: the node's URL, or every cluster node's.
    fn amqp_url(&self) -> String {
        match self {
            Broker::Node(node) => node.amqp_url(),
            Broker::Cluster(cluster) => cluster.amqp_urls(),
        }
    }

    /// A running node to read queue depths from.
    fn checking(&self) -> anyhow::Result<&RabbitNode> {
        match self {
            Broker::Node(node) => Ok(node),
            Broker::Cluster(cluster) => cluster.running(),
        }
    }
}

/// The load of one scenario.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Events started per second.
    pub rate: u32,
    /// How long events are started for.
    pub seconds: u64,
    /// Seed of the user histories.
    pub seed: u64,
}

/// The binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ingest: PathBuf,
    pub worker: PathBuf,
}

impl Binaries {
    /// Copies both binaries into `dir` and returns the copies. A run lasts many minutes, and a
    /// build in the same target directory meanwhile must not swap the binaries under it.
    pub fn snapshot(&self, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let copy = |binary: &Path, name: &str| -> anyhow::Result<PathBuf> {
            let target = dir.join(name);
            std::fs::copy(binary, &target)
                .with_context(|| format!("copying {}", binary.display()))?;
            Ok(target)
        };
        Ok(Self {
            ingest: copy(&self.ingest, "ingest")?,
            worker: copy(&self.worker, "worker")?,
        })
    }
}

/// The infrastructure the scenarios share; each scenario has its own database and queue names.
pub struct Infrastructure<'a> {
    pub rabbit: Broker<'a>,
    pub postgres: &'a mut PgCluster,
    pub binaries: &'a Binaries,
    pub dir: &'a Path,
}

/// The queue names and the database of one scenario, its own so nothing carries over.
#[derive(Debug, Clone)]
pub struct Names {
    pub topology: Topology,
    pub database: String,
}

impl Names {
    pub fn new(scenario: Scenario) -> Self {
        let name = scenario.name();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Self {
            topology: Topology::prefixed(&format!("faults-{name}-{}", &suffix[..8])),
            database: format!("faults_{}_{}", name.replace('-', "_"), &suffix[..8]),
        }
    }
}

/// What one scenario did and found.
pub struct Report {
    pub scenario: Scenario,
    pub stats: SenderStats,
    /// Answers other than 2xx and 503, by status code.
    pub other_statuses: BTreeMap<u16, u64>,
    /// Events still without a 2xx when the sender gave up.
    pub undelivered: u64,
    /// Deliveries the workers recognised as already processed (from their `/metrics`).
    pub duplicates_absorbed: Option<u64>,
    pub verdict: Verdict,
    /// What happened when, for the log.
    pub timeline: Vec<String>,
    /// Why the scenario could not run to its end, if it could not.
    pub error: Option<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.undelivered == 0
            && self.stats.rejected == 0
            && self.verdict.passed()
    }
}

/// Runs one scenario from a fresh database and fresh queue names to its verdict.
pub async fn run(
    infra: Infrastructure<'_>,
    scenario: Scenario,
    names: Names,
    load: Load,
) -> Report {
    let mut run = Run {
        scenario,
        started: Instant::now(),
        timeline: Vec::new(),
        workers: Vec::new(),
        ingests: Vec::new(),
        killed_node: None,
        duplicates_seen: 0.0,
        duplicates_metric_found: false,
    };
    let outcome = run.execute(infra, names, load).await;
    let (sent, verdict, error) = match outcome {
        Ok((sent, verdict)) => (Some(sent), verdict, None),
        Err(error) => (None, Verdict::default(), Some(format!("{error:#}"))),
    };
    let mut report = Report {
        scenario,
        stats: sent.as_ref().map(|s| s.stats).unwrap_or_default(),
        other_statuses: sent
            .as_ref()
            .map(|s| s.other_statuses.clone())
            .unwrap_or_default(),
        undelivered: sent.as_ref().map_or(0, |s| s.undelivered),
        duplicates_absorbed: run
            .duplicates_metric_found
            .then_some(run.duplicates_seen as u64),
        verdict,
        timeline: run.timeline,
        error,
    };
    if !report.passed() {
        for service in run.workers.iter().chain(run.ingests.iter()) {
            report.timeline.push(format!(
                "last lines of {}:\n{}",
                service.name(),
                service.log_tail(15)
            ));
        }
    }
    report
}

struct Run {
    scenario: Scenario,
    started: Instant,
    timeline: Vec<String>,
    /// The first worker, and the second while it is there.
    workers: Vec<Service>,
    /// The ingests; the first is the one faults strike.
    ingests: Vec<Service>,
    /// The cluster node killed last.
    killed_node: Option<usize>,
    /// Duplicates the workers reported, summed over the processes that have been stopped.
    duplicates_seen: f64,
    duplicates_metric_found: bool,
}

/// Everything a service of this scenario needs to be started again.
struct Setup {
    environment: Vec<(String, String)>,
    /// The worker queue's name.
    queue: String,
    dir: PathBuf,
}

impl Run {
    async fn execute(
        &mut self,
        infra: Infrastructure<'_>,
        names: Names,
        load: Load,
    ) -> anyhow::Result<(SenderOutcome, Verdict)> {
        let Infrastructure {
            mut rabbit,
            postgres,
            binaries,
            dir,
        } = infra;
        let Names { topology, database } = names;
        postgres.create_database(&database).await?;
        let secret = new_secret();
        let setup = Setup {
            environment: environment(&topology, &rabbit.amqp_url(), &postgres.url(&database)),
            queue: topology.queue.clone(),
            dir: dir.to_owned(),
        };

        // The worker first: it applies the migrations the database needs.
        for number in 1..=self.scenario.replicas() {
            self.workers
                .push(start_worker(binaries, &setup, &format!("worker-{number}")).await?);
        }
        let mut urls = Vec::new();
        for number in 1..=self.scenario.replicas() {
            let ingest_port = support::spare_port()?;
            let mut ingest_environment = setup.environment.clone();
            ingest_environment.extend([
                ("CLERK_WEBHOOK_SECRET".to_owned(), secret.clone()),
                (
                    "INGEST_LISTEN".to_owned(),
                    format!("127.0.0.1:{ingest_port}"),
                ),
            ]);
            let name = if number == 1 {
                "ingest".to_owned()
            } else {
                format!("ingest-{number}")
            };
            self.ingests.push(
                Service::start(
                    &name,
                    &binaries.ingest,
                    ingest_environment,
                    ingest_port,
                    dir,
                )
                .await?,
            );
            urls.push(format!("http://127.0.0.1:{ingest_port}/api/webhooks").parse()?);
        }
        self.note("pipeline up");

        // Users are planned ten seconds' worth at a time; the load lasts as long as it must.
        let chunk = usize::try_from(load.rate)?.max(1) * 10;
        let sender = sender::start(
            SenderConfig {
                urls,
                secret,
                rate: load.rate,
                retry: Backoff {
                    base: Duration::from_millis(250),
                    max: Duration::from_secs(5),
                },
                duplicate_ratio: 0.02,
            },
            history::endless(chunk, load.seed),
        )?;

        // The faults come at their share of the load's duration, measured between the end of
        // one fault and the start of the next: a slow recovery (RabbitMQ can take half a minute
        // to replay its logs) delays what follows instead of bunching it up, and the load goes on
        // throughout.
        let seconds = load.seconds as f64;
        let mut previous = (Instant::now(), 0.0);
        for (at, fault) in self.scenario.faults() {
            let due = previous.0 + Duration::from_secs_f64(seconds * (at - previous.1));
            tokio::time::sleep_until(due.into()).await;
            self.inject(fault, &mut rabbit, postgres, binaries, &setup)
                .await
                .with_context(|| format!("injecting {fault:?}"))?;
            previous = (Instant::now(), at);
        }
        let end = previous.0 + Duration::from_secs_f64(seconds * (1.0 - previous.1));
        tokio::time::sleep_until(end.into()).await;
        sender.stop_starting();
        let outcome = sender.finish(CATCH_UP).await;
        self.note(&format!(
            "load done: {} events, {} with a 2xx",
            outcome.stats.sent, outcome.stats.accepted
        ));
        let db = check::connect(&postgres.url(&database)).await?;
        check::wait_until_drained(
            rabbit.checking()?,
            &topology,
            &db,
            &outcome.ledger,
            CATCH_UP,
        )
        .await?;
        self.note("caught up");
        for worker in &self.workers {
            let seen = scrape_duplicates(worker).await;
            self.duplicates_metric_found |= seen.is_some();
            self.duplicates_seen += seen.unwrap_or(0.0);
        }
        let verdict = check::verify(rabbit.checking()?, &topology, &db, &outcome.ledger).await?;
        db.close().await?;

        // The end of a scenario is a graceful stop, which must succeed too.
        for mut ingest in std::mem::take(&mut self.ingests) {
            ingest.terminate().await?;
        }
        for mut worker in std::mem::take(&mut self.workers) {
            worker.terminate().await?;
        }
        Ok((outcome, verdict))
    }

    async fn inject(
        &mut self,
        fault: Fault,
        broker: &mut Broker<'_>,
        postgres: &mut PgCluster,
        binaries: &Binaries,
        setup: &Setup,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::KillRabbit => {
                let Broker::Node(rabbit) = broker else {
                    anyhow::bail!("this fault needs a single node");
                };
                rabbit.kill().await?;
                self.note("RabbitMQ killed (SIGKILL)");
                tokio::time::sleep(OUTAGE).await;
                rabbit.restart().await?;
                self.note("RabbitMQ back");
            }
            Fault::StopPostgres => {
                postgres.stop_immediate().await?;
                self.note("Postgres stopped (immediate)");
                tokio::time::sleep(OUTAGE).await;
                postgres.start_server().await?;
                self.note("Postgres back");
            }
            Fault::KillWorker => {
                let worker = self.workers.first_mut().context("no worker running")?;
                // Read its duplicate count just before it dies, as it dies with it.
                let seen = scrape_duplicates(worker).await;
                worker.kill().await?;
                self.count_duplicates(seen);
                self.note("worker-1 killed (SIGKILL)");
                let worker = self.workers.first_mut().context("no worker running")?;
                worker.restart().await?;
                self.note("worker-1 back");
            }
            Fault::TerminateIngest => {
                let ingest = self.ingests.first_mut().context("no ingest running")?;
                ingest.terminate().await?;
                self.note("ingest stopped (SIGTERM, exit 0)");
                let ingest = self.ingests.first_mut().context("no ingest running")?;
                ingest.restart().await?;
                self.note("ingest back");
            }
            Fault::AddWorker => {
                self.workers
                    .push(start_worker(binaries, setup, "worker-2").await?);
                self.note("worker-2 joined");
            }
            Fault::RemoveWorker => {
                let mut worker = self.workers.pop().context("no second worker")?;
                let seen = scrape_duplicates(&worker).await;
                worker.terminate().await?;
                self.count_duplicates(seen);
                self.note("worker-2 left (SIGTERM, exit 0)");
            }
            Fault::KillLeader | Fault::KillAnotherNode => {
                let Broker::Cluster(cluster) = broker else {
                    anyhow::bail!("this fault needs a cluster");
                };
                let leader = cluster.leader_of(&setup.queue).await?;
                let victim = match (fault, self.killed_node) {
                    (Fault::KillAnotherNode, Some(before)) if before == leader => {
                        (before + 1) % cluster.nodes().len()
                    }
                    _ => leader,
                };
                let name = cluster.nodes()[victim].node_name().to_owned();
                let role = if victim == leader {
                    "the worker queue's leader"
                } else {
                    "a follower"
                };
                cluster.kill(victim).await?;
                self.killed_node = Some(victim);
                self.note(&format!("RabbitMQ node {name} ({role}) killed (SIGKILL)"));
                tokio::time::sleep(NODE_OUTAGE).await;
                let now_leading = cluster.leader_of(&setup.queue).await?;
                self.note(&format!(
                    "worker queue led by {}",
                    cluster.nodes()[now_leading].node_name()
                ));
                cluster.restart(victim).await?;
                self.note(&format!("RabbitMQ node {name} back in the cluster"));
            }
        }
        Ok(())
    }

    fn count_duplicates(&mut self, seen: Option<f64>) {
        self.duplicates_metric_found |= seen.is_some();
        self.duplicates_seen += seen.unwrap_or(0.0);
    }

    fn note(&mut self, what: &str) {
        self.timeline.push(format!(
            "{:>7.1}s  {what}",
            self.started.elapsed().as_secs_f64()
        ));
    }
}

async fn scrape_duplicates(worker: &Service) -> Option<f64> {
    worker.metric_sum("duplicates_total").await
}

async fn start_worker(binaries: &Binaries, setup: &Setup, name: &str) -> anyhow::Result<Service> {
    let port = support::spare_port()?;
    let mut environment = setup.environment.clone();
    environment.push(("WORKER_LISTEN".to_owned(), format!("127.0.0.1:{port}")));
    Service::start(name, &binaries.worker, environment, port, &setup.dir).await
}

/// The settings both binaries get; nothing else of the suite's own environment is passed on.
fn environment(topology: &Topology, amqp_url: &str, database_url: &str) -> Vec<(String, String)> {
    let mut environment: Vec<(String, String)> = topology
        .child_env(amqp_url)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    environment.push(("DATABASE_URL".to_owned(), database_url.to_owned()));
    if let Ok(filter) = std::env::var("RUST_LOG") {
        environment.push(("RUST_LOG".to_owned(), filter));
    }
    environment
}

/// A fresh signing secret: 24 random bytes, as Svix issues them.
fn new_secret() -> String {
    let mut key = [0_u8; 24];
    rand::rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}
