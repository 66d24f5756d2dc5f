//! `WORKER_RECONCILE_INTERVAL`: a running worker reconciles when the latest run recorded in
//! `reconcile_runs` (by any worker or command) started at least one interval ago, so restarts and
//! replicas do not multiply the runs, and a first start with the setting on runs at once (the
//! backfill). Only one run at a time, across workers and `worker reconcile` commands: the run
//! holds the reconcile lock ([`super::lock`]); a worker that finds it taken leaves the run to
//! its holder.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use secrecy::SecretString;

use super::lock::RunLock;
use super::{Options, Trigger, runs};
use crate::apply::Reading;
use crate::clerk::ClerkClient;
use crate::config::ScheduledReconcile;
use crate::metrics::Metrics;
use crate::stop::Stop;

/// How long to wait before looking again after a failure to read the schedule or to take the
/// lock, so a database outage does not make a busy loop.
const AFTER_TROUBLE: Duration = Duration::from_secs(60);

/// Reconciles whenever one is due, until the stop, with `client` (the worker's one Backend API
/// client, whose rate limit the on-demand sync shares).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    schedule: ScheduledReconcile,
    reading: Reading,
    client: Arc<ClerkClient>,
    db: DatabaseConnection,
    database_url: SecretString,
    lock_timeout: Duration,
    metrics: Metrics,
    mut stop: Stop,
) {
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
        let attempt = run_if_due(
            &schedule,
            &reading,
            &client,
            &db,
            &database_url,
            lock_timeout,
            &metrics,
        );
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
    reading: &Reading,
    client: &ClerkClient,
    db: &DatabaseConnection,
    database_url: &SecretString,
    lock_timeout: Duration,
    metrics: &Metrics,
) -> Result<(), sea_orm::DbErr> {
    let Some(lock) = RunLock::try_take(database_url, lock_timeout).await? else {
        tracing::info!(
            "scheduled reconcile: another run holds the reconcile lock; leaving it to that one"
        );
        return Ok(());
    };
    // Checked under the lock: another worker may have just finished a run.
    if due_in(runs::last_started(db).await?, schedule.interval).is_zero() {
        let options = Options {
            trigger: Trigger::Schedule,
            reading: reading.clone(),
            ..Options::default()
        };
        let report = super::reconcile(db, client, &options).await;
        metrics.reconcile_run(report.succeeded());
        for kind in super::Kind::ALL {
            let counts = report.summary.of(kind);
            for (change, count) in [
                ("created", counts.created),
                ("updated", counts.updated),
                ("deleted", counts.deleted),
            ] {
                metrics.reconcile_changes(kind.name(), change, count);
            }
        }
    }
    lock.release().await
}

#[cfg(test)]
mod tests {
    use super::*;

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
