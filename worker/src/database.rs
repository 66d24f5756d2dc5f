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
    if let Some(lock_timeout) = pool.lock_timeout {
        migrations::online::set_lock_timeout(&mut options, lock_timeout);
    }
    Database::connect(options).await
}

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
