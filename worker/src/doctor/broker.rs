//! The broker's checks: reachable, the topology declared, consumers on the worker queue, the
//! messages waiting and the dead letters.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use super::{Check, TIMEOUT, Verdict};

/// The `broker`, `topology`, `consumers`, `queue` and `dead letters` checks.
pub(super) async fn check(settings: &shared::Settings, checks: &mut Vec<Check>) {
    const LATER: [&str; 4] = ["topology", "consumers", "queue", "dead letters"];
    let skip_rest = |checks: &mut Vec<Check>, why: &str| {
        for name in LATER {
            checks.push(Check::new(name, Verdict::Skip, why));
        }
    };
    let (nodes, topology) = match (settings.amqp_nodes(), settings.topology()) {
        (Ok(nodes), Ok(topology)) => (nodes, topology),
        (Err(error), _) | (_, Err(error)) => {
            checks.push(
                Check::new("broker", Verdict::Fail, error.to_string())
                    .fix("set AMQP_URL, e.g. amqp://user:password@host:5672/%2f"),
            );
            skip_rest(checks, "the broker settings are malformed");
            return;
        }
    };
    let connection = match nodes
        .connect(ConnectionProperties::default(), TIMEOUT)
        .await
    {
        Ok((connection, node)) => {
            checks.push(Check::ok("broker", format!("reachable at {node}")));
            connection
        }
        Err(error) => {
            checks.push(
                Check::new("broker", Verdict::Fail, format!("cannot connect: {error}"))
                    .fix("start RabbitMQ, or correct AMQP_URL (user, password, host, vhost)"),
            );
            skip_rest(checks, "the broker is unreachable");
            return;
        }
    };

    let exchange = exchange_exists(&connection, &topology.exchange).await;
    let queue = queue_counts(&connection, &topology.queue).await;
    let dead = queue_counts(&connection, &topology.dead_queue).await;
    let mut missing = Vec::new();
    if !exchange {
        missing.push(format!("exchange {}", topology.exchange));
    }
    if queue.is_none() {
        missing.push(format!("queue {}", topology.queue));
    }
    if dead.is_none() {
        missing.push(format!("queue {}", topology.dead_queue));
    }
    checks.push(if missing.is_empty() {
        Check::ok(
            "topology",
            format!(
                "exchange {}, queues {} and {} exist",
                topology.exchange, topology.queue, topology.dead_queue
            ),
        )
    } else {
        Check::new(
            "topology",
            Verdict::Fail,
            format!("missing: {}", missing.join(", ")),
        )
        .fix(
            "start the ingest or the worker once: either declares the topology (and check that \
             AMQP_EXCHANGE, AMQP_QUEUE and AMQP_DEAD_QUEUE are the same for all of them)",
        )
    });

    checks.push(match queue {
        None => Check::new("consumers", Verdict::Skip, "the worker queue is missing"),
        Some((_, 0)) => Check::new(
            "consumers",
            Verdict::Fail,
            format!("nothing consumes {}: events wait there", topology.queue),
        )
        .fix("start the worker (`worker run`; in the compose stack `docker compose up -d worker`)"),
        Some((_, consumers)) => {
            Check::ok("consumers", format!("{consumers} on {}", topology.queue))
        }
    });
    checks.push(match queue {
        None => Check::new("queue", Verdict::Skip, "the worker queue is missing"),
        Some((ready, 0)) if ready > 0 => Check::new(
            "queue",
            Verdict::Warn,
            format!(
                "{ready} messages waiting in {} and no consumer",
                topology.queue
            ),
        )
        .fix("start the worker: it applies them in order"),
        Some((ready, _)) => Check::ok(
            "queue",
            format!("{ready} messages waiting in {}", topology.queue),
        ),
    });
    checks.push(match dead {
        None => Check::new(
            "dead letters",
            Verdict::Skip,
            "the dead-letter queue is missing",
        ),
        Some((0, _)) => Check::ok("dead letters", format!("none in {}", topology.dead_queue)),
        Some((parked, _)) => Check::new(
            "dead letters",
            Verdict::Warn,
            format!("{parked} in {}", topology.dead_queue),
        )
        .fix("see why with `worker dlq list`; once fixed, `worker dlq replay --all`"),
    });
    let _ = connection.close(200, "doctor done".into()).await;
}

/// Whether the exchange exists, by a passive declare on a channel of its own (a refused one
/// closes its channel).
async fn exchange_exists(connection: &Connection, exchange: &str) -> bool {
    let Ok(channel) = connection.create_channel().await else {
        return false;
    };
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let declared = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "checked".into()).await;
    declared.is_ok()
}

/// The ready messages and consumers of `queue`, or `None` when it does not exist.
async fn queue_counts(connection: &Connection, queue: &str) -> Option<(u32, u32)> {
    let channel = connection.create_channel().await.ok()?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    let _ = channel.close(200, "checked".into()).await;
    let queue = declared.ok()?;
    Some((queue.message_count(), queue.consumer_count()))
}
