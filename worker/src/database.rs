//! The database pool and the migrations: what the service and the commands connect with.

use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use secrecy::{ExposeSecret, SecretString};

/// A pool of at most `pool_size` connections that connects on first use, every connection with
/// `lock_timeout` (`WORKER_LOCK_TIMEOUT`).
pub(crate) async fn connect_database(
    database_url: &SecretString,
    pool_size: u32,
    lock_timeout: Duration,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let pool = Pool {
        size: pool_size,
        lock_timeout: Some(lock_timeout),
        // No connection at start: the worker waits for the database in `run_until_stopped`.
        lazy: true,
    };
    connect(database_url, pool).await
}

/// How a pool connects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pool {
    /// At most this many connections.
    pub(crate) size: u32,
    /// `lock_timeout` on every connection, when set.
    pub(crate) lock_timeout: Option<Duration>,
    /// Connects on first use; otherwise at once, so an unreachable database is an error here.
    pub(crate) lazy: bool,
}

/// The pool every part of the worker connects with: 5 s to connect and to take a connection.
pub(crate) async fn connect(
    database_url: &SecretString,
    pool: Pool,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = ConnectOptions::new(database_url.expose_secret());
    options
        .max_connections(pool.size)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        // Statements are not logged one by one; errors are logged where they are handled.
        .sqlx_logging(false)
        .connect_lazy(pool.lazy);
    let mut parameters = vec![("plan_cache_mode", PLAN_CACHE_MODE.to_owned())];
    parameters.extend(
        pool.lock_timeout
            .map(migrations::online::lock_timeout_parameter),
    );
    options.map_sqlx_postgres_opts(move |pg| pg.options(parameters.clone()));
    Database::connect(options).await
}

/// Every statement planned for its own parameters and the tables as they are now. The worker's
/// statements are prepared once per connection, and after five runs Postgres may keep one
/// generic plan, made from the statistics of that moment: a worker that started on small tables
/// kept plans that read every row of `users` (measured: 225 ms a statement at 100 000 users
/// against 0.2 ms, which held up every live event during a backfill). Planning each time costs
/// well under a millisecond.
const PLAN_CACHE_MODE: &str = "force_custom_plan";

/// Applies pending migrations as `migrations up` does (the same advisory lock, lock timeout and
/// retries: [`migrations::online::up`]), on a connection of its own.
pub(crate) async fn migrate(
    database_url: &SecretString,
    lock_timeout: Duration,
) -> Result<(), DbErr> {
    let db = migrations::online::connect(database_url.expose_secret(), lock_timeout).await?;
    let result = migrations::online::up(&db, None).await;
    // Closing the only connection releases the lock whatever happened.
    db.close().await?;
    result?;
    tracing::info!("migrations applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait as _, DbBackend, Statement};

    use super::*;

    /// Runs a parameterized statement (prepared, as every statement of the worker is) more
    /// often than Postgres needs to switch to a generic plan, then reads how that connection
    /// planned it.
    #[tokio::test]
    async fn every_connection_plans_each_statement_for_its_parameters_and_keeps_the_lock_timeout() {
        let url = SecretString::from(test_support::database_url());
        let pool = Pool {
            size: 1,
            lock_timeout: Some(Duration::from_millis(1_234)),
            lazy: false,
        };
        let db = connect(&url, pool).await.expect("the database");
        for n in 0..10_i64 {
            db.query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT count(*) FROM pg_class WHERE relpages > $1",
                [n.into()],
            ))
            .await
            .expect("the statement");
        }
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT generic_plans, custom_plans, current_setting('lock_timeout') AS lock_timeout \
                 FROM pg_prepared_statements WHERE statement LIKE '%relpages > $1%'",
            ))
            .await
            .expect("the prepared statements")
            .expect("the statement is prepared on the pool's one connection");
        let generic: i64 = row.try_get("", "generic_plans").expect("generic_plans");
        let custom: i64 = row.try_get("", "custom_plans").expect("custom_plans");
        let lock_timeout: String = row.try_get("", "lock_timeout").expect("lock_timeout");
        assert_eq!(
            (generic, custom),
            (0, 10),
            "planned for each run's parameters"
        );
        assert_eq!(lock_timeout, "1234ms", "both startup parameters are set");
    }
}
