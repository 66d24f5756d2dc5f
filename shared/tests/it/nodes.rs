//! Connecting through `AmqpNodes` against the real RabbitMQ (`AMQP_URL`, default the local
//! broker): dead nodes are skipped, and each new connection starts after the node used last.

use std::time::Duration;

use lapin::ConnectionProperties;
use lapin::uri::AMQPUri;
use shared::AmqpNodes;

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A loopback port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// The live broker's URL with its host replaced by `host` and its port by `port`.
fn at(host: &str, port: u16) -> String {
    let uri: AMQPUri = amqp_url().parse().expect("AMQP_URL");
    format!(
        "amqp://{}:{}@{}:{}/{}",
        uri.authority.userinfo.username,
        uri.authority.userinfo.password,
        host,
        port,
        urlencode(&uri.vhost)
    )
}

fn urlencode(vhost: &str) -> String {
    vhost.replace('%', "%25").replace('/', "%2f")
}

fn live_port() -> u16 {
    let uri: AMQPUri = amqp_url().parse().expect("AMQP_URL");
    uri.authority.port
}

#[tokio::test]
async fn dead_nodes_are_skipped_and_the_next_connection_starts_after_the_last_node_used() {
    let port = live_port();
    // Two names for the one live broker, so the test can tell which entry answered.
    let list = [
        at("127.0.0.1", closed_port()),
        at("127.0.0.1", port),
        at("127.0.0.1", closed_port()),
        at("localhost", port),
    ]
    .join(",");
    let nodes = AmqpNodes::parse(&list).expect("parse");
    let mut used = Vec::new();
    for _ in 0..3 {
        let (connection, node) = nodes
            .connect(ConnectionProperties::default(), Duration::from_secs(5))
            .await
            .expect("one node answers");
        assert!(connection.status().connected());
        connection.close(200, "done".into()).await.expect("close");
        used.push(node);
    }
    assert_eq!(
        used,
        [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
        ]
    );
}
