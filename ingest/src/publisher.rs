//! Publishing to RabbitMQ with publisher confirms, over one connection and a pool of channels
//! that a supervisor task keeps alive.
//!
//! The supervisor connects (retrying with capped exponential back-off while the broker is down),
//! declares the topology, opens the channels in confirm mode and then watches: a lost connection
//! is replaced whole, a channel the broker closed is replaced alone. Requests never wait for it:
//! while nothing usable is connected, [`Publisher::publish`] fails at once, and every publish is
//! bounded by the confirm timeout.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use shared::headers::{RECEIVED_AT, SVIX_ID, SVIX_SIGNATURE, SVIX_TIMESTAMP};
use shared::{AmqpNodes, Backoff, Topology};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::signature::SignedHeaders;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// The pause before reconnecting: 100 ms, doubled after each failed attempt, at most 10 s.
const RECONNECT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(10),
};
/// A connection attempt that takes longer than this is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing waits for the supervisor before abandoning a connection attempt.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// How often the supervisor looks at the channels even without a reported failure.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Why a verified event could not be made into an AMQP message (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("event type is longer than 255 bytes")]
    TypeTooLong,
}

/// Why the broker did not take a message. Every variant is answered 503: Svix retries.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("the broker refused the publish")]
    Channel(#[source] lapin::Error),
    #[error("the broker nacked the message")]
    Nacked,
    #[error("the broker returned the message as unroutable")]
    Unroutable,
    #[error("the channel is not in confirm mode")]
    Unconfirmed,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
}

/// One event, ready to publish: routing key, properties and headers, and the body as received.
#[derive(Debug, Clone)]
pub struct Message {
    routing_key: ShortString,
    properties: BasicProperties,
    body: Bytes,
}

impl Message {
    /// Builds the message for a verified event: routing key = event type, `message_id` =
    /// svix-id, `type` = event type, `timestamp` = svix-timestamp, persistent, JSON, and the
    /// svix headers plus `received-at`.
    pub fn new(
        event_type: &str,
        signed: &SignedHeaders,
        body: Bytes,
        received_at: DateTime<Utc>,
    ) -> Result<Self, InvalidMessage> {
        let routing_key =
            ShortString::try_new(event_type).map_err(|_| InvalidMessage::TypeTooLong)?;
        let mut headers = FieldTable::default();
        for (name, value) in [
            (SVIX_ID, signed.id.to_string()),
            (SVIX_TIMESTAMP, signed.timestamp.to_string()),
            (SVIX_SIGNATURE, signed.signature.clone()),
            (
                RECEIVED_AT,
                received_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ] {
            headers.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(signed.id.clone())
            .with_type(routing_key.clone())
            // Verified to be within 5 minutes of now, so never negative.
            .with_timestamp(u64::try_from(signed.timestamp).unwrap_or_default())
            .with_headers(headers);
        Ok(Self {
            routing_key,
            properties,
            body,
        })
    }

    /// Routing key, properties and body, as they go on the wire.
    pub fn parts(&self) -> (&ShortString, &BasicProperties, &[u8]) {
        (&self.routing_key, &self.properties, &self.body)
    }
}

/// The producer span of one publish and its confirm, and the message with the span's trace
/// context (`traceparent`, `tracestate`) added to its headers.
fn producer_span(exchange: &str, name: &str, message: Message) -> (tracing::Span, Message) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Message {
        routing_key,
        properties,
        body,
    } = message;
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        otel.name = name,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key.as_str(),
        messaging.message.id = properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
            .unwrap_or_default(),
        messaging.message.body.size = body.len(),
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let mut headers = properties.headers().clone().unwrap_or_default();
    shared::trace_context::inject(&span.context(), &mut headers);
    let message = Message {
        routing_key,
        properties: properties.with_headers(headers),
        body,
    };
    (span, message)
}

/// The publishing side of the ingest. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
    supervisor: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

struct Shared {
    nodes: AmqpNodes,
    topology: Topology,
    channel_count: usize,
    confirm_timeout: Duration,
    metrics: Metrics,
    /// `<exchange> publish`: the name of the producer spans.
    publish_span_name: String,
    /// The live connection and its channels; `None` while disconnected.
    link: RwLock<Option<Arc<Link>>>,
    /// Round-robin position in the channel pool.
    next: AtomicUsize,
    /// Wakes the supervisor when a request found a channel broken.
    repair: Notify,
    stopping: AtomicBool,
    stop: Notify,
}

struct Link {
    connection: Arc<Connection>,
    /// `host:port` of the broker node the connection goes to.
    node: String,
    channels: Vec<Channel>,
}

impl Publisher {
    /// Starts the supervisor, which connects in the background: the ingest starts (and
    /// answers 503) even while the broker is down. Must be called inside a Tokio runtime.
    pub fn start(
        nodes: AmqpNodes,
        topology: Topology,
        channel_count: usize,
        confirm_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        let shared = Arc::new(Shared {
            nodes,
            publish_span_name: format!("{} publish", topology.exchange),
            topology,
            channel_count: channel_count.max(1),
            confirm_timeout,
            metrics,
            link: RwLock::new(None),
            next: AtomicUsize::new(0),
            repair: Notify::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        });
        let supervisor = tokio::spawn(supervise(Arc::clone(&shared)));
        Self {
            shared,
            supervisor: Arc::new(std::sync::Mutex::new(Some(supervisor))),
        }
    }

    /// Publishes `message` and waits for the broker's confirm, at most the confirm timeout.
    /// `Ok` only when the broker acknowledged the message and did not return it.
    pub async fn publish(&self, message: Message) -> Result<(), PublishError> {
        if !shared::telemetry::enabled() {
            return self.publish_and_confirm(message).await;
        }
        let (span, message) = producer_span(
            &self.shared.topology.exchange,
            &self.shared.publish_span_name,
            message,
        );
        let result = self
            .publish_and_confirm(message)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(()) => span.record("outcome", "confirmed"),
            Err(error) => span
                .record("outcome", error.to_string())
                .record("otel.status_code", "ERROR"),
        };
        result
    }

    async fn publish_and_confirm(&self, message: Message) -> Result<(), PublishError> {
        let channel = self.channel().ok_or(PublishError::NotConnected)?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.shared.confirm_timeout);
        let timeout = PublishError::Timeout(self.shared.confirm_timeout);
        let Message {
            routing_key,
            properties,
            body,
        } = message;
        // Kept for the log line of a confirm that comes after the timeout.
        let message_id = properties.message_id().clone();
        let publish = channel.basic_publish(
            ShortString::from(self.shared.topology.exchange.as_str()),
            routing_key,
            BasicPublishOptions {
                // Unroutable messages come back (Ack + returned) instead of vanishing.
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            properties,
        );
        // One deadline (one timer) for handing the message over and for its confirm.
        let mut pending = None;
        let answered = tokio::time::timeout_at(deadline, async {
            let confirm = pending.insert(publish.await?);
            confirm.await
        })
        .await;
        let result = match answered {
            Ok(Err(error)) => Err(PublishError::Channel(error)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(PublishError::Unroutable),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Unconfirmed),
            Err(_elapsed) => {
                if let Some(confirm) = pending {
                    // A dropped confirm would be parked inside lapin until `wait_for_confirms`,
                    // growing without bound while the broker stalls; await it here instead. It
                    // ends with the broker's late answer or with the channel.
                    tokio::spawn(async move {
                        let late = confirm.await;
                        tracing::info!(
                            svix_id = message_id
                                .as_ref()
                                .map(ShortString::as_str)
                                .unwrap_or_default(),
                            acked = matches!(late, Ok(Confirmation::Ack(None))),
                            "late confirm for an event already answered 503"
                        );
                    });
                }
                Err(timeout)
            }
        };
        self.shared
            .metrics
            .confirm_latency
            .observe(started.elapsed().as_secs_f64());
        if matches!(
            result,
            Err(PublishError::Channel(_) | PublishError::Unconfirmed)
        ) {
            self.shared.repair.notify_one();
        }
        result
    }

    /// The broker node (`host:port`) in use, when a connection is up with at least one channel
    /// that can publish.
    pub fn ready_node(&self) -> Option<String> {
        self.shared
            .current()
            .filter(|link| link.is_usable())
            .map(|link| link.node.clone())
    }

    /// Stops the supervisor and closes the connection. Called once the HTTP server has stopped,
    /// so no request is still waiting for a confirm.
    pub async fn close(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.notify_one();
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut supervisor) = supervisor {
            // It stops at once unless a connection attempt is under way; that one need not
            // finish (it could take CONNECT_TIMEOUT against an unreachable broker).
            match tokio::time::timeout(STOP_GRACE, &mut supervisor).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "publisher supervisor ended abnormally"),
                Err(_elapsed) => supervisor.abort(),
            }
        }
        if let Some(link) = self.shared.replace(None) {
            link.close().await;
        }
        self.shared.metrics.broker_connected.set(0);
    }

    /// The next usable channel of the pool, round robin.
    fn channel(&self) -> Option<Channel> {
        let link = self.shared.current()?;
        let count = link.channels.len();
        let start = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let found = (0..count)
            .map(|offset| &link.channels[(start + offset) % count])
            .find(|channel| channel.status().connected())
            .cloned();
        if found.is_none() || !link.connection.status().connected() {
            self.shared.repair.notify_one();
        }
        found
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Link>> {
        self.link
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, link: Option<Arc<Link>>) -> Option<Arc<Link>> {
        let ready = link.as_ref().is_some_and(|link| link.is_usable());
        // One series, for the node in use; none while disconnected.
        self.metrics.broker_node.reset();
        if let Some(link) = link.as_ref().filter(|_| ready) {
            self.metrics
                .broker_node
                .with_label_values(&[link.node.as_str()])
                .set(1);
        }
        let old = std::mem::replace(
            &mut *self.link.write().unwrap_or_else(PoisonError::into_inner),
            link,
        );
        self.metrics.broker_connected.set(i64::from(ready));
        old
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl Link {
    fn is_usable(&self) -> bool {
        let status = self.connection.status();
        // A blocked connection (broker memory or disk alarm) takes publishes but confirms none
        // until the alarm clears.
        status.connected()
            && !status.blocked()
            && self
                .channels
                .iter()
                .any(|channel| channel.status().connected())
    }

    async fn close(&self) {
        if self.connection.status().connected()
            && let Err(error) = self
                .connection
                .close(200, ShortString::from("ingest shutting down"))
                .await
        {
            tracing::debug!(%error, "closing the broker connection");
        }
    }
}

/// Connects, watches, reconnects, until [`Publisher::close`].
async fn supervise(shared: Arc<Shared>) {
    // Failed attempts since the last connection.
    let mut retry = 0_u32;
    let mut connections = 0_u64;
    while !shared.is_stopping() {
        // Each node gets CONNECT_TIMEOUT, and the topology and channels one more.
        let limit = CONNECT_TIMEOUT * (shared.nodes.len() as u32 + 1);
        let connected = tokio::time::timeout(limit, connect(&shared))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {limit:?}")));
        match connected {
            Ok(link) => {
                retry = 0;
                if connections > 0 {
                    shared.metrics.broker_reconnects.inc();
                }
                connections += 1;
                tracing::info!(
                    node = %link.node,
                    channels = link.channels.len(),
                    exchange = %shared.topology.exchange,
                    "connected to the broker"
                );
                let link = Arc::new(link);
                shared.replace(Some(Arc::clone(&link)));
                watch(&shared, link).await;
                if let Some(old) = shared.replace(None) {
                    old.close().await;
                }
            }
            Err(error) => {
                retry = retry.saturating_add(1);
                let pause = RECONNECT_BACKOFF.delay(retry);
                tracing::warn!(
                    error = format!("{error:#}"),
                    retry_in_ms = pause.as_millis() as u64,
                    "cannot connect to the broker"
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.stop.notified() => {}
                }
            }
        }
    }
}

/// Opens the connection, declares the topology and opens the channels in confirm mode.
async fn connect(shared: &Shared) -> anyhow::Result<Link> {
    use anyhow::Context as _;
    // No lapin auto-recovery: this task owns reconnecting, so there is one recovery path.
    let (connection, node) = shared
        .nodes
        .connect(
            ConnectionProperties::default()
                .with_connection_name(LongString::from("clerk-sync ingest")),
            CONNECT_TIMEOUT,
        )
        .await?;
    // Declared on channels of their own: a mismatch closes those, not a publishing one.
    shared
        .topology
        .declare_on(&connection)
        .await
        .with_context(|| format!("declaring the topology on {node}"))?;
    let mut channels = Vec::with_capacity(shared.channel_count);
    for _ in 0..shared.channel_count {
        channels.push(open_channel(&connection).await?);
    }
    Ok(Link {
        connection: Arc::new(connection),
        node,
        channels,
    })
}

async fn open_channel(connection: &Connection) -> anyhow::Result<Channel> {
    use anyhow::Context as _;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(channel)
}

/// Returns when the connection is lost or the publisher stops. Replaces channels the broker
/// closed on their own while the connection stays up.
async fn watch(shared: &Shared, mut link: Arc<Link>) {
    let mut events = link.connection.events_listener();
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tokio::select! {
            () = shared.stop.notified() => return,
            event = events.next() => {
                if let Some(lapin::Event::Error(error)) = &event {
                    tracing::warn!(%error, "broker connection error");
                }
                if event.is_none() {
                    return;
                }
            }
            () = shared.repair.notified() => {}
            _ = tick.tick() => {}
        }
        if shared.is_stopping() {
            return;
        }
        if !link.connection.status().connected() {
            tracing::warn!("lost the broker connection; reconnecting");
            return;
        }
        if link
            .channels
            .iter()
            .all(|channel| channel.status().connected())
        {
            continue;
        }
        match reopen_channels(&link).await {
            Ok(repaired) => {
                link = Arc::new(repaired);
                shared.replace(Some(Arc::clone(&link)));
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot reopen channels; reconnecting"
                );
                return;
            }
        }
    }
}

/// A copy of `link` with its closed channels replaced by fresh ones.
async fn reopen_channels(link: &Link) -> anyhow::Result<Link> {
    let mut channels = Vec::with_capacity(link.channels.len());
    for channel in &link.channels {
        if channel.status().connected() {
            channels.push(channel.clone());
        } else {
            tracing::warn!(
                channel = channel.id(),
                "a publishing channel was closed; reopening it"
            );
            channels.push(open_channel(&link.connection).await?);
        }
    }
    Ok(Link {
        connection: Arc::clone(&link.connection),
        node: link.node.clone(),
        channels,
    })
}
