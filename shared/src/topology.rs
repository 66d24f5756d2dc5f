//! The RabbitMQ topology, declared idempotently by whichever binary starts first.
//!
//! ```text
//! exchange clerk.events (topic) ──#──▶ quorum queue clerk.events.worker
//!                                        │ x-delivery-limit reached
//!                                        ▼ (dead-letter exchange "" → routing key = dead queue)
//!                                      quorum queue clerk.events.dead
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

/// Names and limits of the exchange and queues. Configuration, so tests run on isolated names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange the ingest publishes to, routing key = event type (`AMQP_EXCHANGE`).
    pub exchange: String,
    /// Quorum queue the worker consumes, bound with `#` (`AMQP_QUEUE`).
    pub queue: String,
    /// Quorum queue holding dead letters (`AMQP_DEAD_QUEUE`).
    pub dead_queue: String,
    /// Deliveries after which the broker itself dead-letters a message (`AMQP_DELIVERY_LIMIT`).
    pub delivery_limit: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            exchange: "clerk.events".into(),
            queue: "clerk.events.worker".into(),
            dead_queue: "clerk.events.dead".into(),
            delivery_limit: 20,
        }
    }
}

impl Topology {
    /// The default names behind a prefix: `{prefix}.clerk.events`, and so on.
    pub fn prefixed(prefix: &str) -> Self {
        let default = Self::default();
        Self {
            exchange: format!("{prefix}.{}", default.exchange),
            queue: format!("{prefix}.{}", default.queue),
            dead_queue: format!("{prefix}.{}", default.dead_queue),
            ..default
        }
    }

    /// Declares the exchange, both queues and the binding. Safe to call any number of times, from
    /// any binary; it fails (and the broker closes the channel) only when a queue of the same name
    /// exists with other arguments.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    // Survives a broker restart; the messages in the queues are persistent too.
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead_queue.as_str().into(),
                durable(),
                Self::dead_queue_arguments(),
            )
            .await?;
        channel
            .queue_declare(
                self.queue.as_str().into(),
                durable(),
                self.worker_queue_arguments(),
            )
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                // Every event type is kept; the worker acknowledges the ones it does not handle.
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// An explicit delivery limit and a dead-letter target, so the broker's own redelivery limit
    /// can only ever dead-letter a message, never drop it (RabbitMQ 4 defaults to 20 deliveries
    /// and drops beyond that when no dead-letter exchange is set). Valid on RabbitMQ 3.10 and 4.x.
    fn worker_queue_arguments(&self) -> FieldTable {
        let mut arguments = quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        // The default exchange routes by queue name, so no extra exchange is needed.
        arguments.insert("x-dead-letter-exchange".into(), long_string(""));
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            long_string(&self.dead_queue),
        );
        // At-least-once dead-lettering: the broker keeps the message until the dead queue has
        // confirmed it. It requires the reject-publish overflow mode.
        arguments.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        arguments.insert("x-overflow".into(), long_string("reject-publish"));
        arguments
    }
}

impl Topology {
    /// The dead-letter queue has no dead-letter target of its own, so its delivery limit must
    /// never be reached: `worker dlq` takes and returns letters, and on RabbitMQ 4 each return
    /// counts as a delivery, with a default limit of 20 that would drop the letter. An explicit,
    /// practically unreachable limit keeps them (3.x has no default limit; `-1` there would
    /// drop a letter at its first return).
    fn dead_queue_arguments() -> FieldTable {
        let mut arguments = quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_QUEUE_DELIVERY_LIMIT),
        );
        arguments
    }
}

/// See [`Topology::dead_queue_arguments`].
pub const DEAD_QUEUE_DELIVERY_LIMIT: i64 = 1_000_000_000;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        // Quorum queues are always durable, and may be neither exclusive nor auto-deleted.
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    arguments
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
