//! The Clerk instance the database mirrors: the one-row `clerk_instance` table, read, pinned and
//! compared. [`admit`] runs first in every transaction that applies events: it pins the instance
//! of the first event that names one when none is pinned, and refuses events of any other.
//! Pinning is race-free: two transactions pinning at once meet on the table's one-row primary
//! key, so the second waits for the first and then reads what it pinned. An event without
//! `instance_id` (the dashboard's "Send Example", hand-made events) is admitted and pins
//! nothing. `crate::instance` has the commands, `crate::reconcile` the check of a key.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde::Serialize;
use serde_json::json;

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
pub(crate) async fn pin_if_absent<C: ConnectionTrait>(
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

/// In the transaction that applies a batch, before anything else: `events` gives each event's
/// `instance_id` and source label, in batch order. Pins the instance of the first event that
/// names one when none is pinned, and returns the index and the reason of the first event that
/// names another instance (then nothing of the batch may be written). Events without
/// `instance_id` are always admitted; a batch without any costs no statement.
pub(crate) async fn admit<'a, C: ConnectionTrait>(
    txn: &C,
    events: impl Iterator<Item = (Option<&'a str>, &'a str)> + Clone,
) -> Result<Option<(usize, String)>, DbErr> {
    let Some((first, source)) = events
        .clone()
        .find_map(|(instance, source)| instance.map(|id| (id, source)))
    else {
        return Ok(None);
    };
    let pinned = match pinned_instance(txn).await? {
        Some(pinned) => pinned,
        None => {
            let pinned = pin_if_absent(txn, first, None, source).await?;
            if pinned.id == first {
                tracing::info!(instance = %first, "pinned the Clerk instance of the first event");
            }
            pinned
        }
    };
    Ok(events.enumerate().find_map(|(i, (instance, _))| {
        let instance = instance?;
        (instance != pinned.id).then(|| (i, foreign_reason(instance, &pinned)))
    }))
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
