//! `worker explain ID`: why a user, organization or membership looks as it does. The current row,
//! its tombstone, the memberships that hang on it, every event recorded about it in order with
//! its outcome and reason, and the dead letters that concern it.
//!
//! The database part is read first and always printed. The dead letters are read with the `dlq`
//! crate's session (taken unacknowledged, all given back); when the broker cannot be read the
//! command still prints the rest, says so, and exits non-zero, so a script never takes a partial
//! answer for a whole one. `--no-dead-letters` leaves the broker out (and exits 0).

use std::io::{self, Write};
use std::sync::LazyLock;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use serde::Serialize;
use serde_json::Value;

use super::Filter;
use super::list::{Event, utc, write_table};
use crate::apply::SubjectKind;
use crate::storage::processed_events;

/// `worker explain`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// A user, organization or membership id (`user_…`, `org_…`, `orgmem_…`).
    pub id: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not read the dead-letter queue (no broker needed).
    #[arg(long)]
    pub no_dead_letters: bool,
}

/// Why `explain` ended with an error. The database part has been printed before any but
/// `Database`.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("nothing is known about {id}: no row, tombstone, recorded event or dead letter")]
    Unknown { id: String },
    #[error(
        "nothing in the database concerns {id}, and the dead letters could not be read: {reason}"
    )]
    UnknownAndUnread { id: String, reason: String },
    #[error("the dead letters could not be read ({reason}); the rest above is complete")]
    DeadLettersUnread { reason: String },
    #[error("cannot read the database: {0}")]
    Database(#[from] DbErr),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// Everything known about one id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub id: String,
    /// `user`, `organization` or `membership`; null when only dead letters mention the id.
    pub kind: Option<String>,
    /// The current row, every column.
    pub row: Option<Value>,
    /// When it was deleted, if it was.
    pub deleted_at: Option<String>,
    /// For a user, the user's memberships; for an organization, its members; for a membership,
    /// none.
    pub memberships: Vec<Membership>,
    /// Every recorded event about it, oldest first.
    pub history: Vec<Event>,
    /// The dead letters that concern it, in queue order; null when they were not read.
    pub dead_letters: Option<Vec<dlq::Summary>>,
    /// Why the dead letters were not read.
    pub dead_letters_unread: Option<String>,
    /// The Clerk instance the database mirrors (`crate::pin`), if one is pinned.
    pub instance: Option<crate::pin::PinnedInstance>,
}

/// One current membership, as `explain` lists it under its user or organization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Membership {
    pub id: String,
    pub organization_id: String,
    pub user_id: String,
    pub role: String,
    pub updated_at: String,
    /// When it was deleted, for a row kept after its deletion (`WORKER_DELETE_MODE` `soft` or
    /// `anonymize`).
    pub deleted_at: Option<String>,
}

/// Runs `worker explain` with the process's stdout.
pub async fn execute(settings: &shared::Settings, args: ExplainArgs) -> anyhow::Result<()> {
    let db = crate::commands::connect_reader(settings, 2).await?;
    let found = from_database(&db, &args.id).await;
    db.close().await.ok();
    let mut explanation = found?;
    if args.no_dead_letters {
        explanation.dead_letters_unread = Some("not read (--no-dead-letters)".into());
    } else {
        explanation.dead_letters = match read_dead_letters(settings, &args.id).await {
            Ok(letters) => Some(letters),
            Err(reason) => {
                explanation.dead_letters_unread = Some(reason);
                None
            }
        };
    }
    write(
        &mut io::stdout(),
        &explanation,
        args.json,
        !args.no_dead_letters,
    )?;
    Ok(())
}

/// Prints `explanation` (text or JSON) unless nothing at all is known, and says whether the
/// answer is whole: an error when the id is unknown or when the dead letters were wanted and
/// could not be read.
pub fn write(
    out: &mut impl Write,
    explanation: &Explanation,
    json: bool,
    dead_letters_wanted: bool,
) -> Result<(), ExplainError> {
    let in_database = explanation.kind.is_some() || !explanation.history.is_empty();
    let in_dead_letters = explanation
        .dead_letters
        .as_ref()
        .is_some_and(|letters| !letters.is_empty());
    let unread = match &explanation.dead_letters_unread {
        Some(reason) if dead_letters_wanted => Some(reason.clone()),
        _ => None,
    };
    if !in_database && !in_dead_letters {
        let id = explanation.id.clone();
        return Err(match unread {
            Some(reason) => ExplainError::UnknownAndUnread { id, reason },
            None => ExplainError::Unknown { id },
        });
    }
    if json {
        serde_json::to_writer_pretty(&mut *out, explanation).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        write_text(out, explanation)?;
    }
    match unread {
        Some(reason) => Err(ExplainError::DeadLettersUnread { reason }),
        None => Ok(()),
    }
}

/// Reads the row, tombstone, memberships and history of `id`; the dead letters are left unread.
pub async fn from_database(db: &DatabaseConnection, id: &str) -> Result<Explanation, DbErr> {
    let found = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            FIND_BY_ID.as_str(),
            [id.into()],
        ))
        .await?;
    // Clerk's ids carry their kind in their prefix, so at most one kind matches; should several,
    // the first (user, organization, membership) is shown.
    let (kind, row, deleted_at) = match found.first() {
        Some(found) => (
            Some(found.try_get::<String>("", "kind")?),
            found.try_get::<Option<Value>>("", "row")?,
            found
                .try_get::<Option<chrono::DateTime<chrono::FixedOffset>>>("", "deleted_at")?
                .as_ref()
                .map(utc),
        ),
        None => (None, None, None),
    };
    let select = Filter {
        subject: Some(id.to_owned()),
        ..Filter::default()
    }
    .select();
    let history: Vec<Event> = processed_events::all(select, db)
        .await?
        .into_iter()
        .map(Event::from)
        .collect();
    let history = with_trace_ids(db, history).await?;
    // Only the history names the kind of an id whose row and tombstone are gone (pruned or
    // never written).
    let kind = kind.or_else(|| history.iter().find_map(|event| event.subject_kind.clone()));
    let (kind, memberships) = match kind.as_deref().map(SubjectKind::from_label) {
        Some(Some(SubjectKind::User)) => (kind, memberships(db, "user_id", id).await?),
        Some(Some(SubjectKind::Organization)) => {
            (kind, memberships(db, "organization_id", id).await?)
        }
        Some(_) => (kind, Vec::new()),
        // No row, tombstone or history of its own, but maybe a membership's member or
        // organization: a membership event can come before, or without, the user's own events.
        None => {
            let as_member = memberships(db, "user_id", id).await?;
            if !as_member.is_empty() {
                (Some(SubjectKind::User.label().to_owned()), as_member)
            } else {
                let as_organization = memberships(db, "organization_id", id).await?;
                let kind = (!as_organization.is_empty())
                    .then(|| SubjectKind::Organization.label().to_owned());
                (kind, as_organization)
            }
        }
    };
    Ok(Explanation {
        id: id.to_owned(),
        kind,
        row,
        deleted_at,
        memberships,
        history,
        instance: crate::pin::pinned_instance(db).await?,
        dead_letters: None,
        dead_letters_unread: None,
    })
}

/// The history rows with the trace ids recorded for them (`processed_events.trace_id`).
async fn with_trace_ids(
    db: &DatabaseConnection,
    mut history: Vec<Event>,
) -> Result<Vec<Event>, DbErr> {
    let ids: Vec<String> = history.iter().map(|event| event.svix_id.clone()).collect();
    if ids.is_empty() {
        return Ok(history);
    }
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT svix_id, trace_id FROM processed_events \
             WHERE svix_id = ANY($1) AND trace_id IS NOT NULL",
            [ids.into()],
        ))
        .await?;
    let mut traces = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        traces.insert(
            row.try_get::<String>("", "svix_id")?,
            row.try_get::<String>("", "trace_id")?,
        );
    }
    for event in &mut history {
        event.trace_id = traces.remove(&event.svix_id);
    }
    Ok(history)
}

/// For each kind, the row and the tombstone with that id; only kinds with either are returned,
/// in the order of [`SubjectKind::ALL`].
static FIND_BY_ID: LazyLock<String> = LazyLock::new(|| {
    let kinds: Vec<String> = SubjectKind::ALL
        .iter()
        .enumerate()
        .map(|(rank, kind)| {
            format!(
                "SELECT {rank} AS rank, '{label}' AS kind, \
                   (SELECT row_to_json(t) FROM {table} t WHERE t.id = $1) AS row, \
                   (SELECT deleted_at FROM {tombstones} WHERE id = $1) AS deleted_at",
                label = kind.label(),
                table = kind.table(),
                tombstones = kind.tombstone_table(),
            )
        })
        .collect();
    format!(
        "SELECT kind, row, deleted_at FROM ({}) found \
         WHERE row IS NOT NULL OR deleted_at IS NOT NULL ORDER BY rank",
        kinds.join(" UNION ALL ")
    )
});

async fn memberships(
    db: &DatabaseConnection,
    column: &'static str,
    id: &str,
) -> Result<Vec<Membership>, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT id, organization_id, user_id, role, updated_at, deleted_at \
                 FROM organization_memberships WHERE {column} = $1 \
                 ORDER BY organization_id, user_id"
            ),
            [id.into()],
        ))
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Membership {
                id: row.try_get("", "id")?,
                organization_id: row.try_get("", "organization_id")?,
                user_id: row.try_get("", "user_id")?,
                role: row.try_get("", "role")?,
                updated_at: utc(&row.try_get("", "updated_at")?),
                deleted_at: row
                    .try_get::<Option<chrono::DateTime<chrono::FixedOffset>>>("", "deleted_at")?
                    .as_ref()
                    .map(utc),
            })
        })
        .collect()
}

/// The dead letters that concern `id`, read through the broker the settings name; the error is
/// the line to print.
async fn read_dead_letters(
    settings: &shared::Settings,
    id: &str,
) -> Result<Vec<dlq::Summary>, String> {
    let topology = settings.topology().map_err(|error| error.to_string())?;
    let nodes = settings.amqp_nodes().map_err(|error| error.to_string())?;
    let broker = dlq::Broker::connect(&nodes, topology)
        .await
        .map_err(|error| error.to_string())?;
    let letters = dead_letters_about(&broker, id).await;
    broker.close().await;
    letters.map_err(|error| error.to_string())
}

/// The dead letters that concern `id`, in queue order. Every letter goes back to the queue.
pub async fn dead_letters_about(
    broker: &dlq::Broker,
    id: &str,
) -> Result<Vec<dlq::Summary>, dlq::DlqError> {
    dlq::inspect(broker, |letter| {
        concerns(letter.body(), id).then(|| letter.summary().clone())
    })
    .await
}

/// Whether an event body is about `id`: its `data.id`, or for a membership the user
/// (`data.public_user_data.user_id`) or organization (`data.organization.id`) it joins.
pub fn concerns(body: &[u8], id: &str) -> bool {
    let Ok(event) = shared::json::from_slice::<Value>(body) else {
        return false;
    };
    let data = &event["data"];
    [
        &data["id"],
        &data["public_user_data"]["user_id"],
        &data["organization"]["id"],
    ]
    .into_iter()
    .any(|candidate| candidate.as_str() == Some(id))
}

/// The explanation as text: a heading a part, tables for the lists.
pub fn write_text(out: &mut impl Write, explanation: &Explanation) -> io::Result<()> {
    let kind = explanation.kind.as_deref().unwrap_or("unknown kind");
    writeln!(out, "{kind} {}", explanation.id)?;
    writeln!(out, "{}", crate::pin::show(explanation.instance.as_ref()))?;

    writeln!(out)?;
    match &explanation.row {
        Some(Value::Object(columns)) => {
            match columns.get("deleted_at").and_then(Value::as_str) {
                Some(at) => writeln!(
                    out,
                    "current row (kept after its deletion at {at}, WORKER_DELETE_MODE soft or \
                     anonymize; not in the live_ views):"
                )?,
                None => writeln!(out, "current row:")?,
            }
            let width = columns.keys().map(String::len).max().unwrap_or(0);
            for (column, value) in columns {
                let shown = match (column.as_str(), value) {
                    // The whole Clerk object: in `--json` only, it would bury the columns.
                    ("clerk_data", Value::Null) => "null".to_string(),
                    ("clerk_data", _) => "(the Clerk object; see --json)".to_string(),
                    (_, Value::String(text)) => text.clone(),
                    (_, other) => other.to_string(),
                };
                writeln!(out, "  {column:width$}  {shown}")?;
            }
        }
        _ => writeln!(out, "current row: none")?,
    }
    match &explanation.deleted_at {
        Some(at) => writeln!(
            out,
            "tombstone: deleted at {at}; later creates and updates are recorded as stale"
        )?,
        None => writeln!(out, "tombstone: none")?,
    }

    if matches!(
        explanation
            .kind
            .as_deref()
            .and_then(SubjectKind::from_label),
        Some(SubjectKind::User | SubjectKind::Organization)
    ) {
        writeln!(out)?;
        writeln!(out, "memberships ({}):", explanation.memberships.len())?;
        if !explanation.memberships.is_empty() {
            let rows: Vec<Vec<String>> = explanation
                .memberships
                .iter()
                .map(|membership| {
                    vec![
                        membership.id.clone(),
                        membership.organization_id.clone(),
                        membership.user_id.clone(),
                        membership.role.clone(),
                        membership.updated_at.clone(),
                        membership.deleted_at.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            shared::table::write(
                out,
                &[
                    "ID",
                    "ORGANIZATION",
                    "USER",
                    "ROLE",
                    "UPDATED AT",
                    "DELETED AT",
                ],
                &rows,
            )?;
        }
    }

    writeln!(out)?;
    let events = match explanation.history.len() {
        1 => "1 event".to_string(),
        count => format!("{count} events"),
    };
    writeln!(out, "history ({events}, oldest first):")?;
    if !explanation.history.is_empty() {
        write_table(out, &explanation.history)?;
        let traced: Vec<&Event> = explanation
            .history
            .iter()
            .filter(|event| event.trace_id.is_some())
            .collect();
        if !traced.is_empty() {
            writeln!(out)?;
            writeln!(out, "traces:")?;
            let rows: Vec<Vec<String>> = traced
                .iter()
                .map(|event| {
                    vec![
                        event.svix_id.clone(),
                        event.trace_id.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            shared::table::write(out, &["SVIX-ID", "TRACE ID"], &rows)?;
        }
    }

    writeln!(out)?;
    match (&explanation.dead_letters, &explanation.dead_letters_unread) {
        (Some(letters), _) => {
            writeln!(out, "dead letters ({}):", letters.len())?;
            if !letters.is_empty() {
                dlq::render::table(out, letters)?;
            }
        }
        (None, Some(reason)) => writeln!(out, "dead letters: {reason}")?,
        (None, None) => writeln!(out, "dead letters: not read")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_concerns_its_subject_and_a_membership_its_user_and_organization() {
        let user = br#"{"type":"user.updated","data":{"id":"user_1"}}"#;
        assert!(concerns(user, "user_1"));
        assert!(!concerns(user, "user_2"));
        let membership = br#"{"type":"organizationMembership.created","data":{
            "id":"orgmem_1","organization":{"id":"org_1"},
            "public_user_data":{"user_id":"user_1"}}}"#;
        for id in ["orgmem_1", "org_1", "user_1"] {
            assert!(concerns(membership, id), "{id}");
        }
        assert!(!concerns(membership, "org_2"));
        assert!(!concerns(b"not json", "user_1"));
        assert!(!concerns(br#"{"data":{"id":7}}"#, "7"));
    }
}
