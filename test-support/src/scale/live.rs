//! Live events at a steady rate, published to the worker's exchange as the ingest publishes
//! them, and the latency of each: from just before its publish to the commit of the worker's
//! transaction that recorded it. A trigger on `processed_events` notifies for the live events'
//! rows only (Postgres delivers a notification when its transaction commits); every other row
//! (the commands' own) passes the trigger's `WHEN` test and is left alone.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::events::{envelope, event_properties};

/// The channel of the notifications.
const CHANNEL: &str = "scale_bench_live";

/// The event type of every live event.
const EVENT_TYPE: &str = "user.updated";

/// Makes the `data` of live event number `n`.
pub type MakeEvent = dyn Fn(usize) -> Value + Send + Sync;

/// The latency of a set of live events.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    /// Events published.
    pub published: usize,
    /// Of those, the ones seen applied.
    pub applied: usize,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
}

impl Latency {
    fn of(mut waits: Vec<Duration>, published: usize) -> Self {
        waits.sort();
        let at = |fraction: f64| {
            let rank = (waits.len() as f64 * fraction).ceil() as usize;
            waits.get(rank.clamp(1, waits.len().max(1)) - 1).copied()
        };
        Self {
            published,
            applied: waits.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: waits.last().copied(),
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |value: Option<Duration>| match value {
            Some(value) => format!("{:.1}", value.as_secs_f64() * 1000.0),
            None => "-".to_owned(),
        };
        write!(
            f,
            "{} events ({} applied), p50 {} ms, p99 {} ms, max {} ms",
            self.published,
            self.applied,
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// When each live event was published and when its commit was seen, by number.
#[derive(Default)]
struct Times {
    published: Vec<Instant>,
    applied: Vec<Option<Instant>>,
}

/// Live events being published, numbered from 0, and their commits being watched.
pub struct LiveLoad {
    prefix: String,
    times: Arc<Mutex<Times>>,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    publisher: JoinHandle<anyhow::Result<()>>,
    listener: JoinHandle<anyhow::Result<()>>,
    db: DatabaseConnection,
}

impl LiveLoad {
    /// Installs the trigger in the database of `db` (`db_url`), then publishes `rate` events a
    /// second to `exchange` until [`LiveLoad::finish`]: event `n` is a `user.updated` whose
    /// `data` is `make(n)`.
    pub async fn start(
        db: &DatabaseConnection,
        db_url: &str,
        amqp_url: &str,
        exchange: &str,
        rate: u32,
        make: Arc<MakeEvent>,
    ) -> anyhow::Result<Self> {
        let prefix = format!("live_{}_", uuid::Uuid::new_v4().simple());
        db.execute_unprepared(&format!(
            "CREATE OR REPLACE FUNCTION scale_bench_notify() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM pg_notify('{CHANNEL}', NEW.svix_id); RETURN NULL; END $$; \
             CREATE TRIGGER scale_bench_notify AFTER INSERT ON processed_events FOR EACH ROW \
               WHEN (NEW.svix_id LIKE 'live\\_%') EXECUTE FUNCTION scale_bench_notify()"
        ))
        .await
        .context("installing the live events' trigger")?;
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect(db_url).await?;
        listener.listen(CHANNEL).await?;

        let times = Arc::new(Mutex::new(Times::default()));
        let listener = {
            let times = times.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                loop {
                    let notification = listener.recv().await?;
                    let seen = Instant::now();
                    let Some(number) = notification
                        .payload()
                        .strip_prefix(prefix.as_str())
                        .and_then(|number| number.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let mut times = lock(&times);
                    if times.applied.len() <= number {
                        times.applied.resize(number + 1, None);
                    }
                    times.applied[number].get_or_insert(seen);
                }
            })
        };

        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .context("connecting the live events' publisher")?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = {
            let (times, next, stop, prefix) =
                (times.clone(), next.clone(), stop.clone(), prefix.clone());
            let exchange = exchange.to_owned();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
                // A late tick is made up for at once: the rate stays the one asked for.
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut confirms = tokio::task::JoinSet::new();
                while !stop.load(Ordering::SeqCst) {
                    ticks.tick().await;
                    let number = next.load(Ordering::SeqCst);
                    let svix_id = format!("{prefix}{number}");
                    let body = envelope(EVENT_TYPE, make(number)).to_string();
                    lock(&times).published.push(Instant::now());
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            EVENT_TYPE.into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            body.as_bytes(),
                            event_properties(&svix_id, EVENT_TYPE),
                        )
                        .await?;
                    next.store(number + 1, Ordering::SeqCst);
                    confirms.spawn(confirm);
                    while let Some(done) = confirms.try_join_next() {
                        anyhow::ensure!(done??.is_ack(), "the broker refused a live event");
                    }
                }
                while let Some(done) = confirms.join_next().await {
                    anyhow::ensure!(done??.is_ack(), "the broker refused a live event");
                }
                let _ = connection.close(200, "live events done".into()).await;
                Ok(())
            })
        };
        Ok(Self {
            prefix,
            times,
            next,
            stop,
            publisher,
            listener,
            db: db.clone(),
        })
    }

    /// The number the next event will get: a mark between two parts of a run.
    pub fn mark(&self) -> usize {
        self.next.load(Ordering::SeqCst)
    }

    /// The latency of events `from..to`, once each of them has been seen applied or `within`
    /// has passed (those not seen by then count as published and not applied).
    pub async fn latency(&self, from: usize, to: usize, within: Duration) -> Latency {
        let deadline = Instant::now() + within;
        loop {
            let all_seen = {
                let times = lock(&self.times);
                (from..to).all(|n| times.applied.get(n).copied().flatten().is_some())
            };
            if all_seen || Instant::now() > deadline || self.listener.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let times = lock(&self.times);
        let waits = (from..to)
            .filter_map(|n| {
                let applied = times.applied.get(n).copied().flatten()?;
                Some(applied.duration_since(*times.published.get(n)?))
            })
            .collect();
        Latency::of(waits, to - from)
    }

    /// Publishes for `idle` and returns the latency of those events: the baseline.
    pub async fn baseline(&self, idle: Duration, within: Duration) -> Latency {
        let from = self.mark();
        tokio::time::sleep(idle).await;
        self.latency(from, self.mark(), within).await
    }

    /// Stops publishing, waits for the last confirms, and removes the trigger.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.publisher
            .await
            .context("the live events' publisher")??;
        self.listener.abort();
        self.db
            .execute_unprepared(
                "DROP TRIGGER IF EXISTS scale_bench_notify ON processed_events; \
                 DROP FUNCTION IF EXISTS scale_bench_notify()",
            )
            .await?;
        Ok(())
    }

    /// The svix-ids of the live events start with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

fn lock(times: &Mutex<Times>) -> MutexGuard<'_, Times> {
    match times.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ranks_of_the_sorted_waits() {
        let waits = (1..=100).map(Duration::from_millis).collect();
        let latency = Latency::of(waits, 101);
        assert_eq!(latency.p50, Some(Duration::from_millis(50)));
        assert_eq!(latency.p99, Some(Duration::from_millis(99)));
        assert_eq!(latency.max, Some(Duration::from_millis(100)));
        assert_eq!((latency.published, latency.applied), (101, 100));
        assert_eq!(Latency::of(Vec::new(), 0).p99, None);
    }
}
