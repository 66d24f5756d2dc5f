//! A cap on how often a log line repeats: a flood of junk requests must not turn into a flood of
//! log lines (each costs more than the rejection it reports).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lets at most `per_window` lines through in each window and counts the rest, so the next line
/// that gets through can say how many were left out.
#[derive(Debug)]
pub struct LogThrottle {
    per_window: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    started: Instant,
    written: u32,
    suppressed: u64,
}

impl LogThrottle {
    /// At most `per_window` lines in each `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(State {
                started: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being the lines left out since the last one
    /// written; `None` when this one is to be left out (and counted).
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.started.elapsed() >= self.window {
            state.started = Instant::now();
            state.written = 0;
        }
        if state.written < self.per_window {
            state.written += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_few_through_per_window_and_counts_the_rest() {
        let throttle = LogThrottle::new(3, Duration::from_secs(3600));
        let admitted: Vec<_> = (0..10).map(|_| throttle.admit()).collect();
        assert_eq!(
            admitted,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn a_new_window_admits_again_and_reports_what_was_left_out() {
        let throttle = LogThrottle::new(1, Duration::from_millis(20));
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        let next = loop {
            if let Some(left_out) = throttle.admit() {
                break left_out;
            }
            assert!(Instant::now() < deadline, "the window never turned");
            std::thread::yield_now();
        };
        // The two above, plus any that spun before the window turned.
        assert!(next >= 2, "{next}");
    }
}
