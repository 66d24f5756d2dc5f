//! The worker: consumes Clerk events and applies them to Postgres.

/// Runs the worker until SIGTERM/SIGINT.
pub async fn run(_settings: shared::Settings) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
