//! Concurrent requests for one key share one piece of work: the first starts it as a task of its
//! own, the others join it, and all get a copy of its result. The work runs to its end (the work
//! bounds itself) even when every caller has stopped waiting, and a caller arriving meanwhile
//! still joins it. Once it has ended the key is free again.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};

/// The result of a flight: `None` when its task panicked.
pub(crate) type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

/// The flights in progress, by key.
pub(crate) struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, Flight<V>>>>,
    /// Where the work runs. Not the caller's runtime: the API's requests are served by actix's
    /// threads, whose stacks are the default 2 MiB, and the work reads and applies objects whose
    /// metadata can nest thousands of levels deep (see `shared::json::THREAD_STACK`).
    runtime: tokio::runtime::Handle,
}

impl<K, V> SingleFlight<K, V> {
    /// Flights whose work runs on the runtime this is called on. Panics outside a runtime.
    pub(crate) fn on_current_runtime() -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::new())),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The flight in progress for `key`, or a new one running `work` (then `true`: this caller
    /// started it).
    pub(crate) fn join<F>(&self, key: K, work: impl FnOnce() -> F) -> (Flight<V>, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get(&key) {
            return (flight.clone(), false);
        }
        let landing = Landing {
            flights: self.flights.clone(),
            key: key.clone(),
        };
        let work = work();
        // The entry goes when the task ends, however it ends (a panic included). It cannot go
        // before it is inserted: the lock is held until then.
        let task = self.runtime.spawn(async move {
            let _landing = landing;
            work.await
        });
        let flight = async move { task.await.ok() }.boxed().shared();
        flights.insert(key, flight.clone());
        (flight, true)
    }

    /// Flights in progress.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

/// Takes a flight's entry out of the map when its task ends.
struct Landing<K: Eq + Hash, V> {
    flights: Arc<Mutex<HashMap<K, Flight<V>>>>,
    key: K,
}

impl<K: Eq + Hash, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        lock(&self.flights).remove(&self.key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_the_key_is_free_afterwards() {
        let flights: SingleFlight<&str, usize> = SingleFlight::on_current_runtime();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let counting = runs.clone();
        let (first, led) = flights.join("user_1", move || async move {
            let _ = released.await;
            counting.fetch_add(1, Ordering::SeqCst) + 1
        });
        assert!(led);
        let mut joined = Vec::new();
        for _ in 0..10 {
            let (flight, led) = flights.join("user_1", || async { unreachable!() });
            assert!(!led);
            joined.push(flight);
        }
        assert_eq!(flights.in_flight(), 1);
        release.send(()).expect("release");
        assert_eq!(first.await, Some(1));
        for flight in joined {
            assert_eq!(flight.await, Some(1));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // The task has ended, so the next caller starts a new run.
        tokio::time::timeout(Duration::from_secs(5), async {
            while flights.in_flight() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the entry goes");
        let (again, led) = flights.join("user_1", || async { 7 });
        assert!(led);
        assert_eq!(again.await, Some(7));
    }

    #[tokio::test]
    async fn a_run_goes_on_when_its_callers_stop_waiting_and_a_panic_frees_the_key() {
        let flights: SingleFlight<u8, u8> = SingleFlight::on_current_runtime();
        let (done, finished) = tokio::sync::oneshot::channel();
        let (flight, _) = flights.join(1, move || async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = done.send(());
            1
        });
        drop(flight);
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the run finished without anyone waiting")
            .expect("sent");
        let (panicking, _) = flights.join(2, || async { panic!("boom") });
        assert_eq!(panicking.await, None);
        let (after, led) = flights.join(2, || async { 2 });
        assert!(led);
        assert_eq!(after.await, Some(2));
    }
}
