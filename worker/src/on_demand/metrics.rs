//! The on-demand sync's own metrics: requests by kind and outcome, and the time to answer.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

use super::Object;
use crate::metrics::Metrics;

/// The on-demand metrics, registered with the worker's.
#[derive(Clone)]
pub(super) struct OnDemandMetrics {
    /// `clerk_sync_worker_on_demand_requests_total{kind, outcome}`.
    pub(super) requests: IntCounterVec,
    /// `clerk_sync_worker_on_demand_seconds{kind}`: from the request's arrival to its answer,
    /// for requests that passed the token check.
    seconds: HistogramVec,
}

impl OnDemandMetrics {
    pub(super) fn register(metrics: &Metrics) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "clerk_sync_worker_on_demand_requests_total",
                "On-demand sync requests, by kind (user, organization) and outcome: synced, \
                 reused, deleted, tombstoned, rate_limited, clerk_unavailable, \
                 database_unavailable, timed_out, failed, unauthorized, forbidden, bad_request.",
            ),
            &["kind", "outcome"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "clerk_sync_worker_on_demand_seconds",
                "Time to answer an on-demand sync request that passed the token check.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )?;
        metrics.register(Box::new(requests.clone()))?;
        metrics.register(Box::new(seconds.clone()))?;
        Ok(Self { requests, seconds })
    }

    pub(super) fn count(&self, object: Object, outcome: &str, took: Duration) {
        self.requests
            .with_label_values(&[object.name(), outcome])
            .inc();
        self.seconds
            .with_label_values(&[object.name()])
            .observe(took.as_secs_f64());
    }
}
