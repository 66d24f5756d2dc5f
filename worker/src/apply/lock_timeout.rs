//! Statements that waited longer than `WORKER_LOCK_TIMEOUT` for a lock (a row another session
//! holds, a table a migration is altering, an advisory lock of a rebuild): Postgres cancels them
//! with SQLSTATE 55P03, which [`super::errors::classify`] sorts as transient, so the transaction
//! is rolled back and retried after a pause instead of waiting (and holding its own locks) for
//! as long as the other holds on. Each one is counted in
//! `clerk_sync_worker_lock_timeouts_total`.

use sea_orm::DbErr;

/// How the reason of a transient [`crate::ApplyError`] that is a lock timeout begins: it names
/// the SQLSTATE, which Postgres's (localised) message does not.
const REASON: &str = "lock timeout (SQLSTATE 55P03)";

/// Whether `error` is a statement that waited longer than the lock timeout.
pub(crate) fn is(error: &DbErr) -> bool {
    migrations::online::is_lock_timeout(error)
}

/// The reason of a transient failure: the error, named as a lock timeout when it is one.
pub(crate) fn reason(error: &DbErr) -> String {
    if is(error) {
        format!("{REASON}: {error}")
    } else {
        error.to_string()
    }
}

/// Whether a transient failure's reason (from [`reason`]) is a lock timeout.
pub(crate) fn is_reason(reason: &str) -> bool {
    reason.starts_with(REASON)
}
