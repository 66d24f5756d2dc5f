//! Fresh exchange and queue names on the shared broker, deleted on drop, and a channel of the
//! test's own to publish and to look at queues.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use shared::Topology;

use crate::services::amqp_url;

/// Names of the test's own: an exchange, a worker queue, a dead-letter queue and any queue the
/// test adds. Dropped, it deletes them, even when the test failed.
pub struct TestTopology {
    /// The names; declared or not, as the constructor says.
    pub topology: Topology,
    extra_queues: Vec<String>,
}

impl TestTopology {
    /// Fresh names, not declared: the service under test declares them.
    pub fn names() -> Self {
        Self {
            topology: Topology::prefixed(&format!("test-{}", uuid::Uuid::new_v4().simple())),
            extra_queues: Vec::new(),
        }
    }

    /// Fresh names, declared as the services declare them.
    pub async fn declared() -> Self {
        Self::declared_as(|_| {}).await
    }

    /// Fresh names, adjusted (a lower delivery limit, say), then declared.
    pub async fn declared_as(adjust: impl FnOnce(&mut Topology)) -> Self {
        let mut topology = Self::names();
        adjust(&mut topology.topology);
        let channel = BrokerChannel::open().await;
        topology
            .topology
            .declare(&channel.channel)
            .await
            .expect("declare the topology");
        channel.close().await;
        topology
    }

    /// Deletes `queue` with the topology.
    pub fn also_delete(&mut self, queue: &str) {
        self.extra_queues.push(queue.to_owned());
    }
}

impl std::ops::Deref for TestTopology {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.topology
    }
}

impl Drop for TestTopology {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let queues: Vec<String> = [topology.queue.clone(), topology.dead_queue.clone()]
            .into_iter()
            .chain(self.extra_queues.iter().cloned())
            .collect();
        let cleaned = crate::block_on_own_runtime(async move {
            let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
                .await
                .expect("clean-up connection");
            for queue in &queues {
                // Each on a fresh channel: a failure closes the channel it happened on, and a
                // queue the test deleted itself is not an error.
                let channel = connection.create_channel().await.expect("channel");
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let channel = connection.create_channel().await.expect("channel");
            let _ = channel
                .exchange_delete(
                    topology.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
            let _ = connection.close(200, "clean-up done".into()).await;
        });
        if cleaned.is_err() && !std::thread::panicking() {
            panic!("cleaning up {:?} failed", self.topology);
        }
    }
}

/// A connection and a channel in confirm mode of the test's own, on the shared broker.
pub struct BrokerChannel {
    /// The channel, for what the helpers below do not cover.
    pub channel: Channel,
    /// The connection, for what needs one rather than a channel (`Topology::declare_on`).
    pub connection: Connection,
}

impl BrokerChannel {
    /// Connects to [`amqp_url`].
    pub async fn open() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("the test broker is reachable at AMQP_URL");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Self {
            channel,
            connection,
        }
    }

    /// Publishes with `mandatory` and waits for the broker's answer, which it returns: an
    /// unroutable message is `Ack(Some(returned))`.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Confirmation {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm")
    }

    /// Ready messages in `queue` now (unacknowledged ones are not counted), by a passive
    /// declare on a channel of its own: a missing queue fails the test and not this channel.
    pub async fn ready(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let (ready, _) = queue_counts(&channel, queue)
            .await
            .unwrap_or_else(|error| panic!("queue {queue} exists: {error}"));
        let _ = channel.close(200, "done".into()).await;
        ready
    }

    /// Waits until `queue` holds exactly `expected` ready messages (the broker settles returns
    /// asynchronously), failing after 10 s with the last count seen.
    pub async fn wait_for_ready(&self, queue: &str, expected: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self.ready(queue).await;
            if ready == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} holds {ready} ready messages, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Takes (and acknowledges) every message now in `queue`, in order.
    pub async fn drain(&self, queue: &str) -> Vec<Delivery> {
        let mut taken = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            taken.push(message.delivery);
        }
        taken
    }

    /// Takes (and acknowledges) the next message of `queue`, waiting up to 10 s for one.
    pub async fn next(&self, queue: &str) -> Delivery {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(message) = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                return message.delivery;
            }
            assert!(Instant::now() < deadline, "no message arrived on {queue}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The message ids in `queue`, sorted, leaving the messages there (they come back when the
    /// peeking channel closes).
    pub async fn ids_in(&self, queue: &str) -> Vec<String> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut ids = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        {
            ids.push(message_id(&message.delivery));
        }
        let _ = channel.close(200, "done".into()).await;
        ids.sort();
        ids
    }

    /// A new channel on this connection.
    pub async fn new_channel(&self) -> Channel {
        self.connection.create_channel().await.expect("channel")
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// A delivery's `message_id`, or "" without one.
pub fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default()
}

/// Ready messages and consumers of `queue`, by a passive declare (which fails, and closes
/// `channel`, when the queue does not exist).
pub async fn queue_counts(channel: &Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((declared.message_count(), declared.consumer_count()))
}
