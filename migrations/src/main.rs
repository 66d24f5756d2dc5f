//! `migrations [up|down|status|fresh|refresh|reset]`: applies the schema to the database named by
//! `DATABASE_URL`. Settings come the way they come for the other binaries (`--config FILE`, then
//! the environment; `LOG_FORMAT`), and a missing or malformed one stops it with one line.
//!
//! Every command but `status` holds the migration lock the worker's own migration step takes
//! (waiting for another holder first), and every statement runs under `WORKER_LOCK_TIMEOUT`; see
//! [`migrations::online`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use migrations::{Migrator, MigratorTrait, online};
use sea_orm_migration::MigrationStatus;
use sea_orm_migration::sea_orm::{DatabaseConnection, DbErr};
use secrecy::ExposeSecret;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file with settings; the environment overrides it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum Command {
    /// Apply pending migrations (the default); `--num N` applies N of them.
    Up {
        #[arg(long, value_name = "N")]
        num: Option<u32>,
    },
    /// Roll back the last N applied migrations (default 1).
    Down {
        #[arg(long, value_name = "N", default_value_t = 1)]
        num: u32,
    },
    /// List every migration and whether it is applied.
    Status,
    /// Drop every table, then apply every migration.
    Fresh,
    /// Roll back every applied migration, then apply every migration.
    Refresh,
    /// Roll back every applied migration.
    Reset,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match shared::Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let (database_url, lock_timeout) = match (settings.database_url(), settings.lock_timeout()) {
        (Ok(url), Ok(lock_timeout)) => (url, lock_timeout),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match shared::telemetry::init(&settings, "clerk-sync-migrations") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Up { num: None });
    let migrated = runtime.block_on(migrate(database_url.expose_secret(), lock_timeout, command));
    runtime.block_on(telemetry.shutdown());
    match migrated {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(url: &str, lock_timeout: Duration, command: Command) -> anyhow::Result<()> {
    let db = online::connect(url, lock_timeout)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    let result = match command {
        Command::Up { num } => online::up(&db, num).await,
        Command::Down { num } => {
            online::locked(&db, async |db| Migrator::down(db, Some(num)).await).await
        }
        Command::Status => print_status(&db).await,
        Command::Fresh => online::locked(&db, async |db| Migrator::fresh(db).await).await,
        Command::Refresh => online::locked(&db, async |db| Migrator::refresh(db).await).await,
        Command::Reset => online::locked(&db, async |db| Migrator::reset(db).await).await,
    };
    let closed = db.close().await;
    result.context("migrating")?;
    closed.context("closing the database connection")?;
    if !matches!(command, Command::Status) {
        tracing::info!(?command, "done");
    }
    Ok(())
}

/// One line a migration on stdout, `<name> applied|pending`: the library's own status goes to
/// the log, which keeps its chatter out of the info level.
async fn print_status(db: &DatabaseConnection) -> Result<(), DbErr> {
    for migration in Migrator::get_migration_with_status_read_only(db).await? {
        let status = match migration.status() {
            MigrationStatus::Applied => "applied",
            MigrationStatus::Pending => "pending",
        };
        println!("{} {status}", migration.name());
    }
    Ok(())
}
