//! SIGTERM under load: the real binary stops accepting, finishes what it has, and exits 0, and
//! every event it answered 200 is on the queue.

use std::cell::Cell;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use test_support::http::{Client, get};
use test_support::signing::{SECRET, event_body, signed_headers};
use test_support::{BrokerChannel, TestTopology, amqp_url, eventually};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const CLIENTS: usize = 32;

#[actix_web::test]
async fn sigterm_under_load_exits_zero_and_loses_no_confirmed_event() {
    let topology = TestTopology::names();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLERK_WEBHOOK_SECRET", SECRET)
        .envs(test_support::services::broker_env(&amqp_url(), &topology))
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .env("INGEST_CONFIRM_TIMEOUT_MS", "3000")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the ingest");
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("stderr line") {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["message"] == "ingest listening" {
                return entry["port"].as_u64().expect("port field");
            }
        }
        panic!("the ingest exited before listening");
    })
    .await
    .expect("the ingest to log its port");
    // Keep draining its log so it never blocks on a full pipe.
    let log = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            kept.push(line);
        }
        kept
    });
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        Duration::from_secs(20),
        "the ingest to be ready",
        || async { get(&format!("{base}/readyz")).await.0 == 200 },
    )
    .await;

    let url = format!("{base}/api/webhooks");
    let started = Instant::now();
    let progress = Progress::default();
    let load = join_all((0..CLIENTS).map(|_| client(&url, &progress)));
    let signal = async {
        // Signal once the load is well under way, so requests are in flight.
        eventually(Duration::from_secs(30), "load to build up", || async {
            progress.accepted.get() >= 200
        })
        .await;
        progress.signalled.set(true);
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    };
    let (results, ()) = tokio::join!(load, signal);
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the ingest to exit after SIGTERM")
        .expect("wait");
    let log = log.await.expect("log task");
    assert!(
        exit.success(),
        "exit status {exit:?}; log:\n{}",
        log.join("\n")
    );

    let accepted: HashSet<String> = results.iter().flat_map(|r| r.accepted.clone()).collect();
    let after_signal: usize = results.iter().map(|r| r.answered_after_signal).sum();
    assert!(
        accepted.len() >= 200,
        "too little load: {} accepted",
        accepted.len()
    );
    assert!(after_signal > 0, "no request was answered after the signal");
    eprintln!(
        "{} accepted in {:?}, {after_signal} answered after the signal",
        accepted.len(),
        started.elapsed()
    );

    let on_queue = drain(&topology.queue).await;
    let missing: Vec<&String> = accepted.difference(&on_queue).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed events lost: {missing:?}",
        missing.len()
    );
}

#[derive(Default)]
struct Progress {
    accepted: Cell<usize>,
    signalled: Cell<bool>,
}

struct ClientResult {
    accepted: Vec<String>,
    answered_after_signal: usize,
}

/// Sends signed events one after another on a keep-alive connection until the server is gone.
async fn client(url: &str, progress: &Progress) -> ClientResult {
    let http = Client::new();
    let mut result = ClientResult {
        accepted: Vec::new(),
        answered_after_signal: 0,
    };
    loop {
        let body = event_body("user.created", 1024);
        let headers = signed_headers(&body);
        match http.try_post(url, &headers, body.as_bytes()).await {
            Ok(answer) => {
                if progress.signalled.get() {
                    result.answered_after_signal += 1;
                }
                if answer.status == 200 {
                    result.accepted.push(headers[0].1.clone());
                    progress.accepted.set(progress.accepted.get() + 1);
                }
            }
            // Connection refused or closed: the server has stopped.
            Err(_) => return result,
        }
    }
}

/// Every message id now on `queue`.
async fn drain(queue: &str) -> HashSet<String> {
    let broker = BrokerChannel::open().await;
    let ids = broker
        .drain(queue)
        .await
        .iter()
        .map(|delivery| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .expect("message id")
        })
        .collect();
    broker.close().await;
    ids
}
