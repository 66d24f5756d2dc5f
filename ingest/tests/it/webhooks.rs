//! The webhook endpoint against the real broker: every status code, the message as it lands on
//! the queue, and the resource bounds.

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use test_support::events::header_text;
use test_support::http::{Answer, get, metric, post};
use test_support::signing::{
    OTHER_SECRET, SECRET, event_body, signed_headers, signed_headers_with, signer,
};
use test_support::{TestIngest, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn assert_status(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert!(answer.json().is_object(), "{answer:?}");
}

#[actix_web::test]
async fn a_signed_event_is_accepted_and_lands_on_the_queue_byte_for_byte() {
    let app = TestIngest::spawn().await;
    // Odd spacing and key order: the body must travel as sent, not re-serialised.
    let body =
        r#"{ "type" : "user.created",  "data": {"id":"user_1", "é": "ü"}, "object":"event" }"#;
    let headers = signed_headers(body);
    let before = chrono::Utc::now();

    let answer = post(&app.webhook_url(), &headers, body.as_bytes()).await;

    assert_status(&answer, 200);
    assert_eq!(answer.json(), serde_json::json!({"status": "accepted"}));
    let delivery = app.next_message().await;
    assert_eq!(delivery.data, body.as_bytes());
    assert_eq!(delivery.routing_key.as_str(), "user.created");
    assert_eq!(delivery.exchange.as_str(), app.topology.exchange);
    let properties = &delivery.properties;
    let (id, timestamp, signature) = (&headers[0].1, &headers[1].1, &headers[2].1);
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        properties.content_type().as_ref().map(|v| v.as_str()),
        Some("application/json")
    );
    assert_eq!(
        properties.message_id().as_ref().map(|v| v.as_str()),
        Some(id.as_str())
    );
    assert_eq!(
        properties.kind().as_ref().map(|v| v.as_str()),
        Some("user.created")
    );
    assert_eq!(
        properties.timestamp().map(|t| t.to_string()),
        Some(timestamp.clone())
    );
    let amqp_headers = properties.headers().as_ref().expect("headers");
    assert_eq!(header_text(amqp_headers, "svix-id"), *id);
    assert_eq!(header_text(amqp_headers, "svix-timestamp"), *timestamp);
    assert_eq!(header_text(amqp_headers, "svix-signature"), *signature);
    let received_at =
        chrono::DateTime::parse_from_rfc3339(&header_text(amqp_headers, "received-at"))
            .expect("received-at is RFC 3339");
    assert!(received_at >= before - chrono::Duration::seconds(1));
    let text = app.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="accepted"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "clerk_sync_ingest_confirm_latency_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "clerk_sync_ingest_broker_connected"),
        Some(1.0)
    );
    app.stop().await;
}

#[actix_web::test]
async fn the_last_accepted_time_starts_at_the_start_and_moves_only_on_an_accepted_event() {
    const SERIES: &str = "clerk_sync_ingest_last_accepted_timestamp_seconds";
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64()
    };
    let app = TestIngest::spawn().await;
    let started = metric(&app.metrics_text().await, SERIES).expect("the gauge is exported");
    assert!(started > 0.0 && started <= now(), "{started}");

    // Signed with a secret the ingest does not hold.
    let body = event_body("user.created", 200);
    let headers = signed_headers_with(
        OTHER_SECRET,
        ["svix-id", "svix-timestamp", "svix-signature"],
        &body,
    );
    let rejected = post(&app.webhook_url(), &headers, body.as_bytes()).await;
    assert_status(&rejected, 401);
    assert_eq!(metric(&app.metrics_text().await, SERIES), Some(started));

    let before = now();
    let accepted = app.post_signed(&event_body("user.created", 200)).await;
    assert_status(&accepted, 200);
    let moved = metric(&app.metrics_text().await, SERIES).expect("the gauge is exported");
    assert!(
        moved >= before && moved > started && moved <= now(),
        "started {started}, before the post {before}, after it {moved}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn webhook_header_names_are_accepted_and_published_under_svix_names() {
    let app = TestIngest::spawn().await;
    let body = &event_body("user.updated", 300);
    let headers = signed_headers_with(
        SECRET,
        ["webhook-id", "webhook-timestamp", "webhook-signature"],
        body,
    );

    let answer = post(&app.webhook_url(), &headers, body.as_bytes()).await;

    assert_status(&answer, 200);
    let delivery = app.next_message().await;
    let amqp_headers = delivery.properties.headers().as_ref().expect("headers");
    assert_eq!(header_text(amqp_headers, "svix-id"), headers[0].1);
    assert_eq!(header_text(amqp_headers, "svix-signature"), headers[2].1);
    app.stop().await;
}

#[actix_web::test]
async fn during_rotation_either_secret_is_accepted_and_a_third_is_not() {
    let app = TestIngest::spawn_with(|settings| {
        settings.clerk_webhook_secret = Some(format!("{SECRET} {OTHER_SECRET}").into());
    })
    .await;
    let names = ["svix-id", "svix-timestamp", "svix-signature"];
    for secret in [SECRET, OTHER_SECRET] {
        let body = &event_body("user.created", 200);
        let answer = post(
            &app.webhook_url(),
            &signed_headers_with(secret, names, body),
            body.as_bytes(),
        )
        .await;
        assert_status(&answer, 200);
    }
    let body = &event_body("user.created", 200);
    let stranger = "whsec_plJ3nmyCDGBKInavdOK15jsl";
    let answer = post(
        &app.webhook_url(),
        &signed_headers_with(stranger, names, body),
        body.as_bytes(),
    )
    .await;
    assert_status(&answer, 401);
    assert_eq!(app.queue_depth().await, 2);
    app.stop().await;
}

#[actix_web::test]
async fn missing_or_malformed_signature_headers_are_answered_400() {
    let app = TestIngest::spawn().await;
    let body = &event_body("user.created", 200);
    let valid = signed_headers(body);
    for missing in 0..3 {
        let mut headers = valid.clone();
        headers.remove(missing);
        let answer = post(&app.webhook_url(), &headers, body.as_bytes()).await;
        assert_status(&answer, 400);
    }
    let mut headers = valid.clone();
    headers[1].1 = "yesterday".into();
    assert_status(
        &post(&app.webhook_url(), &headers, body.as_bytes()).await,
        400,
    );
    assert_eq!(app.queue_depth().await, 0);
    let text = app.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_verification_failures_total{reason="missing_header"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="bad_request"}"#
        ),
        Some(4.0)
    );
    app.stop().await;
}

#[actix_web::test]
async fn bad_signatures_stale_or_future_timestamps_and_tampered_bodies_are_answered_401() {
    let app = TestIngest::spawn().await;
    let body = &event_body("user.created", 200);
    let signer = signer(SECRET);
    let id = "msg_fixed";
    let now = chrono::Utc::now().timestamp();
    let at = |ts: i64, body: &str| {
        vec![
            ("svix-id".to_owned(), id.to_owned()),
            ("svix-timestamp".to_owned(), ts.to_string()),
            (
                "svix-signature".to_owned(),
                signer.sign(id, ts, body.as_bytes()).expect("sign"),
            ),
        ]
    };
    type Case<'a> = (&'a str, Vec<(String, String)>, String);
    let cases: Vec<Case<'_>> = vec![
        ("too old", at(now - 301, body), body.clone()),
        ("too new", at(now + 301, body), body.clone()),
        ("tampered", at(now, body), body.replace("user_", "admin_")),
        (
            "junk signature",
            vec![
                ("svix-id".into(), id.into()),
                ("svix-timestamp".into(), now.to_string()),
                ("svix-signature".into(), "v1,dawfeoifkpqwoekfpqoekf".into()),
            ],
            body.clone(),
        ),
    ];
    for (case, headers, sent) in cases {
        let answer = post(&app.webhook_url(), &headers, sent.as_bytes()).await;
        assert_eq!(answer.status, 401, "{case}: {answer:?}");
        assert!(answer.json()["error"].is_string(), "{case}");
    }
    assert_eq!(app.queue_depth().await, 0);
    let text = app.metrics_text().await;
    for (reason, count) in [
        ("timestamp_too_old", 1.0),
        ("timestamp_in_future", 1.0),
        ("invalid_signature", 2.0),
    ] {
        let series =
            format!(r#"clerk_sync_ingest_verification_failures_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&text, &series), Some(count), "{reason}");
    }
    app.stop().await;
}

#[actix_web::test]
async fn an_unsigned_body_that_is_not_json_is_answered_401_not_400() {
    let app = TestIngest::spawn().await;
    let mut headers = signed_headers("{}");
    headers[2].1 = "v1,R3PTzyfHASBKHH98a7yexTwaJ4yNIcGhFQc1yuN+BPU=".into();
    let answer = post(&app.webhook_url(), &headers, b"not json at all").await;
    assert_status(&answer, 401);
    app.stop().await;
}

#[actix_web::test]
async fn a_signed_body_that_is_not_an_event_object_is_answered_400() {
    let app = TestIngest::spawn().await;
    // `["user.created"]`: serde would read a struct from an array too; only an object is an event.
    for body in [
        "[1,2]",
        r#"["user.created"]"#,
        "not json",
        r#"{"data":{}}"#,
        r#"{"type":7}"#,
        "",
    ] {
        let answer = app.post_signed(body).await;
        assert_eq!(answer.status, 400, "{body:?}: {answer:?}");
        assert!(answer.json()["error"].is_string());
    }
    let long_type = format!(r#"{{"type":"{}"}}"#, "t".repeat(256));
    assert_status(&app.post_signed(&long_type).await, 400);
    assert_eq!(app.queue_depth().await, 0);
    app.stop().await;
}

#[actix_web::test]
async fn unknown_event_types_are_published_too() {
    let app = TestIngest::spawn().await;
    let answer = app
        .post_signed(r#"{"type":"session.created","data":{"id":"sess_1"}}"#)
        .await;
    assert_status(&answer, 200);
    assert_eq!(
        app.next_message().await.routing_key.as_str(),
        "session.created"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_body_over_the_limit_is_answered_413_and_one_under_it_is_accepted() {
    let app = TestIngest::spawn().await;
    // Larger than actix's 256 KiB default, under the 1 MiB limit.
    let big = event_body("user.updated", 700 * 1024);
    assert_status(&app.post_signed(&big).await, 200);
    let too_big = event_body("user.updated", 1024 * 1024 + 1);
    let answer = app.post_signed(&too_big).await;
    assert_status(&answer, 413);
    assert_eq!(app.queue_depth().await, 1);
    app.stop().await;
}

#[actix_web::test]
async fn a_chunked_body_over_a_configured_limit_is_answered_413() {
    let app = TestIngest::spawn_with(|settings| settings.ingest_body_limit = 1024).await;
    let body = event_body("user.created", 4096);
    let headers = signed_headers(&body);
    let mut request = String::from(
        "POST /api/webhooks HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\
         content-type: application/json\r\nconnection: close\r\n",
    );
    for (name, value) in &headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    for chunk in body.as_bytes().chunks(500) {
        request.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            String::from_utf8_lossy(chunk)
        ));
    }
    request.push_str("0\r\n\r\n");

    let answer = raw_exchange(&app, request.as_bytes()).await;

    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(app.queue_depth().await, 0);
    app.stop().await;
}

#[actix_web::test]
async fn an_unroutable_event_is_answered_503_never_200() {
    let app = TestIngest::spawn().await;
    // The exchange stays, with nothing bound to it.
    app.broker
        .channel
        .queue_delete(
            app.topology.queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the queue");

    let answer = app.post_signed(&event_body("user.created", 500)).await;

    assert_status(&answer, 503);
    assert_eq!(answer.retry_after.as_deref(), Some("5"));
    let text = app.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="broker_unavailable"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="accepted"}"#
        ),
        Some(0.0)
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_deleted_exchange_is_answered_503_and_publishing_recovers_once_it_is_back() {
    let app = TestIngest::spawn().await;
    app.broker
        .channel
        .exchange_delete(app.topology.exchange.as_str().into(), Default::default())
        .await
        .expect("delete the exchange");

    // The broker closes the channel that published to a missing exchange.
    let answer = app.post_signed(&event_body("user.created", 500)).await;
    assert_status(&answer, 503);

    app.topology
        .declare(&app.broker.channel)
        .await
        .expect("declare again");
    eventually(
        Duration::from_secs(20),
        "publishing to work again",
        || async {
            app.post_signed(&event_body("user.created", 500))
                .await
                .status
                == 200
        },
    )
    .await;
    app.stop().await;
}

#[actix_web::test]
async fn requests_beyond_the_concurrency_cap_are_answered_503_and_slow_bodies_408() {
    let app = TestIngest::spawn_with(|settings| {
        settings.ingest_max_concurrent_requests = 1;
        settings.ingest_client_timeout_ms = 1_500;
    })
    .await;
    // Holds the only slot: the head is complete, the body never is.
    let mut slow = TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .expect("connect");
    slow.write_all(
        b"POST /api/webhooks HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n{\"type\":",
    )
    .await
    .expect("write");

    // Unsigned: 400 while a slot is free, 503 once the slow request holds it.
    eventually(Duration::from_secs(5), "the slot to be taken", || async {
        let answer = post(&app.webhook_url(), &[], b"{}").await;
        assert!(matches!(answer.status, 400 | 503), "{answer:?}");
        answer.status == 503 && answer.retry_after.is_some()
    })
    .await;

    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_string(&mut answer))
        .await
        .expect("answer within the client timeout")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The slot is free again.
    assert_status(
        &app.post_signed(&event_body("user.created", 200)).await,
        200,
    );
    let text = app.metrics_text().await;
    assert!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="overloaded"}"#
        ) >= Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"clerk_sync_ingest_requests_total{outcome="request_timeout"}"#
        ),
        Some(1.0)
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_request_head_that_never_completes_is_answered_408() {
    let app = TestIngest::spawn_with(|settings| settings.ingest_client_timeout_ms = 1_000).await;
    let answer = raw_exchange(&app, b"POST /api/webhooks HTTP/1.1\r\nhost: local").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    app.stop().await;
}

#[actix_web::test]
async fn a_request_with_too_many_headers_is_refused_with_431() {
    let app = TestIngest::spawn().await;
    let mut request = String::from("POST /api/webhooks HTTP/1.1\r\nhost: localhost\r\n");
    for index in 0..100 {
        request.push_str(&format!("x-filler-{index}: {index}\r\n"));
    }
    request.push_str("content-length: 2\r\n\r\n{}");
    let answer = raw_exchange(&app, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    app.stop().await;
}

#[actix_web::test]
async fn health_readiness_and_metrics_answer() {
    let app = TestIngest::spawn().await;
    let (status, body) = get(&format!("{}/healthz", app.address)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = get(&format!("{}/readyz", app.address)).await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    // The node as AMQP_URL names it, host and port, never the credentials.
    let uri: lapin::uri::AMQPUri = test_support::amqp_url().parse().expect("AMQP_URL");
    let node = format!("{}:{}", uri.authority.host, uri.authority.port);
    assert_eq!(ready, serde_json::json!({"status": "ready", "node": node}));
    let (status, body) = get(&format!("{}/metrics", app.address)).await;
    assert_eq!(status, 200);
    for name in [
        "clerk_sync_ingest_requests_total",
        "clerk_sync_ingest_verification_failures_total",
        "clerk_sync_ingest_confirm_latency_seconds",
        "clerk_sync_ingest_broker_connected",
    ] {
        assert!(body.contains(name), "{name} missing from {body}");
    }
    let (status, body) = get(&format!("{}/nothing-here", app.address)).await;
    assert_eq!((status, body.as_str()), (404, r#"{"error":"not found"}"#));
    app.stop().await;
}

#[actix_web::test]
async fn the_ingest_starts_without_a_broker_and_answers_503_until_it_can_connect() {
    let app = TestIngest::spawn_unready(|settings| {
        // Nothing listens on port 1.
        settings.amqp_url = Some("amqp://guest:guest@127.0.0.1:1/%2f".into());
    })
    .await;
    let (status, _) = get(&format!("{}/healthz", app.address)).await;
    assert_eq!(status, 200);
    let (status, _) = get(&format!("{}/readyz", app.address)).await;
    assert_eq!(status, 503);
    let started = std::time::Instant::now();
    let answer = app.post_signed(&event_body("user.created", 200)).await;
    assert_status(&answer, 503);
    assert!(answer.retry_after.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(
            &app.metrics_text().await,
            "clerk_sync_ingest_broker_connected"
        ),
        Some(0.0)
    );
    app.stop().await;
}

/// Sends raw bytes and reads the answer until the server closes or 10 s pass.
async fn raw_exchange(app: &TestIngest, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(read)) => {
                answer.extend_from_slice(&buffer[..read]);
                // A full answer head is enough to judge the status line.
                if answer.windows(4).any(|window| window == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}
