//! `list`, `show` and `purge` against the real RabbitMQ, and the refusal of bad input.

use crate::common;

use std::time::{Duration, Instant};

use common::{Fixture, Letter, run};
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use serde_json::Value;
use shared::Settings;
use test_support::amqp_url;

#[tokio::test]
async fn list_prints_one_table_row_per_dead_letter_and_leaves_them_all_in_the_queue() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.updated").exhausted(5, "users_email_key violated"),
        ])
        .await;

    let (result, out, progress) = run(&fixture.settings(), &["list"]).await;

    result.expect("list succeeds");
    assert_eq!(
        progress,
        format!("2 dead letter(s) in {}\n", fixture.topology.dead_queue)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "TYPE", "KIND", "REASON", "ATTEMPTS", "FAILED", "AT"]
    );
    let row_b = lines
        .iter()
        .find(|line| line.starts_with("msg_b"))
        .expect("a row for msg_b");
    let cells: Vec<&str> = row_b.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "msg_b",
            "user.updated",
            "exhausted",
            "users_email_key",
            "violated",
            "5",
            "2026-11-27T03:05:00Z"
        ]
    );
    assert!(lines.iter().any(|line| line.starts_with("msg_a")), "{out}");
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 2)
        .await;
    assert_eq!(
        fixture.ids_in(&fixture.topology.dead_queue).await,
        ["msg_a", "msg_b"]
    );
}

#[tokio::test]
async fn list_json_prints_an_array_with_every_field() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.deleted").exhausted(3, "boom")])
        .await;

    let (result, out, _) = run(&fixture.settings(), &["list", "--json"]).await;

    result.expect("list succeeds");
    let listed: Value = serde_json::from_str(&out).expect("stdout is JSON");
    assert_eq!(
        listed,
        serde_json::json!([{
            "id": "msg_a",
            "type": "user.deleted",
            "kind": "exhausted",
            "reason": "boom",
            "attempts": 3,
            "failed_at": "2026-11-27T03:05:00Z",
        }])
    );
}

#[tokio::test]
async fn list_of_an_empty_queue_prints_only_the_header_or_an_empty_array() {
    let fixture = Fixture::new().await;

    let (table, out_table, _) = run(&fixture.settings(), &["list"]).await;
    let (json, out_json, _) = run(&fixture.settings(), &["list", "--json"]).await;

    table.expect("list succeeds");
    json.expect("list --json succeeds");
    assert_eq!(out_table.lines().count(), 1, "{out_table}");
    assert_eq!(
        serde_json::from_str::<Value>(&out_json).expect("JSON"),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn a_message_the_broker_dead_lettered_at_its_delivery_limit_is_listed_as_delivery_limit() {
    let fixture = Fixture::with_delivery_limit(1).await;
    let letter = Letter::new("msg_limit", "user.created");
    fixture
        .publish(
            &fixture.topology.exchange,
            "user.created",
            &letter.body,
            letter.event_properties(),
        )
        .await;
    // A consumer that fails it every time: `reject` with requeue counts as a failed delivery on
    // every RabbitMQ version, so the broker moves it to the dead-letter queue at its limit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fixture.ready(&fixture.topology.dead_queue).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the broker never dead-lettered it"
        );
        let taken = fixture
            .channel
            .basic_get(
                fixture.topology.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .expect("basic.get");
        match taken {
            Some(message) => {
                message
                    .delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: true })
                    .await
                    .expect("reject");
            }
            // Returned, not yet ready again: poll.
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 1)
        .await;

    let (result, out, _) = run(&fixture.settings(), &["list", "--json"]).await;

    result.expect("list succeeds");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    let row = &listed[0];
    assert_eq!(row["id"], "msg_limit", "{out}");
    assert_eq!(row["kind"], "delivery-limit", "{out}");
    let reason = row["reason"].as_str().expect("a reason");
    assert!(
        reason.contains(&fixture.topology.queue) && reason.contains("delivery_limit"),
        "{reason}"
    );
    assert!(row["failed_at"].is_string(), "{out}");
}

#[tokio::test]
async fn show_prints_the_properties_every_header_and_the_pretty_json_body() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created").exhausted(5, "users_email_key violated"),
            Letter::new("msg_b", "user.created"),
        ])
        .await;

    let (result, out, _) = run(&fixture.settings(), &["show", "msg_a"]).await;

    result.expect("show succeeds");
    for expected in [
        "id:         msg_a",
        "kind:       exhausted",
        "reason:     users_email_key violated",
        "attempts:   5",
        "  message_id: msg_a",
        "  type: user.created",
        "  content_type: application/json",
        "  delivery_mode: 2 (persistent)",
        "  svix-id: msg_a",
        "  svix-signature: v1,signature-of-msg_a",
        "  received-at: 2026-11-27T03:00:00Z",
        "  error-kind: exhausted",
        "  \"type\": \"user.created\"",
    ] {
        assert!(
            out.lines().any(|line| line == expected),
            "missing {expected:?} in\n{out}"
        );
    }
    assert!(!out.contains("msg_b"), "{out}");
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 2)
        .await;
}

#[tokio::test]
async fn show_prints_a_body_that_is_not_json_as_it_is() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_raw", "user.created").body(b"not json at all")])
        .await;

    let (result, out, _) = run(&fixture.settings(), &["show", "msg_raw"]).await;

    result.expect("show succeeds");
    assert!(
        out.ends_with("body (15 bytes, raw):\nnot json at all\n"),
        "{out}"
    );
}

#[tokio::test]
async fn show_of_an_unknown_id_is_refused_and_changes_nothing() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;

    let (result, out, _) = run(&fixture.settings(), &["show", "msg_nope"]).await;

    let error = result.expect_err("unknown id");
    assert_eq!(
        error.to_string(),
        format!(
            "no dead letter with id msg_nope in {}",
            fixture.topology.dead_queue
        )
    );
    assert!(out.is_empty(), "{out}");
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 1)
        .await;
}

#[tokio::test]
async fn purge_without_yes_is_refused_and_deletes_nothing() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;

    let (result, _, _) = run(&fixture.settings(), &["purge"]).await;

    let error = result.expect_err("refused");
    assert!(error.to_string().contains("--yes"), "{error}");
    assert!(error.to_string().contains("nothing was deleted"), "{error}");
    assert_eq!(fixture.ready(&fixture.topology.dead_queue).await, 1);
}

#[tokio::test]
async fn purge_with_yes_deletes_every_dead_letter_and_nothing_else() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.created"),
        ])
        .await;
    let event = Letter::new("msg_live", "user.created");
    fixture
        .publish(
            "",
            &fixture.topology.queue,
            &event.body,
            event.event_properties(),
        )
        .await;

    let (result, out, _) = run(&fixture.settings(), &["purge", "--yes"]).await;

    result.expect("purge succeeds");
    assert_eq!(
        out,
        format!(
            "purged 2 dead letter(s) from {}\n",
            fixture.topology.dead_queue
        )
    );
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 0)
        .await;
    assert_eq!(fixture.ready(&fixture.topology.queue).await, 1);
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error_without_the_password() {
    let settings = Settings {
        amqp_url: Some("amqp://guest:hunter2@127.0.0.1:1/%2f".into()),
        ..Settings::default()
    };

    let (result, _, _) = run(&settings, &["list"]).await;

    let line = result.expect_err("unreachable").to_string();
    assert!(
        line.starts_with("cannot connect to RabbitMQ at 127.0.0.1:1: "),
        "{line}"
    );
    assert!(!line.contains("hunter2"), "{line}");
}

#[tokio::test]
async fn a_missing_or_malformed_amqp_url_is_named() {
    let (missing, _, _) = run(&Settings::default(), &["list"]).await;
    let malformed = Settings {
        amqp_url: Some("http://localhost".into()),
        ..Settings::default()
    };
    let (malformed, _, _) = run(&malformed, &["list"]).await;

    assert_eq!(
        missing.expect_err("missing").to_string(),
        "configuration: AMQP_URL is required but not set"
    );
    assert!(
        malformed
            .expect_err("malformed")
            .to_string()
            .starts_with("configuration: AMQP_URL is malformed"),
    );
}

#[tokio::test]
async fn a_dead_letter_queue_that_does_not_exist_is_named() {
    let settings = Settings {
        amqp_url: Some(amqp_url().into()),
        amqp_dead_queue: format!("dlq-test-{}.absent", uuid::Uuid::new_v4()),
        ..Settings::default()
    };

    let (result, _, _) = run(&settings, &["list"]).await;

    let line = result.expect_err("no such queue").to_string();
    assert!(
        line.starts_with(&format!(
            "queue {} does not exist",
            settings.amqp_dead_queue
        )) && line.contains("AMQP_DEAD_QUEUE"),
        "{line}"
    );
}
