//! `worker events list`: the history rows a filter selects, newest kept when `--limit` cuts,
//! printed oldest first (newest last, like a log) as a table or as JSON with every column.

use std::io::{self, Write};

use anyhow::Context as _;
use chrono::{SecondsFormat, Utc};
use sea_orm::{ColumnTrait, DatabaseConnection, DbErr, QueryFilter, QuerySelect};
use serde::Serialize;
use serde_json::Value;

use super::Filter;
use crate::storage::processed_events;

/// The event-history commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EventsCommand {
    /// List handled events: applied at, svix-id, type, subject, outcome, source, reason (oldest
    /// first, so the newest is last).
    List(ListArgs),
}

/// `worker events list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: Filter,
    /// Only events with this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<RecordedOutcome>,
    /// Show at most this many events, the newest ones.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    /// Print a JSON array with every column, payload included, instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// An outcome the history records (`duplicate` is never recorded: it is the row already there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordedOutcome {
    Applied,
    Deleted,
    Stale,
    Ignored,
}

impl RecordedOutcome {
    /// The value of the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordedOutcome::Applied => "applied",
            RecordedOutcome::Deleted => "deleted",
            RecordedOutcome::Stale => "stale",
            RecordedOutcome::Ignored => "ignored",
        }
    }
}

/// One history row as the commands print it: every column, times in RFC 3339 (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// When it was applied.
    pub processed_at: String,
    pub svix_id: String,
    pub event_type: String,
    pub subject_kind: Option<String>,
    pub subject_id: Option<String>,
    pub outcome: String,
    pub source: String,
    /// Why a `stale` event wrote nothing.
    pub reason: Option<String>,
    pub svix_timestamp: Option<String>,
    pub received_at: Option<String>,
    /// The body as delivered; null when payloads are not stored.
    pub payload: Option<Value>,
    /// The trace the event was handled in, where one was recorded (read by `explain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl From<processed_events::Model> for Event {
    fn from(row: processed_events::Model) -> Self {
        Self {
            processed_at: utc(&row.processed_at),
            svix_id: row.svix_id,
            event_type: row.event_type,
            subject_kind: row.subject_kind,
            subject_id: row.subject_id,
            outcome: row.outcome,
            source: row.source,
            reason: row.reason,
            svix_timestamp: row.svix_timestamp.as_ref().map(utc),
            received_at: row.received_at.as_ref().map(utc),
            payload: row.payload,
            trace_id: None,
        }
    }
}

/// What `list` found: the events oldest first, and whether the limit left older ones out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub events: Vec<Event>,
    pub cut: bool,
}

/// Runs `worker events list` with the process's stdout and stderr. Bad input is refused before
/// the database is contacted.
pub async fn execute(settings: &shared::Settings, command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::List(args) = command;
    args.filter.check()?;
    let db = crate::commands::connect_reader(settings, 2).await?;
    let result = write_listing(&db, &args, &mut io::stdout(), &mut io::stderr()).await;
    db.close().await.ok();
    result
}

/// Lists what `args` selects into `out` (table or JSON), and says on `notes` when the limit cut
/// the list.
pub async fn write_listing(
    db: &DatabaseConnection,
    args: &ListArgs,
    out: &mut impl Write,
    notes: &mut impl Write,
) -> anyhow::Result<()> {
    args.filter.check()?;
    let listing = list(db, &args.filter, args.outcome, args.limit)
        .await
        .context("cannot read the event history")?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &listing.events)?;
        writeln!(out)?;
    } else {
        write_table(out, &listing.events)?;
    }
    if listing.cut {
        writeln!(
            notes,
            "showing the newest {} matching events; older ones were left out (raise --limit or \
             narrow the filter)",
            args.limit
        )?;
    }
    Ok(())
}

/// The newest `limit` events that `filter` and `outcome` select, returned oldest first.
pub async fn list(
    db: &DatabaseConnection,
    filter: &Filter,
    outcome: Option<RecordedOutcome>,
    limit: u64,
) -> Result<Listing, DbErr> {
    let mut select = filter.select_newest_first();
    if let Some(outcome) = outcome {
        select = select.filter(processed_events::Column::Outcome.eq(outcome.as_str()));
    }
    // One more than shown says whether the limit cut anything.
    let mut rows = processed_events::all(select.limit(limit.saturating_add(1)), db).await?;
    let cut = rows.len() as u64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    rows.reverse();
    Ok(Listing {
        events: rows.into_iter().map(Event::from).collect(),
        cut,
    })
}

/// The events as a table: applied at, svix-id, type, subject, outcome, source, reason (whole).
pub fn write_table(out: &mut impl Write, events: &[Event]) -> io::Result<()> {
    let header = [
        "APPLIED AT",
        "SVIX-ID",
        "TYPE",
        "SUBJECT",
        "OUTCOME",
        "SOURCE",
        "REASON",
    ];
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|event| {
            let subject = match (&event.subject_kind, &event.subject_id) {
                (Some(kind), Some(id)) => format!("{kind} {id}"),
                (None, Some(id)) => id.clone(),
                _ => "-".to_string(),
            };
            vec![
                event.processed_at.clone(),
                event.svix_id.clone(),
                event.event_type.clone(),
                subject,
                event.outcome.clone(),
                event.source.clone(),
                event.reason.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    shared::table::write(out, &header, &rows)
}

/// A stored time in RFC 3339, UTC, to the microsecond Postgres keeps.
pub(crate) fn utc(time: &chrono::DateTime<chrono::FixedOffset>) -> String {
    time.with_timezone(&Utc)
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}
