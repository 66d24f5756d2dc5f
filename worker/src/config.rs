//! The worker's settings, taken once from [`shared::Settings`] and checked at start.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::{AmqpNodes, Backoff, ConfigError, Settings, Topology};

use crate::apply::Reading;
use crate::apply::pace::Pace;
use crate::clerk::ClerkConfig;
use crate::on_demand::OnDemandConfig;

/// Everything the worker needs to run. Built from [`Settings`] by [`WorkerConfig::from_settings`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `DATABASE_URL`.
    pub database_url: SecretString,
    /// `AMQP_URL`: the broker's nodes (one URL, or several separated by commas).
    pub amqp_nodes: AmqpNodes,
    /// `AMQP_EXCHANGE`, `AMQP_QUEUE`, `AMQP_DEAD_QUEUE`, `AMQP_DELIVERY_LIMIT`.
    pub topology: Topology,
    /// `WORKER_PREFETCH`: unacknowledged deliveries held at once.
    pub prefetch: u16,
    /// `WORKER_BATCH_SIZE`: deliveries applied in one transaction at most.
    pub batch_size: usize,
    /// `WORKER_MAX_ATTEMPTS`: attempts for a failure that belongs to the message before it is
    /// dead-lettered as `exhausted`.
    pub max_attempts: u32,
    /// `WORKER_RETRY_BASE_MS` and `WORKER_RETRY_MAX_MS`.
    pub backoff: Backoff,
    /// `WORKER_RUN_MIGRATIONS`: apply pending migrations at start.
    pub run_migrations: bool,
    /// `WORKER_LISTEN`: the health and metrics address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// `WORKER_DB_POOL_SIZE`: database connections at most; also the number of batches applied
    /// at once, so every batch in flight has a connection.
    pub db_pool_size: u32,
    /// `WORKER_ROLES`, `WORKER_DEFAULT_ROLE` (the roles a user's `public_metadata.role` may
    /// name, and the one stored otherwise) and `WORKER_STORE_PAYLOADS` (keep each event's body
    /// in its history row) and `WORKER_DELETE_MODE` (what a deletion does to the rows): how
    /// events are read.
    pub reading: Reading,
    /// `WORKER_PURGE_DELETED_AFTER`: rows kept by a deletion are removed once deleted this long;
    /// `None` (the default) for never.
    pub purge_deleted_after: Option<Duration>,
    /// `WORKER_RECONCILE_INTERVAL` (with the `CLERK_*` settings): a reconcile on that period, or
    /// `None` (the default) for never.
    pub reconcile: Option<ScheduledReconcile>,
    /// `WORKER_PROCESSED_RETENTION`: `processed_events` rows older than this are pruned.
    pub processed_retention: Duration,
    /// `WORKER_STALLED_AFTER`: `/readyz` answers 503 while a delivery has been held longer.
    pub stalled_after: Duration,
    /// `WORKER_BROKER_TIMEOUT_MS`: the deadline of every single wait on the broker.
    pub broker_timeout: Duration,
    /// `WORKER_LOCK_TIMEOUT`: Postgres's `lock_timeout` on every connection the worker opens.
    pub lock_timeout: Duration,
    /// `WORKER_API_TOKEN` (with `WORKER_API_LISTEN`, `WORKER_API_TIMEOUT_MS`,
    /// `WORKER_API_REUSE_MS` and the `CLERK_*` settings): the on-demand sync API, or `None` (the
    /// default) for none.
    pub on_demand: Option<OnDemandConfig>,
}

impl WorkerConfig {
    /// Checks and converts the loaded settings; the error names the offending variable.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let listen = settings
            .worker_listen
            .parse()
            .map_err(|error| ConfigError::Malformed {
                variable: "WORKER_LISTEN",
                reason: format!("not an address like 0.0.0.0:3001 ({error})"),
            })?;
        let at_least_one = |variable: &'static str, value: u64| {
            if value == 0 {
                Err(ConfigError::Malformed {
                    variable,
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        at_least_one("WORKER_PREFETCH", settings.worker_prefetch.into())?;
        at_least_one("WORKER_BATCH_SIZE", settings.worker_batch_size as u64)?;
        at_least_one("WORKER_MAX_ATTEMPTS", settings.worker_max_attempts.into())?;
        at_least_one("WORKER_RETRY_BASE_MS", settings.worker_retry_base_ms)?;
        at_least_one("WORKER_DB_POOL_SIZE", settings.worker_db_pool_size.into())?;
        if settings.worker_retry_max_ms < settings.worker_retry_base_ms {
            return Err(ConfigError::Malformed {
                variable: "WORKER_RETRY_MAX_MS",
                reason: "must not be below WORKER_RETRY_BASE_MS".into(),
            });
        }
        at_least_one(
            "WORKER_BROKER_TIMEOUT_MS",
            settings.worker_broker_timeout_ms,
        )?;
        let processed_retention = duration(
            "WORKER_PROCESSED_RETENTION",
            &settings.worker_processed_retention,
        )?;
        let stalled_after = duration("WORKER_STALLED_AFTER", &settings.worker_stalled_after)?;
        let database_url = settings.database_url()?;
        // Checked here rather than at the first connection, which the worker waits for.
        if let Err(error) = database_url
            .expose_secret()
            .parse::<sea_orm::sqlx::postgres::PgConnectOptions>()
        {
            return Err(ConfigError::Malformed {
                variable: "DATABASE_URL",
                // The parser's message never repeats the URL, so no password can leak here.
                reason: error.to_string(),
            });
        }
        Ok(Self {
            database_url,
            amqp_nodes: settings.amqp_nodes()?,
            topology: settings.topology()?,
            prefetch: settings.worker_prefetch,
            batch_size: settings.worker_batch_size,
            max_attempts: settings.worker_max_attempts,
            backoff: Backoff {
                base: Duration::from_millis(settings.worker_retry_base_ms),
                max: Duration::from_millis(settings.worker_retry_max_ms),
            },
            run_migrations: settings.worker_run_migrations,
            listen,
            db_pool_size: settings.worker_db_pool_size,
            reading: Reading::from_settings(settings)?,
            purge_deleted_after: purge_deleted_after(settings)?,
            reconcile: ScheduledReconcile::from_settings(settings)?,
            processed_retention,
            stalled_after,
            broker_timeout: Duration::from_millis(settings.worker_broker_timeout_ms),
            lock_timeout: settings.lock_timeout()?,
            on_demand: OnDemandConfig::from_settings(settings)?,
        })
    }
}

/// A reconcile on a period, as configured.
#[derive(Debug, Clone)]
pub struct ScheduledReconcile {
    /// `WORKER_RECONCILE_INTERVAL`.
    pub interval: Duration,
    /// The Backend API client's settings (`CLERK_SECRET_KEY`, `CLERK_API_URL`, …).
    pub clerk: ClerkConfig,
    /// `WORKER_RECONCILE_CONNECTIONS`: the run's own database pool.
    pub connections: u32,
    /// `WORKER_REPAIR_SHARE`: the run rests after each page.
    pub pace: Pace,
}

impl ScheduledReconcile {
    /// `None` when `WORKER_RECONCILE_INTERVAL` is unset or empty; an error naming the variable
    /// when it does not read as a duration or when `CLERK_SECRET_KEY` is missing.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, ConfigError> {
        let Some(text) = settings
            .worker_reconcile_interval
            .as_deref()
            .filter(|text| !text.trim().is_empty())
        else {
            return Ok(None);
        };
        Ok(Some(Self {
            interval: duration("WORKER_RECONCILE_INTERVAL", text)?,
            clerk: ClerkConfig::from_settings(settings)?,
            connections: reconcile_connections(settings)?,
            pace: Pace::from_settings(settings)?,
        }))
    }
}

/// `WORKER_RECONCILE_CONNECTIONS`, checked: one connection reads while the others write, so at
/// least 2.
pub fn reconcile_connections(settings: &Settings) -> Result<u32, ConfigError> {
    match settings.worker_reconcile_connections {
        0 | 1 => Err(ConfigError::Malformed {
            variable: "WORKER_RECONCILE_CONNECTIONS",
            reason: "must be at least 2 (one reads, the others write)".into(),
        }),
        connections => Ok(connections),
    }
}

/// `WORKER_PURGE_DELETED_AFTER`, checked: `None` when unset or empty.
fn purge_deleted_after(settings: &Settings) -> Result<Option<Duration>, ConfigError> {
    match settings
        .worker_purge_deleted_after
        .as_deref()
        .map(str::trim)
    {
        None | Some("") => Ok(None),
        Some(text) => duration("WORKER_PURGE_DELETED_AFTER", text).map(Some),
    }
}

/// A human-readable duration (`30d`, `72h`, `5m`), above zero: every duration setting is read
/// here.
fn duration(variable: &'static str, text: &str) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(text.trim()) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err(ConfigError::Malformed {
            variable,
            reason: "must be longer than zero".into(),
        }),
        Err(error) => Err(ConfigError::Malformed {
            variable,
            reason: format!("not a duration like 30d, 12h or 90s ({error})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::DeleteMode;

    fn settings() -> Settings {
        Settings {
            database_url: Some("postgres://localhost/db".into()),
            amqp_url: Some("amqp://localhost:5672/%2f".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_make_a_valid_config() {
        let config = WorkerConfig::from_settings(&settings()).expect("config");
        assert_eq!(config.max_attempts, 5);
        assert!(config.run_migrations);
        assert_eq!(config.listen.port(), 3001);
        assert_eq!(config.lock_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_zero_batch_size_is_named() {
        let settings = Settings {
            worker_batch_size: 0,
            ..settings()
        };
        let line = WorkerConfig::from_settings(&settings)
            .expect_err("zero")
            .to_string();
        assert!(line.contains("WORKER_BATCH_SIZE"), "{line}");
    }

    #[test]
    fn a_database_url_that_does_not_parse_is_named() {
        let settings = Settings {
            database_url: Some("postgres://user:secret-password@localhost:notaport/db".into()),
            ..settings()
        };
        let line = WorkerConfig::from_settings(&settings)
            .expect_err("bad port")
            .to_string();
        assert!(line.contains("DATABASE_URL is malformed"), "{line}");
        assert!(!line.contains("secret-password"), "{line}");
    }

    #[test]
    fn durations_are_human_readable_and_named_when_malformed() {
        let config = WorkerConfig::from_settings(&settings()).expect("config");
        assert_eq!(
            config.processed_retention,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(config.stalled_after, Duration::from_secs(300));
        let malformed = Settings {
            worker_processed_retention: "30 days please".into(),
            ..settings()
        };
        let line = WorkerConfig::from_settings(&malformed)
            .expect_err("malformed")
            .to_string();
        assert!(line.contains("WORKER_PROCESSED_RETENTION"), "{line}");
        let zero = Settings {
            worker_stalled_after: "0s".into(),
            ..settings()
        };
        let line = WorkerConfig::from_settings(&zero)
            .expect_err("zero")
            .to_string();
        assert!(line.contains("WORKER_STALLED_AFTER"), "{line}");
    }

    #[test]
    fn the_delete_mode_is_hard_unless_set_and_a_bad_one_is_named() {
        let config = WorkerConfig::from_settings(&settings()).expect("config");
        assert_eq!(config.reading.delete_mode, DeleteMode::Hard);
        assert_eq!(config.purge_deleted_after, None);
        let kept = Settings {
            worker_delete_mode: "anonymize".into(),
            worker_purge_deleted_after: Some("90d".into()),
            ..settings()
        };
        let config = WorkerConfig::from_settings(&kept).expect("config");
        assert_eq!(config.reading.delete_mode, DeleteMode::Anonymize);
        assert_eq!(
            config.purge_deleted_after,
            Some(Duration::from_secs(90 * 24 * 3600))
        );
        for (settings, variable) in [
            (
                Settings {
                    worker_delete_mode: "archive".into(),
                    ..settings()
                },
                "WORKER_DELETE_MODE",
            ),
            (
                Settings {
                    worker_purge_deleted_after: Some("soon".into()),
                    ..settings()
                },
                "WORKER_PURGE_DELETED_AFTER",
            ),
        ] {
            let line = WorkerConfig::from_settings(&settings)
                .expect_err("malformed")
                .to_string();
            assert!(line.contains(variable), "{line}");
        }
    }

    #[test]
    fn a_bad_listen_address_is_named() {
        let settings = Settings {
            worker_listen: "localhost".into(),
            ..settings()
        };
        let line = WorkerConfig::from_settings(&settings)
            .expect_err("bad")
            .to_string();
        assert!(line.contains("WORKER_LISTEN"), "{line}");
    }

    fn schedule_settings(interval: Option<&str>, key: Option<&str>) -> Settings {
        Settings {
            worker_reconcile_interval: interval.map(str::to_owned),
            clerk_secret_key: key.map(Into::into),
            ..Settings::default()
        }
    }

    #[test]
    fn unset_or_empty_means_off() {
        assert!(
            ScheduledReconcile::from_settings(&schedule_settings(None, None))
                .expect("off")
                .is_none()
        );
        assert!(
            ScheduledReconcile::from_settings(&schedule_settings(Some(" "), None))
                .expect("off")
                .is_none()
        );
    }

    #[test]
    fn an_interval_reads_as_humantime_and_needs_the_key() {
        let schedule =
            ScheduledReconcile::from_settings(&schedule_settings(Some("24h"), Some("sk_test_1")))
                .expect("valid")
                .expect("on");
        assert_eq!(schedule.interval, Duration::from_secs(24 * 3600));
        let line = ScheduledReconcile::from_settings(&schedule_settings(Some("24h"), None))
            .expect_err("no key")
            .to_string();
        assert!(line.contains("CLERK_SECRET_KEY"), "{line}");
        let line =
            ScheduledReconcile::from_settings(&schedule_settings(Some("daily"), Some("sk_test_1")))
                .expect_err("not a duration")
                .to_string();
        assert!(line.contains("WORKER_RECONCILE_INTERVAL"), "{line}");
    }

    #[test]
    fn a_scheduled_run_rests_half_the_time_unless_told_and_a_bad_share_is_named() {
        let schedule =
            ScheduledReconcile::from_settings(&schedule_settings(Some("24h"), Some("sk_test_1")))
                .expect("valid")
                .expect("on");
        assert_eq!(schedule.pace, Pace::new(0.5).expect("a half"));
        assert_eq!(schedule.connections, 2);
        let line = ScheduledReconcile::from_settings(&Settings {
            worker_repair_share: "fast".into(),
            ..schedule_settings(Some("24h"), Some("sk_test_1"))
        })
        .expect_err("not a share")
        .to_string();
        assert!(line.contains("WORKER_REPAIR_SHARE"), "{line}");
    }
}
