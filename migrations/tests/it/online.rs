//! `migrations up` while others use the database: one process migrates at a time, and a
//! migration waiting for a table lock gives way to live statements instead of queueing them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use migrations::online::{self, MIGRATION_LOCK};
use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait,
};
use test_support::TestDatabase;

const WITHIN: Duration = Duration::from_secs(60);

/// `migrations up` on `url`, its log on stderr as JSON lines.
fn up(url: &str, lock_timeout: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_migrations"));
    command
        .env_clear()
        .arg("up")
        .env("DATABASE_URL", url)
        .env("WORKER_LOCK_TIMEOUT", lock_timeout)
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// The child's stderr, line by line, read on a thread of its own; the lines are also kept for
/// the end.
fn log_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// Waits (on a blocking thread) for a log line containing `text`; every line read is kept in
/// `seen`.
async fn wait_for_line(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>, text: &str) {
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                let found = line.contains(text);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => tokio::task::yield_now().await,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the process ended without logging {text:?}: {seen:#?}")
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {text:?}: {seen:#?}"
        );
    }
}

/// Waits (on a blocking thread) for the child to end.
async fn finished(mut child: Child) -> ExitStatus {
    tokio::task::spawn_blocking(move || child.wait().expect("wait for migrations up"))
        .await
        .expect("join")
}

async fn table_exists(db: &DatabaseConnection, table: &str) -> bool {
    db.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT to_regclass($1) IS NOT NULL AS present",
        [table.into()],
    ))
    .await
    .expect("to_regclass")
    .expect("a row")
    .try_get("", "present")
    .expect("present")
}

async fn pending(db: &DatabaseConnection) -> usize {
    Migrator::get_pending_migrations(db)
        .await
        .expect("pending migrations")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ups_started_at_once_on_a_new_database_both_succeed() {
    let database = TestDatabase::empty().await;
    // Four rather than two: more chances for the race on the migrations table the lock prevents.
    let outputs: Vec<Output> = (0..4)
        .map(|_| {
            up(&database.url, "5s")
                .spawn()
                .expect("start migrations up")
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|child| child.wait_with_output().expect("migrations up ends"))
        .collect();
    for output in &outputs {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(pending(&database.db).await, 0, "every migration applied");
    let waited = outputs
        .iter()
        .filter(|output| {
            String::from_utf8_lossy(&output.stderr).contains("waiting for its advisory lock")
        })
        .count();
    println!("{waited} of 4 processes waited for the migration lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_waits_for_the_holder_of_the_migration_lock_and_then_applies_everything() {
    let database = TestDatabase::empty().await;
    // The session a starting worker (or another Job) would migrate on, holding the lock.
    let holder = online::connect(&database.url, Duration::from_secs(5))
        .await
        .expect("holder session");
    holder
        .execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .await
        .expect("take the migration lock");

    let mut child = up(&database.url, "5s")
        .spawn()
        .expect("start migrations up");
    let lines = log_lines(&mut child);
    let mut seen = Vec::new();
    wait_for_line(&lines, &mut seen, "waiting for its advisory lock").await;
    assert!(
        !table_exists(&database.db, "seaql_migrations").await,
        "nothing was done while another process held the lock"
    );

    holder
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .await
        .expect("release the migration lock");
    let status = finished(child).await;
    assert!(status.success(), "{seen:#?}");
    assert_eq!(pending(&database.db).await, 0, "every migration applied");
    let _ = holder.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_queued_for_a_table_lock_lets_live_writes_through_and_is_tried_again() {
    let database = TestDatabase::empty().await;
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let history = names
        .iter()
        .position(|name| name == "m20261130_000006_extend_processed_events_into_history")
        .expect("the history migration is listed");
    Migrator::up(&database.db, Some(u32::try_from(history).expect("a few")))
        .await
        .expect("up to the migration before the history one");

    // A long read of the history (a report, a backup) holds ACCESS SHARE until it ends: the
    // migration's ALTER TABLE cannot have its ACCESS EXCLUSIVE meanwhile.
    let reader = database.db.begin().await.expect("begin");
    reader
        .execute_unprepared("SELECT count(*) FROM processed_events")
        .await
        .expect("read the history");

    let mut child = up(&database.url, "300ms")
        .spawn()
        .expect("start migrations up");
    let lines = log_lines(&mut child);
    let mut seen = Vec::new();
    // Queued behind the reader, the ALTER TABLE would make every later statement on the table
    // queue behind it; with a lock timeout it gives way and is tried again later.
    wait_for_line(&lines, &mut seen, "trying it again").await;

    // A live write while the migration keeps trying: it must not wait for the reader.
    let writer = database.db.clone();
    let write = tokio::spawn(async move {
        writer
            .execute_unprepared(
                "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
                 VALUES ('msg_live', 'user.updated', 'applied', now())",
            )
            .await
    });
    tokio::time::timeout(WITHIN, write)
        .await
        .expect("the live write went through while the migration waited")
        .expect("join")
        .expect("insert");

    reader.commit().await.expect("the reader ends");
    let status = finished(child).await;
    while let Ok(line) = lines.try_recv() {
        seen.push(line);
    }
    assert!(status.success(), "{seen:#?}");
    assert_eq!(pending(&database.db).await, 0, "every migration applied");
    let row = database
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT source, outcome FROM processed_events WHERE svix_id = 'msg_live'",
        ))
        .await
        .expect("read the live row")
        .expect("the live row is kept");
    assert_eq!(
        row.try_get::<String>("", "source").expect("source"),
        "webhook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_left_invalid_by_an_interrupted_build_is_built_again() {
    let database = TestDatabase::empty().await;
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let history = names
        .iter()
        .position(|name| name == "m20261130_000006_extend_processed_events_into_history")
        .expect("the history migration is listed");
    Migrator::up(&database.db, Some(u32::try_from(history).expect("a few")))
        .await
        .expect("up to the migration before the history one");
    // What a `CREATE INDEX CONCURRENTLY` that failed half-way leaves: the index, marked invalid
    // (readers never use it, writers keep it up to date).
    database
        .db
        .execute_unprepared(
            "ALTER TABLE processed_events ADD COLUMN subject_id text; \
             CREATE INDEX processed_events_subject_idx ON processed_events (subject_id); \
             UPDATE pg_index SET indisvalid = false \
               WHERE indexrelid = 'processed_events_subject_idx'::regclass",
        )
        .await
        .expect("leave an invalid index behind");

    let db = online::connect(&database.url, Duration::from_secs(5))
        .await
        .expect("connect");
    online::up(&db, None).await.expect("up");
    let restored: String = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SHOW lock_timeout",
        ))
        .await
        .expect("show")
        .expect("a row")
        .try_get("", "lock_timeout")
        .expect("lock_timeout");
    assert_eq!(
        restored, "5s",
        "the builds lifted the session's lock timeout only for themselves"
    );
    let _ = db.close().await;

    let index = database
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT i.indisvalid AS valid, pg_get_indexdef(i.indexrelid) AS definition \
             FROM pg_index i WHERE i.indexrelid = 'processed_events_subject_idx'::regclass",
        ))
        .await
        .expect("pg_index")
        .expect("the index");
    assert!(index.try_get::<bool>("", "valid").expect("valid"));
    let definition: String = index.try_get("", "definition").expect("definition");
    assert!(
        definition.ends_with("(subject_id, processed_at)"),
        "built again with the migration's columns: {definition}"
    );
    let unvalidated: i64 = database
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_constraint WHERE NOT convalidated",
        ))
        .await
        .expect("pg_constraint")
        .expect("a row")
        .try_get("", "n")
        .expect("n");
    assert_eq!(unvalidated, 0, "every constraint validated");
    assert_eq!(pending(&database.db).await, 0, "every migration applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_worker_migrates_under_the_same_lock() {
    let env = test_support::TestEnv {
        broker: test_support::BrokerChannel::open().await,
        database: TestDatabase::empty().await,
        topology: test_support::TestTopology::declared().await,
    };
    let holder = online::connect(env.db_url(), Duration::from_secs(5))
        .await
        .expect("holder session");
    holder
        .execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .await
        .expect("take the migration lock, as a running `migrations up` holds it");

    let worker = env.start_worker(env.config()).await;
    // The worker's migrating session asks for the lock, and is refused, again and again.
    test_support::eventually(
        WITHIN,
        "the worker asking for the migration lock",
        || async {
            let row = env
                .db()
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND query LIKE 'SELECT pg_try_advisory_lock(%'",
                ))
                .await
                .expect("pg_stat_activity")
                .expect("a row");
            row.try_get::<i64>("", "n").expect("n") > 0
        },
    )
    .await;
    assert!(
        !table_exists(env.db(), "seaql_migrations").await,
        "the worker did not migrate while the lock was held"
    );
    assert_ne!(
        worker.get("/readyz").await.0,
        200,
        "not ready before its schema"
    );

    holder
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .await
        .expect("release the migration lock");
    test_support::eventually(WITHIN, "the worker ready", || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        pending(env.db()).await,
        0,
        "the worker applied every migration"
    );
    worker.stop().await;
    let _ = holder.close().await;
}

#[test]
fn a_malformed_lock_timeout_is_named_in_one_line() {
    let output = up("postgres://postgres@127.0.0.1:1/none", "soon")
        .output()
        .expect("run migrations up");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("WORKER_LOCK_TIMEOUT is malformed"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_waits_for_an_older_transaction_past_the_lock_timeout_without_failing() {
    let database = TestDatabase::empty().await;
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let history = names
        .iter()
        .position(|name| name == "m20261130_000006_extend_processed_events_into_history")
        .expect("the history migration is listed");
    Migrator::up(&database.db, Some(u32::try_from(history).expect("a few")))
        .await
        .expect("up to the migration before the history one");

    // A long transaction with a snapshot (a report, a pg_dump) on another table: a concurrent
    // index build waits for it to end, and nothing queues behind that wait.
    let report = database.db.begin().await.expect("begin");
    report
        .execute_unprepared("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("repeatable read");
    report
        .execute_unprepared("SELECT count(*) FROM users")
        .await
        .expect("read");

    let mut child = up(&database.url, "200ms")
        .spawn()
        .expect("start migrations up");
    let lines = log_lines(&mut child);
    let mut seen = Vec::new();
    wait_for_line(&lines, &mut seen, "building the index concurrently").await;
    // Waiting for the report for well past the lock timeout.
    let probe = database.db.clone();
    tokio::time::timeout(WITHIN, async move {
        loop {
            let waiting: i64 = probe
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE query LIKE 'CREATE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock' \
                       AND clock_timestamp() - query_start > interval '1 second'",
                ))
                .await
                .expect("pg_stat_activity")
                .expect("a row")
                .try_get("", "n")
                .expect("n");
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .expect("the index build waiting for the report");

    report.commit().await.expect("the report ends");
    let status = finished(child).await;
    while let Ok(line) = lines.try_recv() {
        seen.push(line);
    }
    assert!(status.success(), "{seen:#?}");
    assert!(
        !seen.iter().any(|line| line.contains("trying it again")),
        "the build waited instead of failing on the lock timeout: {seen:#?}"
    );
    assert_eq!(pending(&database.db).await, 0, "every migration applied");
    let invalid: i64 = database
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid",
        ))
        .await
        .expect("pg_index")
        .expect("a row")
        .try_get("", "n")
        .expect("n");
    assert_eq!(invalid, 0, "no index left invalid");
}
