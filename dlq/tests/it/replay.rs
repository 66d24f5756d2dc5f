//! `replay` against the real RabbitMQ: what moves, what stays, and that nothing is ever lost.

use crate::common;

use std::time::{Duration, Instant};

use common::{Fixture, Letter, run};
use dlq::session::RepublishError;
use dlq::{Broker, DlqError};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use shared::Topology;
use test_support::amqp_url;

#[tokio::test]
async fn replay_by_id_republishes_only_that_letter_with_its_original_body_properties_and_svix_headers()
 {
    let fixture = Fixture::new().await;
    let wanted = Letter::new("msg_b", "user.updated").exhausted(5, "boom");
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.updated"),
            wanted.clone(),
            Letter::new("msg_c", "user.updated"),
        ])
        .await;

    let (result, out, progress) = run(&fixture.settings(), &["replay", "--id", "msg_b"]).await;

    result.expect("replay succeeds");
    assert_eq!(out, "replayed 1, skipped 2, failed 0\n");
    assert!(
        progress.contains("[1/1] replayed msg_b (user.updated)"),
        "{progress}"
    );
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 2)
        .await;
    assert_eq!(
        fixture.ids_in(&fixture.topology.dead_queue).await,
        ["msg_a", "msg_c"]
    );
    fixture.wait_for_ready(&fixture.topology.queue, 1).await;
    let copies = fixture.drain(&fixture.topology.queue).await;
    let [copy] = copies.as_slice() else {
        panic!("one copy expected, got {copies:?}");
    };
    assert_eq!(copy.data, wanted.body);
    // Through the default exchange, straight to the worker queue.
    assert_eq!(copy.exchange.as_str(), "");
    assert_eq!(copy.routing_key.as_str(), fixture.topology.queue);
    let original = wanted.event_properties();
    let properties = &copy.properties;
    assert_eq!(properties.message_id(), original.message_id());
    assert_eq!(properties.kind(), original.kind());
    assert_eq!(properties.timestamp(), original.timestamp());
    assert_eq!(properties.content_type(), original.content_type());
    assert_eq!(properties.delivery_mode(), &Some(2));
    // The svix and received-at headers, and none of the dead-letter ones: the broker's own
    // delivery count starts afresh (the dead letter carried 4).
    let mut headers = properties
        .headers()
        .clone()
        .expect("headers")
        .inner()
        .clone();
    let delivery_count = headers.remove(shared::headers::X_DELIVERY_COUNT);
    assert!(
        matches!(
            delivery_count,
            None | Some(lapin::types::AMQPValue::LongLongInt(0))
        ),
        "{delivery_count:?}"
    );
    assert_eq!(FieldTable::from(headers), wanted.event_headers());
}

#[tokio::test]
async fn a_replayed_event_does_not_reach_other_queues_bound_to_the_exchange() {
    let fixture = Fixture::new().await;
    let audit = fixture
        .channel
        .queue_declare(
            "".into(),
            // Exclusive: the broker names it and deletes it with the test's connection.
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the other queue");
    fixture
        .channel
        .queue_bind(
            audit.name().clone(),
            fixture.topology.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the other queue");
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;

    let (result, _, _) = run(&fixture.settings(), &["replay", "--all"]).await;

    result.expect("replay succeeds");
    fixture.wait_for_ready(&fixture.topology.queue, 1).await;
    assert_eq!(fixture.ready(audit.name().as_str()).await, 0);
}

#[tokio::test]
async fn replay_by_type_takes_only_letters_of_that_type() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.deleted"),
            Letter::new("msg_c", "user.created"),
        ])
        .await;

    let (result, out, _) = run(&fixture.settings(), &["replay", "--type", "user.created"]).await;

    result.expect("replay succeeds");
    assert_eq!(out, "replayed 2, skipped 1, failed 0\n");
    fixture.wait_for_ready(&fixture.topology.queue, 2).await;
    assert_eq!(
        fixture.ids_in(&fixture.topology.queue).await,
        ["msg_a", "msg_c"]
    );
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 1)
        .await;
    assert_eq!(
        fixture.ids_in(&fixture.topology.dead_queue).await,
        ["msg_b"]
    );
}

#[tokio::test]
async fn replay_all_empties_the_dead_letter_queue_into_the_worker_queue() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.deleted").body(b"not json"),
            Letter::new("msg_c", "session.created"),
        ])
        .await;

    let (result, out, progress) = run(&fixture.settings(), &["replay", "--all"]).await;

    result.expect("replay succeeds");
    assert_eq!(out, "replayed 3, skipped 0, failed 0\n");
    assert!(
        progress.contains("3 of 3 dead letter(s) selected"),
        "{progress}"
    );
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 0)
        .await;
    fixture.wait_for_ready(&fixture.topology.queue, 3).await;
    assert_eq!(
        fixture.ids_in(&fixture.topology.queue).await,
        ["msg_a", "msg_b", "msg_c"]
    );
}

#[tokio::test]
async fn replay_all_of_more_letters_than_fit_in_flight_at_once_moves_every_one() {
    let fixture = Fixture::new().await;
    let letters: Vec<Letter> = (0..150)
        .map(|n| Letter::new(&format!("msg_{n:03}"), "user.created"))
        .collect();
    fixture.dead_letters(&letters).await;

    let (result, out, _) = run(&fixture.settings(), &["replay", "--all"]).await;

    result.expect("replay succeeds");
    assert_eq!(out, "replayed 150, skipped 0, failed 0\n");
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 0)
        .await;
    let expected: Vec<String> = letters.iter().map(|letter| letter.id.clone()).collect();
    assert_eq!(fixture.ids_in(&fixture.topology.queue).await, expected);
}

#[tokio::test]
async fn copies_the_broker_refuses_leave_their_letters_in_the_queue_and_fail_the_command() {
    let mut fixture = Fixture::new().await;
    let letters: Vec<Letter> = (0..5)
        .map(|n| Letter::new(&format!("msg_{n}"), "user.created"))
        .collect();
    fixture.dead_letters(&letters).await;
    // A worker queue that takes two messages and refuses the rest.
    let mut settings = fixture.settings();
    settings.amqp_queue = fixture.declare_full_after(2).await;

    let (result, out, progress) = run(&settings, &["replay", "--all"]).await;

    assert_eq!(out, "replayed 2, skipped 0, failed 3\n");
    let error = result.expect_err("incomplete");
    assert!(
        matches!(error, DlqError::ReplayIncomplete { failed: 3, .. }),
        "{error}"
    );
    assert!(progress.contains("failed msg_"), "{progress}");
    fixture.wait_for_ready(&settings.amqp_queue, 2).await;
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 3)
        .await;
}

#[tokio::test]
async fn replay_with_a_limit_takes_at_most_that_many_and_leaves_the_rest() {
    let fixture = Fixture::new().await;
    let letters: Vec<Letter> = (0..5)
        .map(|n| Letter::new(&format!("msg_{n}"), "user.created"))
        .collect();
    fixture.dead_letters(&letters).await;

    let (result, out, _) = run(&fixture.settings(), &["replay", "--all", "--limit", "2"]).await;

    result.expect("replay succeeds");
    assert!(out.starts_with("replayed 2, "), "{out}");
    fixture.wait_for_ready(&fixture.topology.queue, 2).await;
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 3)
        .await;
}

#[tokio::test]
async fn a_dry_run_says_what_it_would_replay_and_changes_nothing() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.created"),
        ])
        .await;

    let (result, out, progress) = run(&fixture.settings(), &["replay", "--all", "--dry-run"]).await;

    result.expect("dry run succeeds");
    assert_eq!(out, "dry run: would replay 2, skipped 0; nothing changed\n");
    assert!(
        progress.contains("would replay msg_a (user.created)"),
        "{progress}"
    );
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 2)
        .await;
    assert_eq!(fixture.ready(&fixture.topology.queue).await, 0);
}

#[tokio::test]
async fn a_letter_dead_lettered_twice_is_replayed_twice_by_its_id() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_a", "user.created"),
        ])
        .await;

    let (result, out, _) = run(&fixture.settings(), &["replay", "--id", "msg_a"]).await;

    result.expect("replay succeeds");
    assert_eq!(out, "replayed 2, skipped 0, failed 0\n");
    fixture.wait_for_ready(&fixture.topology.queue, 2).await;
}

#[tokio::test]
async fn replay_of_an_unknown_id_is_refused_and_replays_nothing() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.created"),
        ])
        .await;

    let (result, out, _) = run(
        &fixture.settings(),
        &["replay", "--id", "msg_a", "--id", "msg_nope"],
    )
    .await;

    let error = result.expect_err("unknown id");
    assert_eq!(
        error.to_string(),
        format!(
            "no dead letter with id msg_nope in {}; nothing was replayed",
            fixture.topology.dead_queue
        )
    );
    assert!(out.is_empty(), "{out}");
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 2)
        .await;
    assert_eq!(fixture.ready(&fixture.topology.queue).await, 0);
}

#[tokio::test]
async fn replay_without_a_selector_or_with_two_is_refused_and_changes_nothing() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;

    let (none, _, _) = run(&fixture.settings(), &["replay"]).await;
    let (two, _, _) = run(
        &fixture.settings(),
        &["replay", "--all", "--type", "user.created"],
    )
    .await;

    assert_eq!(
        none.expect_err("no selector").to_string(),
        "replay needs a selector: --id ID (repeatable), --type TYPE or --all"
    );
    assert!(matches!(
        two.expect_err("two selectors"),
        DlqError::ConflictingSelectors
    ));
    assert_eq!(fixture.ready(&fixture.topology.dead_queue).await, 1);
    assert_eq!(fixture.ready(&fixture.topology.queue).await, 0);
}

#[tokio::test]
async fn a_crash_between_the_confirmed_copy_and_the_acknowledgement_duplicates_and_never_loses() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;

    // The replay's first step, then the process "dies": the connection goes away before the
    // dead letter is acknowledged.
    let broker = Broker::connect(
        &shared::AmqpNodes::parse(&amqp_url()).expect("AMQP_URL"),
        fixture.topology.clone(),
    )
    .await
    .expect("connect");
    let mut session = broker.session().await.expect("session");
    let letter = session.fetch().await.expect("fetch").expect("a letter");
    session
        .publish_copy(&letter)
        .await
        .expect("published copy")
        .confirmed()
        .await
        .expect("confirmed copy");
    drop(letter);
    drop(session);
    broker.close().await;

    // Both copies exist: the worker's processed_events makes the second harmless.
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 1)
        .await;
    fixture.wait_for_ready(&fixture.topology.queue, 1).await;

    // Replaying again completes the move.
    let (result, out, _) = run(&fixture.settings(), &["replay", "--all"]).await;
    result.expect("replay succeeds");
    assert_eq!(out, "replayed 1, skipped 0, failed 0\n");
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 0)
        .await;
    assert_eq!(
        fixture.ids_in(&fixture.topology.queue).await,
        ["msg_a", "msg_a"]
    );
}

#[tokio::test]
async fn a_replay_to_a_missing_worker_queue_is_refused_and_every_letter_stays() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;
    let mut settings = fixture.settings();
    settings.amqp_queue = format!("{}.absent", fixture.topology.queue);

    let (result, _, _) = run(&settings, &["replay", "--all"]).await;

    let line = result.expect_err("no worker queue").to_string();
    assert!(
        line.starts_with(&format!("queue {} does not exist", settings.amqp_queue))
            && line.contains("AMQP_QUEUE"),
        "{line}"
    );
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 1)
        .await;
}

#[tokio::test]
async fn a_session_takes_only_the_letters_present_when_it_started() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[
            Letter::new("msg_a", "user.created"),
            Letter::new("msg_b", "user.created"),
        ])
        .await;
    let broker = Broker::connect(
        &shared::AmqpNodes::parse(&amqp_url()).expect("AMQP_URL"),
        fixture.topology.clone(),
    )
    .await
    .expect("connect");
    let mut session = broker.session().await.expect("session");
    // Dead-lettered while the command runs (a replayed event failing again, say).
    fixture
        .publish(
            "",
            &fixture.topology.dead_queue,
            b"{}",
            Letter::new("msg_late", "user.created").event_properties(),
        )
        .await;

    let mut taken = Vec::new();
    while let Some(letter) = session.fetch().await.expect("fetch") {
        taken.push(letter.summary().id.clone().expect("an id"));
        session.hold(letter);
    }

    taken.sort();
    assert_eq!(taken, ["msg_a", "msg_b"]);
    session.release().await;
    broker.close().await;
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 3)
        .await;
}

#[tokio::test]
async fn a_copy_the_broker_cannot_route_fails_and_the_letter_stays() {
    let fixture = Fixture::new().await;
    fixture
        .dead_letters(&[Letter::new("msg_a", "user.created")])
        .await;
    // The worker queue disappears after the replay checked it.
    let gone = Topology {
        queue: format!("{}.gone", fixture.topology.queue),
        ..fixture.topology.clone()
    };
    let broker = Broker::connect(
        &shared::AmqpNodes::parse(&amqp_url()).expect("AMQP_URL"),
        gone,
    )
    .await
    .expect("connect");
    let mut session = broker.session().await.expect("session");
    let letter = session.fetch().await.expect("fetch").expect("a letter");

    let error = session
        .publish_copy(&letter)
        .await
        .expect("published copy")
        .confirmed()
        .await
        .expect_err("unroutable");

    assert!(
        matches!(error, RepublishError::Unroutable { .. }),
        "{error:?}"
    );
    session.hold(letter);
    session.release().await;
    broker.close().await;
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 1)
        .await;
}

#[tokio::test]
async fn a_rate_limit_spaces_the_replays_out() {
    let fixture = Fixture::new().await;
    let letters: Vec<Letter> = (0..5)
        .map(|n| Letter::new(&format!("msg_{n}"), "user.created"))
        .collect();
    fixture.dead_letters(&letters).await;

    let start = Instant::now();
    let (result, out, _) = run(&fixture.settings(), &["replay", "--all", "--rate", "20"]).await;
    let elapsed = start.elapsed();

    result.expect("replay succeeds");
    assert_eq!(out, "replayed 5, skipped 0, failed 0\n");
    // Five replays at 20 a second: four gaps of 50 ms at least.
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
}
