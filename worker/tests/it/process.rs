//! The `worker` binary as a process: killed with SIGKILL mid-stream it loses nothing; on SIGTERM
//! it finishes and acknowledges what it holds, then exits 0; it waits for an unreachable database
//! and a SIGTERM meanwhile ends it at once; a bad setting stops it with one line.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::events::clerk_user;
use test_support::http::get;
use test_support::signing::svix_id;
use test_support::{CuttableProxy, TestEnv, amqp_url, eventually};

const WITHIN: Duration = Duration::from_secs(60);

fn spawn_worker(env: &TestEnv, batch_size: usize) -> Child {
    worker_command(env, batch_size)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the worker binary")
}

fn worker_command(env: &TestEnv, batch_size: usize) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command
        .arg("run")
        .env("DATABASE_URL", env.db_url())
        .envs(test_support::services::broker_env(
            &amqp_url(),
            &env.topology,
        ))
        .env("WORKER_LISTEN", "127.0.0.1:0")
        .env("WORKER_BATCH_SIZE", batch_size.to_string())
        .env("WORKER_PREFETCH", "50");
    command
}

async fn publish_users(env: &TestEnv, count: usize) {
    for n in 0..count {
        env.publish_event(
            &svix_id(),
            "user.created",
            clerk_user(
                &format!("user_{n}"),
                Some(&format!("u{n}@example.org")),
                None,
                100,
            ),
        )
        .await;
    }
}

/// Waits for the process to exit on its own, failing after `within`.
async fn wait_for_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the worker") {
            return status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_applies_every_event_exactly_once() {
    const EVENTS: usize = 1500;
    let env = TestEnv::new().await;
    publish_users(&env, EVENTS).await;
    // One event per transaction, so the kill lands while most of the queue is still to do.
    let mut first = spawn_worker(&env, 1);
    eventually(WITHIN, "the first worker well under way", || async {
        env.processed_count().await >= 200
    })
    .await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let at_kill = env.processed_count().await;
    assert!(
        at_kill < EVENTS as u64,
        "the kill came too late to test anything"
    );

    let second = env.start_worker(env.config()).await;
    eventually(WITHIN, "every event processed", || async {
        env.processed_count().await == EVENTS as u64
    })
    .await;
    second.stop().await;
    for n in 0..EVENTS {
        let user = env.user(&format!("user_{n}")).await.expect("user");
        assert_eq!(user.email, Some(format!("u{n}@example.org")));
    }
    assert_eq!(env.ready(&env.topology.queue).await, 0, "all acknowledged");
    assert_eq!(
        env.ready(&env.topology.dead_queue).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_the_worker_acknowledges_what_it_applied_and_exits_zero() {
    const EVENTS: usize = 600;
    let env = TestEnv::new().await;
    publish_users(&env, EVENTS).await;
    let mut child = spawn_worker(&env, 4);
    eventually(WITHIN, "the worker under way", || async {
        env.processed_count().await >= 50
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let exit = wait_for_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");

    // Everything the stopped worker committed was acknowledged: a fresh worker finishing the
    // queue meets no event twice.
    let second = env.start_worker(env.config()).await;
    eventually(WITHIN, "every event processed", || async {
        env.processed_count().await == EVENTS as u64
    })
    .await;
    assert_eq!(
        second.metrics.duplicates.get(),
        0,
        "redelivered after SIGTERM"
    );
    second.stop().await;
    assert_eq!(env.ready(&env.topology.queue).await, 0);
}

#[test]
fn a_missing_database_url_stops_the_worker_with_one_line_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("run")
        .env_remove("DATABASE_URL")
        .env("AMQP_URL", amqp_url())
        .output()
        .expect("run the worker binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        "configuration: DATABASE_URL is required but not set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_svix_id_and_type_and_never_an_email() {
    let env = TestEnv::new().await;
    let mut child = worker_command(&env, 4)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let first = svix_id();
    let second = svix_id();
    // The second event takes the first one's address: a warning about two users, no address.
    env.publish_event(
        &first,
        "user.created",
        clerk_user("user_a", Some("private-address@example.org"), None, 100),
    )
    .await;
    env.publish_event(
        &second,
        "user.created",
        clerk_user(
            "user_b",
            Some("private-address@example.org"),
            Some("owner"),
            200,
        ),
    )
    .await;
    eventually(WITHIN, "both events processed", || async {
        env.processed_count().await == 2
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    let exit = wait_for_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(exit.code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut logs)
        .expect("read logs");
    assert!(
        !logs.contains("private-address"),
        "an email was logged:\n{logs}"
    );
    for id in [&first, &second] {
        let line = logs
            .lines()
            .find(|line| line.contains("event handled") && line.contains(id.as_str()))
            .unwrap_or_else(|| panic!("no line for {id}:\n{logs}"));
        let json: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(line.contains("user.created"), "{json}");
    }
    // The two events may be applied in either order: either way a warning names both users.
    assert!(
        logs.lines().any(|line| line.contains("WARN")
            && line.contains("email")
            && line.contains("user_a")
            && line.contains("user_b")),
        "the contested address is logged:\n{logs}"
    );
}

#[test]
fn a_database_url_that_does_not_parse_stops_the_worker_at_once_with_one_line_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("run")
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:notaport/test",
        )
        .env("AMQP_URL", amqp_url())
        .output()
        .expect("run the worker binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("configuration: DATABASE_URL is malformed"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waiting_for_its_database_logs_each_attempt_and_exits_zero_on_sigterm() {
    let env = TestEnv::new().await;
    let proxy = CuttableProxy::to_database(env.db_url()).await;
    proxy.cut();
    let mut child = worker_command(&env, 4)
        .env("DATABASE_URL", proxy.database_url(env.db_url()))
        .env("WORKER_RETRY_BASE_MS", "20")
        .env("WORKER_RETRY_MAX_MS", "200")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let lines = log_lines(&mut child);

    // The port comes from the start line; then at least three waits, each with its next delay.
    let mut port = None;
    let mut waits = Vec::new();
    let deadline = Instant::now() + WITHIN;
    while port.is_none() || waits.len() < 3 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(remaining)
            .expect("the worker logs its start and its waits");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        match json["message"].as_str() {
            Some("worker started") => port = json["port"].as_u64(),
            Some("waiting for the database") => waits.push(json),
            _ => {}
        }
    }
    for (n, wait) in waits.iter().enumerate() {
        assert_eq!(wait["level"], "WARN", "{wait}");
        assert_eq!(wait["attempt"], n as u64 + 1, "{wait}");
        assert!(wait["next_attempt_in"].is_string(), "{wait}");
        assert!(wait["error"].is_string(), "{wait}");
    }
    let port = u16::try_from(port.expect("port")).expect("a port number");
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/healthz")).await.0,
        200,
        "alive while waiting"
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/readyz")).await.0,
        503,
        "not ready while waiting"
    );

    let sent = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    let exit = wait_for_exit(&mut child, Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "took {:?} to stop",
        sent.elapsed()
    );
}

/// The child's stderr, line by line, read on a thread of its own.
fn log_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_not_waited_for_and_stops_the_worker_with_one_line() {
    let env = TestEnv::new().await;
    // The database exists, but no such role does: Postgres refuses the login (SQLSTATE 28000).
    let (scheme, rest) = env.db_url().split_once("://").expect("a URL");
    let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    let url = format!(
        "{scheme}://no_such_role_{}@{host_and_path}",
        uuid::Uuid::new_v4().simple()
    );
    let mut child = worker_command(&env, 4)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let exit = wait_for_exit(&mut child, Duration::from_secs(20)).await;
    assert!(!exit.success(), "exit status {exit:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(
        stderr.contains("no_such_role"),
        "the cause is given: {stderr}"
    );
}

/// The migrations recorded as applied, oldest first.
async fn applied_migrations(env: &TestEnv) -> Vec<String> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    env.db()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await
        .expect("read seaql_migrations")
        .iter()
        .map(|row| row.try_get("", "version").expect("version"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_other_roles_needs_no_migration_and_reports_users_with_retired_roles() {
    let env = TestEnv::new().await;
    // The seed's roles first.
    let first = env.start_worker(env.config()).await;
    for (user, role) in [
        ("user_admin", Some("admin")),
        ("user_trainer_1", Some("trainer")),
        ("user_trainer_2", Some("trainer")),
        ("user_client", None),
    ] {
        env.publish_event(
            &svix_id(),
            "user.created",
            clerk_user(user, None, role, 100),
        )
        .await;
    }
    eventually(WITHIN, "four users", || async {
        env.processed_count().await == 4
    })
    .await;
    first.stop().await;
    let migrations = applied_migrations(&env).await;

    // Then the binary, with other roles, on the same database.
    let mut child = worker_command(&env, 4)
        .env("WORKER_ROLES", "owner,editor,viewer")
        .env("WORKER_DEFAULT_ROLE", "viewer")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let lines = log_lines(&mut child);
    let deadline = Instant::now() + WITHIN;
    let report = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(remaining)
            .expect("the worker reports the retired roles");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if json["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("users stored with roles"))
        {
            break json;
        }
    };
    assert_eq!(report["level"], "WARN", "{report}");
    assert_eq!(report["roles"], "admin=1, client=1, trainer=2", "{report}");
    assert_eq!(report["users"], 4, "{report}");

    for (user, role, updated_at) in [
        ("user_owner", Some("owner"), 100),
        ("user_editor", Some("editor"), 100),
        // A retired role in a newer version: the configured default, like any unknown role.
        ("user_admin", Some("admin"), 200),
    ] {
        env.publish_event(
            &svix_id(),
            "user.updated",
            clerk_user(user, None, role, updated_at),
        )
        .await;
    }
    eventually(WITHIN, "the new events applied", || async {
        env.processed_count().await == 7
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    let exit = wait_for_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");

    for (user, role) in [
        ("user_owner", "owner"),
        ("user_editor", "editor"),
        ("user_admin", "viewer"),
        // Rows without a new event keep their role: reported, never rewritten.
        ("user_trainer_1", "trainer"),
        ("user_trainer_2", "trainer"),
        ("user_client", "client"),
    ] {
        assert_eq!(env.user(user).await.expect(user).role, role, "{user}");
    }
    assert_eq!(
        applied_migrations(&env).await,
        migrations,
        "no migration ran"
    );
}

#[test]
fn a_default_role_outside_the_roles_stops_the_worker_with_one_line_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("run")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
        .env("AMQP_URL", amqp_url())
        .env("WORKER_ROLES", "owner,editor")
        .env("WORKER_DEFAULT_ROLE", "viewer")
        .output()
        .expect("run the worker binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("configuration: WORKER_DEFAULT_ROLE is malformed"),
        "{stderr}"
    );
}
