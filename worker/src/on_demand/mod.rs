//! The on-demand sync: an app that cannot find a user's (or an organization's) row yet, typically
//! on the first request after a sign-up, asks the worker to fetch it from Clerk's Backend API now
//! and gets the row once it is committed, instead of waiting for the webhook.
//!
//! One sync of an object, [`OnDemand::sync`]:
//! 1. a tombstoned id is gone for good: 404, without asking Clerk;
//! 2. an object synced less than `WORKER_API_REUSE_MS` ago is answered from its stored row;
//! 3. otherwise `GET /v1/users/{id}`, or `GET /v1/organizations/{id}` and that organization's
//!    memberships, made into the `.updated` events a webhook would carry (by the door's
//!    [`Reading::read_object`], as reconcile makes its own; source `on_demand`) and applied in one transaction by
//!    [`apply::write_with`], under the same rules as every event: last writer wins, tombstones
//!    hold. A 404 from Clerk is applied as the `.deleted` event instead (row removed, tombstone
//!    written) and answered 404;
//! 4. the row as stored after the commit is the answer.
//!
//! Concurrent syncs of one object share all of it ([`single_flight`]): one Backend API call and
//! one write for a herd of requests. The Backend API client is the scheduled reconcile's,
//! made impatient ([`ClerkClient::impatient`]): the same rate limit, so neither can push the
//! other past Clerk's limits, but a request never waits more than half of `WORKER_API_TIMEOUT_MS`
//! for it (else 429 with `Retry-After`), and the whole sync is bounded by `WORKER_API_TIMEOUT_MS`
//! (else 503). The HTTP side (routes, token, statuses) is [`api`].

pub(crate) mod api;
mod config;
mod error;
mod metrics;
mod single_flight;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::apply::{self, ApplyError, Event, Next, Outcome, Reading, Settle, Source, SubjectKind};
use crate::clerk::{ClerkClient, ClerkError};
use crate::metrics::Metrics;
pub use config::OnDemandConfig;
pub(crate) use error::{SyncError, retry_after};
use metrics::OnDemandMetrics;
use single_flight::SingleFlight;

/// Database connections of the API's own pool: syncs never take the consumer's connections.
pub const API_DB_POOL: u32 = 4;

/// Recently synced objects kept before the expired ones are swept out.
const RECENT_SWEEP_AT: usize = 10_000;

/// What can be synced on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Object {
    User,
    Organization,
}

impl Object {
    /// The kind of subject: its label (the metrics' `kind`, the `object` of a deleted one), its
    /// table and its tombstones' table.
    fn kind(self) -> SubjectKind {
        match self {
            Object::User => SubjectKind::User,
            Object::Organization => SubjectKind::Organization,
        }
    }

    /// The metrics' `kind` label.
    fn name(self) -> &'static str {
        self.kind().label()
    }
}

/// How a sync ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// Fetched from Clerk and applied (or found stale: a newer version was stored already).
    Synced,
    /// Synced a moment ago: answered from the stored row.
    Reused,
    /// Clerk has no such object: the deletion was applied.
    Deleted,
    /// The id has a tombstone: Clerk was not asked.
    Tombstoned,
}

/// The answer of a sync: the stored row (`None`: there is none) and how it came about.
#[derive(Debug, Clone)]
pub(crate) struct Synced {
    pub(crate) found: Found,
    /// The row as stored, as JSON text.
    pub(crate) row: Option<Arc<str>>,
}

type Key = (Object, String);
type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The on-demand sync service: shared by every request (see the module's summary).
pub(crate) struct OnDemand {
    inner: Arc<Inner>,
    flights: SingleFlight<Key, Result<Synced>>,
    metrics: OnDemandMetrics,
    timeout: Duration,
}

/// What a flight needs, owned by its task.
struct Inner {
    db: DatabaseConnection,
    client: ClerkClient,
    /// `WORKER_ROLES`, `WORKER_DEFAULT_ROLE` and `WORKER_STORE_PAYLOADS`, as for every event.
    reading: Reading,
    reuse: Duration,
    /// When each object was last synced from Clerk.
    recent: Mutex<HashMap<Key, Instant>>,
    metrics: Metrics,
}

impl OnDemand {
    /// The service on its own database pool (`db`), drawing on `client`'s rate limit. Registers
    /// its metrics in `metrics`. Called on the worker's runtime: the syncs run there, whatever
    /// thread serves the request.
    pub(crate) fn new(
        config: &OnDemandConfig,
        db: DatabaseConnection,
        client: &ClerkClient,
        reading: Reading,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                // Half the time for the rate limit at most, the rest for the call and the write.
                client: client.impatient(config.timeout / 2),
                reading,
                reuse: config.reuse,
                recent: Mutex::new(HashMap::new()),
                metrics: metrics.clone(),
            }),
            flights: SingleFlight::on_current_runtime(),
            metrics: OnDemandMetrics::register(metrics)?,
            timeout: config.timeout,
        })
    }

    /// Syncs one object (see the module's summary), counted and timed.
    pub(crate) async fn sync(&self, object: Object, id: &str) -> Result<Synced> {
        let started = Instant::now();
        let key = (object, id.to_owned());
        let inner = self.inner.clone();
        let timeout = self.timeout;
        let (flight, _) = self.flights.join(key.clone(), move || async move {
            tokio::time::timeout(timeout, inner.sync(key))
                .await
                .unwrap_or(Err(SyncError::TimedOut))
        });
        let result = match tokio::time::timeout(timeout, flight).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(SyncError::Failed("the sync task panicked".into())),
            Err(_) => Err(SyncError::TimedOut),
        };
        let outcome = match &result {
            Ok(synced) => match synced.found {
                Found::Synced => "synced",
                Found::Reused => "reused",
                Found::Deleted => "deleted",
                Found::Tombstoned => "tombstoned",
            },
            Err(error) => error.outcome(),
        };
        self.metrics.count(object, outcome, started.elapsed());
        result
    }

    /// Counts a request refused before any sync (`unauthorized`, `forbidden`, `bad_request`).
    pub(crate) fn refused(&self, object: Object, outcome: &'static str) {
        self.metrics
            .requests
            .with_label_values(&[object.name(), outcome])
            .inc();
    }
}

impl Inner {
    async fn sync(&self, key: Key) -> Result<Synced> {
        let (object, id) = (key.0, key.1.as_str());
        if self.tombstoned(object, id).await? {
            return Ok(Synced {
                found: Found::Tombstoned,
                row: None,
            });
        }
        if self.synced_lately(&key)
            && let Some(row) = self.row(object, id).await?
        {
            return Ok(Synced {
                found: Found::Reused,
                row: Some(row),
            });
        }
        let fetched = match object {
            Object::User => self
                .client
                .user(id)
                .await
                .map(|user| user.map(|user| vec![user])),
            Object::Organization => self.fetch_organization(id).await,
        }
        .map_err(SyncError::from_clerk)?;
        let batch = uuid::Uuid::new_v4().simple().to_string();
        let event = |event_type: &str, data: &Value| -> Result<Event> {
            let data = serde_json::value::to_raw_value(data)
                .map_err(|e| SyncError::Failed(e.to_string()))?;
            self.event(&batch, event_type, &data)
        };
        let Some(objects) = fetched else {
            let deleted = match object {
                Object::User => "user.deleted",
                Object::Organization => "organization.deleted",
            };
            let data = serde_json::json!({"object": object.name(), "id": id, "deleted": true});
            self.apply(&[event(deleted, &data)?]).await?;
            tracing::info!(kind = object.name(), %id, "on-demand sync: gone from Clerk, deletion applied");
            return Ok(Synced {
                found: Found::Deleted,
                row: None,
            });
        };
        let mut events = Vec::with_capacity(objects.len());
        for (n, data) in objects.iter().enumerate() {
            let event_type = match (object, n) {
                (Object::User, _) => "user.updated",
                (Object::Organization, 0) => "organization.updated",
                (Object::Organization, _) => "organizationMembership.updated",
            };
            // A membership without an id can never apply: left out rather than failing the
            // organization it came with.
            if n > 0 && data.get("id").and_then(Value::as_str).is_none() {
                tracing::warn!(organization_id = %id, "a membership without an id; left out");
                continue;
            }
            events.push(event(event_type, data)?);
        }
        self.apply(&events).await?;
        let row = self.row(object, id).await?;
        if row.is_some() {
            self.remember(key.clone());
        }
        tracing::debug!(kind = object.name(), %id, "on-demand sync applied");
        Ok(Synced {
            found: Found::Synced,
            row,
        })
    }

    /// The organization, then its memberships; `None` when Clerk has no such organization.
    async fn fetch_organization(&self, id: &str) -> Result<Option<Vec<Value>>, ClerkError> {
        let Some(organization) = self.client.organization(id).await? else {
            return Ok(None);
        };
        let Some(memberships) = self.client.organization_memberships(id).await? else {
            // Deleted between the two calls.
            return Ok(None);
        };
        let mut objects = Vec::with_capacity(memberships.len() + 1);
        objects.push(organization);
        objects.extend(memberships);
        Ok(Some(objects))
    }

    /// The event a webhook would have carried for `data` (reconcile's way of making one).
    fn event(&self, batch: &str, event_type: &str, data: &RawValue) -> Result<Event> {
        self.reading
            .read_object(Source::OnDemand, batch, event_type, data)
            .map(|(_, event)| event)
            .map_err(|reason| {
                SyncError::Failed(format!("{event_type} from the Backend API: {reason}"))
            })
    }

    /// Applies the events "batch, then one by one" ([`apply::write_with`]): when one of them
    /// fails on its own account (a membership that does not apply), the others still land; the
    /// first (the object asked for) must.
    async fn apply(&self, events: &[Event]) -> Result<()> {
        apply::write_with(&self.db, events, &mut Applying(self)).await
    }

    /// Counts and logs what became of an event, once its transaction committed, as the
    /// consumer does for a delivery.
    fn report(&self, event: &Event, outcome: Outcome) {
        let span = tracing::info_span!("on_demand", svix_id = %event.svix_id, event_type = %event.event_type);
        span.in_scope(|| self.metrics.handled(event, outcome));
    }

    async fn tombstoned(&self, object: Object, id: &str) -> Result<bool> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE id = $1) AS tombstoned",
                    object.kind().tombstone_table()
                ),
                [id.into()],
            ))
            .await
            .map_err(|e| SyncError::from_db("reading the tombstones", &e))?;
        match row {
            Some(row) => row
                .try_get("", "tombstoned")
                .map_err(|e| SyncError::from_db("reading the tombstones", &e)),
            None => Ok(false),
        }
    }

    /// The stored row as JSON text, every column as Postgres holds it.
    async fn row(&self, object: Object, id: &str) -> Result<Option<Arc<str>>> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT to_jsonb(t)::text AS row FROM {} AS t WHERE id = $1",
                    object.kind().table()
                ),
                [id.into()],
            ))
            .await
            .map_err(|e| SyncError::from_db("reading the row", &e))?;
        row.map(|row| {
            row.try_get::<String>("", "row")
                .map(Arc::from)
                .map_err(|e| SyncError::from_db("reading the row", &e))
        })
        .transpose()
    }

    fn synced_lately(&self, key: &Key) -> bool {
        let recent = match self.recent.lock() {
            Ok(recent) => recent,
            Err(poisoned) => poisoned.into_inner(),
        };
        recent.get(key).is_some_and(|at| at.elapsed() < self.reuse)
    }

    fn remember(&self, key: Key) {
        if self.reuse.is_zero() {
            return;
        }
        let mut recent = match self.recent.lock() {
            Ok(recent) => recent,
            Err(poisoned) => poisoned.into_inner(),
        };
        if recent.len() >= RECENT_SWEEP_AT {
            recent.retain(|_, at| at.elapsed() < self.reuse);
        }
        recent.insert(key, Instant::now());
    }
}

/// The on-demand sync's turns of "batch, then one by one": a database in trouble ends the sync;
/// so does the object asked for (the first event) when it does not apply.
struct Applying<'a>(&'a Inner);

impl Settle for Applying<'_> {
    type Stop = SyncError;

    async fn batch_unavailable(&mut self, error: DbErr, _retry: u32) -> ControlFlow<SyncError> {
        ControlFlow::Break(SyncError::from_db("applying", &error))
    }

    fn batch_applied(&mut self, events: &[Event], outcomes: Vec<Outcome>, took: Duration) {
        self.0.metrics.apply_seconds.observe(took.as_secs_f64());
        for (event, outcome) in events.iter().zip(outcomes) {
            self.0.report(event, outcome);
        }
    }

    fn going_alone(&mut self, error: &DbErr) {
        tracing::warn!(%error, "an on-demand event failed; applying them one by one");
    }

    fn event_applied(&mut self, _index: usize, event: &Event, outcome: Outcome, _took: Duration) {
        self.0.report(event, outcome);
    }

    async fn event_failed(
        &mut self,
        index: usize,
        event: &Event,
        error: ApplyError,
        _retry: u32,
    ) -> Next<SyncError> {
        match error {
            ApplyError::Transient(error) => Next::Stop(SyncError::DatabaseUnavailable(error)),
            // Objects from the Backend API carry no `instance_id`, so none is refused today;
            // should one be, the call fails like a message error.
            ApplyError::Message(error) | ApplyError::ForeignInstance(error) if index == 0 => {
                Next::Stop(SyncError::Failed(error))
            }
            ApplyError::ForeignInstance(error) => {
                tracing::warn!(svix_id = %event.svix_id, %error, "an on-demand event of another instance; left out");
                Next::Skip
            }
            ApplyError::Message(error) => {
                tracing::warn!(svix_id = %event.svix_id, %error, "an on-demand event does not apply; left out");
                Next::Skip
            }
        }
    }
}
