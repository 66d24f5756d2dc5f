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
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

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
    /// Replicas of each quorum queue when the broker first creates it
    /// (`AMQP_QUORUM_INITIAL_GROUP_SIZE`). RabbitMQ caps it at the number of cluster nodes.
    pub quorum_initial_group_size: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            exchange: "clerk.events".into(),
            queue: "clerk.events.worker".into(),
            dead_queue: "clerk.events.dead".into(),
            delivery_limit: 20,
            quorum_initial_group_size: 3,
        }
    }
}

impl Topology {
    /// The broker environment of a child process (the ingest, the worker, a command) that is to
    /// use `amqp_url` and these names: `AMQP_URL`, `AMQP_EXCHANGE`, `AMQP_QUEUE` and
    /// `AMQP_DEAD_QUEUE`, for `Command::envs`.
    pub fn child_env(&self, amqp_url: &str) -> [(&'static str, String); 4] {
        [
            ("AMQP_URL", amqp_url.to_owned()),
            ("AMQP_EXCHANGE", self.exchange.clone()),
            ("AMQP_QUEUE", self.queue.clone()),
            ("AMQP_DEAD_QUEUE", self.dead_queue.clone()),
        ]
    }

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

    /// Declares the exchange, both queues and the binding on `channel`. Safe to call any number
    /// of times with the same settings; it fails (and the broker closes the channel) when a queue
    /// of the same name exists with other arguments. The binaries use [`Topology::declare_on`],
    /// which also accepts queues created with another quorum group size.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_exchange(channel).await?;
        for (queue, arguments) in self.queues() {
            channel
                .queue_declare(queue.into(), durable(), arguments)
                .await?;
        }
        self.bind(channel).await
    }

    /// Declares the topology over channels of its own on `connection`, so a refused declaration
    /// never closes a channel the caller uses.
    ///
    /// The quorum group size matters only when the broker creates a queue, yet RabbitMQ 3.x
    /// refuses a redeclaration whose `x-quorum-initial-group-size` differs from the one the queue
    /// was created with. So a queue created without it (by an earlier release) is checked
    /// without it, and one created with another size (the setting changed) is only checked to
    /// exist: it keeps its replicas (`rabbitmq-queues grow` and `shrink` change them).
    pub async fn declare_on(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        self.declare_exchange(&channel).await?;
        close(&channel).await;
        for (queue, arguments) in self.queues() {
            let mut without_size = FieldTable::default();
            for (key, value) in arguments.inner() {
                if key.as_str() != GROUP_SIZE {
                    without_size.insert(key.clone(), value.clone());
                }
            }
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let attempts = [
                (durable(), arguments),
                (durable(), without_size),
                (passive, FieldTable::default()),
            ];
            for (options, arguments) in attempts {
                let channel = connection.create_channel().await?;
                match channel
                    .queue_declare(queue.into(), options, arguments)
                    .await
                {
                    Ok(_) => {
                        close(&channel).await;
                        break;
                    }
                    Err(error) if group_size_differs(&error) => {
                        tracing::debug!(%queue, %error, "queue created with another group size");
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        let channel = connection.create_channel().await?;
        self.bind(&channel).await?;
        close(&channel).await;
        Ok(())
    }

    async fn declare_exchange(&self, channel: &Channel) -> lapin::Result<()> {
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
            .await
    }

    /// Both queues with their arguments, the dead-letter queue first: the worker queue names it
    /// as its dead-letter target.
    fn queues(&self) -> [(&str, FieldTable); 2] {
        [
            (self.dead_queue.as_str(), self.dead_queue_arguments()),
            (self.queue.as_str(), self.worker_queue_arguments()),
        ]
    }

    async fn bind(&self, channel: &Channel) -> lapin::Result<()> {
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
        let mut arguments = self.quorum_arguments();
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
    /// A quorum queue replicated over `quorum_initial_group_size` nodes. The broker uses the
    /// size only when it creates the queue (later membership changes are `rabbitmq-queues
    /// grow/shrink`), and caps it at the nodes it has: three on a single node is one replica.
    fn quorum_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), long_string("quorum"));
        arguments.insert(
            GROUP_SIZE.into(),
            AMQPValue::LongLongInt(i64::from(self.quorum_initial_group_size)),
        );
        arguments
    }

    /// The dead-letter queue has no dead-letter target of its own, so its delivery limit must
    /// never be reached: `worker dlq` takes and returns letters, and on RabbitMQ 4 each return
    /// counts as a delivery, with a default limit of 20 that would drop the letter. An explicit,
    /// practically unreachable limit keeps them (3.x has no default limit; `-1` there would
    /// drop a letter at its first return).
    fn dead_queue_arguments(&self) -> FieldTable {
        let mut arguments = self.quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_QUEUE_DELIVERY_LIMIT),
        );
        arguments
    }
}

/// See [`Topology::dead_queue_arguments`].
pub const DEAD_QUEUE_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// The queue argument that sets a quorum queue's replicas at creation.
const GROUP_SIZE: &str = "x-quorum-initial-group-size";

/// Whether the broker refused a declaration because the queue exists with another quorum group
/// size (`PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' …`).
fn group_size_differs(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            amqp.get_id() == 406 && amqp.get_message().as_str().contains(GROUP_SIZE)
        }
        _ => false,
    }
}

async fn close(channel: &Channel) {
    // Only a declaring channel: if closing fails, the connection's end closes it anyway.
    let _ = channel.close(200, "declared".into()).await;
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        // Quorum queues are always durable, and may be neither exclusive nor auto-deleted.
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
