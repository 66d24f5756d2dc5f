//! A delivery held until it is settled, with its acknowledgement.

use lapin::message::Delivery;

use crate::acks::Acks;
use crate::metrics::{HeldSince, Metrics};

/// A delivery with its place among the held ones ([`crate::metrics::Held`]): the age of the
/// oldest is a metric and decides readiness, and it leaves the list when this is dropped. Its
/// acknowledgement goes through the channel's [`Acks`]: [`HeldDelivery::done`] once it is
/// settled; dropped without that, it is left for the broker to hand out again.
pub(crate) struct HeldDelivery {
    delivery: Delivery,
    tag: lapin::types::DeliveryTag,
    acks: Acks,
    _since: HeldSince,
}

impl HeldDelivery {
    pub(super) fn new(delivery: Delivery, acks: &Acks, metrics: &Metrics) -> Self {
        let tag = delivery.delivery_tag;
        acks.received(tag, delivery.acker.clone());
        Self {
            delivery,
            tag,
            acks: acks.clone(),
            _since: metrics.held.hold(),
        }
    }

    /// Committed, or its dead letter confirmed: to be acknowledged. An acknowledgement that does
    /// not get through only means a redelivery, which the svix-id makes harmless.
    pub(super) fn done(&self) {
        self.acks.done(self.tag);
    }

    /// Waiting for a retry: its pauses must not hold up the acknowledgement of the deliveries
    /// received after it.
    pub(super) fn park(&self) {
        self.acks.parked(self.tag);
    }
}

impl Drop for HeldDelivery {
    fn drop(&mut self) {
        self.acks.released(self.tag);
    }
}

impl std::ops::Deref for HeldDelivery {
    type Target = Delivery;

    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}
