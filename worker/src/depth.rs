//! Queue depths for `/metrics`: the ready messages of the worker queue and the dead-letter queue,
//! asked of the broker by passive declares (which create nothing) every few seconds.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use shared::Topology;

use crate::metrics::Metrics;

/// How often the depths are asked for: cheap for the broker, fresh enough for an alert.
const EVERY: Duration = Duration::from_secs(5);

/// Polls until aborted (when the connection's consuming ends). A failed passive declare closes
/// its channel (the queue was deleted, say), so the channel is reopened at the next round.
pub(crate) async fn poll(
    connection: Arc<Connection>,
    topology: Topology,
    timeout: Duration,
    metrics: Metrics,
) {
    let mut channel: Option<Channel> = None;
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let usable = channel
            .as_ref()
            .filter(|channel| channel.status().connected())
            .cloned();
        let current = match usable {
            Some(current) => current,
            None => match tokio::time::timeout(timeout, connection.create_channel()).await {
                Ok(Ok(fresh)) => {
                    channel = Some(fresh.clone());
                    fresh
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "cannot open a channel for the queue depths");
                    continue;
                }
                Err(_) => continue,
            },
        };
        for (label, queue) in [("worker", &topology.queue), ("dead", &topology.dead_queue)] {
            let declare = current.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            );
            match tokio::time::timeout(timeout, declare).await {
                Ok(Ok(state)) => metrics
                    .queue_depth
                    .with_label_values(&[label])
                    .set(i64::from(state.message_count())),
                Ok(Err(error)) => {
                    tracing::debug!(%error, %queue, "cannot read the queue depth");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}
