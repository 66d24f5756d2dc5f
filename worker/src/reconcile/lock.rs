//! The reconcile lock: one run at a time across every worker's schedule and every `worker
//! reconcile` command (dry runs too: they spend the Backend API quota all the same). A
//! transaction-scoped advisory lock, held on a connection of its own for the whole run, so
//! Postgres releases it when the run ends or its process dies.
//!
//! Nobody waits for it: a command that finds it taken does nothing and exits with
//! [`crate::exit::RECONCILE_RUNNING`] (4), naming the run that holds it; a scheduled run that
//! finds it taken leaves the run to its holder and looks again at its next due time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement,
    TransactionTrait,
};
use secrecy::SecretString;

use crate::database::connect_database;

/// Any number fixed for the project: the advisory lock of a reconcile run.
const RECONCILE_LOCK: i64 = 0x636c_6b72_6563_6f6e; // "clkrecon"

/// The lock, held until [`RunLock::release`] (or until dropped, or the process ends).
pub struct RunLock {
    db: DatabaseConnection,
    txn: DatabaseTransaction,
}

impl RunLock {
    /// Takes the lock if no other run holds it; `None` when one does. Never waits. The
    /// connection's statements run under `lock_timeout` (`WORKER_LOCK_TIMEOUT`).
    pub async fn try_take(
        database_url: &SecretString,
        lock_timeout: Duration,
    ) -> Result<Option<Self>, DbErr> {
        let db = connect_database(database_url, 1, lock_timeout).await?;
        let txn = db.begin().await?;
        let locked: bool = txn
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_try_advisory_xact_lock({RECONCILE_LOCK}) AS locked"),
            ))
            .await?
            .map(|row| row.try_get("", "locked"))
            .transpose()?
            .unwrap_or(false);
        if locked {
            Ok(Some(Self { db, txn }))
        } else {
            txn.rollback().await.ok();
            db.close().await.ok();
            Ok(None)
        }
    }

    /// Releases the lock and closes its connection.
    pub async fn release(self) -> Result<(), DbErr> {
        self.txn.rollback().await?;
        self.db.close().await
    }
}

/// `worker reconcile` found the lock taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "another reconcile is running ({holder}); this one did nothing. Two runs never overlap: run \
     it again once that one has finished"
)]
pub struct AnotherRunHoldsTheLock {
    /// What is known of the run holding the lock.
    pub holder: String,
}

impl AnotherRunHoldsTheLock {
    /// Names the latest run `reconcile_runs` records as running (a dry run records none).
    pub async fn describe<C: ConnectionTrait>(db: &C) -> Self {
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT id, trigger, started_at FROM reconcile_runs WHERE outcome = 'running' \
                 ORDER BY started_at DESC LIMIT 1",
            ))
            .await;
        let read = |row: sea_orm::QueryResult| -> Result<String, DbErr> {
            let id: String = row.try_get("", "id")?;
            let trigger: String = row.try_get("", "trigger")?;
            let started: DateTime<Utc> = row.try_get("", "started_at")?;
            Ok(format!(
                "run {id}, started by {trigger} at {}",
                started.format("%Y-%m-%d %H:%M:%S UTC")
            ))
        };
        let holder = match row {
            Ok(Some(row)) => read(row).unwrap_or_else(|_| "a run".into()),
            Ok(None) => "a dry run, which records no run".into(),
            Err(_) => "a run".into(),
        };
        Self { holder }
    }
}
