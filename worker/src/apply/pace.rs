//! How a repair command (`worker reconcile`, `rebuild`, `replay`) shares the database with live
//! events (`WORKER_REPAIR_SHARE`): it writes in transactions of at most
//! [`TRANSACTION_EVENTS`] events, so that a live event that meets one waits for little, and after
//! each step (a reconcile page, a rebuild chunk, a replay page) rests in proportion to how long
//! the step took, so that the live events find the database and the cores free most of the
//! time. BENCHMARKS.md ("Scale") has the live events' latency at each share.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use sea_orm::DatabaseConnection;
use tracing::Instrument as _;

use super::{Event, Written};

/// Events in one transaction of a repair command at most: tens of milliseconds of work, which
/// is about what a live event waits for when it meets one.
pub const TRANSACTION_EVENTS: usize = 50;

/// The share of its time a repair command spends working (`WORKER_REPAIR_SHARE`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    share: f64,
}

impl Pace {
    /// Working all the time, never resting: what the tests use.
    pub const FULL: Pace = Pace { share: 1.0 };

    /// A pace that works `share` of the time; `None` unless `0 < share ≤ 1`.
    pub fn new(share: f64) -> Option<Self> {
        (share > 0.0 && share <= 1.0).then_some(Self { share })
    }

    /// `WORKER_REPAIR_SHARE` (checked there to be above 0 and at most 1).
    pub fn from_settings(settings: &shared::Settings) -> Result<Self, shared::ConfigError> {
        Ok(Self {
            share: settings.repair_share()?,
        })
    }

    /// The rest after a step that took `took`: as long as the step, times what is left of the
    /// time over the share.
    pub fn rest_after(self, took: Duration) -> Duration {
        took.mul_f64((1.0 - self.share) / self.share)
    }

    /// Rests after a step that started at `started`.
    pub async fn rest_since(self, started: Instant) {
        let rest = self.rest_after(started.elapsed());
        if !rest.is_zero() {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Writes `events` through the door ([`super::write`]: batch, then one by one) in transactions
/// of at most [`TRANSACTION_EVENTS`], `at_once` of them at a time (`1`: one after the other, in
/// the events' order), keeping the events' order in the outcomes. Each transaction is a task of
/// its own, so that building its statements (serializing the rows) runs on every core rather
/// than on the one that polls the caller.
pub async fn write_in_transactions(
    db: &DatabaseConnection,
    events: &[Event],
    at_once: usize,
) -> Result<Written, String> {
    // Copied up front: a stream that borrows `events` makes the future not `Send` for every
    // lifetime, which the scheduled reconcile's `tokio::spawn` requires.
    let chunks: Vec<Vec<Event>> = events
        .chunks(TRANSACTION_EVENTS)
        .map(<[Event]>::to_vec)
        .collect();
    let mut transactions = futures_util::stream::iter(chunks)
        .map(|chunk| {
            let db = db.clone();
            tokio::spawn(async move { super::write(&db, &chunk).await }.in_current_span())
        })
        .buffered(at_once.max(1));
    let mut outcomes = Vec::with_capacity(events.len());
    let mut failed = Vec::new();
    while let Some(task) = transactions.next().await {
        let (chunk_outcomes, chunk_failed) =
            task.map_err(|error| format!("a write task failed: {error}"))??;
        outcomes.extend(chunk_outcomes);
        failed.extend(chunk_failed);
    }
    Ok((outcomes, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_rests_what_is_left_of_the_time() {
        let step = Duration::from_millis(40);
        assert_eq!(Pace::FULL.rest_after(step), Duration::ZERO);
        let half = Pace::new(0.5).expect("a half");
        assert_eq!(half.rest_after(step), step);
        let quarter = Pace::new(0.25).expect("a quarter");
        assert_eq!(quarter.rest_after(step), Duration::from_millis(120));
        assert_eq!(Pace::new(0.0), None);
        assert_eq!(Pace::new(1.5), None);
    }
}
