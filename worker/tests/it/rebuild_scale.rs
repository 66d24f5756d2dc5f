//! `worker rebuild` and `worker replay` at any size: more subjects than one transaction could
//! lock on a Postgres with default settings, beside live events, and under
//! `WORKER_LOCK_TIMEOUT`. The history is written in SQL, as a webhook would have left it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    TransactionTrait,
};
use serde_json::json;
use shared::Roles;
use test_support::events::{clerk_user, envelope};
use test_support::private_postgres::PgCluster;
use test_support::{TestDatabase, eventually};
use worker::apply::{self, DeleteMode, Message, Reading, Source};
use worker::history::{Filter, rebuild, replay};

/// Subjects beyond what one transaction's advisory locks can hold on default settings
/// (`max_locks_per_transaction` 64 × `max_connections` 100: about 6,400 locks, shared).
const MANY: i64 = 30_000;

/// A fresh cluster with default settings and a migrated database on it, and a pool on that
/// database whose connections have `lock_timeout`.
async fn private_database(lock_timeout: Duration) -> (PgCluster, DatabaseConnection) {
    let cluster = PgCluster::start_temporary()
        .await
        .expect("a private Postgres cluster (initdb and pg_ctl)");
    cluster.create_database("rebuild").await.expect("database");
    let db = pool(&cluster.url("rebuild"), lock_timeout).await;
    Migrator::up(&db, None).await.expect("migrations apply");
    (cluster, db)
}

async fn pool(url: &str, lock_timeout: Duration) -> DatabaseConnection {
    let mut options = ConnectOptions::new(url);
    options.sqlx_logging(false).max_connections(4);
    migrations::online::set_lock_timeout(&mut options, lock_timeout);
    Database::connect(options).await.expect("connect")
}

async fn execute(db: &DatabaseConnection, sql: &str) {
    db.execute_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect(sql);
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect(sql)
        .expect("a row")
        .try_get_by_index(0)
        .expect("a count")
}

/// User `i`'s id: `user_000042`.
fn user_id(i: i64) -> String {
    format!("user_{i:06}")
}

/// Writes the history of users `0..users` as webhooks would have left it: `versions` versions
/// each (`updated_at` 1000, 2000, …; first name `v1000`, `v2000`, …), applied in the order of
/// the versions an hour ago, with role `coach` for even users and `admin` for odd ones. The
/// tables stay as they are.
async fn write_history(db: &DatabaseConnection, users: i64, versions: i64) {
    let template = envelope(
        "user.updated",
        clerk_user("user_NNNNNN", Some("uNNNNNN@example.org"), None, 0),
    )
    .to_string();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at, source, \
           subject_kind, subject_id, payload) \
         SELECT 'hist_' || n || '_' || v, 'user.updated', 'applied', \
           now() - interval '1 hour' + (v * $2 + i) * interval '1 microsecond', 'webhook', \
           'user', 'user_' || n, \
           jsonb_set(jsonb_set(jsonb_set(replace($1, 'NNNNNN', n)::jsonb, \
             '{data,updated_at}', to_jsonb(v * 1000)), \
             '{data,first_name}', to_jsonb('v' || v * 1000)), \
             '{data,public_metadata}', \
             jsonb_build_object('role', CASE WHEN i % 2 = 0 THEN 'coach' ELSE 'admin' END)) \
         FROM generate_series(0, $2 - 1) AS i, generate_series(1, $3) AS v, \
           LATERAL (SELECT lpad(i::text, 6, '0') AS n) AS name",
        [template.into(), users.into(), versions.into()],
    ))
    .await
    .expect("write the history");
}

fn roles() -> Roles {
    Roles::new(["coach", "admin", "member"], "member").expect("roles")
}

fn rebuild_options(dry_run: bool, chunk_subjects: u64) -> rebuild::Options {
    rebuild::Options {
        dry_run,
        roles: roles(),
        delete_mode: DeleteMode::Hard,
        progress_bar: false,
        pace: worker::apply::pace::Pace::FULL,
        chunk_subjects,
    }
}

/// The stored users by version: how many hold first name `v{updated_at}` and the email and role
/// their history gives them.
async fn users_as_derived(db: &DatabaseConnection) -> i64 {
    count(
        db,
        "SELECT count(*) FROM users WHERE first_name = 'v' || \
           (extract(epoch FROM updated_at) * 1000)::bigint \
         AND email = 'u' || substr(id, 6) || '@example.org' \
         AND role = CASE WHEN substr(id, 6)::int % 2 = 0 THEN 'coach' ELSE 'admin' END",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_over_more_subjects_than_one_transaction_can_lock_succeeds_on_default_settings() {
    let (_cluster, db) = private_database(Duration::from_secs(5)).await;
    assert_eq!(
        count(
            &db,
            "SELECT current_setting('max_locks_per_transaction')::bigint"
        )
        .await,
        64
    );
    // What one transaction taking a lock per subject meets on these settings.
    let one_transaction = db.begin().await.expect("begin");
    let error = one_transaction
        .execute_unprepared(&format!(
            "SELECT count(pg_advisory_xact_lock(i)) FROM generate_series(1, {MANY}) AS i"
        ))
        .await
        .expect_err("the lock table is full");
    assert!(error.to_string().contains("shared memory"), "{error}");
    one_transaction.rollback().await.expect("rollback");
    write_history(&db, MANY, 2).await;

    let dry = rebuild::rebuild(&db, &rebuild_options(true, rebuild::CHUNK_SUBJECTS))
        .await
        .expect("dry run");
    assert!(!dry.committed && dry.failures.is_empty(), "{}", dry.text());
    assert_eq!(dry.users.created, MANY as u64);
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 0);

    let summary = rebuild::rebuild(&db, &rebuild_options(false, rebuild::CHUNK_SUBJECTS))
        .await
        .expect("rebuild");

    assert!(summary.committed, "{}", summary.text());
    assert_eq!(summary.history.subjects, MANY as u64);
    assert_eq!(summary.history.applied_again, 2 * MANY as u64);
    assert_eq!(summary.users.created, MANY as u64);
    assert_eq!(
        summary.chunks.committed,
        (MANY as u64).div_ceil(rebuild::CHUNK_SUBJECTS)
    );
    assert_eq!(summary.chunks.retries, 0);
    assert_eq!(users_as_derived(&db).await, MANY);
    assert_eq!(
        count(&db, "SELECT count(*) FROM users WHERE first_name = 'v2000'").await,
        MANY
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM processed_events").await,
        2 * MANY,
        "a rebuild is not an event"
    );

    // Again, over the rows it wrote: every one derived again, the same.
    let again = rebuild::rebuild(&db, &rebuild_options(false, rebuild::CHUNK_SUBJECTS))
        .await
        .expect("rebuild again");
    assert!(again.committed, "{}", again.text());
    assert_eq!(
        (
            again.users.unchanged,
            again.users.changed,
            again.users.created
        ),
        (MANY as u64, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_more_subjects_than_one_transaction_can_lock_succeeds_on_default_settings() {
    let (_cluster, db) = private_database(Duration::from_secs(5)).await;
    write_history(&db, MANY, 1).await;
    let options = |dry_run| replay::Options {
        filter: Filter {
            since: Some(Utc::now() - chrono::Duration::hours(2)),
            ..Filter::default()
        },
        dry_run,
        reading: Reading {
            roles: roles(),
            store_payloads: false,
            ..Reading::default()
        },
        progress_bar: false,
        pace: worker::apply::pace::Pace::FULL,
    };

    let dry = replay::replay(&db, &options(true)).await.expect("dry run");
    assert_eq!(dry.read, MANY as u64);
    assert_eq!(dry.outcomes.applied, MANY as u64, "{}", dry.text());
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM processed_events").await,
        MANY
    );

    let summary = replay::replay(&db, &options(false)).await.expect("replay");

    assert_eq!(summary.outcomes.applied, MANY as u64, "{}", summary.text());
    assert!(summary.failures.is_empty(), "{}", summary.text());
    assert_eq!(users_as_derived(&db).await, MANY);
}

/// A live `user.updated` of user `id` at version `updated_at`, through the door as the consumer
/// applies it (payload kept).
async fn apply_live(db: &DatabaseConnection, id: &str, updated_at: i64) {
    let index: i64 = id[5..].parse().unwrap_or(0);
    let mut user = clerk_user(
        id,
        Some(&format!("u{}@example.org", &id[5..])),
        Some(if index % 2 == 0 { "coach" } else { "admin" }),
        updated_at,
    );
    user["first_name"] = json!(format!("v{updated_at}"));
    let body = envelope("user.updated", user).to_string();
    let reading = Reading {
        roles: roles(),
        store_payloads: true,
        ..Reading::default()
    };
    let event = reading
        .read(&Message::new(
            body.as_bytes(),
            test_support::signing::svix_id(),
            Source::Webhook,
        ))
        .expect("a user event");
    if let Err(error) = apply::apply_batch(db, std::slice::from_ref(&event)).await {
        panic!("a live event failed beside the rebuild: {error:?}");
    }
}

/// The history rows of the live events (the generated history's svix-ids start with `hist_`).
const LIVE_HISTORY: &str = "SELECT count(*) FROM processed_events WHERE svix_id LIKE 'msg_%'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_during_a_rebuild_keep_flowing_and_the_newest_versions_win() {
    const USERS: i64 = 2_000;
    let database = TestDatabase::migrated().await;
    let db = pool(&database.url, Duration::from_secs(5)).await;
    write_history(&db, USERS, 2).await;
    // The rows as they stand before the rebuild, with the roles of before.
    execute(
        &db,
        "INSERT INTO users (id, email, first_name, role, created_at, updated_at, synced_at) \
         SELECT 'user_' || lpad(i::text, 6, '0'), 'u' || lpad(i::text, 6, '0') || '@example.org', \
           'v2000', 'client', now(), to_timestamp(2), now() \
         FROM generate_series(0, 1999) AS i",
    )
    .await;

    let done = Arc::new(AtomicBool::new(false));
    let live = {
        let db = db.clone();
        let done = done.clone();
        tokio::spawn(async move {
            // user id -> the newest version applied live; newer versions (3000 + k) of users in
            // the rebuilt set, older ones (1500) that must change nothing, and new users.
            let mut newest: HashMap<String, i64> = HashMap::new();
            let mut k = 0i64;
            while !done.load(Ordering::SeqCst) || k < 40 {
                let id = match k % 3 {
                    0 => user_id((k * 7919) % USERS),
                    1 => user_id(USERS + k),
                    _ => user_id((k * 104_729) % USERS),
                };
                let version = if k % 3 == 2 { 1_500 } else { 3_000 + k };
                apply_live(&db, &id, version).await;
                let entry = newest.entry(id).or_insert(0);
                *entry = (*entry).max(version);
                k += 1;
            }
            newest
        })
    };
    // Live events flow before the rebuild starts and while it runs.
    eventually(Duration::from_secs(30), "live events applied", || async {
        count(&db, LIVE_HISTORY).await >= 5
    })
    .await;
    let live_before = count(&db, LIVE_HISTORY).await;

    let summary = rebuild::rebuild(&db, &rebuild_options(false, 50))
        .await
        .expect("rebuild");
    let live_after = count(&db, LIVE_HISTORY).await;
    done.store(true, Ordering::SeqCst);
    let newest = live.await.expect("the live events");

    assert!(summary.committed, "{}", summary.text());
    assert!(summary.failures.is_empty(), "{}", summary.text());
    assert!(
        live_after > live_before,
        "live events were applied while the rebuild ran ({live_before} before, {live_after} after)"
    );
    // Every user holds its newest version: the history's 2000, or a live one, never the older
    // live 1500; with the roles of now.
    let mut expected: HashMap<String, i64> = (0..USERS).map(|i| (user_id(i), 2_000)).collect();
    for (id, version) in newest {
        let entry = expected.entry(id).or_insert(0);
        *entry = (*entry).max(version);
    }
    let stored: HashMap<String, i64> = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, (extract(epoch FROM updated_at) * 1000)::bigint AS version FROM users",
        ))
        .await
        .expect("users")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "id").expect("id"),
                row.try_get("", "version").expect("version"),
            )
        })
        .collect();
    assert_eq!(stored, expected);
    assert_eq!(
        users_as_derived(&db).await,
        expected.len() as i64,
        "every row with its version's first name and the roles of now"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM processed_events WHERE svix_id LIKE 'rebuild_%'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_blocked_past_the_lock_timeout_is_rolled_back_retried_and_counted() {
    let database = TestDatabase::migrated().await;
    let db = pool(&database.url, Duration::from_millis(200)).await;
    write_history(&db, 10, 1).await;
    // A live batch that holds user 3's lock, as one stuck behind a slow statement would.
    let holder = database.db.begin().await.expect("begin");
    holder
        .execute_unprepared(&format!(
            "SELECT pg_advisory_xact_lock(hashtextextended('{}', 0))",
            user_id(3)
        ))
        .await
        .expect("the user's lock");
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

    let rebuild = tokio::spawn({
        let db = db.clone();
        async move { rebuild::rebuild(&db, &rebuild_options(false, 200)).await }
    });
    // The chunk waits on the lock, gives up after 200 ms, and waits again on its next try.
    for what in [
        "the chunk waiting",
        "the chunk rolled back",
        "the chunk waiting again",
    ] {
        let want = i64::from(what != "the chunk rolled back");
        eventually(Duration::from_secs(30), what, || async {
            count(&database.db, waiting).await == want
        })
        .await;
    }
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 0);
    holder.rollback().await.expect("release the lock");

    let summary = rebuild.await.expect("task").expect("rebuild");

    assert!(summary.committed, "{}", summary.text());
    assert!(summary.chunks.retries >= 1, "{:?}", summary.chunks);
    assert_eq!(summary.chunks.lock_timeouts, summary.chunks.retries);
    assert_eq!(summary.users.created, 10);
    assert_eq!(users_as_derived(&db).await, 10);
}
