//! Dead-lettering and shutting down when the broker does not cooperate: a closed dead-letter
//! channel is reopened, and with the broker blocked (a memory alarm on a node of this test's
//! own, never the shared one) a dead letter's publish gives up at its deadline and SIGTERM still
//! ends the worker within a bounded time, losing nothing.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_suite::rabbit::RabbitNode;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use test_support::events::{clerk_user, event_properties};
use test_support::http::get;
use test_support::signing::svix_id;
use test_support::{TestEnv, amqp_url, eventually};
use worker::dead_letter::{DeadKind, DeadLetterError, DeadLetters};

const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_dead_letter_channel_is_reopened_at_the_next_publish() {
    let env = TestEnv::new().await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("broker");
    let connection = Arc::new(connection);
    let dead = DeadLetters::open(
        connection.clone(),
        &env.topology.dead_queue,
        Duration::from_secs(10),
    )
    .await
    .expect("dead letters");
    let channel = dead.channel().await.expect("channel");
    channel
        .close(200, "closed by the test".into())
        .await
        .expect("close");
    assert!(!channel.status().connected());
    dead.publish(
        b"{}",
        &event_properties(&svix_id(), "user.created"),
        DeadKind::Exhausted,
        "reason",
        3,
    )
    .await
    .expect("published on a new channel");
    assert_eq!(env.ready(&env.topology.dead_queue).await, 1);
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_blocked_a_dead_letter_times_out_and_sigterm_still_ends_the_worker() {
    let env = TestEnv::new().await;
    let dir = tempfile::Builder::new()
        .prefix("worker-blocked-")
        .tempdir()
        .expect("temp dir");
    let debian = std::path::Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    let server = if debian.is_file() {
        debian.to_owned()
    } else {
        "rabbitmq-server".into()
    };
    let node = RabbitNode::start(&server, &dir.path().join("rabbitmq"))
        .await
        .expect("a RabbitMQ node of the test's own");

    // The events wait in the private node's queue before the alarm: one that can never apply
    // (its dead letter is what the blocked broker will not take) and good ones.
    let publisher = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("private node");
    let channel = publisher.create_channel().await.expect("channel");
    env.topology.declare(&channel).await.expect("topology");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut events = vec![(svix_id(), "user.created", b"{not json".to_vec())];
    for n in 0..5 {
        let body = json!({"type": "user.created", "data": clerk_user(&format!("user_{n}"), None, None, 100)});
        events.push((svix_id(), "user.created", body.to_string().into_bytes()));
    }
    for (id, event_type, body) in &events {
        let confirm = channel
            .basic_publish(
                env.topology.exchange.as_str().into(),
                (*event_type).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                event_properties(id, event_type),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    channel
        .queue_declare(
            "probe".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("probe queue");

    node.set_memory_high_watermark(0.000_000_1)
        .await
        .expect("memory alarm");
    // A dead letter against the blocked broker fails at its deadline instead of waiting for
    // ever. (The alarm takes effect within moments; until then the probe gets through.)
    let probe_connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("probe connection");
    let probe = DeadLetters::open(Arc::new(probe_connection), "probe", Duration::from_secs(1))
        .await
        .expect("probe dead letters");
    let mut blocked = false;
    let deadline = Instant::now() + WITHIN;
    while !blocked && Instant::now() < deadline {
        let started = Instant::now();
        let result = probe
            .publish(
                b"{}",
                &event_properties(&svix_id(), "user.created"),
                DeadKind::Permanent,
                "probe",
                1,
            )
            .await;
        if let Err(DeadLetterError::Timeout(_)) = result {
            assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
            blocked = true;
        }
    }
    assert!(blocked, "the alarm never blocked the probe");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a spare port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("run")
        .env("DATABASE_URL", env.db_url())
        .envs(test_support::services::broker_env(
            &node.amqp_url(),
            &env.topology,
        ))
        .env("WORKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("WORKER_BROKER_TIMEOUT_MS", "1000")
        .env("WORKER_RETRY_BASE_MS", "50")
        .env("WORKER_RETRY_MAX_MS", "200")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the worker binary");
    // The worker tried to dead-letter the junk and met the deadline at least twice.
    eventually(WITHIN, "dead-letter attempts timing out", || async {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            return false;
        }
        let (_, text) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
        text.lines()
            .find(|line| line.starts_with(r#"clerk_sync_worker_retries_total{reason="transient"}"#))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<u64>().ok())
            .is_some_and(|retries| retries >= 2)
    })
    .await;

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let exit = loop {
        if let Some(status) = child.try_wait().expect("wait for the worker") {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "the worker did not exit within 20 s of SIGTERM with the broker blocked"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    eprintln!("stopped {took:?} after SIGTERM with the broker blocked");

    // Nothing lost: once the alarm is over, the junk is back in the worker queue (or was
    // dead-lettered after all).
    node.set_memory_high_watermark(0.4)
        .await
        .expect("alarm cleared");
    let ready = node
        .ready_messages(&env.topology.queue)
        .await
        .expect("queue");
    let dead = node
        .ready_messages(&env.topology.dead_queue)
        .await
        .expect("dead queue");
    assert!(
        ready + dead >= 1,
        "the junk event is still somewhere: {ready} + {dead}"
    );
    let _ = publisher.close(200, "done".into()).await;
}
