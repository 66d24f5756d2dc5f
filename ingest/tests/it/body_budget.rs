//! Junk traffic against the real binary: uploads that send the head and ~1 MiB of an unsigned
//! body and then stall hold at most the body budget, the ingest's peak RSS stays bounded, and
//! valid events from another client are still answered (200, or 503 with Retry-After; every 200
//! is on the queue).

use std::process::Stdio;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use test_support::http::{get, metric, post};
use test_support::signing::{SECRET, event_body, signed_headers};
use test_support::{TestTopology, amqp_url, eventually};

/// Stalled uploads in this test (the benchmark runs 1,000).
const STALLED: usize = 100;
/// Bytes each stalled upload sends: just under the 1 MiB it declares (the body limit).
const UPLOAD: usize = (1 << 20) - 1024;
const BUDGET: usize = 8 << 20;
/// Without the budget the stalled bodies alone would take `STALLED` MiB.
const PEAK_RSS_LIMIT_MIB: f64 = 64.0;

#[actix_web::test]
async fn stalled_uploads_hold_at_most_the_body_budget_and_valid_events_are_still_answered() {
    let topology = TestTopology::names();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .env_clear()
        .env("CLERK_WEBHOOK_SECRET", SECRET)
        .envs(test_support::services::broker_env(&amqp_url(), &topology))
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .env("INGEST_BODY_BUDGET", BUDGET.to_string())
        .env("INGEST_CLIENT_TIMEOUT_MS", "3000")
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
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        Duration::from_secs(20),
        "the ingest to be ready",
        || async { get(&format!("{base}/readyz")).await.0 == 200 },
    )
    .await;

    // The stalled uploads: each declares more than it sends, so none is ever complete.
    let head = format!(
        "POST /api/webhooks HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nsvix-id: msg_junk\r\nsvix-timestamp: {}\r\n\
         svix-signature: v1,bm90IGEgc2lnbmF0dXJl\r\n\r\n",
        1 << 20,
        chrono::Utc::now().timestamp()
    );
    let junk = vec![b'x'; UPLOAD];
    let uploads = futures_util::future::join_all((0..STALLED).map(|_| async {
        let mut stream = TcpStream::connect(("127.0.0.1", port as u16))
            .await
            .expect("connect");
        stream.write_all(head.as_bytes()).await.expect("head");
        // A refused upload is answered and closed by the ingest: the write may fail.
        let _ = tokio::time::timeout(Duration::from_secs(30), stream.write_all(&junk)).await;
        stream
    }))
    .await;

    // While the budget is spent, a valid event is answered at once: 200 or 503 with Retry-After.
    let url = format!("{base}/api/webhooks");
    let (mut accepted, mut valid_refused) = (0, 0);
    for _ in 0..10 {
        let body = event_body("user.created", 2048);
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            post(&url, &signed_headers(&body), body.as_bytes()),
        )
        .await
        .expect("an answer within 5 s");
        match answer.status {
            200 => accepted += 1,
            503 => {
                assert!(answer.retry_after.is_some(), "{answer:?}");
                valid_refused += 1;
            }
            _ => panic!("unexpected answer {answer:?}"),
        }
    }

    // Uploads inside the budget are held until the client timeout, then answered 408. The ones
    // past it were answered 503 before their body was read and closed (the unread body may turn
    // the close into a reset that swallows the answer; the metric below counts them exactly).
    let mut held = 0;
    for mut stream in uploads {
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .expect("every stalled upload is answered within the client timeout");
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 503")
                || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
        if answer.starts_with("HTTP/1.1 408") {
            held += 1;
        }
    }
    let refused = STALLED - held;
    assert!(
        held * UPLOAD <= BUDGET,
        "{held} uploads of {UPLOAD} B were held against a budget of {BUDGET} B"
    );
    // Once they are gone the budget is free again.
    let body = event_body("user.created", 2048);
    let answer = post(&url, &signed_headers(&body), body.as_bytes()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    accepted += 1;

    let peak_mib = test_support::proc_stats::peak_rss_kib(pid).expect("VmHWM") as f64 / 1024.0;
    println!(
        "{STALLED} stalled uploads of {UPLOAD} B against a budget of {BUDGET} B: {refused} \
         refused with 503, {held} held until 408; valid events accepted {accepted} of 11; \
         ingest peak RSS {peak_mib:.1} MiB"
    );
    assert!(
        peak_mib <= PEAK_RSS_LIMIT_MIB,
        "peak RSS {peak_mib:.1} MiB is over {PEAK_RSS_LIMIT_MIB} MiB"
    );

    let metrics = get(&format!("{base}/metrics")).await.1;
    assert_eq!(
        metric(
            &metrics,
            r#"clerk_sync_ingest_requests_total{outcome="body_budget_exhausted"}"#
        ),
        Some((refused + valid_refused) as f64),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "clerk_sync_ingest_body_budget_bytes"),
        Some(0.0)
    );
    // Every 200 is on the queue.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            topology.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(queue.message_count(), accepted);
    let _ = connection.close(200, "done".into()).await;

    terminate(&mut child, pid).await;
}

/// SIGTERM through `kill`, then the exit status.
async fn terminate(child: &mut tokio::process::Child, pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exit within 30 s")
        .expect("wait");
    assert!(status.success(), "{status}");
}
