//! `worker dlq …`: inspect and replay the dead-letter queue.

use clap::Subcommand;

/// The dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters.
    List,
}

/// Runs one dead-letter command.
pub async fn execute(_settings: &shared::Settings, _command: DlqCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
