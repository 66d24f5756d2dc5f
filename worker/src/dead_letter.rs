//! Dead-lettering: a copy of the message goes to the dead queue, confirmed by the broker, before
//! the original is acknowledged. A crash in between leaves both (the worker is idempotent, and
//! the dead letter can be replayed); nothing is ever lost.

use chrono::{SecondsFormat, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use shared::headers;

/// Why a dead letter was not confirmed. Always retryable: the original stays unacknowledged.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the dead letter (nack)")]
    Nacked,
    #[error("the dead queue does not exist (message returned as unroutable)")]
    Unroutable,
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

/// Publishes dead letters on a channel of their own, in confirm mode.
#[derive(Clone)]
pub struct DeadLetters {
    channel: Channel,
    queue: String,
}

impl DeadLetters {
    /// Opens the publishing channel on `connection`.
    pub async fn open(connection: &Connection, queue: &str) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
        })
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
        let confirm = self
            .channel
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
            .await?;
        if !confirm.is_ack() {
            return Err(DeadLetterError::Nacked);
        }
        if confirm.take_message().is_some() {
            return Err(DeadLetterError::Unroutable);
        }
        Ok(())
    }
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}
