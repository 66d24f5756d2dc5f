//! The worker's Prometheus metrics, in a registry of its own (so several apps in one test process
//! never share counters).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use shared::roles::RoleSource;

use crate::apply::{Action, Event, Outcome};

/// Every metric the worker exports on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `clerk_sync_worker_events_total{type, outcome}`: applied, stale, ignored, duplicate,
    /// dead_lettered.
    events: IntCounterVec,
    /// `clerk_sync_worker_apply_seconds`: one database transaction (one event or one batch).
    pub apply_seconds: Histogram,
    /// `clerk_sync_worker_batch_size`: events per committed transaction.
    pub batch_size: Histogram,
    /// `clerk_sync_worker_retries_total{reason}`: `transient` or `message`.
    pub retries: IntCounterVec,
    /// `clerk_sync_worker_dead_lettered_total{kind}`: `permanent` or `exhausted`.
    pub dead_lettered: IntCounterVec,
    /// `clerk_sync_worker_duplicates_total`: deliveries whose svix-id was processed before.
    pub duplicates: IntCounter,
    /// `clerk_sync_worker_unknown_roles_total`: users whose `public_metadata.role` was not one of
    /// `WORKER_ROLES` (stored as `WORKER_DEFAULT_ROLE`).
    pub unknown_roles: IntCounter,
    /// `clerk_sync_worker_reconcile_runs_total{outcome}`: scheduled reconciles, `succeeded` or
    /// `failed`.
    reconcile_runs: IntCounterVec,
    /// `clerk_sync_worker_reconcile_changes_total{kind, change}`: what scheduled reconciles
    /// changed, by kind (`users`, `organizations`, `memberships`) and change (`created`,
    /// `updated`, `deleted`).
    reconcile_changes: IntCounterVec,
    /// `clerk_sync_worker_broker_node{node}`: 1 for the broker node (`host:port`) consumed from;
    /// no series while disconnected.
    pub broker_node: IntGaugeVec,
    /// `clerk_sync_worker_queue_depth{queue}`: ready messages in the `worker` and the `dead`
    /// queue, polled by passive declares.
    pub queue_depth: IntGaugeVec,
    /// `clerk_sync_worker_oldest_unacked_seconds`: how long the oldest delivery the worker holds
    /// has waited for its acknowledgement (0 when it holds none); set from [`Metrics::held`].
    oldest_unacked: Gauge,
    /// `clerk_sync_worker_retry_waiting`: messages waiting alone for their next attempt after a
    /// failure of their own (transient waits show in `retries_total{reason="transient"}`).
    pub retry_waiting: IntGauge,
    /// `clerk_sync_worker_processed_events_pruned_total`: rows pruned after
    /// `WORKER_PROCESSED_RETENTION`.
    pub pruned: IntCounter,
    /// `clerk_sync_worker_lock_timeouts_total`: statements that waited longer than
    /// `WORKER_LOCK_TIMEOUT` for a lock; their transaction was retried (also counted in
    /// `retries_total{reason="transient"}`).
    pub lock_timeouts: IntCounter,
    /// `clerk_sync_worker_foreign_instance_events_total`: events of another Clerk instance than
    /// the pinned one, dead-lettered without being applied (see `crate::pin`).
    pub foreign_instance_events: IntCounter,
    /// The deliveries held unacknowledged, with the time each arrived.
    pub held: Held,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new(
                "clerk_sync_worker_events_total",
                "Events handled, by type and outcome.",
            ),
            &["type", "outcome"],
        )?;
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "clerk_sync_worker_apply_seconds",
                "Time to apply and commit one transaction (one event or one batch).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "clerk_sync_worker_batch_size",
                "Events per committed transaction.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "clerk_sync_worker_retries_total",
                "Retries, by reason: transient (infrastructure) or message.",
            ),
            &["reason"],
        )?;
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "clerk_sync_worker_dead_lettered_total",
                "Messages dead-lettered, by kind: permanent or exhausted.",
            ),
            &["kind"],
        )?;
        let duplicates = IntCounter::new(
            "clerk_sync_worker_duplicates_total",
            "Deliveries whose svix-id had been processed before.",
        )?;
        let unknown_roles = IntCounter::new(
            "clerk_sync_worker_unknown_roles_total",
            "Users with a public_metadata.role outside WORKER_ROLES, stored as the default role.",
        )?;
        let reconcile_runs = IntCounterVec::new(
            Opts::new(
                "clerk_sync_worker_reconcile_runs_total",
                "Scheduled reconciles, by outcome: succeeded or failed.",
            ),
            &["outcome"],
        )?;
        let reconcile_changes = IntCounterVec::new(
            Opts::new(
                "clerk_sync_worker_reconcile_changes_total",
                "Rows scheduled reconciles changed, by kind and change: created, updated, deleted.",
            ),
            &["kind", "change"],
        )?;
        registry.register(Box::new(reconcile_runs.clone()))?;
        registry.register(Box::new(reconcile_changes.clone()))?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "clerk_sync_worker_queue_depth",
                "Ready messages in the worker queue and the dead-letter queue.",
            ),
            &["queue"],
        )?;
        let oldest_unacked = Gauge::new(
            "clerk_sync_worker_oldest_unacked_seconds",
            "Age of the oldest delivery held and not yet acknowledged.",
        )?;
        let retry_waiting = IntGauge::new(
            "clerk_sync_worker_retry_waiting",
            "Messages waiting alone for their next attempt after a failure of their own.",
        )?;
        let pruned = IntCounter::new(
            "clerk_sync_worker_processed_events_pruned_total",
            "processed_events rows pruned after WORKER_PROCESSED_RETENTION.",
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(oldest_unacked.clone()))?;
        registry.register(Box::new(retry_waiting.clone()))?;
        registry.register(Box::new(pruned.clone()))?;
        let lock_timeouts = IntCounter::new(
            "clerk_sync_worker_lock_timeouts_total",
            "Statements that waited longer than WORKER_LOCK_TIMEOUT for a lock, then retried.",
        )?;
        registry.register(Box::new(lock_timeouts.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(apply_seconds.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        let broker_node = IntGaugeVec::new(
            Opts::new(
                "clerk_sync_worker_broker_node",
                "1 for the broker node (host:port) the worker consumes from.",
            ),
            &["node"],
        )?;
        registry.register(Box::new(unknown_roles.clone()))?;
        registry.register(Box::new(broker_node.clone()))?;
        let foreign_instance_events = IntCounter::new(
            "clerk_sync_worker_foreign_instance_events_total",
            "Events of another Clerk instance than the pinned one, dead-lettered unapplied.",
        )?;
        registry.register(Box::new(foreign_instance_events.clone()))?;
        shared::telemetry::register_metrics(&registry)?;
        Ok(Self {
            registry,
            events,
            apply_seconds,
            batch_size,
            retries,
            dead_lettered,
            duplicates,
            unknown_roles,
            reconcile_runs,
            reconcile_changes,
            broker_node,
            queue_depth,
            oldest_unacked,
            retry_waiting,
            pruned,
            lock_timeouts,
            foreign_instance_events,
            held: Held::default(),
        })
    }

    /// Counts a finished scheduled reconcile.
    pub fn reconcile_run(&self, succeeded: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.reconcile_runs.with_label_values(&[outcome]).inc();
    }

    /// Counts the rows of `kind` a scheduled reconcile changed by `change` (`created`,
    /// `updated`, `deleted`).
    pub fn reconcile_changes(&self, kind: &str, change: &str, count: u64) {
        self.reconcile_changes
            .with_label_values(&[kind, change])
            .inc_by(count);
    }

    /// Counts one event. Types outside Clerk's shape are counted as `other`, so a stream of junk
    /// cannot create any number of series.
    pub fn event(&self, event_type: &str, outcome: &str) {
        self.events
            .with_label_values(&[type_label(event_type), outcome])
            .inc();
    }

    /// Counts and logs what became of an event, once its transaction committed: its outcome, a
    /// duplicate, a role the settings do not know.
    pub(crate) fn handled(&self, event: &Event, outcome: Outcome) {
        self.event(&event.event_type, outcome.as_str());
        if outcome == Outcome::Duplicate {
            self.duplicates.inc();
        }
        if let Action::Upsert(record) = &event.action
            && let RoleSource::Unknown(value) = &record.role_source
            && outcome == Outcome::Applied
        {
            self.unknown_roles.inc();
            tracing::warn!(
                user_id = %record.id, role = %value, stored_as = %record.role,
                "unknown role in public_metadata; stored as the default role"
            );
        }
        tracing::info!(outcome = outcome.as_str(), "event handled");
    }

    /// Adds a metric defined elsewhere (the on-demand sync's) to this registry.
    pub(crate) fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The Prometheus text format of every metric.
    pub fn render(&self) -> String {
        self.oldest_unacked
            .set(self.held.oldest().map_or(0.0, |age| age.as_secs_f64()));
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// The deliveries the worker holds unacknowledged. Each is registered by [`Held::hold`] and
/// leaves when its [`HeldSince`] is dropped, whatever became of it (acknowledged, dead-lettered,
/// given back on a stop), so nothing can be forgotten here.
#[derive(Clone, Default)]
pub struct Held {
    since: Arc<Mutex<HashMap<u64, Instant>>>,
    next: Arc<AtomicU64>,
}

impl Held {
    /// Registers a delivery received now.
    pub fn hold(&self) -> HeldSince {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(key, Instant::now());
        HeldSince {
            held: self.clone(),
            key,
        }
    }

    /// How long the oldest delivery held has waited; None when none is held.
    pub fn oldest(&self) -> Option<Duration> {
        self.map().values().min().map(Instant::elapsed)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        match self.since.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// One held delivery's registration; dropping it takes the delivery off the list.
pub struct HeldSince {
    held: Held,
    key: u64,
}

impl Drop for HeldSince {
    fn drop(&mut self) {
        self.held.map().remove(&self.key);
    }
}

fn type_label(event_type: &str) -> &str {
    let clerk_shaped = !event_type.is_empty()
        && event_type.len() <= 64
        && event_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
    if clerk_shaped { event_type } else { "other" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_rendered_by_type_and_outcome() {
        let metrics = Metrics::new().expect("metrics");
        metrics.event("user.created", "applied");
        metrics.event("<script>", "ignored");
        let text = metrics.render();
        assert!(
            text.contains(
                "clerk_sync_worker_events_total{outcome=\"applied\",type=\"user.created\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("type=\"other\""), "{text}");
    }

    #[test]
    fn the_oldest_held_delivery_leaves_when_its_registration_is_dropped() {
        let metrics = Metrics::new().expect("metrics");
        assert_eq!(metrics.held.oldest(), None);
        let first = metrics.held.hold();
        let second = metrics.held.hold();
        assert!(metrics.held.oldest().is_some());
        drop(first);
        assert!(metrics.held.oldest().is_some());
        drop(second);
        assert_eq!(metrics.held.oldest(), None);
        assert!(
            metrics
                .render()
                .contains("clerk_sync_worker_oldest_unacked_seconds 0"),
        );
    }
}
