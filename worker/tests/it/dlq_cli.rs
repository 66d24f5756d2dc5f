//! `worker dlq …` through the real binary, on dead letters made the way the worker makes them:
//! list them as JSON, replay one by id, refuse a purge without `--yes` and a replay without a
//! selector.

use std::process::Output;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use shared::headers;
use worker::dead_letter::{DeadKind, DeadLetters};

use test_support::events::event_properties;
use test_support::signing::svix_id;
use test_support::{TestEnv, amqp_url, eventually};

const WITHIN: Duration = Duration::from_secs(20);

/// Runs `worker dlq ARGS` against this test's names, with no database configured (the commands
/// need only the broker).
fn dlq(env: &TestEnv, args: &[&str]) -> Output {
    env.command(env!("CARGO_BIN_EXE_worker"))
        .arg("dlq")
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the worker binary")
}

/// `worker dlq list --json`, parsed, once the dead queue holds `expected` ready letters (a command
/// gives back the letters it looked at, and the broker requeues them asynchronously).
async fn list(env: &TestEnv, expected: u32) -> Vec<Value> {
    eventually(WITHIN, "the dead letters back in their queue", || async {
        env.ready(&env.topology.dead_queue).await == expected
    })
    .await;
    let output = dlq(env, &["list", "--json"]);
    assert!(output.status.success(), "list failed: {output:?}");
    let json: Value = serde_json::from_slice(&output.stdout).expect("list --json prints JSON");
    json.as_array().expect("a JSON array").clone()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_commands_list_replay_one_and_refuse_unsafe_requests() {
    let env = TestEnv::new().await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("broker");
    let connection = std::sync::Arc::new(connection);
    let dead = DeadLetters::open(
        connection.clone(),
        &env.topology.dead_queue,
        Duration::from_secs(10),
    )
    .await
    .expect("dead-letter channel");
    let (replayed, kept) = (svix_id(), svix_id());
    let replayed_body = br#"{"type":"user.deleted","object":"event","data":{"deleted":true}}"#;
    dead.publish(
        replayed_body,
        &event_properties(&replayed, "user.deleted"),
        DeadKind::Permanent,
        "user.deleted without data.id",
        1,
    )
    .await
    .expect("first dead letter confirmed");
    dead.publish(
        br#"{"type":"user.updated","object":"event","data":{"id":"user_1"}}"#,
        &event_properties(&kept, "user.updated"),
        DeadKind::Exhausted,
        "user data does not parse: missing field `updated_at`",
        5,
    )
    .await
    .expect("second dead letter confirmed");
    let _ = connection.close(200, "done".into()).await;

    let letters = list(&env, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let by_id = |id: &str| {
        letters
            .iter()
            .find(|letter| letter["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {letters:?}"))
            .clone()
    };
    let first = by_id(&replayed);
    assert_eq!(first["type"], "user.deleted");
    assert_eq!(first["kind"], "permanent");
    assert_eq!(first["reason"], "user.deleted without data.id");
    assert_eq!(first["attempts"], 1);
    assert!(first["failed_at"].is_string(), "{first}");
    let second = by_id(&kept);
    assert_eq!(second["type"], "user.updated");
    assert_eq!(second["kind"], "exhausted");
    assert_eq!(second["attempts"], 5);

    let output = dlq(&env, &["replay", "--id", &replayed]);
    assert!(
        output.status.success(),
        "replay failed: {}",
        stderr(&output)
    );
    eventually(WITHIN, "the replayed copy in the worker queue", || async {
        env.ready(&env.topology.queue).await == 1
    })
    .await;
    let copy = env
        .broker
        .channel
        .basic_get(
            env.topology.queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
        .expect("the copy")
        .delivery;
    assert_eq!(
        copy.properties.message_id().as_ref().map(|id| id.as_str()),
        Some(replayed.as_str())
    );
    assert_eq!(copy.data, replayed_body);
    let copy_headers = copy.properties.headers().clone().unwrap_or_default();
    assert!(copy_headers.inner().contains_key(headers::SVIX_ID));
    assert!(
        !copy_headers.inner().contains_key(headers::ERROR),
        "the copy starts afresh: {copy_headers:?}"
    );
    let remaining = list(&env, 1).await;
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    assert_eq!(remaining[0]["id"], kept.as_str());

    let output = dlq(&env, &["purge"]);
    assert!(!output.status.success(), "purge without --yes succeeded");
    assert!(stderr(&output).contains("--yes"), "{}", stderr(&output));
    let remaining = list(&env, 1).await;
    assert_eq!(
        remaining.len(),
        1,
        "purge without --yes deleted: {remaining:?}"
    );

    let output = dlq(&env, &["replay"]);
    assert!(
        !output.status.success(),
        "replay without a selector succeeded"
    );
    assert_eq!(
        stderr(&output).trim(),
        "replay needs a selector: --id ID (repeatable), --type TYPE or --all"
    );
    assert_eq!(
        list(&env, 1).await.len(),
        1,
        "nothing replayed without a selector"
    );
    assert_eq!(env.ready(&env.topology.queue).await, 0);
}
