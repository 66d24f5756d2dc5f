//! The consume loop and what happens to each delivery.
//!
//! The loop is simple on purpose: it takes a free slot, waits for a delivery, adds whatever else
//! is already waiting (up to `WORKER_BATCH_SIZE`), and hands the batch to a task. While other
//! batches are in flight, a batch that is not full first gathers what arrives until one of them
//! is done, it is full, or [`GATHER_AT_MOST`] passed. Prefetch bounds the deliveries held; the
//! slots (`WORKER_DB_POOL_SIZE`) bound the transactions in flight.
//!
//! Retry policy (also in the crate README):
//! - transient failures (database or broker unusable, serialization failure, deadlock): the same
//!   events are retried after an exponential, capped back-off, for as long as it takes; this is
//!   not counted against the message and never dead-letters it;
//! - a failure that belongs to the message: retried alone, up to `WORKER_MAX_ATTEMPTS` attempts in
//!   all with the same back-off, then dead-lettered as `exhausted` with its attempt count;
//! - a message that can never apply: dead-lettered at once as `permanent`.
//!
//! A delivery is acknowledged only after its transaction committed, or after its dead letter was
//! confirmed; the acknowledgements go in ranges from a task of their own (`crate::acks`), so a
//! batch's slot is free again as soon as it committed. On shutdown, work in flight finishes; a
//! delivery still waiting for a retry is left unacknowledged, so the broker hands it out again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use sea_orm::DatabaseConnection;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::Instrument;

use shared::headers;

mod held;
mod settling;

use crate::acks::Acks;
use crate::apply::{self, ApplyError, Event, Outcome, ReadError};
use crate::config::WorkerConfig;
use crate::dead_letter::{DeadKind, DeadLetters};
use crate::delivery::{message, text};
use crate::metrics::Metrics;
use crate::stop::Stop;
use held::HeldDelivery;
use settling::Settling;

/// The longest a batch that is not full waits for a batch in flight to be done before it starts
/// beside it: about one transaction of a full batch on a loaded machine.
const GATHER_AT_MOST: Duration = Duration::from_millis(20);

/// How consuming ended.
#[derive(Debug)]
pub(crate) enum End {
    /// A stop was requested and everything in flight is done.
    Stopped,
    /// The consumer broke (connection or channel lost); reconnect.
    Lost(String),
}

/// Everything a delivery's task needs.
pub(crate) struct Handler {
    pub(crate) db: DatabaseConnection,
    pub(crate) metrics: Metrics,
    pub(crate) config: WorkerConfig,
    pub(crate) dead: DeadLetters,
    pub(crate) stop: Stop,
}

/// What the consumer stream gave: a delivery, or why there will be no more.
fn delivered(next: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, String> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(error)) => Err(error.to_string()),
        None => Err("the broker cancelled the consumer".into()),
    }
}

/// Consumes from the worker queue on `channel` until a stop or until the consumer breaks, then
/// waits for every task it started.
pub(crate) async fn consume(channel: &Channel, handler: Handler) -> End {
    let mut stop = handler.stop.clone();
    let batch_size = handler.config.batch_size;
    let slot_count = handler.config.db_pool_size as usize;
    let slots = Arc::new(Semaphore::new(slot_count));
    // Woken each time a batch is done with its slot.
    let finished = Arc::new(Notify::new());
    let mut consumer = match channel
        .basic_consume(
            handler.config.topology.queue.as_str().into(),
            // The broker picks a unique tag.
            "".into(),
            BasicConsumeOptions {
                // Manual acknowledgement: only after the commit or the confirmed dead letter.
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(consumer) => consumer,
        Err(error) => return End::Lost(format!("cannot start consuming: {error}")),
    };
    let handler = Arc::new(handler);
    let (acks, acknowledging) = Acks::start(handler.config.broker_timeout);
    // Every task holds a clone of `working`; when all are dropped, `idle` yields None.
    let (working, mut idle) = mpsc::channel::<()>(1);
    let end = loop {
        let slot = tokio::select! {
            biased;
            _ = stop.wait() => break End::Stopped,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break End::Stopped,
            },
        };
        let first = tokio::select! {
            biased;
            _ = stop.wait() => break End::Stopped,
            next = consumer.next() => next,
        };
        let held = |delivery| HeldDelivery::new(delivery, &acks, &handler.metrics);
        let mut batch = match delivered(first) {
            Ok(delivery) => vec![held(delivery)],
            Err(reason) => break End::Lost(reason),
        };
        let mut broken = None;
        while batch.len() < batch_size {
            // Nothing more waiting: go with what there is rather than wait for a full batch.
            let Some(next) = consumer.next().now_or_never() else {
                break;
            };
            match delivered(next) {
                Ok(delivery) => batch.push(held(delivery)),
                Err(reason) => {
                    broken = Some(reason);
                    break;
                }
            }
        }
        // With a batch already in flight, a second small one beside it would cost a transaction
        // for a few events: this one gathers what arrives until a batch in flight is done, it is
        // full, or `GATHER_AT_MOST` passed (a batch in flight may wait long on a lock or a
        // retry). So a steady flow goes in batches as large as a transaction's time lets arrive,
        // a backlog fills every slot with full batches, and an event that finds nothing in flight
        // starts at once.
        let done = finished.notified();
        tokio::pin!(done);
        // Registered before the count is read, so a batch finishing in between still wakes it.
        done.as_mut().enable();
        let others_in_flight = slot_count - 1 - slots.available_permits();
        if broken.is_none() && batch.len() < batch_size && others_in_flight > 0 {
            let gathered = tokio::time::sleep(GATHER_AT_MOST);
            tokio::pin!(gathered);
            loop {
                tokio::select! {
                    biased;
                    // The batch is applied all the same; the loop stops on its next turn.
                    _ = stop.wait() => break,
                    _ = &mut done => break,
                    _ = &mut gathered => break,
                    next = consumer.next() => match delivered(next) {
                        Ok(delivery) => {
                            batch.push(held(delivery));
                            if batch.len() >= batch_size {
                                break;
                            }
                        }
                        Err(reason) => {
                            broken = Some(reason);
                            break;
                        }
                    },
                }
            }
        }
        let handler = handler.clone();
        let working = working.clone();
        let finished = finished.clone();
        tokio::spawn(async move {
            handler.handle_batch(batch, &working).await;
            drop(slot);
            finished.notify_waiters();
        });
        if let Some(reason) = broken {
            break End::Lost(reason);
        }
    };
    if channel.status().connected() {
        // No new deliveries; those received but not started go back to the queue when the
        // channel closes.
        let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
        match tokio::time::timeout(handler.config.broker_timeout, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot cancel the consumer"),
            Err(_) => tracing::warn!("the broker did not take the cancel in time"),
        }
    }
    drop(working);
    let _ = idle.recv().await;
    // Every delivery is settled or released now; what is due is acknowledged before the
    // connection closes, within one broker timeout in all: a blocked broker would otherwise
    // hold each round of acknowledgements that long. What is left unacknowledged is delivered
    // again, and the svix-id makes that harmless.
    drop(acks);
    let mut acknowledging = acknowledging;
    match tokio::time::timeout(handler.config.broker_timeout, &mut acknowledging).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "the acknowledging task failed"),
        Err(_) => {
            acknowledging.abort();
            tracing::warn!("the broker did not take the last acknowledgements in time");
        }
    }
    end
}

/// A span carrying the delivery's svix-id and type, read from its properties (so it exists even
/// when the body is unreadable).
fn span_for(delivery: &Delivery) -> tracing::Span {
    let svix_id = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(headers::SVIX_ID))
        .and_then(text)
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
        })
        .unwrap_or_default();
    let event_type = delivery
        .properties
        .kind()
        .as_ref()
        .map(|kind| kind.to_string())
        .unwrap_or_else(|| delivery.routing_key.to_string());
    if shared::telemetry::enabled() {
        return crate::trace::consumer_span(delivery, &svix_id, &event_type);
    }
    tracing::info_span!("event", svix_id = %svix_id, r#type = %event_type)
}

impl Handler {
    async fn handle_batch(
        self: &Arc<Self>,
        deliveries: Vec<HeldDelivery>,
        working: &mpsc::Sender<()>,
    ) {
        let mut spans = Vec::with_capacity(deliveries.len());
        let mut held = Vec::with_capacity(deliveries.len());
        let mut events = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let span = span_for(&delivery);
            match self
                .config
                .reading
                .read(&message(&delivery.data, &delivery.properties))
            {
                Ok(mut event) => {
                    if shared::telemetry::enabled() {
                        event.trace_id = crate::trace::trace_id(&span).or(event.trace_id);
                    }
                    held.push(Some(delivery));
                    spans.push(span);
                    events.push(event);
                }
                Err(ReadError::Permanent(reason)) => {
                    self.dead_letter(&delivery, None, DeadKind::Permanent, &reason, 1)
                        .instrument(span)
                        .await;
                }
                Err(ReadError::Message(reason)) => {
                    self.spawn_retry(delivery, reason, span, working);
                }
            }
        }
        if events.is_empty() {
            return;
        }
        let mut settling = Settling {
            handler: self,
            spans,
            deliveries: held,
            working,
            stop: self.stop.clone(),
        };
        // Stopped: what is left unsettled is released when `settling` drops.
        let _ = apply::write_with(&self.db, &events, &mut settling).await;
    }

    /// An event of another Clerk instance: counted, dead-lettered at once as `permanent`.
    async fn refuse_foreign(&self, delivery: &HeldDelivery, reason: &str, attempts: u32) {
        self.metrics.foreign_instance_events.inc();
        self.dead_letter(delivery, None, DeadKind::Permanent, reason, attempts)
            .await;
    }

    fn settle(&self, delivery: &HeldDelivery, event: &Event, outcome: Outcome) {
        self.metrics.handled(event, outcome);
        crate::trace::record_outcome(&tracing::Span::current(), event, outcome);
        delivery.done();
    }

    /// Applies `event` alone, waiting out transient failures. None when a stop came first; the
    /// error is a failure that counts against the message, or a refused instance.
    async fn apply_until_settled(&self, event: &Event) -> Option<Result<Outcome, ApplyError>> {
        let mut stop = self.stop.clone();
        let mut retry = 0;
        loop {
            let started = Instant::now();
            match apply::apply(&self.db, event).await {
                Err(ApplyError::Transient(error)) => {
                    retry += 1;
                    self.metrics.retries.with_label_values(&["transient"]).inc();
                    if crate::apply::lock_timeout::is_reason(&error) {
                        self.metrics.lock_timeouts.inc();
                    }
                    tracing::warn!(%error, retry, "database unavailable; retrying after a pause");
                    if !stop.sleep(self.config.backoff.delay(retry)).await {
                        return None;
                    }
                }
                Err(error) => return Some(Err(error)),
                Ok(outcome) => {
                    self.metrics
                        .apply_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Some(Ok(outcome));
                }
            }
        }
    }

    /// Retries a delivery whose first attempt failed on its own account, in a task of its own so
    /// its pauses hold up nothing else.
    fn spawn_retry(
        self: &Arc<Self>,
        delivery: HeldDelivery,
        reason: String,
        span: tracing::Span,
        working: &mpsc::Sender<()>,
    ) {
        let handler = self.clone();
        let working = working.clone();
        span.record("outcome", "retried");
        delivery.park();
        handler.metrics.retry_waiting.inc();
        tokio::spawn(
            async move {
                handler.retry(delivery, reason).await;
                handler.metrics.retry_waiting.dec();
                drop(working);
            }
            .instrument(span),
        );
    }

    async fn retry(&self, delivery: HeldDelivery, mut reason: String) {
        let mut stop = self.stop.clone();
        let mut attempts: u32 = 1;
        loop {
            if attempts >= self.config.max_attempts {
                self.dead_letter(&delivery, None, DeadKind::Exhausted, &reason, attempts)
                    .await;
                return;
            }
            self.metrics.retries.with_label_values(&["message"]).inc();
            tracing::warn!(error = %reason, attempts, "event failed; retrying it alone after a pause");
            if !stop.sleep(self.config.backoff.delay(attempts)).await {
                return;
            }
            attempts += 1;
            let event = match self
                .config
                .reading
                .read(&message(&delivery.data, &delivery.properties))
            {
                Ok(mut event) => {
                    if shared::telemetry::enabled() {
                        let span = tracing::Span::current();
                        event.trace_id = crate::trace::trace_id(&span).or(event.trace_id);
                    }
                    event
                }
                Err(ReadError::Message(again)) => {
                    reason = again;
                    continue;
                }
                Err(ReadError::Permanent(why)) => {
                    self.dead_letter(&delivery, None, DeadKind::Permanent, &why, attempts)
                        .await;
                    return;
                }
            };
            match self.apply_until_settled(&event).await {
                None => return,
                Some(Ok(outcome)) => {
                    self.settle(&delivery, &event, outcome);
                    return;
                }
                Some(Err(ApplyError::ForeignInstance(why))) => {
                    self.refuse_foreign(&delivery, &why, attempts).await;
                    return;
                }
                Some(Err(again)) => reason = again.to_string(),
            }
        }
    }

    /// Publishes the dead letter, waits for its confirm, then acknowledges the original. Broker
    /// trouble is retried while the delivery's channel lives; once it is gone the broker
    /// redelivers the message anyway.
    async fn dead_letter(
        &self,
        delivery: &HeldDelivery,
        event_type: Option<&str>,
        kind: DeadKind,
        reason: &str,
        attempts: u32,
    ) {
        let mut stop = self.stop.clone();
        let mut retry = 0;
        loop {
            match self
                .dead
                .publish(&delivery.data, &delivery.properties, kind, reason, attempts)
                .await
            {
                Ok(()) => {
                    self.metrics
                        .dead_lettered
                        .with_label_values(&[kind.as_str()])
                        .inc();
                    let event_type = event_type
                        .map(str::to_owned)
                        .or_else(|| delivery.properties.kind().as_ref().map(|k| k.to_string()))
                        .unwrap_or_else(|| "unknown".into());
                    self.metrics.event(&event_type, "dead_lettered");
                    tracing::Span::current()
                        .record("outcome", "dead_lettered")
                        .record("otel.status_code", "ERROR");
                    tracing::error!(kind = kind.as_str(), attempts, error = %reason, "dead-lettered");
                    delivery.done();
                    return;
                }
                Err(error) => {
                    if delivery.acker.poisoned() {
                        tracing::warn!(%error, "cannot dead-letter and the channel is gone; the broker will redeliver");
                        return;
                    }
                    retry += 1;
                    self.metrics.retries.with_label_values(&["transient"]).inc();
                    tracing::warn!(%error, retry, "cannot dead-letter; retrying after a pause");
                    if !stop.sleep(self.config.backoff.delay(retry)).await {
                        return;
                    }
                }
            }
        }
    }
}
