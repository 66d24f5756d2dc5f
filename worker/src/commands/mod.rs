//! What the one-off commands share: their database pools, their summaries (`--json` or a
//! paragraph) and their progress display ([`progress`]).

pub mod progress;

use anyhow::Context as _;
use sea_orm::DatabaseConnection;

use crate::database::{connect_database, migrate};

/// The database pool of a one-off command that writes (`worker reconcile`, `replay`,
/// `rebuild`), with the pending migrations applied first when `WORKER_RUN_MIGRATIONS` allows.
pub(crate) async fn connect_command(
    settings: &shared::Settings,
    pool_size: u32,
) -> anyhow::Result<DatabaseConnection> {
    let db = connect_reader(settings, pool_size).await?;
    if settings.worker_run_migrations {
        migrate(&settings.database_url()?, settings.lock_timeout()?)
            .await
            .context("cannot apply the migrations (DATABASE_URL)")?;
    }
    Ok(db)
}

/// The database pool of a one-off command that only reads (`worker explain`, `events list`):
/// it never applies migrations.
pub(crate) async fn connect_reader(
    settings: &shared::Settings,
    pool_size: u32,
) -> anyhow::Result<DatabaseConnection> {
    let database_url = settings.database_url()?;
    connect_database(&database_url, pool_size, settings.lock_timeout()?)
        .await
        .context("cannot set up the database pool (DATABASE_URL)")
}

/// Prints a command's summary: `json` as one JSON object, else `text`.
pub(crate) fn print<S: serde::Serialize>(
    json: bool,
    summary: &S,
    text: String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        print!("{text}");
    }
    Ok(())
}
