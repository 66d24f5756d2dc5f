//! The upgrade to the newest migration over a full history, while a worker applies live events:
//! `migrations up` finishes, every live event applies once, and the longest wait of a live event
//! during the upgrade is printed (next to the same figure right after it, as the idle baseline).
//!
//! The history holds `UPGRADE_HISTORY_ROWS` rows (default 50000, the short form CI runs); the
//! full form is one million:
//!
//! ```text
//! UPGRADE_HISTORY_ROWS=1000000 cargo test -p migrations --test it upgrade -- --nocapture
//! ```
//!
//! The upgrade is every migration from `m20261130_000006_extend_processed_events_into_history`
//! on. The live events start as soon as the upgrade has added the columns the worker writes
//! (`reason`, then `trace_id` in the last migration: the worker of this build cannot write the
//! history of the schema before; in production the previous release's workers run until the
//! upgrade ends); from then on the rest of the upgrade runs while the events apply.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use test_support::events::clerk_user;
use test_support::signing::svix_id;
use test_support::{BrokerChannel, TestDatabase, TestEnv, TestTopology, eventually};

/// Rows of history the short form fills.
const SHORT_FORM_ROWS: u64 = 50_000;
/// One live event every so often: 50 events a second.
const LIVE_EVERY: Duration = Duration::from_millis(20);
/// How long the idle baseline runs after the upgrade.
const BASELINE: Duration = Duration::from_secs(2);
const WITHIN: Duration = Duration::from_secs(120);

fn history_rows() -> u64 {
    match std::env::var("UPGRADE_HISTORY_ROWS") {
        Ok(text) => text
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|error| panic!("UPGRADE_HISTORY_ROWS={text:?}: {error}")),
        Err(_) => SHORT_FORM_ROWS,
    }
}

/// The live events published so far: svix-id, when it was published, and when the test first
/// saw its history row (the worker's commit).
#[derive(Default)]
struct Live {
    published: Vec<(String, Instant, bool)>,
    applied: HashMap<String, Instant>,
}

impl Live {
    /// Looks up the history rows of the events not seen applied yet.
    async fn look(&mut self, db: &DatabaseConnection) {
        let waiting: Vec<String> = self
            .published
            .iter()
            .filter(|(id, _, _)| !self.applied.contains_key(id))
            .map(|(id, _, _)| id.clone())
            .collect();
        if waiting.is_empty() {
            return;
        }
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT svix_id FROM processed_events WHERE svix_id = ANY($1)",
                [waiting.into()],
            ))
            .await
            .expect("look up the live events");
        let now = Instant::now();
        for row in rows {
            let id: String = row.try_get("", "svix_id").expect("svix_id");
            self.applied.entry(id).or_insert(now);
        }
    }

    /// The waits of the events published during the upgrade (`true`) or after it (`false`),
    /// sorted.
    fn waits(&self, during: bool) -> Vec<Duration> {
        let mut waits: Vec<Duration> = self
            .published
            .iter()
            .filter(|(_, _, in_upgrade)| *in_upgrade == during)
            .map(|(id, at, _)| self.applied[id].duration_since(*at))
            .collect();
        waits.sort();
        waits
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect(sql)
        .expect("a row")
        .try_get("", "n")
        .expect("n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_over_a_full_history_runs_while_a_worker_applies_live_events() {
    let rows = history_rows();
    let env = TestEnv {
        broker: BrokerChannel::open().await,
        database: TestDatabase::empty().await,
        topology: TestTopology::declared().await,
    };
    let before = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261130_000006_extend_processed_events_into_history")
        .expect("the history migration");
    Migrator::up(
        env.db(),
        Some(u32::try_from(before).expect("a few migrations")),
    )
    .await
    .expect("up to the migration before the history's");
    let fill = Instant::now();
    env.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
             SELECT 'msg_history_' || g, 'user.updated', 'applied', \
                    now() - g * interval '1 second' \
             FROM generate_series(1, $1::bigint) AS g",
            [i64::try_from(rows).expect("rows").into()],
        ))
        .await
        .expect("fill the history");
    println!("history: {rows} rows filled in {:.1?}", fill.elapsed());

    // The worker of this build, consuming; the migrations are the Job's to run.
    let mut config = env.config();
    config.run_migrations = false;
    let worker = env.start_worker(config).await;
    eventually(WITHIN, "the worker consuming", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;

    let started = Instant::now();
    let upgrade = tokio::process::Command::new(env!("CARGO_BIN_EXE_migrations"))
        .env_clear()
        .arg("up")
        .env("DATABASE_URL", env.db_url())
        .env("LOG_FORMAT", "json")
        .kill_on_drop(true)
        .output();
    let mut upgrade = tokio::spawn(upgrade);
    eventually(WITHIN, "the new history columns", || async {
        count(
            env.db(),
            "SELECT count(*) AS n FROM information_schema.columns \
             WHERE table_name = 'processed_events' \
               AND column_name IN ('reason', 'trace_id')",
        )
        .await
            == 2
    })
    .await;
    let columns_after = started.elapsed();

    let mut live = Live::default();
    let mut ticks = tokio::time::interval(LIVE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upgrade_took = None;
    let mut baseline_until = None;
    let mut number = 0;
    loop {
        ticks.tick().await;
        if upgrade_took.is_none() && upgrade.is_finished() {
            let output = (&mut upgrade)
                .await
                .expect("join")
                .expect("run migrations up");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            upgrade_took = Some(started.elapsed());
            baseline_until = Some(Instant::now() + BASELINE);
        }
        if baseline_until.is_some_and(|until| Instant::now() >= until) {
            break;
        }
        number += 1;
        let id = svix_id();
        env.publish_event(
            &id,
            "user.created",
            clerk_user(&format!("user_live_{number}"), None, None, 1_000),
        )
        .await;
        live.published
            .push((id, Instant::now(), upgrade_took.is_none()));
        live.look(env.db()).await;
    }
    let deadline = Instant::now() + WITHIN;
    while live.applied.len() < live.published.len() {
        assert!(Instant::now() < deadline, "live events left unapplied");
        tokio::time::sleep(Duration::from_millis(10)).await;
        live.look(env.db()).await;
    }
    worker.stop().await;

    let during = live.waits(true);
    let after = live.waits(false);
    let upgrade_took = upgrade_took.expect("the upgrade ended");
    println!(
        "upgrade over {rows} history rows: {upgrade_took:.2?} (columns added after \
         {columns_after:.2?})"
    );
    println!(
        "live events during the upgrade: {}, longest wait {:.0?}, p50 {:.0?}, p99 {:.0?}",
        during.len(),
        during.last().copied().unwrap_or_default(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
    );
    println!(
        "live events in the {BASELINE:?} after it: {}, longest wait {:.0?}, p50 {:.0?}, p99 {:.0?}",
        after.len(),
        after.last().copied().unwrap_or_default(),
        percentile(&after, 0.5),
        percentile(&after, 0.99),
    );

    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        Migrator::get_pending_migrations(env.db())
            .await
            .expect("pending")
            .len(),
        0,
        "every migration applied"
    );
    let live_count = i64::try_from(live.published.len()).expect("count");
    assert_eq!(
        count(env.db(), "SELECT count(*) AS n FROM processed_events").await,
        i64::try_from(rows).expect("rows") + live_count,
        "the history kept, and each live event recorded once"
    );
    assert_eq!(
        count(
            env.db(),
            "SELECT count(*) AS n FROM users WHERE id LIKE 'user_live_%'"
        )
        .await,
        live_count,
        "every live user written"
    );
    assert_eq!(
        count(
            env.db(),
            "SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid"
        )
        .await,
        0,
        "no index left invalid"
    );
    assert_eq!(
        count(
            env.db(),
            "SELECT count(*) AS n FROM pg_constraint WHERE NOT convalidated"
        )
        .await,
        0,
        "every constraint validated"
    );
}
