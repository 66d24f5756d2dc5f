//! Logging set-up, the same for every binary.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// `LOG_FORMAT`: human-readable lines or one JSON object a line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter, which keeps the
/// database driver's per-statement lines and the AMQP client's chatter out of the info level.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    // `try_init`: a second call (tests start several apps in one process) is harmless.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The filter when `RUST_LOG` is not set: info, without the database driver's per-statement
/// lines and the AMQP client's chatter.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,sea_orm_migration=warn";

/// The filter every binary logs with: `RUST_LOG`, else [`DEFAULT_FILTER`].
pub fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}
