//! The event history: `processed_events` keeps every handled event (svix-id, type, subject,
//! payload, times, outcome and its reason, source), written by the apply path in the same
//! statement that decides the outcome. This module reads it: which rows a command is about
//! ([`Filter`]); [`list`] is `worker events list`, [`explain`] is `worker explain ID`.

pub mod explain;
pub mod list;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select,
};

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

    /// [`Filter::select`] with at most `limit` rows.
    pub fn select_at_most(&self, limit: u64) -> Select<processed_events::Entity> {
        self.select().limit(limit)
    }
}

/// The database for a history command: a small pool and no migrations, since these commands
/// only read.
pub(crate) async fn connect(settings: &shared::Settings) -> anyhow::Result<DatabaseConnection> {
    let database_url = settings.database_url()?;
    crate::startup::connect_database(&database_url, 2)
        .await
        .context("cannot set up the database pool (DATABASE_URL)")
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
