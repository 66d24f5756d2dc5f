//! What only the dlq tests need: dead letters built the way the worker writes them, put in a
//! fresh topology (from `test-support`), and the commands run in-process.

#![allow(dead_code)] // Each test file uses its own part of this module.

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use shared::{Settings, headers};
use test_support::amqp_url;
use test_support::events::long;
use test_support::{BrokerChannel, TestTopology};

/// A dead letter to put in the queue, as the worker writes one.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    pub id: String,
    pub event_type: String,
    pub body: Vec<u8>,
    pub kind: Option<&'static str>,
    pub reason: String,
    pub attempts: u32,
}

impl Letter {
    /// A `permanent` dead letter of `event_type` with a JSON body.
    pub(crate) fn new(id: &str, event_type: &str) -> Self {
        Self {
            id: id.to_string(),
            event_type: event_type.to_string(),
            body: format!(
                r#"{{"type":"{event_type}","data":{{"id":"user_{id}"}},"object":"event"}}"#
            )
            .into_bytes(),
            kind: Some(headers::KIND_PERMANENT),
            reason: "missing data.id".to_string(),
            attempts: 1,
        }
    }

    pub(crate) fn exhausted(mut self, attempts: u32, reason: &str) -> Self {
        self.kind = Some(headers::KIND_EXHAUSTED);
        self.attempts = attempts;
        self.reason = reason.to_string();
        self
    }

    pub(crate) fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// The headers the ingest sets on every event.
    pub(crate) fn event_headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(headers::SVIX_ID.into(), long(&self.id));
        table.insert(headers::SVIX_TIMESTAMP.into(), long("1764212400"));
        table.insert(
            headers::SVIX_SIGNATURE.into(),
            long(&format!("v1,signature-of-{}", self.id)),
        );
        table.insert(headers::RECEIVED_AT.into(), long("2026-11-27T03:00:00Z"));
        table
    }

    /// The event's properties as the ingest publishes them.
    pub(crate) fn event_properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(self.id.as_str().into())
            .with_type(self.event_type.as_str().into())
            .with_timestamp(1_764_212_400)
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(self.event_headers())
    }

    /// The dead letter's properties: the event's, plus the worker's four headers and a
    /// broker-style `x-delivery-count`.
    fn dead_letter_properties(&self) -> BasicProperties {
        let mut table = self.event_headers();
        if let Some(kind) = self.kind {
            table.insert(headers::ERROR.into(), long(&self.reason));
            table.insert(headers::ERROR_KIND.into(), long(kind));
            table.insert(
                headers::ATTEMPTS.into(),
                AMQPValue::LongLongInt(i64::from(self.attempts)),
            );
            table.insert(headers::FAILED_AT.into(), long("2026-11-27T03:05:00Z"));
        }
        table.insert(headers::X_DELIVERY_COUNT.into(), AMQPValue::LongLongInt(4));
        self.event_properties().with_headers(table)
    }
}

/// A declared topology of its own on the shared broker, deleted when the fixture is dropped, and
/// a confirming channel (whose helpers it derefs to).
pub(crate) struct Fixture {
    pub broker: BrokerChannel,
    pub topology: TestTopology,
}

impl Fixture {
    pub(crate) async fn new() -> Self {
        Self {
            broker: BrokerChannel::open().await,
            topology: TestTopology::declared().await,
        }
    }

    /// A fixture whose worker queue dead-letters a message after `limit` failed deliveries.
    pub(crate) async fn with_delivery_limit(limit: u32) -> Self {
        Self {
            broker: BrokerChannel::open().await,
            topology: TestTopology::declared_as(|topology| topology.delivery_limit = limit).await,
        }
    }

    /// Declares a classic queue that holds at most `length` messages and refuses (nacks) the
    /// publishes beyond, returning its name.
    pub(crate) async fn declare_full_after(&mut self, length: i64) -> String {
        let name = format!("{}.limited", self.topology.queue);
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(length));
        arguments.insert("x-overflow".into(), long("reject-publish"));
        self.broker
            .channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .expect("declare the limited queue");
        self.topology.also_delete(&name);
        name
    }

    /// Settings pointing the commands at this fixture's topology.
    pub(crate) fn settings(&self) -> Settings {
        Settings {
            amqp_url: Some(amqp_url().into()),
            amqp_exchange: self.topology.exchange.clone(),
            amqp_queue: self.topology.queue.clone(),
            amqp_dead_queue: self.topology.dead_queue.clone(),
            amqp_delivery_limit: self.topology.delivery_limit,
            ..Settings::default()
        }
    }

    /// Puts `letters` in the dead-letter queue, each confirmed by the broker.
    pub(crate) async fn dead_letters(&self, letters: &[Letter]) {
        for letter in letters {
            let properties = letter.dead_letter_properties();
            self.publish("", &self.topology.dead_queue, &letter.body, properties)
                .await;
        }
        self.wait_for_ready(&self.topology.dead_queue, letters.len() as u32)
            .await;
    }

    /// Publishes and checks the broker routed and confirmed it.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirmation = self
            .broker
            .publish(exchange, routing_key, body, properties)
            .await;
        assert_eq!(
            confirmation,
            lapin::Confirmation::Ack(None),
            "routed and confirmed"
        );
    }
}

impl std::ops::Deref for Fixture {
    type Target = BrokerChannel;

    fn deref(&self) -> &BrokerChannel {
        &self.broker
    }
}

/// Runs a `worker dlq …` command line (the words after `dlq`) against `settings`, returning its
/// result, its stdout and its stderr.
pub(crate) async fn run(
    settings: &Settings,
    words: &[&str],
) -> (Result<(), dlq::DlqError>, String, String) {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    }

    let cli = Cli::try_parse_from(std::iter::once("dlq").chain(words.iter().copied()))
        .expect("the command line parses");
    let mut out = Vec::new();
    let mut progress = Vec::new();
    let result = dlq::run(settings, cli.command, &mut out, &mut progress).await;
    (
        result,
        String::from_utf8(out).expect("utf-8 output"),
        String::from_utf8(progress).expect("utf-8 progress"),
    )
}
