//! The `reconcile_listed` table: the ids a run's listing returned, kept in Postgres rather than
//! in the worker's memory, so a run's memory does not grow with the number of objects, and an
//! interrupted listing keeps what it listed for the run that resumes it.
//!
//! Rows are keyed by the listing (`reconcile_runs.listing_id`: the run's own id, or that of the
//! run it resumed) and a kind: `users`, `organizations`, `memberships` for the listed ids, and
//! `<kind>.gone` for the ids a deletion phase confirmed gone from Clerk (deleted once every
//! candidate was confirmed and the limits allow it). A run that ends (succeeded or failed)
//! removes its rows; an interrupted one keeps them until the run that resumes it ends; any other
//! rows are removed when a run starts (a dry run's that was killed, say).

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use super::Kind;

/// The key of the ids of `kind` confirmed gone from Clerk.
pub(super) fn gone(kind: Kind) -> String {
    format!("{}.gone", kind.name())
}

/// Adds `ids` to the listing's ids of `kind` (an id listed twice is kept once) and, for a run
/// that records itself, moves its resume point to `cursor` of `kind`, in one statement: a resume
/// point never runs ahead of the ids it stands for.
pub(super) async fn record_page<C: ConnectionTrait>(
    db: &C,
    run_id: &str,
    listing_id: &str,
    kind: Kind,
    ids: Vec<String>,
    cursor: Option<&str>,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "WITH listed AS (\
           INSERT INTO reconcile_listed (listing_id, kind, id) \
           SELECT $2, $3, unnest($4::text[]) ON CONFLICT DO NOTHING) \
         UPDATE reconcile_runs SET listing_kind = $3, listing_cursor = $5 WHERE id = $1",
        [
            run_id.into(),
            listing_id.into(),
            kind.name().into(),
            ids.into(),
            cursor.map(str::to_owned).into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Adds `ids` under `key` (e.g. [`gone`]).
pub(super) async fn add<C: ConnectionTrait>(
    db: &C,
    listing_id: &str,
    key: &str,
    ids: Vec<String>,
) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO reconcile_listed (listing_id, kind, id) \
         SELECT $1, $2, unnest($3::text[]) ON CONFLICT DO NOTHING",
        [listing_id.into(), key.into(), ids.into()],
    ))
    .await?;
    Ok(())
}

/// Removes the ids under `key` of a listing.
pub(super) async fn clear<C: ConnectionTrait>(
    db: &C,
    listing_id: &str,
    key: &str,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM reconcile_listed WHERE listing_id = $1 AND kind = $2",
        [listing_id.into(), key.into()],
    ))
    .await?;
    Ok(())
}

/// Removes every row but those of `keep` (the listing a run resumes): rows of ended runs that
/// could not remove theirs, or of a dry run that was killed.
pub(super) async fn keep_only<C: ConnectionTrait>(db: &C, keep: Option<&str>) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM reconcile_listed WHERE listing_id IS DISTINCT FROM $1",
        [keep.map(str::to_owned).into()],
    ))
    .await?;
    Ok(())
}

/// Removes every row of a listing, once its run has ended.
pub(super) async fn forget<C: ConnectionTrait>(db: &C, listing_id: &str) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM reconcile_listed WHERE listing_id = $1",
        [listing_id.into()],
    ))
    .await?;
    Ok(())
}
