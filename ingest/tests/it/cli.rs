//! The `ingest` binary's command line: configuration errors at start, and `send-example`
//! against a running ingest.

use std::process::Output;

use test_support::signing::SECRET;
use test_support::{TestIngest, amqp_url};
use tokio::process::Command;

async fn ingest(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .args(args)
        .env_clear()
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), command.output())
        .await
        .expect("the ingest to finish")
        .expect("run the ingest")
}

#[actix_web::test]
async fn a_missing_secret_stops_the_start_with_one_line_naming_it() {
    let output = ingest(&[], &[("AMQP_URL", &amqp_url())]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "ingest: configuration: CLERK_WEBHOOK_SECRET is required but not set"
    );
}

#[actix_web::test]
async fn a_malformed_secret_is_named_and_not_printed() {
    let output = ingest(
        &["serve"],
        &[
            ("AMQP_URL", &amqp_url()),
            ("CLERK_WEBHOOK_SECRET", "whsec_hunter2!!"),
        ],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("ingest: configuration: CLERK_WEBHOOK_SECRET is malformed"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[actix_web::test]
async fn a_missing_amqp_url_stops_the_start_with_one_line_naming_it() {
    let output = ingest(&[], &[("CLERK_WEBHOOK_SECRET", SECRET)]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "ingest: configuration: AMQP_URL is required but not set"
    );
}

#[actix_web::test]
async fn send_example_delivers_each_example_event_to_a_running_ingest() {
    let app = TestIngest::spawn().await;
    let url = app.webhook_url();
    for event in ["user.created", "user.updated", "user.deleted"] {
        let output = ingest(
            &[
                "send-example",
                event,
                "--url",
                &url,
                "--user-id",
                "user_cli",
            ],
            &[("CLERK_WEBHOOK_SECRET", SECRET)],
        )
        .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{event}: {stdout} {:?}",
            output.stderr
        );
        assert!(
            stdout.starts_with(r#"200 {"status":"accepted"}"#),
            "{stdout}"
        );
        let delivery = app.next_message().await;
        assert_eq!(delivery.routing_key.as_str(), event);
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
        assert_eq!(body["data"]["id"], "user_cli");
    }
    app.stop().await;
}

#[actix_web::test]
async fn send_example_exits_non_zero_when_the_ingest_rejects_it() {
    let app = TestIngest::spawn().await;
    let output = ingest(
        &["send-example", "user.created", "--url", &app.webhook_url()],
        &[(
            "CLERK_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )],
    )
    .await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("401 "));
    app.stop().await;
}

#[actix_web::test]
async fn settings_can_come_from_a_toml_file() {
    let app = TestIngest::spawn().await;
    let file = std::env::temp_dir().join(format!("ingest-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, format!("clerk_webhook_secret = \"{SECRET}\"\n")).expect("write");
    let path = file.to_string_lossy().into_owned();

    let output = ingest(
        &[
            "--config",
            &path,
            "send-example",
            "user.created",
            "--url",
            &app.webhook_url(),
        ],
        &[],
    )
    .await;

    std::fs::remove_file(&file).expect("remove");
    assert!(output.status.success(), "{:?}", output);
    assert_eq!(
        app.next_message().await.routing_key.as_str(),
        "user.created"
    );
    app.stop().await;
}
