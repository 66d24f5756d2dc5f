//! Prometheus metrics, in a registry owned by one application (not the global one), so several
//! applications in one test process keep their counts apart.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The ingest's metrics. Cloning shares the same counters.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `clerk_sync_ingest_requests_total{outcome}`: webhook requests by how they were answered.
    pub requests: IntCounterVec,
    /// `clerk_sync_ingest_verification_failures_total{reason}`: rejected signatures by reason.
    pub verification_failures: IntCounterVec,
    /// `clerk_sync_ingest_confirm_latency_seconds`: from publish to the broker's confirm (or failure).
    pub confirm_latency: Histogram,
    /// `clerk_sync_ingest_broker_connected`: 1 while a connection with usable channels is up, else 0.
    pub broker_connected: IntGauge,
    /// `clerk_sync_ingest_broker_node{node}`: 1 for the broker node (`host:port`) in use while
    /// connected; no series while disconnected.
    pub broker_node: IntGaugeVec,
    /// `clerk_sync_ingest_broker_reconnects_total`: connections established after the first one.
    pub broker_reconnects: IntCounter,
    /// `clerk_sync_ingest_last_accepted_timestamp_seconds`: Unix time of the last accepted event,
    /// the start of the process until one is accepted (so a fresh ingest is not taken for one
    /// that Clerk stopped reaching hours ago).
    pub last_accepted: Gauge,
    /// `clerk_sync_ingest_body_budget_bytes`: bytes of request bodies held right now, against
    /// `INGEST_BODY_BUDGET`.
    pub body_budget_used: IntGauge,
    /// The `requests` series of each outcome, looked up once instead of at every request.
    outcomes: [IntCounter; Outcome::ALL.len()],
}

/// How a webhook request was answered: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    BadRequest,
    Unauthorized,
    PayloadTooLarge,
    RequestTimeout,
    Overloaded,
    BodyBudgetExhausted,
    BrokerUnavailable,
}

impl Outcome {
    /// Every outcome, so each series exists from the start (at 0).
    pub const ALL: [Outcome; 8] = [
        Outcome::Accepted,
        Outcome::BadRequest,
        Outcome::Unauthorized,
        Outcome::PayloadTooLarge,
        Outcome::RequestTimeout,
        Outcome::Overloaded,
        Outcome::BodyBudgetExhausted,
        Outcome::BrokerUnavailable,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::BadRequest => "bad_request",
            Outcome::Unauthorized => "unauthorized",
            Outcome::PayloadTooLarge => "payload_too_large",
            Outcome::RequestTimeout => "request_timeout",
            Outcome::Overloaded => "overloaded",
            Outcome::BodyBudgetExhausted => "body_budget_exhausted",
            Outcome::BrokerUnavailable => "broker_unavailable",
        }
    }
}

impl Metrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "clerk_sync_ingest_requests_total",
                "Webhook requests by how they were answered.",
            ),
            &["outcome"],
        )?;
        let verification_failures = IntCounterVec::new(
            Opts::new(
                "clerk_sync_ingest_verification_failures_total",
                "Webhook requests whose signature was rejected, by reason.",
            ),
            &["reason"],
        )?;
        let confirm_latency = Histogram::with_opts(
            HistogramOpts::new(
                "clerk_sync_ingest_confirm_latency_seconds",
                "Time from publishing a message to the broker's confirm.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let broker_connected = IntGauge::new(
            "clerk_sync_ingest_broker_connected",
            "1 while the broker connection and its publishing channels are usable.",
        )?;
        let broker_node = IntGaugeVec::new(
            Opts::new(
                "clerk_sync_ingest_broker_node",
                "1 for the broker node (host:port) the ingest is connected to.",
            ),
            &["node"],
        )?;
        let broker_reconnects = IntCounter::new(
            "clerk_sync_ingest_broker_reconnects_total",
            "Broker connections established after the first one.",
        )?;
        let last_accepted = Gauge::new(
            "clerk_sync_ingest_last_accepted_timestamp_seconds",
            "Unix time of the last accepted event (the start of the process until one is).",
        )?;
        last_accepted.set(unix_now());
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(verification_failures.clone()))?;
        registry.register(Box::new(confirm_latency.clone()))?;
        registry.register(Box::new(broker_connected.clone()))?;
        registry.register(Box::new(broker_node.clone()))?;
        let body_budget_used = IntGauge::new(
            "clerk_sync_ingest_body_budget_bytes",
            "Bytes of request bodies held right now, against INGEST_BODY_BUDGET.",
        )?;
        registry.register(Box::new(broker_reconnects.clone()))?;
        registry.register(Box::new(last_accepted.clone()))?;
        registry.register(Box::new(body_budget_used.clone()))?;
        shared::telemetry::register_metrics(&registry)?;
        let outcomes = Outcome::ALL.map(|outcome| requests.with_label_values(&[outcome.label()]));
        for reason in crate::signature::VerifyError::REASONS {
            verification_failures.with_label_values(&[reason]);
        }
        Ok(Self {
            registry,
            requests,
            verification_failures,
            confirm_latency,
            broker_connected,
            broker_node,
            broker_reconnects,
            last_accepted,
            body_budget_used,
            outcomes,
        })
    }

    /// Counts one answered webhook request; an accepted one also sets the last accepted time.
    pub fn record(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
        if outcome == Outcome::Accepted {
            self.last_accepted.set(unix_now());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|error| prometheus::Error::Msg(error.to_string()))
    }
}

/// Seconds since the Unix epoch, with the fraction.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_listed_at_its_own_index() {
        // `record` indexes the looked-up counters by the variant's number.
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index, "{outcome:?}");
        }
    }

    #[test]
    fn recording_counts_under_the_outcome_label() {
        let metrics = Metrics::new().expect("metrics");
        metrics.record(Outcome::BodyBudgetExhausted);
        metrics.record(Outcome::BodyBudgetExhausted);
        let text = metrics.render().expect("render");
        assert!(
            text.contains(r#"clerk_sync_ingest_requests_total{outcome="body_budget_exhausted"} 2"#),
            "{text}"
        );
    }
}
