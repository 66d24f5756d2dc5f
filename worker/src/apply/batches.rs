//! "Batch, then one by one": the door's one way of applying many events, whatever their source.
//!
//! The events go in one transaction ([`apply_batch`]). While the database fails on its own
//! account, the source says whether to pause and try again or to give up. When the batch fails
//! for one event's account, the events are applied one by one, each in a transaction of its own
//! ([`apply`]), so only that one fails. What becomes of each event is the source's: it answers
//! through [`Settle`]:
//! - the consumer acknowledges what committed; a delivery that fails alone goes to its own
//!   retry and dead-letter path;
//! - the commands (`worker reconcile`, `replay`, `rebuild`) go through [`write`]: a few tries of
//!   the batch, then each failed event counted and named;
//! - the on-demand sync answers with an error when the object asked for does not apply, and
//!   leaves out a membership that does not.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use sea_orm::{DbErr, TransactionTrait};
use shared::Backoff;
use tracing::Instrument;

use super::{ApplyError, BatchFailure, DbFailure, Event, Outcome, apply, apply_batch, classify};

/// What [`write_with`] does with an event that failed applied alone.
#[derive(Debug)]
pub enum Next<S> {
    /// Apply it alone again (after the pause the source took).
    Retry,
    /// Go on with the next event: the source settled this one, or left it for later.
    Skip,
    /// Apply no more of the events: [`write_with`] returns this.
    Stop(S),
}

/// What a source does at each turn of [`write_with`]. The door decides the order of the turns;
/// the source decides what each answer means to it (a delivery acknowledged, retried or
/// dead-lettered; a row counted; an HTTP answer).
pub trait Settle: Send {
    /// Why the source stopped before every event was settled.
    type Stop: Send;

    /// The span one try of the whole batch runs in.
    fn batch_span(&self) -> tracing::Span {
        tracing::Span::none()
    }

    /// The span event `index` runs in while it is applied alone and settled.
    fn event_span(&self, _index: usize) -> tracing::Span {
        tracing::Span::none()
    }

    /// The database failed on its own account applying the whole batch, the `retry`th time in a
    /// row: pause and `Continue` to try the batch again, or `Break` to stop.
    fn batch_unavailable(
        &mut self,
        error: DbErr,
        retry: u32,
    ) -> impl Future<Output = ControlFlow<Self::Stop>> + Send;

    /// The batch committed in `took`: each event's outcome, in their order.
    fn batch_applied(&mut self, events: &[Event], outcomes: Vec<Outcome>, took: Duration);

    /// The batch failed for one event's account: the events go one by one now.
    fn going_alone(&mut self, error: &DbErr) {
        tracing::warn!(%error, "an event of the batch failed; applying them one by one");
    }

    /// Event `index`, applied alone, committed in `took`.
    fn event_applied(&mut self, index: usize, event: &Event, outcome: Outcome, took: Duration);

    /// Event `index`, applied alone, failed the `retry`th time in a row: a transient failure
    /// (pause and retry, or not) as well as one of its own.
    fn event_failed(
        &mut self,
        index: usize,
        event: &Event,
        error: ApplyError,
        retry: u32,
    ) -> impl Future<Output = Next<Self::Stop>> + Send;
}

/// Batch, then one by one (see the module's summary): every event ends in one of `settle`'s
/// turns, unless it stops first.
pub async fn write_with<C, S>(db: &C, events: &[Event], settle: &mut S) -> Result<(), S::Stop>
where
    C: TransactionTrait,
    S: Settle,
{
    let mut retry = 0;
    let error = loop {
        let started = Instant::now();
        match apply_batch(db, events)
            .instrument(settle.batch_span())
            .await
        {
            Ok(outcomes) => {
                settle.batch_applied(events, outcomes, started.elapsed());
                return Ok(());
            }
            Err(BatchFailure::Transient(error)) => {
                retry += 1;
                if let ControlFlow::Break(stop) = settle.batch_unavailable(error, retry).await {
                    return Err(stop);
                }
            }
            Err(BatchFailure::Event(error)) => break error,
        }
    };
    settle.going_alone(&error);
    for (index, event) in events.iter().enumerate() {
        let span = settle.event_span(index);
        apply_alone(db, index, event, settle)
            .instrument(span)
            .await?;
    }
    Ok(())
}

/// Applies event `index` in a transaction of its own until `settle` is done with it.
async fn apply_alone<C, S>(
    db: &C,
    index: usize,
    event: &Event,
    settle: &mut S,
) -> Result<(), S::Stop>
where
    C: TransactionTrait,
    S: Settle,
{
    let mut retry = 0;
    loop {
        let started = Instant::now();
        match apply(db, event).await {
            Ok(outcome) => {
                settle.event_applied(index, event, outcome, started.elapsed());
                return Ok(());
            }
            Err(error) => {
                retry += 1;
                match settle.event_failed(index, event, error, retry).await {
                    Next::Retry => {}
                    Next::Skip => return Ok(()),
                    Next::Stop(stop) => return Err(stop),
                }
            }
        }
    }
}

/// How often [`write`] tries a batch again while the database fails on its own account, and
/// how long it waits before each try: 0.4 s, doubling, so the last waits 6.4 s.
const WRITE_RETRIES: u32 = 5;
const WRITE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(400),
    max: Duration::from_millis(6_400),
};

/// What [`write`] did: the outcome of each event (`None`: it failed on its own account) and
/// the reasons of the failed ones.
pub type Written = (Vec<Option<Outcome>>, Vec<String>);

/// The commands' way to apply (`worker reconcile`, `replay`, `rebuild`): batch, then one by one
/// ([`write_with`]), trying the batch again a few times while the database fails on its own
/// account; an event that fails alone is named in the second list.
#[tracing::instrument(name = "write page", level = "info", skip_all, fields(events = events.len()))]
pub async fn write<C: TransactionTrait>(db: &C, events: &[Event]) -> Result<Written, String> {
    let mut tally = Tally {
        outcomes: vec![None; events.len()],
        failed: Vec::new(),
    };
    write_with(db, events, &mut tally).await?;
    Ok((tally.outcomes, tally.failed))
}

/// [`write`]'s turns: a tally of the outcomes and failures.
struct Tally {
    outcomes: Vec<Option<Outcome>>,
    failed: Vec<String>,
}

impl Settle for Tally {
    type Stop = String;

    async fn batch_unavailable(&mut self, error: DbErr, retry: u32) -> ControlFlow<String> {
        if retry > WRITE_RETRIES {
            return ControlFlow::Break(format!("the database kept failing: {error}"));
        }
        let delay = WRITE_BACKOFF.delay(retry);
        tracing::warn!(%error, retries = retry, next_attempt_in = ?delay, "database failure, retrying the batch");
        tokio::time::sleep(delay).await;
        ControlFlow::Continue(())
    }

    fn batch_applied(&mut self, _events: &[Event], outcomes: Vec<Outcome>, _took: Duration) {
        self.outcomes = outcomes.into_iter().map(Some).collect();
    }

    fn event_applied(&mut self, index: usize, _event: &Event, outcome: Outcome, _took: Duration) {
        self.outcomes[index] = Some(outcome);
    }

    async fn event_failed(
        &mut self,
        _index: usize,
        event: &Event,
        error: ApplyError,
        _retry: u32,
    ) -> Next<String> {
        let id = event.action.subject().map_or("", |s| s.id);
        tracing::error!(%id, %error, "cannot write an object");
        self.failed.push(format!("{id}: {error}"));
        Next::Skip
    }
}

/// Runs a read again while the database fails on its own account, with [`write`]'s back-off
/// and number of tries.
pub async fn retry_read<T, F, Fut>(what: &str, mut read: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbErr>>,
{
    let mut retries = 0;
    loop {
        match read().await {
            Ok(value) => return Ok(value),
            Err(error) if retries < WRITE_RETRIES && classify(&error) == DbFailure::Transient => {
                retries += 1;
                let delay = WRITE_BACKOFF.delay(retries);
                tracing::warn!(%error, retries, next_attempt_in = ?delay, "database failure while {what}, retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(format!("{what}: {error}")),
        }
    }
}
