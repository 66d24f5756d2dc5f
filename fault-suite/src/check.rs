//! The end of a scenario: wait until the pipeline has caught up, then compare what it holds with
//! the sender's ledger.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, FixedOffset};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};
use shared::Topology;

use crate::history::{ExpectedState, PlannedEvent, UserRow};
use crate::rabbit::RabbitNode;
use crate::support::Deadline;

/// What the pipeline holds compared with the ledger.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Ledger events found in `processed_events`.
    pub applied: u64,
    /// Ledger events missing from `processed_events`.
    pub lost: u64,
    /// Ledger events recorded with an outcome other than `applied` or `stale`.
    pub wrong_outcome: u64,
    /// Users whose row (or tombstone) differs from what the ledger implies.
    pub state_mismatches: u64,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u32,
    /// Messages still ready in the worker queue.
    pub left_in_queue: u32,
    /// A few examples of each problem, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.wrong_outcome == 0
            && self.state_mismatches == 0
            && self.dead_lettered == 0
            && self.left_in_queue == 0
    }
}

/// A connection to the scenario's database that keeps its statements out of the output.
pub async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url.to_owned());
    options.max_connections(2).sqlx_logging(false);
    Database::connect(options)
        .await
        .context("connecting to the scenario's database")
}

/// Polls until every ledger event is in `processed_events` and the worker queue is empty, or
/// until the deadline; the verdict afterwards says what was missing.
pub async fn wait_until_drained(
    rabbit: &RabbitNode,
    topology: &Topology,
    db: &DatabaseConnection,
    ledger: &[Arc<PlannedEvent>],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Deadline::after(timeout);
    loop {
        let processed = processed_events(db).await.unwrap_or_default();
        let all_there = ledger.iter().all(|e| processed.contains_key(&e.svix_id));
        if all_there && rabbit.ready_messages(&topology.queue).await.ok() == Some(0) {
            return Ok(());
        }
        if deadline.passed() {
            // Not an error: the verdict counts what is missing.
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Compares `processed_events`, `users`, `user_tombstones` and both queues with the ledger.
pub async fn verify(
    rabbit: &RabbitNode,
    topology: &Topology,
    db: &DatabaseConnection,
    ledger: &[Arc<PlannedEvent>],
) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    let processed = processed_events(db).await?;
    for event in ledger {
        match processed.get(&event.svix_id).map(String::as_str) {
            Some("applied" | "deleted" | "stale") => verdict.applied += 1,
            Some(other) => {
                verdict.applied += 1;
                verdict.wrong_outcome += 1;
                example(&mut verdict.examples, || {
                    format!("{} {} recorded as {other}", event.event_type, event.svix_id)
                });
            }
            None => {
                verdict.lost += 1;
                example(&mut verdict.examples, || {
                    format!(
                        "lost: {} {} for {}",
                        event.event_type, event.svix_id, event.user_id
                    )
                });
            }
        }
    }

    let expected = ExpectedState::from_events(ledger.iter().map(Arc::as_ref));
    let users = users(db).await?;
    let tombstones = tombstones(db).await?;
    let mut ids: HashSet<&String> = expected.users.keys().collect();
    ids.extend(users.keys());
    for id in ids {
        let (want, have) = (expected.users.get(id), users.get(id));
        if want != have {
            verdict.state_mismatches += 1;
            example(&mut verdict.examples, || {
                format!("user {id}: expected {want:?}, found {have:?}")
            });
        }
    }
    for id in &expected.deleted {
        if !tombstones.contains(id) {
            verdict.state_mismatches += 1;
            example(&mut verdict.examples, || {
                format!("user {id}: deleted but no tombstone")
            });
        }
    }

    verdict.dead_lettered = rabbit.ready_messages(&topology.dead_queue).await?;
    verdict.left_in_queue = rabbit.ready_messages(&topology.queue).await?;
    Ok(verdict)
}

fn example(examples: &mut Vec<String>, line: impl FnOnce() -> String) {
    if examples.len() < 10 {
        examples.push(line());
    }
}

async fn processed_events(db: &DatabaseConnection) -> anyhow::Result<HashMap<String, String>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT svix_id, outcome FROM processed_events",
        ))
        .await
        .context("reading processed_events")?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "svix_id")?, row.try_get("", "outcome")?)))
        .collect()
}

async fn users(db: &DatabaseConnection) -> anyhow::Result<HashMap<String, UserRow>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, email, first_name, last_name, role, phone, created_at, updated_at \
             FROM users",
        ))
        .await
        .context("reading users")?;
    rows.iter()
        .map(|row| {
            let created_at: DateTime<FixedOffset> = row.try_get("", "created_at")?;
            let updated_at: DateTime<FixedOffset> = row.try_get("", "updated_at")?;
            let user = UserRow {
                id: row.try_get("", "id")?,
                email: row.try_get("", "email")?,
                first_name: row.try_get("", "first_name")?,
                last_name: row.try_get("", "last_name")?,
                role: row.try_get("", "role")?,
                phone: row.try_get("", "phone")?,
                created_at_ms: created_at.timestamp_millis(),
                updated_at_ms: updated_at.timestamp_millis(),
            };
            Ok((user.id.clone(), user))
        })
        .collect()
}

async fn tombstones(db: &DatabaseConnection) -> anyhow::Result<HashSet<String>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id FROM user_tombstones",
        ))
        .await
        .context("reading user_tombstones")?;
    rows.iter().map(|row| Ok(row.try_get("", "id")?)).collect()
}
