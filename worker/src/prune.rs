//! Pruning `processed_events`: rows older than `WORKER_PROCESSED_RETENTION` are deleted in the
//! background, a small batch per statement, so no lock is held for long and the worker's own
//! inserts never wait behind a large delete. Tombstones are never pruned.
//!
//! Why a row may go at all: it only turns a redelivery of an old event into a `duplicate`. Once
//! it is gone, the same event is still harmless: it is older than (or as old as) the row, or the
//! user is tombstoned, so it is recorded as `stale` and changes nothing. The retention only has to
//! cover the redeliveries that are expected (Svix retries for about 27 hours; dead letters are
//! replayed within days), and serves as an audit trail meanwhile.

use std::time::Duration;

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};

use crate::metrics::Metrics;
use crate::stop::Stop;

/// Rows deleted by one statement: small enough to hold its locks for milliseconds.
const BATCH: i64 = 1000;

/// How often the pruner looks: a quarter of the retention, between a second and ten minutes.
pub(crate) fn period(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Prunes until a stop, once a [`period`].
pub(crate) async fn prune_until_stopped(
    db: DatabaseConnection,
    retention: Duration,
    metrics: Metrics,
    mut stop: Stop,
) {
    loop {
        match stop.unless_stopped(prune(&db, retention, &metrics)).await {
            None => return,
            Some(Ok(0)) => {}
            Some(Ok(deleted)) => {
                tracing::info!(deleted, ?retention, "pruned old processed_events rows");
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot prune processed_events; trying again later");
            }
        }
        if !stop.sleep(period(retention)).await {
            return;
        }
    }
}

/// Deletes every row older than `retention`, a batch at a time; returns how many.
async fn prune(
    db: &DatabaseConnection,
    retention: Duration,
    metrics: &Metrics,
) -> Result<u64, DbErr> {
    let Ok(age) = chrono::Duration::from_std(retention) else {
        // Longer than chrono can count: nothing is that old.
        return Ok(0);
    };
    let cutoff = Utc::now() - age;
    let mut total = 0;
    loop {
        // SKIP LOCKED: a row a transaction is writing right now is left for the next round.
        let deleted = db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "DELETE FROM processed_events WHERE svix_id IN ( \
                   SELECT svix_id FROM processed_events WHERE processed_at < $1 \
                   ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                [cutoff.into(), BATCH.into()],
            ))
            .await?
            .rows_affected();
        metrics.pruned.inc_by(deleted);
        total += deleted;
        if deleted < BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_period_is_a_quarter_of_the_retention_within_bounds() {
        assert_eq!(period(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(60)), Duration::from_secs(15));
        assert_eq!(
            period(Duration::from_secs(30 * 24 * 3600)),
            Duration::from_secs(600)
        );
    }
}
