//! Why a sync has no answer, and when asking again may help.

use std::time::Duration;

use sea_orm::DbErr;

use crate::apply::{self, DbFailure};
use crate::clerk::ClerkError;

/// `Retry-After` of a 503 for an unreachable database or Backend API.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a sync has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SyncError {
    /// The shared rate limit has no room soon enough, or Clerk answered 429.
    #[error("rate limited: {0}")]
    RateLimited(String, Duration),
    /// The Backend API did not answer usefully after a retry (5xx, timeout, connection).
    #[error("Backend API unavailable: {0}")]
    ClerkUnavailable(String),
    /// The database is unreachable or in trouble (a transient failure).
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),
    /// `WORKER_API_TIMEOUT_MS` passed.
    #[error("no answer within the timeout")]
    TimedOut,
    /// Anything else: a refused key, an object that does not apply, a bug.
    #[error("{0}")]
    Failed(String),
}

impl SyncError {
    /// The metrics' `outcome` label.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            SyncError::RateLimited(..) => "rate_limited",
            SyncError::ClerkUnavailable(_) => "clerk_unavailable",
            SyncError::DatabaseUnavailable(_) => "database_unavailable",
            SyncError::TimedOut => "timed_out",
            SyncError::Failed(_) => "failed",
        }
    }

    pub(super) fn from_clerk(error: ClerkError) -> Self {
        match error {
            ClerkError::RateLimited { retry_after, .. } => {
                SyncError::RateLimited(error.to_string(), retry_after)
            }
            ClerkError::GaveUp { .. } => SyncError::ClerkUnavailable(error.to_string()),
            ClerkError::Unauthorized { .. }
            | ClerkError::Rejected { .. }
            | ClerkError::Decode { .. }
            | ClerkError::Request { .. } => SyncError::Failed(error.to_string()),
        }
    }

    pub(super) fn from_db(what: &str, error: &DbErr) -> Self {
        match apply::classify(error) {
            DbFailure::Transient => SyncError::DatabaseUnavailable(format!("{what}: {error}")),
            DbFailure::Race | DbFailure::Message => SyncError::Failed(format!("{what}: {error}")),
        }
    }
}

/// `Retry-After` for an error, in whole seconds (at least 1), or `None` when retrying will not
/// help.
pub(crate) fn retry_after(error: &SyncError) -> Option<u64> {
    let wait = match error {
        SyncError::RateLimited(_, wait) => *wait,
        SyncError::ClerkUnavailable(_) | SyncError::DatabaseUnavailable(_) => {
            UNAVAILABLE_RETRY_AFTER
        }
        SyncError::TimedOut => Duration::from_secs(1),
        SyncError::Failed(_) => return None,
    };
    Some(wait.as_secs_f64().ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_and_absent_for_failures() {
        let limited = SyncError::RateLimited("x".into(), Duration::from_millis(2_300));
        assert_eq!(retry_after(&limited), Some(3));
        assert_eq!(
            retry_after(&SyncError::ClerkUnavailable("x".into())),
            Some(5)
        );
        assert_eq!(retry_after(&SyncError::Failed("x".into())), None);
    }
}
