//! The consumer's turns of the door's "batch, then one by one".

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DbErr;
use tokio::sync::mpsc;

use super::Handler;
use super::held::HeldDelivery;
use crate::apply::{ApplyError, Event, Next, Outcome, Settle};
use crate::stop::Stop;

/// The consumer's turns of "batch, then one by one" for the deliveries of one batch: a
/// transient failure is waited out until a stop; what commits is acknowledged; a delivery that
/// fails on its own goes to its retry path ([`Handler::spawn_retry`]), one of another instance
/// to the dead letters.
pub(super) struct Settling<'a> {
    pub(super) handler: &'a Arc<Handler>,
    /// Each delivery's span, in the order of the events.
    pub(super) spans: Vec<tracing::Span>,
    /// Each delivery until it is settled or handed on.
    pub(super) deliveries: Vec<Option<HeldDelivery>>,
    pub(super) working: &'a mpsc::Sender<()>,
    pub(super) stop: Stop,
}

impl Settling<'_> {
    /// Counts a transient failure and pauses before the next try; false when a stop came first.
    async fn wait_out(&mut self, lock_timeout: bool, retry: u32) -> bool {
        let metrics = &self.handler.metrics;
        metrics.retries.with_label_values(&["transient"]).inc();
        if lock_timeout {
            metrics.lock_timeouts.inc();
        }
        self.stop
            .sleep(self.handler.config.backoff.delay(retry))
            .await
    }
}

impl Settle for Settling<'_> {
    type Stop = ();

    fn batch_span(&self) -> tracing::Span {
        if shared::telemetry::enabled() {
            crate::trace::batch_span(&self.spans.iter().collect::<Vec<_>>())
        } else {
            tracing::Span::none()
        }
    }

    fn event_span(&self, index: usize) -> tracing::Span {
        self.spans[index].clone()
    }

    async fn batch_unavailable(&mut self, error: DbErr, retry: u32) -> ControlFlow<()> {
        let lock_timeout = crate::apply::lock_timeout::is(&error);
        tracing::warn!(
            %error, retry, events = self.spans.len(),
            "database unavailable; retrying the batch after a pause"
        );
        if self.wait_out(lock_timeout, retry).await {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn batch_applied(&mut self, events: &[Event], outcomes: Vec<Outcome>, took: Duration) {
        let metrics = &self.handler.metrics;
        metrics.apply_seconds.observe(took.as_secs_f64());
        metrics.batch_size.observe(events.len() as f64);
        for ((span, delivery), (event, outcome)) in self
            .spans
            .iter()
            .zip(&mut self.deliveries)
            .zip(events.iter().zip(outcomes))
        {
            span.in_scope(|| metrics.handled(event, outcome));
            crate::trace::record_outcome(span, event, outcome);
            if let Some(delivery) = delivery.take() {
                delivery.done();
            }
        }
    }

    fn going_alone(&mut self, error: &DbErr) {
        tracing::debug!(%error, "an event of the batch failed; applying them one by one");
    }

    fn event_applied(&mut self, index: usize, event: &Event, outcome: Outcome, took: Duration) {
        self.handler
            .metrics
            .apply_seconds
            .observe(took.as_secs_f64());
        if let Some(delivery) = self.deliveries[index].take() {
            self.handler.settle(&delivery, event, outcome);
        }
    }

    async fn event_failed(
        &mut self,
        index: usize,
        _event: &Event,
        error: ApplyError,
        retry: u32,
    ) -> Next<()> {
        if let ApplyError::Transient(reason) = &error {
            let lock_timeout = crate::apply::lock_timeout::is_reason(reason);
            tracing::warn!(error = %reason, retry, "database unavailable; retrying after a pause");
            if self.wait_out(lock_timeout, retry).await {
                return Next::Retry;
            }
            // Stopped: left for the broker to hand out again.
            self.deliveries[index] = None;
            return Next::Skip;
        }
        let Some(delivery) = self.deliveries[index].take() else {
            return Next::Skip;
        };
        match error {
            ApplyError::ForeignInstance(reason) => {
                self.handler.refuse_foreign(&delivery, &reason, 1).await;
            }
            error => {
                let span = self.spans[index].clone();
                self.handler
                    .spawn_retry(delivery, error.to_string(), span, self.working);
            }
        }
        Next::Skip
    }
}
