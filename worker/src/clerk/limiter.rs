//! The client-side rate limit of the Backend API client, shared by every client made from one
//! ([`super::ClerkClient::impatient`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most `limit` requests in any `window`: the send times of the last `limit` requests are
/// kept (booked ahead for callers still waiting for theirs), and a request goes when the oldest
/// of them leaves the window. Callers are served in the order they ask, whoever they are (a
/// reconcile, or on-demand requests), so none can starve the others. (A token bucket would allow
/// a full burst plus its refill inside one window, i.e. up to twice the limit.)
pub(super) struct RateLimiter {
    limit: usize,
    window: Duration,
    sent: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    pub(super) fn new(limit: u32, window: Duration) -> Self {
        let limit = limit.max(1) as usize;
        Self {
            limit,
            window,
            // Capped: a limit set very high for a benchmark must not allocate it all up front.
            sent: Mutex::new(VecDeque::with_capacity(limit.min(1024))),
        }
    }

    /// Waits for the next free moment.
    pub(super) async fn acquire(&self) {
        if let Ok(at) = self.book(None) {
            tokio::time::sleep_until(at).await;
        }
    }

    /// Waits for the next free moment if it comes within `longest`; otherwise books nothing and
    /// returns how long until it comes.
    pub(super) async fn acquire_within(&self, longest: Duration) -> Result<(), Duration> {
        let at = self.book(Some(longest))?;
        tokio::time::sleep_until(at).await;
        Ok(())
    }

    /// Books the next free moment (now, or when the oldest of the last `limit` leaves the
    /// window), unless it is further than `longest` away. Booked moments never decrease, so the
    /// oldest is always first.
    fn book(&self, longest: Option<Duration>) -> Result<Instant, Duration> {
        let now = Instant::now();
        let mut sent = match self.sent.lock() {
            Ok(sent) => sent,
            Err(poisoned) => poisoned.into_inner(),
        };
        let at = match sent.front() {
            Some(&oldest) if sent.len() >= self.limit => (oldest + self.window).max(now),
            _ => now,
        };
        if let Some(longest) = longest
            && at - now > longest
        {
            return Err(at - now);
        }
        if sent.len() >= self.limit {
            sent.pop_front();
        }
        sent.push_back(at);
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_holds_for_any_window() {
        let limiter = RateLimiter::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..7 {
            limiter.acquire().await;
            times.push(start.elapsed());
        }
        let secs: Vec<u64> = times.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [0, 0, 0, 10, 10, 10, 20]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_impatient_caller_is_told_when_there_is_room_and_books_nothing() {
        let limiter = RateLimiter::new(2, Duration::from_secs(10));
        let start = Instant::now();
        limiter.acquire().await;
        limiter.acquire().await;
        // The next free moment is 10 s away: too far for 3 s of patience.
        assert_eq!(
            limiter.acquire_within(Duration::from_secs(3)).await,
            Err(Duration::from_secs(10))
        );
        tokio::time::sleep(Duration::from_secs(8)).await;
        // Now 2 s away: waited for.
        assert_eq!(limiter.acquire_within(Duration::from_secs(3)).await, Ok(()));
        assert_eq!(start.elapsed().as_secs(), 10);
        // The refused caller booked nothing: the patient one goes at 10 s, not 20 s.
        limiter.acquire().await;
        assert_eq!(start.elapsed().as_secs(), 10);
        limiter.acquire().await;
        assert_eq!(start.elapsed().as_secs(), 20);
    }
}
