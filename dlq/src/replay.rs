//! `dlq replay`: give dead letters back to the worker.
//!
//! For each selected letter: publish a copy to the worker queue, wait for the broker's confirm,
//! and only then acknowledge the dead letter. A crash between the two leaves both the copy and
//! the dead letter (a duplicate, which the worker's `processed_events` absorbs); nothing is ever
//! acknowledged without a confirmed copy, so nothing is lost. Letters not selected go back to the
//! dead-letter queue untouched.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::num::NonZeroU32;
use std::time::Duration;

use clap::Args;
use tokio::time::{Interval, MissedTickBehavior};

use crate::error::DlqError;
use crate::letter::DeadLetter;
use crate::session::{Broker, RepublishError, Session};

/// Copies in flight at once: enough to let the broker batch its disk writes.
const WINDOW: usize = 64;

/// `replay` as typed on the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct ReplayArgs {
    /// Replay the dead letter with this id (the svix-id); repeat for several.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// Replay every dead letter of this event type, e.g. `user.updated`.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Replay every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Replay at most N letters (the others stay in the queue).
    #[arg(long, value_name = "N")]
    pub limit: Option<NonZeroU32>,
    /// Show what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replay at most N letters a second, to spare the worker and the database.
    #[arg(long, value_name = "N")]
    pub rate: Option<NonZeroU32>,
}

/// Which dead letters a replay takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The letters with these ids (each must be in the queue).
    Ids(BTreeSet<String>),
    /// The letters of this event type.
    Type(String),
    /// Every letter.
    All,
}

impl Selector {
    fn selects(&self, letter: &DeadLetter) -> bool {
        let summary = letter.summary();
        match self {
            Self::Ids(ids) => summary.id.as_ref().is_some_and(|id| ids.contains(id)),
            Self::Type(event_type) => summary.event_type.as_ref() == Some(event_type),
            Self::All => true,
        }
    }
}

/// A checked replay request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    pub selector: Selector,
    pub limit: Option<NonZeroU32>,
    pub dry_run: bool,
    pub rate: Option<NonZeroU32>,
}

impl TryFrom<ReplayArgs> for ReplayOptions {
    type Error = DlqError;

    fn try_from(args: ReplayArgs) -> Result<Self, DlqError> {
        let selector = match (args.ids.is_empty(), args.event_type, args.all) {
            (false, None, false) => Selector::Ids(args.ids.into_iter().collect()),
            (true, Some(event_type), false) => Selector::Type(event_type),
            (true, None, true) => Selector::All,
            (true, None, false) => return Err(DlqError::NoSelector),
            _ => return Err(DlqError::ConflictingSelectors),
        };
        Ok(Self {
            selector,
            limit: args.limit,
            dry_run: args.dry_run,
            rate: args.rate,
        })
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Letters whose copy the broker confirmed and which left the dead-letter queue (in a dry
    /// run: that would have been replayed).
    pub replayed: usize,
    /// Letters looked at and left in the queue: not selected, or beyond `--limit`.
    pub skipped: usize,
    /// Letters that could not be replayed; they are still in the queue.
    pub failed: usize,
    /// Why the first failure happened.
    pub first_failure: Option<String>,
    pub dry_run: bool,
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            write!(
                f,
                "dry run: would replay {}, skipped {}; nothing changed",
                self.replayed, self.skipped
            )
        } else {
            write!(
                f,
                "replayed {}, skipped {}, failed {}",
                self.replayed, self.skipped, self.failed
            )
        }
    }
}

/// Runs a replay, printing one progress line per letter to `progress`.
pub async fn replay(
    broker: &Broker,
    options: &ReplayOptions,
    progress: &mut impl Write,
) -> Result<ReplaySummary, DlqError> {
    broker.check_worker_queue().await?;
    let mut session = broker.session().await?;
    let outcome = select_and_replay(&mut session, options, progress).await;
    // Whatever happened, the letters not acknowledged go back to the queue.
    session.release().await;
    outcome
}

async fn select_and_replay(
    session: &mut Session,
    options: &ReplayOptions,
    progress: &mut impl Write,
) -> Result<ReplaySummary, DlqError> {
    let limit = options
        .limit
        .map_or(usize::MAX, |limit| limit.get() as usize);
    let mut summary = ReplaySummary {
        dry_run: options.dry_run,
        ..ReplaySummary::default()
    };

    // Phase 1: take the letters that were there at the start. Unknown ids are only known at the
    // end, and must stop the replay before anything changed, so an id selection looks at all of
    // them; the others stop as soon as the limit is met.
    let mut selected = Vec::new();
    let mut seen_ids = BTreeSet::new();
    while let Some(letter) = session.fetch().await? {
        if let Some(id) = &letter.summary().id {
            seen_ids.insert(id.clone());
        }
        if selected.len() < limit && options.selector.selects(&letter) {
            selected.push(letter);
        } else {
            summary.skipped += 1;
            session.hold(letter);
        }
        let ids_wanted = matches!(options.selector, Selector::Ids(_));
        if selected.len() >= limit && !ids_wanted {
            break;
        }
    }
    // Acknowledging replayed letters frees prefetch room: stop deliveries before that.
    session.stop_consuming().await;
    if let Selector::Ids(ids) = &options.selector {
        let unknown: Vec<String> = ids.difference(&seen_ids).cloned().collect();
        if !unknown.is_empty() {
            for letter in selected {
                session.hold(letter);
            }
            return Err(DlqError::UnknownIds {
                ids: unknown,
                queue: session_queue(session),
            });
        }
    }
    writeln!(
        progress,
        "{} of {} dead letter(s) selected",
        selected.len(),
        session.ready()
    )?;

    let total = selected.len();
    if options.dry_run {
        for (index, letter) in selected.into_iter().enumerate() {
            let position = index + 1;
            writeln!(
                progress,
                "[{position}/{total}] would replay {}",
                label(&letter)
            )?;
            summary.replayed += 1;
            session.hold(letter);
        }
        return Ok(summary);
    }

    // Phase 2: publish the copies a window at a time, then acknowledge each dead letter whose
    // copy the broker confirmed. With a rate, at most a second's worth is in flight, so letters
    // leave the dead-letter queue as they go.
    let window = options
        .rate
        .map_or(WINDOW, |rate| (rate.get() as usize).clamp(1, WINDOW));
    let mut pace = options.rate.map(pacer);
    let mut letters = selected.into_iter().enumerate();
    let mut stopped = false;
    while !stopped {
        let mut in_flight = Vec::with_capacity(window);
        for (index, letter) in letters.by_ref().take(window) {
            if let Some(pace) = pace.as_mut() {
                pace.tick().await;
            }
            match session.publish_copy(&letter).await {
                Ok(pending) => in_flight.push((index + 1, letter, pending)),
                Err(error) => {
                    failure(&mut summary, progress, index + 1, total, &letter, &error)?;
                    session.hold(letter);
                    stopped = true;
                    break;
                }
            }
        }
        if in_flight.is_empty() {
            break;
        }
        let mut confirmed = Vec::with_capacity(in_flight.len());
        for (position, letter, pending) in in_flight {
            match pending.confirmed().await {
                Ok(()) => {
                    writeln!(progress, "[{position}/{total}] replayed {}", label(&letter))?;
                    confirmed.push(letter);
                }
                Err(error) => {
                    failure(&mut summary, progress, position, total, &letter, &error)?;
                    session.hold(letter);
                    // The next ones would fail the same way (the queue is gone or full, the
                    // broker is away): no new window, the rest stays where it is.
                    stopped = true;
                }
            }
        }
        summary.replayed += confirmed.len();
        session.acknowledge_all(confirmed).await?;
    }
    for (_, letter) in letters {
        summary.failed += 1;
        session.hold(letter);
    }
    Ok(summary)
}

fn failure(
    summary: &mut ReplaySummary,
    progress: &mut impl Write,
    position: usize,
    total: usize,
    letter: &DeadLetter,
    error: &RepublishError,
) -> std::io::Result<()> {
    summary.failed += 1;
    summary
        .first_failure
        .get_or_insert_with(|| error.to_string());
    writeln!(
        progress,
        "[{position}/{total}] failed {}: {error}",
        label(letter)
    )
}

fn session_queue(session: &Session) -> String {
    session.dead_queue().to_string()
}

fn label(letter: &DeadLetter) -> String {
    let summary = letter.summary();
    format!(
        "{} ({})",
        summary.id.as_deref().unwrap_or("<no id>"),
        summary.event_type.as_deref().unwrap_or("<no type>")
    )
}

fn pacer(rate: NonZeroU32) -> Interval {
    // At least a microsecond: a zero period would panic, and no broker goes faster anyway.
    let period = (Duration::from_secs(1) / rate.get()).max(Duration::from_micros(1));
    let mut interval = tokio::time::interval(period);
    // After a slow publish, keep the spacing rather than bursting to catch up.
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_without_a_selector_is_refused() {
        let error = ReplayOptions::try_from(ReplayArgs::default()).expect_err("no selector");
        assert!(matches!(error, DlqError::NoSelector));
    }

    #[test]
    fn two_kinds_of_selector_are_refused() {
        let args = ReplayArgs {
            all: true,
            event_type: Some("user.created".into()),
            ..ReplayArgs::default()
        };
        let error = ReplayOptions::try_from(args).expect_err("conflict");
        assert!(matches!(error, DlqError::ConflictingSelectors));
    }

    #[test]
    fn repeated_ids_make_one_id_selection() {
        let args = ReplayArgs {
            ids: vec!["a".into(), "b".into(), "a".into()],
            ..ReplayArgs::default()
        };
        let options = ReplayOptions::try_from(args).expect("valid");
        assert_eq!(
            options.selector,
            Selector::Ids(["a".to_string(), "b".to_string()].into())
        );
    }

    #[test]
    fn the_summary_line_counts_each_outcome() {
        let summary = ReplaySummary {
            replayed: 3,
            skipped: 2,
            failed: 1,
            ..ReplaySummary::default()
        };
        assert_eq!(summary.to_string(), "replayed 3, skipped 2, failed 1");
    }
}
