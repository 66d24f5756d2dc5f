//! `ingest`: serve the webhook endpoint, or send a signed example event to one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ingest::example::{self, ExampleKind};
use ingest::signature::Verifier;
use ingest::{Application, IngestConfig};
use shared::Settings;

// Every accepted request allocates a few buffers of a few KiB (the body, the AMQP frames, the
// HTTP buffers); glibc's allocator spent about a seventh of the ingest's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Verifies Clerk webhooks and publishes them to RabbitMQ"
)]
struct Cli {
    /// A TOML file with settings (keys are the variable names, lower-cased); the environment
    /// overrides it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve POST /api/webhooks, /healthz, /readyz and /metrics (the default).
    Serve,
    /// Sign an example event with the first CLERK_WEBHOOK_SECRET and POST it.
    SendExample {
        /// The event type to send.
        #[arg(value_enum)]
        event: ExampleKind,
        /// The webhook endpoint.
        #[arg(long, default_value = "http://localhost:3000/api/webhooks")]
        url: String,
        /// The Clerk user id the event is about (default: a new one each time).
        #[arg(long)]
        user_id: Option<String>,
    },
}

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ingest: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let telemetry = shared::telemetry::init(&settings, "clerk-sync-ingest")?;
            let config = IngestConfig::from_settings(&settings)?;
            let application = Application::build(config).await?;
            tracing::info!(
                port = application.port(),
                tracing = telemetry.is_on(),
                "ingest listening"
            );
            let served = application.run_until_stopped().await;
            telemetry.shutdown().await;
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SendExample {
            event,
            url,
            user_id,
        } => {
            // The first secret signs; the ingest accepts any of them.
            let first: Vec<_> = settings.webhook_secrets()?.into_iter().take(1).collect();
            let verifier = Verifier::new(&first)?;
            let user_id = user_id.unwrap_or_else(example::fresh_user_id);
            let signed = example::build(event, &user_id, &verifier)?;
            let (status, body) = example::send(&url, &signed)
                .await
                .context("sending the example")?;
            println!("{status} {body}");
            println!("svix-id {} user {user_id}", signed.id);
            Ok(if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
