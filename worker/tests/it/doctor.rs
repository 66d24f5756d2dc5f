//! `worker doctor` against the real Postgres and RabbitMQ: a healthy setup passes, and each broken
//! link fails with its own line (and the binary exits non-zero).

use std::time::Duration;

use lapin::BasicProperties;
use sea_orm::ConnectionTrait;
use secrecy::SecretString;
use test_support::clerk_api::{ClerkApi, INSTANCE_ID};
use test_support::{TestDatabase, TestEnv, TestTopology, amqp_url};
use worker::doctor::{Report, Verdict, diagnose};

/// How many migrations there are: every one is applied, or pending.
fn migrations() -> usize {
    use migrations::MigratorTrait as _;
    migrations::Migrator::migrations().len()
}

const KEY: &str = "sk_test_doctor_right_key";

/// Settings for the doctor: this test's database, the shared broker and `topology`'s names.
fn settings(db_url: &str, topology: &shared::Topology) -> shared::Settings {
    shared::Settings {
        database_url: Some(SecretString::from(db_url.to_owned())),
        amqp_url: Some(SecretString::from(amqp_url())),
        amqp_exchange: topology.exchange.clone(),
        amqp_queue: topology.queue.clone(),
        amqp_dead_queue: topology.dead_queue.clone(),
        ..shared::Settings::default()
    }
}

/// The verdict and detail of `check`, failing the test when the report lacks it.
fn line(report: &Report, check: &str) -> (Verdict, String) {
    let found = report
        .get(check)
        .unwrap_or_else(|| panic!("no {check} line in {report:#?}"));
    (found.verdict, found.detail.clone())
}

/// Runs the real binary's `worker doctor ARGS` with `settings`' database and topology.
async fn run_binary(env_db: &str, topology: &shared::Topology, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("doctor")
        .args(args)
        .env("DATABASE_URL", env_db)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &topology.exchange)
        .env("AMQP_QUEUE", &topology.queue)
        .env("AMQP_DEAD_QUEUE", &topology.dead_queue)
        .env_remove("CLERK_SECRET_KEY")
        .env_remove("CLERK_WEBHOOK_SECRET")
        .env_remove("WORKER_RECONCILE_INTERVAL")
        .env("RUST_LOG", "error")
        .output()
        .await
        .expect("run the worker binary");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_setup_passes_every_check() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let api = ClerkApi::start(KEY).await;
    let svix_id = test_support::signing::svix_id();
    let user = test_support::events::clerk_user("user_doctor", Some("d@example.org"), None, 1);
    env.publish_event(&svix_id, "user.created", user).await;
    test_support::eventually(Duration::from_secs(10), "the event applied", || async {
        env.processed(&svix_id).await.is_some()
    })
    .await;
    env.db()
        .execute_unprepared(
            "INSERT INTO reconcile_runs (id, trigger, started_at, finished_at, outcome, counts) \
             VALUES ('run_ok', 'command', now() - interval '2 hours', \
                     now() - interval '2 hours' + interval '12 seconds', 'succeeded', '{}')",
        )
        .await
        .expect("insert a reconcile run");

    let mut settings = settings(env.db_url(), &env.topology);
    settings.clerk_secret_key = Some(SecretString::from(KEY.to_owned()));
    settings.clerk_api_url = api.url().to_owned();
    settings.clerk_webhook_secret = Some(SecretString::from(
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_owned(),
    ));
    let report = diagnose(&settings).await;

    for check in [
        "database",
        "broker",
        "topology",
        "consumers",
        "queue",
        "dead letters",
        "last event",
        "webhook secret",
        "clerk key",
        "last reconcile",
    ] {
        let (verdict, detail) = line(&report, check);
        assert_eq!(verdict, Verdict::Ok, "{check}: {detail}");
    }
    assert!(report.ok);
    assert!(
        line(&report, "database")
            .1
            .contains(&format!("all {} migrations applied", migrations()))
    );
    assert!(line(&report, "consumers").1.starts_with("1 on "));
    assert!(
        line(&report, "clerk key")
            .1
            .contains(&format!("instance {INSTANCE_ID} (development)"))
    );
    assert!(
        line(&report, "last reconcile")
            .1
            .contains("succeeded in 12s")
    );
    assert!(line(&report, "last event").1.starts_with("received "));

    // The binary: one line per check, exit 0, and the same as one JSON object.
    let (success, stdout) = run_binary(env.db_url(), &env.topology, &[]).await;
    assert!(success, "{stdout}");
    assert_eq!(stdout.lines().count(), 10, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("ok    consumers")),
        "{stdout}"
    );
    let (success, stdout) = run_binary(env.db_url(), &env.topology, &["--json"]).await;
    assert!(success, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(json["ok"], true);
    assert_eq!(json["checks"][0]["check"], "database");
    assert_eq!(json["checks"][0]["verdict"], "ok");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topology_fails_on_its_line_and_the_binary_exits_non_zero() {
    let database = TestDatabase::migrated().await;
    let topology = TestTopology::names();
    let report = diagnose(&settings(&database.url, &topology)).await;

    assert!(!report.ok);
    let (verdict, detail) = line(&report, "topology");
    assert_eq!(verdict, Verdict::Fail);
    assert_eq!(
        detail,
        format!(
            "missing: exchange {}, queue {}, queue {}",
            topology.exchange, topology.queue, topology.dead_queue
        )
    );
    assert!(
        report
            .get("topology")
            .and_then(|c| c.fix.as_deref())
            .is_some_and(|fix| fix.contains("declares the topology"))
    );
    assert_eq!(line(&report, "consumers").0, Verdict::Skip);
    assert_eq!(line(&report, "database").0, Verdict::Ok);
    assert_eq!(line(&report, "broker").0, Verdict::Ok);

    let (success, stdout) = run_binary(&database.url, &topology, &[]).await;
    assert!(!success, "the binary must exit non-zero: {stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL  topology        missing: exchange")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_fails_and_stays_untouched() {
    let database = TestDatabase::empty().await;
    let topology = TestTopology::declared().await;
    let report = diagnose(&settings(&database.url, &topology)).await;

    assert!(!report.ok);
    let (verdict, detail) = line(&report, "database");
    assert_eq!(verdict, Verdict::Fail);
    assert!(
        detail.ends_with(&format!(
            "{0} of {0} migrations pending, from m20261127_000001_create_users",
            migrations()
        )),
        "{detail}"
    );
    assert_eq!(line(&report, "last event").0, Verdict::Skip);
    assert_eq!(line(&report, "last reconcile").0, Verdict::Skip);
    // Read-only: no migration table was created.
    let tables = database
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public'",
        ))
        .await
        .expect("count tables")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("n");
    assert_eq!(tables, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_or_malformed_clerk_key_fails() {
    let env = TestEnv::new().await;
    let api = ClerkApi::start(KEY).await;
    let mut settings = settings(env.db_url(), &env.topology);
    settings.clerk_api_url = api.url().to_owned();

    settings.clerk_secret_key = Some(SecretString::from("sk_test_wrong".to_owned()));
    let report = diagnose(&settings).await;
    let (verdict, detail) = line(&report, "clerk key");
    assert_eq!(verdict, Verdict::Fail);
    assert!(detail.contains("401"), "{detail}");
    assert!(!report.ok);

    // A publishable key is refused without a call.
    let served = api.served().len();
    settings.clerk_secret_key = Some(SecretString::from("pk_test_abc".to_owned()));
    let report = diagnose(&settings).await;
    let (verdict, detail) = line(&report, "clerk key");
    assert_eq!(verdict, Verdict::Fail);
    assert!(detail.contains("not a secret key"), "{detail}");
    assert_eq!(api.served().len(), served);

    // No key: nothing to check, unless a reconcile is scheduled.
    settings.clerk_secret_key = None;
    assert_eq!(
        line(&diagnose(&settings).await, "clerk key").0,
        Verdict::Skip
    );
    settings.worker_reconcile_interval = Some("24h".into());
    assert_eq!(
        line(&diagnose(&settings).await, "clerk key").0,
        Verdict::Fail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_the_demo_secret_and_a_failed_reconcile_are_reported() {
    let env = TestEnv::new().await;
    let confirmation = env
        .broker
        .publish(
            "",
            &env.topology.dead_queue,
            b"{}",
            BasicProperties::default(),
        )
        .await;
    assert!(confirmation.is_ack());
    env.broker.wait_for_ready(&env.topology.dead_queue, 1).await;
    env.db()
        .execute_unprepared(
            "INSERT INTO reconcile_runs (id, trigger, started_at, finished_at, outcome, counts, \
             error) VALUES ('run_failed', 'schedule', now() - interval '5 minutes', now(), \
             'failed', '{}', 'GET /v1/users: 401 Unauthorized')",
        )
        .await
        .expect("insert a reconcile run");
    let mut settings = settings(env.db_url(), &env.topology);
    settings.clerk_webhook_secret = Some(SecretString::from(
        shared::config::DEMO_WEBHOOK_SECRET.to_owned(),
    ));

    let report = diagnose(&settings).await;
    assert_eq!(
        line(&report, "dead letters"),
        (Verdict::Warn, format!("1 in {}", env.topology.dead_queue))
    );
    assert_eq!(line(&report, "webhook secret").0, Verdict::Warn);
    assert_eq!(line(&report, "consumers").0, Verdict::Fail);
    assert_eq!(line(&report, "last event").0, Verdict::Warn);
    let (verdict, detail) = line(&report, "last reconcile");
    assert_eq!(verdict, Verdict::Fail);
    assert!(detail.starts_with("schedule run started 5m"), "{detail}");
    assert!(
        detail.ends_with("failed in 5m: GET /v1/users: 401 Unauthorized"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_fail_and_what_needs_them_is_skipped() {
    // Ports nothing listens on: bound, then released.
    let closed = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port()
    };
    let settings = shared::Settings {
        database_url: Some(SecretString::from(format!(
            "postgres://postgres@127.0.0.1:{}/nothing",
            closed()
        ))),
        amqp_url: Some(SecretString::from(format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            closed()
        ))),
        ..shared::Settings::default()
    };
    let report = diagnose(&settings).await;
    let (verdict, detail) = line(&report, "database");
    assert_eq!(verdict, Verdict::Fail);
    assert!(
        detail.starts_with("cannot connect to 127.0.0.1:"),
        "{detail}"
    );
    assert!(!detail.contains("postgres@"), "no credentials: {detail}");
    assert_eq!(line(&report, "broker").0, Verdict::Fail);
    for check in [
        "topology",
        "consumers",
        "queue",
        "dead letters",
        "last event",
        "last reconcile",
    ] {
        assert_eq!(line(&report, check).0, Verdict::Skip, "{check}");
    }
}

/// A key of another instance than the one the database mirrors fails the `clerk key` line,
/// which names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_instance_than_the_pinned_one_fails() {
    let database = TestDatabase::migrated().await;
    let topology = TestTopology::declared().await;
    database
        .db
        .execute_unprepared(
            "INSERT INTO clerk_instance (id, environment_type, pinned_at, pinned_by) \
             VALUES ('ins_production_pin', 'production', now(), 'reconcile')",
        )
        .await
        .expect("pin");
    let api = ClerkApi::start(KEY).await;
    let report = diagnose(&shared::Settings {
        clerk_secret_key: Some(KEY.to_owned().into()),
        clerk_api_url: api.url().to_owned(),
        ..settings(&database.url, &topology)
    })
    .await;

    let (verdict, detail) = line(&report, "clerk key");
    assert_eq!(verdict, Verdict::Fail, "{detail}");
    assert!(
        detail.contains(&format!("instance {INSTANCE_ID} (development)")),
        "{detail}"
    );
    assert!(
        detail.contains("mirrors ins_production_pin (production"),
        "{detail}"
    );
    assert!(!report.ok);
}
