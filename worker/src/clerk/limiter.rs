//! The client-side rate limit of the Backend API client.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// At most `limit` requests in any `window`: the send times of the last `limit` requests are
/// kept, and a request waits until the oldest of them leaves the window. (A token bucket would
/// allow a full burst plus its refill inside one window, i.e. up to twice the limit.)
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

    pub(super) async fn acquire(&self) {
        // Held while waiting, so callers go out in turn.
        let mut sent = self.sent.lock().await;
        if sent.len() == self.limit
            && let Some(oldest) = sent.pop_front()
        {
            tokio::time::sleep_until(oldest + self.window).await;
        }
        sent.push_back(Instant::now());
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
}
