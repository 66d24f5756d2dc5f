//! The one retry pause policy: exponential back-off with a cap. The ingest's reconnects, the
//! worker's retries, the fault suite's sender and the Backend API client (with jitter) all pause
//! by it.

use std::time::Duration;

/// Exponential back-off: `base` before the first retry, doubled before each further one, never
/// above `max`. No jitter: the retrying processes are few, and the pauses stay predictable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The pause before the first retry.
    pub base: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Backoff {
    /// The pause before retry number `retry` (1 for the first retry; 0 counts as 1).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::delay`] shortened by a random part of up to half, for clients of a service
    /// that many others call too (Clerk's Backend API), so that their retries spread out.
    pub fn jittered_delay(&self, retry: u32) -> Duration {
        let delay = self.delay(retry);
        delay - delay.mul_f64(rand::random::<f64>() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_and_stops_at_the_cap() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (0..=6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(500), Duration::from_secs(1));
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_jittered_delay_lies_between_half_and_all_of_the_delay() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for retry in 1..=6 {
            let full = backoff.delay(retry);
            for _ in 0..100 {
                let jittered = backoff.jittered_delay(retry);
                assert!(
                    jittered <= full && jittered >= full / 2,
                    "{jittered:?} of {full:?}"
                );
            }
        }
    }

    #[test]
    fn a_cap_below_the_base_wins() {
        let backoff = Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(1),
        };
        assert_eq!(backoff.delay(1), Duration::from_secs(1));
    }
}
