//! Running the migrations while the service runs: one process at a time, and never a statement
//! that queues for a table lock longer than `WORKER_LOCK_TIMEOUT`.
//!
//! - [`connect`]: the migrating session, with `lock_timeout` set ([`set_lock_timeout`], the same
//!   setting every worker connection has).
//! - [`locked`]: runs some work under the session advisory lock [`MIGRATION_LOCK`], which the
//!   `migrations` binary and the worker's own migration step both take, so the Kubernetes Job and
//!   a starting worker never migrate side by side.
//! - [`up`]: applies pending migrations under the lock; a migration whose statement timed out on
//!   a table lock (SQLSTATE 55P03) is tried again after a pause, so a DDL statement never holds a
//!   queue of live statements behind it for longer than the lock timeout. Only the statements no
//!   live statement can queue behind (an index built concurrently, a constraint validated) wait
//!   without the timeout.
//!
//! The rules each migration follows are in `docs/upgrades.md`.

use std::time::{Duration, Instant};

use sea_orm_migration::SchemaManager;
use sea_orm_migration::sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, RuntimeErr,
    Statement,
};

use crate::{Migrator, MigratorTrait};

/// The session advisory lock held while migrations run. Any number fixed for the project
/// ("clerksyn"); the same since the worker first took it.
pub const MIGRATION_LOCK: i64 = 0x636c_6572_6b73_796e;

/// How often a process waiting for [`MIGRATION_LOCK`] asks again. Polling with
/// `pg_try_advisory_lock` rather than waiting in `pg_advisory_lock` keeps the waiting session
/// outside any statement: a `CREATE INDEX CONCURRENTLY` of the holder waits for every older
/// statement to end, and would otherwise wait for the waiter that waits for it.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// How often the wait for [`MIGRATION_LOCK`] is logged.
const WAIT_LOGGED_EVERY: Duration = Duration::from_secs(15);

/// Attempts of [`up`] while its statements time out on table locks, and the pause before the
/// first retry (doubled each time, at most [`LOCK_TIMEOUT_PAUSE_MAX`]).
const LOCK_TIMEOUT_ATTEMPTS: u32 = 10;
const LOCK_TIMEOUT_PAUSE: Duration = Duration::from_millis(500);
const LOCK_TIMEOUT_PAUSE_MAX: Duration = Duration::from_secs(15);

/// Sets Postgres's `lock_timeout` on every connection `options` opens, as a startup parameter
/// (as SeaORM sets `statement_timeout`): no connection exists without it.
pub fn set_lock_timeout(options: &mut ConnectOptions, lock_timeout: Duration) {
    let parameter = lock_timeout_parameter(lock_timeout);
    options.map_sqlx_postgres_opts(move |pg| pg.options([parameter.clone()]));
}

/// `lock_timeout` as a startup parameter, for a connection that sets others beside it (SeaORM
/// keeps one function that maps a connection's options: a second call replaces the first).
pub fn lock_timeout_parameter(lock_timeout: Duration) -> (&'static str, String) {
    let milliseconds = lock_timeout.as_millis().max(1);
    ("lock_timeout", format!("{milliseconds}ms"))
}

/// The migrating session: one connection, with `lock_timeout`. It is never closed for being idle
/// or old, nor silently replaced when it breaks (no test before use), since [`MIGRATION_LOCK`]
/// belongs to it: a lost session fails the next statement instead of going on unlocked.
pub async fn connect(url: &str, lock_timeout: Duration) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(1)
        // None kept open in the background either: a replacement would not hold the lock.
        .min_connections(0)
        .connect_timeout(Duration::from_secs(5))
        // Statements are not logged one by one; the migrations log their own steps.
        .sqlx_logging(false);
    set_lock_timeout(&mut options, lock_timeout);
    options.map_sqlx_postgres_pool_opts(|pool| {
        pool.max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
    });
    Database::connect(options).await
}

/// Runs `work` holding [`MIGRATION_LOCK`] on `db`'s session (`db` must be a pool of one, as
/// [`connect`] gives), waiting for another holder to finish first.
pub async fn locked<T>(
    db: &DatabaseConnection,
    work: impl AsyncFnOnce(&DatabaseConnection) -> Result<T, DbErr>,
) -> Result<T, DbErr> {
    lock(db).await?;
    let result = work(db).await;
    let unlocked = db
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .await;
    let value = result?;
    unlocked?;
    Ok(value)
}

/// Applies the pending migrations (`num` of them at most) under [`MIGRATION_LOCK`]. A migration
/// that failed on a lock timeout left nothing behind (in a transaction, it was rolled back;
/// outside one, each step is written to be run again) and is tried again after a pause, up to
/// [`LOCK_TIMEOUT_ATTEMPTS`] times.
pub async fn up(db: &DatabaseConnection, num: Option<u32>) -> Result<(), DbErr> {
    locked(db, async |db| {
        let pending_at_start = pending(db).await?;
        let mut attempt = 0;
        loop {
            let applied = u32::try_from(pending_at_start.saturating_sub(pending(db).await?))
                .unwrap_or(u32::MAX);
            let steps = num.map(|num| num.saturating_sub(applied));
            if steps == Some(0) {
                return Ok(());
            }
            match Migrator::up(db, steps).await {
                Err(error) if is_lock_timeout(&error) && attempt + 1 < LOCK_TIMEOUT_ATTEMPTS => {
                    attempt += 1;
                    let pause = LOCK_TIMEOUT_PAUSE
                        .saturating_mul(1 << (attempt - 1).min(16))
                        .min(LOCK_TIMEOUT_PAUSE_MAX);
                    tracing::warn!(
                        %error,
                        attempt,
                        next_attempt_in = ?pause,
                        "a migration waited longer than WORKER_LOCK_TIMEOUT for a table lock \
                         (held by live traffic or a long transaction); trying it again"
                    );
                    tokio::time::sleep(pause).await;
                }
                result => return result,
            }
        }
    })
    .await
}

/// Whether `error` is Postgres's "lock not available" (SQLSTATE 55P03): a statement waited longer
/// than `lock_timeout`, or a `NOWAIT` lock was taken.
pub fn is_lock_timeout(error: &DbErr) -> bool {
    match error {
        DbErr::Exec(RuntimeErr::SqlxError(error))
        | DbErr::Query(RuntimeErr::SqlxError(error))
        | DbErr::Conn(RuntimeErr::SqlxError(error)) => match error.as_ref() {
            sea_orm_migration::sea_orm::sqlx::Error::Database(error) => {
                error.code().as_deref() == Some("55P03")
            }
            _ => false,
        },
        _ => false,
    }
}

async fn pending(db: &DatabaseConnection) -> Result<usize, DbErr> {
    Ok(Migrator::get_pending_migrations(db).await?.len())
}

/// Takes [`MIGRATION_LOCK`], saying every [`WAIT_LOGGED_EVERY`] that it is waiting.
async fn lock(db: &DatabaseConnection) -> Result<(), DbErr> {
    let started = Instant::now();
    let mut logged: Option<Instant> = None;
    loop {
        let locked: bool = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_try_advisory_lock({MIGRATION_LOCK}) AS locked"),
            ))
            .await?
            .map(|row| row.try_get("", "locked"))
            .transpose()?
            .unwrap_or(false);
        if locked {
            if logged.is_some() {
                tracing::info!(waited = ?started.elapsed(), "took the migration lock");
            }
            return Ok(());
        }
        if logged.is_none_or(|at| at.elapsed() >= WAIT_LOGGED_EVERY) {
            tracing::info!(
                waited = ?started.elapsed(),
                lock = MIGRATION_LOCK,
                "another process is applying the migrations; waiting for its advisory lock"
            );
            logged = Some(Instant::now());
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Builds index `name` on `table (columns)` with `CREATE INDEX CONCURRENTLY`: reads and writes of
/// the table go on while it builds (it holds SHARE UPDATE EXCLUSIVE, and waits, without a lock
/// timeout, for the transactions that were running when it started). The migration calling it must run outside a
/// transaction (`use_transaction()` is `Some(false)`). It can be run again after an interruption:
/// an index an interrupted build left invalid is dropped (concurrently too) and built again; a
/// valid one is kept. The result is the index a plain `CREATE INDEX` builds.
pub(crate) async fn create_index_concurrently(
    manager: &SchemaManager<'_>,
    name: &str,
    table: &str,
    columns: &[&str],
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let valid: Option<bool> = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            [quoted(name).into()],
        ))
        .await?
        .map(|row| row.try_get("", "indisvalid"))
        .transpose()?;
    if valid == Some(false) {
        tracing::warn!(
            index = name,
            "an earlier build left this index invalid; dropping it to build it again"
        );
        db.execute_unprepared(&format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {}",
            quoted(name)
        ))
        .await?;
    }
    let columns = columns
        .iter()
        .map(|column| quoted(column))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(
        index = name,
        table,
        "building the index concurrently (after the transactions already running end)"
    );
    without_lock_timeout(
        manager,
        &format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({columns})",
            quoted(name),
            quoted(table)
        ),
    )
    .await
}

/// Adds a `CHECK` constraint without a long lock: added `NOT VALID` (ACCESS EXCLUSIVE for a
/// moment, no scan, under the lock timeout), then validated (a full scan under SHARE UPDATE
/// EXCLUSIVE, which lets reads and writes go on, without a lock timeout). A constraint of that name is replaced, so the step can be run again. The
/// result is the constraint a plain `ADD CONSTRAINT … CHECK` gives.
pub(crate) async fn add_check(
    manager: &SchemaManager<'_>,
    table: &str,
    name: &str,
    check: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let (table, name) = (quoted(table), quoted(name));
    db.execute_unprepared(&format!(
        "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}, \
         ADD CONSTRAINT {name} CHECK ({check}) NOT VALID"
    ))
    .await?;
    tracing::info!(%table, constraint = %name, "validating the constraint");
    without_lock_timeout(
        manager,
        &format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name}"),
    )
    .await
}

/// Runs `sql`, a statement that takes no lock stronger than SHARE UPDATE EXCLUSIVE, with the
/// session's `lock_timeout` lifted, then restores it (`RESET` returns to the value the connection
/// started with). No read or write queues behind such a statement while it waits, so it may wait
/// as long as it must: a `CREATE INDEX CONCURRENTLY` waits for every transaction older than its
/// build (a report, a `pg_dump`), and under the timeout it would fail, leave an invalid index, and
/// start the build over on each retry. On the migrating session (a pool of one connection).
pub(crate) async fn without_lock_timeout(
    manager: &SchemaManager<'_>,
    sql: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    db.execute_unprepared("SET lock_timeout = 0").await?;
    let result = db.execute_unprepared(sql).await;
    let reset = db.execute_unprepared("RESET lock_timeout").await;
    result?;
    reset?;
    Ok(())
}

/// A Postgres identifier, quoted.
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}
