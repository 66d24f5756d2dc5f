//! What `worker reconcile` is asked: its arguments and a run's options.

use std::fmt;
use std::str::FromStr;

use tokio::sync::watch;

use crate::apply::Reading;
use crate::apply::pace::Pace;
use crate::commands::progress;

use super::Trigger;

/// `worker reconcile [--dry-run] [--json] [--no-delete] [--max-delete N|P%]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Read and compare, write nothing; the summary says what would change.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip the deletion phases: users, organizations and memberships missing from Clerk stay.
    #[arg(long)]
    pub no_delete: bool,
    /// The most rows each deletion phase (users, organizations, memberships) may remove: a
    /// number (`250`) or a share of the table (`25%`). Default: 10 % of the table, at least 10.
    #[arg(long, value_name = "N|P%", default_value_t = MaxDelete::default())]
    pub max_delete: MaxDelete,
}

impl ReconcileArgs {
    /// Whether the run shows a progress bar: on a terminal, with human-readable logs, and not
    /// for `--json`.
    pub fn shows_bar(&self, settings: &shared::Settings) -> bool {
        progress::shows_bar(settings, self.json)
    }
}

/// The limit of the deletion phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxDelete {
    /// At most this many rows.
    Rows(u64),
    /// At most this share of the rows stored when the run started, in percent; never below
    /// [`MaxDelete::FLOOR`].
    Percent(f64),
}

impl MaxDelete {
    /// The least a percentage allows, so a small table can lose a few rows.
    pub const FLOOR: u64 = 10;

    /// The number of rows allowed for a table of `rows`.
    pub fn limit(self, rows: u64) -> u64 {
        match self {
            MaxDelete::Rows(n) => n,
            // 0 % is nothing at all: the floor is for small tables, not for a refusal.
            MaxDelete::Percent(p) if p <= 0.0 => 0,
            MaxDelete::Percent(p) => ((rows as f64 * p / 100.0).floor() as u64).max(Self::FLOOR),
        }
    }
}

impl Default for MaxDelete {
    fn default() -> Self {
        MaxDelete::Percent(10.0)
    }
}

impl fmt::Display for MaxDelete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxDelete::Rows(n) => write!(f, "{n}"),
            MaxDelete::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for MaxDelete {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(MaxDelete::Percent(p)),
                _ => Err(format!("{text:?} is not a percentage from 0% to 100%")),
            },
            None => text
                .parse::<u64>()
                .map(MaxDelete::Rows)
                .map_err(|_| format!("{text:?} is neither a number of rows nor a percentage")),
        }
    }
}

/// `WORKER_RECONCILE_CONNECTIONS`'s default: one reads while one writes. Paced
/// (`WORKER_REPAIR_SHARE`), more writers did not make a backfill faster but made the live
/// events that met their writes wait longer (BENCHMARKS.md, "Scale").
pub const DEFAULT_CONNECTIONS: u32 = 2;

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    /// False with `--no-delete`.
    pub delete: bool,
    pub max_delete: MaxDelete,
    pub trigger: Trigger,
    /// A progress bar (on a terminal) rather than progress log lines.
    pub progress_bar: bool,
    /// `WORKER_ROLES`, `WORKER_DEFAULT_ROLE` and `WORKER_STORE_PAYLOADS`: listed objects are
    /// read with them, as events are.
    pub reading: Reading,
    /// `WORKER_RECONCILE_CONNECTIONS`: the connections of the run's pool; a page is written in
    /// one transaction fewer at once (the other connection reads).
    pub connections: u32,
    /// `WORKER_REPAIR_SHARE`: the run rests after each page.
    pub pace: Pace,
    /// The stop (SIGTERM, SIGINT, a worker stopping): the run ends at the next page and is
    /// recorded `interrupted`.
    pub interruption: Interruption,
}

impl Options {
    /// Transactions of a page applied at once (each of at most
    /// [`TRANSACTION_EVENTS`](crate::apply::pace::TRANSACTION_EVENTS) objects).
    pub(super) fn writers(&self) -> usize {
        (self.connections.saturating_sub(1) as usize).max(1)
    }
}

/// A stop the run watches for; by default none ever comes.
#[derive(Debug, Clone, Default)]
pub struct Interruption(Option<watch::Receiver<bool>>);

impl Interruption {
    /// The run stops once `stop` holds true (or its sender is gone).
    pub fn new(stop: watch::Receiver<bool>) -> Self {
        Self(Some(stop))
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0.as_ref().is_some_and(|stop| *stop.borrow())
    }

    /// Runs `work` to its end, or gives it up (`None`) as soon as a stop is asked for: a page
    /// that waits out a long `Retry-After` must not hold up a shutdown.
    pub async fn unless<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let Some(stop) = &self.0 else {
            return Some(work.await);
        };
        let mut stop = stop.clone();
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => None,
            output = work => Some(output),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            dry_run: false,
            delete: true,
            max_delete: MaxDelete::default(),
            trigger: Trigger::Command,
            progress_bar: false,
            reading: Reading {
                store_payloads: true,
                ..Reading::default()
            },
            connections: DEFAULT_CONNECTIONS,
            pace: Pace::FULL,
            interruption: Interruption::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_delete_reads_rows_and_percentages() {
        assert_eq!("250".parse::<MaxDelete>(), Ok(MaxDelete::Rows(250)));
        assert_eq!("25%".parse::<MaxDelete>(), Ok(MaxDelete::Percent(25.0)));
        assert!("-3".parse::<MaxDelete>().is_err());
        assert!("150%".parse::<MaxDelete>().is_err());
        assert!("many".parse::<MaxDelete>().is_err());
    }

    #[test]
    fn the_default_limit_is_a_tenth_of_the_table_and_at_least_ten() {
        let default = MaxDelete::default();
        assert_eq!(default.limit(0), 10);
        assert_eq!(default.limit(50), 10);
        assert_eq!(default.limit(1_000), 100);
        assert_eq!(MaxDelete::Rows(3).limit(1_000), 3);
        // Zero is zero, as rows or as a share: the floor does not apply.
        assert_eq!(MaxDelete::Rows(0).limit(1_000), 0);
        assert_eq!("0%".parse::<MaxDelete>().expect("0%").limit(1_000), 0);
        assert_eq!(MaxDelete::Percent(0.0).limit(5), 0);
        assert_eq!(default.to_string(), "10%");
    }
}
