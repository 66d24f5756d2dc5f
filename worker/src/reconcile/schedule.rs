//! `WORKER_RECONCILE_INTERVAL`: a running worker reconciles when the latest run recorded in
//! `reconcile_runs` (by any worker or command) that ran to its end, succeeded or failed,
//! finished at least one interval ago, so restarts and replicas do not multiply the runs, a
//! first start with the setting on runs at once (the backfill), and an interrupted run is taken
//! up at once (resuming its listing). Only one run at a time, across workers and `worker
//! reconcile` commands: the run holds the reconcile lock ([`super::lock`]); a worker that finds
//! it taken leaves the run to its holder and looks again later. Each time it holds the lock it
//! first records as `interrupted` the runs left `running` by a process that ended.
//!
//! The run has a database pool of its own (`WORKER_RECONCILE_CONNECTIONS`): live events keep the
//! consumer's. A stop (SIGTERM) ends the run at its next page, recorded `interrupted`.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use secrecy::SecretString;

use super::lock::RunLock;
use super::{Interruption, Options, Trigger, runs};
use crate::apply::Reading;
use crate::clerk::ClerkClient;
use crate::config::ScheduledReconcile;
use crate::database::connect_database;
use crate::metrics::Metrics;
use crate::stop::Stop;

/// How long to wait before looking again after a failure to read the schedule or to take the
/// lock, or while another process holds it, so neither makes a busy loop.
const AFTER_TROUBLE: Duration = Duration::from_secs(60);

/// Reconciles whenever one is due, until the stop, with `client` (the worker's one Backend API
/// client, whose rate limit the on-demand sync shares), on a pool of its own.
pub(crate) async fn run(
    schedule: ScheduledReconcile,
    reading: Reading,
    client: Arc<ClerkClient>,
    database_url: SecretString,
    lock_timeout: Duration,
    metrics: Metrics,
    mut stop: Stop,
) {
    tracing::info!(
        interval = %humantime::format_duration(schedule.interval),
        connections = schedule.connections,
        "scheduled reconcile on"
    );
    let db = match connect_database(&database_url, schedule.connections, lock_timeout).await {
        Ok(db) => db,
        Err(error) => {
            tracing::error!(%error, "scheduled reconcile: cannot set up its database pool; off");
            return;
        }
    };
    let scheduled = Scheduled {
        schedule: &schedule,
        reading: &reading,
        client: &client,
        db: &db,
        database_url: &database_url,
        lock_timeout,
        metrics: &metrics,
        interruption: Interruption::new(stop.0.clone()),
    };
    while !stop.requested() {
        let wait = match scheduled.run_if_due().await {
            Ok(true) => match runs::last_finished(&db).await {
                Ok(last) => due_in(last, schedule.interval),
                Err(error) => {
                    tracing::warn!(%error, "cannot read reconcile_runs; looking again later");
                    AFTER_TROUBLE
                }
            },
            Ok(false) => AFTER_TROUBLE.min(schedule.interval),
            Err(error) => {
                tracing::warn!(%error, "scheduled reconcile: cannot take the lock; looking again later");
                AFTER_TROUBLE
            }
        };
        if !stop.sleep(wait).await {
            break;
        }
    }
    db.close().await.ok();
}

/// How long until the next run is due, `last` being when the latest run that ran to its end
/// finished.
fn due_in(last: Option<chrono::DateTime<chrono::Utc>>, interval: Duration) -> Duration {
    let Some(last) = last else {
        return Duration::ZERO;
    };
    let elapsed = (chrono::Utc::now() - last)
        .to_std()
        .unwrap_or(Duration::ZERO);
    interval.saturating_sub(elapsed)
}

/// What a scheduled run needs.
struct Scheduled<'a> {
    schedule: &'a ScheduledReconcile,
    reading: &'a Reading,
    client: &'a ClerkClient,
    db: &'a DatabaseConnection,
    database_url: &'a SecretString,
    lock_timeout: Duration,
    metrics: &'a Metrics,
    interruption: Interruption,
}

impl Scheduled<'_> {
    /// Takes the lock (or leaves it to the process holding it: `false`), records the runs left
    /// `running` as interrupted, checks that a run is due, and runs it.
    async fn run_if_due(&self) -> Result<bool, sea_orm::DbErr> {
        let Some(lock) = RunLock::try_take(self.database_url, self.lock_timeout).await? else {
            tracing::info!(
                "scheduled reconcile: another run holds the reconcile lock; leaving it to that one"
            );
            return Ok(false);
        };
        let result = self.under_lock().await;
        lock.release().await?;
        result.map(|()| true)
    }

    async fn under_lock(&self) -> Result<(), sea_orm::DbErr> {
        runs::settle_abandoned(self.db).await?;
        // Checked under the lock: another worker may have just finished a run.
        if !due_in(runs::last_finished(self.db).await?, self.schedule.interval).is_zero() {
            return Ok(());
        }
        let options = Options {
            trigger: Trigger::Schedule,
            reading: self.reading.clone(),
            connections: self.schedule.connections,
            pace: self.schedule.pace,
            interruption: self.interruption.clone(),
            ..Options::default()
        };
        let report = super::reconcile(self.db, self.client, &options).await;
        if report.interrupted {
            return Ok(());
        }
        self.metrics.reconcile_run(report.succeeded());
        for kind in super::Kind::ALL {
            let counts = report.summary.of(kind);
            for (change, count) in [
                ("created", counts.created),
                ("updated", counts.updated),
                ("deleted", counts.deleted),
            ] {
                self.metrics.reconcile_changes(kind.name(), change, count);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_due_one_interval_after_the_last_finished_one() {
        let hour = Duration::from_secs(3600);
        assert_eq!(due_in(None, hour), Duration::ZERO);
        let long_ago = chrono::Utc::now() - chrono::Duration::hours(2);
        assert_eq!(due_in(Some(long_ago), hour), Duration::ZERO);
        let just_now = chrono::Utc::now();
        assert!(due_in(Some(just_now), hour) > Duration::from_secs(3500));
    }
}
