//! Test support: a fresh topology on the real RabbitMQ per test, dead letters built the way the
//! worker writes them, and clean-up that runs even when a test fails.

#![allow(dead_code)] // Each test file uses its own part of this module.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::{Settings, Topology, headers};

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long a condition may take to become true before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_string())
}

/// A dead letter to put in the queue, as the worker writes one.
#[derive(Debug, Clone)]
pub struct Letter {
    pub id: String,
    pub event_type: String,
    pub body: Vec<u8>,
    pub kind: Option<&'static str>,
    pub reason: String,
    pub attempts: u32,
}

impl Letter {
    /// A `permanent` dead letter of `event_type` with a JSON body.
    pub fn new(id: &str, event_type: &str) -> Self {
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

    pub fn exhausted(mut self, attempts: u32, reason: &str) -> Self {
        self.kind = Some(headers::KIND_EXHAUSTED);
        self.attempts = attempts;
        self.reason = reason.to_string();
        self
    }

    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// The headers the ingest sets on every event.
    pub fn event_headers(&self) -> FieldTable {
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
    pub fn event_properties(&self) -> BasicProperties {
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

pub fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// A topology of its own on the shared broker, deleted when the fixture is dropped.
pub struct Fixture {
    pub topology: Topology,
    connection: Connection,
    pub channel: Channel,
    /// Queues a test declared besides the topology, deleted with it.
    extra_queues: Vec<String>,
}

impl Fixture {
    pub async fn new() -> Self {
        Self::with_topology(Topology::prefixed(&format!(
            "dlq-test-{}",
            uuid::Uuid::new_v4()
        )))
        .await
    }

    pub async fn with_topology(topology: Topology) -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("the test broker is reachable");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        topology.declare(&channel).await.expect("declare topology");
        Self {
            topology,
            connection,
            channel,
            extra_queues: Vec::new(),
        }
    }

    /// Declares a classic queue that holds at most `length` messages and refuses (nacks) the
    /// publishes beyond, returning its name.
    pub async fn declare_full_after(&mut self, length: i64) -> String {
        let name = format!("{}.limited", self.topology.queue);
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(length));
        arguments.insert("x-overflow".into(), long("reject-publish"));
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .expect("declare the limited queue");
        self.extra_queues.push(name.clone());
        name
    }

    /// Settings pointing the commands at this fixture's topology.
    pub fn settings(&self) -> Settings {
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
    pub async fn dead_letters(&self, letters: &[Letter]) {
        for letter in letters {
            let properties = letter.dead_letter_properties();
            self.publish("", &self.topology.dead_queue, &letter.body, properties)
                .await;
        }
        self.wait_for_ready(&self.topology.dead_queue, letters.len() as u32)
            .await;
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirmation = self
            .channel
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
            .expect("confirm");
        assert_eq!(
            confirmation,
            lapin::Confirmation::Ack(None),
            "routed and confirmed"
        );
    }

    /// Ready messages in `queue` now.
    pub async fn ready(&self, queue: &str) -> u32 {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let channel = self.connection.create_channel().await.expect("channel");
        let declared = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .expect("the queue exists");
        let _ = channel.close(200, "done".into()).await;
        declared.message_count()
    }

    /// Waits until `queue` holds exactly `expected` ready messages (the broker settles returns
    /// asynchronously), failing after the deadline with the last count seen.
    pub async fn wait_for_ready(&self, queue: &str, expected: u32) {
        let start = Instant::now();
        loop {
            let ready = self.ready(queue).await;
            if ready == expected {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{queue} holds {ready} ready messages, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Takes (and acknowledges) every message of `queue`, in order.
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

    /// The ids of the messages in `queue`, sorted, leaving them in the queue (they come back
    /// when the peeking channel closes).
    pub async fn ids_in(&self, queue: &str) -> Vec<String> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut ids = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        {
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            ids.push(id);
        }
        let _ = channel.close(200, "done".into()).await;
        ids.sort();
        ids
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Async clean-up cannot run in `drop`, and the test's runtime may be unwinding, so a
        // thread of its own deletes the queues and the exchange over a fresh connection.
        let topology = self.topology.clone();
        let extra_queues = self.extra_queues.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("clean-up runtime");
            runtime.block_on(async move {
                let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
                    .await
                    .expect("clean-up connection");
                let channel = connection.create_channel().await.expect("channel");
                for queue in [&topology.queue, &topology.dead_queue]
                    .into_iter()
                    .chain(&extra_queues)
                {
                    channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .expect("delete queue");
                }
                channel
                    .exchange_delete(
                        topology.exchange.as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await
                    .expect("delete exchange");
                let _ = connection.close(200, "clean-up done".into()).await;
            });
        });
        if cleanup.join().is_err() && !std::thread::panicking() {
            panic!("cleaning up {:?} failed", self.topology);
        }
    }
}

/// Runs a `worker dlq …` command line (the words after `dlq`) against `settings`, returning its
/// result, its stdout and its stderr.
pub async fn run(
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
