//! `WORKER_RECONCILE_INTERVAL`: a running worker reconciles when the latest run recorded in
//! `reconcile_runs` (by any worker or command) started at least one interval ago, so restarts and
//! replicas do not multiply the runs, and a first start with the setting on runs at once (the
//! backfill). Only one run at a time, across workers and `worker reconcile` commands: the run
//! holds the reconcile lock ([`super::lock`]); a worker that finds it taken leaves the run to
//! its holder.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use secrecy::SecretString;

use super::lock::RunLock;
use super::{ClerkClient, ClerkConfig, Options, Trigger, runs};
use crate::consumer::Stop;
use crate::metrics::Metrics;

/// How long to wait before looking again after a failure to read the schedule or to take the
/// lock, so a database outage does not make a busy loop.
const AFTER_TROUBLE: Duration = Duration::from_secs(60);

/// A reconcile on a period, as configured.
#[derive(Debug, Clone)]
pub struct ScheduledReconcile {
    /// `WORKER_RECONCILE_INTERVAL`.
    pub interval: Duration,
    /// The Backend API client's settings (`CLERK_SECRET_KEY`, `CLERK_API_URL`, …).
    pub clerk: ClerkConfig,
    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE`, for reading listed users as the events do.
    pub roles: shared::Roles,
    /// `WORKER_STORE_PAYLOADS`.
    pub store_payloads: bool,
}

impl ScheduledReconcile {
    /// `None` when `WORKER_RECONCILE_INTERVAL` is unset or empty; an error naming the variable
    /// when it does not read as a duration or when `CLERK_SECRET_KEY` is missing.
    pub fn from_settings(settings: &shared::Settings) -> Result<Option<Self>, shared::ConfigError> {
        let Some(text) = settings
            .worker_reconcile_interval
            .as_deref()
            .map(str::trim)
            .filter(|text| !text.is_empty())
        else {
            return Ok(None);
        };
        let interval =
            humantime::parse_duration(text).map_err(|error| shared::ConfigError::Malformed {
                variable: "WORKER_RECONCILE_INTERVAL",
                reason: format!("not a duration like 24h or 30m ({error})"),
            })?;
        if interval.is_zero() {
            return Err(shared::ConfigError::Malformed {
                variable: "WORKER_RECONCILE_INTERVAL",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(Some(Self {
            interval,
            clerk: ClerkConfig::from_settings(settings)?,
            roles: settings.roles()?,
            store_payloads: settings.worker_store_payloads,
        }))
    }
}

/// Reconciles whenever one is due, until the stop.
pub(crate) async fn run(
    schedule: ScheduledReconcile,
    db: DatabaseConnection,
    database_url: SecretString,
    metrics: Metrics,
    mut stop: Stop,
) {
    let client = match ClerkClient::new(schedule.clerk.clone()) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "scheduled reconcile off: cannot set up the Backend API client");
            return;
        }
    };
    tracing::info!(interval = %humantime::format_duration(schedule.interval), "scheduled reconcile on");
    loop {
        let wait = match runs::last_started(&db).await {
            Ok(last) => due_in(last, schedule.interval),
            Err(error) => {
                tracing::warn!(%error, "cannot read reconcile_runs; looking again later");
                AFTER_TROUBLE
            }
        };
        if !stop.sleep(wait).await {
            return;
        }
        let attempt = run_if_due(&schedule, &client, &db, &database_url, &metrics);
        match stop.unless_stopped(attempt).await {
            None => return,
            Some(Ok(())) => {}
            Some(Err(error)) => {
                tracing::warn!(%error, "scheduled reconcile: cannot take the lock; looking again later");
                if !stop.sleep(AFTER_TROUBLE).await {
                    return;
                }
            }
        }
    }
}

/// How long until the next run is due.
fn due_in(last: Option<chrono::DateTime<chrono::Utc>>, interval: Duration) -> Duration {
    let Some(last) = last else {
        return Duration::ZERO;
    };
    let elapsed = (chrono::Utc::now() - last)
        .to_std()
        .unwrap_or(Duration::ZERO);
    interval.saturating_sub(elapsed)
}

/// Takes the lock (or leaves it to the worker holding it), checks again that a run is due, and
/// runs it.
async fn run_if_due(
    schedule: &ScheduledReconcile,
    client: &ClerkClient,
    db: &DatabaseConnection,
    database_url: &SecretString,
    metrics: &Metrics,
) -> Result<(), sea_orm::DbErr> {
    let Some(lock) = RunLock::try_take(database_url).await? else {
        tracing::info!(
            "scheduled reconcile: another run holds the reconcile lock; leaving it to that one"
        );
        return Ok(());
    };
    // Checked under the lock: another worker may have just finished a run.
    if due_in(runs::last_started(db).await?, schedule.interval).is_zero() {
        let options = Options {
            trigger: Trigger::Schedule,
            roles: schedule.roles.clone(),
            store_payloads: schedule.store_payloads,
            ..Options::default()
        };
        let report = super::reconcile(db, client, &options).await;
        metrics.reconcile_run(&report);
    }
    lock.release().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(interval: Option<&str>, key: Option<&str>) -> shared::Settings {
        shared::Settings {
            worker_reconcile_interval: interval.map(str::to_owned),
            clerk_secret_key: key.map(Into::into),
            ..shared::Settings::default()
        }
    }

    #[test]
    fn unset_or_empty_means_off() {
        assert!(
            ScheduledReconcile::from_settings(&settings(None, None))
                .expect("off")
                .is_none()
        );
        assert!(
            ScheduledReconcile::from_settings(&settings(Some(" "), None))
                .expect("off")
                .is_none()
        );
    }

    #[test]
    fn an_interval_reads_as_humantime_and_needs_the_key() {
        let schedule = ScheduledReconcile::from_settings(&settings(Some("24h"), Some("sk_test_1")))
            .expect("valid")
            .expect("on");
        assert_eq!(schedule.interval, Duration::from_secs(24 * 3600));
        let line = ScheduledReconcile::from_settings(&settings(Some("24h"), None))
            .expect_err("no key")
            .to_string();
        assert!(line.contains("CLERK_SECRET_KEY"), "{line}");
        let line = ScheduledReconcile::from_settings(&settings(Some("daily"), Some("sk_test_1")))
            .expect_err("not a duration")
            .to_string();
        assert!(line.contains("WORKER_RECONCILE_INTERVAL"), "{line}");
    }

    #[test]
    fn a_run_is_due_one_interval_after_the_last_start() {
        let hour = Duration::from_secs(3600);
        assert_eq!(due_in(None, hour), Duration::ZERO);
        let long_ago = chrono::Utc::now() - chrono::Duration::hours(2);
        assert_eq!(due_in(Some(long_ago), hour), Duration::ZERO);
        let just_now = chrono::Utc::now();
        assert!(due_in(Some(just_now), hour) > Duration::from_secs(3500));
    }
}
