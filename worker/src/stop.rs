//! The stop signal, as the service's long-running tasks (consuming, pruning, the scheduled
//! reconcile, the waits at start) see it.

use std::time::Duration;

use tokio::sync::watch;

/// A view of the stop signal that tasks can wait on.
#[derive(Clone)]
pub(crate) struct Stop(pub(crate) watch::Receiver<bool>);

impl Stop {
    pub(crate) fn requested(&self) -> bool {
        *self.0.borrow()
    }

    pub(crate) async fn wait(&mut self) {
        // An error means the sender is gone, which also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Sleeps for `delay`; false when a stop came first.
    pub(crate) async fn sleep(&mut self, delay: Duration) -> bool {
        self.unless_stopped(tokio::time::sleep(delay))
            .await
            .is_some()
    }

    /// Runs `work` to its end, or gives it up (None) as soon as a stop is requested: a
    /// connection attempt to an unresponsive host must not hold up a shutdown.
    pub(crate) async fn unless_stopped<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.wait() => None,
            output = work => Some(output),
        }
    }
}
