//! The locks of the door: every transaction first takes a transaction-scoped advisory lock on
//! each id its events name, so events of one subject never interleave, whichever worker, batch
//! or command applies them.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

/// The advisory lock key of an `id` (a column or value of that name in the query).
pub const LOCK_KEY: &str = "hashtextextended(id, 0)";

/// Takes the transaction-scoped advisory lock of every id given (user, organization and
/// membership ids never collide: Clerk prefixes them), in the order of the lock keys.
pub(super) async fn lock_keys<'a, C: ConnectionTrait>(
    db: &C,
    ids: impl Iterator<Item = &'a str>,
) -> Result<(), DbErr> {
    let ids: Vec<String> = ids.map(str::to_owned).collect();
    if ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT pg_advisory_xact_lock(key) FROM \
               (SELECT DISTINCT {LOCK_KEY} AS key FROM unnest($1::text[]) AS ids(id) \
                ORDER BY key) AS keys"
        ),
        [ids.into()],
    ))
    .await?;
    Ok(())
}
