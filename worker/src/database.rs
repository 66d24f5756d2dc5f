//! The database pool and the migrations: what the service and the commands connect with.

use std::time::Duration;

use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};
use secrecy::{ExposeSecret, SecretString};

/// Any number fixed for the project: the advisory lock that keeps two workers starting at once
/// from running the migrations side by side.
const MIGRATION_LOCK: i64 = 0x636c_6572_6b73_796e; // "clerksyn"

/// A pool of at most `pool_size` connections that connects on first use.
pub(crate) async fn connect_database(
    database_url: &SecretString,
    pool_size: u32,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = ConnectOptions::new(database_url.expose_secret());
    options
        .max_connections(pool_size)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        // Statements are not logged one by one; errors are logged where they are handled.
        .sqlx_logging(false)
        // No connection at start: the worker waits for the database in `run_until_stopped`.
        .connect_lazy(true);
    Database::connect(options).await
}

/// Applies pending migrations under a session advisory lock, on a connection of its own.
pub(crate) async fn migrate(database_url: &SecretString) -> Result<(), DbErr> {
    let db = connect_database(database_url, 1).await?;
    db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .await?;
    let result = Migrator::up(&db, None).await;
    // Closing the only connection releases the lock whatever happened.
    db.close().await?;
    result?;
    tracing::info!("migrations applied");
    Ok(())
}
