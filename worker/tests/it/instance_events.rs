//! One Clerk instance per database, on the event side: the first event that names an instance
//! pins it, an event of another instance is dead-lettered unapplied, an event that names none
//! is applied and pins nothing, pinning is race-free, and `worker instance`, `worker explain`
//! and `/readyz` show the pin. Real Postgres and RabbitMQ, a fresh database and topology each.

use std::time::Duration;

use serde_json::{Value, json};
use shared::Roles;
use test_support::events::{clerk_user, header_text};
use test_support::http::metric;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};
use worker::ApplyError;
use worker::apply::{Event, Message, Source};
use worker::instance::pinned_instance;

const WITHIN: Duration = Duration::from_secs(30);
const HOME: &str = "ins_home_2q7x";
const OTHER: &str = "ins_other_9k3v";

/// An event body as Clerk sends it: with `instance_id` when given.
fn body(event_type: &str, data: Value, instance: Option<&str>) -> Vec<u8> {
    let mut body = json!({"type": event_type, "object": "event", "timestamp": 1, "data": data});
    if let Some(instance) = instance {
        body["instance_id"] = json!(instance);
    }
    body.to_string().into_bytes()
}

fn event(event_type: &str, data: Value, instance: Option<&str>) -> Event {
    let body = body(event_type, data, instance);
    Event::read(
        &Message::new(&body, svix_id(), Source::Webhook),
        &Roles::default(),
    )
    .expect("a readable event")
}

async fn pinned(env: &TestEnv) -> Option<String> {
    pinned_instance(env.db())
        .await
        .expect("read the pin")
        .map(|pinned| pinned.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_second_instance_is_dead_lettered_with_both_ids_and_counted() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let first = svix_id();
    let user = clerk_user("user_pin", Some("pin@example.org"), None, 100);
    env.publish(
        &first,
        "user.created",
        &body("user.created", user, Some(HOME)),
    )
    .await;
    eventually(WITHIN, "the first event applied", || async {
        env.processed(&first).await.is_some()
    })
    .await;
    let pin = pinned_instance(env.db())
        .await
        .expect("read")
        .expect("pinned");
    assert_eq!(pin.id, HOME);
    assert_eq!(pin.pinned_by, "webhook");
    assert_eq!(pin.environment_type, None, "events do not say it");
    let before = env.user("user_pin").await.expect("stored");

    // A newer version of the same user, from another instance.
    let foreign = svix_id();
    let newer = clerk_user("user_pin", Some("other@example.org"), None, 200);
    env.publish(
        &foreign,
        "user.updated",
        &body("user.updated", newer, Some(OTHER)),
    )
    .await;
    eventually(WITHIN, "the foreign event dead-lettered", || async {
        env.ready(&env.topology.dead_queue).await == 1
    })
    .await;

    let letters = env.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    let (headers, _) = &letters[0];
    assert_eq!(header_text(headers, "error-kind"), "permanent");
    assert_eq!(
        headers.inner().get("attempts"),
        Some(&lapin::types::AMQPValue::LongUInt(1))
    );
    let reason = header_text(headers, "error");
    assert!(reason.contains(OTHER) && reason.contains(HOME), "{reason}");
    assert!(reason.contains("worker instance move"), "{reason}");
    assert_eq!(env.user("user_pin").await, Some(before), "row unchanged");
    assert!(
        env.processed(&foreign).await.is_none(),
        "not in the history"
    );
    assert_eq!(pinned(&env).await.as_deref(), Some(HOME));
    let text = worker.metrics.render();
    assert_eq!(
        metric(&text, "clerk_sync_worker_foreign_instance_events_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "clerk_sync_worker_dead_lettered_total{kind=\"permanent\"}"
        ),
        Some(1.0)
    );

    // /readyz names the pin.
    let (status, ready) = worker.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let ready: Value = serde_json::from_str(&ready).expect("JSON");
    assert_eq!(ready["instance"]["id"], HOME, "{ready}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_event_in_a_batch_holds_up_none_of_its_batch_mates() {
    let env = TestEnv::new().await;
    let home = event(
        "user.created",
        clerk_user("user_a", None, None, 100),
        Some(HOME),
    );
    worker::apply::apply(env.db(), &home).await.expect("pins");
    let batch = [
        event(
            "user.created",
            clerk_user("user_b", None, None, 100),
            Some(HOME),
        ),
        event(
            "user.created",
            clerk_user("user_c", None, None, 100),
            Some(OTHER),
        ),
        event("user.created", clerk_user("user_d", None, None, 100), None),
    ];
    // The batch as a whole is refused, nothing of it written; one by one, only the foreign one.
    assert!(worker::apply::apply_batch(env.db(), &batch).await.is_err());
    assert!(env.user("user_b").await.is_none());
    let alone: Vec<_> = futures_util::future::join_all(
        batch
            .iter()
            .map(|event| worker::apply::apply(env.db(), event)),
    )
    .await;
    assert_eq!(alone[0], Ok(worker::Outcome::Applied));
    assert!(
        matches!(&alone[1], Err(ApplyError::ForeignInstance(reason)) if reason.contains(OTHER)),
        "{:?}",
        alone[1]
    );
    assert_eq!(alone[2], Ok(worker::Outcome::Applied));
    assert!(env.user("user_c").await.is_none());
    assert!(env.user("user_d").await.is_some());
}

/// The dashboard's "Send Example" and hand-made events carry no `instance_id`: applied, and the
/// database stays unpinned, so the first real event or reconcile pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_instance_id_is_applied_and_pins_nothing() {
    let env = TestEnv::new().await;
    let outcome = worker::apply::apply(
        env.db(),
        &event(
            "user.created",
            clerk_user("user_example", None, None, 100),
            None,
        ),
    )
    .await;
    assert_eq!(outcome, Ok(worker::Outcome::Applied));
    assert!(env.user("user_example").await.is_some());
    assert_eq!(pinned(&env).await, None);
    // The first that names one pins it.
    let outcome = worker::apply::apply(
        env.db(),
        &event(
            "user.updated",
            clerk_user("user_example", None, None, 200),
            Some(OTHER),
        ),
    )
    .await;
    assert_eq!(outcome, Ok(worker::Outcome::Applied));
    assert_eq!(pinned(&env).await.as_deref(), Some(OTHER));
}

/// Workers applying the first events at the same moment: one instance wins, every event of it
/// applies, every event of the other is refused, whoever started first. Round after round on
/// the same database, unpinned again each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_events_applied_at_once_pin_one_instance() {
    let env = TestEnv::new().await;
    for round in 0..10 {
        sea_orm::ConnectionTrait::execute_unprepared(env.db(), "DELETE FROM clerk_instance")
            .await
            .expect("unpin");
        let events: Vec<Event> = (0..8)
            .map(|i| {
                let instance = if i % 2 == 0 { HOME } else { OTHER };
                event(
                    "user.created",
                    clerk_user(&format!("user_r{round}_{i}"), None, None, 100),
                    Some(instance),
                )
            })
            .collect();
        let outcomes = futures_util::future::join_all(events.iter().map(|event| {
            let db = env.db().clone();
            let event = event.clone();
            tokio::spawn(async move { worker::apply::apply(&db, &event).await })
        }))
        .await;
        let winner = pinned(&env).await.expect("pinned");
        for (event, outcome) in events.iter().zip(outcomes) {
            let outcome = outcome.expect("task");
            if event.instance_id.as_deref() == Some(winner.as_str()) {
                assert_eq!(outcome, Ok(worker::Outcome::Applied), "round {round}");
            } else {
                assert!(
                    matches!(outcome, Err(ApplyError::ForeignInstance(_))),
                    "round {round}: {outcome:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_show_and_move_say_what_they_do_and_move_only_with_yes() {
    let env = TestEnv::new().await;
    let binary = env!("CARGO_BIN_EXE_worker");
    let run = |args: &[&str]| {
        env.command(binary)
            .args(args)
            .output()
            .expect("run the worker binary")
    };
    let shown = run(&["instance", "show"]);
    assert!(shown.status.success());
    assert!(String::from_utf8_lossy(&shown.stdout).contains("No Clerk instance is pinned yet"));

    worker::apply::apply(
        env.db(),
        &event(
            "user.created",
            clerk_user("user_a", None, None, 100),
            Some(HOME),
        ),
    )
    .await
    .expect("pins");
    let shown = run(&["instance", "show", "--json"]);
    let json: Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(json["id"], HOME);
    assert_eq!(json["pinned_by"], "webhook");

    let asked = run(&["instance", "move", "--to", OTHER]);
    assert!(!asked.status.success(), "nothing without --yes");
    let plan = String::from_utf8_lossy(&asked.stdout);
    assert!(plan.contains(HOME) && plan.contains(OTHER), "{plan}");
    assert!(plan.contains("1 users"), "{plan}");
    assert!(
        String::from_utf8_lossy(&asked.stderr).contains("--yes"),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
    assert_eq!(pinned(&env).await.as_deref(), Some(HOME));

    let not_an_id = run(&["instance", "move", "--to", "user_1", "--yes"]);
    assert!(!not_an_id.status.success());
    assert_eq!(pinned(&env).await.as_deref(), Some(HOME));

    let moved = run(&["instance", "move", "--to", OTHER, "--yes"]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let pin = pinned_instance(env.db()).await.expect("read").expect("pin");
    assert_eq!((pin.id.as_str(), pin.pinned_by.as_str()), (OTHER, "move"));
    // From now on the other instance applies and the first is refused.
    let applied = worker::apply::apply(
        env.db(),
        &event(
            "user.updated",
            clerk_user("user_a", None, None, 200),
            Some(OTHER),
        ),
    )
    .await;
    assert_eq!(applied, Ok(worker::Outcome::Applied));
    let refused = worker::apply::apply(
        env.db(),
        &event(
            "user.updated",
            clerk_user("user_a", None, None, 300),
            Some(HOME),
        ),
    )
    .await;
    assert!(matches!(refused, Err(ApplyError::ForeignInstance(_))));

    // `worker explain` names the pin.
    let explained = run(&["explain", "user_a", "--no-dead-letters"]);
    assert!(explained.status.success());
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        text.contains(&format!("mirrors Clerk instance {OTHER}")),
        "{text}"
    );
}
