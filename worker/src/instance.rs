//! One Clerk instance per database. The `clerk_instance` table holds the instance the tables
//! mirror, in one row:
//! - it is pinned by the `instance_id` of the first event applied that names one (inside that
//!   event's transaction, see [`admit`]), or by `GET /v1/instance`'s `id` on the first reconcile
//!   (see [`check_reconcile`]), whichever comes first; a database that predates the pin took it
//!   from its event history when the migration ran;
//! - an event naming another instance is never applied: it is dead-lettered as `permanent` with
//!   a reason naming both ids, and counted (`clerk_sync_worker_foreign_instance_events_total`);
//! - an event without `instance_id` (the dashboard's "Send Example", hand-made events) is applied
//!   and pins nothing;
//! - a reconcile whose key belongs to another instance stops before its first listing
//!   ([`WrongInstance`], exit code [`crate::exit::WRONG_INSTANCE`]);
//! - only `worker instance move --to ins_… --yes` changes it.
//!
//! Pinning is race-free: two transactions pinning at once meet on the table's one-row primary
//! key, so the second waits for the first and then reads what it pinned.

use std::io::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use serde::Serialize;
use serde_json::json;

use crate::event::Event;
use crate::reconcile::{ClerkClient, ClerkError};

/// The instance a database mirrors, as `clerk_instance` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinnedInstance {
    /// `ins_…`.
    pub id: String,
    /// `development` or `production`; `None` until a reconcile read it from the Backend API
    /// (events do not say).
    pub environment_type: Option<String>,
    pub pinned_at: DateTime<Utc>,
    /// What pinned it: `webhook` or `replay` (an event's `instance_id`), `reconcile`
    /// (`GET /v1/instance`), `history` (the migration, from the stored events) or `move`.
    pub pinned_by: String,
}

impl PinnedInstance {
    /// `ins_… (production)`, or `ins_… (environment type not known yet)`.
    pub fn described(&self) -> String {
        format!(
            "{} ({})",
            self.id,
            environment(self.environment_type.as_deref())
        )
    }

    /// `ins_… (production, pinned 2026-12-01 10:15:00 UTC by webhook)`.
    pub fn described_with_pin(&self) -> String {
        format!(
            "{} ({}, pinned {} by {})",
            self.id,
            environment(self.environment_type.as_deref()),
            self.pinned_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.pinned_by
        )
    }
}

fn environment(environment_type: Option<&str>) -> &str {
    environment_type.unwrap_or("environment type not known yet")
}

/// The pinned instance, if any (for `worker explain`, `worker doctor`, `/readyz`).
pub async fn pinned_instance<C: ConnectionTrait>(db: &C) -> Result<Option<PinnedInstance>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, environment_type, pinned_at, pinned_by FROM clerk_instance",
        ))
        .await?;
    row.map(|row| {
        Ok(PinnedInstance {
            id: row.try_get("", "id")?,
            environment_type: row.try_get("", "environment_type")?,
            pinned_at: row.try_get("", "pinned_at")?,
            pinned_by: row.try_get("", "pinned_by")?,
        })
    })
    .transpose()
}

/// Pins `id` unless an instance is pinned already, then returns the pinned one. Inside a
/// transaction, a concurrent pin makes this wait for it and return what it pinned.
async fn pin_if_absent<C: ConnectionTrait>(
    db: &C,
    id: &str,
    environment_type: Option<&str>,
    pinned_by: &str,
) -> Result<PinnedInstance, DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO clerk_instance (singleton, id, environment_type, pinned_at, pinned_by) \
         VALUES (true, $1, $2, now(), $3) ON CONFLICT (singleton) DO NOTHING",
        [
            id.into(),
            environment_type.map(str::to_owned).into(),
            pinned_by.into(),
        ],
    ))
    .await?;
    // A statement of its own: under READ COMMITTED it sees the row a concurrent pin committed
    // while the insert waited for it.
    pinned_instance(db)
        .await?
        .ok_or_else(|| DbErr::Custom("clerk_instance is empty right after the pin".into()))
}

/// The reason an event of another instance is dead-lettered with: both ids.
pub fn foreign_reason(event_instance: &str, pinned: &PinnedInstance) -> String {
    format!(
        "the event comes from Clerk instance {event_instance}, but this database mirrors {}; \
         never applied here. If the database is meant to follow {event_instance}, move it with \
         `worker instance move --to {event_instance}`, then replay the dead letter",
        pinned.described_with_pin(),
    )
}

/// In the transaction that applies `events`, before anything else: pins the instance of the
/// first event that names one when none is pinned, and returns the index and the reason of the
/// first event that names another instance (then nothing of the batch may be written). Events
/// without `instance_id` are always admitted; a batch without any costs no statement.
pub(crate) async fn admit<C: ConnectionTrait>(
    txn: &C,
    events: &[Event],
) -> Result<Option<(usize, String)>, DbErr> {
    let Some(first) = events.iter().find(|event| event.instance_id.is_some()) else {
        return Ok(None);
    };
    let pinned = match pinned_instance(txn).await? {
        Some(pinned) => pinned,
        None => {
            let id = first.instance_id.as_deref().unwrap_or_default();
            let pinned = pin_if_absent(txn, id, None, first.source.as_str()).await?;
            if pinned.id == id {
                tracing::info!(instance = %id, svix_id = %first.svix_id, "pinned the Clerk instance of the first event");
            }
            pinned
        }
    };
    Ok(events.iter().enumerate().find_map(|(i, event)| {
        let instance = event.instance_id.as_deref()?;
        (instance != pinned.id).then(|| (i, foreign_reason(instance, &pinned)))
    }))
}

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

/// `worker instance show|move`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InstanceCommand {
    /// Show the Clerk instance this database mirrors.
    Show {
        /// Print one JSON object (`null` when nothing is pinned yet).
        #[arg(long)]
        json: bool,
    },
    /// Make this database mirror another Clerk instance from now on. Says what it will do;
    /// changes nothing without --yes.
    Move {
        /// The instance to follow (`ins_…`, `GET /v1/instance`'s `id`, the `instance_id` of its
        /// webhook events).
        #[arg(long, value_name = "INSTANCE_ID")]
        to: String,
        /// Do it.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs `worker instance …` with the process's stdout.
pub async fn execute(settings: &shared::Settings, command: InstanceCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match command {
        InstanceCommand::Show { json } => {
            let db = crate::startup::connect_reader(settings, 1).await?;
            let pinned = pinned_instance(&db).await;
            db.close().await.ok();
            let pinned = pinned.context("cannot read the pinned Clerk instance")?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&pinned)?)?;
            } else {
                writeln!(out, "{}", show(pinned.as_ref()))?;
            }
            Ok(())
        }
        InstanceCommand::Move { to, yes } => {
            let to = to.trim().to_owned();
            if !to.starts_with("ins_") || to.len() <= "ins_".len() {
                anyhow::bail!(
                    "--to {to:?} is not a Clerk instance id (ins_…): read it from `GET \
                     /v1/instance` or from the instance_id of the instance's webhook events"
                );
            }
            let db = crate::startup::connect_command(settings, 1).await?;
            let result = move_to(&db, &to, yes, &mut out).await;
            db.close().await.ok();
            result
        }
    }
}

/// What `worker instance show` prints.
pub fn show(pinned: Option<&PinnedInstance>) -> String {
    match pinned {
        Some(pinned) => format!(
            "This database mirrors Clerk instance {}, pinned {} by {}.",
            pinned.described(),
            pinned.pinned_at.format("%Y-%m-%d %H:%M:%S UTC"),
            pinned.pinned_by
        ),
        None => "No Clerk instance is pinned yet: the first event that names one, or the first \
                 reconcile, pins it."
            .into(),
    }
}

async fn move_to(
    db: &DatabaseConnection,
    to: &str,
    yes: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let pinned = pinned_instance(db)
        .await
        .context("cannot read the pinned Clerk instance")?;
    if pinned.as_ref().is_some_and(|pinned| pinned.id == to) {
        writeln!(out, "{} Nothing to do.", show(pinned.as_ref()))?;
        return Ok(());
    }
    let rows = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT (SELECT count(*) FROM users) AS users, \
                    (SELECT count(*) FROM organizations) AS organizations, \
                    (SELECT count(*) FROM organization_memberships) AS memberships",
        ))
        .await
        .context("cannot count the stored rows")?;
    let count = |column: &str| -> i64 {
        rows.as_ref()
            .and_then(|row| row.try_get::<i64>("", column).ok())
            .unwrap_or(0)
    };
    let from = pinned.as_ref().map_or_else(
        || "no instance (nothing pinned yet)".to_owned(),
        |p| p.described(),
    );
    writeln!(
        out,
        "This database mirrors {from}. Moving it to {to} means:"
    )?;
    writeln!(
        out,
        "- events of {to} are applied from now on, and events of any other instance are \
         dead-lettered (dead letters of {to} already in the queue can be replayed with `worker \
         dlq replay`);"
    )?;
    writeln!(
        out,
        "- the rows stored now ({} users, {} organizations, {} memberships) stay as they are. \
         The next `worker reconcile` with the key of {to} lists {to}, writes what it holds, and \
         deletes the stored rows it does not hold, within --max-delete: raise it for that run \
         if the old rows are meant to go;",
        count("users"),
        count("organizations"),
        count("memberships")
    )?;
    writeln!(
        out,
        "- workers that are running pick the move up with their next batch; a batch in flight \
         finishes under the old pin."
    )?;
    if !yes {
        anyhow::bail!("nothing was changed. Run it again with --yes to move");
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO clerk_instance (singleton, id, environment_type, pinned_at, pinned_by) \
         VALUES (true, $1, NULL, now(), 'move') \
         ON CONFLICT (singleton) DO UPDATE SET id = excluded.id, environment_type = NULL, \
           pinned_at = excluded.pinned_at, pinned_by = excluded.pinned_by",
        [to.into()],
    ))
    .await
    .context("cannot pin the new instance")?;
    tracing::warn!(from = ?pinned.map(|p| p.id), to, "moved the database to another Clerk instance");
    writeln!(out, "Done: this database now mirrors {to}.")?;
    Ok(())
}

/// The pinned instance as `/readyz` shows it: `{"id", "environment_type"}`, or null.
pub(crate) fn as_json(pinned: Option<&PinnedInstance>) -> serde_json::Value {
    match pinned {
        Some(pinned) => json!({
            "id": pinned.id,
            "environment_type": pinned.environment_type,
            "pinned_at": pinned.pinned_at,
            "pinned_by": pinned.pinned_by,
        }),
        None => serde_json::Value::Null,
    }
}
