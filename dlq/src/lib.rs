//! `worker dlq …`: inspect, replay and purge the dead-letter queue.
//!
//! Every command takes dead letters without acknowledging them and acknowledges only what it
//! replayed (after the broker confirmed the copy) or purged; everything else goes back to the
//! queue, also when the command fails or is killed. See [`session`] for the mechanics.

pub mod error;
pub mod letter;
pub mod render;
pub mod replay;
pub mod session;

use std::io::Write;

use clap::Subcommand;
use shared::Settings;

pub use error::DlqError;
pub use letter::{DeadLetter, Summary};
pub use replay::{ReplayArgs, ReplayOptions, ReplaySummary, Selector};
pub use session::{Broker, Session};

/// The dead-letter commands.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters: id, type, kind, reason, attempts, failed at.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole: properties, headers and body.
    Show {
        /// The letter's id (its svix-id).
        id: String,
    },
    /// Republish dead letters to the worker queue, then remove them from the dead-letter queue.
    Replay(ReplayArgs),
    /// Delete every dead letter for good.
    Purge {
        /// Confirm the deletion; without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs one command with the process's stdout and stderr: results on stdout, progress on stderr.
pub async fn execute(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    run(
        settings,
        command,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
    .await?;
    Ok(())
}

/// Runs one command, writing its result to `out` and its progress to `progress`. Bad input is
/// refused before the broker is contacted.
pub async fn run(
    settings: &Settings,
    command: DlqCommand,
    out: &mut impl Write,
    progress: &mut impl Write,
) -> Result<(), DlqError> {
    let topology = settings.topology()?;
    let nodes = settings.amqp_nodes()?;
    let plan = match command {
        DlqCommand::List { json } => Plan::List { json },
        DlqCommand::Show { id } => Plan::Show { id },
        DlqCommand::Replay(args) => Plan::Replay(ReplayOptions::try_from(args)?),
        DlqCommand::Purge { yes: true } => Plan::Purge,
        DlqCommand::Purge { yes: false } => {
            return Err(DlqError::PurgeNotConfirmed {
                queue: topology.dead_queue,
            });
        }
    };

    let broker = Broker::connect(&nodes, topology).await?;
    let result = match plan {
        Plan::List { json } => list(&broker, json, out, progress).await,
        Plan::Show { id } => show(&broker, &id, out).await,
        Plan::Replay(options) => replay_and_report(&broker, &options, out, progress).await,
        Plan::Purge => purge(&broker, out).await,
    };
    broker.close().await;
    result
}

/// A command whose input has been checked.
enum Plan {
    List { json: bool },
    Show { id: String },
    Replay(ReplayOptions),
    Purge,
}

/// Every dead letter's summary, in queue order; the letters all stay in the queue.
pub async fn summaries(broker: &Broker) -> Result<Vec<Summary>, DlqError> {
    inspect(broker, |letter| Some(letter.summary().clone())).await
}

/// Looks at every dead letter present now and keeps what `pick` makes of it, in queue order. The
/// letters are taken unacknowledged and all given back, also when this fails.
pub async fn inspect<T>(
    broker: &Broker,
    mut pick: impl FnMut(&DeadLetter) -> Option<T>,
) -> Result<Vec<T>, DlqError> {
    let mut session = broker.session().await?;
    let mut picked = Vec::new();
    let outcome = async {
        while let Some(letter) = session.fetch().await? {
            picked.extend(pick(&letter));
            session.hold(letter);
        }
        Ok::<_, DlqError>(())
    }
    .await;
    session.release().await;
    outcome?;
    Ok(picked)
}

async fn list(
    broker: &Broker,
    json: bool,
    out: &mut impl Write,
    progress: &mut impl Write,
) -> Result<(), DlqError> {
    let summaries = summaries(broker).await?;
    if json {
        render::json(out, &summaries)?;
    } else {
        render::table(out, &summaries)?;
    }
    writeln!(
        progress,
        "{} dead letter(s) in {}",
        summaries.len(),
        broker.topology().dead_queue
    )?;
    Ok(())
}

/// Prints every letter with that id (a letter dead-lettered twice is there twice).
async fn show(broker: &Broker, id: &str, out: &mut impl Write) -> Result<(), DlqError> {
    let mut session = broker.session().await?;
    let outcome = async {
        let mut found = 0;
        while let Some(letter) = session.fetch().await? {
            if letter.summary().id.as_deref() == Some(id) {
                if found > 0 {
                    writeln!(out, "\n---\n")?;
                }
                render::letter(out, &letter)?;
                found += 1;
            }
            session.hold(letter);
        }
        Ok::<_, DlqError>(found)
    }
    .await;
    let queue = session.dead_queue().to_string();
    session.release().await;
    let found = outcome?;
    if found == 0 {
        return Err(DlqError::NotFound {
            id: id.to_string(),
            queue,
        });
    }
    Ok(())
}

async fn purge(broker: &Broker, out: &mut impl Write) -> Result<(), DlqError> {
    let purged = broker.purge().await?;
    writeln!(
        out,
        "purged {purged} dead letter(s) from {}",
        broker.topology().dead_queue
    )?;
    Ok(())
}

async fn replay_and_report(
    broker: &Broker,
    options: &ReplayOptions,
    out: &mut impl Write,
    progress: &mut impl Write,
) -> Result<(), DlqError> {
    let summary = replay::replay(broker, options, progress).await?;
    writeln!(out, "{summary}")?;
    match summary.first_failure {
        Some(first_reason) if summary.failed > 0 => Err(DlqError::ReplayIncomplete {
            failed: summary.failed,
            queue: broker.topology().dead_queue.clone(),
            first_reason,
        }),
        _ => Ok(()),
    }
}
