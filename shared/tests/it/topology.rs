//! The topology against the real RabbitMQ (`AMQP_URL`, default the local broker): declaring it
//! twice is harmless, every event type reaches the worker queue, and the worker queue hands a
//! message that reached its delivery limit to the dead-letter queue instead of dropping it.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::{BasicProperties, Channel};
use test_support::{BrokerChannel, TestTopology};

async fn publish(broker: &BrokerChannel, exchange: &str, event_type: &str) {
    let confirmation = broker
        .publish(
            exchange,
            event_type,
            event_type.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    assert!(
        confirmation.is_ack() && confirmation.take_message().is_none(),
        "{event_type} routed"
    );
}

/// Polls `queue` with basic.get until a message arrives or `wait` passes.
async fn get(
    channel: &Channel,
    queue: &str,
    wait: Duration,
) -> Option<lapin::message::BasicGetMessage> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get");
        if message.is_some() {
            return message;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn declaring_twice_routes_every_type_and_dead_letters_at_the_delivery_limit() {
    let broker = BrokerChannel::open().await;
    let channel = &broker.channel;
    let mut topology = TestTopology::names();
    topology.topology.delivery_limit = 2;
    topology.declare(channel).await.expect("first declaration");
    topology
        .declare(channel)
        .await
        .expect("second declaration is idempotent");

    publish(&broker, &topology.exchange, "user.created").await;
    // Returned again and again, the message passes the delivery limit of 2 and must land in the
    // dead-letter queue rather than vanish.
    let mut returns = 0;
    while let Some(message) = get(channel, &topology.queue, Duration::from_secs(2)).await {
        assert_eq!(message.data, b"user.created");
        message
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
        returns += 1;
        assert!(returns <= 10, "the delivery limit never took effect");
    }
    let dead = get(channel, &topology.dead_queue, Duration::from_secs(10))
        .await
        .expect("dead-lettered, not dropped");
    assert_eq!(dead.data, b"user.created");

    publish(&broker, &topology.exchange, "organization.created").await;
    let other = get(channel, &topology.queue, Duration::from_secs(10))
        .await
        .expect("a type the worker ignores is kept too");
    assert_eq!(other.data, b"organization.created");
}

/// Queues declared before `x-quorum-initial-group-size` was set (an upgrade), or with another
/// size (the setting changed), are accepted by `declare_on`: the broker uses the size only when it
/// creates a queue. A single node takes a size of 3 (capped by the cluster's size).
#[tokio::test]
async fn declare_on_accepts_queues_created_with_another_or_no_group_size() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    let broker = BrokerChannel::open().await;
    let (connection, channel) = (&broker.connection, &broker.channel);
    // Deleted on drop, whatever the test's end.
    let names = TestTopology::names();
    let topology = names.topology.clone();
    let mut older = FieldTable::default();
    older.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    older.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(shared::topology::DEAD_QUEUE_DELIVERY_LIMIT),
    );
    channel
        .queue_declare(
            topology.dead_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            older,
        )
        .await
        .expect("the dead queue as an earlier release declared it");
    let upgraded = topology.declare_on(connection).await;
    let resized = shared::Topology {
        quorum_initial_group_size: 5,
        ..topology.clone()
    }
    .declare_on(connection)
    .await;
    let again = topology.declare_on(connection).await;
    upgraded.expect("a queue created without a group size is accepted");
    resized.expect("a queue created with another group size is accepted");
    again.expect("declaring again is idempotent");
    assert!(
        channel.status().connected(),
        "declare_on never closes a channel of the caller"
    );
}
