//! The sender behaves like Svix towards a receiver that refuses at first: every attempt carries a
//! valid signature of its own time, refusals and dropped connections are retried until a 2xx,
//! and only events that got a 2xx are in the ledger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fault_suite::history;
use fault_suite::sender::{self, SenderConfig};
use shared::Backoff;
use svix::webhooks::Webhook;
use test_support::signing::SECRET;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the receiver saw: attempts per svix-id, and how many were not correctly signed.
#[derive(Default)]
struct Seen {
    attempts: HashMap<String, u32>,
    badly_signed: u32,
}

/// A receiver that verifies each request, then answers the first attempt of every event with
/// 503, drops the connection on the second, and accepts from the third on.
async fn receiver(listener: TcpListener, seen: Arc<Mutex<Seen>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let _ = serve(stream, seen).await;
        });
    }
}

async fn serve(stream: TcpStream, seen: Arc<Mutex<Seen>>) -> std::io::Result<()> {
    let webhook = Webhook::new(SECRET).expect("secret");
    let mut stream = BufReader::new(stream);
    loop {
        let mut headers = http::HeaderMap::new();
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let Some((name, value)) = line.trim_end().split_once(':') else {
                break;
            };
            headers.insert(
                http::HeaderName::from_bytes(name.trim().to_lowercase().as_bytes()).expect("name"),
                http::HeaderValue::from_str(value.trim()).expect("value"),
            );
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;

        let id = headers
            .get("svix-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let attempt = {
            let mut seen = seen.lock().expect("lock");
            if webhook.verify(&body, &headers).is_err() {
                seen.badly_signed += 1;
            }
            let attempts = seen.attempts.entry(id).or_default();
            *attempts += 1;
            *attempts
        };
        match attempt {
            1 => {
                stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                    .await?
            }
            2 => return Ok(()),
            _ => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await?
            }
        }
    }
}

#[tokio::test]
async fn refused_events_are_retried_until_accepted_and_every_attempt_is_signed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(receiver(listener, Arc::clone(&seen)));

    let events = history::plan(20, 1);
    let running = sender::start(
        SenderConfig {
            urls: vec![
                format!("http://127.0.0.1:{port}/api/webhooks")
                    .parse()
                    .expect("url"),
            ],
            secret: SECRET.to_owned(),
            rate: 200,
            retry: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
            duplicate_ratio: 0.0,
        },
        events.clone().into_iter(),
    )
    .expect("sender");
    let outcome = running.finish(Duration::from_secs(30)).await;

    assert_eq!(outcome.undelivered, 0);
    assert_eq!(outcome.stats.sent, 20);
    assert_eq!(outcome.stats.accepted, 20);
    assert_eq!(outcome.stats.unavailable, 20, "one 503 per event");
    assert_eq!(outcome.stats.connection_errors, 20, "one drop per event");
    assert_eq!(outcome.stats.retried, 40);
    let mut ledger: Vec<&str> = outcome.ledger.iter().map(|e| e.svix_id.as_str()).collect();
    let mut planned: Vec<&str> = events.iter().map(|e| e.svix_id.as_str()).collect();
    ledger.sort_unstable();
    planned.sort_unstable();
    assert_eq!(ledger, planned);

    let seen = seen.lock().expect("lock");
    assert_eq!(seen.badly_signed, 0);
    assert!(
        seen.attempts.values().all(|&n| n == 3),
        "{:?}",
        seen.attempts
    );
}

#[tokio::test]
async fn an_event_never_accepted_is_reported_undelivered_and_kept_out_of_the_ledger() {
    // Nothing listens on this port: every attempt is a connection error.
    let port = fault_suite::support::spare_port().expect("port");
    let running = sender::start(
        SenderConfig {
            urls: vec![
                format!("http://127.0.0.1:{port}/api/webhooks")
                    .parse()
                    .expect("url"),
            ],
            secret: SECRET.to_owned(),
            rate: 100,
            retry: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(20),
            },
            duplicate_ratio: 0.0,
        },
        history::plan(3, 2).into_iter(),
    )
    .expect("sender");
    let outcome = running.finish(Duration::from_millis(500)).await;
    assert_eq!(outcome.undelivered, 3);
    assert!(outcome.ledger.is_empty());
    assert!(outcome.stats.connection_errors >= 3);
}
