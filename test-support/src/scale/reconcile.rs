//! `worker reconcile` at scale: a backfill into empty tables, then a run with nothing changed,
//! against the Backend API stand-in serving generated users, while a worker applies live
//! `user.updated` events of the same users (always newer than the listed versions, so the
//! listing never deletes them and reconcile finds them `stale`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

use super::live::LiveLoad;
use super::process::{Target, WorkerProcess, run_command};
use super::{CREATED_AT_BASE, Phase, Setup, user};
use crate::clerk_api::ClerkApi;
use crate::{TestDatabase, TestTopology, proc_stats};

/// Live event `n` is about the user at position `n × STRIDE` modulo the users: spread over the
/// listing, so the commands meet them everywhere.
pub(super) const STRIDE: usize = 104_729;

/// How long the bench waits for the live events of a part of the run to be applied.
pub(super) const LIVE_WITHIN: Duration = Duration::from_secs(180);

/// The kind of key reconcile runs with: it sets the default rate limit and the instance's
/// environment type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `sk_test_…`: 100 requests per 10 s by default.
    Development,
    /// `sk_live_…`: 1000 requests per 10 s by default.
    Production,
}

impl KeyKind {
    fn key(self) -> &'static str {
        match self {
            KeyKind::Development => "sk_test_scale_bench",
            KeyKind::Production => "sk_live_scale_bench",
        }
    }

    /// Clerk's limit for an instance of this kind, in requests per 10 s: what reconcile
    /// keeps to when `CLERK_API_RATE_LIMIT` is unset.
    pub fn default_rate_limit(self) -> u32 {
        match self {
            KeyKind::Development => 100,
            KeyKind::Production => 1000,
        }
    }
}

/// What a reconcile scenario runs.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileScenario {
    /// Users in the stand-in.
    pub users: usize,
    pub key: KeyKind,
    /// `CLERK_API_RATE_LIMIT` (requests per 10 s); `None` leaves it unset: the key's default.
    pub rate_limit: Option<u32>,
    /// Whether a run with nothing changed follows the backfill.
    pub unchanged: bool,
}

/// What a reconcile scenario measured.
#[derive(Debug, Clone)]
pub struct ReconcileFigures {
    /// The backfill, then the run with nothing changed.
    pub phases: Vec<Phase>,
    /// Rows in `users` at the end.
    pub stored_users: u64,
    /// The bench process's peak RSS in KiB: the stand-in, the live events, the bench itself.
    pub bench_peak_kib: Option<u64>,
    /// Backend API requests each phase made.
    pub api_requests: Vec<usize>,
    /// The rate limit reconcile kept to, in requests per 10 s.
    pub rate_limit: u32,
}

impl ReconcileFigures {
    /// The least time phase `index`'s requests take at the rate limit: the pacing alone.
    pub fn pacing_floor(&self, index: usize) -> Option<Duration> {
        let requests = *self.api_requests.get(index)?;
        Some(Duration::from_secs(10) * u32::try_from(requests).ok()? / self.rate_limit.max(1))
    }
}

/// Runs the scenario on a database and broker names of its own, both removed afterwards.
pub async fn run(setup: &Setup, scenario: ReconcileScenario) -> anyhow::Result<ReconcileFigures> {
    let database = TestDatabase::empty_on(&setup.admin_url).await;
    Migrator::up(&database.db, None)
        .await
        .context("migrating the bench database")?;
    let topology = TestTopology::declared().await;
    let target = Target {
        db_url: database.url.clone(),
        amqp_url: setup.amqp_url.clone(),
        env: setup.env.clone(),
        topology: topology.topology.clone(),
    };

    let api = ClerkApi::start(scenario.key.key()).await;
    // Every listed version is a little newer than its user's creation.
    api.generate_users(scenario.users, |position| {
        user(position, CREATED_AT_BASE + position as i64 + 321)
    });
    let mut env = vec![
        ("CLERK_SECRET_KEY", scenario.key.key().to_owned()),
        ("CLERK_API_URL", api.url().to_owned()),
    ];
    if let Some(limit) = scenario.rate_limit {
        env.push(("CLERK_API_RATE_LIMIT", limit.to_string()));
    }

    let worker = WorkerProcess::start(&setup.worker_bin, &target).await?;
    let users = scenario.users.max(1);
    let live = LiveLoad::start(
        &database.db,
        &database.url,
        &setup.amqp_url,
        &topology.exchange,
        setup.live_rate,
        Arc::new(move |n| user(n.wrapping_mul(STRIDE) % users, now_ms())),
    )
    .await?;

    let mut phases = Vec::new();
    let mut api_requests = Vec::new();
    let names = ["reconcile backfill", "reconcile with nothing changed"];
    for name in &names[..if scenario.unchanged { 2 } else { 1 }] {
        let idle = live.baseline(setup.idle, LIVE_WITHIN).await;
        let requests = api.served().len();
        let from = live.mark();
        let warnings = worker.warnings();
        let run = run_command(
            &setup.worker_bin,
            &target,
            &["reconcile"],
            &env,
            setup.command_timeout,
        )
        .await?;
        let to = live.mark();
        api_requests.push(api.served().len() - requests);
        let worker_peak_kib = worker.peak_kib();
        let during = live.latency(from, to, LIVE_WITHIN).await;
        phases.push(Phase {
            name: format!("{name} ({} users)", scenario.users),
            wall: run.wall,
            outcome: run.outcome,
            command_peak_kib: run.peak_kib,
            worker_peak_kib,
            idle,
            during,
            load: proc_stats::load_average().unwrap_or_default(),
            worker_warnings: worker.warnings().since(&warnings),
        });
        // As each command ends: a long run shows what it has so far.
        if let Some(phase) = phases.last() {
            print!("{phase}");
        }
    }
    live.finish().await?;
    worker.stop().await?;
    let stored_users = count(&database.db, "SELECT count(*) AS n FROM users").await?;
    Ok(ReconcileFigures {
        phases,
        stored_users,
        bench_peak_kib: proc_stats::peak_rss_kib(std::process::id()),
        api_requests,
        rate_limit: scenario
            .rate_limit
            .unwrap_or(scenario.key.default_rate_limit()),
    })
}

/// Clerk's milliseconds now: newer than any generated version.
pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The `n` of a `SELECT … AS n` that returns one bigint.
pub(super) async fn count(db: &DatabaseConnection, sql: &str) -> anyhow::Result<u64> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .context("a count")?;
    Ok(u64::try_from(row.try_get::<i64>("", "n")?)?)
}
