//! The broker's addresses: `AMQP_URL` holds one URL, or several separated by commas (the nodes of
//! one RabbitMQ cluster). Every binary connects through [`AmqpNodes::connect`], which tries the
//! nodes in turn, starting after the node it used last: a replica that lost its node moves on to
//! the next one instead of waiting for the lost one to come back.
//!
//! The order is shuffled once at start ([`AmqpNodes::shuffle`]), so that replicas given the same
//! list spread over the nodes instead of all crowding the first.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use rand::seq::SliceRandom;
use secrecy::{ExposeSecret, SecretString};

/// One node: its URL (a secret: it holds the password) and its `host:port`, which is safe to
/// log, to show in `/readyz` and to put in a metric label.
#[derive(Debug, Clone)]
struct Node {
    url: SecretString,
    address: String,
}

/// The nodes of `AMQP_URL`, in the order they are tried, and the position to try next. Clones
/// share that position.
#[derive(Debug, Clone)]
pub struct AmqpNodes {
    nodes: Arc<[Node]>,
    next: Arc<AtomicUsize>,
}

/// No node answered. The message names each node by `host:port` with its failure, never a
/// password.
#[derive(Debug, thiserror::Error)]
#[error("no broker node answered: {}", self.describe())]
pub struct ConnectError {
    /// `(host:port, reason)`, one per node tried.
    pub failures: Vec<(String, String)>,
}

impl ConnectError {
    fn describe(&self) -> String {
        let each: Vec<String> = self
            .failures
            .iter()
            .map(|(node, reason)| format!("{node}: {reason}"))
            .collect();
        each.join("; ")
    }
}

impl AmqpNodes {
    /// Parses a comma-separated list of `amqp://` or `amqps://` URLs, keeping their order. The
    /// error never repeats a URL (it may hold a password): it says which entry, counting from 1.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut nodes = Vec::new();
        for (index, entry) in text.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                return Err(format!("entry {} is empty", index + 1));
            }
            let uri = entry.parse::<AMQPUri>().map_err(|reason| {
                // The parser's message never repeats the URL, so no password can leak here.
                format!(
                    "entry {} is not an amqp:// or amqps:// URL ({reason})",
                    index + 1
                )
            })?;
            nodes.push(Node {
                url: SecretString::from(entry),
                address: format!("{}:{}", uri.authority.host, uri.authority.port),
            });
        }
        Ok(Self {
            nodes: nodes.into(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The same nodes in an order drawn from `rng`.
    pub fn shuffle(self, rng: &mut impl Rng) -> Self {
        let mut nodes = self.nodes.to_vec();
        nodes.shuffle(rng);
        Self {
            nodes: nodes.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many nodes the list names.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never true for a parsed list; here for completeness.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The `host:port` of each node, in the order they are tried from the start.
    pub fn addresses(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .map(|node| node.address.as_str())
            .collect()
    }

    /// Connects to the first node that answers within `timeout`, trying each node once, starting
    /// after the one the previous successful call used. Returns the connection and the node's
    /// `host:port`.
    pub async fn connect(
        &self,
        properties: ConnectionProperties,
        timeout: Duration,
    ) -> Result<(Connection, String), ConnectError> {
        let start = self.next.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for offset in 0..self.nodes.len() {
            let index = (start + offset) % self.nodes.len();
            let node = &self.nodes[index];
            let attempt = Connection::connect(node.url.expose_secret(), properties.clone());
            let reason = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(connection)) => {
                    self.next.store(index + 1, Ordering::Relaxed);
                    return Ok((connection, node.address.clone()));
                }
                Ok(Err(error)) => error.to_string(),
                Err(_elapsed) => format!("no answer within {timeout:?}"),
            };
            tracing::debug!(node = %node.address, %reason, "broker node did not answer");
            failures.push((node.address.clone(), reason));
        }
        Err(ConnectError { failures })
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn one_url_is_one_node() {
        let nodes = AmqpNodes::parse("amqp://guest:guest@localhost:5672/%2f").expect("parse");
        assert_eq!(nodes.addresses(), ["localhost:5672"]);
    }

    #[test]
    fn several_urls_keep_their_order_and_tolerate_spaces() {
        let nodes = AmqpNodes::parse(
            "amqp://u:p@rabbit-0:5672/%2f, amqp://u:p@rabbit-1:5673/%2f ,amqps://u:p@rabbit-2/%2f",
        )
        .expect("parse");
        assert_eq!(
            nodes.addresses(),
            ["rabbit-0:5672", "rabbit-1:5673", "rabbit-2:5671"]
        );
    }

    #[test]
    fn a_bad_entry_is_named_by_position_without_its_password() {
        let error = AmqpNodes::parse("amqp://u:p@a:1/%2f,http://u:hunter2@b").expect_err("bad");
        assert!(error.starts_with("entry 2 is not an amqp"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        let error = AmqpNodes::parse("amqp://u:p@a:1/%2f,,amqp://u:p@c:1/%2f").expect_err("empty");
        assert_eq!(error, "entry 2 is empty");
    }

    #[test]
    fn shuffling_keeps_every_node_once() {
        let list: Vec<String> = (0..8)
            .map(|port| format!("amqp://u:p@host:{}/%2f", 5000 + port))
            .collect();
        let nodes = AmqpNodes::parse(&list.join(",")).expect("parse");
        let mut shuffled = nodes
            .clone()
            .shuffle(&mut StdRng::seed_from_u64(7))
            .addresses()
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        shuffled.sort();
        let mut original: Vec<String> = nodes.addresses().into_iter().map(str::to_owned).collect();
        original.sort();
        assert_eq!(shuffled, original);
    }

    #[test]
    fn shuffling_spreads_the_first_node() {
        let nodes =
            AmqpNodes::parse("amqp://a:1/%2f,amqp://b:1/%2f,amqp://c:1/%2f").expect("parse");
        let mut rng = StdRng::seed_from_u64(42);
        let mut first = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..300 {
            let address = nodes.clone().shuffle(&mut rng).addresses()[0].to_owned();
            *first.entry(address).or_default() += 1;
        }
        // Each of the three comes first about a third of the time.
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(first.values().all(|&count| count > 60), "{first:?}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let nodes = AmqpNodes::parse("amqp://guest:hunter2@a:1/%2f").expect("parse");
        let debug = format!("{nodes:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[tokio::test]
    async fn connect_names_each_dead_node_without_the_password() {
        let dead = [closed_port(), closed_port()];
        let nodes = AmqpNodes::parse(&format!(
            "amqp://u:hunter2@127.0.0.1:{}/%2f,amqp://u:hunter2@127.0.0.1:{}/%2f",
            dead[0], dead[1]
        ))
        .expect("parse");
        let error = nodes
            .connect(ConnectionProperties::default(), Duration::from_secs(5))
            .await
            .expect_err("nothing listens");
        let text = error.to_string();
        assert_eq!(error.failures.len(), 2, "{text}");
        assert!(text.contains(&format!("127.0.0.1:{}", dead[0])), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{}", dead[1])), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    /// A loopback port nothing listens on: bound, then released.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    }
}
