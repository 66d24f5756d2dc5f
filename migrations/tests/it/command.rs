//! The `migrations` binary as an operator runs it: settings from the environment or
//! `--config`, one clear line when one is missing.

use std::process::{Command, Output};

use test_support::TestDatabase;

/// The binary with an empty environment but `PATH` and the given variables.
fn migrations(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_migrations"));
    command.env_clear().args(args);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run the migrations binary")
}

#[test]
fn a_missing_database_url_is_one_line_and_a_failure_exit() {
    let output = migrations(&["up"], &[]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "configuration: DATABASE_URL is required but not set",
        "one line, no panic"
    );
}

#[test]
fn a_malformed_log_format_is_named() {
    let output = migrations(&["status"], &[("LOG_FORMAT", "xml")]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("log_format"), "{stderr}");
}

#[tokio::test]
async fn a_config_file_names_the_database_and_json_logs_are_json() {
    let database = TestDatabase::empty().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("settings.toml");
    std::fs::write(&file, format!("database_url = \"{}\"\n", database.url))
        .expect("write settings");
    let file = file.to_str().expect("utf-8 path");

    let up = migrations(&["--config", file, "up"], &[("LOG_FORMAT", "json")]);
    let status = migrations(&["status", "--config", file], &[]);

    assert!(up.status.success(), "{up:?}");
    let log = String::from_utf8_lossy(&up.stderr);
    assert!(log.lines().count() >= 1, "something logged");
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(status.status.success(), "{status:?}");
    let listed = String::from_utf8_lossy(&status.stdout);
    assert!(
        listed.contains("m20261127_000001_create_users applied"),
        "{listed}"
    );
    assert!(!listed.contains("pending"), "{listed}");
}
