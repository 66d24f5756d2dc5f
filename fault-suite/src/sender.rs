//! A sender that behaves like Svix delivering Clerk's events: every event has its own svix-id,
//! each attempt is signed afresh with the time of the attempt, events go out at a steady rate,
//! and every answer that is not a 2xx (or no answer at all) is retried after a short delay until
//! a 2xx comes (Svix waits 5 s, then minutes to hours; the suite waits from 250 ms up to a few
//! seconds, so a scenario stays short). Like Svix it sometimes delivers an event again after a
//! 2xx. It keeps a ledger of every event that got a 2xx: the events the pipeline has promised
//! never to lose.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use shared::Backoff;
use svix::webhooks::Webhook;
use tokio::task::JoinSet;

use crate::history::PlannedEvent;

/// Svix gives up on an attempt after about 15 s without an answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// How the sender delivers.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The ingests' `POST /api/webhooks` URLs; attempts go to each in turn, as through a load
    /// balancer.
    pub urls: Vec<hyper::Uri>,
    /// The `whsec_…` secret the events are signed with.
    pub secret: String,
    /// Events started per second.
    pub rate: u32,
    /// Pauses between attempts: `base` before the first repeat, doubled with each further
    /// repeat, at most `max`.
    pub retry: Backoff,
    /// Share of acknowledged events delivered a second time, as Svix's at-least-once does.
    pub duplicate_ratio: f64,
}

/// What the sender counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct SenderStats {
    /// Distinct events sent at least once.
    pub sent: u64,
    /// Distinct events that got a 2xx (the ledger's length).
    pub accepted: u64,
    /// Answers `503 Service Unavailable`, over all attempts.
    pub unavailable: u64,
    /// Other answers that were not a 2xx, by status code in [`SenderOutcome::other_statuses`].
    pub other_status: u64,
    /// Of those, the ones that refuse the event itself: a 4xx other than 408 and 429. The events
    /// are valid and correctly signed, so each one is a bug in the ingest.
    pub rejected: u64,
    /// Attempts without an answer: connection refused or reset, or no answer in time.
    pub connection_errors: u64,
    /// Attempts repeated after a non-2xx answer or a connection error.
    pub retried: u64,
    /// Deliberate second deliveries of an acknowledged event that got their own 2xx.
    pub redelivered: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    unavailable: AtomicU64,
    other_status: AtomicU64,
    rejected: AtomicU64,
    connection_errors: AtomicU64,
    retried: AtomicU64,
    redelivered: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> SenderStats {
        SenderStats {
            sent: self.sent.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            other_status: self.other_status.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            connection_errors: self.connection_errors.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            redelivered: self.redelivered.load(Ordering::Relaxed),
        }
    }
}

/// The result of a sender run.
pub struct SenderOutcome {
    /// Every event that got a 2xx.
    pub ledger: Vec<Arc<PlannedEvent>>,
    pub stats: SenderStats,
    /// Answers other than 2xx and 503, counted by status code.
    pub other_statuses: BTreeMap<u16, u64>,
    /// Events still without a 2xx when the sender had to stop.
    pub undelivered: u64,
}

/// A sender at work in the background.
pub struct RunningSender {
    /// `None` once finished; aborted when the sender is dropped unfinished (a scenario that
    /// failed half-way must not leave deliveries retrying behind it).
    driver: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<HttpConnector, Full<Bytes>>,
    config: SenderConfig,
    webhook: Webhook,
    counters: Counters,
    ledger: Mutex<Vec<Arc<PlannedEvent>>>,
    other_statuses: Mutex<BTreeMap<u16, u64>>,
    /// Set when no new event is to be started; those already started still get their 2xx.
    stopping: AtomicBool,
    /// Round-robin position in the URLs.
    next_url: AtomicUsize,
}

/// Starts delivering `events` at the configured rate, until they run out or
/// [`RunningSender::stop_starting`] is called.
pub fn start(
    config: SenderConfig,
    events: impl Iterator<Item = PlannedEvent> + Send + 'static,
) -> anyhow::Result<RunningSender> {
    let webhook = Webhook::new(&config.secret).context("the signing secret does not decode")?;
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let shared = Arc::new(Shared {
        client,
        config,
        webhook,
        counters: Counters::default(),
        ledger: Mutex::new(Vec::new()),
        other_statuses: Mutex::new(BTreeMap::new()),
        stopping: AtomicBool::new(false),
        next_url: AtomicUsize::new(0),
    });
    let driver = tokio::spawn(drive(Arc::clone(&shared), events));
    Ok(RunningSender {
        driver: Some(driver),
        shared,
    })
}

impl RunningSender {
    /// Starts no new events from now on.
    pub fn stop_starting(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }

    /// Waits until the events have run out (or [`RunningSender::stop_starting`] was called) and
    /// every event started has got its 2xx, or until `deadline` has passed; whatever is still
    /// retrying then is stopped and counted as undelivered.
    pub async fn finish(mut self, deadline: Duration) -> SenderOutcome {
        if let Some(mut driver) = self.driver.take()
            && tokio::time::timeout(deadline, &mut driver).await.is_err()
        {
            // Dropping the driver's task set aborts the deliveries still retrying.
            driver.abort();
            let _ = driver.await;
        }
        let stats = self.shared.counters.snapshot();
        let ledger = match self.shared.ledger.lock() {
            Ok(ledger) => ledger.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let other_statuses = match self.shared.other_statuses.lock() {
            Ok(statuses) => statuses.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        SenderOutcome {
            undelivered: stats.sent.saturating_sub(stats.accepted),
            other_statuses,
            ledger,
            stats,
        }
    }
}

impl Drop for RunningSender {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
        }
    }
}

/// Starts one event per tick and then waits for all of them.
async fn drive(shared: Arc<Shared>, events: impl Iterator<Item = PlannedEvent>) {
    let period = Duration::from_secs(1) / shared.config.rate.max(1);
    let mut ticks = tokio::time::interval(period);
    // After a stall, catch up gradually rather than in one burst, like a steady producer would.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deliveries = JoinSet::new();
    for event in events {
        ticks.tick().await;
        if shared.stopping.load(Ordering::Relaxed) {
            break;
        }
        let shared = Arc::clone(&shared);
        deliveries.spawn(async move { deliver_event(&shared, Arc::new(event)).await });
        // Reap finished deliveries as we go so the set stays small.
        while deliveries.try_join_next().is_some() {}
    }
    while deliveries.join_next().await.is_some() {}
}

async fn deliver_event(shared: &Shared, event: Arc<PlannedEvent>) {
    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
    deliver_until_accepted(shared, &event).await;
    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
    match shared.ledger.lock() {
        Ok(mut ledger) => ledger.push(Arc::clone(&event)),
        Err(poisoned) => poisoned.into_inner().push(Arc::clone(&event)),
    }

    let again = {
        let mut rng = rand::rng();
        rng.random_bool(shared.config.duplicate_ratio)
            .then(|| Duration::from_millis(rng.random_range(0..2_000)))
    };
    if let Some(pause) = again {
        tokio::time::sleep(pause).await;
        deliver_until_accepted(shared, &event).await;
        shared.counters.redelivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// One delivery as Svix makes it: attempts until a 2xx, each signed with its own timestamp.
async fn deliver_until_accepted(shared: &Shared, event: &PlannedEvent) {
    let mut retry = 0_u32;
    loop {
        match attempt(shared, event).await {
            Ok(status) if status.is_success() => return,
            Ok(hyper::StatusCode::SERVICE_UNAVAILABLE) => {
                shared.counters.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            Ok(status) => {
                shared.counters.other_status.fetch_add(1, Ordering::Relaxed);
                let refused = status.is_client_error()
                    && status != hyper::StatusCode::REQUEST_TIMEOUT
                    && status != hyper::StatusCode::TOO_MANY_REQUESTS;
                if refused {
                    shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
                let mut statuses = match shared.other_statuses.lock() {
                    Ok(statuses) => statuses,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *statuses.entry(status.as_u16()).or_default() += 1;
            }
            Err(_) => {
                shared
                    .counters
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        shared.counters.retried.fetch_add(1, Ordering::Relaxed);
        retry = retry.saturating_add(1);
        tokio::time::sleep(shared.config.retry.delay(retry)).await;
    }
}

async fn attempt(shared: &Shared, event: &PlannedEvent) -> anyhow::Result<hyper::StatusCode> {
    let timestamp = chrono::Utc::now().timestamp();
    let signature = shared
        .webhook
        .sign(&event.svix_id, timestamp, &event.body)
        .context("signing")?;
    let turn = shared.next_url.fetch_add(1, Ordering::Relaxed);
    let url = shared.config.urls[turn % shared.config.urls.len()].clone();
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("svix-id", &event.svix_id)
        .header("svix-timestamp", timestamp.to_string())
        .header("svix-signature", signature)
        .body(Full::new(Bytes::from(event.body.clone())))
        .context("building the request")?;
    let answer = async {
        let response = shared.client.request(request).await?;
        let status = response.status();
        // Read the body to the end so the connection can be reused.
        response.into_body().collect().await?;
        anyhow::Ok(status)
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, answer)
        .await
        .context("no answer in time")?
}
