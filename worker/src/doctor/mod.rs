//! `worker doctor`: what a newcomer runs when something is off, inside the compose stack or
//! anywhere the settings are. It checks every link the sync depends on and prints one line per
//! check: a verdict, what it found, and what to do about it.
//!
//! - `database`: reachable, and every migration applied (read without writing anything);
//! - `broker`: reachable;
//! - `topology`: the exchange, the worker queue and the dead-letter queue exist (passive
//!   declares, which create nothing);
//! - `consumers`: at least one consumer on the worker queue;
//! - `queue`: the messages waiting in the worker queue;
//! - `dead letters`: the messages parked in the dead-letter queue;
//! - `last event`: the age of the last event received from Clerk (`processed_events`);
//! - `webhook secret`: whether `CLERK_WEBHOOK_SECRET` is the public demo secret, where this
//!   process sees the ingest's setting (the compose file gives the worker the same one);
//! - `clerk key`: `CLERK_SECRET_KEY` set and accepted by the Backend API (one call,
//!   `GET /v1/instance`, which names the instance the key belongs to), and of the instance the
//!   database mirrors (`crate::pin`), which the line names;
//! - `last reconcile`: the last reconcile run and its outcome (`reconcile_runs`).
//!
//! Verdicts: `ok`, `warn` (works, but look), `FAIL` (broken: the command exits non-zero) and
//! `skip` (not checked, the line says why). A check that needs an unreachable service is skipped.

mod broker;
mod report;

use std::time::Duration;

use chrono::{DateTime, Utc};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Statement};
use sea_orm_migration::MigrationStatus;
use secrecy::ExposeSecret;

use crate::clerk::{ClerkClient, ClerkConfig, ClerkError};
use crate::database::{Pool, connect};

pub use report::{Check, Report, Verdict};

/// The longest wait for any one service: the doctor answers quickly or says what did not.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A reconcile still `running` after this long has most likely lost its process.
const RECONCILE_LOST_AFTER: Duration = Duration::from_secs(6 * 3600);

/// `worker doctor [--json]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DoctorArgs {
    /// Print one JSON object, `{"ok": …, "checks": [{"check", "verdict", "detail", "fix"}]}`,
    /// instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// `worker doctor`: prints the report, and fails when a check failed.
pub async fn execute(settings: &shared::Settings, args: DoctorArgs) -> anyhow::Result<()> {
    let report = diagnose(settings).await;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for check in &report.checks {
            println!("{check}");
        }
    }
    match report.failed() {
        0 => Ok(()),
        failed => anyhow::bail!("{failed} of {} checks failed", report.checks.len()),
    }
}

/// Runs every check. Never fails: what cannot be checked is a line of the report.
pub async fn diagnose(settings: &shared::Settings) -> Report {
    let mut checks = Vec::new();
    let db = database(settings, &mut checks).await;
    broker::check(settings, &mut checks).await;
    checks.push(last_event(db.as_ref()).await);
    checks.push(webhook_secret(settings));
    checks.push(clerk_key(settings, db.as_ref()).await);
    checks.push(last_reconcile(db.as_ref(), settings).await);
    if let Some(db) = db {
        let _ = db.close().await;
    }
    let ok = checks.iter().all(|c| c.verdict != Verdict::Fail);
    Report { ok, checks }
}

/// `host:port/database` of a Postgres URL, without the credentials.
fn database_place(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => format!(
            "{}:{}{}",
            url.host_str().unwrap_or("?"),
            url.port().unwrap_or(5432),
            url.path()
        ),
        Err(_) => "DATABASE_URL".into(),
    }
}

/// The `database` check; the connection when the database answered.
async fn database(
    settings: &shared::Settings,
    checks: &mut Vec<Check>,
) -> Option<DatabaseConnection> {
    const NAME: &str = "database";
    let url = match settings.database_url() {
        Ok(url) => url,
        Err(error) => {
            checks.push(
                Check::new(NAME, Verdict::Fail, error.to_string())
                    .fix("set DATABASE_URL, e.g. postgres://user:password@host:5432/clerk_sync"),
            );
            return None;
        }
    };
    let place = database_place(url.expose_secret());
    // At once rather than lazily: an unreachable database is this check's answer.
    let pool = Pool {
        size: 2,
        lock_timeout: None,
        lazy: false,
    };
    let connected = tokio::time::timeout(TIMEOUT * 2, connect(&url, pool)).await;
    let db = match connected {
        Ok(Ok(db)) => db,
        Ok(Err(error)) => {
            checks.push(
                Check::new(
                    NAME,
                    Verdict::Fail,
                    format!("cannot connect to {place}: {error}"),
                )
                .fix("start Postgres, or correct DATABASE_URL (host, port, password, database)"),
            );
            return None;
        }
        Err(_) => {
            checks.push(
                Check::new(
                    NAME,
                    Verdict::Fail,
                    format!("no answer from {place} within {:?}", TIMEOUT * 2),
                )
                .fix("start Postgres, or correct the host and port of DATABASE_URL"),
            );
            return None;
        }
    };
    // Read-only: a doctor creates no migration table in a database that has none.
    let check = match Migrator::get_migration_with_status_read_only(&db).await {
        Ok(migrations) => {
            let total = migrations.len();
            let pending: Vec<_> = migrations
                .iter()
                .filter(|m| m.status() == MigrationStatus::Pending)
                .collect();
            match pending.first() {
                None => Check::ok(
                    NAME,
                    format!("reachable at {place}; all {total} migrations applied"),
                ),
                Some(first) => Check::new(
                    NAME,
                    Verdict::Fail,
                    format!(
                        "reachable at {place}; {} of {total} migrations pending, from {}",
                        pending.len(),
                        first.name()
                    ),
                )
                .fix(
                    "apply them: `migrations up` (in the compose stack: \
                     `docker compose run --rm migrations`)",
                ),
            }
        }
        Err(error) => Check::new(
            NAME,
            Verdict::Fail,
            format!("reachable at {place}, but the migration status cannot be read: {error}"),
        )
        .fix(
            "check that DATABASE_URL names the clerk-sync database and that the migrations are \
             of the same release as this worker",
        ),
    };
    checks.push(check);
    Some(db)
}

/// How long ago `time` was, in whole seconds.
fn age(time: DateTime<Utc>) -> String {
    let seconds = (Utc::now() - time).num_seconds().max(0);
    let seconds = u64::try_from(seconds).unwrap_or_default();
    format!(
        "{} ago ({})",
        humantime::format_duration(Duration::from_secs(seconds)),
        time.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

async fn query_one(
    db: &DatabaseConnection,
    sql: &str,
) -> Result<Option<QueryResult>, sea_orm::DbErr> {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
}

/// The `last event` check.
async fn last_event(db: Option<&DatabaseConnection>) -> Check {
    const NAME: &str = "last event";
    let Some(db) = db else {
        return Check::new(NAME, Verdict::Skip, "the database is unreachable");
    };
    // The newest webhook row by the indexed processed_at; received_at is when the ingest took it.
    let row = query_one(
        db,
        "SELECT coalesce(received_at, processed_at) AS at FROM processed_events \
         WHERE source = 'webhook' ORDER BY processed_at DESC LIMIT 1",
    )
    .await;
    match row {
        Err(_) => Check::new(NAME, Verdict::Skip, "no event history (see database)"),
        Ok(None) => Check::new(NAME, Verdict::Warn, "no event received from Clerk yet").fix(
            "send one: `ingest send-example user.created --url http://localhost:3000/api/webhooks`, \
             or from the Clerk Dashboard (Webhooks -> your endpoint -> Testing)",
        ),
        Ok(Some(row)) => match row.try_get::<DateTime<Utc>>("", "at") {
            Ok(at) => Check::ok(NAME, format!("received {}", age(at))),
            Err(error) => Check::new(NAME, Verdict::Fail, format!("unreadable: {error}")),
        },
    }
}

/// The `webhook secret` check.
fn webhook_secret(settings: &shared::Settings) -> Check {
    const NAME: &str = "webhook secret";
    let Ok(secrets) = settings.webhook_secrets() else {
        return Check::new(
            NAME,
            Verdict::Skip,
            "CLERK_WEBHOOK_SECRET is not set here, so the ingest's cannot be told",
        );
    };
    if secrets
        .iter()
        .any(|s| s.expose_secret() == shared::config::DEMO_WEBHOOK_SECRET)
    {
        Check::new(
            NAME,
            Verdict::Warn,
            "the public demo secret of docker-compose.yml: anyone can sign events",
        )
        .fix(
            "fine for `send-example` on your machine; for Clerk, set CLERK_WEBHOOK_SECRET in .env to \
             your endpoint's Signing Secret and `docker compose up -d`",
        )
    } else {
        Check::ok(NAME, format!("{} secret(s) of your own", secrets.len()))
    }
}

/// The `clerk key` check: one call to the Backend API, without retries.
async fn clerk_key(settings: &shared::Settings, db: Option<&DatabaseConnection>) -> Check {
    const NAME: &str = "clerk key";
    let scheduled = settings
        .worker_reconcile_interval
        .as_deref()
        .is_some_and(|i| !i.trim().is_empty());
    let key = match settings.clerk_secret_key() {
        Ok(key) => key,
        Err(_) if scheduled => {
            return Check::new(
                NAME,
                Verdict::Fail,
                "CLERK_SECRET_KEY is not set, yet WORKER_RECONCILE_INTERVAL schedules a reconcile",
            )
            .fix("set CLERK_SECRET_KEY (Dashboard -> Configure -> API keys)");
        }
        Err(_) => {
            return Check::new(
                NAME,
                Verdict::Skip,
                "CLERK_SECRET_KEY is not set: `worker reconcile` (the backfill) cannot run",
            )
            .fix("set it to reconcile: Dashboard -> Configure -> API keys -> Secret keys");
        }
    };
    if !key.expose_secret().trim().starts_with("sk_") {
        return Check::new(
            NAME,
            Verdict::Fail,
            "CLERK_SECRET_KEY does not start with sk_: not a secret key",
        )
        .fix("copy the Secret key (sk_test_... or sk_live_...), not the Publishable key");
    }
    let config = match ClerkConfig::from_settings(settings) {
        Ok(config) => ClerkConfig {
            retries: 0,
            timeout: config.timeout.min(TIMEOUT * 2),
            ..config
        },
        Err(error) => return Check::new(NAME, Verdict::Fail, error.to_string()),
    };
    let api_url = config.api_url.clone();
    let client = match ClerkClient::new(config) {
        Ok(client) => client,
        Err(error) => return Check::new(NAME, Verdict::Fail, format!("{error:#}")),
    };
    match client.instance().await {
        Ok(instance) => {
            let found = format!(
                "accepted by {api_url}: instance {} ({})",
                instance.id, instance.environment_type
            );
            let pinned = match db {
                Some(db) => crate::pin::pinned_instance(db).await.ok().flatten(),
                None => None,
            };
            match pinned {
                Some(pinned) if pinned.id != instance.id => Check::new(
                    NAME,
                    Verdict::Fail,
                    format!(
                        "{found}, but this database mirrors {}",
                        pinned.described_with_pin()
                    ),
                )
                .fix(format!(
                    "use the secret key of {} (a reconcile with this one stops, exit 3), or see \
                     `worker instance move`",
                    pinned.id
                )),
                Some(pinned) => Check::ok(
                    NAME,
                    format!(
                        "{found}; the database mirrors it ({} since {})",
                        pinned.pinned_by,
                        pinned.pinned_at.format("%Y-%m-%d")
                    ),
                ),
                None => Check::ok(NAME, format!("{found}; no instance pinned yet")),
            }
        }
        Err(error @ ClerkError::Unauthorized { .. }) => {
            Check::new(NAME, Verdict::Fail, error.to_string()).fix(
                "copy the Secret key of the same instance as the webhook (Dashboard -> Configure \
                 -> API keys) into CLERK_SECRET_KEY",
            )
        }
        Err(error) => Check::new(NAME, Verdict::Fail, error.to_string()).fix(format!(
            "check that {api_url} (CLERK_API_URL) is reachable from here"
        )),
    }
}

/// The `last reconcile` check.
async fn last_reconcile(db: Option<&DatabaseConnection>, settings: &shared::Settings) -> Check {
    const NAME: &str = "last reconcile";
    let Some(db) = db else {
        return Check::new(NAME, Verdict::Skip, "the database is unreachable");
    };
    let row = query_one(
        db,
        "SELECT trigger, started_at, finished_at, outcome, error FROM reconcile_runs \
         ORDER BY started_at DESC LIMIT 1",
    )
    .await;
    let row = match row {
        Err(_) => {
            return Check::new(
                NAME,
                Verdict::Skip,
                "no reconcile_runs table (see database)",
            );
        }
        Ok(None) => {
            let has_key = settings.clerk_secret_key().is_ok();
            return Check::new(
                NAME,
                if has_key {
                    Verdict::Warn
                } else {
                    Verdict::Skip
                },
                "no reconcile has run here",
            )
            .fix("after connecting Clerk, run `worker reconcile` once: that is the backfill");
        }
        Ok(Some(row)) => row,
    };
    let read = || -> Result<_, sea_orm::DbErr> {
        Ok((
            row.try_get::<String>("", "trigger")?,
            row.try_get::<DateTime<Utc>>("", "started_at")?,
            row.try_get::<Option<DateTime<Utc>>>("", "finished_at")?,
            row.try_get::<String>("", "outcome")?,
            row.try_get::<Option<String>>("", "error")?,
        ))
    };
    let (trigger, started, finished, outcome, error) = match read() {
        Ok(values) => values,
        Err(error) => return Check::new(NAME, Verdict::Fail, format!("unreadable: {error}")),
    };
    let took = finished
        .map(|f| {
            let seconds = u64::try_from((f - started).num_seconds().max(0)).unwrap_or_default();
            format!(
                " in {}",
                humantime::format_duration(Duration::from_secs(seconds))
            )
        })
        .unwrap_or_default();
    match outcome.as_str() {
        "succeeded" => Check::ok(
            NAME,
            format!("{trigger} run started {} succeeded{took}", age(started)),
        ),
        "failed" => Check::new(
            NAME,
            Verdict::Fail,
            format!(
                "{trigger} run started {} failed{took}: {}",
                age(started),
                error.as_deref().unwrap_or("no reason recorded")
            ),
        )
        .fix("fix the cause, then `worker reconcile` again (a scheduled one retries by itself)"),
        "interrupted" => Check::new(
            NAME,
            Verdict::Warn,
            format!(
                "{trigger} run started {} was interrupted: {}",
                age(started),
                error.as_deref().unwrap_or("stopped")
            ),
        )
        .fix("the next run resumes its listing: run `worker reconcile` (a scheduled one does at once)"),
        "running" if (Utc::now() - started).to_std().unwrap_or_default() > RECONCILE_LOST_AFTER => {
            Check::new(
                NAME,
                Verdict::Warn,
                format!("{trigger} run started {} never finished", age(started)),
            )
            .fix("its process most likely stopped: run `worker reconcile` again")
        }
        "running" => Check::ok(
            NAME,
            format!("{trigger} run running since {}", age(started)),
        ),
        other => Check::new(
            NAME,
            Verdict::Fail,
            format!(
                "{trigger} run started {} has an unknown outcome {other:?}",
                age(started)
            ),
        ),
    }
}
