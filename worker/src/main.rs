//! `worker`: applies Clerk user events to Postgres (`worker run`, the default), inspects and
//! replays dead letters (`worker dlq …`), converges the tables from Clerk's Backend API
//! (`worker reconcile`), reads the event history (`worker explain ID`, `worker events …`) and
//! applies it again (`worker replay`, `worker rebuild`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::Instrument as _;

/// The service name of the worker's spans unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE: &str = "clerk-sync-worker";

// Reading an event builds and drops a tree of JSON values, and a reconcile does so for every
// listed object: with glibc's allocator, allocating took about half of the worker's CPU time
// (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file with settings; the environment overrides it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume events and apply them to Postgres (the default).
    Run,
    /// Inspect, replay and purge dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Bring the tables to what Clerk's Backend API holds (needs CLERK_SECRET_KEY).
    Reconcile(worker::reconcile::ReconcileArgs),
    /// Apply the stored events of a time window again, recorded with source `replay`.
    Replay(worker::history::replay::ReplayArgs),
    /// Derive the users, organizations and memberships again from the stored events.
    Rebuild(worker::history::rebuild::RebuildArgs),
    /// Explain a user, organization or membership: row, tombstone, history, dead letters.
    Explain(worker::history::explain::ExplainArgs),
    /// Read the event history.
    #[command(subcommand)]
    Events(worker::history::list::EventsCommand),
    /// Check every link (database, broker, queues, Clerk key, reconcile) and say what to do.
    Doctor(worker::doctor::DoctorArgs),
    /// Show the Clerk instance this database mirrors, or move it to another one.
    #[command(subcommand)]
    Instance(worker::instance::InstanceCommand),
}

impl Command {
    /// Whether the command shows a progress bar on this terminal.
    fn shows_bar(&self, settings: &shared::Settings) -> bool {
        use worker::commands::progress::shows_bar;
        match self {
            Command::Reconcile(args) => args.shows_bar(settings),
            Command::Replay(args) => shows_bar(settings, args.flags.json),
            Command::Rebuild(args) => shows_bar(settings, args.flags.json),
            Command::Run
            | Command::Dlq(_)
            | Command::Explain(_)
            | Command::Events(_)
            | Command::Doctor(_)
            | Command::Instance(_) => false,
        }
    }
}

/// The root span of a command's run, with its error when it fails.
macro_rules! run_span {
    ($name:literal) => {
        tracing::info_span!(
            $name,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty
        )
    };
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
    let telemetry = if cli.command.as_ref().is_some_and(|c| c.shows_bar(&settings)) {
        worker::commands::progress::init_telemetry_with_bar(&settings, SERVICE)
    } else {
        shared::telemetry::init(&settings, SERVICE)
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    // Events are walked recursively (read, cloned, compared, written back): the deepest JSON
    // Clerk can send needs more than tokio's 2 MiB (see `shared::json`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(shared::json::THREAD_STACK)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    // One trace per command run (the consumer's traces are per event instead).
    let span = match &command {
        Command::Run => tracing::Span::none(),
        Command::Dlq(dlq::DlqCommand::List { .. }) => run_span!("worker dlq list"),
        Command::Dlq(dlq::DlqCommand::Show { .. }) => run_span!("worker dlq show"),
        Command::Dlq(dlq::DlqCommand::Replay(_)) => run_span!("worker dlq replay"),
        Command::Dlq(dlq::DlqCommand::Purge { .. }) => run_span!("worker dlq purge"),
        Command::Reconcile(_) => run_span!("worker reconcile"),
        Command::Replay(_) => run_span!("worker replay"),
        Command::Rebuild(_) => run_span!("worker rebuild"),
        Command::Explain(_) => run_span!("worker explain"),
        Command::Events(_) => run_span!("worker events"),
        Command::Doctor(_) => run_span!("worker doctor"),
        Command::Instance(_) => run_span!("worker instance"),
    };
    let result = runtime.block_on(
        async {
            let result = match command {
                Command::Run => worker::run(settings).await,
                Command::Dlq(command) => dlq::execute(&settings, command).await,
                Command::Reconcile(args) => worker::reconcile::execute(&settings, args).await,
                Command::Replay(args) => worker::history::replay::execute(&settings, args).await,
                Command::Rebuild(args) => worker::history::rebuild::execute(&settings, args).await,
                Command::Explain(args) => worker::history::explain::execute(&settings, args).await,
                Command::Events(command) => {
                    worker::history::list::execute(&settings, command).await
                }
                Command::Doctor(args) => worker::doctor::execute(&settings, args).await,
                Command::Instance(command) => worker::instance::execute(&settings, command).await,
            };
            if let Err(error) = &result {
                tracing::Span::current()
                    .record("otel.status_code", "ERROR")
                    .record("error", format!("{error:#}"));
            }
            result
        }
        .instrument(span),
    );
    runtime.block_on(telemetry.shutdown());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error:#}");
            worker::exit::code(&error)
        }
    }
}
