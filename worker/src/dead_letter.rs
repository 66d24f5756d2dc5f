//! Dead-lettering: a copy of the message goes to the dead queue, confirmed by the broker, before
//! the original is acknowledged. A crash in between leaves both (the worker is idempotent, and
//! the dead letter can be replayed); nothing is ever lost.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use shared::headers;
use tokio::sync::Mutex;

/// Why a dead letter was not confirmed. Always retryable: the original stays unacknowledged.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the dead letter (nack)")]
    Nacked,
    #[error("the dead queue does not exist (message returned as unroutable)")]
    Unroutable,
    #[error("the broker did not answer within {0:?} (blocked or unresponsive)")]
    Timeout(Duration),
}

/// Why a message is dead-lettered: the `error-kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    Permanent,
    Exhausted,
}

impl DeadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::Permanent => headers::KIND_PERMANENT,
            DeadKind::Exhausted => headers::KIND_EXHAUSTED,
        }
    }
}

/// Publishes dead letters on a channel of their own, in confirm mode. A closed channel is
/// replaced by a fresh one at the next publish; every wait on the broker has a deadline.
pub struct DeadLetters {
    connection: Arc<Connection>,
    channel: Mutex<Channel>,
    queue: String,
    timeout: Duration,
}

impl DeadLetters {
    /// Opens the publishing channel on `connection`. `timeout` bounds each wait on the broker
    /// (`WORKER_BROKER_TIMEOUT_MS`).
    pub async fn open(
        connection: Arc<Connection>,
        queue: &str,
        timeout: Duration,
    ) -> Result<Self, DeadLetterError> {
        let channel = open_channel(&connection, timeout).await?;
        Ok(Self {
            connection,
            channel: Mutex::new(channel),
            queue: queue.to_owned(),
            timeout,
        })
    }

    /// The channel dead letters go out on, reopened first if it was closed.
    pub async fn channel(&self) -> Result<Channel, DeadLetterError> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            tracing::info!("the dead-letter channel was closed; opening a new one");
            *channel = open_channel(&self.connection, self.timeout).await?;
        }
        Ok(channel.clone())
    }

    /// Publishes `body` with the original properties and headers plus `error`, `error-kind`,
    /// `attempts` and `failed-at`, and waits for the broker's confirm.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: &lapin::BasicProperties,
        kind: DeadKind,
        reason: &str,
        attempts: u32,
    ) -> Result<(), DeadLetterError> {
        let mut table = FieldTable::default();
        if let Some(original) = properties.headers() {
            for (name, value) in original.inner() {
                // Set by the broker on redelivery, not by the publisher; a replay starts afresh.
                if name.as_str() != headers::X_DELIVERY_COUNT {
                    table.insert(name.clone(), value.clone());
                }
            }
        }
        let one_line: String = reason.split_whitespace().collect::<Vec<_>>().join(" ");
        table.insert(headers::ERROR.into(), long(&one_line));
        table.insert(headers::ERROR_KIND.into(), long(kind.as_str()));
        table.insert(headers::ATTEMPTS.into(), AMQPValue::LongUInt(attempts));
        table.insert(
            headers::FAILED_AT.into(),
            long(&Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        let properties = properties
            .clone()
            .with_headers(table)
            // Persistent, whatever the original said: a dead letter must survive a restart.
            .with_delivery_mode(2);
        let channel = self.channel().await?;
        let publish = async {
            channel
                .basic_publish(
                    // The default exchange routes by queue name straight to the dead queue.
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions {
                        // A missing dead queue must be an error, not a silent drop.
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let confirm = tokio::time::timeout(self.timeout, publish)
            .await
            .map_err(|_| DeadLetterError::Timeout(self.timeout))??;
        if !confirm.is_ack() {
            return Err(DeadLetterError::Nacked);
        }
        if confirm.take_message().is_some() {
            return Err(DeadLetterError::Unroutable);
        }
        Ok(())
    }
}

async fn open_channel(
    connection: &Connection,
    timeout: Duration,
) -> Result<Channel, DeadLetterError> {
    let open = async {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>(channel)
    };
    Ok(tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| DeadLetterError::Timeout(timeout))??)
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}
