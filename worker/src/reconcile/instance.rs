//! Before a reconcile's first listing: the key must belong to the Clerk instance the database
//! mirrors (`crate::pin`). A key of another instance stops the run there ([`WrongInstance`],
//! exit code [`crate::exit::WRONG_INSTANCE`]).

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};

use crate::clerk::{ClerkClient, ClerkError};
use crate::pin::{PinnedInstance, pin_if_absent, pinned_instance};

/// A reconcile stopped before its first listing: its key belongs to another instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "CLERK_SECRET_KEY belongs to Clerk instance {key_instance} ({key_environment}), but this \
     database mirrors {}. Nothing was listed, written or deleted. Use the secret key of {}; or, \
     if this database is meant to follow {key_instance} from now on, see `worker instance move \
     --to {key_instance}`",
    .pinned.described_with_pin(), .pinned.id
)]
pub struct WrongInstance {
    pub key_instance: String,
    pub key_environment: String,
    pub pinned: PinnedInstance,
}

/// Why a reconcile may not start.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileRefusal {
    #[error(transparent)]
    WrongInstance(#[from] WrongInstance),
    #[error("cannot tell which Clerk instance the key belongs to: {0}")]
    Clerk(#[from] ClerkError),
    #[error("cannot read or pin the Clerk instance in the database: {0}")]
    Database(#[from] DbErr),
}

/// Before a reconcile's first listing: asks `GET /v1/instance` which instance the key belongs
/// to and compares it with the pinned one. Nothing pinned yet: pins it (a dry run pins
/// nothing). Pinned by an event, which does not say its environment type: records it.
pub async fn check_reconcile(
    db: &DatabaseConnection,
    client: &ClerkClient,
    dry_run: bool,
) -> Result<PinnedInstance, ReconcileRefusal> {
    let key = client.instance().await?;
    let pinned = match pinned_instance(db).await? {
        Some(pinned) => pinned,
        None if dry_run => {
            tracing::info!(instance = %key.id, "no Clerk instance pinned yet; a run that writes pins this one");
            return Ok(PinnedInstance {
                id: key.id,
                environment_type: Some(key.environment_type),
                pinned_at: Utc::now(),
                pinned_by: "reconcile".into(),
            });
        }
        None => {
            let pinned =
                pin_if_absent(db, &key.id, Some(&key.environment_type), "reconcile").await?;
            if pinned.id == key.id {
                tracing::info!(instance = %key.id, environment_type = %key.environment_type, "pinned the Clerk instance of the key");
            }
            pinned
        }
    };
    if pinned.id != key.id {
        return Err(WrongInstance {
            key_instance: key.id,
            key_environment: key.environment_type,
            pinned,
        }
        .into());
    }
    if pinned.environment_type.as_deref() != Some(key.environment_type.as_str()) && !dry_run {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE clerk_instance SET environment_type = $2 WHERE id = $1",
            [key.id.clone().into(), key.environment_type.clone().into()],
        ))
        .await?;
    }
    Ok(PinnedInstance {
        environment_type: Some(key.environment_type),
        ..pinned
    })
}
