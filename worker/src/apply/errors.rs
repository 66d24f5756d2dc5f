//! The error classes of the door: how a database error is handled, and what a source is told.
//! The one place that says which SQLSTATEs are the database's trouble rather than the event's.

use sea_orm::{DbErr, RuntimeErr};

/// Why an event did not apply. The kind decides the retry policy (see the crate README).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Infrastructure trouble (see [`classify`]): retried with back-off for as long as it lasts,
    /// never counted against the message, never dead-lettered.
    #[error("transient: {0}")]
    Transient(String),
    /// Anything else: retried up to `WORKER_MAX_ATTEMPTS` times, then dead-lettered as
    /// `exhausted` with this reason.
    #[error("{0}")]
    Message(String),
    /// The event names another Clerk instance than the one the database mirrors
    /// (`crate::pin`): never applied, dead-lettered at once as `permanent`.
    #[error("{0}")]
    ForeignInstance(String),
}

/// How a database error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFailure {
    /// A named infrastructure condition: waited out, not counted against the message.
    Transient,
    /// A unique violation: another transaction took the same key first; rerunning sees it.
    Race,
    /// Everything else: counted against the message.
    Message,
}

/// Sorts a database error. Only named infrastructure conditions are transient: no connection
/// (refused, lost, a pool timeout, any failure while connecting), and the SQLSTATEs
/// [`transient_sqlstate`] names. 23505 is a race, rerun at once. Every other error (a trigger's
/// `RAISE EXCEPTION`, a dropped column, a value too large for an index, a row that does not
/// decode, …) belongs to the message: an unknown error must end in a dead letter, never in a
/// retry that lasts forever.
pub fn classify(error: &DbErr) -> DbFailure {
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        // Connecting or taking a connection from the pool failed, whatever the reason.
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => DbFailure::Transient,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                Sqlx::Database(db) => match db.code().as_deref() {
                    Some("23505") => DbFailure::Race,
                    Some(code) if transient_sqlstate(code) => DbFailure::Transient,
                    _ => DbFailure::Message,
                },
                // The connection broke under the statement.
                Sqlx::Io(_)
                | Sqlx::Tls(_)
                | Sqlx::Protocol(_)
                | Sqlx::PoolTimedOut
                | Sqlx::PoolClosed
                | Sqlx::WorkerCrashed
                | Sqlx::BeginFailed => DbFailure::Transient,
                _ => DbFailure::Message,
            }
        }
        _ => DbFailure::Message,
    }
}

/// The SQLSTATEs that say the database, not the statement, is in trouble (DESIGN.md's failure
/// rules): classes 08 (connection exception), 53 (insufficient resources) and 57P (server
/// shutting down or starting up), plus 40001 (serialization failure), 40P01 (deadlock) and
/// 55P03 (lock not available).
pub fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03")
}

/// What a source is told of a database error.
pub(super) fn to_apply_error(error: &DbErr) -> ApplyError {
    match classify(error) {
        DbFailure::Transient => ApplyError::Transient(super::lock_timeout::reason(error)),
        DbFailure::Race | DbFailure::Message => {
            ApplyError::Message(format!("database rejected the event: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_sqlstates_are_transient() {
        for code in [
            "08006", "08P01", "53300", "57P01", "57P03", "40001", "40P01", "55P03",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in [
            "23505", "22021", "P0001", "57014", "55000", "28000", "3D000",
        ] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }
}
