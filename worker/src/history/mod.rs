//! The event history: `processed_events` keeps every handled event (svix-id, type, subject,
//! payload, times, outcome and its reason, source), written by the apply path in the same
//! statement that decides the outcome. This module reads it: which rows a command is about
//! ([`Filter`]), page by page ([`Pages`]), and the event a row recorded ([`event_from_row`]).
//! [`list`] is `worker events list` and [`explain`] is `worker explain ID`; `worker replay`
//! ([`replay`]) and `worker rebuild` ([`rebuild`]) apply those events again.

pub mod explain;
pub mod list;
pub mod rebuild;
pub mod replay;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
};

use crate::apply::{Event, Message, ReadError, Reading, Source};
use crate::storage::processed_events;

/// Which history rows a command is about; every part is optional and they all must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Filter {
    /// Only events about this user, organization or membership id.
    #[arg(long, value_name = "ID")]
    pub subject: Option<String>,
    /// Only events of this type, e.g. `user.updated`.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Only events applied at or after this time: RFC 3339 (`2026-11-30T12:00:00Z`) or an age
    /// (`90m`, `2h`, `7d`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only events applied before this time (same forms as `--since`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
}

/// A filter no event can pass, refused before the database is asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("--since {since} is not before --until {until}: no event can match")]
    EmptyRange {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
}

impl Filter {
    /// Refuses a time range that is empty (`--since` at or after `--until`).
    pub fn check(&self) -> Result<(), FilterError> {
        match (self.since, self.until) {
            (Some(since), Some(until)) if since >= until => {
                Err(FilterError::EmptyRange { since, until })
            }
            _ => Ok(()),
        }
    }

    /// The matching rows, oldest first (by the time they were applied, then svix-id).
    pub fn select(&self) -> Select<processed_events::Entity> {
        use processed_events::Column;
        self.matching()
            .order_by_asc(Column::ProcessedAt)
            .order_by_asc(Column::SvixId)
    }

    /// The matching rows, newest first: what a limited listing keeps.
    pub fn select_newest_first(&self) -> Select<processed_events::Entity> {
        use processed_events::Column;
        self.matching()
            .order_by_desc(Column::ProcessedAt)
            .order_by_desc(Column::SvixId)
    }

    fn matching(&self) -> Select<processed_events::Entity> {
        use processed_events::Column;
        let mut select = processed_events::Entity::find();
        if let Some(subject) = &self.subject {
            select = select.filter(Column::SubjectId.eq(subject.as_str()));
        }
        if let Some(event_type) = &self.event_type {
            select = select.filter(Column::EventType.eq(event_type.as_str()));
        }
        if let Some(since) = self.since {
            select = select.filter(Column::ProcessedAt.gte(since));
        }
        if let Some(until) = self.until {
            select = select.filter(Column::ProcessedAt.lt(until));
        }
        select
    }
}

/// Reads a time given on the command line: RFC 3339, or an age before now in humantime's form
/// (`90m`, `2h`, `7d`).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let age = humantime::parse_duration(text).map_err(|_| {
        format!("{text:?} is neither an RFC 3339 time (2026-11-30T12:00:00Z) nor an age (2h, 7d)")
    })?;
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .ok_or_else(|| format!("{text:?} reaches too far back"))
}

/// The event a history row recorded, read again from its stored payload with `reading` (the
/// settings of now: that is the point after a mapping change), with source `replay` and the
/// svix-id `svix_id`; `None` for a row without a payload. The svix timestamp and the received
/// time stay the original's; the payload is kept only when `reading` allows.
pub fn event_from_row(
    row: &processed_events::Model,
    svix_id: &str,
    reading: &Reading,
) -> Option<Result<Event, ReadError>> {
    let payload = row.payload.as_ref()?.to_string();
    let message = Message {
        body: payload.as_bytes(),
        svix_id: Some(svix_id.to_owned()),
        svix_timestamp: row.svix_timestamp.map(|at| at.with_timezone(&Utc)),
        received_at: row.received_at.map(|at| at.with_timezone(&Utc)),
        source: Source::Replay,
        trace_id: None,
    };
    Some(reading.read(&message))
}

/// The svix-id of an event applied again by run `run` of `command` (`replay`, `rebuild`):
/// `replay_<run>_<original>`. The svix-id is the dedup key, so each run needs its own; the
/// prefixes of earlier runs are taken off the original, so ids do not grow and a run applies an
/// event once even when the history also holds earlier replays of it.
pub fn rerun_svix_id(command: &str, run: i64, svix_id: &str) -> String {
    format!("{command}_{run}_{}", original_svix_id(svix_id))
}

fn original_svix_id(mut svix_id: &str) -> &str {
    loop {
        let Some(rest) = svix_id
            .strip_prefix("replay_")
            .or_else(|| svix_id.strip_prefix("rebuild_"))
        else {
            return svix_id;
        };
        match rest.split_once('_') {
            Some((run, original)) if !run.is_empty() && run.bytes().all(|b| b.is_ascii_digit()) => {
                svix_id = original;
            }
            _ => return svix_id,
        }
    }
}

/// Reads the rows of a selection a page at a time, in the order of [`Filter::select`] (applied
/// time, then svix-id), each page starting after the last row read, so rows written meanwhile
/// never shift a page and the whole history is never held in memory.
pub(crate) struct Pages {
    select: Select<processed_events::Entity>,
    size: u64,
    after: Option<(sea_orm::prelude::DateTimeWithTimeZone, String)>,
}

impl Pages {
    /// `select` must be ordered as [`Filter::select`] orders.
    pub(crate) fn new(select: Select<processed_events::Entity>, size: u64) -> Self {
        Self {
            select,
            size,
            after: None,
        }
    }

    /// The next page; empty at the end.
    #[tracing::instrument(name = "read history page", level = "info", skip_all)]
    pub(crate) async fn next<C: ConnectionTrait>(
        &mut self,
        db: &C,
    ) -> Result<Vec<processed_events::Model>, DbErr> {
        use processed_events::Column;
        let mut select = self.select.clone();
        if let Some((at, svix_id)) = &self.after {
            select = select.filter(
                Condition::any().add(Column::ProcessedAt.gt(*at)).add(
                    Condition::all()
                        .add(Column::ProcessedAt.eq(*at))
                        .add(Column::SvixId.gt(svix_id.as_str())),
                ),
            );
        }
        let rows = processed_events::all(select.limit(self.size), db).await?;
        if let Some(last) = rows.last() {
            self.after = Some((last.processed_at, last.svix_id.clone()));
        }
        Ok(rows)
    }
}

/// The flags `worker replay` and `worker rebuild` share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct RunFlags {
    /// Do the work in transactions that are rolled back (each chunk or page its own): report
    /// what would change, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl RunFlags {
    /// Prints a run's summary: `json` as one JSON object, else `text`.
    pub(crate) fn print<S: serde::Serialize>(
        &self,
        summary: &S,
        text: String,
    ) -> anyhow::Result<()> {
        crate::commands::print(self.json, summary, text)
    }
}

/// Failures a summary names at most.
const FAILURES_LISTED: usize = 10;

/// Logs why an event could not be applied again, and keeps the first few reasons for the
/// summary.
pub(crate) fn note_failure(failures: &mut Vec<String>, failure: String) {
    tracing::warn!(%failure, "an event of the history could not be applied again");
    if failures.len() < FAILURES_LISTED {
        failures.push(failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_is_rfc_3339_or_an_age() {
        assert_eq!(
            parse_time("2026-11-30T12:00:00+01:00").expect("rfc 3339"),
            DateTime::parse_from_rfc3339("2026-11-30T11:00:00Z").expect("utc")
        );
        let two_hours_ago = parse_time("2h").expect("age");
        let age = Utc::now() - two_hours_ago;
        assert!(
            age >= chrono::Duration::hours(2)
                && age < chrono::Duration::hours(2) + chrono::Duration::minutes(1),
            "{age}"
        );
        let error = parse_time("yesterday-ish").expect_err("neither");
        assert!(error.contains("neither an RFC 3339 time"), "{error}");
    }

    #[test]
    fn a_rerun_svix_id_names_the_run_and_the_original_once() {
        assert_eq!(rerun_svix_id("replay", 17, "msg_1"), "replay_17_msg_1");
        assert_eq!(
            rerun_svix_id("rebuild", 20, "replay_17_msg_1"),
            "rebuild_20_msg_1"
        );
        assert_eq!(
            rerun_svix_id("replay", 30, "replay_20_replay_17_reconcile_x_user_1"),
            "replay_30_reconcile_x_user_1"
        );
        // Not a run's prefix: kept whole.
        assert_eq!(
            rerun_svix_id("replay", 5, "replay_later_msg"),
            "replay_5_replay_later_msg"
        );
    }

    #[test]
    fn a_range_must_start_before_it_ends() {
        let at = |text| parse_time(text).expect("time");
        let range = |since, until| Filter {
            since: Some(at(since)),
            until: Some(at(until)),
            ..Filter::default()
        };
        assert_eq!(
            range("2026-11-30T12:00:00Z", "2026-11-30T13:00:00Z").check(),
            Ok(())
        );
        let error = range("2026-11-30T13:00:00Z", "2026-11-30T12:00:00Z")
            .check()
            .expect_err("reversed");
        assert_eq!(
            error.to_string(),
            "--since 2026-11-30 13:00:00 UTC is not before --until 2026-11-30 12:00:00 UTC: \
             no event can match"
        );
        assert!(
            range("2026-11-30T12:00:00Z", "2026-11-30T12:00:00Z")
                .check()
                .is_err()
        );
        assert_eq!(Filter::default().check(), Ok(()));
    }
}
