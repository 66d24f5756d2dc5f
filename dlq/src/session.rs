//! The broker side: one connection per command, one channel per session.
//!
//! AMQP 0-9-1 cannot peek, so a session takes dead letters (with a consumer) without
//! acknowledging them. The broker keeps every letter it handed out until the session either
//! acknowledges it (replayed or purged) or gives it back: explicitly with `basic.nack(requeue)`
//! in [`Session::release`], or implicitly when the channel or connection closes, whatever the
//! reason (a crash included). So a letter leaves the queue only by an explicit acknowledgement.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind,
    PublisherConfirm,
};
use shared::{AmqpNodes, Topology, headers};
use tracing::Instrument as _;

use crate::error::DlqError;
use crate::letter::DeadLetter;

/// How long connecting to one node may take before the next is tried (an unroutable host would
/// otherwise hang for the operating system's TCP timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a fetch waits for a delivery before it checks whether any letter is left at all.
const IDLE: Duration = Duration::from_millis(500);

/// How long any one wait on the broker may take (a publish, its confirm, an acknowledgement, a
/// cancel, a close): a broker blocked by a memory or disk alarm reads nothing, and a command must
/// end rather than hang.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// AMQP reply code for a normal close.
const REPLY_SUCCESS: u16 = 200;

/// An open connection to the broker and the names to work on.
pub struct Broker {
    connection: Connection,
    topology: Topology,
}

impl Broker {
    /// Connects to the first of `nodes` that answers. The error names each node by host and
    /// port, never the credentials.
    pub async fn connect(nodes: &AmqpNodes, topology: Topology) -> Result<Self, DlqError> {
        // No automatic recovery: a command that loses its connection stops, and everything it
        // had not acknowledged goes back to the queue.
        let (connection, node) = nodes
            .connect(ConnectionProperties::default(), CONNECT_TIMEOUT)
            .await
            .map_err(|error| DlqError::Connect {
                address: nodes.addresses().join(", "),
                reason: match error.failures.as_slice() {
                    [(_, reason)] => reason.clone(),
                    _ => error.to_string(),
                },
            })?;
        tracing::debug!(%node, "connected to the broker");
        Ok(Self {
            connection,
            topology,
        })
    }

    /// The exchange and queue names this broker works on.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Opens a session on the dead-letter queue, failing clearly when the queue does not exist.
    pub async fn session(&self) -> Result<Session, DlqError> {
        let channel = bounded("opening a channel", self.connection.create_channel()).await?;
        // Confirms on: a replayed copy counts only once the broker has taken responsibility.
        bounded(
            "enabling publisher confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let ready = self
            .queue_length(&channel, &self.topology.dead_queue, "AMQP_DEAD_QUEUE")
            .await?;
        Ok(Session {
            channel,
            topology: self.topology.clone(),
            ready,
            fetched: 0,
            consumer: None,
            held: Vec::new(),
        })
    }

    /// Checks that the worker queue exists, so a replay fails before it takes anything.
    pub async fn check_worker_queue(&self) -> Result<(), DlqError> {
        // A failed passive declare closes the channel, so it gets a channel of its own.
        let channel = bounded("opening a channel", self.connection.create_channel()).await?;
        self.queue_length(&channel, &self.topology.queue, "AMQP_QUEUE")
            .await?;
        close_channel(&channel).await;
        Ok(())
    }

    /// Deletes every ready message of the dead-letter queue and says how many.
    pub async fn purge(&self) -> Result<u32, DlqError> {
        let session = self.session().await?;
        let purged = bounded(
            "purging the dead-letter queue",
            session.channel.queue_purge(
                self.topology.dead_queue.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            ),
        )
        .await?;
        session.release().await;
        Ok(purged)
    }

    /// Closes the connection; anything still unacknowledged goes back to its queue.
    pub async fn close(self) {
        // The command's outcome is decided already; a failing close changes nothing for it.
        let close = self
            .connection
            .close(REPLY_SUCCESS, "dlq command done".into());
        let _ = tokio::time::timeout(BROKER_TIMEOUT, close).await;
    }

    /// The ready messages of `queue`, failing clearly when it does not exist.
    async fn queue_length(
        &self,
        channel: &Channel,
        queue: &str,
        variable: &'static str,
    ) -> Result<u32, DlqError> {
        match ready_messages(channel, queue).await {
            Ok(ready) => Ok(ready),
            Err(error) if is_not_found(&error) => Err(DlqError::QueueMissing {
                queue: queue.to_string(),
                variable,
            }),
            Err(error) => Err(DlqError::Broker {
                action: "looking up a queue",
                error,
            }),
        }
    }
}

/// Why a copy was not taken by the worker queue. The dead letter stays where it is.
#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    #[error("the worker queue {queue} does not exist, so the broker returned the copy")]
    Unroutable { queue: String },
    #[error("the broker refused the copy (is the worker queue {queue} full?)")]
    Refused { queue: String },
    #[error("the broker did not confirm the copy")]
    Unconfirmed,
    #[error("the broker did not confirm the copy within {} s (blocked by a memory or disk alarm?)", BROKER_TIMEOUT.as_secs())]
    Timeout,
    #[error("publishing the copy failed: {0}")]
    Broker(lapin::Error),
}

/// A published copy whose confirm has not been awaited yet.
pub struct PendingCopy {
    confirm: PublisherConfirm,
    queue: String,
    /// The copy's producer span (none when spans are not exported), ended with the confirm.
    span: tracing::Span,
}

impl PendingCopy {
    /// Waits for the broker's answer: `Ok` only when it took the copy into the worker queue.
    pub async fn confirmed(self) -> Result<(), RepublishError> {
        let span = self.span;
        let result = Self::answer(self.confirm, self.queue).await;
        match &result {
            Ok(()) => span.record("outcome", "confirmed"),
            Err(error) => span
                .record("outcome", error.to_string())
                .record("otel.status_code", "ERROR"),
        };
        result
    }

    async fn answer(confirm: PublisherConfirm, queue: String) -> Result<(), RepublishError> {
        let confirmation = tokio::time::timeout(BROKER_TIMEOUT, confirm)
            .await
            .map_err(|_| RepublishError::Timeout)?;
        match confirmation.map_err(RepublishError::Broker)? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(RepublishError::Unroutable { queue }),
            Confirmation::Nack(_) => Err(RepublishError::Refused { queue }),
            Confirmation::NotRequested => Err(RepublishError::Unconfirmed),
        }
    }
}

/// One channel on the dead-letter queue and the letters it holds unacknowledged.
pub struct Session {
    channel: Channel,
    topology: Topology,
    /// Ready messages when the session opened: fetching stops there, so letters that arrive
    /// meanwhile (a replayed event failing again, say) are not taken twice in one command.
    ready: u32,
    fetched: u32,
    /// Started by the first fetch, cancelled once the letters present at the start are taken.
    consumer: Option<Consumer>,
    held: Vec<DeadLetter>,
}

impl Session {
    /// The dead-letter queue's name.
    pub fn dead_queue(&self) -> &str {
        &self.topology.dead_queue
    }

    /// Ready dead letters when the session opened.
    pub fn ready(&self) -> u32 {
        self.ready
    }

    /// Takes the next dead letter without acknowledging it, or `None` once every letter that was
    /// there at the start has been taken (or the queue ran empty because someone else took some).
    ///
    /// A consumer, not `basic.get`: on a quorum queue every `basic.get` is a replicated log
    /// entry, about ten times slower than a consumer's deliveries.
    pub async fn fetch(&mut self) -> Result<Option<DeadLetter>, DlqError> {
        if self.fetched >= self.ready {
            self.stop_consuming().await;
            return Ok(None);
        }
        let fetching = |error| DlqError::Broker {
            action: "fetching a dead letter",
            error,
        };
        let mut consumer = match self.consumer.take() {
            Some(consumer) => consumer,
            None => self.start_consuming().await.map_err(fetching)?,
        };
        let next = loop {
            match tokio::time::timeout(IDLE, consumer.next()).await {
                Ok(next) => break next,
                // Quiet: fewer letters than counted at the start are left, because another
                // command holds or took some. Stop once none is ready.
                Err(_) => {
                    let ready = ready_messages(&self.channel, &self.topology.dead_queue).await;
                    if ready.map_err(fetching)? == 0 {
                        break None;
                    }
                }
            }
        };
        self.consumer = Some(consumer);
        match next {
            Some(Ok(delivery)) => {
                self.fetched += 1;
                Ok(Some(DeadLetter::new(delivery)))
            }
            Some(Err(error)) => Err(fetching(error)),
            None => {
                self.stop_consuming().await;
                Ok(None)
            }
        }
    }

    async fn start_consuming(&self) -> lapin::Result<Consumer> {
        // Room for exactly the letters present at the start (every one stays unacknowledged until
        // the command decides), so letters arriving later are not even delivered. Beyond what a
        // prefetch count can say, no limit.
        let prefetch = u16::try_from(self.ready).unwrap_or(0);
        self.channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        self.channel
            .basic_consume(
                self.topology.dead_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    // Acknowledged only once replayed or purged.
                    no_ack: false,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// Stops deliveries: call it when no more letters are wanted. What was delivered and not
    /// acknowledged goes back when the session is released or its channel closes.
    pub async fn stop_consuming(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            // If the cancel fails the channel is broken, and closing it ends the consumer anyway.
            let cancel = self
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(BROKER_TIMEOUT, cancel).await;
        }
    }

    /// Keeps `letter` to be given back by [`Session::release`].
    pub fn hold(&mut self, letter: DeadLetter) {
        self.held.push(letter);
    }

    /// Publishes a copy of `letter` to the worker queue without waiting for the confirm, so
    /// several copies can be in flight; [`PendingCopy::confirmed`] waits for it.
    ///
    /// The copy goes through the default exchange with the worker queue's name as routing key,
    /// so queues that someone else bound to the events exchange do not get the event twice. It
    /// keeps the body and every property, and the headers except the dead-letter ones, so the
    /// worker counts its attempts afresh.
    pub async fn publish_copy(&self, letter: &DeadLetter) -> Result<PendingCopy, RepublishError> {
        let queue = self.topology.queue.clone();
        let (span, properties) = replay_span(letter, &queue);
        let publish = self.channel.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                // Unroutable (the worker queue is gone) comes back instead of vanishing.
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            letter.body(),
            properties,
        );
        let confirm = tokio::time::timeout(BROKER_TIMEOUT, publish)
            .instrument(span.clone())
            .await
            .map_err(|_| RepublishError::Timeout)?
            .map_err(RepublishError::Broker)?;
        Ok(PendingCopy {
            confirm,
            queue,
            span,
        })
    }

    /// Removes `letters` from the dead-letter queue for good, one acknowledgement each (never
    /// `multiple`, which would take letters held for release too), all sent at once.
    pub async fn acknowledge_all(&self, letters: Vec<DeadLetter>) -> Result<(), DlqError> {
        let acks = letters.iter().map(|letter| {
            letter
                .delivery
                .acker
                .ack(lapin::options::BasicAckOptions::default())
        });
        let all = tokio::time::timeout(BROKER_TIMEOUT, futures_util::future::join_all(acks))
            .await
            .map_err(|_| DlqError::Timeout {
                action: "acknowledging replayed dead letters",
                seconds: BROKER_TIMEOUT.as_secs(),
            })?;
        for acked in all {
            match acked {
                Ok(true) => {}
                Ok(false) => return Err(DlqError::AckLost),
                Err(error) => {
                    return Err(DlqError::Broker {
                        action: "acknowledging a dead letter",
                        error,
                    });
                }
            }
        }
        Ok(())
    }

    /// Gives every held letter back to the queue and closes the channel.
    ///
    /// It cannot fail in a way that matters: if the `nack` does not get through, the channel is
    /// broken, and the broker returns every letter the channel held when it closes.
    pub async fn release(mut self) {
        // First no more deliveries, or the consumer would get back what it returns.
        self.stop_consuming().await;
        // One `nack` for all: every held letter is unacknowledged, so `multiple` up to the
        // highest held tag returns them all (and anything delivered but not yet fetched).
        if let Some(last) = self
            .held
            .iter()
            .map(|letter| letter.delivery.delivery_tag)
            .max()
        {
            let requeue = BasicNackOptions {
                multiple: true,
                // `nack`, not `reject`: RabbitMQ 4.3 and later count a rejected message as a
                // failed delivery towards the quorum queue's delivery limit; a nack does not.
                requeue: true,
            };
            let nack = self.channel.basic_nack(last, requeue);
            if let Ok(Err(error)) = tokio::time::timeout(BROKER_TIMEOUT, nack).await {
                tracing::debug!(%error, "nack failed; closing the channel returns the letters");
            }
        }
        close_channel(&self.channel).await;
    }
}

/// The dead letter's properties for its replayed copy: everything kept (message id, type,
/// timestamp, content type, the svix and received-at headers, …), persistent, minus the headers
/// the worker and the broker add when they dead-letter or redeliver (`error`, `error-kind`,
/// `attempts`, `failed-at` and every `x-` header such as `x-death` and `x-delivery-count`).
pub fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(headers) = original.headers() {
        for (name, value) in headers {
            let name_text = name.as_str();
            let dead_letter_header = [
                headers::ERROR,
                headers::ERROR_KIND,
                headers::ATTEMPTS,
                headers::FAILED_AT,
            ]
            .contains(&name_text);
            if !dead_letter_header && !name_text.starts_with("x-") {
                kept.insert(name.clone(), value.clone());
            }
        }
    }
    original
        .clone()
        .with_headers(kept)
        // A replay must survive a broker restart whatever the original said.
        .with_delivery_mode(2)
}

/// The copy's properties and, when spans are exported, its producer span: a new span in the
/// command's trace, linked to the trace the letter's `traceparent` names (the event's first
/// delivery and failure), whose own context replaces that `traceparent`, so the worker's handling
/// of the copy continues the replay's trace.
fn replay_span(letter: &DeadLetter, queue: &str) -> (tracing::Span, BasicProperties) {
    let properties = replay_properties(letter.properties());
    if !shared::telemetry::enabled() {
        return (tracing::Span::none(), properties);
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(
        "dlq republish",
        otel.kind = "producer",
        otel.name = format!("{queue} publish").as_str(),
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = queue,
        messaging.message.id = letter.summary().id.as_deref().unwrap_or_default(),
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(original) =
        shared::trace_context::remote_span(letter.properties().headers().as_ref())
    {
        span.add_link(original);
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    shared::trace_context::inject(&span.context(), &mut headers);
    (span, properties.with_headers(headers))
}

/// The ready messages of `queue`, by a passive declare (which creates nothing).
async fn ready_messages(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// Runs one step on the broker with [`BROKER_TIMEOUT`] as its deadline.
async fn bounded<T>(
    action: &'static str,
    step: impl Future<Output = lapin::Result<T>>,
) -> Result<T, DlqError> {
    match tokio::time::timeout(BROKER_TIMEOUT, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(DlqError::Broker { action, error }),
        Err(_) => Err(DlqError::Timeout {
            action,
            seconds: BROKER_TIMEOUT.as_secs(),
        }),
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => amqp.get_id() == 404,
        _ => false,
    }
}

async fn close_channel(channel: &Channel) {
    // Closing returns whatever the channel still holds; if it is closed already, so much the
    // better.
    let close = channel.close(REPLY_SUCCESS, "done".into());
    let _ = tokio::time::timeout(BROKER_TIMEOUT, close).await;
}
