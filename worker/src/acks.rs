//! Acknowledgements in ranges: one `basic.ack` with `multiple` for every run of finished
//! deliveries, sent by one task per consuming channel, instead of one awaited acknowledgement per
//! delivery in the task that applied it.
//!
//! Batches commit out of order and a delivery may wait seconds for a retry, so the broker's
//! `multiple` (everything up to this tag) is only sent over tags that are all finished. The
//! [`Ledger`] keeps every delivery received on the channel, in tag order, until it is
//! acknowledged:
//! - `Working`: in a batch; finished soon, so finished deliveries after it wait for it;
//! - `Parked`: waiting for a retry, or left unacknowledged for the broker to hand out again
//!   (shutdown, a lost channel); finished deliveries after it are acknowledged one by one,
//!   since a range would take it along;
//! - `Done`: committed, or its dead letter confirmed: to be acknowledged.
//!
//! Nothing is acknowledged before it is `Done`, so "acknowledged only after the commit" holds
//! as before; a delivery whose acknowledgement does not get through is redelivered and the
//! svix-id makes it a duplicate.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::Acker;
use lapin::options::BasicAckOptions;
use lapin::types::DeliveryTag;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Working,
    Parked,
    Done,
}

/// An acknowledgement to send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ack<A> {
    /// `multiple`: every outstanding delivery up to and including this one.
    UpTo(A),
    /// This delivery alone.
    One(A),
}

/// The deliveries of one channel not yet acknowledged, by tag (the broker numbers them in the
/// order it hands them out, which is the order they are received in).
#[derive(Debug)]
pub(crate) struct Ledger<A> {
    entries: BTreeMap<DeliveryTag, (State, A)>,
}

impl<A> Default for Ledger<A> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<A> Ledger<A> {
    pub(crate) fn received(&mut self, tag: DeliveryTag, acker: A) {
        self.entries.insert(tag, (State::Working, acker));
    }

    /// The delivery waits for a retry: later ones must not wait for it.
    pub(crate) fn parked(&mut self, tag: DeliveryTag) {
        if let Some((state @ State::Working, _)) = self.entries.get_mut(&tag) {
            *state = State::Parked;
        }
    }

    /// Committed, or dead-lettered and confirmed.
    pub(crate) fn done(&mut self, tag: DeliveryTag) {
        if let Some((state, _)) = self.entries.get_mut(&tag) {
            *state = State::Done;
        }
    }

    /// The delivery's handling ended. Unless it is done, it is never to be acknowledged on this
    /// channel (the broker hands it out again once the channel closes).
    pub(crate) fn released(&mut self, tag: DeliveryTag) {
        self.parked(tag);
    }

    /// The acknowledgements that can go now, in the order to send them; they leave the ledger.
    /// The finished run at the front goes as one range; after that, finished deliveries that
    /// only parked ones precede go one by one; the rest wait for the deliveries still working.
    pub(crate) fn due(&mut self) -> Vec<Ack<A>> {
        let mut acks = Vec::new();
        let mut last = None;
        while let Some(entry) = self.entries.first_entry() {
            if entry.get().0 != State::Done {
                break;
            }
            last = Some(entry.remove().1);
        }
        acks.extend(last.map(Ack::UpTo));
        let alone: Vec<DeliveryTag> = self
            .entries
            .iter()
            .map(|(tag, (state, _))| (*tag, *state))
            .take_while(|(_, state)| *state != State::Working)
            .filter(|(_, state)| *state == State::Done)
            .map(|(tag, _)| tag)
            .collect();
        for tag in alone {
            if let Some((_, acker)) = self.entries.remove(&tag) {
                acks.push(Ack::One(acker));
            }
        }
        acks
    }
}

/// What happened to a delivery, sent to the acknowledging task.
#[derive(Debug)]
enum Note {
    Received(DeliveryTag, Acker),
    Parked(DeliveryTag),
    Done(DeliveryTag),
    Released(DeliveryTag),
}

/// The sending side, held by the consume loop and by every delivery.
#[derive(Debug, Clone)]
pub(crate) struct Acks(mpsc::UnboundedSender<Note>);

impl Acks {
    /// Starts the task that acknowledges for one channel. It ends once every [`Acks`] is dropped
    /// and what they reported is acknowledged; each acknowledgement waits at most `timeout` (a
    /// blocked broker reads nothing, and an acknowledgement that does not get through only means
    /// a redelivery).
    pub(crate) fn start(timeout: Duration) -> (Self, JoinHandle<()>) {
        let (sender, notes) = mpsc::unbounded_channel();
        (Self(sender), tokio::spawn(acknowledge(notes, timeout)))
    }

    // A send fails only once the task is gone, which happens after every sender is dropped.
    pub(crate) fn received(&self, tag: DeliveryTag, acker: Acker) {
        let _ = self.0.send(Note::Received(tag, acker));
    }

    pub(crate) fn parked(&self, tag: DeliveryTag) {
        let _ = self.0.send(Note::Parked(tag));
    }

    pub(crate) fn done(&self, tag: DeliveryTag) {
        let _ = self.0.send(Note::Done(tag));
    }

    pub(crate) fn released(&self, tag: DeliveryTag) {
        let _ = self.0.send(Note::Released(tag));
    }
}

async fn acknowledge(mut notes: mpsc::UnboundedReceiver<Note>, timeout: Duration) {
    let mut ledger = Ledger::default();
    let take = |ledger: &mut Ledger<Acker>, note| match note {
        Note::Received(tag, acker) => ledger.received(tag, acker),
        Note::Parked(tag) => ledger.parked(tag),
        Note::Done(tag) => ledger.done(tag),
        Note::Released(tag) => ledger.released(tag),
    };
    while let Some(note) = notes.recv().await {
        take(&mut ledger, note);
        // Whatever else is waiting first: the more that is finished, the longer the range.
        while let Ok(note) = notes.try_recv() {
            take(&mut ledger, note);
        }
        for ack in ledger.due() {
            let (acker, multiple) = match ack {
                Ack::UpTo(acker) => (acker, true),
                Ack::One(acker) => (acker, false),
            };
            send(&acker, multiple, timeout).await;
        }
    }
}

async fn send(acker: &Acker, multiple: bool, timeout: Duration) {
    match tokio::time::timeout(timeout, acker.ack(BasicAckOptions { multiple })).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => tracing::warn!(
            multiple,
            "cannot acknowledge: the channel is gone; the broker will redeliver and the svix-id makes that harmless"
        ),
        Ok(Err(error)) => tracing::warn!(
            %error, multiple,
            "cannot acknowledge; the broker will redeliver and the svix-id makes that harmless"
        ),
        Err(_) => tracing::warn!(
            ?timeout,
            multiple,
            "the broker did not take the acknowledgement in time; it will redeliver and the svix-id makes that harmless"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{Ack, Ledger};

    fn ledger(tags: impl IntoIterator<Item = u64>) -> Ledger<u64> {
        let mut ledger = Ledger::default();
        for tag in tags {
            ledger.received(tag, tag);
        }
        ledger
    }

    #[test]
    fn a_finished_run_at_the_front_goes_as_one_range() {
        let mut ledger = ledger(1..=5);
        for tag in [2, 1, 3] {
            ledger.done(tag);
        }
        assert_eq!(ledger.due(), vec![Ack::UpTo(3)]);
        assert_eq!(ledger.due(), vec![]);
        ledger.done(5);
        assert_eq!(ledger.due(), vec![], "5 waits for 4, still working");
        ledger.done(4);
        assert_eq!(ledger.due(), vec![Ack::UpTo(5)]);
    }

    #[test]
    fn nothing_is_acknowledged_before_it_is_done() {
        let mut ledger = ledger(1..=3);
        ledger.done(3);
        assert_eq!(ledger.due(), vec![]);
        ledger.done(2);
        assert_eq!(ledger.due(), vec![]);
    }

    #[test]
    fn deliveries_after_a_parked_one_go_one_by_one_and_never_take_it_along() {
        let mut ledger = ledger(1..=6);
        ledger.done(1);
        ledger.parked(2);
        ledger.done(3);
        ledger.done(4);
        ledger.done(6);
        assert_eq!(
            ledger.due(),
            vec![Ack::UpTo(1), Ack::One(3), Ack::One(4)],
            "6 waits for 5, still working"
        );
        ledger.done(5);
        assert_eq!(ledger.due(), vec![Ack::One(5), Ack::One(6)]);
        // The retry succeeds: 2 is the front again.
        ledger.done(2);
        assert_eq!(ledger.due(), vec![Ack::UpTo(2)]);
        assert!(ledger.entries.is_empty());
    }

    #[test]
    fn a_released_delivery_is_never_acknowledged_but_does_not_hold_up_the_others() {
        let mut ledger = ledger(1..=3);
        ledger.released(1);
        ledger.done(2);
        ledger.done(3);
        // Released after it was done: nothing changes.
        ledger.released(3);
        assert_eq!(ledger.due(), vec![Ack::One(2), Ack::One(3)]);
        assert_eq!(ledger.entries.len(), 1);
    }

    #[test]
    fn a_parked_delivery_that_finishes_behind_a_working_one_waits_for_it() {
        let mut ledger = ledger(1..=3);
        ledger.parked(2);
        ledger.done(2);
        ledger.done(3);
        assert_eq!(ledger.due(), vec![]);
        ledger.done(1);
        assert_eq!(ledger.due(), vec![Ack::UpTo(3)]);
    }
}
